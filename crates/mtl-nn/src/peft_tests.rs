//! LoRA against PEFT 0.21: two adapters on the tiny model of `tests/fixtures/tiny-bert`, with the hidden
//! states, a mixed batch (PEFT's `adapter_names`) and gradients of `lora.json` (made by
//! `scripts/make_fixtures.py lora`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, LinearModule, Mode, Targets, TaskId, TaskKind, IGNORE_INDEX};
use serde_json::Value;

use crate::peft::route_by_task;
use crate::{BertConfig, BertInput, HeadSpec, Kernels, LoraSpec, ModelSpec, MultiTaskModel, PeftKind, PeftSpec, Route};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-bert")
}

fn reference() -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("lora.json"))?)?)
}

fn spec(adapters: &[&str]) -> PeftSpec {
    PeftSpec {
        kind: PeftKind::Lora(LoraSpec {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LinearModule::ALL.to_vec(),
            svd: false,
        }),
        adapters: adapters.iter().map(|a| a.to_string()).collect(),
    }
}

/// The tiny model with PEFT's two adapters (`intent`, `slots`), extra weights, and `tasks`' heads.
fn model(
    lora: &PeftSpec,
    tasks: &[(&str, TaskKind, usize)],
    extra: HashMap<String, Tensor>,
) -> Result<MultiTaskModel, Box<dyn std::error::Error>> {
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let mut weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    weights.extend(candle_core::safetensors::load(fixture_dir().join("lora.safetensors"), &Device::Cpu)?);
    weights.extend(extra);
    let tasks: BTreeMap<TaskId, HeadSpec> =
        tasks.iter().map(|(n, k, c)| (TaskId::new(*n).expect("valid name"), HeadSpec::new(*k, *c))).collect();
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(lora) };
    Ok(MultiTaskModel::build(&spec, weights, &Device::Cpu)?)
}

fn batch(reference: &Value) -> Result<HostBatch, Box<dyn std::error::Error>> {
    Ok(crate::tests::batch_from(reference))
}

fn max_diff(got: &Tensor, want: &Value) -> Result<f64, Box<dyn std::error::Error>> {
    let want: Vec<Vec<Vec<f64>>> = serde_json::from_value(want.clone())?;
    let got = got.to_vec2::<f32>()?;
    Ok(got
        .iter()
        .zip(want.iter().flatten())
        .flat_map(|(g, w)| g.iter().zip(w).map(|(a, b)| (f64::from(*a) - b).abs()))
        .fold(0.0, f64::max))
}

/// The reference's [CLS] head, as the weights of a head `intent`.
fn reference_head(reference: &Value) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let w: Vec<Vec<f32>> = serde_json::from_value(reference["head"]["weight"].clone())?;
    let b: Vec<f32> = serde_json::from_value(reference["head"]["bias"].clone())?;
    let mut head = HashMap::from([
        ("heads.intent.weight".to_string(), Tensor::new(w, &Device::Cpu)?),
        ("heads.intent.bias".to_string(), Tensor::new(b, &Device::Cpu)?),
    ]);
    // ModernBERT's prediction head before it.
    for (name, value) in reference["head"]["prediction"].as_object().into_iter().flatten() {
        head.insert(format!("heads.intent.head.{name}"), crate::tests::json_tensor(value)?);
    }
    Ok(head)
}

/// The loss of task `intent` on the reference batch equals PyTorch's, and so does the gradient norm of each
/// parameter the reference lists (`count` of them); the intent head gets a gradient too, and nothing else
/// does: the pretrained weights are frozen and the other adapter is not in the batch.
fn loss_and_gradients_match(model: &MultiTaskModel, reference: &Value, count: usize) -> TestResult {
    let head = &reference["head"];
    let mut batch = batch(reference)?;
    let labels: Vec<i64> = serde_json::from_value(head["labels"].clone())?;
    batch.targets.insert(TaskId::new("intent")?, Targets::Class(labels));
    let losses = model.losses(&batch, Mode::Train)?;
    let loss = &losses[0].loss;
    let want = head["loss"].as_f64().ok_or("loss")?;
    assert!((f64::from(loss.to_scalar::<f32>()?) - want).abs() < 1e-5, "loss {loss}, PyTorch {want}");
    let grads = model.backward(loss)?;
    let norms = reference["grad_norms"].as_object().ok_or("grad norms")?;
    assert_eq!(norms.len(), count);
    for (name, var) in model.params().vars() {
        let got = grads.get(var.as_tensor()).map(|g| g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()).transpose()?;
        match norms.get(name) {
            Some(want) => {
                let (got, want) = (f64::from(got.unwrap_or(0.0)), want.as_f64().ok_or("norm")?);
                assert!(
                    got > 0.0 && (got - want).abs() <= 1e-5 + 1e-3 * want,
                    "{name}: gradient norm {got}, PyTorch {want}"
                );
            }
            None if name.starts_with("heads.intent.") => assert!(got.is_some_and(|g| g > 0.0), "{name}: no gradient"),
            None => assert!(got.is_none(), "{name} has a gradient"),
        }
    }
    Ok(())
}

