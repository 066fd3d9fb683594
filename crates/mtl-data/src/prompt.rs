//! Tasks as text, for decoder models (instruction tuning). Each labelled example of a task becomes a prompt,
//! the task's instruction with the input filled in (as the user's turn of the model's chat template when it
//! has one), and a target ([`target_text`]): the label word of a classification task, one `type=value` line
//! per tagged span of a token task, a number, an answer, or the (first) reference text of a generation task. The LM loss is computed on the target tokens only (token type 1 marks them). At evaluation
//! the generated text is mapped back to a label ([`label_from_text`], [`parse_pairs`]).

use std::collections::BTreeMap;

use mtl_config::{Config, TagScheme, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use tokenizers::Tokenizer;

use crate::dataset::map_labels;
use crate::{DataError, Dataset, Encoded, Example, Input, Label, LabelMap, RawExample, RawLabel, Result};

/// The answer of a token task whose input has no tagged span.
pub const NO_SPANS: &str = "none";

/// A model's chat template (Jinja, as in `tokenizer_config.json` or GGUF metadata), with the texts of the
/// model's begin- and end-of-sequence tokens that templates may use (`bos_token`, `eos_token`).
/// Instructions a chat template may run for one rendering.
const TEMPLATE_FUEL: u64 = 2_000_000;

#[derive(Clone)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> std::result::Result<Self, String> {
        let mut env = minijinja::Environment::new();
        // A template comes with the model file, so it is not trusted to end: it gets a budget of instructions
        // (a chat template spends a few hundred per turn).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("the chat template does not parse: {e}"))?;
        Ok(Self { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// `content` as the user's turn (after an optional system turn), with the assistant's turn opened.
    pub fn user_turn(&self, content: &str, system: Option<&str>) -> std::result::Result<String, String> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(("system", s));
        }
        messages.push(("user", content));
        self.render(&messages)
    }

    /// A conversation of (role, content) turns, with the assistant's turn opened after it.
    pub fn render<R: AsRef<str>, C: AsRef<str>>(&self, turns: &[(R, C)]) -> std::result::Result<String, String> {
        let messages: Vec<minijinja::Value> = turns
            .iter()
            .map(|(role, content)| minijinja::context! { role => role.as_ref(), content => content.as_ref() })
            .collect();
        let ctx = minijinja::context! { messages => messages, add_generation_prompt => true, bos_token => self.bos, eos_token => self.eos };
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template.render(ctx).map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// The text of an input as a prompt shows it: word-level inputs joined by spaces, pairs on two lines.
pub fn input_text(input: &Input) -> String {
    match input {
        Input::Text(t) => t.clone(),
        Input::Words(w) => w.join(" "),
        Input::Pair(a, b) => format!("{a}\n{b}"),
        Input::Question { question, context } => format!("{question}\n{context}"),
    }
}

/// The word a classification task answers for `label`.
pub fn label_word<'a>(task: &'a TaskConfig, label: &'a str) -> &'a str {
    task.verbalizer.get(label).map_or(label, String::as_str)
}

/// The label whose word is `text` (trimmed, case-insensitive, up to the first line break), if any.
pub fn label_from_text<'a>(task: &TaskConfig, labels: &'a [String], text: &str) -> Option<&'a str> {
    let answer = text.trim().lines().next().unwrap_or("").trim().to_lowercase();
    labels.iter().find(|l| label_word(task, l).to_lowercase() == answer).map(String::as_str)
}

/// The tagged spans of `words` as (type, words joined by spaces), in order; entities as seqeval reads them.
pub fn tag_pairs<S: AsRef<str>>(words: &[String], tags: &[S]) -> Vec<(String, String)> {
    mtl_metrics::entities(&[tags.iter().map(AsRef::as_ref).collect::<Vec<&str>>()])
        .into_iter()
        .filter(|e| e.end < words.len())
        .map(|e| (e.kind, words[e.start..=e.end].join(" ")))
        .collect()
}

/// The `type=value` lines of a generated answer (split at the first `=`, trimmed; other lines ignored).
pub fn parse_pairs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

/// A regression target as an answer writes it: at most three decimals, no trailing zeros.
pub fn number_text(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// The first number in `text` (a word that parses as one once surrounding punctuation is stripped).
fn first_number(text: &str) -> Option<f64> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-')))
        // A full stop after the number ends the sentence.
        .filter_map(|w| w.parse::<f64>().or_else(|_| w.trim_end_matches('.').parse()).ok())
        .find(|v| v.is_finite())
}

