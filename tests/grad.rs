//! Gradients of every differentiable op against central finite differences of the f64 reference in
//! `common`. The loss is Σ out ⊙ w for fixed random weights w; the finite differences are taken on the
//! f64 reference, so they are exact to ~1e-9 and the tolerance can be tight (1e-3 relative).

mod common;

use common::*;
use proptest::prelude::*;
use trit::ops::rope::{RopeStyle, RopeTable};
use trit::{no_grad, DType, GradStore, Rng, Shape, Tensor};

type R<T> = trit::Result<T>;

/// Checks trit's gradients of `f` at `inputs` (each becomes a variable) against finite differences of
/// `reference`. Also checks the forward values.
fn grad_check<const N: usize>(
    name: &str,
    inputs: [Ref; N],
    seed: u64,
    f: impl Fn(&[Tensor]) -> R<Tensor>,
    reference: impl Fn(&[Ref]) -> Ref,
) {
    grad_check_sampled(name, inputs, seed, usize::MAX, f, reference)
}

/// `grad_check` on at most `max_checked` elements of each input (the first, the last and a random
/// sample), for inputs too large to difference every element.
fn grad_check_sampled<const N: usize>(
    name: &str,
    inputs: [Ref; N],
    seed: u64,
    max_checked: usize,
    f: impl Fn(&[Tensor]) -> R<Tensor>,
    reference: impl Fn(&[Ref]) -> Ref,
) {
    let vars: Vec<Tensor> = inputs.iter().map(Ref::var).collect();
    let out = f(&vars).unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let ref_out = reference(&inputs);
    check(&format!("{name} forward"), &out, &ref_out, 1e-5, 1e-4);
    let mut rng = DataRng::new(seed ^ 0x77);
    let w = Ref::uniform(&ref_out.shape, &mut rng, -1.0, 1.0);
    let loss = out.mul(&w.tensor()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let ref_loss = |xs: &[Ref]| -> f64 {
        let o = reference(xs);
        o.data.iter().zip(&w.data).map(|(a, b)| a * b).sum()
    };
    for (i, (var, x)) in vars.iter().zip(&inputs).enumerate() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: input {i} got no gradient"));
        assert_eq!(g.dims(), x.shape.as_slice(), "{name}: gradient {i} shape");
        let mut xs = inputs.to_vec();
        let checked: Vec<usize> = if x.numel() <= max_checked {
            (0..x.numel()).collect()
        } else {
            let mut c = vec![0, x.numel() - 1];
            c.extend((2..max_checked).map(|_| rng.below(x.numel())));
            c
        };
        let fd: Vec<f64> = checked
            .iter()
            .map(|&j| {
                let h = 1e-5 * x.data[j].abs().max(1.0);
                xs[i].data[j] = x.data[j] + h;
                let plus = ref_loss(&xs);
                xs[i].data[j] = x.data[j] - h;
                let minus = ref_loss(&xs);
                xs[i].data[j] = x.data[j];
                (plus - minus) / (2.0 * h)
            })
            .collect();
        let scale = fd.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let g = g.to_vec_f32();
        let got: Vec<f32> = checked.iter().map(|&j| g[j]).collect();
        let n = checked.len();
        assert_close(
            &format!(
                "{name}: d/d input {i} (elements {:?})",
                &checked[..n.min(8)]
            ),
            &got,
            &Ref::new(fd, &[n]),
            1e-4 * scale,
            1e-3,
        );
    }
}

fn small_shape(min_rank: usize, max_rank: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(
        prop_oneof![1 => Just(1usize), 3 => 1usize..=5],
        min_rank..=max_rank,
    )
}

/// `grad_check` of every unary op in `common::UNARY` at inputs of `shape` from its gradient generator:
/// `f(op, x)` applies the op to the variable `x` (or to a view of it), `reference(op, r)` does the same to
/// the reference values.
fn unary_grad_check(
    shape: &[usize],
    seed: u64,
    f: impl Fn(&Unary, &Tensor) -> R<Tensor>,
    reference: impl Fn(&Unary, &Ref) -> Ref,
) {
    for (i, (u, gen)) in unary_grad().enumerate() {
        let mut rng = DataRng::new(seed ^ i as u64);
        let x = Ref::rand(shape, &mut rng, gen);
        grad_check(u.name, [x], seed, |v| f(u, &v[0]), |r| reference(u, &r[0]));
    }
}

