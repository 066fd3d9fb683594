//! AdaLoRA's rank allocation (Zhang, Chen, Bukharin, He, Cheng, Chen & Zhao, "Adaptive Budget Allocation for
//! Parameter-Efficient Fine-Tuning", ICLR 2023), as PEFT's `RankAllocator` and `AdaLoraModel` compute it.
//!
//! Each adapted layer's update is `B (E ⊙ A)` in SVD form: `A` (`r × in`) and `B` (`out × r`) the singular
//! vectors, `E` (`r`) the singular values. After every optimiser step the importance of each entry of `A`,
//! `B` and `E` is its sensitivity `|p · ∂L/∂p|`, smoothed (`I ← β₁ I + (1 − β₁) |p ∂p|`) and multiplied by its
//! uncertainty (`U ← β₂ U + (1 − β₂) |(|p ∂p|) − I|`); a triplet `i` of a layer scores
//! `s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`. The budget (the total rank over all layers) stays at
//! `init_r · layers` for `tinit` steps, then falls on a cubic to `target_r · layers` at step
//! `total_step − tfinal`; every `delta_t` steps meanwhile, the triplets scoring at or below the
//! `(init − budget)`-th smallest score get `E_i = 0`. At step `total_step − tfinal` the final pattern is
//! fixed (and the scores reset); after it every step re-applies that pattern. The regulariser
//! `mean over A and B of ‖P Pᵀ − I‖_F` (`A Aᵀ`, `Bᵀ B`) keeps `A` and `B` near orthogonal.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::Result;

/// AdaLoRA's schedule (PEFT's `AdaLoraConfig` names).
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraSchedule {
    pub init_r: usize,
    pub target_r: usize,
    pub tinit: usize,
    pub tfinal: usize,
    pub delta_t: usize,
    pub total_step: usize,
    pub beta1: f64,
    pub beta2: f64,
}

/// One adapted layer as the allocator sees it after a step: values and gradients, row-major.
pub struct LayerState<'a> {
    pub name: &'a str,
    /// `r × in`
    pub a: (&'a [f32], &'a [f32]),
    /// `out × r`
    pub b: (&'a [f32], &'a [f32]),
    /// `r`
    pub e: (&'a [f32], &'a [f32]),
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Scores {
    ipt: Vec<f32>,
    unc: Vec<f32>,
}

impl Scores {
    /// The smoothed sensitivity and uncertainty after one more observation.
    fn update(&mut self, values: &[f32], grads: &[f32], beta1: f32, beta2: f32) {
        if self.ipt.len() != values.len() {
            *self = Self { ipt: vec![0.0; values.len()], unc: vec![0.0; values.len()] };
        }
        for (i, (v, g)) in values.iter().zip(grads).enumerate() {
            let sensitivity = (v * g).abs();
            self.ipt[i] = beta1 * self.ipt[i] + (1.0 - beta1) * sensitivity;
            self.unc[i] = beta2 * self.unc[i] + (1.0 - beta2) * (sensitivity - self.ipt[i]).abs();
        }
    }

    fn element(&self, i: usize) -> f32 {
        self.ipt[i] * self.unc[i]
    }
}

/// The rank allocator: the importance scores, and the pattern of kept triplets once one is fixed.
#[derive(Clone, Debug, PartialEq)]
pub struct RankAllocator {
    pub schedule: AdaLoraSchedule,
    scores: BTreeMap<String, [Scores; 3]>,
    /// The kept triplets of each layer, once a mask was applied.
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

impl RankAllocator {
    pub fn new(schedule: AdaLoraSchedule) -> Self {
        Self { schedule, scores: BTreeMap::new(), rank_pattern: None }
    }

    /// The budget at `step` and whether a mask is due (PEFT's `budget_schedule`), for `layers` layers.
    pub fn budget(&self, step: usize, layers: usize) -> (usize, bool) {
        let s = &self.schedule;
        let (init, target) = (s.init_r * layers, s.target_r * layers);
        if step <= s.tinit {
            (init, false)
        } else if step > s.total_step - s.tfinal {
            (target, true)
        } else {
            let span = (s.total_step - s.tfinal - s.tinit) as f64;
            let coefficient = 1.0 - (step - s.tinit) as f64 / span;
            let budget = ((init - target) as f64 * coefficient.powi(3) + target as f64) as usize;
            (budget, step.is_multiple_of(s.delta_t.max(1)))
        }
    }

