//! `trit bench qgpu`: the packed low-bit CUDA kernels (cuda/qgemv.cu, cuda/qgemm.cu) against cuBLAS bf16
//! on the same GPU in the same run, at the decode shape of anchors.md: x[M, 8192] · W[28672, 8192]ᵀ.
//!
//! - The peer: `Tensor::matmul` in bf16 (cuBLAS) with W dense, for M = 1, 16 and 128 (anchors.md: 179 µs
//!   on an H100 at each, the time to stream 470 MB of bf16 weights).
//! - GEMV (M = 1) for ternary 2-bit, binary 1-bit, int4 and Q4_1-style int4 in groups of 32, and int8 in
//!   groups of 32, as GB/s of the packed bytes (codes, scales and mins) and as a fraction of the device
//!   copy rate, with the targets: ternary ≤ 25 µs, binary ≤ 14 µs, int4 ≤ 55 µs.
//! - GEMM (M = 16 and 128) for ternary and int4: at M = 16 at least 3× faster than the peer, at M = 128
//!   faster.
//! - Decode attention over the GPU KV cache (f16, int8, int4) at anchors.md's shape: batch 8, 32 query
//!   and 8 kv heads of 128, 4k and 32k cached tokens, next to PyTorch's bf16 SDPA figures.
//! - Batch-1 decode tokens/s of a model of SmolLM2-135M's shape with random Q4_1 weights packed on the
//!   GPU (the real file is more than a GPU check can carry; speed does not depend on the values),
//!   through an f32 and an int4 (groups of 32) KV cache: the end-to-end int4-KV row.
//!
//! Timing follows /work/.library/device/METHOD.md: device events, warm-up calls, the median of the timed
//! repetitions; each repetition times a batch of calls (one launch is a few microseconds of host work,
//! which events around a single call would count), and the calls rotate over enough copies of the packed
//! weights that together they are four times the 50 MB L2 cache, so no call finds its weights cached.
//! Codes are random (zeros can run faster than real data).

use crate::demo::thousands;
use crate::gpubench::{gbs, median_ms, random, unit};
use crate::llama::{Llama, LlamaConfig};
use rayon::prelude::*;
use serde_json::{json, Value};
use trit::cpu::qmatmul::ActMode;
use trit::cuda::qmatmul::{qmatmul, CudaQWeights};
use trit::cuda::{CudaDevice, CudaStorage};
use trit::nn::kv_cache::{KvCache, KvFormat};
use trit::nn::ParamStore;
use trit::ops::rope::RopeStyle;
use trit::quant::{Group, QFormat, QTensor};
use trit::{DType, Device, Error, Result, Tensor};

/// anchors.md: cuBLAS bf16 x[M, 8192] · W[28672, 8192]ᵀ on an H100, M = 1, 16 and 128.
pub const ANCHOR_BF16_DECODE_US: f64 = 179.0;

/// Bytes the rotated weight copies add up to at least: four times an H100's 50 MB L2.
const ROTATION_BYTES: usize = 200 << 20;

/// One packed product next to the dense bf16 peer at the same M.
#[derive(Clone, Debug)]
pub struct QRow {
    pub kernel: String,
    pub m: usize,
    pub us: f64,
    /// Packed bytes read per call (codes, scales, mins).
    pub weight_bytes: usize,
    pub gbs: f64,
    pub of_copy: f64,
    /// cuBLAS bf16 at the same M, this run.
    pub peer_us: f64,
    /// The bound on `us`, where it sets one.
    pub target_us: Option<f64>,
}

impl QRow {
    /// peer time / trit time.
    pub fn speedup(&self) -> f64 {
        self.peer_us / self.us
    }

    pub fn meets_target(&self) -> Option<bool> {
        self.target_us.map(|t| self.us <= t)
    }
}

/// Everything `trit bench qgpu` measured.
pub struct QGpuBench {
    pub device: String,
    pub quick: bool,
    pub n: usize,
    pub k: usize,
    pub warmup: usize,
    pub reps: usize,
    pub calls_per_rep: usize,
    pub copy_gbs: f64,
    /// (M, µs) of the cuBLAS bf16 peer.
    pub peer: Vec<(usize, f64)>,
    pub rows: Vec<QRow>,
    pub attention: Vec<AttnRow>,
    /// One row per KV cache format, f32 first.
    pub decode: Vec<DecodeRow>,
}

