//! The loss terms over the N positions that count (completion tokens; prompts and padding
//! are never gathered, so masking happens before these functions see anything).
//!
//! Every term is a mean over the N positions, and an empty selection (N = 0) gives 0. The
//! divergences to the teacher live in [`super::divergence`].

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::divergence::{self, Measure};
use crate::model::ops::nll_rows;

/// A scalar loss tensor as a number (for logs and reports).
pub fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Mean cross-entropy `−(1/N) Σ_n log softmax(z_n)[y_n]` of targets `y` (N) under logits (N, V).
/// With `y` the teacher-written tokens this is sequence-level imitation (Kim & Rush 2016).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n == 0 {
        return Tensor::zeros((), DType::F32, logits.device());
    }
    // Fused: the (N, V) log-probabilities are never materialised.
    nll_rows(logits, targets)?.sum_all()?.affine(1.0 / n as f64, 0.0)
}

/// `T² · (1/N) Σ_n KL(p_T ‖ q_T)` over the teacher's stored top-k and one tail bucket
/// (see [`divergence::topk_buckets`]).
pub fn topk_kl(logits: &Tensor, teacher_ids: &Tensor, teacher_logprobs: &Tensor, temperature: f64) -> Result<Tensor> {
    divergence::topk(Measure::forward_kl(), logits, teacher_ids, teacher_logprobs, temperature)
}

/// How hidden states are compared (`kd.hidden.loss`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HiddenLoss {
    /// `(1/(N·C_t)) Σ (h_s Wᵀ − h_t)²`
    #[default]
    Mse,
    /// `(1/N) Σ_n (1 − cos(h_s,n Wᵀ, h_t,n))`
    Cosine,
}

/// FitNets-style alignment of a student layer's hidden states `hs` (N, C_s) with a teacher
/// layer's `ht` (N, C_t) through the learned projection `w` (C_t, C_s). The teacher side
/// carries no gradient; an empty selection gives 0.
pub fn hidden_alignment(hs: &Tensor, w: &Tensor, ht: &Tensor, kind: HiddenLoss) -> Result<Tensor> {
    if hs.dim(0)? == 0 {
        return Tensor::zeros((), DType::F32, hs.device());
    }
    let projected = hs.matmul(&w.t()?)?;
    let ht = ht.detach();
    match kind {
        HiddenLoss::Mse => (projected - ht)?.sqr()?.mean_all(),
        HiddenLoss::Cosine => {
            let dot = (&projected * &ht)?.sum(1)?;
            let norms = (projected.sqr()?.sum(1)?.sqrt()? * ht.sqr()?.sum(1)?.sqrt()?)?.maximum(1e-8)?;
            (dot / norms)?.affine(-1.0, 1.0)?.mean_all()
        }
    }
}

/// Each term of the loss for one batch; `kd` is None when there is no teacher or alpha = 0,
/// `hidden` when there is no hidden-state alignment.
pub struct LossTerms {
    pub total: Tensor,
    pub ce: Tensor,
    pub kd: Option<Tensor>,
    pub hidden: Option<Tensor>,
}

