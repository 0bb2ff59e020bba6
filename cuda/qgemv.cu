// Decode GEMV over packed low-bit weights: y[m, N] = x[m, K] · Ŵᵀ for m = 1..8 (launcher
// src/cuda/qgemv.rs; layouts in src/quant/format.rs). Memory-bound: every weight byte is read once.
//
// Work decomposition. Block y is one K chunk (split-K), block x a share of the row tasks. A block
// stages its chunk of all m activation rows into shared memory as f32, zero past K, permuted so
// that the lanes of a warp read consecutive float4s (no bank conflicts), plus the activation sums
// the decoders need. Each warp then loops over tasks (grid-stride): a task is 32/L lane groups of L
// lanes, each group R consecutive rows (R = 4, or 2 when m > 4). Lane l of a group takes the
// 16-byte units (b1: 8 bytes, t3: 4) l, l + L, ... of each of its R rows: streaming loads that skip
// L1, the next unit's R loads issued before the current one is decoded, and the next task's first
// units prefetched into L2. Each weight is decoded once and used for all m tokens, each staged
// float4 for all R rows (that reuse keeps shared memory traffic under the FMA rate). The group sums
// its lanes with xor shuffles and writes y, or with split-K an f32 partial [chunk, m, N] that
// qgemv_reduce sums in chunk order. The launcher picks the chunk (the tile's capacity, then smaller
// while the GPU has under two waves of warp tasks and each chunk keeps 32 units per row), L (32, or
// the power of two covering a shorter row) and the blocks (each resident warp gets an even share of
// the tasks).
//
// Decoding avoids int→float conversions (a fraction of the FMA rate): a code's bits are placed in a
// float whose value is affine in the code, with one byte permute or logic op per weight, and the
// affine constant comes back through staged sums. t2/t3 read f = 0.5 + c/4 for the stored code
// c = w + 1, so Σ x·w = 4·(Σ x·f − 0.75·Σ x) (t3 gets the base-3 digits of two bytes at once from one
// multiply by 3 per digit); int4/int8 get the exact integer as (2²³ + q) − 2²³; binary bits moved to
// bits 20..27 read f = f0 + Δ·b (qg_b1_affine), with activations staged as x' = x / Δ, so that
// Σ x·b = Σ x'·f − Σ x'·f0.
#include "common.cuh"

#define QG_THREADS 256
#define QG_WARPS (QG_THREADS / 32)
// Dynamic shared memory: 48 KiB, the most a block gets without opting in: the activation tile, then
// 32 floats of reduction scratch.
#define QG_SMEM_BYTES (48 * 1024)
#define QG_TILE_FLOATS (QG_SMEM_BYTES / 4 - 32)

enum QFmt { QF_T2, QF_T3, QF_B1, QF_I4, QF_I4A, QF_I8 };

// BW weights in BB bytes per block; units of UB bytes (UPB per block) are what a lane loads; a
// unit's weights are STEPS runs of 4 consecutive activations (one float4 each); RUNS activation
// sums per unit are staged (the launcher mirrors these numbers in qgemv.rs).
template <int F> struct QTraits;
template <> struct QTraits<QF_T2> {
    static constexpr int BW = 256, BB = 64, UB = 16, UPB = 4, STEPS = 16, RUNS = 4;
};
template <> struct QTraits<QF_T3> {
    static constexpr int BW = 256, BB = 52, UB = 4, UPB = 13, STEPS = 5, RUNS = 1;
};
template <> struct QTraits<QF_B1> {
    static constexpr int BW = 64, BB = 8, UB = 8, UPB = 1, STEPS = 16, RUNS = 0;
};
template <> struct QTraits<QF_I4> {
    static constexpr int BW = 128, BB = 64, UB = 16, UPB = 4, STEPS = 8, RUNS = 0;
};
template <> struct QTraits<QF_I4A> {
    static constexpr int BW = 128, BB = 64, UB = 16, UPB = 4, STEPS = 8, RUNS = 2;
};
template <> struct QTraits<QF_I8> {
    static constexpr int BW = 64, BB = 64, UB = 16, UPB = 4, STEPS = 4, RUNS = 0;
};

// Rows per lane group: each staged float4 feeds R rows' FMAs.
template <int M> __host__ __device__ constexpr int qg_rows() { return M <= 4 ? 4 : 2; }

