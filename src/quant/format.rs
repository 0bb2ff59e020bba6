//! Packed low-bit weight formats: the byte layouts the CPU (and later CUDA) kernels read.
//!
//! A [`QTensor`] is a weight matrix W of `rows` × `cols` (out × in, the layout of `Linear::weight`), each
//! row packed into whole blocks; a row's tail past `cols` is padding whose weight contributes nothing
//! because kernels pad activations with zeros. Every format stores logical integer *codes* and f32 scales,
//! and the weight is `scale · code` (+ `min` for the asymmetric formats):
//!
//! | format | code | block | layout of one block |
//! |---|---|---|---|
//! | `Ternary2` | −1, 0, 1 stored as c + 1 in 2 bits | 256 weights, 64 bytes | byte `i` holds weight `64·j + i` in bits `2j..2j+2` |
//! | `Ternary3` | −1, 0, 1 as a base-3 digit | 256 weights, 52 bytes | GGUF TQ1_0's `qs`+`qh` (see below) |
//! | `Binary` | −1, +1 as bit 0 / 1 | 64 weights, 8 bytes | little-endian u64, bit `i` = weight `i` |
//! | `Int4` | −8..7 (stored + 8) or 0..15 (asym) | 128 weights, 64 bytes | byte `i`: low nibble weight `i`, high nibble weight `64 + i` |
//! | `Int8` | −127..127 | 64 weights, 64 bytes | one byte per weight |
//!
//! The 2-bit and 4-bit layouts put 64 consecutive weights in one shift/mask of a 64-byte vector, so an
//! AVX-512 kernel unpacks with one shift and one and, and an AVX2 kernel gets 32 consecutive weights per
//! 32-byte half. `Ternary3` keeps TQ1_0's order so GGUF ternary weights are a copy: in each 256-weight block,
//! weight `32n + m` (n < 5, m < 32) is digit n of byte `m`; weight `160 + 16n + m` (m < 16) is digit n of
//! byte `32 + m`; weight `240 + 4n + j` (n < 4, j < 4) is digit n of byte `48 + j`. A byte holding digits
//! t₀..t₄ (t = code + 1) stores ⌈(Σ tₙ·3^(4−n))·256/243⌉, so digit n decodes as ((q·3ⁿ mod 256)·3) >> 8
//! without a division.

use std::sync::{Arc, OnceLock};

use super::device::DeviceCopies;
use crate::cpu::qmatmul::interleaved::{self, Interleaved};
use crate::cpu::qmatmul::{qmatmul, ActMode, PackedWeights, QIsa};
use crate::error::{Error, Result};
use crate::storage::Device;
use crate::tensor::Tensor;

/// How many consecutive weights of a row share one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    /// One scale for the whole row (per output channel).
    Row,
    /// One scale per `n` consecutive weights of a row.
    Size(usize),
}

/// A packed weight format; see the module docs for each layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// Ternary, 2 bits per weight; groups of 32, 64, 128 or 256, or per row.
    Ternary2 { group: Group },
    /// Ternary, 5 weights per byte (1.625 bits with the block tail); groups of a multiple of 256, or per row.
    Ternary3 { group: Group },
    /// Binary ±1 with one scale per row and, with `offset`, one additive offset per row (w = α·b + β).
    Binary { offset: bool },
    /// 4-bit integers; groups of 32, 64 or 128, or per row; symmetric (−8..7) or asymmetric (0..15 and a min).
    Int4 { group: Group, asym: bool },
    /// 8-bit symmetric integers (−127..127); groups of 32, 64 or 128 (GGUF Q8_0 is 32), or per row.
    Int8 { group: Group },
}

impl QFormat {
    /// Weights per packed block; rows are padded to a whole number of blocks.
    pub fn block_weights(self) -> usize {
        match self {
            QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => 256,
            QFormat::Binary { .. } | QFormat::Int8 { .. } => 64,
            QFormat::Int4 { .. } => 128,
        }
    }

