//! The key/value cache of one attention layer for incremental decoding, in f32, f16, int8 or int4
//! ([`KvFormat`]), and the decode attention that reads it without materialising a dequantized copy.
//!
//! The host cache keeps every format in host memory for the CPU's fused decode kernels. The dense
//! cache keeps every format in buffers on the device of the tensors it is given (a GPU), appends in
//! place there (the integer formats through a fused quantize-and-append kernel that writes the host
//! cache's row encoding bit for bit) and attends there (one query token per head on a GPU: a
//! flash-decoding kernel reading the codes in place; otherwise the engine's tensor ops), so a model
//! decoding on a GPU never copies K, V or activations back to the host.
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
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::storage::{Device, Storage};
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

/// K or V of a dense cache: `[capacity, batch, heads, codes_per_row]` codes in the format's dtype (f32,
/// f16, i8, or u8 holding two int4 codes per byte in the host cache's row encoding) and, for the
/// integer formats, `[capacity, batch, heads, scales_per_row]` f16 scales.
#[derive(Clone)]
struct Buffer {
    codes: Storage,
    scales: Option<Storage>,
}

/// The K and V of a cache on any device, tokens `0..len` written.
///
/// Token-major rather than head-major: appending a chunk of tokens, or moving the cache into a larger
/// buffer, is one contiguous copy (or one quantize-and-append kernel) on the device, and attention
/// still reads a float cache's prefix in place, as a `[batch, heads, len, head_dim]` view whose token
/// stride cuBLAS takes as its leading dimension. A clone shares a GPU buffer until either side writes
/// (the writes make it private first); on the CPU it copies.
#[derive(Clone)]
struct Dense {
    k: Buffer,
    v: Buffer,
    capacity: usize,
    device: Device,
    format: KvFormat,
    /// Rows per token (batch · heads) and values per row.
    rows: usize,
    head_dim: usize,
}

impl std::fmt::Debug for Dense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dense")
            .field("format", &self.format)
            .field("capacity", &self.capacity)
            .field("device", &self.device)
            .finish()
    }
}

/// Scores one pass of [`KvCache::attend`] materialises on a dense cache at most (64 MiB in f32): a long
/// prefill chunk attends in slices of queries so its [queries, len] scores stay bounded.
const SCORES_PER_PASS: usize = 1 << 24;

impl Dense {
    /// Zeroed buffers with room for `tokens` (at least one) tokens of `rows` (batch · heads) rows of
    /// `d` values each.
    fn new(
        rows: usize,
        d: usize,
        format: KvFormat,
        tokens: usize,
        device: Device,
    ) -> Result<Dense> {
        let tokens = tokens.max(1);
        let (per_token, scales_per_token) = (
            rows * format.codes_per_row(d),
            rows * format.scales_per_row(d),
        );
        let dtype = match format {
            KvFormat::F32 => DType::F32,
            KvFormat::F16 => DType::F16,
            KvFormat::Int8 { .. } => DType::I8,
            KvFormat::Int4 { .. } => DType::U8,
        };
        let buffer = || -> Result<Buffer> {
            Ok(Buffer {
                codes: Storage::full(0.0, tokens * per_token, dtype, device)?,
                scales: match format.group() {
                    Some(_) => Some(Storage::full(
                        0.0,
                        tokens * scales_per_token,
                        DType::F16,
                        device,
                    )?),
                    None => None,
                },
            })
        };
        Ok(Dense {
            k: buffer()?,
            v: buffer()?,
            capacity: tokens,
            device,
            format,
            rows,
            head_dim: d,
        })
    }

    /// Moves the first `len` tokens into buffers with room for `tokens`; a no-op when they fit.
    fn grow(&mut self, len: usize, tokens: usize) -> Result<()> {
        if tokens <= self.capacity {
            return Ok(());
        }
        let (rows, d, f) = (self.rows, self.head_dim, self.format);
        let mut bigger = Dense::new(rows, d, f, tokens, self.device)?;
        let codes = Layout::contiguous(len * rows * f.codes_per_row(d));
        let scales = Layout::contiguous(len * rows * f.scales_per_row(d));
        for (new, old) in [(&mut bigger.k, &self.k), (&mut bigger.v, &self.v)] {
            new.codes.write_at(0, &old.codes, &codes)?;
            if let (Some(new), Some(old)) = (&mut new.scales, &old.scales) {
                new.write_at(0, old, &scales)?;
            }
        }
        *self = bigger;
        Ok(())
    }

