//! Row reductions on the device (cuda/reduce.cu): sum, max, min, argmax and argmin of each row of a
//! view whose row-major walk is rows x r. The view's row dims and its reduced dims are described apart, so
//! permuted views (sums over leading dims) are read in place. Rows that are too few to fill the GPU are
//! split into chunks whose f32 partials a second launch folds, so results never depend on atomics.

use super::launch::{grid_1d, grid_rows, launch, Arg, Strided};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::ReduceOp;
use crate::shape::Shape;
use cudarc::driver::LaunchConfig;

/// Rows up to this long get a warp each; longer ones a block per row or per chunk of a row.
const WARP_ROW_MAX: usize = 1024;
/// Rows up to this long whose elements are one stride apart get a thread each.
const THREAD_ROW_MAX: usize = 16;
/// Threads per block of every reduce kernel.
const THREADS: u32 = 256;
/// Fewest elements in a chunk of a row split across blocks.
const BLOCK_CHUNK_MIN: usize = 4096;
/// Fewest elements in a chunk of a row split across threads.
const THREAD_CHUNK_MIN: usize = 64;

/// The kernels of one op and dtype: the row walk, the thread-per-row walk, and the fold of partials.
struct Kernels {
    rows: &'static str,
    cols: &'static str,
    finish: &'static str,
}

macro_rules! kernels {
    ($op:literal, $dt:literal) => {
        Kernels {
            rows: concat!("reduce_", $op, "_", $dt),
            cols: concat!("reduce_", $op, "_cols_", $dt),
            finish: concat!("reduce_", $op, "_finish_", $dt),
        }
    };
    (arg $op:literal, $dt:literal) => {
        Kernels {
            rows: concat!($op, "_", $dt),
            cols: concat!($op, "_cols_", $dt),
            finish: concat!($op, "_finish"),
        }
    };
}

fn value_kernels(op: ReduceOp, dtype: DType) -> Option<Kernels> {
    use DType::*;
    use ReduceOp::*;
    Some(match (op, dtype) {
        (Sum, F32) => kernels!("sum", "f32"),
        (Sum, F16) => kernels!("sum", "f16"),
        (Sum, BF16) => kernels!("sum", "bf16"),
        (Max, F32) => kernels!("max", "f32"),
        (Max, F16) => kernels!("max", "f16"),
        (Max, BF16) => kernels!("max", "bf16"),
        (Min, F32) => kernels!("min", "f32"),
        (Min, F16) => kernels!("min", "f16"),
        (Min, BF16) => kernels!("min", "bf16"),
        _ => return None,
    })
}

fn arg_kernels(max: bool, dtype: DType) -> Kernels {
    use DType::*;
    match (max, dtype) {
        (true, F32) => kernels!(arg "argmax", "f32"),
        (true, F16) => kernels!(arg "argmax", "f16"),
        (true, BF16) => kernels!(arg "argmax", "bf16"),
        (true, I32) => kernels!(arg "argmax", "i32"),
        (true, I8) => kernels!(arg "argmax", "i8"),
        (true, U8) => kernels!(arg "argmax", "u8"),
        (false, F32) => kernels!(arg "argmin", "f32"),
        (false, F16) => kernels!(arg "argmin", "f16"),
        (false, BF16) => kernels!(arg "argmin", "bf16"),
        (false, I32) => kernels!(arg "argmin", "i32"),
        (false, I8) => kernels!(arg "argmin", "i8"),
        (false, U8) => kernels!(arg "argmin", "u8"),
    }
}

/// How the rows are walked.
enum Walk {
    /// A warp (`warp`) or a block per segment; `cols` locates element k within a row.
    Rows { cols: Strided, warp: bool },
    /// A thread per segment; element k of a row sits `stride * k` past the row's start.
    Cols { stride: u64 },
}

