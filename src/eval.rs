//! Evaluation of a model on teacher samples (NLL, KL and top-1 agreement with the teacher)
//! and on a task (accuracy of greedy answers).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::D;
use serde::{Deserialize, Serialize};

use crate::data;
use crate::generate::{decode, row_rng, DecodeSettings};
use crate::model::{Checkpoint, Llama, Precision};
use crate::tokenizer::Tokenizer;
use crate::train::batch::{Batch, Sequence};
use crate::train::{encode_example, loss};

#[derive(Debug, Clone)]
pub struct EvalJob {
    /// Where the tensors live (`--device`).
    pub device: crate::device::DeviceChoice,
    /// A model folder, alias or Hub repo id.
    pub model: String,
    pub precision: Precision,
    /// Teacher samples (Parquet) or task examples (JSONL/text).
    pub data: PathBuf,
    /// Task test set (JSONL of prompt/completion) to score greedy answers on, with the task's checker.
    pub task: Option<PathBuf>,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub params: usize,
    pub tokens: usize,
    pub nll_per_token: f64,
    pub perplexity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_to_teacher: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_accuracy: Option<f64>,
    /// Greedy decoding speed on the task prompts, at `batch_size` (tokens written per second).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_sec: Option<f64>,
    /// The model's greedy answers to the first few task prompts, for a person to read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Answer>,
}

/// One task prompt, the expected completion and the model's greedy one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub prompt: String,
    pub expected: String,
    pub answer: String,
    pub correct: bool,
}

/// How many answers a report keeps.
pub const ANSWERS_KEPT: usize = 4;

/// What greedy decoding on the task test set gave.
struct TaskScore {
    accuracy: f64,
    tokens_per_sec: f64,
    answers: Vec<Answer>,
}

pub fn evaluate(job: &EvalJob) -> anyhow::Result<EvalReport> {
    let ckpt = Checkpoint::open(&job.model, None)?;
    let device = crate::device::resolve(job.device)?;
    let model = ckpt.model(&device, job.precision)?;
    let tokenizer = ckpt.tokenizer;
    let seqs = sequences(&job.data, &tokenizer)?;
    let m = measure(&model, &seqs, job.batch_size.max(1))?;
    let task = match &job.task {
        Some(path) => Some(task_score(&model, &tokenizer, path, job.batch_size.max(1))?),
        None => None,
    };
    Ok(EvalReport {
        model: job.model.clone(),
        params: model.config().num_params(),
        tokens: m.tokens,
        nll_per_token: m.nll,
        perplexity: m.nll.exp(),
        kl_to_teacher: m.kl,
        top1_agreement: m.top1,
        task_accuracy: task.as_ref().map(|t| t.accuracy),
        decode_tokens_per_sec: task.as_ref().map(|t| t.tokens_per_sec),
        answers: task.map(|t| t.answers).unwrap_or_default(),
    })
}

/// Teacher samples (a Parquet file or folder) or task examples (JSONL / text).
fn sequences(path: &Path, tokenizer: &Tokenizer) -> anyhow::Result<Vec<Sequence>> {
    let is_samples = path.is_dir() || path.extension().is_some_and(|e| e == "parquet");
    if !is_samples {
        return data::read_examples(path)?
            .iter()
            .map(|e| encode_example(tokenizer, &e.prompt, &e.completion))
            .collect();
    }
    let set = data::read_samples(path)?;
    if set.meta.tokenizer_hash != tokenizer.vocab_hash() {
        anyhow::bail!(
            "{} was written with a different tokenizer than the model's; KL and agreement need the same vocabulary",
            path.display()
        );
    }
    let with_teacher = set.meta.logprobs_k > 0;
    Ok(set.samples.into_iter().map(|s| Sequence::from_sample(s, with_teacher)).collect())
}

struct Measures {
    tokens: usize,
    nll: f64,
    kl: Option<f64>,
    top1: Option<f64>,
}

/// Token-weighted NLL of the data's completions, and (with teacher top-k) KL at T = 1 and
/// the fraction of positions where the model's argmax is the teacher's most likely token.
fn measure(model: &Llama, seqs: &[Sequence], batch_size: usize) -> anyhow::Result<Measures> {
    let (mut n, mut nll, mut kl, mut agree) = (0usize, 0f64, 0f64, 0usize);
    let mut with_teacher = !seqs.is_empty();
    for chunk in seqs.chunks(batch_size) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let batch = Batch::new(&refs, model.device())?;
        let count = batch.targets.dim(0)?;
        if count == 0 {
            continue;
        }
        let logits = model.forward_at(&batch.inputs, &batch.positions)?;
        nll += loss::scalar(&loss::cross_entropy(&logits, &batch.targets)?)? * count as f64;
        match &batch.teacher {
            Some((ids, lps)) => {
                kl += loss::scalar(&loss::topk_kl(&logits, ids, lps, 1.0)?)? * count as f64;
                let student_top = logits.argmax(D::Minus1)?;
                let teacher_top = ids.narrow(1, 0, 1)?.squeeze(1)?;
                agree +=
                    student_top.eq(&teacher_top)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()?
                        as usize;
            }
            None => with_teacher = false,
        }
        n += count;
    }
    let denom = n.max(1) as f64;
    Ok(Measures {
        tokens: n,
        nll: nll / denom,
        kl: with_teacher.then_some(kl / denom),
        top1: with_teacher.then_some(agree as f64 / denom),
    })
}

/// Fraction of task examples whose greedy completion is the expected answer, the decoding speed,
/// and the first few answers.
fn task_score(model: &Llama, tokenizer: &Tokenizer, path: &Path, batch_size: usize) -> anyhow::Result<TaskScore> {
    let examples = data::read_examples(path)?;
    let prompts: Vec<Vec<u32>> =
        examples.iter().map(|e| tokenizer.encode(&e.prompt, true)).collect::<Result<_, _>>()?;
    let longest = examples
        .iter()
        .map(|e| tokenizer.encode(&e.completion, false).map(|v| v.len()))
        .try_fold(0, |m, l| l.map(|l| m.max(l)))?;
    let settings = DecodeSettings {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: longest + 2,
        logprobs: 0,
        eos_ids: tokenizer.eos_ids().to_vec(),
    };
    let bar = crate::progress::bar(examples.len() as u64, "task");
    let (mut correct, mut written, mut secs) = (0, 0, 0.0);
    let mut answers = Vec::new();
    for (chunk, exs) in prompts.chunks(batch_size).zip(examples.chunks(batch_size)) {
        // Greedy decoding never draws from these; decode wants one per row.
        let mut rngs: Vec<_> = (0..chunk.len()).map(|i| row_rng(0, "", i as u32)).collect();
        let t = Instant::now();
        let completions = decode(model, chunk, &mut rngs, &settings)?;
        secs += t.elapsed().as_secs_f64();
        for (c, e) in completions.iter().zip(exs) {
            let answer = tokenizer.decode(c.text_ids())?;
            let ok = crate::task::is_correct(&e.completion, &answer);
            correct += usize::from(ok);
            written += c.ids.len();
            if answers.len() < ANSWERS_KEPT {
                answers.push(Answer { prompt: e.prompt.clone(), expected: e.completion.clone(), answer, correct: ok });
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(TaskScore {
        accuracy: correct as f64 / examples.len().max(1) as f64,
        tokens_per_sec: written as f64 / secs.max(1e-9),
        answers,
    })
}
