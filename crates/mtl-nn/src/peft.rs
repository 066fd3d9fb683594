//! Parameter-efficient tuning: small trained parameters on a frozen encoder.
//!
//! **LoRA** (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685). Beside a frozen linear layer `y = x Wᵀ + b` sits a trained low-rank update, `y += (alpha / r) · drop(x) Aᵀ Bᵀ`,
//! with `A` `[r, in]` initialised as PEFT initialises it (Kaiming-uniform with a = √5, that is U(±1/√in)) and
//! `B` `[out, r]` at zero, so training starts from the pretrained function. Parameters are named as PEFT names
//! them in memory: `encoder.layer.N.attention.self.query.lora_A.ADAPTER.weight`.
//!
//! **Bottleneck adapters** (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
//! arXiv:1902.00751): `y += W_up relu(W_down y)` on a sublayer's output, before its residual connection and
//! LayerNorm, after the attention block's output projection and after the feed-forward block (Houlsby
//! placement) or after the feed-forward block only (Pfeiffer et al. 2020, arXiv:2005.00247). `W_down` starts
//! as BERT initialises linear layers, `W_up` at zero: the identity. Names:
//! `encoder.layer.N.output.adapters.ADAPTER.down.weight` (`attention.output.adapters…` for the other site).
//!
//! **Prefix tuning** (Li & Liang 2021, "Prefix-Tuning", arXiv:2101.00190): every layer's attention gets
//! `length` learned key and value vectors before the sequence's own, which every token attends to. Positions of
//! the sequence are unchanged. Stored directly (PEFT's prefix tuning without `prefix_projection`), initialised
//! as PEFT's embedding table is: N(0, 1). Names: `encoder.layer.N.attention.self.prefix.ADAPTER.key`.
//!
//! Several named sets, "adapters", can sit on one layer: one that every task shares ([`SHARED_ADAPTER`]), or
//! one per task. With one per task a batch is routed: each example goes through its own task's adapter, in
//! one forward pass over the whole batch ([`Route`]).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::Tensor;
use mtl_core::{HostBatch, LinearModule, Mode, Targets, TaskId, IGNORE_INDEX};

use crate::layers::DropoutRng;
use crate::params::{Init, ParamBuilder};
use crate::{NnError, Result};

pub use mtl_core::SHARED_ADAPTER;

/// LoRA's size and place.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the LoRA branch's input (PEFT's `lora_dropout`).
    pub dropout: f32,
    pub targets: Vec<LinearModule>,
    /// AdaLoRA's SVD form: each update is `B (E ⊙ A)`, `E` the `r` singular values (PEFT's `lora_E`), and the
    /// factor `alpha / (r + 10⁻⁵)` (PEFT's `scaling / (ranknum + 1e-5)`).
    pub svd: bool,
}

impl LoraSpec {
    /// The factor of every update: `alpha / r`, or AdaLoRA's `alpha / (r + 10⁻⁵)`.
    pub fn scale(&self) -> f64 {
        if self.svd {
            self.alpha / (self.r as f64 + 1e-5)
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// Where bottleneck adapters sit in each block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// After the attention block and after the feed-forward block (Houlsby et al. 2019).
    Houlsby,
    /// After the feed-forward block only (Pfeiffer et al. 2020).
    Pfeiffer,
}

/// The two places in a block where a bottleneck adapter can sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Site {
    /// On the attention block's output (`attention.output`).
    Attention,
    /// On the feed-forward block's output (`output`).
    FeedForward,
}

impl Site {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Attention => "attention.output",
            Self::FeedForward => "output",
        }
    }
}

/// The method and its size.
#[derive(Clone, Debug, PartialEq)]
pub enum PeftKind {
    Lora(LoraSpec),
    Bottleneck {
        size: usize,
        placement: Placement,
    },
    /// Prefix tuning: `length` learned key and value positions before every layer's own.
    Prefix {
        length: usize,
    },
}

