//! The generator: sample completions from a teacher and store them with its log-probabilities.

mod decode;
pub mod sampler;

pub use decode::{decode, Completion, DecodeSettings};

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::{self, DataError, FileMetadata, Manifest, PromptInput, Sample, SampleWriter};
use crate::model::{Checkpoint, Precision};

/// Sampling settings; the CLI flags and recipe keys of the same names. Defaults only in `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub samples_per_prompt: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// How many of the teacher's most likely tokens to store per position.
    pub logprobs: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            samples_per_prompt: 1,
            seed: 0,
            batch_size: 8,
            logprobs: 20,
        }
    }
}

/// What to do with a prompt that, with `max_new_tokens`, does not fit the teacher's context.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongPrompts {
    /// Stop before sampling anything, naming the prompt.
    #[default]
    Refuse,
    /// Keep the prompt's last tokens (after BOS), with a warning per prompt.
    Truncate,
}

impl std::str::FromStr for LongPrompts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "refuse" => Ok(LongPrompts::Refuse),
            "truncate" => Ok(LongPrompts::Truncate),
            other => Err(format!("`{other}` is not a long-prompt policy; use refuse or truncate")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Alias, Hub repo id or local folder.
    pub teacher: String,
    pub revision: Option<String>,
    pub prompts: PathBuf,
    /// The output folder: Parquet part files and `manifest.json`.
    pub output: PathBuf,
    pub sampling: SamplingConfig,
    /// The teacher's compute dtype.
    pub precision: Precision,
    pub long_prompts: LongPrompts,
    /// Samples per part file (rounded up to whole batches): at most this much work is redone
    /// after a crash.
    pub part_size: usize,
    /// Replace an output folder written by a different command instead of refusing.
    pub overwrite: bool,
}

/// Samples per part file unless set.
pub const DEFAULT_PART_SIZE: usize = 256;

#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    pub output: PathBuf,
    /// Samples in the output, resumed ones included.
    pub samples: usize,
    /// Samples found done by an earlier run of the same command.
    pub resumed: usize,
    /// Completion tokens sampled by this run.
    pub completion_tokens: usize,
    pub tokens_per_sec: f64,
    pub wall_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
    #[error("`--logprobs {k}` is larger than the teacher's vocabulary ({vocab}); use at most {vocab}")]
    LogprobsTooLarge { k: usize, vocab: usize },
    #[error("prompt `{id}` is {len} tokens; with --max-new-tokens {new} it exceeds the teacher's context of {max} tokens; shorten the prompt, lower --max-new-tokens, or pass --long-prompts truncate")]
    PromptTooLong { id: String, len: usize, new: usize, max: usize },
    #[error("--max-new-tokens {new} leaves no room for a prompt in the teacher's context of {max} tokens; lower it")]
    NoRoomForPrompt { new: usize, max: usize },
    #[error("{} was written by a different command:\n{diff}\npass --overwrite to discard it and start over, or choose another --output", dir.display())]
    ChangedCommand { dir: PathBuf, diff: String },
    #[error("{} holds Parquet files but no manifest.json, so it is not a `kdllm generate` output; choose another --output, or pass --overwrite to delete its *.parquet files", dir.display())]
    ForeignFolder { dir: PathBuf },
    #[error("--output {}: {} is a file, so the output folder (Parquet part files and manifest.json) cannot be made there; choose another --output", output.display(), file.display())]
    OutputIsFile { output: PathBuf, file: PathBuf },
}

