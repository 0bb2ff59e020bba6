//! Launchers for the flash attention kernels: cuda/flash_fwd.cu (forward, saving the log-sum-exp) and
//! cuda/flash_bwd.cu (backward: a row-dot preprocess, a key-block kernel owning dK/dV and adding into
//! an f32 dQ, and dQ's conversion). q [batch, sq, heads, D], k and v [batch, sk, kv_heads, D], f16 or
//! bf16, D 64 or 128; the masks follow the CPU kernel's rules (src/ops/attention.rs), shared with the
//! kernels through cuda/flash.cuh.

use super::copy::copy_strided;
use super::launch::{grid_1d, launch, Arg};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use cudarc::driver::{DeviceRepr, LaunchConfig};
use std::sync::Arc;

/// Query rows per forward block (`BM` in cuda/flash_fwd.cu); the block has 8 warps of 16 rows.
const FWD_ROWS: usize = 128;
/// Keys per backward block (`BN` in cuda/flash_bwd.cu), 16 per warp.
const BWD_KEYS: usize = 128;
/// Query rows the backward preprocess handles per block (one warp each).
const PRE_ROWS: usize = 8;
/// Threads of every flash block.
const THREADS: u32 = 256;

/// The parameter block of cuda/flash.cuh (`struct FlashParams`), field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FlashParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub dout: u64,
    pub lse: u64,
    pub delta: u64,
    pub dq_acc: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub key_valid: u64,
    pub doc_lo: u64,
    pub doc_hi: u64,
    pub batch: u32,
    pub sq: u32,
    pub sk: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub causal: i32,
    pub window: i32,
    pub scale: f32,
    pub scale_log2: f32,
    pub pad: u32,
}

// SAFETY: repr(C) plain data with the field order, types and alignment of `struct FlashParams` in
// cuda/flash.cuh; it is passed by value as a kernel parameter.
unsafe impl DeviceRepr for FlashParams {}

// The driver copies a by-value parameter with the size the PTX declares (`.align 8 .b8 [152]`, checked
// against the PTX by the tests below).
const _: () =
    assert!(std::mem::size_of::<FlashParams>() == 152 && std::mem::align_of::<FlashParams>() == 8);

/// The problem's dims: q [batch, sq, heads, head_dim], k and v [batch, sk, kv_heads, head_dim].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashShape {
    pub batch: usize,
    pub sq: usize,
    pub sk: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl FlashShape {
    /// q's (and o's) dims: [batch, sq, heads, head_dim].
    pub fn q_dims(&self) -> [usize; 4] {
        [self.batch, self.sq, self.heads, self.head_dim]
    }

    /// k's and v's dims: [batch, sk, kv_heads, head_dim].
    pub fn kv_dims(&self) -> [usize; 4] {
        [self.batch, self.sk, self.kv_heads, self.head_dim]
    }

    /// Rows of the log-sum-exp: batch · heads · sq.
    fn lse_len(&self) -> usize {
        self.batch * self.heads * self.sq
    }
}

/// Whether the kernels take inputs of `dtype` with heads of `head_dim`.
pub fn supports(dtype: DType, head_dim: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16) && matches!(head_dim, 64 | 128)
}

/// Which keys each query sees, on the device: causality, a sliding window, key padding and the
/// documents of packed sequences (the CPU kernel's `Mask`), uploaded once for forward and backward.
pub struct FlashMask {
    causal: bool,
    window: i32,
    key_valid: Option<CudaStorage>,
    docs: Option<(CudaStorage, CudaStorage)>,
}

/// For each key j of each sequence, the keys [lo, hi) of its document, a document being a maximal run of
/// equal consecutive ids (the CPU kernel's definition). `segments` is [batch, sk].
pub fn document_ranges(segments: &[i64], batch: usize, sk: usize) -> (Vec<i32>, Vec<i32>) {
    let mut lo = vec![0i32; batch * sk];
    let mut hi = vec![0i32; batch * sk];
    for b in 0..batch {
        let row = &segments[b * sk..(b + 1) * sk];
        let mut start = 0;
        while start < sk {
            let end = start
                + row[start..]
                    .iter()
                    .take_while(|&&x| x == row[start])
                    .count();
            for j in start..end {
                lo[b * sk + j] = start as i32;
                hi[b * sk + j] = end as i32;
            }
            start = end;
        }
    }
    (lo, hi)
}

