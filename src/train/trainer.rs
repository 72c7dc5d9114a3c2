//! The training loop shared by `finetune` and `distill`, readable top to bottom:
//! setup (tokenizer, data, model, optimizer) → for each step: set lr → micro-batches
//! (forward, loss, backward, accumulate) → clip → AdamW step → log / validate → save.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::batch::{Batch, Sequence};
use super::checkpoint::{self, State};
use super::divergence;
use super::loss::{combine, cross_entropy, hidden_alignment, scalar, LossTerms};
use super::mixture;
use super::on_policy::{self, Grader, Sampler, Written};
use super::optim::{clip_scale, grad_norm, AdamW};
use super::schedule::lr_at;
use super::{
    DistillJob, FinetuneJob, KdConfig, ModelInit, OnPolicyConfig, Resume, TrainConfig, TrainError, TrainReport,
};
use crate::data;
use crate::engine;
use crate::model::llama::{self, Llama, LlamaConfig};
use crate::model::{Checkpoint, Weights};
use crate::teacher::Remote;
use crate::tokenizer::Tokenizer;

pub fn finetune(job: &FinetuneJob) -> anyhow::Result<TrainReport> {
    validate(&job.train, None)?;
    let (tokenizer, source) = tokenizer_for(&job.model, job.tokenizer.as_deref())?;
    let examples = data::read_examples(&job.data)?;
    let seqs = examples
        .iter()
        .map(|e| encode_example(&tokenizer, &e.prompt, &e.completion))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kd = KdConfig::none();
    let keys: Vec<String> = examples.iter().map(|e| format!("{}\u{0}{}", e.prompt, e.completion)).collect();
    let sampling = serde_json::json!({"do_sample": true, "temperature": 1.0, "top_p": 1.0, "top_k": 0});
    let run_id = identity("finetune", &job.data, &job.model, source.as_ref(), &tokenizer, &kd, &job.train)?;
    let device = crate::device::resolve(job.device)?;
    let out = Output { dir: &job.output, sampling, run_id, resume: job.resume, device };
    run(&job.model, source, tokenizer, seqs, keys, Guide { kd: &kd, teacher: None, grader: None }, &job.train, out)
}

pub fn distill(job: &DistillJob) -> anyhow::Result<TrainReport> {
    validate(&job.train, Some(&job.kd))?;
    let (tokenizer, source) = tokenizer_for(&job.student, job.tokenizer.as_deref())?;
    let set = data::read_samples(&job.data)?;
    let same_vocab = tokenizer.vocab_hash() == set.meta.tokenizer_hash;
    let (server, model) = match job.teacher.as_deref() {
        Some(t) if engine::is_server(t) => (Some(t), None),
        t => (None, t),
    };
    let device = crate::device::resolve(job.device)?;
    let teacher = model.map(|spec| load_teacher(spec, &tokenizer, &device)).transpose()?;
    let grader = server.map(|url| connect_grader(url, job, &tokenizer, set.meta.logprobs_k)).transpose()?;
    if job.kd.on_policy.is_some() && teacher.is_none() && grader.is_none() {
        bail!(TrainError::Config(
            "`kd.on_policy` needs a teacher that can grade the student's samples: set `teacher:` to the teacher model \
             (held in memory) or to a vLLM or SGLang server"
                .into()
        ));
    }
    if job.kd.hidden.is_some() && teacher.is_none() {
        bail!(TrainError::Config(
            "`kd.hidden` aligns hidden states with a teacher in memory: set `teacher:` to the teacher model".into()
        ));
    }
    let wants_teacher = job.kd.alpha > 0.0 || teacher.is_some() || !job.teachers.is_empty();
    if !same_vocab && wants_teacher {
        return Err(TrainError::TokenizerMismatch { data: job.data.clone() }.into());
    }
    // The targets: the teacher in memory, else the mixture of `teachers`, else the data's own top-k.
    let stored = same_vocab && set.meta.logprobs_k > 0 && teacher.is_none() && job.teachers.is_empty();
    if job.kd.alpha > 0.0 && set.meta.logprobs_k == 0 && teacher.is_none() && job.teachers.is_empty() {
        return Err(TrainError::Config(format!(
            "{} holds no teacher top-k (written with --logprobs 0); set `kd.alpha: 0`, regenerate with --logprobs K, \
             or set `teacher:` to hold the teacher in memory",
            job.data.display()
        ))
        .into());
    }
    let mixture = (!job.teachers.is_empty()).then(|| mixture::targets(&job.data, &set, &job.teachers)).transpose()?;
    let keys = set.samples.iter().map(|s| s.prompt_id.clone()).collect();
    // The student's generation defaults are the ones its teacher data was sampled with.
    let setting = |key: &str, default: f64| set.meta.sampling.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
    let temperature = setting("temperature", 1.0);
    let sampling = serde_json::json!({"do_sample": temperature > 0.0, "temperature": temperature,
        "top_p": setting("top_p", 1.0), "top_k": setting("top_k", 0.0) as u64});
    let seqs = if same_vocab {
        let mut seqs: Vec<Sequence> = set.samples.into_iter().map(|s| Sequence::from_sample(s, stored)).collect();
        if let Some(rows) = mixture {
            seqs.iter_mut().zip(rows).for_each(|(s, t)| s.teacher = Some(t));
        }
        seqs
    } else {
        eprintln!(
            "note: the student's tokenizer differs from the teacher's that wrote {}; training sequence-level only \
             on the completion text re-tokenized with the student's tokenizer",
            job.data.display()
        );
        set.samples.iter().map(|s| retokenize(&tokenizer, s)).collect::<anyhow::Result<_>>()?
    };
    let teacher_context = match (&teacher, &grader) {
        (Some((t, _)), _) => Some(t.config().max_position_embeddings),
        (None, Some(g)) => g.remote.server.max_context,
        (None, None) => None,
    };
    if let Some(o) = &job.kd.on_policy {
        let prompt = seqs.iter().map(|s| s.loss_from).max().unwrap_or(0);
        let student = match (&job.student.config, &source) {
            (Some(c), _) => c.max_position_embeddings,
            (None, Some(ckpt)) => ckpt.config.max_position_embeddings,
            (None, None) => usize::MAX,
        };
        let limit = student.min(teacher_context.unwrap_or(usize::MAX));
        if prompt + o.max_new_tokens > limit {
            bail!(TrainError::Config(format!(
                "`kd.on_policy.max_new_tokens` is {}, but the longest prompt has {prompt} tokens and the student and \
                 teacher read at most {limit}: lower it to {}",
                o.max_new_tokens,
                limit.saturating_sub(prompt)
            )));
        }
    }
    if let (Some((t, _)), Some(spec)) = (&teacher, &job.teacher) {
        let context = t.config().max_position_embeddings;
        let longest = seqs.iter().map(|s| s.ids.len().min(job.train.max_seq_len) - 1).max().unwrap_or(0);
        if longest > context {
            bail!(TrainError::Config(format!(
                "the longest training sequence has {longest} positions but the teacher `{spec}` reads at most \
                 {context}; set `train.max_seq_len` to {context} or less"
            )));
        }
    }
    let mut run_id = identity("distill", &job.data, &job.student, source.as_ref(), &tokenizer, &job.kd, &job.train)?;
    if let Some((_, fingerprint)) = &teacher {
        run_id["teacher"] = fingerprint.clone().into();
    }
    if let Some(g) = &grader {
        // The served model, not the address: another server of the same model continues the run.
        run_id["teacher"] = serde_json::json!({"server_model": g.remote.server.model, "top_k": g.k});
    }
    if !job.teachers.is_empty() {
        let mut teachers = Vec::new();
        for (path, weight) in &job.teachers {
            let hash =
                crate::hash::sha256_path(path, &|_| false).with_context(|| format!("reading {}", path.display()))?;
            teachers.push(serde_json::json!([hash, weight]));
        }
        run_id["teachers"] = teachers.into();
    }
    let out = Output { dir: &job.output, sampling, run_id, resume: job.resume, device };
    let guide = Guide { kd: &job.kd, teacher: teacher.map(|(t, _)| t), grader };
    run(&job.student, source, tokenizer, seqs, keys, guide, &job.train, out)
}

