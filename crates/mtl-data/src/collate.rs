//! Batching: a seeded order of examples per epoch, and dynamic padding to the longest sequence of a batch.

use std::collections::BTreeMap;

use mtl_core::{HostBatch, Targets, TaskId, TaskKind, IGNORE_INDEX};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::{Example, Label};

/// The order in which an epoch visits `n` examples: a shuffle seeded by `seed` and `epoch`, so that a run
/// is reproducible and every epoch differs.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// How training examples are cut into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// The most examples in a batch.
    pub batch_size: usize,
    /// Batch examples of similar length together.
    pub group_by_length: bool,
    /// Close a batch before its padded size (examples × longest) would exceed this many tokens.
    pub max_tokens: Option<usize>,
}

/// The batches of one epoch, as lists of example indices.
///
/// Without grouping, a seeded shuffle cut into batches. With `group_by_length`, batches are made of examples
/// of similar length so that dynamic padding pads little: the shuffled examples are cut into pools of 50
/// batches, each pool is sorted by length and cut into batches, and all batches are shuffled (the scheme of
/// transformers' `LengthGroupedSampler`, with the batch order randomised too). With a token budget, a batch
/// also closes before its padded size would exceed `max_tokens` (an example longer than the budget forms a
/// batch of its own).
pub fn epoch_batches(lengths: &[usize], batching: &Batching, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let batch_size = batching.batch_size.max(1);
    let order = epoch_order(lengths.len(), seed, epoch);
    if !batching.group_by_length {
        return cut(&order, lengths, batch_size, batching.max_tokens);
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(cut(&pool, lengths, batch_size, batching.max_tokens));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(1) ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407),
    );
    batches.shuffle(&mut rng);
    batches
}

