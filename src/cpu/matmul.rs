//! Single-precision matrix multiplication (SGEMM) for the CPU backend.
//!
//! Large products use the GotoBLAS/BLIS blocking scheme: B is packed into
//! `KC x NC` blocks laid out as `NR`-wide column panels, A into `MC x KC`
//! blocks of `MR`-tall row panels, and a register-tiled micro-kernel computes
//! one `MR x NR` tile of C per call while streaming both panels with unit
//! stride. Packing makes every operand layout (row-major, transposed or
//! arbitrarily strided) look the same to the micro-kernel and keeps the working
//! set of the innermost loops in L1/L2. The micro-kernel family (AVX-512,
//! AVX2+FMA or portable) is chosen at run time.
//!
//! Products too thin to fill a register tile (a single row or column, or a few
//! rows against a cache-sized B) run a direct, unpacked loop nest instead.
//! Below that, packing pays off even for tiny products: the packed path beat
//! every direct loop nest tried, down to 12 x 12 x 12.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;
use std::thread::LocalKey;

use rayon::prelude::*;

/// Which micro-kernel family to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit vectors (requires AVX-512F, AVX2 and FMA).
    Avx512,
    /// 256-bit vectors with fused multiply-add (requires AVX2 and FMA).
    Avx2Fma,
    /// Plain Rust, left to the compiler's auto-vectoriser; runs anywhere.
    Portable,
}

impl Isa {
    /// The best ISA this CPU supports (detected once, cached).
    pub fn best() -> Isa {
        Isa::detected()[0]
    }

    /// Every ISA this CPU can run, best first (tests iterate over these).
    pub fn available() -> Vec<Isa> {
        Isa::detected().to_vec()
    }

    /// The CPU-feature probe behind `best` and `available`, run once.
    fn detected() -> &'static [Isa] {
        static DETECTED: OnceLock<Vec<Isa>> = OnceLock::new();
        DETECTED.get_or_init(|| {
            let mut isas = Vec::with_capacity(3);
            #[cfg(target_arch = "x86_64")]
            {
                let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
                if avx2_fma && is_x86_feature_detected!("avx512f") {
                    isas.push(Isa::Avx512);
                }
                if avx2_fma {
                    isas.push(Isa::Avx2Fma);
                }
            }
            isas.push(Isa::Portable);
            isas
        })
    }
}

/// A strided read-only matrix view: element (i, j) is data[i * rs + j * cs]. Transposes are expressed by swapping strides.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// The transposed view (no data movement).
    fn t(self) -> MatRef<'a> {
        MatRef {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The view whose element (0, 0) is `data[offset]`, strides unchanged.
    fn offset(self, offset: usize) -> MatRef<'a> {
        MatRef {
            data: &self.data[offset..],
            ..self
        }
    }

    /// Number of floats that a `rows x cols` matrix with these strides spans,
    /// or `None` if that overflows `usize`.
    fn span(&self, rows: usize, cols: usize) -> Option<usize> {
        if rows == 0 || cols == 0 {
            return Some(0);
        }
        (rows - 1)
            .checked_mul(self.rs)?
            .checked_add((cols - 1).checked_mul(self.cs)?)?
            .checked_add(1)
    }

    /// Debug-asserts that `data` holds every element of a `rows x cols`
    /// matrix. Callers guarantee it; release builds rely on the bounds checks
    /// of the packing and direct loops, the only code that reads operands.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        let span = self.span(rows, cols);
        debug_assert!(
            span.is_some_and(|s| s <= self.data.len()),
            "sgemm: {what} ({rows}x{cols}, strides {}/{}) needs {span:?} floats, slice has {}",
            self.rs,
            self.cs,
            self.data.len()
        );
    }
}

/// C[m x n] (row-major, contiguous, row stride n) = A[m x k] * B[k x n]  (+ C if `accumulate`), using Isa::best().
///
/// # Panics
/// If `c` is shorter than `m * n`. Operand slices too short for the shape and
/// strides are a caller bug: debug builds assert on them, release builds
/// panic on the first out-of-range read.
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    sgemm_with_isa(Isa::best(), m, n, k, a, b, c, accumulate);
}

/// Same as [`sgemm`] with an explicit micro-kernel family (for tests and benchmarks).
///
/// # Panics
/// If this CPU cannot run `isa` (it is not in [`Isa::available`]), and as
/// [`sgemm`] for short slices.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with_isa(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(
        Isa::detected().contains(&isa),
        "sgemm: this CPU cannot run the {isa:?} kernels"
    );
    let product = Product {
        m,
        n,
        k,
        a,
        b,
        accumulate,
    };
    product.check(1, 0, 0, c);
    product.run(isa, true, &mut c[..m * n]);
}

/// Batched: for each b in 0..batch, C_b = A_b * B_b where A_b starts at a_batch_stride*b in a.data (same for B, and C_b at b*m*n in c).
/// Parallelises across the batch when the matrices are small, inside the GEMM when they are large.
///
/// # Panics
/// If `c` is shorter than `batch * m * n`, and as [`sgemm`] for operand slices
/// too short for the shapes, strides and batch strides.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_batched(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    a_batch_stride: usize,
    b: MatRef,
    b_batch_stride: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    let isa = Isa::best();
    let product = Product {
        m,
        n,
        k,
        a,
        b,
        accumulate,
    };
    product.check(batch, a_batch_stride, b_batch_stride, c);
    let size = m * n;
    if batch == 0 || size == 0 {
        return;
    }
    let item = |i: usize| {
        if k == 0 {
            // A and B are empty and their batch strides may point anywhere.
            product
        } else {
            Product {
                a: a.offset(i * a_batch_stride),
                b: b.offset(i * b_batch_stride),
                ..product
            }
        }
    };
    let c = &mut c[..batch * size];
    if batch > 1 && product.work() < BATCH_PARALLEL_WORK {
        c.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| item(i).run(isa, false, c));
    } else {
        for (i, c) in c.chunks_mut(size).enumerate() {
            item(i).run(isa, true, c);
        }
    }
}

