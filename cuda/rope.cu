// Rotary position embedding over x [b, h, s, d] read through its 4-d strides (q and k usually arrive as a
// transposed [b, s, h, d] projection, so reading in place saves a copy), written contiguous.
#include "common.cuh"

// Two adjacent elements moved as one load or store (an interleaved pair (2i, 2i+1)).
template <typename T> struct alignas(2 * sizeof(T)) Pair {
    T a, b;
};

// Each row of d elements is handled by one row of the block (blockDim.x threads over its d/2 pairs,
// blockDim.y rows per block). The products and sums are rounded one by one (no FMA contraction), in
// the CPU twin's order, so f32 results match it bit for bit.
template <typename T>
__device__ __forceinline__ void rope_rows(const T *__restrict__ x, T *__restrict__ out,
                                          const float *__restrict__ cos_t,
                                          const float *__restrict__ sin_t,
                                          const int32_t *__restrict__ positions, uint64_t offset,
                                          uint64_t sb, uint64_t sh, uint64_t ss, uint64_t sd,
                                          uint32_t b, uint32_t h, uint32_t s, uint32_t d,
                                          uint32_t per_batch, uint32_t interleaved, float sign) {
    uint32_t half = d / 2;
    uint64_t rows = (uint64_t)b * h * s;
    for (uint64_t row = (uint64_t)blockIdx.x * blockDim.y + threadIdx.y; row < rows;
         row += (uint64_t)gridDim.x * blockDim.y) {
        uint64_t si = row % s, bh = row / s;
        uint64_t hi = bh % h, bi = bh / h;
        int32_t pos = positions[per_batch ? bi * s + si : si];
        const float *c = cos_t + (uint64_t)pos * half;
        const float *sn = sin_t + (uint64_t)pos * half;
        const T *xr = x + offset + bi * sb + hi * sh + si * ss;
        T *o = out + row * d;
        bool pairs = interleaved && sd == 1 && ((uintptr_t)xr % sizeof(Pair<T>)) == 0 &&
                     ((uintptr_t)o % sizeof(Pair<T>)) == 0;
        for (uint32_t i = threadIdx.x; i < half; i += blockDim.x) {
            uint64_t i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
            float a, bb;
            if (pairs) {
                Pair<T> p = reinterpret_cast<const Pair<T> *>(xr)[i];
                a = to_f32(p.a);
                bb = to_f32(p.b);
            } else {
                a = to_f32(xr[i0 * sd]);
                bb = to_f32(xr[i1 * sd]);
            }
            float ci = c[i], si_ = __fmul_rn(sign, sn[i]);
            float r0 = __fsub_rn(__fmul_rn(a, ci), __fmul_rn(bb, si_));
            float r1 = __fadd_rn(__fmul_rn(bb, ci), __fmul_rn(a, si_));
            if (pairs) {
                Pair<T> p;
                p.a = from_f32<T>(r0);
                p.b = from_f32<T>(r1);
                reinterpret_cast<Pair<T> *>(o)[i] = p;
            } else {
                o[i0] = from_f32<T>(r0);
                o[i1] = from_f32<T>(r1);
            }
        }
    }
}

// out [b, h, s, d] = x rotated by the angles at each row's position: positions is [s], or [b, s] when
// per_batch; cos/sin are [max_pos, d/2]; x's element (bi, hi, si, e) is at
// offset + bi*sb + hi*sh + si*ss + e*sd.
#define ROPE(NAME, T)                                                                              \
    extern "C" __global__ void rope_##NAME(                                                        \
        const T *x, T *out, const float *cos_t, const float *sin_t, const int32_t *positions,     \
        uint64_t offset, uint64_t sb, uint64_t sh, uint64_t ss, uint64_t sd, uint32_t b,           \
        uint32_t h, uint32_t s, uint32_t d, uint32_t per_batch, uint32_t interleaved, float sign) { \
        rope_rows<T>(x, out, cos_t, sin_t, positions, offset, sb, sh, ss, sd, b, h, s, d,          \
                     per_batch, interleaved, sign);                                                \
    }

ROPE(f32, float)
ROPE(f16, __half)
ROPE(bf16, __nv_bfloat16)
