// Walking strided views: per-dim indices unravelled with 32-bit arithmetic where the count allows,
// 16-byte packs on dense runs, and map1 (one view in, a contiguous output) for the copy and elementwise
// kernels.
#pragma once
#include "common.cuh"

// Per-dim index of one element. Loops over dims are unrolled to TRIT_MAX_DIMS with `d < rank` guards so
// that every dims[d]/strides[d] has a constant d and is read straight from the parameter bank (a
// dynamic index would copy the descriptor to local memory).
struct Index {
    uint32_t i[TRIT_MAX_DIMS];
};

// `I` is uint32_t whenever the element count fits, so each div/mod is a 32-bit one.
template <typename I> __device__ __forceinline__ Index unravel(const Strided &s, I i) {
    Index x;
#pragma unroll
    for (int d = TRIT_MAX_DIMS - 1; d >= 0; --d) {
        x.i[d] = 0;
        if (d < (int)s.rank) {
            if (d == 0) {
                x.i[0] = (uint32_t)i;
            } else {
                I n = s.dims[d];
                x.i[d] = (uint32_t)(i % n);
                i /= n;
            }
        }
    }
    return x;
}

__device__ __forceinline__ uint64_t offset_of(const Strided &s, const Index &x) {
    uint64_t off = s.offset;
#pragma unroll
    for (int d = 0; d < TRIT_MAX_DIMS; ++d) {
        if (d < (int)s.rank) off += (uint64_t)x.i[d] * s.strides[d];
    }
    return off;
}

// V elements moved as one aligned load or store.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

template <typename P> __device__ __forceinline__ bool aligned_for(const void *p) {
    return ((uintptr_t)p % sizeof(P)) == 0;
}

// Elements per vector step: 16-byte accesses for the widest element type of a kernel.
template <typename A, typename B> struct Lanes {
    static constexpr int V = 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
};

// Walks the n elements of a view. The dense vector loop covers whole packs when both pointers are
// aligned for them; one scalar loop covers the rest (the dense tail, misaligned dense views, strided
// views). `op` converts arrays of V (or 1) elements.
template <typename A, typename O, typename F>
__device__ __forceinline__ void map1(const A *__restrict__ a, const Strided &sa, O *__restrict__ y,
                                     uint64_t n, const F &op) {
    constexpr int V = Lanes<A, O>::V;
    bool dense = strided_dense(sa), small = n <= 0xffffffffull;
    uint64_t done = 0;
    if (dense && aligned_for<Pack<A, V>>(a + sa.offset) && aligned_for<Pack<O, V>>(y)) {
        const Pack<A, V> *pa = reinterpret_cast<const Pack<A, V> *>(a + sa.offset);
        Pack<O, V> *py = reinterpret_cast<Pack<O, V> *>(y);
        uint64_t nv = n / V;
        GRID_STRIDE_LOOP(j, nv) {
            Pack<A, V> va = pa[j];
            Pack<O, V> vo;
            op(va.v, vo.v);
            py[j] = vo;
        }
        done = nv * V;
    }
    GRID_STRIDE_LOOP(k, n - done) {
        uint64_t j = done + k;
        uint64_t oa = dense ? sa.offset + j
                            : offset_of(sa, small ? unravel(sa, (uint32_t)j) : unravel(sa, j));
        A va[1] = {a[oa]};
        O vo[1];
        op(va, vo);
        y[j] = vo[0];
    }
}
