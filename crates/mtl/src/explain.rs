//! Why a prediction came out as it did: integrated gradients and gradient × input ([`mtl_nn::explain`]) of
//! every task's answer to one input, per token and per word, as JSON ([`Explanation`]) and as an HTML page
//! that colours the words ([`html`]).
//!
//! What is explained, per task kind: a class's probability (the predicted class); each predicted label's
//! probability (the most likely label when none passes its threshold); each regression output, in the data's
//! units; the probability of each tagged word's tag (every word's with [`ExplainOptions::all_words`]; a CRF
//! head's emissions, without its transitions); the probabilities that the answer starts and ends where it
//! does (at [CLS], the "no answer" position, when there is none), in the window that holds it.

use std::collections::BTreeMap;

use mtl_core::TaskId;
use mtl_data::{collate, Example, Input, Location, Piece};
use mtl_nn::explain::{attribute, Attribution, Baseline, Output, Settings};
use mtl_train::TaskInfo;
use serde::Serialize;

use crate::encoder::predict::{encoder_examples, records};
use crate::encoder::EncoderRun;
use crate::error::{bail, Error, Result};
use crate::predict::{PredictOptions, PredictionRecord, TaskPrediction};

/// Where integrated gradients start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    /// Every token but the special ones replaced by the padding token (Captum's BERT tutorials).
    #[default]
    Pad,
    /// Every token but the special ones replaced by the mask token.
    Mask,
    /// All-zero word embeddings.
    Zero,
}

impl std::str::FromStr for BaselineKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pad" => Ok(Self::Pad),
            "mask" => Ok(Self::Mask),
            "zero" => Ok(Self::Zero),
            _ => Err(format!("unknown baseline `{s}` (pad, mask or zero)")),
        }
    }
}

/// How to explain.
#[derive(Clone, Debug)]
pub struct ExplainOptions {
    /// Points on the integrated-gradients path (Captum's `n_steps`).
    pub steps: usize,
    pub baseline: BaselineKind,
    /// The tasks to explain; all of them when empty.
    pub tasks: Vec<String>,
    /// Token tasks: explain every word's tag, not only the words tagged other than `O`.
    pub all_words: bool,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        Self { steps: 50, baseline: BaselineKind::Pad, tasks: Vec::new(), all_words: false }
    }
}

/// One input's explanations: its predictions, its tokens and words, and each task's attributions.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The input and every task's prediction, as `mtl predict` prints them.
    #[serde(flatten)]
    pub record: PredictionRecord,
    /// Every task's explanations, by task.
    pub explanations: BTreeMap<String, Vec<TaskExplanation>>,
}

/// One explained output of one task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskExplanation {
    /// What is explained.
    pub target: Target,
    /// The output at the input: a probability, or a value in the data's units.
    pub score: f64,
    /// The output at the baseline.
    pub baseline_score: f64,
    /// Captum's convergence delta: the integrated gradients' sum minus `score − baseline_score` (zero for
    /// exact integration; more steps make it smaller).
    pub completeness_error: f64,
    /// The input's tokens (special ones included) and which word each belongs to.
    pub tokens: Vec<Token>,
    /// The input's words.
    pub words: Vec<Word>,
    /// Integrated gradients per token and per word (a word's tokens' sum).
    pub integrated_gradients: Attributions,
    /// Gradient × input per token and per word.
    pub gradient_x_input: Attributions,
}

/// The output an explanation explains.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    /// `probability` or `value`.
    pub score: &'static str,
    /// The class, label or tag whose probability is explained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// A regression output's name (the task's own name for a single output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The word whose tag is explained (an index into `words`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub word: Option<usize>,
    /// `start` or `end` of an answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<&'static str>,
}

/// A token of the explained input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Token {
    pub token: String,
    /// The word it belongs to (an index into `words`); `None` for a special token.
    pub word: Option<usize>,
}

/// A word of the explained input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Word {
    pub text: String,
    /// Which text it is in: `text`, `text_pair`, `question` or `context`.
    pub part: &'static str,
}

/// Attributions per token and per word.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attributions {
    pub tokens: Vec<f64>,
    pub words: Vec<f64>,
}

/// An encoded example with what is needed to show its explanation.
struct Shown {
    tokens: Vec<Token>,
    words: Vec<Word>,
}