/// Products with at most this many rows skip packing when B is small
/// (`DIRECT_MAX_B`): streaming each row of A over a cached B beats padding
/// them to a 14- or 6-row register tile. With more rows, even tiny products
/// (measured down to 12 x 12 x 12) run faster packed.
const DIRECT_MAX_ROWS: usize = 4;
/// Floats of B (1 MiB) up to which the direct path's re-reading of B for
/// every row of A stays in cache.
const DIRECT_MAX_B: usize = 1 << 18;
/// Multiply-adds per product below which a packed GEMM stays on one thread:
/// under this, a rayon fork/join costs a noticeable share of the run time.
const PACKED_PARALLEL_WORK: usize = 1 << 19;
/// Multiply-adds per single-row product below which it stays on one thread.
const DIRECT_PARALLEL_WORK: usize = 1 << 18;
/// Multiply-adds per batch item below which `sgemm_batched` spreads whole
/// items over threads instead of parallelising inside each one.
const BATCH_PARALLEL_WORK: usize = 1 << 24;

/// One product `C (+)= A * B`, C being `m x n` row-major; the output slice is
/// passed separately so that this stays `Copy`.
#[derive(Clone, Copy)]
struct Product<'a> {
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'a>,
    b: MatRef<'a>,
    accumulate: bool,
}

impl Product<'_> {
    /// Multiply-adds, saturating (only compared against thresholds).
    fn work(&self) -> usize {
        self.m.saturating_mul(self.n).saturating_mul(self.k)
    }

    /// Panics unless C of all `batch` items fits in `c` (which is then
    /// written through raw pointers); debug-asserts the same of the operands.
    fn check(&self, batch: usize, a_batch_stride: usize, b_batch_stride: usize, c: &[f32]) {
        let (m, n, k) = (self.m, self.n, self.k);
        let c_len = batch.checked_mul(m).and_then(|x| x.checked_mul(n));
        assert!(
            c_len.is_some_and(|l| l <= c.len()),
            "sgemm: C ({batch} x {m}x{n}) does not fit in a slice of {}",
            c.len()
        );
        if !cfg!(debug_assertions) || batch == 0 || m == 0 || n == 0 || k == 0 {
            return;
        }
        let last = batch - 1;
        for (view, rows, cols, stride, what) in [
            (self.a, m, k, a_batch_stride, "A"),
            (self.b, k, n, b_batch_stride, "B"),
        ] {
            let start = last.checked_mul(stride);
            debug_assert!(
                start.is_some_and(|s| s <= view.data.len()),
                "sgemm: batch stride of {what} overruns its slice"
            );
            view.offset(last * stride).check(rows, cols, what);
        }
    }

    /// Computes the product into `c` (exactly `m * n` floats) with operands
    /// already checked by `check`.
    fn run(self, isa: Isa, parallel: bool, c: &mut [f32]) {
        debug_assert_eq!(c.len(), self.m * self.n);
        if c.is_empty() {
            return;
        }
        if self.k == 0 {
            if !self.accumulate {
                c.fill(0.0);
            }
            return;
        }
        let work = self.work();
        let few_rows = self.m <= DIRECT_MAX_ROWS && self.k.saturating_mul(self.n) <= DIRECT_MAX_B;
        if self.m == 1 || self.n == 1 || few_rows {
            self.direct(isa, parallel && work >= DIRECT_PARALLEL_WORK, c);
        } else {
            self.packed(isa, parallel && work >= PACKED_PARALLEL_WORK, c);
        }
    }

    /// The unpacked path, for single-row or single-column products
    /// (matrix-vector), which read each operand element once anyway and
    /// would waste most of a register tile, and for products with a few rows
    /// and a cache-sized B.
    fn direct(self, isa: Isa, parallel: bool, c: &mut [f32]) {
        // A single column of C is contiguous, so it is also a single row of
        // C^T = B^T A^T; the row case below then covers both.
        let product = if self.n == 1 && self.m > 1 {
            Product {
                m: 1,
                n: self.m,
                a: self.b.t(),
                b: self.a.t(),
                ..self
            }
        } else {
            self
        };
        if parallel && product.m == 1 {
            let chunk = product
                .n
                .div_ceil(rayon::current_num_threads())
                .next_multiple_of(64);
            c.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| {
                let columns = Product {
                    n: c.len(),
                    b: product.b.offset(i * chunk * product.b.cs),
                    ..product
                };
                columns.direct_serial(isa, c);
            });
        } else {
            product.direct_serial(isa, c);
        }
    }

    fn direct_serial(self, isa: Isa, c: &mut [f32]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is `Isa::best()` or passed the availability
            // assertion of `sgemm_with_isa`, and both of these ISAs are only
            // detected on CPUs with AVX2 and FMA. (The direct loops are
            // memory-bound enough that AVX2 code serves AVX-512 CPUs too.)
            Isa::Avx512 | Isa::Avx2Fma => unsafe { x86::direct_avx2(self, c) },
            _ => direct_body(self, c),
        }
    }

    fn packed(self, isa: Isa, parallel: bool, c: &mut [f32]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                self.packed_with::<x86::Avx512, { x86::AVX512_MR }, { x86::AVX512_NR }>(parallel, c)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                self.packed_with::<x86::Avx2, { x86::AVX2_MR }, { x86::AVX2_NR }>(parallel, c)
            }
            _ => self.packed_with::<Portable, PORTABLE_MR, PORTABLE_NR>(parallel, c),
        }
    }
}

