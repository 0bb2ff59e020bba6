//! Packed low-bit matmul on the CPU: y[m, rows] = x[m, cols] · Wᵀ for a packed W (see
//! `crate::quant::format` for the layouts), one file per weight family.
//!
//! Activations enter in one of three forms ([`ActMode`]): f32 as they are; int8 per token (symmetric,
//! s = max|x|/127, the form VNNI multiplies); or binarised per token (β·sign(x), β = mean|x|, for XNOR-popcount
//! with binary weights). Each kernel equals "dequantize W, turn x into its [`ActMode`] form, f32 matmul"
//! up to f32 summation order; tests hold every path to that.
//!
//! Work is split over weight rows: each rayon task owns a range of rows and writes its part of a
//! [rows, m] buffer (contiguous per task), transposed into [m, rows] at the end. With f32 activations and
//! many tokens the weights are dequantized a panel at a time into the f32 GEMM, where compute, not
//! weight bytes, is the limit.

pub mod binary;
pub mod int4;
pub mod int8;
pub mod interleaved;
pub mod ternary;

use std::sync::OnceLock;

use rayon::prelude::*;

use super::matmul::{sgemm, MatRef};
use crate::quant::format::QFormat;

/// Which instruction family the packed kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QIsa {
    /// AVX-512 F+BW with VNNI (`vpdpbusd`: 64 u8×s8 products summed into 16 i32 per instruction).
    Avx512Vnni,
    /// AVX-512 F+BW without VNNI (`vpmaddubsw` + `vpmaddwd`).
    Avx512,
    /// AVX2 + FMA (`vpmaddubsw` + `vpmaddwd` on 256-bit vectors).
    Avx2,
    /// Plain Rust; runs anywhere.
    Portable,
}

impl QIsa {
    /// The best family this CPU runs (detected once).
    pub fn best() -> QIsa {
        QIsa::available()[0]
    }

    /// Every family this CPU runs, best first (tests iterate over these).
    pub fn available() -> &'static [QIsa] {
        static DETECTED: OnceLock<Vec<QIsa>> = OnceLock::new();
        DETECTED.get_or_init(|| {
            let mut isas = Vec::with_capacity(4);
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
                let avx512 = avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl");
                if avx512 && is_x86_feature_detected!("avx512vnni") {
                    isas.push(QIsa::Avx512Vnni);
                }
                if avx512 {
                    isas.push(QIsa::Avx512);
                }
                if avx2 {
                    isas.push(QIsa::Avx2);
                }
            }
            isas.push(QIsa::Portable);
            isas
        })
    }
}

/// How the activations enter the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActMode {
    /// f32 activations, unchanged.
    F32,
    /// Per-token symmetric int8: x̂ = s·round(x/s), s = max|x|/127.
    Int8,
    /// Per-token binary: x̂ = β·sign(x), β = mean|x|, sign(0) = +1. Binary weights only (XNOR-popcount).
    Binary,
    /// Int8 with one scale per block of 32 columns (s = max|x|/127 of the block), the form GGUF runtimes
    /// give activations against Q4_0/Q4_1/Q8_0 weights: per-token int8 loses too much to outlier
    /// channels on real models. Int4 and int8 weights in groups of 32 only, through the tile layout of
    /// [`interleaved`].
    Int8Blocks,
}

/// A packed weight matrix as the kernels see it (the slices of a `QTensor`).
#[derive(Clone, Copy, Debug)]
pub struct PackedWeights<'a> {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    /// `rows · format.row_bytes(cols)` bytes.
    pub data: &'a [u8],
    /// `rows · format.groups_per_row(cols)` scales.
    pub scales: &'a [f32],
    /// Per-group mins (Int4 asym) or per-row offsets (Binary with offset); empty otherwise.
    pub mins: &'a [f32],
    /// Σ codes per group, `rows · groups_per_row` (Int8); empty otherwise.
    pub code_sums: &'a [i32],
}

impl PackedWeights<'_> {
    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    /// Packed bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    pub fn group_size(&self) -> usize {
        self.format.group_size(self.cols)
    }

    pub fn groups_per_row(&self) -> usize {
        self.format.groups_per_row(self.cols)
    }
}