/// The server that grades on-policy batches: it must return prompt log-probs and share the
/// student's tokenizer. It grades with the data's top-k width (20 when the data has none).
fn connect_grader(url: &str, job: &DistillJob, tokenizer: &Tokenizer, data_k: usize) -> anyhow::Result<Grader> {
    if job.kd.on_policy.is_none() {
        bail!(TrainError::Config(format!(
            "`teacher`: {url} is a server; a server teacher grades only on-policy batches (`kd.on_policy`). To \
             distill on its top-k, score the samples with a `kind: score` step and list its output under `teachers:`"
        )));
    }
    if job.kd.hidden.is_some() {
        bail!(TrainError::Config(format!(
            "`kd.hidden` aligns hidden states with a teacher held in memory, but `teacher` is the server {url}"
        )));
    }
    let (runtime, server) = Remote::start(url, &job.server)?;
    if !server.engine.scores_prompts() {
        bail!(TrainError::Config(format!(
            "the teacher server {url} is {}, which cannot return the log-probs of a given text in one request, and \
             on-policy batches need them: {}. Serve the teacher with one of those, or hold it in memory",
            server.engine,
            engine::PROMPT_LOGPROB_ENGINES
        )));
    }
    let remote = Remote::new(runtime, server, tokenizer.clone(), "the student's tokenizer", &job.server)?;
    Ok(Grader { remote, k: if data_k > 0 { data_k } else { 20 } })
}

/// The teacher held in memory during distillation, and its fingerprint (for the run identity).
fn load_teacher(spec: &str, tokenizer: &Tokenizer, device: &Device) -> anyhow::Result<(Llama, String)> {
    let ckpt = Checkpoint::open(spec, None).with_context(|| format!("opening the teacher `{spec}`"))?;
    if ckpt.tokenizer.vocab_hash() != tokenizer.vocab_hash() {
        bail!(TrainError::Config(format!(
            "the teacher `{spec}` has a different tokenizer than the student; a teacher in memory must share the \
             student's vocabulary (set the distill step's `tokenizer:` to the teacher's folder)"
        )));
    }
    let fingerprint = ckpt.fingerprint()?;
    Ok((ckpt.model(device, crate::model::Precision::F32)?, fingerprint))
}

