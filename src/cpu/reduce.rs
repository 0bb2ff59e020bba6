//! Row reductions: the storage layer permutes the reduced dims to the end, so every kernel here reduces
//! contiguous rows of length `r`.

use super::PAR_THRESHOLD;
use crate::op::ReduceOp;
use rayon::prelude::*;

/// Sum with 8 independent accumulators so the loop vectorises and rounding error grows slower.
#[inline]
pub fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in rem {
        s += v;
    }
    s
}

/// Maximum, ignoring NaN (-inf for an empty or all-NaN slice). Sixteen independent accumulators and a
/// compare-select (rather than `f32::max`, whose NaN rule the compiler will not vectorise) make this a
/// vector max loop.
#[inline]
pub fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let (chunks, rem) = x.as_chunks::<16>();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            // A NaN `v` compares false and leaves the accumulator alone.
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(rem)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[inline]
fn min_f32(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::INFINITY, f32::min)
}

/// Index of the first maximum (NaN compares as smaller than everything).
#[inline]
pub fn argmax_f32(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Applies `f` to each row of length `r`, in parallel when the input is large.
pub fn rows<T: Send + Copy + Default>(
    x: &[f32],
    r: usize,
    f: impl Fn(&[f32]) -> T + Sync + Send,
) -> Vec<T> {
    if r == 0 {
        return Vec::new();
    }
    if x.len() >= PAR_THRESHOLD {
        x.par_chunks(r).map(&f).collect()
    } else {
        x.chunks(r).map(f).collect()
    }
}

/// Reduces each contiguous row of length `r` (r may be 0: sums of nothing are 0, max/min of nothing are ∓inf).
pub fn reduce_rows(x: &[f32], n_rows: usize, r: usize, op: ReduceOp) -> Vec<f32> {
    if r == 0 {
        let v = match op {
            ReduceOp::Sum => 0.0,
            ReduceOp::Max => f32::NEG_INFINITY,
            ReduceOp::Min => f32::INFINITY,
        };
        return vec![v; n_rows];
    }
    match op {
        ReduceOp::Sum => rows(x, r, sum_f32),
        ReduceOp::Max => rows(x, r, max_f32),
        ReduceOp::Min => rows(x, r, min_f32),
    }
}

pub fn argmax_rows(x: &[f32], r: usize) -> Vec<i32> {
    rows(x, r, |row| argmax_f32(row) as i32)
}

pub fn argmin_rows(x: &[f32], r: usize) -> Vec<i32> {
    rows(x, r, |row| {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v < row[best] {
                best = i;
            }
        }
        best as i32
    })
}
