//! Batched matrix multiplication with broadcast batch dims; transposed operands are read through their
//! strides, never copied.

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::Op;
use crate::shape::Shape;
use crate::tensor::Tensor;

/// (offset, batch stride, row stride, col stride) of a [.., rows, cols] view whose batch dims collapse to
/// one stride; `None` when they don't.
fn mat_strides(l: &Layout) -> Option<(usize, usize, usize, usize)> {
    let r = l.dims().len();
    let (dims, strides) = (&l.dims()[..r - 2], &l.strides()[..r - 2]);
    let (bd, bs) = crate::layout::coalesce(dims, &[strides]);
    let batch_stride = if bd.len() == 1 { bs[0][0] } else { return None };
    Some((
        l.offset(),
        batch_stride,
        l.strides()[r - 2],
        l.strides()[r - 1],
    ))
}

impl Tensor {
    /// `self [.., m, k] @ rhs [.., k, n]`, broadcasting the batch dims. Both need at least 2 dims.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (ad, bd) = (self.dims(), rhs.dims());
        if ad.len() < 2 || bd.len() < 2 || ad[ad.len() - 1] != bd[bd.len() - 2] {
            return Err(Error::ShapeMismatch {
                op: "matmul",
                lhs: ad.to_vec(),
                rhs: bd.to_vec(),
            });
        }
        if self.dtype() != rhs.dtype() {
            return Err(Error::DTypeMismatch {
                op: "matmul",
                lhs: self.dtype(),
                rhs: rhs.dtype(),
            });
        }
        let (m, k, n) = (ad[ad.len() - 2], ad[ad.len() - 1], bd[bd.len() - 1]);
        let batch_shape = Shape::from(&ad[..ad.len() - 2])
            .broadcast_with(&Shape::from(&bd[..bd.len() - 2]), "matmul")?;
        let a = self.broadcast_as([batch_shape.dims(), &[m, k]].concat())?;
        let b = rhs.broadcast_as([batch_shape.dims(), &[k, n]].concat())?;
        let a = if mat_strides(a.layout()).is_some() {
            a
        } else {
            a.contiguous()?
        };
        let b = if mat_strides(b.layout()).is_some() {
            b
        } else {
            b.contiguous()?
        };
        let (sa, sb) = (
            mat_strides(a.layout()).unwrap(),
            mat_strides(b.layout()).unwrap(),
        );
        let batch = batch_shape.elem_count();
        let storage = a.storage().matmul(&b.storage(), (batch, m, n, k), sa, sb)?;
        let out_shape = [batch_shape.dims(), &[m, n]].concat();
        Ok(Tensor::from_storage(
            storage,
            out_shape,
            Some(Op::Matmul(a.clone(), b.clone())),
        ))
    }
}
