//! The generator: sample completions from a teacher (in this process or on a server) and store
//! them with its log-probabilities; `score` stores its log-probabilities for given text.

mod decode;
pub mod sampler;
mod score;

pub use decode::{decode, decode_continuous, DecodeSettings};
pub use score::{score, ScoreJob, ScoreReport, DEFAULT_SCORE_BATCH};

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{self, Completion, FileMetadata, PartsOutput, PromptInput, Sample, Shard};
use crate::engine::{self, SampleParams, ServerOptions};
use crate::model::Precision;
use crate::teacher::{Ended, Teacher};

/// Sampling settings; the CLI flags and recipe keys of the same names. Defaults only in `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub samples_per_prompt: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// How many of the teacher's most likely tokens to store per position.
    pub logprobs: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            samples_per_prompt: 1,
            seed: 0,
            batch_size: 8,
            logprobs: 20,
        }
    }
}

/// What to do with a prompt that, with `max_new_tokens`, does not fit the teacher's context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongPrompts {
    /// Stop before sampling anything, naming the prompt.
    #[default]
    Refuse,
    /// Keep the prompt's last tokens (after BOS), with a warning per prompt.
    Truncate,
}

impl std::str::FromStr for LongPrompts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(LongPrompts::Refuse),
            "truncate" => Ok(LongPrompts::Truncate),
            other => Err(format!("`{other}` is not a long-prompt policy; use refuse or truncate")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Where the tensors live (`--device`).
    pub device: crate::device::DeviceChoice,
    /// Alias, Hub repo id, local folder, GGUF file, or an `http(s)://` server.
    pub teacher: String,
    pub revision: Option<String>,
    /// A server teacher's tokenizer (else found from the model id the server reports).
    pub tokenizer: Option<String>,
    pub server: ServerOptions,
    pub prompts: PathBuf,
    /// The output folder: Parquet part files and `manifest.json`.
    pub output: PathBuf,
    pub sampling: SamplingConfig,
    /// The teacher's compute dtype.
    pub precision: Precision,
    pub long_prompts: LongPrompts,
    /// Samples per part file (rounded up to whole batches): at most this much work is redone
    /// after a crash.
    pub part_size: usize,
    /// Replace an output folder written by a different command instead of refusing.
    pub overwrite: bool,
    /// Only this shard of the work list.
    pub shard: Option<Shard>,
}

/// Samples per part file unless set.
pub const DEFAULT_PART_SIZE: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub output: PathBuf,
    /// Samples in the output, resumed ones included.
    pub samples: usize,
    /// Samples found done by an earlier run of the same command.
    pub resumed: usize,
    /// Completion tokens sampled by this run.
    pub completion_tokens: usize,
    pub tokens_per_sec: f64,
    pub wall_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
    #[error("`--logprobs {k}` is larger than the teacher's vocabulary ({vocab}); use at most {vocab}")]
    LogprobsTooLarge { k: usize, vocab: usize },
    #[error("prompt `{id}` is {len} tokens; with --max-new-tokens {new} it exceeds the teacher's context of {max} tokens; shorten the prompt, lower --max-new-tokens, or pass --long-prompts truncate")]
    PromptTooLong { id: String, len: usize, new: usize, max: usize },
    #[error("--max-new-tokens {new} leaves no room for a prompt in the teacher's context of {max} tokens; lower it")]
    NoRoomForPrompt { new: usize, max: usize },
}

impl SamplingConfig {
    /// Checks every field against its bound, naming the flag.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |m: String| Err(GenerateError::Sampling(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("`temperature` must be >= 0 (0 = greedy), got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("`top_p` must be > 0 and <= 1, got {}", self.top_p));
        }
        for (name, v) in [
            ("max_new_tokens", self.max_new_tokens),
            ("samples_per_prompt", self.samples_per_prompt),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be >= 1"));
            }
        }
        Ok(())
    }

    pub fn decode_settings(&self, eos_ids: Vec<u32>) -> DecodeSettings {
        DecodeSettings {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            logprobs: self.logprobs,
            eos_ids,
        }
    }
}

/// The seed of one (prompt, sample) pair: independent of batching and of the other prompts.
pub fn row_seed(seed: u64, prompt_id: &str, sample_index: u32) -> u64 {
    crate::hash::fnv1a(&[&seed.to_le_bytes(), prompt_id.as_bytes(), &sample_index.to_le_bytes()])
}

/// The RNG of one (prompt, sample) pair.
pub fn row_rng(seed: u64, prompt_id: &str, sample_index: u32) -> StdRng {
    StdRng::seed_from_u64(row_seed(seed, prompt_id, sample_index))
}

