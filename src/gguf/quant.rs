//! The GGUF tensor encodings kdllm writes, from f32 rows, as ggml's reference quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) lay them out.
//!
//! - Q8_0: blocks of 32 values: an f16 scale `d = max|x| / 127`, then 32 signed bytes
//!   `round(x / d)`.
//! - Q4_0: blocks of 32: an f16 scale `d = m / −8`, where `m` is the value of largest
//!   magnitude (sign kept), then 16 bytes: value j in the low nibble of byte j, value j + 16 in
//!   its high nibble, each `min(15, trunc(x / d + 8.5))`.
//! - Q4_K: super-blocks of 256 (`quantize_row_q4_K_ref`): eight sub-blocks of 32, each with a
//!   4-bit code `x ≈ d·sc·q − dmin·m` whose scale and offset are searched for least weighted
//!   squared error; the sub-blocks' `sc` and `m` are 6-bit codes of two f16 super-block scales.

use half::f16;

/// The `ggml_type` ids of the encodings kdllm writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[allow(non_camel_case_types)] // ggml's own names
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    Q4_K = 12,
}

/// Values per block.
pub const QK: usize = 32;
/// Values per k-quant super-block.
pub const QK_K: usize = 256;

impl GgmlType {
    /// Values a row's length must be a multiple of.
    pub fn block(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q4_0 | GgmlType::Q8_0 => QK,
            GgmlType::Q4_K => QK_K,
        }
    }

    /// llama.cpp's `general.file_type` for a model mostly of this type (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 7,
            // Q4_K_S: every matrix Q4_K, as kdllm writes them.
            GgmlType::Q4_K => 14,
        }
    }
}

/// `values` encoded as `ty`; its length must be a multiple of [`GgmlType::block`].
pub fn encode(values: &[f32], ty: GgmlType) -> Vec<u8> {
    assert_eq!(values.len() % ty.block(), 0, "checked by the caller");
    match ty {
        GgmlType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        GgmlType::Q8_0 => values.chunks(QK).flat_map(q8_0_block).collect(),
        GgmlType::Q4_0 => values.chunks(QK).flat_map(q4_0_block).collect(),
        GgmlType::Q4_K => values.chunks(QK_K).flat_map(q4_k_block).collect(),
    }
}

fn q8_0_block(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    out
}

fn q4_0_block(x: &[f32]) -> Vec<u8> {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id + 8.5) as i32).min(15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend((0..QK / 2).map(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)));
    out
}

