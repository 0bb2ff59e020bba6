//! The KV cache: each format's quantization error against its bound, decode attention against a naive
//! f64 softmax over the cache's own dequantized K/V (so the kernel is checked exactly against the
//! format) on every instruction set this CPU has, growth without copying, truncation, memory accounting
//! and the errors bad input gets.

mod common;

use common::{config, DataRng, CPU};
use proptest::prelude::*;
use trit::cpu::matmul::Isa;
use trit::nn::kv_cache::{AttendOptions, KvCache, KvFormat};
use trit::{DType, Result, Tensor};

/// Random rows of `d` values, each row with its own magnitude (10⁻³ to 10²), some rows all zero and
/// some with a single large outlier, so per-row scales differ widely.
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
                _ => rng.normal() * mag,
            };
            v.push(x as f32);
        }
    }
    v
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape.to_vec(), CPU).unwrap()
}

/// softmax(q·kᵀ·scale)·v in f64 with GQA (query head h reads kv head h / (hq / h)) and the cache's
/// causal rule: query i of tq sees positions 0..=len − tq + i.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    (b, hq, tq, d): (usize, usize, usize, usize),
    k: &[f32],
    v: &[f32],
    h: usize,
    len: usize,
    scale: f32,
) -> Vec<f64> {
    let mut out = vec![0f64; b * hq * tq * d];
    for bi in 0..b {
        for qh in 0..hq {
            let kv = bi * h + qh / (hq / h);
            for i in 0..tq {
                let row = ((bi * hq + qh) * tq + i) * d;
                let qr = &q[row..row + d];
                let seen = len - tq + i + 1;
                let scores: Vec<f64> = (0..seen)
                    .map(|t| {
                        let kr = &k[(kv * len + t) * d..][..d];
                        qr.iter()
                            .zip(kr)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (t, w) in e.iter().enumerate() {
                    let vr = &v[(kv * len + t) * d..][..d];
                    for j in 0..d {
                        out[row + j] += w / z * vr[j] as f64;
                    }
                }
            }
        }
    }
    out
}

fn formats(d: usize, pick: usize) -> KvFormat {
    let divisors: Vec<usize> = (1..=d).filter(|&g| d.is_multiple_of(g)).collect();
    // The largest group (per token, LLM-QAT's setting) half the time.
    let group = if pick.is_multiple_of(2) {
        d
    } else {
        divisors[(pick / 2) % divisors.len()]
    };
    match pick % 4 {
        0 => KvFormat::Int4 { group },
        1 => KvFormat::Int8 { group },
        2 => KvFormat::F16,
        _ => KvFormat::F32,
    }
}

const DIMS: [usize; 8] = [2, 8, 16, 24, 40, 64, 72, 128];

/// Largest |x − x̂| allowed for element x of a group whose max magnitude is `amax`.
fn bound(format: KvFormat, x: f32, amax: f32) -> f64 {
    let qmax = match format {
        KvFormat::F32 => return 0.0,
        // Half a unit in the last place of f16 (2⁻¹¹ relative), or half the subnormal spacing.
        KvFormat::F16 => return (x.abs() as f64 * 2f64.powi(-11)).max(2f64.powi(-25)),
        KvFormat::Int8 { .. } => 127.0,
        KvFormat::Int4 { .. } => 7.0,
    };
    let s = amax as f64 / qmax;
    // The stored scale is s rounded up to f16: at most 2⁻¹⁰ relative above it in f16's normal range,
    // one subnormal step (2⁻²⁴) above it below that.
    let stored = if s >= 2f64.powi(-14) {
        s * (1.0 + 2f64.powi(-10))
    } else {
        s + 2f64.powi(-24)
    };
    // Half a step, plus the f32 rounding of x / scale (at most qmax ulps of a code).
    stored * (0.5 + qmax * 2f64.powi(-24))
}

proptest! {
    #![proptest_config(config(48))]

    /// Every element of every format is within its bound of the original.
    #[test]
    fn quantization_error_is_within_the_format_bound(
        dims in (0usize..DIMS.len()),
        pick in 0usize..64,
        (b, h, n) in (1usize..=2, 1usize..=3, 1usize..=12),
        seed in any::<u64>(),
    ) {
        let d = DIMS[dims];
        let format = formats(d, pick);
        let mut rng = DataRng::new(seed);
        let shape = [b, h, n, d];
        let (k, v) = (rows(b * h * n, d, &mut rng), rows(b * h * n, d, &mut rng));
        let mut cache = KvCache::new(b, h, d, format).unwrap();
        cache.append(&tensor(&k, &shape), &tensor(&v, &shape)).unwrap();
        let group = format.group().unwrap_or(d);
        for (orig, got) in [(&k, cache.dequantize_k().unwrap()), (&v, cache.dequantize_v().unwrap())] {
            prop_assert_eq!(got.dims(), &shape[..]);
            let got = got.to_vec_f32();
            for (g, (xg, yg)) in orig.chunks(group).zip(got.chunks(group)).enumerate() {
                let amax = xg.iter().fold(0f32, |a, x| a.max(x.abs()));
                for (&x, &y) in xg.iter().zip(yg) {
                    let err = (x as f64 - y as f64).abs();
                    prop_assert!(
                        err <= bound(format, x, amax),
                        "{format}, d {d}, group #{g}: {x} decoded as {y}, error {err:e} over the bound {:e} \
                         (group max {amax})",
                        bound(format, x, amax)
                    );
                }
            }
        }
    }

    /// `attend` equals softmax(q·kᵀ·scale)·v computed in f64 from the cache's own dequantized K/V, for
    /// every ISA, with and without forced split-K chunks, for single-token decode and prefill chunks.
    #[test]
    fn attend_matches_the_f64_reference_on_every_isa(
        (b, h, rep) in (1usize..=2, 1usize..=3, prop::sample::select(vec![1usize, 2, 3, 4])),
        dims in (0usize..DIMS.len()),
        pick in 0usize..64,
        appends in prop::collection::vec(1usize..=24, 1..=4),
        tq_pick in 0usize..8,
        chunk in prop::option::of(1usize..=9),
        seed in any::<u64>(),
    ) {
        let d = DIMS[dims];
        let format = formats(d, pick);
        let mut rng = DataRng::new(seed);
        let mut cache = KvCache::new(b, h, d, format).unwrap();
        for &n in &appends {
            let shape = [b, h, n, d];
            let (k, v) = (rows(b * h * n, d, &mut rng), rows(b * h * n, d, &mut rng));
            cache.append(&tensor(&k, &shape), &tensor(&v, &shape)).unwrap();
        }
        let len: usize = appends.iter().sum();
        prop_assert_eq!(cache.len(), len);
        // Half the cases decode one token, the rest attend with a chunk of the last tokens.
        let tq = if tq_pick < 4 { 1 } else { 1 + tq_pick % len.min(6) };
        let hq = h * rep;
        let q: Vec<f32> = (0..b * hq * tq * d).map(|_| rng.normal() as f32).collect();
        let qt = tensor(&q, &[b, hq, tq, d]);
        let scale = 1.0 / (d as f32).sqrt();
        let (k, v) = (cache.dequantize_k().unwrap().to_vec_f32(), cache.dequantize_v().unwrap().to_vec_f32());
        let want = reference(&q, (b, hq, tq, d), &k, &v, h, len, scale);
        let vmax = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
        for isa in Isa::available() {
            let got = cache.attend_with(&qt, scale, AttendOptions { isa, chunk }).unwrap();
            prop_assert_eq!(got.dims(), &[b, hq, tq, d][..]);
            prop_assert!(!got.tracks_grad());
            for (i, (&g, &w)) in got.to_vec_f32().iter().zip(&want).enumerate() {
                prop_assert!(
                    (g as f64 - w).abs() <= 1e-5 * vmax + 1e-5 * w.abs(),
                    "{isa:?} {format} b {b} h {h} hq {hq} tq {tq} len {len} d {d} chunk {chunk:?}: \
                     element {i} is {g}, want {w}"
                );
            }
        }
    }
}

/// A long cache with one kv head: the automatic split-K path (more threads than (batch, head) pairs)
/// against the single-pass result and the reference.
#[test]
fn automatic_split_matches_a_single_pass() -> Result<()> {
    let (d, len) = (64, 3000);
    let mut rng = DataRng::new(7);
    for format in [KvFormat::F32, KvFormat::Int4 { group: 32 }] {
        let mut cache = KvCache::new(1, 1, d, format)?;
        let shape = [1, 1, len, d];
        cache.append(
            &tensor(&rows(len, d, &mut rng), &shape),
            &tensor(&rows(len, d, &mut rng), &shape),
        )?;
        let q: Vec<f32> = (0..4 * d).map(|_| rng.normal() as f32).collect();
        let qt = tensor(&q, &[1, 4, 1, d]);
        let scale = 0.1;
        let auto = cache.attend(&qt, scale)?.to_vec_f32();
        let single = cache
            .attend_with(
                &qt,
                scale,
                AttendOptions {
                    chunk: Some(len),
                    ..AttendOptions::default()
                },
            )?
            .to_vec_f32();
        let (k, v) = (
            cache.dequantize_k()?.to_vec_f32(),
            cache.dequantize_v()?.to_vec_f32(),
        );
        let want = reference(&q, (1, 4, 1, d), &k, &v, 1, len, scale);
        let vmax = v.iter().fold(0f32, |a, x| a.max(x.abs())) as f64;
        for ((&a, &s), &w) in auto.iter().zip(&single).zip(&want) {
            assert!(
                (a as f64 - w).abs() <= 1e-5 * vmax,
                "{format}: split {a}, want {w}"
            );
            assert!(
                (s as f64 - w).abs() <= 1e-5 * vmax,
                "{format}: single {s}, want {w}"
            );
        }
    }
    Ok(())
}

/// Decoding appends without moving the cache: a reserved cache never reallocates, and an unreserved
/// one reallocates O(log n) times over n single-token appends.
#[test]
fn appending_tokens_grows_like_a_vec() -> Result<()> {
    let d = 16;
    let token = |i: usize| tensor(&vec![i as f32; 2 * 3 * d], &[2, 3, 1, d]);
    for format in [
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Int8 { group: 8 },
        KvFormat::Int4 { group: 16 },
    ] {
        let mut reserved = KvCache::with_capacity(2, 3, d, format, 100)?;
        let cap = reserved.capacity();
        assert!(cap >= 100, "{format}: capacity {cap}");
        let mut grown = KvCache::new(2, 3, d, format)?;
        let mut reallocations = 0;
        let mut last = grown.capacity();
        for i in 0..1000 {
            if i < 100 {
                reserved.append(&token(i), &token(i))?;
                assert_eq!(
                    reserved.capacity(),
                    cap,
                    "{format}: reserved cache reallocated"
                );
            }
            grown.append(&token(i), &token(i))?;
            if grown.capacity() != last {
                reallocations += 1;
                last = grown.capacity();
            }
        }
        assert!(
            reallocations <= 16,
            "{format}: {reallocations} reallocations"
        );
        assert_eq!((reserved.len(), grown.len()), (100, 1000));
    }
    Ok(())
}

#[test]
fn truncate_and_clear_keep_a_prefix() -> Result<()> {
    let (b, h, d) = (2, 2, 24);
    let mut rng = DataRng::new(3);
    for format in [
        KvFormat::F16,
        KvFormat::Int8 { group: 24 },
        KvFormat::Int4 { group: 8 },
    ] {
        let mut cache = KvCache::new(b, h, d, format)?;
        let shape = [b, h, 10, d];
        let (k, v) = (rows(b * h * 10, d, &mut rng), rows(b * h * 10, d, &mut rng));
        cache.append(&tensor(&k, &shape), &tensor(&v, &shape))?;
        let before = cache.dequantize_k()?;
        cache.truncate(6);
        assert_eq!(cache.len(), 6);
        assert_eq!(
            cache.dequantize_k()?.to_vec_f32(),
            before.narrow(2, 0, 6)?.to_vec_f32()
        );
        let extra = [b, h, 3, d];
        let (k2, v2) = (rows(b * h * 3, d, &mut rng), rows(b * h * 3, d, &mut rng));
        cache.append(&tensor(&k2, &extra), &tensor(&v2, &extra))?;
        let mut fresh = KvCache::new(b, h, d, format)?;
        fresh.append(
            &tensor(&k, &shape).narrow(2, 0, 6)?,
            &tensor(&v, &shape).narrow(2, 0, 6)?,
        )?;
        fresh.append(&tensor(&k2, &extra), &tensor(&v2, &extra))?;
        assert_eq!(
            cache.dequantize_k()?.to_vec_f32(),
            fresh.dequantize_k()?.to_vec_f32()
        );
        assert_eq!(
            cache.dequantize_v()?.to_vec_f32(),
            fresh.dequantize_v()?.to_vec_f32()
        );
        cache.truncate(100);
        assert_eq!(cache.len(), 9);
        let cap = cache.capacity();
        cache.clear();
        assert!(cache.is_empty() && cache.bytes() == 0);
        assert_eq!(cache.capacity(), cap);
        assert_eq!(cache.dequantize_v()?.dims(), [b, h, 0, d]);
    }
    Ok(())
}

#[test]
fn memory_accounting() -> Result<()> {
    // Bytes of one row (a token of one kv head, K or V alone) at head_dim 64 and 128.
    let table = [
        (KvFormat::F32, [256, 512]),
        (KvFormat::F16, [128, 256]),
        (KvFormat::Int8 { group: 0 }, [66, 130]),
        (KvFormat::Int8 { group: 32 }, [68, 136]),
        (KvFormat::Int4 { group: 0 }, [34, 66]),
        (KvFormat::Int4 { group: 32 }, [36, 72]),
    ];
    for (format, want) in table {
        for (d, row) in [64, 128].into_iter().zip(want) {
            // Group 0 in the table stands for one scale per row.
            let format = match format {
                KvFormat::Int8 { group: 0 } => KvFormat::Int8 { group: d },
                KvFormat::Int4 { group: 0 } => KvFormat::Int4 { group: d },
                f => f,
            };
            assert_eq!(format.row_bytes(d), row, "{format} d {d}");
            let mut cache = KvCache::new(2, 3, d, format)?;
            assert_eq!(cache.bytes_per_token(), 2 * 2 * 3 * row);
            let x = Tensor::zeros((2, 3, 5, d), DType::F32, CPU)?;
            cache.append(&x, &x)?;
            assert_eq!(cache.bytes(), 5 * 2 * 2 * 3 * row);
        }
    }
    Ok(())
}

#[test]
fn query_dtype_is_kept_and_the_result_is_detached() -> Result<()> {
    let mut cache = KvCache::new(1, 2, 8, KvFormat::Int8 { group: 4 })?;
    let x = Tensor::randn((1, 2, 5, 8), 0.0, 1.0, &mut trit::Rng::new(1), CPU)?;
    cache.append(&x, &x)?;
    let q = Tensor::randn((1, 4, 2, 8), 0.0, 1.0, &mut trit::Rng::new(2), CPU)?.var()?;
    let out = cache.attend(&q, 0.3)?;
    assert!(!out.tracks_grad());
    let half = cache.attend(&q.to_dtype(DType::F16)?, 0.3)?;
    assert_eq!(half.dtype(), DType::F16);
    for (a, b) in half.to_vec_f32().iter().zip(out.to_vec_f32()) {
        assert!((a - b).abs() <= 2e-3 * (1.0 + b.abs()), "{a} vs {b}");
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> Result<()> {
    let i4 = |group| KvFormat::Int4 { group };
    assert!(KvCache::new(0, 2, 8, KvFormat::F32).is_err());
    assert!(KvCache::new(1, 0, 8, KvFormat::F32).is_err());
    assert!(KvCache::new(1, 2, 0, KvFormat::F32).is_err());
    assert!(KvCache::new(1, 2, 8, i4(3)).is_err());
    assert!(KvCache::new(1, 2, 8, i4(0)).is_err());
    assert!(KvCache::new(1, 2, 8, KvFormat::Int8 { group: 16 }).is_err());

    let mut cache = KvCache::new(1, 2, 8, i4(4))?;
    let z = |shape: &[usize]| Tensor::zeros(shape.to_vec(), DType::F32, CPU).unwrap();
    let q = z(&[1, 2, 1, 8]);
    let err = cache.attend(&q, 1.0).unwrap_err().to_string();
    assert!(err.contains("len 0"), "{err}");
    let good = z(&[1, 2, 3, 8]);
    for (k, v) in [
        (z(&[1, 2, 3, 8]), z(&[1, 2, 4, 8])),
        (z(&[1, 3, 3, 8]), z(&[1, 3, 3, 8])),
        (z(&[2, 2, 3, 8]), z(&[2, 2, 3, 8])),
        (z(&[1, 2, 3, 6]), z(&[1, 2, 3, 6])),
        (z(&[1, 2, 0, 8]), z(&[1, 2, 0, 8])),
        (z(&[2, 3, 8]), z(&[2, 3, 8])),
    ] {
        let err = cache.append(&k, &v).unwrap_err().to_string();
        assert!(err.contains(&format!("{:?}", k.dims())), "{err}");
        assert!(cache.is_empty());
    }
    let ints = Tensor::zeros((1, 2, 3, 8), DType::I32, CPU)?;
    assert!(cache.append(&ints, &ints).is_err());
    cache.append(&good, &good)?;
    for q in [
        z(&[1, 3, 1, 8]),
        z(&[1, 1, 1, 8]),
        z(&[2, 2, 1, 8]),
        z(&[1, 2, 1, 6]),
        z(&[1, 2, 4, 8]),
        z(&[1, 2, 8]),
    ] {
        let err = cache.attend(&q, 1.0).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{}", q.shape())) || err.contains(&format!("{:?}", q.dims())),
            "{err}"
        );
    }
    assert!(cache.attend(&q, f32::NAN).is_err());
    let zero_chunk = AttendOptions {
        chunk: Some(0),
        ..AttendOptions::default()
    };
    assert!(cache.attend_with(&q, 1.0, zero_chunk).is_err());
    assert!(cache.attend(&q.to_dtype(DType::I32)?, 1.0).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// The dense cache (the GPU's store), run on the CPU against the host cache.

/// A host cache and a dense one on the CPU, fed the same tokens. The dense one starts with room for a
/// single token, so appends also move it into larger buffers.
fn twins(b: usize, h: usize, d: usize, format: KvFormat) -> Result<(KvCache, KvCache)> {
    let dense = KvCache::dense(b, h, d, format, 1, CPU)?;
    assert!(dense.is_dense() && dense.device() == CPU && dense.capacity() == 1);
    Ok((KvCache::new(b, h, d, format)?, dense))
}

/// Appends the same random `n` tokens to both caches, in a layout that is not the dense store's
/// (the [batch, tokens, heads, d] projection output transposed, as attention hands it over).
fn append_both(host: &mut KvCache, dense: &mut KvCache, n: usize, rng: &mut DataRng) -> Result<()> {
    let (b, h, d) = (host.batch(), host.heads(), host.head_dim());
    let mut x =
        || -> Result<Tensor> { tensor(&rows(b * n * h, d, rng), &[b, n, h, d]).transpose(1, 2) };
    let (k, v) = (x()?, x()?);
    host.append(&k, &v)?;
    dense.append(&k, &v)?;
    Ok(())
}

/// Both caches' attention for a random q of `tq` queries, within 1e-5 of the larger |V|.
fn assert_same_attention(
    host: &KvCache,
    dense: &KvCache,
    hq: usize,
    tq: usize,
    rng: &mut DataRng,
) -> Result<()> {
    let (b, d) = (host.batch(), host.head_dim());
    let q = Tensor::from_vec(
        (0..b * hq * tq * d)
            .map(|_| rng.normal() as f32)
            .collect::<Vec<f32>>(),
        (b, hq, tq, d),
        CPU,
    )?;
    let scale = 1.0 / (d as f32).sqrt();
    let (want, got) = (host.attend(&q, scale)?, dense.attend(&q, scale)?);
    assert_eq!(got.dims(), want.dims());
    assert_eq!((got.dtype(), got.device()), (DType::F32, CPU));
    assert!(!got.tracks_grad());
    let vmax = host
        .dequantize_v()?
        .to_vec_f32()
        .iter()
        .fold(0f32, |a, x| a.max(x.abs()));
    for (i, (g, w)) in got.to_vec_f32().iter().zip(want.to_vec_f32()).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * vmax + 1e-5 * w.abs(),
            "{} b {b} hq {hq} kv {} tq {tq} len {}: element {i} is {g}, the host cache gives {w}",
            host.format(),
            host.heads(),
            host.len()
        );
    }
    Ok(())
}

/// Decoding as a model does it: a prefill chunk, single tokens, another chunk, attending after each
/// append with the tokens just appended as the queries (and once with only the last one), for f32 and
/// f16, batch 1 and 2, and query groups of 1, 2 and 3 per kv head.
#[test]
fn the_dense_cache_attends_like_the_host_cache() -> Result<()> {
    let mut rng = DataRng::new(11);
    for format in [KvFormat::F32, KvFormat::F16] {
        for (b, h, d) in [(2, 2, 16), (1, 3, 24), (2, 1, 8)] {
            for group in [1, 2, 3] {
                let (mut host, mut dense) = twins(b, h, d, format)?;
                for n in [5, 1, 1, 1, 3, 1, 7, 1] {
                    append_both(&mut host, &mut dense, n, &mut rng)?;
                    assert_eq!((dense.len(), dense.bytes()), (host.len(), host.bytes()));
                    assert!(dense.capacity() >= dense.len());
                    assert_same_attention(&host, &dense, h * group, n, &mut rng)?;
                    if n > 1 {
                        assert_same_attention(&host, &dense, h * group, 1, &mut rng)?;
                    }
                }
                // The dense cache stores what the host one does: f32 as given, f16 rounded alike.
                assert_eq!(
                    dense.dequantize_k()?.to_vec_f32(),
                    host.dequantize_k()?.to_vec_f32()
                );
                assert_eq!(
                    dense.dequantize_v()?.to_vec_f32(),
                    host.dequantize_v()?.to_vec_f32()
                );
            }
        }
    }
    Ok(())
}

/// The integer formats in a dense cache (the store a GPU int cache uses, run here on the CPU through
/// the same code path) against the host cache: the same codes and scales, so dequantized K and V are
/// exactly equal, and attention within 1e-5; per-row and grouped scales, int4 with an odd head_dim,
/// GQA, batch 2, growth from room for one token, f16 and bf16 inputs, truncation and clearing.
#[test]
fn dense_int_caches_match_host_int_caches() -> Result<()> {
    let mut rng = DataRng::new(21);
    for (b, h, d, g) in [(2, 2, 16, 8), (1, 3, 24, 8), (2, 1, 7, 1), (2, 2, 9, 3)] {
        for format in [
            KvFormat::Int8 { group: d },
            KvFormat::Int4 { group: d },
            KvFormat::Int8 { group: g },
            KvFormat::Int4 { group: g },
        ] {
            let (mut host, mut dense) = twins(b, h, d, format)?;
            let same = |host: &KvCache, dense: &KvCache| -> Result<()> {
                assert_eq!(
                    dense.dequantize_k()?.to_vec_f32(),
                    host.dequantize_k()?.to_vec_f32(),
                    "{format} b {b} h {h} d {d}: K"
                );
                assert_eq!(
                    dense.dequantize_v()?.to_vec_f32(),
                    host.dequantize_v()?.to_vec_f32(),
                    "{format} b {b} h {h} d {d}: V"
                );
                Ok(())
            };
            for n in [5, 1, 1, 3, 1] {
                append_both(&mut host, &mut dense, n, &mut rng)?;
                assert_eq!((dense.len(), dense.bytes()), (host.len(), host.bytes()));
                same(&host, &dense)?;
                for group in [1, 3] {
                    assert_same_attention(&host, &dense, h * group, n, &mut rng)?;
                }
            }
            for dtype in [DType::F16, DType::BF16] {
                let x = tensor(&rows(b * 2 * h, d, &mut rng), &[b, h, 2, d]).to_dtype(dtype)?;
                host.append(&x, &x)?;
                dense.append(&x, &x)?;
                same(&host, &dense)?;
            }
            for c in [&mut host, &mut dense] {
                c.truncate(4);
            }
            append_both(&mut host, &mut dense, 2, &mut rng)?;
            same(&host, &dense)?;
            assert_same_attention(&host, &dense, 2 * h, 2, &mut rng)?;
            for c in [&mut host, &mut dense] {
                c.clear();
            }
            assert_eq!(dense.dequantize_k()?.dims(), [b, h, 0, d]);
            append_both(&mut host, &mut dense, 3, &mut rng)?;
            same(&host, &dense)?;
            assert_same_attention(&host, &dense, h, 1, &mut rng)?;
        }
    }
    Ok(())
}

/// A prefill chunk long enough that the dense cache splits its queries (its scores would pass 2²⁴
/// elements in one pass), against the host cache.
#[test]
fn a_long_dense_prefill_attends_in_slices_of_queries() -> Result<()> {
    let mut rng = DataRng::new(5);
    let (mut host, mut dense) = twins(1, 8, 8, KvFormat::F32)?;
    append_both(&mut host, &mut dense, 100, &mut rng)?;
    append_both(&mut host, &mut dense, 1000, &mut rng)?;
    // 16 query heads × 1000 queries × 1100 keys = 17.6 M scores > 2²⁴: two slices of queries.
    assert_same_attention(&host, &dense, 16, 1000, &mut rng)
}

#[test]
fn the_dense_cache_truncates_clears_and_reserves_like_the_host_cache() -> Result<()> {
    let mut rng = DataRng::new(8);
    for format in [KvFormat::F32, KvFormat::F16] {
        let (mut host, mut dense) = twins(2, 2, 16, format)?;
        append_both(&mut host, &mut dense, 10, &mut rng)?;
        let before = dense.dequantize_k()?;
        for c in [&mut host, &mut dense] {
            c.truncate(6);
            assert_eq!(c.len(), 6);
        }
        assert_eq!(
            dense.dequantize_k()?.to_vec_f32(),
            before.narrow(2, 0, 6)?.to_vec_f32()
        );
        // The next tokens overwrite the dropped ones.
        append_both(&mut host, &mut dense, 3, &mut rng)?;
        assert_eq!(
            dense.dequantize_v()?.to_vec_f32(),
            host.dequantize_v()?.to_vec_f32()
        );
        assert_same_attention(&host, &dense, 4, 3, &mut rng)?;
        // The copy returned earlier kept its values.
        assert_eq!(before.dims(), [2, 2, 10, 16]);
        dense.truncate(100);
        assert_eq!(dense.len(), 9);
        let cap = dense.capacity();
        dense.clear();
        assert!(dense.is_empty() && dense.bytes() == 0);
        assert_eq!(dense.capacity(), cap);
        assert_eq!(dense.dequantize_k()?.dims(), [2, 2, 0, 16]);
        dense.reserve(100)?;
        let cap = dense.capacity();
        assert!(cap >= 100, "capacity {cap}");
        host.clear();
        for n in [4, 1, 1] {
            append_both(&mut host, &mut dense, n, &mut rng)?;
            assert_eq!(dense.capacity(), cap, "a reserved dense cache reallocated");
            assert_same_attention(&host, &dense, 2, n, &mut rng)?;
        }
    }
    Ok(())
}

/// Appending one token at a time moves a dense cache O(log n) times, and a clone does not see the
/// original's later appends (they are written in place).
#[test]
fn the_dense_cache_grows_by_doubling_and_clones_are_independent() -> Result<()> {
    let d = 8;
    let token = |i: usize| tensor(&vec![i as f32; 2 * 3 * d], &[2, 3, 1, d]);
    let mut cache = KvCache::dense(2, 3, d, KvFormat::F32, 1, CPU)?;
    let (mut moves, mut last) = (0, cache.capacity());
    for i in 0..1000 {
        cache.append(&token(i), &token(i))?;
        if cache.capacity() != last {
            moves += 1;
            last = cache.capacity();
        }
    }
    assert!(moves <= 10, "{moves} reallocations");
    cache.truncate(4);
    let copy = cache.clone();
    cache.append(&token(77), &token(77))?;
    cache.truncate(4);
    cache.append(&token(99), &token(99))?;
    assert_eq!(copy.len(), 4);
    let k = cache.dequantize_k()?.to_vec_f32();
    assert!(k[4 * d..5 * d].iter().all(|&x| x == 99.0));
    // The clone holds tokens 0..4 as they were, then its own fifth.
    let mut copy = copy;
    copy.append(&token(5), &token(5))?;
    let k = copy.dequantize_k()?.to_vec_f32();
    let want = [0.0, 1.0, 2.0, 3.0, 5.0];
    assert!(k[..5 * d]
        .iter()
        .enumerate()
        .all(|(i, &x)| x == want[i / d]));
    Ok(())
}

#[test]
fn the_dense_cache_keeps_the_query_dtype_and_detaches() -> Result<()> {
    let mut cache = KvCache::dense(1, 2, 8, KvFormat::F16, 4, CPU)?;
    let x = Tensor::randn((1, 2, 5, 8), 0.0, 1.0, &mut trit::Rng::new(1), CPU)?;
    cache.append(&x.to_dtype(DType::BF16)?, &x)?;
    let q = Tensor::randn((1, 4, 2, 8), 0.0, 1.0, &mut trit::Rng::new(2), CPU)?.var()?;
    let out = cache.attend(&q, 0.3)?;
    assert!(!out.tracks_grad());
    for dtype in [DType::F16, DType::BF16] {
        let low = cache.attend(&q.to_dtype(dtype)?, 0.3)?;
        assert_eq!(low.dtype(), dtype);
        for (a, b) in low.to_vec_f32().iter().zip(out.to_vec_f32()) {
            assert!(
                (a - b).abs() <= 1e-2 * (1.0 + b.abs()),
                "{dtype}: {a} vs {b}"
            );
        }
    }
    Ok(())
}

#[test]
fn bad_input_to_the_dense_cache_is_an_error() -> Result<()> {
    // The integer formats are dense caches too (the GPU's int store, here its CPU twin); the host
    // cache still holds them on the CPU, and a group must still divide head_dim.
    for format in [KvFormat::Int8 { group: 8 }, KvFormat::Int4 { group: 4 }] {
        assert!(KvCache::dense(1, 2, 8, format, 4, CPU)?.is_dense());
        assert!(!KvCache::on_device(1, 2, 8, format, 4, CPU)?.is_dense());
    }
    for format in [KvFormat::Int8 { group: 3 }, KvFormat::Int4 { group: 0 }] {
        assert!(KvCache::dense(1, 2, 8, format, 4, CPU).is_err());
    }
    // A GPU this build or machine does not have is the device's error, not a panic.
    if trit::Device::Cuda(0).check().is_err() {
        assert!(KvCache::on_device(1, 2, 8, KvFormat::F32, 4, trit::Device::Cuda(0)).is_err());
    }
    assert!(KvCache::dense(0, 2, 8, KvFormat::F32, 4, CPU).is_err());
    assert!(KvCache::dense(1, 2, 0, KvFormat::F16, 4, CPU).is_err());

    let mut cache = KvCache::dense(1, 2, 8, KvFormat::F32, 2, CPU)?;
    let z = |shape: &[usize]| Tensor::zeros(shape.to_vec(), DType::F32, CPU).unwrap();
    let q = z(&[1, 2, 1, 8]);
    let err = cache.attend(&q, 1.0).unwrap_err().to_string();
    assert!(err.contains("len 0"), "{err}");
    for (k, v) in [
        (z(&[1, 2, 3, 8]), z(&[1, 2, 4, 8])),
        (z(&[1, 3, 3, 8]), z(&[1, 3, 3, 8])),
        (z(&[2, 2, 3, 8]), z(&[2, 2, 3, 8])),
        (z(&[1, 2, 3, 6]), z(&[1, 2, 3, 6])),
        (z(&[1, 2, 0, 8]), z(&[1, 2, 0, 8])),
        (z(&[2, 3, 8]), z(&[2, 3, 8])),
    ] {
        let err = cache.append(&k, &v).unwrap_err().to_string();
        assert!(err.contains(&format!("{:?}", k.dims())), "{err}");
        assert!(cache.is_empty() && cache.capacity() == 2);
    }
    let ints = Tensor::zeros((1, 2, 3, 8), DType::I32, CPU)?;
    assert!(cache.append(&ints, &ints).is_err());
    cache.append(&z(&[1, 2, 3, 8]), &z(&[1, 2, 3, 8]))?;
    for q in [
        z(&[1, 3, 1, 8]),
        z(&[2, 2, 1, 8]),
        z(&[1, 2, 4, 8]),
        z(&[1, 2, 8]),
    ] {
        assert!(cache.attend(&q, 1.0).is_err());
    }
    assert!(cache.attend(&q, f32::INFINITY).is_err());
    assert!(cache.attend(&q.to_dtype(DType::I32)?, 1.0).is_err());
    Ok(())
}
