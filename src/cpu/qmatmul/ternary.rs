//! Ternary weights — `Ternary2` (2 bits per weight) and `Ternary3` (base 3, five weights per byte) — times
//! f32 or int8 activations.
//!
//! Both formats store t = code + 1 ∈ {0, 1, 2} per weight and the kernels unpack t as bytes:
//! - `Ternary2`: plane j of a 64-byte block is (byte >> 2j) & 3 — 64 consecutive weights (64j..64j + 64),
//!   which meet 64 consecutive activations (AVX2: each 32-byte half gives 32).
//! - `Ternary3`: plane n holds digit n of every byte of the 52-byte block, t = (3·(q·3ⁿ mod 256)) >> 8
//!   (format.rs). q·3ⁿ mod 256 comes from byte adds (q + q + q wraps mod 256); the digit is
//!   [q ≥ 86] + [q ≥ 171] (unsigned compares on AVX-512, saturating subtractions on AVX2). Lane l of plane
//!   n holds weight 32n + l, 160 + 16n + (l − 32) or 240 + 4n + (l − 48), so the activations are copied
//!   once per call into that order ([`T3_LANES`] values per block, zero where a lane holds no weight) and
//!   the dot then runs as for `Ternary2`.
//!
//! **Int8 activations.** `vpdpbusd` multiplies u8 × s8, so t is the unsigned operand and
//! Σ w·x = Σ t·x − Σ x, both exact integers. Without VNNI the product is `vpmaddubsw` (saturating i16 pair
//! sums, here at most 2·2·128 = 512) then `vpmaddwd` by 1. How the group scales enter:
//! - per-row scales, `Ternary2` groups of 256 and every `Ternary3` group (whole blocks): the products of a
//!   group accumulate in i32 lanes (four accumulators per token on AVX-512, so `vpdpbusd` latency is
//!   hidden), are reduced to an i64 D at the group's end, and y = Σ_g s_g·(D_g − X_g)·s_x with X_g the
//!   group's Σx.
//! - `Ternary2` groups of 32, 64 and 128: each vector of products is converted to f32 and multiplied by its
//!   per-lane scale (a group of 32 is lanes 0–7 or 8–15 of a 64-byte product). Each i32 lane starts at
//!   −Σx of its own 4 columns (a per-token table), so it holds the exact Σ w·x of those columns before the
//!   conversion: rounding stays relative to Σ|ŵ·x|, and zero codes contribute exactly 0.
//!
//! No i32 lane overflows for any K: a column adds at most 2·128 to one lane and the lanes are reduced every
//! [`SEG_BLOCKS`] blocks (65536 columns, < 2²⁴) or every vector.
//!
//! **f32 activations** (fewer than `F32_PANEL_MIN_M` tokens): bytes are widened to i32 lanes and turned into
//! f32 weights by a register table lookup (`vpermps` reads only the low 4 bits of an index, AVX2's
//! `vpermps` the low 3, so a `Ternary2` plane needs just a shift): the table is (−1, 0, 1) times the group
//! scale, so each product is exactly ŵ·x; per-row scales multiply the sum instead. The alternative, masked
//! adds and subtracts of x (`vaddps {k}`/`vsubps {k}` under the plane's `vptestmb` masks), measured 1.4–1.8
//! ms against the lookup's 1.1 ms for the 11008×4096 GEMV here; it also costs two ops per token where the
//! lookup's three ops per 16 weights are shared by all tokens. `dequantize_rows` (the f32 panel path)
//! stores the same lookup.
//!
//! **Bounds.** Packed rows are whole blocks. Int8 activation rows are padded with zeros to a multiple of
//! 256 columns, exactly the `Ternary2` blocks of a row; the f32 and `Ternary3` copies are built here with
//! the same padding. Every vector load reads a fixed-size array borrowed from those slices, or a masked
//! load of the 52 bytes of a `Ternary3` block whose masked-off bytes are never accessed.

use std::ops::Range;

use super::int8::check;
use super::{Int8Acts, PackedWeights, QIsa};
use crate::quant::format::{ternary3_digit, Group, QFormat};

/// Weights per block in both formats.
const BLOCK: usize = 256;

/// Blocks whose products an i32 lane accumulates before they are reduced to i64 (see the module docs).
#[cfg(target_arch = "x86_64")]
pub(super) const SEG_BLOCKS: usize = 256;

/// Room for the results of one pass over a row with several tokens: at least every ISA's `TB`.
#[cfg(target_arch = "x86_64")]
pub(super) const PASS_TOKENS: usize = 4;

/// How far ahead of the bytes being read the kernels prefetch the weight stream. A row walk is
/// sequential, but the hardware prefetcher alone leaves a GEMV waiting on memory: on the 11008×4096
/// `Ternary2` GEMV here, 0 / 1 / 2 / 4 / 8 KiB ahead gave 770 / 580 / 490 / 465 / 460 µs.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 4096;

/// Hints the cache line [`PREFETCH_BYTES`] past the start of `bytes` (weights are contiguous across rows,
/// so this reaches into the rows that come next; past the end of the matrix the hint is simply dropped).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse")]
#[inline]
pub(super) fn prefetch_ahead<T>(bytes: &[T]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // A prefetch never faults and does not access memory architecturally, so any address is sound;
    // `wrapping_add` keeps the pointer arithmetic itself defined.
    _mm_prefetch::<_MM_HINT_T0>(
        bytes
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(PREFETCH_BYTES)
            .cast(),
    );
}

/// Digit planes of a `Ternary3` block.
const T3_PLANES: usize = 5;

/// Activations per `Ternary3` block in plane order: 5 planes of 64 lanes.
#[cfg(target_arch = "x86_64")]
const T3_LANES: usize = T3_PLANES * 64;

/// For each lane of a block's activations in `Ternary3` plane order, the weight (within the block) it
/// holds, or `NONE`.
#[cfg(target_arch = "x86_64")]
const T3_SOURCE: [u16; T3_LANES] = t3_source();
#[cfg(target_arch = "x86_64")]
const NONE: u16 = u16::MAX;