    /// The first `len` tokens of `buffer` as values `[len, batch, heads, head_dim]`: the buffer itself
    /// for the float formats, a decoded f32 copy for the integer ones.
    fn values(&self, buffer: &Buffer, len: usize) -> Result<Storage> {
        match &buffer.scales {
            None => Ok(buffer.codes.clone()),
            Some(scales) => {
                buffer
                    .codes
                    .kv_dequantize(scales, len * self.rows, self.head_dim, self.format)
            }
        }
    }

    /// The first `len` tokens of `values` ([`Dense::values`]) as a `[batch, heads, len, head_dim]`
    /// view: no copy on a GPU; on the CPU a copy of the buffer, which only the CPU twin pays (the host
    /// cache is the CPU's path).
    fn view(values: &Storage, (b, h, len, d): (usize, usize, usize, usize)) -> Result<Tensor> {
        Tensor::from_parts(values.clone(), Layout::contiguous((len, b, h, d)), None)
            .permute(&[1, 2, 0, 3])
    }
}

/// How a cache stores its tokens.
#[derive(Clone, Debug)]
enum Store {
    /// One stream per (batch, kv head), batch-major, in host memory: every format, read by the CPU
    /// decode kernels of [`crate::cpu::kv_attention`].
    Host { k: Vec<Stream>, v: Vec<Stream> },
    /// Buffers on a device: a decode step (one query token) on a GPU attends with the flash-decoding
    /// kernels, anything else with the engine's tensor ops (cuBLAS and the softmax kernels on a GPU;
    /// the integer formats dequantized first).
    Dense(Dense),
}

/// The K and V cache of one attention layer: `batch` sequences of equal length, `heads` kv heads of
/// `head_dim`, stored as `format`. Grows as tokens are appended (amortised like a `Vec`; reserve up
/// front with [`KvCache::with_capacity`] to never reallocate).
///
/// Two stores: the host cache ([`KvCache::new`], every format, CPU tensors) and the dense cache
/// ([`KvCache::dense`], every format, buffers on the device of the tensors it is given, so that
/// decoding on a GPU never leaves it). [`KvCache::on_device`] picks the one a model on a device
/// decodes with.
/// Both have the same semantics; the dense one also runs on the CPU, where it is the reference the
/// tests check the GPU path's logic against.
#[derive(Clone, Debug)]
pub struct KvCache {
    batch: usize,
    heads: usize,
    head_dim: usize,
    format: KvFormat,
    len: usize,
    store: Store,
}

impl KvCache {
    /// Errors unless every size is positive and an integer format's group divides head_dim.
    fn check(
        op: &'static str,
        batch: usize,
        heads: usize,
        head_dim: usize,
        format: KvFormat,
    ) -> Result<()> {
        if batch == 0 || heads == 0 || head_dim == 0 {
            crate::bail!(
                op,
                "batch, heads and head_dim must be positive, got {batch}, {heads}, {head_dim}"
            );
        }
        if let Some(group) = format.group() {
            if group == 0 || !head_dim.is_multiple_of(group) {
                crate::bail!(
                    op,
                    "{format}: the scale group must divide head_dim {head_dim}"
                );
            }
        }
        Ok(())
    }

    /// An empty host cache. Errors unless every size is positive and an integer format's group
    /// divides head_dim.
    pub fn new(batch: usize, heads: usize, head_dim: usize, format: KvFormat) -> Result<KvCache> {
        KvCache::check("KvCache::new", batch, heads, head_dim, format)?;
        let streams = || (0..batch * heads).map(|_| Stream::new(format)).collect();
        Ok(KvCache {
            batch,
            heads,
            head_dim,
            format,
            len: 0,
            store: Store::Host {
                k: streams(),
                v: streams(),
            },
        })
    }

