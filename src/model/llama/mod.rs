//! Llama-family decoder (Touvron et al. 2023), laid out like Hugging Face `LlamaForCausalLM`.
//!
//! Unlike candle-transformers' inference model, this one returns logits for every position and
//! is built only from ops that have a backward pass (candle's fused `rms_norm`, `rope` and
//! `softmax_last_dim` silently cut the graph; ours in [`super::ops`] carry their own), so the
//! same code trains and decodes.
//!
//! Shapes: B batch, T new tokens, S keys (cached + new), C hidden, H heads, K kv heads,
//! D head dim, V vocab. Hidden states are kept flat as (B*T, C) so every projection is one GEMM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};

use super::ops;
use super::quant::QMatrix;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model config {path}: {source}")]
    ReadConfig { path: PathBuf, source: std::io::Error },
    #[error("model config {path} is not a valid llama config: {source}")]
    ParseConfig { path: PathBuf, source: serde_json::Error },
    #[error("model config: {0}")]
    Invalid(String),
    #[error("{path}: model_type `{model_type}` is not supported; supported: {} (architectures LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)", SUPPORTED_MODEL_TYPES.join(", "))]
    Unsupported { path: PathBuf, model_type: String },
    #[error("cannot read weights {path}: {message} (is the file complete? re-download or re-export it)")]
    Safetensors { path: String, message: String },
    #[error("no weights found in {0}: expected model.safetensors or model.safetensors.index.json (safetensors only; convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))")]
    NoWeights(PathBuf),
    #[error("bad weight index {path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("tensor `{name}` is missing from {files}")]
    MissingTensor { name: String, files: String },
    #[error("tensor `{name}` has shape {found:?} in the checkpoint but the config needs {expected:?}")]
    ShapeMismatch { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("GGUF {path}: {message}")]
    Gguf { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, ModelError>;

mod config;
#[cfg(test)]
pub(crate) mod tests;
mod weights;

pub use config::*;
pub use weights::*;

/// RoPE in HF's rotate-half layout. cos/sin are computed for the positions of each forward
/// rather than tabled, since real configs allow 128k positions.
#[derive(Debug, Clone)]
struct Rope {
    /// (1, D/2), f32.
    inv_freq: Tensor,
    dtype: DType,
}

impl Rope {
    fn new(cfg: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let inv_freq = inv_freq(cfg)?;
        let half = inv_freq.len();
        Ok(Self { inv_freq: Tensor::from_vec(inv_freq, (1, half), dev)?, dtype })
    }

    /// Rotates x (B, T, N, D) whose token t of row b sits at `positions[b*T + t]`, returning it
    /// as (B, N, T, D). In f32 whatever the compute dtype.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(ops::rope(&x.to_dtype(DType::F32)?, cos, sin)?.to_dtype(self.dtype)?)
    }

    /// cos/sin (B, T, D) for (B, T) positions, in f32 as transformers computes them.
    fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let pos = positions.flatten_all()?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let d = freqs.dim(1)?;
        Ok((freqs.cos()?.reshape((b, t, d))?, freqs.sin()?.reshape((b, t, d))?))
    }
}

/// The D/2 RoPE inverse frequencies, scaled as `rope_scaling` says (transformers'
/// `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`).
fn inv_freq(cfg: &LlamaConfig) -> Result<Vec<f32>> {
    let d = cfg.head_dim();
    let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
    let scaled = match cfg.rope_scaling()? {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old = original_max_position_embeddings;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        // Between the bands: interpolate between scaled and unscaled.
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    };
    Ok(scaled.into_iter().map(|f| f as f32).collect())
}

fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Quantized matrices by HF name, when the model is built for quantized decoding: the matrix
/// for a name and its (out, in) shape, or `None` where it stays dense.
type Quantized<'a> = &'a dyn Fn(&str, (usize, usize)) -> Result<Option<Arc<QMatrix>>>;

/// A projection's weights, stored as (out, in), HF's layout.
#[derive(Debug, Clone)]
enum Weight {
    /// `t` is Wᵀ stored contiguous, (in, out), for inference: the GEMM then reads the weights as
    /// they lie instead of repacking all of them at every decode step. `None` while training.
    Dense { w: Tensor, t: Option<Tensor> },
    /// Decoding only: the product runs on the blocks ([`QMatrix::matmul`]).
    Quant(Arc<QMatrix>),
    /// Training only: f32 weights whose products run as bf16 GEMMs ([`ops::linear_bf16`]).
    Bf16Gemm(Tensor),
}