/// The reference batch of three examples, routed through adapters intent, slots, intent.
fn mixed_input(batch: &HostBatch) -> Result<BertInput, Box<dyn std::error::Error>> {
    let routes = vec![
        Route { adapter: 0, examples: 0..1 },
        Route { adapter: 1, examples: 1..2 },
        Route { adapter: 0, examples: 2..3 },
    ];
    Ok(BertInput {
        input_ids: Tensor::from_slice(&batch.input_ids, (batch.batch, batch.seq), &Device::Cpu)?,
        token_type_ids: Tensor::from_slice(&batch.token_type_ids, (batch.batch, batch.seq), &Device::Cpu)?,
        attention_mask: std::sync::Arc::new(batch.attention_mask.clone()),
        routes: Some(routes),
    })
}

#[test]
fn each_adapter_and_a_mixed_batch_match_peft() -> TestResult {
    let reference = reference()?;
    let lora = spec(&["intent", "slots"]);
    let heads = [("intent", TaskKind::Classification, 3), ("slots", TaskKind::TokenClassification, 4)];
    let model = model(&lora, &heads, HashMap::new())?;
    let batch = batch(&reference)?;
    for task in ["intent", "slots"] {
        let hidden = model.encode_for(&TaskId::new(task)?, &batch, Mode::Eval)?;
        let d = max_diff(&hidden, &reference["hidden"][task])?;
        assert!(d < 1e-5, "{task}: max abs difference {d}");
    }
    // One pass, each row through its own adapter (rows: intent, slots, intent).
    let input = mixed_input(&batch)?;
    let mixed = model.bert().forward(&input, model.dropout(), Mode::Eval)?;
    let d = max_diff(&mixed, &reference["mixed"])?;
    assert!(d < 1e-5, "mixed batch: max abs difference {d}");
    // Without its task, a per-task model cannot encode.
    assert!(model.encode(&batch, Mode::Eval).is_err());
    Ok(())
}

#[test]
fn gradients_reach_lora_only_and_match_pytorch() -> TestResult {
    let reference = reference()?;
    let model =
        model(&spec(&["intent", "slots"]), &[("intent", TaskKind::Classification, 3)], reference_head(&reference)?)?;
    loss_and_gradients_match(&model, &reference, 2 * 2 * 6) // A and B of six layers in each of two blocks
}

#[test]
fn merging_gives_the_same_outputs_and_unmerging_restores_the_weights() -> TestResult {
    let reference = reference()?;
    let mut model = model(&spec(&["default"]), &[], HashMap::new())?;
    let batch = batch(&reference)?;
    let before: Vec<(String, Vec<f32>)> = model
        .params()
        .vars()
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let unmerged = model.encode(&batch, Mode::Eval)?;
    model.merge_lora(0)?;
    assert!(model.merge_lora(0).is_err(), "merging twice");
    // Merged, the encoder takes the fused path.
    let merged = model.encode(&batch, Mode::Eval)?;
    let d = (unmerged - merged)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(d < 1e-5, "merged against unmerged: {d}");
    model.unmerge_lora()?;
    for (name, want) in before {
        let got = model.params().vars()[&name].as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-6, "{name}: {d} after unmerging");
    }
    Ok(())
}

