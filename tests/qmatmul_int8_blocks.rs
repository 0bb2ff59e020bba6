//! Int8 block activations (`ActMode::Int8Blocks`) against group-32 int4 and int8 weights in the tile
//! layout, against "dequantize both, multiply in f64", on every instruction set this CPU runs, in thread
//! pools of one and three threads (the row split differs), for shapes that are not multiples of the
//! 16-row tile or the 32-column block.

use proptest::prelude::*;
use trit::cpu::qmatmul::interleaved::{BlockActs, Interleaved, GROUP, TILE_ROWS};
use trit::cpu::qmatmul::{qmatmul, ActMode, QIsa};
use trit::quant::{Group, QFormat, QTensor};
use trit::{Device, Tensor};

const FORMATS: [QFormat; 3] = [
    QFormat::Int4 {
        group: Group::Size(32),
        asym: false,
    },
    QFormat::Int4 {
        group: Group::Size(32),
        asym: true,
    },
    QFormat::Int8 {
        group: Group::Size(32),
    },
];

/// A deterministic stream of values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random weights quantized into `format`, with a spread of group magnitudes (and of signs of the mins).
/// With `f16`, the scales and mins are rounded to f16 values, as GGUF stores them, which the tile
/// layout then keeps in 2 bytes instead of 4.
fn weights(format: QFormat, rows: usize, cols: usize, rng: &mut Lcg, f16: bool) -> QTensor {
    let w: Vec<f32> = (0..rows * cols)
        .map(|k| {
            let group_scale = 1.0 + 4.0 * (((k / 32) * 7919 % 13) as f32 / 13.0);
            rng.next() * group_scale + if k % 97 == 0 { 0.5 } else { 0.0 }
        })
        .collect();
    let q = QTensor::quantize(&w, rows, cols, format).expect("valid shape");
    if !f16 {
        return q;
    }
    let round =
        |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    let mins = round(q.mins());
    QTensor::from_codes(
        format,
        rows,
        cols,
        &q.codes(),
        &round(q.scales()),
        format.has_mins().then_some(&mins[..]),
    )
    .expect("valid codes")
}

/// y = x̂·Ŵᵀ in f64, and per entry the scale of the rounding error: Σ|x̂|(|ŵ| + 2|min|), since
/// the kernel sums the scaled codes (|s·u| ≤ |ŵ| + |min|) and the min terms apart, and those two
/// can cancel.
fn reference(w: &QTensor, xhat: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (rows, cols) = (w.rows(), w.cols());
    let wd = w.dequantize();
    let groups = cols.div_ceil(GROUP);
    let min = |r: usize, k: usize| -> f64 {
        w.mins()
            .get(r * groups + k / GROUP)
            .map_or(0.0, |&v| f64::from(v).abs())
    };
    let mut y = vec![0f64; m * rows];
    let mut mag = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            for k in 0..cols {
                let (x, v) = (f64::from(xhat[i * cols + k]), f64::from(wd[r * cols + k]));
                y[i * rows + r] += x * v;
                mag[i * rows + r] += x.abs() * (v.abs() + 2.0 * min(r, k));
            }
        }
    }
    (y, mag)
}

