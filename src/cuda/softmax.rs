//! Softmax, log-softmax and causal softmax over the last dim on the device (cuda/softmax.cu), forward and
//! backward, and the launch helpers the row kernels share (norm.rs uses them too): strided views are
//! made contiguous first, rows of up to [`WARP_ROW_MAX`] get a warp each and longer ones a block.

use super::device::CudaDevice;
use super::launch::{grid_1d, grid_rows, launch};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::LaunchConfig;

/// Rows up to this long get a warp each (`WARP_ROW_MAX` in cuda/rows.cuh, as are the three below).
pub(super) const WARP_ROW_MAX: usize = 512;
/// Register slots per thread of a block-per-row kernel with 128-bit accesses: rows up to
/// 16 × [`BLOCK_MAX_THREADS`] elements are read from memory once.
const BLOCK_SLOTS: usize = 16;
/// Register slots per thread of a block-per-row kernel without 128-bit accesses.
const BLOCK_SLOTS_SCALAR: usize = 8;
/// Largest block of a row kernel (the kernels' launch bounds: it keeps them within 128 registers).
const BLOCK_MAX_THREADS: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Softmax {
    Plain,
    Log,
    /// causal over the last dim, `queries` rows per block
    Causal {
        queries: usize,
    },
}

impl Softmax {
    fn name(self) -> &'static str {
        match self {
            Softmax::Plain => "softmax",
            Softmax::Log => "log_softmax",
            Softmax::Causal { .. } => "causal_softmax",
        }
    }
}

/// (forward, backward) kernel names.
fn kernels(kind: Softmax, dtype: DType) -> Option<(&'static str, &'static str)> {
    macro_rules! k {
        ($op:literal, $dt:literal) => {
            (concat!($op, "_", $dt), concat!($op, "_backward_", $dt))
        };
    }
    Some(match (kind, dtype) {
        (Softmax::Plain, DType::F32) => k!("softmax", "f32"),
        (Softmax::Plain, DType::F16) => k!("softmax", "f16"),
        (Softmax::Plain, DType::BF16) => k!("softmax", "bf16"),
        (Softmax::Log, DType::F32) => k!("log_softmax", "f32"),
        (Softmax::Log, DType::F16) => k!("log_softmax", "f16"),
        (Softmax::Log, DType::BF16) => k!("log_softmax", "bf16"),
        (Softmax::Causal { .. }, DType::F32) => k!("causal_softmax", "f32"),
        (Softmax::Causal { .. }, DType::F16) => k!("causal_softmax", "f16"),
        (Softmax::Causal { .. }, DType::BF16) => k!("causal_softmax", "bf16"),
        _ => return None,
    })
}

/// The view's elements as contiguous rows: `x` itself when the view is contiguous, else a packed copy;
/// with the index of the first element.
pub(super) fn contiguous(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, usize)> {
    match l.contiguous_range() {
        Some(range) => Ok((x.clone(), range.start)),
        None => Ok((super::copy::copy_strided(x, l)?, 0)),
    }
}