/// The regression outputs an answer gives: the first number for one output; `name=value` lines for
/// several (`names` in the label map's order). `None` when an output is missing.
pub fn values_from_text(names: &[String], text: &str) -> Option<Vec<f64>> {
    if names.len() == 1 {
        return first_number(text).map(|v| vec![v]);
    }
    let pairs = parse_pairs(text);
    names.iter().map(|n| pairs.iter().find(|(k, _)| k == n).and_then(|(_, v)| first_number(v))).collect()
}

/// The indices of the labels an answer of a multi-label task names: label words separated by commas or
/// line breaks (case-insensitive; [`NO_SPANS`], or words that name no label, give none).
pub fn labels_from_text(task: &TaskConfig, labels: &[String], text: &str) -> Vec<u32> {
    let mut ids: Vec<u32> = text
        .split([',', '\n'])
        .map(|w| w.trim().to_lowercase())
        .filter_map(|w| labels.iter().position(|l| label_word(task, l).to_lowercase() == w))
        .map(|i| i as u32)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The answer of a question-answering task when its context holds none.
pub const NO_ANSWER: &str = "unanswerable";

/// The answer text of a generated reply to a question: its first line, or "" for [`NO_ANSWER`].
pub fn answer_from_text(text: &str) -> String {
    let a = text.trim().lines().next().unwrap_or("").trim();
    if a.eq_ignore_ascii_case(NO_ANSWER) {
        String::new()
    } else {
        a.to_string()
    }
}

/// The target text of one label:
/// - classification: the label word;
/// - multi-label: the label words, comma-separated ([`NO_SPANS`] for none);
/// - regression: the number ([`number_text`]), or one `name=value` line per output;
/// - token tasks: one `type=value` line per span ([`NO_SPANS`] when there is none);
/// - question answering: the first gold answer, or [`NO_ANSWER`];
/// - generation: the first reference text.
pub fn target_text(task: &TaskConfig, label: &RawLabel, input: &Input) -> std::result::Result<String, String> {
    match label {
        RawLabel::Class(l) => Ok(label_word(task, l).to_string()),
        RawLabel::Multi(ls) if ls.is_empty() => Ok(NO_SPANS.to_string()),
        RawLabel::Multi(ls) => Ok(ls.iter().map(|l| label_word(task, l)).collect::<Vec<_>>().join(", ")),
        RawLabel::Real(values) if values.len() == 1 => Ok(number_text(values[0])),
        RawLabel::Real(values) => {
            let names: Vec<String> = match &task.label_fields {
                Some(fields) => fields.clone(),
                None => (0..values.len()).map(|i| format!("{}[{i}]", task.label_field)).collect(),
            };
            Ok(names.iter().zip(values).map(|(n, v)| format!("{n}={}", number_text(*v))).collect::<Vec<_>>().join("\n"))
        }
        RawLabel::Tags(tags) => {
            let pairs = tag_pairs(&input.words(), tags);
            if pairs.is_empty() {
                return Ok(NO_SPANS.to_string());
            }
            Ok(pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("\n"))
        }
        RawLabel::Answers(a) => Ok(a.first().map_or(NO_ANSWER, |a| a.text.as_str()).to_string()),
        RawLabel::Texts(texts) => {
            texts.first().cloned().ok_or_else(|| "a generation example has no reference".to_string())
        }
    }
}

/// The label maps of a decoder's tasks, where each regression task knows its training mean, the value an answer
/// without a number counts as (kept as the map's [`crate::Scale`] with unit deviations when the targets are
/// not standardised; a decoder's targets are text either way).
pub fn with_fallback_means(
    mut labels: BTreeMap<TaskId, LabelMap>,
    config: &Config,
    train: &[RawExample],
) -> BTreeMap<TaskId, LabelMap> {
    for (task, map) in labels.iter_mut() {
        if config.tasks.get(task).is_none_or(|t| t.kind != TaskKind::Regression) || map.scale.is_some() {
            continue;
        }
        let rows: Vec<&Vec<f64>> = train
            .iter()
            .filter_map(|ex| match ex.labels.get(task) {
                Some(RawLabel::Real(v)) if v.len() == map.len() => Some(v),
                _ => None,
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let mean = (0..map.len()).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64).collect();
        map.scale = Some(crate::Scale { mean, std: vec![1.0; map.len()] });
    }
    labels
}

/// Checks that every task of `config` can be trained on a decoder model; the message names the field.
pub fn check_decoder_tasks(config: &Config) -> std::result::Result<(), (String, String)> {
    for (name, task) in &config.tasks {
        let field = |f: &str| format!("tasks.{name}.{f}");
        if task.kind == TaskKind::TokenClassification && (task.scheme == TagScheme::None || task.crf) {
            return Err((
                field(if task.crf { "crf" } else { "scheme" }),
                "a decoder answers tagged spans as `type=value` lines: BIO or BIOES tags, no CRF".into(),
            ));
        }
        if task.prompt.is_none() {
            return Err((
                field("prompt"),
                "a decoder model needs each task's prompt, with `{text}` where the input goes".into(),
            ));
        }
        if task.tune_thresholds {
            return Err((
                field("tune_thresholds"),
                "a decoder names its labels in text; it has no probabilities to tune thresholds on".into(),
            ));
        }
    }
    Ok(())
}

/// How examples become token ids for a decoder.
pub struct PromptFormat<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat: Option<&'a ChatTemplate>,
    /// Ends every target (the end-of-turn token of a chat model).
    pub eos: u32,
    /// Prompt and target together are cut to this many tokens.
    pub max_len: usize,
    /// The system turn of every prompt (a chat template's default when `None`).
    pub system: Option<&'a str>,
}

impl PromptFormat<'_> {
    /// The prompt of `task` for `input`, chat template applied.
    pub fn prompt(&self, task: &TaskConfig, input: &Input) -> std::result::Result<String, String> {
        self.prompt_with(task, &input_text(input))
    }

    fn prompt_with(&self, task: &TaskConfig, text: &str) -> std::result::Result<String, String> {
        let template = task.prompt.as_deref().ok_or("the task has no prompt")?;
        let content = template.replace("{text}", text);
        match self.chat {
            Some(chat) => chat.user_turn(&content, self.system),
            None => Ok(content),
        }
    }

    /// The prompt's tokens, with `room` tokens left for the answer within `max_len`: when the whole input
    /// does not fit, words are dropped from the end of its last part ([`shortened`]: the text, the second
    /// text of a pair, a question's context), while the instruction and the chat template stay whole. Also
    /// returns the shortened input, if words were dropped.
    pub fn prompt_ids(
        &self,
        task: &TaskConfig,
        input: &Input,
        room: usize,
    ) -> std::result::Result<(Vec<u32>, Option<Input>), String> {
        let limit = self.max_len.saturating_sub(room);
        let mut ids = self.encode(&self.prompt(task, input)?)?;
        if ids.len() <= limit {
            return Ok((ids, None));
        }
        let mut keep = cut_words(input);
        let mut cut = input.clone();
        while ids.len() > limit {
            if keep == 0 {
                return Err(format!(
                    "the prompt without its input and the answer take {} tokens, more than model.max_len ({}); raise it",
                    ids.len() + room,
                    self.max_len
                ));
            }
            // Drop about as many words as there are tokens too many (at least one), then measure again.
            let excess = ids.len() - limit;
            keep = keep.saturating_sub(excess.div_ceil(2).max(1));
            cut = shortened(input, keep);
            ids = self.encode(&self.prompt(task, &cut)?)?;
        }
        Ok((ids, Some(cut)))
    }

    /// The tokens a prompt leaves for an answer of `budget` tokens: at most half of `max_len`.
    pub fn answer_room(&self, budget: usize) -> usize {
        budget.min((self.max_len / 2).max(1))
    }

    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| format!("cannot tokenise: {e}"))?.get_ids().to_vec())
    }

    /// One example per labelled (input, task): the prompt's tokens (type 0), then the target's and the end
    /// token (type 1). Labels are mapped to indices as for encoders, so the same scores apply.
    ///
    /// Within `max_len`, the prompt leaves room for the answer: for training data (`budgets` `None`), the
    /// target, itself cut to half of `max_len` at most; for evaluation data, each task's answer budget (at
    /// most half of `max_len`), so that the gold answer does not decide how much input the model sees. Inputs
    /// that had to be shortened count as truncated. A training example of a question whose every gold answer
    /// was cut from the context is left out; the second value counts them.
    pub fn dataset(
        &self,
        raw: Vec<RawExample>,
        labels: &BTreeMap<TaskId, LabelMap>,
        config: &Config,
        budgets: Option<&BTreeMap<TaskId, usize>>,
    ) -> Result<(Dataset, usize)> {
        use rayon::prelude::*;
        let half = self.answer_room(usize::MAX);
        let encoded: Vec<Result<Vec<Option<Example>>>> = raw
            .into_par_iter()
            .map(|ex| {
                let (mapped, _) = map_labels(&ex, labels)?;
                ex.labels
                    .iter()
                    .map(|(task, raw_label)| {
                        let tc = &config.tasks[task];
                        let at = |m: String| DataError::at(&ex.location, format!("task `{task}`: {m}"));
                        let mut target =
                            self.encode(&target_text(tc, raw_label, &ex.input).map_err(at)?).map_err(at)?;
                        target.push(self.eos);
                        let long_target = target.len() > half;
                        target.truncate(half);
                        let room = match budgets {
                            Some(b) => self.answer_room(b.get(task).copied().unwrap_or(target.len())),
                            None => target.len(),
                        };
                        let (prompt, cut) = self.prompt_ids(tc, &ex.input, room).map_err(at)?;
                        if let (None, RawLabel::Answers(answers), Some(Input::Question { context, .. })) =
                            (budgets, raw_label, &cut)
                        {
                            if !answers.is_empty() && !answers.iter().any(|a| context.contains(a.text.as_str())) {
                                return Ok(None);
                            }
                        }
                        let mut ids = prompt.clone();
                        ids.extend(&target);
                        ids.truncate(self.max_len.max(prompt.len()));
                        let mut type_ids = vec![0; prompt.len()];
                        type_ids.resize(ids.len(), 1);
                        let truncated = cut.is_some() || long_target;
                        Ok(Some(Example {
                            location: ex.location.clone(),
                            input: ex.input.clone(),
                            encoded: Encoded { ids, type_ids, word_starts: Vec::new(), truncated },
                            labels: match raw_label {
                                // Scored against every gold answer ("" when there is none).
                                RawLabel::Answers(a) if a.is_empty() => {
                                    BTreeMap::from([(task.clone(), Label::Texts(vec![String::new()]))])
                                }
                                RawLabel::Answers(a) => BTreeMap::from([(
                                    task.clone(),
                                    Label::Texts(a.iter().map(|a| a.text.clone()).collect()),
                                )]),
                                _ => mapped.get(task).map(|l| (task.clone(), l.clone())).into_iter().collect(),
                            },
                            qa: None,
                        }))
                    })
                    .collect()
            })
            .collect();
        let (mut examples, mut dropped) = (Vec::new(), 0);
        for e in encoded {
            for e in e? {
                match e {
                    Some(e) => examples.push(e),
                    None => dropped += 1,
                }
            }
        }
        let truncated = examples.iter().filter(|e| e.encoded.truncated).count();
        Ok((Dataset { examples, truncated }, dropped))
    }
}

