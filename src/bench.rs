//! `kdllm bench`: training and sampling throughput of fixed llama configs (and optionally a GGUF
//! teacher) on this machine, with achieved GFLOP/s against a measured GEMM peak, peak memory,
//! and the Parquet size of teacher samples. Not part of the tests; `benches/compare.py` runs it
//! beside the PyTorch and llama.cpp references.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use crate::data::{FileMetadata, FinishReason, Sample, SampleWriter};
use crate::generate::{decode, row_rng, DecodeSettings};
use crate::model::llama::{self, Llama, LlamaConfig};
use crate::model::{Checkpoint, Precision};
use crate::train::optim::AdamW;
use crate::train::{loss, TrainConfig};

/// The benchmarked batches: sequences of 256, batches of 8.
pub const SEQ: usize = 256;
pub const BATCH: usize = 8;

/// (name, hidden, layers, heads, kv heads, ffn, vocab), tied embeddings: about 1M, 5M and 20M
/// parameters over a vocabulary of 8192, and the shape of SmolLM2-135M (random weights), which
/// `--configs` names alone (it is slow on a CPU).
pub const CONFIGS: [(&str, usize, usize, usize, usize, usize, usize); 4] = [
    ("1M", 64, 6, 4, 4, 256, 8192),
    ("5M", 256, 4, 4, 4, 768, 8192),
    ("20M", 512, 5, 8, 8, 1536, 8192),
    ("135M", 576, 30, 9, 3, 1536, 49152),
];

/// The configs `kdllm bench` runs without `--configs`.
const DEFAULT_CONFIGS: [&str; 3] = ["1M", "5M", "20M"];

