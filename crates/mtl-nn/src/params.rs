//! Parameters: a name-keyed store of variables and a builder whose prefix path is the checkpoint tensor name,
//! so that loading and naming are one thing. The builder also carries each parameter's [`ParamRole`], set by
//! the model code as it descends (a layer, a task's head, an adapter), so that what a parameter *is* never has
//! to be read back from its name.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use mtl_core::ParamRole;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::cpu::int8::Int8Matrix;
use crate::cpu::quant::QuantMatrix;
use crate::{NnError, Result};

/// How a parameter absent from the loaded weights is initialised (as Hugging Face BERT initialises it).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal {
        std: f64,
    },
    Zeros,
    Ones,
    /// Uniform on `[-bound, bound]`.
    Uniform {
        bound: f64,
    },
}

/// Every trainable variable of a model, by checkpoint name. Iteration order is the name order.
#[derive(Debug, Default)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    /// Each variable's role, as the model code built it.
    roles: BTreeMap<String, ParamRole>,
    /// Names that were initialised rather than loaded.
    initialised: Vec<String>,
}

impl ParamStore {
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    pub fn initialised(&self) -> &[String] {
        &self.initialised
    }

    /// The role of the variable `name`; `None` for a name the store does not hold.
    pub fn role(&self, name: &str) -> Option<&ParamRole> {
        self.roles.get(name)
    }

    /// The variables with their roles, in name order.
    pub fn with_roles(&self) -> impl Iterator<Item = (&String, &Var, &ParamRole)> {
        self.vars.iter().map(|(n, v)| (n, v, &self.roles[n]))
    }

    /// Whether `name` was added for fine-tuning or to a task (a head, an adapter), not pretrained backbone.
    pub fn is_added(&self, name: &str) -> bool {
        self.roles.get(name).is_some_and(|r| !r.is_backbone())
    }

    /// Drops variables (weights replaced by int8 ones, pruned layers); returns how many were there.
    pub(crate) fn remove(&mut self, keep: impl Fn(&str, &ParamRole) -> bool) -> usize {
        let before = self.vars.len();
        let roles = &self.roles;
        self.vars.retain(|name, _| keep(name, &roles[name]));
        let vars = &self.vars;
        self.roles.retain(|name, _| vars.contains_key(name));
        before - self.vars.len()
    }

    /// Sets the variables that `weights` names to those values; the others keep theirs (a snapshot that leaves
    /// out frozen weights restores the rest).
    pub fn set_named(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            if let Some(w) = weights.get(name) {
                var.set(w)?;
            }
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Writes every variable to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_where(path, |_| true)
    }

