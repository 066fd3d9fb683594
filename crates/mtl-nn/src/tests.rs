//! Tests of the encoder against transformers, on the tiny random model of `tests/fixtures/tiny-bert`
//! (made by `scripts/make_fixtures.py`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, Mode, Targets, TaskId, TaskKind, IGNORE_INDEX};
use serde_json::Value;

use crate::{BertConfig, HeadSpec, Kernels, ModelSpec, MultiTaskModel, NnError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

pub(crate) fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert")
}

pub(crate) fn reference() -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("reference.json"))?)?)
}

fn rows_u32(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .expect("fixture rows")
        .iter()
        .map(|r| r.as_array().expect("fixture row").iter().map(|x| x.as_u64().expect("int") as u32).collect())
        .collect()
}

pub(crate) fn batch_from(reference: &Value) -> HostBatch {
    let ids = rows_u32(&reference["input_ids"]);
    let mask = rows_u32(&reference["attention_mask"]);
    let (batch, seq) = (ids.len(), ids[0].len());
    HostBatch {
        batch,
        seq,
        input_ids: ids.concat(),
        token_type_ids: vec![0; batch * seq],
        attention_mask: mask.concat(),
        word_starts: vec![vec![]; batch],
        targets: BTreeMap::new(),
    }
}

fn tiny_model(tasks: &[(&str, TaskKind, usize)], dropout: f32) -> Result<MultiTaskModel, NnError> {
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let tasks: BTreeMap<TaskId, HeadSpec> =
        tasks.iter().map(|(n, k, c)| (TaskId::new(*n).expect("valid name"), HeadSpec::new(*k, *c))).collect();
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout, seed: 1, peft: None };
    MultiTaskModel::load(&spec, &fixture_dir().join("model.safetensors"), false, &Device::Cpu)
}

#[test]
fn hidden_states_match_transformers() -> TestResult {
    let reference = reference()?;
    let model = tiny_model(&[], 0.1)?;
    let batch = batch_from(&reference);
    let hidden = model.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?;
    let expected: Vec<Vec<Vec<f64>>> = serde_json::from_value(reference["last_hidden_state"].clone())?;
    let mut max_diff = 0f64;
    for (row, want) in hidden.iter().zip(expected.iter().flatten()) {
        for (a, b) in row.iter().zip(want) {
            max_diff = max_diff.max((f64::from(*a) - b).abs());
        }
    }
    assert!(max_diff < 1e-4, "max abs difference {max_diff}");
    Ok(())
}

/// In evaluation the embeddings are summed and normalised in one pass, from the table or from given word rows
/// (integrated gradients' input): both equal the graph training builds, with dropout off.
#[test]
fn evaluation_embeddings_equal_the_training_graph() -> TestResult {
    let reference = reference()?;
    let model = tiny_model(&[("intent", TaskKind::Classification, 3)], 0.0)?;
    let batch = batch_from(&reference);
    let task = TaskId::new("intent")?;
    let words = model.word_embeddings(&batch)?;
    let train = model.encode(&batch, Mode::Train)?;
    let outputs = [model.encode(&batch, Mode::Eval)?, model.encode_words(&task, &batch, &words, Mode::Eval)?];
    for (what, eval) in ["table", "rows"].into_iter().zip(outputs) {
        let diff = (&eval - &train)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{what}: evaluation differs from training by {diff}");
    }
    Ok(())
}

#[test]
fn loss_and_gradients_match_pytorch() -> TestResult {
    head_loss_and_gradients_match(&fixture_dir(), "tiny-bert")
}

/// A reference's vector or matrix (a JSON list, or a list of lists) as a tensor.
pub(crate) fn json_tensor(value: &Value) -> Result<Tensor, Box<dyn std::error::Error>> {
    Ok(match value.as_array().and_then(|rows| rows.first()).is_some_and(Value::is_array) {
        true => Tensor::new(serde_json::from_value::<Vec<Vec<f32>>>(value.clone())?, &Device::Cpu)?,
        false => Tensor::new(serde_json::from_value::<Vec<f32>>(value.clone())?, &Device::Cpu)?,
    })
}

/// A safetensors file's tensors under the encoder's names ([`crate::canonical_name`]).
pub(crate) fn canonical_weights(path: &std::path::Path) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?
        .into_iter()
        .map(|(k, v)| (crate::canonical_name(&k), v))
        .collect())
}

