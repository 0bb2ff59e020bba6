//! A Llama-architecture GGUF file (llama.cpp's layout, e.g. SmolLM2) as a [`Llama`]: the config from
//! the `llama.*` metadata and the weights under their Hugging Face names.
//!
//! GGUF stores q_proj and k_proj rows permuted so that llama.cpp's RoPE can rotate interleaved pairs
//! (2i, 2i + 1); loaded as stored, they need [`RopeStyle::Interleaved`], which computes exactly what
//! Hugging Face's rotate-half does on the unpermuted weights.
//!
//! Weights in block formats (Q4_0, Q4_1, Q8_0, TQ1_0, TQ2_0) load either packed ([`Weights::Packed`]:
//! repacked once into trit's [`QTensor`] layouts and run by the packed kernels, as llama.cpp runs them)
//! or dequantized to f32 ([`Weights::Dense`]: what the reference implementation does, and what training
//! needs).

use crate::llama::{Llama, LlamaConfig};
use trit::cpu::qmatmul::interleaved::Interleaved;
use trit::cpu::qmatmul::ActMode;
use trit::io::gguf::{Gguf, TensorType};
use trit::nn::ParamStore;
use trit::ops::rope::RopeStyle;
use trit::{DType, Device, Error, Result};

/// The model's shape from a GGUF file's `llama.*` metadata.
pub fn config_from_gguf(g: &Gguf) -> Result<LlamaConfig> {
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::Msg(format!(
            "{}: architecture {arch:?} is not llama",
            g.path()
        )));
    }
    let int = |key: &str| -> Result<usize> {
        let v = g.get_u64(&format!("llama.{key}"))?;
        usize::try_from(v)
            .map_err(|_| Error::Msg(format!("{}: llama.{key} {v} is too large", g.path())))
    };
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let vocab_size = match g.get_u64("llama.vocab_size") {
        Ok(v) => v as usize,
        Err(_) => g.get_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let has = |key: &str| g.metadata().contains_key(key);
    let cfg = LlamaConfig {
        vocab_size,
        hidden,
        layers: int("block_count")?,
        heads,
        kv_heads: if has("llama.attention.head_count_kv") {
            int("attention.head_count_kv")?
        } else {
            heads
        },
        ffn_hidden: int("feed_forward_length")?,
        max_seq: int("context_length")?,
        rope_base: if has("llama.rope.freq_base") {
            g.get_f64("llama.rope.freq_base")? as f32
        } else {
            10_000.0
        },
        rope_scale: 1.0,
        rope_style: RopeStyle::Interleaved,
        norm_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        tie_embeddings: g.info("output.weight").is_err(),
    };
    if has("llama.rope.dimension_count") && heads > 0 {
        let rot = int("rope.dimension_count")?;
        if rot != hidden / heads {
            return Err(Error::Msg(format!(
                "{}: RoPE over {rot} of {} head dims (partial rotary) is not supported",
                g.path(),
                hidden / heads
            )));
        }
    }
    Ok(cfg)
}

/// The Hugging Face name of a GGUF Llama tensor.
fn hf_name(gguf: &str) -> Option<String> {
    let direct = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = direct {
        return Some(n.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// How the block-quantized weights of a GGUF file load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// Dequantized to f32 parameters: exactly the reference's numbers, trainable, 4–8× the memory.
    Dense,
    /// Kept packed and frozen; the linear layers and the tied output projection run the packed kernels
    /// with activations in the given form: `ActMode::Int8Blocks` is llama.cpp's arithmetic (int8 per
    /// block of 32), `ActMode::F32` multiplies the exact dequantized weights.
    Packed(ActMode),
}

/// The model in `g`, its weights in f32 in a new [`ParamStore`]. Every tensor of the file must map
/// to a parameter and every parameter must come from the file.
pub fn load_llama(g: &Gguf, device: Device) -> Result<(ParamStore, Llama)> {
    load_llama_with(g, device, Weights::Dense)
}

/// [`load_llama`] with the block-quantized weights loaded as `weights` says; F32/F16/BF16 tensors (the
/// norms) are always dense f32 parameters. On a GPU, packed weights are uploaded to it as they load
/// (their host copy stays for the embedding lookup).
pub fn load_llama_with(g: &Gguf, device: Device, weights: Weights) -> Result<(ParamStore, Llama)> {
    load_llama_reporting(g, device, weights, &mut |_| {})
}

/// [`load_llama_with`], calling `loaded_bytes` with the file bytes of each tensor once it is in (for a
/// progress bar).
pub fn load_llama_reporting(
    g: &Gguf,
    device: Device,
    weights: Weights,
    loaded_bytes: &mut dyn FnMut(usize),
) -> Result<(ParamStore, Llama)> {
    let cfg = config_from_gguf(g)?;
    let ps = ParamStore::new(0, DType::F32, device);
    let mut loaded = std::collections::BTreeSet::new();
    for info in g.tensors() {
        let name = hf_name(&info.name).ok_or_else(|| {
            Error::Msg(format!(
                "{}: tensor {:?} is not part of a Llama model",
                g.path(),
                info.name
            ))
        })?;
        match (info.ty, weights) {
            (TensorType::Quant(_), Weights::Packed(act)) if info.shape.len() == 2 => {
                let q = g.qtensor(&info.name)?;
                // Formats without a tile layout (ternary) take int8 activations per token instead.
                let act = match act {
                    ActMode::Int8Blocks if !Interleaved::supports(q.format()) => ActMode::Int8,
                    _ => act,
                };
                // Each product runs where its activations live: the CPU's in its tile layout, a
                // GPU's on the packed bytes uploaded once, here, rather than at the first token.
                if device.is_cuda() {
                    q.prepare_device(device)?;
                } else if act == ActMode::Int8Blocks {
                    q.prepare_int8_blocks();
                }
                ps.insert_packed(&name, q, act);
            }
            _ => {
                let t = g.tensor(&info.name, device)?.to_dtype(DType::F32)?;
                ps.insert(&name, &t)?;
            }
        }
        loaded.insert(name);
        loaded_bytes(info.end - info.start);
    }
    let model = Llama::new(&ps, cfg).map_err(|e| Error::Msg(format!("{}: {e}", g.path())))?;
    // Llama::new creates what the file lacked (with random values): that is a missing weight.
    if let Some((missing, _)) = ps.all().into_iter().find(|(n, _)| !loaded.contains(n)) {
        return Err(Error::Msg(format!(
            "{}: the file has no weight for {missing}",
            g.path()
        )));
    }
    Ok((ps, model))
}
