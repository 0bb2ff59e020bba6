// Indexing along the middle dim of a tensor viewed as [outer, size, inner]: index_select (the embedding
// lookup) and gather, and their adjoints index_add and scatter_add. The adjoints add into an f32 buffer
// with atomics, so repeated ids (the same token twice in a batch) sum without rounding to f16/bf16 in
// between; the launcher converts the buffer back to the base's dtype once at the end.
#include "common.cuh"

// Index arithmetic runs in 32 bits whenever every index fits below 2^31 (so that i + stride cannot wrap):
// 64-bit division is a long software sequence that would make these copies integer-bound.
#define FITS_32(n) ((n) < (1ull << 31))

template <int BYTES> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint2; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };
template <> struct Unit<1> { using type = uint8_t; };

template <typename U, typename I>
__device__ __forceinline__ void select_units(const U *__restrict__ x, U *__restrict__ out,
                                             const int32_t *__restrict__ ids, I size, I nids,
                                             I inner, I total) {
    for (I u = (I)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += (I)blockDim.x * gridDim.x) {
        I r = u / inner, n = u - r * inner;
        I o = r / nids, j = r - o * nids;
        out[u] = x[(o * size + (I)ids[j]) * inner + n];
    }
}

// index_select only moves bytes, so rows are copied in the widest unit (up to 16 bytes) that the row
// length and both base addresses allow, whatever the element type.
template <int BYTES, int MIN_BYTES>
__device__ __forceinline__ void select_widest(const void *x, void *out, const int32_t *ids,
                                              uint64_t outer, uint64_t size, uint64_t nids,
                                              uint64_t row_bytes) {
    if constexpr (BYTES > MIN_BYTES) {
        uint64_t a = (uint64_t)(uintptr_t)x | (uint64_t)(uintptr_t)out | row_bytes;
        if (a % BYTES != 0) {
            select_widest<BYTES / 2, MIN_BYTES>(x, out, ids, outer, size, nids, row_bytes);
            return;
        }
    }
    using U = typename Unit<BYTES>::type;
    uint64_t inner = row_bytes / BYTES;
    uint64_t total = outer * nids * inner;
    const U *xu = (const U *)x;
    U *ou = (U *)out;
    if (FITS_32(total) && FITS_32(outer * size * inner)) {
        select_units<U, uint32_t>(xu, ou, ids, (uint32_t)size, (uint32_t)nids, (uint32_t)inner,
                                  (uint32_t)total);
    } else {
        select_units<U, uint64_t>(xu, ou, ids, size, nids, inner, total);
    }
}

// out[o, j, n] = x[o, ids[j], n]; x points at the view's first element.
#define INDEX_SELECT(NAME, T)                                                                      \
    extern "C" __global__ void index_select_##NAME(const T *x, T *out, const int32_t *ids,          \
                                                   uint64_t outer, uint64_t size, uint64_t nids,    \
                                                   uint64_t inner) {                                \
        select_widest<16, (int)sizeof(T)>(x, out, ids, outer, size, nids, inner * sizeof(T));      \
    }

INDEX_SELECT(f32, float)
INDEX_SELECT(f16, __half)
INDEX_SELECT(bf16, __nv_bfloat16)
INDEX_SELECT(i32, int32_t)
INDEX_SELECT(i8, int8_t)
INDEX_SELECT(u8, uint8_t)

template <typename T, typename I>
__device__ __forceinline__ void gather_elems(const T *__restrict__ x, T *__restrict__ out,
                                             const int32_t *__restrict__ ids, I size, I k, I inner,
                                             I total) {
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (I)blockDim.x * gridDim.x) {
        I r = i / inner, n = i - r * inner;
        I o = r / k;
        out[i] = x[(o * size + (I)ids[i]) * inner + n];
    }
}

