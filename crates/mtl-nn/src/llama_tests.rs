//! The decoder against transformers on the tiny random models of `tests/fixtures/tiny-llama`
//! (`LlamaForCausalLM`), `tests/fixtures/tiny-gemma3` (`Gemma3ForCausalLM`) and `tests/fixtures/tiny-llama3`
//! (Llama with Llama 3's rotary scaling, also as a GGUF file), made by `scripts/make_fixtures.py llama`,
//! `… gemma3` and `… llama3`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::llama::{
    causal_lm_loss, Activation, BlockTable, Family, KvCache, Llama, LlamaConfig, PagedKv, SlidingWindow,
};
use crate::params::ParamBuilder;

type TestResult = Result<(), Box<dyn std::error::Error>>;
/// Token ids `[batch, seq]`, the attention mask (row-major), batch and seq.
type Batch = (Tensor, Vec<u32>, usize, usize);

/// The tiny models.
const MODELS: [&str; 3] = ["tiny-llama", "tiny-gemma3", "tiny-llama3"];

fn dir() -> PathBuf {
    fixture("tiny-llama")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn load() -> Result<(Llama, crate::ParamStore, Value), Box<dyn std::error::Error>> {
    load_model("tiny-llama")
}

fn load_model(name: &str) -> Result<(Llama, crate::ParamStore, Value), Box<dyn std::error::Error>> {
    let dir = fixture(name);
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let pb = ParamBuilder::from_safetensors(&dir.join("model.safetensors"), 0, &Device::Cpu)?;
    let model = Llama::new(&pb, &config)?;
    let store = pb.finish();
    assert!(store.initialised().is_empty(), "{name}: every tensor loads: {:?}", store.initialised());
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    Ok((model, store, reference))
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).expect("fixture rows")
}

fn batch(reference: &Value) -> Result<Batch, Box<dyn std::error::Error>> {
    let ids = rows(&reference["input_ids"]);
    let mask: Vec<u32> = rows(&reference["attention_mask"]).concat().iter().map(|&m| m as u32).collect();
    let (b, s) = (ids.len(), ids[0].len());
    let flat: Vec<u32> = ids.concat().iter().map(|&i| i as u32).collect();
    Ok((Tensor::from_vec(flat, (b, s), &Device::Cpu)?, mask, b, s))
}

#[test]
fn config_reads_transformers_5_and_refuses_what_it_cannot_run() -> TestResult {
    let c = LlamaConfig::from_file(&dir().join("config.json"))?;
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta), (4, 2, 8, 10_000.0));
    assert!(c.tie_word_embeddings);
    let text = std::fs::read_to_string(dir().join("config.json"))?;
    let scaled = text.replace("\"rope_type\": \"default\"", "\"rope_type\": \"yarn\"");
    assert!(LlamaConfig::from_json(&scaled).is_err_and(|e| e.contains("rope scaling (yarn)")));
    let scaled = text.replace("\"rope_type\": \"default\"", "\"rope_type\": \"llama3\"");
    assert!(LlamaConfig::from_json(&scaled).is_err_and(|e| e.contains("llama3 rope scaling needs factor")));
    // Llama 3's scaling, in transformers 5's `rope_parameters` and in an older config's `rope_scaling`.
    let l3 = LlamaConfig::from_file(&fixture("tiny-llama3").join("config.json"))?;
    let factors = l3.rope_freq_factors.clone().ok_or("llama3 factors")?;
    let mut old: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama3").join("config.json"))?)?;
    let mut scaling = old.remove("rope_parameters").ok_or("rope_parameters")?;
    let theta = scaling.as_object_mut().ok_or("object")?.remove("rope_theta").ok_or("rope_theta")?;
    old.insert("rope_theta".into(), theta);
    old.insert("rope_scaling".into(), scaling);
    let o = LlamaConfig::from_json(&Value::Object(old).to_string())?;
    assert_eq!(o.rope_freq_factors.as_ref(), Some(&factors));
    // Its four frequencies: kept, smoothed, divided by 8 (twice).
    assert_eq!((factors[0], factors[2], factors[3]), (1.0, 8.0, 8.0));
    assert!(factors[1] > 1.0 && factors[1] < 8.0, "{factors:?}");
    let gelu = text.replace("\"silu\"", "\"gelu\"");
    assert!(LlamaConfig::from_json(&gelu).is_err_and(|e| e.contains("activation \"gelu\"")));
    // Gemma 3: rotary bases per layer type, the window and which layers use it, the score scale.
    let g = LlamaConfig::from_file(&fixture("tiny-gemma3").join("config.json"))?;
    assert_eq!((g.family, g.hidden_act, g.rope_theta), (Family::Gemma3, Activation::GeluTanh, 1000.0));
    let sliding = SlidingWindow { window: 3, layers: vec![true, true, false], rope_theta: 100.0 };
    assert_eq!(g.sliding.as_ref(), Some(&sliding));
    assert_eq!((g.window(0), g.window(2)), (Some(3), None));
    assert_eq!(g.attention_scale(), (1.0 / 12f64.sqrt()) as f32);
    let text = std::fs::read_to_string(fixture("tiny-gemma3").join("config.json"))?;
    let capped = text.replace("\"final_logit_softcapping\": null", "\"final_logit_softcapping\": 30.0");
    assert!(LlamaConfig::from_json(&capped).is_err_and(|e| e.contains("soft-capping")));
    let other = text.replace("\"gemma3_text\"", "\"gemma2\"");
    assert!(LlamaConfig::from_json(&other).is_err_and(|e| e.contains("gemma2")));
    // An older Gemma 3 config (no `layer_types`, `rope_parameters`, tying or activation): Gemma3TextConfig's
    // defaults, the window's layers from `sliding_window_pattern`.
    let mut old: serde_json::Map<String, Value> = serde_json::from_str(&text)?;
    for key in ["layer_types", "rope_parameters", "tie_word_embeddings", "query_pre_attn_scalar", "hidden_activation"] {
        old.remove(key);
    }
    old.remove("_sliding_window_pattern");
    old.insert("sliding_window_pattern".into(), 2.into());
    let o = LlamaConfig::from_json(&Value::Object(old).to_string())?;
    assert_eq!((o.hidden_act, o.tie_word_embeddings, o.rope_theta), (Activation::GeluTanh, true, 1e6));
    let sliding = SlidingWindow { window: 3, layers: vec![true, false, true], rope_theta: 10_000.0 };
    assert_eq!((o.attention_scale(), o.sliding), (1.0 / 16.0, Some(sliding)));
    Ok(())
}

