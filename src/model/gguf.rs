//! Llama-architecture GGUF files (llama.cpp, ollama) read as a kdllm teacher: every tensor is
//! renamed to its Hugging Face `LlamaForCausalLM` name and kept in its own encoding (dequantized
//! to f32 on demand, or multiplied as it is by [`super::quant`]); the config and tokenizer are
//! rebuilt from the metadata. Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of
//! q_proj and k_proj so that its RoPE can rotate adjacent pairs; [`unpermute_rows`] puts them back
//! in HF's rotate-half order, which is what [`Llama`] computes with.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::llama::{LlamaConfig, ModelError, Result, TensorStore};
use super::quant::{self, QMatrix};
use crate::gguf::Meta;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// A GGUF file turned into what kdllm loads from a Hugging Face folder.
#[derive(Debug, Clone)]
pub struct GgufCheckpoint {
    pub config: LlamaConfig,
    /// The tensors under their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`,
    /// ...), in the file's own encodings: dequantized, or multiplied as they are, on demand.
    pub tensors: Arc<GgufTensors>,
    pub tokenizer: Tokenizer,
}

/// A GGUF file's tensors as it stores them, by Hugging Face name.
#[derive(Debug)]
pub struct GgufTensors {
    path: PathBuf,
    tensors: HashMap<String, Stored>,
}

#[derive(Debug)]
struct Stored {
    blocks: QTensor,
    /// q and k: llama.cpp's row order over this many heads, to undo ([`unpermute_rows`]).
    heads: Option<usize>,
}

/// Reads a llama GGUF file: config and tokenizer from its metadata, every tensor's blocks.
pub fn read(path: &Path) -> Result<GgufCheckpoint> {
    let err = |message: String| ModelError::Gguf { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| err(corrupt(e)))?;
    let meta = Meta(&content.metadata);

    let arch = meta.str("general.architecture").map_err(&err)?.unwrap_or("(none)");
    if arch != "llama" {
        return Err(err(format!("GGUF architecture `{arch}` is not supported; supported: llama")));
    }
    refuse_unsupported(&meta, &content).map_err(&err)?;
    let tokenizer = Tokenizer::from_gguf(&content.metadata).map_err(|e| match e {
        TokenizerError::Gguf(m) => err(format!("tokenizer: {m}")),
        other => err(other.to_string()),
    })?;
    let config = config_from_metadata(&meta, &content).map_err(&err)?;
    config.validate().map_err(|e| err(e.to_string()))?;
    let tokenizer = tokenizer.with_model_max_length(config.max_position_embeddings as u64);

    let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort(); // the first problem reported is the same on every run
    for name in names {
        let hf = hf_name(name).map_err(&err)?;
        let blocks = content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| err(corrupt(e)))?;
        // q and k heads are counted separately under grouped-query attention.
        let heads = match name.strip_prefix("blk.").and_then(|rest| rest.split('.').nth(1)) {
            Some("attn_q") => Some(config.num_attention_heads),
            Some("attn_k") => Some(config.num_kv_heads()),
            _ => None,
        };
        tensors.insert(hf, Stored { blocks, heads });
    }
    check_tensors(&config, &tensors).map_err(&err)?;
    let tensors = Arc::new(GgufTensors { path: path.to_path_buf(), tensors });
    Ok(GgufCheckpoint { config, tensors, tokenizer })
}

impl GgufTensors {
    fn err(&self, name: &str, message: String) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), message: format!("tensor `{name}`: {message}") }
    }

    /// Every tensor, dequantized to f32 (what a Hugging Face folder holds).
    pub fn all_dense(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.tensors.len());
        for name in self.names() {
            let t = self.dense(&name)?.expect("listed");
            out.insert(name, t);
        }
        Ok(out)
    }
}

impl TensorStore for GgufTensors {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    fn dense(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(s) = self.tensors.get(name) else { return Ok(None) };
        let t = s.blocks.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        Ok(Some(match s.heads {
            Some(h) => unpermute_rows(&t, h)?,
            None => t,
        }))
    }

