//! LayerNorm and RMSNorm over the last dim on the device (cuda/norm.cu), forward and backward. Row
//! kernels take contiguous rows and f32 weight/bias (other views are packed or converted first). dw/db
//! are column sums over all rows: per-chunk partials, then the column reduction of reduce.rs, so they are
//! deterministic.

use super::copy::cast;
use super::launch::launch;
use super::reduce::reduce_rows;
use super::softmax::{contiguous, row_config, rows_of, vectorisable};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::ReduceOp;
use crate::shape::Shape;
use cudarc::driver::LaunchConfig;

/// Row lanes per block of the params kernel (`PARAM_ROWS` in cuda/norm.cu); its blocks are 32 columns wide.
const PARAM_ROWS: usize = 8;
/// Most row chunks (partials per column) of the params kernel.
const PARAM_CHUNKS_MAX: usize = 1024;

/// The forward's output and the per-row statistics backward needs.
pub struct NormOut {
    pub y: CudaStorage,
    /// F32 [rows] (zeros for rms_norm).
    pub mean: CudaStorage,
    /// F32 [rows]: 1 / sqrt(var + eps).
    pub rstd: CudaStorage,
}

/// (forward, backward, backward params) kernel names.
fn kernels(centre: bool, dtype: DType) -> Option<(&'static str, &'static str, &'static str)> {
    macro_rules! k {
        ($op:literal, $dt:literal) => {
            (
                concat!($op, "_", $dt),
                concat!($op, "_backward_", $dt),
                concat!("norm_backward_params_", $dt),
            )
        };
    }
    Some(match (centre, dtype) {
        (true, DType::F32) => k!("layer_norm", "f32"),
        (true, DType::F16) => k!("layer_norm", "f16"),
        (true, DType::BF16) => k!("layer_norm", "bf16"),
        (false, DType::F32) => k!("rms_norm", "f32"),
        (false, DType::F16) => k!("rms_norm", "f16"),
        (false, DType::BF16) => k!("rms_norm", "bf16"),
        _ => return None,
    })
}

/// A weight or bias of `d` elements as contiguous f32, with the index of its first element.
fn param_f32(
    op: &'static str,
    (p, l): (&CudaStorage, &Layout),
    d: usize,
) -> Result<(CudaStorage, usize)> {
    if l.shape().elem_count() != d {
        return Err(Error::ShapeMismatch {
            op,
            lhs: vec![d],
            rhs: l.dims().to_vec(),
        });
    }
    if !p.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            op,
            dtype: p.dtype(),
        });
    }
    match (p.dtype(), l.contiguous_range()) {
        (DType::F32, Some(range)) => Ok((p.clone(), range.start)),
        _ => Ok((cast(p, l, DType::F32)?, 0)),
    }
}

/// Device address of an optional contiguous f32 parameter (0 when absent).
fn param_ptr(p: &Option<(CudaStorage, usize)>) -> u64 {
    p.as_ref().map_or(0, |(s, at)| s.ptr_at(*at))
}

/// layer_norm (centre) or rms_norm over the last dim d, with optional [d] weight and bias of any float dtype.
pub fn forward(
    x: &CudaStorage,
    xl: &Layout,
    weight: Option<(&CudaStorage, &Layout)>,
    bias: Option<(&CudaStorage, &Layout)>,
    d: usize,
    eps: f32,
    centre: bool,
) -> Result<NormOut> {
    let op = if centre { "layer_norm" } else { "rms_norm" };
    let (dtype, dev) = (x.dtype(), x.device());
    let (kernel, _, _) = kernels(centre, dtype).ok_or(Error::UnsupportedDType { op, dtype })?;
    let n = xl.shape().elem_count();
    if n == 0 {
        return Ok(NormOut {
            y: CudaStorage::uninit(dev, dtype, 0)?,
            mean: CudaStorage::uninit(dev, DType::F32, 0)?,
            rstd: CudaStorage::uninit(dev, DType::F32, 0)?,
        });
    }
    let (rows, d32) = rows_of(op, n, d)?;
    let w = weight.map(|p| param_f32(op, p, d)).transpose()?;
    let b = bias.map(|p| param_f32(op, p, d)).transpose()?;
    let (xs, at) = contiguous(x, xl)?;
    let y = CudaStorage::uninit(dev, dtype, n)?;
    let mean = CudaStorage::uninit(dev, DType::F32, n / d)?;
    let rstd = CudaStorage::uninit(dev, DType::F32, n / d)?;
    let (xp, wp, bp, yp) = (xs.ptr_at(at), param_ptr(&w), param_ptr(&b), y.ptr());
    // Null weight/bias pointers are never read, so their alignment does not matter.
    let vec = vectorisable(dtype, d, &[xp, yp, wp, bp]);
    launch(
        dev,
        op,
        ("norm", kernel),
        row_config(dev, n / d, d, vec)?,
        &[
            xp.into(),
            wp.into(),
            bp.into(),
            yp.into(),
            mean.ptr().into(),
            rstd.ptr().into(),
            rows.into(),
            d32.into(),
            eps.into(),
            u32::from(vec).into(),
        ],
    )?;
    Ok(NormOut { y, mean, rstd })
}

