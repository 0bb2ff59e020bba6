//! `CudaStorage`: a typed run of elements in one device block, and the host↔device copies.

use super::alloc::Block;
use super::device::{driver_err, CudaDevice};
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::Layout;
use cudarc::driver::{result, sys};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static POISON: AtomicBool = AtomicBool::new(false);

/// Fills every new device allocation with 0xFF bytes (tests turn this on so that unwritten outputs show
/// up as NaN instead of passing by luck with stale values).
pub fn set_poison(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// `len` elements of `dtype` on a device. Clones share the block (tensors are immutable; the in-place
/// optimizer updates go through [`CudaStorage::make_unique`] first).
#[derive(Clone)]
pub struct CudaStorage {
    block: Arc<Block>,
    dtype: DType,
    len: usize,
    dev: Arc<CudaDevice>,
}

impl CudaStorage {
    /// Room for `len` elements, contents undefined: the launcher that asks for it writes every element.
    /// With [`set_poison`] on, the bytes are 0xFF (NaN in every float dtype), so a kernel that leaves an
    /// element unwritten fails its test.
    pub fn uninit(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<CudaStorage> {
        let block = dev.alloc(len * dtype.size_in_bytes())?;
        let s = CudaStorage {
            block: Arc::new(block),
            dtype,
            len,
            dev: dev.clone(),
        };
        if POISON.load(Ordering::Relaxed) && s.bytes() > 0 {
            // SAFETY: the block holds at least `bytes()` bytes; the write is ordered on the stream.
            unsafe { result::memset_d8_async(s.ptr(), 0xFF, s.bytes(), dev.cu_stream()) }
                .map_err(|e| driver_err("poison", e))?;
        }
        Ok(s)
    }

    /// `len` zeros.
    pub fn zeros(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<CudaStorage> {
        let s = CudaStorage::uninit(dev, dtype, len)?;
        let _range = super::nvtx::range("zeros");
        dev.bind("zeros")?;
        // SAFETY: the block holds at least `len * size` bytes and is written on the device's stream,
        // which orders it before any later reader.
        unsafe { result::memset_d8_async(s.ptr(), 0, s.bytes(), dev.cu_stream()) }
            .map_err(|e| driver_err("zeros", e))?;
        Ok(s)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size_in_bytes()
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Device address of element 0.
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.block.ptr()
    }

    /// Device address of element `i`.
    pub fn ptr_at(&self, i: usize) -> sys::CUdeviceptr {
        self.block.ptr() + (i * self.dtype.size_in_bytes()) as u64
    }

    /// The same storage with a reinterpreted dtype of equal size (used to copy f16/bf16 as 16-bit words).
    pub fn with_dtype(&self, dtype: DType) -> CudaStorage {
        debug_assert_eq!(dtype.size_in_bytes(), self.dtype.size_in_bytes());
        CudaStorage {
            dtype,
            ..self.clone()
        }
    }

    /// True when no other storage shares this block.
    pub fn is_unique(&mut self) -> bool {
        Arc::get_mut(&mut self.block).is_some()
    }

    /// Gives this storage a private block (copying on the device) if another storage shares it, so an
    /// in-place update cannot change a tensor it does not own.
    pub fn make_unique(&mut self) -> Result<()> {
        if self.is_unique() {
            return Ok(());
        }
        let copy = CudaStorage::uninit(&self.dev, self.dtype, self.len)?;
        self.dev.bind("make_unique")?;
        // SAFETY: both blocks hold `bytes()` bytes; the copy is ordered on the device's stream.
        unsafe {
            result::memcpy_dtod_async(copy.ptr(), self.ptr(), self.bytes(), self.dev.cu_stream())
        }
        .map_err(|e| driver_err("make_unique", e))?;
        *self = copy;
        Ok(())
    }

    /// Uploads the elements of a contiguous view of host storage.
    pub fn from_cpu(
        dev: &Arc<CudaDevice>,
        cpu: &CpuStorage,
        layout: &Layout,
    ) -> Result<CudaStorage> {
        let owned;
        let (src, range) = match layout.contiguous_range() {
            Some(r) => (cpu, r),
            None => {
                owned = cpu.copy_strided(layout);
                (&owned, 0..layout.shape().elem_count())
            }
        };
        let bytes: &[u8] = match src.dtype() {
            DType::F32 => bytemuck::cast_slice(&src.as_f32().expect("dtype")[range]),
            DType::F16 => bytemuck::cast_slice(&src.as_f16().expect("dtype")[range]),
            DType::BF16 => bytemuck::cast_slice(&src.as_bf16().expect("dtype")[range]),
            DType::I32 => bytemuck::cast_slice(&src.as_i32().expect("dtype")[range]),
            DType::I8 => bytemuck::cast_slice(&src.as_i8().expect("dtype")[range]),
            DType::U8 => &src.as_u8().expect("dtype")[range],
        };
        let s = CudaStorage::uninit(dev, src.dtype(), layout.shape().elem_count())?;
        if !bytes.is_empty() {
            let _range = super::nvtx::range("to_device");
            dev.bind("to_device")?;
            // SAFETY: the block holds `bytes.len()` bytes. The source is pageable memory, so the call
            // returns only once the bytes are staged and `bytes` may be dropped afterwards.
            unsafe { result::memcpy_htod_async(s.ptr(), bytes, dev.cu_stream()) }
                .map_err(|e| driver_err("to_device", e))?;
            crate::transfers::record_h2d(bytes.len());
        }
        Ok(s)
    }

    /// Downloads every element (waits for the kernels that produce them).
    pub fn to_cpu(&self) -> Result<CpuStorage> {
        fn download<T: bytemuck::Pod + Default + Clone>(s: &CudaStorage) -> Result<Vec<T>> {
            let mut v = vec![T::default(); s.len];
            if !v.is_empty() {
                let _range = super::nvtx::range("to_cpu");
                s.dev.bind("to_cpu")?;
                // SAFETY: `v` holds exactly `len` elements of the storage's type; the stream is
                // synchronised before `v` is read or dropped.
                unsafe { result::memcpy_dtoh_async(&mut v, s.ptr(), s.dev.cu_stream()) }
                    .map_err(|e| driver_err("to_cpu", e))?;
                s.dev.synchronize("to_cpu")?;
                crate::transfers::record_d2h(s.bytes());
            }
            Ok(v)
        }
        Ok(match self.dtype {
            DType::F32 => CpuStorage::F32(download(self)?),
            DType::F16 => CpuStorage::F16(download(self)?),
            DType::BF16 => CpuStorage::BF16(download(self)?),
            DType::I32 => CpuStorage::I32(download(self)?),
            DType::I8 => CpuStorage::I8(download(self)?),
            DType::U8 => CpuStorage::U8(download(self)?),
        })
    }

    /// Copies `n` elements from `src[src_at..]` into `self[at..]` on the device (same dtype).
    pub fn copy_from(
        &mut self,
        at: usize,
        src: &CudaStorage,
        src_at: usize,
        n: usize,
    ) -> Result<()> {
        let size = self.dtype.size_in_bytes();
        if n == 0 {
            return Ok(());
        }
        self.dev.bind("copy")?;
        // SAFETY: callers pass ranges inside both blocks; the copy is ordered on the device's stream.
        unsafe {
            result::memcpy_dtod_async(
                self.ptr_at(at),
                src.ptr_at(src_at),
                n * size,
                self.dev.cu_stream(),
            )
        }
        .map_err(|e| driver_err("copy", e))
    }
}
