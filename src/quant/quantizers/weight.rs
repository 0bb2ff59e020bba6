//! Quantizers with statistics per row (or per tensor) and a straight-through backward: TBT's ternary and
//! binary weights, LLM-QAT's int-N, min-max round-to-nearest, TWN and BWN.

use super::{check_input, dequant, round_even, sign_code, sum_f64, QuantParts};
use crate::cpu::{par_fill, PAR_THRESHOLD};
use crate::error::Result;
use crate::op::{CustomBackward, Op};
use crate::ops::fused_kernel;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// TBT's weight quantizer as the paper writes it or as the released code computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TbtForm {
    /// The paper: μ = mean(row) is subtracted before coding and not added back (the value is α·code);
    /// STE 1[|(w − μ)/α| < 1], with μ and α treated as constants.
    Paper,
    /// The original code: no mean centring (μ = 0) and the identity STE (gradient 1 everywhere).
    Code,
}

/// Which elements share one set of statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One set per row of the last dim: per output channel for a weight [out, in], per token for an
    /// activation [.., d], and per token over the whole projection for a k_proj/v_proj output
    /// [.., heads·head_dim] (LLM-QAT's KV cache, quantized before RoPE and before splitting heads).
    PerRow,
    /// One set for the whole tensor.
    PerTensor,
}

/// A fake quantizer. Each variant's doc gives its formula for one row w of n elements (see
/// [`Granularity`]); `round` is half-to-even. [`Quantizer::fake_quant`] is the autograd op and
/// [`Quantizer::parts`] the integer codes and scales behind its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantizer {
    /// TBT ternary: μ = mean(w) ([`TbtForm::Paper`]) or 0 ([`TbtForm::Code`]), α = (4/3)·‖w − μ‖₁/n,
    /// code = round(clip((w − μ)/α, −1, 1)) ∈ {−1, 0, 1}, value α·code (μ is not added back). A constant
    /// row (α = 0) codes to 0. STE as the form says.
    TbtTernary(TbtForm),
    /// TBT binary: μ as for ternary, α = ‖w − μ‖₁/n, code = sign(w − μ) ∈ {−1, +1} with sign(0) = +1,
    /// value α·code. STE as the form says; the code form is the same function as [`Quantizer::Bwn`].
    TbtBinary(TbtForm),
    /// LLM-QAT (original code). Symmetric (SymQuantizer): s = (2^(N−1) − 1)/(max|w| + 1e−6),
    /// code = round(w·s) ∈ [−(2^(N−1) − 1), 2^(N−1) − 1], value (1/s)·code (the code's round(w·s)/s up to
    /// one f32 rounding: the value is scale·code so that [`QuantParts`] reproduce it exactly). Asymmetric:
    /// s = (2^N − 1)/(max(w) − min(w) + 1e−6), code = round((w − min(w))·s) ∈ [0, 2^N − 1], value
    /// (1/s)·code + min(w). The forward does not clip; the STE passes the gradient where |w| < 2 and zeroes
    /// it where |w| ≥ 2. N in 2..=8.
    LlmQat { bits: u32, symmetric: bool },
    /// Min-max round-to-nearest: the arithmetic of [`Quantizer::LlmQat`] (so PTQ and QAT differ only by
    /// training) with the identity STE, since the min-max range clips nothing. Per row it is the
    /// round-to-nearest PTQ baseline; per tensor, TBT's 8-bit activation quantizer. N in 2..=8, or 1 for
    /// the asymmetric form (codes {0, 1}: values min and max).
    MinMax { bits: u32, symmetric: bool },
    /// TWN: Δ = 0.7·mean|w|, α = mean of |w| over |w| > Δ, code = sign(w) where |w| > Δ and 0 elsewhere,
    /// value α·code (0 for an all-zero row). Identity STE.
    Twn,
    /// BWN: α = mean|w|, code = sign(w) with sign(0) = +1, value α·code. Identity STE.
    Bwn,
}

/// One row's statistics: its values are scale·code (+ offset for the asymmetric schemes).
#[derive(Clone, Copy, Debug, Default)]
struct RowParams {
    scale: f32,
    /// Asymmetric schemes: min(w), the value of code 0.
    offset: f32,
    /// Subtracted before coding: TBT's μ, or min(w) for the asymmetric schemes; 0 otherwise.
    centre: f32,
    /// Int schemes: s (codes per unit); TWN: the threshold Δ; unused otherwise.
    step: f32,
}

