// LayerNorm (CENTRE) and RMSNorm over contiguous rows of d, forward and backward (launched by
// src/cuda/norm.rs). Row kernels follow cuda/softmax.cu: a warp per row up to WARP_ROW_MAX elements, a
// block per row beyond, the row held in registers up to SLOTS * blockDim.x elements and re-read per pass
// past that. Statistics are two-pass (mean, then the mean square about it) over the register copy.
// dw/db are column sums over rows: norm_backward_params_* writes per-chunk partials [chunks, d] that the
// launcher folds with the column reduction of cuda/reduce.cu, so no float atomics are involved.
#include "rows.cuh"

// Rows per block of the params kernel: its blocks are 32 columns x PARAM_ROWS row lanes.
#define PARAM_ROWS 8


// G consecutive f32 values, as 128-bit loads when G is a multiple of 4 (the launcher then checks that
// w and b are 16-byte aligned).
template <int G> __device__ __forceinline__ void load_f32(const float *__restrict__ p, float *v) {
    if (G % 4 == 0) {
#pragma unroll
        for (int i = 0; i < G; i += 4) {
            float4 f = *reinterpret_cast<const float4 *>(p + i);
            v[i] = f.x;
            v[i + 1] = f.y;
            v[i + 2] = f.z;
            v[i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < G; ++i) v[i] = p[i];
    }
}

template <bool WARP> __device__ __forceinline__ float row_sum(float v, float *scratch) {
    return WARP ? warp_sum(v) : block_sum(v, scratch);
}

// y = (x - mean) * rstd (* w) (+ b), with rstd = 1 / sqrt(var + eps), var the biased variance; RMSNorm
// takes mean = 0. Returns (mean, rstd) through the references.
template <typename T, int N, bool CENTRE, bool WARP, bool VEC>
__device__ __forceinline__ void forward_cached(const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ w,
                                               const float *__restrict__ b, uint32_t d, float eps, uint32_t t,
                                               uint32_t nt, float *scratch, float &mean, float &rstd) {
    float v[N];
    load_row<T, N, VEC>(x, d, t, nt, v);
    mean = 0.f;
    if (CENTRE) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) s += v[j];
        mean = row_sum<WARP>(s, scratch) / (float)d;
    }
    float q = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        float e = v[j] - mean;
        if (slot_col<T, VEC>(j, t, nt) < d) q += e * e;
    }
    rstd = 1.f / sqrtf(row_sum<WARP>(q, scratch) / (float)d + eps);
    // One group of slots at a time (a 128-bit access, or one slot), so that few w/b values are live.
    constexpr int G = VEC ? Vec<T>::N : 1;
#pragma unroll
    for (int j = 0; j < N; j += G) {
        uint32_t c = slot_col<T, VEC>(j, t, nt);
        if (c >= d) continue;
        float o[G], wv[G], bv[G];
        if (w) load_f32<G>(w + c, wv);
        if (b) load_f32<G>(b + c, bv);
#pragma unroll
        for (int e = 0; e < G; ++e) {
            o[e] = (v[j + e] - mean) * rstd;
            if (w) o[e] *= wv[e];
            if (b) o[e] += bv[e];
        }
        if (VEC) {
            store16(y + c, o);
        } else {
            y[c] = from_f32<T>(o[0]);
        }
    }
}

template <typename T, bool CENTRE>
__device__ __forceinline__ void forward_long(const T *__restrict__ x, T *__restrict__ y, const float *__restrict__ w,
                                             const float *__restrict__ b, uint32_t d, float eps, float *scratch,
                                             float &mean, float &rstd) {
    mean = 0.f;
    if (CENTRE) {
        float s = 0.f;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) s += to_f32(x[c]);
        mean = block_sum(s, scratch) / (float)d;
    }
    float q = 0.f;
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        float e = to_f32(x[c]) - mean;
        q += e * e;
    }
    rstd = 1.f / sqrtf(block_sum(q, scratch) / (float)d + eps);
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        float o = (to_f32(x[c]) - mean) * rstd;
        if (w) o *= w[c];
        if (b) o += b[c];
        y[c] = from_f32<T>(o);
    }
}