#[cfg(target_arch = "x86_64")]
const fn t3_source() -> [u16; T3_LANES] {
    let mut src = [NONE; T3_LANES];
    let mut n = 0;
    while n < T3_PLANES {
        let mut l = 0;
        while l < 64 {
            src[64 * n + l] = match l {
                0..32 => (32 * n + l) as u16,
                32..48 => (160 + 16 * n + l - 32) as u16,
                48..52 if n < 4 => (240 + 4 * n + l - 48) as u16,
                _ => NONE,
            };
            l += 1;
        }
        n += 1;
    }
    src
}

/// Whether `w` is `Ternary3`, and its grouping.
fn layout(w: &PackedWeights) -> (bool, Group) {
    match w.format {
        QFormat::Ternary2 { group } => (false, group),
        QFormat::Ternary3 { group } => (true, group),
        f => panic!("ternary kernel called with {f:?}"),
    }
}

/// Scale `k` of a row, or 0 for a group past the row's end (whose activations are zero padding).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scale_at(scales: &[f32], k: usize) -> f32 {
    scales.get(k).copied().unwrap_or(0.0)
}

/// The group of column `col` for groups of `g` columns, `g` = 0 meaning one per row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn group_index(col: usize, g: usize) -> usize {
    match g {
        0 => 0,
        _ if g.is_power_of_two() => col >> g.trailing_zeros(),
        _ => col / g,
    }
}

/// `x` (tokens of `blocks · 256` values) rearranged into `Ternary3` plane order.
#[cfg(target_arch = "x86_64")]
fn t3_order<T: Copy + Default>(x: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len() / BLOCK * T3_LANES);
    for blk in x.chunks_exact(BLOCK) {
        out.extend(T3_SOURCE.iter().map(|&s| {
            if s == NONE {
                T::default()
            } else {
                blk[usize::from(s)]
            }
        }));
    }
    out
}

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
    check(w, rows.clone(), m, t, isa);
    if w.cols == 0 {
        t.fill(0.0);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni | QIsa::Avx512 | QIsa::Avx2 => {
            let (fmt3, _) = layout(w);
            let nb = w.cols.div_ceil(BLOCK);
            let xp = super::int8::pad_f32(x, m, w.cols, nb * BLOCK);
            let (xk, stride) = if fmt3 {
                (t3_order(&xp), nb * T3_LANES)
            } else {
                (xp, nb * BLOCK)
            };
            if isa == QIsa::Avx2 {
                // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists Avx2 only where
                // AVX2 and FMA were detected.
                unsafe { x86::w256::ternary_f32(w, &xk, stride, m, rows, t) }
            } else {
                // SAFETY: as above; the AVX-512 ISAs are listed only where AVX-512 F/BW/VL were detected.
                unsafe { x86::w512::ternary_f32(w, &xk, stride, m, rows, t) }
            }
        }
        _ => portable_f32(w, x, m, rows, t),
    }
}

/// y[i, r] for per-token int8 activations and weight rows `rows`, into `t` (t[(r − rows.start)·m + i]).
pub fn matmul_i8(w: &PackedWeights, acts: &Int8Acts, rows: Range<usize>, t: &mut [f32], isa: QIsa) {
    check(w, rows.clone(), acts.m, t, isa);
    assert!(acts.cols == w.cols && acts.padded >= w.cols.div_ceil(BLOCK) * BLOCK);
    if w.cols == 0 {
        t.fill(0.0);
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni => {
            let p = I8Prep::new(w, acts);
            // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists Avx512Vnni only
            // where AVX-512 F/BW/VL and VNNI were detected.
            unsafe { x86::vnni::ternary_i8(w, &p, rows, t) }
        }
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512 => {
            let p = I8Prep::new(w, acts);
            // SAFETY: as above; Avx512 is listed only where AVX-512 F/BW/VL were detected.
            unsafe { x86::bw512::ternary_i8(w, &p, rows, t) }
        }
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => {
            let p = I8Prep::new(w, acts);
            // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
            unsafe { x86::avx2::ternary_i8(w, &p, rows, t) }
        }
        _ => portable_i8(w, acts, rows, t),
    }
}

/// Dequantizes weight rows `rows` into `out` (`rows.len() · cols`): scale · code.
pub fn dequantize_rows(w: &PackedWeights, rows: Range<usize>, out: &mut [f32]) {
    dequantize_rows_with(w, rows, out, QIsa::best());
}

