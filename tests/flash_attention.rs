//! Flash attention (`Tensor::flash_attention`) against a naive f64 reference written from the
//! definition — scores, masks, softmax, the weighted sum of values, and the analytic gradients — on every
//! instruction set this CPU runs, over random shapes (GQA, head dims that are not multiples of the
//! vector width, lengths on and off the 60-row / 64-key tile boundaries) and random masks (causal,
//! sliding window, key padding, packed documents) with and without fused rotary embeddings; then a sweep
//! of mask edges across the tile boundaries, the composition of primitive ops, rows that see no key,
//! strided inputs, the errors bad input gets, and repeatability across calls, ISAs and thread counts.

mod common;

use common::{config, ids_tensor, DataRng, CPU};
use proptest::prelude::*;
use trit::cpu::matmul::Isa;
use trit::ops::attention::AttentionOptions;
use trit::ops::rope::{RopeStyle, RopeTable, Rotary};
use trit::{DType, Result, Tensor};

// ---------------------------------------------------------------------------------------------------------
// Cases

const HEAD_DIMS: [usize; 9] = [8, 17, 32, 40, 64, 80, 96, 128, 256];
/// Lengths around the tile sizes (60 query rows, 64 keys) and their multiples.
const BOUNDARY_LENS: [usize; 14] = [
    59, 60, 61, 63, 64, 65, 119, 120, 121, 127, 128, 129, 180, 192,
];

