//! On-policy batches (GKD, Agarwal et al. 2024): with probability λ a batch's completions are
//! written by the student itself, from the batch's prompts, and the teacher grades them.
//!
//! Everything random is a pure function of (seed, step, micro-batch, row), and the student
//! that samples is a frozen copy of its weights taken every `refresh_every` steps and kept in
//! checkpoints: a run resumed from any checkpoint draws the same batches and samples as an
//! uninterrupted one.
//!
//! The teacher grades them in memory (full logits, in the loss) or on a server that returns
//! prompt log-probs ([`Grader`]: its top-k at every token, as `score` stores them). With
//! `overlap`, the next step's batches are written at the top of the current step and graded on
//! the server while it trains, so they come from the sampler as it stood one step earlier.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};

use super::batch::{Sequence, TeacherTopK};
use super::OnPolicyConfig;
use crate::generate::{decode, row_rng, DecodeSettings};
use crate::model::llama::{self, Llama, LlamaConfig, Weights};
use crate::teacher::Remote;

/// The student's weights frozen at its last refresh, for sampling.
pub struct Sampler {
    pub tensors: HashMap<String, Tensor>,
    model: Llama,
}

impl Sampler {
    /// A frozen copy of the weights in `varmap` (copies: AdamW updates the Vars in place).
    pub fn snapshot(cfg: &LlamaConfig, varmap: &VarMap) -> anyhow::Result<Self> {
        let tensors = llama::tensors(varmap)
            .into_iter()
            .map(|(k, t)| Ok((k, t.copy()?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        Self::from_tensors(cfg, tensors)
    }

    /// The sampler of `tensors` (HF names), on their device.
    pub fn from_tensors(cfg: &LlamaConfig, tensors: HashMap<String, Tensor>) -> anyhow::Result<Self> {
        let device = tensors.values().next().map_or(Device::Cpu, |t| t.device().clone());
        let model = Llama::from_weights(cfg, &Weights::Tensors(tensors.clone()), &device, DType::F32)?;
        Ok(Self { tensors, model })
    }
}

/// A teacher on a server that grades the student's batches: its log-prob and top-`k` at every
/// completion token (vLLM `prompt_logprobs`, SGLang `logprob_start_len`).
pub struct Grader {
    pub remote: Remote,
    pub k: usize,
}

impl Grader {
    /// Sets each sequence's teacher top-k to the server's, at every completion position.
    pub fn grade(&self, seqs: &mut [Sequence]) -> anyhow::Result<()> {
        let rows: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| s.ids.split_at(s.loss_from)).collect();
        let scored = self.remote.score_all(&rows, self.k)?;
        for (s, c) in seqs.iter_mut().zip(scored) {
            s.teacher = Some(TeacherTopK { ids: c.topk_ids, logprobs: c.topk_logprobs });
        }
        Ok(())
    }
}

/// A step's on-policy batches, by micro-batch (`None`: the stored samples), and the seconds
/// spent sampling and grading them.
pub struct Written {
    pub batches: Vec<Option<Vec<Sequence>>>,
    pub sample_secs: f64,
    pub grade_secs: f64,
}

/// Writes the on-policy micro-batches of step `step` (`plan`: each micro-batch's picks), cut
/// to `max_len` tokens; [`Written::grade`] has the server grade them.
pub fn write_step(
    sampler: &Sampler,
    plan: &[Vec<&Sequence>],
    cfg: &OnPolicyConfig,
    eos_ids: &[u32],
    (seed, step, max_len): (u64, usize, usize),
) -> anyhow::Result<Written> {
    let t = Instant::now();
    let mut batches = Vec::with_capacity(plan.len());
    for (micro, picked) in plan.iter().enumerate() {
        batches.push(if is_on_policy(cfg, seed, step, micro) {
            let seqs = student_batch(sampler, picked, cfg, eos_ids, (seed, step, micro))?;
            Some(seqs.into_iter().map(|s| s.truncate(max_len)).collect())
        } else {
            None
        });
    }
    let sample_secs = if batches.iter().any(Option::is_some) { t.elapsed().as_secs_f64() } else { 0.0 };
    Ok(Written { batches, sample_secs, grade_secs: 0.0 })
}

impl Written {
    /// The server's grades of every on-policy batch (a teacher in memory grades in the loss).
    pub fn grade(mut self, grader: Option<&Grader>) -> anyhow::Result<Self> {
        if let Some(g) = grader {
            let t = Instant::now();
            for seqs in self.batches.iter_mut().flatten() {
                g.grade(seqs)?;
            }
            self.grade_secs = t.elapsed().as_secs_f64();
        }
        Ok(self)
    }
}

/// Whether micro-batch `micro` of step `step` is on-policy: a draw seeded by both, below λ.
/// λ = 0 is never (the run is exactly the off-policy one), λ = 1 always.
pub fn is_on_policy(cfg: &OnPolicyConfig, seed: u64, step: usize, micro: usize) -> bool {
    if cfg.lambda <= 0.0 {
        return false;
    }
    let key = crate::hash::fnv1a(&[b"on-policy", &seed.to_le_bytes(), &step.to_le_bytes(), &micro.to_le_bytes()]);
    rand::rngs::StdRng::seed_from_u64(key).random::<f64>() < cfg.lambda
}

/// The student's completions of the prompts of `picked`, as training sequences (prompt +
/// completion, EOS included where it stopped, no stored top-k: the teacher grades them).
pub fn student_batch(
    sampler: &Sampler,
    picked: &[&Sequence],
    cfg: &OnPolicyConfig,
    eos_ids: &[u32],
    (seed, step, micro): (u64, usize, usize),
) -> anyhow::Result<Vec<Sequence>> {
    let prompts: Vec<Vec<u32>> = picked.iter().map(|s| s.ids[..s.loss_from.max(1)].to_vec()).collect();
    let id = format!("on-policy-{step}-{micro}");
    let mut rngs: Vec<_> = (0..prompts.len()).map(|r| row_rng(seed, &id, r as u32)).collect();
    let settings = DecodeSettings {
        temperature: cfg.temperature,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: cfg.max_new_tokens,
        logprobs: 0,
        eos_ids: eos_ids.to_vec(),
    };
    let completions = decode(&sampler.model, &prompts, &mut rngs, &settings)?;
    Ok(prompts
        .into_iter()
        .zip(completions)
        .map(|(mut ids, c)| {
            let loss_from = ids.len();
            ids.extend(c.ids);
            Sequence { ids, loss_from, teacher: None }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lambda: f64) -> OnPolicyConfig {
        OnPolicyConfig { lambda, ..OnPolicyConfig::default() }
    }

    #[test]
    fn lambda_is_the_share_of_on_policy_batches() {
        let count = |l: f64| (0..4000).filter(|&s| is_on_policy(&cfg(l), 7, s, 0)).count();
        assert_eq!(count(0.0), 0);
        assert_eq!(count(1.0), 4000);
        let half = count(0.5);
        assert!((1850..2150).contains(&half), "{half}");
        // The same draw every time, and another for another seed.
        let a: Vec<bool> = (0..64).map(|s| is_on_policy(&cfg(0.5), 7, s, 1)).collect();
        assert_eq!(a, (0..64).map(|s| is_on_policy(&cfg(0.5), 7, s, 1)).collect::<Vec<_>>());
        assert_ne!(a, (0..64).map(|s| is_on_policy(&cfg(0.5), 8, s, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn the_sampler_is_a_frozen_copy() {
        let cfg = llama::tests::tiny_config();
        let (vm, _) = Llama::trainable(&cfg, &Device::Cpu).unwrap();
        llama::init_weights(&vm, 1).unwrap();
        let sampler = Sampler::snapshot(&cfg, &vm).unwrap();
        let before = sampler.tensors["model.norm.weight"].to_vec1::<f32>().unwrap();
        for v in vm.all_vars() {
            v.set(&v.as_tensor().affine(2.0, 1.0).unwrap()).unwrap();
        }
        assert_eq!(sampler.tensors["model.norm.weight"].to_vec1::<f32>().unwrap(), before);
        let seq = Sequence { ids: vec![1, 5, 6, 7], loss_from: 2, teacher: None };
        let c = OnPolicyConfig { lambda: 1.0, max_new_tokens: 4, temperature: 1.0, refresh_every: 1, overlap: false };
        let a = student_batch(&sampler, &[&seq, &seq], &c, &[], (3, 10, 0)).unwrap();
        assert_eq!(a[0].ids[..2], [1, 5], "the prompt is kept");
        assert_eq!((a[0].loss_from, a[0].ids.len()), (2, 6));
        assert_eq!(a, student_batch(&sampler, &[&seq, &seq], &c, &[], (3, 10, 0)).unwrap(), "seeded");
        assert_ne!(a[0].ids, a[1].ids, "each row has its own draw");
    }
}
