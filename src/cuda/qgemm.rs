//! Launcher for cuda/qgemm.cu: the tensor-core GEMM for packed low-bit weights (the kernel file's header
//! describes the tiling). This side picks the tile by m, lays out the per-block scale tables, sizes the
//! copy pipeline to 48 KB of shared memory and launches one block per 128 output features × tile rows.

use super::launch::{dtype_index, launch, Arg};
use super::qmatmul::CudaQWeights;
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::QFormat;
use cudarc::driver::LaunchConfig;

/// Output features per block (`kBN` in cuda/qgemm.cu).
const BN: usize = 128;
/// Packed part of a W buffer: 64 bytes for each of the block's weight rows (`kWBytes`).
const W_BYTES: usize = BN * 64;
/// Dynamic shared memory a launch may use without raising the function's limit.
const SMEM_LIMIT: usize = 48 * 1024;
/// Deepest copy pipeline the kernels wait on (`kMaxLookahead`).
const MAX_LOOKAHEAD: usize = 6;

/// Block tiles, each a kernel: BM rows of x by 128 output features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tile {
    M16,
    M64,
    M128,
}

impl Tile {
    const ALL: [Tile; 3] = [Tile::M16, Tile::M64, Tile::M128];

    /// Small m runs 16-row tiles so the tensor cores do not multiply padding rows while the weights
    /// stream; f32 activations stop at 64 rows, where a step of 8 KB of them still spans 32 weights.
    fn for_m(m: usize, elem: usize) -> Tile {
        match m {
            0..=16 => Tile::M16,
            17..=64 => Tile::M64,
            _ if elem == 4 => Tile::M64,
            _ => Tile::M128,
        }
    }

    fn bm(self) -> usize {
        match self {
            Tile::M16 => 16,
            Tile::M64 => 64,
            Tile::M128 => 128,
        }
    }

    /// Warps: 16-row tiles split each step's k slices between two groups of four (the weights of a block
    /// are the same either way, so this buys latency hiding without more activation traffic).
    fn threads(self) -> u32 {
        match self {
            Tile::M64 => 128,
            Tile::M16 | Tile::M128 => 256,
        }
    }

    /// The largest step (weights of k) whose activation stage fits 8 KB (`Tile::ks_max` in the kernel).
    fn ks_max(self, elem: usize) -> Option<usize> {
        match (self, elem) {
            (Tile::M16, _) => Some(128),
            (Tile::M64, 4) => Some(32),
            (Tile::M64, _) => Some(64),
            (Tile::M128, 4) => None,
            (Tile::M128, _) => Some(32),
        }
    }
}

/// Weights of k in one W buffer (`block_k` in the kernel): one packed block, eight for Binary.
fn block_k(f: QFormat) -> usize {
    match f {
        QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => 256,
        QFormat::Binary { .. } => 512,
        QFormat::Int4 { .. } => 128,
        QFormat::Int8 { .. } => 64,
    }
}

/// `qgemm_<format>_<dtype>_<tile>`; None where no such kernel exists (f32 with 128-row tiles).
fn kernel_name(f: QFormat, dtype: DType, tile: Tile) -> Option<&'static str> {
    macro_rules! names {
        ($f:literal) => {
            [
                [
                    Some(concat!("qgemm_", $f, "_f32_m16")),
                    Some(concat!("qgemm_", $f, "_f32_m64")),
                    None,
                ],
                [
                    Some(concat!("qgemm_", $f, "_f16_m16")),
                    Some(concat!("qgemm_", $f, "_f16_m64")),
                    Some(concat!("qgemm_", $f, "_f16_m128")),
                ],
                [
                    Some(concat!("qgemm_", $f, "_bf16_m16")),
                    Some(concat!("qgemm_", $f, "_bf16_m64")),
                    Some(concat!("qgemm_", $f, "_bf16_m128")),
                ],
            ]
        };
    }
    const NAMES: [[[Option<&str>; 3]; 3]; 6] = [
        names!("t2"),
        names!("t3"),
        names!("b1"),
        names!("i4"),
        names!("i4a"),
        names!("i8"),
    ];
    let fi = match f {
        QFormat::Ternary2 { .. } => 0,
        QFormat::Ternary3 { .. } => 1,
        QFormat::Binary { .. } => 2,
        QFormat::Int4 { asym: false, .. } => 3,
        QFormat::Int4 { asym: true, .. } => 4,
        QFormat::Int8 { .. } => 5,
    };
    let di = dtype_index(dtype);
    let ti = Tile::ALL.iter().position(|&t| t == tile)?;
    NAMES.get(fi)?.get(di)?[ti]
}

/// How a W buffer's scale table (and mins table) maps onto the scale groups: `1 << se_log2` entries per
/// row, the entry of a weight its k within the block `>> sshift`, entry e of block b holding group
/// `min((b · entries + e) / qdiv, groups_per_row − 1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScaleLayout {
    se_log2: u32,
    sshift: u32,
    qdiv: u32,
}

