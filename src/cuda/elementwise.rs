//! Launchers for cuda/elementwise.cu: unary maps, binary ops, comparisons and where over strided views,
//! each writing a new contiguous output. The op tables below are the kernels' `*_OPS` tables.

use super::copy::check_view;
use super::launch::{dtype_index, grid_1d, launch, Strided};
use super::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::{BinaryOp, CmpOp, UnaryOp};

const MODULE: &str = "elementwise";
const THREADS: u32 = 256;

/// The kernel's (code, p0, p1) for `op`: `UNARY_OPS` in cuda/elementwise.cu, keep the two in sync.
fn unary_code(op: UnaryOp) -> (u32, f32, f32) {
    match op {
        UnaryOp::Neg => (0, 0.0, 0.0),
        UnaryOp::Exp => (1, 0.0, 0.0),
        UnaryOp::Log => (2, 0.0, 0.0),
        UnaryOp::Sqrt => (3, 0.0, 0.0),
        UnaryOp::Rsqrt => (4, 0.0, 0.0),
        UnaryOp::Tanh => (5, 0.0, 0.0),
        UnaryOp::Sigmoid => (6, 0.0, 0.0),
        UnaryOp::Relu => (7, 0.0, 0.0),
        UnaryOp::GeluErf => (8, 0.0, 0.0),
        UnaryOp::GeluTanh => (9, 0.0, 0.0),
        UnaryOp::Silu => (10, 0.0, 0.0),
        UnaryOp::Abs => (11, 0.0, 0.0),
        UnaryOp::Sign => (12, 0.0, 0.0),
        UnaryOp::Round => (13, 0.0, 0.0),
        UnaryOp::Sqr => (14, 0.0, 0.0),
        UnaryOp::Recip => (15, 0.0, 0.0),
        UnaryOp::Erf => (16, 0.0, 0.0),
        UnaryOp::Powf(p) => (17, p, 0.0),
        UnaryOp::Clamp(lo, hi) => (18, lo, hi),
        UnaryOp::Affine(mul, add) => (19, mul, add),
        UnaryOp::GeluErfGrad => (20, 0.0, 0.0),
        UnaryOp::GeluTanhGrad => (21, 0.0, 0.0),
        UnaryOp::SiluGrad => (22, 0.0, 0.0),
        UnaryOp::InRange(lo, hi) => (23, lo, hi),
    }
}

/// The kernel's code for `op`: `BINARY_OPS` in cuda/elementwise.cu, keep the two in sync.
fn binary_code(op: BinaryOp) -> u32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
        BinaryOp::Div => 3,
        BinaryOp::Maximum => 4,
        BinaryOp::Minimum => 5,
    }
}

/// The kernel's code for `op`: `COMPARE_OPS` in cuda/elementwise.cu, keep the two in sync.
fn compare_code(op: CmpOp) -> u32 {
    match op {
        CmpOp::Eq => 0,
        CmpOp::Ne => 1,
        CmpOp::Lt => 2,
        CmpOp::Le => 3,
        CmpOp::Gt => 4,
        CmpOp::Ge => 5,
    }
}

/// The op's name in errors and NVTX ranges.
fn cmp_name(op: CmpOp) -> &'static str {
    match op {
        CmpOp::Eq => "eq",
        CmpOp::Ne => "ne",
        CmpOp::Lt => "lt",
        CmpOp::Le => "le",
        CmpOp::Gt => "gt",
        CmpOp::Ge => "ge",
    }
}

/// The op's name in errors and NVTX ranges.
fn binary_name(op: BinaryOp) -> &'static str {
    match op {
        BinaryOp::Add => "add",
        BinaryOp::Sub => "sub",
        BinaryOp::Mul => "mul",
        BinaryOp::Div => "div",
        BinaryOp::Maximum => "maximum",
        BinaryOp::Minimum => "minimum",
    }
}

/// Grid for `n` elements: a dense launch steps one 16-byte pack (`Lanes` in the .cu) per thread.
fn grid(
    x: &CudaStorage,
    n: usize,
    views: &[Strided],
    widest: usize,
) -> cudarc::driver::LaunchConfig {
    let dense = views
        .iter()
        .all(|s| s.rank == 0 || (s.rank == 1 && s.strides[0] == 1));
    let work = if dense { n.div_ceil(16 / widest) } else { n };
    grid_1d(x.device(), work, THREADS)
}

/// Fails unless the views share one shape, lie inside their storages and live on `first`'s device.
fn check_views(
    op: &'static str,
    first: &CudaStorage,
    views: &[(&CudaStorage, &Layout)],
) -> Result<()> {
    let dims = views[0].1.dims();
    for (s, l) in views {
        check_view(op, s, l)?;
        if l.dims() != dims {
            return Err(Error::ShapeMismatch {
                op,
                lhs: dims.to_vec(),
                rhs: l.dims().to_vec(),
            });
        }
        if !std::sync::Arc::ptr_eq(s.device(), first.device()) {
            return Err(Error::DeviceMismatch {
                op,
                lhs: format!("cuda:{}", first.device().ordinal()),
                rhs: format!("cuda:{}", s.device().ordinal()),
            });
        }
    }
    Ok(())
}

