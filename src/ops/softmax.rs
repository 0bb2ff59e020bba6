//! softmax and log_softmax over any dim, fused with their own backward.

use super::fused_kernel;
use crate::cpu::softmax as k;
use crate::error::Result;
use crate::op::{CustomBackward, Op};
use crate::shape::Dim;
use crate::tensor::Tensor;
use std::sync::Arc;

struct SoftmaxBackward {
    log: bool,
}

impl CustomBackward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        if self.log {
            "log_softmax"
        } else {
            "softmax"
        }
    }

    fn backward(
        &self,
        _inputs: &[Tensor],
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let d = out.dims().last().copied().unwrap_or(1);
        let log = self.log;
        let storage = fused_kernel(&[out, grad], out.dtype(), |v| {
            if log {
                k::log_softmax_backward_rows(v[0], v[1], d)
            } else {
                k::softmax_backward_rows(v[0], v[1], d)
            }
        })?;
        Ok(vec![Some(Tensor::from_storage(
            storage,
            out.shape().clone(),
            None,
        ))])
    }
}

impl Tensor {
    fn softmax_impl(&self, dim: impl Dim, log: bool) -> Result<Tensor> {
        let name = if log { "log_softmax" } else { "softmax" };
        let d = dim.to_index(self.shape(), name)?;
        let last = self.rank() - 1;
        if d != last {
            return self
                .transpose(d, last)?
                .softmax_impl(last, log)?
                .transpose(d, last);
        }
        let n = self.dims()[last];
        let storage = fused_kernel(&[self], self.dtype(), |v| {
            if log {
                k::log_softmax_rows(v[0], n)
            } else {
                k::softmax_rows(v[0], n)
            }
        })?;
        let op = Op::Custom(vec![self.clone()], Arc::new(SoftmaxBackward { log }));
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(op),
        ))
    }

    /// exp(x) / Σ exp(x) along `dim`, computed stably.
    pub fn softmax(&self, dim: impl Dim) -> Result<Tensor> {
        self.softmax_impl(dim, false)
    }

    /// x − logsumexp(x) along `dim`.
    pub fn log_softmax(&self, dim: impl Dim) -> Result<Tensor> {
        self.softmax_impl(dim, true)
    }
}