fn dequantize_rows_with(w: &PackedWeights, rows: Range<usize>, out: &mut [f32], isa: QIsa) {
    assert!(rows.end <= w.rows && out.len() == rows.len() * w.cols);
    assert!(QIsa::available().contains(&isa));
    if w.cols == 0 {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is in `QIsa::available()` (asserted above), which lists the AVX-512 ISAs only where
        // AVX-512 F/BW/VL were detected.
        QIsa::Avx512Vnni | QIsa::Avx512 => unsafe { x86::w512::ternary_dequant(w, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::w256::ternary_dequant(w, rows, out) },
        _ => portable_dequant(w, rows, out),
    }
}

/// The t values (code + 1) of one block, in weight order.
fn decode_block(fmt3: bool, blk: &[u8], t: &mut [u8; BLOCK]) {
    if fmt3 {
        for n in 0..T3_PLANES as u32 {
            let n_us = n as usize;
            for (l, &q) in blk[..32].iter().enumerate() {
                t[32 * n_us + l] = ternary3_digit(q, n);
            }
            for (l, &q) in blk[32..48].iter().enumerate() {
                t[160 + 16 * n_us + l] = ternary3_digit(q, n);
            }
            if n < 4 {
                for (l, &q) in blk[48..52].iter().enumerate() {
                    t[240 + 4 * n_us + l] = ternary3_digit(q, n);
                }
            }
        }
    } else {
        for (i, v) in t.iter_mut().enumerate() {
            *v = (blk[i % 64] >> (2 * (i / 64))) & 3;
        }
    }
}

/// The codes of row `r` (its first `cols` weights) into `codes`.
fn decode_row(w: &PackedWeights, r: usize, codes: &mut Vec<i8>) {
    let (fmt3, _) = layout(w);
    let mut t = [0u8; BLOCK];
    codes.clear();
    for blk in w.row(r).chunks_exact(w.format.block_bytes()) {
        decode_block(fmt3, blk, &mut t);
        codes.extend(t.iter().map(|&v| v as i8 - 1));
    }
    codes.truncate(w.cols);
}

fn portable_f32(w: &PackedWeights, x: &[f32], m: usize, rows: Range<usize>, t: &mut [f32]) {
    let (g, gpr) = (w.group_size(), w.groups_per_row());
    let mut codes = Vec::with_capacity(w.cols);
    for (r, tr) in rows.zip(t.chunks_exact_mut(m)) {
        decode_row(w, r, &mut codes);
        let scales = &w.scales[r * gpr..(r + 1) * gpr];
        for (y, x) in tr.iter_mut().zip(x.chunks_exact(w.cols)) {
            *y = codes
                .chunks(g)
                .zip(x.chunks(g))
                .zip(scales)
                .map(|((c, x), &s)| {
                    s * c
                        .iter()
                        .zip(x)
                        .map(|(&c, &x)| f32::from(c) * x)
                        .sum::<f32>()
                })
                .sum();
        }
    }
}

fn portable_i8(w: &PackedWeights, acts: &Int8Acts, rows: Range<usize>, t: &mut [f32]) {
    let (m, g, gpr) = (acts.m, w.group_size(), w.groups_per_row());
    let mut codes = Vec::with_capacity(w.cols);
    for (r, tr) in rows.zip(t.chunks_exact_mut(m)) {
        decode_row(w, r, &mut codes);
        let scales = &w.scales[r * gpr..(r + 1) * gpr];
        for (i, y) in tr.iter_mut().enumerate() {
            let x = &acts.row(i)[..w.cols];
            let dot: f32 = codes
                .chunks(g)
                .zip(x.chunks(g))
                .zip(scales)
                .map(|((c, x), &s)| {
                    let d: i64 = c
                        .iter()
                        .zip(x)
                        .map(|(&c, &x)| i64::from(c) * i64::from(x))
                        .sum();
                    s * d as f32
                })
                .sum();
            *y = dot * acts.scales[i];
        }
    }
}

fn portable_dequant(w: &PackedWeights, rows: Range<usize>, out: &mut [f32]) {
    let (g, gpr) = (w.group_size(), w.groups_per_row());
    let mut codes = Vec::with_capacity(w.cols);
    for (r, o) in rows.zip(out.chunks_exact_mut(w.cols)) {
        decode_row(w, r, &mut codes);
        let scales = &w.scales[r * gpr..(r + 1) * gpr];
        for (k, (o, &c)) in o.iter_mut().zip(&codes).enumerate() {
            *o = scales[k / g] * f32::from(c);
        }
    }
}

/// How a row's group scales enter the int8 kernels (see the module docs).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Plan {
    /// Groups of whole blocks (`gb` per group; a per-row scale is one group of all blocks): exact i64 dot
    /// per group.
    Blocks { gb: usize },
    /// `Ternary2` groups of `g` < 256 weights: per-vector conversion with per-lane scales.
    Vectors { g: usize },
}

/// What the int8 kernels read of the activations, prepared once per `matmul_i8` call (one row chunk).
#[cfg(target_arch = "x86_64")]
struct I8Prep<'a> {
    m: usize,
    fmt3: bool,
    plan: Plan,
    /// Activation codes in kernel order, `stride` per token: the padded rows for `Ternary2`, plane order
    /// for `Ternary3`.
    x: std::borrow::Cow<'a, [i8]>,
    stride: usize,
    scales: &'a [f32],
    /// `Plan::Blocks`: Σx of each group, `ngroups` per token.
    xg: Vec<i64>,
    ngroups: usize,
    /// `Plan::Vectors`: per token, −Σx of each 4 columns (`padded / 4`), the start of the i32 product
    /// lane that sums those columns.
    corr: Vec<i32>,
    corr_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a> I8Prep<'a> {
    fn new(w: &PackedWeights, acts: &'a Int8Acts) -> I8Prep<'a> {
        let (fmt3, group) = layout(w);
        let nb = w.cols.div_ceil(BLOCK);
        let plan = match group {
            Group::Size(g) if g < BLOCK => Plan::Vectors { g },
            Group::Size(g) => Plan::Blocks { gb: g / BLOCK },
            Group::Row => Plan::Blocks { gb: nb },
        };
        let (x, stride) = if fmt3 {
            (t3_order(&acts.data).into(), acts.padded / BLOCK * T3_LANES)
        } else {
            (std::borrow::Cow::Borrowed(&acts.data[..]), acts.padded)
        };
        let (mut xg, mut ngroups, mut corr, mut corr_stride) = (Vec::new(), 0, Vec::new(), 0);
        match plan {
            Plan::Blocks { gb } => {
                ngroups = nb.div_ceil(gb);
                for i in 0..acts.m {
                    xg.extend(
                        acts.row(i)[..nb * BLOCK]
                            .chunks(gb * BLOCK)
                            .map(|c| c.iter().map(|&v| i64::from(v)).sum::<i64>()),
                    );
                }
            }
            Plan::Vectors { .. } => {
                corr_stride = acts.padded / 4;
                corr = acts
                    .data
                    .chunks_exact(4)
                    .map(|q| -q.iter().map(|&v| i32::from(v)).sum::<i32>())
                    .collect();
            }
        }
        I8Prep {
            m: acts.m,
            fmt3,
            plan,
            x,
            stride,
            scales: &acts.scales,
            xg,
            ngroups,
            corr,
            corr_stride,
        }
    }

    fn x_row(&self, i: usize) -> &[i8] {
        &self.x[i * self.stride..(i + 1) * self.stride]
    }

    fn xg_row(&self, i: usize) -> &[i64] {
        &self.xg[i * self.ngroups..(i + 1) * self.ngroups]
    }

    fn corr_row(&self, i: usize) -> &[i32] {
        &self.corr[i * self.corr_stride..(i + 1) * self.corr_stride]
    }
}

