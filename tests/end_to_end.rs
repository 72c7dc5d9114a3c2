//! A tiny teacher (random weights, a tokenizer trained here) → generate → distill → eval,
//! through the library and through the `kdllm` binary. Everything lives in temp folders.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use common::{corpus, kdllm, tiny_teacher, write_prompts};
use kdllm::generate::{generate, GenerateJob, LongPrompts, SamplingConfig};
use kdllm::model::llama::{Llama, LlamaConfig};
use kdllm::model::Precision;
use kdllm::tokenizer::Tokenizer;
use kdllm::train::{distill, DistillJob, KdConfig, ModelInit, Resume, TrainConfig};

mod common;

fn gen_job(teacher: &Path, prompts: &Path, out: PathBuf) -> GenerateJob {
    GenerateJob {
        device: Default::default(),
        teacher: teacher.display().to_string(),
        revision: None,
        tokenizer: None,
        server: Default::default(),
        shard: None,
        prompts: prompts.to_path_buf(),
        output: out,
        sampling: SamplingConfig {
            max_new_tokens: 12,
            samples_per_prompt: 2,
            batch_size: 8,
            logprobs: 8,
            seed: 5,
            ..Default::default()
        },
        precision: Precision::F32,
        long_prompts: LongPrompts::Refuse,
        part_size: 16,
        overwrite: false,
    }
}

#[test]
fn teacher_samples_then_a_student_learns_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    tiny_teacher(&teacher);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts, 40);

    let a = generate(&gen_job(&teacher, &prompts, tmp.path().join("a"))).unwrap();
    assert_eq!(a.samples, 80);
    let b = generate(&gen_job(&teacher, &prompts, tmp.path().join("b"))).unwrap();
    let parts = |dir: &Path| -> Vec<Vec<u8>> {
        let m = kdllm::data::Manifest::read(dir).unwrap().unwrap();
        m.part_paths(dir).iter().map(|p| std::fs::read(p).unwrap()).collect()
    };
    assert_eq!(parts(&a.output).len(), 5, "80 samples in parts of 16");
    assert_eq!(parts(&a.output), parts(&b.output), "same seed, same bytes");

    let set = kdllm::data::read_samples(&a.output).unwrap();
    for s in &set.samples {
        assert_eq!(s.topk_token_ids.len(), s.completion_token_ids.len());
        assert!(s.topk_token_ids.iter().all(|row| row.len() == 8));
        assert!(s.token_logprobs.iter().all(|&lp| lp <= 0.0 && lp.is_finite()));
        // The sampled token's log-prob is at most the top-1 log-prob.
        assert!(s.token_logprobs.iter().zip(&s.topk_logprobs).all(|(lp, top)| *lp <= top[0] + 1e-6));
    }

    let student_cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": true,
    }))
    .unwrap();
    let out = tmp.path().join("student");
    let report = distill(&DistillJob {
        device: Default::default(),
        teacher: None,
        teachers: Vec::new(),
        server: Default::default(),
        data: a.output.clone(),
        student: ModelInit { from: None, config: Some(student_cfg), layers: None },
        tokenizer: Some(teacher.clone()),
        kd: KdConfig { alpha: 0.5, temperature: 2.0, ..Default::default() },
        train: TrainConfig {
            steps: 40,
            batch_size: 8,
            lr: 1e-2,
            warmup_steps: 5,
            valid_fraction: 0.1,
            ..Default::default()
        },
        output: out.clone(),
        resume: Resume::Auto,
    })
    .unwrap();
    assert!(
        report.final_loss < report.first_loss * 0.9,
        "loss should fall: {} → {}",
        report.first_loss,
        report.final_loss
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the student folder");
    }
    let student = Llama::load(&out, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(student.config().num_params(), report.params);
    assert_eq!(
        Tokenizer::from_folder(&out).unwrap().vocab_hash(),
        Tokenizer::from_folder(&teacher).unwrap().vocab_hash()
    );

    let eval = kdllm::eval::evaluate(&kdllm::eval::EvalJob {
        device: Default::default(),
        model: out.to_string_lossy().into_owned(),
        precision: Precision::F32,
        data: a.output,
        task: None,
        batch_size: 16,
    })
    .unwrap();
    assert!(eval.kl_to_teacher.unwrap() >= 0.0 && eval.top1_agreement.unwrap() <= 1.0);
    assert!((eval.perplexity - eval.nll_per_token.exp()).abs() < 1e-9);
}

