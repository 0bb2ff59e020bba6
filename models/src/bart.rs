//! A BART-style encoder-decoder (Lewis et al., 2020), the TBT recipe's model: token embeddings shared by
//! the encoder, the decoder and the output projection, learned positions, a LayerNorm after the
//! embeddings, and post-norm layers (x = LN(x + sublayer(x))): bidirectional self-attention and a GELU
//! feed-forward in the encoder; causal self-attention, cross-attention to the encoder and the
//! feed-forward in the decoder.
//!
//! The forward pass returns what distillation needs besides the logits: every layer's hidden states and
//! the attention probabilities of each self-, cross- and decoder attention (papers.md §1 puts an MSE on
//! all of them), so attention is computed explicitly (scores, mask, softmax) rather than fused.
//!
//! A student built with a [`BartQuant`] quantizes where TBT does: the token embeddings (per row; the
//! learned position tables stay in full precision), the weights of every linear layer (per output row)
//! and, with activation bits, the input of every linear layer, q, k and v before the attention matmul and
//! the attention probabilities before their matmul with v. Its parameters have the teacher's names (plus
//! the activation steps `alpha`), so [`ParamStore::load`] initialises it from the teacher.
//! [`Bart::freeze`] then packs a trained student's weights and token table for inference.

use crate::beam::{self, BeamConfig};
use std::fmt;
use trit::cpu::qmatmul::ActMode;
use trit::nn::{
    ActQuant, Embedding, Init, LayerNorm, Linear, ParamStore, QuantLinear, QuantLinearConfig,
};
use trit::quant::quantizers::{ElasticQuantizer, Granularity, Quantizer, TbtForm};
use trit::quant::QTensor;
use trit::{Error, Result, Tensor};

/// How a student quantizes activations below 8 bits (8-bit activations are per-tensor min-max in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowBitActs {
    /// TBT's elastic quantizer: a learnable step α per quantized tensor, trained by LSQ.
    Elastic,
    /// The fixed rules of the methods TBT improves on, per tensor and with nothing learned: min-max
    /// round-to-nearest at 2 bits (symmetric {−1, 0, 1}·max|x| for signed inputs, 4 levels from min to max
    /// for the probabilities); at 1 bit XNOR-Net's mean|x|·sign(x) for signed inputs and {min, max} for
    /// the probabilities.
    MinMax,
}

impl LowBitActs {
    /// The rule [`LowBitActs::MinMax`] applies to a tensor at `bits` (1 or 2).
    fn rule(bits: u32, signed: bool) -> Quantizer {
        match (bits, signed) {
            (1, true) => Quantizer::Bwn,
            (bits, symmetric) => Quantizer::MinMax { bits, symmetric },
        }
    }
}

/// What a student quantizes: TBT's E-W-A settings, or a baseline's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BartQuant {
    /// The token embedding table's quantizer (per row), or `None` for full precision.
    pub embedding: Option<Quantizer>,
    /// Every linear layer's weight quantizer (per output row).
    pub weight: Quantizer,
    /// Activation bits (1, 2 or 8), or `None` for full-precision activations. 8 bits is a per-tensor
    /// min-max quantizer; 1 and 2 bits as `low_bit_acts` says.
    pub act_bits: Option<u32>,
    pub low_bit_acts: LowBitActs,
}

impl BartQuant {
    /// TBT at E-W-A bits (1 = binary, 2 = ternary for embeddings and weights; activations 1, 2 or 8),
    /// in the paper's form.
    pub fn tbt(e: u32, w: u32, a: u32) -> Result<BartQuant> {
        BartQuant::tbt_with(e, w, a, TbtForm::Paper)
    }

    /// [`BartQuant::tbt`] with the linear weights' quantizer in `form` (the paper's equations or the
    /// released code's).
    ///
    /// The token table always takes the released code's form (no mean centring). It is also the output
    /// projection, and the paper's form drops each row's mean μ_v without adding it back, which moves
    /// vocabulary logit v by −μ_v·Σh: a per-token bias the distillation never removes. With it the full
    /// run's 1-1-8 student decoded "the be the be …" to the length limit (ROUGE-L 3.5); with the code
    /// form's table and paper-form weights the same student reached 10.5 (FP 12.1).
    pub fn tbt_with(e: u32, w: u32, a: u32, form: TbtForm) -> Result<BartQuant> {
        let quantizer = |bits: u32, form: TbtForm| match bits {
            1 => Ok(Quantizer::TbtBinary(form)),
            2 => Ok(Quantizer::TbtTernary(form)),
            _ => Err(Error::Msg(format!(
                "TBT quantizes weights and embeddings to 1 or 2 bits, got {bits}"
            ))),
        };
        if ![1, 2, 8].contains(&a) {
            trit::bail!("BartQuant", "activation bits must be 1, 2 or 8, got {a}");
        }
        Ok(BartQuant {
            embedding: Some(quantizer(e, TbtForm::Code)?),
            weight: quantizer(w, form)?,
            act_bits: Some(a),
            low_bit_acts: LowBitActs::Elastic,
        })
    }