/// Prompt tokens (with BOS) followed by completion tokens and EOS; only the completion counts.
/// An empty prompt (plain text) makes every token after BOS count.
pub fn encode_example(tok: &Tokenizer, prompt: &str, completion: &str) -> anyhow::Result<Sequence> {
    encode(tok, prompt, completion, true)
}

/// A teacher sample as text, encoded with another tokenizer; EOS only where the teacher stopped.
fn retokenize(tok: &Tokenizer, s: &data::Sample) -> anyhow::Result<Sequence> {
    encode(tok, &s.prompt, &s.completion, s.finish_reason == data::FinishReason::Stop)
}

fn encode(tok: &Tokenizer, prompt: &str, completion: &str, eos: bool) -> anyhow::Result<Sequence> {
    let mut ids = tok.encode(prompt, true)?;
    let loss_from = ids.len();
    ids.extend(tok.encode(completion, false)?);
    if eos {
        ids.extend(tok.eos_ids().first());
    }
    Ok(Sequence { ids, loss_from, teacher: None })
}

/// What a run trains, as JSON: a checkpoint continues a run only when this is unchanged. The
/// settings that do not change the weights (logging, checkpointing, skipping) are left out, so
/// a run stopped by a NaN can be resumed with `skip_nonfinite: true`.
fn identity(
    kind: &str,
    data: &Path,
    init: &ModelInit,
    source: Option<&Checkpoint>,
    tokenizer: &Tokenizer,
    kd: &KdConfig,
    cfg: &TrainConfig,
) -> anyhow::Result<serde_json::Value> {
    let mut train = serde_json::to_value(cfg)?;
    if let Some(obj) = train.as_object_mut() {
        for key in ["log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "skip_nonfinite"] {
            obj.remove(key);
        }
    }
    let data_hash =
        crate::hash::sha256_path(data, &|_| false).with_context(|| format!("reading {}", data.display()))?;
    Ok(serde_json::json!({
        "kind": kind,
        "data": data_hash,
        "model": {"from": source.map(Checkpoint::fingerprint).transpose()?, "config": init.config, "layers": init.layers},
        "tokenizer": tokenizer.vocab_hash(),
        "kd": kd,
        "train": train,
    }))
}

/// Checks the settings against their bounds, naming the key (a recipe checks them all before
/// running any step).
pub fn validate(cfg: &TrainConfig, kd: Option<&KdConfig>) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Config(m.to_string()));
    if cfg.steps == 0 || cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.max_seq_len < 2 {
        return bad("`train.steps`, `train.batch_size` and `train.grad_accum` must be > 0 and `train.max_seq_len` ≥ 2");
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        return bad("`train.lr` must be a positive number");
    }
    if cfg.dtype.scheme().is_some() {
        return bad(&format!(
            "`train.dtype` {} is a decoding precision: quantized weights cannot be trained; use f32 or bf16",
            cfg.dtype.name()
        ));
    }
    if !(0.0..1.0).contains(&cfg.valid_fraction) {
        return bad("`train.valid_fraction` must be in [0, 1)");
    }
    if !(0.0..=1.0).contains(&cfg.min_lr_ratio) || cfg.weight_decay < 0.0 || cfg.grad_clip < 0.0 {
        return bad("`train.min_lr_ratio` must be in [0, 1]; `weight_decay` and `grad_clip` ≥ 0");
    }
    if cfg.keep_checkpoints == 0 {
        return bad("`train.keep_checkpoints` must be ≥ 1 (the newest checkpoint is what a rerun resumes from)");
    }
    if !(0.0..1.0).contains(&cfg.beta1) || !(0.0..1.0).contains(&cfg.beta2) {
        return bad("`train.beta1` and `train.beta2` must be in [0, 1)");
    }
    if let Some(kd) = kd {
        if !(0.0..=1.0).contains(&kd.alpha) {
            return bad("`kd.alpha` must be in [0, 1] (1 = KL only, 0 = imitation only)");
        }
        if !(kd.temperature > 0.0 && kd.temperature.is_finite()) {
            return bad("`kd.temperature` must be > 0");
        }
        if !(0.0..=1.0).contains(&kd.beta) {
            return bad(&format!("`kd.beta` must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {}", kd.beta));
        }
        if !(0.0..=1.0).contains(&kd.skew) {
            return bad(&format!("`kd.skew` must be in [0, 1] (0 = plain KL, 1 = no loss), got {}", kd.skew));
        }
        if let Some(h) = &kd.hidden {
            if !(h.weight >= 0.0 && h.weight.is_finite()) {
                return bad(&format!("`kd.hidden.weight` must be ≥ 0, got {}", h.weight));
            }
        }
        if let Some(o) = &kd.on_policy {
            if !(0.0..=1.0).contains(&o.lambda) {
                return bad(&format!(
                    "`kd.on_policy.lambda` must be in [0, 1] (0 = the teacher's samples only, 1 = the student's only), got {}",
                    o.lambda
                ));
            }
            if o.max_new_tokens == 0 || o.refresh_every == 0 {
                return bad("`kd.on_policy.max_new_tokens` and `kd.on_policy.refresh_every` must be ≥ 1");
            }
            if !(o.temperature >= 0.0 && o.temperature.is_finite()) {
                return bad(&format!("`kd.on_policy.temperature` must be ≥ 0 (0 = greedy), got {}", o.temperature));
            }
        }
    }
    Ok(())
}

