//! Row-wise softmax, log-softmax and cross-entropy kernels (forward and backward) over contiguous rows.

use super::reduce::{max_f32, sum_f32};
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
    let s: f32 = row.iter().map(|&v| (v - m).exp()).sum();
    m + s.ln()
}

pub fn softmax_rows(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, d, |r, o| {
        let row = &x[r * d..(r + 1) * d];
        let m = max_f32(row);
        for (o, &v) in o.iter_mut().zip(row) {
            *o = (v - m).exp();
        }
        let inv = 1.0 / sum_f32(o);
        o.iter_mut().for_each(|v| *v *= inv);
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

/// dx = g − softmax(x) · Σ g, with softmax(x) = exp(y) for y = log_softmax(x).
pub fn log_softmax_backward_rows(y: &[f32], g: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0f32; y.len()];
    par_rows(&mut out, d, |r, o| {
        let (y, g) = (&y[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let gs = sum_f32(g);
        for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
            *o = g - y.exp() * gs;
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
        for (o, &val) in o.iter_mut().zip(row) {
            *o = (val - lse[r]).exp() * scale;
        }
        o[t as usize] -= scale;
    });
    out
}
