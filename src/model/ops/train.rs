//! The fused ops training spends its time in, each with a hand-written backward.

use super::*;

// ---------------------------------------------------------------- RMSNorm

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension of x; w has that dimension's size.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused(x) {
        return generic::rms_norm(x, w, eps);
    }
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

// ---------------------------------------------------------------- log-softmax and cross-entropy

/// `log_softmax(x · scale)` over the last dimension.
pub fn log_softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    if !fused(x) {
        return generic::log_softmax(x, scale);
    }
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
    if !fused(logits) {
        return generic::nll_rows(logits, targets);
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
    if !fused(x) {
        return generic::rope(x, cos, sin);
    }
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
    if !fused(gate) {
        return generic::silu_mul(gate, up);
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
    if !fused(q) {
        return generic::attention(q, k, v, scale, mask);
    }
    let (q, k, v) = (f32_contiguous(q)?, f32_contiguous(k)?, f32_contiguous(v)?);
    q.apply_op3(&k, &v, Attention { scale: scale as f32, mask: mask_values(mask)? })
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