/// `alpha · D + (1 − alpha) · CE + weight · H`: D the (temperature-scaled) divergence to the
/// teacher, CE the imitation of its sampled tokens, H the hidden-state alignment.
pub fn combine(ce: Tensor, kd: Option<Tensor>, alpha: f64, hidden: Option<(Tensor, f64)>) -> Result<LossTerms> {
    let mut total = match &kd {
        Some(kd) => ((kd * alpha)? + (&ce * (1.0 - alpha))?)?,
        None => ce.clone(),
    };
    if let Some((h, weight)) = &hidden {
        total = (total + (h * *weight)?)?;
    }
    Ok(LossTerms { total, ce, kd, hidden: hidden.map(|(h, _)| h) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t2(v: &[&[f32]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (v.len(), v[0].len()), &Device::Cpu).unwrap()
    }

    fn ids(v: &[&[u32]]) -> Tensor {
        let flat: Vec<u32> = v.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (v.len(), v[0].len()), &Device::Cpu).unwrap()
    }

    fn num(t: &Tensor) -> f64 {
        scalar(t).unwrap()
    }

    #[test]
    fn cross_entropy_matches_hand_computed_value() {
        // Row 1: logits [0, ln 3] → p = [1/4, 3/4]; target 1 → −ln(3/4).
        // Row 2: uniform over 2 → −ln(1/2).
        let logits = t2(&[&[0.0, 3f32.ln()], &[1.0, 1.0]]);
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let ce = num(&cross_entropy(&logits, &targets).unwrap());
        let expected = (-(0.75f64).ln() - (0.5f64).ln()) / 2.0;
        assert!((ce - expected).abs() < 1e-6, "{ce} vs {expected}");
    }

    #[test]
    fn kl_is_zero_when_student_equals_teacher_at_t1() {
        // Student softmax([ln .5, ln .3, ln .2]) = [.5, .3, .2]; teacher stores top-2 [.5, .3], tail .2.
        let logits = t2(&[&[0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()]]);
        let kl = topk_kl(&logits, &ids(&[&[0, 1]]), &t2(&[&[0.5f32.ln(), 0.3f32.ln()]]), 1.0).unwrap();
        assert!(num(&kl).abs() < 1e-6);
    }

    #[test]
    fn kl_with_tail_bucket_matches_hand_computed_value() {
        // Student q = [.25, .25, .25, .25]; teacher top-2 ids [2, 0] with p = [.6, .3], tail .1.
        // Buckets: q = [.25, .25, .5]; KL = .6 ln(.6/.25) + .3 ln(.3/.25) + .1 ln(.1/.5).
        let logits = t2(&[&[0.0, 0.0, 0.0, 0.0]]);
        let kl = topk_kl(&logits, &ids(&[&[2, 0]]), &t2(&[&[0.6f32.ln(), 0.3f32.ln()]]), 1.0).unwrap();
        let expected = 0.6 * (0.6f64 / 0.25).ln() + 0.3 * (0.3f64 / 0.25).ln() + 0.1 * (0.1f64 / 0.5).ln();
        assert!((num(&kl) - expected).abs() < 1e-6, "{} vs {expected}", num(&kl));
    }

    #[test]
    fn combine_mixes_the_terms() {
        let (ce, kd, h) = (
            Tensor::new(2.0f32, &Device::Cpu).unwrap(),
            Tensor::new(0.5f32, &Device::Cpu).unwrap(),
            Tensor::new(3.0f32, &Device::Cpu).unwrap(),
        );
        let terms = combine(ce.clone(), Some(kd), 0.25, Some((h, 0.1))).unwrap();
        assert!((num(&terms.total) - (0.25 * 0.5 + 0.75 * 2.0 + 0.1 * 3.0)).abs() < 1e-6);
        let seq_only = combine(ce, None, 0.0, None).unwrap();
        assert!(seq_only.kd.is_none() && (num(&seq_only.total) - 2.0).abs() < 1e-7);
    }

    #[test]
    fn hidden_alignment_matches_hand_computed_values() {
        // hs = [1, 2], W = [[1, 0], [0, 1], [1, 1]] → hs Wᵀ = [1, 2, 3]; ht = [1, 0, 3].
        let (hs, w, ht) = (t2(&[&[1.0, 2.0]]), t2(&[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 1.0]]), t2(&[&[1.0, 0.0, 3.0]]));
        let mse = num(&hidden_alignment(&hs, &w, &ht, HiddenLoss::Mse).unwrap());
        assert!((mse - 4.0 / 3.0).abs() < 1e-6, "{mse}");
        let cos = num(&hidden_alignment(&hs, &w, &ht, HiddenLoss::Cosine).unwrap());
        let want = 1.0 - 10.0 / (14f64.sqrt() * 10f64.sqrt());
        assert!((cos - want).abs() < 1e-6, "{cos} vs {want}");
        let empty = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            num(&hidden_alignment(
                &empty,
                &w,
                &Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap(),
                HiddenLoss::Mse
            )
            .unwrap()),
            0.0
        );
    }

    #[test]
    fn the_projection_gets_the_hand_computed_gradient_and_the_teacher_none() {
        // MSE = (1/3) Σ_j (Σ_i W_ji hs_i − ht_j)²  →  ∂/∂W_ji = (2/3)(r_j) hs_i, r = [0, 2, 0].
        let w = Var::from_tensor(&t2(&[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 1.0]])).unwrap();
        let ht = Var::from_tensor(&t2(&[&[1.0, 0.0, 3.0]])).unwrap();
        let loss = hidden_alignment(&t2(&[&[1.0, 2.0]]), w.as_tensor(), ht.as_tensor(), HiddenLoss::Mse).unwrap();
        let g = loss.backward().unwrap();
        let gw = g.get(&w).unwrap().to_vec2::<f32>().unwrap();
        let want = [[0.0, 0.0], [4.0 / 3.0, 8.0 / 3.0], [0.0, 0.0]];
        for (r, wr) in gw.iter().zip(want) {
            for (a, b) in r.iter().zip(wr) {
                assert!((*a as f64 - b).abs() < 1e-6, "{gw:?}");
            }
        }
        assert!(g.get(&ht).is_none(), "the teacher's hidden states must get no gradient");
    }
}
