//! Readers of the general formats. Each split is read once per file, whatever the number of tasks that
//! read it. Every error names the file and line, and the field when there is one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_config::{Config, DataFormat, Split, TaskConfig};
use mtl_core::{TaskId, TaskKind};
use serde_json::{Map, Value};

use crate::{DataError, Result};

/// Where an example comes from: its file and its first line (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

/// The model input of one example.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Raw text, tokenized by the model's tokenizer.
    Text(String),
    /// Pre-split words; token tasks predict one tag per word.
    Words(Vec<String>),
    /// Two texts encoded together (`[CLS] a [SEP] b [SEP]`).
    Pair(String, String),
    /// A question about a context (span-extraction QA).
    Question { question: String, context: String },
}

impl Input {
    /// The words of this input: the given ones, or the text split on whitespace.
    pub fn words(&self) -> Vec<String> {
        match self {
            Input::Text(t) => t.split_whitespace().map(String::from).collect(),
            Input::Words(w) => w.clone(),
            Input::Pair(a, b) => a.split_whitespace().chain(b.split_whitespace()).map(String::from).collect(),
            Input::Question { context, .. } => context.split_whitespace().map(String::from).collect(),
        }
    }
}

/// A gold answer of a QA example: its text and its first character in the context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub text: String,
    pub start: usize,
}

/// A label as written in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum RawLabel {
    Class(String),
    /// The labels of a multi-label example (possibly none).
    Multi(Vec<String>),
    /// Regression targets, one per output.
    Real(Vec<f64>),
    Tags(Vec<String>),
    /// The gold answers of a question (none: unanswerable).
    Answers(Vec<Answer>),
    /// The reference texts of a generation task (at least one; training targets the first).
    Texts(Vec<String>),
}

