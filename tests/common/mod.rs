//! Shared helpers for the engine's op tests: a naive f64 reference tensor with reference implementations of
//! every op, the tables of unary and binary ops (`UNARY`, `BINARY`) that the forward and gradient tests
//! both run, proptest strategies for shapes, builders for strided (non-contiguous) inputs, and
//! `assert_close`, which names the worst element when values disagree.
//!
//! Every reference here is written from the op's definition, not from trit's kernels: plain loops over
//! multi-indices, in f64.

#![allow(dead_code)]

use proptest::prelude::*;
use trit::{Device, Tensor};

pub const CPU: Device = Device::Cpu;

// ---------------------------------------------------------------------------------------------------------
// Test data

/// A tiny deterministic RNG (splitmix64) for test data, independent of `trit::Rng`.
#[derive(Clone, Debug)]
pub struct DataRng(u64);

impl DataRng {
    pub fn new(seed: u64) -> Self {
        DataRng(seed ^ 0x5eed_1234_abcd_0001)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Magnitude uniform in [lo, hi), then a random sign.
    pub fn signed_range(&mut self, lo: f64, hi: f64) -> f64 {
        let v = self.range(lo, hi);
        if self.bool() {
            v
        } else {
            -v
        }
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniformly random permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }

    /// `n` indices in 0..size (with repeats).
    pub fn indices(&mut self, n: usize, size: usize) -> Vec<i64> {
        (0..n).map(|_| self.below(size) as i64).collect()
    }
}

/// Rounds to the nearest f32, so a reference computes at exactly the point trit sees.
pub fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// An i32 index tensor of `shape` holding `ids`.
pub fn ids_tensor(ids: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(
        ids.iter().map(|&i| i as i32).collect::<Vec<i32>>(),
        shape.to_vec(),
        CPU,
    )
    .unwrap()
}

// ---------------------------------------------------------------------------------------------------------
// Shapes

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The multi-index of row-major position `flat`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = flat % shape[d];
        flat /= shape[d];
    }
    idx
}

/// Every multi-index of `shape` in row-major order.
pub fn indices_of(shape: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
    (0..numel(shape)).map(move |i| unravel(i, shape))
}

