//! Forward values of every op against the naive f64 reference in `common`, over random shapes (size-1 and
//! broadcast dims included) and strided views; plus dtype casts, creation, Display and error cases.

mod common;

use common::fwd::{nonzero, sym};
use common::*;
use half::{bf16, f16};
use proptest::prelude::*;
use trit::ops::rope::{RopeStyle, RopeTable};
use trit::{DType, Error, Rng, Tensor};

// ---------------------------------------------------------------------------------------------------------
// Unary ops (the table, `UNARY`, is shared with the gradient tests and lives in `common`)

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn unary_ops(shape in shape(0, 4), v in view(), seed in any::<u64>()) {
        for (i, (u, gen)) in unary_forward().enumerate() {
            let mut rng = DataRng::new(seed ^ i as u64);
            let (x, r) = input(&shape, v, &mut rng, gen);
            let out = (u.op)(&x).unwrap();
            prop_assert_eq!(out.dtype(), DType::F32);
            check(u.name, &out, &r.map(u.reference), 1e-6, 4e-6);
        }
    }
}

#[test]
fn unary_special_values() {
    let x = Tensor::from_slice(&[0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, -0.0], CPU).unwrap();
    assert_eq!(
        x.round().unwrap().to_vec::<f32>().unwrap(),
        vec![0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0, -0.0]
    );
    assert_eq!(
        x.sign().unwrap().to_vec::<f32>().unwrap(),
        vec![1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0, 0.0]
    );
    let big = Tensor::from_slice(&[-100f32, 100.0, 0.0], CPU).unwrap();
    assert_eq!(
        big.sigmoid().unwrap().to_vec::<f32>().unwrap(),
        vec![0.0, 1.0, 0.5]
    );
    assert_eq!(
        big.tanh().unwrap().to_vec::<f32>().unwrap(),
        vec![-1.0, 1.0, 0.0]
    );
    assert_eq!(
        big.gelu().unwrap().to_vec::<f32>().unwrap(),
        vec![-0.0, 100.0, 0.0]
    );
    let e = big.exp().unwrap().to_vec::<f32>().unwrap();
    assert_eq!((e[1], e[2]), (f32::INFINITY, 1.0));
    assert!(Tensor::from_slice(&[1f32], CPU)
        .unwrap()
        .clamp(1.0, 0.0)
        .is_err());
}

// ---------------------------------------------------------------------------------------------------------
// Broadcasting binary ops (the table, `BINARY`, is shared with the gradient tests), comparisons, where

type CmpRef = fn(f64, f64) -> bool;

const CMP: &[(&str, BinFn, CmpRef)] = &[
    ("eq", |a, b| a.eq(b), |a, b| a == b),
    ("ne", |a, b| a.ne(b), |a, b| a != b),
    ("lt", |a, b| a.lt(b), |a, b| a < b),
    ("le", |a, b| a.le(b), |a, b| a <= b),
    ("gt", |a, b| a.gt(b), |a, b| a > b),
    ("ge", |a, b| a.ge(b), |a, b| a >= b),
];

