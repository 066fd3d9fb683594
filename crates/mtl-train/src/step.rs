//! The gradient of one batch: the weighted objective's, in one backward pass, or, when the weighting,
//! gradient surgery or the diagnostics need them, each task's own, combined on the shared parameters.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use mtl_core::{HostBatch, Mode, TaskId};

use crate::groups::role_of;
use crate::model::TrainModel;
use crate::surgery::{cosine_similarities, GradientSurgery};
use crate::weighting::LossWeighting;
use crate::Result;
use mtl_nn::ParamStore;

/// Gradients by parameter name.
pub type Grads = BTreeMap<String, Tensor>;

/// What a batch gave.
pub enum BatchOutcome {
    /// No task has a label in it.
    Empty,
    /// Some task's loss is NaN or infinite.
    NonFinite,
    Grads(BatchGrads),
}

pub struct BatchGrads {
    pub grads: Grads,
    /// Each task's unweighted loss.
    pub losses: BTreeMap<TaskId, f64>,
    /// Each task's gradient norm on the top encoder layer, when computed per task.
    pub top_layer_norms: Option<BTreeMap<TaskId, f64>>,
    /// Cosine similarity of each pair of tasks' gradients on the shared parameters, when asked.
    pub cosines: Option<Vec<(TaskId, TaskId, f64)>>,
}

/// What a batch's gradient needs beyond the model.
pub struct GradientPlan<'a> {
    /// Every trained variable by name: the model's and the weighting's own.
    pub vars: &'a BTreeMap<String, Var>,
    pub weighting: &'a dyn LossWeighting,
    pub surgery: Option<&'a dyn GradientSurgery>,
    /// Shared parameters that train at this step (the frozen ones are left out).
    pub shared: &'a [String],
    pub num_layers: usize,
    /// Compute the tasks' gradient cosines.
    pub diagnose: bool,
    /// The optimiser step, for seeded surgery.
    pub step: usize,
    /// Surgery on the gradients of the shared representation rather than of the shared parameters.
    pub representation: bool,
}

impl GradientPlan<'_> {
    /// Whether the tasks' gradients are needed one by one.
    pub fn per_task(&self) -> bool {
        self.weighting.needs_grad_norms() || self.surgery.is_some() || self.diagnose
    }
}

/// The gradients in `store` of the parameters `vars`, by name.
pub fn named(store: &GradStore, vars: &BTreeMap<String, Var>) -> Grads {
    vars.iter().filter_map(|(name, var)| store.get(var.as_tensor()).map(|g| (name.clone(), g.clone()))).collect()
}

/// The batch's losses and gradients.
pub fn batch_grads(model: &dyn TrainModel, batch: &HostBatch, plan: &GradientPlan) -> Result<BatchOutcome> {
    if let (true, Some(surgery)) = (plan.representation, plan.surgery) {
        return representation_grads(model, batch, plan, surgery);
    }
    let per_task = plan.per_task();
    model.set_retain_graph(per_task);
    let losses = model.losses(batch, Mode::Train);
    model.set_retain_graph(false);
    let losses = losses?;
    if losses.is_empty() {
        return Ok(BatchOutcome::Empty);
    }
    let values: BTreeMap<TaskId, f64> =
        losses.iter().map(|l| Ok((l.task.clone(), f64::from(l.loss.to_scalar::<f32>()?)))).collect::<Result<_>>()?;
    if values.values().any(|v| !v.is_finite()) {
        return Ok(BatchOutcome::NonFinite);
    }
    let named_losses: Vec<(TaskId, Tensor)> = losses.iter().map(|l| (l.task.clone(), l.loss.clone())).collect();
    let vars = plan.vars;
    let terms = plan.weighting.terms(&named_losses)?;
    if !per_task || terms.len() < 2 {
        let total =
            terms.into_iter().reduce(|a, b| (a + b).expect("scalar terms add; this is a bug")).expect("non-empty");
        let grads = named(&model.backward(&total)?, vars);
        let norms = per_task.then(|| {
            let n = top_layer_norm(&grads, model.params(), plan.num_layers);
            values.keys().map(|t| (t.clone(), n)).collect()
        });
        return Ok(BatchOutcome::Grads(BatchGrads { grads, losses: values, top_layer_norms: norms, cosines: None }));
    }
    let task_grads: Vec<Grads> = terms.iter().map(|t| Ok(named(&model.backward(t)?, vars))).collect::<Result<_>>()?;
    let tasks: Vec<TaskId> = named_losses.into_iter().map(|(t, _)| t).collect();
    combine_tasks(model, plan, tasks, task_grads, values).map(BatchOutcome::Grads)
}

