//! `Tensor`: a strided view of shared storage plus the op that produced it.

use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::Op;
use crate::rng::Rng;
use crate::shape::{Dim, Shape};
use crate::storage::{Device, Storage};
use half::{bf16, f16};
use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Identifies a tensor node in the autograd graph (gradients are keyed by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

pub(crate) struct Inner {
    id: TensorId,
    storage: Arc<RwLock<Storage>>,
    layout: Layout,
    dtype: DType,
    op: Option<Op>,
    is_variable: bool,
}

impl Drop for Inner {
    /// Unlinks the graph iteratively: the default recursive drop of a long op chain (a loss accumulated
    /// over many steps without `detach`) overflows the stack.
    fn drop(&mut self) {
        let Some(op) = self.op.take() else { return };
        let mut pending: Vec<Tensor> = op.inputs().into_iter().cloned().collect();
        drop(op);
        while let Some(t) = pending.pop() {
            // Only a node this thread holds the last reference to is freed here; take its op first so
            // freeing it does not recurse.
            if let Some(mut inner) = Arc::into_inner(t.0) {
                if let Some(op) = inner.op.take() {
                    pending.extend(op.inputs().into_iter().cloned());
                }
            }
        }
    }
}

/// An n-dimensional array. Cloning is cheap (reference counted); views share storage.
#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

thread_local! {
    static NO_GRAD_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// While alive, ops on this thread record no autograd graph (see [`no_grad`]).
pub struct NoGradGuard(());

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Disables graph recording on this thread until the guard is dropped (evaluation, optimizer updates).
pub fn no_grad() -> NoGradGuard {
    NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
    NoGradGuard(())
}

pub(crate) fn grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Rust element types a tensor can be built from and read back into.
pub trait WithDType: Copy + Send + Sync + 'static + fmt::Debug {
    const DTYPE: DType;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    fn from_storage(s: &CpuStorage, layout: &Layout) -> Vec<Self>;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident, $slice:ident) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn from_storage(s: &CpuStorage, layout: &Layout) -> Vec<Self> {
                crate::cpu::gather(s.$slice().expect("dtype checked by caller"), layout)
            }
        }
    };
}
with_dtype!(f32, F32, as_f32);
with_dtype!(f16, F16, as_f16);
with_dtype!(bf16, BF16, as_bf16);
with_dtype!(i32, I32, as_i32);
with_dtype!(i8, I8, as_i8);
with_dtype!(u8, U8, as_u8);

impl Tensor {
    /// Builds a tensor from storage and layout, recording `op` when graph recording is on and an input
    /// needs gradients.
    pub(crate) fn from_parts(storage: Storage, layout: Layout, op: Option<Op>) -> Tensor {
        let dtype = storage.dtype();
        Tensor::view_of(Arc::new(RwLock::new(storage)), layout, dtype, op)
    }

    fn view_of(
        storage: Arc<RwLock<Storage>>,
        layout: Layout,
        dtype: DType,
        op: Option<Op>,
    ) -> Tensor {
        let op = op.filter(|op| grad_enabled() && op.inputs().iter().any(|t| t.tracks_grad()));
        Tensor(Arc::new(Inner {
            id: TensorId::new(),
            storage,
            layout,
            dtype,
            op,
            is_variable: false,
        }))
    }

    /// A new view of this tensor's storage.
    pub(crate) fn view(&self, layout: Layout, op: Op) -> Tensor {
        Tensor::view_of(self.0.storage.clone(), layout, self.0.dtype, Some(op))
    }

    /// A new contiguous tensor on `device` from f32-computed storage.
    pub(crate) fn from_storage(
        storage: Storage,
        shape: impl Into<Shape>,
        op: Option<Op>,
    ) -> Tensor {
        Tensor::from_parts(storage, Layout::contiguous(shape), op)
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    pub fn shape(&self) -> &Shape {
        self.0.layout.shape()
    }

    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }

    pub fn rank(&self) -> usize {
        self.dims().len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape().elem_count()
    }

    /// Size of one dimension.
    pub fn dim<D: Dim>(&self, dim: D) -> Result<usize> {
        self.shape().dim(dim)
    }

    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    pub fn device(&self) -> Device {
        self.storage().device()
    }

    pub fn op(&self) -> Option<&Op> {
        self.0.op.as_ref()
    }

    /// True for trainable parameters (see [`Tensor::var`]).
    pub fn is_variable(&self) -> bool {
        self.0.is_variable
    }

