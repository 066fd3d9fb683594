//! Side-by-side workloads for `bench/vs-pytorch`: W1, one training step (forward, the sum of a [CLS]
//! cross-entropy and a token cross-entropy, backward, AdamW over every parameter); W2, one inference forward
//! pass. Prints one JSON line with the median and every step time, and the phase split of the training step.
//! With `--lora`, W1 trains a shared LoRA adapter (r 8, alpha 16, dropout 0.1, on all six linear layers of every
//! block) and the heads on the frozen encoder, AdamW over those only (W3).
//! A further workload, `data`, times the input pipeline of a config (reading, tokenising, collating one epoch of
//! training batches), to compare with the model's own speed.

// Large tensors are allocated and freed at every op; mimalloc keeps the pages instead of returning them to
// the kernel and faulting them in again (measured: a large share of a training step with glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod rates;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::Parser;
use mtl_core::{HostBatch, LinearModule, Mode, Targets, TaskId, TaskKind};
use mtl_nn::{BertConfig, LoraSpec, ModelSpec, MultiTaskModel, PeftKind, PeftSpec, SHARED_ADAPTER};
use mtl_train::{AdamW, AdamWConfig, ParamGroup};

#[derive(Parser)]
struct Args {
    /// `train` (W1), `infer` (W2), `int8` (W2 in f32 and int8, alternating), `data`, `gemm`, `rates` (multiply-accumulate rates of f32 and int8 instructions) or `llm-lora`.
    workload: String,
    #[arg(long, default_value = "assets/models/all-MiniLM-L6-v2")]
    model: PathBuf,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Quantise the encoder to int8 before timing (`infer`).
    #[arg(long)]
    int8: bool,
    /// bf16 products on AMX (`gemm`, and the encoder's projections in `train` and `infer`).
    #[arg(long)]
    bf16: bool,
    /// `train`: LoRA on the frozen encoder instead of full fine-tuning (W3).
    #[arg(long)]
    lora: bool,
    /// `train` and `infer`: the composed layer-by-layer path (candle ops) instead of the fused encoder, to
    /// measure what the fused one saves.
    #[arg(long)]
    composed: bool,
    /// `llm-lora`: the base dequantised to f32 instead of kept in its GGUF blocks.
    #[arg(long)]
    f32_base: bool,
    /// `llm-lora`: a random model of Llama 3.2 1B's shape (1.24B parameters, Q4_0) instead of SmolLM2.
    #[arg(long)]
    random_1b: bool,
    /// The config whose training data the `data` workload reads.
    #[arg(long, default_value = "examples/atis/config.toml")]
    config: PathBuf,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// A deterministic batch: token ids from a fixed sequence, every position real, labels on every token.
fn batch(b: usize, s: usize, vocab: usize) -> HostBatch {
    let ids: Vec<u32> =
        (0..b * s).map(|i| if i % s == 0 { 101 } else { (1000 + (i * 7919) % (vocab - 1000)) as u32 }).collect();
    let mut targets = BTreeMap::new();
    targets.insert(TaskId::new("cls").expect("valid"), Targets::Class((0..b).map(|i| (i % 5) as i64).collect()));
    targets.insert(TaskId::new("tok").expect("valid"), Targets::Tokens((0..b * s).map(|i| (i % 9) as i64).collect()));
    HostBatch {
        batch: b,
        seq: s,
        input_ids: ids,
        token_type_ids: vec![0; b * s],
        attention_mask: vec![1; b * s],
        word_starts: vec![(0..s).map(Some).collect(); b],
        targets,
    }
}

/// GFLOP/s of `m×k · k×n` products at the encoder's shapes (`--model`'s hidden and intermediate sizes,
/// `--batch × --seq` tokens), for each storage order of the operands (`N`: row-major as used, `T`: stored
/// transposed), as the fused encoder calls them; in f32, or with `--bf16` on AMX. The last line is JSON with
/// the best rate over all of them (`peak_gflops`).
fn gemm_layouts(args: &Args) -> Result<()> {
    use mtl_nn::cpu::gemm::{matmul, Threads, View, ViewMut};
    let bert = BertConfig::from_file(&args.model.join("config.json"))?;
    let (h, i, n) = (bert.hidden_size, bert.intermediate_size, args.batch * args.seq);
    let mut rows = Vec::new();
    for (m, k, p) in [(n, h, 3 * h), (n, h, h), (n, h, i), (n, i, h), (i, n, h), (h, n, i)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * p];
        let mut c = vec![0f32; m * p];
        let mut line = format!("{m:5}x{k:5}x{p:5}");
        for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut times = Vec::new();
            for _ in 0..args.warmup + args.steps {
                let t0 = Instant::now();
                let av = if at { View::new(&a, k, m).t() } else { View::new(&a, m, k) };
                let bv = if bt { View::new(&b, p, k).t() } else { View::new(&b, k, p) };
                if args.bf16 {
                    mtl_nn::cpu::amx::matmul_bf16(ViewMut::new(&mut c, m, p), av, bv, 1.0, false, Threads::All);
                } else {
                    matmul(ViewMut::new(&mut c, m, p), av, bv, 1.0, false, Threads::All);
                }
                times.push(t0.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (m * k * p) as f64 / median(&times[args.warmup..]) / 1e9;
            let layout = format!("{}{}", if at { "T" } else { "N" }, if bt { "T" } else { "N" });
            line += &format!("  {layout} {gflops:6.1}");
            rows.push(serde_json::json!({"shape": [m, k, p], "layout": layout, "gflops": gflops}));
        }
        println!("{line}  GFLOP/s");
    }
    let peak = rows.iter().filter_map(|r| r["gflops"].as_f64()).fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({"engine": "mtl", "workload": "gemm", "bf16": args.bf16, "peak_gflops": peak, "rows": rows})
    );
    Ok(())
}

