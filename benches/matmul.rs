//! trit's SGEMM against the `gemm` crate (the peer) on the same inputs, in the
//! same run: square sizes and the matrix products of the demo model.
//!
//! Throughput is reported as `Elements(2 * m * n * k)`, i.e. floating-point
//! operations, so criterion's "Gelem/s" reads as GFLOP/s.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gemm::Parallelism;
use trit::cpu::matmul::{sgemm, MatRef};

/// One product `C[m x n] = A[m x k] * B[k x n]`; A and C are row-major, B is
/// row-major or, if `b_transposed`, stored as its row-major `n x k` transpose
/// (a weight matrix used as `x * W^T`).
struct Shape {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
}

/// Demo model products over a batch of 8 x 256 = 2048 tokens, model width
/// 256, MLP width 768, vocabulary 256.
const DEMO_SHAPES: [Shape; 5] = [
    Shape {
        name: "mlp_up_2048x256_256x768",
        m: 2048,
        n: 768,
        k: 256,
        b_transposed: false,
    },
    Shape {
        name: "mlp_down_2048x768_768x256",
        m: 2048,
        n: 256,
        k: 768,
        b_transposed: false,
    },
    Shape {
        name: "proj_2048x256_256x256",
        m: 2048,
        n: 256,
        k: 256,
        b_transposed: false,
    },
    Shape {
        name: "proj_2048x256_256x256t",
        m: 2048,
        n: 256,
        k: 256,
        b_transposed: true,
    },
    Shape {
        name: "logits_2048x256_256x256t",
        m: 2048,
        n: 256,
        k: 256,
        b_transposed: true,
    },
];

/// Deterministic values in [-1, 1) so that no run hits denormals or zeros.
fn filled(len: usize, seed: u32) -> Vec<f32> {
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

fn bench_shape(c: &mut Criterion, shape: &Shape) {
    let Shape {
        m,
        n,
        k,
        b_transposed,
        ..
    } = *shape;
    let a = filled(m * k, 1);
    let b = filled(k * n, 2);
    let mut out = vec![0.0f32; m * n];
    // Element (p, j) of B is at p * b_rs + j * b_cs.
    let (b_rs, b_cs) = if b_transposed { (1, k) } else { (n, 1) };

    let mut group = c.benchmark_group(format!("sgemm_{}", shape.name));
    group.throughput(Throughput::Elements(2 * (m * n * k) as u64));
    if m * n * k >= 512 * 512 * 512 {
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(5));
    }
    group.bench_function("trit", |bench| {
        bench.iter(|| {
            let a = MatRef {
                data: black_box(&a),
                rs: k,
                cs: 1,
            };
            let b = MatRef {
                data: black_box(&b),
                rs: b_rs,
                cs: b_cs,
            };
            sgemm(m, n, k, a, b, &mut out, false);
        })
    });
    group.bench_function("gemm", |bench| {
        bench.iter(|| {
            // SAFETY: `out` is m x n with row stride n, `a` is m x k with row
            // stride k, and `b` holds k x n elements at strides (b_rs, b_cs):
            // every index the call forms is inside its buffer, and `out` does
            // not overlap the inputs.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    black_box(&a).as_ptr(),
                    1,
                    k as isize,
                    black_box(&b).as_ptr(),
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
        })
    });
    group.finish();
}

fn square(c: &mut Criterion) {
    for (name, size) in [
        ("square_256", 256),
        ("square_512", 512),
        ("square_1024", 1024),
        ("square_2048", 2048),
    ] {
        bench_shape(
            c,
            &Shape {
                name,
                m: size,
                n: size,
                k: size,
                b_transposed: false,
            },
        );
    }
}

fn demo(c: &mut Criterion) {
    for shape in &DEMO_SHAPES {
        bench_shape(c, shape);
    }
}

criterion_group!(benches, square, demo);
criterion_main!(benches);
