//! Flash-style attention on the CPU, forward and backward, never forming the S × S score matrix.
//!
//! Layouts follow FlashAttention's: q and the output are [batch, q_len, heads, d] (what a projection's
//! [batch, seq, heads·d] output already is), k and v [batch, kv_len, kv_heads, d], and query head h reads
//! kv head h / (heads / kv_heads) (grouped-query and multi-query attention need no copies of k and v).
//! The saved statistic is the row log-sum-exp, [batch, heads, q_len].
//!
//! **Forward.** One task per (batch, head, tile of `BR` query rows), run in parallel. The task copies its
//! query rows once (scaled by `scale`, rotated when RoPE is fused in), then walks blocks of `BC` keys:
//! S = Q·Kᵀ into an L1/L2-sized buffer, a masked online softmax (running max m, rescaled running sum l),
//! and O += P·V into an accumulator that is rescaled only when the running max moves. Keys come from a
//! transposed (and rotated) copy of K made once per call, cut into one d × BC panel per block, and
//! V's rows of each head packed back to back, so both products stream contiguous rows of their right
//! operand. Blocks that no row of the tile can see are skipped; blocks every row sees in full skip the
//! masking.
//!
//! **Backward** (FlashAttention-2's algorithm). One task per (batch, kv head, set of key blocks): for each
//! key block it recomputes P = exp(S − lse) for every query tile that can see the block, and accumulates
//! dV += Pᵀ·dO, dS = P ∘ (dO·Vᵀ − D) with D = rowsum(dO ∘ O), dK += dSᵀ·Q and dQ += dS·K. The task owns
//! its blocks' dK and dV rows outright. dQ rows are shared by every key block: when there are enough
//! (batch, kv head) pairs to occupy the threads one task takes all the blocks of its pair and owns its
//! dQ rows too; otherwise the blocks are dealt round-robin to up to `MAX_DQ_COPIES` tasks per pair (so
//! causal work stays balanced), each with a private dQ that is summed at the end.
//!
//! **Masks.** Each query row sees a contiguous range of keys: everything, or under `causal` the keys at
//! or before its position (queries are aligned to the *last* q_len keys, so a chunk of new tokens
//! attends to the cached ones before it), narrowed by a sliding `window` and by the row's document when
//! `segments` packs several documents into one sequence; `key_valid` then drops padding keys one by one.
//! A row that sees no key at all outputs zeros and has lse = −∞ (PyTorch's SDPA would give NaN).
//!
//! **RoPE**, when given, is fused into the copies of Q and K (forward and backward), and dQ and dK are
//! rotated back in place at the end: Q and K are never rotated into tensors of their own.
//!
//! Extra memory: the packed K and V (the size of k and v), the row ranges and, in the backward pass, D
//! and the private dQ copies (at most `MAX_DQ_COPIES` times q's size); O(S·d), never O(S²).
//!
//! The products run on [`tile`]'s micro-kernels (AVX-512, AVX2+FMA or portable, chosen by [`Isa`]); the
//! task bodies are compiled once per instruction set by inlining them into `#[target_feature]` wrappers.

mod tile;

use super::matmul::Isa;
use super::simd;
use rayon::prelude::*;
use tile::{Gemm, Tile};

/// Query rows per forward tile and per backward query tile (a multiple of the micro-kernels' 6 rows).
const BR: usize = 60;
/// Keys per block.
const BC: usize = 64;
/// At most this many private dQ copies per (batch, kv head) in the backward pass, so that its extra
/// memory stays a few times q's size whatever the thread count (at the price of idle threads when
/// there are far fewer (batch, kv head) pairs than threads).
const MAX_DQ_COPIES: usize = 4;

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Dims {
    fn q_elems(&self) -> usize {
        self.batch * self.q_len * self.heads * self.head_dim
    }

    fn kv_elems(&self) -> usize {
        self.batch * self.kv_len * self.kv_heads * self.head_dim
    }

    /// Offset of query row i's key-aligned position: query i sits at key position i + offset.
    fn offset(&self) -> isize {
        self.kv_len as isize - self.q_len as isize
    }

    fn q_tiles(&self) -> usize {
        self.q_len.div_ceil(BR)
    }
}

