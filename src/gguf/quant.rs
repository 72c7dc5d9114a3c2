//! The GGUF tensor encodings kdllm writes, from f32 rows, as ggml's reference quantizers
//! (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`) lay them out.
//!
//! - Q8_0: blocks of 32 values: an f16 scale `d = max|x| / 127`, then 32 signed bytes
//!   `round(x / d)`.
//! - Q4_0: blocks of 32: an f16 scale `d = m / −8`, where `m` is the value of largest
//!   magnitude (sign kept), then 16 bytes: value j in the low nibble of byte j, value j + 16 in
//!   its high nibble, each `min(15, trunc(x / d + 8.5))`.

use half::f16;

/// The `ggml_type` ids of the encodings kdllm writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
}

/// Values per block.
pub const QK: usize = 32;

impl GgmlType {
    /// Values a row's length must be a multiple of.
    pub fn block(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 => 1,
            GgmlType::Q4_0 | GgmlType::Q8_0 => QK,
        }
    }

    /// llama.cpp's `general.file_type` for a model mostly of this type (`llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 7,
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
    /// not use for writing.
    #[test]
    fn bytes_match_candles_ggml_port() {
        let values: Vec<f32> = (0..4 * 64).map(|i| ((i as f32 * 0.37).sin() * 3.0) + (i % 7) as f32 * 0.1).collect();
        let t = Tensor::from_vec(values.clone(), (4, 64), &Device::Cpu).unwrap();
        for (ty, dt) in
            [(GgmlType::Q8_0, GgmlDType::Q8_0), (GgmlType::Q4_0, GgmlDType::Q4_0), (GgmlType::F16, GgmlDType::F16)]
        {
            let theirs = QTensor::quantize(&t, dt).unwrap().data().unwrap().to_vec();
            assert_eq!(encode(&values, ty), theirs, "{ty:?}");
        }
    }
}