#[test]
fn bad_generate_input_fails_with_a_clear_message_and_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    let cfg = tiny_teacher(&teacher);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts, 3);
    let out = tmp.path().join("out");
    let (t, p, o) = (teacher.to_str().unwrap(), prompts.to_str().unwrap(), out.to_str().unwrap());

    let (ok, err) = kdllm(&["generate", "--teacher", t, "--prompts", "/nonexistent/prompts.jsonl", "-o", o]);
    assert!(!ok && err.contains("/nonexistent/prompts.jsonl"), "{err}");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let (ok, err) = kdllm(&["generate", "--teacher", t, "--prompts", empty.to_str().unwrap(), "-o", o]);
    assert!(!ok && err.contains("empty.txt"), "{err}");

    let (ok, err) = kdllm(&["generate", "--teacher", "no-such-alias", "--prompts", p, "-o", o]);
    assert!(!ok && err.contains("no-such-alias") && err.contains("smollm2"), "{err}");

    let (ok, err) = kdllm(&["generate", "--teacher", "someone/not-cached", "--prompts", p, "-o", o]);
    assert!(!ok && err.contains("someone/not-cached") && err.contains("config.json"), "{err}");

    let too_many = (cfg.vocab_size + 1).to_string();
    let (ok, err) = kdllm(&["generate", "--teacher", t, "--prompts", p, "-o", o, "--logprobs", &too_many]);
    assert!(!ok && err.contains("--logprobs"), "{err}");

    let (ok, err) = kdllm(&["generate", "--teacher", t, "--prompts", p, "-o", o, "--top-p", "0"]);
    assert!(!ok && err.contains("top_p"), "{err}");

    let (ok, err) = kdllm(&["generate", "--teacher", t, "--prompts", p, "-o", o, "--dtype", "f16"]);
    assert!(!ok && err.contains("--dtype") && err.contains("use f32, bf16, q8"), "{err}");

    assert!(
        std::fs::read_dir(tmp.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with("out")),
        "no output left behind"
    );

    let (ok, err) =
        kdllm(&["generate", "--teacher", t, "--prompts", p, "-o", o, "--max-new-tokens", "4", "--dtype", "bf16"]);
    assert!(ok && out.join("manifest.json").is_file() && out.join("part-00000.parquet").is_file(), "{err}");
}

#[test]
fn another_tokenizer_is_refused_for_kl_and_retokenized_for_sequence_level() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    tiny_teacher(&teacher);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts, 4);
    let samples = generate(&gen_job(&teacher, &prompts, tmp.path().join("s-samples"))).unwrap();
    let other = tmp.path().join("other-tokenizer");
    let texts: Vec<String> = corpus().iter().map(|t| t.to_uppercase()).collect();
    Tokenizer::train_bpe(&texts, 300).unwrap().save(&other).unwrap();
    let out = tmp.path().join("student");
    let job = |alpha: f64| DistillJob {
        device: Default::default(),
        teacher: None,
        teachers: Vec::new(),
        server: Default::default(),
        data: samples.output.clone(),
        student: ModelInit {
            from: None,
            config: Some(
                serde_json::from_value(serde_json::json!({
                    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                }))
                .unwrap(),
            ),
            layers: None,
        },
        tokenizer: Some(other.clone()),
        kd: KdConfig { alpha, ..KdConfig::default() },
        train: TrainConfig { steps: 2, batch_size: 2, valid_fraction: 0.0, ..Default::default() },
        output: out.clone(),
        resume: Resume::Auto,
    };
    let err = distill(&job(0.5)).unwrap_err().to_string();
    assert!(err.contains("tokenizer") && err.contains("s-samples") && err.contains("kd.alpha: 0"), "{err}");
    assert!(!out.exists(), "nothing written for a refused run");

    // Sequence-level only: the completions are re-tokenized with the student's tokenizer.
    let report = distill(&job(0.0)).unwrap();
    assert!(report.first_loss.is_finite() && report.tokens > 0);
    let other_tok = Tokenizer::from_folder(&other).unwrap();
    assert_eq!(Tokenizer::from_folder(&out).unwrap().vocab_hash(), other_tok.vocab_hash());
}

