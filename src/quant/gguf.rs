//! Converters between GGUF's quantized block layouts and [`QTensor`], so GGUF weights run on our kernels
//! without being re-quantized: each conversion keeps every code and scale exactly (GGUF's f16 scales
//! widen to f32 losslessly), and converting back gives the same bytes.
//!
//! | GGUF type (id) | block | bytes | becomes |
//! |---|---|---|---|
//! | Q4_0 (2) | 32 | f16 d, 16 × two nibbles: w[j] = d·(lo − 8), w[j+16] = d·(hi − 8) | `Int4 { group: 32, asym: false }` |
//! | Q4_1 (3) | 32 | f16 d, f16 m, 16 × two nibbles: w = d·q + m | `Int4 { group: 32, asym: true }` |
//! | Q8_0 (8) | 32 | f16 d, 32 × i8: w = d·q | `Int8 { group: 32 }` |
//! | TQ1_0 (34) | 256 | 48 + 4 base-3 bytes, f16 d | `Ternary3 { group: 256 }` (same byte order) |
//! | TQ2_0 (35) | 256 | 64 bytes of 2-bit codes, f16 d: byte 32h + m, bits 2l → w[128h + 32l + m] | `Ternary2 { group: 256 }` |

use half::f16;

use super::format::{Group, QFormat, QTensor};
use crate::error::Result;

/// A GGUF (ggml) block type that trit converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    Q4_0,
    Q4_1,
    Q8_0,
    Tq1_0,
    Tq2_0,
}

impl GgmlType {
    /// The type for a ggml type id, if trit converts it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            34 => GgmlType::Tq1_0,
            35 => GgmlType::Tq2_0,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Tq1_0 => 34,
            GgmlType::Tq2_0 => 35,
        }
    }

    /// Weights per block.
    pub fn block_weights(self) -> usize {
        match self {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Tq1_0 | GgmlType::Tq2_0 => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Tq1_0 => 54,
            GgmlType::Tq2_0 => 66,
        }
    }

    /// The trit format a tensor of this type converts to.
    pub fn format(self) -> QFormat {
        match self {
            GgmlType::Q4_0 => QFormat::Int4 {
                group: Group::Size(32),
                asym: false,
            },
            GgmlType::Q4_1 => QFormat::Int4 {
                group: Group::Size(32),
                asym: true,
            },
            GgmlType::Q8_0 => QFormat::Int8 {
                group: Group::Size(32),
            },
            GgmlType::Tq1_0 => QFormat::Ternary3 {
                group: Group::Size(256),
            },
            GgmlType::Tq2_0 => QFormat::Ternary2 {
                group: Group::Size(256),
            },
        }
    }

    /// Bytes of a [rows, cols] tensor of this type, or an error when cols is not a whole number of blocks.
    pub fn tensor_bytes(self, rows: usize, cols: usize) -> Result<usize> {
        if !cols.is_multiple_of(self.block_weights()) {
            crate::bail!(
                "gguf",
                "{self:?} rows are whole blocks of {} weights; a row of {cols} is not",
                self.block_weights()
            );
        }
        (cols / self.block_weights())
            .checked_mul(self.block_bytes())
            .and_then(|row| rows.checked_mul(row))
            .ok_or_else(|| {
                crate::error::Error::Msg(format!("gguf: {self:?} [{rows}, {cols}] is too large"))
            })
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Converts a [rows, cols] tensor of GGUF blocks (row-major, as stored in the file) into a [`QTensor`].
pub fn to_qtensor(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Result<QTensor> {
    let need = ty.tensor_bytes(rows, cols)?;
    if bytes.len() != need {
        crate::bail!(
            "gguf",
            "{ty:?} [{rows}, {cols}] needs {need} bytes, got {}",
            bytes.len()
        );
    }
    let format = ty.format();
    let blocks = bytes.chunks_exact(ty.block_bytes());
    let n_blocks = rows * cols / ty.block_weights();
    let mut scales = Vec::with_capacity(n_blocks);
    let mut mins = Vec::new();
    if ty == GgmlType::Tq1_0 {
        // Our base-3 layout is TQ1_0's, minus the interleaved scale: the packed bytes copy over.
        let mut data = Vec::with_capacity(n_blocks * 52);
        for b in blocks {
            data.extend_from_slice(&b[..52]);
            scales.push(f16_at(b, 52));
        }
        return QTensor::from_packed(format, rows, cols, data, scales, mins);
    }
    let mut codes = vec![0i8; rows * cols];
    for (b, out) in blocks.zip(codes.chunks_exact_mut(ty.block_weights())) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                scales.push(f16_at(b, 0));
                let (qs, bias) = if ty == GgmlType::Q4_1 {
                    mins.push(f16_at(b, 2));
                    (&b[4..20], 0)
                } else {
                    (&b[2..18], 8)
                };
                for (j, &q) in qs.iter().enumerate() {
                    out[j] = (q & 0xF) as i8 - bias;
                    out[j + 16] = (q >> 4) as i8 - bias;
                }
            }
            GgmlType::Q8_0 => {
                scales.push(f16_at(b, 0));
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = q as i8;
                }
            }
            GgmlType::Tq2_0 => {
                for (byte, &q) in b[..64].iter().enumerate() {
                    let (h, m) = (byte / 32, byte % 32);
                    for l in 0..4 {
                        out[128 * h + 32 * l + m] = ((q >> (2 * l)) & 3) as i8 - 1;
                    }
                }
                scales.push(f16_at(b, 64));
            }
            GgmlType::Tq1_0 => unreachable!("copied above"),
        }
    }
    let mins = format.has_mins().then_some(&mins[..]);
    QTensor::from_codes(format, rows, cols, &codes, &scales, mins)
}

