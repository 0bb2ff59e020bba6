// Flash-decoding: attention of one query token per head over the dense KV cache (src/nn/kv_cache.rs),
// reading the cache's codes in place (f32, f16, or int8 / int4 codes times their f16 group scale,
// decoded in registers exactly as cuda/kvcache.cu's `kv_dequantize`).
//
// Cache layout: codes [capacity, batch, heads, codes_per_row], scales [capacity, batch, heads, d / group]
// (f16 bits); cache row of token t, batch bi, kv head hk = (t * batch + bi) * heads + hk. Int4 rows hold
// ceil(d/2) bytes: element j < ceil(d/2) in the low nibble of byte j, element j ≥ ceil(d/2) in the high
// nibble of byte j − ceil(d/2), each stored code + 8.
//
// Pass 1 (kvattn_split_*): block (bi·heads + hk, split, head slice) takes up to KVA_HEADS query heads of
// kv head hk over one chunk of tokens, so each K and V row is loaded once for the whole group. Per tile
// of KVA_TILE tokens: the warps score the tile (lanes split the row, one warp sum per query head), each
// query head's warp folds the tile into its running max and sum (online softmax, f32), and every thread
// rescales and accumulates the dims it owns. It writes each query head's (max, sum) and unnormalised
// acc[d] to the workspace. Pass 2 (kvattn_combine_*) merges the splits of each query head in split
// order, so the result does not depend on scheduling.
#include "common.cuh"

#define KVA_THREADS 128
#define KVA_WARPS (KVA_THREADS / 32)
#define KVA_TILE 32
#define KVA_HEADS 8
#define KVA_MAX_D 256
// Dims per thread in the V pass and per lane in the K pass.
#define KVA_SLOTS (KVA_MAX_D / KVA_THREADS)
#define KVA_LANE_SLOTS (KVA_MAX_D / 32)
#define KVA_HEADS_PER_WARP (KVA_HEADS / KVA_WARPS)

enum KvaFormat { KVA_F32 = 0, KVA_F16 = 1, KVA_I8 = 2, KVA_I4 = 3 };

// Element j of cache row `row`, decoded to f32.
template <int FMT>
__device__ __forceinline__ float kva_load(const void *__restrict__ codes,
                                          const uint16_t *__restrict__ scales, uint64_t row,
                                          uint32_t j, uint32_t d, uint32_t group) {
    if (FMT == KVA_F32) return ((const float *)codes)[row * d + j];
    if (FMT == KVA_F16) return __half2float(((const __half *)codes)[row * d + j]);
    float s = __half2float(__ushort_as_half(scales[row * (d / group) + j / group]));
    int c;
    if (FMT == KVA_I8) {
        c = ((const int8_t *)codes)[row * d + j];
    } else {
        uint32_t half = (d + 1) / 2;
        uint8_t byte = ((const uint8_t *)codes)[row * half + (j < half ? j : j - half)];
        c = (int)(j < half ? (byte & 15) : (byte >> 4)) - 8;
    }
    return (float)c * s;
}

