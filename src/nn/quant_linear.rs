//! A linear layer trained with quantization in the loop and frozen into packed low-bit weights.
//!
//! Training mode keeps full-precision shadow weights and computes y = q_a(x)·q_w(W)ᵀ + b with fake
//! quantizers whose straight-through gradients reach W (and a learnable activation step α): TBT's and
//! LLM-QAT's recipes. [`QuantLinear::freeze`] packs q_w(W) into the matching [`QFormat`] and from then on
//! runs the packed kernels, with activations fed as the integer codes their quantizer produced, so the
//! frozen layer computes the same function within floating-point summation error.

use super::linear::llm_qat_quantizer;
use super::params::{Init, ParamStore};
use crate::cpu::qmatmul::{self, ActMode, BinaryActs, Int8Acts, QIsa};
use crate::error::{Error, Result};
use crate::quant::quantizers::{ElasticQuantizer, Granularity, Quantizer};
use crate::quant::{Group, QFormat, QTensor};
use crate::storage::Device;
use crate::tensor::{no_grad, Tensor};

/// How a layer's inputs are quantized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActQuant {
    /// Full-precision inputs (weight-only quantization).
    None,
    /// TBT's elastic quantizer with a learnable step α (1, 2, 4 or 8 bits; `signed` for inputs that can
    /// be negative).
    Elastic { bits: u32, signed: bool },
    /// A fixed-rule quantizer with statistics per token (LLM-QAT's activations) or per tensor.
    Rule(Quantizer, Granularity),
}

/// What a [`QuantLinear`] quantizes and how.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantLinearConfig {
    /// The weight quantizer, applied per output channel.
    pub weight: Quantizer,
    pub act: ActQuant,
    pub bias: bool,
}

impl QuantLinearConfig {
    /// LLM-QAT's W`w_bits`-A`a_bits`: symmetric per-channel weights and symmetric per-token activations
    /// (`a_bits` = None or 16 keeps activations in full precision).
    pub fn llm_qat(w_bits: u32, a_bits: Option<u32>) -> Self {
        QuantLinearConfig {
            weight: Quantizer::LlmQat {
                bits: w_bits,
                symmetric: true,
            },
            act: llm_qat_quantizer(a_bits)
                .map_or(ActQuant::None, |q| ActQuant::Rule(q, Granularity::PerRow)),
            bias: false,
        }
    }
}

enum ActState {
    None,
    Elastic(ElasticQuantizer),
    Rule(Quantizer, Granularity),
}

/// A quantization-aware linear layer: `weight` [out, in] (the shadow weights), optional `bias` [out],
/// and for elastic activations a learnable `alpha` [1], all registered in the [`ParamStore`].
pub struct QuantLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    weight_quant: Quantizer,
    act: ActState,
    frozen: Option<QTensor>,
}

impl QuantLinear {
    /// A new layer initialised as `torch.nn.Linear` (uniform ±1/√in), or from values already in `params`.
    pub fn new(
        params: &ParamStore,
        in_dim: usize,
        out_dim: usize,
        cfg: QuantLinearConfig,
    ) -> Result<Self> {
        if in_dim == 0 || out_dim == 0 {
            crate::bail!(
                "QuantLinear::new",
                "dimensions must be positive, got in {in_dim}, out {out_dim}"
            );
        }
        let bound = Init::Uniform(1.0 / (in_dim as f32).sqrt());
        let weight = params.get_or_init("weight", (out_dim, in_dim), bound)?;
        let bias = if cfg.bias {
            Some(params.get_or_init("bias", out_dim, bound)?)
        } else {
            None
        };
        let alpha = match cfg.act {
            ActQuant::Elastic { .. } => Some(params.get_or_init("alpha", 1, Init::Const(1.0))?),
            _ => None,
        };
        Self::build(weight, bias, alpha, cfg)
    }