    /// The input quantization of a linear layer (its inputs may be negative).
    fn linear_act(&self) -> ActQuant {
        match self.act_bits {
            None => ActQuant::None,
            Some(8) => ActQuant::Rule(
                Quantizer::MinMax {
                    bits: 8,
                    symmetric: true,
                },
                Granularity::PerTensor,
            ),
            Some(bits) => match self.low_bit_acts {
                LowBitActs::Elastic => ActQuant::Elastic { bits, signed: true },
                LowBitActs::MinMax => {
                    ActQuant::Rule(LowBitActs::rule(bits, true), Granularity::PerTensor)
                }
            },
        }
    }
}

/// An activation quantizer inside attention (q, k, v, or the probabilities).
enum ActQ {
    Elastic(ElasticQuantizer),
    /// A per-tensor rule without learned parameters.
    Rule(Quantizer),
}

impl ActQ {
    /// `signed` for q, k and v; the probabilities are non-negative.
    fn new(
        params: &ParamStore,
        name: &str,
        bits: u32,
        signed: bool,
        low_bit: LowBitActs,
    ) -> Result<ActQ> {
        if bits >= 8 {
            return Ok(ActQ::Rule(Quantizer::MinMax {
                bits: 8,
                symmetric: false,
            }));
        }
        if low_bit == LowBitActs::MinMax {
            return Ok(ActQ::Rule(LowBitActs::rule(bits, signed)));
        }
        let alpha = params.pp(name).get_or_init("alpha", 1, Init::Const(1.0))?;
        Ok(ActQ::Elastic(ElasticQuantizer::with_alpha(
            alpha, bits, signed,
        )?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ActQ::Elastic(q) => q.forward(x),
            ActQ::Rule(q) => q.fake_quant(x, Granularity::PerTensor),
        }
    }
}

/// A projection: full precision, or quantization-aware (same parameter names).
enum Proj {
    Dense(Linear),
    Quant(QuantLinear),
}

impl Proj {
    fn new(params: &ParamStore, i: usize, o: usize, quant: Option<&BartQuant>) -> Result<Proj> {
        match quant {
            None => Ok(Proj::Dense(Linear::with_init(
                params,
                i,
                o,
                true,
                Init::Normal(0.02),
                Init::Zeros,
            )?)),
            Some(q) => Ok(Proj::Quant(QuantLinear::new(
                params,
                i,
                o,
                QuantLinearConfig {
                    weight: q.weight,
                    act: q.linear_act(),
                    bias: true,
                },
            )?)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::Quant(l) => l.forward(x),
        }
    }

    /// Packs a quantization-aware projection's weights into `size`'s tally; a dense one stays.
    fn freeze(&mut self, size: &mut PackedSize) -> Result<()> {
        if let Proj::Quant(l) = self {
            l.freeze()?;
            size.add(l.packed())?;
        }
        Ok(())
    }
}

/// What [`Bart::freeze`] packed: the bytes the packed tensors hold (codes and per-row scales) and how
/// many weights they stand for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedSize {
    pub bytes: usize,
    pub weights: usize,
}

impl PackedSize {
    /// Counts a frozen layer's packed weights and hands them back.
    fn add<'a>(&mut self, packed: Option<&'a QTensor>) -> Result<&'a QTensor> {
        let q = packed.ok_or_else(|| {
            Error::Msg("Bart::freeze: a frozen layer holds no packed weights".into())
        })?;
        self.bytes += q.byte_size();
        self.weights += q.rows() * q.cols();
        Ok(q)
    }
}

/// The shape of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BartConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub heads: usize,
    pub ffn_hidden: usize,
    /// Longest input or output sequence the position tables cover.
    pub max_positions: usize,
    pub norm_eps: f32,
}

impl BartConfig {
    fn validate(&self) -> Result<()> {
        let c = self;
        if c.vocab_size == 0
            || c.hidden == 0
            || c.heads == 0
            || c.ffn_hidden == 0
            || c.max_positions == 0
            || c.encoder_layers == 0
            || c.decoder_layers == 0
        {
            trit::bail!("Bart", "every size must be positive: {c}");
        }
        if !c.hidden.is_multiple_of(c.heads) {
            trit::bail!(
                "Bart",
                "hidden {} is not a multiple of {} heads",
                c.hidden,
                c.heads
            );
        }
        Ok(())
    }
}

impl fmt::Display for BartConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "d {} × {}+{} layers, {} heads, ffn {}, vocab {}, max {} positions",
            self.hidden,
            self.encoder_layers,
            self.decoder_layers,
            self.heads,
            self.ffn_hidden,
            self.vocab_size,
            self.max_positions
        )
    }
}

/// Multi-head attention with its probabilities kept: q from `x`, k and v from `kv`.
struct MultiHead {
    q: Proj,
    k: Proj,
    v: Proj,
    out: Proj,
    heads: usize,
    /// Quantizers of q, k, v and of the probabilities, when activations are quantized.
    acts: Option<[ActQ; 4]>,
}

