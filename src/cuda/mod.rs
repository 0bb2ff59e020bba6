//! The CUDA backend (feature `cuda`): a device with one stream and a caching allocator, the committed
//! PTX kernels and their launchers (one file per family, next to cuda/<family>.cu), and cuBLAS for dense
//! matmul. Only `storage.rs` calls into here.

pub mod alloc;
pub mod copy;
pub mod device;
pub mod elementwise;
pub mod flash;
pub mod index;
pub mod kvattn;
pub mod kvcache;
pub mod launch;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod nvtx;
pub mod optim;
pub mod ptx;
pub mod qgemm;
pub mod qgemv;
pub mod qmatmul;
pub mod reduce;
pub mod rope;
pub mod softmax;
pub mod storage;

pub use alloc::PoolStats;
pub use device::{probe, CudaDevice, DeviceProps};
pub use qmatmul::CudaQWeights;
pub use storage::{set_poison, CudaStorage};
