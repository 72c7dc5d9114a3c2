//! One weight row · one quantized activation row, per block format and [`simd::Level`].
//!
//! The byte products are summed exactly in int32 on every path. The AVX2 and AVX-512 paths run
//! one body (AVX-512 multiplies the bytes with VNNI where the CPU has it) and give the same
//! bits; the scalar path adds the block sums in another order. No path's order depends on the
//! batch.

use super::{QFormat, QK};
use crate::model::ops::simd;

/// An activation row in blocks of [`QK`]: `x ≈ d·q`, `s = d·Σq` (zero-padded to whole eights of
/// blocks); `d8` holds each block's `d` eight times over, so a vector kernel loads a block's
/// scale in its lanes.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub d8: &'a [f32],
    pub q: &'a [i8],
}

/// `out[i] = w · a[i]` for one weight row and any number of activation rows.
pub type Dot = fn(&[u8], &[ActRow], &mut [f32]);

/// The product for `format` on the path `level`.
pub fn dot(format: QFormat, level: simd::Level) -> Dot {
    #[cfg(target_arch = "x86_64")]
    match (format, level) {
        (QFormat::Q8_0, simd::Level::Avx512) if vnni() => return tiles!(q8_0_vnni, 8),
        (QFormat::Q4_1, simd::Level::Avx512) if vnni() => return tiles!(q4_1_vnni, 8),
        (QFormat::Q8_0, simd::Level::Avx512 | simd::Level::Avx2) => return tiles!(q8_0_avx2, 4),
        (QFormat::Q4_1, simd::Level::Avx512 | simd::Level::Avx2) => return tiles!(q4_1_avx2, 4),
        _ => {}
    }
    match format {
        QFormat::Q8_0 => |w, a, out| a.iter().zip(out).for_each(|(a, o)| *o = q8_0_scalar(w, *a)),
        QFormat::Q4_1 => |w, a, out| a.iter().zip(out).for_each(|(a, o)| *o = q4_1_scalar(w, *a)),
    }
}

/// A vector kernel over `R` activation rows at a time (each weight block is loaded and unpacked
/// once for all of them), called on tiles of `$tile` (4 or 8) and the rest. Each row's
/// accumulator sees the same operations in the same order whatever `R` is: a row's result never
/// depends on its tile.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($kernel:ident, $tile:literal) => {
        |w: &[u8], a: &[ActRow], out: &mut [f32]| {
            for (a, out) in a.chunks($tile).zip(out.chunks_mut($tile)) {
                // SAFETY: `dot` hands out this path only at a level the CPU has (simd::detected).
                unsafe {
                    match a.len() {
                        8 => $kernel::<8>(w, a, out),
                        7 => $kernel::<7>(w, a, out),
                        6 => $kernel::<6>(w, a, out),
                        5 => $kernel::<5>(w, a, out),
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
    std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
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

/// The Q4_1 offsets' term of each row, `Σ_b m_b·s_b` (the weights' offset times the
/// activations' block sum), eight blocks a lane, into `macc`. Both paths run this same code.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_1_offsets<const R: usize>(w: &[u8], a: &[ActRow], table: *const f32) -> [__m256; R] {
    const BB: usize = 4 + QK / 2;
    let n = a[0].d.len();
    let mut macc = [_mm256_setzero_ps(); R];
    for g in (0..n).step_by(8) {
        let mut m = [0f32; 8];
        for (i, v) in m.iter_mut().enumerate().take(n - g) {
            *v = *table.add((w.as_ptr().add((g + i) * BB + 2) as *const u16).read_unaligned() as usize);
        }
        let m = _mm256_loadu_ps(m.as_ptr());
        for r in 0..R {
            // The activations' sums are zero past the last block.
            macc[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(a[r].s.as_ptr().add(g)), macc[r]);
        }
    }
    macc
}

/// Q8_0 and Q4_1 kernels for one way of multiplying bytes, 256 bits (one block) a step. Each
/// row keeps two accumulators (even and odd blocks) so that consecutive blocks' FMAs do not
/// wait on each other, and adds them at the end: the same operations whatever `R` is.
macro_rules! block_kernels {
    ($q8:ident, $q4:ident, $feature:literal, $dot:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $q8<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
            let table = f16_table().as_ptr();
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let step = |b: usize, acc: &mut [__m256; R]| q8_0_block::<R>(w, a, b, table, acc, |u, s| $dot(u, s));
            pairs!(a[0].d.len(), acc, step);
            for r in 0..R {
                out[r] = hsum256(_mm256_add_ps(acc[0][r], acc[1][r]));
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $q4<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
            let table = f16_table().as_ptr();
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let step = |b: usize, acc: &mut [__m256; R]| q4_1_block::<R>(w, a, b, table, acc, |u, s| $dot(u, s));
            pairs!(a[0].d.len(), acc, step);
            let macc = q4_1_offsets::<R>(w, a, table);
            for r in 0..R {
                out[r] = hsum256(_mm256_add_ps(acc[0][r], acc[1][r])) + hsum256(macc[r]);
            }
        }
    };
}

/// Block `b` of a Q8_0 row into each row's accumulator: `acc += Σq·(d_w·d_x)` per lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_0_block<const R: usize>(
    w: &[u8],
    a: &[ActRow],
    b: usize,
    table: *const f32,
    acc: &mut [__m256; R],
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) {
    const BB: usize = 2 + QK;
    let p = w.as_ptr().add(b * BB);
    let wq = _mm256_loadu_si256(p.add(2) as *const __m256i);
    // |w| meets x with w's sign (ggml's trick for an unsigned-by-signed multiply).
    let aw = _mm256_sign_epi8(wq, wq);
    let dw = _mm256_broadcast_ss(&*table.add((p as *const u16).read_unaligned() as usize));
    for r in 0..R {
        let xq = _mm256_loadu_si256(a[r].q.as_ptr().add(b * QK) as *const __m256i);
        let sums = _mm256_cvtepi32_ps(dot(aw, _mm256_sign_epi8(xq, wq)));
        acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_loadu_ps(a[r].d8.as_ptr().add(8 * b))), acc[r]);
    }
}

