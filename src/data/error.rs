//! The one error type of the `data` module. Every variant names the file it is about.

use std::io;
use std::path::PathBuf;

use arrow::error::ArrowError;
use parquet::errors::ParquetError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file (or directory) could not be opened or read.
    #[error("cannot read {what} {}: {source}; {hint}", path.display())]
    Read { path: PathBuf, what: &'static str, hint: &'static str, source: io::Error },

    /// The output file could not be created, written, synced or renamed.
    #[error("cannot write {}: {source}; check that the directory exists and is writable", path.display())]
    Write { path: PathBuf, source: io::Error },

    /// A JSONL line is not valid JSON or does not have the expected shape.
    #[error("{}:{line}: invalid JSON: {source}", path.display())]
    Json { path: PathBuf, line: usize, source: serde_json::Error },

    /// A line parsed but its content is wrong (missing field, duplicate id, ...).
    #[error("{}:{line}: {message}", path.display())]
    Line { path: PathBuf, line: usize, message: String },

    /// The file holds no records at all.
    #[error("{} contains no {what}; {hint}", path.display())]
    Empty { path: PathBuf, what: &'static str, hint: &'static str },

    /// Not a Parquet file, or a damaged one (typically cut short by an interrupted run).
    #[error("{} is not a readable Parquet file ({source}); if a run was interrupted, delete it and generate it again", path.display())]
    Parquet { path: PathBuf, source: ParquetError },

    /// The Parquet encoder failed while writing (disk full, I/O error, or a bug in kdllm).
    #[error("cannot write Parquet file {}: {source}; check free disk space", path.display())]
    ParquetWrite { path: PathBuf, source: ParquetError },

    /// Arrow could not assemble or decode a batch; a schema mismatch the checks did not catch.
    #[error("{}: arrow error: {source}", path.display())]
    Arrow { path: PathBuf, source: ArrowError },

    /// A column is missing, has the wrong type, or holds nulls where none are allowed.
    #[error("{}: column `{column}` {problem}; this file was not written by a compatible kdllm (regenerate it with `kdllm generate`)", path.display())]
    Schema { path: PathBuf, column: String, problem: String },

    /// A column chunk uses a codec this build cannot decode (it has zstd and snappy).
    #[error("{}: column `{column}` is compressed with {codec}, which kdllm cannot read; rewrite the file with zstd, snappy or no compression (pyarrow: `compression=\"zstd\"`)", path.display())]
    Compression { path: PathBuf, column: String, codec: String },

    /// A `kdllm.*` key-value metadata entry is missing or unparsable.
    #[error("{}: file metadata `{key}` {problem}; this file was not written by a compatible kdllm (regenerate it with `kdllm generate`)", path.display())]
    Metadata { path: PathBuf, key: &'static str, problem: String },

    /// Part files of one sample set were written with different settings.
    #[error("{} and {} disagree on {field}; keep only parts from one `kdllm generate` run in the directory", first.display(), second.display())]
    MetadataMismatch { first: PathBuf, second: PathBuf, field: &'static str },

    /// A sample folder whose `kdllm generate` run has not finished.
    #[error("{} is an unfinished `kdllm generate` output ({done} of {total} samples); run the same generate command (or recipe) again to finish it", path.display())]
    Incomplete { path: PathBuf, done: u64, total: u64 },

    /// A folder of shard folders that is not one whole job: a shard missing, doubled, unfinished
    /// or from another command.
    #[error("{}: {message}", dir.display())]
    ShardSet { dir: PathBuf, message: String },

    /// A sample's lists have inconsistent lengths (or bad values).
    #[error("{}: sample `{prompt_id}` #{sample_index}: {problem}", path.display())]
    InvalidSample { path: PathBuf, prompt_id: String, sample_index: u32, problem: String },
}
