//! `report.html`: one self-contained page about a recipe run, for a person to look at. It reads
//! the run's `summary.json` and each training step's `metrics.jsonl`, and holds the loss curves
//! (every loss term and the validation loss), the learning rate, the model and step tables, and
//! a few held-out prompts with each model's answer side by side. No scripts, no network.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::recipe::{model_table, step_table, RecipeSummary, StepKind, Table};

/// The report's file name inside the run folder.
pub const REPORT_FILE: &str = "report.html";

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "{} is not a kdllm run: it has no summary.json; give the `workdir` of a recipe that has run (e.g. runs/quickstart after `kdllm train --recipe recipes/quickstart.yaml`)",
        dir.display()
    )]
    NotARun { dir: PathBuf },
    #[error("{}: {message}; rerun the recipe to write it again", path.display())]
    Unreadable { path: PathBuf, message: String },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("drawing the {what} chart: {message}")]
    Chart { what: String, message: String },
}

/// One metrics file: a training step (or one seed of it) and its logged lines.
struct Curves {
    title: String,
    /// (step, lr) at every logged step.
    lr: Vec<(f64, f64)>,
    /// Each loss term that was logged.
    terms: Vec<Term>,
}

/// One loss term's curve: its legend, its colour (the same in every chart) and its points.
struct Term {
    label: &'static str,
    color: RGBColor,
    /// (step, value).
    points: Vec<(f64, f64)>,
}

/// The loss terms `metrics.jsonl` holds, and their legends; colours in the same order.
const TERMS: [(&str, &str); 5] = [
    ("loss", "total"),
    ("ce", "cross-entropy"),
    ("kl", "divergence to teacher"),
    ("hidden", "hidden-state"),
    ("valid_loss", "validation"),
];

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
];

/// Writes `<run_dir>/report.html` (or `output`) and returns its path.
pub fn write(run_dir: &Path, output: Option<&Path>) -> Result<PathBuf, ReportError> {
    let summary_path = run_dir.join("summary.json");
    if !summary_path.is_file() {
        return Err(ReportError::NotARun { dir: run_dir.to_path_buf() });
    }
    let unreadable = |message: String| ReportError::Unreadable { path: summary_path.clone(), message };
    let text = std::fs::read_to_string(&summary_path).map_err(|e| unreadable(e.to_string()))?;
    let summary: RecipeSummary =
        serde_json::from_str(&text).map_err(|e| unreadable(format!("not a kdllm summary ({e})")))?;
    let curves = read_curves(run_dir, &summary)?;
    let html = render(&summary, &curves)?;
    let path = output.map(Path::to_path_buf).unwrap_or_else(|| run_dir.join(REPORT_FILE));
    // Written whole, then renamed: a reader never sees half a page.
    let partial = path.with_extension("html.partial");
    let write_err = |source| ReportError::Write { path: path.clone(), source };
    std::fs::write(&partial, html).map_err(write_err)?;
    std::fs::rename(&partial, &path).map_err(write_err)?;
    Ok(path)
}

/// The metrics of every training step: `<run>/<step>/metrics.jsonl`, or one per seed folder.
fn read_curves(run_dir: &Path, summary: &RecipeSummary) -> Result<Vec<Curves>, ReportError> {
    let mut curves = Vec::new();
    for step in &summary.steps {
        if !matches!(step.kind, StepKind::Finetune | StepKind::Distill) {
            continue;
        }
        let folder = run_dir.join(&step.name);
        let mut files: Vec<(String, PathBuf)> = match std::fs::read_dir(&folder) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("seed-"))
                .map(|e| {
                    (format!("{} ({})", step.name, e.file_name().to_string_lossy()), e.path().join("metrics.jsonl"))
                })
                .filter(|(_, p)| p.is_file())
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        if files.is_empty() {
            files.push((step.name.clone(), folder.join("metrics.jsonl")));
        }
        for (title, path) in files {
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            curves.push(parse_metrics(title, &text));
        }
    }
    Ok(curves)
}

