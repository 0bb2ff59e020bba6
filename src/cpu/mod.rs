//! CPU storage and kernels, one file per op family. Kernels compute in f32; the storage layer converts
//! f16/bf16 at the boundary.

pub mod attention;
pub mod elementwise;
pub mod index;
pub mod kv_attention;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod qmatmul;
pub mod reduce;
pub mod rope;
pub mod simd;
pub mod softmax;

use crate::dtype::DType;
use crate::layout::Layout;
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::Arc;

/// Work below this many elements runs on the calling thread: rayon's fork/join costs more than it saves.
pub const PAR_THRESHOLD: usize = 1 << 15;

/// Makes the C allocator keep freed memory for reuse instead of returning it to the kernel.
///
/// A training step allocates and frees the same large activation and gradient buffers (megabytes each)
/// every step. By default glibc serves such blocks with fresh `mmap`s (or trims them off the heap when
/// freed), so every step pays a page fault and a kernel page-clear per 4 KiB touched: about a fifth of
/// the demo model's CPU training step. Raising the mmap and trim thresholds keeps those pages mapped, at
/// the cost of holding on to the process's peak heap. The thresholds are process-wide, so this is for
/// the owner of the process (a binary's `main`) to opt into; elsewhere it does nothing.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc caps the mmap threshold at 32 MiB on 64-bit targets; blocks above it still get their own
        // mapping. The trim threshold has no cap.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt only adjusts allocator tunables; both parameters are valid for glibc and any
        // value is accepted (out-of-range ones are rejected with a 0 return, leaving the default).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Bytes owned by something else (a memory-mapped file) that a tensor borrows without copying.
pub trait ByteSource: Send + Sync {
    fn bytes(&self) -> &[u8];
}

/// Applies a generic expression to the typed slice of a storage and wraps the result in the same variant,
/// so dtype-agnostic kernels (copies, gathers, joins) are written once.
macro_rules! map_typed {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s.dtype() {
            DType::F32 => CpuStorage::F32({
                let $v = $s.as_f32().expect("dtype matched");
                $body
            }),
            DType::F16 => CpuStorage::F16({
                let $v = $s.as_f16().expect("dtype matched");
                $body
            }),
            DType::BF16 => CpuStorage::BF16({
                let $v = $s.as_bf16().expect("dtype matched");
                $body
            }),
            DType::I32 => CpuStorage::I32({
                let $v = $s.as_i32().expect("dtype matched");
                $body
            }),
            DType::I8 => CpuStorage::I8({
                let $v = $s.as_i8().expect("dtype matched");
                $body
            }),
            DType::U8 => CpuStorage::U8({
                let $v = $s.as_u8().expect("dtype matched");
                $body
            }),
        }
    };
}
pub(crate) use map_typed;

/// Tensor data in host memory.
#[derive(Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    /// Zero-copy view of `len` elements of `dtype` at byte `start` of a shared source; `start` is aligned
    /// for `dtype` (the loader copies otherwise).
    Mapped {
        source: Arc<dyn ByteSource>,
        start: usize,
        len: usize,
        dtype: DType,
    },
}

