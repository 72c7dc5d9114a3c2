//! Bad input, one test per case, through the real `kdllm` binary: each must exit non-zero with
//! one `error:` line that names the file, key or flag at fault (with line:column for YAML) and
//! says what to do, and must leave no output behind. The table in docs/errors.md
//! lists these cases with the messages kdllm prints.
//!
//! Everything runs offline on tiny models written into temporary folders.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use common::{
    assert_no_samples, fails, fails_with, has_all, kdllm_command, one_error_line, s, tiny_teacher, walk, write_prompts,
};
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// A temporary folder holding a tiny teacher (`teacher/`) and three good prompts (`prompts.jsonl`).
struct Fixture {
    tmp: tempfile::TempDir,
    teacher: PathBuf,
    prompts: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let teacher = tmp.path().join("teacher");
        tiny_teacher(&teacher);
        let prompts = tmp.path().join("prompts.jsonl");
        write_prompts(&prompts, 3);
        Fixture { tmp, teacher, prompts }
    }

    /// A temporary folder without a teacher, for cases that fail before any model is read.
    fn bare() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (teacher, prompts) = (tmp.path().join("teacher"), tmp.path().join("prompts.jsonl"));
        write_prompts(&prompts, 3);
        Fixture { tmp, teacher, prompts }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The generate output used by every generate case (a folder or a file, whichever kdllm writes).
    fn out(&self) -> PathBuf {
        self.path("out")
    }

    fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// `kdllm generate --teacher <teacher> --prompts <prompts> -o <out>` followed by `extra`.
    fn generate(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["generate", "--teacher", s(&self.teacher), "--prompts", s(&self.prompts)]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["-o".to_string(), s(&self.out()).to_string()]);
        if !extra.contains(&"--max-new-tokens") {
            args.extend(["--max-new-tokens".to_string(), "4".to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// A recipe file `recipe.yaml` whose workdir is `<tmp>/run`; `steps` is the YAML list of steps.
    fn recipe(&self, steps: &str) -> PathBuf {
        let text = format!("name: bad\nworkdir: {}\nsteps:\n{steps}", s(&self.workdir()));
        self.write("recipe.yaml", text)
    }

    fn workdir(&self) -> PathBuf {
        self.path("run")
    }

    /// Task examples for a finetune step.
    fn examples(&self) -> PathBuf {
        let lines: Vec<String> = common::corpus()
            .iter()
            .take(20)
            .map(|t| {
                let (p, c) = t.split_at(t.find(' ').unwrap());
                serde_json::json!({"prompt": p, "completion": c}).to_string()
            })
            .collect();
        self.write("train.jsonl", lines.join("\n"))
    }
}

/// No model was saved under the step folder `<workdir>/<step>`.
fn assert_no_model(step_dir: &Path) {
    if step_dir.exists() {
        let files = walk(step_dir);
        assert!(
            !files.iter().any(|f| f.file_name().is_some_and(|n| n == "model.safetensors" || n == "config.json")),
            "a model was written: {files:?}"
        );
    }
}

/// A finetune step on `<tmp>/train.jsonl` with the teacher's tokenizer and `train` as its `train:`.
fn finetune_step(f: &Fixture, train: &str) -> String {
    format!(
        "  - name: teacher\n    kind: finetune\n    data: {}\n    tokenizer: {}\n    model:\n      config: \
         {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}\n    train: {train}\n",
        s(&f.examples()),
        s(&f.teacher)
    )
}

/// A Parquet file at `path` with the given columns and kdllm's file metadata.
fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>, kdllm_metadata: bool) {
    let schema = Schema::new(
        columns.iter().map(|(name, a)| Field::new(*name, a.data_type().clone(), false)).collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(Arc::new(schema), columns.into_iter().map(|(_, a)| a).collect()).unwrap();
    let kv = [
        ("kdllm.schema_version", "1"),
        ("kdllm.version", "0.1.0"),
        ("kdllm.tokenizer_hash", "0000"),
        ("kdllm.logprobs_k", "2"),
        ("kdllm.sampling", "{}"),
    ];
    let props = WriterProperties::builder()
        .set_key_value_metadata(
            kdllm_metadata.then(|| kv.iter().map(|(k, v)| KeyValue::new(k.to_string(), v.to_string())).collect()),
        )
        .build();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn eval(f: &Fixture, data: &Path) -> Vec<String> {
    ["eval", "--model", s(&f.teacher), "--data", s(data)].iter().map(|a| a.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Recipes (`kdllm train --recipe`)

#[test]
fn malformed_yaml_names_line_and_column() {
    let f = Fixture::bare();
    let recipe = f.recipe("  - name: task\n    kind: task\n    task: {max_digits: 2\n");
    let err = fails("malformed_yaml_names_line_and_column", &["train", "--recipe", s(&recipe)]);
    let line = one_error_line(&err);
    // Line 6, column 11: the `{` that is never closed.
    assert!(line.starts_with(&format!("error: {}:6:11: ", recipe.display())), "{line}");
    has_all(line, &["`task`", "unclosed bracket '{'"]);
    assert!(!f.workdir().exists(), "no step ran");
}

#[test]
fn unknown_key_names_the_key_and_the_valid_keys() {
    let f = Fixture::new();
    let recipe = f.recipe(&finetune_step(&f, "\n      steps: 10\n      lrr: 0.1"));
    let err = fails("unknown_key_names_the_key_and_the_valid_keys", &["train", "--recipe", s(&recipe)]);
    let line = one_error_line(&err);
    assert!(line.starts_with(&format!("error: {}:12:7: unknown field `lrr`", recipe.display())), "{line}");
    has_all(line, &["expected one of steps, batch_size,", " lr,"]);
    assert!(!f.workdir().exists(), "no step ran");
}

#[test]
fn wrong_type_names_the_key_line_and_column() {
    let f = Fixture::new();
    let recipe = f.recipe(&finetune_step(&f, "\n      steps: ten"));
    let err = fails("wrong_type_names_the_key_line_and_column", &["train", "--recipe", s(&recipe)]);
    let line = one_error_line(&err);
    assert!(line.starts_with(&format!("error: {}:11:14: `steps`: ", recipe.display())), "{line}");
    has_all(line, &["invalid u64"]);
    assert!(!f.workdir().exists(), "no step ran");
}

#[test]
fn set_on_an_unknown_key_or_with_a_wrong_type_names_the_flag() {
    let f = Fixture::new();
    let recipe = f.recipe(&finetune_step(&f, "{steps: 2}"));
    for (set, wanted) in [
        ("steps.teacher.train.stepz=3", &["unknown field `stepz`", "expected one of"][..]),
        ("steps.teacher.train.steps=ten", &["`train.steps`", "invalid type: string \"ten\""][..]),
        ("steps.teacher.train.lr=-1", &["step `teacher`", "`train.lr` must be a positive number"][..]),
        (
            "steps.teacher.train.dtype=q8",
            &["step `teacher`", "`train.dtype` q8 is a decoding precision", "cannot be trained; use f32 or bf16"][..],
        ),
    ] {
        let err = fails("set_on_an_unknown_key_or_with_a_wrong_type", &["train", "--recipe", s(&recipe), "--set", set]);
        let line = one_error_line(&err);
        assert!(line.starts_with(&format!("error: {}: --set {set}: ", recipe.display())), "{line}");
        has_all(line, wanted);
    }
    assert!(!f.workdir().exists(), "no step ran");
    let err = fails("recipe_show_with_a_bad_set", &["recipe", "show", s(&recipe), "--set", "steps.nope.x=1"]);
    has_all(one_error_line(&err), &["no step named `nope`", "its steps: teacher"]);
}

#[test]
fn negative_batch_size_in_yaml_is_a_type_error_with_line_and_column() {
    let f = Fixture::new();
    let recipe = f.recipe(&finetune_step(&f, "{steps: 2, batch_size: -4}"));
    let err =
        fails("negative_batch_size_in_yaml_is_a_type_error_with_line_and_column", &["train", "--recipe", s(&recipe)]);
    let line = one_error_line(&err);
    assert!(line.starts_with(&format!("error: {}:10:35: `batch_size`: ", recipe.display())), "{line}");
    has_all(line, &["invalid u64"]);
    assert!(!f.workdir().exists(), "no step ran");
}

#[test]
fn missing_recipe_file_is_named() {
    let f = Fixture::bare();
    let missing = f.path("nope.yaml");
    let err = fails("missing_recipe_file_is_named", &["train", "--recipe", s(&missing)]);
    has_all(one_error_line(&err), &["cannot read recipe", s(&missing), "No such file"]);
}

#[test]
fn reference_to_an_unknown_step_names_the_step_and_the_known_ones() {
    let f = Fixture::new();
    let step = finetune_step(&f, "{steps: 2}")
        .replace(&format!("tokenizer: {}", s(&f.teacher)), "tokenizer: steps.tsak.output");
    let recipe = f.recipe(&format!("  - name: task\n    kind: task\n{step}"));
    let err =
        fails("reference_to_an_unknown_step_names_the_step_and_the_known_ones", &["train", "--recipe", s(&recipe)]);
    let line = one_error_line(&err);
    assert!(line.starts_with(&format!("error: {}:9:16: ", recipe.display())), "{line}");
    has_all(line, &["step `teacher`", "no step named `tsak`", "task"]);
    assert!(!f.workdir().exists(), "no step ran");
}

#[test]
fn reference_to_a_later_step_is_refused() {
    let f = Fixture::new();
    let step = finetune_step(&f, "{steps: 2}")
        .replace(&format!("tokenizer: {}", s(&f.teacher)), "tokenizer: steps.task.output");
    let recipe = f.recipe(&format!("{step}  - name: task\n    kind: task\n"));
    let err = fails("reference_to_a_later_step_is_refused", &["train", "--recipe", s(&recipe)]);
    let line = one_error_line(&err);
    assert!(line.starts_with(&format!("error: {}:7:16: ", recipe.display())), "{line}");
    has_all(line, &["step `teacher`", "steps.task.output", "runs later"]);
    assert!(!f.workdir().exists(), "no step ran");
}

#[test]
fn zero_train_steps_is_refused() {
    let f = Fixture::new();
    let recipe = f.recipe(&finetune_step(&f, "{steps: 0}"));
    let err = fails("zero_train_steps_is_refused", &["train", "--recipe", s(&recipe)]);
    // Checked when the recipe loads, pointing at the key, before any step runs.
    has_all(one_error_line(&err), &["recipe.yaml:", "step `teacher`: `train.steps`", "must be > 0"]);
    assert_no_model(&f.workdir().join("teacher"));
}

#[test]
fn negative_learning_rate_is_refused() {
    let f = Fixture::new();
    let recipe = f.recipe(&finetune_step(&f, "{steps: 2, lr: -1}"));
    let err = fails("negative_learning_rate_is_refused", &["train", "--recipe", s(&recipe)]);
    has_all(one_error_line(&err), &["recipe.yaml:", "step `teacher`: `train.lr` must be a positive number"]);
    assert_no_model(&f.workdir().join("teacher"));
}

#[test]
fn kd_alpha_above_one_is_refused() {
    let f = Fixture::new();
    let recipe = f.recipe(&format!(
        "  - name: samples\n    kind: generate\n    teacher: {}\n    prompts: {}\n    sampling: {{max_new_tokens: 4, logprobs: 4}}\n\
         \x20 - name: student\n    kind: distill\n    data: steps.samples.output\n    tokenizer: {}\n    student:\n      config: \
         {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}\n    kd: {{alpha: 1.5}}\n    train: {{steps: 2}}\n",
        s(&f.teacher),
        s(&f.prompts),
        s(&f.teacher)
    ));
    let err = fails("kd_alpha_above_one_is_refused", &["train", "--recipe", s(&recipe)]);
    has_all(one_error_line(&err), &["recipe.yaml:", "step `student`: `kd.alpha` must be in [0, 1]"]);
    assert_no_model(&f.workdir().join("student"));
    assert!(!f.workdir().join("samples").exists(), "refused before the generate step ran");
}

// ---------------------------------------------------------------------------------------------
// Prompts (`kdllm generate --prompts`)

/// The tiny teacher's context is 128 tokens: a 150-word prompt with 12 new tokens does not fit.
#[test]
fn prompt_longer_than_the_context_is_refused_or_truncated() {
    let f = Fixture::new();
    let long: Vec<&str> = (0..150).map(|i| common::WORDS[i % common::WORDS.len()]).collect();
    let line = serde_json::json!({"id": "long-1", "prompt": long.join(" ")}).to_string();
    std::fs::write(&f.prompts, format!("{line}\n{}", r#"{"id": "short", "prompt": "the cat"}"#)).unwrap();
    let mut args = f.generate(&["--max-new-tokens", "12"]);
    let err = fails("prompt_longer_than_the_context_is_refused", &args);
    has_all(one_error_line(&err), &["prompt `long-1`", "context of 128 tokens", "--long-prompts truncate"]);
    assert!(!f.out().exists(), "refused before anything was written");

    args.extend(["--long-prompts".to_string(), "truncate".to_string()]);
    let out = kdllm_command(&[]).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    has_all(&stderr, &["warning: prompt `long-1`", "keeping its last"]);
    let set = kdllm::data::read_samples(&f.out()).unwrap();
    let cut = set.samples.iter().find(|s| s.prompt_id == "long-1").unwrap();
    let bos = kdllm::tokenizer::Tokenizer::from_folder(&f.teacher).unwrap().bos_id().unwrap();
    assert_eq!(cut.prompt_token_ids.len(), 128 - 12, "the prompt keeps as many tokens as fit");
    assert_eq!(cut.prompt_token_ids[0], bos, "BOS stays first");
    assert!(cut.prompt.ends_with(long.last().unwrap()), "the end of the prompt is kept: {}", cut.prompt);
    let short = set.samples.iter().find(|s| s.prompt_id == "short").unwrap();
    assert_eq!(short.prompt, "the cat", "prompts that fit are untouched");
}

#[test]
fn missing_prompt_file_is_named() {
    let f = Fixture::new();
    let missing = f.path("nope.jsonl");
    let mut args = f.generate(&[]);
    args[4] = s(&missing).to_string();
    let err = fails("missing_prompt_file_is_named", &args);
    has_all(one_error_line(&err), &["cannot read prompt file", s(&missing), "pass --prompts FILE"]);
    assert_no_samples(&f.out());
}

#[test]
fn empty_prompt_set_is_refused() {
    let f = Fixture::new();
    f.write("prompts.jsonl", "\n  \n\n");
    let err = fails("empty_prompt_set_is_refused", &f.generate(&[]));
    has_all(one_error_line(&err), &[s(&f.prompts), "contains no prompts", "pass --prompts FILE"]);
    assert_no_samples(&f.out());
}

#[test]
fn malformed_jsonl_prompt_names_file_and_line() {
    let f = Fixture::new();
    f.write("prompts.jsonl", "{\"id\": \"a\", \"prompt\": \"the cat\"}\n{\"id\": \"b\", \"prompt\": \"the dog}\n");
    let err = fails("malformed_jsonl_prompt_names_file_and_line", &f.generate(&[]));
    has_all(one_error_line(&err), &[&format!("{}:2: invalid JSON", f.prompts.display())]);
    assert_no_samples(&f.out());
}

#[test]
fn duplicate_prompt_ids_name_both_lines() {
    let f = Fixture::new();
    f.write("prompts.jsonl", "{\"id\": \"a\", \"prompt\": \"the cat\"}\n{\"id\": \"a\", \"prompt\": \"the dog\"}\n");
    let err = fails("duplicate_prompt_ids_name_both_lines", &f.generate(&[]));
    has_all(
        one_error_line(&err),
        &[&format!("{}:2: duplicate id `a`", f.prompts.display()), "line 1", "ids must be unique"],
    );
    assert_no_samples(&f.out());
}

#[test]
fn prompt_line_without_prompt_or_messages_is_refused() {
    let f = Fixture::new();
    f.write("prompts.jsonl", "{\"id\": \"a\", \"text\": \"the cat\"}\n");
    let err = fails("prompt_line_without_prompt_or_messages_is_refused", &f.generate(&[]));
    has_all(one_error_line(&err), &[&format!("{}:1: ", f.prompts.display()), "needs a `prompt`", "`messages`"]);
    assert_no_samples(&f.out());
}

// ---------------------------------------------------------------------------------------------
// Sampling flags (`kdllm generate`)

#[test]
fn logprobs_above_the_vocabulary_is_refused() {
    let f = Fixture::new();
    let vocab = kdllm::tokenizer::Tokenizer::from_folder(&f.teacher).unwrap().vocab_size();
    let too_many = (vocab + 1).to_string();
    let err = fails("logprobs_above_the_vocabulary_is_refused", &f.generate(&["--logprobs", &too_many]));
    has_all(
        one_error_line(&err),
        &[&format!("`--logprobs {too_many}`"), &format!("vocabulary ({vocab})"), &format!("use at most {vocab}")],
    );
    assert_no_samples(&f.out());
}

#[test]
fn negative_temperature_is_refused() {
    let f = Fixture::new();
    let err = fails("negative_temperature_is_refused", &f.generate(&["--temperature=-1"]));
    has_all(one_error_line(&err), &["`temperature` must be >= 0", "0 = greedy", "got -1"]);
    assert_no_samples(&f.out());
}

#[test]
fn zero_top_p_is_refused() {
    let f = Fixture::new();
    let err = fails("zero_top_p_is_refused", &f.generate(&["--top-p", "0"]));
    has_all(one_error_line(&err), &["`top_p` must be > 0 and <= 1, got 0"]);
    assert_no_samples(&f.out());
}

#[test]
fn zero_batch_size_is_refused() {
    let f = Fixture::new();
    let err = fails("zero_batch_size_is_refused", &f.generate(&["--batch-size", "0"]));
    has_all(one_error_line(&err), &["`batch_size` must be >= 1"]);
    assert_no_samples(&f.out());
}

#[test]
fn zero_max_new_tokens_is_refused() {
    let f = Fixture::new();
    let err = fails("zero_max_new_tokens_is_refused", &f.generate(&["--max-new-tokens", "0"]));
    has_all(one_error_line(&err), &["`max_new_tokens` must be >= 1"]);
    assert_no_samples(&f.out());
}

#[test]
fn negative_batch_size_flag_names_the_flag() {
    let f = Fixture::new();
    let err = fails("negative_batch_size_flag_names_the_flag", &f.generate(&["--batch-size=-2"]));
    has_all(one_error_line(&err), &["invalid value '-2'", "--batch-size"]);
    assert_no_samples(&f.out());
}

#[test]
fn f16_dtype_is_refused_with_the_choices() {
    let f = Fixture::new();
    let err = fails("f16_dtype_is_refused_with_the_choices", &f.generate(&["--dtype", "f16"]));
    has_all(one_error_line(&err), &["invalid value 'f16'", "--dtype", "use f32, bf16, q8"]);
    assert_no_samples(&f.out());
}

#[test]
fn gguf_dtype_on_a_safetensors_teacher_points_to_q8() {
    let f = Fixture::new();
    let err = fails("gguf_dtype_on_a_safetensors_teacher_points_to_q8", &f.generate(&["--dtype", "gguf"]));
    has_all(one_error_line(&err), &["`--dtype gguf`", "is not a GGUF file", "use --dtype q8"]);
    assert_no_samples(&f.out());
}

// ---------------------------------------------------------------------------------------------
// Output

#[test]
fn output_under_a_regular_file_is_refused() {
    let f = Fixture::new();
    let file = f.write("not-a-folder", "x");
    let out = file.join("out");
    let mut args = f.generate(&[]);
    args[6] = s(&out).to_string();
    let err = fails("output_under_a_regular_file_is_refused", &args);
    let line = one_error_line(&err);
    has_all(line, &[s(&file), "is a file", "choose another --output"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file in the way is untouched");
}

// ---------------------------------------------------------------------------------------------
// Teachers and models

#[test]
fn unknown_alias_lists_the_known_ones() {
    let f = Fixture::bare();
    let mut args = f.generate(&[]);
    args[2] = "smolm2".into();
    let err = fails("unknown_alias_lists_the_known_ones", &args);
    has_all(one_error_line(&err), &["unknown model `smolm2`", "not an alias (known:", "smollm2", "owner/name"]);
    assert_no_samples(&f.out());
}

#[test]
fn hub_id_not_in_the_cache_offline_says_how_to_fetch_it() {
    let f = Fixture::bare();
    let mut args = f.generate(&[]);
    args[2] = "someone/not-cached".into();
    let mut cmd = kdllm_command(&[]);
    cmd.args(&args).env("HF_HOME", f.path("hf"));
    let err = fails_with("hub_id_not_in_the_cache_offline_says_how_to_fetch_it", cmd);
    has_all(
        one_error_line(&err),
        &[
            "config.json of someone/not-cached (revision main) is not in the Hub cache",
            "HF_HUB_OFFLINE is set",
            "huggingface-cli download someone/not-cached --revision main",
        ],
    );
    assert_no_samples(&f.out());
}

/// A stand-in for the Hub that answers 401 to every request (a gated repo) and reports whether
/// the token reached it.
fn gated_hub(token: &'static str) -> (String, std::sync::mpsc::Receiver<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut saw_token = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                saw_token |= line.to_ascii_lowercase().starts_with("authorization:") && line.contains(token);
            }
            let _ = tx.send(saw_token);
            let body = format!("{{\"error\": \"Access to this repo is restricted. token {token} was sent\"}}");
            let _ = write!(
                stream,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nX-Error-Code: GatedRepo\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        }
    });
    (url, rx)
}

#[test]
fn hf_token_never_appears_in_output_or_errors() {
    const SECRET: &str = "hf_SECRETxxxx1234567890";
    let f = Fixture::bare();
    let (endpoint, saw_token) = gated_hub(SECRET);
    let mut args = f.generate(&[]);
    args[2] = "gated-owner/gated-model".into();
    let mut cmd = kdllm_command(&[]);
    cmd.args(&args)
        .env("HF_HOME", f.path("hf"))
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_TOKEN", SECRET)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy");
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("=== hf_token_never_appears_in_output_or_errors\n{}", stderr.trim_end());
    assert!(!out.status.success(), "{stderr}");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET), "the token leaked:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("SECRET") && !stderr.contains("SECRET"), "part of the token leaked:\n{stderr}");
    has_all(
        one_error_line(&stderr),
        &["cannot access gated-owner/gated-model", "gated or private", "accept its licence", "set HF_TOKEN"],
    );
    assert!(saw_token.try_iter().any(|t| t), "the token was sent to the Hub, so it was there to leak");
    assert_no_samples(&f.out());
    // Nor is it written anywhere under the output or the cache.
    for file in walk(f.tmp.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(SECRET), "the token is in {}", file.display());
    }
}

#[test]
fn folder_without_config_json_is_refused() {
    let f = Fixture::new();
    std::fs::remove_file(f.teacher.join("config.json")).unwrap();
    let err = fails("folder_without_config_json_is_refused", &f.generate(&[]));
    has_all(one_error_line(&err), &[&format!("{} is not a model folder: it has no config.json", f.teacher.display())]);
    assert_no_samples(&f.out());
}

#[test]
fn pytorch_bin_folder_is_refused_with_the_conversion_command() {
    let f = Fixture::new();
    std::fs::rename(f.teacher.join("model.safetensors"), f.teacher.join("pytorch_model.bin")).unwrap();
    let err = fails("pytorch_bin_folder_is_refused_with_the_conversion_command", &f.generate(&[]));
    has_all(
        one_error_line(&err),
        &["has only PyTorch weights (pytorch_model.bin)", "kdllm reads safetensors only", "save_pretrained"],
    );
    assert_no_samples(&f.out());
}

#[test]
fn pickle_checkpoint_file_is_refused() {
    let f = Fixture::bare();
    for name in ["model.pt", "model.pth", "pytorch_model.bin", "last.ckpt"] {
        // The start of a pickle: kdllm must refuse before reading it.
        let file = f.write(name, b"\x80\x02}q\x00.");
        let mut args = f.generate(&[]);
        args[2] = s(&file).to_string();
        let err = fails(&format!("pickle_checkpoint_file_is_refused ({name})"), &args);
        has_all(
            one_error_line(&err),
            &[
                &format!("{} is a PyTorch pickle checkpoint", file.display()),
                "kdllm reads safetensors only",
                "save_file",
                "pass DIR as the model",
            ],
        );
        assert_no_samples(&f.out());
    }
}

#[test]
fn malformed_config_json_names_the_file() {
    let f = Fixture::new();
    let cfg = f.teacher.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["hidden_size"] = "big".into();
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = fails("malformed_config_json_names_the_file", &f.generate(&[]));
    has_all(
        one_error_line(&err),
        &[s(&cfg), "is not a valid llama config", "invalid type: string \"big\", expected usize"],
    );
    assert_no_samples(&f.out());
}

#[test]
fn unsupported_model_type_is_refused_by_name() {
    let f = Fixture::new();
    let cfg = f.teacher.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["model_type"] = "phi3".into();
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = fails("unsupported_model_type_is_refused_by_name", &f.generate(&[]));
    has_all(
        one_error_line(&err),
        &[s(&cfg), "model_type `phi3` is not supported", "supported: llama, mistral, qwen2", "LlamaForCausalLM"],
    );
    assert_no_samples(&f.out());
}

#[test]
fn truncated_safetensors_is_refused() {
    let f = Fixture::new();
    let weights = f.teacher.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails("truncated_safetensors_is_refused", &f.generate(&[]));
    has_all(one_error_line(&err), &[s(&weights), "incomplete", "re-download or re-export it"]);
    assert_no_samples(&f.out());
}

#[test]
fn folder_without_tokenizer_json_says_how_to_write_one() {
    let f = Fixture::new();
    std::fs::remove_file(f.teacher.join("tokenizer.json")).unwrap();
    let err = fails("folder_without_tokenizer_json_says_how_to_write_one", &f.generate(&[]));
    has_all(one_error_line(&err), &[&format!("no tokenizer.json in {}", f.teacher.display()), "save_pretrained(DIR)"]);
    assert_no_samples(&f.out());
}

#[test]
fn corrupt_tokenizer_json_is_named() {
    let f = Fixture::new();
    let tok = f.teacher.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).unwrap();
    std::fs::write(&tok, &text[..text.len() / 2]).unwrap();
    let err = fails("corrupt_tokenizer_json_is_named", &f.generate(&[]));
    has_all(one_error_line(&err), &[&format!("cannot parse {}", tok.display()), "is it a Hugging Face file"]);
    assert_no_samples(&f.out());
}

#[test]
fn chat_prompt_for_a_model_without_a_chat_template_names_the_prompt() {
    let f = Fixture::new();
    f.write("prompts.jsonl", "{\"id\": \"c1\", \"messages\": [{\"role\": \"user\", \"content\": \"the cat\"}]}\n");
    let err = fails("chat_prompt_for_a_model_without_a_chat_template_names_the_prompt", &f.generate(&[]));
    has_all(
        one_error_line(&err),
        &["prompt `c1`", "no chat template", "give the prompt as `prompt` instead of `messages`"],
    );
    assert_no_samples(&f.out());
}

#[test]
fn revision_for_a_local_folder_is_refused() {
    let f = Fixture::new();
    let err = fails("revision_for_a_local_folder_is_refused", &f.generate(&["--revision", "v1"]));
    has_all(one_error_line(&err), &["`revision` (v1) applies to Hub models, not to the local folder", s(&f.teacher)]);
    assert_no_samples(&f.out());
}

// ---------------------------------------------------------------------------------------------
// Teacher samples (`kdllm eval --data`)

#[test]
fn missing_samples_file_is_named() {
    let f = Fixture::new();
    let missing = f.path("nope.parquet");
    let err = fails("missing_samples_file_is_named", &eval(&f, &missing));
    has_all(one_error_line(&err), &["cannot read sample file", s(&missing), "written by `kdllm generate`"]);
}

#[test]
fn text_file_named_parquet_is_refused() {
    let f = Fixture::new();
    let data = f.write("samples.parquet", "{\"prompt\": \"the cat\", \"completion\": \" sat\"}\n");
    let err = fails("text_file_named_parquet_is_refused", &eval(&f, &data));
    has_all(
        one_error_line(&err),
        &[&format!("{} is not a readable Parquet file", data.display()), "generate it again"],
    );
}

#[test]
fn truncated_parquet_is_refused() {
    let f = Fixture::new();
    let data = f.path("samples.parquet");
    write_parquet(&data, vec![("prompt_id", Arc::new(StringArray::from(vec!["p0", "p1", "p2"])) as ArrayRef)], true);
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails("truncated_parquet_is_refused", &eval(&f, &data));
    has_all(
        one_error_line(&err),
        &[&format!("{} is not a readable Parquet file", data.display()), "if a run was interrupted, delete it"],
    );
}

#[test]
fn parquet_from_another_tool_is_refused() {
    let f = Fixture::new();
    let data = f.path("foreign.parquet");
    write_parquet(&data, vec![("text", Arc::new(StringArray::from(vec!["the cat sat"])) as ArrayRef)], false);
    let err = fails("parquet_from_another_tool_is_refused", &eval(&f, &data));
    has_all(
        one_error_line(&err),
        &[s(&data), "file metadata `kdllm.schema_version` is missing", "regenerate it with `kdllm generate`"],
    );
}

#[test]
fn parquet_column_of_the_wrong_type_is_named() {
    let f = Fixture::new();
    let data = f.path("wrong-type.parquet");
    write_parquet(
        &data,
        vec![
            ("prompt_id", Arc::new(StringArray::from(vec!["p0"])) as ArrayRef),
            ("sample_index", Arc::new(Int64Array::from(vec![0i64])) as ArrayRef),
        ],
        true,
    );
    let err = fails("parquet_column_of_the_wrong_type_is_named", &eval(&f, &data));
    has_all(
        one_error_line(&err),
        &[s(&data), "column `sample_index` has type Int64 but kdllm expects UInt32", "regenerate it"],
    );
}

#[test]
fn parquet_missing_a_column_is_named() {
    let f = Fixture::new();
    let data = f.path("missing-column.parquet");
    write_parquet(&data, vec![("prompt_id", Arc::new(StringArray::from(vec!["p0"])) as ArrayRef)], true);
    let err = fails("parquet_missing_a_column_is_named", &eval(&f, &data));
    has_all(one_error_line(&err), &[s(&data), "column `sample_index` is missing", "regenerate it"]);
}

#[test]
fn samples_folder_without_parquet_files_is_refused() {
    let f = Fixture::new();
    let dir = f.path("samples");
    std::fs::create_dir(&dir).unwrap();
    f.write("samples/notes.txt", "nothing here");
    let err = fails("samples_folder_without_parquet_files_is_refused", &eval(&f, &dir));
    has_all(one_error_line(&err), &[s(&dir), "contains no *.parquet files", "written by `kdllm generate`"]);
}

#[test]
fn report_of_a_folder_that_is_not_a_run_is_refused() {
    let f = Fixture::bare();
    let dir = f.path("not-a-run");
    std::fs::create_dir(&dir).unwrap();
    let err = fails("report_of_a_folder_that_is_not_a_run_is_refused", &["report", s(&dir)]);
    has_all(one_error_line(&err), &[s(&dir), "is not a kdllm run: it has no summary.json", "kdllm train --recipe"]);
    assert!(!dir.join("report.html").exists());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_on_a_cpu_build_says_how_to_rebuild() {
    let f = Fixture::new();
    let err = fails("cuda_device_on_a_cpu_build_says_how_to_rebuild", &f.generate(&["--device", "cuda"]));
    has_all(
        one_error_line(&err),
        &["--device cuda:0: this kdllm was built without CUDA", "tools/build-cuda.sh", "--device cpu"],
    );
    assert_no_samples(&f.out());
}

#[test]
fn unknown_device_names_the_choices() {
    let f = Fixture::bare();
    let err = fails("unknown_device_names_the_choices", &f.generate(&["--device", "gpu"]));
    has_all(&err, &["--device", "`gpu` is not a device: use auto, cpu, cuda or cuda:N"]);
}
