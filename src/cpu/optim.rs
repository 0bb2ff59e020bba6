//! The optimizers' per-element updates (fused: one pass over parameter, gradient and state).

use crate::op::{AdamWStep, SgdStep};
use rayon::prelude::*;

/// AdamW in place, as torch.optim.AdamW: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
/// p ← p(1 − lr·wd) − (lr / bc1)·m / (√(v / bc2) + ε).
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWStep) {
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let step = hp.lr / hp.bc1;
    let body = |(((p, &g), m), v): (((&mut f32, &f32), &mut f32), &mut f32)| {
        *m = hp.beta1 * *m + (1.0 - hp.beta1) * g;
        *v = hp.beta2 * *v + (1.0 - hp.beta2) * g * g;
        let denom = (*v / hp.bc2).sqrt() + hp.eps;
        *p = *p * decay - step * *m / denom;
    };
    if p.len() >= super::PAR_THRESHOLD {
        p.par_iter_mut()
            .zip(g)
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .for_each(body);
    } else {
        p.iter_mut()
            .zip(g)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .for_each(body);
    }
}

/// SGD with momentum in place, as torch.optim.SGD with dampening 0: b ← μ·b + g + wd·p,
/// p ← p − lr·(nesterov ? g + wd·p + μ·b : b).
pub fn sgd(p: &mut [f32], g: &[f32], b: &mut [f32], hp: SgdStep) {
    for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
        let g = g + hp.weight_decay * *p;
        *b = hp.momentum * *b + g;
        let d = if hp.nesterov {
            g + hp.momentum * *b
        } else {
            *b
        };
        *p -= hp.lr * d;
    }
}
