//! Scores of generated text: ROUGE-L (Lin 2004) as Google's `rouge-score` package computes it (sentence-level
//! longest common subsequence of tokens; its default tokeniser: lowercase, every run of characters other than
//! a-z and 0-9 a separator, no stemming), and exact match of whitespace-trimmed text.

/// ROUGE-L of one prediction against its target.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RougeL {
    pub precision: f64,
    pub recall: f64,
    pub f: f64,
}

/// `rouge-score`'s tokens: the lowercased text split at every character outside a-z and 0-9.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { row[j + 1].max(row[j]) };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// ROUGE-L of `prediction` against `target`: precision is the common subsequence over the prediction's
/// tokens, recall over the target's, F their harmonic mean; all 0 when either has no token.
pub fn rouge_l(target: &str, prediction: &str) -> RougeL {
    let (t, p) = (rouge_tokens(target), rouge_tokens(prediction));
    if t.is_empty() || p.is_empty() {
        return RougeL::default();
    }
    let common = lcs(&t, &p) as f64;
    let (precision, recall) = (common / p.len() as f64, common / t.len() as f64);
    let f = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    RougeL { precision, recall, f }
}

/// Whether the prediction is the target, surrounding whitespace aside.
pub fn exact_text_match(target: &str, prediction: &str) -> bool {
    target.trim() == prediction.trim()
}

/// ROUGE-L of `prediction` against the reference with the highest F (the first on ties), as `rouge-score`'s
/// `score_multi` picks it.
pub fn rouge_l_multi<S: AsRef<str>>(targets: &[S], prediction: &str) -> RougeL {
    let mut best: Option<RougeL> = None;
    for t in targets {
        let r = rouge_l(t.as_ref(), prediction);
        if best.is_none_or(|b| r.f > b.f) {
            best = Some(r);
        }
    }
    best.unwrap_or_default()
}

/// Corpus scores of generated texts, each with one or more references: the mean ROUGE-L F (the best
/// reference's, [`rouge_l_multi`]) and the fraction of predictions that equal a reference ([`exact_text_match`]).
pub fn generation_scores<S: AsRef<str>>(targets: &[Vec<S>], predictions: &[String]) -> (f64, f64) {
    assert_eq!(targets.len(), predictions.len(), "one prediction per target");
    if targets.is_empty() {
        return (0.0, 0.0);
    }
    let n = targets.len() as f64;
    let rouge = targets.iter().zip(predictions).map(|(t, p)| rouge_l_multi(t, p).f).sum::<f64>() / n;
    let exact =
        targets.iter().zip(predictions).filter(|(t, p)| t.iter().any(|t| exact_text_match(t.as_ref(), p))).count()
            as f64
            / n;
    (rouge, exact)
}

/// Micro precision, recall and F1 of generated (type, value) pairs, such as the `slot=value` lines of a
/// decoder's slot filling: per example, a predicted pair is correct when an unmatched gold pair equals it
/// (a multiset intersection). Where no (type, value) repeats within an example this is seqeval's entity F1
/// without positions, which a text answer does not have.
pub fn pair_scores<S: AsRef<str> + Ord>(gold: &[Vec<(S, S)>], pred: &[Vec<(S, S)>]) -> crate::EntityScores {
    assert_eq!(gold.len(), pred.len(), "pair_scores: example counts differ; this is a bug");
    let (mut correct, mut predicted, mut support) = (0, 0, 0);
    for (g, p) in gold.iter().zip(pred) {
        let mut left: std::collections::BTreeMap<(&str, &str), usize> = std::collections::BTreeMap::new();
        for (k, v) in g {
            *left.entry((k.as_ref(), v.as_ref())).or_default() += 1;
        }
        for (k, v) in p {
            if let Some(n) = left.get_mut(&(k.as_ref(), v.as_ref())).filter(|n| **n > 0) {
                *n -= 1;
                correct += 1;
            }
        }
        predicted += p.len();
        support += g.len();
    }
    let (precision, recall) = (crate::ratio(correct, predicted), crate::ratio(correct, support));
    crate::EntityScores { precision, recall, f1: crate::f1(precision, recall), support }
}
