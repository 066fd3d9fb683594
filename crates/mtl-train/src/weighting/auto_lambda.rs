//! Auto-λ (Liu, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022).
//!
//! The task weights λ are meta-learned: before a step, the model takes a look-ahead step on the step's batch,
//! `θ' = θ − α (∇ Σ_k λ_k L_k(θ) + wd · θ)` (each parameter at its own learning rate and weight decay, plain
//! gradient descent as the authors' code takes it), the meta loss `Σ_k L_k` on a meta batch is differentiated
//! at `θ'` (`d`), and its gradient with respect to λ, `−α ∇²_{λ,θ} L(θ) d`, is approximated by finite
//! differences of the training losses at `θ ± ε d` with `ε = 0.01 / ‖d‖`, as the authors compute it: task
//! `k`'s meta gradient is `−α (L_k(θ + ε d) − L_k(θ − ε d)) / 2ε`. Adam (at `weighting.lr`, 10⁻⁴) moves λ,
//! which starts at `weighting.init` (0.1) and is not normalised; then the step trains on `Σ_k λ_k L_k`.
//!
//! The meta batches come from a seeded subset of the dev split (`meta_data = "dev"`, `meta_examples`) or,
//! as in the authors' experiments, from the training split in another order; they cycle through it,
//! reshuffled every pass, and their position is kept in checkpoints. Every task is primary. The two
//! finite-difference forward passes run without dropout (the authors' networks have none, and with it the
//! difference of two losses would measure the dropout masks). A meta update costs a forward and backward
//! pass on the step's batch, one on the meta batch and two forward passes; `meta_every` spreads it over steps.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use mtl_core::{Mode, TaskId};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{field, scaled, LossWeighting};
use crate::Result;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct State {
    lambda: BTreeMap<TaskId, f64>,
    m: BTreeMap<TaskId, f64>,
    v: BTreeMap<TaskId, f64>,
    steps: u32,
    /// Meta batches taken so far.
    meta_batches: usize,
}

pub struct AutoLambda {
    lr: f64,
    state: State,
}

impl AutoLambda {
    pub fn new(tasks: &[TaskId], init: f64, lr: f64) -> Self {
        let zeros: BTreeMap<TaskId, f64> = tasks.iter().map(|t| (t.clone(), 0.0)).collect();
        let lambda = tasks.iter().map(|t| (t.clone(), init)).collect();
        Self { lr, state: State { lambda, m: zeros.clone(), v: zeros, steps: 0, meta_batches: 0 } }
    }

    /// The number of meta batches taken so far (where the next one starts).
    pub fn meta_batches(&self) -> usize {
        self.state.meta_batches
    }

    /// One Adam step (torch's, no weight decay) on λ along `gradient`, and one more meta batch counted.
    pub fn meta_step(&mut self, gradient: &BTreeMap<TaskId, f64>) {
        let s = &mut self.state;
        s.meta_batches += 1;
        s.steps += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        let (c1, c2) = (1.0 - b1.powi(s.steps as i32), 1.0 - b2.powi(s.steps as i32));
        for (task, lambda) in s.lambda.iter_mut() {
            let g = gradient.get(task).copied().unwrap_or(0.0);
            let m = s.m.entry(task.clone()).or_default();
            *m = b1 * *m + (1.0 - b1) * g;
            let v = s.v.entry(task.clone()).or_default();
            *v = b2 * *v + (1.0 - b2) * g * g;
            *lambda -= self.lr / c1 * *m / ((*v / c2).sqrt() + 1e-8);
        }
    }
}

impl LossWeighting for AutoLambda {
    fn terms(&self, losses: &[(TaskId, Tensor)]) -> Result<Vec<Tensor>> {
        scaled(losses, &self.state.lambda)
    }

    fn weights(&self) -> BTreeMap<TaskId, f64> {
        self.state.lambda.clone()
    }

