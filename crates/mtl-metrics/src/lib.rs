//! Host-only metrics: plain slices of labels in, numbers out. No tensors, no device.
//!
//! Every score is a fraction in [0, 1] and higher is better. Each metric family lives in its own file and
//! names the reference implementation it is verified against. Depends on nothing of ours.

mod classification;
mod generation;
mod multilabel;
mod regression;
mod seqeval;
mod squad;

pub use classification::{
    accuracy, classification_report, confusion_matrix, format_report, frame_accuracy, macro_f1, mcc,
    ClassificationReport, Prf,
};
pub use generation::{exact_text_match, generation_scores, pair_scores, rouge_l, rouge_l_multi, rouge_tokens, RougeL};
pub use multilabel::{multilabel_scores, MultiLabelScores};
pub use regression::{average_ranks, mae, mse, pearson, spearman};
pub use seqeval::{entities, entity_report, entity_scores, token_accuracy, Entity, EntityScores};
pub use squad::{answer_f1, exact_match, normalize_answer, squad_scores};

/// Whether a larger value of a metric is better: true of every score here except the errors (MSE, MAE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    HigherIsBetter,
    LowerIsBetter,
}

impl Direction {
    /// The direction of a metric by name: errors (`mse`, `mae`, `loss`) are minimised.
    pub fn of(metric: &str) -> Self {
        if matches!(metric, "mse" | "mae" | "loss") {
            Direction::LowerIsBetter
        } else {
            Direction::HigherIsBetter
        }
    }

    /// Whether `candidate` improves on `best`.
    pub fn improves(self, candidate: f64, best: f64) -> bool {
        match self {
            Direction::HigherIsBetter => candidate > best,
            Direction::LowerIsBetter => candidate < best,
        }
    }
}

/// `num / den`, or 0 when `den` is 0 (sklearn's and seqeval's `zero_division=0`).
pub(crate) fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// The harmonic mean of precision and recall, 0 when both are 0.
pub(crate) fn f1(precision: f64, recall: f64) -> f64 {
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

#[cfg(test)]
mod fixture_tests;
