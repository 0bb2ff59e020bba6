//! layer_norm and rms_norm over the last dim, fused with their own backward.

use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::tensor::Tensor;
use std::sync::Arc;

struct NormBackward {
    /// Per-row mean (zeros for RMSNorm) and 1/σ from the forward, as f32 on the input's device.
    mean: Tensor,
    rstd: Tensor,
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
        let w = self.has_weight.then(|| &inputs[1]);
        let (wg, mg, rg, gg) = (
            w.map(|w| w.storage()),
            self.mean.storage(),
            self.rstd.storage(),
            grad.storage(),
        );
        let (dx, dw, db) = x.storage().norm_backward(
            x.layout(),
            (&gg, grad.layout()),
            w.zip(wg.as_deref()).map(|(w, s)| (s, w.layout())),
            (&mg, &rg),
            d,
            self.centre,
            (self.has_weight, self.has_bias),
        )?;
        let mut out = vec![Some(Tensor::from_storage(dx, x.shape().clone(), None))];
        if let (Some(dw), Some(w)) = (dw, w) {
            out.push(Some(Tensor::from_storage(dw, d, None).to_dtype(w.dtype())?));
        }
        if let Some(db) = db {
            let b = &inputs[inputs.len() - 1];
            out.push(Some(Tensor::from_storage(db, d, None).to_dtype(b.dtype())?));
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
        let (wg, bg) = (weight.map(|w| w.storage()), bias.map(|b| b.storage()));
        let (y, mean, rstd) = self.storage().norm(
            self.layout(),
            weight.zip(wg.as_deref()).map(|(w, s)| (s, w.layout())),
            bias.zip(bg.as_deref()).map(|(b, s)| (s, b.layout())),
            d,
            eps,
            centre,
        )?;
        let rows = self.elem_count() / d.max(1);
        let backward = NormBackward {
            mean: Tensor::from_storage(mean, rows, None),
            rstd: Tensor::from_storage(rstd, rows, None),
            centre,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
        };
        let mut inputs = vec![self.clone()];
        inputs.extend(weight.cloned());
        inputs.extend(bias.cloned());
        let op = Op::Custom(inputs, Arc::new(backward));
        Ok(Tensor::from_storage(y, self.shape().clone(), Some(op)))
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
