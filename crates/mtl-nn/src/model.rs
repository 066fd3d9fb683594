//! One backbone, named heads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, Mode, TaskId, TaskKind, Targets, IGNORE_INDEX};

use crate::bert::{Bert, BertConfig, BertInput, Kernels};
use crate::heads::Head;
use crate::layers::{cross_entropy, DropoutRng};
use crate::params::{ParamBuilder, ParamStore};
use crate::{NnError, Result};

/// The loss of one task on one batch.
#[derive(Clone, Debug)]
pub struct TaskLoss {
    pub task: TaskId,
    /// Mean cross-entropy over the labelled rows (a scalar tensor that carries the graph).
    pub loss: Tensor,
    /// How many rows were labelled.
    pub count: usize,
}

/// Predictions of one task on one batch.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskPrediction {
    /// One label id per example, with its probability.
    Class { ids: Vec<u32>, scores: Vec<f32> },
    /// One tag id per word of each example (`None` for words truncated away).
    Tags(Vec<Vec<Option<u32>>>),
}

/// A shared BERT encoder with one head per task.
pub struct MultiTaskModel {
    bert: Bert,
    heads: BTreeMap<TaskId, Head>,
    dropout: DropoutRng,
    params: ParamStore,
    device: Device,
}

/// What a model is built from.
#[derive(Clone, Debug)]
pub struct ModelSpec<'a> {
    pub bert: &'a BertConfig,
    /// Each task's kind and number of labels.
    pub tasks: &'a BTreeMap<TaskId, (TaskKind, usize)>,
    pub dropout: f32,
    /// Seeds head initialisation and dropout masks.
    pub seed: u64,
}

impl MultiTaskModel {
    /// Builds the model from weights in memory; parameters absent from `weights` are initialised. Heads live
    /// under `heads.TASK`.
    pub fn build(spec: &ModelSpec, weights: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        Self::from_builder(spec, ParamBuilder::new(weights, spec.seed, device))
    }

    /// Builds the model from a safetensors file. Every backbone tensor must be present; heads must be present
    /// too when `require_heads` (a fine-tuned checkpoint), and are freshly initialised otherwise.
    pub fn load(spec: &ModelSpec, weights: &Path, require_heads: bool, device: &Device) -> Result<Self> {
        let model = Self::from_builder(spec, ParamBuilder::from_safetensors(weights, spec.seed, device)?)?;
        let missing: Vec<&str> = model
            .params
            .initialised()
            .iter()
            .map(String::as_str)
            .filter(|n| require_heads || !n.starts_with("heads."))
            .collect();
        if !missing.is_empty() {
            return Err(NnError::MissingTensors { path: weights.to_owned(), names: missing.join(", ") });
        }
        Ok(model)
    }

    fn from_builder(spec: &ModelSpec, pb: ParamBuilder) -> Result<Self> {
        let device = pb.device();
        let bert = Bert::new(&pb, spec.bert)?;
        let heads = spec
            .tasks
            .iter()
            .map(|(name, &(kind, n))| Ok((name.clone(), Head::new(&pb.pp("heads").pp(name.as_str()), kind, bert.hidden_size(), n)?)))
            .collect::<Result<_>>()?;
        Ok(Self { bert, heads, dropout: DropoutRng::new(spec.dropout, spec.seed ^ 0xD20F), params: pb.finish(), device })
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// Chooses the encoder implementation (the fused one by default).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.bert.set_kernels(kernels);
    }

    /// The gradient of `loss` with respect to every parameter. Use this, not `loss.backward()`: on the CPU the
    /// fused encoder computes its parameters' gradients itself and hands them over here.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.bert.take_grads(); // leftovers of a backward pass whose gradients were never collected
        let mut grads = loss.backward()?;
        for (param, grad) in self.bert.take_grads() {
            let grad = match grads.remove(&param) {
                Some(previous) => (previous + grad)?,
                None => grad,
            };
            grads.insert(&param, grad);
        }
        Ok(grads)
    }

    pub fn heads(&self) -> &BTreeMap<TaskId, Head> {
        &self.heads
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn input(&self, batch: &HostBatch) -> Result<BertInput> {
        let shape = (batch.batch, batch.seq);
        let t = |v: &[u32]| Tensor::from_slice(v, shape, &self.device);
        Ok(BertInput {
            input_ids: t(&batch.input_ids)?,
            token_type_ids: t(&batch.token_type_ids)?,
            attention_mask: std::sync::Arc::new(batch.attention_mask.clone()),
        })
    }

    /// Hidden states of the last layer, `[batch * seq, hidden]`.
    pub fn encode(&self, batch: &HostBatch, mode: Mode) -> Result<Tensor> {
        self.bert.forward(&self.input(batch)?, &self.dropout, mode)
    }

    /// The loss of every task that has at least one label in `batch`.
    pub fn losses(&self, batch: &HostBatch, mode: Mode) -> Result<Vec<TaskLoss>> {
        let hidden = self.encode(batch, mode)?;
        let mut out = Vec::new();
        for (task, targets) in &batch.targets {
            let Some(head) = self.heads.get(task) else { continue };
            let (rows, labels): (Vec<u32>, Vec<u32>) = match targets {
                Targets::Class(t) => t
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| l != IGNORE_INDEX)
                    .map(|(b, &l)| ((b * batch.seq) as u32, l as u32))
                    .unzip(),
                Targets::Tokens(t) => {
                    t.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX).map(|(i, &l)| (i as u32, l as u32)).unzip()
                }
            };
            if rows.is_empty() {
                continue;
            }
            let logits = head.forward(&hidden, &rows, &self.dropout, mode)?.logits;
            let targets = Tensor::from_slice(&labels, labels.len(), &self.device)?;
            out.push(TaskLoss { task: task.clone(), loss: cross_entropy(&logits, &targets)?, count: rows.len() });
        }
        Ok(out)
    }

    /// Every head's predictions on `batch`, in evaluation mode.
    pub fn predict(&self, batch: &HostBatch) -> Result<BTreeMap<TaskId, TaskPrediction>> {
        let hidden = self.encode(batch, Mode::Eval)?;
        let mut out = BTreeMap::new();
        for (task, head) in &self.heads {
            let prediction = match head.kind() {
                TaskKind::Classification => {
                    let rows: Vec<u32> = (0..batch.batch).map(|b| (b * batch.seq) as u32).collect();
                    let (ids, scores) = head.forward(&hidden, &rows, &self.dropout, Mode::Eval)?.argmax()?;
                    TaskPrediction::Class { ids, scores }
                }
                TaskKind::TokenClassification => {
                    let rows: Vec<u32> = batch
                        .word_starts
                        .iter()
                        .enumerate()
                        .flat_map(|(b, starts)| starts.iter().flatten().map(move |&p| (b * batch.seq + p) as u32))
                        .collect();
                    let ids = if rows.is_empty() {
                        Vec::new()
                    } else {
                        head.forward(&hidden, &rows, &self.dropout, Mode::Eval)?.argmax()?.0
                    };
                    let mut ids = ids.into_iter();
                    let tags = batch
                        .word_starts
                        .iter()
                        .map(|starts| starts.iter().map(|s| s.and_then(|_| ids.next())).collect())
                        .collect();
                    TaskPrediction::Tags(tags)
                }
            };
            out.insert(task.clone(), prediction);
        }
        Ok(out)
    }
}
