//! AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, matching torch.optim.AdamW.

use super::{restore, zeros_var, Optimizer};
use crate::backprop::GradStore;
use crate::error::Result;
use crate::op::AdamWStep;
use crate::storage::Storage;
use crate::tensor::Tensor;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    t: u64,
}

impl AdamW {
    /// Optimizes `params` (named variables, e.g. `ParamStore::all()`).
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                Ok(Slot {
                    m: zeros_var(&param)?,
                    v: zeros_var(&param)?,
                    name,
                    param,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { cfg, slots, t: 0 })
    }

    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }
}

/// One fused AdamW update of a parameter slice: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps).
impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - self.cfg.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.cfg.beta2.powi(self.t as i32);
        for slot in &self.slots {
            let Some(g) = grads.get(&slot.param) else {
                continue;
            };
            // The gradient is read in place while the parameter is written, so it must not share its storage.
            let g = if g.same_storage(&slot.param) {
                g.copy()?
            } else {
                g.clone()
            };
            let hp = AdamWStep {
                lr: self.cfg.lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: self.cfg.weight_decay,
                bc1,
                bc2,
            };
            let g_storage = g.storage();
            slot.param.with_storage_mut(|p| {
                slot.m.with_storage_mut(|m| {
                    slot.v.with_storage_mut(|v| {
                        Storage::adamw_step(p, m, v, (&g_storage, g.layout()), hp)
                    })
                })
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
        let mut out = vec![(
            "t".to_string(),
            Tensor::from_vec(vec![self.t as i32], 1, crate::Device::Cpu)?,
        )];
        for s in &self.slots {
            out.push((format!("{}.m", s.name), s.m.clone()));
            out.push((format!("{}.v", s.name), s.v.clone()));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        let t = state
            .get("t")
            .ok_or_else(|| crate::Error::InvalidArgument {
                op: "AdamW::load_state",
                msg: "missing step count t".into(),
            })?;
        self.t = t.to_vec_i64().first().copied().unwrap_or(0).max(0) as u64;
        for s in &self.slots {
            restore(state, &format!("{}.m", s.name), &s.m)?;
            restore(state, &format!("{}.v", s.name), &s.v)?;
        }
        Ok(())
    }
}
