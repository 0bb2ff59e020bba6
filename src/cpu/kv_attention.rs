//! Decode attention over a KV cache, reading the cache in its stored format (f32, f16, int8 or int4 rows)
//! and dequantizing on the fly; plus the row codecs the cache writes with.
//!
//! One pass over the cached tokens per (batch, kv head) with an online softmax (running max, rescaled
//! running sum, f32 accumulators), a block of tokens at a time: the block's key and value rows are
//! decoded once into two L1-sized buffers (f32 rows are read in place) and used by every query row that
//! shares them — the `Hq/H` query heads of a GQA group times the query tokens of a prefill chunk — so no
//! dequantized copy of the cache ever exists. When there are too few (batch, kv head) pairs to occupy
//! the threads, the tokens are split into chunks whose partial (max, sum, accumulator) states are merged
//! at the end ("flash decoding", split-K).
//!
//! The dot products (four key rows per pass over a query row) and the weighted sums of value rows (up
//! to four accumulator rows held in registers across a block) have AVX-512 and AVX2+FMA kernels written
//! with intrinsics and a portable one; the loop around them is compiled once per instruction set by
//! inlining it into `#[target_feature]` wrappers, as the GEMM does, and [`Isa`] picks one at run time.
//! Decoding is exact, so every instruction set sees the same values; results differ across them only by
//! f32 summation order.

use super::matmul::Isa;
use super::simd;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::ops::Range;

/// How a KV cache stores each row of head_dim values.
///
/// The integer formats are symmetric, per token and head, with one scale per `group` consecutive
/// elements of the row (`group` divides head_dim; `group = head_dim` is one scale per token and head,
/// LLM-QAT's per-token KV quantization):
/// - `Int8`: codes in [−127, 127], scale = max|x| / 127.
/// - `Int4`: codes in [−7, 7] (symmetric, so −8 is never used and the grid has a zero), scale =
///   max|x| / 7; two codes per byte.
///
/// Scales are stored as f16, rounded *up* from max|x| / qmax so that no code ever clips: every element
/// is then within half a (stored) scale of its original, and the stored scale exceeds the exact one by
/// at most a relative 2⁻¹⁰ (for scales in f16's normal range, 6.1e−5 ..= 65504; groups whose max|x|
/// needs a larger scale saturate at f16::MAX and their codes clip).
///
/// Bytes per row (one token of one kv head, K or V alone; twice that for K and V), scales included:
///
/// | format              | head_dim 64 | head_dim 128 |
/// |---------------------|-------------|--------------|
/// | `F32`               | 256         | 512          |
/// | `F16`               | 128         | 256          |
/// | `Int8 { group: d }` | 66          | 130          |
/// | `Int8 { group: 32 }`| 68          | 136          |
/// | `Int4 { group: d }` | 34          | 66           |
/// | `Int4 { group: 32 }`| 36          | 72           |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvFormat {
    F32,
    F16,
    Int8 { group: usize },
    Int4 { group: usize },
}

impl KvFormat {
    /// The scale group of the integer formats (`None` for the float ones).
    pub fn group(self) -> Option<usize> {
        match self {
            KvFormat::F32 | KvFormat::F16 => None,
            KvFormat::Int8 { group } | KvFormat::Int4 { group } => Some(group),
        }
    }

    /// Code elements per row of `head_dim` values (`f32`, `f16`, `i8`, or bytes of two int4 codes).
    pub fn codes_per_row(self, head_dim: usize) -> usize {
        match self {
            KvFormat::Int4 { .. } => head_dim.div_ceil(2),
            _ => head_dim,
        }
    }

    /// f16 scales per row of `head_dim` values.
    pub fn scales_per_row(self, head_dim: usize) -> usize {
        self.group().map_or(0, |g| head_dim / g.max(1))
    }

    /// Bytes one row of `head_dim` values takes, scales included.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        let code_bytes = match self {
            KvFormat::F32 => 4,
            KvFormat::F16 => 2,
            KvFormat::Int8 { .. } | KvFormat::Int4 { .. } => 1,
        };
        self.codes_per_row(head_dim) * code_bytes + 2 * self.scales_per_row(head_dim)
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvFormat::F32 => f.write_str("f32"),
            KvFormat::F16 => f.write_str("f16"),
            KvFormat::Int8 { group } => write!(f, "int8/g{group}"),
            KvFormat::Int4 { group } => write!(f, "int4/g{group}"),
        }
    }
}

