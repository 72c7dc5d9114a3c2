//! Every way a recipe can be wrong must be reported with the file, the line and column, and the
//! key or step at fault.

use std::path::{Path, PathBuf};

use kdllm::recipe;

const HEAD: &str = "name: t\nworkdir: runs/t\nsteps:\n";

const TASK: &str = "  - name: task\n    kind: task\n";

const TEACHER: &str = concat!(
    "  - name: teacher\n",
    "    kind: finetune\n",
    "    data: steps.task.output/train.jsonl\n",
    "    tokenizer: steps.task.output\n",
    "    model:\n",
    "      config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}\n",
);

/// Writes `text` as `recipe.yaml` in a fresh folder and returns the load error.
fn error_of(text: &str) -> (String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let err = recipe::load(&path).expect_err("the recipe should be rejected").to_string();
    (err, path)
}

fn assert_at(text: &str, line: usize, column: usize, needles: &[&str]) {
    assert_starts(text, &format!("{line}:{column}: "), needles);
}

/// The error starts with `recipe.yaml:` then `place` and holds every needle.
fn assert_starts(text: &str, place: &str, needles: &[&str]) {
    let (err, path) = error_of(text);
    let prefix = format!("{}:{place}", path.display());
    assert!(err.starts_with(&prefix), "expected `{prefix}...`, got:\n{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }
}

#[test]
fn a_valid_recipe_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, format!("{HEAD}{TASK}{TEACHER}")).unwrap();
    let r = recipe::load(&path).unwrap();
    assert_eq!(r.steps.len(), 2);
}

#[test]
fn malformed_yaml_gives_line_and_column() {
    let (err, path) = error_of("name: t\nworkdir: runs/t\nsteps:\n  - name: task\n    kind: [task\n");
    assert!(err.starts_with(&format!("{}:", path.display())), "{err}");
    let line: usize = err[path.display().to_string().len() + 1..].split(':').next().unwrap().parse().unwrap();
    assert!(line >= 5, "{err}");
}

#[test]
fn bad_indentation_gives_line_and_column() {
    let (err, path) = error_of("name: t\nworkdir: runs/t\nsteps:\n  - name: task\n    kind: task\n   oops: 1\n");
    assert!(err.starts_with(&format!("{}:6:", path.display())), "{err}");
}

#[test]
fn unknown_top_level_key() {
    assert_at("name: t\nworkdir: runs/t\nstepz: []\n", 3, 1, &["unknown field `stepz`", "steps"]);
}

#[test]
fn unknown_key_inside_train_points_at_the_key() {
    let text = format!("{HEAD}{TASK}{TEACHER}    train:\n      steps: 10\n      lrr: 0.1\n");
    assert_at(&text, 14, 7, &["unknown field `lrr`", "lr", "lrr: 0.1"]);
}

#[test]
fn key_of_another_kind_in_a_step() {
    let text = format!("{HEAD}{TASK}{TEACHER}    prompts: p.jsonl\n");
    assert_at(&text, 12, 5, &["unknown field `prompts`", "data"]);
}

#[test]
fn unknown_key_inside_the_model_init() {
    let text =
        format!("{HEAD}{TASK}  - name: s\n    kind: finetune\n    data: d.jsonl\n    model: {{form: smollm2}}\n");
    assert_at(&text, 9, 13, &["unknown field `form`", "from"]);
}

#[test]
fn typo_inside_a_model_config_points_at_the_key() {
    let text = format!(
        "{HEAD}{TASK}  - name: s\n    kind: finetune\n    data: d.jsonl\n    tokenizer: t\n    model:\n      config:\n        hidden_size: 8\n        tie_word_embedding: true\n"
    );
    assert_at(&text, 13, 9, &["unknown field `tie_word_embedding`", "tie_word_embeddings"]);
}

