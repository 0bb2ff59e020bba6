//! The quantizers of TBT and LLM-QAT (`trit::quant::quantizers`) against their formulas: forward values on
//! hand-worked tensors and against an f64 re-implementation written here from papers.md, straight-through
//! gradients (masks checked inside and outside), LSQ's α gradient, α's first-batch initialisation, the
//! integer parts behind every value, and the errors for bad input.

mod common;

use common::DataRng;
use trit::quant::quantizers::{ElasticQuantizer, Granularity, QuantParts, Quantizer, TbtForm};
use trit::{DType, Device, Tensor};

const CPU: Device = Device::Cpu;
use Granularity::{PerRow, PerTensor};
use TbtForm::{Code, Paper};

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape.to_vec(), CPU).unwrap()
}

fn var(v: &[f32], shape: &[usize]) -> Tensor {
    tensor(v, shape).var().unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

/// Asserts `got ≈ want` elementwise within `tol`, naming the first bad element.
fn assert_near(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= tol,
            "{what}: element {i} is {g}, expected {w} (tolerance {tol:e})\n got {got:?}\nwant {want:?}"
        );
    }
}

/// Forward values of `q` on `x` and the gradient of Σ q(x)·c for `c` = 1, 2, 3, ...: the STE mask times c.
fn forward_and_grad(
    q: Quantizer,
    x: &[f32],
    shape: &[usize],
    g: Granularity,
) -> (Vec<f32>, Vec<f32>) {
    let xv = var(x, shape);
    let y = q.fake_quant(&xv, g).unwrap();
    assert_eq!(y.dims(), shape);
    let c: Vec<f32> = (1..=x.len()).map(|i| i as f32).collect();
    let loss = y.mul(&tensor(&c, shape)).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    (values(&y), values(grads.get(&xv).unwrap()))
}

/// c = 1, 2, 3, ... masked by `mask`.
fn masked(mask: &[u8]) -> Vec<f32> {
    mask.iter()
        .enumerate()
        .map(|(i, &m)| if m == 1 { (i + 1) as f32 } else { 0.0 })
        .collect()
}

// Two hand-worked rows used by the TBT tests:
//   A = [0.9, −0.1, 0.1, −0.1]: mean 0.2, mean|A| 0.3, A − 0.2 = [0.7, −0.3, −0.1, −0.3], ‖A − 0.2‖₁ = 1.4
//   B = [3, −1, 1, 1]:          mean 1,   mean|B| 1.5, B − 1 = [2, −2, 0, 0],            ‖B − 1‖₁ = 4
const AB: [f32; 8] = [0.9, -0.1, 0.1, -0.1, 3.0, -1.0, 1.0, 1.0];

#[test]
fn tbt_ternary_paper_by_hand() {
    // A: α = (4/3)·1.4/4 = 0.46667; t = (A − 0.2)/α = [1.5, −0.643, −0.214, −0.643] → codes [1, −1, 0, −1];
    //    STE |t| < 1 → [0, 1, 1, 1].
    // B: α = (4/3)·4/4 = 4/3; t = [1.5, −1.5, 0, 0] → codes [1, −1, 0, 0]; STE → [0, 0, 1, 1].
    // μ is not added back.
    let (y, g) = forward_and_grad(Quantizer::TbtTernary(Paper), &AB, &[2, 4], PerRow);
    let (a, b) = (4.0 / 3.0 * 1.4 / 4.0, 4.0 / 3.0);
    assert_near("values", &y, &[a, -a, 0.0, -a, b, -b, 0.0, 0.0], 1e-6);
    assert_eq!(g, masked(&[0, 1, 1, 1, 0, 0, 1, 1]));
}

#[test]
fn tbt_ternary_code_by_hand() {
    // No centring. A: α = (4/3)·0.3 = 0.4; t = [2.25, −0.25, 0.25, −0.25] → [1, 0, 0, 0].
    // B: α = (4/3)·1.5 = 2; t = [1.5, −0.5, 0.5, 0.5] → [1, 0, 0, 0]: ±0.5 round half to even, to 0.
    // Identity STE.
    let (y, g) = forward_and_grad(Quantizer::TbtTernary(Code), &AB, &[2, 4], PerRow);
    assert_near(
        "values",
        &y,
        &[0.4, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0],
        1e-6,
    );
    assert_eq!(g, masked(&[1; 8]));
}

#[test]
fn tbt_binary_paper_by_hand() {
    // A: α = 1.4/4 = 0.35; sign(A − 0.2) = [1, −1, −1, −1]; t = [2, −0.857, −0.286, −0.857]
    //    → STE [0, 1, 1, 1].
    // B: α = 4/4 = 1; sign(B − 1) = sign([2, −2, 0, 0]) = [1, −1, 1, 1] (sign(0) = +1); t = [2, −2, 0, 0]
    //    → STE [0, 0, 1, 1].
    let (y, g) = forward_and_grad(Quantizer::TbtBinary(Paper), &AB, &[2, 4], PerRow);
    assert_near(
        "values",
        &y,
        &[0.35, -0.35, -0.35, -0.35, 1.0, -1.0, 1.0, 1.0],
        1e-6,
    );
    assert_eq!(g, masked(&[0, 1, 1, 1, 0, 0, 1, 1]));
    // The STE bound is strict: [1, −1, 1, −1] has μ = 0, α = 1 and t = ±1 everywhere, so nothing passes.
    let (y, g) = forward_and_grad(
        Quantizer::TbtBinary(Paper),
        &[1.0, -1.0, 1.0, -1.0],
        &[4],
        PerRow,
    );
    assert_eq!(y, [1.0, -1.0, 1.0, -1.0]);
    assert_eq!(g, [0.0; 4]);
}