    /// Bytes per packed block.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Ternary2 { .. } | QFormat::Int4 { .. } | QFormat::Int8 { .. } => 64,
            QFormat::Ternary3 { .. } => 52,
            QFormat::Binary { .. } => 8,
        }
    }

    /// The smallest and largest code.
    pub fn code_range(self) -> (i8, i8) {
        match self {
            QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => (-1, 1),
            QFormat::Binary { .. } => (-1, 1),
            QFormat::Int4 { asym: false, .. } => (-8, 7),
            QFormat::Int4 { asym: true, .. } => (0, 15),
            QFormat::Int8 { .. } => (-127, 127),
        }
    }

    /// Whether the format stores a per-group min (Int4 asym) or a per-row offset (Binary with offset).
    pub fn has_mins(self) -> bool {
        matches!(
            self,
            QFormat::Int4 { asym: true, .. } | QFormat::Binary { offset: true }
        )
    }

    /// Weights per scale for a row of `cols` weights.
    pub fn group_size(self, cols: usize) -> usize {
        match self {
            QFormat::Ternary2 { group }
            | QFormat::Ternary3 { group }
            | QFormat::Int4 { group, .. }
            | QFormat::Int8 { group } => match group {
                Group::Row => cols.max(1),
                Group::Size(g) => g,
            },
            QFormat::Binary { .. } => cols.max(1),
        }
    }

    /// Scales per row.
    pub fn groups_per_row(self, cols: usize) -> usize {
        cols.div_ceil(self.group_size(cols))
    }

    /// Packed bytes per row.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols.div_ceil(self.block_weights()) * self.block_bytes()
    }

    /// Checks the group size against what this format's kernels support.
    pub fn validate(self) -> Result<()> {
        let ok = match self {
            QFormat::Ternary2 {
                group: Group::Size(g),
            } => matches!(g, 32 | 64 | 128 | 256),
            QFormat::Ternary3 {
                group: Group::Size(g),
            } => g > 0 && g % 256 == 0,
            QFormat::Int4 {
                group: Group::Size(g),
                ..
            }
            | QFormat::Int8 {
                group: Group::Size(g),
            } => matches!(g, 32 | 64 | 128),
            _ => true,
        };
        if !ok {
            crate::bail!(
                "QFormat",
                "unsupported group size in {self:?}: Ternary2 takes 32/64/128/256, Ternary3 a multiple \
                 of 256, Int4 and Int8 32/64/128, or Group::Row"
            );
        }
        Ok(())
    }

    /// Bits per weight including scales and mins, for a row of `cols` weights.
    pub fn bits_per_weight(self, cols: usize) -> f64 {
        let per_row = self.row_bytes(cols) * 8
            + self.groups_per_row(cols) * 32 * (1 + usize::from(self.has_mins()));
        per_row as f64 / cols.max(1) as f64
    }
}

/// A packed low-bit weight matrix [rows, cols] on the CPU.
#[derive(Clone, Debug)]
pub struct QTensor {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    code_sums: Vec<i32>,
    /// The tile layout of `ActMode::Int8Blocks`, made on its first use.
    tiles: OnceLock<Arc<Interleaved>>,
    /// The packed bytes on the GPUs this matrix has run on (see `quant::device`); only CUDA builds
    /// have GPUs to hold them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) device_copies: DeviceCopies,
}

