//! The steps of a recipe: one struct per kind, holding that kind's keys (all others are errors).

use serde::{Deserialize, Serialize};

use super::parse::Seen;
use super::Step;
use crate::engine::ServerOptions;
use crate::generate::{self, LongPrompts, SamplingConfig};
use crate::model::Precision;
use crate::task::TaskConfig;
use crate::train::{KdConfig, ModelInit, TrainConfig};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    Task,
    Finetune,
    Generate,
    Score,
    Distill,
    Eval,
    Export,
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            StepKind::Task => "task",
            StepKind::Finetune => "finetune",
            StepKind::Generate => "generate",
            StepKind::Score => "score",
            StepKind::Distill => "distill",
            StepKind::Eval => "eval",
            StepKind::Export => "export",
        })
    }
}

/// The keys of a step besides `name` and `kind`, one struct per kind.
#[derive(Debug, Clone, PartialEq)]
// A recipe holds a handful of steps, parsed once: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum StepConfig {
    Task(TaskStep),
    Finetune(FinetuneStep),
    Generate(GenerateStep),
    Score(ScoreStep),
    Distill(DistillStep),
    Eval(EvalStep),
    Export(ExportStep),
}

/// `kind: task`: write the task's data files and train a BPE tokenizer on `train.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    #[serde(default)]
    pub task: TaskConfig,
}

/// `kind: finetune`: `train::finetune` with cross-entropy on `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    pub data: String,
    pub model: ModelInit,
    #[serde(default)]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub train: TrainConfig,
    /// Train once per seed (`train.seed` replaced), into `<output>/seed-N`; an eval step then
    /// reports the mean and spread over them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
}

/// `kind: generate`: `generate::generate`; writes Parquet parts and a manifest to `<workdir>/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    /// A model, or a server (`http://HOST:PORT/v1`).
    pub teacher: String,
    #[serde(default)]
    pub revision: Option<String>,
    /// A server teacher's tokenizer (else found from the model id the server reports).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// How to drive a server teacher (`engine::ServerOptions`).
    #[serde(default)]
    pub server: ServerOptions,
    pub prompts: String,
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// Compute dtype of the teacher: `f32` (default) or `bf16`.
    #[serde(default)]
    pub dtype: Precision,
    /// A prompt too long for the context: `refuse` (default) or `truncate`.
    #[serde(default)]
    pub long_prompts: LongPrompts,
    /// Samples per Parquet part file.
    #[serde(default = "default_part_size")]
    pub part_size: usize,
}

fn default_part_size() -> usize {
    generate::DEFAULT_PART_SIZE
}

/// `kind: score`: `generate::score`; the teacher's top-k for given text, in the layout of
/// `generate`'s output (parts and a manifest in `<workdir>/<name>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    pub teacher: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub server: ServerOptions,
    /// Teacher samples (Parquet) or a corpus (JSONL of prompt/completion or text).
    pub data: String,
    #[serde(default = "default_logprobs")]
    pub logprobs: usize,
    #[serde(default)]
    pub dtype: Precision,
    #[serde(default = "default_score_batch")]
    pub batch_size: usize,
    #[serde(default = "default_part_size")]
    pub part_size: usize,
}

fn default_logprobs() -> usize {
    SamplingConfig::default().logprobs
}

fn default_score_batch() -> usize {
    generate::DEFAULT_SCORE_BATCH
}

/// `kind: distill`: `train::distill` on teacher samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    pub data: String,
    /// A teacher model held in memory: its full-vocabulary logits at every step (an exact
    /// divergence instead of the stored top-k) and the hidden states `kd.hidden` aligns with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// Several teachers' top-k over `data`'s completions, with weights: the target is their mixture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teachers: Vec<TeacherSet>,
    /// How to drive a server `teacher` (one that grades on-policy batches).
    #[serde(default, skip_serializing_if = "is_default")]
    pub server: ServerOptions,
    pub student: ModelInit,
    #[serde(default)]
    pub tokenizer: Option<String>,
    #[serde(default)]
    pub kd: KdConfig,
    #[serde(default)]
    pub train: TrainConfig,
    /// As for `finetune`: one run per seed, into `<output>/seed-N`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
}

/// One teacher of a mixture: samples or scores over the distill step's completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSet {
    pub data: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_weight() -> f64 {
    1.0
}

/// `kind: export`: `export::export` once per type; writes `<workdir>/<name>/<type>.gguf`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    /// The model to export (e.g. `steps.student.output`).
    pub model: String,
    /// The encodings to write, each as its own file: `f32`, `f16`, `q8_0`, `q4_0`, `q4_k`.
    #[serde(default = "default_export_types")]
    pub types: Vec<String>,
}

fn default_export_types() -> Vec<String> {
    vec!["f16".into()]
}

/// `kind: eval`: `eval::evaluate` once per model; writes `<workdir>/<name>/reports.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStep {
    #[serde(default, rename = "name", skip_serializing)]
    pub(super) _name: Seen,
    #[serde(default, rename = "kind", skip_serializing)]
    pub(super) _kind: Seen,
    pub models: Vec<String>,
    /// Compute dtype: `f32` (default) or `bf16`.
    #[serde(default)]
    pub dtype: Precision,
    /// Teacher samples (Parquet) or task examples to score NLL/KL/agreement on.
    pub data: String,
    /// Task test set (JSONL prompt/completion) for task accuracy.
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default = "default_eval_batch_size")]
    pub batch_size: usize,
}