/// The fixture in `dir` (its weights under the encoder's names) with its reference's classification head on the
/// first token: the cross-entropy loss and every backbone gradient's norm are PyTorch's.
fn head_loss_and_gradients_match(dir: &std::path::Path, what: &str) -> TestResult {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let mut weights = canonical_weights(&dir.join("model.safetensors"))?;
    let head = &reference["head"];
    let w: Vec<Vec<f32>> = serde_json::from_value(head["weight"].clone())?;
    let b: Vec<f32> = serde_json::from_value(head["bias"].clone())?;
    weights.insert("heads.cls.weight".into(), Tensor::new(w, &Device::Cpu)?);
    weights.insert("heads.cls.bias".into(), Tensor::new(b, &Device::Cpu)?);
    // ModernBERT's prediction head before the classifier.
    let prediction = head["prediction"].as_object().cloned().unwrap_or_default();
    for (name, value) in &prediction {
        weights.insert(format!("heads.cls.head.{name}"), json_tensor(value)?);
    }
    let task = TaskId::new("cls")?;
    let tasks = BTreeMap::from([(task.clone(), HeadSpec::new(TaskKind::Classification, 3))]);
    let model = MultiTaskModel::build(
        &ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None },
        weights,
        &Device::Cpu,
    )?;
    let mut batch = batch_from(&reference);
    let labels: Vec<i64> = serde_json::from_value(head["labels"].clone())?;
    batch.targets.insert(task, Targets::Class(labels));
    let losses = model.losses(&batch, Mode::Train)?;
    let loss = &losses[0].loss;
    let want = head["loss"].as_f64().ok_or("loss")?;
    assert!((f64::from(loss.to_scalar::<f32>()?) - want).abs() < 1e-5, "{what}: loss");
    let grads = model.backward(loss)?;
    let norms = reference["grad_norms"].as_object().ok_or("grad norms")?;
    let head_params = 2 + prediction.len();
    assert_eq!(norms.len(), model.params().vars().len() - head_params, "{what}: every backbone parameter is compared");
    for (name, want) in norms {
        let ours = crate::canonical_name(name);
        let var = model.params().vars().get(&ours).ok_or_else(|| format!("{what}: no parameter {ours}"))?;
        let got = grads.get(var.as_tensor()).map(|g| g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()).transpose()?;
        let got = f64::from(got.unwrap_or(0.0));
        let want = want.as_f64().ok_or("norm")?;
        assert!((got - want).abs() <= 1e-4 + 1e-3 * want, "{what} {name}: gradient norm {got}, PyTorch {want}");
    }
    Ok(())
}

#[test]
fn every_parameter_gets_a_gradient_in_training() -> TestResult {
    let reference = reference()?;
    let model =
        tiny_model(&[("intent", TaskKind::Classification, 3), ("slots", TaskKind::TokenClassification, 5)], 0.1)?;
    let mut batch = batch_from(&reference);
    batch.targets.insert(TaskId::new("intent")?, Targets::Class(vec![1, 2]));
    let mut tags = vec![IGNORE_INDEX; batch.batch * batch.seq];
    for (i, t) in [(1, 1), (2, 3), (8, 4), (9, 0)] {
        tags[i] = t;
    }
    batch.targets.insert(TaskId::new("slots")?, Targets::Tokens(tags));
    let losses = model.losses(&batch, Mode::Train)?;
    assert_eq!(losses.len(), 2);
    let total = losses.iter().map(|l| l.loss.clone()).reduce(|a, b| (a + b).expect("add")).expect("two losses");
    let grads = model.backward(&total)?;
    for (name, var) in model.params().vars() {
        let g = grads.get(var.as_tensor()).ok_or_else(|| format!("{name}: no gradient"))?;
        let norm = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    Ok(())
}

/// A model with a head of every kind (a CRF on the tagger, Huber loss on the regression) and a batch with
/// targets for all of them.
fn all_heads(dropout: f32) -> Result<(MultiTaskModel, HostBatch), Box<dyn std::error::Error>> {
    let reference = reference()?;
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let mut reg = HeadSpec::new(TaskKind::Regression, 2);
    reg.regression_loss = crate::RegressionLoss::Huber(0.5);
    let mut tok = HeadSpec::new(TaskKind::TokenClassification, 3);
    let mut constraints = crate::Transitions::all(3);
    constraints.allowed[2] = false; // tag 2 may not follow tag 0 (O → I-X)
    tok.crf = Some(constraints);
    let tasks = BTreeMap::from([
        (TaskId::new("cls")?, HeadSpec::new(TaskKind::Classification, 3)),
        (TaskId::new("ml")?, HeadSpec::new(TaskKind::MultiLabel, 4)),
        (TaskId::new("reg")?, reg),
        (TaskId::new("tok")?, tok),
        (TaskId::new("qa")?, HeadSpec::new(TaskKind::QuestionAnswering, 0)),
    ]);
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout, seed: 3, peft: None };
    let model = MultiTaskModel::load(&spec, &fixture_dir().join("model.safetensors"), false, &Device::Cpu)?;
    let mut batch = batch_from(&reference);
    let seq = batch.seq;
    batch.targets.insert(TaskId::new("cls")?, Targets::Class(vec![1, IGNORE_INDEX]));
    batch.targets.insert(
        TaskId::new("ml")?,
        Targets::Dense { width: 4, values: vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0], present: vec![true, true] },
    );
    batch.targets.insert(
        TaskId::new("reg")?,
        Targets::Dense { width: 2, values: vec![0.3, -2.0, 1.5, 0.1], present: vec![true, true] },
    );
    let mut tags = vec![IGNORE_INDEX; 2 * seq];
    for (i, t) in [(1, 1), (2, 2), (3, 0), (seq + 1, 0), (seq + 2, 1), (seq + 4, 2), (seq + 5, 0)] {
        tags[i] = t;
    }
    batch.targets.insert(TaskId::new("tok")?, Targets::Tokens(tags));
    batch.targets.insert(TaskId::new("qa")?, Targets::Span { start: vec![2, 0], end: vec![3, 0] });
    batch.word_starts = vec![vec![Some(1), Some(2), Some(3)], vec![Some(1), Some(2), Some(4), Some(5)]];
    Ok((model, batch))
}

