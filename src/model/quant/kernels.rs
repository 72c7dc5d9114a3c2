//! One weight row · one quantized activation row, per block format and [`simd::Level`].
//!
//! The byte products are summed exactly in int32 on every path; only the order of the f32
//! accumulation of the block sums differs between paths (never between batches).

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

impl<'a> ActRow<'a> {
    /// The row from block `b` on.
    fn skip_blocks(&self, b: usize) -> ActRow<'a> {
        let (d8, s8) = (&self.d8[8 * b..], &self.s8[8 * b..]);
        ActRow { d: &self.d[b..], s: &self.s[b..], d8, s8, q: &self.q[b * QK..] }
    }
}

/// `out[i] = w · a[i]` for one weight row and any number of activation rows.
pub type Dot = fn(&[u8], &[ActRow], &mut [f32]);

/// The product for `format` on the path `level`.
pub fn dot(format: QFormat, level: simd::Level) -> Dot {
    #[cfg(target_arch = "x86_64")]
    match (format, level) {
        (QFormat::Q8_0, simd::Level::Avx512) => return tiles!(q8_0_avx512),
        (QFormat::Q4_1, simd::Level::Avx512) => return tiles!(q4_1_avx512),
        (QFormat::Q8_0, simd::Level::Avx2) => return tiles!(q8_0_avx2),
        (QFormat::Q4_1, simd::Level::Avx2) => return tiles!(q4_1_avx2),
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

/// The block's f16 scale (and offset) at `p` as f32, through F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn halves(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// 32 nibbles of a Q4_1 block as bytes: values 0–15 of the block in the low lane, 16–31 high.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles256(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0xf))
}

/// Signed bytes w·x summed in pairs then in fours: eight int32 sums. `maddubs` multiplies
/// unsigned by signed, so |w| meets x with w's sign (ggml's trick; |w| ≤ 127 fits).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_i8_256(w: __m256i, x: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

// The vector kernels accumulate, per activation row, `cvt(Σ w·x) · d_w · d_x` (and for Q4_1
// `m_w · s_x / 8` in each of eight lanes) into one f32 vector, summed across lanes at the end.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..a[0].d.len() {
        let p = w.as_ptr().add(b * (2 + QK));
        let wq = _mm256_loadu_si256(p.add(2) as *const __m256i);
        let dw = _mm256_set1_ps(_mm_cvtss_f32(halves(p)));
        for r in 0..R {
            let xq = _mm256_loadu_si256(a[r].q.as_ptr().add(b * QK) as *const __m256i);
            let sums = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_i8_256(wq, xq)), dw);
            acc[r] = _mm256_fmadd_ps(sums, _mm256_loadu_ps(a[r].d8.as_ptr().add(8 * b)), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_avx2<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
    let mut acc = [_mm256_setzero_ps(); R];
    let ones = _mm256_set1_epi16(1);
    for b in 0..a[0].d.len() {
        let p = w.as_ptr().add(b * (4 + QK / 2));
        let wq = nibbles256(p.add(4));
        let dm = halves(p);
        let (dw, mw) = (_mm256_broadcastss_ps(dm), _mm256_broadcastss_ps(_mm_movehdup_ps(dm)));
        for r in 0..R {
            let xq = _mm256_loadu_si256(a[r].q.as_ptr().add(b * QK) as *const __m256i);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), ones);
            let sums = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), dw);
            acc[r] = _mm256_fmadd_ps(sums, _mm256_loadu_ps(a[r].d8.as_ptr().add(8 * b)), acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(a[r].s8.as_ptr().add(8 * b)), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum256(acc[r]);
    }
}

/// Two blocks' scales as one vector: `lo` in lanes 0–7, `hi` in lanes 8–15.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scales512(lo: __m128, hi: __m128) -> __m512 {
    let v = _mm512_castps256_ps512(_mm256_broadcastss_ps(lo));
    _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(v), _mm256_castps_pd(_mm256_broadcastss_ps(hi)), 1))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn join512(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hsum512(v: __m512) -> f32 {
    hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))))
}

/// The rows' blocks from `b` on through the AVX2 kernel, added to `out` (an odd last block).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tail<const R: usize>(
    kernel: unsafe fn(&[u8], &[ActRow], &mut [f32]),
    w: &[u8],
    a: &[ActRow],
    b: usize,
    out: &mut [f32],
) {
    let rest: [ActRow; R] = std::array::from_fn(|r| a[r].skip_blocks(b));
    let mut more = [0f32; R];
    kernel(&w[b * w.len() / a[0].d.len()..], &rest, &mut more);
    for r in 0..R {
        out[r] += more[r];
    }
}

/// Two blocks per step in 512-bit registers; an odd last block as on AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q8_0_avx512<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
    const BB: usize = 2 + QK;
    let (n, mut acc) = (a[0].d.len(), [_mm512_setzero_ps(); R]);
    let ones = _mm512_set1_epi16(1);
    let mut b = 0;
    while b + 2 <= n {
        let p = w.as_ptr().add(b * BB);
        let wq = join512(
            _mm256_loadu_si256(p.add(2) as *const __m256i),
            _mm256_loadu_si256(p.add(BB + 2) as *const __m256i),
        );
        let aw = _mm512_abs_epi8(wq);
        let neg = _mm512_movepi8_mask(wq);
        let dw = scales512(halves(p), halves(p.add(BB)));
        for r in 0..R {
            let xq = _mm512_loadu_si512(a[r].q.as_ptr().add(b * QK) as *const _);
            // x with w's sign: negated where w < 0.
            let sx = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
            let sums = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), ones)), dw);
            acc[r] = _mm512_fmadd_ps(sums, _mm512_loadu_ps(a[r].d8.as_ptr().add(8 * b)), acc[r]);
        }
        b += 2;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]);
    }
    if b < n {
        tail::<R>(q8_0_avx2::<R>, w, a, b, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q4_1_avx512<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
    const BB: usize = 4 + QK / 2;
    let (n, mut acc) = (a[0].d.len(), [_mm512_setzero_ps(); R]);
    let ones = _mm512_set1_epi16(1);
    let mut b = 0;
    while b + 2 <= n {
        let p = w.as_ptr().add(b * BB);
        let wq = join512(nibbles256(p.add(4)), nibbles256(p.add(BB + 4)));
        let (dm0, dm1) = (halves(p), halves(p.add(BB)));
        let dw = scales512(dm0, dm1);
        let mw = scales512(_mm_movehdup_ps(dm0), _mm_movehdup_ps(dm1));
        for r in 0..R {
            let xq = _mm512_loadu_si512(a[r].q.as_ptr().add(b * QK) as *const _);
            let sums = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(wq, xq), ones)), dw);
            acc[r] = _mm512_fmadd_ps(sums, _mm512_loadu_ps(a[r].d8.as_ptr().add(8 * b)), acc[r]);
            acc[r] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(a[r].s8.as_ptr().add(8 * b)), acc[r]);
        }
        b += 2;
    }
    for r in 0..R {
        out[r] = hsum512(acc[r]);
    }
    if b < n {
        tail::<R>(q4_1_avx2::<R>, w, a, b, out);
    }
}
