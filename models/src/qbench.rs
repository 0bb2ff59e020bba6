//! Packed low-bit matmul against trit's own f32 matmul on the same shapes, in the same run, for
//! `trit bench qmatmul`: the decode GEMV of a 7B-class MLP (x[1,4096]·W[11008,4096]ᵀ), a square
//! projection (x[1,4096]·W[4096,4096]ᵀ) and a 64-token GEMM, plus the machine's memory-copy bandwidth
//! measured alongside so the weight GB/s column has its ceiling next to it.
//!
//! Weights are rotated through enough copies to exceed the last-level cache several times over, so every
//! call streams its weights from memory as decoding a real model does (260 MiB of L3 here would otherwise
//! hold a 2-bit 11008×4096 matrix and flatter it).

use std::time::Instant;

use crate::bench::filled;
use rayon::prelude::*;
use trit::cpu::matmul::{sgemm, MatRef};
use trit::cpu::qmatmul::{qmatmul, ActMode, QIsa};
use trit::quant::{Group, QFormat, QTensor};

/// Bytes of weights cycled through per measured kernel: twice the 260 MiB L3 of the development machine.
const ROTATE_BYTES: usize = 520 << 20;

/// One measured kernel.
pub struct QRow {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// "f32", or the packed format and activation form.
    pub kernel: String,
    pub micros: f64,
    /// Bytes of one weight matrix (packed data, scales, mins).
    pub weight_bytes: usize,
    /// Weight bytes per second.
    pub weight_gbs: f64,
    /// f32 time / this time, same shape.
    pub speedup: f64,
}

pub struct QBench {
    pub threads: usize,
    pub isa: QIsa,
    /// Read + write GB/s of a 256 MiB copy, in the same run.
    pub copy_gbs: f64,
    pub rows: Vec<QRow>,
}

/// The packed kernels measured at every shape: (label, format, activation form).
fn kernels() -> Vec<(&'static str, QFormat, ActMode)> {
    vec![
        (
            "int8 x int8",
            QFormat::Int8 { group: Group::Row },
            ActMode::Int8,
        ),
        (
            "int4 g32 x int8",
            QFormat::Int4 {
                group: Group::Size(32),
                asym: false,
            },
            ActMode::Int8,
        ),
        (
            "int4 g128 x int8",
            QFormat::Int4 {
                group: Group::Size(128),
                asym: false,
            },
            ActMode::Int8,
        ),
        (
            "int4 g32 asym x f32",
            QFormat::Int4 {
                group: Group::Size(32),
                asym: true,
            },
            ActMode::F32,
        ),
        (
            "ternary 2-bit x int8",
            QFormat::Ternary2 { group: Group::Row },
            ActMode::Int8,
        ),
        (
            "ternary 2-bit g64 x int8",
            QFormat::Ternary2 {
                group: Group::Size(64),
            },
            ActMode::Int8,
        ),
        (
            "ternary 2-bit x f32",
            QFormat::Ternary2 { group: Group::Row },
            ActMode::F32,
        ),
        (
            "ternary base-3 x int8",
            QFormat::Ternary3 { group: Group::Row },
            ActMode::Int8,
        ),
        (
            "binary x int8",
            QFormat::Binary { offset: false },
            ActMode::Int8,
        ),
        (
            "binary x binary",
            QFormat::Binary { offset: false },
            ActMode::Binary,
        ),
    ]
}

/// Runs the benchmark; `quick` measures fewer repetitions over a smaller rotation (for CI).
pub fn bench_qmatmul(quick: bool) -> trit::Result<QBench> {
    let shapes = [(1, 11008, 4096), (1, 4096, 4096), (64, 11008, 4096)];
    let copy_gbs = copy_bandwidth(quick);
    let mut rows = Vec::new();
    for (m, n, k) in shapes {
        let w = filled(n * k, 7);
        let x = filled(m * k, 3);
        let mut y = vec![0f32; m * n];
        let rotate = |bytes: usize| {
            let budget = if quick {
                ROTATE_BYTES / 4
            } else {
                ROTATE_BYTES
            };
            budget.div_ceil(bytes.max(1)).clamp(1, 64)
        };
        let reps = if quick { 3 } else { 15 };

        let f32_copies: Vec<Vec<f32>> = (0..rotate(w.len() * 4)).map(|_| w.clone()).collect();
        let f32_s = time_rotating(reps, f32_copies.len(), |i| {
            let a = MatRef {
                data: &x,
                rs: k,
                cs: 1,
            };
            let b = MatRef {
                data: &f32_copies[i],
                rs: 1,
                cs: k,
            };
            sgemm(m, n, k, a, b, &mut y, false);
        });
        drop(f32_copies);
        rows.push(row(m, n, k, "f32".into(), f32_s, n * k * 4, f32_s));

        for (label, format, act) in kernels() {
            let q = QTensor::quantize(&w, n, k, format)?;
            let copies: Vec<QTensor> = (0..rotate(q.byte_size())).map(|_| q.clone()).collect();
            let isa = QIsa::best();
            let s = time_rotating(reps, copies.len(), |i| {
                qmatmul(&copies[i].packed(), &x, m, act, &mut y, isa)
            });
            rows.push(row(m, n, k, label.into(), s, q.byte_size(), f32_s));
        }
    }
    Ok(QBench {
        threads: rayon::current_num_threads(),
        isa: QIsa::best(),
        copy_gbs,
        rows,
    })
}

fn row(m: usize, n: usize, k: usize, kernel: String, s: f64, bytes: usize, f32_s: f64) -> QRow {
    QRow {
        m,
        n,
        k,
        kernel,
        micros: s * 1e6,
        weight_bytes: bytes,
        weight_gbs: bytes as f64 / s / 1e9,
        speedup: f32_s / s,
    }
}

/// Median seconds of `f(i)` over `reps` calls after one warm-up pass, cycling `i` through `copies`.
fn time_rotating(reps: usize, copies: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..copies {
        f(i);
    }
    let mut times: Vec<f64> = (0..reps.max(copies))
        .map(|r| {
            let start = Instant::now();
            f(r % copies);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Read + write GB/s of copying 256 MiB with every rayon thread.
fn copy_bandwidth(quick: bool) -> f64 {
    let len = (256 << 20) / 4;
    let src = filled(len, 1);
    let mut dst = vec![0f32; len];
    let copy = |dst: &mut [f32]| {
        dst.par_chunks_mut(1 << 16)
            .zip(src.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
    };
    let s = time_rotating(if quick { 3 } else { 9 }, 1, |_| copy(&mut dst));
    2.0 * (len * 4) as f64 / s / 1e9
}
