// Flash attention backward (FlashAttention-2's key-block order) over the forward's o and lse, in three
// kernels: flash_bwd_pre_* (delta = rowsum(dout ∘ o), dq_acc = 0), flash_bwd_* (one block per 128 keys
// of a kv head: dK and dV in registers, dQ added into dq_acc in f32) and flash_bwd_dq_* (dq_acc to the
// inputs' dtype). Layouts, masks and the tile helpers are cuda/flash.cuh's.
//
// The main kernel works on transposed scores so that each warp owns 16 keys as the rows of its mma
// tiles: per step of 32 queries, Sᵀ = K·Qᵀ, Pᵀ = exp(scale·Sᵀ − lse), dV += Pᵀ·dO, dPᵀ = V·dOᵀ,
// dSᵀ = Pᵀ ∘ (dPᵀ − delta), dK += dSᵀ·Q, and dQ += scale·dS·K from dSᵀ staged in shared memory. The
// block owns its keys for every query head of the group, so dK and dV need no atomics.
#include "flash.cuh"

constexpr int THREADS = 256;
constexpr int BN = 128; // keys per block, 16 per warp
constexpr int BM = 32;  // queries per step
constexpr float LOG2E = 1.4426950408889634f;

// The dSᵀ tile [BN keys][BM queries], 16-bit: its 64-byte rows hold four 16-byte granules, XORed with
// row bits 1..2 so that ldmatrix's eight consecutive rows (and the fragment stores, two granules of
// eight rows) fall on distinct banks. Returns the byte offset of (row, col), col even.
__device__ __forceinline__ uint32_t ds_off(uint32_t row, uint32_t col) {
    return row * (BM * 2) + (((col >> 3) ^ (row >> 1)) & 3) * 16 + (col & 7) * 2;
}

// Per step buffer of the query columns: lse·log2(e) (+∞ when lse = −∞, so that exp2(s − it) = 0),
// delta, and the [lo, hi) keys each query sees (empty past sq).
struct StepInfo {
    float lse2[BM], delta[BM];
    int lo[BM], hi[BM];
};

template <bool F16, int D> __device__ __forceinline__ void flash_bwd_pre(const FlashParams &p) {
    const uint32_t *o = (const uint32_t *)p.o, *g = (const uint32_t *)p.dout;
    const int lane = threadIdx.x & 31;
    const uint64_t rows = (uint64_t)p.batch * p.sq * p.heads;
    for (uint64_t r = (uint64_t)blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5); r < rows;
         r += (uint64_t)gridDim.x * (THREADS / 32)) {
        float acc = 0.f;
#pragma unroll
        for (int c = lane; c < D / 2; c += 32) {
            const uint32_t x = o[r * (D / 2) + c], y = g[r * (D / 2) + c];
            acc += f32_of<F16>((uint16_t)x) * f32_of<F16>((uint16_t)y);
            acc += f32_of<F16>((uint16_t)(x >> 16)) * f32_of<F16>((uint16_t)(y >> 16));
        }
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, s);
        float *dq = p.dq_acc + r * D;
#pragma unroll
        for (int c = lane; c < D; c += 32) dq[c] = 0.f;
        if (lane == 0) {
            const uint64_t h = r % p.heads, bi = r / p.heads; // bi = b·sq + i
            p.delta[(bi / p.sq * p.heads + h) * p.sq + bi % p.sq] = acc;
        }
    }
}