// out[o, j, n] = x[o, ids[o, j, n], n]; x points at the view's first element, ids is [outer, k, inner].
#define GATHER(NAME, T)                                                                            \
    extern "C" __global__ void gather_##NAME(const T *x, T *out, const int32_t *ids, uint64_t outer, \
                                             uint64_t size, uint64_t k, uint64_t inner) {           \
        uint64_t total = outer * k * inner;                                                        \
        if (FITS_32(total) && FITS_32(outer * size * inner)) {                                     \
            gather_elems<T, uint32_t>(x, out, ids, (uint32_t)size, (uint32_t)k, (uint32_t)inner,   \
                                      (uint32_t)total);                                            \
        } else {                                                                                   \
            gather_elems<T, uint64_t>(x, out, ids, size, k, inner, total);                         \
        }                                                                                          \
    }

GATHER(f32, float)
GATHER(f16, __half)
GATHER(bf16, __nv_bfloat16)
GATHER(i32, int32_t)
GATHER(i8, int8_t)
GATHER(u8, uint8_t)

// acc[o, id, n] += src[o, j, n] for every element of src ([outer, k, inner], read through its view), with
// id = ids[j] (index_add, one id per slice) or ids[o, j, n] (scatter_add, one id per element).
template <bool PER_ELEMENT, typename T, typename I>
__device__ __forceinline__ void add_elems(float *acc, const T *__restrict__ src, const Strided &ss,
                                          const int32_t *__restrict__ ids, I size, I k, I inner,
                                          I total) {
    bool dense = strided_dense(ss);
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (I)blockDim.x * gridDim.x) {
        float v = to_f32(src[dense ? ss.offset + i : strided_offset(ss, i)]);
        I r = i / inner, n = i - r * inner;
        I o = r / k, j = r - o * k;
        I id = (I)ids[PER_ELEMENT ? i : j];
        atomicAdd(acc + (o * size + id) * inner + n, v);
    }
}

template <bool PER_ELEMENT, typename T>
__device__ __forceinline__ void add_into(float *acc, const T *src, const Strided &ss,
                                         const int32_t *ids, uint64_t outer, uint64_t size,
                                         uint64_t k, uint64_t inner) {
    uint64_t total = outer * k * inner;
    if (FITS_32(total) && FITS_32(outer * size * inner)) {
        add_elems<PER_ELEMENT, T, uint32_t>(acc, src, ss, ids, (uint32_t)size, (uint32_t)k,
                                            (uint32_t)inner, (uint32_t)total);
    } else {
        add_elems<PER_ELEMENT, T, uint64_t>(acc, src, ss, ids, size, k, inner, total);
    }
}

// acc [outer, size, inner] (f32, contiguous) += src [outer, nids, inner] at ids along the middle dim.
// `ss` is __grid_constant__ so strided_offset reads it in place from parameter space: indexing its arrays
// at run time would otherwise copy the whole struct to local memory in every thread.
#define INDEX_ADD(NAME, T)                                                                         \
    extern "C" __global__ void index_add_##NAME(float *acc, const T *src,                          \
                                                const __grid_constant__ Strided ss,                \
                                                const int32_t *ids, uint64_t outer, uint64_t size, \
                                                uint64_t nids, uint64_t inner) {                   \
        add_into<false, T>(acc, src, ss, ids, outer, size, nids, inner);                           \
    }

// acc [outer, size, inner] (f32, contiguous) += src [outer, k, inner] at ids [outer, k, inner].
#define SCATTER_ADD(NAME, T)                                                                       \
    extern "C" __global__ void scatter_add_##NAME(float *acc, const T *src,                        \
                                                  const __grid_constant__ Strided ss,              \
                                                  const int32_t *ids, uint64_t outer,              \
                                                  uint64_t size, uint64_t k, uint64_t inner) {     \
        add_into<true, T>(acc, src, ss, ids, outer, size, k, inner);                               \
    }

INDEX_ADD(f32, float)
INDEX_ADD(f16, __half)
INDEX_ADD(bf16, __nv_bfloat16)
SCATTER_ADD(f32, float)
SCATTER_ADD(f16, __half)
SCATTER_ADD(bf16, __nv_bfloat16)
