//! Crash tests: a real `kdllm` child process is killed with SIGKILL during generation and during
//! training, at several points, then started again; in the end the output must be exactly what an
//! uninterrupted run writes. Deterministic kill points come from the `KDLLM_FAULT=SITE:N` hook
//! (the process SIGKILLs itself the N-th time it reaches SITE: between two file-system steps);
//! others are sent from here while the child runs.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::mock_engine::{Behaviour, Flavor, MockEngine};
use common::{kdllm_command, tiny_teacher, write_prompts};
use kdllm::data::{read_samples, DataError, Manifest, Sample};

mod common;

const PROMPTS: usize = 24;
const SAMPLES_PER_PROMPT: usize = 2;

struct Gen {
    _tmp: tempfile::TempDir,
    teacher: PathBuf,
    prompts: PathBuf,
    root: PathBuf,
}

fn setup() -> Gen {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    tiny_teacher(&teacher);
    let prompts = tmp.path().join("prompts.jsonl");
    write_prompts(&prompts, PROMPTS);
    let root = tmp.path().to_path_buf();
    Gen { _tmp: tmp, teacher, prompts, root }
}

impl Gen {
    /// `kdllm generate` into `out`: 48 samples, batches of 4, parts of 8 (6 parts); a flag in
    /// `extra` replaces the default of the same name.
    fn command(&self, out: &Path, extra: &[&str]) -> Command {
        self.command_from(self.teacher.to_str().unwrap(), out, extra)
    }

