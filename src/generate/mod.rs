//! The generator: sample completions from a teacher and store them with its log-probabilities.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub output: PathBuf,
    pub samples: usize,
    pub completion_tokens: usize,
    pub tokens_per_sec: f64,
    pub wall_secs: f64,
}

pub fn generate(_job: &GenerateJob) -> anyhow::Result<GenerateReport> {
    unimplemented!("in progress")
}
