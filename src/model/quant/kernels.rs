//! One weight row · one quantized activation row, per block format and [`simd::Level`].
//!
//! The byte products are summed exactly in int32 on every path. The AVX2 and AVX-512 paths run
//! one body (AVX-512 multiplies the bytes with VNNI where the CPU has it) and give the same
//! bits; the scalar path adds the block sums in another order. No path's order depends on the
//! batch.

use super::{QFormat, QK};
use crate::model::ops::simd;

/// An activation row in blocks of [`QK`]: `x ≈ d·q`, `s = d·Σq`; `d8` and `s8` hold each block's
/// `d` and `s / 8` eight times over, so a vector kernel loads a block's scale in its lanes.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub d8: &'a [f32],
    pub s8: &'a [f32],
    pub q: &'a [i8],
}

/// `out[i] = w · a[i]` for one weight row and any number of activation rows.
pub type Dot = fn(&[u8], &[ActRow], &mut [f32]);

/// The product for `format` on the path `level`.
pub fn dot(format: QFormat, level: simd::Level) -> Dot {
    #[cfg(target_arch = "x86_64")]
    match (format, level) {
        (QFormat::Q8_0, simd::Level::Avx512) if vnni() => return tiles!(q8_0_vnni),
        (QFormat::Q4_1, simd::Level::Avx512) if vnni() => return tiles!(q4_1_vnni),
        (QFormat::Q8_0, simd::Level::Avx512 | simd::Level::Avx2) => return tiles!(q8_0_avx2),
        (QFormat::Q4_1, simd::Level::Avx512 | simd::Level::Avx2) => return tiles!(q4_1_avx2),
        _ => {}
    }
    match format {
        QFormat::Q8_0 => |w, a, out| a.iter().zip(out).for_each(|(a, o)| *o = q8_0_scalar(w, *a)),
        QFormat::Q4_1 => |w, a, out| a.iter().zip(out).for_each(|(a, o)| *o = q4_1_scalar(w, *a)),
    }
}

/// A vector kernel over `R` activation rows at a time (each weight block is loaded and unpacked
/// once for all of them), called on tiles of 4 and the rest. Each row's accumulator sees the same
/// operations in the same order whatever `R` is: a row's result never depends on its tile.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($kernel:ident) => {
        |w: &[u8], a: &[ActRow], out: &mut [f32]| {
            for (a, out) in a.chunks(4).zip(out.chunks_mut(4)) {
                // SAFETY: `dot` hands out this path only at a level the CPU has (simd::detected).
                unsafe {
                    match a.len() {
                        4 => $kernel::<4>(w, a, out),
                        3 => $kernel::<3>(w, a, out),
                        2 => $kernel::<2>(w, a, out),
                        _ => $kernel::<1>(w, a, out),
                    }
                }
            }
        }
    };
}
#[cfg(target_arch = "x86_64")]
use tiles;

fn half_at(b: &[u8], at: usize) -> f32 {
    super::half_at(b, at)
}

fn q8_0_scalar(w: &[u8], a: ActRow) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(2 + QK).enumerate() {
        let q = &a.q[b * QK..(b + 1) * QK];
        let dot: i32 = block[2..].iter().zip(q).map(|(&w, &x)| (w as i8) as i32 * x as i32).sum();
        sum += half_at(block, 0) * a.d[b] * dot as f32;
    }
    sum
}

fn q4_1_scalar(w: &[u8], a: ActRow) -> f32 {
    let mut sum = 0f32;
    for (b, block) in w.chunks_exact(4 + QK / 2).enumerate() {
        let q = &a.q[b * QK..(b + 1) * QK];
        let dot: i32 = block[4..]
            .iter()
            .enumerate()
            .map(|(j, &v)| (v & 0xf) as i32 * q[j] as i32 + (v >> 4) as i32 * q[j + 16] as i32)
            .sum();
        sum += half_at(block, 0) * a.d[b] * dot as f32 + half_at(block, 2) * a.s[b];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// f32 of every f16 bit pattern (ggml keeps the same table): a block's scale is then one load
/// broadcast straight from memory. Converting it in registers (a move and `vcvtph2ps` per
/// scale, then broadcasts) took more shuffle-port work than the block's products and bounded
/// batch-1 decoding.
fn f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(|b| half::f16::from_bits(b).to_f32()).collect())
}