/// Which keys each query may attend to (all of them when every field is off).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mask<'a> {
    /// Query at key position t sees keys j ≤ t.
    pub causal: bool,
    /// Sliding window of w keys: j > t − w, and with `causal` off also j < t + w.
    pub window: Option<usize>,
    /// [batch, kv_len]: 0 marks a padding key no query may see.
    pub key_valid: Option<&'a [u8]>,
    /// [batch, kv_len] document ids of packed sequences: a document is a maximal run of equal
    /// consecutive ids, and a query sees only keys of its own run. Queries take the ids of the last
    /// q_len keys; queries before the first key (q_len > kv_len) see none.
    pub segments: Option<&'a [i64]>,
}

/// Rotary embedding fused into the kernels: the tables of [`crate::ops::rope::RopeTable`] and key
/// positions ([kv_len] or [batch, kv_len]; query i uses the position of key i + kv_len − q_len).
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    /// [max_positions, head_dim / 2] each.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub positions: &'a [i64],
    /// Pairs (2i, 2i + 1) instead of (i, i + d/2).
    pub interleaved: bool,
}

/// One attention call's description.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a> {
    pub dims: Dims,
    pub mask: Mask<'a>,
    pub rotary: Option<Rotary<'a>>,
    /// Scores are q·k · scale (1/√d for standard attention).
    pub scale: f32,
}

impl Problem<'_> {
    /// Panics with a description when the sizes or side arrays disagree; callers validate user input
    /// first, so this only catches their bugs.
    fn check(&self) {
        let d = &self.dims;
        let side = d.batch * d.kv_len;
        let ok = d.kv_heads > 0
            && d.heads.is_multiple_of(d.kv_heads)
            && d.head_dim > 0
            && self.mask.key_valid.is_none_or(|v| v.len() == side)
            && self.mask.segments.is_none_or(|s| s.len() == side)
            && self.rotary.is_none_or(|r| {
                let half = d.head_dim / 2;
                d.head_dim.is_multiple_of(2)
                    && d.q_len <= d.kv_len
                    && (r.positions.len() == d.kv_len || r.positions.len() == side)
                    && r.cos.len() == r.sin.len()
                    && r.positions
                        .iter()
                        .all(|&p| p >= 0 && (p as usize + 1) * half <= r.cos.len())
            });
        assert!(ok, "flash attention: inconsistent problem {self:?}");
    }

    /// Rotation angle row of key position t of batch b.
    fn angles(&self, b: usize, t: usize) -> Option<(&[f32], &[f32], bool)> {
        self.rotary.map(|r| {
            let half = self.dims.head_dim / 2;
            let i = if r.positions.len() == self.dims.kv_len {
                t
            } else {
                b * self.dims.kv_len + t
            };
            let p = r.positions[i] as usize;
            (
                &r.cos[p * half..][..half],
                &r.sin[p * half..][..half],
                r.interleaved,
            )
        })
    }
}

impl Problem<'_> {
    /// Rotation angles of query row i of batch b (none for a row before the first key).
    fn query_angles(&self, b: usize, i: usize) -> Option<(&[f32], &[f32], bool)> {
        let t = i as isize + self.dims.offset();
        if t >= 0 {
            self.angles(b, t as usize)
        } else {
            None
        }
    }

    /// Query rows r0.. of head h, batch b, scaled and rotated, into `dst` (dst.len() / d rows).
    fn load_queries(&self, q: &[f32], (b, h, r0): (usize, usize, usize), dst: &mut [f32]) {
        let d = self.dims;
        let hd = d.head_dim;
        for (i, row) in dst.chunks_exact_mut(hd).enumerate() {
            let src = &q[((b * d.q_len + r0 + i) * d.heads + h) * hd..][..hd];
            load_row(src, row, self.query_angles(b, r0 + i), self.scale, 1.0);
        }
    }
}

/// Whether no key of [c0, c0 + n) is padding.
fn all_valid(valid: Option<&[u8]>, c0: usize, n: usize) -> bool {
    valid.is_none_or(|v| v[c0..c0 + n].iter().all(|&x| x != 0))
}

/// dst = rotate(src) · scale, rotating by +angle (`sign` 1) or back (−1).
#[inline(always)]
fn load_row(
    src: &[f32],
    dst: &mut [f32],
    angles: Option<(&[f32], &[f32], bool)>,
    scale: f32,
    sign: f32,
) {
    match angles {
        None => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s * scale;
            }
        }
        Some((cos, sin, interleaved)) => {
            let half = cos.len();
            for i in 0..half {
                let (i0, i1) = if interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (a, b, s) = (src[i0], src[i1], sign * sin[i]);
                dst[i0] = (a * cos[i] - b * s) * scale;
                dst[i1] = (b * cos[i] + a * s) * scale;
            }
        }
    }
}

