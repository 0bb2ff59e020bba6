//! The int8/int4 KV cache on a CUDA device against the host cache, its oracle: the fused
//! quantize-and-append kernel must write the host cache's codes and f16 scales bit for bit (compared
//! through dequantize_k/v, which decodes exactly), for f32, f16 and bf16 inputs, contiguous and
//! strided (transposed, narrowed) K/V views, per-row and grouped scales, odd head_dims for int4, GQA,
//! batch 2, growth from room for one token, truncation and clearing; attention within 1e-4.
//!
//! Every test needs a GPU and is ignored by default:
//! `cargo test --release -p trit --features cuda --test cuda_kv -- --ignored`.
//! New device allocations are filled with NaN (`set_poison`), so a code or scale the kernel leaves
//! unwritten shows up in the comparison.

#![cfg(feature = "cuda")]

mod common;

use common::{DataRng, CPU};
use std::sync::{RwLock, RwLockReadGuard};
use trit::nn::kv_cache::{KvCache, KvFormat};
use trit::{DType, Device, Result, Tensor};

const GPU: Device = Device::Cuda(0);

/// The tests share one device and the process-wide poison switch.
static DEVICE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    let guard = DEVICE.read().unwrap_or_else(|e| e.into_inner());
    trit::cuda::set_poison(true);
    guard
}

/// Random rows of `d` values, each with its own magnitude (10⁻³ to 10²), some all zero, some with one
/// large outlier, some values on exact ties of the int grids' rounding.
fn rows(n: usize, d: usize, rng: &mut DataRng) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * d);
    for _ in 0..n {
        let kind = rng.below(8);
        let mag = 10f64.powf(rng.range(-3.0, 2.0));
        let outlier = rng.below(d);
        for j in 0..d {
            let x = match kind {
                0 => 0.0,
                1 if j == outlier => 20.0 * mag,
                // Halves of small integers: x / scale lands on .5 ties when max|x| is a grid point.
                2 => (rng.below(15) as f64 - 7.0) * 0.5,
                _ => rng.normal() * mag,
            };
            v.push(x as f32);
        }
    }
    v
}

/// How new K/V reach the cache: contiguous, or the [b, t, h, d] projection transposed, or a narrowed
/// slice of a longer [b, h, t + 3, d] buffer (an offset and a token stride that is not t · d).
#[derive(Clone, Copy, Debug)]
enum View {
    Contiguous,
    Transposed,
    Narrowed,
}

/// The same [b, h, n, d] K (or V) in `dtype`, on the CPU contiguous and on the GPU in `view`.
fn input(
    (b, h, n, d): (usize, usize, usize, usize),
    dtype: DType,
    view: View,
    rng: &mut DataRng,
) -> Result<(Tensor, Tensor)> {
    let gpu = match view {
        View::Contiguous => {
            Tensor::from_vec(rows(b * h * n, d, rng), (b, h, n, d), CPU)?.to_dtype(dtype)?
        }
        View::Transposed => Tensor::from_vec(rows(b * n * h, d, rng), (b, n, h, d), CPU)?
            .to_dtype(dtype)?
            .to_device(GPU)?
            .transpose(1, 2)?,
        View::Narrowed => Tensor::from_vec(rows(b * h * (n + 3), d, rng), (b, h, n + 3, d), CPU)?
            .to_dtype(dtype)?
            .to_device(GPU)?
            .narrow(2, 2, n)?,
    };
    let gpu = if gpu.device() == GPU {
        gpu
    } else {
        gpu.to_device(GPU)?
    };
    let host = gpu.to_device(CPU)?.contiguous()?;
    Ok((host, gpu))
}

fn assert_same_values(host: &KvCache, gpu: &KvCache, what: &str) -> Result<()> {
    for (name, h, g) in [
        ("K", host.dequantize_k()?, gpu.dequantize_k()?),
        ("V", host.dequantize_v()?, gpu.dequantize_v()?),
    ] {
        assert_eq!(g.device(), GPU);
        assert_eq!(g.dims(), h.dims(), "{what}: {name}");
        let (h, g) = (h.to_vec_f32(), g.to_device(CPU)?.to_vec_f32());
        for (i, (a, b)) in g.iter().zip(&h).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{what}: {name} element {i} is {a} on the GPU, {b} in the host cache"
            );
        }
    }
    Ok(())
}

/// Both caches' attention for a random q [b, hq, tq, d] within 1e-4 of the larger |V|.
fn assert_same_attention(
    host: &KvCache,
    gpu: &KvCache,
    hq: usize,
    tq: usize,
    rng: &mut DataRng,
    what: &str,
) -> Result<()> {
    let (b, d) = (host.batch(), host.head_dim());
    let q: Vec<f32> = (0..b * hq * tq * d).map(|_| rng.normal() as f32).collect();
    let q = Tensor::from_vec(q, (b, hq, tq, d), CPU)?;
    let scale = 1.0 / (d as f32).sqrt();
    let want = host.attend(&q, scale)?.to_vec_f32();
    let got = gpu.attend(&q.to_device(GPU)?, scale)?;
    assert_eq!(got.device(), GPU);
    let got = got.to_device(CPU)?.to_vec_f32();
    assert_close_to_host(host, &got, &want, 1e-4, &format!("{what} hq {hq} tq {tq}"))
}