/// dx (x's dtype, contiguous), and dw, db as F32 [d] when asked for.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &CudaStorage,
    xl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    weight: Option<(&CudaStorage, &Layout)>,
    mean: &CudaStorage,
    rstd: &CudaStorage,
    d: usize,
    centre: bool,
    want_dw: bool,
    want_db: bool,
) -> Result<(CudaStorage, Option<CudaStorage>, Option<CudaStorage>)> {
    let op = if centre {
        "layer_norm backward"
    } else {
        "rms_norm backward"
    };
    let (dtype, dev) = (x.dtype(), x.device());
    let (_, kernel, params_kernel) =
        kernels(centre, dtype).ok_or(Error::UnsupportedDType { op, dtype })?;
    if xl.dims() != gl.dims() {
        return Err(Error::ShapeMismatch {
            op,
            lhs: xl.dims().to_vec(),
            rhs: gl.dims().to_vec(),
        });
    }
    let n = xl.shape().elem_count();
    let dx = CudaStorage::uninit(dev, dtype, n)?;
    if n == 0 {
        // No rows: the column sums are zeros.
        let zeros = |want: bool| {
            want.then(|| CudaStorage::zeros(dev, DType::F32, d))
                .transpose()
        };
        return Ok((dx, zeros(want_dw)?, zeros(want_db)?));
    }
    let (rows, d32) = rows_of(op, n, d)?;
    let n_rows = n / d;
    for s in [mean, rstd] {
        if s.dtype() != DType::F32 || s.len() < n_rows {
            crate::bail!(
                op,
                "the saved statistics must be f32 [{n_rows}], got {} [{}]",
                s.dtype(),
                s.len()
            );
        }
    }
    let w = weight.map(|p| param_f32(op, p, d)).transpose()?;
    let (xs, x_at) = contiguous(x, xl)?;
    let (gs, g_at) = if g.dtype() == dtype {
        contiguous(g, gl)?
    } else {
        (cast(g, gl, dtype)?, 0)
    };
    let (xp, gp, wp, dxp) = (xs.ptr_at(x_at), gs.ptr_at(g_at), param_ptr(&w), dx.ptr());
    let vec = vectorisable(dtype, d, &[xp, gp, wp, dxp]);
    launch(
        dev,
        op,
        ("norm", kernel),
        row_config(dev, n_rows, d, vec)?,
        &[
            xp.into(),
            gp.into(),
            wp.into(),
            mean.ptr().into(),
            rstd.ptr().into(),
            dxp.into(),
            rows.into(),
            d32.into(),
            u32::from(vec).into(),
        ],
    )?;
    if !want_dw && !want_db {
        return Ok((dx, None, None));
    }
    // Blocks of 32 columns x PARAM_ROWS row lanes; enough row chunks for eight blocks per SM.
    let tiles = d.div_ceil(32);
    let sms = dev.props().multiprocessors.max(1) as usize;
    let chunks = (sms * 8)
        .div_ceil(tiles)
        .min(n_rows.div_ceil(PARAM_ROWS))
        .clamp(1, PARAM_CHUNKS_MAX);
    let rows_per_chunk = n_rows.div_ceil(chunks);
    let chunks = n_rows.div_ceil(rows_per_chunk);
    let part = |want: bool| {
        want.then(|| CudaStorage::uninit(dev, DType::F32, chunks * d))
            .transpose()
    };
    let (dw_part, db_part) = (part(want_dw)?, part(want_db)?);
    let ptr = |p: &Option<CudaStorage>| p.as_ref().map_or(0, |s| s.ptr());
    let cfg = LaunchConfig {
        // tiles <= d fits u32 (rows_of checked d); chunks <= PARAM_CHUNKS_MAX.
        grid_dim: (tiles as u32, chunks as u32, 1),
        block_dim: (32, PARAM_ROWS as u32, 1),
        shared_mem_bytes: 0,
    };
    launch(
        dev,
        op,
        ("norm", params_kernel),
        cfg,
        &[
            xp.into(),
            gp.into(),
            mean.ptr().into(),
            rstd.ptr().into(),
            rows.into(),
            d32.into(),
            (rows_per_chunk as u64).into(),
            ptr(&dw_part).into(),
            ptr(&db_part).into(),
        ],
    )?;
    // Partials [chunks, d], read as d rows of `chunks` (column c of chunk k at k * d + c).
    let columns = Layout::new(Shape::from(vec![d, chunks]), vec![1, d], 0);
    let fold = |p: Option<CudaStorage>| -> Result<Option<CudaStorage>> {
        match p {
            Some(p) if chunks > 1 => Ok(Some(reduce_rows(&p, &columns, d, chunks, ReduceOp::Sum)?)),
            other => Ok(other),
        }
    };
    Ok((dx, fold(dw_part)?, fold(db_part)?))
}
