// What the flash attention kernels (cuda/flash_fwd.cu, cuda/flash_bwd.cu) share: the parameter block
// (mirrored by `FlashParams` in src/cuda/flash.rs), which keys a query sees (the CPU kernel's rules in
// src/ops/attention.rs), the swizzled shared-memory tile layout and the ldmatrix addresses of its
// mma fragments.
//
// Layouts (contiguous): q, o, dout, dq [batch, sq, heads, D]; k, v, dk, dv [batch, sk, kv_heads, D];
// lse, delta [batch, heads, sq] f32; dq_acc [batch, sq, heads, D] f32. Query head h reads kv head
// h / (heads / kv_heads). lse is the natural log of Σ_j exp(scale · q·k_j) over visible keys, −∞ for
// a query that sees none (its output is zero).
#pragma once
#include "mma.cuh"

struct FlashParams {
    const void *q, *k, *v;
    void *o;            // written by the forward, read by the backward
    const void *dout;   // backward: dL/do
    float *lse;         // written by the forward, read by the backward
    float *delta;       // backward: rowsum(dout ∘ o), [batch, heads, sq]
    float *dq_acc;      // backward: f32 dq accumulator, zeroed before the main kernel
    void *dq, *dk, *dv; // backward outputs in the inputs' dtype
    const uint8_t *key_valid; // [batch, sk], 0 = padding key; null when every key is valid
    const int32_t *doc_lo;    // [batch, sk]: the document holding key j is keys [doc_lo[j], doc_hi[j]);
    const int32_t *doc_hi;    // both null without packed sequences
    uint32_t batch, sq, sk, heads, kv_heads;
    int32_t causal; // 0 or 1
    int32_t window; // 0: none; else the sliding window's width w ≥ 1
    float scale;    // softmax scale (1/√D by default)
    float scale_log2; // scale · log2(e): the kernels work in base 2
    uint32_t pad_;
};

// Keys [lo, hi) that query i of sequence b may see before key padding (lo ≥ hi: none). Query i sits at
// key position t = i + sk − sq. Both ends are nondecreasing in i, which is what lets a block of
// queries bound its keys by its first and last rows and a block of keys find its queries by bisection.
__device__ __forceinline__ void flash_row_range(const FlashParams &p, uint32_t b, int i, int &lo, int &hi) {
    const int sk = (int)p.sk;
    const int t = i + sk - (int)p.sq;
    lo = 0;
    hi = sk;
    if (p.causal) hi = min(hi, t + 1);
    if (p.window > 0) {
        lo = max(lo, t - p.window + 1);
        if (!p.causal) hi = min(hi, t + p.window);
    }
    if (p.doc_lo) {
        if (t < 0) {
            hi = 0;
        } else {
            const uint64_t at = (uint64_t)b * sk + t;
            lo = max(lo, p.doc_lo[at]);
            hi = min(hi, p.doc_hi[at]);
        }
    }
    hi = max(hi, 0);
    lo = min(lo, hi);
}

// Keys a block of queries [i0, i1) (i1 > i0) may see: from its first row's lo to its last row's hi.
__device__ __forceinline__ void flash_block_keys(const FlashParams &p, uint32_t b, int i0, int i1, int &lo,
                                                 int &hi) {
    int l, h;
    flash_row_range(p, b, i0, lo, h);
    flash_row_range(p, b, i1 - 1, l, hi);
    hi = max(hi, lo);
}

// Queries [ilo, ihi) that may see a key of [j0, j1): the first row whose hi passes j0 up to the first
// row whose lo reaches j1 (bisection over the monotone ends).
__device__ __forceinline__ void flash_block_queries(const FlashParams &p, uint32_t b, int j0, int j1, int &ilo,
                                                    int &ihi) {
    int a = 0, z = (int)p.sq;
    while (a < z) {
        const int m = (a + z) / 2;
        int l, h;
        flash_row_range(p, b, m, l, h);
        if (h > j0) z = m;
        else a = m + 1;
    }
    ilo = a;
    z = (int)p.sq;
    while (a < z) {
        const int m = (a + z) / 2;
        int l, h;
        flash_row_range(p, b, m, l, h);
        if (l >= j1) z = m;
        else a = m + 1;
    }
    ihi = a;
}

// Whether query i (keys [lo, hi) from flash_row_range) sees key j of sequence b.
__device__ __forceinline__ bool flash_visible(const FlashParams &p, uint32_t b, int lo, int hi, int j) {
    return j >= lo && j < hi && (!p.key_valid || p.key_valid[(uint64_t)b * p.sk + j] != 0);
}

// A tile of 16-bit elements with rows of D (64 or 128) elements, its 16-byte granules XOR-swizzled by
// the row's low three bits so that ldmatrix's eight row reads, and cp.async's row writes, hit distinct
// banks. Returns the element offset of (row, col).
template <int D> __device__ __forceinline__ uint32_t swz(uint32_t row, uint32_t col) {
    static_assert(D % 64 == 0, "rows must hold at least eight 16-byte granules");
    return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7u)) * 8 + (col & 7);
}

// Copies rows [0, rows) of a [*, D] 16-bit tile starting at src (rows `stride` elements apart) into the
// swizzled tile at shared address dst, zero-filling rows ≥ valid, with `threads` threads, this one
// being `tid`. Commits nothing: the caller groups copies.
template <int D>
__device__ __forceinline__ void flash_load_tile(uint32_t dst, const uint16_t *src, uint64_t stride, int rows,
                                                int valid, int tid, int threads) {
    constexpr int G = D / 8; // granules per row
    for (int x = tid; x < rows * G; x += threads) {
        const int r = x / G, c = (x % G) * 8;
        const bool ok = r < valid;
        cp_async_16(dst + 2 * swz<D>(r, c), ok ? src + (uint64_t)r * stride + c : src, ok);
    }
}

// ldmatrix row address (shared, bytes) of the A fragment covering rows m0..m0+15, cols k0..k0+15 of a
// row-major swizzled tile: ldsm_x4 gives a[0..3].
template <int D> __device__ __forceinline__ uint32_t frag_a(uint32_t base, int m0, int k0, int lane) {
    return base + 2 * swz<D>(m0 + (lane & 15), k0 + (lane >> 4) * 8);
}

// B fragments of two n-tiles (n0..n0+7 and n0+8..n0+15), k0..k0+15, from a tile stored [n][k] (K in
// q·kᵀ): ldsm_x4 gives r[0], r[1] = b0, b1 of n0 and r[2], r[3] = b0, b1 of n0 + 8.
template <int D> __device__ __forceinline__ uint32_t frag_b_nk(uint32_t base, int n0, int k0, int lane) {
    return base + 2 * swz<D>(n0 + (lane & 7) + ((lane >> 4) << 3), k0 + ((lane >> 3) & 1) * 8);
}

// The same two n-tiles from a tile stored [k][n] (V in p·v): ldsm_x4_t gives r[0], r[1] = b0, b1 of n0
// and r[2], r[3] = b0, b1 of n0 + 8.
template <int D> __device__ __forceinline__ uint32_t frag_b_kn(uint32_t base, int k0, int n0, int lane) {
    return base + 2 * swz<D>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), n0 + (lane >> 4) * 8);
}