// dx = rstd * (dxhat - a - xhat * c) with xhat = (x - mean) * rstd, dxhat = g * w, c = mean(dxhat * xhat)
// and a = mean(dxhat) (0 for RMSNorm), as the CPU's norm_backward.
template <typename T, int N, bool CENTRE, bool WARP, bool VEC>
__device__ __forceinline__ void backward_cached(const T *__restrict__ x, const T *__restrict__ g, T *__restrict__ dx,
                                                const float *__restrict__ w, float mean, float rstd, uint32_t d,
                                                uint32_t t, uint32_t nt, float *scratch) {
    float xv[N], gv[N];
    load_row<T, N, VEC>(x, d, t, nt, xv);
    load_row<T, N, VEC>(g, d, t, nt, gv);
    float sa = 0.f, sc = 0.f;
    constexpr int G = VEC ? Vec<T>::N : 1;
#pragma unroll
    for (int j = 0; j < N; j += G) {
        uint32_t c = slot_col<T, VEC>(j, t, nt);
        if (c >= d) continue;
        float wv[G];
        if (w) load_f32<G>(w + c, wv);
#pragma unroll
        for (int e = 0; e < G; ++e) {
            float xhat = (xv[j + e] - mean) * rstd;
            float dxhat = w ? gv[j + e] * wv[e] : gv[j + e];
            xv[j + e] = xhat;
            gv[j + e] = dxhat;
            sa += dxhat;
            sc += dxhat * xhat;
        }
    }
    float a = CENTRE ? row_sum<WARP>(sa, scratch) / (float)d : 0.f;
    float cc = row_sum<WARP>(sc, scratch) / (float)d;
#pragma unroll
    for (int j = 0; j < N; ++j) xv[j] = rstd * (gv[j] - a - xv[j] * cc);
    store_row<T, N, VEC>(dx, d, t, nt, xv);
}

template <typename T, bool CENTRE>
__device__ __forceinline__ void backward_long(const T *__restrict__ x, const T *__restrict__ g, T *__restrict__ dx,
                                              const float *__restrict__ w, float mean, float rstd, uint32_t d,
                                              float *scratch) {
    float sa = 0.f, sc = 0.f;
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        float xhat = (to_f32(x[c]) - mean) * rstd;
        float dxhat = w ? to_f32(g[c]) * w[c] : to_f32(g[c]);
        sa += dxhat;
        sc += dxhat * xhat;
    }
    float a = CENTRE ? block_sum(sa, scratch) / (float)d : 0.f;
    float cc = block_sum(sc, scratch) / (float)d;
    for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
        float xhat = (to_f32(x[c]) - mean) * rstd;
        float dxhat = w ? to_f32(g[c]) * w[c] : to_f32(g[c]);
        dx[c] = from_f32<T>(rstd * (dxhat - a - xhat * cc));
    }
}

// x, y are `rows` contiguous rows of d; w, b are f32 [d] or null; mean, rstd are f32 [rows]. VEC says
// every row pointer is 16-byte aligned and d is a multiple of the vector width.
template <typename T, bool CENTRE, bool VEC>
__device__ __forceinline__ void forward_rows(const T *__restrict__ x, const float *__restrict__ w,
                                             const float *__restrict__ b, T *__restrict__ y, float *__restrict__ mean,
                                             float *__restrict__ rstd, uint64_t rows, uint32_t d, float eps,
                                             float *scratch) {
    float m, s;
    if (d <= WARP_ROW_MAX) {
        uint32_t lane = threadIdx.x & 31;
        uint64_t wi = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
        uint64_t nw = ((uint64_t)gridDim.x * blockDim.x) >> 5;
        for (uint64_t row = wi; row < rows; row += nw) {
            uint64_t o = row * d;
            if (d <= 256)
                forward_cached<T, 8, CENTRE, true, VEC>(x + o, y + o, w, b, d, eps, lane, 32, scratch, m, s);
            else
                forward_cached<T, 16, CENTRE, true, VEC>(x + o, y + o, w, b, d, eps, lane, 32, scratch, m, s);
            if (lane == 0) {
                mean[row] = m;
                rstd[row] = s;
            }
        }
    } else {
        constexpr int SLOTS = VEC ? BLOCK_SLOTS : BLOCK_SLOTS_SCALAR;
        for (uint64_t row = blockIdx.x; row < rows; row += gridDim.x) {
            uint64_t o = row * d;
            if (d <= SLOTS * blockDim.x)
                forward_cached<T, SLOTS, CENTRE, false, VEC>(x + o, y + o, w, b, d, eps, threadIdx.x,
                                                                   blockDim.x, scratch, m, s);
            else
                forward_long<T, CENTRE>(x + o, y + o, w, b, d, eps, scratch, m, s);
            if (threadIdx.x == 0) {
                mean[row] = m;
                rstd[row] = s;
            }
        }
    }
}