/// amax / qmax rounded up to the next f16, so that |x| / scale ≤ qmax for every x of the group and
/// rounding to the nearest code never clips; saturates at f16::MAX (NaN stays NaN).
fn group_scale(amax: f32, qmax: f32) -> f16 {
    let s = amax / qmax;
    if s.is_nan() {
        return f16::NAN;
    }
    if s > f16::MAX.to_f32() {
        return f16::MAX;
    }
    let h = f16::from_f32(s);
    if h.to_f32() < s {
        // s is positive and below f16::MAX here, so the next f16 up is finite.
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

/// round(x / scale) (ties to even) clamped to [−qmax, qmax]; 0 for a zero scale (an all-zero group)
/// and for NaN.
#[inline]
fn code(x: f32, scale: f32, qmax: f32) -> i32 {
    // Adding and subtracting 1.5 · 2²³ rounds an |v| < 2²² to an integer, ties to even, in two adds:
    // `f32::round_ties_even` is a libm call on the baseline x86-64 target.
    const ROUND: f32 = 12_582_912.0;
    if scale > 0.0 {
        let v = (x / scale).clamp(-qmax, qmax);
        ((v + ROUND) - ROUND) as i32
    } else {
        0
    }
}

/// Largest magnitude of a group (NaN ignored).
fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |a, v| a.max(v.abs()))
}

/// Encodes rows of head_dim = `codes.len() / rows` values as int8: `x` holds the rows back to back,
/// `scales` gets head_dim / `group` f16 scales per row.
///
/// # Panics
/// If the slice lengths disagree with `group` (a caller bug: the cache sizes them).
pub fn quantize_int8(x: &[f32], group: usize, codes: &mut [i8], scales: &mut [f16]) {
    assert!(
        codes.len() == x.len() && scales.len() * group == x.len(),
        "quantize_int8: {} values, {} codes, {} scales of group {group}",
        x.len(),
        codes.len(),
        scales.len()
    );
    for ((xg, cg), s) in x
        .chunks_exact(group)
        .zip(codes.chunks_exact_mut(group))
        .zip(scales)
    {
        *s = group_scale(amax(xg), 127.0);
        let sf = s.to_f32();
        for (c, &v) in cg.iter_mut().zip(xg) {
            *c = code(v, sf, 127.0) as i8;
        }
    }
}

/// Encodes rows of `head_dim` values as int4: byte i of a row holds element i in its low nibble and
/// element i + ⌈head_dim/2⌉ in its high nibble (the split-halves layout of llama.cpp's q4_0, which
/// decodes with two contiguous loops instead of a shuffle), each code stored as code + 8 in 1..=15; the
/// high nibble of an odd head_dim's last byte is padding (code 0). `scales` gets head_dim / `group` f16
/// scales per row.
///
/// # Panics
/// If the slice lengths disagree with `head_dim` and `group` (a caller bug: the cache sizes them).
pub fn quantize_int4(
    x: &[f32],
    head_dim: usize,
    group: usize,
    codes: &mut [u8],
    scales: &mut [f16],
) {
    let half = head_dim.div_ceil(2);
    let rows = x.len() / head_dim.max(1);
    assert!(
        rows * head_dim == x.len() && codes.len() == rows * half && scales.len() * group == x.len(),
        "quantize_int4: {} values of head_dim {head_dim}, {} codes, {} scales of group {group}",
        x.len(),
        codes.len(),
        scales.len()
    );
    let groups = head_dim / group;
    for ((row, bytes), row_scales) in x
        .chunks_exact(head_dim)
        .zip(codes.chunks_exact_mut(half))
        .zip(scales.chunks_exact_mut(groups))
    {
        for (s, xg) in row_scales.iter_mut().zip(row.chunks_exact(group)) {
            *s = group_scale(amax(xg), 7.0);
        }
        let at = |j: usize| {
            if j < head_dim {
                code(row[j], row_scales[j / group].to_f32(), 7.0)
            } else {
                0
            }
        };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = ((at(i) + 8) | ((at(i + half) + 8) << 4)) as u8;
        }
    }
}

/// The cached rows of one (batch, kv head) in their stored format, `len × head_dim` values.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Int8 {
        codes: &'a [i8],
        scales: &'a [f16],
        group: usize,
    },
    Int4 {
        codes: &'a [u8],
        scales: &'a [f16],
        group: usize,
    },
}

