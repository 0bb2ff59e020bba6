//! Reverse-mode autodiff: a topological sort of the recorded graph and one `match` of gradient rules.
//! Gradients are computed with forward ops (so they run on any backend) under `no_grad`.

use crate::error::Result;
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::tensor::{no_grad, Tensor, TensorId};
use std::collections::{HashMap, HashSet};

/// Gradients keyed by tensor id.
#[derive(Default, Clone)]
pub struct GradStore(HashMap<TensorId, Tensor>);

impl GradStore {
    pub fn new() -> Self {
        GradStore::default()
    }

    /// The gradient of `t`, if it received one.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }

    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.0.get(&id)
    }

    pub fn insert(&mut self, t: &Tensor, grad: Tensor) {
        self.0.insert(t.id(), grad);
    }

    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.0.remove(&t.id())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `grad` to the gradient stored for `id`.
    fn accumulate(&mut self, id: TensorId, grad: Tensor) -> Result<()> {
        let new = match self.0.remove(&id) {
            Some(old) => old.add(&grad)?,
            None => grad,
        };
        self.0.insert(id, new);
        Ok(())
    }
}

/// Nodes reachable from `root` through tensors that track gradients, parents before children reversed
/// (i.e. the order in which to run backward).
fn sorted_nodes(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if let Some(op) = t.op() {
            for input in op.inputs() {
                if input.tracks_grad() && !seen.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order.reverse();
    order
}

/// Sums `grad` (of a broadcast view's shape) back to the shape `dims` it was broadcast from.
fn sum_to(grad: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let lead = grad.rank() - dims.len();
    let mut reduce: Vec<usize> = (0..lead).collect();
    reduce.extend(
        (0..dims.len())
            .filter(|&i| dims[i] == 1 && grad.dims()[lead + i] != 1)
            .map(|i| lead + i),
    );
    let g = if reduce.is_empty() {
        grad.clone()
    } else {
        grad.sum_keepdim(reduce)?
    };
    g.reshape(dims.to_vec())
}

impl Tensor {
    /// Gradients of this tensor (usually a scalar loss; otherwise seeded with ones) with respect to every
    /// variable it depends on.
    pub fn backward(&self) -> Result<GradStore> {
        let mut store = GradStore::new();
        self.backward_into(&mut store)?;
        Ok(store)
    }

    /// Like [`Tensor::backward`], adding into an existing store (gradient accumulation across micro-batches).
    pub fn backward_into(&self, store: &mut GradStore) -> Result<()> {
        let _guard = no_grad();
        let nodes = sorted_nodes(self);
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(self.id(), self.ones_like()?);
        for node in nodes {
            let Some(grad) = grads.remove(&node.id()) else {
                continue;
            };
            if node.is_variable() {
                store.accumulate(node.id(), grad.clone())?;
            }
            let Some(op) = node.op() else { continue };
            for (input, g) in input_grads(op, &node, &grad)? {
                if !input.tracks_grad() {
                    continue;
                }
                let g = match grads.remove(&input.id()) {
                    Some(old) => old.add(&g)?,
                    None => g,
                };
                grads.insert(input.id(), g);
            }
        }
        Ok(())
    }
}

/// The gradient rule of each op: (input, gradient w.r.t. that input).
fn input_grads(op: &Op, out: &Tensor, g: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
    Ok(match op {
        Op::Unary(x, u) => {
            let dx = match *u {
                UnaryOp::Neg => g.neg()?,
                UnaryOp::Exp => g.mul(out)?,
                UnaryOp::Log => g.div(x)?,
                UnaryOp::Sqrt => g.div(out)?.mul_scalar(0.5)?,
                UnaryOp::Rsqrt => g.mul(&out.powf(3.0)?)?.mul_scalar(-0.5)?,
                UnaryOp::Tanh => g.mul(&out.sqr()?.affine(-1.0, 1.0)?)?,
                UnaryOp::Sigmoid => g.mul(&out.mul(&out.affine(-1.0, 1.0)?)?)?,
                UnaryOp::Relu => g.mul(&x.gt(&x.zeros_like()?)?.to_dtype(g.dtype())?)?,
                UnaryOp::GeluErf => g.mul(&x.unary(UnaryOp::GeluErfGrad)?)?,
                UnaryOp::GeluTanh => g.mul(&x.unary(UnaryOp::GeluTanhGrad)?)?,
                UnaryOp::Silu => g.mul(&x.unary(UnaryOp::SiluGrad)?)?,
                UnaryOp::Abs => g.mul(&x.sign()?)?,
                UnaryOp::Sqr => g.mul(x)?.mul_scalar(2.0)?,
                UnaryOp::Recip => g.mul(&out.sqr()?)?.neg()?,
                UnaryOp::Erf => g
                    .mul(&x.sqr()?.neg()?.exp()?)?
                    .mul_scalar(std::f32::consts::FRAC_2_SQRT_PI)?,
                UnaryOp::Powf(p) => g.mul(&x.powf(p - 1.0)?)?.mul_scalar(p)?,
                UnaryOp::Clamp(lo, hi) => g.mul(&x.unary(UnaryOp::InRange(lo, hi))?)?,
                UnaryOp::Affine(m, _) => g.mul_scalar(m)?,
                UnaryOp::Sign
                | UnaryOp::Round
                | UnaryOp::GeluErfGrad
                | UnaryOp::GeluTanhGrad
                | UnaryOp::SiluGrad
                | UnaryOp::InRange(..) => g.zeros_like()?,
            };
            vec![(x.clone(), dx)]
        }
        Op::Binary(a, b, bop) => {
            let (da, db) = match bop {
                BinaryOp::Add => (g.clone(), g.clone()),
                BinaryOp::Sub => (g.clone(), g.neg()?),
                BinaryOp::Mul => (g.mul(b)?, g.mul(a)?),
                BinaryOp::Div => (g.div(b)?, g.mul(a)?.div(&b.sqr()?)?.neg()?),
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    // Ties split the gradient evenly, as PyTorch does.
                    let wins = if *bop == BinaryOp::Maximum {
                        a.gt(b)?
                    } else {
                        a.lt(b)?
                    };
                    let ties = a.eq(b)?.to_dtype(g.dtype())?.mul_scalar(0.5)?;
                    let wa = wins.to_dtype(g.dtype())?.add(&ties)?;
                    (g.mul(&wa)?, g.mul(&wa.affine(-1.0, 1.0)?)?)
                }
            };
            vec![(a.clone(), da), (b.clone(), db)]
        }
        Op::Reduce(x, rop, dims) => {
            let keep: Vec<usize> = (0..x.rank())
                .map(|d| if dims.contains(&d) { 1 } else { x.dims()[d] })
                .collect();
            let g = g.reshape(keep.clone())?.broadcast_as(x.shape())?;
            let dx = match rop {
                ReduceOp::Sum => g,
                ReduceOp::Max | ReduceOp::Min => {
                    let hit = x.eq(&out.reshape(keep)?)?.to_dtype(g.dtype())?;
                    let count = hit.sum_keepdim(dims.clone())?;
                    g.mul(&hit)?.div(&count)?
                }
            };
            vec![(x.clone(), dx)]
        }
        Op::Matmul(a, b) => vec![
            (a.clone(), g.matmul(&b.t()?)?),
            (b.clone(), a.t()?.matmul(g)?),
        ],
        Op::Reshape(x) | Op::Copy(x) => vec![(x.clone(), g.reshape(x.shape())?)],
        Op::Permute(x, perm) => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![(x.clone(), g.permute(&inv)?)]
        }
        Op::Narrow(x, dim, start) => {
            let (d, s) = (*dim, *start);
            let len = out.dims()[d];
            let mut parts = Vec::new();
            let zeros = |n: usize| {
                let mut shape = x.dims().to_vec();
                shape[d] = n;
                Tensor::zeros(shape, g.dtype(), g.device())
            };
            if s > 0 {
                parts.push(zeros(s)?);
            }
            parts.push(g.clone());
            if s + len < x.dims()[d] {
                parts.push(zeros(x.dims()[d] - s - len)?);
            }
            vec![(x.clone(), Tensor::cat(&parts, d)?)]
        }
        Op::Broadcast(x) => vec![(x.clone(), sum_to(g, x.dims())?)],
        Op::ToDType(x) => vec![(x.clone(), g.to_dtype(x.dtype())?)],
        Op::ToDevice(x) => vec![(x.clone(), g.to_device(x.device())?)],
        Op::Cat(ts, dim) => {
            let mut start = 0;
            let mut v = Vec::with_capacity(ts.len());
            for t in ts {
                let n = t.dims()[*dim];
                v.push((t.clone(), g.narrow(*dim, start, n)?));
                start += n;
            }
            v
        }
        Op::IndexSelect(x, ids, dim) => {
            vec![(x.clone(), g.zeros_like_shape(x)?.index_add(ids, g, *dim)?)]
        }
        Op::IndexAdd(base, ids, src, dim) => {
            vec![
                (base.clone(), g.clone()),
                (src.clone(), g.index_select(ids, *dim)?),
            ]
        }
        Op::Gather(x, ids, dim) => {
            vec![(x.clone(), g.zeros_like_shape(x)?.scatter_add(ids, g, *dim)?)]
        }
        Op::ScatterAdd(base, ids, src, dim) => {
            vec![
                (base.clone(), g.clone()),
                (src.clone(), g.gather(ids, *dim)?),
            ]
        }
        Op::Where(mask, t, f) => {
            let z = g.zeros_like()?;
            vec![
                (t.clone(), Tensor::where_cond(mask, g, &z)?),
                (f.clone(), Tensor::where_cond(mask, &z, g)?),
            ]
        }
        Op::Custom(inputs, custom) => {
            let grads = custom.backward(inputs, out, g)?;
            inputs
                .iter()
                .zip(grads)
                .filter_map(|(t, g)| g.map(|g| (t.clone(), g)))
                .collect()
        }
    })
}

impl Tensor {
    /// Zeros with `like`'s shape and this tensor's dtype and device.
    fn zeros_like_shape(&self, like: &Tensor) -> Result<Tensor> {
        Tensor::zeros(like.shape(), self.dtype(), self.device())
    }
}