    /// PEFT's `AdaLoraModel.update_and_allocate` after optimiser step `step` (from 0): the importance update,
    /// and the mask to apply to every layer's `E` now (`true` keeps a triplet), if any.
    pub fn update_and_allocate(&mut self, layers: &[LayerState], step: usize) -> Option<BTreeMap<String, Vec<bool>>> {
        let s = &self.schedule;
        let last = s.total_step - s.tfinal;
        if step < last {
            self.update_scores(layers);
            let (budget, due) = self.budget(step, layers.len());
            if due {
                self.rank_pattern = Some(self.mask_to_budget(layers, budget));
            }
            return if due { self.rank_pattern.clone() } else { None };
        }
        if step == last {
            let (budget, _) = self.budget(step, layers.len());
            self.rank_pattern = Some(self.mask_to_budget(layers, budget));
            self.scores.clear();
        }
        self.rank_pattern.clone()
    }

    fn update_scores(&mut self, layers: &[LayerState]) {
        let (b1, b2) = (self.schedule.beta1 as f32, self.schedule.beta2 as f32);
        for layer in layers {
            let scores = self.scores.entry(layer.name.to_string()).or_default();
            for (slot, (values, grads)) in scores.iter_mut().zip([layer.a, layer.b, layer.e]) {
                slot.update(values, grads, b1, b2);
            }
        }
    }

    /// Each triplet's score, by layer.
    fn triplet_scores(&self, layers: &[LayerState]) -> BTreeMap<String, Vec<f32>> {
        layers
            .iter()
            .map(|layer| {
                let r = layer.e.0.len();
                let (inputs, outputs) = (layer.a.0.len() / r.max(1), layer.b.0.len() / r.max(1));
                let none = [Scores::default(), Scores::default(), Scores::default()];
                let [a, b, e] = self.scores.get(layer.name).unwrap_or(&none);
                let score = |i: usize| -> f32 {
                    let e = if e.ipt.is_empty() { 0.0 } else { e.element(i) };
                    let a_mean = if a.ipt.is_empty() {
                        0.0
                    } else {
                        (0..inputs).map(|j| a.element(i * inputs + j)).sum::<f32>() / inputs as f32
                    };
                    let b_mean = if b.ipt.is_empty() {
                        0.0
                    } else {
                        (0..outputs).map(|k| b.element(k * r + i)).sum::<f32>() / outputs as f32
                    };
                    e + (a_mean + b_mean)
                };
                (layer.name.to_string(), (0..r).map(score).collect())
            })
            .collect()
    }

    /// Keeps the triplets scoring above the `(initial − budget)`-th smallest score (PEFT's `mask_to_budget`).
    fn mask_to_budget(&self, layers: &[LayerState], budget: usize) -> BTreeMap<String, Vec<bool>> {
        let scores = self.triplet_scores(layers);
        let mut all: Vec<f32> = scores.values().flatten().copied().collect();
        let k = all.len().saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            all.sort_by(f32::total_cmp);
            all[k - 1]
        };
        scores.into_iter().map(|(name, s)| (name, s.into_iter().map(|v| v > threshold).collect())).collect()
    }
}

impl RankAllocator {
    /// The state to keep in checkpoints: every score vector and the pattern (1 kept, 0 pruned), by name.
    pub fn tensors(&self) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        for (layer, scores) in &self.scores {
            for (kind, s) in ["A", "B", "E"].iter().zip(scores) {
                out.insert(format!("{layer}.{kind}.ipt"), s.ipt.clone());
                out.insert(format!("{layer}.{kind}.unc"), s.unc.clone());
            }
        }
        for (layer, keep) in self.rank_pattern.iter().flatten() {
            out.insert(format!("{layer}.pattern"), keep.iter().map(|k| f32::from(u8::from(*k))).collect());
        }
        out
    }

    /// Restores [`RankAllocator::tensors`].
    pub fn load_tensors(&mut self, tensors: &BTreeMap<String, Vec<f32>>) -> std::result::Result<(), String> {
        self.scores.clear();
        let mut pattern = BTreeMap::new();
        for (name, values) in tensors {
            if let Some(layer) = name.strip_suffix(".pattern") {
                pattern.insert(layer.to_string(), values.iter().map(|v| *v > 0.5).collect());
                continue;
            }
            let parts: Vec<&str> = name.rsplitn(3, '.').collect();
            let [what, kind, layer] = parts[..] else { return Err(format!("`{name}` is not LAYER.KIND.WHAT")) };
            let slot = match kind {
                "A" => 0,
                "B" => 1,
                "E" => 2,
                _ => return Err(format!("`{name}`: unknown matrix `{kind}`")),
            };
            let scores = &mut self.scores.entry(layer.to_string()).or_default()[slot];
            match what {
                "ipt" => scores.ipt = values.clone(),
                "unc" => scores.unc = values.clone(),
                _ => return Err(format!("`{name}`: unknown score `{what}`")),
            }
        }
        self.rank_pattern = (!pattern.is_empty()).then_some(pattern);
        Ok(())
    }
}

