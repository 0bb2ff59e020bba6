//! BERT (Devlin et al., 2019) as a sentence encoder, loaded from a sentence-transformers folder such
//! as all-MiniLM-L6-v2's.
//!
//! The encoder: token + absolute position + segment embeddings, LayerNorm; then post-norm layers of
//! bidirectional multi-head attention (padding keys masked) and a GELU (erf) feed-forward, each added
//! to its input and LayerNorm-ed. The sentence embedding pools the last hidden states over the real
//! tokens (mean, or the [CLS] state) and, when the folder lists a Normalize module, divides by the L2
//! norm. Files read: `modules.json`, the pooling module's `config.json`, `sentence_bert_config.json`
//! (max_seq_length), and in the transformer's folder `config.json`, `model.safetensors` and
//! `tokenizer.json` (or `vocab.txt`).

use crate::tokenizer::{BertNormalizer, WordPiece};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trit::io::safetensors::SafeTensors;
use trit::nn::Linear;
use trit::ops::attention::AttentionOptions;
use trit::{DType, Device, Error, Result, Tensor};

/// Texts per forward pass in [`SentenceEncoder::embed`] (sentence-transformers' default batch).
const BATCH: usize = 32;

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: not JSON: {e}", path.display())))
}

/// The encoder's shape, from a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

impl BertConfig {
    /// Reads and checks `config.json`: positive sizes, heads dividing the width, `hidden_act` "gelu"
    /// (the exact erf form) and absolute positions.
    pub fn from_file(path: impl AsRef<Path>) -> Result<BertConfig> {
        let path = path.as_ref();
        let json = read_json(path)?;
        let bad = |msg: String| Error::Msg(format!("{}: {msg}", path.display()));
        let size = |key: &str| -> Result<usize> {
            match json[key].as_u64() {
                Some(v) if v > 0 => {
                    usize::try_from(v).map_err(|_| bad(format!("{key} {v} is too large")))
                }
                _ => Err(bad(format!(
                    "{key} must be a positive integer, got {}",
                    json[key]
                ))),
            }
        };
        let cfg = BertConfig {
            vocab_size: size("vocab_size")?,
            hidden_size: size("hidden_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads: size("num_attention_heads")?,
            intermediate_size: size("intermediate_size")?,
            max_position_embeddings: size("max_position_embeddings")?,
            type_vocab_size: size("type_vocab_size")?,
            layer_norm_eps: json["layer_norm_eps"]
                .as_f64()
                .filter(|&e| e > 0.0)
                .ok_or_else(|| {
                    bad(format!(
                        "layer_norm_eps must be a positive number, got {}",
                        json["layer_norm_eps"]
                    ))
                })? as f32,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if json["hidden_act"] != "gelu" {
            return Err(bad(format!(
                "hidden_act {} is not supported (\"gelu\" is)",
                json["hidden_act"]
            )));
        }
        match &json["position_embedding_type"] {
            Value::Null => {}
            t if t == "absolute" => {}
            t => {
                return Err(bad(format!(
                    "position_embedding_type {t} is not supported (\"absolute\" is)"
                )))
            }
        }
        Ok(cfg)
    }
}

/// LayerNorm with a weight and a bias.
#[derive(Clone, Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// One encoder layer: attention, add & norm, feed-forward, add & norm.
#[derive(Clone, Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
}

impl Layer {
    /// `x [batch, seq, hidden]`, `padding [batch, seq]` (zero at padding tokens).
    fn forward(&self, x: &Tensor, heads: usize, padding: &Tensor) -> Result<Tensor> {
        let &[b, s, h] = x.dims() else {
            unreachable!("Bert::forward passes [batch, seq, hidden]")
        };
        let split = |t: Tensor| t.reshape((b, s, heads, h / heads));
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let opts = AttentionOptions {
            key_padding: Some(padding),
            ..AttentionOptions::default()
        };
        let ctx = q.flash_attention(&k, &v, &opts)?.reshape((b, s, h))?;
        let x = self
            .attn_norm
            .forward(&self.attn_out.forward(&ctx)?.add(x)?)?;
        let ff = self
            .output
            .forward(&self.intermediate.forward(&x)?.gelu()?)?;
        self.out_norm.forward(&ff.add(&x)?)
    }
}

/// The BERT encoder (no pooler head: sentence-transformers does not use it).
#[derive(Clone, Debug)]
pub struct Bert {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

/// The tensors of a safetensors file, taken by name with their shapes checked.
struct Weights {
    file: String,
    tensors: BTreeMap<String, Tensor>,
    /// "bert." in checkpoints saved from a task model (BertForMaskedLM, …), else "".
    prefix: &'static str,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .tensors
            .remove(&full)
            .ok_or_else(|| Error::Msg(format!("{}: no tensor {full}", self.file)))?;
        if t.dims() != shape {
            return Err(Error::Msg(format!(
                "{}: {full} has shape {}, the config needs {shape:?}",
                self.file,
                t.shape()
            )));
        }
        if !t.dtype().is_float() {
            return Err(Error::Msg(format!(
                "{}: {full} is {}, not a float tensor",
                self.file,
                t.dtype()
            )));
        }
        t.to_dtype(DType::F32)
    }

