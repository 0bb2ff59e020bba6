//! The key/value cache of one attention layer for incremental decoding, in f32, f16, int8 or int4
//! ([`KvFormat`]), and the decode attention that reads it without materialising a dequantized copy.
//!
//! Keys are cached after RoPE, as llama.cpp and vLLM do, whereas LLM-QAT quantizes the k_proj output
//! before RoPE. Caching rotated keys means a decode step rotates only its new key and the kernel reads
//! keys ready to use; caching pre-RoPE keys would mean rotating every cached key again at every step
//! (RoPE's angle depends on each key's position, so it cannot be folded into the query once). The
//! accuracy cost is small: RoPE rotates pairs of dims, keeping each pair's norm, so a token's max|x|
//! after it is at most √2 times the max before it, and so is its scale and its error bound.
//!
//! Attention here is an inference path: it records no autograd graph and its result is detached.

use crate::cpu::kv_attention::{self, KvRef, Rows};
use crate::cpu::matmul::Isa;
use crate::error::{Error, Result};
use crate::storage::Device;
use crate::tensor::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

pub use crate::cpu::kv_attention::KvFormat;

/// Tuning of [`KvCache::attend_with`]: the instruction set of the kernels and the split-K chunk length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttendOptions {
    /// Must be one of [`Isa::available`].
    pub isa: Isa,
    /// Tokens per split-K chunk; `None` splits only when there are fewer (batch, kv head) pairs than
    /// twice the threads.
    pub chunk: Option<usize>,
}

impl Default for AttendOptions {
    fn default() -> Self {
        AttendOptions {
            isa: Isa::best(),
            chunk: None,
        }
    }
}

/// The codes of one (batch, kv head) stream of K or V, row after row.
#[derive(Clone, Debug)]
enum Codes {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>),
    U4(Vec<u8>),
}

/// The cached rows of one (batch, kv head) for K or V: codes and, for the integer formats, their f16
/// scales. Each stream grows like a `Vec`, so appending a token never copies the tokens before it
/// except when the stream's capacity doubles.
#[derive(Clone, Debug)]
struct Stream {
    codes: Codes,
    scales: Vec<f16>,
}

impl Stream {
    fn new(format: KvFormat) -> Stream {
        let codes = match format {
            KvFormat::F32 => Codes::F32(Vec::new()),
            KvFormat::F16 => Codes::F16(Vec::new()),
            KvFormat::Int8 { .. } => Codes::I8(Vec::new()),
            KvFormat::Int4 { .. } => Codes::U4(Vec::new()),
        };
        Stream {
            codes,
            scales: Vec::new(),
        }
    }

    /// Encodes `x`, whole rows of `d` values, onto the end.
    fn push(&mut self, x: &[f32], d: usize, format: KvFormat) {
        let rows = x.len() / d;
        let grow = |v: &mut Vec<f16>, n: usize| {
            let start = v.len();
            v.resize(start + n, f16::ZERO);
            start
        };
        let s0 = grow(&mut self.scales, rows * format.scales_per_row(d));
        match (&mut self.codes, format) {
            (Codes::F32(c), _) => c.extend_from_slice(x),
            (Codes::F16(c), _) => {
                let c0 = grow(c, x.len());
                c[c0..].convert_from_f32_slice(x);
            }
            (Codes::I8(c), KvFormat::Int8 { group }) => {
                let c0 = c.len();
                c.resize(c0 + x.len(), 0);
                kv_attention::quantize_int8(x, group, &mut c[c0..], &mut self.scales[s0..]);
            }
            (Codes::U4(c), KvFormat::Int4 { group }) => {
                let c0 = c.len();
                c.resize(c0 + rows * d.div_ceil(2), 0);
                kv_attention::quantize_int4(x, d, group, &mut c[c0..], &mut self.scales[s0..]);
            }
            _ => unreachable!("a stream's codes are created for the cache's format"),
        }
    }

    fn truncate(&mut self, rows: usize, d: usize, format: KvFormat) {
        let n = rows * format.codes_per_row(d);
        match &mut self.codes {
            Codes::F32(c) => c.truncate(n),
            Codes::F16(c) => c.truncate(n),
            Codes::I8(c) => c.truncate(n),
            Codes::U4(c) => c.truncate(n),
        }
        self.scales.truncate(rows * format.scales_per_row(d));
    }

    fn reserve(&mut self, rows: usize, d: usize, format: KvFormat) {
        let n = rows * format.codes_per_row(d);
        match &mut self.codes {
            Codes::F32(c) => c.reserve(n),
            Codes::F16(c) => c.reserve(n),
            Codes::I8(c) => c.reserve(n),
            Codes::U4(c) => c.reserve(n),
        }
        self.scales.reserve(rows * format.scales_per_row(d));
    }

