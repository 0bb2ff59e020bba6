//! Flash attention's memory is O(S·d), not O(S²): at S = 16,384 (d = 64, one head) the score matrix
//! alone would be 1 GiB in f32, and the forward and backward passes together must stay under 64 MiB of
//! heap beyond their inputs. A counting global allocator measures the peak.
//!
//! This binary holds a single #[test] on purpose: the allocator counts every thread's allocations, so a
//! second test running concurrently would inflate the peak.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;
use trit::ops::attention::AttentionOptions;
use trit::{Device, Result, Rng, Tensor};

/// `System`, counting the bytes currently allocated and the most ever allocated at once.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only updates
// counters on the side, so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts a new measurement: the peak drops to the current usage, which is returned as the baseline.
fn reset_peak() -> usize {
    let now = CURRENT.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

const MIB: f64 = (1 << 20) as f64;

/// Row i of causal attention (it sees keys 0..=i), in f64, with the gradients the loss Σ o ∘ r sends
/// to q_i and, from row i alone, to k_i and v_i; beside each value the magnitude that bounds its f32
/// rounding (the sum of the absolute values of its terms, as in tests/flash_attention.rs).
struct Row {
    o: (Vec<f64>, Vec<f64>),
    dq: (Vec<f64>, Vec<f64>),
    dk_own: (Vec<f64>, Vec<f64>),
    dv_own: (Vec<f64>, Vec<f64>),
}

fn row_reference(i: usize, d: usize, q: &[f32], k: &[f32], v: &[f32], r: &[f32]) -> Row {
    let scale = (1.0 / (d as f32).sqrt()) as f64;
    let row =
        |x: &[f32], j: usize| -> Vec<f64> { x[j * d..][..d].iter().map(|&a| a as f64).collect() };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let abs_dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum::<f64>();
    let (qi, ri) = (row(q, i), row(r, i));
    let (ks, vs): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (0..=i).map(|j| (row(k, j), row(v, j))).unzip();
    let s: Vec<f64> = ks.iter().map(|kj| scale * dot(&qi, kj)).collect();
    // A score's f32 rounding error is about ε · (1 + scale · Σ|q_c k_jc|).
    let sigma: Vec<f64> = ks.iter().map(|kj| 1.0 + scale * abs_dot(&qi, kj)).collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|e| e / z).collect();
    let (mut o, mut o_mag) = (vec![0.0; d], vec![0.0; d]);
    for (j, vj) in vs.iter().enumerate() {
        for c in 0..d {
            o[c] += p[j] * vj[c];
            o_mag[c] += p[j] * sigma[j] * vj[c].abs();
        }
    }
    let dp: Vec<f64> = vs.iter().map(|vj| dot(&ri, vj)).collect();
    let dsum = dot(&p, &dp);
    let ro: f64 = ri.iter().zip(&o_mag).map(|(a, m)| a.abs() * m).sum();
    let ds: Vec<f64> = (0..=i).map(|j| p[j] * (dp[j] - dsum)).collect();
    let ds_mag: Vec<f64> = (0..=i)
        .map(|j| p[j] * (sigma[j] * (dp[j] - dsum).abs() + abs_dot(&ri, &vs[j]) + ro))
        .collect();
    let (mut dq, mut dq_mag) = (vec![0.0; d], vec![0.0; d]);
    for (j, kj) in ks.iter().enumerate() {
        for c in 0..d {
            dq[c] += scale * ds[j] * kj[c];
            dq_mag[c] += scale * ds_mag[j] * kj[c].abs();
        }
    }
    Row {
        o: (o, o_mag),
        dq: (dq, dq_mag),
        dk_own: (
            qi.iter().map(|&x| scale * ds[i] * x).collect(),
            qi.iter().map(|&x| scale * ds_mag[i] * x.abs()).collect(),
        ),
        dv_own: (
            ri.iter().map(|&x| p[i] * x).collect(),
            ri.iter().map(|&x| p[i] * sigma[i] * x.abs()).collect(),
        ),
    }
}

fn assert_close(what: &str, got: &[f32], (want, mag): &(Vec<f64>, Vec<f64>)) {
    for (c, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        // 1e-5 of the terms' magnitude (~170 ε): row 16,383 sums 16,384 keys over 256 blocks.
        let tol = 1e-5 * (w.abs() + m);
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{c}] is {g}, want {w} (tolerance {tol:e})"
        );
    }
}

