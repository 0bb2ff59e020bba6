//! The small dense products inside the attention tiles: C[m × n] (+)= A[m × k] · B[k × n], with A read
//! through arbitrary row and column strides — so the transposed operands of the backward pass (Pᵀ · dO,
//! dSᵀ · Q) need no copy — and B row-major with its own row stride.
//!
//! Every product here is small (one tile: tens of rows, k = head_dim or a key block), so there is no
//! packing: the micro-kernel keeps an MR × (lanes · NV) block of C in registers, broadcasts one element
//! of each of the MR rows of A per step and multiplies it into NV vectors of one row of B. The driver
//! walks 64-column (AVX-512) or 16-column (AVX2) chunks of B and, inside each, every MR-row strip of A,
//! so one chunk of B stays in L1 for all strips. A strip shorter than MR repeats its last row (computed,
//! never stored) instead of needing a kernel per height.

/// One product's operands. A(i, l) = a[i·a_rs + l·a_cs], B(l, j) = b[l·ldb + j], C(i, j) = c[i·ldc + j].
/// Raw pointers because C is often a strided block of an output that other threads write other rows of.
#[derive(Clone, Copy, Debug)]
pub(super) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const f32,
    pub a_rs: usize,
    pub a_cs: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    /// C += A·B instead of C = A·B.
    pub accumulate: bool,
}

/// A matrix operand: its first element and its row stride.
pub(super) type Operand<T> = (T, usize);

impl Gemm {
    /// C[m × n] (+)= A[m × k] · B[k × n], each row-major at its row stride.
    pub fn nn(
        (m, n, k): (usize, usize, usize),
        (a, lda): Operand<*const f32>,
        (b, ldb): Operand<*const f32>,
        (c, ldc): Operand<*mut f32>,
        accumulate: bool,
    ) -> Gemm {
        Gemm {
            m,
            n,
            k,
            a,
            a_rs: lda,
            a_cs: 1,
            b,
            ldb,
            c,
            ldc,
            accumulate,
        }
    }

    /// C[m × n] (+)= Aᵀ · B where A is stored k × m, row-major at row stride `lda`.
    pub fn tn(
        (m, n, k): (usize, usize, usize),
        (a, lda): Operand<*const f32>,
        (b, ldb): Operand<*const f32>,
        (c, ldc): Operand<*mut f32>,
        accumulate: bool,
    ) -> Gemm {
        Gemm {
            a_rs: 1,
            a_cs: lda,
            ..Gemm::nn((m, n, k), (a, 0), (b, ldb), (c, ldc), accumulate)
        }
    }
}

/// One instruction set's product.
pub(super) trait Tile {
    /// Runs `g`.
    ///
    /// # Safety
    /// The CPU supports the implementor's instruction set; every element of A, B and C that `g`
    /// addresses (i < m, j < n, l < k) is valid to read (A, B) or read and write (C), and no other
    /// thread touches that part of C during the call.
    unsafe fn gemm(g: &Gemm);
}

/// Plain loops, row by row (the compiler vectorises the inner loop over a row of B).
pub(super) struct Portable;

