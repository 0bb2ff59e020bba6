//! Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_.

use crate::backprop::GradStore;
use crate::error::Result;
use crate::tensor::Tensor;

/// Scales the gradients of `params` so their joint L2 norm is at most `max_norm`; returns the norm before
/// clipping. CPU gradients accumulate in f64; GPU gradients are reduced on the device (f32 partial sums)
/// so the step reads back one number.
pub fn clip_grad_norm(params: &[Tensor], grads: &mut GradStore, max_norm: f32) -> Result<f32> {
    let mut sq = 0f64;
    let mut device_sums = Vec::new();
    for p in params {
        if let Some(g) = grads.get(p) {
            if g.device().is_cuda() {
                device_sums.push(
                    g.to_dtype(crate::DType::F32)?
                        .sqr()?
                        .sum_all()?
                        .reshape(1)?,
                );
            } else {
                sq += g.with_f32_slice("clip_grad_norm", |v| {
                    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()
                })?;
            }
        }
    }
    if !device_sums.is_empty() {
        sq += Tensor::cat(&device_sums, 0)?.sum_all()?.to_scalar()? as f64;
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
