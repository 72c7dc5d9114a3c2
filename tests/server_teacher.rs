//! Server teachers against a stand-in engine (`common/mock_engine.rs`) that answers in the shapes
//! of llama-server, vLLM, SGLang and a plain OpenAI-compatible server: the rows they give,
//! scoring, concurrency, retries, a model switch, shards.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::mock_engine::{Flavor, Lm, ServerSetup};
use kdllm::data::{read_samples, Manifest, Sample, SampleSet, Shard};
use kdllm::engine::ServerOptions;
use kdllm::generate::{generate, score, GenerateJob, SamplingConfig, ScoreJob};
use kdllm::model::Precision;
use kdllm::teacher::Remote;
use kdllm::tokenizer::Tokenizer;
use kdllm::train::batch::Sequence;
use kdllm::train::on_policy::Grader;
use kdllm::train::{
    distill, DistillJob, Divergence, KdConfig, ModelInit, OnPolicyConfig, Resume, TrainConfig, TrainReport,
};

const PROMPTS: usize = 10;

fn setup() -> ServerSetup {
    ServerSetup::new(PROMPTS)
}

impl ServerSetup {
    fn job(&self, teacher: &str, out: &Path) -> GenerateJob {
        GenerateJob {
            device: Default::default(),
            teacher: teacher.to_string(),
            revision: None,
            tokenizer: Some(self.teacher.display().to_string()),
            server: ServerOptions { concurrency: 4, retries: 3, backoff_ms: 5, ..Default::default() },
            prompts: self.prompts.clone(),
            output: out.to_path_buf(),
            sampling: SamplingConfig {
                max_new_tokens: 10,
                samples_per_prompt: 2,
                logprobs: 4,
                seed: 7,
                ..Default::default()
            },
            precision: Precision::F32,
            long_prompts: Default::default(),
            part_size: 6,
            overwrite: false,
            shard: None,
        }
    }
}

impl ServerSetup {
    fn score_job(&self, teacher: &str, data: &Path, out: &Path) -> ScoreJob {
        ScoreJob {
            device: Default::default(),
            teacher: teacher.to_string(),
            revision: None,
            tokenizer: Some(self.teacher.display().to_string()),
            server: ServerOptions { concurrency: 3, ..Default::default() },
            data: data.to_path_buf(),
            output: out.to_path_buf(),
            logprobs: 4,
            precision: Precision::F32,
            batch_size: 4,
            part_size: 5,
            overwrite: false,
            shard: None,
        }
    }
}

/// What the toy model draws for a prompt with the seed kdllm sends for (prompt, sample).
fn expected(tok: &Tokenizer, s: &Sample, seed: u64) -> Vec<u32> {
    let lm = Lm::new(tok, false);
    let request_seed = kdllm::engine::request_seed(kdllm::generate::row_seed(seed, &s.prompt_id, s.sample_index));
    lm.sample(&s.prompt_token_ids, 1.0, request_seed, 10, None).0
}

/// A row as the tests compare it: id, sample, ids, log-probs, top-k ids.
type Row = (String, u32, Vec<u32>, Vec<f32>, Vec<Vec<u32>>);

fn rows(set: &SampleSet) -> Vec<Row> {
    set.samples
        .iter()
        .map(|s| {
            (
                s.prompt_id.clone(),
                s.sample_index,
                s.completion_token_ids.clone(),
                s.token_logprobs.clone(),
                s.topk_token_ids.clone(),
            )
        })
        .collect()
}

