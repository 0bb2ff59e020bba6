//! Group-32 int4 and int8 weights (GGUF's Q4_0, Q4_1 and Q8_0) repacked for decoding, multiplied by
//! int8 activations with one scale per block of 32 ([`ActMode::Int8Blocks`](super::ActMode), the form
//! llama.cpp gives activations against these weights).
//!
//! # Layout
//! Rows go in tiles of [`TILE_ROWS`] = 16; a tile stores, for each group of 32 columns in order, the
//! group's codes for its 16 rows, then the 16 rows' scales, then (asymmetric int4) their 16 mins. The
//! scales and mins are f16 when every one of them is an f16 value (GGUF stores them so), else f32:
//! decoding streams every weight byte once per token, and f16 saves a sixth of an int4 group's bytes.
//! The codes of one group are 8 *quads* of 4 columns; quad j is 64 bytes with byte 4r + b = row r,
//! column 4j + b, so one `vpdpbusd` against the token's 4 activations of quad j broadcast to every lane
//! adds 4 products to each of the 16 rows' lanes. Every lane is one row: no horizontal sums, and a
//! group's scales apply as one 16-wide vector.
//! - int4: quads 2p and 2p + 1 share 64 bytes, 2p in the low nibbles and 2p + 1 in the high ones
//!   (256 bytes per group). Nibbles are stored as the unsigned u of the source format: w = s·(u − 8)
//!   for symmetric int4, w = s·u + min for asymmetric int4.
//! - int8: code c is stored as c + 128 (512 bytes per group), an unsigned byte as `vpdpbusd` wants
//!   its first operand; the activations are the signed operand.
//!
//! # Arithmetic
//! With activations x̂ = s_g·q (q in −127..127 per block g of 32), a row's product is
//! Σ_g d_g·s_g·(Σ u·q − f·Σq) + min_g·s_g·Σq, where f = 8 (symmetric int4), 128 (int8) or 0
//! (asymmetric int4). Σ u·q is exact in i32 (|u·q| ≤ 255·127, 32 terms). Rows past the matrix are
//! zero-scale padding; columns past it have zero activations, so their codes never count.

use std::ops::Range;

use rayon::prelude::*;

use super::{PackedWeights, QIsa};
use crate::quant::format::{Group, QFormat};

/// Rows per tile: one 512-bit vector of i32 or f32 lanes.
pub const TILE_ROWS: usize = 16;
/// Columns per group of weights and per block of activations.
pub const GROUP: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Int4Sym,
    Int4Asym,
    Int8,
}

impl Kind {
    fn code_bytes(self) -> usize {
        match self {
            Kind::Int4Sym | Kind::Int4Asym => GROUP * TILE_ROWS / 2,
            Kind::Int8 => GROUP * TILE_ROWS,
        }
    }

    /// The f of the module docs: what the stored unsigned code exceeds the signed one by.
    fn bias(self) -> i32 {
        match self {
            Kind::Int4Sym => 8,
            Kind::Int4Asym => 0,
            Kind::Int8 => 128,
        }
    }

    /// Bytes of one group: codes, then the scale vector (and the min vector) of `width`-byte floats.
    fn group_bytes(self, width: usize) -> usize {
        let vectors = if self == Kind::Int4Asym { 2 } else { 1 };
        self.code_bytes() + vectors * TILE_ROWS * width
    }
}

/// A weight matrix in the tile layout of the module docs.
#[derive(Clone, Debug)]
pub struct Interleaved {
    kind: Kind,
    rows: usize,
    cols: usize,
    groups: usize,
    tiles: usize,
    /// Bytes per scale and min: 2 (f16) or 4 (f32).
    width: usize,
    data: Vec<u8>,
}

impl Interleaved {
    /// Whether `format` has a tile layout: int4 or int8 in groups of 32.
    pub fn supports(format: QFormat) -> bool {
        Interleaved::kind(format).is_some()
    }

