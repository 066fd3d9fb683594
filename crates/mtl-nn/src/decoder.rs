//! A decoder trained on many tasks as text: one Llama backbone, LoRA shared by every task or one adapter per
//! task, the causal LM loss on each task's target tokens, and batched greedy decoding for evaluation.
//!
//! Batches come from [`mtl_data::collate_lm`]: each row holds one task's example, and each task's targets are
//! token labels at its rows' target positions. With per-task adapters the rows are grouped by adapter
//! internally (one forward pass, each row through its task's adapter).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, Mode, Targets, TaskId, IGNORE_INDEX};

use crate::bert::Kernels;
use crate::layers::DropoutRng;
use crate::llama::{next_token_targets, DecoderLora, KvCache, Llama, LlamaConfig, LlamaWeights, LoraRun};
use crate::params::ParamStore;
use crate::peft::{Route, SHARED_ADAPTER};
use crate::{NnError, Result, TaskLoss};

pub struct DecoderModel {
    llama: Llama,
    /// The trained variables: the LoRA matrices, or every weight without LoRA.
    params: ParamStore,
    dropout: DropoutRng,
    /// Each task's adapter (an index into the LoRA adapters; 0 when one is shared).
    adapter_of: BTreeMap<TaskId, usize>,
    device: Device,
}

impl DecoderModel {
    /// The decoder of `weights` (names as in `LlamaForCausalLM`), with LoRA when given: its adapters are
    /// [`SHARED_ADAPTER`] alone or one per task, named after the task. `extra` adds tensors over the
    /// pretrained ones (trained adapters).
    pub fn new(
        config: &LlamaConfig,
        weights: impl Into<LlamaWeights>,
        lora: Option<&DecoderLora>,
        tasks: &[TaskId],
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut weights: LlamaWeights = weights.into();
        if lora.is_none() {
            // Full fine-tuning trains every matrix: none may stay frozen in its quantised blocks.
            for (name, q) in std::mem::take(&mut weights.quantized) {
                weights.dense.insert(name, q.dequantize(device)?);
            }
        }
        let pb = weights.into_builder(seed, device)?;
        let llama = Llama::with_lora(&pb, config, lora)?;
        let mut params = pb.finish();
        let missing: Vec<&String> =
            params.initialised().iter().filter(|n| !params.role(n).is_some_and(|r| r.is_adapter())).collect();
        if !missing.is_empty() {
            return Err(NnError::MissingTensors {
                path: "decoder weights".into(),
                names: missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            });
        }
        let mut adapter_of = BTreeMap::new();
        if let Some(lora) = lora {
            // As in PEFT: only the adapters train; the pretrained weights are constants.
            params.remove(|_, role| role.is_adapter());
            for task in tasks {
                let index = match lora.adapters.iter().position(|a| a == task.as_str()) {
                    Some(i) => i,
                    None if lora.adapters.len() == 1 && lora.adapters[0] == SHARED_ADAPTER => 0,
                    None => {
                        return Err(NnError::UnknownAdapter(format!("task `{task}` has no LoRA adapter")));
                    }
                };
                adapter_of.insert(task.clone(), index);
            }
        } else {
            adapter_of = tasks.iter().map(|t| (t.clone(), 0)).collect();
        }
        let dropout = DropoutRng::new(lora.map_or(0.0, |l| l.spec.dropout), seed ^ 0xD20F);
        Ok(Self { llama, params, dropout, adapter_of, device: device.clone() })
    }

    pub fn llama(&self) -> &Llama {
        &self.llama
    }

    /// Fused CPU kernels (the default) or composed candle ops ([`Llama::set_kernels`]).
    pub fn set_kernels(&mut self, kernels: crate::Kernels) {
        self.llama.set_kernels(kernels);
    }

