//! Elementwise kernels: unary maps, binary ops, comparisons and where, over strided f32 views.

use super::{par_fill, simd, Walk};
use crate::layout::Layout;
use crate::op::{BinaryOp, CmpOp, UnaryOp};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26 is too coarse for gradient checks, so this is
/// the W. J. Cody style rational approximation evaluated in f64).
pub fn erf(x: f32) -> f32 {
    erf_f64(x as f64) as f32
}

fn erf_f64(x: f64) -> f64 {
    // erfc via a Chebyshev-fitted exponent (Numerical Recipes erfcc), relative error < 1.2e-7 everywhere.
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        1.0 - r
    } else {
        r - 1.0
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Applies `op` to one value. Always inlined: `unary` calls it from one loop per op with `op` known, and
/// only inlining lets the compiler drop the per-element match (and vectorise the cheap ops).
#[inline(always)]
pub fn unary_scalar(op: UnaryOp, x: f32) -> f32 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        UnaryOp::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_C * x * x * x)).tanh()),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        UnaryOp::Round => x.round_ties_even(),
        UnaryOp::Sqr => x * x,
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Erf => erf(x),
        UnaryOp::Powf(p) => x.powf(p),
        UnaryOp::Clamp(lo, hi) => x.max(lo).min(hi),
        UnaryOp::Affine(m, a) => x * m + a,
        UnaryOp::GeluErfGrad => {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
            cdf + x * pdf
        }
        UnaryOp::GeluTanhGrad => {
            let inner = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            let t = inner.tanh();
            let dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
        }
        UnaryOp::SiluGrad => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        UnaryOp::InRange(lo, hi) => {
            if x >= lo && x <= hi {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// out[i] = f(src[layout[i]]), row-major output.
pub fn map(src: &[f32], layout: &Layout, f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    super::convert(src, layout, f)
}

/// Applies a unary op, dispatching once so the inner loop is monomorphic.
pub fn unary(src: &[f32], layout: &Layout, op: UnaryOp) -> Vec<f32> {
    // The exp-based ops on contiguous input take the vectorised exp instead of a libm call per element.
    if let (UnaryOp::Exp | UnaryOp::Sigmoid | UnaryOp::Silu | UnaryOp::SiluGrad, Some(r)) =
        (op, layout.contiguous_range())
    {
        let src = &src[r];
        let mut out = vec![0f32; src.len()];
        par_fill(&mut out, |start, chunk| {
            let x = &src[start..start + chunk.len()];
            match op {
                UnaryOp::Exp => {
                    simd::exp_shifted(x, 0.0, chunk);
                }
                UnaryOp::Sigmoid => simd::sigmoid(x, chunk),
                UnaryOp::Silu => simd::silu(x, chunk),
                _ => simd::silu_grad(x, chunk),
            }
        });
        return out;
    }
    macro_rules! go {
        ($($pat:pat),*) => {
            match op {
                $($pat => map(src, layout, |x| unary_scalar(op, x)),)*
            }
        };
    }
    go!(
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::GeluErf,
        UnaryOp::GeluTanh,
        UnaryOp::Silu,
        UnaryOp::Abs,
        UnaryOp::Sign,
        UnaryOp::Round,
        UnaryOp::Sqr,
        UnaryOp::Recip,
        UnaryOp::Erf,
        UnaryOp::Powf(_),
        UnaryOp::Clamp(..),
        UnaryOp::Affine(..),
        UnaryOp::GeluErfGrad,
        UnaryOp::GeluTanhGrad,
        UnaryOp::SiluGrad,
        UnaryOp::InRange(..)
    )
}

/// out = f(lhs, rhs) over two strided views of the same shape.
pub fn zip<T: Copy + Send + Default>(
    lhs: &[f32],
    ll: &Layout,
    rhs: &[f32],
    rl: &Layout,
    f: impl Fn(f32, f32) -> T + Sync + Send,
) -> Vec<T> {
    debug_assert_eq!(ll.dims(), rl.dims());
    let n = ll.shape().elem_count();
    let mut out = vec![T::default(); n];
    if let (Some(a), Some(b)) = (ll.contiguous_range(), rl.contiguous_range()) {
        let (a, b) = (&lhs[a], &rhs[b]);
        par_fill(&mut out, |start, chunk| {
            let len = chunk.len();
            for ((o, &x), &y) in chunk
                .iter_mut()
                .zip(&a[start..start + len])
                .zip(&b[start..start + len])
            {
                *o = f(x, y);
            }
        });
        return out;
    }
    let walk = Walk::new(
        ll.dims(),
        [ll.strides(), rl.strides()],
        [ll.offset(), rl.offset()],
    );
    let inner = walk.inner_strides();
    par_fill(&mut out, |start, chunk| {
        walk.runs(start, chunk.len(), |i, [a, b], n| {
            let out = &mut chunk[i..i + n];
            // Broadcast binary ops mostly pair contiguous rows with contiguous or repeated rows (a
            // bias, a per-row scale): those stretches run as slice loops the compiler vectorises.
            match inner {
                [1, 1] => {
                    for ((o, &x), &y) in out.iter_mut().zip(&lhs[a..a + n]).zip(&rhs[b..b + n]) {
                        *o = f(x, y);
                    }
                }
                [1, 0] => {
                    let y = rhs[b];
                    for (o, &x) in out.iter_mut().zip(&lhs[a..a + n]) {
                        *o = f(x, y);
                    }
                }
                [0, 1] => {
                    let x = lhs[a];
                    for (o, &y) in out.iter_mut().zip(&rhs[b..b + n]) {
                        *o = f(x, y);
                    }
                }
                [sa, sb] => {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = f(lhs[a + j * sa], rhs[b + j * sb]);
                    }
                }
            }
        })
    });
    out
}

pub fn binary(lhs: &[f32], ll: &Layout, rhs: &[f32], rl: &Layout, op: BinaryOp) -> Vec<f32> {
    match op {
        BinaryOp::Add => zip(lhs, ll, rhs, rl, |a, b| a + b),
        BinaryOp::Sub => zip(lhs, ll, rhs, rl, |a, b| a - b),
        BinaryOp::Mul => zip(lhs, ll, rhs, rl, |a, b| a * b),
        BinaryOp::Div => zip(lhs, ll, rhs, rl, |a, b| a / b),
        BinaryOp::Maximum => zip(lhs, ll, rhs, rl, f32::max),
        BinaryOp::Minimum => zip(lhs, ll, rhs, rl, f32::min),
    }
}

pub fn compare(lhs: &[f32], ll: &Layout, rhs: &[f32], rl: &Layout, op: CmpOp) -> Vec<u8> {
    match op {
        CmpOp::Eq => zip(lhs, ll, rhs, rl, |a, b| (a == b) as u8),
        CmpOp::Ne => zip(lhs, ll, rhs, rl, |a, b| (a != b) as u8),
        CmpOp::Lt => zip(lhs, ll, rhs, rl, |a, b| (a < b) as u8),
        CmpOp::Le => zip(lhs, ll, rhs, rl, |a, b| (a <= b) as u8),
        CmpOp::Gt => zip(lhs, ll, rhs, rl, |a, b| (a > b) as u8),
        CmpOp::Ge => zip(lhs, ll, rhs, rl, |a, b| (a >= b) as u8),
    }
}

/// out = mask != 0 ? on_true : on_false, all three strided views of the same shape.
pub fn where_cond(
    mask: &[f32],
    ml: &Layout,
    t: &[f32],
    tl: &Layout,
    f: &[f32],
    fl: &Layout,
) -> Vec<f32> {
    let n = ml.shape().elem_count();
    let mut out = vec![0f32; n];
    let walk = Walk::new(
        ml.dims(),
        [ml.strides(), tl.strides(), fl.strides()],
        [ml.offset(), tl.offset(), fl.offset()],
    );
    par_fill(&mut out, |start, chunk| {
        walk.run(start, chunk.len(), |i, [m, a, b]| {
            chunk[i] = if mask[m] != 0.0 { t[a] } else { f[b] }
        })
    });
    out
}
