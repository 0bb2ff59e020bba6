//! Attention throughput for `trit bench attention`: trit's fused flash attention against the naive
//! formulation built from primitive ops (the score matrix materialised), forward and forward + backward,
//! in the same run; the target row next to PyTorch SDPA's figure from anchors.md; and decode attention
//! over a KV cache in each cache format.
//!
//! FLOPs follow FlashAttention's convention: forward = 4·B·H·S_q·S_k·d, halved when causal; forward +
//! backward = 3.5 × forward. The naive path is credited with the same FLOPs (it computes the masked half of
//! a causal score matrix too, and gets no credit for it). Forward is timed on plain tensors (no graph);
//! forward + backward on variables, as one timing of `o = attention(q, k, v)` followed by
//! `sum(o ∘ r).backward()` for a fixed random r.
//!
//! Decode attention caches rotate through enough copies (one per "layer") to exceed the last-level cache,
//! as qbench's weights do, so each step streams its cache from memory as decoding a real model does.

use std::time::Instant;

use serde_json::{json, Value};
use trit::cpu::matmul::Isa;
use trit::nn::kv_cache::{KvCache, KvFormat};
use trit::ops::attention::AttentionOptions;
use trit::{Device, Result, Rng, Tensor};

/// PyTorch SDPA, causal forward, batch 1 × 8 heads, S = 2048, d = 64, on this 2-core CPU
/// (/work/shared/anchors.md; not measured by this benchmark).
pub const PYTORCH_SDPA_CAUSAL_FWD_GFLOPS: f64 = 136.0;

/// Bytes of KV cache cycled through per decode measurement: twice the 260 MiB L3 of the development
/// machine (as in qbench).
const ROTATE_BYTES: usize = 520 << 20;

/// Naive attention is measured up to this sequence length; its [heads, S, S] scores exceed memory beyond.
const NAIVE_MAX_SEQ: usize = 4096;

/// Decode shape: batch 1, 32 query heads sharing 8 kv heads of d = 128 (Llama-3-8B's attention).
pub const DECODE_BATCH: usize = 1;
pub const DECODE_Q_HEADS: usize = 32;
pub const DECODE_KV_HEADS: usize = 8;
pub const DECODE_HEAD_DIM: usize = 128;

/// Which computation a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    /// The forward and the backward of sum(o ∘ r), one timing.
    ForwardBackward,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::ForwardBackward => "fwd+bwd",
        }
    }

    /// FLOPs of this pass relative to the forward.
    fn flop_factor(self) -> f64 {
        match self {
            Pass::Forward => 1.0,
            Pass::ForwardBackward => 3.5,
        }
    }
}

/// One measured attention problem: batch 1, `heads` query and kv heads, q_len = kv_len = `seq`.
#[derive(Clone, Debug)]
pub struct AttnRow {
    pub seq: usize,
    pub head_dim: usize,
    pub heads: usize,
    pub causal: bool,
    pub pass: Pass,
    pub flops: f64,
    pub flash_ms: f64,
    pub flash_gflops: f64,
    /// `None` where the naive scores would not fit (S > 4k).
    pub naive_ms: Option<f64>,
    pub naive_gflops: Option<f64>,
    /// Timed repetitions (after one warm-up call of each).
    pub reps: usize,
}

impl AttnRow {
    /// Flash time / naive time.
    pub fn speedup(&self) -> Option<f64> {
        self.naive_ms.map(|n| n / self.flash_ms)
    }

    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq, "head_dim": self.head_dim, "heads": self.heads, "batch": 1,
            "causal": self.causal, "pass": self.pass.name(), "gflop": self.flops / 1e9,
            "trit_ms": self.flash_ms, "trit_gflops": self.flash_gflops,
            "naive_ms": self.naive_ms, "naive_gflops": self.naive_gflops,
            "speedup_vs_naive": self.speedup(), "reps": self.reps,
        })
    }
}

