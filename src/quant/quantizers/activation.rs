//! TBT's elastic activation quantizer: a learnable step α, initialised from the first batch and trained
//! with LSQ.

use super::{
    check_input, chunked_fill, chunked_sum, round_even, sign_code, Granularity, Quantizer,
};
use crate::cpu::par_fill;
use crate::dtype::DType;
use crate::error::Result;
use crate::op::{CustomBackward, Op};
use crate::ops::fused_kernel;
use crate::storage::Device;
use crate::tensor::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// TBT's elastic activation quantizer, per tensor, with a learnable scalar step α.
///
/// With x̄ = mean(x) for signed inputs and 0 for non-negative ones, a = max(α, [`Self::MIN_ALPHA`]) and
/// t = (x − x̄)/a, the forward is a·round(clip(t, Qn, Qp)), or a·sign(t) (sign(0) = +1) for signed
/// binary. x̄ is not added back, as papers.md's formula reads. The levels per `bits`:
///
/// | bits | unsigned (after ReLU, softmax) | signed |
/// |---|---|---|
/// | 1 | Qn = 0, Qp = 1 | sign form; Qp = 1 in the formulas below |
/// | 2 | Qn = 0, Qp = 2 (the paper's ternary {0, α, 2α}) | Qn = −1, Qp = 1 (ternary) |
/// | 4 | Qn = 0, Qp = 15 | Qn = −8, Qp = 7 |
/// | 8 | per-tensor asymmetric min-max | per-tensor symmetric min-max |
///
/// 8-bit is [`Quantizer::MinMax`] per tensor (identity STE); α is not used there.
///
/// Backward (x̄ and a are constants): the gradient w.r.t. x passes where Qn ≤ t ≤ Qp (inclusive, as
/// TBT's code) and is 0 elsewhere. The gradient w.r.t. α is LSQ's: g·Σᵢ ∂Lᵢ·eᵢ with g = 1/√(numel·Qp)
/// and eᵢ = Qn where tᵢ < Qn, Qp where tᵢ > Qp, round(tᵢ) − tᵢ inside; for signed binary eᵢ = sign(tᵢ)
/// (the derivative of α·sign(t) w.r.t. α). It passes through the clamp at `MIN_ALPHA`, so an α pushed
/// below it can come back (TBT's code blocks it there).
///
/// The first forward call on a non-empty input sets α = 2·mean|x|/√Qp (signed) or 4·mean|x|/√Qp
/// (unsigned), in place; later calls leave it to training.
#[derive(Debug)]
pub struct ElasticQuantizer {
    alpha: Tensor,
    bits: u32,
    signed: bool,
    initialised: AtomicBool,
}

impl ElasticQuantizer {
    /// The smallest step the forward uses: a learnable α can be trained to 0 or below.
    pub const MIN_ALPHA: f32 = 1e-5;

    /// A quantizer with its own α = 1 (a CPU f32 scalar variable), to be initialised by the first batch.
    /// `bits` is 1, 2, 4 or 8.
    pub fn new(bits: u32, signed: bool) -> Result<Self> {
        let alpha = Tensor::scalar_tensor(1f32, Device::Cpu)?.var()?;
        Self::with_alpha(alpha, bits, signed)
    }

    /// A quantizer training `alpha`, a one-element f32 variable (e.g. from a `ParamStore`, so optimizers
    /// and checkpoints see it). It is still initialised by the first batch; call
    /// [`Self::mark_initialised`] when `alpha` already holds a trained value.
    pub fn with_alpha(alpha: Tensor, bits: u32, signed: bool) -> Result<Self> {
        if !matches!(bits, 1 | 2 | 4 | 8) {
            crate::bail!("elastic_quant", "bits must be 1, 2, 4 or 8, got {bits}");
        }
        if !alpha.is_variable() || alpha.dtype() != DType::F32 || alpha.elem_count() != 1 {
            crate::bail!(
                "elastic_quant",
                "alpha must be a one-element f32 variable, got a {} tensor of shape {}{}",
                alpha.dtype(),
                alpha.shape(),
                if alpha.is_variable() {
                    ""
                } else {
                    " that is not a variable"
                }
            );
        }
        Ok(ElasticQuantizer {
            alpha,
            bits,
            signed,
            initialised: AtomicBool::new(false),
        })
    }

