// Tensor-core GEMM for packed low-bit weights (launched by src/cuda/qgemm.rs): y[m, N] = x[m, K] · Ŵᵀ,
// Ŵ the dequantized rows of a packed weight matrix (layouts in src/quant/format.rs), for any m.
//
// Tiling. A block computes a BM × 128 tile of y (kernels _m16, _m64, _m128 by m; grid x over N tiles,
// y over m tiles). Warp tiles are 16·MT rows × 32 columns (4 n8 tiles of mma.sync.m16n8k16, bf16
// inputs, or f16 for f16 activations; f32 accumulators): _m16 has 8 warps, two groups of 4 that each
// take one half of every step's k slices and add their tiles at the end; _m64 has 4 warps of 64 × 32
// and _m128 8 warps of 64 × 32. The K loop runs in steps of KS = min(format block, 8 KB of
// activations) weights. A step's activation tile [BM, KS] is copied as it sits (16-byte cp.async, rows
// past m and columns past K zero-filled) into a ring of L + 1 stages; the packed bytes of the 128
// weight rows of a whole format block (64 bytes a row: 256 ternary, 128 int4, 64 int8 or 512 binary
// weights; 52 bytes for ternary3) and the block's scales and mins go into a ring of W buffers,
// committed with the block's first step. Copies run L steps ahead of the math, L and the W ring as
// deep as 48 KB of shared memory allows (the launcher picks both; a W buffer is refilled only once
// every step reading it has passed a barrier). One barrier per step.
//
// Fragments. In each 16-wide k slice, thread tig (lane % 4) owns the consecutive weights
// k0 = 16·slice + 4·tig .. k0 + 3 of its row and feeds them to the mma slots 2·tig, 2·tig + 1 (b0) and
// 2·tig + 8, 2·tig + 9 (b1): a permutation of k inside the slice, applied to A alike, so a0|a2 of a row
// is one 64-bit load of x[k0 .. k0 + 3] and the four weights come from one 32-bit word of packed bytes.
// Each thread decodes exactly its own weights from shared memory with byte permutes and mantissa
// tricks (0x43xx is the bf16 128 + xx, 0x64xx the f16 1024 + xx), then applies the scale (and min)
// with packed fmas, so a weight never exists in a wider form. f32 activations are rounded to bf16 at
// the fragment load (the products run on bf16 tensor cores; accumulation is f32); f16 activations
// meet f16 weights, whose range ends at 65504 and whose subnormals start below 6.1e-5. Shared memory
// rows are XOR-swizzled in 16-byte granules so fragment loads are free of bank conflicts. Padding
// weights past K (not zero for int4 asym or binary) meet zero activations.
#include "common.cuh"

// ---- PTX primitives -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// `bytes` (≤ the copy size) are read from src and the rest of the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, uint32_t bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async8(void *dst, const void *src, uint32_t bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async4(void *dst, const void *src, uint32_t bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
    uint32_t v;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
    return v;
}

// d += a · b for one m16n8k16 tile; F16 picks f16 inputs, else bf16.
template <bool F16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (F16) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Packed a · b + c on two 16-bit floats, one rounding.
template <bool F16> __device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    if constexpr (F16)
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// (lo, hi) rounded to nearest into one register, lo in the low half.
template <bool F16> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    uint32_t d;
    if constexpr (F16)
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// ---- Shapes ---------------------------------------------------------------------------------------

// Formats, in the order of the kernel names (t2, t3, b1, i4, i4a, i8).
enum : int { FT2, FT3, FB1, FI4, FI4A, FI8 };

// Weights per W buffer: one packed block (64 bytes a row; Binary: 8 blocks of 8 bytes).
template <int F> __host__ __device__ constexpr int block_k() {
    return F == FT2 || F == FT3 ? 256 : F == FB1 ? 512 : F == FI8 ? 64 : 128;
}

constexpr int kBN = 128;                    // output features per block
constexpr int kWRow = 64;                   // shared bytes per weight row in a W buffer
constexpr int kWBytes = kBN * kWRow;        // packed part of a W buffer; scales and mins follow
constexpr int kMaxLookahead = 6;