pub fn generate(job: &GenerateJob) -> anyhow::Result<GenerateReport> {
    let started = Instant::now();
    let cfg = &job.sampling;
    cfg.validate()?;
    job.server.validate()?;
    if job.part_size == 0 {
        return Err(GenerateError::Sampling("`part_size` must be >= 1".into()).into());
    }
    let prompts = data::read_prompts(&job.prompts)?;
    let teacher = Teacher::open(&job.teacher, job.revision.as_deref(), job.tokenizer.as_deref(), &job.server)?;
    let tokenizer = teacher.tokenizer();
    let vocab = teacher.vocab_size();
    if cfg.logprobs > vocab {
        return Err(GenerateError::LogprobsTooLarge { k: cfg.logprobs, vocab }.into());
    }
    let rendered = render_prompts(&prompts, tokenizer, cfg.max_new_tokens, teacher.max_context(), job.long_prompts)?;

    // The identity of the job: a rerun with the same one continues, any other is refused.
    let command = serde_json::json!({
        "teacher": teacher.identity()?,
        "prompts": crate::hash::sha256_path(&job.prompts, &|_| false)
            .with_context(|| format!("reading {}", job.prompts.display()))?,
        "sampling": cfg,
        "dtype": job.precision,
        "long_prompts": job.long_prompts,
    });
    let work: Vec<(usize, u32)> =
        (0..prompts.len()).flat_map(|p| (0..cfg.samples_per_prompt as u32).map(move |s| (p, s))).collect();
    let total = work.len() as u64;
    let shard = job.shard.map(|s| s.range(total, teacher.shard_unit(cfg.batch_size)));
    let dir = &job.output;
    let mut out = PartsOutput::open(dir, command, total, shard, job.overwrite)?;
    let end = out.manifest().range().1;
    let resumed = out.manifest().done() as usize;
    let size = out.manifest().size() as usize;
    let report = |tokens: usize, secs: f64| GenerateReport {
        output: dir.clone(),
        samples: size,
        resumed,
        completion_tokens: tokens,
        tokens_per_sec: tokens as f64 / secs.max(1e-9),
        wall_secs: started.elapsed().as_secs_f64(),
    };
    if out.manifest().is_complete() {
        eprintln!("{} is already complete ({size} samples): nothing to do", dir.display());
        return Ok(report(0, 0.0));
    }
    if resumed > 0 {
        eprintln!("resuming {}: {resumed} of {size} samples already done", dir.display());
    }

    let mut meta = FileMetadata::new(tokenizer.vocab_hash(), cfg.logprobs, serde_json::to_value(cfg)?);
    meta.server = teacher.server_info();
    out.start(meta, job.part_size);
    let (name, revision) = teacher.name();
    let row = |p: usize, s: u32, c: Completion| -> anyhow::Result<Sample> {
        Ok(Sample {
            prompt_id: prompts[p].id.clone(),
            sample_index: s,
            prompt: rendered[p].0.clone(),
            completion: tokenizer.decode(c.text_ids())?,
            prompt_token_ids: rendered[p].1.clone(),
            completion_token_ids: c.ids,
            token_logprobs: c.token_logprobs,
            topk_token_ids: c.topk_ids,
            topk_logprobs: c.topk_logprobs,
            finish_reason: c.finish,
            teacher: name.clone(),
            teacher_revision: revision.clone(),
        })
    };
    let todo = &work[out.next() as usize..end as usize];
    let bar = crate::progress::bar(size as u64, "generate");
    bar.set_position(resumed as u64);
    let decode_started = Instant::now();
    let tokens = match &teacher {
        Teacher::Local(checkpoint) => {
            // Loaded only now: a refused or finished job costs no weights in memory.
            let device = crate::device::resolve(job.device)?;
            let model = checkpoint.model(&device, job.precision)?;
            let settings = cfg.decode_settings(tokenizer.eos_ids().to_vec());
            let ids: Vec<Vec<u32>> = todo.iter().map(|&(p, _)| rendered[p].1.clone()).collect();
            let rngs: Vec<StdRng> = todo.iter().map(|&(p, s)| row_rng(cfg.seed, &prompts[p].id, s)).collect();
            // Rows end out of order and are written in work order, committed every batch_size
            // rows: a stopped run resumes at the first row not written. A row's tokens never
            // depend on the rows decoded beside it, so the resumed rows are, bit for bit, what
            // an uninterrupted run writes.
            let mut ready: std::collections::BTreeMap<usize, Completion> = Default::default();
            let (mut written, mut tokens) = (0, 0);
            decode_continuous(&model, &ids, rngs, cfg.batch_size, &settings, |i, c| {
                ready.insert(i, c);
                while let Some(c) = ready.remove(&written) {
                    let (p, s) = todo[written];
                    tokens += c.ids.len();
                    out.push(&row(p, s, c)?)?;
                    written += 1;
                    bar.inc(1);
                    if written % cfg.batch_size == 0 || written == todo.len() {
                        crate::fault::point("generate-batch");
                        let stop = crate::interrupt::requested();
                        out.end_batch(stop)?;
                        if stop {
                            return Err(interrupted(&bar, &out));
                        }
                    }
                }
                Ok(())
            })?;
            tokens
        }
        Teacher::Remote(remote) => {
            let sample = |&(p, s): &(usize, u32)| SampleParams {
                temperature: cfg.temperature,
                top_p: cfg.top_p,
                top_k: cfg.top_k,
                max_new_tokens: cfg.max_new_tokens,
                logprobs: cfg.logprobs,
                seed: engine::request_seed(row_seed(cfg.seed, &prompts[p].id, s)),
            };
            let requests = todo.iter().map(|w| (rendered[w.0].1.as_slice(), sample(w)));
            let mut tokens = 0;
            let ended = remote.for_each_in_order(
                requests,
                |server, (ids, params)| async move { server.sample(ids, &params).await },
                &mut out,
                |out, i, c| {
                    let (p, s) = todo[i];
                    tokens += c.ids.len();
                    out.push(&row(p, s, c)?)?;
                    bar.inc(1);
                    crate::fault::point("generate-batch");
                    Ok(())
                },
            )?;
            if ended == Ended::Stopped {
                return Err(interrupted(&bar, &out));
            }
            tokens
        }
    };
    bar.finish_and_clear();
    Ok(report(tokens, decode_started.elapsed().as_secs_f64()))
}

