//! Reductions over any set of dims: sum, mean, max, min, argmax, argmin, logsumexp, variance.

use crate::error::Result;
use crate::op::{Op, ReduceOp};
use crate::shape::{resolve_dims, Dim, Shape};
use crate::tensor::Tensor;

/// One or several dimension arguments.
pub trait Dims {
    fn to_indices(&self, shape: &Shape, op: &'static str) -> Result<Vec<usize>>;
}

impl<D: Dim> Dims for D {
    fn to_indices(&self, shape: &Shape, op: &'static str) -> Result<Vec<usize>> {
        Ok(vec![self.to_index(shape, op)?])
    }
}

impl<D: Dim, const N: usize> Dims for [D; N] {
    fn to_indices(&self, shape: &Shape, op: &'static str) -> Result<Vec<usize>> {
        resolve_dims(self, shape, op)
    }
}

impl<D: Dim> Dims for &[D] {
    fn to_indices(&self, shape: &Shape, op: &'static str) -> Result<Vec<usize>> {
        resolve_dims(self, shape, op)
    }
}

impl<D: Dim> Dims for Vec<D> {
    fn to_indices(&self, shape: &Shape, op: &'static str) -> Result<Vec<usize>> {
        resolve_dims(self, shape, op)
    }
}

impl Tensor {
    /// Moves `dims` last and returns (view, rows, row length, keepdim shape).
    fn reduce_view(&self, dims: &[usize]) -> Result<(Tensor, usize, usize, Shape)> {
        let kept: Vec<usize> = (0..self.rank()).filter(|d| !dims.contains(d)).collect();
        let perm: Vec<usize> = kept.iter().chain(dims).copied().collect();
        let view = self.detach().permute(&perm)?;
        let r: usize = dims.iter().map(|&d| self.dims()[d]).product();
        let rows: usize = kept.iter().map(|&d| self.dims()[d]).product();
        let keep_shape: Vec<usize> = (0..self.rank())
            .map(|d| if dims.contains(&d) { 1 } else { self.dims()[d] })
            .collect();
        Ok((view, rows, r, Shape::from(keep_shape)))
    }

    fn reduce_impl(&self, dims: impl Dims, op: ReduceOp, keepdim: bool) -> Result<Tensor> {
        let dims = dims.to_indices(self.shape(), "reduce")?;
        let (view, rows, r, keep_shape) = self.reduce_view(&dims)?;
        let storage = view.storage().reduce(view.layout(), rows, r, op)?;
        let out = Tensor::from_storage(
            storage,
            keep_shape,
            Some(Op::Reduce(self.clone(), op, dims.clone())),
        );
        if keepdim {
            Ok(out)
        } else {
            out.squeeze_dims(&dims)
        }
    }

    /// Removes the given size-1 dims.
    pub(crate) fn squeeze_dims(&self, dims: &[usize]) -> Result<Tensor> {
        let new: Vec<usize> = (0..self.rank())
            .filter(|d| !dims.contains(d))
            .map(|d| self.dims()[d])
            .collect();
        self.reshape(new)
    }

    pub fn sum(&self, dims: impl Dims) -> Result<Tensor> {
        self.reduce_impl(dims, ReduceOp::Sum, false)
    }

    pub fn sum_keepdim(&self, dims: impl Dims) -> Result<Tensor> {
        self.reduce_impl(dims, ReduceOp::Sum, true)
    }

    /// Sum of every element, as a 0-d tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let all: Vec<usize> = (0..self.rank()).collect();
        self.reduce_impl(all, ReduceOp::Sum, false)
    }

    pub fn mean(&self, dims: impl Dims) -> Result<Tensor> {
        let d = dims.to_indices(self.shape(), "mean")?;
        let n: usize = d.iter().map(|&i| self.dims()[i]).product();
        self.sum(d)?.mul_scalar(1.0 / n as f32)
    }