type ReduceFn = fn(&Tensor, Vec<usize>) -> R<Tensor>;
type ReduceRef = fn(&Ref, &[usize], bool) -> Ref;

/// Reductions over a set of dims: (name, the op, the op with keepdim, the reference).
const REDUCE: &[(&str, ReduceFn, ReduceFn, ReduceRef)] = &[
    ("sum", |t, d| t.sum(d), |t, d| t.sum_keepdim(d), Ref::sum),
    (
        "mean",
        |t, d| t.mean(d),
        |t, d| t.mean_keepdim(d),
        Ref::mean,
    ),
    ("max", |t, d| t.max(d), |t, d| t.max_keepdim(d), Ref::max),
    ("min", |t, d| t.min(d), |t, d| t.min_keepdim(d), Ref::min),
];

proptest! {
    #![proptest_config(config(24))]

    #[test]
    fn unary(shape in small_shape(0, 3), seed in any::<u64>()) {
        unary_grad_check(&shape, seed, |u, x| (u.op)(x), |u, r| r.map(u.reference));
    }

    /// Unary ops on a transposed view of the variable: the gradient is permuted back.
    #[test]
    fn unary_on_views(shape in small_shape(2, 3), seed in any::<u64>()) {
        let n = shape.len();
        unary_grad_check(&shape, seed,
            |u, x| (u.op)(&x.t()?),
            |u, r| r.transpose(n - 2, n - 1).map(u.reference));
    }

    /// Gradients of broadcast operands are summed over the broadcast dims.
    #[test]
    fn binary_broadcast((sa, sb) in small_shape(0, 3).prop_flat_map(|out| (Just(out.clone()), any::<u64>()))
            .prop_map(|(out, s)| {
                let mut rng = DataRng::new(s);
                (broadcast_side(&out, &mut rng), broadcast_side(&out, &mut rng))
            }),
            seed in any::<u64>()) {
        for (i, (name, f, reference)) in BINARY.iter().enumerate() {
            let mut rng = DataRng::new(seed ^ i as u64);
            // a on a grid of 0.1, b on the grid shifted by 0.05: never equal, so max/min have no ties.
            let a = Ref::rand(&sa, &mut rng, |r| (r.below(40) as f64 - 20.0) * 0.1);
            let b = if *name == "div" {
                Ref::rand(&sb, &mut rng, smooth::away_from_zero)
            } else {
                Ref::rand(&sb, &mut rng, |r| (r.below(40) as f64 - 20.0) * 0.1 + 0.05)
            };
            grad_check(name, [a, b], seed, |v| f(&v[0], &v[1]), |r| r[0].zip(&r[1], reference));
        }
    }

    #[test]
    fn reductions(shape in small_shape(1, 3), dims_seed in any::<u64>(), keepdim in any::<bool>(), seed in any::<u64>()) {
        let mut drng = DataRng::new(dims_seed);
        let mut dims: Vec<usize> = (0..shape.len()).filter(|_| drng.bool()).collect();
        if dims.is_empty() {
            dims.push(drng.below(shape.len()));
        }
        let mut rng = DataRng::new(seed);
        let x = Ref::distinct(&shape, &mut rng);
        let d = dims.clone();
        let k = keepdim;
        for (name, reduce, reduce_keepdim, reference) in REDUCE {
            let f = if k { reduce_keepdim } else { reduce };
            grad_check(name, [x.clone()], seed, |v| f(&v[0], d.clone()), |r| reference(&r[0], &dims, k));
        }
        grad_check("logsumexp", [x.clone()], seed, |v| v[0].logsumexp(d.clone()), |r| r[0].logsumexp(&dims, false));
        let n: usize = dims.iter().map(|&i| shape[i]).product();
        for unbiased in [false, true] {
            if unbiased && n == 1 {
                continue; // 0/0
            }
            grad_check("variance", [x.clone()], seed,
                |v| if k { v[0].variance_keepdim(d.clone(), unbiased) } else { v[0].variance(d.clone(), unbiased) },
                |r| r[0].variance(&dims, k, unbiased));
        }
        grad_check("sum_all", [x.clone()], seed, |v| v[0].sum_all(), |r| r[0].sum(&(0..r[0].rank()).collect::<Vec<_>>(), false));
        grad_check("mean_all", [x], seed, |v| v[0].mean_all(), |r| r[0].mean(&(0..r[0].rank()).collect::<Vec<_>>(), false));
    }

    /// Batched matmul with broadcast batch dims and transposed operands (read through .t() views).
    #[test]
    fn matmul(m in 1usize..=5, k in 1usize..=5, n in 1usize..=5, batch in small_shape(0, 2), ta in any::<bool>(), tb in any::<bool>(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let (ba, bb) = (broadcast_side(&batch, &mut rng), broadcast_side(&batch, &mut rng));
        let sa: Vec<usize> = ba.iter().copied().chain(if ta { [k, m] } else { [m, k] }).collect();
        let sb: Vec<usize> = bb.iter().copied().chain(if tb { [n, k] } else { [k, n] }).collect();
        let a = Ref::uniform(&sa, &mut rng, -1.0, 1.0);
        let b = Ref::uniform(&sb, &mut rng, -1.0, 1.0);
        let t = |r: &Ref, yes: bool| if yes { r.transpose(r.rank() - 2, r.rank() - 1) } else { r.clone() };
        grad_check("matmul", [a, b], seed,
            |v| {
                let a = if ta { v[0].t()? } else { v[0].clone() };
                let b = if tb { v[1].t()? } else { v[1].clone() };
                a.matmul(&b)
            },
            |r| t(&r[0], ta).matmul(&t(&r[1], tb)));
    }

    #[test]
    fn views(shape in small_shape(1, 3), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let x = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        let rank = shape.len();
        let perm = rng.permutation(rank);
        let p = perm.clone();
        grad_check("permute", [x.clone()], seed, |v| v[0].permute(&p), |r| r[0].permute(&perm));
        let d = rng.below(rank);
        let start = rng.below(shape[d]);
        let len = 1 + rng.below(shape[d] - start);
        grad_check("narrow", [x.clone()], seed, |v| v[0].narrow(d, start, len), |r| r[0].narrow(d, start, len));
        // Reshape of a permuted (non-contiguous) view goes through a copy.
        let p = perm.clone();
        let flat = [x.numel()];
        grad_check("permute.reshape", [x.clone()], seed,
            |v| v[0].permute(&p)?.reshape(flat[0]),
            |r| r[0].permute(&perm).reshape(&flat));
        let p = perm.clone();
        grad_check("permute.contiguous", [x.clone()], seed,
            |v| v[0].permute(&p)?.contiguous(),
            |r| r[0].permute(&perm));
        let target: Vec<usize> = [2].iter().copied().chain(shape.iter().map(|&s| if s == 1 { 3 } else { s })).collect();
        let tg = target.clone();
        grad_check("broadcast_as", [x.clone()], seed, |v| v[0].broadcast_as(tg.clone()), |r| r[0].broadcast_to(&target));
        let at = rng.below(rank + 1);
        let mut us = shape.clone();
        us.insert(at, 1);
        grad_check("unsqueeze.squeeze", [x.clone()], seed,
            |v| v[0].unsqueeze(at)?.sqr()?.squeeze(at),
            |r| r[0].map(|x| x * x));
        grad_check("unsqueeze", [x.clone()], seed, |v| v[0].unsqueeze(at), |r| r[0].reshape(&us));
        grad_check("chunk", [x.clone()], seed,
            |v| {
                let c = v[0].chunk(2, d)?;
                Tensor::cat(&[c.last().unwrap().clone(), c[0].clone()], d)
            },
            |r| {
                let size = shape[d];
                let step = size.div_ceil(2);
                let mut cs: Vec<Ref> = (0..size).step_by(step).map(|s| r[0].narrow(d, s, step.min(size - s))).collect();
                let last = cs.pop().unwrap();
                let first = if cs.is_empty() { last.clone() } else { cs[0].clone() };
                Ref::cat(&[last, first], d)
            });
    }

    #[test]
    fn joins(shape in small_shape(1, 3), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let d = rng.below(shape.len());
        let mut s2 = shape.clone();
        s2[d] = 1 + rng.below(3);
        let a = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        let b = Ref::uniform(&s2, &mut rng, -2.0, 2.0);
        let c = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        // a appears twice: its gradient is the sum of both slots.
        grad_check("cat", [a.clone(), b.clone()], seed,
            |v| Tensor::cat(&[v[0].clone(), v[1].clone(), v[0].exp()?], d),
            |r| Ref::cat(&[r[0].clone(), r[1].clone(), r[0].map(f64::exp)], d));
        let sd = rng.below(shape.len() + 1);
        grad_check("stack", [a.clone(), c.clone()], seed,
            |v| Tensor::stack(&[v[0].clone(), v[1].clone()], sd),
            |r| Ref::stack(&[r[0].clone(), r[1].clone()], sd));
        // where_cond with the mask and the false branch broadcast.
        let mask = Ref::rand(&broadcast_side(&shape, &mut rng), &mut rng, |r| r.below(2) as f64);
        let mt = mask.tensor().to_dtype(DType::U8).unwrap();
        let c = Ref::uniform(&broadcast_side(&shape, &mut rng), &mut rng, -2.0, 2.0);
        grad_check("where_cond", [a, c], seed,
            |v| Tensor::where_cond(&mt, &v[0], &v[1]),
            |r| Ref::zip3(&mask, &r[0], &r[1], |m, x, y| if m != 0.0 { x } else { y }));
    }

    #[test]
    fn indexing(shape in small_shape(1, 3), k in 1usize..=6, seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let d = rng.below(shape.len());
        let x = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        // Repeated indices: their gradients accumulate.
        let ids = rng.indices(k, shape[d]);
        let it = ids_tensor(&ids, &[k]);
        grad_check("index_select", [x.clone()], seed, |v| v[0].index_select(&it, d), |r| r[0].index_select(d, &ids));
        let mut src_shape = shape.clone();
        src_shape[d] = k;
        let src = Ref::uniform(&src_shape, &mut rng, -2.0, 2.0);
        grad_check("index_add", [x.clone(), src.clone()], seed,
            |v| v[0].index_add(&it, &v[1], d),
            |r| r[0].index_add(d, &ids, &r[1]));
        let gids = rng.indices(numel(&src_shape), shape[d]);
        let gt = ids_tensor(&gids, &src_shape);
        grad_check("gather", [x.clone()], seed, |v| v[0].gather(&gt, d), |r| r[0].gather(d, &gids, &src_shape));
        grad_check("scatter_add", [x.clone(), src], seed,
            |v| v[0].scatter_add(&gt, &v[1], d),
            |r| r[0].scatter_add(d, &gids, &r[1]));
        // Embedding of a 2-d table with ids of any shape.
        let table = Ref::uniform(&[shape[0], 3], &mut rng, -1.0, 1.0);
        let eids = rng.indices(numel(&src_shape), shape[0]);
        let et = ids_tensor(&eids, &src_shape);
        let eshape: Vec<usize> = src_shape.iter().copied().chain([3]).collect();
        grad_check("embedding", [table], seed, |v| v[0].embedding(&et), |r| r[0].index_select(0, &eids).reshape(&eshape));
    }

    #[test]
    fn softmax(shape in small_shape(1, 3), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let d = rng.below(shape.len());
        let x = Ref::uniform(&shape, &mut rng, -3.0, 3.0);
        grad_check("softmax", [x.clone()], seed, |v| v[0].softmax(d), |r| r[0].softmax(d));
        grad_check("log_softmax", [x.clone()], seed, |v| v[0].log_softmax(d), |r| r[0].log_softmax(d));
        // Through a transposed view of the variable.
        if shape.len() >= 2 {
            let n = shape.len();
            grad_check("softmax of a view", [x], seed, |v| v[0].t()?.softmax(-1), |r| r[0].transpose(n - 2, n - 1).softmax(n - 1));
        }
    }

    #[test]
    fn norms(shape in small_shape(1, 3), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let last = *shape.last().unwrap();
        if last < 2 {
            // A single element normalises to the constant 0 (layer_norm): nothing to differentiate.
            return Ok(());
        }
        let x = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        let w = Ref::uniform(&[last], &mut rng, 0.5, 1.5);
        let b = Ref::uniform(&[last], &mut rng, -1.0, 1.0);
        let eps = 1e-5;
        grad_check("layer_norm", [x.clone()], seed, |v| v[0].layer_norm(None, None, eps as f32), |r| r[0].layer_norm(None, None, eps));
        grad_check("layer_norm w b", [x.clone(), w.clone(), b.clone()], seed,
            |v| v[0].layer_norm(Some(&v[1]), Some(&v[2]), eps as f32),
            |r| r[0].layer_norm(Some(&r[1]), Some(&r[2]), eps));
        grad_check("layer_norm w", [x.clone(), w.clone()], seed,
            |v| v[0].layer_norm(Some(&v[1]), None, eps as f32),
            |r| r[0].layer_norm(Some(&r[1]), None, eps));
        grad_check("layer_norm b", [x.clone(), b], seed,
            |v| v[0].layer_norm(None, Some(&v[1]), eps as f32),
            |r| r[0].layer_norm(None, Some(&r[1]), eps));
        grad_check("rms_norm", [x.clone()], seed, |v| v[0].rms_norm(None, eps as f32), |r| r[0].rms_norm(None, eps));
        grad_check("rms_norm w", [x.clone(), w], seed,
            |v| v[0].rms_norm(Some(&v[1]), eps as f32),
            |r| r[0].rms_norm(Some(&r[1]), eps));
        // Through a strided view of the input.
        let n = shape.len();
        if n >= 2 && shape[n - 2] >= 2 {
            grad_check("rms_norm of a view", [x], seed,
                |v| v[0].t()?.rms_norm(None, eps as f32),
                |r| r[0].transpose(n - 2, n - 1).rms_norm(None, eps));
        }
    }

    #[test]
    fn cross_entropy(lead in small_shape(0, 2), vocab in 1usize..=6, ignore in any::<bool>(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let shape: Vec<usize> = lead.iter().copied().chain([vocab]).collect();
        let x = Ref::uniform(&shape, &mut rng, -3.0, 3.0);
        let mut targets = rng.indices(numel(&lead), vocab);
        let ig = ignore.then_some(-100i64);
        if ignore {
            for t in targets.iter_mut() {
                if rng.below(3) == 0 {
                    *t = -100;
                }
            }
        }
        let tt = ids_tensor(&targets, &lead);
        grad_check("cross_entropy", [x.clone()], seed, |v| v[0].cross_entropy(&tt, ig), |r| r[0].cross_entropy(&targets, ig));
        // Scaled upstream gradient (loss * 3) and a view of the logits.
        grad_check("cross_entropy * 3", [x], seed,
            |v| v[0].contiguous()?.cross_entropy(&tt, ig)?.mul_scalar(3.0),
            |r| r[0].cross_entropy(&targets, ig).map(|l| 3.0 * l));
    }

    #[test]
    fn rope(b in 1usize..=2, h in 1usize..=2, s in 1usize..=4, half in 1usize..=4, per_batch in any::<bool>(), interleaved in any::<bool>(), seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let d = 2 * half;
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::Half };
        let table = RopeTable::new(d, 32, 10000.0, 0.5, style, CPU).unwrap();
        let x = Ref::uniform(&[b, h, s, d], &mut rng, -2.0, 2.0);
        let pos_shape = if per_batch { vec![b, s] } else { vec![s] };
        let positions = rng.indices(numel(&pos_shape), 32);
        let pt = ids_tensor(&positions, &pos_shape);
        grad_check("rope", [x.clone()], seed, |v| v[0].rope(&table, &pt), |r| r[0].rope(&positions, 10000.0, 0.5, interleaved));
        // Followed by a nonlinearity, from a transposed [b, s, h, d] layout (as attention uses it).
        let xt = x.permute(&[0, 2, 1, 3]);
        grad_check("rope of a view", [xt], seed,
            |v| v[0].transpose(1, 2)?.rope(&table, &pt)?.sqr(),
            |r| r[0].permute(&[0, 2, 1, 3]).rope(&positions, 10000.0, 0.5, interleaved).map(|v| v * v));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Graph mechanics

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec_f32()
}

/// A trainable f32 variable with these values.
fn var(values: &[f32], shape: impl Into<Shape>) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, CPU)
        .unwrap()
        .var()
        .unwrap()
}