#[test]
fn steps_of_the_wrong_type() {
    assert_at("name: t\nworkdir: runs/t\nsteps: \"ten\"\n", 3, 8, &["`steps`: "]);
}

#[test]
fn number_of_the_wrong_type_inside_train() {
    let text = format!("{HEAD}{TASK}{TEACHER}    train:\n      steps: ten\n");
    assert_at(&text, 13, 14, &["`steps`: invalid u64", "steps: ten"]);
}

#[test]
fn wrong_type_in_a_flow_mapping_names_the_key() {
    let text = format!("{HEAD}{TASK}{TEACHER}    train: {{steps: 1, lr: fast}}\n");
    assert_at(&text, 12, 27, &["`lr`: "]);
}

#[test]
fn unknown_step_kind() {
    assert_at(&format!("{HEAD}  - name: task\n    kind: tusk\n"), 5, 11, &["tusk", "task"]);
}

#[test]
fn step_without_kind() {
    assert_at(&format!("{HEAD}  - name: task\n"), 4, 5, &["missing field `kind`"]);
}

#[test]
fn reference_to_an_unknown_step() {
    let text = format!("{HEAD}{TASK}{}", TEACHER.replace("steps.task.output/train", "steps.tsak.output/train"));
    assert_at(
        &text,
        8,
        11,
        &["step `teacher`", "`data: steps.tsak.output/train.jsonl`", "no step named `tsak`", "task"],
    );
}

#[test]
fn reference_error_points_at_its_own_key() {
    // `tokenizer` is wrong, `data` (same prefix, earlier line) is right.
    let text =
        format!("{HEAD}{TASK}{}", TEACHER.replace("tokenizer: steps.task.output", "tokenizer: steps.nope.output"));
    assert_at(&text, 9, 16, &["`tokenizer: steps.nope.output`"]);
    let text = format!("{HEAD}{TASK}  - name: e\n    kind: eval\n    models: [steps.task.output, steps.later.output]\n    data: d.jsonl\n");
    assert_at(&text, 8, 33, &["`models: steps.later.output`", "no step named `later`"]);
}

#[test]
fn reference_to_a_later_step() {
    let text = format!("{HEAD}{TEACHER}{TASK}");
    assert_at(&text, 6, 11, &["step `teacher`", "steps.task.output", "runs later"]);
}

#[test]
fn reference_to_itself() {
    let text = format!("{HEAD}{TASK}{}", TEACHER.replace("steps.task.output/train", "steps.teacher.output/train"));
    assert_at(&text, 8, 11, &["step `teacher`", "itself"]);
}

#[test]
fn malformed_reference() {
    let text = format!("{HEAD}{TASK}{}", TEACHER.replace("steps.task.output/train", "steps.task/train"));
    assert_at(&text, 8, 11, &["`data`", "steps.NAME.output"]);
}

#[test]
fn duplicate_step_name() {
    assert_at(&format!("{HEAD}{TASK}{TASK}"), 6, 5, &["step `task`", "line 4", "unique"]);
}

#[test]
fn step_name_that_cannot_be_a_folder() {
    assert_at(&format!("{HEAD}  - name: a/b\n    kind: task\n"), 4, 5, &["step `a/b`", "letters, digits"]);
}

#[test]
fn model_with_both_from_and_config() {
    let text = format!("{HEAD}{TASK}{}", TEACHER.replace("model:\n", "model:\n      from: smollm2\n"));
    assert_at(&text, 10, 5, &["`model` needs exactly one of `from`", "`config`"]);
}

#[test]
fn model_from_config_without_tokenizer() {
    let text = format!("{HEAD}{TASK}{}", TEACHER.replace("    tokenizer: steps.task.output\n", ""));
    assert_at(&text, 9, 5, &["needs a `tokenizer`"]);
}

#[test]
fn missing_top_level_key() {
    let (err, path) = error_of("name: t\nsteps: []\n");
    // serde-saphyr places a missing key at the end of the mapping.
    assert!(err.starts_with(&format!("{}:2:1: missing field `workdir`", path.display())), "{err}");
}

