//! `mtl init DATA…`: a starter config written from data files. Files are grouped into datasets by name (`train`,
//! `dev`/`valid`/`validation`, `test` in a file name mark its split), each dataset's format is read from its
//! extension and first lines, and its training file's fields say the tasks: a string field with few values is
//! a classification, a list of strings as long as the words a tagging task (a list otherwise: multi-label), a
//! number a regression (an integer with few values: a classification), `question` + `context` + `answers` a
//! QA task, a CoNLL or CoNLL-U file a tagging task. The config is then checked as `mtl check` does (where the
//! model is there), and dev or test labels outside the training set are left out of the scores. Every guess is
//! written in the config's comments and returned to be printed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Component, Path, PathBuf};

use mtl_config::{Config, DataFormat};
use serde_json::Value;

use crate::error::{bail, Error, Result};

/// The encoder a starter config trains (scripts/fetch.sh fetches it), from the current directory.
pub const DEFAULT_MODEL: &str = "assets/models/all-MiniLM-L6-v2";
/// Training lines read to guess the fields.
const SAMPLE: usize = 5000;

/// What `mtl init` wrote.
#[derive(Clone, Debug)]
pub struct InitReport {
    /// The config, comments included.
    pub text: String,
    /// What was guessed, one line each (also in the config's comments).
    pub guesses: Vec<String>,
    /// The tasks, by name.
    pub tasks: Vec<String>,
}

/// One dataset: its files by split.
#[derive(Debug, Default)]
struct Group {
    name: String,
    train: Option<PathBuf>,
    dev: Option<PathBuf>,
    test: Option<PathBuf>,
}

/// One task to write.
#[derive(Debug)]
struct Task {
    name: String,
    kind: &'static str,
    /// `key = value` lines (values already TOML) after `kind`.
    settings: Vec<(String, String)>,
    group: usize,
    note: String,
}

/// A config for `files`, to be written at `out` (its paths relative to that folder), on `model` (the default
/// encoder where `None`).
pub fn init(files: &[PathBuf], out: &Path, model: Option<&Path>) -> Result<InitReport> {
    if files.is_empty() {
        bail!("give the data files: mtl init train.jsonl dev.jsonl test.jsonl");
    }
    let groups = group(files)?;
    // The config's folder (the current directory for a bare file name).
    let folder = absolute(out)?.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut guesses = Vec::new();
    let mut tasks: Vec<Task> = Vec::new();
    let mut formats = Vec::new();
    let mut lengths: Vec<usize> = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let train = group.train.as_ref().expect("every group has a training file");
        let format = sniff(train)?;
        formats.push(format);
        let mut found = match format {
            DataFormat::Jsonl => json_tasks(train, group, g, &mut lengths, &mut guesses)?,
            DataFormat::Csv | DataFormat::Tsv => table_tasks(train, format, group, g, &mut lengths, &mut guesses)?,
            DataFormat::Conll => {
                let task = conll_task(train, group, g, &mut lengths)?;
                guesses.push(format!("{}: {}", train.display(), task.note));
                vec![task]
            }
            DataFormat::Conllu => {
                guesses.push(format!("{}: CoNLL-U, a tagging task of its UPOS column", train.display()));
                vec![Task {
                    name: group.name.clone(),
                    kind: "token_classification",
                    settings: vec![("format".into(), "\"conllu\"".into()), ("conllu_column".into(), "\"upos\"".into())],
                    group: g,
                    note: "the UPOS column tagged per word (`conllu_column` takes xpos, deprel, …)".into(),
                }]
            }
        };
        if found.is_empty() {
            bail!("{}: no field looks like a label; write the task by hand (README: Config)", train.display());
        }
        tasks.append(&mut found);
    }
    // Names unique across datasets: a clash takes its dataset's name in front, and a number after where
    // that still clashes.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tasks {
        *seen.entry(t.name.clone()).or_default() += 1;
    }
    for t in &mut tasks {
        if seen[&t.name] > 1 && !t.name.starts_with(&groups[t.group].name) {
            t.name = task_name(&format!("{}_{}", groups[t.group].name, t.name));
        }
    }
    let mut taken = BTreeSet::new();
    for t in &mut tasks {
        let base = t.name.clone();
        let mut n = 1;
        while !taken.insert(t.name.clone()) {
            n += 1;
            t.name = task_name(&format!("{}_{n}", &base[..base.len().min(58)]));
        }
    }
    let model_path = match model {
        Some(m) => absolute(m)?,
        None => absolute(Path::new(DEFAULT_MODEL))?,
    };
    let max_len = max_len(&mut lengths);
    let mut text = render(files, &groups, &tasks, &formats, &model_path, &folder, max_len, &guesses, &BTreeMap::new());
    // Checked as training would read it; unseen dev and test labels are left out of the scores.
    let mut skips = BTreeMap::new();
    if model_path.exists() {
        let config = Config::parse_relative_to(&text, out, &[], &folder)?;
        let report = crate::check(&config, out)?;
        for (task, check) in &report.tasks {
            let n: usize = check.unseen.values().flat_map(|m| m.values()).sum();
            if n > 0 {
                let labels: BTreeSet<&String> = check.unseen.values().flat_map(|m| m.keys()).collect();
                let line = format!(
                    "task `{task}`: {n} dev/test labels outside the training set ({} different: {}) are left out of its scores (skip_unseen_labels)",
                    labels.len(),
                    abbreviate(labels.iter().map(|s| s.as_str()), 5)
                );
                guesses.push(line.clone());
                skips.insert(task.clone(), line);
            }
        }
        if let Some(cut) = &report.truncated {
            let total: usize = cut.values().sum();
            if total > 0 {
                guesses.push(format!("{total} inputs are longer than max_len = {max_len} tokens and will be cut"));
            }
        }
        text = render(files, &groups, &tasks, &formats, &model_path, &folder, max_len, &guesses, &skips);
        Config::parse_relative_to(&text, out, &[], &folder)?;
    } else {
        guesses.push(format!(
            "the model {} is not there (scripts/fetch.sh fetches the default): the config is not checked against it; run `mtl check` once it is",
            model_path.display()
        ));
        text = render(files, &groups, &tasks, &formats, &model_path, &folder, max_len, &guesses, &skips);
        Config::parse_relative_to(&text, out, &[], &folder)?;
    }
    Ok(InitReport { text, guesses, tasks: tasks.into_iter().map(|t| t.name).collect() })
}

