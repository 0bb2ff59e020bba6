//! `trit bench flash`: the CUDA flash attention kernels (cuda/flash_fwd.cu, cuda/flash_bwd.cu) at the
//! shape of anchors.md — B·S = 16384, 16 heads, d = 128, bf16, S = 1k / 4k / 16k, causal and not — as
//! TFLOP/s next to FlashAttention-2's and cuDNN's figures on an H100. Reaching FA2's is the target.
//!
//! - The launchers of `trit::cuda::flash` are timed alone: the forward, and the backward given the o and
//!   lse of one forward, as FlashAttention's own benchmark times its kernels (no autograd around them).
//! - The peer in the same run: `Tensor::attention_composed` in bf16 (cuBLAS matmuls around a materialised
//!   softmax), forward only, up to S = 4k; at 16k each of its [B, H, S, S] intermediates is 8 GiB.
//! - Beyond the anchors: grouped-query heads (32 query / 8 kv heads, B = 4, S = 4k, full) and the demo
//!   model's head dim (d = 64, B = 16, 16 heads, S = 1k, causal).
//!
//! FLOPs follow FlashAttention's benchmark: forward 4·B·S²·H·d (H the query heads), halved when causal;
//! backward 2.5 × forward; the composed path is credited with the same count. Timing follows
//! /work/.library/device/METHOD.md: device events, warm-up calls, the median of the timed repetitions.
//! A repetition runs enough calls to reach [`REP_FLOPS`] (about 1.7 ms at the anchors' rate), so the
//! host's work per launch (checks, allocation) does not show in a short kernel's time. Inputs are
//! random (zeros can run faster than real data).

use crate::gpubench::{median_ms, random};
use serde_json::{json, Value};
use trit::cuda::flash::{self, FlashMask, FlashShape};
use trit::cuda::{CudaDevice, CudaStorage};
use trit::ops::attention::AttentionOptions;
use trit::{DType, Device, Error, Layout, Result, Tensor};

/// Tokens per batch (B·S) of the anchor rows, and their heads and head dim.
pub const ANCHOR_TOKENS: usize = 16384;
pub const ANCHOR_HEADS: usize = 16;
pub const ANCHOR_HEAD_DIM: usize = 128;

/// torch SDPA on an H100, bf16, at the anchor shape (anchors.md), in TFLOP/s:
/// (S, causal, [FA2 fwd, FA2 bwd, cuDNN fwd, cuDNN bwd]).
pub const ANCHORS: [(usize, bool, [f64; 4]); 6] = [
    (1024, false, [329.0, 223.0, 568.0, 402.0]),
    (4096, false, [341.0, 290.0, 600.0, 502.0]),
    (16384, false, [337.0, 310.0, 612.0, 534.0]),
    (1024, true, [246.0, 161.0, 435.0, 287.0]),
    (4096, true, [304.0, 251.0, 526.0, 429.0]),
    (16384, true, [318.0, 306.0, 578.0, 522.0]),
];

/// FLOPs a timed repetition runs at least.
pub const REP_FLOPS: f64 = 5e11;

/// The composed peer runs up to this sequence length.
const COMPOSED_MAX_SEQ: usize = 4096;

/// Which launcher a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    /// `flash::backward` given a forward's o and lse.
    Backward,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
        }
    }

    /// FLOPs relative to the forward's.
    fn flop_factor(self) -> f64 {
        match self {
            Pass::Forward => 1.0,
            Pass::Backward => 2.5,
        }
    }
}

/// FA2's and cuDNN's TFLOP/s at a row's point (anchors.md, an H100).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Anchor {
    pub fa2: f64,
    pub cudnn: f64,
}