    /// Rows that fit without reallocating.
    fn capacity(&self, d: usize, format: KvFormat) -> usize {
        let codes = match &self.codes {
            Codes::F32(c) => c.capacity(),
            Codes::F16(c) => c.capacity(),
            Codes::I8(c) => c.capacity(),
            Codes::U4(c) => c.capacity(),
        } / format.codes_per_row(d);
        match format.scales_per_row(d) {
            0 => codes,
            s => codes.min(self.scales.capacity() / s),
        }
    }

    fn rows(&self, format: KvFormat) -> Rows<'_> {
        match (&self.codes, format) {
            (Codes::F32(c), _) => Rows::F32(c),
            (Codes::F16(c), _) => Rows::F16(c),
            (Codes::I8(c), KvFormat::Int8 { group }) => Rows::Int8 {
                codes: c,
                scales: &self.scales,
                group,
            },
            (Codes::U4(c), KvFormat::Int4 { group }) => Rows::Int4 {
                codes: c,
                scales: &self.scales,
                group,
            },
            _ => unreachable!("a stream's codes are created for the cache's format"),
        }
    }
}

/// The K and V cache of one attention layer: `batch` sequences of equal length, `heads` kv heads of
/// `head_dim`, stored as `format`. Grows as tokens are appended (amortised like a `Vec`; reserve up
/// front with [`KvCache::with_capacity`] to never reallocate).
#[derive(Clone, Debug)]
pub struct KvCache {
    batch: usize,
    heads: usize,
    head_dim: usize,
    format: KvFormat,
    len: usize,
    /// One stream per (batch, kv head), batch-major.
    k: Vec<Stream>,
    v: Vec<Stream>,
}

impl KvCache {
    /// An empty cache. Errors unless every size is positive and an integer format's group divides
    /// head_dim.
    pub fn new(batch: usize, heads: usize, head_dim: usize, format: KvFormat) -> Result<KvCache> {
        if batch == 0 || heads == 0 || head_dim == 0 {
            crate::bail!(
                "KvCache::new",
                "batch, heads and head_dim must be positive, got {batch}, {heads}, {head_dim}"
            );
        }
        if let Some(group) = format.group() {
            if group == 0 || !head_dim.is_multiple_of(group) {
                crate::bail!(
                    "KvCache::new",
                    "{format}: the scale group must divide head_dim {head_dim}"
                );
            }
        }
        let streams = || (0..batch * heads).map(|_| Stream::new(format)).collect();
        Ok(KvCache {
            batch,
            heads,
            head_dim,
            format,
            len: 0,
            k: streams(),
            v: streams(),
        })
    }

    /// An empty cache with room for `tokens` tokens before it reallocates.
    pub fn with_capacity(
        batch: usize,
        heads: usize,
        head_dim: usize,
        format: KvFormat,
        tokens: usize,
    ) -> Result<KvCache> {
        let mut cache = KvCache::new(batch, heads, head_dim, format)?;
        cache.reserve(tokens);
        Ok(cache)
    }

    /// Makes room for at least `additional` more tokens (as `Vec::reserve`).
    pub fn reserve(&mut self, additional: usize) {
        let (d, f) = (self.head_dim, self.format);
        for s in self.k.iter_mut().chain(&mut self.v) {
            s.reserve(additional, d, f);
        }
    }

    /// Tokens the cache holds without reallocating.
    pub fn capacity(&self) -> usize {
        let (d, f) = (self.head_dim, self.format);
        self.k
            .iter()
            .chain(&self.v)
            .map(|s| s.capacity(d, f))
            .min()
            .unwrap_or(0)
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn format(&self) -> KvFormat {
        self.format
    }

    /// Cached tokens (per sequence).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` tokens (no-op when `len` ≥ the cached length), keeping the capacity.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let (d, f) = (self.head_dim, self.format);
        for s in self.k.iter_mut().chain(&mut self.v) {
            s.truncate(len, d, f);
        }
        self.len = len;
    }

