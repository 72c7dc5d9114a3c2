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
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

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

/// `eos_token_id` in HF configs is either one id or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Mirrors the fields of HF `LlamaConfig`, `MistralConfig` and `Qwen2Config` that change the
/// computation; names match config.json. The three are one decoder: Mistral adds a sliding
/// attention window, Qwen2 adds q/k/v biases (and an optional window on its upper layers).
/// `vocab_size: 0` (the default, e.g. in a recipe) means "take it from the tokenizer".
/// Strict about keys, so a typo in a recipe is an error; `from_file` drops the many other keys
/// an HF config.json carries before parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default)]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral: every layer attends to at most this many keys (itself included).
    /// Qwen2: the window of the layers from `max_window_layers` up, when `use_sliding_window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Per layer `full_attention` or `sliding_attention` (Qwen2); derived when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
}

/// The `model_type`s this decoder implements.
pub const SUPPORTED_MODEL_TYPES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// RoPE frequency scaling from `rope_scaling` (the types that do not depend on sequence length).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's band-wise scaling of the inverse frequencies.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

fn default_model_type() -> String {
    "llama".to_string()
}

fn default_max_position_embeddings() -> usize {
    2048
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".to_string()
}

impl LlamaConfig {
    /// Every key this struct reads (kept in sync by a test).
    pub const FIELDS: [&'static str; 22] = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "hidden_act",
        "bos_token_id",
        "eos_token_id",
        "rope_scaling",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
    ];

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::ReadConfig { path: path.to_path_buf(), source })?;
        let mut raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| ModelError::ParseConfig { path: path.to_path_buf(), source })?;
        if let Some(arch) = raw.get("model_type").and_then(|v| v.as_str()) {
            if !SUPPORTED_MODEL_TYPES.contains(&arch) {
                return Err(ModelError::Unsupported { path: path.to_path_buf(), model_type: arch.to_string() });
            }
        }
        if let Some(obj) = raw.as_object_mut() {
            obj.retain(|k, _| Self::FIELDS.contains(&k.as_str()));
            // transformers' per-class defaults for absent keys (an explicit null means "none" for
            // the window and "= num_attention_heads" for the kv heads).
            let model_type = obj.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama");
            let defaults: &[(&str, usize)] = match model_type {
                "mistral" => &[("sliding_window", 4096), ("num_key_value_heads", 8)],
                "qwen2" => &[("sliding_window", 4096), ("num_key_value_heads", 32)],
                _ => &[],
            };
            for (key, value) in defaults {
                obj.entry(*key).or_insert((*value).into());
            }
        }
        let cfg: LlamaConfig = serde_json::from_value(raw)
            .map_err(|source| ModelError::ParseConfig { path: path.to_path_buf(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be > 0"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "`hidden_size` ({}) must be divisible by `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim()));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({kv})",
                self.num_attention_heads
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!("`hidden_act` `{}` is not supported; use `silu`", self.hidden_act));
        }
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return bad(format!(
                "`model_type` `{}` is not supported; supported: {}",
                self.model_type,
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        self.rope_scaling()?;
        if self.sliding_window == Some(0) {
            return bad("`sliding_window` must be > 0 (or absent for full attention)".into());
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return bad(format!("`layer_types` has {} entries for {} layers", types.len(), self.num_hidden_layers));
            }
            if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
                return bad(format!(
                    "`layer_types` entry `{t}` is not supported; use full_attention or sliding_attention"
                ));
            }
        }
        Ok(())
    }

    /// The parsed `rope_scaling`; `None` for absent, null or `rope_type: default`.
    pub fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else { return Ok(None) };
        let bad = |m: String| ModelError::Invalid(format!("`rope_scaling`: {m}"));
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            v.get(key).and_then(|x| x.as_f64()).ok_or_else(|| bad(format!("type `{kind}` needs a number `{key}`")))
        };
        let scaling = match kind {
            "default" => return Ok(None),
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: v
                    .get("original_max_position_embeddings")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(self.max_position_embeddings as f64),
            },
            other => {
                return Err(bad(format!(
                    "type `{other}` is not supported; supported: linear, llama3 (dynamic, yarn and longrope are not)"
                )))
            }
        };
        let factor = match scaling {
            RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } => factor,
        };
        if !(factor > 0.0 && factor.is_finite()) {
            return Err(bad(format!("`factor` must be > 0, got {factor}")));
        }
        if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } = scaling {
            if high_freq_factor <= low_freq_factor {
                return Err(bad("`high_freq_factor` must be larger than `low_freq_factor`".into()));
            }
        }
        Ok(Some(scaling))
    }

    /// The attention window of layer `i`, as transformers decides it per model type.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.model_type.as_str() {
            "mistral" => self.sliding_window,
            "qwen2" => {
                let slides = match &self.layer_types {
                    Some(types) => types[layer] == "sliding_attention",
                    None => self.use_sliding_window == Some(true) && layer >= self.max_window_layers.unwrap_or(28),
                };
                if slides {
                    self.sliding_window
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Qwen2 always has q/k/v biases; Llama's `attention_bias` adds them to all four projections.
    fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || (self.model_type == "llama" && self.attention_bias)
    }

    fn o_bias(&self) -> bool {
        self.model_type == "llama" && self.attention_bias
    }

    fn mlp_bias(&self) -> bool {
        self.model_type == "llama" && self.mlp_bias
    }

    /// Parameter count, embeddings included (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (h, k, d) = (self.num_attention_heads, self.num_kv_heads(), self.head_dim());
        let attn = c * h * d * 2 + c * k * d * 2;
        let attn_bias = if self.qkv_bias() { h * d + 2 * k * d } else { 0 } + if self.o_bias() { c } else { 0 };
        let mlp_bias = if self.mlp_bias() { 2 * f + c } else { 0 };
        let layer = attn + attn_bias + 3 * c * f + mlp_bias + 2 * c;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.num_hidden_layers * layer + c + head
    }

    /// The config.json that transformers reads back as `LlamaForCausalLM`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        let obj = v.as_object_mut().expect("config is an object");
        let arch = match self.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        obj.insert("architectures".into(), serde_json::json!([arch]));
        obj.insert("model_type".into(), self.model_type.clone().into());
        obj.insert("torch_dtype".into(), "float32".into());
        if self.model_type != "llama" {
            // Absent means 4096 to transformers' Mistral/Qwen2 configs; null means no window.
            obj.insert("sliding_window".into(), self.sliding_window.into());
        }
        obj.insert("num_key_value_heads".into(), self.num_kv_heads().into());
        obj.insert("head_dim".into(), self.head_dim().into());
        obj.insert("attention_dropout".into(), 0.0.into());
        obj.insert("initializer_range".into(), 0.02.into());
        obj.insert("pretraining_tp".into(), 1.into());
        obj.insert("use_cache".into(), true.into());
        v
    }
}

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

/// `x Wᵀ (+ b)` with W stored as (out, in), HF's layout.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    add_bias(x.matmul(&w.t()?)?, b)
}

fn add_bias(y: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A projection `y = x Wᵀ (+ b)` with HF's `<name>.weight` / `<name>.bias`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Wᵀ stored contiguous, (in, out), for inference: the GEMM then reads the weights as they
    /// lie instead of repacking all of them at every decode step. `None` while training.
    weight_t: Option<Tensor>,
}

impl Linear {
    fn new(vb: &VarBuilder, out: usize, inp: usize, name: &str, bias: bool) -> Result<Self> {
        let vb = vb.pp(name);
        let weight = vb.get_with_hints((out, inp), "weight", candle_nn::Init::Const(0.0))?;
        let bias = if bias { Some(vb.get_with_hints(out, "bias", candle_nn::Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, weight_t: None })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight_t {
            Some(wt) => {
                let y = match ops::matmul_few_rows(x, &self.weight)? {
                    Some(y) => y,
                    None => x.matmul(wt)?,
                };
                add_bias(y, self.bias.as_ref())
            }
            None => linear(x, &self.weight, self.bias.as_ref()),
        }
    }

    fn freeze(&mut self) -> Result<()> {
        self.weight_t = Some(self.weight.t()?.contiguous()?);
        Ok(())
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
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (c, f, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias());
        Ok(Self {
            gate: Linear::new(&vb, f, c, "gate_proj", bias)?,
            up: Linear::new(&vb, f, c, "up_proj", bias)?,
            down: Linear::new(&vb, c, f, "down_proj", bias)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let (gate, up) = (self.gate.forward(x)?.to_dtype(DType::F32)?, self.up.forward(x)?.to_dtype(DType::F32)?);
        self.down.forward(&ops::silu_mul(&gate, &up)?.to_dtype(dtype)?)
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
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (c, h, k, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let qkv_bias = cfg.qkv_bias();
        Ok(Self {
            q: Linear::new(&vb, h * d, c, "q_proj", qkv_bias)?,
            k: Linear::new(&vb, k * d, c, "k_proj", qkv_bias)?,
            v: Linear::new(&vb, k * d, c, "v_proj", qkv_bias)?,
            o: Linear::new(&vb, c, h * d, "o_proj", cfg.o_bias())?,
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
        let heads = |w: &Linear, n: usize| -> Result<Tensor> { Ok(w.forward(x)?.reshape((b, t, n, d))?) };
        let (rope, cos, sin) = rope;
        let q = rope.apply(&heads(&self.q, self.heads)?, cos, sin)?;
        let mut k = rope.apply(&heads(&self.k, self.kv_heads)?, cos, sin)?;
        let mut v = heads(&self.v, self.kv_heads)?.transpose(1, 2)?.contiguous()?;
        let decoding = kv.is_some();
        if let Some(cache) = kv {
            // Written in place into a preallocated buffer (no backward; decoding only).
            (k, v) = cache.append(&k.contiguous()?, &v.contiguous()?)?;
        }
        if decoding && t == 1 && q.dtype() == DType::F32 {
            let out = ops::decode_attention(&q, &k, &v, 1.0 / (d as f64).sqrt(), mask)?;
            return self.o.forward(&out.reshape((b, self.heads * d))?);
        }
        // In f32 whatever the compute dtype (HF's eager attention softmaxes in f32); out (B, T, H, D).
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        let out = ops::attention(&f32(&q)?, &f32(&k)?, &f32(&v)?, 1.0 / (d as f64).sqrt(), mask)?;
        self.o.forward(&out.to_dtype(q.dtype())?.reshape((b * t, self.heads * d))?)
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
    fn new(cfg: &LlamaConfig, layer: usize, vb: VarBuilder) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_norm: RmsNorm::new(c, eps, vb.pp("input_layernorm"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attn_norm: RmsNorm::new(c, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
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
    embed: Tensor,
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
        cfg.validate()?;
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let embed = vb.pp("model.embed_tokens").get_with_hints((v, c), "weight", candle_nn::Init::Const(0.0))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, i, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(c, cfg.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear { weight: embed.clone(), bias: None, weight_t: None }
        } else {
            Linear::new(&vb, v, c, "lm_head", false)?
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
        self.embed.dtype()
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

        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
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

    /// Lays the projections out for inference (see [`Linear::weight_t`]). The model must not be
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

/// Where a checkpoint's tensors come from, by HF name.
pub enum Weights {
    /// safetensors files (one, or the shards of an index); stored dtypes f32, f16 or bf16.
    Files(Vec<PathBuf>),
    /// Tensors already in memory (e.g. dequantized from a GGUF file).
    Tensors(HashMap<String, Tensor>),
}

/// The safetensors files of a checkpoint folder (single file or sharded with an index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return Ok(shard_names(&index)?.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(ModelError::NoWeights(dir.to_path_buf()))
}

/// The shard files a `model.safetensors.index.json` names, sorted, each once.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let err = |message: String| ModelError::Index { path: index.to_path_buf(), message };
    let text = std::fs::read_to_string(index).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| err("no `weight_map` object".into()))?;
    let mut shards: Vec<String> = map
        .values()
        .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| err("a `weight_map` value is not a file name".into())))
        .collect::<Result<_>>()?;
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Fills every Var of `varmap` from `weights`, checking names and shapes, converting dtypes.
pub fn load_weights(varmap: &VarMap, weights: &Weights) -> Result<()> {
    type Get<'a> = Box<dyn Fn(&str) -> Option<Tensor> + 'a>;
    let (get, describe): (Get, String) = match weights {
        Weights::Files(files) => {
            let describe = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
            // SAFETY: the files are opened read-only and not modified while mapped.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
                .map_err(|e| ModelError::Safetensors { path: describe.clone(), message: e.to_string() })?;
            (Box::new(move |name| st.load(name, &Device::Cpu).ok()), describe)
        }
        Weights::Tensors(map) => (Box::new(|name| map.get(name).cloned()), "the loaded checkpoint".to_string()),
    };
    let data = varmap.data().lock().expect("varmap lock");
    // Sorted, so the first problem reported is the same on every run.
    let mut vars: Vec<(&String, &Var)> = data.iter().collect();
    vars.sort_by_key(|(name, _)| *name);
    for (name, var) in vars {
        let tensor =
            get(name).ok_or_else(|| ModelError::MissingTensor { name: name.clone(), files: describe.clone() })?;
        if tensor.dims() != var.dims() {
            return Err(ModelError::ShapeMismatch {
                name: name.clone(),
                found: tensor.dims().to_vec(),
                expected: var.dims().to_vec(),
            });
        }
        var.set(&tensor.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// HF's initialization: N(0, 0.02) for projections and embeddings, ones for norms; seeded.
pub fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            (0..n).map(|_| 0.02 * standard_normal(&mut rng) as f32).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

pub(crate) fn standard_normal(rng: &mut StdRng) -> f64 {
    // Box–Muller; good enough for initialization and reproducible for a seed.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Writes config.json and model.safetensors (HF names, f32) into `dir`.
pub fn save(cfg: &LlamaConfig, varmap: &VarMap, dir: &Path) -> Result<()> {
    save_tensors(cfg, &tensors(varmap), dir)
}

/// The weights of `varmap` under their HF names (sharing storage with the Vars).
pub fn tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
}

/// Writes config.json and model.safetensors from tensors under their HF names.
pub fn save_tensors(cfg: &LlamaConfig, tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Write { path: dir.to_path_buf(), source })?;
    let cfg_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&cfg.to_hf_json()).expect("json");
    std::fs::write(&cfg_path, json).map_err(|source| ModelError::Write { path: cfg_path, source })?;
    // Under a temporary name first: a run killed mid-write never leaves a torn model.safetensors.
    let (tmp, path) = (dir.join("model.safetensors.partial"), dir.join("model.safetensors"));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|source| ModelError::Write { path, source })?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny_config() -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rope_theta": 10000.0
        }))
        .unwrap()
    }

    fn tiny_model(cfg: &LlamaConfig) -> (VarMap, Llama) {
        let (vm, m) = Llama::trainable(cfg, &Device::Cpu).unwrap();
        init_weights(&vm, 7).unwrap();
        // 4x HF's init so the test sees real attention patterns, not near-uniform ones.
        for var in vm.all_vars() {
            var.set(&(var.as_tensor() * 4.0).unwrap()).unwrap();
        }
        (vm, m)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn cached_decode_matches_full_forward() {
        let cfg = tiny_config();
        let (_, m) = tiny_model(&cfg);
        let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 50) as u32).collect();
        let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
        let full = m.forward(&ids, None).unwrap();
        let mut cache = KvCache::new(&cfg, vec![0, 0]);
        let mut parts = vec![m.forward(&ids.narrow(1, 0, 5).unwrap(), Some(&mut cache)).unwrap()];
        for t in 5..12 {
            parts.push(m.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        let diff = max_abs_diff(&full, &cached);
        assert!(diff <= 1e-4, "full vs cached max abs diff {diff}");
    }

    #[test]
    fn left_padding_does_not_change_a_rows_logits() {
        let cfg = tiny_config();
        let (_, m) = tiny_model(&cfg);
        let prompt: Vec<u32> = vec![3, 9, 4, 17, 8];
        let alone = m.forward(&Tensor::new(&prompt[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap();
        let mut padded = vec![0u32, 0, 0];
        padded.extend(&prompt);
        let ids = Tensor::from_vec(padded, (1, 8), &Device::Cpu).unwrap();
        let mut cache = KvCache::new(&cfg, vec![3]);
        let out = m.forward(&ids, Some(&mut cache)).unwrap().narrow(1, 3, 5).unwrap();
        let diff = max_abs_diff(&alone, &out);
        assert!(diff <= 1e-4, "padded vs unpadded max abs diff {diff}");
    }

    fn ids(b: usize, t: usize) -> Tensor {
        let v: Vec<u32> = (0..b * t).map(|i| (i * 7 % 50) as u32).collect();
        Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
    }

    /// Prefill 5 tokens, then decode one at a time; must equal the full forward.
    fn assert_cache_matches_full(cfg: &LlamaConfig) {
        let (_, m) = tiny_model(cfg);
        let ids = ids(2, 12);
        let full = m.forward(&ids, None).unwrap();
        let mut cache = KvCache::new(cfg, vec![0, 0]);
        let mut parts = vec![m.forward(&ids.narrow(1, 0, 5).unwrap(), Some(&mut cache)).unwrap()];
        for t in 5..12 {
            parts.push(m.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
        }
        let diff = max_abs_diff(&full, &Tensor::cat(&parts, 1).unwrap());
        assert!(diff <= 1e-4, "{}: full vs cached max abs diff {diff}", cfg.model_type);
    }

    fn variant(json: serde_json::Value) -> LlamaConfig {
        let mut base = serde_json::to_value(tiny_config()).unwrap();
        base.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn sliding_window_masks_old_keys_and_the_cache_agrees() {
        let mistral = variant(serde_json::json!({"model_type": "mistral", "sliding_window": 3}));
        assert_cache_matches_full(&mistral);
        let (vm, m) = tiny_model(&mistral);
        let ids = ids(1, 10);
        let windowed = m.forward(&ids, None).unwrap();
        // Same weights without the window: the first 3 positions agree, later ones do not.
        let full_cfg = LlamaConfig { sliding_window: None, ..mistral.clone() };
        let full = Llama::from_weights(&full_cfg, &Weights::Tensors(tensors(&vm)), &Device::Cpu, DType::F32).unwrap();
        let full = full.forward(&ids, None).unwrap();
        assert!(max_abs_diff(&windowed.narrow(1, 0, 3).unwrap(), &full.narrow(1, 0, 3).unwrap()) <= 1e-5);
        assert!(max_abs_diff(&windowed.narrow(1, 3, 7).unwrap(), &full.narrow(1, 3, 7).unwrap()) > 1e-3);
        // Qwen2 slides only from `max_window_layers` up, and only with use_sliding_window.
        let qwen = variant(
            serde_json::json!({"model_type": "qwen2", "sliding_window": 3, "use_sliding_window": true, "max_window_layers": 1}),
        );
        assert_eq!((qwen.window(0), qwen.window(1)), (None, Some(3)));
        assert_cache_matches_full(&qwen);
        let off = LlamaConfig { use_sliding_window: Some(false), ..qwen };
        assert_eq!((off.window(0), off.window(1)), (None, None));
    }

    #[test]
    fn biases_are_loaded_and_trained() {
        for (json, biases) in [
            (serde_json::json!({"model_type": "qwen2"}), 3),
            (serde_json::json!({"attention_bias": true, "mlp_bias": true}), 7),
        ] {
            let cfg = variant(json);
            let (vm, m) = tiny_model(&cfg);
            let names = tensors(&vm);
            let n = names.keys().filter(|k| k.ends_with(".bias")).count();
            assert_eq!(n, biases * cfg.num_hidden_layers, "{}", cfg.model_type);
            assert_eq!(names.values().map(|t| t.elem_count()).sum::<usize>(), cfg.num_params());
            let logits = m.forward(&ids(1, 6), None).unwrap();
            let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in vm.data().lock().unwrap().iter().filter(|(k, _)| k.ends_with(".bias")) {
                assert!(grads.get(var).is_some(), "no gradient for {name}");
            }
        }
    }

    #[test]
    fn llama3_rope_scaling_follows_the_three_bands() {
        // head_dim 8: four frequencies 1, 0.1, 0.01, 0.001 at theta 1e4. Wavelengths 6.3, 63, 628,
        // 6283 against original length 64: high band (< 16) kept, low band (> 64) divided by 8.
        let cfg = variant(serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "rope_scaling":
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}}));
        let f = inv_freq(&cfg).unwrap();
        let smooth = (64.0 / (2.0 * std::f64::consts::PI / 0.1) - 1.0) / 3.0;
        let expected = [1.0, (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1, 0.01 / 8.0, 0.001 / 8.0];
        for (got, want) in f.iter().zip(expected) {
            assert!((*got as f64 - want).abs() <= 1e-6 * want.max(1e-3), "{f:?} vs {expected:?}");
        }
        let linear = variant(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}));
        assert!((inv_freq(&linear).unwrap()[0] - 0.5).abs() < 1e-7);
        for (scaling, needle) in [
            (serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "type `yarn` is not supported"),
            (serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "needs a number `low_freq_factor`"),
        ] {
            let cfg = LlamaConfig { rope_scaling: Some(scaling), ..tiny_config() };
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn bf16_compute_stays_close_to_f32() {
        let cfg = tiny_config();
        let (vm, m) = tiny_model(&cfg);
        let half = Llama::from_weights(&cfg, &Weights::Tensors(tensors(&vm)), &Device::Cpu, DType::BF16).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        let ids = ids(2, 8);
        let (a, b) = (m.forward(&ids, None).unwrap(), half.forward(&ids, None).unwrap());
        assert_eq!(b.dtype(), DType::F32, "logits come back in f32");
        let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff > 0.0 && diff < 0.05 * scale, "bf16 vs f32 diff {diff} (logit scale {scale})");
    }

    #[test]
    fn unsupported_architectures_and_broken_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"model_type": "phi3", "hidden_size": 8}"#).unwrap();
        let err = LlamaConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("model_type `phi3` is not supported; supported: llama, mistral, qwen2"), "{err}");
        std::fs::write(&path, r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}"#).unwrap();
        let err = LlamaConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("missing field `intermediate_size`"), "{err}");

        let (vm, _) = tiny_model(&tiny_config());
        let mut partial = tensors(&vm);
        partial.remove("model.layers.1.self_attn.k_proj.weight");
        let err = Llama::from_weights(&tiny_config(), &Weights::Tensors(partial), &Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor `model.layers.1.self_attn.k_proj.weight` is missing"), "{err}");

        let cfg = tiny_config();
        let (vm, _) = tiny_model(&cfg);
        save(&cfg, &vm, dir.path()).unwrap();
        let weights = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let err = Llama::load(dir.path(), &Device::Cpu, DType::F32).unwrap_err().to_string();
        assert!(err.contains("model.safetensors") && err.contains("is the file complete"), "{err}");
    }

    #[test]
    fn mistral_config_without_a_window_key_gets_transformers_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let base = r#""hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": null, "vocab_size": 4"#;
        std::fs::write(&path, format!(r#"{{"model_type": "mistral", {base}}}"#)).unwrap();
        assert_eq!(LlamaConfig::from_file(&path).unwrap().sliding_window, Some(4096));
        std::fs::write(&path, format!(r#"{{"model_type": "mistral", "sliding_window": null, {base}}}"#)).unwrap();
        let cfg = LlamaConfig::from_file(&path).unwrap();
        assert_eq!(cfg.sliding_window, None);
        assert_eq!(cfg.to_hf_json()["sliding_window"], serde_json::Value::Null, "exported as an explicit null");
        assert_eq!(cfg.to_hf_json()["architectures"][0], "MistralForCausalLM");
        // Absent kv heads mean 8 to MistralConfig (32 to Qwen2Config), not num_attention_heads.
        let heads = r#""hidden_size": 32, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 16, "vocab_size": 4"#;
        std::fs::write(&path, format!(r#"{{"model_type": "mistral", {heads}}}"#)).unwrap();
        assert_eq!(LlamaConfig::from_file(&path).unwrap().num_kv_heads(), 8);
    }

    #[test]
    fn hidden_states_are_numbered_as_transformers_numbers_them() {
        // 0: the embeddings; 1: the output of decoder layer 1; 2 = num_hidden_layers: the
        // final-norm output the head reads.
        let (vm, m) = tiny_model(&tiny_config());
        let ids = Tensor::from_vec((1..13u32).collect::<Vec<_>>(), (2, 6), &Device::Cpu).unwrap();
        let rows = Tensor::new(&[1u32, 4, 7, 11], &Device::Cpu).unwrap();
        let (x, taps) = m.states_at(&ids, &rows, &[2, 0, 1]).unwrap();
        assert_eq!(max_abs_diff(&taps[0], &x), 0.0, "the last layer is the final-norm output");
        let embed = vm.data().lock().unwrap()["model.embed_tokens.weight"].as_tensor().clone();
        let want = embed.index_select(&ids.flatten_all().unwrap().index_select(&rows, 0).unwrap(), 0).unwrap();
        assert_eq!(max_abs_diff(&taps[1], &want), 0.0, "layer 0 is the embeddings");
        assert!(max_abs_diff(&taps[2], &taps[1]) > 1e-3 && max_abs_diff(&taps[2], &x) > 1e-3);
        assert_eq!(max_abs_diff(&m.head(&x).unwrap(), &m.forward_at(&ids, &rows).unwrap()), 0.0);
        let err = m.states_at(&ids, &rows, &[3]).unwrap_err().to_string();
        assert!(err.contains("layer 3 does not exist") && err.contains("0 (embeddings) to 2"), "{err}");
        // A tapped layer carries the gradient back to the layers below it.
        let g = taps[2].sum_all().unwrap().backward().unwrap();
        assert!(g.get(vm.data().lock().unwrap()["model.layers.0.mlp.down_proj.weight"].as_tensor()).is_some());
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for tie in [false, true] {
            let cfg = LlamaConfig { tie_word_embeddings: tie, ..tiny_config() };
            let (vm, m) = tiny_model(&cfg);
            let ids = Tensor::from_vec((0..16u32).collect::<Vec<_>>(), (2, 8), &Device::Cpu).unwrap();
            let logits = m.forward(&ids, None).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits.reshape((16, 50)).unwrap(), &ids.flatten_all().unwrap())
                .unwrap();
            let grads = loss.backward().unwrap();
            let data = vm.data().lock().unwrap();
            assert_eq!(data.len(), cfg.num_hidden_layers * 9 + 2 + usize::from(!tie));
            for (name, var) in data.iter() {
                let g = grads.get(var).unwrap_or_else(|| panic!("no gradient for {name} (tie={tie})"));
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(norm > 0.0, "zero gradient for {name}");
            }
        }
    }

    #[test]
    fn forward_at_gives_the_selected_rows_of_the_full_forward() {
        let cfg = tiny_config();
        let (_, m) = tiny_model(&cfg);
        let ids = ids(2, 6);
        let full = m.forward(&ids, None).unwrap().reshape((12, cfg.vocab_size)).unwrap();
        let rows = Tensor::new(&[1u32, 4, 7, 11], &Device::Cpu).unwrap();
        let got = m.forward_at(&ids, &rows).unwrap();
        assert!(max_abs_diff(&got, &full.index_select(&rows, 0).unwrap()) < 1e-5);
    }

    #[test]
    fn save_then_load_gives_the_same_logits() {
        let cfg = LlamaConfig { vocab_size: 50, ..tiny_config() };
        let (vm, m) = tiny_model(&cfg);
        let dir = tempfile::tempdir().unwrap();
        save(&cfg, &vm, dir.path()).unwrap();
        let loaded = Llama::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let ids = Tensor::from_vec((0..10u32).collect::<Vec<_>>(), (1, 10), &Device::Cpu).unwrap();
        // Same weights; the inference model multiplies by a transposed copy, so only rounding differs.
        let diff = max_abs_diff(&m.forward(&ids, None).unwrap(), &loaded.forward(&ids, None).unwrap());
        assert!(diff <= 5e-5, "save → load changed logits by {diff}");
        assert_eq!(vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(), cfg.num_params());
    }

    #[test]
    fn fields_lists_every_key() {
        let full = LlamaConfig {
            num_key_value_heads: Some(2),
            head_dim: Some(8),
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            rope_scaling: Some(serde_json::json!({"type": "llama3"})),
            sliding_window: Some(4),
            use_sliding_window: Some(true),
            max_window_layers: Some(1),
            layer_types: Some(vec!["full_attention".into(), "sliding_attention".into()]),
            ..tiny_config()
        };
        let v = serde_json::to_value(&full).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut fields = LlamaConfig::FIELDS.to_vec();
        keys.sort_unstable();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        let typo = serde_json::json!({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "tie_word_embedding": true});
        let err = serde_json::from_value::<LlamaConfig>(typo).unwrap_err().to_string();
        assert!(err.contains("tie_word_embedding"), "{err}");
    }

    #[test]
    fn shape_mismatch_names_the_tensor() {
        let cfg = tiny_config();
        let (vm, _) = tiny_model(&cfg);
        let dir = tempfile::tempdir().unwrap();
        save(&cfg, &vm, dir.path()).unwrap();
        let bigger = LlamaConfig { intermediate_size: 64, ..cfg };
        let (vm2, _) = Llama::trainable(&bigger, &Device::Cpu).unwrap();
        let err =
            load_weights(&vm2, &Weights::Files(vec![dir.path().join("model.safetensors")])).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.mlp.down_proj.weight") && err.contains("[32, 48]"), "{err}");
    }
}