#[derive(Debug, Clone)]
pub struct BenchJob {
    /// Where the tensors live (`--device`).
    pub device: crate::device::DeviceChoice,
    /// Only these configs (by name); all when empty.
    pub configs: Vec<String>,
    /// A GGUF teacher to measure as well.
    pub gguf: Option<PathBuf>,
    /// Training steps timed per config (after one warm-up step); 0 skips training.
    pub train_steps: usize,
    /// New tokens per sampled sequence.
    pub new_tokens: usize,
    /// Batch sizes to sample at; the best is reported beside batch 1.
    pub gen_batches: Vec<usize>,
    /// Compute dtype of sampling and training (bf16 training: f32 weights and optimizer).
    pub precision: Precision,
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub models: Vec<ModelReport>,
    /// Parquet bytes per completion token at `--logprobs 20` (5M model, sampled at T = 1).
    pub parquet_bytes_per_token: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu: String,
    /// The vector extensions kdllm's kernels can use, as the CPU reports them.
    pub cpu_flags: Vec<&'static str>,
    /// The path kdllm's hand-written kernels ran: `avx512`, `avx2` or `scalar` (capped by
    /// `KDLLM_SIMD`).
    pub kernels: &'static str,
    pub threads: usize,
    /// Best of 5 f32 1024³ matmuls through candle.
    pub gemm_peak_gflops: f64,
    /// The same through kdllm's bf16 GEMM (what `--dtype bf16` trains with), where the CPU
    /// has avx512_bf16.
    pub bf16_gemm_peak_gflops: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Phases {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub params: usize,
    pub train_tokens_per_sec: f64,
    /// Seconds per step in forward (loss included), backward and the AdamW step.
    pub train_phase_secs: Phases,
    /// 6 · params · tokens / s.
    pub train_gflops: f64,
    pub train_peak_mb: f64,
    /// Parameters + AdamW moments, f32.
    pub train_state_mb: f64,
    /// What one batch's forward holds for the backward: resident memory after the forward
    /// (loss computed, graph alive) minus before it.
    pub train_activations_mb: f64,
    /// (batch, generated tokens/s) for every batch tried, prefill included.
    pub gen_tokens_per_sec: Vec<(usize, f64)>,
    /// 2 · params per generated token, at the best batch.
    pub gen_gflops: f64,
}

pub fn run(job: &BenchJob) -> anyhow::Result<Report> {
    let (cpu, cpu_flags) = crate::model::ops::simd::cpu_description();
    let kernels = crate::model::ops::simd::level().name();
    let machine = Machine {
        cpu,
        cpu_flags,
        kernels,
        threads: candle_core::utils::get_num_threads(),
        gemm_peak_gflops: gemm_peak(|a, b| a.matmul(b))?,
        bf16_gemm_peak_gflops: if crate::model::ops::bf16_gemm_available(&Device::Cpu) {
            Some(gemm_peak(crate::model::ops::linear_bf16)?)
        } else {
            None
        },
    };
    eprintln!("{} ({}); kdllm kernels: {}", machine.cpu, machine.cpu_flags.join(" "), machine.kernels);
    eprintln!("{} threads, GEMM peak {:.0} GFLOP/s (f32 1024³, best of 5)", machine.threads, machine.gemm_peak_gflops);
    if let Some(bf16) = machine.bf16_gemm_peak_gflops {
        eprintln!("bf16 GEMM peak {bf16:.0} GFLOP/s (kdllm's avx512_bf16 kernel, what --dtype bf16 trains with; 1024³, best of 5)");
    }
    let known: Vec<&str> = CONFIGS.iter().map(|c| c.0).collect();
    if let Some(bad) = job.configs.iter().find(|c| !known.contains(&c.as_str()) && c.as_str() != "none") {
        anyhow::bail!("--configs: unknown config `{bad}`; known: {} (or `none`, with --gguf)", known.join(", "));
    }
    let device = crate::device::resolve(job.device)?;
    crate::device::check_dtype(&device, job.precision.dtype())?;
    eprintln!("models on {}", crate::device::name(&device));
    let mut models = Vec::new();
    for (name, hidden, layers, heads, kv_heads, ffn, vocab) in CONFIGS {
        let wanted = match job.configs.as_slice() {
            [] => DEFAULT_CONFIGS.contains(&name),
            some => some.iter().any(|c| c == name),
        };
        if !wanted {
            continue;
        }
        let cfg = config(hidden, layers, (heads, kv_heads), ffn, vocab);
        let (varmap, model) = random_model(&cfg, &device)?;
        let r = measure(name, &cfg, varmap, &model, job, |vm| inference_copy(&cfg, vm, job.precision, &device))?;
        print_row(&r, &machine);
        models.push(r);
    }
    if let Some(path) = &job.gguf {
        let ckpt = Checkpoint::open(&path.to_string_lossy(), None)?;
        let (cfg, varmap, model) = ckpt.trainable(&device, None)?;
        let name = path.file_name().map_or("gguf".into(), |n| n.to_string_lossy().into_owned());
        // Sampled as `generate` samples it: from the file, in --dtype (gguf: its own blocks).
        let r = measure(&name, &cfg, varmap, &model, job, |_| ckpt.model(&device, job.precision))?;
        print_row(&r, &machine);
        models.push(r);
    }
    let parquet_bytes_per_token = parquet_size()?;
    eprintln!("Parquet: {parquet_bytes_per_token:.1} bytes per completion token at --logprobs 20");
    let report = Report { machine, models, parquet_bytes_per_token };
    if let Some(path) = &job.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

fn config(hidden: usize, layers: usize, (heads, kv_heads): (usize, usize), ffn: usize, vocab: usize) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 1024,
        "tie_word_embeddings": true,
    }))
    .expect("bench configs are valid")
}

/// A trainable model with HF's random initialization, seeded.
fn random_model(cfg: &LlamaConfig, device: &Device) -> anyhow::Result<(candle_nn::VarMap, Llama)> {
    let (varmap, model) = Llama::trainable(cfg, device)?;
    llama::init_weights(&varmap, 0)?;
    Ok((varmap, model))
}

/// The inference model `generate` would build from the same weights.
fn inference_copy(
    cfg: &LlamaConfig,
    varmap: &candle_nn::VarMap,
    precision: Precision,
    device: &Device,
) -> anyhow::Result<Llama> {
    if precision == Precision::Gguf {
        anyhow::bail!(
            "--dtype gguf samples a GGUF file's own blocks: give --gguf FILE --configs none, or use --dtype q8"
        );
    }
    let weights = llama::Weights::Tensors(llama::tensors(varmap));
    Ok(match precision.scheme() {
        Some(scheme) => Llama::quantized(cfg, &weights, scheme)?,
        None => Llama::from_weights(cfg, &weights, device, precision.dtype())?,
    })
}