// WARPS_K > 1 splits each step's slices between warp groups, which add their partial tiles at the end:
// more warps to hide latency per block without more activation traffic.
template <int BM_, int WARPS_M_, int WARPS_K_, int MIN_BLOCKS_, int KS_B16, int KS_F32> struct Tile {
    static constexpr int BM = BM_, WARPS_M = WARPS_M_, WARPS_N = 4, WARPS_K = WARPS_K_, MIN_BLOCKS = MIN_BLOCKS_;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N * WARPS_K;
    static constexpr int WM = BM / WARPS_M, WN = kBN / WARPS_N;
    static constexpr int MT = WM / 16, NT = WN / 8;
    // Activations per step: 8 KB of x at most (src/cuda/qgemm.rs mirrors these numbers).
    template <int SZ> __host__ __device__ static constexpr int ks_max() { return SZ == 4 ? KS_F32 : KS_B16; }
};
using Tile16 = Tile<16, 1, 2, 2, 128, 128>;
using Tile64 = Tile<64, 1, 1, 3, 64, 32>;
using Tile128 = Tile<128, 2, 1, 2, 32, 16>;  // no f32 kernel: 16-weight steps would not pay

template <class T> constexpr bool is_f16 = false;
template <> constexpr bool is_f16<__half> = true;

// The 16-bit pattern of a small integer v in f16 or bf16 (exact for the constants used here).
__host__ __device__ constexpr uint32_t half_bits(bool f16, int v) {
    uint32_t sign = v < 0 ? 0x8000u : 0u;
    uint32_t a = (uint32_t)(v < 0 ? -v : v);
    if (a == 0) return sign;
    int e = 0;
    while ((a >> (e + 1)) != 0) ++e;
    const int mbits = f16 ? 10 : 7;
    uint32_t mant = e >= mbits ? (a >> (e - mbits)) : (a << (mbits - e));
    mant &= (1u << mbits) - 1u;
    uint32_t bias = f16 ? 15u : 127u;
    return sign | ((uint32_t)(e + (int)bias) << mbits) | mant;
}
__host__ __device__ constexpr uint32_t splat(uint32_t h) { return h | (h << 16); }
static_assert(half_bits(false, -129) == 0xC301u && half_bits(false, 1) == 0x3F80u, "bf16 constants");
static_assert(half_bits(true, -1152) == 0xE480u && half_bits(true, 1) == 0x3C00u, "f16 constants");

// Decoding constants: (MAGIC << 8) | v is the 16-bit float BASE + v for v < 128 (bf16) or < 1024 (f16).
template <bool F16> struct Half {
    static constexpr uint32_t MAGIC = F16 ? 0x64u : 0x43u;
    static constexpr int BASE = F16 ? 1024 : 128;
    static constexpr uint32_t MAGIC2 = splat(MAGIC << 8);
    static constexpr uint32_t ONE = splat(half_bits(F16, 1));
    static constexpr uint32_t NEG_ZERO = splat(0x8000u);
    __host__ __device__ static constexpr uint32_t neg_base(int off) { return splat(half_bits(F16, -(BASE + off))); }
};

struct Args {
    const void *x;
    void *y;
    const uint8_t *w;
    const float *scales;
    const float *mins;       // null: no mins (binary without offset)
    uint32_t m, n, k;
    uint64_t row_bytes;
    uint32_t gpr;            // scale groups per row
    uint32_t se_log2;        // log2 of the table entries per row per W buffer
    uint32_t sshift;         // entry of a weight = its k within the format block >> sshift
    uint32_t qdiv;           // entry e of block b is group min((b·entries + e) / qdiv, gpr − 1)
    uint32_t lookahead;      // steps in flight, 1..kMaxLookahead; stages = lookahead + 1
    uint32_t wbufs;          // W buffers, ≥ ceil(lookahead / steps per block) + 1
};

// ---- Decoding -------------------------------------------------------------------------------------

// Byte `lb` of a weight row in a W buffer: the row's four 16-byte granules are XOR-swizzled by (row/2)%4.
__device__ __forceinline__ uint32_t w_offset(uint32_t row, uint32_t lb) {
    return row * kWRow + ((((lb >> 4) ^ (row >> 1)) & 3u) << 4) + (lb & 15u);
}

