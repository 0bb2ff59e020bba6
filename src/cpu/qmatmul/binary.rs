//! Binary weights — bit k of a row is b = ±1, ŵ = α·b + β with one scale α and an optional offset β per
//! row — times f32, int8 or binarised activations.
//!
//! Every path computes D = Σ b·x̂ (x̂ in its integer form for int8 and binary activations) and
//! y = s_x·(α·D + β·Σx̂):
//! - **int8**: D = 2·Σ_{b=1} x − Σx, exact. On AVX-512 the 64 bits of a weight word are the byte mask
//!   (`__mmask64`) that zeroes x where b = 0 (`vmovdqu8 {z}`), and `vpdpbusd` against a vector of ones
//!   adds the rest into i32 lanes (without VNNI, `vpmaddubsw` + `vpmaddwd` against ones: pair sums
//!   ≤ 2·128). AVX2 expands 32 bits into a byte mask (broadcast, `vpshufb`, and, compare). A column adds
//!   at most 128 to one lane, and lanes are reduced every [`SEG_BLOCKS`]·256 columns, so nothing
//!   overflows.
//! - **f32**: D = 2·Σ_{b=1} x − Σx. AVX-512 adds x under the 16 weight bits as the lane mask
//!   (`vaddps {k}`: one op per 16 weights and token); AVX2 loads the lane mask of each byte of bits from a
//!   table and ands it with x.
//!
//! The kernels prefetch the weight stream ahead of the row walk (see `ternary::PREFETCH_BYTES`); the
//! portable paths unpack each row's bits once and reuse them for every token.
//! - **binary** (XNOR-popcount): D = cols − 2·popcount(w ⊕ x), since bits past `cols` are 0 in both, and
//!   Σx̂/β_x = 2·popcount(x) − cols. With VPOPCNTDQ (detected separately from the [`QIsa`] families) 8
//!   words go through one `vpopcntq` on the AVX-512 paths; otherwise each word is a scalar `popcnt` (x86)
//!   or `count_ones` (portable), four ops per 64 weights, which is far below the memory time anyway.
//!
//! Bounds: a packed row is whole 8-byte words; int8 activation rows are padded to 256 columns and binary
//! ones to 4 words per 256 columns, at least the weight row's length; f32 activations are padded here.
//! Vector loads read fixed-size arrays borrowed from those slices, or masked loads whose masked-off
//! elements are not accessed.

use std::ops::Range;

use super::int8::{check, pad_f32};
#[cfg(target_arch = "x86_64")]
use super::ternary::{prefetch_ahead, PASS_TOKENS, SEG_BLOCKS};
use super::{BinaryActs, Int8Acts, PackedWeights, QIsa};

/// [`prefetch_ahead`] once per 64 bytes of a row walked in pieces of `piece`'s size, `q` counting pieces.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse")]
#[inline]
fn prefetch_line<T>(q: usize, piece: &[T]) {
    if q.is_multiple_of((64 / std::mem::size_of_val(piece)).max(1)) {
        prefetch_ahead(piece);
    }
}

/// y = s_x·(α·D + β·Σx̂) for a row and a token, given D.
struct Epilogue<'a> {
    alpha: &'a [f32],
    /// Per-row offsets; empty without them.
    beta: &'a [f32],
    /// Σx̂ per token in the units of D.
    xsum: Vec<f32>,
    /// s_x per token (1 for f32 activations).
    xscale: Vec<f32>,
}