#[test]
fn routing_repeats_each_example_for_each_task_that_labels_it() -> TestResult {
    let i = IGNORE_INDEX;
    let seq = 3;
    let batch = HostBatch {
        batch: 3,
        seq,
        input_ids: (0..9).collect(),
        token_type_ids: vec![0; 9],
        attention_mask: vec![1; 9],
        word_starts: vec![vec![Some(1)], vec![Some(1), Some(2)], vec![]],
        targets: BTreeMap::from([
            (TaskId::new("intent")?, Targets::Class(vec![4, i, 5])),
            (TaskId::new("slots")?, Targets::Tokens(vec![i, 1, i, i, 2, 3, i, i, i])),
        ]),
    };
    let (routed, routes) = route_by_task(&batch, &spec(&["intent", "slots"]))?;
    // intent labels examples 0 and 2, slots 0 and 1.
    assert_eq!(routes, vec![Route { adapter: 0, examples: 0..2 }, Route { adapter: 1, examples: 2..4 }]);
    assert_eq!(routed.input_ids, vec![0, 1, 2, 6, 7, 8, 0, 1, 2, 3, 4, 5]);
    assert_eq!(routed.word_starts, vec![vec![Some(1)], vec![], vec![Some(1)], vec![Some(1), Some(2)]]);
    assert_eq!(routed.targets[&TaskId::new("intent")?], Targets::Class(vec![4, 5, i, i]));
    assert_eq!(routed.targets[&TaskId::new("slots")?], Targets::Tokens(vec![i, i, i, i, i, i, i, 1, i, i, 2, 3]));
    // Shared LoRA needs no routing; an unknown task has no adapter.
    let mut unknown = batch.clone();
    unknown.targets.insert(TaskId::new("pos")?, Targets::Class(vec![1, 1, 1]));
    assert!(route_by_task(&unknown, &spec(&["intent", "slots"])).is_err());
    Ok(())
}

/// The tiny model with the two bottleneck adapters of `bottleneck.safetensors` (Houlsby placement).
fn bottleneck_model(
    tasks: &[(&str, TaskKind, usize)],
    extra: HashMap<String, Tensor>,
) -> Result<MultiTaskModel, Box<dyn std::error::Error>> {
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let mut weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    weights.extend(candle_core::safetensors::load(fixture_dir().join("bottleneck.safetensors"), &Device::Cpu)?);
    weights.extend(extra);
    let spec = PeftSpec {
        kind: PeftKind::Bottleneck { size: 8, placement: crate::Placement::Houlsby },
        adapters: vec!["intent".into(), "slots".into()],
    };
    let tasks: BTreeMap<TaskId, HeadSpec> =
        tasks.iter().map(|(n, k, c)| (TaskId::new(*n).expect("valid name"), HeadSpec::new(*k, *c))).collect();
    let model_spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&spec) };
    let model = MultiTaskModel::build(&model_spec, weights, &Device::Cpu)?;
    assert!(model.params().initialised().iter().all(|n| n.starts_with("heads.")), "{:?}", model.params().initialised());
    Ok(model)
}

#[test]
fn bottleneck_adapters_match_a_pytorch_reference() -> TestResult {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("bottleneck.json"))?)?;
    let tasks = [("intent", TaskKind::Classification, 3), ("slots", TaskKind::Classification, 2)];
    let model = bottleneck_model(&tasks, reference_head(&reference)?)?;
    let batch = batch(&reference)?;
    for task in ["intent", "slots"] {
        let hidden = model.encode_for(&TaskId::new(task)?, &batch, Mode::Eval)?;
        let d = max_diff(&hidden, &reference["hidden"][task])?;
        assert!(d < 1e-5, "{task}: max abs difference {d}");
    }
    loss_and_gradients_match(&model, &reference, 2 * 2 * 4) // down and up, weight and bias, two sites, two blocks
}