// q [batch, q_heads, d] (contiguous), `len` cached tokens split into chunks of `chunk` (a multiple of
// KVA_TILE), kv head of query head hq = hq / group_heads. Partial p = (bi·q_heads + hq)·splits + split:
// ml[2p] = running max of its scores (q·k·scale), ml[2p + 1] = Σ exp(score − max), acc[p·d + j] =
// Σ exp(score − max)·v_j.
template <typename T, int FMT>
__device__ __forceinline__ void kvattn_split(const T *__restrict__ q, const void *__restrict__ kc,
                                             const uint16_t *__restrict__ ks,
                                             const void *__restrict__ vc,
                                             const uint16_t *__restrict__ vs,
                                             float *__restrict__ ml, float *__restrict__ acc_out,
                                             uint32_t batch, uint32_t heads, uint32_t q_heads,
                                             uint32_t d, uint32_t group, uint32_t len,
                                             uint32_t chunk, float scale) {
    __shared__ float q_sh[KVA_HEADS][KVA_MAX_D];
    __shared__ float p_sh[KVA_HEADS][KVA_TILE];
    __shared__ float alpha_sh[KVA_HEADS];
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t bi = blockIdx.x / heads, hk = blockIdx.x % heads;
    const uint32_t split = blockIdx.y, splits = gridDim.y;
    const uint32_t group_heads = q_heads / heads;
    const uint32_t g0 = blockIdx.z * KVA_HEADS;
    const uint32_t gb = min((uint32_t)KVA_HEADS, group_heads - g0);
    // Query head of slot g is hk·group_heads + g0 + g; its q row starts at (bi·q_heads + that)·d.
    const uint64_t qrow0 = (uint64_t)bi * q_heads + (uint64_t)hk * group_heads + g0;
    for (uint32_t e = tid; e < KVA_HEADS * KVA_MAX_D; e += KVA_THREADS) {
        uint32_t g = e / KVA_MAX_D, j = e % KVA_MAX_D;
        q_sh[g][j] = g < gb && j < d ? to_f32(q[(qrow0 + g) * d + j]) * scale : 0.f;
    }
    const uint32_t t_begin = split * chunk;
    const uint32_t t_end = min(len, t_begin + chunk);
    float m_run[KVA_HEADS_PER_WARP], l_run[KVA_HEADS_PER_WARP];
#pragma unroll
    for (int i = 0; i < KVA_HEADS_PER_WARP; ++i) {
        m_run[i] = -INFINITY;
        l_run[i] = 0.f;
    }
    float acc[KVA_HEADS][KVA_SLOTS];
#pragma unroll
    for (int g = 0; g < KVA_HEADS; ++g)
#pragma unroll
        for (int k = 0; k < KVA_SLOTS; ++k) acc[g][k] = 0.f;
    __syncthreads();

    for (uint32_t t0 = t_begin; t0 < t_end; t0 += KVA_TILE) {
        const uint32_t tiles = min((uint32_t)KVA_TILE, t_end - t0);
        // Scores: warp w takes tiles w, w + KVA_WARPS, ...; lane holds dims lane + 32k of the key.
        for (uint32_t tt = warp; tt < tiles; tt += KVA_WARPS) {
            const uint64_t row = ((uint64_t)(t0 + tt) * batch + bi) * heads + hk;
            float kv[KVA_LANE_SLOTS];
#pragma unroll
            for (int k = 0; k < KVA_LANE_SLOTS; ++k) {
                uint32_t j = lane + 32 * k;
                kv[k] = j < d ? kva_load<FMT>(kc, ks, row, j, d, group) : 0.f;
            }
#pragma unroll
            for (int g = 0; g < KVA_HEADS; ++g) {
                if (g < (int)gb) {
                    float s = 0.f;
#pragma unroll
                    for (int k = 0; k < KVA_LANE_SLOTS; ++k) s += kv[k] * q_sh[g][lane + 32 * k];
                    s = warp_sum(s);
                    if (lane == 0) p_sh[g][tt] = s;
                }
            }
        }
        __syncthreads();
        // Online softmax: warp w owns query heads w + KVA_WARPS·i, lane = token of the tile.
#pragma unroll
        for (int i = 0; i < KVA_HEADS_PER_WARP; ++i) {
            const uint32_t g = warp + KVA_WARPS * i;
            if (g < gb) {
                float s = lane < tiles ? p_sh[g][lane] : -INFINITY;
                float m_new = fmaxf(m_run[i], warp_max(s));
                // exp(−inf) = 0: the first tile's factor wipes nothing, a finite max always exists.
                float alpha = expf(m_run[i] - m_new);
                float p = lane < tiles ? expf(s - m_new) : 0.f;
                l_run[i] = l_run[i] * alpha + warp_sum(p);
                m_run[i] = m_new;
                p_sh[g][lane] = p;
                if (lane == 0) alpha_sh[g] = alpha;
            }
        }
        __syncthreads();
        // Values: thread owns dims tid + KVA_THREADS·k for every query head of the block.
#pragma unroll
        for (int g = 0; g < KVA_HEADS; ++g) {
            if (g < (int)gb) {
                float a = alpha_sh[g];
#pragma unroll
                for (int k = 0; k < KVA_SLOTS; ++k) acc[g][k] *= a;
            }
        }
        for (uint32_t tt = 0; tt < tiles; ++tt) {
            const uint64_t row = ((uint64_t)(t0 + tt) * batch + bi) * heads + hk;
#pragma unroll
            for (int k = 0; k < KVA_SLOTS; ++k) {
                uint32_t j = tid + KVA_THREADS * k;
                if (j < d) {
                    float v = kva_load<FMT>(vc, vs, row, j, d, group);
#pragma unroll
                    for (int g = 0; g < KVA_HEADS; ++g)
                        if (g < (int)gb) acc[g][k] += p_sh[g][tt] * v;
                }
            }
        }
        // The next tile's scores overwrite p_sh.
        __syncthreads();
    }

    const uint64_t p0 = qrow0 * splits + split;
#pragma unroll
    for (int i = 0; i < KVA_HEADS_PER_WARP; ++i) {
        const uint32_t g = warp + KVA_WARPS * i;
        if (g < gb && lane == 0) {
            uint64_t p = p0 + (uint64_t)g * splits;
            ml[2 * p] = m_run[i];
            ml[2 * p + 1] = l_run[i];
        }
    }
#pragma unroll
    for (int g = 0; g < KVA_HEADS; ++g) {
        if (g < (int)gb) {
            uint64_t p = p0 + (uint64_t)g * splits;
#pragma unroll
            for (int k = 0; k < KVA_SLOTS; ++k) {
                uint32_t j = tid + KVA_THREADS * k;
                if (j < d) acc_out[p * d + j] = acc[g][k];
            }
        }
    }
}