/// The loop nests of the direct path, picked by which operand strides are
/// unit so that the innermost loop is contiguous and vectorisable. Inlined
/// into each ISA's `#[target_feature]` wrapper so it is compiled for it.
#[inline(always)]
fn direct_body(product: Product, c: &mut [f32]) {
    let Product {
        m,
        n,
        k,
        a,
        b,
        accumulate,
    } = product;
    debug_assert_eq!(c.len(), m * n);
    if !accumulate {
        c.fill(0.0);
    }
    if a.cs == 1 && b.rs == 1 {
        // Rows of A and columns of B are contiguous: dot products.
        for (i, c_row) in c.chunks_exact_mut(n).enumerate() {
            let a_row = &a.data[i * a.rs..][..k];
            for (j, cij) in c_row.iter_mut().enumerate() {
                *cij += dot(a_row, &b.data[j * b.cs..][..k]);
            }
        }
    } else if b.cs == 1 {
        // Rows of B are contiguous: C[i, :] += A[i, p] * B[p, :], a strip of
        // columns at a time so that its partial sums stay in registers across
        // the whole depth: wide strips first (several independent vectors
        // hide the add latency), then narrow ones, then single columns.
        for (i, c_row) in c.chunks_exact_mut(n).enumerate() {
            let a_row = MatRef {
                data: &a.data[i * a.rs..],
                rs: 0,
                cs: a.cs,
            };
            let rest = axpy_strips::<32>(k, a_row, b, c_row, 0);
            let rest = axpy_strips::<8>(k, a_row, b, rest, n - rest.len());
            axpy_strips::<1>(k, a_row, b, rest, n - rest.len());
        }
    } else {
        for (i, c_row) in c.chunks_exact_mut(n).enumerate() {
            for (j, cij) in c_row.iter_mut().enumerate() {
                let mut sum = 0.0;
                for p in 0..k {
                    sum += a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
                *cij += sum;
            }
        }
    }
}

/// Adds `a_row * B[:, j0..]` to `c` (the same columns of one row of C) in
/// strips of `W` columns, with B rows contiguous; returns the columns left
/// over (fewer than `W`).
#[inline(always)]
fn axpy_strips<'c, const W: usize>(
    k: usize,
    a_row: MatRef,
    b: MatRef,
    c: &'c mut [f32],
    j0: usize,
) -> &'c mut [f32] {
    let mut strips = c.chunks_exact_mut(W);
    for (s, c_strip) in strips.by_ref().enumerate() {
        let mut acc = [0.0f32; W];
        for p in 0..k {
            let ap = a_row.data[p * a_row.cs];
            let b_strip = &b.data[p * b.rs + j0 + s * W..][..W];
            for (x, &bpj) in acc.iter_mut().zip(b_strip) {
                *x += ap * bpj;
            }
        }
        for (cij, x) in c_strip.iter_mut().zip(acc) {
            *cij += x;
        }
    }
    strips.into_remainder()
}

/// Dot product with independent lane accumulators, which the compiler turns
/// into vector code (a single running sum would be a serial dependency chain).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let xs = x.chunks_exact(LANES);
    let ys = y.chunks_exact(LANES);
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (xc, yc) in xs.zip(ys) {
        for ((s, &p), &q) in acc.iter_mut().zip(xc).zip(yc) {
            *s += p * q;
        }
    }
    acc.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------
// Packed path.

/// A register-tiled micro-kernel computing an `MR x NR` tile of C, with the
/// cache blocking tuned for it.
trait Kernel<const MR: usize, const NR: usize> {
    /// Depth of a packed block. An `NR`-wide panel of B (`KC * NR` floats)
    /// is reused for every row panel of A, so it should stay in L1.
    const KC: usize;
    /// Target height of a packed A block (`MC * KC` floats), reused for every
    /// column panel of B, so it should stay in L2. A multiple of `MR`.
    const MC: usize;
    /// Width of a packed B block, shared by all threads. A multiple of `NR`.
    const NC: usize;

    /// `C[..mr, ..nr] (+)= A_panel * B_panel`: `a` holds `kc` groups of `MR`
    /// floats (one per depth step), `b` holds `kc` groups of `NR`. C is read
    /// first only if `load_c`.
    ///
    /// # Safety
    /// - the CPU supports the kernel's target features;
    /// - `a.len() >= kc * MR` and `b.len() >= kc * NR` (the kernels read
    ///   them unchecked);
    /// - `mr <= MR`, `nr <= NR`, and `c` is valid for reads and writes of
    ///   `mr` rows of `nr` floats at row stride `ldc`, which no other thread
    ///   accesses during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
    );
}

/// A raw pointer to C shared between the tasks of one product.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);

// SAFETY: tasks use the pointer only for the disjoint tiles of C assigned to
// them (see `Product::packed_with`), and the slice it comes from outlives the parallel loop.
unsafe impl Send for SyncPtr {}
// SAFETY: as for `Send`; the pointer itself is never mutated.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// A method (rather than `.0`) so closures capture the `Sync` wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Packed A blocks, one buffer per thread, reused across calls.
    static PACK_A: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Packed B blocks of the products started on this thread.
    static PACK_B: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer `key`, taking it out of the cell for the
/// duration: a rayon worker that blocks inside `f` may run another product on
/// the same thread, which then simply finds (and later returns) an empty buffer.
fn with_buffer<R>(key: &'static LocalKey<Cell<Vec<f32>>>, f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    let mut buf = key.take();
    let result = f(&mut buf);
    key.set(buf);
    result
}

/// `len` floats of `buf` starting on a 64-byte boundary, so that packed
/// panels line up with cache lines and vector loads never split one.
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    const SLACK: usize = 64 / std::mem::size_of::<f32>();
    if buf.len() < len + SLACK {
        buf.resize(len + SLACK, 0.0);
    }
    let offset = buf.as_ptr().align_offset(64).min(SLACK);
    &mut buf[offset..offset + len]
}

