//! Training's projections as bf16 GEMMs on CPUs with avx512_bf16: the f32 operands are rounded
//! to bf16 as they are packed, and `vdpbf16ps` sums pairs of their products into f32 lanes (twice
//! the multiply-adds of an f32 FMA per instruction, half the bytes per operand). Weights,
//! activations and gradients stay f32; only the products' inputs are rounded, as in PyTorch's
//! bf16 autocast. Each output element sums its k in one fixed order whatever the thread count,
//! so a run is deterministic and a resumed one bit-identical.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_contiguous, f32s, simd};

/// Whether the bf16 GEMM runs for tensors on `device`: a CPU with AVX-512 F and BF16, at the
/// AVX-512 kernel path (`KDLLM_SIMD=avx2` turns it off).
pub fn bf16_gemm_available(device: &candle_core::Device) -> bool {
    device.is_cpu() && !super::GENERIC.get() && simd::level() == simd::Level::Avx512 && cpu_has_bf16()
}

fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x · wᵀ` for x (…, K) and w (N, K), both f32, with the products' inputs rounded to bf16 and
/// f32 sums; differentiable in both (the backward runs the same kernel). Where the kernel does
/// not run ([`bf16_gemm_available`]), the f32 product.
pub fn linear_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !bf16_gemm_available(x.device()) {
        return x.broadcast_matmul(&w.t()?);
    }
    let (k, n) = (x.dim(candle_core::D::Minus1)?, w.dim(0)?);
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / k.max(1);
    let y = f32_contiguous(&x.reshape((rows, k))?)?.apply_op2(&f32_contiguous(w)?, Linear)?;
    *dims.last_mut().expect("x has a last dim") = n;
    y.reshape(dims)
}

/// y (M, N) = x (M, K) · wᵀ, w (N, K).
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "kdllm-linear-bf16"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (&[m, k], &[n, k2]) = (l1.dims(), l2.dims()) else { bail!("linear_bf16: needs 2-D operands") };
        if k != k2 {
            bail!("linear_bf16: x has {k} columns, w {k2}");
        }
        let y = gemm(m, n, k, View { data: x, rs: k, cs: 1 }, View { data: w, rs: 1, cs: k });
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = f32_contiguous(dy)?;
        let dx = dy.apply_op2_no_bwd(w, &Grad::Input)?;
        let dw = dy.apply_op2_no_bwd(x, &Grad::Weight)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The two products of [`Linear`]'s backward, from dy (M, N): dx = dy · w (M, K) with the second
/// operand w (N, K), and dw = dyᵀ · x (N, K) with the second operand x (M, K).
enum Grad {
    Input,
    Weight,
}

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        "kdllm-linear-bf16-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dy, other) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (&[m, n], &[r, k]) = (l1.dims(), l2.dims()) else { bail!("linear_bf16: needs 2-D operands") };
        Ok(match self {
            Grad::Input if r == n => {
                let dx = gemm(m, k, n, View { data: dy, rs: n, cs: 1 }, View { data: other, rs: k, cs: 1 });
                (CpuStorage::F32(dx), Shape::from((m, k)))
            }
            Grad::Weight if r == m => {
                let dw = gemm(n, k, m, View { data: dy, rs: 1, cs: n }, View { data: other, rs: k, cs: 1 });
                (CpuStorage::F32(dw), Shape::from((n, k)))
            }
            _ => bail!("linear_bf16: gradient shapes do not match"),
        })
    }
}

/// A matrix operand: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl View<'_> {
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// Rows of C per micro-tile and columns (two 16-lane registers): 14 × 2 accumulators.
const MR: usize = 14;
const NR: usize = 32;
/// k-pairs per packed panel: a (KC × NR) slice of B stays in L1 while MC / MR tiles stream by.
const KC: usize = 192;
/// Rows of C per task.
const MC: usize = MR * 8;

/// f32 → bf16, rounding to nearest even (NaN stays NaN).
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if v.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// The (rows, k) matrix `v` as strips of `width` rows: for each k-pair p, `width` words
/// (v[i, 2p], v[i, 2p+1]) in bf16; rows past the end and the odd k's partner are zero. A is
/// packed in strips of MR rows, B as Bᵀ in strips of NR columns.
fn pack(v: View, rows: usize, k: usize, width: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; rows.div_ceil(width) * kp * width];
    out.par_chunks_mut(kp * width).enumerate().for_each(|(s, strip)| {
        let here = width.min(rows - s * width);
        let put = |strip: &mut [u32], r: usize, p: usize| {
            let i = s * width + r;
            let hi = if 2 * p + 1 < k { v.at(i, 2 * p + 1) } else { 0.0 };
            strip[p * width + r] = pair(v.at(i, 2 * p), hi);
        };
        // Read along whichever way the operand lies in memory.
        if v.cs <= v.rs {
            (0..here).for_each(|r| (0..kp).for_each(|p| put(strip, r, p)));
        } else {
            (0..kp).for_each(|p| (0..here).for_each(|r| put(strip, r, p)));
        }
    });
    out
}

/// C (m, n) = A (m, k) · B (k, n), bf16 products summed in f32. The caller has checked
/// [`bf16_gemm_available`].
fn gemm(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let (pa, pb) = (pack(a, m, k, MR), pack(View { data: b.data, rs: b.cs, cs: b.rs }, n, k, NR));
    let kp = k.div_ceil(2);
    c.par_chunks_mut(MC * n).enumerate().for_each(|(task, rows)| {
        let rows_here = rows.len() / n;
        let mut tile = [0f32; MR * NR];
        for p0 in (0..kp).step_by(KC) {
            let pk = KC.min(kp - p0);
            for js in 0..n.div_ceil(NR) {
                let bs = &pb[js * kp * NR + p0 * NR..][..pk * NR];
                let cols = NR.min(n - js * NR);
                for is in 0..rows_here.div_ceil(MR) {
                    let strip = task * (MC / MR) + is;
                    let as_ = &pa[strip * kp * MR + p0 * MR..][..pk * MR];
                    let r = MR.min(rows_here - is * MR);
                    let at = is * MR * n + js * NR;
                    if r == MR && cols == NR {
                        // SAFETY: the caller checked the CPU; the tile's MR rows of NR columns
                        // from `at` lie inside `rows` (a full tile), the strips hold pk pairs.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            kernel(pk, as_.as_ptr(), bs.as_ptr(), rows.as_mut_ptr().add(at), n)
                        };
                    } else {
                        for rr in 0..r {
                            tile[rr * NR..rr * NR + cols].copy_from_slice(&rows[at + rr * n..][..cols]);
                        }
                        // SAFETY: as above, into the local MR × NR tile.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            kernel(pk, as_.as_ptr(), bs.as_ptr(), tile.as_mut_ptr(), NR)
                        };
                        for rr in 0..r {
                            rows[at + rr * n..][..cols].copy_from_slice(&tile[rr * NR..rr * NR + cols]);
                        }
                    }
                }
            }
        }
    });
    c
}

/// C tile (MR × NR at `c`, row stride `ldc`) += A strip · B strip over `kp` k-pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(kp: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const __m512i));
        let ap = a.add(p * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        _mm512_storeu_ps(row, _mm512_add_ps(_mm512_loadu_ps(row), acc[0]));
        _mm512_storeu_ps(row.add(16), _mm512_add_ps(_mm512_loadu_ps(row.add(16)), acc[1]));
    }
}