__device__ __forceinline__ uint32_t w_word(const uint8_t *wb, uint32_t row, uint32_t lb) {
    return *reinterpret_cast<const uint32_t *>(wb + w_offset(row, lb));
}

// Scale (and min) of one weight row for a k slice, in the forms the decoders use.
template <bool F16> struct RowScale {
    float s;        // f32 scale (int8 into bf16 scales in f32)
    uint32_t s2;    // scale in both halves
    uint32_t m2;    // min (int4 asym) or offset (binary) in both halves; −0 without
};

// The four weights k0 .. k0 + 3 (k0 = kb + 4·tig, kb the slice's k within the format block) of weight
// row `row` as (b0, b1) = ((w[k0], w[k0+1]), (w[k0+2], w[k0+3])).
template <int F, bool F16>
__device__ __forceinline__ void decode(const uint8_t *wb, uint32_t row, uint32_t kb, uint32_t tig,
                                       const RowScale<F16> &sc, uint32_t &b0, uint32_t &b1) {
    using H = Half<F16>;
    if constexpr (F == FT2 || F == FI4 || F == FI4A) {
        // t2: byte i holds weight 64j + i in bits 2j..2j+1; int4: weight 64h + i in nibble h.
        constexpr uint32_t BITS = F == FT2 ? 2 : 4;
        constexpr uint32_t MASK = F == FT2 ? 0x03030303u : 0x0F0F0F0Fu;
        const uint32_t v = (w_word(wb, row, (kb & 63u) + 4 * tig) >> (BITS * (kb >> 6))) & MASK;
        const uint32_t p0 = __byte_perm(v, H::MAGIC, 0x4140), p1 = __byte_perm(v, H::MAGIC, 0x4342);
        if constexpr (F == FI4A) {
            const uint32_t q0 = hfma2<F16>(p0, H::ONE, H::neg_base(0));
            const uint32_t q1 = hfma2<F16>(p1, H::ONE, H::neg_base(0));
            b0 = hfma2<F16>(q0, sc.s2, sc.m2);
            b1 = hfma2<F16>(q1, sc.s2, sc.m2);
        } else {
            constexpr int OFF = F == FT2 ? 1 : 8;
            b0 = hfma2<F16>(hfma2<F16>(p0, H::ONE, H::neg_base(OFF)), sc.s2, H::NEG_ZERO);
            b1 = hfma2<F16>(hfma2<F16>(p1, H::ONE, H::neg_base(OFF)), sc.s2, H::NEG_ZERO);
        }
    } else if constexpr (F == FI8) {
        // One signed byte per weight, made unsigned (code + 128) so it fits a mantissa.
        const uint32_t u = w_word(wb, row, kb + 4 * tig) ^ 0x80808080u;
        if constexpr (F16) {
            const uint32_t c0 = hfma2<true>(__byte_perm(u, H::MAGIC, 0x4140), H::ONE, H::neg_base(128));
            const uint32_t c1 = hfma2<true>(__byte_perm(u, H::MAGIC, 0x4342), H::ONE, H::neg_base(128));
            b0 = hfma2<true>(c0, sc.s2, H::NEG_ZERO);
            b1 = hfma2<true>(c1, sc.s2, H::NEG_ZERO);
        } else {
            // 0x4B0000uu is the f32 2^23 + uu: bf16 cannot hold 0..255 above a power of two exactly.
            float w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                w[i] = (__uint_as_float(__byte_perm(u, 0x4B00u, 0x5440 + i)) - 8388736.f) * sc.s;
            b0 = pack2<false>(w[0], w[1]);
            b1 = pack2<false>(w[2], w[3]);
        }
    } else if constexpr (F == FB1) {
        // Bit i of the block is weight i: 1 → +α, 0 → −α, then + β. The pair (k, k+1) at bits (p, p+1)
        // of the word is first moved to bits (p', p' + 16) so one shift puts both on the sign bits.
        const uint32_t wd = w_word(wb, row, (kb >> 5) << 2);
        const uint32_t y = (kb & 16u) ? ((wd >> 16) | ((wd >> 1) & 0xFFFF0000u))
                                      : ((wd & 0xFFFFu) | ((wd << 15) & 0xFFFF0000u));
        const uint32_t p = 4 * tig;
        b0 = sc.s2 ^ (~(y << (15 - p)) & 0x80008000u);
        b1 = sc.s2 ^ (~(y << (13 - p)) & 0x80008000u);
        b0 = hfma2<F16>(b0, H::ONE, sc.m2);
        b1 = hfma2<F16>(b1, H::ONE, sc.m2);
    } else {
        // Ternary3 (TQ1_0 order): slice sb < 10 is digit sb/2 of bytes 16(sb%2) + 0..15, slices 10..14
        // digit sb − 10 of bytes 32..47, slice 15 digit tig of bytes 48..51. Digit n of a byte q is
        // ((q·3ⁿ mod 256)·3) >> 8, computed in two 16-bit lanes at once.
        const uint32_t sb = kb >> 4;
        const bool low = sb < 10, last = sb == 15;
        const uint32_t lb = low ? 16 * (sb & 1) + 4 * tig : last ? 48 : 32 + 4 * tig;
        const uint32_t n = low ? sb >> 1 : last ? tig : sb - 10;
        const uint32_t q = w_word(wb, row, lb);
        const uint32_t pw = (uint32_t)((0x511B090301ull >> (8 * n)) & 0xFF);  // 3ⁿ
        uint32_t t[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const uint32_t lanes = __byte_perm(q, 0, i == 0 ? 0x4140 : 0x4342);
            const uint32_t r = ((lanes * pw) & 0x00FF00FFu) * 3u;
            t[i] = ((r >> 8) & 0x00030003u) | H::MAGIC2;
        }
        b0 = hfma2<F16>(hfma2<F16>(t[0], H::ONE, H::neg_base(1)), sc.s2, H::NEG_ZERO);
        b1 = hfma2<F16>(hfma2<F16>(t[1], H::ONE, H::neg_base(1)), sc.s2, H::NEG_ZERO);
    }
}

