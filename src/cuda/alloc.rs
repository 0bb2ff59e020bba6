//! The caching allocator: freed device blocks go back to a per-size free list and are reused by later
//! allocations instead of returning to the driver (cuMemAlloc/cuMemFree synchronise the device and cost
//! tens of microseconds; a training step allocates hundreds of tensors).
//!
//! Every kernel runs on the device's one stream, so a block freed by the host may be handed to the next
//! allocation at once: the stream orders the new kernel after every kernel that still reads the old data.

use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Sizes are rounded up so that blocks of nearby sizes share a free list: to 512 bytes below 1 MiB,
/// then to an eighth of the enclosing power of two (under 25% waste).
pub fn bucket_size(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= 1 << 20 {
        return bytes.div_ceil(512) * 512;
    }
    let pow = bytes.next_power_of_two();
    let step = pow / 8;
    bytes.div_ceil(step) * step
}

/// Allocation counters, for `--verbose` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes in blocks held by live tensors.
    pub in_use: usize,
    /// Bytes in cached free blocks.
    pub cached: usize,
    /// Largest `in_use` seen.
    pub peak: usize,
    /// Blocks obtained from the driver (cache misses).
    pub driver_allocs: u64,
    /// Blocks served from the cache.
    pub reuses: u64,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<sys::CUdeviceptr>>,
    stats: PoolStats,
}

/// The free lists of one device.
pub struct Pool {
    ctx: Arc<cudarc::driver::CudaContext>,
    state: Mutex<PoolState>,
}

impl Pool {
    pub fn new(ctx: Arc<cudarc::driver::CudaContext>) -> Self {
        Pool {
            ctx,
            state: Mutex::new(PoolState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// A block of at least `bytes` bytes (contents undefined). On out-of-memory the cache is released
    /// to the driver and the allocation tried once more.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> crate::Result<Block> {
        let size = bucket_size(bytes);
        {
            let mut st = self.lock();
            if let Some(ptr) = st.free.get_mut(&size).and_then(|v| v.pop()) {
                st.stats.cached -= size;
                st.stats.in_use += size;
                st.stats.peak = st.stats.peak.max(st.stats.in_use);
                st.stats.reuses += 1;
                return Ok(Block {
                    ptr,
                    size,
                    pool: self.clone(),
                });
            }
        }
        let ptr = match self.driver_alloc(size) {
            Ok(p) => p,
            Err(_) => {
                self.release_cached();
                self.driver_alloc(size).map_err(|e| {
                    let st = self.stats();
                    crate::Error::Cuda {
                        op: "alloc",
                        msg: format!(
                            "out of device memory allocating {size} bytes ({} in use by tensors): {e}",
                            st.in_use
                        ),
                    }
                })?
            }
        };
        let mut st = self.lock();
        st.stats.in_use += size;
        st.stats.peak = st.stats.peak.max(st.stats.in_use);
        st.stats.driver_allocs += 1;
        Ok(Block {
            ptr,
            size,
            pool: self.clone(),
        })
    }

    fn driver_alloc(&self, size: usize) -> Result<sys::CUdeviceptr, result::DriverError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the context is bound to this thread; the memory is returned uninitialised and every
        // user writes before reading (kernels produce whole outputs, copies fill whole blocks).
        unsafe { result::malloc_sync(size) }
    }

    /// Returns every cached block to the driver (after an out-of-memory, or on request).
    pub fn release_cached(&self) {
        let blocks: Vec<sys::CUdeviceptr> = {
            let mut st = self.lock();
            st.stats.cached = 0;
            st.free.drain().flat_map(|(_, v)| v).collect()
        };
        if blocks.is_empty() || self.ctx.bind_to_thread().is_err() {
            return;
        }
        for ptr in blocks {
            // SAFETY: the block came from cuMemAlloc in this context and no tensor holds it; cuMemFree
            // waits for kernels still using it.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn give_back(&self, ptr: sys::CUdeviceptr, size: usize) {
        let mut st = self.lock();
        st.stats.in_use -= size;
        st.stats.cached += size;
        st.free.entry(size).or_default().push(ptr);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.release_cached();
    }
}

/// One device allocation, returned to its pool's free list on drop.
pub struct Block {
    ptr: sys::CUdeviceptr,
    size: usize,
    pool: Arc<Pool>,
}

impl Block {
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.give_back(self.ptr, self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_size;

    #[test]
    fn buckets_round_up_with_bounded_waste() {
        assert_eq!(bucket_size(0), 512);
        assert_eq!(bucket_size(1), 512);
        assert_eq!(bucket_size(513), 1024);
        assert_eq!(bucket_size(1 << 20), 1 << 20);
        assert_eq!(bucket_size((1 << 20) + 1), (1 << 20) + (1 << 18));
        for bytes in [3_000_001usize, 64 << 20, (64 << 20) + 7, 1_000_000_007] {
            let b = bucket_size(bytes);
            assert!(b >= bytes && (b - bytes) * 4 <= bytes, "{bytes} -> {b}");
            assert_eq!(bucket_size(b), b, "a bucket size maps to itself");
        }
    }
}
