//! Low-bit quantization: packed weight formats, GGUF block converters, and the quantizers of TBT and
//! LLM-QAT with straight-through gradients.
//!
//! ```
//! use trit::cpu::qmatmul::ActMode;
//! use trit::quant::{Group, QFormat, QTensor};
//! use trit::{Device, Tensor};
//! let w = Tensor::randn((256, 512), 0.0, 0.02, &mut trit::Rng::new(1), Device::Cpu)?;
//! let q = QTensor::quantize_tensor(&w, QFormat::Ternary2 { group: Group::Row })?;
//! let x = Tensor::ones((1, 512), trit::DType::F32, Device::Cpu)?;
//! let y = q.matmul(&x, ActMode::Int8)?; // int8 activations × 2-bit weights
//! assert_eq!(y.dims(), &[1, 256]);
//! // The packed product equals the f32 product of the dequantized weights (x is exact in int8).
//! let want = x.matmul(&q.to_tensor(Device::Cpu)?.t()?)?;
//! let err = y.sub(&want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
//! assert!(err < 1e-4);
//! # Ok::<(), trit::Error>(())
//! ```

mod device;
pub mod format;
pub mod gguf;
pub mod quantizers;

pub use format::{Group, QFormat, QTensor};
