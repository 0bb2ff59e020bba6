//! Launchers for cuda/copy.cu (strided copies and dtype casts), and the copies that need no kernel: a
//! contiguous copy is one driver copy, a fill one driver memset of the value's bit pattern, and a cat
//! one 2-d driver copy per part.

use super::device::{driver_err, CudaDevice};
use super::launch::{dtype_index, grid_1d, launch, Strided};
use super::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::{result, sys};
use std::sync::Arc;

const MODULE: &str = "copy";
const THREADS: u32 = 256;

/// Largest row pitch the driver's 2-d copies accept (CU_DEVICE_ATTRIBUTE_MAX_PITCH, 2^31 - 1 bytes on
/// every GPU since Fermi); wider rows are copied one at a time.
const MAX_PITCH: usize = i32::MAX as usize;

/// Fails unless every element of the view `l` lies inside `s` (a read past it would poison the context).
pub(super) fn check_view(op: &'static str, s: &CudaStorage, l: &Layout) -> Result<()> {
    if l.shape().elem_count() == 0 {
        return Ok(());
    }
    let last = l
        .dims()
        .iter()
        .zip(l.strides())
        .fold(l.offset(), |acc, (&d, &st)| {
            acc.saturating_add((d - 1).saturating_mul(st))
        });
    if last >= s.len() {
        return Err(Error::InvalidArgument {
            op,
            msg: format!(
                "view {:?} (strides {:?}, offset {}) reaches element {last} of a storage of {}",
                l.dims(),
                l.strides(),
                l.offset(),
                s.len()
            ),
        });
    }
    Ok(())
}

/// The kernel converting `[from][to]` (indexed by `dtype_index`): `cast_<from>_<to>` in cuda/copy.cu, or
/// the word copy of the dtype's size where the two are the same.
#[rustfmt::skip]
const KERNELS: [[&str; 6]; 6] = [
    ["copy_b32", "cast_f32_f16", "cast_f32_bf16", "cast_f32_i32", "cast_f32_i8", "cast_f32_u8"],
    ["cast_f16_f32", "copy_b16", "cast_f16_bf16", "cast_f16_i32", "cast_f16_i8", "cast_f16_u8"],
    ["cast_bf16_f32", "cast_bf16_f16", "copy_b16", "cast_bf16_i32", "cast_bf16_i8", "cast_bf16_u8"],
    ["cast_i32_f32", "cast_i32_f16", "cast_i32_bf16", "copy_b32", "cast_i32_i8", "cast_i32_u8"],
    ["cast_i8_f32", "cast_i8_f16", "cast_i8_bf16", "cast_i8_i32", "copy_b8", "cast_i8_u8"],
    ["cast_u8_f32", "cast_u8_f16", "cast_u8_bf16", "cast_u8_i32", "cast_u8_i8", "copy_b8"],
];

/// Contiguous copy of a strided view, any dtype (copy by element size: 1, 2 or 4 bytes).
pub fn copy_strided(x: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    cast(x, l, x.dtype())
}

/// Converts a strided view to `to` (all 6x6 pairs of f32/f16/bf16/i32/i8/u8), CPU semantics.
pub fn cast(x: &CudaStorage, l: &Layout, to: DType) -> Result<CudaStorage> {
    let op = if x.dtype() == to { "copy" } else { "to_dtype" };
    check_view(op, x, l)?;
    let n = l.shape().elem_count();
    let mut out = CudaStorage::uninit(x.device(), to, n)?;
    if n == 0 {
        return Ok(out);
    }
    if x.dtype() == to {
        if let Some(r) = l.contiguous_range() {
            let _range = super::nvtx::range(op);
            out.copy_from(0, x, r.start, n)?;
            x.device().checkpoint(op)?;
            return Ok(out);
        }
    }
    let [sx] = Strided::coalesced(op, [l])?;
    // The dense path steps one 16-byte pack of the wider dtype per thread (`Lanes` in the .cu).
    let dense = sx.rank == 1 && sx.strides[0] == 1;
    let widest = x.dtype().size_in_bytes().max(to.size_in_bytes());
    let work = if dense { n.div_ceil(16 / widest) } else { n };
    launch(
        x.device(),
        op,
        (MODULE, KERNELS[dtype_index(x.dtype())][dtype_index(to)]),
        grid_1d(x.device(), work, THREADS),
        &[
            x.ptr().into(),
            sx.into(),
            out.ptr().into(),
            (n as u64).into(),
        ],
    )?;
    Ok(out)
}

