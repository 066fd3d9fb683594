//! `report.html`: one self-contained page (inline SVG and CSS, no scripts, nothing fetched) with the run's
//! per-task loss and dev-metric curves, task weights and the task mix over time, gradient cosine
//! similarities, confusion matrices of the classification tasks, and the final per-task reports.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

use crate::evaluate::Evaluation;

/// What the report shows besides the log.
pub struct ReportInput<'a> {
    pub title: &'a str,
    /// Key facts of the run, shown as a table at the top.
    pub summary: Vec<(String, String)>,
    /// The records of `log.jsonl`.
    pub log: &'a [Value],
    /// The main dev metric of each task, as `metric` name, for the metric curves.
    pub main_metrics: BTreeMap<String, String>,
    /// The final evaluation whose reports and confusion matrices are shown (test, or dev without test).
    pub final_eval: Option<(&'a str, &'a Evaluation)>,
}

const COLORS: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A line chart of `series` (name, points) as inline SVG, the y axis fitted to the points.
fn line_chart(title: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    chart(title, y_label, series, None)
}

/// A line chart with the y axis over `y_range` when given.
fn chart(title: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)], y_range: Option<(f64, f64)>) -> String {
    let points: Vec<(f64, f64)> =
        series.iter().flat_map(|(_, p)| p.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if points.is_empty() {
        return String::new();
    }
    let (w, h, left, right, top, bottom) = (720.0, 300.0, 64.0, 160.0, 28.0, 40.0);
    let (mut x0, mut x1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    if y1 <= y0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = y_range.unwrap_or((y0 - pad, y1 + pad));
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom);
    let mut svg =
        format!(r#"<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><title>{}</title>"#, escape(title));
    let _ = write!(svg, r#"<text x="{left}" y="18" class="title">{}</text>"#, escape(title));
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            py(y) + 4.0,
            tick(y),
            py = py(y)
        );
        let x = x0 + (x1 - x0) * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" class="tick" text-anchor="middle">{}</text>"#,
            px(x),
            h - bottom + 16.0,
            tick(x)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" class="tick" text-anchor="middle">step</text>"#,
        (left + w - right) / 2.0,
        h - 6.0
    );
    let _ = write!(
        svg,
        r#"<text x="14" y="{}" class="tick" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"#,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        escape(y_label)
    );
    for (k, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if path.len() == 1 {
            let _ = write!(svg, r#"<circle cx="{}" r="3" fill="{color}"/>"#, path[0].replace(',', r#"" cy=""#));
        } else if !path.is_empty() {
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = top + 14.0 * k as f64 + 6.0;
        let _ = write!(
            svg,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}" class="tick">{}</text>"#,
            w - right + 12.0,
            ly - 8.0,
            w - right + 26.0,
            ly + 1.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn tick(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Averages of `values` over consecutive windows of steps, so that a few thousand steps draw as a curve.
fn windowed(points: &[(f64, f64)], windows: usize) -> Vec<(f64, f64)> {
    if points.len() <= windows {
        return points.to_vec();
    }
    let size = points.len().div_ceil(windows);
    points
        .chunks(size)
        .map(|c| {
            (c.iter().map(|p| p.0).sum::<f64>() / c.len() as f64, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64)
        })
        .collect()
}

/// Per-name series of the numbers under `key` of the step records.
fn step_series(log: &[Value], key: &str) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in log.iter().filter(|r| r["type"] == "step") {
        let step = r["step"].as_f64().unwrap_or(0.0);
        if let Some(m) = r[key].as_object() {
            for (name, v) in m {
                if let Some(v) = v.as_f64() {
                    out.entry(name.clone()).or_default().push((step, v));
                }
            }
        }
    }
    out
}

fn confusion_table(classes: &[String], counts: &[Vec<usize>]) -> String {
    let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let mut t = String::from("<table class=\"confusion\"><tr><th>gold \\ predicted</th>");
    for c in classes {
        let _ = write!(t, "<th>{}</th>", escape(c));
    }
    t.push_str("</tr>");
    for (c, row) in classes.iter().zip(counts) {
        let _ = write!(t, "<tr><th>{}</th>", escape(c));
        for &n in row {
            let alpha = n as f64 / max;
            let color = if alpha > 0.55 { "#fff" } else { "#000" };
            let _ = write!(t, r#"<td style="background: rgba(31,119,180,{alpha:.3}); color: {color}">{n}</td>"#);
        }
        t.push_str("</tr>");
    }
    t.push_str("</table>");
    t
}

/// Writes the report to `path`.
pub fn write_report(path: &Path, input: &ReportInput) -> std::io::Result<()> {
    let log = input.log;
    let mut body = String::new();
    let _ = write!(body, "<h1>{}</h1><table class=\"summary\">", escape(input.title));
    for (k, v) in &input.summary {
        let _ = write!(body, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
    }
    body.push_str("</table>");

    let losses: Vec<(String, Vec<(f64, f64)>)> =
        step_series(log, "losses").into_iter().map(|(t, p)| (t, windowed(&p, 200))).collect();
    body.push_str("<h2>Training loss per task</h2><p>Mean over windows of steps.</p>");
    body.push_str(&line_chart("training loss", "loss", &losses));

    let evals: Vec<&Value> = log.iter().filter(|r| r["type"] == "eval").collect();
    let metric_series: Vec<(String, Vec<(f64, f64)>)> = input
        .main_metrics
        .iter()
        .map(|(task, metric)| {
            let pts =
                evals.iter().filter_map(|r| Some((r["step"].as_f64()?, r["scores"][task][metric].as_f64()?))).collect();
            (format!("{task}.{metric}"), pts)
        })
        .collect();
    body.push_str("<h2>Dev metrics</h2><p>Each task's main metric at every evaluation.</p>");
    body.push_str(&line_chart("dev main metric per task", "score", &metric_series));
    let selection: Vec<(f64, f64)> =
        evals.iter().filter_map(|r| Some((r["step"].as_f64()?, r["selection"].as_f64()?))).collect();
    body.push_str(&line_chart("selection score", "score", &[("selection".to_string(), selection)]));

    let weights: Vec<(String, Vec<(f64, f64)>)> =
        step_series(log, "weights").into_iter().map(|(t, p)| (t, windowed(&p, 200))).collect();
    body.push_str("<h2>Task weights</h2><p>Each task's loss weight (mean over windows of steps).</p>");
    body.push_str(&line_chart("loss weight per task", "weight", &weights));

    // The task mix: the share of steps in each window that trained each task.
    let steps: Vec<&Value> = log.iter().filter(|r| r["type"] == "step").collect();
    let size = steps.len().div_ceil(50).max(1);
    let mut mix: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let tasks: Vec<String> = losses.iter().map(|(t, _)| t.clone()).collect();
    for chunk in steps.chunks(size) {
        let x = chunk.iter().filter_map(|r| r["step"].as_f64()).sum::<f64>() / chunk.len() as f64;
        for t in &tasks {
            let n = chunk.iter().filter(|r| r["losses"].get(t).is_some()).count();
            mix.entry(t.clone()).or_default().push((x, n as f64 / chunk.len() as f64));
        }
    }
    let probabilities: Vec<(String, Vec<(f64, f64)>)> = step_series(log, "sampling").into_iter().collect();
    if !probabilities.is_empty() {
        body.push_str("<h2>Sampling probabilities</h2><p>Each task's probability of being drawn for a step (the <code>sampled</code> plan), per epoch.</p>");
        body.push_str(&chart("sampling probability per task", "probability", &probabilities, Some((0.0, 1.05))));
    }
    body.push_str("<h2>Task mix</h2><p>Share of the steps in each window that trained each task: the draws of the sampler (under the <code>mixed</code> plan, the share of batches holding the task).</p>");
    body.push_str(&chart("share of steps per task", "share", &mix.into_iter().collect::<Vec<_>>(), Some((0.0, 1.05))));

    let mut cosines: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &steps {
        if let Some(c) = r["grad_cosines"].as_array() {
            for pair in c {
                if let (Some(a), Some(b), Some(v), Some(s)) =
                    (pair[0].as_str(), pair[1].as_str(), pair[2].as_f64(), r["step"].as_f64())
                {
                    cosines.entry(format!("{a} · {b}")).or_default().push((s, v));
                }
            }
        }
    }
    if !cosines.is_empty() {
        body.push_str("<h2>Gradient cosine similarity</h2><p>Between each pair of tasks' gradients on the shared parameters, every <code>diagnostics_every</code> steps; below 0 the tasks pull the backbone in conflicting directions.</p>");
        let cosines: Vec<(String, Vec<(f64, f64)>)> =
            cosines.into_iter().map(|(k, p)| (k, windowed(&p, 200))).collect();
        body.push_str(&line_chart("cosine similarity of task gradients", "cosine", &cosines));
    }

    if let Some((split, eval)) = input.final_eval {
        if !eval.confusions.is_empty() {
            let _ = write!(body, "<h2>Confusion matrices ({split})</h2>");
            for (task, (classes, counts)) in &eval.confusions {
                let _ = write!(body, "<h3>{}</h3>{}", escape(task), confusion_table(classes, counts));
            }
        }
        if !eval.reports.is_empty() {
            let _ = write!(body, "<h2>Per-task reports ({split})</h2>");
            for (task, report) in &eval.reports {
                let _ =
                    write!(body, "<h3>{}</h3><pre>{}</pre>", escape(task), escape(&mtl_metrics::format_report(report)));
            }
        }
    }
    let html = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{}</style></head><body>{}</body></html>\n",
        escape(input.title),
        STYLE,
        body
    );
    std::fs::write(path, html)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px auto;max-width:960px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}\
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}\
.summary th{text-align:left;background:#f5f5f5}.confusion th{background:#f5f5f5}\
svg text.title{font-size:14px;font-weight:600}svg text.tick{font-size:11px;fill:#444}pre{font-size:12px;background:#f8f8f8;padding:8px}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_draws_every_section() {
        let log: Vec<Value> = (1..=40)
            .map(|s| serde_json::json!({"type": "step", "step": s, "losses": {"a": 1.0 / f64::from(s), "b": 0.5}, "weights": {"a": 1.0, "b": 1.0},
                "grad_cosines": [["a", "b", 0.1]]}))
            .chain([serde_json::json!({"type": "eval", "step": 20, "scores": {"a": {"accuracy": 0.5}}, "selection": 0.5})])
            .collect();
        let mut eval = Evaluation::default();
        eval.confusions.insert("a".into(), (vec!["x".into(), "<y>".into()], vec![vec![3, 1], vec![0, 2]]));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("report.html");
        let input = ReportInput {
            title: "run",
            summary: vec![("steps".into(), "40".into())],
            log: &log,
            main_metrics: BTreeMap::from([("a".to_string(), "accuracy".to_string())]),
            final_eval: Some(("test", &eval)),
        };
        write_report(&path, &input).expect("written");
        let html = std::fs::read_to_string(&path).expect("read");
        for needle in [
            "Training loss per task",
            "Dev metrics",
            "Task weights",
            "Task mix",
            "Gradient cosine",
            "Confusion matrices",
            "&lt;y&gt;",
            "<polyline",
        ] {
            assert!(html.contains(needle), "{needle} missing");
        }
        assert!(!html.contains("<script") && !html.contains("http"), "self-contained");
    }
}