#[test]
fn tbt_binary_code_and_bwn_by_hand() {
    // TBT code form = BWN: A: α = 0.3, sign(A) = [1, −1, 1, −1]; B: α = 1.5, sign(B) = [1, −1, 1, 1].
    for q in [Quantizer::TbtBinary(Code), Quantizer::Bwn] {
        let (y, g) = forward_and_grad(q, &AB, &[2, 4], PerRow);
        assert_near(
            q.name(),
            &y,
            &[0.3, -0.3, 0.3, -0.3, 1.5, -1.5, 1.5, 1.5],
            1e-6,
        );
        assert_eq!(g, masked(&[1; 8]), "{} STE", q.name());
    }
    // sign(0) = +1: [0, −2, 1, 1] has α = 1 and values [1, −1, 1, 1].
    let (y, _) = forward_and_grad(Quantizer::Bwn, &[0.0, -2.0, 1.0, 1.0], &[4], PerRow);
    assert_eq!(y, [1.0, -1.0, 1.0, 1.0]);
}

#[test]
fn twn_by_hand() {
    // Row 1 [1, −0.2, 0.5, −0.3]: mean|w| = 0.5, Δ = 0.35, kept {1, 0.5} → α = 0.75 → [α, 0, α, 0].
    // Row 2 [−2, 0.1, 0.1, 0.2]:  mean|w| = 0.6, Δ = 0.42, kept {2} → α = 2 → [−2, 0, 0, 0].
    // Per tensor: mean|w| = 4.4/8 = 0.55, Δ = 0.385, kept {1, 0.5, 2} → α = 3.5/3.
    let x = [1.0, -0.2, 0.5, -0.3, -2.0, 0.1, 0.1, 0.2];
    let (y, g) = forward_and_grad(Quantizer::Twn, &x, &[2, 4], PerRow);
    assert_near(
        "per row",
        &y,
        &[0.75, 0.0, 0.75, 0.0, -2.0, 0.0, 0.0, 0.0],
        1e-6,
    );
    assert_eq!(g, masked(&[1; 8]));
    let (y, _) = forward_and_grad(Quantizer::Twn, &x, &[2, 4], PerTensor);
    let a = 3.5 / 3.0;
    assert_near("per tensor", &y, &[a, 0.0, a, 0.0, -a, 0.0, 0.0, 0.0], 1e-6);
}

#[test]
fn llm_qat_symmetric_by_hand() {
    // 4 bits: Qp = 7, s = 7/(max|x| + 1e−6), code = round(x·s), value code/s.
    // Row 1 [1, −0.5, 0.25, 0.1]: s = 7/1.000001, x·s = [6.99999, −3.49999, 1.74999, 0.69999]
    //   → [7, −3, 2, 1].
    // Row 2 [3, −2, 1.9, 0]: s = 7/3.000001, x·s = [6.99999, −4.66666, 4.43333, 0] → [7, −5, 4, 0].
    // STE: zero where |x| ≥ 2 → row 2 masks 3 and −2 (exactly 2 is outside).
    let x = [1.0, -0.5, 0.25, 0.1, 3.0, -2.0, 1.9, 0.0];
    let q = Quantizer::LlmQat {
        bits: 4,
        symmetric: true,
    };
    let (y, g) = forward_and_grad(q, &x, &[2, 4], PerRow);
    let (s1, s2) = (1.000001 / 7.0, 3.000001 / 7.0);
    let want = [
        7.0 * s1,
        -3.0 * s1,
        2.0 * s1,
        s1,
        7.0 * s2,
        -5.0 * s2,
        4.0 * s2,
        0.0,
    ];
    assert_near("values", &y, &want, 1e-6);
    assert_eq!(g, masked(&[1, 1, 1, 1, 0, 0, 1, 1]));
    // Min-max round-to-nearest: the same values, identity STE (|x| ≥ 2 passes).
    let (y2, g2) = forward_and_grad(
        Quantizer::MinMax {
            bits: 4,
            symmetric: true,
        },
        &x,
        &[2, 4],
        PerRow,
    );
    assert_eq!(y2, y);
    assert_eq!(g2, masked(&[1; 8]));
}

