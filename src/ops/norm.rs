//! layer_norm and rms_norm over the last dim, fused with their own backward.

use super::fused_kernel;
use crate::cpu::norm::{self as k, NormStats};
use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::tensor::Tensor;
use std::sync::Arc;

struct NormBackward {
    stats: NormStats,
    centre: bool,
    has_weight: bool,
    has_bias: bool,
}

impl CustomBackward for NormBackward {
    fn name(&self) -> &'static str {
        if self.centre {
            "layer_norm"
        } else {
            "rms_norm"
        }
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let x = &inputs[0];
        let d = x.dims().last().copied().unwrap_or(1);
        let w = self.has_weight.then(|| inputs[1].to_vec_f32());
        let (xv, gv) = (x.to_vec_f32(), grad.to_vec_f32());
        let (dx, dw, db) = k::norm_backward(&xv, &gv, d, w.as_deref(), &self.stats, self.centre);
        let dev = x.device();
        let mut out = vec![Some(
            Tensor::from_vec(dx, x.shape(), dev)?.to_dtype(x.dtype())?,
        )];
        if self.has_weight {
            out.push(Some(
                Tensor::from_vec(dw, d, dev)?.to_dtype(inputs[1].dtype())?,
            ));
        }
        if self.has_bias {
            let b = &inputs[inputs.len() - 1];
            out.push(Some(Tensor::from_vec(db, d, dev)?.to_dtype(b.dtype())?));
        }
        Ok(out)
    }
}

impl Tensor {
    fn norm_impl(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
        centre: bool,
    ) -> Result<Tensor> {
        let op_name = if centre { "layer_norm" } else { "rms_norm" };
        let Some(&d) = self.dims().last() else {
            crate::bail!(op_name, "needs at least one dim");
        };
        for p in weight.iter().chain(bias.iter()) {
            if p.dims() != [d] {
                return Err(Error::ShapeMismatch {
                    op: op_name,
                    lhs: self.dims().to_vec(),
                    rhs: p.dims().to_vec(),
                });
            }
        }
        if eps.is_nan() || eps < 0.0 {
            crate::bail!(op_name, "eps must be non-negative, got {eps}");
        }
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        let mut stats = None;
        let storage = fused_kernel(&inputs, self.dtype(), |v| {
            let w = weight.map(|_| v[1]);
            let b = bias.map(|_| v[inputs.len() - 1]);
            let (y, s) = k::norm_forward(v[0], d, w, b, eps, centre);
            stats = Some(s);
            y
        })?;
        let backward = NormBackward {
            stats: stats.expect("kernel ran"),
            centre,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
        };
        let op = Op::Custom(inputs.into_iter().cloned().collect(), Arc::new(backward));
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(op),
        ))
    }

    /// (x − mean) / √(var + eps) ⊙ weight + bias over the last dim (biased variance, as PyTorch).
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        self.norm_impl(weight, bias, eps, true)
    }

    /// x / √(mean(x²) + eps) ⊙ weight over the last dim.
    pub fn rms_norm(&self, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        self.norm_impl(weight, None, eps, false)
    }
}
