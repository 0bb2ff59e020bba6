//! Tensor operations, one file per family: the public method, its shape checks, and (for fused ops) its
//! backward. Primitive ops' gradient rules live in `backprop.rs`.

pub mod elementwise;
pub mod index;
pub mod matmul;
pub mod reduce;