#[test]
fn every_head_kind_trains_every_parameter() -> TestResult {
    let (model, batch) = all_heads(0.1)?;
    let losses = model.losses(&batch, Mode::Train)?;
    assert_eq!(losses.len(), 5);
    let total = losses.iter().map(|l| l.loss.clone()).reduce(|a, b| (a + b).expect("add")).expect("losses");
    let grads = model.backward(&total)?;
    for (name, var) in model.params().vars() {
        let g = grads.get(var.as_tensor()).ok_or_else(|| format!("{name}: no gradient"))?;
        let norm = g.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    assert!(model.params().vars().contains_key("heads.tok.crf.transitions"));
    Ok(())
}

/// With the graph retained, each task's loss runs its own backward pass, and the per-task gradients add up
/// to the gradient of the summed loss.
#[test]
fn per_task_backward_passes_add_up_to_the_joint_one() -> TestResult {
    let (model, batch) = all_heads(0.1)?;
    model.set_retain_graph(true);
    let losses = model.losses(&batch, Mode::Train)?;
    let per_task: Vec<_> = losses.iter().map(|l| model.backward(&l.loss)).collect::<Result<_, _>>()?;
    let total = losses.iter().map(|l| l.loss.clone()).reduce(|a, b| (a + b).expect("add")).expect("losses");
    let joint = model.backward(&total)?;
    model.set_retain_graph(false);
    for (name, var) in model.params().vars() {
        let want = joint.get(var.as_tensor()).ok_or_else(|| format!("{name}: no joint gradient"))?;
        let mut sum = want.zeros_like()?;
        for grads in &per_task {
            if let Some(g) = grads.get(var.as_tensor()) {
                sum = (sum + g)?;
            }
        }
        let err = (sum - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err <= 1e-5 * (1.0 + scale), "{name}: per-task sum off by {err}");
    }
    Ok(())
}

#[test]
fn head_losses_match_their_definitions() -> TestResult {
    let (model, batch) = all_heads(0.0)?;
    let losses: BTreeMap<String, f64> = model
        .losses(&batch, Mode::Eval)?
        .iter()
        .map(|l| Ok((l.task.to_string(), f64::from(l.loss.to_scalar::<f32>()?))))
        .collect::<Result<_, NnError>>()?;
    let hidden = model.encode(&batch, Mode::Eval)?;
    let seq = batch.seq;
    let logits = |task: &str, rows: &[u32]| -> Result<Vec<Vec<f64>>, NnError> {
        let head = &model.heads()[&TaskId::new(task).expect("valid")];
        let l = head.forward(&hidden, rows, &crate::DropoutRng::new(0.0, 0), Mode::Eval)?.logits.to_vec2::<f32>()?;
        Ok(l.into_iter().map(|r| r.into_iter().map(f64::from).collect()).collect())
    };
    let cls = [0u32, seq as u32];
    // BCEWithLogitsLoss (mean over all elements).
    let y = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
    let x = logits("ml", &cls)?;
    let mut bce = 0.0;
    for (xr, yr) in x.iter().zip(y) {
        for (x, y) in xr.iter().zip(yr) {
            let p = 1.0 / (1.0 + (-x).exp());
            bce -= y * p.ln() + (1.0 - y) * (1.0 - p).ln();
        }
    }
    assert!((losses["ml"] - bce / 8.0).abs() < 1e-5, "bce {} vs {}", losses["ml"], bce / 8.0);
    // HuberLoss(delta = 0.5), mean.
    let y = [[0.3, -2.0], [1.5, 0.1]];
    let x = logits("reg", &cls)?;
    let mut huber = 0.0;
    for (xr, yr) in x.iter().zip(y) {
        for (x, y) in xr.iter().zip(yr) {
            let d = (x - y).abs();
            huber += if d <= 0.5 { 0.5 * d * d } else { 0.5 * (d - 0.25) };
        }
    }
    assert!((losses["reg"] - huber / 4.0).abs() < 1e-5, "huber {} vs {}", losses["reg"], huber / 4.0);
    // QA: mean of start and end cross-entropy over each example's real tokens.
    let rows: Vec<u32> = (0..2 * seq as u32).collect();
    let x = logits("qa", &rows)?;
    let mut qa = 0.0;
    for (b, (s, e)) in [(2usize, 3usize), (0, 0)].into_iter().enumerate() {
        let len = batch.attention_mask[b * seq..(b + 1) * seq].iter().filter(|&&m| m == 1).count();
        for (k, gold) in [(0, s), (1, e)] {
            let col: Vec<f64> = (0..len).map(|p| x[b * seq + p][k]).collect();
            let lse = col.iter().map(|v| v.exp()).sum::<f64>().ln();
            qa += (lse - col[gold]) / 4.0;
        }
    }
    assert!((losses["qa"] - qa).abs() < 1e-4, "qa {} vs {}", losses["qa"], qa);
    Ok(())
}

#[test]
fn crf_decoding_respects_constraints() -> TestResult {
    let (model, batch) = all_heads(0.0)?;
    let predictions = model.predict(&batch)?;
    let crate::TaskPrediction::Tags(tags) = &predictions[&TaskId::new("tok")?] else { panic!("tags expected") };
    assert_eq!(tags.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 4]);
    for row in tags {
        let row: Vec<u32> = row.iter().map(|t| t.expect("no truncation")).collect();
        assert!(row.windows(2).all(|w| !(w[0] == 0 && w[1] == 2)), "forbidden transition in {row:?}");
    }
    let crate::TaskPrediction::Spans { start, .. } = &predictions[&TaskId::new("qa")?] else {
        panic!("spans expected")
    };
    assert_eq!(start[0].len(), 5, "padding is cut off");
    Ok(())
}

