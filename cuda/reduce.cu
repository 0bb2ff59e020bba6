// Row reductions (sum, max, min) and arg reductions (argmax, argmin) of a view whose row-major walk is
// rows x r. Launched by src/cuda/reduce.rs, which picks one of three kernels per op and dtype:
//   <op>_<dtype>         a warp or a block per segment (a row, or a chunk of a long row), walking the row
//                        with 128-bit loads when its elements are contiguous;
//   <op>_cols_<dtype>    a thread per (row, chunk) when neighbouring rows are neighbours in memory (sums
//                        over leading dims), or when rows are so short that a warp per row would idle;
//   <op>_finish_<dtype>  a warp per row folding the f32 partials [rows, chunks] of the two above.
// Split rows go through partials and a second launch rather than atomics, so results are deterministic.
#include "common.cuh"

// argmax/argmin also take integer tensors; the CPU widens them to f32 the same way before comparing.
__device__ __forceinline__ float to_f32(int32_t x) { return (float)x; }
__device__ __forceinline__ float to_f32(int8_t x) { return (float)x; }
__device__ __forceinline__ float to_f32(uint8_t x) { return (float)x; }

#define FULL_MASK 0xffffffffu

// Reducers: the running state S of one thread, how an element (value v at row position k) enters it, how
// two states merge (in any order: every merge here is commutative and associative, or deterministic for
// sums), and how a state is written out or kept as a partial.
struct SumR {
    typedef float S;
    static __device__ __forceinline__ S init() { return 0.f; }
    static __device__ __forceinline__ S add(S s, float v, uint64_t) { return s + v; }
    static __device__ __forceinline__ S merge(S a, S b) { return a + b; }
    static __device__ __forceinline__ S shfl(S s, int o) { return __shfl_xor_sync(FULL_MASK, s, o); }
    template <typename T> static __device__ __forceinline__ void put(void *out, uint64_t row, S s) {
        static_cast<T *>(out)[row] = from_f32<T>(s);
    }
    static __device__ __forceinline__ void put_part(float *pv, int32_t *, uint64_t i, S s) { pv[i] = s; }
    static __device__ __forceinline__ S get_part(const float *pv, const int32_t *, uint64_t i) { return pv[i]; }
};

// Max and min skip NaN (fmaxf/fminf return the other operand), as the CPU's do: a row of NaN gives the
// identity, -inf for max and +inf for min.
struct MaxR : SumR {
    static __device__ __forceinline__ S init() { return -INFINITY; }
    static __device__ __forceinline__ S add(S s, float v, uint64_t) { return fmaxf(s, v); }
    static __device__ __forceinline__ S merge(S a, S b) { return fmaxf(a, b); }
};

struct MinR : SumR {
    static __device__ __forceinline__ S init() { return INFINITY; }
    static __device__ __forceinline__ S add(S s, float v, uint64_t) { return fminf(s, v); }
    static __device__ __forceinline__ S merge(S a, S b) { return fminf(a, b); }
};

struct ArgV {
    float v;
    int32_t i;
};

// The CPU scans a row keeping the first element that beats the best so far (`v > best`), so NaN never
// wins, ties keep the lower index, and a NaN at index 0 is never beaten (every comparison with it is
// false). As a total order: NaN at index 0 becomes +inf for argmax (-inf for argmin), which beats every
// other element because ties go to the lower index; any other NaN loses to everything.
template <bool MAX> struct ArgR {
    typedef ArgV S;
    static __device__ __forceinline__ S init() { return ArgV{__int_as_float(0x7fc00000), INT32_MAX}; }
    static __device__ __forceinline__ S merge(S a, S b) {
        bool a_wins;
        if (isnan(b.v)) {
            a_wins = !isnan(a.v) || a.i < b.i;
        } else if (isnan(a.v)) {
            a_wins = false;
        } else {
            a_wins = (MAX ? a.v > b.v : a.v < b.v) || (a.v == b.v && a.i < b.i);
        }
        return a_wins ? a : b;
    }
    static __device__ __forceinline__ S add(S s, float v, uint64_t k) {
        if (k == 0 && isnan(v)) v = MAX ? INFINITY : -INFINITY;
        return merge(s, ArgV{v, (int32_t)k});
    }
    static __device__ __forceinline__ S shfl(S s, int o) {
        return ArgV{__shfl_xor_sync(FULL_MASK, s.v, o), __shfl_xor_sync(FULL_MASK, s.i, o)};
    }
    template <typename T> static __device__ __forceinline__ void put(void *out, uint64_t row, S s) {
        static_cast<int32_t *>(out)[row] = s.i;
    }
    static __device__ __forceinline__ void put_part(float *pv, int32_t *pi, uint64_t i, S s) {
        pv[i] = s.v;
        pi[i] = s.i;
    }
    static __device__ __forceinline__ S get_part(const float *pv, const int32_t *pi, uint64_t i) {
        return ArgV{pv[i], pi[i]};
    }
};

