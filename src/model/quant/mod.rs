//! Quantized weight matrices for decoding: what a GGUF file stores (Q8_0, Q4_0, Q4_1, Q4_K) or
//! f32 weights quantized at load (`--dtype q8`), multiplied without an f32 copy of the weights.
//!
//! Two block formats, ggml's own byte layouts, 32 values per block:
//! - Q8_0 (34 B): f16 scale `d`, 32 signed bytes; value `d·q`.
//! - Q4_1 (20 B): f16 scale `d`, f16 offset `m`, 16 bytes; value j of the block in the low
//!   nibble of byte j, value j + 16 in its high nibble; value `d·q + m`.
//!
//! Q4_0 is Q4_1 with `m = −8d` (exact). A Q4_K sub-block of 32 (`d·sc·q − dmin·mn`) is Q4_1
//! with `d·sc` and `−dmin·mn` rounded to f16 (relative error ≤ 2⁻¹¹ of the scale, far below
//! the 4-bit codes' own).
//!
//! A product `x · Wᵀ` quantizes each 32-value block of x to signed bytes with its own f32 scale
//! (ggml's `q8_0`/`q8_1` activations) and sums byte products in int32 ([`kernels`]). Each output
//! is one weight row against one activation row, whatever else is in the batch: a row's numbers
//! never depend on the rows beside it.

mod kernels;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;

use super::ops::{simd, team};
use crate::gguf::quant::{encode, GgmlType};

/// Values per block.
pub const QK: usize = 32;

/// The block formats the kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q8_0,
    Q4_1,
}

impl QFormat {
    /// Bytes per block of [`QK`] values.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q8_0 => 2 + QK,
            QFormat::Q4_1 => 4 + QK / 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q4_1 => "Q4_1",
        }
    }
}

/// A (rows, cols) matrix in blocks of [`QK`] along each row; `cols` is a multiple of [`QK`].
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    format: QFormat,
    data: Arc<Vec<u8>>,
}

/// The ggml encodings kdllm multiplies from their own blocks.
pub fn multiplies(ty: GgmlDType) -> bool {
    matches!(ty, GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K)
}

impl QMatrix {
    /// f32 rows quantized to Q8_0 as ggml's reference quantizer does; `None` when a row's length
    /// is not a multiple of [`QK`] (such matrices stay f32).
    pub fn q8_0(values: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(QK) || values.len() != rows * cols {
            return None;
        }
        Some(Self { rows, cols, format: QFormat::Q8_0, data: Arc::new(encode(values, GgmlType::Q8_0)) })
    }

