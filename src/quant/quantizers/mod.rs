//! The quantizers of TBT (ternary and binary transformers, Liu et al., ACL 2023) and LLM-QAT (Liu et al.,
//! 2023), and the baselines they are compared with, as autograd ops: the forward pass is fake
//! quantization (the dequantized low-bit value, in the input's float dtype) and the backward pass is a
//! straight-through estimator (STE).
//!
//! - [`Quantizer`] computes its statistics per row (a row is the last dim; a weight [out, in] has one row
//!   per output channel, an activation [.., tokens, d] one per token) or, with [`Granularity::PerTensor`],
//!   over the whole tensor: TBT's ternary and binary weight quantizers ([`TbtForm`] picks the paper's
//!   equations or the released code), LLM-QAT's symmetric and asymmetric int-N (weights, activations and
//!   the KV cache), min-max round-to-nearest (the PTQ baseline and TBT's 8-bit activations), TWN and BWN.
//!   [`Quantizer::parts`] gives the integer codes and per-row scales that a packed format stores.
//! - [`ElasticQuantizer`] is TBT's activation quantizer with a learnable step α trained by LSQ.
//!
//! Rounding is half-to-even (as `torch.round`). sign(0) is +1 everywhere, so binary values are always ±α.

mod activation;
mod weight;

pub use activation::ElasticQuantizer;
pub use weight::{Granularity, Quantizer, TbtForm};

use crate::cpu::PAR_THRESHOLD;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use rayon::prelude::*;

/// The integer parts of a fake-quantized tensor, for freezing into a packed format: element `i` of row
/// `r = i / row_len` has the value `scales[r] · codes[i]` (`+ offsets[r]` for the asymmetric schemes),
/// computed in f32 exactly as [`QuantParts::value`] does, which is bit-for-bit the f32 value that
/// [`Quantizer::fake_quant`] produces.
///
/// Codes are: ternary {−1, 0, 1}; binary {−1, +1}; symmetric int-N [−(2^(N−1) − 1), 2^(N−1) − 1];
/// asymmetric int-N [0, 2^N − 1] with `offsets` the value of code 0 (the row minimum); N ≤ 7, since
/// 8-bit asymmetric codes do not fit an i8 (see [`Quantizer::parts`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantParts {
    /// One code per element, row-major.
    pub codes: Vec<i8>,
    /// One scale per row.
    pub scales: Vec<f32>,
    /// One offset per row for the asymmetric schemes, `None` for the symmetric ones.
    pub offsets: Option<Vec<f32>>,
    /// Elements per row (the last dim, or every element for [`Granularity::PerTensor`]).
    pub row_len: usize,
}

impl QuantParts {
    /// The dequantized value of element `i`.
    pub fn value(&self, i: usize) -> f32 {
        let r = i / self.row_len;
        dequant(
            self.scales[r],
            self.offsets.as_ref().map(|o| o[r]),
            i32::from(self.codes[i]),
        )
    }

    /// Every dequantized value, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len()).map(|i| self.value(i)).collect()
    }
}

/// scale · code (+ offset): the one expression both the forward kernels and [`QuantParts`] evaluate, so
/// their values agree bit for bit. An integer code turns into +0.0, never −0.0.
#[inline]
fn dequant(scale: f32, offset: Option<f32>, code: i32) -> f32 {
    match offset {
        Some(o) => scale * code as f32 + o,
        None => scale * code as f32,
    }
}

/// Round half to even of `u`, for |u| ≤ 2^22 (callers clamp to their code range first).
///
/// Adding and subtracting 1.5·2^23 leaves the sum in [2^23, 2^24), where the f32 spacing is 1, so the
/// addition itself rounds u to an integer, half to even. Unlike `f32::round_ties_even`, which on the
/// baseline x86-64 target (no SSE4.1) is a library call with branches, this is two vectorizable adds.
#[inline]
fn round_even(u: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (u + MAGIC) - MAGIC
}

/// Σ f(x) over a slice in f64, with eight independent accumulators so the adds pipeline (a single f64
/// accumulator is one long dependency chain).
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The binary code of `v`: +1 for v ≥ 0 (so sign(0) = +1), −1 otherwise. Written without a branch: on
/// random weights a branch on the sign mispredicts half the time.
#[inline]
fn sign_code(v: f32) -> i32 {
    1 - 2 * i32::from(v < 0.0)
}

/// Rejects what no quantizer accepts: rank 0 (there is no last dim to reduce) and integer dtypes.
fn check_input(op: &'static str, x: &Tensor) -> Result<()> {
    if x.rank() == 0 {
        crate::bail!(
            op,
            "needs a tensor of rank ≥ 1 (stats reduce the last dim), got a scalar"
        );
    }
    if !x.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: x.dtype(),
        });
    }
    Ok(())
}

/// Elements per chunk of the chunked passes below. The chunking is the same whether or not the chunks run
/// in parallel, so the f64 partial sums, and the results, do not depend on the thread count.
const CHUNK: usize = 1 << 14;

/// Σ f(x) in f64, in fixed chunks (parallel for large inputs).
fn chunked_sum(x: &[f32], f: impl Fn(f32) -> f64 + Sync) -> f64 {
    let part = |c: &[f32]| sum_f64(c, &f);
    let parts: Vec<f64> = if x.len() >= PAR_THRESHOLD {
        x.par_chunks(CHUNK).map(part).collect()
    } else {
        x.chunks(CHUNK).map(part).collect()
    };
    parts.iter().sum()
}

/// Fills `out` chunk by chunk with `f(start, out_chunk)`, which returns a partial f64 sum; returns the total.
/// Parallel for large outputs, with the same chunks (so the same sum) either way.
fn chunked_fill(out: &mut [f32], f: impl Fn(usize, &mut [f32]) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> = if out.len() >= PAR_THRESHOLD {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .map(|(c, o)| f(c * CHUNK, o))
            .collect()
    } else {
        out.chunks_mut(CHUNK)
            .enumerate()
            .map(|(c, o)| f(c * CHUNK, o))
            .collect()
    };
    parts.iter().sum()
}
