//! Row-wise softmax, log-softmax and cross-entropy kernels (forward and backward) over contiguous rows.

use super::reduce::{max_f32, sum_f32};
use super::simd;
use rayon::prelude::*;

fn par_rows(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if d == 0 {
        return;
    }
    if out.len() >= super::PAR_THRESHOLD {
        out.par_chunks_mut(d)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(d).enumerate().for_each(|(r, row)| f(r, row));
    }
}

/// log Σ exp(row), shifted by the row max; -inf for an all -inf row.
pub fn logsumexp_row(row: &[f32]) -> f32 {
    let m = max_f32(row);
    if m == f32::NEG_INFINITY {
        return m;
    }
    // The exponentials go through a stack buffer a block at a time: only their sum is needed.
    let mut buf = [0f32; 256];
    let s: f32 = row
        .chunks(buf.len())
        .map(|c| simd::exp_shifted(c, m, &mut buf[..c.len()]))
        .sum();
    m + s.ln()
}

pub fn softmax_rows(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, d, |r, o| {
        let row = &x[r * d..(r + 1) * d];
        let inv = 1.0 / simd::exp_shifted(row, max_f32(row), o);
        o.iter_mut().for_each(|v| *v *= inv);
    });
    out
}

/// Causal softmax of rows of length `d` that come in blocks of `q` query rows: row i of a block sees
/// columns 0..=i + (d − q) and gets exact zeros beyond (the additive −∞ mask, without materialising it).
/// Needs q ≤ d.
pub fn causal_softmax_rows(x: &[f32], d: usize, q: usize) -> Vec<f32> {
    debug_assert!(q <= d);
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, d, |r, o| {
        let seen = r % q + 1 + (d - q);
        let (o, hidden) = o.split_at_mut(seen);
        let row = &x[r * d..r * d + seen];
        let inv = 1.0 / simd::exp_shifted(row, max_f32(row), o);
        o.iter_mut().for_each(|v| *v *= inv);
        hidden.fill(0.0);
    });
    out
}

pub fn log_softmax_rows(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, d, |r, o| {
        let row = &x[r * d..(r + 1) * d];
        let lse = logsumexp_row(row);
        for (o, &v) in o.iter_mut().zip(row) {
            *o = v - lse;
        }
    });
    out
}

/// dx = y ⊙ (g − Σ g⊙y) for y = softmax(x).
pub fn softmax_backward_rows(y: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    par_rows(&mut out, d, |r, o| {
        let (y, g) = (&y[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = y * (g - dot);
        }
    });
    out
}

/// `softmax_backward_rows` for the output of `causal_softmax_rows`: the hidden columns have y = 0, so
/// their gradient is 0 and only each row's visible prefix is read.
pub fn causal_softmax_backward_rows(y: &[f32], g: &[f32], d: usize, q: usize) -> Vec<f32> {
    debug_assert!(q <= d);
    let mut out = vec![0f32; y.len()];
    par_rows(&mut out, d, |r, o| {
        let seen = r % q + 1 + (d - q);
        let (y, g) = (&y[r * d..r * d + seen], &g[r * d..r * d + seen]);
        let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
        let (o, hidden) = o.split_at_mut(seen);
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = y * (g - dot);
        }
        hidden.fill(0.0);
    });
    out
}

/// dx = g − softmax(x) · Σ g, with softmax(x) = exp(y) for y = log_softmax(x).
pub fn log_softmax_backward_rows(y: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    par_rows(&mut out, d, |r, o| {
        let (y, g) = (&y[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let gs = sum_f32(g);
        simd::exp_shifted(y, 0.0, o);
        for (o, &g) in o.iter_mut().zip(g) {
            *o = g - *o * gs;
        }
    });
    out
}

/// Per-row negative log-likelihood and log-sum-exp of logits [n, v] for `targets` (negative = ignored).
/// Returns (sum of losses over kept rows, per-row lse).
pub fn cross_entropy_forward(x: &[f32], v: usize, targets: &[i64]) -> (f64, Vec<f32>) {
    let lse: Vec<f32> = if x.len() >= super::PAR_THRESHOLD {
        x.par_chunks(v).map(logsumexp_row).collect()
    } else {
        x.chunks(v).map(logsumexp_row).collect()
    };
    let total = targets
        .iter()
        .enumerate()
        .filter(|(_, &t)| t >= 0)
        .map(|(r, &t)| (lse[r] - x[r * v + t as usize]) as f64)
        .sum();
    (total, lse)
}

/// dlogits = scale · (softmax(x) − onehot(target)) for kept rows, 0 for ignored rows.
pub fn cross_entropy_backward(
    x: &[f32],
    v: usize,
    targets: &[i64],
    lse: &[f32],
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, v, |r, o| {
        let t = targets[r];
        if t < 0 {
            return;
        }
        let row = &x[r * v..(r + 1) * v];
        simd::exp_shifted(row, lse[r], o);
        o.iter_mut().for_each(|v| *v *= scale);
        o[t as usize] -= scale;
    });
    out
}
