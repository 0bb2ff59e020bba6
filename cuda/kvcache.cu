// The int8/int4 KV cache on the device: quantize new K or V rows into the cache's codes and f16 scales
// (the CPU's row encoding, bit for bit: src/cpu/kv_attention.rs `quantize_int8` / `quantize_int4`), and
// dequantize the cached prefix into f32.
//
// Cache layout: codes [capacity, batch, heads, codes_per_row] (int8: d signed bytes; int4: ceil(d/2)
// bytes, byte i = code of element i + 8 in the low nibble, code of element i + ceil(d/2) + 8 in the
// high one, 8 past d) and scales [capacity, batch, heads, d / group] as f16 bits.
#include "common.cuh"

// amax / qmax rounded up to the next f16 (so no code clips), saturating at f16::MAX, NaN as half's NaN:
// the CPU's `group_scale`. The division is IEEE (not the fast approximation) like Rust's.
__device__ __forceinline__ uint16_t kv_scale_bits(float amax, float qmax) {
    float s = __fdiv_rn(amax, qmax);
    if (s != s) return 0x7E00;
    if (s > 65504.f) return 0x7BFF;
    __half h = __float2half_rn(s);
    uint16_t bits = __half_as_ushort(h);
    if (__half2float(h) < s) bits += 1;
    return bits;
}

// round(x / scale) ties to even, clamped to [-qmax, qmax]; 0 for a zero or NaN scale and for a NaN
// quotient (Rust's `as i32` of NaN): the CPU's `code`.
__device__ __forceinline__ int kv_code(float x, float scale, float qmax) {
    if (!(scale > 0.f)) return 0;
    float v = __fdiv_rn(x, scale);
    if (v != v) return 0;
    return __float2int_rn(fminf(fmaxf(v, -qmax), qmax));
}

// One warp per input row (bi, hi, ti) of x [b, h, t, d], element (bi, hi, ti, j) at
// offset + bi*sb + hi*sh + ti*st + j*sd, written to cache row ((at + ti) * b + bi) * h + hi. Pass 1
// reduces each group's max|x| across the warp (max is exact, so the order does not matter; fmaxf
// ignores NaN like Rust's f32::max) and stores its scale; pass 2 reads the stored scales back (the
// __syncwarp orders the warp's writes before its reads) and writes the codes.
template <typename T, bool INT4>
__device__ __forceinline__ void kv_quantize(const T *__restrict__ x, uint8_t *__restrict__ codes,
                                            uint16_t *__restrict__ scales, uint64_t offset,
                                            uint64_t sb, uint64_t sh, uint64_t st, uint64_t sd,
                                            uint32_t b, uint32_t h, uint32_t t, uint32_t d,
                                            uint32_t group, uint64_t at) {
    const float qmax = INT4 ? 7.f : 127.f;
    const uint32_t lane = threadIdx.x & 31;
    const uint32_t groups = d / group, half = (d + 1) / 2;
    const uint32_t per_row = INT4 ? half : d;
    const uint64_t rows = (uint64_t)b * h * t;
    const uint64_t warps = (uint64_t)gridDim.x * (blockDim.x >> 5);
    for (uint64_t row = (uint64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
         row += warps) {
        uint64_t ti = row % t, bh = row / t;
        uint64_t hi = bh % h, bi = bh / h;
        const T *xr = x + offset + bi * sb + hi * sh + ti * st;
        uint64_t dst = ((at + ti) * b + bi) * h + hi;
        uint16_t *sr = scales + dst * groups;
        uint8_t *cr = codes + dst * per_row;
        for (uint32_t g = 0; g < groups; ++g) {
            float m = 0.f;
            for (uint32_t j = g * group + lane; j < (g + 1) * group; j += 32)
                m = fmaxf(m, fabsf(to_f32(xr[(uint64_t)j * sd])));
            m = warp_max(m);
            if (lane == 0) sr[g] = kv_scale_bits(m, qmax);
        }
        __syncwarp();
        for (uint32_t i = lane; i < per_row; i += 32) {
            if (INT4) {
                uint32_t j = i + half;
                int lo = kv_code(to_f32(xr[(uint64_t)i * sd]),
                                 __half2float(__ushort_as_half(sr[i / group])), qmax);
                int hi_code = j < d ? kv_code(to_f32(xr[(uint64_t)j * sd]),
                                              __half2float(__ushort_as_half(sr[j / group])), qmax)
                                    : 0;
                cr[i] = (uint8_t)((lo + 8) | ((hi_code + 8) << 4));
            } else {
                int c = kv_code(to_f32(xr[(uint64_t)i * sd]),
                                __half2float(__ushort_as_half(sr[i / group])), qmax);
                cr[i] = (uint8_t)(int8_t)c;
            }
        }
        // The next row's pass 1 writes other scales; no lane may still read this row's after it.
        __syncwarp();
    }
}

#define KV_QUANTIZE(NAME, T, INT4)                                                                 \
    extern "C" __global__ void NAME(const T *x, uint8_t *codes, uint16_t *scales, uint64_t offset, \
                                    uint64_t sb, uint64_t sh, uint64_t st, uint64_t sd,            \
                                    uint32_t b, uint32_t h, uint32_t t, uint32_t d,                \
                                    uint32_t group, uint64_t at) {                                 \
        kv_quantize<T, INT4>(x, codes, scales, offset, sb, sh, st, sd, b, h, t, d, group, at);   \
    }

KV_QUANTIZE(kv_quantize_i8_f32, float, false)
KV_QUANTIZE(kv_quantize_i8_f16, __half, false)
KV_QUANTIZE(kv_quantize_i8_bf16, __nv_bfloat16, false)
KV_QUANTIZE(kv_quantize_i4_f32, float, true)
KV_QUANTIZE(kv_quantize_i4_f16, __half, true)
KV_QUANTIZE(kv_quantize_i4_bf16, __nv_bfloat16, true)

// out [rows, d] f32 = the first `rows` cache rows decoded: code times its f16 scale, which is exact
// (at most 18 significant bits), so it equals the CPU's decoding whatever the order.
template <bool INT4>
__device__ __forceinline__ void kv_dequantize(const uint8_t *__restrict__ codes,
                                              const uint16_t *__restrict__ scales,
                                              float *__restrict__ out, uint64_t rows, uint32_t d,
                                              uint32_t group) {
    const uint32_t groups = d / group, half = (d + 1) / 2;
    GRID_STRIDE_LOOP(e, rows * d) {
        uint64_t row = e / d;
        uint32_t j = (uint32_t)(e - row * d);
        float s = __half2float(__ushort_as_half(scales[row * groups + j / group]));
        int c;
        if (INT4) {
            uint8_t byte = codes[row * half + (j < half ? j : j - half)];
            c = (int)(j < half ? (byte & 15) : (byte >> 4)) - 8;
        } else {
            c = (int8_t)codes[row * d + j];
        }
        out[e] = (float)c * s;
    }
}

extern "C" __global__ void kv_dequantize_i8(const uint8_t *codes, const uint16_t *scales,
                                            float *out, uint64_t rows, uint32_t d, uint32_t group) {
    kv_dequantize<false>(codes, scales, out, rows, d, group);
}

extern "C" __global__ void kv_dequantize_i4(const uint8_t *codes, const uint16_t *scales,
                                            float *out, uint64_t rows, uint32_t d, uint32_t group) {
    kv_dequantize<true>(codes, scales, out, rows, d, group);
}
