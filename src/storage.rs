//! Backend dispatch: the only place that chooses between CPU and GPU kernels.

use crate::cpu::{self, CpuStorage};
#[cfg(feature = "cuda")]
use crate::cuda::{self, CudaStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::{BinaryOp, CmpOp, ReduceOp, SoftmaxKind, UnaryOp};
use std::borrow::Cow;
use std::fmt;

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The n-th CUDA device (needs the `cuda` feature and a GPU; otherwise [`Error::NoCudaDevice`]).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(Error::InvalidArgument {
                    op: "device",
                    msg: format!("unknown device {s:?} (expected cpu, cuda or cuda:N)"),
                }),
            },
        }
    }
}

impl Device {
    /// Fails unless trit can allocate on this device.
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => cuda::CudaDevice::get(n).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => Err(Error::NoCudaDevice(format!(
                "cuda:{n} requested, but this build of trit has no CUDA backend; rebuild with `--features cuda`"
            ))),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    #[cfg(feature = "cuda")]
    fn cuda(self) -> Result<std::sync::Arc<cuda::CudaDevice>> {
        match self {
            Device::Cuda(n) => cuda::CudaDevice::get(n),
            Device::Cpu => unreachable!("only called for CUDA devices"),
        }
    }
}

/// Tensor data on some device.
#[derive(Clone)]
pub enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(CudaStorage),
}

/// Fails with [`Error::DeviceMismatch`] unless every storage lives on `first`'s device.
fn same_device(op: &'static str, first: &Storage, others: &[&Storage]) -> Result<()> {
    for s in others {
        if s.device() != first.device() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: first.device().to_string(),
                rhs: s.device().to_string(),
            });
        }
    }
    Ok(())
}

/// Runs an f32 kernel on a float view and stores the result in the view's dtype: f32 views are read
/// in place, f16/bf16 views are widened first.
fn cpu_float_map(
    s: &CpuStorage,
    layout: &Layout,
    op: &'static str,
    f: impl FnOnce(&[f32], &Layout) -> Vec<f32>,
) -> Result<Storage> {
    let dtype = s.dtype();
    if !dtype.is_float() {
        return Err(Error::UnsupportedDType { op, dtype });
    }
    let out = match s.as_f32() {
        Some(x) => f(x, layout),
        None => {
            let x = s.to_f32_vec(layout);
            f(&x, &Layout::contiguous(layout.shape().clone()))
        }
    };
    Ok(Storage::Cpu(CpuStorage::from_f32(out, dtype)))
}

/// Two float views as f32 slices (widening f16/bf16), with their layouts.
fn cpu_f32_pair<T>(
    a: &CpuStorage,
    ll: &Layout,
    b: &CpuStorage,
    rl: &Layout,
    f: impl FnOnce(&[f32], &Layout, &[f32], &Layout) -> T,
) -> T {
    let widen =
        |s: &CpuStorage, l: &Layout| (s.to_f32_vec(l), Layout::contiguous(l.shape().clone()));
    match (a.as_f32(), b.as_f32()) {
        (Some(x), Some(y)) => f(x, ll, y, rl),
        (Some(x), None) => {
            let (y, yl) = widen(b, rl);
            f(x, ll, &y, &yl)
        }
        (None, Some(y)) => {
            let (x, xl) = widen(a, ll);
            f(&x, &xl, y, rl)
        }
        (None, None) => {
            let (x, xl) = widen(a, ll);
            let (y, yl) = widen(b, rl);
            f(&x, &xl, &y, &yl)
        }
    }
}

/// Contiguous f32 views of CPU inputs: borrowed where already f32 and contiguous, widened otherwise.
fn cpu_f32_views<'a>(inputs: &[(&'a CpuStorage, &Layout)]) -> Vec<Cow<'a, [f32]>> {
    inputs
        .iter()
        .map(|(s, l)| match (s.as_f32(), l.contiguous_range()) {
            (Some(x), Some(r)) => Cow::Borrowed(&x[r]),
            _ => Cow::Owned(s.to_f32_vec(l)),
        })
        .collect()
}

/// The host storage of an operand whose device the caller has checked to be the CPU.
fn host_side(s: &Storage) -> &CpuStorage {
    match s {
        Storage::Cpu(c) => c,
        #[cfg(feature = "cuda")]
        Storage::Cuda(_) => unreachable!("devices checked by the caller"),
    }
}

/// The elements of host storage as bytes.
fn cpu_bytes(s: &CpuStorage) -> &[u8] {
    let typed = "the dtype names the slice";
    match s.dtype() {
        DType::F32 => bytemuck::cast_slice(s.as_f32().expect(typed)),
        DType::F16 => bytemuck::cast_slice(s.as_f16().expect(typed)),
        DType::BF16 => bytemuck::cast_slice(s.as_bf16().expect(typed)),
        DType::I32 => bytemuck::cast_slice(s.as_i32().expect(typed)),
        DType::I8 => bytemuck::cast_slice(s.as_i8().expect(typed)),
        DType::U8 => s.as_u8().expect(typed),
    }
}

/// The elements of host storage held in memory (not a memory map, which the caller copies in first)
/// as mutable bytes.
fn cpu_bytes_mut(s: &mut CpuStorage) -> &mut [u8] {
    match s {
        CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
        CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
        CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
        CpuStorage::I32(v) => bytemuck::cast_slice_mut(v),
        CpuStorage::I8(v) => bytemuck::cast_slice_mut(v),
        CpuStorage::U8(v) => v,
        CpuStorage::Mapped { .. } => unreachable!("mapped storage is copied into memory first"),
    }
}