#[test]
fn llm_qat_asymmetric_by_hand() {
    // 2 bits: 3 levels above 0. [−1, 0, 0.6, 2]: min −1, s = 3/(3 + 1e−6),
    // (x + 1)·s = [0, 0.99999, 1.59999, 2.99999]
    // → codes [0, 1, 2, 3], value code/s − 1 = [−1, 3.3e−7, 1.0000007, 2.000001]. STE: |2| ≥ 2 is masked.
    let q = Quantizer::LlmQat {
        bits: 2,
        symmetric: false,
    };
    let (y, g) = forward_and_grad(q, &[-1.0, 0.0, 0.6, 2.0], &[4], PerRow);
    let step = 3.000001 / 3.0;
    assert_near(
        "values",
        &y,
        &[-1.0, step - 1.0, 2.0 * step - 1.0, 3.0 * step - 1.0],
        1e-6,
    );
    assert_eq!(g, masked(&[1, 1, 1, 0]));
    let parts = q
        .parts(&tensor(&[-1.0, 0.0, 0.6, 2.0], &[4]), PerRow)
        .unwrap();
    assert_eq!(parts.codes, [0, 1, 2, 3]);
    assert_eq!(parts.offsets, Some(vec![-1.0]));
}

#[test]
fn min_max_one_bit_asymmetric_by_hand() {
    // Codes {0, 1}: values min and max. [0.1, 0.3, 0.34, 0.9]: s = 1/(0.8 + 1e−6), (x − 0.1)·s =
    // [0, 0.25, 0.3, 0.99999] → codes [0, 0, 0, 1], values [0.1, 0.1, 0.1, 0.1 + 1/s]. Identity STE.
    let q = Quantizer::MinMax {
        bits: 1,
        symmetric: false,
    };
    let (y, g) = forward_and_grad(q, &[0.1, 0.3, 0.34, 0.9], &[4], PerRow);
    assert_near("values", &y, &[0.1, 0.1, 0.1, 0.900001], 1e-6);
    assert_eq!(g, masked(&[1, 1, 1, 1]));
    let parts = q
        .parts(&tensor(&[0.1, 0.3, 0.34, 0.9], &[4]), PerRow)
        .unwrap();
    assert_eq!(parts.codes, [0, 0, 0, 1]);
}

// ---------------------------------------------------------------------------------------------------------
// f64 reference, written from the formulas in papers.md

/// What the reference expects of one element. `value_sure` / `pass_sure` are false where the element sits
/// within rounding noise of a decision boundary (a rounding tie, a clip bound, a threshold), where f32 and
/// f64 may legitimately decide differently.
#[derive(Clone, Copy, Debug)]
struct Want {
    value: f64,
    /// scale + |offset| of the element's row: the size of the rounding error to allow.
    mag: f64,
    value_sure: bool,
    pass: bool,
    pass_sure: bool,
}

/// True when `u` is farther than f32 rounding noise (a few ulps of |u|) from the rounding tie k + 1/2.
fn off_tie(u: f64) -> bool {
    (u - u.floor() - 0.5).abs() > 4e-6 * (1.0 + u.abs())
}

/// True when `v` is farther than f32 rounding noise (relative to `size`) from the boundary `at`.
fn off_bound(v: f64, at: f64, size: f64) -> bool {
    (v - at).abs() > 4e-6 * (1.0 + size)
}