#[test]
fn every_engine_gives_the_rows_the_model_drew_in_the_same_parquet() {
    let t = setup();
    let mut all = Vec::new();
    for flavor in [Flavor::LlamaServer, Flavor::Vllm, Flavor::Sglang] {
        let engine = t.engine(flavor, |_| {});
        let out = t.path(&format!("{flavor:?}"));
        let report = generate(&t.job(&engine.url, &out)).unwrap();
        assert_eq!(report.samples, 2 * PROMPTS);
        let set = read_samples(&out).unwrap();
        assert_eq!(set.samples.len(), 2 * PROMPTS);
        assert_eq!(set.meta.logprobs_k, 4);
        let server = set.meta.server.clone().expect("the Parquet metadata names the engine");
        assert_eq!(server["model"], "mock/teacher");
        let m = Manifest::read(&out).unwrap().unwrap();
        assert_eq!(m.teacher_info.as_ref().map(|i| i["engine"].clone()), Some(server["engine"].clone()));
        for s in &set.samples {
            assert_eq!(
                s.completion_token_ids,
                expected(&t.tok, s, 7),
                "{flavor:?}: {}#{}",
                s.prompt_id,
                s.sample_index
            );
            assert_eq!(s.teacher, "mock/teacher");
            assert!(s.topk_logprobs.iter().all(|r| r.len() == 4 && r.windows(2).all(|w| w[0] >= w[1])));
            let stopped = s.completion_token_ids.last() == Some(&t.tok.eos_ids()[0]);
            assert_eq!(s.finish_reason == kdllm::data::FinishReason::Stop, stopped);
            assert_eq!(
                s.completion,
                t.tok.decode(&s.completion_token_ids[..s.completion_token_ids.len() - usize::from(stopped)]).unwrap()
            );
        }
        assert!(
            set.samples.iter().any(|s| s.finish_reason == kdllm::data::FinishReason::Stop),
            "some rows end with the end token"
        );
        all.push(rows(&set));
    }
    assert!(all.windows(2).all(|w| w[0] == w[1]), "llama-server, vLLM and SGLang answers make the same rows");
}

#[test]
fn scoring_through_each_engine_gives_the_sampled_log_probs_back() {
    let t = setup();
    let engine = t.engine(Flavor::Vllm, |_| {});
    let samples = t.path("samples");
    generate(&t.job(&engine.url, &samples)).unwrap();
    let sampled = read_samples(&samples).unwrap();
    for flavor in [Flavor::LlamaServer, Flavor::Vllm, Flavor::Sglang] {
        let engine = t.engine(flavor, |_| {});
        let out = t.path(&format!("scored-{flavor:?}"));
        let report = score(&t.score_job(&engine.url, &samples, &out)).unwrap();
        assert_eq!(report.rows, 2 * PROMPTS);
        let scored = read_samples(&out).unwrap();
        assert_eq!(rows(&scored), rows(&sampled), "{flavor:?}: teacher-forced log-probs are the sampled ones");
    }
    // A server without prompt log-probs cannot score: said at the first row, nothing written.
    let plain = t.engine(Flavor::Openai, |_| {});
    let err = format!("{:#}", score(&t.score_job(&plain.url, &samples, &t.path("scored-openai"))).unwrap_err());
    assert!(err.contains("cannot score given text") && err.contains("vLLM"), "{err}");
}

#[test]
fn at_most_concurrency_requests_are_in_flight_and_they_do_overlap() {
    let t = setup();
    let engine = t.engine(Flavor::LlamaServer, |b| b.delay = Duration::from_millis(40));
    let mut job = t.job(&engine.url, &t.path("c"));
    job.server.concurrency = 3;
    generate(&job).unwrap();
    let max = engine.state.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "{max} requests were in flight at once with --concurrency 3");
}