#[test]
fn logits_match_transformers_on_a_padded_batch() -> TestResult {
    for name in MODELS {
        logits_match(name)?;
    }
    Ok(())
}

fn logits_match(name: &str) -> TestResult {
    let (model, _, reference) = load_model(name)?;
    model_logits_match(name, &model, &reference)
}

/// Llama 3's rotary scaling from a GGUF file as llama.cpp's converter writes it (the factors in `rope_freqs`,
/// the query and key rows permuted): the config's factors, and transformers' logits.
#[test]
fn llama3_rope_freqs_of_a_gguf_file_match_transformers() -> TestResult {
    let dir = fixture("tiny-llama3");
    let gguf = crate::gguf::read_llama(&dir.join("model.gguf"), &Device::Cpu, true)?;
    let want = LlamaConfig::from_file(&dir.join("config.json"))?.rope_freq_factors.ok_or("config factors")?;
    let got = gguf.config.rope_freq_factors.clone().ok_or("rope_freqs read")?;
    assert_eq!(got.len(), want.len());
    assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} against {want:?}");
    let model = Llama::new(&gguf.weights.into_builder(0, &Device::Cpu)?, &gguf.config)?;
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    model_logits_match("tiny-llama3 (GGUF)", &model, &reference)
}

fn model_logits_match(name: &str, model: &Llama, reference: &Value) -> TestResult {
    let (ids, mask, b, s) = batch(reference)?;
    let logits = model.logits(&model.forward(&ids, Some(&mask), None)?)?.to_vec2::<f32>()?;
    let want: Vec<Vec<Vec<f64>>> = serde_json::from_value(reference["logits"].clone())?;
    let mut max_diff = 0f64;
    for (r, row) in want.iter().enumerate() {
        for (i, pos) in row.iter().enumerate() {
            // Padding positions' logits are not defined the same way everywhere; compare real tokens.
            if mask[r * s + i] == 0 {
                continue;
            }
            for (a, w) in logits[r * s + i].iter().zip(pos) {
                max_diff = max_diff.max((f64::from(*a) - w).abs());
            }
        }
    }
    assert!(max_diff < 1e-4, "{name}: max abs difference {max_diff} over {b} × {s}");
    Ok(())
}

#[test]
fn loss_and_every_gradient_match_pytorch() -> TestResult {
    for name in MODELS {
        loss_and_gradients_match(name)?;
    }
    Ok(())
}

fn loss_and_gradients_match(name: &str) -> TestResult {
    let (model, store, reference) = load_model(name)?;
    let (ids, mask, b, s) = batch(&reference)?;
    let labels: Vec<i64> = rows(&reference["labels"]).concat();
    let logits = model.logits(&model.forward(&ids, Some(&mask), None)?)?;
    let loss = causal_lm_loss(&logits, &labels, b, s, -100)?;
    let want = reference["loss"].as_f64().ok_or("loss")?;
    let got = f64::from(loss.to_scalar::<f32>()?);
    assert!((got - want).abs() < 1e-4, "{name}: loss {got} vs {want}");
    let grads = loss.backward()?;
    let norms = reference["grad_norms"].as_object().ok_or("grad norms")?;
    assert_eq!(norms.len(), store.vars().len(), "one gradient per parameter (the tied head is the embedding)");
    for (name, var) in store.vars() {
        let g = grads.get(var.as_tensor()).ok_or_else(|| format!("{name} got no gradient"))?;
        let norm = f64::from(g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?);
        let want = norms[name].as_f64().ok_or("norm")?;
        assert!(norm > 0.0, "{name}: zero gradient");
        assert!((norm - want).abs() <= 1e-4 + 1e-3 * want, "{name}: gradient norm {norm} vs {want}");
    }
    Ok(())
}

