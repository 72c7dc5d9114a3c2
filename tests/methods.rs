//! The distillation methods end to end on a tiny teacher: a teacher in memory against stored
//! top-k, the divergences through the trainer, and a mixture of two teachers.

use std::path::{Path, PathBuf};

use common::{tiny_teacher, write_prompts};
use kdllm::generate::{generate, score, GenerateJob, LongPrompts, SamplingConfig, ScoreJob};
use kdllm::model::{ops::simd, Precision};
use kdllm::train::{
    distill, DistillJob, Divergence, KdConfig, ModelInit, OnPolicyConfig, Resume, TrainConfig, TrainReport,
};

mod common;

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
    prompts: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let teacher = root.join("teacher");
    tiny_teacher(&teacher);
    let prompts = root.join("prompts.jsonl");
    write_prompts(&prompts, 12);
    Setup { _tmp: tmp, root, teacher, prompts }
}

impl Setup {
    /// Samples of `teacher` with its top-`k` at every position.
    fn samples(&self, name: &str, k: usize) -> PathBuf {
        self.samples_with_seed(name, k, 1)
    }

    fn samples_with_seed(&self, name: &str, k: usize, seed: u64) -> PathBuf {
        let out = self.root.join(name);
        generate(&GenerateJob {
            device: Default::default(),
            teacher: self.teacher.display().to_string(),
            revision: None,
            tokenizer: None,
            server: Default::default(),
            shard: None,
            prompts: self.prompts.clone(),
            output: out.clone(),
            sampling: SamplingConfig { max_new_tokens: 6, batch_size: 4, logprobs: k, seed, ..Default::default() },
            precision: Precision::F32,
            long_prompts: LongPrompts::Refuse,
            part_size: 64,
            overwrite: false,
        })
        .unwrap();
        out
    }

    /// `teacher`'s top-`k` over the completions of `samples`.
    fn scored(&self, teacher: &Path, samples: &Path, name: &str, k: usize) -> PathBuf {
        let out = self.root.join(name);
        score(&ScoreJob {
            device: Default::default(),
            teacher: teacher.display().to_string(),
            revision: None,
            tokenizer: None,
            server: Default::default(),
            data: samples.to_path_buf(),
            output: out.clone(),
            logprobs: k,
            precision: Precision::F32,
            batch_size: 4,
            part_size: 64,
            overwrite: false,
            shard: None,
        })
        .unwrap();
        out
    }

    fn job(&self, name: &str, data: &Path, kd: KdConfig, steps: usize) -> DistillJob {
        let config = serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 128, "tie_word_embeddings": true,
        }))
        .unwrap();
        DistillJob {
            device: Default::default(),
            data: data.to_path_buf(),
            teacher: None,
            teachers: Vec::new(),
            server: Default::default(),
            student: ModelInit { from: None, config: Some(config), layers: None },
            tokenizer: Some(self.teacher.clone()),
            kd,
            train: TrainConfig {
                steps,
                batch_size: 4,
                lr: 1e-2,
                warmup_steps: 1,
                valid_fraction: 0.0,
                ..Default::default()
            },
            output: self.root.join(name),
            resume: Resume::Auto,
        }
    }
}

fn kd(divergence: Divergence, alpha: f64) -> KdConfig {
    KdConfig { alpha, temperature: 2.0, divergence, beta: 0.4, skew: 0.2, ..Default::default() }
}

fn vocab(teacher: &Path) -> usize {
    kdllm::tokenizer::Tokenizer::from_folder(teacher).unwrap().vocab_size()
}

/// The first step's loss: the same student init and batch, before any update.
fn first(r: &TrainReport) -> f64 {
    r.first_loss
}

