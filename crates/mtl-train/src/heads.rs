//! From a task's config and label set to the head the model builds for it.

use std::collections::BTreeMap;

use mtl_config::{Config, RegressionLoss as LossConfig, TagScheme};
use mtl_core::TaskId;
use mtl_data::LabelMap;
use mtl_nn::{HeadSpec, RegressionLoss, Transitions};

/// The head of every task.
pub fn head_specs(config: &Config, labels: &BTreeMap<TaskId, LabelMap>) -> BTreeMap<TaskId, HeadSpec> {
    config
        .tasks
        .iter()
        .map(|(name, task)| {
            let map = &labels[name];
            let mut spec = HeadSpec::new(task.kind, map.len());
            spec.regression_loss = match task.loss {
                LossConfig::Mse => RegressionLoss::Mse,
                LossConfig::Huber => RegressionLoss::Huber(task.huber_delta),
            };
            if task.crf {
                spec.crf = Some(allowed_transitions(map.labels(), task.scheme));
            }
            (name.clone(), spec)
        })
        .collect()
}

/// The tag prefix (`B`, `I`, `E`, `S`, `O`) and entity type of a tag; `L`/`U` (BILOU) read as `E`/`S`.
fn parse(tag: &str) -> Option<(char, &str)> {
    if tag == "O" {
        return Some(('O', ""));
    }
    let (prefix, kind) = tag.split_once('-')?;
    let p = match prefix {
        "B" => 'B',
        "I" => 'I',
        "E" | "L" => 'E',
        "S" | "U" => 'S',
        _ => return None,
    };
    Some((p, kind))
}

/// The transitions a tag scheme allows (AllenNLP's `allowed_transitions`): for BIO, `I-X` only after `B-X`
/// or `I-X`; for BIOES, also `B-X`/`I-X` only before `I-X`/`E-X`, and a sentence starts with `O`, `B` or `S`
/// and ends with `O`, `E` or `S`. Tags outside the scheme are unconstrained.
pub fn allowed_transitions(tags: &[String], scheme: TagScheme) -> Transitions {
    let n = tags.len();
    let mut t = Transitions::all(n);
    if scheme == TagScheme::None {
        return t;
    }
    let parsed: Vec<Option<(char, &str)>> = tags.iter().map(|t| parse(t)).collect();
    let may_start = |p: char| match scheme {
        TagScheme::Bio => p != 'I',
        _ => matches!(p, 'O' | 'B' | 'S'),
    };
    let may_end = |p: char| match scheme {
        TagScheme::Bio => true,
        _ => matches!(p, 'O' | 'E' | 'S'),
    };
    let may_follow = |(p1, k1): (char, &str), (p2, k2): (char, &str)| match scheme {
        TagScheme::Bio => p2 != 'I' || (matches!(p1, 'B' | 'I') && k1 == k2),
        _ => match p1 {
            'O' | 'E' | 'S' => matches!(p2, 'O' | 'B' | 'S'),
            _ => matches!(p2, 'I' | 'E') && k1 == k2,
        },
    };
    for (i, a) in parsed.iter().enumerate() {
        if let Some(a) = a {
            t.start[i] = may_start(a.0);
            t.end[i] = may_end(a.0);
        }
        for (j, b) in parsed.iter().enumerate() {
            if let (Some(a), Some(b)) = (a, b) {
                t.allowed[i * n + j] = may_follow(*a, *b);
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn bio_forbids_inside_after_outside() {
        let t = allowed_transitions(&tags("O B-PER I-PER B-LOC I-LOC"), TagScheme::Bio);
        let ok = |a: usize, b: usize| t.allowed[a * 5 + b];
        assert!(ok(0, 1) && ok(1, 2) && ok(2, 2) && ok(2, 3) && ok(2, 0));
        assert!(!ok(0, 2) && !ok(1, 4) && !ok(3, 2));
        assert_eq!(t.start, vec![true, true, false, true, false]);
        assert!(t.end.iter().all(|&e| e));
    }

    #[test]
    fn bioes_needs_closed_entities() {
        let t = allowed_transitions(&tags("O B-X I-X E-X S-X"), TagScheme::Bioes);
        let ok = |a: usize, b: usize| t.allowed[a * 5 + b];
        assert!(ok(0, 1) && ok(1, 2) && ok(1, 3) && ok(3, 0) && ok(4, 1) && ok(0, 4));
        assert!(!ok(1, 0) && !ok(0, 3) && !ok(3, 2) && !ok(2, 4));
        assert_eq!(t.end, vec![true, false, false, true, true]);
        let none = allowed_transitions(&tags("NN VB DT"), TagScheme::None);
        assert!(none.allowed.iter().all(|&a| a));
    }
}
