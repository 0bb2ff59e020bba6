//! Matrix multiplication against the naive f64 reference: `Tensor::matmul` over odd shapes, transposed and
//! strided operands and broadcast batch dims, and the raw GEMM `sgemm_with_isa` on every ISA this machine
//! supports.
//!
//! Tolerance: any summation order of k products in f32 is within γ_k · Σ|a||b| (γ_k = k·u/(1 − k·u),
//! u = 2⁻²⁴) of the exact result, so each element is checked against that rigorous bound, computed from
//! |A|·|B| in f64. A dropped, doubled or misplaced term is far outside it.

mod common;

use common::*;
use proptest::prelude::*;
use trit::cpu::matmul::{sgemm_with_isa, Isa, MatRef};
use trit::{DType, Tensor};

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Checks `got` (row-major [.., m, n]) against `a @ b` within the rounding bound of a k-term f32 dot product
/// (plus `extra` ulps for a final rounding to a narrower dtype, and `c0` for accumulation).
fn check_gemm(what: &str, got: &[f32], a: &Ref, b: &Ref, c0: Option<&Ref>, extra_rel: f64) {
    let want = a.matmul(b);
    let bound = a.map(f64::abs).matmul(&b.map(f64::abs));
    let k = a.shape[a.rank() - 1];
    let terms = k + c0.is_some() as usize;
    let gamma = 1.01 * terms as f64 * U;
    assert_eq!(got.len(), want.numel(), "{what}: element count");
    let mut worst: Option<(usize, f64)> = None;
    for (i, &g) in got.iter().enumerate() {
        let (mut w, mut b) = (want.data[i], bound.data[i]);
        if let Some(c) = c0 {
            w += c.data[i];
            b += c.data[i].abs();
        }
        // Below f16's smallest normal (2^-14) its spacing stops shrinking: a half-ulp floor.
        let allowed = gamma * b + extra_rel * w.abs().max(2f64.powi(-14)) + 1e-30;
        let err = (g as f64 - w).abs();
        let score = if err.is_nan() {
            f64::INFINITY
        } else {
            err / allowed
        };
        if score > 1.0 && worst.is_none_or(|(_, s)| score > s) {
            worst = Some((i, score));
        }
    }
    if let Some((i, score)) = worst {
        let w = want.data[i] + c0.map_or(0.0, |c| c.data[i]);
        panic!(
            "{what}: worst element {:?} of shape {:?}: got {}, expected {w} ({score:.1}× the bound)",
            unravel(i, &want.shape),
            want.shape,
            got[i]
        );
    }
}

fn t_last(r: &Ref) -> Ref {
    r.transpose(r.rank() - 2, r.rank() - 1)
}

