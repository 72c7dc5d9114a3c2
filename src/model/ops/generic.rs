//! The fused ops composed from candle's differentiable primitives instead: what runs where the
//! CPU kernels cannot (a CUDA device; candle gives each primitive its CUDA kernel and its
//! backward). The same maths as the fused ops, checked against them on the CPU, values and
//! gradients (`tests.rs`). Avoids candle's fast ops that cut the graph (`softmax_last_dim`,
//! `rms_norm`, `rotary_emb::rope`): see the module doc of `ops`.

use candle_core::{bail, DType, Result, Tensor, Var, D};

/// [`super::rms_norm`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// [`super::log_softmax`].
pub fn log_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    candle_nn::ops::log_softmax(&(x * scale)?, D::Minus1)
}

/// [`super::nll_rows`].
pub fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(1)?;
    if targets.dim(0)? > 0 {
        // A gather out of range is no error on a GPU: check on the host, as the CPU kernel does.
        let top = targets.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if top as usize >= v {
            bail!("nll: target id {top} is outside the vocabulary of {v} logits");
        }
    }
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// [`super::rope`]: x (B, T, H, D) rotated, as (B, H, T, D).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x = x.transpose(1, 2)?;
    let (x1, x2) = (x.narrow(D::Minus1, 0, d / 2)?, x.narrow(D::Minus1, d / 2, d / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos.unsqueeze(1)?)? + rotated.broadcast_mul(&sin.unsqueeze(1)?)?
}

/// [`super::silu_mul`].
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(gate)? * up
}

/// [`super::attention`]: q (B, H, T, D), k and v (B, K, S, D), mask (B, 1, T, S) additive;
/// out (B, T, H, D). The (B, H, T, S) probabilities are materialised (and kept for the backward).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (_, kv, s, _) = k.dims4()?;
    if kv == 0 || h % kv != 0 {
        bail!("attention: {h} query heads cannot share {kv} kv heads");
    }
    // Grouped-query heads: kv head j serves query heads j·(H/K) .. (j+1)·(H/K).
    let repeat = |x: &Tensor| -> Result<Tensor> {
        if kv == h {
            return Ok(x.clone());
        }
        x.unsqueeze(2)?.expand((b, kv, h / kv, s, d))?.reshape((b, h, s, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.reshape((b, 1, t, s))?)?;
    }
    let p = candle_nn::ops::softmax(&scores, D::Minus1)?;
    p.matmul(&v.contiguous()?)?.transpose(1, 2)?.contiguous()
}

/// [`super::decode_attention`]: one new query per row; out (B, H, 1, D).
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    attention(q, k, v, scale, mask)?.transpose(1, 2)
}

/// [`super::adamw_step`], writing the new weights and moments through `Var::set`.
pub fn adamw_step(theta: &Var, m: &Var, v: &Var, g: &Tensor, a: &super::AdamwStep) -> Result<()> {
    if g.shape() != theta.shape() {
        bail!("adamw: gradient {:?} for a parameter of {:?}", g.shape(), theta.shape());
    }
    let ((beta1, beta2), (bias1, bias2)) = (a.betas, a.bias);
    let g = (g.to_dtype(DType::F32)? * a.grad_scale)?;
    let m_new = ((m.as_tensor() * beta1)? + (&g * (1.0 - beta1))?)?;
    let v_new = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    let step = ((&m_new / bias1)? / ((&v_new / bias2)?.sqrt()? + a.eps)?)?;
    let theta_new = ((theta.as_tensor() * a.decay)? - (step * a.lr)?)?;
    m.set(&m_new)?;
    v.set(&v_new)?;
    theta.set(&theta_new)
}