#[derive(Clone, Copy, Debug)]
enum Padding {
    None,
    /// A key_padding tensor that marks every key valid.
    AllValid,
    /// Each key valid with probability `keep`.
    Random {
        keep: f64,
    },
    /// As `Random`, and batch row `row` (mod batch) padded entirely.
    FullyPaddedRow {
        keep: f64,
        row: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Positions {
    /// [kv_len] arange.
    Shared,
    /// [batch, kv_len], each row an arange from its own offset (a continued sequence) or from 0.
    PerBatch { offsets: bool },
    /// [batch, kv_len] restarting at 0 at every document start (the segments' documents when they are
    /// on, random documents otherwise).
    PerDocument,
}

#[derive(Clone, Copy, Debug)]
struct RopeCase {
    style: RopeStyle,
    base: f32,
    position_scale: f32,
    positions: Positions,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    kv_heads: usize,
    /// heads / kv_heads.
    rep: usize,
    head_dim: usize,
    q_len: usize,
    kv_len: usize,
    causal: bool,
    window: Option<usize>,
    padding: Padding,
    segments: bool,
    rope: Option<RopeCase>,
    scale: Option<f32>,
    seed: u64,
}

impl Case {
    fn heads(&self) -> usize {
        self.kv_heads * self.rep
    }

    /// The score scale the kernel uses (1/√d in f32 by default), so the reference computes at exactly
    /// the point trit sees.
    fn scale(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
}

fn lens() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 1usize..=150, 1 => prop::sample::select(BOUNDARY_LENS.to_vec())]
}

fn paddings() -> impl Strategy<Value = Padding> {
    prop_oneof![
        2 => Just(Padding::None),
        1 => Just(Padding::AllValid),
        2 => (0.2f64..1.0).prop_map(|keep| Padding::Random { keep }),
        1 => (0.2f64..1.0, 0usize..2).prop_map(|(keep, row)| Padding::FullyPaddedRow { keep, row }),
    ]
}

fn ropes() -> impl Strategy<Value = RopeCase> {
    (
        prop::sample::select(vec![RopeStyle::Half, RopeStyle::Interleaved]),
        prop::sample::select(vec![10_000f32, 500_000.0]),
        prop::sample::select(vec![1.0f32, 0.25]),
        prop_oneof![
            Just(Positions::Shared),
            any::<bool>().prop_map(|offsets| Positions::PerBatch { offsets }),
            Just(Positions::PerDocument),
        ],
    )
        .prop_map(|(style, base, position_scale, positions)| RopeCase {
            style,
            base,
            position_scale,
            positions,
        })
}

fn cases() -> impl Strategy<Value = Case> {
    let shape = (
        1usize..=2,
        1usize..=3,
        1usize..=4,
        prop::sample::select(HEAD_DIMS.to_vec()),
        lens(),
        lens(),
        prop::bool::weighted(0.75),
    );
    let mask = (
        any::<bool>(),
        prop::option::weighted(0.35, 1usize..=70),
        paddings(),
        prop::bool::weighted(0.35),
    );
    let rope = prop::option::weighted(0.5, ropes());
    let scale = prop::option::of(0.02f32..0.5);
    (shape, mask, rope, scale, any::<u64>()).prop_map(
        |(
            (batch, kv_heads, rep, head_dim, a, b, sort),
            (causal, window, padding, segments),
            rope,
            scale,
            seed,
        )| {
            // RoPE needs an even head_dim; it and packed documents need q_len ≤ kv_len (queries take
            // the positions and document ids of the last q_len keys). Causal attention is defined for
            // q_len > kv_len too (the first rows see nothing), so a quarter of the other cases keep
            // their order.
            let rope = rope.filter(|_| head_dim % 2 == 0);
            let (q_len, kv_len) = if sort || rope.is_some() || segments {
                (a.min(b), a.max(b))
            } else {
                (a, b)
            };
            Case {
                batch,
                kv_heads,
                rep,
                head_dim,
                q_len,
                kv_len,
                causal,
                window,
                padding,
                segments,
                rope,
                scale,
                seed,
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------------------
// Inputs

/// A case's data: f32 values for trit and the side arrays, expanded, for the reference.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The output weights of the loss Σ o ∘ r (so dO = r).
    r: Vec<f32>,
    /// [batch, kv_len].
    key_valid: Option<Vec<bool>>,
    key_padding: Option<Tensor>,
    /// [batch, kv_len] ids.
    segments: Option<Vec<i64>>,
    segment_tensor: Option<Tensor>,
    /// [batch, kv_len] positions, and the tensor and table trit gets.
    positions: Option<Vec<i64>>,
    rotary: Option<(RopeTable, Tensor)>,
}

fn normals(n: usize, rng: &mut DataRng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Random document ids for one sequence: runs of 1..=max_run equal ids drawn from {0, 1, 2}, so
/// equal ids recur in runs that are not adjacent (separate documents) and adjacent runs sometimes merge.
fn random_runs(len: usize, rng: &mut DataRng) -> Vec<i64> {
    let max_run = len.clamp(1, 48);
    let mut ids = Vec::with_capacity(len);
    while ids.len() < len {
        let (n, id) = (1 + rng.below(max_run), rng.below(3) as i64);
        ids.extend(std::iter::repeat_n(id, n));
    }
    ids.truncate(len);
    ids
}

/// Index of the maximal run of equal consecutive ids each key belongs to.
fn run_index(ids: &[i64]) -> Vec<usize> {
    let mut run = 0;
    ids.iter()
        .enumerate()
        .map(|(j, &id)| {
            if j > 0 && ids[j - 1] != id {
                run += 1;
            }
            run
        })
        .collect()
}

fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape.to_vec(), CPU).unwrap()
}

fn inputs(c: &Case) -> Inputs {
    let mut rng = DataRng::new(c.seed);
    let (b, sk, d) = (c.batch, c.kv_len, c.head_dim);
    let q = normals(b * c.q_len * c.heads() * d, &mut rng);
    let k = normals(b * sk * c.kv_heads * d, &mut rng);
    let v = normals(b * sk * c.kv_heads * d, &mut rng);
    let r = normals(b * c.q_len * c.heads() * d, &mut rng);
    let dtypes = [DType::F32, DType::I32, DType::U8];
    let key_valid = match c.padding {
        Padding::None => None,
        Padding::AllValid => Some(vec![true; b * sk]),
        Padding::Random { keep } => Some((0..b * sk).map(|_| rng.uniform() < keep).collect()),
        Padding::FullyPaddedRow { keep, row } => Some(
            (0..b * sk)
                .map(|i| i / sk != row % b && rng.uniform() < keep)
                .collect(),
        ),
    };
    let key_padding = key_valid.as_ref().map(|valid| {
        let ones = valid.iter().map(|&x| f32::from(u8::from(x))).collect();
        tensor(ones, &[b, sk])
            .to_dtype(dtypes[rng.below(3)])
            .unwrap()
    });
    let segments: Option<Vec<i64>> = c
        .segments
        .then(|| (0..b).flat_map(|_| random_runs(sk, &mut rng)).collect());
    let segment_tensor = segments.as_ref().map(|s| {
        let dtype = [DType::I32, DType::U8, DType::I8][rng.below(3)];
        ids_tensor(s, &[b, sk]).to_dtype(dtype).unwrap()
    });
    let (positions, rotary) = match c.rope {
        None => (None, None),
        Some(rc) => {
            let (pos, tensor): (Vec<i64>, Option<Tensor>) = match rc.positions {
                Positions::Shared => (
                    (0..b).flat_map(|_| 0..sk as i64).collect(),
                    Some(Tensor::arange(0, sk as i64, CPU).unwrap()),
                ),
                Positions::PerBatch { offsets } => (
                    (0..b)
                        .flat_map(|_| {
                            let off = if offsets { rng.below(3000) as i64 } else { 0 };
                            (0..sk as i64).map(move |j| off + j)
                        })
                        .collect(),
                    None,
                ),
                Positions::PerDocument => {
                    let docs: Vec<i64> = match &segments {
                        Some(s) => s.clone(),
                        None => (0..b).flat_map(|_| random_runs(sk, &mut rng)).collect(),
                    };
                    let mut pos = Vec::with_capacity(b * sk);
                    for row in docs.chunks(sk) {
                        let mut start = 0;
                        for (j, &id) in row.iter().enumerate() {
                            if j > 0 && row[j - 1] != id {
                                start = j;
                            }
                            pos.push((j - start) as i64);
                        }
                    }
                    (pos, None)
                }
            };
            let tensor = tensor.unwrap_or_else(|| ids_tensor(&pos, &[b, sk]));
            let max_positions = *pos.iter().max().unwrap() as usize + 1 + rng.below(5);
            let table = RopeTable::new(d, max_positions, rc.base, rc.position_scale, rc.style, CPU)
                .unwrap();
            (Some(pos), Some((table, tensor)))
        }
    };
    Inputs {
        q,
        k,
        v,
        r,
        key_valid,
        key_padding,
        segments,
        segment_tensor,
        positions,
        rotary,
    }
}

fn options<'a>(c: &Case, x: &'a Inputs) -> AttentionOptions<'a> {
    AttentionOptions {
        causal: c.causal,
        window: c.window,
        key_padding: x.key_padding.as_ref(),
        segments: x.segment_tensor.as_ref(),
        rotary: x
            .rotary
            .as_ref()
            .map(|(table, positions)| Rotary { table, positions }),
        scale: c.scale,
    }
}

// ---------------------------------------------------------------------------------------------------------
// The f64 reference

/// The reference's values, and beside each one the magnitude its f32 computation is conditioned by:
/// the sum of the absolute values of the terms that make it up, including the rounding errors of the
/// scores and of the softmax that feed them (see `reference`).
struct Reference {
    o: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    o_mag: Vec<f64>,
    dq_mag: Vec<f64>,
    dk_mag: Vec<f64>,
    dv_mag: Vec<f64>,
}

/// Rotation of a head_dim-long row by the angles of position `p` (times `sign`): RopeTable's
/// definition, angle(p, i) = p · position_scale · base^(−2i/d), in f64. `mag`, when given, is rotated
/// conservatively as magnitudes are: each of a pair takes |cos|·its own + |sin|·its partner's.
fn rotate(row: &mut [f64], mag: Option<&mut [f64]>, rc: &RopeCase, p: i64, sign: f64) {
    let d = row.len();
    let half = d / 2;
    let mut mag = mag;
    for i in 0..half {
        let (i0, i1) = match rc.style {
            RopeStyle::Half => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let theta = (rc.base as f64).powf(-2.0 * i as f64 / d as f64);
        let a = sign * p as f64 * rc.position_scale as f64 * theta;
        let (cos, sin) = (a.cos(), a.sin());
        let (x0, x1) = (row[i0], row[i1]);
        row[i0] = x0 * cos - x1 * sin;
        row[i1] = x1 * cos + x0 * sin;
        if let Some(m) = mag.as_deref_mut() {
            let (m0, m1) = (m[i0], m[i1]);
            m[i0] = m0 * cos.abs() + m1 * sin.abs();
            m[i1] = m1 * cos.abs() + m0 * sin.abs();
        }
    }
}

/// Whether query row i (at key position t = i + kv_len − q_len) of batch row `bi` sees key j, straight
/// from the documented semantics.
fn visible(c: &Case, x: &Inputs, runs: Option<&[usize]>, bi: usize, i: usize, j: usize) -> bool {
    let t = i as isize + c.kv_len as isize - c.q_len as isize;
    let j_ = j as isize;
    if c.causal && j_ > t {
        return false;
    }
    if let Some(w) = c.window {
        let w = w as isize;
        if j_ <= t - w || (!c.causal && j_ >= t + w) {
            return false;
        }
    }
    if let Some(runs) = runs {
        // Cases with segments have q_len ≤ kv_len, so t is a key position.
        let runs = &runs[bi * c.kv_len..][..c.kv_len];
        if runs[t as usize] != runs[j] {
            return false;
        }
    }
    x.key_valid.as_ref().is_none_or(|v| v[bi * c.kv_len + j])
}

/// softmax(scale · rot(q)·rot(k)ᵀ + mask) · v per (batch, head) in f64, and the gradients of
/// Σ o ∘ r: dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dP ∘ P)), dQ = scale · dS K, dK = scale · dSᵀ Q
/// (in the rotated frame, then rotated back by −angle), summed over the heads of a GQA group for dK
/// and dV. A row that sees no key outputs 0 and passes no gradient.
///
/// The magnitudes: a score s_j carries an absolute f32 error of about ε · (1 + scale · Σ|q_c k_jc|)
/// =: ε · σ_j, which moves P_j by P_j · ε · σ_j (relative); so o_c is conditioned by Σ_j P_j σ_j |v_jc|,
/// dS_j by P_j (σ_j |dP_j − D| + Σ_c |r_c v_jc| + Σ_c |r_c| o_mag_c), and the gradients by the sums of
/// |dS| (or P σ) times |the other operand|.
fn reference(c: &Case, x: &Inputs) -> Reference {
    let (b, sq, sk, hk, h, d) = (
        c.batch,
        c.q_len,
        c.kv_len,
        c.kv_heads,
        c.heads(),
        c.head_dim,
    );
    let scale = c.scale() as f64;
    let runs: Option<Vec<usize>> = x
        .segments
        .as_ref()
        .map(|s| s.chunks(sk).flat_map(run_index).collect());
    let qi = |bi: usize, i: usize, hh: usize| ((bi * sq + i) * h + hh) * d;
    let ki = |bi: usize, j: usize, kh: usize| ((bi * sk + j) * hk + kh) * d;
    let pos = |bi: usize, j: usize| x.positions.as_ref().map(|p| p[bi * sk + j]);
    let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    // Keys rotated once.
    let mut kr = f64s(&x.k);
    if let Some(rc) = &c.rope {
        for bi in 0..b {
            for j in 0..sk {
                for kh in 0..hk {
                    let at = ki(bi, j, kh);
                    rotate(&mut kr[at..at + d], None, rc, pos(bi, j).unwrap(), 1.0);
                }
            }
        }
    }
    let v = f64s(&x.v);
    let r = f64s(&x.r);
    let mut out = Reference {
        o: vec![0.0; x.q.len()],
        dq: vec![0.0; x.q.len()],
        dk: vec![0.0; x.k.len()],
        dv: vec![0.0; x.v.len()],
        o_mag: vec![0.0; x.q.len()],
        dq_mag: vec![0.0; x.q.len()],
        dk_mag: vec![0.0; x.k.len()],
        dv_mag: vec![0.0; x.v.len()],
    };
    for bi in 0..b {
        for i in 0..sq {
            let keys: Vec<usize> = (0..sk)
                .filter(|&j| visible(c, x, runs.as_deref(), bi, i, j))
                .collect();
            if keys.is_empty() {
                continue;
            }
            let t = i + sk - sq; // keys exist, so t ≥ 0 (causal) or the row is unrotated
            for hh in 0..h {
                let kh = hh / c.rep;
                let at = qi(bi, i, hh);
                let mut qr = f64s(&x.q[at..at + d]);
                if let Some(rc) = &c.rope {
                    rotate(&mut qr, None, rc, pos(bi, t).unwrap(), 1.0);
                }
                let rr = &r[at..at + d];
                let krow = |j: usize| &kr[ki(bi, j, kh)..][..d];
                let vrow = |j: usize| &v[ki(bi, j, kh)..][..d];
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| scale * qr.iter().zip(krow(j)).map(|(a, b)| a * b).sum::<f64>())
                    .collect();
                let sigma: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        1.0 + scale
                            * qr.iter()
                                .zip(krow(j))
                                .map(|(a, b)| (a * b).abs())
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|e| e / z).collect();
                let (o, o_mag) = (&mut out.o[at..at + d], &mut out.o_mag[at..at + d]);
                for (jj, &j) in keys.iter().enumerate() {
                    for c in 0..d {
                        o[c] += p[jj] * vrow(j)[c];
                        o_mag[c] += p[jj] * sigma[jj] * vrow(j)[c].abs();
                    }
                }
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| rr.iter().zip(vrow(j)).map(|(a, b)| a * b).sum())
                    .collect();
                let dsum: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                let ro: f64 = rr.iter().zip(o_mag.iter()).map(|(a, m)| a.abs() * m).sum();
                let ds: Vec<f64> = p.iter().zip(&dp).map(|(p, dp)| p * (dp - dsum)).collect();
                let ds_mag: Vec<f64> = keys
                    .iter()
                    .enumerate()
                    .map(|(jj, &j)| {
                        let rv: f64 = rr.iter().zip(vrow(j)).map(|(a, b)| (a * b).abs()).sum();
                        p[jj] * (sigma[jj] * (dp[jj] - dsum).abs() + rv + ro)
                    })
                    .collect();
                let mut dq = vec![0.0; d];
                let mut dq_mag = vec![0.0; d];
                for (jj, &j) in keys.iter().enumerate() {
                    let kat = ki(bi, j, kh);
                    for c in 0..d {
                        dq[c] += scale * ds[jj] * kr[kat + c];
                        dq_mag[c] += scale * ds_mag[jj] * kr[kat + c].abs();
                        out.dk[kat + c] += scale * ds[jj] * qr[c];
                        out.dk_mag[kat + c] += scale * ds_mag[jj] * qr[c].abs();
                        out.dv[kat + c] += p[jj] * rr[c];
                        out.dv_mag[kat + c] += p[jj] * sigma[jj] * rr[c].abs();
                    }
                }
                if let Some(rc) = &c.rope {
                    rotate(&mut dq, Some(&mut dq_mag), rc, pos(bi, t).unwrap(), -1.0);
                }
                out.dq[at..at + d].copy_from_slice(&dq);
                out.dq_mag[at..at + d].copy_from_slice(&dq_mag);
            }
        }
    }
    if let Some(rc) = &c.rope {
        for bi in 0..b {
            for j in 0..sk {
                for kh in 0..hk {
                    let at = ki(bi, j, kh);
                    let (g, m) = (&mut out.dk[at..at + d], &mut out.dk_mag[at..at + d]);
                    rotate(g, Some(m), rc, pos(bi, j).unwrap(), -1.0);
                }
            }
        }
    }
    out
}

