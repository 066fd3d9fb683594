//! Single-label classification metrics, as scikit-learn 1.9 computes them with `zero_division=0`:
//! `accuracy_score`, `precision_recall_fscore_support` (per class, macro, micro, weighted), the
//! `classification_report`, and `matthews_corrcoef`. Verified on `tests/fixtures/classification.json`
//! (made by `scripts/make_fixtures.py`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::ratio;

/// The fraction of predictions equal to their gold label.
pub fn accuracy<T: PartialEq>(gold: &[T], pred: &[T]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "accuracy: gold and predictions differ in length; this is a bug");
    ratio(gold.iter().zip(pred).filter(|(g, p)| g == p).count(), gold.len())
}

/// Precision, recall, F1 and support (the number of gold examples) of one class or one average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

impl Prf {
    /// From counts of true positives, predicted positives and gold positives. F1 is `2tp / (2tp + fp + fn)`,
    /// 0 when that is 0/0 (scikit-learn ≥ 1.3).
    pub fn from_counts(tp: usize, predicted: usize, gold: usize) -> Self {
        Self {
            precision: ratio(tp, predicted),
            recall: ratio(tp, gold),
            f1: ratio(2 * tp, predicted + gold),
            support: gold,
        }
    }
}

/// Per-class scores and their averages over the classes seen in gold or predictions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport<T> {
    /// Every class seen in gold or predictions, in order.
    pub classes: Vec<(T, Prf)>,
    pub accuracy: f64,
    /// Unweighted mean over classes.
    pub macro_avg: Prf,
    /// From counts summed over classes (equal to accuracy for single-label data).
    pub micro_avg: Prf,
    /// Mean over classes weighted by support.
    pub weighted_avg: Prf,
}

/// Averages of per-class scores: unweighted, and weighted by support.
pub(crate) fn averages(per_class: &[Prf]) -> (Prf, Prf) {
    let n = per_class.len().max(1) as f64;
    let support: usize = per_class.iter().map(|c| c.support).sum();
    let mean = |f: fn(&Prf) -> f64| per_class.iter().map(f).sum::<f64>() / n;
    let weighted = |f: fn(&Prf) -> f64| {
        if support == 0 {
            0.0
        } else {
            per_class.iter().map(|c| f(c) * c.support as f64).sum::<f64>() / support as f64
        }
    };
    let macro_avg = Prf { precision: mean(|c| c.precision), recall: mean(|c| c.recall), f1: mean(|c| c.f1), support };
    let weighted_avg =
        Prf { precision: weighted(|c| c.precision), recall: weighted(|c| c.recall), f1: weighted(|c| c.f1), support };
    (macro_avg, weighted_avg)
}

/// The confusion matrix over the classes seen in gold or predictions (sorted): `counts[g][p]` examples of
/// gold class `g` predicted as `p` (scikit-learn's `confusion_matrix` with those labels).
pub fn confusion_matrix<T: Ord + Clone>(gold: &[T], pred: &[T]) -> (Vec<T>, Vec<Vec<usize>>) {
    let classes: Vec<T> = gold.iter().chain(pred).collect::<BTreeSet<&T>>().into_iter().cloned().collect();
    let index = |c: &T| classes.binary_search(c).expect("every class is listed");
    let mut counts = vec![vec![0; classes.len()]; classes.len()];
    for (g, p) in gold.iter().zip(pred) {
        counts[index(g)][index(p)] += 1;
    }
    (classes, counts)
}

/// scikit-learn's `classification_report` as numbers: per class, macro, micro and weighted averages.
pub fn classification_report<T: Ord + Clone>(gold: &[T], pred: &[T]) -> ClassificationReport<T> {
    assert_eq!(gold.len(), pred.len(), "classification_report: gold and predictions differ in length; this is a bug");
    let classes: BTreeSet<&T> = gold.iter().chain(pred).collect();
    let mut counts: BTreeMap<&T, (usize, usize, usize)> = classes.iter().map(|&c| (c, (0, 0, 0))).collect();
    for (g, p) in gold.iter().zip(pred) {
        counts.get_mut(p).expect("every class is counted").1 += 1;
        let c = counts.get_mut(g).expect("every class is counted");
        c.2 += 1;
        c.0 += usize::from(g == p);
    }
    let per_class: Vec<(T, Prf)> =
        counts.iter().map(|(&c, &(tp, np, ng))| (c.clone(), Prf::from_counts(tp, np, ng))).collect();
    let scores: Vec<Prf> = per_class.iter().map(|(_, p)| *p).collect();
    let (macro_avg, weighted_avg) = averages(&scores);
    let tp: usize = counts.values().map(|c| c.0).sum();
    ClassificationReport {
        classes: per_class,
        accuracy: accuracy(gold, pred),
        macro_avg,
        micro_avg: Prf::from_counts(tp, pred.len(), gold.len()),
        weighted_avg,
    }
}

