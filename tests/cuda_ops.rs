//! The CUDA backend against the CPU backend, its oracle: every engine op forward and, where it is
//! differentiable, backward, over random shapes (sizes that are no multiple of the warp or block width,
//! empty tensors where the op allows them) and random layouts (transposed, permuted, narrowed and stride-0
//! broadcast views), with fresh inputs in every case. Also the allocator's block reuse, the host↔device
//! copy counters, device round trips and device-mismatch errors.
//!
//! Every test needs a GPU and is ignored by default:
//! `cargo test --release -p trit --features cuda --test cuda_ops -- --ignored`.
//!
//! Results are compared by their relative Frobenius error ‖gpu − cpu‖ / ‖cpu‖ in f32: at most 1e-5 for
//! f32, 5e-4 for TF32 matmuls, 2e-3 for f16 and 1e-2 for bf16 (the CPU gets the same f16/bf16 inputs).
//! Integer results, copies and casts must match exactly. New device allocations are filled with NaN
//! (`set_poison`), so an output element a kernel leaves unwritten fails its comparison.

#![cfg(feature = "cuda")]

mod common;

use common::{broadcast_side, config, DataRng, CPU};
use proptest::prelude::*;
use proptest::sample::{select, subsequence, Index};
use proptest::test_runner::Config;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use trit::cuda::matmul::set_tf32;
use trit::cuda::CudaDevice;
use trit::op::UnaryOp;
use trit::ops::attention::AttentionOptions;
use trit::ops::rope::{RopeStyle, RopeTable, Rotary};
use trit::optim::{clip_grad_norm, AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
use trit::{DType, Device, Error, GradStore, Tensor};

const GPU: Device = Device::Cuda(0);
const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
const ALL_DTYPES: [DType; 6] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::I8,
    DType::U8,
];
/// Sizes around the warp (32) and block widths, and past one block's worth of elements.
const AWKWARD: [usize; 9] = [1, 7, 31, 32, 33, 257, 1000, 1025, 4097];
const TF32_TOLERANCE: f64 = 5e-4;

// ---------------------------------------------------------------------------------------------------------
// The device lock

/// The tests share one device and process-wide state (the TF32 switch, the allocator's and the copy
/// counters): most take this lock shared; those that flip the switch or read a counter take it alone.
static DEVICE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    let guard = DEVICE.read().unwrap_or_else(|e| e.into_inner());
    trit::cuda::set_poison(true);
    guard
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    let guard = DEVICE.write().unwrap_or_else(|e| e.into_inner());
    trit::cuda::set_poison(true);
    guard
}

/// TF32 matmuls while alive; back to exact f32 when dropped, also when the test fails.
struct Tf32;

impl Tf32 {
    fn on() -> Tf32 {
        set_tf32(true);
        Tf32
    }
}

impl Drop for Tf32 {
    fn drop(&mut self) {
        set_tf32(false);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Inputs: the same values and the same view on both devices

/// How an input sits in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lay {
    Contiguous,
    /// The last two dims swapped (`.t()` of a row-major buffer).
    Transposed,
    /// A random permutation of a row-major buffer.
    Permuted,
    /// A narrowed slice of a NaN-padded buffer, every other element (all strides doubled).
    Narrowed,
    /// One dim (or a leading dim) repeated by a stride-0 broadcast.
    Broadcast,
}

const LAYS: [Lay; 5] = [
    Lay::Contiguous,
    Lay::Transposed,
    Lay::Permuted,
    Lay::Narrowed,
    Lay::Broadcast,
];

/// The view ops that turn a buffer into a test input, replayed identically on each device.
#[derive(Clone, Debug)]
enum ViewOp {
    Narrow(usize, usize, usize),
    Squeeze(usize),
    Permute(Vec<usize>),
    Broadcast(Vec<usize>),
}

fn replay(t: &Tensor, ops: &[ViewOp]) -> Tensor {
    ops.iter().fold(t.clone(), |t, op| {
        match op {
            ViewOp::Narrow(d, start, len) => t.narrow(*d, *start, *len),
            ViewOp::Squeeze(d) => t.squeeze(*d),
            ViewOp::Permute(p) => t.permute(p),
            ViewOp::Broadcast(s) => t.broadcast_as(s.clone()),
        }
        .unwrap_or_else(|e| panic!("view op {op:?} on {t:?}: {e}"))
    })
}

/// The buffer whose `perm` permutation has `shape` (`out.shape[i] = buffer[perm[i]]`).
fn permuted_buffer(shape: &[usize], perm: &[usize]) -> Vec<usize> {
    let mut buf = vec![0; shape.len()];
    for (i, &p) in perm.iter().enumerate() {
        buf[p] = shape[i];
    }
    buf
}

/// The buffer shape and the view ops that lay out an input of `shape` as `lay` says (contiguous or
/// narrowed where the rank leaves no other choice).
fn plan(shape: &[usize], lay: Lay, rng: &mut DataRng) -> (Vec<usize>, Vec<ViewOp>) {
    let rank = shape.len();
    match lay {
        Lay::Transposed if rank >= 2 => {
            let mut perm: Vec<usize> = (0..rank).collect();
            perm.swap(rank - 2, rank - 1);
            (permuted_buffer(shape, &perm), vec![ViewOp::Permute(perm)])
        }
        Lay::Permuted if rank >= 2 => {
            let perm = rng.permutation(rank);
            (permuted_buffer(shape, &perm), vec![ViewOp::Permute(perm)])
        }
        Lay::Broadcast if shape.iter().any(|&d| d > 1) => {
            let big: Vec<usize> = (0..rank).filter(|&d| shape[d] > 1).collect();
            let d = big[rng.below(big.len())];
            let base = if d == 0 && rng.bool() {
                shape[1..].to_vec()
            } else {
                let mut s = shape.to_vec();
                s[d] = 1;
                s
            };
            (base, vec![ViewOp::Broadcast(shape.to_vec())])
        }
        Lay::Contiguous => (shape.to_vec(), Vec::new()),
        _ if rank == 0 => (shape.to_vec(), Vec::new()),
        _ => {
            let k = rng.below(rank);
            let (before, after) = (1 + rng.below(2), rng.below(3));
            let mut buf = shape.to_vec();
            buf[k] += before + after;
            buf.push(2);
            let ops = vec![
                ViewOp::Narrow(rank, 1, 1),
                ViewOp::Squeeze(rank),
                ViewOp::Narrow(k, before, shape[k]),
            ];
            (buf, ops)
        }
    }
}

/// One test input on both devices: the buffer it views (a variable when gradients are checked) and the
/// view an op reads. The buffer's elements outside the view are NaN, so a kernel that reads past the
/// view poisons its output.
struct Input {
    cpu_leaf: Tensor,
    gpu_leaf: Tensor,
    cpu: Tensor,
    gpu: Tensor,
}

impl Input {
    /// An input of `dtype` whose elements are drawn by `gen` (then rounded to `dtype` on the host).
    fn new(
        shape: &[usize],
        lay: Lay,
        dtype: DType,
        rng: &mut DataRng,
        gen: impl FnMut(&mut DataRng) -> f64,
    ) -> Input {
        Input::build(shape, lay, dtype, false, rng, gen)
    }

    /// Like [`Input::new`], with the buffer a variable so that gradients reach it.
    fn var(
        shape: &[usize],
        lay: Lay,
        dtype: DType,
        rng: &mut DataRng,
        gen: impl FnMut(&mut DataRng) -> f64,
    ) -> Input {
        Input::build(shape, lay, dtype, true, rng, gen)
    }