fn check(w: &QTensor, x: &[f32], m: usize, threads: usize) -> Result<(), TestCaseError> {
    let xhat = BlockActs::quantize(x, m, w.cols()).dequantize();
    let (want, mag) = reference(w, &xhat, m);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let xt = Tensor::from_vec(x.to_vec(), (m, w.cols()), Device::Cpu).expect("shape");
    for &isa in QIsa::available() {
        // Both entry points: the raw kernel (repacking on the call) and QTensor's cached layout.
        let mut raw = vec![f32::NAN; m * w.rows()];
        pool.install(|| qmatmul(&w.packed(), x, m, ActMode::Int8Blocks, &mut raw, isa));
        let cached = pool
            .install(|| w.matmul_with_isa(&xt, ActMode::Int8Blocks, isa))
            .expect("a supported format")
            .to_vec_f32();
        for (what, got) in [("qmatmul", &raw), ("QTensor::matmul", &cached)] {
            for (j, ((&g, &y), &s)) in got.iter().zip(&want).zip(&mag).enumerate() {
                // Integer sums are exact; what remains is a few f32 roundings per block of 32.
                let tol = 2e-6 * s + 1e-30;
                prop_assert!(
                    (f64::from(g) - y).abs() <= tol,
                    "{what} {:?} [{}, {}] m {m} {isa:?} {threads} threads: entry {j}: got {g}, want {y}",
                    w.format(),
                    w.rows(),
                    w.cols()
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn matches_the_f64_reference(
        f in 0usize..3,
        rows in 1usize..70,
        cols in 1usize..200,
        m in 1usize..11,
        f16 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Lcg(seed);
        let w = weights(FORMATS[f], rows, cols, &mut rng, f16);
        if f16 {
            // f16 scales (and mins) take 2 bytes each in the tile layout.
            let code_bytes = if f == 2 { 512 } else { 256 };
            let vectors = if f == 1 { 2 } else { 1 };
            let il = Interleaved::new(&w.packed()).expect("a tile format");
            let groups = cols.div_ceil(GROUP) * rows.div_ceil(TILE_ROWS);
            prop_assert_eq!(il.byte_size(), groups * (code_bytes + vectors * TILE_ROWS * 2));
        }
        // Activations with an outlier channel: per-block scales keep the other blocks fine.
        let x: Vec<f32> = (0..m * cols)
            .map(|k| rng.next() * if k % cols == 3 { 40.0 } else { 1.0 })
            .collect();
        check(&w, &x, m, 1)?;
        check(&w, &x, m, 3)?;
    }
}

#[test]
fn block_activations_round_per_block() {
    // Two blocks of very different ranges: each keeps its own scale. Rounding is to the nearest
    // integer, ties to even (2.5 → 2, 3.5 → 4, −63.5 → −64).
    let mut x = vec![0f32; 40];
    x[0] = 127.0;
    x[1] = 0.6;
    x[2] = 2.5;
    x[3] = 3.5;
    x[4] = -2.4;
    x[32] = 0.01;
    x[33] = -0.005;
    let a = BlockActs::quantize(&x, 1, 40);
    assert_eq!(a.groups, 2);
    assert_eq!(a.scales, vec![1.0, 0.01 / 127.0]);
    assert_eq!(&a.q[..5], &[127, 1, 2, 4, -2]);
    assert_eq!(&a.q[32..34], &[127, -64]);
    assert_eq!(a.sums, vec![132, 63]);
    // An all-zero block has scale 0 and codes 0.
    let z = BlockActs::quantize(&[0.0; 5], 1, 5);
    assert_eq!((z.scales[0], z.sums[0]), (0.0, 0));
}

#[test]
fn other_formats_are_refused() {
    let w = QTensor::quantize(
        &[0.5f32; 64 * 3],
        3,
        64,
        QFormat::Int4 {
            group: Group::Size(64),
            asym: false,
        },
    )
    .unwrap();
    assert!(!Interleaved::supports(w.format()));
    let x = Tensor::ones((1, 64), trit::DType::F32, Device::Cpu).unwrap();
    let err = w.matmul(&x, ActMode::Int8Blocks).unwrap_err().to_string();
    assert!(err.contains("groups of 32"), "{err}");
    assert_eq!((TILE_ROWS, GROUP), (16, 32));
}

#[test]
fn many_matrices_at_once_equal_one_by_one() {
    // A layer's q, k and v: different row counts (not multiples of 16), one shared input; one token
    // (the fused path) and three (one product per matrix).
    let mut rng = Lcg(11);
    let ws: Vec<QTensor> = [(40, FORMATS[1]), (17, FORMATS[0]), (23, FORMATS[2])]
        .into_iter()
        .map(|(rows, f)| weights(f, rows, 100, &mut rng, true))
        .collect();
    let refs: Vec<&QTensor> = ws.iter().collect();
    for m in [1usize, 3] {
        let x: Vec<f32> = (0..m * 100).map(|_| rng.next()).collect();
        let xt = Tensor::from_vec(x, (1, m, 100), Device::Cpu).unwrap();
        let many = QTensor::matmul_many(&refs, &xt, ActMode::Int8Blocks).unwrap();
        for (w, y) in ws.iter().zip(&many) {
            let one = w.matmul(&xt, ActMode::Int8Blocks).unwrap();
            assert_eq!(y.dims(), &[1, m, w.rows()]);
            assert_eq!(y.to_vec_f32(), one.to_vec_f32());
        }
    }
}