#[test]
fn accumulation_across_backward_calls() {
    let x = var(&[0.5, -1.0, 2.0, 0.25], (2, 2));
    let loss = x
        .sqr()
        .unwrap()
        .mul(&x.exp().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let once = loss.backward().unwrap();
    let mut store = GradStore::new();
    loss.backward_into(&mut store).unwrap();
    loss.backward_into(&mut store).unwrap();
    let (g1, g2) = (vals(once.get(&x).unwrap()), vals(store.get(&x).unwrap()));
    for (a, b) in g1.iter().zip(&g2) {
        assert!(
            (2.0 * a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{a} * 2 != {b}"
        );
    }
    // d/dx x² eˣ = (2x + x²) eˣ
    for (g, x) in g1.iter().zip([0.5f32, -1.0, 2.0, 0.25]) {
        let want = (2.0 * x + x * x) * x.exp();
        assert!(
            (g - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{g} vs {want}"
        );
    }
    // Accumulating a second, different loss adds its gradient.
    let loss2 = x.sum_all().unwrap();
    loss2.backward_into(&mut store).unwrap();
    let g3 = vals(store.get(&x).unwrap());
    for (a, b) in g2.iter().zip(&g3) {
        assert!((a + 1.0 - b).abs() <= 1e-5 * b.abs().max(1.0));
    }
}

#[test]
fn detach_and_no_grad_stop_gradients() {
    let x = var(&[1.0, 2.0, 3.0], 3);
    // y = x · detach(x): only the first factor carries gradient, so dy/dx = x (not 2x).
    let y = x.mul(&x.detach()).unwrap().sum_all().unwrap();
    assert_eq!(
        vals(y.backward().unwrap().get(&x).unwrap()),
        vec![1.0, 2.0, 3.0]
    );
    let d = x.detach();
    assert!(!d.tracks_grad() && !d.is_variable());
    assert!(d.same_storage(&x));
    // Fully detached: no gradient at all.
    let z = x.detach().sqr().unwrap().sum_all().unwrap();
    assert!(!z.tracks_grad());
    assert!(z.backward().unwrap().get(&x).is_none());
    // Under no_grad nothing is recorded; the guard restores recording when dropped.
    {
        let _g = no_grad();
        let w = x.sqr().unwrap().sum_all().unwrap();
        assert!(!w.tracks_grad());
        assert!(w.backward().unwrap().get(&x).is_none());
        {
            let _nested = no_grad();
        }
        assert!(
            !x.exp().unwrap().tracks_grad(),
            "an inner guard's drop must not re-enable recording"
        );
    }
    let w = x.sqr().unwrap().sum_all().unwrap();
    assert!(w.tracks_grad());
    assert_eq!(
        vals(w.backward().unwrap().get(&x).unwrap()),
        vec![2.0, 4.0, 6.0]
    );
    // Non-variable leaves get no gradient.
    let c = Tensor::from_vec(vec![1f32, 1.0, 1.0], 3, CPU).unwrap();
    let g = x.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&c).is_none());
}

#[test]
fn variable_used_twice_sums_both_paths() {
    let x = var(&[0.5, -2.0], 2);
    // f = x·x + exp(x) + x  =>  f' = 2x + eˣ + 1
    let f = x
        .mul(&x)
        .unwrap()
        .add(&x.exp().unwrap())
        .unwrap()
        .add(&x)
        .unwrap()
        .sum_all()
        .unwrap();
    let g = vals(f.backward().unwrap().get(&x).unwrap());
    for (g, x) in g.iter().zip([0.5f32, -2.0]) {
        let want = 2.0 * x + x.exp() + 1.0;
        assert!((g - want).abs() < 1e-5, "{g} vs {want}");
    }
    // A diamond: y = 2x, f = y·y + y  => f' = (2y + 1)·2 = 8x + 2.
    let y = x.mul_scalar(2.0).unwrap();
    let f = y.mul(&y).unwrap().add(&y).unwrap().sum_all().unwrap();
    assert_eq!(
        vals(f.backward().unwrap().get(&x).unwrap()),
        vec![6.0, -14.0]
    );
}

#[test]
fn maximum_ties_split_the_gradient() {
    let a = var(&[1.0, 2.0, 3.0], 3);
    let b = var(&[1.0, 1.0, 4.0], 3);
    let g = a
        .maximum(&b)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(vals(g.get(&a).unwrap()), vec![0.5, 1.0, 0.0]);
    assert_eq!(vals(g.get(&b).unwrap()), vec![0.5, 0.0, 1.0]);
    // max reduction with ties: the gradient is shared evenly by the tied maxima.
    let x = var(&[3.0, 1.0, 3.0, 2.0], 4);
    let g = x.max(0).unwrap().backward().unwrap();
    assert_eq!(vals(g.get(&x).unwrap()), vec![0.5, 0.0, 0.5, 0.0]);
}

#[test]
fn dtype_and_dropout_gradients() {
    // Gradients through a cast come back in the variable's dtype.
    let x = var(&[1.0, 2.0, 3.0], 3);
    let y = x
        .to_dtype(DType::BF16)
        .unwrap()
        .mul_scalar(2.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(&x).unwrap();
    assert_eq!(gx.dtype(), DType::F32);
    assert_eq!(vals(gx), vec![2.0; 3]);
    // A half-precision variable gets a half-precision gradient.
    let h = Tensor::from_slice(&[1f32, -2.0], CPU)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
        .var()
        .unwrap();
    let g = h.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(&h).unwrap().dtype(), DType::F16);
    assert_eq!(vals(g.get(&h).unwrap()), vec![2.0, -4.0]);
    // Dropout's gradient is its mask: 0 where dropped, 1/(1-p) where kept.
    let x = Tensor::ones(1000, DType::F32, CPU).unwrap().var().unwrap();
    let out = x.dropout(0.25, &mut Rng::new(9)).unwrap();
    let g = out.sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(g.get(&x).unwrap()), vals(&out));
    // Integer outputs (argmax, comparisons) carry no graph.
    assert!(!x.argmax(0).unwrap().tracks_grad());
    assert!(!x.gt(&x).unwrap().tracks_grad());
}

