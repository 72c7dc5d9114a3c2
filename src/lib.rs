//! kdllm: knowledge distillation of causal language models.
//!
//! Data flows one way: `recipe` → a stage (`generate`, `score`, `train`, `eval`) → `teacher`
//! (a model in this process, or one on a serving engine through `engine`) / `model` / `data`.
//! `hub` and `tokenizer` resolve and load what the stages need.

pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod engine;
pub mod eval;
pub mod export;
pub mod fault;
pub mod generate;
pub mod gguf;
pub mod hash;
pub mod hub;
pub mod interrupt;
pub mod model;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod task;
pub mod teacher;
pub mod tokenizer;
pub mod train;