#define KVATTN_SPLIT(NAME, T, FMT)                                                                 \
    extern "C" __global__ void __launch_bounds__(KVA_THREADS, 4)                                 \
        NAME(const T *q, const void *kc, const uint16_t *ks, const void *vc, const uint16_t *vs,   \
             float *ml, float *acc, uint32_t batch, uint32_t heads, uint32_t q_heads, uint32_t d,  \
             uint32_t group, uint32_t len, uint32_t chunk, float scale) {                          \
        kvattn_split<T, FMT>(q, kc, ks, vc, vs, ml, acc, batch, heads, q_heads, d, group, len,     \
                             chunk, scale);                                                        \
    }

KVATTN_SPLIT(kvattn_split_f32_f32, float, KVA_F32)
KVATTN_SPLIT(kvattn_split_f32_f16, __half, KVA_F32)
KVATTN_SPLIT(kvattn_split_f32_bf16, __nv_bfloat16, KVA_F32)
KVATTN_SPLIT(kvattn_split_f16_f32, float, KVA_F16)
KVATTN_SPLIT(kvattn_split_f16_f16, __half, KVA_F16)
KVATTN_SPLIT(kvattn_split_f16_bf16, __nv_bfloat16, KVA_F16)
KVATTN_SPLIT(kvattn_split_i8_f32, float, KVA_I8)
KVATTN_SPLIT(kvattn_split_i8_f16, __half, KVA_I8)
KVATTN_SPLIT(kvattn_split_i8_bf16, __nv_bfloat16, KVA_I8)
KVATTN_SPLIT(kvattn_split_i4_f32, float, KVA_I4)
KVATTN_SPLIT(kvattn_split_i4_f16, __half, KVA_I4)
KVATTN_SPLIT(kvattn_split_i4_bf16, __nv_bfloat16, KVA_I4)

// Block r (= bi·q_heads + hq) merges partials r·splits .. r·splits + splits − 1 in that order into
// out [rows, d]: out_j = Σ_s acc_s,j·exp(m_s − M) / Σ_s l_s·exp(m_s − M), M = max_s m_s.
template <typename T>
__device__ __forceinline__ void kvattn_combine(const float *__restrict__ ml,
                                               const float *__restrict__ acc, T *__restrict__ out,
                                               uint32_t d, uint32_t splits) {
    const uint64_t r = blockIdx.x, p0 = r * splits;
    float m = -INFINITY;
    for (uint32_t s = 0; s < splits; ++s) m = fmaxf(m, ml[2 * (p0 + s)]);
    float l = 0.f;
    for (uint32_t s = 0; s < splits; ++s) l += ml[2 * (p0 + s) + 1] * expf(ml[2 * (p0 + s)] - m);
    const float inv = 1.f / l;
    for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
        float o = 0.f;
        for (uint32_t s = 0; s < splits; ++s)
            o += acc[(p0 + s) * d + j] * expf(ml[2 * (p0 + s)] - m);
        out[r * d + j] = from_f32<T>(o * inv);
    }
}

#define KVATTN_COMBINE(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const float *ml, const float *acc, T *out, uint32_t d,         \
                                    uint32_t splits) {                                             \
        kvattn_combine<T>(ml, acc, out, d, splits);                                                \
    }

KVATTN_COMBINE(kvattn_combine_f32, float)
KVATTN_COMBINE(kvattn_combine_f16, __half)
KVATTN_COMBINE(kvattn_combine_bf16, __nv_bfloat16)
