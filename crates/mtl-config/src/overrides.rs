//! `--set a.b=value` overrides, applied to the TOML tree before it is deserialised and validated.

use crate::ConfigError;

pub(crate) fn apply_override(root: &mut toml::Value, set: &str) -> Result<(), ConfigError> {
    let err = |message: &str| ConfigError::Override { set: set.to_string(), message: message.to_string() };
    let (key, raw) = set.split_once('=').ok_or_else(|| err("expected KEY=VALUE, e.g. training.lr=3e-5"))?;
    let keys: Vec<&str> = key.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(err("the key has an empty part"));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = keys.split_last().expect("split yields at least one part; this is a bug");
    let mut table = root;
    for part in parents {
        let t = table.as_table_mut().ok_or_else(|| err("the key goes through a value that is not a table"))?;
        table = t.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    table
        .as_table_mut()
        .ok_or_else(|| err("the key goes through a value that is not a table"))?
        .insert(last.to_string(), value);
    Ok(())
}