    fn linear(&mut self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        let w = self.take(&format!("{name}.weight"), &[out_dim, in_dim])?;
        let b = self.take(&format!("{name}.bias"), &[out_dim])?;
        Linear::from_weights(w, Some(b))
    }

    fn norm(&mut self, name: &str, dim: usize, eps: f32) -> Result<Norm> {
        Ok(Norm {
            weight: self.take(&format!("{name}.weight"), &[dim])?,
            bias: self.take(&format!("{name}.bias"), &[dim])?,
            eps,
        })
    }
}

impl Bert {
    /// The encoder's weights from a safetensors file (Hugging Face names, with or without `bert.`).
    pub fn load(cfg: BertConfig, weights: impl AsRef<Path>) -> Result<Bert> {
        let file = SafeTensors::open(weights.as_ref())?;
        let tensors = trit::io::tensors::tensors(&file, Device::Cpu)?;
        let prefix = match tensors.contains_key("bert.embeddings.word_embeddings.weight") {
            true => "bert.",
            false => "",
        };
        let mut w = Weights {
            file: file.path().to_owned(),
            tensors,
            prefix,
        };
        let (h, ff, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let word = w.take("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = w.take(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = w.take(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        let emb_norm = w.norm("embeddings.LayerNorm", h, eps)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: w.linear(&format!("{p}.attention.self.query"), h, h)?,
                    key: w.linear(&format!("{p}.attention.self.key"), h, h)?,
                    value: w.linear(&format!("{p}.attention.self.value"), h, h)?,
                    attn_out: w.linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
                    intermediate: w.linear(&format!("{p}.intermediate.dense"), ff, h)?,
                    output: w.linear(&format!("{p}.output.dense"), h, ff)?,
                    out_norm: w.norm(&format!("{p}.output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            cfg,
            word,
            position,
            token_type,
            emb_norm,
            layers,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// `ids [batch, seq]` (integers, one segment) and `padding [batch, seq]` (1 for real tokens, 0 for
    /// padding) -> the last hidden states `[batch, seq, hidden]`. Padding positions get states too;
    /// no real token attends to them.
    pub fn forward(&self, ids: &Tensor, padding: &Tensor) -> Result<Tensor> {
        let &[b, s] = ids.dims() else {
            trit::bail!(
                "Bert::forward",
                "ids must be [batch, seq], got shape {}",
                ids.shape()
            );
        };
        if padding.dims() != [b, s] {
            return Err(Error::ShapeMismatch {
                op: "Bert::forward",
                lhs: ids.dims().to_vec(),
                rhs: padding.dims().to_vec(),
            });
        }
        if s == 0 || s > self.cfg.max_position_embeddings {
            trit::bail!(
                "Bert::forward",
                "sequence length {s} is outside 1..={}",
                self.cfg.max_position_embeddings
            );
        }
        let mut x = self
            .word
            .embedding(ids)?
            .add(&self.position.narrow(0, 0, s)?)?
            .add(&self.token_type.narrow(0, 0, 1)?)?;
        x = self.emb_norm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, self.cfg.num_attention_heads, padding)?;
        }
        Ok(x)
    }
}

/// How token states become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the real (unpadded) tokens, [CLS] and [SEP] included.
    Mean,
    /// The [CLS] token's state.
    Cls,
}

/// A sentence-transformers model: tokenizer, BERT, pooling and optional L2 normalisation.
#[derive(Clone, Debug)]
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: WordPiece,
    pooling: Pooling,
    normalize: bool,
    /// sentence_bert_config.json's do_lower_case: lower-case texts before tokenizing.
    lower_case: bool,
}

/// The modules of a sentence-transformers folder that this encoder runs.
struct Modules {
    transformer: PathBuf,
    pooling: PathBuf,
    normalize: bool,
}

fn read_modules(dir: &Path) -> Result<Modules> {
    let path = dir.join("modules.json");
    let bad = |msg: String| Error::Msg(format!("{}: {msg}", path.display()));
    let json = read_json(&path)?;
    let list = json
        .as_array()
        .ok_or_else(|| bad("not a list of modules".into()))?;
    let (mut transformer, mut pooling, mut normalize) = (None, None, false);
    for m in list {
        let sub = m["path"].as_str().unwrap_or("");
        match m["type"].as_str().unwrap_or("") {
            "sentence_transformers.models.Transformer" if transformer.is_none() => {
                transformer = Some(dir.join(sub));
            }
            "sentence_transformers.models.Pooling" if pooling.is_none() => {
                pooling = Some(dir.join(sub));
            }
            // It has no parameters, so its folder (often absent) is not read.
            "sentence_transformers.models.Normalize" => normalize = true,
            t => {
                return Err(bad(format!(
                    "module {t:?} is not supported (one Transformer, one Pooling, Normalize are)"
                )))
            }
        }
    }
    match (transformer, pooling) {
        (Some(transformer), Some(pooling)) => Ok(Modules {
            transformer,
            pooling,
            normalize,
        }),
        _ => Err(bad("needs a Transformer and a Pooling module".into())),
    }
}

fn read_pooling(dir: &Path) -> Result<Pooling> {
    let path = dir.join("config.json");
    let json = read_json(&path)?;
    let on: Vec<&str> = json
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| k.starts_with("pooling_mode_") && **v == true)
                .map(|(k, _)| k.as_str())
                .collect()
        })
        .unwrap_or_default();
    match on.as_slice() {
        ["pooling_mode_mean_tokens"] => Ok(Pooling::Mean),
        ["pooling_mode_cls_token"] => Ok(Pooling::Cls),
        _ => Err(Error::Msg(format!(
            "{}: pooling modes {on:?} are not supported (exactly one of pooling_mode_mean_tokens, \
             pooling_mode_cls_token)",
            path.display()
        ))),
    }
}