/// The tokenizer to train with, and the pretrained checkpoint the model comes from (if any).
fn tokenizer_for(init: &ModelInit, tokenizer: Option<&Path>) -> anyhow::Result<(Tokenizer, Option<Checkpoint>)> {
    let source = match (&init.from, &init.config) {
        (Some(spec), None) => Some(Checkpoint::open(spec, None)?),
        (None, Some(_)) if init.layers.is_some() => {
            bail!(TrainError::Config(
                "`layers` picks layers of a pretrained model: it needs `from`, not `config`".into()
            ))
        }
        (None, Some(_)) => None,
        _ => bail!(TrainError::Config("set exactly one of `from` (a pretrained model) or `config` (a new one)".into())),
    };
    let tok = match (tokenizer, &source) {
        (Some(dir), _) => {
            Tokenizer::from_folder(dir).with_context(|| format!("loading the tokenizer from {}", dir.display()))?
        }
        (None, Some(ckpt)) => ckpt.tokenizer.clone(),
        (None, None) => bail!(TrainError::Config(
            "a model built from `config` needs `tokenizer:` (a folder with tokenizer.json, e.g. the teacher's)".into()
        )),
    };
    Ok((tok, source))
}

fn build_model(
    init: &ModelInit,
    source: Option<&Checkpoint>,
    tok: &Tokenizer,
    seed: u64,
    dev: &Device,
) -> anyhow::Result<(LlamaConfig, VarMap, Llama)> {
    if let Some(ckpt) = source {
        return ckpt.trainable(dev, init.layers.as_deref());
    }
    let mut cfg = init.config.clone().expect("checked by tokenizer_for");
    let vocab = tok.vocab_size();
    if cfg.vocab_size == 0 {
        cfg.vocab_size = vocab;
    } else if cfg.vocab_size < vocab {
        bail!(TrainError::Config(format!(
            "`config.vocab_size` ({}) is smaller than the tokenizer's vocabulary ({vocab}); omit it to use the tokenizer's",
            cfg.vocab_size
        )));
    }
    cfg.bos_token_id = tok.bos_id();
    cfg.eos_token_id = Some(llama::TokenIds::Many(tok.eos_ids().to_vec()));
    let (vm, model) = Llama::trainable(&cfg, dev)?;
    llama::init_weights(&vm, seed)?;
    Ok((cfg, vm, model))
}

/// Held-out split by a hash of each example's key, so a prompt's samples stay together.
fn split(seqs: Vec<Sequence>, keys: &[String], fraction: f64) -> (Vec<Sequence>, Vec<Sequence>) {
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (s, k) in seqs.into_iter().zip(keys) {
        if ((crate::hash::fnv1a(&[k.as_bytes()]) % 10_000) as f64) < fraction * 10_000.0 {
            valid.push(s);
        } else {
            train.push(s);
        }
    }
    (train, valid)
}

/// Mean loss terms over a set of sequences, token-weighted. Returns (total, ce, kd).
fn mean_loss(
    model: &Llama,
    seqs: &[Sequence],
    guide: &Guide,
    projections: &[Var],
    batch_size: usize,
) -> anyhow::Result<(f64, f64, Option<f64>)> {
    let (mut total, mut ce, mut kd, mut n) = (0.0, 0.0, 0.0, 0usize);
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let batch = Batch::new(&refs, model.device())?;
        let count = batch.targets.dim(0)?;
        let (terms, _) = batch_loss(model, &batch, guide, projections, false)?;
        total += scalar(&terms.total)? * count as f64;
        ce += scalar(&terms.ce)? * count as f64;
        kd += terms.kd.as_ref().map(scalar).transpose()?.unwrap_or(0.0) * count as f64;
        n += count;
    }
    let n = n.max(1) as f64;
    Ok((total / n, ce / n, (guide.kd.alpha > 0.0).then_some(kd / n)))
}

/// Rows of teacher logits made at once from its hidden states (bounds the (rows, V) tensor).
const TEACHER_CHUNK: usize = 1024;

