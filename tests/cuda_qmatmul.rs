//! The packed low-bit CUDA kernels (cuda/qgemv.cu, cuda/qgemm.cu) against their oracle, the CPU's packed
//! kernels with f32 activations (themselves held to a naive f64 product in tests/qmatmul_lowbit.rs and
//! tests/qmatmul_int.rs): every format and group size, f32/f16/bf16 activations, random shapes with K
//! not a multiple of the block, N not a multiple of any tile and M from 1 to several GEMM tiles, fresh
//! random weights and inputs in every case, and outputs poisoned (NaN) before each launch so an
//! unwritten element fails. Also the activation forms of `ActMode`, frozen `QuantLinear` layers, and
//! the errors a bad input gets.
//!
//! Every test needs a GPU and is ignored by default:
//! `cargo test --release -p trit --features cuda --test cuda_qmatmul -- --ignored`.
//!
//! Results are compared by ‖gpu − cpu‖ / ‖cpu‖ in f64 over the output. The GEMV computes in f32 from
//! exactly dequantized weights: 1e-5 for f32, plus the output's rounding for f16 (2e-3) and bf16 (1e-2).
//! The GEMM feeds the tensor cores bf16 operands (f16 for f16 inputs), so each weight and activation is
//! rounded once more: 1e-2 for f32 and bf16, 3e-3 for f16.

#![cfg(feature = "cuda")]

mod common;

use common::{config, DataRng, CPU};
use proptest::prelude::*;
use proptest::sample::select;
use std::sync::{Mutex, MutexGuard};
use trit::cpu::qmatmul::ActMode;
use trit::cuda::qmatmul::{CudaQWeights, GEMV_MAX_M};
use trit::cuda::{qgemm, qgemv, CudaDevice, CudaStorage};
use trit::nn::{ParamStore, QuantLinear, QuantLinearConfig};
use trit::quant::{Group, QFormat, QTensor};
use trit::{DType, Device, Error, Tensor};

const GPU: Device = Device::Cuda(0);

/// Every format and group size the packed kernels take.
const FORMATS: [QFormat; 20] = [
    QFormat::Ternary2 {
        group: Group::Size(32),
    },
    QFormat::Ternary2 {
        group: Group::Size(64),
    },
    QFormat::Ternary2 {
        group: Group::Size(128),
    },
    QFormat::Ternary2 {
        group: Group::Size(256),
    },
    QFormat::Ternary2 { group: Group::Row },
    QFormat::Ternary3 {
        group: Group::Size(256),
    },
    QFormat::Ternary3 {
        group: Group::Size(512),
    },
    QFormat::Ternary3 { group: Group::Row },
    QFormat::Binary { offset: false },
    QFormat::Binary { offset: true },
    QFormat::Int4 {
        group: Group::Size(32),
        asym: false,
    },
    QFormat::Int4 {
        group: Group::Size(64),
        asym: false,
    },
    QFormat::Int4 {
        group: Group::Size(128),
        asym: false,
    },
    QFormat::Int4 {
        group: Group::Row,
        asym: false,
    },
    QFormat::Int4 {
        group: Group::Size(32),
        asym: true,
    },
    QFormat::Int4 {
        group: Group::Row,
        asym: true,
    },
    QFormat::Int8 {
        group: Group::Size(32),
    },
    QFormat::Int8 {
        group: Group::Size(64),
    },
    QFormat::Int8 {
        group: Group::Size(128),
    },
    QFormat::Int8 { group: Group::Row },
];

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// K around every block width (64, 128, 256 weights), below one block and past several, and odd.
const KS: [usize; 10] = [1, 31, 64, 100, 255, 256, 257, 600, 1000, 2304];
/// N around warp, row-per-block and tile widths.
const NS: [usize; 8] = [1, 7, 31, 64, 65, 130, 257, 1000];

/// The tests share one device and the process-wide poison switch.
static DEVICE: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    let guard = DEVICE.lock().unwrap_or_else(|e| e.into_inner());
    trit::cuda::set_poison(true);
    guard
}