/// Values on a coarse grid half the time, so equal elements (ties, eq) occur.
fn gridded(r: &mut DataRng) -> f64 {
    if r.bool() {
        (r.below(5) as f64 - 2.0) / 2.0
    } else {
        r.range(-2.0, 2.0)
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn binary_broadcast(
        (sa, sb) in broadcast_pair(4),
        va in view(),
        vb in view(),
        seed in any::<u64>(),
    ) {
        let want = broadcast_shapes(&sa, &sb).unwrap();
        for (i, (name, f, reference)) in BINARY.iter().enumerate() {
            let mut rng = DataRng::new(seed ^ i as u64);
            let (a, ra) = input(&sa, va, &mut rng, gridded);
            let (b, rb) = if *name == "div" {
                input(&sb, vb, &mut rng, nonzero)
            } else {
                input(&sb, vb, &mut rng, gridded)
            };
            let out = f(&a, &b).unwrap();
            prop_assert_eq!(out.dims(), want.as_slice());
            check(name, &out, &ra.zip(&rb, reference), 1e-6, 2e-6);
        }
    }

    #[test]
    fn comparisons_broadcast(
        (sa, sb) in broadcast_pair(4),
        va in view(),
        vb in view(),
        seed in any::<u64>(),
    ) {
        let mut rng = DataRng::new(seed);
        let (a, ra) = input(&sa, va, &mut rng, gridded);
        let (b, rb) = input(&sb, vb, &mut rng, gridded);
        for (name, f, reference) in CMP {
            let out = f(&a, &b).unwrap();
            prop_assert_eq!(out.dtype(), DType::U8);
            check_exact(name, &out, &ra.zip(&rb, |x, y| reference(x, y) as u8 as f64));
        }
    }

    #[test]
    fn where_cond_broadcast(out_shape in shape(0, 4), vs in proptest::collection::vec(view(), 3), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (sm, st, sf) = (
            broadcast_side(&out_shape, &mut rng),
            broadcast_side(&out_shape, &mut rng),
            broadcast_side(&out_shape, &mut rng),
        );
        // The mask: a u8 tensor with 0/1/2 (any non-zero is true), from a comparison on a strided view.
        let (m0, rm) = input(&sm, vs[0], &mut rng, |r| r.below(3) as f64);
        let mask = m0.ne(&Tensor::zeros((), DType::F32, CPU).unwrap()).unwrap();
        let (t, rt) = input(&st, vs[1], &mut rng, sym);
        let (f, rf) = input(&sf, vs[2], &mut rng, sym);
        let out = Tensor::where_cond(&mask, &t, &f).unwrap();
        let want = Ref::zip3(&rm, &rt, &rf, |m, a, b| if m != 0.0 { a } else { b });
        check_exact("where_cond", &out, &want);
        // An f32 mask works the same way.
        let out = Tensor::where_cond(&m0, &t, &f).unwrap();
        check_exact("where_cond f32 mask", &out, &want);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reductions

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn reductions((shape, dims) in shape_and_dims(1, 4), keepdim in any::<bool>(), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, gridded);
        let n: usize = dims.iter().map(|&d| shape[d]).product();
        let atol = 1e-6 * n as f64;
        let d = dims.clone();
        let (sum, mean, max, min, var_u, var_b) = if keepdim {
            (
                x.sum_keepdim(d.clone()),
                x.mean_keepdim(d.clone()),
                x.max_keepdim(d.clone()),
                x.min_keepdim(d.clone()),
                x.variance_keepdim(d.clone(), true),
                x.variance_keepdim(d.clone(), false),
            )
        } else {
            (
                x.sum(d.clone()),
                x.mean(d.clone()),
                x.max(d.clone()),
                x.min(d.clone()),
                x.variance(d.clone(), true),
                x.variance(d.clone(), false),
            )
        };
        check("sum", &sum.unwrap(), &r.sum(&dims, keepdim), atol, 1e-5);
        check("mean", &mean.unwrap(), &r.mean(&dims, keepdim), 1e-6, 1e-5);
        check_exact("max", &max.unwrap(), &r.max(&dims, keepdim));
        check_exact("min", &min.unwrap(), &r.min(&dims, keepdim));
        // n == 1 makes the unbiased variance 0/0 = NaN (as torch.var); assert_close matches NaN with NaN.
        check("variance unbiased", &var_u.unwrap(), &r.variance(&dims, keepdim, true), 1e-5, 1e-4);
        check("variance biased", &var_b.unwrap(), &r.variance(&dims, keepdim, false), 1e-5, 1e-4);
        check("logsumexp", &x.logsumexp(dims.clone()).unwrap(), &r.logsumexp(&dims, false), 1e-5, 1e-5);
        // All dims.
        let all: Vec<usize> = (0..shape.len()).collect();
        check("sum_all", &x.sum_all().unwrap(), &r.sum(&all, false), 1e-6 * r.numel() as f64, 1e-5);
        check("mean_all", &x.mean_all().unwrap(), &r.mean(&all, false), 1e-6, 1e-5);
    }

    #[test]
    fn arg_reductions((shape, dim) in shape_and_dim(1, 4), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        // Coarse values: ties are common, and the first index of the extreme must win.
        let (x, r) = input(&shape, v, &mut rng, |r| r.below(4) as f64);
        let am = x.argmax(dim).unwrap();
        prop_assert_eq!(am.dtype(), DType::I32);
        check_exact("argmax", &am, &r.arg_extreme(dim, false, true));
        check_exact("argmax_keepdim", &x.argmax_keepdim(dim).unwrap(), &r.arg_extreme(dim, true, true));
        check_exact("argmin", &x.argmin(dim).unwrap(), &r.arg_extreme(dim, false, false));
    }
}

#[test]
fn reductions_negative_dims_and_scalars() {
    let x = Tensor::from_vec((0..24).map(|v| v as f32).collect(), (2, 3, 4), CPU).unwrap();
    let r = Ref::new((0..24).map(|v| v as f64).collect(), &[2, 3, 4]);
    check_exact("sum(-1)", &x.sum(-1).unwrap(), &r.sum(&[2], false));
    check_exact(
        "sum([-1, 0])",
        &x.sum([-1, 0]).unwrap(),
        &r.sum(&[0, 2], false),
    );
    check_exact("max(-2)", &x.max(-2).unwrap(), &r.max(&[1], false));
    assert!(x.sum([0, 0]).is_err(), "duplicate dims");
    assert!(
        x.sum([0, -3]).is_err(),
        "duplicate dims through negative indexing"
    );
    let s = Tensor::scalar_tensor(3.5f32, CPU).unwrap();
    assert_eq!(s.sum_all().unwrap().to_scalar().unwrap(), 3.5);
    assert_eq!(s.mean_all().unwrap().to_scalar().unwrap(), 3.5);
    // logsumexp of a row of -inf is -inf, not NaN.
    let ninf = Tensor::full(f32::NEG_INFINITY, (2, 3), DType::F32, CPU).unwrap();
    assert_eq!(
        ninf.logsumexp(1).unwrap().to_vec::<f32>().unwrap(),
        vec![f32::NEG_INFINITY; 2]
    );
    // logsumexp of large values does not overflow.
    let big = Tensor::from_slice(&[1000f32, 1000.0], CPU).unwrap();
    let l = big.logsumexp(0).unwrap().to_scalar().unwrap();
    assert!((l - (1000.0 + std::f32::consts::LN_2)).abs() < 1e-3, "{l}");
}

// ---------------------------------------------------------------------------------------------------------
// Indexing

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn index_select((shape, dim) in shape_and_dim(1, 4), n in 1usize..=12, v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, sym);
        let ids = rng.indices(n, shape[dim]);
        let out = x.index_select(&ids_tensor(&ids, &[n]), dim).unwrap();
        check_exact("index_select", &out, &r.index_select(dim, &ids));
        // u8 ids work too.
        let ids_u8 = Tensor::from_vec(ids.iter().map(|&i| i as u8).collect::<Vec<u8>>(), n, CPU).unwrap();
        check_exact("index_select u8 ids", &x.index_select(&ids_u8, dim).unwrap(), &r.index_select(dim, &ids));
    }

    #[test]
    fn embedding(vocab in 1usize..=9, d in 1usize..=9, ids_shape in shape(0, 3), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (table, rt) = input(&[vocab, d], v.without_broadcast(), &mut rng, sym);
        let ids = rng.indices(numel(&ids_shape), vocab);
        let out = table.embedding(&ids_tensor(&ids, &ids_shape)).unwrap();
        let want = rt.index_select(0, &ids).reshape(&[ids_shape.as_slice(), &[d]].concat());
        check_exact("embedding", &out, &want);
    }

    #[test]
    fn gather((shape, dim) in shape_and_dim(1, 4), k in 1usize..=6, v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, sym);
        let mut ids_shape = shape.clone();
        ids_shape[dim] = k;
        let ids = rng.indices(numel(&ids_shape), shape[dim]);
        let out = x.gather(&ids_tensor(&ids, &ids_shape), dim).unwrap();
        check_exact("gather", &out, &r.gather(dim, &ids, &ids_shape));
    }

    #[test]
    fn scatter_add((shape, dim) in shape_and_dim(1, 4), k in 1usize..=6, vb in view(), vs in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (base, rb) = input(&shape, vb, &mut rng, sym);
        let mut ids_shape = shape.clone();
        ids_shape[dim] = k;
        let (src, rs) = input(&ids_shape, vs, &mut rng, sym);
        // Few distinct targets, so repeated indices accumulate.
        let ids = rng.indices(numel(&ids_shape), shape[dim].min(3));
        let out = base.scatter_add(&ids_tensor(&ids, &ids_shape), &src, dim).unwrap();
        check("scatter_add", &out, &rb.scatter_add(dim, &ids, &rs), 2e-5, 1e-6); // up to k + 1 f32 terms of size ≤ 4
    }

    #[test]
    fn index_add((shape, dim) in shape_and_dim(1, 4), k in 1usize..=8, vb in view(), vs in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (base, rb) = input(&shape, vb, &mut rng, sym);
        let mut src_shape = shape.clone();
        src_shape[dim] = k;
        let (src, rs) = input(&src_shape, vs, &mut rng, sym);
        let ids = rng.indices(k, shape[dim].min(3));
        let out = base.index_add(&ids_tensor(&ids, &[k]), &src, dim).unwrap();
        check("index_add", &out, &rb.index_add(dim, &ids, &rs), 2e-5, 1e-6); // up to k + 1 f32 terms of size ≤ 4
    }
}

#[test]
fn index_select_empty_and_repeated() {
    let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), (2, 3), CPU).unwrap();
    let none = Tensor::from_vec(Vec::<i32>::new(), 0, CPU).unwrap();
    let out = x.index_select(&none, 1).unwrap();
    assert_eq!(out.dims(), &[2, 0]);
    let rep = Tensor::from_slice(&[2i32, 2, 0, 2], CPU).unwrap();
    assert_eq!(
        x.index_select(&rep, 1).unwrap().to_vec::<f32>().unwrap(),
        vec![2., 2., 0., 2., 5., 5., 3., 5.]
    );
}