    pub fn mean_keepdim(&self, dims: impl Dims) -> Result<Tensor> {
        let d = dims.to_indices(self.shape(), "mean")?;
        let n: usize = d.iter().map(|&i| self.dims()[i]).product();
        self.sum_keepdim(d)?.mul_scalar(1.0 / n as f32)
    }

    pub fn mean_all(&self) -> Result<Tensor> {
        self.sum_all()?.mul_scalar(1.0 / self.elem_count() as f32)
    }

    pub fn max(&self, dims: impl Dims) -> Result<Tensor> {
        self.reduce_impl(dims, ReduceOp::Max, false)
    }

    pub fn max_keepdim(&self, dims: impl Dims) -> Result<Tensor> {
        self.reduce_impl(dims, ReduceOp::Max, true)
    }

    pub fn min(&self, dims: impl Dims) -> Result<Tensor> {
        self.reduce_impl(dims, ReduceOp::Min, false)
    }

    pub fn min_keepdim(&self, dims: impl Dims) -> Result<Tensor> {
        self.reduce_impl(dims, ReduceOp::Min, true)
    }

    fn arg_reduce(&self, dim: impl Dim, max: bool, keepdim: bool) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), if max { "argmax" } else { "argmin" })?;
        let (view, rows, r, keep_shape) = self.reduce_view(&[d])?;
        if r == 0 && rows > 0 {
            crate::bail!(
                if max { "argmax" } else { "argmin" },
                "dim {d} of shape {} is empty: no index to return",
                self.shape()
            );
        }
        let storage = view.storage().arg_reduce(view.layout(), r, max)?;
        let out = Tensor::from_storage(storage, keep_shape, None);
        if keepdim {
            Ok(out)
        } else {
            out.squeeze_dims(&[d])
        }
    }

    /// Index of the first maximum along `dim`, as i32 (no gradient).
    pub fn argmax(&self, dim: impl Dim) -> Result<Tensor> {
        self.arg_reduce(dim, true, false)
    }

    pub fn argmax_keepdim(&self, dim: impl Dim) -> Result<Tensor> {
        self.arg_reduce(dim, true, true)
    }

    pub fn argmin(&self, dim: impl Dim) -> Result<Tensor> {
        self.arg_reduce(dim, false, false)
    }

    /// log Σ exp(x) over `dims`, shifted by the (detached) max so it never overflows.
    pub fn logsumexp(&self, dims: impl Dims) -> Result<Tensor> {
        let d = dims.to_indices(self.shape(), "logsumexp")?;
        let m = self.detach().max_keepdim(d.clone())?;
        // A row of all -inf has max -inf; shifting by it would give NaN, so such rows shift by 0.
        let inf = Tensor::full(f32::INFINITY, (), m.dtype(), m.device())?;
        let m = Tensor::where_cond(&m.abs()?.lt(&inf)?, &m, &m.zeros_like()?)?;
        let out = self
            .sub(&m)?
            .exp()?
            .sum_keepdim(d.clone())?
            .log()?
            .add(&m)?;
        out.squeeze_dims(&d)
    }

    /// Variance over `dims` (`unbiased` divides by n − 1, as torch.var's default does).
    pub fn variance(&self, dims: impl Dims, unbiased: bool) -> Result<Tensor> {
        let d = dims.to_indices(self.shape(), "var")?;
        self.variance_keepdim(d.clone(), unbiased)?.squeeze_dims(&d)
    }

    pub fn variance_keepdim(&self, dims: impl Dims, unbiased: bool) -> Result<Tensor> {
        let d = dims.to_indices(self.shape(), "var")?;
        let n: usize = d.iter().map(|&i| self.dims()[i]).product();
        let denom = if unbiased { n.saturating_sub(1) } else { n };
        let centred = self.sub(&self.mean_keepdim(d.clone())?)?;
        centred
            .sqr()?
            .sum_keepdim(d)?
            .mul_scalar(1.0 / denom as f32)
    }
}
