//! Scoring: the teacher's log-probs for text it did not write. Every completion token of the
//! input gets the teacher's log-prob and its top-k there, teacher-forced (the teacher reads the
//! text, it does not sample), in the same Parquet layout `generate` writes: word-level
//! distillation on any corpus (Hinton et al. 2015; Kim & Rush 2016), and the grading step of
//! on-policy distillation.
//!
//! Input: teacher samples written by kdllm (a file, a folder, a folder of shards) — their ids
//! are kept, so their tokenizer must be the teacher's — or a corpus, JSONL of
//! `{"prompt", "completion"}` or `{"text"}` (tokenized here, EOS after each completion).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use serde::Serialize;

use super::{sampler, GenerateError};
use crate::data::{self, Completion, FileMetadata, FinishReason, PartsOutput, Sample, Shard};
use crate::engine::ServerOptions;
use crate::model::{Llama, Precision};
use crate::teacher::{Ended, Teacher};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct ScoreJob {
    /// Where the tensors live (`--device`).
    pub device: crate::device::DeviceChoice,
    /// A model (folder, Hub id, alias, GGUF) or an `http(s)://` server.
    pub teacher: String,
    pub revision: Option<String>,
    pub tokenizer: Option<String>,
    pub server: ServerOptions,
    /// Teacher samples (Parquet) or a corpus (JSONL / text).
    pub data: PathBuf,
    pub output: PathBuf,
    /// Top-k log-probs stored per completion token.
    pub logprobs: usize,
    pub precision: Precision,
    /// Rows per forward pass of an in-process teacher.
    pub batch_size: usize,
    pub part_size: usize,
    pub overwrite: bool,
    pub shard: Option<Shard>,
}

/// Rows per forward pass unless set: each keeps (tokens × vocabulary) log-probs in memory.
pub const DEFAULT_SCORE_BATCH: usize = 4;

#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub output: PathBuf,
    /// Rows in the output (this shard's), resumed ones included.
    pub rows: usize,
    pub resumed: usize,
    /// Completion tokens scored by this run.
    pub tokens: usize,
    pub tokens_per_sec: f64,
    pub wall_secs: f64,
}

/// One input row: what the teacher reads and which tokens it is asked about.
struct Row {
    prompt_id: String,
    sample_index: u32,
    prompt: String,
    completion: String,
    prompt_ids: Vec<u32>,
    completion_ids: Vec<u32>,
    finish: FinishReason,
}

