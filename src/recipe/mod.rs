//! Recipes: a YAML file of named steps, each feeding the next, run top to bottom.
//!
//! ```yaml
//! # Run: cargo run --release -- train --recipe recipes/quickstart.yaml
//! name: quickstart
//! workdir: runs/quickstart          # each step writes to <workdir>/<step name>
//! steps:
//!   - name: task
//!     kind: task                    # task::TaskConfig: writes the task corpus, trains a tokenizer
//!     task: {max_digits: 3}
//!   - name: teacher
//!     kind: finetune                # train::FinetuneJob
//!     data: steps.task.output/train.jsonl
//!     tokenizer: steps.task.output
//!     model: {config: {hidden_size: 128, intermediate_size: 384, num_hidden_layers: 4, num_attention_heads: 4}}
//!     train: {steps: 1800}
//!   - name: samples
//!     kind: generate                # generate::GenerateJob
//!     teacher: steps.teacher.output
//!     prompts: steps.task.output/prompts.jsonl
//!     sampling: {max_new_tokens: 8}
//!   - name: student
//!     kind: distill                 # train::DistillJob
//!     data: steps.samples.output
//!     tokenizer: steps.teacher.output
//!     student: {config: {hidden_size: 64, intermediate_size: 192, num_hidden_layers: 3, num_attention_heads: 4}}
//!     kd: {alpha: 0.5, temperature: 2.0}
//!   - name: eval
//!     kind: eval                    # eval::EvalJob, once per model
//!     models: [steps.teacher.output, steps.student.output]
//!     data: steps.samples.output
//!     task: steps.task.output/test.jsonl    # optional: task accuracy of greedy answers
//! ```
//!
//! The keys of each kind (all others are errors):
//!
//! | kind       | keys                                                                         |
//! |------------|------------------------------------------------------------------------------|
//! | `task`     | `task` (`task::TaskConfig`)                                                  |
//! | `finetune` | `data`, `model` (`from` [+ `layers`] \| `config`), `tokenizer`, `train` (`train::TrainConfig`), `seeds` |
//! | `generate` | `teacher`, `prompts`, `revision`, `tokenizer`, `server` (`engine::ServerOptions`), `sampling` (`generate::SamplingConfig`), `dtype`, `long_prompts`, `part_size` |
//! | `score`    | `teacher`, `data`, `revision`, `tokenizer`, `server`, `logprobs`, `dtype`, `batch_size`, `part_size` |
//! | `distill`  | `data`, `student` (`from` [+ `layers`] \| `config`), `tokenizer`, `kd` (`train::KdConfig`), `train`, `teacher` (held in memory), `teachers` (a list of `data` + `weight`), `seeds` |
//! | `eval`     | `models` (a list), `data`, `task`, `batch_size`, `dtype`                     |
//!
//! Paths. A value `steps.NAME.output`, optionally followed by `/sub/path`, is the output of the
//! earlier step NAME: the folder `<workdir>/NAME` (for a `generate` step, its Parquet part files
//! and manifest). Any other path, `workdir` included, is relative to
//! the current directory, as on the command line (not to the recipe's folder). A `from:`,
//! `teacher:` or model that is not a reference may also be a Hub repo id, an alias or a `.gguf`
//! file; a `teacher:` may be a server, `http://HOST:PORT/v1`.
//!
//! Defaults come only from the `Default` of each config struct; a section left out of a step
//! (`train:`, `sampling:`, ...) is that default.
//!
//! Rerunning a recipe skips the steps already done with the same configuration and inputs
//! (`cache.rs`), continues an interrupted step (generation from its manifest, training from its
//! newest checkpoint), and runs again a step that changed and the steps its new output feeds.

