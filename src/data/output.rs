//! The output folder of `generate` and `score`: Parquet part files plus `manifest.json`, filled in
//! work order, resumable after any crash (`manifest.rs` gives the guarantees).
//!
//! [`PartsOutput::open`] decides what a run does with the folder (continue it, refuse it, or
//! start it afresh); [`PartsOutput::push`] takes the rows in work order and
//! [`PartsOutput::end_batch`] closes the open part once it holds `part_size` rows.

use std::path::{Path, PathBuf};

use super::error::DataError;
use super::manifest::{part_name, sync_dir, Manifest, Part, ShardRange};
use super::sample::{FileMetadata, Sample};
use super::writer::SampleWriter;

/// Why an output folder cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{} was written by a different command:\n{diff}\npass --overwrite to discard it and start over, or choose another --output", dir.display())]
    ChangedCommand { dir: PathBuf, diff: String },
    #[error("{} holds Parquet files but no manifest.json, so it is not a kdllm output; choose another --output, or pass --overwrite to delete its *.parquet files", dir.display())]
    ForeignFolder { dir: PathBuf },
    #[error("--output {}: {} is a file, so the output folder (Parquet part files and manifest.json) cannot be made there; choose another --output", output.display(), file.display())]
    OutputIsFile { output: PathBuf, file: PathBuf },
    #[error(transparent)]
    Data(#[from] DataError),
}

/// A folder being filled with the rows of a job (or of its shard), in work order.
pub struct PartsOutput {
    dir: PathBuf,
    manifest: Manifest,
    /// Set by [`PartsOutput::start`].
    meta: Option<FileMetadata>,
    part_size: u64,
    writer: Option<SampleWriter>,
    /// The first work item of the open part, how many rows it holds, and the labels of its
    /// first and last rows.
    part_start: u64,
    rows: u64,
    labels: (String, String),
}

