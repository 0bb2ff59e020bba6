//! `trit bench gpu`: the CUDA backend's throughput on one GPU, every ceiling measured in the same run.
//!
//! - The device-to-device copy rate of 64M f32 (256 MiB, `cuMemcpy`), counting bytes read and written:
//!   the ceiling of every memory-bound kernel.
//! - trit's memory-bound kernels at 64M f32 elements through the public `Tensor` API (exp, add, the
//!   contiguous copy of a transposed [8192, 8192] view, softmax and rms_norm over rows of 4096, a sum
//!   over rows, one AdamW step), as GB/s of the bytes they must move and as a fraction of the copy rate;
//!   elementwise, softmax and norm kernels aim at 80% of it.
//! - GEMM TFLOP/s at 8192³ through `Tensor::matmul` (cuBLAS) in bf16, f16, f32 with TF32 and exact f32,
//!   bf16 against the 715 TFLOP/s cuBLAS anchor of anchors.md (target 95%).
//! - Training tokens/s of the demo shape on the GPU in bf16 and f32 against PyTorch's H200 figure.
//!
//! Timing follows /work/.library/device/METHOD.md: device events around each call, warm-up calls first,
//! the median of the timed repetitions. Inputs are random (zeros can run faster than real data).

use crate::demo::{bench_train, thousands, TrainBench};
use rayon::prelude::*;
use serde_json::{json, Value};
use trit::cuda::matmul::set_tf32;
use trit::cuda::{CudaDevice, CudaStorage};
use trit::optim::{AdamW, AdamWConfig, Optimizer};
use trit::{DType, Device, GradStore, Result, Tensor};

/// cuBLAS bf16 GEMM at 8192³ on an H100 (anchors.md, PyTorch 2.11, CUDA 13.0).
pub const ANCHOR_BF16_GEMM_TFLOPS: f64 = 715.0;
/// The fraction of the copy rate that elementwise, softmax and norm kernels aim at.
pub const BANDWIDTH_TARGET: f64 = 0.8;
/// The fraction of the GEMM anchor that bf16 `Tensor::matmul` aims at.
pub const GEMM_TARGET: f64 = 0.95;

/// The rows of the softmax, rms_norm and sum kernels are this long.
const ROW: usize = 4096;

/// One memory-bound kernel.
#[derive(Clone, Debug)]
pub struct KernelRow {
    pub name: &'static str,
    /// Bytes the kernel must move: each input read once, each output written once.
    pub bytes: f64,
    pub ms: f64,
    pub gbs: f64,
    /// GB/s over the copy's GB/s.
    pub of_copy: f64,
    /// The fraction of the copy rate this kernel aims at, where it has one.
    pub target: Option<f64>,
}

/// One GEMM dtype at n³.
#[derive(Clone, Debug)]
pub struct GemmRow {
    pub dtype: &'static str,
    pub ms: f64,
    pub tflops: f64,
    /// TFLOP/s over the bf16 anchor (bf16 only: the anchor is a bf16 figure).
    pub of_anchor: Option<f64>,
}

/// Everything `trit bench gpu` measured.
pub struct GpuBench {
    pub device: String,
    pub quick: bool,
    pub warmup: usize,
    pub reps: usize,
    /// f32 elements of every memory-bound kernel and of the copy.
    pub elements: usize,
    pub copy_ms: f64,
    pub copy_gbs: f64,
    pub kernels: Vec<KernelRow>,
    /// The GEMMs are n × n × n.
    pub gemm_n: usize,
    pub gemm: Vec<GemmRow>,
    pub train: Vec<TrainBench>,
}

/// Sizes and repetitions of a run.
struct Plan {
    /// Side of the square transposed copy; the memory-bound kernels run on side² elements.
    side: usize,
    gemm_n: usize,
    warmup: usize,
    reps: usize,
    gemm_reps: usize,
    train_steps: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                side: 4096,
                gemm_n: 4096,
                warmup: 1,
                reps: 5,
                gemm_reps: 3,
                train_steps: 3,
            }
        } else {
            Plan {
                side: 8192,
                gemm_n: 8192,
                warmup: 3,
                reps: 20,
                gemm_reps: 10,
                train_steps: 10,
            }
        }
    }
}

/// A uniform value in [-1, 1) from the splitmix64 hash of (seed, i): random data made on all cores
/// (a 64M-element tensor in tens of milliseconds, where a sequential generator takes seconds).
pub(crate) fn unit(seed: u64, i: usize) -> f32 {
    let mut z = seed
        .wrapping_mul(0xd134_2543_de82_ef95)
        .wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Random f32 values of `shape` on `device`.
pub(crate) fn random(shape: &[usize], seed: u64, device: Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).into_par_iter().map(|i| unit(seed, i)).collect();
    Tensor::from_vec(v, shape.to_vec(), device)
}