#[test]
fn fresh_bottleneck_adapters_start_as_the_identity() -> TestResult {
    let reference = reference()?;
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    let spec = PeftSpec {
        kind: PeftKind::Bottleneck { size: 4, placement: crate::Placement::Pfeiffer },
        adapters: vec!["default".into()],
    };
    let tasks = BTreeMap::new();
    let with = MultiTaskModel::build(
        &ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&spec) },
        weights.clone(),
        &Device::Cpu,
    )?;
    let without = MultiTaskModel::build(
        &ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: None },
        weights,
        &Device::Cpu,
    )?;
    let batch = batch(&reference)?;
    let d = (with.encode(&batch, Mode::Eval)? - without.encode(&batch, Mode::Eval)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(d < 1e-5, "{d}");
    // Pfeiffer: one site per block, on the feed-forward output.
    let names: Vec<&String> = with.params().vars().keys().filter(|n| n.contains(".adapters.")).collect();
    assert_eq!(names.len(), 2 * 4, "{names:?}");
    assert!(names.iter().all(|n| n.contains(".output.adapters.default.") && !n.contains("attention")), "{names:?}");
    Ok(())
}

#[test]
fn prefix_tuning_matches_a_pytorch_reference() -> TestResult {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("prefix.json"))?)?;
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let mut weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
    weights.extend(candle_core::safetensors::load(fixture_dir().join("prefix.safetensors"), &Device::Cpu)?);
    weights.extend(reference_head(&reference)?);
    let spec = PeftSpec { kind: PeftKind::Prefix { length: 3 }, adapters: vec!["intent".into(), "slots".into()] };
    let tasks = BTreeMap::from([(TaskId::new("intent")?, HeadSpec::new(TaskKind::Classification, 3))]);
    let model = MultiTaskModel::build(
        &ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&spec) },
        weights,
        &Device::Cpu,
    )?;
    assert!(model.params().initialised().is_empty(), "{:?}", model.params().initialised());
    let batch = batch(&reference)?;
    for task in ["intent", "slots"] {
        let hidden = model.encode_for(&TaskId::new(task)?, &batch, Mode::Eval)?;
        let d = max_diff(&hidden, &reference["hidden"][task])?;
        assert!(d < 1e-5, "{task}: max abs difference {d}");
    }
    let input = mixed_input(&batch)?;
    let d = max_diff(&model.bert().forward(&input, model.dropout(), Mode::Eval)?, &reference["hidden"]["mixed"])?;
    assert!(d < 1e-5, "mixed batch: max abs difference {d}");
    loss_and_gradients_match(&model, &reference, 2 * 2) // key and value of two blocks
}