    /// True when gradients flow through this tensor: it is a variable or was computed from one.
    pub fn tracks_grad(&self) -> bool {
        self.0.is_variable || self.0.op.is_some()
    }

    pub(crate) fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the device storage under this tensor when it lives on a GPU (for launching custom
    /// kernels and testing launchers); `None` on the CPU. The storage is the whole buffer: the tensor's
    /// [`Tensor::layout`] says which of its elements are this tensor's.
    #[cfg(feature = "cuda")]
    pub fn with_cuda_storage<R>(
        &self,
        f: impl FnOnce(&crate::cuda::CudaStorage) -> R,
    ) -> Option<R> {
        match &*self.storage() {
            Storage::Cuda(s) => Some(f(s)),
            Storage::Cpu(_) => None,
        }
    }

    /// A contiguous tensor of `shape` over device storage a kernel wrote (its dtype and device become
    /// the tensor's); the storage must hold exactly the shape's element count.
    #[cfg(feature = "cuda")]
    pub fn from_cuda_storage(
        storage: crate::cuda::CudaStorage,
        shape: impl Into<Shape>,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if storage.len() != shape.elem_count() {
            crate::bail!(
                "Tensor::from_cuda_storage",
                "{} elements cannot have shape {shape}",
                storage.len()
            );
        }
        Ok(Tensor::from_storage(Storage::Cuda(storage), shape, None))
    }

    /// True when both tensors view the same storage buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    // ---- creation ----

    pub fn from_vec<T: WithDType>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::InvalidArgument {
                op: "from_vec",
                msg: format!("{} elements do not fill shape {shape}", data.len()),
            });
        }
        Ok(Tensor::from_storage(
            Storage::from_cpu(T::into_storage(data), device)?,
            shape,
            None,
        ))
    }

    /// A 1-d tensor from a slice.
    pub fn from_slice<T: WithDType>(data: &[T], device: Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), data.len(), device)
    }

    /// A 0-d tensor.
    pub fn scalar_tensor<T: WithDType>(value: T, device: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![value], (), device)
    }

    pub fn full(
        value: f32,
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let storage = Storage::full(value, shape.elem_count(), dtype, device)?;
        Ok(Tensor::from_storage(storage, shape, None))
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, dtype, device)
    }

    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape(), self.dtype(), self.device())
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape(), self.dtype(), self.device())
    }

    /// Integers `start..end` as i32.
    pub fn arange(start: i64, end: i64, device: Device) -> Result<Tensor> {
        if end < start
            || end - start > i32::MAX as i64
            || start < i32::MIN as i64
            || end > i32::MAX as i64
        {
            return Err(Error::InvalidArgument {
                op: "arange",
                msg: format!("bad range {start}..{end}"),
            });
        }
        let v: Vec<i32> = (start..end).map(|x| x as i32).collect();
        let n = v.len();
        Tensor::from_vec(v, n, device)
    }

    /// `start, start + step, ...` below `end` (above it for a negative step), as f32.
    pub fn arange_f32(start: f32, end: f32, step: f32, device: Device) -> Result<Tensor> {
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(Error::InvalidArgument {
                op: "arange_f32",
                msg: format!("bad range {start}..{end} step {step}"),
            });
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let v: Vec<f32> = (0..n).map(|i| start + i as f32 * step).collect();
        Tensor::from_vec(v, n, device)
    }

    /// Normal samples with the given mean and standard deviation, drawn from `rng`.
    pub fn randn(
        shape: impl Into<Shape>,
        mean: f32,
        std: f32,
        rng: &mut Rng,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| mean + std * rng.normal_f64() as f32)
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// Uniform samples in [lo, hi), drawn from `rng`.
    pub fn uniform(
        shape: impl Into<Shape>,
        lo: f32,
        hi: f32,
        rng: &mut Rng,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| lo + (hi - lo) * rng.uniform_f32())
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    // ---- variables ----

    /// A trainable parameter holding a private contiguous copy of this tensor's values.
    pub fn var(&self) -> Result<Tensor> {
        let storage = self.storage().copy_strided(self.layout())?;
        Ok(self.variable_with(storage))
    }

    /// A new variable of this tensor's shape and dtype holding `storage` (contiguous).
    fn variable_with(&self, storage: Storage) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::new(),
            storage: Arc::new(RwLock::new(storage)),
            layout: Layout::contiguous(self.shape().clone()),
            dtype: self.dtype(),
            op: None,
            is_variable: true,
        }))
    }

    /// Overwrites a variable's values in place (optimizer updates, checkpoint loading). Shape and dtype must
    /// match; views of the variable see the new values.
    pub fn set(&self, value: &Tensor) -> Result<()> {
        if !self.is_variable() {
            return Err(Error::InvalidArgument {
                op: "set",
                msg: "only variables can be overwritten".into(),
            });
        }
        if value.shape() != self.shape() {
            return Err(Error::ShapeMismatch {
                op: "set",
                lhs: self.dims().to_vec(),
                rhs: value.dims().to_vec(),
            });
        }
        let value = value.to_device(self.device())?;
        let new = value.storage().to_dtype(value.layout(), self.dtype())?;
        *self.0.storage.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// A private owned copy (not sharing storage or a memory map), with no graph.
    pub fn copy(&self) -> Result<Tensor> {
        let storage = self.storage().copy_strided(self.layout())?;
        Ok(Tensor::from_storage(storage, self.shape().clone(), None))
    }

    /// Runs `f` on a variable's f32 values in place: the optimizers' update path, which must not allocate
    /// a new tensor per parameter per step.
    pub fn update_in_place<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        if !self.is_variable() || self.dtype() != DType::F32 {
            crate::bail!(
                "update_in_place",
                "needs an f32 variable, got a {} tensor",
                self.dtype()
            );
        }
        let mut guard = self.0.storage.write().unwrap_or_else(|e| e.into_inner());
        match &mut *guard {
            Storage::Cpu(cpu) => Ok(f(cpu.f32_mut("update_in_place")?)),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => crate::bail!(
                "update_in_place",
                "the variable lives on {}; host closures can only update CPU tensors",
                self.device()
            ),
        }
    }

    /// Runs `f` on a variable's storage behind its write lock (the optimizers' fused device updates).
    pub(crate) fn with_storage_mut<R>(
        &self,
        f: impl FnOnce(&mut Storage) -> Result<R>,
    ) -> Result<R> {
        if !self.is_variable() {
            crate::bail!("update", "only variables can be updated in place");
        }
        let mut guard = self.0.storage.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// The same values with no graph: gradients stop here.
    pub fn detach(&self) -> Tensor {
        Tensor::view_of(
            self.0.storage.clone(),
            self.layout().clone(),
            self.dtype(),
            None,
        )
    }

    // ---- read-back ----

    /// The elements in row-major order; `T` must be the tensor's dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch {
                op: "to_vec",
                lhs: self.dtype(),
                rhs: T::DTYPE,
            });
        }
        let storage = self.storage();
        let (host, layout) = storage.host_view(self.layout())?;
        Ok(T::from_storage(&host, &layout))
    }

    /// The elements converted to f32, row-major, whatever the dtype.
    ///
    /// # Panics
    /// When a GPU tensor cannot be copied back (a device fault); [`Tensor::try_to_vec_f32`] returns that
    /// as an error instead.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        self.try_to_vec_f32()
            .unwrap_or_else(|e| panic!("to_vec_f32 on {}: {e}", self.device()))
    }

    /// The elements converted to f32, row-major; a GPU tensor is copied back (errors are device faults).
    pub fn try_to_vec_f32(&self) -> Result<Vec<f32>> {
        self.storage().to_f32_vec(self.layout())
    }

    /// Runs a host kernel `f` on the elements as a row-major f32 slice: borrowed in place for contiguous
    /// f32 tensors (the optimizers' per-step gradient reads), converted into a temporary otherwise. GPU
    /// tensors are an error naming `op`: host kernels never copy device data back silently.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(crate) fn with_f32_slice<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R> {
        let storage = self.storage();
        match &*storage {
            Storage::Cpu(cpu) => match (cpu.as_f32(), self.layout().contiguous_range()) {
                (Some(v), Some(range)) => Ok(f(&v[range])),
                _ => Ok(f(&cpu.to_f32_vec(self.layout()))),
            },
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => crate::bail!(
                op,
                "runs on the CPU, but this tensor lives on {}",
                self.device()
            ),
        }
    }

    /// The elements as i64 (index tensors), row-major.
    ///
    /// # Panics
    /// When a GPU tensor cannot be copied back; [`Tensor::try_to_vec_i64`] returns that as an error.
    pub fn to_vec_i64(&self) -> Vec<i64> {
        self.try_to_vec_i64()
            .unwrap_or_else(|e| panic!("to_vec_i64 on {}: {e}", self.device()))
    }

    /// The elements as i64, row-major; a GPU tensor is copied back.
    pub fn try_to_vec_i64(&self) -> Result<Vec<i64>> {
        self.storage().to_i64_vec(self.layout())
    }

    /// Rows of a 2-d tensor, as f32.
    pub fn to_vec2_f32(&self) -> Result<Vec<Vec<f32>>> {
        let [r, c] = self.dims() else {
            return Err(Error::InvalidArgument {
                op: "to_vec2_f32",
                msg: format!("expected a 2-d tensor, got shape {}", self.shape()),
            });
        };
        let v = self.to_vec_f32();
        Ok((0..*r).map(|i| v[i * c..(i + 1) * c].to_vec()).collect())
    }

    /// The single value of a one-element tensor, as f32.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(Error::InvalidArgument {
                op: "to_scalar",
                msg: format!(
                    "tensor of shape {} has {} elements, not 1",
                    self.shape(),
                    self.elem_count()
                ),
            });
        }
        Ok(self.to_vec_f32()[0])
    }

    /// Little-endian bytes of the elements in row-major order (serialisation).
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        let storage = self.storage();
        let (host, layout) = storage.host_view(self.layout())?;
        Ok(host.to_le_bytes(&layout))
    }

    /// Copies to `device` (a no-op clone when already there). A variable's copy is a new variable on
    /// `device` (moving parameters); any other copy records the move, so gradients flow back to the source.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let storage = self.storage().to_device(self.layout(), device)?;
        if self.is_variable() {
            return Ok(self.variable_with(storage));
        }
        let op = self.dtype().is_float().then(|| Op::ToDevice(self.clone()));
        Ok(Tensor::from_storage(storage, self.shape().clone(), op))
    }

    // ---- views ----

    /// Same elements, new shape. Views when contiguous, copies otherwise. One dim may be `usize::MAX`
    /// to be inferred.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let mut dims = shape.into().dims().to_vec();
        let n = self.elem_count();
        let inferred: Vec<usize> = (0..dims.len()).filter(|&i| dims[i] == usize::MAX).collect();
        if inferred.len() > 1 {
            crate::bail!("reshape", "at most one dim can be inferred, got {dims:?}");
        }
        if let [i] = inferred[..] {
            let rest: usize = dims
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, d)| d)
                .product();
            if rest == 0 || !n.is_multiple_of(rest) {
                crate::bail!("reshape", "cannot infer a dim of {dims:?} for {n} elements");
            }
            dims[i] = n / rest;
        }
        let shape = Shape::from(dims);
        if shape.elem_count() != n {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                lhs: self.dims().to_vec(),
                rhs: shape.dims().to_vec(),
            });
        }
        if shape == *self.shape() {
            return Ok(self.clone());
        }
        match self.layout().reshape(&shape) {
            Some(l) => Ok(self.view(l, Op::Reshape(self.clone()))),
            None => self.contiguous()?.reshape(shape),
        }
    }

    /// Flattens to 1-d.
    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(self.elem_count())
    }

    /// Merges dims `start..=end` into one.
    pub fn flatten<D: Dim>(&self, start: D, end: D) -> Result<Tensor> {
        let (s, e) = (
            start.to_index(self.shape(), "flatten")?,
            end.to_index(self.shape(), "flatten")?,
        );
        if s > e {
            crate::bail!("flatten", "start dim {s} after end dim {e}");
        }
        let d = self.dims();
        let mut dims = d[..s].to_vec();
        dims.push(d[s..=e].iter().product());
        dims.extend_from_slice(&d[e + 1..]);
        self.reshape(dims)
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let layout = self.layout().permute(perm)?;
        Ok(self.view(layout, Op::Permute(self.clone(), perm.to_vec())))
    }

    /// Swaps two dims.
    pub fn transpose<D: Dim>(&self, d0: D, d1: D) -> Result<Tensor> {
        let (a, b) = (
            d0.to_index(self.shape(), "transpose")?,
            d1.to_index(self.shape(), "transpose")?,
        );
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Swaps the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            crate::bail!("t", "needs at least 2 dims, got shape {}", self.shape());
        }
        self.transpose(-2, -1)
    }

    /// `len` entries of `dim` starting at `start`, as a view.
    pub fn narrow<D: Dim>(&self, dim: D, start: usize, len: usize) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), "narrow")?;
        if start == 0 && len == self.dims()[d] {
            return Ok(self.clone());
        }
        let layout = self.layout().narrow(d, start, len)?;
        Ok(self.view(layout, Op::Narrow(self.clone(), d, start)))
    }

    /// The `i`-th entry along dim 0, with that dim removed.
    pub fn get(&self, i: usize) -> Result<Tensor> {
        self.narrow(0, i, 1)?.squeeze(0)
    }

    /// Splits `dim` into `n` nearly equal views (the last may be smaller).
    pub fn chunk<D: Dim>(&self, n: usize, dim: D) -> Result<Vec<Tensor>> {
        let d = dim.to_index(self.shape(), "chunk")?;
        if n == 0 {
            crate::bail!("chunk", "cannot split into 0 chunks");
        }
        let size = self.dims()[d];
        let step = size.div_ceil(n).max(1);
        (0..size)
            .step_by(step)
            .map(|s| self.narrow(d, s, step.min(size - s)))
            .collect()
    }

    /// A stride-0 view repeating size-1 dims (and adding leading dims) to reach `shape`.
    pub fn broadcast_as(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape == *self.shape() {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as(&shape)?;
        Ok(self.view(layout, Op::Broadcast(self.clone())))
    }

    /// Removes a size-1 dim.
    pub fn squeeze<D: Dim>(&self, dim: D) -> Result<Tensor> {
        let d = dim.to_index(self.shape(), "squeeze")?;
        if self.dims()[d] != 1 {
            crate::bail!("squeeze", "dim {d} of shape {} is not 1", self.shape());
        }
        let mut dims = self.dims().to_vec();
        dims.remove(d);
        let mut strides = self.layout().strides().to_vec();
        strides.remove(d);
        let layout = Layout::new(Shape::from(dims), strides, self.layout().offset());
        Ok(self.view(layout, Op::Reshape(self.clone())))
    }

    /// Inserts a size-1 dim at `dim` (0..=rank; -1 appends).
    pub fn unsqueeze<D: Dim>(&self, dim: D) -> Result<Tensor> {
        let extended = Shape::from([self.dims(), &[1]].concat());
        let d = dim.to_index(&extended, "unsqueeze")?;
        let mut dims = self.dims().to_vec();
        dims.insert(d, 1);
        let mut strides = self.layout().strides().to_vec();
        let s = strides.get(d).map_or(1, |&s| s * self.dims()[d]);
        strides.insert(d, s);
        let layout = Layout::new(Shape::from(dims), strides, self.layout().offset());
        Ok(self.view(layout, Op::Reshape(self.clone())))
    }

    /// A row-major copy (or `self` when already contiguous).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.layout().is_contiguous() {
            return Ok(self.clone());
        }
        let storage = self.storage().copy_strided(self.layout())?;
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(Op::Copy(self.clone())),
        ))
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let storage = self.storage().to_dtype(self.layout(), dtype)?;
        let op = (dtype.is_float() && self.dtype().is_float()).then(|| Op::ToDType(self.clone()));
        Ok(Tensor::from_storage(storage, self.shape().clone(), op))
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {}]",
            self.dims(),
            self.dtype(),
            self.device()
        )
    }
}