pub fn score(job: &ScoreJob) -> anyhow::Result<ScoreReport> {
    let started = Instant::now();
    job.server.validate()?;
    for (name, v) in [("batch_size", job.batch_size), ("part_size", job.part_size)] {
        if v == 0 {
            anyhow::bail!("`{name}` must be >= 1");
        }
    }
    let teacher = Teacher::open(&job.teacher, job.revision.as_deref(), job.tokenizer.as_deref(), &job.server)?;
    let tokenizer = teacher.tokenizer();
    if job.logprobs > teacher.vocab_size() {
        return Err(GenerateError::LogprobsTooLarge { k: job.logprobs, vocab: teacher.vocab_size() }.into());
    }
    let (rows, sampling) = read_rows(&job.data, tokenizer)?;
    if let Some(max) = teacher.max_context() {
        if let Some(r) = rows.iter().find(|r| r.prompt_ids.len() + r.completion_ids.len() > max) {
            anyhow::bail!(
                "row `{}`#{} of {} is {} tokens, more than the teacher's context of {max}; shorten it or leave it out",
                r.prompt_id,
                r.sample_index,
                job.data.display(),
                r.prompt_ids.len() + r.completion_ids.len()
            );
        }
    }
    let command = serde_json::json!({
        "score": {
            "teacher": teacher.identity()?,
            "data": crate::hash::sha256_path(&job.data, &|_| false)
                .with_context(|| format!("reading {}", job.data.display()))?,
            "logprobs": job.logprobs,
            "dtype": job.precision,
            "batch_size": job.batch_size,
        }
    });
    let total = rows.len() as u64;
    let shard = job.shard.map(|s| s.range(total, teacher.shard_unit(job.batch_size)));
    let dir = &job.output;
    let mut out = PartsOutput::open(dir, command, total, shard, job.overwrite)?;
    let end = out.manifest().range().1 as usize;
    let resumed = out.manifest().done() as usize;
    let size = out.manifest().size() as usize;
    let report = |tokens: usize, secs: f64| ScoreReport {
        output: dir.clone(),
        rows: size,
        resumed,
        tokens,
        tokens_per_sec: tokens as f64 / secs.max(1e-9),
        wall_secs: started.elapsed().as_secs_f64(),
    };
    if out.manifest().is_complete() {
        eprintln!("{} is already complete ({size} rows): nothing to do", dir.display());
        return Ok(report(0, 0.0));
    }
    if resumed > 0 {
        eprintln!("resuming {}: {resumed} of {size} rows already scored", dir.display());
    }
    let mut meta = FileMetadata::new(tokenizer.vocab_hash(), job.logprobs, sampling);
    meta.server = teacher.server_info();
    out.start(meta, job.part_size);
    let (name, revision) = teacher.name();
    let sample = |r: &Row, c: Completion| Sample {
        prompt_id: r.prompt_id.clone(),
        sample_index: r.sample_index,
        prompt: r.prompt.clone(),
        completion: r.completion.clone(),
        prompt_token_ids: r.prompt_ids.clone(),
        completion_token_ids: r.completion_ids.clone(),
        token_logprobs: c.token_logprobs,
        topk_token_ids: c.topk_ids,
        topk_logprobs: c.topk_logprobs,
        finish_reason: r.finish,
        teacher: name.clone(),
        teacher_revision: revision.clone(),
    };
    let todo = &rows[out.next() as usize..end];
    let bar = crate::progress::bar(size as u64, "score");
    bar.set_position(resumed as u64);
    let scoring_started = Instant::now();
    let mut tokens = 0;
    match &teacher {
        Teacher::Local(checkpoint) => {
            let device = crate::device::resolve(job.device)?;
            let model = checkpoint.model(&device, job.precision)?;
            for chunk in todo.chunks(job.batch_size) {
                for (r, c) in chunk.iter().zip(score_batch(&model, chunk, job.logprobs)?) {
                    tokens += r.completion_ids.len();
                    out.push(&sample(r, c))?;
                }
                bar.inc(chunk.len() as u64);
                crate::fault::point("generate-batch");
                let stop = crate::interrupt::requested();
                out.end_batch(stop)?;
                if stop {
                    return Err(super::interrupted(&bar, &out));
                }
            }
        }
        Teacher::Remote(remote) => {
            let k = job.logprobs;
            let ended = remote.for_each_in_order(
                todo.iter(),
                |server, r| async move { server.score(&r.prompt_ids, &r.completion_ids, k).await },
                &mut out,
                |out, i, c| {
                    tokens += todo[i].completion_ids.len();
                    out.push(&sample(&todo[i], c))?;
                    bar.inc(1);
                    crate::fault::point("generate-batch");
                    Ok(())
                },
            )?;
            if ended == Ended::Stopped {
                return Err(super::interrupted(&bar, &out));
            }
        }
    }
    bar.finish_and_clear();
    Ok(report(tokens, scoring_started.elapsed().as_secs_f64()))
}