impl QTensor {
    /// Packs integer codes (row-major, `rows · cols`) with their scales (`rows · groups_per_row`) and, for
    /// formats with mins, their mins (same count; one per row for `Binary { offset: true }`).
    pub fn from_codes(
        format: QFormat,
        rows: usize,
        cols: usize,
        codes: &[i8],
        scales: &[f32],
        mins: Option<&[f32]>,
    ) -> Result<QTensor> {
        format.validate()?;
        let groups = format.groups_per_row(cols);
        if codes.len() != rows * cols || scales.len() != rows * groups {
            crate::bail!(
                "QTensor::from_codes",
                "{format:?} [{rows}, {cols}] needs {} codes and {} scales, got {} and {}",
                rows * cols,
                rows * groups,
                codes.len(),
                scales.len()
            );
        }
        let mins = match (format.has_mins(), mins) {
            (true, Some(m)) if m.len() == rows * groups => m.to_vec(),
            (false, None) => Vec::new(),
            (true, got) => crate::bail!(
                "QTensor::from_codes",
                "{format:?} needs {} mins, got {}",
                rows * groups,
                got.map_or(0, |m| m.len())
            ),
            (false, Some(_)) => crate::bail!("QTensor::from_codes", "{format:?} takes no mins"),
        };
        if let Some(bad) = scales.iter().chain(&mins).find(|v| !v.is_finite()) {
            crate::bail!(
                "QTensor::from_codes",
                "scales and mins must be finite, got {bad}"
            );
        }
        let (lo, hi) = format.code_range();
        if let Some(i) = codes.iter().position(|&c| c < lo || c > hi) {
            crate::bail!(
                "QTensor::from_codes",
                "code {} at index {i} is outside {format:?}'s range {lo}..={hi}",
                codes[i]
            );
        }
        if matches!(format, QFormat::Binary { .. }) {
            if let Some(i) = codes.iter().position(|&c| c == 0) {
                crate::bail!(
                    "QTensor::from_codes",
                    "binary codes are −1 or +1, got 0 at index {i}"
                );
            }
        }
        let row_bytes = format.row_bytes(cols);
        let mut data = vec![0u8; rows * row_bytes];
        for (row, out) in codes
            .chunks(cols.max(1))
            .zip(data.chunks_mut(row_bytes.max(1)))
        {
            pack_row(format, row, out);
        }
        let code_sums = if matches!(format, QFormat::Int8 { .. }) {
            let g = format.group_size(cols);
            codes
                .chunks(cols.max(1))
                .flat_map(|r| r.chunks(g).map(|c| c.iter().map(|&c| i32::from(c)).sum()))
                .collect()
        } else {
            Vec::new()
        };
        Ok(QTensor {
            format,
            rows,
            cols,
            data,
            scales: scales.to_vec(),
            mins,
            code_sums,
            tiles: OnceLock::new(),
            device_copies: DeviceCopies::default(),
        })
    }

