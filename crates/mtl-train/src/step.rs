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
    let norms: BTreeMap<TaskId, f64> =
        tasks.iter().zip(&task_grads).map(|(t, g)| (t.clone(), top_layer_norm(g, plan.num_layers))).collect();
    // Every task's shared gradient as one flat vector (zeros where a task left a parameter untouched).
    let sizes: Vec<(String, candle_core::Shape)> =
        plan.shared.iter().map(|n| (n.clone(), plan.vars[n].as_tensor().shape().clone())).collect();
    let flat: Vec<Vec<f32>> = task_grads
        .iter()
        .map(|g| {
            let mut v = Vec::with_capacity(sizes.iter().map(|(_, s)| s.elem_count()).sum());
            for (name, shape) in &sizes {
                match g.get(name) {
                    Some(t) => v.extend(t.flatten_all()?.to_vec1::<f32>()?),
                    None => v.extend(std::iter::repeat_n(0f32, shape.elem_count())),
                }
            }
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let cosines = plan.diagnose.then(|| {
        cosine_similarities(&flat).into_iter().map(|(i, j, c)| (tasks[i].clone(), tasks[j].clone(), c)).collect()
    });
    let combined: Vec<f32> = match plan.surgery {
        Some(surgery) => surgery.combine(&flat, plan.step),
        None => crate::surgery::combination(&flat, &vec![1.0; flat.len()]),
    };
    drop(flat);
    let mut grads = Grads::new();
    let device = model.device();
    let mut offset = 0;
    for (name, shape) in &sizes {
        let n = shape.elem_count();
        grads.insert(name.clone(), Tensor::from_slice(&combined[offset..offset + n], shape, device)?);
        offset += n;
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
    Ok(BatchOutcome::Grads(BatchGrads { grads, losses: values, top_layer_norms: Some(norms), cosines }))
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
