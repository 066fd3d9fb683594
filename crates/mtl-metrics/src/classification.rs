//! Single-label classification metrics, as sklearn computes them (`accuracy_score`, `f1_score(average="macro")`).

use std::collections::BTreeSet;

use crate::{f1, ratio};

/// The fraction of predictions equal to their gold label.
pub fn accuracy<T: PartialEq>(gold: &[T], pred: &[T]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "accuracy: gold and predictions differ in length; this is a bug");
    ratio(gold.iter().zip(pred).filter(|(g, p)| g == p).count(), gold.len())
}

/// The unweighted mean of per-class F1 over every class seen in gold or predictions
/// (sklearn's `f1_score(average="macro", zero_division=0)`).
pub fn macro_f1<T: Ord>(gold: &[T], pred: &[T]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "macro_f1: gold and predictions differ in length; this is a bug");
    let classes: BTreeSet<&T> = gold.iter().chain(pred).collect();
    if classes.is_empty() {
        return 0.0;
    }
    let total: f64 = classes
        .iter()
        .map(|&c| {
            let tp = gold.iter().zip(pred).filter(|(g, p)| *g == c && *p == c).count();
            let n_pred = pred.iter().filter(|p| *p == c).count();
            let n_gold = gold.iter().filter(|g| *g == c).count();
            f1(ratio(tp, n_pred), ratio(tp, n_gold))
        })
        .sum();
    total / classes.len() as f64
}

/// The fraction of examples on which every task is right (the "sentence" or "frame" accuracy of joint
/// intent detection and slot filling): `correct[t][i]` says whether task `t` is right on example `i`.
pub fn frame_accuracy(correct: &[Vec<bool>]) -> f64 {
    let Some(first) = correct.first() else { return 0.0 };
    let n = first.len();
    assert!(correct.iter().all(|c| c.len() == n), "frame_accuracy: tasks differ in length; this is a bug");
    ratio((0..n).filter(|&i| correct.iter().all(|c| c[i])).count(), n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1_match_sklearn() {
        // sklearn 1.x: accuracy_score = 0.6, f1_score(average="macro") = 0.611111111111111
        let gold = ["a", "a", "b", "c", "c"];
        let pred = ["a", "b", "b", "c", "a"];
        assert!((accuracy(&gold, &pred) - 0.6).abs() < 1e-12);
        assert!((macro_f1(&gold, &pred) - 0.611_111_111_111_111).abs() < 1e-12);
    }

    #[test]
    fn frame_needs_every_task() {
        let c = vec![vec![true, true, false], vec![true, false, false]];
        assert!((frame_accuracy(&c) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(frame_accuracy(&[]), 0.0);
    }
}
