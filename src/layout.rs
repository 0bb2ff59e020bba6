//! Strided views: how a tensor's logical indices map to offsets in its storage.

use crate::error::{Error, Result};
use crate::shape::Shape;

/// Shape, per-dimension strides (in elements; 0 for broadcast dims) and a start offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    pub fn contiguous(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let strides = shape.contiguous_strides();
        Layout {
            shape,
            strides,
            offset: 0,
        }
    }

    pub fn new(shape: Shape, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.rank(), strides.len());
        Layout {
            shape,
            strides,
            offset,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Row-major with no gaps (offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.dims().iter().zip(&self.strides).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    /// The contiguous storage range `[offset, offset + n)` when the view is contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous()
            .then(|| self.offset..self.offset + self.shape.elem_count())
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        let size = self.dims()[dim];
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument {
                op: "narrow",
                msg: format!(
                    "range {start}..{} out of bounds for dim {dim} of size {size}",
                    start.saturating_add(len)
                ),
            });
        }
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Layout {
            shape: Shape::from(dims),
            strides: self.strides.clone(),
            offset: self.offset + start * self.strides[dim],
        })
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let rank = self.shape.rank();
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm
                .iter()
                .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::InvalidArgument {
                op: "permute",
                msg: format!("{perm:?} is not a permutation of 0..{rank}"),
            });
        }
        Ok(Layout {
            shape: Shape::from(perm.iter().map(|&p| self.dims()[p]).collect::<Vec<_>>()),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// A view with `shape`, where this layout's dims are aligned to its trailing dims and size-1 dims repeat.
    pub fn broadcast_as(&self, shape: &Shape) -> Result<Layout> {
        let rank = shape.rank();
        let err = || Error::ShapeMismatch {
            op: "broadcast_as",
            lhs: self.dims().to_vec(),
            rhs: shape.dims().to_vec(),
        };
        if rank < self.shape.rank() {
            return Err(err());
        }
        let lead = rank - self.shape.rank();
        let mut strides = vec![0; rank];
        for i in 0..self.shape.rank() {
            let (src, dst) = (self.dims()[i], shape.dims()[lead + i]);
            if src == dst {
                strides[lead + i] = self.strides[i];
            } else if src != 1 {
                return Err(err());
            }
        }
        Ok(Layout {
            shape: shape.clone(),
            strides,
            offset: self.offset,
        })
    }

    /// A reshaped view without copying, when the strides allow it.
    pub fn reshape(&self, shape: &Shape) -> Option<Layout> {
        self.is_contiguous().then(|| Layout {
            shape: shape.clone(),
            strides: shape.contiguous_strides(),
            offset: self.offset,
        })
    }

    /// Storage offsets of every element in row-major order.
    pub fn offsets(&self) -> StridedOffsets<'_> {
        StridedOffsets::new(self)
    }
}

/// Iterates storage offsets of a strided view in logical row-major order.
pub struct StridedOffsets<'a> {
    layout: &'a Layout,
    index: Vec<usize>,
    next: Option<usize>,
}

impl<'a> StridedOffsets<'a> {
    fn new(layout: &'a Layout) -> Self {
        let next = (layout.shape.elem_count() > 0).then_some(layout.offset);
        StridedOffsets {
            layout,
            index: vec![0; layout.shape.rank()],
            next,
        }
    }
}

impl Iterator for StridedOffsets<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let current = self.next?;
        let dims = self.layout.dims();
        let strides = self.layout.strides();
        let mut off = current;
        let mut d = dims.len();
        loop {
            if d == 0 {
                self.next = None;
                break;
            }
            d -= 1;
            self.index[d] += 1;
            if self.index[d] < dims[d] {
                self.next = Some(off + strides[d]);
                break;
            }
            off -= strides[d] * (dims[d] - 1);
            self.index[d] = 0;
        }
        Some(current)
    }
}

/// Merges adjacent dims that are contiguous with each other in every operand, so strided loops run over as few,
/// as long dims as possible. Returns the merged dims and each operand's merged strides.
pub fn coalesce(dims: &[usize], strides: &[&[usize]]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut out_dims: Vec<usize> = Vec::with_capacity(dims.len());
    let mut out_strides: Vec<Vec<usize>> = vec![Vec::with_capacity(dims.len()); strides.len()];
    for (i, &d) in dims.iter().enumerate() {
        if d == 1 {
            continue;
        }
        let mergeable = !out_dims.is_empty()
            && strides
                .iter()
                .zip(&out_strides)
                .all(|(s, o)| *o.last().unwrap() == s[i] * d);
        if mergeable {
            *out_dims.last_mut().unwrap() *= d;
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                *o.last_mut().unwrap() = s[i];
            }
        } else {
            out_dims.push(d);
            for (s, o) in strides.iter().zip(out_strides.iter_mut()) {
                o.push(s[i]);
            }
        }
    }
    if out_dims.is_empty() {
        out_dims.push(1);
        for o in out_strides.iter_mut() {
            o.push(0);
        }
    }
    (out_dims, out_strides)
}
