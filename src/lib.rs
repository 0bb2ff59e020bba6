//! # trit
//!
//! A from-scratch tensor engine for efficient low-bit transformers: strided tensors, reverse-mode autograd,
//! rayon + AVX-512/AVX2 CPU kernels, optimizers and safetensors checkpoints.
//!
//! ```
//! use trit::{Device, Tensor};
//! let w = Tensor::from_vec(vec![1f32, 2., 3., 4.], (2, 2), Device::Cpu)?.var()?;
//! let x = Tensor::from_vec(vec![1f32, -1.], (2, 1), Device::Cpu)?;
//! let loss = w.matmul(&x)?.sqr()?.sum_all()?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(&w).unwrap().to_vec::<f32>()?, vec![-2., 2., -2., 2.]);
//! # Ok::<(), trit::Error>(())
//! ```

pub mod backprop;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod io;
pub mod layout;
pub mod nn;
pub mod op;
pub mod ops;
pub mod optim;
pub mod quant;
pub mod rng;
pub mod shape;
pub mod storage;
pub mod tensor;
pub mod transfers;

pub use backprop::GradStore;
pub use dtype::DType;
pub use error::{Error, Result};
pub use layout::Layout;
pub use ops::reduce::Dims;
pub use rng::Rng;
pub use shape::{Dim, Shape};
pub use storage::Device;
pub use tensor::{no_grad, NoGradGuard, Tensor, TensorId, WithDType};
