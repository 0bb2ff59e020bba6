//! Launchers for cuda/index.cu: index_select (the embedding lookup) and gather, and their adjoints
//! index_add and scatter_add. The adjoints add into an f32 copy of the base with atomics, so repeated ids
//! sum without rounding to f16/bf16 in between, and convert back to the base's dtype once. Also the
//! small helpers the other launchers of this family share (dtype → kernel, view → kernel arguments).

use super::copy::{cast, copy_strided};
use super::launch::{dtype_index, grid_1d, launch, Arg, Strided};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;

const THREADS: u32 = 256;

/// The kernel among `names` (f32, f16, bf16) for a float dtype.
pub(crate) fn float_kernel(
    op: &'static str,
    dtype: DType,
    [f32, f16, bf16]: [&'static str; 3],
) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(f32),
        DType::F16 => Ok(f16),
        DType::BF16 => Ok(bf16),
        _ => Err(Error::UnsupportedDType { op, dtype }),
    }
}

/// A view's elements in row-major order from some element on: the storage itself when the view is
/// contiguous, else a contiguous copy.
pub(crate) fn contiguous(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, usize)> {
    match l.contiguous_range() {
        Some(r) => Ok((x.clone(), r.start)),
        None => Ok((copy_strided(x, l)?, 0)),
    }
}

/// A view as a kernel reads it through `Strided`: the address its offsets count from and its descriptor.
/// A contiguous view goes as the address of its first element with a rank-0 (dense) descriptor, so its
/// length is not bound by the descriptor's 32-bit dims.
pub(crate) fn strided_view(
    op: &'static str,
    x: &CudaStorage,
    l: &Layout,
) -> Result<(u64, Strided)> {
    match l.contiguous_range() {
        Some(r) => Ok((x.ptr_at(r.start), Strided::default())),
        None => Ok((x.ptr(), Strided::of(op, l)?)),
    }
}

/// Fails unless `s` is I32 storage of at least `n` elements (the kernels read elements 0..n).
pub(crate) fn check_i32(op: &'static str, what: &str, s: &CudaStorage, n: usize) -> Result<()> {
    if s.dtype() != DType::I32 {
        return Err(Error::UnsupportedDType {
            op,
            dtype: s.dtype(),
        });
    }
    if s.len() < n {
        crate::bail!(op, "{what} holds {} elements, {n} needed", s.len());
    }
    Ok(())
}

/// Fails unless the view `l` has `n` elements.
pub(crate) fn check_len(op: &'static str, what: &str, l: &Layout, n: usize) -> Result<()> {
    let have = l.shape().elem_count();
    if have != n {
        crate::bail!(op, "{what} has {have} elements, {n} expected");
    }
    Ok(())
}

/// A fresh contiguous f32 copy of a float view, the buffer index_add and scatter_add accumulate into.
fn f32_accumulator(op: &'static str, base: &CudaStorage, bl: &Layout) -> Result<CudaStorage> {
    match (base.dtype(), bl.contiguous_range()) {
        (DType::F32, Some(r)) => {
            let mut acc = CudaStorage::uninit(base.device(), DType::F32, r.len())?;
            acc.copy_from(0, base, r.start, r.len())?;
            Ok(acc)
        }
        // A non-contiguous view is gathered into a new block, never aliasing `base`.
        (DType::F32, None) => copy_strided(base, bl),
        (DType::F16 | DType::BF16, _) => cast(base, bl, DType::F32),
        (dtype, _) => Err(Error::UnsupportedDType { op, dtype }),
    }
}

/// The accumulator in the base's dtype (rounded once per element).
fn from_accumulator(acc: CudaStorage, dtype: DType) -> Result<CudaStorage> {
    if dtype == DType::F32 {
        return Ok(acc);
    }
    let l = Layout::contiguous(acc.len());
    cast(&acc, &l, dtype)
}

