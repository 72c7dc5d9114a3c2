//! What a recipe run did: one row per evaluated model, one per step, and the total time,
//! printed as a plain-text table and written to `<workdir>/summary.json`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::StepKind;
use crate::eval::EvalReport;

#[derive(Debug, Clone, Serialize)]
pub struct RecipeSummary {
    pub name: String,
    pub workdir: PathBuf,
    pub models: Vec<ModelRow>,
    pub steps: Vec<StepRow>,
    pub total_wall_secs: f64,
}

/// One evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    /// The eval step that scored it.
    pub eval_step: String,
    /// The step that made the model (or the model's path when it is not a step's output).
    pub name: String,
    pub model: String,
    pub params: usize,
    pub task_accuracy: Option<f64>,
    /// `task_accuracy` divided by that of the first model of the same eval step.
    pub accuracy_vs_first: Option<f64>,
    pub nll_per_token: f64,
    pub kl_to_teacher: Option<f64>,
    pub top1_agreement: Option<f64>,
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

/// The model rows of one eval step: `names[i]` for `reports[i]`; accuracy relative to the first.
pub fn model_rows(eval_step: &str, names: &[String], reports: &[EvalReport]) -> Vec<ModelRow> {
    let first = reports.first().and_then(|r| r.task_accuracy);
    names
        .iter()
        .zip(reports)
        .map(|(name, r)| ModelRow {
            eval_step: eval_step.to_string(),
            name: name.clone(),
            model: r.model.clone(),
            params: r.params,
            task_accuracy: r.task_accuracy,
            accuracy_vs_first: match (r.task_accuracy, first) {
                (Some(a), Some(f)) if f > 0.0 => Some(a / f),
                _ => None,
            },
            nll_per_token: r.nll_per_token,
            kl_to_teacher: r.kl_to_teacher,
            top1_agreement: r.top1_agreement,
        })
        .collect()
}

/// The summary as plain text: the model table (when something was evaluated), the step table
/// and the total wall time. Columns are aligned; a missing value is `-`.
pub fn format_summary(s: &RecipeSummary) -> String {
    let mut out = String::new();
    if !s.models.is_empty() {
        let header = ["model", "params", "task acc", "acc vs first", "nll/token", "kl to teacher", "top-1 agree"];
        let rows: Vec<Vec<String>> = s
            .models
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    human(m.params as f64),
                    opt(m.task_accuracy, percent),
                    opt(m.accuracy_vs_first, percent),
                    format!("{:.3}", m.nll_per_token),
                    opt(m.kl_to_teacher, |v| format!("{v:.3}")),
                    opt(m.top1_agreement, percent),
                ]
            })
            .collect();
        out.push_str(&table(&header, &rows, 1));
        out.push('\n');
    }
    let header = ["step", "kind", "wall s", "tokens/s"];
    let rows: Vec<Vec<String>> = s
        .steps
        .iter()
        .map(|st| {
            vec![st.name.clone(), st.kind.to_string(), format!("{:.1}", st.wall_secs), opt(st.tokens_per_sec, human)]
        })
        .collect();
    out.push_str(&table(&header, &rows, 2));
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
fn table(header: &[&str], rows: &[Vec<String>], text_columns: usize) -> String {
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
    let mut out = line(header.to_vec());
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
        }
    }

    fn summary() -> RecipeSummary {
        let names = vec!["teacher".to_string(), "student".to_string()];
        let reports = [
            report("runs/q/teacher", 812_345, Some(0.96), Some(0.0)),
            report("runs/q/student", 150_000, Some(0.72), None),
        ];
        RecipeSummary {
            name: "q".into(),
            workdir: "runs/q".into(),
            models: model_rows("eval", &names, &reports),
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
        let names = vec!["a".to_string(), "b".to_string()];
        let rows = model_rows("eval", &names, &[report("a", 1, None, None), report("b", 1, Some(0.5), None)]);
        assert_eq!(rows[1].accuracy_vs_first, None);
    }

    #[test]
    fn summary_table_is_aligned() {
        let text = format_summary(&summary());
        let expected = "\
model    params  task acc  acc vs first  nll/token  kl to teacher  top-1 agree
teacher  812.3k     96.0%        100.0%      0.250          0.000        90.0%
student  150.0k     72.0%         75.0%      0.250              -            -

step     kind      wall s  tokens/s
task     task         1.2         -
teacher  finetune    95.0    123.5k

total wall time: 96.3 s
";
        assert_eq!(text, expected, "\n{text}");
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
