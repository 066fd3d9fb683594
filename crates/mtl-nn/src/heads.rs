//! Task heads: hidden states in, logits out, and each kind's loss. Predictions are decoded from the logits
//! by [`crate::MultiTaskModel`].

use candle_core::{Tensor, D};
use mtl_core::{Mode, TaskKind};

use crate::crf::{Crf, Transitions};
use crate::layers::{DropoutRng, Linear};
use crate::params::ParamBuilder;
use crate::NnError;
use crate::Result;

/// The loss of a regression head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RegressionLoss {
    Mse,
    /// PyTorch's `HuberLoss(delta)`.
    Huber(f64),
}

/// What a head is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadSpec {
    pub kind: TaskKind,
    /// Labels, tags or regression outputs (2 for QA: start and end).
    pub outputs: usize,
    pub regression_loss: RegressionLoss,
    /// Token tasks: a CRF layer, decoded with these transitions.
    pub crf: Option<Transitions>,
}

impl HeadSpec {
    /// A head with the defaults of its kind (MSE for regression, no CRF).
    pub fn new(kind: TaskKind, outputs: usize) -> Self {
        let outputs = if kind == TaskKind::QuestionAnswering { 2 } else { outputs };
        Self { kind, outputs, regression_loss: RegressionLoss::Mse, crf: None }
    }
}

/// A task head: dropout then a linear layer (as transformers' `BertFor*` heads, without the pooler), and for
/// token tasks optionally a CRF.
#[derive(Clone, Debug)]
pub struct Head {
    spec: HeadSpec,
    linear: Linear,
    crf: Option<Crf>,
}

/// Logits of one head on the rows it reads.
#[derive(Clone, Debug)]
pub struct HeadOutput {
    /// `[rows, outputs]`.
    pub logits: Tensor,
}

impl Head {
    pub fn new(pb: &ParamBuilder, spec: &HeadSpec, hidden: usize) -> Result<Self> {
        if spec.kind == TaskKind::Generation {
            return Err(NnError::Unsupported(
                "generation tasks have no encoder head: they need a decoder model".into(),
            ));
        }
        let crf = match &spec.crf {
            Some(t) => Some(Crf::new(&pb.pp("crf"), t.clone())?),
            None => None,
        };
        Ok(Self { spec: spec.clone(), linear: Linear::new(pb, hidden, spec.outputs)?, crf })
    }

    pub fn kind(&self) -> TaskKind {
        self.spec.kind
    }

    pub fn num_labels(&self) -> usize {
        self.spec.outputs
    }

    pub fn spec(&self) -> &HeadSpec {
        &self.spec
    }

    pub fn crf(&self) -> Option<&Crf> {
        self.crf.as_ref()
    }

    /// Logits at the given rows of the flattened hidden states `[batch * seq, hidden]`: the [CLS] rows for
    /// sequence-level tasks, the first sub-token of each word for token classification, every token for QA.
    pub fn forward(&self, hidden: &Tensor, rows: &[u32], dropout: &DropoutRng, mode: Mode) -> Result<HeadOutput> {
        let idx = Tensor::from_slice(rows, rows.len(), hidden.device())?;
        let x = dropout.apply(&hidden.index_select(&idx, 0)?, mode)?;
        Ok(HeadOutput { logits: self.linear.forward(&x)? })
    }

    /// Regression loss averaged over every output of every row.
    pub fn regression_loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let diff = (pred - target)?;
        Ok(match self.spec.regression_loss {
            RegressionLoss::Mse => diff.sqr()?.mean_all()?,
            RegressionLoss::Huber(delta) => {
                let abs = diff.abs()?;
                let quadratic = abs.clamp(0.0, delta)?;
                let linear = (&abs - &quadratic)?;
                ((quadratic.sqr()? * 0.5)? + (linear * delta)?)?.mean_all()?
            }
        })
    }
}

/// Binary cross-entropy with logits averaged over every element (PyTorch's `BCEWithLogitsLoss`), in its
/// stable form `max(x, 0) - x y + log(1 + exp(-|x|))`.
pub fn binary_cross_entropy_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus = ((logits.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok(((logits.relu()? - (logits * targets)?)? + softplus)?.mean_all()?)
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