/// Calls `f(flat, idx)` for every multi-index of `shape` in row-major order (without allocating per index).
pub fn for_each_index(shape: &[usize], mut f: impl FnMut(usize, &[usize])) {
    let n = numel(shape);
    let mut idx = vec![0; shape.len()];
    for flat in 0..n {
        f(flat, &idx);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// numpy broadcasting: align trailing dims; each pair must match or contain a 1.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let get = |s: &[usize], i: usize| {
        let lead = rank - s.len();
        if i < lead {
            1
        } else {
            s[i - lead]
        }
    };
    (0..rank)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Scalar references

pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 3.0 {
        // Maclaurin series 2/√π Σ (−1)ⁿ z^(2n+1) / (n! (2n+1)).
        let (z2, mut term, mut sum) = (z * z, z, z);
        for n in 1..200 {
            term *= -z2 / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(z) = e^(−z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))).
        let mut f = z;
        for k in (1..=80).rev() {
            f = z + (k as f64 / 2.0) / f;
        }
        1.0 - (-z * z).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------------------------
// Unary ops: one table for the forward tests (ops.rs) and the gradient tests (grad.rs)

/// Draws one input value.
pub type Gen = fn(&mut DataRng) -> f64;

/// Input generators for forward checks: wide ranges, with the exact values where an op jumps or ties.
pub mod fwd {
    use super::DataRng;

    pub fn sym(r: &mut DataRng) -> f64 {
        r.range(-4.0, 4.0)
    }

    pub fn pos(r: &mut DataRng) -> f64 {
        r.range(0.05, 5.0)
    }

    /// Exact zeros and exact halves among ordinary values (sign's 0, round's ties).
    pub fn with_specials(r: &mut DataRng) -> f64 {
        match r.below(4) {
            0 => 0.0,
            1 => (r.below(21) as f64 - 10.0) / 2.0,
            _ => r.range(-5.0, 5.0),
        }
    }

    pub fn nonzero(r: &mut DataRng) -> f64 {
        r.signed_range(0.1, 4.0)
    }
}

/// Input generators for gradient checks: values where the op is smooth, well away from any kink, jump or
/// pole, so that central differences are exact.
pub mod smooth {
    use super::DataRng;

    pub fn sym(r: &mut DataRng) -> f64 {
        r.range(-3.0, 3.0)
    }

    pub fn pos(r: &mut DataRng) -> f64 {
        r.range(0.2, 4.0)
    }

    /// |x| in [0.1, 3]: away from the kinks of abs/relu and the pole of recip.
    pub fn away_from_zero(r: &mut DataRng) -> f64 {
        r.signed_range(0.1, 3.0)
    }

    /// Away from round's jumps (k + 1/2) and sign's jump (0).
    pub fn away_from_halves(r: &mut DataRng) -> f64 {
        (r.below(7) as f64 - 3.0) + r.signed_range(0.1, 0.4)
    }

    /// Away from the clamp bounds -0.5 and 0.75.
    pub fn away_from_bounds(r: &mut DataRng) -> f64 {
        match r.below(3) {
            0 => r.range(-2.0, -0.6),
            1 => r.range(-0.4, 0.65),
            _ => r.range(0.85, 2.0),
        }
    }
}

/// A unary op, its f64 reference, and the inputs each suite checks it at: `forward_gen` for the forward
/// tests, `grad_gen` for the gradient tests. `None` leaves the op out of that suite.
pub struct Unary {
    pub name: &'static str,
    pub op: fn(&Tensor) -> trit::Result<Tensor>,
    pub reference: fn(f64) -> f64,
    pub forward_gen: Option<Gen>,
    pub grad_gen: Option<Gen>,
}

/// Every unary op, in the order both suites run them. The forward and gradient suites check `powf` and
/// `affine` at different parameters, hence their one-suite rows.
pub const UNARY: &[Unary] = &[
    Unary {
        name: "neg",
        op: |t| t.neg(),
        reference: |x| -x,
        forward_gen: Some(fwd::with_specials),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "exp",
        op: |t| t.exp(),
        reference: f64::exp,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "log",
        op: |t| t.log(),
        reference: f64::ln,
        forward_gen: Some(fwd::pos),
        grad_gen: Some(smooth::pos),
    },
    Unary {
        name: "sqrt",
        op: |t| t.sqrt(),
        reference: f64::sqrt,
        forward_gen: Some(fwd::pos),
        grad_gen: Some(smooth::pos),
    },
    Unary {
        name: "rsqrt",
        op: |t| t.rsqrt(),
        reference: |x| 1.0 / x.sqrt(),
        forward_gen: Some(fwd::pos),
        grad_gen: Some(smooth::pos),
    },
    Unary {
        name: "tanh",
        op: |t| t.tanh(),
        reference: f64::tanh,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "sigmoid",
        op: |t| t.sigmoid(),
        reference: sigmoid,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "relu",
        op: |t| t.relu(),
        reference: |x| x.max(0.0),
        forward_gen: Some(fwd::with_specials),
        grad_gen: Some(smooth::away_from_zero),
    },
    Unary {
        name: "gelu",
        op: |t| t.gelu(),
        reference: gelu_erf,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "gelu_tanh",
        op: |t| t.gelu_tanh(),
        reference: gelu_tanh,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "silu",
        op: |t| t.silu(),
        reference: |x| x * sigmoid(x),
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "abs",
        op: |t| t.abs(),
        reference: f64::abs,
        forward_gen: Some(fwd::with_specials),
        grad_gen: Some(smooth::away_from_zero),
    },
    Unary {
        name: "sign",
        op: |t| t.sign(),
        reference: sign,
        forward_gen: Some(fwd::with_specials),
        grad_gen: Some(smooth::away_from_halves),
    },
    Unary {
        name: "round",
        op: |t| t.round(),
        reference: f64::round_ties_even,
        forward_gen: Some(fwd::with_specials),
        grad_gen: Some(smooth::away_from_halves),
    },
    Unary {
        name: "sqr",
        op: |t| t.sqr(),
        reference: |x| x * x,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "recip",
        op: |t| t.recip(),
        reference: |x| 1.0 / x,
        forward_gen: Some(fwd::nonzero),
        grad_gen: Some(smooth::away_from_zero),
    },
    Unary {
        name: "erf",
        op: |t| t.erf(),
        reference: erf,
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "clamp",
        op: |t| t.clamp(-0.5, 0.75),
        reference: |x| x.clamp(-0.5, 0.75),
        forward_gen: Some(fwd::with_specials),
        grad_gen: Some(smooth::away_from_bounds),
    },
    Unary {
        name: "powf(2.5)",
        op: |t| t.powf(2.5),
        reference: |x| x.powf(2.5),
        forward_gen: Some(fwd::pos),
        grad_gen: Some(smooth::pos),
    },
    Unary {
        name: "powf(-1.5)",
        op: |t| t.powf(-1.5),
        reference: |x| x.powf(-1.5),
        forward_gen: Some(fwd::pos),
        grad_gen: None,
    },
    Unary {
        name: "powf(-0.5)",
        op: |t| t.powf(-0.5),
        reference: |x| x.powf(-0.5),
        forward_gen: None,
        grad_gen: Some(smooth::pos),
    },
    Unary {
        name: "powf(3)",
        op: |t| t.powf(3.0),
        reference: |x| x.powi(3),
        forward_gen: Some(fwd::sym),
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "affine",
        op: |t| t.affine(1.5, -0.25),
        reference: |x| x * 1.5 - 0.25,
        forward_gen: Some(fwd::sym),
        grad_gen: None,
    },
    Unary {
        name: "affine",
        op: |t| t.affine(-1.5, 0.25),
        reference: |x| -1.5 * x + 0.25,
        forward_gen: None,
        grad_gen: Some(smooth::sym),
    },
    Unary {
        name: "add_scalar",
        op: |t| t.add_scalar(0.5),
        reference: |x| x + 0.5,
        forward_gen: Some(fwd::sym),
        grad_gen: None,
    },
    Unary {
        name: "mul_scalar",
        op: |t| t.mul_scalar(-3.0),
        reference: |x| -3.0 * x,
        forward_gen: Some(fwd::sym),
        grad_gen: None,
    },
];

/// The ops the forward tests check, each with its generator.
pub fn unary_forward() -> impl Iterator<Item = (&'static Unary, Gen)> {
    UNARY.iter().filter_map(|u| Some((u, u.forward_gen?)))
}

/// The ops the gradient tests check, each with its generator.
pub fn unary_grad() -> impl Iterator<Item = (&'static Unary, Gen)> {
    UNARY.iter().filter_map(|u| Some((u, u.grad_gen?)))
}

// ---------------------------------------------------------------------------------------------------------
// Broadcasting binary ops: one table for the forward and the gradient tests

pub type BinFn = fn(&Tensor, &Tensor) -> trit::Result<Tensor>;
pub type BinRef = fn(f64, f64) -> f64;

/// Every broadcasting binary op with its f64 reference.
pub const BINARY: &[(&str, BinFn, BinRef)] = &[
    ("add", |a, b| a.add(b), |a, b| a + b),
    ("sub", |a, b| a.sub(b), |a, b| a - b),
    ("mul", |a, b| a.mul(b), |a, b| a * b),
    ("div", |a, b| a.div(b), |a, b| a / b),
    ("maximum", |a, b| a.maximum(b), f64::max),
    ("minimum", |a, b| a.minimum(b), f64::min),
];

// ---------------------------------------------------------------------------------------------------------
// The reference tensor

/// A row-major f64 tensor: the oracle every test compares trit against.
#[derive(Clone, Debug, PartialEq)]
pub struct Ref {
    pub data: Vec<f64>,
    pub shape: Vec<usize>,
}

impl Ref {
    pub fn new(data: Vec<f64>, shape: &[usize]) -> Ref {
        assert_eq!(
            data.len(),
            numel(shape),
            "Ref::new: data does not fill {shape:?}"
        );
        Ref {
            data,
            shape: shape.to_vec(),
        }
    }

    pub fn scalar(v: f64) -> Ref {
        Ref::new(vec![v], &[])
    }

    pub fn from_fn(shape: &[usize], mut f: impl FnMut(&[usize]) -> f64) -> Ref {
        let mut data = Vec::with_capacity(numel(shape));
        for_each_index(shape, |_, idx| data.push(f(idx)));
        Ref::new(data, shape)
    }

    /// Values drawn by `gen`, rounded to f32.
    pub fn rand(
        shape: &[usize],
        rng: &mut DataRng,
        mut gen: impl FnMut(&mut DataRng) -> f64,
    ) -> Ref {
        Ref::new((0..numel(shape)).map(|_| f32r(gen(rng))).collect(), shape)
    }

    /// Uniform values in [lo, hi), rounded to f32.
    pub fn uniform(shape: &[usize], rng: &mut DataRng, lo: f64, hi: f64) -> Ref {
        Ref::rand(shape, rng, |r| r.range(lo, hi))
    }

    /// Pairwise distinct values (a shuffled grid with jitter), for max/min and their gradients.
    pub fn distinct(shape: &[usize], rng: &mut DataRng) -> Ref {
        let n = numel(shape);
        let perm = rng.permutation(n);
        let data = perm
            .iter()
            .map(|&p| f32r((p as f64 - n as f64 / 2.0) * 0.125 + rng.range(0.0, 0.05)))
            .collect();
        Ref::new(data, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn offset(&self, idx: &[usize]) -> usize {
        idx.iter()
            .zip(&self.shape)
            .fold(0, |acc, (&i, &d)| acc * d + i)
    }

    pub fn at(&self, idx: &[usize]) -> f64 {
        self.data[self.offset(idx)]
    }

    /// A contiguous f32 trit tensor with these values.
    pub fn tensor(&self) -> Tensor {
        Tensor::from_vec(self.f32s(), self.shape.clone(), CPU).unwrap()
    }

    /// A trainable f32 variable with these values.
    pub fn var(&self) -> Tensor {
        self.tensor().var().unwrap()
    }

    pub fn f32s(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    pub fn i64s(&self) -> Vec<i64> {
        self.data.iter().map(|&v| v as i64).collect()
    }

    pub fn map(&self, f: impl Fn(f64) -> f64) -> Ref {
        Ref::new(self.data.iter().map(|&v| f(v)).collect(), &self.shape)
    }

    /// numpy-style broadcast to `shape` (materialised).
    pub fn broadcast_to(&self, shape: &[usize]) -> Ref {
        assert!(
            shape.len() >= self.rank(),
            "cannot broadcast {:?} to {shape:?}",
            self.shape
        );
        let lead = shape.len() - self.rank();
        for (i, &d) in self.shape.iter().enumerate() {
            assert!(
                d == 1 || d == shape[lead + i],
                "cannot broadcast {:?} to {shape:?}",
                self.shape
            );
        }
        // Stride 0 for broadcast dims.
        let mut strides = contiguous_strides(&self.shape);
        for (s, &d) in strides.iter_mut().zip(&self.shape) {
            if d == 1 {
                *s = 0;
            }
        }
        Ref::from_fn(shape, |idx| {
            let o: usize = idx[lead..].iter().zip(&strides).map(|(i, s)| i * s).sum();
            self.data[o]
        })
    }

    /// Elementwise `f(a, b)` with numpy broadcasting.
    pub fn zip(&self, other: &Ref, f: impl Fn(f64, f64) -> f64) -> Ref {
        let shape = broadcast_shapes(&self.shape, &other.shape).expect("broadcastable shapes");
        let (a, b) = (self.broadcast_to(&shape), other.broadcast_to(&shape));
        Ref::new(
            a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect(),
            &shape,
        )
    }

    pub fn zip3(a: &Ref, b: &Ref, c: &Ref, f: impl Fn(f64, f64, f64) -> f64) -> Ref {
        let shape = broadcast_shapes(&a.shape, &b.shape)
            .and_then(|s| broadcast_shapes(&s, &c.shape))
            .expect("broadcastable shapes");
        let (a, b, c) = (
            a.broadcast_to(&shape),
            b.broadcast_to(&shape),
            c.broadcast_to(&shape),
        );
        Ref::new(
            (0..a.numel())
                .map(|i| f(a.data[i], b.data[i], c.data[i]))
                .collect(),
            &shape,
        )
    }

    /// torch semantics: `out.shape[i] = self.shape[perm[i]]`.
    pub fn permute(&self, perm: &[usize]) -> Ref {
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let mut src = vec![0; self.rank()];
        Ref::from_fn(&shape, |idx| {
            for (i, &p) in perm.iter().enumerate() {
                src[p] = idx[i];
            }
            self.at(&src)
        })
    }

    pub fn transpose(&self, a: usize, b: usize) -> Ref {
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Ref {
        let mut shape = self.shape.clone();
        shape[dim] = len;
        let mut src = vec![0; self.rank()];
        Ref::from_fn(&shape, |idx| {
            src.copy_from_slice(idx);
            src[dim] += start;
            self.at(&src)
        })
    }

    pub fn reshape(&self, shape: &[usize]) -> Ref {
        Ref::new(self.data.clone(), shape)
    }

    /// Reduces `dims` with `f` applied to each group's values (in row-major order of the reduced dims).
    pub fn reduce(&self, dims: &[usize], keepdim: bool, f: impl Fn(&[f64]) -> f64) -> Ref {
        let keep_shape: Vec<usize> = (0..self.rank())
            .map(|d| if dims.contains(&d) { 1 } else { self.shape[d] })
            .collect();
        let mut groups: Vec<Vec<f64>> = vec![Vec::new(); numel(&keep_shape)];
        let mut out_strides = contiguous_strides(&keep_shape);
        for &d in dims {
            out_strides[d] = 0;
        }
        for_each_index(&self.shape, |flat, idx| {
            let o: usize = idx.iter().zip(&out_strides).map(|(i, s)| i * s).sum();
            groups[o].push(self.data[flat]);
        });
        let data = groups.iter().map(|g| f(g)).collect();
        let out = Ref::new(data, &keep_shape);
        if keepdim {
            out
        } else {
            let shape: Vec<usize> = (0..self.rank())
                .filter(|d| !dims.contains(d))
                .map(|d| self.shape[d])
                .collect();
            out.reshape(&shape)
        }
    }

    /// Replaces every 1-d line along `dim` by `f(line)` (same length).
    pub fn along(&self, dim: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> Ref {
        let mut out = self.clone();
        let size = self.shape[dim];
        let inner: usize = self.shape[dim + 1..].iter().product();
        let outer: usize = self.shape[..dim].iter().product();
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| (o * size + j) * inner + i;
                let line: Vec<f64> = (0..size).map(|j| self.data[at(j)]).collect();
                let res = f(&line);
                assert_eq!(res.len(), size);
                for (j, v) in res.into_iter().enumerate() {
                    out.data[at(j)] = v;
                }
            }
        }
        out
    }

    // ---- reductions ----

    pub fn sum(&self, dims: &[usize], keepdim: bool) -> Ref {
        self.reduce(dims, keepdim, |g| g.iter().sum())
    }

    pub fn mean(&self, dims: &[usize], keepdim: bool) -> Ref {
        self.reduce(dims, keepdim, |g| g.iter().sum::<f64>() / g.len() as f64)
    }

    pub fn max(&self, dims: &[usize], keepdim: bool) -> Ref {
        self.reduce(dims, keepdim, |g| {
            g.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        })
    }

    pub fn min(&self, dims: &[usize], keepdim: bool) -> Ref {
        self.reduce(dims, keepdim, |g| {
            g.iter().copied().fold(f64::INFINITY, f64::min)
        })
    }

    /// Index of the first maximum (or minimum) along one dim.
    pub fn arg_extreme(&self, dim: usize, keepdim: bool, max: bool) -> Ref {
        self.reduce(&[dim], keepdim, |g| {
            let mut best = 0;
            for (i, &v) in g.iter().enumerate() {
                if (max && v > g[best]) || (!max && v < g[best]) {
                    best = i;
                }
            }
            best as f64
        })
    }

    pub fn logsumexp(&self, dims: &[usize], keepdim: bool) -> Ref {
        self.reduce(dims, keepdim, |g| {
            let m = g.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            m + g.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
        })
    }

    pub fn variance(&self, dims: &[usize], keepdim: bool, unbiased: bool) -> Ref {
        self.reduce(dims, keepdim, |g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let ss: f64 = g.iter().map(|v| (v - mean).powi(2)).sum();
            ss / if unbiased { n - 1.0 } else { n }
        })
    }

    // ---- indexing and joining ----

    pub fn index_select(&self, dim: usize, ids: &[i64]) -> Ref {
        let mut shape = self.shape.clone();
        shape[dim] = ids.len();
        let mut src = vec![0; self.rank()];
        Ref::from_fn(&shape, |idx| {
            src.copy_from_slice(idx);
            src[dim] = ids[idx[dim]] as usize;
            self.at(&src)
        })
    }

    /// `out[i] = self[i with i[dim] = ids[i]]`; `ids` has `ids_shape`.
    pub fn gather(&self, dim: usize, ids: &[i64], ids_shape: &[usize]) -> Ref {
        let strides = contiguous_strides(ids_shape);
        let mut src = vec![0; self.rank()];
        Ref::from_fn(ids_shape, |idx| {
            let flat: usize = idx.iter().zip(&strides).map(|(i, s)| i * s).sum();
            src.copy_from_slice(idx);
            src[dim] = ids[flat] as usize;
            self.at(&src)
        })
    }

    /// `self[i with i[dim] = ids[i]] += src[i]` for every index i of `src` (= ids' shape).
    pub fn scatter_add(&self, dim: usize, ids: &[i64], src: &Ref) -> Ref {
        let mut out = self.clone();
        let mut dst = vec![0; src.rank()];
        for_each_index(&src.shape, |flat, idx| {
            dst.copy_from_slice(idx);
            dst[dim] = ids[flat] as usize;
            let o = out.offset(&dst);
            out.data[o] += src.data[flat];
        });
        out
    }

    /// `self[.., ids[j], ..] += src[.., j, ..]` along `dim`.
    pub fn index_add(&self, dim: usize, ids: &[i64], src: &Ref) -> Ref {
        let mut out = self.clone();
        let mut dst = vec![0; src.rank()];
        for_each_index(&src.shape, |flat, idx| {
            dst.copy_from_slice(idx);
            dst[dim] = ids[idx[dim]] as usize;
            let o = out.offset(&dst);
            out.data[o] += src.data[flat];
        });
        out
    }

    pub fn cat(parts: &[Ref], dim: usize) -> Ref {
        let mut shape = parts[0].shape.clone();
        shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
        Ref::from_fn(&shape, |idx| {
            let mut i = idx[dim];
            for p in parts {
                if i < p.shape[dim] {
                    let mut src = idx.to_vec();
                    src[dim] = i;
                    return p.at(&src);
                }
                i -= p.shape[dim];
            }
            unreachable!()
        })
    }

    pub fn stack(parts: &[Ref], dim: usize) -> Ref {
        let unsq: Vec<Ref> = parts
            .iter()
            .map(|p| {
                let mut s = p.shape.clone();
                s.insert(dim, 1);
                p.reshape(&s)
            })
            .collect();
        Ref::cat(&unsq, dim)
    }

    // ---- matmul ----

    /// `[.., m, k] @ [.., k, n]` with broadcast batch dims.
    pub fn matmul(&self, rhs: &Ref) -> Ref {
        let (ra, rb) = (self.rank(), rhs.rank());
        let (m, k, n) = (self.shape[ra - 2], self.shape[ra - 1], rhs.shape[rb - 1]);
        assert_eq!(k, rhs.shape[rb - 2]);
        let batch = broadcast_shapes(&self.shape[..ra - 2], &rhs.shape[..rb - 2]).unwrap();
        let a = self.broadcast_to(&[batch.as_slice(), &[m, k]].concat());
        let b = rhs.broadcast_to(&[batch.as_slice(), &[k, n]].concat());
        let nb = numel(&batch);
        let mut out = vec![0.0; nb * m * n];
        for bi in 0..nb {
            for i in 0..m {
                for j in 0..n {
                    out[(bi * m + i) * n + j] = (0..k)
                        .map(|p| a.data[(bi * m + i) * k + p] * b.data[(bi * k + p) * n + j])
                        .sum();
                }
            }
        }
        Ref::new(out, &[batch.as_slice(), &[m, n]].concat())
    }

    // ---- fused ops ----

    pub fn softmax(&self, dim: usize) -> Ref {
        self.along(dim, |l| {
            let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        })
    }

    pub fn log_softmax(&self, dim: usize) -> Ref {
        self.along(dim, |l| {
            let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            l.iter().map(|v| v - lse).collect()
        })
    }

    /// (x − mean)/√(var + eps) ⊙ w + b over the last dim (biased variance).
    pub fn layer_norm(&self, w: Option<&Ref>, b: Option<&Ref>, eps: f64) -> Ref {
        let last = self.rank() - 1;
        self.along(last, |l| {
            let n = l.len() as f64;
            let mean = l.iter().sum::<f64>() / n;
            let var = l.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            let r = 1.0 / (var + eps).sqrt();
            l.iter()
                .enumerate()
                .map(|(j, v)| {
                    (v - mean) * r * w.map_or(1.0, |w| w.data[j]) + b.map_or(0.0, |b| b.data[j])
                })
                .collect()
        })
    }

    /// x/√(mean(x²) + eps) ⊙ w over the last dim.
    pub fn rms_norm(&self, w: Option<&Ref>, eps: f64) -> Ref {
        let last = self.rank() - 1;
        self.along(last, |l| {
            let ms = l.iter().map(|v| v * v).sum::<f64>() / l.len() as f64;
            let r = 1.0 / (ms + eps).sqrt();
            l.iter()
                .enumerate()
                .map(|(j, v)| v * r * w.map_or(1.0, |w| w.data[j]))
                .collect()
        })
    }

    /// Mean over kept rows of −log_softmax(row)[target]; 0 when every row is ignored (trit's documented
    /// choice, where PyTorch gives NaN).
    pub fn cross_entropy(&self, targets: &[i64], ignore: Option<i64>) -> Ref {
        let v = *self.shape.last().unwrap();
        let ls = self.log_softmax(self.rank() - 1);
        let (mut total, mut kept) = (0.0, 0usize);
        for (r, &t) in targets.iter().enumerate() {
            if Some(t) == ignore {
                continue;
            }
            total -= ls.data[r * v + t as usize];
            kept += 1;
        }
        Ref::scalar(if kept == 0 { 0.0 } else { total / kept as f64 })
    }

    /// Rotary embedding of [b, h, s, d] at `positions` ([s] or [b, s]): pair (i0, i1) of frequency i turns
    /// by angle p·scale·base^(−2i/d). `interleaved` pairs (2i, 2i+1), otherwise (i, i + d/2).
    pub fn rope(&self, positions: &[i64], base: f64, scale: f64, interleaved: bool) -> Ref {
        let (b, h, s, d) = (self.shape[0], self.shape[1], self.shape[2], self.shape[3]);
        let mut out = self.clone();
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    let p = if positions.len() == s {
                        positions[si]
                    } else {
                        positions[bi * s + si]
                    } as f64;
                    for i in 0..d / 2 {
                        let (i0, i1) = if interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + d / 2)
                        };
                        let angle = p * scale * base.powf(-2.0 * i as f64 / d as f64);
                        let (x0, x1) = (self.at(&[bi, hi, si, i0]), self.at(&[bi, hi, si, i1]));
                        let (o0, o1) =
                            (out.offset(&[bi, hi, si, i0]), out.offset(&[bi, hi, si, i1]));
                        out.data[o0] = x0 * angle.cos() - x1 * angle.sin();
                        out.data[o1] = x1 * angle.cos() + x0 * angle.sin();
                    }
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------------------
// Comparison

/// Asserts `|actual − expected| ≤ atol + rtol·|expected|` elementwise (NaN matches NaN, ±inf must match
/// exactly) and panics naming the worst element otherwise.
pub fn assert_close(what: &str, actual: &[f32], expected: &Ref, atol: f64, rtol: f64) {
    assert_eq!(
        actual.len(),
        expected.numel(),
        "{what}: {} values, expected {} (shape {:?})",
        actual.len(),
        expected.numel(),
        expected.shape
    );
    let mut worst: Option<(usize, f64)> = None;
    let mut bad = 0;
    for (i, (&a, &e)) in actual.iter().zip(&expected.data).enumerate() {
        let a = a as f64;
        let score = if e.is_nan() || a.is_nan() {
            if e.is_nan() && a.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if e.is_infinite() || a.is_infinite() {
            if a == e {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (a - e).abs() / (atol + rtol * e.abs())
        };
        if score > 1.0 {
            bad += 1;
            if worst.is_none_or(|(_, s)| score > s) {
                worst = Some((i, score));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {bad} of {} values out of tolerance (atol {atol:e}, rtol {rtol:e}); worst at {:?} \
             of shape {:?}: got {}, expected {} (|diff| {:e})",
            actual.len(),
            unravel(i, &expected.shape),
            expected.shape,
            actual[i],
            expected.data[i],
            (actual[i] as f64 - expected.data[i]).abs()
        );
    }
}

/// Checks a trit tensor's shape and values against a reference.
pub fn check(what: &str, t: &Tensor, expected: &Ref, atol: f64, rtol: f64) {
    assert_eq!(t.dims(), expected.shape.as_slice(), "{what}: shape");
    assert_close(what, &t.to_vec_f32(), expected, atol, rtol);
}

/// Checks exact equality of a trit tensor with a reference (integer results, views, copies).
pub fn check_exact(what: &str, t: &Tensor, expected: &Ref) {
    check(what, t, expected, 0.0, 0.0);
}

// ---------------------------------------------------------------------------------------------------------
// Strided inputs

/// How to lay out a test input: as a permuted view, a narrowed view of a padded buffer, an every-other-
/// element view (all strides doubled), and/or a stride-0 broadcast of one dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub permute: bool,
    pub narrow: bool,
    pub stride2: bool,
    pub broadcast: bool,
}

impl View {
    pub const CONTIGUOUS: View = View {
        permute: false,
        narrow: false,
        stride2: false,
        broadcast: false,
    };
    /// Non-contiguous but every element distinct (no broadcast).
    pub const STRIDED: View = View {
        permute: true,
        narrow: true,
        stride2: true,
        broadcast: false,
    };

    pub fn without_broadcast(self) -> View {
        View {
            broadcast: false,
            ..self
        }
    }
}

/// Any view kind, contiguous about a third of the time.
pub fn view() -> impl Strategy<Value = View> {
    prop_oneof![
        1 => Just(View::CONTIGUOUS),
        2 => any::<(bool, bool, bool, bool)>().prop_map(|(permute, narrow, stride2, broadcast)| View {
            permute,
            narrow,
            stride2,
            broadcast,
        }),
    ]
}

/// A tensor equal to `r` but laid out as `v` says (ignoring `v.broadcast`): the values sit in a bigger
/// buffer whose other entries are NaN, so a kernel that reads outside the view is caught.
pub fn strided(r: &Ref, v: View, rng: &mut DataRng) -> Tensor {
    let n = r.rank();
    if n == 0 {
        return r.tensor();
    }
    let perm = if v.permute {
        rng.permutation(n)
    } else {
        (0..n).collect()
    };
    let mut inv = vec![0; n];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    // u.permute(perm) == r
    let u = r.permute(&inv);
    let (k, before, after) = if v.narrow {
        (rng.below(n), 1 + rng.below(2), rng.below(3))
    } else {
        (0, 0, 0)
    };
    let mut buf_shape = u.shape.clone();
    buf_shape[k] += before + after;
    if v.stride2 {
        buf_shape.push(2);
    }
    let mut buf = vec![f32::NAN; numel(&buf_shape)];
    let buf_strides = contiguous_strides(&buf_shape);
    for (flat, idx) in indices_of(&u.shape).enumerate() {
        let mut o: usize = idx.iter().zip(&buf_strides).map(|(i, s)| i * s).sum();
        o += before * buf_strides[k];
        if v.stride2 {
            o += 1;
        }
        buf[o] = u.data[flat] as f32;
    }
    let mut t = Tensor::from_vec(buf, buf_shape, CPU).unwrap();
    if v.stride2 {
        t = t.narrow(n, 1, 1).unwrap().squeeze(n).unwrap();
    }
    if v.narrow {
        t = t.narrow(k, before, u.shape[k]).unwrap();
    }
    if v.permute {
        t = t.permute(&perm).unwrap();
    }
    assert_eq!(t.dims(), r.shape.as_slice());
    t
}

/// A random input of `shape` laid out as `v`: with `v.broadcast`, one dim of size > 1 (or a leading dim)
/// is a stride-0 broadcast of a smaller tensor. Returns the tensor and its reference values.
pub fn input(
    shape: &[usize],
    v: View,
    rng: &mut DataRng,
    gen: impl FnMut(&mut DataRng) -> f64,
) -> (Tensor, Ref) {
    let big: Vec<usize> = (0..shape.len()).filter(|&d| shape[d] > 1).collect();
    if v.broadcast && !big.is_empty() {
        let d = big[rng.below(big.len())];
        let base_shape: Vec<usize> = if d == 0 && rng.bool() {
            shape[1..].to_vec()
        } else {
            let mut s = shape.to_vec();
            s[d] = 1;
            s
        };
        let base = Ref::rand(&base_shape, rng, gen);
        let t = strided(&base, v, rng).broadcast_as(shape.to_vec()).unwrap();
        (t, base.broadcast_to(shape))
    } else {
        let r = Ref::rand(shape, rng, gen);
        (strided(&r, v, rng), r)
    }
}

/// `input` with uniform values in [lo, hi).
pub fn input_uniform(
    shape: &[usize],
    v: View,
    rng: &mut DataRng,
    lo: f64,
    hi: f64,
) -> (Tensor, Ref) {
    input(shape, v, rng, |r| r.range(lo, hi))
}

// ---------------------------------------------------------------------------------------------------------
// Strategies

/// A dim size in 1..=9, size 1 more often than uniform.
pub fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(1usize), 4 => 1usize..=9]
}

pub fn shape(min_rank: usize, max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(dim(), min_rank..=max_rank)
}

/// A shape that broadcasts to `out`: some dims set to 1, sometimes leading dims dropped.
pub fn broadcast_side(out: &[usize], rng: &mut DataRng) -> Vec<usize> {
    let drop = if out.is_empty() {
        0
    } else {
        rng.below(out.len() + 1).min(rng.below(out.len() + 1))
    };
    out[drop..]
        .iter()
        .map(|&d| if rng.below(3) == 0 { 1 } else { d })
        .collect()
}

/// Two shapes that broadcast together.
pub fn broadcast_pair(max_rank: usize) -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (shape(0, max_rank), any::<u64>()).prop_map(|(out, seed)| {
        let mut rng = DataRng::new(seed);
        let a = broadcast_side(&out, &mut rng);
        let b = broadcast_side(&out, &mut rng);
        (a, b)
    })
}

/// proptest settings for this suite: `cases` cases (or `PROPTEST_CASES` from the environment, for soak
/// runs), no regression files.
pub fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A shape of rank `min_rank..=max_rank` with a non-empty sorted subset of its dims.
pub fn shape_and_dims(
    min_rank: usize,
    max_rank: usize,
) -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    shape(min_rank.max(1), max_rank).prop_flat_map(|s| {
        let n = s.len();
        (
            Just(s),
            proptest::sample::subsequence((0..n).collect::<Vec<_>>(), 1..=n),
        )
    })
}

/// A shape with one chosen dim.
pub fn shape_and_dim(
    min_rank: usize,
    max_rank: usize,
) -> impl Strategy<Value = (Vec<usize>, usize)> {
    shape(min_rank.max(1), max_rank).prop_flat_map(|s| {
        let n = s.len();
        (Just(s), 0..n)
    })
}