/// AdaLoRA's orthogonal regulariser: the mean over the matrices of `‖A Aᵀ − I‖_F` for each `A` (`r × in`) and
/// `‖Bᵀ B − I‖_F` for each `B` (`out × r`), a scalar that carries the graph.
pub fn orthogonal_regularizer(a: &[&Tensor], b: &[&Tensor]) -> Result<Option<Tensor>> {
    let mut terms = Vec::new();
    for (p, left) in a.iter().map(|p| (*p, true)).chain(b.iter().map(|p| (*p, false))) {
        let cov = if left { p.matmul(&p.t()?)? } else { p.t()?.matmul(p)? };
        let n = cov.dim(0)?;
        let eye = Tensor::eye(n, cov.dtype(), cov.device())?;
        terms.push((cov - eye)?.sqr()?.sum_all()?.sqrt()?);
    }
    let count = terms.len();
    let Some(first) = terms.pop() else { return Ok(None) };
    let sum = terms.into_iter().try_fold(first, |acc, t| acc + t)?;
    Ok(Some(sum.affine(1.0 / count as f64, 0.0)?))
}

/// One adapter's AdaLoRA layers: the names of each layer's A, B and E.
struct AdapterLayers {
    allocator: RankAllocator,
    /// `(layer, A, B, E)` variable names, the layer named by the prefix before `.lora_A.`.
    layers: Vec<(String, String, String, String)>,
}

/// AdaLoRA in a run: a rank allocator per adapter, the regulariser's weight.
pub struct AdaLoraRun {
    orth_reg_weight: f64,
    adapters: BTreeMap<String, AdapterLayers>,
}

impl AdaLoraRun {
    /// The run's AdaLoRA over the model's variables (`….lora_A.ADAPTER.weight` and its B and E), with
    /// `total_steps` optimiser steps; `None` when the config asks for no AdaLoRA.
    pub fn new(
        config: &mtl_config::Config,
        vars: &BTreeMap<String, candle_core::Var>,
        total_steps: usize,
    ) -> Result<Option<Self>> {
        let p = &config.peft;
        if p.method != mtl_config::PeftMethod::Adalora {
            return Ok(None);
        }
        let a = &p.adalora;
        if a.tinit >= total_steps.saturating_sub(a.tfinal) {
            return Err(crate::TrainError::Invalid {
                path: "peft.adalora".into(),
                message: format!(
                    "tinit ({}) must end before the final phase: the run has {total_steps} optimiser steps and tfinal is {}",
                    a.tinit, a.tfinal
                ),
            });
        }
        let schedule = AdaLoraSchedule {
            init_r: p.r,
            target_r: a.target_r,
            tinit: a.tinit,
            tfinal: a.tfinal,
            delta_t: a.delta_t,
            total_step: total_steps,
            beta1: a.beta1,
            beta2: a.beta2,
        };
        let mut adapters: BTreeMap<String, AdapterLayers> = BTreeMap::new();
        for name in vars.keys() {
            let Some((layer, rest)) = name.split_once(".lora_A.") else { continue };
            let Some(adapter) = rest.strip_suffix(".weight") else { continue };
            let other = |m: &str| format!("{layer}.lora_{m}.{adapter}.weight");
            let (b, e) = (other("B"), other("E"));
            if !vars.contains_key(&b) || !vars.contains_key(&e) {
                continue;
            }
            adapters
                .entry(adapter.to_string())
                .or_insert_with(|| AdapterLayers {
                    allocator: RankAllocator::new(schedule.clone()),
                    layers: Vec::new(),
                })
                .layers
                .push((layer.to_string(), name.clone(), b, e));
        }
        Ok(Some(Self { orth_reg_weight: a.orth_reg_weight, adapters }))
    }

