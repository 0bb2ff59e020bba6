//! Sequence packing: several documents in one training row instead of one document padded to the row
//! length. Each token carries its document's id (the attention turns those into a block-diagonal causal
//! mask: no token sees another document), its position within its document (RoPE positions restart at
//! every document), and a next-token target that never crosses a document boundary.

use crate::error::Result;
use crate::storage::Device;
use crate::tensor::Tensor;

/// The target of tokens that have none (a document's last token, padding); pass it to
/// [`Tensor::cross_entropy`] as the ignore index.
pub const IGNORE_INDEX: i32 = -100;

/// The segment id of padding after the last document of a row.
pub const PAD_SEGMENT: i32 = -1;

/// Where one piece of a document went: documents longer than a row are cut into row-sized pieces,
/// each packed (and attended) on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Index of the document in the input.
    pub doc: usize,
    /// Offset of the piece within the document.
    pub offset: usize,
    /// Row of the batch and first column the piece occupies.
    pub row: usize,
    pub start: usize,
    pub len: usize,
}

/// A packed batch; every tensor is [rows, seq] of i32.
#[derive(Clone, Debug)]
pub struct PackedBatch {
    pub ids: Tensor,
    /// The next token of the same document, or [`IGNORE_INDEX`].
    pub targets: Tensor,
    /// One id per piece (its index in `placements`), [`PAD_SEGMENT`] on padding.
    pub segments: Tensor,
    /// Position of each token within its piece (0 on padding).
    pub positions: Tensor,
    pub placements: Vec<Placement>,
}

/// Packs `docs` into rows of `seq` tokens, first fit in input order (a piece goes into the first row
/// with room left, else a new row), and pads the rest of each row with `pad`.
pub fn pack(docs: &[&[u32]], seq: usize, pad: u32, device: Device) -> Result<PackedBatch> {
    if seq == 0 || seq > i32::MAX as usize {
        crate::bail!("pack", "rows must hold 1..=2³¹−1 tokens, got {seq}");
    }
    let mut all = docs.iter().flat_map(|d| d.iter()).chain([&pad]);
    if let Some(t) = all.find(|&&t| t > i32::MAX as u32) {
        crate::bail!("pack", "token id {t} does not fit an i32 tensor");
    }
    let mut placements = Vec::new();
    let mut fill: Vec<usize> = Vec::new();
    for (doc, tokens) in docs.iter().enumerate() {
        for offset in (0..tokens.len()).step_by(seq) {
            let len = (tokens.len() - offset).min(seq);
            let row = match fill.iter().position(|&f| f + len <= seq) {
                Some(r) => r,
                None => {
                    fill.push(0);
                    fill.len() - 1
                }
            };
            placements.push(Placement {
                doc,
                offset,
                row,
                start: fill[row],
                len,
            });
            fill[row] += len;
        }
    }
    let rows = fill.len();
    let mut ids = vec![pad as i32; rows * seq];
    let mut targets = vec![IGNORE_INDEX; rows * seq];
    let mut segments = vec![PAD_SEGMENT; rows * seq];
    let mut positions = vec![0i32; rows * seq];
    for (piece, p) in placements.iter().enumerate() {
        let tokens = &docs[p.doc][p.offset..p.offset + p.len];
        let at = p.row * seq + p.start;
        for (i, &t) in tokens.iter().enumerate() {
            ids[at + i] = t as i32;
            segments[at + i] = piece as i32;
            positions[at + i] = i as i32;
            if let Some(&next) = tokens.get(i + 1) {
                targets[at + i] = next as i32;
            }
        }
    }
    let t = |v: Vec<i32>| Tensor::from_vec(v, (rows, seq), device);
    Ok(PackedBatch {
        ids: t(ids)?,
        targets: t(targets)?,
        segments: t(segments)?,
        positions: t(positions)?,
        placements,
    })
}

/// Positions that restart at 0 at every run of equal consecutive ids of `segments` [batch, seq].
pub fn positions_from_segments(segments: &Tensor) -> Result<Tensor> {
    let &[b, s] = segments.dims() else {
        crate::bail!(
            "positions_from_segments",
            "segments must be [batch, seq], got shape {}",
            segments.shape()
        );
    };
    if segments.dtype().is_float() {
        crate::bail!("positions_from_segments", "segments must be integer ids");
    }
    let ids = segments.to_vec_i64();
    let mut pos = vec![0i32; ids.len()];
    for (p, row) in pos.chunks_mut(s.max(1)).zip(ids.chunks(s.max(1))) {
        for t in 1..row.len() {
            p[t] = if row[t] == row[t - 1] {
                p[t - 1] + 1
            } else {
                0
            };
        }
    }
    Tensor::from_vec(pos, (b, s), segments.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_first_fit_and_cuts_long_documents() -> Result<()> {
        let docs: Vec<Vec<u32>> = vec![
            vec![1, 2, 3],
            vec![4, 5, 6, 7, 8, 9, 10],
            vec![11, 12],
            vec![13],
        ];
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let p = pack(&refs, 5, 0, Device::Cpu)?;
        // Row 0: [1 2 3 | 9 10] (the tail of document 1 fits after document 0), row 1: [4 5 6 7 8],
        // row 2: [11 12 | 13 | pad pad].
        assert_eq!(
            p.ids.to_vec_i64(),
            [1, 2, 3, 9, 10, 4, 5, 6, 7, 8, 11, 12, 13, 0, 0]
        );
        assert_eq!(
            p.targets.to_vec_i64(),
            [2, 3, -100, 10, -100, 5, 6, 7, 8, -100, 12, -100, -100, -100, -100]
        );
        assert_eq!(
            p.segments.to_vec_i64(),
            [0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 3, 3, 4, -1, -1]
        );
        assert_eq!(
            p.positions.to_vec_i64(),
            [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1, 0, 0, 0]
        );
        assert_eq!(
            p.placements[2],
            Placement {
                doc: 1,
                offset: 5,
                row: 0,
                start: 3,
                len: 2
            }
        );
        assert_eq!(
            positions_from_segments(&p.segments)?.to_vec_i64(),
            [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1, 0, 0, 1]
        );
        Ok(())
    }

    #[test]
    fn bad_input_is_an_error() -> Result<()> {
        assert!(pack(&[&[1, 2]], 0, 0, Device::Cpu).is_err());
        let f = Tensor::zeros((2, 3), crate::DType::F32, Device::Cpu)?;
        assert!(positions_from_segments(&f).is_err());
        assert!(positions_from_segments(&Tensor::arange(0, 3, Device::Cpu)?).is_err());
        Ok(())
    }
}