/// Causal attention at S = 16,384, d = 64: the forward pass and the forward and backward passes
/// together each allocate under 64 MiB beyond their inputs (the S × S scores would be 1 GiB), and the
/// results are right at rows 0, 1 and S − 1.
#[test]
fn sixteen_thousand_tokens_fit_in_64_mib() -> Result<()> {
    let (s, d) = (16_384, 64);
    // The backward splits each (batch, kv head)'s key blocks over about 2 × threads tasks, each with a
    // private q-sized dQ, when there are fewer pairs than threads, so its memory grows by 2 × |q| per
    // thread (here 8 MiB: 40.6 MiB at 2 threads, 89 MiB at 8, 154 MiB at 16). A fixed pool of 2 threads
    // keeps the measurement the same on every machine; ATTN_MEM_THREADS=n measures another size.
    let threads: usize = std::env::var("ATTN_MEM_THREADS").map_or(2, |t| t.parse().unwrap());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut rng = Rng::new(2024);
    let shape = (1, s, 1, d);
    let q = Tensor::randn(shape, 0.0, 1.0, &mut rng, Device::Cpu)?.var()?;
    let k = Tensor::randn(shape, 0.0, 1.0, &mut rng, Device::Cpu)?.var()?;
    let v = Tensor::randn(shape, 0.0, 1.0, &mut rng, Device::Cpu)?.var()?;
    let r = Tensor::randn(shape, 0.0, 1.0, &mut rng, Device::Cpu)?;
    let opts = AttentionOptions {
        causal: true,
        ..Default::default()
    };
    // Warm up once on a tiny problem so one-time allocations (the pool's threads, ISA detection) are not
    // counted.
    pool.install(|| -> Result<()> {
        let x = Tensor::randn((1, 8, 1, d), 0.0, 1.0, &mut Rng::new(1), Device::Cpu)?.var()?;
        x.flash_attention(&x, &x, &opts)?.sum_all()?.backward()?;
        Ok(())
    })?;

    let inputs_mib = 4.0 * (s * d * 4) as f64 / MIB;
    let base = reset_peak();
    let t0 = Instant::now();
    let o = pool.install(|| q.flash_attention(&k, &v, &opts))?;
    let forward_s = t0.elapsed().as_secs_f64();
    let forward_extra = PEAK.load(Relaxed) - base;
    let t1 = Instant::now();
    let grads = pool.install(|| o.mul(&r)?.sum_all()?.backward())?;
    let backward_s = t1.elapsed().as_secs_f64();
    let total_extra = PEAK.load(Relaxed) - base;
    println!(
        "S {s}, d {d}, causal, {threads} threads: inputs (q, k, v, r) {inputs_mib:.1} MiB; peak extra heap \
         {:.1} MiB forward ({forward_s:.2} s), {:.1} MiB forward + backward ({backward_s:.2} s backward); \
         the S × S scores alone would be {:.0} MiB",
        forward_extra as f64 / MIB,
        total_extra as f64 / MIB,
        (s * s * 4) as f64 / MIB
    );
    let limit = 64 << 20;
    assert!(
        forward_extra < limit,
        "forward used {:.1} MiB",
        forward_extra as f64 / MIB
    );
    assert!(
        total_extra < limit,
        "forward + backward used {:.1} MiB",
        total_extra as f64 / MIB
    );

    let (qv, kv, vv, rv) = (
        q.to_vec_f32(),
        k.to_vec_f32(),
        v.to_vec_f32(),
        r.to_vec_f32(),
    );
    let out = o.to_vec_f32();
    let g = |t: &Tensor| grads.get(t).expect("a gradient").to_vec_f32();
    let (dq, dk, dv) = (g(&q), g(&k), g(&v));
    for (name, x) in [("o", &out), ("dq", &dq), ("dk", &dk), ("dv", &dv)] {
        assert!(x.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    for i in [0, 1, s - 1] {
        let want = row_reference(i, d, &qv, &kv, &vv, &rv);
        let at = |x: &[f32]| x[i * d..][..d].to_vec();
        assert_close(&format!("o row {i}"), &at(&out), &want.o);
        assert_close(&format!("dq row {i}"), &at(&dq), &want.dq);
        if i == s - 1 {
            // The last key is seen by the last row only.
            assert_close("dk of the last key", &at(&dk), &want.dk_own);
            assert_close("dv of the last key", &at(&dv), &want.dv_own);
        }
    }
    Ok(())
}
