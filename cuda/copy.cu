// Copy and conversion kernels (launchers in src/cuda/copy.rs): a strided view gathered into a contiguous
// output, as raw 1/2/4-byte words (copy_b8/b16/b32) or converted between dtypes with the CPU's cast
// rules (cast_<from>_<to>). Fill and cat need no kernel: they are driver memsets and 2-d copies.
#include "walk.cuh"

// ---- Conversions ----------------------------------------------------------------------------------

template <typename T> struct IsInt {
    static constexpr bool value = false;
};
template <> struct IsInt<int32_t> {
    static constexpr bool value = true;
};
template <> struct IsInt<int8_t> {
    static constexpr bool value = true;
};
template <> struct IsInt<uint8_t> {
    static constexpr bool value = true;
};

// f32 to any dtype as CpuStorage::from_f32 does it: floats round to nearest even, integers truncate
// toward zero and saturate at the type's range, NaN becomes 0 (Rust's `as`).
template <typename T> __device__ __forceinline__ T narrow(float x) { return from_f32<T>(x); }
template <> __device__ __forceinline__ int32_t narrow<int32_t>(float x) {
    if (isnan(x)) return 0;
    if (x >= 2147483648.f) return INT32_MAX;
    if (x <= -2147483648.f) return INT32_MIN;
    return (int32_t)x;
}
template <> __device__ __forceinline__ int8_t narrow<int8_t>(float x) {
    if (isnan(x)) return 0;
    if (x >= 127.f) return 127;
    if (x <= -128.f) return -128;
    return (int8_t)(int32_t)x;
}
template <> __device__ __forceinline__ uint8_t narrow<uint8_t>(float x) {
    if (isnan(x)) return 0;
    if (x >= 255.f) return 255;
    if (x <= 0.f) return 0;
    return (uint8_t)(int32_t)x;
}

// Storage::to_dtype: integer to integer through i64 with Rust's wrapping `as`, everything else through
// f32 (so i32 -> f16 rounds twice, as on the CPU).
template <typename From, typename To> struct Cast {
    template <int V> __device__ __forceinline__ void operator()(const From (&x)[V], To (&y)[V]) const {
#pragma unroll
        for (int k = 0; k < V; ++k) {
            if constexpr (IsInt<From>::value && IsInt<To>::value) {
                y[k] = (To)(int64_t)x[k];
            } else {
                y[k] = narrow<To>(widen(x[k]));
            }
        }
    }
};

#define CAST(fname, From, tname, To)                                                                \
    extern "C" __global__ void cast_##fname##_##tname(const From *__restrict__ x, Strided sx,         \
                                                      To *__restrict__ y, uint64_t n) {              \
        map1(x, sx, y, n, Cast<From, To>{});                                                        \
    }
CAST(f32, float, f16, __half)
CAST(f32, float, bf16, __nv_bfloat16)
CAST(f32, float, i32, int32_t)
CAST(f32, float, i8, int8_t)
CAST(f32, float, u8, uint8_t)
CAST(f16, __half, f32, float)
CAST(f16, __half, bf16, __nv_bfloat16)
CAST(f16, __half, i32, int32_t)
CAST(f16, __half, i8, int8_t)
CAST(f16, __half, u8, uint8_t)
CAST(bf16, __nv_bfloat16, f32, float)
CAST(bf16, __nv_bfloat16, f16, __half)
CAST(bf16, __nv_bfloat16, i32, int32_t)
CAST(bf16, __nv_bfloat16, i8, int8_t)
CAST(bf16, __nv_bfloat16, u8, uint8_t)
CAST(i32, int32_t, f32, float)
CAST(i32, int32_t, f16, __half)
CAST(i32, int32_t, bf16, __nv_bfloat16)
CAST(i32, int32_t, i8, int8_t)
CAST(i32, int32_t, u8, uint8_t)
CAST(i8, int8_t, f32, float)
CAST(i8, int8_t, f16, __half)
CAST(i8, int8_t, bf16, __nv_bfloat16)
CAST(i8, int8_t, i32, int32_t)
CAST(i8, int8_t, u8, uint8_t)
CAST(u8, uint8_t, f32, float)
CAST(u8, uint8_t, f16, __half)
CAST(u8, uint8_t, bf16, __nv_bfloat16)
CAST(u8, uint8_t, i32, int32_t)
CAST(u8, uint8_t, i8, int8_t)

// ---- Copies ---------------------------------------------------------------------------------------

struct Same {
    template <typename T, int V> __device__ __forceinline__ void operator()(const T (&x)[V], T (&y)[V]) const {
#pragma unroll
        for (int k = 0; k < V; ++k) y[k] = x[k];
    }
};

// Launched for strided views only (contiguous ones are one driver copy), any dtype of the word size.
#define COPY(name, T)                                                                               \
    extern "C" __global__ void name(const T *__restrict__ x, Strided sx, T *__restrict__ y, uint64_t n) { \
        map1(x, sx, y, n, Same{});                                                                  \
    }
COPY(copy_b8, uint8_t)
COPY(copy_b16, uint16_t)
COPY(copy_b32, uint32_t)