impl RawLabel {
    /// The label names it is made of: a class, each label of a multi-label example, each tag (none for
    /// targets, answers and texts).
    pub fn names(&self) -> &[String] {
        match self {
            RawLabel::Class(l) => std::slice::from_ref(l),
            RawLabel::Multi(ls) | RawLabel::Tags(ls) => ls,
            RawLabel::Real(_) | RawLabel::Answers(_) | RawLabel::Texts(_) => &[],
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RawExample {
    pub location: Location,
    pub input: Input,
    pub labels: BTreeMap<TaskId, RawLabel>,
}

/// Reads every example of `split` for all tasks. Tasks that name the same file share its examples; tasks
/// without a file for this split are skipped. The result is in file order, files in task-name order.
pub fn read_split(config: &Config, split: Split) -> Result<Vec<RawExample>> {
    let mut by_file: BTreeMap<&Path, Vec<(&TaskId, &TaskConfig)>> = BTreeMap::new();
    let mut order: Vec<&Path> = Vec::new();
    for (name, task) in &config.tasks {
        if let Some(path) = task.data.get(split) {
            if !by_file.contains_key(path) {
                order.push(path);
            }
            by_file.entry(path).or_default().push((name, task));
        }
    }
    let mut examples = Vec::new();
    for path in order {
        let tasks = &by_file[path];
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
        // Every format the same way: a byte order mark is not data, and lines end in LF or CRLF.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let before = examples.len();
        match tasks[0].1.format {
            DataFormat::Jsonl => read_jsonl(text, path, tasks, &mut examples)?,
            DataFormat::Csv => read_table(text, b',', path, tasks, &mut examples)?,
            DataFormat::Tsv => read_table(text, b'\t', path, tasks, &mut examples)?,
            DataFormat::Conll => read_conll(text, path, tasks, &mut examples)?,
            DataFormat::Conllu => read_conllu(text, path, tasks, &mut examples)?,
        }
        if examples.len() == before {
            return Err(DataError::Empty { path: path.to_owned() });
        }
        // A seeded sample of the training file, kept in file order; tasks that share the file share it.
        let limit = tasks.iter().filter_map(|(_, t)| t.train_limit).min();
        if let (Split::Train, Some(limit)) = (split, limit) {
            let n = examples.len() - before;
            if limit < n {
                let mut keep = crate::epoch_order(n, config.training.seed, 0);
                keep.truncate(limit);
                keep.sort_unstable();
                let mut read: Vec<Option<RawExample>> = examples.drain(before..).map(Some).collect();
                examples.extend(keep.into_iter().map(|i| read[i].take().expect("sampled once")));
            }
        }
    }
    Ok(examples)
}

fn read_jsonl(text: &str, path: &Path, tasks: &[(&TaskId, &TaskConfig)], out: &mut Vec<RawExample>) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = Location { path: path.to_owned(), line: i + 1 };
        let value: Value =
            serde_json::from_str(line).map_err(|e| DataError::at(&location, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(DataError::at(&location, "expected a JSON object"));
        };
        out.push(record(&obj, location, tasks, false)?);
    }
    Ok(())
}

/// CSV or TSV with a header row. Each row becomes a record of string fields, read like a JSONL object.
fn read_table(
    text: &str,
    delimiter: u8,
    path: &Path,
    tasks: &[(&TaskId, &TaskConfig)],
    out: &mut Vec<RawExample>,
) -> Result<()> {
    let mut reader =
        csv::ReaderBuilder::new().delimiter(delimiter).has_headers(true).flexible(false).from_reader(text.as_bytes());
    let header_err = |m: String| DataError::Line { path: path.to_owned(), line: 1, message: m };
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| header_err(format!("cannot read the header row: {e}")))?
        .iter()
        .map(String::from)
        .collect();
    for (_, task) in tasks {
        let mut needed = vec![task.text_field.clone()];
        needed.extend(task.pair_field.clone());
        if task.kind == TaskKind::Regression {
            needed.extend(task.regression_outputs());
        } else {
            needed.push(task.label_field.clone());
        }
        if let Some(missing) = needed.iter().find(|f| !headers.contains(f)) {
            return Err(header_err(format!("no column `{missing}` in the header (columns: {})", headers.join(", "))));
        }
    }
    for row in reader.records() {
        let row = row.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            DataError::Line { path: path.to_owned(), line, message: format!("invalid row: {e}") }
        })?;
        let line = row.position().map_or(0, |p| p.line() as usize);
        let location = Location { path: path.to_owned(), line };
        if row.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let obj: Map<String, Value> =
            headers.iter().cloned().zip(row.iter().map(|f| Value::String(f.to_string()))).collect();
        out.push(record(&obj, location, tasks, true)?);
    }
    Ok(())
}

/// Reads one record (a JSON object, or a CSV/TSV row as string fields) for every task of its file.
fn record(
    obj: &Map<String, Value>,
    location: Location,
    tasks: &[(&TaskId, &TaskConfig)],
    tabular: bool,
) -> Result<RawExample> {
    let at = |m: String| DataError::at(&location, m);
    let first = tasks[0].1;
    let text_field = |field: &str| -> Result<String> {
        match obj.get(field) {
            Some(Value::String(t)) if t.trim().is_empty() => Err(at(format!("field `{field}` is empty"))),
            Some(Value::String(t)) => Ok(t.clone()),
            Some(_) => Err(at(format!("field `{field}` must be a string"))),
            None => Err(at(format!("missing field `{field}`"))),
        }
    };
    let input = if first.kind == TaskKind::QuestionAnswering {
        Input::Question { question: text_field(&first.question_field)?, context: text_field(&first.context_field)? }
    } else if let (Some(words), false) = (obj.get(&first.words_field), tabular) {
        let words =
            string_list(words).ok_or_else(|| at(format!("field `{}` must be a list of strings", first.words_field)))?;
        if words.is_empty() {
            return Err(at(format!("field `{}` is empty", first.words_field)));
        }
        if let Some(w) = words.iter().find(|w| w.trim().is_empty() || w.chars().any(char::is_whitespace)) {
            return Err(at(format!("field `{}`: word {w:?} is empty or holds whitespace", first.words_field)));
        }
        Input::Words(words)
    } else if !obj.contains_key(&first.text_field) && !tabular {
        return Err(at(format!(
            "missing input: neither `{}` nor `{}` is present",
            first.words_field, first.text_field
        )));
    } else {
        let a = text_field(&first.text_field)?;
        match &first.pair_field {
            Some(pair) => Input::Pair(a, text_field(pair)?),
            None => Input::Text(a),
        }
    };
    let mut labels = BTreeMap::new();
    for &(name, task) in tasks {
        if let Some(label) = read_label(obj, name, task, &input, &at)? {
            labels.insert(name.clone(), label);
        }
    }
    Ok(RawExample { location, input, labels })
}

