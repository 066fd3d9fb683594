//! Parameters: a name-keyed store of variables and a builder whose prefix path is the checkpoint tensor name,
//! so that loading and naming are one thing.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Device, Shape, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::{NnError, Result};

/// How a parameter absent from the loaded weights is initialised (as Hugging Face BERT initialises it).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal { std: f64 },
    Zeros,
    Ones,
    /// Uniform on `[-bound, bound]`.
    Uniform { bound: f64 },
}

/// Every trainable variable of a model, by checkpoint name. Iteration order is the name order.
#[derive(Debug, Default)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
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

    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Writes every variable to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_where(path, |_| true)
    }

    /// Writes the variables whose names pass `keep` to a safetensors file.
    pub fn save_where(&self, path: &Path, keep: impl Fn(&str) -> bool) -> Result<()> {
        let tensors: HashMap<&str, Tensor> =
            self.vars.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.as_str(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }
}

struct Inner {
    source: HashMap<String, Tensor>,
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
}

impl ParamBuilder {
    /// A builder over weights already in memory. `seed` drives the initialisation of absent parameters.
    pub fn new(source: HashMap<String, Tensor>, seed: u64, device: &Device) -> Self {
        let inner = Inner {
            source,
            store: ParamStore::default(),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        };
        Self { inner: Rc::new(RefCell::new(inner)), prefix: String::new() }
    }

    /// A builder over a safetensors file. Tensor names may carry a `bert.` prefix (as task models saved by
    /// transformers do); it is stripped.
    pub fn from_safetensors(path: &Path, seed: u64, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(NnError::File { path: path.to_owned(), message: "no such file".into() });
        }
        let loaded = candle_core::safetensors::load(path, device)
            .map_err(|e| NnError::File { path: path.to_owned(), message: format!("not a valid safetensors file: {e}") })?;
        let source = loaded
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("bert.").map(String::from).unwrap_or(k), v))
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        Ok(Self::new(source, seed, device))
    }

    /// Adds the tensors of another safetensors file to the weights parameters are taken from (adapters on a
    /// base model); a name in both is an error.
    pub fn add_safetensors(&self, path: &Path) -> Result<()> {
        let loaded = candle_core::safetensors::load(path, &self.device())
            .map_err(|e| NnError::File { path: path.to_owned(), message: format!("not a valid safetensors file: {e}") })?;
        let mut inner = self.inner.borrow_mut();
        for (name, tensor) in loaded {
            if inner.source.contains_key(&name) {
                return Err(NnError::File { path: path.to_owned(), message: format!("tensor `{name}` is in the base weights too") });
            }
            inner.source.insert(name, tensor.to_dtype(DType::F32)?);
        }
        Ok(())
    }

    /// A builder for names under `self.prefix + name + "."`.
    pub fn pp(&self, name: &str) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { inner: self.inner.clone(), prefix }
    }

    pub fn device(&self) -> Device {
        self.inner.borrow().device.clone()
    }

    /// The parameter `prefix.name` of `shape`: loaded, or initialised with `init`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        let tensor = match inner.source.get(&full) {
            Some(t) => {
                if t.shape() != &shape {
                    return Err(NnError::File {
                        path: "weights".into(),
                        message: format!("tensor `{full}` has shape {:?}, the model expects {:?}", t.dims(), shape.dims()),
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
        inner.store.vars.insert(full, var);
        Ok(t)
    }

    /// Ends building and returns the store.
    pub fn finish(self) -> ParamStore {
        let mut inner = self.inner.borrow_mut();
        std::mem::take(&mut inner.store)
    }
}