/// Tolerance relative to the conditioning magnitudes: |got − want| ≤ TOL · (|want| + mag).
///
/// Why not a plain 2e-5 · (1 + |want|): the outputs and gradients are sums of many terms (up to a few
/// hundred keys per row, a few hundred rows per key for dK / dV, head_dim products inside each score),
/// so their f32 rounding error scales with the sum of the terms' magnitudes, not with the result, which
/// can cancel to near 0 — dK of a key that many rows see is the worst case: over 1,500 random cases its
/// error reached 4.3e-5 · (1 + |want|) while being only 9e-8 of its magnitude. `mag` is that sum of
/// magnitudes, including the rounding of the scores that feeds the softmax (see `reference`), so the
/// tolerance grows with row length and score size exactly where the error does and stays tight
/// elsewhere; an element that must be 0 (a row that sees no key, a key that no row sees) has mag 0 and
/// must come out exactly 0. The worst ratio error / (|want| + mag) seen over those 1,500 cases, on all
/// three ISAs, was 2.7e-7 (≈ 5 ε); TOL = 3e-6 (≈ 50 ε) leaves an 11× margin, while a mask that wrongly
/// admits or drops key j moves the row by P_j · |v_j − o|, typically ≥ 1e-3, hundreds of times more.
const TOL: f64 = 3e-6;