/// One decode step: one query token per sequence attending to an `len`-token cache.
#[derive(Clone, Debug)]
pub struct DecodeRow {
    pub len: usize,
    pub format: KvFormat,
    /// Microseconds per token for one layer's attention.
    pub micros: f64,
    /// K and V bytes of one layer's cache, scales included (what one step reads).
    pub kv_bytes: usize,
    pub gbs: f64,
    /// Cache copies rotated through.
    pub copies: usize,
}

pub struct AttnBench {
    pub threads: usize,
    pub isa: Isa,
    pub quick: bool,
    pub rows: Vec<AttnRow>,
    /// Causal forward at the anchor's shape (S = 2048, d = 64, 8 heads; S = 512 with `quick`).
    pub target: AttnRow,
    pub decode: Vec<DecodeRow>,
}

impl AttnBench {
    /// trit's target-row GFLOP/s over PyTorch SDPA's 136 (anchors.md).
    pub fn target_ratio(&self) -> f64 {
        self.target.flash_gflops / PYTORCH_SDPA_CAUSAL_FWD_GFLOPS
    }

    pub fn to_json(&self) -> Value {
        json!({
            "threads": self.threads,
            "isa": format!("{:?}", self.isa),
            "quick": self.quick,
            "flop_convention": "fwd = 4·B·H·S²·d (halved when causal); fwd+bwd = 3.5 × fwd",
            "rows": self.rows.iter().map(AttnRow::to_json).collect::<Vec<_>>(),
            "target": {
                "row": self.target.to_json(),
                "pytorch_sdpa_gflops": PYTORCH_SDPA_CAUSAL_FWD_GFLOPS,
                "pytorch_sdpa_source": "anchors.md (not measured here)",
                "ratio_vs_pytorch": self.target_ratio(),
            },
            "decode": {
                "batch": DECODE_BATCH, "q_heads": DECODE_Q_HEADS,
                "kv_heads": DECODE_KV_HEADS, "head_dim": DECODE_HEAD_DIM,
                "rows": self.decode.iter().map(|r| json!({
                    "len": r.len, "format": r.format.to_string(), "us_per_token": r.micros,
                    "kv_bytes": r.kv_bytes, "gbs": r.gbs, "copies": r.copies,
                })).collect::<Vec<_>>(),
            },
        })
    }

    /// The report printed by `trit bench attention`.
    pub fn table(&self) -> String {
        let mut s = format!(
            "attention, batch 1, q_len = kv_len = S, {} threads, {:?}; GFLOP/s by FlashAttention's count \
             (fwd 4·H·S²·d, halved when causal; fwd+bwd 3.5 × fwd)\n\
             trit = fused flash attention; naive = q·kᵀ → softmax → ·v with the [H, S, S] scores stored \
             (not run beyond S = {}: —); same run, alternating\n",
            self.threads, self.isa, NAIVE_MAX_SEQ
        );
        s += &format!(
            "{:>6} {:>4} {:>5} {:<7} {:<8} {:>10} {:>8} {:>10} {:>8} {:>8}\n",
            "S",
            "d",
            "heads",
            "mask",
            "pass",
            "trit ms",
            "GFLOP/s",
            "naive ms",
            "GFLOP/s",
            "vs naive"
        );
        for r in &self.rows {
            s += &row_line(r);
        }
        let t = &self.target;
        s += &format!(
            "\ntarget: causal fwd, batch 1 × {} heads, S = {}, d = {} (median of {})\n",
            t.heads, t.seq, t.head_dim, t.reps
        );
        s += &format!(
            "  trit          {:>8.2} ms {:>8.1} GFLOP/s\n",
            t.flash_ms, t.flash_gflops
        );
        if let (Some(ms), Some(g)) = (t.naive_ms, t.naive_gflops) {
            s += &format!("  naive         {ms:>8.2} ms {g:>8.1} GFLOP/s\n");
        }
        s += &format!(
            "  PyTorch SDPA  {:>11} {:>8.1} GFLOP/s  (anchors.md, same CPU, S = 2048: a reference, not \
             measured here)\n",
            "", PYTORCH_SDPA_CAUSAL_FWD_GFLOPS
        );
        s += &format!(
            "  trit / naive  {:>20.2}×\n  trit / 136    {:>20.2}×\n",
            t.speedup().unwrap_or(f64::NAN),
            self.target_ratio()
        );
        s += &format!(
            "\ndecode attention, one layer: batch {DECODE_BATCH}, {DECODE_Q_HEADS} q heads, \
             {DECODE_KV_HEADS} kv heads, d = {DECODE_HEAD_DIM}; one query token against an L-token cache, \
             caches rotated past the L3\n"
        );
        s += &format!(
            "{:>6}  {:<9} {:>12} {:>10} {:>8} {:>7}\n",
            "L", "KV format", "µs / token", "KV MB", "GB/s", "copies"
        );
        for r in &self.decode {
            s += &format!(
                "{:>6}  {:<9} {:>12.1} {:>10.2} {:>8.1} {:>7}\n",
                r.len,
                r.format.to_string(),
                r.micros,
                r.kv_bytes as f64 / 1e6,
                r.gbs,
                r.copies
            );
        }
        s
    }
}