#[test]
fn dropout_is_active_in_training_only_and_seeded() -> TestResult {
    let reference = reference()?;
    let batch = batch_from(&reference);
    let model = tiny_model(&[], 0.1)?;
    let eval_a = model.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?;
    let eval_b = model.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?;
    assert_eq!(eval_a, eval_b, "evaluation is deterministic");
    let train_a = model.encode(&batch, Mode::Train)?.to_vec2::<f32>()?;
    assert_ne!(train_a, eval_a, "dropout changes the training forward pass");
    let train_b = model.encode(&batch, Mode::Train)?.to_vec2::<f32>()?;
    assert_ne!(train_a, train_b, "each training pass draws a new mask");
    let again = tiny_model(&[], 0.1)?;
    assert_eq!(again.encode(&batch, Mode::Train)?.to_vec2::<f32>()?, train_a, "the same seed gives the same masks");
    Ok(())
}

#[test]
fn missing_backbone_tensors_are_reported() -> TestResult {
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let tasks = BTreeMap::new();
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.1, seed: 0, peft: None };
    let dir = std::env::temp_dir().join(format!("mtl-nn-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    let mut weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    weights.remove("encoder.layer.1.output.dense.weight");
    candle_core::safetensors::save(&weights, &path)?;
    let err = MultiTaskModel::load(&spec, &path, false, &Device::Cpu).err().ok_or("load must fail")?;
    assert!(err.to_string().contains("encoder.layer.1.output.dense.weight"), "{err}");
    let err =
        MultiTaskModel::load(&spec, &dir.join("nope.safetensors"), false, &Device::Cpu).err().ok_or("must fail")?;
    assert!(err.to_string().contains("nope.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The fused encoder and the composed path (candle autograd) agree on hidden states, losses and every
/// parameter's gradient: in training with dropout (the two draw the same masks from the same seed), with
/// padding and with a fully padded example, and in evaluation.
#[test]
fn fused_encoder_matches_composed_path() -> TestResult {
    let reference = reference()?;
    let mut batch = batch_from(&reference);
    // Add a fully padded third example, and labels for both heads.
    let seq = batch.seq;
    batch.input_ids.extend(std::iter::repeat_n(0, seq));
    batch.token_type_ids.extend(std::iter::repeat_n(0, seq));
    batch.attention_mask.extend(std::iter::repeat_n(0, seq));
    batch.word_starts.push(vec![]);
    batch.batch += 1;
    batch.targets.insert(TaskId::new("intent")?, Targets::Class(vec![1, 2, 0]));
    let tags: Vec<i64> =
        (0..batch.batch * seq).map(|i| if i % 3 == 0 { IGNORE_INDEX } else { (i % 5) as i64 }).collect();
    batch.targets.insert(TaskId::new("slots")?, Targets::Tokens(tags));
    let tasks = [("intent", TaskKind::Classification, 3), ("slots", TaskKind::TokenClassification, 5)];
    let diff =
        |a: &Tensor, b: &Tensor| -> Result<f32, candle_core::Error> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    for dropout in [0.0, 0.1] {
        let fused = tiny_model(&tasks, dropout)?;
        let mut composed = tiny_model(&tasks, dropout)?;
        composed.set_kernels(Kernels::Composed);
        for mode in [Mode::Eval, Mode::Train] {
            let (a, b) = (fused.encode(&batch, mode)?, composed.encode(&batch, mode)?);
            assert!(diff(&a, &b)? < 1e-5, "hidden states differ by {} (dropout {dropout}, {mode:?})", diff(&a, &b)?);
        }
        let total = |m: &MultiTaskModel| -> Result<Tensor, NnError> {
            let losses = m.losses(&batch, Mode::Train)?;
            Ok((&losses[0].loss + &losses[1].loss)?)
        };
        let (la, lb) = (total(&fused)?, total(&composed)?);
        assert!(diff(&la, &lb)? < 1e-5, "losses differ");
        let (ga, gb) = (fused.backward(&la)?, composed.backward(&lb)?);
        for (name, var) in fused.params().vars() {
            let other = &composed.params().vars()[name];
            let (a, b) = (
                ga.get(var.as_tensor()).ok_or(format!("{name}: no fused gradient"))?,
                gb.get(other.as_tensor()).ok_or(format!("{name}: no gradient"))?,
            );
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff(a, b)? <= 1e-4 * scale + 1e-7,
                "{name}: gradients differ by {} (scale {scale}, dropout {dropout})",
                diff(a, b)?
            );
        }
    }
    Ok(())
}

/// bf16 projections (AMX) stay close to f32: hidden states within bf16's rounding, and every parameter's
/// gradient pointing the same way (cosine above 0.999) at nearly the same size. Skipped without AMX.
#[test]
fn bf16_projections_stay_close_to_f32() -> TestResult {
    if !crate::cpu::amx::available() {
        eprintln!("skipped: this CPU or OS has no AMX bf16");
        return Ok(());
    }
    let reference = reference()?;
    let mut batch = batch_from(&reference);
    batch.targets.insert(TaskId::new("intent")?, Targets::Class(vec![1, 2]));
    let tags: Vec<i64> = (0..batch.batch * batch.seq).map(|i| (i % 5) as i64).collect();
    batch.targets.insert(TaskId::new("slots")?, Targets::Tokens(tags));
    let tasks = [("intent", TaskKind::Classification, 3), ("slots", TaskKind::TokenClassification, 5)];
    let f32_model = tiny_model(&tasks, 0.0)?;
    let mut bf16_model = tiny_model(&tasks, 0.0)?;
    bf16_model.set_precision(crate::Precision::Bf16);
    assert_eq!(bf16_model.bert().precision(), crate::Precision::Bf16);
    let (a, b) = (f32_model.encode(&batch, Mode::Eval)?, bf16_model.encode(&batch, Mode::Eval)?);
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "bf16 products change the hidden states");
    assert!(diff < 0.05, "bf16 hidden states differ by {diff}");
    let total = |m: &MultiTaskModel| -> Result<Tensor, NnError> {
        let losses = m.losses(&batch, Mode::Train)?;
        Ok((&losses[0].loss + &losses[1].loss)?)
    };
    let (la, lb) = (total(&f32_model)?, total(&bf16_model)?);
    let (ga, gb) = (f32_model.backward(&la)?, bf16_model.backward(&lb)?);
    for (name, var) in f32_model.params().vars() {
        let other = &bf16_model.params().vars()[name];
        let a = ga.get(var.as_tensor()).ok_or(format!("{name}: no f32 gradient"))?.flatten_all()?;
        let b = gb.get(other.as_tensor()).ok_or(format!("{name}: no bf16 gradient"))?.flatten_all()?;
        let dot = (&a * &b)?.sum_all()?.to_scalar::<f32>()?;
        let (na, nb) = (a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt(), b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt());
        // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared by a row of
        // scores): both engines give rounding noise, in unrelated directions.
        if name.ends_with("key.bias") {
            assert!(na < 1e-5 && nb < 1e-4, "{name}: gradient norms {na} and {nb}");
            continue;
        }
        let cosine = dot / (na * nb);
        assert!(cosine > 0.999, "{name}: gradient cosine {cosine}");
        assert!((na - nb).abs() <= 0.02 * na, "{name}: gradient norms {na} and {nb}");
    }
    Ok(())
}

/// Activations the fused encoder does not implement (it has the erf GELU) take the composed path on the CPU.
#[test]
fn other_activations_fall_back_to_the_composed_path() -> TestResult {
    let reference = reference()?;
    let batch = batch_from(&reference);
    let mut config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    config.hidden_act = crate::bert::Activation::GeluNew;
    let weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    let tasks = BTreeMap::new();
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None };
    let fused = MultiTaskModel::build(&spec, weights.clone(), &Device::Cpu)?;
    let mut composed = MultiTaskModel::build(&spec, weights, &Device::Cpu)?;
    composed.set_kernels(Kernels::Composed);
    assert_eq!(
        fused.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?,
        composed.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?
    );
    Ok(())
}

mod fused_encoder_properties {
    use super::*;
    use crate::{LoraSpec, PeftKind, PeftSpec};
    use mtl_core::LinearModule;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    /// A random tiny BERT with freshly initialised weights; with `relative`, MPNet's relative position bias in
    /// its attention (8 buckets, so that sequences of 10 reach the logarithmic ones).
    #[allow(clippy::too_many_arguments)]
    fn random_model(
        layers: usize,
        heads: usize,
        head_dim: usize,
        intermediate: usize,
        dropout: f32,
        seed: u64,
        peft: Option<&PeftSpec>,
        relative: bool,
    ) -> Result<MultiTaskModel, NnError> {
        let config = BertConfig {
            model_type: "bert".into(),
            pad_token_id: None,
            relative_attention_num_buckets: relative.then_some(8),
            vocab_size: 23,
            hidden_size: heads * head_dim,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: intermediate,
            hidden_act: crate::bert::Activation::Gelu,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            // LayerNorm over a handful of nearly equal values is ill-conditioned (1/σ explodes), and two exact
            // implementations then differ by rounding alone; a realistic eps keeps the comparison meaningful.
            layer_norm_eps: 1e-5,
            position_embedding_type: None,
            embedding_size: None,
            disentangled: None,
            modern: None,
        };
        let tasks = BTreeMap::from([
            (TaskId::new("tags").expect("valid"), HeadSpec::new(TaskKind::TokenClassification, 3)),
            (TaskId::new("more").expect("valid"), HeadSpec::new(TaskKind::TokenClassification, 3)),
        ]);
        let model = MultiTaskModel::build(
            &ModelSpec { bert: &config, tasks: &tasks, dropout, seed, peft },
            HashMap::new(),
            &Device::Cpu,
        )?;
        // BERT's initialisation (std 0.02) leaves attention almost uniform (and LoRA's B starts at zero), where the
        // key gradient nearly vanishes and an error in it would go unseen: use weights large enough for peaked
        // attention. Biases too (they start at zero), so that every one of them is used where it belongs.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
        for (name, var) in model.params().vars() {
            let range = match name {
                _ if name.ends_with("weight") && !name.contains("LayerNorm") => 0.6,
                _ if name.ends_with("bias") && !name.contains("LayerNorm") => 0.3,
                _ => continue,
            };
            let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.gen_range(-range..range)).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
        Ok(model)
    }

    /// With `lora` (rank, sites as bits of `LinearModule::ALL`), per-task adapters for the two tasks, whose
    /// examples the batch mixes; with `relative`, MPNet's position bias ([`random_model`]).
    #[allow(clippy::too_many_arguments)]
    fn check(
        batch: usize,
        seq: usize,
        layers: usize,
        heads: usize,
        head_dim: usize,
        intermediate: usize,
        dropout: f32,
        seed: u64,
        lora: Option<(usize, u8)>,
        relative: bool,
    ) -> TestResult {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut mask: Vec<u32> = (0..batch * seq).map(|_| u32::from(rng.gen_bool(0.8))).collect();
        if rng.gen_bool(0.5) {
            let b = rng.gen_range(0..batch);
            mask[b * seq..(b + 1) * seq].fill(0); // a fully padded example
        }
        let labels: Vec<i64> =
            (0..batch * seq).map(|_| if rng.gen_bool(0.2) { IGNORE_INDEX } else { rng.gen_range(0..3) }).collect();
        let mut targets = BTreeMap::from([(TaskId::new("tags")?, Targets::Tokens(labels.clone()))]);
        let peft = lora.map(|(r, sites)| PeftSpec {
            kind: PeftKind::Lora(LoraSpec {
                r,
                alpha: 2.0 * r as f64,
                dropout,
                targets: LinearModule::ALL
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| sites & (1 << i) != 0)
                    .map(|(_, m)| *m)
                    .collect(),
                svd: false,
            }),
            adapters: vec!["tags".into(), "more".into()],
        });
        if peft.is_some() {
            // Each example labelled for one of the two tasks (or, one time in four, both).
            let owner: Vec<u8> = (0..batch).map(|_| rng.gen_range(0..4)).collect();
            let keep = |task: u8| -> Vec<i64> {
                labels
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| if owner[i / seq] == task || owner[i / seq] == 3 { l } else { IGNORE_INDEX })
                    .collect()
            };
            targets = BTreeMap::from([
                (TaskId::new("tags")?, Targets::Tokens(keep(0))),
                (TaskId::new("more")?, Targets::Tokens(keep(1))),
            ]);
        }
        let hb = HostBatch {
            batch,
            seq,
            input_ids: (0..batch * seq).map(|_| rng.gen_range(0..23)).collect(),
            token_type_ids: (0..batch * seq).map(|_| rng.gen_range(0..2)).collect(),
            attention_mask: mask,
            word_starts: vec![vec![]; batch],
            targets,
        };
        let fused = random_model(layers, heads, head_dim, intermediate, dropout, seed, peft.as_ref(), relative)?;
        let mut composed = random_model(layers, heads, head_dim, intermediate, dropout, seed, peft.as_ref(), relative)?;
        if !fused.bert().runs_fused() {
            return Err("the model does not run the fused encoder".into());
        }
        composed.set_kernels(Kernels::Composed);
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32, candle_core::Error> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        if peft.is_none() {
            let (a, b) = (fused.encode(&hb, Mode::Train)?, composed.encode(&hb, Mode::Train)?);
            if diff(&a, &b)? > 1e-4 {
                return Err(format!("hidden states differ by {}", diff(&a, &b)?).into());
            }
        }
        let loss = |m: &MultiTaskModel| -> Result<Option<Tensor>, NnError> {
            let losses = m.losses(&hb, Mode::Train)?;
            let mut total: Option<Tensor> = None;
            for l in losses {
                total = Some(match total {
                    Some(t) => (t + l.loss)?,
                    None => l.loss,
                });
            }
            Ok(total)
        };
        let (Some(la), Some(lb)) = (loss(&fused)?, loss(&composed)?) else { return Ok(()) };
        let (ga, gb) = (fused.backward(&la)?, composed.backward(&lb)?);
        for (name, var) in fused.params().vars() {
            let other = composed.params().vars()[name].as_tensor();
            let (Some(a), Some(b)) = (ga.get(var.as_tensor()), gb.get(other)) else {
                if ga.get(var.as_tensor()).is_some() != gb.get(other).is_some() {
                    return Err(format!("{name}: a gradient on one side only").into());
                }
                continue;
            };
            if peft.is_some() && !(name.contains("lora_") || name.starts_with("heads.")) {
                return Err(format!("{name}: the frozen backbone got a gradient").into());
            }
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            if diff(a, b)? > 2e-4 * scale + 1e-6 {
                return Err(format!("{name}: gradients differ by {} (largest {scale})", diff(a, b)?).into());
            }
        }
        Ok(())
    }

    proptest! {
        // A fixed seed: the same cases on every run, so the suite cannot turn red by chance.
        #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(20_261_129), ..ProptestConfig::default() })]
        /// Random shapes, odd sizes, padding, fully padded rows, with and without dropout, with and without
        /// MPNet's relative position bias: the fused encoder equals the composed path in value and in every
        /// parameter's gradient (the bias's included). Heads of 16 take the fused attention kernel (which adds
        /// the q|k|v biases itself), the others the general products.
        #[test]
        fn fused_equals_composed(batch in 1usize..4, seq in 1usize..10, layers in 1usize..3, heads in 1usize..4,
                                 head_dim in prop_oneof![3 => 1usize..9, 1 => Just(16usize)], intermediate in 1usize..20, dropout in prop_oneof![Just(0.0f32), Just(0.3f32)],
                                 seed in 0u64..1_000_000, relative in proptest::bool::ANY) {
            prop_assume!(heads * head_dim >= 4, "LayerNorm over fewer than 4 values is degenerate");
            let result = check(batch, seq, layers, heads, head_dim, intermediate, dropout, seed, None, relative);
            prop_assert!(result.is_ok(), "{}", result.err().map(|e| e.to_string()).unwrap_or_default());
        }

        /// The same with per-task LoRA (random rank and sites) in a batch mixing the two tasks' examples: the
        /// loss and every adapter's and head's gradient agree, and the frozen backbone gets none on either path.
        #[test]
        fn fused_lora_equals_composed(batch in 1usize..4, seq in 1usize..8, layers in 1usize..3, heads in 1usize..3,
                                      head_dim in prop_oneof![3 => 2usize..6, 1 => Just(16usize)], intermediate in 1usize..12, dropout in prop_oneof![Just(0.0f32), Just(0.3f32)],
                                      r in 1usize..4, sites in 1u8..64, seed in 0u64..1_000_000, relative in proptest::bool::ANY) {
            prop_assume!(heads * head_dim >= 4, "LayerNorm over fewer than 4 values is degenerate");
            let lora = Some((r, sites));
            let result = check(batch, seq, layers, heads, head_dim, intermediate, dropout, seed, lora, relative);
            prop_assert!(result.is_ok(), "{}", result.err().map(|e| e.to_string()).unwrap_or_default());
        }
    }
}