impl FlashMask {
    /// Uploads the mask of `shape` to `dev`: `key_valid` [batch, sk] (0 = padding) and `segments`
    /// [batch, sk] document ids, both optional; `window` as in `AttentionOptions`.
    pub fn new(
        dev: &Arc<super::device::CudaDevice>,
        shape: FlashShape,
        causal: bool,
        window: Option<usize>,
        key_valid: Option<&[u8]>,
        segments: Option<&[i64]>,
    ) -> Result<FlashMask> {
        const OP: &str = "flash_attention";
        let n = shape.batch * shape.sk;
        let upload = |cpu: crate::cpu::CpuStorage| -> Result<CudaStorage> {
            CudaStorage::from_cpu(dev, &cpu, &Layout::contiguous(n))
        };
        let key_valid = match key_valid {
            Some(kv) if kv.len() != n => {
                crate::bail!(OP, "key padding holds {} flags for {n} keys", kv.len())
            }
            Some(kv) => Some(upload(crate::cpu::CpuStorage::U8(kv.to_vec()))?),
            None => None,
        };
        let docs = match segments {
            Some(s) if s.len() != n => {
                crate::bail!(OP, "segments hold {} ids for {n} keys", s.len())
            }
            Some(s) => {
                let (lo, hi) = document_ranges(s, shape.batch, shape.sk);
                Some((
                    upload(crate::cpu::CpuStorage::I32(lo))?,
                    upload(crate::cpu::CpuStorage::I32(hi))?,
                ))
            }
            None => None,
        };
        // A window past every distance is no window; the kernels take it as an i32.
        let window = match window {
            Some(0) => crate::bail!(OP, "a sliding window must hold at least one key"),
            Some(w) if w < shape.sq + shape.sk => i32::try_from(w).unwrap_or(0),
            _ => 0,
        };
        Ok(FlashMask {
            causal,
            window,
            key_valid,
            docs,
        })
    }
}

fn dim_u32(op: &'static str, what: &str, n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n <= i32::MAX as u32)
        .ok_or_else(|| Error::Cuda {
            op,
            msg: format!("{what} of {n} exceeds the kernels' 31-bit dims"),
        })
}

/// The device address of a contiguous, 16-byte aligned copy of a view (cp.async moves 16-byte granules),
/// with the storage that keeps it alive.
fn operand(op: &'static str, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, u64)> {
    if let Some(r) = l.contiguous_range() {
        let ptr = x.ptr_at(r.start);
        if ptr.is_multiple_of(16) {
            return Ok((x.clone(), ptr));
        }
    }
    let c = copy_strided(x, l)?;
    let ptr = c.ptr();
    if !ptr.is_multiple_of(16) {
        return Err(Error::Cuda {
            op,
            msg: "the allocator returned a block that is not 16-byte aligned".into(),
        });
    }
    Ok((c, ptr))
}

/// Checks dtypes, devices, layouts and dims against `shape`, and fills the parameter block's dims and
/// mask. Returns the kernel-name suffix (`f16_d64` …) index into [f16_d64, f16_d128, bf16_d64, bf16_d128].
fn check(
    op: &'static str,
    shape: FlashShape,
    views: &[(&CudaStorage, &Layout, &[usize])],
    mask: &FlashMask,
    scale: f32,
) -> Result<(FlashParams, usize)> {
    let dtype = views[0].0.dtype();
    if !supports(dtype, shape.head_dim) {
        crate::bail!(
            op,
            "the flash kernels take f16 or bf16 with head_dim 64 or 128, got {dtype:?} and {}",
            shape.head_dim
        );
    }
    let ordinal = views[0].0.device().ordinal();
    for (s, l, dims) in views {
        if s.dtype() != dtype {
            return Err(Error::DTypeMismatch {
                op,
                lhs: dtype,
                rhs: s.dtype(),
            });
        }
        if s.device().ordinal() != ordinal {
            crate::bail!(op, "every input must be on one device");
        }
        if l.dims() != *dims {
            return Err(Error::ShapeMismatch {
                op,
                lhs: dims.to_vec(),
                rhs: l.dims().to_vec(),
            });
        }
    }
    let FlashShape {
        batch,
        sq,
        sk,
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        crate::bail!(
            op,
            "heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})"
        );
    }
    if batch > 65535 || heads > 65535 {
        crate::bail!(
            op,
            "batch ({batch}) and heads ({heads}) must fit a grid dim (65535)"
        );
    }
    if !scale.is_finite() {
        crate::bail!(op, "scale must be finite, got {scale}");
    }
    // Element offsets inside one sequence must fit the kernels' int arithmetic on rows.
    dim_u32(op, "q rows", sq.saturating_mul(heads * head_dim))?;
    dim_u32(op, "k rows", sk.saturating_mul(kv_heads * head_dim))?;
    let p = FlashParams {
        key_valid: mask.key_valid.as_ref().map_or(0, |s| s.ptr()),
        doc_lo: mask.docs.as_ref().map_or(0, |d| d.0.ptr()),
        doc_hi: mask.docs.as_ref().map_or(0, |d| d.1.ptr()),
        batch: batch as u32,
        sq: dim_u32(op, "q_len", sq)?,
        sk: dim_u32(op, "kv_len", sk)?,
        heads: heads as u32,
        kv_heads: kv_heads as u32,
        causal: i32::from(mask.causal),
        window: mask.window,
        scale,
        scale_log2: scale * std::f32::consts::LOG2_E,
        ..FlashParams::default()
    };
    let variant = usize::from(dtype == DType::BF16) * 2 + usize::from(head_dim == 128);
    Ok((p, variant))
}

