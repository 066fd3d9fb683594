//! DeBERTa-v2/v3's disentangled attention (`model_type = "deberta-v2"`): BERT's blocks whose attention scores
//! add, to the content-to-content term `q_i · k_j`, a content-to-position term `q_i · P_k[δ(i, j)]` and a
//! position-to-content term `k_j · P_q[δ(i, j)]`, where `δ(i, j)` is the row of `i − j` (log-bucketed beyond
//! half the buckets) in a table of relative position embeddings shared by every layer, and `P_k`, `P_q` that
//! table through the layer's own key and query projections (`share_att_key`). All three are scaled by
//! `1 / √(d · 3)`. The composed path computes it (candle's gather, differentiable).

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::attention::AttentionSpec;
use crate::Result;

/// The settings of DeBERTa-v2's relative attention, from its `config.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disentangled {
    /// Rows on each side of the relative embedding table: `position_buckets`, or `max_relative_positions`
    /// without buckets (the table has twice as many).
    pub span: usize,
    /// Log buckets beyond `position_buckets / 2`, up to `max_relative_positions`: `(buckets, max_position)`.
    pub buckets: Option<(i64, i64)>,
    /// The content-to-position term (`"c2p"` in `pos_att_type`).
    pub c2p: bool,
    /// The position-to-content term (`"p2c"`).
    pub p2c: bool,
    /// A LayerNorm on the relative embeddings (`norm_rel_ebd = "layer_norm"`).
    pub norm: bool,
    /// Absolute position embeddings added to the input (`position_biased_input`; DeBERTa-v3 has none).
    pub absolute_positions: bool,
}

impl Disentangled {
    /// The settings of a DeBERTa-v2 `config.json` (as a JSON object), or why they are not supported.
    pub(crate) fn from_config(v: &serde_json::Value) -> std::result::Result<Self, String> {
        if v["relative_attention"].as_bool() != Some(true) {
            return Err("DeBERTa-v2 without relative attention (`relative_attention: false`) is not supported".into());
        }
        if v["share_att_key"].as_bool() != Some(true) {
            return Err("DeBERTa-v2 with separate position projections (`share_att_key: false`) is not supported; \
                        DeBERTa-v3 and DeBERTa-v2-xlarge share them"
                .into());
        }
        if v["conv_kernel_size"].as_u64().unwrap_or(0) > 0 {
            return Err(
                "DeBERTa-v2's convolution layer (`conv_kernel_size`, as deberta-v2-xlarge) is not supported yet; \
                        DeBERTa-v3 has none"
                    .into(),
            );
        }
        if v["embedding_size"].as_u64().is_some_and(|e| Some(e) != v["hidden_size"].as_u64()) {
            return Err(
                "DeBERTa-v2 with embeddings narrower than its blocks (`embedding_size`) is not supported".into()
            );
        }
        if v["attention_head_size"].as_u64().is_some_and(|d| {
            Some(d) != v["hidden_size"].as_u64().zip(v["num_attention_heads"].as_u64()).map(|(h, n)| h / n.max(1))
        }) {
            return Err("DeBERTa-v2 with `attention_head_size` other than hidden_size / heads is not supported".into());
        }
        let kinds: Vec<String> = match &v["pos_att_type"] {
            serde_json::Value::Array(a) => a.iter().filter_map(|k| k.as_str()).map(str::to_lowercase).collect(),
            serde_json::Value::String(s) => s.split('|').map(|k| k.trim().to_lowercase()).collect(),
            _ => Vec::new(),
        };
        if let Some(other) = kinds.iter().find(|k| !matches!(k.as_str(), "c2p" | "p2c")) {
            return Err(format!("pos_att_type {other:?} is not supported (c2p and p2c are)"));
        }
        let max_position = v["max_position_embeddings"].as_i64().unwrap_or(512);
        let max_relative = match v["max_relative_positions"].as_i64().unwrap_or(-1) {
            m if m < 1 => max_position,
            m => m,
        };
        let buckets = v["position_buckets"].as_i64().unwrap_or(-1);
        if buckets > 0 && max_relative - 1 <= buckets / 2 {
            // The logarithmic buckets would fold back (transformers' own results are meaningless there).
            return Err(format!(
                "position_buckets {buckets} needs max_relative_positions above {} (it is {max_relative})",
                buckets / 2 + 1
            ));
        }
        let span = if buckets > 0 { buckets } else { max_relative };
        let norm =
            v["norm_rel_ebd"].as_str().unwrap_or("none").to_lowercase().split('|').any(|k| k.trim() == "layer_norm");
        Ok(Self {
            span: span as usize,
            buckets: (buckets > 0 && max_relative > 0).then_some((buckets, max_relative)),
            c2p: kinds.iter().any(|k| k == "c2p"),
            p2c: kinds.iter().any(|k| k == "p2c"),
            norm,
            absolute_positions: v["position_biased_input"].as_bool().unwrap_or(true),
        })
    }

    /// The scores' divisor's factor: 1, plus one for each position term.
    fn factor(&self) -> usize {
        1 + usize::from(self.c2p) + usize::from(self.p2c)
    }