#[test]
fn deep_graph_backward_and_drop() {
    // A 100k-op chain (a loss accumulated over many steps without detach): backward and drop must not
    // recurse once per node, or they overflow a test thread's 2 MiB stack.
    let x = var(&[1.0, 2.0], 2);
    let mut y = x.clone();
    for _ in 0..100_000 {
        y = y.add_scalar(1.0).unwrap();
    }
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(vals(g.get(&x).unwrap()), vec![1.0, 1.0]);
    assert_eq!(vals(&y), vec![100_001.0, 100_002.0]);
    drop(y);
    // The variable survives its graph.
    assert_eq!(vals(&x), vec![1.0, 2.0]);
}

proptest! {
    #![proptest_config(config(4))]

    /// Inputs past the parallel threshold (32k elements): the chunked kernels and their backward.
    #[test]
    fn large_inputs(rows in 660usize..=800, d in 50usize..=64, seed in any::<u64>()) {
        let mut rng = DataRng::new(seed);
        let shape = [rows, d];
        let x = Ref::uniform(&shape, &mut rng, -2.0, 2.0);
        let w = Ref::uniform(&[d], &mut rng, 0.5, 1.5);
        let b = Ref::uniform(&[d], &mut rng, -1.0, 1.0);
        let eps = 1e-5;
        grad_check_sampled("large layer_norm", [x.clone(), w.clone(), b], seed, 24,
            |v| v[0].layer_norm(Some(&v[1]), Some(&v[2]), eps as f32),
            |r| r[0].layer_norm(Some(&r[1]), Some(&r[2]), eps));
        grad_check_sampled("large rms_norm", [x.clone(), w], seed, 24,
            |v| v[0].rms_norm(Some(&v[1]), eps as f32),
            |r| r[0].rms_norm(Some(&r[1]), eps));
        grad_check_sampled("large softmax", [x.clone()], seed, 24, |v| v[0].softmax(1), |r| r[0].softmax(1));
        grad_check_sampled("large log_softmax dim 0", [x.clone()], seed, 24, |v| v[0].log_softmax(0), |r| r[0].log_softmax(0));
        let targets = rng.indices(rows, d);
        let tt = ids_tensor(&targets, &[rows]);
        grad_check_sampled("large cross_entropy", [x.clone()], seed, 24,
            |v| v[0].cross_entropy(&tt, None),
            |r| r[0].cross_entropy(&targets, None));
        grad_check_sampled("large gelu.t", [x.clone()], seed, 24, |v| v[0].t()?.gelu(), |r| r[0].transpose(0, 1).map(gelu_erf));
        let col = Ref::uniform(&[rows, 1], &mut rng, 0.5, 2.0);
        grad_check_sampled("large broadcast div", [x.clone(), col], seed, 24, |v| v[0].div(&v[1]), |r| r[0].zip(&r[1], |a, b| a / b));
        let ids = rng.indices(3 * rows, rows);
        let it = ids_tensor(&ids, &[3 * rows]);
        grad_check_sampled("large index_select", [x.clone()], seed, 24, |v| v[0].index_select(&it, 0), |r| r[0].index_select(0, &ids));
        grad_check_sampled("large variance", [x], seed, 24, |v| v[0].variance(0, true), |r| r[0].variance(&[0], false, true));
    }
}