impl Tile for Portable {
    #[inline(always)]
    unsafe fn gemm(g: &Gemm) {
        if g.m == 0 || g.n == 0 {
            return;
        }
        for i in 0..g.m {
            // SAFETY: row i < m of C spans n valid floats that this call owns (the caller's contract).
            let crow = unsafe { std::slice::from_raw_parts_mut(g.c.add(i * g.ldc), g.n) };
            if !g.accumulate {
                crow.fill(0.0);
            }
            for l in 0..g.k {
                // SAFETY: A(i, l) and row l of B (n floats) are valid by the caller's contract.
                let (a, brow) = unsafe {
                    (
                        *g.a.add(i * g.a_rs + l * g.a_cs),
                        std::slice::from_raw_parts(g.b.add(l * g.ldb), g.n),
                    )
                };
                for (c, &b) in crow.iter_mut().zip(brow) {
                    *c += a * b;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Gemm, Tile};
    use std::arch::x86_64::*;

    /// Rows of a micro-tile on both instruction sets: 6 × 4 zmm (24 accumulators, 4 B vectors and a
    /// broadcast of the 32 registers) or 6 × 2 ymm (12 + 2 + 1 of 16).
    const MR: usize = 6;

    /// Pointers to the MR rows of A of the strip at i0 (rows past m repeat row m − 1).
    #[inline(always)]
    fn strip_rows(g: &Gemm, i0: usize) -> [*const f32; MR] {
        let last = g.m - 1;
        std::array::from_fn(|i| g.a.wrapping_add((i0 + i).min(last) * g.a_rs))
    }

    /// 16 lanes, 4 vectors (64 columns) per chunk.
    pub(crate) struct Avx512;

    /// One instruction set's register tile, behind the shared driver.
    trait Micro {
        /// Columns of C per chunk (the widest tile).
        const CHUNK: usize;

        /// The tile of C at (i0, j0): MR rows (fewer at the bottom), `nc` ≤ CHUNK columns.
        ///
        /// # Safety
        /// As [`Tile::gemm`]; the tile lies inside m × n.
        unsafe fn tile(g: &Gemm, i0: usize, j0: usize, nc: usize);
    }

    /// Walks the CHUNK-column chunks of C and, inside each, its MR-row strips. A trait method rather
    /// than a closure, so that it inlines into the `#[target_feature]` callers with their features.
    ///
    /// # Safety
    /// As [`Tile::gemm`], for `M`'s instruction set.
    #[inline(always)]
    unsafe fn drive<M: Micro>(g: &Gemm) {
        if g.m == 0 || g.n == 0 {
            return;
        }
        for j0 in (0..g.n).step_by(M::CHUNK) {
            let nc = (g.n - j0).min(M::CHUNK);
            for i0 in (0..g.m).step_by(MR) {
                // SAFETY: forwarded; the strip and chunk lie inside m × n.
                unsafe { M::tile(g, i0, j0, nc) };
            }
        }
    }

    impl Tile for Avx512 {
        #[inline(always)]
        unsafe fn gemm(g: &Gemm) {
            // SAFETY: forwarded.
            unsafe { drive::<Avx512>(g) }
        }
    }

    impl Micro for Avx512 {
        const CHUNK: usize = 64;

        #[inline(always)]
        unsafe fn tile(g: &Gemm, i0: usize, j0: usize, nc: usize) {
            // SAFETY: forwarded.
            unsafe {
                match (nc.div_ceil(16), nc.is_multiple_of(16)) {
                    (4, true) => mk512::<4, false>(g, i0, j0, nc),
                    (4, false) => mk512::<4, true>(g, i0, j0, nc),
                    (3, true) => mk512::<3, false>(g, i0, j0, nc),
                    (3, false) => mk512::<3, true>(g, i0, j0, nc),
                    (2, true) => mk512::<2, false>(g, i0, j0, nc),
                    (2, false) => mk512::<2, true>(g, i0, j0, nc),
                    (_, true) => mk512::<1, false>(g, i0, j0, nc),
                    (_, false) => mk512::<1, true>(g, i0, j0, nc),
                }
            }
        }
    }

    /// The MR × 16·NV tile of C at (i0, j0), `nc` ≤ 16·NV columns wide (all of them unless MASKED).
    ///
    /// # Safety
    /// As [`Tile::gemm`], with AVX-512F.
    #[inline(always)]
    unsafe fn mk512<const NV: usize, const MASKED: bool>(
        g: &Gemm,
        i0: usize,
        j0: usize,
        nc: usize,
    ) {
        let mr = (g.m - i0).min(MR);
        let rows = strip_rows(g, i0);
        let masks: [__mmask16; NV] =
            std::array::from_fn(|v| ((1u32 << nc.saturating_sub(16 * v).min(16)) - 1) as __mmask16);
        // SAFETY: every row pointer addresses a row < m of A and steps l < k along it; B row l, columns
        // j0 + 16v.. (masked to below n when MASKED); C rows i0 + i < m, columns below n (masked).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            let mut bp = g.b.add(j0);
            let mut off = 0;
            for _ in 0..g.k {
                let bv: [__m512; NV] = std::array::from_fn(|v| {
                    if MASKED {
                        _mm512_maskz_loadu_ps(masks[v], bp.add(16 * v))
                    } else {
                        _mm512_loadu_ps(bp.add(16 * v))
                    }
                });
                for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                    let a = _mm512_set1_ps(*row.add(off));
                    for (x, b) in acc.iter_mut().zip(bv) {
                        *x = _mm512_fmadd_ps(a, b, *x);
                    }
                }
                bp = bp.add(g.ldb);
                off += g.a_cs;
            }
            for (i, acc) in acc.iter().enumerate().take(mr) {
                let crow = g.c.add((i0 + i) * g.ldc + j0);
                for (v, &x) in acc.iter().enumerate() {
                    let p = crow.add(16 * v);
                    if MASKED {
                        let x = if g.accumulate {
                            _mm512_add_ps(x, _mm512_maskz_loadu_ps(masks[v], p))
                        } else {
                            x
                        };
                        _mm512_mask_storeu_ps(p, masks[v], x);
                    } else {
                        let x = if g.accumulate {
                            _mm512_add_ps(x, _mm512_loadu_ps(p))
                        } else {
                            x
                        };
                        _mm512_storeu_ps(p, x);
                    }
                }
            }
        }
    }

    /// 8 lanes, 2 vectors (16 columns) per chunk.
    pub(crate) struct Avx2;

    impl Tile for Avx2 {
        #[inline(always)]
        unsafe fn gemm(g: &Gemm) {
            // SAFETY: forwarded.
            unsafe { drive::<Avx2>(g) }
        }
    }

    impl Micro for Avx2 {
        const CHUNK: usize = 16;

        #[inline(always)]
        unsafe fn tile(g: &Gemm, i0: usize, j0: usize, nc: usize) {
            // SAFETY: forwarded.
            unsafe {
                match (nc.div_ceil(8), nc.is_multiple_of(8)) {
                    (2, true) => mk256::<2, false>(g, i0, j0, nc),
                    (2, false) => mk256::<2, true>(g, i0, j0, nc),
                    (_, true) => mk256::<1, false>(g, i0, j0, nc),
                    (_, false) => mk256::<1, true>(g, i0, j0, nc),
                }
            }
        }
    }

    /// The MR × 8·NV tile of C at (i0, j0); see [`mk512`].
    ///
    /// # Safety
    /// As [`Tile::gemm`], with AVX2 and FMA.
    #[inline(always)]
    unsafe fn mk256<const NV: usize, const MASKED: bool>(
        g: &Gemm,
        i0: usize,
        j0: usize,
        nc: usize,
    ) {
        let mr = (g.m - i0).min(MR);
        let rows = strip_rows(g, i0);
        // SAFETY: as mk512's, with lane masks built from the column count instead of mask registers.
        unsafe {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let masks: [__m256i; NV] = std::array::from_fn(|v| {
                let cols = nc.saturating_sub(8 * v).min(8) as i32;
                _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane)
            });
            let mut acc = [[_mm256_setzero_ps(); NV]; MR];
            let mut bp = g.b.add(j0);
            let mut off = 0;
            for _ in 0..g.k {
                let bv: [__m256; NV] = std::array::from_fn(|v| {
                    if MASKED {
                        _mm256_maskload_ps(bp.add(8 * v), masks[v])
                    } else {
                        _mm256_loadu_ps(bp.add(8 * v))
                    }
                });
                for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                    let a = _mm256_set1_ps(*row.add(off));
                    for (x, b) in acc.iter_mut().zip(bv) {
                        *x = _mm256_fmadd_ps(a, b, *x);
                    }
                }
                bp = bp.add(g.ldb);
                off += g.a_cs;
            }
            for (i, acc) in acc.iter().enumerate().take(mr) {
                let crow = g.c.add((i0 + i) * g.ldc + j0);
                for (v, &x) in acc.iter().enumerate() {
                    let p = crow.add(8 * v);
                    if MASKED {
                        let x = if g.accumulate {
                            _mm256_add_ps(x, _mm256_maskload_ps(p, masks[v]))
                        } else {
                            x
                        };
                        _mm256_maskstore_ps(p, masks[v], x);
                    } else {
                        let x = if g.accumulate {
                            _mm256_add_ps(x, _mm256_loadu_ps(p))
                        } else {
                            x
                        };
                        _mm256_storeu_ps(p, x);
                    }
                }
            }
        }
    }
}
