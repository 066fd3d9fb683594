//! The multi-task decoder on the tiny random Llama of `tests/fixtures/tiny-llama` with its two LoRA adapters
//! (`lora.json`: PEFT's loss and gradient norms, made by `scripts/make_fixtures.py llama`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use mtl_core::{HostBatch, Mode, Targets, TaskId, IGNORE_INDEX};
use serde_json::Value;

use crate::llama::{DecoderLora, DecoderModule, LlamaConfig};
use crate::{DecoderModel, LoraSpec};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn task(name: &str) -> TaskId {
    TaskId::new(name).expect("valid")
}

/// The decoder with `adapters`, loaded from the fixture's trained `intent` and `slots` (`default` gets
/// `intent`'s weights).
fn model(adapters: &[&str]) -> Result<DecoderModel, Box<dyn std::error::Error>> {
    let config = LlamaConfig::from_file(&dir().join("config.json"))?;
    let mut weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu)?;
    for (name, t) in candle_core::safetensors::load(dir().join("lora.safetensors"), &Device::Cpu)? {
        if adapters == [crate::SHARED_ADAPTER] {
            weights.insert(name.replace(".intent.", ".default."), t);
        } else {
            weights.insert(name, t);
        }
    }
    let spec = LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: Vec::new(), svd: false };
    let lora = DecoderLora {
        spec,
        modules: DecoderModule::ALL.to_vec(),
        adapters: adapters.iter().map(|a| a.to_string()).collect(),
    };
    Ok(DecoderModel::new(&config, weights, Some(&lora), &[task("intent"), task("slots")], 7, &Device::Cpu)?)
}

/// The fixture's batch, with row `r`'s labels given to `tasks[r]`.
fn batch(tasks: [&str; 2]) -> Result<HostBatch, Box<dyn std::error::Error>> {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json"))?)?;
    let rows = |v: &Value| -> Vec<Vec<i64>> { serde_json::from_value(v.clone()).expect("fixture rows") };
    let (ids, mask, labels) =
        (rows(&reference["input_ids"]), rows(&reference["attention_mask"]), rows(&reference["labels"]));
    let (b, s) = (ids.len(), ids[0].len());
    let mut targets = std::collections::BTreeMap::new();
    for (r, name) in tasks.iter().enumerate() {
        let entry = targets.entry(task(name)).or_insert_with(|| Targets::Tokens(vec![IGNORE_INDEX; b * s]));
        let Targets::Tokens(t) = entry else { unreachable!() };
        t[r * s..(r + 1) * s].copy_from_slice(&labels[r]);
    }
    Ok(HostBatch {
        batch: b,
        seq: s,
        input_ids: ids.concat().iter().map(|&i| i as u32).collect(),
        token_type_ids: vec![0; b * s],
        attention_mask: mask.concat().iter().map(|&m| m as u32).collect(),
        word_starts: vec![Vec::new(); b],
        targets,
    })
}

#[test]
fn task_losses_match_peft_and_every_adapter_of_a_task_in_the_batch_trains() -> TestResult {
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("lora.json"))?)?;
    // Both rows through "intent": PEFT's loss with that adapter active.
    let m = model(&["intent", "slots"])?;
    let losses = m.losses(&batch(["intent", "intent"])?, Mode::Train)?;
    assert_eq!(losses.len(), 1);
    let want = fixture["loss"].as_f64().ok_or("loss")?;
    assert!((f64::from(losses[0].loss.to_scalar::<f32>()?) - want).abs() < 1e-4);
    assert_eq!(losses[0].count, 2);

    // One row per task: each task's loss reaches every A and B of its own adapter, and nothing of the other's.
    let mixed = batch(["slots", "intent"])?;
    let losses = m.losses(&mixed, Mode::Train)?;
    assert_eq!(losses.iter().map(|l| l.task.as_str()).collect::<Vec<_>>(), ["intent", "slots"]);
    for l in &losses {
        let grads = m.backward(&l.loss)?;
        let mut own = 0;
        for (name, var) in m.params().vars() {
            let norm =
                grads.get(var.as_tensor()).map(|g| g.sqr()?.sum_all()?.to_scalar::<f32>()).transpose()?.unwrap_or(0.0);
            if name.contains(&format!(".{}.", l.task)) {
                assert!(norm > 0.0, "{name} got no gradient from task {}", l.task);
                own += 1;
            } else {
                assert_eq!(norm, 0.0, "{name} got a gradient from task {}", l.task);
            }
        }
        assert_eq!(own, 2 * 7 * 2, "A and B of seven projections in two layers");
    }
    // Only the adapters are trained variables.
    assert!(m.params().vars().keys().all(|n| n.contains(".lora_")));

    // A shared adapter gets the gradient of every task.
    let m = model(&[crate::SHARED_ADAPTER])?;
    let total = m
        .losses(&mixed, Mode::Train)?
        .into_iter()
        .map(|l| l.loss)
        .reduce(|a, b| (a + b).expect("scalars"))
        .ok_or("losses")?;
    let grads = m.backward(&total)?;
    for (name, var) in m.params().vars() {
        let g = grads.get(var.as_tensor()).ok_or(format!("{name}: no gradient"))?;
        assert!(g.sqr()?.sum_all()?.to_scalar::<f32>()? > 0.0, "{name}: zero gradient");
    }
    Ok(())
}