/// tokenizer.json when present, else vocab.txt with tokenizer_config.json's do_lower_case (default
/// true: the uncased models).
fn read_tokenizer(dir: &Path) -> Result<WordPiece> {
    let json = dir.join("tokenizer.json");
    if json.exists() {
        return WordPiece::from_tokenizer_json(json);
    }
    let config = dir.join("tokenizer_config.json");
    let lower = match config.exists() {
        true => read_json(&config)?["do_lower_case"]
            .as_bool()
            .unwrap_or(true),
        false => true,
    };
    let normalizer = BertNormalizer {
        lowercase: lower,
        strip_accents: lower,
        ..BertNormalizer::uncased()
    };
    WordPiece::from_vocab_txt(dir.join("vocab.txt"), normalizer)
}

impl SentenceEncoder {
    /// Opens a sentence-transformers folder. Every failure names the file and what is wrong with it.
    pub fn open(dir: impl AsRef<Path>) -> Result<SentenceEncoder> {
        let dir = dir.as_ref();
        let modules = read_modules(dir)?;
        let pooling = read_pooling(&modules.pooling)?;
        let cfg = BertConfig::from_file(modules.transformer.join("config.json"))?;
        let st_path = dir.join("sentence_bert_config.json");
        let (max_len, lower_case) = match st_path.exists() {
            true => {
                let st = read_json(&st_path)?;
                let max = match &st["max_seq_length"] {
                    Value::Null => cfg.max_position_embeddings,
                    v => v
                        .as_u64()
                        .and_then(|v| usize::try_from(v).ok())
                        .filter(|&v| (2..=cfg.max_position_embeddings).contains(&v))
                        .ok_or_else(|| {
                            Error::Msg(format!(
                                "{}: max_seq_length {v} is not in 2..={} (max_position_embeddings)",
                                st_path.display(),
                                cfg.max_position_embeddings
                            ))
                        })?,
                };
                (max, st["do_lower_case"].as_bool().unwrap_or(false))
            }
            false => (cfg.max_position_embeddings, false),
        };
        let tokenizer = read_tokenizer(&modules.transformer)?.with_max_len(max_len)?;
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Msg(format!(
                "{}: the tokenizer has {} tokens, more than config.json's vocab_size {}",
                modules.transformer.display(),
                tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
        let bert = Bert::load(cfg, modules.transformer.join("model.safetensors"))?;
        Ok(SentenceEncoder {
            bert,
            tokenizer,
            pooling,
            normalize: modules.normalize,
            lower_case,
        })
    }

    pub fn tokenizer(&self) -> &WordPiece {
        &self.tokenizer
    }

    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// The embedding width.
    pub fn dim(&self) -> usize {
        self.bert.cfg.hidden_size
    }

    /// The ids a text is embedded from: [CLS] … [SEP], truncated to max_seq_length.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self.lower_case {
            true => self.tokenizer.encode(&text.to_lowercase()),
            false => self.tokenizer.encode(text),
        }
    }

