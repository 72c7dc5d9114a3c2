//! The manifest of a sample folder: which command wrote it and which part files are complete.
//!
//! `kdllm generate -o DIR` writes `DIR/part-00000.parquet`, `DIR/part-00001.parquet`, … Each
//! part holds a contiguous run of the job's work items ((prompt, sample index) pairs in prompt
//! order), is written under a temporary name and renamed when complete, and only then recorded
//! here; the manifest itself is replaced atomically. So after a crash at any moment the manifest
//! lists exactly the parts that are whole, and a rerun continues after the last one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::DataError;

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// What wrote the folder (teacher, prompt file hash, sampling settings…): a rerun must match it.
    pub command: serde_json::Value,
    /// Work items of the whole job (prompts × samples per prompt).
    pub total: u64,
    /// Complete parts, in order; part i starts where part i − 1 ends.
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub file: String,
    /// Work items `start..end`.
    pub start: u64,
    pub end: u64,
    pub bytes: u64,
    pub sha256: String,
    /// `prompt_id#sample_index` of the first and last rows, for people reading the manifest.
    pub first: String,
    pub last: String,
}

impl Manifest {
    pub fn new(command: serde_json::Value, total: u64) -> Self {
        Self { command, total, parts: Vec::new() }
    }

    /// Work items already in complete parts.
    pub fn done(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.end)
    }

    pub fn is_complete(&self) -> bool {
        self.done() == self.total
    }

    /// The manifest of `dir`, or `None` when it has none.
    pub fn read(dir: &Path) -> Result<Option<Self>, DataError> {
        let path = dir.join(MANIFEST);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DataError::Read { path, what: "manifest", hint: "check the folder's permissions", source })
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|source| DataError::Json { path, line: 1, source })
    }

    /// Replaces `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        write_atomic(&path, text.as_bytes()).map_err(|source| DataError::Write { path, source })
    }

    /// The files of the complete parts, in order.
    pub fn part_paths(&self, dir: &Path) -> Vec<PathBuf> {
        self.parts.iter().map(|p| dir.join(&p.file)).collect()
    }
}

/// `part-00007.parquet`.
pub fn part_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// Replaces `path` with `bytes` so that readers see the old file or the new one, never a torn
/// one: `<path>.partial`, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let written = File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()));
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes renames and deletions in `dir` durable (best effort: not every file system allows it).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