/// out = op(x) over the view `l` (any strides), contiguous, x's dtype (f32/f16/bf16; other dtypes -> Error::UnsupportedDType).
pub fn unary(x: &CudaStorage, l: &Layout, op: UnaryOp) -> Result<CudaStorage> {
    let name = op.name();
    let kernel = match x.dtype() {
        DType::F32 => "unary_f32",
        DType::F16 => "unary_f16",
        DType::BF16 => "unary_bf16",
        dtype => return Err(Error::UnsupportedDType { op: name, dtype }),
    };
    check_view(name, x, l)?;
    let n = l.shape().elem_count();
    let out = CudaStorage::uninit(x.device(), x.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let [sx] = Strided::coalesced(name, [l])?;
    let (code, p0, p1) = unary_code(op);
    launch(
        x.device(),
        name,
        (MODULE, kernel),
        grid(x, n, &[sx], x.dtype().size_in_bytes()),
        &[
            x.ptr().into(),
            sx.into(),
            out.ptr().into(),
            (n as u64).into(),
            code.into(),
            p0.into(),
            p1.into(),
        ],
    )?;
    Ok(out)
}

/// Two views of one shape (broadcasting is already expressed as 0 strides) and one float dtype.
pub fn binary(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    op: BinaryOp,
) -> Result<CudaStorage> {
    let name = binary_name(op);
    let kernel = match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => "binary_f32",
        (DType::F16, DType::F16) => "binary_f16",
        (DType::BF16, DType::BF16) => "binary_bf16",
        (DType::F32 | DType::F16 | DType::BF16, dtype) | (dtype, _) => {
            return Err(Error::UnsupportedDType { op: name, dtype })
        }
    };
    launch_pair(name, kernel, (a, al), (b, bl), a.dtype(), binary_code(op))
}

/// U8 mask (1/0) comparing the values as f32, like the CPU; one dtype of the 6 (mixed -> UnsupportedDType).
pub fn compare(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    op: CmpOp,
) -> Result<CudaStorage> {
    let name = cmp_name(op);
    if a.dtype() != b.dtype() {
        return Err(Error::UnsupportedDType {
            op: name,
            dtype: b.dtype(),
        });
    }
    let kernel = match a.dtype() {
        DType::F32 => "compare_f32",
        DType::F16 => "compare_f16",
        DType::BF16 => "compare_bf16",
        DType::I32 => "compare_i32",
        DType::I8 => "compare_i8",
        DType::U8 => "compare_u8",
    };
    launch_pair(name, kernel, (a, al), (b, bl), DType::U8, compare_code(op))
}

/// Runs a two-view kernel (binary, compare): `kernel(a, sa, b, sb, out, n, code)` into a new contiguous
/// storage of `out_dtype`.
fn launch_pair(
    name: &'static str,
    kernel: &'static str,
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    out_dtype: DType,
    code: u32,
) -> Result<CudaStorage> {
    check_views(name, a, &[(a, al), (b, bl)])?;
    let n = al.shape().elem_count();
    let out = CudaStorage::uninit(a.device(), out_dtype, n)?;
    if n == 0 {
        return Ok(out);
    }
    let [sa, sb] = Strided::coalesced(name, [al, bl])?;
    launch(
        a.device(),
        name,
        (MODULE, kernel),
        grid(a, n, &[sa, sb], a.dtype().size_in_bytes()),
        &[
            a.ptr().into(),
            sa.into(),
            b.ptr().into(),
            sb.into(),
            out.ptr().into(),
            (n as u64).into(),
            code.into(),
        ],
    )?;
    Ok(out)
}

/// `where_<mask dtype>_b<value bits>` in cuda/elementwise.cu.
fn where_kernel(mask: DType, value: DType) -> &'static str {
    const KERNELS: [[&str; 3]; 6] = [
        ["where_f32_b8", "where_f32_b16", "where_f32_b32"],
        ["where_f16_b8", "where_f16_b16", "where_f16_b32"],
        ["where_bf16_b8", "where_bf16_b16", "where_bf16_b32"],
        ["where_i32_b8", "where_i32_b16", "where_i32_b32"],
        ["where_i8_b8", "where_i8_b16", "where_i8_b32"],
        ["where_u8_b8", "where_u8_b16", "where_u8_b32"],
    ];
    let m = dtype_index(mask);
    let v = match value.size_in_bytes() {
        1 => 0,
        2 => 1,
        _ => 2,
    };
    KERNELS[m][v]
}

/// where(mask != 0, t, f): mask of any dtype, t and f one dtype (any of the 6), output t's dtype, contiguous.
pub fn where_cond(
    mask: &CudaStorage,
    ml: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    f: &CudaStorage,
    fl: &Layout,
) -> Result<CudaStorage> {
    const NAME: &str = "where";
    if t.dtype() != f.dtype() {
        return Err(Error::UnsupportedDType {
            op: NAME,
            dtype: f.dtype(),
        });
    }
    check_views(NAME, t, &[(mask, ml), (t, tl), (f, fl)])?;
    let n = ml.shape().elem_count();
    let out = CudaStorage::uninit(t.device(), t.dtype(), n)?;
    if n == 0 {
        return Ok(out);
    }
    let [sm, st, sf] = Strided::coalesced(NAME, [ml, tl, fl])?;
    let widest = mask.dtype().size_in_bytes().max(t.dtype().size_in_bytes());
    launch(
        t.device(),
        NAME,
        (MODULE, where_kernel(mask.dtype(), t.dtype())),
        grid(t, n, &[sm, st, sf], widest),
        &[
            mask.ptr().into(),
            sm.into(),
            t.ptr().into(),
            st.into(),
            f.ptr().into(),
            sf.into(),
            out.ptr().into(),
            (n as u64).into(),
        ],
    )?;
    Ok(out)
}
