//! Divergences between the teacher's distribution p and the student's q at temperature T.
//!
//! Both distributions are laid out over the same M buckets, as log-probabilities (N, M):
//! - **top-k + tail** (stored samples): the teacher's K ids and one tail bucket holding the rest
//!   of its mass (M = K + 1). A log-prob of −∞ marks a padding slot (rows of a teacher mixture
//!   have different lengths): the slot is no bucket, and its ids' student mass stays in the tail.
//! - **full vocabulary** (a teacher in memory): M = V, exact.
//!
//! Every divergence is a sum over buckets per row, clamped at 0 (rounding in bf16 or f32 must
//! never make it negative), then averaged over rows and scaled by T² (Hinton et al. 2015: it
//! keeps the gradient's size independent of T), except TVD, which is bounded by 1 and whose
//! gradient does not shrink as 1/T².

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::model::ops::log_softmax;

/// A tail bucket below this mass is treated as this mass (keeps log finite).
pub const MIN_TAIL: f64 = 1e-10;

/// What a padding slot holds on both sides: exp of it is 0 in f32, and it is finite, so every
/// divergence term of the slot is exactly 0 (p = q = 0, log p − log q = 0).
const PAD: f64 = -1e4;

/// Share of the teacher's mass that AKL calls the head (Wu et al. 2024 use 0.5).
pub const AKL_HEAD_MASS: f64 = 0.5;

/// `kd.divergence`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// `Σ p (log p − log q)`: mass-covering (Hinton et al. 2015).
    #[default]
    ForwardKl,
    /// `Σ q (log q − log p)`: mode-seeking (MiniLLM, Gu et al. 2024).
    ReverseKl,
    /// `β KL(p ‖ m) + (1 − β) KL(q ‖ m)`, `m = β p + (1 − β) q`; β = 0 is forward KL and
    /// β = 1 reverse KL, as TRL's GKD defines them (Agarwal et al. 2024).
    Jsd,
    /// `KL(p ‖ α p + (1 − α) q)`, α = `kd.skew` (DistiLLM, Ko et al. 2024).
    SkewKl,
    /// `KL(q ‖ α q + (1 − α) p)` (DistiLLM).
    SkewReverseKl,
    /// `½ Σ |p − q|` (total variation, Wen et al. 2023).
    Tvd,
    /// `g_head / g · FKL + g_tail / g · RKL`, where g_head and g_tail are `Σ |p − q|` over the
    /// teacher's head (the most likely buckets up to [`AKL_HEAD_MASS`]) and over the rest
    /// (adaptive KL, Wu et al. 2024); the weights carry no gradient.
    Akl,
}

impl Divergence {
    pub const ALL: [Divergence; 7] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd,
        Divergence::SkewKl,
        Divergence::SkewReverseKl,
        Divergence::Tvd,
        Divergence::Akl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Divergence::ForwardKl => "forward_kl",
            Divergence::ReverseKl => "reverse_kl",
            Divergence::Jsd => "jsd",
            Divergence::SkewKl => "skew_kl",
            Divergence::SkewReverseKl => "skew_reverse_kl",
            Divergence::Tvd => "tvd",
            Divergence::Akl => "akl",
        }
    }

    /// The factor a row mean is multiplied by at temperature `t`.
    pub fn scale(self, t: f64) -> f64 {
        match self {
            Divergence::Tvd => 1.0,
            _ => t * t,
        }
    }
}

/// A divergence with its parameters: `beta` for JSD, `skew` for the skew variants (both in [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    pub divergence: Divergence,
    pub beta: f64,
    pub skew: f64,
}

impl Measure {
    pub fn forward_kl() -> Self {
        Self { divergence: Divergence::ForwardKl, beta: 0.5, skew: 0.1 }
    }
}