impl Product<'_> {
    /// The blocked GEMM. Loop order, outer to inner: column blocks of width
    /// NC; depth blocks of KC, whose B block is packed once and shared by all
    /// threads; tasks over row blocks of about MC rows (each packs its own A
    /// block) and, when there are too few rows to occupy every thread, over
    /// column ranges too; then NR-wide B panels and MR-tall A panels, one
    /// micro-kernel call per pair.
    fn packed_with<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(
        self,
        parallel: bool,
        c: &mut [f32],
    ) {
        let Product { m, n, k, b, .. } = self;
        debug_assert!(c.len() >= m * n && k > 0);
        let threads = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        // About MC rows per block, rounded to whole MR panels, and (when
        // parallel) a multiple of the thread count so that every thread gets
        // an equal share of the rows.
        let m_panels = m.div_ceil(MR);
        let m_blocks = m.div_ceil(K::MC).next_multiple_of(threads).min(m_panels);
        let c = SyncPtr(c.as_mut_ptr());

        with_buffer(&PACK_B, |b_buf| {
            for jc in (0..n).step_by(K::NC) {
                let nc = K::NC.min(n - jc);
                let n_panels = nc.div_ceil(NR);
                let n_splits = threads.div_ceil(m_blocks).min(n_panels);
                for pc in (0..k).step_by(K::KC) {
                    let kc = K::KC.min(k - pc);
                    let b_pack = aligned(b_buf, n_panels * NR * kc);
                    let pack = |(q, panel): (usize, &mut [f32])| {
                        pack_b::<NR>(b, pc, kc, jc + q * NR, (nc - q * NR).min(NR), panel);
                    };
                    if threads > 1 {
                        b_pack.par_chunks_mut(NR * kc).enumerate().for_each(pack);
                    } else {
                        b_pack.chunks_mut(NR * kc).enumerate().for_each(pack);
                    }
                    let block = Block {
                        pc,
                        kc,
                        jc,
                        nc,
                        b_pack,
                    };
                    let task = |t: usize| {
                        let (mb, ns) = (t / n_splits, t % n_splits);
                        let rows = split(m_panels, m_blocks, mb);
                        let panels = split(n_panels, n_splits, ns);
                        self.block_task::<K, MR, NR>(&block, rows, panels, c);
                    };
                    let tasks = m_blocks * n_splits;
                    if threads > 1 {
                        (0..tasks).into_par_iter().for_each(task);
                    } else {
                        (0..tasks).for_each(task);
                    }
                }
            }
        });
    }

    /// One task of `packed_with`: packs A panels `row_panels` for the depth
    /// block and multiplies them by B panels `col_panels` of it, into C.
    fn block_task<K: Kernel<MR, NR>, const MR: usize, const NR: usize>(
        self,
        block: &Block,
        row_panels: Range<usize>,
        col_panels: Range<usize>,
        c: SyncPtr,
    ) {
        let Block {
            pc,
            kc,
            jc,
            nc,
            b_pack,
        } = *block;
        let (m, n) = (self.m, self.n);
        let i0 = row_panels.start * MR;
        let i1 = (row_panels.end * MR).min(m);
        // The first depth block writes C (or adds to it when accumulating);
        // later ones add their partial products.
        let load_c = self.accumulate || pc > 0;
        with_buffer(&PACK_A, |a_buf| {
            let a_pack = aligned(a_buf, row_panels.len() * MR * kc);
            for (r, panel) in a_pack.chunks_mut(MR * kc).enumerate() {
                let i = i0 + r * MR;
                pack_a::<MR>(self.a, i, (i1 - i).min(MR), pc, kc, panel);
            }
            for q in col_panels {
                let b_panel = &b_pack[q * NR * kc..][..NR * kc];
                let j = jc + q * NR;
                let nr = (jc + nc - j).min(NR);
                for (r, a_panel) in a_pack.chunks(MR * kc).enumerate() {
                    let i = i0 + r * MR;
                    let mr = (i1 - i).min(MR);
                    // SAFETY: `Product::packed` instantiates the kernels of
                    // `isa`, which is `Isa::best()` or passed the availability
                    // assertion of `sgemm_with_isa`; the panels hold
                    // exactly `kc * MR` and `kc * NR` floats; the tile (rows
                    // i..i + mr, columns j..j + nr) lies inside C, which has
                    // `m * n` floats, and inside this task's rows and
                    // columns, which no other task touches.
                    unsafe {
                        K::tile(
                            kc,
                            a_panel,
                            b_panel,
                            c.get().add(i * n + j),
                            n,
                            mr,
                            nr,
                            load_c,
                        );
                    }
                }
            }
        });
    }
}

/// The packed B block of one depth step of `Product::packed_with`: depth
/// `pc..pc + kc`, columns `jc..jc + nc`.
struct Block<'a> {
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    b_pack: &'a [f32],
}

/// The `i`-th of `parts` contiguous, near-equal runs of `0..panels`.
fn split(panels: usize, parts: usize, i: usize) -> Range<usize> {
    panels * i / parts..panels * (i + 1) / parts
}