/// The split a file name says (`train`, `dev`, `test`), and the name without it.
fn split_of(stem: &str) -> (Option<&'static str>, String) {
    let words: Vec<&str> = stem.split(['_', '-', '.', ' ']).filter(|w| !w.is_empty()).collect();
    let split = |w: &str| match w.to_ascii_lowercase().as_str() {
        "train" | "training" | "trn" => Some("train"),
        "dev" | "valid" | "validation" | "val" | "development" => Some("dev"),
        "test" | "testing" | "tst" => Some("test"),
        _ => None,
    };
    match words.iter().enumerate().rev().find_map(|(i, w)| split(w).map(|s| (i, s))) {
        Some((i, s)) => {
            let rest: Vec<&str> = words.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, w)| *w).collect();
            (Some(s), rest.join("_"))
        }
        None => (None, words.join("_")),
    }
}

/// The files as datasets: those that differ only by their split word are one dataset.
fn group(files: &[PathBuf]) -> Result<Vec<Group>> {
    let mut groups: BTreeMap<(PathBuf, String, String), Group> = BTreeMap::new();
    for file in files {
        if !file.is_file() {
            return Err(Error::Missing { path: file.clone(), what: "data file" });
        }
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let extension = file.extension().map(|s| s.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        let mut dir = file.parent().unwrap_or(Path::new("")).to_owned();
        let (mut split, mut rest) = split_of(&stem);
        // `train/x.jsonl`, `dev/x.jsonl`: the folder says the split.
        if split.is_none() {
            let folder = dir.file_name().map(|d| d.to_string_lossy().into_owned()).unwrap_or_default();
            if let (Some(s), "") = (split_of(&folder).0, split_of(&folder).1.as_str()) {
                split = Some(s);
                rest = task_name(&stem);
                dir = dir.parent().unwrap_or(Path::new("")).to_owned();
            }
        }
        let name = match rest.is_empty() {
            // `atis/train.jsonl`: the folder names the dataset.
            true => dir.file_name().map(|d| d.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into()),
            false => rest.clone(),
        };
        let g = groups.entry((dir, rest, extension)).or_default();
        g.name = task_name(&name);
        let slot = match split.unwrap_or("train") {
            "train" => &mut g.train,
            "dev" => &mut g.dev,
            _ => &mut g.test,
        };
        if let Some(other) = slot {
            bail!(
                "{} and {}: both look like the {} file of one dataset; give one",
                other.display(),
                file.display(),
                split.unwrap_or("train")
            );
        }
        *slot = Some(file.clone());
    }
    let groups: Vec<Group> = groups.into_values().collect();
    for g in &groups {
        if g.train.is_none() {
            let some = g.dev.as_ref().or(g.test.as_ref()).expect("a group has a file");
            bail!("{}: no training file beside it (one with `train` in its name, or no split word)", some.display());
        }
    }
    Ok(groups)
}

/// A task name from a dataset or field name: letters, digits, `_` and `-`, starting with a letter, at most
/// 64 characters.
fn task_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '_' })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.insert_str(0, "task_");
    }
    out.truncate(64);
    out
}

