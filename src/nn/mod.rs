//! Neural-network building blocks: layers that own named parameters in a [`ParamStore`] and a `forward`
//! built from tensor ops (so autograd differentiates them).

pub mod attention;
pub mod block;
pub mod embedding;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod packing;
pub mod params;
pub mod quant_linear;

pub use attention::{Attention, AttentionConfig, Rotary};
pub use block::{BlockConfig, BlockQuant, DecoderBlock};
pub use embedding::Embedding;
pub use kv_cache::{KvCache, KvFormat};
pub use linear::{FakeQuant, Linear};
pub use mlp::{GeluMlp, Mlp, MlpConfig, MlpKind, SwiGluMlp};
pub use norm::{LayerNorm, Norm, NormKind, RmsNorm};
pub use packing::{pack, PackedBatch, IGNORE_INDEX};
pub use params::{Init, PackedParam, ParamStore};
pub use quant_linear::{ActQuant, QuantLinear, QuantLinearConfig};