/// The largest symmetric code, 2^(N−1) − 1.
fn qmax(bits: u32) -> f32 {
    ((1u32 << (bits - 1)) - 1) as f32
}

/// The largest asymmetric code, 2^N − 1.
fn levels(bits: u32) -> f32 {
    ((1u32 << bits) - 1) as f32
}

impl Quantizer {
    /// A short name for errors and the autograd graph.
    pub fn name(self) -> &'static str {
        match self {
            Quantizer::TbtTernary(_) => "tbt_ternary",
            Quantizer::TbtBinary(_) => "tbt_binary",
            Quantizer::LlmQat { .. } => "llm_qat",
            Quantizer::MinMax { .. } => "minmax",
            Quantizer::Twn => "twn",
            Quantizer::Bwn => "bwn",
        }
    }

    pub(crate) fn check(self) -> Result<()> {
        if let Quantizer::LlmQat { bits, .. } | Quantizer::MinMax { bits, .. } = self {
            let one_bit = matches!(
                self,
                Quantizer::MinMax {
                    bits: 1,
                    symmetric: false
                }
            );
            if !(2..=8).contains(&bits) && !one_bit {
                crate::bail!(
                    self.name(),
                    "bits must be in 2..=8 (or 1 for asymmetric min-max), got {bits}"
                );
            }
        }
        Ok(())
    }

    /// True for the schemes whose values carry a per-row offset.
    pub fn is_asymmetric(self) -> bool {
        matches!(
            self,
            Quantizer::LlmQat {
                symmetric: false,
                ..
            } | Quantizer::MinMax {
                symmetric: false,
                ..
            }
        )
    }

    fn row_params(self, row: &[f32]) -> RowParams {
        let n = row.len() as f64;
        let l1 = |c: f32| sum_f64(row, |v| (f64::from(v) - f64::from(c)).abs());
        match self {
            Quantizer::TbtTernary(form) | Quantizer::TbtBinary(form) => {
                let centre = match form {
                    TbtForm::Paper => (sum_f64(row, f64::from) / n) as f32,
                    TbtForm::Code => 0.0,
                };
                // 4·Σ/(3n) rather than (4/3)·Σ/n: exact whenever the result is representable.
                let scale = match self {
                    Quantizer::TbtTernary(_) => 4.0 * l1(centre) / (3.0 * n),
                    _ => l1(centre) / n,
                } as f32;
                RowParams {
                    scale,
                    centre,
                    ..RowParams::default()
                }
            }
            Quantizer::Twn => {
                let step = (0.7 * l1(0.0) / n) as f32;
                // Two branch-free passes: a filter on |w| > Δ would mispredict on random weights.
                let sum = sum_f64(row, |v| {
                    f64::from(v.abs()) * f64::from(u8::from(v.abs() > step))
                });
                let count = row
                    .iter()
                    .map(|v| usize::from(v.abs() > step))
                    .sum::<usize>();
                let scale = if count > 0 {
                    (sum / count as f64) as f32
                } else {
                    0.0
                };
                RowParams {
                    scale,
                    step,
                    ..RowParams::default()
                }
            }
            Quantizer::Bwn => RowParams {
                scale: (l1(0.0) / n) as f32,
                ..RowParams::default()
            },
            Quantizer::LlmQat { bits, symmetric } | Quantizer::MinMax { bits, symmetric } => {
                if symmetric {
                    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = qmax(bits) / (amax + 1e-6);
                    RowParams {
                        scale: 1.0 / step,
                        step,
                        ..RowParams::default()
                    }
                } else {
                    let (lo, hi) = row
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                            (lo.min(v), hi.max(v))
                        });
                    let step = levels(bits) / (hi - lo + 1e-6);
                    RowParams {
                        scale: 1.0 / step,
                        offset: lo,
                        centre: lo,
                        step,
                    }
                }
            }
        }
    }

    /// Calls `f(i, code)` for each element of `row`, matching on the scheme once per row.
    fn for_each_code(self, p: &RowParams, row: &[f32], mut f: impl FnMut(usize, i32)) {
        let items = row.iter().copied().enumerate();
        match self {
            Quantizer::TbtTernary(_) if p.scale > 0.0 => items.for_each(|(i, v)| {
                f(
                    i,
                    round_even(((v - p.centre) / p.scale).clamp(-1.0, 1.0)) as i32,
                )
            }),
            Quantizer::TbtTernary(_) => items.for_each(|(i, _)| f(i, 0)),
            Quantizer::TbtBinary(_) => items.for_each(|(i, v)| f(i, sign_code(v - p.centre))),
            Quantizer::Twn => {
                items.for_each(|(i, v)| f(i, i32::from(v.abs() > p.step) * sign_code(v)))
            }
            Quantizer::Bwn => items.for_each(|(i, v)| f(i, sign_code(v))),
            // Clamping before rounding is the same as after (the bounds are integers) and keeps
            // `round_even` in its domain for any input; in exact arithmetic the bounds never bind.
            Quantizer::LlmQat {
                bits,
                symmetric: true,
            }
            | Quantizer::MinMax {
                bits,
                symmetric: true,
            } => {
                let q = qmax(bits);
                items.for_each(|(i, v)| f(i, round_even((v * p.step).clamp(-q, q)) as i32))
            }
            Quantizer::LlmQat { bits, .. } | Quantizer::MinMax { bits, .. } => {
                let top = levels(bits);
                items.for_each(|(i, v)| {
                    f(
                        i,
                        round_even(((v - p.centre) * p.step).clamp(0.0, top)) as i32,
                    )
                })
            }
        }
    }

    /// Fake quantization of `x` (any float dtype, rank ≥ 1) as this variant's doc says, with statistics
    /// per row of the last dim or per tensor. The result has `x`'s shape and dtype; its gradient is the
    /// variant's straight-through estimator.
    pub fn fake_quant(self, x: &Tensor, granularity: Granularity) -> Result<Tensor> {
        self.check()?;
        check_input(self.name(), x)?;
        let (rows, d) = rows_of(x, granularity);
        let asym = self.is_asymmetric();
        let mut params = vec![RowParams::default(); rows];
        let storage = fused_kernel("fake_quant", &[x], x.dtype(), |v| {
            let mut out = vec![0f32; v[0].len()];
            for_rows(v[0], d, &mut out, &mut params, |_, xr, or, p| {
                *p = self.row_params(xr);
                let offset = asym.then_some(p.offset);
                self.for_each_code(p, xr, |i, c| or[i] = dequant(p.scale, offset, c));
            });
            out
        })?;
        let ste = match self {
            Quantizer::TbtTernary(TbtForm::Paper) | Quantizer::TbtBinary(TbtForm::Paper) => {
                Ste::TbtClip {
                    d,
                    rows: params.iter().map(|p| (p.centre, p.scale)).collect(),
                }
            }
            Quantizer::LlmQat { .. } => Ste::AbsBelowTwo,
            _ => Ste::Identity,
        };
        let backward = FakeQuantBackward {
            name: self.name(),
            ste,
        };
        let op = Op::Custom(vec![x.clone()], Arc::new(backward));
        Ok(Tensor::from_storage(storage, x.shape().clone(), Some(op)))
    }

    /// The integer parts of [`Quantizer::fake_quant`]`(x, granularity)`: its f32 values are exactly
    /// `parts.dequantize()` (for an f32 `x`; other float dtypes round the forward's values once more).
    /// Fails for 8-bit asymmetric schemes, whose codes 0..=255 do not fit an i8 (no packed format
    /// stores them).
    pub fn parts(self, x: &Tensor, granularity: Granularity) -> Result<QuantParts> {
        self.check()?;
        check_input(self.name(), x)?;
        if let Quantizer::LlmQat {
            bits: 8,
            symmetric: false,
        }
        | Quantizer::MinMax {
            bits: 8,
            symmetric: false,
        } = self
        {
            crate::bail!(
                self.name(),
                "8-bit asymmetric codes span 0..=255 and do not fit the i8 codes of QuantParts"
            );
        }
        let (rows, d) = rows_of(x, granularity);
        let mut codes = vec![0i8; x.elem_count()];
        let mut params = vec![RowParams::default(); rows];
        x.with_f32_slice("quantize", |v| {
            for_rows(v, d, &mut codes, &mut params, |_, xr, cr, p| {
                *p = self.row_params(xr);
                // In range for i8: every scheme but the 8-bit asymmetric one (rejected above) codes
                // within −127..=127.
                self.for_each_code(p, xr, |i, c| cr[i] = c as i8);
            })
        })?;
        Ok(QuantParts {
            codes,
            scales: params.iter().map(|p| p.scale).collect(),
            offsets: self
                .is_asymmetric()
                .then(|| params.iter().map(|p| p.offset).collect()),
            row_len: d,
        })
    }
}

