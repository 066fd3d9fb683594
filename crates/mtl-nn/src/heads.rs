//! Task heads: hidden states in, logits out, and each kind's loss. Predictions are decoded from the logits
//! by [`crate::MultiTaskModel`].

use candle_core::{Tensor, D};
use mtl_core::{Mode, TaskKind};

use crate::crf::{Crf, Transitions};
use crate::layers::{Activation, DropoutRng, LayerNorm, Linear};
use crate::modernbert::PredictionHead;
use crate::params::{Init, ParamBuilder};
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

#[derive(Clone, Debug)]
struct Transform {
    dense: Linear,
    norm: LayerNorm,
    act: Activation,
}

/// A task head: dropout then a linear layer (as transformers' `BertFor*` heads, without the pooler), and for
/// token tasks optionally a CRF. On ModernBERT, its prediction head first (as its `…For*` task models).
#[derive(Clone, Debug)]
pub struct Head {
    spec: HeadSpec,
    linear: Linear,
    crf: Option<Crf>,
    transform: Option<Transform>,
}

/// Logits of one head on the rows it reads.
#[derive(Clone, Debug)]
pub struct HeadOutput {
    /// `[rows, outputs]`.
    pub logits: Tensor,
}

impl Head {
    pub fn new(pb: &ParamBuilder, spec: &HeadSpec, hidden: usize) -> Result<Self> {
        Self::with_prediction_head(pb, spec, hidden, None)
    }

    /// A head with ModernBERT's prediction head (`head.dense`, `head.norm`) before the linear layer, when given.
    pub fn with_prediction_head(
        pb: &ParamBuilder,
        spec: &HeadSpec,
        hidden: usize,
        prediction: Option<PredictionHead>,
    ) -> Result<Self> {
        if spec.kind == TaskKind::Generation {
            return Err(NnError::Unsupported(
                "generation tasks have no encoder head: they need a decoder model".into(),
            ));
        }
        let crf = match &spec.crf {
            Some(t) => Some(Crf::new(&pb.pp("crf"), t.clone())?),
            None => None,
        };
        let transform = match prediction {
            Some(p) => {
                let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &pb.device());
                let (d, n) = (pb.pp("head.dense"), pb.pp("head.norm"));
                // From the base checkpoint's own head (a masked-LM ModernBERT has one) when it has it, as
                // transformers' `from_pretrained` starts every task model's head; fresh otherwise.
                let dense = Linear {
                    weight: d.get_or_pretrained(
                        (hidden, hidden),
                        "weight",
                        "head.dense.weight",
                        Init::Normal { std: 0.02 },
                    )?,
                    bias: match p.bias {
                        true => d.get_or_pretrained(hidden, "bias", "head.dense.bias", Init::Zeros)?,
                        false => zeros(hidden)?,
                    },
                };
                let norm = LayerNorm {
                    weight: n.get_or_pretrained(hidden, "weight", "head.norm.weight", Init::Ones)?,
                    bias: match p.norm_bias {
                        true => n.get_or_pretrained(hidden, "bias", "head.norm.bias", Init::Zeros)?,
                        false => zeros(hidden)?,
                    },
                    eps: p.eps,
                };
                Some(Transform { dense, norm, act: p.act })
            }
            None => None,
        };
        Ok(Self { spec: spec.clone(), linear: Linear::new(pb, hidden, spec.outputs)?, crf, transform })
    }

    /// Whether the head has ModernBERT's prediction head.
    pub fn has_prediction_head(&self) -> bool {
        self.transform.is_some()
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
        self.forward_states(&hidden.index_select(&idx, 0)?, dropout, mode)
    }

    /// Logits of states already gathered, `[rows, hidden]` (a sequence task's pooled states).
    pub fn forward_states(&self, x: &Tensor, dropout: &DropoutRng, mode: Mode) -> Result<HeadOutput> {
        let mut x = x.clone();
        if let Some(t) = &self.transform {
            let y = t.dense.forward(&x)?;
            let y = match t.act {
                Activation::Gelu => y.gelu_erf()?,
                Activation::GeluNew => y.gelu()?,
                Activation::Relu => y.relu()?,
            };
            x = t.norm.forward(&y)?;
        }
        let x = dropout.apply(&x, mode)?;
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