#[test]
fn cached_decoding_equals_the_full_pass_and_greedy_matches_transformers() -> TestResult {
    for name in MODELS {
        cached_decoding_matches(name)?;
    }
    Ok(())
}

fn cached_decoding_matches(name: &str) -> TestResult {
    let (model, _, reference) = load_model(name)?;
    // The logits at the last position of a full pass over `tokens`, without a cache.
    let full_last = |tokens: &[u32]| -> Result<Tensor, Box<dyn std::error::Error>> {
        let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu)?;
        Ok(model.logits(&model.forward(&ids, None, None)?)?.get(tokens.len() - 1)?)
    };
    let prompt: Vec<u32> = serde_json::from_value(reference["prompt"].clone())?;
    let want: Vec<u32> = serde_json::from_value(reference["greedy"].clone())?;
    let mut cache = KvCache::default();
    let mut tokens = prompt.clone();
    let mut next_input = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu)?;
    let mut generated = Vec::new();
    for _ in 0..want.len() {
        let hidden = model.forward(&next_input, None, Some(&mut cache))?;
        let logits = model.logits(&hidden)?;
        let last = logits.get(logits.dim(0)? - 1)?;
        let next = last.argmax(0)?.to_scalar::<u32>()?;
        // The cached step's logits are the full pass's at the same position.
        let diff = (full_last(&tokens)? - &last)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "cached and full logits differ by {diff}");
        generated.push(next);
        tokens.push(next);
        next_input = Tensor::from_vec(vec![next], (1, 1), &Device::Cpu)?;
    }
    assert_eq!(generated, want, "{name}");
    assert_eq!(cache.len(), prompt.len() + want.len() - 1);

    // The host cache: the prompt in two chunks, then token by token, each step's logits the full pass's.
    let mut host = model.decode_cache(1, prompt.len() + want.len());
    let split = prompt.len() / 2;
    let mut tokens = prompt[..split].to_vec();
    model.decode(&tokens, &vec![1; split], split, &mut host, None)?;
    let mut next_input = prompt[split..].to_vec();
    for (step, &wanted) in want.iter().enumerate() {
        tokens.extend(&next_input);
        let n = next_input.len();
        let last = model.logits(&model.decode(&next_input, &vec![1; n], n, &mut host, None)?)?.get(0)?;
        let diff = (full_last(&tokens)? - &last)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "host-cached and full logits differ by {diff} at step {step}");
        assert_eq!(last.argmax(0)?.to_scalar::<u32>()?, wanted);
        next_input = vec![wanted];
    }
    Ok(())
}

/// A stand-in for a tokenizer's decoding: token `i` is the letter `a + i % 26`.
fn letters(ids: &[u32]) -> String {
    ids.iter().map(|&i| char::from(b'a' + (i % 26) as u8)).collect()
}

