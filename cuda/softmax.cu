// Softmax, log-softmax and causal softmax over contiguous rows of d, forward and backward (launched by
// src/cuda/softmax.rs). Rows of up to WARP_ROW_MAX elements get a warp each and longer rows a block each,
// both holding the row in registers (up to SLOTS * blockDim.x elements for a block) so it is read from
// memory once; longer rows get a block that reads the row again for each pass. Each kernel picks its path
// from d and blockDim, so any launch shape gives correct results; the launcher's shape makes it fast.
#include "rows.cuh"

#define PLAIN 0
#define LOG 1
#define CAUSAL 2


template <bool WARP> __device__ __forceinline__ float row_sum(float v, float *scratch) {
    return WARP ? warp_sum(v) : block_sum(v, scratch);
}

template <bool WARP> __device__ __forceinline__ float row_max(float v, float *scratch) {
    return WARP ? warp_max(v) : block_max(v, scratch);
}

// The first `seen` columns take part (all d but for causal rows); the rest of the row is written as
// exact zeros. As on the CPU, the max skips NaN, and a NaN or +inf among the visible columns, or visible
// columns that are all -inf, make every visible output NaN (log-softmax too: -inf - (-inf)).
template <typename T, int N, int KIND, bool WARP, bool VEC>
__device__ __forceinline__ void forward_cached(const T *__restrict__ x, T *__restrict__ y, uint32_t d, uint32_t seen,
                                               uint32_t t, uint32_t nt, float *scratch) {
    float v[N];
    load_row<T, N, VEC>(x, d, t, nt, v);
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < N; ++j)
        if (slot_col<T, VEC>(j, t, nt) < seen) m = fmaxf(m, v[j]);
    m = row_max<WARP>(m, scratch);
    float s = 0.f;
    if (KIND == LOG) {
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (slot_col<T, VEC>(j, t, nt) < seen) s += expf(v[j] - m);
        s = row_sum<WARP>(s, scratch);
        float lse = m == -INFINITY ? m : m + logf(s);
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] -= lse;
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            v[j] = slot_col<T, VEC>(j, t, nt) < seen ? expf(v[j] - m) : 0.f;
            s += v[j];
        }
        s = row_sum<WARP>(s, scratch);
        float inv = 1.f / s;
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (slot_col<T, VEC>(j, t, nt) < seen) v[j] *= inv;
    }
    store_row<T, N, VEC>(y, d, t, nt, v);
}

// Rows longer than the block's registers hold: one pass for the max, one for the sum, one to write.
template <typename T, int KIND>
__device__ __forceinline__ void forward_long(const T *__restrict__ x, T *__restrict__ y, uint32_t d, uint32_t seen,
                                             float *scratch) {
    float m = -INFINITY;
    for (uint32_t c = threadIdx.x; c < seen; c += blockDim.x) m = fmaxf(m, to_f32(x[c]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (uint32_t c = threadIdx.x; c < seen; c += blockDim.x) s += expf(to_f32(x[c]) - m);
    s = block_sum(s, scratch);
    if (KIND == LOG) {
        float lse = m == -INFINITY ? m : m + logf(s);
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) y[c] = from_f32<T>(to_f32(x[c]) - lse);
    } else {
        float inv = 1.f / s;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x)
            y[c] = from_f32<T>(c < seen ? expf(to_f32(x[c]) - m) * inv : 0.f);
    }
}

// dx = y (g - Σ g y) (softmax; causal over the visible prefix, exact zeros beyond), or
// dx = g - exp(y) Σ g (log-softmax, whose output is y).
template <typename T, int N, int KIND, bool WARP, bool VEC>
__device__ __forceinline__ void backward_cached(const T *__restrict__ y, const T *__restrict__ g, T *__restrict__ dx,
                                                uint32_t d, uint32_t seen, uint32_t t, uint32_t nt,
                                                float *scratch) {
    float yv[N], gv[N];
    load_row<T, N, VEC>(y, d, t, nt, yv);
    load_row<T, N, VEC>(g, d, t, nt, gv);
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j)
        if (slot_col<T, VEC>(j, t, nt) < seen) s += KIND == LOG ? gv[j] : yv[j] * gv[j];
    s = row_sum<WARP>(s, scratch);
#pragma unroll
    for (int j = 0; j < N; ++j) {
        bool visible = slot_col<T, VEC>(j, t, nt) < seen;
        yv[j] = !visible ? 0.f : KIND == LOG ? gv[j] - expf(yv[j]) * s : yv[j] * (gv[j] - s);
    }
    store_row<T, N, VEC>(dx, d, t, nt, yv);
}

template <typename T, int KIND>
__device__ __forceinline__ void backward_long(const T *__restrict__ y, const T *__restrict__ g, T *__restrict__ dx,
                                              uint32_t d, uint32_t seen, float *scratch) {
    float s = 0.f;
    for (uint32_t c = threadIdx.x; c < seen; c += blockDim.x)
        s += KIND == LOG ? to_f32(g[c]) : to_f32(y[c]) * to_f32(g[c]);
    s = block_sum(s, scratch);
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        float r = 0.f;
        if (c < seen) {
            float yc = to_f32(y[c]), gc = to_f32(g[c]);
            r = KIND == LOG ? gc - expf(yc) * s : yc * (gc - s);
        }
        dx[c] = from_f32<T>(r);
    }
}

