// Elementwise kernels (launchers in src/cuda/elementwise.rs): unary maps, binary ops, comparisons and
// where over strided views of one shape, writing a contiguous output. Each kernel has a dense path (every
// view one contiguous run: 16-byte vector loads and stores when the pointers allow) and a strided path.
// Float math mirrors the CPU twin (src/cpu/elementwise.rs) formula for formula: f32 throughout, rounded
// once on store, with products that feed a sum written as __fmul_rn/__fadd_rn so that nvcc cannot fuse
// them into an FMA the CPU does not do (Rust never contracts).
#include "walk.cuh"

// ---- Walking several views (map1 is in walk.cuh) -----------------------------------------------

// map1 for K views of one shape: the dense vector loop covers whole packs when every pointer is aligned
// for them; one scalar loop covers the rest. `op` is applied to arrays of V (or 1) elements, so an op's
// switch runs once per pack, not per element.

template <typename A, typename O, typename F>
__device__ __forceinline__ void map2(const A *__restrict__ a, const Strided &sa, const A *__restrict__ b,
                                     const Strided &sb, O *__restrict__ y, uint64_t n, const F &op) {
    constexpr int V = Lanes<A, O>::V;
    bool dense = strided_dense(sa) && strided_dense(sb), small = n <= 0xffffffffull;
    uint64_t done = 0;
    if (dense && aligned_for<Pack<A, V>>(a + sa.offset) && aligned_for<Pack<A, V>>(b + sb.offset) &&
        aligned_for<Pack<O, V>>(y)) {
        const Pack<A, V> *pa = reinterpret_cast<const Pack<A, V> *>(a + sa.offset);
        const Pack<A, V> *pb = reinterpret_cast<const Pack<A, V> *>(b + sb.offset);
        Pack<O, V> *py = reinterpret_cast<Pack<O, V> *>(y);
        uint64_t nv = n / V;
        GRID_STRIDE_LOOP(j, nv) {
            Pack<A, V> va = pa[j], vb = pb[j];
            Pack<O, V> vo;
            op(va.v, vb.v, vo.v);
            py[j] = vo;
        }
        done = nv * V;
    }
    GRID_STRIDE_LOOP(k, n - done) {
        uint64_t j = done + k;
        uint64_t oa = sa.offset + j, ob = sb.offset + j;
        if (!dense) {
            Index x = small ? unravel(sa, (uint32_t)j) : unravel(sa, j);
            oa = offset_of(sa, x);
            ob = offset_of(sb, x);
        }
        A va[1] = {a[oa]}, vb[1] = {b[ob]};
        O vo[1];
        op(va, vb, vo);
        y[j] = vo[0];
    }
}

template <typename M, typename B, typename F>
__device__ __forceinline__ void map3(const M *__restrict__ m, const Strided &sm, const B *__restrict__ t,
                                     const Strided &st, const B *__restrict__ f, const Strided &sf,
                                     B *__restrict__ y, uint64_t n, const F &op) {
    constexpr int V = Lanes<M, B>::V;
    bool dense = strided_dense(sm) && strided_dense(st) && strided_dense(sf), small = n <= 0xffffffffull;
    uint64_t done = 0;
    if (dense && aligned_for<Pack<M, V>>(m + sm.offset) && aligned_for<Pack<B, V>>(t + st.offset) &&
        aligned_for<Pack<B, V>>(f + sf.offset) && aligned_for<Pack<B, V>>(y)) {
        const Pack<M, V> *pm = reinterpret_cast<const Pack<M, V> *>(m + sm.offset);
        const Pack<B, V> *pt = reinterpret_cast<const Pack<B, V> *>(t + st.offset);
        const Pack<B, V> *pf = reinterpret_cast<const Pack<B, V> *>(f + sf.offset);
        Pack<B, V> *py = reinterpret_cast<Pack<B, V> *>(y);
        uint64_t nv = n / V;
        GRID_STRIDE_LOOP(j, nv) {
            Pack<M, V> vm = pm[j];
            Pack<B, V> vt = pt[j], vf = pf[j], vo;
            op(vm.v, vt.v, vf.v, vo.v);
            py[j] = vo;
        }
        done = nv * V;
    }
    GRID_STRIDE_LOOP(k, n - done) {
        uint64_t j = done + k;
        uint64_t om = sm.offset + j, ot = st.offset + j, of = sf.offset + j;
        if (!dense) {
            Index x = small ? unravel(sm, (uint32_t)j) : unravel(sm, j);
            om = offset_of(sm, x);
            ot = offset_of(st, x);
            of = offset_of(sf, x);
        }
        M vm[1] = {m[om]};
        B vt[1] = {t[ot]}, vf[1] = {f[of]}, vo[1];
        op(vm, vt, vf, vo);
        y[j] = vo[0];
    }
}