// Units per row that the tile holds for m = M: the largest multiple of a 256-weight span.
template <int F, int M> __host__ __device__ constexpr int qg_units() {
    using Tr = QTraits<F>;
    constexpr int extra = F == QF_B1 ? 2 * M : 0;
    constexpr int span = Tr::UPB * (256 / Tr::BW);
    return (QG_TILE_FLOATS - extra) / (M * (4 * Tr::STEPS + Tr::RUNS)) / span * span;
}
static_assert(qg_units<QF_T2, 1>() == 180 && qg_units<QF_T2, 8>() == 20, "mirrored in qgemv.rs");
static_assert(qg_units<QF_T3, 1>() == 572 && qg_units<QF_B1, 1>() == 188, "mirrored in qgemv.rs");
static_assert(qg_units<QF_I4, 1>() == 376 && qg_units<QF_I4A, 3>() == 120, "mirrored in qgemv.rs");
static_assert(qg_units<QF_I8, 8>() == 80, "mirrored in qgemv.rs");

template <int UB> struct QUnit {
    uint32_t w[UB / 4];
};

// Weight loads: read once, so they bypass L1 (which keeps the scales) and fetch whole 256-byte
// lines.
__device__ __forceinline__ QUnit<16> qg_load(const QUnit<16> *p) {
    QUnit<16> u;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(u.w[0]), "=r"(u.w[1]), "=r"(u.w[2]), "=r"(u.w[3])
        : "l"(p));
    return u;
}
__device__ __forceinline__ QUnit<8> qg_load(const QUnit<8> *p) {
    QUnit<8> u;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];"
        : "=r"(u.w[0]), "=r"(u.w[1])
        : "l"(p));
    return u;
}
__device__ __forceinline__ QUnit<4> qg_load(const QUnit<4> *p) {
    QUnit<4> u;
    asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(u.w[0]) : "l"(p));
    return u;
}

__device__ __forceinline__ void qg_prefetch(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Where chunk weight kk's activation is staged, as a float offset in its token's region
// [STEPS][VC][4]: unit v's step s is the float4 at (s·VC + v)·4, and kk & 3 is the lane of the
// float4.
template <int F> __device__ __forceinline__ uint32_t qg_slot(uint32_t kk, uint32_t vc) {
    uint32_t v, s;
    if (F == QF_T2) {  // weight i of a block: byte i % 64 (unit i % 64 / 16), bit plane i / 64
        uint32_t i = kk & 255;
        v = (kk >> 8) * 4 + ((i >> 4) & 3);
        s = (i >> 6) * 4 + ((i >> 2) & 3);
    } else if (F == QF_I4 || F == QF_I4A) {  // byte i: weights i and 64 + i
        uint32_t i = kk & 127;
        v = (kk >> 7) * 4 + ((i >> 4) & 3);
        s = (i >> 6) * 4 + ((i >> 2) & 3);
    } else if (F == QF_I8) {
        v = kk >> 4;
        s = (kk >> 2) & 3;
    } else if (F == QF_B1) {  // word w of the u64, bits 4c..4c+3: step 8w + c
        v = kk >> 6;
        s = (kk >> 2) & 15;
    } else {  // t3: weight i of a block is digit n of byte `byte` (ternary3_position)
        uint32_t i = kk & 255, byte, n;
        if (i < 160) {
            byte = i & 31;
            n = i >> 5;
        } else if (i < 240) {
            byte = 32 + ((i - 160) & 15);
            n = (i - 160) >> 4;
        } else {
            byte = 48 + ((i - 240) & 3);
            n = (i - 240) >> 2;
        }
        v = (kk >> 8) * 13 + (byte >> 2);
        s = n;
    }
    return (s * vc + v) * 4 + (kk & 3);
}

// Binary: byte h of a word shifted by 20 - 8h puts bits 8h + j at 20 + j, where one logic op with
// the magic of its half reads f = f0 + Δ·bit: bits 20..23 under 0x3F000000 (1/2; 20..22 mantissa,
// 23 the exponent's low bit), bits 24..27 (exponent bits 1..4) under 2^-30, whose exponent has them
// clear.
#define QG_B1_LO 0x3F000000u
#define QG_B1_HI (97u << 23)
// (1 / Δ, f0) of word bit i.
__device__ __forceinline__ float2 qg_b1_affine(uint32_t i) {
    const uint32_t p = 20 + (i & 7), magic = (i & 4) ? QG_B1_HI : QG_B1_LO;
    const float f0 = __uint_as_float(magic), f1 = __uint_as_float(magic | (1u << p));
    return make_float2(1.f / (f1 - f0), f0);
}

// (a & mask) | magic in one logic op: written out because the compiler splits it in two when both
// are constants, where one register holding the magic (set once, outside the loops) does.
__device__ __forceinline__ uint32_t qg_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
    return d;
}

