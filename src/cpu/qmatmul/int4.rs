//! Int4 weights: a 64-byte block holds 128 nibbles, byte i weight i in the low nibble and weight
//! 64 + i in the high one; symmetric codes c = u − 8 with one scale per group (w = s·c), or asymmetric
//! codes u with a scale and a min per group (w = s·u + min). Groups are 32, 64 or 128 weights, or a row.
//!
//! The kernels are the integer-code kernels of `int8`, which take the nibbles u as unsigned bytes:
//! with int8 activations Σ c·x = Σ u·x − 8·Σx (the −8·Σx in integers, through per-token biases) and
//! Σ w·x = s·Σ u·x + min·Σx; with f32 activations w = fma(u, s, −8s or min). One load and one shift give
//! 64 nibbles on AVX-512 (32 on AVX2), and u ≤ 15 keeps `vpmaddubsw` far from i16 saturation.

use std::ops::Range;

use super::int8::{shared_dequantize, shared_f32, shared_i8, INT4};
use super::{Int8Acts, PackedWeights, QIsa};
use crate::quant::format::QFormat;

/// y[i, r] for f32 activations `x` (`m · cols`, unpadded) and weight rows `rows`, into `t`
/// (t[(r − rows.start)·m + i]).
pub fn matmul_f32(
    w: &PackedWeights,
    x: &[f32],
    m: usize,
    rows: Range<usize>,
    t: &mut [f32],
    isa: QIsa,
) {
    shared_f32::<INT4>(w, x, m, rows, t, isa, codes_of(w));
}

/// y[i, r] for per-token int8 activations and weight rows `rows`, into `t` (t[(r − rows.start)·m + i]).
pub fn matmul_i8(w: &PackedWeights, acts: &Int8Acts, rows: Range<usize>, t: &mut [f32], isa: QIsa) {
    shared_i8::<INT4>(w, acts, rows, t, isa, codes_of(w));
}

/// Dequantizes weight rows `rows` into `out` (`rows.len() · cols`): s·(u − 8), or s·u + min.
pub fn dequantize_rows(w: &PackedWeights, rows: Range<usize>, out: &mut [f32]) {
    dequantize_rows_with_isa(w, rows, out, QIsa::best());
}

/// [`dequantize_rows`] on an explicit instruction set (tests).
pub fn dequantize_rows_with_isa(w: &PackedWeights, rows: Range<usize>, out: &mut [f32], isa: QIsa) {
    shared_dequantize::<INT4>(w, rows, out, isa, codes_of(w));
}

/// How the portable kernels unpack a row: to codes c = u − 8, or to nibbles u for asymmetric weights.
fn codes_of(w: &PackedWeights) -> fn(&[u8], &mut [i8]) {
    if matches!(w.format, QFormat::Int4 { asym: true, .. }) {
        |row, out| unpack(row, out, 0)
    } else {
        |row, out| unpack(row, out, 8)
    }
}

/// The nibbles of a packed row in weight order, minus `bias`.
fn unpack(row: &[u8], out: &mut [i8], bias: i8) {
    for (blk, o) in row.chunks_exact(64).zip(out.chunks_exact_mut(128)) {
        for (i, &b) in blk.iter().enumerate() {
            o[i] = (b & 0x0F) as i8 - bias;
            o[64 + i] = (b >> 4) as i8 - bias;
        }
    }
}