    /// One embedding per text, in order. Texts of similar length are batched together, so each pass
    /// pads little.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.encode(t)).collect();
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            for (&i, e) in chunk.iter().zip(self.embed_ids(&batch)?) {
                out[i] = e;
            }
        }
        Ok(out)
    }

    /// Embeddings of already tokenized sequences (each non-empty, at most max_position_embeddings
    /// long), run as one batch padded to the longest.
    pub fn embed_ids(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let Some(s) = seqs.iter().map(|q| q.len()).max() else {
            return Ok(Vec::new());
        };
        if seqs.iter().any(|q| q.is_empty()) {
            trit::bail!("SentenceEncoder::embed_ids", "a sequence has no tokens");
        }
        let b = seqs.len();
        let pad = self.tokenizer.pad_id();
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for q in seqs {
            for t in 0..s {
                let id = q.get(t).copied().unwrap_or(pad);
                ids.push(i32::try_from(id).map_err(|_| Error::IndexOutOfRange {
                    op: "SentenceEncoder::embed_ids",
                    index: i64::from(id),
                    size: self.bert.cfg.vocab_size,
                })?);
                mask.push(if t < q.len() { 1f32 } else { 0.0 });
            }
        }
        let ids = Tensor::from_vec(ids, (b, s), Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (b, s), Device::Cpu)?;
        let _no_grad = trit::no_grad();
        let states = self.bert.forward(&ids, &mask)?;
        let pooled = match self.pooling {
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let count = m.sum(1)?.clamp(1e-9, f32::MAX)?;
                states.mul(&m)?.sum(1)?.div(&count)?
            }
            Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let pooled = match self.normalize {
            true => {
                let norm = pooled
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f32::MAX)?;
                pooled.div(&norm)?
            }
            false => pooled,
        };
        pooled.to_vec2_f32()
    }
}