fn shown(pieces: &[Piece], input: &Input) -> Shown {
    // Pre-split words are the words, each with its index (a token task's tags are per word).
    if let Input::Words(given) = input {
        return Shown {
            tokens: pieces
                .iter()
                .map(|p| Token { token: p.token.clone(), word: p.word.filter(|_| !p.special).map(|w| w as usize) })
                .collect(),
            words: given.iter().map(|w| Word { text: w.clone(), part: "text" }).collect(),
        };
    }
    let parts: [(&'static str, &str); 2] = match input {
        Input::Text(t) => [("text", t), ("text_pair", "")],
        Input::Pair(a, b) => [("text", a), ("text_pair", b)],
        Input::Question { question, context } => [("question", question), ("context", context)],
        Input::Words(_) => unreachable!("handled above"),
    };
    let mut words: Vec<Word> = Vec::new();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut keys: Vec<(usize, u32)> = Vec::new();
    let mut tokens = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let word = match (piece.sequence, piece.word) {
            (Some(sequence), Some(w)) => {
                let sequence = sequence.min(1);
                let at = match keys.iter().position(|k| *k == (sequence, w)) {
                    Some(at) => at,
                    None => {
                        keys.push((sequence, w));
                        spans.push(piece.offsets);
                        words.push(Word { text: String::new(), part: parts[sequence].0 });
                        keys.len() - 1
                    }
                };
                let span = &mut spans[at];
                *span = (span.0.min(piece.offsets.0), span.1.max(piece.offsets.1));
                Some(at)
            }
            _ => None,
        };
        tokens.push(Token { token: piece.token.clone(), word });
    }
    for ((word, (sequence, _)), span) in words.iter_mut().zip(&keys).zip(&spans) {
        let text = parts[*sequence].1;
        word.text = text.chars().skip(span.0).take(span.1.saturating_sub(span.0)).collect();
    }
    Shown { tokens, words }
}

/// The attributions of each token and of each word.
fn by_word(values: &[f32], tokens: &[Token], words: usize, scale: f64) -> Attributions {
    let tokens_out: Vec<f64> = values.iter().map(|&v| f64::from(v) * scale).collect();
    let mut words_out = vec![0.0; words];
    for (t, v) in tokens.iter().zip(&tokens_out) {
        if let Some(w) = t.word {
            words_out[w] += v;
        }
    }
    Attributions { tokens: tokens_out, words: words_out }
}

