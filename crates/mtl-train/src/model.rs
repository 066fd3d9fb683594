//! What the training loop needs of a model, so that one loop (samplers, loss weighting, gradient surgery,
//! checkpoints, early stopping) trains both the encoder with task heads and a decoder whose tasks are text.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, Mode, TaskId, TaskKind};
use mtl_data::{collate, collate_lm, Example};
use mtl_nn::{DecoderModel, DropoutRng, MultiTaskModel, ParamStore, TaskLoss};

use crate::evaluate::{predict_examples, Prediction, TaskInfo};
use crate::Result;

/// How examples become batches (a plain value, so that a worker thread can collate ahead of the model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collation {
    /// Encoder inputs with one target per task ([`mtl_data::collate`]).
    Heads,
    /// Prompt and target tokens with LM labels ([`mtl_data::collate_lm`]).
    Lm,
}

impl Collation {
    pub fn collate(self, examples: &[&Example], tasks: &BTreeMap<TaskId, (TaskKind, usize)>) -> HostBatch {
        match self {
            Self::Heads => collate(examples, tasks),
            Self::Lm => collate_lm(examples),
        }
    }
}

/// A batch's shared representation for gradient surgery on it.
pub struct Representation {
    /// The encoder's output, carrying its graph.
    pub hidden: Tensor,
    /// A copy of it cut from that graph, which the task losses read.
    pub leaf: candle_core::Var,
    pub losses: Vec<TaskLoss>,
}

/// A model the [`crate::Trainer`] can train and evaluate.
pub trait TrainModel {
    /// Every trained variable, by checkpoint name.
    fn params(&self) -> &ParamStore;
    /// The dropout generator, whose position a checkpoint stores.
    fn dropout(&self) -> &DropoutRng;
    fn device(&self) -> &Device;
    /// Transformer layers (layer-wise learning rates, freezing, GradNorm's top layer).
    fn num_layers(&self) -> usize;
    fn collation(&self) -> Collation;
    /// Lets forward passes from now on run several backward passes (per-task gradients).
    fn set_retain_graph(&self, retain: bool);
    /// Each task's loss on `batch`.
    fn losses(&self, batch: &HostBatch, mode: Mode) -> Result<Vec<TaskLoss>>;
    /// The gradient of `loss` with respect to every trained variable.
    fn backward(&self, loss: &Tensor) -> Result<GradStore>;
    /// The shared representation, a leaf cut from its graph, and each task's loss on the leaf
    /// ([`MultiTaskModel::representation_losses`]); `None` where the tasks share none.
    fn representation_losses(&self, _batch: &HostBatch, _mode: Mode) -> Result<Option<Representation>> {
        Ok(None)
    }
    /// Predictions of every task of `info` that each example has (or, for encoders, every task), in order.
    fn predict(
        &self,
        examples: &[&Example],
        info: &TaskInfo,
        batch_size: usize,
    ) -> Result<Vec<BTreeMap<TaskId, Prediction>>>;
}

impl TrainModel for MultiTaskModel {
    fn params(&self) -> &ParamStore {
        MultiTaskModel::params(self)
    }
    fn dropout(&self) -> &DropoutRng {
        MultiTaskModel::dropout(self)
    }
    fn device(&self) -> &Device {
        MultiTaskModel::device(self)
    }
    fn num_layers(&self) -> usize {
        self.bert().config().num_hidden_layers
    }
    fn collation(&self) -> Collation {
        Collation::Heads
    }
    fn set_retain_graph(&self, retain: bool) {
        MultiTaskModel::set_retain_graph(self, retain)
    }
    fn losses(&self, batch: &HostBatch, mode: Mode) -> Result<Vec<TaskLoss>> {
        Ok(MultiTaskModel::losses(self, batch, mode)?)
    }
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(MultiTaskModel::backward(self, loss)?)
    }
    fn representation_losses(&self, batch: &HostBatch, mode: Mode) -> Result<Option<Representation>> {
        Ok(MultiTaskModel::representation_losses(self, batch, mode)?.map(|(hidden, leaf, losses)| Representation {
            hidden,
            leaf,
            losses,
        }))
    }
    fn predict(
        &self,
        examples: &[&Example],
        info: &TaskInfo,
        batch_size: usize,
    ) -> Result<Vec<BTreeMap<TaskId, Prediction>>> {
        predict_examples(self, examples, info, batch_size)
    }
}

