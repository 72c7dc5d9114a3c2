//! A folder of shard folders: the outputs of one job run as `--shard 0/N` … `--shard N-1/N`,
//! one folder each (any names), read as one sample set in work order.

use std::fs;
use std::path::{Path, PathBuf};

use super::error::DataError;
use super::manifest::{Manifest, MANIFEST};

/// The shard folders of `dir` in shard order, each checked complete and from the same command,
/// together covering the job exactly once; `None` when no folder inside `dir` has a manifest.
pub(crate) fn shard_set(dir: &Path) -> Result<Option<Vec<(PathBuf, Manifest)>>, DataError> {
    let read_err = |source| DataError::Read {
        path: dir.to_path_buf(),
        what: "sample folder",
        hint: "pass a .parquet file, a folder written by `kdllm generate`, or a folder of its shard folders",
        source,
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let sub = entry.map_err(read_err)?.path();
        if sub.is_dir() && sub.join(MANIFEST).is_file() {
            if let Some(m) = Manifest::read(&sub)? {
                found.push((sub, m));
            }
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let bad = |message: String| DataError::ShardSet { dir: dir.to_path_buf(), message };
    let (first_dir, first) = (&found[0].0, &found[0].1);
    let Some(first_shard) = first.shard else { return Err(bad(unsharded(first_dir))) };
    let count = first_shard.count;
    let mut by_index: Vec<Option<usize>> = vec![None; count as usize];
    for (i, (sub, m)) in found.iter().enumerate() {
        if m.command != first.command || m.total != first.total {
            let diff = crate::hash::json_diff(&first.command, &m.command);
            let diff = if diff.is_empty() { format!("  total: {} → {}", first.total, m.total) } else { diff };
            return Err(bad(format!(
                "{} is from another command than {}:\n{diff}\nregenerate it with the same command, or move it out",
                sub.display(),
                first_dir.display()
            )));
        }
        let Some(s) = m.shard else { return Err(bad(unsharded(sub))) };
        if s.count != count {
            return Err(bad(format!(
                "{} was made with --shard {} but {} with --shard {}; every shard of a job needs the same N",
                sub.display(),
                s.shard(),
                first_dir.display(),
                first_shard.shard()
            )));
        }
        match by_index[s.index as usize] {
            Some(j) => {
                return Err(bad(format!(
                    "{} and {} both hold shard {}/{count}; keep one of them",
                    found[j].0.display(),
                    sub.display(),
                    s.index
                )))
            }
            None => by_index[s.index as usize] = Some(i),
        }
    }
    if let Some(missing) = by_index.iter().position(Option::is_none) {
        return Err(bad(format!(
            "shard {missing}/{count} is missing (found {} of {count}); run the same command with `--shard {missing}/{count}` into a folder inside it",
            found.len()
        )));
    }
    let mut ordered = Vec::with_capacity(found.len());
    let mut next = 0;
    for j in by_index.into_iter().flatten() {
        let (sub, m) = &found[j];
        if !m.is_complete() {
            return Err(DataError::Incomplete { path: sub.clone(), done: m.done(), total: m.size() });
        }
        let (start, end) = m.range();
        if start != next {
            return Err(bad(format!(
                "{} starts at work item {start} where the shard before it ends at {next}: the shards do not cover the job exactly once",
                sub.display()
            )));
        }
        next = end;
        ordered.push((sub.clone(), m.clone()));
    }
    if next != first.total {
        return Err(bad(format!("the shards cover work items 0..{next} of {}", first.total)));
    }
    Ok(Some(ordered))
}

fn unsharded(sub: &Path) -> String {
    format!(
        "{} holds a whole job, not a shard; a folder of shard folders holds only the shards (--shard I/N) of one job",
        sub.display()
    )
}
