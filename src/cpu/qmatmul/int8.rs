//! Int8 weights (codes −127..127, one scale per group of 32, 64 or 128 or per row), and the kernels
//! they share with int4 weights: both are integer codes times a scale (+ a min for asymmetric int4), so
//! one segmented integer dot product and one f32 path serve both; only fetching a weight vector differs.
//!
//! # Int8 activations
//! Each group's Σ c·x is exact in integers; its f32 scale applies once per group.
//! - An i32 accumulator covers one *segment*: one group when a group fills whole vectors, one 64-byte
//!   vector holding two 32-weight groups in its lane halves (group 32 on AVX-512), or `SEG_COLS`
//!   columns for per-row scales. Its lanes then enter f32 as cvt(acc)·scale. A segment's lane sums at
//!   most 4096/8 = 512 products of |c·x| ≤ 127·128, so it neither overflows i32 nor loses bits in f32
//!   (< 2²⁴) for any K.
//! - The dot instructions multiply u8 by s8, so stored weights that are not plain unsigned codes are
//!   made so, and the surplus is removed through a per-token *bias*: before the rows, each token's
//!   activations are reduced into one vector per segment whose lane j holds −f × the activations lane j
//!   multiplies, and the segment's accumulator starts from it. Int4 nibbles are u = c + 8 (f = 8; zero
//!   for asymmetric nibbles, whose min·Σx is one f32 dot per row with the token's group sums); VNNI
//!   flips an int8 code to c + 128 by xor 0x80 (f = 128). The flip costs one op per weight vector and the
//!   bias is per token, not per row.
//! - Without VNNI, int8 × int8 uses `vpmaddubsw`, whose i16 pair sums saturate: c + 128 would reach
//!   2·255·127 > 32767. So the operands are |x| (≤ 128, −128 included) and c·sign(x) (|c| ≤ 127): pair
//!   sums are at most 2·128·127 = 32512, and no bias is needed. Int4 nibbles are small enough as they
//!   are (2·15·128).
//! - With several tokens each weight vector, once fetched, serves `TB` tokens (4, or 2 on AVX2); rows go in
//!   tiles (see `for_tiles`) so that the next token group rereads them from cache.
//!
//! # f32 activations
//! Each 16 (AVX-512) or 8 (AVX2) codes are widened to f32 and dequantized as fma(code, s, offset), the
//! offset being −8s for symmetric nibbles (exactly s·c), the min for asymmetric ones and 0 for int8, then
//! multiplied by every token of the group. Activations are first copied into zero-padded rows so that
//! only whole blocks are read.
//!
//! # Bounds
//! Packed rows are whole 64-byte blocks; int8 activation rows are padded with zeros to a multiple of 256
//! weights (at least one per packed weight) and f32 rows are padded here, so every vector load reads
//! inside its slice. Padding weights are code 0 (nibble 8 or 0), and padding activations are 0. Kernels
//! borrow fixed-size arrays of the slices; the only `unsafe` is the load from such an array.

use std::ops::Range;

use super::{Int8Acts, PackedWeights, QIsa};
use crate::quant::format::{Group, QFormat};

/// Columns whose products one i32 lane set accumulates, at most, before they move into f32.
pub(super) const SEG_COLS: usize = 4096;

/// Weight bytes per row tile.
const TILE_BYTES: usize = 32 * 1024;

/// The format parameter of the shared kernels: int4 nibbles.
pub(super) const INT4: u8 = 4;
/// The format parameter of the shared kernels: int8 bytes.
pub(super) const INT8: u8 = 8;

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
    shared_f32::<INT8>(w, x, m, rows, t, isa, int8_codes);
}

/// y[i, r] for per-token int8 activations and weight rows `rows`, into `t` (t[(r − rows.start)·m + i]).
pub fn matmul_i8(w: &PackedWeights, acts: &Int8Acts, rows: Range<usize>, t: &mut [f32], isa: QIsa) {
    shared_i8::<INT8>(w, acts, rows, t, isa, int8_codes);
}

/// Dequantizes weight rows `rows` into `out` (`rows.len() · cols`): scale · code.
pub fn dequantize_rows(w: &PackedWeights, rows: Range<usize>, out: &mut [f32]) {
    dequantize_rows_with_isa(w, rows, out, QIsa::best());
}

/// [`dequantize_rows`] on an explicit instruction set (tests).
pub fn dequantize_rows_with_isa(w: &PackedWeights, rows: Range<usize>, out: &mut [f32], isa: QIsa) {
    shared_dequantize::<INT8>(w, rows, out, isa, int8_codes);
}

/// The codes of one packed int8 row.
fn int8_codes(row: &[u8], out: &mut [i8]) {
    for (o, &b) in out.iter_mut().zip(row) {
        *o = b as i8;
    }
}

/// [`matmul_f32`] for int4 (`FMT = INT4`, nibbles unpacked by `codes` for the portable path) or int8.
pub(super) fn shared_f32<const FMT: u8>(
    w: &PackedWeights,
    x: &[f32],
    m: usize,
    rows: Range<usize>,
    t: &mut [f32],
    isa: QIsa,
    codes: fn(&[u8], &mut [i8]),
) {
    check(w, rows.clone(), m, t, isa);
    assert!(x.len() >= m * w.cols);
    if w.cols == 0 {
        t.fill(0.0);
        return;
    }
    let xp = pad_f32(x, m, w.cols, row_weights(w));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists the AVX-512 ISAs only
        // where AVX-512 F/BW/VL were detected.
        QIsa::Avx512Vnni | QIsa::Avx512 => unsafe {
            x86::avx512::int_f32::<FMT>(w, &xp, m, rows, t)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::avx2::int_f32::<FMT>(w, &xp, m, rows, t) },
        _ => portable_f32(w, &xp, m, rows, t, codes),
    }
}

