//! Distillation losses over the N positions that count (completion tokens; prompts and padding
//! are never gathered, so masking happens before these functions see anything).
//!
//! Shapes: N positions, V vocab, K stored teacher top-k.
//! Normalisation lives here and only here: every term is a mean over the N positions,
//! and an empty selection (N = 0) gives 0.

use candle_core::{DType, Result, Tensor};

use crate::model::ops::{log_softmax, nll_rows};

/// A teacher tail bucket below this mass is treated as this mass (keeps log finite).
const MIN_TAIL: f64 = 1e-10;

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

/// `T² · (1/N) Σ_n KL(p_T ‖ q_T)` over K + 1 buckets: the teacher's top-k ids and one tail.
///
/// - Teacher: stored log-probs `l` (N, K) at temperature 1 of ids (N, K); the tail holds
///   `1 − Σ exp(l)`. At temperature T every bucket, the tail included, is tempered as one
///   token: `p_T ∝ exp(l / T)` (exact at T = 1; the tail's inner shape is unknown).
/// - Student: `q_T = softmax(z / T)` over the full vocabulary, its top-k buckets gathered at
///   the teacher's ids and its tail the mass outside them, `1 − Σ_k q_T,k`.
///
/// The T² factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
pub fn topk_kl(logits: &Tensor, teacher_ids: &Tensor, teacher_logprobs: &Tensor, temperature: f64) -> Result<Tensor> {
    let n = logits.dim(0)?;
    if n == 0 {
        return Tensor::zeros((), DType::F32, logits.device());
    }
    let t = temperature;
    let student = student_buckets(logits, teacher_ids, t)?;
    let teacher = teacher_buckets(teacher_logprobs, t)?;
    let p = teacher.exp()?;
    let kl = (p * (teacher - student)?)?.sum_all()?;
    kl.affine(t * t / n as f64, 0.0)
}

/// log q_T over [top-k ids..., tail], (N, K + 1).
fn student_buckets(logits: &Tensor, ids: &Tensor, t: f64) -> Result<Tensor> {
    let logq = log_softmax(logits, 1.0 / t)?;
    let top = logq.gather(ids, 1)?;
    let inside = top.exp()?.sum_keepdim(1)?;
    let tail = inside.affine(-1.0, 1.0)?.maximum(MIN_TAIL)?.log()?;
    Tensor::cat(&[&top, &tail], 1)
}

/// log p_T over [top-k..., tail], (N, K + 1), from log-probs at temperature 1. No gradient.
fn teacher_buckets(logprobs: &Tensor, t: f64) -> Result<Tensor> {
    let logprobs = logprobs.detach();
    let inside = logprobs.exp()?.sum_keepdim(1)?;
    let tail = inside.affine(-1.0, 1.0)?.maximum(MIN_TAIL)?.log()?;
    let buckets = Tensor::cat(&[&logprobs, &tail], 1)?;
    log_softmax(&buckets, 1.0 / t)
}

/// Each term of the loss for one batch; `kl` is None when there is no teacher top-k or alpha = 0.
pub struct LossTerms {
    pub total: Tensor,
    pub ce: Tensor,
    pub kl: Option<Tensor>,
}