impl Epilogue<'_> {
    #[inline(always)]
    fn y(&self, r: usize, i: usize, d: f32) -> f32 {
        let beta = self.beta.get(r).copied().unwrap_or(0.0);
        self.xscale[i] * (self.alpha[r] * d + beta * self.xsum[i])
    }
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
    let len = w.row_bytes() * 8;
    let xp = pad_f32(x, m, w.cols, len);
    let epi = Epilogue {
        alpha: w.scales,
        beta: w.mins,
        xsum: xp
            .chunks_exact(len)
            .map(|x| x.iter().map(|&v| f64::from(v)).sum::<f64>() as f32)
            .collect(),
        xscale: vec![1.0; m],
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists the AVX-512 ISAs only
        // where AVX-512 F/BW/VL were detected.
        QIsa::Avx512Vnni | QIsa::Avx512 => unsafe {
            x86::w512::binary_f32(w, &xp, len, m, &epi, rows, t)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::avx2::binary_f32(w, &xp, len, m, &epi, rows, t) },
        _ => {
            let mut sel = vec![0f32; len];
            for (r, tr) in rows.zip(t.chunks_exact_mut(m)) {
                unpack_bits(w.row(r), &mut sel);
                for (i, (y, x)) in tr.iter_mut().zip(xp.chunks_exact(len)).enumerate() {
                    let s1: f32 = sel.iter().zip(x).map(|(&b, &x)| b * x).sum();
                    *y = epi.y(r, i, 2.0 * s1 - epi.xsum[i]);
                }
            }
        }
    }
}