/// A file's format from its extension, or its first lines where the extension does not say.
fn sniff(path: &Path) -> Result<DataFormat> {
    let extension = path.extension().map(|s| s.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let known = match extension.as_str() {
        "jsonl" | "ndjson" | "json" => Some(DataFormat::Jsonl),
        "csv" => Some(DataFormat::Csv),
        "tsv" => Some(DataFormat::Tsv),
        "conllu" => Some(DataFormat::Conllu),
        _ => None,
    };
    if let Some(format) = known {
        return Ok(format);
    }
    let lines = first_lines(path, 50)?;
    let content: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).collect();
    let Some(first) = content.first() else { bail!("{}: empty", path.display()) };
    if first.trim_start().starts_with('{') {
        return Ok(DataFormat::Jsonl);
    }
    let conllu = content.iter().all(|l| l.split('\t').count() == 10);
    if conllu {
        return Ok(DataFormat::Conllu);
    }
    let columns: BTreeSet<usize> = content.iter().map(|l| l.split_whitespace().count()).collect();
    if columns.iter().all(|&c| (2..=10).contains(&c)) && columns.len() <= 2 {
        return Ok(DataFormat::Conll);
    }
    if first.contains('\t') {
        return Ok(DataFormat::Tsv);
    }
    if first.contains(',') {
        return Ok(DataFormat::Csv);
    }
    bail!(
        "{}: cannot tell its format (JSON lines, CSV, TSV, CoNLL or CoNLL-U); name it by its extension",
        path.display()
    )
}

fn first_lines(path: &Path, n: usize) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(file).lines().take(n) {
        let line = line.map_err(Error::io(path))?;
        lines.push(line.trim_start_matches('\u{feff}').trim_end_matches('\r').to_string());
    }
    Ok(lines)
}

/// What one field holds across the sampled rows.
#[derive(Debug, Default)]
struct FieldStats {
    rows: usize,
    strings: usize,
    distinct: BTreeSet<String>,
    string_chars: usize,
    string_lists: usize,
    /// String lists as long as the row's words.
    word_aligned: usize,
    /// String lists as long as the words of the row's `text` (split on whitespace), where it has no words.
    text_aligned: usize,
    number_lists: usize,
    integers: usize,
    numbers: usize,
    bools: usize,
    answers: usize,
}

/// Fields that identify rows rather than label them.
fn is_id(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["id", "idx", "guid", "uid", "uuid", "index", "key"].contains(&n.as_str()) || n.ends_with("_id")
}

const TEXT_NAMES: [&str; 13] = [
    "text",
    "sentence",
    "sentence1",
    "premise",
    "question1",
    "content",
    "review",
    "document",
    "tweet",
    "utterance",
    "query",
    "question",
    "input",
];
/// Second texts of sentence pairs (NLI, paraphrase, QNLI's question beside its sentence, BoolQ's passage).
const PAIR_NAMES: [&str; 10] =
    ["sentence2", "hypothesis", "text_b", "text_pair", "pair", "text2", "question2", "passage", "question", "sentence"];
const WORD_NAMES: [&str; 3] = ["words", "tokens", "token"];
/// Label fields named so generically that the dataset names the task.
const GENERIC: [&str; 9] = ["label", "labels", "tag", "tags", "class", "target", "y", "ner_tags", "category"];