impl ScaleLayout {
    /// Groups per row of 1 (per-row scales, any group size) take one entry per block; otherwise a group
    /// is a power of two of at least 32 weights inside a block, or whole blocks.
    fn new(f: QFormat, group_size: usize, groups_per_row: usize) -> Result<ScaleLayout> {
        let bkw = block_k(f);
        if groups_per_row <= 1 {
            return Ok(ScaleLayout {
                se_log2: 0,
                sshift: bkw.trailing_zeros(),
                qdiv: 1,
            });
        }
        let step = group_size.min(bkw);
        if step < 32 || !step.is_power_of_two() || !group_size.is_multiple_of(step) {
            crate::bail!(
                "qgemm",
                "{f:?}: groups of {group_size} weights are neither powers of two from 32 nor whole {bkw}-weight blocks"
            );
        }
        let entries = bkw / step;
        Ok(ScaleLayout {
            se_log2: entries.trailing_zeros(),
            sshift: step.trailing_zeros(),
            qdiv: u32::try_from(group_size / step).map_err(|_| Error::Cuda {
                op: "qgemm",
                msg: format!("group size {group_size} exceeds the kernels' 32-bit indices"),
            })?,
        })
    }

    fn entries(self) -> usize {
        1 << self.se_log2
    }
}

/// A launch: the tile, the copy pipeline and the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    tile: Tile,
    /// Steps in flight; the activation ring has one stage more.
    lookahead: usize,
    /// W buffers in the ring.
    wbufs: usize,
    smem: usize,
    /// (blocks over N, blocks over m).
    grid: (u32, u32),
}

impl Plan {
    /// The deepest pipeline within [`SMEM_LIMIT`]: an activation stage per step in flight and one more, and
    /// enough W buffers that none is refilled before every step reading it has passed a barrier.
    fn new(
        f: QFormat,
        elem: usize,
        m: usize,
        n: usize,
        layout: ScaleLayout,
        mins: bool,
    ) -> Result<Plan> {
        let tile = Tile::for_m(m, elem);
        let Some(ks_max) = tile.ks_max(elem) else {
            crate::bail!("qgemm", "no {tile:?} kernel for {elem}-byte activations");
        };
        let bkw = block_k(f);
        let ks = bkw.min(ks_max);
        let steps_per_block = bkw / ks;
        let stage = tile.bm() * ks * elem;
        let wbuf = W_BYTES + BN * layout.entries() * 4 * (1 + usize::from(mins));
        let size = |l: usize| {
            let wbufs = l.div_ceil(steps_per_block) + 1;
            (wbufs, (l + 1) * stage + wbufs * wbuf)
        };
        let Some(lookahead) = (1..=MAX_LOOKAHEAD).rev().find(|&l| size(l).1 <= SMEM_LIMIT) else {
            crate::bail!(
                "qgemm",
                "{f:?} does not fit {SMEM_LIMIT} bytes of shared memory"
            );
        };
        let (wbufs, smem) = size(lookahead);
        let blocks = |total: usize, per: usize| {
            u32::try_from(total.div_ceil(per)).map_err(|_| Error::Cuda {
                op: "qgemm",
                msg: format!("{total} rows exceed one grid"),
            })
        };
        let grid = (blocks(n, BN)?, blocks(m, tile.bm())?);
        if grid.1 > 65535 {
            crate::bail!("qgemm", "{m} rows of activations exceed one grid");
        }
        Ok(Plan {
            tile,
            lookahead,
            wbufs,
            smem,
            grid,
        })
    }
}

fn u32_arg(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&v| v < 1 << 31)
        .ok_or_else(|| Error::Cuda {
            op: "qgemm",
            msg: format!("{what} = {v} exceeds the kernels' 31-bit indices"),
        })
}