    /// The learnable step (a one-element f32 variable).
    pub fn alpha(&self) -> &Tensor {
        &self.alpha
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    pub fn signed(&self) -> bool {
        self.signed
    }

    /// (Qn, Qp) as in the table of the type's docs; `None` for 8-bit (min-max, no learnable levels).
    pub fn levels(&self) -> Option<(i32, i32)> {
        match (self.bits, self.signed) {
            (1, false) => Some((0, 1)),
            (2, false) => Some((0, 2)),
            (4, false) => Some((0, 15)),
            (1 | 2, true) => Some((-1, 1)),
            (4, true) => Some((-8, 7)),
            _ => None,
        }
    }

    /// True once α has been initialised from a batch (or marked so).
    pub fn is_initialised(&self) -> bool {
        self.initialised.load(Ordering::Acquire)
    }

    /// Keeps the current α (loaded from a checkpoint or set by hand) instead of initialising it from the
    /// next batch.
    pub fn mark_initialised(&self) {
        self.initialised.store(true, Ordering::Release);
    }

    /// Fake-quantizes `x` (any float dtype, rank ≥ 1); see the type's docs. The result records an op with
    /// inputs (x, α), so both get gradients.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input("elastic_quant", x)?;
        let Some((qn, qp)) = self.levels() else {
            return Quantizer::MinMax {
                bits: self.bits,
                symmetric: self.signed,
            }
            .fake_quant(x, Granularity::PerTensor);
        };
        let (qn, qp) = (qn as f32, qp as f32);
        let n = x.elem_count();
        if n > 0 && !self.initialised.swap(true, Ordering::AcqRel) {
            let mean_abs = x.with_f32_slice("activation quantizer", |v| {
                chunked_sum(v, |t| f64::from(t.abs()))
            })? / n as f64;
            let k = if self.signed { 2.0 } else { 4.0 };
            let init = (k * mean_abs / f64::from(qp).sqrt()) as f32;
            self.alpha.update_in_place(|a| a[0] = init)?;
        }
        let binary_signed = self.signed && self.bits == 1;
        let (mut centre, mut alpha) = (0f32, 0f32);
        let storage = fused_kernel("activation quantizer", &[x, &self.alpha], x.dtype(), |v| {
            let xs = v[0];
            alpha = v[1][0].max(Self::MIN_ALPHA);
            if self.signed {
                centre = (chunked_sum(xs, f64::from) / xs.len() as f64) as f32;
            }
            let (c, a) = (centre, alpha);
            let mut out = vec![0f32; xs.len()];
            par_fill(&mut out, |start, o| {
                for (o, &x) in o.iter_mut().zip(&xs[start..]) {
                    let t = (x - c) / a;
                    let code = if binary_signed {
                        sign_code(t) as f32
                    } else {
                        round_even(t.clamp(qn, qp))
                    };
                    *o = a * code;
                }
            });
            out
        })?;
        let backward = ElasticBackward {
            centre,
            alpha,
            qn,
            qp,
            binary_signed,
            grad_scale: if n > 0 {
                1.0 / (n as f64 * f64::from(qp)).sqrt()
            } else {
                0.0
            },
        };
        let op = Op::Custom(vec![x.clone(), self.alpha.clone()], Arc::new(backward));
        Ok(Tensor::from_storage(storage, x.shape().clone(), Some(op)))
    }
}

/// What the elastic backward needs from its forward: the constants t = (x − centre)/alpha was built from.
struct ElasticBackward {
    centre: f32,
    alpha: f32,
    qn: f32,
    qp: f32,
    binary_signed: bool,
    /// LSQ's g = 1/√(numel·Qp).
    grad_scale: f64,
}

impl CustomBackward for ElasticBackward {
    fn name(&self) -> &'static str {
        "elastic_quant"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, alpha) = (&inputs[0], &inputs[1]);
        let (c, a, qn, qp) = (self.centre, self.alpha, self.qn, self.qp);
        let mut dalpha = 0f64;
        let storage = fused_kernel(
            "activation quantizer backward",
            &[x, grad],
            x.dtype(),
            |v| {
                let (xs, gs) = (v[0], v[1]);
                let mut dx = vec![0f32; xs.len()];
                dalpha = chunked_fill(&mut dx, |start, o| {
                    let mut acc = 0f64;
                    for ((o, &x), &g) in o.iter_mut().zip(&xs[start..]).zip(&gs[start..]) {
                        let t = (x - c) / a;
                        // t is inside [Qn, Qp] exactly when clamping leaves it unchanged; outside, the clamp
                        // is the bound LSQ's gradient takes.
                        let tc = t.clamp(qn, qp);
                        let inside = t == tc;
                        *o = if inside { g } else { 0.0 };
                        let e = if self.binary_signed {
                            sign_code(t) as f32
                        } else if inside {
                            round_even(t) - t
                        } else {
                            tc
                        };
                        acc += f64::from(g) * f64::from(e);
                    }
                    acc
                });
                dx
            },
        )?;
        let dx = Tensor::from_storage(storage, x.shape().clone(), None);
        let da = Tensor::from_vec(
            vec![(dalpha * self.grad_scale) as f32],
            alpha.shape(),
            alpha.device(),
        )?
        .to_dtype(alpha.dtype())?;
        Ok(vec![Some(dx), Some(da)])
    }
}
