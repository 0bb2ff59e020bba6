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

use crate::error::Result;
use crate::storage::Storage;
use crate::tensor::Tensor;

/// Runs a CPU-only fused kernel (the QAT quantizers) on row-major f32 views of `inputs` and stores the
/// result as `dtype`; GPU inputs are an error naming `op`.
pub(crate) fn fused_kernel(
    op: &'static str,
    inputs: &[&Tensor],
    dtype: crate::DType,
    f: impl FnOnce(&[&[f32]]) -> Vec<f32>,
) -> Result<Storage> {
    let out = with_f32_inputs(op, inputs, f)?;
    Ok(Storage::Cpu(crate::cpu::CpuStorage::from_f32(out, dtype)))
}

/// Runs a CPU-only fused kernel on row-major f32 views of `inputs` (borrowing f32 contiguous inputs,
/// widening the rest); GPU inputs are an error naming `op`.
pub(crate) fn with_f32_inputs<R>(
    op: &'static str,
    inputs: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> R,
) -> Result<R> {
    let guards: Vec<_> = inputs.iter().map(|t| t.storage()).collect();
    let pairs: Vec<(&Storage, &crate::layout::Layout)> = guards
        .iter()
        .zip(inputs)
        .map(|(g, t)| (&**g, t.layout()))
        .collect();
    Storage::with_f32_views(op, &pairs, f)
}
