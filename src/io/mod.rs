//! File formats: safetensors (read zero-copy, write atomically), GGUF (read, validated, memory-mapped),
//! tensors to and from safetensors, and training checkpoints.

pub mod checkpoint;
pub mod gguf;
pub mod safetensors;
pub mod tensors;

pub use tensors::{load as load_safetensors, save as save_safetensors};