impl Rows<'_> {
    /// Row `t` as f32 values, `buf.len()` = head_dim of them: borrowed for f32 rows, decoded into `buf`
    /// otherwise. Decoding is exact (a code times its f16 scale needs at most 18 significant bits), so
    /// every instruction set decodes to the same values. Scales widen with `to_f32_const`, plain
    /// integer code that inlines, rather than `to_f32`, which checks for F16C on every call.
    #[inline(always)]
    pub fn row<'b>(&'b self, t: usize, buf: &'b mut [f32]) -> &'b [f32] {
        let d = buf.len();
        match *self {
            Rows::F32(v) => &v[t * d..][..d],
            Rows::F16(v) => {
                v[t * d..][..d].convert_to_f32_slice(buf);
                buf
            }
            Rows::Int8 {
                codes,
                scales,
                group,
            } => {
                let groups = d / group;
                let codes = &codes[t * d..][..d];
                let scales = &scales[t * groups..][..groups];
                // One scale per row (the common per-token setting) folds into the conversion; otherwise
                // the scales are applied in a second pass (a whole-row conversion loop vectorises, one
                // per short group would not).
                let one = if groups == 1 {
                    scales[0].to_f32_const()
                } else {
                    1.0
                };
                for (o, &c) in buf.iter_mut().zip(codes) {
                    *o = c as f32 * one;
                }
                if groups > 1 {
                    apply_scales(buf, group, scales);
                }
                buf
            }
            Rows::Int4 {
                codes,
                scales,
                group,
            } => {
                let (half, groups) = (d.div_ceil(2), d / group);
                let bytes = &codes[t * half..][..half];
                let scales = &scales[t * groups..][..groups];
                // One scale per row (the common per-token setting) folds into the unpacking; otherwise
                // the scales are applied in a second pass, group by group.
                let one = if groups == 1 {
                    scales[0].to_f32_const()
                } else {
                    1.0
                };
                let (lo, hi) = buf.split_at_mut(half);
                for (o, &b) in lo.iter_mut().zip(bytes) {
                    *o = ((b & 15) as i32 - 8) as f32 * one;
                }
                for (o, &b) in hi.iter_mut().zip(bytes) {
                    *o = ((b >> 4) as i32 - 8) as f32 * one;
                }
                if groups > 1 {
                    apply_scales(buf, group, scales);
                }
                buf
            }
        }
    }
}

/// Multiplies each `group` consecutive values of `x` by its scale. With groups of whole vectors this
/// runs a 16-lane step at a time: a plain loop over one short group would leave it to the scalar
/// remainder of the compiler's (4× unrolled) vector loop.
#[inline(always)]
fn apply_scales(x: &mut [f32], group: usize, scales: &[f16]) {
    if group.is_multiple_of(16) {
        let steps = x.as_chunks_mut::<16>().0;
        for (steps, s) in steps.chunks_mut(group / 16).zip(scales) {
            let s = s.to_f32_const();
            for v in steps {
                v.iter_mut().for_each(|x| *x *= s);
            }
        }
    } else {
        for (v, s) in x.chunks_exact_mut(group).zip(scales) {
            let s = s.to_f32_const();
            v.iter_mut().for_each(|x| *x *= s);
        }
    }
}

/// A cache as the kernel sees it: `heads` kv heads of `head_dim`, `len` tokens, and the K and V rows of
/// each (batch, kv head) pair, batch-major (`k[b · heads + h]`).
#[derive(Clone, Copy, Debug)]
pub struct KvRef<'a> {
    pub k: &'a [Rows<'a>],
    pub v: &'a [Rows<'a>],
    pub heads: usize,
    pub head_dim: usize,
    pub len: usize,
}

/// Floats of one decoded block of key (or value) rows: 16 KiB, so that the key block, the value block
/// and the scores stay in L1.
const BLOCK_FLOATS: usize = 4096;
/// The automatic split never makes chunks shorter than this: each chunk costs a partial state and a merge.
const MIN_CHUNK: usize = 256;
/// Below this many multiply-adds a call runs on the calling thread: rayon's fork/join costs more.
const SERIAL_WORK: usize = 1 << 17;

