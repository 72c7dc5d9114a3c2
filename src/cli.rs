//! Command-line flags, turned into validated stage jobs in one step.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::data::Shard;
use crate::device::DeviceChoice;
use crate::engine::{Engine, ServerOptions};
use crate::eval::EvalJob;
use crate::generate::{GenerateJob, LongPrompts, SamplingConfig, ScoreJob, DEFAULT_PART_SIZE, DEFAULT_SCORE_BATCH};
use crate::model::Precision;

#[derive(Debug, Parser)]
#[command(name = "kdllm", version, about = "Knowledge distillation of causal language models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample completions from a teacher and write them, with its log-probabilities, to Parquet.
    Generate(GenerateArgs),
    /// Store a teacher's log-probabilities (top-k per token, teacher-forced) for given text.
    Score(ScoreArgs),
    /// Run a recipe: a YAML chain of finetune / generate / distill / eval steps.
    Train(TrainArgs),
    /// Write a model as one llama GGUF file that llama.cpp and ollama load.
    Export(ExportArgs),
    /// Write report.html for a recipe's run folder: loss curves, tables and answers side by side.
    Report(ReportArgs),
    /// Look at a recipe without running it.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Measure a model on teacher samples or task data; prints one JSON object.
    Eval(EvalArgs),
    /// Time training and sampling of fixed llama configs (and a GGUF teacher) on this machine.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Only these configs (1M, 5M, 20M, or 135M: the shape of SmolLM2-135M); 1M, 5M and 20M by default.
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Also measure this GGUF teacher (e.g. the SmolLM2 file from tools/fetch-smollm2.sh).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// Timed training steps per config (batch 8 × 256 tokens), after one warm-up step; 0 skips training.
    #[arg(long, default_value_t = 5)]
    pub train_steps: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Batch sizes to sample at.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub gen_batches: Vec<usize>,
    /// Compute dtype, as `generate --dtype` for sampling and `train.dtype` for training (bf16: mixed
    /// precision). q8 and gguf apply to sampling; training then runs in f32.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Write the results as JSON here (what benches/compare.py reads).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// How to reach a server teacher (`--teacher http://HOST:PORT/v1`).
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// A server teacher's tokenizer: a folder, GGUF file, alias or Hub repo id (default: found
    /// from the model id the server reports).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// The server's engine: vllm, sglang, llama-server or openai (default: detected).
    #[arg(long)]
    pub engine: Option<Engine>,
    /// The served model to ask for, when the server serves several.
    #[arg(long)]
    pub served_model: Option<String>,
    /// Requests in flight at once (default 8).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Further tries of a request after a 429, a 5xx, a dropped connection or a timeout
    /// (default 6).
    #[arg(long)]
    pub retries: Option<u32>,
    /// First wait before a retry, in milliseconds, doubling each try, with jitter (default 500).
    #[arg(long)]
    pub backoff_ms: Option<u64>,
    /// Seconds before a request is abandoned and retried (default 600).
    #[arg(long)]
    pub request_timeout: Option<u64>,
}

impl ServerArgs {
    /// Flags given override `ServerOptions::default()`.
    fn options(&self) -> ServerOptions {
        let d = ServerOptions::default();
        ServerOptions {
            engine: self.engine.or(d.engine),
            model: self.served_model.clone().or(d.model),
            concurrency: self.concurrency.unwrap_or(d.concurrency),
            retries: self.retries.unwrap_or(d.retries),
            backoff_ms: self.backoff_ms.unwrap_or(d.backoff_ms),
            timeout_secs: self.request_timeout.unwrap_or(d.timeout_secs),
        }
    }
}

