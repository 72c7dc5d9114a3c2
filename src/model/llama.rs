//! Llama-family decoder (Touvron et al. 2023), laid out like Hugging Face `LlamaForCausalLM`.
//!
//! Unlike candle-transformers' inference model, this one returns logits for every position and
//! is built only from ops that have a backward pass (candle's fused `rms_norm`, `rope` and
//! `softmax_last_dim` silently cut the graph), so the same code trains and decodes.
//!
//! Shapes: B batch, T new tokens, S keys (cached + new), C hidden, H heads, K kv heads,
//! D head dim, V vocab. Hidden states are kept flat as (B*T, C) so every projection is one GEMM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
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

/// Mirrors the fields of HF `LlamaConfig` that change the computation; names match config.json.
/// `vocab_size: 0` (the default, e.g. in a recipe) means "take it from the tokenizer".
/// Strict about keys, so a typo in a recipe is an error; `from_file` drops the many other keys
/// an HF config.json carries before parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
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
    pub const FIELDS: [&'static str; 17] = [
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
    ];

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::ReadConfig { path: path.to_path_buf(), source })?;
        let mut raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|source| ModelError::ParseConfig { path: path.to_path_buf(), source })?;
        if let Some(arch) = raw.get("model_type").and_then(|v| v.as_str()) {
            if arch != "llama" {
                return Err(ModelError::Invalid(format!(
                    "{}: model_type `{arch}` is not supported; supported: llama",
                    path.display()
                )));
            }
        }
        if let Some(obj) = raw.as_object_mut() {
            obj.retain(|k, _| Self::FIELDS.contains(&k.as_str()));
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
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "`hidden_size` ({}) must be divisible by `num_attention_heads` ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!("head dim {} must be even for RoPE", self.head_dim()));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return bad(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({kv})",
                self.num_attention_heads
            ));
        }
        if self.hidden_act != "silu" {
            return bad(format!("`hidden_act` `{}` is not supported; use `silu`", self.hidden_act));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return bad("`rope_scaling` is not supported yet; remove it or use a model without it".into());
        }
        if self.attention_bias || self.mlp_bias {
            return bad("`attention_bias` / `mlp_bias` are not supported for llama yet".into());
        }
        Ok(())
    }

    /// Parameter count, embeddings included (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (h, k, d) = (self.num_attention_heads, self.num_kv_heads(), self.head_dim());
        let attn = c * h * d * 2 + c * k * d * 2;
        let layer = attn + 3 * c * f + 2 * c;
        let head = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + self.num_hidden_layers * layer + c + head
    }

    /// The config.json that transformers reads back as `LlamaForCausalLM`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serializes");
        let obj = v.as_object_mut().expect("config is an object");
        obj.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        obj.insert("model_type".into(), "llama".into());
        obj.insert("torch_dtype".into(), "float32".into());
        obj.insert("num_key_value_heads".into(), self.num_kv_heads().into());
        obj.insert("head_dim".into(), self.head_dim().into());
        obj.insert("attention_dropout".into(), 0.0.into());
        obj.insert("initializer_range".into(), 0.02.into());
        obj.insert("pretraining_tp".into(), 1.into());
        obj.insert("use_cache".into(), true.into());
        v
    }
}

/// Precomputed RoPE tables in HF's rotate-half layout: row p holds cos/sin for position p,
/// with the D/2 frequencies repeated so the table multiplies a whole head at once.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &LlamaConfig, dev: &Device) -> Result<Self> {
        let d = cfg.head_dim();
        let inv_freq: Vec<f32> =
            (0..d / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64) as f32).collect();
        let n = cfg.max_position_embeddings;
        let inv_freq = Tensor::from_vec(inv_freq, (1, d / 2), dev)?;
        let pos = Tensor::arange(0u32, n as u32, dev)?.to_dtype(DType::F32)?.reshape((n, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// Rotates x (B, H, T, D) whose token t of row b sits at `positions[b*T + t]`.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
    }

    /// cos/sin gathered for (B, T) positions, shaped (B, 1, T, D) to broadcast over heads.
    fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let d = self.cos.dim(1)?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, 1, t, d))?;
        Ok((cos, sin))
    }
}

fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
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

    // Composed on purpose: candle's fused rms_norm has no backward.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        Ok(x.broadcast_mul(&self.weight)?)
    }
}

fn weight(vb: &VarBuilder, out: usize, inp: usize, name: &str) -> Result<Tensor> {
    Ok(vb.pp(name).get_with_hints((out, inp), "weight", candle_nn::Init::Const(0.0))?)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: weight(&vb, f, c, "gate_proj")?,
            up: weight(&vb, f, c, "up_proj")?,
            down: weight(&vb, c, f, "down_proj")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (candle_nn::ops::silu(&linear(x, &self.gate)?)? * linear(x, &self.up)?)?;
        linear(&h, &self.down)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (c, h, k, d) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        Ok(Self {
            q: weight(&vb, h * d, c, "q_proj")?,
            k: weight(&vb, k * d, c, "k_proj")?,
            v: weight(&vb, k * d, c, "v_proj")?,
            o: weight(&vb, c, h * d, "o_proj")?,
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
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let d = self.head_dim;
        let split = |w: &Tensor, n: usize| -> Result<Tensor> {
            Ok(linear(x, w)?.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let (rope, cos, sin) = rope;
        let q = rope.apply(&split(&self.q, self.heads)?, cos, sin)?;
        let mut k = rope.apply(&split(&self.k, self.kv_heads)?, cos, sin)?;
        let mut v = split(&self.v, self.kv_heads)?;
        if let Some(slot) = kv {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let k = self.repeat_kv(k)?;
        let v = self.repeat_kv(v)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, self.heads * d))?;
        linear(&out, &self.o)
    }

    /// (B, K, S, D) → (B, H, S, D) for grouped-query attention.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let n_rep = self.heads / self.kv_heads;
        if n_rep == 1 {
            return Ok(x);
        }
        let (b, k, s, d) = x.dims4()?;
        Ok(x.unsqueeze(2)?.expand((b, k, n_rep, s, d))?.reshape((b, k * n_rep, s, d))?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_norm: RmsNorm::new(c, eps, vb.pp("input_layernorm"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attn_norm: RmsNorm::new(c, eps, vb.pp("post_attention_layernorm"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }
}

/// Per-layer key/value cache for incremental decoding of a left-padded batch.
/// Row b has `pads[b]` padding tokens before its prompt; they are never attended to.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pads: Vec<usize>,
    len: usize,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig, pads: Vec<usize>) -> Self {
        Self { layers: vec![None; cfg.num_hidden_layers], pads, len: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    cfg: LlamaConfig,
    device: Device,
}

impl Llama {
    pub fn new(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let embed = vb.pp("model.embed_tokens").get_with_hints((v, c), "weight", candle_nn::Init::Const(0.0))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp(format!("model.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(c, cfg.rms_norm_eps, vb.pp("model.norm"))?;
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { weight(&vb, v, c, "lm_head")? };
        let device = vb.device().clone();
        Ok(Self { embed, layers, norm, lm_head, rope: Rope::new(cfg, &device)?, cfg: cfg.clone(), device })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits (B, T, V) for every position of `ids` (B, T). With a cache, `ids` continue the
    /// cached sequence and the cache grows by T.
    pub fn forward(&self, ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
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
        let mask = attention_mask(&pads, past, t, &self.device)?;

        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = layer.attn.forward(
                &layer.input_norm.forward(&x)?,
                (b, t),
                (&self.rope, &cos, &sin),
                mask.as_ref(),
                kv,
            )?;
            x = (x + h)?;
            x = (&x + layer.mlp.forward(&layer.post_attn_norm.forward(&x)?)?)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let logits = linear(&self.norm.forward(&x)?, &self.lm_head)?;
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Loads a model from a folder in the HF layout, for inference.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self::load_trainable(dir, device)?.1)
    }

    /// Loads a model from a folder in the HF layout with its weights as `Var`s, for training.
    pub fn load_trainable(dir: &Path, device: &Device) -> Result<(VarMap, Self)> {
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let (varmap, model) = Self::trainable(&cfg, device)?;
        load_weights(&varmap, &weight_files(dir)?)?;
        Ok((varmap, model))
    }

    /// A model whose weights are `Var`s in the returned map (all zero until initialized or loaded).
    pub fn trainable(cfg: &LlamaConfig, device: &Device) -> Result<(VarMap, Self)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Self::new(cfg, vb)?;
        Ok((varmap, model))
    }
}

/// Additive mask (B, 1, T, S): query t of row b (absolute position past+t) sees keys at or
/// before it, and no padding except itself (so padded rows never softmax over nothing).
/// None when nothing needs masking (one new token and no padding).
fn attention_mask(pads: &[usize], past: usize, t: usize, dev: &Device) -> Result<Option<Tensor>> {
    if t == 1 && pads.iter().all(|&p| p == 0) {
        return Ok(None);
    }
    let s = past + t;
    let mut m = vec![0f32; pads.len() * t * s];
    for (bi, &pad) in pads.iter().enumerate() {
        for qi in 0..t {
            let a = past + qi;
            for kj in 0..s {
                if kj > a || (kj < pad && kj != a) {
                    m[(bi * t + qi) * s + kj] = -1e9;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (pads.len(), 1, t, s), dev)?))
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

/// Fills every Var of `varmap` from safetensors files, checking names and shapes.
pub fn load_weights(varmap: &VarMap, files: &[PathBuf]) -> Result<()> {
    // SAFETY: the files are opened read-only and not modified while mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
    let describe = || files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    let data = varmap.data().lock().expect("varmap lock");
    // Sorted, so the first problem reported is the same on every run.
    let mut vars: Vec<(&String, &Var)> = data.iter().collect();
    vars.sort_by_key(|(name, _)| *name);
    for (name, var) in vars {
        let tensor = st
            .load(name, &Device::Cpu)
            .map_err(|_| ModelError::MissingTensor { name: name.clone(), files: describe() })?;
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
            (0..n).map(|_| 0.02 * standard_normal(&mut rng)).collect()
        };
        var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    }
    Ok(())
}

fn standard_normal(rng: &mut StdRng) -> f32 {
    // Box–Muller; good enough for initialization and reproducible for a seed.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Writes config.json and model.safetensors (HF names, f32) into `dir`.
pub fn save(cfg: &LlamaConfig, varmap: &VarMap, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Write { path: dir.to_path_buf(), source })?;
    let cfg_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(&cfg.to_hf_json()).expect("json");
    std::fs::write(&cfg_path, json).map_err(|source| ModelError::Write { path: cfg_path, source })?;
    let data = varmap.data().lock().expect("varmap lock");
    let tensors: HashMap<String, Tensor> =
        data.iter().map(|(k, v): (&String, &Var)| (k.clone(), v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
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
    fn save_then_load_gives_identical_logits() {
        let cfg = LlamaConfig { vocab_size: 50, ..tiny_config() };
        let (vm, m) = tiny_model(&cfg);
        let dir = tempfile::tempdir().unwrap();
        save(&cfg, &vm, dir.path()).unwrap();
        let loaded = Llama::load(dir.path(), &Device::Cpu).unwrap();
        let ids = Tensor::from_vec((0..10u32).collect::<Vec<_>>(), (1, 10), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&m.forward(&ids, None).unwrap(), &loaded.forward(&ids, None).unwrap());
        assert_eq!(diff, 0.0);
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
        let err = load_weights(&vm2, &[dir.path().join("model.safetensors")]).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.mlp.down_proj.weight") && err.contains("[32, 48]"), "{err}");
    }
}
