//! Ternary (`Ternary2`, `Ternary3`) and binary packed kernels against "dequantize, then matmul in f64", on
//! every instruction set this CPU runs, with f32, int8 and binary activations.

use proptest::prelude::*;
use trit::cpu::qmatmul::{
    int8_acts, qmatmul, ActMode, BinaryActs, Int8Acts, QIsa, F32_PANEL_MIN_M,
};
use trit::quant::{Group, QFormat, QTensor};

// The token counts of the proptests (up to 5, then 9) reach both sides of the f32 panel threshold.
const _: () = assert!(F32_PANEL_MIN_M > 5 && F32_PANEL_MIN_M <= 9);

fn formats() -> Vec<QFormat> {
    let mut f: Vec<QFormat> = [
        Group::Row,
        Group::Size(32),
        Group::Size(64),
        Group::Size(128),
        Group::Size(256),
    ]
    .into_iter()
    .map(|group| QFormat::Ternary2 { group })
    .collect();
    f.extend(
        [Group::Row, Group::Size(256), Group::Size(512)]
            .into_iter()
            .map(|group| QFormat::Ternary3 { group }),
    );
    f.push(QFormat::Binary { offset: false });
    f.push(QFormat::Binary { offset: true });
    f
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next() as f32 / (1u64 << 31) as f32)
    }
}

/// Random codes and scales (of both signs; offsets for `Binary { offset: true }`); with `zero_rows`, every
/// fourth ternary row is all zero codes, whose products must come out exactly 0.
fn weights(format: QFormat, rows: usize, cols: usize, rng: &mut Lcg, zero_rows: bool) -> QTensor {
    let binary = matches!(format, QFormat::Binary { .. });
    let codes: Vec<i8> = (0..rows * cols)
        .map(|k| {
            let c = (rng.next() % 3) as i8 - 1;
            match (binary, zero_rows && (k / cols.max(1)) % 4 == 3) {
                (true, _) => {
                    if c < 0 {
                        -1
                    } else {
                        1
                    }
                }
                (false, true) => 0,
                (false, false) => c,
            }
        })
        .collect();
    let scales: Vec<f32> = (0..rows * format.groups_per_row(cols))
        .map(|_| rng.uniform(-1.0, 1.0))
        .collect();
    let mins: Vec<f32> = (0..rows).map(|_| rng.uniform(-1.0, 1.0)).collect();
    QTensor::from_codes(
        format,
        rows,
        cols,
        &codes,
        &scales,
        format.has_mins().then_some(&mins[..]),
    )
    .unwrap()
}

/// y = x̂·Ŵᵀ in f64 ([m, rows]) and, per entry, the magnitude Σ|x̂|·(|ŵ| + |β|) that bounds the terms a
/// kernel adds (a binary kernel adds α·b·x and β·x separately).
fn reference(w: &QTensor, xhat: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (rows, cols) = (w.rows(), w.cols());
    let wd = w.dequantize();
    let mut y = vec![0f64; m * rows];
    let mut mag = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            let beta = if matches!(w.format(), QFormat::Binary { .. }) {
                f64::from(w.mins().get(r).copied().unwrap_or(0.0)).abs()
            } else {
                0.0
            };
            for k in 0..cols {
                let (x, wv) = (f64::from(xhat[i * cols + k]), f64::from(wd[r * cols + k]));
                y[i * rows + r] += x * wv;
                mag[i * rows + r] += x.abs() * (wv.abs() + beta);
            }
        }
    }
    (y, mag)
}

/// Tolerance relative to the magnitude of the summed terms. Integer paths are exact up to a few f32
/// roundings of the scales (~ε = 6·10⁻⁸); f32 paths (and the panel GEMM) add n ≈ K/16 products per lane in
/// sequence, whose rounding error on these inputs grows like √n·ε (n·ε needs adversarial cancellation):
/// 10⁻⁵ leaves a margin of about 20 at K = 1000, and it grows with √K beyond.
fn rel_tol(k: usize) -> f64 {
    1e-5 * (k as f64 / 1000.0).sqrt().max(1.0)
}

fn check(
    got: &[f32],
    want: &[f64],
    mag: &[f64],
    k: usize,
    what: &str,
) -> Result<(), TestCaseError> {
    for (j, ((&g, &w), &s)) in got.iter().zip(want).zip(mag).enumerate() {
        let err = (f64::from(g) - w).abs();
        prop_assert!(
            err <= rel_tol(k) * s,
            "{what}: entry {j}: got {g}, want {w} (|err| {err:e}, terms {s:e})"
        );
    }
    Ok(())
}

/// Runs `qmatmul` with activations `act` on every ISA and compares with the reference.
fn check_mode(w: &QTensor, x: &[f32], m: usize, act: ActMode) -> Result<(), TestCaseError> {
    let cols = w.cols();
    let xhat = match act {
        ActMode::F32 => x.to_vec(),
        ActMode::Int8 => Int8Acts::quantize(x, m, cols).dequantize(),
        ActMode::Binary => BinaryActs::binarize(x, m, cols).dequantize(),
        ActMode::Int8Blocks => unreachable!("no ternary or binary tile layout"),
    };
    let (want, mag) = reference(w, &xhat, m);
    for &isa in QIsa::available() {
        let mut out = vec![f32::NAN; m * w.rows()];
        qmatmul(&w.packed(), x, m, act, &mut out, isa);
        let what = format!(
            "{:?} [{}, {cols}] m {m} {act:?} {isa:?}",
            w.format(),
            w.rows()
        );
        check(&out, &want, &mag, cols, &what)?;
    }
    Ok(())
}

