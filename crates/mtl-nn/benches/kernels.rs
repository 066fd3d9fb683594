//! Per-kernel benchmarks of the fused CPU encoder at the shapes of all-MiniLM-L6-v2 (hidden 384, 12 heads,
//! intermediate 1536) on a batch of 16 × 128 tokens, and the whole encoder forward and backward.
//! Run with `cargo bench -p mtl-nn --bench kernels`; throughput is in floating-point operations where that
//! is meaningful (matrix products), elements otherwise.

use std::collections::{BTreeMap, HashMap};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mtl_core::{HostBatch, Mode, Targets, TaskId, TaskKind};
use mtl_nn::cpu::encoder::{self, Dims};
use mtl_nn::cpu::gemm::{matmul, Threads, View, ViewMut};
use mtl_nn::cpu::math;
use mtl_nn::{BertConfig, Kernels, ModelSpec, MultiTaskModel};

const BATCH: usize = 16;
const SEQ: usize = 128;
const HIDDEN: usize = 384;
const HEADS: usize = 12;
const INTER: usize = 1536;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 16_777_216.0) - 0.5)
        .collect()
}

fn dims() -> Dims {
    Dims { batch: BATCH, seq: SEQ, hidden: HIDDEN, heads: HEADS, intermediate: INTER, eps: 1e-12, bf16: false }
}

fn gemm(c: &mut Criterion) {
    let n = BATCH * SEQ;
    let mut group = c.benchmark_group("gemm");
    // The encoder's products: projections (n×h·h×h), feed-forward in (n×h·h×4h) and out (n×4h·4h×h), and a
    // weight gradient (h×n·n×4h).
    for (name, m, k, p, a_t) in [
        ("qkv", n, HIDDEN, HIDDEN, false),
        ("ffn_in", n, HIDDEN, INTER, false),
        ("ffn_out", n, INTER, HIDDEN, false),
        ("weight_grad", HIDDEN, n, INTER, true),
    ] {
        let a = data(m * k, 1);
        let b = data(k * p, 2);
        let mut out = vec![0f32; m * p];
        group.throughput(Throughput::Elements((2 * m * k * p) as u64));
        group.bench_function(BenchmarkId::new(name, format!("{m}x{k}x{p}")), |bench| {
            bench.iter(|| {
                let a = if a_t { View::new(&a, k, m).t() } else { View::new(&a, m, k) };
                matmul(ViewMut::new(&mut out, m, p), a, View::new(&b, p, k).t(), 1.0, false, Threads::All)
            })
        });
    }
    group.finish();
}

fn attention(c: &mut Criterion) {
    let d = dims();
    let n = BATCH * SEQ;
    let qkv = data(n * 3 * HIDDEN, 3);
    let mask: Vec<u32> = (0..n).map(|i| u32::from(i % SEQ < SEQ - (i / SEQ) * 4)).collect();
    let mut probs = vec![0f32; BATCH * HEADS * SEQ * SEQ];
    let dctx = data(n * HIDDEN, 4);
    let mut group = c.benchmark_group("attention");
    group.throughput(Throughput::Elements((BATCH * HEADS * SEQ * SEQ) as u64));
    group.bench_function("forward", |b| b.iter(|| encoder::attention_forward(&d, &qkv, &mask, None, Some(&mut probs))));
    encoder::attention_forward(&d, &qkv, &mask, None, Some(&mut probs));
    group.bench_function("backward", |b| b.iter(|| encoder::attention_backward(&d, &qkv, &probs, None, &dctx)));
    group.finish();
}