#[test]
fn generation_stops_where_asked_streams_its_text_and_repeats_with_its_seed() -> TestResult {
    use crate::generate::{generate, Limits, Sampling, StopReason};
    let (model, _, reference) = load()?;
    let prompt: Vec<u32> = serde_json::from_value(reference["prompt"].clone())?;
    let greedy: Vec<u32> = serde_json::from_value(reference["greedy"].clone())?;
    let limits = Limits { max_new_tokens: 6, ..Limits::default() };
    let mut streamed = String::new();
    let out = generate(&model, &prompt, &Sampling::default(), &limits, letters, |t| {
        streamed.push_str(t);
        true
    })?;
    assert_eq!((out.ids.clone(), out.stop), (greedy.clone(), StopReason::MaxNewTokens));
    assert_eq!(streamed, out.text, "the streamed pieces make the text");
    // A stop token ends the output before it; a stop string cuts the text where it begins.
    let at_token = Limits { max_new_tokens: 6, stop_tokens: vec![greedy[2]], ..Limits::default() };
    let out = generate(&model, &prompt, &Sampling::default(), &at_token, letters, |_| true)?;
    assert_eq!((out.ids, out.stop), (greedy[..2].to_vec(), StopReason::StopToken));
    let stop = letters(&greedy[2..4]);
    let mut streamed = String::new();
    let at_string = Limits { max_new_tokens: 6, stop_strings: vec![stop.clone()], ..Limits::default() };
    let out = generate(&model, &prompt, &Sampling::default(), &at_string, letters, |t| {
        streamed.push_str(t);
        true
    })?;
    assert_eq!((out.text.as_str(), out.stop), (letters(&greedy[..2]).as_str(), StopReason::StopString));
    assert_eq!(streamed, out.text, "nothing of the stop string was streamed");
    // An empty stop string stops nothing.
    let empty = Limits { max_new_tokens: 6, stop_strings: vec![String::new()], ..Limits::default() };
    assert_eq!(generate(&model, &prompt, &Sampling::default(), &empty, letters, |_| true)?.ids, greedy);
    // Sampling: the same seed gives the same tokens, another seed (very likely) others.
    let sample = |seed| {
        generate(
            &model,
            &prompt,
            &Sampling { temperature: 1.0, top_p: Some(0.95), seed, ..Sampling::default() },
            &Limits { max_new_tokens: 12, ..Limits::default() },
            letters,
            |_| true,
        )
    };
    assert_eq!(sample(1)?.ids, sample(1)?.ids);
    assert_ne!(sample(1)?.ids, sample(2)?.ids);
    // The host cache (fused kernels, the default) and the composed ops' cache sample the same tokens.
    let mut composed = model.clone();
    composed.set_kernels(crate::Kernels::Composed);
    let long = Limits { max_new_tokens: 12, ..Limits::default() };
    let sampling = Sampling { temperature: 1.0, top_p: Some(0.95), seed: 3, ..Sampling::default() };
    let host = generate(&model, &prompt, &sampling, &long, letters, |_| true)?.ids;
    assert_eq!(host, generate(&composed, &prompt, &sampling, &long, letters, |_| true)?.ids);
    Ok(())
}

#[test]
fn lora_adapters_match_peft_alone_mixed_and_in_their_gradients() -> TestResult {
    use crate::layers::DropoutRng;
    use crate::llama::{DecoderLora, DecoderModule, LoraRun};
    use crate::peft::Route;
    use crate::LoraSpec;
    use mtl_core::Mode;

    let config = LlamaConfig::from_file(&dir().join("config.json"))?;
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("lora.json"))?)?;
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json"))?)?;
    let pb = ParamBuilder::from_safetensors(&dir().join("model.safetensors"), 0, &Device::Cpu)?;
    pb.add_safetensors(&dir().join("lora.safetensors"))?;
    let adapters = vec!["intent".to_string(), "slots".to_string()];
    let spec = LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: Vec::new(), svd: false };
    let lora = DecoderLora { spec, modules: DecoderModule::ALL.to_vec(), adapters };
    let model = Llama::with_lora(&pb, &config, Some(&lora))?;
    let store = pb.finish();
    assert!(store.initialised().is_empty(), "{:?}", store.initialised());
    let (ids, mask, b, s) = batch(&reference)?;
    let off = DropoutRng::new(0.0, 0);
    let run_logits = |routes: &[Route]| -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
        let run = LoraRun { routes, dropout: &off, mode: Mode::Eval, frozen: false };
        Ok(model.logits(&model.forward_with(&ids, Some(&mask), None, Some(&run))?)?.to_vec2::<f32>()?)
    };
    let compare = |got: &[Vec<f32>], want: &Value, what: &str| -> TestResult {
        let want: Vec<Vec<Vec<f64>>> = serde_json::from_value(want.clone())?;
        let mut max_diff = 0f64;
        for (r, row) in want.iter().enumerate() {
            for (i, pos) in row.iter().enumerate() {
                if mask[r * s + i] == 1 {
                    for (a, w) in got[r * s + i].iter().zip(pos) {
                        max_diff = max_diff.max((f64::from(*a) - w).abs());
                    }
                }
            }
        }
        assert!(max_diff < 1e-4, "{what}: max abs difference {max_diff}");
        Ok(())
    };
    for (i, adapter) in ["intent", "slots"].iter().enumerate() {
        compare(&run_logits(&[Route { adapter: i, examples: 0..b }])?, &fixture["logits"][adapter], adapter)?;
    }
    // A frozen pass (generation) gives the same values and records nothing for backward, so that its
    // activations are freed as it goes; a pass for training is recorded.
    let routes = [Route { adapter: 1, examples: 0..b }];
    let frozen = model.forward_with(
        &ids,
        Some(&mask),
        None,
        Some(&LoraRun { routes: &routes, dropout: &off, mode: Mode::Eval, frozen: true }),
    )?;
    let recorded = model.forward_with(
        &ids,
        Some(&mask),
        None,
        Some(&LoraRun { routes: &routes, dropout: &off, mode: Mode::Eval, frozen: false }),
    )?;
    assert!(!frozen.track_op() && recorded.track_op());
    assert_eq!(frozen.to_vec2::<f32>()?, recorded.to_vec2::<f32>()?);
    // Row 0 through "slots", row 1 through "intent", in one pass.
    compare(
        &run_logits(&[Route { adapter: 1, examples: 0..1 }, Route { adapter: 0, examples: 1..2 }])?,
        &fixture["mixed"],
        "mixed",
    )?;

    // The loss through "intent": its LoRA gradients as PEFT's; nothing else gets one.
    let labels: Vec<i64> = rows(&reference["labels"]).concat();
    let routes = [Route { adapter: 0, examples: 0..b }];
    let run = LoraRun { routes: &routes, dropout: &off, mode: Mode::Train, frozen: false };
    let loss =
        causal_lm_loss(&model.logits(&model.forward_with(&ids, Some(&mask), None, Some(&run))?)?, &labels, b, s, -100)?;
    let want = fixture["loss"].as_f64().ok_or("loss")?;
    assert!((f64::from(loss.to_scalar::<f32>()?) - want).abs() < 1e-4);
    let grads = loss.backward()?;
    let norms = fixture["grad_norms"].as_object().ok_or("grad norms")?;
    let mut checked = 0;
    for (name, var) in store.vars() {
        match (norms.get(name), grads.get(var.as_tensor())) {
            (Some(want), Some(g)) => {
                let norm = f64::from(g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?);
                let want = want.as_f64().ok_or("norm")?;
                assert!(norm > 0.0 && (norm - want).abs() <= 1e-4 + 1e-3 * want, "{name}: {norm} vs {want}");
                checked += 1;
            }
            (Some(_), None) => return Err(format!("{name} got no gradient").into()),
            (None, Some(g)) => {
                let norm = g.abs()?.sum_all()?.to_scalar::<f32>()?;
                assert_eq!(norm, 0.0, "{name} is frozen or unused but got a gradient");
            }
            (None, None) => {}
        }
    }
    assert_eq!(checked, 2 * 7 * 2, "A and B of seven projections in two layers");
    Ok(())
}

