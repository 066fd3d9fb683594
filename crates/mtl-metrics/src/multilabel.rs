//! Multi-label metrics over label sets, as scikit-learn 1.9 computes them on indicator matrices with
//! `zero_division=0`: F1 averaged micro, macro (over every label of the set), weighted and per sample, and
//! subset accuracy. Verified on `tests/fixtures/multilabel.json` (made by `scripts/make_fixtures.py`).

use serde::Serialize;

use crate::classification::{averages, Prf};
use crate::ratio;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MultiLabelScores {
    /// Per label, in label-index order.
    pub labels: Vec<Prf>,
    pub micro: Prf,
    pub macro_avg: Prf,
    pub weighted: Prf,
    /// F1 computed per example, then averaged.
    pub samples_f1: f64,
    /// The fraction of examples whose label set is predicted exactly.
    pub subset_accuracy: f64,
}

/// Scores `num_labels`-label predictions: `gold[i]` and `pred[i]` are the label indices of example `i`.
pub fn multilabel_scores(gold: &[Vec<u32>], pred: &[Vec<u32>], num_labels: usize) -> MultiLabelScores {
    assert_eq!(gold.len(), pred.len(), "multilabel_scores: gold and predictions differ in length; this is a bug");
    let mut counts = vec![(0usize, 0usize, 0usize); num_labels]; // tp, predicted, gold
    let mut samples = 0.0;
    let mut exact = 0;
    for (g, p) in gold.iter().zip(pred) {
        let mut g = g.clone();
        let mut p = p.clone();
        g.sort_unstable();
        g.dedup();
        p.sort_unstable();
        p.dedup();
        let tp = g.iter().filter(|l| p.contains(l)).count();
        for &l in &g {
            counts[l as usize].2 += 1;
        }
        for &l in &p {
            counts[l as usize].1 += 1;
            counts[l as usize].0 += usize::from(g.contains(&l));
        }
        samples += ratio(2 * tp, g.len() + p.len());
        exact += usize::from(g == p);
    }
    let labels: Vec<Prf> = counts.iter().map(|&(tp, np, ng)| Prf::from_counts(tp, np, ng)).collect();
    let (macro_avg, weighted) = averages(&labels);
    let (tp, np, ng) = counts.iter().fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    MultiLabelScores {
        labels,
        micro: Prf::from_counts(tp, np, ng),
        macro_avg,
        weighted,
        samples_f1: if gold.is_empty() { 0.0 } else { samples / gold.len() as f64 },
        subset_accuracy: ratio(exact, gold.len()),
    }
}
