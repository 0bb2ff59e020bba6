//! Low-bit quantization: packed weight formats, GGUF block converters, and the quantizers of TBT and
//! LLM-QAT with straight-through gradients.

pub mod format;
pub mod gguf;
pub mod quantizers;

pub use format::{Group, QFormat, QTensor};
