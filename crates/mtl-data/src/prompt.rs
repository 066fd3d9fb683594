//! Tasks as text, for decoder models (instruction tuning). Each labelled example of a task becomes a prompt,
//! the task's instruction with the input filled in (as the user's turn of the model's chat template when it
//! has one), and a target: the label word of a classification task, one `type=value` line per tagged span of
//! a token task. The LM loss is computed on the target tokens only (token type 1 marks them). At evaluation
//! the generated text is mapped back to a label ([`label_from_text`], [`parse_pairs`]).

use std::collections::BTreeMap;

use mtl_config::{Config, TagScheme, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use tokenizers::Tokenizer;

use crate::dataset::map_labels;
use crate::{DataError, Dataset, Encoded, Example, Input, LabelMap, RawExample, RawLabel, Result};

/// The answer of a token task whose input has no tagged span.
pub const NO_SPANS: &str = "none";

/// A model's chat template (Jinja, as in `tokenizer_config.json` or GGUF metadata), with the texts of the
/// model's begin- and end-of-sequence tokens that templates may use (`bos_token`, `eos_token`).
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> std::result::Result<Self, String> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("chat", source.to_string()).map_err(|e| format!("the chat template does not parse: {e}"))?;
        Ok(Self { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    /// `content` as the user's turn (after an optional system turn), with the assistant's turn opened.
    pub fn user_turn(&self, content: &str, system: Option<&str>) -> std::result::Result<String, String> {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(minijinja::context! { role => "system", content => s });
        }
        messages.push(minijinja::context! { role => "user", content => content });
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

/// The target text of one label: the label word, or one `type=value` line per span ([`NO_SPANS`] when there
/// is none). Other task kinds have no text form yet.
pub fn target_text(task: &TaskConfig, label: &RawLabel, input: &Input) -> std::result::Result<String, String> {
    match label {
        RawLabel::Class(l) => Ok(label_word(task, l).to_string()),
        RawLabel::Tags(tags) => {
            let pairs = tag_pairs(&input.words(), tags);
            if pairs.is_empty() {
                return Ok(NO_SPANS.to_string());
            }
            Ok(pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("\n"))
        }
        _ => Err(format!("{} tasks cannot be trained on a decoder model yet", task.kind.name())),
    }
}

/// Checks that every task of `config` can be trained on a decoder model; the message names the field.
pub fn check_decoder_tasks(config: &Config) -> std::result::Result<(), (String, String)> {
    for (name, task) in &config.tasks {
        let field = |f: &str| format!("tasks.{name}.{f}");
        match task.kind {
            TaskKind::Classification => {}
            TaskKind::TokenClassification if task.scheme != TagScheme::None && !task.crf => {}
            TaskKind::TokenClassification => {
                return Err((
                    field(if task.crf { "crf" } else { "scheme" }),
                    "a decoder answers tagged spans as `type=value` lines: BIO or BIOES tags, no CRF".into(),
                ))
            }
            other => {
                return Err((field("kind"), format!("{} tasks cannot be trained on a decoder model yet", other.name())))
            }
        }
        if task.prompt.is_none() {
            return Err((field("prompt"), "a decoder model needs each task's prompt, with `{text}` where the input goes".into()));
        }
        if task.pair_field.is_some() {
            return Err((field("pair_field"), "sentence pairs are not supported on decoder models yet".into()));
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
            Some(chat) => chat.user_turn(&content, None),
            None => Ok(content),
        }
    }

    /// The prompt's tokens, with `room` tokens left for the answer within `max_len`: when the whole input
    /// does not fit, words are dropped from its end (the instruction and the chat template stay whole).
    /// The flag says whether words were dropped.
    pub fn prompt_ids(&self, task: &TaskConfig, input: &Input, room: usize) -> std::result::Result<(Vec<u32>, bool), String> {
        let limit = self.max_len.saturating_sub(room);
        let ids = self.encode(&self.prompt(task, input)?)?;
        if ids.len() <= limit {
            return Ok((ids, false));
        }
        let text = input_text(input);
        let mut words: Vec<&str> = text.split_whitespace().collect();
        let mut ids = ids;
        while ids.len() > limit {
            if words.is_empty() {
                return Err(format!(
                    "the prompt without its input and the answer take {} tokens, more than model.max_len ({}); raise it",
                    ids.len() + room,
                    self.max_len
                ));
            }
            // Drop about as many words as there are tokens too many (at least one), then measure again.
            let excess = ids.len() - limit;
            words.truncate(words.len().saturating_sub(excess.div_ceil(2).max(1)));
            ids = self.encode(&self.prompt_with(task, &words.join(" "))?)?;
        }
        Ok((ids, true))
    }

    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| format!("cannot tokenise: {e}"))?.get_ids().to_vec())
    }

    /// One example per labelled (input, task): the prompt's tokens (type 0), then the target's and the end
    /// token (type 1), within `max_len` by shortening the input ([`PromptFormat::prompt_ids`]; such examples
    /// count as truncated). Labels are mapped to indices as for encoders, so the same scores apply.
    pub fn dataset(&self, raw: Vec<RawExample>, labels: &BTreeMap<TaskId, LabelMap>, config: &Config) -> Result<Dataset> {
        use rayon::prelude::*;
        let encoded: Vec<Result<Vec<Example>>> = raw
            .into_par_iter()
            .map(|ex| {
                let (mapped, _) = map_labels(&ex, labels)?;
                ex.labels
                    .iter()
                    .map(|(task, raw_label)| {
                        let tc = &config.tasks[task];
                        let at = |m: String| DataError::at(&ex.location, format!("task `{task}`: {m}"));
                        let mut target = self.encode(&target_text(tc, raw_label, &ex.input).map_err(at)?).map_err(at)?;
                        target.push(self.eos);
                        let (prompt, truncated) = self.prompt_ids(tc, &ex.input, target.len()).map_err(at)?;
                        let mut ids = prompt.clone();
                        ids.extend(&target);
                        let mut type_ids = vec![0; prompt.len()];
                        type_ids.resize(ids.len(), 1);
                        Ok(Example {
                            location: ex.location.clone(),
                            input: ex.input.clone(),
                            encoded: Encoded { ids, type_ids, word_starts: Vec::new(), truncated },
                            labels: mapped.get(task).map(|l| (task.clone(), l.clone())).into_iter().collect(),
                            qa: None,
                        })
                    })
                    .collect()
            })
            .collect();
        let mut examples = Vec::new();
        for e in encoded {
            examples.extend(e?);
        }
        let truncated = examples.iter().filter(|e| e.encoded.truncated).count();
        Ok(Dataset { examples, truncated })
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
        let t = task("kind = \"classification\"\nprompt = \"{text}\"\nverbalizer = { pos = \"positive\", neg = \"negative\" }");
        let labels = vec!["neg".to_string(), "pos".to_string(), "other".to_string()];
        assert_eq!(label_word(&t, "pos"), "positive");
        assert_eq!(label_word(&t, "other"), "other");
        assert_eq!(label_from_text(&t, &labels, " Positive\nmore text"), Some("pos"));
        assert_eq!(label_from_text(&t, &labels, "other"), Some("other"));
        assert_eq!(label_from_text(&t, &labels, "pos"), None, "the label word, not the label, is the answer");
    }

    #[test]
    fn decoder_tasks_are_checked() {
        let text = "[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-4\n[tasks.a]\nkind = \"regression\"\nprompt = \"{text}\"\ndata = { train = \"a.jsonl\" }\n";
        let config = Config::parse(text, std::path::Path::new("t.toml"), &[]).expect("valid");
        assert_eq!(check_decoder_tasks(&config).expect_err("regression").0, "tasks.a.kind");
        let config = Config::parse(&text.replace("regression", "classification").replace("prompt = \"{text}\"\n", ""), std::path::Path::new("t.toml"), &[]).expect("valid");
        assert_eq!(check_decoder_tasks(&config).expect_err("no prompt").0, "tasks.a.prompt");
    }

    #[test]
    fn long_inputs_lose_words_from_their_end_not_the_instruction_or_the_answer() {
        let words = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9", "say", "label", "[UNK]"];
        let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let tokenizer: Tokenizer = json.to_string().parse().expect("a word-level tokenizer");
        let t = task("kind = \"classification\"\nprompt = \"{text} say label\"");
        let format = PromptFormat { tokenizer: &tokenizer, chat: None, eos: 0, max_len: 8 };
        let input = Input::Text("w0 w1 w2 w3 w4 w5 w6 w7 w8 w9".into());
        let (ids, cut) = format.prompt_ids(&t, &input, 2).expect("fits without some words");
        assert!(cut && ids.len() <= 6, "{ids:?}");
        assert_eq!(&ids[ids.len() - 2..], &[10, 11], "the instruction after the input stays whole");
        assert_eq!(ids[0], 0, "the input keeps its beginning");
        let (ids, cut) = format.prompt_ids(&t, &Input::Text("w0 w1".into()), 2).expect("fits");
        assert_eq!((ids, cut), (vec![0, 1, 10, 11], false));
        assert!(format.prompt_ids(&t, &input, 7).is_err(), "no room even without the input");
    }

    #[test]
    fn the_chat_template_wraps_the_prompt() {
        let chat = ChatTemplate::new("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", "<s>", "</s>").expect("parses");
        assert_eq!(chat.user_turn("hi", None).expect("renders"), "<s><user>hi</s><assistant>");
        assert_eq!(chat.user_turn("hi", Some("be brief")).expect("renders"), "<s><system>be brief</s><user>hi</s><assistant>");
    }
}