/// Tasks of a JSON-lines dataset.
fn json_tasks(
    path: &Path,
    group: &Group,
    g: usize,
    lengths: &mut Vec<usize>,
    guesses: &mut Vec<String>,
) -> Result<Vec<Task>> {
    let mut rows: Vec<serde_json::Map<String, Value>> = Vec::new();
    for (i, line) in first_lines(path, SAMPLE)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => rows.push(o),
            Ok(_) => bail!("{}:{}: not a JSON object", path.display(), i + 1),
            Err(e) => bail!("{}:{}: invalid JSON: {e}", path.display(), i + 1),
        }
    }
    let n = rows.len();
    if n == 0 {
        bail!("{}: no rows", path.display());
    }
    let words_field = WORD_NAMES.iter().find(|w| {
        rows.iter()
            .filter(|r| r.get(**w).and_then(Value::as_array).is_some_and(|a| a.iter().all(Value::is_string)))
            .count()
            * 10
            >= n * 9
    });
    let mut stats: BTreeMap<String, FieldStats> = BTreeMap::new();
    for row in &rows {
        let words = words_field.and_then(|w| row.get(*w)).and_then(Value::as_array).map(Vec::len);
        let text_words = row.get("text").and_then(Value::as_str).map(|t| t.split_whitespace().count());
        for (key, value) in row {
            let s = stats.entry(key.clone()).or_default();
            s.rows += 1;
            match value {
                Value::String(text) => {
                    s.strings += 1;
                    s.string_chars += text.chars().count();
                    if s.distinct.len() < 10_000 {
                        s.distinct.insert(text.clone());
                    }
                }
                Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
                    s.string_lists += 1;
                    if words == Some(items.len()) {
                        s.word_aligned += 1;
                    } else if words.is_none() && text_words == Some(items.len()) && items.len() > 1 {
                        s.text_aligned += 1;
                    }
                    for item in items.iter().filter_map(Value::as_str) {
                        if s.distinct.len() < 10_000 {
                            s.distinct.insert(item.to_string());
                        }
                    }
                }
                Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => s.number_lists += 1,
                Value::Number(x) => {
                    s.numbers += 1;
                    if x.is_i64() || x.is_u64() {
                        s.integers += 1;
                        if s.distinct.len() < 10_000 {
                            s.distinct.insert(x.to_string());
                        }
                    }
                }
                Value::Bool(b) => {
                    s.bools += 1;
                    s.distinct.insert(b.to_string());
                }
                Value::Object(o) if o.contains_key("text") && o.contains_key("answer_start") => s.answers += 1,
                _ => {}
            }
        }
    }
    let mostly = |count: usize, s: &FieldStats| count * 10 >= s.rows * 9 && s.rows * 10 >= n * 5;
    // Question answering: a question, a context and SQuAD answers.
    let qa = ["question", "context"].iter().all(|f| stats.get(*f).is_some_and(|s| mostly(s.strings, s)))
        && stats.get("answers").is_some_and(|s| mostly(s.answers, s));
    if qa {
        let lens = rows.iter().filter_map(|r| r.get("context").and_then(Value::as_str));
        lengths.extend(lens.map(|c| c.split_whitespace().count()));
        guesses.push(format!("{}: question answering: `question`, `context` and SQuAD `answers`", path.display()));
        return Ok(vec![Task {
            name: group.name.clone(),
            kind: "question_answering",
            settings: vec![],
            group: g,
            note: "span extraction: `question`, `context`, `answers` ({\"text\": [...], \"answer_start\": [...]})"
                .into(),
        }]);
    }
    let is_text = |name: &str, s: &FieldStats| {
        mostly(s.strings, s) && s.distinct.len() * 2 > s.strings && s.string_chars >= s.strings * 8 && !is_id(name)
    };
    let text_field =
        TEXT_NAMES.iter().find(|t| stats.get(**t).is_some_and(|s| is_text(t, s))).map(|t| t.to_string()).or_else(
            || {
                stats
                    .iter()
                    .filter(|(k, s)| is_text(k, s))
                    .max_by_key(|(_, s)| s.string_chars / s.strings.max(1))
                    .map(|(k, _)| k.clone())
            },
        );
    let pair_field = text_field.as_ref().and_then(|text| {
        PAIR_NAMES.iter().find(|p| **p != text && stats.get(**p).is_some_and(|s| is_text(p, s))).map(|p| p.to_string())
    });
    if text_field.is_none() && words_field.is_none() {
        bail!("{}: no text field (a string field such as `text`) and no `words` list", path.display());
    }
    // The input fields every task of the file reads.
    let mut input = Vec::new();
    let mut said = Vec::new();
    if let Some(text) = &text_field {
        if text != "text" {
            input.push(("text_field".to_string(), toml_string(text)));
        }
        said.push(format!("text in `{text}`"));
    }
    if let Some(pair) = &pair_field {
        input.push(("pair_field".to_string(), toml_string(pair)));
        said.push(format!("sentence pairs with `{pair}`"));
    }
    if let Some(words) = words_field {
        input.push(("words_field".to_string(), toml_string(words)));
        said.push(format!("pre-split words in `{words}`"));
    }
    guesses.push(format!("{}: JSON lines; {}", path.display(), said.join(", ")));
    for row in &rows {
        let words = words_field.and_then(|w| row.get(*w)).and_then(Value::as_array).map(Vec::len);
        let text = text_field.as_ref().and_then(|t| row.get(t)).and_then(Value::as_str);
        let pair = pair_field.as_ref().and_then(|t| row.get(t)).and_then(Value::as_str);
        let count = |t: Option<&str>| t.map_or(0, |t| t.split_whitespace().count());
        lengths.push(words.unwrap_or_else(|| count(text)) + count(pair));
    }
    let inputs: BTreeSet<&str> =
        [text_field.as_deref(), pair_field.as_deref(), words_field.copied()].into_iter().flatten().collect();
    let mut tasks = Vec::new();
    for (field, s) in &stats {
        if inputs.contains(field.as_str()) || is_id(field) {
            continue;
        }
        // `label_text` beside `label` (Hugging Face datasets): the same label in words.
        if let Some(base) = field.strip_suffix("_text").or_else(|| field.strip_suffix("_name")) {
            if stats.contains_key(base) {
                guesses.push(format!("{}: field `{field}` left out (the words of `{base}`)", path.display()));
                continue;
            }
        }
        let distinct = s.distinct.len();
        let few = |d: usize| d >= 2 && (d * 5 <= s.rows || d <= 50.min(s.rows / 2).max(2));
        let (kind, note) = if mostly(s.string_lists, s)
            && words_field.is_some()
            && s.word_aligned * 100 >= s.string_lists * 99
        {
            (
                "token_classification",
                format!("a tag per word of `{}` ({distinct} tags in the sample)", words_field.unwrap_or(&"words")),
            )
        } else if mostly(s.string_lists, s) && (s.word_aligned + s.text_aligned) * 2 >= s.string_lists {
            // As long as the words (or the text's words) in most rows but not all: tags gone wrong, or tags
            // without the pre-split words a tagging task reads.
            let why = match words_field {
                Some(w) => format!(
                    "as long as `{w}` in most rows, but not in {} of {}",
                    s.string_lists - s.word_aligned,
                    s.string_lists
                ),
                None => "tags of the text's words, but no pre-split `words` list, which a tagging task reads".into(),
            };
            guesses.push(format!("{}: field `{field}` left out ({why})", path.display()));
            continue;
        } else if mostly(s.string_lists, s) {
            ("multi_label", format!("a list of labels per row ({distinct} labels in the sample)"))
        } else if mostly(s.strings, s) && few(distinct) {
            ("classification", format!("{distinct} labels in the sample"))
        } else if mostly(s.bools, s) {
            ("classification", "true or false".to_string())
        } else if mostly(s.integers, s) && few(distinct) {
            ("classification", format!("integers with {distinct} values, taken as classes"))
        } else if mostly(s.numbers, s) {
            ("regression", "a number per row".to_string())
        } else if mostly(s.number_lists, s) {
            ("regression", "several numbers per row (one output each)".to_string())
        } else {
            let why = if mostly(s.strings, s) {
                format!("{distinct} different strings in {} rows: free text or an identifier, not a label", s.rows)
            } else {
                format!("in {} of {n} rows, or of mixed types", s.rows)
            };
            guesses.push(format!("{}: field `{field}` left out ({why})", path.display()));
            continue;
        };
        let name =
            if GENERIC.contains(&field.to_ascii_lowercase().as_str()) { group.name.clone() } else { task_name(field) };
        let mut settings = input.clone();
        settings.push(("label_field".into(), toml_string(field)));
        if kind == "token_classification" && !s.distinct.iter().any(|t| t.starts_with("B-") || t.starts_with("I-")) {
            settings.push(("scheme".into(), "\"none\"".into()));
        }
        tasks.push(Task { name, kind, settings, group: g, note: format!("`{field}`: {note}") });
    }
    Ok(tasks)
}

