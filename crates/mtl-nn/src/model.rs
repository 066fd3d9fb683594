//! One backbone, named heads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, Mode, Targets, TaskId, TaskKind, IGNORE_INDEX};

use crate::bert::{Bert, BertConfig, BertInput, Kernels};
use crate::crf::Crf;
use crate::heads::{binary_cross_entropy_with_logits, Head, HeadOutput, HeadSpec};
use crate::layers::{cross_entropy, DropoutRng};
use crate::params::{ParamBuilder, ParamStore};
use crate::peft::{self, PeftSpec, Route};
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
    /// Each label's probability, per example (multi-label).
    Probs(Vec<Vec<f32>>),
    /// The outputs of each example, in the scaled space the head was trained in (regression).
    Values(Vec<Vec<f32>>),
    /// One tag id per word of each example (`None` for words truncated away).
    Tags(Vec<Vec<Option<u32>>>),
    /// Start and end logits of every token of each example (QA); padding is cut off.
    Spans { start: Vec<Vec<f32>>, end: Vec<Vec<f32>> },
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
    /// Each task's head.
    pub tasks: &'a BTreeMap<TaskId, HeadSpec>,
    pub dropout: f32,
    /// Seeds head initialisation and dropout masks.
    pub seed: u64,
    /// A parameter-efficient method on the encoder (whose pretrained parameters are then frozen).
    pub peft: Option<&'a PeftSpec>,
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
        Self::load_files(spec, weights, None, require_heads, device)
    }

    /// Builds a trained parameter-efficient model: the frozen backbone from the base model's `weights`, the
    /// adapters and heads from `adapters`. Every tensor must be present.
    pub fn load_with_adapters(spec: &ModelSpec, weights: &Path, adapters: &Path, device: &Device) -> Result<Self> {
        Self::load_files(spec, weights, Some(adapters), true, device)
    }

    /// Builds an int8 model: f32 tensors (embeddings, biases, LayerNorms, heads) from `weights`, the encoder's
    /// projections from the int8 file `int8` (written by [`MultiTaskModel::save_int8`]). Inference only.
    pub fn load_int8(spec: &ModelSpec, weights: &Path, int8: &Path, device: &Device) -> Result<Self> {
        let pb = ParamBuilder::from_safetensors(weights, spec.seed, device)?;
        pb.add_int8(int8)?;
        let model = Self::from_builder(spec, pb)?;
        let missing = model.params.initialised();
        if !missing.is_empty() {
            return Err(NnError::MissingTensors { path: weights.to_owned(), names: missing.join(", ") });
        }
        if model.bert.int8_layers().is_none() {
            return Err(NnError::File { path: int8.to_owned(), message: "holds no int8 encoder weights".into() });
        }
        Ok(model)
    }

    /// Quantises the encoder's projections to int8 for inference (see [`crate::cpu::int8`]); their f32
    /// weights, and the adapters of a merged LoRA, are dropped.
    pub fn quantize_int8(&mut self) -> Result<()> {
        let dropped = self.bert.quantize_int8()?;
        self.params.remove(|name, role| !dropped.iter().any(|d| d == name) && !role.is_adapter());
        Ok(())
    }

    /// Writes an int8 model's int8 weights (its other tensors are in [`MultiTaskModel::params`]).
    pub fn save_int8(&self, path: &Path) -> Result<()> {
        let weights = self.bert.int8_weights();
        if weights.is_empty() {
            return Err(NnError::File { path: path.to_owned(), message: "the model is not an int8 one".into() });
        }
        let refs: Vec<(String, &crate::cpu::int8::Int8Matrix)> = weights.iter().map(|(n, m)| (n.clone(), m)).collect();
        crate::params::save_int8(path, &refs)
    }

    /// Folds a merged shared LoRA adapter into the model for good: its adapter parameters go, and the model
    /// is then a plain one whose weights hold the update.
    pub fn drop_adapters(&mut self) -> Result<()> {
        self.bert.fold_merged()?;
        self.params.remove(|_, role| !role.is_adapter());
        Ok(())
    }

    /// Drops the top `n` encoder layers (model cutting); the heads then read the last layer that stays.
    pub fn prune_top_layers(&mut self, n: usize) -> Result<()> {
        self.bert.drop_top_layers(n)?;
        let kept = self.bert.config().num_hidden_layers;
        // MPNet's relative position bias and DeBERTa's relative embeddings have the top layer's role but serve
        // every layer: they stay.
        self.params
            .remove(|name, role| role.layer().is_none_or(|l| l < kept) || crate::bert::SHARED_RELATIVE.contains(&name));
        Ok(())
    }

    fn load_files(
        spec: &ModelSpec,
        weights: &Path,
        adapters: Option<&Path>,
        require_heads: bool,
        device: &Device,
    ) -> Result<Self> {
        let pb = ParamBuilder::from_safetensors(weights, spec.seed, device)?;
        if let Some(path) = adapters {
            pb.add_safetensors(path)?;
        }
        let model = Self::from_builder(spec, pb)?;
        let missing: Vec<&str> = model
            .params
            .initialised()
            .iter()
            .map(String::as_str)
            // Fresh heads and (before training) fresh adapters are expected; a trained model must have them.
            .filter(|n| require_heads || !model.params.is_added(n))
            .collect();
        if !missing.is_empty() {
            let path = adapters.filter(|_| missing.iter().all(|n| model.params.is_added(n)));
            return Err(NnError::MissingTensors {
                path: path.unwrap_or(weights).to_owned(),
                names: missing.join(", "),
            });
        }
        Ok(model)
    }

    fn from_builder(spec: &ModelSpec, pb: ParamBuilder) -> Result<Self> {
        let device = pb.device();
        let bert = Bert::new(&pb, spec.bert, spec.peft)?;
        let spec_bert = spec.bert;
        let heads = spec
            .tasks
            .iter()
            .map(|(name, spec)| {
                Ok((
                    name.clone(),
                    Head::with_prediction_head(
                        &pb.pp("heads").pp(name.as_str()).with_role(mtl_core::ParamRole::Head(name.clone())),
                        spec,
                        bert.hidden_size(),
                        spec_bert.modern.as_ref().map(|m| m.prediction_head(spec_bert.layer_norm_eps)),
                    )?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            bert,
            heads,
            dropout: DropoutRng::new(spec.dropout, spec.seed ^ 0xD20F),
            params: pb.finish(),
            device,
        })
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

    /// The encoder's projections in bf16 (on AMX) or f32.
    pub fn set_precision(&mut self, precision: crate::Precision) {
        self.bert.set_precision(precision);
    }

    /// How an int8 model's projections multiply: dynamic (int8 activations, on AMX) or weight-only.
    pub fn set_int8_compute(&mut self, compute: crate::cpu::int8::Int8Compute) {
        self.bert.set_int8_compute(compute);
    }

    /// The dropout generator, whose position a checkpoint stores.
    pub fn dropout(&self) -> &DropoutRng {
        &self.dropout
    }

    /// Lets each forward pass from now on run several backward passes (per-task gradients); see
    /// [`Bert::set_retain_graph`].
    pub fn set_retain_graph(&self, retain: bool) {
        self.bert.set_retain_graph(retain);
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

    fn input(&self, batch: &HostBatch, routes: Option<Vec<Route>>) -> Result<BertInput> {
        let shape = (batch.batch, batch.seq);
        let t = |v: &[u32]| Tensor::from_slice(v, shape, &self.device);
        Ok(BertInput {
            input_ids: t(&batch.input_ids)?,
            token_type_ids: t(&batch.token_type_ids)?,
            attention_mask: std::sync::Arc::new(batch.attention_mask.clone()),
            routes,
        })
    }

    /// Hidden states of the last layer, `[batch * seq, hidden]`. A model with per-task adapters needs to know
    /// the task: use [`MultiTaskModel::encode_for`].
    pub fn encode(&self, batch: &HostBatch, mode: Mode) -> Result<Tensor> {
        self.bert.forward(&self.input(batch, None)?, &self.dropout, mode)
    }

    /// Hidden states of the last layer as `task` sees them (through its own adapter, if it has one).
    pub fn encode_for(&self, task: &TaskId, batch: &HostBatch, mode: Mode) -> Result<Tensor> {
        let routes = match self.per_task_peft() {
            Some(spec) => Some(vec![Route { adapter: spec.adapter_of(task)?, examples: 0..batch.batch }]),
            None => None,
        };
        self.bert.forward(&self.input(batch, routes)?, &self.dropout, mode)
    }

    /// [`MultiTaskModel::encode_for`] from word embeddings in place of the table's rows for the batch's ids
    /// (see [`Bert::forward_words`]); `task` picks the adapter of a model with one per task.
    pub fn encode_words(&self, task: &TaskId, batch: &HostBatch, words: &Tensor, mode: Mode) -> Result<Tensor> {
        let routes = match self.per_task_peft() {
            Some(spec) => Some(vec![Route { adapter: spec.adapter_of(task)?, examples: 0..batch.batch }]),
            None => None,
        };
        self.bert.forward_words(&self.input(batch, routes)?, words, &self.dropout, mode)
    }

    /// The rows of the word-embedding table for the batch's ids, `[batch, seq, width]`.
    pub fn word_embeddings(&self, batch: &HostBatch) -> Result<Tensor> {
        self.bert.word_embeddings(&Tensor::from_slice(&batch.input_ids, (batch.batch, batch.seq), &self.device)?)
    }

    /// A head's logits on the hidden states of `batch` (from [`MultiTaskModel::encode_words`] or
    /// [`MultiTaskModel::encode_for`]), carrying the graph: `[batch, outputs]` for a sequence-level task (its
    /// pooled states), `[batch, seq, outputs]` for a token task (CRF emissions) and QA (start and end).
    pub fn head_logits(&self, task: &TaskId, hidden: &Tensor, batch: &HostBatch, mode: Mode) -> Result<Tensor> {
        let head = self.heads.get(task).ok_or_else(|| NnError::Input(format!("the model has no task `{task}`")))?;
        match head.kind() {
            TaskKind::Classification | TaskKind::MultiLabel | TaskKind::Regression => {
                let examples: Vec<usize> = (0..batch.batch).collect();
                let states = self.sequence_states(hidden, batch, &examples)?;
                Ok(head.forward_states(&states, &self.dropout, mode)?.logits)
            }
            TaskKind::TokenClassification | TaskKind::QuestionAnswering => {
                let logits = head.forward_states(hidden, &self.dropout, mode)?.logits;
                Ok(logits.reshape((batch.batch, batch.seq, head.num_labels()))?)
            }
            TaskKind::Generation => Err(NnError::Unsupported("generation tasks have no encoder head".into())),
        }
    }

    /// The method when each task has its own adapter and none is merged.
    fn per_task_peft(&self) -> Option<&PeftSpec> {
        self.bert.peft().filter(|spec| spec.per_task() && self.bert.merged().is_none())
    }

    /// Adds adapter `adapter`'s update into the base weights (`W += (alpha / r) · B A`), after which the encoder
    /// runs without LoRA, at the speed of the plain model (PEFT's `merge_adapter`). Only one adapter can be
    /// merged at a time.
    pub fn merge_lora(&mut self, adapter: usize) -> Result<()> {
        if let Some(m) = self.bert.merged() {
            return Err(NnError::Unsupported(format!("LoRA adapter {m} is merged already; unmerge it first")));
        }
        let n = self.bert.peft().filter(|s| s.lora().is_some()).map_or(0, |s| s.adapters.len());
        if adapter >= n {
            return Err(NnError::UnknownAdapter(format!(
                "no LoRA adapter {adapter} (the model has {n}); only LoRA merges"
            )));
        }
        self.shift_base(adapter, 1.0)?;
        self.bert.set_merged(Some(adapter));
        Ok(())
    }

    /// Takes the merged adapter's update back out of the base weights (up to rounding).
    pub fn unmerge_lora(&mut self) -> Result<()> {
        if let Some(adapter) = self.bert.merged() {
            self.shift_base(adapter, -1.0)?;
            self.bert.set_merged(None);
        }
        Ok(())
    }

    fn shift_base(&self, adapter: usize, sign: f64) -> Result<()> {
        for (name, delta) in self.bert.lora_deltas(adapter)? {
            let var = self.params.vars().get(&name).ok_or_else(|| NnError::Input(format!("no parameter {name}")))?;
            var.set(&(var.as_tensor() + (delta * sign)?)?)?;
        }
        Ok(())
    }

    /// The backbone's weights under `BertModel` names, with LoRA adapter `adapter`'s update added in: a copy,
    /// the model is unchanged. `None`: the weights as they are (with whatever adapter is merged).
    pub fn backbone_weights(&self, adapter: Option<usize>) -> Result<BTreeMap<String, Tensor>> {
        let deltas: HashMap<String, Tensor> = match adapter {
            Some(_) if self.bert.merged().is_some() => {
                return Err(NnError::Unsupported("a LoRA adapter is merged already; unmerge it first".into()))
            }
            Some(a) => self.bert.lora_deltas(a)?.into_iter().collect(),
            None => HashMap::new(),
        };
        self.params
            .with_roles()
            .filter(|(_, _, role)| role.is_backbone())
            .map(|(n, v, _)| {
                let t = v.as_tensor();
                Ok((
                    n.clone(),
                    match deltas.get(n) {
                        Some(d) => (t + d)?,
                        None => t.copy()?,
                    },
                ))
            })
            .collect()
    }

    /// The loss of every task that has at least one label in `batch`.
    pub fn losses(&self, batch: &HostBatch, mode: Mode) -> Result<Vec<TaskLoss>> {
        // Per-task adapters: each example once for every task that labels it, through that task's adapter.
        let routed;
        let (batch, hidden) = match self.per_task_peft() {
            Some(spec) => {
                let (b, routes) = peft::route_by_task(batch, spec)?;
                if routes.is_empty() {
                    return Ok(Vec::new());
                }
                routed = b;
                (&routed, self.bert.forward(&self.input(&routed, Some(routes))?, &self.dropout, mode)?)
            }
            None => (batch, self.encode(batch, mode)?),
        };
        let mut out = Vec::new();
        for (task, targets) in &batch.targets {
            let Some(head) = self.heads.get(task) else {
                continue;
            };
            if let Some(loss) = self.task_loss(head, &hidden, batch, targets, mode)? {
                out.push(TaskLoss { task: task.clone(), loss: loss.0, count: loss.1 });
            }
        }
        Ok(out)
    }

    /// The batch's shared representation and each task's loss on a copy of it cut from the encoder's graph
    /// (MGDA-UB's and LibMTL's `rep_grad`): `(hidden, leaf, losses)`, where backward passes from the losses
    /// reach the leaf and the heads only, and `hidden` carries the encoder's graph. `None` with per-task
    /// adapters, where the tasks share no representation.
    pub fn representation_losses(
        &self,
        batch: &HostBatch,
        mode: Mode,
    ) -> Result<Option<(Tensor, candle_core::Var, Vec<TaskLoss>)>> {
        if self.per_task_peft().is_some() {
            return Ok(None);
        }
        let hidden = self.encode(batch, mode)?;
        let leaf = candle_core::Var::from_tensor(&hidden.detach())?;
        let mut out = Vec::new();
        for (task, targets) in &batch.targets {
            let Some(head) = self.heads.get(task) else {
                continue;
            };
            if let Some(loss) = self.task_loss(head, leaf.as_tensor(), batch, targets, mode)? {
                out.push(TaskLoss { task: task.clone(), loss: loss.0, count: loss.1 });
            }
        }
        Ok(Some((hidden, leaf, out)))
    }

    /// The states a sequence-level head reads, one row per example of `examples` (`[n, hidden]`): the first
    /// token's, or, on a ModernBERT whose config pools by the mean (`classifier_pooling = "mean"`), the mean
    /// of its real tokens' states, as transformers' `ModernBertForSequenceClassification` pools.
    fn sequence_states(&self, hidden: &Tensor, batch: &HostBatch, examples: &[usize]) -> Result<Tensor> {
        let (seq, n) = (batch.seq, examples.len());
        if self.bert.config().modern.as_ref().is_some_and(|m| m.mean_pooling) {
            let h = hidden.dim(1)?;
            let rows: Vec<u32> = examples.iter().flat_map(|&b| (b * seq..(b + 1) * seq).map(|r| r as u32)).collect();
            let mask: Vec<f32> = examples
                .iter()
                .flat_map(|&b| batch.attention_mask[b * seq..(b + 1) * seq].iter().map(|&m| m as f32))
                .collect();
            let counts: Vec<f32> = mask.chunks(seq.max(1)).map(|m| m.iter().sum::<f32>().max(1.0)).collect();
            let x = hidden.index_select(&Tensor::from_vec(rows, n * seq, &self.device)?, 0)?.reshape((n, seq, h))?;
            let summed = x.broadcast_mul(&Tensor::from_vec(mask, (n, seq, 1), &self.device)?)?.sum(1)?;
            return Ok(summed.broadcast_div(&Tensor::from_vec(counts, (n, 1), &self.device)?)?);
        }
        let rows: Vec<u32> = examples.iter().map(|&b| (b * seq) as u32).collect();
        Ok(hidden.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?)
    }

    /// One head's loss and the number of labelled rows, `None` when nothing in the batch is labelled.
    fn task_loss(
        &self,
        head: &Head,
        hidden: &Tensor,
        batch: &HostBatch,
        targets: &Targets,
        mode: Mode,
    ) -> Result<Option<(Tensor, usize)>> {
        let seq = batch.seq;
        let device = &self.device;
        Ok(match targets {
            Targets::Tokens(t) if head.crf().is_some() => {
                let crf = head.crf().expect("matched a CRF head");
                return self.crf_loss(head, crf, hidden, batch, t, mode);
            }
            Targets::Class(t) => {
                let (examples, labels): (Vec<usize>, Vec<u32>) = labelled_rows(t).unzip();
                if examples.is_empty() {
                    return Ok(None);
                }
                let states = self.sequence_states(hidden, batch, &examples)?;
                let logits = head.forward_states(&states, &self.dropout, mode)?.logits;
                let targets = Tensor::from_slice(&labels, labels.len(), device)?;
                Some((cross_entropy(&logits, &targets)?, examples.len()))
            }
            Targets::Tokens(t) => {
                // Token targets sit on their own rows.
                let (rows, labels): (Vec<u32>, Vec<u32>) = labelled_rows(t).map(|(i, l)| (i as u32, l)).unzip();
                if rows.is_empty() {
                    return Ok(None);
                }
                let logits = head.forward(hidden, &rows, &self.dropout, mode)?.logits;
                let targets = Tensor::from_slice(&labels, labels.len(), device)?;
                Some((cross_entropy(&logits, &targets)?, rows.len()))
            }
            Targets::Dense { width, values, present } => {
                let kept: Vec<usize> = (0..batch.batch).filter(|&b| present[b]).collect();
                if kept.is_empty() {
                    return Ok(None);
                }
                let target: Vec<f32> =
                    kept.iter().flat_map(|&b| values[b * width..(b + 1) * width].iter().copied()).collect();
                let target = Tensor::from_vec(target, (kept.len(), *width), device)?;
                let states = self.sequence_states(hidden, batch, &kept)?;
                let logits = head.forward_states(&states, &self.dropout, mode)?.logits;
                let loss = match head.kind() {
                    TaskKind::MultiLabel => binary_cross_entropy_with_logits(&logits, &target)?,
                    _ => head.regression_loss(&logits, &target)?,
                };
                Some((loss, kept.len()))
            }
            Targets::Span { start, end } => {
                let kept: Vec<usize> = (0..batch.batch).filter(|&b| start[b] != IGNORE_INDEX).collect();
                if kept.is_empty() {
                    return Ok(None);
                }
                let rows: Vec<u32> = kept.iter().flat_map(|&b| (b * seq..(b + 1) * seq).map(|r| r as u32)).collect();
                let logits = head.forward(hidden, &rows, &self.dropout, mode)?.logits.reshape((kept.len(), seq, 2))?;
                // Padding can never be an answer.
                let pad: Vec<f32> = kept
                    .iter()
                    .flat_map(|&b| {
                        batch.attention_mask[b * seq..(b + 1) * seq].iter().map(|&m| if m == 0 { -1e4 } else { 0.0 })
                    })
                    .collect();
                let pad = Tensor::from_vec(pad, (kept.len(), seq), device)?;
                let mut loss = None;
                for (k, gold) in [start, end].into_iter().enumerate() {
                    let l = logits.narrow(2, k, 1)?.squeeze(2)?.add(&pad)?;
                    let g: Vec<u32> = kept.iter().map(|&b| gold[b] as u32).collect();
                    let ce = cross_entropy(&l, &Tensor::from_slice(&g, g.len(), device)?)?;
                    loss = Some(match loss {
                        None => ce,
                        Some(prev) => ((prev + ce)? * 0.5)?,
                    });
                }
                loss.map(|l| (l, kept.len()))
            }
        })
    }

    fn crf_loss(
        &self,
        head: &Head,
        crf: &Crf,
        hidden: &Tensor,
        batch: &HostBatch,
        t: &[i64],
        mode: Mode,
    ) -> Result<Option<(Tensor, usize)>> {
        // Each labelled sentence's words in order; a sentence without labels is skipped.
        let mut rows = Vec::new();
        let mut lengths = Vec::new();
        let mut tags = Vec::new();
        for b in 0..batch.batch {
            let labelled: Vec<(u32, u32)> = (0..batch.seq)
                .filter_map(|p| {
                    let l = t[b * batch.seq + p];
                    (l != IGNORE_INDEX).then_some(((b * batch.seq + p) as u32, l as u32))
                })
                .collect();
            if labelled.is_empty() {
                continue;
            }
            lengths.push(labelled.len());
            rows.extend(labelled.iter().map(|x| x.0));
            tags.push(labelled.iter().map(|x| x.1).collect::<Vec<_>>());
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let logits = head.forward(hidden, &rows, &self.dropout, mode)?.logits;
        let emissions = Crf::pad(&logits, &lengths)?;
        let width = lengths.iter().copied().max().unwrap_or(0);
        let padded: Vec<u32> =
            tags.iter().flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, width - r.len()))).collect();
        Ok(Some((crf.nll(&emissions, &lengths, &padded)?, rows.len())))
    }

    /// Every head's predictions on `batch`, in evaluation mode.
    pub fn predict(&self, batch: &HostBatch) -> Result<BTreeMap<TaskId, TaskPrediction>> {
        self.predict_for(batch, |_| true)
    }

    /// The predictions of the heads whose task passes `wanted`, in evaluation mode.
    pub fn predict_for(
        &self,
        batch: &HostBatch,
        wanted: impl Fn(&TaskId) -> bool,
    ) -> Result<BTreeMap<TaskId, TaskPrediction>> {
        // One encoder pass for all heads, or one per task when each task has its own adapter.
        let shared = match self.per_task_peft() {
            Some(_) => None,
            None => Some(self.encode(batch, Mode::Eval)?),
        };
        let mut out = BTreeMap::new();
        let examples: Vec<usize> = (0..batch.batch).collect();
        for (task, head) in self.heads.iter().filter(|(t, _)| wanted(t)) {
            let own;
            let hidden = match &shared {
                Some(h) => h,
                None => {
                    own = self.encode_for(task, batch, Mode::Eval)?;
                    &own
                }
            };
            let sequence = || -> Result<HeadOutput> {
                head.forward_states(&self.sequence_states(hidden, batch, &examples)?, &self.dropout, Mode::Eval)
            };
            let prediction = match head.kind() {
                TaskKind::Classification => {
                    let (ids, scores) = sequence()?.argmax()?;
                    TaskPrediction::Class { ids, scores }
                }
                TaskKind::MultiLabel => {
                    let logits = sequence()?.logits;
                    let probs = (logits.neg()?.exp()? + 1.0)?.recip()?;
                    TaskPrediction::Probs(probs.to_vec2::<f32>()?)
                }
                TaskKind::Regression => TaskPrediction::Values(sequence()?.logits.to_vec2::<f32>()?),
                TaskKind::TokenClassification => self.predict_tags(head, hidden, batch)?,
                // No head is ever built for generated text (`Head::new` refuses it).
                TaskKind::Generation => continue,
                TaskKind::QuestionAnswering => {
                    let rows: Vec<u32> = (0..(batch.batch * batch.seq) as u32).collect();
                    let logits = head.forward(hidden, &rows, &self.dropout, Mode::Eval)?.logits.to_vec2::<f32>()?;
                    let mut start = Vec::new();
                    let mut end = Vec::new();
                    for b in 0..batch.batch {
                        let len = batch.attention_mask[b * batch.seq..(b + 1) * batch.seq]
                            .iter()
                            .filter(|&&m| m != 0)
                            .count();
                        let rows = &logits[b * batch.seq..b * batch.seq + len];
                        start.push(rows.iter().map(|r| r[0]).collect());
                        end.push(rows.iter().map(|r| r[1]).collect());
                    }
                    TaskPrediction::Spans { start, end }
                }
            };
            out.insert(task.clone(), prediction);
        }
        Ok(out)
    }

    fn predict_tags(&self, head: &Head, hidden: &Tensor, batch: &HostBatch) -> Result<TaskPrediction> {
        let rows: Vec<u32> = batch
            .word_starts
            .iter()
            .enumerate()
            .flat_map(|(b, starts)| starts.iter().flatten().map(move |&p| (b * batch.seq + p) as u32))
            .collect();
        let ids: Vec<u32> = if rows.is_empty() {
            Vec::new()
        } else {
            let logits = head.forward(hidden, &rows, &self.dropout, Mode::Eval)?.logits;
            match head.crf() {
                None => argmax_ids(&logits)?,
                Some(crf) => {
                    let lengths: Vec<usize> = batch.word_starts.iter().map(|s| s.iter().flatten().count()).collect();
                    let nonempty: Vec<usize> = lengths.iter().copied().filter(|&l| l > 0).collect();
                    let emissions = Crf::pad(&logits, &nonempty)?;
                    crf.decode(&emissions, &nonempty)?.concat()
                }
            }
        };
        let mut ids = ids.into_iter();
        let tags = batch
            .word_starts
            .iter()
            .map(|starts| starts.iter().map(|s| s.and_then(|_| ids.next())).collect())
            .collect();
        Ok(TaskPrediction::Tags(tags))
    }
}

/// The positions and labels of the labelled entries of `targets`.
fn labelled_rows(targets: &[i64]) -> impl Iterator<Item = (usize, u32)> + '_ {
    targets.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX).map(|(i, &l)| (i, l as u32))
}

/// The index of the largest logit of each row.
fn argmax_ids(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
}
