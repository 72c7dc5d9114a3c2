//! Causal language models that kdllm can sample from and train, and where their weights come
//! from: a folder in the Hugging Face layout, a Hub repo or alias (through [`crate::hub`]).

pub mod gguf;
pub mod llama;
pub mod ops;
pub mod quant;

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

pub use llama::{Llama, LlamaConfig, Weights};

use crate::hub::{self, HubOptions};
use crate::tokenizer::Tokenizer;

/// The dtype a model computes in. Stored weights (f32, f16, bf16) are converted on load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    /// Decoding on the CPU with the matrices quantized to Q8_0 at load, activations in f32.
    Q8,
    /// Decoding on the CPU from a GGUF file's own quantized blocks, activations in f32.
    Gguf,
}

impl Precision {
    /// The dtype of the activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Q8 | Precision::Gguf => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// How the matrices are quantized, for the quantized precisions.
    pub fn scheme(self) -> Option<llama::Scheme> {
        match self {
            Precision::Q8 => Some(llama::Scheme::Q8),
            Precision::Gguf => Some(llama::Scheme::Stored),
            Precision::F32 | Precision::Bf16 => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Q8 => "q8",
            Precision::Gguf => "gguf",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "q8" => Ok(Precision::Q8),
            "gguf" => Ok(Precision::Gguf),
            other => Err(format!(
                "`{other}` is not a compute dtype; use f32, bf16, q8 (quantized at load) or gguf (a GGUF file's own blocks)"
            )),
        }
    }
}

/// A pretrained checkpoint, opened: its config, tokenizer and where its weights are.
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// The Hub repo id, or the path as given.
    pub id: String,
    /// The Hub commit, for Hub models.
    pub revision: Option<String>,
}

impl Checkpoint {
    /// Opens `spec`: a folder in the HF layout, an alias, a Hub repo id, or a llama GGUF file
    /// (dequantized to f32 in memory, its tokenizer and chat template from its metadata).
    pub fn open(spec: &str, revision: Option<&str>) -> anyhow::Result<Self> {
        if let Some(path) = gguf_file(spec, revision)? {
            let g = gguf::read(path)?;
            let weights = Weights::Store(g.tensors);
            return Ok(Self { config: g.config, weights, tokenizer: g.tokenizer, id: spec.into(), revision: None });
        }
        let files = hub::resolve(spec, revision, &HubOptions::from_env()?)?;
        let dir = files.dir;
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::Files(llama::weight_files(&dir)?);
        let tokenizer =
            Tokenizer::from_folder(&dir).with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
        Ok(Self { config, weights, tokenizer, id: files.id, revision: files.revision })
    }