/// Tasks of a CSV or TSV dataset: its header names the columns.
fn table_tasks(
    path: &Path,
    format: DataFormat,
    group: &Group,
    g: usize,
    lengths: &mut Vec<usize>,
    guesses: &mut Vec<String>,
) -> Result<Vec<Task>> {
    let delimiter = if format == DataFormat::Tsv { b'\t' } else { b',' };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_path(path)
        .map_err(|e| Error::Invalid { path: path.to_owned(), message: e.to_string() })?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| Error::Invalid { path: path.to_owned(), message: e.to_string() })?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').to_string())
        .collect();
    // The rows as JSON objects (numbers where a cell is one), read by the JSON guesses.
    let mut rows = Vec::new();
    for (i, record) in reader.records().take(SAMPLE).enumerate() {
        let record =
            record.map_err(|e| Error::Invalid { path: path.to_owned(), message: format!("row {}: {e}", i + 2) })?;
        let mut row = serde_json::Map::new();
        for (name, cell) in header.iter().zip(record.iter()) {
            if cell.trim().is_empty() {
                continue;
            }
            let value = match cell.trim().parse::<i64>() {
                Ok(x) => Value::from(x),
                Err(_) => match cell.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() => Value::from(x),
                    _ => Value::String(cell.to_string()),
                },
            };
            row.insert(name.clone(), value);
        }
        rows.push(Value::Object(row).to_string());
    }
    let tmp = tempfile::NamedTempFile::new().map_err(Error::io(Path::new("a temporary file")))?;
    std::fs::write(tmp.path(), rows.join("\n")).map_err(Error::io(tmp.path()))?;
    let mut found = Vec::new();
    let shown = tmp.path().display().to_string();
    // Messages name the user's file, not the temporary one.
    let mut tasks = json_tasks(tmp.path(), group, g, lengths, &mut found).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(m.replace(&shown, &path.display().to_string())),
        other => other,
    })?;
    let name = if format == DataFormat::Tsv { "TSV" } else { "CSV" };
    guesses
        .extend(found.into_iter().map(|l| l.replace(&shown, &path.display().to_string()).replace("JSON lines", name)));
    let format = if format == DataFormat::Tsv { "\"tsv\"" } else { "\"csv\"" };
    for t in &mut tasks {
        if t.kind == "token_classification" || t.kind == "question_answering" {
            bail!("{}: a {} task cannot be read from {name} (JSON lines can)", path.display(), t.kind);
        }
        t.settings.insert(0, ("format".into(), format.into()));
    }
    Ok(tasks)
}