fn sign(v: f64) -> f64 {
    if v >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

fn reference_row(q: Quantizer, w: &[f64]) -> Vec<Want> {
    let n = w.len() as f64;
    let mean = |f: &dyn Fn(f64) -> f64| w.iter().map(|&v| f(v)).sum::<f64>() / n;
    let want = |value, mag, value_sure, pass, pass_sure| Want {
        value,
        mag,
        value_sure,
        pass,
        pass_sure,
    };
    match q {
        Quantizer::TbtTernary(form) | Quantizer::TbtBinary(form) => {
            let ternary = matches!(q, Quantizer::TbtTernary(_));
            let mu = if form == Paper { mean(&|v| v) } else { 0.0 };
            let l1 = mean(&|v| (v - mu).abs());
            let alpha = if ternary { 4.0 / 3.0 * l1 } else { l1 };
            w.iter()
                .map(|&v| {
                    let t = if alpha > 0.0 { (v - mu) / alpha } else { 0.0 };
                    let (code, sure) = if ternary {
                        let c = t.clamp(-1.0, 1.0);
                        (c.round_ties_even(), off_tie(c))
                    } else {
                        // With α = 0 every value is 0 whatever the sign.
                        (sign(v - mu), alpha == 0.0 || off_bound(t, 0.0, 1.0))
                    };
                    let paper = form == Paper;
                    let pass = !paper || t.abs() < 1.0;
                    let pass_sure = !paper || off_bound(t.abs(), 1.0, 1.0);
                    want(alpha * code, alpha, sure, pass, pass_sure)
                })
                .collect()
        }
        Quantizer::Twn => {
            let delta = 0.7 * mean(&|v| v.abs());
            let kept: Vec<f64> = w.iter().map(|v| v.abs()).filter(|&a| a > delta).collect();
            let alpha = if kept.is_empty() {
                0.0
            } else {
                kept.iter().sum::<f64>() / kept.len() as f64
            };
            w.iter()
                .map(|&v| {
                    let code = if v.abs() > delta { sign(v) } else { 0.0 };
                    let sure = off_bound(v.abs(), delta, delta);
                    want(alpha * code, alpha, sure, true, true)
                })
                .collect()
        }
        Quantizer::Bwn => {
            let alpha = mean(&|v| v.abs());
            w.iter()
                .map(|&v| want(alpha * sign(v), alpha, true, true, true))
                .collect()
        }
        Quantizer::LlmQat { bits, symmetric } | Quantizer::MinMax { bits, symmetric } => {
            let clip = matches!(q, Quantizer::LlmQat { .. });
            let (lo, hi) = w
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let amax = w.iter().fold(0f64, |m, v| m.max(v.abs()));
            w.iter()
                .map(|&v| {
                    let (value, mag, u) = if symmetric {
                        let qp = f64::from((1u32 << (bits - 1)) - 1);
                        let s = qp / (amax + 1e-6);
                        let u = v * s;
                        (u.round_ties_even().clamp(-qp, qp) / s, 1.0 / s, u)
                    } else {
                        let top = f64::from((1u32 << bits) - 1);
                        let s = top / (hi - lo + 1e-6);
                        let u = (v - lo) * s;
                        (
                            u.round_ties_even().clamp(0.0, top) / s + lo,
                            1.0 / s + lo.abs(),
                            u,
                        )
                    };
                    let pass = !clip || v.abs() < 2.0;
                    let pass_sure = !clip || off_bound(v.abs(), 2.0, 2.0);
                    want(value, mag, off_tie(u), pass, pass_sure)
                })
                .collect()
        }
    }
}

fn reference(q: Quantizer, x: &[f64], shape: &[usize], g: Granularity) -> Vec<Want> {
    let d = match g {
        PerRow => *shape.last().unwrap(),
        PerTensor => x.len(),
    };
    x.chunks(d).flat_map(|row| reference_row(q, row)).collect()
}

/// Every quantizer the random checks run, with every bit width where there is one.
fn all_quantizers() -> Vec<Quantizer> {
    let mut qs = vec![
        Quantizer::TbtTernary(Paper),
        Quantizer::TbtTernary(Code),
        Quantizer::TbtBinary(Paper),
        Quantizer::TbtBinary(Code),
        Quantizer::Twn,
        Quantizer::Bwn,
    ];
    for bits in 2..=8 {
        for symmetric in [true, false] {
            qs.push(Quantizer::LlmQat { bits, symmetric });
            qs.push(Quantizer::MinMax { bits, symmetric });
        }
    }
    qs.push(Quantizer::MinMax {
        bits: 1,
        symmetric: false,
    });
    qs
}

/// Shapes of every rank 1–3, small rows (1 and 2 elements), and one tensor big enough for the parallel path.
const SHAPES: &[&[usize]] = &[
    &[7],
    &[1],
    &[5, 1],
    &[3, 2],
    &[4, 33],
    &[2, 3, 17],
    &[48, 800],
];

fn random_input(shape: &[usize], rng: &mut DataRng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    // σ = 1.3 puts a good share of elements past LLM-QAT's |x| ≥ 2 and TBT's clip bounds.
    (0..n).map(|_| (1.3 * rng.normal()) as f32).collect()
}

#[test]
fn forward_and_ste_match_the_f64_reference() {
    let mut rng = DataRng::new(11);
    for q in all_quantizers() {
        for &shape in SHAPES {
            for g in [PerRow, PerTensor] {
                let what = format!("{q:?} {shape:?} {g:?}");
                let x = random_input(shape, &mut rng);
                let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
                let want = reference(q, &x64, shape, g);
                let xv = var(&x, shape);
                let y = q.fake_quant(&xv, g).unwrap();
                let c: Vec<f32> = (0..x.len()).map(|_| rng.range(-1.0, 1.0) as f32).collect();
                let loss = y.mul(&tensor(&c, shape)).unwrap().sum_all().unwrap();
                let grad = values(loss.backward().unwrap().get(&xv).unwrap());
                let y = values(&y);
                let (mut unsure, mut outside) = (0, 0);
                for (i, w) in want.iter().enumerate() {
                    if w.value_sure {
                        let tol = 2e-6 * (w.value.abs() + w.mag);
                        assert!(
                            (f64::from(y[i]) - w.value).abs() <= tol,
                            "{what}: element {i} (x = {}) is {}, expected {}",
                            x[i],
                            y[i],
                            w.value
                        );
                    } else {
                        unsure += 1;
                    }
                    if w.pass_sure {
                        let expect = if w.pass { c[i] } else { 0.0 };
                        assert_eq!(grad[i], expect, "{what}: STE at element {i} (x = {})", x[i]);
                        outside += usize::from(!w.pass);
                    }
                }
                assert!(
                    unsure * 20 <= x.len().max(40),
                    "{what}: {unsure} ambiguous elements"
                );
                if matches!(q, Quantizer::LlmQat { .. }) && x.len() > 100 {
                    assert!(outside > 0, "{what}: no element exercised the |x| ≥ 2 mask");
                }
            }
        }
    }
}

#[test]
fn strided_input_quantizes_like_its_contiguous_copy() {
    let mut rng = DataRng::new(5);
    let x = random_input(&[6, 9], &mut rng);
    for q in [
        Quantizer::TbtTernary(Paper),
        Quantizer::LlmQat {
            bits: 4,
            symmetric: true,
        },
    ] {
        let w = var(&x, &[6, 9]);
        let wt = w.t().unwrap();
        let y = q.fake_quant(&wt, PerRow).unwrap();
        let y_ref = q
            .fake_quant(&wt.contiguous().unwrap().detach(), PerRow)
            .unwrap();
        assert_eq!(y.dims(), [9, 6]);
        assert_eq!(values(&y), values(&y_ref), "{q:?}");
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&w).unwrap().dims(), [6, 9]);
    }
}