/// Which keys a query sees.
#[derive(Clone, Copy)]
enum Mask<'a> {
    /// Every key but padding: an additive bias [batch, 1, 1, keys] of 0 and −∞.
    Padding(&'a Tensor),
    /// Query i sees keys 0..=i.
    Causal,
}

impl MultiHead {
    fn new(params: &ParamStore, cfg: &BartConfig, quant: Option<&BartQuant>) -> Result<Self> {
        let h = cfg.hidden;
        let lin = |name: &str| Proj::new(&params.pp(name), h, h, quant);
        let acts = match quant.and_then(|q| q.act_bits.map(|b| (b, q.low_bit_acts))) {
            None => None,
            Some((bits, low)) => Some([
                ActQ::new(params, "q_quant", bits, true, low)?,
                ActQ::new(params, "k_quant", bits, true, low)?,
                ActQ::new(params, "v_quant", bits, true, low)?,
                ActQ::new(params, "probs_quant", bits, false, low)?,
            ]),
        };
        Ok(MultiHead {
            q: lin("q_proj")?,
            k: lin("k_proj")?,
            v: lin("v_proj")?,
            out: lin("out_proj")?,
            heads: cfg.heads,
            acts,
        })
    }

    /// `x [b, tq, h]` attending to `kv [b, tk, h]`: (output [b, tq, h], probabilities [b, heads, tq, tk]).
    fn forward(&self, x: &Tensor, kv: &Tensor, mask: Mask<'_>) -> Result<(Tensor, Tensor)> {
        let (&[b, tq, h], &[_, tk, _]) = (x.dims(), kv.dims()) else {
            trit::bail!("Bart attention", "expected [batch, seq, hidden] inputs");
        };
        let d = h / self.heads;
        let act = |i: usize, t: Tensor| match &self.acts {
            Some(a) => a[i].forward(&t),
            None => Ok(t),
        };
        let split = |t: Tensor, len: usize| t.reshape((b, len, self.heads, d))?.transpose(1, 2);
        let q = split(act(0, self.q.forward(x)?)?, tq)?;
        let k = split(act(1, self.k.forward(kv)?)?, tk)?;
        let v = split(act(2, self.v.forward(kv)?)?, tk)?;
        let scores = q.matmul(&k.t()?)?.mul_scalar(1.0 / (d as f32).sqrt())?;
        let probs = match mask {
            Mask::Padding(bias) => scores.add(bias)?.softmax(-1)?,
            Mask::Causal => scores.causal_softmax()?,
        };
        // Distillation compares the probabilities before they are quantized for the matmul with v.
        let y = act(3, probs.clone())?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, tq, h))?;
        Ok((self.out.forward(&y)?, probs))
    }

    fn freeze(&mut self, size: &mut PackedSize) -> Result<()> {
        for p in [&mut self.q, &mut self.k, &mut self.v, &mut self.out] {
            p.freeze(size)?;
        }
        Ok(())
    }
}

struct EncoderLayer {
    attn: MultiHead,
    attn_norm: LayerNorm,
    mlp: Mlp,
    mlp_norm: LayerNorm,
}

struct DecoderLayer {
    attn: MultiHead,
    attn_norm: LayerNorm,
    cross: MultiHead,
    cross_norm: LayerNorm,
    mlp: Mlp,
    mlp_norm: LayerNorm,
}

/// The GELU feed-forward: `fc1` [ffn, hidden] and `fc2` [hidden, ffn], as BART names them.
struct Mlp {
    fc1: Proj,
    fc2: Proj,
}

impl Mlp {
    fn new(params: &ParamStore, cfg: &BartConfig, quant: Option<&BartQuant>) -> Result<Mlp> {
        Ok(Mlp {
            fc1: Proj::new(&params.pp("fc1"), cfg.hidden, cfg.ffn_hidden, quant)?,
            fc2: Proj::new(&params.pp("fc2"), cfg.ffn_hidden, cfg.hidden, quant)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu()?)
    }

    fn freeze(&mut self, size: &mut PackedSize) -> Result<()> {
        self.fc1.freeze(size)?;
        self.fc2.freeze(size)
    }
}

/// Everything a forward pass computes that distillation compares between teacher and student.
#[derive(Clone, Debug)]
pub struct BartOutput {
    /// [batch, target_len, vocab].
    pub logits: Tensor,
    /// The embeddings' output then each encoder layer's: encoder_layers + 1 tensors [b, src, hidden].
    pub encoder_hidden: Vec<Tensor>,
    /// Likewise for the decoder: decoder_layers + 1 tensors [b, tgt, hidden].
    pub decoder_hidden: Vec<Tensor>,
    /// Per encoder layer, [b, heads, src, src].
    pub encoder_attention: Vec<Tensor>,
    /// Per decoder layer, the causal self-attention [b, heads, tgt, tgt].
    pub decoder_attention: Vec<Tensor>,
    /// Per decoder layer, the cross-attention [b, heads, tgt, src].
    pub cross_attention: Vec<Tensor>,
}

/// The model; its parameters live in the [`ParamStore`] it was built on.
pub struct Bart {
    cfg: BartConfig,
    quant: Option<BartQuant>,
    embed: Embedding,
    encoder_positions: Embedding,
    decoder_positions: Embedding,
    encoder_embed_norm: LayerNorm,
    decoder_embed_norm: LayerNorm,
    encoder: Vec<EncoderLayer>,
    decoder: Vec<DecoderLayer>,
    frozen: bool,
}

impl Bart {
    /// A full-precision model.
    pub fn new(params: &ParamStore, cfg: BartConfig) -> Result<Self> {
        Bart::build(params, cfg, None)
    }

