//! Entity-level precision, recall and F1 for BIO/IOBES tags, computed as `seqeval` 1.2.2 does in its default
//! (conlleval-compatible, non-strict) mode. Verified against seqeval on the committed fixture
//! `tests/fixtures/seqeval.json` (made by `scripts/make_fixtures.py`).
//!
//! Reference: <https://github.com/chakki-works/seqeval/blob/master/seqeval/metrics/sequence_labeling.py>.

use std::collections::BTreeSet;

use crate::{f1, ratio, Prf};

/// A chunk: its type and the first and last position (inclusive) in the flattened tag sequence.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Entity {
    pub kind: String,
    pub start: usize,
    pub end: usize,
}

/// Micro-averaged entity scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EntityScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Number of gold entities.
    pub support: usize,
}

fn split_tag(tag: &str) -> (char, &str) {
    let prefix = tag.chars().next().unwrap_or('O');
    let rest = &tag[prefix.len_utf8().min(tag.len())..];
    // seqeval: `chunk[1:].split('-', maxsplit=1)[-1] or '_'`
    let kind = rest.split_once('-').map_or(rest, |(_, k)| k);
    (prefix, if kind.is_empty() { "_" } else { kind })
}

fn end_of_chunk(prev_tag: char, tag: char, prev_kind: &str, kind: &str) -> bool {
    matches!(prev_tag, 'E' | 'S')
        || (matches!(prev_tag, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev_tag != 'O' && prev_tag != '.' && prev_kind != kind)
}

fn start_of_chunk(prev_tag: char, tag: char, prev_kind: &str, kind: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev_tag, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_kind != kind)
}

/// The entities of several sentences, which are flattened with an `O` between them as seqeval does.
pub fn entities<S: AsRef<str>>(sentences: &[Vec<S>]) -> Vec<Entity> {
    let flat = sentences.iter().flat_map(|s| s.iter().map(|t| t.as_ref()).chain(std::iter::once("O")));
    let mut chunks = Vec::new();
    let (mut prev_tag, mut prev_kind, mut begin) = ('O', "", 0);
    for (i, t) in flat.chain(std::iter::once("O")).enumerate() {
        let (tag, kind) = split_tag(t);
        if end_of_chunk(prev_tag, tag, prev_kind, kind) {
            chunks.push(Entity { kind: prev_kind.to_string(), start: begin, end: i - 1 });
        }
        if start_of_chunk(prev_tag, tag, prev_kind, kind) {
            begin = i;
        }
        (prev_tag, prev_kind) = (tag, kind);
    }
    chunks
}

/// Micro precision, recall and F1 over entities (seqeval's `precision_score`, `recall_score`, `f1_score`).
pub fn entity_scores<S: AsRef<str>>(gold: &[Vec<S>], pred: &[Vec<S>]) -> EntityScores {
    assert_eq!(gold.len(), pred.len(), "entity_scores: sentence counts differ; this is a bug");
    for (g, p) in gold.iter().zip(pred) {
        assert_eq!(g.len(), p.len(), "entity_scores: a sentence's tag counts differ; this is a bug");
    }
    let gold: BTreeSet<Entity> = entities(gold).into_iter().collect();
    let pred: BTreeSet<Entity> = entities(pred).into_iter().collect();
    let correct = gold.intersection(&pred).count();
    let precision = ratio(correct, pred.len());
    let recall = ratio(correct, gold.len());
    EntityScores { precision, recall, f1: f1(precision, recall), support: gold.len() }
}

/// Entity scores per type with micro, macro and weighted averages (seqeval's `classification_report`,
/// default mode).
pub fn entity_report<S: AsRef<str>>(gold: &[Vec<S>], pred: &[Vec<S>]) -> crate::ClassificationReport<String> {
    let micro = entity_scores(gold, pred);
    let gold: BTreeSet<Entity> = entities(gold).into_iter().collect();
    let pred: BTreeSet<Entity> = entities(pred).into_iter().collect();
    let kinds: BTreeSet<&str> = gold.iter().chain(&pred).map(|e| e.kind.as_str()).collect();
    let classes: Vec<(String, Prf)> = kinds
        .into_iter()
        .map(|k| {
            let g = gold.iter().filter(|e| e.kind == k).count();
            let p = pred.iter().filter(|e| e.kind == k).count();
            let tp = gold.iter().filter(|e| e.kind == k && pred.contains(e)).count();
            // seqeval reports the harmonic mean of precision and recall.
            let (precision, recall) = (ratio(tp, p), ratio(tp, g));
            (k.to_string(), Prf { precision, recall, f1: f1(precision, recall), support: g })
        })
        .collect();
    let scores: Vec<Prf> = classes.iter().map(|(_, p)| *p).collect();
    let (macro_avg, weighted_avg) = crate::classification::averages(&scores);
    crate::ClassificationReport {
        classes,
        accuracy: 0.0,
        macro_avg,
        micro_avg: Prf { precision: micro.precision, recall: micro.recall, f1: micro.f1, support: micro.support },
        weighted_avg,
    }
}