// ---------------------------------------------------------------------------------------------------------
// Joining and splitting

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn cat((shape, dim) in shape_and_dim(1, 4), sizes in proptest::collection::vec(1usize..=5, 1..=4), vs in proptest::collection::vec(view(), 4), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (mut ts, mut rs) = (Vec::new(), Vec::new());
        for (i, &s) in sizes.iter().enumerate() {
            let mut sh = shape.clone();
            sh[dim] = s;
            let (t, r) = input(&sh, vs[i], &mut rng, sym);
            ts.push(t);
            rs.push(r);
        }
        check_exact("cat", &Tensor::cat(&ts, dim).unwrap(), &Ref::cat(&rs, dim));
        // Negative dims count from the back.
        let neg = dim as isize - shape.len() as isize;
        check_exact("cat(-d)", &Tensor::cat(&ts, neg).unwrap(), &Ref::cat(&rs, dim));
    }

    #[test]
    fn stack(shape in shape(0, 3), n in 1usize..=4, dim_seed in any::<usize>(), vs in proptest::collection::vec(view(), 4), seed in any::<u64>()) {
        let dim = dim_seed % (shape.len() + 1);
        let mut rng = DataRng::new(seed);
        let (ts, rs): (Vec<Tensor>, Vec<Ref>) = (0..n).map(|i| input(&shape, vs[i], &mut rng, sym)).unzip();
        check_exact("stack", &Tensor::stack(&ts, dim).unwrap(), &Ref::stack(&rs, dim));
    }

    #[test]
    fn chunk((shape, dim) in shape_and_dim(1, 4), n in 1usize..=5, v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, sym);
        let parts = x.chunk(n, dim).unwrap();
        // torch.chunk: chunks of ceil(size / n), the last possibly smaller; fewer than n when it divides so.
        let size = shape[dim];
        let step = size.div_ceil(n);
        let starts: Vec<usize> = (0..size).step_by(step).collect();
        prop_assert_eq!(parts.len(), starts.len());
        for (p, &s) in parts.iter().zip(&starts) {
            check_exact("chunk", p, &r.narrow(dim, s, step.min(size - s)));
            prop_assert!(p.same_storage(&x), "chunks are views");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Views

/// A random shape with `n` elements (of rank 1..=4, with some size-1 dims).
fn factor_shape(n: usize, rng: &mut DataRng) -> Vec<usize> {
    let mut primes = Vec::new();
    let mut m = n;
    let mut p = 2;
    while m > 1 {
        while m.is_multiple_of(p) {
            primes.push(p);
            m /= p;
        }
        p += 1;
    }
    let rank = 1 + rng.below(4);
    let mut shape = vec![1; rank];
    for p in primes {
        shape[rng.below(rank)] *= p;
    }
    shape
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn reshape(shape in shape(0, 4), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, sym);
        let new = factor_shape(r.numel(), &mut rng);
        let out = x.reshape(new.clone()).unwrap();
        check_exact("reshape", &out, &r.reshape(&new));
        if x.layout().is_contiguous() {
            prop_assert!(out.same_storage(&x), "reshape of a contiguous tensor is a view");
        }
        // One inferred dim.
        let mut inferred = new.clone();
        let i = rng.below(new.len());
        inferred[i] = usize::MAX;
        if new.iter().enumerate().all(|(j, &d)| j == i || d > 0) {
            check_exact("reshape(inferred)", &x.reshape(inferred).unwrap(), &r.reshape(&new));
        }
        check_exact("flatten_all", &x.flatten_all().unwrap(), &r.reshape(&[r.numel()]));
    }

    #[test]
    fn permute_transpose(shape in shape(1, 4), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, sym);
        let perm = rng.permutation(shape.len());
        let out = x.permute(&perm).unwrap();
        check_exact("permute", &out, &r.permute(&perm));
        prop_assert!(out.same_storage(&x));
        let (a, b) = (rng.below(shape.len()), rng.below(shape.len()));
        check_exact("transpose", &x.transpose(a, b).unwrap(), &r.transpose(a, b));
        if shape.len() >= 2 {
            let n = shape.len();
            check_exact("t", &x.t().unwrap(), &r.transpose(n - 2, n - 1));
        }
        // A view of a view: permute, then contiguous, then back.
        let c = out.contiguous().unwrap();
        prop_assert!(c.layout().is_contiguous());
        check_exact("contiguous", &c, &r.permute(&perm));
    }

    #[test]
    fn narrow_get_flatten((shape, dim) in shape_and_dim(1, 4), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, sym);
        let start = rng.below(shape[dim]);
        let len = 1 + rng.below(shape[dim] - start);
        let out = x.narrow(dim, start, len).unwrap();
        check_exact("narrow", &out, &r.narrow(dim, start, len));
        prop_assert!(out.same_storage(&x));
        // Narrow of a narrow.
        let s2 = rng.below(len);
        let l2 = 1 + rng.below(len - s2);
        check_exact("narrow.narrow", &out.narrow(dim, s2, l2).unwrap(), &r.narrow(dim, start + s2, l2));
        let i = rng.below(shape[0]);
        check_exact("get", &x.get(i).unwrap(), &r.narrow(0, i, 1).reshape(&shape[1..]));
        let e = rng.below(shape.len() - dim) + dim;
        let merged: Vec<usize> = [&shape[..dim], &[shape[dim..=e].iter().product()], &shape[e + 1..]].concat();
        check_exact("flatten", &x.flatten(dim, e).unwrap(), &r.reshape(&merged));
    }

    #[test]
    fn broadcast_as_and_squeeze(shape in shape(0, 4), lead in 0usize..=2, v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        // Target: leading dims added, some existing size-1 dims expanded.
        let mut src_shape = shape.clone();
        for d in src_shape.iter_mut() {
            if rng.below(3) == 0 {
                *d = 1;
            }
        }
        let (x, r) = input(&src_shape, v.without_broadcast(), &mut rng, sym);
        let target: Vec<usize> = (0..lead).map(|_| 1 + rng.below(4)).chain(shape.iter().copied()).collect();
        let out = x.broadcast_as(target.clone()).unwrap();
        check_exact("broadcast_as", &out, &r.broadcast_to(&target));
        prop_assert!(out.same_storage(&x));
        // Ops on a broadcast view see the repeated values.
        check_exact("broadcast_as.neg", &out.neg().unwrap(), &r.broadcast_to(&target).map(|x| -x));
        // unsqueeze anywhere, then squeeze back.
        let at = rng.below(shape.len() + 1);
        let mut us = src_shape.clone();
        us.insert(at, 1);
        let u = x.unsqueeze(at).unwrap();
        check_exact("unsqueeze", &u, &r.reshape(&us));
        check_exact("squeeze", &u.squeeze(at).unwrap(), &r);
        let mut appended = src_shape.clone();
        appended.push(1);
        check_exact("unsqueeze(-1)", &x.unsqueeze(-1).unwrap(), &r.reshape(&appended));
        // Ops on an unsqueezed strided view (its new stride must be consistent).
        check_exact("unsqueeze.contiguous", &u.contiguous().unwrap(), &r.reshape(&us));
        if let Some(d) = src_shape.iter().position(|&d| d != 1) {
            prop_assert!(x.squeeze(d).is_err(), "squeezing a dim of size {}", src_shape[d]);
        }
    }
}

