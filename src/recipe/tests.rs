use std::path::{Path, PathBuf};

use super::parse::Seen;
use super::*;
use crate::generate::SamplingConfig;
use crate::model::LlamaConfig;
use crate::task::TaskConfig;

#[test]
fn references_parse_into_step_and_sub_path() {
    assert_eq!(parse_ref("steps.task.output"), Some(Ok(("task", ""))));
    assert_eq!(parse_ref("steps.task.output/train.jsonl"), Some(Ok(("task", "train.jsonl"))));
    assert_eq!(parse_ref("steps.student-seq.output/a/b"), Some(Ok(("student-seq", "a/b"))));
    assert_eq!(parse_ref("data/train.jsonl"), None);
    assert_eq!(parse_ref("smollm2"), None);
    assert!(matches!(parse_ref("steps.task/train.jsonl"), Some(Err(_))));
    assert!(matches!(parse_ref("steps..output"), Some(Err(_))));
}

#[test]
fn quickstart_resolves_references_to_step_outputs() {
    let r = load(Path::new("recipes/quickstart.yaml")).unwrap();
    assert_eq!(r.workdir, PathBuf::from("runs/quickstart"));
    let kinds: Vec<StepKind> = r.steps.iter().map(Step::kind).collect();
    use StepKind::*;
    assert_eq!(kinds, [Task, Finetune, Generate, Generate, Distill, Distill, Finetune, Export, Eval]);
    assert_eq!(r.resolve("steps.task.output/train.jsonl"), PathBuf::from("runs/quickstart/task/train.jsonl"));
    assert_eq!(r.resolve("steps.teacher.output"), PathBuf::from("runs/quickstart/teacher"));
    assert_eq!(r.resolve("steps.samples.output"), PathBuf::from("runs/quickstart/samples"));
    assert_eq!(r.resolve("prompts/x.jsonl"), PathBuf::from("prompts/x.jsonl"));
    let StepConfig::Eval(eval) = &r.steps[8].config else { panic!("last step is not eval") };
    assert_eq!(eval.models.len(), 7, "four models and the student's three GGUF exports");
    assert_eq!(eval.task.as_deref(), Some("steps.task.output/test.jsonl"));
}