/// The curves of one `metrics.jsonl`. A line that does not parse (a crash mid-write) is skipped.
/// The total is left out where it is the cross-entropy alone (no other term).
fn parse_metrics(title: String, text: &str) -> Curves {
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let series = |key: &str| -> Vec<(f64, f64)> {
        lines
            .iter()
            .filter_map(|v| Some((v["step"].as_f64()?, v[key].as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let only_ce = series("kl").is_empty() && series("hidden").is_empty();
    let terms = TERMS
        .iter()
        .enumerate()
        .filter(|(_, (key, _))| !(only_ce && *key == "loss"))
        .map(|(i, (key, label))| Term { label, color: COLORS[i], points: series(key) })
        .filter(|t| !t.points.is_empty())
        .collect();
    Curves { title, lr: series("lr"), terms }
}

/// The page.
fn render(summary: &RecipeSummary, curves: &[Curves]) -> Result<String, ReportError> {
    let mut html = String::new();
    let title = format!("kdllm run: {}", escape(&summary.name));
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n<p class=\"meta\">workdir <code>{}</code> · {} steps · total wall time {:.1} s</p>\n",
        escape(&summary.workdir.to_string_lossy()),
        summary.steps.len(),
        summary.total_wall_secs,
    );
    if !summary.models.is_empty() {
        html.push_str("<h2>Models</h2>\n");
        html.push_str(&html_table(&model_table(&summary.models), 1));
    }
    html.push_str("<h2>Steps</h2>\n");
    html.push_str(&html_table(&step_table(&summary.steps), 2));
    if !curves.is_empty() {
        html.push_str("<h2>Training</h2>\n");
    }
    for c in curves {
        let _ = writeln!(html, "<h3>{}</h3>\n<div class=\"charts\">", escape(&c.title));
        if !c.terms.is_empty() {
            html.push_str(&loss_chart(c)?);
        }
        if !c.lr.is_empty() {
            html.push_str(&lr_chart(c)?);
        }
        html.push_str("</div>\n");
    }
    html.push_str(&answers(summary));
    html.push_str("</body>\n</html>\n");
    Ok(html)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}\
h1{font-size:1.5em}h2{margin-top:1.5em;border-bottom:1px solid #ccc}h3{font-size:1.05em}\
.meta{color:#555}table{border-collapse:collapse;margin:.5em 0}\
th,td{border:1px solid #ddd;padding:.3em .6em;vertical-align:top}th{background:#f3f3f3}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
.charts{display:flex;flex-wrap:wrap;gap:1em}pre{margin:0;white-space:pre-wrap;font-size:.9em}\
.right{background:#eaf6ea}.wrong{background:#fbeaea}";

/// A table as HTML: the first `text_columns` cells of a row are text, the rest numbers.
fn html_table(t: &Table, text_columns: usize) -> String {
    let mut out = String::from("<table>\n<tr>");
    for h in &t.header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let class = if i < text_columns { "" } else { " class=\"num\"" };
            let _ = write!(out, "<td{class}>{}</td>", escape(cell));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

const CHART_SIZE: (u32, u32) = (640, 340);

fn chart_error(what: &str) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Chart { what: what.to_string(), message }
}

/// A chart's caption and margins, the same for every chart; `y_labels` is the width of the
/// y-axis labels.
fn frame<'a, 'b, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_labels: u32,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .margin_right(24)
        .x_label_area_size(36)
        .y_label_area_size(y_labels);
    builder
}

/// Every loss term against the step, on a log scale (the tail of a loss curve is where runs
/// differ). Validation points are marked.
fn loss_chart(c: &Curves) -> Result<String, ReportError> {
    let err = chart_error(&c.title);
    let positive = || c.terms.iter().flat_map(|t| t.points.iter()).filter(|(_, y)| *y > 0.0);
    let (lo, hi) = positive().fold((f64::MAX, f64::MIN), |(lo, hi), (_, y)| (lo.min(*y), hi.max(*y)));
    if lo > hi {
        return Ok(String::new());
    }
    let (x0, x1) = x_range(c.terms.iter().flat_map(|t| t.points.iter()));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = frame(&root, "loss", 60)
            .build_cartesian_2d(x0..x1, (lo * 0.9..hi * 1.1).log_scale())
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .max_light_lines(1)
            .x_desc("step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("loss (log)")
            .y_label_formatter(&|v| short(*v))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for t in &c.terms {
            let color = t.color;
            let points: Vec<(f64, f64)> = t.points.iter().copied().filter(|(_, y)| *y > 0.0).collect();
            let series = if t.label == "validation" {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| err(e.to_string()))?
            } else {
                chart.draw_series(LineSeries::new(points, color.stroke_width(2))).map_err(|e| err(e.to_string()))?
            };
            series
                .label(t.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(svg)
}

/// The learning rate against the step.
fn lr_chart(c: &Curves) -> Result<String, ReportError> {
    let err = chart_error(&c.title);
    let (x0, x1) = x_range(c.lr.iter());
    let hi = c.lr.iter().map(|(_, y)| *y).fold(0.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (CHART_SIZE.0 * 3 / 4, CHART_SIZE.1)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut chart = frame(&root, "learning rate", 70)
            .build_cartesian_2d(x0..x1, 0.0..(hi * 1.1).max(1e-12))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .max_light_lines(1)
            .x_desc("step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(c.lr.iter().copied(), COLORS[0].stroke_width(2)))
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(svg)
}

/// A log-axis label: `0.5`, `20`, `1e-4`.
fn short(v: f64) -> String {
    if (0.01..1e4).contains(&v) {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

/// The span of the steps, never empty.
fn x_range<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> (f64, f64) {
    let (lo, hi) = points.fold((f64::MAX, f64::MIN), |(lo, hi), (x, _)| (lo.min(*x), hi.max(*x)));
    if lo > hi {
        (0.0, 1.0)
    } else if lo == hi {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    }
}

/// For each eval step that scored a task: its first prompts, the expected answer and each
/// model's greedy answer, side by side.
fn answers(summary: &RecipeSummary) -> String {
    let mut out = String::new();
    for step in summary.steps.iter().filter(|s| s.kind == StepKind::Eval) {
        let Some(reports) = step.report.as_array() else { continue };
        // One column per model row (a model trained over seeds shows its first seed).
        let columns: Vec<(&str, &Vec<serde_json::Value>)> = summary
            .models
            .iter()
            .filter(|m| m.eval_step == step.name)
            .filter_map(|m| {
                let report = reports.iter().find(|r| r["model"].as_str() == Some(m.model.as_str()))?;
                Some((m.name.as_str(), report["answers"].as_array()?))
            })
            .collect();
        let Some((_, first)) = columns.first() else { continue };
        let _ = writeln!(
            out,
            "<h2>Held-out answers ({})</h2>\n<table>\n<tr><th>prompt</th><th>expected</th>",
            escape(&step.name)
        );
        for (name, _) in &columns {
            let _ = write!(out, "<th>{}</th>", escape(name));
        }
        out.push_str("</tr>\n");
        for (i, a) in first.iter().enumerate() {
            let text = |v: &serde_json::Value, key: &str| escape(v[key].as_str().unwrap_or(""));
            let _ =
                write!(out, "<tr><td><pre>{}</pre></td><td><pre>{}</pre></td>", text(a, "prompt"), text(a, "expected"));
            for (_, answers) in &columns {
                match answers.get(i).filter(|b| b["prompt"] == a["prompt"]) {
                    Some(b) => {
                        let class = if b["correct"].as_bool() == Some(true) { "right" } else { "wrong" };
                        let _ = write!(out, "<td class=\"{class}\"><pre>{}</pre></td>", text(b, "answer"));
                    }
                    None => out.push_str("<td>-</td>"),
                }
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }
    out
}

/// Text as HTML.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_makes_text_inert() {
        assert_eq!(escape("<b>a & \"b\"</b>"), "&lt;b&gt;a &amp; &quot;b&quot;&lt;/b&gt;");
    }

    #[test]
    fn metrics_give_one_curve_per_logged_term() {
        let text = "{\"step\":1,\"loss\":2.0,\"ce\":2.0,\"kl\":null,\"lr\":0.001,\"valid_loss\":null}\n\
                    not json\n\
                    {\"step\":2,\"loss\":1.5,\"ce\":1.5,\"kl\":null,\"lr\":0.002,\"valid_loss\":1.7}\n";
        let c = parse_metrics("t".into(), text);
        let labels: Vec<&str> = c.terms.iter().map(|t| t.label).collect();
        assert_eq!(labels, ["cross-entropy", "validation"], "the total is the cross-entropy: shown once");
        assert_eq!(c.terms[0].points, [(1.0, 2.0), (2.0, 1.5)]);
        assert_eq!(c.terms[1].points, [(2.0, 1.7)]);
        assert_eq!(c.terms[1].color, COLORS[4], "each term keeps its colour");
        assert_eq!(c.lr, [(1.0, 0.001), (2.0, 0.002)]);
    }

    #[test]
    fn log_axis_labels_are_short() {
        assert_eq!(
            [short(0.5), short(20.0), short(1.25), short(1e-4), short(0.001)],
            ["0.5", "20", "1.25", "1e-4", "1e-3"]
        );
    }

    #[test]
    fn a_folder_without_a_summary_is_not_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(dir.path(), None).unwrap_err();
        assert!(matches!(err, ReportError::NotARun { .. }), "{err}");
        assert!(err.to_string().contains("is not a kdllm run: it has no summary.json"), "{err}");
        assert!(!dir.path().join(REPORT_FILE).exists());
    }

    #[test]
    fn a_summary_that_is_not_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("summary.json"), "{\"name\": 3}").unwrap();
        let err = write(dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("summary.json: not a kdllm summary"), "{err}");
    }

    #[test]
    fn a_chart_is_svg_with_a_line_per_term() {
        let c = parse_metrics(
            "t".into(),
            "{\"step\":1,\"loss\":2.0,\"ce\":1.0,\"kl\":3.0,\"lr\":0.001}\n{\"step\":5,\"loss\":1.0,\"ce\":0.5,\"kl\":1.5,\"lr\":0.002}\n",
        );
        let svg = loss_chart(&c).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        // Each term: its curve and its legend mark, in its own colour.
        for color in ["#1F77B4", "#FF7F0E", "#2CA02C"] {
            assert_eq!(svg.matches(&format!("stroke=\"{color}\" stroke-width=\"2\"")).count(), 2, "{svg}");
        }
        assert!(!svg.contains("#9467BD"), "no hidden-state term was logged");
        for text in ["total", "cross-entropy", "divergence to teacher", "step", "loss (log)"] {
            assert!(svg.contains(&format!(">\n{text}\n</text>")), "no text `{text}` in {svg}");
        }
    }
}