/// The label of one task in one record; `None` when the record has none for it (a missing or null field,
/// or an empty cell).
fn read_label(
    obj: &Map<String, Value>,
    name: &TaskId,
    task: &TaskConfig,
    input: &Input,
    at: &dyn Fn(String) -> DataError,
) -> Result<Option<RawLabel>> {
    let field = &task.label_field;
    let absent = |v: Option<&Value>| {
        matches!(v, None | Some(Value::Null)) || v.and_then(Value::as_str).is_some_and(|s| s.trim().is_empty())
    };
    let label = match task.kind {
        TaskKind::Classification => match obj.get(field) {
            v if absent(v) => return Ok(None),
            Some(Value::String(s)) => RawLabel::Class(s.trim().to_string()),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => RawLabel::Class(v.to_string()),
            Some(_) => return Err(at(format!("task `{name}`: field `{field}` must be a string label"))),
            None => return Ok(None),
        },
        TaskKind::MultiLabel => match obj.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => RawLabel::Multi(
                s.split(task.label_separator.as_str())
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect(),
            ),
            Some(v) => RawLabel::Multi(
                string_list(v)
                    .ok_or_else(|| at(format!("task `{name}`: field `{field}` must be a list of label strings")))?,
            ),
        },
        TaskKind::Regression => {
            let fields = task.regression_outputs();
            let mut values = Vec::new();
            for f in &fields {
                match obj.get(f) {
                    v if absent(v) => return Ok(None),
                    Some(Value::Array(items)) if fields.len() == 1 => {
                        for x in items {
                            values.push(
                                x.as_f64().ok_or_else(|| {
                                    at(format!("task `{name}`: field `{f}` must be a list of numbers"))
                                })?,
                            );
                        }
                    }
                    Some(v) => values.push(
                        number(v).ok_or_else(|| at(format!("task `{name}`: field `{f}` must be a number, got {v}")))?,
                    ),
                    None => return Ok(None),
                }
            }
            if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
                return Err(at(format!("task `{name}`: target {bad} is not a finite number")));
            }
            RawLabel::Real(values)
        }
        TaskKind::TokenClassification => match obj.get(field) {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => {
                let tags = string_list(v)
                    .ok_or_else(|| at(format!("task `{name}`: field `{field}` must be a list of tag strings")))?;
                let Input::Words(words) = input else {
                    return Err(at(format!(
                        "task `{name}`: a token task needs pre-split words in field `{}`",
                        task.words_field
                    )));
                };
                if tags.len() != words.len() {
                    return Err(at(format!(
                        "task `{name}`: field `{field}` has {} tags for {} words",
                        tags.len(),
                        words.len()
                    )));
                }
                RawLabel::Tags(tags)
            }
        },
        TaskKind::QuestionAnswering => {
            let f = &task.answers_field;
            let Some(v) = obj.get(f) else { return Ok(None) };
            let Input::Question { context, .. } = input else { unreachable!("QA records are read as questions") };
            RawLabel::Answers(answers(v, context).map_err(|m| at(format!("task `{name}`: field `{f}`: {m}")))?)
        }
        TaskKind::Generation => {
            match obj.get(field) {
                v if absent(v) => return Ok(None),
                Some(Value::String(s)) => RawLabel::Texts(vec![s.trim().to_string()]),
                Some(v) => {
                    let texts = string_list(v)
                    .filter(|t| !t.is_empty() && t.iter().all(|x| !x.trim().is_empty()))
                    .ok_or_else(|| at(format!("task `{name}`: field `{field}` must be a text or a list of texts (references), none empty")))?;
                    RawLabel::Texts(texts.into_iter().map(|t| t.trim().to_string()).collect())
                }
                None => return Ok(None),
            }
        }
    };
    Ok(Some(label))
}

