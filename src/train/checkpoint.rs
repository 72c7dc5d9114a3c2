//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! `<output>/checkpoints/step-000120/` holds the model in the Hugging Face layout (config.json,
//! model.safetensors, tokenizer files: loadable like any output), `optimizer.safetensors` (AdamW's
//! first and second moments, `m.<param>` and `v.<param>`), and `trainer_state.json` ([`State`]).
//! Each is written into `step-000120.partial/` and the folder renamed when complete, so a
//! checkpoint either exists whole or not at all; only the last `keep` are kept.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::sync_dir;
use crate::model::Weights;

/// Where the loop stands; with the weights and moments, all that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// What is trained: the settings, data and initial model the run was started with. A
    /// checkpoint continues only the same run; the diff of two shows what changed.
    pub run: serde_json::Value,
    /// Optimizer steps done.
    pub step: usize,
    /// The data cursor: epoch (its shuffle is seeded by `train.seed` and the epoch) and the
    /// position in that epoch's order.
    pub epoch: u64,
    pub cursor: usize,
    /// Running totals for the report.
    pub tokens: usize,
    pub train_secs: f64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub valid_loss: Option<f64>,
    /// Steps whose batch was skipped for a non-finite loss (`train.skip_nonfinite`).
    pub skipped: usize,
    /// AdamW updates made (fewer than `step` when batches were skipped).
    pub optimizer_steps: usize,
    /// Of `train_secs`: writing on-policy completions, and the teacher in memory (its forward
    /// and the divergence).
    #[serde(default)]
    pub sample_secs: f64,
    #[serde(default)]
    pub teacher_secs: f64,
}

impl State {
    /// Step 0 of `run`.
    pub fn new(run: serde_json::Value) -> Self {
        State {
            run,
            step: 0,
            epoch: 0,
            cursor: 0,
            tokens: 0,
            train_secs: 0.0,
            first_loss: None,
            last_loss: None,
            valid_loss: None,
            skipped: 0,
            optimizer_steps: 0,
            sample_secs: 0.0,
            teacher_secs: 0.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {}: {source}; check free disk space and permissions", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read checkpoint {}: {message}; delete this checkpoint folder to resume from the one before it", path.display())]
    Read { path: PathBuf, message: String },
}

const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

pub fn dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Completed checkpoints under `output`, oldest first.
pub fn list(output: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir(output)) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| is_step_name(&n.to_string_lossy())))
        .collect();
    out.sort();
    out
}

fn is_step_name(name: &str) -> bool {
    name.strip_prefix("step-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes what a crash may leave: `*.partial` checkpoint folders.
pub fn remove_partials(output: &Path) {
    if let Ok(entries) = fs::read_dir(dir(output)) {
        for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            if p.extension().is_some_and(|e| e == "partial") {
                let _ = fs::remove_dir_all(&p);
            }
        }
    }
}

/// Writes checkpoint `state.step` atomically and prunes all but the newest `keep`.
/// `write_model` writes the model's files into the folder it is given.
pub fn save(
    output: &Path,
    state: &State,
    moments: &HashMap<String, Tensor>,
    keep: usize,
    write_model: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let root = dir(output);
    let name = format!("step-{:06}", state.step);
    let (tmp, done) = (root.join(format!("{name}.partial")), root.join(&name));
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Write { path, source }
    };
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(err(&tmp))?;
    }
    fs::create_dir_all(&tmp).map_err(err(&tmp))?;
    write_model(&tmp)?;
    candle_core::safetensors::save(moments, tmp.join(OPTIMIZER))?;
    let state_json = serde_json::to_string_pretty(state).expect("state serializes");
    fs::write(tmp.join(STATE), state_json).map_err(err(&tmp))?;
    for entry in fs::read_dir(&tmp).map_err(err(&tmp))? {
        let path = entry.map_err(err(&tmp))?.path();
        fs::File::open(&path).and_then(|f| f.sync_all()).map_err(err(&path))?;
    }
    crate::fault::point("checkpoint-written");
    if done.exists() {
        // The same step saved again (e.g. a rerun of a finished run): replace it.
        fs::remove_dir_all(&done).map_err(err(&done))?;
    }
    fs::rename(&tmp, &done).map_err(err(&done))?;
    sync_dir(&root);
    crate::fault::point("checkpoint-renamed");
    let all = list(output);
    for old in &all[..all.len().saturating_sub(keep.max(1))] {
        fs::remove_dir_all(old).map_err(err(old))?;
    }
    Ok(done)
}

/// A checkpoint's state, model weights (its model.safetensors, for `llama::load_weights`) and
/// optimizer moments.
pub fn load(path: &Path) -> Result<(State, Weights, HashMap<String, Tensor>), CheckpointError> {
    let bad = |message: String| CheckpointError::Read { path: path.to_path_buf(), message };
    let text = fs::read_to_string(path.join(STATE)).map_err(|e| bad(format!("{STATE}: {e}")))?;
    let state: State = serde_json::from_str(&text).map_err(|e| bad(format!("{STATE}: {e}")))?;
    let moments = candle_core::safetensors::load(path.join(OPTIMIZER), &Device::Cpu)
        .map_err(|e| bad(format!("{OPTIMIZER}: {e}")))?;
    Ok((state, Weights::Files(vec![path.join("model.safetensors")]), moments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> State {
        State {
            step,
            epoch: 1,
            cursor: 3,
            tokens: 10,
            train_secs: 0.5,
            first_loss: Some(2.0),
            last_loss: Some(1.0),
            optimizer_steps: 29,
            ..State::new(serde_json::json!({"train": {"lr": 0.01}}))
        }
    }

    #[test]
    fn saves_atomically_round_trips_and_keeps_the_last_k() {
        let out = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let moments = HashMap::from([("m.w".to_string(), t.clone()), ("v.w".to_string(), t.clone())]);
        let model = |dir: &Path| -> anyhow::Result<()> {
            candle_core::safetensors::save(
                &HashMap::from([("w".to_string(), t.clone())]),
                dir.join("model.safetensors"),
            )?;
            Ok(())
        };
        for step in [10, 20, 30] {
            save(out.path(), &state(step), &moments, 2, model).unwrap();
        }
        let kept: Vec<String> =
            list(out.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(kept, ["step-000020", "step-000030"]);
        let (s, weights, m) = load(&list(out.path())[1]).unwrap();
        assert_eq!(s, state(30));
        let Weights::Files(files) = weights else { panic!("a checkpoint's weights are its file") };
        let saved = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
        assert_eq!(saved["w"].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(m.len(), 2);

        // A folder left half-written by a crash is not a checkpoint, and is cleaned up.
        fs::create_dir_all(dir(out.path()).join("step-000040.partial")).unwrap();
        assert_eq!(list(out.path()).len(), 2);
        remove_partials(out.path());
        assert!(!dir(out.path()).join("step-000040.partial").exists());

        fs::write(list(out.path())[1].join(STATE), "{").unwrap();
        let err = load(&list(out.path())[1]).err().expect("a torn state file is an error").to_string();
        assert!(err.contains("step-000030") && err.contains("trainer_state.json") && err.contains("delete"), "{err}");
    }
}