/// The fused encoder's LoRA equals the composed path (candle autograd): per-task adapters in a mixed training
/// batch, with model and LoRA dropout (both draw the same masks from the same seed), in hidden states, loss and
/// every parameter's gradient. A third adapter that no route uses gets no gradient on either path, and the
/// frozen backbone none at all.
#[test]
fn fused_lora_matches_composed_path() -> TestResult {
    let reference = reference()?;
    let mut lora = spec(&["intent", "slots", "unused"]);
    if let PeftKind::Lora(l) = &mut lora.kind {
        l.dropout = 0.2;
    }
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let tasks: BTreeMap<TaskId, HeadSpec> = BTreeMap::from([
        (TaskId::new("intent")?, HeadSpec::new(TaskKind::Classification, 3)),
        (TaskId::new("slots")?, HeadSpec::new(TaskKind::TokenClassification, 4)),
        (TaskId::new("unused")?, HeadSpec::new(TaskKind::Classification, 2)),
    ]);
    let build = |kernels: Kernels| -> Result<MultiTaskModel, Box<dyn std::error::Error>> {
        let mut weights = candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?;
        weights.extend(candle_core::safetensors::load(fixture_dir().join("lora.safetensors"), &Device::Cpu)?);
        let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.1, seed: 7, peft: Some(&lora) };
        let mut model = MultiTaskModel::build(&spec, weights, &Device::Cpu)?;
        model.set_kernels(kernels);
        Ok(model)
    };
    let (fused, composed) = (build(Kernels::Fused)?, build(Kernels::Composed)?);
    let mut batch = batch(&reference)?;
    let seq = batch.seq;
    // Examples 0 and 2 labelled for intent, example 1 for slots: routes intent, slots in one pass.
    batch.targets.insert(TaskId::new("intent")?, Targets::Class(vec![1, IGNORE_INDEX, 0]));
    let tags: Vec<i64> = (0..batch.batch * seq)
        .map(|i| if i / seq == 1 && i % 2 == 0 { (i % 4) as i64 } else { IGNORE_INDEX })
        .collect();
    batch.targets.insert(TaskId::new("slots")?, Targets::Tokens(tags));
    let diff =
        |a: &Tensor, b: &Tensor| -> Result<f32, candle_core::Error> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
    let total = |m: &MultiTaskModel| -> Result<Tensor, Box<dyn std::error::Error>> {
        let losses = m.losses(&batch, Mode::Train)?;
        assert_eq!(losses.len(), 2);
        Ok((&losses[0].loss + &losses[1].loss)?)
    };
    for round in 0..2 {
        let (la, lb) = (total(&fused)?, total(&composed)?);
        assert!(diff(&la, &lb)? < 1e-5, "round {round}: losses {la} and {lb}");
        let (ga, gb) = (fused.backward(&la)?, composed.backward(&lb)?);
        let mut adapted = 0;
        for (name, var) in fused.params().vars() {
            let other = composed.params().vars()[name].as_tensor();
            match (ga.get(var.as_tensor()), gb.get(other)) {
                (Some(a), Some(b)) => {
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(scale > 0.0 || name.contains("lora_A"), "{name}: a zero gradient");
                    assert!(
                        diff(a, b)? <= 1e-4 * scale + 1e-7,
                        "{name}: gradients differ by {} (scale {scale})",
                        diff(a, b)?
                    );
                    assert!(
                        !name.contains(".unused.") && (name.contains("lora_") || name.starts_with("heads.")),
                        "{name} has a gradient"
                    );
                    adapted += usize::from(name.contains("lora_"));
                }
                (None, None) => assert!(
                    name.contains(".unused.")
                        || !(name.contains("lora_")
                            || name.starts_with("heads.intent")
                            || name.starts_with("heads.slots")),
                    "{name}: no gradient"
                ),
                (a, b) => {
                    return Err(format!(
                        "{name}: a gradient on one side only (fused {}, composed {})",
                        a.is_some(),
                        b.is_some()
                    )
                    .into())
                }
            }
        }
        assert_eq!(adapted, 2 * 2 * 6 * 2, "A and B of six layers in each of two blocks, for two adapters");
    }
    Ok(())
}

/// Every parameter's role comes from where it was built: backbone layers by index, each adapter on its layer
/// (the tasks' own and the shared one apart), heads by task, the rest of the backbone as embeddings.
#[test]
fn every_parameter_has_the_role_it_was_built_with() -> TestResult {
    use mtl_core::ParamRole;
    let m = model(&spec(&["intent", "default"]), &[("intent", TaskKind::Classification, 3)], HashMap::new())?;
    let params = m.params();
    for (name, _, role) in params.with_roles() {
        let layer = name.strip_prefix("encoder.layer.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
        let want = if name.starts_with("heads.intent.") {
            ParamRole::Head(TaskId::new("intent")?)
        } else if let Some(adapter) = ["intent", "default"].into_iter().find(|a| name.contains(&format!(".{a}."))) {
            let layer = layer.ok_or("an adapter sits on a layer")?;
            ParamRole::Adapter { adapter: adapter.into(), layer, shared: adapter == crate::SHARED_ADAPTER }
        } else {
            layer.map_or(ParamRole::Embeddings, ParamRole::Layer)
        };
        assert_eq!(role, &want, "{name}");
    }
    assert_eq!(params.with_roles().filter(|(_, _, r)| r.task() == Some("intent")).count(), 2 + 2 * 6 * 2);
    Ok(())
}

/// On ModernBERT, bottleneck adapters and prefixes are refused with the reason; LoRA on the query alone adapts
/// the packed `Wqkv` (PEFT's default there), as LoRA on all three does.
#[test]
fn modernbert_takes_lora_on_its_packed_projection_only() -> TestResult {
    let dir = fixture_dir().join("../tiny-modernbert");
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let tasks = BTreeMap::new();
    let bottleneck = PeftKind::Bottleneck { size: 4, placement: crate::Placement::Houlsby };
    for kind in [PeftKind::Prefix { length: 3 }, bottleneck] {
        let peft = PeftSpec { kind, adapters: vec!["shared".into()] };
        let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&peft) };
        let e =
            MultiTaskModel::load(&spec, &dir.join("model.safetensors"), false, &Device::Cpu).err().ok_or("refused")?;
        assert!(e.to_string().contains("LoRA is"), "{e}");
    }
    let query =
        PeftKind::Lora(LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: vec![LinearModule::Query], svd: false });
    let peft = PeftSpec { kind: query, adapters: vec!["shared".into()] };
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&peft) };
    let model = MultiTaskModel::load(&spec, &dir.join("model.safetensors"), false, &Device::Cpu)?;
    let names: Vec<&String> = model.params().vars().keys().filter(|n| n.contains("lora_A")).collect();
    assert_eq!(names.len(), 3, "one LoRA per block: {names:?}");
    assert!(names.iter().all(|n| n.contains(".attn.Wqkv.lora_A.shared.")), "{names:?}");
    Ok(())
}

