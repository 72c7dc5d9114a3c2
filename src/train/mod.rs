//! The trainer: fine-tuning (cross-entropy) and distillation (KL to teacher top-k + imitation CE).

use std::path::PathBuf;

pub mod batch;
pub mod checkpoint;
pub mod divergence;
pub mod loss;
pub mod mixture;
pub mod on_policy;
pub mod optim;
pub mod schedule;
mod trainer;

pub use trainer::{distill, encode_example, finetune, validate};

use serde::{Deserialize, Serialize};

use crate::model::LlamaConfig;
pub use divergence::{Divergence, Measure};
pub use loss::HiddenLoss;

/// Optimisation settings shared by `finetune` and `distill`. Defaults live only in `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate, reached after `warmup_steps`, then cosine-decayed to `lr * min_lr_ratio`.
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    /// Decoupled AdamW weight decay, applied to matrices only (not norms, not embeddings).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub grad_clip: f64,
    /// Sequences longer than this are truncated.
    pub max_seq_len: usize,
    /// Fraction of the data held out for validation (chosen by a hash of the example).
    pub valid_fraction: f64,
    /// Validate every N steps (0 = only at the end).
    pub eval_every: usize,
    pub log_every: usize,
    pub seed: u64,
    /// Save a checkpoint every N steps (0 = only at the end, on Ctrl-C and on a non-finite loss).
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// Skip a batch whose loss or gradient is NaN or Inf instead of stopping (off: stopping
    /// shows the problem; skipping can hide a diverging run).
    pub skip_nonfinite: bool,
    /// Compute dtype: `f32`, or `bf16` (mixed precision: the weights, gradients and AdamW moments
    /// stay f32; bf16 products, see `Llama::for_training`). For a GPU.
    #[serde(skip_serializing_if = "is_default")]
    pub dtype: crate::model::Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            max_seq_len: 512,
            valid_fraction: 0.05,
            eval_every: 0,
            log_every: 10,
            seed: 0,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            skip_nonfinite: false,
            dtype: crate::model::Precision::F32,
        }
    }
}

/// The distillation objective: `alpha · D(teacher_T ‖ student_T) + (1 − alpha) · CE`, plus
/// `hidden.weight · H` with hidden-state alignment. D is `divergence` (T²-scaled, see
/// [`divergence`]); `beta` is JSD's β and `skew` the skew variants' α.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KdConfig {
    pub alpha: f64,
    pub temperature: f64,
    // Left out of the run identity at their defaults, so that runs made before they existed resume.
    #[serde(skip_serializing_if = "is_default")]
    pub divergence: Divergence,
    #[serde(skip_serializing_if = "is_default_beta")]
    pub beta: f64,
    #[serde(skip_serializing_if = "is_default_skew")]
    pub skew: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<HiddenConfig>,
    /// Batches written by the student itself and graded by the teacher in memory (GKD).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_policy: Option<OnPolicyConfig>,
}

const DEFAULT_BETA: f64 = 0.5;
/// DistiLLM's default α.
const DEFAULT_SKEW: f64 = 0.1;

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_default_beta(v: &f64) -> bool {
    *v == DEFAULT_BETA
}

fn is_default_skew(v: &f64) -> bool {
    *v == DEFAULT_SKEW
}

impl Default for KdConfig {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            temperature: 2.0,
            divergence: Divergence::ForwardKl,
            beta: DEFAULT_BETA,
            skew: DEFAULT_SKEW,
            hidden: None,
            on_policy: None,
        }
    }
}

impl KdConfig {
    /// No teacher: cross-entropy only (what `finetune` trains with).
    pub fn none() -> Self {
        Self { alpha: 0.0, temperature: 1.0, ..Self::default() }
    }

    pub fn measure(&self) -> Measure {
        Measure { divergence: self.divergence, beta: self.beta, skew: self.skew }
    }
}

/// `kd.on_policy` (GKD's λ and the student's sampling): with probability `lambda` a batch's
/// completions are sampled from the batch's prompts by the student as it was at the last
/// multiple of `refresh_every` steps, and trained on the divergence to the teacher alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnPolicyConfig {
    pub lambda: f64,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub refresh_every: usize,
    /// Write the next step's batches at the top of this step and have the server grade them
    /// while it trains (so they come from the sampler of one step earlier). It hides a server's
    /// latency; with a teacher in memory it gains nothing (docs/methods.md has the measurements).
    #[serde(skip_serializing_if = "is_false")]
    pub overlap: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

impl Default for OnPolicyConfig {
    fn default() -> Self {
        Self { lambda: 0.5, max_new_tokens: 64, temperature: 1.0, refresh_every: 1, overlap: false }
    }
}