/// A projection `y = x Wᵀ (+ b)` with HF's `<name>.weight` / `<name>.bias`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(vb: &VarBuilder, out: usize, inp: usize, name: &str, bias: bool, quant: Quantized) -> Result<Self> {
        let vb = vb.pp(name);
        let weight = match quant(&vb.pp("weight").prefix(), (out, inp))? {
            Some(q) => Weight::Quant(q),
            None => Weight::Dense { w: vb.get_with_hints((out, inp), "weight", candle_nn::Init::Const(0.0))?, t: None },
        };
        let bias = if bias { Some(vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Quant(q) => q.matmul(x)?,
            Weight::Dense { w, t: Some(wt) } => match ops::matmul_few_rows(x, w)? {
                Some(y) => y,
                None => x.matmul(wt)?,
            },
            Weight::Dense { w, t: None } => x.matmul(&w.t()?)?,
            Weight::Bf16Gemm(w) => ops::linear_bf16(x, w)?,
        };
        add_bias(y, self.bias.as_ref())
    }

    /// `lin` of each of `lins` on the same x; when all are quantized, in one pass
    /// ([`QMatrix::matmul_group`]), with the same bits as one by one.
    fn forward_group<const N: usize>(
        lins: [&Linear; N],
        x: &Tensor,
        lin: impl Fn(&Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<[Tensor; N]> {
        let quant: Vec<Arc<QMatrix>> = lins
            .iter()
            .filter_map(|l| match &l.weight {
                Weight::Quant(q) => Some(q.clone()),
                _ => None,
            })
            .collect();
        let out = if quant.len() < N {
            lins.iter().map(|l| lin(l, x)).collect::<Result<Vec<_>>>()?
        } else {
            let ys = QMatrix::matmul_group(&quant, x)?;
            ys.into_iter().zip(lins).map(|(y, l)| add_bias(y, l.bias.as_ref())).collect::<Result<Vec<_>>>()?
        };
        Ok(out.try_into().expect("one output per projection"))
    }

    /// As [`Self::forward`], with each row of x computed apart from the others: the same bits
    /// for a row whatever rows share x (the f32 product runs in chunks the few-row kernel takes).
    fn forward_apart(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        match &self.weight {
            Weight::Dense { w, t: Some(_) } if rows > ops::FEW_ROWS => {
                let mut parts = Vec::with_capacity(rows.div_ceil(ops::FEW_ROWS));
                for at in (0..rows).step_by(ops::FEW_ROWS) {
                    let chunk = x.narrow(0, at, ops::FEW_ROWS.min(rows - at))?;
                    match ops::matmul_few_rows(&chunk, w)? {
                        Some(y) => parts.push(y),
                        // No kernel for it here (a GPU, no AVX2): one product, rows may mix.
                        None => return self.forward(x),
                    }
                }
                add_bias(Tensor::cat(&parts, 0)?, self.bias.as_ref())
            }
            _ => self.forward(x),
        }
    }

    fn freeze(&mut self) -> Result<()> {
        if let Weight::Dense { w, t } = &mut self.weight {
            *t = Some(w.t()?.contiguous()?);
        }
        Ok(())
    }

    /// The same projection computing in `dtype` (dense weights only).
    fn cast(&self, dtype: DType) -> Result<Self> {
        let cast = |t: &Tensor| t.to_dtype(dtype);
        let weight = match &self.weight {
            Weight::Dense { w, t } => Weight::Dense { w: cast(w)?, t: t.as_ref().map(cast).transpose()? },
            Weight::Quant(_) => return Err(ModelError::Invalid("a quantized model computes in f32 only".into())),
            Weight::Bf16Gemm(_) => return Err(ModelError::Invalid("this model already computes in bf16 GEMMs".into())),
        };
        Ok(Self { weight, bias: self.bias.as_ref().map(cast).transpose()? })
    }
}

/// The token embeddings (V, C): a tensor, or quantized rows dequantized as they are looked up.
#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Quant(Arc<QMatrix>),
}