    /// A layer over existing tensors: weight [out, in] (e.g. a full-precision teacher's, which TBT and
    /// LLM-QAT start from), bias [out], and for elastic activations its α variable [1].
    pub fn from_weights(
        weight: Tensor,
        bias: Option<Tensor>,
        alpha: Option<Tensor>,
        cfg: QuantLinearConfig,
    ) -> Result<Self> {
        let &[out_dim, _] = weight.dims() else {
            crate::bail!(
                "QuantLinear::from_weights",
                "weight must be [out, in], got shape {}",
                weight.shape()
            );
        };
        if let Some(b) = &bias {
            if b.dims() != [out_dim] {
                return Err(Error::ShapeMismatch {
                    op: "QuantLinear::from_weights",
                    lhs: weight.dims().to_vec(),
                    rhs: b.dims().to_vec(),
                });
            }
        }
        Self::build(weight, bias, alpha, cfg)
    }

    /// `alpha` is the elastic quantizer's step variable; without one it gets its own.
    fn build(
        weight: Tensor,
        bias: Option<Tensor>,
        alpha: Option<Tensor>,
        cfg: QuantLinearConfig,
    ) -> Result<Self> {
        let act = match cfg.act {
            ActQuant::None => ActState::None,
            ActQuant::Elastic { bits, signed } => ActState::Elastic(match alpha {
                Some(alpha) => ElasticQuantizer::with_alpha(alpha, bits, signed)?,
                None => ElasticQuantizer::new(bits, signed)?,
            }),
            ActQuant::Rule(q, g) => ActState::Rule(q, g),
        };
        Ok(QuantLinear {
            weight,
            bias,
            weight_quant: cfg.weight,
            act,
            frozen: None,
        })
    }