// ---- Unary ops ------------------------------------------------------------------------------------

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_C 0.044715f
#define FRAC_1_SQRT_2 0.70710678118654752440f

// The CPU's erf (src/cpu/elementwise.rs `erf_f64`, Numerical Recipes' erfcc evaluated in f64), not
// erff: gelu's 1 + erf(x) cancels for negative x, so only the same f32 erf value reproduces the CPU's
// result there. Not inlined: the f64 exp is long and three ops use it at every pack width.
__device__ __noinline__ float cpu_erf(float xf) {
    double x = (double)xf;
    double z = fabs(x);
    double t = 1.0 / (1.0 + 0.5 * z);
    double r =
        t * exp(-z * z - 1.26551223 +
                t * (1.00002368 +
                     t * (0.37409196 +
                          t * (0.09678418 +
                               t * (-0.18628806 +
                                    t * (0.27886807 +
                                         t * (-1.13520398 +
                                              t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
    return (float)(x >= 0.0 ? 1.0 - r : r - 1.0);
}

// Not inlined: powf's expansion is long and would be repeated at every pack width.
__device__ __noinline__ float pow_f(float x, float p) { return powf(x, p); }

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float gelu_tanh_inner(float x) {
    return mul(SQRT_2_OVER_PI, add(x, mul(mul(mul(GELU_C, x), x), x)));
}

__device__ __forceinline__ float gelu_erf(float x) {
    return mul(mul(0.5f, x), add(1.f, cpu_erf(mul(x, FRAC_1_SQRT_2))));
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return mul(mul(0.5f, x), add(1.f, tanhf(gelu_tanh_inner(x))));
}

__device__ __forceinline__ float gelu_erf_grad(float x) {
    float cdf = mul(0.5f, add(1.f, cpu_erf(mul(x, FRAC_1_SQRT_2))));
    float pdf = mul(expf(mul(mul(-0.5f, x), x)), 0.3989423f);
    return add(cdf, mul(x, pdf));
}

__device__ __forceinline__ float gelu_tanh_grad(float x) {
    float t = tanhf(gelu_tanh_inner(x));
    float dinner = mul(SQRT_2_OVER_PI, add(1.f, mul(mul(mul(3.f, GELU_C), x), x)));
    return add(mul(0.5f, add(1.f, t)), mul(mul(mul(0.5f, x), sub(1.f, mul(t, t))), dinner));
}

__device__ __forceinline__ float silu_grad(float x) {
    float s = sigmoid(x);
    return mul(s, add(1.f, mul(x, sub(1.f, s))));
}

// (code, f(v)) for every unary op, with the op's parameters as p0 and p1. The codes are the table
// `unary_code` in src/cuda/elementwise.rs sends; keep the two in sync.
#define UNARY_OPS(X)                                                                                \
    X(0, -v)                                  /* Neg */                                             \
    X(1, expf(v))                             /* Exp */                                             \
    X(2, logf(v))                             /* Log */                                             \
    X(3, sqrtf(v))                            /* Sqrt */                                            \
    X(4, 1.f / sqrtf(v))                      /* Rsqrt: rounded as the CPU's, not rsqrtf */         \
    X(5, tanhf(v))                            /* Tanh */                                            \
    X(6, sigmoid(v))                          /* Sigmoid */                                         \
    X(7, fmaxf(v, 0.f))                       /* Relu: NaN gives 0, as f32::max */                  \
    X(8, gelu_erf(v))                         /* GeluErf */                                         \
    X(9, gelu_tanh(v))                        /* GeluTanh */                                        \
    X(10, v / (1.f + expf(-v)))               /* Silu, the CPU's vector-kernel form */              \
    X(11, fabsf(v))                           /* Abs */                                             \
    X(12, v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f)) /* Sign: 0 for ±0 and NaN */                      \
    X(13, rintf(v))                           /* Round: half to even */                             \
    X(14, v * v)                              /* Sqr */                                             \
    X(15, 1.f / v)                            /* Recip */                                           \
    X(16, cpu_erf(v))                         /* Erf */                                             \
    X(17, pow_f(v, p0))                       /* Powf(p) */                                         \
    X(18, fminf(fmaxf(v, p0), p1))            /* Clamp(lo, hi): NaN gives min(lo, hi) */            \
    X(19, add(mul(v, p0), p1))                /* Affine(mul, add), unfused */                       \
    X(20, gelu_erf_grad(v))                   /* GeluErfGrad */                                     \
    X(21, gelu_tanh_grad(v))                  /* GeluTanhGrad */                                    \
    X(22, silu_grad(v))                       /* SiluGrad */                                        \
    X(23, (v >= p0 && v <= p1) ? 1.f : 0.f)   /* InRange(lo, hi), inclusive */

template <typename T> struct Unary {
    uint32_t code;
    float p0, p1;
    template <int V> __device__ __forceinline__ void operator()(const T (&x)[V], T (&y)[V]) const {
        switch (code) {
#define UNARY_CASE(c, expr)                                                                         \
    case c:                                                                                         \
        _Pragma("unroll") for (int k = 0; k < V; ++k) {                                             \
            float v = to_f32(x[k]);                                                                 \
            y[k] = from_f32<T>(expr);                                                               \
        }                                                                                           \
        break;
            UNARY_OPS(UNARY_CASE)
#undef UNARY_CASE
        }
    }
};

#define UNARY(name, T)                                                                              \
    extern "C" __global__ void name(const T *__restrict__ x, Strided sx, T *__restrict__ y, uint64_t n, \
                                    uint32_t code, float p0, float p1) {                            \
        map1(x, sx, y, n, Unary<T>{code, p0, p1});                                                  \
    }
UNARY(unary_f32, float)
UNARY(unary_f16, __half)
UNARY(unary_bf16, __nv_bfloat16)

// ---- Binary ops -----------------------------------------------------------------------------------

// The codes are `binary_code` in src/cuda/elementwise.rs; keep the two in sync.
#define BINARY_OPS(X)                                                                               \
    X(0, u + v)       /* Add */                                                                     \
    X(1, u - v)       /* Sub */                                                                     \
    X(2, u * v)       /* Mul */                                                                     \
    X(3, u / v)       /* Div */                                                                     \
    X(4, fmaxf(u, v)) /* Maximum: the non-NaN operand wins, as f32::max */                          \
    X(5, fminf(u, v)) /* Minimum */

template <typename T> struct Binary {
    uint32_t code;
    template <int V>
    __device__ __forceinline__ void operator()(const T (&a)[V], const T (&b)[V], T (&y)[V]) const {
        switch (code) {
#define BINARY_CASE(c, expr)                                                                        \
    case c:                                                                                         \
        _Pragma("unroll") for (int k = 0; k < V; ++k) {                                             \
            float u = to_f32(a[k]), v = to_f32(b[k]);                                               \
            y[k] = from_f32<T>(expr);                                                               \
        }                                                                                           \
        break;
            BINARY_OPS(BINARY_CASE)
#undef BINARY_CASE
        }
    }
};

#define BINARY(name, T)                                                                             \
    extern "C" __global__ void name(const T *__restrict__ a, Strided sa, const T *__restrict__ b,   \
                                    Strided sb, T *__restrict__ y, uint64_t n, uint32_t code) {     \
        map2(a, sa, b, sb, y, n, Binary<T>{code});                                                  \
    }
BINARY(binary_f32, float)
BINARY(binary_f16, __half)
BINARY(binary_bf16, __nv_bfloat16)

// ---- Comparisons ----------------------------------------------------------------------------------

// The codes are `compare_code` in src/cuda/elementwise.rs; keep the two in sync. Values compare as f32,
// as on the CPU (i32 beyond 2^24 compares after rounding; NaN is unequal to everything).
#define COMPARE_OPS(X)                                                                              \
    X(0, u == v) /* Eq */                                                                           \
    X(1, u != v) /* Ne */                                                                           \
    X(2, u < v)  /* Lt */                                                                           \
    X(3, u <= v) /* Le */                                                                           \
    X(4, u > v)  /* Gt */                                                                           \
    X(5, u >= v) /* Ge */

template <typename T> struct Compare {
    uint32_t code;
    template <int V>
    __device__ __forceinline__ void operator()(const T (&a)[V], const T (&b)[V], uint8_t (&y)[V]) const {
        switch (code) {
#define COMPARE_CASE(c, expr)                                                                       \
    case c:                                                                                         \
        _Pragma("unroll") for (int k = 0; k < V; ++k) {                                             \
            float u = widen(a[k]), v = widen(b[k]);                                                 \
            y[k] = (expr) ? 1 : 0;                                                                  \
        }                                                                                           \
        break;
            COMPARE_OPS(COMPARE_CASE)
#undef COMPARE_CASE
        }
    }
};

#define COMPARE(name, T)                                                                            \
    extern "C" __global__ void name(const T *__restrict__ a, Strided sa, const T *__restrict__ b,   \
                                    Strided sb, uint8_t *__restrict__ y, uint64_t n, uint32_t code) { \
        map2(a, sa, b, sb, y, n, Compare<T>{code});                                                 \
    }
COMPARE(compare_f32, float)
COMPARE(compare_f16, __half)
COMPARE(compare_bf16, __nv_bfloat16)
COMPARE(compare_i32, int32_t)
COMPARE(compare_i8, int8_t)
COMPARE(compare_u8, uint8_t)

// ---- Where ----------------------------------------------------------------------------------------

// The values move as bit patterns; the mask is true when it is != 0 as f32 (NaN selects t, -0.0 f).
struct Pick {
    template <typename M, typename B, int V>
    __device__ __forceinline__ void operator()(const M (&m)[V], const B (&t)[V], const B (&f)[V],
                                               B (&y)[V]) const {
#pragma unroll
        for (int k = 0; k < V; ++k) y[k] = widen(m[k]) != 0.f ? t[k] : f[k];
    }
};

// where_<mask dtype>_b<value bits>
#define WHERE(name, M, B)                                                                           \
    extern "C" __global__ void name(const M *__restrict__ m, Strided sm, const B *__restrict__ t,   \
                                    Strided st, const B *__restrict__ f, Strided sf,                \
                                    B *__restrict__ y, uint64_t n) {                                \
        map3(m, sm, t, st, f, sf, y, n, Pick{});                                                    \
    }
#define WHERE_ALL(mname, M)                                                                         \
    WHERE(where_##mname##_b8, M, uint8_t)                                                           \
    WHERE(where_##mname##_b16, M, uint16_t)                                                         \
    WHERE(where_##mname##_b32, M, uint32_t)
WHERE_ALL(f32, float)
WHERE_ALL(f16, __half)
WHERE_ALL(bf16, __nv_bfloat16)
WHERE_ALL(i32, int32_t)
WHERE_ALL(i8, int8_t)
WHERE_ALL(u8, uint8_t)