// Four activations from kk on, zero at and past klen; vec: the 4 are one aligned load (K % 4 == 0).
template <typename T>
__device__ __forceinline__ float4 qg_load_x(const T *p, uint32_t kk, uint32_t klen, bool vec) {
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (vec) {
        if (kk < klen) {
            if (sizeof(T) == 4) {
                r = __ldg(reinterpret_cast<const float4 *>(p + kk));
            } else {
                uint2 raw = __ldg(reinterpret_cast<const uint2 *>(p + kk));
                T h[4];
                memcpy(h, &raw, sizeof raw);
                r = make_float4(to_f32(h[0]), to_f32(h[1]), to_f32(h[2]), to_f32(h[3]));
            }
        }
    } else {
        if (kk < klen) r.x = to_f32(p[kk]);
        if (kk + 1 < klen) r.y = to_f32(p[kk + 1]);
        if (kk + 2 < klen) r.z = to_f32(p[kk + 2]);
        if (kk + 3 < klen) r.w = to_f32(p[kk + 3]);
    }
    return r;
}

// The dtype travels as a value (0 f32, 1 f16, 2 bf16) so that the three kernels of a format share
// one body: only staging and the final stores depend on it.
__device__ __forceinline__ float4 qg_load_x(const void *p, uint32_t dtype, uint32_t kk,
                                           uint32_t klen, bool vec) {
    if (dtype == 1) return qg_load_x(static_cast<const __half *>(p), kk, klen, vec);
    if (dtype == 2) return qg_load_x(static_cast<const __nv_bfloat16 *>(p), kk, klen, vec);
    return qg_load_x(static_cast<const float *>(p), kk, klen, vec);
}

__device__ __forceinline__ void qg_store_y(void *y, uint32_t dtype, uint64_t i, float v) {
    if (dtype == 1)
        static_cast<__half *>(y)[i] = from_f32<__half>(v);
    else if (dtype == 2)
        static_cast<__nv_bfloat16 *>(y)[i] = from_f32<__nv_bfloat16>(v);
    else
        static_cast<float *>(y)[i] = v;
}

// A launch's arguments (see the kernels at the end).
struct QgArgs {
    const uint8_t *w;
    const float *scales, *mins;
    const void *x;
    void *y;
    float *part;
    uint64_t row_bytes;
    uint32_t n, k, m, gpr, gmul, gshift, chunk, lanes, xvec, dtype;
};