    /// Adds the orthogonality regulariser's gradient to `grads`, for the adapters this step trains (those
    /// whose A has a gradient: an adapter absent from the step must get none).
    pub fn add_regularizer(
        &self,
        grads: &mut BTreeMap<String, Tensor>,
        vars: &BTreeMap<String, candle_core::Var>,
    ) -> Result<()> {
        if self.orth_reg_weight == 0.0 {
            return Ok(());
        }
        for adapter in self.adapters.values() {
            if !adapter.layers.iter().any(|(_, a, _, _)| grads.contains_key(a)) {
                continue;
            }
            let a: Vec<&Tensor> = adapter.layers.iter().map(|(_, a, _, _)| vars[a].as_tensor()).collect();
            let b: Vec<&Tensor> = adapter.layers.iter().map(|(_, _, b, _)| vars[b].as_tensor()).collect();
            let Some(regularizer) = orthogonal_regularizer(&a, &b)? else { continue };
            let store = regularizer.affine(self.orth_reg_weight, 0.0)?.backward()?;
            for name in adapter.layers.iter().flat_map(|(_, a, b, _)| [a, b]) {
                if let Some(g) = store.get(vars[name].as_tensor()) {
                    let sum = match grads.remove(name) {
                        Some(previous) => (previous + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        Ok(())
    }

    /// After optimiser step `step` (from 0) with gradients `grads`: the allocators' update, and E masked where
    /// they prune.
    pub fn after_step(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        vars: &BTreeMap<String, candle_core::Var>,
        step: usize,
    ) -> Result<()> {
        let values = |name: &str| -> Result<Vec<f32>> { Ok(vars[name].as_tensor().flatten_all()?.to_vec1::<f32>()?) };
        for adapter in self.adapters.values_mut() {
            // An adapter absent from the step (a per-task adapter whose task had no example) learns nothing.
            if !adapter.layers.iter().any(|(_, a, _, _)| grads.contains_key(a)) {
                continue;
            }
            let mut owned = Vec::with_capacity(adapter.layers.len());
            for (layer, a, b, e) in &adapter.layers {
                let grad = |name: &str| -> Result<Vec<f32>> {
                    Ok(match grads.get(name) {
                        Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                        None => vec![0.0; vars[name].as_tensor().elem_count()],
                    })
                };
                owned.push((layer, (values(a)?, grad(a)?), (values(b)?, grad(b)?), (values(e)?, grad(e)?)));
            }
            let states: Vec<LayerState> = owned
                .iter()
                .map(|(layer, a, b, e)| LayerState {
                    name: layer.as_str(),
                    a: (&a.0, &a.1),
                    b: (&b.0, &b.1),
                    e: (&e.0, &e.1),
                })
                .collect();
            let Some(mask) = adapter.allocator.update_and_allocate(&states, step) else { continue };
            for ((layer, _, _, e), (_, _, _, (current, _))) in adapter.layers.iter().zip(&owned) {
                let Some(keep) = mask.get(layer) else { continue };
                let masked: Vec<f32> = current.iter().zip(keep).map(|(v, k)| if *k { *v } else { 0.0 }).collect();
                let var = &vars[e];
                var.set(&Tensor::from_vec(masked, var.as_tensor().shape(), var.device())?)?;
            }
        }
        Ok(())
    }

    /// Every allocator's state, by `ADAPTER/NAME`.
    pub fn tensors(&self) -> BTreeMap<String, Vec<f32>> {
        self.adapters
            .iter()
            .flat_map(|(adapter, a)| a.allocator.tensors().into_iter().map(move |(k, v)| (format!("{adapter}/{k}"), v)))
            .collect()
    }

    /// Restores [`AdaLoraRun::tensors`].
    pub fn load_tensors(&mut self, tensors: &BTreeMap<String, Vec<f32>>) -> std::result::Result<(), String> {
        for (adapter, a) in &mut self.adapters {
            let prefix = format!("{adapter}/");
            let own: BTreeMap<String, Vec<f32>> = tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone())))
                .collect();
            a.allocator.load_tensors(&own)?;
        }
        Ok(())
    }

    /// The kept rank of each layer of each adapter, once a pattern is fixed.
    pub fn ranks(&self) -> BTreeMap<String, BTreeMap<String, usize>> {
        self.adapters
            .iter()
            .filter_map(|(adapter, a)| {
                let pattern = a.allocator.rank_pattern.as_ref()?;
                Some((
                    adapter.clone(),
                    pattern.iter().map(|(l, k)| (l.clone(), k.iter().filter(|x| **x).count())).collect(),
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Seen {
        value: Vec<f32>,
        grad: Vec<f32>,
    }

    #[derive(serde::Deserialize)]
    struct Step {
        step: usize,
        seen: BTreeMap<String, Seen>,
        budget: usize,
        e_after: BTreeMap<String, Vec<f32>>,
        rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    }

    #[derive(serde::Deserialize)]
    struct Orth {
        value: f64,
        at: BTreeMap<String, Vec<f32>>,
        grads: BTreeMap<String, Vec<f32>>,
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        settings: BTreeMap<String, f64>,
        shapes: BTreeMap<String, [usize; 2]>,
        orth: Orth,
        steps: Vec<Step>,
    }

    fn fixture() -> Fixture {
        serde_json::from_str(include_str!("../../../tests/fixtures/adalora.json")).expect("fixture parses")
    }

    /// Against PEFT's AdaLoRA over 20 steps of a tiny network (`scripts/make_fixtures.py adalora`): the budget
    /// of each step, the triplets kept, and the E each step leaves.
    #[test]
    fn allocates_ranks_as_peft() {
        let f = fixture();
        let get = |k: &str| f.settings[k] as usize;
        let schedule = AdaLoraSchedule {
            init_r: get("init_r"),
            target_r: get("target_r"),
            tinit: get("tinit"),
            tfinal: get("tfinal"),
            delta_t: get("deltaT"),
            total_step: get("total_step"),
            beta1: f.settings["beta1"],
            beta2: f.settings["beta2"],
        };
        let mut allocator = RankAllocator::new(schedule);
        let names: Vec<&String> = f.shapes.keys().collect();
        let mut kept_some = false;
        for step in &f.steps {
            let part = |layer: &str, kind: &str| -> (&[f32], &[f32]) {
                let s = &step.seen[&format!("{layer}.{kind}")];
                (s.value.as_slice(), s.grad.as_slice())
            };
            let layers: Vec<LayerState> = names
                .iter()
                .map(|n| LayerState { name: n.as_str(), a: part(n, "A"), b: part(n, "B"), e: part(n, "E") })
                .collect();
            assert_eq!(allocator.budget(step.step, layers.len()).0, step.budget, "step {}", step.step);
            let mask = allocator.update_and_allocate(&layers, step.step);
            for n in &names {
                let e = &step.seen[&format!("{n}.E")].value;
                let after: Vec<f32> = match &mask {
                    Some(m) => e.iter().zip(&m[n.as_str()]).map(|(v, keep)| if *keep { *v } else { 0.0 }).collect(),
                    None => e.clone(),
                };
                assert_eq!(&after, &step.e_after[n.as_str()], "step {} layer {n}: E", step.step);
            }
            if let Some(want) = &step.rank_pattern {
                let got = allocator.rank_pattern.as_ref().expect("a pattern once PEFT has one");
                for n in &names {
                    assert_eq!(&got[n.as_str()], &want[n.as_str()], "step {} layer {n}: kept triplets", step.step);
                }
                kept_some |= want.values().any(|p| p.iter().filter(|k| **k).count() < p.len());
            }
        }
        assert!(kept_some, "the fixture prunes some triplets");
    }

    #[derive(serde::Deserialize)]
    struct Trained {
        schedule: BTreeMap<String, f64>,
        alpha: f64,
        lr: f64,
        losses: Vec<f64>,
        lm_losses: Vec<f64>,
        grad_norms: BTreeMap<String, f64>,
        rank_pattern: BTreeMap<String, Vec<bool>>,
        final_e: BTreeMap<String, Vec<f32>>,
    }

    /// The decoder's AdaLoRA trained as PEFT trains it (`scripts/make_fixtures.py adalora`: tiny-llama, every
    /// projection, random A, B and E, 12 SGD steps of PEFT's loop with its regulariser and allocator): the loss
    /// before every step, the first step's gradient of every A, B and E, the triplets kept and the final E, on
    /// the fused kernels and on the composed ops.
    #[test]
    fn decoder_adalora_trains_as_peft() -> std::result::Result<(), Box<dyn std::error::Error>> {
        use candle_core::Device;
        use mtl_nn::llama::{DecoderLora, DecoderModule, Llama, LlamaConfig, LoraRun};
        use mtl_nn::{DropoutRng, Kernels, LoraSpec, ParamBuilder, Route};

        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
        let f: Trained = serde_json::from_str(&std::fs::read_to_string(dir.join("adalora.json"))?)?;
        let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let rows = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(reference[k].clone()).expect("fixture rows") };
        let (ids, mask, labels) = (rows("input_ids"), rows("attention_mask"), rows("labels").concat());
        let (b, s) = (ids.len(), ids[0].len());
        let ids = Tensor::from_vec(ids.concat().iter().map(|&i| i as u32).collect::<Vec<_>>(), (b, s), &Device::Cpu)?;
        let mask: Vec<u32> = mask.concat().iter().map(|&m| m as u32).collect();
        let get = |k: &str| f.schedule[k] as usize;
        let text = format!(
            "[model]\npath = \"m\"\n[training]\nepochs = 1\nlr = 1e-4\n[tasks.intent]\nkind = \"classification\"\ndata = {{ train = \"a.jsonl\" }}\n\
             [peft]\nmethod = \"adalora\"\nr = {}\nalpha = {}\ndropout = 0.0\n[peft.adalora]\ntarget_r = {}\n\
             tinit = {}\ntfinal = {}\ndelta_t = {}\nbeta1 = {}\nbeta2 = {}\north_reg_weight = {}\n",
            get("init_r"),
            f.alpha,
            get("target_r"),
            get("tinit"),
            get("tfinal"),
            get("deltaT"),
            f.schedule["beta1"],
            f.schedule["beta2"],
            f.schedule["orth_reg_weight"],
        );
        let config = mtl_config::Config::parse(&text, std::path::Path::new("t.toml"), &[])?;
        let config_file = LlamaConfig::from_file(&dir.join("config.json"))?;
        for kernels in [Kernels::Fused, Kernels::Composed] {
            let pb = ParamBuilder::from_safetensors(&dir.join("model.safetensors"), 0, &Device::Cpu)?;
            pb.add_safetensors(&dir.join("adalora.safetensors"))?;
            let spec = LoraSpec { r: get("init_r"), alpha: f.alpha, dropout: 0.0, targets: Vec::new(), svd: true };
            let lora = DecoderLora { spec, modules: DecoderModule::ALL.to_vec(), adapters: vec!["intent".into()] };
            let mut model = Llama::with_lora(&pb, &config_file, Some(&lora))?;
            model.set_kernels(kernels);
            let store = pb.finish();
            assert!(store.initialised().is_empty(), "{:?}", store.initialised());
            let vars = store.vars();
            let mut run = AdaLoraRun::new(&config, vars, get("total_step"))?.expect("AdaLoRA");
            assert_eq!(run.adapters["intent"].layers.len(), 2 * 7, "seven projections in two layers");
            let off = DropoutRng::new(0.0, 0);
            let routes = [Route { adapter: 0, examples: 0..b }];
            for (step, (want, want_lm)) in f.losses.iter().zip(&f.lm_losses).enumerate() {
                let pass = LoraRun { routes: &routes, dropout: &off, mode: mtl_core::Mode::Train, frozen: false };
                let hidden = model.forward_with(&ids, Some(&mask), None, Some(&pass))?;
                let lm = mtl_nn::llama::causal_lm_loss(&model.logits(&hidden)?, &labels, b, s, -100)?;
                let got_lm = f64::from(lm.to_scalar::<f32>()?);
                assert!(
                    (got_lm - want_lm).abs() < 1e-4 * want_lm.max(1.0),
                    "{kernels:?} step {step}: LM loss {got_lm} vs {want_lm}"
                );
                let store_grads = lm.backward()?;
                let mut grads: BTreeMap<String, Tensor> = vars
                    .iter()
                    .filter(|(n, _)| n.contains(".lora_"))
                    .filter_map(|(n, v)| store_grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
                    .collect();
                // PEFT's loss adds the regulariser: its value, and its gradient where `add_regularizer` puts it.
                let adapter = &run.adapters["intent"];
                let a: Vec<&Tensor> = adapter.layers.iter().map(|(_, a, _, _)| vars[a].as_tensor()).collect();
                let bs: Vec<&Tensor> = adapter.layers.iter().map(|(_, _, b, _)| vars[b].as_tensor()).collect();
                let reg = orthogonal_regularizer(&a, &bs)?.expect("matrices").to_scalar::<f32>()?;
                let total = got_lm + f.schedule["orth_reg_weight"] * f64::from(reg);
                assert!((total - want).abs() < 1e-4 * want.max(1.0), "{kernels:?} step {step}: loss {total} vs {want}");
                run.add_regularizer(&mut grads, vars)?;
                if step == 0 {
                    for (name, want) in &f.grad_norms {
                        let g = grads.get(name).ok_or_else(|| format!("{name}: no gradient"))?;
                        let norm = f64::from(g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?);
                        assert!((norm - want).abs() <= 1e-5 + 1e-3 * want, "{kernels:?} {name}: {norm} vs {want}");
                    }
                    assert_eq!(f.grad_norms.len(), 3 * 2 * 7, "A, B and E of every layer");
                }
                for (name, g) in &grads {
                    let var = &vars[name];
                    var.set(&(var.as_tensor() - (g * f.lr)?)?)?;
                }
                run.after_step(&grads, vars, step)?;
            }
            let ranks = run.ranks();
            for (layer, keep) in &f.rank_pattern {
                let kept = keep.iter().filter(|k| **k).count();
                assert_eq!(ranks["intent"].get(layer), Some(&kept), "{kernels:?} {layer}: {ranks:?}");
            }
            for (name, want) in &f.final_e {
                let got = vars[name].as_tensor().flatten_all()?.to_vec1::<f32>()?;
                for (x, y) in got.iter().zip(want) {
                    assert!(
                        (x - y).abs() < 1e-4 + 1e-3 * y.abs() && ((*x == 0.0) == (*y == 0.0)),
                        "{kernels:?} {name}: {got:?} vs {want:?}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The regulariser's value and gradients against torch's (PEFT's formula) at the first step's weights.
    #[test]
    fn orthogonal_regularizer_matches_peft() -> Result<()> {
        let f = fixture();
        let r = f.settings["init_r"] as usize;
        let names: Vec<&String> = f.shapes.keys().collect();
        let var = |key: String, rows: usize| -> Result<candle_core::Var> {
            let v = &f.orth.at[&key];
            let t = Tensor::from_slice(v, (rows, v.len() / rows), &candle_core::Device::Cpu)?;
            Ok(candle_core::Var::from_tensor(&t)?)
        };
        let a: Vec<candle_core::Var> = names.iter().map(|n| var(format!("{n}.A"), r)).collect::<Result<_>>()?;
        let b: Vec<candle_core::Var> =
            names.iter().map(|n| var(format!("{n}.B"), f.shapes[n.as_str()][1])).collect::<Result<_>>()?;
        let a_t: Vec<&Tensor> = a.iter().map(|v| v.as_tensor()).collect();
        let b_t: Vec<&Tensor> = b.iter().map(|v| v.as_tensor()).collect();
        let value = orthogonal_regularizer(&a_t, &b_t)?.expect("matrices");
        let got = f64::from(value.to_scalar::<f32>()?);
        assert!((got - f.orth.value).abs() < 1e-5 * f.orth.value, "{got} vs {}", f.orth.value);
        let grads = value.backward()?;
        for (n, (va, vb)) in names.iter().zip(a.iter().zip(&b)) {
            for (kind, v) in [("A", va), ("B", vb)] {
                let g = grads.get(v.as_tensor()).expect("a gradient").flatten_all()?.to_vec1::<f32>()?;
                let want = &f.orth.grads[&format!("{n}.{kind}")];
                for (x, y) in g.iter().zip(want) {
                    assert!((x - y).abs() < 1e-5 + 1e-4 * y.abs(), "{n}.{kind}: {x} vs {y}");
                }
            }
        }
        Ok(())
    }
}