/// The half-open key range [lo, hi) each query row sees before key padding, [batch, q_len].
fn row_ranges(p: &Problem) -> Vec<(usize, usize)> {
    let d = &p.dims;
    let (kv, off) = (d.kv_len as isize, d.offset());
    let mut out = Vec::with_capacity(d.batch * d.q_len);
    let mut run = vec![(0usize, 0usize); d.kv_len];
    for b in 0..d.batch {
        if let Some(seg) = p.mask.segments {
            let seg = &seg[b * d.kv_len..][..d.kv_len];
            let mut start = 0;
            while start < d.kv_len {
                let end = start
                    + seg[start..]
                        .iter()
                        .take_while(|&&s| s == seg[start])
                        .count();
                run[start..end].fill((start, end));
                start = end;
            }
        }
        for i in 0..d.q_len {
            let t = i as isize + off;
            let (mut lo, mut hi) = (0isize, kv);
            if p.mask.causal {
                hi = hi.min(t + 1);
            }
            if let Some(w) = p.mask.window {
                let w = w as isize;
                lo = lo.max(t - w + 1);
                if !p.mask.causal {
                    hi = hi.min(t + w);
                }
            }
            if p.mask.segments.is_some() {
                // A query before the first key (q_len > kv_len) belongs to no document.
                let (s, e) = if (0..kv).contains(&t) {
                    run[t as usize]
                } else {
                    (0, 0)
                };
                lo = lo.max(s as isize);
                hi = hi.min(e as isize);
            }
            let lo = lo.clamp(0, kv) as usize;
            out.push((lo, (hi.clamp(0, kv) as usize).max(lo)));
        }
    }
    out
}

/// What a tile of query rows sees: the union [min_lo, max_hi) of its rows' ranges, and the part
/// [max_lo, min_hi) that every row sees.
#[derive(Clone, Copy, Debug)]
struct Span {
    min_lo: usize,
    max_hi: usize,
    max_lo: usize,
    min_hi: usize,
}

impl Span {
    fn of(ranges: &[(usize, usize)], kv_len: usize) -> Span {
        let mut s = Span {
            min_lo: kv_len,
            max_hi: 0,
            max_lo: 0,
            min_hi: kv_len,
        };
        for &(lo, hi) in ranges {
            if lo < hi {
                s.min_lo = s.min_lo.min(lo);
                s.max_hi = s.max_hi.max(hi);
            }
            s.max_lo = s.max_lo.max(lo);
            s.min_hi = s.min_hi.min(hi);
        }
        s
    }

    /// Whether some row sees a key of [c0, c1).
    fn touches(&self, c0: usize, c1: usize) -> bool {
        self.min_lo < c1 && self.max_hi > c0
    }

    /// Whether every row sees every key of [c0, c1) (before key padding).
    fn covers(&self, c0: usize, c1: usize) -> bool {
        self.max_lo <= c0 && self.min_hi >= c1
    }
}

/// Spans of every (batch, query tile), [batch, q_tiles].
fn tile_spans(d: &Dims, ranges: &[(usize, usize)]) -> Vec<Span> {
    (0..d.batch)
        .flat_map(|b| {
            let rows = &ranges[b * d.q_len..][..d.q_len];
            rows.chunks(BR).map(|r| Span::of(r, d.kv_len))
        })
        .collect()
}