/// (rows, row length) of `x` at `granularity`; `x` has rank ≥ 1.
fn rows_of(x: &Tensor, granularity: Granularity) -> (usize, usize) {
    match granularity {
        Granularity::PerTensor => (1, x.elem_count()),
        Granularity::PerRow => {
            let (&d, lead) = x.dims().split_last().expect("rank checked by the caller");
            (lead.iter().product(), d)
        }
    }
}

/// Runs `f(row, x_row, out_row, param)` on each row of length `d` of `x` and `out` and each entry of
/// `params` (one per row), in parallel when the tensor is large.
fn for_rows<T: Send, P: Send>(
    x: &[f32],
    d: usize,
    out: &mut [T],
    params: &mut [P],
    f: impl Fn(usize, &[f32], &mut [T], &mut P) + Sync,
) {
    if d == 0 {
        return;
    }
    if x.len() >= PAR_THRESHOLD {
        x.par_chunks(d)
            .zip(out.par_chunks_mut(d))
            .zip(params.par_iter_mut())
            .enumerate()
            .for_each(|(r, ((xr, or), p))| f(r, xr, or, p));
    } else {
        x.chunks(d)
            .zip(out.chunks_mut(d))
            .zip(params.iter_mut())
            .enumerate()
            .for_each(|(r, ((xr, or), p))| f(r, xr, or, p));
    }
}