/// A recipe that chains every step kind: task → finetune → generate → distill → eval.
fn write_tiny_recipe(recipe: &Path, workdir: &Path, alpha: f64) {
    let model = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, max_position_embeddings: 32, tie_word_embeddings: true}";
    let train = "{steps: 30, batch_size: 16, lr: 3.0e-3, warmup_steps: 5, valid_fraction: 0.1, log_every: 10}";
    std::fs::write(
        recipe,
        format!(
            "name: tiny\nworkdir: {}\nsteps:\n\
             - {{name: task, kind: task, task: {{max_digits: 2, train_examples: 300, test_examples: 20, prompts: 40}}}}\n\
             - {{name: teacher, kind: finetune, data: steps.task.output/train.jsonl, tokenizer: steps.task.output, model: {{config: {model}}}, train: {train}}}\n\
             - {{name: samples, kind: generate, teacher: steps.teacher.output, prompts: steps.task.output/prompts.jsonl, sampling: {{max_new_tokens: 5, logprobs: 5, batch_size: 16}}}}\n\
             - {{name: rescored, kind: score, teacher: steps.teacher.output, data: steps.samples.output, logprobs: 5}}\n\
             - {{name: student, kind: distill, data: steps.rescored.output, tokenizer: steps.teacher.output, student: {{config: {model}}}, kd: {{alpha: {alpha}}}, train: {train}}}\n\
             - {{name: eval, kind: eval, models: [steps.teacher.output, steps.student.output], data: steps.samples.output, task: steps.task.output/test.jsonl}}\n",
            workdir.display()
        ),
    )
    .unwrap();
}

