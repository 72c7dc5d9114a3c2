//! Everything kdllm reads or writes on disk besides models: prompt sets, task examples,
//! and the Parquet files of teacher samples.

use serde::{Deserialize, Serialize};

/// One chat turn, as in the `messages` of a JSONL prompt and in chat templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}