/// The x86 kernels: width modules (`w512`, `w256`) with the unpacking primitives and the f32 kernels, and
/// one module per dot-product instruction (`vnni`, `bw512`, `avx2`) expanding the int8 kernels over them.
/// The generic vector primitives (`load`, `dot`, `hsum_i`, …) are int8.rs's.
#[cfg(target_arch = "x86_64")]
mod x86 {
    /// The f32-activation and dequantization kernels, expanded into each width module.
    macro_rules! ternary_f32_kernels {
        ($features:literal) => {
            const _: () = assert!(TB <= PASS_TOKENS);

            /// Ternary weights × f32 activations `xk` (`m` tokens of `stride` values: padded rows, or
            /// `Ternary3` plane order).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul::ternary) fn ternary_f32(
                w: &PackedWeights,
                xk: &[f32],
                stride: usize,
                m: usize,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                let (fmt3, group) = layout(w);
                let g = match group {
                    Group::Row => 0,
                    Group::Size(g) => g,
                };
                let (r0, gpr) = (rows.start, w.groups_per_row());
                for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                    let scales = &w.scales[r * gpr..(r + 1) * gpr];
                    let xs = |k: usize| {
                        xk[(i0 + k) * stride..(i0 + k + 1) * stride]
                            .as_chunks::<L>()
                            .0
                    };
                    let wr = w.row(r);
                    let mut y = [0f32; PASS_TOKENS];
                    match n {
                        1 => y[..1].copy_from_slice(&f32_row::<1>(fmt3, wr, [xs(0)], scales, g)),
                        2 => y[..2].copy_from_slice(&f32_row::<2>(
                            fmt3,
                            wr,
                            [xs(0), xs(1)],
                            scales,
                            g,
                        )),
                        3 => y[..3].copy_from_slice(&f32_row::<3>(
                            fmt3,
                            wr,
                            [xs(0), xs(1), xs(2)],
                            scales,
                            g,
                        )),
                        _ => y[..TB].copy_from_slice(&f32_row::<TB>(
                            fmt3,
                            wr,
                            std::array::from_fn(xs),
                            scales,
                            g,
                        )),
                    }
                    let s = if g == 0 { scale_at(scales, 0) } else { 1.0 };
                    for (k, &v) in y[..n].iter().enumerate() {
                        t[(r - r0) * m + i0 + k] = v * s;
                    }
                });
            }

            /// Σ ŵ·x of one row for `T` tokens, ŵ without the row scale when `g` is 0 (per-row scale).
            #[target_feature(enable = $features)]
            #[inline]
            fn f32_row<const T: usize>(
                fmt3: bool,
                wr: &[u8],
                xs: [&[[f32; L]]; T],
                scales: &[f32],
                g: usize,
            ) -> [f32; T] {
                // One accumulator per plane so that a single token still has four independent chains.
                let mut acc = [[fzero(); 4]; T];
                // Ternary2 group sizes are powers of two.
                let gshift = g.trailing_zeros();
                let base = code_table();
                if fmt3 {
                    for (b, blk) in wr.as_chunks::<52>().0.iter().enumerate() {
                        prefetch_ahead(blk);
                        let tbl = if g == 0 {
                            base
                        } else {
                            mul_f(base, splat(scale_at(scales, b * BLOCK / g)))
                        };
                        let mut xb: [&[[f32; L]]; T] = [&[]; T];
                        for (xb, x) in xb.iter_mut().zip(&xs) {
                            *xb = &x[b * (T3_LANES / L)..(b + 1) * (T3_LANES / L)];
                        }
                        for k in 0..T3_CHUNKS {
                            let mut q = t3_chunk(blk, k);
                            for n in 0..T3_PLANES {
                                let q3 = add_i(q, add_i(q, q));
                                let wv = lookup(shr8(q3), tbl);
                                q = low_byte(q3);
                                for (a, x) in acc.iter_mut().zip(&xb) {
                                    a[n % 4] = fmadd(wv, loadf(&x[n * (64 / L) + k]), a[n % 4]);
                                }
                            }
                        }
                    }
                } else {
                    for (b, blk) in wr.as_chunks::<64>().0.iter().enumerate() {
                        prefetch_ahead(blk);
                        let mut xb: [&[[f32; L]]; T] = [&[]; T];
                        for (xb, x) in xb.iter_mut().zip(&xs) {
                            *xb = &x[b * (BLOCK / L)..(b + 1) * (BLOCK / L)];
                        }
                        // One table per half plane (32 weights): groups are 32 or more.
                        let mut tbls = [base; 8];
                        if g != 0 {
                            for (h, t) in tbls.iter_mut().enumerate() {
                                *t = mul_f(
                                    base,
                                    splat(scale_at(scales, (b * BLOCK + 32 * h) >> gshift)),
                                );
                            }
                        }
                        for k in 0..64 / L {
                            let v = widen_u8(part(blk, k));
                            for pl in 0..4 {
                                let wv = lookup(shift_plane(v, pl), tbls[2 * pl + L * k / 32]);
                                for (a, x) in acc.iter_mut().zip(&xb) {
                                    a[pl] = fmadd(wv, loadf(&x[pl * (64 / L) + k]), a[pl]);
                                }
                            }
                        }
                    }
                }
                let mut y = [0f32; T];
                for (y, a) in y.iter_mut().zip(&acc) {
                    *y = hsum_f(add_f(add_f(a[0], a[1]), add_f(a[2], a[3])));
                }
                y
            }

            /// Dequantizes rows `rows` into `out` (`rows.len() · cols`).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul::ternary) fn ternary_dequant(
                w: &PackedWeights,
                rows: Range<usize>,
                out: &mut [f32],
            ) {
                let (fmt3, group) = layout(w);
                let (bb, gpr) = (w.format.block_bytes(), w.groups_per_row());
                let g = match group {
                    Group::Row => 0,
                    Group::Size(g) => g,
                };
                for (r, o) in rows.zip(out.chunks_exact_mut(w.cols)) {
                    let scales = &w.scales[r * gpr..(r + 1) * gpr];
                    let blocks = w.row(r).chunks_exact(bb);
                    let (full, tail) = o.as_chunks_mut::<BLOCK>();
                    for (b, (blk, dst)) in blocks.clone().zip(full.iter_mut()).enumerate() {
                        dequant_block(fmt3, blk, b, scales, g, dst);
                    }
                    if !tail.is_empty() {
                        let b = full.len();
                        let mut tmp = [0f32; BLOCK];
                        let blk = blocks
                            .last()
                            .expect("a partial block is a block of the row");
                        dequant_block(fmt3, blk, b, scales, g, &mut tmp);
                        let n = tail.len();
                        tail.copy_from_slice(&tmp[..n]);
                    }
                }
            }

            /// Block `b` of a row (its packed bytes `blk`) as f32 weights in weight order.
            #[target_feature(enable = $features)]
            #[inline]
            fn dequant_block(
                fmt3: bool,
                blk: &[u8],
                b: usize,
                scales: &[f32],
                g: usize,
                dst: &mut [f32; BLOCK],
            ) {
                let base = code_table();
                let group = |col: usize| group_index(col, g);
                if fmt3 {
                    let blk: &[u8; 52] = blk.try_into().expect("a Ternary3 block is 52 bytes");
                    let tbl = mul_f(base, splat(scale_at(scales, group(b * BLOCK))));
                    for k in 0..T3_CHUNKS {
                        let mut q = t3_chunk(blk, k);
                        for n in 0..T3_PLANES {
                            let q3 = add_i(q, add_i(q, q));
                            let wv = lookup(shr8(q3), tbl);
                            q = low_byte(q3);
                            // Lanes L·k.. of plane n hold consecutive weights; the last chunk only 4.
                            let l = L * k;
                            match l {
                                0..32 => storef(part_mut(dst, (32 * n + l) / L), wv),
                                32..48 => storef(part_mut(dst, (160 + 16 * n + l - 32) / L), wv),
                                _ if n < 4 => store4(
                                    (&mut dst[240 + 4 * n..244 + 4 * n])
                                        .try_into()
                                        .expect("4 floats"),
                                    wv,
                                ),
                                _ => {}
                            }
                        }
                    }
                } else {
                    let blk: &[u8; 64] = blk.try_into().expect("a Ternary2 block is 64 bytes");
                    for pl in 0..4 {
                        // Groups are 32 or more, so each half of a plane has one scale.
                        let s0 = mul_f(base, splat(scale_at(scales, group(b * BLOCK + 64 * pl))));
                        let s1 = mul_f(
                            base,
                            splat(scale_at(scales, group(b * BLOCK + 64 * pl + 32))),
                        );
                        for k in 0..64 / L {
                            let v = widen_u8(part(blk, k));
                            let tbl = if L * k < 32 { s0 } else { s1 };
                            let wv = lookup(shift_plane(v, pl), tbl);
                            storef(part_mut(dst, pl * (64 / L) + k), wv);
                        }
                    }
                }
            }

            /// Chunk `k` (L bytes; the last one 4) of a `Ternary3` block, zero-extended to i32 lanes.
            #[target_feature(enable = $features)]
            #[inline]
            fn t3_chunk(blk: &[u8; 52], k: usize) -> I {
                if L * k < 48 {
                    widen_u8(blk[L * k..L * (k + 1)].try_into().expect("L bytes"))
                } else {
                    widen_u8_4(blk[48..52].try_into().expect("4 bytes"))
                }
            }
        };
    }

    /// The int8-activation kernels, expanded into each dot-product module.
    macro_rules! ternary_i8_kernels {
        ($features:literal) => {
            const _: () = assert!(TB <= PASS_TOKENS);

            /// Ternary weights × int8 activations (see the module docs).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul::ternary) fn ternary_i8(
                w: &PackedWeights,
                p: &I8Prep,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                let (m, r0, gpr) = (p.m, rows.start, w.groups_per_row());
                for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                    let scales = &w.scales[r * gpr..(r + 1) * gpr];
                    let wr = w.row(r);
                    let mut y = [0f32; PASS_TOKENS];
                    match n {
                        1 => y[..1].copy_from_slice(&ternary_row::<1>(wr, p, i0, scales)),
                        2 => y[..2].copy_from_slice(&ternary_row::<2>(wr, p, i0, scales)),
                        3 => y[..3].copy_from_slice(&ternary_row::<3>(wr, p, i0, scales)),
                        _ => y[..TB].copy_from_slice(&ternary_row::<TB>(wr, p, i0, scales)),
                    }
                    for (k, &v) in y[..n].iter().enumerate() {
                        t[(r - r0) * m + i0 + k] = v * p.scales[i0 + k];
                    }
                });
            }

            /// Σ ŵ·x_code of one row (packed bytes `wr`) for tokens i0..i0 + T.
            #[target_feature(enable = $features)]
            #[inline]
            fn ternary_row<const T: usize>(
                wr: &[u8],
                p: &I8Prep,
                i0: usize,
                scales: &[f32],
            ) -> [f32; T] {
                let mut xs: [&[[i8; W]]; T] = [&[]; T];
                for (k, x) in xs.iter_mut().enumerate() {
                    *x = p.x_row(i0 + k).as_chunks::<W>().0;
                }
                match p.plan {
                    Plan::Blocks { gb } => {
                        let mut xg: [&[i64]; T] = [&[]; T];
                        for (k, x) in xg.iter_mut().enumerate() {
                            *x = p.xg_row(i0 + k);
                        }
                        if p.fmt3 {
                            row_blocks::<T, true>(wr, &xs, gb, scales, &xg)
                        } else {
                            row_blocks::<T, false>(wr, &xs, gb, scales, &xg)
                        }
                    }
                    Plan::Vectors { g } => {
                        let mut corr: [&[[i32; L]]; T] = [&[]; T];
                        for (k, c) in corr.iter_mut().enumerate() {
                            *c = p.corr_row(i0 + k).as_chunks::<L>().0;
                        }
                        row_vectors::<T>(wr, &xs, &corr, scales, g)
                    }
                }
            }

            /// `Plan::Blocks`: Σ_g s_g·(D_g − X_g) with D_g the exact Σ t·x of group g.
            #[target_feature(enable = $features)]
            #[inline]
            fn row_blocks<const T: usize, const FMT3: bool>(
                wr: &[u8],
                xs: &[&[[i8; W]]; T],
                gb: usize,
                scales: &[f32],
                xg: &[&[i64]; T],
            ) -> [f32; T] {
                let nb = wr.len() / if FMT3 { 52 } else { 64 };
                let mut y = [0f32; T];
                for (gi, g0) in (0..nb).step_by(gb).enumerate() {
                    let g1 = (g0 + gb).min(nb);
                    let mut d = [0i64; T];
                    for s0 in (g0..g1).step_by(SEG_BLOCKS) {
                        let seg = seg_dots::<T, FMT3>(wr, s0..(s0 + SEG_BLOCKS).min(g1), xs);
                        for (d, s) in d.iter_mut().zip(seg) {
                            *d += s;
                        }
                    }
                    for ((y, d), xg) in y.iter_mut().zip(d).zip(xg) {
                        *y += scales[gi] * (d - xg[gi]) as f32;
                    }
                }
                y
            }

            /// Σ t·x over blocks `blocks` of a row, exact: at most [`SEG_BLOCKS`] blocks, so no i32 lane
            /// overflows.
            #[target_feature(enable = $features)]
            #[inline]
            fn seg_dots<const T: usize, const FMT3: bool>(
                wr: &[u8],
                blocks: Range<usize>,
                xs: &[&[[i8; W]]; T],
            ) -> [i64; T] {
                let (bb, planes) = if FMT3 { (52, T3_PLANES) } else { (64, 4) };
                // Activation vectors per block.
                let pu = planes * U;
                let mut acc = [[izero(); NACC]; T];
                for b in blocks {
                    let blk = &wr[b * bb..(b + 1) * bb];
                    prefetch_ahead(blk);
                    // The block's activations: one bounds check per token, none per vector.
                    let mut xb: [&[[i8; W]]; T] = [&[]; T];
                    for (xb, x) in xb.iter_mut().zip(xs) {
                        *xb = &x[b * pu..(b + 1) * pu];
                    }
                    for h in 0..U {
                        let mut q = raw::<FMT3>(blk, h);
                        for pl in 0..planes {
                            let c = if FMT3 {
                                let c = t3_digit(q);
                                q = t3_next(q);
                                c
                            } else {
                                t2_plane(q, pl)
                            };
                            let (v, a) = (pl * U + h, (pl * U + h) % NACC);
                            for (acc, x) in acc.iter_mut().zip(&xb) {
                                acc[a] = dot(acc[a], c, load_i8(&x[v]));
                            }
                        }
                    }
                }
                let mut d = [0i64; T];
                for (d, a) in d.iter_mut().zip(&acc) {
                    let mut s = a[0];
                    for &v in &a[1..] {
                        s = add_i(s, v);
                    }
                    *d = i64::from(hsum_i(s));
                }
                d
            }

            /// `Plan::Vectors` (`Ternary2`, groups of 32, 64 or 128): each vector of products, started at
            /// its lanes' −Σx, converted to f32 and scaled per lane.
            #[target_feature(enable = $features)]
            #[inline]
            fn row_vectors<const T: usize>(
                wr: &[u8],
                xs: &[&[[i8; W]]; T],
                corr: &[&[[i32; L]]; T],
                scales: &[f32],
                g: usize,
            ) -> [f32; T] {
                let mut acc = [[fzero(); 2]; T];
                // Ternary2 group sizes are powers of two.
                let gshift = g.trailing_zeros();
                for (b, blk) in wr.chunks_exact(64).enumerate() {
                    prefetch_ahead(blk);
                    let (mut xb, mut cb): ([&[[i8; W]]; T], [&[[i32; L]]; T]) =
                        ([&[]; T], [&[]; T]);
                    for i in 0..T {
                        xb[i] = &xs[i][b * 4 * U..(b + 1) * 4 * U];
                        cb[i] = &corr[i][b * 4 * U..(b + 1) * 4 * U];
                    }
                    for h in 0..U {
                        let raw = raw::<false>(blk, h);
                        for pl in 0..4 {
                            let c = t2_plane(raw, pl);
                            let v = pl * U + h;
                            let gi = ((b * 4 * U + v) * W) >> gshift;
                            let s = if g >= W {
                                splat(scale_at(scales, gi))
                            } else {
                                halves(scale_at(scales, gi), scale_at(scales, gi + 1))
                            };
                            for ((a, x), c0) in acc.iter_mut().zip(&xb).zip(&cb) {
                                let d = dot(load_i32(&c0[v]), c, load_i8(&x[v]));
                                a[pl % 2] = cvt_fmadd(a[pl % 2], d, s);
                            }
                        }
                    }
                }
                let mut y = [0f32; T];
                for (y, a) in y.iter_mut().zip(&acc) {
                    *y = hsum_f(add_f(a[0], a[1]));
                }
                y
            }
        };
    }

    /// 512-bit primitives (AVX-512 F/BW) and the f32 kernels.
    pub(super) mod w512 {
        pub use crate::cpu::qmatmul::int8::x86::avx512::*;
        pub(in crate::cpu::qmatmul) use crate::cpu::qmatmul::int8::{for_tiles, part, part_mut};
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            group_index, layout, prefetch_ahead, scale_at, PackedWeights, BLOCK, PASS_TOKENS,
            T3_LANES, T3_PLANES,
        };
        use crate::quant::format::Group;

        /// Raw vectors per block (`Ternary2` 64 bytes; `Ternary3` 52 bytes read as one).
        pub const U: usize = 1;
        /// i32 accumulators per token in the int8 kernels.
        pub const NACC: usize = 4;
        /// i32-lane chunks of a `Ternary3` block in the f32 kernels: three of 16 bytes and one of 4.
        const T3_CHUNKS: usize = 4;

        /// The raw bytes of vector `h` of a block.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn raw<const FMT3: bool>(blk: &[u8], _h: usize) -> I {
            if FMT3 {
                let blk: &[u8; 52] = blk.try_into().expect("a Ternary3 block is 52 bytes");
                // SAFETY: the mask selects bytes 0..52, all inside `blk`; masked-off bytes are not read
                // (AVX-512 masked loads suppress faults on them).
                unsafe { _mm512_maskz_loadu_epi8((1u64 << 52) - 1, blk.as_ptr().cast()) }
            } else {
                load(blk.try_into().expect("a Ternary2 block is 64 bytes"))
            }
        }

        /// t of `Ternary2` plane `pl` (bits 2·pl..2·pl + 2 of every byte).
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn t2_plane(raw: I, pl: usize) -> I {
            let v = match pl {
                0 => raw,
                1 => _mm512_srli_epi16::<2>(raw),
                2 => _mm512_srli_epi16::<4>(raw),
                _ => _mm512_srli_epi16::<6>(raw),
            };
            _mm512_and_si512(v, _mm512_set1_epi8(3))
        }

        /// The leading base-3 digit of each byte q (already multiplied by 3ⁿ): [q ≥ 86] + [q ≥ 171].
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn t3_digit(q: I) -> I {
            let one = _mm512_set1_epi8(1);
            let ge1 = _mm512_cmpge_epu8_mask(q, _mm512_set1_epi8(86));
            let ge2 = _mm512_cmpge_epu8_mask(q, _mm512_set1_epi8(171u8 as i8));
            let d = _mm512_maskz_mov_epi8(ge1, one);
            _mm512_mask_add_epi8(d, ge2, d, one)
        }

        /// 3·q mod 256 per byte: the next digit moves to the top.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn t3_next(q: I) -> I {
            _mm512_add_epi8(q, _mm512_add_epi8(q, q))
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn load_i32(v: &[i32; L]) -> I {
            // SAFETY: `v` is L readable i32 and the load is unaligned.
            unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
        }

        /// Weight of a code index's low 2 bits (t − 1; a t of 3 never occurs), 16 entries for `vpermps`.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn code_table() -> F {
            _mm512_setr_ps(
                -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0,
            )
        }

        /// tbl[idx & 15] per lane.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn lookup(idx: I, tbl: F) -> F {
            _mm512_permutexvar_ps(idx, tbl)
        }

        /// Each byte-holding lane shifted so that `Ternary2` plane `pl` is in its low bits.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn shift_plane(v: I, pl: usize) -> I {
            match pl {
                0 => v,
                1 => _mm512_srli_epi32::<2>(v),
                2 => _mm512_srli_epi32::<4>(v),
                _ => _mm512_srli_epi32::<6>(v),
            }
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn shr8(v: I) -> I {
            _mm512_srli_epi32::<8>(v)
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn low_byte(v: I) -> I {
            _mm512_and_si512(v, _mm512_set1_epi32(0xFF))
        }

        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn mul_f(a: F, b: F) -> F {
            _mm512_mul_ps(a, b)
        }

        /// 4 bytes zero-extended to the low i32 lanes (the rest 0).
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn widen_u8_4(b: &[u8; 4]) -> I {
            _mm512_cvtepu8_epi32(_mm_cvtsi32_si128(i32::from_le_bytes(*b)))
        }

        /// The low 4 lanes of `v`.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn store4(o: &mut [f32; 4], v: F) {
            // SAFETY: `o` is 4 writable floats and the store is unaligned.
            unsafe { _mm_storeu_ps(o.as_mut_ptr(), _mm512_castps512_ps128(v)) }
        }

        ternary_f32_kernels!("avx512f,avx512bw");
    }

    /// 256-bit primitives (AVX2) and the f32 kernels.
    pub(super) mod w256 {
        pub use crate::cpu::qmatmul::int8::x86::avx2::*;
        pub(in crate::cpu::qmatmul) use crate::cpu::qmatmul::int8::{for_tiles, part, part_mut};
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            group_index, layout, prefetch_ahead, scale_at, PackedWeights, BLOCK, PASS_TOKENS,
            T3_LANES, T3_PLANES,
        };
        use crate::quant::format::Group;

        /// Raw vectors per block: two halves of 32 bytes.
        pub const U: usize = 2;
        /// i32 accumulators per token in the int8 kernels (16 registers, not 32).
        pub const NACC: usize = 2;
        /// i32-lane chunks of a `Ternary3` block in the f32 kernels: six of 8 bytes and one of 4.
        const T3_CHUNKS: usize = 7;

        /// The raw bytes of half `h` of a block (a `Ternary3` block's second half has 20 bytes).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn raw<const FMT3: bool>(blk: &[u8], h: usize) -> I {
            if FMT3 && h == 1 {
                let tail: &[u8; 20] = blk[32..52]
                    .try_into()
                    .expect("a Ternary3 block is 52 bytes");
                let five = _mm256_setr_epi32(-1, -1, -1, -1, -1, 0, 0, 0);
                // SAFETY: the mask selects dwords 0..5, the 20 bytes of `tail`; `vpmaskmovd` does not access
                // masked-off elements.
                unsafe { _mm256_maskload_epi32(tail.as_ptr().cast(), five) }
            } else {
                load(blk[32 * h..32 * (h + 1)].try_into().expect("32 bytes"))
            }
        }

        /// t of `Ternary2` plane `pl` (bits 2·pl..2·pl + 2 of every byte).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn t2_plane(raw: I, pl: usize) -> I {
            let v = match pl {
                0 => raw,
                1 => _mm256_srli_epi16::<2>(raw),
                2 => _mm256_srli_epi16::<4>(raw),
                _ => _mm256_srli_epi16::<6>(raw),
            };
            _mm256_and_si256(v, _mm256_set1_epi8(3))
        }

        /// The leading base-3 digit of each byte q: [q ≥ 86] + [q ≥ 171], each as min(q ⊖ threshold, 1)
        /// with saturating subtraction (AVX2 has no unsigned byte compare).
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn t3_digit(q: I) -> I {
            let one = _mm256_set1_epi8(1);
            let ge1 = _mm256_min_epu8(_mm256_subs_epu8(q, _mm256_set1_epi8(85)), one);
            let ge2 = _mm256_min_epu8(_mm256_subs_epu8(q, _mm256_set1_epi8(170u8 as i8)), one);
            _mm256_add_epi8(ge1, ge2)
        }

        /// 3·q mod 256 per byte.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn t3_next(q: I) -> I {
            _mm256_add_epi8(q, _mm256_add_epi8(q, q))
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub fn load_i32(v: &[i32; L]) -> I {
            // SAFETY: `v` is L readable i32 and the load is unaligned.
            unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
        }

        /// Weight of a code index's low 2 bits (t − 1), 8 entries for AVX2's `vpermps`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn code_table() -> F {
            _mm256_setr_ps(-1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0)
        }

        /// tbl[idx & 7] per lane.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn lookup(idx: I, tbl: F) -> F {
            _mm256_permutevar8x32_ps(tbl, idx)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn shift_plane(v: I, pl: usize) -> I {
            match pl {
                0 => v,
                1 => _mm256_srli_epi32::<2>(v),
                2 => _mm256_srli_epi32::<4>(v),
                _ => _mm256_srli_epi32::<6>(v),
            }
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn shr8(v: I) -> I {
            _mm256_srli_epi32::<8>(v)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn low_byte(v: I) -> I {
            _mm256_and_si256(v, _mm256_set1_epi32(0xFF))
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn mul_f(a: F, b: F) -> F {
            _mm256_mul_ps(a, b)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn widen_u8_4(b: &[u8; 4]) -> I {
            _mm256_cvtepu8_epi32(_mm_cvtsi32_si128(i32::from_le_bytes(*b)))
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn store4(o: &mut [f32; 4], v: F) {
            // SAFETY: `o` is 4 writable floats and the store is unaligned.
            unsafe { _mm_storeu_ps(o.as_mut_ptr(), _mm256_castps256_ps128(v)) }
        }

        ternary_f32_kernels!("avx2,fma");
    }

    /// AVX-512 with VNNI.
    pub(super) mod vnni {
        use super::w512::*;
        use crate::cpu::qmatmul::int8::x86::vnni::dot;
        use std::ops::Range;

        use super::super::{
            prefetch_ahead, scale_at, I8Prep, PackedWeights, Plan, PASS_TOKENS, SEG_BLOCKS,
            T3_PLANES,
        };

        ternary_i8_kernels!("avx512f,avx512bw,avx512vnni");
    }

    /// AVX-512 BW without VNNI.
    pub(super) mod bw512 {
        use super::w512::*;
        use crate::cpu::qmatmul::int8::x86::bw512::dot;
        use std::ops::Range;

        use super::super::{
            prefetch_ahead, scale_at, I8Prep, PackedWeights, Plan, PASS_TOKENS, SEG_BLOCKS,
            T3_PLANES,
        };

        ternary_i8_kernels!("avx512f,avx512bw");
    }

    /// AVX2.
    pub(super) mod avx2 {
        use super::w256::*;
        use std::ops::Range;

        use super::super::{
            prefetch_ahead, scale_at, I8Prep, PackedWeights, Plan, PASS_TOKENS, SEG_BLOCKS,
            T3_PLANES,
        };

        ternary_i8_kernels!("avx2,fma");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QTensor;

    /// Every dequantization path equals `QTensor::dequantize` (the f32 panel path only reaches the best one).
    #[test]
    fn dequantize_paths_match() {
        let formats = [
            QFormat::Ternary2 { group: Group::Row },
            QFormat::Ternary2 {
                group: Group::Size(32),
            },
            QFormat::Ternary2 {
                group: Group::Size(64),
            },
            QFormat::Ternary2 {
                group: Group::Size(128),
            },
            QFormat::Ternary2 {
                group: Group::Size(256),
            },
            QFormat::Ternary3 { group: Group::Row },
            QFormat::Ternary3 {
                group: Group::Size(256),
            },
            QFormat::Ternary3 {
                group: Group::Size(512),
            },
        ];
        for format in formats {
            for cols in [1, 31, 64, 255, 256, 300, 1000] {
                let rows = 5;
                let codes: Vec<i8> = (0..rows * cols)
                    .map(|k| ((k * 7 + k / 3) % 3) as i8 - 1)
                    .collect();
                let scales: Vec<f32> = (0..rows * format.groups_per_row(cols))
                    .map(|k| 0.5 + k as f32 * 0.25)
                    .collect();
                let q = QTensor::from_codes(format, rows, cols, &codes, &scales, None).unwrap();
                let want = q.dequantize();
                for &isa in QIsa::available() {
                    let mut got = vec![f32::NAN; (rows - 1) * cols];
                    dequantize_rows_with(&q.packed(), 1..rows, &mut got, isa);
                    assert_eq!(got, want[cols..], "{format:?} cols {cols} {isa:?}");
                }
            }
        }
    }
}