impl SamplingConfig {
    /// Checks every field against its bound, naming the flag.
    pub fn validate(&self) -> Result<(), GenerateError> {
        let bad = |m: String| Err(GenerateError::Sampling(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("`temperature` must be >= 0 (0 = greedy), got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("`top_p` must be > 0 and <= 1, got {}", self.top_p));
        }
        for (name, v) in [
            ("max_new_tokens", self.max_new_tokens),
            ("samples_per_prompt", self.samples_per_prompt),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                return bad(format!("`{name}` must be >= 1"));
            }
        }
        Ok(())
    }

    pub fn decode_settings(&self, eos_ids: Vec<u32>) -> DecodeSettings {
        DecodeSettings {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            logprobs: self.logprobs,
            eos_ids,
        }
    }
}

/// The RNG of one (prompt, sample) pair: independent of batching and of the other prompts.
pub fn row_rng(seed: u64, prompt_id: &str, sample_index: u32) -> StdRng {
    StdRng::seed_from_u64(crate::hash::fnv1a(&[&seed.to_le_bytes(), prompt_id.as_bytes(), &sample_index.to_le_bytes()]))
}

pub fn generate(job: &GenerateJob) -> anyhow::Result<GenerateReport> {
    let started = Instant::now();
    let cfg = &job.sampling;
    cfg.validate()?;
    if job.part_size == 0 {
        return Err(GenerateError::Sampling("`part_size` must be >= 1".into()).into());
    }
    // The nearest existing ancestor must be a folder, or the output folder cannot be made.
    if let Some(file) = job.output.ancestors().find(|a| a.exists()).filter(|a| !a.is_dir()) {
        return Err(GenerateError::OutputIsFile { output: job.output.clone(), file: file.to_path_buf() }.into());
    }
    let prompts = data::read_prompts(&job.prompts)?;
    let teacher = Checkpoint::open(&job.teacher, job.revision.as_deref())?;
    let tokenizer = &teacher.tokenizer;
    let vocab = teacher.config.vocab_size;
    if cfg.logprobs > vocab {
        return Err(GenerateError::LogprobsTooLarge { k: cfg.logprobs, vocab }.into());
    }
    let max_ctx = teacher.config.max_position_embeddings;
    let rendered = render_prompts(&prompts, tokenizer, cfg.max_new_tokens, max_ctx, job.long_prompts)?;

    // The identity of the job: a rerun with the same one continues, any other is refused.
    let command = serde_json::json!({
        "teacher": teacher.fingerprint()?,
        "prompts": crate::hash::sha256_path(&job.prompts, &|_| false)
            .with_context(|| format!("reading {}", job.prompts.display()))?,
        "sampling": cfg,
        "dtype": job.precision,
        "long_prompts": job.long_prompts,
    });
    let work: Vec<(usize, u32)> =
        (0..prompts.len()).flat_map(|p| (0..cfg.samples_per_prompt as u32).map(move |s| (p, s))).collect();
    let dir = &job.output;
    let mut manifest = open_output(dir, command, work.len() as u64, job.overwrite)?;
    let resumed = manifest.done() as usize;
    let report = |tokens: usize, secs: f64| GenerateReport {
        output: dir.clone(),
        samples: work.len(),
        resumed,
        completion_tokens: tokens,
        tokens_per_sec: tokens as f64 / secs.max(1e-9),
        wall_secs: started.elapsed().as_secs_f64(),
    };
    if manifest.is_complete() {
        eprintln!("{} is already complete ({} samples): nothing to do", dir.display(), work.len());
        return Ok(report(0, 0.0));
    }
    if resumed > 0 {
        eprintln!("resuming {}: {resumed} of {} samples already done", dir.display(), work.len());
    }

    // Loaded only now: a refused or finished job costs no weights in memory.
    let model = teacher.model(&Device::Cpu, job.precision)?;
    let settings = cfg.decode_settings(tokenizer.eos_ids().to_vec());
    let meta = FileMetadata::new(tokenizer.vocab_hash(), cfg.logprobs, serde_json::to_value(cfg)?);
    let bar = crate::progress::bar(work.len() as u64, "generate");
    bar.set_position(resumed as u64);
    let (mut tokens, mut part_start) = (0, resumed);
    let mut part: Option<SampleWriter> = None;
    let decode_started = Instant::now();
    // Batches are fixed slices of the work list, whatever run computes them, so a resumed job
    // samples exactly the batches (and so the rows, bit for bit) of an uninterrupted one.
    for (b, chunk) in work.chunks(cfg.batch_size).enumerate().skip(resumed / cfg.batch_size) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&(p, _)| rendered[p].1.clone()).collect();
        let mut rngs: Vec<StdRng> = chunk.iter().map(|&(p, s)| row_rng(cfg.seed, &prompts[p].id, s)).collect();
        let completions = decode(&model, &ids, &mut rngs, &settings)?;
        let writer = match part.as_mut() {
            Some(w) => w,
            None => part.insert(SampleWriter::create(&dir.join(data::part_name(manifest.parts.len())), &meta)?),
        };
        for (&(p, s), c) in chunk.iter().zip(completions) {
            tokens += c.ids.len();
            writer.write(&Sample {
                prompt_id: prompts[p].id.clone(),
                sample_index: s,
                prompt: rendered[p].0.clone(),
                completion: tokenizer.decode(c.text_ids())?,
                prompt_token_ids: rendered[p].1.clone(),
                completion_token_ids: c.ids,
                token_logprobs: c.token_logprobs,
                topk_token_ids: c.topk_ids,
                topk_logprobs: c.topk_logprobs,
                finish_reason: c.finish,
                teacher: teacher.id.clone(),
                teacher_revision: teacher.revision.clone(),
            })?;
        }
        bar.inc(chunk.len() as u64);
        crate::fault::point("generate-batch");
        let end = b * cfg.batch_size + chunk.len();
        let stop = crate::interrupt::requested();
        if end - part_start >= job.part_size || end == work.len() || stop {
            let writer = part.take().expect("a part is open");
            let name = data::part_name(manifest.parts.len());
            writer.finish()?;
            crate::fault::point("part-renamed");
            let label = |i: usize| format!("{}#{}", prompts[work[i].0].id, work[i].1);
            manifest.parts.push(record_part(dir, name, part_start, end, label(part_start), label(end - 1))?);
            manifest.write(dir)?;
            part_start = end;
        }
        if stop {
            bar.abandon();
            let saved = format!("{end} of {} samples are complete in {}", work.len(), dir.display());
            return Err(crate::interrupt::Interrupted { saved }.into());
        }
    }
    bar.finish_and_clear();
    Ok(report(tokens, decode_started.elapsed().as_secs_f64()))
}