#[test]
fn eval_without_models() {
    let text = format!("{HEAD}{TASK}  - name: e\n    kind: eval\n    models: []\n    data: d.jsonl\n");
    assert_at(&text, 8, 5, &["step `e`", "`models` is empty"]);
}

#[test]
fn no_steps() {
    let (err, _) = error_of("name: t\nworkdir: w\nsteps: []\n");
    assert!(err.contains("no `steps`"), "{err}");
}

#[test]
fn missing_file_is_named() {
    let err = recipe::load(Path::new("recipes/does-not-exist.yaml")).unwrap_err().to_string();
    assert!(err.contains("cannot read recipe recipes/does-not-exist.yaml"), "{err}");
}

#[test]
fn shipped_recipes_load() {
    for path in ["recipes/quickstart.yaml", "recipes/phi-like.yaml"] {
        if let Err(e) = recipe::load(Path::new(path)) {
            panic!("{path}: {e}");
        }
    }
}

/// A distill step after task → teacher → samples; its `kd:` block is `kd`, plus `extra` keys.
fn distill_recipe(extra: &str, kd: &str) -> String {
    format!(
        "{HEAD}{TASK}{TEACHER}{}{}{extra}    kd:\n{kd}",
        concat!(
            "  - name: samples\n",
            "    kind: generate\n",
            "    teacher: steps.teacher.output\n",
            "    prompts: steps.task.output/prompts.jsonl\n",
        ),
        concat!(
            "  - name: student\n",
            "    kind: distill\n",
            "    data: steps.samples.output\n",
            "    tokenizer: steps.teacher.output\n",
            "    student:\n",
            "      config: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}\n",
        ),
    )
}

/// The error starts with `recipe.yaml:line:` and holds every needle.
fn assert_line(text: &str, line: usize, needles: &[&str]) {
    assert_starts(text, &format!("{line}:"), needles);
}

#[test]
fn a_distill_step_with_every_method_key_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.yaml");
    let text = distill_recipe(
        "    teacher: steps.teacher.output\n    teachers: [{data: steps.samples.output, weight: 2}]\n",
        "      divergence: jsd\n      beta: 0.3\n      skew: 0.2\n      hidden: {weight: 0.5, layers: [[2, 1], [0, 0]], loss: cosine}\n",
    );
    std::fs::write(&path, text).unwrap();
    recipe::load(&path).unwrap();
}

#[test]
fn unknown_divergence() {
    assert_line(&distill_recipe("", "      divergence: kl\n"), 23, &["`kl`", "forward_kl", "reverse_kl", "jsd", "akl"]);
}

#[test]
fn beta_and_skew_outside_zero_one() {
    assert_line(
        &distill_recipe("", "      divergence: jsd\n      beta: 1.5\n"),
        24,
        &["`kd.beta`", "[0, 1]", "got 1.5"],
    );
    assert_line(&distill_recipe("", "      skew: -0.1\n"), 23, &["`kd.skew`", "[0, 1]", "got -0.1"]);
}

#[test]
fn hidden_alignment_without_a_teacher_in_memory() {
    assert_line(&distill_recipe("", "      hidden: {layers: [[1, 1]]}\n"), 23, &["`kd.hidden`", "`teacher:`"]);
}

#[test]
fn a_hidden_layer_beyond_either_model() {
    let teacher = "    teacher: steps.teacher.output\n";
    // The teacher has 1 decoder layer (layers 0..=1), the student 2 (0..=2).
    assert_line(
        &distill_recipe(teacher, "      hidden: {layers: [[1, 1], [2, 5]]}\n"),
        24,
        &["`kd.hidden.layers[1]`", "teacher layer 5", "0 (embeddings) to 1"],
    );
    assert_line(
        &distill_recipe(teacher, "      hidden: {layers: [[3, 1]]}\n"),
        24,
        &["`kd.hidden.layers[0]`", "student layer 3", "0 (embeddings) to 2"],
    );
}