/// An operand of logical shape `shape` whose matrix is stored transposed (read through `.t()`), or not.
fn operand(shape: &[usize], transposed: bool, rng: &mut DataRng) -> (Tensor, Ref) {
    let n = shape.len();
    if transposed {
        let mut st = shape.to_vec();
        st.swap(n - 2, n - 1);
        let r = Ref::uniform(&st, rng, -1.0, 1.0);
        (r.tensor().t().unwrap(), t_last(&r))
    } else {
        let r = Ref::uniform(shape, rng, -1.0, 1.0);
        (r.tensor(), r)
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// Odd m, n, k in 1..=67 and all four transpose combinations.
    #[test]
    fn odd_shapes_and_transposes(m in 1usize..=67, n in 1usize..=67, k in 1usize..=67, ta in any::<bool>(), tb in any::<bool>(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (a, ra) = operand(&[m, k], ta, &mut rng);
        let (b, rb) = operand(&[k, n], tb, &mut rng);
        let c = a.matmul(&b).unwrap();
        prop_assert_eq!(c.dims(), &[m, n]);
        check_gemm("matmul", &c.to_vec_f32(), &ra, &rb, None, 0.0);
    }

    /// Batched, with broadcast batch dims (size 1 or missing on either side), transposed matrices.
    #[test]
    fn batched_broadcast(batch in shape(0, 3), m in 1usize..=9, n in 1usize..=9, k in 1usize..=17, ta in any::<bool>(), tb in any::<bool>(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (ba, bb) = (broadcast_side(&batch, &mut rng), broadcast_side(&batch, &mut rng));
        let sa: Vec<usize> = ba.iter().copied().chain([m, k]).collect();
        let sb: Vec<usize> = bb.iter().copied().chain([k, n]).collect();
        let (a, ra) = operand(&sa, ta, &mut rng);
        let (b, rb) = operand(&sb, tb, &mut rng);
        let c = a.matmul(&b).unwrap();
        let want: Vec<usize> = broadcast_shapes(&ba, &bb).unwrap().into_iter().chain([m, n]).collect();
        prop_assert_eq!(c.dims(), want.as_slice());
        check_gemm("batched matmul", &c.to_vec_f32(), &ra, &rb, None, 0.0);
    }

    /// Arbitrary strided operands: permuted batch dims (which do not collapse to one batch stride),
    /// narrowed views of padded buffers, every-other-element views, stride-0 broadcasts.
    #[test]
    fn strided_operands(batch in shape(0, 2), m in 1usize..=9, n in 1usize..=9, k in 1usize..=9, va in view(), vb in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let sa: Vec<usize> = batch.iter().copied().chain([m, k]).collect();
        let sb: Vec<usize> = batch.iter().copied().chain([k, n]).collect();
        let (a, ra) = input_uniform(&sa, va, &mut rng, -1.0, 1.0);
        let (b, rb) = input_uniform(&sb, vb, &mut rng, -1.0, 1.0);
        let c = a.matmul(&b).unwrap();
        check_gemm("strided matmul", &c.to_vec_f32(), &ra, &rb, None, 0.0);
    }

    /// f16/bf16 operands: computed in f32, rounded once to the operand dtype.
    #[test]
    fn half_precision(m in 1usize..=20, n in 1usize..=20, k in 1usize..=40, seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        for (dtype, ulp) in [(DType::F16, 2f64.powi(-11)), (DType::BF16, 2f64.powi(-8))] {
            let a = Ref::uniform(&[m, k], &mut rng, -1.0, 1.0).tensor().to_dtype(dtype).unwrap();
            let b = Ref::uniform(&[k, n], &mut rng, -1.0, 1.0).tensor().to_dtype(dtype).unwrap();
            let ra = Ref::new(a.to_vec_f32().iter().map(|&v| v as f64).collect(), &[m, k]);
            let rb = Ref::new(b.to_vec_f32().iter().map(|&v| v as f64).collect(), &[k, n]);
            let c = a.matmul(&b).unwrap();
            prop_assert_eq!(c.dtype(), dtype);
            check_gemm("half matmul", &c.to_vec_f32(), &ra, &rb, None, ulp);
        }
    }
}

#[test]
fn large_shapes() {
    let mut rng = DataRng::new(11);
    for &(m, n, k, ta, tb) in &[
        (257, 300, 129, false, false),
        (129, 257, 300, true, false),
        (64, 65, 513, false, true),
        (1, 1000, 300, false, true),
        (300, 1, 257, true, true),
    ] {
        let (a, ra) = operand(&[m, k], ta, &mut rng);
        let (b, rb) = operand(&[k, n], tb, &mut rng);
        let c = a.matmul(&b).unwrap();
        check_gemm(
            &format!("matmul {m}x{n}x{k} ta={ta} tb={tb}"),
            &c.to_vec_f32(),
            &ra,
            &rb,
            None,
            0.0,
        );
    }
    // Batched with a broadcast right operand (one weight matrix for every batch entry).
    let (a, ra) = operand(&[3, 70, 130], false, &mut rng);
    let (b, rb) = operand(&[130, 66], true, &mut rng);
    check_gemm(
        "batched large",
        &a.matmul(&b).unwrap().to_vec_f32(),
        &ra,
        &rb,
        None,
        0.0,
    );
}

#[test]
fn degenerate_shapes() {
    // k = 0: an empty sum is zero.
    let a = Tensor::ones((3, 0), DType::F32, CPU).unwrap();
    let b = Tensor::ones((0, 2), DType::F32, CPU).unwrap();
    assert_eq!(a.matmul(&b).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 6]);
    // m = 0 or n = 0: empty results.
    let e = Tensor::ones((0, 4), DType::F32, CPU).unwrap();
    assert_eq!(
        e.matmul(&Tensor::ones((4, 5), DType::F32, CPU).unwrap())
            .unwrap()
            .dims(),
        &[0, 5]
    );
    // Stride-0 rows and columns (broadcast inner dims).
    let col = Tensor::from_slice(&[1f32, 2.0, 3.0], CPU)
        .unwrap()
        .reshape((3, 1))
        .unwrap();
    let a = col.broadcast_as((3, 4)).unwrap();
    let b = Tensor::from_slice(&[1f32, 10.0, 100.0], CPU)
        .unwrap()
        .reshape((1, 3))
        .unwrap()
        .broadcast_as((4, 3))
        .unwrap();
    assert_eq!(
        a.matmul(&b).unwrap().to_vec::<f32>().unwrap(),
        vec![4., 40., 400., 8., 80., 800., 12., 120., 1200.]
    );
}

// ---------------------------------------------------------------------------------------------------------
// The raw GEMM on every ISA

/// How a matrix sits in memory.
#[derive(Clone, Copy, Debug)]
enum Store {
    RowMajor,
    ColMajor,
    /// Row-major with a leading dimension larger than the row.
    PaddedRows,
    /// Column-major with a padded leading dimension.
    PaddedCols,
    /// Both strides > 1.
    Strided,
}

const STORES: [Store; 5] = [
    Store::RowMajor,
    Store::ColMajor,
    Store::PaddedRows,
    Store::PaddedCols,
    Store::Strided,
];

/// The values of `r` ([rows, cols]) laid out as `store`, unused slots NaN; returns (buffer, rs, cs).
fn lay_out(r: &Ref, store: Store) -> (Vec<f32>, usize, usize) {
    let (rows, cols) = (r.shape[0], r.shape[1]);
    let (rs, cs) = match store {
        Store::RowMajor => (cols, 1),
        Store::ColMajor => (1, rows),
        Store::PaddedRows => (cols + 3, 1),
        Store::PaddedCols => (1, rows + 5),
        Store::Strided => (2 * cols + 1, 2),
    };
    let len = if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    };
    let mut buf = vec![f32::NAN; len];
    for i in 0..rows {
        for j in 0..cols {
            buf[i * rs + j * cs] = r.data[i * cols + j] as f32;
        }
    }
    (buf, rs, cs)
}

#[allow(clippy::too_many_arguments)]
fn run_sgemm(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    sa: Store,
    sb: Store,
    accumulate: bool,
    seed: u64,
) {
    let mut rng = DataRng::new(seed);
    let ra = Ref::uniform(&[m, k], &mut rng, -1.0, 1.0);
    let rb = Ref::uniform(&[k, n], &mut rng, -1.0, 1.0);
    let (abuf, ars, acs) = lay_out(&ra, sa);
    let (bbuf, brs, bcs) = lay_out(&rb, sb);
    let c0 = Ref::uniform(&[m, n], &mut rng, -1.0, 1.0);
    // Without accumulate, C's old contents must not be read: NaN would leak into the result.
    let mut c: Vec<f32> = if accumulate {
        c0.f32s()
    } else {
        vec![f32::NAN; m * n]
    };
    sgemm_with_isa(
        isa,
        m,
        n,
        k,
        MatRef {
            data: &abuf,
            rs: ars,
            cs: acs,
        },
        MatRef {
            data: &bbuf,
            rs: brs,
            cs: bcs,
        },
        &mut c,
        accumulate,
    );
    let what = format!("sgemm {isa:?} {m}x{n}x{k} A {sa:?} B {sb:?} accumulate={accumulate}");
    check_gemm(&what, &c, &ra, &rb, accumulate.then_some(&c0), 0.0);
}

#[test]
fn isa_list_is_usable() {
    let isas = Isa::available();
    assert!(
        !isas.is_empty(),
        "at least the portable kernel is always available"
    );
    for (i, a) in isas.iter().enumerate() {
        assert!(!isas[i + 1..].contains(a), "{a:?} listed twice");
    }
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn sgemm_every_isa(m in 1usize..=67, n in 1usize..=67, k in 1usize..=67, sa in 0usize..5, sb in 0usize..5, accumulate in any::<bool>(), seed in any::<u64>()) {
        for isa in Isa::available() {
            run_sgemm(isa, m, n, k, STORES[sa], STORES[sb], accumulate, seed);
        }
    }
}

#[test]
fn sgemm_tile_edges_every_isa() {
    // Sizes around common micro-tile and cache-block edges.
    let sizes = [
        1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 49, 63, 64, 65,
    ];
    for isa in Isa::available() {
        let mut seed = 0;
        for &m in &sizes {
            for &n in &sizes {
                seed += 1;
                let k = sizes[seed % sizes.len()];
                run_sgemm(
                    isa,
                    m,
                    n,
                    k,
                    STORES[seed % 5],
                    STORES[(seed / 5) % 5],
                    seed % 3 == 0,
                    seed as u64,
                );
            }
        }
    }
}

#[test]
fn sgemm_large_every_isa() {
    // Large enough to exercise packing and every level of blocking (k beyond one k-block).
    for isa in Isa::available() {
        run_sgemm(
            isa,
            257,
            300,
            129,
            Store::RowMajor,
            Store::RowMajor,
            false,
            1,
        );
        run_sgemm(
            isa,
            257,
            300,
            129,
            Store::ColMajor,
            Store::PaddedRows,
            true,
            2,
        );
        run_sgemm(
            isa,
            130,
            67,
            700,
            Store::PaddedRows,
            Store::ColMajor,
            false,
            3,
        );
        run_sgemm(
            isa,
            67,
            513,
            300,
            Store::Strided,
            Store::PaddedCols,
            true,
            4,
        );
    }
}

#[test]
fn sgemm_degenerate_every_isa() {
    for isa in Isa::available() {
        // k = 0: C = 0 (or unchanged when accumulating).
        let mut c = vec![f32::NAN; 6];
        let empty = MatRef {
            data: &[],
            rs: 0,
            cs: 1,
        };
        sgemm_with_isa(isa, 2, 3, 0, empty, empty, &mut c, false);
        assert_eq!(c, vec![0.0; 6], "{isa:?}: k = 0 without accumulate");
        let mut c = vec![1.5f32; 6];
        sgemm_with_isa(isa, 2, 3, 0, empty, empty, &mut c, true);
        assert_eq!(c, vec![1.5; 6], "{isa:?}: k = 0 with accumulate");
        // m = 0 / n = 0: nothing to write.
        let a = [1f32; 4];
        let mut none: Vec<f32> = vec![];
        sgemm_with_isa(
            isa,
            0,
            3,
            4,
            MatRef {
                data: &[],
                rs: 4,
                cs: 1,
            },
            MatRef {
                data: &[1.0; 12],
                rs: 3,
                cs: 1,
            },
            &mut none,
            false,
        );
        sgemm_with_isa(
            isa,
            1,
            0,
            4,
            MatRef {
                data: &a,
                rs: 4,
                cs: 1,
            },
            MatRef {
                data: &[],
                rs: 0,
                cs: 1,
            },
            &mut none,
            false,
        );
        // Stride-0 operands (a broadcast row of A, a broadcast column of B), as Tensor::matmul passes them.
        let row = [1f32, 2.0, 3.0];
        let col = [10f32, 20.0, 30.0];
        let mut c = vec![0f32; 4];
        sgemm_with_isa(
            isa,
            2,
            2,
            3,
            MatRef {
                data: &row,
                rs: 0,
                cs: 1,
            },
            MatRef {
                data: &col,
                rs: 1,
                cs: 0,
            },
            &mut c,
            false,
        );
        assert_eq!(c, vec![140.0; 4], "{isa:?}: stride-0 operands");
    }
}