    fn quantized(&self, name: &str) -> Result<Option<QMatrix>> {
        let Some(s) = self.tensors.get(name) else { return Ok(None) };
        let (ty, dims) = (s.blocks.dtype(), s.blocks.shape().dims());
        let &[rows, cols] = dims else { return Ok(None) };
        if !quant::multiplies(ty) {
            return Ok(None);
        }
        let bytes = s.blocks.data()?;
        let m = QMatrix::from_ggml(ty, &bytes, rows, cols).map_err(|e| self.err(name, e))?;
        Ok(Some(match s.heads {
            Some(h) => {
                let order = unpermute_rows(&Tensor::arange(0u32, rows as u32, &Device::Cpu)?, h)?;
                let order: Vec<usize> = order.to_vec1::<u32>()?.into_iter().map(|r| r as usize).collect();
                m.select_rows(&order)
            }
            None => m,
        }))
    }
}

/// The tokenizer of a GGUF file alone (its metadata; no tensor is read).
pub fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    let err = |message: String| ModelError::Gguf { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let content = Content::read(&mut BufReader::new(file)).map_err(|e| err(corrupt(e)))?;
    Tokenizer::from_gguf(&content.metadata).map_err(|e| match e {
        TokenizerError::Gguf(m) => err(format!("tokenizer: {m}")),
        other => err(other.to_string()),
    })
}

impl GgufCheckpoint {
    /// Writes `config.json`, `model.safetensors` and the tokenizer files: a Hugging Face folder
    /// that `Llama::load`, `Tokenizer::from_folder` and transformers read.
    pub fn save(&self, dir: &Path) -> Result<()> {
        super::llama::save_tensors(&self.config, &self.tensors.all_dense()?, dir)?;
        self.tokenizer
            .save(dir)
            .map_err(|e| ModelError::Write { path: dir.to_path_buf(), source: std::io::Error::other(e.to_string()) })
    }
}

/// candle's reader errors (short reads, bounds checks) as one sentence that says what to do.
fn corrupt(e: candle_core::Error) -> String {
    format!("truncated or corrupt file ({e}); download it again")
}

/// Variants of the llama architecture whose computation `Llama` does not reproduce.
fn refuse_unsupported(meta: &Meta, content: &Content) -> std::result::Result<(), String> {
    if let Some(n) = meta.u64("llama.expert_count")?.filter(|&n| n > 0) {
        return Err(format!("mixture-of-experts llama (`llama.expert_count` = {n}) is not supported"));
    }
    if let Some(kind) = meta.str("llama.rope.scaling.type")?.filter(|&k| k != "none") {
        return Err(format!("RoPE scaling `{kind}` (`llama.rope.scaling.type`) is not supported yet"));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err("llama 3.1-style RoPE scaling (tensor `rope_freqs.weight`) is not supported yet".into());
    }
    Ok(())
}

