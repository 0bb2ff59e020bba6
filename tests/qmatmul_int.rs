//! The int4 and int8 packed kernels against "dequantize, then multiply in f64", on every instruction set
//! this CPU runs.
//!
//! Tolerance. The reference is Σ_k x̂_k·ŵ_k in f64 with ŵ from `QTensor::dequantize` and x̂ the
//! activations in their `ActMode` form. The kernels add the same products in f32 in some order, and
//! recursive f32 summation of K terms errs by at most K·u·Σ|terms| (u = 2⁻²⁴; Higham, Accuracy and
//! Stability, §4.2), plus a few roundings for the scale products: hence (K + 64)·u·Σ|terms|. The terms are
//! |x̂_k|·|ŵ_k|, except that asymmetric int4 kernels add s·Σu·x and min·Σx separately, whose roundings scale
//! with |s·u| + |min| rather than with |ŵ| (which can cancel to nearly 0); their magnitude sum uses those.
//! A kernel that drops or misplaces a weight errs by ~1/K of the magnitude, far above this bound.

use proptest::prelude::*;
use trit::cpu::qmatmul::{
    dequantize_rows, int4, int8, int8_acts, qmatmul, ActMode, Int8Acts, PackedWeights, QIsa,
    F32_PANEL_MIN_M,
};
use trit::quant::{Group, QFormat, QTensor};

/// splitmix64, for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }

    /// Uniform integer in lo..=hi.
    fn int(&mut self, lo: i8, hi: i8) -> i8 {
        (i64::from(lo) + (self.next() % (i64::from(hi) - i64::from(lo) + 1) as u64) as i64) as i8
    }
}

/// A packed matrix with random codes over the whole range, random scales and (asymmetric) mins.
fn random_qtensor(format: QFormat, rows: usize, cols: usize, rng: &mut Rng) -> QTensor {
    let (lo, hi) = format.code_range();
    let codes: Vec<i8> = (0..rows * cols).map(|_| rng.int(lo, hi)).collect();
    let n = rows * format.groups_per_row(cols);
    let scales: Vec<f32> = (0..n).map(|_| rng.range(0.001, 0.5)).collect();
    let mins: Vec<f32> = (0..n).map(|_| rng.range(-2.0, 1.0)).collect();
    let mins = format.has_mins().then_some(&mins[..]);
    QTensor::from_codes(format, rows, cols, &codes, &scales, mins).unwrap()
}

/// Per weight: the magnitude that the kernels' roundings scale with (see the module docs).
fn magnitudes(q: &QTensor) -> Vec<f64> {
    let deq = q.dequantize();
    match q.format() {
        QFormat::Int4 { asym: true, .. } => {
            let (g, gpr, cols) = (
                q.group_size(),
                q.format().groups_per_row(q.cols()),
                q.cols(),
            );
            q.codes()
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let gi = (i / cols) * gpr + (i % cols) / g;
                    f64::from(q.scales()[gi] * f32::from(c)).abs() + f64::from(q.mins()[gi]).abs()
                })
                .collect()
        }
        _ => deq.iter().map(|&w| f64::from(w).abs()).collect(),
    }
}

/// Runs the packed matmul on every available ISA and checks it against the f64 reference.
fn check(q: &QTensor, x: &[f32], m: usize, act: ActMode) {
    let xq = match act {
        ActMode::Int8 => Int8Acts::quantize(x, m, q.cols()).dequantize(),
        _ => x.to_vec(),
    };
    check_with(q, &xq, m, &format!("{act:?}"), |isa, out| {
        qmatmul(&q.packed(), x, m, act, out, isa)
    });
}

/// Checks `run(isa, out)`, which writes y [m, rows], against x̂ · Ŵᵀ in f64 for x̂ = `xq` (`m · cols`).
fn check_with(q: &QTensor, xq: &[f32], m: usize, what: &str, run: impl Fn(QIsa, &mut [f32])) {
    let (rows, cols) = (q.rows(), q.cols());
    let w = q.dequantize();
    let mag = magnitudes(q);
    let tol = (cols as f64 + 64.0) * f64::from(f32::EPSILON) / 2.0;
    for &isa in QIsa::available() {
        let mut out = vec![f32::NAN; m * rows];
        run(isa, &mut out);
        for i in 0..m {
            for r in 0..rows {
                let (xr, wr, mr) = (
                    &xq[i * cols..(i + 1) * cols],
                    &w[r * cols..(r + 1) * cols],
                    &mag[r * cols..(r + 1) * cols],
                );
                let want: f64 = xr
                    .iter()
                    .zip(wr)
                    .map(|(&x, &w)| f64::from(x) * f64::from(w))
                    .sum();
                let bound: f64 = xr
                    .iter()
                    .zip(mr)
                    .map(|(&x, &m)| f64::from(x).abs() * m)
                    .sum();
                let got = f64::from(out[i * rows + r]);
                assert!(
                    (got - want).abs() <= tol * bound + 1e-30,
                    "{:?} [{rows}, {cols}] m={m} {what} {isa:?}: y[{i}, {r}] = {got}, want {want} (bound {})",
                    q.format(),
                    tol * bound
                );
            }
        }
    }
}