fn anchor(shape: FlashShape, causal: bool, pass: Pass) -> Option<Anchor> {
    let at_anchor_shape = shape.batch * shape.sq == ANCHOR_TOKENS
        && shape.sq == shape.sk
        && shape.heads == ANCHOR_HEADS
        && shape.kv_heads == ANCHOR_HEADS
        && shape.head_dim == ANCHOR_HEAD_DIM;
    let &(_, _, [fa2_fwd, fa2_bwd, cudnn_fwd, cudnn_bwd]) = ANCHORS
        .iter()
        .find(|a| at_anchor_shape && a.0 == shape.sq && a.1 == causal)?;
    Some(match pass {
        Pass::Forward => Anchor {
            fa2: fa2_fwd,
            cudnn: cudnn_fwd,
        },
        Pass::Backward => Anchor {
            fa2: fa2_bwd,
            cudnn: cudnn_bwd,
        },
    })
}

/// One timed launcher at one problem.
#[derive(Clone, Debug)]
pub struct FlashRow {
    pub pass: Pass,
    /// How the problem departs from the anchor shape ("" at it).
    pub variant: &'static str,
    pub shape: FlashShape,
    pub causal: bool,
    pub flops: f64,
    pub calls_per_rep: usize,
    pub ms: f64,
    /// Only at the anchor shape.
    pub anchor: Option<Anchor>,
    /// The composed path's forward in this run, where it is measured.
    pub composed_ms: Option<f64>,
}

impl FlashRow {
    /// "fwd", "bwd GQA 32/8", …
    pub fn kernel(&self) -> String {
        if self.variant.is_empty() {
            self.pass.name().to_string()
        } else {
            format!("{} {}", self.pass.name(), self.variant)
        }
    }

    pub fn tflops(&self) -> f64 {
        tflops(self.flops, self.ms)
    }

    pub fn ratio_vs_fa2(&self) -> Option<f64> {
        self.anchor.map(|a| self.tflops() / a.fa2)
    }

    /// The target: at least FA2's TFLOP/s.
    pub fn meets_target(&self) -> Option<bool> {
        self.ratio_vs_fa2().map(|r| r >= 1.0)
    }

    pub fn composed_tflops(&self) -> Option<f64> {
        self.composed_ms.map(|ms| tflops(self.flops, ms))
    }

    /// composed time / flash time.
    pub fn speedup_vs_composed(&self) -> Option<f64> {
        self.composed_ms.map(|ms| ms / self.ms)
    }
}

fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

/// Everything `trit bench flash` measured.
pub struct FlashBench {
    pub device: String,
    pub quick: bool,
    pub warmup: usize,
    pub reps: usize,
    pub rows: Vec<FlashRow>,
}

/// One problem's inputs on the GPU, bf16, in the launchers' layouts.
struct Inputs {
    shape: FlashShape,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
}

impl Inputs {
    /// Random inputs of `shape`, with seeds from `seed`.
    fn random(shape: FlashShape, seed: u64, gpu: Device) -> Result<Inputs> {
        let FlashShape {
            batch: b,
            sq,
            sk,
            heads: h,
            kv_heads: hk,
            head_dim: d,
        } = shape;
        let bf16 = |dims: [usize; 4], s: u64| random(&dims, seed + s, gpu)?.to_dtype(DType::BF16);
        Ok(Inputs {
            shape,
            q: bf16([b, sq, h, d], 0)?,
            k: bf16([b, sk, hk, d], 1)?,
            v: bf16([b, sk, hk, d], 2)?,
            dout: bf16([b, sq, h, d], 3)?,
        })
    }

    /// The same data viewed as `shape` (same element counts).
    fn reshaped(&self, shape: FlashShape) -> Result<Inputs> {
        let FlashShape {
            batch: b,
            sq,
            sk,
            heads: h,
            kv_heads: hk,
            head_dim: d,
        } = shape;
        Ok(Inputs {
            shape,
            q: self.q.reshape([b, sq, h, d])?,
            k: self.k.reshape([b, sk, hk, d])?,
            v: self.v.reshape([b, sk, hk, d])?,
            dout: self.dout.reshape([b, sq, h, d])?,
        })
    }
}

fn storage(t: &Tensor) -> Result<CudaStorage> {
    t.with_cuda_storage(CudaStorage::clone)
        .ok_or_else(|| Error::Msg("bench flash: an input is not on the GPU".into()))
}

