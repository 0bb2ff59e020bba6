//! NVTX ranges around every launcher, so nsys and ncu timelines name trit's ops. Built with the `nvtx`
//! feature (NVIDIA's header-only NVTX v3 through the `nvtx` crate; its build needs libclang); without it
//! a range is a zero-sized no-op.

/// Open until dropped.
#[must_use = "the range closes when this is dropped"]
pub struct Range {
    #[cfg(feature = "nvtx")]
    _inner: nvtx::LocalRange,
}

/// Opens a range named `op` on the calling thread.
#[inline]
pub fn range(op: &'static str) -> Range {
    #[cfg(feature = "nvtx")]
    {
        Range {
            _inner: nvtx::LocalRange::new(nvtx::Str::from_str_lossy(op)),
        }
    }
    #[cfg(not(feature = "nvtx"))]
    {
        let _ = op;
        Range {}
    }
}
