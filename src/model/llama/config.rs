//! `config.json` of the llama family: the keys kdllm reads, their defaults, and checks.

use super::*;

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
    pub(super) fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2" || (self.model_type == "llama" && self.attention_bias)
    }

    pub(super) fn o_bias(&self) -> bool {
        self.model_type == "llama" && self.attention_bias
    }

    pub(super) fn mlp_bias(&self) -> bool {
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
