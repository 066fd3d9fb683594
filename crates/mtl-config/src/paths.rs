//! Relative paths in a config file are read from the file's folder, as the file's author sees them; the
//! config then holds them absolute, so that a run's stored config (`mtl.toml`) reads the same data from any
//! directory. A path that is not in the folder but is in the current directory (how configs were read before)
//! is read from there, with a warning. Overrides (`--set`) are typed at a shell and read from the current
//! directory, as given.

use std::path::{Component, Path, PathBuf};

/// Resolves the path-valued keys of a config's TOML (`model.path`, `tasks.*.labels_file`,
/// `tasks.*.data.{train,dev,test}`) against `base` (the config file's folder); `source` names the file in
/// the warning about paths read from the current directory.
pub(crate) fn resolve(root: &mut toml::Table, base: &Path, source: &Path) {
    let mut from_here = Vec::new();
    if let Some(toml::Value::Table(model)) = root.get_mut("model") {
        resolve_key(model, "path", "model.path", base, &mut from_here);
    }
    if let Some(toml::Value::Table(tasks)) = root.get_mut("tasks") {
        for (name, task) in tasks.iter_mut() {
            let toml::Value::Table(task) = task else { continue };
            resolve_key(task, "labels_file", &format!("tasks.{name}.labels_file"), base, &mut from_here);
            if let Some(toml::Value::Table(data)) = task.get_mut("data") {
                for split in ["train", "dev", "test"] {
                    resolve_key(data, split, &format!("tasks.{name}.data.{split}"), base, &mut from_here);
                }
            }
        }
    }
    if !from_here.is_empty() {
        let folder = std::path::absolute(base).map(|b| normalize(&b)).unwrap_or_else(|_| base.to_owned());
        tracing::warn!(
            "{}: {} read from the current directory: not in the config's folder ({}), where relative paths are read from",
            source.display(),
            from_here.join(", "),
            folder.display(),
        );
    }
}

fn resolve_key(table: &mut toml::Table, key: &str, field: &str, base: &Path, from_here: &mut Vec<String>) {
    if let Some(toml::Value::String(path)) = table.get_mut(key) {
        if let Some((resolved, here)) = resolve_path(Path::new(path.as_str()), base) {
            if here {
                from_here.push(format!("`{field}` = \"{path}\""));
            }
            *path = resolved.to_string_lossy().into_owned();
        }
    }
}

/// The absolute path `path` names in a file whose folder is `base`, and whether it was found only from the
/// current directory; `None` for an absolute path (kept as written) or one that cannot be made absolute.
fn resolve_path(path: &Path, base: &Path) -> Option<(PathBuf, bool)> {
    if path.is_absolute() || path.as_os_str().is_empty() {
        return None;
    }
    // The folder as the file system has it (a symbolic link to it followed, as the shell follows it for
    // `../x` from inside), then the path lexically.
    let folder = std::fs::canonicalize(if base.as_os_str().is_empty() { Path::new(".") } else { base })
        .or_else(|_| std::path::absolute(base))
        .ok()?;
    let in_folder = normalize(&folder.join(path));
    if in_folder.exists() {
        return Some((in_folder, false));
    }
    let from_here = normalize(&std::path::absolute(path).ok()?);
    if from_here != in_folder && from_here.exists() {
        return Some((from_here, true));
    }
    // Not found anywhere: where the config says it is, for the error that follows.
    Some((in_folder, false))
}

/// `path` without `.` and `name/..` components (lexically: what a symbolic link points to is not read).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).expect("valid TOML")
    }

    #[test]
    fn paths_are_read_from_the_config_folder_then_the_current_directory() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let folder = dir.path().join("project/configs");
        std::fs::create_dir_all(folder.join("data")).expect("mkdir");
        std::fs::write(folder.join("data/train.jsonl"), "").expect("write");
        // Cargo runs tests from the crate's folder, where Cargo.toml is.
        let text = r#"
            [model]
            path = "../models/m"
            [tasks.a]
            labels_file = "/abs/labels.txt"
            data = { train = "data/train.jsonl", dev = "./data/../data/train.jsonl", test = "Cargo.toml" }
        "#;
        let mut root = table(text);
        resolve(&mut root, &folder, Path::new("c.toml"));
        let get = |keys: &[&str]| {
            let mut v = &toml::Value::Table(root.clone());
            for k in keys {
                v = &v[*k];
            }
            v.as_str().expect("a string").to_string()
        };
        let train = folder.join("data/train.jsonl").display().to_string();
        assert_eq!(get(&["tasks", "a", "data", "train"]), train);
        assert_eq!(get(&["tasks", "a", "data", "dev"]), train, "`.` and `x/..` are taken out");
        // Not in the folder but here: read from here.
        let here = std::env::current_dir().expect("a current directory").join("Cargo.toml");
        assert_eq!(get(&["tasks", "a", "data", "test"]), here.display().to_string());
        // Nowhere: where the config says, for the error to name.
        assert_eq!(get(&["model", "path"]), dir.path().join("project/models/m").display().to_string());
        assert_eq!(get(&["tasks", "a", "labels_file"]), "/abs/labels.txt");
    }

    #[test]
    fn normalizing_keeps_leading_parents() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), PathBuf::from("/a/c/d"));
        assert_eq!(normalize(Path::new("../../x")), PathBuf::from("../../x"));
    }
}