    /// Round-to-nearest quantization of an f32 matrix (row-major `rows · cols`) into `format`, with each
    /// group's statistics: ternary α = mean|w| and codes round(clip(w/α, −1, 1)) (absmean, as BitNet
    /// b1.58); binary α = mean|w| and sign(w) (BWN), or with an offset β = mean(w), α = mean|w − β|;
    /// symmetric int s = max|w| / qmax; asymmetric int4 min..max over 16 levels. sign(0) is +1.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize, format: QFormat) -> Result<QTensor> {
        format.validate()?;
        if weights.len() != rows * cols {
            crate::bail!(
                "QTensor::quantize",
                "[{rows}, {cols}] needs {} weights, got {}",
                rows * cols,
                weights.len()
            );
        }
        if let Some(bad) = weights.iter().find(|v| !v.is_finite()) {
            crate::bail!("QTensor::quantize", "weights must be finite, got {bad}");
        }
        let g = format.group_size(cols);
        let groups = format.groups_per_row(cols);
        let mut codes = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * groups];
        let mut mins = vec![0f32; if format.has_mins() { rows * groups } else { 0 }];
        for r in 0..rows {
            for gi in 0..groups {
                let lo = r * cols + gi * g;
                let hi = (lo + g).min(r * cols + cols);
                let (w, c) = (&weights[lo..hi], &mut codes[lo..hi]);
                let (s, m) = quantize_group(format, w, c);
                scales[r * groups + gi] = s;
                if format.has_mins() {
                    mins[r * groups + gi] = m;
                }
            }
        }
        let mins = format.has_mins().then_some(&mins[..]);
        QTensor::from_codes(format, rows, cols, &codes, &scales, mins)
    }

    /// [`QTensor::quantize`] of a 2-D f32 tensor [rows, cols].
    pub fn quantize_tensor(weights: &Tensor, format: QFormat) -> Result<QTensor> {
        let &[rows, cols] = weights.dims() else {
            crate::bail!(
                "QTensor::quantize_tensor",
                "weights must be 2-D [rows, cols], got {:?}",
                weights.dims()
            );
        };
        QTensor::quantize(&weights.to_vec_f32(), rows, cols, format)
    }

    /// Reassembles a QTensor from its packed parts (as produced by the GGUF converters or read from a
    /// file), validating every length.
    pub fn from_packed(
        format: QFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        scales: Vec<f32>,
        mins: Vec<f32>,
    ) -> Result<QTensor> {
        format.validate()?;
        let groups = format.groups_per_row(cols);
        let want_mins = if format.has_mins() { rows * groups } else { 0 };
        if data.len() != rows * format.row_bytes(cols)
            || scales.len() != rows * groups
            || mins.len() != want_mins
        {
            crate::bail!(
                "QTensor::from_packed",
                "{format:?} [{rows}, {cols}] needs {} bytes, {} scales and {want_mins} mins; got {}, {} and {}",
                rows * format.row_bytes(cols),
                rows * groups,
                data.len(),
                scales.len(),
                mins.len()
            );
        }
        let q = QTensor {
            format,
            rows,
            cols,
            data,
            scales,
            mins,
            code_sums: Vec::new(),
            tiles: OnceLock::new(),
            device_copies: DeviceCopies::default(),
        };
        // Unpacking validates every code (a 2-bit 3 or an int8 −128 is corrupt); packing again rewrites
        // the row padding to its canonical zero-weight form, which the kernels rely on (XNOR-popcount
        // counts padding bits unless they are 0), and computes the code sums Int8 kernels need.
        let codes = q.try_codes()?;
        QTensor::from_codes(
            format,
            rows,
            cols,
            &codes,
            &q.scales,
            format.has_mins().then_some(&q.mins),
        )
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed bytes, `rows · row_bytes()` of them.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    /// Scales, `rows · groups_per_row` row-major.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Mins (Int4 asym, per group) or offsets (Binary with offset, per row); empty otherwise.
    pub fn mins(&self) -> &[f32] {
        &self.mins
    }

    /// Σ codes of each group, `rows · groups_per_row` (Int8 only; empty otherwise): kernels that shift
    /// activations to unsigned bytes subtract 128·Σ codes.
    pub fn code_sums(&self) -> &[i32] {
        &self.code_sums
    }

    /// Weights per scale.
    pub fn group_size(&self) -> usize {
        self.format.group_size(self.cols)
    }

    /// Bytes held: packed data, scales, mins and row sums.
    pub fn byte_size(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.mins.len() + self.code_sums.len())
    }

    /// The kernels' view of this matrix.
    pub fn packed(&self) -> PackedWeights<'_> {
        PackedWeights {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            data: &self.data,
            scales: &self.scales,
            mins: &self.mins,
            code_sums: &self.code_sums,
        }
    }

    /// y = x̂ · Ŵᵀ for x [.., cols] f32: the packed kernels with the best instruction set, activations in
    /// the `act` form (f32, per-token int8, or per-token binary for binary weights). Returns [.., rows].
    /// For x on a GPU the packed CUDA kernels run there (the weights are uploaded on first use, see
    /// [`QTensor::prepare_device`]) and the result has x's float dtype; on the CPU it is f32.
    /// An inference op: the result does not track gradients (training uses the fake-quant path of
    /// `nn::QuantLinear`).
    pub fn matmul(&self, x: &Tensor, act: ActMode) -> Result<Tensor> {
        self.matmul_with_isa(x, act, QIsa::best())
    }

    /// [`QTensor::matmul`] on an explicit instruction set (tests and benchmarks).
    pub fn matmul_with_isa(&self, x: &Tensor, act: ActMode, isa: QIsa) -> Result<Tensor> {
        let Some((&k, lead)) = x.dims().split_last() else {
            crate::bail!("QTensor::matmul", "activations need at least one dim");
        };
        if k != self.cols {
            return Err(Error::ShapeMismatch {
                op: "QTensor::matmul",
                lhs: x.dims().to_vec(),
                rhs: vec![self.rows, self.cols],
            });
        }
        if !x.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: "QTensor::matmul",
                dtype: x.dtype(),
            });
        }
        if act == ActMode::Binary && !matches!(self.format, QFormat::Binary { .. }) {
            crate::bail!(
                "QTensor::matmul",
                "binary activations (XNOR-popcount) need binary weights, not {:?}",
                self.format
            );
        }
        if act == ActMode::Int8Blocks && !Interleaved::supports(self.format) {
            crate::bail!(
                "QTensor::matmul",
                "int8 block activations need int4 or int8 weights in groups of 32, not {:?}",
                self.format
            );
        }
        if x.device().is_cuda() {
            return self.matmul_device(x, act);
        }
        if !QIsa::available().contains(&isa) {
            crate::bail!("QTensor::matmul", "this CPU cannot run {isa:?}");
        }
        let m: usize = lead.iter().product();
        let mut out = vec![0f32; m * self.rows];
        match act {
            ActMode::Int8Blocks => {
                let tiles = self.tiles();
                x.with_f32_slice("QTensor::matmul", |xs| {
                    interleaved::matmul(&tiles, xs, m, &mut out, isa)
                })?;
            }
            _ => x.with_f32_slice("QTensor::matmul", |xs| {
                qmatmul(&self.packed(), xs, m, act, &mut out, isa)
            })?,
        }
        let mut dims = lead.to_vec();
        dims.push(self.rows);
        Tensor::from_vec(out, dims, x.device())
    }

    /// [`QTensor::matmul`] of one input with several matrices of the same `cols` (a layer's q, k and v
    /// projections): `[x·Ŵ_jᵀ]`. One token in `ActMode::Int8Blocks` form runs as one parallel region
    /// over every matrix's rows (see [`interleaved::matvec_many`]); otherwise one product per matrix.
    pub fn matmul_many(ws: &[&QTensor], x: &Tensor, act: ActMode) -> Result<Vec<Tensor>> {
        let m = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        let fused = act == ActMode::Int8Blocks
            && x.device() == Device::Cpu
            && m == 1
            && x.dtype().is_float()
            && x.dims()
                .last()
                .is_some_and(|&k| ws.iter().all(|w| w.cols == k))
            && ws.iter().all(|w| Interleaved::supports(w.format));
        if !fused {
            return ws.iter().map(|w| w.matmul(x, act)).collect();
        }
        x.device().check()?;
        let tiles: Vec<Arc<Interleaved>> = ws.iter().map(|w| w.tiles()).collect();
        let refs: Vec<&Interleaved> = tiles.iter().map(|t| &**t).collect();
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows]).collect();
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        x.with_f32_slice("QTensor::matmul", |xs| {
            interleaved::matvec_many(&refs, xs, &mut slices, QIsa::best())
        })?;
        let lead = &x.dims()[..x.rank() - 1];
        outs.into_iter()
            .zip(ws)
            .map(|(o, w)| Tensor::from_vec(o, [lead, &[w.rows]].concat(), x.device()))
            .collect()
    }

    /// The weights in the tile layout of `ActMode::Int8Blocks` (made once, then shared).
    ///
    /// # Panics
    /// If the format has no tile layout (see [`Interleaved::supports`]).
    fn tiles(&self) -> Arc<Interleaved> {
        self.tiles
            .get_or_init(|| {
                Arc::new(Interleaved::new(&self.packed()).expect("the caller checked the format"))
            })
            .clone()
    }

    /// Makes the tile layout that `ActMode::Int8Blocks` runs on now rather than on the first product
    /// (when loading a model). A no-op for formats without one.
    pub fn prepare_int8_blocks(&self) {
        if Interleaved::supports(self.format) {
            self.tiles();
        }
    }

    /// The logical codes, row-major `rows · cols`.
    pub fn codes(&self) -> Vec<i8> {
        self.try_codes()
            .expect("a QTensor's bytes are validated when it is built")
    }

    fn try_codes(&self) -> Result<Vec<i8>> {
        let mut codes = vec![0i8; self.rows * self.cols];
        let rb = self.row_bytes();
        for (r, out) in codes.chunks_mut(self.cols.max(1)).enumerate() {
            unpack_row(self.format, &self.data[r * rb..(r + 1) * rb], out)
                .map_err(|e| Error::Msg(format!("QTensor: row {r} of {:?}: {e}", self.format)))?;
        }
        Ok(codes)
    }

    /// The f32 weights, row-major `rows · cols`: scale · code (+ min).
    pub fn dequantize(&self) -> Vec<f32> {
        let codes = self.codes();
        let g = self.group_size();
        let groups = self.format.groups_per_row(self.cols);
        let per_row_min = matches!(self.format, QFormat::Binary { .. });
        let mut out = vec![0f32; codes.len()];
        for (r, (c, o)) in codes
            .chunks(self.cols.max(1))
            .zip(out.chunks_mut(self.cols.max(1)))
            .enumerate()
        {
            for (k, (&c, o)) in c.iter().zip(o.iter_mut()).enumerate() {
                let gi = r * groups + k / g;
                *o = self.scales[gi] * f32::from(c);
                if self.format.has_mins() {
                    *o += self.mins[if per_row_min { r } else { gi }];
                }
            }
        }
        out
    }

    /// The dequantized weights as an f32 tensor [rows, cols].
    pub fn to_tensor(&self, device: Device) -> Result<Tensor> {
        Tensor::from_vec(self.dequantize(), (self.rows, self.cols), device)
    }

    /// Rows `ids` (integers in 0..rows, any shape) dequantized to f32: [ids.., cols]. An embedding
    /// lookup in a packed table, which touches only the rows it returns.
    pub fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.dtype().is_float() {
            return Err(Error::UnsupportedDType {
                op: "QTensor::gather_rows",
                dtype: ids.dtype(),
            });
        }
        ids.device().check()?;
        let idx = ids.to_vec_i64();
        let mut out = vec![0f32; idx.len() * self.cols];
        for (&i, o) in idx.iter().zip(out.chunks_mut(self.cols.max(1))) {
            let r = usize::try_from(i).ok().filter(|&r| r < self.rows).ok_or(
                Error::IndexOutOfRange {
                    op: "QTensor::gather_rows",
                    index: i,
                    size: self.rows,
                },
            )?;
            crate::cpu::qmatmul::dequantize_rows(&self.packed(), r..r + 1, o);
        }
        let mut dims = ids.dims().to_vec();
        dims.push(self.cols);
        Tensor::from_vec(out, dims, ids.device())
    }
}

