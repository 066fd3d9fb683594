//! Drift monitoring: what each task answers, as distributions, and how far the recent answers have moved from
//! the answers the model gave its dev set at training time.
//!
//! Every answer is read as observations of a few statistics, by task kind:
//!
//! | kind | categorical statistics | numeric statistics |
//! |---|---|---|
//! | classification | `label`: the class | `score`: its probability |
//! | multi_label | `labels`: each label given (`(none)` for none) | |
//! | regression | | `value` (or `value.NAME` per output) |
//! | token_classification | `tag`: each word's tag | |
//! | question_answering | `answered`: `answer` or `no_answer` | `score`, `answer_chars` |
//!
//! A [`Reference`] holds their distributions over the dev set (training writes it beside the model as
//! `drift-reference.json`): counts per category, and numbers counted in ten bins cut at the deciles of the
//! dev values. The [`Monitor`] keeps the last `window` observations of each statistic and compares them with
//! the reference by the population stability index,
//! PSI = Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ) over the bins, aᵢ the window's share of bin i and eᵢ the reference's, each
//! share at least 10⁻⁴ so that an empty bin counts as rare rather than impossible. The usual reading: under
//! 0.1 no shift, 0.1 to 0.25 a moderate one, over 0.25 a significant one. A statistic whose window is full and
//! whose PSI is over the threshold raises `mtl_drift_alert` and logs a warning once, until it falls back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::TaskDescription;

/// The file a trained run keeps its reference in.
pub const REFERENCE_FILE: &str = "drift-reference.json";

/// The smallest share a bin counts with in the PSI.
const FLOOR: f64 = 1e-4;

/// Bins of a numeric statistic (cut at the deciles of the reference).
const BINS: usize = 10;

/// The category of an empty multi-label answer.
pub const NONE: &str = "(none)";

/// The distributions of every task's statistics over a set of answers (the dev set's, at training time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Where the answers came from (`dev`).
    pub source: String,
    /// Per task, per statistic.
    pub tasks: BTreeMap<String, BTreeMap<String, Distribution>>,
}

/// One statistic's distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Distribution {
    /// How often each category came.
    Categories(BTreeMap<String, u64>),
    /// Numbers counted in bins: `counts[i]` of the values in (`edges[i-1]`, `edges[i]`], the last count of
    /// those over the last edge (Prometheus' `le` buckets).
    Bins { edges: Vec<f64>, counts: Vec<u64> },
}

/// One observation of a statistic.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    Category(String),
    Number(f64),
}

/// The observations in one answer of a task of `kind`, as `(statistic, observation)`. Answers of another
/// shape (a decoder's generated label, say) give what they have: a `label` that is null counts as `(none)`.
pub fn observations(kind: &str, answer: &Value) -> Vec<(String, Observation)> {
    let mut out = Vec::new();
    let category = |v: &Value| Observation::Category(v.as_str().unwrap_or(NONE).to_string());
    match kind {
        "classification" => {
            if let Some(label) = answer.get("label") {
                out.push(("label".into(), category(label)));
            }
            if let Some(score) = answer.get("score").and_then(Value::as_f64) {
                out.push(("score".into(), Observation::Number(score)));
            }
        }
        "multi_label" => {
            let labels = answer.get("labels").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            if labels.is_empty() {
                out.push(("labels".into(), Observation::Category(NONE.into())));
            }
            for label in labels {
                out.push(("labels".into(), category(label)));
            }
        }
        "regression" => {
            if let Some(v) = answer.get("value").and_then(Value::as_f64) {
                out.push(("value".into(), Observation::Number(v)));
            }
            match answer.get("values") {
                Some(Value::Object(values)) => {
                    for (name, v) in values {
                        if let Some(v) = v.as_f64() {
                            out.push((format!("value.{name}"), Observation::Number(v)));
                        }
                    }
                }
                Some(Value::Array(values)) => {
                    for (i, v) in values.iter().enumerate() {
                        if let Some(v) = v.as_f64() {
                            out.push((format!("value.{i}"), Observation::Number(v)));
                        }
                    }
                }
                _ => {}
            }
        }
        "token_classification" => {
            for tag in answer.get("tags").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
                out.push(("tag".into(), category(tag)));
            }
        }
        "question_answering" => {
            let text = answer.get("answer").and_then(Value::as_str).unwrap_or("");
            let answered = if text.is_empty() { "no_answer" } else { "answer" };
            out.push(("answered".into(), Observation::Category(answered.into())));
            if let Some(score) = answer.get("score").and_then(Value::as_f64) {
                out.push(("score".into(), Observation::Number(score)));
            }
            if !text.is_empty() {
                out.push(("answer_chars".into(), Observation::Number(text.chars().count() as f64)));
            }
        }
        _ => {}
    }
    out.retain(|(_, o)| !matches!(o, Observation::Number(x) if !x.is_finite()));
    out
}