/// Converts a [`QTensor`] back into GGUF blocks of `ty`. Its format must be `ty.format()` and every
/// scale and min must be exactly representable in f16 (true of anything [`to_qtensor`] produced);
/// otherwise this is an error rather than a silent re-rounding.
pub fn from_qtensor(q: &QTensor, ty: GgmlType) -> Result<Vec<u8>> {
    if q.format() != ty.format() {
        crate::bail!(
            "gguf",
            "{ty:?} blocks hold {:?}, not {:?}",
            ty.format(),
            q.format()
        );
    }
    let need = ty.tensor_bytes(q.rows(), q.cols())?;
    let exact = |v: f32| -> Result<[u8; 2]> {
        let h = f16::from_f32(v);
        if h.to_f32() != v {
            crate::bail!(
                "gguf",
                "scale {v} is not exactly representable in f16; GGUF blocks would change it"
            );
        }
        Ok(h.to_le_bytes())
    };
    let mut out = Vec::with_capacity(need);
    if ty == GgmlType::Tq1_0 {
        for (blk, &s) in q.data().chunks_exact(52).zip(q.scales()) {
            out.extend_from_slice(blk);
            out.extend_from_slice(&exact(s)?);
        }
        return Ok(out);
    }
    let codes = q.codes();
    for (i, c) in codes.chunks_exact(ty.block_weights()).enumerate() {
        let s = exact(q.scales()[i])?;
        match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                out.extend_from_slice(&s);
                let bias = if ty == GgmlType::Q4_1 {
                    out.extend_from_slice(&exact(q.mins()[i])?);
                    0
                } else {
                    8
                };
                out.extend(
                    (0..16).map(|j| ((c[j] + bias) as u8) | (((c[j + 16] + bias) as u8) << 4)),
                );
            }
            GgmlType::Q8_0 => {
                out.extend_from_slice(&s);
                out.extend(c.iter().map(|&v| v as u8));
            }
            GgmlType::Tq2_0 => {
                out.extend((0..64).map(|byte| {
                    let (h, m) = (byte / 32, byte % 32);
                    (0..4).fold(0u8, |q, l| {
                        q | (((c[128 * h + 32 * l + m] + 1) as u8) << (2 * l))
                    })
                }));
                out.extend_from_slice(&s);
            }
            GgmlType::Tq1_0 => unreachable!("copied above"),
        }
    }
    Ok(out)
}
