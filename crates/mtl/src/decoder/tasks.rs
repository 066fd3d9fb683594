//! A decoder run's tasks as the server's predict routes ask them: each (input, task) becomes the greedy
//! generation of the task's trained prompt through the task's adapter, with the task's answer budget, and its
//! text maps to the task's answer as `mtl predict` maps it ([`super::task_prediction`]).

use std::collections::BTreeMap;

use mtl_config::TaskConfig;
use mtl_core::TaskId;
use mtl_data::prompt::{ChatTemplate, PromptFormat};
use mtl_data::Input;
use mtl_serve::generation::{Generation, LabelTasks, Prompt};
use mtl_serve::{EngineError, RequestInput, TaskDescription};
use serde_json::Value;

/// A request's input as the library's, its fields checked for emptiness; and the text that entity offsets of
/// its answers refer to (the text as sent, a pair's first text, pre-split words joined by single spaces, a
/// question's context).
pub(crate) fn request_input(input: &RequestInput) -> Result<(Input, String), EngineError> {
    let nonempty = |field: &str, text: &str| match text.trim().is_empty() {
        true => Err(EngineError::Invalid(format!("`{field}` is empty"))),
        false => Ok(()),
    };
    Ok(match input {
        RequestInput::Text(t) | RequestInput::Single { text: t } => {
            nonempty("text", t)?;
            (Input::Text(t.clone()), t.clone())
        }
        RequestInput::Pair { text, text_pair } => {
            nonempty("text", text)?;
            nonempty("text_pair", text_pair)?;
            (Input::Pair(text.clone(), text_pair.clone()), text.clone())
        }
        RequestInput::Words { words } => {
            if words.is_empty() || words.iter().any(|w| w.trim().is_empty() || w.contains(char::is_whitespace)) {
                return Err(EngineError::Invalid(
                    "`words` must be a non-empty list of words without whitespace".into(),
                ));
            }
            (Input::Words(words.clone()), words.join(" "))
        }
        RequestInput::Question { question, context } => {
            nonempty("question", question)?;
            nonempty("context", context)?;
            (Input::Question { question: question.clone(), context: context.clone() }, context.clone())
        }
    })
}

/// One task of a decoder run, as served.
struct Served {
    config: TaskConfig,
    labels: Vec<String>,
    /// The adapter its generations go through (none: the run's one shared adapter).
    adapter: Option<String>,
    /// Its answer budget in new tokens.
    max_new_tokens: usize,
}

/// A decoder run's tasks, answered by generation (see the module's documentation).
pub(crate) struct DecoderTasks {
    descriptions: Vec<TaskDescription>,
    tasks: BTreeMap<String, Served>,
    tokenizer: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    system: Option<String>,
    eos: u32,
    max_len: usize,
}

impl DecoderTasks {
    pub(crate) fn new(run: &super::DecoderRun) -> Self {
        let adapters: &[String] = run.text.model.llama().lora().map_or(&[], |l| l.adapters.as_slice());
        let mut descriptions = Vec::new();
        let mut tasks = BTreeMap::new();
        for (task, tc) in &run.config.tasks {
            let description = crate::predict::task_description(task, tc, run.labels.get(task));
            let served = Served {
                config: tc.clone(),
                labels: description.labels.clone(),
                adapter: adapters.iter().any(|a| a == task.as_str()).then(|| task.to_string()),
                max_new_tokens: budget(&run.text.max_new_tokens, task),
            };
            descriptions.push(description);
            tasks.insert(task.to_string(), served);
        }
        Self {
            descriptions,
            tasks,
            tokenizer: run.text.tokenizer.clone(),
            chat: run.chat.clone(),
            system: run.config.model.system_prompt.clone(),
            eos: run.eos,
            max_len: run.max_len,
        }
    }

    fn format(&self) -> PromptFormat<'_> {
        PromptFormat {
            tokenizer: &self.tokenizer,
            chat: self.chat.as_ref(),
            eos: self.eos,
            max_len: self.max_len,
            system: self.system.as_deref(),
        }
    }
}

/// A task's answer budget, as evaluation uses it.
fn budget(budgets: &BTreeMap<TaskId, usize>, task: &TaskId) -> usize {
    budgets.get(task).copied().unwrap_or(mtl_train::DEFAULT_ANSWER_TOKENS)
}

impl LabelTasks for DecoderTasks {
    fn tasks(&self) -> &[TaskDescription] {
        &self.descriptions
    }

    fn generation(&self, task: &str, input: &RequestInput) -> Result<Generation, EngineError> {
        let served = self.tasks.get(task).ok_or_else(|| EngineError::Invalid(format!("unknown task `{task}`")))?;
        let (input, _) = request_input(input)?;
        let format = self.format();
        // As `mtl predict` and `mtl eval`: room for the task's answer budget; inputs too long lose words from
        // their end.
        let (ids, _) = format
            .prompt_ids(&served.config, &input, format.answer_room(served.max_new_tokens))
            .map_err(EngineError::Invalid)?;
        Ok(Generation::greedy(Prompt::Tokens(ids), served.adapter.clone(), served.max_new_tokens))
    }

    fn answer(&self, task: &str, generated: String) -> Value {
        let Some(served) = self.tasks.get(task) else { return Value::Null };
        let p = super::task_prediction(&served.config, &served.labels, generated);
        serde_json::to_value(p).unwrap_or(Value::Null)
    }
}
