//! Launcher for cuda/qgemv.cu: decode GEMV y[m, rows] = x[m, cols] · Ŵᵀ over packed weights for
//! m ≤ [`GEMV_MAX_M`], streaming every weight byte once.
//!
//! The kernels stage a K chunk of the activations in shared memory and loop their warps over tasks of
//! rows (see the top of cuda/qgemv.cu). This side picks the chunk (split-K when the rows alone leave the
//! GPU short of work), the lane-group width and the grid ([`plan`], pure host logic), and folds the f32
//! partials of a split launch with `qgemv_reduce` in chunk order, so results never depend on timing.

use super::launch::{grid_1d, launch, Arg};
use super::qmatmul::{CudaQWeights, GEMV_MAX_M};
use super::storage::CudaStorage;
use crate::dtype::DType;
use crate::error::Result;
use crate::quant::QFormat;
use cudarc::driver::LaunchConfig;

const OP: &str = "qgemv";
/// Threads per block (`QG_THREADS`).
const THREADS: u32 = 256;
const WARPS_PER_BLOCK: usize = THREADS as usize / 32;
/// Dynamic shared memory per block (`QG_SMEM_BYTES`): the activation tile and 32 floats of scratch.
const SMEM_BYTES: usize = 48 * 1024;
/// Floats of the activation tile (`QG_TILE_FLOATS`).
const TILE_FLOATS: usize = SMEM_BYTES / 4 - 32;
/// Resident warps per SM the launch plans for: the kernels' launch bounds guarantee two blocks.
const RESIDENT_WARPS_PER_SM: usize = 2 * WARPS_PER_BLOCK;
/// Work the plan aims for: two waves of warp tasks over the resident warps.
const WAVES: usize = 2;
/// Chunks are whole 256-weight spans, a multiple of every format's block.
const SPAN: usize = 256;

/// How a format's rows are cut into the units a lane loads and staged (`QTraits` in cuda/qgemv.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// Weights per packed block.
    block_weights: usize,
    /// Units (16-, 8- or 4-byte loads) per packed block.
    units_per_block: usize,
    /// Staged float4s per unit and token.
    steps: usize,
    /// Staged activation sums per unit and token.
    runs: usize,
    /// Staged floats per token outside the tile's units (b1: two chunk constants).
    extra_per_token: usize,
}

impl Geometry {
    fn of(format: QFormat) -> Geometry {
        let g = |block_weights, units_per_block, steps, runs, extra_per_token| Geometry {
            block_weights,
            units_per_block,
            steps,
            runs,
            extra_per_token,
        };
        match format {
            QFormat::Ternary2 { .. } => g(256, 4, 16, 4, 0),
            QFormat::Ternary3 { .. } => g(256, 13, 5, 1, 0),
            QFormat::Binary { .. } => g(64, 1, 16, 0, 2),
            QFormat::Int4 { asym: false, .. } => g(128, 4, 8, 0, 0),
            QFormat::Int4 { asym: true, .. } => g(128, 4, 8, 2, 0),
            QFormat::Int8 { .. } => g(64, 4, 4, 0, 0),
        }
    }

    /// Units in one 256-weight span.
    fn span_units(&self) -> usize {
        self.units_per_block * (SPAN / self.block_weights)
    }

    /// Units per row that the tile holds for m tokens (`qg_units`): whole spans.
    fn units_capacity(&self, m: usize) -> usize {
        let per_unit = m * (4 * self.steps + self.runs);
        (TILE_FLOATS - self.extra_per_token * m) / per_unit / self.span_units() * self.span_units()
    }
}

/// Rows per lane group for m tokens (`qg_rows`).
fn rows_per_group(m: usize) -> usize {
    if m <= 4 {
        4
    } else {
        2
    }
}

/// A launch's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// Weights per K chunk (a multiple of 256); chunk c covers [c·chunk, min((c+1)·chunk, cols)).
    chunk: usize,
    /// K chunks (grid y); more than one goes through the f32 workspace and `qgemv_reduce`.
    splits: usize,
    /// Lanes per row group (a power of two up to 32).
    lanes: usize,
    /// Blocks per chunk (grid x); the warps loop over the chunk's tasks.
    blocks: usize,
}

/// Lanes per row group for rows of `units` units: a full warp, or the smallest power of two covering
/// a shorter row so that a warp works on several groups of rows at once.
fn lane_width(units: usize) -> usize {
    units.next_power_of_two().min(32)
}

