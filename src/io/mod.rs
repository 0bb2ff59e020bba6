//! File formats: safetensors (read zero-copy, write atomically) and training checkpoints.

pub mod safetensors;