/// One reduction's launch plan: rows are cut into `chunks` segments of `clen` elements (the last may be
/// shorter); with more than one, segments leave partials [rows, chunks] for the finish kernel.
struct Plan {
    rows_s: Strided,
    walk: Walk,
    chunks: usize,
    clen: usize,
    cfg: LaunchConfig,
}

/// The row part (offset included) and the reduced part of `l`, whose walk is rows x r.
fn split(op: &'static str, l: &Layout, rows: usize, r: usize) -> Result<(Layout, Layout)> {
    let (dims, strides) = (l.dims(), l.strides());
    let k = (0..=dims.len()).rev().find(|&k| {
        dims[k..].iter().product::<usize>() == r && dims[..k].iter().product::<usize>() == rows
    });
    let Some(k) = k else {
        crate::bail!(
            op,
            "a view of shape {dims:?} does not split into {rows} rows of {r}"
        );
    };
    let part = |range: std::ops::Range<usize>, offset| {
        Layout::new(
            Shape::from(dims[range.clone()].to_vec()),
            strides[range].to_vec(),
            offset,
        )
    };
    Ok((part(0..k, l.offset()), part(k..dims.len(), 0)))
}

/// Clamps `want` segments per row to `1..=most` (`most` is 0 for empty rows).
fn chunk_count(want: usize, most: usize) -> usize {
    want.min(most).max(1)
}

fn plan(op: &'static str, x: &CudaStorage, l: &Layout, rows: usize, r: usize) -> Result<Plan> {
    let dev = x.device();
    let sms = dev.props().multiprocessors.max(1) as usize;
    let (rows_l, cols_l) = split(op, l, rows, r)?;
    let rows_s = Strided::of(op, &rows_l)?;
    let cols = Strided::of(op, &cols_l)?;
    let inner = rows_s.rank as usize - 1;
    let neighbour_rows = rows_s.strides[inner] == 1 && rows_s.dims[inner] >= 32;
    let single_stride = cols.rank == 1;
    let dense = single_stride && cols.strides[0] == 1;
    let (walk, chunks) = if single_stride && (r <= THREAD_ROW_MAX || (neighbour_rows && !dense)) {
        // Enough threads to fill every SM (2048 resident threads each).
        let want = (sms * 2048).div_ceil(rows);
        let walk = Walk::Cols {
            stride: cols.strides[0],
        };
        (walk, chunk_count(want, r.div_ceil(THREAD_CHUNK_MIN)))
    } else if r <= WARP_ROW_MAX {
        (Walk::Rows { cols, warp: true }, 1)
    } else {
        // 32 blocks per SM: several waves (about five blocks fit an SM at once), so the last is short.
        let want = (sms * 32).div_ceil(rows);
        let walk = Walk::Rows { cols, warp: false };
        (walk, chunk_count(want, r.div_ceil(BLOCK_CHUNK_MIN)))
    };
    let clen = r.div_ceil(chunks);
    // Every chunk is non-empty (empty rows keep their one chunk).
    let chunks = if clen == 0 { 1 } else { r.div_ceil(clen) };
    let cfg = match walk {
        Walk::Cols { .. } => grid_1d(dev, rows * chunks, THREADS),
        Walk::Rows { warp: true, .. } => grid_1d(dev, rows * 32, THREADS),
        // The kernel loops over segments, so the grid may stop at the hardware's limit.
        Walk::Rows { warp: false, .. } => {
            grid_rows((rows * chunks).min(i32::MAX as usize), THREADS, 0)?
        }
    };
    Ok(Plan {
        rows_s,
        walk,
        chunks,
        clen,
        cfg,
    })
}