/// The median device time of one call of `f` in ms, `calls` calls per repetition.
fn per_call_ms(
    dev: &CudaDevice,
    (warmup, reps): (usize, usize),
    calls: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let ms = median_ms(dev, warmup, reps, || (0..calls).try_for_each(|_| f()))?;
    Ok(ms / calls as f64)
}

fn calls_for(flops: f64) -> usize {
    (REP_FLOPS / flops).ceil().clamp(1.0, 64.0) as usize
}

/// The forward and backward rows of one problem; the composed forward too up to [`COMPOSED_MAX_SEQ`].
fn measure(
    dev: &std::sync::Arc<CudaDevice>,
    timing: (usize, usize),
    x: &Inputs,
    causal: bool,
    variant: &'static str,
) -> Result<[FlashRow; 2]> {
    let shape = x.shape;
    let (q, k, v, dout) = (
        storage(&x.q)?,
        storage(&x.k)?,
        storage(&x.v)?,
        storage(&x.dout)?,
    );
    let (ql, kl, vl, dl) = (x.q.layout(), x.k.layout(), x.v.layout(), x.dout.layout());
    let mask = FlashMask::new(dev, shape, causal, None, None, None)?;
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let forward = || flash::forward((&q, ql), (&k, kl), (&v, vl), shape, &mask, scale);

    let fwd_flops = [shape.batch, shape.sq, shape.sk, shape.heads, shape.head_dim]
        .iter()
        .map(|&n| n as f64)
        .product::<f64>()
        * if causal { 2.0 } else { 4.0 };
    let row = |pass: Pass, f: &mut dyn FnMut() -> Result<()>| -> Result<FlashRow> {
        let flops = fwd_flops * pass.flop_factor();
        let calls = calls_for(flops);
        Ok(FlashRow {
            pass,
            variant,
            shape,
            causal,
            flops,
            calls_per_rep: calls,
            ms: per_call_ms(dev, timing, calls, f)?,
            anchor: anchor(shape, causal, pass),
            composed_ms: None,
        })
    };
    let mut fwd = row(Pass::Forward, &mut || forward().map(drop))?;
    let (o, lse) = forward()?;
    let ol = Layout::contiguous(x.q.dims());
    let bwd = row(Pass::Backward, &mut || {
        flash::backward(
            (&q, ql),
            (&k, kl),
            (&v, vl),
            (&o, &ol),
            &lse,
            (&dout, dl),
            shape,
            &mask,
            scale,
        )
        .map(drop)
    })?;
    if shape.sq.max(shape.sk) <= COMPOSED_MAX_SEQ {
        let opts = AttentionOptions::new(causal, None);
        fwd.composed_ms = Some(per_call_ms(dev, timing, 1, || {
            x.q.attention_composed(&x.k, &x.v, &opts).map(drop)
        })?);
    }
    Ok([fwd, bwd])
}