/// `kd.hidden`: align student layers with teacher layers through learned projections
/// (FitNets, Romero et al. 2015). Layer 0 is the embeddings, layer i the output of decoder
/// layer i, the last the final-norm output (HF's `output_hidden_states` numbering).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HiddenConfig {
    #[serde(default = "default_hidden_weight")]
    pub weight: f64,
    /// `[student_layer, teacher_layer]` pairs.
    pub layers: Vec<[usize; 2]>,
    #[serde(default)]
    pub loss: HiddenLoss,
}

fn default_hidden_weight() -> f64 {
    1.0
}

/// Where the weights of the model being trained come from: exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInit {
    /// A folder, Hub repo id or alias of a pretrained model.
    #[serde(default)]
    pub from: Option<String>,
    /// A new model with random weights (HF config.json field names; `vocab_size` from the tokenizer).
    #[serde(default)]
    pub config: Option<LlamaConfig>,
    /// With `from`: keep only these layers of the pretrained model, in this order.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
}

/// What to do with checkpoints found in the output folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Resume {
    /// Continue from the newest checkpoint when it comes from the same run (configuration, data
    /// and initial model); start over, deleting the checkpoints, when it does not.
    #[default]
    Auto,
    /// The same, but checkpoints of another run are an error, never deleted (`--resume`).
    Strict,
}

/// Fine-tune (or pre-train) a model with cross-entropy on task data (JSONL/text examples).
#[derive(Debug, Clone)]
pub struct FinetuneJob {
    /// Where the tensors live (`--device`).
    pub device: crate::device::DeviceChoice,
    pub data: PathBuf,
    pub model: ModelInit,
    /// Folder with tokenizer.json; required when the model is built from a config.
    pub tokenizer: Option<PathBuf>,
    pub train: TrainConfig,
    pub output: PathBuf,
    pub resume: Resume,
}

/// Distill a student on teacher samples (a Parquet file or folder written by `generate`).
#[derive(Debug, Clone)]
pub struct DistillJob {
    /// Where the tensors live (`--device`).
    pub device: crate::device::DeviceChoice,
    pub data: PathBuf,
    /// A teacher held in memory: its full-vocabulary logits replace the stored top-k. Or a
    /// server (`http(s)://`) that grades the on-policy batches (`kd.on_policy`).
    pub teacher: Option<String>,
    /// How to drive a server teacher.
    pub server: crate::engine::ServerOptions,
    /// Stored top-k of several teachers over `data`'s completions, with weights: the target is
    /// their mixture. Empty: `data`'s own top-k.
    pub teachers: Vec<(PathBuf, f64)>,
    pub student: ModelInit,
    /// Folder with the teacher's tokenizer; required when the student is built from a config.
    pub tokenizer: Option<PathBuf>,
    pub kd: KdConfig,
    pub train: TrainConfig,
    pub output: PathBuf,
    pub resume: Resume,
}

/// What a training run did, for the recipe summary and logs.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub output: PathBuf,
    pub params: usize,
    pub steps: usize,
    pub tokens: usize,
    pub tokens_per_sec: f64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub valid_loss: Option<f64>,
    pub wall_secs: f64,
    /// The step a resumed run continued from.
    pub resumed_from: Option<usize>,
    /// Batches skipped for a non-finite loss (`skip_nonfinite`).
    pub skipped_steps: usize,
    /// Of the training time: the student writing on-policy batches, and the teacher in memory.
    pub sample_secs: f64,
    pub teacher_secs: f64,
    pub train_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error("the student's tokenizer differs from the one that wrote {data} (vocab hashes differ); token-level KL needs the teacher's tokenizer: set `tokenizer:` to the teacher's folder, or set `kd.alpha: 0` to train sequence-level only on the completion text re-tokenized with the student's tokenizer")]
    TokenizerMismatch { data: PathBuf },
    #[error("parameter `{0}` got no gradient: the graph is cut somewhere in the model")]
    NoGradient(String),
    #[error("the {term} became {value} at step {step}; stopped, with the weights of step {} saved in {}; lower `train.lr` or raise `train.warmup_steps` and run again (it resumes there), or set `train.skip_nonfinite: true` to skip such batches", step - 1, checkpoint.display())]
    NonFinite { step: usize, term: &'static str, value: f64, checkpoint: PathBuf },
    #[error("{} is from a different run:\n{diff}\n--resume never deletes checkpoints: run without --resume to start over, or restore the settings it was made with", checkpoint.display())]
    ResumeMismatch { checkpoint: PathBuf, diff: String },
}