/// True when rows of `d` elements of `dtype` at these device addresses allow 128-bit accesses.
pub(super) fn vectorisable(dtype: DType, d: usize, ptrs: &[u64]) -> bool {
    d.is_multiple_of(16 / dtype.size_in_bytes()) && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Launch shape of a row kernel: a warp per row up to [`WARP_ROW_MAX`], else a block per row with enough
/// threads to hold the row in registers (`vec`: with 128-bit accesses); longer rows are re-read per pass.
pub(super) fn row_config(
    dev: &CudaDevice,
    rows: usize,
    d: usize,
    vec: bool,
) -> Result<LaunchConfig> {
    if d <= WARP_ROW_MAX {
        return Ok(grid_1d(dev, rows * 32, 256));
    }
    let slots = if vec { BLOCK_SLOTS } else { BLOCK_SLOTS_SCALAR };
    let threads = d
        .div_ceil(slots)
        .next_multiple_of(32)
        .clamp(64, BLOCK_MAX_THREADS);
    // The kernels loop over rows, so the grid may stop at the hardware's limit.
    grid_rows(rows.min(i32::MAX as usize), threads as u32, 0)
}

/// `n` elements as rows of `d`, in the kernels' types: (rows, d).
pub(super) fn rows_of(op: &'static str, n: usize, d: usize) -> Result<(u64, u32)> {
    if d == 0 || !n.is_multiple_of(d) {
        crate::bail!(op, "{n} elements are not rows of {d}");
    }
    let Ok(d32) = u32::try_from(d) else {
        crate::bail!(
            op,
            "rows of {d} elements exceed the kernels' 32-bit row length"
        );
    };
    Ok(((n / d) as u64, d32))
}

/// Query rows per causal block (1, unused, for the other kinds).
fn queries(op: &'static str, rows: u64, d: usize, kind: Softmax) -> Result<u32> {
    let Softmax::Causal { queries } = kind else {
        return Ok(1);
    };
    if queries == 0 || queries > d || !rows.is_multiple_of(queries as u64) {
        crate::bail!(
            op,
            "{rows} rows of {d} keys are not blocks of {queries} queries (needs 0 < queries <= keys)"
        );
    }
    Ok(queries as u32)
}

/// `kind` of softmax over the rows of `d` of view `l` (strided views are packed first); out contiguous, x's dtype.
pub fn forward(x: &CudaStorage, l: &Layout, d: usize, kind: Softmax) -> Result<CudaStorage> {
    let (op, dtype, dev) = (kind.name(), x.dtype(), x.device());
    let (kernel, _) = kernels(kind, dtype).ok_or(Error::UnsupportedDType { op, dtype })?;
    let n = l.shape().elem_count();
    let out = CudaStorage::uninit(dev, dtype, n)?;
    if n == 0 {
        return Ok(out);
    }
    let (rows, d32) = rows_of(op, n, d)?;
    let q = queries(op, rows, d, kind)?;
    let (xs, at) = contiguous(x, l)?;
    let (xp, yp) = (xs.ptr_at(at), out.ptr());
    let vec = vectorisable(dtype, d, &[xp, yp]);
    launch(
        dev,
        op,
        ("softmax", kernel),
        row_config(dev, n / d, d, vec)?,
        &[
            xp.into(),
            yp.into(),
            rows.into(),
            d32.into(),
            q.into(),
            u32::from(vec).into(),
        ],
    )?;
    Ok(out)
}

/// dx from the forward's output y and the incoming gradient g (each a view of the same shape).
pub fn backward(
    y: &CudaStorage,
    yl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    d: usize,
    kind: Softmax,
) -> Result<CudaStorage> {
    let (op, dtype, dev) = (kind.name(), y.dtype(), y.device());
    let (_, kernel) = kernels(kind, dtype).ok_or(Error::UnsupportedDType { op, dtype })?;
    if g.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op,
            lhs: dtype,
            rhs: g.dtype(),
        });
    }
    if yl.dims() != gl.dims() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: yl.dims().to_vec(),
            rhs: gl.dims().to_vec(),
        });
    }
    let n = yl.shape().elem_count();
    let out = CudaStorage::uninit(dev, dtype, n)?;
    if n == 0 {
        return Ok(out);
    }
    let (rows, d32) = rows_of(op, n, d)?;
    let q = queries(op, rows, d, kind)?;
    let (ys, y_at) = contiguous(y, yl)?;
    let (gs, g_at) = contiguous(g, gl)?;
    let (yp, gp, dxp) = (ys.ptr_at(y_at), gs.ptr_at(g_at), out.ptr());
    let vec = vectorisable(dtype, d, &[yp, gp, dxp]);
    launch(
        dev,
        op,
        ("softmax", kernel),
        row_config(dev, n / d, d, vec)?,
        &[
            yp.into(),
            gp.into(),
            dxp.into(),
            rows.into(),
            d32.into(),
            q.into(),
            u32::from(vec).into(),
        ],
    )?;
    Ok(out)
}