// Stages the chunk [k0, k0 + klen) of the m activation rows (kp: klen rounded up to whole blocks)
// into the tile [m][STEPS][vc][4] and the per-unit sums into tab [m][RUNS][vc]: t2 and t3 stage 4x
// (the 4 of Σ x·w = 4·(Σ x·f − 0.75·Σ x)) and -0.75·Σ 4x, i4a x and Σ x; b1 stages x / Δ and the
// chunk's (Σ x'·f0, Σ x) per token into tab [m][2]. Not inlined: one copy per format serves every
// m.
template <int F>
__device__ __noinline__ void qg_stage(const QgArgs a, float *xs, float *tab, float *scratch,
                                      uint32_t vc, uint32_t k0, uint32_t klen, uint32_t kp) {
    using Tr = QTraits<F>;
    const uint32_t token = Tr::STEPS * vc * 4;
    // A thread's elements sit at kk & 31 = 4·threadIdx.x & 31 (+ 0..3) on every pass of the loop
    // below.
    const uint32_t bit = threadIdx.x * 4 & 31;
    const float2 a0 = qg_b1_affine(bit), a1 = qg_b1_affine(bit + 1);
    const float2 a2 = qg_b1_affine(bit + 2), a3 = qg_b1_affine(bit + 3);
    for (uint32_t t = 0; t < a.m; ++t) {
        const uint64_t row = (uint64_t)t * a.k + k0;
        const void *xt = a.dtype == 0 ? (const void *)(static_cast<const float *>(a.x) + row)
                                      : (const void *)(static_cast<const uint16_t *>(a.x) + row);
        float c_part = 0.f, x_part = 0.f;
        for (uint32_t kk = threadIdx.x * 4; kk < kp; kk += QG_THREADS * 4) {
            float4 v = qg_load_x(xt, a.dtype, kk, klen, a.xvec != 0);
            if (F == QF_B1) {
                x_part += (v.x + v.y) + (v.z + v.w);
                v = make_float4(v.x * a0.x, v.y * a1.x, v.z * a2.x, v.w * a3.x);
                c_part += (v.x * a0.y + v.y * a1.y) + (v.z * a2.y + v.w * a3.y);
            }
            if (F == QF_T2 || F == QF_T3)
                v = make_float4(4.f * v.x, 4.f * v.y, 4.f * v.z, 4.f * v.w);
            *reinterpret_cast<float4 *>(xs + t * token + qg_slot<F>(kk, vc)) = v;
        }
        if (F == QF_B1) {
            float c = block_sum(c_part, scratch);
            float s = block_sum(x_part, scratch);
            if (threadIdx.x == 0) {
                tab[2 * t] = c;
                tab[2 * t + 1] = s;
            }
        }
    }
    const uint32_t blocks = kp / Tr::BW, units = blocks * Tr::UPB;
    if (F == QF_T3) {
        // The qh word (q = 12) has four digits per byte; its fifth step reads zeros.
        for (uint32_t e = threadIdx.x; e < a.m * blocks; e += QG_THREADS) {
            uint32_t t = e / blocks, b = e - t * blocks;
            *reinterpret_cast<float4 *>(xs + t * token + (4 * vc + b * 13 + 12) * 4) =
                make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    __syncthreads();
    if (Tr::RUNS > 0 && F != QF_B1) {
        // t2: run j of a unit = steps 4j..4j+3 (16 weights, one scale group); i4a: run h = steps
        // 4h..4h+3; t3: the whole word.
        constexpr int PER_RUN = F == QF_T3 ? Tr::STEPS : 4;
        constexpr float COEF = F == QF_I4A ? 1.f : -0.75f;
        const uint32_t per_token = Tr::RUNS * units;
        for (uint32_t e = threadIdx.x; e < a.m * per_token; e += QG_THREADS) {
            uint32_t t = e / per_token, rem = e - t * per_token;
            uint32_t run = rem / units, v = rem - run * units;
            const float *src = xs + t * token + ((run * PER_RUN) * vc + v) * 4;
            float sum = 0.f;
#pragma unroll
            for (int s = 0; s < PER_RUN; ++s) {
                float4 q = *reinterpret_cast<const float4 *>(src + s * vc * 4);
                sum += (q.x + q.y) + (q.z + q.w);
            }
            tab[(t * Tr::RUNS + run) * vc + v] = COEF * sum;
        }
        __syncthreads();
    }
}

// What a lane needs to fold a unit into its rows' sums.
struct QgCtx {
    const float *xs;  // this lane's unit: the staged float4s are at xs + (t·STEPS + s)·VC·4
    const float *tab; // this lane's unit: tab[(t·RUNS + run)·VC]
    uint32_t k0, gpr, gmul, gshift;

    // The scale group of chunk weight kk; padding past K belongs to the last group.
    __device__ __forceinline__ uint32_t group(uint32_t kk) const {
        uint32_t g = (uint32_t)(((uint64_t)(k0 + kk) * gmul) >> gshift);
        return min(g, gpr - 1);
    }
};

template <int F, int M, int R>
__device__ __forceinline__ void qg_unit(const QUnit<QTraits<F>::UB> (&u)[R], uint32_t v,
                                        const QgCtx &c, const uint64_t (&srow)[R],
                                        uint64_t mins_minus_scales,
                                        float (&acc)[R][M]) {
    using Tr = QTraits<F>;
    constexpr int VC = qg_units<F, M>();
    constexpr int XT = Tr::STEPS * VC * 4;  // token stride in floats
    // The float4 of token t at step s (s may be a loop variable: one add per step, not per token).
    auto xv = [&](int t, uint32_t s) {
        return *reinterpret_cast<const float4 *>(c.xs + s * (VC * 4) + t * XT);
    };
    auto fma4 = [](float4 x, const float (&f)[4], float a) {
        a = fmaf(x.x, f[0], a);
        a = fmaf(x.y, f[1], a);
        a = fmaf(x.z, f[2], a);
        return fmaf(x.w, f[3], a);
    };
    // Row addresses stay 64-bit integers so that each load costs one multiply-add.
    auto load = [](uint64_t row, uint32_t g) {
        return __ldg(reinterpret_cast<const float *>(row + (uint64_t)g * 4));
    };
    auto scale = [&](int r, uint32_t g) { return load(srow[r], g); };

    if (F == QF_T2) {
        // Plane j of a word holds weight j of each byte in bits 2j..2j+1; moved to bits 6..7 and
        // permuted into byte 2 of 0x3F000000 it reads 0.5 + c/4.
        const uint32_t kb = (v >> 2) * 256 + (v & 3) * 16;
#pragma unroll(M == 1 ? 4 : 1)
        for (uint32_t j = 0; j < 4; ++j) {
            const uint32_t g = c.group(kb + 64 * j);
            float s[R], p[R][M];
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] = scale(r, g);
#pragma unroll
            for (int t = 0; t < M; ++t) {
                const float x0 = c.tab[(t * Tr::RUNS) * VC + j * VC];
#pragma unroll
                for (int r = 0; r < R; ++r) p[r][t] = x0;
            }
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                float f[R][4];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const uint32_t a = (u[r].w[w] << (6 - 2 * j)) & 0xC0C0C0C0u;
#pragma unroll
                    for (int b = 0; b < 4; ++b)
                        f[r][b] = __uint_as_float(__byte_perm(a, 0x3F000000u, 0x7044u | (b << 8)));
                }
#pragma unroll
                for (int t = 0; t < M; ++t) {
                    const float4 x = xv(t, 4 * j + w);
#pragma unroll
                    for (int r = 0; r < R; ++r) p[r][t] = fma4(x, f[r], p[r][t]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < M; ++t) acc[r][t] = fmaf(s[r], p[r][t], acc[r][t]);
        }
    } else if (F == QF_I4 || F == QF_I4A) {
        // Nibble q permuted into byte 0 of 0x4B000000 (2^23) reads 2^23 + q exactly.
        constexpr float BIAS = F == QF_I4A ? 8388608.f : 8388616.f;
        const uint32_t kb = (v >> 2) * 128 + (v & 3) * 16;
#pragma unroll(M == 1 ? 2 : 1)
        for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t g = c.group(kb + 64 * h);
            float p[R][M];
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < M; ++t) p[r][t] = 0.f;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                float f[R][4];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const uint32_t q = (u[r].w[w] >> (4 * h)) & 0x0F0F0F0Fu;
#pragma unroll
                    for (int b = 0; b < 4; ++b)
                        f[r][b] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7440u | b)) - BIAS;
                }