/// A parameter-efficient method on the encoder, with its adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftSpec {
    pub kind: PeftKind,
    /// The adapters: [`SHARED_ADAPTER`] alone, or one per task, named after it.
    pub adapters: Vec<String>,
}

impl PeftSpec {
    /// LoRA's settings, when the method is LoRA.
    pub fn lora(&self) -> Option<&LoraSpec> {
        match &self.kind {
            PeftKind::Lora(l) => Some(l),
            _ => None,
        }
    }

    /// Whether each task has its own adapter.
    pub fn per_task(&self) -> bool {
        self.adapters.iter().any(|a| a != SHARED_ADAPTER)
    }

    /// The index of `task`'s adapter: its own, or the shared one.
    pub fn adapter_of(&self, task: &TaskId) -> Result<usize> {
        let name = if self.per_task() { task.as_str() } else { SHARED_ADAPTER };
        self.adapters.iter().position(|a| a == name).ok_or_else(|| {
            NnError::UnknownAdapter(format!("task `{task}` has no adapter; adapters: {}", self.adapters.join(", ")))
        })
    }
}

/// Examples `examples` of a batch go through adapter `adapter`. A batch's routes cover its examples in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub adapter: usize,
    pub examples: Range<usize>,
}

/// One adapter's two matrices on one linear layer, and AdaLoRA's singular values.
#[derive(Clone, Debug)]
pub(crate) struct LoraPair {
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
    /// AdaLoRA's `E` (`r × 1`), which scales the rows of `A`.
    pub(crate) e: Option<Tensor>,
}

impl LoraPair {
    /// `A`, or AdaLoRA's `E ⊙ A`: what the update multiplies by `B` (a graph node, so gradients reach `E`).
    pub(crate) fn a(&self) -> Result<Tensor> {
        Ok(match &self.e {
            Some(e) => self.a.broadcast_mul(e)?,
            None => self.a.clone(),
        })
    }

    fn detached(&self) -> Self {
        Self { a: self.a.detach(), b: self.b.detach(), e: self.e.as_ref().map(Tensor::detach) }
    }
}

/// The adapters of one linear layer, by adapter index.
#[derive(Clone, Debug)]
pub(crate) struct LoraLayer {
    pairs: Vec<LoraPair>,
}

impl LoraLayer {
    /// The same adapters as constants for autograd (evaluation records no graph).
    pub(crate) fn detached(&self) -> Self {
        Self { pairs: self.pairs.iter().map(LoraPair::detached).collect() }
    }
}

/// What an adapter's update needs besides its input: the batch's routes, the sequence length, and dropout.
pub(crate) struct PeftPass<'a> {
    pub routes: &'a [Route],
    pub seq: usize,
    /// LoRA's `alpha / r`.
    pub scale: f64,
    /// LoRA's dropout.
    pub dropout_p: f32,
    pub dropout: &'a DropoutRng,
    pub mode: Mode,
    /// The adapters' values only, not recorded for backward (see `LoraRun::frozen`).
    pub frozen: bool,
}

impl PeftPass<'_> {
    /// `f(adapter, rows)` on the rows of each route, in order, concatenated.
    fn routed(&self, x: &Tensor, f: impl Fn(usize, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut parts = self
            .routes
            .iter()
            .map(|r| {
                let xs = if self.routes.len() == 1 {
                    x.clone()
                } else {
                    x.narrow(0, r.examples.start * self.seq, r.examples.len() * self.seq)?
                };
                f(r.adapter, &xs)
            })
            .collect::<Result<Vec<_>>>()?;
        match parts.len() {
            1 => Ok(parts.pop().expect("one part")),
            _ => Ok(Tensor::cat(&parts, 0)?),
        }
    }
}

/// One adapter's bottleneck on one site: `y + up(relu(down(y)))`.
#[derive(Clone, Debug)]
struct Bottleneck {
    down: crate::Linear,
    up: crate::Linear,
}

/// The bottleneck adapters of one site, by adapter index.
#[derive(Clone, Debug)]
pub(crate) struct BottleneckLayer {
    adapters: Vec<Bottleneck>,
}

