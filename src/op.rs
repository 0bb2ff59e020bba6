//! The recorded ops: what each tensor was computed from, so backprop can walk the graph.

use crate::tensor::Tensor;
use std::sync::Arc;

/// Elementwise unary functions (f32 math on every backend).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Tanh,
    Sigmoid,
    Relu,
    GeluErf,
    GeluTanh,
    Silu,
    Abs,
    Sign,
    Round,
    Sqr,
    Recip,
    Erf,
    /// x^p.
    Powf(f32),
    /// min(max(x, lo), hi).
    Clamp(f32, f32),
    /// x * mul + add.
    Affine(f32, f32),
    /// d/dx gelu_erf(x): backward of GeluErf, kept as one op so it runs on any backend.
    GeluErfGrad,
    /// d/dx gelu_tanh(x).
    GeluTanhGrad,
    /// d/dx silu(x) = s · (1 + x · (1 − s)) with s = sigmoid(x): backward of Silu in one pass.
    SiluGrad,
    /// 1 where lo <= x <= hi, else 0: the pass-through mask of clamp's gradient (inclusive, as PyTorch's).
    InRange(f32, f32),
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::GeluErf => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Silu => "silu",
            UnaryOp::Abs => "abs",
            UnaryOp::Sign => "sign",
            UnaryOp::Round => "round",
            UnaryOp::Sqr => "sqr",
            UnaryOp::Recip => "recip",
            UnaryOp::Erf => "erf",
            UnaryOp::Powf(_) => "powf",
            UnaryOp::Clamp(..) => "clamp",
            UnaryOp::Affine(..) => "affine",
            UnaryOp::GeluErfGrad => "gelu_grad",
            UnaryOp::GeluTanhGrad => "gelu_tanh_grad",
            UnaryOp::SiluGrad => "silu_grad",
            UnaryOp::InRange(..) => "in_range",
        }
    }
}

/// Elementwise binary functions on operands of the same shape (broadcasting happens before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
}

/// Elementwise comparisons; results are u8 masks (1 true, 0 false).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Reductions over a set of dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// The softmax variants over the last dim (one kernel family on each backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxKind {
    Plain,
    Log,
    /// Causal over `[.., queries, keys]` blocks with this many query rows per block.
    Causal(usize),
}

/// The scalars of one AdamW update (`bc1`, `bc2` are the bias corrections 1 − βᵗ of this step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bc1: f32,
    pub bc2: f32,
}

/// The scalars of one SGD-with-momentum update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

/// A fused op with its own backward (norms, softmax, cross-entropy, RoPE, ...). Each lives in `src/ops/`
/// next to its forward.
pub trait CustomBackward: Send + Sync {
    fn name(&self) -> &'static str;
    /// Gradients for each input (in the order recorded), given the op's output and the gradient flowing into it.
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad: &Tensor,
    ) -> crate::Result<Vec<Option<Tensor>>>;
}

/// How a tensor was produced.
#[derive(Clone)]
pub enum Op {
    Unary(Tensor, UnaryOp),
    Binary(Tensor, Tensor, BinaryOp),
    /// Sum/max/min over `dims`, keeping them as size 1.
    Reduce(Tensor, ReduceOp, Vec<usize>),
    Matmul(Tensor, Tensor),
    /// View ops: the gradient is reshaped, permuted or summed back.
    Reshape(Tensor),
    Permute(Tensor, Vec<usize>),
    Narrow(Tensor, usize, usize),
    Broadcast(Tensor),
    Copy(Tensor),
    ToDType(Tensor),
    /// A copy to another device: the gradient is copied back.
    ToDevice(Tensor),
    Cat(Vec<Tensor>, usize),
    IndexSelect(Tensor, Tensor, usize),
    /// index_add(base, ids, src, dim): base with src rows added at ids along dim.
    IndexAdd(Tensor, Tensor, Tensor, usize),
    Gather(Tensor, Tensor, usize),
    ScatterAdd(Tensor, Tensor, Tensor, usize),
    /// where(mask, on_true, on_false)
    Where(Tensor, Tensor, Tensor),
    Custom(Vec<Tensor>, Arc<dyn CustomBackward>),
}

impl Op {
    /// The tensors this op read.
    pub fn inputs(&self) -> Vec<&Tensor> {
        match self {
            Op::Unary(a, _)
            | Op::Reduce(a, _, _)
            | Op::Reshape(a)
            | Op::Permute(a, _)
            | Op::Narrow(a, _, _)
            | Op::Broadcast(a)
            | Op::Copy(a)
            | Op::ToDType(a)
            | Op::ToDevice(a) => vec![a],
            Op::Binary(a, b, _)
            | Op::Matmul(a, b)
            | Op::IndexSelect(a, b, _)
            | Op::Gather(a, b, _) => vec![a, b],
            Op::IndexAdd(a, b, c, _) | Op::ScatterAdd(a, b, c, _) | Op::Where(a, b, c) => {
                vec![a, b, c]
            }
            Op::Cat(ts, _) | Op::Custom(ts, _) => ts.iter().collect(),
        }
    }
}