/// The loss of one batch: the student's forward at the counted positions, the teacher's
/// (stored top-k, or a forward of the teacher in memory), the divergence, the hidden-state
/// alignment through `projections` (one per `kd.hidden.layers` pair).
/// Returns the terms and the seconds spent on the teacher (its forward and the divergence).
/// `student_written`: the completions are the student's own, so they are no CE targets and
/// only the divergence to the teacher counts.
fn batch_loss(
    model: &Llama,
    batch: &Batch,
    guide: &Guide,
    projections: &[Var],
    student_written: bool,
) -> anyhow::Result<(LossTerms, f64)> {
    let kd = guide.kd;
    let mut teacher_secs = 0.0;
    let pairs = kd.hidden.as_ref().map(|h| h.layers.as_slice()).unwrap_or_default();
    let student_taps: Vec<usize> = pairs.iter().map(|p| p[0]).collect();
    let (x, student_states) = model.states_at(&batch.inputs, &batch.positions, &student_taps)?;
    let logits = model.head(&x)?;
    let ce = cross_entropy(&logits, &batch.targets)?;
    let (mut divergence, mut hidden) = (None, None);
    match (&guide.teacher, &batch.teacher) {
        (Some(teacher), _) => {
            let t = Instant::now();
            let teacher_taps: Vec<usize> = pairs.iter().map(|p| p[1]).collect();
            let (tx, teacher_states) = teacher.states_at(&batch.inputs, &batch.positions, &teacher_taps)?;
            // Compare over the vocabulary both models have (a config may pad it past the tokenizer's).
            let v = logits.dim(1)?.min(teacher.config().vocab_size);
            let head = |h: &Tensor| teacher.head(h).map_err(candle_core::Error::wrap)?.narrow(1, 0, v);
            if kd.alpha > 0.0 || student_written {
                let student = logits.narrow(1, 0, v)?;
                let d = divergence::full_chunked(kd.measure(), &student, &tx, &head, kd.temperature, TEACHER_CHUNK)?;
                divergence = Some(d);
            }
            teacher_secs = t.elapsed().as_secs_f64();
            if let Some(h) = &kd.hidden {
                let mut sum: Option<Tensor> = None;
                for ((s, t), w) in student_states.iter().zip(&teacher_states).zip(projections) {
                    let term = hidden_alignment(&s.to_dtype(DType::F32)?, w.as_tensor(), t, h.loss)?;
                    sum = Some(match sum {
                        Some(acc) => (acc + term)?,
                        None => term,
                    });
                }
                let mean = sum.map(|t| t.affine(1.0 / pairs.len().max(1) as f64, 0.0)).transpose()?;
                hidden = mean.map(|m| (m, h.weight));
            }
        }
        (None, Some((ids, logprobs))) if kd.alpha > 0.0 || student_written => {
            divergence = Some(divergence::topk(kd.measure(), &logits, ids, logprobs, kd.temperature)?);
        }
        (None, _) => {}
    }
    let alpha = if student_written { 1.0 } else { kd.alpha };
    Ok((combine(ce, divergence, alpha, hidden)?, teacher_secs))
}

/// What the student learns from besides its targets: the objective, the teacher when it is
/// held in memory, and the server that grades on-policy batches.
struct Guide<'a> {
    kd: &'a KdConfig,
    teacher: Option<Llama>,
    grader: Option<Grader>,
}

/// One learned projection (teacher width × student width) per `kd.hidden` layer pair,
/// seeded; trained with the student, saved in checkpoints, left out of the exported model.
fn projections(guide: &Guide, student: &LlamaConfig, seed: u64, device: &Device) -> anyhow::Result<(VarMap, Vec<Var>)> {
    let varmap = VarMap::new();
    let (Some(h), Some(teacher)) = (&guide.kd.hidden, &guide.teacher) else {
        return Ok((varmap, Vec::new()));
    };
    let (cs, ct) = (student.hidden_size, teacher.config().hidden_size);
    let (ls, lt) = (student.num_hidden_layers, teacher.config().num_hidden_layers);
    // N(0, 1/C_s): the projected states start at about the size of the student's.
    let std = 1.0 / (cs as f64).sqrt();
    let mut rng = StdRng::seed_from_u64(crate::hash::fnv1a(&[b"projections", &seed.to_le_bytes()]));
    let mut vars = Vec::with_capacity(h.layers.len());
    for (i, [s, t]) in h.layers.iter().enumerate() {
        if *s > ls || *t > lt {
            bail!(TrainError::Config(format!(
                "`kd.hidden.layers[{i}]` is [{s}, {t}], but the student has layers 0..={ls} and the teacher 0..={lt}"
            )));
        }
        let values: Vec<f32> = (0..ct * cs).map(|_| (std * llama::standard_normal(&mut rng)) as f32).collect();
        let var = Var::from_tensor(&Tensor::from_vec(values, (ct, cs), device)?)?;
        varmap.data().lock().expect("varmap lock").insert(format!("{PROJECTION}.{i}.weight"), var.clone());
        vars.push(var);
    }
    Ok((varmap, vars))
}

/// Name prefix of the hidden-state projections, and their file in a checkpoint.
const PROJECTION: &str = "hidden_projection";
const PROJECTIONS_FILE: &str = "projections.safetensors";
/// The on-policy sampler's weights in a checkpoint.
const SAMPLER_FILE: &str = "sampler.safetensors";

/// Where a run writes, and how it treats checkpoints already there.
struct Output<'a> {
    dir: &'a Path,
    /// Sampling defaults for generation_config.json.
    sampling: serde_json::Value,
    /// [`identity`] of the run.
    run_id: serde_json::Value,
    resume: Resume,
    device: Device,
}

/// The picks of one step, by micro-batch, moving the data cursor (epoch, position) on and
/// reshuffling at each epoch's end.
fn take_picks<'a>(
    train: &'a [Sequence],
    cfg: &TrainConfig,
    (epoch, cursor): (&mut u64, &mut usize),
    order: &mut Vec<usize>,
) -> Vec<Vec<&'a Sequence>> {
    (0..cfg.grad_accum)
        .map(|_| {
            (0..cfg.batch_size)
                .map(|_| {
                    if *cursor == order.len() {
                        *epoch += 1;
                        *order = epoch_order(train.len(), cfg.seed, *epoch);
                        *cursor = 0;
                    }
                    *cursor += 1;
                    &train[order[*cursor - 1]]
                })
                .collect()
        })
        .collect()
}

/// Epoch `epoch`'s order of the training set: a shuffle seeded by the seed and the epoch, so the
/// data cursor (epoch, position) is all a resumed run needs to see the same batches.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(crate::hash::fnv1a(&[&seed.to_le_bytes(), &epoch.to_le_bytes()])));
    order
}