#[test]
fn a_teacher_in_memory_gives_what_a_full_vocabulary_topk_approximates() {
    let s = setup();
    // Stored top-k over the whole vocabulary: the tail is empty, so the bucketed divergence is
    // the exact one, and must equal the one computed from the teacher held in memory (up to
    // the KV-cache decode's rounding, which this deliberately sharp teacher magnifies).
    let full = s.samples("full", vocab(&s.teacher));
    for d in [Divergence::ForwardKl, Divergence::Jsd, Divergence::Tvd] {
        let stored = distill(&s.job(&format!("stored-{}", d.name()), &full, kd(d, 1.0), 1)).unwrap();
        let mut job = s.job(&format!("memory-{}", d.name()), &full, kd(d, 1.0), 1);
        job.teacher = Some(s.teacher.display().to_string());
        let memory = distill(&job).unwrap();
        assert!(first(&stored) > 1e-3, "{d:?}: a random student is far from the teacher");
        assert!(
            (first(&stored) - first(&memory)).abs() < 1e-3 * first(&stored).max(1.0),
            "{d:?}: stored full top-k {} vs teacher in memory {}",
            first(&stored),
            first(&memory)
        );
    }
    // With a small K the stored divergence is only an approximation of the exact one.
    let top3 = s.samples("top3", 3);
    let stored = distill(&s.job("stored-top3", &top3, kd(Divergence::ForwardKl, 1.0), 1)).unwrap();
    let mut job = s.job("memory-top3", &top3, kd(Divergence::ForwardKl, 1.0), 1);
    job.teacher = Some(s.teacher.display().to_string());
    let memory = distill(&job).unwrap();
    let gap = (first(&stored) - first(&memory)).abs() / first(&memory);
    assert!(gap > 1e-2, "top-3 {} vs exact {}", first(&stored), first(&memory));
}

#[test]
fn every_divergence_trains_the_student_towards_the_teacher() {
    let s = setup();
    let samples = s.samples("samples", 8);
    for d in Divergence::ALL {
        let r = distill(&s.job(&format!("s-{}", d.name()), &samples, kd(d, 1.0), 30)).unwrap();
        assert!(
            r.final_loss.is_finite() && r.final_loss < r.first_loss * 0.98,
            "{d:?}: {} → {}",
            r.first_loss,
            r.final_loss
        );
    }
}

#[test]
fn two_teachers_are_one_mixture_target() {
    let s = setup();
    let samples = s.samples("samples", 8);
    // A second teacher: the first with other weights.
    let other = s.root.join("teacher2");
    common::tiny_teacher_seeded(&other, 11);
    let scored = s.scored(&other, &samples, "scored2", 8);
    let mixed = |name: &str, weights: [f64; 2]| {
        let mut job = s.job(name, &samples, kd(Divergence::ForwardKl, 1.0), 1);
        job.teachers = vec![(samples.clone(), weights[0]), (scored.clone(), weights[1])];
        distill(&job)
    };
    let alone = distill(&s.job("alone", &samples, kd(Divergence::ForwardKl, 1.0), 1)).unwrap();
    // Weight 0 for the second teacher: its ids join the union at no mass, which changes nothing.
    let first_only = mixed("first-only", [1.0, 0.0]).unwrap();
    assert!((first(&alone) - first(&first_only)).abs() < 1e-5, "{} vs {}", first(&alone), first(&first_only));
    let half = mixed("half", [1.0, 1.0]).unwrap();
    assert!((first(&half) - first(&alone)).abs() > 1e-3, "the second teacher must move the target");

    // Scores over other completions (the same prompts sampled with another seed) are refused,
    // naming the prompt and the fix.
    let reseeded = s.samples_with_seed("reseeded", 8, 9);
    let mut job = s.job("mismatch", &samples, kd(Divergence::ForwardKl, 1.0), 1);
    job.teachers = vec![(samples.clone(), 1.0), (s.scored(&other, &reseeded, "scored-other", 8), 1.0)];
    let err = format!("{:#}", distill(&job).unwrap_err());
    eprintln!("{err}");
    assert!(err.contains("does not hold the completion of prompt") && err.contains("kdllm score"), "{err}");
}