/// Runs the benchmark on `cuda:0`; `quick` keeps S = 1k of the anchor rows (the two other problems
/// stay) with fewer repetitions. A machine without a GPU is an [`Error::NoCudaDevice`].
pub fn bench_flash(quick: bool) -> Result<FlashBench> {
    let dev = CudaDevice::get(0)?;
    let gpu = Device::Cuda(0);
    let timing = if quick { (1, 3) } else { (3, 10) };
    let seqs: &[usize] = if quick { &[1024] } else { &[1024, 4096, 16384] };
    let _no_grad = trit::no_grad();
    let anchor_shape = |seq: usize| FlashShape {
        batch: ANCHOR_TOKENS / seq,
        sq: seq,
        sk: seq,
        heads: ANCHOR_HEADS,
        kv_heads: ANCHOR_HEADS,
        head_dim: ANCHOR_HEAD_DIM,
    };
    let mut rows = Vec::new();
    // B·S is fixed, so one set of tensors serves every S.
    let base = Inputs::random(anchor_shape(ANCHOR_TOKENS), 1, gpu)?;
    for &seq in seqs {
        let x = base.reshaped(anchor_shape(seq))?;
        for causal in [false, true] {
            rows.extend(measure(&dev, timing, &x, causal, "")?);
        }
    }
    let gqa = FlashShape {
        batch: 4,
        sq: 4096,
        sk: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    let x = Inputs::random(gqa, 11, gpu)?;
    rows.extend(measure(&dev, timing, &x, false, "GQA 32/8")?);
    let d64 = FlashShape {
        batch: 16,
        sq: 1024,
        sk: 1024,
        heads: 16,
        kv_heads: 16,
        head_dim: 64,
    };
    let x = Inputs::random(d64, 21, gpu)?;
    rows.extend(measure(&dev, timing, &x, true, "d=64")?);

    Ok(FlashBench {
        device: dev.props().name.clone(),
        quick,
        warmup: timing.0,
        reps: timing.1,
        rows,
    })
}

impl FlashBench {
    pub fn to_json(&self) -> Value {
        json!({
            "device": self.device,
            "quick": self.quick,
            "dtype": "bf16",
            "timing": "device events around batches of calls of one launcher; median over reps after warmup",
            "warmup": self.warmup,
            "reps": self.reps,
            "flops": "FlashAttention's count: fwd 4·B·S²·H·d (H query heads), halved when causal; bwd 2.5 × fwd",
            "anchors": "FlashAttention-2 and cuDNN through torch SDPA on an H100, bf16, B·S = 16384, 16 heads, d = 128 (anchors.md)",
            "target": "TFLOP/s ≥ FlashAttention-2's at the anchor shape",
            "composed": "Tensor::attention_composed forward in bf16, this run, up to S = 4096",
            "rows": self.rows.iter().map(|r| json!({
                "kernel": r.kernel(),
                "pass": r.pass.name(),
                "batch": r.shape.batch,
                "seq": r.shape.sq,
                "heads": r.shape.heads,
                "kv_heads": r.shape.kv_heads,
                "head_dim": r.shape.head_dim,
                "causal": r.causal,
                "flops": r.flops,
                "calls_per_rep": r.calls_per_rep,
                "ms": r.ms,
                "tflops": r.tflops(),
                "fa2_tflops": r.anchor.map(|a| a.fa2),
                "cudnn_tflops": r.anchor.map(|a| a.cudnn),
                "ratio_vs_fa2": r.ratio_vs_fa2(),
                "meets_target": r.meets_target(),
                "composed_ms": r.composed_ms,
                "composed_tflops": r.composed_tflops(),
                "speedup_vs_composed": r.speedup_vs_composed(),
            })).collect::<Vec<_>>(),
        })
    }

    /// The report printed by `trit bench flash`: a markdown table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}: trit::cuda::flash launchers in bf16, device events, median of {} repetitions after {} \
             warm-up{}\n",
            self.device,
            self.reps,
            self.warmup,
            if self.quick {
                " (--quick: S = 1k only at the anchor shape)"
            } else {
                ""
            }
        );
        s += "TFLOP/s by FlashAttention's count (fwd 4·B·S²·H·d, halved when causal; bwd 2.5 × fwd). \
              FA2, cuDNN: torch SDPA on an H100 (anchors.md); target: ≥ FA2. composed: \
              Tensor::attention_composed forward, this run.\n\n";
        s += "| kernel | B | S | heads | d | causal | ms | TFLOP/s | FA2 | ratio | cuDNN | target | composed TFLOP/s | speedup |\n";
        s += "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|---|--:|--:|\n";
        let opt =
            |x: Option<f64>, digits: usize| x.map_or(String::new(), |x| format!("{x:.digits$}"));
        for r in &self.rows {
            let heads = if r.shape.kv_heads == r.shape.heads {
                r.shape.heads.to_string()
            } else {
                format!("{}/{}", r.shape.heads, r.shape.kv_heads)
            };
            let target = r
                .meets_target()
                .map_or("", |ok| if ok { "ok" } else { "MISS" });
            s += &format!(
                "| {} | {} | {} | {heads} | {} | {} | {:.3} | {:.1} | {} | {} | {} | {target} | {} | {} |\n",
                r.kernel(),
                r.shape.batch,
                r.shape.sq,
                r.shape.head_dim,
                if r.causal { "yes" } else { "no" },
                r.ms,
                r.tflops(),
                opt(r.anchor.map(|a| a.fa2), 0),
                opt(r.ratio_vs_fa2(), 2),
                opt(r.anchor.map(|a| a.cudnn), 0),
                opt(r.composed_tflops(), 1),
                r.speedup_vs_composed()
                    .map_or(String::new(), |x| format!("{x:.1}×")),
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, seq: usize, heads: usize, kv_heads: usize, d: usize) -> FlashShape {
        FlashShape {
            batch,
            sq: seq,
            sk: seq,
            heads,
            kv_heads,
            head_dim: d,
        }
    }

    #[test]
    fn anchors_apply_at_the_anchor_shape_only() {
        let a = anchor(shape(4, 4096, 16, 16, 128), true, Pass::Backward);
        assert_eq!(
            a,
            Some(Anchor {
                fa2: 251.0,
                cudnn: 429.0
            })
        );
        assert_eq!(
            anchor(shape(4, 4096, 32, 8, 128), false, Pass::Forward),
            None
        );
        assert_eq!(
            anchor(shape(16, 1024, 16, 16, 64), true, Pass::Forward),
            None
        );
        assert_eq!(
            anchor(shape(1, 1024, 16, 16, 128), false, Pass::Forward),
            None
        );
    }

    #[test]
    fn reports_carry_every_row() {
        let anchor_row = |pass, ms| FlashRow {
            pass,
            variant: "",
            shape: shape(16, 1024, 16, 16, 128),
            causal: false,
            flops: 1.0e11 * pass.flop_factor(),
            calls_per_rep: 5,
            ms,
            anchor: anchor(shape(16, 1024, 16, 16, 128), false, pass),
            composed_ms: (pass == Pass::Forward).then_some(2.0),
        };
        let gqa = FlashRow {
            variant: "GQA 32/8",
            shape: shape(4, 4096, 32, 8, 128),
            anchor: None,
            composed_ms: None,
            ..anchor_row(Pass::Backward, 1.0)
        };
        let bench = FlashBench {
            device: "test".into(),
            quick: true,
            warmup: 1,
            reps: 3,
            rows: vec![
                anchor_row(Pass::Forward, 0.2),
                anchor_row(Pass::Backward, 2.0),
                gqa,
            ],
        };
        let json = bench.to_json();
        let rows = json["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["kernel"], "fwd");
        assert_eq!(rows[0]["meets_target"], true);
        assert_eq!(rows[0]["speedup_vs_composed"], 10.0);
        assert_eq!(rows[1]["meets_target"], false);
        assert_eq!(rows[2]["kernel"], "bwd GQA 32/8");
        assert!(rows[2]["fa2_tflops"].is_null() && rows[2]["meets_target"].is_null());
        let table = bench.table();
        assert_eq!(table.lines().filter(|l| l.starts_with("| ")).count(), 4);
        assert!(table.contains("| fwd | 16 | 1024 | 16 | 128 | no | 0.200 | 500.0 | 329 | 1.52 | 568 | ok | 50.0 | 10.0× |"));
        assert!(table.contains("| bwd GQA 32/8 | 4 | 4096 | 32/8 |"));
    }

    #[test]
    fn repetitions_batch_short_calls() {
        let fwd_1k = 4.0 * 16.0 * 1024.0 * 1024.0 * 16.0 * 128.0;
        assert_eq!(calls_for(fwd_1k), 4);
        assert_eq!(calls_for(2.5 * 16.0 * fwd_1k), 1);
        assert_eq!(calls_for(1.0), 64);
    }
}