/// The other encoder families (`tests/fixtures/tiny-roberta`, `tiny-xlm-roberta`, `tiny-electra`,
/// `tiny-electra-small`, `tiny-distilbert`, `tiny-mpnet`, `tiny-deberta`, `tiny-modernbert` and
/// `tiny-modernbert-bias`, made with transformers' own classes): each loads through its checkpoint's names and matches transformers' hidden
/// states at the real tokens, the head's loss and every backbone gradient's norm, on both kernel paths.
#[test]
fn other_encoder_families_match_transformers() -> TestResult {
    for family in [
        "tiny-roberta",
        "tiny-xlm-roberta",
        "tiny-electra",
        "tiny-electra-small",
        "tiny-distilbert",
        "tiny-mpnet",
        "tiny-deberta",
        "tiny-modernbert",
        "tiny-modernbert-bias",
    ] {
        let dir = fixture_dir().join("..").join(family);
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let batch = batch_from(&reference);
        let mask = rows_u32(&reference["attention_mask"]).concat();
        let expected: Vec<Vec<f64>> =
            serde_json::from_value::<Vec<Vec<Vec<f64>>>>(reference["last_hidden_state"].clone())?.concat();
        let tasks = BTreeMap::new();
        for kernels in [Kernels::Fused, Kernels::Composed] {
            let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None };
            let mut model = MultiTaskModel::load(&spec, &dir.join("model.safetensors"), false, &Device::Cpu)?;
            model.set_kernels(kernels);
            let hidden = model.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?;
            let mut max_diff = 0f64;
            // The padded places' states are masked out everywhere (transformers gives them other positions).
            for ((row, want), &m) in hidden.iter().zip(&expected).zip(&mask) {
                if m == 1 {
                    for (a, b) in row.iter().zip(want) {
                        max_diff = max_diff.max((f64::from(*a) - b).abs());
                    }
                }
            }
            assert!(max_diff < 1e-4, "{family} ({kernels:?}): max abs difference {max_diff}");
        }
        head_loss_and_gradients_match(&dir, family)?;
    }
    Ok(())
}