#pragma unroll
                for (int t = 0; t < M; ++t) {
                    const float4 x = xv(t, 4 * h + w);
#pragma unroll
                    for (int r = 0; r < R; ++r) p[r][t] = fma4(x, f[r], p[r][t]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float s = scale(r, g);
#pragma unroll
                for (int t = 0; t < M; ++t) acc[r][t] = fmaf(s, p[r][t], acc[r][t]);
            }
            if (F == QF_I4A) {
                // w = s·q + min: the run's min meets its activation sum.
#pragma unroll
                for (int t = 0; t < M; ++t) {
                    const float xsum = c.tab[(t * Tr::RUNS) * VC + h * VC];
#pragma unroll
                    for (int r = 0; r < R; ++r)
                        acc[r][t] = fmaf(load(srow[r] + mins_minus_scales, g), xsum, acc[r][t]);
                }
            }
        }
    } else if (F == QF_I8) {
        // Byte c ^ 0x80 = c + 128, permuted into 2^23, reads 2^23 + 128 + c exactly.
        const uint32_t g = c.group(v * 16);
        float p[R][M];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < M; ++t) p[r][t] = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            float f[R][4];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint32_t q = u[r].w[w] ^ 0x80808080u;
#pragma unroll
                for (int b = 0; b < 4; ++b)
                    f[r][b] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7440u | b)) - 8388736.f;
            }
