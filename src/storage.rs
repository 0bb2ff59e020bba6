//! Backend dispatch: the only place that chooses between CPU and GPU kernels.

use crate::cpu::{self, CpuStorage};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::{BinaryOp, CmpOp, ReduceOp, UnaryOp};
use std::fmt;

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The n-th CUDA device. Reserved: the CUDA backend is not built yet, so using it returns
    /// [`Error::NoCudaDevice`].
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

impl Device {
    /// Fails unless trit can allocate on this device.
    pub fn check(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(n) => Err(Error::NoCudaDevice(format!(
                "cuda:{n} requested, but this build of trit has no CUDA backend yet; use Device::Cpu"
            ))),
        }
    }
}

/// Tensor data on some device.
#[derive(Clone)]
pub enum Storage {
    Cpu(CpuStorage),
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }

    pub fn cpu(&self) -> &CpuStorage {
        match self {
            Storage::Cpu(s) => s,
        }
    }

    /// Runs an f32 kernel on a float view and stores the result in the view's dtype: f32 views are read
    /// in place, f16/bf16 views are widened first.
    fn float_map(
        &self,
        layout: &Layout,
        op: &'static str,
        f: impl FnOnce(&[f32], &Layout) -> Vec<f32>,
    ) -> Result<Storage> {
        let s = self.cpu();
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
    fn with_f32_pair<T>(
        &self,
        ll: &Layout,
        rhs: &Storage,
        rl: &Layout,
        f: impl FnOnce(&[f32], &Layout, &[f32], &Layout) -> T,
    ) -> T {
        let (a, b) = (self.cpu(), rhs.cpu());
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

    pub fn unary(&self, layout: &Layout, op: UnaryOp) -> Result<Storage> {
        self.float_map(layout, op.name(), |x, l| cpu::elementwise::unary(x, l, op))
    }

    pub fn binary(&self, ll: &Layout, rhs: &Storage, rl: &Layout, op: BinaryOp) -> Result<Storage> {
        let dtype = self.dtype();
        let out = self.with_f32_pair(ll, rhs, rl, |a, al, b, bl| {
            cpu::elementwise::binary(a, al, b, bl, op)
        });
        Ok(Storage::Cpu(CpuStorage::from_f32(out, dtype)))
    }

    pub fn compare(&self, ll: &Layout, rhs: &Storage, rl: &Layout, op: CmpOp) -> Result<Storage> {
        let out = self.with_f32_pair(ll, rhs, rl, |a, al, b, bl| {
            cpu::elementwise::compare(a, al, b, bl, op)
        });
        Ok(Storage::Cpu(CpuStorage::U8(out)))
    }

    pub fn where_cond(
        &self,
        ml: &Layout,
        t: &Storage,
        tl: &Layout,
        f: &Storage,
        fl: &Layout,
    ) -> Result<Storage> {
        let mask = self.cpu().to_f32_vec(ml);
        let mask_layout = Layout::contiguous(ml.shape().clone());
        let dtype = t.dtype();
        let out = t.with_f32_pair(tl, f, fl, |a, al, b, bl| {
            cpu::elementwise::where_cond(&mask, &mask_layout, a, al, b, bl)
        });
        Ok(Storage::Cpu(CpuStorage::from_f32(out, dtype)))
    }

    /// Reduces the trailing `r` elements of each row of a view (the caller has permuted reduced dims last).
    pub fn reduce(&self, layout: &Layout, rows: usize, r: usize, op: ReduceOp) -> Result<Storage> {
        let name = match op {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        };
        self.float_map(layout, name, |x, l| {
            let contiguous;
            let x = match l.contiguous_range() {
                Some(range) => &x[range],
                None => {
                    contiguous = cpu::gather(x, l);
                    &contiguous
                }
            };
            cpu::reduce::reduce_rows(x, rows, r, op)
        })
    }

    /// Index of the max (or min) of each trailing row of `r` elements, as i32.
    pub fn arg_reduce(&self, layout: &Layout, r: usize, max: bool) -> Result<Storage> {
        let x = self.cpu().to_f32_vec(layout);
        let out = if max {
            cpu::reduce::argmax_rows(&x, r)
        } else {
            cpu::reduce::argmin_rows(&x, r)
        };
        Ok(Storage::Cpu(CpuStorage::I32(out)))
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
        let dtype = self.dtype();
        let (a, b) = (self.cpu(), rhs.cpu());
        if !dtype.is_float() {
            return Err(Error::UnsupportedDType {
                op: "matmul",
                dtype,
            });
        }
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

    /// Entries `ids` of the middle dim of a contiguous view [outer, size, inner].
    pub fn index_select(&self, layout: &Layout, split: cpu::index::Split, ids: &[i64]) -> Storage {
        Storage::Cpu(self.cpu().index_select(layout, split, ids))
    }

    /// `self` (a view [outer, size, inner]) with `src` [outer, ids.len(), inner] added at `ids`.
    pub fn index_add(
        &self,
        layout: &Layout,
        src: &Storage,
        src_layout: &Layout,
        (outer, size, inner): cpu::index::Split,
        ids: &[i64],
    ) -> Storage {
        let mut base = self.to_f32_vec(layout);
        cpu::index::index_add(
            &mut base,
            outer,
            size,
            inner,
            ids,
            &src.to_f32_vec(src_layout),
        );
        Storage::Cpu(CpuStorage::from_f32(base, self.dtype()))
    }

    /// `out[o, j, n] = self[o, ids[o, j, n], n]` for a view [outer, size, inner] and ids [outer, k, inner].
    pub fn gather(
        &self,
        layout: &Layout,
        (outer, size, inner): cpu::index::Split,
        ids: &[i64],
        k: usize,
    ) -> Storage {
        let out = cpu::index::gather(&self.to_f32_vec(layout), outer, size, inner, ids, k);
        Storage::Cpu(CpuStorage::from_f32(out, self.dtype()))
    }

    /// `self` with `src[o, j, n]` added at `[o, ids[o, j, n], n]`.
    pub fn scatter_add(
        &self,
        layout: &Layout,
        src: &Storage,
        src_layout: &Layout,
        (outer, size, inner): cpu::index::Split,
        ids: &[i64],
        k: usize,
    ) -> Storage {
        let mut base = self.to_f32_vec(layout);
        let src = src.to_f32_vec(src_layout);
        cpu::index::scatter_add(&mut base, size, inner, ids, &src, outer, k);
        Storage::Cpu(CpuStorage::from_f32(base, self.dtype()))
    }

    /// Joins contiguous views of one dtype along their middle dim.
    pub fn cat(
        parts: &[(&Storage, &Layout)],
        sizes: &[usize],
        outer: usize,
        inner: usize,
    ) -> Storage {
        let cpu_parts: Vec<(&CpuStorage, &Layout)> =
            parts.iter().map(|(s, l)| (s.cpu(), *l)).collect();
        Storage::Cpu(CpuStorage::cat(&cpu_parts, sizes, outer, inner))
    }

    pub fn copy_strided(&self, layout: &Layout) -> Storage {
        Storage::Cpu(self.cpu().copy_strided(layout))
    }

    pub fn to_dtype(&self, layout: &Layout, dtype: DType) -> Storage {
        let s = self.cpu();
        if s.dtype() == dtype {
            return self.copy_strided(layout);
        }
        let out = match (s.dtype(), dtype) {
            (DType::I32 | DType::I8 | DType::U8, DType::I32 | DType::I8 | DType::U8) => {
                let v = s.to_i64_vec(layout);
                match dtype {
                    DType::I32 => CpuStorage::I32(v.into_iter().map(|x| x as i32).collect()),
                    DType::I8 => CpuStorage::I8(v.into_iter().map(|x| x as i8).collect()),
                    _ => CpuStorage::U8(v.into_iter().map(|x| x as u8).collect()),
                }
            }
            _ => CpuStorage::from_f32(s.to_f32_vec(layout), dtype),
        };
        Storage::Cpu(out)
    }

    /// Runs a CPU kernel that consumes contiguous f32 inputs and produces f32, storing the result in `dtype`.
    /// Fused ops (norms, softmax, RoPE, losses) go through here until they have GPU twins.
    pub fn f32_kernel(
        inputs: &[(&Storage, &Layout)],
        dtype: DType,
        f: impl FnOnce(&[&[f32]]) -> Vec<f32>,
    ) -> Result<Storage> {
        let out = Storage::with_f32_views(inputs, f);
        Ok(Storage::Cpu(CpuStorage::from_f32(out, dtype)))
    }

    /// Runs `f` on contiguous f32 views of `inputs`: borrowed where a view is already f32 and
    /// contiguous, widened or gathered into a copy otherwise (for kernels with several outputs).
    pub fn with_f32_views<R>(inputs: &[(&Storage, &Layout)], f: impl FnOnce(&[&[f32]]) -> R) -> R {
        let vecs: Vec<std::borrow::Cow<'_, [f32]>> = inputs
            .iter()
            .map(|(s, l)| match (s.cpu().as_f32(), l.contiguous_range()) {
                (Some(x), Some(r)) => std::borrow::Cow::Borrowed(&x[r]),
                _ => std::borrow::Cow::Owned(s.cpu().to_f32_vec(l)),
            })
            .collect();
        let slices: Vec<&[f32]> = vecs.iter().map(|v| v.as_ref()).collect();
        f(&slices)
    }

    pub fn to_f32_vec(&self, layout: &Layout) -> Vec<f32> {
        self.cpu().to_f32_vec(layout)
    }

    pub fn to_i64_vec(&self, layout: &Layout) -> Vec<i64> {
        self.cpu().to_i64_vec(layout)
    }
}