fn row_line(r: &AttnRow) -> String {
    let dash = |x: Option<f64>, prec: usize| x.map_or("—".to_string(), |x| format!("{x:.prec$}"));
    format!(
        "{:>6} {:>4} {:>5} {:<7} {:<8} {:>10.2} {:>8.1} {:>10} {:>8} {:>8}\n",
        r.seq,
        r.head_dim,
        r.heads,
        if r.causal { "causal" } else { "full" },
        r.pass.name(),
        r.flash_ms,
        r.flash_gflops,
        dash(r.naive_ms, 2),
        dash(r.naive_gflops, 1),
        r.speedup().map_or("—".to_string(), |x| format!("{x:.2}×")),
    )
}

/// Query heads measured at each sequence length: 8 up to 4k, fewer at 16k so the full run takes about
/// two to three minutes on 2 cores.
fn heads_at(seq: usize) -> usize {
    if seq > 4096 {
        1
    } else {
        8
    }
}

/// Runs the benchmark; `quick` uses S ≤ 512, L ≤ 1k and two repetitions (a smoke test for CI).
pub fn bench_attention(quick: bool) -> Result<AttnBench> {
    let seqs: &[usize] = if quick {
        &[256, 512]
    } else {
        &[1024, 4096, 16384]
    };
    let mut rows = Vec::new();
    for &seq in seqs {
        for head_dim in [64, 128] {
            for causal in [true, false] {
                for pass in [Pass::Forward, Pass::ForwardBackward] {
                    rows.push(bench_problem(
                        seq,
                        head_dim,
                        heads_at(seq),
                        causal,
                        pass,
                        quick,
                    )?);
                }
            }
        }
    }
    let target = bench_problem(
        if quick { 512 } else { 2048 },
        64,
        8,
        true,
        Pass::Forward,
        quick,
    )?;
    let lens: &[usize] = if quick { &[256, 1024] } else { &[4096, 32768] };
    let formats = [
        KvFormat::F32,
        KvFormat::F16,
        KvFormat::Int8 {
            group: DECODE_HEAD_DIM,
        },
        KvFormat::Int4 { group: 32 },
    ];
    let mut decode = Vec::new();
    for &len in lens {
        for format in formats {
            decode.push(bench_decode(len, format, quick)?);
        }
    }
    Ok(AttnBench {
        threads: rayon::current_num_threads(),
        isa: Isa::best(),
        quick,
        rows,
        target,
        decode,
    })
}

/// softmax(q·kᵀ/√d [+ causal mask])·v from primitive ops, over q, k, v [batch, S, heads, d] (the plain
/// attention of `trit::nn::attention`: heads moved in front, the [batch, heads, S, S] scores stored).
/// Returns [batch, S, heads, d], contiguous like the flash output.
pub fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let d = q.dims()[3];
    let q = q
        .transpose(1, 2)?
        .mul_scalar(1.0 / (d as f32).sqrt())?
        .contiguous()?;
    let k = k.transpose(1, 2)?;
    let v = v.transpose(1, 2)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = if causal {
        scores.causal_softmax()?
    } else {
        scores.softmax(-1)?
    };
    probs.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// Times flash (and, up to S = 4k, naive) attention on one problem, alternating the two.