#[test]
fn transient_failures_are_retried_and_persistent_ones_say_how_many_tries() {
    let t = setup();
    // A 503, a 429, a dropped connection and a 502 before the first answer: all retried.
    let engine = t.engine(Flavor::Vllm, |b| b.failures = vec![503, 429, 0, 502]);
    let out = t.path("flaky");
    generate(&t.job(&engine.url, &out)).unwrap();
    let clean = t.engine(Flavor::Vllm, |_| {});
    let reference = t.path("clean");
    generate(&t.job(&clean.url, &reference)).unwrap();
    assert_eq!(rows(&read_samples(&out).unwrap()), rows(&read_samples(&reference).unwrap()));

    let down = t.engine(Flavor::Vllm, |b| b.always_fail = Some(503));
    let mut job = t.job(&down.url, &t.path("down"));
    job.server.retries = 2;
    let err = format!("{:#}", generate(&job).unwrap_err());
    assert!(err.contains("3 tries") && err.contains("HTTP 503") && err.contains(&down.url.replace("/v1", "")), "{err}");
    assert!(Manifest::read(&t.path("down")).unwrap().unwrap().parts.is_empty(), "no part was written");
}

#[test]
fn a_model_switch_mid_run_stops_the_run_and_the_rerun_names_the_difference() {
    let t = setup();
    let engine = t.engine(Flavor::LlamaServer, |b| b.switch_after = Some((9, "mock/other".into())));
    let out = t.path("switch");
    let mut job = t.job(&engine.url, &out);
    job.server.concurrency = 1;
    let err = format!("{:#}", generate(&job).unwrap_err());
    assert!(err.contains("now serves `mock/other`") && err.contains("`mock/teacher`"), "{err}");
    let kept = Manifest::read(&out).unwrap().unwrap();
    assert_eq!(kept.done(), 6, "the part written before the switch is kept; the one during it is not");
    let err = format!("{:#}", generate(&job).unwrap_err());
    assert!(err.contains("teacher.server_model: \"mock/teacher\" (on disk) → \"mock/other\" (now)"), "{err}");
}

#[test]
fn shards_of_a_server_job_merge_into_the_unsharded_rows() {
    let t = setup();
    let engine = t.engine(Flavor::Sglang, |_| {});
    let whole = t.path("whole");
    generate(&t.job(&engine.url, &whole)).unwrap();
    let root = t.path("shards");
    for i in 0..3 {
        let mut job = t.job(&engine.url, &root.join(format!("shard-{i}")));
        job.shard = Some(Shard { index: i, count: 3 });
        job.sampling.batch_size = 4;
        generate(&job).unwrap();
    }
    let mut whole_job = t.job(&engine.url, &t.path("whole4"));
    whole_job.sampling.batch_size = 4;
    generate(&whole_job).unwrap();
    assert_eq!(read_samples(&root).unwrap().samples, read_samples(&t.path("whole4")).unwrap().samples);
    assert_eq!(rows(&read_samples(&root).unwrap()), rows(&read_samples(&whole).unwrap()));
}

#[test]
fn a_tokenizer_from_the_model_id_the_server_reports() {
    let t = setup();
    // llama-server reports the model as the path it was started with: a folder here.
    let engine = t.engine(Flavor::LlamaServer, |b| b.model = t.teacher.display().to_string());
    let mut job = t.job(&engine.url, &t.path("by-id"));
    job.tokenizer = None;
    generate(&job).unwrap();
    assert_eq!(read_samples(&t.path("by-id")).unwrap().meta.tokenizer_hash, t.tok.vocab_hash());
    // An id that names nothing here needs --tokenizer.
    let unknown = t.engine(Flavor::LlamaServer, |b| b.model = "/models/elsewhere/model.gguf".into());
    let mut job = t.job(&unknown.url, &t.path("unknown"));
    job.tokenizer = None;
    let err = format!("{:#}", generate(&job).unwrap_err());
    assert!(err.contains("serves `/models/elsewhere/model.gguf`") && err.contains("--tokenizer"), "{err}");
}