/// The fused CPU kernels (RMSNorm, SwiGLU, causal grouped-query attention with rotation) against the composed
/// candle ops, on random models of several head groupings: the logits of every real token and the gradient
/// of every parameter, without LoRA (everything trains) and with two LoRA adapters routed by example (only
/// the adapters train, so the gradients also pass through the frozen layers' inputs; LoRA dropout on, its
/// masks drawn again in the fused backward).
/// Logits of every token and the gradient of each trained parameter.
type LogitsAndGrads = (Vec<Vec<f32>>, Vec<Tensor>);

#[test]
fn fused_kernels_equal_the_composed_ops_in_values_and_every_gradient() -> TestResult {
    let cases = [
        (6, 2, 8, false, false),
        (4, 4, 6, true, false),
        (3, 1, 4, true, false),
        (6, 3, 8, false, false),
        (4, 2, 8, true, true),
        (2, 1, 6, false, true),
    ];
    for (heads, kv_heads, head_dim, with_lora, gemma) in cases {
        fused_matches_composed(heads, kv_heads, head_dim, with_lora, gemma, 3, 9, 5)?;
    }
    Ok(())
}

mod properties {
    use proptest::prelude::*;

    proptest! {
        // A fixed seed: the same cases on every run, so the suite cannot turn red by chance.
        #![proptest_config(ProptestConfig { cases: 24, rng_seed: proptest::test_runner::RngSeed::Fixed(20_261_205), ..ProptestConfig::default() })]
        /// Random head groupings and sizes, sequence lengths and padding, Llama or Gemma 3 with a random
        /// window, with and without routed LoRA: the fused kernels equal the composed ops in the logits and
        /// every trained parameter's gradient.
        #[test]
        fn fused_decoder_equals_composed(kv_heads in 1usize..4, groups in 1usize..4, half_dim in 1usize..6,
                                         with_lora in any::<bool>(), gemma in any::<bool>(), window in 1usize..8,
                                         seq in 3usize..12, seed in 0u64..1_000_000) {
            let result = super::fused_matches_composed(kv_heads * groups, kv_heads, 2 * half_dim, with_lora, gemma,
                                                       window, seq, seed);
            prop_assert!(result.is_ok(), "{}", result.err().map(|e| e.to_string()).unwrap_or_default());
        }
    }
}