    /// What identifies the weights, for resumed and cached jobs: the Hub commit, or a hash of the
    /// model's own files (its top-level `*.json` and `*.safetensors`, or the GGUF file).
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        if let Some(rev) = &self.revision {
            return Ok(format!("{}@{rev}", self.id));
        }
        let path = match &self.weights {
            Weights::Files(files) => files.first().and_then(|f| f.parent()).map(Path::to_path_buf),
            Weights::Tensors(_) | Weights::Store(_) => None,
        };
        let path = path.unwrap_or_else(|| PathBuf::from(&self.id));
        let not_model_file = |rel: &Path| {
            let name = rel.to_string_lossy();
            rel.components().count() > 1 || !(name.ends_with(".json") || name.ends_with(".safetensors"))
        };
        let skip: &dyn Fn(&Path) -> bool = if path.is_dir() { &not_model_file } else { &|_| false };
        crate::hash::sha256_path(&path, skip).with_context(|| format!("reading the model files in {}", path.display()))
    }

    /// The model for inference, computing in `precision`.
    pub fn model(&self, device: &Device, precision: Precision) -> anyhow::Result<Llama> {
        let dtype = precision.dtype();
        let params = self.config.num_params();
        let Some(scheme) = precision.scheme() else {
            let what = format!("{} ({:.0}M parameters in {dtype:?})", self.id, params as f64 / 1e6);
            crate::device::check_dtype(device, dtype)?;
            crate::device::check_memory(device, (params * dtype.size_in_bytes()) as u64, &what)?;
            return Llama::from_weights(&self.config, &self.weights, device, dtype)
                .with_context(|| format!("loading the weights of {}", self.id));
        };
        let name = precision.name();
        if !device.is_cpu() {
            anyhow::bail!("`--dtype {name}`: the quantized kernels run on the CPU; use --device cpu, or --dtype f32 or bf16 on the GPU");
        }
        if scheme == llama::Scheme::Stored && !matches!(self.weights, Weights::Store(_)) {
            anyhow::bail!(
                "`--dtype gguf` decodes from a GGUF file's own blocks, but {} is not a GGUF file; use --dtype q8 to quantize it at load",
                self.id
            );
        }
        let what = format!("{} ({:.0}M parameters, {name})", self.id, params as f64 / 1e6);
        // About a byte per parameter (Q8_0: 34 bytes per 32).
        crate::device::check_memory(device, (params * 34 / 32) as u64, &what)?;
        Llama::quantized(&self.config, &self.weights, scheme)
            .with_context(|| format!("loading the weights of {}", self.id))
    }

    /// The model with f32 `Var` weights, for training. With `layers`, only those layers are
    /// kept, renumbered in the given order (a student cut out of its teacher, as DistilBERT was).
    pub fn trainable(&self, device: &Device, layers: Option<&[usize]>) -> anyhow::Result<(LlamaConfig, VarMap, Llama)> {
        let mut cfg = self.config.clone();
        let kept;
        let weights = match layers {
            None => &self.weights,
            Some(layers) => {
                let n = self.config.num_hidden_layers;
                if layers.is_empty() {
                    anyhow::bail!("`layers` is empty: list the teacher layers to keep, e.g. [0, 2, 4]");
                }
                if let Some(bad) = layers.iter().find(|&&l| l >= n) {
                    anyhow::bail!("`layers` names layer {bad}, but {} has layers 0..{}", self.id, n - 1);
                }
                cfg.num_hidden_layers = layers.len();
                if let Some(types) = &mut cfg.layer_types {
                    *types = layers.iter().map(|&l| types[l].clone()).collect();
                }
                kept = keep_layers(&self.weights, layers)?;
                &kept
            }
        };
        let (varmap, model) = Llama::trainable(&cfg, device)?;
        llama::load_weights(&varmap, weights)?;
        Ok((cfg, varmap, model))
    }
}

/// `spec` as a GGUF file, when it names one (by its extension): it must exist, and takes no
/// Hub revision.
fn gguf_file<'a>(spec: &'a str, revision: Option<&str>) -> anyhow::Result<Option<&'a Path>> {
    let path = Path::new(spec);
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return Ok(None);
    }
    if !path.is_file() {
        anyhow::bail!("GGUF file {spec} not found");
    }
    if let Some(rev) = revision {
        anyhow::bail!("`revision` ({rev}) applies to Hub models, not to the GGUF file {spec}");
    }
    Ok(Some(path))
}

/// The tokenizer named by `spec` (a folder with `tokenizer.json`, a GGUF file, an alias or a Hub
/// repo id) without the model's weights; with the id it resolved to.
pub fn open_tokenizer(spec: &str, revision: Option<&str>) -> anyhow::Result<(Tokenizer, String)> {
    if let Some(path) = gguf_file(spec, revision)? {
        return Ok((gguf::read_tokenizer(path)?, spec.to_string()));
    }
    let files = hub::resolve_tokenizer(spec, revision, &HubOptions::from_env()?)?;
    let tok = Tokenizer::from_folder(&files.dir)
        .with_context(|| format!("loading the tokenizer of {}", files.dir.display()))?;
    Ok((tok, files.id))
}