/// Sets to −∞ the scores of keys c0 + j outside `range` or marked invalid.
#[inline(always)]
fn mask_row(s: &mut [f32], c0: usize, (lo, hi): (usize, usize), valid: Option<&[u8]>) {
    for (j, x) in s.iter_mut().enumerate() {
        let key = c0 + j;
        if key < lo || key >= hi || valid.is_some_and(|v| v[key] == 0) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Largest element (−∞ for an empty or all −∞ row), in 16 independent lanes so it vectorises.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let (chunks, tail) = x.as_chunks::<16>();
    let mut m = [f32::NEG_INFINITY; 16];
    for c in chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    m.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// A pointer into an output that parallel tasks write disjoint parts of.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: every task writes only the rows it owns (documented at each use), so sharing the base pointer
// across threads never lets two of them touch the same element.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// Forward attention. Returns the output [batch, q_len, heads, d] and the row log-sum-exp
/// [batch, heads, q_len].
///
/// # Panics
/// If this CPU cannot run `isa` or the slices do not match `p` (callers validate user input first).
pub fn forward(isa: Isa, p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        Isa::available().contains(&isa),
        "flash attention: this CPU cannot run the {isa:?} kernels"
    );
    p.check();
    let d = p.dims;
    assert!(
        q.len() == d.q_elems() && k.len() == d.kv_elems() && v.len() == d.kv_elems(),
        "flash attention: slices do not match {d:?}"
    );
    let mut out = vec![0f32; d.q_elems()];
    let mut lse = vec![f32::NEG_INFINITY; d.batch * d.heads * d.q_len];
    if out.is_empty() {
        return (out, lse);
    }
    let ranges = row_ranges(p);
    let spans = tile_spans(&d, &ranges);
    let (kt, vp) = pack_keys_values(p, k, v);
    let ctx = Fwd {
        p,
        q,
        kt: &kt,
        v: &vp,
        ranges: &ranges,
        spans: &spans,
        out: Shared(out.as_mut_ptr()),
        lse: Shared(lse.as_mut_ptr()),
    };
    let tasks = d.batch * d.heads * d.q_tiles();
    (0..tasks)
        .into_par_iter()
        .for_each(|t| run_forward(isa, &ctx, t));
    (out, lse)
}

/// Key blocks of one (batch, kv head), as the forward pass reads them: K rotated and transposed into
/// one d × BC panel per block of BC keys ([batch, kv_heads, blocks, d, BC], the last block zero-padded),
/// and V's rows of that head back to back ([batch, kv_heads, kv_len, d]). Reading K and V in place
/// would step through memory at kv_len·4 or kv_heads·d·4 bytes per row: a multiple of 4 KiB for
/// typical shapes, which maps every row of a block to the same few L1 sets and evicts them all.
fn pack_keys_values(p: &Problem, k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = p.dims;
    let (hd, len, blocks) = (d.head_dim, d.kv_len, d.kv_len.div_ceil(BC));
    let mut kt = vec![0f32; d.batch * d.kv_heads * blocks * hd * BC];
    let mut vp = vec![0f32; d.kv_elems()];
    if vp.is_empty() {
        return (kt, vp);
    }
    kt.par_chunks_mut(blocks * hd * BC)
        .zip(vp.par_chunks_mut(len * hd))
        .enumerate()
        .for_each(|(bh, (kt, vp))| {
            let (b, h) = (bh / d.kv_heads, bh % d.kv_heads);
            let mut row = vec![0f32; hd];
            for (blk, panel) in kt.chunks_exact_mut(hd * BC).enumerate() {
                for t in blk * BC..(len).min((blk + 1) * BC) {
                    let at = ((b * len + t) * d.kv_heads + h) * hd;
                    load_row(&k[at..][..hd], &mut row, p.angles(b, t), 1.0, 1.0);
                    for (c, &x) in row.iter().enumerate() {
                        panel[c * BC + t - blk * BC] = x;
                    }
                    vp[t * hd..][..hd].copy_from_slice(&v[at..][..hd]);
                }
            }
        });
    (kt, vp)
}

/// Everything a forward task reads, and where it writes.
struct Fwd<'a> {
    p: &'a Problem<'a>,
    q: &'a [f32],
    /// K and V as [`pack_keys_values`] lays them out.
    kt: &'a [f32],
    v: &'a [f32],
    ranges: &'a [(usize, usize)],
    spans: &'a [Span],
    out: Shared,
    lse: Shared,
}

fn run_forward(isa: Isa, ctx: &Fwd, task: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `forward` asserted that `isa` is available; Avx512 is listed only with AVX-512F,
        // AVX2 and FMA detected.
        Isa::Avx512 => unsafe { x86::forward_avx512(ctx, task) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2Fma is listed only with AVX2 and FMA detected.
        Isa::Avx2Fma => unsafe { x86::forward_avx2(ctx, task) },
        // SAFETY: the portable kernels need no CPU feature.
        _ => unsafe { forward_task::<tile::Portable>(ctx, task) },
    }
}

