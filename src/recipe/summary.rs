//! What a recipe run did: one row per evaluated model, one per step, and the total time,
//! printed as a plain-text table and written to `<workdir>/summary.json`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::eval::EvalReport;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecipeSummary {
    pub name: String,
    pub workdir: PathBuf,
    pub models: Vec<ModelRow>,
    pub steps: Vec<StepRow>,
    pub total_wall_secs: f64,
}

/// One evaluated model, or one model trained over several seeds (then every number is the
/// mean over the seeds, and the `*_std` fields their sample standard deviation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    /// The eval step that scored it.
    pub eval_step: String,
    /// The step that made the model (or the model's path when it is not a step's output).
    pub name: String,
    pub model: String,
    pub params: usize,
    /// The weights' size on disk: the GGUF file, or the folder's safetensors.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    pub task_accuracy: Option<f64>,
    /// `task_accuracy` divided by that of the first model of the same eval step.
    pub accuracy_vs_first: Option<f64>,
    pub nll_per_token: f64,
    pub kl_to_teacher: Option<f64>,
    pub top1_agreement: Option<f64>,
    /// Greedy decoding speed on the task prompts (tokens/s at the eval step's batch size).
    #[serde(default)]
    pub decode_tokens_per_sec: Option<f64>,
    /// Training wall time, from the model's train_report.json.
    #[serde(default)]
    pub train_secs: Option<f64>,
    #[serde(default = "one")]
    pub seeds: usize,
    #[serde(default)]
    pub task_accuracy_std: Option<f64>,
    #[serde(default)]
    pub kl_to_teacher_std: Option<f64>,
    #[serde(default)]
    pub top1_agreement_std: Option<f64>,
    #[serde(default)]
    pub train_secs_std: Option<f64>,
}

fn one() -> usize {
    1
}

/// What an eval step measured for one `models` entry: one report per seed (one for a model
/// trained once), and the training time each folder records.
pub struct ModelGroup {
    pub name: String,
    pub reports: Vec<EvalReport>,
    pub train_secs: Vec<f64>,
}

/// One step of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    pub name: String,
    pub kind: StepKind,
    pub wall_secs: f64,
    /// Training or generation throughput, for steps that have one.
    pub tokens_per_sec: Option<f64>,
    pub output: PathBuf,
    /// The stage's own report.
    pub report: serde_json::Value,
}

/// The model rows of one eval step, one per group; accuracy relative to the first group's.
pub fn model_rows(eval_step: &str, groups: &[ModelGroup]) -> Vec<ModelRow> {
    let rows: Vec<ModelRow> = groups.iter().map(|g| row(eval_step, g)).collect();
    let first = rows.first().and_then(|r| r.task_accuracy);
    rows.into_iter()
        .map(|r| ModelRow {
            accuracy_vs_first: match (r.task_accuracy, first) {
                (Some(a), Some(f)) if f > 0.0 => Some(a / f),
                _ => None,
            },
            ..r
        })
        .collect()
}

fn row(eval_step: &str, g: &ModelGroup) -> ModelRow {
    let all = |f: &dyn Fn(&EvalReport) -> Option<f64>| -> Option<Vec<f64>> { g.reports.iter().map(f).collect() };
    let acc = all(&|r| r.task_accuracy);
    let kl = all(&|r| r.kl_to_teacher);
    let top1 = all(&|r| r.top1_agreement);
    let speed = all(&|r| r.decode_tokens_per_sec);
    let nll = all(&|r| Some(r.nll_per_token)).unwrap_or_default();
    let secs = (g.train_secs.len() == g.reports.len()).then(|| g.train_secs.clone());
    let first = g.reports.first();
    ModelRow {
        eval_step: eval_step.to_string(),
        name: g.name.clone(),
        model: first.map(|r| r.model.clone()).unwrap_or_default(),
        params: first.map_or(0, |r| r.params),
        size_bytes: first.and_then(|r| disk_size(std::path::Path::new(&r.model))),
        task_accuracy: acc.as_deref().and_then(mean),
        accuracy_vs_first: None,
        nll_per_token: mean(&nll).unwrap_or(f64::NAN),
        kl_to_teacher: kl.as_deref().and_then(mean),
        top1_agreement: top1.as_deref().and_then(mean),
        decode_tokens_per_sec: speed.as_deref().and_then(mean),
        train_secs: secs.as_deref().and_then(mean),
        seeds: g.reports.len(),
        task_accuracy_std: acc.as_deref().and_then(std),
        kl_to_teacher_std: kl.as_deref().and_then(std),
        top1_agreement_std: top1.as_deref().and_then(std),
        train_secs_std: secs.as_deref().and_then(std),
    }
}

