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
    Storage::f32_kernel(&pairs(&guards, inputs), dtype, f)
}

/// [`fused_kernel`] for kernels with several outputs: runs `f` on the same views and returns what it
/// returns.
pub(crate) fn with_f32_inputs<R>(inputs: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> R {
    let guards: Vec<_> = inputs.iter().map(|t| t.storage()).collect();
    Storage::with_f32_views(&pairs(&guards, inputs), f)
}

/// Each input's storage (behind its read guard) with its layout.
fn pairs<'a>(
    guards: &'a [std::sync::RwLockReadGuard<'_, Storage>],
    inputs: &'a [&Tensor],
) -> Vec<(&'a Storage, &'a crate::layout::Layout)> {
    guards
        .iter()
        .zip(inputs)
        .map(|(g, t)| (&**g, t.layout()))
        .collect()
}