/// Activations padded to [`ACT_PAD`]: every block size divides it, so kernels never read a partial block.
pub const ACT_PAD: usize = 256;

/// Per-token int8 activations: row `i` is `data[i·padded..(i+1)·padded]`, zero past `cols`, and
/// x̂[i, k] = scales[i] · data[i·padded + k].
#[derive(Clone, Debug)]
pub struct Int8Acts {
    pub m: usize,
    pub cols: usize,
    pub padded: usize,
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Int8Acts {
    /// Quantizes `x` (`m · cols` row-major): s = max|x|/127, q = round(x/s) (half away from zero); an
    /// all-zero row gets s = 0 and q = 0.
    pub fn quantize(x: &[f32], m: usize, cols: usize) -> Int8Acts {
        let padded = cols.div_ceil(ACT_PAD) * ACT_PAD;
        let mut data = vec![0i8; m * padded];
        let mut scales = vec![0f32; m];
        for ((row, q), s) in x
            .chunks(cols.max(1))
            .zip(data.chunks_mut(padded.max(1)))
            .zip(scales.iter_mut())
        {
            let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            *s = amax / 127.0;
            if amax > 0.0 {
                let inv = 127.0 / amax;
                for (q, &v) in q.iter_mut().zip(row) {
                    *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
            }
        }
        Int8Acts {
            m,
            cols,
            padded,
            data,
            scales,
        }
    }

    /// Activations from codes the caller computed (`m · cols`, row-major) and one step per token.
    pub fn from_codes(codes: &[i8], scales: &[f32], m: usize, cols: usize) -> Int8Acts {
        assert_eq!(codes.len(), m * cols);
        assert_eq!(scales.len(), m);
        let padded = cols.div_ceil(ACT_PAD) * ACT_PAD;
        let mut data = vec![0i8; m * padded];
        for (dst, src) in data
            .chunks_mut(padded.max(1))
            .zip(codes.chunks(cols.max(1)))
        {
            dst[..cols].copy_from_slice(src);
        }
        Int8Acts {
            m,
            cols,
            padded,
            data,
            scales: scales.to_vec(),
        }
    }

    /// Row `i`'s codes, `padded` long.
    pub fn row(&self, i: usize) -> &[i8] {
        &self.data[i * self.padded..(i + 1) * self.padded]
    }

    /// Σ codes of each `group` consecutive columns of each row: [m, padded / group] (`group` divides
    /// [`ACT_PAD`] or is `padded`).
    pub fn group_sums(&self, group: usize) -> Vec<i32> {
        let per_row = self.padded.div_ceil(group.max(1));
        let mut out = Vec::with_capacity(self.m * per_row);
        for i in 0..self.m {
            out.extend(
                self.row(i)
                    .chunks(group.max(1))
                    .map(|c| c.iter().map(|&v| i32::from(v)).sum::<i32>()),
            );
        }
        out
    }

    /// The values the kernels multiply: scales[i] · q, `m · cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.m)
            .flat_map(|i| {
                let s = self.scales[i];
                self.row(i)[..self.cols]
                    .iter()
                    .map(move |&q| s * f32::from(q))
            })
            .collect()
    }
}

/// Per-token binarised activations: bit k of row i (little-endian u64 words, `words` per row) is set
/// where x[i, k] ≥ 0; bits past `cols` are 0, as in binary weights, so XOR ignores them.
#[derive(Clone, Debug)]
pub struct BinaryActs {
    pub m: usize,
    pub cols: usize,
    pub words: usize,
    pub bits: Vec<u64>,
    /// β = mean|x| of each row.
    pub scales: Vec<f32>,
}

impl BinaryActs {
    pub fn binarize(x: &[f32], m: usize, cols: usize) -> BinaryActs {
        let scales = x
            .chunks(cols.max(1))
            .map(|row| row.iter().map(|v| v.abs()).sum::<f32>() / cols.max(1) as f32)
            .collect();
        BinaryActs::from_signs(x, scales, m, cols)
    }