#[test]
fn teachers_with_different_tokenizers() {
    let other = concat!(
        "  - name: task2\n    kind: task\n    task: {seed: 1}\n",
        "  - name: teacher2\n    kind: finetune\n    data: steps.task2.output/train.jsonl\n    tokenizer: steps.task2.output\n",
        "    model:\n      config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2}\n",
        "  - name: samples2\n    kind: generate\n    teacher: steps.teacher2.output\n    prompts: steps.task2.output/prompts.jsonl\n",
    );
    let text = distill_recipe(
        "    teachers:\n      - {data: steps.samples.output}\n      - {data: steps.samples2.output}\n",
        "      alpha: 0.5\n",
    )
    .replacen("  - name: student\n", &format!("{other}  - name: student\n"), 1);
    assert_line(&text, 35, &["`teachers`", "different tokenizers", "steps.task.output", "steps.task2.output"]);
}

#[test]
fn teacher_weights_negative_or_summing_to_zero() {
    let two = |a: &str, b: &str| {
        format!("    teachers:\n      - {{data: steps.samples.output, weight: {a}}}\n      - {{data: steps.samples.output, weight: {b}}}\n")
    };
    assert_line(
        &distill_recipe(&two("1", "-0.5"), "      alpha: 0.5\n"),
        24,
        &["`teachers[1].weight`", "≥ 0", "got -0.5"],
    );
    assert_line(
        &distill_recipe(&two("0", "0"), "      alpha: 0.5\n"),
        22,
        &["`teachers`", "sum to more than 0", "got 0"],
    );
}

#[test]
fn a_bare_reference_to_a_step_over_seeds() {
    let text = format!(
        "{HEAD}{TASK}{TEACHER}    seeds: [0, 1]\n  - name: samples\n    kind: generate\n    teacher: steps.teacher.output\n    prompts: steps.task.output/prompts.jsonl\n"
    );
    assert_line(&text, 15, &["`teacher: steps.teacher.output`", "once per seed", "steps.teacher.output/seed-0"]);
}

#[test]
fn on_policy_bad_input() {
    let teacher = "    teacher: steps.teacher.output\n";
    assert_line(
        &distill_recipe(teacher, "      on_policy: {lambda: 1.5}\n"),
        24,
        &["`kd.on_policy.lambda`", "[0, 1]", "got 1.5"],
    );
    assert_line(
        &distill_recipe("", "      on_policy: {lambda: 0.5}\n"),
        23,
        &["`kd.on_policy`", "`teacher:`", "in memory"],
    );
    // A server grades on-policy batches only, and only an engine that returns prompt log-probs.
    let server = "    teacher: http://localhost:8000/v1\n";
    assert_line(&distill_recipe(server, "      alpha: 0.5\n"), 22, &["is a server", "`kd.on_policy`", "kind: score"]);
    assert_line(
        &distill_recipe(&format!("{server}    server: {{engine: llama-server}}\n"), "      on_policy: {lambda: 0.5}\n"),
        23,
        &["`server.engine` is llama-server", "vLLM (`prompt_logprobs`)", "SGLang (`logprob_start_len`)"],
    );
    assert_line(
        &distill_recipe(server, "      on_policy: {lambda: 0.5}\n      hidden: {layers: [[1, 1]]}\n"),
        25,
        &["`kd.hidden`", "held in memory", "the server http://localhost:8000/v1"],
    );
    // The student of `distill_recipe` reads 2048 positions (the default).
    assert_line(
        &distill_recipe(teacher, "      on_policy: {lambda: 0.5, max_new_tokens: 5000}\n"),
        24,
        &["`kd.on_policy.max_new_tokens` is 5000", "at most 2048"],
    );
}