#[test]
fn a_server_of_token_strings_maps_them_back_or_refuses_what_is_ambiguous() {
    let t = setup();
    // Byte tokens that are not whole characters all read "�": such a token cannot be mapped.
    let engine = t.engine(Flavor::Openai, |_| {});
    let err = format!("{:#}", generate(&t.job(&engine.url, &t.path("ambiguous"))).unwrap_err());
    assert!(err.contains("\"�\", which is the text of") && err.contains("token ids"), "{err}");
    assert!(Manifest::read(&t.path("ambiguous")).unwrap().unwrap().parts.is_empty());
    // Where every token's text is its own, the strings map back to the ids exactly.
    let strings = t.engine(Flavor::Openai, |b| b.unambiguous_only = true);
    generate(&t.job(&strings.url, &t.path("strings"))).unwrap();
    let ids = t.engine(Flavor::Vllm, |b| b.unambiguous_only = true);
    generate(&t.job(&ids.url, &t.path("ids"))).unwrap();
    assert_eq!(rows(&read_samples(&t.path("strings")).unwrap()), rows(&read_samples(&t.path("ids")).unwrap()));
}

#[test]
fn a_recipe_step_samples_and_scores_through_a_server() {
    let t = setup();
    let engine = t.engine(Flavor::LlamaServer, |_| {});
    let recipe = t.path("server.yaml");
    let workdir = t.path("run");
    std::fs::write(
        &recipe,
        format!(
            "name: server\nworkdir: {}\nsteps:\n\
             - {{name: samples, kind: generate, teacher: {url}, tokenizer: {tok}, prompts: {prompts}, server: {{concurrency: 2}}, sampling: {{max_new_tokens: 6, logprobs: 3}}}}\n\
             - {{name: scored, kind: score, teacher: {url}, tokenizer: {tok}, data: steps.samples.output, logprobs: 3}}\n",
            workdir.display(),
            url = engine.url,
            tok = t.teacher.display(),
            prompts = t.prompts.display()
        ),
    )
    .unwrap();
    let (ok, stderr) = common::kdllm(&["train", "--recipe", recipe.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let (a, b) = (read_samples(&workdir.join("samples")).unwrap(), read_samples(&workdir.join("scored")).unwrap());
    assert_eq!(rows(&a), rows(&b));
    assert_eq!(a.meta.server.unwrap()["engine"], "llama-server");
}

/// A distill job whose on-policy batches (all of them, λ = 1) are graded by the server at `url`.
fn on_policy_job(t: &ServerSetup, url: &str, data: &Path, name: &str, overlap: bool) -> DistillJob {
    let config = serde_json::from_value(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": true,
    }))
    .unwrap();
    let on_policy = OnPolicyConfig { lambda: 1.0, max_new_tokens: 6, refresh_every: 2, overlap, ..Default::default() };
    DistillJob {
        device: Default::default(),
        data: data.to_path_buf(),
        teacher: Some(url.to_string()),
        teachers: Vec::new(),
        server: ServerOptions { concurrency: 3, ..Default::default() },
        student: ModelInit { from: None, config: Some(config), layers: None },
        tokenizer: Some(t.teacher.clone()),
        kd: KdConfig { divergence: Divergence::ReverseKl, on_policy: Some(on_policy), ..Default::default() },
        train: TrainConfig { steps: 8, batch_size: 3, lr: 5e-2, valid_fraction: 0.0, ..Default::default() },
        output: t.path(name),
        resume: Resume::Auto,
    }
}

