//! Pre-norm transformer decoder block: h = x + attn(norm₁(x)); out = h + mlp(norm₂(h)).

use super::attention::{Attention, AttentionConfig, Rotary};
use super::kv_cache::KvCache;
use super::linear::FakeQuant;
use super::mlp::{Mlp, MlpConfig};
use super::norm::{Norm, NormKind};
use super::params::ParamStore;
use crate::error::Result;
use crate::ops::attention::AttentionOptions;
use crate::ops::rope::RopeTable;
use crate::quant::quantizers::Quantizer;
use crate::tensor::Tensor;

/// Everything that shapes one block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockConfig {
    pub attn: AttentionConfig,
    pub mlp: MlpConfig,
    pub norm: NormKind,
    pub norm_eps: f32,
}

/// What quantization-aware training fakes in a block: every linear layer as `linear` says, and the
/// attention's keys and values per token, before RoPE, with `kv` (LLM-QAT's W-A-KV settings).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQuant {
    pub linear: FakeQuant,
    pub kv: Option<Quantizer>,
}

impl BlockQuant {
    /// LLM-QAT's W`w`-A`a`-KV`kv` with its symmetric quantizers; `None` or 16 bits keeps that part in
    /// full precision.
    pub fn llm_qat(w: Option<u32>, a: Option<u32>, kv: Option<u32>) -> Self {
        BlockQuant {
            linear: FakeQuant::llm_qat(w, a),
            kv: super::linear::llm_qat_quantizer(kv),
        }
    }
}

/// One decoder layer. Parameters (Hugging Face Llama names): `input_layernorm`, `self_attn`,
/// `post_attention_layernorm`, `mlp`.
#[derive(Clone, Debug)]
pub struct DecoderBlock {
    attn_norm: Norm,
    attn: Attention,
    mlp_norm: Norm,
    mlp: Mlp,
}

impl DecoderBlock {
    pub fn new(params: &ParamStore, cfg: &BlockConfig) -> Result<Self> {
        let hidden = cfg.attn.hidden;
        if cfg.mlp.hidden != hidden {
            crate::bail!(
                "DecoderBlock::new",
                "attention width {hidden} differs from MLP width {}",
                cfg.mlp.hidden
            );
        }
        Ok(DecoderBlock {
            attn_norm: Norm::new(
                &params.pp("input_layernorm"),
                cfg.norm,
                hidden,
                cfg.norm_eps,
            )?,
            attn: Attention::new(&params.pp("self_attn"), &cfg.attn)?,
            mlp_norm: Norm::new(
                &params.pp("post_attention_layernorm"),
                cfg.norm,
                hidden,
                cfg.norm_eps,
            )?,
            mlp: Mlp::new(&params.pp("mlp"), &cfg.mlp)?,
        })
    }

    /// Trains and runs the block with fake quantization as `q` says (`BlockQuant::default()`: none).
    pub fn set_fake_quant(&mut self, q: BlockQuant) -> Result<()> {
        self.attn.set_fake_quant(q.linear, q.kv)?;
        self.mlp.set_fake_quant(q.linear)
    }