fn cols_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(63),
        Just(64),
        Just(255),
        Just(256),
        Just(257),
        Just(1000),
        1usize..600,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every format and group size, K off every block multiple, m on both sides of F32_PANEL_MIN_M
    /// (9 takes the f32 panel path), every activation form.
    #[test]
    fn packed_kernels_match_reference(
        fi in 0usize..10,
        rows in 1usize..40,
        cols in cols_strategy(),
        m in prop_oneof![Just(1usize), Just(2), Just(3), Just(5), Just(9)],
        seed in any::<u64>(),
        zero_rows in any::<bool>(),
    ) {
        let format = formats()[fi];
        let mut rng = Lcg(seed);
        let w = weights(format, rows, cols, &mut rng, zero_rows);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.uniform(-2.0, 2.0)).collect();
        check_mode(&w, &x, m, ActMode::F32)?;
        check_mode(&w, &x, m, ActMode::Int8)?;
        if matches!(format, QFormat::Binary { .. }) {
            check_mode(&w, &x, m, ActMode::Binary)?;
        }
    }

    /// Int8 activations given as codes over the whole i8 range, −128 included (`Int8Acts::from_codes`
    /// takes any code).
    #[test]
    fn int8_codes_full_range(
        fi in 0usize..10,
        rows in 1usize..20,
        cols in cols_strategy(),
        m in 1usize..7,
        seed in any::<u64>(),
    ) {
        let format = formats()[fi];
        let mut rng = Lcg(seed);
        let w = weights(format, rows, cols, &mut rng, false);
        let codes: Vec<i8> = (0..m * cols).map(|_| rng.next() as u8 as i8).collect();
        let steps: Vec<f32> = (0..m).map(|_| rng.uniform(0.001, 0.1)).collect();
        let acts = Int8Acts::from_codes(&codes, &steps, m, cols);
        let (want, mag) = reference(&w, &acts.dequantize(), m);
        for &isa in QIsa::available() {
            let mut out = vec![f32::NAN; m * rows];
            int8_acts(&w.packed(), &acts, &mut out, isa);
            check(&out, &want, &mag, cols, &format!("{format:?} [{rows}, {cols}] m {m} {isa:?}"))?;
        }
    }
}

/// A K past one i32 accumulation segment (65536 columns) with the largest products: every weight +1 and
/// every activation code −128 (or 127 through `qmatmul`), where a naive i32 sum of (code + 1)·x would
/// overflow in a long enough row. The exact sums are integers below 2²⁴, so the results are exact.
#[test]
fn large_k_extreme_values() {
    let (rows, m) = (3, 2);
    for format in [
        QFormat::Ternary2 { group: Group::Row },
        QFormat::Ternary2 {
            group: Group::Size(32),
        },
        QFormat::Ternary3 { group: Group::Row },
        QFormat::Ternary3 {
            group: Group::Size(512),
        },
        QFormat::Binary { offset: false },
    ] {
        let cols = 70_000;
        let codes = vec![1i8; rows * cols];
        let scales = vec![1f32; rows * format.groups_per_row(cols)];
        let w = QTensor::from_codes(format, rows, cols, &codes, &scales, None).unwrap();
        let acts = Int8Acts::from_codes(&vec![-128i8; m * cols], &vec![1.0; m], m, cols);
        let ones = vec![1f32; m * cols];
        for &isa in QIsa::available() {
            let mut out = vec![f32::NAN; m * rows];
            int8_acts(&w.packed(), &acts, &mut out, isa);
            assert!(
                out.iter().all(|&y| y == -128.0 * cols as f32),
                "{format:?} {isa:?}: {out:?}"
            );
            // f32: sums of ones, exact. Int8: the exact 127·K times the step 1/127, rounded once or twice.
            for (act, tol) in [(ActMode::F32, 0.0), (ActMode::Int8, 2.5e-7)] {
                let mut out = vec![f32::NAN; m * rows];
                qmatmul(&w.packed(), &ones, m, act, &mut out, isa);
                let want = cols as f32;
                assert!(
                    out.iter().all(|&y| (y - want).abs() <= tol * want),
                    "{format:?} {isa:?} {act:?}: {out:?}"
                );
            }
        }
    }
}

/// A binary row of all +1 against all-positive activations: popcount(w ⊕ x) = 0 over K = 70 000, so the
/// XNOR path gives exactly K·α·β_x.
#[test]
fn large_k_binary_activations() {
    let (rows, m, cols) = (2, 3, 70_000);
    let w = QTensor::from_codes(
        QFormat::Binary { offset: false },
        rows,
        cols,
        &vec![1i8; rows * cols],
        &[1.0, 2.0],
        None,
    )
    .unwrap();
    let x = vec![0.5f32; m * cols];
    for &isa in QIsa::available() {
        let mut out = vec![f32::NAN; m * rows];
        qmatmul(&w.packed(), &x, m, ActMode::Binary, &mut out, isa);
        for (j, &y) in out.iter().enumerate() {
            assert_eq!(
                y,
                0.5 * cols as f32 * (1 + j % rows) as f32,
                "{isa:?} entry {j}"
            );
        }
    }
}