/// `len` copies of `value` (converted to dtype as CpuStorage::from_f32 does).
pub fn fill(dev: &Arc<CudaDevice>, dtype: DType, len: usize, value: f32) -> Result<CudaStorage> {
    const OP: &str = "fill";
    let out = CudaStorage::uninit(dev, dtype, len)?;
    if len == 0 {
        return Ok(out);
    }
    // Rust's `as` is CpuStorage::from_f32's integer conversion (truncating, saturating, NaN to 0);
    // half's from_f32 its f16/bf16 rounding.
    let bits: u32 = match dtype {
        DType::F32 => value.to_bits(),
        DType::F16 => half::f16::from_f32(value).to_bits().into(),
        DType::BF16 => half::bf16::from_f32(value).to_bits().into(),
        DType::I32 => value as i32 as u32,
        DType::I8 => value as i8 as u8 as u32,
        DType::U8 => (value as u8).into(),
    };
    let _range = super::nvtx::range(OP);
    dev.bind(OP)?;
    let stream = dev.cu_stream();
    // SAFETY: `out` holds `len` elements of `dtype`, so `len` words of its size; the block comes from
    // cuMemAlloc and is aligned for every word size; the memset is ordered on the device's stream.
    // The truncating casts keep exactly the low bytes that hold the pattern of each word size.
    let r = unsafe {
        match dtype.size_in_bytes() {
            1 => sys::cuMemsetD8Async(out.ptr(), bits as u8, len, stream),
            2 => sys::cuMemsetD16Async(out.ptr(), bits as u16, len, stream),
            _ => sys::cuMemsetD32Async(out.ptr(), bits, len, stream),
        }
    };
    r.result().map_err(|e| driver_err(OP, e))?;
    dev.checkpoint(OP)?;
    Ok(out)
}

/// Joins contiguous views of one dtype: part p is [outer, sizes[p], inner]; out [outer, Σsizes, inner].
pub fn cat(
    parts: &[(&CudaStorage, &Layout)],
    sizes: &[usize],
    outer: usize,
    inner: usize,
) -> Result<CudaStorage> {
    const OP: &str = "cat";
    let Some(&(first, _)) = parts.first() else {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: "no tensors to join".into(),
        });
    };
    if sizes.len() != parts.len() {
        return Err(Error::InvalidArgument {
            op: OP,
            msg: format!("{} parts but {} sizes", parts.len(), sizes.len()),
        });
    }
    let (dtype, dev) = (first.dtype(), first.device());
    let mut starts = Vec::with_capacity(parts.len());
    for (&(s, l), &size) in parts.iter().zip(sizes) {
        if s.dtype() != dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: dtype,
                rhs: s.dtype(),
            });
        }
        if !Arc::ptr_eq(s.device(), dev) {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: format!("cuda:{}", dev.ordinal()),
                rhs: format!("cuda:{}", s.device().ordinal()),
            });
        }
        let want = outer * size * inner;
        match l.contiguous_range() {
            Some(r) if r.len() == want && r.end <= s.len() => starts.push(r.start),
            _ => {
                return Err(Error::InvalidArgument {
                    op: OP,
                    msg: format!(
                        "each part must be a contiguous view of {want} elements, got {:?} (strides {:?}, offset {}) of a storage of {}",
                        l.dims(),
                        l.strides(),
                        l.offset(),
                        s.len()
                    ),
                })
            }
        }
    }
    let total: usize = sizes.iter().sum();
    let out = CudaStorage::uninit(dev, dtype, outer * total * inner)?;
    if out.is_empty() {
        return Ok(out);
    }
    let _range = super::nvtx::range(OP);
    dev.bind(OP)?;
    let es = dtype.size_in_bytes();
    let pitch = total * inner * es;
    let mut col = 0;
    for (&(s, _), (&size, &start)) in parts.iter().zip(sizes.iter().zip(&starts)) {
        let width = size * inner * es;
        if width > 0 {
            copy_rows(
                dev,
                out.ptr() + col as u64,
                pitch,
                s.ptr_at(start),
                width,
                outer,
            )?;
        }
        col += width;
    }
    dev.checkpoint(OP)?;
    Ok(out)
}

/// Copies `rows` dense rows of `width` bytes from `src` to rows `pitch` bytes apart at `dst` (context bound).
fn copy_rows(
    dev: &CudaDevice,
    dst: sys::CUdeviceptr,
    pitch: usize,
    src: sys::CUdeviceptr,
    width: usize,
    rows: usize,
) -> Result<()> {
    const OP: &str = "cat";
    let stream = dev.cu_stream();
    let err = |e| driver_err(OP, e);
    if rows == 1 || width == pitch {
        // SAFETY: the source holds `rows * width` bytes and, with no gaps between the rows, so does the
        // destination from `dst`; the copy is ordered on the device's stream.
        return unsafe { result::memcpy_dtod_async(dst, src, rows * width, stream) }.map_err(err);
    }
    if pitch <= MAX_PITCH {
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: width,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: pitch,
            WidthInBytes: width,
            Height: rows,
        };
        // SAFETY: the descriptor names device memory only: `rows` rows of `width` bytes, `width` apart
        // at `src` and `pitch` (>= width) apart at `dst`, all inside their blocks; `copy` outlives the
        // call, which reads it before returning; the copy is ordered on the device's stream.
        return unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream) }
            .result()
            .map_err(err);
    }
    // A pitch past the driver's limit means rows of over 2 GiB, so there are few of them.
    for r in 0..rows {
        // SAFETY: row `r` is `width` bytes at `src + r * width` and at `dst + r * pitch`, inside their
        // blocks; the copy is ordered on the device's stream.
        unsafe {
            result::memcpy_dtod_async(
                dst + (r * pitch) as u64,
                src + (r * width) as u64,
                width,
                stream,
            )
        }
        .map_err(err)?;
    }
    Ok(())
}