/// One random model of `heads` query heads over `kv_heads`, compared fused against composed on three rows of
/// `s` tokens (see above); a Gemma model gets a sliding window of `window` on its first layer.
#[allow(clippy::too_many_arguments)]
fn fused_matches_composed(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    with_lora: bool,
    gemma: bool,
    window: usize,
    s: usize,
    seed: u64,
) -> TestResult {
    use crate::layers::DropoutRng;
    use crate::llama::{DecoderLora, DecoderModule, LoraRun};
    use crate::peft::Route;
    use crate::{Kernels, LoraSpec};
    use mtl_core::Mode;
    use rand::{Rng, SeedableRng};

    // Gemma 3: its norms, GELU gates, a score scale that is not the head size, and a sliding window with its
    // own rotary base on the first layer.
    let sliding = gemma.then(|| SlidingWindow { window, layers: vec![true, false], rope_theta: 100.0 });
    let config = LlamaConfig {
        vocab_size: 37,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: !with_lora,
        bos_token_id: None,
        eos_token_ids: vec![0],
        family: if gemma { Family::Gemma3 } else { Family::Llama },
        hidden_act: if gemma { Activation::GeluTanh } else { Activation::Silu },
        query_pre_attn_scalar: gemma.then_some(5.0),
        sliding,
        rope_freq_factors: None,
    };
    let pb = ParamBuilder::new(std::collections::HashMap::new(), 11, &Device::Cpu);
    let lora = with_lora.then(|| DecoderLora {
        spec: LoraSpec { r: 3, alpha: 6.0, dropout: 0.25, targets: Vec::new(), svd: false },
        modules: DecoderModule::ALL.to_vec(),
        adapters: vec!["a".into(), "b".into()],
    });
    let mut model = Llama::with_lora(&pb, &config, lora.as_ref())?;
    let store = pb.finish();
    // LoRA's B starts at zero, which would hide its A's gradient: give every adapter a value. Drawn from the
    // case's seed (not candle's thread-local generator), so that a case is the same on every run: with
    // `Tensor::randn` the recorded regression case failed on some runs only.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 0.3)?;
    for var in store.vars().values() {
        let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.sample(normal)).collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    // Three rows of `s`: no padding, right padding, left padding.
    let b = 3;
    let ids: Vec<u32> = (0..b * s).map(|_| rng.gen_range(0..37)).collect();
    let mut mask = vec![1u32; b * s];
    mask[s + (2 * s / 3).max(1)..2 * s].fill(0);
    mask[2 * s..2 * s + s / 3].fill(0);
    let ids = Tensor::from_vec(ids, (b, s), &Device::Cpu)?;
    let weights: Vec<f32> = (0..b * s * 37).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    let weights = Tensor::from_vec(weights, (b * s, 37), &Device::Cpu)?;
    let real = Tensor::from_vec(mask.iter().map(|&m| m as f32).collect::<Vec<_>>(), (b * s, 1), &Device::Cpu)?;
    // Under LoRA only the adapters train; the pretrained weights are constants.
    let trained: Vec<(&String, &candle_core::Var)> = store
        .vars()
        .iter()
        .filter(|(name, _)| !with_lora || store.role(name).is_some_and(|r| r.is_adapter()))
        .collect();
    // LoRA's dropout draws the same masks in both forms when the generator starts at the same place.
    let dropout = DropoutRng::new(0.0, 9);
    let routes = [Route { adapter: 0, examples: 0..2 }, Route { adapter: 1, examples: 2..3 }];
    let mut run = |kernels: Kernels| -> Result<LogitsAndGrads, Box<dyn std::error::Error>> {
        model.set_kernels(kernels);
        dropout.set_position(0);
        let lora_run = LoraRun { routes: &routes, dropout: &dropout, mode: Mode::Train, frozen: false };
        let hidden = model.forward_with(&ids, Some(&mask), None, with_lora.then_some(&lora_run))?;
        let logits = model.logits(&hidden)?;
        // A loss over the real tokens only: padding rows' values are not defined the same way.
        let loss = (logits.broadcast_mul(&real)? * &weights)?.sum_all()?;
        let grads = loss.backward()?;
        let grads = trained
            .iter()
            .map(|(name, v)| grads.get(v.as_tensor()).cloned().ok_or_else(|| format!("{name}: no gradient")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((logits.broadcast_mul(&real)?.to_vec2()?, grads))
    };
    let (fused, fused_grads) = run(Kernels::Fused)?;
    let (composed, composed_grads) = run(Kernels::Composed)?;
    let what = format!("{heads} heads over {kv_heads}, head_dim {head_dim}, LoRA {with_lora}, Gemma {gemma} (window {window}), seq {s}");
    let diff = fused.iter().flatten().zip(composed.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "{what}: logits differ by {diff}");
    assert!(!trained.is_empty());
    for ((name, _), (f, c)) in trained.iter().zip(fused_grads.iter().zip(&composed_grads)) {
        let scale = c.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
        let diff = (f - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff <= 2e-4 * scale.max(1.0), "{what}: {name} gradient differs by {diff} (scale {scale})");
        assert!(scale > 1e-3, "{what}: {name} has a zero gradient");
    }
    Ok(())
}

/// Each model's logits at every position of `ids` alone, from the full pass.
fn full_pass_logits(model: &Llama, ids: &[u32]) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu)?;
    Ok(model.logits(&model.forward(&t, Some(&vec![1; ids.len()]), None)?)?.to_vec2::<f32>()?)
}