/// A GGUF file's size, or the sum of a model folder's safetensors files.
fn disk_size(path: &std::path::Path) -> Option<u64> {
    if path.is_file() {
        return std::fs::metadata(path).ok().map(|m| m.len());
    }
    let files = std::fs::read_dir(path).ok()?;
    let sizes: Vec<u64> = files
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect();
    (!sizes.is_empty()).then(|| sizes.iter().sum())
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The sample standard deviation; None for fewer than two values.
fn std(v: &[f64]) -> Option<f64> {
    let m = mean(v)?;
    (v.len() > 1).then(|| (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

/// A table: its header and its rows of cells, formatted for reading.
pub struct Table {
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

/// The model table (empty when nothing was evaluated). Columns that no row fills (seeds, size,
/// decoding speed) are left out; a missing value is `-`.
pub fn model_table(models: &[ModelRow]) -> Table {
    let header = [
        "model",
        "seeds",
        "params",
        "size MB",
        "task acc",
        "acc vs first",
        "nll/token",
        "kl to teacher",
        "top-1 agree",
        "tokens/s",
        "train s",
    ];
    let keep = [
        true,
        models.iter().any(|m| m.seeds > 1),
        true,
        models.iter().any(|m| m.size_bytes.is_some()),
        true,
        true,
        true,
        true,
        true,
        models.iter().any(|m| m.decode_tokens_per_sec.is_some()),
        true,
    ];
    let rows = models
        .iter()
        .map(|m| {
            // With seeds: mean ± sample standard deviation (in the column's unit).
            let pm = |v: Option<f64>, sd: Option<f64>, f: &dyn Fn(f64) -> String| match (v, sd) {
                (Some(v), Some(sd)) => format!("{} ±{}", f(v), f(sd).trim_end_matches('%')),
                (v, _) => opt(v, f),
            };
            let row = [
                m.name.clone(),
                m.seeds.to_string(),
                human(m.params as f64),
                opt(m.size_bytes.map(|b| b as f64 / 1e6), |v| format!("{v:.2}")),
                pm(m.task_accuracy, m.task_accuracy_std, &percent),
                opt(m.accuracy_vs_first, percent),
                format!("{:.3}", m.nll_per_token),
                pm(m.kl_to_teacher, m.kl_to_teacher_std, &|v| format!("{v:.3}")),
                pm(m.top1_agreement, m.top1_agreement_std, &percent),
                opt(m.decode_tokens_per_sec, human),
                pm(m.train_secs, m.train_secs_std, &|v| format!("{v:.1}")),
            ];
            row.into_iter().zip(keep).filter(|(_, k)| *k).map(|(c, _)| c).collect()
        })
        .collect();
    Table { header: header.into_iter().zip(keep).filter(|(_, k)| *k).map(|(h, _)| h).collect(), rows }
}

/// The step table: what each step was, how long it took and its throughput.
pub fn step_table(steps: &[StepRow]) -> Table {
    let rows = steps
        .iter()
        .map(|st| {
            vec![st.name.clone(), st.kind.to_string(), format!("{:.1}", st.wall_secs), opt(st.tokens_per_sec, human)]
        })
        .collect();
    Table { header: vec!["step", "kind", "wall s", "tokens/s"], rows }
}

/// The summary as plain text: the model table (when something was evaluated), the step table
/// and the total wall time. Columns are aligned.
pub fn format_summary(s: &RecipeSummary) -> String {
    let mut out = String::new();
    if !s.models.is_empty() {
        out.push_str(&text_table(&model_table(&s.models), 1));
        out.push('\n');
    }
    out.push_str(&text_table(&step_table(&s.steps), 2));
    out.push_str(&format!("\ntotal wall time: {:.1} s\n", s.total_wall_secs));
    out
}

fn percent(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_string())
}

/// 1234567 → `1.23M`, 45600 → `45.6k`, 812 → `812`.
fn human(v: f64) -> String {
    match v.abs() {
        a if a >= 1e9 => format!("{:.2}G", v / 1e9),
        a if a >= 1e6 => format!("{:.2}M", v / 1e6),
        a if a >= 1e3 => format!("{:.1}k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

/// Aligned columns, two spaces apart: the first `text_columns` left-aligned, the (numeric)
/// others right-aligned.
fn text_table(t: &Table, text_columns: usize) -> String {
    let (header, rows) = (&t.header, &t.rows);
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, &w))| if i < text_columns { format!("{c:<w$}") } else { format!("{c:>w$}") })
            .collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.clone());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(model: &str, params: usize, acc: Option<f64>, kl: Option<f64>) -> EvalReport {
        EvalReport {
            model: model.to_string(),
            params,
            tokens: 1000,
            nll_per_token: 0.25,
            perplexity: 0.25f64.exp(),
            kl_to_teacher: kl,
            top1_agreement: kl.map(|_| 0.9),
            task_accuracy: acc,
            decode_tokens_per_sec: acc.map(|_| 2500.0),
            answers: Vec::new(),
        }
    }

    fn group(name: &str, reports: Vec<EvalReport>, secs: &[f64]) -> ModelGroup {
        ModelGroup { name: name.into(), reports, train_secs: secs.to_vec() }
    }

    fn summary() -> RecipeSummary {
        let groups = [
            group("teacher", vec![report("runs/q/teacher", 812_345, Some(0.96), Some(0.0))], &[95.04]),
            group("student", vec![report("runs/q/student", 150_000, Some(0.72), None)], &[]),
        ];
        RecipeSummary {
            name: "q".into(),
            workdir: "runs/q".into(),
            models: model_rows("eval", &groups),
            steps: vec![
                StepRow {
                    name: "task".into(),
                    kind: StepKind::Task,
                    wall_secs: 1.25,
                    tokens_per_sec: None,
                    output: "runs/q/task".into(),
                    report: serde_json::Value::Null,
                },
                StepRow {
                    name: "teacher".into(),
                    kind: StepKind::Finetune,
                    wall_secs: 95.04,
                    tokens_per_sec: Some(123_456.0),
                    output: "runs/q/teacher".into(),
                    report: serde_json::Value::Null,
                },
            ],
            total_wall_secs: 96.3,
        }
    }

    #[test]
    fn accuracy_is_relative_to_the_first_model() {
        let rows = summary().models;
        assert_eq!(rows[0].accuracy_vs_first, Some(1.0));
        assert!((rows[1].accuracy_vs_first.unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(rows[1].name, "student");
        assert_eq!(rows[1].eval_step, "eval");
    }

    #[test]
    fn no_relative_accuracy_without_task_accuracy() {
        let rows = model_rows(
            "eval",
            &[
                group("a", vec![report("a", 1, None, None)], &[]),
                group("b", vec![report("b", 1, Some(0.5), None)], &[]),
            ],
        );
        assert_eq!(rows[1].accuracy_vs_first, None);
    }

    #[test]
    fn summary_table_is_aligned() {
        let text = format_summary(&summary());
        let expected = "\
model    params  task acc  acc vs first  nll/token  kl to teacher  top-1 agree  tokens/s  train s
teacher  812.3k     96.0%        100.0%      0.250          0.000        90.0%      2.5k     95.0
student  150.0k     72.0%         75.0%      0.250              -            -      2.5k        -

step     kind      wall s  tokens/s
task     task         1.2         -
teacher  finetune    95.0    123.5k

total wall time: 96.3 s
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn seeds_give_the_mean_and_the_spread() {
        let reports = vec![
            report("s/seed-0", 10, Some(0.70), Some(0.30)),
            report("s/seed-1", 10, Some(0.80), Some(0.20)),
            report("s/seed-2", 10, Some(0.90), Some(0.10)),
        ];
        let rows = model_rows(
            "eval",
            &[group("teacher", vec![report("t", 20, Some(1.0), None)], &[]), group("s", reports, &[1.0, 2.0, 3.0])],
        );
        let s = &rows[1];
        assert_eq!(s.seeds, 3);
        assert!((s.task_accuracy.unwrap() - 0.8).abs() < 1e-12 && (s.task_accuracy_std.unwrap() - 0.1).abs() < 1e-12);
        assert!((s.kl_to_teacher.unwrap() - 0.2).abs() < 1e-12 && (s.kl_to_teacher_std.unwrap() - 0.1).abs() < 1e-12);
        assert!((s.train_secs.unwrap() - 2.0).abs() < 1e-12 && (s.train_secs_std.unwrap() - 1.0).abs() < 1e-12);
        assert!((s.accuracy_vs_first.unwrap() - 0.8).abs() < 1e-12);
        let text = format_summary(&RecipeSummary { models: rows, ..summary() });
        let line = text.lines().find(|l| l.starts_with("s ")).unwrap();
        assert!(line.contains("80.0% ±10.0") && line.contains("0.200 ±0.100") && line.contains("2.0 ±1.0"), "{text}");
        assert!(text.lines().next().unwrap().contains("seeds"), "{text}");
    }

    #[test]
    fn summary_without_models_has_only_the_step_table() {
        let text = format_summary(&RecipeSummary { models: vec![], ..summary() });
        assert!(text.starts_with("step "), "{text}");
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(812.0), "812");
        assert_eq!(human(45_600.0), "45.6k");
        assert_eq!(human(1_234_567.0), "1.23M");
        assert_eq!(human(3.2e9), "3.20G");
    }
}