/// Packs rows `i0..i0 + rows` (`rows <= MR`), depth `p0..p0 + kc` of A into
/// one panel: `kc` groups of `MR` floats, rows past `rows` zero-filled.
fn pack_a<const MR: usize>(
    a: MatRef,
    i0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    panel: &mut [f32],
) {
    let panel = &mut panel[..MR * kc];
    if a.rs == 1 {
        for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
            let src = &a.data[i0 + (p0 + p) * a.cs..];
            if rows == MR {
                dst.copy_from_slice(&src[..MR]);
            } else {
                dst[..rows].copy_from_slice(&src[..rows]);
                dst[rows..].fill(0.0);
            }
        }
    } else if a.cs == 1 && rows == MR {
        let src: [&[f32]; MR] = std::array::from_fn(|r| &a.data[(i0 + r) * a.rs + p0..][..kc]);
        for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
            for (d, row) in dst.iter_mut().zip(&src) {
                *d = row[p];
            }
        }
    } else if a.cs == 1 {
        for r in 0..rows {
            let src = &a.data[(i0 + r) * a.rs + p0..][..kc];
            for (dst, &v) in panel.chunks_exact_mut(MR).zip(src) {
                dst[r] = v;
            }
        }
        if rows < MR {
            for dst in panel.chunks_exact_mut(MR) {
                dst[rows..].fill(0.0);
            }
        }
    } else {
        for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
            for (r, d) in dst.iter_mut().enumerate() {
                *d = if r < rows {
                    a.data[(i0 + r) * a.rs + (p0 + p) * a.cs]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Packs columns `j0..j0 + cols` (`cols <= NR`), depth `p0..p0 + kc` of B
/// into one panel: `kc` groups of `NR` floats, columns past `cols` zero-filled.
fn pack_b<const NR: usize>(
    b: MatRef,
    p0: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    panel: &mut [f32],
) {
    let panel = &mut panel[..NR * kc];
    if b.cs == 1 {
        for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
            let src = &b.data[(p0 + p) * b.rs + j0..];
            if cols == NR {
                dst.copy_from_slice(&src[..NR]);
            } else {
                dst[..cols].copy_from_slice(&src[..cols]);
                dst[cols..].fill(0.0);
            }
        }
    } else if b.rs == 1 {
        for j in 0..cols {
            let src = &b.data[(j0 + j) * b.cs + p0..][..kc];
            for (dst, &v) in panel.chunks_exact_mut(NR).zip(src) {
                dst[j] = v;
            }
        }
        if cols < NR {
            for dst in panel.chunks_exact_mut(NR) {
                dst[cols..].fill(0.0);
            }
        }
    } else {
        for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = if j < cols {
                    b.data[(p0 + p) * b.rs + (j0 + j) * b.cs]
                } else {
                    0.0
                };
            }
        }
    }
}

const PORTABLE_MR: usize = 4;
const PORTABLE_NR: usize = 8;

/// Scalar micro-kernel; the fixed-size inner loops let the compiler keep the
/// tile in vector registers of whatever the target baseline offers.
struct Portable;

impl Kernel<PORTABLE_MR, PORTABLE_NR> for Portable {
    const KC: usize = 256;
    const MC: usize = 64;
    const NC: usize = 2048;