/// y[i, r] for per-token int8 activations and weight rows `rows`, into `t` (t[(r − rows.start)·m + i]).
pub fn matmul_i8(w: &PackedWeights, acts: &Int8Acts, rows: Range<usize>, t: &mut [f32], isa: QIsa) {
    check(w, rows.clone(), acts.m, t, isa);
    assert!(acts.cols == w.cols && acts.padded >= w.row_bytes() * 8);
    if w.cols == 0 {
        t.fill(0.0);
        return;
    }
    let xsum: Vec<i64> = (0..acts.m)
        .map(|i| acts.row(i).iter().map(|&v| i64::from(v)).sum())
        .collect();
    let epi = Epilogue {
        alpha: w.scales,
        beta: w.mins,
        xsum: xsum.iter().map(|&s| s as f32).collect(),
        xscale: acts.scales.clone(),
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists Avx512Vnni only where
        // AVX-512 F/BW/VL and VNNI were detected.
        QIsa::Avx512Vnni => unsafe { x86::vnni::binary_i8(w, acts, &xsum, &epi, rows, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx512 is listed only where AVX-512 F/BW/VL were detected.
        QIsa::Avx512 => unsafe { x86::bw512::binary_i8(w, acts, &xsum, &epi, rows, t) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::avx2::binary_i8(w, acts, &xsum, &epi, rows, t) },
        _ => {
            let mut sel = vec![0i32; w.row_bytes() * 8];
            for (r, tr) in rows.zip(t.chunks_exact_mut(acts.m)) {
                unpack_bits(w.row(r), &mut sel);
                for (i, y) in tr.iter_mut().enumerate() {
                    // i32 per 2¹⁶ columns (each adds at most 128), then i64.
                    let s1: i64 = sel
                        .chunks(1 << 16)
                        .zip(acts.row(i).chunks(1 << 16))
                        .map(|(b, x)| {
                            i64::from(
                                b.iter()
                                    .zip(x)
                                    .map(|(&b, &x)| b * i32::from(x))
                                    .sum::<i32>(),
                            )
                        })
                        .sum();
                    *y = epi.y(r, i, (2 * s1 - xsum[i]) as f32);
                }
            }
        }
    }
}

/// y[i, r] for binarised activations and weight rows `rows` (XNOR-popcount), into `t`.
pub fn matmul_binary(
    w: &PackedWeights,
    acts: &BinaryActs,
    rows: Range<usize>,
    t: &mut [f32],
    isa: QIsa,
) {
    check(w, rows.clone(), acts.m, t, isa);
    assert!(acts.cols == w.cols && acts.words * 8 >= w.row_bytes());
    if w.cols == 0 {
        t.fill(0.0);
        return;
    }
    let cols = w.cols as i64;
    let epi = Epilogue {
        alpha: w.scales,
        beta: w.mins,
        xsum: (0..acts.m)
            .map(|i| {
                let ones: i64 = acts.row(i).iter().map(|v| i64::from(v.count_ones())).sum();
                (2 * ones - cols) as f32
            })
            .collect(),
        xscale: acts.scales.clone(),
    };
    match isa {
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni | QIsa::Avx512 if is_x86_feature_detected!("avx512vpopcntdq") => {
            // SAFETY: `check` asserted that `isa` is in `QIsa::available()`, which lists the AVX-512 ISAs
            // only where AVX-512 F/BW/VL were detected; VPOPCNTDQ was detected just above.
            unsafe { x86::w512::binary_pop(w, acts, &epi, rows, t) }
        }
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni | QIsa::Avx512 | QIsa::Avx2 if is_x86_feature_detected!("popcnt") => {
            // SAFETY: POPCNT was detected just above.
            unsafe { x86::pop_scalar(w, acts, &epi, rows, t) }
        }
        _ => pop_rows(w, acts, &epi, rows, t),
    }
}

/// Dequantizes weight rows `rows` into `out` (`rows.len() · cols`): α·b + β.
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
        QIsa::Avx512Vnni | QIsa::Avx512 => unsafe { x86::w512::binary_dequant(w, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is listed only where AVX2 and FMA were detected.
        QIsa::Avx2 => unsafe { x86::avx2::binary_dequant(w, rows, out) },
        _ => {
            for (r, o) in rows.zip(out.chunks_exact_mut(w.cols)) {
                let (lo, hi) = levels(w, r);
                for (o, b) in o.iter_mut().zip(bits(w.row(r))) {
                    *o = if b { hi } else { lo };
                }
            }
        }
    }
}

/// The two weights of row `r`: α·(−1) + β and α·1 + β, rounded as `QTensor::dequantize` rounds them.
fn levels(w: &PackedWeights, r: usize) -> (f32, f32) {
    let (alpha, beta) = (w.scales[r], w.mins.get(r).copied().unwrap_or(0.0));
    (-alpha + beta, alpha + beta)
}

/// The bits of a packed row as 0 or 1 in `out` (8 per byte), for the portable paths to multiply.
fn unpack_bits<T: From<u8>>(row: &[u8], out: &mut [T]) {
    for (o, &byte) in out.chunks_exact_mut(8).zip(row) {
        for (k, o) in o.iter_mut().enumerate() {
            *o = T::from(byte >> k & 1);
        }
    }
}

/// The bits of a packed row, weight order.
fn bits(row: &[u8]) -> impl Iterator<Item = bool> + '_ {
    row.iter()
        .flat_map(|&b| (0..8).map(move |k| b >> k & 1 == 1))
}

/// Σ popcount(w ⊕ x) of one row for each token in `xs`.
#[inline(always)]
fn xor_popcounts<const T: usize>(row: &[u8], xs: [&[u64]; T]) -> [i64; T] {
    let mut p = [0i64; T];
    for (j, word) in row.as_chunks::<8>().0.iter().enumerate() {
        let wv = u64::from_le_bytes(*word);
        for (p, x) in p.iter_mut().zip(&xs) {
            *p += i64::from((wv ^ x[j]).count_ones());
        }
    }
    p
}

/// XNOR-popcount with scalar popcounts; `#[inline(always)]` so that [`x86::pop_scalar`] compiles it with
/// POPCNT.
#[inline(always)]
fn pop_rows(
    w: &PackedWeights,
    acts: &BinaryActs,
    epi: &Epilogue,
    rows: Range<usize>,
    t: &mut [f32],
) {
    let (m, cols) = (acts.m, w.cols as i64);
    for (r, tr) in rows.zip(t.chunks_exact_mut(m)) {
        let row = w.row(r);
        for (i, y) in tr.iter_mut().enumerate() {
            let [p] = xor_popcounts(row, [acts.row(i)]);
            *y = epi.y(r, i, (cols - 2 * p) as f32);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::ops::Range;

    use super::{pop_rows, BinaryActs, Epilogue, PackedWeights};

    /// [`pop_rows`] with the POPCNT instruction.
    #[target_feature(enable = "popcnt")]
    pub(super) fn pop_scalar(
        w: &PackedWeights,
        acts: &BinaryActs,
        epi: &Epilogue,
        rows: Range<usize>,
        t: &mut [f32],
    ) {
        pop_rows(w, acts, epi, rows, t)
    }

    /// The int8-activation kernel, expanded into each dot-product module.
    macro_rules! binary_i8_kernel {
        ($features:literal) => {
            const _: () = assert!(TB <= PASS_TOKENS);

            /// Binary weights × int8 activations: y from 2·Σ_{b=1} x − Σx (see the module docs).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul::binary) fn binary_i8(
                w: &PackedWeights,
                acts: &Int8Acts,
                xsum: &[i64],
                epi: &Epilogue,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                let (m, r0) = (acts.m, rows.start);
                for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                    let bits = w.row(r).as_chunks::<{ W / 8 }>().0;
                    let xs = |k: usize| &acts.row(i0 + k).as_chunks::<W>().0[..bits.len()];
                    let mut s1 = [0i64; PASS_TOKENS];
                    match n {
                        1 => s1[..1].copy_from_slice(&ones_row::<1>(bits, [xs(0)])),
                        2 => s1[..2].copy_from_slice(&ones_row::<2>(bits, [xs(0), xs(1)])),
                        3 => s1[..3].copy_from_slice(&ones_row::<3>(bits, [xs(0), xs(1), xs(2)])),
                        _ => {
                            s1[..TB].copy_from_slice(&ones_row::<TB>(bits, std::array::from_fn(xs)))
                        }
                    }
                    for (k, &s) in s1[..n].iter().enumerate() {
                        let i = i0 + k;
                        t[(r - r0) * m + i] = epi.y(r, i, (2 * s - xsum[i]) as f32);
                    }
                });
            }

            /// Σ_{b=1} x of one row for `T` tokens, exact.
            #[target_feature(enable = $features)]
            #[inline]
            fn ones_row<const T: usize>(bits: &[[u8; W / 8]], xs: [&[[i8; W]]; T]) -> [i64; T] {
                let ones = splat_u8(1);
                let seg = SEG_BLOCKS * 256 / W;
                let mut s = [0i64; T];
                for (c, bs) in bits.chunks(seg).enumerate() {
                    let mut acc = [[izero(); NACC]; T];
                    // Whole groups of NACC vectors, so that each accumulator index is a constant and
                    // the accumulators stay in registers.
                    let (groups, rest) = bs.as_chunks::<NACC>();
                    for (q, group) in groups.iter().enumerate() {
                        prefetch_line(q, group);
                        let v0 = c * seg + q * NACC;
                        let mut xq: [&[[i8; W]]; T] = [&[]; T];
                        for (xq, x) in xq.iter_mut().zip(&xs) {
                            *xq = &x[v0..v0 + NACC];
                        }
                        for (j, b) in group.iter().enumerate() {
                            let sel = select(b);
                            for (a, x) in acc.iter_mut().zip(&xq) {
                                a[j] = dot(a[j], ones, masked(sel, load_i8(&x[j])));
                            }
                        }
                    }
                    for (j, b) in rest.iter().enumerate() {
                        let (v, sel) = (c * seg + groups.len() * NACC + j, select(b));
                        for (a, x) in acc.iter_mut().zip(&xs) {
                            a[0] = dot(a[0], ones, masked(sel, load_i8(&x[v])));
                        }
                    }
                    for (s, a) in s.iter_mut().zip(&acc) {
                        let mut v = a[0];
                        for &a in &a[1..] {
                            v = add_i(v, a);
                        }
                        *s += i64::from(hsum_i(v));
                    }
                }
                s
            }
        };
    }

    /// The f32-activation and dequantization kernels, expanded into each width module.
    macro_rules! binary_f32_kernels {
        ($features:literal) => {
            const _: () = assert!(TB <= PASS_TOKENS);

            /// Binary weights × f32 activations `xp` (`m` tokens, each padded with zeros to `len`).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul::binary) fn binary_f32(
                w: &PackedWeights,
                xp: &[f32],
                len: usize,
                m: usize,
                epi: &Epilogue,
                rows: Range<usize>,
                t: &mut [f32],
            ) {
                let r0 = rows.start;
                for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                    let bits = w.row(r).as_chunks::<{ L / 8 }>().0;
                    let xs = |k: usize| xp[(i0 + k) * len..(i0 + k + 1) * len].as_chunks::<L>().0;
                    let mut s1 = [0f32; PASS_TOKENS];
                    match n {
                        1 => s1[..1].copy_from_slice(&ones_row_f32::<1>(bits, [xs(0)])),
                        2 => s1[..2].copy_from_slice(&ones_row_f32::<2>(bits, [xs(0), xs(1)])),
                        3 => {
                            s1[..3].copy_from_slice(&ones_row_f32::<3>(bits, [xs(0), xs(1), xs(2)]))
                        }
                        _ => s1[..TB]
                            .copy_from_slice(&ones_row_f32::<TB>(bits, std::array::from_fn(xs))),
                    }
                    for (k, &s) in s1[..n].iter().enumerate() {
                        let i = i0 + k;
                        t[(r - r0) * m + i] = epi.y(r, i, 2.0 * s - epi.xsum[i]);
                    }
                });
            }

            /// Σ_{b=1} x of one row for `T` tokens.
            #[target_feature(enable = $features)]
            #[inline]
            fn ones_row_f32<const T: usize>(
                bits: &[[u8; L / 8]],
                xs: [&[[f32; L]]; T],
            ) -> [f32; T] {
                // Four chains per token hide the add latency when there is one token; groups of four
                // vectors keep each accumulator index constant, so they stay in registers.
                let mut acc = [[fzero(); 4]; T];
                let (groups, rest) = bits.as_chunks::<4>();
                for (q, group) in groups.iter().enumerate() {
                    prefetch_line(q, group);
                    let mut xq: [&[[f32; L]]; T] = [&[]; T];
                    for (xq, x) in xq.iter_mut().zip(&xs) {
                        *xq = &x[4 * q..4 * q + 4];
                    }
                    for (j, b) in group.iter().enumerate() {
                        let sel = fselect(b);
                        for (a, x) in acc.iter_mut().zip(&xq) {
                            a[j] = masked_add(a[j], sel, loadf(&x[j]));
                        }
                    }
                }
                for (j, b) in rest.iter().enumerate() {
                    let (v, sel) = (4 * groups.len() + j, fselect(b));
                    for (a, x) in acc.iter_mut().zip(&xs) {
                        a[0] = masked_add(a[0], sel, loadf(&x[v]));
                    }
                }
                let mut s = [0f32; T];
                for (s, a) in s.iter_mut().zip(&acc) {
                    *s = hsum_f(add_f(add_f(a[0], a[1]), add_f(a[2], a[3])));
                }
                s
            }

            /// Dequantizes rows `rows` into `out` (`rows.len() · cols`).
            #[target_feature(enable = $features)]
            pub(in crate::cpu::qmatmul::binary) fn binary_dequant(
                w: &PackedWeights,
                rows: Range<usize>,
                out: &mut [f32],
            ) {
                for (r, o) in rows.zip(out.chunks_exact_mut(w.cols)) {
                    let (lo, hi) = levels(w, r);
                    let (lo, hi) = (splat(lo), splat(hi));
                    let bits = w.row(r).as_chunks::<{ L / 8 }>().0;
                    let (full, tail) = o.as_chunks_mut::<L>();
                    for (dst, b) in full.iter_mut().zip(bits) {
                        storef(dst, blend(fselect(b), lo, hi));
                    }
                    if !tail.is_empty() {
                        let mut tmp = [0f32; L];
                        storef(&mut tmp, blend(fselect(&bits[full.len()]), lo, hi));
                        let n = tail.len();
                        tail.copy_from_slice(&tmp[..n]);
                    }
                }
            }
        };
    }

    /// 512-bit primitives (AVX-512 F/BW), the f32 kernels and the VPOPCNTDQ kernel.
    pub(super) mod w512 {
        pub(in crate::cpu::qmatmul) use crate::cpu::qmatmul::int8::for_tiles;
        pub use crate::cpu::qmatmul::int8::x86::avx512::*;
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            levels, prefetch_ahead, prefetch_line, BinaryActs, Epilogue, PackedWeights, PASS_TOKENS,
        };

        /// i32 accumulators per token in the int8 kernels.
        pub const NACC: usize = 4;

        /// The byte mask of 64 weight bits.
        #[inline(always)]
        pub fn select(b: &[u8; 8]) -> __mmask64 {
            u64::from_le_bytes(*b)
        }

        /// x where the weight bit is 1, else 0.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        pub fn masked(k: __mmask64, x: I) -> I {
            _mm512_maskz_mov_epi8(k, x)
        }

        /// The lane mask of 16 weight bits.
        #[inline(always)]
        fn fselect(b: &[u8; 2]) -> __mmask16 {
            u16::from_le_bytes(*b)
        }

        /// acc + x in the lanes whose weight bit is 1.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn masked_add(acc: F, k: __mmask16, x: F) -> F {
            _mm512_mask_add_ps(acc, k, acc, x)
        }

        /// `hi` where the weight bit is 1, else `lo`.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn blend(k: __mmask16, lo: F, hi: F) -> F {
            _mm512_mask_blend_ps(k, lo, hi)
        }

        binary_f32_kernels!("avx512f,avx512bw");

        /// XNOR-popcount with `vpopcntq`, 8 words per instruction.
        #[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
        pub(in crate::cpu::qmatmul::binary) fn binary_pop(
            w: &PackedWeights,
            acts: &BinaryActs,
            epi: &Epilogue,
            rows: Range<usize>,
            t: &mut [f32],
        ) {
            let (m, r0, cols) = (acts.m, rows.start, w.cols as i64);
            for_tiles(rows, m, w.row_bytes(), TB, |r, i0, n| {
                let mut p = [0i64; TB];
                let row = w.row(r);
                let xs = |k: usize| acts.row(i0 + k);
                match n {
                    1 => p[..1].copy_from_slice(&popcounts::<1>(row, [xs(0)])),
                    2 => p[..2].copy_from_slice(&popcounts::<2>(row, [xs(0), xs(1)])),
                    3 => p[..3].copy_from_slice(&popcounts::<3>(row, [xs(0), xs(1), xs(2)])),
                    _ => p = popcounts::<TB>(row, std::array::from_fn(xs)),
                }
                for (k, &p) in p[..n].iter().enumerate() {
                    t[(r - r0) * m + i0 + k] = epi.y(r, i0 + k, (cols - 2 * p) as f32);
                }
            });
        }

        /// Σ popcount(w ⊕ x) of one row (whole 8-byte words) for `T` tokens (each at least as many words).
        #[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
        #[inline]
        fn popcounts<const T: usize>(row: &[u8], xs: [&[u64]; T]) -> [i64; T] {
            let (full, tail) = row.as_chunks::<64>();
            let mut acc = [_mm512_setzero_si512(); T];
            for (j, wb) in full.iter().enumerate() {
                prefetch_ahead(wb);
                let wv = load(wb);
                for (a, x) in acc.iter_mut().zip(&xs) {
                    let x: &[u64; 8] = x[8 * j..8 * j + 8].try_into().expect("8 words");
                    // SAFETY: `x` is 64 readable bytes and the load is unaligned.
                    let xv = unsafe { _mm512_loadu_si512(x.as_ptr().cast()) };
                    *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(_mm512_xor_si512(wv, xv)));
                }
            }
            if !tail.is_empty() {
                let words = tail.len() / 8;
                let k: __mmask8 = (1u8 << words) - 1;
                // SAFETY: the mask selects the `words` words of `tail`; masked-off words are not accessed.
                let wv = unsafe { _mm512_maskz_loadu_epi64(k, tail.as_ptr().cast()) };
                for (a, x) in acc.iter_mut().zip(&xs) {
                    let x = &x[8 * full.len()..8 * full.len() + words];
                    // SAFETY: as above, for the `words` words of `x`.
                    let xv = unsafe { _mm512_maskz_loadu_epi64(k, x.as_ptr().cast()) };
                    *a = _mm512_add_epi64(*a, _mm512_popcnt_epi64(_mm512_xor_si512(wv, xv)));
                }
            }
            let mut p = [0i64; T];
            for (p, &a) in p.iter_mut().zip(&acc) {
                *p = _mm512_reduce_add_epi64(a);
            }
            p
        }
    }

    /// AVX-512 with VNNI.
    pub(super) mod vnni {
        use super::w512::*;
        use crate::cpu::qmatmul::int8::x86::vnni::dot;
        use std::ops::Range;

        use super::super::{
            prefetch_line, Epilogue, Int8Acts, PackedWeights, PASS_TOKENS, SEG_BLOCKS,
        };

        binary_i8_kernel!("avx512f,avx512bw,avx512vnni");
    }

    /// AVX-512 BW without VNNI.
    pub(super) mod bw512 {
        use super::w512::*;
        use crate::cpu::qmatmul::int8::x86::bw512::dot;
        use std::ops::Range;

        use super::super::{
            prefetch_line, Epilogue, Int8Acts, PackedWeights, PASS_TOKENS, SEG_BLOCKS,
        };

        binary_i8_kernel!("avx512f,avx512bw");
    }

    /// AVX2: all three kernels on 256-bit vectors.
    pub(super) mod avx2 {
        use crate::cpu::qmatmul::int8::for_tiles;
        use crate::cpu::qmatmul::int8::x86::avx2::*;
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::{
            levels, prefetch_line, Epilogue, Int8Acts, PackedWeights, PASS_TOKENS, SEG_BLOCKS,
        };

        /// i32 accumulators per token (16 registers, not 32).
        const NACC: usize = 2;

        /// 0xFF in the bytes whose weight bit (of 32) is 1: byte k of the broadcast word goes to lanes
        /// 8k..8k + 8, each lane tests its own bit.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn select(b: &[u8; 4]) -> I {
            let v = _mm256_set1_epi32(i32::from_le_bytes(*b));
            let spread = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let v = _mm256_and_si256(_mm256_shuffle_epi8(v, spread), bit);
            _mm256_cmpeq_epi8(v, bit)
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn masked(sel: I, x: I) -> I {
            _mm256_and_si256(sel, x)
        }

        /// The lane masks of every byte of weight bits, 32-byte aligned (8 KiB, stays in L1): one load
        /// replaces the broadcast, and and compare that would build a mask from the byte (the 11008×4096
        /// f32 GEMV took 1.9 ms instead of 2.4 with them).
        #[repr(C, align(32))]
        struct ByteMasks([[u32; 8]; 256]);

        static BYTE_MASKS: ByteMasks = ByteMasks(byte_masks());

        const fn byte_masks() -> [[u32; 8]; 256] {
            let mut masks = [[0u32; 8]; 256];
            let mut b = 0;
            while b < 256 {
                let mut l = 0;
                while l < 8 {
                    if b >> l & 1 == 1 {
                        masks[b][l] = u32::MAX;
                    }
                    l += 1;
                }
                b += 1;
            }
            masks
        }

        /// All-ones in the lanes whose weight bit (of 8) is 1.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn fselect(b: &[u8; 1]) -> F {
            let mask = &BYTE_MASKS.0[usize::from(b[0])];
            // SAFETY: `mask` is 8 readable u32 and the load is unaligned.
            unsafe { _mm256_loadu_ps(mask.as_ptr().cast()) }
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn masked_add(acc: F, sel: F, x: F) -> F {
            _mm256_add_ps(acc, _mm256_and_ps(sel, x))
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        fn blend(sel: F, lo: F, hi: F) -> F {
            _mm256_blendv_ps(lo, hi, sel)
        }

        binary_i8_kernel!("avx2,fma");
        binary_f32_kernels!("avx2,fma");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QFormat, QTensor};

    /// Every dequantization path equals `QTensor::dequantize` (the f32 panel path only reaches the best one).
    #[test]
    fn dequantize_paths_match() {
        for offset in [false, true] {
            let format = QFormat::Binary { offset };
            for cols in [1, 7, 8, 63, 64, 65, 300] {
                let rows = 4;
                let codes: Vec<i8> = (0..rows * cols)
                    .map(|k| if (k * 7 + k / 5) % 3 == 0 { -1 } else { 1 })
                    .collect();
                let scales: Vec<f32> = (0..rows).map(|r| 0.3 + r as f32).collect();
                let mins: Vec<f32> = (0..rows).map(|r| 0.1 - r as f32 * 0.7).collect();
                let q = QTensor::from_codes(
                    format,
                    rows,
                    cols,
                    &codes,
                    &scales,
                    offset.then_some(&mins[..]),
                )
                .unwrap();
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