fn measure(
    name: &str,
    cfg: &LlamaConfig,
    varmap: candle_nn::VarMap,
    model: &Llama,
    job: &BenchJob,
    teacher: impl FnOnce(&candle_nn::VarMap) -> anyhow::Result<Llama>,
) -> anyhow::Result<ModelReport> {
    let params = cfg.num_params();
    // Training first, so that its peak and activations are measured on a fresh heap (the
    // allocator keeps what a phase freed, see main.rs). Then sampling, on an inference copy of the
    // weights as `generate` makes.
    reset_peak_memory();
    let (train_tokens_per_sec, train_phase_secs, train_activations_mb) = match job.train_steps {
        0 => (0.0, Phases::default(), 0.0),
        steps => train_speed(cfg, &varmap, model, steps, job.precision)?,
    };
    let train_peak_mb = peak_memory_mb();

    let teacher = teacher(&varmap)?;
    let mut gen = Vec::new();
    for &b in &job.gen_batches {
        gen.push((b, gen_speed(&teacher, b, job.new_tokens)?));
    }
    let best = gen.iter().map(|g| g.1).fold(0.0, f64::max);
    Ok(ModelReport {
        name: name.to_string(),
        params,
        train_tokens_per_sec,
        train_phase_secs,
        train_gflops: 6.0 * params as f64 * train_tokens_per_sec / 1e9,
        train_peak_mb,
        train_state_mb: 3.0 * params as f64 * 4.0 / 1e6,
        train_activations_mb,
        gen_tokens_per_sec: gen,
        gen_gflops: 2.0 * params as f64 * best / 1e9,
    })
}

/// Forward, cross-entropy, backward and an AdamW step on random (B, T) batches; tokens/s over
/// `steps` steps after one warm-up step, the mean time of each phase of a step, and the MB one
/// forward holds for the backward (measured on the warm-up step).
fn train_speed(
    cfg: &LlamaConfig,
    varmap: &candle_nn::VarMap,
    model: &Llama,
    steps: usize,
    precision: Precision,
) -> anyhow::Result<(f64, Phases, f64)> {
    let vars: Vec<(String, Var)> =
        varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut opt = AdamW::new(vars, &TrainConfig::default())?;
    let mut rng = StdRng::seed_from_u64(0);
    let device = model.device();
    let every_position = Tensor::arange(0, (BATCH * SEQ) as u32, device)?;
    let mut started = Instant::now();
    let mut phases = Phases::default();
    let mut activations_mb = 0.0;
    for step in 0..=steps {
        if step == 1 {
            started = Instant::now();
            phases = Phases::default();
        }
        let ids: Vec<u32> = (0..BATCH * (SEQ + 1)).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
        let ids = Tensor::from_vec(ids, (BATCH, SEQ + 1), device)?;
        let (inputs, targets) = (ids.narrow(1, 0, SEQ)?, ids.narrow(1, 1, SEQ)?.flatten_all()?);
        let (rss0, t0) = (resident_memory_mb(), Instant::now());
        // bf16: mixed precision as `train.dtype: bf16` runs it (bf16 GEMMs or a cast per step).
        let logits = model.for_training(precision.dtype())?.forward_at(&inputs, &every_position)?;
        let loss = loss::cross_entropy(&logits, &targets)?;
        let t1 = Instant::now();
        if step == 0 {
            activations_mb = resident_memory_mb() - rss0;
        }
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let grads: Vec<Tensor> = opt
            .vars()
            .map(|(name, v)| grads.get(v).cloned().with_context(|| format!("no gradient for {name}")))
            .collect::<anyhow::Result<_>>()?;
        opt.step(&grads, 1e-4, 1.0)?;
        // A GPU runs the step asynchronously: wait for it before reading the clock.
        device.synchronize()?;
        phases.forward += (t1 - t0).as_secs_f64() / steps as f64;
        phases.backward += (t2 - t1).as_secs_f64() / steps as f64;
        phases.optimizer += t2.elapsed().as_secs_f64() / steps as f64;
    }
    Ok(((steps * BATCH * SEQ) as f64 / started.elapsed().as_secs_f64(), phases, activations_mb))
}

