//! The committed PTX (ptx/, compiled from cuda/ by cuda/build-ptx.sh), embedded so that building trit
//! never needs nvcc. Loaded per device on first use of one of its kernels.

/// (module name, PTX text), one per cuda/<name>.cu.
pub const MODULES: &[(&str, &str)] = &[
    ("copy", include_str!("../../ptx/copy.ptx")),
    ("elementwise", include_str!("../../ptx/elementwise.ptx")),
    ("flash_bwd", include_str!("../../ptx/flash_bwd.ptx")),
    ("flash_fwd", include_str!("../../ptx/flash_fwd.ptx")),
    ("index", include_str!("../../ptx/index.ptx")),
    ("kvattn", include_str!("../../ptx/kvattn.ptx")),
    ("kvcache", include_str!("../../ptx/kvcache.ptx")),
    ("loss", include_str!("../../ptx/loss.ptx")),
    ("norm", include_str!("../../ptx/norm.ptx")),
    ("optim", include_str!("../../ptx/optim.ptx")),
    ("qgemm", include_str!("../../ptx/qgemm.ptx")),
    ("qgemv", include_str!("../../ptx/qgemv.ptx")),
    ("reduce", include_str!("../../ptx/reduce.ptx")),
    ("rope", include_str!("../../ptx/rope.ptx")),
    ("softmax", include_str!("../../ptx/softmax.ptx")),
];

pub fn source(module: &str) -> Option<&'static str> {
    MODULES.iter().find(|(m, _)| *m == module).map(|(_, s)| *s)
}