/// Prints like `[[1.0000, 2.0000], [3.0000, 4.0000]]` with a shape/dtype footer, eliding the middle of long
/// dims (more than 8 entries) the way PyTorch does.
impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = self.to_vec_f32();
        let dims = self.dims().to_vec();
        let strides = Shape::from(dims.clone()).contiguous_strides();
        let is_int = !self.dtype().is_float();
        fn rec(
            f: &mut fmt::Formatter<'_>,
            v: &[f32],
            dims: &[usize],
            strides: &[usize],
            at: usize,
            is_int: bool,
            depth: usize,
        ) -> fmt::Result {
            if dims.is_empty() {
                return if is_int {
                    write!(f, "{}", v[at])
                } else {
                    write!(f, "{:.4}", v[at])
                };
            }
            f.write_str("[")?;
            let n = dims[0];
            let shown: Vec<Option<usize>> = if n > 8 {
                (0..3)
                    .map(Some)
                    .chain([None])
                    .chain((n - 3..n).map(Some))
                    .collect()
            } else {
                (0..n).map(Some).collect()
            };
            for (j, i) in shown.iter().enumerate() {
                if j > 0 {
                    if dims.len() > 1 {
                        write!(f, ",\n{}", " ".repeat(depth + 1))?;
                    } else {
                        f.write_str(", ")?;
                    }
                }
                match i {
                    Some(i) => rec(
                        f,
                        v,
                        &dims[1..],
                        &strides[1..],
                        at + i * strides[0],
                        is_int,
                        depth + 1,
                    )?,
                    None => f.write_str("...")?,
                }
            }
            f.write_str("]")
        }
        rec(f, &values, &dims, &strides, 0, is_int, 0)?;
        write!(
            f,
            "\nTensor[{:?}, {}, {}]",
            self.dims(),
            self.dtype(),
            self.device()
        )
    }
}