/// Where the straight-through gradient passes.
enum Ste {
    /// Everywhere.
    Identity,
    /// Where |x| < 2 (LLM-QAT's clip_val, used only in the backward).
    AbsBelowTwo,
    /// Where |(x − μ)/α| < 1, with each row's (μ, α); everywhere in a row with α = 0.
    TbtClip { d: usize, rows: Vec<(f32, f32)> },
}

struct FakeQuantBackward {
    name: &'static str,
    ste: Ste,
}

impl CustomBackward for FakeQuantBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let x = &inputs[0];
        let storage = match &self.ste {
            Ste::Identity => return Ok(vec![Some(grad.clone())]),
            Ste::AbsBelowTwo => fused_kernel("fake_quant backward", &[x, grad], x.dtype(), |v| {
                let (xs, gs) = (v[0], v[1]);
                let mut dx = vec![0f32; xs.len()];
                par_fill(&mut dx, |start, o| {
                    for ((o, &x), &g) in o.iter_mut().zip(&xs[start..]).zip(&gs[start..]) {
                        *o = if x.abs() < 2.0 { g } else { 0.0 };
                    }
                });
                dx
            })?,
            Ste::TbtClip { d, rows } => {
                fused_kernel("fake_quant backward", &[x, grad], x.dtype(), |v| {
                    let (xs, gs) = (v[0], v[1]);
                    let mut dx = vec![0f32; xs.len()];
                    let mut unit = vec![(); rows.len()];
                    for_rows(xs, *d, &mut dx, &mut unit, |r, xr, or, _| {
                        let (mu, alpha) = rows[r];
                        let gr = &gs[r * d..(r + 1) * d];
                        for ((o, &x), &g) in or.iter_mut().zip(xr).zip(gr) {
                            let inside = alpha == 0.0 || ((x - mu) / alpha).abs() < 1.0;
                            *o = if inside { g } else { 0.0 };
                        }
                    });
                    dx
                })?
            }
        };
        Ok(vec![Some(Tensor::from_storage(
            storage,
            x.shape().clone(),
            None,
        ))])
    }
}