    /// Bits from the signs of `x` (set where x ≥ 0) with the caller's per-token scales (e.g. a trained
    /// quantizer's α).
    pub fn from_signs(x: &[f32], scales: Vec<f32>, m: usize, cols: usize) -> BinaryActs {
        assert_eq!(scales.len(), m);
        let words = cols.div_ceil(ACT_PAD) * (ACT_PAD / 64);
        let mut bits = vec![0u64; m * words];
        for (row, b) in x.chunks(cols.max(1)).zip(bits.chunks_mut(words.max(1))) {
            for (k, &v) in row.iter().enumerate() {
                if v >= 0.0 {
                    b[k / 64] |= 1 << (k % 64);
                }
            }
        }
        BinaryActs {
            m,
            cols,
            words,
            bits,
            scales,
        }
    }

    /// Row `i`'s words.
    pub fn row(&self, i: usize) -> &[u64] {
        &self.bits[i * self.words..(i + 1) * self.words]
    }

    /// The values the kernels multiply: β·(±1), `m · cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.m)
            .flat_map(|i| {
                let (s, row) = (self.scales[i], self.row(i));
                (0..self.cols).map(move |k| {
                    if row[k / 64] >> (k % 64) & 1 == 1 {
                        s
                    } else {
                        -s
                    }
                })
            })
            .collect()
    }
}

/// From this many tokens on, f32 activations go through dequantized panels and the f32 GEMM.
pub const F32_PANEL_MIN_M: usize = 8;

/// Weight rows per dequantized panel in the f32 GEMM path.
const PANEL_ROWS: usize = 64;

/// y[m, rows] = x̂ · Ŵᵀ with x̂ the `act` form of `x` (`m · cols`, row-major) and Ŵ the dequantized weights.
///
/// `ActMode::Int8Blocks` repacks the weights into the tile layout on every call; `QTensor::matmul`
/// keeps the repacked form.
///
/// # Panics
/// On slices too short for the shapes, an `isa` this CPU lacks, `ActMode::Binary` with non-binary
/// weights, or `ActMode::Int8Blocks` with weights other than int4/int8 in groups of 32: the caller
/// (`QTensor::matmul`) validates all four.
pub fn qmatmul(w: &PackedWeights, x: &[f32], m: usize, act: ActMode, out: &mut [f32], isa: QIsa) {
    assert!(
        QIsa::available().contains(&isa),
        "qmatmul: this CPU cannot run {isa:?}"
    );
    assert!(x.len() >= m * w.cols && out.len() >= m * w.rows);
    if m == 0 || w.rows == 0 {
        return;
    }
    match act {
        ActMode::F32 if m >= F32_PANEL_MIN_M => panel_gemm(w, x, m, &mut out[..m * w.rows]),
        ActMode::F32 => by_row_chunks(w.rows, m, out, |r0, r1, t| match w.format {
            QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => {
                ternary::matmul_f32(w, x, m, r0..r1, t, isa)
            }
            QFormat::Binary { .. } => binary::matmul_f32(w, x, m, r0..r1, t, isa),
            QFormat::Int4 { .. } => int4::matmul_f32(w, x, m, r0..r1, t, isa),
            QFormat::Int8 { .. } => int8::matmul_f32(w, x, m, r0..r1, t, isa),
        }),
        ActMode::Int8 => int8_acts(w, &Int8Acts::quantize(x, m, w.cols), out, isa),
        ActMode::Binary => binary_acts(w, &BinaryActs::binarize(x, m, w.cols), out, isa),
        ActMode::Int8Blocks => {
            let il = interleaved::Interleaved::new(w).expect(
                "qmatmul: int8 block activations need int4 or int8 weights in groups of 32",
            );
            interleaved::matmul(&il, x, m, out, isa)
        }
    }
}

/// y[m, rows] = x̂ · Ŵᵀ for activations already in int8 form (quantized by the caller's own rule, e.g. a
/// trained activation quantizer's codes and step).
///
/// # Panics
/// As [`qmatmul`], and if `acts.cols != w.cols`.
pub fn int8_acts(w: &PackedWeights, acts: &Int8Acts, out: &mut [f32], isa: QIsa) {
    assert!(QIsa::available().contains(&isa) && acts.cols == w.cols);
    by_row_chunks(w.rows, acts.m, out, |r0, r1, t| match w.format {
        QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => {
            ternary::matmul_i8(w, acts, r0..r1, t, isa)
        }
        QFormat::Binary { .. } => binary::matmul_i8(w, acts, r0..r1, t, isa),
        QFormat::Int4 { .. } => int4::matmul_i8(w, acts, r0..r1, t, isa),
        QFormat::Int8 { .. } => int8::matmul_i8(w, acts, r0..r1, t, isa),
    })
}