template <typename R> __device__ __forceinline__ typename R::S warp_reduce(typename R::S s) {
    for (int o = 16; o > 0; o >>= 1) s = R::merge(s, R::shfl(s, o));
    return s;
}

// Every thread of the block gets the result; ends with a barrier so `scratch` can be reused at once.
template <typename R>
__device__ __forceinline__ typename R::S block_reduce(typename R::S s, typename R::S *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    s = warp_reduce<R>(s);
    if (lane == 0) scratch[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (int)(blockDim.x >> 5) ? scratch[lane] : R::init();
        s = warp_reduce<R>(s);
        if (lane == 0) scratch[0] = s;
    }
    __syncthreads();
    s = scratch[0];
    __syncthreads();
    return s;
}

template <typename T, typename R>
__device__ __forceinline__ typename R::S add16(typename R::S s, const uint4 &u, uint64_t k) {
    const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int q = 0; q < (int)(16 / sizeof(T)); ++q) s = R::add(s, to_f32(e[q]), k + q);
    return s;
}

// Folds elements [a, b) of the contiguous row at `p` into `s`, thread t of nt: a scalar head up to the
// first 16-byte boundary, a 128-bit body four loads deep per thread, and a scalar tail.
template <typename T, typename R>
__device__ __forceinline__ typename R::S fold_dense(typename R::S s, const T *__restrict__ p, uint64_t a,
                                                    uint64_t b, uint32_t t, uint32_t nt) {
    const uint64_t V = 16 / sizeof(T);
    uint64_t mis = ((uint64_t)(p + a) & 15) / sizeof(T);
    uint64_t head = mis ? min(b - a, V - mis) : 0;
    for (uint64_t k = a + t; k < a + head; k += nt) s = R::add(s, to_f32(p[k]), k);
    uint64_t start = a + head;
    uint64_t nv = (b - start) / V;
    const uint4 *pv = reinterpret_cast<const uint4 *>(p + start);
    uint64_t j = t;
    for (; j + 3ull * nt < nv; j += 4ull * nt) {
        uint4 u[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) u[q] = pv[j + q * nt];
#pragma unroll
        for (int q = 0; q < 4; ++q) s = add16<T, R>(s, u[q], start + (j + q * nt) * V);
    }
    for (; j < nv; j += nt) s = add16<T, R>(s, pv[j], start + j * V);
    for (uint64_t k = start + nv * V + t; k < b; k += nt) s = R::add(s, to_f32(p[k]), k);
    return s;
}

// Segment `seg` of rows x chunks is elements [chunk * clen, min(r, (chunk + 1) * clen)) of row seg /
// chunks. Element k of row i lives at strided_offset(rows_s, i) + strided_offset(cols_s, k). In warp mode
// each warp takes a segment, otherwise each block. A lone segment per row is written to `out` (T, or i32
// indices for argmax/argmin); split rows write partials [rows, chunks] for the finish kernel.
template <typename T, typename R>
__device__ __forceinline__ void reduce_rows(const T *__restrict__ x, const Strided &rows_s,
                                            const Strided &cols_s, uint64_t rows, uint64_t r, uint32_t chunks,
                                            uint64_t clen, float *pv, int32_t *pi, void *out, uint32_t warp_mode) {
    __shared__ typename R::S scratch[32];
    uint32_t t, nt;
    uint64_t g, ng;
    if (warp_mode) {
        t = threadIdx.x & 31;
        nt = 32;
        g = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
        ng = ((uint64_t)gridDim.x * blockDim.x) >> 5;
    } else {
        t = threadIdx.x;
        nt = blockDim.x;
        g = blockIdx.x;
        ng = gridDim.x;
    }
    bool dense = strided_dense(cols_s);
    uint64_t segs = rows * chunks;
    for (uint64_t seg = g; seg < segs; seg += ng) {
        uint64_t row = seg / chunks;
        uint64_t a = (seg % chunks) * clen, b = min(r, a + clen);
        uint64_t base = strided_offset(rows_s, row);
        typename R::S s = R::init();
        if (dense) {
            s = fold_dense<T, R>(s, x + base, a, b, t, nt);
        } else {
            for (uint64_t k = a + t; k < b; k += nt) s = R::add(s, to_f32(x[base + strided_offset(cols_s, k)]), k);
        }
        s = warp_mode ? warp_reduce<R>(s) : block_reduce<R>(s, scratch);
        if (t == 0) {
            if (chunks == 1) {
                R::template put<T>(out, row, s);
            } else {
                R::put_part(pv, pi, seg, s);
            }
        }
    }
}