// ---- Activations ----------------------------------------------------------------------------------

// XOR swizzle of the 16-byte granules of activation row r (row length AROW bytes), chosen so the
// fragment loads of a warp (8 rows × 4 threads) hit 32 distinct banks.
template <int SZ, int AROW> __device__ __forceinline__ uint32_t a_swizzle(uint32_t r) {
    if constexpr (SZ == 4)
        return 4 * (r & 1);
    else if constexpr (AROW == 64)
        return 2 * ((r >> 1) & 1);
    else
        return 2 * (r & 3);
}

// a0..a3 of the m16 tile whose first row is r, slice s: rows r and r + 8, x[k0 .. k0 + 3] each.
template <typename T, int AROW>
__device__ __forceinline__ void load_a(const uint8_t *as, uint32_t r, uint32_t s, uint32_t tig, uint32_t (&a)[4]) {
    constexpr int SZ = sizeof(T);
    const uint32_t sw = a_swizzle<SZ, AROW>(r);  // rows r and r + 8 share it
    if constexpr (SZ == 2) {
        const uint32_t lb = 32 * s + 8 * tig;
        const uint32_t off = (((lb >> 4) ^ sw) << 4) | (lb & 15u);
        const uint2 lo = *reinterpret_cast<const uint2 *>(as + r * AROW + off);
        const uint2 hi = *reinterpret_cast<const uint2 *>(as + (r + 8) * AROW + off);
        a[0] = lo.x;
        a[1] = hi.x;
        a[2] = lo.y;
        a[3] = hi.y;
    } else {
        const uint32_t off = ((4 * s + tig) ^ sw) << 4;
        const float4 lo = *reinterpret_cast<const float4 *>(as + r * AROW + off);
        const float4 hi = *reinterpret_cast<const float4 *>(as + (r + 8) * AROW + off);
        a[0] = pack2<false>(lo.x, lo.y);
        a[1] = pack2<false>(hi.x, hi.y);
        a[2] = pack2<false>(lo.z, lo.w);
        a[3] = pack2<false>(hi.z, hi.w);
    }
}

template <typename T>
__device__ __forceinline__ void store_pair(T *y, uint32_t n, uint32_t row, uint32_t col, float v0, float v1,
                                           bool pairs) {
    T *p = y + (uint64_t)row * n + col;
    if (pairs && col + 1 < n) {
        if constexpr (sizeof(T) == 4)
            *reinterpret_cast<float2 *>(p) = make_float2(v0, v1);
        else
            *reinterpret_cast<uint32_t *>(p) = pack2<is_f16<T>>(v0, v1);
    } else {
        if (col < n) p[0] = from_f32<T>(v0);
        if (col + 1 < n) p[1] = from_f32<T>(v1);
    }
}