macro_rules! typed_slice {
    ($name:ident, $variant:ident, $t:ty) => {
        /// The elements as a slice when the storage holds this type.
        pub fn $name(&self) -> Option<&[$t]> {
            match self {
                CpuStorage::$variant(v) => Some(v),
                CpuStorage::Mapped {
                    source,
                    start,
                    len,
                    dtype: DType::$variant,
                } => {
                    let bytes = &source.bytes()[*start..*start + *len * std::mem::size_of::<$t>()];
                    Some(bytemuck::cast_slice(bytes))
                }
                _ => None,
            }
        }
    };
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::I8(_) => DType::I8,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::Mapped { dtype, .. } => *dtype,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
            CpuStorage::I8(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
            CpuStorage::Mapped { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    typed_slice!(as_f32, F32, f32);
    typed_slice!(as_f16, F16, f16);
    typed_slice!(as_bf16, BF16, bf16);
    typed_slice!(as_i32, I32, i32);
    typed_slice!(as_i8, I8, i8);
    typed_slice!(as_u8, U8, u8);

    /// The elements of a strided view, converted to f32, in row-major order.
    pub fn to_f32_vec(&self, layout: &Layout) -> Vec<f32> {
        match self.dtype() {
            DType::F32 => gather(self.as_f32().unwrap(), layout),
            DType::F16 => convert(self.as_f16().unwrap(), layout, |x| x.to_f32()),
            DType::BF16 => convert(self.as_bf16().unwrap(), layout, |x| x.to_f32()),
            DType::I32 => convert(self.as_i32().unwrap(), layout, |x| x as f32),
            DType::I8 => convert(self.as_i8().unwrap(), layout, |x| x as f32),
            DType::U8 => convert(self.as_u8().unwrap(), layout, |x| x as f32),
        }
    }

    /// The elements of a strided view as integers (for index tensors), in row-major order.
    pub fn to_i64_vec(&self, layout: &Layout) -> Vec<i64> {
        match self.dtype() {
            DType::F32 => convert(self.as_f32().unwrap(), layout, |x| x as i64),
            DType::F16 => convert(self.as_f16().unwrap(), layout, |x| x.to_f32() as i64),
            DType::BF16 => convert(self.as_bf16().unwrap(), layout, |x| x.to_f32() as i64),
            DType::I32 => convert(self.as_i32().unwrap(), layout, |x| x as i64),
            DType::I8 => convert(self.as_i8().unwrap(), layout, |x| x as i64),
            DType::U8 => convert(self.as_u8().unwrap(), layout, |x| x as i64),
        }
    }

    /// Builds storage of `dtype` from f32 values: f16/bf16 round to nearest even; integers truncate toward
    /// zero as PyTorch's casts do, saturating at the type's range (NaN becomes 0).
    pub fn from_f32(values: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(values),
            DType::F16 => CpuStorage::F16(par_map(&values, f16::from_f32)),
            DType::BF16 => CpuStorage::BF16(par_map(&values, bf16::from_f32)),
            DType::I32 => CpuStorage::I32(par_map(&values, |x| x as i32)),
            DType::I8 => CpuStorage::I8(par_map(&values, |x| x as i8)),
            DType::U8 => CpuStorage::U8(par_map(&values, |x| x as u8)),
        }
    }

    /// The elements as a mutable f32 slice (a memory-mapped f32 tensor is copied into memory first);
    /// other dtypes are an error naming `op`.
    pub fn f32_mut(&mut self, op: &'static str) -> crate::Result<&mut [f32]> {
        if let CpuStorage::Mapped {
            dtype: DType::F32, ..
        } = self
        {
            *self = CpuStorage::F32(self.as_f32().expect("f32 checked").to_vec());
        }
        match self {
            CpuStorage::F32(v) => Ok(v),
            other => Err(crate::Error::UnsupportedDType {
                op,
                dtype: other.dtype(),
            }),
        }
    }

    /// Copies a strided view into new contiguous storage of the same dtype.
    pub fn copy_strided(&self, layout: &Layout) -> CpuStorage {
        map_typed!(self, |v| gather(v, layout))
    }

    /// Little-endian bytes of a strided view, row-major (for serialisation).
    pub fn to_le_bytes(&self, layout: &Layout) -> Vec<u8> {
        match self.copy_strided(layout) {
            CpuStorage::F32(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::F16(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::I32(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::I8(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::U8(v) => v,
            CpuStorage::Mapped { .. } => unreachable!("copy_strided always returns owned storage"),
        }
    }

    /// Owned storage decoded from little-endian bytes (`bytes.len()` is a multiple of the dtype size).
    pub fn from_le_bytes(bytes: &[u8], dtype: DType) -> CpuStorage {
        fn decode<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
            bytes
                .chunks_exact(std::mem::size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect()
        }
        match dtype {
            DType::F32 => CpuStorage::F32(decode(bytes)),
            DType::F16 => CpuStorage::F16(decode(bytes)),
            DType::BF16 => CpuStorage::BF16(decode(bytes)),
            DType::I32 => CpuStorage::I32(decode(bytes)),
            DType::I8 => CpuStorage::I8(decode(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
        }
    }
}

fn par_map<S: Copy + Sync, T: Send>(src: &[S], f: impl Fn(S) -> T + Sync + Send) -> Vec<T> {
    if src.len() >= PAR_THRESHOLD {
        src.par_iter().map(|&x| f(x)).collect()
    } else {
        src.iter().map(|&x| f(x)).collect()
    }
}

/// Row-major copy of a strided view.
pub fn gather<T: Copy + Send + Sync + Default>(src: &[T], layout: &Layout) -> Vec<T> {
    convert(src, layout, |x| x)
}

/// Row-major copy of a strided view through `f`.
pub fn convert<S: Copy + Sync, T: Copy + Send + Default>(
    src: &[S],
    layout: &Layout,
    f: impl Fn(S) -> T + Sync + Send,
) -> Vec<T> {
    if let Some(r) = layout.contiguous_range() {
        return par_map(&src[r], f);
    }
    let n = layout.shape().elem_count();
    let mut out = vec![T::default(); n];
    let walk = Walk::new(layout.dims(), [layout.strides()], [layout.offset()]);
    let [inner] = walk.inner_strides();
    par_fill(&mut out, |start, chunk| {
        if inner == 1 {
            // Rows of the view are contiguous (a transpose of whole rows, a narrow): copy slice by slice.
            walk.runs(start, chunk.len(), |i, [o], n| {
                for (d, &s) in chunk[i..i + n].iter_mut().zip(&src[o..o + n]) {
                    *d = f(s);
                }
            })
        } else {
            walk.run(start, chunk.len(), |i, [o]| chunk[i] = f(src[o]))
        }
    });
    out
}

/// Fills `out` in parallel chunks; `f(start, chunk)` writes elements `start..start + chunk.len()`.
pub fn par_fill<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync + Send) {
    const CHUNK: usize = 1 << 14;
    if out.len() < PAR_THRESHOLD {
        f(0, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| f(c * CHUNK, chunk));
    }
}

/// Walks K strided operands of the same logical shape in row-major order, after merging contiguous dims.
pub struct Walk<const K: usize> {
    dims: Vec<usize>,
    strides: [Vec<usize>; K],
    base: [usize; K],
}

impl<const K: usize> Walk<K> {
    pub fn new(dims: &[usize], strides: [&[usize]; K], base: [usize; K]) -> Self {
        let (dims, merged) = crate::layout::coalesce(dims, &strides);
        let strides: [Vec<usize>; K] = merged.try_into().unwrap_or_else(|_| unreachable!());
        Walk {
            dims,
            strides,
            base,
        }
    }

    /// Calls `f(i, offsets)` for logical elements `start..start + len` (i counts from 0).
    pub fn run(&self, start: usize, len: usize, mut f: impl FnMut(usize, [usize; K])) {
        let inner = self.inner_strides();
        self.runs(start, len, |i, offs, n| {
            let mut o = offs;
            for j in 0..n {
                f(i + j, o);
                for k in 0..K {
                    o[k] += inner[k];
                }
            }
        });
    }

    /// The stride of each operand along the innermost (merged) dim.
    pub fn inner_strides(&self) -> [usize; K] {
        std::array::from_fn(|k| self.strides[k].last().copied().unwrap_or(0))
    }

    /// Like `run`, one call per stretch along the innermost dim: `f(i, offsets, n)` covers logical
    /// elements i..i + n, operand k's at offsets[k] + j · inner_strides()[k] for j < n. Callers whose
    /// inner strides are 1 then work on whole slices instead of element by element.
    pub fn runs(&self, start: usize, len: usize, mut f: impl FnMut(usize, [usize; K], usize)) {
        if len == 0 {
            return;
        }
        let rank = self.dims.len();
        let mut idx = vec![0; rank];
        let mut rem = start;
        for d in (0..rank).rev() {
            idx[d] = rem % self.dims[d];
            rem /= self.dims[d];
        }
        let mut offs = self.base;
        for (k, o) in offs.iter_mut().enumerate() {
            *o += idx
                .iter()
                .zip(&self.strides[k])
                .map(|(i, s)| i * s)
                .sum::<usize>();
        }
        let inner = self.dims[rank - 1];
        let inner_strides = self.inner_strides();
        let mut i = 0;
        while i < len {
            let run = (inner - idx[rank - 1]).min(len - i);
            f(i, offs, run);
            let mut o = offs;
            for k in 0..K {
                o[k] += inner_strides[k] * run;
            }
            i += run;
            if i == len {
                break;
            }
            for k in 0..K {
                offs[k] = o[k] - inner_strides[k] * inner;
            }
            idx[rank - 1] = 0;
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                for (o, s) in offs.iter_mut().zip(&self.strides) {
                    *o += s[d];
                }
                if idx[d] < self.dims[d] {
                    break;
                }
                for (o, s) in offs.iter_mut().zip(&self.strides) {
                    *o -= s[d] * self.dims[d];
                }
                idx[d] = 0;
            }
        }
    }
}