/// SQuAD answers: `{"text": [...], "answer_start": [...]}` (or a list of `{"text", "answer_start"}`), each
/// checked against the context.
fn answers(v: &Value, context: &str) -> Result<Vec<Answer>, String> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Object(o) => {
            let texts = o.get("text").and_then(Value::as_array).ok_or("expected a `text` list")?;
            let starts = o.get("answer_start").and_then(Value::as_array).ok_or("expected an `answer_start` list")?;
            if texts.len() != starts.len() {
                return Err(format!("{} texts but {} answer_start values", texts.len(), starts.len()));
            }
            texts.iter().cloned().zip(starts.iter().cloned()).collect()
        }
        Value::Array(items) => items
            .iter()
            .map(|a| {
                Ok((
                    a.get("text").cloned().ok_or("an answer has no `text`")?,
                    a.get("answer_start").cloned().ok_or("an answer has no `answer_start`")?,
                ))
            })
            .collect::<Result<_, String>>()?,
        _ => return Err("expected SQuAD answers: {\"text\": [...], \"answer_start\": [...]}".into()),
    };
    let chars: Vec<char> = context.chars().collect();
    pairs
        .into_iter()
        .map(|(t, s)| {
            let text = t.as_str().ok_or("answer texts must be strings")?.to_string();
            let start = s.as_u64().ok_or("answer_start values must be non-negative integers")? as usize;
            let n = text.chars().count();
            let found: String = chars.get(start..start + n).map(|c| c.iter().collect()).unwrap_or_default();
            if text.is_empty() || found != text {
                return Err(format!("answer {text:?} is not at character {start} of the context (found {found:?})"));
            }
            Ok(Answer { text, start })
        })
        .collect()
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?.iter().map(|x| x.as_str().map(String::from)).collect()
}

/// Reads one line of a column format: `None` to skip it, else the word and each task's tag, or an error.
type ParseLine<'a> = dyn Fn(&str) -> Option<Result<(String, Vec<String>), String>> + 'a;

/// A sentence being read from a column format.
struct Sentence {
    start: usize,
    words: Vec<String>,
    /// One tag list per task.
    tags: Vec<Vec<String>>,
}

fn read_columns(
    text: &str,
    path: &Path,
    tasks: &[(&TaskId, &TaskConfig)],
    out: &mut Vec<RawExample>,
    parse: &ParseLine,
) -> Result<()> {
    let mut current = Sentence { start: 0, words: Vec::new(), tags: vec![Vec::new(); tasks.len()] };
    let mut flush = |s: &mut Sentence| {
        if s.words.is_empty() {
            return;
        }
        let labels = tasks
            .iter()
            .zip(&mut s.tags)
            .map(|((name, _), tags)| ((*name).clone(), RawLabel::Tags(std::mem::take(tags))))
            .collect();
        out.push(RawExample {
            location: Location { path: path.to_owned(), line: s.start },
            input: Input::Words(std::mem::take(&mut s.words)),
            labels,
        });
    };
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            flush(&mut current);
            continue;
        }
        match parse(line) {
            None => {}
            Some(Err(message)) => return Err(DataError::Line { path: path.to_owned(), line: i + 1, message }),
            Some(Ok((word, tags))) => {
                if current.words.is_empty() {
                    current.start = i + 1;
                }
                current.words.push(word);
                for (list, tag) in current.tags.iter_mut().zip(tags) {
                    list.push(tag);
                }
            }
        }
    }
    flush(&mut current);
    Ok(())
}