    /// An empty host cache with room for `tokens` tokens before it reallocates.
    pub fn with_capacity(
        batch: usize,
        heads: usize,
        head_dim: usize,
        format: KvFormat,
        tokens: usize,
    ) -> Result<KvCache> {
        let mut cache = KvCache::new(batch, heads, head_dim, format)?;
        cache.reserve(tokens)?;
        Ok(cache)
    }

    /// An empty dense cache on `device` with room for `tokens` tokens: buffers there, written in
    /// place as tokens arrive and attended with tensor ops, so K, V, the queries and the result all
    /// stay on the device. The integer formats keep codes and f16 scales laid out like the float
    /// buffers (`[capacity, batch, heads, codes or scales per row]`), each row encoded exactly as the
    /// host cache encodes it. A device this build or machine cannot allocate on is an error
    /// ([`Device::check`]). On the CPU this is the twin the tests check the GPU path's logic with;
    /// decoding there uses the host cache ([`KvCache::on_device`]).
    pub fn dense(
        batch: usize,
        heads: usize,
        head_dim: usize,
        format: KvFormat,
        tokens: usize,
        device: Device,
    ) -> Result<KvCache> {
        KvCache::check("KvCache::dense", batch, heads, head_dim, format)?;
        let store = Store::Dense(Dense::new(batch * heads, head_dim, format, tokens, device)?);
        Ok(KvCache {
            batch,
            heads,
            head_dim,
            format,
            len: 0,
            store,
        })
    }

    /// The cache a model whose tensors live on `device` decodes with, room reserved for `tokens`: the
    /// host cache on the CPU (the CPU's fused decode kernels), a dense one on a GPU (see
    /// [`KvCache::dense`]).
    pub fn on_device(
        batch: usize,
        heads: usize,
        head_dim: usize,
        format: KvFormat,
        tokens: usize,
        device: Device,
    ) -> Result<KvCache> {
        match device {
            Device::Cpu => KvCache::with_capacity(batch, heads, head_dim, format, tokens),
            Device::Cuda(_) => KvCache::dense(batch, heads, head_dim, format, tokens, device),
        }
    }