/// Weights of a Llama built from `cfg` with `vocab` tokens (norms included).
fn params(cfg: &LlamaConfig, vocab: usize) -> usize {
    let (c, f, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let attn = c * cfg.num_attention_heads * d * 2 + c * cfg.num_kv_heads() * d * 2;
    let layer = attn + 3 * c * f + 2 * c;
    let head = if cfg.tie_word_embeddings { 0 } else { vocab * c };
    vocab * c + cfg.num_hidden_layers * layer + c + head
}

#[test]
fn quickstart_students_are_at_least_4x_smaller_than_the_teacher() {
    let r = load(Path::new("recipes/quickstart.yaml")).unwrap();
    let vocab = match &r.steps[0].config {
        StepConfig::Task(t) => t.task.tokenizer_vocab_size,
        _ => panic!("first step is not the task"),
    };
    let StepConfig::Finetune(teacher) = &r.steps[1].config else { panic!() };
    let teacher = params(teacher.model.config.as_ref().unwrap(), vocab);
    for step in &r.steps[4..6] {
        let StepConfig::Distill(s) = &step.config else { panic!("{} is not distill", step.name) };
        let student = params(s.student.config.as_ref().unwrap(), vocab);
        assert!(4 * student <= teacher, "{}: {student} vs teacher {teacher}", step.name);
    }
    // The alpha-0 row is the sequence-level baseline of the alpha-0.5 one: nothing else differs.
    let (StepConfig::Distill(a), StepConfig::Distill(b)) = (&r.steps[4].config, &r.steps[5].config) else { panic!() };
    assert_eq!((a.kd.alpha, b.kd.alpha), (0.5, 0.0));
    assert_eq!((&a.student, &a.train, &a.data), (&b.student, &b.train, &b.data));
    // The no-teacher row: the same student and budget, on the student's own labels.
    let StepConfig::Finetune(scratch) = &r.steps[6].config else { panic!() };
    assert_eq!((&scratch.model, &scratch.train), (&a.student, &a.train));
    assert_eq!(scratch.data, "steps.task.output/student_train.jsonl");
}

#[test]
fn methods_rows_differ_only_in_the_method() {
    let r = load(Path::new("recipes/methods.yaml")).unwrap();
    let step = |name: &str| r.steps.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no step {name}"));
    let StepConfig::Finetune(scratch) = &step("student-scratch").config else { panic!() };
    assert_eq!(scratch.seeds, [0, 1, 2]);
    let rows = [
        "student-seq",
        "student-fkl",
        "student-rkl",
        "student-jsd",
        "student-skl",
        "student-exact",
        "student-hidden",
        "student-2t",
        "student-gkd",
        "student-onpolicy",
    ];
    let distill = |name: &str| match &step(name).config {
        StepConfig::Distill(d) => d.clone(),
        _ => panic!("{name} is not distill"),
    };
    for name in rows {
        let d = distill(name);
        assert_eq!(
            (&d.student, &d.train, &d.seeds, d.data.as_str()),
            (&scratch.model, &scratch.train, &scratch.seeds, "steps.samples.output"),
            "{name}"
        );
    }
    use crate::train::Divergence::*;
    assert_eq!(distill("student-seq").kd.alpha, 0.0);
    assert_eq!(distill("student-rkl").kd.divergence, ReverseKl);
    assert_eq!((distill("student-jsd").kd.divergence, distill("student-jsd").kd.beta), (Jsd, 0.5));
    assert_eq!(distill("student-skl").kd.divergence, SkewKl);
    assert!(distill("student-exact").teacher.is_some() && distill("student-exact").kd.hidden.is_none());
    assert!(distill("student-hidden").kd.hidden.is_some());
    assert_eq!(distill("student-2t").teachers.len(), 2);
    let on = |name: &str| distill(name).kd.on_policy.map(|o| o.lambda);
    assert_eq!((on("student-gkd"), distill("student-gkd").kd.divergence), (Some(0.5), Jsd));
    assert_eq!((on("student-onpolicy"), distill("student-onpolicy").kd.divergence), (Some(1.0), ReverseKl));
    // The same-wall-time row: off-policy reverse KL with more steps, nothing else changed.
    let (long, rkl) = (distill("student-rkl-long"), distill("student-rkl"));
    assert_eq!((long.train.steps, &long.kd, &long.student), (3600, &rkl.kd, &rkl.student));
    let StepConfig::Eval(eval) = &r.steps.last().unwrap().config else { panic!() };
    assert_eq!(eval.models.len(), 2 + 1 + rows.len() + 1, "both teachers, the no-teacher row and every method");
}

#[test]
fn phi_like_parses_and_validates() {
    let r = load(Path::new("recipes/phi-like.yaml")).unwrap();
    let StepConfig::Finetune(t) = &r.steps[0].config else { panic!() };
    assert_eq!(t.model.from.as_deref(), Some("smollm2"));
    assert_eq!(r.resolve("smollm2"), PathBuf::from("smollm2"));
}

#[test]
fn shipped_prompt_files_are_valid_jsonl() {
    let seed = crate::data::read_examples(Path::new("prompts/phi-seed.jsonl")).unwrap();
    assert!(seed.len() >= 30);
    let topics = std::fs::read_to_string("prompts/phi-topics.jsonl").unwrap();
    let mut ids = std::collections::HashSet::new();
    for line in topics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(ids.insert(v["id"].as_str().unwrap().to_string()));
        assert_eq!(v["messages"][0]["role"], "user");
    }
    assert!(ids.len() >= 40);
}

#[test]
fn omitted_sections_take_the_struct_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(
        &path,
        "name: d\nworkdir: w\nsteps:\n  - name: t\n    kind: task\n  - name: g\n    kind: generate\n    teacher: smollm2\n    prompts: p.txt\n",
    )
    .unwrap();
    let r = load(&path).unwrap();
    assert_eq!(r.steps[0].config, StepConfig::Task(TaskStep { _name: Seen, _kind: Seen, task: TaskConfig::default() }));
    let StepConfig::Generate(g) = &r.steps[1].config else { panic!() };
    assert_eq!(g.sampling, SamplingConfig::default());
}

#[test]
fn born_again_chains_each_student_into_the_next_teacher() {
    let r = load(Path::new("recipes/born-again.yaml")).unwrap();
    let step = |name: &str| &r.steps.iter().find(|s| s.name == name).unwrap().config;
    let StepConfig::Generate(g) = step("samples-1") else { panic!() };
    assert_eq!(g.teacher, "steps.student-1.output");
    let (StepConfig::Distill(a), StepConfig::Distill(b)) = (step("student-1"), step("student-2")) else { panic!() };
    assert_eq!((b.data.as_str(), &a.student, &a.kd, &a.train), ("steps.samples-1.output", &b.student, &b.kd, &b.train));
}

const SHIPPED: [&str; 5] = [
    "recipes/quickstart.yaml",
    "recipes/methods.yaml",
    "recipes/phi-like.yaml",
    "recipes/born-again.yaml",
    "recipes/smollm2-gguf.yaml",
];