/// The gradients of a batch with surgery on the shared representation (MGDA-UB, LibMTL's `rep_grad`): each
/// task's term is differentiated through its head only, down to a copy of the encoder's output; the surgery
/// combines those gradients (their Gram matrix), and the encoder takes one backward pass with the combination
/// as its output's gradient. Each head gets its own task's gradient. Gradient cosines, when asked, are the
/// representation gradients'.
fn representation_grads(
    model: &dyn TrainModel,
    batch: &HostBatch,
    plan: &GradientPlan,
    surgery: &dyn GradientSurgery,
) -> Result<BatchOutcome> {
    let Some(rep) = model.representation_losses(batch, Mode::Train)? else {
        return Err(crate::TrainError::Invalid {
            path: "training.surgery.representation".into(),
            message: "this model's tasks share no representation (a decoder)".into(),
        });
    };
    if rep.losses.is_empty() {
        return Ok(BatchOutcome::Empty);
    }
    let values: BTreeMap<TaskId, f64> = rep
        .losses
        .iter()
        .map(|l| Ok((l.task.clone(), f64::from(l.loss.to_scalar::<f32>()?))))
        .collect::<Result<_>>()?;
    if values.values().any(|v| !v.is_finite()) {
        return Ok(BatchOutcome::NonFinite);
    }
    let named_losses: Vec<(TaskId, Tensor)> = rep.losses.iter().map(|l| (l.task.clone(), l.loss.clone())).collect();
    let terms = plan.weighting.terms(&named_losses)?;
    let tasks: Vec<TaskId> = named_losses.into_iter().map(|(t, _)| t).collect();
    let mut heads = Grads::new();
    let mut rep_grads = Vec::with_capacity(terms.len());
    for term in &terms {
        let store = model.backward(term)?;
        rep_grads.push(match store.get(rep.leaf.as_tensor()) {
            Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
            None => vec![0f32; rep.leaf.as_tensor().elem_count()],
        });
        accumulate(&mut heads, named(&store, plan.vars))?;
    }
    let segments: Vec<[&[f32]; 1]> = rep_grads.iter().map(|g| [g.as_slice()]).collect();
    let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
    let gram = crate::surgery::gram(&refs);
    let cosines = plan.diagnose.then(|| {
        cosine_similarities(&gram).into_iter().map(|(i, j, c)| (tasks[i].clone(), tasks[j].clone(), c)).collect()
    });
    let coefficients = if tasks.len() > 1 {
        let losses: Vec<f64> = tasks.iter().map(|t| values[t]).collect();
        surgery.coefficients(&gram, &losses, plan.step)
    } else {
        vec![1.0]
    };
    let combined = crate::surgery::combination(&refs, &coefficients).remove(0);
    let direction = Tensor::from_vec(combined, rep.hidden.shape(), rep.hidden.device())?;
    let through = (&rep.hidden * &direction)?.sum_all()?;
    let mut grads = named(&model.backward(&through)?, plan.vars);
    for (name, g) in heads {
        if !role_of(model.params(), &name).is_shared() {
            grads.insert(name, g);
        }
    }
    Ok(BatchOutcome::Grads(BatchGrads { grads, losses: values, top_layer_norms: None, cosines }))
}

/// The gradients of a batch split by task: each sub-batch holds one task's examples and targets, and runs its
/// own forward and backward pass. Examples do not interact within a batch, so a task's gradient is the same
/// as from the whole batch (up to dropout masks), at the cost of one pass over the batch rather than one per
/// task.
pub fn split_batch_grads(model: &dyn TrainModel, batches: &[HostBatch], plan: &GradientPlan) -> Result<BatchOutcome> {
    let vars = plan.vars;
    let (mut tasks, mut task_grads, mut values) = (Vec::new(), Vec::new(), BTreeMap::new());
    for batch in batches {
        for loss in model.losses(batch, Mode::Train)? {
            let value = f64::from(loss.loss.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Ok(BatchOutcome::NonFinite);
            }
            let term = plan.weighting.terms(&[(loss.task.clone(), loss.loss)])?.remove(0);
            task_grads.push(named(&model.backward(&term)?, vars));
            values.insert(loss.task.clone(), value);
            tasks.push(loss.task);
        }
    }
    if tasks.is_empty() {
        return Ok(BatchOutcome::Empty);
    }
    combine_tasks(model, plan, tasks, task_grads, values).map(BatchOutcome::Grads)
}

