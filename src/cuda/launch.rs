//! Kernel launches: the argument list, the strided-view descriptor the kernels share with
//! `cuda/common.cuh`, grid sizing, and the one launch path (NVTX range, error naming the op).

use super::device::CudaDevice;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

/// Dims a strided kernel can walk after coalescing (`TRIT_MAX_DIMS` in cuda/common.cuh).
pub const MAX_DIMS: usize = 8;

/// A strided view as the kernels read it (`struct Strided` in cuda/common.cuh): element `i` of the
/// row-major walk over `dims` lives at `offset + Σ idx_d · strides[d]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Strided {
    pub rank: u32,
    pub dims: [u32; MAX_DIMS],
    pub strides: [u64; MAX_DIMS],
    pub offset: u64,
}

// SAFETY: repr(C) plain data with the same field order, types and alignment as `struct Strided` in
// cuda/common.cuh; it is passed by value as a kernel parameter.
unsafe impl DeviceRepr for Strided {}

// The driver copies a by-value parameter with the size the PTX declares (`.align 8 .b8 [112]`), so a
// different Rust layout would shift every field the kernels read.
const _: () =
    assert!(std::mem::size_of::<Strided>() == 112 && std::mem::align_of::<Strided>() == 8);

impl Strided {
    /// Descriptors for views of one shape that a kernel walks together (inputs of a binary op, or a
    /// view and the contiguous output it is copied to). Dims that are contiguous in every view are
    /// merged, so most views need one or two dims.
    pub fn coalesced<const K: usize>(
        op: &'static str,
        layouts: [&Layout; K],
    ) -> Result<[Strided; K]> {
        let dims = layouts[0].dims();
        let strides: Vec<&[usize]> = layouts.iter().map(|l| l.strides()).collect();
        let (dims, strides) = crate::layout::coalesce(dims, &strides);
        if dims.len() > MAX_DIMS {
            return Err(Error::Cuda {
                op,
                msg: format!(
                    "a view with {} non-mergeable dims; CUDA kernels walk at most {MAX_DIMS} (make it contiguous first)",
                    dims.len()
                ),
            });
        }
        let mut out = [Strided::default(); K];
        for (k, s) in out.iter_mut().enumerate() {
            s.rank = dims.len() as u32;
            s.offset = layouts[k].offset() as u64;
            for (d, &n) in dims.iter().enumerate() {
                s.dims[d] = u32::try_from(n).map_err(|_| Error::Cuda {
                    op,
                    msg: format!("dim of size {n} exceeds the kernels' 32-bit dims"),
                })?;
                s.strides[d] = strides[k][d] as u64;
            }
        }
        Ok(out)
    }

    /// The descriptor of one view.
    pub fn of(op: &'static str, layout: &Layout) -> Result<Strided> {
        Ok(Strided::coalesced(op, [layout])?[0])
    }
}

/// The position of a dtype in the per-dtype kernel tables (f32, f16, bf16, i32, i8, u8: the order of the
/// kernel families in cuda/*.cu).
pub fn dtype_index(d: crate::dtype::DType) -> usize {
    use crate::dtype::DType;
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::I32 => 3,
        DType::I8 => 4,
        DType::U8 => 5,
    }
}

/// One kernel parameter.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    U64(u64),
    I64(i64),
    U32(u32),
    I32(i32),
    F32(f32),
    Strided(Strided),
    Flash(super::flash::FlashParams),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::U64(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::I64(v)
    }
}
impl From<u32> for Arg {
    fn from(v: u32) -> Arg {
        Arg::U32(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::I32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Arg {
        Arg::F32(v)
    }
}
impl From<Strided> for Arg {
    fn from(v: Strided) -> Arg {
        Arg::Strided(v)
    }
}

/// A 1-d grid of `threads`-wide blocks covering `n` items, capped so huge tensors use grid-stride loops
/// (every elementwise kernel loops `for (i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)`).
pub fn grid_1d(dev: &CudaDevice, n: usize, threads: u32) -> LaunchConfig {
    let max_blocks = (dev.props().multiprocessors.max(1) * 32) as usize;
    let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row (row kernels: reductions, softmax, norms, cross-entropy).
pub fn grid_rows(rows: usize, threads: u32, shared_mem_bytes: u32) -> Result<LaunchConfig> {
    let rows = u32::try_from(rows.max(1)).map_err(|_| Error::Cuda {
        op: "launch",
        msg: format!("{rows} rows exceed one grid"),
    })?;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes,
    })
}

/// Dynamic shared memory a block may use without opting in.
const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;

/// Launches `module`'s kernel `kernel` on the device's stream inside an NVTX range named `op`.
pub fn launch(
    dev: &CudaDevice,
    op: &'static str,
    (module, kernel): (&'static str, &'static str),
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let _range = super::nvtx::range(op);
    let f = dev.function(module, kernel)?;
    if cfg.shared_mem_bytes > DEFAULT_SHARED_BYTES {
        // Blocks past 48 KiB of dynamic shared memory must be opted into per function.
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )
        .map_err(|e| Error::Cuda {
            op,
            msg: format!(
                "{kernel} needs {} bytes of shared memory per block, more than this GPU allows: {e}",
                cfg.shared_mem_bytes
            ),
        })?;
    }
    let mut b = dev.stream().launch_builder(&f);
    for a in args {
        match a {
            Arg::U64(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
            Arg::U32(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
            Arg::Strided(v) => b.arg(v),
            Arg::Flash(v) => b.arg(v),
        };
    }
    // SAFETY: the argument list matches the kernel's signature in cuda/<module>.cu (each launcher is the
    // one caller of its kernels and is tested against the CPU twin); every pointer argument is a live
    // block of this device large enough for the extents passed alongside it.
    let r = unsafe { b.launch(cfg) };
    dev.launched(op, r)
}
