//! A named store of trainable parameters: models create their weights through it, optimizers and
//! checkpoints walk it by name.
//!
//! It also holds frozen *packed* weights ([`QTensor`]s, e.g. a GGUF file's Q4_1 blocks): a layer built
//! over a name that has a packed weight runs the packed kernels instead of creating a dense parameter.
//! Packed weights are not trained, so [`ParamStore::all`] and checkpoints do not list them.

use crate::cpu::qmatmul::ActMode;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::QTensor;
use crate::rng::Rng;
use crate::shape::Shape;
use crate::storage::Device;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// How a new parameter is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Const(f32),
    /// Normal(0, std).
    Normal(f32),
    /// Uniform(-bound, bound).
    Uniform(f32),
    /// Kaiming-uniform as torch.nn.Linear uses: bound = 1/√fan_in (fan_in = last dim).
    LinearDefault,
}

/// A frozen packed weight and the form its layer feeds activations in.
#[derive(Clone, Debug)]
pub struct PackedParam {
    pub weights: Arc<QTensor>,
    /// The form activations enter the packed product in.
    pub act: ActMode,
}

struct Inner {
    vars: BTreeMap<String, Tensor>,
    packed: BTreeMap<String, PackedParam>,
    rng: Rng,
    device: Device,
    dtype: DType,
}

/// Shared, named parameters. Cloning shares the same store; [`ParamStore::pp`] gives a prefixed view.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    prefix: String,
}

impl ParamStore {
    /// An empty store; new parameters are drawn from an RNG seeded with `seed`.
    pub fn new(seed: u64, dtype: DType, device: Device) -> Self {
        ParamStore {
            inner: Arc::new(Mutex::new(Inner {
                vars: BTreeMap::new(),
                packed: BTreeMap::new(),
                rng: Rng::new(seed),
                device,
                dtype,
            })),
            prefix: String::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A view whose names are prefixed with `name.` (e.g. `layers.0.attn`).
    pub fn pp(&self, name: impl AsRef<str>) -> ParamStore {
        let name = name.as_ref();
        ParamStore {
            inner: self.inner.clone(),
            prefix: if self.prefix.is_empty() {
                name.to_string()
            } else {
                format!("{}.{name}", self.prefix)
            },
        }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn device(&self) -> Device {
        self.lock().device
    }

    pub fn dtype(&self) -> DType {
        self.lock().dtype
    }

    /// The parameter `name`, created with `init` if absent. An existing parameter must have `shape`.
    pub fn get_or_init(&self, name: &str, shape: impl Into<Shape>, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.full_name(name);
        let mut inner = self.lock();
        if let Some(t) = inner.vars.get(&full) {
            if t.shape() != &shape {
                return Err(Error::ShapeMismatch {
                    op: "ParamStore::get_or_init",
                    lhs: t.dims().to_vec(),
                    rhs: shape.dims().to_vec(),
                });
            }
            return Ok(t.clone());
        }
        let (dtype, device) = (inner.dtype, inner.device);
        let fan_in = shape.dims().last().copied().unwrap_or(1).max(1);
        let t = match init {
            Init::Zeros => Tensor::zeros(shape, dtype, device)?,
            Init::Ones => Tensor::ones(shape, dtype, device)?,
            Init::Const(v) => Tensor::full(v, shape, dtype, device)?,
            Init::Normal(std) => {
                Tensor::randn(shape, 0.0, std, &mut inner.rng, device)?.to_dtype(dtype)?
            }
            Init::Uniform(b) => {
                Tensor::uniform(shape, -b, b, &mut inner.rng, device)?.to_dtype(dtype)?
            }
            Init::LinearDefault => {
                let b = 1.0 / (fan_in as f32).sqrt();
                Tensor::uniform(shape, -b, b, &mut inner.rng, device)?.to_dtype(dtype)?
            }
        }
        .var()?;
        inner.vars.insert(full, t.clone());
        Ok(t)
    }

    /// Inserts (or replaces) a parameter under `name`, as a variable.
    pub fn insert(&self, name: &str, value: &Tensor) -> Result<Tensor> {
        let t = if value.is_variable() {
            value.clone()
        } else {
            value.var()?
        };
        self.lock().vars.insert(self.full_name(name), t.clone());
        Ok(t)
    }

    /// Inserts (or replaces) a frozen packed weight under `name`; `act` as in [`PackedParam`].
    pub fn insert_packed(&self, name: &str, weights: QTensor, act: ActMode) {
        let p = PackedParam {
            weights: Arc::new(weights),
            act,
        };
        self.lock().packed.insert(self.full_name(name), p);
    }

    /// The packed weight under `name`, if one was inserted.
    pub fn packed(&self, name: &str) -> Option<PackedParam> {
        self.lock().packed.get(&self.full_name(name)).cloned()
    }

    /// Every packed weight of the whole store, sorted by name.
    pub fn all_packed(&self) -> Vec<(String, PackedParam)> {
        self.lock()
            .packed
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.lock().vars.get(&self.full_name(name)).cloned()
    }

    /// Every parameter of the whole store, sorted by name.
    pub fn all(&self) -> Vec<(String, Tensor)> {
        self.lock()
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        self.lock().vars.values().map(|t| t.elem_count()).sum()
    }

    /// Overwrites parameters from `(name, value)` pairs; every stored parameter must be given, with its
    /// shape (loading a checkpoint into a freshly built model).
    pub fn load(&self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        let vars = self.all();
        for (name, var) in &vars {
            let v = values.get(name).ok_or_else(|| Error::InvalidArgument {
                op: "ParamStore::load",
                msg: format!("missing parameter {name}"),
            })?;
            var.set(v)?;
        }
        Ok(())
    }
}