/// The bin of `value` among `edges`: the first edge at or above it, or the last bin.
fn bin(edges: &[f64], value: f64) -> usize {
    edges.partition_point(|&e| e < value)
}

/// Up to `BINS - 1` cut points at the deciles of `values` (sorted), each once.
fn decile_edges(sorted: &[f64]) -> Vec<f64> {
    let mut edges: Vec<f64> = Vec::new();
    if sorted.is_empty() {
        return edges;
    }
    for i in 1..BINS {
        // The nearest-rank quantile: the value at or above a share i/BINS of the data.
        let rank = (i * sorted.len()).div_ceil(BINS).max(1) - 1;
        let q = sorted[rank.min(sorted.len() - 1)];
        if edges.last().is_none_or(|&last| q > last) {
            edges.push(q);
        }
    }
    edges
}

impl Reference {
    /// The distributions of `answers` (one map of task → answer per input; a task answers only the inputs it
    /// has in its map), for the tasks `tasks` describes.
    pub fn build(source: &str, tasks: &[TaskDescription], answers: &[BTreeMap<String, Value>]) -> Self {
        let mut out = BTreeMap::new();
        for task in tasks {
            let mut categories: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
            let mut numbers: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for answer in answers.iter().filter_map(|a| a.get(&task.name)) {
                for (statistic, o) in observations(&task.kind, answer) {
                    match o {
                        Observation::Category(c) => {
                            *categories.entry(statistic).or_default().entry(c).or_default() += 1
                        }
                        Observation::Number(x) => numbers.entry(statistic).or_default().push(x),
                    }
                }
            }
            let mut stats: BTreeMap<String, Distribution> =
                categories.into_iter().map(|(s, c)| (s, Distribution::Categories(c))).collect();
            for (statistic, mut values) in numbers {
                values.sort_by(f64::total_cmp);
                let edges = decile_edges(&values);
                let mut counts = vec![0; edges.len() + 1];
                for &v in &values {
                    counts[bin(&edges, v)] += 1;
                }
                stats.insert(statistic, Distribution::Bins { edges, counts });
            }
            if !stats.is_empty() {
                out.insert(task.name.clone(), stats);
            }
        }
        Self { source: source.to_string(), tasks: out }
    }
}

