//! Where weights come from and go: safetensors files or tensors in memory, seeded
//! initialisation, saving in the Hub's layout.

use super::*;

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
