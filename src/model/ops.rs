//! Fused CPU kernels: with a hand-written backward for the ops training spends its time in,
//! forward-only ones for decoding (few-row matmul, one-token attention), and AdamW in place.
//!
//! candle's own fused RMSNorm, softmax and RoPE have no backward, and their differentiable
//! compositions allocate and sweep one tensor per elementary op (page faults and memory
//! traffic, not FLOPs, then dominate a small model). Each op here makes one pass forward and
//! one backward. Inputs are f32; callers cast other dtypes. Non-contiguous inputs are copied.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout};
use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Below this many elements one thread does the work (decode steps are tiny).
const PAR_MIN: usize = 1 << 15;

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (l.contiguous_offsets(), s) {
        (Some((a, b)), CpuStorage::F32(v)) => Ok(&mut v[a..b]),
        _ => bail!("{op}: destination must be contiguous f32"),
    }
}

/// Calls `f(i, row)` for each `width`-wide row of `out`, in parallel when `out` is large.
fn each_row(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() < PAR_MIN {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        out.par_chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Splits the flat output of a kernel that writes several gradients in one pass into tensors of
/// the given shapes, in order.
fn unstack<const N: usize>(flat: &Tensor, shapes: [&Shape; N]) -> Result<[Tensor; N]> {
    let mut parts = Vec::with_capacity(N);
    let mut at = 0;
    for shape in shapes {
        parts.push(flat.narrow(0, at, shape.elem_count())?.reshape(shape)?);
        at += shape.elem_count();
    }
    Ok(std::array::from_fn(|i| parts[i].clone()))
}

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.dtype() != DType::F32 {
        bail!("fused ops take f32, got {:?}", t.dtype());
    }
    t.contiguous()
}

// ---------------------------------------------------------------- RMSNorm

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension of x; w has that dimension's size.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    f32_contiguous(x)?.apply_op2(&f32_contiguous(w)?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "kdllm-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let c = w.len();
        if c == 0 || x.len() % c != 0 {
            bail!("rms_norm: weight of {c} does not divide input of {}", x.len());
        }
        let mut y = vec![0f32; x.len()];
        each_row(&mut y, c, |i, row| {
            let xr = &x[i * c..(i + 1) * c];
            let r = inv_rms(xr, self.eps);
            for ((o, &xv), &wv) in row.iter_mut().zip(xr).zip(w) {
                *o = xv * r * wv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One kernel writes dx and then dw.
        let both = x.apply_op3_no_bwd(w, &f32_contiguous(dy)?, &RmsNormBwd { eps: self.eps })?;
        let [dx, dw] = unstack(&both, [x.shape(), w.shape()])?;
        Ok((Some(dx), Some(dw)))
    }
}

struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "kdllm-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let c = w.len();
        let rows = x.len() / c;
        let mut out = vec![0f32; (rows + 1) * c];
        let (dx, dw) = out.split_at_mut(rows * c);
        // dx_j = r·dy_j·w_j − r³·x_j·(Σ_i dy_i·w_i·x_i)/C ; dw_j = Σ_rows dy_j·x_j·r
        let block = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(block * c)
            .enumerate()
            .map(|(bi, chunk)| {
                let mut dw = vec![0f32; c];
                for (k, dxr) in chunk.chunks_mut(c).enumerate() {
                    let i = bi * block + k;
                    let (xr, dyr) = (&x[i * c..(i + 1) * c], &dy[i * c..(i + 1) * c]);
                    let r = inv_rms(xr, self.eps);
                    let s: f32 = dyr.iter().zip(w).zip(xr).map(|((d, w), x)| d * w * x).sum();
                    let k3 = r * r * r * s / c as f32;
                    for j in 0..c {
                        dxr[j] = r * dyr[j] * w[j] - k3 * xr[j];
                        dw[j] += dyr[j] * xr[j] * r;
                    }
                }
                dw
            })
            .collect();
        for p in partials {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1) * c)))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax of one row, in place.
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

// ---------------------------------------------------------------- log-softmax and cross-entropy

/// `log_softmax(x · scale)` over the last dimension.
pub fn log_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    f32_contiguous(x)?.apply_op1(LogSoftmax { scale: scale as f32 })
}

struct LogSoftmax {
    scale: f32,
}

/// (max, log Σ exp(x·scale − max)) of a row.
fn log_sum_exp(row: &[f32], scale: f32) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let sum: f32 = row.iter().map(|&v| (v * scale - max).exp()).sum();
    (max, sum.ln())
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "kdllm-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let width = l.dims().last().copied().unwrap_or(1);
        let mut y = vec![0f32; x.len()];
        each_row(&mut y, width, |i, row| {
            let xr = &x[i * width..(i + 1) * width];
            let (max, lse) = log_sum_exp(xr, self.scale);
            for (o, &v) in row.iter_mut().zip(xr) {
                *o = v * self.scale - max - lse;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&f32_contiguous(dy)?, &LogSoftmaxBwd { scale: self.scale })?))
    }
}

