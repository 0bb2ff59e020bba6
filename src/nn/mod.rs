//! Neural-network building blocks: layers that own named parameters in a [`ParamStore`] and a `forward`
//! built from tensor ops (so autograd differentiates them).

pub mod attention;
pub mod block;
pub mod embedding;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod params;
pub mod quant_linear;

pub use attention::{causal_mask, Attention, AttentionConfig, Rotary};
pub use block::{BlockConfig, DecoderBlock};
pub use embedding::Embedding;
pub use kv_cache::{KvCache, KvFormat};
pub use linear::Linear;
pub use mlp::{GeluMlp, Mlp, MlpConfig, MlpKind, SwiGluMlp};
pub use norm::{LayerNorm, Norm, NormKind, RmsNorm};
pub use params::{Init, ParamStore};
pub use quant_linear::{ActQuant, QuantLinear, QuantLinearConfig};
