//! Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_.

use crate::backprop::GradStore;
use crate::error::Result;
use crate::tensor::Tensor;

/// Scales the gradients of `params` so their joint L2 norm is at most `max_norm`; returns the norm before
/// clipping (accumulated in f64).
pub fn clip_grad_norm(params: &[Tensor], grads: &mut GradStore, max_norm: f32) -> Result<f32> {
    let mut sq = 0f64;
    for p in params {
        if let Some(g) = grads.get(p) {
            sq += g.with_f32_slice(|v| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>());
        }
    }
    let norm = sq.sqrt() as f32;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for p in params {
            if let Some(g) = grads.remove(p) {
                grads.insert(p, g.mul_scalar(scale)?);
            }
        }
    }
    Ok(norm)
}