/// The fraction of tags predicted exactly (seqeval's `accuracy_score`).
pub fn token_accuracy<S: AsRef<str>>(gold: &[Vec<S>], pred: &[Vec<S>]) -> f64 {
    let pairs = gold.iter().zip(pred).flat_map(|(g, p)| g.iter().zip(p));
    let (mut right, mut total) = (0, 0);
    for (g, p) in pairs {
        total += 1;
        right += usize::from(g.as_ref() == p.as_ref());
    }
    ratio(right, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn seqeval_readme_example() {
        // From seqeval's README: f1_score = 0.5, precision = 0.5, recall = 0.5.
        let gold = vec![tags("O O O B-MISC I-MISC I-MISC O"), tags("B-PER I-PER O")];
        let pred = vec![tags("O O B-MISC I-MISC I-MISC I-MISC O"), tags("B-PER I-PER O")];
        let s = entity_scores(&gold, &pred);
        assert_eq!((s.precision, s.recall, s.f1, s.support), (0.5, 0.5, 0.5, 2));
    }

    #[test]
    fn lenient_chunks_like_conlleval() {
        // An I- after O starts a chunk; a change of type ends one.
        let e = entities(&[tags("I-A I-A B-B I-C O")]);
        let kinds: Vec<_> = e.iter().map(|e| (e.kind.as_str(), e.start, e.end)).collect();
        assert_eq!(kinds, vec![("A", 0, 1), ("B", 2, 2), ("C", 3, 3)]);
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    /// Cases made by `scripts/make_fixtures.py` with seqeval 1.2.2 (default mode).
    #[test]
    fn matches_seqeval_on_fixture() -> Result<(), Box<dyn std::error::Error>> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/seqeval.json");
        let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        assert!(cases.len() >= 30);
        for (i, case) in cases.iter().enumerate() {
            let gold: Vec<Vec<String>> = serde_json::from_value(case["gold"].clone())?;
            let pred: Vec<Vec<String>> = serde_json::from_value(case["pred"].clone())?;
            let s = entity_scores(&gold, &pred);
            for (name, got) in [("precision", s.precision), ("recall", s.recall), ("f1", s.f1)] {
                let want = case[name].as_f64().ok_or("number")?;
                assert!((got - want).abs() < 1e-12, "case {i} {name}: {got} vs seqeval {want}");
            }
            let want = case["accuracy"].as_f64().ok_or("number")?;
            assert!((token_accuracy(&gold, &pred) - want).abs() < 1e-12, "case {i} accuracy");
        }
        Ok(())
    }

    /// With distinct words, (type, words) pairs identify spans, so pair F1 is seqeval's entity F1.
    #[test]
    fn pair_scores_match_seqeval_when_values_are_distinct() -> Result<(), Box<dyn std::error::Error>> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/seqeval.json");
        let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let pairs = |sentence: &Vec<String>| -> Vec<(String, String)> {
            entities(std::slice::from_ref(sentence))
                .into_iter()
                .map(|e| (e.kind, (e.start..=e.end).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")))
                .collect()
        };
        for (i, case) in cases.iter().enumerate() {
            let gold: Vec<Vec<String>> = serde_json::from_value(case["gold"].clone())?;
            let pred: Vec<Vec<String>> = serde_json::from_value(case["pred"].clone())?;
            let s = crate::pair_scores(
                &gold.iter().map(pairs).collect::<Vec<_>>(),
                &pred.iter().map(pairs).collect::<Vec<_>>(),
            );
            for (name, got) in [("precision", s.precision), ("recall", s.recall), ("f1", s.f1)] {
                let want = case[name].as_f64().ok_or("number")?;
                assert!((got - want).abs() < 1e-12, "case {i} {name}: {got} vs seqeval {want}");
            }
        }
        // A repeated pair counts once per occurrence on each side.
        let p = |v: &[(&'static str, &'static str)]| v.to_vec();
        let s = crate::pair_scores(
            &[p(&[("to", "boston"), ("to", "boston")])],
            &[p(&[("to", "boston"), ("to", "boston"), ("to", "boston")])],
        );
        assert_eq!((s.precision, s.recall), (2.0 / 3.0, 1.0));
        Ok(())
    }
}