impl PartsOutput {
    /// The folder for the job `command` of `total` work items (of which this run holds `shard`'s
    /// slice, or all): continued when an earlier run of the same job left it (its parts checked,
    /// the leftovers of a crash removed), refused when another command wrote it (unless
    /// `overwrite`), else started empty.
    pub fn open(
        dir: &Path,
        command: serde_json::Value,
        total: u64,
        shard: Option<ShardRange>,
        overwrite: bool,
    ) -> Result<Self, OutputError> {
        // The nearest existing ancestor must be a folder, or the output folder cannot be made.
        if let Some(file) = dir.ancestors().find(|a| a.exists()).filter(|a| !a.is_dir()) {
            return Err(OutputError::OutputIsFile { output: dir.to_path_buf(), file: file.to_path_buf() });
        }
        let manifest = open_manifest(dir, command, total, shard, overwrite)?;
        let part_start = manifest.next();
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            meta: None,
            part_size: 1,
            writer: None,
            part_start,
            rows: 0,
            labels: Default::default(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The next work item to write (everything before it is written or in complete parts).
    pub fn next(&self) -> u64 {
        self.part_start + self.rows
    }

    /// Begins writing: every part gets `meta`, a part closes once it holds `part_size` rows, and
    /// a server teacher's engine, version and model (`meta.server`) are kept in the manifest.
    pub fn start(&mut self, meta: FileMetadata, part_size: usize) {
        if meta.server.is_some() {
            self.manifest.teacher_info = meta.server.clone();
        }
        self.meta = Some(meta);
        self.part_size = part_size.max(1) as u64;
    }

    /// Appends the row of work item [`next`](Self::next).
    pub fn push(&mut self, sample: &Sample) -> Result<(), DataError> {
        let label = format!("{}#{}", sample.prompt_id, sample.sample_index);
        let writer = match self.writer.as_mut() {
            Some(w) => w,
            None => {
                let meta = self.meta.as_ref().expect("PartsOutput::start before push");
                let path = self.dir.join(part_name(self.manifest.parts.len()));
                self.labels.0 = label.clone();
                self.writer.insert(SampleWriter::create(&path, meta)?)
            }
        };
        writer.write(sample)?;
        self.labels.1 = label;
        self.rows += 1;
        Ok(())
    }

    /// Whether [`end_batch`](Self::end_batch) would close the open part now.
    pub fn would_close(&self, stop: bool) -> bool {
        self.rows > 0 && (self.rows >= self.part_size || self.next() == self.manifest.range().1 || stop)
    }

    /// After a batch of rows: closes the open part when it is full, the slice is done, or `stop`.
    pub fn end_batch(&mut self, stop: bool) -> Result<(), DataError> {
        if self.would_close(stop) {
            self.close_part()?;
        }
        Ok(())
    }

    fn close_part(&mut self) -> Result<(), DataError> {
        let Some(writer) = self.writer.take() else { return Ok(()) };
        let file = part_name(self.manifest.parts.len());
        writer.finish()?;
        crate::fault::point("part-renamed");
        let (first, last) = std::mem::take(&mut self.labels);
        let end = self.next();
        let part = record_part(&self.dir, file, self.part_start, end, first, last)?;
        self.manifest.parts.push(part);
        self.manifest.write(&self.dir)?;
        self.part_start = end;
        self.rows = 0;
        Ok(())
    }
}

/// The manifest to continue from: the existing one when it was written by the same command for
/// the same shard (its parts checked, leftovers of a crash removed), else a new one.
fn open_manifest(
    dir: &Path,
    command: serde_json::Value,
    total: u64,
    shard: Option<ShardRange>,
    overwrite: bool,
) -> Result<Manifest, OutputError> {
    let existing = Manifest::read(dir)?;
    let ours = |m: &Manifest| m.command == command && m.total == total && m.shard == shard;
    match existing {
        Some(m) if ours(&m) => return Ok(resume(dir, m)?),
        Some(m) if !overwrite => {
            let mut diff = crate::hash::json_diff(&m.command, &command);
            let shard_name = |s: Option<ShardRange>| s.map_or("none".to_string(), |s| s.shard().to_string());
            if m.shard != shard {
                diff.push_str(&format!("\n  --shard: {} (on disk) → {} (now)", shard_name(m.shard), shard_name(shard)));
            }
            if m.total != total && m.command == command {
                diff.push_str(&format!("\n  work items: {} (on disk) → {total} (now)", m.total));
            }
            let diff = diff.trim_start_matches('\n').to_string();
            return Err(OutputError::ChangedCommand { dir: dir.to_path_buf(), diff });
        }
        None if !overwrite && dir.is_dir() && !sample_files(dir)?.is_empty() => {
            return Err(OutputError::ForeignFolder { dir: dir.to_path_buf() });
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write { path: dir.to_path_buf(), source })?;
    for f in sample_files(dir)? {
        std::fs::remove_file(&f).map_err(|source| DataError::Write { path: f, source })?;
    }
    let manifest = Manifest::new(command, total, shard);
    manifest.write(dir)?;
    Ok(manifest)
}

/// Keeps the complete parts whose files are intact, drops the rest (and the parts after a
/// damaged one, since parts are contiguous), and deletes files no manifest entry accounts for.
fn resume(dir: &Path, mut m: Manifest) -> Result<Manifest, DataError> {
    let intact = |p: &Part| {
        let path = dir.join(&p.file);
        std::fs::metadata(&path).is_ok_and(|md| md.len() == p.bytes)
            && crate::hash::sha256_path(&path, &|_| false).is_ok_and(|h| h == p.sha256)
    };
    if let Some(bad) = m.parts.iter().position(|p| !intact(p)) {
        eprintln!(
            "warning: {} is missing or damaged; computing it and the parts after it again",
            dir.join(&m.parts[bad].file).display()
        );
        m.parts.truncate(bad);
        m.write(dir)?;
    }
    let listed: Vec<PathBuf> = m.part_paths(dir);
    for f in sample_files(dir)? {
        if !listed.contains(&f) {
            // A part renamed into place just before a crash, before the manifest recorded it, or
            // a temporary file: either way redone from the manifest.
            std::fs::remove_file(&f).map_err(|source| DataError::Write { path: f, source })?;
        }
    }
    sync_dir(dir);
    Ok(m)
}

/// The `*.parquet` and `*.partial` files of `dir` (the manifest's temporary file included).
fn sample_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    let list_err = |source| DataError::Read {
        path: dir.to_path_buf(),
        what: "output folder",
        hint: "check the folder's permissions",
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(list_err)? {
        let path = entry.map_err(list_err)?.path();
        if path.extension().is_some_and(|e| e == "parquet" || e == "partial") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn record_part(dir: &Path, file: String, start: u64, end: u64, first: String, last: String) -> Result<Part, DataError> {
    let path = dir.join(&file);
    let read_err = |source| DataError::Read { path: path.clone(), what: "part file", hint: "check the disk", source };
    let bytes = std::fs::metadata(&path).map_err(read_err)?.len();
    let sha256 = crate::hash::sha256_path(&path, &|_| false).map_err(read_err)?;
    Ok(Part { file, start, end, bytes, sha256, first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_folder_is_refused_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("data.parquet"), b"not ours").unwrap();
        std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
        let command = serde_json::json!({"sampling": {"seed": 1}});
        let err = open_manifest(&out, command.clone(), 10, None, false).unwrap_err().to_string();
        assert!(err.contains("no manifest.json") && err.contains("--overwrite"), "{err}");
        assert!(out.join("data.parquet").exists(), "refusing touches nothing");

        let m = open_manifest(&out, command.clone(), 10, None, true).unwrap();
        assert_eq!((m.done(), m.total), (0, 10));
        assert!(!out.join("data.parquet").exists() && out.join("notes.txt").exists(), "only Parquet files go");
        // Now it is ours: the same command continues, another is refused with the difference.
        assert_eq!(open_manifest(&out, command.clone(), 10, None, false).unwrap().total, 10);
        let err =
            open_manifest(&out, serde_json::json!({"sampling": {"seed": 2}}), 10, None, false).unwrap_err().to_string();
        assert!(err.contains("sampling.seed: 1 (on disk) → 2 (now)"), "{err}");
        // Another shard of the same command is another job for this folder.
        let shard = Some(crate::data::Shard { index: 1, count: 2 }.range(10, 1));
        let err = open_manifest(&out, command, 10, shard, false).unwrap_err().to_string();
        assert!(err.contains("--shard: none (on disk) → 1/2 (now)"), "{err}");
    }

    #[test]
    fn resume_drops_damaged_parts_and_everything_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let mut m = Manifest::new(serde_json::json!({}), 30, None);
        for i in 0..3u64 {
            let name = part_name(i as usize);
            std::fs::write(out.join(&name), format!("part {i}")).unwrap();
            m.parts.push(record_part(out, name, i * 10, i * 10 + 10, "a#0".into(), "b#0".into()).unwrap());
        }
        m.write(out).unwrap();
        std::fs::write(out.join(part_name(1)), "part X").unwrap(); // same size, other bytes
        std::fs::write(out.join("part-00009.parquet"), "stray").unwrap();
        let resumed = resume(out, Manifest::read(out).unwrap().unwrap()).unwrap();
        assert_eq!(resumed.done(), 10, "part 1 is damaged: parts 1 and 2 are redone");
        assert_eq!(Manifest::read(out).unwrap().unwrap(), resumed, "the trimmed manifest is saved");
        let left: Vec<PathBuf> = sample_files(out).unwrap();
        assert_eq!(left, [out.join(part_name(0))]);
    }

    #[test]
    fn shards_split_whole_batches_evenly_and_cover_the_job() {
        for (total, unit, count) in [(48u64, 4u64, 2u64), (50, 4, 3), (5, 8, 2), (7, 1, 7), (0, 4, 2)] {
            let mut next = 0;
            for index in 0..count {
                let r = crate::data::Shard { index, count }.range(total, unit);
                assert_eq!(r.start, next, "shard {index}/{count} of {total} starts where the one before ends");
                assert!(r.start.is_multiple_of(unit) || r.start == total, "shards start on batch boundaries");
                next = r.end;
            }
            assert_eq!(next, total, "the shards of {total} cover it");
        }
        let r = crate::data::Shard { index: 1, count: 3 }.range(50, 4); // 13 batches: 4, 4, 5
        assert_eq!((r.start, r.end), (16, 32));
    }
}