#[test]
fn contiguous_is_identity_on_contiguous() {
    let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), (2, 3), CPU).unwrap();
    assert!(x.contiguous().unwrap().same_storage(&x));
    let t = x.t().unwrap();
    assert!(!t.layout().is_contiguous());
    let c = t.contiguous().unwrap();
    assert!(!c.same_storage(&x));
    assert_eq!(c.to_vec::<f32>().unwrap(), vec![0., 3., 1., 4., 2., 5.]);
}

// ---------------------------------------------------------------------------------------------------------
// dtype casts

fn cast_values(rng: &mut DataRng, n: usize) -> Vec<f32> {
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        65520.0,
        70000.0,
        -1e6,
        6e-8,
        3e-5,
        1e-40,
        1e38,
        3.4e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 1024.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 512.0,
    ];
    let mut v: Vec<f32> = specials.to_vec();
    v.extend((0..n).map(|_| (rng.normal() * 10f64.powi(rng.below(9) as i32 - 4)) as f32));
    v
}

#[test]
fn cast_f32_to_half() {
    let mut rng = DataRng::new(1);
    let v = cast_values(&mut rng, 500);
    let x = Tensor::from_slice(&v, CPU).unwrap();
    let h = x.to_dtype(DType::F16).unwrap();
    assert_eq!(h.dtype(), DType::F16);
    let got: Vec<u16> = h
        .to_vec::<f16>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let want: Vec<u16> = v.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
    assert_eq!(got, want);
    let b = x.to_dtype(DType::BF16).unwrap();
    let got: Vec<u16> = b
        .to_vec::<bf16>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let want: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
    assert_eq!(got, want);
    // NaN stays NaN.
    let nan = Tensor::from_slice(&[f32::NAN], CPU).unwrap();
    assert!(nan.to_dtype(DType::F16).unwrap().to_vec::<f16>().unwrap()[0].is_nan());
    assert!(nan.to_dtype(DType::BF16).unwrap().to_vec::<bf16>().unwrap()[0].is_nan());
}

#[test]
fn cast_half_to_f32_and_between_halves() {
    // Every finite f16 bit pattern.
    let all: Vec<f16> = (0..=u16::MAX)
        .map(f16::from_bits)
        .filter(|h| h.is_finite())
        .collect();
    let x = Tensor::from_slice(&all, CPU).unwrap();
    let f = x.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
    assert!(f
        .iter()
        .zip(&all)
        .all(|(a, h)| a.to_bits() == h.to_f32().to_bits()));
    let b = x.to_dtype(DType::BF16).unwrap().to_vec::<bf16>().unwrap();
    assert!(b
        .iter()
        .zip(&all)
        .all(|(b, h)| b.to_bits() == bf16::from_f32(h.to_f32()).to_bits()));
    let allb: Vec<bf16> = (0..=u16::MAX)
        .map(bf16::from_bits)
        .filter(|h| h.is_finite())
        .collect();
    let y = Tensor::from_slice(&allb, CPU).unwrap();
    let f = y.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
    assert!(f
        .iter()
        .zip(&allb)
        .all(|(a, h)| a.to_bits() == h.to_f32().to_bits()));
    let h = y.to_dtype(DType::F16).unwrap().to_vec::<f16>().unwrap();
    assert!(h
        .iter()
        .zip(&allb)
        .all(|(a, b)| a.to_bits() == f16::from_f32(b.to_f32()).to_bits()));
}