    fn as_auto_lambda(&mut self) -> Option<&mut AutoLambda> {
        Some(self)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({ "auto_lambda": self.state })
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let loaded: State = field(state, "auto_lambda")?;
        if loaded.lambda.keys().ne(self.state.lambda.keys()) {
            return Err(super::invalid_state("Auto-λ's weights are for other tasks"));
        }
        self.state = loaded;
        Ok(())
    }
}

/// What the look-ahead needs of a model: the losses of the step's batch and of the meta batch, and gradients.
pub trait MetaModel {
    /// Each task's loss on the step's batch.
    fn train_losses(&self, mode: Mode) -> Result<Vec<(TaskId, Tensor)>>;
    /// Each task's loss on the meta batch (with dropout, as the look-ahead model trains).
    fn meta_losses(&self) -> Result<Vec<(TaskId, Tensor)>>;
    fn backward(&self, loss: &Tensor) -> Result<GradStore>;
}

/// A trained variable in the look-ahead step, with its learning rate (the schedule applied) and weight decay.
pub struct LookaheadVar<'a> {
    pub var: &'a Var,
    pub lr: f64,
    pub weight_decay: f64,
}

/// The gradient of the meta loss after a look-ahead step with respect to each task's weight (above), `alpha`
/// the learning rate it is scaled by. The variables are back at their values when it returns, error or not.
pub fn hypergradient(
    model: &dyn MetaModel,
    vars: &[LookaheadVar],
    lambda: &BTreeMap<TaskId, f64>,
    alpha: f64,
) -> Result<BTreeMap<TaskId, f64>> {
    let saved: Vec<Tensor> = vars.iter().map(|v| v.var.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
    let result = look_ahead(model, vars, &saved, lambda, alpha);
    for (v, t) in vars.iter().zip(&saved) {
        v.var.set(t)?;
    }
    result
}

fn weighted_sum(losses: &[(TaskId, Tensor)], weights: Option<&BTreeMap<TaskId, f64>>) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (task, loss) in losses {
        let term = match weights {
            Some(w) => loss.affine(w.get(task).copied().unwrap_or(0.0), 0.0)?,
            None => loss.clone(),
        };
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    Ok(total)
}

fn look_ahead(
    model: &dyn MetaModel,
    vars: &[LookaheadVar],
    saved: &[Tensor],
    lambda: &BTreeMap<TaskId, f64>,
    alpha: f64,
) -> Result<BTreeMap<TaskId, f64>> {
    let losses = model.train_losses(Mode::Train)?;
    let tasks: Vec<TaskId> = losses.iter().map(|(t, _)| t.clone()).collect();
    let zero = || tasks.iter().map(|t| (t.clone(), 0.0)).collect();
    let Some(total) = weighted_sum(&losses, Some(lambda))? else { return Ok(zero()) };
    let grads = model.backward(&total)?;
    drop(losses);
    // θ' = θ − lr (g + wd θ)
    for (v, theta) in vars.iter().zip(saved) {
        let mut step = theta.affine(v.weight_decay, 0.0)?;
        if let Some(g) = grads.get(v.var.as_tensor()) {
            step = (step + g)?;
        }
        v.var.set(&(theta - step.affine(v.lr, 0.0)?)?)?;
    }
    drop(grads);
    let meta = model.meta_losses()?;
    let Some(meta_total) = weighted_sum(&meta, None)? else { return Ok(zero()) };
    let store = model.backward(&meta_total)?;
    drop(meta);
    let d: Vec<Option<Tensor>> = vars.iter().map(|v| store.get(v.var.as_tensor()).cloned()).collect();
    drop(store);
    let mut norm = 0f64;
    for g in d.iter().flatten() {
        norm += crate::optim::sum_of_squares(g)?;
    }
    let norm = norm.sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return Ok(zero());
    }
    let eps = 0.01 / norm;
    let losses_at = |sign: f64| -> Result<BTreeMap<TaskId, f64>> {
        for ((v, theta), d) in vars.iter().zip(saved).zip(&d) {
            match d {
                Some(d) => v.var.set(&(theta + d.affine(sign * eps, 0.0)?)?)?,
                None => v.var.set(theta)?,
            }
        }
        model
            .train_losses(Mode::Eval)?
            .into_iter()
            .map(|(t, l)| Ok((t, l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)))
            .collect()
    };
    let plus = losses_at(1.0)?;
    let minus = losses_at(-1.0)?;
    Ok(plus
        .iter()
        .map(|(t, p)| (t.clone(), -alpha * (p - minus.get(t).copied().unwrap_or(*p)) / (2.0 * eps)))
        .collect())
}