/// Decode attention over a KV cache on the GPU: q [8, 32, 1, 128] against 8 kv heads of `len` tokens.
#[derive(Clone, Debug)]
pub struct AttnRow {
    pub format: String,
    pub len: usize,
    pub us: f64,
    /// Cache bytes per call (codes and scales of K and V).
    pub cache_bytes: usize,
    /// The bound at this point, where it sets one (int8 ≤ 200 µs, int4 ≤ 110 µs at 32k).
    pub target_us: Option<f64>,
    /// PyTorch bf16 SDPA on an H100 at this length (anchors.md: 64.5 µs at 4k, 365 µs at 32k).
    pub torch_bf16_us: f64,
}

/// Batch-1 decoding of a model of SmolLM2-135M's shape with random Q4_1 weights, packed on the GPU.
#[derive(Clone, Debug)]
pub struct DecodeRow {
    pub kv: KvFormat,
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill_ms: f64,
    /// Generated tokens over the wall-clock time of the decode steps (each step reads its logits back).
    pub tokens_per_second: f64,
}

/// Random codes for `format` from a hash of (seed, i), made on all cores.
fn random_codes(format: QFormat, n: usize, seed: u64) -> Vec<i8> {
    let (lo, hi) = format.code_range();
    let span = f32::from(hi - lo) + 1.0;
    let binary = matches!(format, QFormat::Binary { .. });
    (0..n)
        .into_par_iter()
        .map(|i| {
            let u = (unit(seed, i) + 1.0) * 0.5;
            if binary {
                if u < 0.5 {
                    -1
                } else {
                    1
                }
            } else {
                (f32::from(lo) + (u * span).floor().min(span - 1.0)) as i8
            }
        })
        .collect()
}

/// A random packed [n, k] matrix in `format` on `dev`, in enough copies to defeat the L2 cache.
fn packed_copies(
    dev: &std::sync::Arc<CudaDevice>,
    format: QFormat,
    n: usize,
    k: usize,
) -> Result<Vec<CudaQWeights>> {
    let q = random_qtensor(format, n, k, 11)?;
    let first = CudaQWeights::upload(dev, &q)?;
    let copies = ROTATION_BYTES
        .div_ceil(first.byte_size().max(1))
        .clamp(1, 16);
    let mut all = Vec::with_capacity(copies);
    for _ in 1..copies {
        all.push(first.duplicate()?);
    }
    all.push(first);
    Ok(all)
}

/// A random packed [n, k] matrix in `format` on the host.
fn random_qtensor(format: QFormat, n: usize, k: usize, seed: u64) -> Result<QTensor> {
    let groups = format.groups_per_row(k);
    let codes = random_codes(format, n * k, seed);
    let scales: Vec<f32> = (0..n * groups)
        .into_par_iter()
        .map(|i| 0.01 + 0.005 * unit(seed + 1, i))
        .collect();
    let mins: Vec<f32> = if format.has_mins() {
        let count = if matches!(format, QFormat::Binary { .. }) {
            n
        } else {
            n * groups
        };
        (0..count)
            .into_par_iter()
            .map(|i| 0.01 * unit(seed + 2, i))
            .collect()
    } else {
        Vec::new()
    };
    QTensor::from_codes(
        format,
        n,
        k,
        &codes,
        &scales,
        format.has_mins().then_some(&mins[..]),
    )
}

/// SmolLM2-135M's shape (llama.* metadata of the GGUF): 30 layers of 576, 9 query / 3 key-value heads,
/// FFN 1536, 49152 tokens, tied embeddings.
fn smollm2_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn_hidden: 1536,
        max_seq: 2048,
        rope_base: 100_000.0,
        rope_scale: 1.0,
        rope_style: RopeStyle::Interleaved,
        norm_eps: 1e-5,
        tie_embeddings: true,
    }
}

/// A SmolLM2-shaped model whose every matrix is random Q4_1 (Int4 asymmetric, groups of 32) packed on
/// `gpu`: it decodes at the real model's speed, whose 98 MB file is more than a GPU check can carry to
/// the machine.
fn smollm2_q41(gpu: Device) -> Result<Llama> {
    let cfg = smollm2_config();
    let ps = ParamStore::new(0, DType::F32, gpu);
    let q41 = QFormat::Int4 {
        group: Group::Size(32),
        asym: true,
    };
    let (h, f, kv) = (cfg.hidden, cfg.ffn_hidden, cfg.kv_heads * cfg.head_dim());
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), cfg.vocab_size, h)];
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        for (name, n, k) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            shapes.push((format!("{p}.{name}.weight"), n, k));
        }
    }
    for (i, (name, n, k)) in shapes.into_iter().enumerate() {
        let q = random_qtensor(q41, n, k, 100 + 3 * i as u64)?;
        q.prepare_device(gpu)?;
        ps.insert_packed(&name, q, ActMode::F32);
    }
    Llama::new(&ps, cfg)
}