/// LoRA on ModernBERT (its packed `Wqkv`, both `Wo`s and `Wi`; PEFT's `target_modules = ["Wqkv", "Wo", "Wi"]`)
/// matches PEFT for each adapter and a mixed batch, and so do the loss through the prediction head and every
/// LoRA gradient.
#[test]
fn modernbert_lora_matches_peft() -> TestResult {
    let dir = fixture_dir().join("../tiny-modernbert");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("lora.json"))?)?;
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let mut weights = crate::tests::canonical_weights(&dir.join("model.safetensors"))?;
    weights.extend(crate::tests::canonical_weights(&dir.join("lora.safetensors"))?);
    weights.extend(reference_head(&reference)?);
    let lora = spec(&["intent", "slots"]);
    let tasks: BTreeMap<TaskId, HeadSpec> = [("intent", 3), ("slots", 4)]
        .into_iter()
        .map(|(n, c)| Ok((TaskId::new(n)?, HeadSpec::new(TaskKind::Classification, c))))
        .collect::<Result<_, mtl_core::CoreError>>()?;
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&lora) };
    let model = MultiTaskModel::build(&spec, weights, &Device::Cpu)?;
    let batch = batch(&reference)?;
    for task in ["intent", "slots"] {
        let hidden = model.encode_for(&TaskId::new(task)?, &batch, Mode::Eval)?;
        let d = max_diff(&hidden, &reference["hidden"][task])?;
        assert!(d < 1e-4, "{task}: max abs difference {d}");
    }
    let input = mixed_input(&batch)?;
    let d = max_diff(&model.bert().forward(&input, model.dropout(), Mode::Eval)?, &reference["mixed"])?;
    assert!(d < 1e-4, "mixed batch: max abs difference {d}");
    // A and B of four modules in each of three blocks.
    loss_and_gradients_match(&model, &reference, 2 * 4 * 3)
}

/// AdaLoRA's SVD form (`B (E ⊙ A)`, factor `alpha / (r + 1e-5)`) against PEFT's AdaLoRA layers on tiny-bert
/// (`scripts/make_fixtures.py adalora`): the hidden states, and the head's loss with the gradient norm of every
/// A, B and E, on the fused and on the composed path.
#[test]
fn adalora_layers_match_peft() -> TestResult {
    let dir = fixture_dir();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adalora.json"))?)?;
    let mut svd = spec(&["intent"]);
    if let PeftKind::Lora(l) = &mut svd.kind {
        l.svd = true;
    }
    for kernels in [Kernels::Fused, Kernels::Composed] {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let mut weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        weights.extend(candle_core::safetensors::load(dir.join("adalora.safetensors"), &Device::Cpu)?);
        weights.extend(reference_head(&reference)?);
        let tasks = BTreeMap::from([(TaskId::new("intent")?, HeadSpec::new(TaskKind::Classification, 3))]);
        let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.0, seed: 0, peft: Some(&svd) };
        let mut model = MultiTaskModel::build(&spec, weights, &Device::Cpu)?;
        model.set_kernels(kernels);
        let hidden = model.encode_for(&TaskId::new("intent")?, &batch(&reference)?, Mode::Eval)?;
        let d = max_diff(&hidden, &reference["hidden"])?;
        assert!(d < 1e-5, "{kernels:?}: max abs difference {d}");
        loss_and_gradients_match(&model, &reference, 3 * 2 * 6)?; // A, B and E of six layers in two blocks
    }
    Ok(())
}