fn device() -> std::sync::Arc<CudaDevice> {
    CudaDevice::get(0).expect("these tests need cuda:0")
}

/// Random weights [n, k] quantized into `format`: normal values with a few large ones, so scales differ
/// between groups and rows.
fn weights(format: QFormat, n: usize, k: usize, rng: &mut DataRng) -> QTensor {
    let w: Vec<f32> = (0..n * k)
        .map(|_| {
            let v = rng.normal() * 0.05;
            (if rng.below(64) == 0 { v * 8.0 } else { v }) as f32
        })
        .collect();
    QTensor::quantize(&w, n, k, format).expect("a valid format and shape")
}

/// Activations [m, k] in `dtype` on the CPU (values already rounded to it) and the same on the GPU.
fn inputs(m: usize, k: usize, dtype: DType, rng: &mut DataRng) -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let cpu = Tensor::from_vec(x, (m, k), CPU)
        .and_then(|t| t.to_dtype(dtype))
        .expect("inputs");
    let gpu = cpu.to_device(GPU).expect("upload");
    (cpu, gpu)
}

fn host(t: &Tensor) -> Vec<f32> {
    t.try_to_vec_f32()
        .unwrap_or_else(|e| panic!("reading back {t:?}: {e}"))
}

/// ‖got − want‖ / ‖want‖ (absolute when want is all zeros); a NaN anywhere makes it NaN.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "element counts differ");
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&a, &b) in got.iter().zip(want) {
        norm += f64::from(b).powi(2);
        diff += (f64::from(a) - f64::from(b)).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The oracle: the CPU's packed kernels on the same (rounded) activations, in f32.
fn oracle(q: &QTensor, x_cpu: &Tensor) -> Vec<f32> {
    let x = x_cpu.to_dtype(DType::F32).expect("widen");
    host(&q.matmul(&x, ActMode::F32).expect("CPU packed matmul"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Gemv,
    Gemm,
}

fn tolerance(path: Path, dtype: DType) -> f64 {
    match (path, dtype) {
        (Path::Gemv, DType::F32) => 1e-5,
        (Path::Gemv, DType::F16) => 2e-3,
        (Path::Gemv, _) => 1e-2,
        (Path::Gemm, DType::F16) => 3e-3,
        (Path::Gemm, _) => 1e-2,
    }
}

/// Runs one kernel path directly on the device storage of `x_gpu` ([m, k], contiguous).
fn run_path(path: Path, w: &CudaQWeights, x_gpu: &Tensor, m: usize) -> Vec<f32> {
    let y = x_gpu
        .with_cuda_storage(|s: &CudaStorage| match path {
            Path::Gemv => qgemv::gemv(w, s, m),
            Path::Gemm => qgemm::gemm(w, s, m),
        })
        .expect("a CUDA tensor")
        .unwrap_or_else(|e| panic!("{path:?} failed: {e}"));
    assert_eq!(y.dtype(), x_gpu.dtype(), "{path:?} output dtype");
    assert_eq!(y.len(), m * w.rows(), "{path:?} output length");
    let t = Tensor::from_cuda_storage(y, (m, w.rows())).expect("wrap");
    host(&t)
}

/// One case: `format` [n, k] against m tokens of `dtype` on `path`.
fn check_case(path: Path, format: QFormat, n: usize, k: usize, m: usize, dtype: DType, seed: u64) {
    let mut rng = DataRng::new(seed);
    let q = weights(format, n, k, &mut rng);
    let (x_cpu, x_gpu) = inputs(m, k, dtype, &mut rng);
    let want = oracle(&q, &x_cpu);
    let w = CudaQWeights::upload(&device(), &q).expect("upload");
    let got = run_path(path, &w, &x_gpu, m);
    let err = rel_err(&got, &want);
    let tol = tolerance(path, dtype);
    assert!(
        err <= tol,
        "{path:?} {format:?} x[{m}, {k}] {dtype} · W[{n}, {k}]ᵀ: relative error {err:e} > {tol:e} \
         (first outputs {:?} vs {:?})",
        &got[..got.len().min(4)],
        &want[..want.len().min(4)]
    );
}

proptest! {
    #![proptest_config(config(24))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gemv_matches_the_cpu_kernels(
        format in select(FORMATS.to_vec()),
        n in select(NS.to_vec()),
        k in select(KS.to_vec()),
        m in 1..=GEMV_MAX_M,
        dtype in select(FLOATS.to_vec()),
        seed in any::<u64>(),
    ) {
        let _gpu = lock();
        check_case(Path::Gemv, format, n, k, m, dtype, seed);
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn gemm_matches_the_cpu_kernels(
        format in select(FORMATS.to_vec()),
        n in select(NS.to_vec()),
        k in select(KS.to_vec()),
        m in prop_oneof![1usize..=20, select(vec![31usize, 64, 100, 129, 300])],
        dtype in select(FLOATS.to_vec()),
        seed in any::<u64>(),
    ) {
        let _gpu = lock();
        check_case(Path::Gemm, format, n, k, m, dtype, seed);
    }
}

/// Every format and dtype once on each path at one ragged shape, so no combination is left to chance.
#[test]
#[ignore = "needs a CUDA device"]
fn every_format_and_dtype_on_both_paths() {
    let _gpu = lock();
    for (i, &format) in FORMATS.iter().enumerate() {
        for &dtype in &FLOATS {
            check_case(Path::Gemv, format, 97, 1000, 3, dtype, i as u64);
            check_case(Path::Gemm, format, 97, 1000, 37, dtype, i as u64);
        }
    }
}

/// Decode-sized and prefill-sized shapes of real layers (SmolLM2's 576 → 1536, a 4096 → 11008 MLP) where
/// split-K and several weight tiles come in.
#[test]
#[ignore = "needs a CUDA device"]
fn model_sized_layers() {
    let _gpu = lock();
    let formats = [
        QFormat::Ternary2 { group: Group::Row },
        QFormat::Binary { offset: false },
        QFormat::Int4 {
            group: Group::Size(32),
            asym: true,
        },
        QFormat::Int8 {
            group: Group::Size(32),
        },
    ];
    for format in formats {
        for (n, k) in [(1536, 576), (576, 1536), (11008, 4096)] {
            check_case(Path::Gemv, format, n, k, 1, DType::BF16, 7);
            check_case(Path::Gemv, format, n, k, 8, DType::F32, 8);
            check_case(Path::Gemm, format, n, k, 128, DType::BF16, 9);
        }
    }
}

/// `QTensor::matmul` on GPU activations, any leading dims, each activation form, against the CPU's.
#[test]
#[ignore = "needs a CUDA device"]
fn qtensor_matmul_on_the_gpu_matches_the_cpu_in_every_act_mode() {
    let _gpu = lock();
    let mut rng = DataRng::new(11);
    let int4 = QFormat::Int4 {
        group: Group::Size(32),
        asym: false,
    };
    let cases = [
        (QFormat::Ternary2 { group: Group::Row }, ActMode::F32),
        (QFormat::Ternary2 { group: Group::Row }, ActMode::Int8),
        (QFormat::Binary { offset: true }, ActMode::Binary),
        (int4, ActMode::Int8Blocks),
        (
            QFormat::Int8 {
                group: Group::Size(32),
            },
            ActMode::Int8Blocks,
        ),
    ];
    for (format, act) in cases {
        for (lead, k) in [(vec![1], 300), (vec![2, 3], 256), (vec![4, 9], 100)] {
            let q = weights(format, 70, k, &mut rng);
            let m: usize = lead.iter().product();
            let (x_cpu, _) = inputs(m, k, DType::F32, &mut rng);
            let x_cpu = x_cpu.reshape([&lead[..], &[k]].concat()).unwrap();
            let want = q.matmul(&x_cpu, act).unwrap();
            let got = q.matmul(&x_cpu.to_device(GPU).unwrap(), act).unwrap();
            assert_eq!(got.device(), GPU);
            assert_eq!(got.dims(), want.dims());
            let err = rel_err(&host(&got), &host(&want));
            // The GEMM rounds operands to bf16; the GEMV is f32 throughout.
            let tol = if m > GEMV_MAX_M { 1e-2 } else { 1e-4 };
            assert!(err <= tol, "{format:?} {act:?} {lead:?}: {err:e}");
        }
    }
    // The weights were uploaded once, on first use.
    let q = weights(int4, 64, 128, &mut rng);
    assert_eq!(q.device_bytes(), 0);
    q.prepare_device(GPU).unwrap();
    let bytes = q.device_bytes();
    assert_eq!(bytes, q.data().len() + 4 * q.scales().len());
    let x = Tensor::ones((1, 128), DType::F32, GPU).unwrap();
    q.matmul(&x, ActMode::F32).unwrap();
    assert_eq!(q.device_bytes(), bytes, "a second upload");
}

/// A frozen QuantLinear on the GPU computes what it computes on the CPU.
#[test]
#[ignore = "needs a CUDA device"]
fn frozen_quant_linear_on_the_gpu() {
    let _gpu = lock();
    let mut rng = DataRng::new(5);
    for cfg in [
        QuantLinearConfig::llm_qat(4, None),
        QuantLinearConfig::llm_qat(4, Some(8)),
    ] {
        let ps = ParamStore::new(3, DType::F32, CPU);
        let mut layer = QuantLinear::new(&ps, 96, 40, cfg).unwrap();
        layer.freeze().unwrap();
        let (x_cpu, x_gpu) = inputs(5, 96, DType::F32, &mut rng);
        let _no_grad = trit::no_grad();
        let want = layer.forward(&x_cpu).unwrap();
        let got = layer.forward(&x_gpu).unwrap();
        assert_eq!(got.device(), GPU);
        let err = rel_err(&host(&got), &host(&want));
        assert!(err <= 1e-4, "{cfg:?}: {err:e}");
    }
}

/// Bad inputs are errors, never panics: a wrong width, an integer dtype, m out of the GEMV's range, binary
/// activations against non-binary weights.
#[test]
#[ignore = "needs a CUDA device"]
fn bad_inputs_are_errors() {
    let _gpu = lock();
    let mut rng = DataRng::new(3);
    let q = weights(QFormat::Ternary2 { group: Group::Row }, 16, 64, &mut rng);
    let w = CudaQWeights::upload(&device(), &q).unwrap();
    let wrong = Tensor::ones((2, 63), DType::F32, GPU).unwrap();
    assert!(matches!(
        q.matmul(&wrong, ActMode::F32),
        Err(Error::ShapeMismatch { .. })
    ));
    let ints = Tensor::ones((2, 64), DType::I32, GPU).unwrap();
    assert!(q.matmul(&ints, ActMode::F32).is_err());
    let x = Tensor::ones((GEMV_MAX_M + 1, 64), DType::F32, GPU).unwrap();
    let too_many = x.with_cuda_storage(|s| qgemv::gemv(&w, s, GEMV_MAX_M + 1));
    assert!(matches!(too_many, Some(Err(_))));
    let wrong_len = x.with_cuda_storage(|s| qgemm::gemm(&w, s, 3));
    assert!(matches!(wrong_len, Some(Err(Error::ShapeMismatch { .. }))));
    let x = Tensor::ones((1, 64), DType::F32, GPU).unwrap();
    assert!(q.matmul(&x, ActMode::Binary).is_err());
    // m = 0 is an empty product, not a launch.
    let empty = Tensor::zeros((0, 64), DType::F32, GPU).unwrap();
    assert_eq!(q.matmul(&empty, ActMode::F32).unwrap().dims(), &[0, 16]);
}
