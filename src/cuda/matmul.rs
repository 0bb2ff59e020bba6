//! Dense batched matmul through cuBLAS (`cublasGemmStridedBatchedEx`): f32 (exact, or TF32 tensor cores
//! after [`set_tf32`]), f16 and bf16 with f32 accumulation. Transposed operands are passed to cuBLAS as
//! transposes rather than copied.

use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas, sys};
use std::sync::atomic::{AtomicBool, Ordering};

static TF32: AtomicBool = AtomicBool::new(false);

/// Lets f32 matmuls use TF32 tensor cores (10-bit mantissa inputs, f32 accumulation): about 8x the f32
/// throughput on an H100, relative error around 5e-4 instead of 1e-6. Off by default, as in PyTorch.
pub fn set_tf32(on: bool) {
    TF32.store(on, Ordering::Relaxed);
}

pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// One operand as cuBLAS reads it: transposed or not, its leading dimension, and whether a contiguous
/// copy is needed first.
#[derive(Debug, PartialEq, Eq)]
enum Operand {
    Direct { trans: bool, ld: usize },
    NeedsCopy,
}

/// How to hand cuBLAS the row-major `rows x cols` matrix with strides (rs, cs) as the column-major
/// `cols x rows` matrix it computes with (row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ).
fn operand(rows: usize, cols: usize, rs: usize, cs: usize) -> Operand {
    // A dim of size 1 never steps, so its stride is free: pick the one that makes the view valid.
    let rs_ok = rows <= 1 || rs >= cols.max(1);
    let cs_ok = cols <= 1 || cs >= rows.max(1);
    if (cs == 1 || cols <= 1) && rs_ok {
        Operand::Direct {
            trans: false,
            ld: rs.max(cols).max(1),
        }
    } else if (rs == 1 || rows <= 1) && cs_ok {
        Operand::Direct {
            trans: true,
            ld: cs.max(rows).max(1),
        }
    } else {
        Operand::NeedsCopy
    }
}

/// A `[batch, rows, cols]` view of a storage: element (b, i, j) at `off + b·bs + i·rs + j·cs`.
pub struct MatView<'a> {
    pub storage: &'a CudaStorage,
    pub off: usize,
    pub bs: usize,
    pub rs: usize,
    pub cs: usize,
}