    unsafe fn tile(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
    ) {
        let mut acc = [[0.0f32; PORTABLE_NR]; PORTABLE_MR];
        let a_steps = a[..kc * PORTABLE_MR].chunks_exact(PORTABLE_MR);
        let b_steps = b[..kc * PORTABLE_NR].chunks_exact(PORTABLE_NR);
        for (a_step, b_step) in a_steps.zip(b_steps) {
            for (acc_row, &ai) in acc.iter_mut().zip(a_step) {
                for (s, &bj) in acc_row.iter_mut().zip(b_step) {
                    *s += ai * bj;
                }
            }
        }
        for (i, acc_row) in acc.iter().enumerate().take(mr) {
            // SAFETY: the caller guarantees `c` is valid for `mr` rows of `nr`
            // floats at stride `ldc`, unaliased during the call.
            let c_row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), nr) };
            for (cij, &s) in c_row.iter_mut().zip(acc_row) {
                *cij = if load_c { *cij + s } else { s };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{direct_body, Kernel, Product};
    use std::arch::x86_64::*;

    pub(super) const AVX512_MR: usize = 14;
    pub(super) const AVX512_NR: usize = 32;
    pub(super) const AVX2_MR: usize = 6;
    pub(super) const AVX2_NR: usize = 16;

    /// How many depth steps ahead the micro-kernels prefetch the A and B
    /// panels. With KC at 384-512 the panels live in L2, not L1; the hardware
    /// prefetchers alone left the kernels about 5% slower.
    const PREFETCH_A_STEPS: usize = 16;
    const PREFETCH_B_STEPS: usize = 8;

    /// 14 x 32 tile: 28 zmm accumulators, 2 for the B row and one for a
    /// broadcast of A fill the 32 registers, giving 28 FMAs per 2 vector
    /// loads and 14 broadcasts, well within two load ports.
    pub(super) struct Avx512;

    impl Kernel<AVX512_MR, AVX512_NR> for Avx512 {
        // Measured on a Xeon with 48 KiB L1 and 2 MiB L2 per core: a deep KC
        // halves the passes that load and store C compared with 256, which
        // outweighs the B panel (KC * 32 * 4 = 64 KiB) no longer fitting L1;
        // the A panel (28 KiB) does, and prefetching hides the L2 latency.
        const KC: usize = 512;
        // An 84 x 512 A block is 168 KiB, well inside a 1-2 MiB L2 next to
        // the B panel, and gives enough blocks for load balancing.
        const MC: usize = 84;
        // The shared B block (KC * NC * 4 = 8 MiB) is read from L3 one
        // panel at a time; a wide NC means fewer passes over A.
        const NC: usize = 4096;

        unsafe fn tile(
            kc: usize,
            a: &[f32],
            b: &[f32],
            c: *mut f32,
            ldc: usize,
            mr: usize,
            nr: usize,
            load_c: bool,
        ) {
            // SAFETY: same contract as this function.
            unsafe { avx512_tile::<AVX512_MR, 2>(kc, a, b, c, ldc, mr, nr, load_c) }
        }
    }

    /// 6 x 16 tile: 12 ymm accumulators, 2 for the B row and one for a
    /// broadcast of A, of the 16 registers.
    pub(super) struct Avx2;

    impl Kernel<AVX2_MR, AVX2_NR> for Avx2 {
        // The B panel (KC * 16 * 4 = 24 KiB) fits a 32 KiB L1, and the A
        // block (72 x 384: 108 KiB) a 256 KiB L2.
        const KC: usize = 384;
        const MC: usize = 72;
        const NC: usize = 4096;

        unsafe fn tile(
            kc: usize,
            a: &[f32],
            b: &[f32],
            c: *mut f32,
            ldc: usize,
            mr: usize,
            nr: usize,
            load_c: bool,
        ) {
            // SAFETY: same contract as this function.
            unsafe { avx2_tile::<AVX2_MR, 2>(kc, a, b, c, ldc, mr, nr, load_c) }
        }
    }

    /// `MR x (16 * NV)` AVX-512 micro-kernel; the contract is `Kernel::tile`'s
    /// with `NR = 16 * NV`. All loops have constant trip counts and are fully
    /// unrolled, so the accumulator array lives in registers.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512_tile<const MR: usize, const NV: usize>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
    ) {
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NV * 16);
        debug_assert!(mr <= MR && nr <= NV * 16);
        // Start fetching the C tile now so that the loads after the depth
        // loop hit cache. Prefetches are hints that never fault, hence the
        // wrapping address arithmetic (rows past `mr` may lie outside C).
        if load_c {
            for i in 0..MR {
                let row = c.wrapping_add(i * ldc);
                _mm_prefetch::<_MM_HINT_T0>(row.cast());
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16 * NV - 1).cast());
            }
        }
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        for _ in 0..kc {
            // One prefetch per 64-byte line of a B step (a vector), one per
            // A step (56 bytes for MR = 14).
            for v in 0..NV {
                let ahead = PREFETCH_B_STEPS * 16 * NV + 16 * v;
                _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(ahead).cast());
            }
            _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(PREFETCH_A_STEPS * MR).cast());
            // SAFETY: step `s` reads `a[s * MR..(s + 1) * MR]` and
            // `b[s * 16 * NV..(s + 1) * 16 * NV]`, in bounds for s < kc by
            // the caller's length guarantee.
            unsafe {
                let mut bv = [_mm512_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(bp.add(16 * v));
                }
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*ap.add(i));
                    for (s, x) in acc_row.iter_mut().zip(&bv) {
                        *s = _mm512_fmadd_ps(ai, *x, *s);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(16 * NV);
            }
        }
        if mr == MR && nr == 16 * NV {
            for (i, acc_row) in acc.iter().enumerate() {
                for (v, &s) in acc_row.iter().enumerate() {
                    // SAFETY: row i < mr, columns 16v..16v+16 <= nr: inside
                    // the tile the caller guarantees valid and unaliased.
                    unsafe {
                        let p = c.add(i * ldc + 16 * v);
                        let r = if load_c {
                            _mm512_add_ps(s, _mm512_loadu_ps(p))
                        } else {
                            s
                        };
                        _mm512_storeu_ps(p, r);
                    }
                }
            }
        } else {
            for (i, acc_row) in acc.iter().enumerate().take(mr) {
                for (v, &s) in acc_row.iter().enumerate() {
                    let cols = nr.saturating_sub(16 * v).min(16);
                    let mask = ((1u32 << cols) - 1) as __mmask16;
                    // SAFETY: the mask enables only columns below nr in row
                    // i < mr, all inside the caller's tile; masked-off lanes
                    // are neither read nor written (and cannot fault).
                    unsafe {
                        let p = c.add(i * ldc + 16 * v);
                        let r = if load_c {
                            _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, p))
                        } else {
                            s
                        };
                        _mm512_mask_storeu_ps(p, mask, r);
                    }
                }
            }
        }
    }

    /// `MR x (8 * NV)` AVX2+FMA micro-kernel; see `avx512_tile`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2_tile<const MR: usize, const NV: usize>(
        kc: usize,
        a: &[f32],
        b: &[f32],
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
    ) {
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NV * 8);
        debug_assert!(mr <= MR && nr <= NV * 8);
        // See `avx512_tile` for the prefetches.
        if load_c {
            for i in 0..MR {
                let row = c.wrapping_add(i * ldc);
                _mm_prefetch::<_MM_HINT_T0>(row.cast());
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(8 * NV - 1).cast());
            }
        }
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        for _ in 0..kc {
            // A B step of 16 floats is one line, an A step (6 floats) less.
            _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(PREFETCH_B_STEPS * 8 * NV).cast());
            _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(PREFETCH_A_STEPS * MR).cast());
            // SAFETY: step `s` reads `a[s * MR..(s + 1) * MR]` and
            // `b[s * 8 * NV..(s + 1) * 8 * NV]`, in bounds for s < kc by the
            // caller's length guarantee.
            unsafe {
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(bp.add(8 * v));
                }
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*ap.add(i));
                    for (s, x) in acc_row.iter_mut().zip(&bv) {
                        *s = _mm256_fmadd_ps(ai, *x, *s);
                    }
                }
                ap = ap.add(MR);
                bp = bp.add(8 * NV);
            }
        }
        if mr == MR && nr == 8 * NV {
            for (i, acc_row) in acc.iter().enumerate() {
                for (v, &s) in acc_row.iter().enumerate() {
                    // SAFETY: row i < mr, columns 8v..8v+8 <= nr: inside the
                    // tile the caller guarantees valid and unaliased.
                    unsafe {
                        let p = c.add(i * ldc + 8 * v);
                        let r = if load_c {
                            _mm256_add_ps(s, _mm256_loadu_ps(p))
                        } else {
                            s
                        };
                        _mm256_storeu_ps(p, r);
                    }
                }
            }
        } else {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            for (i, acc_row) in acc.iter().enumerate().take(mr) {
                for (v, &s) in acc_row.iter().enumerate() {
                    let cols = nr.saturating_sub(8 * v).min(8) as i32;
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane);
                    // SAFETY: the mask enables only columns below nr in row
                    // i < mr, all inside the caller's tile; masked-off lanes
                    // are neither read nor written (and cannot fault).
                    unsafe {
                        let p = c.add(i * ldc + 8 * v);
                        let r = if load_c {
                            _mm256_add_ps(s, _mm256_maskload_ps(p, mask))
                        } else {
                            s
                        };
                        _mm256_maskstore_ps(p, mask, r);
                    }
                }
            }
        }
    }

    /// The direct path compiled for AVX2+FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn direct_avx2(product: Product, c: &mut [f32]) {
        direct_body(product, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How an operand is stored: row-major, column-major (its transpose is
    /// row-major), or with no unit stride at all.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        RowMajor,
        ColMajor,
        Strided,
    }

    /// Stores `rows x cols` values produced by `f` in `layout`, with `pad`
    /// extra floats per leading dimension; returns the buffer and strides.
    fn store(
        rows: usize,
        cols: usize,
        layout: Layout,
        pad: usize,
        f: impl Fn(usize, usize) -> f32,
    ) -> (Vec<f32>, usize, usize) {
        let (rs, cs) = match layout {
            Layout::RowMajor => (cols + pad, 1),
            Layout::ColMajor => (1, rows + pad),
            Layout::Strided => (2 * cols + pad + 1, 2),
        };
        let len = MatRef { data: &[], rs, cs }.span(rows, cols).unwrap();
        let mut data = vec![f32::NAN; len];
        for i in 0..rows {
            for j in 0..cols {
                data[i * rs + j * cs] = f(i, j);
            }
        }
        (data, rs, cs)
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn value(seed: u64, i: usize, j: usize) -> f32 {
        let mut x = seed ^ ((i as u64) << 32 | j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        (x % 2001) as f32 / 1000.0 - 1.0
    }

    /// Naive f64 product: C0 (if accumulating) + A * B.
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: MatRef,
        b: MatRef,
        c0: &[f32],
        accumulate: bool,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if accumulate {
                    f64::from(c0[i * n + j])
                } else {
                    0.0
                };
                for p in 0..k {
                    s += f64::from(a.data[i * a.rs + p * a.cs])
                        * f64::from(b.data[p * b.rs + j * b.cs]);
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        assert_eq!(got.len(), want.len());
        let tol = 1e-4 * (k + 1) as f64;
        for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(g) - w).abs();
            assert!(
                err <= tol,
                "{what}: element {idx}: got {g}, want {w} (err {err} > {tol})"
            );
        }
    }

    struct Case {
        m: usize,
        n: usize,
        k: usize,
        a: (Vec<f32>, usize, usize),
        b: (Vec<f32>, usize, usize),
        c0: Vec<f32>,
    }

    impl Case {
        fn new(
            m: usize,
            n: usize,
            k: usize,
            la: Layout,
            lb: Layout,
            pad: usize,
            seed: u64,
        ) -> Case {
            Case {
                m,
                n,
                k,
                a: store(m, k, la, pad, |i, j| value(seed, i, j)),
                b: store(k, n, lb, pad, |i, j| value(seed + 1, i, j)),
                c0: (0..m * n).map(|i| value(seed + 2, i, 0)).collect(),
            }
        }

        fn a(&self) -> MatRef<'_> {
            MatRef {
                data: &self.a.0,
                rs: self.a.1,
                cs: self.a.2,
            }
        }

        fn b(&self) -> MatRef<'_> {
            MatRef {
                data: &self.b.0,
                rs: self.b.1,
                cs: self.b.2,
            }
        }

        /// Runs `f` on a copy of C0 and checks the result against the reference.
        fn check(&self, accumulate: bool, what: &str, f: impl Fn(MatRef, MatRef, &mut [f32])) {
            let want = reference(
                self.m,
                self.n,
                self.k,
                self.a(),
                self.b(),
                &self.c0,
                accumulate,
            );
            let mut c = self.c0.clone();
            f(self.a(), self.b(), &mut c);
            assert_close(&c, &want, self.k, what);
        }

        /// Every entry point and internal path, on every available ISA.
        fn check_all_paths(&self, accumulate: bool) {
            let (m, n, k) = (self.m, self.n, self.k);
            for isa in Isa::available() {
                self.check(accumulate, &format!("sgemm_with_isa {isa:?}"), |a, b, c| {
                    sgemm_with_isa(isa, m, n, k, a, b, c, accumulate)
                });
                if m > 0 && n > 0 && k > 0 {
                    for parallel in [false, true] {
                        self.check(
                            accumulate,
                            &format!("packed {isa:?} parallel={parallel}"),
                            |a, b, c| {
                                Product {
                                    m,
                                    n,
                                    k,
                                    a,
                                    b,
                                    accumulate,
                                }
                                .packed(isa, parallel, c)
                            },
                        );
                        self.check(
                            accumulate,
                            &format!("direct {isa:?} parallel={parallel}"),
                            |a, b, c| {
                                Product {
                                    m,
                                    n,
                                    k,
                                    a,
                                    b,
                                    accumulate,
                                }
                                .direct(isa, parallel, c)
                            },
                        );
                    }
                }
            }
            self.check(accumulate, "sgemm", |a, b, c| {
                sgemm(m, n, k, a, b, c, accumulate)
            });
        }
    }

    fn layout() -> impl Strategy<Value = Layout> {
        prop_oneof![
            Just(Layout::RowMajor),
            Just(Layout::ColMajor),
            Just(Layout::Strided)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn matches_f64_reference(
            m in 0usize..=70,
            n in 0usize..=70,
            k in 0usize..=70,
            la in layout(),
            lb in layout(),
            pad in 0usize..3,
            accumulate in any::<bool>(),
            seed in any::<u64>(),
        ) {
            Case::new(m, n, k, la, lb, pad, seed).check_all_paths(accumulate);
        }
    }

    #[test]
    fn all_transpose_combinations() {
        for la in [Layout::RowMajor, Layout::ColMajor] {
            for lb in [Layout::RowMajor, Layout::ColMajor] {
                for accumulate in [false, true] {
                    for (m, n, k) in [
                        (33, 47, 29),
                        (1, 70, 65),
                        (70, 1, 65),
                        (15, 33, 1),
                        (64, 64, 64),
                    ] {
                        Case::new(m, n, k, la, lb, 0, 7).check_all_paths(accumulate);
                    }
                }
            }
        }
    }

    #[test]
    fn crosses_every_cache_block() {
        // k > KC and m > MC on every ISA; n > NC for the portable kernel.
        for (la, lb) in [
            (Layout::RowMajor, Layout::RowMajor),
            (Layout::ColMajor, Layout::ColMajor),
        ] {
            let case = Case::new(203, 2100, 520, la, lb, 1, 11);
            for isa in Isa::available() {
                case.check(true, &format!("{isa:?}"), |a, b, c| {
                    sgemm_with_isa(isa, case.m, case.n, case.k, a, b, c, true)
                });
            }
        }
    }

    #[test]
    fn large_batched() {
        let (batch, m, n, k) = (3, 300, 257, 129);
        for (la, lb) in [
            (Layout::RowMajor, Layout::ColMajor),
            (Layout::ColMajor, Layout::RowMajor),
        ] {
            for accumulate in [false, true] {
                let cases: Vec<Case> = (0..batch)
                    .map(|i| Case::new(m, n, k, la, lb, 0, 100 + i))
                    .collect();
                let a_stride = cases[0].a.0.len();
                let b_stride = cases[0].b.0.len();
                let a_all: Vec<f32> = cases.iter().flat_map(|c| c.a.0.iter().copied()).collect();
                let b_all: Vec<f32> = cases.iter().flat_map(|c| c.b.0.iter().copied()).collect();
                let mut c_all: Vec<f32> = cases.iter().flat_map(|c| c.c0.iter().copied()).collect();
                let a = MatRef {
                    data: &a_all,
                    rs: cases[0].a.1,
                    cs: cases[0].a.2,
                };
                let b = MatRef {
                    data: &b_all,
                    rs: cases[0].b.1,
                    cs: cases[0].b.2,
                };
                sgemm_batched(
                    batch as usize,
                    m,
                    n,
                    k,
                    a,
                    a_stride,
                    b,
                    b_stride,
                    &mut c_all,
                    accumulate,
                );
                for (case, c) in cases.iter().zip(c_all.chunks(m * n)) {
                    let want = reference(m, n, k, case.a(), case.b(), &case.c0, accumulate);
                    assert_close(c, &want, k, "batched");
                }
                let single = &cases[1];
                single.check(accumulate, "sgemm 300x257x129", |a, b, c| {
                    sgemm(m, n, k, a, b, c, accumulate)
                });
            }
        }
    }

    #[test]
    fn small_batches_run_across_the_batch() {
        let (batch, m, n, k) = (5, 9, 17, 13);
        let cases: Vec<Case> = (0..batch)
            .map(|i| Case::new(m, n, k, Layout::RowMajor, Layout::RowMajor, 0, i))
            .collect();
        let a_all: Vec<f32> = cases.iter().flat_map(|c| c.a.0.iter().copied()).collect();
        let b_all: Vec<f32> = cases.iter().flat_map(|c| c.b.0.iter().copied()).collect();
        let mut c_all = vec![0.0; batch as usize * m * n];
        let a = MatRef {
            data: &a_all,
            rs: k,
            cs: 1,
        };
        let b = MatRef {
            data: &b_all,
            rs: n,
            cs: 1,
        };
        sgemm_batched(
            batch as usize,
            m,
            n,
            k,
            a,
            m * k,
            b,
            k * n,
            &mut c_all,
            false,
        );
        for (case, c) in cases.iter().zip(c_all.chunks(m * n)) {
            assert_close(
                c,
                &reference(m, n, k, case.a(), case.b(), &case.c0, false),
                k,
                "small batch",
            );
        }
    }

    #[test]
    fn k_zero_zeroes_or_keeps_c() {
        let mut c = vec![3.0; 6];
        let empty = MatRef {
            data: &[],
            rs: 0,
            cs: 1,
        };
        sgemm(2, 3, 0, empty, empty, &mut c, true);
        assert_eq!(c, [3.0; 6]);
        sgemm(2, 3, 0, empty, empty, &mut c, false);
        assert_eq!(c, [0.0; 6]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn short_output_panics() {
        let a = [1.0; 6];
        let mut c = [0.0; 3];
        let view = MatRef {
            data: &a,
            rs: 3,
            cs: 1,
        };
        sgemm(2, 2, 3, view, view.t(), &mut c, false);
    }

    #[test]
    #[should_panic]
    fn short_operand_panics() {
        let a = [1.0; 5];
        let b = [1.0; 6];
        let mut c = [0.0; 4];
        sgemm(
            2,
            2,
            3,
            MatRef {
                data: &a,
                rs: 3,
                cs: 1,
            },
            MatRef {
                data: &b,
                rs: 2,
                cs: 1,
            },
            &mut c,
            false,
        );
    }
}
