//! Optimizers (SGD with momentum, AdamW), learning-rate schedules and gradient clipping.

pub mod adamw;
pub mod clip;
pub mod schedule;
pub mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::clip_grad_norm;
pub use schedule::LrSchedule;
pub use sgd::{Sgd, SgdConfig};

use crate::backprop::GradStore;
use crate::error::Result;
use crate::tensor::Tensor;
use std::collections::BTreeMap;

/// What every optimizer offers the training loop and the checkpoint code.
pub trait Optimizer {
    /// Applies one update to every parameter that has a gradient in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn lr(&self) -> f32;
    fn set_lr(&mut self, lr: f32);
    /// Named state tensors (moments, step counts), for checkpoints.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores state saved by [`Optimizer::state`]; every entry must be present with the right shape.
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()>;
}

/// A zero f32 buffer shaped like `p`, as a variable so the update kernels can write it in place.
fn zeros_var(p: &Tensor) -> Result<Tensor> {
    Tensor::zeros(p.shape(), crate::DType::F32, p.device())?.var()
}

/// Restores one named state tensor into `dst`.
fn restore(state: &BTreeMap<String, Tensor>, name: &str, dst: &Tensor) -> Result<()> {
    let src = state
        .get(name)
        .ok_or_else(|| crate::Error::InvalidArgument {
            op: "Optimizer::load_state",
            msg: format!("missing optimizer state {name}"),
        })?;
    dst.set(src)
}
