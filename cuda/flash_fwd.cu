// Flash attention forward (FlashAttention-2) on tensor cores: o = softmax(scale · q·kᵀ) · v over the keys
// each query sees (cuda/flash.cuh), and lse = ln Σ_j exp(scale · q·k_j) for the backward pass.
//
// Block (query block, head, batch) of 256 threads takes BM = 128 query rows, warp w rows 16w..16w+15,
// and walks tiles of BN = 64 keys over the block's key range. Shared memory (dynamic, 768·D bytes): the
// Q tile [128][D], then two K tiles and two V tiles [64][D], all swizzled (swz<D>). Tile t + 1's K and V
// copies are in flight while tile t is used. Each warp keeps its Q fragments in registers, computes
// S = Q·Kᵀ (16 × 64 per warp), folds it into a running max m and sum l per row in base 2 (online
// softmax), turns the S accumulators into P fragments in place and adds P·V into its O accumulators.
// Launch: grid (ceil(sq / 128), heads, batch), block 256, dynamic shared memory 768·D bytes.
#include "flash.cuh"

#define FWD_BM 128
#define FWD_BN 64
#define FWD_THREADS 256

template <bool F16, int D> __device__ __forceinline__ void flash_fwd(const FlashParams &p) {
    constexpr int KS = D / 16; // k-steps of Q·Kᵀ
    constexpr int ON = D / 8;  // n-tiles of O
    extern __shared__ __align__(128) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = 2 * (lane & 3);
    const uint32_t b = blockIdx.z, h = blockIdx.y;
    const int sq = (int)p.sq;
    // Causal blocks near the end of the sequence see the most keys: start them first.
    const int i0 = (int)(gridDim.x - 1 - blockIdx.x) * FWD_BM;
    const int i1 = min(i0 + FWD_BM, sq);
    const uint32_t hk = h / (p.heads / p.kv_heads);
    const uint64_t q_stride = (uint64_t)p.heads * D, kv_stride = (uint64_t)p.kv_heads * D;
    const uint16_t *q = (const uint16_t *)p.q + ((uint64_t)b * p.sq + i0) * q_stride + (uint64_t)h * D;
    const uint16_t *k = (const uint16_t *)p.k + (uint64_t)b * p.sk * kv_stride + (uint64_t)hk * D;
    const uint16_t *v = (const uint16_t *)p.v + (uint64_t)b * p.sk * kv_stride + (uint64_t)hk * D;

    const uint32_t s_q = smem_addr(smem);
    const uint32_t s_k = s_q + 2 * FWD_BM * D;
    const uint32_t s_v = s_k + 2 * 2 * FWD_BN * D;

    int blo, bhi;
    flash_block_keys(p, b, i0, i1, blo, bhi);
    const int j_first = blo & ~(FWD_BN - 1);
    const int nt = blo < bhi ? (bhi - j_first + FWD_BN - 1) / FWD_BN : 0;

    // Rows past sq take the last row's keys: their results are dropped, and this keeps them from
    // forcing the masked path or reading documents past the sequence.
    const int row0 = i0 + 16 * warp;
    const bool active = row0 < sq; // a warp whose rows are all past sq only joins the copies and barriers
    int lo0, hi0, lo1, hi1, w_lo, w_hi, last_lo, first_hi;
    flash_row_range(p, b, min(row0 + g, sq - 1), lo0, hi0);
    flash_row_range(p, b, min(row0 + g + 8, sq - 1), lo1, hi1);
    // The ends are nondecreasing in the row, so the warp's first and last rows bound all of its rows.
    flash_row_range(p, b, min(row0, sq - 1), w_lo, first_hi);
    flash_row_range(p, b, min(row0 + 15, sq - 1), last_lo, w_hi);

    if (nt > 0) {
        flash_load_tile<D>(s_q, q, q_stride, FWD_BM, i1 - i0, tid, FWD_THREADS);
        flash_load_tile<D>(s_k, k + (uint64_t)j_first * kv_stride, kv_stride, FWD_BN, bhi - j_first, tid,
                           FWD_THREADS);
        flash_load_tile<D>(s_v, v + (uint64_t)j_first * kv_stride, kv_stride, FWD_BN, bhi - j_first, tid,
                           FWD_THREADS);
        cp_async_commit();
    }

    uint32_t qa[KS][4];
    float o[ON][4];
#pragma unroll
    for (int n = 0; n < ON; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // Running max (base 2, scaled) and this thread's share of the running sum of rows g and g + 8.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int t = 0; t < nt; t++) {
        const int j0 = j_first + t * FWD_BN;
        const uint32_t buf = (uint32_t)(t & 1) * 2 * FWD_BN * D;
        if (t + 1 < nt) {
            // Buffer buf ^ 1 was last read in tile t − 1, before that tile's closing barrier.
            const int jn = j0 + FWD_BN;
            const uint32_t nbuf = (uint32_t)((t + 1) & 1) * 2 * FWD_BN * D;
            flash_load_tile<D>(s_k + nbuf, k + (uint64_t)jn * kv_stride, kv_stride, FWD_BN, bhi - jn, tid,
                               FWD_THREADS);
            flash_load_tile<D>(s_v + nbuf, v + (uint64_t)jn * kv_stride, kv_stride, FWD_BN, bhi - jn, tid,
                               FWD_THREADS);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        if (active && t == 0) {
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldsm_x4(frag_a<D>(s_q, 16 * warp, 16 * kk, lane), qa[kk]);
        }
        // Warps whose rows see no key of this tile skip it (most of the diagonal tile under causal).
        if (active && j0 < w_hi && j0 + FWD_BN > w_lo) {
            float s[8][4];
#pragma unroll
            for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
#pragma unroll
                for (int np = 0; np < 4; np++) {
                    uint32_t r[4];
                    ldsm_x4(frag_b_nk<D>(s_k + buf, 16 * np, 16 * kk, lane), r);
                    mma_16816<F16>(s[2 * np], qa[kk], r[0], r[1]);
                    mma_16816<F16>(s[2 * np + 1], qa[kk], r[2], r[3]);
                }
            }

            const float sc = p.scale_log2;
            if (!p.key_valid && j0 >= last_lo && j0 + FWD_BN <= first_hi) {
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[n][e] *= sc;
            } else {
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = j0 + 8 * n + c + e;
                        // key_valid is read once for both rows, ahead of their range tests, so it needs
                        // its own bound: the last tile may run past sk.
                        const bool kv = !p.key_valid ||
                                        (j < (int)p.sk && p.key_valid[(uint64_t)b * p.sk + j] != 0);
                        s[n][e] = kv && j >= lo0 && j < hi0 ? s[n][e] * sc : -INFINITY;
                        s[n][2 + e] = kv && j >= lo1 && j < hi1 ? s[n][2 + e] * sc : -INFINITY;
                    }
            }

            float mx[2] = {m[0], m[1]};
#pragma unroll
            for (int n = 0; n < 8; n++) {
                mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
            }
            float alpha[2], off[2];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
                // A row that has seen no key yet keeps m = −∞: offset 0 makes its exp2(−∞) terms 0, not NaN.
                off[r] = mx[r] == -INFINITY ? 0.f : mx[r];
                alpha[r] = fast_exp2(m[r] - off[r]);
                m[r] = mx[r];
                l[r] *= alpha[r];
            }
#pragma unroll
            for (int n = 0; n < ON; n++) {
                o[n][0] *= alpha[0];
                o[n][1] *= alpha[0];
                o[n][2] *= alpha[1];
                o[n][3] *= alpha[1];
            }

            // P in place of S: the C fragments of key n-tiles 2kk and 2kk + 1 are the A fragment of
            // k-step kk of P·V.
#pragma unroll
            for (int kk = 0; kk < FWD_BN / 16; kk++) {
                uint32_t pa[4];
#pragma unroll
                for (int x = 0; x < 2; x++) {
                    float *sn = s[2 * kk + x];
                    const float p0 = fast_exp2(sn[0] - off[0]), p1 = fast_exp2(sn[1] - off[0]);
                    const float p2 = fast_exp2(sn[2] - off[1]), p3 = fast_exp2(sn[3] - off[1]);
                    l[0] += p0 + p1;
                    l[1] += p2 + p3;
                    pa[2 * x] = pack_f32x2<F16>(p0, p1);
                    pa[2 * x + 1] = pack_f32x2<F16>(p2, p3);
                }
#pragma unroll
                for (int dn = 0; dn < D / 16; dn++) {
                    uint32_t r[4];
                    ldsm_x4_t(frag_b_kn<D>(s_v + buf, 16 * kk, 16 * dn, lane), r);
                    mma_16816<F16>(o[2 * dn], pa, r[0], r[1]);
                    mma_16816<F16>(o[2 * dn + 1], pa, r[2], r[3]);
                }
            }
        }
        // Tile t + 2 overwrites this tile's buffers.
        if (t + 2 < nt) __syncthreads();
    }

    float *lse = p.lse + ((uint64_t)b * p.heads + h) * p.sq;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        const int i = row0 + g + 8 * r;
        if (i >= sq) continue;
        // A row that saw no key has l = 0: zero output, lse = −∞.
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        uint16_t *orow = (uint16_t *)p.o + ((uint64_t)b * p.sq + i) * q_stride + (uint64_t)h * D;
#pragma unroll
        for (int n = 0; n < ON; n++)
            *(uint32_t *)(orow + 8 * n + c) = pack_f32x2<F16>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if ((lane & 3) == 0) lse[i] = sum > 0.f ? m[r] * 0.6931471805599453f + logf(sum) : -INFINITY;
    }
}

extern "C" __global__ void __launch_bounds__(FWD_THREADS) flash_fwd_f16_d64(const FlashParams p) {
    flash_fwd<true, 64>(p);
}
extern "C" __global__ void __launch_bounds__(FWD_THREADS) flash_fwd_bf16_d64(const FlashParams p) {
    flash_fwd<false, 64>(p);
}
extern "C" __global__ void __launch_bounds__(FWD_THREADS) flash_fwd_f16_d128(const FlashParams p) {
    flash_fwd<true, 128>(p);
}
extern "C" __global__ void __launch_bounds__(FWD_THREADS) flash_fwd_bf16_d128(const FlashParams p) {
    flash_fwd<false, 128>(p);
}
