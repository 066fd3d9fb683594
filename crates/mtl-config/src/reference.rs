//! The config reference, made from the config types themselves: their JSON Schema (`schemars`, with each
//! field's doc comment as its description; `docs/config.schema.json`, which editors can use) and a Markdown
//! table per section (`docs/config.md`). A test keeps both files equal to what the types make now, and checks
//! that every key the other docs name exists.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::Value;

use crate::Config;

/// The JSON Schema of a run config.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Config)).expect("a schema serializes")
}

/// The JSON Schema of a serve config (`mtl serve --config`).
pub fn serve_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(crate::serve::ServeFile)).expect("a schema serializes")
}

/// Every key of a run config and a serve config, dotted (`training.lr`, `tasks.NAME.data.train`,
/// `serve.max_batch`): a map's entries are `NAME`.
pub fn keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for schema in [schema(), serve_schema()] {
        let mut sections = Vec::new();
        walk(&schema, &schema, "", &mut sections);
        for s in sections {
            keys.extend(s.rows.into_iter().map(|r| r.key));
            if !s.prefix.is_empty() {
                keys.insert(s.prefix);
            }
        }
    }
    keys
}

/// `docs/config.md`.
pub fn markdown() -> String {
    let mut out = String::new();
    out.push_str("# Config reference\n\n");
    out.push_str(
        "Generated from the config types (`crates/mtl-config`) by `MTL_UPDATE_DOCS=1 cargo test -p mtl-config \
         docs`; a test fails when this file differs from what they make. Each field's text is its doc comment. \
         `docs/config.schema.json` and `docs/serve.schema.json` are the same as JSON Schema, for editors (with \
         a TOML language server: `#:schema ./config.schema.json` on a config's first line).\n\n",
    );
    out.push_str(
        "A run config is one TOML file: `[model]`, `[training]`, one `[tasks.NAME]` table per task, and \
         optionally `[joint]` and `[peft]`. Unknown keys are errors that list the valid ones. Relative paths \
         are read from the config file's folder. `mtl train --set KEY=VALUE` sets any key below.\n",
    );
    for (title, schema) in [("Run config", schema()), ("Serve config (`mtl serve --config FILE`)", serve_schema())] {
        let _ = write!(out, "\n## {title}\n");
        let mut sections = Vec::new();
        walk(&schema, &schema, "", &mut sections);
        for s in sections {
            if s.rows.is_empty() {
                continue;
            }
            match s.prefix.is_empty() {
                true => out.push_str("\n### Top level\n\n"),
                false => {
                    let _ = write!(out, "\n### `[{}]`\n\n", s.prefix);
                }
            }
            if let Some(d) = &s.description {
                let _ = writeln!(out, "{}\n", one_line(d));
            }
            out.push_str("| key | type | default | meaning |\n|---|---|---|---|\n");
            for r in s.rows {
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} | {} |",
                    r.key.rsplit('.').next().unwrap_or(&r.key),
                    r.kind,
                    r.default,
                    one_line(&r.description).replace('|', "\\|")
                );
            }
        }
    }
    out
}

/// A table of the reference: the keys of one TOML table.
struct Section {
    prefix: String,
    description: Option<String>,
    rows: Vec<Row>,
}

struct Row {
    key: String,
    kind: String,
    default: String,
    description: String,
}

/// The definition `schema` points to (`$ref`), or itself.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => root["$defs"].get(name).map_or(schema, |d| resolve(root, d)),
        None => schema,
    }
}

/// `schema` without an `Option`'s null (`anyOf: [X, null]`, `type: [T, "null"]`).
fn unwrap_option<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
        let some: Vec<&Value> = any.iter().filter(|s| s.get("type") != Some(&Value::from("null"))).collect();
        if some.len() == 1 && some.len() < any.len() {
            return resolve(root, some[0]);
        }
    }
    resolve(root, schema)
}

fn is_table(schema: &Value) -> bool {
    schema.get("properties").is_some()
}