/// Ragged steps through the paged cache equal each sequence's full pass: sequences join and leave between
/// steps, bring a whole prompt, a chunk of one or a single token, cross block boundaries (blocks of 2, so
/// Gemma's window of 3 spans blocks), and a sequence that joins late takes the blocks of one that left.
#[test]
fn paged_steps_equal_each_sequence_alone() -> TestResult {
    for name in MODELS {
        let (model, _, _) = load_model(name)?;
        let vocab = model.config().vocab_size as u32;
        let seq =
            |seed: u32, n: usize| -> Vec<u32> { (0..n as u32).map(|i| 3 + (seed * 7 + i * 5) % (vocab - 3)).collect() };
        let (a, b, c, d) = (seq(1, 9), seq(2, 6), seq(3, 7), seq(4, 5));
        let want: Vec<Vec<Vec<f32>>> =
            [&a, &b, &c, &d].iter().map(|s| full_pass_logits(&model, s)).collect::<Result<_, _>>()?;
        let mut kv = model.paged_cache(2, 12);
        let mut tables = vec![BlockTable::default(); 4];
        let all = [&a, &b, &c, &d];
        // Each step: (sequence, first token, end) chunks.
        let steps: [&[(usize, usize, usize)]; 4] = [
            &[(0, 0, 4), (1, 0, 5)],
            &[(0, 4, 7), (1, 5, 6), (2, 0, 2)],
            &[(0, 7, 8), (2, 2, 7), (3, 0, 3)],
            &[(0, 8, 9), (3, 3, 5)],
        ];
        let mut max_diff = 0f32;
        for (n, chunks) in steps.iter().enumerate() {
            if n == 2 {
                // Sequence 1 has left: its blocks serve sequence 3.
                kv.release(&mut tables[1]);
            }
            for &(s, from, to) in chunks.iter() {
                assert!(kv.reserve(&mut tables[s], to - from), "{name}: step {n}: blocks for sequence {s}");
                assert_eq!(tables[s].len, from);
            }
            let tokens: Vec<u32> = chunks.iter().flat_map(|&(s, from, to)| all[s][from..to].iter().copied()).collect();
            let mut seqs: Vec<(&mut BlockTable, usize)> = Vec::new();
            let mut news = std::collections::BTreeMap::new();
            for &(s, from, to) in chunks.iter() {
                news.insert(s, to - from);
            }
            for (s, table) in tables.iter_mut().enumerate() {
                if let Some(&new) = news.get(&s) {
                    seqs.push((table, new));
                }
            }
            let logits = model.logits(&model.step(&tokens, &mut seqs, &mut kv, None)?)?.to_vec2::<f32>()?;
            for (row, &(s, _, to)) in chunks.iter().enumerate() {
                for (g, w) in logits[row].iter().zip(&want[s][to - 1]) {
                    max_diff = max_diff.max((g - w).abs());
                }
            }
        }
        assert!(max_diff < 1e-4, "{name}: max abs difference {max_diff}");
        // A sequence without room for its tokens is refused.
        let mut full = BlockTable::default();
        full.blocks = vec![tables[0].blocks[0]];
        full.len = 2;
        assert!(model.step(&[3], &mut [(&mut full, 1)], &mut kv, None).is_err());
    }
    Ok(())
}

