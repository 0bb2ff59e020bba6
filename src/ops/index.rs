//! Indexing and joining: index_select/embedding, index_add, gather, scatter_add, cat, stack.

use crate::error::{Error, Result};
use crate::op::Op;
use crate::shape::Dim;
use crate::storage::Storage;
use crate::tensor::Tensor;

/// Reads an index tensor, checking every index against `size`.
fn indices(ids: &Tensor, size: usize, op: &'static str) -> Result<Vec<i64>> {
    if ids.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: ids.dtype(),
        });
    }
    let v = ids.try_to_vec_i64()?;
    if let Some(&bad) = v.iter().find(|&&i| i < 0 || i as usize >= size) {
        return Err(Error::IndexOutOfRange {
            op,
            index: bad,
            size,
        });
    }
    Ok(v)
}

/// (outer, size, inner) of `t` around `dim`.
fn split(t: &Tensor, dim: usize) -> (usize, usize, usize) {
    let d = t.dims();
    (
        d[..dim].iter().product(),
        d[dim],
        d[dim + 1..].iter().product(),
    )
}

impl Tensor {
    /// Selects entries `ids` (a 1-d integer tensor) along `dim`.
    pub fn index_select<D: Dim>(&self, ids: &Tensor, dim: D) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), "index_select")?;
        if ids.rank() != 1 {
            crate::bail!("index_select", "ids must be 1-d, got shape {}", ids.shape());
        }
        let (outer, size, inner) = split(self, d);
        let idx = indices(ids, size, "index_select")?;
        let src = self.contiguous()?;
        let storage = src
            .storage()
            .index_select(src.layout(), (outer, size, inner), &idx)?;
        let mut shape = self.dims().to_vec();
        shape[d] = idx.len();
        Ok(Tensor::from_storage(
            storage,
            shape,
            Some(Op::IndexSelect(self.clone(), ids.clone(), d)),
        ))
    }

    /// Rows of an embedding table `self [vocab, dim]` for integer `ids` of any shape: `[..ids, dim]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            crate::bail!("embedding", "table must be 2-d, got shape {}", self.shape());
        }
        let rows = self.index_select(&ids.flatten_all()?, 0)?;
        rows.reshape([ids.dims(), &[self.dims()[1]]].concat())
    }

    /// `self` with `src` added at entries `ids` along `dim` (repeated ids accumulate).
    pub fn index_add<D: Dim>(&self, ids: &Tensor, src: &Tensor, dim: D) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), "index_add")?;
        let (outer, size, inner) = split(self, d);
        let idx = indices(ids, size, "index_add")?;
        let mut want = self.dims().to_vec();
        want[d] = idx.len();
        if ids.rank() != 1 || src.dims() != want {
            return Err(Error::ShapeMismatch {
                op: "index_add",
                lhs: want,
                rhs: src.dims().to_vec(),
            });
        }
        let storage = self.storage().index_add(
            self.layout(),
            &src.storage(),
            src.layout(),
            (outer, size, inner),
            &idx,
        )?;
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(Op::IndexAdd(self.clone(), ids.clone(), src.clone(), d)),
        ))
    }

    /// `out[.., j, ..] = self[.., ids[.., j, ..], ..]` along `dim`; `ids` has self's shape except at `dim`.
    pub fn gather<D: Dim>(&self, ids: &Tensor, dim: D) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), "gather")?;
        check_same_except(self, ids, d, "gather")?;
        let (outer, size, inner) = split(self, d);
        let idx = indices(ids, size, "gather")?;
        let storage =
            self.storage()
                .gather(self.layout(), (outer, size, inner), &idx, ids.dims()[d])?;
        Ok(Tensor::from_storage(
            storage,
            ids.shape().clone(),
            Some(Op::Gather(self.clone(), ids.clone(), d)),
        ))
    }

    /// `self` with `src[.., j, ..]` added at `ids[.., j, ..]` along `dim` (the inverse of gather).
    pub fn scatter_add<D: Dim>(&self, ids: &Tensor, src: &Tensor, dim: D) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), "scatter_add")?;
        check_same_except(self, ids, d, "scatter_add")?;
        if ids.dims() != src.dims() {
            return Err(Error::ShapeMismatch {
                op: "scatter_add",
                lhs: ids.dims().to_vec(),
                rhs: src.dims().to_vec(),
            });
        }
        let (outer, size, inner) = split(self, d);
        let idx = indices(ids, size, "scatter_add")?;
        let storage = self.storage().scatter_add(
            self.layout(),
            &src.storage(),
            src.layout(),
            (outer, size, inner),
            &idx,
            ids.dims()[d],
        )?;
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(Op::ScatterAdd(self.clone(), ids.clone(), src.clone(), d)),
        ))
    }

    /// Joins tensors along an existing dim.
    pub fn cat<D: Dim>(tensors: &[Tensor], dim: D) -> Result<Tensor> {
        let Some(first) = tensors.first() else {
            crate::bail!("cat", "needs at least one tensor");
        };
        let d = dim.to_index(first.shape(), "cat")?;
        for t in tensors {
            let same = t.rank() == first.rank()
                && (0..t.rank()).all(|i| i == d || t.dims()[i] == first.dims()[i]);
            if !same {
                return Err(Error::ShapeMismatch {
                    op: "cat",
                    lhs: first.dims().to_vec(),
                    rhs: t.dims().to_vec(),
                });
            }
            if t.dtype() != first.dtype() {
                return Err(Error::DTypeMismatch {
                    op: "cat",
                    lhs: first.dtype(),
                    rhs: t.dtype(),
                });
            }
        }
        let (outer, _, inner) = split(first, d);
        let sizes: Vec<usize> = tensors.iter().map(|t| t.dims()[d]).collect();
        let parts: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<_>>()?;
        let guards: Vec<_> = parts.iter().map(|t| t.storage()).collect();
        let views: Vec<(&Storage, &crate::layout::Layout)> = guards
            .iter()
            .zip(&parts)
            .map(|(g, t)| (&**g, t.layout()))
            .collect();
        let storage = Storage::cat(&views, &sizes, outer, inner)?;
        let mut shape = first.dims().to_vec();
        shape[d] = sizes.iter().sum();
        Ok(Tensor::from_storage(
            storage,
            shape,
            Some(Op::Cat(tensors.to_vec(), d)),
        ))
    }

    /// Joins tensors of one shape along a new dim.
    pub fn stack<D: Dim>(tensors: &[Tensor], dim: D) -> Result<Tensor> {
        let Some(first) = tensors.first() else {
            crate::bail!("stack", "needs at least one tensor");
        };
        let extended = crate::shape::Shape::from([first.dims(), &[1]].concat());
        let d = dim.to_index(&extended, "stack")?;
        let parts: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.unsqueeze(d))
            .collect::<Result<_>>()?;
        Tensor::cat(&parts, d)
    }
}

fn check_same_except(t: &Tensor, ids: &Tensor, d: usize, op: &'static str) -> Result<()> {
    let ok =
        ids.rank() == t.rank() && (0..t.rank()).all(|i| i == d || ids.dims()[i] == t.dims()[i]);
    if ok {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op,
            lhs: t.dims().to_vec(),
            rhs: ids.dims().to_vec(),
        })
    }
}
