//! Fused, numerically stable cross-entropy with ignore_index.

use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::tensor::Tensor;
use std::sync::Arc;

struct CrossEntropyBackward {
    /// i32 targets with ignored rows as −1, and the forward's per-row log-sum-exp (f32), both on the
    /// logits' device.
    targets: Tensor,
    lse: Tensor,
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
        let grad = grad.to_device(logits.device())?;
        let storage = logits.storage().cross_entropy_backward(
            logits.layout(),
            v,
            (&self.targets.storage(), &self.lse.storage()),
            (&grad.storage(), grad.layout()),
            self.kept,
        )?;
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
        let mut t = targets.try_to_vec_i64()?;
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
        let rows = t.len();
        let t: Vec<i32> = t.into_iter().map(|x| x as i32).collect();
        let targets = Tensor::from_vec(t, rows, self.device())?;
        let (storage, lse) =
            self.storage()
                .cross_entropy(self.layout(), v, &targets.storage(), kept)?;
        let op = Op::Custom(
            vec![self.clone()],
            Arc::new(CrossEntropyBackward {
                targets,
                lse: Tensor::from_storage(lse, rows, None),
                kept,
            }),
        );
        Ok(Tensor::from_storage(storage, (), Some(op)))
    }
}
