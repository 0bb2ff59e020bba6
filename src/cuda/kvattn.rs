//! Launchers for cuda/kvattn.cu: flash-decoding attention of one query token per head over the dense
//! KV cache's codes in place (every [`KvFormat`]), split over the sequence and merged in split order.

use super::index::{contiguous, float_kernel};
use super::launch::{launch, Arg};
use super::storage::CudaStorage;
use crate::cpu::kv_attention::KvFormat;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::LaunchConfig;

/// Threads of a split block (`KVA_THREADS` in cuda/kvattn.cu, as are the three below).
const SPLIT_THREADS: u32 = 128;
/// Tokens per tile; chunks are whole tiles.
const TILE: usize = 32;
/// Query heads per split block: a larger group takes several blocks per kv head.
const HEADS_PER_BLOCK: usize = 8;
/// Largest head_dim the kernels hold in registers and shared memory.
pub const MAX_HEAD_DIM: usize = 256;
/// Fewest tokens per split: below this the merge costs more than the parallelism gains.
const MIN_CHUNK: usize = 2 * TILE;
/// Most splits per sequence (the grid's y dim allows 65535; more only grows the workspace).
const MAX_SPLITS: usize = 1024;
/// Threads of a combine block (one output row each).
const COMBINE_THREADS: u32 = 128;

/// One of the cache's K or V buffers: codes and, for the integer formats, f16 scales.
pub struct KvBuffer<'a> {
    pub codes: &'a CudaStorage,
    pub scales: Option<&'a CudaStorage>,
}

/// The cache's shape: `batch` sequences, `heads` kv heads of `head_dim`, `len` tokens written.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub len: usize,
}

fn dim_u32(op: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Cuda {
        op,
        msg: format!("dim of size {n} exceeds the kernel's 32-bit dims"),
    })
}

/// (splits, chunk): enough blocks to fill the device twice over when the sequence allows, chunks of
/// whole tiles and at least [`MIN_CHUNK`] tokens (one chunk when the sequence is shorter), no empty
/// split.
fn plan(len: usize, blocks: usize, sms: usize) -> (usize, usize) {
    let want = (2 * sms).div_ceil(blocks.max(1));
    let splits = want.min(len.div_ceil(MIN_CHUNK)).clamp(1, MAX_SPLITS);
    let chunk = len.div_ceil(splits).div_ceil(TILE) * TILE;
    (len.div_ceil(chunk), chunk)
}

/// The kernel-name stem of a format and its codes' dtype.
fn format_parts(format: KvFormat) -> (&'static str, DType) {
    match format {
        KvFormat::F32 => ("f32", DType::F32),
        KvFormat::F16 => ("f16", DType::F16),
        KvFormat::Int8 { .. } => ("i8", DType::I8),
        KvFormat::Int4 { .. } => ("i4", DType::U8),
    }
}

