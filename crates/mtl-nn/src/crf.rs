//! A linear-chain CRF over the tags of a sentence's words: transition scores between tags and from the
//! start / to the end, trained by the negative log-likelihood (forward algorithm, in differentiable candle
//! ops) and decoded by Viterbi on the host. Decoding can forbid transitions (as AllenNLP's
//! `allowed_transitions` does for BIO / BIOES); training is unconstrained, so that gold sequences which break
//! the scheme (frequent in noisy data such as WNUT) still have a finite likelihood.

use candle_core::{DType, Tensor};

use crate::params::{Init, ParamBuilder};
use crate::Result;

/// Which transitions decoding may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transitions {
    pub num_tags: usize,
    /// `allowed[i * n + j]`: tag `j` may follow tag `i`.
    pub allowed: Vec<bool>,
    /// A sentence may start / end with the tag.
    pub start: Vec<bool>,
    pub end: Vec<bool>,
}

impl Transitions {
    /// Every transition allowed.
    pub fn all(num_tags: usize) -> Self {
        Self {
            num_tags,
            allowed: vec![true; num_tags * num_tags],
            start: vec![true; num_tags],
            end: vec![true; num_tags],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Crf {
    /// `[n, n]`: score of tag `j` following tag `i`.
    transitions: Tensor,
    start: Tensor,
    end: Tensor,
    constraints: Transitions,
}

/// A stable, differentiable log-sum-exp over `dim` (the maximum is detached: it cancels out).
fn log_sum_exp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(dim)?;
    Ok((sum.log()? + max)?.squeeze(dim)?)
}

impl Crf {
    pub fn new(pb: &ParamBuilder, constraints: Transitions) -> Result<Self> {
        let n = constraints.num_tags;
        let init = Init::Normal { std: 0.02 };
        Ok(Self {
            transitions: pb.get((n, n), "transitions", init)?,
            start: pb.get(n, "start_transitions", init)?,
            end: pb.get(n, "end_transitions", init)?,
            constraints,
        })
    }

    /// The mean negative log-likelihood per word of the gold tag sequences. `emissions` is `[b, t, n]`,
    /// `lengths[i]` the number of words of sequence `i` (≥ 1, the rest is padding), `tags` is `b × t`.
    pub fn nll(&self, emissions: &Tensor, lengths: &[usize], tags: &[u32]) -> Result<Tensor> {
        let (b, t, n) = emissions.dims3()?;
        let device = emissions.device();
        // Masks: step k updates sequence i when k < lengths[i].
        let mask: Vec<f32> = (0..b).flat_map(|i| (0..t).map(move |k| f32::from(u8::from(k < lengths[i])))).collect();
        let mask = Tensor::from_vec(mask, (b, t), device)?;
        // log Z by the forward algorithm.
        let mut alpha = emissions.narrow(1, 0, 1)?.squeeze(1)?.broadcast_add(&self.start)?; // [b, n]
        let trans = self.transitions.unsqueeze(0)?; // [1, n, n]
        for k in 1..t {
            let scores = alpha.unsqueeze(2)?.broadcast_add(&trans)?; // [b, n(prev), n(next)]
            let next = log_sum_exp(&scores, 1)?.add(&emissions.narrow(1, k, 1)?.squeeze(1)?)?;
            let m = mask.narrow(1, k, 1)?; // [b, 1]
            alpha = (next.broadcast_mul(&m)? + alpha.broadcast_mul(&(1.0 - &m)?)?)?;
        }
        let log_z = log_sum_exp(&alpha.broadcast_add(&self.end)?, 1)?; // [b]

        // The gold path's score.
        let flat_emissions = emissions.reshape((b * t * n, 1))?;
        let emit_idx: Vec<u32> =
            (0..b).flat_map(|i| (0..lengths[i]).map(move |k| ((i * t + k) * n) as u32 + tags[i * t + k])).collect();
        let mut trans_idx = Vec::new();
        let mut start_idx = Vec::new();
        let mut end_idx = Vec::new();
        for i in 0..b {
            let row = &tags[i * t..i * t + lengths[i]];
            start_idx.push(row[0]);
            end_idx.push(row[row.len() - 1]);
            trans_idx.extend(row.windows(2).map(|w| w[0] * n as u32 + w[1]));
        }
        let pick = |x: &Tensor, idx: &[u32]| -> Result<Tensor> {
            if idx.is_empty() {
                return Ok(Tensor::zeros((), DType::F32, device)?);
            }
            Ok(x.index_select(&Tensor::from_slice(idx, idx.len(), device)?, 0)?.sum_all()?)
        };
        let score = (pick(&flat_emissions, &emit_idx)? + pick(&self.transitions.reshape((n * n, 1))?, &trans_idx)?)?
            .add(&pick(&self.start.reshape((n, 1))?, &start_idx)?)?
            .add(&pick(&self.end.reshape((n, 1))?, &end_idx)?)?;
        let words: usize = lengths.iter().sum();
        Ok(((log_z.sum_all()? - score)? / words.max(1) as f64)?)
    }

    /// The best allowed tag sequence for each sequence of `emissions` (`[b, t, n]`, `lengths` as in `nll`).
    pub fn decode(&self, emissions: &Tensor, lengths: &[usize]) -> Result<Vec<Vec<u32>>> {
        let (b, t, n) = emissions.dims3()?;
        let e = emissions.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let trans = self.transitions.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let start = self.start.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let end = self.end.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((0..b)
            .map(|i| {
                let scores = ChainScores { trans: &trans, start: &start, end: &end };
                viterbi(&e[i * t * n..(i + 1) * t * n], lengths[i], &scores, &self.constraints)
            })
            .collect())
    }

    /// The emissions of each sequence padded into `[b, t, n]` from the rows of `logits` (`[rows, n]`):
    /// sequence `i` owns the next `lengths[i]` rows.
    pub fn pad(logits: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (_, n) = logits.dims2()?;
        let t = lengths.iter().copied().max().unwrap_or(0);
        let device = logits.device();
        // Padding reads an all-zero row appended at the end.
        let zero = Tensor::zeros((1, n), logits.dtype(), device)?;
        let padded = Tensor::cat(&[logits, &zero], 0)?;
        let pad_row = logits.dim(0)? as u32;
        let mut idx = Vec::with_capacity(lengths.len() * t);
        let mut next = 0u32;
        for &len in lengths {
            idx.extend(next..next + len as u32);
            idx.extend(std::iter::repeat_n(pad_row, t - len));
            next += len as u32;
        }
        let picked = padded.index_select(&Tensor::from_slice(&idx, idx.len(), device)?, 0)?;
        Ok(picked.reshape((lengths.len(), t, n))?.contiguous()?)
    }
}

/// A CRF's scores as host slices: transitions `n × n` (row-major, from → to), start and end scores.
#[derive(Clone, Copy, Debug)]
pub struct ChainScores<'a> {
    pub trans: &'a [f32],
    pub start: &'a [f32],
    pub end: &'a [f32],
}

/// Viterbi over one sequence's emissions (`len × n`, row-major) with forbidden transitions removed.
pub fn viterbi(e: &[f32], len: usize, scores: &ChainScores, c: &Transitions) -> Vec<u32> {
    if len == 0 {
        return Vec::new();
    }
    let ChainScores { trans, start, end } = *scores;
    let n = start.len();
    const NEG: f32 = f32::NEG_INFINITY;
    let mut score: Vec<f32> = (0..n).map(|j| if c.start[j] { start[j] + e[j] } else { NEG }).collect();
    let mut back = vec![0u32; len * n];
    for k in 1..len {
        let mut next = vec![NEG; n];
        for j in 0..n {
            let (mut best, mut arg) = (NEG, 0u32);
            for i in 0..n {
                if !c.allowed[i * n + j] || score[i] == NEG {
                    continue;
                }
                let s = score[i] + trans[i * n + j];
                if s > best {
                    (best, arg) = (s, i as u32);
                }
            }
            if best > NEG {
                next[j] = best + e[k * n + j];
            }
            back[k * n + j] = arg;
        }
        score = next;
    }
    let final_scores: Vec<f32> =
        (0..n).map(|j| if c.end[j] && score[j] > NEG { score[j] + end[j] } else { NEG }).collect();
    let mut best = (0..n).max_by(|&a, &b| final_scores[a].total_cmp(&final_scores[b])).unwrap_or(0);
    if final_scores[best] == NEG {
        // No allowed path (cannot happen with a consistent scheme): fall back to the unconstrained best tag.
        best = (0..n).max_by(|&a, &b| score[a].total_cmp(&score[b])).unwrap_or(0);
    }
    let mut path = vec![best as u32; len];
    for k in (1..len).rev() {
        path[k - 1] = back[k * n + path[k] as usize];
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// log Z and the best path by brute force over every tag sequence.
    fn brute(e: &[f32], len: usize, scores: &ChainScores, c: &Transitions) -> (f64, Vec<u32>) {
        let ChainScores { trans, start, end } = *scores;
        let n = start.len();
        let mut log_z_terms = Vec::new();
        let mut best = (f64::NEG_INFINITY, Vec::new());
        let total = n.pow(len as u32);
        for code in 0..total {
            let path: Vec<usize> = (0..len).map(|k| (code / n.pow(k as u32)) % n).collect();
            let mut s = f64::from(start[path[0]] + e[path[0]]);
            let mut ok = c.start[path[0]] && c.end[path[len - 1]];
            for k in 1..len {
                s += f64::from(trans[path[k - 1] * n + path[k]] + e[k * n + path[k]]);
                ok &= c.allowed[path[k - 1] * n + path[k]];
            }
            s += f64::from(end[path[len - 1]]);
            log_z_terms.push(s);
            if ok && s > best.0 {
                best = (s, path.iter().map(|&p| p as u32).collect());
            }
        }
        let m = log_z_terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (m + log_z_terms.iter().map(|s| (s - m).exp()).sum::<f64>().ln(), best.1)
    }

    #[test]
    fn likelihood_and_viterbi_match_brute_force() -> Result<()> {
        let device = Device::Cpu;
        let n = 3;
        let lengths = [4usize, 2];
        let t = 4;
        let e: Vec<f32> = (0..2 * t * n).map(|i| ((i * 7919) % 13) as f32 / 5.0 - 1.2).collect();
        let trans: Vec<f32> = (0..n * n).map(|i| ((i * 31) % 7) as f32 / 4.0 - 0.7).collect();
        let start = vec![0.3f32, -0.2, 0.1];
        let end = vec![-0.4f32, 0.2, 0.05];
        // Tag 2 may not follow tag 0, nor start a sentence.
        let mut c = Transitions::all(n);
        c.allowed[2] = false;
        c.start[2] = false;
        let crf = Crf {
            transitions: Var::from_slice(&trans, (n, n), &device)?.as_tensor().clone(),
            start: Tensor::from_slice(&start, n, &device)?,
            end: Tensor::from_slice(&end, n, &device)?,
            constraints: c.clone(),
        };
        let emissions = Tensor::from_slice(&e, (2, t, n), &device)?;
        let tags = vec![0u32, 1, 1, 2, 2, 0, 0, 0];
        let nll = crf.nll(&emissions, &lengths, &tags)?.to_scalar::<f32>()?;
        let mut want = 0.0;
        for (i, &len) in lengths.iter().enumerate() {
            let ei = &e[i * t * n..i * t * n + len * n];
            let scores = ChainScores { trans: &trans, start: &start, end: &end };
            let (log_z, best) = brute(ei, len, &scores, &c);
            let row = &tags[i * t..i * t + len];
            let mut s = f64::from(start[row[0] as usize] + ei[row[0] as usize]);
            for k in 1..len {
                s += f64::from(trans[row[k - 1] as usize * n + row[k] as usize] + ei[k * n + row[k] as usize]);
            }
            s += f64::from(end[row[len - 1] as usize]);
            want += log_z - s;
            assert_eq!(viterbi(ei, len, &scores, &c), best, "sequence {i}");
        }
        want /= 6.0;
        assert!((f64::from(nll) - want).abs() < 1e-4, "nll {nll} vs brute force {want}");
        Ok(())
    }
}