/// Block `b` of a Q4_1 row into each row's accumulator: `acc += Σq·(d_w·d_x)` per lane (the
/// offsets are summed apart, [`q4_1_offsets`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_1_block<const R: usize>(
    w: &[u8],
    a: &[ActRow],
    b: usize,
    table: *const f32,
    acc: &mut [__m256; R],
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) {
    const BB: usize = 4 + QK / 2;
    let p = w.as_ptr().add(b * BB);
    let wq = q4_1_codes(p);
    let dw = _mm256_broadcast_ss(&*table.add((p as *const u16).read_unaligned() as usize));
    for r in 0..R {
        let xq = _mm256_loadu_si256(a[r].q.as_ptr().add(b * QK) as *const __m256i);
        let sums = _mm256_cvtepi32_ps(dot(wq, xq));
        acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, _mm256_loadu_ps(a[r].d8.as_ptr().add(8 * b))), acc[r]);
    }
}

/// The 32 codes of the Q4_1 block at `p` as bytes: its 16 bytes twice over, the upper copy
/// shifted down a nibble, so values 0–15 land in the low half and 16–31 in the high half with
/// no shuffle.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_1_codes(p: *const u8) -> __m256i {
    let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(4) as *const __m128i));
    _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0)), _mm256_set1_epi8(0xf))
}

block_kernels!(q8_0_avx2, q4_1_avx2, "avx2,fma", dot_avx2);

/// The AVX-512 kernels: two blocks a 512-bit step, block 2i in the low half and 2i + 1 in the
/// high half, so the halves are the AVX2 kernels' even and odd accumulators, lane for lane: the
/// same bits. A last odd block goes into the even half with the 256-bit step.
macro_rules! wide_kernel {
    ($name:ident, $block:ident, $pair:ident, $offsets:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
        unsafe fn $name<const R: usize>(w: &[u8], a: &[ActRow], out: &mut [f32]) {
            let table = f16_table().as_ptr();
            let n = a[0].d.len();
            let mut acc = [_mm512_setzero_ps(); R];
            for b in (0..n - n % 2).step_by(2) {
                $pair::<R>(w, a, b, table, &mut acc);
            }
            let mut even: [__m256; R] = std::array::from_fn(|r| _mm512_castps512_ps256(acc[r]));
            if n % 2 == 1 {
                $block::<R>(w, a, n - 1, table, &mut even, |u, s| dot_vnni(u, s));
            }
            let macc: [__m256; R] = $offsets(w, a, table);
            for r in 0..R {
                out[r] = hsum256(_mm256_add_ps(even[r], _mm512_extractf32x8_ps(acc[r], 1))) + hsum256(macc[r]);
            }
        }
    };
}

wide_kernel!(q8_0_vnni, q8_0_block, q8_0_pair, |_, _, _| [_mm256_setzero_ps(); R]);
wide_kernel!(q4_1_vnni, q4_1_block, q4_1_pair, q4_1_offsets::<R>);

/// Blocks `b` and `b + 1` of a Q8_0 row, 512 bits wide (see [`q8_0_block`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_0_pair<const R: usize>(w: &[u8], a: &[ActRow], b: usize, table: *const f32, acc: &mut [__m512; R]) {
    const BB: usize = 2 + QK;
    let p = w.as_ptr().add(b * BB);
    let lo = _mm256_loadu_si256(p.add(2) as *const __m256i);
    let hi = _mm256_loadu_si256(p.add(BB + 2) as *const __m256i);
    let wq = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    // No 512-bit vpsignb: x negated where w < 0 (where w = 0, |w| = 0 makes the product 0).
    let (aw, negative) = (_mm512_abs_epi8(wq), _mm512_movepi8_mask(wq));
    let dw = pair_scales(table, p, p.add(BB));
    for r in 0..R {
        let xq = _mm512_loadu_si512(a[r].q.as_ptr().add(b * QK) as *const _);
        let xs = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
        let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, xs));
        acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(dw, _mm512_loadu_ps(a[r].d8.as_ptr().add(8 * b))), acc[r]);
    }
}

/// Blocks `b` and `b + 1` of a Q4_1 row, 512 bits wide (see [`q4_1_block`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_1_pair<const R: usize>(w: &[u8], a: &[ActRow], b: usize, table: *const f32, acc: &mut [__m512; R]) {
    const BB: usize = 4 + QK / 2;
    let p = w.as_ptr().add(b * BB);
    let wq = _mm512_inserti64x4(_mm512_castsi256_si512(q4_1_codes(p)), q4_1_codes(p.add(BB)), 1);
    let dw = pair_scales(table, p, p.add(BB));
    for r in 0..R {
        let xq = _mm512_loadu_si512(a[r].q.as_ptr().add(b * QK) as *const _);
        let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xq));
        acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(dw, _mm512_loadu_ps(a[r].d8.as_ptr().add(8 * b))), acc[r]);
    }
}

/// The f16 scales at the starts of two blocks, eight lanes each.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pair_scales(table: *const f32, lo: *const u8, hi: *const u8) -> __m512 {
    let scale = |p: *const u8| _mm256_broadcast_ss(&*table.add((p as *const u16).read_unaligned() as usize));
    _mm512_insertf32x8(_mm512_castps256_ps512(scale(lo)), scale(hi), 1)
}
