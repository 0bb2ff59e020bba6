// A row held in registers: the launch-shape constants and the row loads and stores of the row kernels
// (softmax.cu, norm.cu). Slot j of thread t covers one column; with VEC the slots of a thread form
// 128-bit accesses.
#pragma once
#include "common.cuh"

// Must match WARP_ROW_MAX, BLOCK_SLOTS, BLOCK_SLOTS_SCALAR and BLOCK_MAX_THREADS in src/cuda/softmax.rs
// (which norm.rs uses too).
// Register slots per thread of the block path: 16 with 128-bit accesses, 8 without (whose per-slot
// addresses would otherwise double the kernel's registers). At most 512 threads per block keeps every
// kernel within the 128 registers per thread that such a block may use.
#define WARP_ROW_MAX 512
#define BLOCK_SLOTS 16
#define BLOCK_SLOTS_SCALAR 8
#define BLOCK_MAX_THREADS 512

// Elements per 128-bit access.
template <typename T> struct Vec {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T> __device__ __forceinline__ void load16(const T *p, float *v) {
    uint4 u = *reinterpret_cast<const uint4 *>(p);
    const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) v[i] = to_f32(e[i]);
}

template <typename T> __device__ __forceinline__ void store16(T *p, const float *v) {
    uint4 u;
    T *e = reinterpret_cast<T *>(&u);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4 *>(p) = u;
}

// Column of register slot j for thread t of nt. With VEC (d a multiple of the vector width, rows
// 16-byte aligned) each run of Vec<T>::N slots is one 128-bit access; otherwise slots stride by nt.
template <typename T, bool VEC> __device__ __forceinline__ uint32_t slot_col(int j, uint32_t t, uint32_t nt) {
    constexpr int V = Vec<T>::N;
    return VEC ? ((uint32_t)(j / V) * nt + t) * V + (uint32_t)(j % V) : (uint32_t)j * nt + t;
}

// Slots past the end of the row read as 0.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_row(const T *__restrict__ row, uint32_t d, uint32_t t, uint32_t nt,
                                         float (&v)[N]) {
    constexpr int V = Vec<T>::N;
    if (VEC) {
#pragma unroll
        for (int j = 0; j < N; j += V) {
            uint32_t c = slot_col<T, true>(j, t, nt);
            if (c < d) {
                load16(row + c, &v[j]);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) v[j + e] = 0.f;
            }
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            uint32_t c = slot_col<T, false>(j, t, nt);
            v[j] = c < d ? to_f32(row[c]) : 0.f;
        }
    }
}

template <typename T, int N, bool VEC>
__device__ __forceinline__ void store_row(T *__restrict__ row, uint32_t d, uint32_t t, uint32_t nt,
                                          const float (&v)[N]) {
    constexpr int V = Vec<T>::N;
    if (VEC) {
#pragma unroll
        for (int j = 0; j < N; j += V) {
            uint32_t c = slot_col<T, true>(j, t, nt);
            if (c < d) store16(row + c, &v[j]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            uint32_t c = slot_col<T, false>(j, t, nt);
            if (c < d) row[c] = from_f32<T>(v[j]);
        }
    }
}
