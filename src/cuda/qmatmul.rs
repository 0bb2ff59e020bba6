//! Packed low-bit matmul on the GPU: y[m, rows] = x[m, cols] · Ŵᵀ for a [`QTensor`] uploaded once as
//! [`CudaQWeights`]. Decode-sized inputs (m ≤ [`GEMV_MAX_M`]) run the GEMV kernels of cuda/qgemv.cu
//! (launcher `qgemv.rs`), which stream every weight byte once; larger ones run the tensor-core GEMM of
//! cuda/qgemm.cu (launcher `qgemm.rs`), which dequantizes weights in registers.
//!
//! The device layout is the CPU's, byte for byte (see `crate::quant::format`): the kernels read the
//! blocks as [`QTensor::data`] holds them, so a GGUF Q4_0/Q4_1 tensor is the same Int4 group-32 blocks on
//! both sides and an upload is one copy of each buffer.

use super::device::CudaDevice;
use super::storage::CudaStorage;
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::quant::{QFormat, QTensor};
use std::sync::Arc;

/// The largest m the GEMV kernels take; larger inputs go to the GEMM.
pub const GEMV_MAX_M: usize = 8;

/// A packed weight matrix on one device: the packed blocks, the scales and (Int4 asym, Binary with
/// offset) the mins, each exactly as [`QTensor`] holds them on the host.
#[derive(Clone)]
pub struct CudaQWeights {
    format: QFormat,
    rows: usize,
    cols: usize,
    /// `rows · row_bytes` packed bytes (U8).
    data: CudaStorage,
    /// `rows · groups_per_row` scales (F32).
    scales: CudaStorage,
    /// `rows · groups_per_row` mins (Int4 asym) or `rows` offsets (Binary with offset), F32; `None`
    /// for formats without.
    mins: Option<CudaStorage>,
}

impl CudaQWeights {
    /// Copies `q`'s packed bytes, scales and mins to `dev`.
    pub fn upload(dev: &Arc<CudaDevice>, q: &QTensor) -> Result<CudaQWeights> {
        let up = |s: CpuStorage, n: usize| CudaStorage::from_cpu(dev, &s, &Layout::contiguous(n));
        let data = up(CpuStorage::U8(q.data().to_vec()), q.data().len())?;
        let scales = up(CpuStorage::F32(q.scales().to_vec()), q.scales().len())?;
        let mins = if q.format().has_mins() {
            Some(up(CpuStorage::F32(q.mins().to_vec()), q.mins().len())?)
        } else {
            None
        };
        Ok(CudaQWeights {
            format: q.format(),
            rows: q.rows(),
            cols: q.cols(),
            data,
            scales,
            mins,
        })
    }

    /// A second copy of these weights on the same device (benchmarks rotate copies so that a matrix
    /// smaller than the L2 cache is still read from memory).
    pub fn duplicate(&self) -> Result<CudaQWeights> {
        let copy = |s: &CudaStorage| {
            let mut c = s.clone();
            c.make_unique().map(|()| c)
        };
        Ok(CudaQWeights {
            data: copy(&self.data)?,
            scales: copy(&self.scales)?,
            mins: self.mins.as_ref().map(copy).transpose()?,
            ..self.clone()
        })
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Output features (N).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (K).
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        self.data.device()
    }

    /// Packed bytes per row: whole blocks, the tail past `cols` padded with zero weights.
    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    /// Weights per scale (`cols` for per-row formats).
    pub fn group_size(&self) -> usize {
        self.format.group_size(self.cols)
    }

    pub fn groups_per_row(&self) -> usize {
        self.format.groups_per_row(self.cols)
    }

    pub fn data(&self) -> &CudaStorage {
        &self.data
    }

    pub fn scales(&self) -> &CudaStorage {
        &self.scales
    }

    pub fn mins(&self) -> Option<&CudaStorage> {
        self.mins.as_ref()
    }

    /// Device bytes held: packed data, scales and mins.
    pub fn byte_size(&self) -> usize {
        self.data.bytes() + self.scales.bytes() + self.mins.as_ref().map_or(0, CudaStorage::bytes)
    }

    /// Checks that `x` is `m` rows of `cols` floats on this matrix's device.
    pub fn check_input(&self, op: &'static str, x: &CudaStorage, m: usize) -> Result<()> {
        if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::UnsupportedDType {
                op,
                dtype: x.dtype(),
            });
        }
        if x.len() != m * self.cols {
            return Err(Error::ShapeMismatch {
                op,
                lhs: vec![m, x.len() / self.cols.max(1)],
                rhs: vec![self.rows, self.cols],
            });
        }
        if !Arc::ptr_eq(x.device(), self.device()) {
            crate::bail!(
                op,
                "activations on cuda:{} but packed weights on cuda:{}",
                x.device().ordinal(),
                self.device().ordinal()
            );
        }
        Ok(())
    }
}

/// y[m, rows] = x[m, cols] · Ŵᵀ for contiguous x (f32, f16 or bf16, `m · cols` elements); y has x's
/// dtype. GEMV kernels up to [`GEMV_MAX_M`] tokens, the tensor-core GEMM above.
pub fn qmatmul(w: &CudaQWeights, x: &CudaStorage, m: usize) -> Result<CudaStorage> {
    if m <= GEMV_MAX_M {
        super::qgemv::gemv(w, x, m)
    } else {
        super::qgemm::gemm(w, x, m)
    }
}