/// One group's scale (and min) and codes under the round-to-nearest rules of [`QTensor::quantize`].
fn quantize_group(format: QFormat, w: &[f32], codes: &mut [i8]) -> (f32, f32) {
    let n = w.len().max(1) as f32;
    let sign = |v: f32| if v < 0.0 { -1i8 } else { 1 };
    match format {
        QFormat::Ternary2 { .. } | QFormat::Ternary3 { .. } => {
            let alpha = w.iter().map(|v| v.abs()).sum::<f32>() / n;
            for (c, &v) in codes.iter_mut().zip(w) {
                *c = if alpha > 0.0 {
                    (v / alpha).round().clamp(-1.0, 1.0) as i8
                } else {
                    0
                };
            }
            (alpha, 0.0)
        }
        QFormat::Binary { offset } => {
            let beta = if offset {
                w.iter().sum::<f32>() / n
            } else {
                0.0
            };
            let alpha = w.iter().map(|v| (v - beta).abs()).sum::<f32>() / n;
            for (c, &v) in codes.iter_mut().zip(w) {
                *c = sign(v - beta);
            }
            (alpha, beta)
        }
        QFormat::Int4 { asym: false, .. } | QFormat::Int8 { .. } => {
            let (lo, hi) = format.code_range();
            let qmax = f32::from(hi.min(-lo));
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / qmax;
            for (c, &v) in codes.iter_mut().zip(w) {
                *c = if s > 0.0 {
                    (v / s).round().clamp(f32::from(lo), f32::from(hi)) as i8
                } else {
                    0
                };
            }
            (s, 0.0)
        }
        QFormat::Int4 { asym: true, .. } => {
            let lo = w.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let hi = w.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let s = (hi - lo) / 15.0;
            for (c, &v) in codes.iter_mut().zip(w) {
                *c = if s > 0.0 {
                    ((v - lo) / s).round().clamp(0.0, 15.0) as i8
                } else {
                    0
                };
            }
            (s, lo)
        }
    }
}