/// Teacher and student over K + 1 buckets at temperature `t`, as `(log p_T, log q_T)` (N, K + 1).
///
/// - Teacher: stored log-probs `l` (N, K) at T = 1 of `ids` (N, K); the tail holds `1 − Σ exp(l)`.
///   At temperature T every bucket, the tail included, is tempered as one token: `p_T ∝ exp(l / T)`
///   (exact at T = 1; the tail's inner shape is unknown); then the tail is floored at
///   [`MIN_TAIL`] so that log p stays finite. No gradient.
/// - Student: `q_T = softmax(z / T)` over the full vocabulary (N, V), gathered at the teacher's
///   ids; its tail is the mass outside them, `1 − Σ_k q_T,k`.
pub fn topk_buckets(logits: &Tensor, ids: &Tensor, logprobs: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
    let k = ids.dim(1)?;
    let l = logprobs.detach().to_dtype(DType::F32)?;
    // The tail is tempered as it is (0 stays 0), then floored: a teacher with all its mass in
    // the top-k keeps a negligible tail at every T.
    let tail = l.exp()?.sum_keepdim(1)?.affine(-1.0, 1.0)?.relu()?.log()?;
    let lp = log_softmax(&Tensor::cat(&[&l, &tail], 1)?, 1.0 / t)?;
    let real = lp.narrow(1, 0, k)?.ge(PAD)?;
    let pad = real.to_dtype(DType::F32)?.affine(0.0, PAD)?;
    let lp =
        Tensor::cat(&[&real.where_cond(&lp.narrow(1, 0, k)?, &pad)?, &lp.narrow(1, k, 1)?.maximum(MIN_TAIL.ln())?], 1)?;

    let logq = log_softmax(&logits.to_dtype(DType::F32)?, 1.0 / t)?;
    let top = real.where_cond(&logq.gather(ids, 1)?, &pad)?;
    let inside = top.exp()?.sum_keepdim(1)?;
    let tail = inside.affine(-1.0, 1.0)?.maximum(MIN_TAIL)?.log()?;
    Ok((lp, Tensor::cat(&[&top, &tail], 1)?))
}

/// Teacher and student over the full vocabulary at temperature `t`, from logits (N, V) each,
/// as `(log p_T, log q_T)`. The teacher side carries no gradient.
pub fn full_buckets(student: &Tensor, teacher: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
    let lp = log_softmax(&teacher.detach().to_dtype(DType::F32)?, 1.0 / t)?;
    let lq = log_softmax(&student.to_dtype(DType::F32)?, 1.0 / t)?;
    Ok((lp, lq))
}

/// The divergence of each row, (N), from `(log p, log q)` (N, M) over the same buckets; ≥ 0.
/// No temperature factor (see [`Divergence::scale`]).
pub fn rows(m: Measure, lp: &Tensor, lq: &Tensor) -> Result<Tensor> {
    let d = match m.divergence {
        Divergence::ForwardKl => kl(lp, lq)?,
        Divergence::ReverseKl => kl(lq, lp)?,
        Divergence::Jsd if m.beta <= 0.0 => kl(lp, lq)?,
        Divergence::Jsd if m.beta >= 1.0 => kl(lq, lp)?,
        Divergence::Jsd => {
            let mix = log_mix(lp, lq, m.beta)?;
            ((kl(lp, &mix)? * m.beta)? + (kl(lq, &mix)? * (1.0 - m.beta))?)?
        }
        Divergence::SkewKl => kl(lp, &log_mix(lp, lq, m.skew)?)?,
        Divergence::SkewReverseKl => kl(lq, &log_mix(lq, lp, m.skew)?)?,
        Divergence::Tvd => (lp.exp()? - lq.exp()?)?.abs()?.sum(D::Minus1)?.affine(0.5, 0.0)?,
        Divergence::Akl => {
            let (head, tail) = akl_weights(lp, lq)?;
            ((kl(lp, lq)? * head)? + (kl(lq, lp)? * tail)?)?
        }
    };
    d.relu()
}

/// `T-factor · (1/N) Σ_n D(p_n ‖ q_n)`; an empty selection (N = 0) gives 0.
pub fn mean(m: Measure, lp: &Tensor, lq: &Tensor, t: f64) -> Result<Tensor> {
    let n = lp.dim(0)?;
    if n == 0 {
        return Tensor::zeros((), DType::F32, lp.device());
    }
    rows(m, lp, lq)?.sum_all()?.affine(m.divergence.scale(t) / n as f64, 0.0)
}

/// The divergence to the stored top-k + tail, averaged over the N positions.
pub fn topk(m: Measure, logits: &Tensor, ids: &Tensor, logprobs: &Tensor, t: f64) -> Result<Tensor> {
    if logits.dim(0)? == 0 {
        return Tensor::zeros((), DType::F32, logits.device());
    }
    let (lp, lq) = topk_buckets(logits, ids, logprobs, t)?;
    mean(m, &lp, &lq, t)
}