fn bench_problem(
    seq: usize,
    head_dim: usize,
    heads: usize,
    causal: bool,
    pass: Pass,
    quick: bool,
) -> Result<AttnRow> {
    let mut rng = Rng::new((seq as u64) ^ ((head_dim as u64) << 32));
    let shape = (1, seq, heads, head_dim);
    let mut randn = || Tensor::randn(shape, 0.0, 1.0, &mut rng, Device::Cpu);
    let (q, k, v, r) = (randn()?, randn()?, randn()?, randn()?);
    let vars = match pass {
        Pass::Forward => [q.clone(), k.clone(), v.clone()],
        Pass::ForwardBackward => [q.var()?, k.var()?, v.var()?],
    };
    let opts = AttentionOptions {
        causal,
        ..Default::default()
    };
    let flops = 4.0
        * (heads * seq * seq * head_dim) as f64
        * if causal { 0.5 } else { 1.0 }
        * pass.flop_factor();

    // One timed call: the attention, and for fwd+bwd the backward of sum(o ∘ r). Freeing the results
    // (graph, gradients) happens after the clock stops.
    let timed = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| -> Result<f64> {
        let [q, k, v] = &vars;
        let start = Instant::now();
        let o = f(q, k, v)?;
        let grads = match pass {
            Pass::Forward => None,
            Pass::ForwardBackward => Some(o.mul(&r)?.sum_all()?.backward()?),
        };
        let s = start.elapsed().as_secs_f64();
        drop((o, grads));
        Ok(s)
    };
    let flash = |q: &Tensor, k: &Tensor, v: &Tensor| q.flash_attention(k, v, &opts);
    let naive = |q: &Tensor, k: &Tensor, v: &Tensor| naive_attention(q, k, v, causal);
    let with_naive = seq <= NAIVE_MAX_SEQ;

    // One warm-up call each; its time sets the repetitions: about 1.5 s of both (quick: 2 reps).
    let warm = timed(&flash)? + if with_naive { timed(&naive)? } else { 0.0 };
    let reps = if quick {
        2
    } else {
        ((1.5 / warm) as usize).clamp(3, 50)
    };
    let (mut flash_s, mut naive_s) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        flash_s.push(timed(&flash)?);
        if with_naive {
            naive_s.push(timed(&naive)?);
        }
    }
    let flash_t = median(flash_s);
    let naive_t = with_naive.then(|| median(naive_s));
    Ok(AttnRow {
        seq,
        head_dim,
        heads,
        causal,
        pass,
        flops,
        flash_ms: flash_t * 1e3,
        flash_gflops: flops / flash_t / 1e9,
        naive_ms: naive_t.map(|t| t * 1e3),
        naive_gflops: naive_t.map(|t| flops / t / 1e9),
        reps,
    })
}