/// y[m, rows] = x̂ · Ŵᵀ for binarised activations and binary weights (XNOR-popcount).
///
/// # Panics
/// As [`qmatmul`], if the weights are not binary, and if `acts.cols != w.cols`.
pub fn binary_acts(w: &PackedWeights, acts: &BinaryActs, out: &mut [f32], isa: QIsa) {
    assert!(QIsa::available().contains(&isa) && acts.cols == w.cols);
    assert!(
        matches!(w.format, QFormat::Binary { .. }),
        "qmatmul: binary activations need binary weights"
    );
    by_row_chunks(w.rows, acts.m, out, |r0, r1, t| {
        binary::matmul_binary(w, acts, r0..r1, t, isa)
    })
}

/// Dequantizes weight rows `rows` into `out` (`rows.len() · cols`, row-major).
pub fn dequantize_rows(w: &PackedWeights, rows: std::ops::Range<usize>, out: &mut [f32]) {
    match w.format {
        QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => {
            ternary::dequantize_rows(w, rows, out)
        }
        QFormat::Binary { .. } => binary::dequantize_rows(w, rows, out),
        QFormat::Int4 { .. } => int4::dequantize_rows(w, rows, out),
        QFormat::Int8 { .. } => int8::dequantize_rows(w, rows, out),
    }
}

/// Runs `f(r0, r1, t)` over disjoint ranges of weight rows in parallel, where `t` is the
/// `(r1 − r0) · m` block of a [rows, m] buffer (t[(r − r0)·m + i] = y[i, r]), then writes y[m, rows].
fn by_row_chunks(
    rows: usize,
    m: usize,
    out: &mut [f32],
    f: impl Fn(usize, usize, &mut [f32]) + Sync + Send,
) {
    if rows == 0 || m == 0 {
        return;
    }
    // Enough chunks for load balance across threads, each large enough to amortise the task. One
    // token's product is only microseconds of work, so there each thread gets two chunks: more tasks
    // cost more in scheduling than they recover in balance.
    let threads = rayon::current_num_threads().max(1);
    let per_thread = if m == 1 { 2 } else { 8 };
    let chunk = rows
        .div_ceil(threads * per_thread)
        .clamp(16, 1024)
        .min(rows);
    if m == 1 {
        out[..rows]
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, t)| f(c * chunk, c * chunk + t.len(), t));
        return;
    }
    let mut t = vec![0f32; rows * m];
    t.par_chunks_mut(chunk * m)
        .enumerate()
        .for_each(|(c, t)| f(c * chunk, c * chunk + t.len() / m, t));
    for (r, col) in t.chunks(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * rows + r] = v;
        }
    }
}

/// f32 activations with many tokens: dequantize [`PANEL_ROWS`] weight rows at a time and multiply them
/// with the f32 GEMM, in parallel over panels.
fn panel_gemm(w: &PackedWeights, x: &[f32], m: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let panels = rows.div_ceil(PANEL_ROWS);
    let results: Vec<(usize, Vec<f32>)> = (0..panels)
        .into_par_iter()
        .map(|p| {
            let (r0, r1) = (p * PANEL_ROWS, ((p + 1) * PANEL_ROWS).min(rows));
            let n = r1 - r0;
            let mut panel = vec![0f32; n * cols];
            dequantize_rows(w, r0..r1, &mut panel);
            let mut y = vec![0f32; m * n];
            let a = MatRef {
                data: x,
                rs: cols,
                cs: 1,
            };
            let b = MatRef {
                data: &panel,
                rs: 1,
                cs: cols,
            };
            sgemm(m, n, cols, a, b, &mut y, false);
            (r0, y)
        })
        .collect();
    for (r0, y) in results {
        let n = y.len() / m;
        for (i, yrow) in y.chunks(n).enumerate() {
            out[i * rows + r0..i * rows + r0 + n].copy_from_slice(yrow);
        }
    }
}
