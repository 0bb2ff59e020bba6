//! LayerNorm and RMSNorm over the last dim of contiguous rows, forward and backward. Statistics are
//! accumulated in f64 so long rows of large values keep their precision.

use rayon::prelude::*;

/// Per-row statistics saved for backward: mean (0 for RMSNorm) and 1/σ.
pub struct NormStats {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

fn stats(x: &[f32], d: usize, eps: f32, centre: bool) -> NormStats {
    let row_stats = |row: &[f32]| {
        let mean = if centre {
            row.iter().map(|&v| v as f64).sum::<f64>() / d as f64
        } else {
            0.0
        };
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
    };
    let pairs: Vec<(f32, f32)> = if x.len() >= super::PAR_THRESHOLD {
        x.par_chunks(d).map(row_stats).collect()
    } else {
        x.chunks(d).map(row_stats).collect()
    };
    let (mean, rstd) = pairs.into_iter().unzip();
    NormStats { mean, rstd }
}

/// y = (x − mean)·rstd ⊙ w + b (RMSNorm: `centre` false, no mean subtraction).
pub fn norm_forward(
    x: &[f32],
    d: usize,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f32,
    centre: bool,
) -> (Vec<f32>, NormStats) {
    if d == 0 {
        let empty = NormStats {
            mean: Vec::new(),
            rstd: Vec::new(),
        };
        return (Vec::new(), empty);
    }
    let st = stats(x, d, eps, centre);
    let mut out = vec![0f32; x.len()];
    let body = |(r, o): (usize, &mut [f32])| {
        let row = &x[r * d..(r + 1) * d];
        let (m, s) = (st.mean[r], st.rstd[r]);
        for j in 0..d {
            let mut v = (row[j] - m) * s;
            if let Some(w) = w {
                v *= w[j];
            }
            if let Some(b) = b {
                v += b[j];
            }
            o[j] = v;
        }
    };
    if d > 0 {
        if x.len() >= super::PAR_THRESHOLD {
            out.par_chunks_mut(d).enumerate().for_each(body);
        } else {
            out.chunks_mut(d).enumerate().for_each(body);
        }
    }
    (out, st)
}

/// Gradients (dx, dw, db) of `norm_forward`. dw/db are summed over rows.
pub fn norm_backward(
    x: &[f32],
    g: &[f32],
    d: usize,
    w: Option<&[f32]>,
    st: &NormStats,
    centre: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    if d == 0 {
        return (dx, vec![], vec![]);
    }
    let row_grad = |(r, o): (usize, &mut [f32])| {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let (m, s) = (st.mean[r], st.rstd[r]);
        let (mut mean_dxhat, mut mean_dxhat_xhat) = (0f64, 0f64);
        for j in 0..d {
            let xhat = (xr[j] - m) * s;
            let dxhat = gr[j] * w.map_or(1.0, |w| w[j]);
            mean_dxhat += dxhat as f64;
            mean_dxhat_xhat += (dxhat * xhat) as f64;
        }
        let (a, c) = (
            (mean_dxhat / d as f64) as f32,
            (mean_dxhat_xhat / d as f64) as f32,
        );
        let a = if centre { a } else { 0.0 };
        for j in 0..d {
            let xhat = (xr[j] - m) * s;
            let dxhat = gr[j] * w.map_or(1.0, |w| w[j]);
            o[j] = s * (dxhat - a - xhat * c);
        }
    };
    if x.len() >= super::PAR_THRESHOLD {
        dx.par_chunks_mut(d).enumerate().for_each(row_grad);
    } else {
        dx.chunks_mut(d).enumerate().for_each(row_grad);
    }
    let rows = x.len() / d;
    let partial = |range: std::ops::Range<usize>| {
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        for r in range {
            let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            for j in 0..d {
                dw[j] += gr[j] * (xr[j] - st.mean[r]) * st.rstd[r];
                db[j] += gr[j];
            }
        }
        (dw, db)
    };
    let chunk = rows.div_ceil(rayon::current_num_threads()).max(64);
    let (dw, db) = (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|c| partial(c * chunk..((c + 1) * chunk).min(rows)))
        .reduce(
            || (vec![0f32; d], vec![0f32; d]),
            |(mut a, mut b), (c, e)| {
                a.iter_mut().zip(&c).for_each(|(x, y)| *x += y);
                b.iter_mut().zip(&e).for_each(|(x, y)| *x += y);
                (a, b)
            },
        );
    (dx, dw, db)
}