/// The schema of a map's values: `additionalProperties`, or the one `patternProperties` of a map keyed by
/// task names.
fn map_values(schema: &Value) -> Option<&Value> {
    let pattern = schema.get("patternProperties").and_then(Value::as_object).and_then(|p| p.values().next());
    pattern.or_else(|| schema.get("additionalProperties").filter(|v| v.is_object()))
}

/// The table a map's entries are (`tasks` → each task's table), where they are tables.
fn map_entries<'a>(root: &'a Value, schema: &'a Value) -> Option<&'a Value> {
    let entries = unwrap_option(root, map_values(schema)?);
    is_table(entries).then_some(entries)
}

fn walk(root: &Value, table: &Value, prefix: &str, out: &mut Vec<Section>) {
    let table = resolve(root, table);
    let description = table.get("description").and_then(Value::as_str).map(String::from);
    let mut section = Section { prefix: prefix.to_string(), description, rows: Vec::new() };
    let mut nested = Vec::new();
    let join = |key: &str| if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
    for (key, field) in table.get("properties").and_then(Value::as_object).into_iter().flatten() {
        let inner = unwrap_option(root, field);
        if is_table(inner) {
            nested.push((join(key), inner));
        } else if let Some(entries) = map_entries(root, inner) {
            nested.push((format!("{}.NAME", join(key)), entries));
        } else {
            let description = field
                .get("description")
                .or_else(|| inner.get("description"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let default = match field.get("default") {
                Some(Value::Null) | None => {
                    let required = table.get("required").and_then(Value::as_array);
                    match required.is_some_and(|r| r.contains(&Value::from(key.as_str()))) {
                        true => "required".into(),
                        false => "none".into(),
                    }
                }
                Some(v) => format!("`{}`", toml_value(v)),
            };
            section.rows.push(Row { key: join(key), kind: kind(root, field), default, description });
        }
    }
    out.push(section);
    for (prefix, inner) in nested {
        walk(root, inner, &prefix, out);
    }
}

/// A default as TOML writes it.
fn toml_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!("[{}]", items.iter().map(toml_value).collect::<Vec<_>>().join(", ")),
        Value::Object(map) if map.is_empty() => "{}".into(),
        Value::Object(map) => {
            let items: Vec<String> = map.iter().map(|(k, v)| format!("{k} = {}", toml_value(v))).collect();
            format!("{{ {} }}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A field's type, in words.
fn kind(root: &Value, schema: &Value) -> String {
    let schema = unwrap_option(root, schema);
    if let Some(values) = enum_values(schema) {
        return values.iter().map(|v| format!("`{v}`")).collect::<Vec<_>>().join(" \\| ");
    }
    if let Some(any) = schema.get("anyOf").or_else(|| schema.get("oneOf")).and_then(Value::as_array) {
        let parts: Vec<String> = any.iter().map(|s| kind(root, s)).collect();
        return parts.join(" or ");
    }
    if let Some(c) = schema.get("const") {
        return format!("`{}`", toml_value(c));
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => vec![],
    };
    match types.first().copied() {
        Some("array") => format!("list of {}", schema.get("items").map_or("values".into(), |i| kind(root, i))),
        Some("object") => match map_values(schema) {
            Some(v) => format!("table of {}", kind(root, v)),
            None => "table".into(),
        },
        Some("integer") => "integer".into(),
        Some("number") => "number".into(),
        Some("boolean") => "boolean".into(),
        Some("string") => "string".into(),
        _ => "value".into(),
    }
}

/// The values of an enum of strings.
fn enum_values(schema: &Value) -> Option<Vec<String>> {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return Some(values.iter().map(toml_or_plain).collect());
    }
    // Variants with a doc comment are one `const` each; those without, one `enum` together.
    let mut values = Vec::new();
    for s in schema.get("oneOf")?.as_array()? {
        match (s.get("const"), s.get("enum").and_then(Value::as_array)) {
            (Some(c), _) => values.push(toml_or_plain(c)),
            (None, Some(e)) => values.extend(e.iter().map(toml_or_plain)),
            (None, None) => return None,
        }
    }
    Some(values)
}

fn toml_or_plain(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), String::from)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs")
    }

    /// docs/config.md and the schemas are what the types make now (`MTL_UPDATE_DOCS=1` rewrites them).
    #[test]
    fn docs_reference_is_current() {
        let files = [
            ("config.md", markdown()),
            ("config.schema.json", serde_json::to_string_pretty(&schema()).expect("json") + "\n"),
            ("serve.schema.json", serde_json::to_string_pretty(&serve_schema()).expect("json") + "\n"),
        ];
        for (name, made) in files {
            let path = docs().join(name);
            if std::env::var_os("MTL_UPDATE_DOCS").is_some() {
                std::fs::write(&path, &made).expect("write the docs");
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(have == made, "{} is stale: run MTL_UPDATE_DOCS=1 cargo test -p mtl-config docs", path.display());
        }
    }

    /// Every key in the reference has a description, and every dotted key the guides and the README name
    /// (`training.lr`, `tasks.intent.data.train`) is one the config has.
    #[test]
    fn docs_keys_are_documented_and_exist() {
        let schema = schema();
        let mut sections = Vec::new();
        walk(&schema, &schema, "", &mut sections);
        let undocumented: Vec<String> = sections
            .iter()
            .flat_map(|s| &s.rows)
            .filter(|r| r.description.trim().is_empty())
            .map(|r| r.key.clone())
            .collect();
        assert!(undocumented.is_empty(), "keys without a doc comment: {undocumented:?}");
        let keys = keys();
        // Keys whose values are tables of names (`training.weighting.weights`).
        let maps: Vec<String> = sections
            .iter()
            .flat_map(|s| &s.rows)
            .filter(|r| r.kind.starts_with("table"))
            .map(|r| r.key.clone())
            .collect();
        let roots = ["model.", "training.", "tasks.", "peft.", "joint.", "serve."];
        // Dotted names that are not keys: files and a metric.
        let not_keys = ["model.safetensors", "model.safetensors.index.json", "joint.frame_accuracy"];
        let mut pages: Vec<std::path::PathBuf> = std::fs::read_dir(docs())
            .expect("docs/")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "md") && !p.ends_with("config.md"))
            .collect();
        pages.push(docs().join("../README.md"));
        let mut unknown = Vec::new();
        for page in pages {
            let text = std::fs::read_to_string(&page).expect("a doc page");
            for (i, span) in text.split('`').enumerate() {
                // Odd pieces are inside backticks.
                if i % 2 == 0 {
                    continue;
                }
                let key =
                    span.trim().trim_start_matches("--set").trim_start().split(['=', ' ']).next().unwrap_or_default();
                // Keys are lower case (`NAME` stands for a task); `peft.PeftModel` is Python.
                let lower = key.replace(".NAME", ".name");
                let is_key = lower.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
                if not_keys.contains(&key) || !roots.iter().any(|r| key.starts_with(r)) || !is_key {
                    continue;
                }
                // A task's name stands for NAME.
                let parts: Vec<&str> = key.split('.').collect();
                let general = match parts.as_slice() {
                    ["tasks", _name, rest @ ..] if !rest.is_empty() => format!("tasks.NAME.{}", rest.join(".")),
                    ["tasks", _name] => "tasks.NAME".into(),
                    _ => key.to_string(),
                };
                // Below a map of task names (weights by task), a task's name.
                let known = keys.contains(&general) || maps.iter().any(|m| general.starts_with(&format!("{m}.")));
                if !known {
                    unknown.push(format!("{}: `{key}`", page.display()));
                }
            }
        }
        assert!(unknown.is_empty(), "documented keys the config does not have:\n{}", unknown.join("\n"));
    }
}