/// The examples of meta batch number `index`: `subset` (indices into the meta data) cycled through in batches
/// of `batch`, reshuffled every pass by a generator seeded by `seed` and the pass.
pub fn meta_batch(subset: &[usize], batch: usize, index: usize, seed: u64) -> Vec<usize> {
    let n = subset.len();
    if n == 0 {
        return Vec::new();
    }
    let batch = batch.clamp(1, n);
    let per_pass = n / batch;
    let (pass, within) = (index / per_pass, index % per_pass);
    let mut order = subset.to_vec();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xA0_7014 ^ ((pass as u64) << 16)));
    order[within * batch..(within + 1) * batch].to_vec()
}

/// The examples the meta batches cycle through: `limit` of `n` in a seeded order (all when `None`).
pub fn meta_subset(n: usize, limit: Option<usize>, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5B_5E7));
    all.truncate(limit.unwrap_or(n).min(n));
    all
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;

    #[derive(Deserialize)]
    struct Round {
        meta_gradient: Vec<f64>,
        weights_after: Vec<f64>,
    }

    #[derive(Deserialize)]
    struct Fixture {
        shared: Vec<Vec<f64>>,
        heads: Vec<Vec<Vec<f64>>>,
        scales: Vec<f64>,
        x: Vec<Vec<f64>>,
        x_meta: Vec<Vec<f64>>,
        ys: Vec<Vec<u32>>,
        ys_meta: Vec<Vec<u32>>,
        alpha: f64,
        weight_decay: f64,
        meta_lr: f64,
        rounds: Vec<Round>,
    }

    fn matrix(rows: &[Vec<f64>]) -> candle_core::Result<Tensor> {
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu)
    }

    /// The fixture's tiny model: a shared tanh layer and a linear head per task, scaled cross-entropy losses.
    struct Tiny {
        vars: Vec<Var>,
        tasks: Vec<TaskId>,
        scales: Vec<f64>,
        data: (Tensor, Vec<Tensor>),
        meta: (Tensor, Vec<Tensor>),
    }

    impl Tiny {
        fn losses(&self, (x, targets): &(Tensor, Vec<Tensor>)) -> Result<Vec<(TaskId, Tensor)>> {
            let h = x.matmul(self.vars[0].as_tensor())?.tanh()?;
            self.tasks
                .iter()
                .enumerate()
                .map(|(i, task)| {
                    let logits = h.matmul(self.vars[1 + i].as_tensor())?;
                    let max = logits.max_keepdim(D::Minus1)?;
                    let shifted = logits.broadcast_sub(&max)?;
                    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
                    let picked = (log_probs * &targets[i])?.sum_all()?;
                    let n = targets[i].dim(0)? as f64;
                    Ok((task.clone(), picked.affine(-self.scales[i] / n, 0.0)?))
                })
                .collect()
        }
    }

    impl MetaModel for Tiny {
        fn train_losses(&self, _mode: Mode) -> Result<Vec<(TaskId, Tensor)>> {
            self.losses(&self.data)
        }
        fn meta_losses(&self) -> Result<Vec<(TaskId, Tensor)>> {
            self.losses(&self.meta)
        }
        fn backward(&self, loss: &Tensor) -> Result<GradStore> {
            Ok(loss.backward()?)
        }
    }

    /// Against the authors' `AutoLambda` on a tiny model over two rounds of meta step and training step
    /// (`scripts/make_fixtures.py weighting`): the meta gradient of each task's weight and the weights after
    /// Adam; the model's variables come back unchanged from the look-ahead.
    #[test]
    fn matches_the_authors_code() -> Result<()> {
        let f: Fixture =
            serde_json::from_str(include_str!("../../../../tests/fixtures/auto_lambda.json")).expect("parses");
        let one_hot = |ys: &[u32]| -> candle_core::Result<Tensor> {
            let rows: Vec<Vec<f64>> =
                ys.iter().map(|&y| (0..2).map(|c| f64::from(u8::from(c == y))).collect()).collect();
            matrix(&rows)
        };
        let tasks: Vec<TaskId> = (0..f.heads.len()).map(|i| TaskId::new(format!("t{i}")).expect("valid")).collect();
        let mut vars = vec![Var::from_tensor(&matrix(&f.shared)?)?];
        for h in &f.heads {
            vars.push(Var::from_tensor(&matrix(h)?)?);
        }
        let model = Tiny {
            vars,
            tasks: tasks.clone(),
            scales: f.scales.clone(),
            data: (matrix(&f.x)?, f.ys.iter().map(|y| one_hot(y)).collect::<candle_core::Result<_>>()?),
            meta: (matrix(&f.x_meta)?, f.ys_meta.iter().map(|y| one_hot(y)).collect::<candle_core::Result<_>>()?),
        };
        let mut auto = AutoLambda::new(&tasks, 0.1, f.meta_lr);
        for (n, round) in f.rounds.iter().enumerate() {
            let before: Vec<Vec<f64>> = model
                .vars
                .iter()
                .map(|v| v.as_tensor().flatten_all()?.to_vec1::<f64>())
                .collect::<candle_core::Result<_>>()?;
            let look: Vec<LookaheadVar> =
                model.vars.iter().map(|var| LookaheadVar { var, lr: f.alpha, weight_decay: f.weight_decay }).collect();
            let gradient = hypergradient(&model, &look, &auto.weights(), f.alpha)?;
            for (t, want) in tasks.iter().zip(&round.meta_gradient) {
                let got = gradient[t];
                assert!((got - want).abs() < 1e-6 * (1.0 + want.abs()), "round {n} {t}: {got} vs {want}");
            }
            for (v, b) in model.vars.iter().zip(&before) {
                assert_eq!(&v.as_tensor().flatten_all()?.to_vec1::<f64>()?, b, "the look-ahead left the weights moved");
            }
            auto.meta_step(&gradient);
            for (t, want) in tasks.iter().zip(&round.weights_after) {
                assert!((auto.weights()[t] - want).abs() < 1e-9, "round {n} {t}: {} vs {want}", auto.weights()[t]);
            }
            // The training step: gradient descent on the weighted losses.
            let total = weighted_sum(&model.train_losses(Mode::Train)?, Some(&auto.weights()))?.expect("tasks");
            let grads = total.backward()?;
            for v in &model.vars {
                let g = grads.get(v.as_tensor()).expect("every variable has a gradient");
                v.set(&(v.as_tensor() - g.affine(f.alpha, 0.0)?)?)?;
            }
        }
        assert_eq!(auto.meta_batches(), 2);
        let mut resumed = AutoLambda::new(&tasks, 0.1, f.meta_lr);
        resumed.load_state(&auto.state())?;
        assert_eq!(resumed.state(), auto.state());
        Ok(())
    }

    /// Meta batches cycle through the subset: every example once a pass, each pass in another order.
    #[test]
    fn meta_batches_cover_the_subset_every_pass() {
        let subset = meta_subset(50, Some(20), 3);
        assert_eq!(subset.len(), 20);
        for pass in 0..2 {
            let mut seen: Vec<usize> = (0..5).flat_map(|i| meta_batch(&subset, 4, pass * 5 + i, 9)).collect();
            seen.sort_unstable();
            let mut want = subset.clone();
            want.sort_unstable();
            assert_eq!(seen, want);
        }
        assert_ne!(meta_batch(&subset, 4, 0, 9), meta_batch(&subset, 4, 5, 9));
    }
}