/// How many words the part of `input` that truncation shortens has (see [`shortened`]).
fn cut_words(input: &Input) -> usize {
    match input {
        Input::Text(t) | Input::Pair(_, t) | Input::Question { context: t, .. } => t.split_whitespace().count(),
        Input::Words(w) => w.len(),
    }
}

/// `input` with only the first `keep` words of its last part: the text (words joined by spaces), the
/// second text of a pair, the context of a question.
pub fn shortened(input: &Input, keep: usize) -> Input {
    let first = |t: &str| t.split_whitespace().take(keep).collect::<Vec<_>>().join(" ");
    match input {
        Input::Text(t) => Input::Text(first(t)),
        Input::Words(w) => Input::Words(w[..keep.min(w.len())].to_vec()),
        Input::Pair(a, b) => Input::Pair(a.clone(), first(b)),
        Input::Question { question, context } => {
            Input::Question { question: question.clone(), context: first(context) }
        }
    }
}

/// The prompt tokens of a decoder example (those before its target).
pub fn prompt_ids(encoded: &Encoded) -> &[u32] {
    let n = encoded.type_ids.iter().position(|&t| t == 1).unwrap_or(encoded.ids.len());
    &encoded.ids[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(extra: &str) -> TaskConfig {
        let text = format!("[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-4\n[tasks.a]\n{extra}\ndata = {{ train = \"a.jsonl\" }}\n");
        let config = Config::parse(&text, std::path::Path::new("t.toml"), &[]).expect("valid");
        config.tasks.into_values().next().expect("one task")
    }

    /// A chat template that would loop for ever (it comes with a model file) runs out of fuel instead.
    #[test]
    fn a_runaway_chat_template_stops_with_an_error() {
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(endless, "<s>", "</s>").expect("it parses");
        let err = t.user_turn("hi", None).expect_err("out of fuel");
        assert!(err.contains("the chat template failed"), "{err}");
        let fine = ChatTemplate::new("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", "", "")
            .expect("it parses");
        let turns: Vec<(&str, &str)> = (0..500).map(|_| ("user", "hello")).collect();
        assert!(fine.render(&turns).is_ok(), "a long conversation fits the budget");
    }

    #[test]
    fn spans_become_lines_and_lines_become_spans() {
        let t = task("kind = \"token_classification\"\nprompt = \"Slots: {text}\"");
        let words: Vec<String> = "flights from new york to boston".split(' ').map(String::from).collect();
        let tags = ["O", "O", "B-from", "I-from", "O", "B-to"].map(String::from).to_vec();
        let input = Input::Words(words);
        let text = target_text(&t, &RawLabel::Tags(tags), &input).expect("tags have text");
        assert_eq!(text, "from=new york\nto=boston");
        assert_eq!(parse_pairs(&text), vec![("from".into(), "new york".into()), ("to".into(), "boston".into())]);
        assert_eq!(parse_pairs(" from = new york \nnoise\n=x\nto="), vec![("from".into(), "new york".into())]);
        let none = target_text(&t, &RawLabel::Tags(vec!["O".into(); 6]), &input).expect("no spans");
        assert_eq!(none, NO_SPANS);
        assert!(parse_pairs(&none).is_empty());
    }

    #[test]
    fn label_words_map_both_ways() {
        let t = task(
            "kind = \"classification\"\nprompt = \"{text}\"\nverbalizer = { pos = \"positive\", neg = \"negative\" }",
        );
        let labels = vec!["neg".to_string(), "pos".to_string(), "other".to_string()];
        assert_eq!(label_word(&t, "pos"), "positive");
        assert_eq!(label_word(&t, "other"), "other");
        assert_eq!(label_from_text(&t, &labels, " Positive\nmore text"), Some("pos"));
        assert_eq!(label_from_text(&t, &labels, "other"), Some("other"));
        assert_eq!(label_from_text(&t, &labels, "pos"), None, "the label word, not the label, is the answer");
    }

    #[test]
    fn numbers_label_lists_and_answers_map_both_ways() {
        let input = Input::Text("x".into());
        let r = task("kind = \"regression\"\nprompt = \"{text}\"");
        assert_eq!(target_text(&r, &RawLabel::Real(vec![0.5625]), &input).expect("a number"), "0.562");
        assert_eq!(number_text(3.0), "3");
        assert_eq!(number_text(-0.0001), "0");
        let names = vec!["label".to_string()];
        assert_eq!(values_from_text(&names, "About 0.75."), Some(vec![0.75]));
        assert_eq!(values_from_text(&names, "high"), None);
        let r2 = task("kind = \"regression\"\nprompt = \"{text}\"\nlabel_fields = [\"v\", \"a\"]");
        let text = target_text(&r2, &RawLabel::Real(vec![1.0, -2.5]), &input).expect("lines");
        assert_eq!(text, "v=1\na=-2.5");
        let names = vec!["v".to_string(), "a".to_string()];
        assert_eq!(values_from_text(&names, &text), Some(vec![1.0, -2.5]));
        assert_eq!(values_from_text(&names, "v=1"), None, "an output is missing");

        let m = task("kind = \"multi_label\"\nprompt = \"{text}\"");
        let labels = vec!["politics".to_string(), "sport".to_string()];
        let text = target_text(&m, &RawLabel::Multi(vec!["sport".into(), "politics".into()]), &input).expect("words");
        assert_eq!(text, "sport, politics");
        assert_eq!(labels_from_text(&m, &labels, &text), vec![0, 1]);
        assert_eq!(labels_from_text(&m, &labels, "Sport\nweather"), vec![1]);
        assert_eq!(target_text(&m, &RawLabel::Multi(vec![]), &input).expect("none"), NO_SPANS);
        assert!(labels_from_text(&m, &labels, NO_SPANS).is_empty());

        let q = task("kind = \"question_answering\"\nprompt = \"{text}\"");
        let answers = vec![crate::Answer { text: "Ada".into(), start: 0 }];
        assert_eq!(target_text(&q, &RawLabel::Answers(answers), &input).expect("answer"), "Ada");
        assert_eq!(target_text(&q, &RawLabel::Answers(vec![]), &input).expect("none"), NO_ANSWER);
        assert_eq!(answer_from_text(" Unanswerable\n"), "");
        assert_eq!(answer_from_text("Ada Lovelace\nmore"), "Ada Lovelace");
    }

    #[test]
    fn decoder_tasks_are_checked() {
        let text = "[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-4\n[tasks.a]\nkind = \"token_classification\"\ncrf = true\nprompt = \"{text}\"\ndata = { train = \"a.jsonl\" }\n";
        let config = Config::parse(text, std::path::Path::new("t.toml"), &[]).expect("valid");
        assert_eq!(check_decoder_tasks(&config).expect_err("a CRF").0, "tasks.a.crf");
        let config =
            Config::parse(&text.replace("crf = true", "scheme = \"none\""), std::path::Path::new("t.toml"), &[])
                .expect("valid");
        assert_eq!(check_decoder_tasks(&config).expect_err("plain tags").0, "tasks.a.scheme");
        let config = Config::parse(
            &text.replace("crf = true\n", "").replace("prompt = \"{text}\"\n", ""),
            std::path::Path::new("t.toml"),
            &[],
        )
        .expect("valid");
        assert_eq!(check_decoder_tasks(&config).expect_err("no prompt").0, "tasks.a.prompt");
    }

    #[test]
    fn long_inputs_lose_words_from_their_end_not_the_instruction_or_the_answer() {
        let words = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9", "say", "label", "[UNK]"];
        let vocab: serde_json::Map<String, serde_json::Value> =
            words.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let tokenizer: Tokenizer = json.to_string().parse().expect("a word-level tokenizer");
        let t = task("kind = \"classification\"\nprompt = \"{text} say label\"");
        let format = PromptFormat { tokenizer: &tokenizer, chat: None, eos: 0, max_len: 8, system: None };
        let input = Input::Text("w0 w1 w2 w3 w4 w5 w6 w7 w8 w9".into());
        let (ids, cut) = format.prompt_ids(&t, &input, 2).expect("fits without some words");
        assert!(cut.is_some() && ids.len() <= 6, "{ids:?}");
        assert_eq!(&ids[ids.len() - 2..], &[10, 11], "the instruction after the input stays whole");
        assert_eq!(ids[0], 0, "the input keeps its beginning");
        let (ids, cut) = format.prompt_ids(&t, &Input::Text("w0 w1".into()), 2).expect("fits");
        assert_eq!((ids, cut), (vec![0, 1, 10, 11], None));
        // A question keeps its question whole and loses words of its context.
        let q = Input::Question { question: "w0 w1".into(), context: "w2 w3 w4 w5 w6 w7".into() };
        let (ids, cut) = format.prompt_ids(&t, &q, 2).expect("fits");
        assert_eq!(&ids[..2], &[0, 1]);
        assert!(
            matches!(cut, Some(Input::Question { ref question, ref context }) if question == "w0 w1" && context.starts_with("w2") && context.split(' ').count() < 6),
            "{cut:?}"
        );
        assert!(format.prompt_ids(&t, &input, 7).is_err(), "no room even without the input");
    }

    #[test]
    fn the_chat_template_wraps_the_prompt() {
        let chat = ChatTemplate::new("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", "<s>", "</s>").expect("parses");
        assert_eq!(chat.user_turn("hi", None).expect("renders"), "<s><user>hi</s><assistant>");
        assert_eq!(
            chat.user_turn("hi", Some("be brief")).expect("renders"),
            "<s><system>be brief</s><user>hi</s><assistant>"
        );
    }
}
