//! Counts of host↔device copies, so a training loop can show it makes no hidden round-trips
//! (`trit demo --device cuda --verbose` prints them per step). Always zero in builds without CUDA.

use std::sync::atomic::{AtomicU64, Ordering};

static H2D: AtomicU64 = AtomicU64::new(0);
static D2H: AtomicU64 = AtomicU64::new(0);
static H2D_BYTES: AtomicU64 = AtomicU64::new(0);
static D2H_BYTES: AtomicU64 = AtomicU64::new(0);

/// Copies since the last [`reset`] (or program start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub host_to_device: u64,
    pub device_to_host: u64,
    pub host_to_device_bytes: u64,
    pub device_to_host_bytes: u64,
}

impl TransferStats {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &TransferStats) -> TransferStats {
        TransferStats {
            host_to_device: self.host_to_device - earlier.host_to_device,
            device_to_host: self.device_to_host - earlier.device_to_host,
            host_to_device_bytes: self.host_to_device_bytes - earlier.host_to_device_bytes,
            device_to_host_bytes: self.device_to_host_bytes - earlier.device_to_host_bytes,
        }
    }
}

impl std::fmt::Display for TransferStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} host→device ({} B), {} device→host ({} B)",
            self.host_to_device,
            self.host_to_device_bytes,
            self.device_to_host,
            self.device_to_host_bytes
        )
    }
}

pub fn snapshot() -> TransferStats {
    TransferStats {
        host_to_device: H2D.load(Ordering::Relaxed),
        device_to_host: D2H.load(Ordering::Relaxed),
        host_to_device_bytes: H2D_BYTES.load(Ordering::Relaxed),
        device_to_host_bytes: D2H_BYTES.load(Ordering::Relaxed),
    }
}

pub fn reset() {
    for c in [&H2D, &D2H, &H2D_BYTES, &D2H_BYTES] {
        c.store(0, Ordering::Relaxed);
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn record_h2d(bytes: usize) {
    H2D.fetch_add(1, Ordering::Relaxed);
    H2D_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn record_d2h(bytes: usize) {
    D2H.fetch_add(1, Ordering::Relaxed);
    D2H_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}