    /// The same, with `teacher` (a server's URL) as the teacher.
    fn command_from(&self, teacher: &str, out: &Path, extra: &[&str]) -> Command {
        let defaults = [
            ("--max-new-tokens", "12"),
            ("--samples-per-prompt", "2"),
            ("--batch-size", "4"),
            ("--part-size", "8"),
            ("--logprobs", "4"),
            ("--seed", "3"),
        ];
        let mut args = vec!["generate", "--teacher", teacher];
        args.extend(["--prompts", self.prompts.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        kdllm_command(&args)
    }

    fn run(&self, out: &Path, extra: &[&str], fault: Option<&str>) -> Output {
        let mut cmd = self.command(out, extra);
        if let Some(f) = fault {
            cmd.env("KDLLM_FAULT", f);
        }
        cmd.output().unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn killed(o: &Output) -> bool {
    o.status.signal() == Some(libc::SIGKILL)
}

/// Polls (every millisecond) until `done` holds or `timeout` has passed.
fn wait_for(timeout: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done() {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bytes of a trained model's weights.
fn model_bytes(student: &Path) -> Vec<u8> {
    std::fs::read(student.join("model.safetensors")).unwrap()
}

/// What must hold on disk at any moment: the manifest lists contiguous, intact parts; a reader
/// refuses the folder until it is complete.
fn check_folder_invariants(out: &Path) {
    let Some(m) = Manifest::read(out).unwrap() else {
        return; // killed before the manifest was first written: nothing was promised yet
    };
    let mut next = 0;
    for p in &m.parts {
        assert_eq!(p.start, next, "parts are contiguous: {m:?}");
        next = p.end;
        let bytes = std::fs::read(out.join(&p.file)).unwrap();
        assert_eq!(bytes.len() as u64, p.bytes, "{} has the recorded size", p.file);
    }
    if !m.is_complete() {
        assert!(matches!(read_samples(out), Err(DataError::Incomplete { .. })), "an unfinished folder is refused");
    }
}

/// Every (prompt, sample) exactly once, and the rows equal the reference run's.
fn check_exactly_once(out: &Path, reference: &[Sample]) -> usize {
    let samples = read_samples(out).unwrap().samples;
    let keys: HashSet<(String, u32)> = samples.iter().map(|s| (s.prompt_id.clone(), s.sample_index)).collect();
    assert_eq!(samples.len(), PROMPTS * SAMPLES_PER_PROMPT);
    assert_eq!(keys.len(), samples.len(), "no (prompt, sample) twice");
    assert!(samples == reference, "rows differ from the uninterrupted run's");
    samples.len()
}

#[test]
fn generation_killed_at_any_point_resumes_to_exactly_the_uninterrupted_rows() {
    let g = setup();
    let reference_dir = g.root.join("reference");
    let o = g.run(&reference_dir, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = read_samples(&reference_dir).unwrap().samples;

    // One output folder, killed again and again at different points, each run resuming the last.
    let out = g.root.join("out");
    let mut kills = 0;
    for fault in [
        "generate-batch:1", // mid-part: a .partial file is open
        "part-renamed:1",   // the part is complete but not yet in the manifest
        "generate-batch:3",
        "part-renamed:2",
        "generate-batch:2",
    ] {
        let o = g.run(&out, &[], Some(fault));
        assert!(killed(&o), "{fault}: expected SIGKILL, got {:?}: {}", o.status, stderr(&o));
        kills += 1;
        check_folder_invariants(&out);
    }
    let o = g.run(&out, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = check_exactly_once(&out, &reference);
    let again = g.run(&out, &[], None);
    assert!(again.status.success() && stderr(&again).contains("nothing to do"), "{}", stderr(&again));
    check_exactly_once(&out, &reference);
    eprintln!("generation: {kills} kills, {rows} rows checked");
}

#[test]
fn a_changed_command_is_refused_with_the_difference_unless_overwrite() {
    let g = setup();
    let out = g.root.join("out");
    assert!(g.run(&out, &[], Some("part-renamed:2")).status.code().is_none());
    let o = g.run(&out, &["--temperature", "0.5"], None);
    let err = stderr(&o);
    eprintln!("=== changed command\n{err}");
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("different command") && err.contains("sampling.temperature: 1.0 (on disk) → 0.5 (now)"),
        "{err}"
    );
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(Manifest::read(&out).unwrap().unwrap().parts.len(), 1, "the refused run touched nothing");

    let o = g.run(&out, &["--temperature", "0.5", "--overwrite"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::read(&out).unwrap().unwrap();
    assert!(m.is_complete());
    assert_eq!(m.command["sampling"]["temperature"], 0.5);
}

#[test]
fn disk_full_leaves_no_corrupt_part_and_the_rerun_completes() {
    let g = setup();
    let out = g.root.join("out");
    let reference_dir = g.root.join("reference");
    assert!(g.run(&reference_dir, &[], None).status.success());
    let reference = read_samples(&reference_dir).unwrap().samples;
    // A file-size limit makes writes fail as on a full disk (EFBIG instead of ENOSPC); SIGXFSZ
    // is ignored so the write returns the error instead of killing the process.
    let cmd = g.command(&out, &[]);
    let line: Vec<String> = std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| format!("'{}'", a.to_string_lossy())))
        .collect();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -f 8; trap '' XFSZ; exec {}", line.join(" ")))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = stderr(&o);
    eprintln!("=== disk full\n{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write") && err.contains("disk space"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    check_folder_invariants(&out);
    let o = g.run(&out, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    check_exactly_once(&out, &reference);
}

/// Kills sent from outside while the child samples, each once the manifest shows progress, so
/// they land mid-part, mid-batch or mid-write, wherever the child happens to be.
#[test]
fn generation_killed_from_outside_resumes_to_exactly_the_uninterrupted_rows() {
    let g = setup();
    write_prompts(&g.prompts, 160);
    let args = ["--samples-per-prompt", "1", "--max-new-tokens", "32", "--part-size", "8"];
    let reference_dir = g.root.join("reference");
    let t = Instant::now();
    assert!(g.run(&reference_dir, &args, None).status.success());
    let full = t.elapsed();
    let reference = read_samples(&reference_dir).unwrap().samples;

    let out = g.root.join("out");
    let mut kills = 0;
    for round in 1..=4u64 {
        let mut child = g.command(&out, &args).stderr(Stdio::null()).spawn().unwrap();
        let done_before = Manifest::read(&out).unwrap().map_or(0, |m| m.parts.len());
        // Wait for `round` more parts, then let it run on a little (a different time each round).
        let parts = || Manifest::read(&out).ok().flatten().map_or(0, |m| m.parts.len());
        wait_for(full * 4, || parts() >= done_before + round as usize);
        std::thread::sleep(Duration::from_micros(700 * round));
        let _ = child.kill();
        if child.wait().unwrap().signal() == Some(libc::SIGKILL) {
            kills += 1;
        }
        check_folder_invariants(&out);
    }
    let o = g.run(&out, &args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let samples = read_samples(&out).unwrap().samples;
    assert!(samples == reference, "rows differ from the uninterrupted run's");
    assert!(kills >= 2, "only {kills} of 4 kills landed before the child finished (a full run takes {full:?})");
    eprintln!("generation, outside kills: {kills} kills, {} rows checked", samples.len());
}

/// A server teacher: the kdllm child is killed at set points while requests are in flight, the
/// network is cut (every request fails until the retries run out) and the server restarts
/// (connections dropped, then a 503); each time the rerun continues, and the rows end up those of
/// an uninterrupted run.
#[test]
fn server_generation_killed_or_cut_off_resumes_to_exactly_the_uninterrupted_rows() {
    let g = setup();
    let tok = kdllm::tokenizer::Tokenizer::from_folder(&g.teacher).unwrap();
    let engine =
        MockEngine::start(Flavor::LlamaServer, tok, Behaviour { model: "mock/teacher".into(), ..Default::default() });
    let extra =
        ["--tokenizer", g.teacher.to_str().unwrap(), "--concurrency", "4", "--retries", "2", "--backoff-ms", "5"];
    let run = |out: &Path, fault: Option<&str>| {
        let mut cmd = g.command_from(&engine.url, out, &extra);
        if let Some(f) = fault {
            cmd.env("KDLLM_FAULT", f);
        }
        cmd.output().unwrap()
    };
    let reference_dir = g.root.join("reference");
    let o = run(&reference_dir, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = read_samples(&reference_dir).unwrap().samples;

    let out = g.root.join("out");
    for fault in ["generate-batch:3", "part-renamed:1", "generate-batch:11", "part-renamed:2"] {
        let o = run(&out, Some(fault));
        assert!(killed(&o), "{fault}: expected SIGKILL, got {:?}: {}", o.status, stderr(&o));
        check_folder_invariants(&out);
    }
    let before = Manifest::read(&out).unwrap().unwrap().done();
    engine.behave(|b| b.always_fail = Some(0));
    let o = run(&out, None);
    assert_eq!(o.status.code(), Some(1), "a cut network is an error once the retries are spent");
    assert!(stderr(&o).contains("3 tries"), "{}", stderr(&o));
    assert_eq!(Manifest::read(&out).unwrap().unwrap().done(), before, "nothing lost, nothing added");
    engine.behave(|b| {
        b.always_fail = None;
        b.failures = vec![0, 0, 503];
    });
    let o = run(&out, None);
    assert!(o.status.success(), "{}", stderr(&o));
    check_exactly_once(&out, &reference);
}

/// SIGTERM (what a scheduler sends) while requests to a slow server are in flight: the run stops
/// within a moment with the complete parts saved, exit code 130, and the rerun finishes.
#[test]
fn sigterm_during_server_generation_saves_the_parts_and_the_rerun_finishes() {
    let g = setup();
    let tok = kdllm::tokenizer::Tokenizer::from_folder(&g.teacher).unwrap();
    let b = Behaviour { model: "mock/teacher".into(), delay: Duration::from_millis(150), ..Default::default() };
    let engine = MockEngine::start(Flavor::Vllm, tok, b);
    let extra = ["--tokenizer", g.teacher.to_str().unwrap(), "--concurrency", "2"];
    let reference_dir = g.root.join("reference");
    assert!(g.command_from(&engine.url, &reference_dir, &extra).output().unwrap().status.success());
    let out = g.root.join("out");
    let mut child = g.command_from(&engine.url, &out, &extra).stderr(Stdio::null()).spawn().unwrap();
    wait_for(Duration::from_secs(60), || Manifest::read(&out).ok().flatten().is_some_and(|m| !m.parts.is_empty()));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "stopped on request");
    assert!(t.elapsed() < Duration::from_secs(5), "it took {:?} to stop", t.elapsed());
    check_folder_invariants(&out);
    assert!(!Manifest::read(&out).unwrap().unwrap().is_complete(), "stopped before the end");
    let o = g.command_from(&engine.url, &out, &extra).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    check_exactly_once(&out, &read_samples(&reference_dir).unwrap().samples);
}

/// A recipe with one distill step on `samples`; `train` is the step's `train:` mapping.
fn distill_recipe(root: &Path, name: &str, samples: &Path, teacher: &Path, train: &str) -> PathBuf {
    distill_recipe_with(root, name, samples, teacher, train, "", "{alpha: 0.5, temperature: 2.0}")
}

/// [`distill_recipe`] with `extra` keys in the step (e.g. `teacher: ...`) and the `kd:` mapping.
fn distill_recipe_with(
    root: &Path,
    name: &str,
    samples: &Path,
    teacher: &Path,
    train: &str,
    extra: &str,
    kd: &str,
) -> PathBuf {
    let recipe = root.join(format!("{name}.yaml"));
    let text = format!(
        "name: {name}\nworkdir: {}\nsteps:\n  - name: student\n    kind: distill\n    data: {}\n    tokenizer: {}\n    \
         student: {{config: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, \
         max_position_embeddings: 128, tie_word_embeddings: true}}}}\n{extra}    kd: {kd}\n    train: {train}\n",
        root.join(name).display(),
        samples.display(),
        teacher.display()
    );
    std::fs::write(&recipe, text).unwrap();
    recipe
}

fn train(recipe: &Path, fault: Option<&str>) -> Output {
    let mut cmd = kdllm_command(&["train", "--recipe", recipe.to_str().unwrap()]);
    if let Some(f) = fault {
        cmd.env("KDLLM_FAULT", f);
    }
    cmd.output().unwrap()
}

/// The losses logged per step (metrics.jsonl), without the timings.
fn losses(student: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(student.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), format!("{} {} {} {}", v["loss"], v["kl"], v["grad_norm"], v["valid_loss"]))
        })
        .collect()
}

fn samples_for_training(g: &Gen) -> PathBuf {
    let samples = g.root.join("samples");
    let o = g.run(&samples, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    samples
}

const TRAIN: &str = "{steps: 24, batch_size: 4, lr: 1.0e-2, warmup_steps: 3, valid_fraction: 0.1, eval_every: 5, \
                     log_every: 1, checkpoint_every: 4, keep_checkpoints: 2, seed: 7}";

#[test]
fn training_killed_at_any_point_resumes_to_bit_identical_weights() {
    let g = setup();
    let samples = samples_for_training(&g);
    let reference = distill_recipe(&g.root, "reference", &samples, &g.teacher, TRAIN);
    let o = train(&reference, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference_student = g.root.join("reference/student");

    let recipe = distill_recipe(&g.root, "killed", &samples, &g.teacher, TRAIN);
    let student = g.root.join("killed/student");
    let checkpoints = |s: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(s.join("checkpoints"))
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    // Each run resumes from what the one before it left.
    let mut kills = 0;
    for (fault, left) in [
        ("train-step:6", vec!["step-000004"]), // between checkpoints: steps 5 and 6 are redone
        ("checkpoint-written:2", vec!["step-000004", "step-000008", "step-000012.partial"]), // written, not renamed
        ("checkpoint-renamed:1", vec!["step-000004", "step-000008", "step-000012"]), // renamed, old not yet pruned
        ("train-step:7", vec!["step-000012", "step-000016"]), // past an epoch boundary (43 examples, batch 4)
        ("checkpoint-written:2", vec!["step-000016", "step-000020", "step-000024.partial"]), // the final one
    ] {
        let o = train(&recipe, Some(fault));
        assert!(killed(&o), "{fault}: expected SIGKILL, got {:?}: {}", o.status, stderr(&o));
        assert_eq!(checkpoints(&student), left, "after {fault}");
        kills += 1;
    }
    let o = train(&recipe, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from") && stderr(&o).contains("step 20 of 24"), "{}", stderr(&o));
    assert!(
        model_bytes(&student) == model_bytes(&reference_student),
        "resumed weights differ from the uninterrupted run's"
    );
    assert_eq!(losses(&student), losses(&reference_student), "same losses at every step, none logged twice");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("train_report.json")).unwrap()).unwrap();
    assert_eq!(report["resumed_from"], 20);
    // Finished: a rerun of the recipe does nothing.
    let o = train(&recipe, None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("up to date") && out.contains("nothing to do"), "{out}");
    eprintln!("training: {kills} kills, {} weight bytes compared", model_bytes(&student).len());
}

/// Distills with a teacher in memory and `kd`, once uninterrupted and once killed at step 6
/// (the checkpoint of step 4 holds `file`) then resumed; asserts the same weights and losses.
/// Returns the resumed student's folder.
fn killed_at_step_6_resumes_identically(g: &Gen, kd: &str, file: &str) -> PathBuf {
    let samples = samples_for_training(g);
    let extra = format!("    teacher: {}\n", g.teacher.display());
    let recipe = |name: &str| distill_recipe_with(&g.root, name, &samples, &g.teacher, TRAIN, &extra, kd);
    let o = train(&recipe("reference"), None);
    assert!(o.status.success(), "{}", stderr(&o));
    let killed_run = recipe("killed");
    let o = train(&killed_run, Some("train-step:6"));
    assert!(killed(&o), "expected SIGKILL, got {:?}: {}", o.status, stderr(&o));
    let student = g.root.join("killed/student");
    assert!(student.join("checkpoints/step-000004").join(file).is_file(), "{file} is checkpointed");
    let o = train(&killed_run, None);
    assert!(o.status.success() && stderr(&o).contains("step 4 of 24"), "{}", stderr(&o));
    let reference_student = g.root.join("reference/student");
    assert!(model_bytes(&student) == model_bytes(&reference_student), "resumed weights differ");
    assert_eq!(losses(&student), losses(&reference_student));
    student
}

/// The values of `key` in a student's metrics.jsonl.
fn logged(student: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(student.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

#[test]
fn a_teacher_in_memory_with_hidden_alignment_resumes_to_bit_identical_weights() {
    let g = setup();
    let kd = "{alpha: 0.5, divergence: jsd, beta: 0.3, hidden: {weight: 0.5, layers: [[1, 2], [0, 1]]}}";
    let student = killed_at_step_6_resumes_identically(&g, kd, "projections.safetensors");
    assert_eq!(logged(&student, "hidden").len(), 24, "the hidden-state loss is logged every step");
    // The exported model is the student alone: no projection in its weights.
    let weights = std::fs::read(student.join("model.safetensors")).unwrap();
    assert!(!String::from_utf8_lossy(&weights[..4096.min(weights.len())]).contains("hidden_projection"));
}

#[test]
fn on_policy_training_killed_between_refreshes_resumes_to_bit_identical_weights() {
    let g = setup();
    // Refreshed every 8 steps, checkpointed every 4: the kill at step 6 resumes from step 4,
    // whose sampler is the one of step 0, kept in the checkpoint.
    let kd = "{alpha: 0.5, divergence: jsd, on_policy: {lambda: 0.5, max_new_tokens: 6, refresh_every: 8}}";
    let student = killed_at_step_6_resumes_identically(&g, kd, "sampler.safetensors");
    let on_policy = logged(&student, "on_policy");
    assert!(
        (4.0..=20.0).contains(&on_policy.iter().sum()),
        "about half of 24 batches are the student's: {on_policy:?}"
    );
    // Steps 6 and 7 (counted from 0) are on-policy, written by the step-0 sampler after the
    // resume: it had to be restored from the checkpoint for the weights to match.
    assert!(on_policy[6] + on_policy[7] > 0.0, "{on_policy:?}");
}

#[test]
fn overlapped_on_policy_training_killed_resumes_to_bit_identical_weights() {
    let g = setup();
    // Refreshed every 4 steps, checkpointed every 4: overlapped, step 4's batches are written
    // during step 3 by the step-0 sampler, so the resume at step 4 must restore it rather than
    // take the weights of step 4.
    let kd = "{alpha: 0.5, divergence: reverse_kl, on_policy: {lambda: 1, max_new_tokens: 6, refresh_every: 4, \
              overlap: true}}";
    let student = killed_at_step_6_resumes_identically(&g, kd, "sampler.safetensors");
    assert!(logged(&student, "on_policy").iter().all(|&n| n == 1.0), "every batch is the student's");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_rerun_finishes_identically() {
    let g = setup();
    let samples = samples_for_training(&g);
    let long = "{steps: 400, batch_size: 4, lr: 1.0e-2, warmup_steps: 3, valid_fraction: 0.1, log_every: 1, \
                checkpoint_every: 0, seed: 7}";
    let reference = distill_recipe(&g.root, "reference", &samples, &g.teacher, long);
    assert!(train(&reference, None).status.success());
    let recipe = distill_recipe(&g.root, "stopped", &samples, &g.teacher, long);
    let student = g.root.join("stopped/student");
    let child = kdllm_command(&["train", "--recipe", recipe.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(student.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) >= 20
    });
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: checkpoint of step") && err.contains("run the same command again"), "{err}");
    let o = train(&recipe, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resuming from"), "{}", stderr(&o));
    assert!(model_bytes(&student) == model_bytes(&g.root.join("reference/student")));
}

#[test]
fn a_nan_loss_stops_with_a_checkpoint_and_can_be_resumed_skipping_bad_batches() {
    let g = setup();
    let samples = samples_for_training(&g);
    // A learning rate this large overflows the logits after the first update.
    let exploding = "{steps: 6, batch_size: 4, lr: 1.0e18, warmup_steps: 1, valid_fraction: 0.0, grad_clip: 0.0}";
    let recipe = distill_recipe(&g.root, "nan", &samples, &g.teacher, exploding);
    let o = train(&recipe, None);
    let err = stderr(&o);
    eprintln!("=== nan\n{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("became") && err.contains("at step 2") && err.contains("weights of step 1"), "{err}");
    assert!(err.contains("loss (") && err.contains("skip_nonfinite"), "{err}");
    let student = g.root.join("nan/student");
    assert!(student.join("checkpoints/step-000001/model.safetensors").is_file());
    assert!(!student.join("model.safetensors").exists(), "no final model from a failed run");

    let skipping = exploding.replace('}', ", skip_nonfinite: true}");
    let recipe = distill_recipe(&g.root, "nan", &samples, &g.teacher, &skipping);
    let o = train(&recipe, None);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming from") && err.contains("batch skipped"), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(student.join("train_report.json")).unwrap()).unwrap();
    assert_eq!(report["resumed_from"], 1);
    assert_eq!(report["skipped_steps"], 5, "{report}");
}

#[test]
fn checkpoints_of_other_settings_are_refused_with_resume_and_replaced_without() {
    let g = setup();
    let samples = samples_for_training(&g);
    let recipe = distill_recipe(&g.root, "changed", &samples, &g.teacher, TRAIN);
    assert!(killed(&train(&recipe, Some("train-step:10"))));
    let changed = distill_recipe(&g.root, "changed", &samples, &g.teacher, &TRAIN.replace("lr: 1.0e-2", "lr: 5.0e-3"));
    let o = kdllm_command(&["train", "--recipe", changed.to_str().unwrap(), "--resume"]).output().unwrap();
    let err = stderr(&o);
    eprintln!("=== resume mismatch\n{err}");
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("step-000008 is from a different run") && err.contains("train.lr: 0.01 (on disk) → 0.005 (now)"),
        "{err}"
    );
    assert!(err.contains("--resume never deletes checkpoints"), "{err}");
    assert!(g.root.join("changed/student/checkpoints/step-000008").is_dir(), "kept");

    let o = train(&changed, None);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("from a different run; starting over") && !err.contains("resuming"), "{err}");
}

/// Kills sent from outside during a longer training run, each once the log shows progress.
#[test]
fn training_killed_from_outside_resumes_to_bit_identical_weights() {
    let g = setup();
    let samples = samples_for_training(&g);
    let long = "{steps: 300, batch_size: 4, lr: 1.0e-2, warmup_steps: 3, valid_fraction: 0.1, eval_every: 50, \
                log_every: 1, checkpoint_every: 25, keep_checkpoints: 2, seed: 7}";
    let reference = distill_recipe(&g.root, "reference", &samples, &g.teacher, long);
    let t = Instant::now();
    assert!(train(&reference, None).status.success());
    let full = t.elapsed();
    let recipe = distill_recipe(&g.root, "killed", &samples, &g.teacher, long);
    let student = g.root.join("killed/student");
    let logged = || std::fs::read_to_string(student.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
    let mut kills = 0;
    for target in [40, 110, 190, 260] {
        let mut child = kdllm_command(&["train", "--recipe", recipe.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(full * 4, || logged() >= target);
        let _ = child.kill();
        if child.wait().unwrap().signal() == Some(libc::SIGKILL) {
            kills += 1;
        }
    }
    let o = train(&recipe, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(model_bytes(&student) == model_bytes(&g.root.join("reference/student")), "weights differ");
    assert_eq!(losses(&student), losses(&g.root.join("reference/student")));
    assert!(kills >= 2, "only {kills} of 4 kills landed (a full run takes {full:?})");
    eprintln!("training, outside kills: {kills} kills");
}

/// SIGTERM (what schedulers send before a kill) is handled as Ctrl-C is.
#[test]
fn sigterm_during_generation_closes_the_part_and_the_rerun_finishes_identically() {
    let g = setup();
    write_prompts(&g.prompts, 160);
    let args = ["--samples-per-prompt", "1", "--max-new-tokens", "32", "--part-size", "64"];
    let reference_dir = g.root.join("reference");
    assert!(g.run(&reference_dir, &args, None).status.success());
    let out = g.root.join("out");
    let child = g.command(&out, &args).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(Duration::from_secs(60), || Manifest::read(&out).ok().flatten().is_some_and(|m| !m.parts.is_empty()));
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted:") && err.contains("of 160 samples are complete"), "{err}");
    let m = Manifest::read(&out).unwrap().unwrap();
    // The part open at the interrupt was closed at the batch boundary, not thrown away.
    assert!(m.parts.len() >= 2 && m.done() < 160 && m.done().is_multiple_of(4), "{m:?}");
    let o = g.run(&out, &args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read_samples(&out).unwrap().samples == read_samples(&reference_dir).unwrap().samples);
}