/// The error of a run stopped by Ctrl-C, saying what was kept.
fn interrupted(bar: &indicatif::ProgressBar, out: &PartsOutput) -> anyhow::Error {
    bar.abandon();
    let m = out.manifest();
    let saved = format!("{} of {} samples are complete in {}", m.done(), m.size(), out.dir().display());
    crate::interrupt::Interrupted { saved }.into()
}

/// Each prompt as the teacher sees it: the rendered text and its token ids, checked (or cut)
/// against the context window before anything is sampled, so bad input fails fast.
fn render_prompts(
    prompts: &[data::PromptRecord],
    tokenizer: &crate::tokenizer::Tokenizer,
    max_new_tokens: usize,
    max_ctx: Option<usize>,
    policy: LongPrompts,
) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    // A server that does not say its context leaves the check to the server.
    let max_ctx = max_ctx.unwrap_or(usize::MAX);
    let room = max_ctx.checked_sub(max_new_tokens).filter(|&r| r > 0);
    let room = room.ok_or(GenerateError::NoRoomForPrompt { new: max_new_tokens, max: max_ctx })?;
    let mut rendered = Vec::with_capacity(prompts.len());
    for p in prompts {
        // As transformers does: a rendered chat template carries its own special tokens
        // (`apply_chat_template` encodes without adding any); plain text gets the model's BOS.
        let (mut text, add_special_tokens) = match &p.input {
            PromptInput::Text(t) => (t.clone(), true),
            PromptInput::Chat(messages) => {
                let text = tokenizer
                    .render_chat(messages)
                    .with_context(|| format!("rendering the chat template for prompt `{}`", p.id))?;
                (text, false)
            }
        };
        let mut ids = tokenizer.encode(&text, add_special_tokens)?;
        if ids.len() > room {
            if policy == LongPrompts::Refuse {
                let e = GenerateError::PromptTooLong {
                    id: p.id.clone(),
                    len: ids.len(),
                    new: max_new_tokens,
                    max: max_ctx,
                };
                return Err(e.into());
            }
            // Keep the end, where the question and the assistant header are; BOS stays first.
            let keep_bos = usize::from(tokenizer.bos_id().is_some_and(|b| ids.first() == Some(&b)));
            let cut = ids.len() - room;
            eprintln!(
                "warning: prompt `{}` is {} tokens; keeping its last {} (--long-prompts truncate)",
                p.id,
                ids.len(),
                room - keep_bos
            );
            ids.drain(keep_bos..keep_bos + cut);
            text = tokenizer.decode_with_special(&ids)?;
        }
        rendered.push((text, ids));
    }
    Ok(rendered)
}