/// µs per decode step of one query token (all q heads) against a `len`-token cache in `format`.
fn bench_decode(len: usize, format: KvFormat, quick: bool) -> Result<DecodeRow> {
    let (b, hq, hkv, d) = (
        DECODE_BATCH,
        DECODE_Q_HEADS,
        DECODE_KV_HEADS,
        DECODE_HEAD_DIM,
    );
    let mut rng = Rng::new(len as u64);
    let k = Tensor::randn((b, hkv, len, d), 0.0, 1.0, &mut rng, Device::Cpu)?;
    let v = Tensor::randn((b, hkv, len, d), 0.0, 1.0, &mut rng, Device::Cpu)?;
    let q = Tensor::randn((b, hq, 1, d), 0.0, 1.0, &mut rng, Device::Cpu)?;
    let mut cache = KvCache::with_capacity(b, hkv, d, format, len)?;
    cache.append(&k, &v)?;
    drop((k, v));
    let bytes = cache.bytes();
    let budget = if quick { 1 } else { ROTATE_BYTES };
    let copies = budget.div_ceil(bytes.max(1)).clamp(1, 64);
    let caches: Vec<KvCache> = (0..copies).map(|_| cache.clone()).collect();
    drop(cache);
    let scale = 1.0 / (d as f32).sqrt();
    // One warm-up pass over every copy, then the median of max(reps, copies) steps cycling through them.
    for c in &caches {
        c.attend(&q, scale)?;
    }
    let reps = if quick { 2 } else { 25 }.max(copies);
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let start = Instant::now();
        let o = caches[i % copies].attend(&q, scale)?;
        times.push(start.elapsed().as_secs_f64());
        drop(o);
    }
    let t = median(times);
    Ok(DecodeRow {
        len,
        format,
        micros: t * 1e6,
        kv_bytes: bytes,
        gbs: bytes as f64 / t / 1e9,
        copies,
    })
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positive(v: &Value, what: &str) {
        let x = v
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: not a number: {v}"));
        assert!(x.is_finite() && x > 0.0, "{what}: {x}");
    }

    #[test]
    fn quick_run_gives_complete_positive_json() {
        let b = bench_attention(true).unwrap();
        let j = b.to_json();
        assert!(j["threads"].as_u64().unwrap() >= 1);
        assert_eq!(j["quick"], true);

        let rows = j["rows"].as_array().unwrap();
        // S ∈ {256, 512} × d ∈ {64, 128} × causal/full × fwd/fwd+bwd.
        assert_eq!(rows.len(), 16);
        for r in rows {
            for key in [
                "seq",
                "head_dim",
                "heads",
                "gflop",
                "trit_ms",
                "trit_gflops",
                "reps",
            ] {
                positive(&r[key], key);
            }
            // Quick sizes are all small enough for the naive path.
            for key in ["naive_ms", "naive_gflops", "speedup_vs_naive"] {
                positive(&r[key], key);
            }
            assert!(r["causal"].is_boolean());
            assert!(["fwd", "fwd+bwd"].contains(&r["pass"].as_str().unwrap()));
        }

        let t = &j["target"];
        assert_eq!(t["row"]["causal"], true);
        assert_eq!(t["row"]["pass"], "fwd");
        assert_eq!(t["pytorch_sdpa_gflops"], PYTORCH_SDPA_CAUSAL_FWD_GFLOPS);
        for key in ["trit_gflops", "naive_gflops"] {
            positive(&t["row"][key], key);
        }
        positive(&t["ratio_vs_pytorch"], "ratio_vs_pytorch");

        let d = &j["decode"];
        assert_eq!(d["q_heads"], DECODE_Q_HEADS);
        let drows = d["rows"].as_array().unwrap();
        assert_eq!(drows.len(), 8);
        for r in drows {
            for key in ["len", "us_per_token", "kv_bytes", "gbs", "copies"] {
                positive(&r[key], key);
            }
        }
        let formats: Vec<&str> = drows
            .iter()
            .map(|r| r["format"].as_str().unwrap())
            .collect();
        assert_eq!(
            &formats[..4],
            [
                "f32",
                "f16",
                &format!("int8/g{DECODE_HEAD_DIM}"),
                "int4/g32"
            ]
        );
        // Cache bytes fall with the format's width: f32 > f16 > int8 > int4.
        let bytes: Vec<u64> = drows[..4]
            .iter()
            .map(|r| r["kv_bytes"].as_u64().unwrap())
            .collect();
        assert!(bytes.windows(2).all(|w| w[0] > w[1]), "{bytes:?}");

        // The table names every section and prints the anchor as a reference.
        let table = b.table();
        for needle in [
            "trit ms",
            "target: causal fwd",
            "anchors.md",
            "decode attention",
            "int4/g32",
        ] {
            assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
        }
    }
}
