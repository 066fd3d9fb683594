//! Int8 models and pruned models against f32 references built from the same weights.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use mtl_core::{Mode, TaskId, TaskKind};

use crate::cpu::int8::{Int8Compute, Int8Matrix};
use crate::tests::{batch_from, fixture_dir, reference};
use crate::{BertConfig, HeadSpec, ModelSpec, MultiTaskModel};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PROJECTIONS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

fn tasks() -> BTreeMap<TaskId, HeadSpec> {
    BTreeMap::from([
        (TaskId::new("cls").expect("name"), HeadSpec::new(TaskKind::Classification, 3)),
        (TaskId::new("tok").expect("name"), HeadSpec::new(TaskKind::TokenClassification, 4)),
    ])
}

fn weights() -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    Ok(candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)?)
}

fn build(config: &BertConfig, weights: HashMap<String, Tensor>) -> Result<MultiTaskModel, Box<dyn std::error::Error>> {
    let tasks = tasks();
    let spec = ModelSpec { bert: config, tasks: &tasks, dropout: 0.1, seed: 7, peft: None };
    Ok(MultiTaskModel::build(&spec, weights, &Device::Cpu)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Dynamic int8 (activations quantised per token, on AMX or AVX2) stays close to the f32 model and differs
/// from weight-only int8. Skipped without either.
#[test]
fn dynamic_int8_stays_close_to_f32() -> TestResult {
    if !crate::cpu::int8::dynamic_available() {
        eprintln!("skipped: this CPU has neither AMX-INT8 nor AVX2");
        return Ok(());
    }
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let batch = batch_from(&reference()?);
    let f32_hidden = build(&config, weights()?)?.encode(&batch, Mode::Eval)?;
    let mut int8 = build(&config, weights()?)?;
    int8.quantize_int8()?;
    assert_eq!(int8.bert().int8_layers().ok_or("int8 layers")?[0].compute(), Int8Compute::Dynamic, "the default");
    let dynamic = int8.encode(&batch, Mode::Eval)?;
    int8.set_int8_compute(Int8Compute::WeightOnly);
    let weight_only = int8.encode(&batch, Mode::Eval)?;
    let (to_f32, between) = (max_diff(&dynamic, &f32_hidden)?, max_diff(&dynamic, &weight_only)?);
    assert!(between > 0.0, "dynamic int8 quantises the activations too");
    assert!(to_f32 < 0.1, "dynamic int8 vs f32: {to_f32}");
    Ok(())
}

/// Weight-only int8 computes exactly the f32 model of its dequantised weights, on BERT and on MPNet (whose
/// relative position bias the int8 encoder adds as the fused one does).
#[test]
fn int8_model_computes_the_f32_model_of_its_dequantised_weights() -> TestResult {
    for family in ["tiny-bert", "tiny-mpnet"] {
        int8_equals_dequantised(&fixture_dir().join("..").join(family))?;
    }
    Ok(())
}

fn int8_equals_dequantised(dir: &std::path::Path) -> TestResult {
    let config = BertConfig::from_file(&dir.join("config.json"))?;
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let batch = batch_from(&reference);
    let weights = || crate::tests::canonical_weights(&dir.join("model.safetensors"));
    let f32_model = build(&config, weights()?)?;
    let f32_hidden = f32_model.encode(&batch, Mode::Eval)?;
    let mut int8 = build(&config, weights()?)?;
    let params_before = int8.params().num_params();
    int8.quantize_int8()?;
    int8.set_int8_compute(Int8Compute::WeightOnly);
    let int8_hidden = int8.encode(&batch, Mode::Eval)?;
    // The reference: the f32 model whose projection weights are replaced by what the int8 ones stand for.
    let mut deq = weights()?;
    let family = &config.model_type;
    for l in 0..config.num_hidden_layers {
        for p in PROJECTIONS {
            let name = format!("encoder.layer.{l}.{p}.weight");
            let w = &deq[&name];
            let (rows, cols) = w.dims2()?;
            let q = Int8Matrix::quantize(&w.flatten_all()?.to_vec1::<f32>()?, rows, cols);
            deq.insert(name, Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu)?);
        }
    }
    let reference_hidden = build(&config, deq)?.encode(&batch, Mode::Eval)?;
    let exact = max_diff(&int8_hidden, &reference_hidden)?;
    assert!(exact < 1e-5, "{family}: int8 vs dequantised f32: {exact}");
    let quantisation = max_diff(&int8_hidden, &f32_hidden)?;
    assert!(quantisation > 0.0 && quantisation < 0.05, "{family}: int8 vs f32: {quantisation}");
    // The f32 projection weights are gone from the parameters; the heads predict from the int8 states.
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let dropped = config.num_hidden_layers * (4 * h * h + 2 * h * i);
    assert_eq!(int8.params().num_params(), params_before - dropped);
    assert_eq!(int8.predict(&batch)?.len(), 2);
    let err = int8.losses(&batch, Mode::Train).err().ok_or("training an int8 model must fail")?;
    assert!(err.to_string().contains("inference"), "{err}");
    Ok(())
}

#[test]
fn int8_model_round_trips_through_its_files() -> TestResult {
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let batch = batch_from(&reference()?);
    let mut model = build(&config, weights()?)?;
    model.quantize_int8()?;
    let dir = tempfile::tempdir()?;
    let (f32_path, int8_path) = (dir.path().join("model.safetensors"), dir.path().join("int8.safetensors"));
    model.params().save(&f32_path)?;
    model.save_int8(&int8_path)?;
    let tasks = tasks();
    let spec = ModelSpec { bert: &config, tasks: &tasks, dropout: 0.1, seed: 99, peft: None };
    let loaded = MultiTaskModel::load_int8(&spec, &f32_path, &int8_path, &Device::Cpu)?;
    assert_eq!(loaded.predict(&batch)?, model.predict(&batch)?);
    assert_eq!(loaded.bert().int8_weights(), model.bert().int8_weights());
    // Python's safetensors reads the file as int8 (checked by dtype here: I8 tensors with F32 scales).
    let bytes = std::fs::read(&int8_path)?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    assert_eq!(file.tensor("encoder.layer.0.attention.self.query.weight")?.dtype(), safetensors::Dtype::I8);
    // A weight without its scales, and f32 weights without their int8 file, are errors naming the problem.
    let partial: Vec<(String, Int8Matrix)> = model.bert().int8_weights().into_iter().skip(1).collect();
    let refs: Vec<(String, &Int8Matrix)> = partial.iter().map(|(n, m)| (n.clone(), m)).collect();
    crate::params::save_int8(&int8_path, &refs)?;
    let err = MultiTaskModel::load_int8(&spec, &f32_path, &int8_path, &Device::Cpu)
        .err()
        .ok_or("a missing projection must fail")?;
    assert!(err.to_string().contains("all six"), "{err}");
    let err = MultiTaskModel::load(&spec, &f32_path, true, &Device::Cpu)
        .err()
        .ok_or("f32 load of an int8 model must fail")?;
    assert!(err.to_string().contains("encoder.layer.0.attention.self.query.weight"), "{err}");
    Ok(())
}

#[test]
fn pruning_keeps_the_bottom_layers_exactly() -> TestResult {
    let config = BertConfig::from_file(&fixture_dir().join("config.json"))?;
    let batch = batch_from(&reference()?);
    let mut pruned = build(&config, weights()?)?;
    pruned.prune_top_layers(1)?;
    assert_eq!(pruned.bert().config().num_hidden_layers, config.num_hidden_layers - 1);
    assert!(pruned
        .params()
        .vars()
        .keys()
        .all(|n| !n.starts_with(&format!("encoder.layer.{}.", config.num_hidden_layers - 1))));
    let mut shallow = config.clone();
    shallow.num_hidden_layers -= 1;
    let reference = build(&shallow, weights()?)?;
    assert_eq!(
        pruned.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?,
        reference.encode(&batch, Mode::Eval)?.to_vec2::<f32>()?
    );
    assert_eq!(pruned.predict(&batch)?, reference.predict(&batch)?);
    // Pruning then quantising is the int8 model of the shallow one.
    pruned.quantize_int8()?;
    assert_eq!(pruned.bert().int8_layers().map(<[_]>::len), Some(shallow.num_hidden_layers));
    let err = pruned.prune_top_layers(1).err().ok_or("dropping every layer must fail")?;
    assert!(err.to_string().contains("at least one must stay"), "{err}");
    Ok(())
}
