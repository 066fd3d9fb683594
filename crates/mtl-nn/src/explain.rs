//! Attributions of one head's output to the input tokens, on the word embeddings: integrated gradients
//! (Sundararajan et al., 2017) and gradient × input, as Captum's `LayerIntegratedGradients` and
//! `LayerGradientXActivation` compute them on transformers' `embeddings.word_embeddings`. Position and
//! token-type embeddings stay as they are; the path runs from a baseline's word embeddings (the padding
//! token's for every token but the special ones, by default) to the input's, over Gauss–Legendre points
//! (Captum's default method).
//!
//! The output explained is one scalar of one example (a class probability, a value, a tag's probability at
//! one word, an answer's start or end probability). Every path point is one row of a batch: one forward and
//! one backward pass per chunk of rows, dropout off, f32 throughout.

use candle_core::{Tensor, Var, D};
use mtl_core::{HostBatch, Mode, TaskId};

use crate::{MultiTaskModel, NnError, Result};

/// The scalar of a head's output that an attribution explains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Output {
    /// The softmax probability of class `0` (classification).
    Class(u32),
    /// The sigmoid probability of label `0` (multi-label).
    Label(u32),
    /// Regression output `0`, in the scaled space the head was trained in.
    Value(usize),
    /// The softmax probability of tag `tag` at token `position` (a word's first sub-token); a CRF head's
    /// emissions, without its transitions.
    Tag { position: usize, tag: u32 },
    /// The probability that the answer starts at token `0` (softmax over the sequence's tokens).
    Start(usize),
    /// The probability that the answer ends at token `0`.
    End(usize),
}

/// Where the path of integrated gradients starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Baseline {
    /// The word embeddings of these token ids (one per input token).
    Tokens(Vec<u32>),
    /// All-zero word embeddings.
    Zero,
}

/// How integrated gradients are computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Points on the path (Captum's `n_steps`).
    pub steps: usize,
    /// At most this many tokens (rows × sequence length) in one forward pass.
    pub max_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self { steps: 50, max_tokens: 4096 }
    }
}

/// The attributions of one output, per input token (special tokens included).
#[derive(Clone, Debug, PartialEq)]
pub struct Attribution {
    /// Integrated gradients: `(x − x') · Σ_k w_k ∂F/∂x(x' + α_k (x − x'))`, summed over the embedding width.
    pub integrated: Vec<f32>,
    /// Gradient × input: `x · ∂F/∂x(x)`, summed over the embedding width.
    pub gradient_input: Vec<f32>,
    /// `F(x)`.
    pub output: f32,
    /// `F(x')`.
    pub baseline_output: f32,
    /// `Σ integrated − (F(x) − F(x'))`, Captum's convergence delta: zero for exact integration.
    pub delta: f32,
}

/// Gauss–Legendre points and weights on `[0, 1]` (NumPy's `leggauss(n)` mapped there, as Captum maps it).
pub fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut points = vec![0.0; n];
    let mut weights = vec![0.0; n];
    for i in 0..n.div_ceil(2) {
        // Newton's method on P_n from Tricomi's approximation of the i-th root.
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut derivative = 0.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, x);
            for k in 2..=n {
                let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
                p0 = p1;
                p1 = p2;
            }
            derivative = n as f64 * (x * p1 - p0) / (x * x - 1.0);
            let step = p1 / derivative;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        let w = 2.0 / ((1.0 - x * x) * derivative * derivative);
        // Roots come from the largest down; the points go in increasing order.
        points[i] = -x;
        points[n - 1 - i] = x;
        weights[i] = w;
        weights[n - 1 - i] = w;
    }
    (points.iter().map(|x| 0.5 * (1.0 + x)).collect(), weights.iter().map(|w| 0.5 * w).collect())
}