#[test]
fn other_float_dtypes_keep_their_dtype() {
    // A bf16 input is quantized in f32 from its bf16 values and the result rounded to bf16 once.
    let x = tensor(&AB, &[2, 4]).to_dtype(DType::BF16).unwrap();
    for q in [Quantizer::TbtBinary(Code), Quantizer::TbtTernary(Paper)] {
        let y = q.fake_quant(&x, PerRow).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let via_f32 = q
            .fake_quant(&x.to_dtype(DType::F32).unwrap(), PerRow)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(y.to_vec_f32(), via_f32.to_vec_f32(), "{q:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Integer parts

#[test]
fn parts_reproduce_the_forward_bit_for_bit() {
    let mut rng = DataRng::new(23);
    for q in all_quantizers() {
        if q.is_asymmetric()
            && matches!(
                q,
                Quantizer::LlmQat { bits: 8, .. } | Quantizer::MinMax { bits: 8, .. }
            )
        {
            continue;
        }
        for &shape in SHAPES {
            for g in [PerRow, PerTensor] {
                let what = format!("{q:?} {shape:?} {g:?}");
                let x = tensor(&random_input(shape, &mut rng), shape);
                let y = values(&q.fake_quant(&x, g).unwrap());
                let p: QuantParts = q.parts(&x, g).unwrap();
                let rows = match g {
                    PerRow => x.elem_count() / shape.last().unwrap(),
                    PerTensor => 1,
                };
                assert_eq!(p.scales.len(), rows, "{what}: scales");
                assert_eq!(p.row_len * rows, x.elem_count(), "{what}: row_len");
                assert_eq!(
                    p.offsets.as_ref().map(Vec::len),
                    q.is_asymmetric().then_some(rows),
                    "{what}: offsets"
                );
                let deq = p.dequantize();
                for i in 0..y.len() {
                    assert_eq!(
                        deq[i].to_bits(),
                        y[i].to_bits(),
                        "{what}: element {i}: {} vs {}",
                        deq[i],
                        y[i]
                    );
                    // The contract spelled out: scales[row]·code (+ offsets[row]).
                    let r = i / p.row_len;
                    let by_hand = match &p.offsets {
                        Some(o) => p.scales[r] * f32::from(p.codes[i]) + o[r],
                        None => p.scales[r] * f32::from(p.codes[i]),
                    };
                    assert_eq!(
                        by_hand.to_bits(),
                        y[i].to_bits(),
                        "{what}: element {i} by hand"
                    );
                }
                let (lo, hi) = match q {
                    Quantizer::TbtTernary(_) | Quantizer::Twn => (-1, 1),
                    Quantizer::TbtBinary(_) | Quantizer::Bwn => (-1, 1),
                    Quantizer::LlmQat {
                        bits,
                        symmetric: true,
                    }
                    | Quantizer::MinMax {
                        bits,
                        symmetric: true,
                    } => {
                        let m = (1i32 << (bits - 1)) - 1;
                        (-m, m)
                    }
                    Quantizer::LlmQat { bits, .. } | Quantizer::MinMax { bits, .. } => {
                        (0, (1i32 << bits) - 1)
                    }
                };
                let binary = matches!(q, Quantizer::TbtBinary(_) | Quantizer::Bwn);
                for &c in &p.codes {
                    let c = i32::from(c);
                    assert!(
                        lo <= c && c <= hi && !(binary && c == 0),
                        "{what}: code {c} outside {lo}..={hi}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Elastic activation quantizer

/// An elastic quantizer whose α is set to `alpha` (and marked initialised).
fn elastic(bits: u32, signed: bool, alpha: f32) -> ElasticQuantizer {
    let q = ElasticQuantizer::new(bits, signed).unwrap();
    q.alpha()
        .set(&Tensor::scalar_tensor(alpha, CPU).unwrap())
        .unwrap();
    q.mark_initialised();
    q
}

/// Values, dL/dx and dL/dα of Σ q(x)·c.
fn elastic_run(q: &ElasticQuantizer, x: &[f32], c: &[f32]) -> (Vec<f32>, Vec<f32>, f32) {
    let xv = var(x, &[x.len()]);
    let y = q.forward(&xv).unwrap();
    let loss = y.mul(&tensor(c, &[c.len()])).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let dalpha = grads.get(q.alpha()).unwrap();
    assert_eq!(dalpha.dims(), q.alpha().dims());
    (
        values(&y),
        values(grads.get(&xv).unwrap()),
        dalpha.to_scalar().unwrap(),
    )
}

const C4: [f32; 4] = [0.5, -1.5, 2.0, 0.25];

/// Σ c·e · 1/√(numel·Qp).
fn lsq(e: &[f64], qp: f64) -> f64 {
    let s: f64 = C4.iter().zip(e).map(|(&c, e)| f64::from(c) * e).sum();
    s / (e.len() as f64 * qp).sqrt()
}

fn c4_masked(mask: [u8; 4]) -> Vec<f32> {
    C4.iter()
        .zip(mask)
        .map(|(&c, m)| if m == 1 { c } else { 0.0 })
        .collect()
}

#[test]
fn elastic_unsigned_ternary_by_hand() {
    // 2 bits unsigned: Qn = 0, Qp = 2. α = 0.5, t = x/α = [0.4, 2, 2.4, 6] → clip [0.4, 2, 2, 2] → round
    // [0, 2, 2, 2] → [0, 1, 1, 1]. dx passes where 0 ≤ t ≤ 2, bounds included → [1, 1, 0, 0].
    // e = [round(0.4) − 0.4, round(2) − 2, Qp, Qp].
    let q = elastic(2, false, 0.5);
    let (y, dx, da) = elastic_run(&q, &[0.2, 1.0, 1.2, 3.0], &C4);
    assert_near("values", &y, &[0.0, 1.0, 1.0, 1.0], 1e-6);
    assert_eq!(dx, c4_masked([1, 1, 0, 0]));
    assert_near("dα", &[da], &[lsq(&[-0.4, 0.0, 2.0, 2.0], 2.0)], 1e-6);
}

#[test]
fn elastic_unsigned_binary_by_hand() {
    // 1 bit unsigned: [0, 1]. α = 0.5, t = [0.4, 0.6, 1.8, −0.2] → clip [0.4, 0.6, 1, 0] → [0, 1, 1, 0].
    // dx: [1, 1, 0, 0]; e = [−0.4, 0.4, Qp = 1, Qn = 0].
    let q = elastic(1, false, 0.5);
    let (y, dx, da) = elastic_run(&q, &[0.2, 0.3, 0.9, -0.1], &C4);
    assert_near("values", &y, &[0.0, 0.5, 0.5, 0.0], 1e-6);
    assert_eq!(dx, c4_masked([1, 1, 0, 0]));
    assert_near("dα", &[da], &[lsq(&[-0.4, 0.4, 1.0, 0.0], 1.0)], 1e-6);
}

#[test]
fn elastic_signed_ternary_by_hand() {
    // 2 bits signed: Qn = −1, Qp = 1. x̄ = mean([0.3, −0.9, 1.5, 0.1]) = 0.25 (not added back); α = 0.5,
    // t = (x − x̄)/α = [0.1, −2.3, 2.5, −0.3] → [0, −1, 1, 0]. dx: [1, 0, 0, 1]; e = [−0.1, Qn, Qp, 0.3].
    let q = elastic(2, true, 0.5);
    let (y, dx, da) = elastic_run(&q, &[0.3, -0.9, 1.5, 0.1], &C4);
    assert_near("values", &y, &[0.0, -0.5, 0.5, 0.0], 1e-6);
    assert_eq!(dx, c4_masked([1, 0, 0, 1]));
    assert_near("dα", &[da], &[lsq(&[-0.1, -1.0, 1.0, 0.3], 1.0)], 1e-6);
}

#[test]
fn elastic_signed_binary_by_hand() {
    // 1 bit signed: α·sign(x − x̄). Same x: t = [0.1, −2.3, 2.5, −0.3] → [1, −1, 1, −1]·0.5; dx passes where
    // |t| ≤ 1 → [1, 0, 0, 1]; dα = Σ c·sign(t) / √(4·1).
    let q = elastic(1, true, 0.5);
    let (y, dx, da) = elastic_run(&q, &[0.3, -0.9, 1.5, 0.1], &C4);
    assert_near("values", &y, &[0.5, -0.5, 0.5, -0.5], 1e-6);
    assert_eq!(dx, c4_masked([1, 0, 0, 1]));
    assert_near("dα", &[da], &[lsq(&[1.0, -1.0, 1.0, -1.0], 1.0)], 1e-6);
}

#[test]
fn elastic_four_bit_by_hand() {
    // Signed 4 bits: Qn = −8, Qp = 7. x̄ = mean([2, −3, 0.3, 0.7]) = 0; α = 0.25, t = [8, −12, 1.2, 2.8]
    // → [7, −8, 1, 3]·0.25. dx: [0, 0, 1, 1]; e = [Qp, Qn, 1 − 1.2, 3 − 2.8].
    let q = elastic(4, true, 0.25);
    let (y, dx, da) = elastic_run(&q, &[2.0, -3.0, 0.3, 0.7], &C4);
    assert_near("signed values", &y, &[1.75, -2.0, 0.25, 0.75], 1e-6);
    assert_eq!(dx, c4_masked([0, 0, 1, 1]));
    assert_near(
        "signed dα",
        &[da],
        &[lsq(&[7.0, -8.0, -0.2, 0.2], 7.0)],
        1e-5,
    );
    // Unsigned 4 bits: [0, 15]. α = 0.1, t = [0.4, 2.6, 20, 10] → [0, 3, 15, 10]·0.1. dx: [1, 1, 0, 1];
    // e = [−0.4, 0.4, Qp, 0].
    let q = elastic(4, false, 0.1);
    let (y, dx, da) = elastic_run(&q, &[0.04, 0.26, 2.0, 1.0], &C4);
    assert_near("unsigned values", &y, &[0.0, 0.3, 1.5, 1.0], 1e-6);
    assert_eq!(dx, c4_masked([1, 1, 0, 1]));
    assert_near(
        "unsigned dα",
        &[da],
        &[lsq(&[-0.4, 0.4, 15.0, 0.0], 15.0)],
        1e-5,
    );
}

#[test]
fn elastic_alpha_is_initialised_by_the_first_batch_only() {
    // mean|x| = 2.5 for x = [1, −2, 3, −4]: signed α = 2·2.5/√Qp, unsigned α = 4·2.5/√Qp.
    let x = [1.0, -2.0, 3.0, -4.0];
    for (bits, signed, qp) in [
        (1, true, 1.0),
        (2, true, 1.0),
        (4, true, 7.0),
        (1, false, 1.0),
        (2, false, 2.0),
        (4, false, 15.0),
    ] {
        let q = ElasticQuantizer::new(bits, signed).unwrap();
        assert!(!q.is_initialised());
        let k = if signed { 2.0 } else { 4.0 };
        let want = k * 2.5 / f64::sqrt(qp);
        let y = q.forward(&tensor(&x, &[2, 2])).unwrap();
        assert!(q.is_initialised());
        let alpha = q.alpha().to_scalar().unwrap();
        assert_near(
            &format!("α of {bits}-bit signed={signed}"),
            &[alpha],
            &[want],
            1e-6,
        );
        if (bits, signed) == (2, true) {
            // The first batch is quantized with the new α = 5: x̄ = −0.5,
            // t = (x + 0.5)/5 = [0.3, −0.3, 0.7, −0.7].
            assert_near("first output", &values(&y), &[0.0, 0.0, 5.0, -5.0], 1e-6);
        }
        q.forward(&tensor(&[10.0, 20.0], &[2])).unwrap();
        assert_eq!(
            q.alpha().to_scalar().unwrap(),
            alpha,
            "the second batch re-initialised α"
        );
    }
    // A marked quantizer keeps a hand-set α.
    let q = elastic(2, true, 0.75);
    q.forward(&tensor(&x, &[4])).unwrap();
    assert_eq!(q.alpha().to_scalar().unwrap(), 0.75);
}

/// The elastic quantizer against the formula in f64 on random data big enough for the parallel path:
/// values, the x mask, and LSQ's α gradient with its scale g = 1/√(numel·Qp).
#[test]
fn elastic_matches_the_f64_reference() {
    let mut rng = DataRng::new(3);
    for (bits, signed, qn, qp) in [
        (1, true, -1.0, 1.0),
        (2, true, -1.0, 1.0),
        (4, true, -8.0, 7.0),
        (1, false, 0.0, 1.0),
        (2, false, 0.0, 2.0),
        (4, false, 0.0, 15.0),
    ] {
        let what = format!("{bits}-bit signed={signed}");
        let alpha = if bits == 4 { 0.15 } else { 0.4 };
        let q = elastic(bits, signed, alpha as f32);
        let n = 40_000;
        let x: Vec<f32> = (0..n)
            .map(|_| if signed { rng.normal() + 0.3 } else { rng.range(-0.5, 3.0) } as f32)
            .collect();
        let c: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        let (y, dx, da) = {
            let xv = var(&x, &[200, 200]);
            let y = q.forward(&xv).unwrap();
            let loss = y.mul(&tensor(&c, &[200, 200])).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let da = grads.get(q.alpha()).unwrap().to_scalar().unwrap();
            (values(&y), values(grads.get(&xv).unwrap()), da)
        };
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let centre = if signed {
            x64.iter().sum::<f64>() / n as f64
        } else {
            0.0
        };
        let alpha = f64::from(alpha as f32);
        let (mut dalpha, mut scale_sum, mut clipped, mut unsure) = (0.0, 0.0, 0, 0.0);
        for i in 0..n {
            let t = (x64[i] - centre) / alpha;
            let binary_signed = signed && bits == 1;
            let (code, sure) = if binary_signed {
                (sign(t), off_bound(t, 0.0, 1.0))
            } else {
                let cl = t.clamp(qn, qp);
                (cl.round_ties_even(), off_tie(cl))
            };
            let v = alpha * code;
            if sure {
                assert!(
                    (f64::from(y[i]) - v).abs() <= 1e-6 * (1.0 + v.abs()),
                    "{what}: value {i}: {} vs {v}",
                    y[i]
                );
            } else {
                // f32 may round the other way here, moving e by 1 (round) or 2 (sign).
                unsure += 2.0 * f64::from(c[i]).abs();
            }
            let inside = qn <= t && t <= qp;
            if off_bound(t, qn, qn.abs()) && off_bound(t, qp, qp) {
                assert_eq!(
                    dx[i],
                    if inside { c[i] } else { 0.0 },
                    "{what}: dx {i} (t = {t})"
                );
            }
            clipped += usize::from(!inside);
            let e = if binary_signed {
                sign(t)
            } else if t < qn {
                qn
            } else if t > qp {
                qp
            } else {
                t.round_ties_even() - t
            };
            dalpha += f64::from(c[i]) * e;
            scale_sum += (f64::from(c[i]) * e).abs();
        }
        assert!(
            clipped > 0 && clipped < n,
            "{what}: the data should hit both sides of the clip"
        );
        let g = 1.0 / (n as f64 * qp).sqrt();
        let tol = (1e-5 * scale_sum + unsure) * g;
        assert!(
            (f64::from(da) - dalpha * g).abs() <= tol,
            "{what}: dα {da} vs {}",
            dalpha * g
        );
    }
}

#[test]
fn elastic_eight_bit_is_per_tensor_min_max() {
    // Signed: symmetric, s = 127/(max|x| + 1e−6) over the whole tensor; unsigned: asymmetric over [min, max].
    let x = [0.5f32, -1.0, 2.5, 0.125, -3.0, 1.0];
    for signed in [true, false] {
        let q = ElasticQuantizer::new(8, signed).unwrap();
        assert_eq!(q.levels(), None);
        let xv = var(&x, &[2, 3]);
        let y = q.forward(&xv).unwrap();
        let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let want: Vec<f64> = reference_row(
            Quantizer::MinMax {
                bits: 8,
                symmetric: signed,
            },
            &x64,
        )
        .iter()
        .map(|w| w.value)
        .collect();
        assert_near(&format!("signed={signed}"), &values(&y), &want, 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(values(grads.get(&xv).unwrap()), [1.0; 6], "identity STE");
        assert!(grads.get(q.alpha()).is_none(), "8-bit does not use α");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Errors and edge cases

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let w = tensor(&AB, &[2, 4]);
    for bits in [0, 1, 9, 32] {
        for q in [
            Quantizer::LlmQat {
                bits,
                symmetric: true,
            },
            Quantizer::MinMax {
                bits,
                symmetric: bits == 1,
            },
        ] {
            assert!(q.fake_quant(&w, PerRow).is_err(), "{q:?}");
            assert!(q.parts(&w, PerRow).is_err(), "{q:?} parts");
        }
    }
    // 8-bit asymmetric codes reach 255: no i8 parts (the forward works).
    let q8 = Quantizer::LlmQat {
        bits: 8,
        symmetric: false,
    };
    assert!(q8.fake_quant(&w, PerRow).is_ok());
    assert!(q8.parts(&w, PerRow).is_err());

    let ints = Tensor::from_vec(vec![1i32, 2, 3, 4], (2, 2), CPU).unwrap();
    let scalar = Tensor::scalar_tensor(1f32, CPU).unwrap();
    for q in all_quantizers() {
        for g in [PerRow, PerTensor] {
            assert!(q.fake_quant(&ints, g).is_err(), "{q:?} on i32");
            assert!(q.fake_quant(&scalar, g).is_err(), "{q:?} on a scalar");
            assert!(q.parts(&ints, g).is_err(), "{q:?} parts on i32");
            assert!(q.parts(&scalar, g).is_err(), "{q:?} parts on a scalar");
        }
    }

    for bits in [0, 3, 5, 16] {
        assert!(
            ElasticQuantizer::new(bits, true).is_err(),
            "elastic {bits} bits"
        );
    }
    let not_var = Tensor::scalar_tensor(1f32, CPU).unwrap();
    assert!(ElasticQuantizer::with_alpha(not_var, 2, true).is_err());
    let two = tensor(&[1.0, 2.0], &[2]).var().unwrap();
    assert!(ElasticQuantizer::with_alpha(two, 2, true).is_err());
    let q = ElasticQuantizer::new(2, true).unwrap();
    assert!(q.forward(&ints).is_err());
    assert!(q.forward(&scalar).is_err());
    assert!(
        !q.is_initialised(),
        "a rejected input must not initialise α"
    );
}

#[test]
fn empty_tensors_quantize_to_empty() {
    for shape in [[0usize, 4], [3, 0]] {
        let x = Tensor::zeros(shape.to_vec(), DType::F32, CPU)
            .unwrap()
            .var()
            .unwrap();
        for q in all_quantizers() {
            let y = q.fake_quant(&x, PerRow).unwrap();
            assert_eq!(y.dims(), shape);
            let g = y.sum_all().unwrap().backward().unwrap();
            assert_eq!(g.get(&x).unwrap().dims(), shape);
            if !(q.is_asymmetric()
                && matches!(
                    q,
                    Quantizer::LlmQat { bits: 8, .. } | Quantizer::MinMax { bits: 8, .. }
                ))
            {
                let p = q.parts(&x, PerRow).unwrap();
                assert!(p.codes.is_empty());
                assert_eq!(p.scales.len(), shape[0]);
            }
        }
        let e = ElasticQuantizer::new(2, false).unwrap();
        assert_eq!(e.forward(&x).unwrap().dims(), shape);
        assert!(
            !e.is_initialised(),
            "an empty batch has no statistics to initialise α from"
        );
    }
}