#[test]
fn cast_integers() {
    // f32 -> integers truncates toward zero (as PyTorch) and saturates.
    let v = [
        0.4f32, 0.5, -0.5, 1.5, 2.5, -2.6, 254.6, 300.0, -7.0, 1e10, -1e10,
    ];
    let x = Tensor::from_slice(&v, CPU).unwrap();
    assert_eq!(
        x.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        vec![0, 0, 0, 1, 2, -2, 254, 300, -7, i32::MAX, i32::MIN]
    );
    assert_eq!(
        x.to_dtype(DType::U8).unwrap().to_vec::<u8>().unwrap(),
        vec![0, 0, 0, 1, 2, 0, 254, 255, 0, 255, 0]
    );
    // Integers -> floats are exact in range.
    let i = Tensor::from_slice(&[-5i32, 0, 7, 1 << 20, -(1 << 24)], CPU).unwrap();
    assert_eq!(
        i.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap(),
        vec![-5.0, 0.0, 7.0, (1 << 20) as f32, -(1 << 24) as f32]
    );
    assert_eq!(
        i.to_dtype(DType::BF16).unwrap().to_vec_f32(),
        vec![-5.0, 0.0, 7.0, (1 << 20) as f32, -(1 << 24) as f32]
    );
    let u = Tensor::from_slice(&[0u8, 1, 128, 255], CPU).unwrap();
    assert_eq!(
        u.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap(),
        vec![0., 1., 128., 255.]
    );
    assert_eq!(
        u.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
        vec![0, 1, 128, 255]
    );
    assert_eq!(
        u.to_dtype(DType::F16).unwrap().to_vec_f32(),
        vec![0., 1., 128., 255.]
    );
    let small = Tensor::from_slice(&[0i32, 3, 255], CPU).unwrap();
    assert_eq!(
        small.to_dtype(DType::U8).unwrap().to_vec::<u8>().unwrap(),
        vec![0, 3, 255]
    );
    // to_vec with the wrong type is an error.
    assert!(u.to_vec::<f32>().is_err());
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn casts_of_strided_views(shape in shape(1, 4), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, |r| r.range(-300.0, 300.0));
        let h: Vec<u16> = x.to_dtype(DType::F16).unwrap().to_vec::<f16>().unwrap().iter().map(|h| h.to_bits()).collect();
        let want: Vec<u16> = r.data.iter().map(|&x| f16::from_f32(x as f32).to_bits()).collect();
        prop_assert_eq!(h, want);
        let b = x.to_dtype(DType::BF16).unwrap();
        let back = b.to_dtype(DType::F32).unwrap();
        check_exact("bf16 round trip", &back, &r.map(|x| bf16::from_f32(x as f32).to_f64()));
        let i = x.to_dtype(DType::I32).unwrap();
        check_exact("to i32", &i, &r.map(f64::trunc));
    }

    /// Ops on f16/bf16 tensors compute in f32 and round the result once.
    #[test]
    fn half_precision_ops(shape in shape(1, 3), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let a = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        let b = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        for (dtype, ulp) in [(DType::F16, 2f64.powi(-10)), (DType::BF16, 2f64.powi(-7))] {
            let (ta, tb) = (a.tensor().to_dtype(dtype).unwrap(), b.tensor().to_dtype(dtype).unwrap());
            let (ra, rb) = (
                Ref::new(ta.to_vec_f32().iter().map(|&v| v as f64).collect(), &shape),
                Ref::new(tb.to_vec_f32().iter().map(|&v| v as f64).collect(), &shape),
            );
            let out = ta.mul(&tb).unwrap().exp().unwrap();
            prop_assert_eq!(out.dtype(), dtype);
            // The product is stored in `dtype` before exp reads it.
            // (half's from_f64 drops low mantissa bits before rounding, so round through the exact f32.)
            let round = |v: f64| if dtype == DType::F16 { f16::from_f32(v as f32).to_f64() } else { bf16::from_f32(v as f32).to_f64() };
            check("half mul.exp", &out, &ra.zip(&rb, |x, y| round(x * y).exp()), 0.0, ulp);
            let s = ta.sum(0).unwrap();
            prop_assert_eq!(s.dtype(), dtype);
            check("half sum", &s, &ra.sum(&[0], false), 1e-4, ulp);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Creation

#[test]
fn creation() {
    for dtype in [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I8,
        DType::U8,
    ] {
        let z = Tensor::zeros((2, 3), dtype, CPU).unwrap();
        assert_eq!((z.dims(), z.dtype()), (&[2usize, 3][..], dtype));
        assert_eq!(z.to_vec_f32(), vec![0.0; 6]);
        assert_eq!(
            Tensor::ones(4, dtype, CPU).unwrap().to_vec_f32(),
            vec![1.0; 4]
        );
        assert_eq!(
            Tensor::full(3.0, (1, 2), dtype, CPU).unwrap().to_vec_f32(),
            vec![3.0; 2]
        );
        assert_eq!(z.ones_like().unwrap().dtype(), dtype);
    }
    assert_eq!(
        Tensor::full(-1.5, (), DType::F32, CPU)
            .unwrap()
            .to_scalar()
            .unwrap(),
        -1.5
    );
    let a = Tensor::arange(-3, 4, CPU).unwrap();
    assert_eq!(a.dtype(), DType::I32);
    assert_eq!(a.to_vec::<i32>().unwrap(), (-3..4).collect::<Vec<i32>>());
    assert_eq!(Tensor::arange(5, 5, CPU).unwrap().dims(), &[0]);
    assert!(Tensor::arange(5, 4, CPU).is_err());
    let f = |s, e, st| {
        Tensor::arange_f32(s, e, st, CPU)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(f(0.0, 5.0, 1.0), vec![0., 1., 2., 3., 4.]);
    assert_eq!(f(0.0, 1.0, 0.25), vec![0., 0.25, 0.5, 0.75]);
    assert_eq!(f(0.0, 1.1, 0.25), vec![0., 0.25, 0.5, 0.75, 1.0]);
    assert_eq!(f(5.0, 0.0, -1.5), vec![5.0, 3.5, 2.0, 0.5]);
    assert_eq!(f(1.0, 0.0, 1.0), Vec::<f32>::new());
    assert!(Tensor::arange_f32(0.0, 1.0, 0.0, CPU).is_err());
    assert!(Tensor::arange_f32(0.0, f32::NAN, 1.0, CPU).is_err());
    assert_eq!(
        Tensor::from_slice(&[1u8, 2], CPU)
            .unwrap()
            .to_vec::<u8>()
            .unwrap(),
        vec![1, 2]
    );
    let s = Tensor::scalar_tensor(7i32, CPU).unwrap();
    assert_eq!((s.rank(), s.to_vec_i64()), (0, vec![7]));
}

#[test]
fn randn_moments_and_seeding() {
    let n = 100_000;
    let x = Tensor::randn(n, 0.0, 1.0, &mut Rng::new(7), CPU)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.02, "mean {mean}");
    assert!((var.sqrt() - 1.0).abs() < 0.02, "std {}", var.sqrt());
    // Tails look normal: about 4.55% beyond 2σ.
    let tail = x.iter().filter(|v| v.abs() > 2.0).count() as f64 / n as f64;
    assert!((tail - 0.0455).abs() < 0.005, "P(|x| > 2) = {tail}");
    let y = Tensor::randn((10, 10), 3.0, 0.5, &mut Rng::new(7), CPU)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let x2 = Tensor::randn(100, 0.0, 1.0, &mut Rng::new(7), CPU)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert!(y
        .iter()
        .zip(&x2)
        .all(|(a, b)| (a - (3.0 + 0.5 * b)).abs() < 1e-6));
    assert_eq!(x2, x[..100].to_vec(), "same seed, same draws");
    let other = Tensor::randn(100, 0.0, 1.0, &mut Rng::new(8), CPU)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert_ne!(x2, other);
}

#[test]
fn uniform_bounds() {
    let n = 100_000;
    let x = Tensor::uniform(n, -2.0, 3.0, &mut Rng::new(3), CPU)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert!(x.iter().all(|&v| (-2.0..3.0).contains(&v)));
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    let below0 = x.iter().filter(|&&v| v < 0.0).count() as f64 / n as f64;
    assert!((below0 - 0.4).abs() < 0.01, "P(x < 0) = {below0}");
}

// ---------------------------------------------------------------------------------------------------------
// Display

#[test]
fn display() {
    let x = Tensor::from_vec(vec![1f32, -2.5, 3.0, 0.125, 5.0, 6.0], (2, 3), CPU).unwrap();
    assert_eq!(
        x.to_string(),
        "[[1.0000, -2.5000, 3.0000],\n [0.1250, 5.0000, 6.0000]]\nTensor[[2, 3], f32, cpu]"
    );
    let i = Tensor::from_vec(vec![1i32, 2, 3, 4, 5, 6], (2, 3), CPU).unwrap();
    assert_eq!(
        i.to_string(),
        "[[1, 2, 3],\n [4, 5, 6]]\nTensor[[2, 3], i32, cpu]"
    );
    let long = Tensor::arange(0, 10, CPU).unwrap();
    assert_eq!(
        long.to_string(),
        "[0, 1, 2, ..., 7, 8, 9]\nTensor[[10], i32, cpu]"
    );
    // A strided view prints its logical order.
    assert_eq!(
        x.t().unwrap().to_string(),
        "[[1.0000, 0.1250],\n [-2.5000, 5.0000],\n [3.0000, 6.0000]]\nTensor[[3, 2], f32, cpu]"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Errors are Err, never panics

#[test]
fn errors() {
    let a = Tensor::zeros((2, 3), DType::F32, CPU).unwrap();
    let b = Tensor::zeros((4, 3), DType::F32, CPU).unwrap();
    assert!(matches!(a.add(&b), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(a.lt(&b), Err(Error::ShapeMismatch { .. })));
    assert!(Tensor::where_cond(&a, &a, &b).is_err());
    assert!(matches!(a.matmul(&b), Err(Error::ShapeMismatch { .. })));
    assert!(
        a.matmul(&Tensor::zeros(3, DType::F32, CPU).unwrap())
            .is_err(),
        "1-d operand"
    );
    let batch = |s: &[usize]| Tensor::zeros(s.to_vec(), DType::F32, CPU).unwrap();
    assert!(
        batch(&[2, 2, 3]).matmul(&batch(&[3, 3, 4])).is_err(),
        "batch dims 2 vs 3"
    );
    assert!(
        a.matmul(&a.t().unwrap().to_dtype(DType::F16).unwrap())
            .is_err(),
        "dtype mismatch"
    );
    assert!(
        a.add(&a.to_dtype(DType::BF16).unwrap()).is_err(),
        "dtype mismatch"
    );
    assert!(matches!(
        Tensor::cat(&[a.clone(), batch(&[2, 4])], 0),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(
        Tensor::cat(&[a.clone(), batch(&[2, 3, 1])], 0).is_err(),
        "rank mismatch"
    );
    assert!(Tensor::cat(&[], 0).is_err());
    assert!(Tensor::stack(&[a.clone(), b.clone()], 0).is_err());
    // Indices out of range.
    let ids = Tensor::from_slice(&[0i32, 2], CPU).unwrap();
    assert!(matches!(
        a.index_select(&ids, 0),
        Err(Error::IndexOutOfRange { index: 2, .. })
    ));
    let neg = Tensor::from_slice(&[-1i32], CPU).unwrap();
    assert!(matches!(
        a.index_select(&neg, 1),
        Err(Error::IndexOutOfRange { index: -1, .. })
    ));
    assert!(matches!(
        a.embedding(&ids),
        Err(Error::IndexOutOfRange { .. })
    ));
    assert!(a.embedding(&neg).is_err());
    assert!(a.index_select(&a, 0).is_err(), "float ids");
    assert!(
        a.index_select(&ids.reshape((1, 2)).unwrap(), 0).is_err(),
        "2-d ids"
    );
    let gids = Tensor::from_vec(vec![0i32, 1, 3, 0, 1, 2], (2, 3), CPU).unwrap();
    assert!(a.gather(&gids, 1).is_err());
    assert!(a.scatter_add(&gids, &a, 1).is_err());
    assert!(a.index_add(&ids, &a, 0).is_err());
    // Bad dims.
    assert!(matches!(a.sum(2), Err(Error::DimOutOfRange { .. })));
    assert!(a.sum(-3).is_err());
    assert!(a.softmax(5).is_err());
    assert!(a.narrow(2, 0, 1).is_err());
    assert!(a.narrow(1, 2, 2).is_err(), "narrow past the end");
    assert!(a.narrow(1, usize::MAX, 2).is_err(), "overflowing narrow");
    assert!(a.transpose(0, 2).is_err());
    assert!(a.permute(&[0, 0]).is_err());
    assert!(a.permute(&[0]).is_err());
    assert!(a.unsqueeze(3).is_err());
    assert!(a.squeeze(0).is_err());
    assert!(a.argmax(2).is_err());
    assert!(a.index_select(&ids, 2).is_err());
    assert!(a.chunk(0, 0).is_err());
    assert!(Tensor::zeros(3, DType::F32, CPU).unwrap().t().is_err());
    // Reshape to the wrong element count.
    assert!(matches!(
        a.reshape((4, 2)),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(a.reshape((usize::MAX, 4)).is_err());
    assert!(a.reshape((usize::MAX, usize::MAX)).is_err());
    assert!(a.broadcast_as((3, 3)).is_err());
    assert!(a.broadcast_as(3).is_err());
    // from_vec with the wrong length.
    assert!(Tensor::from_vec(vec![1f32; 5], (2, 3), CPU).is_err());
    assert!(Tensor::from_vec(vec![1f32; 7], (2, 3), CPU).is_err());
    // No CUDA backend: Err, not a panic.
    let cuda = trit::Device::Cuda(0);
    assert!(matches!(
        Tensor::from_vec(vec![1f32], 1, cuda),
        Err(Error::NoCudaDevice(_))
    ));
    assert!(matches!(
        Tensor::zeros(3, DType::F32, cuda),
        Err(Error::NoCudaDevice(_))
    ));
    assert!(Tensor::randn(3, 0.0, 1.0, &mut Rng::new(0), cuda).is_err());
    assert!(a.to_device(cuda).is_err());
    // Scalars where a shape is needed.
    assert!(a.to_scalar().is_err());
    assert!(Tensor::zeros(3, DType::F32, CPU)
        .unwrap()
        .to_vec2_f32()
        .is_err());
    // Fused ops.
    assert!(a.layer_norm(Some(&batch(&[2])), None, 1e-5).is_err());
    assert!(a.rms_norm(None, -1.0).is_err());
    let t = Tensor::from_slice(&[0i32, 3], CPU).unwrap();
    assert!(matches!(
        a.cross_entropy(&t, None),
        Err(Error::IndexOutOfRange { index: 3, .. })
    ));
    assert!(a
        .cross_entropy(&Tensor::from_slice(&[0i32], CPU).unwrap(), None)
        .is_err());
    assert!(
        a.cross_entropy(&a.sum(1).unwrap(), None).is_err(),
        "float targets"
    );
    assert!(a.dropout(1.5, &mut Rng::new(0)).is_err());
    assert!(a.dropout(-0.1, &mut Rng::new(0)).is_err());
    assert!(
        RopeTable::new(3, 8, 10000.0, 1.0, RopeStyle::Half, CPU).is_err(),
        "odd head_dim"
    );
    assert!(RopeTable::new(4, 8, 10000.0, 0.0, RopeStyle::Half, CPU).is_err());
    let table = RopeTable::new(4, 8, 10000.0, 1.0, RopeStyle::Half, CPU).unwrap();
    let x = batch(&[1, 1, 2, 4]);
    assert!(
        x.rope(&table, &Tensor::from_slice(&[0i32, 8], CPU).unwrap())
            .is_err(),
        "position past the table"
    );
    assert!(x
        .rope(&table, &Tensor::from_slice(&[0i32, -1], CPU).unwrap())
        .is_err());
    assert!(x
        .rope(&table, &Tensor::from_slice(&[0i32, 1, 2], CPU).unwrap())
        .is_err());
    assert!(batch(&[1, 1, 2, 6])
        .rope(&table, &Tensor::from_slice(&[0i32, 1], CPU).unwrap())
        .is_err());
    assert!(a.rope(&table, &ids).is_err(), "rank 2");
}

// ---------------------------------------------------------------------------------------------------------
// Fused ops

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn softmax_any_dim((shape, dim) in shape_and_dim(1, 4), v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, v, &mut rng, |r| r.range(-8.0, 8.0));
        check("softmax", &x.softmax(dim).unwrap(), &r.softmax(dim), 1e-7, 1e-5);
        check("log_softmax", &x.log_softmax(dim).unwrap(), &r.log_softmax(dim), 2e-6, 1e-5);
        let neg = dim as isize - shape.len() as isize;
        check("softmax(-d)", &x.softmax(neg).unwrap(), &r.softmax(dim), 1e-7, 1e-5);
    }

    #[test]
    fn norms(shape in shape(1, 4), v in view(), wv in view(), with_w in any::<bool>(), with_b in any::<bool>(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let offset = rng.range(-3.0, 3.0);
        let (x, r) = input(&shape, v, &mut rng, |r| offset + r.range(-2.0, 2.0));
        let d = *shape.last().unwrap();
        let (w, rw) = input(&[d], wv.without_broadcast(), &mut rng, |r| r.range(0.5, 1.5));
        let (b, rb) = input(&[d], wv.without_broadcast(), &mut rng, sym);
        let (w, rw) = if with_w { (Some(&w), Some(&rw)) } else { (None, None) };
        let (b, rb) = if with_b { (Some(&b), Some(&rb)) } else { (None, None) };
        for eps in [1e-5, 0.1] {
            check("layer_norm", &x.layer_norm(w, b, eps as f32).unwrap(), &r.layer_norm(rw, rb, eps), 2e-5, 1e-4);
            check("rms_norm", &x.rms_norm(w, eps as f32).unwrap(), &r.rms_norm(rw, eps), 2e-5, 1e-4);
        }
    }

    #[test]
    fn cross_entropy(lead in shape(0, 2), vocab in 1usize..=12, ignore in prop_oneof![Just(None), Just(Some(-100i64)), Just(Some(0i64))], v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let shape: Vec<usize> = lead.iter().copied().chain([vocab]).collect();
        let (x, r) = input(&shape, v, &mut rng, |r| r.range(-6.0, 6.0));
        let mut targets = rng.indices(numel(&lead), vocab);
        if let Some(ig) = ignore {
            for t in targets.iter_mut() {
                if rng.below(3) == 0 {
                    *t = ig;
                }
            }
        }
        let loss = x.cross_entropy(&ids_tensor(&targets, &lead), ignore).unwrap();
        prop_assert_eq!(loss.rank(), 0);
        // Rows all ignored give 0 (trit's documented choice; PyTorch gives NaN).
        check("cross_entropy", &loss, &r.cross_entropy(&targets, ignore), 1e-5, 1e-5);
    }

    #[test]
    fn rope(b in 1usize..=3, h in 1usize..=3, s in 1usize..=6, half in 1usize..=8, per_batch in any::<bool>(),
            interleaved in any::<bool>(), base in prop_oneof![Just(10000f32), Just(500000f32)],
            scale in prop_oneof![Just(1f32), Just(0.25f32)], v in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let d = 2 * half;
        let max_pos = 64;
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::Half };
        let table = RopeTable::new(d, max_pos, base, scale, style, CPU).unwrap();
        let (x, r) = input(&[b, h, s, d], v, &mut rng, sym);
        let pos_shape = if per_batch { vec![b, s] } else { vec![s] };
        let positions = rng.indices(numel(&pos_shape), max_pos);
        let out = x.rope(&table, &ids_tensor(&positions, &pos_shape)).unwrap();
        check("rope", &out, &r.rope(&positions, base as f64, scale as f64, interleaved), 2e-5, 1e-5);
    }
}

#[test]
fn rope_explicit_positions() {
    // One pair, head_dim 2: position p rotates (x0, x1) by p radians (theta_0 = 1).
    let table = RopeTable::new(2, 4, 10000.0, 1.0, RopeStyle::Half, CPU).unwrap();
    let x = Tensor::from_vec(vec![1f32, 0.0, 1.0, 0.0, 0.0, 1.0], (1, 1, 3, 2), CPU).unwrap();
    let out = x
        .rope(&table, &Tensor::from_slice(&[0i32, 1, 3], CPU).unwrap())
        .unwrap();
    let want = Ref::new(
        vec![1.0, 0.0, 1f64.cos(), 1f64.sin(), -(3f64.sin()), 3f64.cos()],
        &[1, 1, 3, 2],
    );
    check("rope explicit", &out, &want, 1e-6, 0.0);
    // Position 0 is the identity for any style.
    let t4 = RopeTable::new(4, 2, 10000.0, 1.0, RopeStyle::Interleaved, CPU).unwrap();
    let y = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (1, 1, 1, 4), CPU).unwrap();
    let out = y
        .rope(&t4, &Tensor::from_slice(&[0i32], CPU).unwrap())
        .unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn cross_entropy_all_ignored_is_zero() {
    let x = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3), CPU)
        .unwrap()
        .var()
        .unwrap();
    let t = Tensor::from_slice(&[-100i32, -100], CPU).unwrap();
    let loss = x.cross_entropy(&t, Some(-100)).unwrap();
    assert_eq!(
        loss.to_scalar().unwrap().to_bits(),
        0f32.to_bits(),
        "a plain +0, not -0"
    );
    let g = loss.backward().unwrap();
    assert_eq!(g.get(&x).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 6]);
}

#[test]
fn dropout() {
    let n = 100_000;
    let x = Tensor::uniform(n, 1.0, 2.0, &mut Rng::new(1), CPU).unwrap();
    let xv = x.to_vec::<f32>().unwrap();
    for p in [0.1f32, 0.5, 0.9] {
        let out = x
            .dropout(p, &mut Rng::new(42))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let zeroed = out.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!(
            (zeroed - p as f64).abs() < 0.01,
            "p {p}: fraction zeroed {zeroed}"
        );
        let scale = 1.0 / (1.0 - p as f64);
        for (&o, &i) in out.iter().zip(&xv) {
            if o != 0.0 {
                let want = i as f64 * scale;
                assert!(
                    (o as f64 - want).abs() <= 1e-6 * want,
                    "kept {i} became {o}, expected {want}"
                );
            }
        }
        let again = x
            .dropout(p, &mut Rng::new(42))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(out, again, "same seed, same mask");
        let other = x
            .dropout(p, &mut Rng::new(43))
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_ne!(out, other, "another seed, another mask");
    }
    // Consecutive calls on one Rng draw different masks.
    let mut rng = Rng::new(5);
    let m1 = x.dropout(0.5, &mut rng).unwrap().to_vec::<f32>().unwrap();
    let m2 = x.dropout(0.5, &mut rng).unwrap().to_vec::<f32>().unwrap();
    assert_ne!(m1, m2);
    assert_eq!(
        x.dropout(0.0, &mut rng).unwrap().to_vec::<f32>().unwrap(),
        xv
    );
    assert_eq!(
        x.dropout(1.0, &mut rng).unwrap().to_vec::<f32>().unwrap(),
        vec![0.0; n]
    );
    // Strided input and f16 input keep their shape and dtype.
    let y = Tensor::ones((4, 6), DType::F16, CPU).unwrap().t().unwrap();
    let d = y.dropout(0.5, &mut rng).unwrap();
    assert_eq!((d.dims(), d.dtype()), (&[6usize, 4][..], DType::F16));
    assert!(d.to_vec_f32().iter().all(|&v| v == 0.0 || v == 2.0));
}

// ---------------------------------------------------------------------------------------------------------
// Empty tensors

#[test]
fn empty_tensors() {
    let e = Tensor::zeros((3, 0), DType::F32, CPU).unwrap();
    assert_eq!(
        e.sum(1).unwrap().to_vec::<f32>().unwrap(),
        vec![0.0; 3],
        "an empty sum is 0"
    );
    assert_eq!(e.sum(0).unwrap().dims(), &[0]);
    assert_eq!(
        e.max(1).unwrap().to_vec::<f32>().unwrap(),
        vec![f32::NEG_INFINITY; 3]
    );
    assert_eq!(
        e.min(1).unwrap().to_vec::<f32>().unwrap(),
        vec![f32::INFINITY; 3]
    );
    assert!(
        e.mean(1)
            .unwrap()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_nan()),
        "0/0"
    );
    assert!(
        e.argmax(1).is_err(),
        "no index to return along an empty dim"
    );
    assert!(e.argmin(1).is_err());
    assert_eq!(
        Tensor::zeros((0, 2), DType::F32, CPU)
            .unwrap()
            .argmax(1)
            .unwrap()
            .dims(),
        &[0]
    );
    assert_eq!(e.exp().unwrap().dims(), &[3, 0]);
    assert_eq!(e.t().unwrap().exp().unwrap().dims(), &[0, 3]);
    assert_eq!(
        e.add(&Tensor::ones(1, DType::F32, CPU).unwrap())
            .unwrap()
            .dims(),
        &[3, 0]
    );
    assert_eq!(e.softmax(1).unwrap().dims(), &[3, 0]);
    assert_eq!(e.softmax(0).unwrap().dims(), &[3, 0]);
    let ones = Tensor::ones((3, 2), DType::F32, CPU).unwrap();
    assert_eq!(
        Tensor::cat(&[e.clone(), ones.clone()], 1)
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![1.0; 6]
    );
    assert_eq!(ones.narrow(1, 2, 0).unwrap().dims(), &[3, 0]);
    assert_eq!(e.reshape((0, 7)).unwrap().dims(), &[0, 7]);
    assert_eq!(e.to_dtype(DType::F16).unwrap().dims(), &[3, 0]);
    assert_eq!(e.to_string(), "[[],\n [],\n []]\nTensor[[3, 0], f32, cpu]");
}

// ---------------------------------------------------------------------------------------------------------
// Large inputs: past the parallel threshold (32k elements), so the chunked parallel kernels (which start
// strided walks mid-tensor) run.

fn large_shape() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (150usize..=400, 150usize..=300).prop_map(|(a, b)| vec![a, b]),
        (20usize..=40, 30usize..=50, 40usize..=70).prop_map(|(a, b, c)| vec![a, b, c]),
        (5usize..=9, 7usize..=13, 20usize..=30, 33usize..=40)
            .prop_map(|(a, b, c, d)| vec![a, b, c, d]),
    ]
}

proptest! {
    #![proptest_config(config(6))]

    #[test]
    fn large_inputs(shape in large_shape(), va in view(), vb in view(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (x, r) = input(&shape, va, &mut rng, sym);
        check("large gelu", &x.gelu().unwrap(), &r.map(gelu_erf), 1e-6, 4e-6);
        check("large exp", &x.exp().unwrap(), &r.map(f64::exp), 1e-6, 4e-6);
        let side = broadcast_side(&shape, &mut rng);
        let (y, ry) = input(&side, vb, &mut rng, sym);
        check("large mul", &x.mul(&y).unwrap(), &r.zip(&ry, |a, b| a * b), 1e-6, 2e-6);
        check("large maximum", &y.maximum(&x).unwrap(), &ry.zip(&r, f64::max), 0.0, 0.0);
        let mask = x.gt(&y).unwrap();
        check_exact("large where", &Tensor::where_cond(&mask, &x, &y).unwrap(), &r.zip(&ry, f64::max));
        let rank = shape.len();
        let d = rng.below(rank);
        let n = shape[d] as f64;
        check("large sum", &x.sum(d).unwrap(), &r.sum(&[d], false), 1e-6 * n, 1e-5);
        check_exact("large max", &x.max_keepdim(d).unwrap(), &r.max(&[d], true));
        let rest: Vec<usize> = (0..rank).filter(|&i| i != d).collect();
        check("large sum of the others", &x.sum(rest.clone()).unwrap(), &r.sum(&rest, false), 1e-5 * (r.numel() as f64 / n), 1e-5);
        check_exact("large argmax", &x.argmax(d).unwrap(), &r.arg_extreme(d, false, true));
        check("large softmax", &x.softmax(d).unwrap(), &r.softmax(d), 1e-7, 1e-5);
        check("large log_softmax", &x.log_softmax(rank - 1).unwrap(), &r.log_softmax(rank - 1), 2e-6, 1e-5);
        check("large layer_norm", &x.layer_norm(None, None, 1e-5).unwrap(), &r.layer_norm(None, None, 1e-5), 2e-5, 1e-4);
        check_exact("large contiguous", &x.contiguous().unwrap(), &r);
        check_exact("large permute.contiguous", &x.t().unwrap().contiguous().unwrap(), &r.transpose(rank - 2, rank - 1));
        let h: Vec<u16> = x.to_dtype(DType::BF16).unwrap().to_vec::<bf16>().unwrap().iter().map(|h| h.to_bits()).collect();
        let want: Vec<u16> = r.data.iter().map(|&v| bf16::from_f32(v as f32).to_bits()).collect();
        prop_assert_eq!(h, want);
        let ids = rng.indices(7, shape[d]);
        check_exact("large index_select", &x.index_select(&ids_tensor(&ids, &[7]), d).unwrap(), &r.index_select(d, &ids));
        let mut gshape = shape.clone();
        gshape[d] = 3;
        let gids = rng.indices(numel(&gshape), shape[d]);
        check_exact("large gather", &x.gather(&ids_tensor(&gids, &gshape), d).unwrap(), &r.gather(d, &gids, &gshape));
        check_exact("large cat", &Tensor::cat(&[x.clone(), x.clone()], d).unwrap(), &Ref::cat(&[r.clone(), r.clone()], d));
    }
}

#[test]
fn norms_of_empty_rows_are_empty() {
    let x = Tensor::zeros((3, 0), DType::F32, CPU).unwrap();
    assert_eq!(x.layer_norm(None, None, 1e-5).unwrap().dims(), &[3, 0]);
    assert_eq!(x.rms_norm(None, 1e-5).unwrap().dims(), &[3, 0]);
}

#[test]
fn clamp_passes_the_gradient_at_its_bounds_like_pytorch() {
    let x = Tensor::from_slice(&[-1.0f32, -0.5, 0.0, 0.75, 1.0], CPU)
        .unwrap()
        .var()
        .unwrap();
    let g = x
        .clamp(-0.5, 0.75)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        g.get(&x).unwrap().to_vec::<f32>().unwrap(),
        vec![0.0, 1.0, 1.0, 1.0, 0.0]
    );
}