#pragma unroll
            for (int t = 0; t < M; ++t) {
                const float4 x = xv(t, w);
#pragma unroll
                for (int r = 0; r < R; ++r) p[r][t] = fma4(x, f[r], p[r][t]);
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float s = scale(r, g);
#pragma unroll
            for (int t = 0; t < M; ++t) acc[r][t] = fmaf(s, p[r][t], acc[r][t]);
        }
    } else if (F == QF_B1) {
        // Step c of word w is bits 4c..4c+3 of byte c / 2 (see qg_b1_affine). acc gathers Σ x'·f;
        // the scale and the staged constants come after the reduction.
        const uint32_t lo = QG_B1_LO, hi = QG_B1_HI;
#pragma unroll(M == 1 ? 2 : 1)
        for (uint32_t w = 0; w < 2; ++w) {
            uint32_t word[R];
#pragma unroll
            for (int r = 0; r < R; ++r) word[r] = w ? u[r].w[1] : u[r].w[0];
#pragma unroll
            for (int cc = 0; cc < 8; ++cc) {
                float f[R][4];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const int h = cc / 2;
                    const uint32_t t = h < 3 ? word[r] << (20 - 8 * h) : word[r] >> 4;
                    const int p = 20 + 4 * (cc & 1);
#pragma unroll
                    for (int b = 0; b < 4; ++b)
                        f[r][b] = __uint_as_float(qg_and_or(t, 1u << (p + b), cc & 1 ? hi : lo));
                }
#pragma unroll
                for (int t = 0; t < M; ++t) {
                    const float4 x = xv(t, 8 * w + cc);
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r][t] = fma4(x, f[r], acc[r][t]);
                }
            }
        }
    } else {  // QF_T3
        // Bytes 0 and 2 sit at bits 0..7 and bytes 1 and 3 at bits 14..21 of two words, so one
        // multiply by 3 steps both: digit n of byte q is ((q·3ⁿ mod 256)·3) >> 8, here at bits 8..9
        // and 22..23 (the latter already where 0x3F000000 reads 0.5 + d/4).
        const uint32_t blk = v / 13, magic = 0x3F000000u;
        const uint32_t g = c.group(blk * 256);
        float s[R], p[R][M];
        uint32_t lo[R], hi[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            s[r] = scale(r, g);
            const uint32_t q = u[r].w[0];
            lo[r] = (q & 0xFFu) | ((q << 6) & 0x3FC000u);
            hi[r] = ((q >> 16) & 0xFFu) | ((q >> 10) & 0x3FC000u);
        }
#pragma unroll
        for (int t = 0; t < M; ++t) {
            const float x0 = c.tab[t * Tr::RUNS * VC];
#pragma unroll
            for (int r = 0; r < R; ++r) p[r][t] = x0;
        }
#pragma unroll(M == 1 ? 5 : 1)
        for (uint32_t n = 0; n < 5; ++n) {
            float f[R][4];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint32_t a = lo[r] * 3u, b = hi[r] * 3u;
                f[r][0] = __uint_as_float((a & 0x300u) * 16384u + 0x3F000000u);
                f[r][1] = __uint_as_float(qg_and_or(a, 0xC00000u, magic));
                f[r][2] = __uint_as_float((b & 0x300u) * 16384u + 0x3F000000u);
                f[r][3] = __uint_as_float(qg_and_or(b, 0xC00000u, magic));
                lo[r] = a & 0x3FC0FFu;
                hi[r] = b & 0x3FC0FFu;
            }
#pragma unroll
            for (int t = 0; t < M; ++t) {
                const float4 x = xv(t, n);
#pragma unroll
                for (int r = 0; r < R; ++r) p[r][t] = fma4(x, f[r], p[r][t]);
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < M; ++t) acc[r][t] = fmaf(s[r], p[r][t], acc[r][t]);
    }
}