    /// The full-precision shadow weights [out, in].
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The elastic activation quantizer, when the layer has one (its α is trainable).
    pub fn elastic(&self) -> Option<&ElasticQuantizer> {
        match &self.act {
            ActState::Elastic(q) => Some(q),
            _ => None,
        }
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The packed weights, once frozen.
    pub fn packed(&self) -> Option<&QTensor> {
        self.frozen.as_ref()
    }

    /// The fake-quantized weights q_w(W) [out, in], with the straight-through gradient to W.
    pub fn quantized_weight(&self) -> Result<Tensor> {
        self.weight_quant
            .fake_quant(&self.weight, Granularity::PerRow)
    }

    /// The packed format the weight quantizer's codes fit.
    fn packed_format(&self) -> Result<QFormat> {
        Ok(match self.weight_quant {
            Quantizer::TbtTernary(_) | Quantizer::Twn => QFormat::Ternary2 { group: Group::Row },
            Quantizer::TbtBinary(_) | Quantizer::Bwn => QFormat::Binary { offset: false },
            Quantizer::LlmQat { bits, symmetric } | Quantizer::MinMax { bits, symmetric } => {
                match (bits, symmetric) {
                    (..=4, true) => QFormat::Int4 {
                        group: Group::Row,
                        asym: false,
                    },
                    (..=4, false) => QFormat::Int4 {
                        group: Group::Row,
                        asym: true,
                    },
                    (_, true) => QFormat::Int8 { group: Group::Row },
                    (_, false) => crate::bail!(
                        "QuantLinear::freeze",
                        "no packed format holds {bits}-bit asymmetric weights (Int4 asym holds up to 4 bits)"
                    ),
                }
            }
        })
    }

    /// Packs q_w(W) into its low-bit format: the layer then runs the packed kernels. The shadow weights
    /// stay, so training can resume after [`QuantLinear::unfreeze`].
    pub fn freeze(&mut self) -> Result<()> {
        let format = self.packed_format()?;
        let parts = self.weight_quant.parts(&self.weight, Granularity::PerRow)?;
        let (rows, cols) = (self.out_dim(), self.in_dim());
        self.frozen = Some(QTensor::from_codes(
            format,
            rows,
            cols,
            &parts.codes,
            &parts.scales,
            parts.offsets.as_deref(),
        )?);
        Ok(())
    }

    /// Back to training mode.
    pub fn unfreeze(&mut self) {
        self.frozen = None;
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.is_some()
    }

    /// `x [..., in] -> [..., out]`: fake-quantized in training mode, packed kernels once frozen.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&in_dim, lead)) = x.dims().split_last() else {
            crate::bail!("QuantLinear::forward", "input must have at least one dim");
        };
        if in_dim != self.in_dim() {
            return Err(Error::ShapeMismatch {
                op: "QuantLinear::forward",
                lhs: x.dims().to_vec(),
                rhs: self.weight.dims().to_vec(),
            });
        }
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let y = match &self.frozen {
            Some(q) => self.packed_forward(q, &x2)?,
            None => {
                let xq = self.quantize_input(&x2)?;
                xq.matmul(&self.quantized_weight()?.t()?)?
            }
        };
        let y = match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        };
        y.reshape([lead, &[self.out_dim()]].concat())
    }

    fn quantize_input(&self, x: &Tensor) -> Result<Tensor> {
        match &self.act {
            ActState::None => Ok(x.clone()),
            ActState::Elastic(q) => q.forward(x),
            ActState::Rule(q, g) => q.fake_quant(x, *g),
        }
    }

    /// The frozen product: activations enter the packed kernel as the codes and steps of their own
    /// quantizer (int8 codes, or signs for binary × binary), so no second rounding changes them.
    fn packed_forward(&self, q: &QTensor, x: &Tensor) -> Result<Tensor> {
        let _guard = no_grad();
        if matches!(self.act, ActState::None) {
            return q.matmul(x, ActMode::F32);
        }
        if x.device().is_cuda() {
            // The activation quantizers run on the CPU: the input makes a round trip, and the packed
            // CUDA kernels multiply its quantized values (exact in f32) by the weights on the device.
            let xq = self.quantize_input(&x.to_device(Device::Cpu)?)?;
            return q.matmul(&xq.to_device(x.device())?, ActMode::F32);
        }
        let (m, k) = (x.dims()[0], x.dims()[1]);
        let w = q.packed();
        let isa = QIsa::best();
        let mut out = vec![0f32; m * q.rows()];
        match &self.act {
            ActState::Rule(quant, gran) if !quant.is_asymmetric() => {
                let parts = quant.parts(x, *gran)?;
                let scales = if parts.scales.len() == m {
                    parts.scales
                } else {
                    vec![parts.scales[0]; m]
                };
                let acts = Int8Acts::from_codes(&parts.codes, &scales, m, k);
                qmatmul::int8_acts(&w, &acts, &mut out, isa);
            }
            ActState::Elastic(e) if e.levels().is_some() => {
                // The elastic values are a·code with a = max(α, MIN_ALPHA); dividing by a recovers the
                // small integer codes exactly after rounding.
                let xq = e.forward(x)?.to_vec_f32();
                let a = e.alpha().to_scalar()?.max(ElasticQuantizer::MIN_ALPHA);
                if e.bits() == 1 && e.signed() && matches!(q.format(), QFormat::Binary { .. }) {
                    let acts = BinaryActs::from_signs(&xq, vec![a; m], m, k);
                    qmatmul::binary_acts(&w, &acts, &mut out, isa);
                } else {
                    let codes: Vec<i8> = xq.iter().map(|v| (v / a).round() as i8).collect();
                    let acts = Int8Acts::from_codes(&codes, &vec![a; m], m, k);
                    qmatmul::int8_acts(&w, &acts, &mut out, isa);
                }
            }
            _ => {
                // Asymmetric or 8-bit min-max inputs have an offset the int8 kernels do not carry: feed
                // their fake-quantized values as f32.
                let xq = self.quantize_input(x)?;
                return q.matmul(&xq, ActMode::F32);
            }
        }
        Tensor::from_vec(out, (m, q.rows()), x.device())
    }
}