/// Combines each task's gradients: surgery (or a plain sum) on the shared parameters, a sum elsewhere.
fn combine_tasks(
    model: &dyn TrainModel,
    plan: &GradientPlan,
    tasks: Vec<TaskId>,
    task_grads: Vec<Grads>,
    values: BTreeMap<TaskId, f64>,
) -> Result<BatchGrads> {
    let norms: BTreeMap<TaskId, f64> = tasks
        .iter()
        .zip(&task_grads)
        .map(|(t, g)| (t.clone(), top_layer_norm(g, model.params(), plan.num_layers)))
        .collect();
    let device = model.device();
    // Each task's shared gradients, contiguous, zeros where a task left a parameter untouched; read in place.
    let shapes: Vec<&candle_core::Shape> = plan.shared.iter().map(|n| plan.vars[n].as_tensor().shape()).collect();
    let tensors: Vec<Vec<Tensor>> = task_grads
        .iter()
        .map(|g| {
            plan.shared
                .iter()
                .zip(&shapes)
                .map(|(name, shape)| match g.get(name) {
                    Some(t) => Ok(t.contiguous()?),
                    None => Ok(Tensor::zeros(*shape, candle_core::DType::F32, device)?),
                })
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let hosts: Vec<Vec<HostSlice>> =
        tensors.iter().map(|ts| ts.iter().map(HostSlice::new).collect::<Result<_>>()).collect::<Result<_>>()?;
    let slices: Vec<Vec<&[f32]>> = hosts.iter().map(|h| h.iter().map(HostSlice::get).collect()).collect();
    let segments: Vec<&[&[f32]]> = slices.iter().map(Vec::as_slice).collect();
    let gram = (plan.surgery.is_some_and(|s| s.uses_gram()) || plan.diagnose).then(|| crate::surgery::gram(&segments));
    let cosines = gram
        .as_ref()
        .filter(|_| plan.diagnose)
        .map(|g| cosine_similarities(g).into_iter().map(|(i, j, c)| (tasks[i].clone(), tasks[j].clone(), c)).collect());
    let combined = match plan.surgery.and_then(|s| s.direction(&tasks, &segments, plan.step)) {
        Some(direction) => direction,
        None => {
            let coefficients = match (plan.surgery, &gram) {
                (Some(surgery), Some(gram)) if tasks.len() > 1 => {
                    let losses: Vec<f64> = tasks.iter().map(|t| values[t]).collect();
                    surgery.coefficients(gram, &losses, plan.step)
                }
                _ => vec![1.0; tasks.len()],
            };
            crate::surgery::combination(&segments, &coefficients)
        }
    };
    let mut grads = Grads::new();
    for ((name, shape), values) in plan.shared.iter().zip(shapes).zip(combined) {
        grads.insert(name.clone(), Tensor::from_vec(values, shape, device)?);
    }
    // Heads and the weighting's parameters: the sum of the tasks' gradients (each head has its own task's).
    for g in task_grads {
        for (name, t) in g {
            if role_of(model.params(), &name).is_shared() {
                continue;
            }
            let t = match grads.remove(&name) {
                Some(previous) => (previous + t)?,
                None => t,
            };
            grads.insert(name, t);
        }
    }
    Ok(BatchGrads { grads, losses: values, top_layer_norms: Some(norms), cosines })
}

/// A tensor's values on the host: borrowed from a contiguous CPU buffer, or copied.
enum HostSlice<'a> {
    Borrowed(candle_core::StorageRef<'a>, usize, usize),
    Owned(Vec<f32>),
}

impl<'a> HostSlice<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(Self::Borrowed(storage, a, b));
        }
        drop(storage);
        Ok(Self::Owned(t.flatten_all()?.to_vec1::<f32>()?))
    }

    fn get(&self) -> &[f32] {
        match self {
            Self::Borrowed(storage, a, b) => match &**storage {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) => &data[*a..*b],
                _ => unreachable!("checked to be f32 on the CPU"),
            },
            Self::Owned(v) => v,
        }
    }
}

