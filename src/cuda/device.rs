//! One CUDA device: its context, its one stream, the lazily loaded PTX modules, the caching allocator and
//! the cuBLAS handle.

use super::alloc::{Block, Pool, PoolStats};
use super::ptx;
use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What a device is, read once when it is opened.
#[derive(Clone, Debug)]
pub struct DeviceProps {
    pub name: String,
    /// (major, minor), e.g. (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: u32,
}

pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    props: DeviceProps,
    pool: Arc<Pool>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    blas: Mutex<Option<cudarc::cublas::CudaBlas>>,
    sync_each_launch: bool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice(cuda:{}, {})", self.ordinal, self.props.name)
    }
}

/// A driver error as trit's error, naming the op that hit it.
pub fn driver_err(op: &'static str, e: result::DriverError) -> Error {
    Error::Cuda {
        op,
        msg: e.to_string(),
    }
}

/// Fails with [`Error::NoCudaDevice`] unless libcuda loads and reports at least `ordinal + 1` devices.
/// cudarc's dynamically loaded entry points panic when the library is missing, so this runs before any
/// of them.
pub fn probe(ordinal: usize) -> Result<usize> {
    // SAFETY: only tries to dlopen libcuda under its usual names; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoCudaDevice(format!(
            "cuda:{ordinal} requested, but the CUDA driver library (libcuda.so) is not installed on this machine"
        )));
    }
    result::init().map_err(|e| Error::NoCudaDevice(format!("cuInit failed: {e}")))?;
    let n = result::device::get_count()
        .map_err(|e| Error::NoCudaDevice(format!("cuDeviceGetCount failed: {e}")))?
        as usize;
    if ordinal >= n {
        return Err(Error::NoCudaDevice(format!(
            "cuda:{ordinal} requested, but this machine has {n} CUDA device(s)"
        )));
    }
    Ok(n)
}

type Registry = Mutex<HashMap<usize, Arc<CudaDevice>>>;

fn registry() -> &'static Registry {
    static DEVICES: OnceLock<Registry> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

impl CudaDevice {
    /// The device `cuda:ordinal`, opened on first use and shared afterwards.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let mut devices = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = devices.get(&ordinal) {
            return Ok(d.clone());
        }
        probe(ordinal)?;
        let dev = Arc::new(CudaDevice::open(ordinal)?);
        devices.insert(ordinal, dev.clone());
        Ok(dev)
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let err = |e| driver_err("open device", e);
        let ctx = CudaContext::new(ordinal).map_err(err)?;
        // One stream per device orders every kernel, copy and cuBLAS call, so cudarc's per-buffer events
        // are not needed.
        // SAFETY: trit never hands cudarc buffers to a second stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(err)?;
        let attr = |a| ctx.attribute(a).map_err(err);
        let props = DeviceProps {
            name: ctx.name().map_err(err)?,
            compute_capability: ctx.compute_capability().map_err(err)?,
            total_memory: ctx.total_mem().map_err(err)?,
            multiprocessors: attr(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )? as u32,
        };
        Ok(CudaDevice {
            ordinal,
            pool: Arc::new(Pool::new(ctx.clone())),
            ctx,
            stream,
            props,
            modules: Mutex::default(),
            functions: Mutex::default(),
            blas: Mutex::default(),
            sync_each_launch: std::env::var_os("TRIT_CUDA_SYNC").is_some_and(|v| v != "0"),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn props(&self) -> &DeviceProps {
        &self.props
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Returns cached free blocks to the driver (other processes see the memory again).
    pub fn release_cached_memory(&self) {
        self.pool.release_cached();
    }

    /// Makes this device's context current on the calling thread (rayon workers call in too).
    pub fn bind(&self, op: &'static str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err(op, e))
    }

    /// An uninitialised block of at least `bytes` bytes.
    pub fn alloc(&self, bytes: usize) -> Result<Block> {
        self.bind("alloc")?;
        self.pool.alloc(bytes)
    }

    /// Waits for all queued work; a fault in an earlier kernel surfaces here, named by `op`.
    pub fn synchronize(&self, op: &'static str) -> Result<()> {
        self.bind(op)?;
        self.stream.synchronize().map_err(|e| driver_err(op, e))
    }

    /// The kernel `name` of the PTX module `module` (loaded on first use).
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name).map_err(|e| Error::Cuda {
            op: name,
            msg: format!("kernel {name} not found in ptx/{module}.ptx: {e}"),
        })?;
        functions.insert((module, name), f.clone());
        Ok(f)
    }

    fn module(&self, module: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(module) {
            return Ok(m.clone());
        }
        let src = ptx::source(module).ok_or_else(|| Error::Cuda {
            op: module,
            msg: format!("no PTX module named {module}"),
        })?;
        let m = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(src))
            .map_err(|e| Error::Cuda {
                op: module,
                msg: format!("loading ptx/{module}.ptx: {e}"),
            })?;
        modules.insert(module, m.clone());
        Ok(m)
    }

    /// Checks a launch's result. With `TRIT_CUDA_SYNC=1` every launch is followed by a synchronisation,
    /// so an asynchronous fault is reported by the op that caused it rather than at the next copy.
    pub fn launched(
        &self,
        op: &'static str,
        r: std::result::Result<
            Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
            result::DriverError,
        >,
    ) -> Result<()> {
        r.map_err(|e| driver_err(op, e))?;
        self.checkpoint(op)
    }

    /// After queuing `op`'s work: synchronises when `TRIT_CUDA_SYNC=1`, so a fault is named by its op.
    pub fn checkpoint(&self, op: &'static str) -> Result<()> {
        if self.sync_each_launch {
            self.synchronize(op)?;
        }
        Ok(())
    }

    /// Runs `f` with this device's cuBLAS handle (created on first use, bound to the device's stream).
    pub fn with_blas<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&cudarc::cublas::CudaBlas) -> Result<R>,
    ) -> Result<R> {
        self.bind(op)?;
        let mut blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        if blas.is_none() {
            // SAFETY: only tries to dlopen libcublas; cudarc panics on first use when it is missing.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err(Error::Cuda {
                    op,
                    msg:
                        "libcublas is not installed on this machine; dense matmul on CUDA needs it"
                            .into(),
                });
            }
            let handle =
                cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(|e| Error::Cuda {
                    op,
                    msg: format!("creating the cuBLAS handle: {e}"),
                })?;
            *blas = Some(handle);
        }
        f(blas.as_ref().expect("created above"))
    }

    /// Device time of `f`'s queued work, in milliseconds per call: `warmup` untimed calls, then `reps`
    /// calls each bracketed by events on the device's stream (the host-side launch cost only counts
    /// where it stalls the GPU). Benchmarks take the median.
    pub fn time_ms(
        &self,
        warmup: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Vec<f32>> {
        let err = |e| driver_err("time", e);
        for _ in 0..warmup {
            f()?;
        }
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut out = Vec::with_capacity(reps);
        for _ in 0..reps {
            let (start, end) = (
                self.ctx.new_event(timed).map_err(err)?,
                self.ctx.new_event(timed).map_err(err)?,
            );
            start.record(&self.stream).map_err(err)?;
            f()?;
            end.record(&self.stream).map_err(err)?;
            out.push(start.elapsed_ms(&end).map_err(err)?);
        }
        Ok(out)
    }
}