impl Embedding {
    /// Rows (N, C) for the flat ids (N,).
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => t.index_select(ids, 0)?,
            Embedding::Quant(q) => {
                let ids = ids.to_vec1::<u32>()?;
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= q.rows()) {
                    return Err(ModelError::Invalid(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        q.rows()
                    )));
                }
                Tensor::from_vec(q.dequantize_rows(&ids), (ids.len(), q.cols()), &Device::Cpu)?
            }
        })
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?, eps })
    }

    // In f32 whatever the compute dtype, as HF does.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::rms_norm(&x.to_dtype(DType::F32)?, &self.weight.to_dtype(DType::F32)?, self.eps)?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder, quant: Quantized) -> Result<Self> {
        let (c, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias());
        Ok(Self {
            gate: Linear::new(&vb, f, c, "gate_proj", bias, quant)?,
            up: Linear::new(&vb, f, c, "up_proj", bias, quant)?,
            down: Linear::new(&vb, c, f, "down_proj", bias, quant)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, Linear::forward)
    }

    fn apply(&self, x: &Tensor, lin: impl Fn(&Linear, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dtype = x.dtype();
        let [gate, up] = Linear::forward_group([&self.gate, &self.up], x, &lin)?;
        let (gate, up) = (gate.to_dtype(DType::F32)?, up.to_dtype(DType::F32)?);
        lin(&self.down, &ops::silu_mul(&gate, &up)?.to_dtype(dtype)?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder, quant: Quantized) -> Result<Self> {
        let (c, h, k, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let qkv_bias = cfg.qkv_bias();
        Ok(Self {
            q: Linear::new(&vb, h * d, c, "q_proj", qkv_bias, quant)?,
            k: Linear::new(&vb, k * d, c, "k_proj", qkv_bias, quant)?,
            v: Linear::new(&vb, k * d, c, "v_proj", qkv_bias, quant)?,
            o: Linear::new(&vb, c, h * d, "o_proj", cfg.o_bias(), quant)?,
            heads: h,
            kv_heads: k,
            head_dim: d,
        })
    }

    /// x: (B*T, C). `kv` holds this layer's cached keys/values (B, K, S_past, D).
    fn forward(
        &self,
        x: &Tensor,
        (b, t): (usize, usize),
        rope: (&Rope, &Tensor, &Tensor),
        mask: Option<&Tensor>,
        kv: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> Result<Tensor> {
        let d = self.head_dim;
        // (B*T, N*D) → (B, T, N, D); RoPE transposes to (B, N, T, D) in its pass.
        let [q, k, v] = Linear::forward_group([&self.q, &self.k, &self.v], x, Linear::forward)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, d))?) };
        let (rope, cos, sin) = rope;
        let q = rope.apply(&heads(q, self.heads)?, cos, sin)?;
        let mut k = rope.apply(&heads(k, self.kv_heads)?, cos, sin)?;
        let mut v = heads(v, self.kv_heads)?.transpose(1, 2)?.contiguous()?;
        let decoding = kv.is_some();
        if let Some(cache) = kv {
            // Written in place into a preallocated buffer (no backward; decoding only).
            (k, v) = cache.append(&k.contiguous()?, &v.contiguous()?)?;
        }
        self.o.forward(&self.attend(&q, &k, &v, mask, decoding)?)
    }

    /// The attention output (B*T, H*D), before o_proj, of q (B, H, T, D) over k, v (B, K, S, D).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, decoding: bool) -> Result<Tensor> {
        let (b, _, t, d) = q.dims4()?;
        let scale = 1.0 / (d as f64).sqrt();
        if decoding && t == 1 && q.dtype() == DType::F32 {
            return Ok(ops::decode_attention(q, k, v, scale, mask)?.reshape((b, self.heads * d))?);
        }
        // In f32 whatever the compute dtype (HF's eager attention softmaxes in f32); out (B, T, H, D).
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        let out = ops::attention(&f32(q)?, &f32(k)?, &f32(v)?, scale, mask)?;
        Ok(out.to_dtype(q.dtype())?.reshape((b * t, self.heads * d))?)
    }

    /// One new token per row of x (B, C), row r with its own cache `kvs[r]` and mask `masks[r]`:
    /// the projections take all rows at once (rows apart, [`Linear::forward_apart`]), RoPE and
    /// attention run row by row.
    fn forward_rows(
        &self,
        x: &Tensor,
        (rope, cos, sin): (&Rope, &Tensor, &Tensor),
        masks: &[Option<Tensor>],
        kvs: &mut [&mut candle_nn::kv_cache::KvCache],
    ) -> Result<Tensor> {
        let d = self.head_dim;
        let [q, k, v] = Linear::forward_group([&self.q, &self.k, &self.v], x, Linear::forward_apart)?;
        let mut out = Vec::with_capacity(kvs.len());
        for (r, kv) in kvs.iter_mut().enumerate() {
            let row = |t: &Tensor, n: usize| -> Result<Tensor> { Ok(t.narrow(0, r, 1)?.reshape((1, 1, n, d))?) };
            let (cr, sr) = (cos.narrow(0, r, 1)?, sin.narrow(0, r, 1)?);
            let q = rope.apply(&row(&q, self.heads)?, &cr, &sr)?;
            let k = rope.apply(&row(&k, self.kv_heads)?, &cr, &sr)?;
            let v = row(&v, self.kv_heads)?.transpose(1, 2)?.contiguous()?;
            let (k, v) = kv.append(&k.contiguous()?, &v)?;
            out.push(self.attend(&q, &k, &v, masks[r].as_ref(), true)?);
        }
        self.o.forward_apart(&Tensor::cat(&out, 0)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    mlp: Mlp,
    window: Option<usize>,
}

impl DecoderLayer {
    /// The seven projections, for changing how they compute.
    fn projections(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.attn, &mut self.mlp);
        [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut m.gate, &mut m.up, &mut m.down]
    }

    fn new(cfg: &LlamaConfig, layer: usize, vb: VarBuilder, quant: Quantized) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_norm: RmsNorm::new(c, eps, vb.pp("input_layernorm"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"), quant)?,
            post_attn_norm: RmsNorm::new(c, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), quant)?,
            window: cfg.window(layer),
        })
    }
}