    /// Drops every token, keeping the capacity.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes one token takes across the batch and heads, K and V, scales included:
    /// 2 · batch · heads · [`KvFormat::row_bytes`] (the table there gives the row sizes).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.batch * self.heads * self.format.row_bytes(self.head_dim)
    }

    /// Bytes the cached tokens take (not counting spare capacity).
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_token()
    }

    /// Encodes and appends `k` and `v`, both [batch, heads, tokens, head_dim] (any float dtype, any
    /// layout), tokens ≥ 1.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let want = [
            self.batch,
            self.heads,
            k.dims().get(2).copied().unwrap_or(0),
            self.head_dim,
        ];
        for (name, t) in [("k", k), ("v", v)] {
            if !t.dtype().is_float() {
                return Err(Error::UnsupportedDType {
                    op: "KvCache::append",
                    dtype: t.dtype(),
                });
            }
            if t.dims() != want || want[2] == 0 {
                crate::bail!(
                    "KvCache::append",
                    "{name} must be [batch {}, kv heads {}, tokens ≥ 1, head_dim {}] like k, got k {:?} \
                     and v {:?}",
                    self.batch,
                    self.heads,
                    self.head_dim,
                    k.dims(),
                    v.dims()
                );
            }
        }
        let (d, f) = (self.head_dim, self.format);
        let per_stream = want[2] * d;
        let parallel = per_stream * self.k.len() >= crate::cpu::PAR_THRESHOLD;
        let push = |streams: &mut [Stream], x: &[f32]| {
            let one = |(s, x): (&mut Stream, &[f32])| s.push(x, d, f);
            if parallel {
                streams
                    .par_iter_mut()
                    .zip(x.par_chunks(per_stream))
                    .for_each(one);
            } else {
                streams.iter_mut().zip(x.chunks(per_stream)).for_each(one);
            }
        };
        k.with_f32_slice("kv_cache", |x| push(&mut self.k, x))?;
        v.with_f32_slice("kv_cache", |x| push(&mut self.v, x))?;
        self.len += want[2];
        Ok(())
    }

    fn streams_to_tensor(&self, streams: &[Stream]) -> Result<Tensor> {
        let (d, n) = (self.head_dim, self.len);
        let mut out = vec![0f32; streams.len() * n * d];
        let mut buf = vec![0f32; d];
        for (s, o) in streams.iter().zip(out.chunks_exact_mut((n * d).max(1))) {
            let rows = s.rows(self.format);
            for (t, o) in o.chunks_exact_mut(d).enumerate() {
                o.copy_from_slice(rows.row(t, &mut buf));
            }
        }
        Tensor::from_vec(out, (self.batch, self.heads, n, d), Device::Cpu)
    }

    /// The keys as the kernel sees them, [batch, heads, len, head_dim] f32 (tests, debugging).
    pub fn dequantize_k(&self) -> Result<Tensor> {
        self.streams_to_tensor(&self.k)
    }

    /// The values as the kernel sees them, [batch, heads, len, head_dim] f32.
    pub fn dequantize_v(&self) -> Result<Tensor> {
        self.streams_to_tensor(&self.v)
    }

    /// softmax(q·kᵀ·`scale`)·v over the cache for `q` [batch, q_heads, q_len, head_dim], q_heads a
    /// multiple of the cache's heads (query head h reads kv head h / (q_heads / heads)). With q_len = 1
    /// the query sees every cached token; with q_len > 1 the queries are the last q_len cached tokens
    /// (a prefill chunk appended just before) and query i sees positions 0..=len − q_len + i. Returns
    /// [batch, q_heads, q_len, head_dim] in q's dtype, computed in f32, detached: this is not
    /// differentiable.
    pub fn attend(&self, q: &Tensor, scale: f32) -> Result<Tensor> {
        self.attend_with(q, scale, AttendOptions::default())
    }

    /// [`KvCache::attend`] on the kernels and split of `opts` (tests and benchmarks).
    pub fn attend_with(&self, q: &Tensor, scale: f32, opts: AttendOptions) -> Result<Tensor> {
        let &[b, q_heads, q_len, d] = q.dims() else {
            crate::bail!(
                "KvCache::attend",
                "q must be [batch, q_heads, q_len, head_dim], got shape {}",
                q.shape()
            );
        };
        if !q.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: "KvCache::attend",
                dtype: q.dtype(),
            });
        }
        let fits = b == self.batch
            && d == self.head_dim
            && q_heads >= self.heads
            && q_heads.is_multiple_of(self.heads)
            && (1..=self.len).contains(&q_len);
        if !fits {
            crate::bail!(
                "KvCache::attend",
                "q {:?} against a cache of [batch {}, kv heads {}, len {}, head_dim {}]: need the same batch \
                 and head_dim, q_heads a multiple of the kv heads and 1 ≤ q_len ≤ len",
                q.dims(),
                self.batch,
                self.heads,
                self.len,
                self.head_dim
            );
        }
        if !scale.is_finite() {
            crate::bail!("KvCache::attend", "scale must be finite, got {scale}");
        }
        if !Isa::available().contains(&opts.isa) {
            crate::bail!(
                "KvCache::attend",
                "this CPU cannot run the {:?} kernels",
                opts.isa
            );
        }
        if opts.chunk == Some(0) {
            crate::bail!(
                "KvCache::attend",
                "split-K chunks must hold at least one token"
            );
        }
        let k: Vec<Rows> = self.k.iter().map(|s| s.rows(self.format)).collect();
        let v: Vec<Rows> = self.v.iter().map(|s| s.rows(self.format)).collect();
        let kv = KvRef {
            k: &k,
            v: &v,
            heads: self.heads,
            head_dim: d,
            len: self.len,
        };
        let out = q.with_f32_slice("kv_cache", |x| {
            kv_attention::attend(opts.isa, x, (b, q_heads, q_len), &kv, scale, opts.chunk)
        })?;
        Tensor::from_vec(out, (b, q_heads, q_len, d), Device::Cpu)?.to_dtype(q.dtype())
    }
}