// Causal rows come in blocks of q queries over d keys: query i sees keys 0..=i + (d - q).
template <int KIND> __device__ __forceinline__ uint32_t visible(uint64_t row, uint32_t d, uint32_t q) {
    return KIND == CAUSAL ? (uint32_t)(row % q) + 1 + (d - q) : d;
}

// x (and g) are `rows` contiguous rows of d; out is written the same way. VEC says every row pointer is
// 16-byte aligned and d is a multiple of the vector width.
template <typename T, int KIND, bool VEC>
__device__ __forceinline__ void forward_rows(const T *__restrict__ x, T *__restrict__ y, uint64_t rows, uint32_t d,
                                             uint32_t q, float *scratch) {
    if (d <= WARP_ROW_MAX) {
        uint32_t lane = threadIdx.x & 31;
        uint64_t w = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
        uint64_t nw = ((uint64_t)gridDim.x * blockDim.x) >> 5;
        for (uint64_t row = w; row < rows; row += nw) {
            uint64_t o = row * d;
            uint32_t seen = visible<KIND>(row, d, q);
            if (d <= 256)
                forward_cached<T, 8, KIND, true, VEC>(x + o, y + o, d, seen, lane, 32, scratch);
            else
                forward_cached<T, 16, KIND, true, VEC>(x + o, y + o, d, seen, lane, 32, scratch);
        }
    } else {
        constexpr int SLOTS = VEC ? BLOCK_SLOTS : BLOCK_SLOTS_SCALAR;
        for (uint64_t row = blockIdx.x; row < rows; row += gridDim.x) {
            uint64_t o = row * d;
            uint32_t seen = visible<KIND>(row, d, q);
            if (d <= SLOTS * blockDim.x)
                forward_cached<T, SLOTS, KIND, false, VEC>(x + o, y + o, d, seen, threadIdx.x, blockDim.x,
                                                                 scratch);
            else
                forward_long<T, KIND>(x + o, y + o, d, seen, scratch);
        }
    }
}

template <typename T, int KIND, bool VEC>
__device__ __forceinline__ void backward_rows(const T *__restrict__ y, const T *__restrict__ g, T *__restrict__ dx,
                                              uint64_t rows, uint32_t d, uint32_t q, float *scratch) {
    if (d <= WARP_ROW_MAX) {
        uint32_t lane = threadIdx.x & 31;
        uint64_t w = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
        uint64_t nw = ((uint64_t)gridDim.x * blockDim.x) >> 5;
        for (uint64_t row = w; row < rows; row += nw) {
            uint64_t o = row * d;
            uint32_t seen = visible<KIND>(row, d, q);
            if (d <= 256)
                backward_cached<T, 8, KIND, true, VEC>(y + o, g + o, dx + o, d, seen, lane, 32, scratch);
            else
                backward_cached<T, 16, KIND, true, VEC>(y + o, g + o, dx + o, d, seen, lane, 32, scratch);
        }
    } else {
        constexpr int SLOTS = VEC ? BLOCK_SLOTS : BLOCK_SLOTS_SCALAR;
        for (uint64_t row = blockIdx.x; row < rows; row += gridDim.x) {
            uint64_t o = row * d;
            uint32_t seen = visible<KIND>(row, d, q);
            if (d <= SLOTS * blockDim.x)
                backward_cached<T, SLOTS, KIND, false, VEC>(y + o, g + o, dx + o, d, seen, threadIdx.x,
                                                                  blockDim.x, scratch);
            else
                backward_long<T, KIND>(y + o, g + o, dx + o, d, seen, scratch);
        }
    }
}

// `vec` (0 or 1) selects the 128-bit path; q is the queries per block of causal rows (ignored otherwise).
#define SOFTMAX_KERNELS(NAME, KIND, SUFFIX, T)                                                             \
    extern "C" __global__ void __launch_bounds__(BLOCK_MAX_THREADS, 1) NAME##_##SUFFIX(const T *x, T *y, uint64_t rows, uint32_t d, uint32_t q,     \
                                               uint32_t vec) {                                             \
        __shared__ float scratch[32];                                                                      \
        if (vec)                                                                                           \
            forward_rows<T, KIND, true>(x, y, rows, d, q, scratch);                                        \
        else                                                                                               \
            forward_rows<T, KIND, false>(x, y, rows, d, q, scratch);                                       \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK_MAX_THREADS, 1) NAME##_backward_##SUFFIX(const T *y, const T *g, T *dx, uint64_t rows,      \
                                                        uint32_t d, uint32_t q, uint32_t vec) {            \
        __shared__ float scratch[32];                                                                      \
        if (vec)                                                                                           \
            backward_rows<T, KIND, true>(y, g, dx, rows, d, q, scratch);                                   \
        else                                                                                               \
            backward_rows<T, KIND, false>(y, g, dx, rows, d, q, scratch);                                  \
    }

#define SOFTMAX_DTYPES(NAME, KIND)                                                                         \
    SOFTMAX_KERNELS(NAME, KIND, f32, float)                                                                \
    SOFTMAX_KERNELS(NAME, KIND, f16, __half)                                                               \
    SOFTMAX_KERNELS(NAME, KIND, bf16, __nv_bfloat16)

SOFTMAX_DTYPES(softmax, PLAIN)
SOFTMAX_DTYPES(log_softmax, LOG)
SOFTMAX_DTYPES(causal_softmax, CAUSAL)