/// The tagging task of a CoNLL dataset: words in the first column, tags in the last.
fn conll_task(path: &Path, group: &Group, g: usize, lengths: &mut Vec<usize>) -> Result<Task> {
    let mut tags = BTreeSet::new();
    let mut sentence = 0;
    for line in first_lines(path, SAMPLE * 20)? {
        let columns: Vec<&str> = line.split_whitespace().collect();
        if columns.is_empty() {
            if sentence > 0 {
                lengths.push(sentence);
            }
            sentence = 0;
            continue;
        }
        if columns[0] == "-DOCSTART-" || line.starts_with("# ") {
            continue;
        }
        sentence += 1;
        if let Some(tag) = columns.last().filter(|_| columns.len() > 1) {
            tags.insert(tag.to_string());
        }
    }
    let bio = tags.iter().any(|t| t.starts_with("B-") || t.starts_with("I-"));
    let mut settings = vec![("format".to_string(), "\"conll\"".to_string())];
    if !bio {
        settings.push(("scheme".into(), "\"none\"".into()));
    }
    Ok(Task {
        name: group.name.clone(),
        kind: "token_classification",
        settings,
        group: g,
        note: format!(
            "words in the first column, {} tags in the last ({})",
            tags.len(),
            if bio { "BIO spans, scored by seqeval" } else { "plain tags, scored per token" }
        ),
    })
}

/// `model.max_len`: the 99th percentile of the words per input, times 1.5 sub-words per word, plus the
/// special tokens, rounded up to 16 (at least 32, at most 512).
fn max_len(lengths: &mut [usize]) -> usize {
    if lengths.is_empty() {
        return 128;
    }
    lengths.sort_unstable();
    let p99 = lengths[(lengths.len() * 99 / 100).min(lengths.len() - 1)];
    let tokens = p99 * 3 / 2 + 3;
    tokens.div_ceil(16).saturating_mul(16).clamp(32, 512)
}

fn abbreviate<'a>(items: impl Iterator<Item = &'a str>, n: usize) -> String {
    let items: Vec<&str> = items.collect();
    let mut shown = items.iter().take(n).copied().collect::<Vec<_>>().join(", ");
    if items.len() > n {
        shown += ", …";
    }
    shown
}

fn format_name(format: DataFormat) -> &'static str {
    match format {
        DataFormat::Jsonl => "JSON lines",
        DataFormat::Csv => "CSV",
        DataFormat::Tsv => "TSV",
        DataFormat::Conll => "CoNLL",
        DataFormat::Conllu => "CoNLL-U",
    }
}

fn toml_string(s: &str) -> String {
    // A JSON string is a TOML basic string.
    serde_json::to_string(s).expect("a string serializes")
}

fn absolute(path: &Path) -> Result<PathBuf> {
    Ok(mtl_config::normalize_path(&std::path::absolute(path).map_err(Error::io(path))?))
}