    /// The decoder, with its LoRA (for generation).
    pub fn into_llama(self) -> Llama {
        self.llama
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn dropout(&self) -> &DropoutRng {
        &self.dropout
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn tasks(&self) -> impl Iterator<Item = &TaskId> {
        self.adapter_of.keys()
    }

    /// The gradient of `loss` with respect to the trained variables.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(loss.backward()?)
    }

    /// Final hidden states `[rows * seq, hidden]` of `ids` (`rows × seq`, row-major) whose rows go through
    /// the adapters `adapters` (one per row, grouped: equal indices contiguous).
    fn hidden(
        &self,
        ids: Vec<u32>,
        mask: Option<&[u32]>,
        adapters: &[usize],
        seq: usize,
        mode: Mode,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let rows = adapters.len();
        let ids = Tensor::from_vec(ids, (rows, seq), &self.device)?;
        if self.llama.lora().is_none() {
            return self.llama.forward_with(&ids, mask, cache, None);
        }
        let mut routes: Vec<Route> = Vec::new();
        for (r, &a) in adapters.iter().enumerate() {
            match routes.last_mut() {
                Some(last) if last.adapter == a => last.examples.end = r + 1,
                _ => routes.push(Route { adapter: a, examples: r..r + 1 }),
            }
        }
        // Generation (the only caller with a cache) needs no gradient.
        let frozen = cache.is_some();
        let run = LoraRun { routes: &routes, dropout: &self.dropout, mode, frozen };
        self.llama.forward_with(&ids, mask, cache, Some(&run))
    }

    /// Each task's mean LM loss over its target tokens in `batch` (predicting token `j + 1` from position
    /// `j` wherever label `j + 1` is set).
    pub fn losses(&self, batch: &HostBatch, mode: Mode) -> Result<Vec<TaskLoss>> {
        let (b, s) = (batch.batch, batch.seq);
        // Each row's task: the one whose labels are set on it.
        let mut row_task: Vec<Option<&TaskId>> = vec![None; b];
        for (task, targets) in &batch.targets {
            let Targets::Tokens(labels) = targets else {
                return Err(NnError::Input(format!("task `{task}`: a decoder trains on token labels")));
            };
            for (r, slot) in row_task.iter_mut().enumerate() {
                if labels[r * s..(r + 1) * s].iter().any(|&l| l != IGNORE_INDEX) {
                    *slot = Some(task);
                }
            }
        }
        let adapter = |r: usize| row_task[r].and_then(|t| self.adapter_of.get(t).copied()).unwrap_or(0);
        let mut order: Vec<usize> = (0..b).collect();
        order.sort_by_key(|&r| adapter(r));
        let ids: Vec<u32> = order.iter().flat_map(|&r| batch.input_ids[r * s..(r + 1) * s].iter().copied()).collect();
        let mask: Vec<u32> =
            order.iter().flat_map(|&r| batch.attention_mask[r * s..(r + 1) * s].iter().copied()).collect();
        let adapters: Vec<usize> = order.iter().map(|&r| adapter(r)).collect();
        let hidden = self.hidden(ids, Some(&mask), &adapters, s, mode, None)?;
        let mut out = Vec::new();
        for (task, targets) in &batch.targets {
            let Targets::Tokens(labels) = targets else { unreachable!("checked above") };
            let (positions, next) = next_token_targets(labels, order.iter().copied().enumerate(), s, IGNORE_INDEX);
            if positions.is_empty() {
                continue;
            }
            let n = positions.len();
            let picked = hidden.index_select(&Tensor::from_vec(positions, n, &self.device)?, 0)?;
            let loss = self.llama.token_losses(&picked, &next)?.mean_all()?;
            let count = row_task.iter().filter(|t| **t == Some(task)).count();
            out.push(TaskLoss { task: task.clone(), loss, count });
        }
        Ok(out)
    }

    /// Greedy continuations of `prompts` through `task`'s adapter, decoded together (left-padded to the
    /// longest): at most `max_new` tokens each, cut before the first stop token.
    pub fn generate_greedy(
        &self,
        task: &TaskId,
        prompts: &[&[u32]],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let rows = prompts.len();
        let Some(len) = prompts.iter().map(|p| p.len()).max() else { return Ok(Vec::new()) };
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(NnError::Input("an empty prompt has nothing to continue".into()));
        }
        let adapter = self.adapter_of.get(task).copied().unwrap_or(0);
        if self.device.is_cpu() && self.llama.kernels() == Kernels::Fused {
            return self.generate_on_host(adapter, prompts, max_new, stop);
        }
        let adapters = vec![adapter; rows];
        let mut cache = KvCache::default();
        let mut input = Vec::with_capacity(rows * len);
        let mut mask = Vec::with_capacity(rows * len);
        for p in prompts {
            input.extend(std::iter::repeat_n(0, len - p.len()).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0, len - p.len()).chain(std::iter::repeat_n(1, p.len())));
        }
        let mut mask = Some(mask);
        let mut step_len = len;
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); rows];
        let mut done = vec![false; rows];
        let max_pos = self.llama.config().max_position_embeddings;
        for _ in 0..max_new {
            if cache.len() + step_len > max_pos {
                break;
            }
            let hidden =
                self.hidden(input, mask.take().as_deref(), &adapters, step_len, Mode::Eval, Some(&mut cache))?;
            let last: Vec<u32> = (0..rows).map(|r| (r * step_len + step_len - 1) as u32).collect();
            let picked = hidden.index_select(&Tensor::from_vec(last, rows, &self.device)?, 0)?;
            let next: Vec<u32> = self.llama.logits(&picked)?.argmax(1)?.to_vec1()?;
            for (r, &t) in next.iter().enumerate() {
                if done[r] {
                    continue;
                }
                if stop.contains(&t) {
                    done[r] = true;
                } else {
                    out[r].push(t);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            input = next;
            step_len = 1;
        }
        Ok(out)
    }

    /// [`DecoderModel::generate_greedy`] through a [`crate::cpu::decoder::DecodeCache`]: keys and values
    /// written in place, the prompts' common beginning (a task's chat template and instruction) computed once,
    /// and each row leaving the batch as soon as it has stopped.
    fn generate_on_host(
        &self,
        adapter: usize,
        prompts: &[&[u32]],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let rows = prompts.len();
        let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let capacity = (len + max_new).min(self.llama.config().max_position_embeddings);
        if max_new == 0 || len >= capacity {
            // Nothing to generate, or no room left after the prompt (as the composed path: empty answers).
            return Ok(vec![Vec::new(); rows]);
        }
        // The shared prefix, leaving every prompt at least one token of its own.
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        let shared =
            (0..shortest.saturating_sub(1)).take_while(|&i| prompts.iter().all(|p| p[i] == prompts[0][i])).count();
        let mut cache = self.llama.decode_cache(1, capacity);
        let route = |n: usize| [Route { adapter, examples: 0..n }];
        let lora = self.llama.lora().is_some();
        if shared > 0 {
            let routes = route(1);
            let run = LoraRun { routes: &routes, dropout: &self.dropout, mode: Mode::Eval, frozen: true };
            self.llama.decode(&prompts[0][..shared], &vec![1; shared], shared, &mut cache, lora.then_some(&run))?;
        }
        cache.broadcast(rows);
        let own = len - shared;
        let mut input = Vec::with_capacity(rows * own);
        let mut mask = Vec::with_capacity(rows * own);
        for p in prompts {
            let rest = &p[shared..];
            input.extend(std::iter::repeat_n(0, own - rest.len()).chain(rest.iter().copied()));
            mask.extend(std::iter::repeat_n(0, own - rest.len()).chain(std::iter::repeat_n(1, rest.len())));
        }
        let mut step = own;
        // The prompt each row of the cache answers.
        let mut active: Vec<usize> = (0..rows).collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); rows];
        for _ in 0..max_new {
            if cache.len() + step > capacity {
                break;
            }
            let routes = route(active.len());
            let run = LoraRun { routes: &routes, dropout: &self.dropout, mode: Mode::Eval, frozen: true };
            let hidden = self.llama.decode(&input, &mask, step, &mut cache, lora.then_some(&run))?;
            let next: Vec<u32> = self.llama.logits(&hidden)?.argmax(1)?.to_vec1()?;
            let mut keep = Vec::with_capacity(active.len());
            for (i, &t) in next.iter().enumerate() {
                if !stop.contains(&t) {
                    out[active[i]].push(t);
                    keep.push(i);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                cache.retain(&keep);
                active = keep.iter().map(|&i| active[i]).collect();
            }
            input = keep.iter().map(|&i| next[i]).collect();
            mask = vec![1; keep.len()];
            step = 1;
        }
        Ok(out)
    }
}