/// Index lists as the CUDA kernels read them: i32 on the device (validated by the caller).
#[cfg(feature = "cuda")]
fn upload_ids(dev: &std::sync::Arc<cuda::CudaDevice>, ids: &[i64]) -> Result<CudaStorage> {
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let n = v.len();
    CudaStorage::from_cpu(dev, &CpuStorage::I32(v), &Layout::contiguous(n))
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.device().ordinal()),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Host storage on `device`: copied there when it is a GPU.
    pub fn from_cpu(cpu: CpuStorage, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(cpu)),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let n = cpu.len();
                Ok(Storage::Cuda(CudaStorage::from_cpu(
                    &device.cuda()?,
                    &cpu,
                    &Layout::contiguous(n),
                )?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => device.check().map(|_| Storage::Cpu(cpu)),
        }
    }

    /// `len` copies of `value` as `dtype` on `device`.
    pub fn full(value: f32, len: usize, dtype: DType, device: Device) -> Result<Storage> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Ok(Storage::Cuda(cuda::copy::fill(
                &device.cuda()?,
                dtype,
                len,
                value,
            )?)),
            _ => Storage::from_cpu(CpuStorage::from_f32(vec![value; len], dtype), device),
        }
    }

    /// A copy of a view on `device` (contiguous there).
    pub fn to_device(&self, layout: &Layout, device: Device) -> Result<Storage> {
        match (self, device) {
            (Storage::Cpu(s), Device::Cpu) => Ok(Storage::Cpu(s.copy_strided(layout))),
            #[cfg(feature = "cuda")]
            (Storage::Cpu(s), Device::Cuda(_)) => Ok(Storage::Cuda(CudaStorage::from_cpu(
                &device.cuda()?,
                s,
                layout,
            )?)),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(_), _) => {
                let (host, hl) = self.host_view(layout)?;
                Storage::Cpu(host.into_owned()).to_device(&hl, device)
            }
            #[cfg(not(feature = "cuda"))]
            (Storage::Cpu(_), Device::Cuda(_)) => device.check().map(|_| unreachable!()),
        }
    }

    /// A view's elements in host memory with the layout to read them through: borrowed for CPU storage,
    /// downloaded (as a contiguous copy of the view) for GPU storage.
    pub fn host_view<'a>(
        &'a self,
        layout: &'a Layout,
    ) -> Result<(Cow<'a, CpuStorage>, Cow<'a, Layout>)> {
        match self {
            Storage::Cpu(s) => Ok((Cow::Borrowed(s), Cow::Borrowed(layout))),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let host = if layout.is_contiguous()
                    && layout.offset() == 0
                    && s.len() == layout.shape().elem_count()
                {
                    s.to_cpu()?
                } else {
                    cuda::copy::copy_strided(s, layout)?.to_cpu()?
                };
                Ok((
                    Cow::Owned(host),
                    Cow::Owned(Layout::contiguous(layout.shape().clone())),
                ))
            }
        }
    }

    pub fn unary(&self, layout: &Layout, op: UnaryOp) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => cpu_float_map(s, layout, op.name(), |x, l| {
                cpu::elementwise::unary(x, l, op)
            }),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::elementwise::unary(s, layout, op)?)),
        }
    }

    pub fn binary(&self, ll: &Layout, rhs: &Storage, rl: &Layout, op: BinaryOp) -> Result<Storage> {
        same_device("binary op", self, &[rhs])?;
        match (self, rhs) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                let out = cpu_f32_pair(a, ll, b, rl, |a, al, b, bl| {
                    cpu::elementwise::binary(a, al, b, bl, op)
                });
                Ok(Storage::Cpu(CpuStorage::from_f32(out, a.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                if !a.dtype().is_float() {
                    // Integer operands compute in f32 and convert back, as on the CPU.
                    let (af, afl) = Storage::cuda_as(a, ll, DType::F32)?;
                    let (bf, bfl) = Storage::cuda_as(b, rl, DType::F32)?;
                    let out = cuda::elementwise::binary(&af, &afl, &bf, &bfl, op)?;
                    let n = ll.shape().elem_count();
                    return Ok(Storage::Cuda(cuda::copy::cast(
                        &out,
                        &Layout::contiguous(n),
                        a.dtype(),
                    )?));
                }
                let (b, rl) = Storage::cuda_as(b, rl, a.dtype())?;
                Ok(Storage::Cuda(cuda::elementwise::binary(
                    a, ll, &b, &rl, op,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// A CUDA view converted to `dtype` when it is not already (binary ops take the lhs dtype).
    #[cfg(feature = "cuda")]
    fn cuda_as<'a>(
        s: &'a CudaStorage,
        l: &'a Layout,
        dtype: DType,
    ) -> Result<(Cow<'a, CudaStorage>, Cow<'a, Layout>)> {
        if s.dtype() == dtype {
            return Ok((Cow::Borrowed(s), Cow::Borrowed(l)));
        }
        Ok((
            Cow::Owned(cuda::copy::cast(s, l, dtype)?),
            Cow::Owned(Layout::contiguous(l.shape().clone())),
        ))
    }

    pub fn compare(&self, ll: &Layout, rhs: &Storage, rl: &Layout, op: CmpOp) -> Result<Storage> {
        same_device("compare", self, &[rhs])?;
        match (self, rhs) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                let out = cpu_f32_pair(a, ll, b, rl, |a, al, b, bl| {
                    cpu::elementwise::compare(a, al, b, bl, op)
                });
                Ok(Storage::Cpu(CpuStorage::U8(out)))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                // Mixed dtypes compare as f32, as on the CPU.
                if a.dtype() == b.dtype() {
                    return Ok(Storage::Cuda(cuda::elementwise::compare(a, ll, b, rl, op)?));
                }
                let (a, al) = Storage::cuda_as(a, ll, DType::F32)?;
                let (b, bl) = Storage::cuda_as(b, rl, DType::F32)?;
                Ok(Storage::Cuda(cuda::elementwise::compare(
                    &a, &al, &b, &bl, op,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    pub fn where_cond(
        &self,
        ml: &Layout,
        t: &Storage,
        tl: &Layout,
        f: &Storage,
        fl: &Layout,
    ) -> Result<Storage> {
        same_device("where", self, &[t, f])?;
        match (self, t, f) {
            (Storage::Cpu(m), Storage::Cpu(ts), Storage::Cpu(fs)) => {
                let mask = m.to_f32_vec(ml);
                let mask_layout = Layout::contiguous(ml.shape().clone());
                let out = cpu_f32_pair(ts, tl, fs, fl, |a, al, b, bl| {
                    cpu::elementwise::where_cond(&mask, &mask_layout, a, al, b, bl)
                });
                Ok(Storage::Cpu(CpuStorage::from_f32(out, ts.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(m), Storage::Cuda(ts), Storage::Cuda(fs)) => {
                let (fs, fl) = Storage::cuda_as(fs, fl, ts.dtype())?;
                Ok(Storage::Cuda(cuda::elementwise::where_cond(
                    m, ml, ts, tl, &fs, &fl,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// Reduces the trailing `r` elements of each row of a view (the caller has permuted reduced dims last).
    pub fn reduce(&self, layout: &Layout, rows: usize, r: usize, op: ReduceOp) -> Result<Storage> {
        let name = match op {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        };
        match self {
            Storage::Cpu(s) => cpu_float_map(s, layout, name, |x, l| {
                let contiguous;
                let x = match l.contiguous_range() {
                    Some(range) => &x[range],
                    None => {
                        contiguous = cpu::gather(x, l);
                        &contiguous
                    }
                };
                cpu::reduce::reduce_rows(x, rows, r, op)
            }),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::reduce::reduce_rows(
                s, layout, rows, r, op,
            )?)),
        }
    }

    /// Index of the max (or min) of each trailing row of `r` elements, as i32.
    pub fn arg_reduce(&self, layout: &Layout, r: usize, max: bool) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => {
                let x = s.to_f32_vec(layout);
                let out = if max {
                    cpu::reduce::argmax_rows(&x, r)
                } else {
                    cpu::reduce::argmin_rows(&x, r)
                };
                Ok(Storage::Cpu(CpuStorage::I32(out)))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let rows = layout.shape().elem_count() / r.max(1);
                Ok(Storage::Cuda(cuda::reduce::arg_reduce_rows(
                    s, layout, rows, r, max,
                )?))
            }
        }
    }

    /// Batched matmul of [batch, m, k] x [batch, k, n] views whose batch dims each collapse to one stride.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        rhs: &Storage,
        (batch, m, n, k): (usize, usize, usize, usize),
        (a_off, a_bs, a_rs, a_cs): (usize, usize, usize, usize),
        (b_off, b_bs, b_rs, b_cs): (usize, usize, usize, usize),
    ) -> Result<Storage> {
        same_device("matmul", self, &[rhs])?;
        let dtype = self.dtype();
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op: "matmul",
                dtype,
            });
        }
        match (self, rhs) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                let widen = |s: &CpuStorage| s.to_f32_vec(&Layout::contiguous(s.len()));
                let (wa, wb);
                let a = match a.as_f32() {
                    Some(x) => x,
                    None => {
                        wa = widen(a);
                        &wa
                    }
                };
                let b = match b.as_f32() {
                    Some(x) => x,
                    None => {
                        wb = widen(b);
                        &wb
                    }
                };
                let mut out = vec![0f32; batch * m * n];
                fn mat(data: &[f32], off: usize, rs: usize, cs: usize) -> cpu::matmul::MatRef<'_> {
                    cpu::matmul::MatRef {
                        data: &data[off.min(data.len())..],
                        rs,
                        cs,
                    }
                }
                cpu::matmul::sgemm_batched(
                    batch,
                    m,
                    n,
                    k,
                    mat(a, a_off, a_rs, a_cs),
                    a_bs,
                    mat(b, b_off, b_rs, b_cs),
                    b_bs,
                    &mut out,
                    false,
                );
                Ok(Storage::Cpu(CpuStorage::from_f32(out, dtype)))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => {
                let view = |storage, off, bs, rs, cs| cuda::matmul::MatView {
                    storage,
                    off,
                    bs,
                    rs,
                    cs,
                };
                Ok(Storage::Cuda(cuda::matmul::matmul(
                    view(a, a_off, a_bs, a_rs, a_cs),
                    view(b, b_off, b_bs, b_rs, b_cs),
                    (batch, m, n, k),
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// Entries `ids` of the middle dim of a contiguous view [outer, size, inner].
    pub fn index_select(
        &self,
        layout: &Layout,
        split: cpu::index::Split,
        ids: &[i64],
    ) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.index_select(layout, split, ids))),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let ids = upload_ids(s.device(), ids)?;
                Ok(Storage::Cuda(cuda::index::index_select(
                    s, layout, split, &ids,
                )?))
            }
        }
    }

    /// `self` (a view [outer, size, inner]) with `src` [outer, ids.len(), inner] added at `ids`.
    pub fn index_add(
        &self,
        layout: &Layout,
        src: &Storage,
        src_layout: &Layout,
        split: cpu::index::Split,
        ids: &[i64],
    ) -> Result<Storage> {
        same_device("index_add", self, &[src])?;
        match (self, src) {
            (Storage::Cpu(s), Storage::Cpu(src)) => {
                let (outer, size, inner) = split;
                let mut base = s.to_f32_vec(layout);
                cpu::index::index_add(
                    &mut base,
                    outer,
                    size,
                    inner,
                    ids,
                    &src.to_f32_vec(src_layout),
                );
                Ok(Storage::Cpu(CpuStorage::from_f32(base, s.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(s), Storage::Cuda(src)) => {
                let (src, sl) = Storage::cuda_as(src, src_layout, s.dtype())?;
                let ids = upload_ids(s.device(), ids)?;
                Ok(Storage::Cuda(cuda::index::index_add(
                    s, layout, &src, &sl, split, &ids,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// `out[o, j, n] = self[o, ids[o, j, n], n]` for a view [outer, size, inner] and ids [outer, k, inner].
    pub fn gather(
        &self,
        layout: &Layout,
        split: cpu::index::Split,
        ids: &[i64],
        k: usize,
    ) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => {
                let (outer, size, inner) = split;
                let out = cpu::index::gather(&s.to_f32_vec(layout), outer, size, inner, ids, k);
                Ok(Storage::Cpu(CpuStorage::from_f32(out, s.dtype())))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let ids = upload_ids(s.device(), ids)?;
                Ok(Storage::Cuda(cuda::index::gather(
                    s, layout, split, &ids, k,
                )?))
            }
        }
    }

    /// `self` with `src[o, j, n]` added at `[o, ids[o, j, n], n]`.
    pub fn scatter_add(
        &self,
        layout: &Layout,
        src: &Storage,
        src_layout: &Layout,
        split: cpu::index::Split,
        ids: &[i64],
        k: usize,
    ) -> Result<Storage> {
        same_device("scatter_add", self, &[src])?;
        match (self, src) {
            (Storage::Cpu(s), Storage::Cpu(src)) => {
                let (outer, size, inner) = split;
                let mut base = s.to_f32_vec(layout);
                let src = src.to_f32_vec(src_layout);
                cpu::index::scatter_add(&mut base, size, inner, ids, &src, outer, k);
                Ok(Storage::Cpu(CpuStorage::from_f32(base, s.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(s), Storage::Cuda(src)) => {
                let (src, sl) = Storage::cuda_as(src, src_layout, s.dtype())?;
                let ids = upload_ids(s.device(), ids)?;
                Ok(Storage::Cuda(cuda::index::scatter_add(
                    s, layout, &src, &sl, split, &ids, k,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// Joins contiguous views of one dtype along their middle dim.
    pub fn cat(
        parts: &[(&Storage, &Layout)],
        sizes: &[usize],
        outer: usize,
        inner: usize,
    ) -> Result<Storage> {
        let (first, _) = parts[0];
        let rest: Vec<&Storage> = parts[1..].iter().map(|(s, _)| *s).collect();
        same_device("cat", first, &rest)?;
        match first {
            Storage::Cpu(_) => {
                let cpu_parts: Vec<(&CpuStorage, &Layout)> =
                    parts.iter().map(|(s, l)| (host_side(s), *l)).collect();
                Ok(Storage::Cpu(CpuStorage::cat(
                    &cpu_parts, sizes, outer, inner,
                )))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                let cuda_parts: Vec<(&CudaStorage, &Layout)> = parts
                    .iter()
                    .map(|(s, l)| match s {
                        Storage::Cuda(c) => (c, *l),
                        Storage::Cpu(_) => unreachable!("devices checked above"),
                    })
                    .collect();
                Ok(Storage::Cuda(cuda::copy::cat(
                    &cuda_parts,
                    sizes,
                    outer,
                    inner,
                )?))
            }
        }
    }

    pub fn copy_strided(&self, layout: &Layout) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.copy_strided(layout))),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::copy::copy_strided(s, layout)?)),
        }
    }

    /// Overwrites `self[at..at + n]` in place with the n elements of the view `src`/`layout` in
    /// row-major order (same dtype and device): how a device KV cache appends tokens without copying
    /// those before them. A GPU block that another storage shares is made private first, so no other
    /// tensor sees the write.
    pub(crate) fn write_at(&mut self, at: usize, src: &Storage, layout: &Layout) -> Result<()> {
        const OP: &str = "write_at";
        same_device(OP, self, &[src])?;
        if src.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch {
                op: OP,
                lhs: self.dtype(),
                rhs: src.dtype(),
            });
        }
        let n = layout.shape().elem_count();
        let len = match self {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        };
        if at.checked_add(n).is_none_or(|end| end > len) {
            crate::bail!(OP, "{n} elements at {at} do not fit in a storage of {len}");
        }
        if n == 0 {
            return Ok(());
        }
        match (self, src) {
            (Storage::Cpu(dst), Storage::Cpu(s)) => {
                if let CpuStorage::Mapped { .. } = dst {
                    *dst = dst.copy_strided(&Layout::contiguous(len));
                }
                let staged;
                let (s, range) = match layout.contiguous_range() {
                    Some(r) if r.end <= s.len() => (s, r),
                    _ => {
                        staged = s.copy_strided(layout);
                        (&staged, 0..n)
                    }
                };
                let es = dst.dtype().size_in_bytes();
                cpu_bytes_mut(dst)[at * es..(at + n) * es]
                    .copy_from_slice(&cpu_bytes(s)[range.start * es..range.end * es]);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(dst), Storage::Cuda(s)) => {
                dst.make_unique()?;
                let staged;
                let (s, start) = match layout.contiguous_range() {
                    Some(r) if r.end <= s.len() => (s, r.start),
                    _ => {
                        staged = cuda::copy::copy_strided(s, layout)?;
                        (&staged, 0)
                    }
                };
                dst.copy_from(at, s, start, n)?;
                dst.device().checkpoint(OP)
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// Encodes the [b, h, t, d] float view `x`/`layout` row by row as the integer KV format `format`
    /// and writes row (bi, hi, ti) in place at cache row ((at + ti)·b + bi)·h + hi of an int KV cache:
    /// `self` its codes (I8, or U8 holding two int4 codes per byte), `scales` its F16 scales, each
    /// row encoded as [`cpu::kv_attention::quantize_int8`] / [`cpu::kv_attention::quantize_int4`] do.
    /// On a GPU one fused kernel reads `x` in place and a shared buffer is made private first.
    pub(crate) fn kv_quantize_append(
        &mut self,
        scales: &mut Storage,
        x: &Storage,
        layout: &Layout,
        at: usize,
        format: cpu::kv_attention::KvFormat,
    ) -> Result<()> {
        const OP: &str = "kv_quantize_append";
        same_device(OP, self, &[scales, x])?;
        match (self, scales, x) {
            (Storage::Cpu(codes), Storage::Cpu(sc), Storage::Cpu(xs)) => {
                let &[b, h, t, d] = layout.dims() else {
                    crate::bail!(
                        OP,
                        "x must be [batch, heads, tokens, head_dim], got {:?}",
                        layout.dims()
                    );
                };
                let (cpr, spr) = (format.codes_per_row(d), format.scales_per_row(d));
                let group = cpu_int_format(OP, format, d)?;
                let rows = at.saturating_add(t).saturating_mul(b * h);
                let (CpuStorage::F16(sc), true) = (sc, xs.dtype().is_float()) else {
                    crate::bail!(OP, "need F16 scales and a float x");
                };
                if rows.saturating_mul(spr) > sc.len() || rows.saturating_mul(cpr) > codes.len() {
                    crate::bail!(
                        OP,
                        "{rows} rows of {format} do not fit in the cache buffers"
                    );
                }
                let x = xs.to_f32_vec(layout);
                for (r, xr) in x.chunks_exact(d).enumerate() {
                    let (ti, bh) = (r % t, r / t);
                    let dst = (at + ti) * b * h + bh;
                    let s = &mut sc[dst * spr..][..spr];
                    match (&mut *codes, format) {
                        (CpuStorage::I8(c), cpu::kv_attention::KvFormat::Int8 { .. }) => {
                            cpu::kv_attention::quantize_int8(
                                xr,
                                group,
                                &mut c[dst * cpr..][..cpr],
                                s,
                            )
                        }
                        (CpuStorage::U8(c), cpu::kv_attention::KvFormat::Int4 { .. }) => {
                            cpu::kv_attention::quantize_int4(
                                xr,
                                d,
                                group,
                                &mut c[dst * cpr..][..cpr],
                                s,
                            )
                        }
                        (c, _) => crate::bail!(OP, "{} codes cannot hold {format}", c.dtype()),
                    }
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(codes), Storage::Cuda(sc), Storage::Cuda(xs)) => {
                cuda::kvcache::quantize_append(xs, layout, codes, sc, at, format)
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// The first `rows` rows of an int KV cache (codes `self`, F16 `scales`, as
    /// [`Storage::kv_quantize_append`] writes them) decoded into a new contiguous f32 [rows, d]: the
    /// values the CPU's decode kernels see, exactly.
    pub(crate) fn kv_dequantize(
        &self,
        scales: &Storage,
        rows: usize,
        d: usize,
        format: cpu::kv_attention::KvFormat,
    ) -> Result<Storage> {
        const OP: &str = "kv_dequantize";
        same_device(OP, self, &[scales])?;
        match (self, scales) {
            (Storage::Cpu(codes), Storage::Cpu(sc)) => {
                use cpu::kv_attention::{KvFormat, Rows};
                let group = cpu_int_format(OP, format, d)?;
                let (cpr, spr) = (format.codes_per_row(d), format.scales_per_row(d));
                let Some(sc) = sc.as_f16().filter(|s| rows.saturating_mul(spr) <= s.len()) else {
                    crate::bail!(OP, "need F16 scales for {rows} rows");
                };
                let n = rows.saturating_mul(cpr);
                let stored = match (format, codes.as_i8(), codes.as_u8()) {
                    (KvFormat::Int8 { .. }, Some(c), _) if n <= c.len() => Rows::Int8 {
                        codes: c,
                        scales: sc,
                        group,
                    },
                    (KvFormat::Int4 { .. }, _, Some(c)) if n <= c.len() => Rows::Int4 {
                        codes: c,
                        scales: sc,
                        group,
                    },
                    _ => crate::bail!(
                        OP,
                        "{} codes of {} do not hold {rows} rows of {format}",
                        codes.dtype(),
                        codes.len()
                    ),
                };
                let mut out = vec![0f32; rows * d];
                let mut buf = vec![0f32; d];
                for (r, o) in out.chunks_exact_mut(d).enumerate() {
                    o.copy_from_slice(stored.row(r, &mut buf));
                }
                Ok(Storage::Cpu(CpuStorage::F32(out)))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(codes), Storage::Cuda(sc)) => Ok(Storage::Cuda(
                cuda::kvcache::dequantize(codes, sc, rows, d, format)?,
            )),
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    pub fn to_dtype(&self, layout: &Layout, dtype: DType) -> Result<Storage> {
        if self.dtype() == dtype {
            return self.copy_strided(layout);
        }
        match self {
            Storage::Cpu(s) => {
                let out = match (s.dtype(), dtype) {
                    (DType::I32 | DType::I8 | DType::U8, DType::I32 | DType::I8 | DType::U8) => {
                        let v = s.to_i64_vec(layout);
                        match dtype {
                            DType::I32 => {
                                CpuStorage::I32(v.into_iter().map(|x| x as i32).collect())
                            }
                            DType::I8 => CpuStorage::I8(v.into_iter().map(|x| x as i8).collect()),
                            _ => CpuStorage::U8(v.into_iter().map(|x| x as u8).collect()),
                        }
                    }
                    _ => CpuStorage::from_f32(s.to_f32_vec(layout), dtype),
                };
                Ok(Storage::Cpu(out))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::copy::cast(s, layout, dtype)?)),
        }
    }

    /// Softmax, log-softmax or causal softmax over rows of `d` (the view's last dim), in its dtype.
    pub fn softmax(&self, layout: &Layout, d: usize, kind: SoftmaxKind) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => {
                let x = &cpu_f32_views(&[(s, layout)])[0];
                let out = match kind {
                    SoftmaxKind::Plain => cpu::softmax::softmax_rows(x, d),
                    SoftmaxKind::Log => cpu::softmax::log_softmax_rows(x, d),
                    SoftmaxKind::Causal(q) => cpu::softmax::causal_softmax_rows(x, d, q),
                };
                Ok(Storage::Cpu(CpuStorage::from_f32(out, s.dtype())))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::softmax::forward(
                s,
                layout,
                d,
                cuda_softmax(kind),
            )?)),
        }
    }

    /// The input gradient of [`Storage::softmax`] from its output `self` and the incoming gradient.
    pub fn softmax_backward(
        &self,
        yl: &Layout,
        grad: &Storage,
        gl: &Layout,
        d: usize,
        kind: SoftmaxKind,
    ) -> Result<Storage> {
        same_device("softmax backward", self, &[grad])?;
        match (self, grad) {
            (Storage::Cpu(y), Storage::Cpu(g)) => {
                let v = cpu_f32_views(&[(y, yl), (g, gl)]);
                let out = match kind {
                    SoftmaxKind::Plain => cpu::softmax::softmax_backward_rows(&v[0], &v[1], d),
                    SoftmaxKind::Log => cpu::softmax::log_softmax_backward_rows(&v[0], &v[1], d),
                    SoftmaxKind::Causal(q) => {
                        cpu::softmax::causal_softmax_backward_rows(&v[0], &v[1], d, q)
                    }
                };
                Ok(Storage::Cpu(CpuStorage::from_f32(out, y.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(y), Storage::Cuda(g)) => {
                let (g, gl) = Storage::cuda_as(g, gl, y.dtype())?;
                Ok(Storage::Cuda(cuda::softmax::backward(
                    y,
                    yl,
                    &g,
                    &gl,
                    d,
                    cuda_softmax(kind),
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// layer_norm (`centre`) or rms_norm over rows of `d`: (y in x's dtype, per-row mean and 1/σ as f32).
    #[allow(clippy::too_many_arguments)]
    pub fn norm(
        &self,
        xl: &Layout,
        weight: Option<(&Storage, &Layout)>,
        bias: Option<(&Storage, &Layout)>,
        d: usize,
        eps: f32,
        centre: bool,
    ) -> Result<(Storage, Storage, Storage)> {
        let params: Vec<&Storage> = weight.iter().chain(bias.iter()).map(|(s, _)| *s).collect();
        same_device("norm", self, &params)?;
        match self {
            Storage::Cpu(x) => {
                let mut inputs = vec![(x, xl)];
                for (s, l) in weight.iter().chain(bias.iter()) {
                    inputs.push((host_side(s), *l));
                }
                let v = cpu_f32_views(&inputs);
                let w = weight.map(|_| &*v[1]);
                let b = bias.map(|_| &*v[v.len() - 1]);
                let (y, st) = cpu::norm::norm_forward(&v[0], d, w, b, eps, centre);
                Ok((
                    Storage::Cpu(CpuStorage::from_f32(y, x.dtype())),
                    Storage::Cpu(CpuStorage::F32(st.mean)),
                    Storage::Cpu(CpuStorage::F32(st.rstd)),
                ))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(x) => {
                let out = cuda::norm::forward(
                    x,
                    xl,
                    cuda_param(weight),
                    cuda_param(bias),
                    d,
                    eps,
                    centre,
                )?;
                Ok((
                    Storage::Cuda(out.y),
                    Storage::Cuda(out.mean),
                    Storage::Cuda(out.rstd),
                ))
            }
        }
    }

    /// Gradients (dx in x's dtype; dw, db as f32 when asked for) of [`Storage::norm`] from the saved
    /// per-row statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn norm_backward(
        &self,
        xl: &Layout,
        grad: (&Storage, &Layout),
        weight: Option<(&Storage, &Layout)>,
        (mean, rstd): (&Storage, &Storage),
        d: usize,
        centre: bool,
        (want_dw, want_db): (bool, bool),
    ) -> Result<(Storage, Option<Storage>, Option<Storage>)> {
        let mut others = vec![grad.0, mean, rstd];
        others.extend(weight.map(|(s, _)| s));
        same_device("norm backward", self, &others)?;
        match self {
            Storage::Cpu(x) => {
                let host = |s: &Storage| -> Vec<f32> {
                    let c = host_side(s);
                    c.to_f32_vec(&Layout::contiguous(c.len()))
                };
                let g = host_side(grad.0);
                let mut inputs = vec![(x, xl), (g, grad.1)];
                if let Some((w, wl)) = weight {
                    inputs.push((host_side(w), wl));
                }
                let v = cpu_f32_views(&inputs);
                let stats = cpu::norm::NormStats {
                    mean: host(mean),
                    rstd: host(rstd),
                };
                let w = weight.map(|_| &*v[2]);
                let (dx, dw, db) = cpu::norm::norm_backward(&v[0], &v[1], d, w, &stats, centre);
                Ok((
                    Storage::Cpu(CpuStorage::from_f32(dx, x.dtype())),
                    want_dw.then(|| Storage::Cpu(CpuStorage::F32(dw))),
                    want_db.then(|| Storage::Cpu(CpuStorage::F32(db))),
                ))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(x) => {
                let (Storage::Cuda(g), gl) = grad else {
                    unreachable!("devices checked above")
                };
                let (Storage::Cuda(mean), Storage::Cuda(rstd)) = (mean, rstd) else {
                    unreachable!("devices checked above")
                };
                let w = cuda_param(weight);
                let (dx, dw, db) =
                    cuda::norm::backward(x, xl, g, gl, w, mean, rstd, d, centre, want_dw, want_db)?;
                Ok((
                    Storage::Cuda(dx),
                    dw.map(Storage::Cuda),
                    db.map(Storage::Cuda),
                ))
            }
        }
    }

    /// RoPE over a [b, h, s, d] view: `cos`/`sin` are contiguous f32 [max_pos, d/2] tables and
    /// `positions` contiguous i32 ([s] or [b·s]), all on this storage's device; `sign` −1 is the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        layout: &Layout,
        dims: (usize, usize, usize, usize),
        (cos, sin): (&Storage, &Storage),
        positions: &Storage,
        interleaved: bool,
        sign: f32,
    ) -> Result<Storage> {
        same_device("rope", self, &[cos, sin, positions])?;
        match (self, cos, sin, positions) {
            (Storage::Cpu(x), Storage::Cpu(c), Storage::Cpu(s), Storage::Cpu(p)) => {
                let v = cpu_f32_views(&[(x, layout)]);
                let (c, s) = (c.as_f32(), s.as_f32());
                let (Some(c), Some(s)) = (c, s) else {
                    crate::bail!("rope", "the cos/sin tables must be f32");
                };
                let pos = p.to_i64_vec(&Layout::contiguous(p.len()));
                let out = cpu::rope::rope(&v[0], dims, c, s, &pos, interleaved, sign);
                Ok(Storage::Cpu(CpuStorage::from_f32(out, x.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(c), Storage::Cuda(s), Storage::Cuda(p)) => {
                Ok(Storage::Cuda(cuda::rope::rope(
                    x,
                    layout,
                    dims,
                    c,
                    s,
                    p,
                    interleaved,
                    sign,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// Mean cross-entropy of rows of `v` logits against i32 `targets` (−1 = ignored, `kept` others):
    /// (the loss as a one-element storage in the logits' dtype, per-row log-sum-exp as f32).
    pub fn cross_entropy(
        &self,
        layout: &Layout,
        v: usize,
        targets: &Storage,
        kept: usize,
    ) -> Result<(Storage, Storage)> {
        same_device("cross_entropy", self, &[targets])?;
        match (self, targets) {
            (Storage::Cpu(x), Storage::Cpu(t)) => {
                let xs = cpu_f32_views(&[(x, layout)]);
                let t = t.to_i64_vec(&Layout::contiguous(t.len()));
                let (total, lse) = cpu::softmax::cross_entropy_forward(&xs[0], v, &t);
                let loss = if kept == 0 {
                    0.0
                } else {
                    (total / kept as f64) as f32
                };
                Ok((
                    Storage::Cpu(CpuStorage::from_f32(vec![loss], x.dtype())),
                    Storage::Cpu(CpuStorage::F32(lse)),
                ))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(t)) => {
                let (loss, lse) = cuda::loss::cross_entropy_forward(x, layout, v, t, kept)?;
                Ok((Storage::Cuda(loss), Storage::Cuda(lse)))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// dlogits of [`Storage::cross_entropy`], scaled by the one-element upstream gradient `grad` (read
    /// where it lives, so a GPU step needs no host copy).
    pub fn cross_entropy_backward(
        &self,
        layout: &Layout,
        v: usize,
        (targets, lse): (&Storage, &Storage),
        grad: (&Storage, &Layout),
        kept: usize,
    ) -> Result<Storage> {
        same_device("cross_entropy backward", self, &[targets, lse, grad.0])?;
        match (self, targets, lse, grad.0) {
            (Storage::Cpu(x), Storage::Cpu(t), Storage::Cpu(l), Storage::Cpu(g)) => {
                let xs = cpu_f32_views(&[(x, layout)]);
                let t = t.to_i64_vec(&Layout::contiguous(t.len()));
                let lse = l.to_f32_vec(&Layout::contiguous(l.len()));
                let scale = g.to_f32_vec(grad.1)[0] / kept.max(1) as f32;
                let out = cpu::softmax::cross_entropy_backward(&xs[0], v, &t, &lse, scale);
                Ok(Storage::Cpu(CpuStorage::from_f32(out, x.dtype())))
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(t), Storage::Cuda(l), Storage::Cuda(g)) => {
                let g = if grad.1.offset() == 0 {
                    Cow::Borrowed(g)
                } else {
                    Cow::Owned(cuda::copy::copy_strided(g, grad.1)?)
                };
                Ok(Storage::Cuda(cuda::loss::cross_entropy_backward(
                    x, layout, v, t, l, &g, kept,
                )?))
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// One AdamW step in place on f32 contiguous `p`, `m`, `v` (variables' storage; a GPU launcher first
    /// gives each a private block if a clone shares it) from the gradient view `g`.
    pub fn adamw_step(
        p: &mut Storage,
        m: &mut Storage,
        v: &mut Storage,
        (g, gl): (&Storage, &Layout),
        hp: crate::op::AdamWStep,
    ) -> Result<()> {
        same_device("adamw", p, &[m, v, g])?;
        match (p, m, v, g) {
            (Storage::Cpu(p), Storage::Cpu(m), Storage::Cpu(v), Storage::Cpu(g)) => {
                let gv = cpu_f32_views(&[(g, gl)]);
                let (p, m, v) = (
                    p.f32_mut("adamw")?,
                    m.f32_mut("adamw")?,
                    v.f32_mut("adamw")?,
                );
                cpu::optim::adamw(p, &gv[0], m, v, hp);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(p), Storage::Cuda(m), Storage::Cuda(v), Storage::Cuda(g)) => {
                cuda::optim::adamw_step(p, m, v, g, gl, hp)
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// One SGD-with-momentum step in place on f32 contiguous `p` and `buf`.
    pub fn sgd_step(
        p: &mut Storage,
        buf: &mut Storage,
        (g, gl): (&Storage, &Layout),
        hp: crate::op::SgdStep,
    ) -> Result<()> {
        same_device("sgd", p, &[buf, g])?;
        match (p, buf, g) {
            (Storage::Cpu(p), Storage::Cpu(b), Storage::Cpu(g)) => {
                let gv = cpu_f32_views(&[(g, gl)]);
                cpu::optim::sgd(p.f32_mut("sgd")?, &gv[0], b.f32_mut("sgd")?, hp);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(p), Storage::Cuda(b), Storage::Cuda(g)) => {
                cuda::optim::sgd_step(p, b, g, gl, hp)
            }
            #[cfg(feature = "cuda")]
            _ => unreachable!("devices checked above"),
        }
    }

    /// Runs `f` on contiguous f32 views of CPU `inputs` (for CPU-only fused kernels such as the
    /// flash-attention CPU kernel); GPU inputs are an error naming `op`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn with_f32_views<R>(
        op: &'static str,
        inputs: &[(&Storage, &Layout)],
        f: impl FnOnce(&[&[f32]]) -> R,
    ) -> Result<R> {
        let mut cpu_inputs = Vec::with_capacity(inputs.len());
        for (s, l) in inputs {
            match s {
                Storage::Cpu(c) => cpu_inputs.push((c, *l)),
                #[cfg(feature = "cuda")]
                Storage::Cuda(_) => {
                    return Err(Error::Cuda {
                        op,
                        msg: "this fused kernel has no CUDA version; the caller should have taken the composed path".into(),
                    })
                }
            }
        }
        let vecs = cpu_f32_views(&cpu_inputs);
        let slices: Vec<&[f32]> = vecs.iter().map(|v| v.as_ref()).collect();
        Ok(f(&slices))
    }

    pub fn to_f32_vec(&self, layout: &Layout) -> Result<Vec<f32>> {
        let (host, hl) = self.host_view(layout)?;
        Ok(host.to_f32_vec(&hl))
    }

    pub fn to_i64_vec(&self, layout: &Layout) -> Result<Vec<i64>> {
        let (host, hl) = self.host_view(layout)?;
        Ok(host.to_i64_vec(&hl))
    }
}

/// A parameter view known to be on the GPU (devices were checked by the caller).
#[cfg(feature = "cuda")]
fn cuda_param<'a>(p: Option<(&'a Storage, &'a Layout)>) -> Option<(&'a CudaStorage, &'a Layout)> {
    match p {
        Some((Storage::Cuda(c), l)) => Some((c, l)),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_softmax(kind: SoftmaxKind) -> cuda::softmax::Softmax {
    match kind {
        SoftmaxKind::Plain => cuda::softmax::Softmax::Plain,
        SoftmaxKind::Log => cuda::softmax::Softmax::Log,
        SoftmaxKind::Causal(queries) => cuda::softmax::Softmax::Causal { queries },
    }
}

/// The scale group of an integer KV format, checked to divide head_dim `d` (the CPU codecs panic on a
/// mismatch, so the dispatch checks first).
fn cpu_int_format(
    op: &'static str,
    format: cpu::kv_attention::KvFormat,
    d: usize,
) -> Result<usize> {
    match format.group() {
        Some(g) if g > 0 && d > 0 && d.is_multiple_of(g) => Ok(g),
        _ => crate::bail!(
            op,
            "{format} with head_dim {d}: need an integer format whose group divides head_dim"
        ),
    }
}