/// Per-layer key/value cache for incremental decoding of a left-padded batch.
/// Row b has `pads[b]` padding tokens before its prompt; they are never attended to.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    pads: Vec<usize>,
    len: usize,
}

impl KvCache {
    /// Buffers grow by this many positions at a time (copying once per chunk, not per token).
    const CHUNK: usize = 256;

    pub fn new(cfg: &LlamaConfig, pads: Vec<usize>) -> Self {
        let layers = (0..cfg.num_hidden_layers).map(|_| candle_nn::kv_cache::KvCache::new(2, Self::CHUNK)).collect();
        Self { layers, pads, len: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    cfg: LlamaConfig,
    device: Device,
}

impl Llama {
    /// Builds the model from `vb`, whose dtype is the compute dtype.
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        Self::build(cfg, vb, &|_, _| Ok(None))
    }

    /// Builds the model from `vb`, with the matrices `quant` gives quantized.
    fn build(cfg: &LlamaConfig, vb: VarBuilder, quant: Quantized) -> Result<Self> {
        cfg.validate()?;
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let embed = match quant("model.embed_tokens.weight", (v, c))? {
            Some(q) => Embedding::Quant(q),
            None => Embedding::Dense(vb.pp("model.embed_tokens").get_with_hints(
                (v, c),
                "weight",
                candle_nn::Init::Const(0.0),
            )?),
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb.pp(format!("model.layers.{i}")), quant))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(c, cfg.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = match (&embed, cfg.tie_word_embeddings) {
            (Embedding::Dense(w), true) => Linear { weight: Weight::Dense { w: w.clone(), t: None }, bias: None },
            (Embedding::Quant(q), true) => Linear { weight: Weight::Quant(q.clone()), bias: None },
            (_, false) => Linear::new(&vb, v, c, "lm_head", false, quant)?,
        };
        let device = vb.device().clone();
        let rope = Rope::new(cfg, vb.dtype(), &device)?;
        Ok(Self { embed, layers, norm, lm_head, rope, cfg: cfg.clone(), device })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype (the dtype of the weights).
    pub fn dtype(&self) -> DType {
        match &self.embed {
            Embedding::Dense(t) => t.dtype(),
            Embedding::Quant(_) => DType::F32,
        }
    }

    /// The same model computing in `dtype`: its projections and embeddings cast, the norms kept
    /// in f32 (they compute in f32 anyway). The casts are in the graph, so the gradients reach
    /// the original (f32 master) weights: mixed-precision training is a cast per step.
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let Embedding::Dense(embed) = &self.embed else {
            return Err(ModelError::Invalid("a quantized model computes in f32 only".into()));
        };
        let mut out = self.clone();
        let embed = embed.to_dtype(dtype)?;
        // Tied: the head is the embeddings, cast once.
        out.lm_head = match (&self.lm_head.weight, self.cfg.tie_word_embeddings) {
            (Weight::Dense { t, .. }, true) => {
                let t = t.as_ref().map(|t| t.to_dtype(dtype)).transpose()?;
                Linear { weight: Weight::Dense { w: embed.clone(), t }, bias: None }
            }
            _ => self.lm_head.cast(dtype)?,
        };
        out.embed = Embedding::Dense(embed);
        out.rope.dtype = dtype;
        for l in out.layers.iter_mut().flat_map(DecoderLayer::projections) {
            *l = l.cast(dtype)?;
        }
        Ok(out)
    }

    /// The model a training step computes with in `dtype`: in bf16 on a CPU with avx512_bf16
    /// ([`ops::bf16_gemm_available`]), [`Self::with_bf16_gemms`]; otherwise [`Self::cast`].
    pub fn for_training(&self, dtype: DType) -> Result<Self> {
        if dtype == DType::BF16 && self.dtype() == DType::F32 && ops::bf16_gemm_available(&self.device) {
            return Ok(self.with_bf16_gemms());
        }
        self.cast(dtype)
    }

    /// The f32 weights with every projection a bf16 GEMM ([`ops::linear_bf16`]; activations,
    /// norms and gradients stay f32).
    pub fn with_bf16_gemms(&self) -> Self {
        let mut out = self.clone();
        let head = std::iter::once(&mut out.lm_head);
        for l in out.layers.iter_mut().flat_map(DecoderLayer::projections).chain(head) {
            if let Weight::Dense { w, t: None } = &l.weight {
                l.weight = Weight::Bf16Gemm(w.clone());
            }
        }
        out
    }

    /// Logits (B, T, V), in f32, for every position of `ids` (B, T). With a cache, `ids`
    /// continue the cached sequence and the cache grows by T.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (x, _) = self.hidden(ids, cache, &[])?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Logits (N, V), in f32, at the flat positions `rows` (N, u32) of the (B·T) positions of
    /// `ids` (B, T): what training needs. Positions that do not count (prompts, padding) never
    /// reach the vocabulary projection, and no (B·T, V) tensor is built.
    pub fn forward_at(&self, ids: &Tensor, rows: &Tensor) -> Result<Tensor> {
        self.head(&self.states_at(ids, rows, &[])?.0)
    }

    /// The final-norm hidden states (N, C) at the flat positions `rows` of `ids` (B, T), and the
    /// hidden states of the layers `taps` at the same positions: layer 0 is the embeddings,
    /// layer i the output of decoder layer i, layer `num_hidden_layers` the final-norm output
    /// (HF's `output_hidden_states`).
    pub fn states_at(&self, ids: &Tensor, rows: &Tensor, taps: &[usize]) -> Result<(Tensor, Vec<Tensor>)> {
        let (x, tapped) = self.hidden(ids, None, taps)?;
        let tapped = tapped.iter().map(|h| h.index_select(rows, 0)).collect::<candle_core::Result<_>>()?;
        Ok((x.index_select(rows, 0)?, tapped))
    }

    /// Logits (N, V), in f32, of final-norm hidden states (N, C).
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(x)?.to_dtype(DType::F32)?)
    }

    /// Logits (B, V), in f32, of the last position of each row only: what decoding needs,
    /// without the (B, T, V) tensor of a long prefill.
    pub fn forward_last(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x =
            self.hidden(ids, cache, &[])?.0.reshape((b, t, self.cfg.hidden_size))?.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Logits (B, V), in f32, of one new token per row, `tokens[r]` continuing the sequence in
    /// `caches[r]` (a one-row cache of any length; each grows by one). Each row is computed
    /// apart from the others: its logits are the same bits whatever rows share the step, so a
    /// batch whose finished rows are refilled gives every row what decoding it alone gives.
    pub fn step_rows(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = tokens.len();
        if caches.len() != b || caches.iter().any(|c| c.pads.len() != 1) {
            return Err(ModelError::Invalid(format!("step_rows: {b} tokens need {b} one-row caches")));
        }
        let mut positions = Vec::with_capacity(b);
        for c in caches.iter() {
            if c.len + 1 > self.cfg.max_position_embeddings {
                return Err(ModelError::Invalid(format!(
                    "sequence of {} tokens exceeds max_position_embeddings {}",
                    c.len + 1,
                    self.cfg.max_position_embeddings
                )));
            }
            positions.push(c.len.saturating_sub(c.pads[0]) as u32);
        }
        let (cos, sin) = self.rope.tables(&Tensor::from_vec(positions, (b, 1), &self.device)?)?;
        let mut x = self.embed.lookup(&Tensor::from_vec(tokens.to_vec(), b, &self.device)?)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let masks = caches
                .iter()
                .map(|c| attention_mask(&c.pads, c.len, 1, layer.window, &self.device))
                .collect::<Result<Vec<_>>>()?;
            let mut kvs: Vec<&mut candle_nn::kv_cache::KvCache> = caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            let h =
                layer.attn.forward_rows(&layer.input_norm.forward(&x)?, (&self.rope, &cos, &sin), &masks, &mut kvs)?;
            x = (x + h)?;
            x = (&x + layer.mlp.apply(&layer.post_attn_norm.forward(&x)?, Linear::forward_apart)?)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        Ok(self.lm_head.forward_apart(&self.norm.forward(&x)?)?.to_dtype(DType::F32)?)
    }

    /// Final-norm hidden states (B*T, C), and those of the layers `taps` (see [`Self::states_at`]).
    fn hidden(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, taps: &[usize]) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(&bad) = taps.iter().find(|&&l| l > self.layers.len()) {
            return Err(ModelError::Invalid(format!(
                "layer {bad} does not exist: the model has layers 0 (embeddings) to {}",
                self.layers.len()
            )));
        }
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let pads = match cache.as_ref() {
            Some(c) if c.pads.len() != b => {
                return Err(ModelError::Invalid(format!("cache holds {} rows, input has {b}", c.pads.len())))
            }
            Some(c) => c.pads.clone(),
            None => vec![0; b],
        };
        if past + t > self.cfg.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "sequence of {} tokens exceeds max_position_embeddings {}",
                past + t,
                self.cfg.max_position_embeddings
            )));
        }
        let positions: Vec<u32> =
            pads.iter().flat_map(|&p| (past..past + t).map(move |a| a.saturating_sub(p) as u32)).collect();
        let positions = Tensor::from_vec(positions, (b, t), &self.device)?;
        let (cos, sin) = self.rope.tables(&positions)?;
        // One mask per distinct window (full attention and, for Mistral/Qwen2, the sliding one).
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for layer in &self.layers {
            if !masks.iter().any(|(w, _)| *w == layer.window) {
                masks.push((layer.window, attention_mask(&pads, past, t, layer.window, &self.device)?));
            }
        }

        let mut x = self.embed.lookup(&ids.flatten_all()?)?;
        let mut states: Vec<Option<Tensor>> = vec![None; self.layers.len() + 1];
        let mut keep = |i: usize, x: &Tensor| {
            if taps.contains(&i) {
                states[i] = Some(x.clone());
            }
        };
        keep(0, &x);
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let mask = masks.iter().find(|(w, _)| *w == layer.window).and_then(|(_, m)| m.as_ref());
            let h = layer.attn.forward(&layer.input_norm.forward(&x)?, (b, t), (&self.rope, &cos, &sin), mask, kv)?;
            x = (x + h)?;
            x = (&x + layer.mlp.forward(&layer.post_attn_norm.forward(&x)?)?)?;
            if i + 1 < self.layers.len() {
                keep(i + 1, &x);
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let x = self.norm.forward(&x)?;
        keep(self.layers.len(), &x);
        let tapped = taps.iter().map(|&l| states[l].clone().expect("kept above")).collect();
        Ok((x, tapped))
    }

    /// Loads a model from a folder in the HF layout for inference, computing in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        Self::from_weights(&cfg, &Weights::Files(weight_files(dir)?), device, dtype)
    }

    /// A model for inference with its weights taken from `weights`.
    pub fn from_weights(cfg: &LlamaConfig, weights: &Weights, device: &Device, dtype: DType) -> Result<Self> {
        let (varmap, _) = Self::with_varmap(cfg, device, dtype)?;
        load_weights(&varmap, weights)?;
        // Plain tensors, not Vars: ops on Vars record the graph for a backward pass, which would
        // keep every activation of a forward alive until its output is dropped.
        let tensors = tensors(&varmap).into_iter().map(|(k, t)| (k, t.detach())).collect();
        let mut model = Self::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))?;
        model.freeze()?;
        Ok(model)
    }

    /// A model for decoding on the CPU with its matrices quantized as `scheme` says: the
    /// projections, embeddings and head whose rows are whole blocks of 32; the rest (norms,
    /// biases, odd-sized matrices) in f32. No f32 copy of a quantized matrix is kept.
    pub fn quantized(cfg: &LlamaConfig, weights: &Weights, scheme: Scheme) -> Result<Self> {
        let reader = Reader::new(weights)?;
        let quant = |name: &str, (rows, cols): (usize, usize)| -> Result<Option<Arc<QMatrix>>> {
            let stored = match scheme {
                Scheme::Stored => reader.quantized(name)?,
                Scheme::Q8 => None,
            };
            let q = match stored {
                Some(q) => Some(q),
                // Q8 at load, and a stored encoding without a kernel (Q6_K, F16, ...): Q8_0 of its
                // f32 values (its error, ≤ amax/254 per block of 32, is below any 6-bit code's).
                None => {
                    let t = reader.require(name)?;
                    check_shape(name, &t, &[rows, cols])?;
                    QMatrix::q8_0(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, rows, cols)
                }
            };
            if let Some(q) = &q {
                if (q.rows(), q.cols()) != (rows, cols) {
                    let (found, expected) = (vec![q.rows(), q.cols()], vec![rows, cols]);
                    return Err(ModelError::ShapeMismatch { name: name.to_string(), found, expected });
                }
            }
            Ok(q.map(Arc::new))
        };
        let vb = VarBuilder::from_backend(Box::new(Lazy(&reader)), DType::F32, Device::Cpu);
        let mut model = Self::build(cfg, vb, &quant)?;
        model.freeze()?;
        Ok(model)
    }

    /// Lays the projections out for inference (see [`Weight::Dense`]). The model must not be
    /// trained afterwards: the transposed copies would not follow the weights.
    fn freeze(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            let (a, m) = (&mut layer.attn, &mut layer.mlp);
            for lin in [&mut a.q, &mut a.k, &mut a.v, &mut a.o, &mut m.gate, &mut m.up, &mut m.down] {
                lin.freeze()?;
            }
        }
        self.lm_head.freeze()
    }

    /// A model whose weights are f32 `Var`s in the returned map (zero until initialized or loaded).
    pub fn trainable(cfg: &LlamaConfig, device: &Device) -> Result<(VarMap, Self)> {
        Self::with_varmap(cfg, device, DType::F32)
    }

    fn with_varmap(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<(VarMap, Self)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let model = Self::new(cfg, vb)?;
        Ok((varmap, model))
    }
}

