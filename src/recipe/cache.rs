//! Step caching: a finished step leaves a stamp, `<workdir>/.kdllm/steps/<name>.json`, holding
//! its identity (kind, configuration, and a content hash of each input) and a hash of its output.
//! A rerun skips a step whose identity and output are both unchanged; a step whose configuration
//! or inputs changed runs again, and so do the steps whose inputs its new output changes.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{Outcome, Recipe, Step};
use crate::hash::sha256_path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Stamp {
    /// What the step was: kind, configuration and input hashes.
    pub identity: serde_json::Value,
    pub output_hash: String,
    pub wall_secs: f64,
    pub outcome: Outcome,
}

/// Checkpoints are how a step gets to its output, not part of it.
fn not_output(rel: &Path) -> bool {
    rel.starts_with("checkpoints")
}

impl Recipe {
    fn stamp_path(&self, step: &Step) -> PathBuf {
        self.workdir.join(".kdllm").join("steps").join(format!("{}.json", step.name))
    }

    /// The step's kind and configuration, and for each input path a hash of its content (a
    /// value that is no path on disk, such as a Hub id, stands for itself).
    pub(super) fn identity(&self, step: &Step) -> anyhow::Result<serde_json::Value> {
        let mut inputs = serde_json::Map::new();
        for (i, (key, value)) in step.inputs().into_iter().enumerate() {
            let path = self.resolve(value);
            let hash = if path.exists() {
                sha256_path(&path, &not_output).with_context(|| format!("hashing {}", path.display()))?
            } else {
                value.to_string()
            };
            inputs.insert(format!("{i}:{key}"), hash.into());
        }
        Ok(serde_json::json!({
            "kind": step.kind(),
            "config": step.config_json()?,
            "inputs": inputs,
        }))
    }

    pub(super) fn output_hash(&self, step: &Step) -> std::io::Result<String> {
        sha256_path(&self.output(step), &not_output)
    }

    /// The stamp of the step's last complete run, if any (an unreadable one counts as none).
    pub(super) fn stamp(&self, step: &Step) -> Option<Stamp> {
        let text = std::fs::read_to_string(self.stamp_path(step)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Records a complete step, atomically.
    pub(super) fn write_stamp(&self, step: &Step, stamp: &Stamp) -> anyhow::Result<()> {
        let path = self.stamp_path(step);
        let dir = path.parent().expect("stamp has a folder");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::data::write_atomic(&path, serde_json::to_string_pretty(stamp)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}
