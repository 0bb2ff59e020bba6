// Cross-entropy over rows of logits [rows, v] with integer targets (-1 = ignored): the forward pass
// computes each row's log-sum-exp in one read of the row (an online max and rescaled sum) and its loss
// term; a one-block kernel then sums the terms in a fixed order (deterministic, no float atomics). The
// backward pass writes (softmax - onehot) * grad / kept from the saved log-sum-exp.
//
// Rows are handled by a team of threads: a warp per row when rows are short (warp_rows = 1, several rows
// per block), the whole block per row otherwise. Either way the row loop is uniform within the team.
#include "common.cuh"

struct Team {
    uint32_t lane, size;
    uint64_t first, step;
};

__device__ __forceinline__ Team row_team(uint32_t warp_rows) {
    if (warp_rows) {
        uint32_t per_block = blockDim.x >> 5;
        return {threadIdx.x & 31, 32, (uint64_t)blockIdx.x * per_block + (threadIdx.x >> 5),
                (uint64_t)gridDim.x * per_block};
    }
    return {threadIdx.x, blockDim.x, blockIdx.x, gridDim.x};
}

// N = 16 / sizeof(T) elements of a row, as one 128-bit load.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T *p, float (&x)[N]) {
    uint4 raw = *reinterpret_cast<const uint4 *>(p);
    T e[N];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = to_f32(e[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T *p, const float (&y)[N]) {
    T e[N];
#pragma unroll
    for (int k = 0; k < N; ++k) e[k] = from_f32<T>(y[k]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4 *>(p) = raw;
}

// A running log-sum-exp: m is the max of the non-NaN values seen, s = Σ exp(x - m) over the finite-or-inf
// ones, nan whether a NaN was seen. lse_finish then applies the CPU twin's rules (logsumexp_row): an
// all -inf (or empty) row gives -inf even when it holds NaNs, since its max ignores NaN and it returns
// early; otherwise a NaN, or a +inf max (whose exp(inf - inf) is NaN there), gives NaN.
struct Lse {
    float m, s;
    int nan;
};

template <int N> __device__ __forceinline__ void lse_push(Lse &a, const float (&x)[N]) {
    float m = a.m;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        m = x[k] > m ? x[k] : m;
        a.nan |= x[k] != x[k];
    }
    if (m > a.m) {
        a.s *= expf(a.m - m);
        a.m = m;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
        if (x[k] > -INFINITY) a.s += expf(x[k] - a.m);
    }
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
    float m = fmaxf(a.m, b.m);
    float s = 0.f;
    if (a.m > -INFINITY) s += a.s * expf(a.m - m);
    if (b.m > -INFINITY) s += b.s * expf(b.m - m);
    return {m, s, a.nan | b.nan};
}

__device__ __forceinline__ Lse lse_warp(Lse a) {
    for (int o = 16; o > 0; o >>= 1) {
        Lse b = {__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o),
                 __shfl_xor_sync(0xffffffffu, a.nan, o)};
        a = lse_merge(a, b);
    }
    return a;
}

// Over the block; every thread gets the result. Ends with a barrier so `scratch` can be reused.
__device__ __forceinline__ Lse lse_block(Lse a, Lse *scratch) {
    uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = lse_warp(a);
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    a = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : Lse{-INFINITY, 0.f, 0};
    if (warp == 0) {
        a = lse_warp(a);
        if (lane == 0) scratch[0] = a;
    }
    __syncthreads();
    a = scratch[0];
    __syncthreads();
    return a;
}

__device__ __forceinline__ float lse_finish(const Lse &a) {
    if (a.m == -INFINITY) return -INFINITY;
    if (a.nan || a.m == INFINITY) return __int_as_float(0x7fc00000);
    return a.m + logf(a.s);
}

// This thread's share of a row's log-sum-exp: 128-bit loads when the row starts 16-byte aligned.
template <typename T>
__device__ __forceinline__ Lse row_lse(const T *row, uint64_t v, uint32_t lane, uint32_t team) {
    constexpr int N = 16 / sizeof(T);
    Lse a = {-INFINITY, 0.f, 0};
    uint64_t done = 0;
    if ((uintptr_t)row % 16 == 0) {
        uint64_t nv = v / N;
        for (uint64_t q = lane; q < nv; q += team) {
            float x[N];
            load_vec<T, N>(row + q * N, x);
            lse_push(a, x);
        }
        done = nv * N;
    }
    for (uint64_t c = done + lane; c < v; c += team) {
        float x[1] = {to_f32(row[c])};
        lse_push(a, x);
    }
    return a;
}

// lse[r] = log Σ exp(x[r, :]); nll[r] = lse[r] - x[r, t] for a kept row (target t >= 0), 0 otherwise.
template <typename T>
__device__ __forceinline__ void ce_rows(const T *__restrict__ x, const int32_t *__restrict__ targets,
                                        float *__restrict__ lse, float *__restrict__ nll,
                                        uint64_t rows, uint64_t v, uint32_t warp_rows) {
    __shared__ Lse scratch[32];
    Team tm = row_team(warp_rows);
    for (uint64_t r = tm.first; r < rows; r += tm.step) {
        const T *row = x + r * v;
        Lse a = row_lse(row, v, tm.lane, tm.size);
        a = warp_rows ? lse_warp(a) : lse_block(a, scratch);
        if (tm.lane == 0) {
            float l = lse_finish(a);
            int32_t t = targets[r];
            lse[r] = l;
            nll[r] = t >= 0 ? l - to_f32(row[t]) : 0.f;
        }
    }
}

