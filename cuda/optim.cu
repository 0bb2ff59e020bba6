// Fused optimizer updates, in place on f32 parameters and state, reading the gradient (any float dtype)
// through its view. Every product, quotient and sum is rounded on its own (__f*_rn: no FMA contraction)
// in the CPU twin's order, so an f32 step matches src/optim bit for bit. The dense path moves four
// elements per thread with 128-bit loads of p and the state, so the update runs at memory bandwidth.
#include "common.cuh"

// Four gradient elements as one load (16 bytes for f32, 8 for f16/bf16).
template <typename T> __device__ __forceinline__ void load4(const T *p, float (&g)[4]) {
    if constexpr (sizeof(T) == 4) {
        float4 q = *reinterpret_cast<const float4 *>(p);
        g[0] = q.x;
        g[1] = q.y;
        g[2] = q.z;
        g[3] = q.w;
    } else {
        uint2 q = *reinterpret_cast<const uint2 *>(p);
        T e[4];
        memcpy(e, &q, sizeof(q));
#pragma unroll
        for (int k = 0; k < 4; ++k) g[k] = to_f32(e[k]);
    }
}

__device__ __forceinline__ bool aligned16(const void *p) { return (uintptr_t)p % 16 == 0; }

// Runs f(p, s1, s2, g) on each of the n elements, four at a time where the gradient is dense and every
// pointer is aligned for it; s2 may be null (SGD has one state tensor). `gs` is the gradient's view,
// `g` the address its offsets count from.
template <typename T, typename F>
__device__ __forceinline__ void for_each_param(float *__restrict__ p, float *__restrict__ s1,
                                               float *__restrict__ s2, const T *__restrict__ g,
                                               const Strided &gs, uint64_t n, F f) {
    const T *gd = g + gs.offset;
    bool dense = strided_dense(gs);
    uint64_t done = 0;
    if (dense && aligned16(p) && aligned16(s1) && (s2 == nullptr || aligned16(s2)) &&
        (uintptr_t)gd % (4 * sizeof(T)) == 0) {
        uint64_t quads = n / 4;
        GRID_STRIDE_LOOP(q, quads) {
            float4 pv = reinterpret_cast<float4 *>(p)[q];
            float4 av = reinterpret_cast<float4 *>(s1)[q];
            float4 bv = s2 ? reinterpret_cast<float4 *>(s2)[q] : float4{};
            float gv[4];
            load4(gd + 4 * q, gv);
            f(pv.x, av.x, bv.x, gv[0]);
            f(pv.y, av.y, bv.y, gv[1]);
            f(pv.z, av.z, bv.z, gv[2]);
            f(pv.w, av.w, bv.w, gv[3]);
            reinterpret_cast<float4 *>(p)[q] = pv;
            reinterpret_cast<float4 *>(s1)[q] = av;
            if (s2) reinterpret_cast<float4 *>(s2)[q] = bv;
        }
        done = quads * 4;
    }
    GRID_STRIDE_LOOP(k, n - done) {
        uint64_t i = done + k;
        float gi = to_f32(dense ? gd[i] : g[strided_offset(gs, i)]);
        float b = s2 ? s2[i] : 0.f;
        f(p[i], s1[i], b, gi);
        if (s2) s2[i] = b;
    }
}

// p ← p·decay − step·m / (√(v / bc2) + eps) after m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g·g, with
// decay = 1 − lr·wd and step = lr / bc1 computed on the host exactly as src/optim/adamw.rs does.
struct AdamW {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, bc2, eps, decay, step;
    __device__ __forceinline__ void operator()(float &p, float &m, float &v, float g) const {
        m = __fadd_rn(__fmul_rn(beta1, m), __fmul_rn(one_minus_beta1, g));
        v = __fadd_rn(__fmul_rn(beta2, v), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        float denom = __fadd_rn(__fsqrt_rn(__fdiv_rn(v, bc2)), eps);
        p = __fsub_rn(__fmul_rn(p, decay), __fdiv_rn(__fmul_rn(step, m), denom));
    }
};

// g' = g + wd·p; b ← μ·b + g'; p ← p − lr·(nesterov ? g' + μ·b : b) (torch.optim.SGD, dampening 0).
struct Sgd {
    float lr, momentum, weight_decay;
    uint32_t nesterov;
    __device__ __forceinline__ void operator()(float &p, float &b, float &, float g) const {
        float gw = __fadd_rn(g, __fmul_rn(weight_decay, p));
        b = __fadd_rn(__fmul_rn(momentum, b), gw);
        float d = nesterov ? __fadd_rn(gw, __fmul_rn(momentum, b)) : b;
        p = __fsub_rn(p, __fmul_rn(lr, d));
    }
};

// The gradient views are __grid_constant__ so strided_offset reads them in place rather than from a
// per-thread copy in local memory.
#define ADAMW(NAME, T)                                                                             \
    extern "C" __global__ void adamw_##NAME(float *p, float *m, float *v, const T *g,              \
                                            const __grid_constant__ Strided gs, uint64_t n,        \
                                            float beta1, float one_minus_beta1, float beta2,       \
                                            float one_minus_beta2, float bc2, float eps,           \
                                            float decay, float step) {                             \
        AdamW f = {beta1, one_minus_beta1, beta2, one_minus_beta2, bc2, eps, decay, step};         \
        for_each_param<T>(p, m, v, g, gs, n, f);                                                   \
    }

ADAMW(f32, float)
ADAMW(f16, __half)
ADAMW(bf16, __nv_bfloat16)

#define SGD(NAME, T)                                                                               \
    extern "C" __global__ void sgd_##NAME(float *p, float *buf, const T *g,                        \
                                          const __grid_constant__ Strided gs, uint64_t n,          \
                                          float lr, float momentum, float weight_decay,            \
                                          uint32_t nesterov) {                                     \
        Sgd f = {lr, momentum, weight_decay, nesterov};                                            \
        for_each_param<T>(p, buf, nullptr, g, gs, n, f);                                           \
    }

SGD(f32, float)
SGD(f16, __half)
SGD(bf16, __nv_bfloat16)
