//! Vectorised exponential and the slice kernels built on it (softmax rows, sigmoid, SiLU and its
//! derivative).
//!
//! libm's `expf` is a scalar call per element; softmax over the demo model's attention scores alone makes
//! two million of them per layer. Here exp is a Cephes-style range reduction plus polynomial evaluated
//! 16 (AVX-512) or 8 (AVX2+FMA) lanes at a time, chosen at run time, with a portable scalar version of
//! the same algorithm elsewhere. Relative error is below 2 ulp over the whole f32 range, subnormal
//! results included; x > 88.72 gives +inf, x < -103.97 gives 0 (rounded as the true value would be),
//! NaN stays NaN.

use std::sync::OnceLock;

/// log2(e).
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody–Waite): LN2_HI has few enough significant bits that n · LN2_HI is exact for
/// every |n| < 2^9, so r = x − n · ln 2 loses nothing to cancellation.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Inputs are clamped to [CLAMP_LO, CLAMP_HI] before the reduction so that n fits the exponent split
/// below: exp(CLAMP_HI) overflows to +inf and exp(CLAMP_LO) underflows to 0, as every input beyond them
/// does.
const CLAMP_HI: f32 = 89.0;
const CLAMP_LO: f32 = -150.0;
/// Minimax coefficients of (e^r − 1 − r) / r² on [−ln2/2, ln2/2] (Cephes expf), highest degree first
/// (Cephes' constant term, 5.0000001201e-1, rounds to 0.5 in f32).
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// e^x for one value, by the same algorithm as the vector kernels (the portable path and the oracle for
/// their tails).
#[inline]
pub fn exp(x: f32) -> f32 {
    // clamp keeps NaN, which then propagates through the arithmetic.
    let x = x.clamp(CLAMP_LO, CLAMP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    for c in &P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // 2^n as two factors, each a normal float for n in [−217, 129]: multiplying by them is exact until
    // the last product, which rounds once (to a subnormal, 0 or inf where the result needs it).
    let n = n as i32;
    let half = n >> 1;
    e * pow2(half) * pow2(n - half)
}

/// 2^n for n in the normal exponent range [−126, 127].
#[inline]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// The kernel families this CPU can run, best first (detected once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2_fma && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2_fma {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    })
}

/// The function a slice kernel applies (a const generic, so that each gets its own loop).
const EXP: u8 = 0;
const SIGMOID: u8 = 1;
const SILU: u8 = 2;
const SILU_GRAD: u8 = 3;

/// f(x) for the scalar path; must match the vector kernels' formulas.
#[inline(always)]
fn apply<const F: u8>(x: f32, shift: f32) -> f32 {
    match F {
        EXP => exp(x - shift),
        SIGMOID => 1.0 / (1.0 + exp(-x)),
        SILU => x / (1.0 + exp(-x)),
        _ => {
            let s = 1.0 / (1.0 + exp(-x));
            s * (1.0 + x * (1.0 - s))
        }
    }
}

/// Runs the kernel for `F` on the best ISA; returns the sum of the outputs.
fn run<const F: u8>(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    assert_eq!(x.len(), out.len(), "simd: input and output lengths differ");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when AVX-512F, AVX2 and FMA were detected.
        Isa::Avx512 => unsafe { x86::run512::<F>(x, shift, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2Fma only when AVX2 and FMA were detected.
        Isa::Avx2Fma => unsafe { x86::run256::<F>(x, shift, out) },
        _ => portable::<F>(x, shift, out),
    }
}

/// The scalar loop, for CPUs without the vector kernels (the compiler vectorises it for the baseline ISA).
fn portable<const F: u8>(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = apply::<F>(v, shift);
        sum += *o;
    }
    sum
}

/// out[i] = exp(x[i] − shift); returns Σ out (softmax numerators and their normaliser in one pass).
///
/// # Panics
/// If the slices differ in length.
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    run::<EXP>(x, shift, out)
}

