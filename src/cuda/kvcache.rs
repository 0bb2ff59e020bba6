//! Launchers for cuda/kvcache.cu: the device int8/int4 KV cache's fused quantize-and-append (new K or
//! V read through its 4-d strides, encoded exactly as the CPU's `quantize_int8` / `quantize_int4`) and
//! the decoding of its cached prefix into f32.

use super::index::float_kernel;
use super::launch::{grid_1d, launch, Arg};
use super::storage::CudaStorage;
use crate::cpu::kv_attention::KvFormat;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::LaunchConfig;

/// Threads per quantize block: eight warps, one cache row each.
const QUANT_THREADS: u32 = 256;
/// Threads per dequantize block (one output element each).
const DEQUANT_THREADS: u32 = 256;

fn dim_u32(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Cuda {
        op,
        msg: format!("dim of size {n} exceeds the kernel's 32-bit dims"),
    })
}

/// (int4?, group) of an integer format, checked against head_dim `d`, and the codes and scales
/// buffers checked to hold `rows` cache rows of that format.
fn check_cache(
    op: &'static str,
    format: KvFormat,
    d: usize,
    codes: &CudaStorage,
    scales: &CudaStorage,
    rows: usize,
) -> Result<(bool, usize)> {
    let (int4, group, code_dtype) = match format {
        KvFormat::Int8 { group } => (false, group, DType::I8),
        KvFormat::Int4 { group } => (true, group, DType::U8),
        KvFormat::F32 | KvFormat::F16 => {
            crate::bail!(op, "{format} is not an integer KV format")
        }
    };
    if d == 0 || group == 0 || !d.is_multiple_of(group) {
        crate::bail!(op, "{format}: the scale group must divide head_dim {d}");
    }
    for (s, want) in [(codes, code_dtype), (scales, DType::F16)] {
        if s.dtype() != want {
            return Err(Error::DTypeMismatch {
                op,
                lhs: want,
                rhs: s.dtype(),
            });
        }
    }
    let need = |per_row: usize| rows.checked_mul(per_row);
    let fits = need(format.codes_per_row(d)).is_some_and(|n| n <= codes.len())
        && need(format.scales_per_row(d)).is_some_and(|n| n <= scales.len());
    if !fits {
        crate::bail!(
            op,
            "{rows} rows of {format} with head_dim {d} do not fit in {} codes and {} scales",
            codes.len(),
            scales.len()
        );
    }
    Ok((int4, group))
}

/// Encodes x [b, h, t, d] (view `l`, any strides; f32, f16 or bf16) row by row as `format` and writes
/// row (bi, hi, ti) at cache row ((at + ti)·b + bi)·h + hi of `codes` (I8, or U8 for int4) and
/// `scales` (F16), in place (each made private first if another storage shares it).
pub fn quantize_append(
    x: &CudaStorage,
    l: &Layout,
    codes: &mut CudaStorage,
    scales: &mut CudaStorage,
    at: usize,
    format: KvFormat,
) -> Result<()> {
    const OP: &str = "kv_quantize_append";
    let &[b, h, t, d] = l.dims() else {
        crate::bail!(
            OP,
            "x must be [batch, heads, tokens, head_dim], got {:?}",
            l.dims()
        );
    };
    let names = match format {
        KvFormat::Int4 { .. } => [
            "kv_quantize_i4_f32",
            "kv_quantize_i4_f16",
            "kv_quantize_i4_bf16",
        ],
        _ => [
            "kv_quantize_i8_f32",
            "kv_quantize_i8_f16",
            "kv_quantize_i8_bf16",
        ],
    };
    let name = float_kernel(OP, x.dtype(), names)?;
    let end = at.checked_add(t).and_then(|n| n.checked_mul(b * h));
    let Some(end) = end else {
        crate::bail!(OP, "token position {at} + {t} overflows");
    };
    let (_, group) = check_cache(OP, format, d, codes, scales, end)?;
    super::copy::check_view(OP, x, l)?;
    let rows = b * h * t;
    if rows == 0 {
        return Ok(());
    }
    let ordinal = x.device().ordinal();
    if codes.device().ordinal() != ordinal || scales.device().ordinal() != ordinal {
        crate::bail!(OP, "x and the cache must be on one device");
    }
    codes.make_unique()?;
    scales.make_unique()?;
    let dev = x.device();
    let warps = (QUANT_THREADS / 32) as usize;
    let max_blocks = (dev.props().multiprocessors.max(1) * 32) as usize;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(warps).min(max_blocks) as u32, 1, 1),
        block_dim: (QUANT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let st = l.strides();
    launch(
        dev,
        OP,
        ("kvcache", name),
        cfg,
        &[
            Arg::from(x.ptr()),
            codes.ptr().into(),
            scales.ptr().into(),
            (l.offset() as u64).into(),
            (st[0] as u64).into(),
            (st[1] as u64).into(),
            (st[2] as u64).into(),
            (st[3] as u64).into(),
            dim_u32(OP, b)?.into(),
            dim_u32(OP, h)?.into(),
            dim_u32(OP, t)?.into(),
            dim_u32(OP, d)?.into(),
            dim_u32(OP, group)?.into(),
            (at as u64).into(),
        ],
    )
}

/// The first `rows` cache rows of `codes`/`scales` (as [`quantize_append`] writes them) decoded into
/// a new contiguous f32 [rows, d].
pub fn dequantize(
    codes: &CudaStorage,
    scales: &CudaStorage,
    rows: usize,
    d: usize,
    format: KvFormat,
) -> Result<CudaStorage> {
    const OP: &str = "kv_dequantize";
    let (int4, group) = check_cache(OP, format, d, codes, scales, rows)?;
    if codes.device().ordinal() != scales.device().ordinal() {
        crate::bail!(OP, "codes and scales must be on one device");
    }
    let n = rows * d;
    let dev = codes.device();
    let out = CudaStorage::uninit(dev, DType::F32, n)?;
    if n == 0 {
        return Ok(out);
    }
    let name = if int4 {
        "kv_dequantize_i4"
    } else {
        "kv_dequantize_i8"
    };
    launch(
        dev,
        OP,
        ("kvcache", name),
        grid_1d(dev, n, DEQUANT_THREADS),
        &[
            Arg::from(codes.ptr()),
            scales.ptr().into(),
            out.ptr().into(),
            (rows as u64).into(),
            dim_u32(OP, d)?.into(),
            dim_u32(OP, group)?.into(),
        ],
    )?;
    Ok(out)
}