/// Greedy batch-1 decoding of `model` through KV caches in format `kv`.
fn bench_decode(
    model: &Llama,
    gpu: Device,
    kv: KvFormat,
    prompt: usize,
    generated: usize,
) -> Result<DecodeRow> {
    let _no_grad = trit::no_grad();
    let mut caches = model.kv_caches(1, kv)?;
    let argmax = |logits: &Tensor| -> Result<i32> {
        let v = logits.try_to_vec_f32()?;
        Ok(v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as i32))
    };
    let ids: Vec<i32> = (0..prompt as i32).map(|i| (i * 7919) % 49152).collect();
    let ids = Tensor::from_vec(ids, (1, prompt), gpu)?;
    let start = std::time::Instant::now();
    let mut next = argmax(&model.forward_cached_last(&ids, &mut caches)?)?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = std::time::Instant::now();
    for _ in 0..generated {
        let ids = Tensor::from_vec(vec![next], (1, 1), gpu)?;
        next = argmax(&model.forward_cached_last(&ids, &mut caches)?)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(DecodeRow {
        kv,
        prompt_tokens: prompt,
        generated,
        prefill_ms,
        tokens_per_second: generated as f64 / secs,
    })
}

/// Decode attention at anchors.md's shape (batch 8, 32 query / 8 kv heads, head_dim 128) over a
/// cache of each format at 4k and 32k tokens (`quick`: 4k only).
fn bench_attention(
    dev: &CudaDevice,
    gpu: Device,
    quick: bool,
    (warmup, reps, calls): (usize, usize, usize),
) -> Result<Vec<AttnRow>> {
    let (b, qh, kvh, d) = (8, 32, 8, 128);
    let lens: &[usize] = if quick { &[4096] } else { &[4096, 32768] };
    let q = random(&[b, qh, 1, d], 40, gpu)?.to_dtype(DType::BF16)?;
    let mut rows = Vec::new();
    for &len in lens {
        let k = random(&[b, kvh, len, d], 41, gpu)?;
        let v = random(&[b, kvh, len, d], 42, gpu)?;
        for (name, format, target) in [
            ("f16", KvFormat::F16, None),
            ("int8 g32", KvFormat::Int8 { group: 32 }, Some(200.0)),
            ("int4 g32", KvFormat::Int4 { group: 32 }, Some(110.0)),
        ] {
            let mut cache = KvCache::dense(b, kvh, d, format, len, gpu)?;
            cache.append(&k, &v)?;
            let us = per_call_us(dev, warmup, reps, calls, |_| {
                cache.attend(&q, 1.0 / (d as f32).sqrt()).map(drop)
            })?;
            rows.push(AttnRow {
                format: name.to_string(),
                len,
                us,
                cache_bytes: cache.bytes(),
                target_us: target.filter(|_| len == 32768),
                torch_bf16_us: if len == 4096 { 64.5 } else { 365.0 },
            });
        }
    }
    Ok(rows)
}

/// The median device time of one call in µs: each timed repetition runs `calls` of `f(i)`.
fn per_call_us(
    dev: &CudaDevice,
    warmup: usize,
    reps: usize,
    calls: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let mut i = 0;
    let ms = median_ms(dev, warmup, reps, || {
        for _ in 0..calls {
            f(i)?;
            i += 1;
        }
        Ok(())
    })?;
    Ok(ms * 1e3 / calls as f64)
}