/// ggml's `nearest_int`: round half to even through the float's mantissa (|x| < 2²²).
fn nearest_int(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn q4_k_block(x: &[f32]) -> Vec<u8> {
    let mut codes = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for (j, sub) in x.chunks(32).enumerate() {
        let sum_x2 = sub.iter().fold(0f32, |s, v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + sub[l].abs());
        (scales[j], mins[j]) = scale_and_min(sub, &weights, &mut codes[32 * j..32 * (j + 1)]);
    }
    let max_scale = scales.iter().fold(0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // 6-bit codes: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    // sub-blocks 4-7 split into a low nibble in bytes 8-11 and two high bits atop bytes 0-7.
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    // The codes again, against the scales as stored.
    for j in 0..8 {
        let (sc, m) = if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            ((packed[j + 4] & 0xf) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
        };
        let d = d.to_f32() * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            codes[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    let mut out = Vec::with_capacity(144);
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(packed);
    // Each 64 values: the first 32 in the low nibbles of 32 bytes, the next 32 in the high ones.
    for c in codes.chunks(64) {
        out.extend((0..32).map(|l| c[l] | (c[l + 32] << 4)));
    }
    out
}

/// ggml's `make_qkx2_quants` for 4-bit codes (nmax 15, 20 steps from −1 in steps of 0.1): the
/// scale and the (positive) offset of `x ≈ scale·code − min` with the least weighted squared
/// error, the codes written to `codes`.
fn scale_and_min(x: &[f32], w: &[f32], codes: &mut [u8]) -> (f32, f32) {
    const NMAX: f32 = 15.0;
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (w[0], w[0] * x[0]);
    for i in 1..x.len() {
        min = if x[i] < min { x[i] } else { min };
        max = if x[i] > max { x[i] } else { max };
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let code = |iscale: f32, v: f32, min: f32| nearest_int(iscale * (v - min)).clamp(0, NMAX as i32) as u8;
    let iscale = NMAX / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..x.len() {
        codes[i] = code(iscale, x[i], min);
        let diff = scale * codes[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut trial = [0u8; 32];
    for step in 0..=20 {
        let iscale = (-1.0 + 0.1 * step as f32 + NMAX) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..x.len() {
            trial[i] = code(iscale, x[i], min);
            let l = trial[i] as f32;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..x.len() {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                error += w[i] * (diff * diff);
            }
            if error < best_error {
                codes.copy_from_slice(&trial[..x.len()]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn blocks_by_hand() {
        // Q8_0: max |x| = 127 → d = 1, values kept.
        let mut x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        x[5] = 127.0;
        let q = encode(&x, GgmlType::Q8_0);
        assert_eq!(q.len(), 34);
        assert_eq!(&q[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(q[2 + 5] as i8, 127);
        assert_eq!(q[2] as i8, -16);
        // Q4_0: the largest magnitude is −8 → d = 1; x + 8.5 truncated, 15 at most.
        let mut y = vec![0f32; 32];
        y[0] = -8.0;
        y[1] = 3.0;
        y[16] = 7.9;
        let q = encode(&y, GgmlType::Q4_0);
        assert_eq!(q.len(), 18);
        assert_eq!(&q[..2], &f16::from_f32(1.0).to_le_bytes());
        assert_eq!(q[2], 15 << 4, "value 0 (0) in the low nibble, value 16 (15) in the high one");
        assert_eq!(q[3], 11 | (8 << 4));
        // All zeros: scale 0, every value at the zero point.
        assert!(encode(&[0.0; 32], GgmlType::Q4_0)[2..].iter().all(|&b| b == 0x88));
    }

    /// The bytes agree with candle's port of ggml's quantizers, an implementation kdllm does
    /// not use for writing. (Its Q4_K port is of an older ggml search, `make_qkx1_quants`;
    /// `tools/check_gguf.py --f32` checks Q4_K against llama.cpp's own.)
    #[test]
    fn bytes_match_candles_ggml_port() {
        let values: Vec<f32> = (0..4 * 256).map(|i| ((i as f32 * 0.37).sin() * 3.0) + (i % 7) as f32 * 0.1).collect();
        let t = Tensor::from_vec(values.clone(), (4, 256), &Device::Cpu).unwrap();
        for (ty, dt) in
            [(GgmlType::Q8_0, GgmlDType::Q8_0), (GgmlType::Q4_0, GgmlDType::Q4_0), (GgmlType::F16, GgmlDType::F16)]
        {
            let theirs = QTensor::quantize(&t, dt).unwrap().data().unwrap().to_vec();
            assert_eq!(encode(&values, ty), theirs, "{ty:?}");
        }
    }

    #[test]
    fn q4_k_round_trips_within_its_step() {
        let values: Vec<f32> = (0..2 * QK_K).map(|i| ((i as f32 * 0.37).sin() * 3.0) + (i % 7) as f32 * 0.1).collect();
        let bytes = encode(&values, GgmlType::Q4_K);
        assert_eq!(bytes.len(), 2 * 144);
        let t = QTensor::new(
            candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(&bytes),
                &Device::Cpu,
                GgmlDType::Q4K,
            )
            .unwrap(),
            (2, QK_K),
        )
        .unwrap();
        let back = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Each 32 values span at most 6.4 here; 4 bits give steps of ~0.43, so half a step
        // plus the 6-bit scale rounding.
        let worst = values.iter().zip(&back).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 0.3, "largest Q4_K error {worst}");
        assert!(encode(&[0.0; QK_K], GgmlType::Q4_K)[4..].iter().all(|&b| b == 0), "zeros code as zeros");
    }
}
