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
/// weight's offset multiplies).
struct Acts {
    blocks: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    /// `d` and `s / 8`, each repeated 8 times (what the vector kernels load).
    d8: Vec<f32>,
    s8: Vec<f32>,
    q: Vec<i8>,
}

impl Acts {
    fn new(x: &[f32], cols: usize) -> Self {
        let n = x.len() / QK;
        let (mut d, mut s, mut q) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(x.len()));
        for block in x.chunks_exact(QK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            let start = q.len();
            q.extend(block.iter().map(|v| (v * inv).round() as i8));
            let sum: i32 = q[start..].iter().map(|&v| v as i32).sum();
            d.push(scale);
            s.push(scale * sum as f32);
        }
        let d8 = d.iter().flat_map(|&v| [v; 8]).collect();
        let s8 = s.iter().flat_map(|&v| [v / 8.0; 8]).collect();
        Self { blocks: cols / QK, d, s, d8, s8, q }
    }

    fn row(&self, i: usize) -> kernels::ActRow<'_> {
        let (a, b) = (i * self.blocks, (i + 1) * self.blocks);
        let (d8, s8) = (&self.d8[8 * a..8 * b], &self.s8[8 * a..8 * b]);
        kernels::ActRow { d: &self.d[a..b], s: &self.s[a..b], d8, s8, q: &self.q[a * QK..b * QK] }
    }
}

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
        let acts = Acts::new(&s.as_slice::<f32>()?[a..b], k);
        let rows: Vec<kernels::ActRow> = (0..m).map(|i| acts.row(i)).collect();
        let n: usize = self.ws.iter().map(|w| w.rows).sum();
        // yᵀ (N, M), the matrices' rows one after another: each task owns whole weight rows of
        // one matrix, streamed once for all M rows of x.
        let mut yt = vec![0f32; n * m];
        let mut tasks = Vec::with_capacity(n.div_ceil(ROWS_PER_TASK) + self.ws.len());
        let mut rest = &mut yt[..];
        for w in &self.ws {
            let (mine, after) = rest.split_at_mut(w.rows * m);
            let dot = kernels::dot(w.format, self.level);
            tasks.extend(mine.chunks_mut(ROWS_PER_TASK * m).enumerate().map(|(t, out)| (w, dot, t, out)));
            rest = after;
        }
        let task = |(w, dot, t, out): (&Arc<QMatrix>, kernels::Dot, usize, &mut [f32])| {
            for (j, y) in out.chunks_mut(m).enumerate() {
                dot(w.row(t * ROWS_PER_TASK + j), &rows, y);
            }
        };
        if n * k < 1 << 16 {
            tasks.into_iter().for_each(task);
        } else {
            // Each task's output chunk, handed out once.
            let tasks: Vec<_> = tasks.into_iter().map(|t| std::sync::Mutex::new(Some(t))).collect();
            team::run(tasks.len(), |i| {
                if let Some(t) = tasks[i].lock().unwrap_or_else(|e| e.into_inner()).take() {
                    task(t)
                }
            });
        }
        let y = if m == 1 { yt } else { (0..m * n).map(|p| yt[(p % n) * m + p / n]).collect() };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}