    /// `x [batch, seq, hidden] -> [batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor, rotary: Option<Rotary>, causal: bool) -> Result<Tensor> {
        self.forward_with(x, &AttentionOptions::new(causal, rotary))
    }

    /// `x [batch, seq, hidden] -> [batch, seq, hidden]` with the attention masked and rotated as `opts`
    /// says (packed documents, key padding, a sliding window; see [`Attention::forward_with`]).
    pub fn forward_with(&self, x: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        let h = x.add(&self.attn.forward_with(&self.attn_norm.forward(x)?, opts)?)?;
        h.add(&self.mlp.forward(&self.mlp_norm.forward(&h)?)?)
    }

    /// Incremental decoding: `x [batch, seq, hidden]` are the tokens after those in `cache` (this layer's
    /// cache); see [`Attention::forward_cached`].
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: Option<&RopeTable>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = x.add(
            &self
                .attn
                .forward_cached(&self.attn_norm.forward(x)?, rope, cache)?,
        )?;
        h.add(&self.mlp.forward(&self.mlp_norm.forward(&h)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::mlp::MlpKind;
    use crate::nn::params::Init;
    use crate::ops::rope::{RopeStyle, RopeTable};
    use crate::{DType, Device, Rng};

    fn config(out_init: Init) -> Result<BlockConfig> {
        let mut attn = AttentionConfig::new(16, 4, 2)?;
        attn.init = Init::Normal(0.2);
        attn.out_init = out_init;
        Ok(BlockConfig {
            attn,
            mlp: MlpConfig {
                kind: MlpKind::SwiGlu,
                hidden: 16,
                ffn_hidden: 24,
                init: Init::Normal(0.2),
                out_init,
            },
            norm: NormKind::RmsNorm,
            norm_eps: 1e-5,
        })
    }

    #[test]
    fn equals_its_parts_composed() -> Result<()> {
        let ps = ParamStore::new(1, DType::F32, Device::Cpu);
        let cfg = config(Init::Normal(0.2))?;
        let block = DecoderBlock::new(&ps.pp("layers.0"), &cfg)?;
        // Modules built on the same names share the block's parameters.
        let p = ps.pp("layers.0");
        let n1 = Norm::new(&p.pp("input_layernorm"), NormKind::RmsNorm, 16, 1e-5)?;
        let attn = Attention::new(&p.pp("self_attn"), &cfg.attn)?;
        let n2 = Norm::new(
            &p.pp("post_attention_layernorm"),
            NormKind::RmsNorm,
            16,
            1e-5,
        )?;
        let mlp = Mlp::new(&p.pp("mlp"), &cfg.mlp)?;
        assert_eq!(ps.all().len(), 2 + 4 + 3);

        let table = RopeTable::new(4, 8, 10_000.0, 1.0, RopeStyle::Half, Device::Cpu)?;
        let pos = Tensor::arange(0, 7, Device::Cpu)?;
        let rotary = Some(Rotary {
            table: &table,
            positions: &pos,
        });
        let x = Tensor::randn((2, 7, 16), 0.0, 1.0, &mut Rng::new(2), Device::Cpu)?;
        let h = x.add(&attn.forward(&n1.forward(&x)?, rotary, true)?)?;
        let want = h.add(&mlp.forward(&n2.forward(&h)?)?)?;
        assert_eq!(
            block.forward(&x, rotary, true)?.to_vec_f32(),
            want.to_vec_f32()
        );
        Ok(())
    }

    #[test]
    fn cached_forward_matches_the_full_forward() -> Result<()> {
        use crate::nn::kv_cache::KvFormat;
        let ps = ParamStore::new(5, DType::F32, Device::Cpu);
        let block = DecoderBlock::new(&ps, &config(Init::Normal(0.2))?)?;
        let table = RopeTable::new(4, 8, 10_000.0, 1.0, RopeStyle::Half, Device::Cpu)?;
        let pos = Tensor::arange(0, 6, Device::Cpu)?;
        let rotary = Some(Rotary {
            table: &table,
            positions: &pos,
        });
        let x = Tensor::randn((1, 6, 16), 0.0, 1.0, &mut Rng::new(6), Device::Cpu)?;
        let full = block.forward(&x, rotary, true)?.to_vec_f32();
        let mut cache = KvCache::new(1, 2, 4, KvFormat::F32)?;
        let mut got = block
            .forward_cached(&x.narrow(1, 0, 5)?, Some(&table), &mut cache)?
            .to_vec_f32();
        got.extend(
            block
                .forward_cached(&x.narrow(1, 5, 1)?, Some(&table), &mut cache)?
                .to_vec_f32(),
        );
        for (g, w) in got.iter().zip(&full) {
            assert!((g - w).abs() < 1e-5, "cached {g} vs full {w}");
        }
        Ok(())
    }

    #[test]
    fn zero_output_projections_make_an_identity() -> Result<()> {
        let ps = ParamStore::new(3, DType::F32, Device::Cpu);
        let block = DecoderBlock::new(&ps, &config(Init::Zeros)?)?;
        let x = Tensor::randn((1, 4, 16), 0.0, 1.0, &mut Rng::new(4), Device::Cpu)?;
        assert_eq!(block.forward(&x, None, true)?.to_vec_f32(), x.to_vec_f32());
        Ok(())
    }
}