fn config(grid: (usize, usize, usize), smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// The forward: o [batch, sq, heads, D] in the inputs' dtype and lse [batch, heads, sq] f32 (the natural
/// log of each query's softmax denominator over scaled scores, −∞ for a query that sees no key, whose
/// output is zero).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    shape: FlashShape,
    mask: &FlashMask,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    const OP: &str = "flash_attention";
    let (qd, kd) = (shape.q_dims(), shape.kv_dims());
    let [batch, sq, heads, d] = qd;
    let (mut p, variant) = check(
        OP,
        shape,
        &[(q.0, q.1, &qd), (k.0, k.1, &kd), (v.0, v.1, &kd)],
        mask,
        scale,
    )?;
    let dev = q.0.device();
    let o = CudaStorage::uninit(dev, q.0.dtype(), qd.iter().product())?;
    let lse = CudaStorage::uninit(dev, DType::F32, shape.lse_len())?;
    if o.is_empty() {
        return Ok((o, lse));
    }
    let (_q, qp) = operand(OP, q.0, q.1)?;
    let (_k, kp) = if shape.sk == 0 {
        (o.clone(), o.ptr())
    } else {
        operand(OP, k.0, k.1)?
    };
    let (_v, vp) = if shape.sk == 0 {
        (o.clone(), o.ptr())
    } else {
        operand(OP, v.0, v.1)?
    };
    p.q = qp;
    p.k = kp;
    p.v = vp;
    p.o = o.ptr();
    p.lse = lse.ptr();
    let names = [
        "flash_fwd_f16_d64",
        "flash_fwd_f16_d128",
        "flash_fwd_bf16_d64",
        "flash_fwd_bf16_d128",
    ];
    launch(
        dev,
        OP,
        ("flash_fwd", names[variant]),
        config((sq.div_ceil(FWD_ROWS), heads, batch), fwd_smem(d)),
        &[Arg::Flash(p)],
    )?;
    Ok((o, lse))
}

/// Dynamic shared memory of a forward block: the Q tile and double-buffered K and V tiles of 64 keys.
fn fwd_smem(d: usize) -> usize {
    (FWD_ROWS + 4 * 64) * d * 2
}

/// Dynamic shared memory of a backward block: K and V of its 128 keys, double-buffered Q and dO tiles of
/// 32 queries, the 16-bit dSᵀ tile, and per step (two buffers) each query's lse, delta and key range.
fn bwd_smem(d: usize) -> usize {
    (2 * BWD_KEYS + 4 * 32) * d * 2 + BWD_KEYS * 32 * 2 + 2 * 4 * 32 * 4
}