template <typename T, bool CENTRE, bool VEC>
__device__ __forceinline__ void backward_rows(const T *__restrict__ x, const T *__restrict__ g,
                                              const float *__restrict__ w, const float *__restrict__ mean,
                                              const float *__restrict__ rstd, T *__restrict__ dx, uint64_t rows,
                                              uint32_t d, float *scratch) {
    if (d <= WARP_ROW_MAX) {
        uint32_t lane = threadIdx.x & 31;
        uint64_t wi = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
        uint64_t nw = ((uint64_t)gridDim.x * blockDim.x) >> 5;
        for (uint64_t row = wi; row < rows; row += nw) {
            uint64_t o = row * d;
            if (d <= 256)
                backward_cached<T, 8, CENTRE, true, VEC>(x + o, g + o, dx + o, w, mean[row], rstd[row], d, lane, 32,
                                                         scratch);
            else
                backward_cached<T, 16, CENTRE, true, VEC>(x + o, g + o, dx + o, w, mean[row], rstd[row], d, lane,
                                                          32, scratch);
        }
    } else {
        constexpr int SLOTS = VEC ? BLOCK_SLOTS : BLOCK_SLOTS_SCALAR;
        for (uint64_t row = blockIdx.x; row < rows; row += gridDim.x) {
            uint64_t o = row * d;
            if (d <= SLOTS * blockDim.x)
                backward_cached<T, SLOTS, CENTRE, false, VEC>(x + o, g + o, dx + o, w, mean[row], rstd[row], d,
                                                                    threadIdx.x, blockDim.x, scratch);
            else
                backward_long<T, CENTRE>(x + o, g + o, dx + o, w, mean[row], rstd[row], d, scratch);
        }
    }
}

// Block (32, PARAM_ROWS) of grid (ceil(d / 32), chunks): column c's sums of g * (x - mean) * rstd (dw) and
// of g (db) over rows [chunk * rows_per_chunk, ...) go to dw[chunk * d + c] and db[chunk * d + c] (either
// may be null). The row lanes are folded in a fixed order, so the partials are deterministic.
template <typename T>
__device__ __forceinline__ void params(const T *__restrict__ x, const T *__restrict__ g, const float *__restrict__ mean,
                                       const float *__restrict__ rstd, uint64_t rows, uint32_t d,
                                       uint64_t rows_per_chunk, float *__restrict__ dw, float *__restrict__ db) {
    __shared__ float sw[PARAM_ROWS][33], sb[PARAM_ROWS][33];
    uint32_t tx = threadIdx.x, ty = threadIdx.y;
    uint64_t c = (uint64_t)blockIdx.x * 32 + tx;
    uint64_t r0 = (uint64_t)blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float aw = 0.f, ab = 0.f;
    if (c < d) {
        for (uint64_t r = r0 + ty; r < r1; r += PARAM_ROWS) {
            float gv = to_f32(g[r * d + c]);
            aw += gv * (to_f32(x[r * d + c]) - mean[r]) * rstd[r];
            ab += gv;
        }
    }
    sw[ty][tx] = aw;
    sb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && c < d) {
        float tw = 0.f, tb = 0.f;
#pragma unroll
        for (int k = 0; k < PARAM_ROWS; ++k) {
            tw += sw[k][tx];
            tb += sb[k][tx];
        }
        uint64_t o = (uint64_t)blockIdx.y * d + c;
        if (dw) dw[o] = tw;
        if (db) db[o] = tb;
    }
}

// `vec` (0 or 1) selects the 128-bit path.
#define NORM_KERNELS(NAME, CENTRE, SUFFIX, T)                                                              \
    extern "C" __global__ void __launch_bounds__(BLOCK_MAX_THREADS, 1) NAME##_##SUFFIX(const T *x, const float *w, const float *b, T *y, float *mean, \
                                               float *rstd, uint64_t rows, uint32_t d, float eps,          \
                                               uint32_t vec) {                                             \
        __shared__ float scratch[32];                                                                      \
        if (vec)                                                                                           \
            forward_rows<T, CENTRE, true>(x, w, b, y, mean, rstd, rows, d, eps, scratch);                  \
        else                                                                                               \
            forward_rows<T, CENTRE, false>(x, w, b, y, mean, rstd, rows, d, eps, scratch);                 \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK_MAX_THREADS, 1) NAME##_backward_##SUFFIX(const T *x, const T *g, const float *w,            \
                                                        const float *mean, const float *rstd, T *dx,       \
                                                        uint64_t rows, uint32_t d, uint32_t vec) {         \
        __shared__ float scratch[32];                                                                      \
        if (vec)                                                                                           \
            backward_rows<T, CENTRE, true>(x, g, w, mean, rstd, dx, rows, d, scratch);                     \
        else                                                                                               \
            backward_rows<T, CENTRE, false>(x, g, w, mean, rstd, dx, rows, d, scratch);                    \
    }

#define NORM_DTYPES(SUFFIX, T)                                                                             \
    NORM_KERNELS(layer_norm, true, SUFFIX, T)                                                              \
    NORM_KERNELS(rms_norm, false, SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(BLOCK_MAX_THREADS, 1) norm_backward_params_##SUFFIX(const T *x, const T *g, const float *mean,    \
                                                             const float *rstd, uint64_t rows, uint32_t d, \
                                                             uint64_t rows_per_chunk, float *dw, float *db) { \
        params<T>(x, g, mean, rstd, rows, d, rows_per_chunk, dw, db);                                      \
    }

NORM_DTYPES(f32, float)
NORM_DTYPES(f16, __half)
NORM_DTYPES(bf16, __nv_bfloat16)
