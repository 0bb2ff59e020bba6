// Shared by every kernel file: the strided-view descriptor (mirrors `Strided` in src/cuda/launch.rs),
// element loads and stores that widen f16/bf16 to f32, and block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define TRIT_MAX_DIMS 8

// Element i of the row-major walk over dims lives at offset + sum(idx_d * strides[d]).
struct Strided {
    uint32_t rank;
    uint32_t dims[TRIT_MAX_DIMS];
    uint64_t strides[TRIT_MAX_DIMS];
    uint64_t offset;
};

__device__ __forceinline__ uint64_t strided_offset(const Strided &s, uint64_t i) {
    uint64_t off = s.offset;
    for (int d = (int)s.rank - 1; d >= 0; --d) {
        uint32_t n = s.dims[d];
        off += (i % n) * s.strides[d];
        i /= n;
    }
    return off;
}

// A view is "dense" when its walk is one contiguous run: element i is at offset + i.
__device__ __forceinline__ bool strided_dense(const Strided &s) {
    return s.rank == 0 || (s.rank == 1 && s.strides[0] == 1);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Any element as f32, as the CPU's to_f32_vec reads it (integers round to nearest).
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return to_f32(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return to_f32(x); }
__device__ __forceinline__ float widen(int32_t x) { return (float)x; }
__device__ __forceinline__ float widen(int8_t x) { return (float)x; }
__device__ __forceinline__ float widen(uint8_t x) { return (float)x; }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

#define GRID_STRIDE_LOOP(i, n)                                                                     \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (uint64_t)(n);          \
         i += (uint64_t)blockDim.x * gridDim.x)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the call ends with a barrier so it can be reused.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nwarps = blockDim.x >> 5;
    v = (int)threadIdx.x < nwarps ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) {
        v = warp_sum(v);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nwarps = blockDim.x >> 5;
    v = (int)threadIdx.x < nwarps ? scratch[threadIdx.x] : -INFINITY;
    if (warp == 0) {
        v = warp_max(v);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}