/// The attributions of each of `outputs` of `task` on the one example of `example` (a batch of one, no
/// padding). The model must run dropout-free in training mode (build it with dropout 0 and, for LoRA,
/// LoRA dropout 0): gradients need the training pass, and its randomness would make the attributions
/// random.
pub fn attribute(
    model: &MultiTaskModel,
    example: &HostBatch,
    task: &TaskId,
    outputs: &[Output],
    baseline: &Baseline,
    settings: &Settings,
) -> Result<Vec<Attribution>> {
    if example.batch != 1 {
        return Err(NnError::Input(format!("explains one example at a time, got a batch of {}", example.batch)));
    }
    if settings.steps == 0 {
        return Err(NnError::Input("integrated gradients need at least one step".into()));
    }
    let seq = example.seq;
    let input = model.word_embeddings(example)?.squeeze(0)?; // [seq, width]
    let base = match baseline {
        Baseline::Zero => input.zeros_like()?,
        Baseline::Tokens(ids) if ids.len() == seq => {
            model.word_embeddings(&HostBatch { input_ids: ids.clone(), ..example.clone() })?.squeeze(0)?
        }
        Baseline::Tokens(ids) => {
            return Err(NnError::Input(format!("a baseline of {} tokens for an input of {seq}", ids.len())))
        }
    };
    let difference = (&input - &base)?;
    // Rows: the input, the baseline, then the path's points.
    let (points, weights) = gauss_legendre(settings.steps);
    let alphas: Vec<f64> = [1.0, 0.0].into_iter().chain(points.iter().copied()).collect();
    let chunk = (settings.max_tokens / seq.max(1)).max(1);
    outputs
        .iter()
        .map(|&output| {
            let mut values = Vec::with_capacity(alphas.len());
            let mut integrated = vec![0f64; seq];
            let mut gradient_input = vec![0f32; seq];
            for (c, rows) in alphas.chunks(chunk).enumerate() {
                let n = rows.len();
                let path: Vec<Tensor> = rows
                    .iter()
                    .map(|&a| (&base + (&difference * a)?)?.unsqueeze(0))
                    .collect::<candle_core::Result<_>>()?;
                let words = Var::from_tensor(&Tensor::cat(&path, 0)?)?;
                let batch = repeat(example, n);
                let hidden = model.encode_words(task, &batch, words.as_tensor(), Mode::Train)?;
                let logits = model.head_logits(task, &hidden, &batch, Mode::Train)?;
                let scalar = select(&logits, output)?; // [n]
                values.extend(scalar.to_vec1::<f32>()?);
                let grads = model.backward(&scalar.sum_all()?)?;
                let grad = grads
                    .get(words.as_tensor())
                    .ok_or_else(|| NnError::Unsupported("the output does not depend on the input".into()))?;
                let start = c * chunk;
                for r in 0..n {
                    let g = grad.get(r)?; // [seq, width]
                    match start + r {
                        0 => gradient_input = (&g * &input)?.sum(D::Minus1)?.to_vec1::<f32>()?,
                        1 => {}
                        k => {
                            let w = weights[k - 2];
                            let a = (&g * &difference)?.sum(D::Minus1)?.to_vec1::<f32>()?;
                            for (acc, v) in integrated.iter_mut().zip(a) {
                                *acc += w * f64::from(v);
                            }
                        }
                    }
                }
            }
            let integrated: Vec<f32> = integrated.into_iter().map(|v| v as f32).collect();
            let (output, baseline_output) = (values[0], values[1]);
            let delta = integrated.iter().map(|&v| f64::from(v)).sum::<f64>() - f64::from(output - baseline_output);
            Ok(Attribution { integrated, gradient_input, output, baseline_output, delta: delta as f32 })
        })
        .collect()
}

/// `example` (a batch of one) repeated `n` times, without targets.
fn repeat(example: &HostBatch, n: usize) -> HostBatch {
    let times = |v: &[u32]| v.iter().copied().cycle().take(v.len() * n).collect::<Vec<u32>>();
    HostBatch {
        batch: n,
        seq: example.seq,
        input_ids: times(&example.input_ids),
        token_type_ids: times(&example.token_type_ids),
        attention_mask: times(&example.attention_mask),
        word_starts: vec![example.word_starts.first().cloned().unwrap_or_default(); n],
        targets: Default::default(),
    }
}