fn default_eval_batch_size() -> usize {
    32
}

impl Step {
    /// The seeds a training step runs over (empty: one run with `train.seed`).
    pub fn seeds(&self) -> &[u64] {
        match &self.config {
            StepConfig::Finetune(s) => &s.seeds,
            StepConfig::Distill(s) => &s.seeds,
            _ => &[],
        }
    }

    pub fn kind(&self) -> StepKind {
        match self.config {
            StepConfig::Task(_) => StepKind::Task,
            StepConfig::Finetune(_) => StepKind::Finetune,
            StepConfig::Generate(_) => StepKind::Generate,
            StepConfig::Score(_) => StepKind::Score,
            StepConfig::Distill(_) => StepKind::Distill,
            StepConfig::Eval(_) => StepKind::Eval,
            StepConfig::Export(_) => StepKind::Export,
        }
    }

    /// The step's keys besides `name` and `kind`, as JSON.
    pub(super) fn config_json(&self) -> serde_json::Result<serde_json::Value> {
        match &self.config {
            StepConfig::Task(s) => serde_json::to_value(s),
            StepConfig::Finetune(s) => serde_json::to_value(s),
            StepConfig::Generate(s) => serde_json::to_value(s),
            StepConfig::Score(s) => serde_json::to_value(s),
            StepConfig::Distill(s) => serde_json::to_value(s),
            StepConfig::Eval(s) => serde_json::to_value(s),
            StepConfig::Export(s) => serde_json::to_value(s),
        }
    }

    /// [`Step::config_json`] with the keys it leaves out at their defaults (so that adding them
    /// kept old cache identities) written in.
    pub(super) fn full_json(&self) -> serde_json::Result<serde_json::Value> {
        use serde_json::{to_value, Value};
        let mut json = self.config_json()?;
        let Some(obj) = json.as_object_mut() else {
            return Ok(json);
        };
        let seeds = |obj: &mut serde_json::Map<String, Value>| {
            obj.entry("seeds").or_insert(Value::Array(Vec::new()));
            if let Some(train) = obj.get_mut("train").and_then(Value::as_object_mut) {
                train.entry("dtype").or_insert(Value::String("f32".into()));
            }
        };
        match &self.config {
            StepConfig::Finetune(_) => seeds(obj),
            StepConfig::Distill(s) => {
                seeds(obj);
                obj.entry("teacher").or_insert(Value::Null);
                obj.entry("teachers").or_insert(Value::Array(Vec::new()));
                obj.entry("server").or_insert(to_value(&s.server)?);
                let kd = &s.kd;
                let mut on_policy = to_value(&kd.on_policy)?;
                if let (Some(o), Some(c)) = (on_policy.as_object_mut(), &kd.on_policy) {
                    o.insert("overlap".into(), c.overlap.into());
                }
                if let Some(k) = obj.get_mut("kd").and_then(Value::as_object_mut) {
                    k.insert("divergence".into(), to_value(kd.divergence)?);
                    k.insert("beta".into(), kd.beta.into());
                    k.insert("skew".into(), kd.skew.into());
                    k.insert("hidden".into(), to_value(&kd.hidden)?);
                    k.insert("on_policy".into(), on_policy);
                }
            }
            _ => {}
        }
        Ok(json)
    }

    /// The step's keys that hold paths (and so may hold references), as `(key, value)`.
    pub(super) fn inputs(&self) -> Vec<(&'static str, &str)> {
        let mut out = Vec::new();
        match &self.config {
            StepConfig::Task(_) => {}
            StepConfig::Finetune(s) => {
                out.push(("data", s.data.as_str()));
                out.extend(s.tokenizer.as_deref().map(|t| ("tokenizer", t)));
                out.extend(s.model.from.as_deref().map(|f| ("model.from", f)));
            }
            StepConfig::Generate(s) => {
                out.push(("teacher", s.teacher.as_str()));
                out.push(("prompts", s.prompts.as_str()));
                out.extend(s.tokenizer.as_deref().map(|t| ("tokenizer", t)));
            }
            StepConfig::Score(s) => {
                out.push(("teacher", s.teacher.as_str()));
                out.push(("data", s.data.as_str()));
                out.extend(s.tokenizer.as_deref().map(|t| ("tokenizer", t)));
            }
            StepConfig::Distill(s) => {
                out.push(("data", s.data.as_str()));
                out.extend(s.teacher.as_deref().map(|t| ("teacher", t)));
                out.extend(s.teachers.iter().map(|t| ("teachers.data", t.data.as_str())));
                out.extend(s.tokenizer.as_deref().map(|t| ("tokenizer", t)));
                out.extend(s.student.from.as_deref().map(|f| ("student.from", f)));
            }
            StepConfig::Export(s) => out.push(("model", s.model.as_str())),
            StepConfig::Eval(s) => {
                out.extend(s.models.iter().map(|m| ("models", m.as_str())));
                out.push(("data", s.data.as_str()));
                out.extend(s.task.as_deref().map(|t| ("task", t)));
            }
        }
        out
    }
}