template <bool F16, int D> __device__ __forceinline__ void flash_bwd_main(const FlashParams &p) {
    // Dynamic shared memory, 768·D + 9216 bytes: K, V [BN][D]; Q, dO [BM][D] × 2 buffers; dSᵀ [BN][BM];
    // StepInfo × 2.
    extern __shared__ __align__(128) uint8_t smem[];
    constexpr uint32_t TILE_Q = BM * D * 2, TILE_K = BN * D * 2;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint32_t b = blockIdx.z, hk = blockIdx.y;
    const int sq = (int)p.sq, sk = (int)p.sk, heads = (int)p.heads, group = heads / (int)p.kv_heads;
    const int j0 = blockIdx.x * BN, j1 = min(j0 + BN, sk);
    int ilo, ihi;
    flash_block_queries(p, b, j0, j1, ilo, ihi);
    const int nsteps = (ihi - ilo + BM - 1) / BM;
    // Steps run over (query head of the group, block of BM queries); none when no query sees a key.
    const int n = group * nsteps;

    const uint16_t *q = (const uint16_t *)p.q, *dout = (const uint16_t *)p.dout;
    const uint64_t qstride = (uint64_t)heads * D, kstride = (uint64_t)p.kv_heads * D;
    const uint64_t kvoff = ((uint64_t)b * sk + j0) * kstride + (uint64_t)hk * D;
    const uint32_t sK = smem_addr(smem), sV = sK + TILE_K, sQ = sV + TILE_K, sO = sQ + 2 * TILE_Q;
    const uint32_t sS = sO + 2 * TILE_Q;
    uint8_t *ds = smem + (sS - sK);
    StepInfo *info = (StepInfo *)(ds + BN * BM * 2);

    auto step_head = [&](int t) { return (int)hk * group + t / nsteps; };
    auto step_row = [&](int t) { return ilo + (t % nsteps) * BM; };
    auto load_tiles = [&](int t) {
        const int i0 = step_row(t);
        const uint64_t off = ((uint64_t)b * sq + i0) * qstride + (uint64_t)step_head(t) * D;
        const uint32_t buf = (t & 1) * TILE_Q;
        flash_load_tile<D>(sQ + buf, q + off, qstride, BM, sq - i0, tid, THREADS);
        flash_load_tile<D>(sO + buf, dout + off, qstride, BM, sq - i0, tid, THREADS);
    };
    // Warp 0 fetches a step's column data into registers (lane = column) ahead of storing it, since lse
    // and delta rows start at any float, too unaligned for cp.async's 16-byte copies.
    float f_lse2 = 0.f, f_delta = 0.f;
    int f_lo = 0, f_hi = 0;
    auto fetch_info = [&](int t) {
        const int i = step_row(t) + lane;
        f_lse2 = f_delta = 0.f;
        f_lo = f_hi = 0;
        if (i < sq) {
            const uint64_t at = ((uint64_t)b * heads + step_head(t)) * sq + i;
            const float lse = p.lse[at];
            f_lse2 = lse == -INFINITY ? INFINITY : lse * LOG2E;
            f_delta = p.delta[at];
            flash_row_range(p, b, i, f_lo, f_hi);
        }
    };
    auto store_info = [&](int t) {
        StepInfo &s = info[t & 1];
        s.lse2[lane] = f_lse2;
        s.delta[lane] = f_delta;
        s.lo[lane] = f_lo;
        s.hi[lane] = f_hi;
    };

    // This thread's two key rows (fragment rows g and g + 8 of the warp's 16 keys) and whether they exist
    // and are not padding.
    const int jr = j0 + 16 * warp + (lane >> 2);
    bool key_ok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = jr + 8 * r;
        key_ok[r] = j < sk && (!p.key_valid || p.key_valid[(uint64_t)b * sk + j] != 0);
    }

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int x = 0; x < D / 8; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[x][e] = dv[x][e] = 0.f;

    if (n > 0) {
        flash_load_tile<D>(sK, (const uint16_t *)p.k + kvoff, kstride, BN, j1 - j0, tid, THREADS);
        flash_load_tile<D>(sV, (const uint16_t *)p.v + kvoff, kstride, BN, j1 - j0, tid, THREADS);
        load_tiles(0);
        cp_async_commit();
        if (warp == 0) {
            fetch_info(0);
            store_info(0);
        }
    }
    const int c0 = 2 * (lane & 3); // this thread's first column in C fragments
    const int ksteps = (j1 - j0 + 15) / 16; // key blocks of 16 holding keys < sk, for dQ
    for (int t = 0; t < n; ++t) {
        // The buffers of step t + 1 were last read before step t − 1's second barrier.
        if (t + 1 < n) load_tiles(t + 1);
        cp_async_commit();
        if (warp == 0 && t + 1 < n) fetch_info(t + 1);
        cp_async_wait<1>();
        __syncthreads();
        const uint32_t qb = sQ + (t & 1) * TILE_Q, ob = sO + (t & 1) * TILE_Q;
        const StepInfo &si = info[t & 1];

        float s[4][4];
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[x][e] = 0.f;
        // Partly rolled k loops (here, for dPᵀ and for dQ) keep nvcc from hoisting every fragment address
        // out of the step loop: at D = 128 the dK and dV accumulators leave little room for them.
#pragma unroll 2
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(frag_a<D>(sK, 16 * warp, 16 * kk, lane), a);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                uint32_t f[4];
                ldsm_x4(frag_b_nk<D>(qb, 16 * np, 16 * kk, lane), f);
                mma_16816<F16>(s[2 * np], a, f[0], f[1]);
                mma_16816<F16>(s[2 * np + 1], a, f[2], f[3]);
            }
        }
        // Pᵀ in place; s[x][2r + e] is (key jr + 8r, query column 8x + c0 + e).
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = 8 * x + c0 + e;
                const float l2 = si.lse2[col];
                const int lo = si.lo[col], hi = si.hi[col];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int j = jr + 8 * r;
                    const bool vis = key_ok[r] && j >= lo && j < hi;
                    s[x][2 * r + e] = vis ? fast_exp2(s[x][2 * r + e] * p.scale_log2 - l2) : 0.f;
                }
            }
        // dV += Pᵀ·dO: the accumulators of query columns 16kk..16kk+15 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            const uint32_t a[4] = {pack_f32x2<F16>(s[2 * kk][0], s[2 * kk][1]),
                                   pack_f32x2<F16>(s[2 * kk][2], s[2 * kk][3]),
                                   pack_f32x2<F16>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack_f32x2<F16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t f[4];
                ldsm_x4_t(frag_b_kn<D>(ob, 16 * kk, 16 * np, lane), f);
                mma_16816<F16>(dv[2 * np], a, f[0], f[1]);
                mma_16816<F16>(dv[2 * np + 1], a, f[2], f[3]);
            }
        }
        float dp[4][4];
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[x][e] = 0.f;
#pragma unroll 2
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t a[4];
            ldsm_x4(frag_a<D>(sV, 16 * warp, 16 * kk, lane), a);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                uint32_t f[4];
                ldsm_x4(frag_b_nk<D>(ob, 16 * np, 16 * kk, lane), f);
                mma_16816<F16>(dp[2 * np], a, f[0], f[1]);
                mma_16816<F16>(dp[2 * np + 1], a, f[2], f[3]);
            }
        }
        // dSᵀ in place of dPᵀ.
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float dl = si.delta[8 * x + c0 + e];
#pragma unroll
                for (int r = 0; r < 2; ++r) dp[x][2 * r + e] = s[x][2 * r + e] * (dp[x][2 * r + e] - dl);
            }
        // dK += dSᵀ·Q (scaled once at the end).
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            const uint32_t a[4] = {pack_f32x2<F16>(dp[2 * kk][0], dp[2 * kk][1]),
                                   pack_f32x2<F16>(dp[2 * kk][2], dp[2 * kk][3]),
                                   pack_f32x2<F16>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                   pack_f32x2<F16>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int np = 0; np < D / 16; ++np) {
                uint32_t f[4];
                ldsm_x4_t(frag_b_kn<D>(qb, 16 * kk, 16 * np, lane), f);
                mma_16816<F16>(dk[2 * np], a, f[0], f[1]);
                mma_16816<F16>(dk[2 * np + 1], a, f[2], f[3]);
            }
        }