/// One (batch, head, query tile) of the forward pass.
///
/// # Safety
/// The CPU supports `T`'s instruction set; `ctx` was built by [`forward`] (buffers of the checked
/// sizes), and no other task has this `task` index.
#[inline(always)]
unsafe fn forward_task<T: Tile>(ctx: &Fwd, task: usize) {
    let p = ctx.p;
    let d = p.dims;
    let (hd, tiles) = (d.head_dim, d.q_tiles());
    let (b, h, tile) = (
        task / (d.heads * tiles),
        task / tiles % d.heads,
        task % tiles,
    );
    let kvh = h / (d.heads / d.kv_heads);
    let r0 = tile * BR;
    let rows = (d.q_len - r0).min(BR);
    let ranges = &ctx.ranges[b * d.q_len + r0..][..rows];
    let span = ctx.spans[b * tiles + tile];
    let valid = p.mask.key_valid.map(|v| &v[b * d.kv_len..][..d.kv_len]);

    let mut qt = vec![0f32; rows * hd];
    p.load_queries(ctx.q, (b, h, r0), &mut qt);
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    let mut acc = vec![0f32; rows * hd];
    let mut s = vec![0f32; rows * BC];
    let mut pb = vec![0f32; rows * BC];
    let blocks = d.kv_len.div_ceil(BC);
    let kt = &ctx.kt[(b * d.kv_heads + kvh) * blocks * hd * BC..][..blocks * hd * BC];
    let vp = &ctx.v[(b * d.kv_heads + kvh) * d.kv_len * hd..][..d.kv_len * hd];
    let mut c0 = span.min_lo / BC * BC;
    while c0 < span.max_hi {
        let nc = (span.max_hi - c0).min(BC);
        let (s, pb) = (&mut s[..rows * nc], &mut pb[..rows * nc]);
        // SAFETY: qt is rows × hd; the first nc columns of block c0 / BC's hd × BC panel; s is rows × nc.
        unsafe {
            T::gemm(&Gemm::nn(
                (rows, nc, hd),
                (qt.as_ptr(), hd),
                (kt.as_ptr().add(c0 * hd), BC),
                (s.as_mut_ptr(), nc),
                false,
            ));
        }
        let full = all_valid(valid, c0, nc) && span.covers(c0, c0 + nc);
        for i in 0..rows {
            let (srow, prow) = (&mut s[i * nc..][..nc], &mut pb[i * nc..][..nc]);
            if !full {
                mask_row(srow, c0, ranges[i], valid);
            }
            let m_new = m[i].max(row_max(srow));
            if m_new == f32::NEG_INFINITY {
                prow.fill(0.0);
                continue;
            }
            let sum = simd::exp_shifted(srow, m_new, prow);
            // exp(−∞) = 0 on a row's first visible block, whose accumulator is still zero.
            let alpha = simd::exp(m[i] - m_new);
            l[i] = l[i] * alpha + sum;
            if alpha != 1.0 {
                acc[i * hd..][..hd].iter_mut().for_each(|x| *x *= alpha);
            }
            m[i] = m_new;
        }
        // SAFETY: pb is rows × nc; value rows c0..c0 + nc of vp (hd apart); acc is rows × hd.
        unsafe {
            T::gemm(&Gemm::nn(
                (rows, hd, nc),
                (pb.as_ptr(), nc),
                (vp.as_ptr().add(c0 * hd), hd),
                (acc.as_mut_ptr(), hd),
                true,
            ));
        }
        c0 += nc;
    }
    for i in 0..rows {
        // SAFETY: row (b, r0 + i, h) of the output and lse entry (b, h, r0 + i) belong to this task
        // alone (one task per (batch, head, tile)); both lie inside the buffers `forward` allocated.
        let (o, lse) = unsafe {
            (
                std::slice::from_raw_parts_mut(
                    ctx.out.0.add(((b * d.q_len + r0 + i) * d.heads + h) * hd),
                    hd,
                ),
                &mut *ctx.lse.0.add((b * d.heads + h) * d.q_len + r0 + i),
            )
        };
        if l[i] > 0.0 {
            let inv = 1.0 / l[i];
            for (o, &a) in o.iter_mut().zip(&acc[i * hd..][..hd]) {
                *o = a * inv;
            }
            *lse = m[i] + l[i].ln();
        }
    }
}

