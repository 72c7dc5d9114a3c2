//! One teacher sample and the per-file metadata shared by all samples of a file.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why the teacher stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence / stop token was sampled.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown finish reason `{0}`; expected `stop` or `length`")]
pub struct ParseFinishReasonError(String);

impl FromStr for FinishReason {
    type Err = ParseFinishReasonError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(FinishReason::Stop),
            "length" => Ok(FinishReason::Length),
            other => Err(ParseFinishReasonError(other.to_string())),
        }
    }
}

/// One completion sampled from the teacher, with its log-probs.
///
/// All per-completion-token lists (`completion_token_ids`, `token_logprobs`, `topk_*`) have
/// the same length; every top-k row has exactly [`FileMetadata::logprobs_k`] entries.
/// Log-probs are natural-log probabilities of the teacher's distribution at temperature 1,
/// whatever temperature was used for sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub prompt_id: String,
    /// Which of the samples drawn for this prompt (0-based).
    pub sample_index: u32,
    /// Exactly the text the teacher saw (chat template already applied).
    pub prompt: String,
    pub completion: String,
    pub prompt_token_ids: Vec<u32>,
    pub completion_token_ids: Vec<u32>,
    /// Teacher log p(sampled token) at T=1, one per completion token.
    pub token_logprobs: Vec<f32>,
    /// Per completion position, the K most likely token ids, most likely first.
    pub topk_token_ids: Vec<Vec<u32>>,
    /// Same shape as `topk_token_ids`: their log-probs at T=1.
    pub topk_logprobs: Vec<Vec<f32>>,
    pub finish_reason: FinishReason,
    /// The teacher as resolved: alias, hub repo id or local path.
    pub teacher: String,
    pub teacher_revision: Option<String>,
}

impl Sample {
    /// Checks the length invariants; the message says which list is off and by how much.
    pub(crate) fn check(&self, logprobs_k: usize) -> Result<(), String> {
        let n = self.completion_token_ids.len();
        for (name, len) in [
            ("token_logprobs", self.token_logprobs.len()),
            ("topk_token_ids", self.topk_token_ids.len()),
            ("topk_logprobs", self.topk_logprobs.len()),
        ] {
            if len != n {
                return Err(format!("`{name}` has {len} entries but `completion_token_ids` has {n}"));
            }
        }
        if let Some(pos) = self.topk_token_ids.iter().position(|r| r.len() != logprobs_k) {
            let len = self.topk_token_ids[pos].len();
            return Err(bad_row("topk_token_ids", pos, len, logprobs_k));
        }
        if let Some(pos) = self.topk_logprobs.iter().position(|r| r.len() != logprobs_k) {
            let len = self.topk_logprobs[pos].len();
            return Err(bad_row("topk_logprobs", pos, len, logprobs_k));
        }
        // NaN means the teacher's forward pass went wrong; -inf is a legitimate masked token.
        if self.token_logprobs.iter().any(|x| x.is_nan()) || self.topk_logprobs.iter().flatten().any(|x| x.is_nan()) {
            return Err("log-probs contain NaN".to_string());
        }
        Ok(())
    }
}

fn bad_row(name: &str, pos: usize, len: usize, k: usize) -> String {
    format!("`{name}` row {pos} has {len} entries but the file's logprobs_k is {k}")
}

/// Settings shared by every sample of a file, stored as Parquet key-value metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMetadata {
    /// Identifies the tokenizer the token ids belong to; students must use the same one.
    pub tokenizer_hash: String,
    /// K, the number of top log-probs kept per completion token.
    pub logprobs_k: usize,
    /// The sampling parameters used, as JSON.
    pub sampling: serde_json::Value,
    /// The kdllm version that wrote the file.
    pub kdllm_version: String,
    /// The serving engine that computed the log-probs (`engine`, `version`, `model`), when the
    /// teacher was a server.
    pub server: Option<serde_json::Value>,
}

impl FileMetadata {
    /// Metadata for a file written by this build of kdllm.
    pub fn new(tokenizer_hash: impl Into<String>, logprobs_k: usize, sampling: serde_json::Value) -> Self {
        FileMetadata {
            tokenizer_hash: tokenizer_hash.into(),
            logprobs_k,
            sampling,
            kdllm_version: env!("CARGO_PKG_VERSION").to_string(),
            server: None,
        }
    }
}

/// A completion and the teacher's log-probs at each of its tokens: what a decode loop, a server
/// or a scoring pass gives for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated ids; a final EOS is included when `finish` is `Stop`.
    pub ids: Vec<u32>,
    /// log p(token) at temperature 1 for each id.
    pub token_logprobs: Vec<f32>,
    pub topk_ids: Vec<Vec<u32>>,
    pub topk_logprobs: Vec<Vec<f32>>,
    pub finish: FinishReason,
}

impl Completion {
    pub fn empty() -> Self {
        Completion {
            ids: Vec::new(),
            token_logprobs: Vec::new(),
            topk_ids: Vec::new(),
            topk_logprobs: Vec::new(),
            finish: FinishReason::Length,
        }
    }

    /// The generated ids without the final EOS: what the completion text is decoded from.
    pub fn text_ids(&self) -> &[u32] {
        match self.finish {
            FinishReason::Stop if !self.ids.is_empty() => &self.ids[..self.ids.len() - 1],
            _ => &self.ids,
        }
    }
}
