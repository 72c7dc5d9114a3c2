//! The generator: sample completions from a teacher and store them with its log-probabilities.

mod decode;
pub mod sampler;

pub use decode::{decode, Completion, DecodeSettings};

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{self, FileMetadata, PromptInput, Sample, SampleWriter};
use crate::model::{Checkpoint, Precision};

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

#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Alias, Hub repo id or local folder.
    pub teacher: String,
    pub revision: Option<String>,
    pub prompts: PathBuf,
    /// The Parquet file to write.
    pub output: PathBuf,
    pub sampling: SamplingConfig,
    /// The teacher's compute dtype.
    pub precision: Precision,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub output: PathBuf,
    pub samples: usize,
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
    #[error("prompt `{id}` is {len} tokens; with --max-new-tokens {new} it exceeds the teacher's context of {max} tokens; shorten the prompt or lower --max-new-tokens")]
    PromptTooLong { id: String, len: usize, new: usize, max: usize },
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

/// The RNG of one (prompt, sample) pair: independent of batching and of the other prompts.
pub fn row_rng(seed: u64, prompt_id: &str, sample_index: u32) -> StdRng {
    StdRng::seed_from_u64(crate::hash::fnv1a(&[&seed.to_le_bytes(), prompt_id.as_bytes(), &sample_index.to_le_bytes()]))
}

pub fn generate(job: &GenerateJob) -> anyhow::Result<GenerateReport> {
    let started = Instant::now();
    let cfg = &job.sampling;
    cfg.validate()?;
    let prompts = data::read_prompts(&job.prompts)?;
    let teacher = Checkpoint::open(&job.teacher, job.revision.as_deref())?;
    let tokenizer = &teacher.tokenizer;
    let model = teacher.model(&Device::Cpu, job.precision)?;
    let vocab = model.config().vocab_size;
    if cfg.logprobs > vocab {
        return Err(GenerateError::LogprobsTooLarge { k: cfg.logprobs, vocab }.into());
    }

    // Render and tokenize every prompt before sampling anything, so bad input fails fast.
    let max_ctx = model.config().max_position_embeddings;
    let mut rendered = Vec::with_capacity(prompts.len());
    for p in &prompts {
        // As transformers does: a rendered chat template carries its own special tokens
        // (`apply_chat_template` encodes without adding any); plain text gets the model's BOS.
        let (text, add_special_tokens) = match &p.input {
            PromptInput::Text(t) => (t.clone(), true),
            PromptInput::Chat(messages) => {
                let text = tokenizer
                    .render_chat(messages)
                    .with_context(|| format!("rendering the chat template for prompt `{}`", p.id))?;
                (text, false)
            }
        };
        let ids = tokenizer.encode(&text, add_special_tokens)?;
        if ids.len() + cfg.max_new_tokens > max_ctx {
            let e = GenerateError::PromptTooLong {
                id: p.id.clone(),
                len: ids.len(),
                new: cfg.max_new_tokens,
                max: max_ctx,
            };
            return Err(e.into());
        }
        rendered.push((text, ids));
    }

    let settings = cfg.decode_settings(tokenizer.eos_ids().to_vec());
    let meta = FileMetadata::new(tokenizer.vocab_hash(), cfg.logprobs, serde_json::to_value(cfg)?);
    if let Some(parent) = job.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating output folder {}", parent.display()))?;
    }
    let mut writer = SampleWriter::create(&job.output, &meta)?;
    let work: Vec<(usize, u32)> =
        (0..prompts.len()).flat_map(|p| (0..cfg.samples_per_prompt as u32).map(move |s| (p, s))).collect();
    let bar = crate::progress::bar(work.len() as u64, "generate");
    let mut tokens = 0;
    let decode_started = Instant::now();
    for chunk in work.chunks(cfg.batch_size) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&(p, _)| rendered[p].1.clone()).collect();
        let mut rngs: Vec<StdRng> = chunk.iter().map(|&(p, s)| row_rng(cfg.seed, &prompts[p].id, s)).collect();
        for (&(p, s), c) in chunk.iter().zip(decode(&model, &ids, &mut rngs, &settings)?) {
            tokens += c.ids.len();
            writer.write(&Sample {
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
                teacher: teacher.id.clone(),
                teacher_revision: teacher.revision.clone(),
            })?;
        }
        bar.inc(chunk.len() as u64);
    }
    let decode_secs = decode_started.elapsed().as_secs_f64();
    let samples = writer.finish()? as usize;
    bar.finish_and_clear();
    Ok(GenerateReport {
        output: job.output.clone(),
        samples,
        completion_tokens: tokens,
        tokens_per_sec: tokens as f64 / decode_secs.max(1e-9),
        wall_secs: started.elapsed().as_secs_f64(),
    })
}