/// out[i] = 1 / (1 + exp(−x[i])).
///
/// # Panics
/// If the slices differ in length.
pub fn sigmoid(x: &[f32], out: &mut [f32]) {
    run::<SIGMOID>(x, 0.0, out);
}

/// out[i] = x[i] / (1 + exp(−x[i])) (SiLU, x · sigmoid(x)).
///
/// # Panics
/// If the slices differ in length.
pub fn silu(x: &[f32], out: &mut [f32]) {
    run::<SILU>(x, 0.0, out);
}

/// out[i] = s · (1 + x[i] · (1 − s)) with s = sigmoid(x[i]) (the derivative of SiLU).
///
/// # Panics
/// If the slices differ in length.
pub fn silu_grad(x: &[f32], out: &mut [f32]) {
    run::<SILU_GRAD>(x, 0.0, out);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CLAMP_HI, CLAMP_LO, EXP, LN2_HI, LN2_LO, LOG2E, P, SIGMOID, SILU};
    use std::arch::x86_64::*;

    /// e^x in 16 lanes; see `super::exp`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp512(x: __m512) -> __m512 {
        // max/min return their second operand when either is NaN, so a NaN x passes through both.
        let x = _mm512_min_ps(_mm512_set1_ps(CLAMP_HI), x);
        let x = _mm512_max_ps(_mm512_set1_ps(CLAMP_LO), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        // e · 2^n rounded once (to a subnormal, 0 or inf where needed), as the scalar path's two
        // factors give it, in one instruction instead of the nine that build those factors.
        _mm512_scalef_ps(e, n)
    }

    /// e^x in 8 lanes; see `super::exp`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_set1_ps(CLAMP_HI), x);
        let x = _mm256_max_ps(_mm256_set1_ps(CLAMP_LO), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(P[0]);
        for &c in &P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let n = _mm256_cvtps_epi32(n);
        let half = _mm256_srai_epi32::<1>(n);
        let rest = _mm256_sub_epi32(n, half);
        let bias = _mm256_set1_epi32(127);
        let f1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
        let f2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(rest, bias)));
        _mm256_mul_ps(_mm256_mul_ps(e, f1), f2)
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn apply512<const F: u8>(x: __m512, shift: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        match F {
            EXP => exp512(_mm512_sub_ps(x, shift)),
            SIGMOID => _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(shift, x)))),
            SILU => _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(shift, x)))),
            _ => {
                let s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(shift, x))));
                let t = _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one);
                _mm512_mul_ps(s, t)
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn apply256<const F: u8>(x: __m256, shift: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        match F {
            EXP => exp256(_mm256_sub_ps(x, shift)),
            SIGMOID => _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(shift, x)))),
            SILU => _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(shift, x)))),
            _ => {
                let s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(shift, x))));
                let t = _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one);
                _mm256_mul_ps(s, t)
            }
        }
    }

    /// # Safety
    /// The CPU supports AVX-512F; `x` and `out` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run512<const F: u8>(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        debug_assert_eq!(x.len(), out.len());
        // Sigmoid and SiLU take exp(shift − x) with shift 0, the same code path as exp(x − shift).
        let shift = _mm512_set1_ps(shift);
        let mut sum = _mm512_setzero_ps();
        let (xs, xt) = x.as_chunks::<16>();
        let (os, ot) = out.as_chunks_mut::<16>();
        for (xv, ov) in xs.iter().zip(os) {
            // SAFETY: both arrays hold 16 floats, the width of an unaligned 512-bit load/store.
            unsafe {
                let y = apply512::<F>(_mm512_loadu_ps(xv.as_ptr()), shift);
                _mm512_storeu_ps(ov.as_mut_ptr(), y);
                sum = _mm512_add_ps(sum, y);
            }
        }
        if !xt.is_empty() {
            let mask = ((1u32 << xt.len()) - 1) as __mmask16;
            // SAFETY: the mask enables only the xt.len() lanes that exist in both tails; masked-off lanes
            // are neither read nor written and cannot fault.
            unsafe {
                let y = apply512::<F>(_mm512_maskz_loadu_ps(mask, xt.as_ptr()), shift);
                _mm512_mask_storeu_ps(ot.as_mut_ptr(), mask, y);
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, y));
            }
        }
        _mm512_reduce_add_ps(sum)
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; `x` and `out` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn run256<const F: u8>(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        debug_assert_eq!(x.len(), out.len());
        let shift = _mm256_set1_ps(shift);
        let mut sum = _mm256_setzero_ps();
        let (xs, xt) = x.as_chunks::<8>();
        let (os, ot) = out.as_chunks_mut::<8>();
        for (xv, ov) in xs.iter().zip(os) {
            // SAFETY: both arrays hold 8 floats, the width of an unaligned 256-bit load/store.
            unsafe {
                let y = apply256::<F>(_mm256_loadu_ps(xv.as_ptr()), shift);
                _mm256_storeu_ps(ov.as_mut_ptr(), y);
                sum = _mm256_add_ps(sum, y);
            }
        }
        let mut total = {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
            lanes.iter().sum::<f32>()
        };
        if !xt.is_empty() {
            // The tail goes through a zero-padded vector so it gets the same rounding as the body.
            let mut buf = [0f32; 8];
            buf[..xt.len()].copy_from_slice(xt);
            // SAFETY: `buf` holds 8 floats.
            unsafe {
                let y = apply256::<F>(_mm256_loadu_ps(buf.as_ptr()), shift);
                _mm256_storeu_ps(buf.as_mut_ptr(), y);
            }
            ot.copy_from_slice(&buf[..xt.len()]);
            total += ot.iter().sum::<f32>();
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs covering the whole f32 range densely near 0 and in the subnormal-result band, plus edges.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-200_000..=100_000).map(|i| i as f32 * 1e-3).collect();
        v.extend((-1000..=1000).map(|i| i as f32 * 1e-6));
        v.extend([
            0.0,
            -0.0,
            88.72,
            88.722_83,
            88.722_84,
            89.0,
            1e4,
            -87.336_55,
            -87.4,
            -103.0,
            -103.972,
            -103.973,
            -104.0,
            -1e4,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::EPSILON,
        ]);
        v
    }

    /// Distance in units of the last place of the f64 reference (at the subnormal spacing below the
    /// normal range).
    fn ulps(got: f32, want: f64) -> f64 {
        if got as f64 == want || (got.is_infinite() && want > f32::MAX as f64) {
            return 0.0;
        }
        let ulp = if want.abs() < f32::MIN_POSITIVE as f64 {
            2f64.powi(-149)
        } else {
            let e = want.abs().log2().floor();
            2f64.powf(e - 23.0)
        };
        (got as f64 - want).abs() / ulp
    }

    type Kernel = fn(&[f32], f32, &mut [f32]) -> f32;

    /// The kernel for `F` on every ISA this CPU has, so that the AVX2 path is tested on AVX-512
    /// machines too.
    fn kernels<const F: u8>() -> Vec<(Isa, Kernel)> {
        let mut k: Vec<(Isa, Kernel)> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F was detected just above.
                k.push((Isa::Avx512, |x, s, o| unsafe { x86::run512::<F>(x, s, o) }));
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: AVX2 and FMA were detected just above.
                k.push((Isa::Avx2Fma, |x, s, o| unsafe { x86::run256::<F>(x, s, o) }));
            }
        }
        k.push((Isa::Portable, portable::<F>));
        k
    }

    #[test]
    fn exp_matches_f64_within_2_ulp() {
        let x = inputs();
        for (isa, kernel) in kernels::<EXP>() {
            let mut out = vec![0f32; x.len()];
            kernel(&x, 0.0, &mut out);
            let mut worst = (0.0, 0.0f32);
            for (&v, &got) in x.iter().zip(&out) {
                let e = ulps(got, (v as f64).exp());
                if e > worst.0 {
                    worst = (e, v);
                }
            }
            assert!(
                worst.0 <= 2.0,
                "{isa:?}: exp({}) is {} ulp off",
                worst.1,
                worst.0
            );
        }
    }

    #[test]
    fn exp_edge_cases() {
        let x = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            89.0,
            1e30,
            -104.0,
            -1e30,
            0.0,
        ];
        for (isa, kernel) in kernels::<EXP>() {
            let mut out = [0f32; 8];
            kernel(&x, 0.0, &mut out);
            assert!(out[0].is_nan(), "{isa:?}: exp(NaN) = {}", out[0]);
            assert_eq!(
                out[1..],
                [
                    f32::INFINITY,
                    0.0,
                    f32::INFINITY,
                    f32::INFINITY,
                    0.0,
                    0.0,
                    1.0
                ]
            );
        }
    }

    #[test]
    fn shifted_sum_and_tails() {
        // Every tail length of both vector widths, against the f64 sum.
        for len in 0..40 {
            let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
            for (isa, kernel) in kernels::<EXP>() {
                let mut out = vec![f32::NAN; len];
                let sum = kernel(&x, 1.5, &mut out);
                let mut want_sum = 0.0;
                for (&v, &got) in x.iter().zip(&out) {
                    let want = (v as f64 - 1.5).exp();
                    want_sum += want;
                    assert!(ulps(got, want) <= 2.0, "{isa:?} len {len}: {got} vs {want}");
                }
                assert!(
                    (sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1.0),
                    "{isa:?} len {len}: sum {sum} vs {want_sum}"
                );
            }
        }
    }

    #[test]
    fn sigmoid_silu_and_silu_grad_match_f64() {
        // Lengths 8001 and 8003 leave tails for both vector widths.
        let x: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.01)
            .chain([-1e4, 1e4])
            .collect();
        for ((isa, sig), ((_, sil), (_, grad))) in kernels::<SIGMOID>()
            .into_iter()
            .zip(kernels::<SILU>().into_iter().zip(kernels::<SILU_GRAD>()))
        {
            let mut s = vec![0f32; x.len()];
            let mut y = vec![0f32; x.len()];
            let mut d = vec![0f32; x.len()];
            sig(&x, 0.0, &mut s);
            sil(&x, 0.0, &mut y);
            grad(&x, 0.0, &mut d);
            check(isa, &x, &s, &y, &d);
        }
        // The public entry points, on the best ISA.
        let mut s = vec![0f32; x.len()];
        let mut y = vec![0f32; x.len()];
        let mut d = vec![0f32; x.len()];
        sigmoid(&x, &mut s);
        silu(&x, &mut y);
        silu_grad(&x, &mut d);
        check(isa(), &x, &s, &y, &d);
    }

    fn check(isa: Isa, x: &[f32], s: &[f32], y: &[f32], d: &[f32]) {
        for (i, &v) in x.iter().enumerate() {
            let v = v as f64;
            let want_s = 1.0 / (1.0 + (-v).exp());
            let want_y = v * want_s;
            let want_d = want_s * (1.0 + v * (1.0 - want_s));
            assert!(
                (s[i] as f64 - want_s).abs() <= 1e-6 * want_s,
                "{isa:?}: sigmoid({v}) = {}, want {want_s}",
                s[i]
            );
            assert!(
                (y[i] as f64 - want_y).abs() <= 1e-6 * want_y.abs(),
                "{isa:?}: silu({v}) = {}, want {want_y}",
                y[i]
            );
            // The derivative s + s·x·(1 − s) crosses zero near x = −1.28 by cancellation of its two
            // terms, so its error is measured against their scale, s.
            assert!(
                (d[i] as f64 - want_d).abs() <= 1e-6 * want_d.abs().max(want_s),
                "{isa:?}: silu_grad({v}) = {}, want {want_d}",
                d[i]
            );
        }
    }
}
