//! Validation of a whole config: every field checked against the others, each error naming the file and
//! the field, with the valid choices.

use std::path::Path;

use mtl_core::TaskKind;

use crate::*;

/// The error of a `field` of the config file at `path`.
fn invalid_field(path: &Path, field: &str, message: String) -> ConfigError {
    ConfigError::Invalid { path: path.to_owned(), field: field.to_string(), message }
}

impl Config {
    /// Checks the whole config; each error names the file and the field.
    pub(crate) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.validate_training(path)?;
        for (name, task) in &self.tasks {
            self.validate_task(name, task, path)?;
        }
        self.validate_shared_files(path)?;
        self.validate_selection(path)
    }

    /// The tasks are there, and the recipe's numbers are in range.
    fn validate_training(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| invalid_field(path, field, message);
        let t = &self.training;
        if self.tasks.is_empty() {
            return Err(invalid("tasks", "at least one task is needed".into()));
        }
        if self.model.max_len < 3 {
            return Err(invalid("model.max_len", "must be at least 3".into()));
        }
        if t.epochs == 0 {
            return Err(invalid("training.epochs", "must be at least 1".into()));
        }
        if t.batch_size == 0 || t.eval_batch_size == 0 {
            return Err(invalid("training.batch_size", "batch sizes must be at least 1".into()));
        }
        let w = &t.weighting;
        if t.surgery.representation {
            let why = match (t.surgery.method, w.method) {
                (crate::SurgeryMethod::None, _) => Some("needs a surgery method to combine the gradients"),
                (crate::SurgeryMethod::DbMtl, _) => Some("DB-MTL averages parameter gradients over steps; it has no representation form"),
                (_, crate::WeightingMethod::GradNorm) => Some("GradNorm reads each task's gradient on the top encoder layer, which representation gradients do not reach"),
                _ if self.peft.per_task => Some("with per-task adapters the tasks share no representation"),
                _ => None,
            };
            if let Some(why) = why {
                return Err(invalid("training.surgery.representation", why.into()));
            }
        }
        if w.method == crate::WeightingMethod::AutoLambda {
            if t.surgery.method != crate::SurgeryMethod::None {
                return Err(invalid(
                    "training.surgery.method",
                    "Auto-λ learns the tasks' weights from the step's whole gradient; use it without gradient surgery"
                        .into(),
                ));
            }
            if w.meta_every == 0 {
                return Err(invalid("training.weighting.meta_every", "must be at least 1".into()));
            }
            if w.meta_examples == Some(0) {
                return Err(invalid("training.weighting.meta_examples", "must be at least 1".into()));
            }
            if !(w.init.is_finite() && w.init > 0.0) {
                return Err(invalid("training.weighting.init", "must be a positive number".into()));
            }
        }
        let s = &t.sampling;
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            return Err(invalid("training.sampling.temperature", "must be a positive number".into()));
        }
        if s.cap == Some(0) {
            return Err(invalid("training.sampling.cap", "must be at least 1".into()));
        }
        if s.sampler == SamplerKind::Fixed {
            for name in self.tasks.keys() {
                match s.weights.get(name) {
                    Some(w) if w.is_finite() && *w >= 0.0 => {}
                    Some(w) => {
                        return Err(invalid(
                            "training.sampling.weights",
                            format!("task `{name}`: weight {w} must be >= 0"),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            "training.sampling.weights",
                            format!("the fixed sampler needs a weight for task `{name}`"),
                        ))
                    }
                }
            }
            if s.weights.values().sum::<f64>() <= 0.0 {
                return Err(invalid("training.sampling.weights", "at least one weight must be positive".into()));
            }
        }
        if let Some(name) = s.weights.keys().find(|n| !self.tasks.contains_key(*n)) {
            return Err(invalid(
                "training.sampling.weights",
                format!("unknown task `{name}`; tasks are: {}", self.task_list()),
            ));
        }
        for (name, &passes) in &s.epochs {
            if !self.tasks.contains_key(name) {
                return Err(invalid(
                    "training.sampling.epochs",
                    format!("unknown task `{name}`; tasks are: {}", self.task_list()),
                ));
            }
            if !(passes.is_finite() && passes > 0.0) {
                return Err(invalid(
                    "training.sampling.epochs",
                    format!("task `{name}`: {passes} passes; must be a positive number"),
                ));
            }
        }
        if !s.epochs.is_empty() && s.plan != StepPlan::Sampled {
            return Err(invalid(
                "training.sampling.epochs",
                "a task's own number of passes needs `plan = \"sampled\"` (the mixed plan batches all tasks' examples together)".into(),
            ));
        }
        if t.max_tokens == Some(0) {
            return Err(invalid("training.max_tokens", "must be at least 1".into()));
        }
        for (field, lr) in [("training.lr", Some(t.lr)), ("training.head_lr", t.head_lr)] {
            if let Some(lr) = lr {
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(invalid(field, format!("must be a positive number, got {lr}")));
                }
            }
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(invalid("training.weight_decay", "must be >= 0".into()));
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return Err(invalid("training.warmup_ratio", "must be in [0, 1]".into()));
        }
        if !(0.0..1.0).contains(&t.dropout) {
            return Err(invalid("training.dropout", "must be in [0, 1)".into()));
        }
        if let Some(c) = t.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid("training.grad_clip", "must be a positive number".into()));
            }
        }
        Ok(())
    }

    /// One task's options against its kind and format.
    fn validate_task(&self, name: &TaskId, task: &TaskConfig, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| invalid_field(path, field, message);
        let field = |f: &str| format!("tasks.{name}.{f}");
        if task.format.is_conll() && task.kind != TaskKind::TokenClassification {
            return Err(invalid(
                &field("format"),
                "the conll and conllu formats hold tags, so they only suit token_classification tasks".into(),
            ));
        }
        if task.kind == TaskKind::TokenClassification && task.format.is_tabular() {
            return Err(invalid(&field("format"), "token tasks read jsonl, conll or conllu files".into()));
        }
        if task.kind == TaskKind::QuestionAnswering && task.format != DataFormat::Jsonl {
            return Err(invalid(&field("format"), "question answering reads jsonl files (SQuAD-style lines)".into()));
        }
        if task.pair_field.is_some() && !task.kind.is_sequence_level() {
            return Err(invalid(
                &field("pair_field"),
                "sentence pairs suit classification, multi_label and regression tasks".into(),
            ));
        }
        if task.train_limit == Some(0) || task.max_new_tokens == Some(0) {
            let what = if task.train_limit == Some(0) { "train_limit" } else { "max_new_tokens" };
            return Err(invalid(&field(what), "must be at least 1".into()));
        }
        if let Some(p) = &task.prompt {
            if !p.contains("{text}") {
                return Err(invalid(&field("prompt"), "must contain `{text}`, where the input goes".into()));
            }
        }
        if !task.verbalizer.is_empty() && task.kind != TaskKind::Classification {
            return Err(invalid(&field("verbalizer"), "label words are for classification tasks".into()));
        }
        if task.crf && task.kind != TaskKind::TokenClassification {
            return Err(invalid(&field("crf"), "a CRF is a layer of token_classification tasks".into()));
        }
        if task.label_fields.is_some() && task.kind != TaskKind::Regression {
            return Err(invalid(
                &field("label_fields"),
                "several label fields are for regression with several outputs".into(),
            ));
        }
        if let Some(fields) = &task.label_fields {
            if fields.is_empty() {
                return Err(invalid(&field("label_fields"), "must not be empty".into()));
            }
        }
        if matches!(task.kind, TaskKind::Regression | TaskKind::QuestionAnswering | TaskKind::Generation) {
            for (what, set) in [
                ("labels", task.labels.is_some()),
                ("labels_file", task.labels_file.is_some()),
                ("unknown_label", task.unknown_label.is_some()),
                ("skip_unseen_labels", task.skip_unseen_labels),
            ] {
                if set {
                    return Err(invalid(&field(what), format!("{} tasks have no label set", task.kind.name())));
                }
            }
        }
        if !(task.threshold > 0.0 && task.threshold < 1.0) {
            return Err(invalid(&field("threshold"), "must be in (0, 1)".into()));
        }
        if !(task.huber_delta.is_finite() && task.huber_delta > 0.0) {
            return Err(invalid(&field("huber_delta"), "must be a positive number".into()));
        }
        if task.label_separator.is_empty() {
            return Err(invalid(&field("label_separator"), "must not be empty".into()));
        }
        if task.kind == TaskKind::QuestionAnswering {
            if task.max_query_len + 4 >= self.model.max_len {
                return Err(invalid(
                    &field("max_query_len"),
                    format!("must leave room for the context within model.max_len = {}", self.model.max_len),
                ));
            }
            if task.doc_stride(self.model.max_len) >= self.model.max_len - task.max_query_len - 3 {
                return Err(invalid(
                    &field("doc_stride"),
                    "must be smaller than the context window (model.max_len - max_query_len - 3)".into(),
                ));
            }
            if task.max_answer_len == 0 {
                return Err(invalid(&field("max_answer_len"), "must be at least 1".into()));
            }
        }
        if task.skip_unseen_labels && task.unknown_label.is_some() {
            return Err(invalid(
                &field("skip_unseen_labels"),
                "labels outside the set are either mapped (`unknown_label`) or left out, not both".into(),
            ));
        }
        if let (Some(fallback), Some(labels)) = (&task.unknown_label, &task.labels) {
            if !labels.contains(fallback) {
                return Err(invalid(&field("unknown_label"), format!("{fallback:?} is not in `labels`")));
            }
        }
        if task.labels.is_some() && task.labels_file.is_some() {
            return Err(invalid(
                &format!("tasks.{name}.labels_file"),
                "give `labels` or `labels_file`, not both".into(),
            ));
        }
        if let Some(labels) = &task.labels {
            let mut seen = std::collections::BTreeSet::new();
            if let Some(dup) = labels.iter().find(|l| !seen.insert(*l)) {
                return Err(invalid(&format!("tasks.{name}.labels"), format!("label {dup:?} is listed twice")));
            }
            if labels.is_empty() {
                return Err(invalid(&format!("tasks.{name}.labels"), "must not be empty".into()));
            }
        }
        Ok(())
    }

    /// Tasks that read the same file read its input the same way.
    fn validate_shared_files(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| invalid_field(path, field, message);
        for (a_name, a) in &self.tasks {
            for (b_name, b) in self.tasks.range(a_name..).skip(1) {
                let shares_file = [Split::Train, Split::Dev, Split::Test]
                    .iter()
                    .any(|&s| a.data.get(s).is_some() && a.data.get(s) == b.data.get(s));
                if !shares_file {
                    continue;
                }
                if a.kind == TaskKind::QuestionAnswering || b.kind == TaskKind::QuestionAnswering {
                    return Err(invalid(
                        &format!("tasks.{b_name}"),
                        format!("it reads the same file as task `{a_name}`; a question answering task needs files of its own"),
                    ));
                }
                let same_input = a.format == b.format
                    && a.text_field == b.text_field
                    && a.pair_field == b.pair_field
                    && a.words_field == b.words_field
                    && a.word_column == b.word_column;
                if !same_input {
                    return Err(invalid(
                        &format!("tasks.{b_name}"),
                        format!("it reads the same file as task `{a_name}`, so format, text_field, pair_field, words_field and word_column must match"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The joint frame, the recipe's and `[peft]`'s settings, and the selection metric.
    fn validate_selection(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| invalid_field(path, field, message);
        let t = &self.training;
        for name in &self.joint.frame {
            if !self.tasks.contains_key(name) {
                return Err(invalid("joint.frame", format!("unknown task `{name}`; tasks are: {}", self.task_list())));
            }
        }
        recipe::validate(self, path)?;
        peft::validate(self, path)?;
        if let Some(metric) = &t.select_metric {
            let valid = self.metric_names();
            if !valid.contains(metric) {
                return Err(invalid(
                    "training.select_metric",
                    format!("unknown metric `{metric}`; valid choices: {}", valid.join(", ")),
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn task_list(&self) -> String {
        self.tasks.keys().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Every metric name this config reports on dev and test, as `TASK.METRIC`.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, task) in &self.tasks {
            let metrics: &[&str] = match (task.kind, task.scheme) {
                (TaskKind::Classification, _) => &["accuracy", "macro_f1", "micro_f1", "weighted_f1", "mcc"],
                (TaskKind::MultiLabel, _) => &["micro_f1", "macro_f1", "weighted_f1", "samples_f1", "subset_accuracy"],
                (TaskKind::Regression, _) => &["pearson", "spearman", "mse", "mae"],
                (TaskKind::TokenClassification, TagScheme::None) => &["accuracy", "macro_f1"],
                (TaskKind::TokenClassification, _) => &["precision", "recall", "f1", "accuracy"],
                (TaskKind::QuestionAnswering, _) => &["exact_match", "f1"],
                (TaskKind::Generation, _) => &["rouge_l", "exact_match"],
            };
            names.extend(metrics.iter().map(|m| format!("{name}.{m}")));
        }
        if !self.joint.frame.is_empty() {
            names.push("joint.frame_accuracy".into());
        }
        names
    }
}