    /// The relative distance `i − j`, log-bucketed as transformers' `make_log_bucket_position` does (in
    /// float32, as PyTorch computes it).
    fn bucket(&self, relative: i64) -> i64 {
        let Some((size, max_position)) = self.buckets else { return relative };
        let mid = size / 2;
        let abs = if relative < mid && relative > -mid { mid - 1 } else { relative.abs() };
        if abs <= mid {
            return relative;
        }
        let log = ((abs as f32 / mid as f32).ln() / ((max_position - 1) as f32 / mid as f32).ln() * (mid - 1) as f32)
            .ceil()
            + mid as f32;
        log as i64 * relative.signum()
    }

    /// For `s` positions: the rows of the relative table the pairs use (`lo..hi`), and each pair's row
    /// `δ(i, j)` less `lo`, row-major `[i][j]`.
    pub(crate) fn rows(&self, s: usize) -> (Range<usize>, Vec<u32>) {
        let span = self.span as i64;
        let row = |i: usize, j: usize| (self.bucket(i as i64 - j as i64) + span).clamp(0, 2 * span - 1);
        // The rows of every distance the batch has (the bucketing is monotonic for the settings accepted,
        // but the extremes are taken over all of them).
        let far = s.saturating_sub(1) as i64;
        let rows_of = (-far..=far).map(|r| (self.bucket(r) + span).clamp(0, 2 * span - 1));
        let (lo, hi) = rows_of.fold((i64::MAX, i64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)));
        let index = (0..s).flat_map(|i| (0..s).map(move |j| (row(i, j) - lo) as u32)).collect();
        (lo as usize..hi as usize + 1, index)
    }
}

/// The examples of one adapter (all of them without adapters) with the relative table through that
/// adapter's query and key projections, each `[heads, rows, head_dim]`.
pub(crate) struct PositionGroup {
    pub examples: Range<usize>,
    pub pos_query: Tensor,
    pub pos_key: Tensor,
}

/// Disentangled attention on `qkv` (`[batch · seq, 3 · hidden]`, as [`crate::attention::composed`] takes it),
/// with `index` (`[seq, seq]` rows of the used table, [`Disentangled::rows`]) and each group's projected
/// table. Returns the context, `[batch · seq, hidden]`.
pub(crate) fn attention(
    qkv: &Tensor,
    spec: &AttentionSpec,
    settings: &Disentangled,
    index: &[u32],
    groups: &[PositionGroup],
) -> Result<Tensor> {
    let (b, s, nh, d) = (spec.batch, spec.seq, spec.heads, spec.head_dim);
    let h = nh * d;
    let heads = |part: usize| -> Result<Tensor> {
        Ok(qkv.narrow(1, part * h, h)?.reshape((b, s, nh, d))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
    let scale = 1.0 / ((d * settings.factor()) as f64).sqrt();
    let device = qkv.device();
    let c2p_index = Tensor::from_slice(index, (1, 1, s, s), device)?;
    // Position-to-content gathers along the key's rows: the index transposed.
    let transposed: Vec<u32> = (0..s).flat_map(|j| (0..s).map(move |i| index[i * s + j])).collect();
    let p2c_index = Tensor::from_vec(transposed, (1, 1, s, s), device)?;
    let mut scores = q.matmul(&k.t()?)?;
    let mut parts = Vec::with_capacity(groups.len());
    for g in groups {
        let n = g.examples.len();
        let (qg, kg) = (q.narrow(0, g.examples.start, n)?, k.narrow(0, g.examples.start, n)?);
        let expand = |i: &Tensor| -> Result<Tensor> { Ok(i.broadcast_as((n, nh, s, s))?.contiguous()?) };
        let mut part = Tensor::zeros((n, nh, s, s), DType::F32, device)?;
        if settings.c2p {
            let full = qg.broadcast_matmul(&g.pos_key.t()?)?; // [n, nh, s, rows]
            part = (part + full.contiguous()?.gather(&expand(&c2p_index)?, 3)?)?;
        }
        if settings.p2c {
            let full = kg.broadcast_matmul(&g.pos_query.t()?)?; // [n, nh, s (keys), rows]
            part = (part + full.contiguous()?.gather(&expand(&p2c_index)?, 3)?.transpose(2, 3)?)?;
        }
        parts.push(part);
    }
    let positional = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
    scores = ((scores + positional)? * scale)?;
    let keep: Vec<f32> = spec.key_mask.iter().map(|&m| if m == 0 { f32::MIN } else { 0.0 }).collect();
    let mask = Tensor::from_vec(keep, (b, 1, 1, s), device)?;
    let scores = scores.broadcast_add(&mask)?;
    let mut probs = crate::layers::softmax_last(&scores)?;
    if let Some(drop) = &spec.dropout {
        probs = (probs * Tensor::from_slice(drop.as_slice(), (b, nh, s, s), device)?)?;
    }
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b * s, h))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' `make_log_bucket_position` for DeBERTa-v3's settings (256 buckets, 512 positions), values
    /// computed with it: exact up to 128 apart, then logarithmic.
    #[test]
    fn buckets_match_transformers() {
        let d = Disentangled {
            span: 256,
            buckets: Some((256, 512)),
            c2p: true,
            p2c: true,
            norm: true,
            absolute_positions: false,
        };
        for (relative, want) in [
            (0, 0),
            (5, 5),
            (-5, -5),
            (127, 127),
            (128, 128),
            (129, 129),
            (130, 130),
            (200, 169),
            (-200, -169),
            (300, 207),
            (511, 255),
            (-511, -255),
            (1000, 317),
        ] {
            assert_eq!(d.bucket(relative), want, "{relative}");
        }
    }
}