/// The teacher of `generate` and `score`, and the slice of the work this run does.
#[derive(Debug, Args)]
pub struct TeacherArgs {
    /// Teacher: an alias (see docs/commands.md), a Hub repo id (owner/name), a local folder, a GGUF file, or
    /// a server (http://HOST:PORT/v1: vLLM, SGLang, llama-server).
    #[arg(long)]
    pub teacher: String,
    /// Hub revision (branch, tag or commit) of the teacher.
    #[arg(long)]
    pub revision: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only shard I of N (counted from 0) of the work list, e.g. 0/4: N runs (machines, array
    /// jobs) each fill their own folder, and readers take the folder holding them.
    #[arg(long)]
    pub shard: Option<Shard>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub teacher: TeacherArgs,
    /// Prompts: JSONL with `id` and `prompt` or `messages`, or text with one prompt a line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Output folder: Parquet part files and manifest.json. Rerunning the same command continues
    /// an interrupted run; a different command on the same folder is refused (see --overwrite).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Discard an output folder written by a different command and start over.
    #[arg(long)]
    pub overwrite: bool,
    /// A prompt too long for the teacher's context with --max-new-tokens: refuse or truncate
    /// (keep its end).
    #[arg(long, default_value = "refuse")]
    pub long_prompts: LongPrompts,
    /// Samples per Parquet part file: at most this much sampling is redone after a crash.
    #[arg(long, default_value_t = DEFAULT_PART_SIZE)]
    pub part_size: usize,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub samples_per_prompt: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Teacher top-k log-probs stored per completion token.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Compute dtype of the teacher: f32, bf16, q8 (its matrices quantized to Q8_0 at load) or gguf
    /// (a GGUF teacher's own quantized blocks). q8 and gguf run on the CPU.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

impl GenerateArgs {
    /// Flags given on the command line override `SamplingConfig::default()`.
    pub fn into_job(self) -> GenerateJob {
        let d = SamplingConfig::default();
        let sampling = SamplingConfig {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            max_new_tokens: self.max_new_tokens.unwrap_or(d.max_new_tokens),
            samples_per_prompt: self.samples_per_prompt.unwrap_or(d.samples_per_prompt),
            seed: self.seed.unwrap_or(d.seed),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            logprobs: self.logprobs.unwrap_or(d.logprobs),
        };
        let t = self.teacher;
        GenerateJob {
            tokenizer: t.server.tokenizer.clone(),
            server: t.server.options(),
            teacher: t.teacher,
            revision: t.revision,
            shard: t.shard,
            prompts: self.prompts,
            output: self.output,
            sampling,
            precision: self.dtype,
            long_prompts: self.long_prompts,
            part_size: self.part_size,
            overwrite: self.overwrite,
            device: self.device,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub teacher: TeacherArgs,
    /// The text to score: teacher samples written by kdllm (a .parquet file, a folder, a folder
    /// of shards), or a corpus: JSONL of {"prompt", "completion"} or {"text"}.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder, as for generate (Parquet parts and manifest.json; a rerun continues).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Discard an output folder written by a different command and start over.
    #[arg(long)]
    pub overwrite: bool,
    /// Top-k log-probs stored per completion token.
    #[arg(long, default_value_t = 20)]
    pub logprobs: usize,
    /// Compute dtype of an in-process teacher: f32, bf16, q8 or gguf (as `generate --dtype`).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Rows per forward pass of an in-process teacher.
    #[arg(long, default_value_t = DEFAULT_SCORE_BATCH)]
    pub batch_size: usize,
    /// Rows per Parquet part file.
    #[arg(long, default_value_t = DEFAULT_PART_SIZE)]
    pub part_size: usize,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

impl ScoreArgs {
    pub fn into_job(self) -> ScoreJob {
        let t = self.teacher;
        ScoreJob {
            tokenizer: t.server.tokenizer.clone(),
            server: t.server.options(),
            teacher: t.teacher,
            revision: t.revision,
            shard: t.shard,
            data: self.data,
            output: self.output,
            logprobs: self.logprobs,
            precision: self.dtype,
            batch_size: self.batch_size,
            part_size: self.part_size,
            overwrite: self.overwrite,
            device: self.device,
        }
    }
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe to run, e.g. recipes/quickstart.yaml. Steps already done with the same
    /// configuration and inputs are skipped; an interrupted step continues where it stopped.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Only continue: refuse, instead of redoing, a step whose configuration or inputs changed
    /// since it ran (or whose checkpoints or samples come from another configuration).
    #[arg(long)]
    pub resume: bool,
    /// Override a recipe key, e.g. `--set steps.student.kd.alpha=0.3` (repeatable; the value is
    /// YAML). The step's cache identity changes with it, so it runs again.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where every step computes: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The model: a folder in the Hugging Face layout (e.g. a kdllm student), an alias or a Hub id.
    #[arg(long)]
    pub model: String,
    /// The GGUF file to write.
    #[arg(long)]
    pub gguf: PathBuf,
    /// Encoding of the matrices: f32, f16, q8_0, q4_0 or q4_k (norms and biases stay f32).
    #[arg(long = "type", default_value = "f16", value_parser = crate::export::parse_type)]
    pub ty: crate::gguf::GgmlType,
    /// Replace the file if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run folder: a recipe's `workdir` (it holds summary.json).
    pub run_dir: PathBuf,
    /// Where to write the page; `<run_dir>/report.html` by default.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Print the recipe as it would run: every step with every key, defaults filled in.
    Show {
        /// The recipe file.
        recipe: PathBuf,
        /// As for `train --set`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model: a folder in the Hugging Face layout, an alias or a Hub repo id.
    #[arg(long)]
    pub model: String,
    /// Compute dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Teacher samples (Parquet file or folder) or task examples (JSONL / text).
    #[arg(long)]
    pub data: PathBuf,
    /// Task test set (JSONL of prompt/completion) to score greedy answers on.
    #[arg(long)]
    pub task: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Where to compute: auto (the first GPU of a CUDA build, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

impl EvalArgs {
    pub fn into_job(self) -> EvalJob {
        EvalJob {
            model: self.model,
            precision: self.dtype,
            data: self.data,
            task: self.task,
            batch_size: self.batch_size,
            device: self.device,
        }
    }
}

/// Runs one command; the binary only prints the error chain and picks the exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => {
            let report = crate::generate::generate(&args.into_job())?;
            eprintln!(
                "{} samples in {} ({} sampled now: {} tokens, {:.0} tok/s)",
                report.samples,
                report.output.display(),
                report.samples - report.resumed,
                report.completion_tokens,
                report.tokens_per_sec,
            );
        }
        Command::Score(args) => {
            let report = crate::generate::score(&args.into_job())?;
            eprintln!(
                "{} rows in {} ({} scored now: {} tokens, {:.0} tok/s)",
                report.rows,
                report.output.display(),
                report.rows - report.resumed,
                report.tokens,
                report.tokens_per_sec,
            );
        }
        Command::Train(args) => {
            let summary = crate::recipe::run(&args.recipe, args.resume, &args.set, args.device)?;
            println!("report written to {}", crate::report::write(&summary.workdir, None)?.display());
        }
        Command::Report(a) => {
            println!("report written to {}", crate::report::write(&a.run_dir, a.output.as_deref())?.display());
        }
        Command::Export(a) => {
            let job = crate::export::ExportJob { model: a.model, output: a.gguf, ty: a.ty, overwrite: a.overwrite };
            let r = crate::export::export(&job)?;
            eprintln!("{} tensors, {} bytes → {}", r.tensors, r.bytes, r.output.display());
            if !r.pre_tokenizer_matches {
                eprintln!(
                    "note: no llama.cpp pre-tokenizer splits text as this tokenizer does; wrote `default`, so llama.cpp \
                     may tokenize text differently (token ids given directly are unaffected)"
                );
            }
        }
        Command::Recipe(RecipeCommand::Show { recipe, set }) => {
            print!("{}", crate::recipe::load_with(&recipe, &set)?.to_yaml()?);
        }
        Command::Bench(a) => {
            let job = crate::bench::BenchJob {
                configs: a.configs,
                gguf: a.gguf,
                train_steps: a.train_steps,
                new_tokens: a.new_tokens,
                gen_batches: a.gen_batches,
                precision: a.dtype,
                json: a.json,
                device: a.device,
            };
            crate::bench::run(&job)?;
        }
        Command::Eval(args) => {
            let report = crate::eval::evaluate(&args.into_job())?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn server_flags_left_out_are_the_defaults_their_help_names() {
        let cli = Cli::parse_from(["kdllm", "generate", "--teacher", "http://h:1/v1", "--prompts", "p", "-o", "o"]);
        let Command::Generate(args) = cli.command else { panic!("not generate") };
        let d = ServerOptions::default();
        assert_eq!(args.teacher.server.options(), d);
        let help = Cli::command().find_subcommand_mut("generate").unwrap().render_long_help().to_string();
        for (flag, value) in [
            ("concurrency", d.concurrency.to_string()),
            ("retries", d.retries.to_string()),
            ("backoff-ms", d.backoff_ms.to_string()),
            ("request-timeout", d.timeout_secs.to_string()),
        ] {
            let at = help.find(&format!("--{flag} ")).unwrap();
            let text = &help[at..help[at..].find("\n      --").map_or(help.len(), |e| at + e)];
            assert!(
                text.contains(&format!("default {value}")),
                "--{flag}'s help does not name its default {value}: {text}"
            );
        }
    }
}