/// Each prompt as the teacher sees it: the rendered text and its token ids, checked (or cut)
/// against the context window before anything is sampled, so bad input fails fast.
fn render_prompts(
    prompts: &[data::PromptRecord],
    tokenizer: &crate::tokenizer::Tokenizer,
    max_new_tokens: usize,
    max_ctx: usize,
    policy: LongPrompts,
) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let room = max_ctx.checked_sub(max_new_tokens).filter(|&r| r > 0);
    let room = room.ok_or(GenerateError::NoRoomForPrompt { new: max_new_tokens, max: max_ctx })?;
    let mut rendered = Vec::with_capacity(prompts.len());
    for p in prompts {
        // As transformers does: a rendered chat template carries its own special tokens
        // (`apply_chat_template` encodes without adding any); plain text gets the model's BOS.
        let (mut text, add_special_tokens) = match &p.input {
            PromptInput::Text(t) => (t.clone(), true),
            PromptInput::Chat(messages) => {
                let text = tokenizer
                    .render_chat(messages)
                    .with_context(|| format!("rendering the chat template for prompt `{}`", p.id))?;
                (text, false)
            }
        };
        let mut ids = tokenizer.encode(&text, add_special_tokens)?;
        if ids.len() > room {
            if policy == LongPrompts::Refuse {
                let e = GenerateError::PromptTooLong {
                    id: p.id.clone(),
                    len: ids.len(),
                    new: max_new_tokens,
                    max: max_ctx,
                };
                return Err(e.into());
            }
            // Keep the end, where the question and the assistant header are; BOS stays first.
            let keep_bos = usize::from(tokenizer.bos_id().is_some_and(|b| ids.first() == Some(&b)));
            let cut = ids.len() - room;
            eprintln!(
                "warning: prompt `{}` is {} tokens; keeping its last {} (--long-prompts truncate)",
                p.id,
                ids.len(),
                room - keep_bos
            );
            ids.drain(keep_bos..keep_bos + cut);
            text = tokenizer.decode_with_special(&ids)?;
        }
        rendered.push((text, ids));
    }
    Ok(rendered)
}

