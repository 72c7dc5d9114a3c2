//! Fused CPU kernels: with a hand-written backward for the ops training spends its time in,
//! forward-only ones for decoding (few-row matmul, one-token attention), and AdamW in place.
//! On any other device each op runs its composition of candle primitives ([`generic`]) instead.
//!
//! candle's own fused RMSNorm, softmax and RoPE have no backward, and their differentiable
//! compositions allocate and sweep one tensor per elementary op (page faults and memory
//! traffic, not FLOPs, then dominate a small model). Each op here makes one pass forward and
//! one backward. Inputs are f32; callers cast other dtypes. Non-contiguous inputs are copied.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout};
use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    static GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the device-generic ops ([`generic`], what a GPU runs) on this thread even for
/// CPU tensors: how the tests check the GPU's code path on a machine without one.
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    let before = GENERIC.replace(true);
    let out = f();
    GENERIC.set(before);
    out
}

/// Whether `t` takes the fused CPU kernels.
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && !GENERIC.get()
}

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

// ---------------------------------------------------------------- softmax

/// `x.exp()`, with the 0 that it rounds to below −104 given at once: libm takes a slow
/// underflow path there, and masked scores (−1e9) are half of a causal softmax's (that path was
/// ~3% of a training step).
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    if x < -104.0 {
        0.0
    } else {
        x.exp()
    }
}

/// Softmax of one row, in place. Inlined so that it runs with its caller's target features.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for &v in row.iter() {
        max = max.max(v);
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp_or_zero(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// An additive mask's values, flat, for the attention kernels to index.
fn mask_values(mask: Option<&Tensor>) -> Result<Option<Arc<Vec<f32>>>> {
    mask.map(|m| Ok(Arc::new(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))).transpose()
}

mod adamw;
mod bf16_gemm;
mod decode;
pub mod generic;
pub mod simd;
pub mod team;
#[cfg(test)]
mod tests;
mod train;

pub use adamw::{adamw_step, AdamwStep};
pub use bf16_gemm::{bf16_gemm_available, linear_bf16};
pub use decode::{decode_attention, matmul_few_rows, FEW_ROWS};
pub use train::{attention, log_softmax, nll_rows, rms_norm, rope, silu_mul};