    /// A quantization-aware student (load the teacher's parameters into `params` to start from it).
    pub fn quantized(params: &ParamStore, cfg: BartConfig, quant: BartQuant) -> Result<Self> {
        Bart::build(params, cfg, Some(quant))
    }

    fn build(params: &ParamStore, cfg: BartConfig, quant: Option<BartQuant>) -> Result<Self> {
        cfg.validate()?;
        let q = quant.as_ref();
        let norm = |p: &ParamStore| LayerNorm::new(p, cfg.hidden, cfg.norm_eps, true);
        let table =
            |p: &ParamStore, n: usize| Embedding::with_init(p, n, cfg.hidden, Init::Normal(0.02));
        let encoder = (0..cfg.encoder_layers)
            .map(|i| {
                let p = params.pp(format!("encoder.layers.{i}"));
                Ok(EncoderLayer {
                    attn: MultiHead::new(&p.pp("self_attn"), &cfg, q)?,
                    attn_norm: norm(&p.pp("self_attn_layer_norm"))?,
                    mlp: Mlp::new(&p, &cfg, q)?,
                    mlp_norm: norm(&p.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let decoder = (0..cfg.decoder_layers)
            .map(|i| {
                let p = params.pp(format!("decoder.layers.{i}"));
                Ok(DecoderLayer {
                    attn: MultiHead::new(&p.pp("self_attn"), &cfg, q)?,
                    attn_norm: norm(&p.pp("self_attn_layer_norm"))?,
                    cross: MultiHead::new(&p.pp("encoder_attn"), &cfg, q)?,
                    cross_norm: norm(&p.pp("encoder_attn_layer_norm"))?,
                    mlp: Mlp::new(&p, &cfg, q)?,
                    mlp_norm: norm(&p.pp("final_layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Bart {
            embed: table(&params.pp("shared"), cfg.vocab_size)?,
            encoder_positions: table(&params.pp("encoder.embed_positions"), cfg.max_positions)?,
            decoder_positions: table(&params.pp("decoder.embed_positions"), cfg.max_positions)?,
            encoder_embed_norm: norm(&params.pp("encoder.layernorm_embedding"))?,
            decoder_embed_norm: norm(&params.pp("decoder.layernorm_embedding"))?,
            encoder,
            decoder,
            cfg,
            quant,
            frozen: false,
        })
    }

    pub fn config(&self) -> &BartConfig {
        &self.cfg
    }

    /// Packs a trained student for inference: every linear layer's q_w(W) (see
    /// [`QuantLinear::freeze`]) and the quantized token table, whose rows are then looked up
    /// dequantized and whose output projection runs the packed kernel on the decoder's full-precision
    /// states, as the student computes its logits. The activation quantizers keep their trained steps;
    /// those of q, k, v and the probabilities stay fake-quantized, since those matmuls have no weights to
    /// pack. A frozen model runs under [`trit::no_grad`] only.
    pub fn freeze(&mut self) -> Result<PackedSize> {
        let Some(quant) = self.quant else {
            trit::bail!(
                "Bart::freeze",
                "a full-precision model has no quantized weights to pack"
            );
        };
        if self.frozen {
            trit::bail!("Bart::freeze", "the model is already frozen");
        }
        let mut size = PackedSize::default();
        for l in &mut self.encoder {
            l.attn.freeze(&mut size)?;
            l.mlp.freeze(&mut size)?;
        }
        for l in &mut self.decoder {
            l.attn.freeze(&mut size)?;
            l.cross.freeze(&mut size)?;
            l.mlp.freeze(&mut size)?;
        }
        if let (Some(q), Some(w)) = (quant.embedding, self.embed.weight()) {
            // A weight-only QuantLinear over the table packs it in the format its quantizer's codes fit.
            let mut table = QuantLinear::from_weights(
                w.clone(),
                None,
                None,
                QuantLinearConfig {
                    weight: q,
                    act: ActQuant::None,
                    bias: false,
                },
            )?;
            table.freeze()?;
            let store = ParamStore::new(0, trit::DType::F32, trit::Device::Cpu);
            store.insert_packed("weight", size.add(table.packed())?.clone(), ActMode::F32);
            self.embed =
                Embedding::with_init(&store, self.cfg.vocab_size, self.cfg.hidden, Init::Zeros)?;
        }
        self.frozen = true;
        Ok(size)
    }

    /// The token embedding table as the model uses it (fake-quantized per row in a student), or `None`
    /// once [`Bart::freeze`] packed it: the [`Embedding`] then looks rows up and projects itself.
    fn table(&self) -> Result<Option<Tensor>> {
        let Some(w) = self.embed.weight() else {
            return Ok(None);
        };
        match self.quant.and_then(|q| q.embedding) {
            Some(q) => q.fake_quant(w, Granularity::PerRow).map(Some),
            None => Ok(Some(w.clone())),
        }
    }

    /// Token plus position embeddings of `ids [b, t]`, normalised.
    fn embed(
        &self,
        table: Option<&Tensor>,
        ids: &Tensor,
        positions: &Embedding,
        norm: &LayerNorm,
    ) -> Result<Tensor> {
        let &[_, t] = ids.dims() else {
            trit::bail!(
                "Bart",
                "ids must be [batch, seq], got shape {}",
                ids.shape()
            );
        };
        if t == 0 || t > self.cfg.max_positions {
            trit::bail!(
                "Bart",
                "sequence length {t} is outside 1..={}",
                self.cfg.max_positions
            );
        }
        let pos = positions.forward(&Tensor::arange(0, t as i64, trit::Device::Cpu)?)?;
        let tokens = match table {
            Some(t) => t.embedding(ids)?,
            None => self.embed.forward(ids)?,
        };
        norm.forward(&tokens.add(&pos)?)
    }

    /// Runs the encoder over `source [b, s]` (with `source_mask [b, s]`, nonzero for real tokens).
    pub fn encode(&self, source: &Tensor, source_mask: &Tensor) -> Result<Encoded> {
        let &[b, s] = source.dims() else {
            trit::bail!(
                "Bart",
                "source must be [batch, seq], got shape {}",
                source.shape()
            );
        };
        if source_mask.dims() != [b, s] {
            return Err(Error::ShapeMismatch {
                op: "Bart::encode",
                lhs: vec![b, s],
                rhs: source_mask.dims().to_vec(),
            });
        }
        let dev = source_mask.device();
        // 0 for real keys, −∞ for padding, broadcast over heads and queries.
        let valid = source_mask.to_dtype(trit::DType::F32)?.ne(&Tensor::zeros(
            (),
            trit::DType::F32,
            dev,
        )?)?;
        let bias = Tensor::where_cond(
            &valid,
            &Tensor::zeros((b, s), trit::DType::F32, dev)?,
            &Tensor::full(f32::NEG_INFINITY, (b, s), trit::DType::F32, dev)?,
        )?
        .reshape((b, 1, 1, s))?;
        let table = self.table()?;
        let mut x = self.embed(
            table.as_ref(),
            source,
            &self.encoder_positions,
            &self.encoder_embed_norm,
        )?;
        let mut hidden = vec![x.clone()];
        let mut attention = Vec::with_capacity(self.encoder.len());
        for l in &self.encoder {
            let (a, p) = l.attn.forward(&x, &x, Mask::Padding(&bias))?;
            x = l.attn_norm.forward(&x.add(&a)?)?;
            x = l.mlp_norm.forward(&x.add(&l.mlp.forward(&x)?)?)?;
            hidden.push(x.clone());
            attention.push(p);
        }
        Ok(Encoded {
            memory: x,
            bias,
            table,
            hidden,
            attention,
        })
    }

    /// Runs the decoder over `target [b, t]` (teacher forcing) against an encoded batch:
    /// (logits, hidden states, self-attention maps, cross-attention maps).
    #[allow(clippy::type_complexity)]
    fn decode(
        &self,
        enc: &Encoded,
        target: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>)> {
        if target.dims().first() != enc.memory.dims().first() {
            return Err(Error::ShapeMismatch {
                op: "Bart::decode",
                lhs: enc.memory.dims().to_vec(),
                rhs: target.dims().to_vec(),
            });
        }
        let mut y = self.embed(
            enc.table.as_ref(),
            target,
            &self.decoder_positions,
            &self.decoder_embed_norm,
        )?;
        let mut hidden = vec![y.clone()];
        let (mut self_attention, mut cross_attention) = (Vec::new(), Vec::new());
        for l in &self.decoder {
            let (a, p) = l.attn.forward(&y, &y, Mask::Causal)?;
            y = l.attn_norm.forward(&y.add(&a)?)?;
            let (c, pc) = l.cross.forward(&y, &enc.memory, Mask::Padding(&enc.bias))?;
            y = l.cross_norm.forward(&y.add(&c)?)?;
            y = l.mlp_norm.forward(&y.add(&l.mlp.forward(&y)?)?)?;
            hidden.push(y.clone());
            self_attention.push(p);
            cross_attention.push(pc);
        }
        let logits = match &enc.table {
            Some(t) => y.matmul(&t.t()?)?,
            None => self.embed.unembed(&y)?,
        };
        Ok((logits, hidden, self_attention, cross_attention))
    }

    /// `source [b, s]` (with `source_mask [b, s]`, nonzero for real tokens) and the decoder input
    /// `target [b, t]` (teacher forcing) through the model.
    pub fn forward(
        &self,
        source: &Tensor,
        source_mask: &Tensor,
        target: &Tensor,
    ) -> Result<BartOutput> {
        let enc = self.encode(source, source_mask)?;
        let (logits, decoder_hidden, decoder_attention, cross_attention) =
            self.decode(&enc, target)?;
        Ok(BartOutput {
            logits,
            encoder_hidden: enc.hidden,
            decoder_hidden,
            encoder_attention: enc.attention,
            decoder_attention,
            cross_attention,
        })
    }

    /// Beam-search decoding of one source sequence (`source` token ids, all real), each hypothesis
    /// starting from `bos`; returns the best hypothesis' tokens (ending in `cfg.eos` unless cut at
    /// `cfg.max_len`). Each step reruns the decoder over the prefixes against the encoded source.
    pub fn generate(&self, source: &[u32], bos: u32, cfg: BeamConfig) -> Result<Vec<u32>> {
        let _no_grad = trit::no_grad();
        let n = source.len();
        let ids: Vec<i32> = source.iter().map(|&t| t as i32).collect();
        let src = Tensor::from_vec(ids, (1, n), trit::Device::Cpu)?;
        let mask = Tensor::ones((1, n), trit::DType::U8, trit::Device::Cpu)?;
        let enc = self.encode(&src, &mask)?;
        let best = beam::search(cfg, |prefixes| {
            let k = prefixes.len();
            let len = prefixes[0].len() + 1;
            let mut rows: Vec<i32> = Vec::with_capacity(k * len);
            for p in prefixes {
                rows.push(bos as i32);
                rows.extend(p.iter().map(|&t| t as i32));
            }
            let target = Tensor::from_vec(rows, (k, len), trit::Device::Cpu)?;
            let memory = enc
                .memory
                .broadcast_as([k, n, self.cfg.hidden])?
                .contiguous()?;
            let bias = enc.bias.broadcast_as([k, 1, 1, n])?.contiguous()?;
            let batch = Encoded {
                memory,
                bias,
                table: enc.table.clone(),
                hidden: Vec::new(),
                attention: Vec::new(),
            };
            let (logits, ..) = self.decode(&batch, &target)?;
            let last = logits.narrow(1, len - 1, 1)?.squeeze(1)?.log_softmax(-1)?;
            last.to_vec2_f32()
        })?;
        Ok(best
            .into_iter()
            .next()
            .map(|h| h.tokens)
            .unwrap_or_default())
    }
}

/// The encoder's results for a batch of sources, which every decoding step reuses.
pub struct Encoded {
    memory: Tensor,
    bias: Tensor,
    /// `None` for a packed table (see [`Bart::table`]).
    table: Option<Tensor>,
    hidden: Vec<Tensor>,
    attention: Vec<Tensor>,
}

/// Copies every parameter of `teacher` into the same-named parameter of `student` (TBT's students start
/// from their teacher); the student's own extras (activation steps) keep their values.
pub fn init_student_from(teacher: &ParamStore, student: &ParamStore) -> Result<()> {
    for (name, t) in teacher.all() {
        let s = student.get(&name).ok_or_else(|| {
            Error::Msg(format!(
                "the student has no parameter {name} to take from the teacher"
            ))
        })?;
        s.set(&t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trit::optim::{AdamW, AdamWConfig, Optimizer};
    use trit::{DType, Device};

    fn small() -> BartConfig {
        BartConfig {
            vocab_size: 50,
            hidden: 16,
            encoder_layers: 2,
            decoder_layers: 2,
            heads: 4,
            ffn_hidden: 32,
            max_positions: 12,
            norm_eps: 1e-5,
        }
    }

    /// AdamW over every parameter of `ps`.
    fn adamw(ps: &ParamStore, lr: f32, weight_decay: f32) -> Result<AdamW> {
        AdamW::new(
            ps.all(),
            AdamWConfig {
                lr,
                weight_decay,
                ..Default::default()
            },
        )
    }

    fn ids(v: &[i32], b: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (b, v.len() / b), Device::Cpu).unwrap()
    }

    #[test]
    fn shapes_and_attention_maps() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let m = Bart::new(&ps, small())?;
        let src = ids(&[5, 6, 7, 8, 9, 10], 2);
        let mask = ids(&[1, 1, 1, 1, 1, 0], 2);
        let tgt = ids(&[1, 2, 3, 4, 1, 2, 3, 4], 2);
        let out = m.forward(&src, &mask, &tgt)?;
        assert_eq!(out.logits.dims(), [2, 4, 50]);
        assert_eq!(out.encoder_hidden.len(), 3);
        assert_eq!(out.decoder_hidden.len(), 3);
        assert_eq!(out.encoder_attention[0].dims(), [2, 4, 3, 3]);
        assert_eq!(out.decoder_attention[1].dims(), [2, 4, 4, 4]);
        assert_eq!(out.cross_attention[0].dims(), [2, 4, 4, 3]);
        // Rows are distributions; the padded source key gets exactly 0; decoder attention is causal.
        let enc = out.encoder_attention[0].to_vec_f32();
        for row in enc.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let cross = out.cross_attention[1].to_vec_f32();
        for (r, row) in cross.chunks(3).enumerate() {
            let second_batch = r >= 4 * 4;
            assert_eq!(row[2] == 0.0, second_batch, "row {r}: {row:?}");
        }
        let dec = out.decoder_attention[0].to_vec_f32();
        for (r, row) in dec.chunks(4).enumerate() {
            let i = r % 4;
            assert!(row[i + 1..].iter().all(|&p| p == 0.0), "row {r}: {row:?}");
        }
        Ok(())
    }

    /// Teacher forcing is causal (a later target token cannot change earlier logits) and a padded
    /// source token changes nothing (its value is never read).
    #[test]
    fn causal_in_the_target_and_blind_to_source_padding() -> Result<()> {
        let ps = ParamStore::new(1, DType::F32, Device::Cpu);
        let m = Bart::new(&ps, small())?;
        let mask = ids(&[1, 1, 1, 0], 1);
        let a = m.forward(&ids(&[5, 6, 7, 8], 1), &mask, &ids(&[1, 2, 3], 1))?;
        let b = m.forward(&ids(&[5, 6, 7, 40], 1), &mask, &ids(&[1, 2, 9], 1))?;
        let (la, lb) = (a.logits.to_vec_f32(), b.logits.to_vec_f32());
        assert_eq!(
            la[..2 * 50],
            lb[..2 * 50],
            "positions before the change agree exactly"
        );
        assert_ne!(la[2 * 50..], lb[2 * 50..]);
        Ok(())
    }

    #[test]
    fn learns_to_copy_its_input() -> Result<()> {
        let ps = ParamStore::new(2, DType::F32, Device::Cpu);
        let m = Bart::new(&ps, small())?;
        let mut opt = adamw(&ps, 1e-2, 0.01)?;
        // Copy task: target = BOS(1) + source; predict the source tokens.
        let src = ids(&[10, 11, 12, 13, 20, 21, 22, 23], 2);
        let mask = ids(&[1; 8], 2);
        let dec_in = ids(&[1, 10, 11, 12, 1, 20, 21, 22], 2);
        let loss_of = |m: &Bart| -> Result<Tensor> {
            let out = m.forward(&src, &mask, &dec_in)?;
            out.logits
                .reshape((8, 50))?
                .cross_entropy(&src.flatten_all()?, None)
        };
        let first = loss_of(&m)?.to_scalar()?;
        for _ in 0..60 {
            let loss = loss_of(&m)?;
            opt.step(&loss.backward()?)?;
        }
        let last = loss_of(&m)?.to_scalar()?;
        assert!(last < 0.1 * first, "copy loss {first} -> {last}");
        Ok(())
    }

    /// A TBT student starts as its teacher's weights quantized: its embedding rows hold at most three
    /// values (ternary), it computes something close to but not equal to the teacher, every activation
    /// step gets a gradient, and distilling lowers the loss.
    #[test]
    fn a_tbt_student_starts_from_its_teacher_and_learns_from_it() -> Result<()> {
        let teacher_ps = ParamStore::new(3, DType::F32, Device::Cpu);
        let teacher = Bart::new(&teacher_ps, small())?;
        let student_ps = ParamStore::new(4, DType::F32, Device::Cpu);
        let student = Bart::quantized(&student_ps, small(), BartQuant::tbt(2, 2, 2)?)?;
        init_student_from(&teacher_ps, &student_ps)?;
        let table = student.table()?.expect("a dense table before freezing");
        for row in &table.to_vec2_f32()? {
            let mut vals: Vec<f32> = row.clone();
            vals.sort_by(f32::total_cmp);
            vals.dedup();
            assert!(vals.len() <= 3, "a ternary row has {} values", vals.len());
        }
        let src = ids(&[5, 6, 7, 8, 9, 10], 2);
        let mask = ids(&[1; 6], 2);
        let dec_in = ids(&[1, 5, 6, 1, 8, 9], 2);
        let targets = ids(&[5, 6, 7, 8, 9, 10], 2);
        let t_out = {
            let _g = trit::no_grad();
            teacher.forward(&src, &mask, &dec_in)?
        };
        let s_out = student.forward(&src, &mask, &dec_in)?;
        let (tl, sl) = (t_out.logits.to_vec_f32(), s_out.logits.to_vec_f32());
        assert!(sl.iter().all(|v| v.is_finite()));
        assert_ne!(tl, sl, "quantization changes the function");
        let loss = crate::tbt::distillation_loss(&s_out, &t_out, &targets, None)?;
        let grads = loss.total.backward()?;
        let alphas: Vec<(String, Tensor)> = student_ps
            .all()
            .into_iter()
            .filter(|(n, _)| n.ends_with("alpha"))
            .collect();
        // q, k, v and probabilities in 6 attentions, plus the inputs of 4·6 + 2·4 linear layers.
        assert_eq!(alphas.len(), 4 * 6 + 4 * 6 + 2 * 4);
        for (n, a) in &alphas {
            assert!(grads.get(a).is_some(), "{n} gets no gradient");
        }
        let first = loss.total.to_scalar()?;
        let mut opt = adamw(&student_ps, 3e-3, 0.0)?;
        opt.step(&grads)?;
        for _ in 0..20 {
            let s_out = student.forward(&src, &mask, &dec_in)?;
            let l = crate::tbt::distillation_loss(&s_out, &t_out, &targets, None)?;
            opt.step(&l.total.backward()?)?;
        }
        let s_out = student.forward(&src, &mask, &dec_in)?;
        let last = crate::tbt::distillation_loss(&s_out, &t_out, &targets, None)?
            .total
            .to_scalar()?;
        assert!(
            last < first,
            "distillation did not lower the loss: {first} -> {last}"
        );
        Ok(())
    }

    /// After learning to copy two sequences (ending in EOS = 2), beam search reproduces each from its
    /// source alone, with EOS, and greedy (beam 1) agrees.
    #[test]
    fn beam_search_generates_what_it_learned() -> Result<()> {
        let ps = ParamStore::new(5, DType::F32, Device::Cpu);
        let m = Bart::new(&ps, small())?;
        let mut opt = adamw(&ps, 1e-2, 0.01)?;
        let src = ids(&[10, 11, 12, 20, 21, 22], 2);
        let mask = ids(&[1; 6], 2);
        let dec_in = ids(&[1, 10, 11, 12, 1, 20, 21, 22], 2);
        let targets = ids(&[10, 11, 12, 2, 20, 21, 22, 2], 2);
        for _ in 0..80 {
            let out = m.forward(&src, &mask, &dec_in)?;
            let loss = out
                .logits
                .reshape((8, 50))?
                .cross_entropy(&targets.flatten_all()?, None)?;
            opt.step(&loss.backward()?)?;
        }
        for (source, want) in [
            ([10u32, 11, 12], [10u32, 11, 12, 2]),
            ([20, 21, 22], [20, 21, 22, 2]),
        ] {
            for beam in [1, 3] {
                let cfg = BeamConfig {
                    beam,
                    max_len: 8,
                    length_penalty: 1.0,
                    eos: 2,
                };
                assert_eq!(m.generate(&source, 1, cfg)?, want, "beam {beam}");
            }
        }
        Ok(())
    }

    /// A baseline student's activations follow fixed rules: it has no activation steps to learn, and its
    /// signed inputs quantize to {−1, 0, 1}·max|x| at 2 bits and ±mean|x| at 1 bit.
    #[test]
    fn a_baseline_student_learns_no_activation_steps() -> Result<()> {
        for (bits, weight) in [(2, Quantizer::Twn), (1, Quantizer::Bwn)] {
            let ps = ParamStore::new(5, DType::F32, Device::Cpu);
            let quant = BartQuant {
                embedding: Some(weight),
                weight,
                act_bits: Some(bits),
                low_bit_acts: LowBitActs::MinMax,
            };
            let m = Bart::quantized(&ps, small(), quant)?;
            assert!(ps.all().iter().all(|(n, _)| !n.ends_with("alpha")));
            let out = m.forward(
                &ids(&[5, 6, 7, 8, 9, 10], 2),
                &ids(&[1; 6], 2),
                &ids(&[1, 5, 6, 1, 8, 9], 2),
            )?;
            assert!(out.logits.to_vec_f32().iter().all(|v| v.is_finite()));
            let q = LowBitActs::rule(bits, true).fake_quant(
                &Tensor::from_vec(vec![-0.5f32, 0.2, 0.9, -0.1], 4, Device::Cpu)?,
                Granularity::PerTensor,
            )?;
            let want: &[f32] = if bits == 1 {
                &[-0.425, 0.425, 0.425, -0.425]
            } else {
                &[-0.9, 0.0, 0.9, 0.0]
            };
            for (g, w) in q.to_vec_f32().iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{bits} bits: {g} vs {w}");
            }
        }
        Ok(())
    }

    /// The token table keeps the code form whatever form the weights take (see [`BartQuant::tbt_with`]).
    #[test]
    fn tbt_quantizes_the_token_table_in_the_code_form() -> Result<()> {
        let q = BartQuant::tbt(1, 2, 8)?;
        assert_eq!(q.embedding, Some(Quantizer::TbtBinary(TbtForm::Code)));
        assert_eq!(q.weight, Quantizer::TbtTernary(TbtForm::Paper));
        let q = BartQuant::tbt_with(2, 1, 1, TbtForm::Code)?;
        assert_eq!(q.embedding, Some(Quantizer::TbtTernary(TbtForm::Code)));
        assert_eq!(q.weight, Quantizer::TbtBinary(TbtForm::Code));
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        assert!(Bart::new(
            &ps,
            BartConfig {
                heads: 5,
                ..small()
            }
        )
        .is_err());
        assert!(BartQuant::tbt(3, 2, 8).is_err());
        assert!(BartQuant::tbt(2, 2, 4).is_err());
        let m = Bart::new(&ps, small())?;
        let src = ids(&[5, 6, 7], 1);
        assert!(m.forward(&src, &ids(&[1, 1], 1), &ids(&[1], 1)).is_err());
        let long: Vec<i32> = (0..13).collect();
        assert!(m
            .forward(&ids(&long, 1), &ids(&[1; 13], 1), &ids(&[1], 1))
            .is_err());
        Ok(())
    }
}
