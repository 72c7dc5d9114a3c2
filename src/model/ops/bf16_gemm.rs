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

/// A matrix operand: element (i, j) at `data[i·rs + j·cs]`, with `cs == 1` or `rs == 1` (every
/// operand of the products above lies one of the two ways).
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// Rows of C per micro-tile and columns (two 16-lane registers): 14 × 2 accumulators.
const MR: usize = 14;
const NR: usize = 32;
/// k-pairs per packed panel: a (KC × NR) slice of B stays in L1 while MC / MR tiles stream by.
const KC: usize = 192;
/// Rows of C per task.
const MC: usize = MR * 8;

/// The (rows, k) matrix `v` as strips of `width` rows: for each k-pair p, `width` words
/// (v[i, 2p], v[i, 2p+1]) in bf16, rounded to nearest even; rows past the end and the odd k's
/// partner are zero. A is packed in strips of MR rows, B as Bᵀ in strips of NR columns.
fn pack(v: View, rows: usize, k: usize, width: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; rows.div_ceil(width) * kp * width];
    // Read by columns, a task takes strips enough to make whole 16-row vectors (8 of 14 rows),
    // so each cache line of a column is read once.
    let by_rows = v.cs == 1;
    let group = if by_rows { 1 } else { 16 / gcd(width, 16) };
    out.par_chunks_mut(group * kp * width).enumerate().for_each(|(g, chunk)| {
        let i0 = g * group * width;
        let here = (group * width).min(rows - i0);
        // SAFETY: the GEMM runs only where `bf16_gemm_available` found AVX-512 (F and BW).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if by_rows {
                pack_rows(v, i0, here, k, width, chunk)
            } else {
                pack_columns(v, i0, here, k, width, chunk)
            }
        };
    });
    out
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The lowest `n` of 16 lanes.
fn lanes(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// Rows `i0..i0 + here` of `v` (a strip's, each row's k values together) into `strip`: 32
/// values make 16 words, which go down a column of the strip. (A scalar loop here was 16% of a
/// bf16 training step.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rows(v: View, i0: usize, here: usize, k: usize, width: usize, strip: &mut [u32]) {
    use std::arch::x86_64::*;
    static HIGH_HALVES: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut j = 0;
        while j < 32 {
            idx[j] = 2 * j as u16 + 1;
            j += 1;
        }
        idx
    };
    let kp = k.div_ceil(2);
    let high = _mm512_loadu_si512(HIGH_HALVES.as_ptr().cast());
    let mut words = [0u32; 16];
    for r in 0..here {
        let row = &v.data[(i0 + r) * v.rs..][..k];
        for p0 in (0..kp).step_by(16) {
            let left = k - 2 * p0;
            // Masked lanes are neither read nor faulted on.
            let x0 = _mm512_maskz_loadu_ps(lanes(left), row.as_ptr().wrapping_add(2 * p0));
            let x1 = _mm512_maskz_loadu_ps(lanes(left.saturating_sub(16)), row.as_ptr().wrapping_add(2 * p0 + 16));
            let pairs = _mm512_permutex2var_epi16(round_bf16(x0), high, round_bf16(x1));
            _mm512_storeu_si512(words.as_mut_ptr().cast(), pairs);
            for (j, &word) in words[..(kp - p0).min(16)].iter().enumerate() {
                strip[(p0 + j) * width + r] = word;
            }
        }
    }
}

/// Rows `i0..i0 + here` of `v` (each column's values together, `rs == 1`) into the strips of
/// `chunk`: two columns make one k-pair's words for 16 rows at once, stored strip by strip.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_columns(v: View, i0: usize, here: usize, k: usize, width: usize, chunk: &mut [u32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(v.rs, 1);
    let kp = k.div_ceil(2);
    let top = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for p in 0..kp {
        let lo = &v.data[2 * p * v.cs + i0..][..here];
        let hi = (2 * p + 1 < k).then(|| &v.data[(2 * p + 1) * v.cs + i0..][..here]);
        for r0 in (0..here).step_by(16) {
            let n = (here - r0).min(16);
            let lo = round_bf16(_mm512_maskz_loadu_ps(lanes(n), lo.as_ptr().add(r0)));
            let hi = match hi {
                Some(hi) => round_bf16(_mm512_maskz_loadu_ps(lanes(n), hi.as_ptr().add(r0))),
                None => _mm512_setzero_si512(),
            };
            let pairs = _mm512_or_si512(_mm512_srli_epi32::<16>(lo), _mm512_and_si512(hi, top));
            // Lane l is row r0 + l; each strip's lanes land together at its k-pair p.
            let mut r = r0;
            while r < r0 + n {
                let (t, end) = (r / width, ((r / width + 1) * width).min(r0 + n));
                let lane0 = t * kp * width + p * width + r % width - (r - r0);
                let mask = lanes(end - r0) & !lanes(r - r0);
                debug_assert!(lane0 + end - r0 <= chunk.len());
                _mm512_mask_storeu_epi32(chunk.as_mut_ptr().wrapping_add(lane0).cast(), mask, pairs);
                r = end;
            }
        }
    }
}

/// Each lane's bf16, rounded to nearest even, in its high 16 bits (NaN stays NaN, quieted).
/// Integer arithmetic rather than `vcvtne2ps2bf16`, which flushes subnormals to zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_bf16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(x);
    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x40 << 16)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 → bf16 bits, rounding to nearest even, one value at a time.
    fn bf16_bits(v: f32) -> u32 {
        let b = v.to_bits();
        if v.is_nan() {
            return (b >> 16) | 0x40;
        }
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    }

    #[test]
    fn packing_rounds_every_value_as_the_scalar_rule_does() {
        if !bf16_gemm_available(&candle_core::Device::Cpu) {
            return eprintln!("this CPU has no avx512_bf16: the packing is compiled, not run");
        }
        // Ties both ways, subnormals, infinities, NaNs and ordinary values.
        let special = [
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x8040_7fff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xffc0_1234),
            f32::MAX,
            -0.0,
        ];
        for (rows, k, width) in [(37, 71, MR), (5, 2, NR), (40, 33, NR), (14, 64, MR), (250, 9, MR), (131, 4, NR)] {
            let data: Vec<f32> = (0..rows * k)
                .map(|i| if i % 7 == 3 { special[i % special.len()] } else { (i as f32 * 0.731).sin() * 3.0 })
                .collect();
            let at = |i: usize, j: usize| data[i * k + j];
            let kp = k.div_ceil(2);
            let mut expected = vec![0u32; rows.div_ceil(width) * kp * width];
            for i in 0..rows {
                for p in 0..kp {
                    let hi = if 2 * p + 1 < k { bf16_bits(at(i, 2 * p + 1)) } else { 0 };
                    expected[(i / width) * kp * width + p * width + i % width] = bf16_bits(at(i, 2 * p)) | (hi << 16);
                }
            }
            let by_rows = pack(View { data: &data, rs: k, cs: 1 }, rows, k, width);
            assert_eq!(by_rows, expected, "{rows}x{k} in strips of {width}, rows contiguous");
            let transposed: Vec<f32> = (0..k * rows).map(|t| at(t % rows, t / rows)).collect();
            let by_columns = pack(View { data: &transposed, rs: 1, cs: rows }, rows, k, width);
            assert_eq!(by_columns, expected, "{rows}x{k} in strips of {width}, columns contiguous");
        }
    }
}