/// `alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · CE(teacher-sampled token)`.
pub fn distill_loss(
    logits: &Tensor,
    targets: &Tensor,
    teacher: Option<(&Tensor, &Tensor)>,
    alpha: f64,
    temperature: f64,
) -> Result<LossTerms> {
    let ce = cross_entropy(logits, targets)?;
    let kl = match teacher {
        Some((ids, logprobs)) if alpha > 0.0 => Some(topk_kl(logits, ids, logprobs, temperature)?),
        _ => None,
    };
    let total = match &kl {
        Some(kl) => ((kl * alpha)? + (&ce * (1.0 - alpha))?)?,
        None => ce.clone(),
    };
    Ok(LossTerms { total, ce, kl })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t2(v: &[&[f32]]) -> Tensor {
        let rows = v.len();
        let flat: Vec<f32> = v.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows, v[0].len()), &Device::Cpu).unwrap()
    }

    fn ids(v: &[&[u32]]) -> Tensor {
        let flat: Vec<u32> = v.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (v.len(), v[0].len()), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        super::scalar(t).unwrap()
    }

    /// Straight-line f64 reference of `topk_kl` for one row.
    fn reference_kl(z: &[f64], ids: &[usize], l: &[f64], t: f64) -> f64 {
        let m = z.iter().map(|x| x / t).fold(f64::MIN, f64::max);
        let zsum: f64 = z.iter().map(|x| (x / t - m).exp()).sum();
        let q: Vec<f64> = z.iter().map(|x| (x / t - m).exp() / zsum).collect();
        let mut qb: Vec<f64> = ids.iter().map(|&i| q[i]).collect();
        qb.push((1.0 - qb.iter().sum::<f64>()).max(MIN_TAIL));
        let mut pl: Vec<f64> = l.to_vec();
        pl.push((1.0 - l.iter().map(|x| x.exp()).sum::<f64>()).max(MIN_TAIL).ln());
        let psum: f64 = pl.iter().map(|x| (x / t).exp()).sum();
        let p: Vec<f64> = pl.iter().map(|x| (x / t).exp() / psum).collect();
        t * t * p.iter().zip(&qb).map(|(p, q)| p * (p.ln() - q.ln())).sum::<f64>()
    }

    #[test]
    fn cross_entropy_matches_hand_computed_value() {
        // Row 1: logits [0, ln 3] → p = [1/4, 3/4]; target 1 → −ln(3/4).
        // Row 2: uniform over 2 → −ln(1/2).
        let logits = t2(&[&[0.0, 3f32.ln()], &[1.0, 1.0]]);
        let targets = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        let ce = scalar(&cross_entropy(&logits, &targets).unwrap());
        let expected = (-(0.75f64).ln() - (0.5f64).ln()) / 2.0;
        assert!((ce - expected).abs() < 1e-6, "{ce} vs {expected}");
    }

    #[test]
    fn kl_is_zero_when_student_equals_teacher_at_t1() {
        // Student softmax([ln .5, ln .3, ln .2]) = [.5, .3, .2]; teacher stores top-2 [.5, .3], tail .2.
        let logits = t2(&[&[0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()]]);
        let kl = topk_kl(&logits, &ids(&[&[0, 1]]), &t2(&[&[0.5f32.ln(), 0.3f32.ln()]]), 1.0).unwrap();
        assert!(scalar(&kl).abs() < 1e-6);
    }

    #[test]
    fn kl_with_tail_bucket_matches_hand_computed_value() {
        // Student q = [.25, .25, .25, .25]; teacher top-2 ids [2, 0] with p = [.6, .3], tail .1.
        // Buckets: q = [.25, .25, .5]; KL = .6 ln(.6/.25) + .3 ln(.3/.25) + .1 ln(.1/.5).
        let logits = t2(&[&[0.0, 0.0, 0.0, 0.0]]);
        let kl = topk_kl(&logits, &ids(&[&[2, 0]]), &t2(&[&[0.6f32.ln(), 0.3f32.ln()]]), 1.0).unwrap();
        let expected = 0.6 * (0.6f64 / 0.25).ln() + 0.3 * (0.3f64 / 0.25).ln() + 0.1 * (0.1f64 / 0.5).ln();
        assert!((scalar(&kl) - expected).abs() < 1e-6, "{} vs {expected}", scalar(&kl));
    }

    #[test]
    fn kl_with_temperature_matches_reference_and_scales_by_t_squared() {
        let z = [[1.0, -0.5, 2.0, 0.3, -1.2], [0.1, 0.2, -0.3, 1.5, 0.0]];
        let id = [[2usize, 0, 3], [3, 1, 4]];
        let l = [[-0.4, -1.6, -2.1], [-0.2, -2.5, -3.0]];
        for t in [1.0, 2.0, 4.0] {
            let got = scalar(
                &topk_kl(
                    &t2(&[&z[0].map(|x| x as f32), &z[1].map(|x| x as f32)]),
                    &ids(&[&id[0].map(|x| x as u32), &id[1].map(|x| x as u32)]),
                    &t2(&[&l[0].map(|x| x as f32), &l[1].map(|x| x as f32)]),
                    t,
                )
                .unwrap(),
            );
            let expected = (reference_kl(&z[0], &id[0], &l[0], t) + reference_kl(&z[1], &id[1], &l[1], t)) / 2.0;
            assert!((got - expected).abs() < 1e-5, "T={t}: {got} vs {expected}");
        }
    }

    #[test]
    fn empty_selection_gives_zero() {
        let logits = Tensor::zeros((0, 5), DType::F32, &Device::Cpu).unwrap();
        let targets = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
        let tid = Tensor::zeros((0, 2), DType::U32, &Device::Cpu).unwrap();
        let tlp = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
        let terms = distill_loss(&logits, &targets, Some((&tid, &tlp)), 0.5, 2.0).unwrap();
        assert_eq!(scalar(&terms.total), 0.0);
    }

    #[test]
    fn alpha_mixes_the_terms() {
        let logits = t2(&[&[0.0, 1.0, 2.0]]);
        let targets = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let (tid, tlp) = (ids(&[&[2]]), t2(&[&[0.9f32.ln()]]));
        let terms = distill_loss(&logits, &targets, Some((&tid, &tlp)), 0.25, 2.0).unwrap();
        let (ce, kl) = (scalar(&terms.ce), scalar(terms.kl.as_ref().unwrap()));
        assert!((scalar(&terms.total) - (0.25 * kl + 0.75 * ce)).abs() < 1e-6);
        let seq_only = distill_loss(&logits, &targets, Some((&tid, &tlp)), 0.0, 2.0).unwrap();
        assert!(seq_only.kl.is_none());
        assert!((scalar(&seq_only.total) - ce).abs() < 1e-7);
    }

    #[test]
    fn kl_gradient_reaches_the_logits() {
        let z = candle_core::Var::from_tensor(&t2(&[&[0.0, 0.5, -0.5, 1.0]])).unwrap();
        let kl = topk_kl(z.as_tensor(), &ids(&[&[3, 1]]), &t2(&[&[0.2f32.ln(), 0.7f32.ln()]]), 2.0).unwrap();
        let g = kl.backward().unwrap();
        let grad = g.get(&z).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(grad > 0.0);
    }
}