/// The population stability index of `actual` against `expected` (counts over the same bins).
pub fn psi(actual: &[u64], expected: &[u64]) -> f64 {
    let (na, ne) = (actual.iter().sum::<u64>() as f64, expected.iter().sum::<u64>() as f64);
    if na == 0.0 || ne == 0.0 {
        return 0.0;
    }
    let n = actual.len().max(expected.len());
    (0..n)
        .map(|i| {
            let a = (actual.get(i).copied().unwrap_or(0) as f64 / na).max(FLOOR);
            let e = (expected.get(i).copied().unwrap_or(0) as f64 / ne).max(FLOOR);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// How the monitor compares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DriftSettings {
    /// Observations per statistic in the window compared with the reference.
    pub window: usize,
    /// The PSI over which a full window raises the alert.
    pub threshold: f64,
}

/// One statistic of one task, as served.
#[derive(Debug, Default)]
struct Stat {
    /// Categorical: the category of each bin (the reference's first, then new ones as they come).
    categories: Vec<String>,
    index: HashMap<String, usize>,
    /// Numeric: the reference's edges (none: no histogram and no PSI).
    edges: Option<Vec<f64>>,
    /// The reference's count per bin (empty without a reference).
    expected: Vec<u64>,
    /// The bins of the last observations, and their count per bin.
    recent: VecDeque<usize>,
    in_window: Vec<u64>,
    /// Since the server started: count per bin, and for numbers their sum.
    total: Vec<u64>,
    sum: f64,
    alert: bool,
}

impl Stat {
    fn from_reference(d: Option<&Distribution>) -> Self {
        let mut stat = Self::default();
        match d {
            Some(Distribution::Categories(counts)) => {
                for (c, &n) in counts {
                    stat.category(c);
                    stat.expected.push(n);
                }
            }
            Some(Distribution::Bins { edges, counts }) => {
                stat.expected = counts.clone();
                stat.total = vec![0; counts.len()];
                stat.in_window = vec![0; counts.len()];
                stat.edges = Some(edges.clone());
            }
            None => {}
        }
        stat
    }

    fn category(&mut self, c: &str) -> usize {
        if let Some(&i) = self.index.get(c) {
            return i;
        }
        let i = self.categories.len();
        self.categories.push(c.to_string());
        self.index.insert(c.to_string(), i);
        self.total.push(0);
        self.in_window.push(0);
        i
    }

    fn observe(&mut self, o: &Observation, window: usize) {
        let i = match o {
            Observation::Category(c) => self.category(c),
            Observation::Number(x) => {
                let Some(edges) = &self.edges else { return };
                self.sum += x;
                bin(edges, *x)
            }
        };
        self.total[i] += 1;
        self.in_window[i] += 1;
        self.recent.push_back(i);
        while self.recent.len() > window {
            if let Some(old) = self.recent.pop_front() {
                self.in_window[old] -= 1;
            }
        }
    }

    /// The window's PSI against the reference; `None` without a reference or observations.
    fn psi(&self) -> Option<f64> {
        (!self.expected.is_empty() && !self.recent.is_empty()).then(|| psi(&self.in_window, &self.expected))
    }
}

/// The served answers' distributions and their drift from the reference, for `GET /metrics`.
#[derive(Debug)]
pub struct Monitor {
    settings: DriftSettings,
    /// Each task's kind.
    kinds: BTreeMap<String, String>,
    reference: Option<String>,
    stats: Mutex<BTreeMap<(String, String), Stat>>,
}

impl Monitor {
    /// A monitor of `tasks`, compared with `reference` where there is one.
    pub fn new(tasks: &[TaskDescription], reference: Option<&Reference>, settings: DriftSettings) -> Self {
        let mut stats = BTreeMap::new();
        if let Some(r) = reference {
            for (task, ds) in &r.tasks {
                for (statistic, d) in ds {
                    stats.insert((task.clone(), statistic.clone()), Stat::from_reference(Some(d)));
                }
            }
        }
        Self {
            settings,
            kinds: tasks.iter().map(|t| (t.name.clone(), t.kind.clone())).collect(),
            reference: reference.map(|r| r.source.clone()),
            stats: Mutex::new(stats),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<(String, String), Stat>) -> T) -> T {
        match self.stats.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Counts the answers of one request (per input, task → answer).
    pub fn observe(&self, answers: &[BTreeMap<String, Value>]) {
        let window = self.settings.window.max(1);
        let threshold = self.settings.threshold;
        self.with(|stats| {
            let mut touched = Vec::new();
            for answer in answers {
                for (task, value) in answer {
                    let Some(kind) = self.kinds.get(task) else { continue };
                    for (statistic, o) in observations(kind, value) {
                        let key = (task.clone(), statistic);
                        let stat = stats.entry(key.clone()).or_insert_with(|| Stat::from_reference(None));
                        stat.observe(&o, window);
                        touched.push(key);
                    }
                }
            }
            touched.sort();
            touched.dedup();
            for key in touched {
                let stat = stats.get_mut(&key).expect("observed above");
                let Some(psi) = stat.psi() else { continue };
                let over = stat.recent.len() >= window && psi > threshold;
                if over && !stat.alert {
                    tracing::warn!(
                        task = key.0,
                        statistic = key.1,
                        psi,
                        threshold,
                        "drift: the last {window} answers differ from the reference's (PSI over the threshold)"
                    );
                } else if !over && stat.alert {
                    tracing::info!(task = key.0, statistic = key.1, psi, "drift: back under the threshold");
                }
                stat.alert = over;
            }
        });
    }

    /// The PSI of each statistic's window, where it has a reference and observations.
    pub fn psi(&self) -> BTreeMap<(String, String), f64> {
        self.with(|stats| stats.iter().filter_map(|(k, s)| Some((k.clone(), s.psi()?))).collect())
    }

    /// The exposition text (Prometheus 0.0.4) of the distributions and the drift.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let labels = |task: &str, statistic: &str| {
            format!("task=\"{}\",statistic=\"{}\"", crate::metrics::escape(task), crate::metrics::escape(statistic))
        };
        self.with(|stats| {
            out.push_str("# HELP mtl_predictions_total Answers per task, statistic and category since the server started (classes, labels, tags, answered or not).\n# TYPE mtl_predictions_total counter\n");
            for ((task, statistic), s) in stats.iter() {
                for (c, n) in s.categories.iter().zip(&s.total) {
                    let _ = writeln!(
                        out,
                        "mtl_predictions_total{{{},category=\"{}\"}} {n}",
                        labels(task, statistic),
                        crate::metrics::escape(c)
                    );
                }
            }
            out.push_str("# HELP mtl_prediction_values Numbers in the answers per task and statistic (class probability, regression value, answer score and length) since the server started, bucketed at the deciles of the reference's.\n# TYPE mtl_prediction_values histogram\n");
            for ((task, statistic), s) in stats.iter() {
                let Some(edges) = &s.edges else { continue };
                let l = labels(task, statistic);
                let mut cumulative = 0;
                for (e, n) in edges.iter().zip(&s.total) {
                    cumulative += n;
                    let _ = writeln!(out, "mtl_prediction_values_bucket{{{l},le=\"{e}\"}} {cumulative}");
                }
                let count: u64 = s.total.iter().sum();
                let _ = writeln!(out, "mtl_prediction_values_bucket{{{l},le=\"+Inf\"}} {count}");
                let _ = writeln!(out, "mtl_prediction_values_sum{{{l}}} {}", s.sum);
                let _ = writeln!(out, "mtl_prediction_values_count{{{l}}} {count}");
            }
            if let Some(source) = &self.reference {
                let _ = writeln!(
                    out,
                    "# HELP mtl_drift_psi Population stability index of each statistic's last answers (mtl_drift_window of them) against the {source} set's at training time.\n# TYPE mtl_drift_psi gauge"
                );
                for ((task, statistic), s) in stats.iter() {
                    if let Some(psi) = s.psi() {
                        let _ = writeln!(out, "mtl_drift_psi{{{}}} {psi}", labels(task, statistic));
                    }
                }
                out.push_str("# HELP mtl_drift_window Observations in each statistic's window (at most drift_window).\n# TYPE mtl_drift_window gauge\n");
                for ((task, statistic), s) in stats.iter() {
                    let _ = writeln!(out, "mtl_drift_window{{{}}} {}", labels(task, statistic), s.recent.len());
                }
                out.push_str("# HELP mtl_drift_alert 1 while a statistic's window is full and its PSI is over mtl_drift_threshold.\n# TYPE mtl_drift_alert gauge\n");
                for ((task, statistic), s) in stats.iter() {
                    if !s.expected.is_empty() {
                        let _ = writeln!(out, "mtl_drift_alert{{{}}} {}", labels(task, statistic), u8::from(s.alert));
                    }
                }
                out.push_str("# HELP mtl_drift_threshold The PSI over which a full window raises the alert.\n# TYPE mtl_drift_threshold gauge\n");
                let _ = writeln!(out, "mtl_drift_threshold {}", self.settings.threshold);
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(name: &str, kind: &str) -> TaskDescription {
        TaskDescription { name: name.into(), kind: kind.into(), labels: Vec::new() }
    }

    #[test]
    fn psi_is_the_symmetric_kl_divergence_where_no_bin_is_empty() {
        // scipy 1.17.1: p, q = [.1, .2, .3, .4], [.25, .25, .25, .25];
        // scipy.stats.entropy(p, q) + scipy.stats.entropy(q, p) = 0.22821740957339182 (PSI = KL(p||q) + KL(q||p)).
        let value = psi(&[10, 20, 30, 40], &[25, 25, 25, 25]);
        assert!((value - 0.228_217_409_573_391_82).abs() < 1e-12, "{value}");
        assert_eq!(psi(&[3, 6, 9], &[1, 2, 3]), 0.0);
        // An empty bin counts as a share of 1e-4.
        let one_sided = psi(&[1, 0], &[1, 1]);
        let want = (1.0 - 0.5) * (1.0f64 / 0.5).ln() + (1e-4 - 0.5) * (1e-4f64 / 0.5).ln();
        assert!((one_sided - want).abs() < 1e-12, "{one_sided} {want}");
    }

    #[test]
    fn answers_are_read_as_statistics_by_kind() {
        let obs = |kind: &str, v: Value| observations(kind, &v);
        assert_eq!(
            obs("classification", json!({"label": "DESC", "score": 0.9})),
            vec![("label".into(), Observation::Category("DESC".into())), ("score".into(), Observation::Number(0.9))]
        );
        assert_eq!(obs("multi_label", json!({"labels": [], "scores": {}}))[0].1, Observation::Category(NONE.into()));
        assert_eq!(obs("token_classification", json!({"tags": ["O", "B-loc"], "words": ["a", "b"]})).len(), 2);
        assert_eq!(
            obs("regression", json!({"values": {"v": 1.5, "a": 2.0}})),
            vec![("value.a".into(), Observation::Number(2.0)), ("value.v".into(), Observation::Number(1.5))]
        );
        assert_eq!(
            obs("question_answering", json!({"answer": "", "score": 1.0, "start": null, "end": null}))[0].1,
            Observation::Category("no_answer".into())
        );
        // A decoder's answer that names no label.
        assert_eq!(
            obs("classification", json!({"generated": "?", "label": null}))[0].1,
            Observation::Category(NONE.into())
        );
    }

    #[test]
    fn deciles_cut_the_reference_into_ten_bins_and_ties_merge() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(decile_edges(&values), vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]);
        assert_eq!(decile_edges(&[1.0; 50]), vec![1.0]);
        let edges = [10.0, 20.0];
        assert_eq!((bin(&edges, 10.0), bin(&edges, 10.5), bin(&edges, 25.0)), (0, 1, 2));
        let answers: Vec<BTreeMap<String, Value>> =
            (1..=100).map(|i| BTreeMap::from([("r".to_string(), json!({"value": f64::from(i)}))])).collect();
        let r = Reference::build("dev", &[task("r", "regression")], &answers);
        assert_eq!(
            r.tasks["r"]["value"],
            Distribution::Bins {
                edges: vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0],
                counts: vec![10; 10]
            }
        );
    }

    #[test]
    fn a_shifted_window_raises_the_alert_and_a_matching_one_does_not() {
        let tasks = [task("t", "classification")];
        let class = |l: &str| BTreeMap::from([("t".to_string(), json!({"label": l, "score": 0.5}))]);
        let dev: Vec<_> = (0..100).map(|i| class(if i % 2 == 0 { "a" } else { "b" })).collect();
        let reference = Reference::build("dev", &tasks, &dev);
        let monitor = Monitor::new(&tasks, Some(&reference), DriftSettings { window: 20, threshold: 0.25 });
        monitor.observe(&dev[..20]);
        let key = ("t".to_string(), "label".to_string());
        assert!(monitor.psi()[&key] < 1e-9);
        assert!(monitor.render().contains("mtl_drift_alert{task=\"t\",statistic=\"label\"} 0"));
        // Twenty answers of a class the dev set never saw: the window is all new.
        let shifted: Vec<_> = (0..20).map(|_| class("c")).collect();
        monitor.observe(&shifted);
        assert!(monitor.psi()[&key] > 5.0, "{:?}", monitor.psi());
        let text = monitor.render();
        assert!(text.contains("mtl_drift_alert{task=\"t\",statistic=\"label\"} 1"), "{text}");
        assert!(text.contains("mtl_predictions_total{task=\"t\",statistic=\"label\",category=\"c\"} 20"), "{text}");
        assert!(text.contains("mtl_drift_window{task=\"t\",statistic=\"label\"} 20"), "{text}");
        // Back to the dev distribution.
        monitor.observe(&dev[..20]);
        assert!(monitor.render().contains("mtl_drift_alert{task=\"t\",statistic=\"label\"} 0"));
        // The score's histogram uses the reference's edges (all 0.5 here: one edge).
        assert!(text.contains("mtl_prediction_values_bucket{task=\"t\",statistic=\"score\",le=\"0.5\"} 40"), "{text}");
    }
}