/// Whether the AVX-512 level multiplies bytes with VNNI (`vpdpbusd`) rather than AVX2's
/// `vpmaddubsw` + `vpmaddwd`; the int32 sums are the same either way.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Unsigned bytes times signed bytes, summed in fours: eight int32 sums (pairs of products fit
/// an i16: |u| ≤ 128 and |s| ≤ 127).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx2(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

/// Runs `step` on blocks 0, 1, 2, … of `n`, even blocks into `acc[0]` and odd into `acc[1]`.
macro_rules! pairs {
    ($n:expr, $acc:ident, $step:ident) => {
        let n = $n;
        let [even, odd] = &mut $acc;
        let mut b = 0;
        while b + 1 < n {
            $step(b, even);
            $step(b + 1, odd);
            b += 2;
        }
        if b < n {
            $step(b, even);
        }
    };
}

/// Q8_0 and Q4_1 kernels for one way of multiplying bytes. One block per 256-bit step; each
/// row keeps two accumulators (even and odd blocks) so that consecutive blocks' FMAs do not
/// wait on each other, and adds them at the end: the same operations whatever `R` is.
macro_rules! block_kernels {
    ($q8:ident, $q4:ident, $feature:literal, $dot:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $q8<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
            const BB: usize = 2 + QK;
            let table = f16_table().as_ptr();
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let step = |b: usize, acc: &mut [__m256; R]| {
                let p = w.as_ptr().add(b * BB);
                let wq = _mm256_loadu_si256(p.add(2) as *const __m256i);
                // |w| meets x with w's sign (ggml's trick for an unsigned-by-signed multiply).
                let aw = _mm256_sign_epi8(wq, wq);
                let dw = _mm256_broadcast_ss(&*table.add((p as *const u16).read_unaligned() as usize));
                for r in 0..R {
                    let xq = _mm256_loadu_si256(a[r].q.as_ptr().add(b * QK) as *const __m256i);
                    let sums = _mm256_cvtepi32_ps($dot(aw, _mm256_sign_epi8(xq, wq)));
                    let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(a[r].d8.as_ptr().add(8 * b)));
                    acc[r] = _mm256_fmadd_ps(sums, scale, acc[r]);
                }
            };
            pairs!(a[0].d.len(), acc, step);
            for r in 0..R {
                out[r] = hsum256(_mm256_add_ps(acc[0][r], acc[1][r]));
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $q4<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
            const BB: usize = 4 + QK / 2;
            let table = f16_table().as_ptr();
            // The 16 bytes twice over; the upper copy shifted down a nibble: values 0–15 of the
            // block in the low half, 16–31 in the high half, with no shuffle.
            let shift = _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0);
            let low = _mm256_set1_epi8(0xf);
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let step = |b: usize, acc: &mut [__m256; R]| {
                let p = w.as_ptr().add(b * BB);
                let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(4) as *const __m128i));
                let wq = _mm256_and_si256(_mm256_srlv_epi32(raw, shift), low);
                let dw = _mm256_broadcast_ss(&*table.add((p as *const u16).read_unaligned() as usize));
                let mw = _mm256_broadcast_ss(&*table.add((p.add(2) as *const u16).read_unaligned() as usize));
                for r in 0..R {
                    let xq = _mm256_loadu_si256(a[r].q.as_ptr().add(b * QK) as *const __m256i);
                    let sums = _mm256_cvtepi32_ps($dot(wq, xq));
                    let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(a[r].d8.as_ptr().add(8 * b)));
                    // The block's terms first, then one add: one dependent op per block.
                    let offset = _mm256_mul_ps(mw, _mm256_loadu_ps(a[r].s8.as_ptr().add(8 * b)));
                    acc[r] = _mm256_add_ps(acc[r], _mm256_fmadd_ps(sums, scale, offset));
                }
            };
            pairs!(a[0].d.len(), acc, step);
            for r in 0..R {
                out[r] = hsum256(_mm256_add_ps(acc[0][r], acc[1][r]));
            }
        }
    };
}

block_kernels!(q8_0_avx2, q4_1_avx2, "avx2,fma", dot_avx2);
block_kernels!(q8_0_vnni, q4_1_vnni, "avx2,fma,avx512vnni,avx512vl", dot_vnni);
