//! `kdllm export`: a model (a kdllm student, any llama-family folder or Hub model) written as
//! one llama-architecture GGUF file that llama.cpp loads as it is: the metadata llama.cpp's
//! converter writes, the tokenizer, the chat template and the special ids, q/k rows permuted
//! as llama.cpp's RoPE expects, and each matrix in the requested encoding (1-D tensors, the
//! norms and biases, stay f32, as the converter keeps them).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use serde::Serialize;

use crate::gguf::{self, GgmlType, MetaValue, Metadata, TensorData};
use crate::model::{gguf as model_gguf, llama, Checkpoint};

#[derive(Debug, Clone)]
pub struct ExportJob {
    pub model: String,
    pub output: PathBuf,
    pub ty: GgmlType,
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub bytes: u64,
    /// The `tokenizer.ggml.pre` written, and whether llama.cpp splits text as the tokenizer does.
    pub pre_tokenizer: String,
    pub pre_tokenizer_matches: bool,
}

/// Parses `--type`.
pub fn parse_type(s: &str) -> Result<GgmlType, String> {
    Ok(match s {
        "f32" => GgmlType::F32,
        "f16" => GgmlType::F16,
        "q8_0" => GgmlType::Q8_0,
        "q4_0" => GgmlType::Q4_0,
        "q4_k" => GgmlType::Q4_K,
        other => return Err(format!("`{other}` is not an export type; use f32, f16, q8_0, q4_0 or q4_k")),
    })
}

pub fn export(job: &ExportJob) -> anyhow::Result<ExportReport> {
    if job.output.exists() && !job.overwrite {
        bail!("{} exists; pass --overwrite to replace it", job.output.display());
    }
    let ckpt = Checkpoint::open(&job.model, None).with_context(|| format!("opening {}", job.model))?;
    let cfg = &ckpt.config;
    refuse_unmapped(cfg)?;
    let (_, varmap, _) = ckpt.trainable(&Device::Cpu, None)?;
    let mut tensors: Vec<_> = llama::tensors(&varmap).into_iter().collect();
    tensors.sort_by_key(|(name, _)| order(name));
    let mut out = Vec::with_capacity(tensors.len());
    for (hf, t) in tensors {
        let name = model_gguf::gguf_name(&hf)
            .with_context(|| format!("tensor `{hf}` has no llama.cpp name; only llama-family weights are exported"))?;
        let t = if name.contains(".attn_q.") {
            model_gguf::permute_rows(&t, cfg.num_attention_heads)?
        } else if name.contains(".attn_k.") {
            model_gguf::permute_rows(&t, cfg.num_kv_heads())?
        } else {
            t
        };
        let shape = t.dims().to_vec();
        let ty = if shape.len() == 1 { GgmlType::F32 } else { job.ty };
        let row = *shape.last().unwrap_or(&0);
        if row % ty.block() != 0 {
            bail!(
                "tensor `{name}` ({hf}, shape {shape:?}) has rows of {row} values, which {:?} cannot take: it packs \
                 blocks of {}; export as f16 or f32",
                ty,
                ty.block()
            );
        }
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        out.push(TensorData { name, shape, ty, bytes: gguf::quant::encode(&values, ty) });
    }
    let (tok_meta, pre) = ckpt.tokenizer.gguf_metadata(cfg.vocab_size)?;
    let name = Path::new(&job.model).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut meta = model_metadata(cfg, &name, job.ty);
    meta.extend(tok_meta);
    gguf::write::write(&job.output, &meta, &out).with_context(|| format!("writing {}", job.output.display()))?;
    let bytes = std::fs::metadata(&job.output)?.len();
    Ok(ExportReport {
        output: job.output.clone(),
        tensors: out.len(),
        bytes,
        pre_tokenizer: pre.unwrap_or("default").to_string(),
        pre_tokenizer_matches: pre.is_some(),
    })
}

/// What llama.cpp's llama architecture cannot compute as transformers does.
fn refuse_unmapped(cfg: &llama::LlamaConfig) -> anyhow::Result<()> {
    if let Some(layer) =
        (0..cfg.num_hidden_layers).find(|&l| cfg.window(l).is_some_and(|w| w < cfg.max_position_embeddings))
    {
        bail!(
            "layer {layer} of this {} model attends through a sliding window, which llama.cpp's llama architecture \
             does not have; it cannot be exported as llama GGUF yet",
            cfg.model_type
        );
    }
    if cfg.rope_scaling.is_some() {
        bail!(
            "`rope_scaling` is set in config.json; llama GGUF export of scaled RoPE (rope_freqs) is not supported yet"
        );
    }
    Ok(())
}

/// Embeddings first, then each layer's tensors in the converter's order, then the output.
fn order(hf: &str) -> (usize, usize, String) {
    match hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
        Some((layer, rest)) => (1, layer.parse().unwrap_or(usize::MAX), rest.to_string()),
        None if hf == "model.embed_tokens.weight" => (0, 0, String::new()),
        None => (2, 0, hf.to_string()),
    }
}

/// The `general.*` and `llama.*` keys llama.cpp's converter writes for a llama model.
fn model_metadata(cfg: &llama::LlamaConfig, name: &str, ty: GgmlType) -> Metadata {
    let u = |v: usize| MetaValue::U32(v as u32);
    vec![
        ("general.architecture".into(), MetaValue::Str("llama".into())),
        ("general.name".into(), MetaValue::Str(name.into())),
        ("general.file_type".into(), MetaValue::U32(ty.file_type())),
        ("general.alignment".into(), MetaValue::U32(gguf::write::ALIGNMENT as u32)),
        ("llama.context_length".into(), u(cfg.max_position_embeddings)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.attention.head_count".into(), u(cfg.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u(cfg.num_kv_heads())),
        ("llama.attention.key_length".into(), u(cfg.head_dim())),
        ("llama.attention.value_length".into(), u(cfg.head_dim())),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim())),
        ("llama.rope.freq_base".into(), MetaValue::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), MetaValue::F32(cfg.rms_norm_eps as f32)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
    ]
}