/// Runs the benchmark on `cuda:0`; `quick` uses a quarter of the rows and fewer repetitions. A machine
/// without a GPU is an [`Error::NoCudaDevice`].
pub fn bench_qgpu(quick: bool) -> Result<QGpuBench> {
    let dev = CudaDevice::get(0)?;
    let gpu = Device::Cuda(0);
    let (n, k) = if quick { (7168, 8192) } else { (28672, 8192) };
    let (warmup, reps, calls) = if quick { (2, 5, 10) } else { (3, 15, 20) };

    let copy_gbs = {
        let len = 64 << 20;
        let src = CudaStorage::uninit(&dev, DType::F32, len)?;
        let mut dst = CudaStorage::uninit(&dev, DType::F32, len)?;
        let ms = median_ms(&dev, warmup, reps, || dst.copy_from(0, &src, 0, len))?;
        gbs(8.0 * len as f64, ms)
    };

    let ms = [1usize, 16, 128];
    let xs: Vec<Tensor> = ms
        .iter()
        .map(|&m| random(&[m, k], 20 + m as u64, gpu)?.to_dtype(DType::BF16))
        .collect::<Result<_>>()?;
    let peer: Vec<(usize, f64)> = {
        let w = random(&[n, k], 30, gpu)?.to_dtype(DType::BF16)?;
        let wt = w.t()?;
        ms.iter()
            .zip(&xs)
            .map(|(&m, x)| {
                Ok((
                    m,
                    per_call_us(&dev, warmup, reps, calls, |_| x.matmul(&wt).map(drop))?,
                ))
            })
            .collect::<Result<_>>()?
    };
    let peer_at = |m: usize| peer.iter().find(|p| p.0 == m).map_or(f64::NAN, |p| p.1);

    let int4 = |asym| QFormat::Int4 {
        group: Group::Size(32),
        asym,
    };
    // (name, format, target at M = 1, whether the GEMM rows run too)
    let cases: [(&str, QFormat, Option<f64>, bool); 5] = [
        (
            "ternary 2-bit",
            QFormat::Ternary2 { group: Group::Row },
            Some(25.0),
            true,
        ),
        (
            "binary 1-bit",
            QFormat::Binary { offset: false },
            Some(14.0),
            false,
        ),
        ("int4 g32", int4(false), Some(55.0), true),
        ("Q4_1 (int4 g32 + min)", int4(true), None, false),
        (
            "int8 g32",
            QFormat::Int8 {
                group: Group::Size(32),
            },
            None,
            false,
        ),
    ];
    let mut rows = Vec::new();
    for (name, format, target, gemm) in cases {
        let copies = packed_copies(&dev, format, n, k)?;
        let bytes = copies[0].byte_size();
        let mut row = |m: usize, x: &Tensor, target_us: Option<f64>| -> Result<()> {
            let us = x
                .with_cuda_storage(|xs| {
                    per_call_us(&dev, warmup, reps, calls, |i| {
                        qmatmul(&copies[i % copies.len()], xs, m).map(drop)
                    })
                })
                .ok_or_else(|| Error::Msg("bench qgpu: activations are not on the GPU".into()))??;
            let g = gbs(bytes as f64, us * 1e-3);
            rows.push(QRow {
                kernel: format!(
                    "{name} {}",
                    if m <= trit::cuda::qmatmul::GEMV_MAX_M {
                        "GEMV"
                    } else {
                        "GEMM"
                    }
                ),
                m,
                us,
                weight_bytes: bytes,
                gbs: g,
                of_copy: g / copy_gbs,
                peer_us: peer_at(m),
                target_us,
            });
            Ok(())
        };
        row(1, &xs[0], target)?;
        if gemm {
            // The GEMM targets: 3× the peer at M = 16, faster than it at M = 128.
            row(16, &xs[1], Some(peer_at(16) / 3.0))?;
            row(128, &xs[2], Some(peer_at(128)))?;
        }
    }

    let attention = bench_attention(&dev, gpu, quick, (warmup, reps, calls))?;

    // A first decode in each format loads its modules and fills the allocator's cache; the second is
    // timed.
    let (prompt, generated) = if quick { (16, 16) } else { (64, 128) };
    let model = smollm2_q41(gpu)?;
    let decode = [KvFormat::F32, KvFormat::Int4 { group: 32 }]
        .into_iter()
        .map(|kv| {
            bench_decode(&model, gpu, kv, prompt, 4)?;
            bench_decode(&model, gpu, kv, prompt, generated)
        })
        .collect::<Result<Vec<_>>>()?;

    Ok(QGpuBench {
        device: dev.props().name.clone(),
        quick,
        n,
        k,
        warmup,
        reps,
        calls_per_rep: calls,
        copy_gbs,
        peer,
        rows,
        attention,
        decode,
    })
}

