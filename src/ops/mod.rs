//! Tensor operations, one file per family: the public method, its shape checks, and (for fused ops) its
//! backward. Primitive ops' gradient rules live in `backprop.rs`.

pub mod attention;
pub mod dropout;
pub mod elementwise;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reduce;
pub mod rope;
pub mod softmax;

use crate::dtype::DType;
use crate::error::Result;
use crate::storage::Storage;
use crate::tensor::Tensor;

/// Runs a fused op's f32 kernel on row-major views of `inputs` and stores the result as `dtype`
/// (borrowing f32 contiguous inputs, widening the rest).
pub(crate) fn fused_kernel(
    inputs: &[&Tensor],
    dtype: DType,
    f: impl FnOnce(&[&[f32]]) -> Vec<f32>,
) -> Result<Storage> {
    let guards: Vec<_> = inputs.iter().map(|t| t.storage()).collect();
    let pairs: Vec<(&Storage, &crate::layout::Layout)> = guards
        .iter()
        .zip(inputs)
        .map(|(g, t)| (&**g, t.layout()))
        .collect();
    Storage::f32_kernel(&pairs, dtype, f)
}

/// Runs `f` on row-major f32 views of `inputs` (borrowing f32 contiguous inputs, widening the rest): for
/// fused ops whose kernels produce several outputs.
pub(crate) fn with_f32_inputs<R>(inputs: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> R {
    let guards: Vec<_> = inputs.iter().map(|t| t.storage()).collect();
    let vecs: Vec<std::borrow::Cow<'_, [f32]>> = guards
        .iter()
        .zip(inputs)
        .map(
            |(g, t)| match (g.cpu().as_f32(), t.layout().contiguous_range()) {
                (Some(x), Some(r)) => std::borrow::Cow::Borrowed(&x[r]),
                _ => std::borrow::Cow::Owned(g.to_f32_vec(t.layout())),
            },
        )
        .collect();
    let slices: Vec<&[f32]> = vecs.iter().map(|v| v.as_ref()).collect();
    f(&slices)
}