/// Attention of `q` [batch, q_heads, q_len, head_dim] (row-major) over the cache: query head h reads kv
/// head h / (q_heads / heads), and query token i of the chunk attends to cached positions
/// 0..=len − q_len + i (everything for q_len = 1; the causal mask of a prefill chunk that was just
/// appended). Scores are q·k·`scale`. `chunk` forces split-K chunks of that many tokens (tests); `None`
/// splits only when there are fewer (batch, kv head) pairs than twice the threads. Returns
/// [batch, q_heads, q_len, head_dim].
///
/// # Panics
/// If this CPU cannot run `isa`, or the shapes disagree (q_heads not a multiple of `kv.heads`, q_len
/// above `kv.len`, slices too short): callers validate user input first.
pub fn attend(
    isa: Isa,
    q: &[f32],
    (batch, q_heads, q_len): (usize, usize, usize),
    kv: &KvRef,
    scale: f32,
    chunk: Option<usize>,
) -> Vec<f32> {
    assert!(
        Isa::available().contains(&isa),
        "kv attention: this CPU cannot run the {isa:?} kernels"
    );
    let (heads, d, len) = (kv.heads, kv.head_dim, kv.len);
    assert!(
        heads > 0
            && q_heads.is_multiple_of(heads)
            && (1..=len).contains(&q_len)
            && q.len() == batch * q_heads * q_len * d
            && kv.k.len() == batch * heads
            && kv.v.len() == batch * heads,
        "kv attention: q [{batch}, {q_heads}, {q_len}, {d}] ({} values) against {} streams of {heads} \
         heads × {len} tokens",
        q.len(),
        kv.k.len()
    );
    let rows = q_heads / heads * q_len;
    let mut out = vec![0f32; q.len()];
    if out.is_empty() {
        return out;
    }
    let tasks = batch * heads;
    // The rep query heads of kv head h are consecutive, so their rows are one contiguous block of q and out.
    let task = |i: usize| Task {
        q: &q[i * rows * d..][..rows * d],
        k: kv.k[i],
        v: kv.v[i],
        rows,
        q_len,
        len,
        d,
        scale,
    };
    let parallel = tasks * len * (rows + 1) * d >= SERIAL_WORK;
    let threads = rayon::current_num_threads();
    let chunk = match chunk {
        Some(c) => c.clamp(1, len),
        None if parallel && tasks < 2 * threads => {
            len.div_ceil((2 * threads).div_ceil(tasks)).max(MIN_CHUNK)
        }
        None => len,
    };
    let splits = len.div_ceil(chunk);
    if splits == 1 {
        let one = |(i, o): (usize, &mut [f32])| run(isa, &task(i), 0..len).finish(o, d);
        if parallel {
            out.par_chunks_mut(rows * d).enumerate().for_each(one);
        } else {
            out.chunks_mut(rows * d).enumerate().for_each(one);
        }
        return out;
    }
    let part = |p: usize| {
        let c = p % splits;
        run(
            isa,
            &task(p / splits),
            c * chunk..((c + 1) * chunk).min(len),
        )
    };
    let partials: Vec<Partial> = if parallel {
        (0..tasks * splits).into_par_iter().map(part).collect()
    } else {
        (0..tasks * splits).map(part).collect()
    };
    let merge = |(i, o): (usize, &mut [f32])| merge(&partials[i * splits..][..splits], o, d);
    if parallel {
        out.par_chunks_mut(rows * d).enumerate().for_each(merge);
    } else {
        out.chunks_mut(rows * d).enumerate().for_each(merge);
    }
    out
}

/// The work of one (batch, kv head): its block of query rows and its cached rows.
struct Task<'a> {
    /// `rows` query rows of `d`: query head r of the group, token i at row r · q_len + i.
    q: &'a [f32],
    k: Rows<'a>,
    v: Rows<'a>,
    rows: usize,
    q_len: usize,
    len: usize,
    d: usize,
    scale: f32,
}

/// Online-softmax state of a task's query rows over some tokens: running max `m`, the sum `l` of
/// exp(score − m) and the accumulator Σ exp(score − m) · v, per row.
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    /// Writes acc / l for every row.
    fn finish(&self, out: &mut [f32], d: usize) {
        for ((o, a), &l) in out
            .chunks_exact_mut(d)
            .zip(self.acc.chunks_exact(d))
            .zip(&self.l)
        {
            let inv = 1.0 / l;
            for (o, &a) in o.iter_mut().zip(a) {
                *o = a * inv;
            }
        }
    }
}