/// The backward of [`forward`] given its output `o`, `lse` and the output's gradient `dout`: (dq, dk, dv)
/// in the inputs' dtype and shapes. dk and dv of a kv head sum over its query heads.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    o: (&CudaStorage, &Layout),
    lse: &CudaStorage,
    dout: (&CudaStorage, &Layout),
    shape: FlashShape,
    mask: &FlashMask,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    const OP: &str = "flash_attention backward";
    let (qd, kd) = (shape.q_dims(), shape.kv_dims());
    let [_, sk, kv_heads, _] = kd;
    let (mut p, variant) = check(
        OP,
        shape,
        &[
            (q.0, q.1, &qd),
            (k.0, k.1, &kd),
            (v.0, v.1, &kd),
            (o.0, o.1, &qd),
            (dout.0, dout.1, &qd),
        ],
        mask,
        scale,
    )?;
    if lse.dtype() != DType::F32 || lse.len() != shape.lse_len() {
        crate::bail!(
            OP,
            "lse must be the forward's f32 [batch, heads, q_len], got {} {:?} elements",
            lse.len(),
            lse.dtype()
        );
    }
    let dev = q.0.device();
    let dtype = q.0.dtype();
    let dq = CudaStorage::uninit(dev, dtype, qd.iter().product())?;
    let dk = CudaStorage::uninit(dev, dtype, kd.iter().product())?;
    let dv = CudaStorage::uninit(dev, dtype, kd.iter().product())?;
    if dq.is_empty() || dk.is_empty() {
        // No query sees a key: every gradient is zero.
        let zeros = |n| CudaStorage::zeros(dev, dtype, n);
        return Ok((zeros(dq.len())?, zeros(dk.len())?, zeros(dv.len())?));
    }
    let delta = CudaStorage::uninit(dev, DType::F32, shape.lse_len())?;
    let dq_acc = CudaStorage::uninit(dev, DType::F32, dq.len())?;
    let views = [q, k, v, o, dout].map(|(s, l)| operand(OP, s, l));
    let [q_, k_, v_, o_, do_] = views;
    let (_keep, ptrs): (Vec<CudaStorage>, Vec<u64>) =
        [q_?, k_?, v_?, o_?, do_?].into_iter().unzip();
    p.q = ptrs[0];
    p.k = ptrs[1];
    p.v = ptrs[2];
    p.o = ptrs[3];
    p.dout = ptrs[4];
    p.lse = lse.ptr();
    p.delta = delta.ptr();
    p.dq_acc = dq_acc.ptr();
    p.dq = dq.ptr();
    p.dk = dk.ptr();
    p.dv = dv.ptr();
    let pick = |names: [&'static str; 4]| names[variant];
    let rows = shape.lse_len();
    launch(
        dev,
        OP,
        (
            "flash_bwd",
            pick([
                "flash_bwd_pre_f16_d64",
                "flash_bwd_pre_f16_d128",
                "flash_bwd_pre_bf16_d64",
                "flash_bwd_pre_bf16_d128",
            ]),
        ),
        config((rows.div_ceil(PRE_ROWS).min(1 << 20), 1, 1), 0),
        &[Arg::Flash(p)],
    )?;
    launch(
        dev,
        OP,
        (
            "flash_bwd",
            pick([
                "flash_bwd_f16_d64",
                "flash_bwd_f16_d128",
                "flash_bwd_bf16_d64",
                "flash_bwd_bf16_d128",
            ]),
        ),
        config(
            (sk.div_ceil(BWD_KEYS), kv_heads, shape.batch),
            bwd_smem(shape.head_dim),
        ),
        &[Arg::Flash(p)],
    )?;
    launch(
        dev,
        OP,
        (
            "flash_bwd",
            pick([
                "flash_bwd_dq_f16_d64",
                "flash_bwd_dq_f16_d128",
                "flash_bwd_dq_bf16_d64",
                "flash_bwd_dq_bf16_d128",
            ]),
        ),
        // Each thread converts two elements per iteration.
        grid_1d(dev, dq.len() / 2, THREADS),
        &[Arg::Flash(p)],
    )?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_maximal_runs_of_equal_ids() {
        let seg = [
            0, 0, 1, 1, 1, 0, 7, 7, /* batch 1 */ 3, 3, 3, 3, 3, 3, 3, 3,
        ];
        let (lo, hi) = document_ranges(&seg, 2, 8);
        assert_eq!(lo, [0, 0, 2, 2, 2, 5, 6, 6, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(hi, [2, 2, 5, 5, 5, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]);
    }

    /// The driver copies as many parameter bytes as the PTX declares: every flash kernel must declare
    /// exactly `FlashParams`' size.
    #[test]
    fn kernels_take_the_parameter_block_by_value() {
        let size = std::mem::size_of::<FlashParams>();
        for module in ["flash_fwd", "flash_bwd"] {
            let ptx = crate::cuda::ptx::source(module).expect("module");
            let entries: Vec<&str> = ptx
                .lines()
                .filter(|l| l.contains(".entry flash_"))
                .collect();
            assert!(!entries.is_empty(), "{module} has no flash kernels");
            let params: Vec<&str> = ptx
                .lines()
                .filter(|l| l.contains(".param .align 8 .b8 flash_"))
                .collect();
            assert_eq!(params.len(), entries.len(), "{module}: {params:?}");
            for l in params {
                assert!(l.contains(&format!("_param_0[{size}]")), "{module}: {l}");
            }
        }
    }

    #[test]
    fn shared_memory_fits_an_sm80_block() {
        for d in [64, 128] {
            assert!(fwd_smem(d) <= 163 * 1024 && bwd_smem(d) <= 163 * 1024);
        }
        assert_eq!(fwd_smem(128), 96 * 1024);
        // cuda/flash_bwd.cu: 768·D + 9216 bytes.
        assert_eq!(bwd_smem(64), 768 * 64 + 9216);
    }
}