/// Warp tasks of one chunk: row groups of `rows_per_group(m)` rows, 32 / lanes of them per task.
fn tasks_per_chunk(rows: usize, m: usize, lanes: usize) -> usize {
    rows.div_ceil(rows_per_group(m) * (32 / lanes))
}

/// The chunk, split count, lane width and grid for `rows` × `cols` weights of `geo` and m tokens on a
/// GPU of `sms` SMs. The chunk is the tile's capacity, or smaller while the GPU has under two waves of
/// warp tasks and each chunk still gives every lane of a warp a unit; the blocks give each resident warp
/// an even share of the tasks.
fn plan(rows: usize, cols: usize, m: usize, geo: Geometry, sms: usize) -> Plan {
    let spans = cols.div_ceil(SPAN);
    let cap = geo.units_capacity(m) / geo.span_units();
    let target = WAVES * RESIDENT_WARPS_PER_SM * sms.max(1);
    let shape = |per_chunk: usize| {
        let splits = spans.div_ceil(per_chunk);
        let weights = (per_chunk * SPAN).min(cols);
        let lanes = lane_width(weights.div_ceil(geo.block_weights) * geo.units_per_block);
        (splits, lanes, tasks_per_chunk(rows, m, lanes) * splits)
    };
    let mut per_chunk = spans.min(cap);
    let mut splits = spans.div_ceil(per_chunk);
    while shape(per_chunk).2 < target && splits < spans {
        splits += 1;
        let next = spans.div_ceil(splits);
        if next * geo.span_units() < 32 {
            break;
        }
        per_chunk = next;
    }
    let (splits, lanes, total) = shape(per_chunk);
    let capacity = RESIDENT_WARPS_PER_SM * sms.max(1);
    let per_warp = total.div_ceil(capacity).max(1);
    let warps = tasks_per_chunk(rows, m, lanes).div_ceil(per_warp);
    Plan {
        chunk: per_chunk * SPAN,
        splits,
        lanes,
        blocks: warps.div_ceil(WARPS_PER_BLOCK).max(1),
    }
}

/// (mul, shift) with n / d == (n · mul) >> shift for every n < 2^31: the kernels' scale-group index.
fn divider(d: usize) -> (u32, u32) {
    let d = d.max(1) as u64;
    let l = 64 - (d - 1).leading_zeros();
    let shift = 31 + l;
    ((1u64 << shift).div_ceil(d) as u32, shift)
}

/// The kernel of `format` for `dtype` (F32, F16 or BF16, which `check_input` has ensured).
fn kernel(format: QFormat, dtype: DType) -> &'static str {
    macro_rules! pick {
        ($f:literal) => {
            match dtype {
                DType::F16 => concat!("qgemv_", $f, "_f16"),
                DType::BF16 => concat!("qgemv_", $f, "_bf16"),
                _ => concat!("qgemv_", $f, "_f32"),
            }
        };
    }
    match format {
        QFormat::Ternary2 { .. } => pick!("t2"),
        QFormat::Ternary3 { .. } => pick!("t3"),
        QFormat::Binary { .. } => pick!("b1"),
        QFormat::Int4 { asym: false, .. } => pick!("i4"),
        QFormat::Int4 { asym: true, .. } => pick!("i4a"),
        QFormat::Int8 { .. } => pick!("i8"),
    }
}

fn reduce_kernel(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "qgemv_reduce_f16",
        DType::BF16 => "qgemv_reduce_bf16",
        _ => "qgemv_reduce_f32",
    }
}

fn to_u32(what: &str, n: usize) -> Result<u32> {
    match u32::try_from(n) {
        Ok(v) if v < 1 << 31 => Ok(v),
        _ => crate::bail!(OP, "{what} of {n} exceeds the kernels' 31-bit range"),
    }
}