/// CoNLL: whitespace-separated columns, the word in `word_column`, each task's tag in its `tag_column`
/// (the last column by default). `-DOCSTART-` lines, a lone `#`, and metadata lines as CoNLL-U writes them
/// (`# key = value`, `# newdoc`, `# newpar`) are skipped; any other line starting with `#` is a token, as `#`
/// is in tweets.
fn read_conll(text: &str, path: &Path, tasks: &[(&TaskId, &TaskConfig)], out: &mut Vec<RawExample>) -> Result<()> {
    let word_column = tasks[0].1.word_column;
    let parse = |line: &str| {
        let trimmed = line.trim();
        let metadata =
            trimmed.starts_with("# ") && (trimmed.contains(" = ") || trimmed == "# newdoc" || trimmed == "# newpar");
        if trimmed.starts_with("-DOCSTART-") || metadata || trimmed == "#" {
            return None;
        }
        let cols: Vec<&str> = trimmed.split_whitespace().collect();
        let mut tags = Vec::new();
        for (name, task) in tasks {
            let column = task.tag_column.unwrap_or(cols.len().saturating_sub(1));
            if cols.len() < 2 || column >= cols.len() || word_column >= cols.len() || column == word_column {
                return Some(Err(format!(
                    "task `{name}`: expected the word in column {word_column} and the tag in column {} (0-based), found {} column(s)",
                    task.tag_column.map_or_else(|| "last".to_string(), |c| c.to_string()),
                    cols.len()
                )));
            }
            tags.push(cols[column].to_string());
        }
        Some(Ok((cols[word_column].to_string(), tags)))
    };
    read_columns(text, path, tasks, out, &parse)
}