/// [`matmul_i8`] for int4 (`FMT = INT4`) or int8.
pub(super) fn shared_i8<const FMT: u8>(
    w: &PackedWeights,
    acts: &Int8Acts,
    rows: Range<usize>,
    t: &mut [f32],
    isa: QIsa,
    codes: fn(&[u8], &mut [i8]),
) {
    check(w, rows.clone(), acts.m, t, isa);
    assert!(acts.cols == w.cols && acts.padded >= row_weights(w));
    if w.cols == 0 {
        t.fill(0.0);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists Avx512Vnni only where
        // AVX-512 F/BW/VL and VNNI were detected.
        QIsa::Avx512Vnni => unsafe { x86::vnni::int_i8::<FMT>(w, acts, rows, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx512 is listed only where AVX-512 F/BW/VL were detected.
        QIsa::Avx512 => unsafe { x86::bw512::int_i8::<FMT>(w, acts, rows, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::avx2::int_i8::<FMT>(w, acts, rows, t) },
        _ => portable_i8(w, acts, rows, t, codes),
    }
}

/// [`dequantize_rows_with_isa`] for int4 (`FMT = INT4`) or int8.
pub(super) fn shared_dequantize<const FMT: u8>(
    w: &PackedWeights,
    rows: Range<usize>,
    out: &mut [f32],
    isa: QIsa,
    codes: fn(&[u8], &mut [i8]),
) {
    assert!(
        QIsa::available().contains(&isa),
        "this CPU cannot run {isa:?}"
    );
    assert!(rows.end <= w.rows && out.len() == rows.len() * w.cols);
    if w.cols == 0 {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is in `QIsa::available()` (asserted above), which lists the AVX-512 ISAs only where
        // AVX-512 F/BW/VL were detected.
        QIsa::Avx512Vnni | QIsa::Avx512 => unsafe { x86::avx512::dequantize::<FMT>(w, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::avx2::dequantize::<FMT>(w, rows, out) },
        _ => {
            let mut c = vec![0i8; row_weights(w)];
            for (r, o) in rows.zip(out.chunks_exact_mut(w.cols)) {
                codes(w.row(r), &mut c);
                for (gi, (o, c)) in o
                    .chunks_mut(w.group_size())
                    .zip(c.chunks(w.group_size()))
                    .enumerate()
                {
                    let (s, min) = scale_min(w, r, gi);
                    for (o, &c) in o.iter_mut().zip(c) {
                        *o = s * f32::from(c) + min;
                    }
                }
            }
        }
    }
}

/// Weights per packed row, padding included.
pub(super) fn row_weights(w: &PackedWeights) -> usize {
    w.row_bytes() / w.format.block_bytes() * w.format.block_weights()
}

/// The kernels' group-size parameter: the group, or 0 for one scale per row.
fn group_param(format: QFormat) -> usize {
    match format {
        QFormat::Int4 {
            group: Group::Size(g),
            ..
        }
        | QFormat::Int8 {
            group: Group::Size(g),
        } => g,
        _ => 0,
    }
}

/// Scale and min (0 without mins) of group `gi` of row `r`.
fn scale_min(w: &PackedWeights, r: usize, gi: usize) -> (f32, f32) {
    let i = r * w.groups_per_row() + gi;
    (w.scales[i], w.mins.get(i).copied().unwrap_or(0.0))
}

/// The checks every kernel here relies on: `isa` runs on this CPU (which the `unsafe` dispatch needs),
/// and the shapes agree (loads go through bounds-checked slices, so these turn a misuse into a clear
/// panic rather than guard memory).
pub(super) fn check(w: &PackedWeights, rows: Range<usize>, m: usize, t: &[f32], isa: QIsa) {
    assert!(
        QIsa::available().contains(&isa),
        "this CPU cannot run {isa:?}"
    );
    let groups = w.rows * w.groups_per_row();
    assert!(
        rows.end <= w.rows && w.data.len() >= w.rows * w.row_bytes() && w.scales.len() >= groups
    );
    assert!(w.mins.is_empty() || w.mins.len() >= groups);
    assert_eq!(t.len(), rows.len() * m);
}

/// The tokens of `x` (`m · cols`) each zero-padded to `len` columns.
pub(super) fn pad_f32(x: &[f32], m: usize, cols: usize, len: usize) -> Vec<f32> {
    let mut xp = vec![0f32; m * len];
    for (d, s) in xp.chunks_exact_mut(len).zip(x.chunks_exact(cols)) {
        d[..cols].copy_from_slice(s);
    }
    xp
}

/// Calls `f(r, i0, n)` for every weight row r of `rows` and every group of `n ≤ tb` tokens from i0:
/// rows in tiles of about `TILE_BYTES`, each tile walked once per token group, so only the first
/// group reads a row from memory and the others find it in L1/L2.
#[inline(always)]
pub(super) fn for_tiles(
    rows: Range<usize>,
    m: usize,
    row_bytes: usize,
    tb: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let tile = (TILE_BYTES / row_bytes.max(1)).max(1);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + tile).min(rows.end);
        for i0 in (0..m).step_by(tb) {
            for r in r0..r1 {
                f(r, i0, tb.min(m - i0));
            }
        }
        r0 = r1;
    }
}

/// `a` in the first entries of an `N`-array: the results of a token group smaller than the largest.
#[inline(always)]
fn first<const T: usize, const N: usize>(a: [f32; T]) -> [f32; N] {
    let mut out = [0f32; N];
    for (o, v) in out.iter_mut().zip(a) {
        *o = v;
    }
    out
}

/// Piece `i` of `N` elements of an array; with a constant `i` the bounds check folds away.
#[inline(always)]
pub(super) fn part<T, const N: usize, const M: usize>(a: &[T; M], i: usize) -> &[T; N] {
    a[N * i..N * (i + 1)]
        .try_into()
        .expect("the piece lies inside the array")
}

/// Mutable [`part`].
#[inline(always)]
pub(super) fn part_mut<T, const N: usize, const M: usize>(a: &mut [T; M], i: usize) -> &mut [T; N] {
    (&mut a[N * i..N * (i + 1)])
        .try_into()
        .expect("the piece lies inside the array")
}

fn portable_f32(
    w: &PackedWeights,
    xp: &[f32],
    m: usize,
    rows: Range<usize>,
    t: &mut [f32],
    codes: fn(&[u8], &mut [i8]),
) {
    let (len, g) = (row_weights(w), w.group_size());
    let mut c = vec![0i8; len];
    let mut wf = vec![0f32; w.cols];
    for (r, tr) in rows.zip(t.chunks_exact_mut(m)) {
        codes(w.row(r), &mut c);
        for (gi, (wf, c)) in wf.chunks_mut(g).zip(c.chunks(g)).enumerate() {
            let (s, min) = scale_min(w, r, gi);
            for (wf, &c) in wf.iter_mut().zip(c) {
                *wf = s * f32::from(c) + min;
            }
        }
        for (y, x) in tr.iter_mut().zip(xp.chunks_exact(len)) {
            *y = wf.iter().zip(x).map(|(&w, &x)| w * x).sum();
        }
    }
}

fn portable_i8(
    w: &PackedWeights,
    acts: &Int8Acts,
    rows: Range<usize>,
    t: &mut [f32],
    codes: fn(&[u8], &mut [i8]),
) {
    let (g, m) = (w.group_size(), acts.m);
    let mut c = vec![0i8; row_weights(w)];
    for (r, tr) in rows.zip(t.chunks_exact_mut(m)) {
        codes(w.row(r), &mut c);
        for (i, y) in tr.iter_mut().enumerate() {
            let x = acts.row(i);
            let mut sum = 0f32;
            for (gi, (c, x)) in c[..w.cols].chunks(g).zip(x.chunks(g)).enumerate() {
                // i32 per SEG_COLS columns (4096·127·128 < 2³¹), exact in i64 across them.
                let (mut dot, mut xs) = (0i64, 0i64);
                for (c, x) in c.chunks(SEG_COLS).zip(x.chunks(SEG_COLS)) {
                    let d: i32 = c
                        .iter()
                        .zip(x)
                        .map(|(&c, &x)| i32::from(c) * i32::from(x))
                        .sum();
                    dot += i64::from(d);
                    xs += i64::from(x.iter().map(|&x| i32::from(x)).sum::<i32>());
                }
                let (s, min) = scale_min(w, r, gi);
                sum += s * dot as f32 + min * xs as f32;
            }
            *y = sum * acts.scales[i];
        }
    }
}

/// The x86 kernels: one module of primitives per register width and dot-product instruction, each
/// exporting the same names (`I`, `F`, `W`, `L`, `TB`, `dot`, …), and the kernels written once as
/// macros expanded in each module, where they compile with its target features and call its
/// primitives (`#[inline]` target-feature functions, which inline into them).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    /// The int8-activation kernel (see the module docs of `int8`).
    macro_rules! int_i8_kernel {
        ($features:literal) => {
            /// Int4 (`FMT = INT4`) or int8 weights × int8 activations, rows `rows` into `t`.
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul) fn int_i8<const FMT: u8>(
                w: &PackedWeights,
                acts: &Int8Acts,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                match group_param(w.format) {
                    32 => int_i8_g::<FMT, 32>(w, acts, rows, t),
                    64 => int_i8_g::<FMT, 64>(w, acts, rows, t),
                    128 => int_i8_g::<FMT, 128>(w, acts, rows, t),
                    _ => int_i8_g::<FMT, 0>(w, acts, rows, t),
                }
            }

            /// Columns per segment for group `G` (0: per row).
            const fn seg_cols<const G: usize>() -> usize {
                if G == 0 {
                    SEG_COLS
                } else if G > W {
                    G
                } else {
                    W
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn int_i8_g<const FMT: u8, const G: usize>(
                w: &PackedWeights,
                acts: &Int8Acts,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                let (m, gpr, r0) = (acts.m, w.groups_per_row(), rows.start);
                let (nb, vpt, nvb, vps) = (
                    w.row_bytes() / 64,
                    Shape::<FMT, G>::VPT,
                    Shape::<FMT, G>::NVB,
                    Shape::<FMT, G>::VPS,
                );
                let nseg_b = Shape::<FMT, G>::spanning_segments(nb);
                let f = match (FMT, w.mins.is_empty()) {
                    (INT4, true) => 8,
                    (INT4, false) => 0,
                    _ => X_BIAS,
                };
                // Activations as the row kernels walk them, per group of TB tokens: for each block, for
                // each token, the block's x vectors and then (segments within blocks) its segment biases.
                // Biases of segments that span blocks go to `sbias`, [token][segment].
                let per_token = nb * vpt;
                let mut xbuf = vec![izero(); m * per_token];
                let mut sbias = vec![izero(); m * nseg_b];
                let bias = |xs: &[[i8; W]]| {
                    let sum = xs
                        .iter()
                        .fold(izero(), |a, x| dot(a, splat_u8(f), load_i8(x)));
                    neg_i(sum)
                };
                for i0 in (0..m).step_by(TB) {
                    let n = TB.min(m - i0);
                    let group = &mut xbuf[i0 * per_token..(i0 + n) * per_token];
                    for (b, chunk) in group.chunks_exact_mut(n * vpt).enumerate() {
                        for (k, slot) in chunk.chunks_exact_mut(vpt).enumerate() {
                            let xv = &acts.row(i0 + k).as_chunks::<W>().0[b * nvb..(b + 1) * nvb];
                            let (xs, bs) = slot.split_at_mut(nvb);
                            for (d, x) in xs.iter_mut().zip(xv) {
                                *d = load_i8(x);
                            }
                            if f != 0 {
                                for (d, xs) in bs.iter_mut().zip(xv.chunks(vps)) {
                                    *d = bias(xs);
                                }
                            }
                        }
                    }
                }
                if f != 0 {
                    for (i, sb) in sbias.chunks_exact_mut(nseg_b.max(1)).enumerate() {
                        let xv = &acts.row(i).as_chunks::<W>().0[..nb * nvb];
                        for (d, xs) in sb.iter_mut().zip(xv.chunks(vps)) {
                            *d = bias(xs);
                        }
                    }
                }
                // Per-token Σx of each group, for the min·Σx of asymmetric weights.
                let mut gsum = vec![0f32; if w.mins.is_empty() { 0 } else { m * gpr }];
                for (i, gs) in gsum.chunks_exact_mut(gpr.max(1)).enumerate() {
                    let g = if G == 0 { acts.padded } else { G };
                    for (s, xg) in gs.iter_mut().zip(acts.row(i).chunks(g)) {
                        *s = xg.iter().map(|&v| i32::from(v)).sum::<i32>() as f32;
                    }
                }
                for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                    let wr = w.row(r).as_chunks::<64>().0;
                    let sc = &w.scales[r * gpr..(r + 1) * gpr];
                    let xb = &xbuf[i0 * per_token..(i0 + n) * per_token];
                    let sb = &sbias[i0 * nseg_b..(i0 + n) * nseg_b];
                    let dots: [f32; TB] = match n {
                        1 => first(int_row::<FMT, G, 1>(wr, sc, xb, sb)),
                        2 => first(int_row::<FMT, G, 2>(wr, sc, xb, sb)),
                        3 => first(int_row::<FMT, G, 3>(wr, sc, xb, sb)),
                        _ => int_row::<FMT, G, TB>(wr, sc, xb, sb),
                    };
                    for (k, &d) in dots[..n].iter().enumerate() {
                        let i = i0 + k;
                        let min_term = if w.mins.is_empty() {
                            0.0
                        } else {
                            fdot(
                                &w.mins[r * gpr..(r + 1) * gpr],
                                &gsum[i * gpr..(i + 1) * gpr],
                            )
                        };
                        t[(r - r0) * m + i] = (d + min_term) * acts.scales[i];
                    }
                });
            }

            /// How a packed row of format `FMT` and group `G` splits into blocks and segments (see the
            /// module docs), as constants so that the row loops unroll.
            struct Shape<const FMT: u8, const G: usize>;

            impl<const FMT: u8, const G: usize> Shape<FMT, G> {
                /// Weights per 64-byte block: 128 (int4) or 64 (int8).
                const BW: usize = if FMT == INT4 { 128 } else { 64 };
                /// Columns per segment.
                const SEG: usize = seg_cols::<G>();
                /// Vectors per block.
                const NVB: usize = Self::BW / W;
                /// Vectors per segment.
                const VPS: usize = Self::SEG / W;
                /// Segments per block (0 when segments span blocks).
                const SPB: usize = if Self::SEG <= Self::BW {
                    Self::BW / Self::SEG
                } else {
                    0
                };
                /// Vectors per token and block in the interleaved activations: x, then segment biases.
                const VPT: usize = Self::NVB + Self::SPB;

                /// Segments per row of `nb` blocks when they span blocks (0 otherwise).
                fn spanning_segments(nb: usize) -> usize {
                    if Self::SPB == 0 {
                        nb.div_ceil(Self::SEG / Self::BW)
                    } else {
                        0
                    }
                }
            }

            /// Σ_segments scale · Σ (code·x) of one row (blocks `wr`, scales `sc`) with `T` tokens: `xb` is
            /// their interleaved activations, `sb` their biases of segments spanning blocks.
            #[target_feature(enable = $features)]
            #[inline]
            fn int_row<const FMT: u8, const G: usize, const T: usize>(
                wr: &[[u8; 64]],
                sc: &[f32],
                xb: &[I],
                sb: &[I],
            ) -> [f32; T] {
                let (nvb, vps, spb, vpt) = (
                    Shape::<FMT, G>::NVB,
                    Shape::<FMT, G>::VPS,
                    Shape::<FMT, G>::SPB,
                    Shape::<FMT, G>::VPT,
                );
                let mut facc = [fzero(); T];
                if spb > 0 {
                    // Segments within blocks: block b has the `per_block` scales b·per_block.., except
                    // that the last block may lack groups (padding, with zero activations and biases).
                    let per_block = Shape::<FMT, G>::BW / G;
                    let full = (sc.len() / per_block).min(wr.len());
                    let mut tail = [0f32; 4];
                    for (t, &s) in tail.iter_mut().zip(&sc[full * per_block..]) {
                        *t = s;
                    }
                    let scales = sc
                        .chunks_exact(per_block)
                        .take(full)
                        .chain((full < wr.len()).then_some(&tail[..per_block]));
                    for ((blk, sb), tb) in wr.iter().zip(scales).zip(xb.chunks_exact(T * vpt)) {
                        let u = unpack::<FMT>(blk);
                        for s in 0..spb {
                            let scale = if G < W {
                                halves(sb[2 * s], sb[2 * s + 1])
                            } else {
                                splat(sb[s])
                            };
                            for (f, tk) in facc.iter_mut().zip(tb.chunks_exact(vpt)) {
                                let mut acc = tk[nvb + s];
                                for v in s * vps..(s + 1) * vps {
                                    acc = mac::<FMT>(acc, u[v], tk[v]);
                                }
                                *f = cvt_fmadd(*f, acc, scale);
                            }
                        }
                    }
                } else {
                    // Segments spanning blocks (per-row scales, or int8 groups of 128).
                    let bps = vps / nvb;
                    let nseg_b = Shape::<FMT, G>::spanning_segments(wr.len());
                    let s0 = splat(sc[0]);
                    for (sg, (wseg, tseg)) in
                        wr.chunks(bps).zip(xb.chunks(bps * T * vpt)).enumerate()
                    {
                        let scale = if G == 0 { s0 } else { splat(sc[sg]) };
                        // Two accumulators per token where a block has two vectors or more.
                        let mut acc: [[I; 2]; T] =
                            std::array::from_fn(|k| [sb[k * nseg_b + sg], izero()]);
                        for (blk, tb) in wseg.iter().zip(tseg.chunks_exact(T * vpt)) {
                            let u = unpack::<FMT>(blk);
                            for (a, tk) in acc.iter_mut().zip(tb.chunks_exact(vpt)) {
                                for v in 0..nvb {
                                    a[v % 2] = mac::<FMT>(a[v % 2], u[v], tk[v]);
                                }
                            }
                        }
                        for (f, a) in facc.iter_mut().zip(&acc) {
                            *f = cvt_fmadd(*f, add_i(a[0], a[1]), scale);
                        }
                    }
                }
                facc.map(|f| hsum_f(f))
            }

            /// The weight vectors of a 64-byte block in weight order, as `mac` takes them (the first
            /// 128 / W for int4 nibbles, 64 / W for int8 codes).
            #[target_feature(enable = $features)]
            #[inline]
            fn unpack<const FMT: u8>(blk: &[u8; 64]) -> [I; 4] {
                if FMT == INT4 {
                    nibbles(blk)
                } else {
                    let mut u = [izero(); 4];
                    for (v, u) in u.iter_mut().enumerate().take(64 / W) {
                        *u = prep(load(part(blk, v)));
                    }
                    u
                }
            }

            /// acc + the lane-wise dot product of weight vector `p` (from `unpack`) and activations `x`.
            #[target_feature(enable = $features)]
            #[inline]
            fn mac<const FMT: u8>(acc: I, p: I, x: I) -> I {
                if FMT == INT4 {
                    dot(acc, p, x)
                } else {
                    sdot(acc, p, x)
                }
            }

            /// Σ a·b.
            #[target_feature(enable = $features)]
            #[inline]
            fn fdot(a: &[f32], b: &[f32]) -> f32 {
                let (ac, at) = a.as_chunks::<L>();
                let (bc, bt) = b.as_chunks::<L>();
                let v = ac
                    .iter()
                    .zip(bc)
                    .fold(fzero(), |s, (a, b)| fmadd(loadf(a), loadf(b), s));
                hsum_f(v) + at.iter().zip(bt).map(|(a, b)| a * b).sum::<f32>()
            }
        };
    }

    /// The f32-activation kernel and dequantization.
    macro_rules! int_f32_kernel {
        ($features:literal) => {
            /// Int4 (`FMT = INT4`) or int8 weights × f32 activations `xp` (`m` tokens, each zero-padded to
            /// the packed row's weights), rows `rows` into `t`.
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul) fn int_f32<const FMT: u8>(
                w: &PackedWeights,
                xp: &[f32],
                m: usize,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                match group_param(w.format) {
                    32 => int_f32_g::<FMT, 32>(w, xp, m, rows, t),
                    64 => int_f32_g::<FMT, 64>(w, xp, m, rows, t),
                    128 => int_f32_g::<FMT, 128>(w, xp, m, rows, t),
                    _ => int_f32_g::<FMT, 0>(w, xp, m, rows, t),
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn int_f32_g<const FMT: u8, const G: usize>(
                w: &PackedWeights,
                xp: &[f32],
                m: usize,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                let (len, r0) = (row_weights(w), rows.start);
                for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                    let deq = Deq::<FMT, G>::new(w, r);
                    let xs = |k: usize| xp[(i0 + k) * len..(i0 + k + 1) * len].as_chunks::<L>().0;
                    let dots: [f32; TB] = match n {
                        1 => first(f32_row::<FMT, G, 1>(&deq, std::array::from_fn(xs))),
                        2 => first(f32_row::<FMT, G, 2>(&deq, std::array::from_fn(xs))),
                        3 => first(f32_row::<FMT, G, 3>(&deq, std::array::from_fn(xs))),
                        _ => f32_row::<FMT, G, TB>(&deq, std::array::from_fn(xs)),
                    };
                    t[(r - r0) * m + i0..(r - r0) * m + i0 + n].copy_from_slice(&dots[..n]);
                });
            }

            /// One packed row and its per-group scales and offsets.
            struct Deq<'a, const FMT: u8, const G: usize> {
                blocks: &'a [[u8; 64]],
                scales: &'a [f32],
                /// Asymmetric mins, or None for the offset −8·s (int4) or 0 (int8).
                mins: Option<&'a [f32]>,
            }

            impl<'a, const FMT: u8, const G: usize> Deq<'a, FMT, G> {
                /// Weights per 64-byte block.
                const BLOCK: usize = if FMT == INT4 { 128 } else { 64 };

                fn new(w: &'a PackedWeights, r: usize) -> Self {
                    let gpr = w.groups_per_row();
                    let span = r * gpr..(r + 1) * gpr;
                    Deq {
                        blocks: w.row(r).as_chunks::<64>().0,
                        scales: &w.scales[span.clone()],
                        mins: (!w.mins.is_empty()).then(|| &w.mins[span]),
                    }
                }

                /// Scale and offset vectors of the groups of block `b`, in order (up to 4). Groups past
                /// the last are padding (times zero activations) and take the last one's.
                #[target_feature(enable = $features)]
                #[inline]
                fn block_scales(&self, b: usize) -> ([F; 4], [F; 4]) {
                    let per_block = if G == 0 { 1 } else { Self::BLOCK.div_ceil(G) };
                    let g0 = if G == 0 { 0 } else { b * Self::BLOCK / G };
                    let last = self.scales.len() - 1;
                    let mut sv = [fzero(); 4];
                    let mut ov = [fzero(); 4];
                    for (i, (sv, ov)) in sv.iter_mut().zip(&mut ov).enumerate().take(per_block) {
                        let gi = (g0 + i).min(last);
                        let s = self.scales[gi];
                        let off = match (self.mins, FMT) {
                            (Some(mins), _) => mins[gi],
                            (None, INT4) => -8.0 * s,
                            (None, _) => 0.0,
                        };
                        (*sv, *ov) = (splat(s), splat(off));
                    }
                    (sv, ov)
                }

                /// Calls `f(j, weights)` for the `L`-weight chunks j of block `b` (chunk j holds weights
                /// `L·j..L·(j + 1)` of the block), each code dequantized as fma(code, s, offset).
                #[target_feature(enable = $features)]
                #[inline]
                fn block(&self, b: usize, mut f: impl FnMut(usize, F)) {
                    let blk = &self.blocks[b];
                    let (sv, ov) = self.block_scales(b);
                    // A block holds whole groups, or lies inside one (int8, G = 128; per-row scales).
                    let group = |k: usize| if G == 0 || G > Self::BLOCK { 0 } else { k / G };
                    let deq = |c: I, k: usize| fmadd(to_f32(c), sv[group(k)], ov[group(k)]);
                    for j in 0..64 / L {
                        if FMT == INT4 {
                            // One load widens the low nibbles of chunk j and the high ones of
                            // chunk j + 64/L.
                            let v = widen_u8(part(blk, j));
                            f(j, deq(low_nibble(v), L * j));
                            f(64 / L + j, deq(high_nibble(v), 64 + L * j));
                        } else {
                            f(j, deq(widen_i8(part(blk, j)), L * j));
                        }
                    }
                }
            }

            /// Σ w·x of one row with `T` tokens.
            #[target_feature(enable = $features)]
            #[inline]
            fn f32_row<const FMT: u8, const G: usize, const T: usize>(
                deq: &Deq<FMT, G>,
                xs: [&[[f32; L]]; T],
            ) -> [f32; T] {
                let per_block = Deq::<FMT, G>::BLOCK / L;
                // Four chains per token to hide the FMA latency.
                let mut acc = [[fzero(); 4]; T];
                for b in 0..deq.blocks.len() {
                    deq.block(b, |j, wv| {
                        for (a, x) in acc.iter_mut().zip(&xs) {
                            a[j % 4] = fmadd(wv, loadf(&x[b * per_block + j]), a[j % 4]);
                        }
                    });
                }
                acc.map(|a| hsum_f(add_f(add_f(a[0], a[1]), add_f(a[2], a[3]))))
            }

            /// Dequantizes rows `rows` into `out` (`rows.len() · cols`).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul) fn dequantize<const FMT: u8>(
                w: &PackedWeights,
                rows: Range<usize>,
                out: &mut [f32],
            ) {
                match group_param(w.format) {
                    32 => dequantize_g::<FMT, 32>(w, rows, out),
                    64 => dequantize_g::<FMT, 64>(w, rows, out),
                    128 => dequantize_g::<FMT, 128>(w, rows, out),
                    _ => dequantize_g::<FMT, 0>(w, rows, out),
                }
            }

            #[target_feature(enable = $features)]
            #[inline]
            fn dequantize_g<const FMT: u8, const G: usize>(
                w: &PackedWeights,
                rows: Range<usize>,
                out: &mut [f32],
            ) {
                let block = Deq::<FMT, G>::BLOCK;
                for (r, o) in rows.zip(out.chunks_exact_mut(w.cols)) {
                    let deq = Deq::<FMT, G>::new(w, r);
                    let (full, tail) = o.as_chunks_mut::<L>();
                    let mut buf = [[0f32; L]; 128 / L];
                    for b in 0..deq.blocks.len() {
                        let c0 = b * block / L;
                        if c0 + block / L <= full.len() {
                            deq.block(b, |j, wv| storef(&mut full[c0 + j], wv));
                        } else {
                            // The row's last, partial block: through a buffer.
                            deq.block(b, |j, wv| storef(&mut buf[j], wv));
                            let done = (full.len() - c0) * L;
                            for (j, o) in full[c0..].iter_mut().enumerate() {
                                *o = buf[j];
                            }
                            tail.copy_from_slice(&buf.as_flattened()[done..done + tail.len()]);
                        }
                    }
                }
            }
        };
    }

    /// AVX-512 F/BW primitives common to the VNNI and non-VNNI paths, and the f32 kernels of both.
    pub(in crate::cpu::qmatmul) mod avx512 {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{first, for_tiles, group_param, part, row_weights, PackedWeights, INT4};

        pub type I = __m512i;
        pub type F = __m512;
        /// Bytes per integer vector.
        pub const W: usize = 64;
        /// f32 (and i32) lanes per vector.
        pub const L: usize = 16;
        /// Tokens per pass over a weight row.
        pub const TB: usize = 4;

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn load(b: &[u8; W]) -> I {
            // SAFETY: `b` is W readable bytes and the load is unaligned.
            unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn load_i8(b: &[i8; W]) -> I {
            // SAFETY: `b` is W readable bytes and the load is unaligned.
            unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
        }

        /// The 128 nibbles of an int4 block in weight order: the low nibbles (weights 0..64), then the
        /// high ones (64..128).
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn nibbles(b: &[u8; 64]) -> [I; 4] {
            let (v, mask) = (load(b), _mm512_set1_epi8(0x0F));
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
            [_mm512_and_si512(v, mask), hi, izero(), izero()]
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn splat_u8(v: u8) -> I {
            _mm512_set1_epi8(v as i8)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn izero() -> I {
            _mm512_setzero_si512()
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn add_i(a: I, b: I) -> I {
            _mm512_add_epi32(a, b)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn neg_i(a: I) -> I {
            _mm512_sub_epi32(_mm512_setzero_si512(), a)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn hsum_i(a: I) -> i32 {
            _mm512_reduce_add_epi32(a)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn fzero() -> F {
            _mm512_setzero_ps()
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn splat(v: f32) -> F {
            _mm512_set1_ps(v)
        }

        /// `a` in the lower half of the lanes, `b` in the upper.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn halves(a: f32, b: f32) -> F {
            _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b))
        }

        /// facc + f32(acc) · s.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn cvt_fmadd(facc: F, acc: I, s: F) -> F {
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, facc)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn hsum_f(a: F) -> f32 {
            _mm512_reduce_add_ps(a)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn add_f(a: F, b: F) -> F {
            _mm512_add_ps(a, b)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn fmadd(a: F, b: F, c: F) -> F {
            _mm512_fmadd_ps(a, b, c)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn loadf(x: &[f32; L]) -> F {
            // SAFETY: `x` is L readable floats and the load is unaligned.
            unsafe { _mm512_loadu_ps(x.as_ptr()) }
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn storef(o: &mut [f32; L], v: F) {
            // SAFETY: `o` is L writable floats and the store is unaligned.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) }
        }

        /// L bytes zero-extended to i32 lanes.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn widen_u8(b: &[u8; L]) -> I {
            // SAFETY: `b` is 16 readable bytes and the load is unaligned.
            _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
        }

        /// L bytes as signed codes, sign-extended to i32 lanes.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn widen_i8(b: &[u8; L]) -> I {
            // SAFETY: `b` is 16 readable bytes and the load is unaligned.
            _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
        }

        /// The low nibble of each i32 lane.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn low_nibble(v: I) -> I {
            _mm512_and_si512(v, _mm512_set1_epi32(0x0F))
        }

        /// The high nibble of each i32 lane that holds a byte.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn high_nibble(v: I) -> I {
            _mm512_srli_epi32::<4>(v)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn to_f32(v: I) -> F {
            _mm512_cvtepi32_ps(v)
        }

        int_f32_kernel!("avx512f,avx512bw");
    }

    /// AVX-512 with VNNI: `vpdpbusd`.
    pub(in crate::cpu::qmatmul) mod vnni {
        pub use super::avx512::*;
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            first, for_tiles, group_param, part, Int8Acts, PackedWeights, INT4, SEG_COLS,
        };

        /// acc + Σ of each 4 consecutive u8 `a` × s8 `b` products, per i32 lane.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        #[inline]
        pub fn dot(acc: I, a: I, b: I) -> I {
            _mm512_dpbusd_epi32(acc, a, b)
        }

        /// [`sdot`] adds X_BIAS·x to each product: the biases remove it.
        pub const X_BIAS: u8 = 128;

        /// Signed int8 codes as [`sdot`] takes them: c + 128 as u8.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        #[inline]
        pub fn prep(w: I) -> I {
            _mm512_xor_si512(w, _mm512_set1_epi8(i8::MIN))
        }

        /// acc + Σ (c + 128)·x per 4 bytes.
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
        #[inline]
        pub fn sdot(acc: I, p: I, x: I) -> I {
            _mm512_dpbusd_epi32(acc, p, x)
        }

        int_i8_kernel!("avx512f,avx512bw,avx512vnni");
    }

    /// AVX-512 BW without VNNI: `vpmaddubsw` + `vpmaddwd`.
    pub(in crate::cpu::qmatmul) mod bw512 {
        pub use super::avx512::*;
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            first, for_tiles, group_param, part, Int8Acts, PackedWeights, INT4, SEG_COLS,
        };

        /// acc + Σ of each 4 consecutive u8 `a` × s8 `b` products, per i32 lane. The i16 pair sums must
        /// not saturate: callers keep |a·b| ≤ 128·127.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn dot(acc: I, a: I, b: I) -> I {
            let pairs = _mm512_maddubs_epi16(a, b);
            _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
        }

        /// [`sdot`] is exact: no bias.
        pub const X_BIAS: u8 = 0;

        /// Signed int8 codes as [`sdot`] takes them: unchanged.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn prep(w: I) -> I {
            w
        }

        /// acc + Σ |x|·(c·sign x) per 4 bytes.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn sdot(acc: I, c: I, x: I) -> I {
            let signed = _mm512_mask_sub_epi8(c, _mm512_movepi8_mask(x), _mm512_setzero_si512(), c);
            dot(acc, _mm512_abs_epi8(x), signed)
        }

        int_i8_kernel!("avx512f,avx512bw");
    }

    /// AVX2 + FMA: 256-bit `vpmaddubsw` + `vpmaddwd`.
    pub(in crate::cpu::qmatmul) mod avx2 {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            first, for_tiles, group_param, part, row_weights, Int8Acts, PackedWeights, INT4,
            SEG_COLS,
        };

        pub type I = __m256i;
        pub type F = __m256;
        pub const W: usize = 32;
        pub const L: usize = 8;
        /// Tokens per pass: fewer than AVX-512's, as there are 16 registers rather than 32.
        pub const TB: usize = 2;

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn load(b: &[u8; W]) -> I {
            // SAFETY: `b` is W readable bytes and the load is unaligned.
            unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn load_i8(b: &[i8; W]) -> I {
            // SAFETY: `b` is W readable bytes and the load is unaligned.
            unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
        }

        /// The 128 nibbles of an int4 block in weight order, 32 per vector: the low nibbles of each
        /// half (weights 0..32, 32..64), then the high ones (64..96, 96..128).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn nibbles(b: &[u8; 64]) -> [I; 4] {
            let (v0, v1) = (load(part(b, 0)), load(part(b, 1)));
            let mask = _mm256_set1_epi8(0x0F);
            let hi = |v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            [
                _mm256_and_si256(v0, mask),
                _mm256_and_si256(v1, mask),
                hi(v0),
                hi(v1),
            ]
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn splat_u8(v: u8) -> I {
            _mm256_set1_epi8(v as i8)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn izero() -> I {
            _mm256_setzero_si256()
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn add_i(a: I, b: I) -> I {
            _mm256_add_epi32(a, b)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn neg_i(a: I) -> I {
            _mm256_sub_epi32(_mm256_setzero_si256(), a)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn hsum_i(a: I) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            _mm_cvtsi128_si32(s)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn fzero() -> F {
            _mm256_setzero_ps()
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn splat(v: f32) -> F {
            _mm256_set1_ps(v)
        }

        /// `a` in the lower half of the lanes, `b` in the upper.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn halves(a: f32, b: f32) -> F {
            _mm256_blend_ps::<0xF0>(_mm256_set1_ps(a), _mm256_set1_ps(b))
        }

        /// facc + f32(acc) · s.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn cvt_fmadd(facc: F, acc: I, s: F) -> F {
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, facc)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn hsum_f(a: F) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn add_f(a: F, b: F) -> F {
            _mm256_add_ps(a, b)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn fmadd(a: F, b: F, c: F) -> F {
            _mm256_fmadd_ps(a, b, c)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn loadf(x: &[f32; L]) -> F {
            // SAFETY: `x` is L readable floats and the load is unaligned.
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn storef(o: &mut [f32; L], v: F) {
            // SAFETY: `o` is L writable floats and the store is unaligned.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) }
        }

        /// L bytes zero-extended to i32 lanes.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn widen_u8(b: &[u8; L]) -> I {
            // SAFETY: `b` is the 8 bytes `_mm_loadl_epi64` reads; the load is unaligned.
            _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(b.as_ptr().cast()) })
        }

        /// L bytes as signed codes, sign-extended to i32 lanes.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn widen_i8(b: &[u8; L]) -> I {
            // SAFETY: `b` is the 8 bytes `_mm_loadl_epi64` reads; the load is unaligned.
            _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(b.as_ptr().cast()) })
        }

        /// The low nibble of each i32 lane.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn low_nibble(v: I) -> I {
            _mm256_and_si256(v, _mm256_set1_epi32(0x0F))
        }

        /// The high nibble of each i32 lane that holds a byte.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn high_nibble(v: I) -> I {
            _mm256_srli_epi32::<4>(v)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn to_f32(v: I) -> F {
            _mm256_cvtepi32_ps(v)
        }

        /// acc + Σ of each 4 consecutive u8 `a` × s8 `b` products, per i32 lane (i16 pair sums must not
        /// saturate, as for AVX-512 BW).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn dot(acc: I, a: I, b: I) -> I {
            let pairs = _mm256_maddubs_epi16(a, b);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }

        /// [`sdot`] is exact: no bias.
        pub const X_BIAS: u8 = 0;

        /// Signed int8 codes as [`sdot`] takes them: unchanged.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn prep(w: I) -> I {
            w
        }

        /// acc + Σ |x|·(c·sign x) per 4 bytes (`vpsignb` zeroes c where x is 0, as |x| is there).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn sdot(acc: I, c: I, x: I) -> I {
            dot(acc, _mm256_abs_epi8(x), _mm256_sign_epi8(c, x))
        }

        int_f32_kernel!("avx2,fma");
        int_i8_kernel!("avx2,fma");
    }
}
