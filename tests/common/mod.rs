//! What the integration tests share: a tiny teacher in the Hub layout (random weights, a BPE
//! tokenizer trained here), prompt files, and a way to run the `kdllm` binary.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::Path;
use std::process::{Command, Output};

use candle_core::Device;
use kdllm::model::llama::{self, Llama, LlamaConfig};
use kdllm::tokenizer::Tokenizer;

pub const WORDS: &[&str] =
    &["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "ball", "and", "is"];

pub fn corpus() -> Vec<String> {
    (0..200)
        .map(|i| (0..8).map(|j| WORDS[(i * 7 + j * 3 + i / 5) % WORDS.len()]).collect::<Vec<_>>().join(" "))
        .collect()
}

/// Writes a 2-layer llama with random (sharpened) weights and a trained tokenizer into `dir`.
pub fn tiny_teacher(dir: &Path) -> LlamaConfig {
    let tok = Tokenizer::train_bpe(&corpus(), 300).unwrap();
    tok.save(dir).unwrap();
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": tok.vocab_size(), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": true,
        "bos_token_id": tok.bos_id(), "eos_token_id": tok.eos_ids()[0],
    }))
    .unwrap();
    let (vm, _) = Llama::trainable(&cfg, &Device::Cpu).unwrap();
    llama::init_weights(&vm, 3).unwrap();
    // Sharper than HF's init so the teacher's distributions are far from uniform.
    for v in vm.all_vars() {
        v.set(&(v.as_tensor() * 8.0).unwrap()).unwrap();
    }
    llama::save(&cfg, &vm, dir).unwrap();
    cfg
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