/// Greedy decoding of `new_tokens` tokens after 16-token random prompts, never stopping early;
/// generated tokens/s with the prefill included.
fn gen_speed(model: &Llama, batch: usize, new_tokens: usize) -> anyhow::Result<f64> {
    let mut rng = StdRng::seed_from_u64(1);
    let vocab = model.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..batch).map(|_| (0..16).map(|_| rng.random_range(0..vocab)).collect()).collect();
    let settings = DecodeSettings {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: new_tokens,
        logprobs: 0,
        eos_ids: Vec::new(),
    };
    let mut rngs: Vec<StdRng> = (0..batch).map(|i| row_rng(0, "bench", i as u32)).collect();
    let started = Instant::now();
    let out = decode(model, &prompts, &mut rngs, &settings)?;
    let tokens: usize = out.iter().map(|c| c.ids.len()).sum();
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}

fn gemm_peak(product: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>) -> anyhow::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = product(&a, &b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// Bytes per completion token of a Parquet file of samples at K = 20 from the 5M config.
fn parquet_size() -> anyhow::Result<f64> {
    let (_, hidden, layers, heads, kv_heads, ffn, vocab) = CONFIGS[1];
    let cfg = config(hidden, layers, (heads, kv_heads), ffn, vocab);
    let model = inference_copy(&cfg, &random_model(&cfg, &Device::Cpu)?.0, Precision::F32, &Device::Cpu)?;
    let path = std::env::temp_dir().join(format!("kdllm-bench-{}.parquet", std::process::id()));
    let mut writer = SampleWriter::create(&path, &FileMetadata::new("bench", 20, serde_json::json!({})))?;
    let settings = DecodeSettings {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 64,
        logprobs: 20,
        eos_ids: Vec::new(),
    };
    let mut tokens = 0;
    for chunk in 0..4u32 {
        let prompts: Vec<Vec<u32>> =
            (0..16u32).map(|i| (0..16).map(|j| (i * 131 + j * 17 + chunk) % 8192).collect()).collect();
        let mut rngs: Vec<StdRng> = (0..16).map(|i| row_rng(chunk as u64, "parquet", i)).collect();
        for (i, c) in decode(&model, &prompts, &mut rngs, &settings)?.into_iter().enumerate() {
            tokens += c.ids.len();
            writer.write(&Sample {
                prompt_id: format!("p{chunk}-{i}"),
                sample_index: 0,
                prompt: String::new(),
                completion: String::new(),
                prompt_token_ids: prompts[i].clone(),
                completion_token_ids: c.ids,
                token_logprobs: c.token_logprobs,
                topk_token_ids: c.topk_ids,
                topk_logprobs: c.topk_logprobs,
                finish_reason: FinishReason::Length,
                teacher: "bench".into(),
                teacher_revision: None,
            })?;
        }
    }
    writer.finish()?;
    let bytes = std::fs::metadata(&path)?.len();
    std::fs::remove_file(&path)?;
    Ok(bytes as f64 / tokens as f64)
}

/// Linux: resets the process's peak resident set size (`VmHWM`) to the current one; elsewhere a
/// no-op. Memory the allocator kept from an earlier phase still counts: for clean peaks, run one
/// config per process (`--configs 5M`), as benches/compare.py does.
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since the last reset, in MB (0 where /proc is absent).
fn peak_memory_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

/// Resident set size now, in MB (0 where /proc is absent).
fn resident_memory_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

fn proc_status_mb(key: &str) -> f64 {
    let status = std::fs::read_to_string(Path::new("/proc/self/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    kb * 1024.0 / 1e6
}

fn print_row(r: &ModelReport, m: &Machine) {
    let gen: Vec<String> = r.gen_tokens_per_sec.iter().map(|(b, t)| format!("b{b} {t:.0}")).collect();
    eprintln!(
        "{:<34} {:>7.2}M params | train {:>6.0} tok/s (step: forward {:.2} s, backward {:.2} s, AdamW {:.2} s) {:>5.1} GFLOP/s ({:>4.1}% of peak) peak {:>6.0} MB (state {:.0} MB, activations {:.0} MB) | sample tok/s {} ({:.1} GFLOP/s)",
        r.name,
        r.params as f64 / 1e6,
        r.train_tokens_per_sec,
        r.train_phase_secs.forward,
        r.train_phase_secs.backward,
        r.train_phase_secs.optimizer,
        r.train_gflops,
        100.0 * r.train_gflops / m.gemm_peak_gflops,
        r.train_peak_mb,
        r.train_state_mb,
        r.train_activations_mb,
        gen.join(", "),
        r.gen_gflops,
    );
}