mod cache;
mod overrides;
mod parse;
mod steps;
mod summary;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::device::DeviceChoice;
use crate::eval::{self, EvalJob, EvalReport};
use crate::generate::{self, GenerateJob, GenerateReport, ScoreJob};
use crate::task;
use crate::tokenizer::Tokenizer;
use crate::train::{self, DistillJob, FinetuneJob, ModelInit, Resume, TrainReport};
pub use overrides::Override;
pub use steps::{
    DistillStep, EvalStep, ExportStep, FinetuneStep, GenerateStep, ScoreStep, StepConfig, StepKind, TaskStep,
    TeacherSet,
};
pub use summary::{
    format_summary, model_rows, model_table, step_table, ModelGroup, ModelRow, RecipeSummary, StepRow, Table,
};

/// A parsed and validated recipe: every reference names an earlier step.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    pub name: String,
    /// Each step writes to `<workdir>/<step name>`.
    pub workdir: PathBuf,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub config: StepConfig,
    /// Where the step starts in the recipe file, for error messages.
    line: usize,
    column: usize,
}

/// Why a recipe was rejected. Every error names the recipe file; most point at a line and column
/// and quote that line.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read recipe {}: {source}; check the path (the shipped recipes are in recipes/)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// Malformed YAML, an unknown key, a wrong type, or a bad name or reference at a place.
    #[error("{}:{line}:{column}: {message}\n{snippet}", path.display())]
    At { path: PathBuf, line: usize, column: usize, message: String, snippet: String },
    /// `--resume` found a finished step whose configuration or inputs changed since.
    #[error("{}: step `{step}` changed since it ran:\n{diff}\n--resume never replaces finished work; run without --resume to run it (and what depends on it) again", path.display())]
    Changed { path: PathBuf, step: String, diff: String },
    /// A problem with the recipe as a whole (no steps, no name).
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    /// A `--set` that names no key, or whose value the key cannot take.
    #[error("{}: --set {flag}: {message}", path.display())]
    Set { path: PathBuf, flag: String, message: String },
}

/// `steps.NAME.output[/sub/path]` → `(NAME, sub/path)`; `None` for a plain path.
fn parse_ref(value: &str) -> Option<Result<(&str, &str), String>> {
    let rest = value.strip_prefix("steps.")?;
    let (head, sub) = rest.split_once('/').unwrap_or((rest, ""));
    Some(match head.strip_suffix(".output") {
        Some(name) if !name.is_empty() => Ok((name, sub)),
        _ => Err(format!(
            "`{value}` is not a step reference: write `steps.NAME.output`, optionally followed by `/path/inside/it`"
        )),
    })
}

/// Reads, parses and validates a recipe.
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    load_with(path, &[])
}

/// [`load`], with `--set KEY=VALUE` overrides applied before the checks.
pub fn load_with(path: &Path, sets: &[String]) -> Result<Recipe, RecipeError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| RecipeError::Read { path: path.to_path_buf(), source })?;
    let (name, workdir, steps) = parse::parse(path, &text)?;
    let mut recipe = Recipe { path: path.to_path_buf(), name, workdir, steps };
    let mut applied = Vec::with_capacity(sets.len());
    for flag in sets {
        let set_error = |message: String| RecipeError::Set { path: path.to_path_buf(), flag: flag.clone(), message };
        let o = Override::parse(flag).map_err(set_error)?;
        recipe.apply(&o).map_err(set_error)?;
        applied.push(o);
    }
    recipe.validate(&text, &applied)?;
    Ok(recipe)
}

impl Recipe {
    /// Applies one `--set`.
    fn apply(&mut self, o: &Override) -> Result<(), String> {
        let text =
            |v: &serde_json::Value| v.as_str().map(str::to_string).ok_or_else(|| format!("`{}` takes a string", o.key));
        let Some(name) = &o.step else {
            match o.key.as_str() {
                "name" => self.name = text(&o.value)?,
                _ => self.workdir = PathBuf::from(text(&o.value)?),
            }
            return Ok(());
        };
        let names: Vec<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        let known = names.join(", ");
        let step = self
            .steps
            .iter_mut()
            .find(|s| s.name == *name)
            .ok_or_else(|| format!("the recipe has no step named `{name}`; its steps: {known}"))?;
        overrides::apply(step, o)
    }