/// The explanations of `inputs` on an encoder run loaded for gradients ([`crate::Run::open_for_explanations`]).
pub(crate) fn explain(
    run: &EncoderRun,
    inputs: &[(Location, Input)],
    options: &ExplainOptions,
) -> Result<Vec<Explanation>> {
    let config = &run.config;
    for t in &options.tasks {
        if !config.tasks.keys().any(|k| k.as_str() == t) {
            let have: Vec<&str> = config.tasks.keys().map(TaskId::as_str).collect();
            bail!("no task `{t}` in the model; its tasks are: {}", have.join(", "));
        }
    }
    if options.steps == 0 {
        bail!("explanations need at least one integrated-gradients step");
    }
    let wanted = |t: &TaskId| options.tasks.is_empty() || options.tasks.iter().any(|n| n == t.as_str());
    let predicted = records(run, inputs, &PredictOptions { batch_size: 16, full_precision: true })?;
    let info = TaskInfo { config, labels: &run.labels };
    let shapes = info.shapes();
    let tokenizer = run.encoder.tokenizer();
    let special_id = |names: &[&str]| names.iter().find_map(|n| tokenizer.token_to_id(n));
    let replacement = match options.baseline {
        BaselineKind::Pad => Some(
            special_id(&["[PAD]", "<pad>"])
                .ok_or_else(|| Error::Usage("the tokenizer has no padding token; use the zero baseline".into()))?,
        ),
        BaselineKind::Mask => Some(
            special_id(&["[MASK]", "<mask>"])
                .ok_or_else(|| Error::Usage("the tokenizer has no mask token; use the pad or zero baseline".into()))?,
        ),
        BaselineKind::Zero => None,
    };
    let settings = Settings { steps: options.steps, ..Settings::default() };
    let mut out = Vec::with_capacity(inputs.len());
    for (n, ((location, input), record)) in inputs.iter().zip(predicted).enumerate() {
        let at = |m: String| Error::Usage(format!("{}:{}: {m}", location.path.display(), location.line));
        let examples = encoder_examples(run, location, input, n).map_err(at)?;
        let mut explanations = BTreeMap::new();
        for (task, prediction) in &record.predictions {
            let task_id = TaskId::new(task).map_err(|e| Error::Usage(e.to_string()))?;
            if !wanted(&task_id) {
                continue;
            }
            let task_config = &config.tasks[&task_id];
            let map = &run.labels[&task_id];
            // The window (QA) or the example, and what to explain in it.
            let mut targets: Vec<(Target, Output, f64)> = Vec::new();
            let probability =
                |label: Option<String>| Target { score: "probability", label, output: None, word: None, answer: None };
            let mut example: &Example = &examples[0];
            let mut window_pieces = None;
            match prediction {
                TaskPrediction::Class { label, .. } => {
                    let id = map.id(label).ok_or_else(|| Error::Usage(format!("unknown label {label}")))?;
                    targets.push((probability(Some(label.clone())), Output::Class(id), 1.0));
                }
                TaskPrediction::Labels { labels, scores } => {
                    let chosen: Vec<String> = match labels.is_empty() {
                        false => labels.clone(),
                        true => scores
                            .iter()
                            .max_by(|a, b| a.1.total_cmp(b.1))
                            .map(|(l, _)| vec![l.clone()])
                            .unwrap_or_default(),
                    };
                    for label in chosen {
                        let id = map.id(&label).ok_or_else(|| Error::Usage(format!("unknown label {label}")))?;
                        targets.push((probability(Some(label)), Output::Label(id), 1.0));
                    }
                }
                TaskPrediction::Value { .. } | TaskPrediction::Values { .. } => {
                    let outputs = map.len().max(1);
                    for i in 0..outputs {
                        let name = if outputs == 1 { task.clone() } else { map.label(i as u32).to_string() };
                        let std = map.scale.as_ref().and_then(|s| s.std.get(i).copied()).unwrap_or(1.0);
                        let target =
                            Target { score: "value", label: None, output: Some(name), word: None, answer: None };
                        targets.push((target, Output::Value(i), std));
                    }
                }
                TaskPrediction::Tags { tags, .. } => {
                    for (w, tag) in tags.iter().enumerate() {
                        if tag == "O" && !options.all_words {
                            continue;
                        }
                        let Some(Some(position)) = example.encoded.word_starts.get(w) else { continue };
                        let Some(id) = map.id(tag) else { continue };
                        targets.push((
                            Target { word: Some(w), ..probability(Some(tag.clone())) },
                            Output::Tag { position: *position, tag: id },
                            1.0,
                        ));
                    }
                }
                TaskPrediction::Answer { start, end, .. } => {
                    let Input::Question { question, context } = input else { continue };
                    let windows = run
                        .encoder
                        .question_windows(
                            question,
                            context,
                            task_config.max_query_len,
                            task_config.doc_stride(run.encoder.max_len()),
                        )
                        .map_err(at)?;
                    // The first window holding the whole answer; the first window for no answer.
                    let found = match (start, end) {
                        (Some(s), Some(e)) => windows.iter().enumerate().find_map(|(i, w)| {
                            let first = w.offsets.iter().position(|o| o.is_some_and(|o| o.0 <= *s && *s < o.1))?;
                            let last = w.offsets.iter().position(|o| o.is_some_and(|o| o.0 < *e && *e <= o.1))?;
                            Some((i, first, last))
                        }),
                        _ => None,
                    };
                    let (window, first, last) = found.unwrap_or((0, 0, 0));
                    example = &examples[window.min(examples.len() - 1)];
                    window_pieces = windows.into_iter().nth(window).map(|w| w.pieces);
                    targets.push((Target { answer: Some("start"), ..probability(None) }, Output::Start(first), 1.0));
                    targets.push((Target { answer: Some("end"), ..probability(None) }, Output::End(last), 1.0));
                }
                _ => continue,
            }
            if targets.is_empty() {
                continue;
            }
            let pieces = match window_pieces {
                Some(p) => p,
                None => run.encoder.pieces(&example.input).map_err(at)?,
            };
            let view = shown(&pieces, &example.input);
            let batch = collate(&[example], &shapes);
            if view.tokens.len() != batch.seq {
                bail!(
                    "{}:{}: the tokens shown do not match the tokens encoded; this is a bug",
                    location.path.display(),
                    location.line
                );
            }
            let baseline = match replacement {
                Some(id) => Baseline::Tokens(
                    batch.input_ids.iter().zip(&pieces).map(|(&t, p)| if p.special { t } else { id }).collect(),
                ),
                None => Baseline::Zero,
            };
            let outputs: Vec<Output> = targets.iter().map(|t| t.1).collect();
            let attributions = attribute(&run.model, &batch, &task_id, &outputs, &baseline, &settings)?;
            let shift = map.scale.as_ref();
            let list = targets
                .into_iter()
                .zip(attributions)
                .map(|((target, output, scale), a): ((Target, Output, f64), Attribution)| {
                    let unscale = |v: f32| match (output, shift) {
                        (Output::Value(i), Some(s)) => f64::from(v) * s.std[i] + s.mean[i],
                        _ => f64::from(v),
                    };
                    TaskExplanation {
                        target,
                        score: unscale(a.output),
                        baseline_score: unscale(a.baseline_output),
                        completeness_error: f64::from(a.delta) * scale,
                        integrated_gradients: by_word(&a.integrated, &view.tokens, view.words.len(), scale),
                        gradient_x_input: by_word(&a.gradient_input, &view.tokens, view.words.len(), scale),
                        tokens: view.tokens.clone(),
                        words: view.words.clone(),
                    }
                })
                .collect();
            explanations.insert(task.clone(), list);
        }
        out.push(Explanation { record, explanations });
    }
    Ok(out)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A self-contained HTML page of `explanations`: per input and task, each explained output with its words
/// coloured by integrated gradients (green for evidence for the output, red against; the strongest word of
/// the line at full colour); each word's attributions in its tooltip.
pub fn html(explanations: &[Explanation], title: &str) -> String {
    let mut page = String::new();
    page.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    page.push_str(&format!("<title>{}</title>", escape(title)));
    page.push_str(
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}\
         h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em;border-top:1px solid #ccc;padding-top:1em}\
         table{border-collapse:collapse;width:100%}td,th{text-align:left;vertical-align:top;padding:.35em .5em;border-bottom:1px solid #eee}\
         th{font-weight:600;font-size:.9em;color:#555}.w{padding:.1em .15em;border-radius:.25em;margin:0 .05em;line-height:1.9}\
         .part{color:#888;font-size:.8em;margin:0 .4em}.target{font-weight:600}.num{font-variant-numeric:tabular-nums;color:#555;font-size:.9em}\
         .legend span{padding:.1em .4em;border-radius:.25em;margin-right:.5em}.tagged{outline:2px solid #333}</style></head><body>",
    );
    page.push_str(&format!("<h1>{}</h1>", escape(title)));
    page.push_str(
        "<p class=\"legend\">Integrated gradients per word: <span style=\"background:rgba(0,150,60,.6)\">for the output</span>\
         <span style=\"background:rgba(210,40,40,.6)\">against it</span> (each line scaled to its strongest word; \
         hover a word for its values). Completeness: the attributions add up to score − baseline score, up to the error shown.</p>",
    );
    for (n, e) in explanations.iter().enumerate() {
        let input = [&e.record.text, &e.record.text_pair, &e.record.question]
            .iter()
            .filter_map(|t| t.as_deref())
            .collect::<Vec<_>>()
            .join(" | ");
        page.push_str(&format!("<h2>{}. {}</h2>", n + 1, escape(&input)));
        page.push_str("<table><tr><th>task</th><th>explained</th><th>score (baseline)</th><th>words</th></tr>");
        for (task, list) in &e.explanations {
            for x in list {
                let mut what = match (&x.target.label, &x.target.output, x.target.answer) {
                    (Some(label), ..) => label.clone(),
                    (None, Some(output), _) => output.clone(),
                    (None, None, Some(side)) => format!("answer {side}"),
                    _ => String::new(),
                };
                if let Some(w) = x.target.word {
                    what = format!("{} = {what}", x.words.get(w).map_or("", |w| w.text.as_str()));
                }
                let strongest = x.integrated_gradients.words.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
                let mut words = String::new();
                let mut part = "";
                for (i, (word, value)) in x.words.iter().zip(&x.integrated_gradients.words).enumerate() {
                    if word.part != part {
                        if !part.is_empty() {
                            words.push_str(&format!("<span class=\"part\">{}</span>", word.part));
                        }
                        part = word.part;
                    }
                    let alpha = (value.abs() / strongest * 0.8).min(0.8);
                    let colour = if *value >= 0.0 {
                        format!("rgba(0,150,60,{alpha:.3})")
                    } else {
                        format!("rgba(210,40,40,{alpha:.3})")
                    };
                    let class = if x.target.word == Some(i) { "w tagged" } else { "w" };
                    words.push_str(&format!(
                        "<span class=\"{class}\" style=\"background:{colour}\" title=\"integrated gradients {:+.4}, gradient × input {:+.4}\">{}</span> ",
                        value,
                        x.gradient_x_input.words[i],
                        escape(&word.text)
                    ));
                }
                page.push_str(&format!(
                    "<tr><td>{}</td><td class=\"target\">{}</td><td class=\"num\">{:.4} ({:.4})<br>error {:.1e}</td><td>{}</td></tr>",
                    escape(task),
                    escape(&what),
                    x.score,
                    x.baseline_score,
                    x.completeness_error.abs(),
                    words
                ));
            }
        }
        page.push_str("</table>");
    }
    page.push_str("</body></html>\n");
    page
}