/// Runs `kdllm train --recipe recipe [extra]`; (success, stdout, stderr).
fn run_recipe(recipe: &Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kdllm"))
        .args(["train", "--recipe", recipe.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Steps announced as run (not skipped) in a recipe's stdout.
fn steps_run(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("==> step "))
        .filter(|l| !l.contains("up to date"))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// The recipe runner chains every step kind; a rerun skips everything; a changed step reruns
/// with the steps its output feeds, and `--resume` refuses to replace finished work.
#[test]
fn a_tiny_recipe_runs_every_step_kind_and_reruns_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("tiny.yaml");
    let workdir = tmp.path().join("run");
    write_tiny_recipe(&recipe, &workdir, 0.5);
    let (ok, stdout, stderr) = run_recipe(&recipe, &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(steps_run(&stdout), ["task", "teacher", "samples", "rescored", "student", "eval"], "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workdir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["models"].as_array().map(Vec::len), Some(2), "{summary}");
    assert!(Llama::load(&workdir.join("student"), &Device::Cpu, DType::F32).is_ok());
    check_report(&workdir, &stdout);
    let student_weights = std::fs::read(workdir.join("student/model.safetensors")).unwrap();

    let (ok, stdout, stderr) = run_recipe(&recipe, &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(steps_run(&stdout).is_empty() && stdout.contains("nothing to do"), "{stdout}");
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workdir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(again["models"], summary["models"], "the summary of a cached run keeps the scores");

    // Another alpha: the student and the eval that reads it run again; nothing before them.
    write_tiny_recipe(&recipe, &workdir, 0.2);
    let (ok, stdout, stderr) = run_recipe(&recipe, &["--resume"]);
    assert!(
        !ok && stderr.contains("step `student` changed since it ran")
            && stderr.contains("kd.alpha: 0.5 (on disk) → 0.2 (now)"),
        "{stderr}"
    );
    let (ok, stdout2, stderr) = run_recipe(&recipe, &[]);
    assert!(ok, "{stdout}{stdout2}\n{stderr}");
    assert_eq!(steps_run(&stdout2), ["student", "eval"], "{stdout2}");
    assert_ne!(std::fs::read(workdir.join("student/model.safetensors")).unwrap(), student_weights);

    // A deleted output is noticed: that step runs again (and what it feeds, if its output differs).
    std::fs::remove_file(workdir.join("eval/reports.json")).unwrap();
    let (ok, stdout, stderr) = run_recipe(&recipe, &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(steps_run(&stdout), ["eval"], "{stdout}");
}

/// The recipe wrote report.html: the two tables, a loss and a learning-rate chart per training
/// step (with the validation points), and each model's answers to the same held-out prompts.
fn check_report(workdir: &Path, stdout: &str) {
    let path = workdir.join("report.html");
    assert!(stdout.contains(&format!("report written to {}", path.display())), "{stdout}");
    let html = std::fs::read_to_string(&path).unwrap();
    for needle in
        ["<h2>Models</h2>", "<h2>Steps</h2>", "<h3>teacher</h3>", "<h3>student</h3>", "Held-out answers (eval)"]
    {
        assert!(html.contains(needle), "no `{needle}` in report.html");
    }
    assert_eq!(html.matches("<svg").count(), 4, "loss and learning rate for two training steps");
    for legend in ["total", "cross-entropy", "divergence to teacher", "validation", "learning rate"] {
        assert!(html.contains(&format!(">\n{legend}\n</text>")), "no `{legend}` text in the charts");
    }
    for outside in ["<script", "src=", "href=", "url("] {
        assert!(!html.contains(outside), "report.html is not self-contained: it has `{outside}`");
    }
    // The answers table: a header with both models, then one row per kept answer.
    let table = &html[html.find("Held-out answers").unwrap()..];
    assert!(table.contains("<th>teacher</th><th>student</th>"), "{table}");
    assert_eq!(table.matches("<tr><td><pre>").count(), kdllm::eval::ANSWERS_KEPT, "{table}");

    // `kdllm report` writes the same page again, anywhere.
    let again = workdir.join("again.html");
    let out = Command::new(env!("CARGO_BIN_EXE_kdllm"))
        .args(["report", workdir.to_str().unwrap(), "-o", again.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), html);

    // In a real browser (opt-in: where Debian's chromium is installed), with no console errors.
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("skipping the headless-browser check: no `chromium` on PATH (apt-get install chromium)");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/check_report.sh");
    let out = Command::new("bash").args([script, workdir.to_str().unwrap()]).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && workdir.join("report.png").is_file(), "{said}");
}

/// Chat prompts are rendered with the teacher's template; the rendered text is what the Parquet
/// `prompt` column holds, its ids carry the template's BOS exactly once, and a template that fails
/// to render names the prompt and shows the template's error.
#[test]
fn chat_prompts_use_the_template_and_its_special_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    tiny_teacher(&teacher);
    let cfg_path = teacher.join("tokenizer_config.json");
    let set_template = |template: &str| {
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["chat_template"] = template.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    };
    set_template(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant:{% endif %}",
    );
    let prompts = tmp.path().join("chat.jsonl");
    std::fs::write(&prompts, r#"{"id": "c1", "messages": [{"role": "user", "content": "the cat sat"}]}"#).unwrap();
    let out = generate(&gen_job(&teacher, &prompts, tmp.path().join("chat"))).unwrap();
    let set = kdllm::data::read_samples(&out.output).unwrap();
    let tok = Tokenizer::from_folder(&teacher).unwrap();
    let bos = tok.bos_id().unwrap();
    for s in &set.samples {
        assert_eq!(s.prompt, "<s>user: the cat sat\nassistant:");
        assert_eq!(s.prompt_token_ids.iter().filter(|&&id| id == bos).count(), 1, "{:?}", s.prompt_token_ids);
        assert_eq!(s.prompt_token_ids[0], bos);
    }

    set_template("{{ raise_exception('only system and user roles') }}");
    let failed = tmp.path().join("failed");
    let err = format!("{:#}", generate(&gen_job(&teacher, &prompts, failed.clone())).unwrap_err());
    assert!(err.contains("`c1`") && err.contains("only system and user roles"), "{err}");
    assert!(!failed.exists());
}

#[test]
fn two_shards_of_an_in_process_teacher_merge_into_the_unsharded_rows_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    tiny_teacher(&teacher);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts, 13); // 26 samples in batches of 8: the shards take 2 and 2 batches
    let whole = generate(&gen_job(&teacher, &prompts, tmp.path().join("whole"))).unwrap();
    let root = tmp.path().join("shards");
    for i in 0..2 {
        let mut job = gen_job(&teacher, &prompts, root.join(format!("part-of-{i}")));
        job.shard = Some(kdllm::data::Shard { index: i, count: 2 });
        let r = generate(&job).unwrap();
        assert_eq!(r.samples, [16, 10][i as usize], "shard {i} holds whole batches");
    }
    let merged = kdllm::data::read_samples(&root).unwrap();
    assert!(
        merged.samples == kdllm::data::read_samples(&whole.output).unwrap().samples,
        "same rows, same order, same bits"
    );
}

#[test]
fn an_in_process_teacher_scores_its_own_samples_as_it_sampled_them() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    tiny_teacher(&teacher);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts, 6);
    let samples = generate(&gen_job(&teacher, &prompts, tmp.path().join("samples"))).unwrap().output;
    let job = kdllm::generate::ScoreJob {
        device: Default::default(),
        teacher: teacher.display().to_string(),
        revision: None,
        tokenizer: None,
        server: Default::default(),
        data: samples.clone(),
        output: tmp.path().join("scored"),
        logprobs: 8,
        precision: Precision::F32,
        batch_size: 3,
        part_size: 5,
        overwrite: false,
        shard: None,
    };
    let report = kdllm::generate::score(&job).unwrap();
    assert_eq!(report.rows, 12);
    let (a, b) = (kdllm::data::read_samples(&samples).unwrap(), kdllm::data::read_samples(&job.output).unwrap());
    let mut worst = 0f32;
    for (s, t) in a.samples.iter().zip(&b.samples) {
        assert_eq!(
            (&s.prompt_id, &s.completion_token_ids, &s.completion),
            (&t.prompt_id, &t.completion_token_ids, &t.completion)
        );
        let pairs = s.token_logprobs.iter().zip(&t.token_logprobs);
        for (x, y) in pairs.chain(s.topk_logprobs.iter().flatten().zip(t.topk_logprobs.iter().flatten())) {
            worst = worst.max((x - y).abs());
        }
    }
    // The KV-cache decode that sampled and the full forward that scored differ only in f32
    // rounding, here of logits in the hundreds (this teacher's weights are sharpened ×8).
    assert!(worst < 1e-3, "teacher-forced log-probs differ from the sampled ones by {worst}");

    // A plain corpus: each completion scored after its prompt, with the end token.
    let corpus = tmp.path().join("corpus.jsonl");
    std::fs::write(
        &corpus,
        "{\"prompt\": \"the cat\", \"completion\": \" sat on a mat\"}\n{\"text\": \"the dog ran to a big red ball\"}\n",
    )
    .unwrap();
    let job = kdllm::generate::ScoreJob { data: corpus, output: tmp.path().join("corpus-scored"), ..job };
    kdllm::generate::score(&job).unwrap();
    let set = kdllm::data::read_samples(&job.output).unwrap();
    assert_eq!(set.samples.len(), 2);
    let tok = Tokenizer::from_folder(&teacher).unwrap();
    assert_eq!(set.samples[0].completion_token_ids.last(), tok.eos_ids().first());
    assert_eq!(set.samples[1].prompt_token_ids.len(), 1, "a bare text: its first token is the context");
    assert!(set.samples.iter().all(|s| s.topk_token_ids.iter().all(|r| r.len() == 8)));
}

/// A step with `seeds` trains once per seed into `seed-N`; eval reports one row with the mean
/// and the spread, and the seeds' runs differ.
#[test]
fn a_step_over_seeds_is_one_row_with_mean_and_spread() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("tiny.yaml");
    let workdir = tmp.path().join("run");
    write_tiny_recipe(&recipe, &workdir, 0.5);
    let text = std::fs::read_to_string(&recipe).unwrap();
    let text = text.replace("kind: distill,", "kind: distill, seeds: [3, 4],");
    std::fs::write(&recipe, text).unwrap();
    let (ok, stdout, stderr) = run_recipe(&recipe, &[]);
    assert!(ok, "{stdout}\n{stderr}");
    let student = workdir.join("student");
    let weights = |seed: u32| std::fs::read(student.join(format!("seed-{seed}/model.safetensors"))).unwrap();
    assert_ne!(weights(3), weights(4), "each seed is its own run");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(workdir.join("summary.json")).unwrap()).unwrap();
    let row = &summary["models"][1];
    assert_eq!(row["name"], "student");
    assert_eq!(row["seeds"], 2, "{row}");
    assert!(row["kl_to_teacher_std"].as_f64().is_some_and(|s| s > 0.0), "{row}");
    assert!(row["train_secs"].as_f64().is_some_and(|s| s > 0.0), "{row}");
    assert!(stdout.contains(" ±"), "the table shows the spread:\n{stdout}");
}