    fn build(
        shape: &[usize],
        lay: Lay,
        dtype: DType,
        var: bool,
        rng: &mut DataRng,
        mut gen: impl FnMut(&mut DataRng) -> f64,
    ) -> Input {
        let (buf_shape, ops) = plan(shape, lay, rng);
        let n: usize = buf_shape.iter().product();
        // Which buffer elements the view reads: the view of a buffer holding each element's own index.
        let positions = Tensor::from_vec(
            (0..n).map(|i| i as f32).collect::<Vec<f32>>(),
            buf_shape.clone(),
            CPU,
        )
        .unwrap();
        let mut data = vec![f32::NAN; n];
        for i in replay(&positions, &ops).to_vec_f32() {
            let slot = &mut data[i as usize];
            if slot.is_nan() {
                *slot = gen(rng) as f32;
            }
        }
        let buf = Tensor::from_vec(data, buf_shape, CPU)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap();
        let cpu_leaf = if var { buf.var().unwrap() } else { buf };
        let gpu_leaf = cpu_leaf.to_device(GPU).unwrap();
        let (cpu, gpu) = (replay(&cpu_leaf, &ops), replay(&gpu_leaf, &ops));
        assert_eq!(cpu.dims(), shape, "{lay:?} view");
        Input {
            cpu_leaf,
            gpu_leaf,
            cpu,
            gpu,
        }
    }
}

/// An i32 index input of `shape` with values in 0..`below` (repeats likely).
fn ids_input(shape: &[usize], below: usize, rng: &mut DataRng) -> Input {
    Input::new(shape, Lay::Contiguous, DType::I32, rng, |r| {
        r.below(below) as f64
    })
}

// ---------------------------------------------------------------------------------------------------------
// Comparison

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        _ => 0.0,
    }
}

fn host(t: &Tensor, what: &str) -> Vec<f32> {
    t.try_to_vec_f32()
        .unwrap_or_else(|e| panic!("{what}: reading back {t:?}: {e}"))
}

/// ‖gpu − cpu‖ / ‖cpu‖ over the elements as f32 (the absolute ‖gpu − cpu‖ when the reference is all
/// zeros). Equal elements, infinities included, count as no error; a NaN on one side only makes it NaN.
fn rel_err(gpu: &Tensor, cpu: &Tensor) -> f64 {
    let (g, c) = (host(gpu, "rel_err"), host(cpu, "rel_err"));
    assert_eq!(g.len(), c.len(), "rel_err: element counts differ");
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&a, &b) in g.iter().zip(&c) {
        if b.is_finite() {
            norm += (b as f64).powi(2);
        }
        if a != b {
            diff += (a as f64 - b as f64).powi(2);
        }
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The GPU result lives on the GPU, the reference on the CPU, with the same shape and dtype.
fn check_pair(what: &str, gpu: &Tensor, cpu: &Tensor) {
    assert!(
        gpu.device().is_cuda(),
        "{what}: the result lives on {}, not the GPU",
        gpu.device()
    );
    assert_eq!(cpu.device(), CPU, "{what}: the reference is not on the CPU");
    assert_eq!(gpu.dims(), cpu.dims(), "{what}: shape");
    assert_eq!(gpu.dtype(), cpu.dtype(), "{what}: dtype");
}

fn assert_no_nan(what: &str, side: &str, t: &Tensor) {
    if let Some(i) = host(t, what).iter().position(|v| v.is_nan()) {
        panic!(
            "{what}: NaN at flat index {i} of the {side} result {t:?} (a GPU element left unwritten \
             reads as NaN; on the CPU it means the inputs are outside the op's domain)"
        );
    }
}

/// The GPU result within the dtype's relative Frobenius tolerance of the CPU's, with no NaN on either side.
fn assert_close(what: &str, gpu: &Tensor, cpu: &Tensor, dtype: DType) {
    assert_within(what, gpu, cpu, tolerance(dtype));
}

fn assert_within(what: &str, gpu: &Tensor, cpu: &Tensor, tol: f64) {
    check_pair(what, gpu, cpu);
    assert_no_nan(what, "GPU", gpu);
    assert_no_nan(what, "CPU", cpu);
    let e = rel_err(gpu, cpu);
    assert!(
        e <= tol,
        "{what}: relative error {e:.3e} over the {tol:e} allowed (shape {:?}, {})",
        gpu.dims(),
        gpu.dtype()
    );
}

/// Integer results, copies and casts: every element equal (float elements bit for bit).
fn assert_exact(what: &str, gpu: &Tensor, cpu: &Tensor) {
    check_pair(what, gpu, cpu);
    if gpu.dtype().is_float() {
        assert_no_nan(what, "GPU", gpu);
        let (g, c) = (host(gpu, what), host(cpu, what));
        if let Some(i) = (0..g.len()).find(|&i| g[i].to_bits() != c[i].to_bits()) {
            panic!(
                "{what}: element {i} of {:?} is {} on the GPU, {} on the CPU",
                gpu.dims(),
                g[i],
                c[i]
            );
        }
    } else {
        let read = |t: &Tensor| {
            t.try_to_vec_i64()
                .unwrap_or_else(|e| panic!("{what}: reading back {t:?}: {e}"))
        };
        let (g, c) = (read(gpu), read(cpu));
        if let Some(i) = (0..g.len()).find(|&i| g[i] != c[i]) {
            panic!(
                "{what}: element {i} of {:?} is {} on the GPU, {} on the CPU",
                gpu.dims(),
                g[i],
                c[i]
            );
        }
    }
}

/// Σ out ⊙ w in f32 on each device, for one fresh random w of out's shape: a scalar whose gradient
/// reaches every output element with its own weight.
fn losses(gpu_out: &Tensor, cpu_out: &Tensor, rng: &mut DataRng) -> (Tensor, Tensor) {
    let w = Input::new(cpu_out.dims(), Lay::Contiguous, DType::F32, rng, |r| {
        r.range(-1.0, 1.0)
    });
    let f = |out: &Tensor, w: &Tensor| out.to_dtype(DType::F32)?.mul(w)?.sum_all();
    (f(gpu_out, &w.gpu).unwrap(), f(cpu_out, &w.cpu).unwrap())
}

/// The gradients that each device's loss gives every input's buffer, within `tol` of each other.
fn assert_grads(what: &str, inputs: &[&Input], gpu_loss: &Tensor, cpu_loss: &Tensor, tol: f64) {
    let gg = gpu_loss
        .backward()
        .unwrap_or_else(|e| panic!("{what}: backward on the GPU: {e}"));
    let cg = cpu_loss
        .backward()
        .unwrap_or_else(|e| panic!("{what}: backward on the CPU: {e}"));
    for (i, x) in inputs.iter().enumerate() {
        match (gg.get(&x.gpu_leaf), cg.get(&x.cpu_leaf)) {
            (Some(g), Some(c)) => {
                assert_within(&format!("{what}: gradient of input {i}"), g, c, tol)
            }
            (None, None) => {}
            (g, c) => panic!(
                "{what}: input {i} has a gradient on the GPU: {}, on the CPU: {}",
                g.is_some(),
                c.is_some()
            ),
        }
    }
}

/// Runs `f` on each device's views of `inputs`, checks the outputs within `tol` and, when the output
/// carries a graph, the gradients of every variable input.
fn check_op(
    what: &str,
    inputs: &[&Input],
    tol: f64,
    rng: &mut DataRng,
    f: impl Fn(&[&Tensor]) -> trit::Result<Tensor>,
) {
    let (gpu, cpu) = run_both(what, inputs, f);
    assert_within(what, &gpu, &cpu, tol);
    if cpu.tracks_grad() {
        let (gl, cl) = losses(&gpu, &cpu, rng);
        assert_grads(what, inputs, &gl, &cl, tol);
    }
}

/// [`check_op`] for ops that only move or convert elements: the outputs must match exactly.
fn check_copy(
    what: &str,
    inputs: &[&Input],
    grad_tol: f64,
    rng: &mut DataRng,
    f: impl Fn(&[&Tensor]) -> trit::Result<Tensor>,
) {
    let (gpu, cpu) = run_both(what, inputs, f);
    assert_exact(what, &gpu, &cpu);
    if cpu.tracks_grad() {
        let (gl, cl) = losses(&gpu, &cpu, rng);
        assert_grads(what, inputs, &gl, &cl, grad_tol);
    }
}

fn run_both(
    what: &str,
    inputs: &[&Input],
    f: impl Fn(&[&Tensor]) -> trit::Result<Tensor>,
) -> (Tensor, Tensor) {
    let gv: Vec<&Tensor> = inputs.iter().map(|x| &x.gpu).collect();
    let cv: Vec<&Tensor> = inputs.iter().map(|x| &x.cpu).collect();
    let gpu = f(&gv).unwrap_or_else(|e| panic!("{what} on the GPU: {e}"));
    let cpu = f(&cv).unwrap_or_else(|e| panic!("{what} on the CPU: {e}"));
    (gpu, cpu)
}

// ---------------------------------------------------------------------------------------------------------
// Strategies and value generators

/// `n` cases (or `PROPTEST_CASES`), with shrinking cut short: every shrink step runs GPU work, and the
/// whole suite must stay inside the GPU check's time budget even when a case fails.
fn cases(n: u32) -> Config {
    Config {
        max_shrink_iters: 64,
        max_shrink_time: 10_000,
        ..config(n)
    }
}

/// A shape of rank `min_rank..=max_rank` with dims in 1..=4, one of them replaced by an awkward size;
/// with `empty`, one case in six has a zero dim.
fn shape(min_rank: usize, max_rank: usize, empty: bool) -> impl Strategy<Value = Vec<usize>> {
    (
        proptest::collection::vec(1usize..=4, min_rank..=max_rank),
        any::<Index>(),
        select(AWKWARD.to_vec()),
        any::<Index>(),
        0..6u8,
    )
        .prop_map(move |(mut s, at, big, zero_at, roll)| {
            let rank = s.len();
            if rank > 0 {
                s[at.index(rank)] = big;
                if empty && roll == 0 {
                    s[zero_at.index(rank)] = 0;
                }
            }
            s
        })
}

/// A shape with a non-empty sorted subset of its dims.
fn shape_and_dims(max_rank: usize, empty: bool) -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    shape(1, max_rank, empty).prop_flat_map(|s| {
        let n = s.len();
        (Just(s), subsequence((0..n).collect::<Vec<usize>>(), 1..=n))
    })
}