struct LogSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for LogSoftmaxBwd {
    fn name(&self) -> &'static str {
        "kdllm-log-softmax-bwd"
    }

    // dx = scale·(dy − softmax·Σ dy)
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let width = l1.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; y.len()];
        each_row(&mut dx, width, |i, row| {
            let (yr, dyr) = (&y[i * width..(i + 1) * width], &dy[i * width..(i + 1) * width]);
            let total: f32 = dyr.iter().sum();
            for ((o, &yv), &d) in row.iter_mut().zip(yr).zip(dyr) {
                *o = self.scale * (d - yv.exp() * total);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Per-row negative log-likelihood `−log softmax(z_n)[y_n]`, (N), of u32 targets (N) under
/// logits (N, V), without materialising the (N, V) log-probabilities.
pub fn nll_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if targets.dtype() != DType::U32 {
        bail!("nll_rows: targets must be u32, got {:?}", targets.dtype());
    }
    f32_contiguous(logits)?.apply_op2(&targets.contiguous()?, CrossEntropy)
}

struct CrossEntropy;

fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<u32>()?[a..b]),
        None => bail!("targets must be contiguous"),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kdllm-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (z, y) = (f32s(s1, l1, self.name())?, u32s(s2, l2)?);
        let &[n, v] = l1.dims() else { bail!("cross-entropy: logits must be (N, V)") };
        if y.len() != n {
            bail!("cross-entropy: {} targets for {n} rows", y.len());
        }
        if let Some(bad) = y.iter().find(|&&t| t as usize >= v) {
            bail!("cross-entropy: target id {bad} is outside the vocabulary of {v}");
        }
        let mut out = vec![0f32; n];
        let rows = |(i, o): (usize, &mut f32)| {
            let zr = &z[i * v..(i + 1) * v];
            let (max, lse) = log_sum_exp(zr, 1.0);
            *o = max + lse - zr[y[i] as usize];
        };
        if n * v < PAR_MIN {
            out.iter_mut().enumerate().for_each(rows);
        } else {
            out.par_iter_mut().enumerate().for_each(rows);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, z: &Tensor, y: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(z.apply_op3_no_bwd(y, &f32_contiguous(g)?, &CrossEntropyBwd)?), None))
    }
}

struct CrossEntropyBwd;

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "kdllm-cross-entropy-bwd"
    }

    // dz_n = g_n · (softmax(z_n) − onehot(y_n))
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (z, y, g) = (f32s(s1, l1, self.name())?, u32s(s2, l2)?, f32s(s3, l3, self.name())?);
        let v = l1.dims()[1];
        let mut dz = vec![0f32; z.len()];
        each_row(&mut dz, v, |i, row| {
            let zr = &z[i * v..(i + 1) * v];
            let (max, lse) = log_sum_exp(zr, 1.0);
            for (o, &zv) in row.iter_mut().zip(zr) {
                *o = g[i] * (zv - max - lse).exp();
            }
            row[y[i] as usize] -= g[i];
        });
        Ok((CpuStorage::F32(dz), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- RoPE

/// Rotates `x` (B, T, H, D) in HF's rotate-half layout and returns it as (B, H, T, D): the
/// head transpose attention needs, in the same pass. `cos`/`sin` are (B, T, D).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    f32_contiguous(x)?.apply_op3(&f32_contiguous(cos)?, &f32_contiguous(sin)?, Rope)
}

struct Rope;

/// Writes `x·cos + rotate_half(x)·sin` (forward) or its transpose `u·cos + rotate_halfᵀ(u·sin)`
/// (backward) into `out`.
fn rotate(out: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], backward: bool) {
    let half = x.len() / 2;
    for d in 0..half {
        let (a, b) = (x[d], x[d + half]);
        if backward {
            out[d] = a * cos[d] + b * sin[d + half];
            out[d + half] = b * cos[d + half] - a * sin[d];
        } else {
            out[d] = a * cos[d] - b * sin[d];
            out[d + half] = b * cos[d + half] + a * sin[d + half];
        }
    }
}

fn rope_dims(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<[usize; 4]> {
    let &[b, t, h, d] = l1.dims() else { bail!("rope: input must be 4-D") };
    if l2.dims() != [b, t, d] || l3.dims() != [b, t, d] || d % 2 != 0 {
        bail!("rope: tables {:?} do not fit input {:?}", l2.dims(), l1.dims());
    }
    Ok([b, t, h, d])
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "kdllm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let [b, t, h, d] = rope_dims(l1, l2, l3)?;
        let mut y = vec![0f32; x.len()];
        // Output row (bi, hi, ti) reads input row (bi, ti, hi).
        each_row(&mut y, d, |i, row| {
            let (bi, hi, ti) = (i / (h * t), (i / t) % h, i % t);
            let src = ((bi * t + ti) * h + hi) * d;
            let tab = (bi * t + ti) * d;
            rotate(row, &x[src..src + d], &cos[tab..tab + d], &sin[tab..tab + d], false);
        });
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(f32_contiguous(dy)?.apply_op3_no_bwd(cos, sin, &RopeBwd)?), None, None))
    }
}

struct RopeBwd;

