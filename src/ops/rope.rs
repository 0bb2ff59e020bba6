//! Rotary position embedding with a configurable base (ABF long-context extension raises it from 10,000
//! to 500,000) and a linear position-interpolation scale, fused with its backward (the inverse rotation).

use super::fused_kernel;
use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::storage::Device;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Which dims form each rotated pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// (i, i + d/2): Hugging Face's `rotate_half`.
    Half,
    /// (2i, 2i + 1): the original paper's layout, which llama.cpp uses for Llama GGUF weights.
    Interleaved,
}

/// Cached cos/sin tables: angle(p, i) = p · scale · base^(−2i/d), computed in f64.
#[derive(Clone, Debug)]
pub struct RopeTable {
    head_dim: usize,
    max_positions: usize,
    base: f32,
    position_scale: f32,
    style: RopeStyle,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
}

impl RopeTable {
    /// `position_scale` multiplies positions before rotation: 1.0 is plain RoPE, 0.25 interpolates a
    /// 4× longer context into the trained range (position interpolation).
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        base: f32,
        position_scale: f32,
        style: RopeStyle,
        device: Device,
    ) -> Result<RopeTable> {
        device.check()?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            crate::bail!("rope", "head_dim must be even and positive, got {head_dim}");
        }
        let valid =
            base.is_finite() && base > 1.0 && position_scale.is_finite() && position_scale > 0.0;
        if !valid {
            crate::bail!(
                "rope",
                "base must be > 1 and position_scale > 0, got {base} and {position_scale}"
            );
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for i in 0..half {
                let theta = (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let a = p as f64 * position_scale as f64 * theta;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RopeTable {
            head_dim,
            max_positions,
            base,
            position_scale,
            style,
            cos: Arc::new(cos),
            sin: Arc::new(sin),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn base(&self) -> f32 {
        self.base
    }

    pub fn position_scale(&self) -> f32 {
        self.position_scale
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// The cos and sin tables, [max_positions, head_dim / 2] each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// The positions of a [batch, seq] input ([seq], or [batch, seq] for packed or offset sequences) as
    /// integers, each checked to lie inside the table.
    pub fn check_positions(
        &self,
        positions: &Tensor,
        batch: usize,
        seq: usize,
    ) -> Result<Vec<i64>> {
        if positions.dims() != [seq] && positions.dims() != [batch, seq] {
            return Err(Error::ShapeMismatch {
                op: "rope",
                lhs: vec![batch, seq],
                rhs: positions.dims().to_vec(),
            });
        }
        if positions.dtype().is_float() {
            crate::bail!(
                "rope",
                "positions must be integers, got {}",
                positions.dtype()
            );
        }
        let pos = positions.to_vec_i64();
        if let Some(&p) = pos
            .iter()
            .find(|&&p| p < 0 || p as usize >= self.max_positions)
        {
            return Err(Error::IndexOutOfRange {
                op: "rope",
                index: p,
                size: self.max_positions,
            });
        }
        Ok(pos)
    }

    fn apply(
        &self,
        x: &Tensor,
        dims: (usize, usize, usize, usize),
        pos: &[i64],
        sign: f32,
    ) -> Result<Tensor> {
        let interleaved = self.style == RopeStyle::Interleaved;
        let storage = fused_kernel(&[x], x.dtype(), |v| {
            crate::cpu::rope::rope(v[0], dims, &self.cos, &self.sin, pos, interleaved, sign)
        })?;
        Ok(Tensor::from_storage(storage, x.shape().clone(), None))
    }
}

/// Rotary positions for an attention call: the cached table and the position of each token ([seq] or
/// [batch, seq] integers; packed sequences restart them per document).
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    pub table: &'a RopeTable,
    pub positions: &'a Tensor,
}

struct RopeBackward {
    table: RopeTable,
    positions: Vec<i64>,
}

impl CustomBackward for RopeBackward {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn backward(
        &self,
        _inputs: &[Tensor],
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let d = out.dims();
        let g = self
            .table
            .apply(grad, (d[0], d[1], d[2], d[3]), &self.positions, -1.0)?;
        Ok(vec![Some(g)])
    }
}

impl Tensor {
    /// Rotates `self` [batch, heads, seq, head_dim] by the angles of `positions` (integers, [seq] or
    /// [batch, seq]; packed sequences pass per-document positions).
    pub fn rope(&self, table: &RopeTable, positions: &Tensor) -> Result<Tensor> {
        let &[b, h, s, d] = self.dims() else {
            crate::bail!(
                "rope",
                "expected [batch, heads, seq, head_dim], got shape {}",
                self.shape()
            );
        };
        if d != table.head_dim {
            crate::bail!(
                "rope",
                "head_dim {d} does not match the table's {}",
                table.head_dim
            );
        }
        let pos = table.check_positions(positions, b, s)?;
        let out = table.apply(self, (b, h, s, d), &pos, 1.0)?;
        let op = Op::Custom(
            vec![self.clone()],
            Arc::new(RopeBackward {
                table: table.clone(),
                positions: pos,
            }),
        );
        let storage = out.storage().clone();
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(op),
        ))
    }
}