/// The unweighted mean of per-class F1 over every class seen in gold or predictions
/// (`f1_score(average="macro", zero_division=0)`).
pub fn macro_f1<T: Ord + Clone>(gold: &[T], pred: &[T]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    classification_report(gold, pred).macro_avg.f1
}

/// The Matthews correlation coefficient, multi-class (`matthews_corrcoef`): 0 when it is undefined.
pub fn mcc<T: Ord>(gold: &[T], pred: &[T]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "mcc: gold and predictions differ in length; this is a bug");
    let mut t_sum: BTreeMap<&T, f64> = BTreeMap::new();
    let mut p_sum: BTreeMap<&T, f64> = BTreeMap::new();
    let mut correct = 0.0;
    for (g, p) in gold.iter().zip(pred) {
        *t_sum.entry(g).or_default() += 1.0;
        *p_sum.entry(p).or_default() += 1.0;
        correct += f64::from(u8::from(g == p));
    }
    let n = gold.len() as f64;
    let dot_tp: f64 = t_sum.iter().map(|(c, t)| t * p_sum.get(c).copied().unwrap_or(0.0)).sum();
    let cov_ytyp = correct * n - dot_tp;
    let cov_ypyp = n * n - p_sum.values().map(|p| p * p).sum::<f64>();
    let cov_ytyt = n * n - t_sum.values().map(|t| t * t).sum::<f64>();
    if cov_ypyp * cov_ytyt == 0.0 {
        return 0.0;
    }
    cov_ytyp / (cov_ytyt * cov_ypyp).sqrt()
}

/// The fraction of examples on which every task is right (the "sentence" or "frame" accuracy of joint
/// intent detection and slot filling): `correct[t][i]` says whether task `t` is right on example `i`.
pub fn frame_accuracy(correct: &[Vec<bool>]) -> f64 {
    let Some(first) = correct.first() else {
        return 0.0;
    };
    let n = first.len();
    assert!(correct.iter().all(|c| c.len() == n), "frame_accuracy: tasks differ in length; this is a bug");
    ratio((0..n).filter(|&i| correct.iter().all(|c| c[i])).count(), n)
}

/// The report as scikit-learn prints it (four decimals).
pub fn format_report<T: std::fmt::Display>(report: &ClassificationReport<T>) -> String {
    let width = report.classes.iter().map(|(c, _)| c.to_string().chars().count()).max().unwrap_or(0).max(12);
    let mut out = format!("{:>width$} {:>9} {:>9} {:>9} {:>9}\n\n", "", "precision", "recall", "f1-score", "support");
    let mut row = |name: &str, p: &Prf| {
        let _ = writeln!(out, "{name:>width$} {:>9.4} {:>9.4} {:>9.4} {:>9}", p.precision, p.recall, p.f1, p.support);
    };
    for (c, p) in &report.classes {
        row(&c.to_string(), p);
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "{:>width$} {:>9} {:>9} {:>9.4} {:>9}",
        "accuracy", "", "", report.accuracy, report.macro_avg.support
    );
    let mut row = |name: &str, p: &Prf| {
        let _ = writeln!(out, "{name:>width$} {:>9.4} {:>9.4} {:>9.4} {:>9}", p.precision, p.recall, p.f1, p.support);
    };
    row("macro avg", &report.macro_avg);
    row("weighted avg", &report.weighted_avg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_matrix_counts_gold_by_prediction() {
        // sklearn.metrics.confusion_matrix(["a","b","a","c"], ["a","a","b","c"], labels=["a","b","c"])
        let (labels, m) = confusion_matrix(&["a", "b", "a", "c"], &["a", "a", "b", "c"]);
        assert_eq!(labels, vec!["a", "b", "c"]);
        assert_eq!(m, vec![vec![1, 1, 0], vec![1, 0, 0], vec![0, 0, 1]]);
    }

    #[test]
    fn accuracy_and_macro_f1_match_sklearn() {
        // sklearn 1.x: accuracy_score = 0.6, f1_score(average="macro") = 0.611111111111111
        let gold = ["a", "a", "b", "c", "c"];
        let pred = ["a", "b", "b", "c", "a"];
        assert!((accuracy(&gold, &pred) - 0.6).abs() < 1e-12);
        assert!((macro_f1(&gold, &pred) - 0.611_111_111_111_111).abs() < 1e-12);
        let text = format_report(&classification_report(&gold, &pred));
        assert!(text.contains("weighted avg") && text.contains("0.6111"), "{text}");
    }

    #[test]
    fn frame_needs_every_task() {
        let c = vec![vec![true, true, false], vec![true, false, false]];
        assert!((frame_accuracy(&c) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(frame_accuracy(&[]), 0.0);
    }

    #[test]
    fn mcc_edge_cases() {
        assert_eq!(mcc(&[1, 1, 1], &[1, 1, 1]), 0.0, "undefined: one class only");
        assert!((mcc(&[0, 1, 0, 1], &[0, 1, 0, 1]) - 1.0).abs() < 1e-12);
        assert!((mcc(&[0, 1, 0, 1], &[1, 0, 1, 0]) + 1.0).abs() < 1e-12);
    }
}