/// Combines the partial states of consecutive token chunks: each rescaled to the overall max.
fn merge(parts: &[Partial], out: &mut [f32], d: usize) {
    for (j, o) in out.chunks_exact_mut(d).enumerate() {
        let m = parts
            .iter()
            .map(|p| p.m[j])
            .fold(f32::NEG_INFINITY, f32::max);
        o.fill(0.0);
        let mut l = 0.0;
        for p in parts {
            // A chunk entirely past this row's causal limit has m = −∞ and contributes nothing.
            if p.m[j] == f32::NEG_INFINITY {
                continue;
            }
            let w = simd::exp(p.m[j] - m);
            l += w * p.l[j];
            for (o, &a) in o.iter_mut().zip(&p.acc[j * d..][..d]) {
                *o += w * a;
            }
        }
        let inv = 1.0 / l;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

/// `run_body` on the kernels of `isa`.
fn run(isa: Isa, task: &Task, tokens: Range<usize>) -> Partial {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `attend` asserted that `isa` is in `Isa::available()`, which lists Avx512 only when
        // AVX-512F, AVX2 and FMA were detected.
        Isa::Avx512 => unsafe { x86::run_avx512(task, tokens) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2Fma is listed only when AVX2 and FMA were detected.
        Isa::Avx2Fma => unsafe { x86::run_avx2(task, tokens) },
        // SAFETY: the portable kernels need no CPU feature.
        _ => unsafe { run_body::<Portable>(task, tokens) },
    }
}

/// The vector primitives of the online softmax, one implementation per instruction set. Slices passed
/// together have the lengths documented; implementations may rely on them.
trait Kernels {
    /// The dot products of `q` with the four equally long rows `k`.
    ///
    /// # Safety
    /// The CPU supports the implementor's instruction set, and every `k[i].len() == q.len()`.
    unsafe fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4];

    /// For each of the R rows r of `acc` (R · d floats, rows back to back):
    /// acc[r] += Σ_t p[r][t] · v[t·d..(t+1)·d]. Sharing each value row across R accumulator rows gives
    /// R times the independent multiply-adds per load.
    ///
    /// # Safety
    /// The CPU supports the implementor's instruction set, `acc.len() = R · d` and every p[r] has the
    /// same length n with `v.len() ≥ n · d`.
    unsafe fn accumulate<const R: usize>(acc: &mut [f32], d: usize, p: [&[f32]; R], v: &[f32]);

    /// dst[i] = src[i] as f32 (exact) over equal-length slices.
    ///
    /// # Safety
    /// The CPU supports the implementor's instruction set.
    unsafe fn widen_f16(src: &[f16], dst: &mut [f32]);
}

/// q · k for one row, on the same code path as the rows of `dot4` (so that a score does not depend on
/// whether its token fell in a group of four).
///
/// # Safety
/// As [`Kernels::dot4`].
#[inline(always)]
unsafe fn dot1<K: Kernels>(q: &[f32], k: &[f32]) -> f32 {
    // SAFETY: forwarded from the caller; all four rows are `k`, of q's length.
    unsafe { K::dot4(q, [k; 4])[0] }
}

/// Plain loops with independent lane accumulators, which the compiler vectorises for the baseline
/// target (a single running sum would be a serial dependency chain).
struct Portable;

impl Kernels for Portable {
    #[inline(always)]
    unsafe fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        k.map(|k| {
            let mut acc = [0f32; 8];
            let (qs, qt) = q.as_chunks::<8>();
            let (ks, kt) = k.as_chunks::<8>();
            for (qc, kc) in qs.iter().zip(ks) {
                for ((s, &a), &b) in acc.iter_mut().zip(qc).zip(kc) {
                    *s += a * b;
                }
            }
            let tail: f32 = qt.iter().zip(kt).map(|(a, b)| a * b).sum();
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
        })
    }

    #[inline(always)]
    unsafe fn accumulate<const R: usize>(acc: &mut [f32], d: usize, p: [&[f32]; R], v: &[f32]) {
        for (acc, p) in acc.chunks_exact_mut(d).zip(p) {
            for (&pt, row) in p.iter().zip(v.chunks_exact(d)) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += pt * x;
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn widen_f16(src: &[f16], dst: &mut [f32]) {
        // `half` converts with F16C where the CPU has it.
        src.convert_to_f32_slice(dst);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{run_body, Kernels, Partial, Task};
    use half::f16;
    use half::slice::HalfFloatSliceExt;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// # Safety
    /// The CPU supports AVX-512F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn run_avx512(task: &Task, tokens: Range<usize>) -> Partial {
        // SAFETY: the caller guarantees AVX-512F, which `Avx512`'s kernels need.
        unsafe { run_body::<Avx512>(task, tokens) }
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run_avx2(task: &Task, tokens: Range<usize>) -> Partial {
        // SAFETY: the caller guarantees AVX2 and FMA, which `Avx2`'s kernels need.
        unsafe { run_body::<Avx2>(task, tokens) }
    }

    /// 16 lanes, masked tails.
    struct Avx512;

    /// Lanes `i..n` of a 16-lane step, as a load/store mask (n − i < 16).
    #[inline(always)]
    fn tail_mask(n: usize, i: usize) -> __mmask16 {
        ((1u32 << (n - i)) - 1) as __mmask16
    }

    impl Kernels for Avx512 {
        #[inline(always)]
        unsafe fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
            let n = q.len();
            debug_assert!(k.iter().all(|k| k.len() == n));
            let qp = q.as_ptr();
            let kp = k.map(<[f32]>::as_ptr);
            let mut out = [0f32; 4];
            // SAFETY: the caller guarantees AVX-512F and that every row holds n floats; full loads read
            // lanes i..i + 16 ≤ n and the masked tail enables only lanes below n.
            unsafe {
                let mut a = [_mm512_setzero_ps(); 4];
                let mut i = 0;
                while i + 16 <= n {
                    let qv = _mm512_loadu_ps(qp.add(i));
                    for (a, kp) in a.iter_mut().zip(kp) {
                        *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp.add(i)), *a);
                    }
                    i += 16;
                }
                if i < n {
                    let m = tail_mask(n, i);
                    let qv = _mm512_maskz_loadu_ps(m, qp.add(i));
                    for (a, kp) in a.iter_mut().zip(kp) {
                        *a = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, kp.add(i)), *a);
                    }
                }
                // Transpose-and-add the four accumulators so that each 128-bit lane holds its part of
                // the four sums, then fold the lanes: 11 shuffles and adds instead of four full
                // reductions.
                let pair = |x: __m512, y: __m512| {
                    _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
                };
                let (s01, s23) = (pair(a[0], a[1]), pair(a[2], a[3]));
                let (s01, s23) = (_mm512_castps_pd(s01), _mm512_castps_pd(s23));
                let s = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(s01, s23)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(s01, s23)),
                );
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
                let h = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
                let r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                _mm_storeu_ps(out.as_mut_ptr(), r);
            }
            out
        }

        #[inline(always)]
        unsafe fn accumulate<const R: usize>(acc: &mut [f32], d: usize, p: [&[f32]; R], v: &[f32]) {
            let n = p[0].len();
            debug_assert!(acc.len() == R * d && p.iter().all(|p| p.len() == n) && v.len() >= n * d);
            let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
            let pp = p.map(<[f32]>::as_ptr);
            // SAFETY: the caller guarantees AVX-512F, R rows of d floats in acc, n weights per row and n
            // rows of d floats in v; every access covers lanes c..c + 64 or c..c + 16 below d, or a
            // masked tail below d, of an acc row and of a value row.
            unsafe {
                let mut c = 0;
                // R × 2 vectors of acc stay in registers across the whole block of tokens.
                while c + 32 <= d {
                    let mut x = [[_mm512_setzero_ps(); 2]; R];
                    for (r, x) in x.iter_mut().enumerate() {
                        *x = [0, 16].map(|o| _mm512_loadu_ps(ap.add(r * d + c + o)));
                    }
                    for t in 0..n {
                        let row = vp.add(t * d + c);
                        let vv = [0, 16].map(|o| _mm512_loadu_ps(row.add(o)));
                        for (x, pp) in x.iter_mut().zip(pp) {
                            let pv = _mm512_set1_ps(*pp.add(t));
                            for (x, vv) in x.iter_mut().zip(vv) {
                                *x = _mm512_fmadd_ps(pv, vv, *x);
                            }
                        }
                    }
                    for (r, x) in x.into_iter().enumerate() {
                        for (x, o) in x.into_iter().zip([0, 16]) {
                            _mm512_storeu_ps(ap.add(r * d + c + o), x);
                        }
                    }
                    c += 32;
                }
                while c < d {
                    let m = if c + 16 <= d { !0 } else { tail_mask(d, c) };
                    let mut x = [_mm512_setzero_ps(); R];
                    for (r, x) in x.iter_mut().enumerate() {
                        *x = _mm512_maskz_loadu_ps(m, ap.add(r * d + c));
                    }
                    for t in 0..n {
                        let vv = _mm512_maskz_loadu_ps(m, vp.add(t * d + c));
                        for (x, pp) in x.iter_mut().zip(pp) {
                            *x = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(t)), vv, *x);
                        }
                    }
                    for (r, x) in x.into_iter().enumerate() {
                        _mm512_mask_storeu_ps(ap.add(r * d + c), m, x);
                    }
                    c += 16;
                }
            }
        }

        #[inline(always)]
        unsafe fn widen_f16(src: &[f16], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let (sp, dp) = (src.as_ptr().cast::<u16>(), dst.as_mut_ptr());
            // SAFETY: the caller guarantees AVX-512F (whose vcvtph2ps this is); every 256-bit load reads
            // 16 f16 at i..i + 16 ≤ n and every store writes 16 f32 there; the tail goes through a
            // zero-padded copy.
            unsafe {
                let mut i = 0;
                while i + 16 <= n {
                    let h = _mm256_loadu_si256(sp.add(i).cast());
                    _mm512_storeu_ps(dp.add(i), _mm512_cvtph_ps(h));
                    i += 16;
                }
                if i < n {
                    let mut h = [0u16; 16];
                    h[..n - i].copy_from_slice(std::slice::from_raw_parts(sp.add(i), n - i));
                    let m = tail_mask(n, i);
                    _mm512_mask_storeu_ps(
                        dp.add(i),
                        m,
                        _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast())),
                    );
                }
            }
        }
    }

    /// 8 lanes, scalar tails.
    struct Avx2;

    impl Kernels for Avx2 {
        #[inline(always)]
        unsafe fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
            let n = q.len();
            debug_assert!(k.iter().all(|k| k.len() == n));
            let qp = q.as_ptr();
            let kp = k.map(<[f32]>::as_ptr);
            let mut out = [0f32; 4];
            // SAFETY: the caller guarantees AVX2 and FMA and that every row holds n floats; every load
            // reads lanes i..i + 8 ≤ n.
            let done = unsafe {
                let mut a = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 8 <= n {
                    let qv = _mm256_loadu_ps(qp.add(i));
                    for (a, kp) in a.iter_mut().zip(kp) {
                        *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add(i)), *a);
                    }
                    i += 8;
                }
                // As in the AVX-512 kernel: transpose-and-add, then fold the two 128-bit lanes.
                let pair = |x: __m256, y: __m256| {
                    _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y))
                };
                let (s01, s23) = (pair(a[0], a[1]), pair(a[2], a[3]));
                let (s01, s23) = (_mm256_castps_pd(s01), _mm256_castps_pd(s23));
                let s = _mm256_add_ps(
                    _mm256_castpd_ps(_mm256_unpacklo_pd(s01, s23)),
                    _mm256_castpd_ps(_mm256_unpackhi_pd(s01, s23)),
                );
                let r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
                _mm_storeu_ps(out.as_mut_ptr(), r);
                i
            };
            for (o, k) in out.iter_mut().zip(k) {
                *o += q[done..]
                    .iter()
                    .zip(&k[done..])
                    .map(|(a, b)| a * b)
                    .sum::<f32>();
            }
            out
        }

        #[inline(always)]
        unsafe fn accumulate<const R: usize>(acc: &mut [f32], d: usize, p: [&[f32]; R], v: &[f32]) {
            let n = p[0].len();
            debug_assert!(acc.len() == R * d && p.iter().all(|p| p.len() == n) && v.len() >= n * d);
            let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
            let pp = p.map(<[f32]>::as_ptr);
            // SAFETY: the caller guarantees AVX2 and FMA, R rows of d floats in acc, n weights per row
            // and n rows of d floats in v; every access covers lanes c..c + 16 or c..c + 8 below d of an
            // acc row and of a value row.
            let done = unsafe {
                let mut c = 0;
                while c + 16 <= d {
                    let mut x = [[_mm256_setzero_ps(); 2]; R];
                    for (r, x) in x.iter_mut().enumerate() {
                        *x = [0, 8].map(|o| _mm256_loadu_ps(ap.add(r * d + c + o)));
                    }
                    for t in 0..n {
                        let row = vp.add(t * d + c);
                        let vv = [0, 8].map(|o| _mm256_loadu_ps(row.add(o)));
                        for (x, pp) in x.iter_mut().zip(pp) {
                            let pv = _mm256_set1_ps(*pp.add(t));
                            for (x, vv) in x.iter_mut().zip(vv) {
                                *x = _mm256_fmadd_ps(pv, vv, *x);
                            }
                        }
                    }
                    for (r, x) in x.into_iter().enumerate() {
                        for (x, o) in x.into_iter().zip([0, 8]) {
                            _mm256_storeu_ps(ap.add(r * d + c + o), x);
                        }
                    }
                    c += 16;
                }
                while c + 8 <= d {
                    let mut x = [_mm256_setzero_ps(); R];
                    for (r, x) in x.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(ap.add(r * d + c));
                    }
                    for t in 0..n {
                        let vv = _mm256_loadu_ps(vp.add(t * d + c));
                        for (x, pp) in x.iter_mut().zip(pp) {
                            *x = _mm256_fmadd_ps(_mm256_set1_ps(*pp.add(t)), vv, *x);
                        }
                    }
                    for (r, x) in x.into_iter().enumerate() {
                        _mm256_storeu_ps(ap.add(r * d + c), x);
                    }
                    c += 8;
                }
                c
            };
            for (acc, p) in acc.chunks_exact_mut(d).zip(p) {
                for (&pt, row) in p.iter().zip(v.chunks_exact(d)) {
                    for (a, &x) in acc[done..].iter_mut().zip(&row[done..]) {
                        *a += pt * x;
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn widen_f16(src: &[f16], dst: &mut [f32]) {
            // F16C is not implied by AVX2; `half` checks for it once per call.
            src.convert_to_f32_slice(dst);
        }
    }
}

impl Rows<'_> {
    /// Rows `t0..t1` as f32, back to back: borrowed for f32 rows, decoded into `buf` otherwise (which
    /// holds at least (t1 − t0) · d floats).
    ///
    /// # Safety
    /// The CPU supports `K`'s instruction set.
    #[inline(always)]
    unsafe fn block<'b, K: Kernels>(
        &'b self,
        t0: usize,
        t1: usize,
        d: usize,
        buf: &'b mut [f32],
    ) -> &'b [f32] {
        let n = (t1 - t0) * d;
        match *self {
            Rows::F32(v) => &v[t0 * d..t1 * d],
            // One conversion for the whole block: its rows are contiguous.
            Rows::F16(v) => {
                // SAFETY: the caller guarantees K's instruction set.
                unsafe { K::widen_f16(&v[t0 * d..t1 * d], &mut buf[..n]) };
                &buf[..n]
            }
            _ => {
                for (t, o) in (t0..t1).zip(buf[..n].chunks_exact_mut(d)) {
                    self.row(t, o);
                }
                &buf[..n]
            }
        }
    }
}