/// The state of the newest checkpoint in `output`, and its folder, when it belongs to the run
/// `run_id`, with the weights and optimizer moments restored from it. Checkpoints of another run are deleted
/// (`Resume::Auto`) or refused (`Resume::Strict`), naming what changed.
fn resume(
    output: &Path,
    run_id: &serde_json::Value,
    mode: Resume,
    steps: usize,
    (varmap, projections): (&VarMap, &VarMap),
    opt: &mut AdamW,
) -> anyhow::Result<Option<(State, PathBuf)>> {
    checkpoint::remove_partials(output);
    let Some(path) = checkpoint::list(output).pop() else {
        return Ok(None);
    };
    let (state, weights, moments) = checkpoint::load(&path)?;
    if state.run != *run_id {
        let diff = crate::hash::json_diff(&state.run, run_id);
        if mode == Resume::Strict {
            bail!(TrainError::ResumeMismatch { checkpoint: path, diff });
        }
        eprintln!("note: the checkpoints in {} are from a different run; starting over:\n{diff}", output.display());
        let dir = checkpoint::dir(output);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        return Ok(None);
    }
    llama::load_weights(varmap, &weights).with_context(|| format!("restoring the weights from {}", path.display()))?;
    if !projections.data().lock().expect("varmap lock").is_empty() {
        let file = path.join(PROJECTIONS_FILE);
        llama::load_weights(projections, &Weights::Files(vec![file]))
            .with_context(|| format!("restoring the hidden-state projections from {}", path.display()))?;
    }
    opt.restore(&moments, state.optimizer_steps)
        .with_context(|| format!("restoring the optimizer from {}", path.display()))?;
    eprintln!("resuming from {} (step {} of {steps})", path.display(), state.step);
    Ok(Some((state, path)))
}