#[test]
fn a_server_grades_the_students_batches_with_the_models_log_probs() {
    let t = setup();
    let lm = Lm::new(&t.tok, false);
    let prompt = t.tok.encode("p3", true).unwrap();
    let completion: Vec<u32> = vec![40, 7, 123, 9, t.tok.eos_ids()[0]];
    for flavor in [Flavor::Vllm, Flavor::Sglang] {
        let engine = t.engine(flavor, |_| {});
        let opts = ServerOptions::default();
        let (runtime, server) = Remote::start(&engine.url, &opts).unwrap();
        let grader = Grader { remote: Remote::new(runtime, server, t.tok.clone(), "tiny", &opts).unwrap(), k: 4 };
        let mut ids = prompt.clone();
        ids.extend(&completion);
        let mut seqs = vec![Sequence { ids: ids.clone(), loss_from: prompt.len(), teacher: None }; 2];
        grader.grade(&mut seqs).unwrap();
        let graded = seqs[1].teacher.as_ref().expect("graded");
        assert_eq!(graded.ids.len(), completion.len());
        for (i, (got_ids, got_lp)) in graded.ids.iter().zip(&graded.logprobs).enumerate() {
            let want = lm.top(&lm.logprobs(&ids[..prompt.len() + i]), 4);
            assert_eq!(got_ids, &want.iter().map(|w| w.0).collect::<Vec<_>>(), "{flavor:?}: position {i}");
            for (g, w) in got_lp.iter().zip(&want) {
                assert!((g - w.1).abs() < 1e-5, "{flavor:?}: position {i}: {g} against {}", w.1);
            }
        }
    }
}

#[test]
fn on_policy_distillation_graded_on_a_vllm_server() {
    let t = setup();
    let engine = t.engine(Flavor::Vllm, |_| {});
    let samples = t.path("samples");
    generate(&t.job(&engine.url, &samples)).unwrap();
    let bytes = |r: &TrainReport| std::fs::read(r.output.join("model.safetensors")).unwrap();
    let a = distill(&on_policy_job(&t, &engine.url, &samples, "a", false)).unwrap();
    assert!(a.final_loss.is_finite() && a.sample_secs > 0.0 && a.teacher_secs > 0.0);
    let metrics = std::fs::read_to_string(a.output.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().all(|l| l.contains("\"on_policy\":1")), "{metrics}");
    // Another server of the same model grades the same batches the same way.
    let other = t.engine(Flavor::Vllm, |_| {});
    let b = distill(&on_policy_job(&t, &other.url, &samples, "b", false)).unwrap();
    assert!(bytes(&a) == bytes(&b), "a server-graded run is a function of its settings");
    // Overlapped, the batches come from the sampler of a step earlier: another run.
    let c = distill(&on_policy_job(&t, &engine.url, &samples, "c", true)).unwrap();
    assert!(c.final_loss.is_finite() && bytes(&c) != bytes(&a), "{} {}", c.final_loss, a.final_loss);

    // llama-server cannot return a given text's log-probs in one request: refused before training.
    let llama = t.engine(Flavor::LlamaServer, |_| {});
    let err = format!("{:#}", distill(&on_policy_job(&t, &llama.url, &samples, "d", false)).unwrap_err());
    assert!(err.contains("is llama-server") && err.contains("vLLM (`prompt_logprobs`)"), "{err}");
    assert!(!t.path("d").join("model.safetensors").exists());
}

/// Timing, not a check (run with `--ignored --nocapture`): against a server that takes 50 ms a
/// request, the wall time of on-policy training (a 3.4M student, 16 rows a step) with the batches graded
/// in line and overlapped.
#[test]
#[ignore]
fn overlap_timing_against_a_slow_server() {
    let t = setup();
    let engine = t.engine(Flavor::Vllm, |_| {});
    let samples = t.path("samples");
    generate(&t.job(&engine.url, &samples)).unwrap();
    let slow = t.engine(Flavor::Vllm, |b| b.delay = Duration::from_millis(50));
    for overlap in [false, true] {
        let mut job = on_policy_job(&t, &slow.url, &samples, &format!("overlap-{overlap}"), overlap);
        job.train.steps = 30;
        job.train.batch_size = 16;
        job.server.concurrency = 16;
        job.student.config = Some(
            serde_json::from_value(serde_json::json!({
                "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
                "max_position_embeddings": 64, "tie_word_embeddings": true,
            }))
            .unwrap(),
        );
        let r = distill(&job).unwrap();
        eprintln!(
            "overlap {overlap}: {:.2} s wall, {:.2} s sampling, {:.2} s waiting for the grades",
            r.wall_secs, r.sample_secs, r.teacher_secs
        );
    }
}