    /// The resolved recipe as YAML: every step with every key, defaults filled in (what
    /// `kdllm recipe show` prints). It loads back as the same recipe.
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        #[derive(Serialize)]
        struct Shown<'a> {
            name: &'a str,
            workdir: &'a Path,
            steps: Vec<ShownStep<'a>>,
        }
        #[derive(Serialize)]
        struct ShownStep<'a> {
            name: &'a str,
            kind: StepKind,
            #[serde(flatten)]
            keys: serde_json::Value,
        }
        let steps = self
            .steps
            .iter()
            .map(|s| Ok(ShownStep { name: &s.name, kind: s.kind(), keys: s.full_json()? }))
            .collect::<serde_json::Result<_>>()?;
        Ok(serde_saphyr::to_string(&Shown { name: &self.name, workdir: &self.workdir, steps })?)
    }

    /// The output of a step: the folder `<workdir>/<name>`.
    pub fn output(&self, step: &Step) -> PathBuf {
        self.workdir.join(&step.name)
    }

    /// A path value of a step: references become the earlier step's output, anything else is
    /// taken as is (relative to the current directory).
    pub fn resolve(&self, value: &str) -> PathBuf {
        match parse_ref(value) {
            Some(Ok((name, sub))) => {
                let step = self.steps.iter().find(|s| s.name == name);
                let out = step.map(|s| self.output(s)).unwrap_or_else(|| self.workdir.join(name));
                if sub.is_empty() {
                    out
                } else {
                    out.join(sub)
                }
            }
            _ => PathBuf::from(value),
        }
    }

    /// A model, tokenizer or server value: a reference resolved, anything else as written.
    fn resolve_spec(&self, value: &str) -> String {
        self.resolve(value).to_string_lossy().into_owned()
    }

    fn resolve_init(&self, init: &ModelInit) -> ModelInit {
        ModelInit {
            from: init.from.as_deref().map(|f| self.resolve_spec(f)),
            config: init.config.clone(),
            layers: init.layers.clone(),
        }
    }

    /// Runs one step; what it did, for the log line and the summary.
    fn run_step(&self, step: &Step, strict: bool, device: DeviceChoice) -> anyhow::Result<Outcome> {
        let output = self.output(step);
        // A step that runs again continues its own interrupted work when its configuration is
        // unchanged, and replaces it otherwise; `strict` (--resume) refuses to replace anything.
        let resume = if strict { Resume::Strict } else { Resume::Auto };
        std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
        Ok(match &step.config {
            StepConfig::Task(s) => {
                let files = task::write_task_data(&s.task, &output)?;
                let texts: Vec<String> =
                    crate::data::read_examples(&files.train)?.into_iter().map(|e| e.prompt + &e.completion).collect();
                Tokenizer::train_bpe(&texts, s.task.tokenizer_vocab_size)?.save(&output)?;
                Outcome {
                    line: format!(
                        "{} train / {} test / {} prompts, BPE tokenizer ({} tokens) → {}",
                        s.task.train_examples,
                        s.task.test_examples,
                        s.task.prompts,
                        s.task.tokenizer_vocab_size,
                        output.display()
                    ),
                    tokens_per_sec: None,
                    report: serde_json::to_value(&files)?,
                    models: Vec::new(),
                }
            }
            StepConfig::Finetune(s) => {
                let job = FinetuneJob {
                    data: self.resolve(&s.data),
                    model: self.resolve_init(&s.model),
                    tokenizer: s.tokenizer.as_deref().map(|t| self.resolve(t)),
                    train: s.train.clone(),
                    output,
                    resume,
                    device,
                };
                train_outcome(over_seeds(&s.seeds, &job.train, &job.output, |train, output| {
                    train::finetune(&FinetuneJob { train, output, ..job.clone() })
                })?)?
            }
            StepConfig::Distill(s) => {
                let job = DistillJob {
                    data: self.resolve(&s.data),
                    teacher: s.teacher.as_deref().map(|t| self.resolve_spec(t)),
                    teachers: s.teachers.iter().map(|t| (self.resolve(&t.data), t.weight)).collect(),
                    server: s.server.clone(),
                    student: self.resolve_init(&s.student),
                    tokenizer: s.tokenizer.as_deref().map(|t| self.resolve(t)),
                    kd: s.kd.clone(),
                    train: s.train.clone(),
                    output,
                    resume,
                    device,
                };
                train_outcome(over_seeds(&s.seeds, &job.train, &job.output, |train, output| {
                    train::distill(&DistillJob { train, output, ..job.clone() })
                })?)?
            }
            StepConfig::Generate(s) => {
                let job = GenerateJob {
                    teacher: self.resolve_spec(&s.teacher),
                    revision: s.revision.clone(),
                    tokenizer: s.tokenizer.as_deref().map(|t| self.resolve_spec(t)),
                    server: s.server.clone(),
                    shard: None,
                    prompts: self.resolve(&s.prompts),
                    output,
                    sampling: s.sampling.clone(),
                    precision: s.dtype,
                    long_prompts: s.long_prompts,
                    part_size: s.part_size,
                    overwrite: !strict,
                    device,
                };
                let r: GenerateReport = generate::generate(&job)?;
                let what = format!("{} samples, {} completion tokens", r.samples, r.completion_tokens);
                sampled_outcome(what, r.tokens_per_sec, r.wall_secs, &r.output, &r)?
            }
            StepConfig::Score(s) => {
                let job = ScoreJob {
                    teacher: self.resolve_spec(&s.teacher),
                    revision: s.revision.clone(),
                    tokenizer: s.tokenizer.as_deref().map(|t| self.resolve_spec(t)),
                    server: s.server.clone(),
                    data: self.resolve(&s.data),
                    output,
                    logprobs: s.logprobs,
                    precision: s.dtype,
                    batch_size: s.batch_size,
                    part_size: s.part_size,
                    overwrite: !strict,
                    shard: None,
                    device,
                };
                let r = generate::score(&job)?;
                let what = format!("{} rows, {} tokens scored", r.rows, r.tokens);
                sampled_outcome(what, r.tokens_per_sec, r.wall_secs, &r.output, &r)?
            }
            StepConfig::Export(s) => {
                std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
                let mut written = Vec::new();
                let mut reports = Vec::new();
                for t in &s.types {
                    let ty = crate::export::parse_type(t).map_err(anyhow::Error::msg)?;
                    let file = output.join(format!("{t}.gguf"));
                    let job = crate::export::ExportJob {
                        model: self.resolve_spec(&s.model),
                        output: file,
                        ty,
                        overwrite: true,
                    };
                    let r = crate::export::export(&job)?;
                    written.push(format!("{t} {:.2} MB", r.bytes as f64 / 1e6));
                    reports.push(r);
                }
                Outcome {
                    line: format!("{} → {}", written.join(", "), output.display()),
                    tokens_per_sec: None,
                    report: serde_json::to_value(&reports)?,
                    models: Vec::new(),
                }
            }
            StepConfig::Eval(s) => {
                let mut groups = Vec::new();
                let mut reports: Vec<EvalReport> = Vec::new();
                for model in &s.models {
                    // A model's row is named after the step that made it.
                    let name = match parse_ref(model) {
                        // An export step's files are rows of their own: `student-gguf q8_0`.
                        Some(Ok((name, sub))) if sub.ends_with(".gguf") => {
                            format!("{name} {}", sub.trim_end_matches(".gguf"))
                        }
                        Some(Ok((name, _))) => name.to_string(),
                        _ => model.clone(),
                    };
                    let mut group = ModelGroup { name, reports: Vec::new(), train_secs: Vec::new() };
                    for folder in self.seed_folders(model) {
                        let job = EvalJob {
                            model: folder.to_string_lossy().into_owned(),
                            precision: s.dtype,
                            data: self.resolve(&s.data),
                            task: s.task.as_deref().map(|t| self.resolve(t)),
                            batch_size: s.batch_size,
                            device,
                        };
                        let report = eval::evaluate(&job).with_context(|| format!("evaluating `{model}`"))?;
                        group.train_secs.extend(train_secs(&folder));
                        reports.push(report.clone());
                        group.reports.push(report);
                    }
                    groups.push(group);
                }
                let rows = model_rows(&step.name, &groups);
                let path = output.join("reports.json");
                std::fs::write(&path, serde_json::to_string_pretty(&reports)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                let scores: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        let acc = r.task_accuracy.map(|a| format!("acc {:.1}%, ", 100.0 * a)).unwrap_or_default();
                        format!("{}: {acc}nll/token {:.3}", r.name, r.nll_per_token)
                    })
                    .collect();
                Outcome {
                    line: format!("{} → {}", scores.join("; "), path.display()),
                    tokens_per_sec: None,
                    report: serde_json::to_value(&reports)?,
                    models: rows,
                }
            }
        })
    }

    /// The model folders behind an eval step's `models` entry: one per seed for a step that
    /// trains over several seeds, else the one folder.
    fn seed_folders(&self, value: &str) -> Vec<PathBuf> {
        let seeded = match parse_ref(value) {
            Some(Ok((name, ""))) => self.steps.iter().find(|s| s.name == name).map(Step::seeds).unwrap_or_default(),
            _ => &[],
        };
        let path = self.resolve(value);
        if seeded.is_empty() {
            return vec![path];
        }
        seeded.iter().map(|seed| path.join(seed_folder(*seed))).collect()
    }
}

