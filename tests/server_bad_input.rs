//! Bad input for server teachers, shards and scoring, through the real `kdllm` binary against a
//! stand-in engine (`common/mock_engine.rs`): each case exits non-zero with one `error:` line
//! naming the URL, flag or folder and the fix, and leaves no part file behind. docs/errors.md's
//! bad-input table lists them.

mod common;

use std::path::PathBuf;

use common::mock_engine::{Behaviour, Flavor, MockEngine, ServerSetup};
use common::{assert_no_samples, fails_with, has_all, kdllm, kdllm_command, one_error_line, s, walk};
use kdllm::tokenizer::Tokenizer;

type Fixture = ServerSetup;

impl ServerSetup {
    fn out(&self) -> PathBuf {
        self.path("out")
    }

    /// `kdllm generate` from `url` into `out`, few retries, then `extra`.
    fn generate(&self, url: &str, extra: &[&str]) -> std::process::Command {
        self.generate_to(url, &self.out(), extra)
    }

    fn generate_to(&self, url: &str, out: &std::path::Path, extra: &[&str]) -> std::process::Command {
        let mut args =
            vec!["generate", "--teacher", url, "--tokenizer", s(&self.teacher), "--prompts", s(&self.prompts)];
        args.extend(["-o", s(out), "--max-new-tokens", "6", "--retries", "1", "--backoff-ms", "5"]);
        args.extend_from_slice(extra);
        kdllm_command(&args)
    }
}

/// The case fails with one error line holding every needle, and writes no samples.
fn refused(f: &Fixture, case: &str, cmd: std::process::Command, needles: &[&str]) -> String {
    let err = fails_with(case, cmd);
    let line = one_error_line(&err).to_string();
    has_all(&line, needles);
    assert_no_samples(&f.out());
    line
}

#[test]
fn an_unreachable_server_is_named_with_its_tries() {
    let f = Fixture::new(4);
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");
    refused(
        &f,
        "unreachable server",
        f.generate(&url, &[]),
        &["cannot reach the teacher server at", &format!("127.0.0.1:{port}"), "2 tries", "--teacher"],
    );
}

#[test]
fn a_model_the_server_does_not_serve_lists_what_it_serves() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Vllm, |_| {});
    refused(
        &f,
        "wrong model name",
        f.generate(&e.url, &["--served-model", "mock/nope"]),
        &["no model named `mock/nope`", "it serves: mock/teacher", "--served-model"],
    );
}

#[test]
fn a_server_without_log_probs_says_which_engines_have_them() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Openai, |b| b.no_logprobs = true);
    refused(
        &f,
        "no logprobs",
        f.generate(&e.url, &[]),
        &["returned no log-probabilities", "vLLM, SGLang or llama-server"],
    );
}

#[test]
fn logprobs_above_the_servers_limit_names_vllms_max_logprobs() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Vllm, |b| b.max_logprobs = Some(20));
    refused(
        &f,
        "logprobs above the limit",
        f.generate(&e.url, &["--logprobs", "50"]),
        &["refuses --logprobs 50", "greater than max allowed: 20", "--max-logprobs"],
    );
}

#[test]
fn a_refused_api_key_is_never_shown() {
    let f = Fixture::new(4);
    let secret = "sk-kdllm-test-SECRET-4711";
    let e = f.engine(Flavor::LlamaServer, |b| b.key = Some("the-right-key".into()));
    let mut cmd = f.generate(&e.url, &[]);
    cmd.env("KDLLM_API_KEY", secret);
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success());
    has_all(
        one_error_line(&stderr),
        &["refused the request (HTTP 401)", "does not accept the API key", "KDLLM_API_KEY"],
    );
    assert!(!stdout.contains(secret) && !stderr.contains(secret), "the key was shown");
    for file in walk(f.tmp.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(secret), "the key is in {}", file.display());
    }
    assert_eq!(e.state.auth_seen.lock().unwrap().last().map(String::as_str), Some(format!("Bearer {secret}").as_str()));
    assert_no_samples(&f.out());
    // Without a key the error says to set one; with the right one it works.
    let mut cmd = f.generate(&e.url, &[]);
    cmd.env_remove("KDLLM_API_KEY").env_remove("OPENAI_API_KEY");
    refused(&f, "missing API key", cmd, &["needs an API key", "KDLLM_API_KEY"]);
    let mut cmd = f.generate(&e.url, &[]);
    cmd.env("OPENAI_API_KEY", "the-right-key").env_remove("KDLLM_API_KEY");
    assert!(cmd.output().unwrap().status.success());
}