fn random_x(m: usize, cols: usize, rng: &mut Rng) -> Vec<f32> {
    (0..m * cols).map(|_| rng.range(-3.0, 3.0)).collect()
}

fn group() -> impl Strategy<Value = Group> {
    prop_oneof![
        Just(Group::Size(32)),
        Just(Group::Size(64)),
        Just(Group::Size(128)),
        Just(Group::Row)
    ]
}

fn int4_format() -> impl Strategy<Value = QFormat> {
    (group(), any::<bool>()).prop_map(|(group, asym)| QFormat::Int4 { group, asym })
}

/// Column counts around every block, group and padding boundary, plus arbitrary ones.
fn cols() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![
            1usize, 31, 32, 33, 64, 127, 128, 129, 255, 256, 257, 1000
        ]),
        1usize..600,
    ]
}

/// Token counts on both sides of the f32 panel threshold.
fn tokens() -> impl Strategy<Value = usize> {
    prop::sample::select(vec![1usize, 2, 3, 4, 5, 7, 9, F32_PANEL_MIN_M])
}

fn act() -> impl Strategy<Value = ActMode> {
    prop_oneof![Just(ActMode::F32), Just(ActMode::Int8)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn int4_matches_reference(
        format in int4_format(),
        rows in 1usize..70,
        cols in cols(),
        m in tokens(),
        act in act(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let q = random_qtensor(format, rows, cols, &mut rng);
        check(&q, &random_x(m, cols, &mut rng), m, act);
    }

    #[test]
    fn int8_matches_reference(
        group in group(),
        rows in 1usize..70,
        cols in cols(),
        m in tokens(),
        act in act(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let q = random_qtensor(QFormat::Int8 { group }, rows, cols, &mut rng);
        check(&q, &random_x(m, cols, &mut rng), m, act);
    }
}

fn all_formats() -> Vec<QFormat> {
    let mut formats = Vec::new();
    for group in [
        Group::Size(32),
        Group::Size(64),
        Group::Size(128),
        Group::Row,
    ] {
        formats.push(QFormat::Int8 { group });
        for asym in [false, true] {
            formats.push(QFormat::Int4 { group, asym });
        }
    }
    formats
}

/// Round-to-nearest quantized weights (the scales and mins real models have), on shapes that span
/// several row chunks and token groups.
#[test]
fn quantized_weights_match_reference() {
    let mut rng = Rng(7);
    for format in all_formats() {
        for &(rows, cols) in &[(100, 1000), (37, 384), (130, 129)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.range(-1.0, 1.0)).collect();
            let q = QTensor::quantize(&w, rows, cols, format).unwrap();
            for m in [1, 6, 13] {
                let x = random_x(m, cols, &mut rng);
                check(&q, &x, m, ActMode::F32);
                check(&q, &x, m, ActMode::Int8);
            }
        }
    }
}

/// `dequantize_rows` (what the f32 panel GEMM multiplies) equals `QTensor::dequantize` for any row range:
/// exactly for symmetric codes; within one rounding of s·u + min for asymmetric ones, which the kernels
/// compute with one fused multiply-add.
#[test]
fn dequantize_rows_matches_dequantize() {
    let mut rng = Rng(11);
    for format in all_formats() {
        for &(rows, cols) in &[(5, 1), (9, 127), (7, 129), (4, 1000)] {
            let q = random_qtensor(format, rows, cols, &mut rng);
            let (want, mag) = (q.dequantize(), magnitudes(&q));
            for (isa, (r0, r1)) in isas_and_ranges(rows) {
                let mut got = vec![f32::NAN; (r1 - r0) * cols];
                match (isa, format) {
                    (None, _) => dequantize_rows(&q.packed(), r0..r1, &mut got),
                    (Some(isa), QFormat::Int4 { .. }) => {
                        int4::dequantize_rows_with_isa(&q.packed(), r0..r1, &mut got, isa)
                    }
                    (Some(isa), _) => {
                        int8::dequantize_rows_with_isa(&q.packed(), r0..r1, &mut got, isa)
                    }
                }
                for (k, &g) in got.iter().enumerate() {
                    let i = r0 * cols + k;
                    let err = (f64::from(g) - f64::from(want[i])).abs();
                    assert!(
                        err <= mag[i] * f64::from(f32::EPSILON),
                        "{format:?} [{rows}, {cols}] {isa:?} rows {r0}..{r1}: weight {i} is {g}, want {}",
                        want[i]
                    );
                }
            }
        }
    }
}

/// Row ranges of a matrix of `rows` ≥ 4 rows, each with every available ISA and with the dispatcher's
/// choice (None).
fn isas_and_ranges(rows: usize) -> Vec<(Option<QIsa>, (usize, usize))> {
    let isas = QIsa::available().iter().map(|&i| Some(i)).chain([None]);
    isas.flat_map(|isa| [(0, rows), (1, rows - 1), (2, 3)].map(|r| (isa, r)))
        .collect()
}

/// Extreme codes and activations over more columns than an i32 holds the sum of (140 000 · 127² > 2³¹):
/// exact integer sums must not wrap anywhere.
#[test]
fn large_k_does_not_overflow() {
    let cols = 140_000;
    let cases = [
        (QFormat::Int8 { group: Group::Row }, 127i8, -127i8),
        (
            QFormat::Int8 {
                group: Group::Size(128),
            },
            127,
            -127,
        ),
        (
            QFormat::Int4 {
                group: Group::Row,
                asym: false,
            },
            -8,
            7,
        ),
        (
            QFormat::Int4 {
                group: Group::Size(128),
                asym: false,
            },
            -8,
            7,
        ),
        (
            QFormat::Int4 {
                group: Group::Row,
                asym: true,
            },
            15,
            0,
        ),
    ];
    for (format, a, b) in cases {
        // Row 0 holds one extreme code, row 1 the other, row 2 alternates them.
        let codes: Vec<i8> = (0..3 * cols)
            .map(|i| match i / cols {
                0 => a,
                1 => b,
                _ if i % 2 == 0 => a,
                _ => b,
            })
            .collect();
        let n = 3 * format.groups_per_row(cols);
        let mins = vec![0.25f32; n];
        let q = QTensor::from_codes(
            format,
            3,
            cols,
            &codes,
            &vec![1.0; n],
            format.has_mins().then_some(&mins[..]),
        )
        .unwrap();
        // Every activation at ±max (int8 codes ±127), all one sign or alternating.
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| if i < cols || i % 3 == 0 { 1.0 } else { -1.0 })
            .collect();
        check(&q, &x, 2, ActMode::Int8);
        check(&q, &x, 2, ActMode::F32);
    }
}

/// Activation codes a caller quantized by its own rule (`int8_acts`) may include −128, which the kernels
/// must not negate (−(−128) wraps in i8): codes from the whole i8 range, extremes included.
#[test]
fn caller_codes_cover_the_whole_i8_range() {
    let mut rng = Rng(13);
    for format in all_formats() {
        let (rows, cols, m) = (21, 300, 3);
        let q = random_qtensor(format, rows, cols, &mut rng);
        let codes: Vec<i8> = (0..m * cols)
            .map(|i| match i % 7 {
                0 => i8::MIN,
                1 => i8::MAX,
                _ => rng.int(i8::MIN, i8::MAX),
            })
            .collect();
        let acts = Int8Acts::from_codes(&codes, &[0.5, 0.01, 2.0], m, cols);
        check_with(&q, &acts.dequantize(), m, "int8_acts", |isa, out| {
            int8_acts(&q.packed(), &acts, out, isa)
        });
    }
}

/// No columns: every output is an empty sum.
#[test]
fn zero_columns_give_zeros() {
    for format in all_formats() {
        let w = PackedWeights {
            format,
            rows: 3,
            cols: 0,
            data: &[],
            scales: &[],
            mins: &[],
            code_sums: &[],
        };
        for act in [ActMode::F32, ActMode::Int8] {
            for &isa in QIsa::available() {
                let mut out = vec![f32::NAN; 6];
                qmatmul(&w, &[], 2, act, &mut out, isa);
                assert_eq!(out, vec![0.0; 6], "{format:?} {act:?} {isa:?}");
            }
        }
    }
}