// Thread per (row, chunk), with neighbouring threads on neighbouring rows: element k of row i lives at
// strided_offset(rows_s, i) + k * cs.
template <typename T, typename R>
__device__ __forceinline__ void reduce_cols(const T *__restrict__ x, const Strided &rows_s, uint64_t rows,
                                            uint64_t r, uint64_t cs, uint32_t chunks, uint64_t clen, float *pv,
                                            int32_t *pi, void *out) {
    GRID_STRIDE_LOOP(i, rows * chunks) {
        uint64_t row = i % rows, chunk = i / rows;
        uint64_t a = chunk * clen, b = min(r, a + clen);
        const T *p = x + strided_offset(rows_s, row);
        typename R::S s = R::init();
#pragma unroll 4
        for (uint64_t k = a; k < b; ++k) s = R::add(s, to_f32(p[k * cs]), k);
        if (chunks == 1) {
            R::template put<T>(out, row, s);
        } else {
            R::put_part(pv, pi, row * chunks + chunk, s);
        }
    }
}

// Warp per row over the partials [rows, chunks].
template <typename T, typename R>
__device__ __forceinline__ void reduce_finish(const float *__restrict__ pv, const int32_t *__restrict__ pi,
                                              uint64_t rows, uint32_t chunks, void *out) {
    uint32_t lane = threadIdx.x & 31;
    uint64_t w = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    uint64_t nw = ((uint64_t)gridDim.x * blockDim.x) >> 5;
    for (uint64_t row = w; row < rows; row += nw) {
        typename R::S s = R::init();
        for (uint32_t c = lane; c < chunks; c += 32) s = R::merge(s, R::get_part(pv, pi, row * chunks + c));
        s = warp_reduce<R>(s);
        if (lane == 0) R::template put<T>(out, row, s);
    }
}

// The descriptors are __grid_constant__ so strided_offset reads them in place from parameter space:
// indexing their arrays at run time would otherwise copy both structs to local memory in every thread.
#define ROWS_KERNEL(NAME, T, R)                                                                            \
    extern "C" __global__ void NAME(const T *x, const __grid_constant__ Strided rows_s,                    \
                                    const __grid_constant__ Strided cols_s, uint64_t rows, uint64_t r,     \
                                    uint32_t chunks, uint64_t clen, float *pv, int32_t *pi, void *out,     \
                                    uint32_t warp_mode) {                                                  \
        reduce_rows<T, R>(x, rows_s, cols_s, rows, r, chunks, clen, pv, pi, out, warp_mode);               \
    }

#define COLS_KERNEL(NAME, T, R)                                                                            \
    extern "C" __global__ void NAME(const T *x, const __grid_constant__ Strided rows_s, uint64_t rows,     \
                                    uint64_t r, uint64_t cs, uint32_t chunks, uint64_t clen, float *pv,    \
                                    int32_t *pi, void *out) {                                              \
        reduce_cols<T, R>(x, rows_s, rows, r, cs, chunks, clen, pv, pi, out);                              \
    }

#define FINISH_KERNEL(NAME, T, R)                                                                          \
    extern "C" __global__ void NAME(const float *pv, const int32_t *pi, uint64_t rows, uint32_t chunks,    \
                                    void *out) {                                                           \
        reduce_finish<T, R>(pv, pi, rows, chunks, out);                                                    \
    }

#define VALUE_KERNELS(OP, R, SUFFIX, T)                                                                    \
    ROWS_KERNEL(reduce_##OP##_##SUFFIX, T, R)                                                              \
    COLS_KERNEL(reduce_##OP##_cols_##SUFFIX, T, R)                                                         \
    FINISH_KERNEL(reduce_##OP##_finish_##SUFFIX, T, R)

#define VALUE_DTYPES(OP, R)                                                                                \
    VALUE_KERNELS(OP, R, f32, float)                                                                       \
    VALUE_KERNELS(OP, R, f16, __half)                                                                      \
    VALUE_KERNELS(OP, R, bf16, __nv_bfloat16)

VALUE_DTYPES(sum, SumR)
VALUE_DTYPES(max, MaxR)
VALUE_DTYPES(min, MinR)

#define ARG_KERNELS(OP, R, SUFFIX, T)                                                                      \
    ROWS_KERNEL(OP##_##SUFFIX, T, R)                                                                       \
    COLS_KERNEL(OP##_cols_##SUFFIX, T, R)

#define ARG_DTYPES(OP, R)                                                                                  \
    ARG_KERNELS(OP, R, f32, float)                                                                         \
    ARG_KERNELS(OP, R, f16, __half)                                                                        \
    ARG_KERNELS(OP, R, bf16, __nv_bfloat16)                                                                \
    ARG_KERNELS(OP, R, i32, int32_t)                                                                       \
    ARG_KERNELS(OP, R, i8, int8_t)                                                                         \
    ARG_KERNELS(OP, R, u8, uint8_t)                                                                        \
    FINISH_KERNEL(OP##_finish, float, R)

ARG_DTYPES(argmax, ArgR<true>)
ARG_DTYPES(argmin, ArgR<false>)