// ---- The kernel -----------------------------------------------------------------------------------

template <int F, typename T, class TL> __device__ __forceinline__ void qgemm_tile(const Args &a, uint8_t *smem) {
    constexpr bool F16 = is_f16<T>;
    constexpr int SZ = sizeof(T);
    constexpr int BKW = block_k<F>();
    constexpr int KS = BKW < TL::template ks_max<SZ>() ? BKW : TL::template ks_max<SZ>();
    static_assert(KS >= 32 && BKW % KS == 0, "a step is a whole number of slice pairs inside one block");
    constexpr int P = BKW / KS;        // steps per W buffer
    constexpr int NS = KS / 16;        // k slices per step
    constexpr int GE = 16 / SZ;        // activations per 16-byte granule
    constexpr int AROW = KS * SZ;
    constexpr int AGR = AROW / 16;     // granules per activation row
    constexpr int ASTAGE = TL::BM * AROW;
    constexpr int THREADS = TL::THREADS, MT = TL::MT, NT = TL::NT;
    constexpr int NSW = NS / TL::WARPS_K;  // slices per warp per step
    static_assert(NSW % 2 == 0, "warps take whole slice pairs");

    const T *__restrict__ x = static_cast<const T *>(a.x);
    T *__restrict__ y = static_cast<T *>(a.y);
    const uint32_t M = a.m, N = a.n, K = a.k;
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t g = lane >> 2, tig = lane & 3;
    const uint32_t wn = (warp % TL::WARPS_N) * TL::WN, wm = (warp / TL::WARPS_N % TL::WARPS_M) * TL::WM;
    const uint32_t kh = warp / (TL::WARPS_N * TL::WARPS_M);  // which share of each step's slices
    const uint32_t m0 = blockIdx.y * TL::BM, n0 = blockIdx.x * kBN;
    const uint32_t se = 1u << a.se_log2;
    const uint32_t L = a.lookahead, SA = L + 1, SWB = a.wbufs;
    const uint32_t table = kBN * se * 4;    // bytes of scales (and again of mins) per W buffer
    const uint32_t wbuf = kWBytes + table * (a.mins ? 2 : 1);
    if (L < 1 || L > kMaxLookahead || SWB < (L + P - 1) / P + 1 ||
        dynamic_smem_bytes() < SA * ASTAGE + SWB * wbuf)
        __trap();
    uint8_t *const ws = smem + SA * ASTAGE;
    const bool vec = (K * SZ) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    const uint32_t nsteps = (K + KS - 1) / KS;

    // Copies step t's activations and, at the first step of a block, the block's weights and
    // scales; commits one group either way so the group count tracks the step count.
    auto issue = [&](uint32_t t) {
        if (t < nsteps) {
            uint8_t *as = smem + (t % SA) * ASTAGE;
#pragma unroll
            for (int it = 0; it < (TL::BM * AGR + THREADS - 1) / THREADS; ++it) {
                const uint32_t i = tid + it * THREADS, r = i / AGR, c = i % AGR;
                if (TL::BM * AGR % THREADS != 0 && i >= TL::BM * AGR) break;
                const uint32_t gm = m0 + r, k = t * KS + c * GE;
                const uint32_t valid = gm < M && k < K ? min(K - k, (uint32_t)GE) : 0;
                const T *src = x + (uint64_t)gm * K + k;
                uint8_t *dst = as + r * AROW + ((c ^ a_swizzle<SZ, AROW>(r)) << 4);
                if (vec) {
                    cp_async16(dst, valid ? src : x, valid * SZ);
                } else {
                    T *d = reinterpret_cast<T *>(dst);
#pragma unroll
                    for (int e = 0; e < GE; ++e) d[e] = (uint32_t)e < valid ? src[e] : from_f32<T>(0.f);
                }
            }
            if (t % P == 0) {
                const uint32_t b = t / P;
                uint8_t *wb = ws + (b % SWB) * wbuf;
                if constexpr (F == FB1) {
                    // 8-byte rows: bytes past the row end (a partial last buffer) are zero-filled.
                    for (uint32_t i = tid; i < kBN * 8; i += THREADS) {
                        const uint32_t row = i >> 3, c = i & 7, gn = n0 + row;
                        const uint64_t off = (uint64_t)b * 64 + 8 * c;
                        const bool ok = gn < N && off < a.row_bytes;
                        cp_async8(wb + w_offset(row, 8 * c), ok ? a.w + (uint64_t)gn * a.row_bytes + off : a.w,
                                  ok ? 8 : 0);
                    }
                } else if constexpr (F == FT3) {
                    // 52-byte blocks, 4-byte aligned.
                    for (uint32_t i = tid; i < kBN * 13; i += THREADS) {
                        const uint32_t row = i / 13, c = i % 13, gn = n0 + row;
                        const uint64_t off = (uint64_t)gn * a.row_bytes + (uint64_t)b * 52 + 4 * c;
                        cp_async4(wb + w_offset(row, 4 * c), gn < N ? a.w + off : a.w, gn < N ? 4 : 0);
                    }
                } else {
#pragma unroll
                    for (int it = 0; it < kBN * 4 / THREADS; ++it) {
                        const uint32_t i = tid + it * THREADS, row = i >> 2, c = i & 3, gn = n0 + row;
                        const uint64_t off = (uint64_t)gn * a.row_bytes + (uint64_t)b * 64 + 16 * c;
                        cp_async16(wb + w_offset(row, 16 * c), gn < N ? a.w + off : a.w, gn < N ? 16 : 0);
                    }
                }
                float *ts = reinterpret_cast<float *>(wb + kWBytes);
                for (uint32_t i = tid; i < kBN * se; i += THREADS) {
                    const uint32_t row = i >> a.se_log2, e = i & (se - 1);
                    const uint32_t gn = min(n0 + row, N - 1);
                    const uint32_t gi = min(((b << a.se_log2) + e) / a.qdiv, a.gpr - 1);
                    const uint64_t off = (uint64_t)gn * a.gpr + gi;
                    cp_async4(ts + i, a.scales + off, 4);
                    if (a.mins) cp_async4(ts + kBN * se + i, a.mins + off, 4);
                }
            }
        }
        cp_async_commit();
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

    // Iteration u copies step u and, from u = L on, computes step u − L: L steps in flight.
    for (uint32_t u = 0; u < nsteps + L; ++u) {
        const bool math = u >= L;
        if (math) {
            // Groups 0 .. u − 1 are committed: leaving L − 1 in flight completes step u − L's.
            switch (L) {
            case 1: cp_async_wait<0>(); break;
            case 2: cp_async_wait<1>(); break;
            case 3: cp_async_wait<2>(); break;
            case 4: cp_async_wait<3>(); break;
            case 5: cp_async_wait<4>(); break;
            default: cp_async_wait<5>(); break;
            }
            // Also frees the stage read at step u − L − 1 and the W buffer of the block before it.
            __syncthreads();
        }
        issue(u);
        if (!math) continue;

        const uint32_t t = u - L;
        const uint8_t *as = smem + (t % SA) * ASTAGE;
        const uint32_t b = t / P, sub = t % P;
        const uint8_t *wb = ws + (b % SWB) * wbuf;
        const float *ts = reinterpret_cast<const float *>(wb + kWBytes);
        RowScale<F16> sc[NT];
#pragma unroll
        for (int ss = 0; ss < NSW; ++ss) {
            const uint32_t s = kh * NSW + ss, kb = sub * KS + 16 * s;
            if (ss % 2 == 0) {
                // Groups are ≥ 32 weights and 32-aligned, so a slice pair shares one entry.
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const uint32_t ti = ((wn + 8 * j + g) << a.se_log2) + (kb >> a.sshift);
                    const float s1 = ts[ti];
                    const float mn = a.mins ? ts[kBN * se + ti] : -0.f;
                    sc[j].s = s1;
                    sc[j].s2 = F == FI8 && !F16 ? 0u : pack2<F16>(s1, s1);
                    sc[j].m2 = F == FI4A || F == FB1 ? pack2<F16>(mn, mn) : 0u;
                }
            }
            uint32_t bf[NT][2];
#pragma unroll
            for (int j = 0; j < NT; ++j) decode<F, F16>(wb, wn + 8 * j + g, kb, tig, sc[j], bf[j][0], bf[j][1]);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                uint32_t af[4];
                load_a<T, AROW>(as, wm + 16 * i + g, s, tig, af);
#pragma unroll
                for (int j = 0; j < NT; ++j) mma16816<F16>(acc[i][j], af, bf[j][0], bf[j][1]);
            }
        }
    }

    if constexpr (TL::WARPS_K > 1) {
        // The other warp groups hand their partial tiles to group 0 through the (now idle) ring; only empty
        // copy groups are still outstanding.
        static_assert(TL::WARPS_K == 2, "one partial tile per thread of group 0");
        constexpr int HALF = THREADS / 2, ACC = MT * NT * 4;
        static_assert(ACC * HALF * 4 <= 2 * kWBytes, "the ring holds the partial tiles");
        float *red = reinterpret_cast<float *>(smem);
        __syncthreads();
        if (kh == 1) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) red[((i * NT + j) * 4 + c) * HALF + tid - HALF] = acc[i][j][c];
        }
        __syncthreads();
        if (kh == 1) return;
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][j][c] += red[((i * NT + j) * 4 + c) * HALF + tid];
    }

    const bool pairs = N % 2 == 0 && reinterpret_cast<uintptr_t>(y) % (2 * SZ) == 0;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const uint32_t r = m0 + wm + 16 * i + g;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const uint32_t col = n0 + wn + 8 * j + 2 * tig;
            if (r < M) store_pair(y, N, r, col, acc[i][j][0], acc[i][j][1], pairs);
            if (r + 8 < M) store_pair(y, N, r + 8, col, acc[i][j][2], acc[i][j][3], pairs);
        }
    }
}