/// The median device time of `f` in milliseconds.
pub(crate) fn median_ms(
    dev: &CudaDevice,
    warmup: usize,
    reps: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut t = dev.time_ms(warmup, reps.max(1), f)?;
    t.sort_by(f32::total_cmp);
    Ok(t[t.len() / 2] as f64)
}

/// TF32 matmuls while alive; exact f32 again afterwards, also on an early return.
struct Tf32(bool);

impl Tf32 {
    fn set(on: bool) -> Tf32 {
        set_tf32(on);
        Tf32(on)
    }
}

impl Drop for Tf32 {
    fn drop(&mut self) {
        if self.0 {
            set_tf32(false);
        }
    }
}

/// GB/s of `bytes` moved in `ms`.
pub(crate) fn gbs(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Runs the benchmark on `cuda:0`; `quick` shrinks sizes and repetitions (about 30 s in all). A machine
/// without a GPU is an [`trit::Error::NoCudaDevice`].
pub fn bench_gpu(quick: bool) -> Result<GpuBench> {
    let dev = CudaDevice::get(0)?;
    let gpu = Device::Cuda(0);
    let plan = Plan::new(quick);
    let (w, r) = (plan.warmup, plan.reps);
    let n = plan.side * plan.side;
    let f32_bytes = 4.0 * n as f64;

    let copy_ms = {
        let src = CudaStorage::uninit(&dev, DType::F32, n)?;
        let mut dst = CudaStorage::uninit(&dev, DType::F32, n)?;
        median_ms(&dev, w, r, || dst.copy_from(0, &src, 0, n))?
    };
    let copy_gbs = gbs(2.0 * f32_bytes, copy_ms);

    let mut kernels = Vec::new();
    let mut row = |name, bytes: f64, target, ms: f64| {
        let g = gbs(bytes, ms);
        kernels.push(KernelRow {
            name,
            bytes,
            ms,
            gbs: g,
            of_copy: g / copy_gbs,
            target,
        });
    };
    let goal = Some(BANDWIDTH_TARGET);
    {
        let x = random(&[n], 1, gpu)?;
        let y = random(&[n], 2, gpu)?;
        row(
            "exp (unary)",
            2.0 * f32_bytes,
            goal,
            median_ms(&dev, w, r, || x.exp().map(drop))?,
        );
        row(
            "add (binary)",
            3.0 * f32_bytes,
            goal,
            median_ms(&dev, w, r, || x.add(&y).map(drop))?,
        );
        let square = x.reshape((plan.side, plan.side))?;
        row(
            "transposed view .contiguous()",
            2.0 * f32_bytes,
            None,
            median_ms(&dev, w, r, || square.t()?.contiguous().map(drop))?,
        );
        let rows = x.reshape((n / ROW, ROW))?;
        row(
            "softmax, rows of 4096",
            2.0 * f32_bytes,
            goal,
            median_ms(&dev, w, r, || rows.softmax(1).map(drop))?,
        );
        let weight = random(&[ROW], 3, gpu)?;
        row(
            "rms_norm, rows of 4096",
            2.0 * f32_bytes,
            goal,
            median_ms(&dev, w, r, || rows.rms_norm(Some(&weight), 1e-6).map(drop))?,
        );
        row(
            "sum over rows of 4096",
            f32_bytes + 4.0 * (n / ROW) as f64,
            None,
            median_ms(&dev, w, r, || rows.sum(1).map(drop))?,
        );
    }
    {
        let p = random(&[n], 4, gpu)?.var()?;
        let mut grads = GradStore::new();
        grads.insert(&p, random(&[n], 5, gpu)?);
        let mut opt = AdamW::new(vec![("p".to_string(), p)], AdamWConfig::default())?;
        // p, m and v are read and written, the gradient read.
        row(
            "AdamW step (p, m, v, g)",
            7.0 * f32_bytes,
            None,
            median_ms(&dev, w, r, || opt.step(&grads))?,
        );
    }

    let g = plan.gemm_n;
    let flops = 2.0 * (g as f64).powi(3);
    let mut gemm = Vec::new();
    {
        let a = random(&[g, g], 6, gpu)?;
        let b = random(&[g, g], 7, gpu)?;
        for (name, dtype, tf32) in [
            ("bf16", DType::BF16, false),
            ("f16", DType::F16, false),
            ("f32 (tf32)", DType::F32, true),
            ("f32", DType::F32, false),
        ] {
            let (a, b) = (a.to_dtype(dtype)?, b.to_dtype(dtype)?);
            let _tf32 = Tf32::set(tf32);
            let ms = median_ms(&dev, w.min(2), plan.gemm_reps, || a.matmul(&b).map(drop))?;
            let tflops = flops / (ms * 1e-3) / 1e12;
            gemm.push(GemmRow {
                dtype: name,
                ms,
                tflops,
                of_anchor: (dtype == DType::BF16).then(|| tflops / ANCHOR_BF16_GEMM_TFLOPS),
            });
        }
    }

    let train = [DType::BF16, DType::F32]
        .into_iter()
        .map(|precision| bench_train(plan.train_steps, gpu, precision))
        .collect::<Result<Vec<_>>>()?;

    Ok(GpuBench {
        device: dev.props().name.clone(),
        quick,
        warmup: w,
        reps: r,
        elements: n,
        copy_ms,
        copy_gbs,
        kernels,
        gemm_n: g,
        gemm,
        train,
    })
}

impl GpuBench {
    pub fn to_json(&self) -> Value {
        json!({
            "device": self.device,
            "quick": self.quick,
            "timing": "device events; median of reps after warmup calls",
            "warmup": self.warmup,
            "reps": self.reps,
            "elements": self.elements,
            "copy": {
                "what": "device-to-device cuMemcpy, bytes read + written",
                "bytes": 8.0 * self.elements as f64,
                "ms": self.copy_ms,
                "gbs": self.copy_gbs,
            },
            "kernels": self.kernels.iter().map(|k| json!({
                "name": k.name,
                "bytes": k.bytes,
                "ms": k.ms,
                "gbs": k.gbs,
                "fraction_of_copy": k.of_copy,
                "target": k.target,
            })).collect::<Vec<_>>(),
            "gemm": {
                "n": self.gemm_n,
                "anchor_tflops": ANCHOR_BF16_GEMM_TFLOPS,
                "anchor": "cuBLAS bf16 8192³ on an H100 (anchors.md)",
                "target": GEMM_TARGET,
                "rows": self.gemm.iter().map(|g| json!({
                    "dtype": g.dtype,
                    "ms": g.ms,
                    "tflops": g.tflops,
                    "fraction_of_anchor": g.of_anchor,
                })).collect::<Vec<_>>(),
            },
            "train": self.train.iter().map(TrainBench::to_json).collect::<Vec<_>>(),
        })
    }

    /// The report printed by `trit bench gpu`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}: device-event timing, median of {} calls after {} warm-up calls, all in this run{}\n",
            self.device,
            self.reps,
            self.warmup,
            if self.quick { " (--quick sizes)" } else { "" }
        );
        s += &format!(
            "device-to-device copy of {} f32 ({} MiB): {:.3} ms, {} GB/s (read + write)\n\n",
            thousands(self.elements as u64),
            (self.elements * 4) >> 20,
            self.copy_ms,
            thousands(self.copy_gbs.round() as u64)
        );
        s += &format!(
            "{:<32} {:>9} {:>8} {:>8} {:>7}\n",
            format!("{} f32 elements", thousands(self.elements as u64)),
            "ms",
            "GB/s",
            "of copy",
            "target"
        );
        for k in &self.kernels {
            let target = k.target.map_or(String::new(), |t| format!("≥ {t:.2}"));
            s += &format!(
                "{:<32} {:>9.3} {:>8} {:>8.2} {:>7}\n",
                k.name,
                k.ms,
                thousands(k.gbs.round() as u64),
                k.of_copy,
                target
            );
        }
        s += &format!(
            "\n{:<36} {:>6} {:>9} {:>8}\n",
            format!("GEMM {}³ through Tensor::matmul", self.gemm_n),
            "ms",
            "TFLOP/s",
            format!("of {ANCHOR_BF16_GEMM_TFLOPS:.0}")
        );
        for g in &self.gemm {
            let of = g.of_anchor.map_or(String::new(), |f| {
                format!("{f:>8.2}  (target ≥ {GEMM_TARGET:.2})")
            });
            s += &format!("  {:<34} {:>6.2} {:>9.1} {of}\n", g.dtype, g.ms, g.tflops);
        }
        if let Some(t) = self.train.first() {
            let (peer, peer_name) = t.peer();
            s += &format!(
                "\ntraining, demo shape ({} parameters), batch {} × seq {}, AdamW; median of {} steps\n",
                thousands(t.parameters as u64),
                t.batch,
                t.seq,
                t.steps
            );
            for t in &self.train {
                s += &format!(
                    "  {:<6} {:>9} tokens/s ({:.1} ms/step), {:.2}× {} tokens/s of {peer_name}\n",
                    t.precision.to_string(),
                    thousands(t.tokens_per_second.round() as u64),
                    t.step_ms,
                    t.tokens_per_second / peer,
                    thousands(peer as u64)
                );
            }
        }
        s
    }
}