fn config_from_metadata(meta: &Meta, content: &Content) -> std::result::Result<LlamaConfig, String> {
    let hidden = meta.required_u64("llama.embedding_length")?;
    let heads = meta.required_u64("llama.attention.head_count")?;
    let kv_heads = meta.u64("llama.attention.head_count_kv")?.unwrap_or(heads);
    let rope_dim = meta.u64("llama.rope.dimension_count")?;
    let head_dim = meta.u64("llama.attention.key_length")?.or(rope_dim).unwrap_or(hidden / heads.max(1));
    if let Some(r) = rope_dim.filter(|&r| r != head_dim) {
        return Err(format!("partial RoPE (`llama.rope.dimension_count` = {r}, head dim {head_dim}) is not supported"));
    }
    let vocab = meta
        .str_array("tokenizer.ggml.tokens")?
        .ok_or("missing metadata key `tokenizer.ggml.tokens` (the vocabulary)")?
        .len();
    let has = |suffix: &str| content.tensor_infos.keys().any(|k| k.ends_with(suffix));
    // Biases on q/k/v alone are Qwen2's layout; Llama's `attention_bias` puts one on all four.
    let qkv_only = has(".attn_q.bias") && !has(".attn_output.bias");
    let json = serde_json::json!({
        "model_type": if qkv_only { "qwen2" } else { "llama" },
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.required_u64("llama.feed_forward_length")?,
        "num_hidden_layers": meta.required_u64("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.required_u64("llama.context_length")?,
        "rms_norm_eps": meta.required_f64("llama.attention.layer_norm_rms_epsilon")?,
        // llama.cpp's default when the key is absent.
        "rope_theta": meta.f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        "bos_token_id": meta.u64("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": meta.u64("tokenizer.ggml.eos_token_id")?,
        "attention_bias": has(".attn_output.bias"),
        "mlp_bias": has(".ffn_gate.bias"),
    });
    serde_json::from_value(json).map_err(|e| format!("metadata does not make a llama config: {e}"))
}

/// GGUF tensor names and their Hugging Face llama counterparts: the whole-model ones, and the
/// per-layer modules (`blk.N.attn_q.weight` ↔ `model.layers.N.self_attn.q_proj.weight`).
const WHOLE: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];
const LAYER: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// The Hugging Face name of a GGUF llama tensor.
fn hf_name(gguf: &str) -> std::result::Result<String, String> {
    if let Some((_, hf)) = WHOLE.iter().find(|(g, _)| *g == gguf) {
        return Ok(hf.to_string());
    }
    let unknown = || format!("tensor `{gguf}` has no Hugging Face llama counterpart; is this a plain llama model?");
    let rest = gguf.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let (part, kind) = rest.split_once('.').ok_or_else(unknown)?;
    let (_, module) = LAYER.iter().find(|(g, _)| *g == part).ok_or_else(unknown)?;
    match kind {
        "weight" | "bias" => Ok(format!("model.layers.{layer}.{module}.{kind}")),
        _ => Err(unknown()),
    }
}

/// The GGUF name of a Hugging Face llama tensor (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = WHOLE.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (part, _) = LAYER.iter().find(|(_, m)| *m == module)?;
    Some(format!("blk.{layer}.{part}.{kind}"))
}

/// Every weight the config needs is there (named by its GGUF name, as the user knows the file),
/// and the embedding has a row per token.
fn check_tensors(cfg: &LlamaConfig, tensors: &HashMap<String, Stored>) -> std::result::Result<(), String> {
    let mut needed = vec![("token_embd.weight".to_string(), "model.embed_tokens.weight".to_string())];
    for i in 0..cfg.num_hidden_layers {
        for part in
            ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]
        {
            let gguf = format!("blk.{i}.{part}.weight");
            needed.push((gguf.clone(), hf_name(&gguf)?));
        }
    }
    needed.push(("output_norm.weight".into(), "model.norm.weight".into()));
    for (gguf, hf) in needed {
        if !tensors.contains_key(&hf) {
            return Err(format!("tensor `{gguf}` is missing"));
        }
    }
    let rows = tensors["model.embed_tokens.weight"].blocks.shape().dims()[0];
    if rows != cfg.vocab_size {
        return Err(format!(
            "`token_embd.weight` has {rows} rows but `tokenizer.ggml.tokens` has {} tokens",
            cfg.vocab_size
        ));
    }
    Ok(())
}

/// Undoes llama.cpp's q/k row order. Per head, HF keeps the rotated pairs at rows (i, i + D/2);
/// llama.cpp's converter interleaves them to (2i, 2i + 1), i.e. `w.reshape(heads, 2, D/2, ..)`
/// with axes 1 and 2 swapped. Reading its rows as (heads, D/2, 2, ..) and swapping back
/// restores HF's order. Works for weights (rows, C) and biases (rows,).
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    swap_halves(w, heads, true)
}

/// llama.cpp's converter permutation (the inverse of [`unpermute_rows`]), for writing GGUF files.
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    swap_halves(w, heads, false)
}