#[test]
fn malformed_json_is_one_error_with_the_start_of_the_answer() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::LlamaServer, |b| b.malformed = true);
    refused(&f, "malformed JSON", f.generate(&e.url, &[]), &["malformed JSON", "half an answ"]);
}

#[test]
fn fewer_top_k_entries_than_asked_is_refused() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Sglang, |b| b.fewer_topk = 1);
    refused(
        &f,
        "fewer top-k than asked",
        f.generate(&e.url, &["--logprobs", "5"]),
        &["returned 4 top-k entries", "--logprobs 5", "lower --logprobs"],
    );
}

#[test]
fn a_tokenizer_that_does_not_match_the_servers_is_refused() {
    let f = Fixture::new(4);
    let texts: Vec<String> = (0..50).map(|i| format!("other words {i} here")).collect();
    let other = Tokenizer::train_bpe(&texts, 280).unwrap();
    let e = f.engine(Flavor::LlamaServer, |b| b.other_tokenizer = Some(other));
    refused(
        &f,
        "tokenizer mismatch",
        f.generate(&e.url, &[]),
        &["does not match the teacher server's", "where the server gives", "--tokenizer"],
    );
}

#[test]
fn a_shard_beyond_the_count_is_refused() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Vllm, |_| {});
    refused(
        &f,
        "--shard 3/2",
        f.generate(&e.url, &["--shard", "3/2"]),
        &["--shard", "shard 3 does not exist in 2 shards", "0/2 … 1/2"],
    );
}

#[test]
fn a_shard_folder_from_another_command_is_named() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Vllm, |_| {});
    let root = f.path("shards");
    for (i, seed) in [(0, "1"), (1, "2")] {
        let dir = root.join(format!("shard-{i}"));
        assert!(f
            .generate_to(&e.url, &dir, &["--shard", &format!("{i}/2"), "--seed", seed])
            .output()
            .unwrap()
            .status
            .success());
    }
    let eval = kdllm_command(&["eval", "--model", s(&f.teacher), "--data", s(&root)]);
    let err = fails_with("shard from another command", eval);
    has_all(one_error_line(&err), &["shard-1", "is from another command than", "shard-0"]);
    has_all(&err, &["sampling.seed: 1 (on disk) → 2 (now)"]);
    // A missing shard is named with the command that makes it.
    std::fs::remove_dir_all(root.join("shard-1")).unwrap();
    let eval = kdllm_command(&["eval", "--model", s(&f.teacher), "--data", s(&root)]);
    has_all(one_error_line(&fails_with("missing shard", eval)), &["shard 1/2 is missing", "--shard 1/2"]);
}

#[test]
fn scoring_data_of_another_tokenizer_is_refused() {
    let f = Fixture::new(4);
    let e = f.engine(Flavor::Vllm, |_| {});
    let samples = f.path("samples");
    assert!(f.generate_to(&e.url, &samples, &[]).output().unwrap().status.success());
    // Another teacher, with a vocabulary of its own.
    let other = f.path("other");
    std::fs::create_dir_all(&other).unwrap();
    let texts: Vec<String> = (0..60).map(|i| format!("a different corpus {i} entirely")).collect();
    let other_tok = Tokenizer::train_bpe(&texts, 290).unwrap();
    other_tok.save(&other).unwrap();
    let b = Behaviour { model: "mock/other".into(), ..Default::default() };
    let other_engine = MockEngine::start(Flavor::Vllm, other_tok, b);
    let out = f.out();
    let args =
        ["score", "--teacher", &other_engine.url, "--tokenizer", s(&other), "--data", s(&samples), "-o", s(&out)];
    let (ok, _) = kdllm(&[
        "score",
        "--teacher",
        &e.url,
        "--tokenizer",
        s(&f.teacher),
        "--data",
        s(&samples),
        "-o",
        s(&f.path("fine")),
    ]);
    assert!(ok, "the same tokenizer scores");
    let mut cmd = kdllm_command(&[]);
    cmd.args(args);
    refused(&f, "score with another tokenizer", cmd, &["tokenized with another tokenizer than the teacher's", "JSONL"]);
}