/// The manifest to continue from: the existing one when it was written by the same command
/// (its parts checked, leftovers of a crash removed), else a new one.
fn open_output(dir: &Path, command: serde_json::Value, total: u64, overwrite: bool) -> anyhow::Result<Manifest> {
    let existing = Manifest::read(dir)?;
    let ours = |m: &Manifest| m.command == command && m.total == total;
    match existing {
        Some(m) if ours(&m) => return resume(dir, m),
        Some(m) if !overwrite => {
            let diff = crate::hash::json_diff(&m.command, &command);
            return Err(GenerateError::ChangedCommand { dir: dir.to_path_buf(), diff }.into());
        }
        None if !overwrite && dir.is_dir() && !sample_files(dir)?.is_empty() => {
            return Err(GenerateError::ForeignFolder { dir: dir.to_path_buf() }.into());
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write { path: dir.to_path_buf(), source })?;
    for f in sample_files(dir)? {
        std::fs::remove_file(&f).map_err(|source| DataError::Write { path: f, source })?;
    }
    let manifest = Manifest::new(command, total);
    manifest.write(dir)?;
    Ok(manifest)
}

/// Keeps the complete parts whose files are intact, drops the rest (and the parts after a
/// damaged one, since parts are contiguous), and deletes files no manifest entry accounts for.
fn resume(dir: &Path, mut m: Manifest) -> anyhow::Result<Manifest> {
    let intact = |p: &data::Part| {
        let path = dir.join(&p.file);
        std::fs::metadata(&path).is_ok_and(|md| md.len() == p.bytes)
            && crate::hash::sha256_path(&path, &|_| false).is_ok_and(|h| h == p.sha256)
    };
    if let Some(bad) = m.parts.iter().position(|p| !intact(p)) {
        eprintln!(
            "warning: {} is missing or damaged; sampling it and the parts after it again",
            dir.join(&m.parts[bad].file).display()
        );
        m.parts.truncate(bad);
        m.write(dir)?;
    }
    let listed: Vec<PathBuf> = m.part_paths(dir);
    for f in sample_files(dir)? {
        if !listed.contains(&f) {
            // A part renamed into place just before a crash, before the manifest recorded it, or
            // a temporary file: either way redone from the manifest.
            std::fs::remove_file(&f).map_err(|source| DataError::Write { path: f, source })?;
        }
    }
    data::sync_dir(dir);
    Ok(m)
}

/// The `*.parquet` and `*.partial` files of `dir` (the manifest's temporary file included).
fn sample_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "parquet" || e == "partial") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn record_part(
    dir: &Path,
    file: String,
    start: usize,
    end: usize,
    first: String,
    last: String,
) -> anyhow::Result<data::Part> {
    let path = dir.join(&file);
    let bytes = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
    let sha256 = crate::hash::sha256_path(&path, &|_| false).with_context(|| format!("reading {}", path.display()))?;
    Ok(data::Part { file, start: start as u64, end: end as u64, bytes, sha256, first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_folder_is_refused_unless_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("data.parquet"), b"not ours").unwrap();
        std::fs::write(out.join("notes.txt"), b"keep me").unwrap();
        let command = serde_json::json!({"sampling": {"seed": 1}});
        let err = open_output(&out, command.clone(), 10, false).unwrap_err().to_string();
        assert!(err.contains("no manifest.json") && err.contains("--overwrite"), "{err}");
        assert!(out.join("data.parquet").exists(), "refusing touches nothing");

        let m = open_output(&out, command.clone(), 10, true).unwrap();
        assert_eq!((m.done(), m.total), (0, 10));
        assert!(!out.join("data.parquet").exists() && out.join("notes.txt").exists(), "only Parquet files go");
        // Now it is ours: the same command continues, another is refused with the difference.
        assert_eq!(open_output(&out, command, 10, false).unwrap().total, 10);
        let err = open_output(&out, serde_json::json!({"sampling": {"seed": 2}}), 10, false).unwrap_err().to_string();
        assert!(err.contains("sampling.seed: 1 (on disk) → 2 (now)"), "{err}");
    }

    #[test]
    fn resume_drops_damaged_parts_and_everything_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let mut m = Manifest::new(serde_json::json!({}), 30);
        for i in 0..3 {
            let name = data::part_name(i);
            std::fs::write(out.join(&name), format!("part {i}")).unwrap();
            m.parts.push(record_part(out, name, i * 10, i * 10 + 10, "a#0".into(), "b#0".into()).unwrap());
        }
        m.write(out).unwrap();
        std::fs::write(out.join(data::part_name(1)), "part X").unwrap(); // same size, other bytes
        std::fs::write(out.join("part-00009.parquet"), "stray").unwrap();
        let resumed = resume(out, Manifest::read(out).unwrap().unwrap()).unwrap();
        assert_eq!(resumed.done(), 10, "part 1 is damaged: parts 1 and 2 are redone");
        assert_eq!(Manifest::read(out).unwrap().unwrap(), resumed, "the trimmed manifest is saved");
        let left: Vec<PathBuf> = sample_files(out).unwrap();
        assert_eq!(left, [out.join(data::part_name(0))]);
    }
}
