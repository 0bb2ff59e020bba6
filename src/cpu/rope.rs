//! Rotary position embedding over [batch, heads, seq, head_dim] rows.

use rayon::prelude::*;

/// Rotates each head_dim row of `x` [b, h, s, d] by the angle table at its position. `cos`/`sin` are
/// [max_pos, d/2]; `positions` is [s] (shared by the batch) or [b, s]. `interleaved` pairs (2i, 2i+1),
/// otherwise (i, i + d/2). `sign` −1 rotates backwards (the gradient).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &[f32],
    (b, h, s, d): (usize, usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    positions: &[i64],
    interleaved: bool,
    sign: f32,
) -> Vec<f32> {
    let half = d / 2;
    let mut out = vec![0f32; x.len()];
    if d == 0 {
        return out;
    }
    let per_batch = positions.len() == b * s;
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (bi, si) = (row / (h * s), row % s);
        let pos = positions[if per_batch { bi * s + si } else { si }] as usize;
        let (c, sn) = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        let xr = &x[row * d..(row + 1) * d];
        for i in 0..half {
            let (i0, i1) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (a, bb) = (xr[i0], xr[i1]);
            let sn = sign * sn[i];
            o[i0] = a * c[i] - bb * sn;
            o[i1] = bb * c[i] + a * sn;
        }
    });
    out
}