/// Where weight `i` (< 256) of a `Ternary3` block lives: (byte, digit).
pub fn ternary3_position(i: usize) -> (usize, u32) {
    match i {
        0..160 => (i % 32, (i / 32) as u32),
        160..240 => (32 + (i - 160) % 16, ((i - 160) / 16) as u32),
        _ => (48 + (i - 240) % 4, ((i - 240) / 4) as u32),
    }
}

/// Digit `n` of a base-3 byte (0, 1 or 2), as the kernels decode it.
pub fn ternary3_digit(q: u8, n: u32) -> u8 {
    let shifted = q.wrapping_mul(3u8.pow(n));
    ((u16::from(shifted) * 3) >> 8) as u8
}

/// Encodes up to five base-3 digits (t₀ most significant) into one byte.
pub fn ternary3_byte(digits: [u8; 5]) -> u8 {
    let q = digits.iter().fold(0u16, |q, &t| q * 3 + u16::from(t));
    (q * 256).div_ceil(243) as u8
}

fn pack_row(format: QFormat, codes: &[i8], out: &mut [u8]) {
    match format {
        QFormat::Ternary2 { .. } => {
            // Padding is code 0 (stored 1) so a padded weight is exactly zero.
            for blk in out.chunks_mut(64) {
                blk.fill(0b0101_0101);
            }
            for (k, &c) in codes.iter().enumerate() {
                let (b, i) = (k / 256, k % 256);
                let byte = &mut out[b * 64 + i % 64];
                let shift = 2 * (i / 64);
                *byte = (*byte & !(3 << shift)) | (((c + 1) as u8) << shift);
            }
        }
        QFormat::Ternary3 { .. } => {
            for (b, blk) in out.chunks_mut(52).enumerate() {
                // Padding digits are 1 (code 0); a qh byte's unused fifth digit is 0, as in TQ1_0.
                let mut digits = [[1u8; 5]; 52];
                for d in &mut digits[48..] {
                    d[4] = 0;
                }
                for i in 0..256 {
                    let k = b * 256 + i;
                    if k < codes.len() {
                        let (byte, n) = ternary3_position(i);
                        digits[byte][n as usize] = (codes[k] + 1) as u8;
                    }
                }
                for (o, d) in blk.iter_mut().zip(digits) {
                    *o = ternary3_byte(d);
                }
            }
        }
        QFormat::Binary { .. } => {
            for (k, &c) in codes.iter().enumerate() {
                if c > 0 {
                    out[k / 8] |= 1 << (k % 8);
                }
            }
        }
        QFormat::Int4 { asym, .. } => {
            let pad = if asym { 0 } else { 0x88 };
            out.fill(pad);
            let bias = if asym { 0 } else { 8 };
            for (k, &c) in codes.iter().enumerate() {
                let (b, i) = (k / 128, k % 128);
                let byte = &mut out[b * 64 + i % 64];
                let nib = (c + bias) as u8;
                *byte = if i < 64 {
                    (*byte & 0xF0) | nib
                } else {
                    (*byte & 0x0F) | (nib << 4)
                };
            }
        }
        QFormat::Int8 { .. } => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = c as u8;
            }
        }
    }
}

