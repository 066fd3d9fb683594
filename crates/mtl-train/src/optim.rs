//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), as `torch.optim.AdamW`
//! computes it, with parameter groups and global-norm gradient clipping.
//!
//! On the CPU the update is one fused, in-place pass over each parameter, its gradient and its two moment
//! buffers, split across threads. The moments are plain host vectors keyed by parameter name, so they can be
//! exported for an exact resume.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::Result;

/// One parameter's optimisation settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamGroup {
    pub lr: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // transformers' Trainer defaults (torch's default eps is 1e-8 too).
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

struct Slot {
    var: Var,
    group: ParamGroup,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Updates this parameter received: its bias corrections count these, as torch counts `state["step"]`
    /// per parameter, so a parameter that trains only on some steps (a frozen layer thawing, the head of a
    /// task absent from a batch) is corrected for its own history.
    steps: u64,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: BTreeMap<String, Slot>,
    step: u64,
}

/// The whole state of an [`AdamW`]: the step count, and each parameter's first and second moments and
/// update count, by parameter name. Restoring it into an optimiser over the same parameters continues exactly
/// where the exported one stood.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamWState {
    pub step: u64,
    pub moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    pub param_steps: BTreeMap<String, u64>,
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// The global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// False when the norm was NaN or infinite: then nothing was updated, not even the step count.
    pub applied: bool,
}

