//! Launchers for cuda/optim.cu: fused AdamW and SGD-with-momentum steps, in place on f32 parameters and
//! state, with the same formulas and rounding order as src/optim (an f32 step matches the CPU bit for bit).

use super::index::{check_len, float_kernel, strided_view};
use super::launch::{grid_1d, launch, Arg};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::op::{AdamWStep, SgdStep};

const THREADS: u32 = 256;

/// Fails unless every state storage is F32 with `n` elements, then gives each a private block (an
/// in-place update must not reach a tensor that shares it).
fn private_f32(op: &'static str, n: usize, states: &mut [&mut CudaStorage]) -> Result<()> {
    for s in states.iter_mut() {
        if s.dtype() != DType::F32 {
            return Err(Error::UnsupportedDType {
                op,
                dtype: s.dtype(),
            });
        }
        if s.len() != n {
            crate::bail!(op, "state holds {} elements, {n} expected", s.len());
        }
        s.make_unique()?;
    }
    Ok(())
}

/// One AdamW update in place (same formula/order of operations as src/optim/adamw.rs `update`): p, m, v are F32
/// contiguous storages of n elements (the caller made them private); g is a view (any float dtype) of n elements.
pub fn adamw_step(
    p: &mut CudaStorage,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    g: &CudaStorage,
    gl: &Layout,
    hp: AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw";
    let name = float_kernel(OP, g.dtype(), ["adamw_f32", "adamw_f16", "adamw_bf16"])?;
    let n = p.len();
    check_len(OP, "the gradient", gl, n)?;
    private_f32(OP, n, &mut [&mut *p, &mut *m, &mut *v])?;
    if n == 0 {
        return Ok(());
    }
    let (g_ptr, gs) = strided_view(OP, g, gl)?;
    // Computed once here exactly as the CPU computes them (f32, no fused multiply-add).
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let step = hp.lr / hp.bc1;
    let dev = p.device();
    launch(
        dev,
        OP,
        ("optim", name),
        grid_1d(dev, n.div_ceil(4), THREADS),
        &[
            Arg::from(p.ptr()),
            m.ptr().into(),
            v.ptr().into(),
            g_ptr.into(),
            gs.into(),
            (n as u64).into(),
            hp.beta1.into(),
            (1.0 - hp.beta1).into(),
            hp.beta2.into(),
            (1.0 - hp.beta2).into(),
            hp.bc2.into(),
            hp.eps.into(),
            decay.into(),
            step.into(),
        ],
    )
}

/// One SGD-with-momentum update in place (src/optim/sgd.rs).
pub fn sgd_step(
    p: &mut CudaStorage,
    buf: &mut CudaStorage,
    g: &CudaStorage,
    gl: &Layout,
    hp: SgdStep,
) -> Result<()> {
    const OP: &str = "sgd";
    let name = float_kernel(OP, g.dtype(), ["sgd_f32", "sgd_f16", "sgd_bf16"])?;
    let n = p.len();
    check_len(OP, "the gradient", gl, n)?;
    private_f32(OP, n, &mut [&mut *p, &mut *buf])?;
    if n == 0 {
        return Ok(());
    }
    let (g_ptr, gs) = strided_view(OP, g, gl)?;
    let dev = p.device();
    launch(
        dev,
        OP,
        ("optim", name),
        grid_1d(dev, n.div_ceil(4), THREADS),
        &[
            Arg::from(p.ptr()),
            buf.ptr().into(),
            g_ptr.into(),
            gs.into(),
            (n as u64).into(),
            hp.lr.into(),
            hp.momentum.into(),
            hp.weight_decay.into(),
            u32::from(hp.nesterov).into(),
        ],
    )
}
