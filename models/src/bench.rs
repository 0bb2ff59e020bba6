//! Matrix-multiplication throughput of trit against the `gemm` crate (the
//! peer), for the `trit` command-line tool's benchmark report.

use std::time::Instant;

use gemm::Parallelism;
use trit::cpu::matmul::{sgemm, MatRef};

/// One measured shape: `C[m x n] = A[m x k] * B[k x n]`, both libraries on
/// the same inputs in the same run.
pub struct GemmRow {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trit_gflops: f64,
    pub peer_gflops: f64,
}

/// A shape to time; `b_transposed` stores B as its row-major `n x k`
/// transpose (a weight matrix used as `x * W^T`).
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
}

/// Times trit::cpu::matmul::sgemm and gemm::gemm (the peer) on the same
/// inputs in the same run, median of several repetitions after warm-up.
///
/// Rows, in order: square 256, 512, 1024 and 2048; then the demo model's
/// products over 8 x 256 = 2048 tokens: 2048x256 * 256x768, 2048x768 *
/// 768x256, 2048x256 * 256x256, and 2048x256 * (256x256)^T (which is also the
/// shape of the logits product, so it is measured once). Both libraries use
/// every rayon thread. `quick` uses fewer repetitions.
pub fn bench_matmul(quick: bool) -> Vec<GemmRow> {
    let square = [256, 512, 1024, 2048].map(|s| Shape {
        m: s,
        n: s,
        k: s,
        b_transposed: false,
    });
    let demo = [
        Shape {
            m: 2048,
            n: 768,
            k: 256,
            b_transposed: false,
        },
        Shape {
            m: 2048,
            n: 256,
            k: 768,
            b_transposed: false,
        },
        Shape {
            m: 2048,
            n: 256,
            k: 256,
            b_transposed: false,
        },
        Shape {
            m: 2048,
            n: 256,
            k: 256,
            b_transposed: true,
        },
    ];
    square
        .iter()
        .chain(&demo)
        .map(|shape| bench_shape(shape, quick))
        .collect()
}

fn bench_shape(shape: &Shape, quick: bool) -> GemmRow {
    let Shape {
        m,
        n,
        k,
        b_transposed,
    } = *shape;
    let a = filled(m * k, 1);
    let b = filled(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    // Element (p, j) of B is at p * b_rs + j * b_cs.
    let (b_rs, b_cs) = if b_transposed { (1, k) } else { (n, 1) };
    let flops = 2.0 * (m * n * k) as f64;

    let run_trit = |c: &mut [f32]| {
        let a = MatRef {
            data: &a,
            rs: k,
            cs: 1,
        };
        let b = MatRef {
            data: &b,
            rs: b_rs,
            cs: b_cs,
        };
        sgemm(m, n, k, a, b, c, false);
    };
    let run_peer = |c: &mut [f32]| {
        assert!(c.len() >= m * n);
        // SAFETY: `c` is m x n with row stride n (checked above), `a` is
        // m x k with row stride k, and `b` holds k x n elements at strides
        // (b_rs, b_cs): every index the call forms is inside its buffer, and
        // `c` does not overlap the inputs.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                b_cs as isize,
                b_rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(0),
            )
        }
    };

    // Aim for about 0.5 s (quick: 0.1 s) per library at ~100 GFLOP/s, within
    // fixed bounds on the repetition count.
    let budget = if quick { 1e10 } else { 5e10 };
    let reps = ((budget / flops) as usize).clamp(if quick { 3 } else { 7 }, 200);
    let warmup = if quick { 1 } else { 3 };
    let mut trit_times = Vec::with_capacity(reps);
    let mut peer_times = Vec::with_capacity(reps);
    for rep in 0..warmup + reps {
        // Alternate the libraries so that both see the same machine state
        // (frequency, other load) over the run.
        let trit_s = time(|| run_trit(&mut c));
        let peer_s = time(|| run_peer(&mut c));
        if rep >= warmup {
            trit_times.push(trit_s);
            peer_times.push(peer_s);
        }
    }
    GemmRow {
        m,
        n,
        k,
        trit_gflops: flops / median(trit_times) / 1e9,
        peer_gflops: flops / median(peer_times) / 1e9,
    }
}

/// Wall-clock seconds taken by `f`.
fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Deterministic values in [-1, 1) so that no run hits denormals or zeros.
pub(crate) fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let x = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                >> 8;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}