// The whole launch for m = M: stage this block's chunk, then loop over warp tasks. Not inlined: one
// PTX body serves the three dtypes' kernels. The arguments come by pointer, not in ABI registers.
template <int F, int M> __device__ __noinline__ void qgemv_m(const QgArgs *args, float *smem) {
    const QgArgs &a = *args;
    using Tr = QTraits<F>;
    using Unit = QUnit<Tr::UB>;
    constexpr int R = qg_rows<M>();
    constexpr int VC = qg_units<F, M>();
    const uint32_t k0 = blockIdx.y * a.chunk;
    const uint32_t klen = k0 < a.k ? min(a.chunk, a.k - k0) : 0;
    const uint32_t blocks = (klen + Tr::BW - 1) / Tr::BW;
    const uint32_t units = blocks * Tr::UPB;
    // The launcher never asks for more than the tile holds; a chunk that did would overrun it.
    if (units > (uint32_t)VC) return;
    static_assert(M * (4 * Tr::STEPS + Tr::RUNS) * VC + (F == QF_B1 ? 2 * M : 0) <= QG_TILE_FLOATS,
                  "the staged chunk fits the tile");
    float *xs = smem;
    float *tab = smem + M * Tr::STEPS * VC * 4;

    const uint32_t n = a.n, lanes = a.lanes;
    const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint32_t lshift = __ffs(lanes) - 1;
    const uint32_t sl = lane & (lanes - 1), grp = lane >> lshift;
    const uint32_t per_task = (uint32_t)R << (5 - lshift);  // rows per warp task
    const uint32_t tasks = (n + per_task - 1) / per_task;
    const uint32_t first = blockIdx.x * QG_WARPS + warp, stride = gridDim.x * QG_WARPS;
    const uint8_t *w = a.w + (uint64_t)(k0 / Tr::BW) * Tr::BB;

    // Pulls a task's first `count` units per lane into L2: the first task's while the block stages,
    // the next task's while this one sums and writes, so that a task's first loads find them there.
    auto prefetch = [&](uint32_t task, uint32_t count) {
        if (task >= tasks) return;
        const uint32_t r0 = task * per_task + grp * R;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const Unit *row = reinterpret_cast<const Unit *>(w + min(r0 + r, n - 1) * a.row_bytes);
            for (uint32_t v = sl, i = 0; v < units && i < count; v += lanes, ++i)
                qg_prefetch(row + v);
        }
    };
    prefetch(first, 4);
    qg_stage<F>(a, xs, tab, smem + QG_TILE_FLOATS, VC, k0, klen, blocks * Tr::BW);

    const uint64_t mins_minus_scales = (uint64_t)a.mins - (uint64_t)a.scales;
    QgCtx c;
    c.k0 = k0;
    c.gpr = a.gpr;
    c.gmul = a.gmul;
    c.gshift = a.gshift;

    for (uint32_t task = first; task < tasks; task += stride) {
        const uint32_t r0 = task * per_task + grp * R;
        uint32_t rows[R];
        const Unit *rp[R];
        uint64_t srow[R];  // addresses of the rows' scales (mins: the same layout)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            // Rows past N repeat row N - 1 (in bounds, never written) so that the warp stays
            // converged.
            rows[r] = min(r0 + r, n - 1);
            rp[r] = reinterpret_cast<const Unit *>(w + rows[r] * a.row_bytes);
            srow[r] = reinterpret_cast<uint64_t>(a.scales + (uint64_t)rows[r] * a.gpr);
        }
        float acc[R][M];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < M; ++t) acc[r][t] = 0.f;

        // Where registers allow (not m = 3, 4 with 4 rows), the next unit's loads are issued before
        // this one is decoded, so that they fly during it.
        constexpr bool PREFETCH = M <= 2 || R == 2;
        Unit u[R];
        if (PREFETCH && sl < units) {
#pragma unroll
            for (int r = 0; r < R; ++r) u[r] = qg_load(rp[r] + sl);
        }
        for (uint32_t v = sl; v < units; v += lanes) {
            Unit next[R];
            if (!PREFETCH) {
#pragma unroll
                for (int r = 0; r < R; ++r) u[r] = qg_load(rp[r] + v);
            } else if (v + lanes < units) {
#pragma unroll
                for (int r = 0; r < R; ++r) next[r] = qg_load(rp[r] + v + lanes);
            }
            c.xs = xs + v * 4;
            c.tab = tab + v;
            qg_unit<F, M, R>(u, v, c, srow, mins_minus_scales, acc);
            if (PREFETCH) {
#pragma unroll
                for (int r = 0; r < R; ++r) u[r] = next[r];
            }
        }

        prefetch(task + stride, 1);
        for (uint32_t o = lanes >> 1; o > 0; o >>= 1)
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int t = 0; t < M; ++t) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);

        // Lane sl of the group writes values e = sl, sl + L, ... of the R·M (row, token) sums.
        for (uint32_t e = sl; e < R * M; e += lanes) {
            float val = acc[0][0];
#pragma unroll
            for (int i = 1; i < R * M; ++i)
                if (e == (uint32_t)i) val = acc[i / M][i % M];
            const uint32_t r = e / M, t = e % M, row = r0 + r;
            if (row >= n) continue;
            if (F == QF_B1) {
                // w = α(2b - 1) + β: α·(2·Σx·b - Σx) + β·Σx, with Σx·b = acc - Σx'·f0.
                const float alpha = a.scales[row];
                const float beta = a.mins ? a.mins[row] : 0.f;
                val = 2.f * alpha * (val - tab[2 * t]) + (beta - alpha) * tab[2 * t + 1];
            }
            if (a.part)
                a.part[((uint64_t)blockIdx.y * M + t) * n + row] = val;
            else
                qg_store_y(a.y, a.dtype, (uint64_t)t * n + row, val);
        }
    }
}