    /// Makes room for at least `additional` more tokens (as `Vec::reserve`). Errors only when a dense
    /// cache's device cannot allocate the larger buffers (the cache is then unchanged).
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let (d, f) = (self.head_dim, self.format);
        match &mut self.store {
            Store::Host { k, v } => {
                for s in k.iter_mut().chain(v) {
                    s.reserve(additional, d, f);
                }
                Ok(())
            }
            Store::Dense(dense) => {
                let need = self.len.saturating_add(additional);
                if need <= dense.capacity {
                    return Ok(());
                }
                dense.grow(self.len, need.max(2 * dense.capacity))
            }
        }
    }

    /// Tokens the cache holds without reallocating.
    pub fn capacity(&self) -> usize {
        let (d, f) = (self.head_dim, self.format);
        match &self.store {
            Store::Host { k, v } => k
                .iter()
                .chain(v)
                .map(|s| s.capacity(d, f))
                .min()
                .unwrap_or(0),
            Store::Dense(dense) => dense.capacity,
        }
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

    /// Where the cached tokens live: the CPU for the host cache, the buffers' device for a dense one.
    pub fn device(&self) -> Device {
        match &self.store {
            Store::Host { .. } => Device::Cpu,
            Store::Dense(dense) => dense.device,
        }
    }

    /// True for a dense cache ([`KvCache::dense`]), false for the host one.
    pub fn is_dense(&self) -> bool {
        matches!(self.store, Store::Dense(_))
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
        // A dense cache's tokens past the length are never read and are overwritten by the next append.
        if let Store::Host { k, v } = &mut self.store {
            for s in k.iter_mut().chain(v) {
                s.truncate(len, d, f);
            }
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
    /// layout), tokens ≥ 1: host tensors for the host cache, tensors on its device for a dense one
    /// (which a failed append leaves unchanged).
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
        match &mut self.store {
            Store::Host { k: ks, v: vs } => {
                let per_stream = want[2] * d;
                let parallel = per_stream * ks.len() >= crate::cpu::PAR_THRESHOLD;
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
                k.with_f32_slice("kv_cache", |x| push(ks, x))?;
                v.with_f32_slice("kv_cache", |x| push(vs, x))?;
            }
            Store::Dense(dense) => {
                for t in [k, v] {
                    if t.device() != dense.device {
                        return Err(Error::DeviceMismatch {
                            op: "KvCache::append",
                            lhs: dense.device.to_string(),
                            rhs: t.device().to_string(),
                        });
                    }
                }
                let need = self.len + want[2];
                if need > dense.capacity {
                    dense.grow(self.len, need.max(2 * dense.capacity))?;
                }
                // Written past the length: if V fails after K is in, the cache still reads as before.
                let at = self.len;
                let per_token = dense.rows * d;
                for (buffer, x) in [(&mut dense.k, k), (&mut dense.v, v)] {
                    match &mut buffer.scales {
                        Some(scales) => buffer.codes.kv_quantize_append(
                            scales,
                            &x.storage(),
                            x.layout(),
                            at,
                            f,
                        )?,
                        None => {
                            let dtype = buffer.codes.dtype();
                            let rows = x.detach().permute(&[2, 0, 1, 3])?.to_dtype(dtype)?;
                            buffer.codes.write_at(
                                at * per_token,
                                &rows.storage(),
                                rows.layout(),
                            )?;
                        }
                    }
                }
            }
        }
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

    /// A private f32 copy of a dense buffer's cached tokens, [batch, heads, len, head_dim].
    fn dense_to_tensor(&self, dense: &Dense, buffer: &Buffer) -> Result<Tensor> {
        let values = dense.values(buffer, self.len)?;
        let view = Dense::view(&values, (self.batch, self.heads, self.len, self.head_dim))?;
        let f = view.to_dtype(DType::F32)?;
        if f.same_storage(&view) {
            f.copy()
        } else {
            Ok(f)
        }
    }

    /// The keys as the kernel sees them, [batch, heads, len, head_dim] f32 on the cache's device
    /// (tests, debugging).
    pub fn dequantize_k(&self) -> Result<Tensor> {
        match &self.store {
            Store::Host { k, .. } => self.streams_to_tensor(k),
            Store::Dense(dense) => self.dense_to_tensor(dense, &dense.k),
        }
    }

    /// The values as the kernel sees them, [batch, heads, len, head_dim] f32 on the cache's device.
    pub fn dequantize_v(&self) -> Result<Tensor> {
        match &self.store {
            Store::Host { v, .. } => self.streams_to_tensor(v),
            Store::Dense(dense) => self.dense_to_tensor(dense, &dense.v),
        }
    }

    /// softmax(q·kᵀ·`scale`)·v over the cache for `q` [batch, q_heads, q_len, head_dim], q_heads a
    /// multiple of the cache's heads (query head h reads kv head h / (q_heads / heads)). With q_len = 1
    /// the query sees every cached token; with q_len > 1 the queries are the last q_len cached tokens
    /// (a prefill chunk appended just before) and query i sees positions 0..=len − q_len + i. Returns
    /// [batch, q_heads, q_len, head_dim] in q's dtype on the cache's device (q must live there),
    /// computed in f32, detached: this is not differentiable.
    pub fn attend(&self, q: &Tensor, scale: f32) -> Result<Tensor> {
        self.attend_with(q, scale, AttendOptions::default())
    }

    /// [`KvCache::attend`] on the kernels and split of `opts` (tests and benchmarks; a dense cache
    /// checks them but runs the flash-decoding kernels or tensor ops, which have no such choices).
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
        let (k, v) = match &self.store {
            Store::Host { k, v } => (k, v),
            Store::Dense(dense) => return self.attend_dense(dense, q, scale),
        };
        let k: Vec<Rows> = k.iter().map(|s| s.rows(self.format)).collect();
        let v: Vec<Rows> = v.iter().map(|s| s.rows(self.format)).collect();
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

    /// [`KvCache::attend`] on a dense cache (shapes checked by the caller), in f32 tensor ops on its
    /// device: the kv heads' queries side by side as one [batch, heads, group · q_len, head_dim]
    /// operand (no expanded copy of K or V), scores against the cached prefix read in place, a
    /// (causal) softmax, the product with V.
    ///
    /// One query token per head on a CUDA device goes to the flash-decoding kernels (`attend_flash`),
    /// which read the codes in place. Otherwise an integer cache is first dequantized whole into f32 K
    /// and V: correct (the values are exactly those the host cache's kernels decode) but it
    /// materialises 2 · len · batch · heads · head_dim floats per call and reads them again.
    fn attend_dense(&self, dense: &Dense, q: &Tensor, scale: f32) -> Result<Tensor> {
        let (b, h, d, len) = (self.batch, self.heads, self.head_dim, self.len);
        let (q_heads, q_len) = (q.dims()[1], q.dims()[2]);
        if q.device() != dense.device {
            return Err(Error::DeviceMismatch {
                op: "KvCache::attend",
                lhs: dense.device.to_string(),
                rhs: q.device().to_string(),
            });
        }
        #[cfg(feature = "cuda")]
        if q_len == 1 {
            if let Some(out) = self.attend_flash(dense, q, scale)? {
                return Ok(out);
            }
        }
        let group = q_heads / h;
        let kv = |buffer: &Buffer| {
            Dense::view(&dense.values(buffer, len)?, (b, h, len, d))?.to_dtype(DType::F32)
        };
        let (k, v) = (kv(&dense.k)?, kv(&dense.v)?);
        let q32 = q.detach().to_dtype(DType::F32)?.mul_scalar(scale)?;
        // Query i of the chunk of c starting at i0 sees keys 0..=len − q_len + i0 + i: the chunk needs
        // the first `keys` of them, its queries being their last c positions (causal_softmax's rule).
        let rows = (SCORES_PER_PASS / (b * q_heads * len)).clamp(1, q_len);
        let mut outs = Vec::with_capacity(q_len.div_ceil(rows));
        for i0 in (0..q_len).step_by(rows) {
            let c = rows.min(q_len - i0);
            let keys = len - q_len + i0 + c;
            let (kc, vc) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?);
            let scores = q32
                .narrow(2, i0, c)?
                .reshape((b, h, group * c, d))?
                .matmul(&kc.t()?)?;
            let probs = if c == 1 {
                scores.softmax(-1)?
            } else {
                scores
                    .reshape((b * h * group, c, keys))?
                    .causal_softmax()?
                    .reshape((b, h, group * c, keys))?
            };
            outs.push(probs.matmul(&vc)?.reshape((b, q_heads, c, d))?);
        }
        let out = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 2)?
        };
        out.to_dtype(q.dtype())
    }

    /// One query token per head over a dense cache on a CUDA device (shapes and devices checked by
    /// the caller): the flash-decoding kernels of [`crate::cuda::kvattn`], which read the codes in
    /// place. `None` for a CPU cache or a head_dim past the kernels' limit, which take the tensor ops.
    #[cfg(feature = "cuda")]
    fn attend_flash(&self, dense: &Dense, q: &Tensor, scale: f32) -> Result<Option<Tensor>> {
        use crate::cuda::kvattn::{self, KvBuffer, KvShape};
        if self.head_dim > kvattn::MAX_HEAD_DIM {
            return Ok(None);
        }
        let q = q.detach();
        let qs = q.storage();
        let cuda = |s: &Storage| match s {
            Storage::Cuda(s) => Some(s.clone()),
            Storage::Cpu(_) => None,
        };
        let (Some(qc), Some(kc), Some(vc)) =
            (cuda(&qs), cuda(&dense.k.codes), cuda(&dense.v.codes))
        else {
            return Ok(None);
        };
        let (ks, vs) = (
            dense.k.scales.as_ref().and_then(cuda),
            dense.v.scales.as_ref().and_then(cuda),
        );
        let out = kvattn::attend(
            &qc,
            q.layout(),
            KvBuffer {
                codes: &kc,
                scales: ks.as_ref(),
            },
            KvBuffer {
                codes: &vc,
                scales: vs.as_ref(),
            },
            KvShape {
                batch: self.batch,
                heads: self.heads,
                head_dim: self.head_dim,
                len: self.len,
            },
            self.format,
            scale,
        )?;
        let shape = Layout::contiguous((self.batch, q.dims()[1], 1, self.head_dim));
        Ok(Some(Tensor::from_parts(Storage::Cuda(out), shape, None)))
    }
}
