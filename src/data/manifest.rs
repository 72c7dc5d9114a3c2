//! The manifest of a sample folder: which command wrote it and which part files are complete.
//!
//! `kdllm generate -o DIR` writes `DIR/part-00000.parquet`, `DIR/part-00001.parquet`, … Each
//! part holds a contiguous run of the job's work items ((prompt, sample index) pairs in prompt
//! order), is written under a temporary name and renamed when complete, and only then recorded
//! here; the manifest itself is replaced atomically. So after a crash at any moment the manifest
//! lists exactly the parts that are whole, and a rerun continues after the last one.
//!
//! A job split with `--shard I/N` gives each shard a contiguous slice of the work list (in whole
//! batches, so an in-process teacher samples exactly the batches of an unsharded run); its
//! manifest records the slice, and parts count work items from the start of the whole job.

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
    /// Work items of the whole job (prompts × samples per prompt), all shards together.
    pub total: u64,
    /// The slice of the work list this folder holds, when the job is sharded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardRange>,
    /// Complete parts, in order; the first starts where the folder's slice starts, part i
    /// where part i − 1 ends.
    pub parts: Vec<Part>,
    /// How the samples were made, for people (the engine, its version, the model it served);
    /// not part of the command's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_info: Option<serde_json::Value>,
}

/// `--shard I/N`: shard I (0-based) of N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

/// A shard and the work items `start..end` it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub index: u64,
    pub count: u64,
    pub start: u64,
    pub end: u64,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "write it as I/N: shard I (counted from 0) of N, e.g. 0/4 … 3/4";
        let (i, n) = s.split_once('/').ok_or_else(|| format!("`{s}` is not a shard; {usage}"))?;
        let (index, count) = match (i.trim().parse::<u64>(), n.trim().parse::<u64>()) {
            (Ok(i), Ok(n)) => (i, n),
            _ => return Err(format!("`{s}` is not a shard; {usage}")),
        };
        if count == 0 {
            return Err(format!("`{s}`: the shard count must be >= 1; {usage}"));
        }
        if index >= count {
            return Err(format!(
                "`{s}`: shard {index} does not exist in {count} shards (they are 0/{count} … {}/{count}, counted from 0)",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }
}

impl ShardRange {
    /// `--shard I/N` as the user wrote it.
    pub fn shard(&self) -> Shard {
        Shard { index: self.index, count: self.count }
    }
}

impl Shard {
    /// The work items of this shard in a job of `total` items cut into units of `unit` (the
    /// batch size): the units are split as evenly as they go, later shards taking the extra.
    pub fn range(self, total: u64, unit: u64) -> ShardRange {
        let unit = unit.max(1);
        let units = total.div_ceil(unit);
        let cut = |i: u64| (units * i / self.count * unit).min(total);
        ShardRange { index: self.index, count: self.count, start: cut(self.index), end: cut(self.index + 1) }
    }
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
    pub fn new(command: serde_json::Value, total: u64, shard: Option<ShardRange>) -> Self {
        Self { command, total, shard, parts: Vec::new(), teacher_info: None }
    }

    /// The work items `start..end` this folder holds: its shard's, or the whole job's.
    pub fn range(&self) -> (u64, u64) {
        self.shard.map_or((0, self.total), |s| (s.start, s.end))
    }

    /// The first work item not yet in a complete part.
    pub fn next(&self) -> u64 {
        self.parts.last().map_or(self.range().0, |p| p.end)
    }

    /// Work items already in complete parts.
    pub fn done(&self) -> u64 {
        self.next() - self.range().0
    }

    /// Work items this folder holds when complete.
    pub fn size(&self) -> u64 {
        let (start, end) = self.range();
        end - start
    }

    pub fn is_complete(&self) -> bool {
        self.next() == self.range().1
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