/// Every element of `got` within `tol` · (max|V| + |want|) of the host cache's `want`.
fn assert_close_to_host(
    host: &KvCache,
    got: &[f32],
    want: &[f32],
    tol: f32,
    what: &str,
) -> Result<()> {
    assert_eq!(got.len(), want.len(), "{what}: element counts");
    let vmax = host
        .dequantize_v()?
        .to_vec_f32()
        .iter()
        .fold(0f32, |a, x| a.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (vmax + w.abs()),
            "{what}: element {i} is {g} on the GPU, {w} in the host cache"
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_int_caches_match_host_int_caches() -> Result<()> {
    let _lock = shared();
    let mut rng = DataRng::new(31);
    // Head dims below, at and past the warp width, odd ones for int4's padding nibble.
    for (b, h, d, g) in [
        (2, 2, 64, 32),
        (1, 3, 128, 32),
        (2, 1, 7, 1),
        (2, 2, 33, 11),
    ] {
        for format in [
            KvFormat::Int8 { group: d },
            KvFormat::Int4 { group: d },
            KvFormat::Int8 { group: g },
            KvFormat::Int4 { group: g },
        ] {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for view in [View::Contiguous, View::Transposed, View::Narrowed] {
                    let what = format!("{format} {dtype:?} {view:?} b {b} h {h} d {d}");
                    let mut host = KvCache::new(b, h, d, format)?;
                    let mut gpu = KvCache::dense(b, h, d, format, 1, GPU)?;
                    assert!(gpu.is_dense() && gpu.device() == GPU);
                    let append = |host: &mut KvCache, gpu: &mut KvCache, n, rng: &mut DataRng| {
                        let (hk, gk) = input((b, h, n, d), dtype, view, rng)?;
                        let (hv, gv) = input((b, h, n, d), dtype, view, rng)?;
                        host.append(&hk, &hv)?;
                        gpu.append(&gk, &gv)
                    };
                    for n in [5, 1, 1, 40, 1] {
                        append(&mut host, &mut gpu, n, &mut rng)?;
                        assert_eq!((gpu.len(), gpu.bytes()), (host.len(), host.bytes()));
                        assert_same_values(&host, &gpu, &what)?;
                        for group in [1, 2] {
                            assert_same_attention(&host, &gpu, h * group, n, &mut rng, &what)?;
                        }
                    }
                    let copy = gpu.clone();
                    for c in [&mut host, &mut gpu] {
                        c.truncate(3);
                    }
                    append(&mut host, &mut gpu, 2, &mut rng)?;
                    assert_same_values(&host, &gpu, &what)?;
                    assert_same_attention(&host, &gpu, 2 * h, 1, &mut rng, &what)?;
                    // The clone kept its tokens: the appends wrote a private buffer.
                    assert_eq!(copy.len(), 48);
                    for c in [&mut host, &mut gpu] {
                        c.clear();
                    }
                    append(&mut host, &mut gpu, 3, &mut rng)?;
                    assert_same_values(&host, &gpu, &what)?;
                    assert_same_attention(&host, &gpu, h, 3, &mut rng, &what)?;
                }
            }
        }
    }
    Ok(())
}

/// A clone of a device int cache keeps its codes when the original appends over its tail.
#[test]
#[ignore = "needs a CUDA device"]
fn device_int_cache_clones_are_independent() -> Result<()> {
    let _lock = shared();
    let mut rng = DataRng::new(32);
    let (b, h, d) = (1, 2, 16);
    for format in [KvFormat::Int8 { group: 8 }, KvFormat::Int4 { group: 16 }] {
        let mut gpu = KvCache::dense(b, h, d, format, 8, GPU)?;
        let (_, x) = input((b, h, 4, d), DType::F32, View::Contiguous, &mut rng)?;
        gpu.append(&x, &x)?;
        gpu.truncate(2);
        let copy = gpu.clone();
        let before = (copy.dequantize_k()?.to_vec_f32(), copy.len());
        let (_, y) = input((b, h, 2, d), DType::F32, View::Contiguous, &mut rng)?;
        gpu.append(&y, &y)?;
        assert_eq!((copy.dequantize_k()?.to_vec_f32(), copy.len()), before);
    }
    Ok(())
}

/// Rows of `d` values of moderate size (scores stay within a few units, so f32 rounding of the
/// dot products moves the softmax by well under the tolerance), each row its own magnitude, some zero.
fn moderate_rows(n: usize, d: usize, rng: &mut DataRng) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * d);
    for _ in 0..n {
        let mag = if rng.below(16) == 0 {
            0.0
        } else {
            10f64.powf(rng.range(-1.0, 0.5))
        };
        v.extend((0..d).map(|_| (rng.normal() * mag) as f32));
    }
    v
}