    /// Writes the variables whose roles pass `keep` to a safetensors file.
    pub fn save_where(&self, path: &Path, keep: impl Fn(&ParamRole) -> bool) -> Result<()> {
        let tensors: HashMap<&str, Tensor> = self
            .with_roles()
            .filter(|(_, _, r)| keep(r))
            .map(|(k, v, _)| (k.as_str(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }
}

/// The suffix of an int8 weight's scales: `NAME.weight` (I8, `[out, in]`) has `NAME.weight_scale` (F32, `[out]`).
pub const INT8_SCALE_SUFFIX: &str = "_scale";

/// Writes int8 matrices to a safetensors file: each as an I8 tensor with its per-row scales beside it.
pub fn save_int8(path: &Path, matrices: &[(String, &Int8Matrix)]) -> Result<()> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let bytes: Vec<(String, Vec<u8>, Vec<u8>)> = matrices
        .iter()
        .map(|(name, m)| {
            (
                name.clone(),
                m.data().iter().map(|&q| q as u8).collect(),
                m.scales().iter().flat_map(|s| s.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = Vec::new();
    for ((name, data, scales), (_, m)) in bytes.iter().zip(matrices) {
        let bad = |e: safetensors::SafeTensorError| NnError::File { path: path.to_owned(), message: e.to_string() };
        views.push((name.clone(), TensorView::new(Dtype::I8, vec![m.rows(), m.cols()], data).map_err(bad)?));
        views.push((
            format!("{name}{INT8_SCALE_SUFFIX}"),
            TensorView::new(Dtype::F32, vec![m.rows()], scales).map_err(bad)?,
        ));
    }
    let meta = HashMap::from([
        ("format".to_string(), "mtl-int8".to_string()),
        ("scheme".to_string(), "weight-only int8, symmetric, one scale per output channel: w = q * scale".to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| NnError::File { path: path.to_owned(), message: format!("cannot write: {e}") })
}

/// Reads a file written by [`save_int8`].
pub fn load_int8(path: &Path) -> Result<Vec<(String, Int8Matrix)>> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(|source| NnError::Io { path: path.to_owned(), source })?;
    let bad = |message: String| NnError::File { path: path.to_owned(), message };
    let file =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in file.tensors() {
        if name.ends_with(INT8_SCALE_SUFFIX) {
            continue;
        }
        let (Dtype::I8, [rows, cols]) = (view.dtype(), view.shape()) else {
            return Err(bad(format!(
                "tensor `{name}`: expected a 2-D I8 weight, found {:?} {:?}",
                view.dtype(),
                view.shape()
            )));
        };
        let scale_name = format!("{name}{INT8_SCALE_SUFFIX}");
        let scales = file.tensor(&scale_name).map_err(|_| bad(format!("tensor `{name}` has no `{scale_name}`")))?;
        if scales.dtype() != Dtype::F32 || scales.shape() != [*rows] {
            return Err(bad(format!(
                "tensor `{scale_name}`: expected F32 [{rows}], found {:?} {:?}",
                scales.dtype(),
                scales.shape()
            )));
        }
        let data = view.data().iter().map(|&b| b as i8).collect();
        let scales = scales.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let m = Int8Matrix::from_parts(*rows, *cols, data, scales).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.push((name, m));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

struct Inner {
    source: HashMap<String, Tensor>,
    /// Int8 weights by name (an int8 model's encoder projections).
    int8: HashMap<String, Int8Matrix>,
    /// Weights in a GGUF block format by name (a decoder's frozen base); dequantised when taken by `get`.
    quantized: HashMap<String, Arc<QuantMatrix>>,
    store: ParamStore,
    rng: rand_chacha::ChaCha8Rng,
    device: Device,
}

/// Builds parameters under a name prefix. Each parameter is taken from the loaded weights when they hold it,
/// and initialised from a seeded generator otherwise (fresh heads).
#[derive(Clone)]
pub struct ParamBuilder {
    inner: Rc<RefCell<Inner>>,
    prefix: String,
    /// The role of the parameters built from here.
    role: ParamRole,
}

fn load_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let loaded = candle_core::safetensors::load(path, device)
        .map_err(|e| NnError::File { path: path.to_owned(), message: format!("not a valid safetensors file: {e}") })?;
    Ok(loaded.into_iter().collect())
}

/// A checkpoint's tensor name as the encoder names it: without the task model's prefix (`bert.`, `roberta.`,
/// `electra.`, `distilbert.`, `mpnet.`, `deberta.`), and DistilBERT's, MPNet's and DeBERTa's block names as BERT's;
/// ModernBERT's under `model.`, as its task models name them.
pub fn canonical_name(name: &str) -> String {
    // ModernBERT's encoder keeps the names its task models give it, under `model.`; a bare `ModernBertModel`'s
    // names (only ModernBERT's blocks are named so) go there too.
    if is_bare_modernbert(name) {
        return format!("model.{name}");
    }
    let name = ["bert.", "roberta.", "electra.", "distilbert.", "mpnet.", "deberta."]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    // MPNet's block names.
    if let Some((layer, tail)) = name.strip_prefix("encoder.layer.").and_then(|rest| rest.split_once('.')) {
        let renames = [
            ("attention.attn.q.", "attention.self.query."),
            ("attention.attn.k.", "attention.self.key."),
            ("attention.attn.v.", "attention.self.value."),
            ("attention.attn.o.", "attention.output.dense."),
            ("attention.LayerNorm.", "attention.output.LayerNorm."),
            // DeBERTa-v2's.
            ("attention.self.query_proj.", "attention.self.query."),
            ("attention.self.key_proj.", "attention.self.key."),
            ("attention.self.value_proj.", "attention.self.value."),
        ];
        if let Some(tail) = renames.iter().find_map(|(from, to)| tail.strip_prefix(from).map(|p| format!("{to}{p}"))) {
            return format!("encoder.layer.{layer}.{tail}");
        }
    }
    let Some((layer, tail)) = name.strip_prefix("transformer.layer.").and_then(|rest| rest.split_once('.')) else {
        return name.to_string();
    };
    let renames = [
        ("attention.q_lin.", "attention.self.query."),
        ("attention.k_lin.", "attention.self.key."),
        ("attention.v_lin.", "attention.self.value."),
        ("attention.out_lin.", "attention.output.dense."),
        ("sa_layer_norm.", "attention.output.LayerNorm."),
        ("ffn.lin1.", "intermediate.dense."),
        ("ffn.lin2.", "output.dense."),
        ("output_layer_norm.", "output.LayerNorm."),
    ];
    match renames.iter().find_map(|(from, to)| tail.strip_prefix(from).map(|p| format!("{to}{p}"))) {
        Some(tail) => format!("encoder.layer.{layer}.{tail}"),
        None => name.to_string(),
    }
}

/// Whether `name` is a tensor of a `ModernBertModel` saved on its own (no `model.` prefix).
fn is_bare_modernbert(name: &str) -> bool {
    if name.starts_with("embeddings.tok_embeddings.") || name.starts_with("embeddings.norm.") {
        return true;
    }
    if name.starts_with("final_norm.") {
        return true;
    }
    let Some((_, tail)) = name.strip_prefix("layers.").and_then(|rest| rest.split_once('.')) else { return false };
    ["attn.Wqkv.", "attn.Wo.", "attn_norm.", "mlp_norm.", "mlp.Wi.", "mlp.Wo."].iter().any(|p| tail.starts_with(p))
}

/// The attribute under which a family's `transformers` task models (`…ForSequenceClassification` and the
/// others) hold the backbone: `bert`, `roberta` (XLM-RoBERTa and CamemBERT too), `electra`, `distilbert`,
/// `mpnet`, `deberta`, `model` (ModernBERT). None for a `model_type` outside [`crate::ENCODER_FAMILIES`].
pub fn family_prefix(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "bert" => "bert",
        "roberta" | "xlm-roberta" | "camembert" => "roberta",
        "electra" => "electra",
        "distilbert" => "distilbert",
        "mpnet" => "mpnet",
        "deberta-v2" => "deberta",
        "modernbert" => "model",
        _ => return None,
    })
}

/// The name a family's `transformers` task model gives the backbone tensor the encoder names `name` (BERT's
/// names): under the family's prefix ([`family_prefix`]), with DistilBERT's and MPNet's block names. The
/// inverse of [`canonical_name`]; `name` as it is for an unknown family.
pub fn family_name(model_type: &str, name: &str) -> String {
    let Some(prefix) = family_prefix(model_type) else { return name.to_string() };
    if model_type == "modernbert" {
        // The encoder holds them under the task models' names already.
        return name.to_string();
    }
    let renames: &[(&str, &str)] = match model_type {
        "distilbert" => &[
            ("attention.self.query.", "attention.q_lin."),
            ("attention.self.key.", "attention.k_lin."),
            ("attention.self.value.", "attention.v_lin."),
            ("attention.output.dense.", "attention.out_lin."),
            ("attention.output.LayerNorm.", "sa_layer_norm."),
            ("intermediate.dense.", "ffn.lin1."),
            ("output.dense.", "ffn.lin2."),
            ("output.LayerNorm.", "output_layer_norm."),
        ],
        "mpnet" => &[
            ("attention.self.query.", "attention.attn.q."),
            ("attention.self.key.", "attention.attn.k."),
            ("attention.self.value.", "attention.attn.v."),
            ("attention.output.dense.", "attention.attn.o."),
            ("attention.output.LayerNorm.", "attention.LayerNorm."),
        ],
        "deberta-v2" => &[
            ("attention.self.query.", "attention.self.query_proj."),
            ("attention.self.key.", "attention.self.key_proj."),
            ("attention.self.value.", "attention.self.value_proj."),
        ],
        _ => &[],
    };
    let blocks = if model_type == "distilbert" { "transformer.layer." } else { "encoder.layer." };
    if let Some((layer, tail)) = name.strip_prefix("encoder.layer.").and_then(|rest| rest.split_once('.')) {
        let tail = renames
            .iter()
            .find_map(|(from, to)| tail.strip_prefix(from).map(|p| format!("{to}{p}")))
            .unwrap_or_else(|| tail.to_string());
        return format!("{prefix}.{blocks}{layer}.{tail}");
    }
    format!("{prefix}.{name}")
}

impl ParamBuilder {
    /// A builder over weights already in memory. `seed` drives the initialisation of absent parameters.
    pub fn new(source: HashMap<String, Tensor>, seed: u64, device: &Device) -> Self {
        let inner = Inner {
            source,
            int8: HashMap::new(),
            quantized: HashMap::new(),
            store: ParamStore::default(),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        };
        Self { inner: Rc::new(RefCell::new(inner)), prefix: String::new(), role: ParamRole::Embeddings }
    }

    /// A builder over a model's weights: a safetensors file, the `model.safetensors.index.json` of sharded
    /// ones (each shard it names, beside it), or a PyTorch `pytorch_model.bin` (read with candle's pickle
    /// reader). Tensor names may carry a family's prefix (`bert.`, `roberta.`, `electra.`, `distilbert.`, as
    /// task models saved by transformers do); it is stripped, and DistilBERT's names become BERT's
    /// ([`canonical_name`]).
    pub fn from_safetensors(path: &Path, seed: u64, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(NnError::File { path: path.to_owned(), message: "no such file".into() });
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let loaded: Vec<(String, Tensor)> = if name.ends_with(".index.json") {
            let text = std::fs::read_to_string(path).map_err(|source| NnError::Io { path: path.to_owned(), source })?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| NnError::File { path: path.to_owned(), message: format!("not a shard index: {e}") })?;
            let mut shards: Vec<&str> = index["weight_map"]
                .as_object()
                .ok_or_else(|| NnError::File { path: path.to_owned(), message: "no `weight_map`".into() })?
                .values()
                .filter_map(serde_json::Value::as_str)
                .collect();
            shards.sort_unstable();
            shards.dedup();
            let dir = path.parent().unwrap_or(Path::new(""));
            let mut all = Vec::new();
            for shard in shards {
                if shard.contains(['/', '\\']) {
                    return Err(NnError::File {
                        path: path.to_owned(),
                        message: format!("shard {shard:?} is not beside it"),
                    });
                }
                all.extend(load_safetensors(&dir.join(shard), device)?);
            }
            all
        } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
            candle_core::pickle::read_all(path).map_err(|e| NnError::File {
                path: path.to_owned(),
                message: format!("not a PyTorch state dict: {e}"),
            })?
        } else {
            load_safetensors(path, device)?
        };
        let source = loaded
            .into_iter()
            .map(|(k, v)| (canonical_name(&k), v))
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        Ok(Self::new(source, seed, device))
    }

    /// Adds the tensors of another safetensors file to the weights parameters are taken from (adapters on a
    /// base model); a name in both is an error.
    pub fn add_safetensors(&self, path: &Path) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, &self.device()).map_err(|e| NnError::File {
            path: path.to_owned(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        let mut inner = self.inner.borrow_mut();
        for (name, tensor) in loaded {
            if inner.source.contains_key(&name) {
                return Err(NnError::File {
                    path: path.to_owned(),
                    message: format!("tensor `{name}` is in the base weights too"),
                });
            }
            inner.source.insert(name, tensor.to_dtype(DType::F32)?);
        }
        Ok(())
    }

    /// Adds the int8 weights of a file written by [`save_int8`] to the weights parameters are taken from.
    pub fn add_int8(&self, path: &Path) -> Result<()> {
        let matrices = load_int8(path)?;
        let mut inner = self.inner.borrow_mut();
        for (name, m) in matrices {
            if inner.source.contains_key(&name) {
                return Err(NnError::File {
                    path: path.to_owned(),
                    message: format!("tensor `{name}` is in the f32 weights too"),
                });
            }
            inner.int8.insert(name, m);
        }
        Ok(())
    }

    /// Whether any int8 weights were added.
    pub fn has_int8(&self) -> bool {
        !self.inner.borrow().int8.is_empty()
    }

    /// Takes the int8 weight `prefix.name`, checking it is `rows × cols`; `None` when there is none.
    pub fn take_int8(&self, name: &str, rows: usize, cols: usize) -> Result<Option<Int8Matrix>> {
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        let Some(m) = self.inner.borrow_mut().int8.remove(&full) else { return Ok(None) };
        if (m.rows(), m.cols()) != (rows, cols) {
            return Err(NnError::File {
                path: "int8 weights".into(),
                message: format!("tensor `{full}` is {} × {}, the model expects {rows} × {cols}", m.rows(), m.cols()),
            });
        }
        Ok(Some(m))
    }

    /// Names of int8 weights no parameter took.
    pub fn unused_int8(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.borrow().int8.keys().cloned().collect();
        names.sort();
        names
    }

    /// Adds weights kept in a GGUF block format (by their names in the model) to the weights parameters are
    /// taken from: [`ParamBuilder::take_quantized`] takes them as they are, [`ParamBuilder::get`] dequantised.
    pub fn add_quantized(&self, matrices: HashMap<String, QuantMatrix>) -> Result<()> {
        let mut inner = self.inner.borrow_mut();
        for (name, m) in matrices {
            if inner.source.contains_key(&name) {
                return Err(NnError::Input(format!("tensor `{name}` is in the f32 weights too")));
            }
            inner.quantized.insert(name, Arc::new(m));
        }
        Ok(())
    }

    /// Takes the quantised weight `prefix.name`, checking it is `rows × cols`; `None` when there is none.
    pub fn take_quantized(&self, name: &str, rows: usize, cols: usize) -> Result<Option<Arc<QuantMatrix>>> {
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        let Some(m) = self.inner.borrow_mut().quantized.remove(&full) else { return Ok(None) };
        if m.dims() != (rows, cols) {
            let (r, c) = m.dims();
            return Err(NnError::File {
                path: "quantised weights".into(),
                message: format!("tensor `{full}` is {r} × {c}, the model expects {rows} × {cols}"),
            });
        }
        Ok(Some(m))
    }

    /// A builder for names under `self.prefix + name + "."`, with the same role.
    pub fn pp(&self, name: &str) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { inner: self.inner.clone(), prefix, role: self.role.clone() }
    }

    /// This builder, its parameters having `role`.
    pub fn with_role(&self, role: ParamRole) -> Self {
        Self { inner: self.inner.clone(), prefix: self.prefix.clone(), role }
    }

    /// This builder for the parameters of the adapter `name` on the layer being built.
    pub fn adapter(&self, name: &str) -> Self {
        let layer = self.role.layer().unwrap_or(0);
        self.with_role(ParamRole::Adapter {
            adapter: name.to_string(),
            layer,
            shared: name == mtl_core::SHARED_ADAPTER,
        })
    }

    pub fn role(&self) -> &ParamRole {
        &self.role
    }

    pub fn device(&self) -> Device {
        self.inner.borrow().device.clone()
    }

    /// The parameter `prefix.name` of `shape`: loaded, or initialised with `init`.
    /// As [`ParamBuilder::get`], but a parameter the weights do not hold under its own name starts from the
    /// weights' tensor `pretrained` (a full name) when they have it with the same shape: a task's copy of a
    /// pretrained head (ModernBERT's prediction head).
    pub fn get_or_pretrained(
        &self,
        shape: impl Into<Shape>,
        name: &str,
        pretrained: &str,
        init: Init,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        {
            let mut inner = self.inner.borrow_mut();
            if !inner.source.contains_key(&full) && !inner.quantized.contains_key(&full) {
                if let Some(t) = inner.source.get(pretrained).filter(|t| t.shape() == &shape).cloned() {
                    inner.source.insert(full, t);
                }
            }
        }
        self.get(shape, name, init)
    }

    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        if let Some(q) = inner.quantized.remove(&full) {
            // A trained parameter (full fine-tuning) or a small one: as f32.
            let t = q.dequantize(&inner.device)?;
            inner.source.insert(full.clone(), t);
        }
        let tensor = match inner.source.get(&full) {
            Some(t) => {
                if t.shape() != &shape {
                    return Err(NnError::File {
                        path: "weights".into(),
                        message: format!(
                            "tensor `{full}` has shape {:?}, the model expects {:?}",
                            t.dims(),
                            shape.dims()
                        ),
                    });
                }
                t.copy()?
            }
            None => {
                inner.store.initialised.push(full.clone());
                let n = shape.elem_count();
                let data: Vec<f32> = match init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Normal { std } => {
                        let normal = Normal::new(0.0, std).expect("a positive std is a valid normal; this is a bug");
                        (0..n).map(|_| normal.sample(&mut inner.rng) as f32).collect()
                    }
                    Init::Uniform { bound } => {
                        let uniform = rand_distr::Uniform::new_inclusive(-bound, bound);
                        (0..n).map(|_| uniform.sample(&mut inner.rng) as f32).collect()
                    }
                };
                Tensor::from_vec(data, shape, &inner.device)?
            }
        };
        let var = Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        inner.store.roles.insert(full.clone(), self.role.clone());
        inner.store.vars.insert(full, var);
        Ok(t)
    }

    /// Ends building and returns the store.
    pub fn finish(self) -> ParamStore {
        let mut inner = self.inner.borrow_mut();
        std::mem::take(&mut inner.store)
    }
}