/// y[m, rows] = x[m, cols] · Ŵᵀ for any m, y in x's dtype. The products run on tensor cores with f32
/// accumulation: f32 activations are rounded to bf16 first, f16 activations meet f16 weights (scale ·
/// code rounded to f16), bf16 ones bf16 weights.
pub fn gemm(w: &CudaQWeights, x: &CudaStorage, m: usize) -> Result<CudaStorage> {
    w.check_input("qgemm", x, m)?;
    let (dev, dtype, f) = (x.device(), x.dtype(), w.format());
    let (n, k) = (w.rows(), w.cols());
    if m == 0 || n == 0 {
        return CudaStorage::uninit(dev, dtype, m * n);
    }
    if k == 0 {
        return CudaStorage::zeros(dev, dtype, m * n);
    }
    let mins = w.mins();
    if mins.is_none() && matches!(f, QFormat::Int4 { asym: true, .. }) {
        crate::bail!("qgemm", "{f:?} weights need their mins");
    }
    let layout = ScaleLayout::new(f, w.group_size(), w.groups_per_row())?;
    let elem = dtype.size_in_bytes();
    let plan = Plan::new(f, elem, m, n, layout, mins.is_some())?;
    let kernel =
        kernel_name(f, dtype, plan.tile).ok_or(Error::UnsupportedDType { op: "qgemm", dtype })?;
    let out = CudaStorage::uninit(dev, dtype, m * n)?;
    let cfg = LaunchConfig {
        grid_dim: (plan.grid.0, plan.grid.1, 1),
        block_dim: (plan.tile.threads(), 1, 1),
        shared_mem_bytes: plan.smem as u32,
    };
    launch(
        dev,
        "qgemm",
        ("qgemm", kernel),
        cfg,
        &[
            x.ptr().into(),
            out.ptr().into(),
            w.data().ptr().into(),
            w.scales().ptr().into(),
            Arg::U64(mins.map_or(0, CudaStorage::ptr)),
            u32_arg("m", m)?.into(),
            u32_arg("rows", n)?.into(),
            u32_arg("cols", k)?.into(),
            (w.row_bytes() as u64).into(),
            u32_arg("groups per row", w.groups_per_row())?.into(),
            layout.se_log2.into(),
            layout.sshift.into(),
            layout.qdiv.into(),
            (plan.lookahead as u32).into(),
            (plan.wbufs as u32).into(),
        ],
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Group;

    fn formats() -> Vec<QFormat> {
        let mut v = Vec::new();
        for g in [
            Group::Row,
            Group::Size(32),
            Group::Size(64),
            Group::Size(128),
        ] {
            v.push(QFormat::Int4 {
                group: g,
                asym: false,
            });
            v.push(QFormat::Int4 {
                group: g,
                asym: true,
            });
            v.push(QFormat::Int8 { group: g });
            v.push(QFormat::Ternary2 { group: g });
        }
        v.push(QFormat::Ternary2 {
            group: Group::Size(256),
        });
        for g in [Group::Row, Group::Size(256), Group::Size(768)] {
            v.push(QFormat::Ternary3 { group: g });
        }
        v.push(QFormat::Binary { offset: false });
        v.push(QFormat::Binary { offset: true });
        v
    }

    #[test]
    fn scale_entries_name_the_group_of_every_weight() {
        for f in formats() {
            for cols in [1, 5, 31, 64, 100, 256, 300, 1000, 4096] {
                let (gs, gpr) = (f.group_size(cols), f.groups_per_row(cols));
                let l = ScaleLayout::new(f, gs, gpr).unwrap();
                let bkw = block_k(f);
                assert!(l.entries() <= bkw / 32 || l.entries() == 1, "{f:?}");
                // Every weight the kernel reads, padding included, finds its group (or the last one).
                for k in 0..cols.div_ceil(bkw) * bkw {
                    let (b, e) = (k / bkw, (k % bkw) >> l.sshift);
                    assert!(e < l.entries());
                    let got = ((b * l.entries() + e) / l.qdiv as usize).min(gpr - 1);
                    assert_eq!(got, (k / gs).min(gpr - 1), "{f:?} cols {cols} k {k}");
                }
            }
        }
    }

    #[test]
    fn plans_fit_shared_memory_and_cover_the_output() {
        for f in formats() {
            let l = ScaleLayout::new(f, f.group_size(4096), f.groups_per_row(4096)).unwrap();
            for elem in [2, 4] {
                for m in (1..=300).chain([1000, 4096, 100_000]) {
                    for n in [1, 127, 128, 129, 28672] {
                        let p = Plan::new(f, elem, m, n, l, f.has_mins()).unwrap();
                        let bm = p.tile.bm();
                        assert!(p.smem <= SMEM_LIMIT);
                        assert!((1..=MAX_LOOKAHEAD).contains(&p.lookahead));
                        let ks = block_k(f).min(p.tile.ks_max(elem).unwrap());
                        assert!(ks >= 32 && block_k(f).is_multiple_of(ks));
                        let steps = block_k(f) / ks;
                        assert!(p.wbufs > p.lookahead.div_ceil(steps));
                        let (gx, gy) = (p.grid.0 as usize, p.grid.1 as usize);
                        assert!(gx * BN >= n && (gx - 1) * BN < n);
                        assert!(gy * bm >= m && (gy - 1) * bm < m);
                        let dtype = if elem == 4 { DType::F32 } else { DType::BF16 };
                        assert!(kernel_name(f, dtype, p.tile).is_some());
                        if m <= 16 {
                            assert_eq!(p.tile, Tile::M16);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_is_in_the_ptx() {
        let ptx = crate::cuda::ptx::source("qgemm").unwrap();
        for f in formats() {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                for tile in Tile::ALL {
                    let want = tile.ks_max(dtype.size_in_bytes()).is_some();
                    let name = kernel_name(f, dtype, tile);
                    assert_eq!(name.is_some(), want, "{f:?} {dtype:?} {tile:?}");
                    if let Some(name) = name {
                        assert!(ptx.contains(&format!(".entry {name}(")), "{name}");
                    }
                }
            }
        }
    }
}