#[allow(clippy::too_many_arguments)]
fn run(
    init: &ModelInit,
    source: Option<Checkpoint>,
    tokenizer: Tokenizer,
    seqs: Vec<Sequence>,
    keys: Vec<String>,
    guide: Guide,
    cfg: &TrainConfig,
    out: Output,
) -> anyhow::Result<TrainReport> {
    let started = Instant::now();
    let output = out.dir;
    let seqs: Vec<Sequence> = seqs.into_iter().map(|s| s.truncate(cfg.max_seq_len)).collect();
    let (train, valid) = split(seqs, &keys, cfg.valid_fraction);
    let train: Vec<Sequence> = train.into_iter().filter(|s| s.counted() > 0).collect();
    if train.is_empty() {
        bail!(TrainError::Config(
            "no training examples left after the held-out split; add data or lower `train.valid_fraction`".into()
        ));
    }
    let valid: Vec<Sequence> = valid.into_iter().filter(|s| s.counted() > 0).take(1024).collect();
    let (model_cfg, varmap, model) = build_model(init, source.as_ref(), &tokenizer, cfg.seed, &out.device)?;
    let (projection_map, projections) = projections(&guide, &model_cfg, cfg.seed, &out.device)?;
    crate::device::check_dtype(&out.device, cfg.dtype.dtype())?;
    let state = (model_cfg.num_params() * 12) as u64;
    let what = format!(
        "training {:.0}M parameters (their gradients and AdamW moments, f32)",
        model_cfg.num_params() as f64 / 1e6
    );
    crate::device::check_memory(&out.device, state, &what)?;
    let vars: Vec<(String, Var)> = [&varmap, &projection_map]
        .iter()
        .flat_map(|m| {
            m.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
        })
        .collect();
    let mut opt = AdamW::new(vars, cfg)?;
    std::fs::create_dir_all(output).with_context(|| format!("creating output folder {}", output.display()))?;

    let resumed = resume(output, &out.run_id, out.resume, cfg.steps, (&varmap, &projection_map), &mut opt)?;
    let resumed_from = resumed.as_ref().map(|(st, _)| st.step);
    let (mut st, checkpoint_dir) = match resumed {
        Some((st, dir)) => (st, Some(dir)),
        None => (State::new(out.run_id.clone()), None),
    };
    let save = |st: &State, opt: &AdamW, sampler: Option<&Sampler>| {
        checkpoint::save(output, st, &opt.moments(), cfg.keep_checkpoints, |dir| {
            llama::save(&model_cfg, &varmap, dir)?;
            tokenizer.save(dir)?;
            if !projections.is_empty() {
                candle_core::safetensors::save(&llama::tensors(&projection_map), dir.join(PROJECTIONS_FILE))?;
            }
            if let Some(sampler) = sampler {
                candle_core::safetensors::save(&sampler.tensors, dir.join(SAMPLER_FILE))?;
            }
            Ok(())
        })
    };
    // The student that writes on-policy batches: the weights of the last refresh (taken at the
    // top of each step that is a multiple of `refresh_every`), from the checkpoint when the run
    // resumes between refreshes, or with `overlap` (whose batches of this step come from the
    // sampler as it stood in the step before).
    // λ = 0 never samples: no sampler, and exactly the off-policy run.
    let on_policy = guide.kd.on_policy.as_ref().filter(|o| o.lambda > 0.0);
    let mut sampler = match (on_policy, &checkpoint_dir) {
        (Some(o), Some(dir)) if o.overlap || st.step % o.refresh_every != 0 => {
            let file = dir.join(SAMPLER_FILE);
            let tensors = candle_core::safetensors::load(&file, &out.device)
                .with_context(|| format!("restoring the on-policy sampler from {}", file.display()))?;
            Some(Sampler::from_tensors(&model_cfg, tensors)?)
        }
        _ => None,
    };
    // With `overlap`: the next step's batches, written while this one trained.
    let mut pending: Option<Written> = None;

    // The metrics of steps after the checkpoint were logged by the run that crashed: drop them.
    let metrics_path = output.join("metrics.jsonl");
    let kept = match std::fs::read_to_string(&metrics_path) {
        Ok(text) if st.step > 0 => text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["step"].as_u64() <= Some(st.step as u64))
            })
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => String::new(),
    };
    std::fs::write(&metrics_path, kept).with_context(|| format!("writing {}", metrics_path.display()))?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let mut order = epoch_order(train.len(), cfg.seed, st.epoch);
    let bar = crate::progress::bar(cfg.steps as u64, "train");
    bar.set_position(st.step as u64);
    for step in st.step..cfg.steps {
        let t0 = Instant::now();
        // The model this step computes with: the f32 weights as they are, or in bf16 (bf16
        // GEMMs, or casts in the graph: either way the gradients come back to the f32 weights).
        let compute = model.for_training(cfg.dtype.dtype())?;
        let lr = lr_at(step, cfg);
        let before = (st.epoch, st.cursor);
        let plan = take_picks(&train, cfg, (&mut st.epoch, &mut st.cursor), &mut order);
        let write = |sampler: &Sampler, o: &OnPolicyConfig, step: usize, plan: &[Vec<&Sequence>]| {
            on_policy::write_step(sampler, plan, o, tokenizer.eos_ids(), (cfg.seed, step, cfg.max_seq_len))
        };
        // This step's on-policy batches: written and graded now, or during the step before.
        let written = match on_policy {
            None => None,
            Some(o) if o.overlap => {
                // Graded already, beside the step before; else written and graded here.
                let w = match pending.take() {
                    Some(w) => w,
                    None => {
                        if sampler.is_none() {
                            sampler = Some(Sampler::snapshot(&model_cfg, &varmap)?);
                        }
                        let w = write(sampler.as_ref().expect("just set"), o, step, &plan)?;
                        let w = w.grade(guide.grader.as_ref())?;
                        st.teacher_secs += w.grade_secs;
                        w
                    }
                };
                st.sample_secs += w.sample_secs;
                if step % o.refresh_every == 0 && step > 0 {
                    sampler = Some(Sampler::snapshot(&model_cfg, &varmap)?);
                }
                Some(w)
            }
            Some(o) => {
                if step % o.refresh_every == 0 || sampler.is_none() {
                    sampler = Some(Sampler::snapshot(&model_cfg, &varmap)?);
                }
                let w = write(sampler.as_ref().expect("just set"), o, step, &plan)?.grade(guide.grader.as_ref())?;
                st.sample_secs += w.sample_secs;
                st.teacher_secs += w.grade_secs;
                Some(w)
            }
        };
        let mut written = written.map(|w| w.batches).unwrap_or_default();
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.vars().count()];
        let (mut loss, mut ce, mut kl, mut hid, mut step_tokens) = (0.0, 0.0, None, None, 0);
        let mut on_policy_batches = 0;
        std::thread::scope(|scope| -> anyhow::Result<()> {
            // With `overlap`, the next step's batches are written now and graded on the server
            // beside this step's training. (Written beside it too, they would share the cores
            // with training: measured slower on 2 cores, see docs/methods.md.)
            let next = match (on_policy, &sampler) {
                (Some(o), Some(s)) if o.overlap && step + 1 < cfg.steps => {
                    let (mut epoch, mut cursor, mut next_order) = (st.epoch, st.cursor, order.clone());
                    let next_plan = take_picks(&train, cfg, (&mut epoch, &mut cursor), &mut next_order);
                    let w = write(s, o, step + 1, &next_plan)?;
                    let grader = guide.grader.as_ref();
                    Some(scope.spawn(move || w.grade(grader)))
                }
                _ => None,
            };
            for (micro, picked) in plan.iter().enumerate() {
                // On-policy: the same prompts, completed by the student; graded by the teacher alone.
                let student_written = written.get_mut(micro).and_then(Option::take);
                let batch = match &student_written {
                    Some(seqs) => Batch::new(&seqs.iter().collect::<Vec<_>>(), model.device())?,
                    None => Batch::new(picked, model.device())?,
                };
                step_tokens += batch.tokens;
                let (terms, teacher_secs) =
                    batch_loss(&compute, &batch, &guide, &projections, student_written.is_some())?;
                st.teacher_secs += teacher_secs;
                on_policy_batches += usize::from(student_written.is_some());
                let scale = 1.0 / cfg.grad_accum as f64;
                loss += scalar(&terms.total)? * scale;
                ce += scalar(&terms.ce)? * scale;
                if let Some(k) = &terms.kd {
                    kl = Some(kl.unwrap_or(0.0) + scalar(k)? * scale);
                }
                if let Some(h) = &terms.hidden {
                    hid = Some(hid.unwrap_or(0.0) + scalar(h)? * scale);
                }
                let g = (terms.total * scale)?.backward()?;
                for (slot, (name, var)) in grads.iter_mut().zip(opt.vars()) {
                    let gv = g.get(var).ok_or_else(|| TrainError::NoGradient(name.to_string()))?;
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gv)?,
                        None => gv.clone(),
                    });
                }
            }
            if let Some(handle) = next {
                let t = Instant::now();
                pending = Some(handle.join().map_err(|_| anyhow::anyhow!("the on-policy grading thread panicked"))??);
                // The time this step waited for the grades, not the grading's own.
                st.teacher_secs += t.elapsed().as_secs_f64();
            }
            Ok(())
        })?;
        let grads: Vec<Tensor> = grads.into_iter().map(|g| g.expect("filled above")).collect();
        let norm = grad_norm(&grads)?;
        // A NaN or Inf stops the run with the last good weights saved (or skips the batch).
        let bad = if !ce.is_finite() {
            Some(("cross-entropy loss (ce)", ce))
        } else if let Some(k) = kl.filter(|k: &f64| !k.is_finite()) {
            Some(("divergence to the teacher (kl)", k))
        } else if let Some(h) = hid.filter(|h: &f64| !h.is_finite()) {
            Some(("hidden-state loss (hidden)", h))
        } else if !norm.is_finite() {
            Some(("gradient norm", norm))
        } else {
            None
        };
        if let Some((term, value)) = bad {
            if !cfg.skip_nonfinite {
                (st.epoch, st.cursor) = before;
                let checkpoint = save(&st, &opt, sampler.as_ref())?;
                bar.abandon();
                bail!(TrainError::NonFinite { step: step + 1, term, value, checkpoint });
            }
            st.skipped += 1;
            st.step = step + 1;
            bar.suspend(|| {
                eprintln!("warning: step {}: the {term} is {value}; batch skipped (train.skip_nonfinite)", step + 1)
            });
        } else {
            opt.step(&grads, lr, clip_scale(norm, cfg.grad_clip))?;
            st.step = step + 1;
            st.optimizer_steps = opt.steps_done();
            st.train_secs += t0.elapsed().as_secs_f64();
            st.tokens += step_tokens;
            st.first_loss.get_or_insert(loss);
            st.last_loss = Some(loss);
        }

        let last = st.step == cfg.steps;
        let validate = !valid.is_empty() && (last || (cfg.eval_every > 0 && st.step % cfg.eval_every == 0));
        if validate {
            st.valid_loss = Some(mean_loss(&compute, &valid, &guide, &projections, cfg.batch_size)?.0);
        }
        if validate || step % cfg.log_every.max(1) == 0 || last {
            let tok_s = st.tokens as f64 / st.train_secs.max(1e-9);
            let line = serde_json::json!({
                "step": st.step, "loss": loss, "ce": ce, "kl": kl, "hidden": hid, "lr": lr, "grad_norm": norm,
                "on_policy": on_policy.map(|_| on_policy_batches),
                "tokens_per_sec": tok_s, "valid_loss": if validate { st.valid_loss } else { None },
            });
            writeln!(metrics, "{line}").with_context(|| format!("writing {}", metrics_path.display()))?;
            bar.set_message(format!("loss {loss:.4}"));
            if bar.is_hidden() {
                eprintln!("step {:>6}/{} loss {loss:.4} lr {lr:.2e} {tok_s:.0} tok/s", st.step, cfg.steps);
            }
        }
        bar.inc(1);
        crate::fault::point("train-step");
        let stop = crate::interrupt::requested() && !last;
        if last || stop || (cfg.checkpoint_every > 0 && st.step % cfg.checkpoint_every == 0) {
            let path = save(&st, &opt, sampler.as_ref())?;
            if stop {
                bar.abandon();
                let saved = format!("checkpoint of step {} saved in {}", st.step, path.display());
                return Err(crate::interrupt::Interrupted { saved }.into());
            }
        }
    }
    bar.finish_and_clear();

    llama::save(&model_cfg, &varmap, output)?;
    tokenizer.save(output)?;
    write_generation_config(&model_cfg, out.sampling, output)?;
    let report = TrainReport {
        output: output.to_path_buf(),
        params: model_cfg.num_params(),
        steps: cfg.steps,
        tokens: st.tokens,
        tokens_per_sec: st.tokens as f64 / st.train_secs.max(1e-9),
        first_loss: st.first_loss.unwrap_or(f64::NAN),
        final_loss: st.last_loss.unwrap_or(f64::NAN),
        valid_loss: st.valid_loss,
        wall_secs: started.elapsed().as_secs_f64(),
        resumed_from,
        skipped_steps: st.skipped,
        sample_secs: st.sample_secs,
        teacher_secs: st.teacher_secs,
        train_secs: st.train_secs,
    };
    let path = output.join("train_report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

/// generation_config.json: the model's special ids and the sampling defaults it should use.
fn write_generation_config(cfg: &LlamaConfig, mut sampling: serde_json::Value, dir: &Path) -> anyhow::Result<()> {
    if let Some(obj) = sampling.as_object_mut() {
        obj.insert("bos_token_id".into(), cfg.bos_token_id.into());
        obj.insert("eos_token_id".into(), cfg.eos_ids().into());
    }
    let path = dir.join("generation_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&sampling)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
