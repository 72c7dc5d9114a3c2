//! Everything kdllm reads or writes on disk besides models: prompt sets, task examples,
//! and the Parquet files of teacher samples.
//!
//! - [`read_prompts`]: the prompts `generate` sends to the teacher (JSONL or plain text).
//! - [`read_examples`]: task / fine-tuning examples (JSONL or blank-line separated text).
//! - [`SampleWriter`] / [`read_samples`]: teacher samples with top-k log-probs, in the
//!   Parquet layout documented in `schema.rs`; [`Manifest`] and [`PartsOutput`]: the folder of
//!   part files that `generate` and `score` fill, and folders of its shards.

use serde::{Deserialize, Serialize};

mod error;
mod examples;
mod manifest;
mod output;
mod prompts;
mod reader;
mod sample;
mod schema;
mod shards;
mod text;
mod writer;

pub use error::DataError;
pub use examples::{read_examples, Example};
pub use manifest::{part_name, sync_dir, write_atomic, Manifest, Part, Shard, ShardRange, MANIFEST};
pub use output::{OutputError, PartsOutput};
pub use prompts::{read_prompts, PromptInput, PromptRecord};
pub use reader::{read_metadata, read_samples, SampleSet};
pub use sample::{Completion, FileMetadata, FinishReason, ParseFinishReasonError, Sample};
pub use writer::SampleWriter;

/// One chat turn, as in the `messages` of a JSONL prompt and in chat templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}
