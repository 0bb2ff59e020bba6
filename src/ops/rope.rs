//! Rotary position embedding with a configurable base (ABF long-context extension raises it from 10,000
//! to 500,000) and a linear position-interpolation scale, fused with its backward (the inverse rotation).

use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::storage::Device;
use crate::tensor::Tensor;
use std::sync::{Arc, Mutex};

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
    /// The tables as tensors, one pair per device they were used on (uploaded once, not per call).
    on_device: Arc<Mutex<Vec<(Device, Tensor, Tensor)>>>,
    /// The last positions tensor checked, with its validated i32 copy on a device: every layer of a
    /// forward pass rotates by the same positions, so they are read and uploaded once per pass.
    last_positions: Arc<Mutex<Option<(Tensor, Tensor)>>>,
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
            on_device: Arc::default(),
            last_positions: Arc::default(),
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
        let pos = positions.try_to_vec_i64()?;
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

    /// The (cos, sin) tables on `device`.
    fn tables_on(&self, device: Device) -> Result<(Tensor, Tensor)> {
        let mut cache = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c, s)) = cache.iter().find(|(d, _, _)| *d == device) {
            return Ok((c.clone(), s.clone()));
        }
        let shape = (self.max_positions, self.head_dim / 2);
        let c = Tensor::from_vec(self.cos.to_vec(), shape, device)?;
        let s = Tensor::from_vec(self.sin.to_vec(), shape, device)?;
        cache.push((device, c.clone(), s.clone()));
        Ok((c, s))
    }

    /// `positions` for a [batch, seq] input, checked, as i32 on `device` (cached for the same tensor).
    fn positions_on(
        &self,
        positions: &Tensor,
        batch: usize,
        seq: usize,
        device: Device,
    ) -> Result<Tensor> {
        let mut last = self
            .last_positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let fits = positions.dims() == [seq] || positions.dims() == [batch, seq];
        if let Some((src, on)) = &*last {
            if fits && src.id() == positions.id() && on.device() == device {
                return Ok(on.clone());
            }
        }
        let pos = self.check_positions(positions, batch, seq)?;
        let n = pos.len();
        let on = Tensor::from_vec(
            pos.into_iter().map(|p| p as i32).collect::<Vec<i32>>(),
            n,
            device,
        )?;
        *last = Some((positions.clone(), on.clone()));
        Ok(on)
    }

    /// Rotates `x` by the angles of `positions` (i32, on x's device, validated); `sign` −1 undoes it.
    fn apply(
        &self,
        x: &Tensor,
        dims: (usize, usize, usize, usize),
        positions: &Tensor,
        sign: f32,
    ) -> Result<Tensor> {
        let interleaved = self.style == RopeStyle::Interleaved;
        let (cos, sin) = self.tables_on(x.device())?;
        let storage = x.storage().rope(
            x.layout(),
            dims,
            (&cos.storage(), &sin.storage()),
            &positions.storage(),
            interleaved,
            sign,
        )?;
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
    /// Validated i32 positions on the input's device.
    positions: Tensor,
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
        let pos = table.positions_on(positions, b, s, self.device())?;
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
