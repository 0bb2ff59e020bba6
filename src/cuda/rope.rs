//! Launcher for cuda/rope.cu: rotary position embedding, reading x through its 4-d strides (q and k
//! usually arrive as transposed projections) and writing a contiguous result.

use super::index::{check_i32, float_kernel};
use super::launch::{launch, Arg};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::LaunchConfig;

/// Threads per block: blockDim.x threads over a row's d/2 pairs, the rest of the block on further rows.
const THREADS: u32 = 256;

fn dim_u32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Cuda {
        op: "rope",
        msg: format!("dim of size {n} exceeds the kernel's 32-bit dims"),
    })
}

/// RoPE over x [b, h, s, d] (view l, maybe strided), cos/sin F32 [max_pos, d/2] contiguous, positions I32 [s] or
/// [b*s], interleaved pairs (2i,2i+1) else (i, i+d/2); sign -1 rotates backwards. Out contiguous, x's dtype.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &CudaStorage,
    l: &Layout,
    dims: (usize, usize, usize, usize),
    cos: &CudaStorage,
    sin: &CudaStorage,
    positions: &CudaStorage,
    interleaved: bool,
    sign: f32,
) -> Result<CudaStorage> {
    const OP: &str = "rope";
    let (b, h, s, d) = dims;
    let name = float_kernel(OP, x.dtype(), ["rope_f32", "rope_f16", "rope_bf16"])?;
    if l.dims() != [b, h, s, d] {
        return Err(Error::ShapeMismatch {
            op: OP,
            lhs: vec![b, h, s, d],
            rhs: l.dims().to_vec(),
        });
    }
    if !d.is_multiple_of(2) {
        crate::bail!(OP, "head_dim must be even, got {d}");
    }
    // The kernel reads x through the view's strides: the view must lie inside the storage.
    super::copy::check_view(OP, x, l)?;
    for t in [cos, sin] {
        if t.dtype() != DType::F32 {
            return Err(Error::UnsupportedDType {
                op: OP,
                dtype: t.dtype(),
            });
        }
    }
    let half = d / 2;
    if cos.len() != sin.len() || (half > 0 && !cos.len().is_multiple_of(half)) {
        crate::bail!(
            OP,
            "cos and sin must both be [max_pos, {half}], got {} and {} elements",
            cos.len(),
            sin.len()
        );
    }
    let per_batch = positions.len() == b * s;
    if !per_batch && positions.len() != s {
        crate::bail!(
            OP,
            "positions must have {s} or {} elements, got {}",
            b * s,
            positions.len()
        );
    }
    check_i32(OP, "positions", positions, positions.len())?;
    let n = b * h * s * d;
    let out = CudaStorage::uninit(x.device(), x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let dev = x.device();
    let tx = half.next_multiple_of(32).min(THREADS as usize) as u32;
    let ty = THREADS / tx;
    let rows = b * h * s;
    let max_blocks = (dev.props().multiprocessors.max(1) * 32) as usize;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(ty as usize).min(max_blocks) as u32, 1, 1),
        block_dim: (tx, ty, 1),
        shared_mem_bytes: 0,
    };
    let st = l.strides();
    launch(
        dev,
        OP,
        ("rope", name),
        cfg,
        &[
            Arg::from(x.ptr()),
            out.ptr().into(),
            cos.ptr().into(),
            sin.ptr().into(),
            positions.ptr().into(),
            (l.offset() as u64).into(),
            (st[0] as u64).into(),
            (st[1] as u64).into(),
            (st[2] as u64).into(),
            (st[3] as u64).into(),
            dim_u32(b)?.into(),
            dim_u32(h)?.into(),
            dim_u32(s)?.into(),
            dim_u32(d)?.into(),
            u32::from(per_batch).into(),
            u32::from(interleaved).into(),
            sign.into(),
        ],
    )?;
    Ok(out)
}