/// Appends the same `n` new tokens of K and V ([b, h, n, d] f32) to both caches.
fn append_both(host: &mut KvCache, gpu: &mut KvCache, n: usize, rng: &mut DataRng) -> Result<()> {
    let (b, h, d) = (host.batch(), host.heads(), host.head_dim());
    let k = Tensor::from_vec(moderate_rows(b * h * n, d, rng), (b, h, n, d), CPU)?;
    let v = Tensor::from_vec(moderate_rows(b * h * n, d, rng), (b, h, n, d), CPU)?;
    host.append(&k, &v)?;
    gpu.append(&k.to_device(GPU)?, &v.to_device(GPU)?)
}

/// Decode attention (one query token per head) of both caches for q [b, hq, 1, d] in `dtype`, within
/// `tol` of the larger of |V| and the expected value; `narrowed` hands the GPU q as a strided view.
fn assert_same_decode(
    host: &KvCache,
    gpu: &KvCache,
    hq: usize,
    dtype: DType,
    narrowed: bool,
    rng: &mut DataRng,
    what: &str,
) -> Result<()> {
    let (b, d) = (host.batch(), host.head_dim());
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        _ => 1e-2,
    };
    let wide: Vec<f32> = (0..b * hq * (d + 3)).map(|_| rng.normal() as f32).collect();
    let wide = Tensor::from_vec(wide, (b, hq, 1, d + 3), CPU)?.to_dtype(dtype)?;
    let q = wide.narrow(3, 1, d)?;
    let scale = 1.0 / (d as f32).sqrt();
    let want = host.attend(&q.contiguous()?, scale)?;
    assert_eq!(want.dtype(), dtype);
    let gpu_q = if narrowed {
        wide.to_device(GPU)?.narrow(3, 1, d)?
    } else {
        q.contiguous()?.to_device(GPU)?
    };
    let got = gpu.attend(&gpu_q, scale)?;
    assert_eq!((got.device(), got.dtype()), (GPU, dtype));
    assert_eq!(got.dims(), &[b, hq, 1, d]);
    let (got, want) = (got.to_device(CPU)?.to_vec_f32(), want.to_vec_f32());
    assert_close_to_host(host, &got, &want, tol, &format!("{what} hq {hq} {dtype:?}"))
}

/// The flash-decoding kernels against the host cache: every format, f32, f16 and bf16 queries, GQA
/// groups of 1, 3 and 4 (and one of 9, past a block's eight query heads), batch 2, head_dims 64, 128
/// and 40, lengths 1, 7, 1000 (one chunk's tail) and 4097 (many splits, a one-token tail tile).
#[test]
#[ignore = "needs a CUDA device"]
fn device_decode_attention_matches_host_cache() -> Result<()> {
    let _lock = shared();
    let mut rng = DataRng::new(33);
    let (b, h) = (2, 2);
    for d in [64, 128, 40] {
        for format in [
            KvFormat::F32,
            KvFormat::F16,
            KvFormat::Int8 { group: d },
            KvFormat::Int8 { group: 8 },
            KvFormat::Int4 { group: d },
            KvFormat::Int4 { group: 8 },
        ] {
            let mut host = KvCache::new(b, h, d, format)?;
            let mut gpu = KvCache::dense(b, h, d, format, 1, GPU)?;
            for len in [1, 7, 1000, 4097] {
                let new = len - host.len();
                append_both(&mut host, &mut gpu, new, &mut rng)?;
                let what = format!("{format} d {d} len {len}");
                for group in [1, 3, 4] {
                    for dtype in [DType::F32, DType::F16, DType::BF16] {
                        let narrowed = group == 3;
                        assert_same_decode(
                            &host,
                            &gpu,
                            h * group,
                            dtype,
                            narrowed,
                            &mut rng,
                            &what,
                        )?;
                    }
                }
            }
            assert_same_decode(&host, &gpu, 9 * h, DType::F32, false, &mut rng, "group 9")?;
        }
    }
    Ok(())
}

/// A head_dim past the kernels' 256 takes the tensor ops and still matches; the odd one 7 with int4's
/// padding nibble takes the kernels.
#[test]
#[ignore = "needs a CUDA device"]
fn device_decode_attention_other_head_dims() -> Result<()> {
    let _lock = shared();
    let mut rng = DataRng::new(34);
    for (d, format) in [
        (320, KvFormat::Int8 { group: 64 }),
        (256, KvFormat::Int4 { group: 32 }),
        (7, KvFormat::Int4 { group: 7 }),
        (7, KvFormat::F16),
    ] {
        let mut host = KvCache::new(1, 2, d, format)?;
        let mut gpu = KvCache::dense(1, 2, d, format, 4, GPU)?;
        append_both(&mut host, &mut gpu, 70, &mut rng)?;
        assert_same_decode(
            &host,
            &gpu,
            4,
            DType::F32,
            false,
            &mut rng,
            &format!("{format} d {d}"),
        )?;
    }
    Ok(())
}