/// Gradients of the forward pass: (dq, dk, dv) in the layouts of q, k and v, given the forward's output
/// `o`, its `lse` and the output gradient `d_o`.
///
/// # Panics
/// As [`forward`].
#[allow(clippy::too_many_arguments)]
pub fn backward(
    isa: Isa,
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(
        Isa::available().contains(&isa),
        "flash attention: this CPU cannot run the {isa:?} kernels"
    );
    p.check();
    let d = p.dims;
    assert!(
        q.len() == d.q_elems()
            && o.len() == d.q_elems()
            && d_o.len() == d.q_elems()
            && k.len() == d.kv_elems()
            && v.len() == d.kv_elems()
            && lse.len() == d.batch * d.heads * d.q_len,
        "flash attention backward: slices do not match {d:?}"
    );
    let mut dq = vec![0f32; d.q_elems()];
    let mut dk = vec![0f32; d.kv_elems()];
    let mut dv = vec![0f32; d.kv_elems()];
    if dq.is_empty() || dk.is_empty() {
        return (dq, dk, dv);
    }
    let hd = d.head_dim;
    let ranges = row_ranges(p);
    let spans = tile_spans(&d, &ranges);
    // D = rowsum(dO ∘ O), [batch, heads, q_len].
    let mut dd = vec![0f32; d.batch * d.heads * d.q_len];
    dd.par_chunks_mut(d.q_len)
        .enumerate()
        .for_each(|(bh, out)| {
            let (b, h) = (bh / d.heads, bh % d.heads);
            for (i, x) in out.iter_mut().enumerate() {
                let at = ((b * d.q_len + i) * d.heads + h) * hd;
                *x = o[at..at + hd]
                    .iter()
                    .zip(&d_o[at..at + hd])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        });
    let pairs = d.batch * d.kv_heads;
    let blocks = d.kv_len.div_ceil(BC);
    let threads = rayon::current_num_threads();
    let chunks = if pairs >= 2 * threads {
        1
    } else {
        (2 * threads)
            .div_ceil(pairs)
            .min(MAX_DQ_COPIES)
            .min(blocks)
            .max(1)
    };
    let ctx = Bwd {
        p,
        q,
        k,
        v,
        d_o,
        lse,
        dd: &dd,
        ranges: &ranges,
        spans: &spans,
        chunks,
        dq: Shared(dq.as_mut_ptr()),
        dk: Shared(dk.as_mut_ptr()),
        dv: Shared(dv.as_mut_ptr()),
    };
    let partials: Vec<Vec<f32>> = (0..pairs * chunks)
        .into_par_iter()
        .map(|t| run_backward(isa, &ctx, t))
        .collect();
    let rep = d.heads / d.kv_heads;
    if chunks > 1 {
        // Partial j of pair (b, kvh) is [rep, q_len, hd]: head kvh·rep + r, row i at (r·q_len + i)·hd.
        dq.par_chunks_mut(d.heads * hd)
            .enumerate()
            .for_each(|(bi, row)| {
                let (b, i) = (bi / d.q_len, bi % d.q_len);
                for (h, x) in row.chunks_exact_mut(hd).enumerate() {
                    let (kvh, r) = (h / rep, h % rep);
                    for part in &partials[(b * d.kv_heads + kvh) * chunks..][..chunks] {
                        for (x, &y) in x.iter_mut().zip(&part[(r * d.q_len + i) * hd..][..hd]) {
                            *x += y;
                        }
                    }
                }
            });
    }
    drop(partials);
    // dQ = scale · dS · K (the copies of Q were scaled, K's were not); rotate dQ and dK back.
    // One scratch row per rayon job rather than an allocation per row.
    dq.par_chunks_mut(hd).enumerate().for_each_init(
        || vec![0f32; hd],
        |src, (row, x)| {
            let (b, i) = (row / (d.q_len * d.heads), row / d.heads % d.q_len);
            src.copy_from_slice(x);
            load_row(src, x, p.query_angles(b, i), p.scale, -1.0);
        },
    );
    if p.rotary.is_some() {
        dk.par_chunks_mut(hd).enumerate().for_each_init(
            || vec![0f32; hd],
            |src, (row, x)| {
                let (b, t) = (row / (d.kv_len * d.kv_heads), row / d.kv_heads % d.kv_len);
                src.copy_from_slice(x);
                load_row(src, x, p.angles(b, t), 1.0, -1.0);
            },
        );
    }
    (dq, dk, dv)
}

/// Everything a backward task reads, and where it writes.
struct Bwd<'a> {
    p: &'a Problem<'a>,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
    dd: &'a [f32],
    ranges: &'a [(usize, usize)],
    spans: &'a [Span],
    /// Tasks per (batch, kv head); above 1 each returns a private dQ.
    chunks: usize,
    dq: Shared,
    dk: Shared,
    dv: Shared,
}