fn rowwise(c: &mut Criterion) {
    let n = BATCH * SEQ;
    let (branch, residual, dy) = (data(n * HIDDEN, 5), data(n * HIDDEN, 6), data(n * HIDDEN, 7));
    let (gamma, beta) = (vec![1.1f32; HIDDEN], vec![0.1f32; HIDDEN]);
    let (mut y, mut xhat, mut rstd) = (vec![0f32; n * HIDDEN], vec![0f32; n * HIDDEN], vec![0f32; n]);
    let mut group = c.benchmark_group("rowwise");
    group.throughput(Throughput::Elements((n * HIDDEN) as u64));
    group.bench_function("add_layer_norm", |b| {
        b.iter(|| encoder::add_norm(&branch, None, None, &residual, &gamma, &beta, 1e-12, &mut y, &mut xhat, &mut rstd))
    });
    let (mut dg, mut db) = (vec![0f32; HIDDEN], vec![0f32; HIDDEN]);
    group.bench_function("layer_norm_backward", |b| {
        b.iter(|| encoder::norm_backward(&dy, &xhat, &rstd, &gamma, &mut dg, &mut db))
    });
    let u = data(n * INTER, 8);
    let mut g = vec![0f32; n * INTER];
    group.throughput(Throughput::Elements((n * INTER) as u64));
    group.bench_function("gelu", |b| {
        b.iter(|| {
            math::simd(
                #[inline(always)]
                || {
                    for (g, &u) in g.iter_mut().zip(&u) {
                        *g = math::gelu(u);
                    }
                },
            )
        })
    });
    // Dropout multipliers: a layer's attention mask drawn whole (in parallel), and one head's block on one
    // thread, as the attention kernels draw it from the seed.
    let mut mask = vec![0f32; BATCH * HEADS * SEQ * SEQ];
    group.throughput(Throughput::Elements(mask.len() as u64));
    group.bench_function("mask", |b| b.iter(|| math::fill_mask(7, 0.1, &mut mask)));
    let head = &mut mask[..SEQ * SEQ];
    group.throughput(Throughput::Elements(head.len() as u64));
    group.bench_function("mask_head", |b| b.iter(|| math::fill_mask_at(7, 0.1, 5 * SEQ * SEQ, head)));
    group.finish();
}

fn encoder_stack(c: &mut Criterion) {
    let config = BertConfig {
        model_type: "bert".into(),
        pad_token_id: None,
        relative_attention_num_buckets: None,
        vocab_size: 30522,
        hidden_size: HIDDEN,
        num_hidden_layers: 6,
        num_attention_heads: HEADS,
        intermediate_size: INTER,
        hidden_act: mtl_nn::Activation::Gelu,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        position_embedding_type: None,
        embedding_size: None,
        disentangled: None,
        modern: None,
    };
    let tasks = BTreeMap::from([(
        TaskId::new("tags").expect("valid"),
        mtl_nn::HeadSpec::new(TaskKind::TokenClassification, 9),
    )]);
    let n = BATCH * SEQ;
    let batch = HostBatch {
        batch: BATCH,
        seq: SEQ,
        input_ids: (0..n).map(|i| (i * 7919 % 30000) as u32).collect(),
        token_type_ids: vec![0; n],
        attention_mask: vec![1; n],
        word_starts: vec![vec![]; BATCH],
        targets: BTreeMap::from([(
            TaskId::new("tags").expect("valid"),
            Targets::Tokens((0..n).map(|i| (i % 9) as i64).collect()),
        )]),
    };
    let mut group = c.benchmark_group("encoder_16x128");
    group.sample_size(10);
    for kernels in [Kernels::Fused, Kernels::Composed] {
        let mut model = MultiTaskModel::build(
            &ModelSpec { bert: &config, tasks: &tasks, dropout: 0.1, seed: 0, peft: None },
            HashMap::new(),
            &Device::Cpu,
        )
        .expect("model");
        model.set_kernels(kernels);
        let name = format!("{kernels:?}").to_lowercase();
        group.bench_function(BenchmarkId::new("inference", &name), |b| {
            b.iter(|| model.encode(&batch, Mode::Eval).expect("forward"))
        });
        group.bench_function(BenchmarkId::new("train_forward_backward", &name), |b| {
            b.iter(|| {
                let loss = model.losses(&batch, Mode::Train).expect("forward").remove(0).loss;
                model.backward(&loss).expect("backward")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, gemm, attention, rowwise, encoder_stack);
criterion_main!(benches);