    fn kind(format: QFormat) -> Option<Kind> {
        match format {
            QFormat::Int4 {
                group: Group::Size(GROUP),
                asym,
            } => Some(if asym { Kind::Int4Asym } else { Kind::Int4Sym }),
            QFormat::Int8 {
                group: Group::Size(GROUP),
            } => Some(Kind::Int8),
            _ => None,
        }
    }

    /// The tile layout of `w`; `None` for a format without one (see [`Interleaved::supports`]).
    pub fn new(w: &PackedWeights) -> Option<Interleaved> {
        let kind = Interleaved::kind(w.format)?;
        let groups = w.cols.div_ceil(GROUP);
        let tiles = w.rows.div_ceil(TILE_ROWS);
        let exact_f16 = |v: &f32| half::f16::from_f32(*v).to_f32().to_bits() == v.to_bits();
        let width = if w.scales.iter().chain(w.mins).all(exact_f16) {
            2
        } else {
            4
        };
        let (cb, gb) = (kind.code_bytes(), kind.group_bytes(width));
        let mut data = vec![0u8; tiles * groups * gb];
        let mut u = vec![0u8; groups * GROUP];
        for r in 0..w.rows {
            stored_codes(w, r, kind, &mut u);
            let (tile, lane) = (r / TILE_ROWS, r % TILE_ROWS);
            for g in 0..groups {
                let blk = &mut data[(tile * groups + g) * gb..][..gb];
                for (k, &c) in u[g * GROUP..(g + 1) * GROUP].iter().enumerate() {
                    let (quad, b) = (k / 4, k % 4);
                    match kind {
                        Kind::Int8 => blk[quad * 64 + 4 * lane + b] = c,
                        _ => blk[(quad / 2) * 64 + 4 * lane + b] |= c << (4 * (quad % 2)),
                    }
                }
                let gi = r * w.groups_per_row() + g;
                let put = |blk: &mut [u8], at: usize, v: f32| {
                    let at = at + width * lane;
                    if width == 2 {
                        blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    } else {
                        blk[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                };
                put(blk, cb, w.scales[gi]);
                if kind == Kind::Int4Asym {
                    put(blk, cb + TILE_ROWS * width, w.mins[gi]);
                }
            }
        }
        Some(Interleaved {
            kind,
            rows: w.rows,
            cols: w.cols,
            groups,
            tiles,
            width,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of the repacked weights.
    pub fn byte_size(&self) -> usize {
        self.data.len()
    }

    fn group_bytes(&self) -> usize {
        self.kind.group_bytes(self.width)
    }

    fn tile(&self, t: usize) -> &[u8] {
        let tb = self.groups * self.group_bytes();
        &self.data[t * tb..(t + 1) * tb]
    }
}

/// Row `r`'s codes as the layout stores them (unsigned u for int4, c + 128 for int8), zero-weight
/// codes past `cols`.
fn stored_codes(w: &PackedWeights, r: usize, kind: Kind, out: &mut [u8]) {
    let row = w.row(r);
    let pad = if kind == Kind::Int4Sym { 8 } else { 0 };
    out.fill(if kind == Kind::Int8 { 128 } else { pad });
    match kind {
        Kind::Int8 => {
            for (o, &b) in out.iter_mut().zip(row).take(w.cols) {
                *o = b ^ 0x80;
            }
        }
        _ => {
            for (blk, o) in row.chunks_exact(64).zip(out.chunks_mut(128)) {
                for (i, &b) in blk.iter().enumerate() {
                    if let Some(v) = o.get_mut(i) {
                        *v = b & 0x0F;
                    }
                    if let Some(v) = o.get_mut(64 + i) {
                        *v = b >> 4;
                    }
                }
            }
            out[w.cols..].fill(pad);
        }
    }
}

/// Activations quantized per block of [`GROUP`]: token i's block g is `scales[i·groups + g]` ·
/// `q[(i·groups + g)·32..][..32]`, zero past `cols`; `sums` holds each block's Σq.
#[derive(Clone, Debug)]
pub struct BlockActs {
    pub m: usize,
    pub cols: usize,
    pub groups: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
}

impl BlockActs {
    /// s = max|x|/127 per block, q = x/s rounded to the nearest integer, ties to even; an all-zero
    /// block has s = 0.
    pub fn quantize(x: &[f32], m: usize, cols: usize) -> BlockActs {
        // Adding and subtracting 1.5·2²³ rounds any |v| < 2²² to an integer, ties to even, in two
        // additions: `f32::round` is a library call on the baseline x86-64 target, and this runs on
        // every activation of every product.
        const ROUND: f32 = 12_582_912.0;
        let groups = cols.div_ceil(GROUP);
        let mut q = vec![0i8; m * groups * GROUP];
        let mut scales = vec![0f32; m * groups];
        let mut sums = vec![0i32; m * groups];
        for (i, row) in x.chunks(cols.max(1)).take(m).enumerate() {
            for (g, xs) in row.chunks(GROUP).enumerate() {
                let b = i * groups + g;
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                if amax > 0.0 {
                    let inv = 127.0 / amax;
                    let qs = &mut q[b * GROUP..b * GROUP + xs.len()];
                    for (q, &v) in qs.iter_mut().zip(xs) {
                        *q = ((v * inv + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
                    }
                    scales[b] = amax / 127.0;
                    sums[b] = qs.iter().map(|&v| i32::from(v)).sum();
                }
            }
        }
        BlockActs {
            m,
            cols,
            groups,
            q,
            scales,
            sums,
        }
    }

    /// The values the kernels multiply, `m · cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.m * self.cols);
        for i in 0..self.m {
            for k in 0..self.cols {
                let b = i * self.groups + k / GROUP;
                out.push(self.scales[b] * f32::from(self.q[b * GROUP + k % GROUP]));
            }
        }
        out
    }
}

/// Tokens whose products one pass over a tile computes (each weight vector, once unpacked, serves all).
const TB: usize = 4;

/// y[m, rows] = x̂ · Ŵᵀ with x̂ the per-block int8 form of `x` (`m · cols`, row-major).
///
/// # Panics
/// If `x` or `out` is too short for the shapes or this CPU lacks `isa`.
pub fn matmul(w: &Interleaved, x: &[f32], m: usize, out: &mut [f32], isa: QIsa) {
    assert!(QIsa::available().contains(&isa));
    assert!(x.len() >= m * w.cols && out.len() >= m * w.rows);
    if m == 0 || w.rows == 0 {
        return;
    }
    if m == 1 {
        return matvec_many(&[w], &x[..w.cols], &mut [&mut out[..w.rows]], isa);
    }
    let acts = BlockActs::quantize(x, m, w.cols);
    // Eight tasks per thread: several tokens are enough work per task to balance finely.
    let threads = rayon::current_num_threads().max(1);
    let chunk = w.tiles.div_ceil(threads * 8).max(1);
    let tasks = w.tiles.div_ceil(chunk);
    let parts: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|c| {
            let tiles = c * chunk..((c + 1) * chunk).min(w.tiles);
            let n = (tiles.end * TILE_ROWS).min(w.rows) - tiles.start * TILE_ROWS;
            let mut part = vec![0f32; m * n];
            run_tiles(w, &acts, tiles, &mut part, n, isa);
            part
        })
        .collect();
    for (c, part) in parts.iter().enumerate() {
        let r0 = c * chunk * TILE_ROWS;
        let n = part.len() / m;
        for (i, y) in part.chunks_exact(n).enumerate() {
            out[i * w.rows + r0..i * w.rows + r0 + n].copy_from_slice(y);
        }
    }
}

/// One token's products with several matrices of the same `cols` (a layer's q, k and v projections),
/// `outs[j]` = x̂·W_jᵀ: the activations are quantized once and every matrix's tiles share one parallel
/// region, which costs one wake-up of the thread pool instead of one per matrix.
///
/// # Panics
/// If the matrices' `cols` differ from `x.len()`, an `outs[j]` is shorter than `ws[j].rows`, or this
/// CPU lacks `isa`.
pub fn matvec_many(ws: &[&Interleaved], x: &[f32], outs: &mut [&mut [f32]], isa: QIsa) {
    assert!(QIsa::available().contains(&isa) && ws.len() == outs.len());
    assert!(ws.iter().all(|w| w.cols == x.len()));
    let acts = BlockActs::quantize(x, 1, x.len());
    // Two tasks per thread: one token is microseconds of work, and scheduling more tasks costs more
    // than the balance gains.
    let threads = rayon::current_num_threads().max(1);
    let tiles: usize = ws.iter().map(|w| w.tiles).sum();
    let chunk = tiles.div_ceil(threads * 2).max(1);
    let mut jobs = Vec::new();
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        assert!(out.len() >= w.rows);
        for (c, o) in out[..w.rows].chunks_mut(chunk * TILE_ROWS).enumerate() {
            jobs.push((*w, c * chunk..(c + 1) * chunk, o));
        }
    }
    jobs.into_par_iter().for_each(|(w, tiles, o)| {
        let ld = o.len();
        run_tiles(w, &acts, tiles, o, ld, isa);
    });
}

/// Rows of tiles `tiles` for every token: y[i, r] into `out[i·ld + r − first row]`.
fn run_tiles(
    w: &Interleaved,
    acts: &BlockActs,
    tiles: Range<usize>,
    out: &mut [f32],
    ld: usize,
    isa: QIsa,
) {
    let r0 = tiles.start * TILE_ROWS;
    for t in tiles.start..tiles.end.min(w.tiles) {
        let valid = (w.rows - t * TILE_ROWS).min(TILE_ROWS);
        for i0 in (0..acts.m).step_by(TB) {
            let n = TB.min(acts.m - i0);
            let mut y = [[0f32; TILE_ROWS]; TB];
            tile(w, t, acts, i0..i0 + n, &mut y, isa);
            for (k, yk) in y[..n].iter().enumerate() {
                let at = (i0 + k) * ld + t * TILE_ROWS - r0;
                out[at..at + valid].copy_from_slice(&yk[..valid]);
            }
        }
    }
}

/// The 16 rows of tile `t` for tokens `toks` (at most [`TB`]) into `y[token − toks.start]`.
fn tile(
    w: &Interleaved,
    t: usize,
    acts: &BlockActs,
    toks: Range<usize>,
    y: &mut [[f32; TILE_ROWS]; TB],
    isa: QIsa,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` asserted that `isa` is available, and Avx512Vnni is listed only where
        // AVX-512 F/BW/VL and VNNI were detected.
        QIsa::Avx512Vnni => unsafe {
            if w.width == 2 {
                x86::tile_kind::<true>(w, t, acts, toks, y)
            } else {
                x86::tile_kind::<false>(w, t, acts, toks, y)
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` asserted that `isa` is available: Avx512 and Avx2 are listed only where AVX2
        // and FMA were detected; F16C (f16 scales) is checked here.
        QIsa::Avx512 | QIsa::Avx2 if w.width == 4 || std::is_x86_feature_detected!("f16c") => unsafe {
            if w.width == 2 {
                x86_avx2::tile_kind::<true>(w, t, acts, toks, y)
            } else {
                x86_avx2::tile_kind::<false>(w, t, acts, toks, y)
            }
        },
        _ => portable_tile(w, t, acts, toks, y),
    }
}

/// The stored code of tile-row `lane`, column `k` of a group's code bytes.
fn code_at(kind: Kind, codes: &[u8], lane: usize, k: usize) -> u8 {
    let (quad, b) = (k / 4, k % 4);
    match kind {
        Kind::Int8 => codes[quad * 64 + 4 * lane + b],
        _ => (codes[(quad / 2) * 64 + 4 * lane + b] >> (4 * (quad % 2))) & 0x0F,
    }
}

/// Lane `lane` of the 16-float vector of `width`-byte floats at byte `at` of a group.
fn lane_f32(blk: &[u8], at: usize, lane: usize, width: usize) -> f32 {
    let b = &blk[at + width * lane..];
    if width == 2 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    } else {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

fn portable_tile(
    w: &Interleaved,
    t: usize,
    acts: &BlockActs,
    toks: Range<usize>,
    y: &mut [[f32; TILE_ROWS]; TB],
) {
    let (kind, gb, cb, width) = (w.kind, w.group_bytes(), w.kind.code_bytes(), w.width);
    let data = w.tile(t);
    for (k, i) in toks.enumerate() {
        for (lane, y) in y[k].iter_mut().enumerate() {
            let (mut acc, mut accm) = (0f32, 0f32);
            for (g, blk) in data.chunks_exact(gb).enumerate() {
                let b = i * acts.groups + g;
                let q = &acts.q[b * GROUP..(b + 1) * GROUP];
                let dot: i32 = q
                    .iter()
                    .enumerate()
                    .map(|(c, &q)| i32::from(code_at(kind, blk, lane, c)) * i32::from(q))
                    .sum();
                let s = acts.scales[b];
                let isum = dot - kind.bias() * acts.sums[b];
                acc += isum as f32 * (lane_f32(blk, cb, lane, width) * s);
                if kind == Kind::Int4Asym {
                    let min = lane_f32(blk, cb + TILE_ROWS * width, lane, width);
                    accm += min * (s * acts.sums[b] as f32);
                }
            }
            *y = acc + accm;
        }
    }
}

/// Calls the tile kernel `$tile::<INT4, ASYM, HALF, T>` that fits `$w`'s kind and the number of tokens
/// in `$toks` (each instruction set's module has one such kernel).
#[cfg(target_arch = "x86_64")]
macro_rules! by_kind_and_tokens {
    ($tile:ident, $half:ident, $w:expr, $t:expr, $acts:expr, $toks:expr, $y:expr) => {{
        let i0 = $toks.start;
        match ($w.kind, $toks.len()) {
            (Kind::Int8, 1) => $tile::<false, false, $half, 1>($w, $t, $acts, i0, $y),
            (Kind::Int8, 2) => $tile::<false, false, $half, 2>($w, $t, $acts, i0, $y),
            (Kind::Int8, 3) => $tile::<false, false, $half, 3>($w, $t, $acts, i0, $y),
            (Kind::Int8, _) => $tile::<false, false, $half, TB>($w, $t, $acts, i0, $y),
            (Kind::Int4Sym, 1) => $tile::<true, false, $half, 1>($w, $t, $acts, i0, $y),
            (Kind::Int4Sym, 2) => $tile::<true, false, $half, 2>($w, $t, $acts, i0, $y),
            (Kind::Int4Sym, 3) => $tile::<true, false, $half, 3>($w, $t, $acts, i0, $y),
            (Kind::Int4Sym, _) => $tile::<true, false, $half, TB>($w, $t, $acts, i0, $y),
            (Kind::Int4Asym, 1) => $tile::<true, true, $half, 1>($w, $t, $acts, i0, $y),
            (Kind::Int4Asym, 2) => $tile::<true, true, $half, 2>($w, $t, $acts, i0, $y),
            (Kind::Int4Asym, 3) => $tile::<true, true, $half, 3>($w, $t, $acts, i0, $y),
            (Kind::Int4Asym, _) => $tile::<true, true, $half, TB>($w, $t, $acts, i0, $y),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BlockActs, Interleaved, Kind, GROUP, TB, TILE_ROWS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// How many groups ahead the tile kernel prefetches: 2.5 KiB of int4 weights, 4.3 KiB of int8.
    /// Measured on SmolLM2 decoding: 4 groups gave 140 tokens/s, 8 gave 155-175, 16 and more less.
    const PREFETCH_GROUPS: usize = 8;

    /// [`tile`] for `w`'s kind and the number of tokens, with f16 (`HALF`) or f32 scales.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_kind<const HALF: bool>(
        w: &Interleaved,
        t: usize,
        acts: &BlockActs,
        toks: Range<usize>,
        y: &mut [[f32; TILE_ROWS]; TB],
    ) {
        // SAFETY: the caller's promise, passed on.
        unsafe { by_kind_and_tokens!(tile, HALF, w, t, acts, toks, y) }
    }

    /// 16 floats at `p`: f16 (`HALF`) or f32.
    ///
    /// # Safety
    /// `p` must point to 32 (`HALF`) or 64 readable bytes; the CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const HALF: bool>(p: *const u8) -> __m512 {
        // SAFETY: the caller's promise.
        unsafe {
            if HALF {
                _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
            } else {
                _mm512_loadu_ps(p.cast())
            }
        }
    }

    /// [`super::portable_tile`] with AVX-512 VNNI for tokens `i0..i0 + T`: `INT4` selects nibble
    /// codes, `ASYM` the min term of asymmetric int4, `HALF` f16 scales and mins.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const INT4: bool, const ASYM: bool, const HALF: bool, const T: usize>(
        w: &Interleaved,
        t: usize,
        acts: &BlockActs,
        i0: usize,
        y: &mut [[f32; TILE_ROWS]; TB],
    ) {
        let (gb, cb, bias) = (w.group_bytes(), w.kind.code_bytes(), w.kind.bias());
        let vb = TILE_ROWS * if HALF { 2 } else { 4 };
        let data = w.tile(t);
        assert!(data.len() == w.groups * gb && i0 + T <= acts.m && T <= TB);
        assert!(acts.groups == w.groups && acts.q.len() == acts.m * acts.groups * GROUP);
        let nib = _mm512_set1_epi8(0x0F);
        let mut accf = [_mm512_setzero_ps(); T];
        let mut accm = [_mm512_setzero_ps(); T];
        for (g, blk) in data.chunks_exact(gb).enumerate() {
            let p = blk.as_ptr();
            // The weights stream from the last-level cache or memory once per token; asking for the
            // group PREFETCH_GROUPS ahead keeps more lines in flight than the hardware prefetcher
            // does (SmolLM2 decoding: 95-100 → 155-175 tokens/s). Tiles are contiguous, so near a
            // tile's end this fetches the next tile's start, which its task reads next. A prefetch
            // never faults, even past the end of the buffer.
            let ahead = p.wrapping_add(PREFETCH_GROUPS * gb);
            for line in (0..gb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            let mut wv = [_mm512_setzero_si512(); 8];
            if INT4 {
                for h in 0..4 {
                    // SAFETY: a group holds 256 code bytes when INT4 (`chunks_exact(gb)`, gb > 256),
                    // so bytes 64h..64h + 64 lie inside `blk`.
                    let v = unsafe { _mm512_loadu_si512(p.add(64 * h).cast()) };
                    wv[2 * h] = _mm512_and_si512(v, nib);
                    wv[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                }
            } else {
                for (j, v) in wv.iter_mut().enumerate() {
                    // SAFETY: an int8 group holds 512 code bytes, so bytes 64j..64j + 64 are inside.
                    *v = unsafe { _mm512_loadu_si512(p.add(64 * j).cast()) };
                }
            }
            // SAFETY: the scales follow the codes in every group, `vb` bytes of them, as do the mins
            // of asymmetric int4; `gb` covers both.
            let scale = unsafe { load16::<HALF>(p.add(cb)) };
            let mins = if ASYM {
                // SAFETY: as above.
                unsafe { load16::<HALF>(p.add(cb + vb)) }
            } else {
                _mm512_setzero_ps()
            };
            for k in 0..T {
                let b = (i0 + k) * acts.groups + g;
                let q = &acts.q[b * GROUP..(b + 1) * GROUP];
                let mut acc = [_mm512_setzero_si512(); 2];
                for (j, quad) in q.chunks_exact(4).enumerate() {
                    let x = i32::from_le_bytes([
                        quad[0] as u8,
                        quad[1] as u8,
                        quad[2] as u8,
                        quad[3] as u8,
                    ]);
                    acc[j % 2] = _mm512_dpbusd_epi32(acc[j % 2], wv[j], _mm512_set1_epi32(x));
                }
                let mut isum = _mm512_add_epi32(acc[0], acc[1]);
                if bias != 0 {
                    isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(bias * acts.sums[b]));
                }
                let s = acts.scales[b];
                accf[k] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(isum),
                    _mm512_mul_ps(scale, _mm512_set1_ps(s)),
                    accf[k],
                );
                if ASYM {
                    accm[k] =
                        _mm512_fmadd_ps(mins, _mm512_set1_ps(s * acts.sums[b] as f32), accm[k]);
                }
            }
        }
        for k in 0..T {
            // SAFETY: y[k] is 16 f32s, one unaligned 64-byte store.
            unsafe { _mm512_storeu_ps(y[k].as_mut_ptr(), _mm512_add_ps(accf[k], accm[k])) };
        }
    }
}

/// The tile kernel on AVX2 (also what AVX-512 without VNNI runs): a 16-row quad is two 256-bit
/// halves of 8 rows. Without `vpdpbusd`, products go through `vpmaddubsw` (u8 × s8 → i16 pairs,
/// saturating) and `vpmaddwd`:
/// - int4 nibbles u ≤ 15 are the unsigned operand: a pair is at most 2·15·127 = 3810, so a group's
///   eight quads add up in i16 (≤ 30480) before one `vpmaddwd` per group;
/// - int8 codes c (stored c + 128) would overflow as the unsigned operand, so the operands are |q|
///   and c·sign(q): a pair is at most 2·127·127 = 32258, and the sum is Σc·q with no bias.
#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use super::{BlockActs, Interleaved, Kind, GROUP, TB, TILE_ROWS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Groups ahead that the kernel prefetches (as the AVX-512 kernel).
    const PREFETCH_GROUPS: usize = 8;

    /// [`tile`] for `w`'s kind and the number of tokens, with f16 (`HALF`) or f32 scales.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and F16C when `HALF`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_kind<const HALF: bool>(
        w: &Interleaved,
        t: usize,
        acts: &BlockActs,
        toks: Range<usize>,
        y: &mut [[f32; TILE_ROWS]; TB],
    ) {
        // SAFETY: the caller's promise, passed on.
        unsafe { by_kind_and_tokens!(tile, HALF, w, t, acts, toks, y) }
    }

    /// 8 floats at `p`: f16 (`HALF`) or f32.
    ///
    /// # Safety
    /// `p` must point to 16 (`HALF`) or 32 readable bytes; the CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn load8<const HALF: bool>(p: *const u8) -> __m256 {
        // SAFETY: the caller's promise.
        unsafe {
            if HALF {
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
            } else {
                _mm256_loadu_ps(p.cast())
            }
        }
    }

    /// The 4 activation codes of quad `j` of `q`, as one little-endian i32.
    #[inline(always)]
    fn quad(q: &[i8], j: usize) -> i32 {
        i32::from_le_bytes([
            q[4 * j] as u8,
            q[4 * j + 1] as u8,
            q[4 * j + 2] as u8,
            q[4 * j + 3] as u8,
        ])
    }

    /// [`super::portable_tile`] on AVX2 for tokens `i0..i0 + T`; parameters as the AVX-512 kernel's.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and F16C when `HALF`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const INT4: bool, const ASYM: bool, const HALF: bool, const T: usize>(
        w: &Interleaved,
        t: usize,
        acts: &BlockActs,
        i0: usize,
        y: &mut [[f32; TILE_ROWS]; TB],
    ) {
        let (gb, cb, bias) = (w.group_bytes(), w.kind.code_bytes(), w.kind.bias());
        let (fb, vb) = if HALF { (16, 32) } else { (32, 64) };
        let data = w.tile(t);
        assert!(data.len() == w.groups * gb && i0 + T <= acts.m && T <= TB);
        assert!(acts.groups == w.groups && acts.q.len() == acts.m * acts.groups * GROUP);
        let nib = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut accf = [[_mm256_setzero_ps(); 2]; T];
        let mut accm = [[_mm256_setzero_ps(); 2]; T];
        for (g, blk) in data.chunks_exact(gb).enumerate() {
            let p = blk.as_ptr();
            let ahead = p.wrapping_add(PREFETCH_GROUPS * gb);
            for line in (0..gb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            let q: [&[i8]; T] = std::array::from_fn(|k| {
                let b = (i0 + k) * acts.groups + g;
                &acts.q[b * GROUP..(b + 1) * GROUP]
            });
            // i32 sums per token and half (rows 0-7, 8-15).
            let mut isum = [[_mm256_setzero_si256(); 2]; T];
            if INT4 {
                let mut acc16 = [[_mm256_setzero_si256(); 2]; T];
                for h in 0..4 {
                    for half in 0..2 {
                        // SAFETY: an int4 group holds 256 code bytes (gb > 256): bytes
                        // 64h + 32·half .. + 32 lie inside `blk`.
                        let v = unsafe { _mm256_loadu_si256(p.add(64 * h + 32 * half).cast()) };
                        let lo = _mm256_and_si256(v, nib);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                        for (acc, qk) in acc16.iter_mut().zip(&q) {
                            let a = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(qk, 2 * h)));
                            let b =
                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(qk, 2 * h + 1)));
                            acc[half] = _mm256_add_epi16(acc[half], _mm256_add_epi16(a, b));
                        }
                    }
                }
                for (is, acc) in isum.iter_mut().zip(&acc16) {
                    for (i, a) in is.iter_mut().zip(acc) {
                        *i = _mm256_madd_epi16(*a, ones);
                    }
                }
            } else {
                let flip = _mm256_set1_epi8(-128);
                for j in 0..8 {
                    for half in 0..2 {
                        // SAFETY: an int8 group holds 512 code bytes: bytes 64j + 32·half .. + 32
                        // lie inside `blk`.
                        let v = unsafe { _mm256_loadu_si256(p.add(64 * j + 32 * half).cast()) };
                        let c = _mm256_xor_si256(v, flip);
                        for (is, qk) in isum.iter_mut().zip(&q) {
                            let x = _mm256_set1_epi32(quad(qk, j));
                            let prod =
                                _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(c, x));
                            is[half] = _mm256_add_epi32(is[half], _mm256_madd_epi16(prod, ones));
                        }
                    }
                }
            }
            for half in 0..2 {
                // SAFETY: the scales (and the mins of asymmetric int4) follow the codes, `vb` bytes
                // each; half `half` is `fb` bytes in.
                let scale = unsafe { load8::<HALF>(p.add(cb + half * fb)) };
                let mins = if ASYM {
                    // SAFETY: as above.
                    unsafe { load8::<HALF>(p.add(cb + vb + half * fb)) }
                } else {
                    _mm256_setzero_ps()
                };
                for k in 0..T {
                    let b = (i0 + k) * acts.groups + g;
                    let mut is = isum[k][half];
                    if INT4 && bias != 0 {
                        is = _mm256_sub_epi32(is, _mm256_set1_epi32(bias * acts.sums[b]));
                    }
                    let s = acts.scales[b];
                    accf[k][half] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(is),
                        _mm256_mul_ps(scale, _mm256_set1_ps(s)),
                        accf[k][half],
                    );
                    if ASYM {
                        accm[k][half] = _mm256_fmadd_ps(
                            mins,
                            _mm256_set1_ps(s * acts.sums[b] as f32),
                            accm[k][half],
                        );
                    }
                }
            }
        }
        for k in 0..T {
            for half in 0..2 {
                let v = _mm256_add_ps(accf[k][half], accm[k][half]);
                // SAFETY: y[k] is 16 f32s; half `half` is its 8 floats at 8·half.
                unsafe { _mm256_storeu_ps(y[k].as_mut_ptr().add(8 * half), v) };
            }
        }
    }
}