fn unpack_row(format: QFormat, data: &[u8], codes: &mut [i8]) -> std::result::Result<(), String> {
    match format {
        QFormat::Ternary2 { .. } => {
            for (k, c) in codes.iter_mut().enumerate() {
                let (b, i) = (k / 256, k % 256);
                let v = (data[b * 64 + i % 64] >> (2 * (i / 64))) & 3;
                if v == 3 {
                    return Err(format!("weight {k} has the invalid 2-bit code 3"));
                }
                *c = v as i8 - 1;
            }
        }
        QFormat::Ternary3 { .. } => {
            for (k, c) in codes.iter_mut().enumerate() {
                let (byte, n) = ternary3_position(k % 256);
                // Every byte decodes to digits 0..=2, so there is no invalid base-3 byte to reject.
                *c = ternary3_digit(data[(k / 256) * 52 + byte], n) as i8 - 1;
            }
        }
        QFormat::Binary { .. } => {
            for (k, c) in codes.iter_mut().enumerate() {
                *c = if data[k / 8] >> (k % 8) & 1 == 1 {
                    1
                } else {
                    -1
                };
            }
        }
        QFormat::Int4 { asym, .. } => {
            for (k, c) in codes.iter_mut().enumerate() {
                let (b, i) = (k / 128, k % 128);
                let byte = data[b * 64 + i % 64];
                let nib = if i < 64 { byte & 0xF } else { byte >> 4 };
                *c = nib as i8 - if asym { 0 } else { 8 };
            }
        }
        QFormat::Int8 { .. } => {
            for (k, c) in codes.iter_mut().enumerate() {
                *c = data[k] as i8;
                if *c == i8::MIN {
                    return Err(format!("weight {k} is −128, outside the symmetric range"));
                }
            }
        }
    }
    Ok(())
}
