//! The gradient of one batch: the weighted objective's, in one backward pass, or, when the weighting,
//! gradient surgery or the diagnostics need them, each task's own, combined on the shared parameters.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use mtl_core::{HostBatch, Mode, TaskId};
use mtl_nn::MultiTaskModel;

use crate::groups::Part;
use crate::surgery::{cosine_similarities, GradientSurgery};
use crate::weighting::LossWeighting;
use crate::Result;

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
pub fn batch_grads(model: &MultiTaskModel, batch: &HostBatch, plan: &GradientPlan) -> Result<BatchOutcome> {
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
    let mut vars = plan.vars.clone();
    vars.extend(plan.weighting.vars());
    let terms = plan.weighting.terms(&named_losses)?;
    if !per_task || terms.len() < 2 {
        let total = terms.into_iter().reduce(|a, b| (a + b).expect("scalar terms add; this is a bug")).expect("non-empty");
        let grads = named(&model.backward(&total)?, &vars);
        let norms = per_task.then(|| {
            let n = top_layer_norm(&grads, plan.num_layers);
            values.keys().map(|t| (t.clone(), n)).collect()
        });
        return Ok(BatchOutcome::Grads(BatchGrads { grads, losses: values, top_layer_norms: norms, cosines: None }));
    }
    let task_grads: Vec<Grads> = terms.iter().map(|t| Ok(named(&model.backward(t)?, &vars))).collect::<Result<_>>()?;
    let tasks: Vec<TaskId> = named_losses.into_iter().map(|(t, _)| t).collect();
    combine_tasks(model, plan, tasks, task_grads, values).map(BatchOutcome::Grads)
}

/// The gradients of a batch split by task: each sub-batch holds one task's examples and targets, and runs its
/// own forward and backward pass. Examples do not interact within a batch, so a task's gradient is the same
/// as from the whole batch (up to dropout masks), at the cost of one pass over the batch rather than one per
/// task.
pub fn split_batch_grads(model: &MultiTaskModel, batches: &[HostBatch], plan: &GradientPlan) -> Result<BatchOutcome> {
    let mut vars = plan.vars.clone();
    vars.extend(plan.weighting.vars());
    let (mut tasks, mut task_grads, mut values) = (Vec::new(), Vec::new(), BTreeMap::new());
    for batch in batches {
        for loss in model.losses(batch, Mode::Train)? {
            let value = f64::from(loss.loss.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Ok(BatchOutcome::NonFinite);
            }
            let term = plan.weighting.terms(&[(loss.task.clone(), loss.loss)])?.remove(0);
            task_grads.push(named(&model.backward(&term)?, &vars));
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
    model: &MultiTaskModel,
    plan: &GradientPlan,
    tasks: Vec<TaskId>,
    task_grads: Vec<Grads>,
    values: BTreeMap<TaskId, f64>,
) -> Result<BatchGrads> {
    let norms: BTreeMap<TaskId, f64> =
        tasks.iter().zip(&task_grads).map(|(t, g)| (t.clone(), top_layer_norm(g, plan.num_layers))).collect();
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
    let gram = (plan.surgery.is_some() || plan.diagnose).then(|| crate::surgery::gram(&segments));
    let cosines = gram.as_ref().filter(|_| plan.diagnose).map(|g| {
        cosine_similarities(g).into_iter().map(|(i, j, c)| (tasks[i].clone(), tasks[j].clone(), c)).collect()
    });
    let coefficients = match (plan.surgery, &gram) {
        (Some(surgery), Some(gram)) if tasks.len() > 1 => surgery.coefficients(gram, plan.step),
        _ => vec![1.0; tasks.len()],
    };
    let combined = crate::surgery::combination(&segments, &coefficients);
    let mut grads = Grads::new();
    for ((name, shape), values) in plan.shared.iter().zip(shapes).zip(combined) {
        grads.insert(name.clone(), Tensor::from_vec(values, shape, device)?);
    }
    // Heads and the weighting's parameters: the sum of the tasks' gradients (each head has its own task's).
    for g in task_grads {
        for (name, t) in g {
            if Part::of(&name).is_shared() {
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
fn top_layer_norm(grads: &Grads, num_layers: usize) -> f64 {
    let prefix = format!("encoder.layer.{}.", num_layers.saturating_sub(1));
    grads
        .iter()
        .filter(|(n, _)| n.starts_with(&prefix))
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