/// The divergence to the teacher's full-vocabulary logits (N, V), averaged over the N positions.
pub fn full(m: Measure, student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    if student.dim(0)? == 0 {
        return Tensor::zeros((), DType::F32, student.device());
    }
    let (lp, lq) = full_buckets(student, teacher, t)?;
    mean(m, &lp, &lq, t)
}

/// [`full`] with the teacher's logits made `chunk` rows at a time from its hidden states
/// (N, C) by `head`, so that no (N, V) teacher tensor exists at once, not even inside the
/// autograd graph: each chunk's gradient with respect to the student's logits is taken on the
/// spot, and the result carries it as `Σ z · ∂D/∂z` (value exact, gradient exact).
pub fn full_chunked(
    m: Measure,
    student: &Tensor,
    teacher_hidden: &Tensor,
    head: &dyn Fn(&Tensor) -> Result<Tensor>,
    t: f64,
    chunk: usize,
) -> Result<Tensor> {
    let n = student.dim(0)?;
    if n == 0 {
        return Tensor::zeros((), DType::F32, student.device());
    }
    let z = student.detach().to_dtype(DType::F32)?;
    let (mut value, mut grads) = (0f64, Vec::new());
    for start in (0..n).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(n - start);
        let zc = candle_core::Var::from_tensor(&z.narrow(0, start, len)?)?;
        let teacher = head(&teacher_hidden.narrow(0, start, len)?.detach())?.detach();
        let (lp, lq) = full_buckets(zc.as_tensor(), &teacher, t)?;
        let d = rows(m, &lp, &lq)?.sum_all()?.affine(m.divergence.scale(t) / n as f64, 0.0)?;
        value += d.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g = d.backward()?;
        grads.push(g.get(zc.as_tensor()).cloned().unwrap_or(zc.as_tensor().zeros_like()?));
    }
    let grad = Tensor::cat(&grads, 0)?;
    let surrogate = (student.to_dtype(DType::F32)? * grad)?.sum_all()?;
    // (surrogate − surrogate) + value: exactly the value of D, with the surrogate's gradient.
    (&surrogate - surrogate.detach())?.affine(1.0, value)
}

/// `Σ_m a (la − lb)`, per row: KL(a ‖ b) from log-probabilities.
fn kl(la: &Tensor, lb: &Tensor) -> Result<Tensor> {
    (la.exp()? * (la - lb)?)?.sum(D::Minus1)
}

/// `log(w a + (1 − w) b)` in log space, w in [0, 1].
fn log_mix(la: &Tensor, lb: &Tensor, w: f64) -> Result<Tensor> {
    if w <= 0.0 {
        return Ok(lb.clone());
    }
    if w >= 1.0 {
        return Ok(la.clone());
    }
    let (x, y) = (la.affine(1.0, w.ln())?, lb.affine(1.0, (1.0 - w).ln())?);
    // logaddexp(x, y) = max + ln(1 + e^−|x − y|)
    let max = x.maximum(&y)?;
    let gap = (&x - &y)?.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    max + gap
}

/// AKL's (head, tail) weights per row (N), from the buckets' gaps `|p − q|`, without gradient.
fn akl_weights(lp: &Tensor, lq: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = lp.detach().exp()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let q = lq.detach().exp()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut head, mut tail) = (Vec::with_capacity(p.len()), Vec::with_capacity(p.len()));
    for (p, q) in p.iter().zip(&q) {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let (mut cum, mut gh, mut gt) = (0f64, 0f64, 0f64);
        for (rank, &i) in order.iter().enumerate() {
            cum += p[i] as f64;
            let gap = (p[i] - q[i]).abs() as f64;
            // The most likely bucket is always head; then the buckets until the mass passes μ.
            if rank == 0 || cum <= AKL_HEAD_MASS {
                gh += gap;
            } else {
                gt += gap;
            }
        }
        let g = (gh + gt).max(f64::MIN_POSITIVE);
        head.push((gh / g) as f32);
        tail.push((gt / g) as f32);
    }
    let dev = lp.device();
    Ok((Tensor::new(head, dev)?, Tensor::new(tail, dev)?))
}

#[cfg(test)]
mod tests;