#[test]
fn every_shipped_step_reads_back_from_its_json_and_show_loads_as_the_same_recipe() {
    for path in SHIPPED {
        let r = load(Path::new(path)).unwrap();
        for step in &r.steps {
            let back = overrides::from_json(step.kind(), step.config_json().unwrap()).unwrap();
            assert_eq!(back, step.config, "{path}: step {}", step.name);
        }
        // What `recipe show` prints loads back as the same steps, every default written out.
        let shown = r.to_yaml().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shown.yaml");
        std::fs::write(&file, &shown).unwrap();
        let again = load(&file).unwrap_or_else(|e| panic!("{path}: {e}\n{shown}"));
        assert_eq!((&again.name, &again.workdir), (&r.name, &r.workdir));
        let configs = |r: &Recipe| r.steps.iter().map(|s| (s.name.clone(), s.config.clone())).collect::<Vec<_>>();
        assert_eq!(configs(&again), configs(&r), "{path}");
        if path.ends_with("quickstart.yaml") {
            for key in ["divergence: forward_kl", "skew: 0.1", "concurrency: 8", "seeds: []"] {
                assert!(shown.contains(key), "{key} in\n{shown}");
            }
        }
    }
}

#[test]
fn set_overrides_keys_and_changes_only_their_steps_identities() {
    let path = Path::new("recipes/quickstart.yaml");
    let plain = load(path).unwrap();
    let sets = ["steps.student.kd.alpha=0.3", "steps.teacher.train.steps=500", "steps.student.kd.divergence=jsd"];
    let set = load_with(path, &sets.map(String::from)).unwrap();
    let step = |r: &Recipe, name: &str| r.steps.iter().find(|s| s.name == name).unwrap().clone();
    let (StepConfig::Distill(a), StepConfig::Distill(b)) =
        (step(&plain, "student").config, step(&set, "student").config)
    else {
        panic!("student is a distill step")
    };
    assert_eq!((a.kd.alpha, b.kd.alpha), (0.5, 0.3));
    assert_eq!(b.kd.divergence, crate::train::Divergence::Jsd);
    assert_eq!(b.train, a.train, "the other keys are kept");
    let StepConfig::Finetune(t) = step(&set, "teacher").config else { panic!("teacher is a finetune step") };
    assert_eq!(t.train.steps, 500);
    for s in &plain.steps {
        let changed = plain.identity(s).unwrap() != set.identity(&step(&set, &s.name)).unwrap();
        assert_eq!(changed, s.name == "student" || s.name == "teacher", "step {}", s.name);
    }
    let w = load_with(path, &["workdir=runs/other".to_string()]).unwrap();
    assert_eq!(w.output(&w.steps[0]), PathBuf::from("runs/other/task"));
}

#[test]
fn bad_sets_name_the_flag_and_the_key() {
    let path = Path::new("recipes/quickstart.yaml");
    let err = |set: &str| load_with(path, &[set.to_string()]).unwrap_err().to_string();
    let cases: [(&str, &[&str]); 9] = [
        ("steps.student.kd.alpha", &["no `=`", "KEY=VALUE"]),
        ("steps.studnet.kd.alpha=0.3", &["no step named `studnet`", "student-seq"]),
        ("steps.student.kd.alphaa=0.3", &["`kd.alphaa`", "unknown field `alphaa`"]),
        ("steps.student.kd.alpha=abc", &["`kd.alpha`", "invalid type: string \"abc\""]),
        ("steps.student.student.config.hiden_size=3", &["`student.config.hiden_size`", "unknown field `hiden_size`"]),
        ("steps.student.kd.alpha.x=1", &["`kd.alpha.x`", "holds a value"]),
        ("train.steps=5", &["`train.steps` is not a recipe key", "steps.NAME.KEY"]),
        ("workdir=5", &["`workdir` takes a string"]),
        ("steps.student.kd.alpha=", &["no value after `=`"]),
    ];
    for (set, wanted) in cases {
        let e = err(set);
        assert!(e.starts_with(&format!("recipes/quickstart.yaml: --set {set}: ")), "{e}");
        for w in wanted {
            assert!(e.contains(w), "--set {set}: `{w}` missing in: {e}");
        }
    }
    // A value out of bounds: the check of the file, naming the flag rather than a line.
    let e = err("steps.student.kd.alpha=1.5");
    assert!(
        e.starts_with(
            "recipes/quickstart.yaml: --set steps.student.kd.alpha=1.5: step `student`: `kd.alpha` must be in [0, 1]"
        ),
        "{e}"
    );
}