/// softmax(q·kᵀ·`scale`)·v for q [batch, q_heads, 1, head_dim] (view `ql`, f32, f16 or bf16) over the
/// first `shape.len` tokens of a dense cache whose K and V are laid out `[capacity, batch, heads,
/// codes_per_row]` in `format` (scales `[capacity, batch, heads, scales_per_row]`); query head h reads kv
/// head h / (q_heads / heads). Returns a new contiguous [batch, q_heads, 1, head_dim] in q's dtype.
pub fn attend(
    q: &CudaStorage,
    ql: &Layout,
    k: KvBuffer,
    v: KvBuffer,
    shape: KvShape,
    format: KvFormat,
    scale: f32,
) -> Result<CudaStorage> {
    const OP: &str = "kv_attend";
    let KvShape {
        batch,
        heads,
        head_dim: d,
        len,
    } = shape;
    let &[b, q_heads, 1, qd] = ql.dims() else {
        crate::bail!(
            OP,
            "q must be [batch, q_heads, 1, head_dim], got {:?}",
            ql.dims()
        );
    };
    if b != batch || qd != d || heads == 0 || q_heads == 0 || !q_heads.is_multiple_of(heads) {
        crate::bail!(
            OP,
            "q {:?} against a cache of [batch {batch}, kv heads {heads}, head_dim {d}]",
            ql.dims()
        );
    }
    if d == 0 || d > MAX_HEAD_DIM {
        crate::bail!(OP, "head_dim must be 1..={MAX_HEAD_DIM}, got {d}");
    }
    if len == 0 {
        crate::bail!(OP, "the cache holds no tokens");
    }
    if !scale.is_finite() {
        crate::bail!(OP, "scale must be finite, got {scale}");
    }
    let group = match format.group() {
        Some(g) if g == 0 || !d.is_multiple_of(g) => {
            crate::bail!(OP, "{format}: the scale group must divide head_dim {d}")
        }
        Some(g) => g,
        None => d,
    };
    let (stem, code_dtype) = format_parts(format);
    let rows = len.checked_mul(batch * heads);
    for (name, buf) in [("K", &k), ("V", &v)] {
        if buf.codes.dtype() != code_dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: code_dtype,
                rhs: buf.codes.dtype(),
            });
        }
        let need = |per_row: usize| rows.and_then(|r| r.checked_mul(per_row));
        let codes_fit = need(format.codes_per_row(d)).is_some_and(|n| n <= buf.codes.len());
        let scales_fit = match (format.group(), buf.scales) {
            (None, None) => true,
            (Some(_), Some(s)) if s.dtype() == DType::F16 => {
                need(format.scales_per_row(d)).is_some_and(|n| n <= s.len())
            }
            _ => false,
        };
        if !codes_fit || !scales_fit {
            crate::bail!(
                OP,
                "{name} does not hold {len} tokens of [batch {batch}, heads {heads}, head_dim {d}] \
                 as {format} (F16 scales exactly for the integer formats)"
            );
        }
    }
    let ordinal = q.device().ordinal();
    let on_device = [k.codes, v.codes]
        .into_iter()
        .chain(k.scales)
        .chain(v.scales)
        .all(|s| s.device().ordinal() == ordinal);
    if !on_device {
        crate::bail!(OP, "q and the cache must be on one device");
    }
    let names = match stem {
        "f32" => [
            "kvattn_split_f32_f32",
            "kvattn_split_f32_f16",
            "kvattn_split_f32_bf16",
        ],
        "f16" => [
            "kvattn_split_f16_f32",
            "kvattn_split_f16_f16",
            "kvattn_split_f16_bf16",
        ],
        "i8" => [
            "kvattn_split_i8_f32",
            "kvattn_split_i8_f16",
            "kvattn_split_i8_bf16",
        ],
        _ => [
            "kvattn_split_i4_f32",
            "kvattn_split_i4_f16",
            "kvattn_split_i4_bf16",
        ],
    };
    let split_name = float_kernel(OP, q.dtype(), names)?;
    let combine_name = float_kernel(
        OP,
        q.dtype(),
        [
            "kvattn_combine_f32",
            "kvattn_combine_f16",
            "kvattn_combine_bf16",
        ],
    )?;

    let dev = q.device();
    let slices = (q_heads / heads).div_ceil(HEADS_PER_BLOCK);
    let sms = dev.props().multiprocessors.max(1) as usize;
    let (splits, chunk) = plan(len, batch * heads * slices, sms);
    let q_rows = batch * q_heads;
    let (qc, q0) = contiguous(q, ql)?;
    let ml = CudaStorage::uninit(dev, DType::F32, q_rows * splits * 2)?;
    let acc = CudaStorage::uninit(dev, DType::F32, q_rows * splits * d)?;
    let out = CudaStorage::uninit(dev, q.dtype(), q_rows * d)?;
    // The float formats have no scales; the kernels never read this pointer for them.
    let scales_ptr = |s: Option<&CudaStorage>| s.map_or(0, |s| s.ptr());
    launch(
        dev,
        OP,
        ("kvattn", split_name),
        LaunchConfig {
            grid_dim: (
                dim_u32(OP, batch * heads)?,
                dim_u32(OP, splits)?,
                dim_u32(OP, slices)?,
            ),
            block_dim: (SPLIT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::from(qc.ptr_at(q0)),
            k.codes.ptr().into(),
            scales_ptr(k.scales).into(),
            v.codes.ptr().into(),
            scales_ptr(v.scales).into(),
            ml.ptr().into(),
            acc.ptr().into(),
            dim_u32(OP, batch)?.into(),
            dim_u32(OP, heads)?.into(),
            dim_u32(OP, q_heads)?.into(),
            dim_u32(OP, d)?.into(),
            dim_u32(OP, group)?.into(),
            dim_u32(OP, len)?.into(),
            dim_u32(OP, chunk)?.into(),
            scale.into(),
        ],
    )?;
    launch(
        dev,
        OP,
        ("kvattn", combine_name),
        LaunchConfig {
            grid_dim: (dim_u32(OP, q_rows)?, 1, 1),
            block_dim: (COMBINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::from(ml.ptr()),
            acc.ptr().into(),
            out.ptr().into(),
            dim_u32(OP, d)?.into(),
            dim_u32(OP, splits)?.into(),
        ],
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_the_sequence_with_whole_tiles() {
        for len in [1, 7, 31, 32, 33, 64, 1000, 4097, 1 << 20] {
            for blocks in [1, 2, 6, 64, 1000] {
                let (splits, chunk) = plan(len, blocks, 132);
                assert!(chunk.is_multiple_of(TILE) && (1..=MAX_SPLITS).contains(&splits));
                assert!(
                    (splits - 1) * chunk < len && len <= splits * chunk,
                    "{len} {blocks}"
                );
            }
        }
    }
}