#pragma unroll
        for (int x = 0; x < 4; ++x)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                *(uint32_t *)(ds + ds_off(16 * warp + (lane >> 2) + 8 * r, 8 * x + c0)) =
                    pack_f32x2<F16>(dp[x][2 * r] * p.scale, dp[x][2 * r + 1] * p.scale);
        __syncthreads();
        if (warp == 0 && t + 1 < n) store_info(t + 1);

        // dQ [BM][D] += dS·K: warp w takes query rows 16(w % 2).. and columns (w / 2)·D/4.., its A
        // fragments transposed out of the dSᵀ tile.
        constexpr int QN = D / 32; // n-tiles of 8 columns per warp
        const int mt = warp & 1, n0 = (warp >> 1) * (D / 4);
        float dq[QN][4];
#pragma unroll
        for (int x = 0; x < QN; ++x)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[x][e] = 0.f;
#pragma unroll 1
        for (int kk = 0; kk < ksteps; ++kk) {
            uint32_t a[4];
            ldsm_x4_t(sS + ds_off(16 * kk + (lane & 7) + ((lane >> 4) << 3), 16 * mt + ((lane >> 3) & 1) * 8), a);
#pragma unroll
            for (int np = 0; np < QN / 2; ++np) {
                uint32_t f[4];
                ldsm_x4_t(frag_b_kn<D>(sK, 16 * kk, n0 + 16 * np, lane), f);
                mma_16816<F16>(dq[2 * np], a, f[0], f[1]);
                mma_16816<F16>(dq[2 * np + 1], a, f[2], f[3]);
            }
        }
        // Rows from ihi on see none of these keys: their dq[...] are zeros.
        const int i0 = step_row(t) + 16 * mt + (lane >> 2);
        const int h = step_head(t);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = i0 + 8 * r;
            if (i < ihi) {
                float *dst = p.dq_acc + (((uint64_t)b * sq + i) * heads + h) * D + n0 + c0;
#pragma unroll
                for (int x = 0; x < QN; ++x) {
                    red_add_f32(dst + 8 * x, dq[x][2 * r]);
                    red_add_f32(dst + 8 * x + 1, dq[x][2 * r + 1]);
                }
            }
        }
    }

    // Keys past sk are not stored; keys no query sees store zeros.
    uint16_t *dkp = (uint16_t *)p.dk, *dvp = (uint16_t *)p.dv;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = jr + 8 * r;
        if (j < sk) {
            const uint64_t off = ((uint64_t)b * sk + j) * kstride + (uint64_t)hk * D + c0;
#pragma unroll
            for (int x = 0; x < D / 8; ++x) {
                *(uint32_t *)(dvp + off + 8 * x) = pack_f32x2<F16>(dv[x][2 * r], dv[x][2 * r + 1]);
                *(uint32_t *)(dkp + off + 8 * x) =
                    pack_f32x2<F16>(dk[x][2 * r] * p.scale, dk[x][2 * r + 1] * p.scale);
            }
        }
    }
}

template <bool F16, int D> __device__ __forceinline__ void flash_bwd_dq(const FlashParams &p) {
    const uint64_t pairs = (uint64_t)p.batch * p.sq * p.heads * (D / 2);
    uint32_t *dq = (uint32_t *)p.dq;
    for (uint64_t x = (uint64_t)blockIdx.x * THREADS + threadIdx.x; x < pairs; x += (uint64_t)gridDim.x * THREADS)
        dq[x] = pack_f32x2<F16>(p.dq_acc[2 * x], p.dq_acc[2 * x + 1]);
}

#define FLASH_BWD_ENTRIES(NAME, F16, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_pre_##NAME(const FlashParams p) {     \
        flash_bwd_pre<F16, D>(p);                                                                           \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_##NAME(const FlashParams p) {         \
        flash_bwd_main<F16, D>(p);                                                                          \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_bwd_dq_##NAME(const FlashParams p) {      \
        flash_bwd_dq<F16, D>(p);                                                                            \
    }

FLASH_BWD_ENTRIES(f16_d64, true, 64)
FLASH_BWD_ENTRIES(f16_d128, true, 128)
FLASH_BWD_ENTRIES(bf16_d64, false, 64)
FLASH_BWD_ENTRIES(bf16_d128, false, 128)
