//! Batching: a seeded order of examples per epoch, and dynamic padding to the longest sequence of a batch.

use std::collections::BTreeMap;

use mtl_core::{HostBatch, TaskId, TaskKind, Targets, IGNORE_INDEX};
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

/// Pads `examples` into one batch. `tasks` lists every task of the model with its kind; a task without a
/// label on an example gets [`IGNORE_INDEX`] there, and a task with no label in the whole batch gets no
/// targets at all.
pub fn collate(examples: &[&Example], tasks: &BTreeMap<TaskId, TaskKind>) -> HostBatch {
    let batch = examples.len();
    let seq = examples.iter().map(|e| e.encoded.ids.len()).max().unwrap_or(0);
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
    for (task, kind) in tasks {
        if !examples.iter().any(|e| e.labels.contains_key(task)) {
            continue;
        }
        let t = match kind {
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
