//! Elementwise ops: unary maps, broadcasting binary ops, comparisons and where.

use crate::error::{Error, Result};
use crate::op::{BinaryOp, CmpOp, Op, UnaryOp};
use crate::tensor::Tensor;

macro_rules! unary_fns {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("Elementwise `", stringify!($name), "`.")]
            pub fn $name(&self) -> Result<Tensor> {
                self.unary(UnaryOp::$op)
            }
        )*
    };
}

macro_rules! binary_fns {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("Elementwise `", stringify!($name), "` with numpy broadcasting.")]
            pub fn $name(&self, rhs: &Tensor) -> Result<Tensor> {
                self.binary(rhs, BinaryOp::$op)
            }
        )*
    };
}

macro_rules! cmp_fns {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(
            #[doc = concat!("Elementwise `", stringify!($name), "` with broadcasting; a u8 mask.")]
            pub fn $name(&self, rhs: &Tensor) -> Result<Tensor> {
                self.compare(rhs, CmpOp::$op)
            }
        )*
    };
}

impl Tensor {
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        let storage = self.storage().unary(self.layout(), op)?;
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(Op::Unary(self.clone(), op)),
        ))
    }

    unary_fns!(
        neg => Neg, exp => Exp, log => Log, sqrt => Sqrt, rsqrt => Rsqrt, tanh => Tanh,
        sigmoid => Sigmoid, relu => Relu, gelu => GeluErf, gelu_tanh => GeluTanh, silu => Silu,
        abs => Abs, sign => Sign, round => Round, sqr => Sqr, recip => Recip, erf => Erf,
    );

    pub fn powf(&self, p: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Powf(p))
    }

    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        if lo > hi || lo.is_nan() || hi.is_nan() {
            crate::bail!("clamp", "invalid bounds {lo}..{hi}");
        }
        self.unary(UnaryOp::Clamp(lo, hi))
    }

    /// x * mul + add.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(mul, add))
    }

    pub fn add_scalar(&self, v: f32) -> Result<Tensor> {
        self.affine(1.0, v)
    }

    pub fn mul_scalar(&self, v: f32) -> Result<Tensor> {
        self.affine(v, 0.0)
    }

    /// Both operands broadcast to their common shape (stride-0 views, no copies).
    pub fn broadcast_pair(&self, rhs: &Tensor, op: &'static str) -> Result<(Tensor, Tensor)> {
        if self.device() != rhs.device() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: self.device().to_string(),
                rhs: rhs.device().to_string(),
            });
        }
        let shape = self.shape().broadcast_with(rhs.shape(), op)?;
        Ok((self.broadcast_as(&shape)?, rhs.broadcast_as(&shape)?))
    }

    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let (a, b) = self.broadcast_pair(rhs, "binary")?;
        if a.dtype() != b.dtype() {
            return Err(Error::DTypeMismatch {
                op: "binary",
                lhs: a.dtype(),
                rhs: b.dtype(),
            });
        }
        let storage = a
            .storage()
            .binary(a.layout(), &b.storage(), b.layout(), op)?;
        Ok(Tensor::from_storage(
            storage,
            a.shape().clone(),
            Some(Op::Binary(a.clone(), b.clone(), op)),
        ))
    }

    binary_fns!(add => Add, sub => Sub, mul => Mul, div => Div, maximum => Maximum, minimum => Minimum);

    pub fn compare(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        let (a, b) = self.broadcast_pair(rhs, "compare")?;
        let storage = a
            .storage()
            .compare(a.layout(), &b.storage(), b.layout(), op)?;
        Ok(Tensor::from_storage(storage, a.shape().clone(), None))
    }

    cmp_fns!(eq => Eq, ne => Ne, lt => Lt, le => Le, gt => Gt, ge => Ge);

    /// Elementwise `mask != 0 ? on_true : on_false`, broadcasting all three.
    pub fn where_cond(mask: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        let shape = mask
            .shape()
            .broadcast_with(on_true.shape(), "where_cond")?
            .broadcast_with(on_false.shape(), "where_cond")?;
        if on_true.dtype() != on_false.dtype() {
            return Err(Error::DTypeMismatch {
                op: "where_cond",
                lhs: on_true.dtype(),
                rhs: on_false.dtype(),
            });
        }
        let (m, t, f) = (
            mask.broadcast_as(&shape)?,
            on_true.broadcast_as(&shape)?,
            on_false.broadcast_as(&shape)?,
        );
        let storage = m.storage().where_cond(
            m.layout(),
            &t.storage(),
            t.layout(),
            &f.storage(),
            f.layout(),
        )?;
        Ok(Tensor::from_storage(
            storage,
            shape,
            Some(Op::Where(m.detach(), t.clone(), f.clone())),
        ))
    }
}
