//! kdllm against transformers: tiny random checkpoints that transformers wrote, with the logits
//! it computed (tests/fixtures, made by tools/make_fixtures.py), one per supported family.
//! `KDLLM_PARITY_DIR=folder` also checks a folder prepared by tools/check_export.py (e.g. a
//! student kdllm exported, with transformers' logits for it).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use kdllm::model::llama::KvCache;
use kdllm::model::{Checkpoint, Llama};

/// A fixture, found from the current directory (cargo runs tests in the package root; so does
/// tools/gpu-check.sh on a GPU machine, where the build's path does not exist).
fn fixture(name: &str) -> PathBuf {
    let here = Path::new("tests/fixtures");
    let root =
        if here.is_dir() { here.to_path_buf() } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures") };
    root.join(name)
}

/// (input_ids (B, T) as u32, logits (B, T, V)) from an `expected` safetensors file.
fn expected(path: &Path) -> (Tensor, Tensor) {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let ids = t.remove("input_ids").unwrap().to_dtype(DType::U32).unwrap();
    (ids, t.remove("logits").unwrap())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Full forward and prefill + one-token KV-cache decode both match transformers to ≤ 1e-4 on the
/// CPU (≤ 1e-3 on another `KDLLM_TEST_DEVICE`: a GPU's reductions run in another order).
fn check(dir: &Path, expected_file: &str) {
    let (ids, want) = expected(&dir.join(expected_file));
    let device = common::test_device();
    let tol = if device.is_cpu() { 1e-4 } else { 1e-3 };
    let ids = ids.to_device(&device).unwrap();
    let model = Llama::load(dir, &device, DType::F32).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let full = model.forward(&ids, None).unwrap().to_device(&Device::Cpu).unwrap();
    let diff = max_abs_diff(&full, &want);
    assert!(diff <= tol, "{}: full forward max abs diff {diff}", dir.display());

    let (b, t) = ids.dims2().unwrap();
    let mut cache = KvCache::new(model.config(), vec![0; b]);
    let mut parts = vec![model.forward(&ids.narrow(1, 0, 7).unwrap(), Some(&mut cache)).unwrap()];
    for i in 7..t {
        parts.push(model.forward(&ids.narrow(1, i, 1).unwrap(), Some(&mut cache)).unwrap());
    }
    let cached = max_abs_diff(&Tensor::cat(&parts, 1).unwrap().to_device(&Device::Cpu).unwrap(), &want);
    assert!(cached <= tol, "{}: cached decode max abs diff {cached}", dir.display());
    eprintln!("{}: max abs diff {diff:.1e} (full), {cached:.1e} (cached)", dir.display());
}

#[test]
fn llama2_sharded_multi_head() {
    check(&fixture("llama2"), "expected.safetensors");
}

#[test]
fn llama3_2_rope_scaling_tied() {
    check(&fixture("llama3.2"), "expected.safetensors");
}

#[test]
fn llama_with_attention_and_mlp_biases() {
    check(&fixture("llama-bias"), "expected.safetensors");
}

#[test]
fn tinyllama_bf16_weights() {
    check(&fixture("tinyllama"), "expected.safetensors");
}

#[test]
fn smollm2_f16_weights_explicit_head_dim() {
    check(&fixture("smollm2"), "expected.safetensors");
}

#[test]
fn mistral_sliding_window() {
    check(&fixture("mistral"), "expected.safetensors");
}

#[test]
fn qwen2_qkv_biases_tied() {
    check(&fixture("qwen2"), "expected.safetensors");
}

#[test]
fn qwen2_5_window_configured_but_off() {
    check(&fixture("qwen2.5"), "expected.safetensors");
}

#[test]
fn unsupported_architecture_is_refused_by_name() {
    let err = Checkpoint::open(fixture("unsupported-phi3").to_str().unwrap(), None).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("model_type `phi3` is not supported; supported: llama, mistral, qwen2"), "{msg}");
}

#[test]
fn pytorch_pickle_checkpoint_is_refused_with_a_conversion_hint() {
    // kdllm refuses pickles without reading them, so a placeholder file is enough (and no pickle
    // is kept in the repository).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("llama2").join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not a real pickle").unwrap();
    let err = Checkpoint::open(dir.path().to_str().unwrap(), None).err().unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("safetensors") && msg.contains("save_pretrained"),
        "{msg}"
    );
}

/// Opt-in: a folder that tools/check_export.py wrote `transformers_expected.safetensors` into.
#[test]
fn folder_from_kdllm_parity_dir() {
    match std::env::var_os("KDLLM_PARITY_DIR") {
        Some(dir) => check(Path::new(&dir), "transformers_expected.safetensors"),
        None => eprintln!("skipping: set KDLLM_PARITY_DIR to a folder prepared by tools/check_export.py"),
    }
}