    /// A matrix from a GGUF tensor's bytes in ggml type `ty` ([`multiplies`] says which), with
    /// (rows, cols) its (outer, inner) dimensions.
    pub fn from_ggml(ty: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> std::result::Result<Self, String> {
        if !multiplies(ty) {
            return Err(format!("{ty:?} has no quantized kernel"));
        }
        let block = ty.block_size();
        if !cols.is_multiple_of(block) {
            return Err(format!("a row of {cols} values is not whole {ty:?} blocks of {block}"));
        }
        let expected = rows * cols / block * ty.type_size();
        if bytes.len() != expected {
            return Err(format!("{} bytes for a {rows}x{cols} {ty:?} matrix, expected {expected}", bytes.len()));
        }
        let (format, data) = match ty {
            GgmlDType::Q8_0 => (QFormat::Q8_0, bytes.to_vec()),
            GgmlDType::Q4_1 => (QFormat::Q4_1, bytes.to_vec()),
            GgmlDType::Q4_0 => (QFormat::Q4_1, bytes.chunks_exact(18).flat_map(q4_0_as_q4_1).collect()),
            GgmlDType::Q4K => (QFormat::Q4_1, bytes.chunks_exact(144).flat_map(q4_k_as_q4_1).collect()),
            _ => unreachable!("checked above"),
        };
        Ok(Self { rows, cols, format, data: Arc::new(data) })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Bytes the weights take.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// The same matrix with its rows reordered: row i of the result is row `order[i]`.
    pub fn select_rows(&self, order: &[usize]) -> Self {
        let data = order.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        Self { rows: order.len(), data: Arc::new(data), ..self.clone() }
    }

    /// Rows `ids` as f32 (an embedding lookup), (ids.len(), cols) flat.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &r in ids {
            for block in self.row(r as usize).chunks_exact(self.format.block_bytes()) {
                let d = half_at(block, 0);
                match self.format {
                    QFormat::Q8_0 => out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32)),
                    QFormat::Q4_1 => {
                        let m = half_at(block, 2);
                        let q = &block[4..];
                        out.extend(q.iter().map(|&b| d * (b & 0xf) as f32 + m));
                        out.extend(q.iter().map(|&b| d * (b >> 4) as f32 + m));
                    }
                }
            }
        }
        out
    }

    /// The whole matrix as f32, (rows, cols) flat.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(&(0..self.rows as u32).collect::<Vec<_>>())
    }

    /// `x · Wᵀ` for x (M, cols) f32, without gradient: (M, rows).
    pub fn matmul(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        Ok(Self::matmul_group(std::slice::from_ref(self), x)?.remove(0))
    }

    /// `x · Wᵢᵀ` for each matrix of `ws` (all `cols` wide), in one parallel pass that quantizes
    /// x once: q, k and v (or gate and up) of a decode step cost one wake-up of the threads, not
    /// three. Each output is the bits [`Self::matmul`] gives.
    pub fn matmul_group(ws: &[Arc<Self>], x: &Tensor) -> Result<Vec<Tensor>> {
        let y = x.contiguous()?.apply_op1_no_bwd(&QMatMul { ws: ws.to_vec(), level: simd::level() })?;
        let mut at = 0;
        ws.iter()
            .map(|w| {
                at += w.rows;
                y.narrow(1, at - w.rows, w.rows)
            })
            .collect()
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A Q4_0 block (f16 d, 16 nibble bytes; value `d·(q − 8)`) as Q4_1 with `m = −8d`.
fn q4_0_as_q4_1(b: &[u8]) -> Vec<u8> {
    let d = f16::from_le_bytes([b[0], b[1]]);
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&b[..2]);
    out.extend_from_slice(&f16::from_f32(-8.0 * d.to_f32()).to_le_bytes());
    out.extend_from_slice(&b[2..18]);
    out
}

/// A Q4_K super-block (f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes
/// of nibbles: sub-block 2i in the low nibbles of bytes 32i.., 2i + 1 in their high nibbles) as
/// eight Q4_1 blocks.
fn q4_k_as_q4_1(b: &[u8]) -> Vec<u8> {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let sc = &b[4..16];
    let qs = &b[16..144];
    let mut out = Vec::with_capacity(8 * 20);
    for j in 0..8 {
        // ggml's get_scale_min_k4.
        let (s, m) = if j < 4 {
            (sc[j] & 63, sc[j + 4] & 63)
        } else {
            ((sc[j + 4] & 0xf) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
        };
        out.extend_from_slice(&f16::from_f32(d * s as f32).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(-dmin * m as f32).to_le_bytes());
        let src = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let code = |i: usize| if j % 2 == 0 { src[i] & 0xf } else { src[i] >> 4 };
        out.extend((0..16).map(|i| code(i) | (code(i + 16) << 4)));
    }
    out
}

/// Activation rows quantized per block of [`QK`]: `x ≈ d·q`, with `s = d·Σq` (what a Q4_1
/// weight's offset multiplies), each row's `s` zero-padded to whole eights of blocks.
struct Acts {
    blocks: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    /// `d` repeated 8 times (what the vector kernels load).
    d8: Vec<f32>,
    q: Vec<i8>,
}

impl Acts {
    fn new(x: &[f32], cols: usize, level: simd::Level) -> Self {
        let blocks = cols / QK;
        let padded = blocks.next_multiple_of(8);
        let n = x.len() / QK;
        let (mut d, mut q) = (Vec::with_capacity(n), vec![0i8; x.len()]);
        let mut s = vec![0f32; x.len() / cols * padded];
        for (i, (block, codes)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
            let (scale, sum) = quantize_block(block, codes, level);
            d.push(scale);
            s[i / blocks * padded + i % blocks] = scale * sum as f32;
        }
        let mut d8 = Vec::with_capacity(8 * d.len());
        for &v in &d {
            d8.extend_from_slice(&[v; 8]);
        }
        Self { blocks, d, s, d8, q }
    }

    fn row(&self, i: usize) -> kernels::ActRow<'_> {
        let (a, b) = (i * self.blocks, (i + 1) * self.blocks);
        let padded = self.blocks.next_multiple_of(8);
        let s = &self.s[i * padded..(i + 1) * padded];
        kernels::ActRow { d: &self.d[a..b], s, d8: &self.d8[8 * a..8 * b], q: &self.q[a * QK..b * QK] }
    }
}

