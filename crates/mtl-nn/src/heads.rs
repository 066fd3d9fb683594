//! Task heads: hidden states in, logits out. Losses and predictions are computed from the logits by
//! [`crate::MultiTaskModel`].

use candle_core::{Tensor, D};
use mtl_core::{Mode, TaskKind};

use crate::layers::{DropoutRng, Linear};
use crate::params::ParamBuilder;
use crate::Result;

/// A task head: dropout then a linear layer (as transformers' `BertFor*Classification` heads, without the
/// pooler).
#[derive(Clone, Debug)]
pub struct Head {
    kind: TaskKind,
    linear: Linear,
    num_labels: usize,
}

/// Logits of one head on the rows it reads.
#[derive(Clone, Debug)]
pub struct HeadOutput {
    /// `[rows, num_labels]`.
    pub logits: Tensor,
}

impl Head {
    pub fn new(pb: &ParamBuilder, kind: TaskKind, hidden: usize, num_labels: usize) -> Result<Self> {
        Ok(Self { kind, linear: Linear::new(pb, hidden, num_labels)?, num_labels })
    }

    pub fn kind(&self) -> TaskKind {
        self.kind
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Logits at the given rows of the flattened hidden states `[batch * seq, hidden]`: the [CLS] rows for
    /// classification, the first sub-token of each word for token classification.
    pub fn forward(&self, hidden: &Tensor, rows: &[u32], dropout: &DropoutRng, mode: Mode) -> Result<HeadOutput> {
        let idx = Tensor::from_slice(rows, rows.len(), hidden.device())?;
        let x = dropout.apply(&hidden.index_select(&idx, 0)?, mode)?;
        Ok(HeadOutput { logits: self.linear.forward(&x)? })
    }
}

impl HeadOutput {
    /// The most likely label of each row and its probability.
    pub fn argmax(&self) -> Result<(Vec<u32>, Vec<f32>)> {
        let probs = crate::layers::softmax_last(&self.logits)?;
        let ids = probs.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let best = probs.max(D::Minus1)?.to_vec1::<f32>()?;
        Ok((ids, best))
    }
}