#[test]
fn batched_greedy_decoding_equals_one_prompt_at_a_time() -> TestResult {
    let m = model(&["intent", "slots"])?;
    // Left-padded to the longest prompt, each row as if alone.
    let prompts: [&[u32]; 3] = [&[5, 9, 12, 3], &[7, 1, 30], &[40, 2, 11, 6, 8, 8]];
    let together = m.generate_greedy(&task("slots"), &prompts, 6, &[])?;
    for (p, want) in prompts.iter().zip(&together) {
        assert_eq!(&m.generate_greedy(&task("slots"), &[p], 6, &[])?[0], want);
        assert_eq!(want.len(), 6);
    }
    // A stop token ends a row's answer (and is not part of it).
    let first = together[0][0];
    let stopped = m.generate_greedy(&task("slots"), &prompts, 6, &[first])?;
    assert!(stopped[0].is_empty());
    assert!(m.generate_greedy(&task("slots"), &[&[1, 2], &[]], 3, &[]).is_err(), "an empty prompt");
    Ok(())
}

/// Decoding through the host cache (a shared prompt prefix computed once, rows leaving the batch as they
/// stop) answers as the composed ops do with candle's tensor cache, for each adapter, with stop tokens that
/// end some rows early.
#[test]
fn host_cache_decoding_equals_the_composed_cache() -> TestResult {
    let mut m = model(&["intent", "slots"])?;
    let apart: [&[u32]; 4] = [&[5, 9, 12, 3], &[7, 1, 30], &[40, 2, 11, 6, 8, 8], &[3]];
    let shared: [&[u32]; 4] = [&[4, 4, 6, 5, 9], &[4, 4, 6, 7, 1, 30], &[4, 4, 6, 40, 2, 11, 6, 8], &[4, 4, 6, 3]];
    for (t, prompts) in [("intent", apart), ("slots", apart), ("slots", shared)] {
        m.set_kernels(crate::Kernels::Composed);
        let composed = m.generate_greedy(&task(t), &prompts, 7, &[])?;
        // Stop on a token some rows produce partway through.
        let stop = [composed[1][2], composed[3][4]];
        let composed_stopped = m.generate_greedy(&task(t), &prompts, 7, &stop)?;
        m.set_kernels(crate::Kernels::Fused);
        assert_eq!(m.generate_greedy(&task(t), &prompts, 7, &[])?, composed, "{t}");
        assert_eq!(m.generate_greedy(&task(t), &prompts, 7, &stop)?, composed_stopped, "{t}, with stops");
        assert!(composed_stopped.iter().any(|r| r.len() < 7), "some row stopped early");
    }
    Ok(())
}

/// Regression (review of issue 22): weights handed over quantised to a model without LoRA become trained f32
/// parameters, not frozen blocks that would leave only the norms training.
#[test]
fn full_fine_tuning_trains_matrices_handed_over_quantised() -> TestResult {
    use candle_core::quantized::{GgmlDType, QTensor};
    let config = LlamaConfig::from_file(&dir().join("config.json"))?;
    let dense: HashMap<String, Tensor> = candle_core::safetensors::load(dir().join("model.safetensors"), &Device::Cpu)?;
    let mut weights = crate::llama::LlamaWeights::default();
    for (name, t) in dense {
        if t.rank() == 2 && t.dim(1)? % 32 == 0 {
            weights
                .quantized
                .insert(name, crate::cpu::quant::QuantMatrix::new(QTensor::quantize(&t, GgmlDType::Q8_0)?)?);
        } else {
            weights.dense.insert(name, t);
        }
    }
    let quantized: Vec<String> = weights.quantized.keys().cloned().collect();
    assert!(!quantized.is_empty(), "the fixture has matrices of whole Q8_0 blocks");
    let m = DecoderModel::new(&config, weights, None, &[task("intent")], 7, &Device::Cpu)?;
    for name in &quantized {
        assert!(m.params().vars().contains_key(name), "{name} trains");
    }
    Ok(())
}

/// Regression (review of issue 22): a batch padded past `max_position_embeddings` runs when its real tokens
/// fit (padding has no position), and is refused when they do not.
#[test]
fn padding_past_the_position_limit_is_not_a_position() -> TestResult {
    use crate::params::ParamBuilder;
    let mut config = LlamaConfig::from_file(&dir().join("config.json"))?;
    config.max_position_embeddings = 10;
    let pb = ParamBuilder::from_safetensors(&dir().join("model.safetensors"), 0, &Device::Cpu)?;
    let llama = crate::llama::Llama::new(&pb, &config)?;
    let ids = Tensor::from_vec((1..=12u32).collect::<Vec<_>>(), (1, 12), &Device::Cpu)?;
    let mut mask = vec![1u32; 12];
    mask[10..].fill(0);
    assert_eq!(llama.forward(&ids, Some(&mask), None)?.dims(), &[12, config.hidden_size]);
    mask[10] = 1;
    assert!(llama.forward(&ids, Some(&mask), None).is_err(), "11 real tokens do not fit 10 positions");
    Ok(())
}