/// A sequence that starts with the tokens of one that has ended takes its cached blocks (whole ones shared, a
/// partly matching one copied) and computes only the rest, with the logits of a full pass; the blocks stay
/// cached for a third sequence, shared by two at once; another salt shares nothing.
#[test]
fn shared_prefixes_answer_as_computed_ones() -> TestResult {
    for name in MODELS {
        let (model, _, _) = load_model(name)?;
        let vocab = model.config().vocab_size as u32;
        let first: Vec<u32> = (0..12u32).map(|i| 3 + (i * 5 + 1) % (vocab - 3)).collect();
        // The first 9 tokens of `first` (two whole blocks of 4 and one token of the third), then others.
        let second: Vec<u32> = first[..9].iter().copied().chain([4, 5, 6]).collect();
        let mut kv = model.paged_cache(4, 12);
        let run = |kv: &mut PagedKv,
                   table: &mut BlockTable,
                   tokens: &[u32]|
         -> Result<Vec<f32>, Box<dyn std::error::Error>> {
            let new = tokens.len() - table.len;
            assert!(kv.reserve(table, new));
            let hidden = model.step(&tokens[table.len..], &mut [(&mut *table, new)], kv, None)?;
            kv.register(table, tokens, 0);
            Ok(model.logits(&hidden)?.to_vec2::<f32>()?.remove(0))
        };
        let mut a = BlockTable::default();
        run(&mut kv, &mut a, &first)?;
        let first_blocks = a.blocks.clone();
        kv.release(&mut a);
        assert_eq!((kv.free_blocks(), kv.cached_blocks()), (12, 3), "{name}: the full blocks stay cached");
        let mut b = BlockTable::default();
        assert_eq!(kv.share_prefix(&mut b, &second[..11], 0), 9, "{name}: 8 positions shared, 1 copied");
        assert_eq!(b.blocks[..2], first_blocks[..2]);
        assert_ne!(b.blocks[2], first_blocks[2], "{name}: the partly matching block is copied");
        let got = run(&mut kv, &mut b, &second)?;
        let want = full_pass_logits(&model, &second)?;
        let diff = got.iter().zip(want.last().expect("logits")).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: max abs difference {diff}");
        let mut c = BlockTable::default();
        assert_eq!(kv.share_prefix(&mut c, &first[..11], 0), 11, "{name}: a prefix shared by two at once");
        assert_eq!(kv.free_blocks(), 12 - 4, "{name}: two shared blocks and a copy each");
        let mut other = BlockTable::default();
        assert_eq!(kv.share_prefix(&mut other, &first[..11], 1), 0, "{name}: another salt's keys are others");
        for t in [&mut b, &mut c, &mut other] {
            kv.release(t);
        }
        assert_eq!(kv.free_blocks(), 12);
        // A sequence shorter than a block, released with its tail registered, is copied by the next.
        let (short, longer) = (vec![5u32, 6, 7], vec![5u32, 6, 7, 8, 9]);
        let mut s = BlockTable::default();
        run(&mut kv, &mut s, &short)?;
        kv.release_cached(&mut s, &short, 0);
        let mut t = BlockTable::default();
        assert_eq!(kv.share_prefix(&mut t, &longer[..4], 0), 3, "{name}: the short sequence's tail");
        let got = run(&mut kv, &mut t, &longer)?;
        let want = full_pass_logits(&model, &longer)?;
        let diff = got.iter().zip(want.last().expect("logits")).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "{name}: max abs difference {diff} after a copied tail");
        kv.release(&mut t);
    }
    Ok(())
}

/// Sequences of two LoRA adapters in one ragged step answer as PEFT does with each adapter alone.
#[test]
fn paged_steps_route_each_sequence_to_its_adapter() -> TestResult {
    use crate::llama::{DecoderLora, DecoderModule};
    use crate::LoraSpec;

    let config = LlamaConfig::from_file(&dir().join("config.json"))?;
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("lora.json"))?)?;
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json"))?)?;
    let pb = ParamBuilder::from_safetensors(&dir().join("model.safetensors"), 0, &Device::Cpu)?;
    pb.add_safetensors(&dir().join("lora.safetensors"))?;
    let spec = LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: Vec::new(), svd: false };
    let lora =
        DecoderLora { spec, modules: DecoderModule::ALL.to_vec(), adapters: vec!["intent".into(), "slots".into()] };
    let model = Llama::with_lora(&pb, &config, Some(&lora))?;
    let ids = rows(&reference["input_ids"]);
    // Row 0 (6 real tokens) through "slots" (adapter 1), row 1 (8) through "intent" (0), in two steps.
    let (r0, r1): (Vec<u32>, Vec<u32>) =
        (ids[0][..6].iter().map(|&i| i as u32).collect(), ids[1].iter().map(|&i| i as u32).collect());
    let want = |adapter: &str, row: usize, pos: usize| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        Ok(serde_json::from_value(fixture["logits"][adapter][row][pos].clone())?)
    };
    let mut kv = model.paged_cache(4, 8);
    let (mut t0, mut t1) = (BlockTable::default(), BlockTable::default());
    let mut max_diff = 0f64;
    for (from0, to0, from1, to1) in [(0, 5, 0, 3), (5, 6, 3, 8)] {
        assert!(kv.reserve(&mut t0, to0 - from0) && kv.reserve(&mut t1, to1 - from1));
        let tokens: Vec<u32> = r1[from1..to1].iter().chain(&r0[from0..to0]).copied().collect();
        let mut seqs = [(&mut t1, to1 - from1), (&mut t0, to0 - from0)];
        let logits = model.logits(&model.step(&tokens, &mut seqs, &mut kv, Some(&[0, 1]))?)?.to_vec2::<f32>()?;
        for (got, want) in [(&logits[0], want("intent", 1, to1 - 1)?), (&logits[1], want("slots", 0, to0 - 1)?)] {
            for (g, w) in got.iter().zip(&want) {
                max_diff = max_diff.max((f64::from(*g) - w).abs());
            }
        }
    }
    assert!(max_diff < 1e-4, "max abs difference {max_diff}");
    assert!(
        model.step(&[3], &mut [(&mut t0, 1)], &mut kv, None).is_err(),
        "a LoRA model needs each sequence's adapter"
    );
    Ok(())
}
