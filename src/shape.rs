//! Shapes and dimension arguments.

use crate::error::{Error, Result};
use std::fmt;

/// The extent of each dimension of a tensor, outermost first.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Row-major strides of a contiguous tensor of this shape.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![0; self.0.len()];
        let mut acc = 1;
        for (s, &d) in strides.iter_mut().zip(&self.0).rev() {
            *s = acc;
            acc *= d;
        }
        strides
    }

    /// Size of dimension `dim` (validated).
    pub fn dim<D: Dim>(&self, dim: D) -> Result<usize> {
        Ok(self.0[dim.to_index(self, "dim")?])
    }

    /// The shape both operands broadcast to under numpy rules.
    pub fn broadcast_with(&self, rhs: &Shape, op: &'static str) -> Result<Shape> {
        let rank = self.rank().max(rhs.rank());
        let mut out = vec![0; rank];
        for (i, o) in out.iter_mut().enumerate() {
            let l = dim_from_end(&self.0, rank - i);
            let r = dim_from_end(&rhs.0, rank - i);
            *o = match (l, r) {
                (l, r) if l == r => l,
                (1, r) => r,
                (l, 1) => l,
                _ => {
                    return Err(Error::ShapeMismatch {
                        op,
                        lhs: self.0.clone(),
                        rhs: rhs.0.clone(),
                    })
                }
            };
        }
        Ok(Shape(out))
    }
}

fn dim_from_end(dims: &[usize], from_end: usize) -> usize {
    if from_end > dims.len() {
        1
    } else {
        dims[dims.len() - from_end]
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}

impl From<&Vec<usize>> for Shape {
    fn from(v: &Vec<usize>) -> Self {
        Shape(v.clone())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}

impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(vec![d])
    }
}

impl From<(usize, usize)> for Shape {
    fn from((a, b): (usize, usize)) -> Self {
        Shape(vec![a, b])
    }
}

impl From<(usize, usize, usize)> for Shape {
    fn from((a, b, c): (usize, usize, usize)) -> Self {
        Shape(vec![a, b, c])
    }
}

impl From<(usize, usize, usize, usize)> for Shape {
    fn from((a, b, c, d): (usize, usize, usize, usize)) -> Self {
        Shape(vec![a, b, c, d])
    }
}

/// A dimension argument: a `usize` counts from the front, a negative `i32`/`isize` from the back (-1 is the last).
pub trait Dim: Copy {
    fn to_index(self, shape: &Shape, op: &'static str) -> Result<usize>;
}

impl Dim for usize {
    fn to_index(self, shape: &Shape, op: &'static str) -> Result<usize> {
        if self < shape.rank() {
            Ok(self)
        } else {
            Err(Error::DimOutOfRange {
                op,
                dim: self as isize,
                rank: shape.rank(),
            })
        }
    }
}

impl Dim for isize {
    fn to_index(self, shape: &Shape, op: &'static str) -> Result<usize> {
        let rank = shape.rank() as isize;
        let idx = if self < 0 { self + rank } else { self };
        if (0..rank).contains(&idx) {
            Ok(idx as usize)
        } else {
            Err(Error::DimOutOfRange {
                op,
                dim: self,
                rank: shape.rank(),
            })
        }
    }
}

impl Dim for i32 {
    fn to_index(self, shape: &Shape, op: &'static str) -> Result<usize> {
        (self as isize).to_index(shape, op)
    }
}

/// Resolves a list of dimension arguments, rejecting duplicates.
pub fn resolve_dims<D: Dim>(dims: &[D], shape: &Shape, op: &'static str) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(dims.len());
    for &d in dims {
        let i = d.to_index(shape, op)?;
        if out.contains(&i) {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("dimension {i} listed twice"),
            });
        }
        out.push(i);
    }
    out.sort_unstable();
    Ok(out)
}