/// A shape with one of its dims.
fn shape_and_dim(max_rank: usize, empty: bool) -> impl Strategy<Value = (Vec<usize>, usize)> {
    shape(1, max_rank, empty).prop_flat_map(|s| {
        let n = s.len();
        (Just(s), 0..n)
    })
}

fn lay() -> impl Strategy<Value = Lay> {
    select(LAYS.to_vec())
}

fn float() -> impl Strategy<Value = DType> {
    select(FLOATS.to_vec())
}

fn any_dtype() -> impl Strategy<Value = DType> {
    select(ALL_DTYPES.to_vec())
}

type Gen = fn(&mut DataRng) -> f64;

fn sym(r: &mut DataRng) -> f64 {
    r.range(-3.0, 3.0)
}

fn pos(r: &mut DataRng) -> f64 {
    r.range(0.1, 4.0)
}

fn nonzero(r: &mut DataRng) -> f64 {
    r.signed_range(0.25, 3.0)
}

/// On a coarse grid half the time, so that ties and equal elements occur.
fn gridded(r: &mut DataRng) -> f64 {
    if r.bool() {
        (r.below(9) as f64 - 4.0) * 0.5
    } else {
        r.range(-3.0, 3.0)
    }
}

/// Integers `lo..=hi`.
fn integers(lo: i64, hi: i64) -> impl FnMut(&mut DataRng) -> f64 {
    move |r| (lo + r.below((hi - lo + 1) as usize) as i64) as f64
}

/// The integers every value of `dtype` can hold exactly (floats: those bf16 holds exactly).
fn int_range(dtype: DType) -> (i64, i64) {
    match dtype {
        DType::I8 => (-128, 127),
        DType::U8 => (0, 255),
        DType::BF16 => (-256, 256),
        _ => (-1000, 1000),
    }
}

