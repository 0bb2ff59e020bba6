//! Fused, numerically stable cross-entropy with ignore_index.

use super::fused_kernel;
use crate::cpu::softmax as k;
use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::tensor::Tensor;
use std::sync::Arc;

struct CrossEntropyBackward {
    targets: Vec<i64>,
    lse: Vec<f32>,
    kept: usize,
}

impl CustomBackward for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let logits = &inputs[0];
        let v = *logits.dims().last().expect("checked in forward");
        let scale = grad.to_scalar()? / self.kept.max(1) as f32;
        let storage = fused_kernel(&[logits], logits.dtype(), |x| {
            k::cross_entropy_backward(x[0], v, &self.targets, &self.lse, scale)
        })?;
        Ok(vec![Some(Tensor::from_storage(
            storage,
            logits.shape().clone(),
            None,
        ))])
    }
}

impl Tensor {
    /// Mean over rows of −log softmax(logits)[target], for logits [.., vocab] and integer targets [..].
    /// Rows whose target equals `ignore_index` are skipped; when every row is skipped the loss is 0
    /// (with zero gradient) rather than PyTorch's NaN, so a fully padded micro-batch cannot poison a run.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: Option<i64>) -> Result<Tensor> {
        let Some((&v, lead)) = self.dims().split_last() else {
            crate::bail!("cross_entropy", "logits need at least one dim");
        };
        if targets.dims() != lead {
            return Err(Error::ShapeMismatch {
                op: "cross_entropy",
                lhs: self.dims().to_vec(),
                rhs: targets.dims().to_vec(),
            });
        }
        if targets.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: "cross_entropy",
                dtype: targets.dtype(),
            });
        }
        let mut t = targets.to_vec_i64();
        for x in t.iter_mut() {
            if Some(*x) == ignore_index {
                *x = -1;
            } else if *x < 0 || *x as usize >= v {
                return Err(Error::IndexOutOfRange {
                    op: "cross_entropy",
                    index: *x,
                    size: v,
                });
            }
        }
        let kept = t.iter().filter(|&&x| x >= 0).count();
        let mut lse = Vec::new();
        let storage = fused_kernel(&[self], self.dtype(), |x| {
            let (total, l) = k::cross_entropy_forward(x[0], v, &t);
            lse = l;
            // Float sums start at -0.0; an all-ignored batch reports a plain 0.
            vec![if kept == 0 {
                0.0
            } else {
                (total / kept as f64) as f32
            }]
        })?;
        let op = Op::Custom(
            vec![self.clone()],
            Arc::new(CrossEntropyBackward {
                targets: t,
                lse,
                kept,
            }),
        );
        Ok(Tensor::from_storage(storage, (), Some(op)))
    }
}