/// The explained scalar of each row of `logits` (`[n, outputs]` or `[n, seq, outputs]`), `[n]`.
fn select(logits: &Tensor, output: Output) -> Result<Tensor> {
    let column = |t: &Tensor, i: usize| -> Result<Tensor> {
        let width = t.dim(D::Minus1)?;
        if i >= width {
            return Err(NnError::Input(format!("output {i} of a head with {width}")));
        }
        Ok(t.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1)?)
    };
    let at = |t: &Tensor, position: usize| -> Result<Tensor> {
        let seq = t.dim(1)?;
        if position >= seq {
            return Err(NnError::Input(format!("token {position} of a sequence of {seq}")));
        }
        Ok(t.narrow(1, position, 1)?.squeeze(1)?)
    };
    match output {
        Output::Class(c) => column(&crate::layers::softmax_last(logits)?, c as usize),
        Output::Label(l) => {
            let x = column(logits, l as usize)?;
            Ok((x.neg()?.exp()? + 1.0)?.recip()?)
        }
        Output::Value(i) => column(logits, i),
        Output::Tag { position, tag } => column(&crate::layers::softmax_last(&at(logits, position)?)?, tag as usize),
        Output::Start(p) | Output::End(p) => {
            let side = usize::from(matches!(output, Output::End(_)));
            let scores = column(logits, side)?; // [n, seq]
            column(&crate::layers::softmax_last(&scores)?, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::Device;
    use mtl_core::TaskKind;
    use serde_json::Value;

    use super::*;
    use crate::tests::{canonical_weights, fixture_dir, json_tensor};
    use crate::{BertConfig, HeadSpec, Kernels, ModelSpec};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    fn kind(name: &str) -> TaskKind {
        match name {
            "classification" => TaskKind::Classification,
            "multi_label" => TaskKind::MultiLabel,
            "regression" => TaskKind::Regression,
            "token_classification" => TaskKind::TokenClassification,
            _ => TaskKind::QuestionAnswering,
        }
    }

    fn output(explained: &Value) -> Output {
        let n = |k: &str| explained[k].as_u64().map(|v| v as usize);
        match (n("class"), n("label"), n("value"), n("tag"), n("start"), n("end")) {
            (Some(c), ..) => Output::Class(c as u32),
            (_, Some(l), ..) => Output::Label(l as u32),
            (_, _, Some(v), ..) => Output::Value(v),
            (_, _, _, Some(tag), ..) => Output::Tag { position: n("position").unwrap_or(0), tag: tag as u32 },
            (.., Some(s), _) => Output::Start(s),
            (.., Some(e)) => Output::End(e),
            _ => panic!("unknown output {explained}"),
        }
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
    }

    /// Integrated gradients and gradient × input agree with Captum's (tests/fixtures/tiny-bert/explain.json,
    /// from `scripts/make_fixtures.py explain`) for a head of every encoder task kind, on the fused and the
    /// composed encoder; the attributions add up to the output's change from the baseline.
    #[test]
    fn attributions_match_captum_for_every_task_kind() -> TestResult {
        let dir = fixture_dir();
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("explain.json"))?)?;
        let cases = fixture["cases"].as_array().ok_or("cases")?;
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let mut weights = canonical_weights(&dir.join("model.safetensors"))?;
        let mut tasks = BTreeMap::new();
        for case in cases {
            let task = case["task"].as_str().ok_or("task")?;
            weights.insert(format!("heads.{task}.weight"), json_tensor(&case["weight"])?);
            weights.insert(format!("heads.{task}.bias"), json_tensor(&case["bias"])?);
            let outputs = case["outputs"].as_u64().ok_or("outputs")? as usize;
            tasks.insert(TaskId::new(task)?, HeadSpec::new(kind(case["kind"].as_str().ok_or("kind")?), outputs));
        }
        let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None };
        let mut model = MultiTaskModel::build(&spec, weights, &Device::Cpu)?;
        let settings = Settings { steps: fixture["n_steps"].as_u64().ok_or("n_steps")? as usize, max_tokens: 64 };
        for kernels in [Kernels::Fused, Kernels::Composed] {
            model.set_kernels(kernels);
            for case in cases {
                let task = TaskId::new(case["task"].as_str().ok_or("task")?)?;
                let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone())?;
                let types: Vec<u32> = serde_json::from_value(case["token_type_ids"].clone())?;
                let baseline: Vec<u32> = serde_json::from_value(case["baseline_ids"].clone())?;
                let example = HostBatch {
                    batch: 1,
                    seq: ids.len(),
                    attention_mask: vec![1; ids.len()],
                    input_ids: ids,
                    token_type_ids: types,
                    word_starts: vec![vec![]],
                    targets: BTreeMap::new(),
                };
                let what = format!("{task} ({kernels:?})");
                let got = attribute(
                    &model,
                    &example,
                    &task,
                    &[output(&case["explained"])],
                    &Baseline::Tokens(baseline),
                    &settings,
                )?;
                let got = &got[0];
                let mut worst = Vec::new();
                for (name, ours, theirs) in [
                    ("integrated gradients", &got.integrated, floats(&case["integrated_gradients"])),
                    ("gradient x input", &got.gradient_input, floats(&case["gradient_x_input"])),
                ] {
                    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
                    assert!(scale > 1e-5, "{what}: {name} attributions too small to compare");
                    let mut largest = 0f64;
                    for (a, b) in ours.iter().zip(&theirs) {
                        let err = (f64::from(*a) - b).abs();
                        assert!(err <= 5e-5 * scale + 1e-9, "{what}: {name} {ours:?} vs Captum's {theirs:?}");
                        largest = largest.max(err / scale);
                    }
                    worst.push(largest);
                }
                for (name, ours, theirs) in [
                    ("output", got.output, &case["output"]),
                    ("baseline output", got.baseline_output, &case["baseline_output"]),
                ] {
                    let theirs = theirs.as_f64().ok_or("output")?;
                    assert!((f64::from(ours) - theirs).abs() < 1e-4 * theirs.abs().max(1.0), "{what}: {name}");
                }
                // Completeness: within 1% of the output's change (Captum's own delta is of this size too).
                let change = f64::from(got.output - got.baseline_output).abs();
                assert!(f64::from(got.delta.abs()) <= 1e-2 * change + 1e-6, "{what}: delta {}", got.delta);
                // The table of BENCHMARKS.md (`cargo test -p mtl-nn --release explain -- --nocapture`).
                println!(
                    "{what:<32} {:<22} IG vs Captum {:.1e}  grad×input vs Captum {:.1e}  delta {:+.1e} (Captum {:+.1e}) of change {:.1e}",
                    case["kind"].as_str().unwrap_or(""),
                    worst[0],
                    worst[1],
                    got.delta,
                    case["delta"].as_f64().unwrap_or(f64::NAN),
                    change
                );
            }
        }
        Ok(())
    }

    /// NumPy's `leggauss(5)` on [0, 1].
    #[test]
    fn gauss_legendre_matches_numpy() {
        let (x, w) = gauss_legendre(5);
        let want_x = [0.046910077030668, 0.230765344947158, 0.5, 0.769234655052841, 0.953089922969332];
        let want_w = [0.118463442528095, 0.239314335249683, 0.284444444444444, 0.239314335249683, 0.118463442528095];
        for (a, b) in x.iter().zip(want_x).chain(w.iter().zip(want_w)) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let (x, w) = gauss_legendre(50);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(x.windows(2).all(|p| p[0] < p[1]));
        // Exact for polynomials of degree 2n − 1: ∫ t^7 = 1/8.
        assert!((x.iter().zip(&w).map(|(t, w)| w * t.powi(7)).sum::<f64>() - 0.125).abs() < 1e-12);
    }
}