impl CustomOp3 for RopeBwd {
    fn name(&self) -> &'static str {
        "kdllm-rope-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, cos, sin) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let &[b, h, t, d] = l1.dims() else { bail!("rope backward: gradient must be 4-D") };
        let mut dx = vec![0f32; dy.len()];
        // dx row (bi, ti, hi) reads gradient row (bi, hi, ti).
        each_row(&mut dx, d, |i, row| {
            let (bi, ti, hi) = (i / (t * h), (i / h) % t, i % h);
            let src = ((bi * h + hi) * t + ti) * d;
            let tab = (bi * t + ti) * d;
            rotate(row, &dy[src..src + d], &cos[tab..tab + d], &sin[tab..tab + d], true);
        });
        Ok((CpuStorage::F32(dx), Shape::from((b, t, h, d))))
    }
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) · up`, elementwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!("silu_mul: gate {:?} and up {:?} differ", gate.shape(), up.shape());
    }
    f32_contiguous(gate)?.apply_op2(&f32_contiguous(up)?, SiluMul)
}

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "kdllm-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut y = vec![0f32; g.len()];
        let width = l1.dims().last().copied().unwrap_or(1);
        each_row(&mut y, width, |i, row| {
            for (j, o) in row.iter_mut().enumerate() {
                let gv = g[i * width + j];
                *o = gv * sigmoid(gv) * u[i * width + j];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // One kernel writes [d_gate; d_up].
        let both = g.apply_op3_no_bwd(u, &f32_contiguous(dy)?, &SiluMulBwd)?;
        let [d_gate, d_up] = unstack(&both, [g.shape(), u.shape()])?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "kdllm-silu-mul-bwd"
    }

    // d_gate = dy·u·σ(g)·(1 + g·(1 − σ(g))) ; d_up = dy·g·σ(g)
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        let width = l1.dims().last().copied().unwrap_or(1);
        let kernel = |(i, (dg, du)): (usize, (&mut [f32], &mut [f32]))| {
            for j in 0..dg.len() {
                let k = i * width + j;
                let s = sigmoid(g[k]);
                dg[j] = dy[k] * u[k] * s * (1.0 + g[k] * (1.0 - s));
                du[j] = dy[k] * g[k] * s;
            }
        };
        if n < PAR_MIN {
            dg.chunks_mut(width).zip(du.chunks_mut(width)).enumerate().for_each(kernel);
        } else {
            dg.par_chunks_mut(width).zip(du.par_chunks_mut(width)).enumerate().for_each(kernel);
        }
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

// ---------------------------------------------------------------- attention over a sequence

/// `softmax(q·kᵀ·scale + mask)·v` per head, returned as (B, T, H, D) (the layout the output
/// projection reads). q (B, H, T, D); k and v (B, K, S, D), K dividing H (grouped-query heads
/// share kv head h / (H/K)); mask (B, 1, T, S) additive. The (B, H, T, S) probabilities are
/// never stored: the backward recomputes them per head, so neither the tensors nor candle's
/// per-node gradient bookkeeping of the composed attention are paid for.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (q, k, v) = (f32_contiguous(q)?, f32_contiguous(k)?, f32_contiguous(v)?);
    q.apply_op3(&k, &v, Attention { scale: scale as f32, mask: mask_values(mask)? })
}

/// An additive mask's values, flat, for the attention kernels to index.
fn mask_values(mask: Option<&Tensor>) -> Result<Option<Arc<Vec<f32>>>> {
    mask.map(|m| Ok(Arc::new(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))).transpose()
}

#[derive(Clone)]
struct Attention {
    scale: f32,
    mask: Option<Arc<Vec<f32>>>,
}

/// Shapes of one attention call: batch, query heads, kv heads, queries, keys, head dim.
#[derive(Clone, Copy)]
struct AttnDims {
    b: usize,
    h: usize,
    kh: usize,
    t: usize,
    s: usize,
    d: usize,
}

fn attn_dims(l1: &Layout, l2: &Layout, l3: &Layout, mask: Option<&Vec<f32>>) -> Result<AttnDims> {
    let (&[b, h, t, d], &[kb, kh, s, kd]) = (l1.dims(), l2.dims()) else { bail!("attention: q, k must be 4-D") };
    if kb != b || kd != d || kh == 0 || h % kh != 0 || l3.dims() != l2.dims() {
        bail!("attention: q {:?}, k {:?}, v {:?} do not fit", l1.dims(), l2.dims(), l3.dims());
    }
    if mask.is_some_and(|m| m.len() != b * t * s) {
        bail!("attention: mask does not have B·T·S = {} entries", b * t * s);
    }
    Ok(AttnDims { b, h, kh, t, s, d })
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, each given as (pointer, row stride, column
/// stride), on the calling thread.
///
/// SAFETY: the pointers must address the strided matrices in full; dst must not alias the others.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl Attention {
    /// Probabilities (T, S) of query head `hi` of row `bi` into `p`.
    fn probs(&self, q: &[f32], k: &[f32], z: AttnDims, bi: usize, hi: usize, p: &mut [f32]) {
        let (t, s, d) = (z.t, z.s, z.d);
        let g = hi / (z.h / z.kh);
        let qh = &q[(bi * z.h + hi) * t * d..];
        let kg = &k[(bi * z.kh + g) * s * d..];
        // SAFETY: q head (T, D), k head (S, D) and p (T, S) are in bounds.
        unsafe { gemm_into((t, s, d), (p.as_mut_ptr(), s, 1), false, (qh.as_ptr(), d, 1), (kg.as_ptr(), 1, d)) };
        for (i, row) in p.chunks_mut(s).enumerate() {
            match &self.mask {
                Some(m) => {
                    let mr = &m[(bi * t + i) * s..(bi * t + i + 1) * s];
                    row.iter_mut().zip(mr).for_each(|(x, mv)| *x = *x * self.scale + mv);
                }
                None => row.iter_mut().for_each(|x| *x *= self.scale),
            }
            softmax_in_place(row);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "kdllm-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let z = attn_dims(l1, l2, l3, self.mask.as_deref())?;
        let (h, t, s, d) = (z.h, z.t, z.s, z.d);
        // Output (B, T, H, D); one task per (row, head) writes its strided (T, D) slice.
        let mut out = vec![0f32; z.b * t * h * d];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let task = |i: usize| {
            let (bi, hi) = (i / h, i % h);
            let mut p = vec![0f32; t * s];
            self.probs(q, k, z, bi, hi, &mut p);
            let vg = &v[(bi * z.kh + hi / (h / z.kh)) * s * d..];
            let o = out_ptr.at((bi * t * h + hi) * d);
            // SAFETY: each (bi, hi) writes rows t·H·D + hi·D .. + D of row bi only.
            unsafe { gemm_into((t, d, s), (o, h * d, 1), false, (p.as_ptr(), s, 1), (vg.as_ptr(), d, 1)) };
        };
        (0..z.b * h).into_par_iter().for_each(task);
        Ok((CpuStorage::F32(out), Shape::from((z.b, t, h, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = f32_contiguous(grad)?;
        let both = q.apply_op3_no_bwd(k, v, &AttentionBwd { fwd: self.clone(), grad: g })?;
        let [dq, dk, dv] = unstack(&both, [q.shape(), k.shape(), v.shape()])?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output regions to parallel tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation.
        unsafe { self.0.add(offset) }
    }
}

/// [dq | dk | dv] flat, from the forward's inputs and the output gradient (B, T, H, D).
struct AttentionBwd {
    fwd: Attention,
    grad: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "kdllm-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let z = attn_dims(l1, l2, l3, self.fwd.mask.as_deref())?;
        let (h, t, s, d) = (z.h, z.t, z.s, z.d);
        // Read in place: the lock is held while the kernel runs.
        let (grad, grad_layout) = self.grad.storage_and_layout();
        let go = match &*grad {
            candle_core::Storage::Cpu(c) => f32s(c, grad_layout, self.name())?,
            _ => bail!("attention backward: CPU only"),
        };
        let (nq, nk) = (q.len(), k.len());
        let mut out = vec![0f32; nq + 2 * nk];
        let (dq, rest) = out.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nk);
        let group = h / z.kh;
        // One task per (row, kv head): it owns that head's dk/dv and its query heads' dq.
        let dq_ptr = SendPtr(dq.as_mut_ptr());
        let task = |((i, dkg), dvg): ((usize, &mut [f32]), &mut [f32])| {
            let (bi, gi) = (i / z.kh, i % z.kh);
            let kg = &k[i * s * d..(i + 1) * s * d];
            let vg = &v[i * s * d..(i + 1) * s * d];
            let (mut p, mut dp) = (vec![0f32; t * s], vec![0f32; t * s]);
            for hi in gi * group..(gi + 1) * group {
                self.fwd.probs(q, k, z, bi, hi, &mut p);
                let gh = &go[(bi * t * h + hi) * d..];
                let qh = &q[(bi * h + hi) * t * d..];
                // SAFETY: all matrices are in bounds; dq rows of head (bi, hi) belong to this task.
                unsafe {
                    // dV += Pᵀ·dO ; dP = dO·Vᵀ
                    gemm_into((s, d, t), (dvg.as_mut_ptr(), d, 1), true, (p.as_ptr(), 1, s), (gh.as_ptr(), h * d, 1));
                    gemm_into((t, s, d), (dp.as_mut_ptr(), s, 1), false, (gh.as_ptr(), h * d, 1), (vg.as_ptr(), 1, d));
                }
                // dS = scale · P ⊙ (dP − Σ dP⊙P), in place in dp.
                for (pr, dr) in p.chunks(s).zip(dp.chunks_mut(s)) {
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for (x, &pv) in dr.iter_mut().zip(pr) {
                        *x = self.fwd.scale * pv * (*x - dot);
                    }
                }
                unsafe {
                    // dQ = dS·K ; dK += dSᵀ·Q
                    let dqh = dq_ptr.at((bi * h + hi) * t * d);
                    gemm_into((t, d, s), (dqh, d, 1), false, (dp.as_ptr(), s, 1), (kg.as_ptr(), d, 1));
                    gemm_into((s, d, t), (dkg.as_mut_ptr(), d, 1), true, (dp.as_ptr(), 1, s), (qh.as_ptr(), d, 1));
                }
            }
        };
        dk.par_chunks_mut(s * d).enumerate().zip(dv.par_chunks_mut(s * d)).for_each(task);
        Ok((CpuStorage::F32(out), Shape::from(nq + 2 * nk)))
    }
}

// ---------------------------------------------------------------- attention of one new token

/// Attention output (B, H, 1, D) of one new query per row, q (B, H, 1, D), over cached keys and
/// values (B, K, S, D) (strided views of the cache are read in place), with `mask` (B, S)
/// additive and `scale` applied to the scores. No gradient: decoding only. Replaces B·K tiny
/// GEMM calls per layer and step with one pass.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    f32_contiguous(q)?.apply_op3_no_bwd(k, v, &DecodeAttention { scale: scale as f32, mask: mask_values(mask)? })
}

struct DecodeAttention {
    scale: f32,
    mask: Option<Arc<Vec<f32>>>,
}

/// The f32 data of a 4-D tensor whose last dimension is contiguous, with its strides.
fn strided4<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], [usize; 4])> {
    let st = l.stride();
    if st.len() != 4 || st[3] != 1 {
        bail!("{op}: keys and values must be 4-D with a contiguous last dimension");
    }
    Ok((&s.as_slice::<f32>()?[l.start_offset()..], [st[0], st[1], st[2], st[3]]))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes so the compiler vectorizes the reduction.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "kdllm-decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32s(s1, l1, self.name())?;
        let &[b, h, 1, d] = l1.dims() else { bail!("decode attention: query must be (B, H, 1, D)") };
        let (k, ks) = strided4(s2, l2, self.name())?;
        let (v, vs) = strided4(s3, l3, self.name())?;
        let &[kb, kh, s, kd] = l2.dims() else { bail!("decode attention: keys must be 4-D") };
        if kb != b || kd != d || h % kh != 0 || l3.dims() != l2.dims() {
            bail!("decode attention: q {:?}, k {:?}, v {:?} do not fit", l1.dims(), l2.dims(), l3.dims());
        }
        if self.mask.as_ref().is_some_and(|m| m.len() != b * s) {
            bail!("decode attention: mask does not have B·S = {} entries", b * s);
        }
        let group = h / kh;
        let mut out = vec![0f32; q.len()];
        let head = |i: usize, o: &mut [f32]| {
            let (bi, g) = (i / h, (i % h) / group);
            let qr = &q[i * d..(i + 1) * d];
            let mut p: Vec<f32> = (0..s)
                .map(|j| {
                    let kr = &k[bi * ks[0] + g * ks[1] + j * ks[2]..][..d];
                    dot(qr, kr) * self.scale + self.mask.as_ref().map_or(0.0, |m| m[bi * s + j])
                })
                .collect();
            softmax_in_place(&mut p);
            for (j, pj) in p.iter().enumerate() {
                let vr = &v[bi * vs[0] + g * vs[1] + j * vs[2]..][..d];
                for (a, &x) in o.iter_mut().zip(vr) {
                    *a += pj * x;
                }
            }
        };
        if b * h * s * d < PAR_MIN {
            out.chunks_mut(d).enumerate().for_each(|(i, o)| head(i, o));
        } else {
            out.par_chunks_mut(d).enumerate().for_each(|(i, o)| head(i, o));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- few-row matmul (decoding)

/// Row counts up to which [`matmul_few_rows`] beats the GEMM (decode steps of small batches).
pub const FEW_ROWS: usize = 8;

/// `x · wᵀ` for x (M, K) with M ≤ [`FEW_ROWS`] and w (N, K) as stored, f32 or bf16, without
/// gradient; the result has x's dtype. The GEMM packs the whole weight matrix at every call,
/// which dominates a decode step; this kernel streams each weight row once and reuses it for
/// every row of x, widening bf16 weights to f32 as it loads them (half the bytes to stream).
/// `None` where it does not apply (no AVX-512, more rows, other dtypes): the caller uses the GEMM.
pub fn matmul_few_rows(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        let fits = x.rank() == 2 && x.dim(0)? <= FEW_ROWS && w.rank() == 2 && x.dim(1)? == w.dim(1)?;
        let dtypes = matches!(x.dtype(), DType::F32 | DType::BF16) && matches!(w.dtype(), DType::F32 | DType::BF16);
        if fits && dtypes && std::arch::is_x86_feature_detected!("avx512f") {
            let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &FewRows)?;
            return Ok(Some(y.to_dtype(x.dtype())?));
        }
    }
    let _ = (x, w);
    Ok(None)
}

struct FewRows;

impl CustomOp2 for FewRows {
    fn name(&self) -> &'static str {
        "kdllm-matmul-few-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let (&[m, k], &[n, _]) = (l1.dims(), l2.dims()) else { bail!("matmul_few_rows: needs 2-D operands") };
        let Some((start, _)) = l2.contiguous_offsets() else { bail!("matmul_few_rows: weights must be contiguous") };
        // The weights as an address and an element type; bf16 is read as its raw u16 bits.
        let (w_addr, bf16) = match s2 {
            CpuStorage::F32(v) => (v[start..start + n * k].as_ptr() as usize, false),
            CpuStorage::BF16(v) => (v[start..start + n * k].as_ptr() as usize, true),
            _ => bail!("matmul_few_rows: weights must be f32 or bf16"),
        };
        // Computed as yᵀ (N, M) so that each task owns whole rows, then transposed.
        let mut yt = vec![0f32; n * m];
        let per_task = 64;
        let task = |(ti, chunk): (usize, &mut [f32])| {
            let o0 = ti * per_task;
            // SAFETY: matmul_few_rows checked AVX-512F; rows o0.. of the weights lie inside the
            // slice taken above (chunk holds at most n − o0 rows).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if bf16 {
                    few_rows::block(x, m, k, few_rows::Bf16((w_addr as *const u16).add(o0 * k)), chunk)
                } else {
                    few_rows::block(x, m, k, few_rows::F32((w_addr as *const f32).add(o0 * k)), chunk)
                }
            };
        };
        if n * k < 1 << 18 {
            yt.chunks_mut(per_task * m).enumerate().for_each(task);
        } else {
            yt.par_chunks_mut(per_task * m).enumerate().for_each(task);
        }
        let mut y = vec![0f32; m * n];
        for (o, col) in yt.chunks(m).enumerate() {
            for (mi, &v) in col.iter().enumerate() {
                y[mi * n + o] = v;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

#[cfg(target_arch = "x86_64")]
mod few_rows {
    use std::arch::x86_64::*;

    /// Weight rows (K elements each) that load 16 at a time as f32.
    pub trait Rows: Copy {
        /// Elements i..i+16, widened to f32.
        unsafe fn load16(self, i: usize) -> __m512;
        unsafe fn get(self, i: usize) -> f32;
    }

    #[derive(Clone, Copy)]
    pub struct F32(pub *const f32);

    #[derive(Clone, Copy)]
    pub struct Bf16(pub *const u16);

    impl Rows for F32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(self, i: usize) -> __m512 {
            _mm512_loadu_ps(self.0.add(i))
        }
        unsafe fn get(self, i: usize) -> f32 {
            *self.0.add(i)
        }
    }

    impl Rows for Bf16 {
        // bf16 is the top half of an f32: widen to 32 bits and shift into place.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(self, i: usize) -> __m512 {
            let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(self.0.add(i) as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
        }
        unsafe fn get(self, i: usize) -> f32 {
            f32::from_bits((*self.0.add(i) as u32) << 16)
        }
    }

    /// yt[o·M + i] = w[o] · x[i] for the yt.len() / M weight rows of `w` and the rows i of x (M, K).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn block<W: Rows>(x: &[f32], m: usize, k: usize, w: W, yt: &mut [f32]) {
        let n = yt.len() / m;
        let mut o = 0;
        while o < n {
            let nb = (n - o).min(4);
            let mut i = 0;
            while i < m {
                let mb = (m - i).min(4);
                match (nb, mb) {
                    (4, 4) => tile::<W, 4, 4>(x, k, w, yt, m, o, i),
                    (4, 3) => tile::<W, 4, 3>(x, k, w, yt, m, o, i),
                    (4, 2) => tile::<W, 4, 2>(x, k, w, yt, m, o, i),
                    (4, _) => tile::<W, 4, 1>(x, k, w, yt, m, o, i),
                    (_, 4) => tile::<W, 1, 4>(x, k, w, yt, m, o, i),
                    (_, 3) => tile::<W, 1, 3>(x, k, w, yt, m, o, i),
                    (_, 2) => tile::<W, 1, 2>(x, k, w, yt, m, o, i),
                    _ => tile::<W, 1, 1>(x, k, w, yt, m, o, i),
                }
                i += mb;
            }
            o += if nb == 4 { 4 } else { 1 };
        }
    }

    /// NB weight rows from `o` against MB rows of x from `i`: NB·MB accumulators in registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<W: Rows, const NB: usize, const MB: usize>(
        x: &[f32],
        k: usize,
        w: W,
        yt: &mut [f32],
        m: usize,
        o: usize,
        i: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); MB]; NB];
        let vk = k / 16 * 16;
        let xp = x.as_ptr();
        let mut c = 0;
        while c < vk {
            let mut xs = [_mm512_setzero_ps(); MB];
            for (j, xv) in xs.iter_mut().enumerate() {
                *xv = _mm512_loadu_ps(xp.add((i + j) * k + c));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = w.load16((o + r) * k + c);
                for (a, xv) in row.iter_mut().zip(&xs) {
                    *a = _mm512_fmadd_ps(wv, *xv, *a);
                }
            }
            c += 16;
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*a);
                for t in vk..k {
                    s += w.get((o + r) * k + t) * x[(i + j) * k + t];
                }
                yt[(o + r) * m + i + j] = s;
            }
        }
    }
}

// ---------------------------------------------------------------- AdamW, in place

/// One AdamW update of `theta` in place, with its moments `m` and `v` updated in place from
/// gradient `g` (each multiplied by `grad_scale` first). `bias1`/`bias2` are 1 − βᵗ; `decay` the
/// factor theta is multiplied by first (1 − lr·weight_decay, or 1).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    grad_scale: f64,
    (beta1, beta2): (f64, f64),
    (bias1, bias2): (f64, f64),
    lr: f64,
    eps: f64,
    decay: f64,
) -> Result<()> {
    let g = f32_contiguous(g)?;
    if g.shape() != theta.shape() {
        bail!("adamw: gradient {:?} for a parameter of {:?}", g.shape(), theta.shape());
    }
    let s = grad_scale as f32;
    m.inplace_op2(&g, &Moment { beta: beta1 as f32, scale: s, squared: false })?;
    v.inplace_op2(&g, &Moment { beta: beta2 as f32, scale: s, squared: true })?;
    theta.inplace_op3(
        m,
        v,
        &AdamUpdate { lr: lr as f32, eps: eps as f32, bias1: bias1 as f32, bias2: bias2 as f32, decay: decay as f32 },
    )
}

/// m ← β·m + (1 − β)·(s·g), or with (s·g)² when `squared`.
struct Moment {
    beta: f32,
    scale: f32,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "kdllm-adam-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (m, g) = (f32s_mut(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (b, s, sq) = (self.beta, self.scale, self.squared);
        m.par_chunks_mut(1 << 16).zip(g.par_chunks(1 << 16)).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                let g = s * g;
                *m = b * *m + (1.0 - b) * if sq { g * g } else { g };
            }
        });
        Ok(())
    }
}

/// θ ← decay·θ − lr·(m / bias1) / (sqrt(v / bias2) + eps)
struct AdamUpdate {
    lr: f32,
    eps: f32,
    bias1: f32,
    bias2: f32,
    decay: f32,
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "kdllm-adam-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let theta = f32s_mut(s1, l1, self.name())?;
        let (m, v) = (f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let c = 1 << 16;
        theta.par_chunks_mut(c).zip(m.par_chunks(c)).zip(v.par_chunks(c)).for_each(|((th, m), v)| {
            for ((th, &m), &v) in th.iter_mut().zip(m).zip(v) {
                *th = self.decay * *th - self.lr * (m / self.bias1) / ((v / self.bias2).sqrt() + self.eps);
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values without a RNG dependency: a scrambled sine.
        let n: usize = shape.iter().product();
        let v: Vec<f32> =
            (0..n).map(|i| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract() * 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Checks a fused op against the composed candle ops: same value, and the same gradients of
    /// `Σ out·w` (w a fixed random weighting) for each input.
    fn check<F, G>(inputs: &[Tensor], fused: F, composed: G, tol: f32)
    where
        F: Fn(&[Tensor]) -> Tensor,
        G: Fn(&[Tensor]) -> Tensor,
    {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&ts), composed(&ts));
        assert_eq!(a.shape(), b.shape());
        assert!(max_diff(&a, &b) < tol, "values differ by {}", max_diff(&a, &b));
        let w = randn(a.dims(), 99);
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (x, y) = (ga.get(v).expect("fused gradient"), gb.get(v).expect("composed gradient"));
            assert!(max_diff(x, y) < tol, "gradient of input {i} differs by {}", max_diff(x, y));
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        let composed = |t: &[Tensor]| {
            let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            t[0].broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&t[1]).unwrap()
        };
        // Large enough to take the parallel path too.
        for rows in [3, 300] {
            check(
                &[randn(&[rows, 128], 1), randn(&[128], 2)],
                |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
                composed,
                1e-4,
            );
        }
    }

    #[test]
    fn log_softmax_and_nll_match_composed() {
        let z = randn(&[7, 300], 4);
        check(
            std::slice::from_ref(&z),
            |t| log_softmax(&t[0], 0.5).unwrap(),
            |t| candle_nn::ops::log_softmax(&(&t[0] * 0.5).unwrap(), D::Minus1).unwrap(),
            1e-5,
        );
        let y = Tensor::new(&[0u32, 5, 299, 17, 3, 3, 100], &Device::Cpu).unwrap();
        let y2 = y.clone();
        check(
            &[z],
            move |t| nll_rows(&t[0], &y).unwrap(),
            move |t| {
                let lp = candle_nn::ops::log_softmax(&t[0], D::Minus1).unwrap();
                lp.gather(&y2.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap().neg().unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn nll_refuses_targets_outside_the_vocabulary() {
        let err = nll_rows(&randn(&[2, 4], 1), &Tensor::new(&[1u32, 4], &Device::Cpu).unwrap()).unwrap_err();
        assert!(err.to_string().contains("target id 4"), "{err}");
    }

    #[test]
    fn rope_matches_rotate_half() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = randn(&[b, t, h, d], 5);
        let ang = randn(&[b, t, d], 6);
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let (c2, s2) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
        let composed = move |ts: &[Tensor]| {
            let x = ts[0].transpose(1, 2).unwrap();
            let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
            let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
            let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (x.broadcast_mul(&c2).unwrap() + rot.broadcast_mul(&s2).unwrap()).unwrap()
        };
        check(&[x], |ts| rope(&ts[0], &cos, &sin).unwrap(), composed, 1e-5);
    }

    #[test]
    fn silu_mul_matches_composed() {
        check(
            &[randn(&[4, 33], 7), randn(&[4, 33], 8)],
            |t| silu_mul(&t[0], &t[1]).unwrap(),
            |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn adamw_step_matches_the_formula() {
        let theta = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let (m, v) = (
            Tensor::new(&[0.1f32, 0.0, -0.2], &Device::Cpu).unwrap(),
            Tensor::new(&[0.01f32, 0.0, 0.04], &Device::Cpu).unwrap(),
        );
        let g = Tensor::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap();
        let (b1, b2, lr, eps, decay, scale) = (0.9f32, 0.99f32, 0.1f32, 1e-8f32, 0.95f32, 0.5f32);
        let (bc1, bc2) = (1.0 - b1 * b1, 1.0 - b2 * b2);
        let (th0, m0, v0, g0) = (
            theta.to_vec1::<f32>().unwrap(),
            m.to_vec1::<f32>().unwrap(),
            v.to_vec1::<f32>().unwrap(),
            g.to_vec1::<f32>().unwrap(),
        );
        adamw_step(
            &theta,
            &m,
            &v,
            &g,
            scale as f64,
            (b1 as f64, b2 as f64),
            (bc1 as f64, bc2 as f64),
            lr as f64,
            eps as f64,
            decay as f64,
        )
        .unwrap();
        let (th, m1, v1) = (theta.to_vec1::<f32>().unwrap(), m.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
        for i in 0..3 {
            let gs = g0[i] * scale;
            let em = b1 * m0[i] + (1.0 - b1) * gs;
            let ev = b2 * v0[i] + (1.0 - b2) * gs * gs;
            let et = decay * th0[i] - lr * (em / bc1) / ((ev / bc2).sqrt() + eps);
            assert!(
                (m1[i] - em).abs() < 1e-6 && (v1[i] - ev).abs() < 1e-6 && (th[i] - et).abs() < 1e-6,
                "{i}: {th:?} {m1:?} {v1:?}"
            );
        }
    }
    #[test]
    fn few_row_matmul_matches_the_gemm() {
        // Odd sizes exercise every tile shape and the scalar tail of K.
        for (m, k, n) in [(1, 40, 9), (3, 37, 130), (8, 512, 1536), (7, 64, 70)] {
            let x = randn(&[m, k], 11);
            let w = randn(&[n, k], 12);
            let Some(y) = matmul_few_rows(&x, &w).unwrap() else {
                eprintln!("no AVX-512 here: the GEMM is used instead");
                return;
            };
            let reference = x.matmul(&w.t().unwrap()).unwrap();
            assert!(max_diff(&y, &reference) < 1e-3, "{m}x{k}x{n}: {}", max_diff(&y, &reference));
            // bf16 weights: exactly the f32 product of the rounded weights, in x's dtype.
            let wb = w.to_dtype(DType::BF16).unwrap();
            let y = matmul_few_rows(&x, &wb).unwrap().unwrap();
            let reference = x.matmul(&wb.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            assert!(max_diff(&y, &reference) < 1e-3, "bf16 {m}x{k}x{n}: {}", max_diff(&y, &reference));
            let yb = matmul_few_rows(&x.to_dtype(DType::BF16).unwrap(), &wb).unwrap().unwrap();
            assert_eq!(yb.dtype(), DType::BF16);
        }
        assert!(matmul_few_rows(&randn(&[FEW_ROWS + 1, 8], 1), &randn(&[4, 8], 2)).unwrap().is_none());
    }

    #[test]
    fn decode_attention_matches_the_composed_attention() {
        // 2 rows, 4 query heads over 2 kv heads, 5 cached positions; keys and values are
        // strided views of a larger buffer, as the KV cache hands them out.
        let (b, h, kh, s, d) = (2, 4, 2, 5, 8);
        let q = randn(&[b, h, 1, d], 20);
        let k = randn(&[b, kh, 7, d], 21).narrow(2, 0, s).unwrap();
        let v = randn(&[b, kh, 7, d], 22).narrow(2, 0, s).unwrap();
        let mut m = vec![0f32; b * s];
        m[s] = -1e9; // row 1 is left-padded by one position
        let mask = Tensor::from_vec(m, (b, 1, 1, s), &Device::Cpu).unwrap();
        let got = decode_attention(&q, &k, &v, 0.25, Some(&mask)).unwrap();
        let rep =
            |t: &Tensor| t.unsqueeze(2).unwrap().repeat((1, 1, h / kh, 1, 1)).unwrap().reshape((b, h, s, d)).unwrap();
        let scores = (q.matmul(&rep(&k).t().unwrap()).unwrap() * 0.25).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&rep(&v)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    }

    #[test]
    fn attention_matches_composed_with_grouped_heads_and_a_mask() {
        let (b, h, kh, t, d) = (2, 4, 2, 5, 8);
        let mut m = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j == 0 && i != 0) {
                        m[(bi * t + i) * t + j] = -1e9; // causal; row 1 left-padded by one
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap();
        let mk = mask.clone();
        let composed = move |ts: &[Tensor]| {
            let rep = |x: &Tensor| {
                x.unsqueeze(2).unwrap().repeat((1, 1, h / kh, 1, 1)).unwrap().reshape((b, h, t, d)).unwrap()
            };
            let scores = (ts[0].matmul(&rep(&ts[1]).t().unwrap()).unwrap() * 0.3).unwrap().broadcast_add(&mk).unwrap();
            let out = candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&rep(&ts[2])).unwrap();
            out.transpose(1, 2).unwrap().contiguous().unwrap()
        };
        check(
            &[randn(&[b, h, t, d], 30), randn(&[b, kh, t, d], 31), randn(&[b, kh, t, d], 32)],
            |ts| attention(&ts[0], &ts[1], &ts[2], 0.3, Some(&mask)).unwrap(),
            composed,
            1e-4,
        );
    }
}