/// y[m, rows] = x[m, cols] · Ŵᵀ for x contiguous [m, cols] (f32, f16 or bf16) and m ≤ [`GEMV_MAX_M`];
/// y has x's dtype. m = 0 (or no rows) is an empty output and no launch; cols = 0 gives zeros.
pub fn gemv(w: &CudaQWeights, x: &CudaStorage, m: usize) -> Result<CudaStorage> {
    w.check_input(OP, x, m)?;
    if m > GEMV_MAX_M {
        crate::bail!(OP, "the GEMV takes 1 to {GEMV_MAX_M} tokens, got {m}");
    }
    let (dev, dtype) = (x.device(), x.dtype());
    let (rows, cols) = (w.rows(), w.cols());
    if m == 0 || rows == 0 {
        return CudaStorage::uninit(dev, dtype, m * rows);
    }
    if cols == 0 {
        return CudaStorage::zeros(dev, dtype, m * rows);
    }
    let n = to_u32("rows", rows)?;
    // The kernels round K up to whole spans in 32-bit arithmetic.
    let k = to_u32("cols", cols.next_multiple_of(SPAN)).map(|_| cols as u32)?;
    let y = CudaStorage::uninit(dev, dtype, m * rows)?;
    let geo = Geometry::of(w.format());
    let p = plan(rows, cols, m, geo, dev.props().multiprocessors as usize);
    if p.splits > u16::MAX as usize {
        crate::bail!(
            OP,
            "{cols} columns need {} K chunks, more than one grid holds",
            p.splits
        );
    }
    let (gmul, gshift) = divider(w.group_size());
    let part = (p.splits > 1)
        .then(|| CudaStorage::uninit(dev, DType::F32, p.splits * m * rows))
        .transpose()?;
    let xvec = cols.is_multiple_of(4) && x.ptr().is_multiple_of(16);
    let cfg = LaunchConfig {
        grid_dim: (to_u32("blocks", p.blocks)?, p.splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: SMEM_BYTES as u32,
    };
    launch(
        dev,
        OP,
        ("qgemv", kernel(w.format(), dtype)),
        cfg,
        &[
            Arg::from(w.data().ptr()),
            w.scales().ptr().into(),
            w.mins().map_or(0, CudaStorage::ptr).into(),
            x.ptr().into(),
            y.ptr().into(),
            part.as_ref().map_or(0, CudaStorage::ptr).into(),
            (w.row_bytes() as u64).into(),
            n.into(),
            k.into(),
            (m as u32).into(),
            to_u32("groups per row", w.groups_per_row())?.into(),
            gmul.into(),
            gshift.into(),
            (p.chunk as u32).into(),
            (p.lanes as u32).into(),
            u32::from(xvec).into(),
        ],
    )?;
    if let Some(part) = &part {
        let mn = m * rows;
        launch(
            dev,
            OP,
            ("qgemv", reduce_kernel(dtype)),
            grid_1d(dev, mn, THREADS),
            &[
                Arg::from(part.ptr()),
                y.ptr().into(),
                (mn as u64).into(),
                (p.splits as u32).into(),
            ],
        )?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Group;

    fn formats() -> Vec<QFormat> {
        vec![
            QFormat::Ternary2 { group: Group::Row },
            QFormat::Ternary3 {
                group: Group::Size(256),
            },
            QFormat::Binary { offset: true },
            QFormat::Int4 {
                group: Group::Size(32),
                asym: false,
            },
            QFormat::Int4 {
                group: Group::Size(32),
                asym: true,
            },
            QFormat::Int8 {
                group: Group::Size(32),
            },
        ]
    }

    /// The capacities cuda/qgemv.cu static_asserts, so that both sides size the tile alike.
    #[test]
    fn tile_capacity_matches_the_kernels() {
        let cap = |f: QFormat, m| Geometry::of(f).units_capacity(m);
        let [t2, t3, b1, i4, i4a, i8] = formats()[..] else {
            unreachable!()
        };
        assert_eq!((cap(t2, 1), cap(t2, 8)), (180, 20));
        assert_eq!((cap(t3, 1), cap(b1, 1)), (572, 188));
        assert_eq!((cap(i4, 1), cap(i4a, 3)), (376, 120));
        assert_eq!(cap(i8, 8), 80);
        for f in formats() {
            let geo = Geometry::of(f);
            assert_eq!(
                geo.units_per_block * SPAN / geo.block_weights,
                geo.span_units()
            );
            for m in 1..=GEMV_MAX_M {
                let units = geo.units_capacity(m);
                assert!(
                    units >= geo.span_units(),
                    "{f:?} m={m}: the tile holds no span"
                );
                let floats = m * (units * (4 * geo.steps + geo.runs) + geo.extra_per_token);
                assert!(floats <= TILE_FLOATS, "{f:?} m={m}: {floats} floats");
            }
        }
    }

    /// Walks the kernel's loops for a plan: chunks partition [0, cols) into non-empty multiples of 256
    /// that fit the tile, and the warps' task loop visits every (row, chunk) exactly once.
    fn check_plan(rows: usize, cols: usize, m: usize, f: QFormat, sms: usize) -> Plan {
        let geo = Geometry::of(f);
        let p = plan(rows, cols, m, geo, sms);
        let what = format!("{f:?} rows={rows} cols={cols} m={m} sms={sms}: {p:?}");
        assert!(p.chunk > 0 && p.chunk.is_multiple_of(SPAN), "{what}");
        assert!(p.lanes.is_power_of_two() && p.lanes <= 32, "{what}");
        assert!(p.blocks >= 1, "{what}");
        let units_cap = geo.units_capacity(m);
        let mut covered = 0;
        for c in 0..p.splits {
            let k0 = c * p.chunk;
            assert!(k0 < cols, "{what}: chunk {c} is empty");
            let klen = p.chunk.min(cols - k0);
            assert!(
                klen.div_ceil(geo.block_weights) * geo.units_per_block <= units_cap,
                "{what}"
            );
            covered += klen;
        }
        assert_eq!(covered, cols, "{what}");
        let group_rows = rows_per_group(m);
        let per_task = group_rows * (32 / p.lanes);
        let tasks = rows.div_ceil(per_task);
        let mut seen = vec![0u8; rows];
        for block in 0..p.blocks {
            for warp in 0..WARPS_PER_BLOCK {
                let mut task = block * WARPS_PER_BLOCK + warp;
                while task < tasks {
                    for grp in 0..32 / p.lanes {
                        for r in 0..group_rows {
                            let row = task * per_task + grp * group_rows + r;
                            if row < rows {
                                seen[row] += 1;
                            }
                        }
                    }
                    task += p.blocks * WARPS_PER_BLOCK;
                }
            }
        }
        assert!(
            seen.iter().all(|&s| s == 1),
            "{what}: rows not covered once"
        );
        p
    }

    #[test]
    fn plans_cover_every_row_and_chunk_once() {
        for f in formats() {
            for (rows, cols) in [
                (1, 1),
                (3, 100),
                (576, 576),
                (1536, 576),
                (576, 1536),
                (192, 576),
                (2048, 8192),
                (28672, 8192),
                (4096, 14336),
                (1000, 20000),
                (7, 65536),
            ] {
                for m in 1..=GEMV_MAX_M {
                    for sms in [1, 108, 132] {
                        check_plan(rows, cols, m, f, sms);
                    }
                }
            }
        }
    }

    #[test]
    fn split_k_only_when_the_rows_leave_the_gpu_idle() {
        let t2 = QFormat::Ternary2 { group: Group::Row };
        // 28672 rows fill an H100 on their own: one chunk, a full warp per row group.
        let big = check_plan(28672, 8192, 1, t2, 132);
        assert_eq!((big.splits, big.chunk, big.lanes), (1, 8192, 32));
        // A 2048-row matrix splits K, down to chunks of 32 units per row.
        let narrow = check_plan(2048, 8192, 1, t2, 132);
        assert_eq!((narrow.splits, narrow.chunk, narrow.lanes), (4, 2048, 32));
        // Eight tokens overflow the tile at 1280 weights: K splits whatever the rows.
        assert_eq!(check_plan(28672, 8192, 8, t2, 132).splits, 7);
        // Short rows get narrower lane groups instead of splits.
        let small = check_plan(576, 576, 1, t2, 132);
        assert_eq!((small.splits, small.lanes), (1, 16));
    }

    #[test]
    fn divider_divides_exactly_below_2_pow_31() {
        for d in [
            1usize,
            2,
            3,
            7,
            32,
            64,
            100,
            128,
            255,
            256,
            768,
            1000,
            4096,
            14336,
            1 << 30,
        ] {
            let (mul, shift) = divider(d);
            let probe = (0..5000u64)
                .chain((1..64).flat_map(|i| [i * d as u64 - 1, i * d as u64, i * d as u64 + 1]))
                .chain((0..5000u64).map(|i| (1u64 << 31) - 1 - i));
            for n in probe.filter(|&n| n < 1 << 31) {
                assert_eq!((n * mul as u64) >> shift, n / d as u64, "{n} / {d}");
            }
        }
    }
}