/// The folder of one seed's run inside a step's output.
fn seed_folder(seed: u64) -> String {
    format!("seed-{seed}")
}

/// The training wall time a model folder records (its train_report.json), if any.
fn train_secs(folder: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(folder.join("train_report.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["wall_secs"].as_f64()
}

/// Runs a training job once (`seeds` empty) or once per seed, with `train.seed` replaced and
/// the output in `<output>/seed-N`.
fn over_seeds(
    seeds: &[u64],
    train: &train::TrainConfig,
    output: &Path,
    run: impl Fn(train::TrainConfig, PathBuf) -> anyhow::Result<TrainReport>,
) -> anyhow::Result<Vec<TrainReport>> {
    if seeds.is_empty() {
        return Ok(vec![run(train.clone(), output.to_path_buf())?]);
    }
    seeds
        .iter()
        .map(|&seed| {
            println!("    seed {seed}");
            let out = output.join(seed_folder(seed));
            run(train::TrainConfig { seed, ..train.clone() }, out).with_context(|| format!("seed {seed}"))
        })
        .collect()
}

/// What one step did.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Outcome {
    /// The one-line result printed after the step.
    line: String,
    tokens_per_sec: Option<f64>,
    /// The stage's report, kept in summary.json.
    report: serde_json::Value,
    /// Rows of the model table (eval steps only).
    models: Vec<ModelRow>,
}

/// The outcome of a generate or score step: `what` was done, at what speed, into which folder.
fn sampled_outcome(
    what: String,
    tokens_per_sec: f64,
    wall_secs: f64,
    output: &Path,
    report: &impl Serialize,
) -> anyhow::Result<Outcome> {
    Ok(Outcome {
        line: format!("{what}, {tokens_per_sec:.0} tok/s, {wall_secs:.1}s → {}", output.display()),
        tokens_per_sec: Some(tokens_per_sec),
        report: serde_json::to_value(report)?,
        models: Vec::new(),
    })
}

fn train_outcome(reports: Vec<TrainReport>) -> anyhow::Result<Outcome> {
    let line = |r: &TrainReport| {
        let valid = r.valid_loss.map(|v| format!(" (valid {v:.3})")).unwrap_or_default();
        format!(
            "loss {:.3} → {:.3}{valid}, {} steps, {} params, {:.0} tok/s, {:.1}s → {}",
            r.first_loss,
            r.final_loss,
            r.steps,
            r.params,
            r.tokens_per_sec,
            r.wall_secs,
            r.output.display()
        )
    };
    let speed = reports.iter().map(|r| r.tokens_per_sec).sum::<f64>() / reports.len().max(1) as f64;
    let (line, report) = match reports.as_slice() {
        [one] => (line(one), serde_json::to_value(one)?),
        many => (
            format!("{} seeds:\n      {}", many.len(), many.iter().map(line).collect::<Vec<_>>().join("\n      ")),
            serde_json::to_value(many)?,
        ),
    };
    Ok(Outcome { line, tokens_per_sec: Some(speed), report, models: Vec::new() })
}

/// Runs a recipe's steps in order, skipping those already done with the same configuration and
/// inputs, then prints the summary table and writes `<workdir>/summary.json`. With `strict`
/// (`--resume`), nothing already done is replaced: a changed step is an error.
pub fn run(path: &Path, strict: bool, sets: &[String], device: DeviceChoice) -> anyhow::Result<RecipeSummary> {
    let recipe = load_with(path, sets)?;
    let start = Instant::now();
    let mut steps = Vec::new();
    let mut models = Vec::new();
    let mut ran = 0;
    for step in &recipe.steps {
        let identity = recipe.identity(step).with_context(|| format!("step `{}`: reading its inputs", step.name))?;
        let stamp = recipe.stamp(step);
        let up_to_date = stamp
            .as_ref()
            .filter(|st| st.identity == identity && recipe.output_hash(step).is_ok_and(|h| h == st.output_hash));
        let (outcome, wall_secs) = match up_to_date {
            Some(st) => {
                println!(
                    "==> step {} ({}): up to date (same configuration and inputs), skipped",
                    step.name,
                    step.kind()
                );
                (st.outcome.clone(), st.wall_secs)
            }
            None => {
                if let (true, Some(st)) = (strict, &stamp) {
                    let diff = crate::hash::json_diff(&st.identity, &identity);
                    let what = if diff.is_empty() { "  its output was changed or deleted".to_string() } else { diff };
                    return Err(RecipeError::Changed {
                        path: recipe.path.clone(),
                        step: step.name.clone(),
                        diff: what,
                    }
                    .into());
                }
                println!("==> step {} ({})", step.name, step.kind());
                ran += 1;
                let t = Instant::now();
                let outcome = recipe
                    .run_step(step, strict, device)
                    .with_context(|| format!("step `{}` ({}) failed", step.name, step.kind()))?;
                let wall_secs = t.elapsed().as_secs_f64();
                let output_hash =
                    recipe.output_hash(step).with_context(|| format!("step `{}`: hashing its output", step.name))?;
                recipe
                    .write_stamp(step, &cache::Stamp { identity, output_hash, wall_secs, outcome: outcome.clone() })?;
                (outcome, wall_secs)
            }
        };
        println!("    {}", outcome.line);
        steps.push(StepRow {
            name: step.name.clone(),
            kind: step.kind(),
            wall_secs,
            tokens_per_sec: outcome.tokens_per_sec,
            output: recipe.output(step),
            report: outcome.report,
        });
        models.extend(outcome.models);
    }
    if ran == 0 {
        println!(
            "\nnothing to do: every step is up to date (delete {} to run them again)",
            recipe.workdir.join(".kdllm").display()
        );
    }
    let summary = RecipeSummary {
        name: recipe.name.clone(),
        workdir: recipe.workdir.clone(),
        models,
        steps,
        total_wall_secs: start.elapsed().as_secs_f64(),
    };
    println!("\n{}", format_summary(&summary));
    let path = recipe.workdir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("summary written to {}", path.display());
    Ok(summary)
}

#[cfg(test)]
mod tests;
