//! Fused flash attention against the naive formulation (the peer: q·kᵀ → softmax → ·v from primitive ops,
//! the [batch, heads, S, S] scores stored) at the anchors.md shape: causal, batch 1 × 8 heads, S = 2048,
//! d = 64. Forward alone, and forward + backward of sum(o ∘ r) as one timing.
//!
//! Throughput is reported as `Elements(FLOPs)` by FlashAttention's count (forward 4·B·H·S²·d halved for
//! causal, forward + backward 3.5 × that), so criterion's "elem/s" reads as FLOP/s; PyTorch SDPA does the
//! forward at 136 GFLOP/s on the development machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use trit::ops::attention::AttentionOptions;
use trit::{Device, Result, Rng, Tensor};

const BATCH: usize = 1;
const SEQ: usize = 2048;
const HEADS: usize = 8;
const HEAD_DIM: usize = 64;

/// The plain attention of `trit::nn::attention` over q, k, v [batch, S, heads, d]: heads moved in front,
/// scores materialised, causal softmax, back to [batch, S, heads, d].
fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let q = q
        .transpose(1, 2)?
        .mul_scalar(1.0 / (HEAD_DIM as f32).sqrt())?
        .contiguous()?;
    let k = k.transpose(1, 2)?;
    let v = v.transpose(1, 2)?;
    q.matmul(&k.t()?)?
        .causal_softmax()?
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()
}

/// An attention implementation over (q, k, v).
type Kernel = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

fn flash(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    q.flash_attention(
        k,
        v,
        &AttentionOptions {
            causal: true,
            ..Default::default()
        },
    )
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    let shape = (BATCH, SEQ, HEADS, HEAD_DIM);
    let mut randn = || Tensor::randn(shape, 0.0, 1.0, &mut rng, Device::Cpu).expect("randn");
    let (q, k, v, r) = (randn(), randn(), randn(), randn());
    let vars = [&q, &k, &v].map(|t| t.var().expect("var"));
    let fwd_flops = 4.0 * (BATCH * HEADS * SEQ * SEQ * HEAD_DIM) as f64 / 2.0;
    let kernels: [(&str, Kernel); 2] = [("flash", flash), ("naive", naive)];

    let mut group = c.benchmark_group(format!(
        "attention_causal_b{BATCH}_h{HEADS}_s{SEQ}_d{HEAD_DIM}"
    ));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(8));

    group.throughput(Throughput::Elements(fwd_flops as u64));
    for (name, f) in kernels {
        group.bench_function(format!("{name}_fwd"), |b| {
            b.iter(|| f(black_box(&q), &k, &v).expect("forward"))
        });
    }
    group.throughput(Throughput::Elements((3.5 * fwd_flops) as u64));
    for (name, f) in kernels {
        group.bench_function(format!("{name}_fwd_bwd"), |b| {
            b.iter(|| {
                let o = f(black_box(&vars[0]), &vars[1], &vars[2]).expect("forward");
                o.mul(&r)
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