template <int F> __device__ __forceinline__ void qgemv(const QgArgs &a) {
    extern __shared__ float4 qg_smem[];
    float *smem = reinterpret_cast<float *>(qg_smem);
    switch (a.m) {
    case 1: qgemv_m<F, 1>(&a, smem); break;
    case 2: qgemv_m<F, 2>(&a, smem); break;
    case 3: qgemv_m<F, 3>(&a, smem); break;
    case 4: qgemv_m<F, 4>(&a, smem); break;
    case 5: qgemv_m<F, 5>(&a, smem); break;
    case 6: qgemv_m<F, 6>(&a, smem); break;
    case 7: qgemv_m<F, 7>(&a, smem); break;
    case 8: qgemv_m<F, 8>(&a, smem); break;
    default: break;
    }
}

// qgemv_<format>_<dtype>: w holds N rows of row_bytes packed bytes; scales (and mins) are row-major
// [N, gpr] (b1: mins one per row, or null without offset); x [m, K] and y [m, N] in the dtype; part
// is null, or f32 partials [gridDim.y, m, N] (y then untouched) for qgemv_reduce. Block row y
// covers weights [y·chunk, (y+1)·chunk) of every row (chunk a multiple of 256); weight k's scale
// group is min((k·gmul) >> gshift, gpr - 1); lanes (a power of two up to 32) is the lane-group
// width; xvec: x rows allow 4-element loads. Dynamic shared memory: QG_SMEM_BYTES.
#define QGEMV(FMT, F, NAME, T, DT)                                                                 \
    extern "C" __global__ void __launch_bounds__(QG_THREADS, 2) qgemv_##FMT##_##NAME(              \
        const uint8_t *w, const float *scales, const float *mins, const T *x, T *y, float *part,   \
        uint64_t row_bytes, uint32_t n, uint32_t k, uint32_t m, uint32_t gpr, uint32_t gmul,       \
        uint32_t gshift, uint32_t chunk, uint32_t lanes, uint32_t xvec) {                          \
        const QgArgs a = {w, scales, mins, x, y, part, row_bytes, n, k, m, gpr, gmul, gshift,      \
                          chunk, lanes, xvec, DT};                                                 \
        qgemv<F>(a);                                                                               \
    }

#define QGEMV_DTYPES(FMT, F)                                                                       \
    QGEMV(FMT, F, f32, float, 0)                                                                   \
    QGEMV(FMT, F, f16, __half, 1)                                                                  \
    QGEMV(FMT, F, bf16, __nv_bfloat16, 2)

QGEMV_DTYPES(t2, QF_T2)
QGEMV_DTYPES(t3, QF_T3)
QGEMV_DTYPES(b1, QF_B1)
QGEMV_DTYPES(i4, QF_I4)
QGEMV_DTYPES(i4a, QF_I4A)
QGEMV_DTYPES(i8, QF_I8)

// y[i] = Σ_c part[c·mn + i] over the splits in order (deterministic), i < mn = m·N.
template <typename T>
__device__ __forceinline__ void qgemv_reduce(const float *part, T *y, uint64_t mn,
                                             uint32_t splits) {
    GRID_STRIDE_LOOP(i, mn) {
        float s = 0.f;
        for (uint32_t c = 0; c < splits; ++c) s += part[c * mn + i];
        y[i] = from_f32<T>(s);
    }
}

#define QGEMV_REDUCE(NAME, T)                                                                      \
    extern "C" __global__ void qgemv_reduce_##NAME(const float *part, T *y, uint64_t mn,           \
                                                   uint32_t splits) {                              \
        qgemv_reduce<T>(part, y, mn, splits);                                                      \
    }

QGEMV_REDUCE(f32, float)
QGEMV_REDUCE(f16, __half)
QGEMV_REDUCE(bf16, __nv_bfloat16)