fn pick<T: Copy>(rng: &mut DataRng, items: &[T]) -> T {
    items[rng.below(items.len())]
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise ops

const UNARY: &[(UnaryOp, Gen)] = &[
    (UnaryOp::Neg, sym),
    (UnaryOp::Exp, sym),
    (UnaryOp::Log, pos),
    (UnaryOp::Sqrt, pos),
    (UnaryOp::Rsqrt, pos),
    (UnaryOp::Tanh, sym),
    (UnaryOp::Sigmoid, sym),
    (UnaryOp::Relu, sym),
    (UnaryOp::GeluErf, sym),
    (UnaryOp::GeluTanh, sym),
    (UnaryOp::Silu, sym),
    (UnaryOp::Abs, sym),
    (UnaryOp::Sign, sym),
    (UnaryOp::Round, sym),
    (UnaryOp::Sqr, sym),
    (UnaryOp::Recip, nonzero),
    (UnaryOp::Erf, sym),
    (UnaryOp::Powf(2.5), pos),
    (UnaryOp::Powf(-0.5), pos),
    // An integer power of negative bases: x^p is real there, as Rust's powf and CUDA's powf agree.
    (UnaryOp::Powf(3.0), sym),
    (UnaryOp::Clamp(-0.5, 0.75), sym),
    (UnaryOp::Affine(1.5, -0.25), sym),
    (UnaryOp::GeluErfGrad, sym),
    (UnaryOp::GeluTanhGrad, sym),
    (UnaryOp::SiluGrad, sym),
    (UnaryOp::InRange(-0.5, 0.75), sym),
];

type BinFn = fn(&Tensor, &Tensor) -> trit::Result<Tensor>;

const BINARY: &[(&str, BinFn)] = &[
    ("add", |a, b| a.add(b)),
    ("sub", |a, b| a.sub(b)),
    ("mul", |a, b| a.mul(b)),
    ("div", |a, b| a.div(b)),
    ("maximum", |a, b| a.maximum(b)),
    ("minimum", |a, b| a.minimum(b)),
];

const COMPARE: &[(&str, BinFn)] = &[
    ("eq", |a, b| a.eq(b)),
    ("ne", |a, b| a.ne(b)),
    ("lt", |a, b| a.lt(b)),
    ("le", |a, b| a.le(b)),
    ("gt", |a, b| a.gt(b)),
    ("ge", |a, b| a.ge(b)),
];

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn unary_ops(shape in shape(0, 4, true), lay in lay(), dtype in float(), seed in any::<u64>()) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        for &(op, gen) in UNARY {
            let x = Input::var(&shape, lay, dtype, &mut rng, gen);
            check_op(&format!("{op:?} {dtype}"), &[&x], tolerance(dtype), &mut rng, |t| t[0].unary(op));
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn binary_ops_broadcast(
        out in shape(0, 4, true),
        la in lay(),
        lb in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let (sa, sb) = (broadcast_side(&out, &mut rng), broadcast_side(&out, &mut rng));
        for &(name, f) in BINARY {
            let a = Input::var(&sa, la, dtype, &mut rng, gridded);
            let gen: Gen = if name == "div" { nonzero } else { gridded };
            let b = Input::var(&sb, lb, dtype, &mut rng, gen);
            let what = format!("{name} {sa:?} {sb:?} {dtype}");
            check_op(&what, &[&a, &b], tolerance(dtype), &mut rng, |t| f(t[0], t[1]));
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn comparisons_and_where(
        out in shape(0, 4, true),
        la in lay(),
        lb in lay(),
        da in any_dtype(),
        db in any_dtype(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let (sa, sb) = (broadcast_side(&out, &mut rng), broadcast_side(&out, &mut rng));
        // Halves on a grid of 0..=4: ties in every dtype (integer dtypes truncate them on the host).
        let grid = |r: &mut DataRng| r.below(9) as f64 * 0.5;
        let a = Input::new(&sa, la, da, &mut rng, grid);
        let b = Input::new(&sb, lb, db, &mut rng, grid);
        for &(name, f) in COMPARE {
            let (gpu, cpu) = run_both(name, &[&a, &b], |t| f(t[0], t[1]));
            assert_exact(&format!("{name} {da} {sa:?} vs {db} {sb:?}"), &gpu, &cpu);
        }
        let dtype = if da.is_float() { da } else { DType::F32 };
        let sm = broadcast_side(&out, &mut rng);
        let mask = Input::new(&sm, lb, DType::U8, &mut rng, |r| r.below(3) as f64);
        let t = Input::var(&sa, la, dtype, &mut rng, sym);
        let f = Input::var(&sb, lb, dtype, &mut rng, sym);
        check_op(&format!("where_cond {dtype}"), &[&mask, &t, &f], tolerance(dtype), &mut rng, |x| {
            Tensor::where_cond(x[0], x[1], x[2])
        });
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reductions

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn reductions(
        (shape, dims) in shape_and_dims(4, true),
        keepdim in any::<bool>(),
        lay in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let tol = tolerance(dtype);
        // A positive mean keeps sums away from zero; small enough that f16 sums of 2^18 elements stay finite.
        let x = Input::var(&shape, lay, dtype, &mut rng, |r| r.range(-1.0, 1.25));
        let d = dims.clone();
        let what = |op: &str| format!("{op} over {dims:?} of {shape:?} (keepdim {keepdim}) {dtype}");
        check_op(&what("sum"), &[&x], tol, &mut rng, |t| {
            if keepdim { t[0].sum_keepdim(d.clone()) } else { t[0].sum(d.clone()) }
        });
        check_op(&what("max"), &[&x], tol, &mut rng, |t| {
            if keepdim { t[0].max_keepdim(d.clone()) } else { t[0].max(d.clone()) }
        });
        check_op(&what("min"), &[&x], tol, &mut rng, |t| {
            if keepdim { t[0].min_keepdim(d.clone()) } else { t[0].min(d.clone()) }
        });
        // The mean of nothing is 0/0 on both devices: only non-empty groups have one to compare.
        if dims.iter().all(|&i| shape[i] > 0) {
            check_op(&what("mean"), &[&x], tol, &mut rng, |t| {
                if keepdim { t[0].mean_keepdim(d.clone()) } else { t[0].mean(d.clone()) }
            });
        }
        check_op(&what("sum_all"), &[&x], tol, &mut rng, |t| t[0].sum_all());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn argmax_argmin(
        (shape, dim) in shape_and_dim(3, false),
        keepdim in any::<bool>(),
        lay in select(vec![Lay::Contiguous, Lay::Transposed, Lay::Permuted, Lay::Narrowed]),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        // Distinct integers, exact in the dtype, so that no row has a tie.
        let n: usize = shape.iter().product();
        let dtype = match n {
            0..=256 => pick(&mut rng, &FLOATS),
            257..=2048 => pick(&mut rng, &[DType::F32, DType::F16]),
            _ => DType::F32,
        };
        let mut values = rng.permutation(n).into_iter();
        let x = Input::new(&shape, lay, dtype, &mut rng, move |_| {
            values.next().expect("one value per element") as f64 - (n / 2) as f64
        });
        let what = |op: &str| format!("{op} over dim {dim} of {shape:?} (keepdim {keepdim}) {dtype}");
        let (gpu, cpu) = run_both("argmax", &[&x], |t| {
            if keepdim { t[0].argmax_keepdim(dim) } else { t[0].argmax(dim) }
        });
        assert_exact(&what("argmax"), &gpu, &cpu);
        let (gpu, cpu) = run_both("argmin", &[&x], |t| t[0].argmin(dim));
        assert_exact(&what("argmin"), &gpu, &cpu);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Softmax, norms, RoPE

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn softmax_and_log_softmax(
        (shape, dim) in shape_and_dim(3, true),
        lay in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let tol = tolerance(dtype);
        let x = Input::var(&shape, lay, dtype, &mut rng, |r| r.range(-4.0, 4.0));
        let what = |op: &str| format!("{op} over dim {dim} of {shape:?} {dtype}");
        check_op(&what("softmax"), &[&x], tol, &mut rng, |t| t[0].softmax(dim));
        check_op(&what("log_softmax"), &[&x], tol, &mut rng, |t| t[0].log_softmax(dim));
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn causal_softmax(
        lead in proptest::collection::vec(1usize..=3, 0..=2),
        keys in select(vec![1usize, 7, 31, 33, 257, 1000]),
        square in any::<bool>(),
        queries in any::<Index>(),
        lay in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        // Square blocks (self-attention) and fewer queries than keys (the last queries of a KV cache).
        let q = if square && keys <= 257 { keys } else { 1 + queries.index(keys.min(48)) };
        let shape = [lead.as_slice(), &[q, keys]].concat();
        let x = Input::var(&shape, lay, dtype, &mut rng, |r| r.range(-4.0, 4.0));
        check_op(&format!("causal_softmax {shape:?} {dtype}"), &[&x], tolerance(dtype), &mut rng, |t| {
            t[0].causal_softmax()
        });
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn layer_norm_and_rms_norm(
        lead in proptest::collection::vec(prop_oneof![5 => 1usize..=5, 1 => Just(0usize)], 0..=2),
        d in select(AWKWARD.to_vec()),
        lay in lay(),
        weight_lay in lay(),
        with_weight in any::<bool>(),
        with_bias in any::<bool>(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let tol = tolerance(dtype);
        let shape = [lead.as_slice(), &[d]].concat();
        let x = Input::var(&shape, lay, dtype, &mut rng, |r| r.range(-2.0, 3.0));
        let w = Input::var(&[d], weight_lay, dtype, &mut rng, |r| r.range(0.5, 1.5));
        let b = Input::var(&[d], weight_lay, dtype, &mut rng, |r| r.range(-0.5, 0.5));
        let mut inputs = vec![&x];
        if with_weight {
            inputs.push(&w);
        }
        if with_bias {
            inputs.push(&b);
        }
        let what = format!("layer_norm {shape:?} weight {with_weight} bias {with_bias} {dtype}");
        check_op(&what, &inputs, tol, &mut rng, |t| {
            let weight = with_weight.then(|| t[1]);
            let bias = with_bias.then(|| t[t.len() - 1]);
            t[0].layer_norm(weight, bias, 1e-5)
        });
        let inputs: Vec<&Input> = if with_weight { vec![&x, &w] } else { vec![&x] };
        let what = format!("rms_norm {shape:?} weight {with_weight} {dtype}");
        check_op(&what, &inputs, tol, &mut rng, |t| t[0].rms_norm(with_weight.then(|| t[1]), 1e-6));
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn rope_both_styles(
        b in 1usize..=2,
        h in 1usize..=3,
        s in select(vec![1usize, 7, 33, 100]),
        d in select(vec![2usize, 8, 34, 64]),
        interleaved in any::<bool>(),
        batched_positions in any::<bool>(),
        base in select(vec![10_000f32, 500_000.0]),
        scale in select(vec![1f32, 0.25]),
        lay in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let style = if interleaved { RopeStyle::Interleaved } else { RopeStyle::Half };
        let max_pos = s + 20;
        let table = RopeTable::new(d, max_pos, base, scale, style, CPU).unwrap();
        let pshape = if batched_positions { vec![b, s] } else { vec![s] };
        let positions = ids_input(&pshape, max_pos, &mut rng);
        let x = Input::var(&[b, h, s, d], lay, dtype, &mut rng, sym);
        let what = format!("rope {style:?} [{b}, {h}, {s}, {d}] positions {pshape:?} {dtype}");
        check_op(&what, &[&x, &positions], tolerance(dtype), &mut rng, |t| t[0].rope(&table, t[1]));
        // Positions may also live on the host while x is on the GPU.
        let host_positions = x.gpu.rope(&table, &positions.cpu).unwrap();
        let gpu_positions = x.gpu.rope(&table, &positions.gpu).unwrap();
        assert_exact(&format!("{what}, host positions"), &host_positions, &gpu_positions.to_device(CPU).unwrap());
    }
}

// ---------------------------------------------------------------------------------------------------------
// Indexing, joining, copies and casts

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn index_select_gather_scatter(
        (shape, dim) in shape_and_dim(3, false),
        lay in lay(),
        n_ids in 1usize..=40,
        k in 1usize..=5,
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let tol = tolerance(dtype);
        let size = shape[dim];
        let what = |op: &str| format!("{op} along dim {dim} of {shape:?} {dtype}");
        let x = Input::var(&shape, lay, dtype, &mut rng, sym);
        // Repeated ids: the backward (index_add, scatter_add) must accumulate them.
        let ids = ids_input(&[n_ids], size, &mut rng);
        check_op(&what("index_select"), &[&x, &ids], tol, &mut rng, |t| t[0].index_select(t[1], dim));

        let mut src_shape = shape.clone();
        src_shape[dim] = n_ids;
        let src = Input::var(&src_shape, lay, dtype, &mut rng, sym);
        check_op(&what("index_add"), &[&x, &ids, &src], tol, &mut rng, |t| {
            t[0].index_add(t[1], t[2], dim)
        });

        let mut ids_shape = shape.clone();
        ids_shape[dim] = k;
        let gather_ids = ids_input(&ids_shape, size, &mut rng);
        check_op(&what("gather"), &[&x, &gather_ids], tol, &mut rng, |t| t[0].gather(t[1], dim));
        let src = Input::var(&ids_shape, lay, dtype, &mut rng, sym);
        check_op(&what("scatter_add"), &[&x, &gather_ids, &src], tol, &mut rng, |t| {
            t[0].scatter_add(t[1], t[2], dim)
        });
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn embedding_with_repeated_ids(
        vocab in select(vec![7usize, 33, 257, 1000]),
        width in select(vec![1usize, 7, 32, 33, 100]),
        b in 1usize..=3,
        s in 1usize..=40,
        few in any::<bool>(),
        lay in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let table = Input::var(&[vocab, width], lay, dtype, &mut rng, sym);
        // Sometimes only a handful of distinct ids, so that most rows of the gradient collide.
        let ids = ids_input(&[b, s], if few { vocab.min(3) } else { vocab }, &mut rng);
        let what = format!("embedding [{vocab}, {width}] ids [{b}, {s}] {dtype}");
        check_op(&what, &[&table, &ids], tolerance(dtype), &mut rng, |t| t[0].embedding(t[1]));
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn cat_and_stack(
        (shape, dim) in shape_and_dim(3, true),
        parts in 1usize..=4,
        lays in proptest::collection::vec(lay(), 4),
        dtype in any_dtype(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let (lo, hi) = int_range(dtype);
        let build = |s: &[usize], lay: Lay, rng: &mut DataRng| {
            if dtype.is_float() {
                Input::var(s, lay, dtype, rng, sym)
            } else {
                Input::new(s, lay, dtype, rng, integers(lo.max(-100), hi.min(100)))
            }
        };
        let cat_parts: Vec<Input> = (0..parts)
            .map(|i| {
                let mut s = shape.clone();
                s[dim] = if i == 0 { shape[dim] } else { rng.below(4) };
                build(&s, lays[i], &mut rng)
            })
            .collect();
        let refs: Vec<&Input> = cat_parts.iter().collect();
        let tol = tolerance(dtype);
        check_copy(&format!("cat {parts} parts of {shape:?} along {dim}, {dtype}"), &refs, tol, &mut rng, |t| {
            let owned: Vec<Tensor> = t.iter().map(|&x| x.clone()).collect();
            Tensor::cat(&owned, dim)
        });
        let same: Vec<Input> = (0..parts).map(|i| build(&shape, lays[i], &mut rng)).collect();
        let refs: Vec<&Input> = same.iter().collect();
        let at = rng.below(shape.len() + 1);
        check_copy(&format!("stack {parts} of {shape:?} at {at}, {dtype}"), &refs, tol, &mut rng, |t| {
            let owned: Vec<Tensor> = t.iter().map(|&x| x.clone()).collect();
            Tensor::stack(&owned, at)
        });
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn contiguous_copies_of_views(
        shape in shape(0, 4, true),
        lay in lay(),
        dtype in any_dtype(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let (lo, hi) = int_range(dtype);
        let x = if dtype.is_float() {
            Input::var(&shape, lay, dtype, &mut rng, sym)
        } else {
            Input::new(&shape, lay, dtype, &mut rng, integers(lo, hi))
        };
        let tol = tolerance(dtype);
        check_copy(&format!("contiguous {lay:?} {shape:?} {dtype}"), &[&x], tol, &mut rng, |t| t[0].contiguous());
        check_copy(&format!("copy {lay:?} {shape:?} {dtype}"), &[&x], tol, &mut rng, |t| t[0].copy());
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn casts_between_all_dtypes(
        shape in shape(0, 3, true),
        lay in lay(),
        from in any_dtype(),
        to in any_dtype(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let what = format!("to_dtype {from} -> {to} of {lay:?} {shape:?}");
        let x = if from.is_float() && to.is_float() {
            Input::var(&shape, lay, from, &mut rng, |r| r.range(-1000.0, 1000.0))
        } else {
            // Integers both dtypes hold exactly, so every float -> int cast is exact and in range.
            let ((a, b), (c, d)) = (int_range(from), int_range(to));
            Input::new(&shape, lay, from, &mut rng, integers(a.max(c), b.min(d)))
        };
        let tol = tolerance(from).max(tolerance(to));
        check_copy(&what, &[&x], tol, &mut rng, |t| t[0].to_dtype(to));
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn cross_entropy_with_and_without_ignore(
        rows in select(vec![1usize, 7, 33, 64]),
        vocab in select(vec![2usize, 7, 33, 257, 1000, 4097]),
        three_d in any::<bool>(),
        ignore in any::<bool>(),
        all_ignored in prop_oneof![7 => Just(false), 1 => Just(true)],
        lay in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let lead = if three_d { vec![2, rows] } else { vec![rows] };
        let logits = Input::var(&[lead.as_slice(), &[vocab]].concat(), lay, dtype, &mut rng, |r| {
            r.range(-4.0, 4.0)
        });
        let targets = Input::new(&lead, Lay::Contiguous, DType::I32, &mut rng, |r| {
            if ignore && (all_ignored || r.below(4) == 0) { -100.0 } else { r.below(vocab) as f64 }
        });
        let what = format!("cross_entropy {lead:?} x {vocab}, ignore {ignore} (all {all_ignored}), {dtype}");
        check_op(&what, &[&logits, &targets], tolerance(dtype), &mut rng, |t| {
            t[0].cross_entropy(t[1], ignore.then_some(-100))
        });
    }
}

// ---------------------------------------------------------------------------------------------------------
// Matmul

const MNK: [usize; 8] = [1, 7, 16, 31, 33, 64, 100, 257];

/// Batch dims for the two operands that broadcast together (missing or size-1 dims on either side).
fn batch_dims() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (proptest::collection::vec(1usize..=3, 0..=2), any::<u64>()).prop_map(|(out, seed)| {
        let mut rng = DataRng::new(seed);
        (
            broadcast_side(&out, &mut rng),
            broadcast_side(&out, &mut rng),
        )
    })
}

fn check_matmul(
    (ba, bb): (&[usize], &[usize]),
    (m, n, k): (usize, usize, usize),
    (la, lb): (Lay, Lay),
    dtype: DType,
    tol: f64,
    seed: u64,
) {
    let mut rng = DataRng::new(seed);
    let sa = [ba, &[m, k]].concat();
    let sb = [bb, &[k, n]].concat();
    let a = Input::var(&sa, la, dtype, &mut rng, |r| r.range(-1.0, 1.0));
    let b = Input::var(&sb, lb, dtype, &mut rng, |r| r.range(-1.0, 1.0));
    let what = format!("matmul {la:?} {sa:?} @ {lb:?} {sb:?} {dtype}");
    check_op(&what, &[&a, &b], tol, &mut rng, |t| t[0].matmul(t[1]));
}

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn matmul_f32_f16_bf16(
        (ba, bb) in batch_dims(),
        m in select(MNK.to_vec()),
        n in select(MNK.to_vec()),
        k in select(MNK.to_vec()),
        la in lay(),
        lb in lay(),
        dtype in float(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        check_matmul((&ba, &bb), (m, n, k), (la, lb), dtype, tolerance(dtype), seed);
    }
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn matmul_tf32(
        (ba, bb) in batch_dims(),
        m in select(MNK.to_vec()),
        n in select(MNK.to_vec()),
        k in select(MNK.to_vec()),
        la in lay(),
        lb in lay(),
        seed in any::<u64>(),
    ) {
        let _gpu = exclusive();
        let _tf32 = Tf32::on();
        check_matmul((&ba, &bb), (m, n, k), (la, lb), DType::F32, TF32_TOLERANCE, seed);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Attention

proptest! {
    #![proptest_config(cases(16))]

    /// The GPU's composed attention (matmul, softmax, RoPE, masks through autograd) against the CPU's
    /// fused flash kernel: values and the gradients of q, k and v.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn flash_attention_matches_the_cpu_kernel(
        b in 1usize..=2,
        kv_len in select(vec![1usize, 7, 33, 100]),
        q_frac in any::<Index>(),
        kv_heads in 1usize..=2,
        group in 1usize..=3,
        d in select(vec![8usize, 16, 64]),
        causal in any::<bool>(),
        rotary in any::<bool>(),
        padding in any::<bool>(),
        lays in proptest::collection::vec(lay(), 3),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let q_len = 1 + q_frac.index(kv_len);
        let heads = kv_heads * group;
        let gen = |r: &mut DataRng| r.range(-1.5, 1.5);
        let q = Input::var(&[b, q_len, heads, d], lays[0], DType::F32, &mut rng, gen);
        let k = Input::var(&[b, kv_len, kv_heads, d], lays[1], DType::F32, &mut rng, gen);
        let v = Input::var(&[b, kv_len, kv_heads, d], lays[2], DType::F32, &mut rng, gen);
        let table = RopeTable::new(d, kv_len + 8, 10_000.0, 1.0, RopeStyle::Half, CPU).unwrap();
        let positions = ids_input(&[b, kv_len], kv_len + 8, &mut rng);
        // Mostly visible keys; a batch row may lose all of them (its queries then output zeros).
        let valid = Input::new(&[b, kv_len], Lay::Contiguous, DType::U8, &mut rng, |r| {
            f64::from(u8::from(r.below(5) != 0))
        });
        let what = format!(
            "flash_attention b {b} q {q_len} kv {kv_len} heads {heads}/{kv_heads} d {d} causal {causal} \
             rotary {rotary} padding {padding}"
        );
        check_op(&what, &[&q, &k, &v, &positions, &valid], tolerance(DType::F32), &mut rng, |t| {
            let opts = AttentionOptions {
                causal,
                key_padding: padding.then_some(t[4]),
                rotary: rotary.then_some(Rotary { table: &table, positions: t[3] }),
                ..AttentionOptions::default()
            };
            t[0].flash_attention(t[1], t[2], &opts)
        });
    }
}

/// Document ids for `n` keys: runs of 1 to 40 equal ids, an id sometimes repeating after a different
/// one (a new document all the same).
fn documents(n: usize, rng: &mut DataRng) -> Vec<f64> {
    let mut ids = Vec::with_capacity(n);
    let mut id = 0.0;
    while ids.len() < n {
        let run = 1 + rng.below(40);
        ids.extend(std::iter::repeat_n(id, run.min(n - ids.len())));
        id = if rng.below(4) == 0 { 0.0 } else { id + 1.0 };
    }
    ids
}

proptest! {
    #![proptest_config(cases(32))]

    /// The GPU's flash kernels (cuda/flash_fwd.cu, cuda/flash_bwd.cu: f16/bf16 on tensor cores, head_dim
    /// 64 and 128) against the CPU's fused kernel on the same rounded inputs: the output and the
    /// gradients of q, k and v, over lengths that are no multiple of the kernels' 64- and 128-row tiles,
    /// q_len both sides of kv_len (queries of a causal q_len > kv_len see no key and output zeros),
    /// grouped-query ratios up to 4 and one mask at a time: key padding (a batch row may lose every
    /// key), packed documents, a sliding window, or RoPE applied before the kernel. Gradients allow
    /// three times the forward's tolerance: dS = P∘(dP − Δ) cancels in 16-bit inputs.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn flash_kernels_match_the_cpu_kernel(
        b in 1usize..=2,
        kv_len in select(vec![1usize, 17, 64, 100, 130, 257]),
        q_len in select(vec![1usize, 17, 64, 100, 130, 257]),
        kv_heads in 1usize..=3,
        group in select(vec![1usize, 2, 3, 4]),
        d in select(vec![64usize, 128]),
        f16 in any::<bool>(),
        causal in any::<bool>(),
        mask in 0u8..5,
        lays in proptest::collection::vec(lay(), 3),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let dtype = if f16 { DType::F16 } else { DType::BF16 };
        // RoPE needs q_len ≤ kv_len.
        let q_len = if mask == 4 { q_len.min(kv_len) } else { q_len };
        let heads = kv_heads * group;
        let gen = |r: &mut DataRng| r.range(-2.0, 2.0);
        let q = Input::var(&[b, q_len, heads, d], lays[0], dtype, &mut rng, gen);
        let k = Input::var(&[b, kv_len, kv_heads, d], lays[1], dtype, &mut rng, gen);
        let v = Input::var(&[b, kv_len, kv_heads, d], lays[2], dtype, &mut rng, gen);
        let table = RopeTable::new(d, kv_len + 8, 10_000.0, 1.0, RopeStyle::Half, CPU).unwrap();
        let positions = ids_input(&[b, kv_len], kv_len + 8, &mut rng);
        let all_padded = rng.below(4);
        let valid = Input::new(&[b, kv_len], Lay::Contiguous, DType::U8, &mut rng, |r| {
            f64::from(u8::from(all_padded != 0 && r.below(5) != 0))
        });
        let docs: Vec<f64> = (0..b).flat_map(|_| documents(kv_len, &mut rng)).collect();
        let mut docs = docs.into_iter();
        let segments = Input::new(&[b, kv_len], Lay::Contiguous, DType::I32, &mut rng, |_| {
            docs.next().unwrap_or(0.0)
        });
        let window = 1 + rng.below(kv_len + 4);
        let what = format!(
            "flash kernels {dtype:?} b {b} q {q_len} kv {kv_len} heads {heads}/{kv_heads} d {d} \
             causal {causal} mask {} (window {window})",
            ["none", "key padding", "documents", "window", "rotary"][mask as usize]
        );
        let inputs = [&q, &k, &v, &positions, &valid, &segments];
        let (gpu, cpu) = run_both(&what, &inputs, |t| {
            let opts = AttentionOptions {
                causal,
                key_padding: (mask == 1).then_some(t[4]),
                segments: (mask == 2).then_some(t[5]),
                window: (mask == 3).then_some(window),
                rotary: (mask == 4).then_some(Rotary { table: &table, positions: t[3] }),
                ..AttentionOptions::default()
            };
            t[0].flash_attention(t[1], t[2], &opts)
        });
        assert_within(&what, &gpu, &cpu, tolerance(dtype));
        let (gl, cl) = losses(&gpu, &cpu, &mut rng);
        assert_grads(&what, &inputs, &gl, &cl, 3.0 * tolerance(dtype));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Optimizers and gradient clipping

/// Parameters (f32 variables) with the same values on both devices: (CPU, GPU) pairs.
fn params(shapes: &[Vec<usize>], rng: &mut DataRng) -> Vec<Input> {
    shapes
        .iter()
        .map(|s| Input::var(s, Lay::Contiguous, DType::F32, rng, |r| r.range(-1.0, 1.0)))
        .collect()
}

/// Fresh random gradients for `params` laid out as `lays` says, in a store per device.
fn gradients(params: &[Input], lays: &[Lay], rng: &mut DataRng) -> (GradStore, GradStore) {
    let (mut gpu, mut cpu) = (GradStore::new(), GradStore::new());
    for (p, &lay) in params.iter().zip(lays) {
        let g = Input::new(p.cpu.dims(), lay, DType::F32, rng, |r| r.normal());
        gpu.insert(&p.gpu_leaf, g.gpu);
        cpu.insert(&p.cpu_leaf, g.cpu);
    }
    (gpu, cpu)
}

fn named(params: &[Input], gpu: bool) -> Vec<(String, Tensor)> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = if gpu { &p.gpu_leaf } else { &p.cpu_leaf };
            (format!("p{i}"), t.clone())
        })
        .collect()
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    #[ignore = "needs a CUDA device"]
    fn adamw_and_sgd_steps(
        shapes in proptest::collection::vec(shape(1, 2, false), 1..=3),
        lays in proptest::collection::vec(lay(), 3),
        adam in any::<bool>(),
        lr in select(vec![1e-3f32, 3e-2, 0.1]),
        weight_decay in select(vec![0f32, 0.01, 0.1]),
        beta2 in select(vec![0.95f32, 0.999]),
        momentum in select(vec![0f32, 0.9]),
        nesterov in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let ps = params(&shapes, &mut rng);
        let make = |gpu: bool| -> Box<dyn Optimizer> {
            if adam {
                let cfg = AdamWConfig { lr, beta1: 0.9, beta2, eps: 1e-8, weight_decay };
                Box::new(AdamW::new(named(&ps, gpu), cfg).unwrap())
            } else {
                let cfg = SgdConfig { lr, momentum, weight_decay, nesterov: nesterov && momentum > 0.0 };
                Box::new(Sgd::new(named(&ps, gpu), cfg).unwrap())
            }
        };
        let (mut on_gpu, mut on_cpu) = (make(true), make(false));
        let name = if adam { "AdamW" } else { "SGD" };
        for step in 1..=3 {
            let (gg, cg) = gradients(&ps, &lays, &mut rng);
            on_gpu.step(&gg).unwrap();
            on_cpu.step(&cg).unwrap();
            for (i, p) in ps.iter().enumerate() {
                assert_close(&format!("{name} step {step}, parameter {i}"), &p.gpu_leaf, &p.cpu_leaf, DType::F32);
            }
            let (gs, cs) = (on_gpu.state().unwrap(), on_cpu.state().unwrap());
            for ((name, g), (_, c)) in gs.iter().zip(&cs) {
                if g.device().is_cuda() {
                    assert_close(&format!("state {name} after step {step}"), g, c, DType::F32);
                } else {
                    assert_eq!(g.to_vec_f32(), c.to_vec_f32(), "state {name} after step {step}");
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn clip_grad_norm_on_device_gradients(
        shapes in proptest::collection::vec(shape(1, 2, false), 1..=3),
        lays in proptest::collection::vec(lay(), 3),
        max_norm in select(vec![0.01f32, 1.0, 1e6]),
        seed in any::<u64>(),
    ) {
        let _gpu = shared();
        let mut rng = DataRng::new(seed);
        let ps = params(&shapes, &mut rng);
        let (mut gg, mut cg) = gradients(&ps, &lays, &mut rng);
        let gpu_params: Vec<Tensor> = ps.iter().map(|p| p.gpu_leaf.clone()).collect();
        let cpu_params: Vec<Tensor> = ps.iter().map(|p| p.cpu_leaf.clone()).collect();
        let gn = clip_grad_norm(&gpu_params, &mut gg, max_norm).unwrap();
        let cn = clip_grad_norm(&cpu_params, &mut cg, max_norm).unwrap();
        prop_assert!(
            ((gn - cn) / cn).abs() <= 1e-5,
            "gradient norm {gn} on the GPU, {cn} on the CPU"
        );
        for (i, p) in ps.iter().enumerate() {
            let (g, c) = (gg.get(&p.gpu_leaf).unwrap(), cg.get(&p.cpu_leaf).unwrap());
            assert_close(&format!("clipped gradient {i} (max norm {max_norm})"), g, c, DType::F32);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Plain tests: empty tensors, round trips, device mismatch, the allocator and the copy counters

#[test]
#[ignore = "needs a CUDA device"]
fn empty_tensors() {
    let _gpu = shared();
    let mut rng = DataRng::new(3);
    let tol = tolerance(DType::F32);
    let x = Input::var(&[0, 5], Lay::Contiguous, DType::F32, &mut rng, sym);
    let y = Input::var(&[5, 0], Lay::Contiguous, DType::F32, &mut rng, sym);
    let full = Input::var(&[2, 5], Lay::Contiguous, DType::F32, &mut rng, sym);
    let ops: [(&str, Vec<&Input>, BinFn); 11] = [
        ("sum over the empty dim", vec![&x], |a, _| a.sum(0)),
        ("sum over the full dim", vec![&x], |a, _| a.sum(1)),
        ("max over the empty dim", vec![&x], |a, _| a.max(0)),
        ("softmax of no rows", vec![&x], |a, _| a.softmax(1)),
        ("layer_norm of no rows", vec![&x], |a, _| {
            a.layer_norm(None, None, 1e-5)
        }),
        ("matmul with k = 0", vec![&y, &x], |a, b| a.matmul(b)),
        ("matmul with m = 0", vec![&x, &y], |a, b| a.matmul(b)),
        ("cat with an empty part", vec![&x, &full], |a, b| {
            Tensor::cat(&[a.clone(), b.clone()], 0)
        }),
        ("contiguous transpose", vec![&y], |a, _| a.t()?.contiguous()),
        ("exp", vec![&x], |a, _| a.exp()),
        ("to bf16", vec![&x], |a, _| a.to_dtype(DType::BF16)),
    ];
    for (what, inputs, f) in ops {
        check_op(what, &inputs, tol, &mut rng, |t| f(t[0], t[t.len() - 1]));
    }
    let none = ids_input(&[0], 5, &mut rng);
    check_op(
        "index_select with no ids",
        &[&full, &none],
        tol,
        &mut rng,
        |t| t[0].index_select(t[1], 1),
    );
    let logits = Input::var(&[0, 7], Lay::Contiguous, DType::F32, &mut rng, sym);
    let targets = ids_input(&[0], 7, &mut rng);
    check_op(
        "cross_entropy of no rows",
        &[&logits, &targets],
        tol,
        &mut rng,
        |t| t[0].cross_entropy(t[1], None),
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn to_device_round_trips() {
    let _gpu = shared();
    let mut rng = DataRng::new(11);
    for case in 0..30 {
        let dtype = ALL_DTYPES[case % ALL_DTYPES.len()];
        let lay = LAYS[case % LAYS.len()];
        let shape = [
            1 + rng.below(40),
            pick(&mut rng, &AWKWARD),
            1 + rng.below(3),
        ];
        let (lo, hi) = int_range(dtype);
        let x = Input::new(&shape, lay, dtype, &mut rng, integers(lo, hi));
        let what = format!("{lay:?} {shape:?} {dtype}");
        // A strided host view uploads as a contiguous copy; a strided device view downloads as one.
        let up = x.cpu.to_device(GPU).unwrap();
        assert_exact(&format!("upload of {what}"), &up, &x.cpu);
        let down = x.gpu.to_device(CPU).unwrap();
        assert_exact(&format!("download of {what}"), &x.gpu, &down);
        let again = down.to_device(GPU).unwrap();
        assert_exact(&format!("second upload of {what}"), &again, &x.cpu);
        assert_eq!(
            x.gpu.to_le_bytes().unwrap(),
            x.cpu.to_le_bytes().unwrap(),
            "bytes of {what}"
        );
    }
    // Gradients flow back across a device move: d/dx Σ exp(2x) = 2·exp(2x), computed on the GPU,
    // arrives on the host.
    let x = Input::var(&[33, 7], Lay::Transposed, DType::F32, &mut rng, sym);
    let through_gpu = |x: &Tensor| x.mul_scalar(2.0)?.to_device(GPU)?.exp()?.sum_all();
    let on_cpu = |x: &Tensor| x.mul_scalar(2.0)?.exp()?.sum_all();
    let g = through_gpu(&x.cpu).unwrap().backward().unwrap();
    let c = on_cpu(&x.cpu).unwrap().backward().unwrap();
    let (g, c) = (g.get(&x.cpu_leaf).unwrap(), c.get(&x.cpu_leaf).unwrap());
    assert_eq!(
        g.device(),
        CPU,
        "the gradient of a host variable stays on the host"
    );
    assert!(
        rel_err(g, c) <= tolerance(DType::F32),
        "gradient through to_device"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn mixing_devices_is_an_error() {
    let _gpu = shared();
    let g = Tensor::ones((3, 4), DType::F32, GPU).unwrap();
    let c = Tensor::ones((3, 4), DType::F32, CPU).unwrap();
    let mask = Tensor::ones((3, 4), DType::U8, GPU).unwrap();
    let ids = Tensor::from_vec(vec![0i32, 2], 2, CPU).unwrap();
    let w = Tensor::ones(4, DType::F32, CPU).unwrap();
    let cases: Vec<(&str, trit::Result<Tensor>)> = vec![
        ("add", g.add(&c)),
        ("add, host lhs", c.add(&g)),
        ("lt", g.lt(&c)),
        ("matmul", g.matmul(&c.t().unwrap())),
        ("cat", Tensor::cat(&[g.clone(), c.clone()], 0)),
        ("where_cond", Tensor::where_cond(&mask, &g, &c)),
        (
            "layer_norm with a host weight",
            g.layer_norm(Some(&w), None, 1e-5),
        ),
        ("rms_norm with a host weight", g.rms_norm(Some(&w), 1e-5)),
        (
            "index_add of a host source",
            g.index_add(&ids, &c.narrow(0, 0, 2).unwrap(), 0),
        ),
    ];
    for (what, r) in cases {
        match r {
            Err(Error::DeviceMismatch { .. }) => {}
            other => panic!(
                "{what}: expected Error::DeviceMismatch, got {:?}",
                other.map(|t| t.device())
            ),
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn freed_blocks_are_reused() {
    let _gpu = exclusive();
    let dev = CudaDevice::get(0).unwrap();
    // An odd size, so that its bucket is unlikely to be shared with anything else.
    let n = 3 * 1024 * 1024 + 5;
    let warm = (
        Tensor::zeros(n, DType::F32, GPU).unwrap(),
        Tensor::zeros(n, DType::F32, GPU).unwrap(),
    );
    drop(warm);
    let before = dev.pool_stats();
    for _ in 0..10 {
        let a = Tensor::zeros(n, DType::F32, GPU).unwrap();
        let b = a.exp().unwrap();
        drop((a, b));
    }
    let after = dev.pool_stats();
    assert!(
        after.reuses >= before.reuses + 20,
        "20 allocations of a freed size, {} reuses ({before:?} -> {after:?})",
        after.reuses - before.reuses
    );
    assert_eq!(
        after.driver_allocs, before.driver_allocs,
        "no new driver allocation for a size already cached"
    );
    assert_eq!(after.in_use, before.in_use, "every block went back");
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_work_makes_no_host_copies() {
    let _gpu = exclusive();
    let mut rng = DataRng::new(5);
    let x = Input::var(&[64, 257], Lay::Contiguous, DType::F32, &mut rng, sym);
    let w = Input::var(&[257], Lay::Contiguous, DType::F32, &mut rng, pos);
    let m = Input::var(&[257, 33], Lay::Contiguous, DType::F32, &mut rng, sym);
    let before = trit::transfers::snapshot();
    let y = x
        .gpu
        .rms_norm(Some(&w.gpu), 1e-6)
        .and_then(|t| t.matmul(&m.gpu))
        .and_then(|t| t.softmax(-1))
        .and_then(|t| t.t()?.contiguous())
        .and_then(|t| t.to_dtype(DType::BF16)?.exp()?.to_dtype(DType::F32))
        .and_then(|t| t.sum(0))
        .unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let during = trit::transfers::snapshot().since(&before);
    assert_eq!(
        (during.host_to_device, during.device_to_host),
        (0, 0),
        "forward and backward on device tensors copy nothing ({during})"
    );
    // Reading a result back is one download, contiguous or not.
    for (what, t) in [
        ("a contiguous result", y.clone()),
        (
            "a transposed gradient",
            grads.get(&m.gpu_leaf).unwrap().t().unwrap(),
        ),
    ] {
        let before = trit::transfers::snapshot();
        let v = t.to_vec::<f32>().unwrap();
        let d = trit::transfers::snapshot().since(&before);
        assert_eq!(
            (d.host_to_device, d.device_to_host),
            (0, 1),
            "to_vec of {what} ({d})"
        );
        assert_eq!(
            d.device_to_host_bytes,
            4 * v.len() as u64,
            "bytes of {what}"
        );
    }
}