#[test]
fn on_policy_lambda_zero_is_the_off_policy_run_and_one_is_all_student() {
    let s = setup();
    let samples = s.samples("samples", 8);
    let in_memory = |name: &str, on_policy: Option<OnPolicyConfig>| {
        let mut job = s.job(name, &samples, KdConfig { on_policy, ..kd(Divergence::Jsd, 0.5) }, 12);
        job.teacher = Some(s.teacher.display().to_string());
        distill(&job).unwrap()
    };
    let off = in_memory("off", None);
    let zero = in_memory("zero", Some(OnPolicyConfig { lambda: 0.0, max_new_tokens: 6, ..Default::default() }));
    let bytes = |r: &TrainReport| std::fs::read(r.output.join("model.safetensors")).unwrap();
    assert!(bytes(&off) == bytes(&zero), "lambda 0 must train exactly as off-policy");
    assert_eq!(zero.sample_secs, 0.0);
    let one = in_memory("one", Some(OnPolicyConfig { lambda: 1.0, max_new_tokens: 6, ..Default::default() }));
    assert!(bytes(&one) != bytes(&off));
    assert!(one.sample_secs > 0.0 && one.teacher_secs > 0.0 && one.final_loss.is_finite());
    let metrics = std::fs::read_to_string(one.output.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().all(|l| l.contains("\"on_policy\":1")), "{metrics}");

    // Without a teacher in memory nothing can grade the student's samples.
    let mut job = s.job(
        "no-teacher",
        &samples,
        KdConfig { on_policy: Some(OnPolicyConfig::default()), ..kd(Divergence::Jsd, 0.5) },
        2,
    );
    job.teacher = None;
    let err = format!("{:#}", distill(&job).unwrap_err());
    assert!(err.contains("`kd.on_policy` needs a teacher") && err.contains("`teacher:`"), "{err}");
}

/// Mixed precision (`train.dtype: bf16`: bf16 compute, f32 weights, gradients and moments) on the
/// same data and init as f32: the first loss within 1% (only the rounding of weights and
/// activations differs), the final within 5%, and it trains; the saved weights are f32.
#[test]
fn bf16_training_follows_the_f32_run() {
    let s = setup();
    let samples = s.samples("samples", 8);
    let run = |name: &str, dtype: Precision| {
        let mut job = s.job(name, &samples, kd(Divergence::ForwardKl, 0.5), 30);
        job.train.dtype = dtype;
        distill(&job).unwrap()
    };
    let f32_run = run("f32", Precision::F32);
    let mut bf16_runs = vec![("bf16", run("bf16", Precision::Bf16))];
    // A CPU with avx512_bf16 trains bf16 with bf16 GEMMs; the AVX2 cap runs the cast path too.
    if kdllm::model::ops::bf16_gemm_available(&candle_core::Device::Cpu) {
        let cast = simd::with_level(simd::Level::Avx2, || run("bf16-cast", Precision::Bf16));
        bf16_runs.push(("bf16 cast", cast));
    }
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    for (path, bf16_run) in &bf16_runs {
        let (a, b) = (&f32_run, bf16_run);
        eprintln!(
            "loss f32 {:.4} → {:.4}, {path} {:.4} → {:.4}",
            a.first_loss, a.final_loss, b.first_loss, b.final_loss
        );
        assert!(
            rel(bf16_run.first_loss, f32_run.first_loss) < 0.01,
            "{path}: {} vs {}",
            bf16_run.first_loss,
            f32_run.first_loss
        );
        assert!(
            rel(bf16_run.final_loss, f32_run.final_loss) < 0.05,
            "{path}: {} vs {}",
            bf16_run.final_loss,
            f32_run.final_loss
        );
        assert!(
            bf16_run.final_loss < bf16_run.first_loss * 0.9,
            "{path}: {} → {}",
            bf16_run.first_loss,
            bf16_run.final_loss
        );
        assert_ne!(bf16_run.final_loss, f32_run.final_loss, "{path}: bf16 computed in f32");
    }
    if let [(_, gemm), (_, cast)] = &bf16_runs[..] {
        assert_ne!(gemm.final_loss, cast.final_loss, "the two bf16 paths ran the same code");
    }
    let weights =
        candle_core::safetensors::load(s.root.join("bf16/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(weights.values().all(|t| t.dtype() == candle_core::DType::F32));
}
