//! Packed low-bit GEMV and GEMM against trit's own f32 matmul (the peer) on the same shapes, in the same
//! run: x[m,4096]·W[11008,4096]ᵀ for m = 1 (decode) and m = 64.
//!
//! Throughput is reported as `Bytes(weight bytes)`, so criterion's "GiB/s" reads as weight bandwidth.
//! Weights rotate through enough copies to exceed the last-level cache, so each call streams its weights
//! from memory as decoding a real model does.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use trit::cpu::matmul::{sgemm, MatRef};
use trit::cpu::qmatmul::{qmatmul, ActMode, QIsa};
use trit::quant::{Group, QFormat, QTensor};

const N: usize = 11008;
const K: usize = 4096;
/// Bytes cycled through per kernel: twice the 260 MiB L3 of the development machine.
const ROTATE_BYTES: usize = 520 << 20;

fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let v = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503))
                >> 8;
            (v % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn copies(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes).clamp(1, 64)
}

fn bench(c: &mut Criterion) {
    let w = filled(N * K, 7);
    let formats: [(&str, QFormat, ActMode); 5] = [
        ("int8", QFormat::Int8 { group: Group::Row }, ActMode::Int8),
        (
            "int4_g32",
            QFormat::Int4 {
                group: Group::Size(32),
                asym: false,
            },
            ActMode::Int8,
        ),
        (
            "ternary2",
            QFormat::Ternary2 { group: Group::Row },
            ActMode::Int8,
        ),
        (
            "binary_int8",
            QFormat::Binary { offset: false },
            ActMode::Int8,
        ),
        (
            "binary_xnor",
            QFormat::Binary { offset: false },
            ActMode::Binary,
        ),
    ];
    let packed: Vec<Vec<QTensor>> = formats
        .iter()
        .map(|&(_, f, _)| {
            let q = QTensor::quantize(&w, N, K, f).expect("valid format");
            (0..copies(q.byte_size())).map(|_| q.clone()).collect()
        })
        .collect();
    let f32_copies: Vec<Vec<f32>> = (0..copies(N * K * 4)).map(|_| w.clone()).collect();
    drop(w);

    for m in [1usize, 64] {
        let x = filled(m * K, 3);
        let mut y = vec![0f32; m * N];
        let mut group = c.benchmark_group(format!("qmatmul_m{m}_{N}x{K}"));
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        group.throughput(Throughput::Bytes((N * K * 4) as u64));
        let mut i = 0;
        group.bench_function("f32", |b| {
            b.iter(|| {
                i = (i + 1) % f32_copies.len();
                let a = MatRef {
                    data: &x,
                    rs: K,
                    cs: 1,
                };
                let w = MatRef {
                    data: &f32_copies[i],
                    rs: 1,
                    cs: K,
                };
                sgemm(m, N, K, a, w, black_box(&mut y), false);
            })
        });
        for ((name, _, act), qs) in formats.iter().zip(&packed) {
            group.throughput(Throughput::Bytes(qs[0].byte_size() as u64));
            let mut i = 0;
            group.bench_with_input(BenchmarkId::from_parameter(name), act, |b, &act| {
                b.iter(|| {
                    i = (i + 1) % qs.len();
                    qmatmul(&qs[i].packed(), &x, m, act, black_box(&mut y), QIsa::best());
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