/// The rows of `path` and the sampling settings to record (those the input was drawn with).
fn read_rows(path: &Path, tokenizer: &Tokenizer) -> anyhow::Result<(Vec<Row>, serde_json::Value)> {
    let is_samples = path.is_dir() || path.extension().is_some_and(|e| e == "parquet");
    if is_samples {
        let set = data::read_samples(path)?;
        if set.meta.tokenizer_hash != tokenizer.vocab_hash() {
            anyhow::bail!(
                "{} was tokenized with another tokenizer than the teacher's (its ids cannot be scored by this teacher); \
                 score its text instead: write its prompts and completions as JSONL (`prompt`, `completion`) and pass that as --data",
                path.display()
            );
        }
        let rows = set
            .samples
            .into_iter()
            .map(|s| Row {
                prompt_id: s.prompt_id,
                sample_index: s.sample_index,
                prompt: s.prompt,
                completion: s.completion,
                prompt_ids: s.prompt_token_ids,
                completion_ids: s.completion_token_ids,
                finish: s.finish_reason,
            })
            .collect();
        return Ok((rows, set.meta.sampling));
    }
    let mut rows = Vec::new();
    for (i, e) in data::read_examples(path)?.into_iter().enumerate() {
        let mut prompt_ids = tokenizer.encode(&e.prompt, true)?;
        let mut completion_ids = tokenizer.encode(&e.completion, false)?;
        completion_ids.extend(tokenizer.eos_ids().first());
        let (mut prompt, mut completion) = (e.prompt, e.completion);
        // Nothing predicts the very first token of a text without BOS: it becomes the prompt.
        if prompt_ids.is_empty() && !completion_ids.is_empty() {
            prompt_ids.push(completion_ids.remove(0));
            prompt = tokenizer.decode_with_special(&prompt_ids)?;
            let text_ids = &completion_ids[..completion_ids.len().saturating_sub(1)];
            completion = tokenizer.decode(text_ids)?;
        }
        rows.push(Row {
            prompt_id: i.to_string(),
            sample_index: 0,
            prompt,
            completion,
            prompt_ids,
            completion_ids,
            finish: FinishReason::Stop,
        });
    }
    Ok((rows, serde_json::json!({"scored": path.file_name().map(|n| n.to_string_lossy().into_owned())})))
}

/// One forward pass over a batch of rows (right-padded), the logits taken only at the positions
/// that predict completion tokens.
fn score_batch(model: &Llama, rows: &[Row], k: usize) -> anyhow::Result<Vec<Completion>> {
    let width = rows.iter().map(|r| r.prompt_ids.len() + r.completion_ids.len()).max().unwrap_or(0).max(1);
    let mut inputs = Vec::with_capacity(rows.len() * width);
    let mut positions = Vec::new();
    for (b, r) in rows.iter().enumerate() {
        let n = r.prompt_ids.len() + r.completion_ids.len();
        inputs.extend(r.prompt_ids.iter().chain(&r.completion_ids));
        inputs.extend(std::iter::repeat_n(0u32, width - n));
        // Position p predicts token p + 1.
        positions.extend((r.prompt_ids.len()..n).map(|t| (b * width + t - 1) as u32));
    }
    let mut out = Vec::with_capacity(rows.len());
    if positions.is_empty() {
        out.extend(rows.iter().map(|_| Completion::empty()));
        return Ok(out);
    }
    let dev = model.device();
    let ids = Tensor::from_vec(inputs, (rows.len(), width), dev)?;
    let at = Tensor::from_vec(positions, rows.iter().map(|r| r.completion_ids.len()).sum::<usize>(), dev)?;
    let logits = model.forward_at(&ids, &at)?.to_vec2::<f32>()?;
    let mut next = logits.iter();
    for r in rows {
        let mut c = Completion::empty();
        for &id in &r.completion_ids {
            let lp = sampler::log_softmax(next.next().expect("one row of logits per completion token"));
            c.ids.push(id);
            c.token_logprobs.push(lp[id as usize]);
            let (ids, lps) = sampler::top_k(&lp, k).into_iter().unzip();
            c.topk_ids.push(ids);
            c.topk_logprobs.push(lps);
        }
        c.finish = r.finish;
        out.push(c);
    }
    Ok(out)
}