/// Times reading, tokenising (with label mapping) and collating one epoch of the training split of `--config`.
fn data(args: &Args) -> Result<()> {
    use mtl_data::{collate, epoch_batches, Batching, Dataset, Example, LabelMap, TextEncoder};
    let config = mtl_config::Config::load(&args.config, &[])?;
    let bert = BertConfig::from_file(&config.model.path.join("config.json"))?;
    let encoder = TextEncoder::from_file(
        &config.model.path.join("tokenizer.json"),
        config.model.max_len.min(bert.max_position_embeddings),
    )?;
    let t = &config.training;
    let batching = Batching { batch_size: t.batch_size, group_by_length: t.group_by_length, max_tokens: t.max_tokens };
    let mut phases: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut examples = 0;
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let raw = mtl_data::read_split(&config, mtl_config::Split::Train)?;
        let t1 = Instant::now();
        let labels = LabelMap::for_tasks(&config, &raw)?;
        let data = Dataset::encode(raw, &encoder, &labels, &config)?;
        let kinds: BTreeMap<TaskId, (TaskKind, usize)> =
            config.tasks.iter().map(|(n, t)| (n.clone(), (t.kind, labels[n].len()))).collect();
        let t2 = Instant::now();
        let lengths: Vec<usize> = data.examples.iter().map(|e| e.encoded.ids.len()).collect();
        for chunk in epoch_batches(&lengths, &batching, t.seed, 1) {
            let batch: Vec<&Example> = chunk.iter().map(|&i| &data.examples[i]).collect();
            std::hint::black_box(collate(&batch, &kinds));
        }
        let t3 = Instant::now();
        examples = data.len();
        if i >= args.warmup {
            phases.entry("read").or_default().push((t1 - t0).as_secs_f64() * 1e3);
            phases.entry("tokenize").or_default().push((t2 - t1).as_secs_f64() * 1e3);
            phases.entry("collate_epoch").or_default().push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let phases: BTreeMap<&str, f64> = phases.iter().map(|(k, v)| (*k, median(v))).collect();
    let per_example_us: BTreeMap<&str, f64> = phases.iter().map(|(k, v)| (*k, v * 1e3 / examples as f64)).collect();
    println!(
        "{}",
        serde_json::json!({"engine": "mtl", "workload": "data", "examples": examples, "phases_ms": phases, "per_example_us": per_example_us})
    );
    Ok(())
}

/// One LoRA training step of the default decoder (SmolLM2-135M from its GGUF file, its Q4_1 matrices kept
/// quantised unless `--f32-base`): r 8, alpha 16 on
/// all seven projections, the causal LM loss on every position of a deterministic batch, backward, AdamW over the
/// LoRA parameters. The counterpart of `bench/llm_lora_step.py` (transformers + PEFT).
fn llm_lora(args: &Args) -> Result<()> {
    use mtl_nn::llama::{causal_lm_loss, DecoderLora, DecoderModule, Llama, LoraRun};
    let (config, weights) = if args.random_1b {
        random_llama_1b()?
    } else {
        let dir = std::path::Path::new("assets/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        let gguf = mtl_nn::gguf::read_llama(dir, &Device::Cpu, !args.f32_base)?;
        (gguf.config, gguf.weights)
    };
    let pb = weights.into_builder(0, &Device::Cpu)?;
    let spec = mtl_nn::LoraSpec { r: 8, alpha: 16.0, dropout: 0.0, targets: Vec::new(), svd: false };
    let lora = DecoderLora { spec, modules: DecoderModule::ALL.to_vec(), adapters: vec!["default".into()] };
    let model = Llama::with_lora(&pb, &config, Some(&lora))?;
    let store = pb.finish();
    let params = store
        .with_roles()
        .filter(|(_, _, role)| role.is_adapter())
        .map(|(n, v, _)| (n.clone(), v.clone(), ParamGroup { lr: 1e-4, weight_decay: 0.0 }));
    let mut opt = AdamW::new(params, AdamWConfig::default());
    let (b, s) = (args.batch, args.seq);
    let vocab = config.vocab_size;
    let ids: Vec<u32> = (0..b * s).map(|i| (100 + (i * 7919) % (vocab - 100)) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let ids = candle_core::Tensor::from_vec(ids, (b, s), &Device::Cpu)?;
    let routes = [mtl_nn::Route { adapter: 0, examples: 0..b }];
    let off = mtl_nn::DropoutRng::new(0.0, 0);
    let mut times = Vec::new();
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let run = LoraRun { routes: &routes, dropout: &off, mode: Mode::Train, frozen: false };
        let logits = model.logits(&model.forward_with(&ids, None, None, Some(&run))?)?;
        let loss = causal_lm_loss(&logits, &labels, b, s, -100)?;
        let grads = mtl_train::named_grads(&loss.backward()?, store.vars());
        opt.step(&grads, 1.0, Some(1.0))?;
        if i >= args.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{}",
        serde_json::json!({"engine": "mtl", "workload": "llm-lora", "batch": b, "seq": s, "median_ms": median(&times), "times_ms": times})
    );
    Ok(())
}

/// A random decoder of Llama 3.2 1B's shape (hidden 2,048, 16 layers, 32 query and 8 key/value heads, FFN
/// 8,192, vocabulary 128,256, tied embeddings): every matrix Q4_0, drawn and quantised a block of rows at a
/// time so that the f32 values never exist whole.
fn random_llama_1b() -> Result<(mtl_nn::llama::LlamaConfig, mtl_nn::llama::LlamaWeights)> {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    let config = mtl_nn::llama::LlamaConfig {
        vocab_size: 128_256,
        hidden_size: 2048,
        intermediate_size: 8192,
        num_hidden_layers: 16,
        num_attention_heads: 32,
        num_key_value_heads: 8,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![0],
        family: mtl_nn::llama::Family::Llama,
        hidden_act: mtl_nn::llama::Activation::Silu,
        query_pre_attn_scalar: None,
        sliding: None,
        // Llama 3.2's rotary scaling.
        rope_freq_factors: Some(
            mtl_nn::llama::llama3_rope_factors(
                &serde_json::json!({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}),
                500_000.0,
                64,
            )
            .map_err(anyhow::Error::msg)?,
        ),
    };
    let matrix = |rows: usize, cols: usize| -> Result<mtl_nn::cpu::quant::QuantMatrix> {
        let mut bytes = Vec::new();
        for first in (0..rows).step_by(4096) {
            let n = 4096.min(rows - first);
            let part = candle_core::Tensor::randn(0f32, 0.02, (n, cols), &Device::Cpu)?;
            bytes.extend_from_slice(&QTensor::quantize(&part, GgmlDType::Q4_0)?.data()?);
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, GgmlDType::Q4_0)?;
        Ok(mtl_nn::cpu::quant::QuantMatrix::new(QTensor::new(storage, (rows, cols))?)?)
    };
    let (h, i, kv) = (config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim);
    let mut weights = mtl_nn::llama::LlamaWeights::default();
    weights.quantized.insert("model.embed_tokens.weight".into(), matrix(config.vocab_size, h)?);
    weights
        .dense
        .insert("model.norm.weight".into(), candle_core::Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?);
    for n in 0..config.num_hidden_layers {
        let p = format!("model.layers.{n}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", i, h),
            ("mlp.up_proj", i, h),
            ("mlp.down_proj", h, i),
        ] {
            weights.quantized.insert(format!("{p}.{name}.weight"), matrix(rows, cols)?);
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let ones = candle_core::Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?;
            weights.dense.insert(format!("{p}.{norm}.weight"), ones);
        }
    }
    Ok((config, weights))
}

fn main() -> Result<()> {
    mtl_train::process::setup();
    let args = Args::parse();
    mtl_train::process::on_pool(|| bench(&args))
}

fn bench(args: &Args) -> Result<()> {
    if args.workload == "llm-lora" {
        return llm_lora(args);
    }
    if args.workload == "rates" {
        return rates::rates();
    }
    if args.workload == "gemm" {
        if args.bf16 {
            anyhow::ensure!(mtl_nn::cpu::amx::available(), "--bf16 needs a CPU with AMX (and Linux 5.16 or later)");
        }
        return gemm_layouts(args);
    }
    let bert = BertConfig::from_file(&args.model.join("config.json"))?;
    let tasks = BTreeMap::from([
        (TaskId::new("cls")?, mtl_nn::HeadSpec::new(TaskKind::Classification, 5)),
        (TaskId::new("tok")?, mtl_nn::HeadSpec::new(TaskKind::TokenClassification, 9)),
    ]);
    let lora = args.lora.then(|| PeftSpec {
        kind: PeftKind::Lora(LoraSpec {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: LinearModule::ALL.to_vec(),
            svd: false,
        }),
        adapters: vec![SHARED_ADAPTER.to_string()],
    });
    let spec = ModelSpec { bert: &bert, tasks: &tasks, dropout: 0.1, seed: 0, peft: lora.as_ref() };
    let mut model = MultiTaskModel::load(&spec, &args.model.join("model.safetensors"), false, &Device::Cpu)?;
    let hb = batch(args.batch, args.seq, bert.vocab_size);
    if args.workload == "int8" {
        // f32 and int8 inference of the same model (int8 dynamic where the CPU has AMX-INT8 or AVX2, and weight-only),
        // alternating step by step, so that all see the same machine; plus the bytes their weights take.
        use mtl_nn::cpu::int8::Int8Compute;
        let load_int8 = |compute: Int8Compute| -> Result<MultiTaskModel> {
            let mut m = MultiTaskModel::load(&spec, &args.model.join("model.safetensors"), false, &Device::Cpu)?;
            m.quantize_int8()?;
            m.set_int8_compute(compute);
            Ok(m)
        };
        let int8 = load_int8(Int8Compute::default())?;
        let weight_only = load_int8(Int8Compute::WeightOnly)?;
        let dynamic = mtl_nn::cpu::int8::dynamic_available();
        let (mut f32_times, mut int8_times, mut weight_only_times) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..args.warmup + args.steps {
            let mut runs = vec![(&model, &mut f32_times), (&int8, &mut int8_times)];
            if dynamic {
                runs.push((&weight_only, &mut weight_only_times));
            }
            for (m, times) in runs {
                let t0 = Instant::now();
                std::hint::black_box(m.predict(&hb)?);
                if i >= args.warmup {
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let bytes = |m: &MultiTaskModel| {
            4 * m.params().num_params() + m.bert().int8_layers().map_or(0, |l| l.iter().map(|l| l.weight_bytes()).sum())
        };
        let (f, q) = (median(&f32_times), median(&int8_times));
        println!(
            "{}",
            serde_json::json!({"workload": "int8", "batch": args.batch, "seq": args.seq,
                "int8_compute": match (dynamic, mtl_nn::cpu::amx::int8_available()) {
                    (true, true) => "dynamic (AMX-INT8)",
                    (true, false) => "dynamic (AVX2)",
                    (false, _) => "weight-only",
                },
                "f32_median_ms": f, "int8_median_ms": q, "int8_over_f32": q / f,
                "weight_only_median_ms": (!weight_only_times.is_empty()).then(|| median(&weight_only_times)),
                "f32_weight_bytes": bytes(&model), "int8_weight_bytes": bytes(&int8),
                "f32_times_ms": f32_times, "int8_times_ms": int8_times, "weight_only_times_ms": weight_only_times})
        );
        return Ok(());
    }
    if args.int8 {
        model.quantize_int8()?;
    }
    if args.composed {
        model.set_kernels(mtl_nn::Kernels::Composed);
    }
    if args.bf16 {
        anyhow::ensure!(mtl_nn::cpu::amx::available(), "--bf16 needs a CPU with AMX (and Linux 5.16 or later)");
        model.set_precision(mtl_nn::Precision::Bf16);
    }
    let mut times = Vec::new();
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // The encoder's own phases (mtl_nn::cpu::profile), and what is left of a pass: embeddings, heads, losses
    // and candle's graph around the encoder.
    let record = |phases: &mut BTreeMap<String, Vec<f64>>, pass: &str, total_ms: f64| {
        let encoder = mtl_nn::cpu::profile::take();
        let inside: f64 = encoder.iter().map(|(_, ms)| ms).sum();
        for (name, ms) in encoder {
            phases.entry(format!("{pass}.encoder.{name}")).or_default().push(ms);
        }
        phases.entry(format!("{pass}.rest")).or_default().push(total_ms - inside);
        phases.entry(pass.to_string()).or_default().push(total_ms);
    };
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    match args.workload.as_str() {
        "train" => {
            // Under LoRA only the adapters and the heads train.
            let trained = |n: &str| !args.lora || model.params().is_added(n);
            let vars: BTreeMap<_, _> =
                model.params().vars().iter().filter(|(n, _)| trained(n)).map(|(n, v)| (n.clone(), v.clone())).collect();
            let params = vars.iter().map(|(n, v)| {
                let wd = if n.ends_with(".bias") || n.contains("LayerNorm") { 0.0 } else { 0.01 };
                (n.clone(), v.clone(), ParamGroup { lr: 1e-5, weight_decay: wd })
            });
            let mut opt = AdamW::new(params, AdamWConfig::default());
            for i in 0..args.warmup + args.steps {
                mtl_nn::cpu::profile::enable(i >= args.warmup);
                let t0 = Instant::now();
                let losses = model.losses(&hb, Mode::Train)?;
                let total = (&losses[0].loss + &losses[1].loss)?;
                let _ = total.to_scalar::<f32>()?;
                let t1 = Instant::now();
                if i >= args.warmup {
                    record(&mut phases, "forward", ms(t1 - t0));
                }
                let grads = mtl_train::named_grads(&model.backward(&total)?, &vars);
                let t2 = Instant::now();
                if i >= args.warmup {
                    record(&mut phases, "backward", ms(t2 - t1));
                }
                opt.step(&grads, 1.0, Some(1.0))?;
                drop(grads);
                let t3 = Instant::now();
                if i >= args.warmup {
                    times.push(ms(t3 - t0));
                    phases.entry("optimizer".into()).or_default().push(ms(t3 - t2));
                }
            }
        }
        "infer" => {
            for i in 0..args.warmup + args.steps {
                mtl_nn::cpu::profile::enable(i >= args.warmup);
                let t0 = Instant::now();
                let out = model.predict(&hb)?;
                std::hint::black_box(out);
                if i >= args.warmup {
                    times.push(ms(t0.elapsed()));
                    record(&mut phases, "forward", ms(t0.elapsed()));
                }
            }
        }
        "data" => return data(args),
        other => {
            anyhow::bail!("unknown workload {other:?}; valid choices: train, infer, int8, data, gemm, rates, llm-lora")
        }
    }
    mtl_nn::cpu::profile::enable(false);
    let phases: BTreeMap<&str, f64> = phases.iter().map(|(k, v)| (k.as_str(), median(v))).collect();
    println!(
        "{}",
        serde_json::json!({"engine": "mtl", "workload": args.workload, "median_ms": median(&times), "times_ms": times, "phases_ms": phases})
    );
    Ok(())
}