/// The L2 norm of the top encoder layer's gradients.
fn top_layer_norm(grads: &Grads, params: &ParamStore, num_layers: usize) -> f64 {
    let top = Some(num_layers.saturating_sub(1));
    grads
        .iter()
        .filter(|(n, _)| {
            let role = role_of(params, n);
            role.is_shared() && role.layer() == top
        })
        .map(|(_, g)| crate::optim::sum_of_squares(g).unwrap_or(f64::NAN))
        .sum::<f64>()
        .sqrt()
}

/// Adds `grads` into `sum`.
pub fn accumulate(sum: &mut Grads, grads: Grads) -> Result<()> {
    for (name, g) in grads {
        let g = match sum.remove(&name) {
            Some(previous) => (previous + g)?,
            None => g,
        };
        sum.insert(name, g);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::Device;
    use mtl_core::{Targets, IGNORE_INDEX};
    use mtl_nn::{BertConfig, HeadSpec, ModelSpec, MultiTaskModel};

    use super::*;
    use crate::surgery::GradientSurgery;
    use crate::weighting::StaticWeights;

    fn tiny_model() -> Result<MultiTaskModel> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert");
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let tasks = BTreeMap::from([
            (TaskId::new("a").expect("valid"), HeadSpec::new(mtl_core::TaskKind::Classification, 3)),
            (TaskId::new("b").expect("valid"), HeadSpec::new(mtl_core::TaskKind::Classification, 2)),
        ]);
        let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 1, peft: None };
        Ok(MultiTaskModel::load(&spec, &dir.join("model.safetensors"), false, &Device::Cpu)?)
    }

    /// A batch of `rows` sequences of length 5 (the last `pad` padded), with the given class targets.
    fn batch(rows: usize, targets: Vec<(&str, Vec<i64>)>) -> HostBatch {
        let seq = 5;
        HostBatch {
            batch: rows,
            seq,
            input_ids: (0..rows * seq).map(|i| (i * 7 % 40 + 2) as u32).collect(),
            token_type_ids: vec![0; rows * seq],
            attention_mask: (0..rows * seq).map(|i| u32::from(i % seq < 3 + i / seq % 3)).collect(),
            word_starts: vec![vec![]; rows],
            targets: targets.into_iter().map(|(t, v)| (TaskId::new(t).expect("valid"), Targets::Class(v))).collect(),
        }
    }

    /// Without dropout, the per-task sub-batches give the gradient of the whole batch: examples do not
    /// interact, and a task's loss is its mean over its own examples either way.
    #[test]
    fn sub_batches_give_the_whole_batch_gradient() -> Result<()> {
        let model = tiny_model()?;
        let n = IGNORE_INDEX;
        let whole = batch(4, vec![("a", vec![0, 2, n, n]), ("b", vec![n, n, 1, 0])]);
        // The same rows, split by task (rows 0-1 for a, 2-3 for b).
        let split = |rows: std::ops::Range<usize>, task: &str, labels: Vec<i64>| {
            let mut b = batch(4, vec![]);
            let seq = b.seq;
            b.batch = rows.len();
            b.input_ids = b.input_ids[rows.start * seq..rows.end * seq].to_vec();
            b.token_type_ids = b.token_type_ids[rows.start * seq..rows.end * seq].to_vec();
            b.attention_mask = b.attention_mask[rows.start * seq..rows.end * seq].to_vec();
            b.word_starts = vec![vec![]; rows.len()];
            b.targets = BTreeMap::from([(TaskId::new(task).expect("valid"), Targets::Class(labels))]);
            b
        };
        let parts = [split(0..2, "a", vec![0, 2]), split(2..4, "b", vec![1, 0])];
        let weighting = StaticWeights::new(BTreeMap::new());
        let names: Vec<String> =
            model.params().with_roles().filter(|(_, _, r)| r.is_shared()).map(|(n, _, _)| n.clone()).collect();
        let plan = GradientPlan {
            vars: model.params().vars(),
            weighting: &weighting,
            surgery: None,
            shared: &names,
            num_layers: model.bert().config().num_hidden_layers,
            diagnose: true,
            step: 0,
            representation: false,
        };
        let (BatchOutcome::Grads(joint), BatchOutcome::Grads(per_task)) =
            (batch_grads(&model, &whole, &plan)?, split_batch_grads(&model, &parts, &plan)?)
        else {
            panic!("both batches have labels");
        };
        assert_eq!(joint.losses.len(), 2);
        for (task, loss) in &joint.losses {
            assert!((loss - per_task.losses[task]).abs() < 1e-5, "{task}: {loss} vs {}", per_task.losses[task]);
        }
        for (name, g) in &joint.grads {
            let other = per_task.grads.get(name).unwrap_or_else(|| panic!("{name} missing"));
            let err = (g - other)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = g.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-4 * (1.0 + scale), "{name}: off by {err}");
        }
        let cos = per_task.cosines.expect("diagnosed");
        assert_eq!(cos.len(), 1);
        assert!((-1.0..=1.0).contains(&cos[0].2));
        Ok(())
    }

    /// A surgery that keeps the plain sum.
    struct Sum;

    impl GradientSurgery for Sum {
        fn coefficients(&self, gram: &[Vec<f64>], _losses: &[f64], _step: usize) -> Vec<f64> {
            vec![1.0; gram.len()]
        }
    }

    /// Through the representation, a surgery that sums gives the whole batch's gradient (the chain rule split
    /// at the encoder's output), and MGDA-UB's update is the minimum-norm combination of the tasks'
    /// representation gradients pushed through the encoder.
    #[test]
    fn representation_surgery_splits_the_chain_rule_at_the_encoder() -> Result<()> {
        let model = tiny_model()?;
        let n = IGNORE_INDEX;
        let whole = batch(4, vec![("a", vec![0, 2, n, 1]), ("b", vec![n, 1, 1, 0])]);
        let weighting = StaticWeights::new(BTreeMap::new());
        let names: Vec<String> =
            model.params().with_roles().filter(|(_, _, r)| r.is_shared()).map(|(n, _, _)| n.clone()).collect();
        let plan = |surgery: Option<&'static dyn GradientSurgery>, representation| GradientPlan {
            vars: model.params().vars(),
            weighting: &weighting,
            surgery,
            shared: &names,
            num_layers: model.bert().config().num_hidden_layers,
            diagnose: false,
            step: 0,
            representation,
        };
        let (BatchOutcome::Grads(plain), BatchOutcome::Grads(split)) =
            (batch_grads(&model, &whole, &plan(None, false))?, batch_grads(&model, &whole, &plan(Some(&Sum), true))?)
        else {
            panic!("the batch has labels");
        };
        assert_eq!(plain.grads.keys().collect::<Vec<_>>(), split.grads.keys().collect::<Vec<_>>());
        for (name, g) in &plain.grads {
            let err = (g - &split.grads[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = g.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-4 * (1.0 + scale), "{name}: off by {err}");
        }
        // MGDA-UB: the encoder's gradient is that of Σ_k a_k L_k with MGDA's coefficients on the
        // representation gradients, found here by weighting the losses directly.
        static MGDA: crate::surgery::Mgda = crate::surgery::Mgda { normalization: mtl_config::MgdaNormalization::None };
        let BatchOutcome::Grads(ub) = batch_grads(&model, &whole, &plan(Some(&MGDA), true))? else { panic!("labels") };
        let rep = TrainModel::representation_losses(&model, &whole, Mode::Train)?.expect("shared");
        let rep_grads: Vec<Vec<f32>> = rep
            .losses
            .iter()
            .map(|l| {
                Ok(model.backward(&l.loss)?.get(rep.leaf.as_tensor()).expect("reached").flatten_all()?.to_vec1()?)
            })
            .collect::<Result<_>>()?;
        let segments: Vec<[&[f32]; 1]> = rep_grads.iter().map(|g| [g.as_slice()]).collect();
        let refs: Vec<&[&[f32]]> = segments.iter().map(|s| s.as_slice()).collect();
        let a = MGDA.coefficients(&crate::surgery::gram(&refs), &[], 0);
        let weighted = StaticWeights::new(rep.losses.iter().map(|l| l.task.clone()).zip(a).collect());
        let direct = GradientPlan { weighting: &weighted, ..plan(None, false) };
        let BatchOutcome::Grads(want) = batch_grads(&model, &whole, &direct)? else { panic!("labels") };
        for name in &names {
            let (g, w) = (&ub.grads[name], &want.grads[name]);
            let err = (g - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-4 * (1.0 + scale), "{name}: off by {err}");
        }
        Ok(())
    }
}