// One kernel per format, dtype and tile (m16: BM = 16, m64: 64, m128: 128; no m128 for f32). The
// launcher sizes the block and the shared memory to match.
#define QGEMM_KERNEL(NAME, FMT, T, TL)                                                                      \
    extern "C" __global__ void __launch_bounds__(TL::THREADS, TL::MIN_BLOCKS)                                           \
        NAME(const T *x, T *y, const uint8_t *w, const float *scales, const float *mins, uint32_t m,     \
             uint32_t n, uint32_t k, uint64_t row_bytes, uint32_t gpr, uint32_t se_log2, uint32_t sshift, \
             uint32_t qdiv, uint32_t lookahead, uint32_t wbufs) {                                        \
        extern __shared__ __align__(16) uint8_t qgemm_smem[];                                              \
        const Args a{x, y, w, scales, mins, m, n, k, row_bytes, gpr, se_log2, sshift, qdiv, lookahead, wbufs}; \
        qgemm_tile<FMT, T, TL>(a, qgemm_smem);                                                              \
    }

#define QGEMM_FORMAT(FNAME, FMT)                                                                            \
    QGEMM_KERNEL(qgemm_##FNAME##_f32_m16, FMT, float, Tile16)                                              \
    QGEMM_KERNEL(qgemm_##FNAME##_f32_m64, FMT, float, Tile64)                                              \
    QGEMM_KERNEL(qgemm_##FNAME##_f16_m16, FMT, __half, Tile16)                                             \
    QGEMM_KERNEL(qgemm_##FNAME##_f16_m64, FMT, __half, Tile64)                                             \
    QGEMM_KERNEL(qgemm_##FNAME##_f16_m128, FMT, __half, Tile128)                                           \
    QGEMM_KERNEL(qgemm_##FNAME##_bf16_m16, FMT, __nv_bfloat16, Tile16)                                     \
    QGEMM_KERNEL(qgemm_##FNAME##_bf16_m64, FMT, __nv_bfloat16, Tile64)                                     \
    QGEMM_KERNEL(qgemm_##FNAME##_bf16_m128, FMT, __nv_bfloat16, Tile128)

QGEMM_FORMAT(t2, FT2)
QGEMM_FORMAT(t3, FT3)
QGEMM_FORMAT(b1, FB1)
QGEMM_FORMAT(i4, FI4)
QGEMM_FORMAT(i4a, FI4A)
QGEMM_FORMAT(i8, FI8)