impl BottleneckLayer {
    /// The same adapters as constants for autograd (evaluation records no graph).
    pub(crate) fn detached(&self) -> Self {
        let lin = |l: &crate::Linear| crate::Linear { weight: l.weight.detach(), bias: l.bias.detach() };
        Self { adapters: self.adapters.iter().map(|a| Bottleneck { down: lin(&a.down), up: lin(&a.up) }).collect() }
    }

    /// The adapters under `pb` (`…output`), of `size` units on a `hidden`-wide stream.
    pub(crate) fn new(pb: &ParamBuilder, adapters: &[String], hidden: usize, size: usize) -> Result<Self> {
        let adapters = adapters
            .iter()
            .map(|name| {
                let a = pb.pp("adapters").pp(name).adapter(name);
                let up = a.pp("up");
                Ok(Bottleneck {
                    down: crate::Linear::new(&a.pp("down"), hidden, size)?,
                    up: crate::Linear {
                        weight: up.get((hidden, size), "weight", Init::Zeros)?,
                        bias: up.get(hidden, "bias", Init::Zeros)?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { adapters })
    }

    /// `y` plus each example's adapter's update.
    pub(crate) fn forward(&self, y: &Tensor, pass: &PeftPass) -> Result<Tensor> {
        let delta = pass.routed(y, |adapter, ys| {
            let a =
                self.adapters.get(adapter).ok_or_else(|| NnError::UnknownAdapter(format!("no adapter {adapter}")))?;
            a.up.forward(&a.down.forward(ys)?.relu()?)
        })?;
        Ok((y + delta)?)
    }
}

/// Prefix tuning's keys and values of one layer, by adapter index, each `[length, hidden]`.
#[derive(Clone, Debug)]
pub(crate) struct PrefixLayer {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl PrefixLayer {
    /// The same prefixes as constants for autograd (evaluation records no graph).
    pub(crate) fn detached(&self) -> Self {
        Self {
            keys: self.keys.iter().map(Tensor::detach).collect(),
            values: self.values.iter().map(Tensor::detach).collect(),
        }
    }

    /// The prefixes under `pb` (`…attention.self`), initialised as PEFT's prefix encoder (an embedding table,
    /// so N(0, 1)).
    pub(crate) fn new(pb: &ParamBuilder, adapters: &[String], length: usize, hidden: usize) -> Result<Self> {
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for name in adapters {
            let p = pb.pp("prefix").pp(name).adapter(name);
            keys.push(p.get((length, hidden), "key", Init::Normal { std: 1.0 })?);
            values.push(p.get((length, hidden), "value", Init::Normal { std: 1.0 })?);
        }
        Ok(Self { keys, values })
    }

    pub(crate) fn length(&self) -> usize {
        self.keys.first().map_or(0, |k| k.dims()[0])
    }

    /// Each example's prefix keys and values, `[examples, length, hidden]`, by its route's adapter. Only the
    /// adapters of the batch's routes enter the graph, so the others get no gradient (not even a zero one,
    /// which AdamW would count as a step).
    pub(crate) fn per_example(&self, pass: &PeftPass) -> Result<(Tensor, Tensor)> {
        let pick = |t: &[Tensor]| -> Result<Tensor> {
            let parts = pass
                .routes
                .iter()
                .map(|r| {
                    let p =
                        t.get(r.adapter).ok_or_else(|| NnError::UnknownAdapter(format!("no adapter {}", r.adapter)))?;
                    let (l, h) = p.dims2()?;
                    Ok(p.unsqueeze(0)?.broadcast_as((r.examples.len(), l, h))?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?.contiguous()?)
        };
        Ok((pick(&self.keys)?, pick(&self.values)?))
    }
}

impl LoraLayer {
    /// The adapters of the linear layer under `pb` (`…attention.self.query`).
    pub(crate) fn new(
        pb: &ParamBuilder,
        spec: &LoraSpec,
        adapters: &[String],
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        // PEFT's initialisations: LoRA's A uniform (Kaiming) and B zero; AdaLoRA's A and B N(0, 0.02²), E zero.
        let (init_a, init_b) = match spec.svd {
            true => (Init::Normal { std: 0.02 }, Init::Normal { std: 0.02 }),
            false => (Init::Uniform { bound }, Init::Zeros),
        };
        let pairs = adapters
            .iter()
            .map(|name| {
                Ok(LoraPair {
                    a: pb.pp("lora_A").pp(name).adapter(name).get((spec.r, in_dim), "weight", init_a)?,
                    b: pb.pp("lora_B").pp(name).adapter(name).get((out_dim, spec.r), "weight", init_b)?,
                    e: match spec.svd {
                        true => Some(pb.pp("lora_E").pp(name).adapter(name).get((spec.r, 1), "weight", Init::Zeros)?),
                        false => None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { pairs })
    }

    /// Adapter `adapter`'s matrices.
    pub(crate) fn pair(&self, adapter: usize) -> Result<&LoraPair> {
        self.pairs.get(adapter).ok_or_else(|| NnError::UnknownAdapter(format!("no LoRA adapter {adapter}")))
    }

    /// The update of every row of `x` (`[examples * seq, in]`), each example through its route's adapter.
    pub(crate) fn delta(&self, x: &Tensor, pass: &PeftPass) -> Result<Tensor> {
        pass.routed(x, |adapter, xs| self.delta_for(xs, adapter, pass))
    }

    /// The update of one adapter on every row of `x` (rows that are no example's tokens, such as DeBERTa's
    /// relative position table), with LoRA's dropout.
    pub(crate) fn delta_for(&self, x: &Tensor, adapter: usize, pass: &PeftPass) -> Result<Tensor> {
        let xs = pass.dropout.apply_with(x, pass.dropout_p, pass.mode)?;
        let pair =
            self.pairs.get(adapter).ok_or_else(|| NnError::UnknownAdapter(format!("no LoRA adapter {adapter}")))?;
        let (a, b) = if pass.frozen { (pair.a()?.detach(), pair.b.detach()) } else { (pair.a()?, pair.b.clone()) };
        Ok((xs.matmul(&a.t()?)?.matmul(&b.t()?)? * pass.scale)?)
    }

    /// Every adapter's matrices stacked, for [`crate::cpu::lora::LoraProjection`]: A as `[adapters · r, in]`, B
    /// as `[out, adapters · r]` (detached when `frozen`), and the rank.
    pub(crate) fn stacked(&self, frozen: bool) -> Result<(Tensor, Tensor, usize)> {
        let get = |t: &Tensor| if frozen { t.detach() } else { t.clone() };
        let rank = self.pairs.first().map_or(0, |p| p.a.dims()[0]);
        if self.pairs.len() == 1 {
            return Ok((get(&self.pairs[0].a()?), get(&self.pairs[0].b), rank));
        }
        let a: Vec<Tensor> = self.pairs.iter().map(|p| Ok(get(&p.a()?))).collect::<Result<_>>()?;
        let b: Vec<Tensor> = self.pairs.iter().map(|p| get(&p.b)).collect();
        Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?, rank))
    }

    /// `scale · B A` of one adapter: what merging adds to the base weight.
    pub(crate) fn merged_delta(&self, adapter: usize, scale: f64) -> Result<Tensor> {
        let pair = &self.pairs[adapter];
        Ok((pair.b.matmul(&pair.a()?)? * scale)?)
    }
}

/// Checks that `routes` cover examples `0..batch` in order, each adapter index below `adapters`.
pub(crate) fn check_routes(routes: &[Route], batch: usize, adapters: usize) -> Result<()> {
    let mut next = 0;
    for r in routes {
        if r.examples.start != next || r.examples.is_empty() || r.adapter >= adapters {
            return Err(NnError::Input(format!(
                "invalid LoRA routes {routes:?} for {batch} examples and {adapters} adapters"
            )));
        }
        next = r.examples.end;
    }
    if next != batch {
        return Err(NnError::Input(format!("LoRA routes {routes:?} do not cover {batch} examples")));
    }
    Ok(())
}

/// Whether example `b` of a batch of `seq` tokens has a target in `targets`.
fn labels_example(targets: &Targets, b: usize, seq: usize) -> bool {
    match targets {
        Targets::Class(t) => t[b] != IGNORE_INDEX,
        Targets::Tokens(t) => t[b * seq..(b + 1) * seq].iter().any(|&l| l != IGNORE_INDEX),
        Targets::Dense { present, .. } => present[b],
        Targets::Span { start, .. } => start[b] != IGNORE_INDEX,
    }
}

/// `targets` on the examples `rows` of the old batch (in that order), where `keep[i]` says whether the i-th
/// new example keeps its target; the others get none.
fn gather_targets(targets: &Targets, rows: &[usize], keep: &[bool], seq: usize) -> Targets {
    match targets {
        Targets::Class(t) => {
            Targets::Class(rows.iter().zip(keep).map(|(&b, &k)| if k { t[b] } else { IGNORE_INDEX }).collect())
        }
        Targets::Tokens(t) => Targets::Tokens(
            rows.iter()
                .zip(keep)
                .flat_map(|(&b, &k)| t[b * seq..(b + 1) * seq].iter().map(move |&l| if k { l } else { IGNORE_INDEX }))
                .collect(),
        ),
        Targets::Dense { width, values, present } => Targets::Dense {
            width: *width,
            values: rows.iter().flat_map(|&b| values[b * width..(b + 1) * width].iter().copied()).collect(),
            present: rows.iter().zip(keep).map(|(&b, &k)| k && present[b]).collect(),
        },
        Targets::Span { start, end } => Targets::Span {
            start: rows.iter().zip(keep).map(|(&b, &k)| if k { start[b] } else { IGNORE_INDEX }).collect(),
            end: rows.iter().zip(keep).map(|(&b, &k)| if k { end[b] } else { IGNORE_INDEX }).collect(),
        },
    }
}

/// For per-task adapters: the batch with each example repeated once for every task that labels it, grouped by
/// task, and the routes that send each group through its task's adapter. Each copy keeps only its own task's
/// targets, so one forward pass over the result trains every task's adapter on its own examples.
pub fn route_by_task(batch: &HostBatch, spec: &PeftSpec) -> Result<(HostBatch, Vec<Route>)> {
    let seq = batch.seq;
    let mut rows: Vec<usize> = Vec::new();
    let mut owner: Vec<&TaskId> = Vec::new();
    let mut routes: Vec<Route> = Vec::new();
    for (task, targets) in &batch.targets {
        let labelled: Vec<usize> = (0..batch.batch).filter(|&b| labels_example(targets, b, seq)).collect();
        if labelled.is_empty() {
            continue;
        }
        let start = rows.len();
        rows.extend(&labelled);
        owner.extend(std::iter::repeat_n(task, labelled.len()));
        routes.push(Route { adapter: spec.adapter_of(task)?, examples: start..rows.len() });
    }
    let gather =
        |v: &[u32]| -> Vec<u32> { rows.iter().flat_map(|&b| v[b * seq..(b + 1) * seq].iter().copied()).collect() };
    let targets: BTreeMap<TaskId, Targets> = batch
        .targets
        .iter()
        .map(|(task, t)| {
            let keep: Vec<bool> = owner.iter().map(|&o| o == task).collect();
            (task.clone(), gather_targets(t, &rows, &keep, seq))
        })
        .collect();
    let routed = HostBatch {
        batch: rows.len(),
        seq,
        input_ids: gather(&batch.input_ids),
        token_type_ids: gather(&batch.token_type_ids),
        attention_mask: gather(&batch.attention_mask),
        word_starts: rows.iter().map(|&b| batch.word_starts[b].clone()).collect(),
        targets,
    };
    Ok((routed, routes))
}
