//! SQuAD exact match and F1, as the official SQuAD 2.0 evaluation script (`evaluate-v2.0.py`) computes them:
//! answers are normalised (lower case, ASCII punctuation removed, the articles a/an/the removed, whitespace
//! collapsed), F1 is over bags of normalised tokens, and each question takes its best score over the gold
//! answers; a question without a (non-empty) gold answer has the gold answer "" (unanswerable). Reported as
//! fractions, not percentages. Verified on `tests/fixtures/squad.json` (made by `scripts/make_fixtures.py`).

use std::collections::HashMap;

/// The official `normalize_answer`.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // `re.sub(r"\b(a|an|the)\b", " ", text)`: whole words of word characters (letters, digits, `_`).
    let mut out = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn tokens(s: &str) -> Vec<String> {
    normalize_answer(s).split_whitespace().map(String::from).collect()
}

/// 1.0 when the normalised answers are equal.
pub fn exact_match(gold: &str, pred: &str) -> f64 {
    f64::from(u8::from(normalize_answer(gold) == normalize_answer(pred)))
}

/// Token-overlap F1 of two answers.
pub fn answer_f1(gold: &str, pred: &str) -> f64 {
    let (g, p) = (tokens(gold), tokens(pred));
    if g.is_empty() || p.is_empty() {
        return f64::from(u8::from(g == p));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &g {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(c) = counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Mean exact match and F1 over questions: `gold[i]` are the answers of question `i` (empty or blank:
/// unanswerable), `pred[i]` the predicted answer ("" for no answer).
pub fn squad_scores<S: AsRef<str>>(gold: &[Vec<S>], pred: &[S]) -> (f64, f64) {
    assert_eq!(gold.len(), pred.len(), "squad_scores: lengths differ; this is a bug");
    if gold.is_empty() {
        return (0.0, 0.0);
    }
    let (mut em, mut f1) = (0.0, 0.0);
    for (answers, p) in gold.iter().zip(pred) {
        let mut golds: Vec<&str> =
            answers.iter().map(AsRef::as_ref).filter(|a| !normalize_answer(a).is_empty()).collect();
        if golds.is_empty() {
            golds.push("");
        }
        em += golds.iter().map(|g| exact_match(g, p.as_ref())).fold(0.0, f64::max);
        f1 += golds.iter().map(|g| answer_f1(g, p.as_ref())).fold(0.0, f64::max);
    }
    (em / gold.len() as f64, f1 / gold.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_normalisation() {
        assert_eq!(normalize_answer("The  Cat's hat!"), "cats hat");
        assert_eq!(normalize_answer("an apple a day"), "apple day");
        assert_eq!(answer_f1("the cat sat", "cat sat down"), 0.8);
        assert_eq!(squad_scores(&[vec!["Paris"], vec![]], &["paris", ""]), (1.0, 1.0));
    }
}
