//! One weight row · one quantized activation row, per block format and [`simd::Level`].
//!
//! The byte products are summed exactly in int32 on every path; only the order of the f32
//! accumulation of the block sums differs between paths (never between batches).

use super::{QFormat, QK};
use crate::model::ops::simd;

/// An activation row in blocks of [`QK`]: `x ≈ d·q`, `s = d·Σq`.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub q: &'a [i8],
}

pub type Dot = fn(&[u8], ActRow) -> f32;

/// The dot product for `format` on the path `level`.
pub fn dot(format: QFormat, level: simd::Level) -> Dot {
    #[cfg(target_arch = "x86_64")]
    match (format, level) {
        (QFormat::Q8_0, simd::Level::Avx512) => return |w, a| unsafe { q8_0_avx512(w, a) },
        (QFormat::Q4_1, simd::Level::Avx512) => return |w, a| unsafe { q4_1_avx512(w, a) },
        // SAFETY (all four): the level never exceeds what the CPU has (simd::detected).
        (QFormat::Q8_0, simd::Level::Avx2) => return |w, a| unsafe { q8_0_avx2(w, a) },
        (QFormat::Q4_1, simd::Level::Avx2) => return |w, a| unsafe { q4_1_avx2(w, a) },
        _ => {}
    }
    match format {
        QFormat::Q8_0 => q8_0_scalar,
        QFormat::Q4_1 => q4_1_scalar,
    }
}

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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_avx2(w: &[u8], a: ActRow) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for b in 0..a.d.len() {
        let p = w.as_ptr().add(b * (2 + QK));
        let wq = _mm256_loadu_si256(p.add(2) as *const __m256i);
        let xq = _mm256_loadu_si256(a.q.as_ptr().add(b * QK) as *const __m256i);
        let scale = _mm_cvtss_f32(halves(p)) * a.d[b];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8_256(wq, xq)), _mm256_set1_ps(scale), acc);
    }
    hsum256(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_avx2(w: &[u8], a: ActRow) -> f32 {
    let (mut acc, mut offsets) = (_mm256_setzero_ps(), 0f32);
    for b in 0..a.d.len() {
        let p = w.as_ptr().add(b * (4 + QK / 2));
        let xq = _mm256_loadu_si256(a.q.as_ptr().add(b * QK) as *const __m256i);
        let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles256(p.add(4)), xq), _mm256_set1_epi16(1));
        let dm = halves(p);
        let scale = _mm_cvtss_f32(dm) * a.d[b];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), acc);
        offsets += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * a.s[b];
    }
    hsum256(acc) + offsets
}

/// Two blocks' scales as one vector: `lo` in lanes 0–7, `hi` in lanes 8–15.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scales512(lo: f32, hi: f32) -> __m512 {
    let v = _mm512_castps256_ps512(_mm256_set1_ps(lo));
    _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(v), _mm256_castps_pd(_mm256_set1_ps(hi)), 1))
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

/// Two blocks per step in 512-bit registers; an odd last block as on AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q8_0_avx512(w: &[u8], a: ActRow) -> f32 {
    const BB: usize = 2 + QK;
    let (n, mut acc) = (a.d.len(), _mm512_setzero_ps());
    let ones = _mm512_set1_epi16(1);
    let mut b = 0;
    while b + 2 <= n {
        let p = w.as_ptr().add(b * BB);
        let wq = join512(
            _mm256_loadu_si256(p.add(2) as *const __m256i),
            _mm256_loadu_si256(p.add(BB + 2) as *const __m256i),
        );
        let xq = _mm512_loadu_si512(a.q.as_ptr().add(b * QK) as *const _);
        let aw = _mm512_abs_epi8(wq);
        // x with w's sign: negate where w < 0.
        let neg = _mm512_movepi8_mask(wq);
        let sx = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
        let sums = _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), ones);
        let scale = scales512(_mm_cvtss_f32(halves(p)) * a.d[b], _mm_cvtss_f32(halves(p.add(BB))) * a.d[b + 1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc);
        b += 2;
    }
    let mut sum = hsum512(acc);
    if b < n {
        let tail = ActRow { d: &a.d[b..], s: &a.s[b..], q: &a.q[b * QK..] };
        sum += q8_0_avx2(&w[b * BB..], tail);
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q4_1_avx512(w: &[u8], a: ActRow) -> f32 {
    const BB: usize = 4 + QK / 2;
    let (n, mut acc, mut offsets) = (a.d.len(), _mm512_setzero_ps(), 0f32);
    let ones = _mm512_set1_epi16(1);
    let mut b = 0;
    while b + 2 <= n {
        let p = w.as_ptr().add(b * BB);
        let wq = join512(nibbles256(p.add(4)), nibbles256(p.add(BB + 4)));
        let xq = _mm512_loadu_si512(a.q.as_ptr().add(b * QK) as *const _);
        let sums = _mm512_madd_epi16(_mm512_maddubs_epi16(wq, xq), ones);
        let (dm0, dm1) = (halves(p), halves(p.add(BB)));
        let scale = scales512(_mm_cvtss_f32(dm0) * a.d[b], _mm_cvtss_f32(dm1) * a.d[b + 1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc);
        offsets += _mm_cvtss_f32(_mm_movehdup_ps(dm0)) * a.s[b] + _mm_cvtss_f32(_mm_movehdup_ps(dm1)) * a.s[b + 1];
        b += 2;
    }
    let mut sum = hsum512(acc) + offsets;
    if b < n {
        let tail = ActRow { d: &a.d[b..], s: &a.s[b..], q: &a.q[b * QK..] };
        sum += q4_1_avx2(&w[b * BB..], tail);
    }
    sum
}