/// A decoder with what its evaluation needs: the tokenizer to turn generated tokens into text, the tokens
/// that end an answer, and each task's answer budget.
pub struct TextTasks {
    pub model: DecoderModel,
    pub tokenizer: tokenizers::Tokenizer,
    pub stop: Vec<u32>,
    /// The longest answer generated for each task, in tokens.
    pub max_new_tokens: BTreeMap<TaskId, usize>,
}

/// The answer budget, in new tokens, of a task a run records none for.
pub const DEFAULT_ANSWER_TOKENS: usize = 32;

impl TextTasks {
    /// The greedy answer of every example to its own task's prompt, as text. Each task's prompts are decoded
    /// in batches of `batch_size`, sorted by length (to pad little).
    pub fn answers(&self, examples: &[&Example], batch_size: usize) -> Result<Vec<BTreeMap<TaskId, String>>> {
        let mut out = vec![BTreeMap::new(); examples.len()];
        let mut groups: BTreeMap<&TaskId, Vec<usize>> = BTreeMap::new();
        for (i, ex) in examples.iter().enumerate() {
            for task in ex.labels.keys() {
                groups.entry(task).or_default().push(i);
            }
        }
        for (task, members) in groups {
            let prompts: Vec<&[u32]> =
                members.iter().map(|&i| mtl_data::prompt::prompt_ids(&examples[i].encoded)).collect();
            for (i, text) in members.into_iter().zip(self.answer(task, &prompts, batch_size)?) {
                out[i].insert(task.clone(), text);
            }
        }
        Ok(out)
    }

    /// The greedy answers of `task` to `prompts` (token ids), in order, decoded in batches of `batch_size`
    /// sorted by length.
    pub fn answer(&self, task: &TaskId, prompts: &[&[u32]], batch_size: usize) -> Result<Vec<String>> {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let budget = self.max_new_tokens.get(task).copied().unwrap_or(DEFAULT_ANSWER_TOKENS);
        let mut out = vec![String::new(); prompts.len()];
        let mut bar = crate::items::items(prompts.len(), task.as_str());
        for chunk in order.chunks(batch_size.max(1)) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i]).collect();
            let generated = self.model.generate_greedy(task, &batch, budget, &self.stop)?;
            if let Some(bar) = &mut bar {
                bar.inc(chunk.len());
            }
            for (&i, ids) in chunk.iter().zip(generated) {
                out[i] = self.tokenizer.decode(&ids, true).unwrap_or_default();
            }
        }
        if let Some(bar) = bar {
            bar.finish();
        }
        Ok(out)
    }
}

impl TrainModel for TextTasks {
    fn params(&self) -> &ParamStore {
        self.model.params()
    }
    fn dropout(&self) -> &DropoutRng {
        self.model.dropout()
    }
    fn device(&self) -> &Device {
        self.model.device()
    }
    fn num_layers(&self) -> usize {
        self.model.llama().config().num_hidden_layers
    }
    fn collation(&self) -> Collation {
        Collation::Lm
    }
    fn set_retain_graph(&self, _retain: bool) {
        // candle keeps the graph of every forward pass until its tensors are dropped.
    }
    fn losses(&self, batch: &HostBatch, mode: Mode) -> Result<Vec<TaskLoss>> {
        Ok(self.model.losses(batch, mode)?)
    }
    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(self.model.backward(loss)?)
    }
    fn predict(
        &self,
        examples: &[&Example],
        _info: &TaskInfo,
        batch_size: usize,
    ) -> Result<Vec<BTreeMap<TaskId, Prediction>>> {
        Ok(self
            .answers(examples, batch_size)?
            .into_iter()
            .map(|m| m.into_iter().map(|(t, text)| (t, Prediction::Generated(text))).collect())
            .collect())
    }
}