/// base + src added at ids (one id per slice, or per element when `per_element`), as new storage.
#[allow(clippy::too_many_arguments)]
fn add_at(
    op: &'static str,
    kernels: [&'static str; 3],
    base: &CudaStorage,
    bl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    (outer, size, inner): (usize, usize, usize),
    ids: &CudaStorage,
    k: usize,
    per_element: bool,
) -> Result<CudaStorage> {
    let name = float_kernel(op, src.dtype(), kernels)?;
    float_kernel(op, base.dtype(), kernels)?;
    check_len(op, "base", bl, outer * size * inner)?;
    check_len(op, "src", sl, outer * k * inner)?;
    check_i32(
        op,
        "ids",
        ids,
        if per_element { outer * k * inner } else { k },
    )?;
    let n = outer * size * inner;
    if n == 0 {
        return CudaStorage::uninit(base.device(), base.dtype(), 0);
    }
    let acc = f32_accumulator(op, base, bl)?;
    let m = outer * k * inner;
    if m > 0 {
        let dev = src.device();
        let (src_ptr, ss) = strided_view(op, src, sl)?;
        launch(
            dev,
            op,
            ("index", name),
            grid_1d(dev, m, THREADS),
            &[
                Arg::from(acc.ptr()),
                src_ptr.into(),
                ss.into(),
                ids.ptr().into(),
                (outer as u64).into(),
                (size as u64).into(),
                (k as u64).into(),
                (inner as u64).into(),
            ],
        )?;
    }
    from_accumulator(acc, base.dtype())
}

/// out[o, j, n] = x[o, ids[j], n]; `l` a contiguous view [outer, size, inner]; any dtype; out [outer, ids.len(), inner].
pub fn index_select(
    x: &CudaStorage,
    l: &Layout,
    split: (usize, usize, usize),
    ids: &CudaStorage,
) -> Result<CudaStorage> {
    const NAMES: [&str; 6] = [
        "index_select_f32",
        "index_select_f16",
        "index_select_bf16",
        "index_select_i32",
        "index_select_i8",
        "index_select_u8",
    ];
    pick(
        "index_select",
        NAMES,
        x,
        l,
        split,
        ids,
        ids.len(),
        ids.len(),
    )
}

/// base (view [outer, size, inner]) with src (view [outer, ids.len(), inner]) added at ids; float dtypes; new contiguous storage.
pub fn index_add(
    base: &CudaStorage,
    bl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    split: (usize, usize, usize),
    ids: &CudaStorage,
) -> Result<CudaStorage> {
    add_at(
        "index_add",
        ["index_add_f32", "index_add_f16", "index_add_bf16"],
        base,
        bl,
        src,
        sl,
        split,
        ids,
        ids.len(),
        false,
    )
}

/// out[o, j, n] = x[o, ids[o, j, n], n]; ids [outer, k, inner]; float dtypes (all 6 if easy).
pub fn gather(
    x: &CudaStorage,
    l: &Layout,
    split: (usize, usize, usize),
    ids: &CudaStorage,
    k: usize,
) -> Result<CudaStorage> {
    const NAMES: [&str; 6] = [
        "gather_f32",
        "gather_f16",
        "gather_bf16",
        "gather_i32",
        "gather_i8",
        "gather_u8",
    ];
    let (outer, _, inner) = split;
    pick("gather", NAMES, x, l, split, ids, k, outer * k * inner)
}

/// The shared launcher of index_select and gather (kernels named per dtype in `names`, in the order f32,
/// f16, bf16, i32, i8, u8): `k` entries picked along the middle dim of x by `id_count` i32 ids, into a
/// new contiguous [outer, k, inner].
#[allow(clippy::too_many_arguments)]
fn pick(
    op: &'static str,
    names: [&'static str; 6],
    x: &CudaStorage,
    l: &Layout,
    (outer, size, inner): (usize, usize, usize),
    ids: &CudaStorage,
    k: usize,
    id_count: usize,
) -> Result<CudaStorage> {
    let name = names[dtype_index(x.dtype())];
    check_len(op, "x", l, outer * size * inner)?;
    check_i32(op, "ids", ids, id_count)?;
    let n = outer * k * inner;
    let out = CudaStorage::uninit(x.device(), x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let (src, start) = contiguous(x, l)?;
    let dev = x.device();
    launch(
        dev,
        op,
        ("index", name),
        grid_1d(dev, n, THREADS),
        &[
            Arg::from(src.ptr_at(start)),
            out.ptr().into(),
            ids.ptr().into(),
            (outer as u64).into(),
            (size as u64).into(),
            (k as u64).into(),
            (inner as u64).into(),
        ],
    )?;
    Ok(out)
}

/// base with src[o, j, n] added at [o, ids[o, j, n], n].
pub fn scatter_add(
    base: &CudaStorage,
    bl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    split: (usize, usize, usize),
    ids: &CudaStorage,
    k: usize,
) -> Result<CudaStorage> {
    add_at(
        "scatter_add",
        ["scatter_add_f32", "scatter_add_f16", "scatter_add_bf16"],
        base,
        bl,
        src,
        sl,
        split,
        ids,
        k,
        true,
    )
}