/// The tensors of `weights` with only `layers` kept, renumbered 0.. in the given order; the
/// layers left out are never read.
fn keep_layers(weights: &Weights, layers: &[usize]) -> anyhow::Result<Weights> {
    // New names of an old tensor name: itself outside the layers, one per place the layer is kept.
    let renamed = |name: &str| -> Vec<String> {
        match layer_of(name) {
            None => vec![name.to_string()],
            Some((old, rest)) => layers
                .iter()
                .enumerate()
                .filter(|(_, &l)| l == old)
                .map(|(new, _)| format!("model.layers.{new}.{rest}"))
                .collect(),
        }
    };
    let mut kept = std::collections::HashMap::new();
    let mut keep = |name: &str, load: &dyn Fn() -> anyhow::Result<Tensor>| -> anyhow::Result<()> {
        let names = renamed(name);
        if !names.is_empty() {
            let tensor = load()?;
            kept.extend(names.into_iter().map(|n| (n, tensor.clone())));
        }
        Ok(())
    };
    match weights {
        Weights::Tensors(map) => {
            for (name, tensor) in map {
                keep(name, &|| Ok(tensor.clone()))?;
            }
        }
        Weights::Files(files) => {
            // SAFETY: the files are opened read-only and not modified while mapped.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
            for (name, _) in st.tensors() {
                keep(&name, &|| Ok(st.load(&name, &Device::Cpu)?))?;
            }
        }
        Weights::Store(store) => {
            for name in store.names() {
                keep(&name, &|| Ok(store.dense(&name)?.expect("listed")))?;
            }
        }
    }
    Ok(Weights::Tensors(kept))
}

/// `model.layers.7.mlp.up_proj.weight` → (7, `mlp.up_proj.weight`).
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4-layer checkpoint folder with a tokenizer, as Checkpoint::open expects.
    fn checkpoint() -> (tempfile::TempDir, Checkpoint, VarMap) {
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = (0..50).map(|i| format!("{i} plus {} is {}", i * 3, i * 4)).collect();
        let tok = Tokenizer::train_bpe(&texts, 280).unwrap();
        tok.save(dir.path()).unwrap();
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": tok.vocab_size(), "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 4, "num_attention_heads": 2, "max_position_embeddings": 32
        }))
        .unwrap();
        let (vm, _) = Llama::trainable(&cfg, &Device::Cpu).unwrap();
        llama::init_weights(&vm, 1).unwrap();
        llama::save(&cfg, &vm, dir.path()).unwrap();
        let ckpt = Checkpoint::open(dir.path().to_str().unwrap(), None).unwrap();
        (dir, ckpt, vm)
    }

    fn var(vm: &VarMap, name: &str) -> Tensor {
        vm.data().lock().unwrap()[name].as_tensor().clone()
    }

    #[test]
    fn a_student_keeps_the_chosen_teacher_layers_in_order() {
        let (_dir, ckpt, teacher) = checkpoint();
        let (cfg, student, _) = ckpt.trainable(&Device::Cpu, Some(&[3, 0])).unwrap();
        assert_eq!(cfg.num_hidden_layers, 2);
        for (new, old) in [(0, 3), (1, 0)] {
            for part in ["self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"] {
                let (a, b) = (
                    var(&student, &format!("model.layers.{new}.{part}")),
                    var(&teacher, &format!("model.layers.{old}.{part}")),
                );
                assert_eq!(
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                );
            }
        }
        let embed = "model.embed_tokens.weight";
        assert_eq!(var(&student, embed).to_vec2::<f32>().unwrap(), var(&teacher, embed).to_vec2::<f32>().unwrap());

        // Keeping every layer in order is the teacher itself.
        let (_, _, all) = ckpt.trainable(&Device::Cpu, Some(&[0, 1, 2, 3])).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 30]], &Device::Cpu).unwrap();
        let t = ckpt.model(&Device::Cpu, Precision::F32).unwrap().forward(&ids, None).unwrap();
        let s = all.forward(&ids, None).unwrap();
        let diff = (t - s).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 1e-5, "all layers kept: logits differ from the teacher's by {diff}");

        for (layers, needle) in [(&[4usize][..], "names layer 4"), (&[][..], "`layers` is empty")] {
            let err = ckpt.trainable(&Device::Cpu, Some(layers)).err().unwrap().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