/// How [`Llama::quantized`] quantizes the matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Q8_0 of the f32 weights, at load.
    Q8,
    /// The blocks the file stores (a GGUF file's Q8_0, Q4_0, Q4_1, Q4_K).
    Stored,
}

fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(ModelError::ShapeMismatch {
            name: name.into(),
            found: t.dims().to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// The dense tensors of a quantized model, read from the weights as the model asks for them.
struct Lazy<'a>(&'a Reader<'a>);

impl candle_nn::var_builder::SimpleBackend for Lazy<'_> {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        check_shape(name, &t, shape.dims()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.0.require(name).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).ok().flatten().is_some()
    }
}

/// Additive mask (B, 1, T, S): query t of row b (absolute position past+t) sees keys at or
/// before it, within `window` keys of it (itself included, as transformers counts), and no
/// padding except itself (so padded rows never softmax over nothing). None when nothing needs
/// masking (one new token, no padding, all keys in the window).
fn attention_mask(
    pads: &[usize],
    past: usize,
    t: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let s = past + t;
    if t == 1 && pads.iter().all(|&p| p == 0) && window.is_none_or(|w| s <= w) {
        return Ok(None);
    }
    let mut m = vec![0f32; pads.len() * t * s];
    for (bi, &pad) in pads.iter().enumerate() {
        for qi in 0..t {
            let a = past + qi;
            for kj in 0..s {
                let outside = window.is_some_and(|w| kj + w <= a);
                if kj > a || (kj < pad && kj != a) || outside {
                    m[(bi * t + qi) * s + kj] = -1e9;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (pads.len(), 1, t, s), dev)?))
}