fn run_backward(isa: Isa, ctx: &Bwd, task: usize) -> Vec<f32> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `backward` asserted that `isa` is available; Avx512 is listed only with AVX-512F,
        // AVX2 and FMA detected.
        Isa::Avx512 => unsafe { x86::backward_avx512(ctx, task) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2Fma is listed only with AVX2 and FMA detected.
        Isa::Avx2Fma => unsafe { x86::backward_avx2(ctx, task) },
        // SAFETY: the portable kernels need no CPU feature.
        _ => unsafe { backward_task::<tile::Portable>(ctx, task) },
    }
}

/// Key blocks j, j + chunks, j + 2·chunks, … of one (batch, kv head). Returns its private dQ
/// ([rep, q_len, d]) when there are several chunks per pair, else writes dQ in place and returns nothing.
///
/// # Safety
/// As [`forward_task`], for [`backward`]'s context.
#[inline(always)]
unsafe fn backward_task<T: Tile>(ctx: &Bwd, task: usize) -> Vec<f32> {
    let p = ctx.p;
    let d = p.dims;
    let (hd, tiles, rep) = (d.head_dim, d.q_tiles(), d.heads / d.kv_heads);
    let (pair, chunk) = (task / ctx.chunks, task % ctx.chunks);
    let (b, kvh) = (pair / d.kv_heads, pair % d.kv_heads);
    let valid = p.mask.key_valid.map(|v| &v[b * d.kv_len..][..d.kv_len]);
    let mut private = if ctx.chunks > 1 {
        vec![0f32; rep * d.q_len * hd]
    } else {
        Vec::new()
    };
    let (kstride, qstride) = (d.kv_heads * hd, d.heads * hd);

    let mut kb = vec![0f32; BC * hd];
    let mut kt = vec![0f32; hd * BC];
    let mut vt = vec![0f32; hd * BC];
    let mut dka = vec![0f32; BC * hd];
    let mut dva = vec![0f32; BC * hd];
    let mut qs = vec![0f32; BR * hd];
    let mut dob = vec![0f32; BR * hd];
    let mut s = vec![0f32; BR * BC];
    let mut pb = vec![0f32; BR * BC];
    let blocks = d.kv_len.div_ceil(BC);
    for block in (chunk..blocks).step_by(ctx.chunks) {
        let c0 = block * BC;
        let nc = (d.kv_len - c0).min(BC);
        let (kb, kt, vt) = (&mut kb[..nc * hd], &mut kt[..hd * nc], &mut vt[..hd * nc]);
        let (dka, dva) = (&mut dka[..nc * hd], &mut dva[..nc * hd]);
        dka.fill(0.0);
        dva.fill(0.0);
        for j in 0..nc {
            let at = (b * d.kv_len + c0 + j) * kstride + kvh * hd;
            let dst = &mut kb[j * hd..][..hd];
            load_row(&ctx.k[at..][..hd], dst, p.angles(b, c0 + j), 1.0, 1.0);
            for c in 0..hd {
                kt[c * nc + j] = dst[c];
                vt[c * nc + j] = ctx.v[at + c];
            }
        }
        let keys_valid = all_valid(valid, c0, nc);
        for r in 0..rep {
            let h = kvh * rep + r;
            for tile in 0..tiles {
                let span = ctx.spans[b * tiles + tile];
                if !span.touches(c0, c0 + nc) {
                    continue;
                }
                let r0 = tile * BR;
                let rows = (d.q_len - r0).min(BR);
                let ranges = &ctx.ranges[b * d.q_len + r0..][..rows];
                let qs = &mut qs[..rows * hd];
                p.load_queries(ctx.q, (b, h, r0), qs);
                let (s, pb) = (&mut s[..rows * nc], &mut pb[..rows * nc]);
                // dO's rows lie heads·hd apart (often a multiple of 4 KiB, which would alias in L1).
                let dob = &mut dob[..rows * hd];
                for (i, dst) in dob.chunks_exact_mut(hd).enumerate() {
                    dst.copy_from_slice(
                        &ctx.d_o[((b * d.q_len + r0 + i) * d.heads + h) * hd..][..hd],
                    );
                }
                // SAFETY: qs is rows × hd, kt hd × nc and s rows × nc, all local.
                unsafe {
                    T::gemm(&Gemm::nn(
                        (rows, nc, hd),
                        (qs.as_ptr(), hd),
                        (kt.as_ptr(), nc),
                        (s.as_mut_ptr(), nc),
                        false,
                    ));
                }
                let full = keys_valid && span.covers(c0, c0 + nc);
                let lse = &ctx.lse[(b * d.heads + h) * d.q_len + r0..][..rows];
                for i in 0..rows {
                    let (srow, prow) = (&mut s[i * nc..][..nc], &mut pb[i * nc..][..nc]);
                    if !full {
                        mask_row(srow, c0, ranges[i], valid);
                    }
                    if lse[i] == f32::NEG_INFINITY {
                        prow.fill(0.0);
                    } else {
                        simd::exp_shifted(srow, lse[i], prow);
                    }
                }
                // dV += Pᵀ·dO, then dP = dO·Vᵀ into s.
                // SAFETY: pb is rows × nc, dob rows × hd, dva nc × hd, vt hd × nc and s rows × nc, all
                // local.
                unsafe {
                    T::gemm(&Gemm::tn(
                        (nc, hd, rows),
                        (pb.as_ptr(), nc),
                        (dob.as_ptr(), hd),
                        (dva.as_mut_ptr(), hd),
                        true,
                    ));
                    T::gemm(&Gemm::nn(
                        (rows, nc, hd),
                        (dob.as_ptr(), hd),
                        (vt.as_ptr(), nc),
                        (s.as_mut_ptr(), nc),
                        false,
                    ));
                }
                let dd = &ctx.dd[(b * d.heads + h) * d.q_len + r0..][..rows];
                for i in 0..rows {
                    let di = dd[i];
                    for (ds, &pv) in s[i * nc..][..nc].iter_mut().zip(&pb[i * nc..][..nc]) {
                        *ds = pv * (*ds - di);
                    }
                }
                // dK += dSᵀ·Q (scaled), dQ += dS·K.
                let (dq, ldq) = if ctx.chunks > 1 {
                    (
                        private.as_mut_ptr().wrapping_add((r * d.q_len + r0) * hd),
                        hd,
                    )
                } else {
                    (
                        ctx.dq
                            .0
                            .wrapping_add(((b * d.q_len + r0) * d.heads + h) * hd),
                        qstride,
                    )
                };
                // SAFETY: s is rows × nc, qs rows × hd, dka and kb nc × hd, all local; the dQ rows
                // (rows × hd at stride ldq) are this task's private copy, or (one chunk per pair)
                // rows (b, r0.., h) of dq, which only this pair's single task writes.
                unsafe {
                    T::gemm(&Gemm::tn(
                        (nc, hd, rows),
                        (s.as_ptr(), nc),
                        (qs.as_ptr(), hd),
                        (dka.as_mut_ptr(), hd),
                        true,
                    ));
                    T::gemm(&Gemm::nn(
                        (rows, hd, nc),
                        (s.as_ptr(), nc),
                        (kb.as_ptr(), hd),
                        (dq, ldq),
                        true,
                    ));
                }
            }
        }
        for j in 0..nc {
            let at = (b * d.kv_len + c0 + j) * kstride + kvh * hd;
            // SAFETY: key rows c0..c0 + nc of kv head kvh belong to this block, which only this task
            // processes; both lie inside dk and dv.
            unsafe {
                std::ptr::copy_nonoverlapping(dka[j * hd..].as_ptr(), ctx.dk.0.add(at), hd);
                std::ptr::copy_nonoverlapping(dva[j * hd..].as_ptr(), ctx.dv.0.add(at), hd);
            }
        }
    }
    private
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::tile::{Avx2, Avx512};
    use super::{backward_task, forward_task, Bwd, Fwd};

    /// # Safety
    /// The CPU supports AVX-512F, AVX2 and FMA; otherwise as [`forward_task`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn forward_avx512(ctx: &Fwd, task: usize) {
        // SAFETY: forwarded.
        unsafe { forward_task::<Avx512>(ctx, task) }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; otherwise as [`forward_task`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_avx2(ctx: &Fwd, task: usize) {
        // SAFETY: forwarded.
        unsafe { forward_task::<Avx2>(ctx, task) }
    }

    /// # Safety
    /// The CPU supports AVX-512F, AVX2 and FMA; otherwise as [`backward_task`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn backward_avx512(ctx: &Bwd, task: usize) -> Vec<f32> {
        // SAFETY: forwarded.
        unsafe { backward_task::<Avx512>(ctx, task) }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; otherwise as [`backward_task`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward_avx2(ctx: &Bwd, task: usize) -> Vec<f32> {
        // SAFETY: forwarded.
        unsafe { backward_task::<Avx2>(ctx, task) }
    }
}