/// Err naming the worst element when some |got − want| > TOL · (|want| + mag) (or got is not finite).
fn check(what: &str, got: &[f32], want: &[f64], mag: &[f64]) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, want {}", got.len(), want.len()));
    }
    let mut worst: Option<(usize, f64)> = None;
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let (err, tol) = ((g as f64 - w).abs(), TOL * (w.abs() + m));
        if !g.is_finite() || err > tol {
            let ratio = if g.is_finite() {
                err / tol
            } else {
                f64::INFINITY
            };
            if worst.is_none_or(|(_, r)| ratio > r) {
                worst = Some((i, ratio));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, ratio)) => Err(format!(
            "{what}: element {i} is {}, want {} (magnitude {}, error {:.1}× the tolerance)",
            got[i], want[i], mag[i], ratio
        )),
    }
}

/// Runs flash attention forward and backward (loss Σ o ∘ r) on `isa`, or the composed path of primitive
/// ops (the GPU's) when `isa` is `None`: (o, dq, dk, dv).
fn run(isa: Option<Isa>, c: &Case, x: &Inputs) -> Result<[Vec<f32>; 4]> {
    let (b, h, d) = (c.batch, c.heads(), c.head_dim);
    let q = tensor(x.q.clone(), &[b, c.q_len, h, d]).var()?;
    let k = tensor(x.k.clone(), &[b, c.kv_len, c.kv_heads, d]).var()?;
    let v = tensor(x.v.clone(), &[b, c.kv_len, c.kv_heads, d]).var()?;
    let r = tensor(x.r.clone(), &[b, c.q_len, h, d]);
    let o = match isa {
        Some(isa) => q.flash_attention_with_isa(isa, &k, &v, &options(c, x))?,
        None => q.attention_composed(&k, &v, &options(c, x))?,
    };
    assert_eq!(o.dims(), q.dims());
    let grads = o.mul(&r)?.sum_all()?.backward()?;
    let g = |t: &Tensor| {
        grads
            .get(t)
            .expect("a gradient for every input")
            .to_vec_f32()
    };
    Ok([o.to_vec_f32(), g(&q), g(&k), g(&v)])
}