/// An evaluation pass records no graph on the layer-by-layer path (MPNet, DeBERTa, and BERT on the composed
/// kernels): its output tracks no op, so every activation is freed as soon as the next is computed, while a
/// training pass's output does.
#[test]
fn evaluation_records_no_graph() -> TestResult {
    for family in ["tiny-bert", "tiny-mpnet", "tiny-deberta", "tiny-modernbert"] {
        let dir = fixture_dir().join("..").join(family);
        let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let tasks = BTreeMap::new();
        let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.1, seed: 0, peft: None };
        let mut model = MultiTaskModel::load(&spec, &dir.join("model.safetensors"), false, &Device::Cpu)?;
        model.set_kernels(Kernels::Composed);
        let batch = batch_from(&reference);
        assert!(!model.encode(&batch, Mode::Eval)?.track_op(), "{family}: evaluation records a graph");
        assert!(model.encode(&batch, Mode::Train)?.track_op(), "{family}: training records no graph");
    }
    Ok(())
}

/// `family_name` gives back every checkpoint name of each family fixture from the encoder's name for it (the
/// names `mtl export` writes), and BERT's under `bert.`.
#[test]
fn family_names_invert_canonical_names() -> TestResult {
    for (family, model_type) in [
        ("tiny-bert", "bert"),
        ("tiny-roberta", "roberta"),
        ("tiny-xlm-roberta", "xlm-roberta"),
        ("tiny-electra", "electra"),
        ("tiny-electra-small", "electra"),
        ("tiny-distilbert", "distilbert"),
        ("tiny-mpnet", "mpnet"),
        ("tiny-deberta", "deberta-v2"),
        ("tiny-modernbert", "modernbert"),
        ("tiny-modernbert-bias", "modernbert"),
    ] {
        let dir = fixture_dir().join("..").join(family);
        let prefix = crate::family_prefix(model_type).ok_or("a family")?;
        for name in candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?.keys() {
            // tiny-bert and tiny-distilbert are saved without the task model's prefix.
            let want = if name.starts_with(&format!("{prefix}.")) { name.clone() } else { format!("{prefix}.{name}") };
            assert_eq!(crate::family_name(model_type, &crate::canonical_name(name)), want, "{family}");
        }
    }
    assert_eq!(crate::family_prefix("xlm-roberta"), Some("roberta"));
    assert_eq!(crate::family_prefix("funnel"), None);
    Ok(())
}