impl AdamW {
    /// `params` are the variables to train, each with its group.
    pub fn new(params: impl IntoIterator<Item = (String, Var, ParamGroup)>, config: AdamWConfig) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, var, group)| {
                let n = var.elem_count();
                (name, Slot { var, group, m: vec![0.0; n], v: vec![0.0; n], steps: 0 })
            })
            .collect();
        Self { config, slots, step: 0 }
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// A copy of the optimiser state, for a checkpoint.
    pub fn state(&self) -> AdamWState {
        AdamWState {
            step: self.step,
            moments: self.slots.iter().map(|(n, s)| (n.clone(), (s.m.clone(), s.v.clone()))).collect(),
            param_steps: self.slots.iter().map(|(n, s)| (n.clone(), s.steps)).collect(),
        }
    }

    /// Restores a state exported by [`AdamW::state`]. Every parameter must be present with moments of its
    /// size; otherwise nothing changes and the error names the first offending parameter.
    pub fn load_state(&mut self, state: AdamWState) -> Result<()> {
        let invalid = |message: String| crate::TrainError::Invalid { path: "optimizer state".into(), message };
        for (name, slot) in &self.slots {
            match state.moments.get(name) {
                None => return Err(invalid(format!("no moments for parameter `{name}`"))),
                Some((m, v)) if m.len() != slot.m.len() || v.len() != slot.v.len() => {
                    return Err(invalid(format!(
                        "`{name}`: moments of {} values, the parameter has {}",
                        m.len(),
                        slot.m.len()
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = state.moments.keys().find(|n| !self.slots.contains_key(*n)) {
            return Err(invalid(format!("moments for unknown parameter `{extra}`")));
        }
        if let Some(name) = self.slots.keys().find(|n| !state.param_steps.contains_key(*n)) {
            return Err(invalid(format!("no update count for parameter `{name}`")));
        }
        let mut moments = state.moments;
        for (name, slot) in &mut self.slots {
            let (m, v) = moments.remove(name).expect("checked above");
            slot.m = m;
            slot.v = v;
            slot.steps = state.param_steps[name];
        }
        self.step = state.step;
        Ok(())
    }

    /// Applies one update from gradients by parameter name; parameters without one (frozen) are left
    /// alone. `lr_scale` multiplies every group's learning rate (the schedule); gradients are scaled down so
    /// that their global norm is at most `max_norm`, when given. A NaN or infinite norm skips the update.
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr_scale: f64, max_norm: Option<f64>) -> Result<StepInfo> {
        let present: Vec<(String, Tensor)> =
            self.slots.keys().filter_map(|name| grads.get(name).map(|g| (name.clone(), g.clone()))).collect();
        let mut sq = 0f64;
        for (_, g) in &present {
            sq += sum_of_squares(g)?;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepInfo { grad_norm, applied: false });
        }
        let clip = match max_norm {
            // torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), clamped to 1.
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.step += 1;
        let c = self.config;
        for (name, grad) in present {
            let slot = self.slots.get_mut(&name).expect("name comes from the slots; this is a bug");
            slot.steps += 1;
            let t = slot.steps as i32;
            let bias1 = 1.0 - c.beta1.powi(t);
            let bias2 = 1.0 - c.beta2.powi(t);
            let lr = slot.group.lr * lr_scale;
            let update = FusedAdamW {
                decay: (1.0 - lr * slot.group.weight_decay) as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                // Folding the bias corrections into the step size and eps, as torch does.
                step_size: (lr / bias1) as f32,
                bias2_sqrt: bias2.sqrt() as f32,
                eps: c.eps as f32,
                clip: clip as f32,
                m: std::sync::Mutex::new(std::mem::take(&mut slot.m)),
                v: std::sync::Mutex::new(std::mem::take(&mut slot.v)),
            };
            let grad = grad.contiguous()?;
            slot.var.as_tensor().inplace_op2(&grad, &update)?;
            slot.m = update.m.into_inner().expect("adamw moment lock poisoned; this is a bug");
            slot.v = update.v.into_inner().expect("adamw moment lock poisoned; this is a bug");
        }
        Ok(StepInfo { grad_norm, applied: true })
    }
}

pub(crate) fn sum_of_squares(t: &Tensor) -> Result<f64> {
    let (storage, layout) = t.storage_and_layout();
    if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
        // Per-chunk sums are collected in order and added sequentially, so the result does not depend on
        // how the threads split the work. Within a chunk, eight running sums: a single one is a chain of
        // dependent additions the compiler may not reorder, which kept the loop scalar (a third of AdamW's step).
        let partial: Vec<f64> = data[start..end]
            .par_chunks(1 << 14)
            .map(|c| {
                mtl_nn::cpu::math::simd(
                    #[inline(always)]
                    || {
                        let mut acc = [0f64; 8];
                        let chunks = c.chunks_exact(8);
                        let tail: f64 = chunks.remainder().iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                        for chunk in chunks {
                            for (a, &x) in acc.iter_mut().zip(chunk) {
                                *a += f64::from(x) * f64::from(x);
                            }
                        }
                        acc.iter().sum::<f64>() + tail
                    },
                )
            })
            .collect();
        return Ok(partial.iter().sum());
    }
    drop(storage);
    Ok(t.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?)
}

struct FusedAdamW {
    decay: f32,
    beta1: f32,
    beta2: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
    clip: f32,
    m: std::sync::Mutex<Vec<f32>>,
    v: std::sync::Mutex<Vec<f32>>,
}

impl InplaceOp2 for FusedAdamW {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, grad) else {
            candle_core::bail!("fused-adamw: only f32 parameters are supported")
        };
        let (Some((p0, p1)), Some((g0, g1))) = (dst_l.contiguous_offsets(), grad_l.contiguous_offsets()) else {
            candle_core::bail!("fused-adamw: parameters and gradients must be contiguous")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut m = self.m.lock().expect("adamw moment lock poisoned; this is a bug");
        let mut v = self.v.lock().expect("adamw moment lock poisoned; this is a bug");
        if p.len() != g.len() || p.len() != m.len() {
            candle_core::bail!("fused-adamw: parameter, gradient and moments differ in size")
        }
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                // Zipped slices rather than indices (bounds checks kept the loop scalar), compiled for the
                // CPU's widest vectors; the same operations in the same order.
                mtl_nn::cpu::math::simd(
                    #[inline(always)]
                    || {
                        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                            let gi = g * self.clip;
                            *m = self.beta1 * *m + (1.0 - self.beta1) * gi;
                            *v = self.beta2 * *v + (1.0 - self.beta2) * gi * gi;
                            let denom = v.sqrt() / self.bias2_sqrt + self.eps;
                            *p = *p * self.decay - self.step_size * *m / denom;
                        }
                    },
                )
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The gradient of `loss` for the single parameter `p`, by name.
    fn grad_of(loss: &Tensor, p: &Var) -> Result<BTreeMap<String, Tensor>> {
        let store = loss.backward()?;
        Ok(store.get(p.as_tensor()).map(|g| ("p".to_string(), g.clone())).into_iter().collect())
    }

    /// Two steps of torch.optim.AdamW(lr=0.1, weight_decay=0.01) from p = [1, -2, 3] with gradients
    /// g1 = [0.5, -1, 2] and g2 = [0.1, 0.2, -0.3]; torch 2.13 gives [0.8177969455718994, -1.8449994325637817, 2.8388831615448].
    #[test]
    fn matches_torch_adamw() -> Result<()> {
        let p = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
        let group = ParamGroup { lr: 0.1, weight_decay: 0.01 };
        let mut opt = AdamW::new([("p".to_string(), p.clone(), group)], AdamWConfig::default());
        for g in [[0.5f32, -1.0, 2.0], [0.1, 0.2, -0.3]] {
            let gt = Tensor::new(&g, &Device::Cpu)?;
            let loss = (p.as_tensor() * gt)?.sum_all()?;
            opt.step(&grad_of(&loss, &p)?, 1.0, None)?;
        }
        let got = p.as_tensor().to_vec1::<f32>()?;
        let want = [0.817_796_95f32, -1.844_999_4, 2.838_883_2];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs torch {want:?}");
        }
        Ok(())
    }

    /// Exporting the state after two steps and restoring it into a fresh optimiser gives the same third step
    /// as never stopping.
    #[test]
    fn exported_state_resumes_exactly() -> Result<()> {
        let grads = [[0.5f32, -1.0, 2.0], [0.1, 0.2, -0.3], [-0.7, 0.4, 0.9]];
        let group = ParamGroup { lr: 0.1, weight_decay: 0.01 };
        let step = |opt: &mut AdamW, p: &Var, g: &[f32; 3]| -> Result<()> {
            let loss = (p.as_tensor() * Tensor::new(g, &Device::Cpu)?)?.sum_all()?;
            opt.step(&grad_of(&loss, p)?, 1.0, Some(1.0)).map(|_| ())
        };
        let straight = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
        let mut opt = AdamW::new([("p".to_string(), straight.clone(), group)], AdamWConfig::default());
        for g in &grads {
            step(&mut opt, &straight, g)?;
        }
        let resumed = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
        let mut first = AdamW::new([("p".to_string(), resumed.clone(), group)], AdamWConfig::default());
        step(&mut first, &resumed, &grads[0])?;
        step(&mut first, &resumed, &grads[1])?;
        let state = first.state();
        let mut second = AdamW::new([("p".to_string(), resumed.clone(), group)], AdamWConfig::default());
        let mut wrong = state.clone();
        wrong.moments.insert("q".into(), (vec![0.0], vec![0.0]));
        assert!(second.load_state(wrong).is_err(), "an unknown parameter is refused");
        second.load_state(state)?;
        step(&mut second, &resumed, &grads[2])?;
        assert_eq!(resumed.as_tensor().to_vec1::<f32>()?, straight.as_tensor().to_vec1::<f32>()?);
        assert_eq!(second.steps(), 3);
        Ok(())
    }

    /// torch.optim.AdamW(lr=0.1, weight_decay=0) over parameters p = [1] and q = [2], where q has no gradient at
    /// the first step (torch skips it, its step count stays 0): gradients p: 0.5, 0.3; q: -, 0.4. torch 2.13
    /// gives p = 0.8042510151863098 and q = 1.899999976158142 (q's first update is a full lr step).
    #[test]
    fn each_parameter_counts_its_own_updates() -> Result<()> {
        let p = Var::new(&[1f32], &Device::Cpu)?;
        let q = Var::new(&[2f32], &Device::Cpu)?;
        let group = ParamGroup { lr: 0.1, weight_decay: 0.0 };
        let mut opt = AdamW::new(
            [("p".to_string(), p.clone(), group), ("q".to_string(), q.clone(), group)],
            AdamWConfig::default(),
        );
        let g = |v: f32| Tensor::new(&[v], &Device::Cpu);
        opt.step(&BTreeMap::from([("p".to_string(), g(0.5)?)]), 1.0, None)?;
        opt.step(&BTreeMap::from([("p".to_string(), g(0.3)?), ("q".to_string(), g(0.4)?)]), 1.0, None)?;
        assert!((p.as_tensor().to_vec1::<f32>()?[0] - 0.804_251).abs() < 1e-5, "{:?}", p.as_tensor().to_vec1::<f32>()?);
        assert!((q.as_tensor().to_vec1::<f32>()?[0] - 1.9).abs() < 1e-6, "{:?}", q.as_tensor().to_vec1::<f32>()?);
        assert_eq!(opt.state().param_steps, BTreeMap::from([("p".to_string(), 2), ("q".to_string(), 1)]));
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let p = Var::new(&[0f32, 0.0], &Device::Cpu)?;
        let mut opt = AdamW::new(
            [("p".to_string(), p.clone(), ParamGroup { lr: 0.1, weight_decay: 0.0 })],
            AdamWConfig::default(),
        );
        let loss = (p.as_tensor() * Tensor::new(&[3f32, 4.0], &Device::Cpu)?)?.sum_all()?;
        let info = opt.step(&grad_of(&loss, &p)?, 1.0, Some(1.0))?;
        assert!((info.grad_norm - 5.0).abs() < 1e-6 && info.applied);
        let nan = BTreeMap::from([("p".to_string(), Tensor::new(&[f32::NAN, 1.0], &Device::Cpu)?)]);
        let before = p.as_tensor().to_vec1::<f32>()?;
        let info = opt.step(&nan, 1.0, Some(1.0))?;
        assert!(!info.applied && info.grad_norm.is_nan());
        assert_eq!(p.as_tensor().to_vec1::<f32>()?, before, "a NaN gradient changes nothing");
        assert_eq!(opt.steps(), 1);
        Ok(())
    }
}