/// Runs one case (with `x` its inputs) on every ISA and on the composed path against the reference.
fn check_case(c: &Case, x: &Inputs) -> std::result::Result<(), String> {
    let want = reference(c, x);
    for isa in Isa::available().into_iter().map(Some).chain([None]) {
        let [o, dq, dk, dv] = run(isa, c, x).map_err(|e| format!("{isa:?} {c:?}: {e}"))?;
        for (what, got, want, mag) in [
            ("output", &o, &want.o, &want.o_mag),
            ("dq", &dq, &want.dq, &want.dq_mag),
            ("dk", &dk, &want.dk, &want.dk_mag),
            ("dv", &dv, &want.dv, &want.dv_mag),
        ] {
            check(what, got, want, mag).map_err(|e| format!("{isa:?} {c:?}: {e}"))?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(24))]

    /// Forward output and the gradients of q, k and v match the f64 reference on every ISA, and so do
    /// those of the composed path the GPU takes.
    #[test]
    fn matches_the_f64_reference_on_every_isa(c in cases()) {
        let res = check_case(&c, &inputs(&c));
        prop_assert!(res.is_ok(), "{}", res.unwrap_err());
    }
}

// ---------------------------------------------------------------------------------------------------------
// Deterministic tests

/// The kernels skip blocks no row of a tile sees and skip masking in blocks every row sees in full, per
/// tile of 60 rows and block of 64 keys: a range end that is off by one only matters where it meets a
/// tile or block edge, which random lengths rarely hit exactly. This sweeps causal / windowed ranges
/// and document boundaries across those edges (one small head, so it is cheap).
#[test]
fn mask_edges_at_tile_boundaries() {
    let base = Case {
        batch: 1,
        kv_heads: 1,
        rep: 1,
        head_dim: 8,
        q_len: 1,
        kv_len: 1,
        causal: false,
        window: None,
        padding: Padding::None,
        segments: false,
        rope: None,
        scale: Some(0.5),
        seed: 9,
    };
    for kv_len in [
        62usize, 63, 64, 65, 66, 122, 124, 126, 127, 128, 129, 130, 190, 192, 194,
    ] {
        for back in [0, 1, 2, 3, 4, 6, 60, 64, 66] {
            let Some(q_len) = kv_len.checked_sub(back).filter(|&q| q > 0) else {
                continue;
            };
            for causal in [false, true] {
                for window in [
                    None,
                    Some(1),
                    Some(2),
                    Some(3),
                    Some(63),
                    Some(64),
                    Some(65),
                ] {
                    let c = Case {
                        q_len,
                        kv_len,
                        causal,
                        window,
                        seed: (kv_len * 1000 + q_len) as u64,
                        ..base
                    };
                    check_case(&c, &inputs(&c)).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }
    // One document boundary at key p (ids 0 before it, 1 from it on), with and without causal, and key
    // padding that starts or stops next to a block edge.
    let s = 130;
    for p in (55..=70).chain(115..=130) {
        for causal in [false, true] {
            let c = Case {
                q_len: s,
                kv_len: s,
                causal,
                segments: true,
                seed: p as u64,
                ..base
            };
            let mut x = inputs(&c);
            let ids: Vec<i64> = (0..s).map(|j| i64::from(j >= p)).collect();
            x.segment_tensor = Some(ids_tensor(&ids, &[1, s]));
            x.segments = Some(ids);
            check_case(&c, &x).unwrap_or_else(|e| panic!("{e}"));
            let c = Case {
                segments: false,
                padding: Padding::AllValid,
                ..c
            };
            for valid in [
                (0..s).map(|j| j < p).collect::<Vec<bool>>(),
                (0..s).map(|j| j >= p).collect(),
            ] {
                let mut x = inputs(&c);
                let ones = valid.iter().map(|&v| f32::from(u8::from(v))).collect();
                x.key_padding = Some(tensor(ones, &[1, s]));
                x.key_valid = Some(valid);
                check_case(&c, &x).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = DataRng::new(seed);
    tensor(normals(shape.iter().product(), &mut rng), shape)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// Flash attention equals q·kᵀ · scale → causal_softmax / softmax → · v built from transposes and
/// matmuls, forward and (through autograd) backward, on every ISA.
#[test]
fn matches_the_composition_of_primitive_ops() -> Result<()> {
    // (batch, q_len, kv_len, heads, head_dim, causal); causal_softmax aligns queries to the last keys
    // as flash attention does.
    for (i, &(b, sq, sk, h, d, causal)) in [
        (2, 45, 45, 3, 24, true),
        (1, 20, 70, 2, 16, true),
        (2, 33, 90, 2, 40, false),
        (1, 130, 130, 1, 64, true),
    ]
    .iter()
    .enumerate()
    {
        let seed = 100 + i as u64;
        let q = randn(&[b, sq, h, d], seed).var()?;
        let k = randn(&[b, sk, h, d], seed + 10).var()?;
        let v = randn(&[b, sk, h, d], seed + 20).var()?;
        let r = randn(&[b, sq, h, d], seed + 30);
        let scale = 1.0 / (d as f32).sqrt();
        let scores = q
            .transpose(1, 2)?
            .matmul(&k.transpose(1, 2)?.t()?)?
            .mul_scalar(scale)?;
        let p = if causal {
            scores.causal_softmax()?
        } else {
            scores.softmax(-1)?
        };
        let o_ref = p.matmul(&v.transpose(1, 2)?)?.transpose(1, 2)?;
        let g_ref = o_ref.mul(&r)?.sum_all()?.backward()?;
        for isa in Isa::available() {
            let opts = AttentionOptions {
                causal,
                ..Default::default()
            };
            let o = q.flash_attention_with_isa(isa, &k, &v, &opts)?;
            let g = o.mul(&r)?.sum_all()?.backward()?;
            let err = max_rel_diff(&o.to_vec_f32(), &o_ref.to_vec_f32());
            assert!(err < 2e-5, "{isa:?} case {i}: output differs by {err}");
            for (name, t) in [("q", &q), ("k", &k), ("v", &v)] {
                let err = max_rel_diff(
                    &g.get(t).unwrap().to_vec_f32(),
                    &g_ref.get(t).unwrap().to_vec_f32(),
                );
                assert!(err < 5e-5, "{isa:?} case {i}: d{name} differs by {err}");
            }
        }
    }
    Ok(())
}

/// Rows that see no key — before the first key under causal with q_len > kv_len, a fully padded batch
/// row, a document whose keys are all padding, no keys at all — output exactly 0 and get exactly 0
/// gradient, keys that no row sees get exactly 0 dK and dV, and nothing is NaN, forward or backward.
#[test]
fn rows_that_see_no_key_are_zero_without_nan() -> Result<()> {
    struct Empty {
        q_len: usize,
        kv_len: usize,
        causal: bool,
        window: Option<usize>,
        valid: Vec<f32>,
        segments: Option<Vec<i64>>,
        /// Rows [batch, q_len] that see nothing and keys [batch, kv_len] that no row sees.
        empty_rows: Vec<bool>,
        unseen_keys: Vec<bool>,
    }
    let (b, h, hk, d) = (2, 4, 2, 24);
    let mut cases = Vec::new();
    // Causal with 20 more queries than keys: rows 0..20 see nothing; batch row 1 is all padding.
    {
        let (sq, sk) = (70, 50);
        let valid: Vec<f32> = (0..b * sk)
            .map(|i| if i >= sk || i % 7 == 3 { 0.0 } else { 1.0 })
            .collect();
        cases.push(Empty {
            q_len: sq,
            kv_len: sk,
            causal: true,
            window: None,
            empty_rows: (0..b * sq).map(|i| i >= sq || i < 20).collect(),
            unseen_keys: valid.iter().map(|&x| x == 0.0).collect(),
            valid,
            segments: None,
        });
    }
    // Packed documents [0; 30] [1; 20] [0; 30]: the middle one entirely padding, so its rows see
    // nothing; a sliding window of 5 on top.
    {
        let s = 80;
        let segments: Vec<i64> = (0..b * s)
            .map(|i| match i % s {
                0..30 => 0,
                30..50 => 1,
                _ => 0,
            })
            .collect();
        let valid: Vec<f32> = (0..b * s)
            .map(|i| {
                if (30..50).contains(&(i % s)) {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let middle: Vec<bool> = (0..b * s).map(|i| (30..50).contains(&(i % s))).collect();
        cases.push(Empty {
            q_len: s,
            kv_len: s,
            causal: true,
            window: Some(5),
            valid,
            segments: Some(segments),
            empty_rows: middle.clone(),
            unseen_keys: middle,
        });
    }
    // Non-causal packed documents with 20 more queries than keys: the first 20 queries come before
    // the first key, belong to no document and see nothing (rather than every document).
    {
        let (sq, sk) = (70, 50);
        cases.push(Empty {
            q_len: sq,
            kv_len: sk,
            causal: false,
            window: None,
            valid: vec![1.0; b * sk],
            segments: Some((0..b * sk).map(|i| (i % sk / 25) as i64).collect()),
            empty_rows: (0..b * sq).map(|i| i % sq < 20).collect(),
            unseen_keys: vec![false; b * sk],
        });
    }
    for (n, e) in cases.iter().enumerate() {
        // Large inputs, so an exp overflow or a 0 · ∞ would show.
        let q = randn(&[b, e.q_len, h, d], 7).mul_scalar(30.0)?.var()?;
        let k = randn(&[b, e.kv_len, hk, d], 8).mul_scalar(30.0)?.var()?;
        let v = randn(&[b, e.kv_len, hk, d], 9).var()?;
        let r = randn(&[b, e.q_len, h, d], 10);
        let valid = tensor(e.valid.clone(), &[b, e.kv_len]);
        let segments = e.segments.as_ref().map(|s| ids_tensor(s, &[b, e.kv_len]));
        let opts = AttentionOptions {
            causal: e.causal,
            window: e.window,
            key_padding: Some(&valid),
            segments: segments.as_ref(),
            ..Default::default()
        };
        for isa in Isa::available() {
            let o = q.flash_attention_with_isa(isa, &k, &v, &opts)?;
            let g = o.mul(&r)?.sum_all()?.backward()?;
            let (o, dq) = (o.to_vec_f32(), g.get(&q).unwrap().to_vec_f32());
            let (dk, dv) = (
                g.get(&k).unwrap().to_vec_f32(),
                g.get(&v).unwrap().to_vec_f32(),
            );
            for (name, x) in [("o", &o), ("dq", &dq), ("dk", &dk), ("dv", &dv)] {
                assert!(
                    x.iter().all(|x| x.is_finite()),
                    "{isa:?} case {n}: {name} is not finite"
                );
            }
            for (row, &empty) in e.empty_rows.iter().enumerate() {
                let row_o = &o[row * h * d..][..h * d];
                let row_dq = &dq[row * h * d..][..h * d];
                if empty {
                    assert!(
                        row_o.iter().chain(row_dq).all(|&x| x == 0.0),
                        "{isa:?} case {n}: row {row} sees no key but has a nonzero output or dq"
                    );
                } else {
                    assert!(
                        row_o.iter().any(|&x| x != 0.0),
                        "{isa:?} case {n}: row {row} sees keys but outputs 0"
                    );
                }
            }
            for (key, &unseen) in e.unseen_keys.iter().enumerate() {
                if unseen {
                    let (gk, gv) = (&dk[key * hk * d..][..hk * d], &dv[key * hk * d..][..hk * d]);
                    assert!(
                        gk.iter().chain(gv).all(|&x| x == 0.0),
                        "{isa:?} case {n}: key {key} is seen by no row but has a gradient"
                    );
                }
            }
        }
    }
    // No keys at all (every row is empty), and no queries.
    for (sq, sk) in [(5, 0), (0, 7)] {
        let q = randn(&[2, sq, 2, 8], 1).var()?;
        let k = randn(&[2, sk, 1, 8], 2).var()?;
        let v = randn(&[2, sk, 1, 8], 3).var()?;
        for isa in Isa::available() {
            let opts = AttentionOptions {
                causal: sq <= sk,
                ..Default::default()
            };
            let o = q.flash_attention_with_isa(isa, &k, &v, &opts)?;
            assert_eq!(o.dims(), [2, sq, 2, 8]);
            assert!(o.to_vec_f32().iter().all(|&x| x == 0.0));
            let g = o.sum_all()?.backward()?;
            for t in [&q, &k, &v] {
                let gt = g.get(t).map(|g| g.to_vec_f32()).unwrap_or_default();
                assert!(
                    gt.iter().all(|&x| x == 0.0),
                    "{isa:?} q_len {sq} kv_len {sk}"
                );
            }
        }
    }
    Ok(())
}

/// Strided views (q, k and v as transposes of [batch, heads, len, d] tensors, as a model that keeps
/// heads outermost would pass them) give exactly the results of contiguous copies, and the gradients
/// reach the tensors the views were taken from.
#[test]
fn strided_inputs_match_contiguous_copies() -> Result<()> {
    let (b, sq, sk, h, hk, d) = (2, 70, 90, 4, 2, 32);
    let q_base = randn(&[b, h, sq, d], 1).var()?;
    let k_base = randn(&[b, hk, sk, d], 2).var()?;
    let v_base = randn(&[b, hk, sk, d], 3).var()?;
    let r = randn(&[b, sq, h, d], 4);
    let (q, k, v) = (
        q_base.transpose(1, 2)?,
        k_base.transpose(1, 2)?,
        v_base.transpose(1, 2)?,
    );
    let copy = |t: &Tensor| tensor(t.to_vec_f32(), t.dims()).var();
    let (qc, kc, vc) = (copy(&q)?, copy(&k)?, copy(&v)?);
    let opts = AttentionOptions {
        causal: true,
        window: Some(50),
        ..Default::default()
    };
    for isa in Isa::available() {
        let o = q.flash_attention_with_isa(isa, &k, &v, &opts)?;
        let oc = qc.flash_attention_with_isa(isa, &kc, &vc, &opts)?;
        assert_eq!(o.to_vec_f32(), oc.to_vec_f32(), "{isa:?}: output");
        let g = o.mul(&r)?.sum_all()?.backward()?;
        let gc = oc.mul(&r)?.sum_all()?.backward()?;
        for (name, base, contiguous) in [
            ("q", &q_base, &qc),
            ("k", &k_base, &kc),
            ("v", &v_base, &vc),
        ] {
            let via_view = g.get(base).unwrap().transpose(1, 2)?.to_vec_f32();
            assert_eq!(
                via_view,
                gc.get(contiguous).unwrap().to_vec_f32(),
                "{isa:?}: d{name}"
            );
        }
    }
    Ok(())
}

/// Every malformed call is an `Err`, never a panic.
#[test]
fn bad_input_is_an_error() -> Result<()> {
    let z = |shape: &[usize]| Tensor::zeros(shape.to_vec(), DType::F32, CPU).unwrap();
    let none = AttentionOptions::default();
    let (q, k) = (z(&[2, 5, 4, 8]), z(&[2, 6, 2, 8]));
    // The well-formed call the variations below break.
    q.flash_attention(&k, &k, &none)?;
    let shapes: &[(&[usize], &[usize], &[usize])] = &[
        (&[5, 4, 8], &[2, 6, 2, 8], &[2, 6, 2, 8]), // q rank 3
        (&[2, 5, 4, 8], &[6, 2, 8], &[6, 2, 8]),    // k rank 3
        (&[2, 5, 4, 8, 1], &[2, 6, 2, 8], &[2, 6, 2, 8]), // q rank 5
        (&[2, 5, 4, 8], &[1, 6, 2, 8], &[1, 6, 2, 8]), // batch mismatch
        (&[2, 5, 4, 8], &[2, 6, 2, 16], &[2, 6, 2, 16]), // head_dim mismatch
        (&[2, 5, 3, 8], &[2, 6, 2, 8], &[2, 6, 2, 8]), // heads not a multiple of kv_heads
        (&[2, 5, 4, 8], &[2, 6, 0, 8], &[2, 6, 0, 8]), // no kv heads
        (&[2, 5, 4, 0], &[2, 6, 2, 0], &[2, 6, 2, 0]), // head_dim 0
        (&[2, 5, 4, 8], &[2, 6, 2, 8], &[2, 7, 2, 8]), // v kv_len ≠ k's
        (&[2, 5, 4, 8], &[2, 6, 2, 8], &[2, 6, 1, 8]), // v kv_heads ≠ k's
        (&[2, 5, 4, 8], &[2, 6, 2, 8], &[2, 6, 2, 16]), // v head_dim ≠ k's
        (&[2, 5, 4, 8], &[2, 6, 2, 8], &[1, 6, 2, 8]), // v batch ≠ k's
    ];
    for &(qs, ks, vs) in shapes {
        let res = z(qs).flash_attention(&z(ks), &z(vs), &none);
        assert!(res.is_err(), "q {qs:?} k {ks:?} v {vs:?} was accepted");
    }
    let bad_opts = |opts: &AttentionOptions, what: &str| {
        assert!(
            q.flash_attention(&k, &k, opts).is_err(),
            "{what} was accepted"
        );
    };
    bad_opts(
        &AttentionOptions {
            window: Some(0),
            ..none
        },
        "window 0",
    );
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        bad_opts(
            &AttentionOptions {
                scale: Some(scale),
                ..none
            },
            &format!("scale {scale}"),
        );
    }
    for shape in [&[2, 7][..], &[1, 6], &[6], &[2, 6, 1], &[12]] {
        let side = z(shape);
        bad_opts(
            &AttentionOptions {
                key_padding: Some(&side),
                ..none
            },
            &format!("key_padding {shape:?}"),
        );
        let ids = side.to_dtype(DType::I32)?;
        bad_opts(
            &AttentionOptions {
                segments: Some(&ids),
                ..none
            },
            &format!("segments {shape:?}"),
        );
    }
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let float_ids = z(&[2, 6]).to_dtype(dtype)?;
        bad_opts(
            &AttentionOptions {
                segments: Some(&float_ids),
                ..none
            },
            &format!("{dtype:?} segments"),
        );
    }
    let table = RopeTable::new(8, 16, 10_000.0, 1.0, RopeStyle::Half, CPU)?;
    let wrong_dim = RopeTable::new(16, 16, 10_000.0, 1.0, RopeStyle::Half, CPU)?;
    let pos = Tensor::arange(0, 6, CPU)?;
    fn rope<'a>(table: &'a RopeTable, positions: &'a Tensor) -> AttentionOptions<'a> {
        AttentionOptions {
            rotary: Some(Rotary { table, positions }),
            ..Default::default()
        }
    }
    q.flash_attention(&k, &k, &rope(&table, &pos))?;
    bad_opts(
        &rope(&wrong_dim, &pos),
        "a rotary table for another head_dim",
    );
    for (positions, what) in [
        (
            Tensor::arange(10, 16, CPU)?,
            "position 15 of a 16-row table is fine",
        ),
        (
            Tensor::arange(11, 17, CPU)?,
            "position 16 of a 16-row table",
        ),
        (
            ids_tensor(&[0, 1, -1, 2, 3, 4], &[6]),
            "a negative position",
        ),
        (Tensor::arange(0, 5, CPU)?, "5 positions for 6 keys"),
        (
            Tensor::arange(0, 12, CPU)?,
            "[12] positions for [2, 6] keys",
        ),
        (ids_tensor(&[0; 6], &[1, 6]), "[1, 6] positions for batch 2"),
        (ids_tensor(&[0; 12], &[2, 6, 1]), "rank-3 positions"),
        (
            Tensor::from_vec(vec![0.0f32, 1.0, 2.7, 3.0, 4.0, 5.0], 6, CPU)?,
            "float positions (2.7 would silently truncate)",
        ),
    ] {
        let res = q.flash_attention(&k, &k, &rope(&table, &positions));
        assert_eq!(res.is_ok(), what.ends_with("is fine"), "{what}");
    }
    // Rotary needs q_len ≤ kv_len (queries take the last keys' positions).
    let long_q = z(&[2, 7, 4, 8]);
    assert!(long_q.flash_attention(&k, &k, &none).is_ok());
    assert!(long_q.flash_attention(&k, &k, &rope(&table, &pos)).is_err());
    Ok(())
}

/// Repeated calls give bit-identical results on every ISA; the AVX kernels agree with the portable ones;
/// and thread pools of different sizes (which change how the backward splits dQ across tasks) agree.
#[test]
fn repeatable_and_consistent_across_isas_and_thread_counts() -> Result<()> {
    let c = Case {
        batch: 2,
        kv_heads: 2,
        rep: 2,
        head_dim: 64,
        q_len: 190,
        kv_len: 250,
        causal: true,
        window: Some(120),
        padding: Padding::Random { keep: 0.9 },
        segments: false,
        rope: Some(RopeCase {
            style: RopeStyle::Half,
            base: 10_000.0,
            position_scale: 1.0,
            positions: Positions::Shared,
        }),
        scale: None,
        seed: 42,
    };
    let x = inputs(&c);
    let portable = run(Some(Isa::Portable), &c, &x)?;
    for isa in Isa::available() {
        let first = run(Some(isa), &c, &x)?;
        let again = run(Some(isa), &c, &x)?;
        for (n, (a, b)) in first.iter().zip(&again).enumerate() {
            assert!(
                a == b,
                "{isa:?}: result {n} changed between identical calls"
            );
        }
        for (n, (a, p)) in first.iter().zip(&portable).enumerate() {
            let err = max_rel_diff(a, p);
            assert!(
                err < 1e-4,
                "{isa:?}: result {n} differs from Portable's by {err}"
            );
        }
    }
    let want = reference(&c, &x);
    let mut per_pool = Vec::new();
    for threads in [1, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got = pool.install(|| run(Some(Isa::best()), &c, &x))?;
        let again = pool.install(|| run(Some(Isa::best()), &c, &x))?;
        assert!(
            got == again,
            "{threads} threads: results changed between calls"
        );
        for (what, got, want, mag) in [
            ("output", &got[0], &want.o, &want.o_mag),
            ("dq", &got[1], &want.dq, &want.dq_mag),
            ("dk", &got[2], &want.dk, &want.dk_mag),
            ("dv", &got[3], &want.dv, &want.dv_mag),
        ] {
            check(what, got, want, mag).unwrap_or_else(|e| panic!("{threads} threads: {e}"));
        }
        per_pool.push(got);
    }
    for other in &per_pool[1..] {
        for (n, (a, b)) in other.iter().zip(&per_pool[0]).enumerate() {
            let err = max_rel_diff(a, b);
            assert!(err < 1e-4, "result {n} depends on the thread count ({err})");
        }
    }
    Ok(())
}