/// The online softmax of one task over `tokens`, a block at a time: decode the block's key rows once,
/// score them against every query row (four tokens per pass over a query row), fold the block max into
/// each row's running max, exponentiate, decode the value rows once and add them, weighted, into the
/// accumulators of up to four rows at a time (held in registers across the block). Inlined into each
/// ISA's wrapper.
///
/// # Safety
/// The CPU supports `K`'s instruction set.
#[inline(always)]
unsafe fn run_body<K: Kernels>(task: &Task, tokens: Range<usize>) -> Partial {
    let &Task {
        rows,
        q_len,
        len,
        d,
        scale,
        ..
    } = task;
    // Scaling q once costs rows · d multiplies instead of one per score.
    let q: Vec<f32> = task.q.iter().map(|&x| x * scale).collect();
    // Row j (query token j % q_len) sees tokens below this limit.
    let limit: Vec<usize> = (0..rows).map(|j| len - q_len + j % q_len + 1).collect();
    let mut state = Partial {
        m: vec![f32::NEG_INFINITY; rows],
        l: vec![0.0; rows],
        acc: vec![0.0; rows * d],
    };
    // A multiple of 4, so that only a sequence's last block scores a token outside a group of four.
    let block = (BLOCK_FLOATS / d).clamp(4, 256) / 4 * 4;
    // f32 rows are read in place; the other formats decode into these.
    let buf_len = if matches!(task.k, Rows::F32(_)) {
        0
    } else {
        block * d
    };
    let (mut kbuf, mut vbuf) = (vec![0f32; buf_len], vec![0f32; buf_len]);
    let mut scores = vec![0f32; block];
    // Each row's softmax weights for the block, at a stride of `block`.
    let mut probs = vec![0f32; rows * block];
    let mut seen = vec![0usize; rows];
    for t0 in tokens.clone().step_by(block) {
        let t1 = (t0 + block).min(tokens.end);
        // SAFETY: the caller guarantees K's instruction set.
        let k = unsafe { task.k.block::<K>(t0, t1, d, &mut kbuf) };
        for (j, qj) in q.chunks_exact(d).enumerate() {
            // Row j sees a prefix of the block.
            let n = limit[j].min(t1).saturating_sub(t0);
            seen[j] = n;
            if n == 0 {
                continue;
            }
            let mut t = 0;
            while t + 4 <= n {
                let rows4 = [0, 1, 2, 3].map(|i| &k[(t + i) * d..][..d]);
                // SAFETY: the caller guarantees K's instruction set; each row holds d floats, as q does.
                let s4 = unsafe { K::dot4(qj, rows4) };
                scores[t..t + 4].copy_from_slice(&s4);
                t += 4;
            }
            for (t, s) in scores[..n].iter_mut().enumerate().skip(t) {
                // SAFETY: as above.
                *s = unsafe { dot1::<K>(qj, &k[t * d..][..d]) };
            }
            let s = &scores[..n];
            // A compare-select running max (NaN scores are skipped, as `max_f32` does): the block is
            // short, and a reduction call's final fold over 16 lanes would cost more than the loop.
            let block_max = s
                .iter()
                .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
            if block_max > state.m[j] {
                // From m = −∞ the factor underflows to 0, and l and acc are 0 anyway.
                let factor = simd::exp(state.m[j] - block_max);
                state.l[j] *= factor;
                state.acc[j * d..][..d]
                    .iter_mut()
                    .for_each(|a| *a *= factor);
                state.m[j] = block_max;
            }
            state.l[j] += simd::exp_shifted(s, state.m[j], &mut probs[j * block..][..n]);
        }
        // SAFETY: as above.
        let v = unsafe { task.v.block::<K>(t0, t1, d, &mut vbuf) };
        // Consecutive rows that see the same tokens (the query heads of a GQA group, or every row when
        // decoding one token) share each value row, up to four at a time.
        let mut j = 0;
        while j < rows {
            let n = seen[j];
            let group = seen[j..].iter().take(4).take_while(|&&m| m == n).count();
            let acc = &mut state.acc[j * d..(j + group) * d];
            let p = |r: usize| &probs[(j + r) * block..][..n];
            // SAFETY: the caller guarantees K's instruction set; acc holds `group` rows of d floats, each
            // weight row has n entries and v holds t1 − t0 ≥ n rows of d floats.
            unsafe {
                match group {
                    _ if n == 0 => {}
                    4 => K::accumulate(acc, d, [p(0), p(1), p(2), p(3)], v),
                    3 => K::accumulate(acc, d, [p(0), p(1), p(2)], v),
                    2 => K::accumulate(acc, d, [p(0), p(1)], v),
                    _ => K::accumulate(acc, d, [p(0)], v),
                }
            }
            j += group;
        }
    }
    state
}