/// `path` relative to `folder` (both absolute), as the config writes it.
fn relative(path: &Path, folder: &Path) -> String {
    let (a, b): (Vec<Component>, Vec<Component>) = (path.components().collect(), folder.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    // Only the root in common: absolute reads better than a climb to it.
    if common <= 1 {
        return path.display().to_string();
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &a[common..] {
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        ".".into()
    } else {
        out.display().to_string()
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    files: &[PathBuf],
    groups: &[Group],
    tasks: &[Task],
    formats: &[DataFormat],
    model: &Path,
    folder: &Path,
    max_len: usize,
    guesses: &[String],
    skips: &BTreeMap<String, String>,
) -> String {
    let rel =
        |p: &Path| -> String { absolute(p).map(|a| relative(&a, folder)).unwrap_or_else(|_| p.display().to_string()) };
    let mut t = String::new();
    let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let _ = writeln!(t, "# Written by `mtl init` from {}.", shown.join(", "));
    let _ = writeln!(t, "# What it guessed (check each; edit freely, then `mtl check` this file):");
    for g in guesses {
        let _ = writeln!(t, "#   {g}");
    }
    let _ = writeln!(t, "# Relative paths are read from this file's folder. Train with:");
    let _ = writeln!(t, "#   mtl train THIS_FILE --out runs/NAME");
    let _ = writeln!(t);
    let _ = writeln!(t, "[model]");
    let _ =
        writeln!(t, "# A Hugging Face encoder directory (config.json, model.safetensors, tokenizer.json) or a decoder");
    let _ = writeln!(t, "# (a GGUF file; its tasks then need a `prompt`, see the README).");
    let _ = writeln!(t, "path = {}", toml_string(&rel(model)));
    let _ = writeln!(
        t,
        "# Inputs are cut to this many tokens: the longest 1% of the training inputs' words x 1.5, rounded up."
    );
    let _ = writeln!(t, "max_len = {max_len}");
    let _ = writeln!(t);
    let _ = writeln!(t, "[training]");
    let _ = writeln!(t, "epochs = 5");
    let _ = writeln!(t, "batch_size = 32");
    let _ = writeln!(t, "# The encoder's rate; the task heads start from scratch and learn at head_lr.");
    let _ = writeln!(t, "lr = 1e-4");
    let _ = writeln!(t, "head_lr = 1e-3");
    let _ = writeln!(t, "weight_decay = 0.01");
    let _ = writeln!(t, "warmup_ratio = 0.1");
    let _ = writeln!(t, "grad_clip = 1.0");
    let _ = writeln!(t, "seed = 42");
    let has_dev = groups.iter().any(|g| g.dev.is_some());
    if has_dev {
        let _ = writeln!(
            t,
            "# The checkpoint kept is the best on dev (mean of the tasks' main metrics); stop after 3 epochs"
        );
        let _ = writeln!(t, "# without a better one.");
        let _ = writeln!(t, "patience = 3");
    } else {
        let _ = writeln!(t, "# No dev file: the last epoch's weights are kept, and nothing is scored during training.");
    }
    for task in tasks {
        let group = &groups[task.group];
        let _ = writeln!(t);
        let _ = writeln!(t, "# {}: {}", format_name(formats[task.group]), task.note);
        let _ = writeln!(t, "[tasks.{}]", task.name);
        let _ = writeln!(t, "kind = \"{}\"", task.kind);
        for (k, v) in &task.settings {
            let _ = writeln!(t, "{k} = {v}");
        }
        if let Some(line) = skips.get(&task.name) {
            let _ = writeln!(t, "# {line}");
            let _ = writeln!(t, "skip_unseen_labels = true");
        }
        let mut data = vec![format!("train = {}", toml_string(&rel(group.train.as_ref().expect("a training file"))))];
        if let Some(dev) = &group.dev {
            data.push(format!("dev = {}", toml_string(&rel(dev))));
        }
        if let Some(test) = &group.test {
            data.push(format!("test = {}", toml_string(&rel(test))));
        }
        let _ = writeln!(t, "data = {{ {} }}", data.join(", "));
    }
    // A dataset with one classification and one tagging task on the same rows (intent + slots) is also scored
    // as frames: both right at once.
    for (g, _) in groups.iter().enumerate() {
        let of: Vec<&Task> = tasks.iter().filter(|t| t.group == g).collect();
        let class: Vec<&&Task> = of.iter().filter(|t| t.kind == "classification").collect();
        let tags: Vec<&&Task> = of.iter().filter(|t| t.kind == "token_classification").collect();
        if class.len() == 1 && tags.len() == 1 && formats[g] == DataFormat::Jsonl {
            let _ = writeln!(t);
            let _ = writeln!(t, "# Both tasks label the same rows: also scored as frames (both right at once).");
            let _ = writeln!(t, "[joint]");
            let _ = writeln!(t, "frame = [\"{}\", \"{}\"]", class[0].name, tags[0].name);
            break;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_and_dataset_names() {
        assert_eq!(split_of("train"), (Some("train"), String::new()));
        assert_eq!(split_of("ner_dev"), (Some("dev"), "ner".into()));
        assert_eq!(split_of("sst2-validation"), (Some("dev"), "sst2".into()));
        assert_eq!(split_of("reviews"), (None, "reviews".into()));
        assert_eq!(task_name("2019 Tweets"), "task_2019_tweets");
    }

    #[test]
    fn split_folders_and_clashing_names() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        let row =
            |i: usize| format!("{{\"text\": \"some text {i}\", \"label\": \"{}\", \"tags\": \"{}\"}}\n", i % 2, i % 3);
        let rows: String = (0..30).map(row).collect();
        for split in ["train", "dev"] {
            std::fs::create_dir(dir.path().join(split)).map_err(Error::io(dir.path()))?;
            write(&dir.path().join(split), "x.jsonl", &rows);
        }
        let files = [dir.path().join("train/x.jsonl"), dir.path().join("dev/x.jsonl")];
        // A bare file name: the config's folder is the current directory.
        let report = init(&files, Path::new("bare.toml"), Some(&dir.path().join("no-model")))?;
        // One dataset `x`, its dev file beside its training file; its two generic label fields named apart.
        assert_eq!(report.tasks, ["x", "x_2"], "{}", report.text);
        assert!(report.text.contains("dev/x.jsonl"), "{}", report.text);
        Ok(())
    }

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        assert_eq!(relative(Path::new("/a/b/data/x.jsonl"), Path::new("/a/b/configs")), "../data/x.jsonl");
        assert_eq!(relative(Path::new("/a/b/x.jsonl"), Path::new("/a/b")), "x.jsonl");
        assert_eq!(relative(Path::new("/x/y"), Path::new("/a/b")), "/x/y");
    }

    #[test]
    fn max_len_covers_the_longest_inputs() {
        assert_eq!(max_len(&mut [10; 100]), 32);
        let mut lengths: Vec<usize> = (1..=100).collect();
        assert_eq!(max_len(&mut lengths), 160); // p99 = 100 words → 153 tokens → 160
        assert_eq!(max_len(&mut []), 128);
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn json_fields_become_tasks() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io(Path::new("tmp")))?;
        let mut rows = String::new();
        for i in 0..40 {
            let (intent, tags) = if i % 2 == 0 { ("flight", "[\"O\", \"B-to\"]") } else { ("fare", "[\"O\", \"O\"]") };
            let _ = writeln!(
                rows,
                "{{\"id\": {i}, \"text\": \"fly to place{i}\", \"words\": [\"to\", \"place{i}\"], \"intent\": \"{intent}\", \"slots\": {tags}, \"score\": {}.5, \"tags\": [\"a\"], \"note\": \"free text {i}\"}}",
                i % 7
            );
        }
        let train = write(dir.path(), "train.jsonl", &rows);
        let dev = write(dir.path(), "dev.jsonl", &rows);
        let out = dir.path().join("sub/config.toml");
        let model = dir.path().join("no-model");
        let report = init(&[train, dev], &out, Some(&model))?;
        let config = Config::parse_relative_to(&report.text, &out, &[], &dir.path().join("sub"))?;
        let kinds: BTreeMap<String, String> =
            config.tasks.iter().map(|(k, t)| (k.to_string(), t.kind.name().to_string())).collect();
        let dataset = dir.path().file_name().map(|n| task_name(&n.to_string_lossy())).unwrap_or_default();
        assert_eq!(
            kinds,
            BTreeMap::from([
                ("intent".to_string(), "classification".to_string()),
                ("score".to_string(), "regression".to_string()),
                ("slots".to_string(), "token_classification".to_string()),
                (dataset, "multi_label".to_string()),
            ]),
            "{}",
            report.text
        );
        assert!(config.tasks.iter().all(|(_, t)| t.words_field == "words"));
        assert!(
            report.text.contains("data = { train = \"../train.jsonl\", dev = \"../dev.jsonl\" }"),
            "{}",
            report.text
        );
        assert!(report.guesses.iter().any(|g| g.contains("`note` left out")), "{:?}", report.guesses);
        assert!(report.text.contains("frame = [\"intent\", \"slots\"]"));
        Ok(())
    }
}