/// Cuts `order` into consecutive batches of at most `batch_size` examples and, with a budget, at most
/// `max_tokens` padded tokens.
fn cut(order: &[usize], lengths: &[usize], batch_size: usize, max_tokens: Option<usize>) -> Vec<Vec<usize>> {
    let Some(budget) = max_tokens else {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    };
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for &i in order {
        let longer = longest.max(lengths[i]);
        if !current.is_empty() && (current.len() == batch_size || longer * (current.len() + 1) > budget) {
            batches.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(lengths[i]);
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Pads decoder examples ([`crate::prompt::PromptFormat::dataset`]) into one batch for the LM loss: each
/// task's targets are `batch × seq` token labels, the token itself at the target positions of that task's
/// examples (token type 1) and [`IGNORE_INDEX`] elsewhere, unshifted (the loss predicts position `j + 1` from
/// `j`). Rows keep the order of `examples`, padded on the right to a multiple of [`LM_PAD_MULTIPLE`] tokens.
pub fn collate_lm(examples: &[&Example]) -> HostBatch {
    let tasks: BTreeMap<TaskId, (TaskKind, usize)> = BTreeMap::new();
    let mut batch = collate_padded(examples, &tasks, LM_PAD_MULTIPLE);
    let seq = batch.seq;
    for (b, ex) in examples.iter().enumerate() {
        for task in ex.labels.keys() {
            let labels = match batch
                .targets
                .entry(task.clone())
                .or_insert_with(|| Targets::Tokens(vec![IGNORE_INDEX; examples.len() * seq]))
            {
                Targets::Tokens(l) => l,
                _ => unreachable!("decoder targets are token labels"),
            };
            for (j, (&id, &kind)) in ex.encoded.ids.iter().zip(&ex.encoded.type_ids).enumerate() {
                if kind == 1 {
                    labels[b * seq + j] = i64::from(id);
                }
            }
        }
    }
    batch
}

/// Pads `examples` into one batch. `tasks` lists every task of the model with its kind and number of
/// outputs; a task without a label on an example gets [`IGNORE_INDEX`] there, and a task with no label in
/// the whole batch gets no targets at all.
pub fn collate(examples: &[&Example], tasks: &BTreeMap<TaskId, (TaskKind, usize)>) -> HostBatch {
    collate_padded(examples, tasks, 1)
}

/// The sequence lengths of decoder batches are multiples of this (transformers' `pad_to_multiple_of`): a
/// decoder step allocates activations of `rows × seq` for 30 layers, and with a handful of distinct lengths
/// the allocator reuses the pages it kept instead of mapping new ones for every new length.
pub const LM_PAD_MULTIPLE: usize = 16;

/// [`collate`] with the sequence length rounded up to a multiple of `multiple`.
fn collate_padded(examples: &[&Example], tasks: &BTreeMap<TaskId, (TaskKind, usize)>, multiple: usize) -> HostBatch {
    let batch = examples.len();
    let seq = examples.iter().map(|e| e.encoded.ids.len()).max().unwrap_or(0).next_multiple_of(multiple.max(1));
    let mut input_ids = vec![0u32; batch * seq];
    let mut token_type_ids = vec![0u32; batch * seq];
    let mut attention_mask = vec![0u32; batch * seq];
    for (b, ex) in examples.iter().enumerate() {
        let row = b * seq;
        let n = ex.encoded.ids.len();
        input_ids[row..row + n].copy_from_slice(&ex.encoded.ids);
        token_type_ids[row..row + n].copy_from_slice(&ex.encoded.type_ids);
        attention_mask[row..row + n].fill(1);
    }
    let mut targets = BTreeMap::new();
    for (task, &(kind, width)) in tasks {
        if !examples.iter().any(|e| e.labels.contains_key(task)) {
            continue;
        }
        let t = match kind {
            TaskKind::MultiLabel | TaskKind::Regression => {
                let mut values = vec![0f32; batch * width];
                let mut present = vec![false; batch];
                for (b, ex) in examples.iter().enumerate() {
                    let row = &mut values[b * width..(b + 1) * width];
                    match ex.labels.get(task) {
                        Some(Label::Multi(ids)) => {
                            for &i in ids {
                                row[i as usize] = 1.0;
                            }
                            present[b] = true;
                        }
                        Some(Label::Real { scaled, .. }) => {
                            row.copy_from_slice(scaled);
                            present[b] = true;
                        }
                        _ => {}
                    }
                }
                Targets::Dense { width, values, present }
            }
            // Generated text is a decoder's (its targets are tokens; see `collate_lm`).
            TaskKind::Generation => continue,
            TaskKind::QuestionAnswering => {
                let (start, end) = examples
                    .iter()
                    .map(|e| match e.labels.get(task) {
                        Some(Label::Span { start, end }) => (*start as i64, *end as i64),
                        _ => (IGNORE_INDEX, IGNORE_INDEX),
                    })
                    .unzip();
                Targets::Span { start, end }
            }
            TaskKind::Classification => Targets::Class(
                examples
                    .iter()
                    .map(|e| match e.labels.get(task) {
                        Some(Label::Class(c)) => i64::from(*c),
                        _ => IGNORE_INDEX,
                    })
                    .collect(),
            ),
            TaskKind::TokenClassification => {
                let mut t = vec![IGNORE_INDEX; batch * seq];
                for (b, ex) in examples.iter().enumerate() {
                    if let Some(Label::Tags(tags)) = ex.labels.get(task) {
                        for (start, tag) in ex.encoded.word_starts.iter().zip(tags) {
                            if let Some(pos) = start {
                                t[b * seq + pos] = i64::from(*tag);
                            }
                        }
                    }
                }
                Targets::Tokens(t)
            }
        };
        targets.insert(task.clone(), t);
    }
    HostBatch {
        batch,
        seq,
        input_ids,
        token_type_ids,
        attention_mask,
        word_starts: examples.iter().map(|e| e.encoded.word_starts.clone()).collect(),
        targets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_example_once_and_group_lengths() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 61 + 3).collect();
        for group in [false, true] {
            let batching = Batching { batch_size: 16, group_by_length: group, max_tokens: None };
            let batches = epoch_batches(&lengths, &batching, 7, 1);
            let mut seen: Vec<usize> = batches.concat();
            seen.sort_unstable();
            assert_eq!(seen, (0..1000).collect::<Vec<_>>());
            assert_eq!(batches, epoch_batches(&lengths, &batching, 7, 1), "seeded");
            assert_ne!(batches, epoch_batches(&lengths, &batching, 7, 2), "each epoch differs");
            let padded: usize =
                batches.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum();
            let real: usize = lengths.iter().sum();
            if group {
                assert!((padded as f64) < 1.1 * real as f64, "grouped batches pad little: {padded} vs {real}");
            } else {
                assert!((padded as f64) > 1.3 * real as f64, "random batches pad a lot: {padded} vs {real}");
            }
        }
    }

    #[test]
    fn a_token_budget_caps_padded_batch_size() {
        let lengths: Vec<usize> = (0..500).map(|i| (i * 37) % 61 + 3).chain([600]).collect();
        for group in [false, true] {
            let batching = Batching { batch_size: 64, group_by_length: group, max_tokens: Some(512) };
            let batches = epoch_batches(&lengths, &batching, 3, 1);
            let mut seen: Vec<usize> = batches.concat();
            seen.sort_unstable();
            assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>(), "every example once");
            for b in &batches {
                let padded = b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                assert!(b.len() <= 64);
                assert!(padded <= 512 || b.len() == 1, "batch of {} examples pads to {padded} tokens", b.len());
            }
            assert!(batches.iter().any(|b| b == &vec![500]), "the over-long example is alone");
            if group {
                // Short examples fill up to the example cap, long ones make small batches.
                assert!(batches.iter().any(|b| b.len() > 16) && batches.iter().any(|b| b.len() < 10));
            }
        }
    }
}