/// CoNLL-U: ten tab-separated columns; comments, multiword-token lines (`1-2`) and empty nodes (`1.1`)
/// are skipped; each task's tag comes from its `conllu_column`.
fn read_conllu(text: &str, path: &Path, tasks: &[(&TaskId, &TaskConfig)], out: &mut Vec<RawExample>) -> Result<()> {
    let parse = |line: &str| {
        if line.starts_with('#') {
            return None;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() != 10 {
            return Some(Err(format!("expected 10 tab-separated CoNLL-U columns, found {}", cols.len())));
        }
        if cols[0].contains('-') || cols[0].contains('.') {
            return None;
        }
        if cols[0].parse::<usize>().is_err() {
            return Some(Err(format!("column ID: {:?} is not a word index", cols[0])));
        }
        let mut tags = Vec::new();
        for (name, task) in tasks {
            let tag = cols[task.conllu_column.index()];
            if tag.is_empty() || tag == "_" {
                return Some(Err(format!(
                    "task `{name}`: column {:?} is empty for word {:?}",
                    format!("{:?}", task.conllu_column).to_uppercase(),
                    cols[1]
                )));
            }
            tags.push(tag.to_string());
        }
        Some(Ok((cols[1].to_string(), tags)))
    };
    read_columns(text, path, tasks, out, &parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose tasks all read `file` (train split) in `format`, with `extra` TOML per task.
    fn config(format: &str, tasks: &[(&str, &str, &str)], file: &Path) -> Config {
        let mut text = String::from("[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-3\n");
        for (name, kind, extra) in tasks {
            text.push_str(&format!(
                "[tasks.{name}]\nkind = \"{kind}\"\nformat = \"{format}\"\ndata = {{ train = \"{}\" }}\n{extra}\n",
                file.display()
            ));
        }
        Config::parse(&text, Path::new("test.toml"), &[]).expect("valid test config")
    }

    fn read(format: &str, tasks: &[(&str, &str, &str)], content: &str) -> (tempfile::TempDir, Result<Vec<RawExample>>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join(format!("data.{format}"));
        std::fs::write(&file, content).expect("write");
        let c = config(format, tasks, &file);
        let r = read_split(&c, Split::Train);
        (dir, r)
    }

    fn id(s: &str) -> TaskId {
        TaskId::new(s).expect("valid")
    }

    fn err(r: Result<Vec<RawExample>>) -> String {
        r.expect_err("reading should fail").to_string()
    }

    #[test]
    fn csv_with_quotes_pairs_and_several_tasks() {
        let csv = "premise,hypothesis,label,score\n\"A man, with a hat\",\"He wears \"\"a hat\"\"\",entailment,4.5\nA cat,A dog,contradiction,\n";
        let tasks = [
            ("nli", "classification", "text_field = \"premise\"\npair_field = \"hypothesis\""),
            ("sts", "regression", "text_field = \"premise\"\npair_field = \"hypothesis\"\nlabel_field = \"score\""),
        ];
        let (_d, r) = read("csv", &tasks, csv);
        let ex = r.expect("valid CSV");
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].input, Input::Pair("A man, with a hat".into(), "He wears \"a hat\"".into()));
        assert_eq!(ex[0].labels[&id("nli")], RawLabel::Class("entailment".into()));
        assert_eq!(ex[0].labels[&id("sts")], RawLabel::Real(vec![4.5]));
        assert!(!ex[1].labels.contains_key(&id("sts")), "an empty cell is no label");
        assert_eq!(ex[1].location.line, 3);
    }

    #[test]
    fn tsv_multi_label_and_multi_output_regression() {
        let tsv = "text\ttopics\tv\ta\nsome text\tsport, politics\t0.5\t-1\n";
        let tasks = [
            ("topics", "multi_label", "label_field = \"topics\""),
            ("va", "regression", "label_fields = [\"v\", \"a\"]"),
        ];
        let (_d, r) = read("tsv", &tasks, tsv);
        let ex = r.expect("valid TSV");
        assert_eq!(ex[0].labels[&id("topics")], RawLabel::Multi(vec!["sport".into(), "politics".into()]));
        assert_eq!(ex[0].labels[&id("va")], RawLabel::Real(vec![0.5, -1.0]));
    }

    #[test]
    fn table_errors_name_file_line_and_field() {
        let tasks = [("c", "classification", "")];
        let e = err(read("csv", &tasks, "sentence,label\nhello,a\n").1);
        assert!(e.contains("data.csv:1") && e.contains("no column `text`"), "{e}");
        let e = err(read("csv", &tasks, "text,label\nhello,a\nbad,row,extra\n").1);
        assert!(e.contains("data.csv:3") && e.contains("invalid row"), "{e}");
        let e = err(read("csv", &tasks, "text,label\nhello,a\n\"  \",b\n").1);
        assert!(e.contains("data.csv:3") && e.contains("field `text` is empty"), "{e}");
        let reg = [("r", "regression", "")];
        let e = err(read("tsv", &reg, "text\tlabel\nfine\t1.5\nodd\tlots\n").1);
        assert!(e.contains("data.tsv:3") && e.contains("field `label` must be a number"), "{e}");
        let e = err(read("tsv", &reg, "text\tlabel\nodd\tNaN\n").1);
        assert!(e.contains("data.tsv:2") && e.contains("not a finite number"), "{e}");
    }

    #[test]
    fn conll_tag_columns_and_docstart() {
        let text = "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n";
        let tasks =
            [("ner", "token_classification", ""), ("pos", "token_classification", "tag_column = 1\nscheme = \"none\"")];
        let (_d, r) = read("conll", &tasks, text);
        let ex = r.expect("valid CoNLL");
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].input, Input::Words(vec!["EU".into(), "rejects".into()]));
        assert_eq!(ex[0].labels[&id("ner")], RawLabel::Tags(vec!["B-ORG".into(), "O".into()]));
        assert_eq!(ex[0].labels[&id("pos")], RawLabel::Tags(vec!["NNP".into(), "VBZ".into()]));
        assert_eq!(ex[1].location.line, 6);
        let e = err(read("conll", &tasks[..1], "EU B-ORG\nrejects\n").1);
        assert!(e.contains("data.conll:2") && e.contains("found 1 column"), "{e}");
        let bad = [("pos", "token_classification", "tag_column = 5")];
        let e = err(read("conll", &bad, "EU NNP B-ORG\n").1);
        assert!(e.contains("data.conll:1") && e.contains("column 5"), "{e}");
    }

    /// A byte order mark and CRLF line ends read as nothing and LF in every format; in CoNLL, `#` is a
    /// token and only `# key = value` lines are comments.
    #[test]
    fn byte_order_marks_crlf_and_hash_tokens_in_every_format() {
        let cls = [("intent", "classification", "label_field = \"intent\"")];
        let tag = [("ner", "token_classification", "")];
        type Tasks<'a> = &'a [(&'a str, &'a str, &'a str)];
        let cases: [(&str, Tasks, &str); 5] = [
            ("jsonl", &cls, "\u{feff}{\"text\": \"a b\", \"intent\": \"x\"}\r\n{\"text\": \"c\", \"intent\": \"y\"}\r\n"),
            ("csv", &cls, "\u{feff}text,intent\r\na b,x\r\nc,y\r\n"),
            ("tsv", &cls, "\u{feff}text\tintent\r\na b\tx\r\nc\ty\r\n"),
            ("conll", &tag, "\u{feff}-DOCSTART- O\r\n\r\nEU B-ORG\r\n# O\r\n\r\n# newpar\r\n# sent_id = 2\r\nPeter B-PER\r\n"),
            ("conllu", &[("ner", "token_classification", "conllu_column = \"upos\"\nscheme = \"none\"")],
             "\u{feff}# sent_id = 1\r\n1\tEU\teu\tPROPN\t_\t_\t0\troot\t_\t_\r\n\r\n1\tPeter\tpeter\tPROPN\t_\t_\t0\troot\t_\t_\r\n"),
        ];
        for (format, tasks, content) in cases {
            let (_d, r) = read(format, tasks, content);
            let ex = r.unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(ex.len(), 2, "{format}");
            match &ex[0].input {
                Input::Text(t) => assert_eq!(t, "a b", "{format}"),
                Input::Words(w) => assert_eq!(w[0], "EU", "{format}: no mark glued to the first word"),
                other => panic!("{format}: {other:?}"),
            }
            if let Some(RawLabel::Tags(t)) = ex[0].labels.get(&id("ner")) {
                assert!(t.iter().all(|t| !t.ends_with('\r')), "{format}: {t:?}");
            }
        }
        let (_d, r) = read("conll", &tag, "EU B-ORG\n# O\n");
        assert_eq!(r.expect("valid")[0].input, Input::Words(vec!["EU".into(), "#".into()]), "`#` is a token");
        // A labels file the same way.
        let dir = tempfile::tempdir().expect("temp dir");
        let (data, labels) = (dir.path().join("data.jsonl"), dir.path().join("labels.txt"));
        std::fs::write(&data, "{\"text\": \"a\", \"intent\": \"x\"}\n").expect("write");
        std::fs::write(&labels, "\u{feff}x\r\ny\r\n").expect("write");
        let extra = format!("label_field = \"intent\"\nlabels_file = \"{}\"", labels.display());
        let c = config("jsonl", &[("intent", "classification", &extra)], &data);
        let maps = crate::LabelMap::for_tasks(&c, &read_split(&c, Split::Train).expect("valid")).expect("labels");
        assert_eq!((maps[&id("intent")].id("x"), maps[&id("intent")].id("y")), (Some(0), Some(1)));
    }

    #[test]
    fn conllu_skips_ranges_and_empty_nodes() {
        let text = "# sent_id = 1\n# text = Don't go\n1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_\n1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_\n2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_\n2.1\tx\t_\t_\t_\t_\t_\t_\t_\t_\n3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_\n\n";
        let tasks = [
            ("upos", "token_classification", "scheme = \"none\""),
            ("xpos", "token_classification", "scheme = \"none\"\nconllu_column = \"xpos\""),
        ];
        let (_d, r) = read("conllu", &tasks, text);
        let ex = r.expect("valid CoNLL-U");
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].input, Input::Words(vec!["Do".into(), "n't".into(), "go".into()]));
        assert_eq!(ex[0].labels[&id("upos")], RawLabel::Tags(vec!["AUX".into(), "PART".into(), "VERB".into()]));
        assert_eq!(ex[0].labels[&id("xpos")], RawLabel::Tags(vec!["VBP".into(), "RB".into(), "VB".into()]));
        let e = err(read("conllu", &tasks[..1], "1\tDo\tdo\tAUX\n").1);
        assert!(e.contains("data.conllu:1") && e.contains("10 tab-separated"), "{e}");
        let e = err(read("conllu", &tasks[1..], "1\tDo\tdo\tAUX\t_\t_\t0\troot\t_\t_\n").1);
        assert!(e.contains("data.conllu:1") && e.contains("XPOS") && e.contains("empty"), "{e}");
    }

    #[test]
    fn squad_answers_are_checked_against_the_context() {
        let tasks = [("qa", "question_answering", "")];
        let good = r#"{"question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}}
{"question": "When?", "context": "Ada wrote it.", "answers": {"text": [], "answer_start": []}}
"#;
        let (_d, r) = read("jsonl", &tasks, good);
        let ex = r.expect("valid SQuAD lines");
        assert_eq!(ex[0].labels[&id("qa")], RawLabel::Answers(vec![Answer { text: "Ada".into(), start: 0 }]));
        assert_eq!(ex[1].labels[&id("qa")], RawLabel::Answers(vec![]));
        let bad =
            r#"{"question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [4]}}"#;
        let e = err(read("jsonl", &tasks, bad).1);
        assert!(e.contains("data.jsonl:1") && e.contains("field `answers`") && e.contains("not at character 4"), "{e}");
        let e = err(read("jsonl", &tasks, r#"{"question": "Who?", "answers": []}"#).1);
        assert!(e.contains("missing field `context`"), "{e}");
    }

    #[test]
    fn generation_targets_are_texts_or_lists_of_references() {
        let tasks = [("sum", "generation", "label_field = \"summary\"")];
        let good = "{\"text\": \"a long text\", \"summary\": \" short \"}\n{\"text\": \"b\", \"summary\": [\"one\", \"two\"]}\n{\"text\": \"c\"}\n";
        let (_d, r) = read("jsonl", &tasks, good);
        let ex = r.expect("valid lines");
        assert_eq!(ex[0].labels[&id("sum")], RawLabel::Texts(vec!["short".into()]));
        assert_eq!(ex[1].labels[&id("sum")], RawLabel::Texts(vec!["one".into(), "two".into()]));
        assert!(ex[2].labels.is_empty(), "no target: an input without a label");
        for bad in ["[]", "[\"ok\", \" \"]", "3", "[1]"] {
            let e = err(read("jsonl", &tasks, &format!("{{\"text\": \"x\", \"summary\": {bad}}}\n")).1);
            assert!(
                e.contains("data.jsonl:1") && e.contains("field `summary`") && e.contains("references"),
                "{bad}: {e}"
            );
        }
        let (_d, r) = read("csv", &[("sum", "generation", "label_field = \"summary\"")], "text,summary\n\"a, b\",ab\n");
        assert_eq!(r.expect("valid CSV")[0].labels[&id("sum")], RawLabel::Texts(vec!["ab".into()]));
    }

    #[test]
    fn jsonl_errors_name_the_field() {
        let tasks = [("m", "multi_label", "")];
        let e = err(read("jsonl", &tasks, "{\"text\": \"x\", \"label\": [1, 2]}\n").1);
        assert!(e.contains("data.jsonl:1") && e.contains("list of label strings"), "{e}");
        let e = err(read("jsonl", &tasks, "{\"text\": \"\", \"label\": []}\n").1);
        assert!(e.contains("field `text` is empty"), "{e}");
        let tok = [("t", "token_classification", "")];
        let e = err(read("jsonl", &tok, "{\"words\": [\"a\", \"b c\"], \"label\": [\"O\", \"O\"]}\n").1);
        assert!(e.contains("holds whitespace"), "{e}");
    }
}