impl QGpuBench {
    pub fn to_json(&self) -> Value {
        json!({
            "device": self.device,
            "quick": self.quick,
            "shape": {"n": self.n, "k": self.k},
            "timing": "device events around batches of calls; median over reps after warmup; packed weights rotated over copies totalling ≥ 200 MiB",
            "warmup": self.warmup,
            "reps": self.reps,
            "calls_per_rep": self.calls_per_rep,
            "copy_gbs": self.copy_gbs,
            "anchor_bf16_us": ANCHOR_BF16_DECODE_US,
            "peer": self.peer.iter().map(|(m, us)| json!({"m": m, "us": us})).collect::<Vec<_>>(),
            "rows": self.rows.iter().map(|r| json!({
                "kernel": r.kernel,
                "m": r.m,
                "us": r.us,
                "weight_bytes": r.weight_bytes,
                "gbs": r.gbs,
                "fraction_of_copy": r.of_copy,
                "peer_us": r.peer_us,
                "speedup_vs_peer": r.speedup(),
                "target_us": r.target_us,
                "meets_target": r.meets_target(),
            })).collect::<Vec<_>>(),
            "attention": self.attention.iter().map(|a| json!({
                "shape": "q [8, 32, 1, 128], 8 kv heads",
                "format": a.format,
                "len": a.len,
                "us": a.us,
                "cache_bytes": a.cache_bytes,
                "target_us": a.target_us,
                "torch_bf16_us": a.torch_bf16_us,
            })).collect::<Vec<_>>(),
            "decode": self.decode.iter().map(|d| json!({
                "model": "SmolLM2-135M shape, random Q4_1 weights packed on the GPU, batch 1, greedy",
                "kv": d.kv.to_string(),
                "prompt_tokens": d.prompt_tokens,
                "generated": d.generated,
                "prefill_ms": d.prefill_ms,
                "tokens_per_second": d.tokens_per_second,
            })).collect::<Vec<_>>(),
        })
    }

    /// The report printed by `trit bench qgpu`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{}: x[M, {k}] · W[{n}, {k}]ᵀ, device events, median of {} batches of {} calls{}\n",
            self.device,
            self.reps,
            self.calls_per_rep,
            if self.quick {
                " (--quick: a quarter of the rows)"
            } else {
                ""
            },
            n = self.n,
            k = self.k,
        );
        s += &format!(
            "copy rate {} GB/s; cuBLAS bf16 peer: {} (anchors.md: {ANCHOR_BF16_DECODE_US:.0} µs at the full shape)\n\n",
            thousands(self.copy_gbs.round() as u64),
            self.peer
                .iter()
                .map(|(m, us)| format!("M={m} {us:.1} µs"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s += &format!(
            "{:<30} {:>4} {:>9} {:>7} {:>8} {:>9} {:>8} {:>10}\n",
            "kernel", "M", "µs", "GB/s", "of copy", "peer µs", "speedup", "target µs"
        );
        for r in &self.rows {
            let target = match (r.target_us, r.meets_target()) {
                (Some(t), Some(ok)) => format!("{t:.1} {}", if ok { "ok" } else { "MISS" }),
                _ => String::new(),
            };
            s += &format!(
                "{:<30} {:>4} {:>9.1} {:>7} {:>8.2} {:>9.1} {:>7.2}× {:>10}\n",
                r.kernel,
                r.m,
                r.us,
                thousands(r.gbs.round() as u64),
                r.of_copy,
                r.peer_us,
                r.speedup(),
                target
            );
        }
        s += "\ndecode attention, q [8, 32, 1, 128] against 8 kv heads (PyTorch bf16 SDPA from anchors.md)\n";
        for a in &self.attention {
            let target = a.target_us.map_or(String::new(), |t| {
                format!(
                    "  target {t:.0} µs {}",
                    if a.us <= t { "ok" } else { "MISS" }
                )
            });
            s += &format!(
                "  {:<9} len {:>6} {:>9.1} µs  {:>6} MB  ({:.2}× PyTorch's {:.1} µs){target}\n",
                a.format,
                a.len,
                a.us,
                a.cache_bytes >> 20,
                a.torch_bf16_us / a.us,
                a.torch_bf16_us
            );
        }
        s += "\nSmolLM2-135M shape, random Q4_1 weights packed on the GPU, greedy decoding\n";
        for d in &self.decode {
            s += &format!(
                "  SmolLM2-shaped Q4_1 decode, batch 1, {} KV: {:.1} tokens/s ({} tokens after a \
                 {}-token prompt, prefill {:.1} ms)\n",
                d.kv, d.tokens_per_second, d.generated, d.prompt_tokens, d.prefill_ms
            );
        }
        s
    }
}
