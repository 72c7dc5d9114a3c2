//! Where weights come from and go: safetensors files or tensors in memory, seeded
//! initialisation, saving in the Hub's layout.

use super::*;
use crate::model::quant::QMatrix;
use std::sync::Arc;

/// Where a checkpoint's tensors come from, by HF name.
#[derive(Clone)]
pub enum Weights {
    /// safetensors files (one, or the shards of an index); stored dtypes f32, f16 or bf16.
    Files(Vec<PathBuf>),
    /// Tensors already in memory.
    Tensors(HashMap<String, Tensor>),
    /// Tensors decoded on demand (a GGUF file's blocks).
    Store(Arc<dyn TensorStore>),
}

/// Tensors kept in a file's own encoding, by HF name, decoded when asked for.
pub trait TensorStore: Send + Sync {
    /// Where they come from, for messages.
    fn describe(&self) -> String;
    /// Every tensor's name, sorted.
    fn names(&self) -> Vec<String>;
    /// The tensor as f32; `None` when there is no such tensor.
    fn dense(&self, name: &str) -> Result<Option<Tensor>>;
    /// The matrix in its own blocks; `None` when there is no such matrix or kdllm has no
    /// kernel for its encoding ([`crate::model::quant::multiplies`]).
    fn quantized(&self, name: &str) -> Result<Option<QMatrix>>;
}

impl Weights {
    /// Where the tensors come from, for messages.
    pub fn describe(&self) -> String {
        match self {
            Weights::Files(files) => files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
            Weights::Tensors(_) => "the loaded checkpoint".to_string(),
            Weights::Store(store) => store.describe(),
        }
    }
}

/// Reads tensors of `weights` by name, as f32 or their stored dtype.
pub(crate) struct Reader<'a> {
    weights: &'a Weights,
    files: Option<candle_core::safetensors::MmapedSafetensors>,
}

impl<'a> Reader<'a> {
    pub fn new(weights: &'a Weights) -> Result<Self> {
        let files = match weights {
            // SAFETY: the files are opened read-only and not modified while mapped.
            Weights::Files(files) => Some(
                unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
                    .map_err(|e| ModelError::Safetensors { path: weights.describe(), message: e.to_string() })?,
            ),
            _ => None,
        };
        Ok(Self { weights, files })
    }

    /// The tensor `name`, or `None` when there is none.
    pub fn get(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(match (self.weights, &self.files) {
            (_, Some(st)) => st.load(name, &Device::Cpu).ok(),
            (Weights::Tensors(map), _) => map.get(name).cloned(),
            (Weights::Store(store), _) => store.dense(name)?,
            (Weights::Files(_), None) => unreachable!("mapped in new"),
        })
    }

    /// The tensor `name`, which must be there.
    pub fn require(&self, name: &str) -> Result<Tensor> {
        self.get(name)?
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), files: self.weights.describe() })
    }

    /// The matrix `name` in its stored blocks, where the store keeps it so.
    pub fn quantized(&self, name: &str) -> Result<Option<QMatrix>> {
        match self.weights {
            Weights::Store(store) => store.quantized(name),
            _ => Ok(None),
        }
    }
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
    let reader = Reader::new(weights)?;
    let data = varmap.data().lock().expect("varmap lock");
    // Sorted, so the first problem reported is the same on every run.
    let mut vars: Vec<(&String, &Var)> = data.iter().collect();
    vars.sort_by_key(|(name, _)| *name);
    for (name, var) in vars {
        let tensor = reader.require(name)?;
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