/// One block of [`QK`] values as signed bytes `codes` with `x ≈ scale·code`, `|code| ≤ 127`
/// (ggml's q8_0): the scale and the codes' sum. The vector path rounds ties to even as ggml's
/// AVX2 quantizer does, the scalar path away from zero as its reference one does.
fn quantize_block(x: &[f32], codes: &mut [i8], level: simd::Level) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if level >= simd::Level::Avx2 {
        // SAFETY: the level never exceeds what the CPU supports (simd::detected); x and codes
        // hold QK values each.
        return unsafe { quantize_block_avx2(x, codes) };
    }
    let _ = level;
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0;
    for (c, v) in codes.iter_mut().zip(x) {
        *c = (v * inv).round() as i8;
        sum += *c as i32;
    }
    (scale, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let a = v.map(|v| _mm256_and_ps(v, abs));
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let scale = amax / 127.0;
    let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
    let c = v.map(|v| {
        _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01)));
    // Packing works within 128-bit lanes: the permute puts the eight groups of four back in order.
    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, bytes);
    (scale, sum)
}

/// Activation rows a task multiplies at a time (a multiple of the kernels' tiles).
const ACT_PANEL: usize = 32;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

struct QMatMul {
    ws: Vec<Arc<QMatrix>>,
    level: simd::Level,
}

impl CustomOp1 for QMatMul {
    fn name(&self) -> &'static str {
        "kdllm-quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[m, k] = l.dims() else { bail!("quantized matmul: x must be 2-D, got {:?}", l.dims()) };
        if let Some(w) = self.ws.iter().find(|w| w.cols != k) {
            bail!("quantized matmul: x has {k} columns, the weights {}", w.cols);
        }
        let Some((a, b)) = l.contiguous_offsets() else { bail!("quantized matmul: x must be contiguous") };
        let acts = Acts::new(&s.as_slice::<f32>()?[a..b], k, self.level);
        let rows: Vec<kernels::ActRow> = (0..m).map(|i| acts.row(i)).collect();
        let n: usize = self.ws.iter().map(|w| w.rows).sum();
        // y (M, N), the matrices' columns one after another. Each task owns whole weight rows
        // of one matrix, streamed once for all M rows of x, and writes their columns of y.
        let mut tasks = Vec::with_capacity(n.div_ceil(ROWS_PER_TASK) + self.ws.len());
        let mut col0 = 0;
        for w in &self.ws {
            let dot = kernels::dot(w.format, self.level);
            tasks.extend((0..w.rows).step_by(ROWS_PER_TASK).map(|r0| (w, dot, r0, col0 + r0)));
            col0 += w.rows;
        }
        let mut y = vec![0f32; m * n];
        let y_addr = y.as_mut_ptr() as usize;
        let task = |i: usize| {
            let (w, dot, r0, c0) = tasks[i];
            let mut col = [0f32; ACT_PANEL];
            // A panel of activation rows stays in L1 while the task's weight rows pass over it.
            for (p, panel) in rows.chunks(ACT_PANEL).enumerate() {
                for r in r0..w.rows.min(r0 + ROWS_PER_TASK) {
                    dot(w.row(r), panel, &mut col[..panel.len()]);
                    for (row, &v) in col[..panel.len()].iter().enumerate() {
                        // SAFETY: column c0 + r − r0 < n of a row < m lies inside y, and only
                        // this task writes it; y outlives the loop.
                        unsafe { *(y_addr as *mut f32).add((p * ACT_PANEL + row) * n + c0 + r - r0) = v };
                    }
                }
            }
        };
        if n * k < 1 << 16 {
            (0..tasks.len()).for_each(task);
        } else {
            team::run(tasks.len(), task);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}
