//! [`QTensor`] products on a GPU: the packed bytes are uploaded to a device once (on first use, or up
//! front with [`QTensor::prepare_device`]) and kept beside the host copy, and activations on that device
//! run the packed CUDA kernels (`crate::cuda::qmatmul`).
//!
//! The kernels multiply the dequantized weights by float activations. The other activation forms of
//! [`ActMode`] are applied to x on the device first, with the CPU kernels' rules (per-token or per-block
//! int8, per-token binary), so a product computes what the CPU's does up to f32 summation order; the
//! integer dot products themselves are not emulated.

use super::format::QTensor;
use crate::cpu::qmatmul::ActMode;
use crate::error::Result;
use crate::storage::Device;
use crate::tensor::Tensor;

#[cfg(feature = "cuda")]
use crate::cuda::CudaQWeights;
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex};

/// The device copies of one QTensor, one per device it has been used on.
#[derive(Default)]
pub(crate) struct DeviceCopies {
    #[cfg(feature = "cuda")]
    copies: Mutex<Vec<Arc<CudaQWeights>>>,
}

impl Clone for DeviceCopies {
    fn clone(&self) -> Self {
        #[cfg(feature = "cuda")]
        {
            let copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
            DeviceCopies {
                copies: Mutex::new(copies.clone()),
            }
        }
        #[cfg(not(feature = "cuda"))]
        DeviceCopies {}
    }
}

impl std::fmt::Debug for DeviceCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(feature = "cuda")]
        {
            let copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
            let ordinals: Vec<usize> = copies.iter().map(|c| c.device().ordinal()).collect();
            write!(f, "DeviceCopies({ordinals:?})")
        }
        #[cfg(not(feature = "cuda"))]
        write!(f, "DeviceCopies([])")
    }
}

impl QTensor {
    /// Uploads the packed weights to `device` now rather than on the first product there (when loading
    /// a model). A no-op on the CPU and for a device that already holds them.
    pub fn prepare_device(&self, device: Device) -> Result<()> {
        match device {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => self.cuda_weights(n).map(|_| ()),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => device.check(),
        }
    }

    /// The copy of these weights on CUDA device `ordinal`, uploaded on first use.
    #[cfg(feature = "cuda")]
    pub fn cuda_weights(&self, ordinal: usize) -> Result<Arc<CudaQWeights>> {
        let mut copies = self
            .device_copies
            .copies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = copies.iter().find(|c| c.device().ordinal() == ordinal) {
            return Ok(c.clone());
        }
        let dev = crate::cuda::CudaDevice::get(ordinal)?;
        let c = Arc::new(CudaQWeights::upload(&dev, self)?);
        copies.push(c.clone());
        Ok(c)
    }

    /// Device bytes held by the uploaded copies (0 before the first GPU product).
    pub fn device_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            let copies = self
                .device_copies
                .copies
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            copies.iter().map(|c| c.byte_size()).sum()
        }
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// [`QTensor::matmul`] for activations on a GPU; the caller checked shapes, dtype and `act`.
    /// Returns [.., rows] in x's dtype on x's device.
    pub(super) fn matmul_device(&self, x: &Tensor, act: ActMode) -> Result<Tensor> {
        let x = act_form(x, act)?;
        #[cfg(feature = "cuda")]
        {
            let Device::Cuda(n) = x.device() else {
                unreachable!("the caller routes only GPU activations here")
            };
            let w = self.cuda_weights(n)?;
            let k = self.cols();
            let m = x.elem_count() / k.max(1);
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("rank checked by the caller") = self.rows();
            // The kernels read x from element 0 of its block: a view that starts elsewhere is copied.
            let x = match x.layout().contiguous_range() {
                Some(r) if r.start == 0 => x,
                _ => x.copy()?,
            };
            let y = x
                .with_cuda_storage(|xs| crate::cuda::qmatmul::qmatmul(&w, xs, m))
                .expect("a tensor on a CUDA device has CUDA storage")?;
            Tensor::from_cuda_storage(y, dims)
        }
        #[cfg(not(feature = "cuda"))]
        {
            x.device().check()?;
            unreachable!("without the cuda feature no tensor lives on a GPU")
        }
    }
}

/// x in the form `act` feeds the kernel, computed with tensor ops on x's device: unchanged for
/// `ActMode::F32`; s·round(x/s) with s = max|x|/127 per token (`Int8`) or per block of 32 columns
/// (`Int8Blocks`; the CPU rounds those ties to even, this rounds them away from zero, which moves a
/// code only when x/s is exactly half-way); β·sign(x) with β = mean|x| per token and sign(0) = +1
/// (`Binary`).
fn act_form(x: &Tensor, act: ActMode) -> Result<Tensor> {
    let _guard = crate::tensor::no_grad();
    let last = x.rank() - 1;
    match act {
        ActMode::F32 => Ok(x.detach()),
        ActMode::Int8 => int8_rows(x, last),
        ActMode::Int8Blocks => {
            const BLOCK: usize = 32;
            let k = x.dims()[last];
            let padded = k.div_ceil(BLOCK) * BLOCK;
            let lead = &x.dims()[..last];
            let xp = if padded == k {
                x.clone()
            } else {
                let pad = Tensor::zeros([lead, &[padded - k]].concat(), x.dtype(), x.device())?;
                Tensor::cat(&[x.clone(), pad], last)?
            };
            let blocks = xp.reshape([lead, &[padded / BLOCK, BLOCK]].concat())?;
            int8_rows(&blocks, last + 1)?
                .reshape([lead, &[padded]].concat())?
                .narrow(last, 0, k)
        }
        ActMode::Binary => {
            let beta = x.abs()?.mean_keepdim(last)?;
            let zero = Tensor::zeros(1, x.dtype(), x.device())?;
            let sign = Tensor::where_cond(
                &x.ge(&zero)?,
                &Tensor::ones(1, x.dtype(), x.device())?,
                &Tensor::full(-1.0, 1, x.dtype(), x.device())?,
            )?;
            sign.mul(&beta)
        }
    }
}

/// s·round(x/s), s = max|x|/127 over dim `dim` (an all-zero row stays zero).
fn int8_rows(x: &Tensor, dim: usize) -> Result<Tensor> {
    let amax = x.abs()?.max_keepdim(dim)?;
    // A zero row divides by the smallest normal instead of 0, which rounds every code to 0.
    let s = amax
        .mul_scalar(1.0 / 127.0)?
        .clamp(f32::MIN_POSITIVE, f32::MAX)?;
    x.div(&s)?.round()?.clamp(-127.0, 127.0)?.mul(&s)
}