/// `[batch, m, k] x [batch, k, n]` into a new contiguous `[batch, m, n]` of the inputs' dtype.
pub fn matmul(
    a: MatView<'_>,
    b: MatView<'_>,
    (batch, m, n, k): (usize, usize, usize, usize),
) -> Result<CudaStorage> {
    let dtype = a.storage.dtype();
    if b.storage.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op: "matmul",
            lhs: dtype,
            rhs: b.storage.dtype(),
        });
    }
    let (data_type, compute) = match dtype {
        DType::F32 if tf32() => (
            sys::cudaDataType::CUDA_R_32F,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        ),
        DType::F32 => (
            sys::cudaDataType::CUDA_R_32F,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::F16 => (
            sys::cudaDataType::CUDA_R_16F,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::BF16 => (
            sys::cudaDataType::CUDA_R_16BF,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        _ => {
            return Err(Error::UnsupportedDType {
                op: "matmul",
                dtype,
            })
        }
    };
    let dev = a.storage.device().clone();
    let out_len = batch * m * n;
    if k == 0 {
        return CudaStorage::zeros(&dev, dtype, out_len);
    }
    let out = CudaStorage::uninit(&dev, dtype, out_len)?;
    if out_len == 0 {
        return Ok(out);
    }
    // Operands cuBLAS cannot read in place (both strides > 1, or overlapping rows) are packed first.
    let pack =
        |v: &MatView<'_>, rows: usize, cols: usize| -> Result<(CudaStorage, usize, usize, usize)> {
            let layout = crate::layout::Layout::new(
                crate::shape::Shape::from(vec![batch, rows, cols]),
                vec![v.bs, v.rs, v.cs],
                v.off,
            );
            let packed = super::copy::copy_strided(v.storage, &layout)?;
            Ok((packed, 0, rows * cols, cols))
        };
    let (a_pack, b_pack);
    let (a_st, a_off, a_bs, a_trans, a_ld) = match operand(m, k, a.rs, a.cs) {
        Operand::Direct { trans, ld } => (a.storage, a.off, a.bs, trans, ld),
        Operand::NeedsCopy => {
            let (s, off, bs, ld) = pack(&a, m, k)?;
            a_pack = s;
            (&a_pack, off, bs, false, ld)
        }
    };
    let (b_st, b_off, b_bs, b_trans, b_ld) = match operand(k, n, b.rs, b.cs) {
        Operand::Direct { trans, ld } => (b.storage, b.off, b.bs, trans, ld),
        Operand::NeedsCopy => {
            let (s, off, bs, ld) = pack(&b, k, n)?;
            b_pack = s;
            (&b_pack, off, bs, false, ld)
        }
    };
    let int = |v: usize, what: &str| -> Result<i32> {
        i32::try_from(v).map_err(|_| Error::Cuda {
            op: "matmul",
            msg: format!("{what} {v} exceeds cuBLAS's 32-bit sizes"),
        })
    };
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
    let (lda, ldb, batch_i) = (int(b_ld, "ld")?, int(a_ld, "ld")?, int(batch, "batch")?);
    let _range = super::nvtx::range("matmul");
    dev.with_blas("matmul", |h| {
        // SAFETY: the column-major problem Cᵀ[n, m] = op(B)ᵀ·op(A)ᵀ reads b_st from b_off and a_st from
        // a_off within their blocks (the views were bounds-checked by the tensor layer), writes the m·n
        // elements of each of the `batch` outputs of `out`, and runs on the device's stream.
        unsafe {
            blas::gemm_strided_batched_ex(
                *h.handle(),
                op(b_trans),
                op(a_trans),
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                b_st.ptr_at(b_off) as *const _,
                data_type,
                lda,
                b_bs as i64,
                a_st.ptr_at(a_off) as *const _,
                data_type,
                ldb,
                a_bs as i64,
                (&beta) as *const f32 as *const _,
                out.ptr() as *mut _,
                data_type,
                ni,
                (m * n) as i64,
                batch_i,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cuda {
            op: "matmul",
            msg: format!("cublasGemmStridedBatchedEx ({batch}x[{m}x{k}]·[{k}x{n}], {dtype}): {e}"),
        })
    })?;
    dev.checkpoint("matmul")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{operand, Operand};

    #[test]
    fn operands_map_to_cublas_transposes() {
        // Row-major [3, 4]: cuBLAS reads it untransposed with ld 4.
        assert_eq!(
            operand(3, 4, 4, 1),
            Operand::Direct {
                trans: false,
                ld: 4
            }
        );
        // The transpose view of a row-major [4, 3] (strides 1, 3): transposed, ld 3.
        assert_eq!(operand(3, 4, 1, 3), Operand::Direct { trans: true, ld: 3 });
        // A row of a wider matrix (ld larger than cols).
        assert_eq!(
            operand(3, 4, 10, 1),
            Operand::Direct {
                trans: false,
                ld: 10
            }
        );
        // Size-1 dims: any stride works.
        assert_eq!(
            operand(1, 4, 0, 1),
            Operand::Direct {
                trans: false,
                ld: 4
            }
        );
        assert_eq!(
            operand(3, 1, 1, 0),
            Operand::Direct {
                trans: false,
                ld: 1
            }
        );
        // Broadcast rows (stride 0) or doubly strided views need a copy.
        assert_eq!(operand(3, 4, 0, 1), Operand::NeedsCopy);
        assert_eq!(operand(3, 4, 8, 2), Operand::NeedsCopy);
    }
}
