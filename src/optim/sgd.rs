//! SGD with momentum, matching torch.optim.SGD (dampening 0): b ← μ·b + g (+ wd·p), p ← p − lr·b.

use super::{restore, zeros_var, Optimizer};
use crate::backprop::GradStore;
use crate::error::Result;
use crate::op::SgdStep;
use crate::storage::Storage;
use crate::tensor::Tensor;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

pub struct Sgd {
    cfg: SgdConfig,
    slots: Vec<(String, Tensor, Tensor)>,
}

impl Sgd {
    pub fn new(params: Vec<(String, Tensor)>, cfg: SgdConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(n, p)| Ok((n, zeros_var(&p)?, p)))
            .collect::<Result<_>>()?;
        Ok(Sgd { cfg, slots })
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let cfg = self.cfg;
        for (_, buf, p) in &self.slots {
            let Some(g) = grads.get(p) else { continue };
            // The gradient is read in place while the parameter is written, so it must not share its storage.
            let g = if g.same_storage(p) {
                g.copy()?
            } else {
                g.clone()
            };
            let hp = SgdStep {
                lr: cfg.lr,
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
                nesterov: cfg.nesterov,
            };
            let g_storage = g.storage();
            p.with_storage_mut(|p| {
                buf.with_storage_mut(|b| Storage::sgd_step(p, b, (&g_storage, g.layout()), hp))
            })?;
        }
        Ok(())
    }

    fn lr(&self) -> f32 {
        self.cfg.lr
    }

    fn set_lr(&mut self, lr: f32) {
        self.cfg.lr = lr;
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .slots
            .iter()
            .map(|(n, b, _)| (format!("{n}.momentum"), b.clone()))
            .collect())
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        for (n, b, _) in &self.slots {
            restore(state, &format!("{n}.momentum"), b)?;
        }
        Ok(())
    }
}
