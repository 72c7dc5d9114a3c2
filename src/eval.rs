//! Evaluation of a model on teacher samples (NLL, KL and top-1 agreement with the teacher)
//! and on a task (accuracy of greedy answers).

use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct EvalJob {
    pub model: PathBuf,
    /// Teacher samples (Parquet) or task examples (JSONL/text).
    pub data: PathBuf,
    /// Task test set (JSONL of prompt/completion) to score greedy answers on, with the task's checker.
    pub task: Option<PathBuf>,
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: PathBuf,
    pub params: usize,
    pub tokens: usize,
    pub nll_per_token: f64,
    pub perplexity: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_to_teacher: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_accuracy: Option<f64>,
}

pub fn evaluate(_job: &EvalJob) -> anyhow::Result<EvalReport> {
    unimplemented!("in progress")
}