fn swap_halves(w: &Tensor, heads: usize, undo: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(ModelError::Invalid(format!("cannot split {rows} rows into {heads} RoPE heads")));
    }
    let half = rows / heads / 2;
    let mut split = if undo { vec![heads, half, 2] } else { vec![heads, 2, half] };
    split.extend_from_slice(&dims[1..]);
    Ok(w.reshape(split)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{init_weights, Llama};
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_nn::VarBuilder;
    use candle_nn::VarMap;
    use serde_json::json;
    use std::path::PathBuf;

    fn corpus() -> Vec<String> {
        let mut v = vec![
            "Once upon a time, there was a little girl named Lily.".to_string(),
            "Tabs\tand\nnewlines, ünïcödé, 日本語, emoji 🙂.".to_string(),
        ];
        for i in 0..200 {
            v.push(format!("{i} + {} = {}. The cat sat on the mat.", i * 7, i * 8));
        }
        v
    }

    /// A trained byte-level BPE and its tokenizer.json: vocab (id order) and merges.
    fn trained_tokenizer() -> (Tokenizer, Vec<String>, Vec<String>) {
        let tk = Tokenizer::train_bpe(&corpus(), 300).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tk.save(dir.path()).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_object().unwrap();
        let mut tokens = vec![String::new(); vocab.len()];
        for (t, id) in vocab {
            tokens[id.as_u64().unwrap() as usize] = t.clone();
        }
        let merges = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            })
            .collect();
        (tk, tokens, merges)
    }

    /// Head dims and widths multiples of 32, so Q8_0 blocks tile every matrix.
    fn config(vocab: usize, tie: bool) -> LlamaConfig {
        serde_json::from_value(json!({
            "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2
        }))
        .unwrap()
    }

    fn tiny_model(cfg: &LlamaConfig) -> (VarMap, Llama) {
        let (vm, m) = Llama::trainable(cfg, &Device::Cpu).unwrap();
        init_weights(&vm, 11).unwrap();
        // 4x HF's init so logits and attention are far from uniform.
        for var in vm.all_vars() {
            var.set(&(var.as_tensor() * 4.0).unwrap()).unwrap();
        }
        (vm, m)
    }

    fn strings(xs: &[String]) -> Value {
        Value::Array(xs.iter().map(|s| Value::String(s.clone())).collect())
    }

    /// The metadata llama.cpp's converter writes for `cfg` and a smollm-style byte-level BPE.
    fn metadata(cfg: &LlamaConfig, tokens: &[String], merges: &[String]) -> Vec<(String, Value)> {
        let u32v = |n: usize| Value::U32(n as u32);
        let types: Vec<Value> = (0..tokens.len()).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect();
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.block_count".into(), u32v(cfg.num_hidden_layers)),
            ("llama.context_length".into(), u32v(cfg.max_position_embeddings)),
            ("llama.embedding_length".into(), u32v(cfg.hidden_size)),
            ("llama.feed_forward_length".into(), u32v(cfg.intermediate_size)),
            ("llama.attention.head_count".into(), u32v(cfg.num_attention_heads)),
            ("llama.attention.head_count_kv".into(), u32v(cfg.num_kv_heads())),
            ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta as f32)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(cfg.rms_norm_eps as f32)),
            ("llama.rope.dimension_count".into(), u32v(cfg.head_dim())),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), strings(tokens)),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), strings(merges)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            (
                "tokenizer.chat_template".into(),
                Value::String("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
            ),
        ]
    }

    /// Writes the model as llama.cpp's converter does: GGUF names, q/k rows permuted for its RoPE
    /// (unless `permute` is false, to show that reading depends on it), matrices as `dtype`, norms f32.
    fn write_gguf(path: &Path, vm: &VarMap, meta: &[(String, Value)], dtype: GgmlDType, permute: bool) {
        let cfg_heads = |name: &str, q: usize, k: usize| {
            if name.contains("attn_q.") {
                Some(q)
            } else if name.contains("attn_k.") {
                Some(k)
            } else {
                None
            }
        };
        let heads = meta.iter().find(|(k, _)| k == "llama.attention.head_count").unwrap().1.to_u32().unwrap();
        let kv = meta.iter().find(|(k, _)| k == "llama.attention.head_count_kv").unwrap().1.to_u32().unwrap();
        let data = vm.data().lock().unwrap();
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (hf, var) in data.iter() {
            let name = gguf_name(hf).unwrap();
            let mut t = var.as_tensor().clone();
            if let (true, Some(h)) = (permute, cfg_heads(&name, heads as usize, kv as usize)) {
                t = permute_rows(&t, h).unwrap();
            }
            let dt = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
            tensors.push((name, QTensor::quantize(&t, dt).unwrap()));
        }
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        path: PathBuf,
        cfg: LlamaConfig,
        model: Llama,
        tokenizer: Tokenizer,
    }

    fn fixture(dtype: GgmlDType, tie: bool, permute: bool) -> Fixture {
        let (tokenizer, tokens, merges) = trained_tokenizer();
        let cfg = config(tokens.len(), tie);
        let (vm, model) = tiny_model(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &vm, &metadata(&cfg, &tokens, &merges), dtype, permute);
        Fixture { _dir: dir, path, cfg, model, tokenizer }
    }

    fn ids() -> Tensor {
        let ids: Vec<u32> = (0..20).map(|i| (i * 37 % 250) as u32 + 3).collect();
        Tensor::from_vec(ids, (2, 10), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // numpy: arange(8).reshape(2, 2, 2, 1).swapaxes(1, 2).reshape(8) == [0, 2, 1, 3, 4, 6, 5, 7]
        let w = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let p = permute_rows(&w, 2).unwrap();
        assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0., 2., 1., 3., 4., 6., 5., 7.]);
        let bias = Tensor::arange(0f32, 24., &Device::Cpu).unwrap();
        let back = unpermute_rows(&permute_rows(&bias, 3).unwrap(), 3).unwrap();
        assert_eq!(back.to_vec1::<f32>().unwrap(), bias.to_vec1::<f32>().unwrap());
        let err = unpermute_rows(&bias, 5).unwrap_err().to_string();
        assert!(err.contains("24 rows into 5"), "{err}");
    }

    fn model(c: &GgufCheckpoint) -> Llama {
        let weights = crate::model::Weights::Store(c.tensors.clone());
        Llama::from_weights(&c.config, &weights, &Device::Cpu, DType::F32).unwrap()
    }

    #[test]
    fn f32_gguf_gives_the_original_logits() {
        for tie in [false, true] {
            let f = fixture(GgmlDType::F32, tie, true);
            let ckpt = read(&f.path).unwrap();
            assert_eq!(ckpt.config, LlamaConfig { head_dim: Some(16), ..f.cfg.clone() }, "tie={tie}");
            assert_eq!(ckpt.tensors.names().contains(&"lm_head.weight".to_string()), !tie);

            let dir = tempfile::tempdir().unwrap();
            ckpt.save(dir.path()).unwrap();
            let loaded = Llama::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
            let want = f.model.forward(&ids(), None).unwrap();
            let diff = max_abs_diff(&want, &loaded.forward(&ids(), None).unwrap());
            assert!(diff <= 1e-5, "tie={tie}: saved-and-loaded logits differ by {diff}");
            let diff = max_abs_diff(&want, &model(&ckpt).forward(&ids(), None).unwrap());
            assert!(diff <= 1e-5, "tie={tie}: in-memory model logits differ by {diff}");
            assert!(max_abs(&want) > 1.0, "logits should not be near-uniform");
        }
    }

    #[test]
    fn q8_0_gguf_is_close_and_needs_the_unpermutation() {
        let f = fixture(GgmlDType::Q8_0, false, true);
        let want = f.model.forward(&ids(), None).unwrap();
        let got = model(&read(&f.path).unwrap()).forward(&ids(), None).unwrap();

        // Exactly what quantizing the original in memory gives: reading adds no error of its own.
        let (vm, _) = tiny_model(&f.cfg);
        for var in vm.all_vars().into_iter().filter(|v| v.rank() == 2) {
            let q = QTensor::quantize(var.as_tensor(), GgmlDType::Q8_0).unwrap();
            var.set(&q.dequantize(&Device::Cpu).unwrap()).unwrap();
        }
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let in_memory = Llama::new(&f.cfg, vb).unwrap().forward(&ids(), None).unwrap();
        let diff = max_abs_diff(&got, &in_memory);
        assert!(diff <= 1e-5, "GGUF Q8_0 vs in-memory Q8_0 logits differ by {diff}");

        // Q8_0 noise (about 0.6 on logits of up to 9 for this sharp random model) against the
        // same file with q/k rows left in llama.cpp's order: RoPE then rotates the wrong pairs.
        let quantized = max_abs_diff(&want, &got);
        let unpermuted = fixture(GgmlDType::Q8_0, false, false);
        let wrong = model(&read(&unpermuted.path).unwrap()).forward(&ids(), None).unwrap();
        let wrong = max_abs_diff(&unpermuted.model.forward(&ids(), None).unwrap(), &wrong);
        let scale = max_abs(&want);
        assert!(quantized <= 0.1 * scale, "Q8_0 logits differ by {quantized} (max |logit| {scale})");
        assert!(wrong >= 10.0 * quantized, "wrong q/k order differs by only {wrong} vs {quantized}");
    }

    /// Decoding from the file's blocks against the dequantized f32 model of the same file: the
    /// only difference is the 8-bit rounding of the activations.
    #[test]
    fn quantized_decoding_stays_close_to_the_dequantized_model() {
        use crate::model::llama::{KvCache, Scheme};
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let f = fixture(dtype, true, true);
            let ckpt = read(&f.path).unwrap();
            let weights = crate::model::Weights::Store(ckpt.tensors.clone());
            let dense = model(&ckpt);
            let quant = Llama::quantized(&ckpt.config, &weights, Scheme::Stored).unwrap();
            let ids =
                Tensor::from_vec((0..48u32).map(|i| (i * 37 + 5) % 200).collect(), (2, 24), &Device::Cpu).unwrap();
            let (want, got) = (dense.forward(&ids, None).unwrap(), quant.forward(&ids, None).unwrap());
            let (diff, scale) = (max_abs_diff(&want, &got), max_abs(&want));
            let (a, b) = (want.argmax(2).unwrap(), got.argmax(2).unwrap());
            let agree = a.eq(&b).unwrap().to_dtype(DType::F32).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
            eprintln!("{dtype:?}: max |Δlogit| {diff:.4} of {scale:.2}, top-1 agreement {agree:.3}");
            assert!(diff <= 0.1 * scale, "{dtype:?}: logits differ by {diff} (max |logit| {scale})");
            assert!(agree >= 0.9, "{dtype:?}: top-1 agrees at {agree} of the positions");

            // The KV-cache decode of the quantized model is its own full forward, step by step.
            let mut cache = KvCache::new(&ckpt.config, vec![0, 0]);
            let mut steps = vec![quant.forward(&ids.narrow(1, 0, 20).unwrap(), Some(&mut cache)).unwrap()];
            for t in 20..24 {
                steps.push(quant.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
            }
            let stepped = Tensor::cat(&steps, 1).unwrap();
            let diff = max_abs_diff(&stepped, &got);
            assert!(diff <= 1e-4, "{dtype:?}: cached decode differs from the full forward by {diff}");
        }
    }

    #[test]
    fn gguf_tokenizer_matches_the_original() {
        let f = fixture(GgmlDType::F32, false, true);
        let tk = read(&f.path).unwrap().tokenizer;
        assert_eq!(tk.vocab_hash(), f.tokenizer.vocab_hash());
        for text in
            ["Once upon a time", "123+45=168, the cat!", "  spaces  \tand\nnewlines", "ünïcödé 日本語 🙂", "<s>x</s>"]
        {
            let ids = tk.encode(text, false).unwrap();
            assert_eq!(ids, f.tokenizer.encode(text, false).unwrap(), "{text:?}");
            assert_eq!(tk.encode(text, true).unwrap(), f.tokenizer.encode(text, true).unwrap(), "{text:?}");
            let plain = text.replace("<s>", "").replace("</s>", "");
            assert_eq!(tk.decode(&ids).unwrap(), plain, "special tokens are skipped on decode");
        }
        assert_eq!((tk.bos_id(), tk.eos_ids()), (Some(1), &[2u32][..]));
        assert!(tk.has_chat_template());
    }

    #[test]
    fn truncated_file_is_one_clear_error() {
        let f = fixture(GgmlDType::F32, false, true);
        let bytes = std::fs::read(&f.path).unwrap();
        let cut = f.path.with_file_name("cut.gguf");
        // Inside the header, inside the metadata, inside the tensor data.
        for len in [6, bytes.len() / 50, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            let err = read(&cut).unwrap_err().to_string();
            assert!(err.contains("cut.gguf") && err.contains("truncated or corrupt"), "cut at {len}: {err}");
        }
        let err = read(&f.path.with_file_name("absent.gguf")).unwrap_err().to_string();
        assert!(err.contains("absent.gguf") && err.contains("cannot open"), "{err}");
    }

    /// A GGUF of the fixture's model with metadata changed by `edit`, read back.
    fn read_with(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> Result<GgufCheckpoint> {
        let (_, tokens, merges) = trained_tokenizer();
        let cfg = config(tokens.len(), true);
        let (vm, _) = tiny_model(&cfg);
        let mut meta = metadata(&cfg, &tokens, &merges);
        edit(&mut meta);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edited.gguf");
        write_gguf(&path, &vm, &meta, GgmlDType::F32, true);
        read(&path)
    }

    fn read_error_with(edit: impl FnOnce(&mut Vec<(String, Value)>)) -> String {
        read_with(edit).unwrap_err().to_string()
    }

    fn set(meta: &mut [(String, Value)], key: &str, value: Value) {
        meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
    }

    #[test]
    fn token_types_and_end_ids_follow_llama_cpp() {
        // Two tokens added to the vocabulary, stored as llama.cpp's converter stores added tokens:
        // raw text, `<think>` user-defined (type 4), `<|eot|>` control (type 3) and end-of-turn.
        let (_, mut tokens, merges) = trained_tokenizer();
        let (think, eot) = (tokens.len() as u32, tokens.len() as u32 + 1);
        tokens.extend(["<think>".to_string(), "<|eot|>".to_string()]);
        let cfg = config(tokens.len(), true);
        let (vm, _) = tiny_model(&cfg);
        let mut meta = metadata(&cfg, &tokens, &merges);
        let Value::Array(types) = &mut meta.iter_mut().find(|(k, _)| k == "tokenizer.ggml.token_type").unwrap().1
        else {
            unreachable!()
        };
        types[think as usize] = Value::I32(4);
        types[eot as usize] = Value::I32(3);
        meta.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(eot)));
        meta.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("added.gguf");
        write_gguf(&path, &vm, &meta, GgmlDType::F32, true);

        let ckpt = read(&path).unwrap();
        let tk = ckpt.tokenizer;
        assert_eq!(tk.eos_ids(), [2, eot], "EOS and end-of-turn both end generation");
        assert_eq!(ckpt.config.eos_ids(), [2]);
        let ids = tk.encode("a<think>b<|eot|>", true).unwrap();
        assert_eq!(ids, tk.encode("a<think>b<|eot|>", false).unwrap(), "smollm adds no BOS by default");
        assert!(ids.contains(&think) && ids.ends_with(&[eot]), "added tokens are matched whole: {ids:?}");
        assert_eq!(tk.decode(&ids).unwrap(), "a<think>b", "user-defined kept, control skipped on decode");
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let err = read_error_with(|m| set(m, "general.architecture", Value::String("qwen2".into())));
        assert!(
            err.contains("edited.gguf") && err.contains("GGUF architecture `qwen2` is not supported; supported: llama"),
            "{err}"
        );
    }

    #[test]
    fn missing_metadata_names_the_key() {
        let err = read_error_with(|m| m.retain(|(k, _)| k != "llama.block_count"));
        assert!(err.contains("missing metadata key `llama.block_count`"), "{err}");
        let err = read_error_with(|m| set(m, "llama.block_count", Value::String("two".into())));
        assert!(err.contains("`llama.block_count` must be a non-negative integer"), "{err}");
    }

    #[test]
    fn unsupported_tokenizers_are_refused_by_name() {
        let err = read_error_with(|m| set(m, "tokenizer.ggml.pre", Value::String("falcon".into())));
        assert!(err.contains("pre-tokenizer `falcon`") && err.contains("supported: default, gpt-2, smollm"), "{err}");
        let err = read_error_with(|m| set(m, "tokenizer.ggml.model", Value::String("bert".into())));
        assert!(err.contains("tokenizer model `bert` is not supported; supported: gpt2"), "{err}");
        let err = read_error_with(|m| set(m, "tokenizer.ggml.model", Value::String("llama".into())));
        assert!(err.contains("missing metadata key `tokenizer.ggml.scores`"), "{err}");
    }
}
