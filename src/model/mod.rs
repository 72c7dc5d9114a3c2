//! Causal language models that kdllm can sample from and train.

pub mod gguf;
pub mod llama;

pub use llama::{Llama, LlamaConfig};