/// Runs `plan` with kernels `k` into `out`; `with_index` keeps i32 indices beside the f32 partials.
#[allow(clippy::too_many_arguments)]
fn run(
    op: &'static str,
    k: &Kernels,
    x: &CudaStorage,
    rows: usize,
    r: usize,
    plan: &Plan,
    with_index: bool,
    out: &CudaStorage,
) -> Result<()> {
    let dev = x.device();
    let split = plan.chunks > 1;
    // The partials are freed when this returns; the stream orders any reuse of their blocks after the
    // finish kernel.
    let pv = match split {
        true => Some(CudaStorage::uninit(dev, DType::F32, rows * plan.chunks)?),
        false => None,
    };
    let pi = match split && with_index {
        true => Some(CudaStorage::uninit(dev, DType::I32, rows * plan.chunks)?),
        false => None,
    };
    let pv_ptr = pv.as_ref().map_or(0, |p| p.ptr());
    let pi_ptr = pi.as_ref().map_or(0, |p| p.ptr());
    // Chunk counts are bounded by the grid sizes chosen in `plan` (at most 2048 per SM).
    let chunks = plan.chunks as u32;
    let (rows, r, clen) = (rows as u64, r as u64, plan.clen as u64);
    match plan.walk {
        Walk::Rows { cols, warp } => launch(
            dev,
            op,
            ("reduce", k.rows),
            plan.cfg,
            &[
                x.ptr().into(),
                plan.rows_s.into(),
                cols.into(),
                rows.into(),
                r.into(),
                chunks.into(),
                clen.into(),
                pv_ptr.into(),
                pi_ptr.into(),
                out.ptr().into(),
                u32::from(warp).into(),
            ],
        )?,
        Walk::Cols { stride } => launch(
            dev,
            op,
            ("reduce", k.cols),
            plan.cfg,
            &[
                x.ptr().into(),
                plan.rows_s.into(),
                rows.into(),
                r.into(),
                stride.into(),
                chunks.into(),
                clen.into(),
                pv_ptr.into(),
                pi_ptr.into(),
                out.ptr().into(),
            ],
        )?,
    }
    if split {
        let args: [Arg; 5] = [
            pv_ptr.into(),
            pi_ptr.into(),
            rows.into(),
            chunks.into(),
            out.ptr().into(),
        ];
        let cfg = grid_1d(dev, rows as usize * 32, THREADS);
        launch(dev, op, ("reduce", k.finish), cfg, &args)?;
    }
    Ok(())
}

/// Reduces each row of `r` elements; `l` is a view (maybe strided) whose row-major walk is rows x r. Out [rows], x's dtype (float dtypes only).
pub fn reduce_rows(
    x: &CudaStorage,
    l: &Layout,
    rows: usize,
    r: usize,
    op: ReduceOp,
) -> Result<CudaStorage> {
    let name = match op {
        ReduceOp::Sum => "sum",
        ReduceOp::Max => "max",
        ReduceOp::Min => "min",
    };
    let dtype = x.dtype();
    let k = value_kernels(op, dtype).ok_or(Error::UnsupportedDType { op: name, dtype })?;
    let out = CudaStorage::uninit(x.device(), dtype, rows)?;
    if rows == 0 {
        return Ok(out);
    }
    let plan = plan(name, x, l, rows, r)?;
    run(name, &k, x, rows, r, &plan, false, &out)?;
    Ok(out)
}

/// Index of the max (or min) of each row as I32 [rows], CPU tie/NaN rules.
pub fn arg_reduce_rows(
    x: &CudaStorage,
    l: &Layout,
    rows: usize,
    r: usize,
    max: bool,
) -> Result<CudaStorage> {
    let name = if max { "argmax" } else { "argmin" };
    let out = CudaStorage::uninit(x.device(), DType::I32, rows)?;
    if rows == 0 {
        return Ok(out);
    }
    if r == 0 {
        crate::bail!(name, "rows of length 0 have no index to return");
    }
    if i32::try_from(r - 1).is_err() {
        crate::bail!(name, "rows of {r} elements overflow i32 indices");
    }
    let plan = plan(name, x, l, rows, r)?;
    let k = arg_kernels(max, x.dtype());
    run(name, &k, x, rows, r, &plan, true, &out)?;
    Ok(out)
}