#define CE_FORWARD(NAME, T)                                                                        \
    extern "C" __global__ void cross_entropy_rows_##NAME(const T *x, const int32_t *targets,        \
                                                         float *lse, float *nll, uint64_t rows,     \
                                                         uint64_t v, uint32_t warp_rows) {          \
        ce_rows<T>(x, targets, lse, nll, rows, v, warp_rows);                                      \
    }

CE_FORWARD(f32, float)
CE_FORWARD(f16, __half)
CE_FORWARD(bf16, __nv_bfloat16)

// loss[0] = Σ nll / kept (0 when kept == 0), summed in f64 like the CPU twin. One block; each thread
// adds a fixed stride of rows and the tree below is fixed, so the result does not vary between runs.
template <typename T>
__device__ __forceinline__ void ce_mean(const float *__restrict__ nll, T *loss, uint64_t rows,
                                        uint64_t kept) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (uint64_t r = threadIdx.x; r < rows; r += blockDim.x) acc += (double)nll[r];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (blockDim.x >> 5) ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) loss[0] = from_f32<T>(kept == 0 ? 0.f : (float)(acc / (double)kept));
    }
}

#define CE_MEAN(NAME, T)                                                                           \
    extern "C" __global__ void cross_entropy_mean_##NAME(const float *nll, T *loss, uint64_t rows,  \
                                                         uint64_t kept) {                          \
        ce_mean<T>(nll, loss, rows, kept);                                                         \
    }

CE_MEAN(f32, float)
CE_MEAN(f16, __half)
CE_MEAN(bf16, __nv_bfloat16)

// The upstream gradient's one element, in whichever float dtype the loss has (0 f32, 1 f16, 2 bf16).
__device__ __forceinline__ float read_grad(const void *grad, uint32_t grad_dtype) {
    if (grad_dtype == 1) return to_f32(*(const __half *)grad);
    if (grad_dtype == 2) return to_f32(*(const __nv_bfloat16 *)grad);
    return *(const float *)grad;
}

// out[r, c] = exp(x[r, c] - lse[r]) * scale (minus scale at c = target) for kept rows, 0 for ignored rows,
// with scale = grad / kept. Rounded step by step in the CPU twin's order.
template <typename T>
__device__ __forceinline__ void ce_backward(const T *__restrict__ x, T *__restrict__ out,
                                            const int32_t *__restrict__ targets,
                                            const float *__restrict__ lse, const void *grad,
                                            uint32_t grad_dtype, float kept, uint64_t rows,
                                            uint64_t v, uint32_t warp_rows) {
    constexpr int N = 16 / sizeof(T);
    float scale = __fdiv_rn(read_grad(grad, grad_dtype), kept);
    Team tm = row_team(warp_rows);
    for (uint64_t r = tm.first; r < rows; r += tm.step) {
        int64_t t = targets[r];
        float l = lse[r];
        const T *xr = x + r * v;
        T *o = out + r * v;
        auto grad_at = [&](uint64_t c, float xv) {
            float y = __fmul_rn(expf(xv - l), scale);
            return (int64_t)c == t ? __fsub_rn(y, scale) : y;
        };
        uint64_t done = 0;
        if ((uintptr_t)xr % 16 == 0 && (uintptr_t)o % 16 == 0) {
            uint64_t nv = v / N;
            for (uint64_t q = tm.lane; q < nv; q += tm.size) {
                float y[N];
                if (t >= 0) {
                    load_vec<T, N>(xr + q * N, y);
#pragma unroll
                    for (int k = 0; k < N; ++k) y[k] = grad_at(q * N + k, y[k]);
                } else {
#pragma unroll
                    for (int k = 0; k < N; ++k) y[k] = 0.f;
                }
                store_vec<T, N>(o + q * N, y);
            }
            done = nv * N;
        }
        for (uint64_t c = done + tm.lane; c < v; c += tm.size) {
            o[c] = from_f32<T>(t >= 0 ? grad_at(c, to_f32(xr[c])) : 0.f);
        }
    }
}

#define CE_BACKWARD(NAME, T)                                                                       \
    extern "C" __global__ void cross_entropy_backward_##NAME(                                      \
        const T *x, T *out, const int32_t *targets, const float *lse, const void *grad,           \
        uint32_t grad_dtype, float kept, uint64_t rows, uint64_t v, uint32_t warp_rows) {          \
        ce_backward<T>(x, out, targets, lse, grad, grad_dtype, kept, rows, v, warp_rows);          \
    }

CE_BACKWARD(f32, float)
CE_BACKWARD(f16, __half)
CE_BACKWARD(bf16, __nv_bfloat16)
