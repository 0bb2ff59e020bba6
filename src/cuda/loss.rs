//! Launchers for cuda/loss.cu: fused cross-entropy with ignored targets (-1). The forward pass is a row
//! kernel (log-sum-exp and loss term per row) and a one-block fixed-order sum, so the loss is
//! deterministic; the backward pass reads the upstream gradient on the device.

use super::index::{check_i32, contiguous, float_kernel};
use super::launch::{launch, Arg};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::LaunchConfig;

/// Rows up to this long get one warp each (eight rows per block); longer rows get a block each.
const WARP_ROW_MAX: usize = 1024;
const WARP_ROW_THREADS: u32 = 256;
const BLOCK_ROW_THREADS: u32 = 512;
/// Threads of the one block that sums the per-row losses.
const MEAN_THREADS: u32 = 1024;

/// (rows, launch of a row kernel, warp_rows flag) for logits viewed as [rows, v].
fn row_launch(
    op: &'static str,
    logits: &CudaStorage,
    l: &Layout,
    v: usize,
) -> Result<(usize, LaunchConfig, u32)> {
    let Some((&last, lead)) = l.dims().split_last() else {
        crate::bail!(op, "logits need at least one dim");
    };
    if last != v {
        crate::bail!(op, "logits' last dim is {last}, expected {v}");
    }
    let rows: usize = lead.iter().product();
    if v == 0 && rows > 0 {
        crate::bail!(op, "logits have no classes");
    }
    let warp = v <= WARP_ROW_MAX;
    let (threads, per_block) = if warp {
        (WARP_ROW_THREADS, (WARP_ROW_THREADS / 32) as usize)
    } else {
        (BLOCK_ROW_THREADS, 1)
    };
    let max_blocks = (logits.device().props().multiprocessors.max(1) * 32) as usize;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(per_block).clamp(1, max_blocks) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((rows, cfg, u32::from(warp)))
}

/// Mean cross-entropy of rows of `v` logits (view l) against I32 targets [rows] (-1 = ignored); `kept` = number of
/// non-ignored rows. Returns (loss [1] in logits' dtype, lse F32 [rows]). Deterministic (no float atomics).
pub fn cross_entropy_forward(
    logits: &CudaStorage,
    l: &Layout,
    v: usize,
    targets: &CudaStorage,
    kept: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "cross_entropy";
    let rows_kernel = float_kernel(
        OP,
        logits.dtype(),
        [
            "cross_entropy_rows_f32",
            "cross_entropy_rows_f16",
            "cross_entropy_rows_bf16",
        ],
    )?;
    let mean_kernel = float_kernel(
        OP,
        logits.dtype(),
        [
            "cross_entropy_mean_f32",
            "cross_entropy_mean_f16",
            "cross_entropy_mean_bf16",
        ],
    )?;
    let (rows, cfg, warp_rows) = row_launch(OP, logits, l, v)?;
    check_i32(OP, "targets", targets, rows)?;
    let dev = logits.device();
    let lse = CudaStorage::uninit(dev, DType::F32, rows)?;
    let nll = CudaStorage::uninit(dev, DType::F32, rows)?;
    let loss = CudaStorage::uninit(dev, logits.dtype(), 1)?;
    if rows > 0 {
        let (x, start) = contiguous(logits, l)?;
        launch(
            dev,
            OP,
            ("loss", rows_kernel),
            cfg,
            &[
                Arg::from(x.ptr_at(start)),
                targets.ptr().into(),
                lse.ptr().into(),
                nll.ptr().into(),
                (rows as u64).into(),
                (v as u64).into(),
                warp_rows.into(),
            ],
        )?;
    }
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (MEAN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(
        dev,
        OP,
        ("loss", mean_kernel),
        one_block,
        &[
            Arg::from(nll.ptr()),
            loss.ptr().into(),
            (rows as u64).into(),
            (kept as u64).into(),
        ],
    )?;
    Ok((loss, lse))
}

/// dlogits = (softmax - onehot) * grad[0] / kept (grad: a 1-element device storage of any float dtype, read ON the
/// device so no host copy is needed), logits' dtype, contiguous.
pub fn cross_entropy_backward(
    logits: &CudaStorage,
    l: &Layout,
    v: usize,
    targets: &CudaStorage,
    lse: &CudaStorage,
    grad: &CudaStorage,
    kept: usize,
) -> Result<CudaStorage> {
    const OP: &str = "cross_entropy_backward";
    let name = float_kernel(
        OP,
        logits.dtype(),
        [
            "cross_entropy_backward_f32",
            "cross_entropy_backward_f16",
            "cross_entropy_backward_bf16",
        ],
    )?;
    let grad_dtype: u32 = match grad.dtype() {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        dtype => return Err(Error::UnsupportedDType { op: OP, dtype }),
    };
    if grad.is_empty() {
        crate::bail!(OP, "the upstream gradient is empty");
    }
    let (rows, cfg, warp_rows) = row_launch(OP, logits, l, v)?;
    check_i32(OP, "targets", targets, rows)?;
    if lse.dtype() != DType::F32 {
        return Err(Error::UnsupportedDType {
            op: OP,
            dtype: lse.dtype(),
        });
    }
    if lse.len() < rows {
        crate::bail!(OP, "lse holds {} rows, {rows} needed", lse.len());
    }
    let n = rows * v;
    let dev = logits.device();
    let out = CudaStorage::uninit(dev, logits.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let (x, start) = contiguous(logits, l)?;
    launch(
        dev,
        OP,
        ("loss", name),
        cfg,
        &[
            Arg::from(x.ptr_at(start)),
            out.ptr().into(),
            targets.ptr().into(),
            lse.ptr().into(),
            grad.ptr().into(),
            grad_dtype.into(),
            (kept.max(1) as f32).into(),
            (rows as u64).into(),
            (v as u64).into(),
            warp_rows.into(),
        ],
    )?;
    Ok(out)
}