#[test]
fn unsupported_encoder_families_are_named() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"model_type": "funnel", "hidden_size": 32}"#)?;
    let e = BertConfig::from_file(&path).expect_err("not loaded");
    assert!(e.to_string().contains("\"funnel\"") && e.to_string().contains("roberta, xlm-roberta"), "{e}");
    // DeBERTa-v2 variants outside what the encoder computes are named with the reason.
    for (extra, reason) in [
        (r#""relative_attention": false"#, "relative_attention"),
        (r#""relative_attention": true, "share_att_key": false"#, "share_att_key"),
        (r#""relative_attention": true, "share_att_key": true, "conv_kernel_size": 3"#, "conv_kernel_size"),
        (
            r#""relative_attention": true, "share_att_key": true, "position_buckets": 256, "max_relative_positions": 100"#,
            "max_relative_positions",
        ),
    ] {
        std::fs::write(&path, format!(r#"{{"model_type": "deberta-v2", "hidden_size": 32, {extra}}}"#))?;
        let e = BertConfig::from_file(&path).expect_err("not loaded");
        assert!(e.to_string().contains(reason), "{e}");
    }
    Ok(())
}

/// tiny-bert's weights saved as two safetensors shards with their index, and as PyTorch's pytorch_model.bin
/// under `bert.` (tests/fixtures/tiny-bert-sharded, tiny-bert-bin): both load to transformers' hidden states.
#[test]
fn sharded_and_pytorch_weights_load() -> TestResult {
    let reference = reference()?;
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let expected: Vec<Vec<f64>> =
        serde_json::from_value::<Vec<Vec<Vec<f64>>>>(reference["last_hidden_state"].clone())?.concat();
    let tasks = BTreeMap::new();
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None };
    let root = fixture_dir().join("..");
    for weights in
        [root.join("tiny-bert-sharded/model.safetensors.index.json"), root.join("tiny-bert-bin/pytorch_model.bin")]
    {
        let model = MultiTaskModel::load(&spec, &weights, false, &Device::Cpu)?;
        let hidden = model.encode(&batch_from(&reference), Mode::Eval)?.to_vec2::<f32>()?;
        let max_diff = hidden
            .iter()
            .zip(&expected)
            .flat_map(|(row, want)| row.iter().zip(want).map(|(a, b)| (f64::from(*a) - b).abs()))
            .fold(0f64, f64::max);
        assert!(max_diff < 1e-4, "{}: max abs difference {max_diff}", weights.display());
    }
    Ok(())
}

/// ModernBERT's task heads start from the base checkpoint's prediction head when it has one (a masked-LM
/// checkpoint's `head.dense`, `head.norm`), each task its own copy, as transformers' `from_pretrained` starts
/// every task model's head; without one they start fresh.
#[test]
fn modernbert_heads_start_from_the_pretrained_prediction_head() -> TestResult {
    let dir = fixture_dir().join("..").join("tiny-modernbert");
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let mut weights = canonical_weights(&dir.join("model.safetensors"))?;
    let dense = Tensor::randn(0f32, 1.0, (32, 32), &Device::Cpu)?;
    weights.insert("head.dense.weight".into(), dense.clone());
    let tasks = BTreeMap::from([
        (TaskId::new("a")?, HeadSpec::new(TaskKind::Classification, 3)),
        (TaskId::new("b")?, HeadSpec::new(TaskKind::TokenClassification, 4)),
    ]);
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None };
    let model = MultiTaskModel::build(&spec, weights, &Device::Cpu)?;
    for task in ["a", "b"] {
        let name = format!("heads.{task}.head.dense.weight");
        let got = model.params().vars().get(&name).ok_or("a prediction head")?;
        assert_eq!((got.as_tensor() - &dense)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "{task}");
        assert!(!model.params().initialised().contains(&name), "{task}: loaded, not initialised");
        assert!(model.params().initialised().contains(&format!("heads.{task}.head.norm.weight")), "{task}: fresh norm");
    }
    Ok(())
}
