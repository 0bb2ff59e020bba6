//! Packed formats: pack → unpack round trips, dequantization, byte sizes, GGUF block conversions against
//! hand-built blocks decoded with ggml's own formulas, and errors on bad input.

use half::f16;
use proptest::prelude::*;
use trit::quant::format::{ternary3_byte, ternary3_digit, ternary3_position};
use trit::quant::gguf::{from_qtensor, to_qtensor, GgmlType};
use trit::quant::{Group, QFormat, QTensor};

fn all_formats() -> Vec<QFormat> {
    let mut f = vec![
        QFormat::Ternary2 { group: Group::Row },
        QFormat::Ternary3 { group: Group::Row },
        QFormat::Ternary3 {
            group: Group::Size(256),
        },
        QFormat::Binary { offset: false },
        QFormat::Binary { offset: true },
        QFormat::Int8 { group: Group::Row },
    ];
    for g in [32, 64, 128, 256] {
        f.push(QFormat::Ternary2 {
            group: Group::Size(g),
        });
    }
    for g in [
        Group::Row,
        Group::Size(32),
        Group::Size(64),
        Group::Size(128),
    ] {
        f.push(QFormat::Int4 {
            group: g,
            asym: false,
        });
        f.push(QFormat::Int4 {
            group: g,
            asym: true,
        });
        if g != Group::Row {
            f.push(QFormat::Int8 { group: g });
        }
    }
    f
}

/// Deterministic codes covering the whole range of `format`.
fn codes_for(format: QFormat, n: usize, seed: u64) -> Vec<i8> {
    let (lo, hi) = format.code_range();
    let span = (i16::from(hi) - i16::from(lo) + 1) as u64;
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let c = (i16::from(lo) + ((s >> 33) % span) as i16) as i8;
            if matches!(format, QFormat::Binary { .. }) && c == 0 {
                1
            } else {
                c
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pack_unpack_round_trips(rows in 1usize..5, cols in 1usize..700, seed in any::<u64>(), fi in 0usize..19) {
        let formats = all_formats();
        let format = formats[fi % formats.len()];
        let codes = codes_for(format, rows * cols, seed);
        let groups = format.groups_per_row(cols);
        let scales: Vec<f32> = (0..rows * groups).map(|i| 0.25 + i as f32 * 0.5).collect();
        let mins: Vec<f32> = (0..rows * groups).map(|i| -(i as f32) - 0.125).collect();
        let q = QTensor::from_codes(format, rows, cols, &codes, &scales, format.has_mins().then_some(&mins[..])).unwrap();
        prop_assert_eq!(q.codes(), codes.clone());
        prop_assert_eq!(q.data().len(), rows * format.row_bytes(cols));
        // Dequantization is scale·code (+ min) with the group (or, for binary offsets, the row) entry.
        let g = format.group_size(cols);
        let deq = q.dequantize();
        for r in 0..rows {
            for k in 0..cols {
                let gi = r * groups + k / g;
                let mut want = scales[gi] * f32::from(codes[r * cols + k]);
                if format.has_mins() {
                    want += mins[gi];
                }
                prop_assert_eq!(deq[r * cols + k], want, "{:?} r{} k{}", format, r, k);
            }
        }
        // Rebuilding from the packed bytes gives the same tensor.
        let again = QTensor::from_packed(format, rows, cols, q.data().to_vec(), q.scales().to_vec(), q.mins().to_vec()).unwrap();
        prop_assert_eq!(again.codes(), codes);
        prop_assert_eq!(again.code_sums(), q.code_sums());
    }

    #[test]
    fn quantize_error_is_bounded(rows in 1usize..4, cols in 1usize..600, seed in any::<u64>()) {
        let mut s = seed | 1;
        let w: Vec<f32> = (0..rows * cols).map(|_| { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s % 2001) as f32 / 1000.0 - 1.0 }).collect();
        for format in [
            QFormat::Int4 { group: Group::Size(32), asym: false },
            QFormat::Int4 { group: Group::Size(64), asym: true },
            QFormat::Int8 { group: Group::Row },
        ] {
            let q = QTensor::quantize(&w, rows, cols, format).unwrap();
            let deq = q.dequantize();
            let g = format.group_size(cols);
            let groups = format.groups_per_row(cols);
            for (i, (&a, &b)) in w.iter().zip(&deq).enumerate() {
                // Round to nearest: at most half a step, plus f32 rounding of the step itself.
                let s = q.scales()[(i / cols) * groups + (i % cols) / g];
                prop_assert!((a - b).abs() <= 0.5 * s * (1.0 + 1e-5) + 1e-6, "{:?} {} vs {} step {}", format, a, b, s);
            }
        }
    }
}

#[test]
fn byte_sizes_and_bits_per_weight() {
    // 4096 columns: 2-bit = 1024 B/row, base-3 = 16 blocks of 52 B, 1-bit = 512 B, 4-bit = 2048 B.
    let t2 = QFormat::Ternary2 { group: Group::Row };
    let t3 = QFormat::Ternary3 { group: Group::Row };
    let b = QFormat::Binary { offset: false };
    let i4 = QFormat::Int4 {
        group: Group::Size(32),
        asym: false,
    };
    assert_eq!(t2.row_bytes(4096), 1024);
    assert_eq!(t3.row_bytes(4096), 832);
    assert_eq!(b.row_bytes(4096), 512);
    assert_eq!(i4.row_bytes(4096), 2048);
    assert_eq!(QFormat::Int8 { group: Group::Row }.row_bytes(4096), 4096);
    assert!((t3.bits_per_weight(4096) - (832.0 * 8.0 + 32.0) / 4096.0).abs() < 1e-12);
    assert!((i4.bits_per_weight(4096) - 5.0).abs() < 1e-12);
    let q = QTensor::quantize(&vec![0.5f32; 3 * 4096], 3, 4096, i4).unwrap();
    assert_eq!(q.byte_size(), 3 * 2048 + 3 * 128 * 4);
    // A row that is not a whole block still takes whole blocks.
    assert_eq!(t2.row_bytes(257), 128);
}

#[test]
fn quantize_follows_the_documented_rules() {
    // Ternary absmean: α = mean|w| = 0.5; w/α = [2, -0.4, 0.2, -2] → [1, 0, 0, -1].
    let w = [1.0f32, -0.2, 0.1, -0.7];
    let q = QTensor::quantize(&w, 1, 4, QFormat::Ternary2 { group: Group::Row }).unwrap();
    assert_eq!(q.codes(), vec![1, 0, 0, -1]);
    assert!((q.scales()[0] - 0.5).abs() < 1e-7);
    // Binary with offset: β = mean = 0.05, α = mean|w − β| = (0.95 + 0.25 + 0.05 + 0.75)/4 = 0.5.
    let q = QTensor::quantize(&w, 1, 4, QFormat::Binary { offset: true }).unwrap();
    assert_eq!(q.codes(), vec![1, -1, 1, -1]);
    assert!((q.mins()[0] - 0.05).abs() < 1e-7 && (q.scales()[0] - 0.5).abs() < 1e-6);
    // Int4 symmetric: s = 1/7, codes round(7·w) = [7, -1, 1, -5] (−1.4 → −1, 0.7 → 1, −4.9 → −5).
    let q = QTensor::quantize(
        &w,
        1,
        4,
        QFormat::Int4 {
            group: Group::Row,
            asym: false,
        },
    )
    .unwrap();
    assert_eq!(q.codes(), vec![7, -1, 1, -5]);
    // Int4 asymmetric: min −0.7, s = 1.7/15; codes round((w + 0.7)/s) = [15, 4, 7, 0].
    let q = QTensor::quantize(
        &w,
        1,
        4,
        QFormat::Int4 {
            group: Group::Row,
            asym: true,
        },
    )
    .unwrap();
    assert_eq!(q.codes(), vec![15, 4, 7, 0]);
    assert_eq!(q.mins()[0], -0.7);
}

#[test]
fn base3_bytes_decode_every_digit_combination() {
    for v in 0..243u16 {
        let mut digits = [0u8; 5];
        let mut r = v;
        for d in digits.iter_mut().rev() {
            *d = (r % 3) as u8;
            r /= 3;
        }
        let q = ternary3_byte(digits);
        for (n, &d) in digits.iter().enumerate() {
            assert_eq!(ternary3_digit(q, n as u32), d, "value {v} digit {n}");
        }
    }
    // TQ1_0's order: weights 0..160 by 32-byte digit planes, 160..240 by 16-byte planes, then qh.
    assert_eq!(ternary3_position(0), (0, 0));
    assert_eq!(ternary3_position(33), (1, 1));
    assert_eq!(ternary3_position(175), (47, 0));
    assert_eq!(ternary3_position(176), (32, 1));
    assert_eq!(ternary3_position(245), (49, 1));
}

/// ggml's dequantize_row_* for the five block types, written from the format definitions: the
/// independent reference for the converters.
fn ggml_dequantize(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let h = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut y = Vec::new();
    for b in bytes.chunks_exact(ty.block_bytes()) {
        match ty {
            GgmlType::Q4_0 => {
                let d = h(b, 0);
                let mut v = [0f32; 32];
                for j in 0..16 {
                    v[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                    v[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
                y.extend(v);
            }
            GgmlType::Q4_1 => {
                let (d, m) = (h(b, 0), h(b, 2));
                let mut v = [0f32; 32];
                for j in 0..16 {
                    v[j] = (b[4 + j] & 0xF) as f32 * d + m;
                    v[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
                y.extend(v);
            }
            GgmlType::Q8_0 => {
                let d = h(b, 0);
                y.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
            GgmlType::Tq2_0 => {
                let d = h(b, 64);
                for j in (0..64).step_by(32) {
                    for l in 0..4 {
                        for m in 0..32 {
                            y.push((((b[j + m] >> (l * 2)) & 3) as i32 - 1) as f32 * d);
                        }
                    }
                }
            }
            GgmlType::Tq1_0 => {
                let d = h(b, 52);
                let pow3 = [1u8, 3, 9, 27, 81, 243];
                let trit = |q: u8, n: usize| ((q.wrapping_mul(pow3[n]) as u16 * 3) >> 8) as i32 - 1;
                // ggml walks digit planes: all bytes' digit n before digit n + 1.
                for (bytes, digits) in [(&b[..32], 5), (&b[32..48], 5), (&b[48..52], 4)] {
                    for n in 0..digits {
                        y.extend(bytes.iter().map(|&q| trit(q, n) as f32 * d));
                    }
                }
            }
        }
    }
    y
}

/// Hand-built blocks: valid codes, scales that are f16 values, a few blocks per row.
fn build_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = Vec::new();
    for _ in 0..rows * cols / ty.block_weights() {
        let d = f16::from_f32(0.01 + (next() % 1000) as f32 / 997.0).to_le_bytes();
        let m = f16::from_f32(-((next() % 1000) as f32) / 331.0).to_le_bytes();
        match ty {
            GgmlType::Q4_0 => {
                out.extend(d);
                out.extend((0..16).map(|_| next() as u8));
            }
            GgmlType::Q4_1 => {
                out.extend(d);
                out.extend(m);
                out.extend((0..16).map(|_| next() as u8));
            }
            GgmlType::Q8_0 => {
                out.extend(d);
                // −128 is outside the symmetric range ggml's quantizer produces.
                out.extend((0..32).map(|_| (next() % 255) as u8 ^ 0x80).map(|q| {
                    if q == 0x80 {
                        0
                    } else {
                        q
                    }
                }));
            }
            GgmlType::Tq2_0 => {
                out.extend(
                    (0..64).map(|_| (0..4).fold(0u8, |q, l| q | (((next() % 3) as u8) << (2 * l)))),
                );
                out.extend(d);
            }
            GgmlType::Tq1_0 => {
                let digits = |n: usize, next: &mut dyn FnMut() -> u64| {
                    let mut t = [0u8; 5];
                    for d in t.iter_mut().take(n) {
                        *d = (next() % 3) as u8;
                    }
                    ternary3_byte(t)
                };
                for _ in 0..48 {
                    out.push(digits(5, &mut next));
                }
                for _ in 0..4 {
                    out.push(digits(4, &mut next));
                }
                out.extend(d);
            }
        }
    }
    out
}

#[test]
fn gguf_blocks_convert_exactly_and_back() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Tq1_0,
        GgmlType::Tq2_0,
    ] {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        let (rows, cols) = (3, 2 * ty.block_weights().max(256));
        let bytes = build_blocks(ty, rows, cols, ty.id() as u64 + 7);
        assert_eq!(bytes.len(), ty.tensor_bytes(rows, cols).unwrap());
        let q = to_qtensor(ty, &bytes, rows, cols).unwrap();
        assert_eq!(q.format(), ty.format());
        assert_eq!(q.dequantize(), ggml_dequantize(ty, &bytes), "{ty:?}");
        assert_eq!(
            from_qtensor(&q, ty).unwrap(),
            bytes,
            "{ty:?} back to blocks"
        );
    }
}

#[test]
fn bad_input_is_an_error() {
    let t2 = QFormat::Ternary2 { group: Group::Row };
    // Wrong counts, codes out of range, a zero binary code, non-finite scales, unsupported groups.
    assert!(QTensor::from_codes(t2, 2, 3, &[0; 5], &[1.0; 2], None).is_err());
    assert!(QTensor::from_codes(t2, 1, 3, &[0, 2, 0], &[1.0], None).is_err());
    assert!(QTensor::from_codes(
        QFormat::Binary { offset: false },
        1,
        2,
        &[1, 0],
        &[1.0],
        None
    )
    .is_err());
    assert!(QTensor::from_codes(t2, 1, 2, &[0, 1], &[f32::NAN], None).is_err());
    assert!(QTensor::from_codes(
        QFormat::Binary { offset: true },
        1,
        2,
        &[1, -1],
        &[1.0],
        None
    )
    .is_err());
    assert!(QTensor::quantize(
        &[0.0; 96],
        1,
        96,
        QFormat::Ternary2 {
            group: Group::Size(48)
        }
    )
    .is_err());
    assert!(QTensor::quantize(&[f32::INFINITY], 1, 1, t2).is_err());
    // Stray padding bits are rewritten to 0, which XNOR-popcount relies on.
    let b = QTensor::from_packed(
        QFormat::Binary { offset: false },
        1,
        3,
        vec![0xFF; 8],
        vec![1.0],
        vec![],
    )
    .unwrap();
    assert_eq!(b.data()[0], 0b111);
    assert!(b.data()[1..].iter().all(|&v| v == 0));
    // A 2-bit code of 3 is corrupt data.
    assert!(QTensor::from_packed(t2, 1, 4, vec![0xFF; 64], vec![1.0], vec![]).is_err());
    // GGUF: a row that is not whole blocks, a short buffer, a scale that f16 cannot hold.
    assert!(to_qtensor(GgmlType::Q4_0, &[0; 18], 1, 31).is_err());
    assert!(to_qtensor(GgmlType::Q8_0, &[0; 33], 1, 32).is_err());
    let q = QTensor::quantize(
        &[0.1234567f32; 32],
        1,
        32,
        QFormat::Int8 {
            group: Group::Size(32),
        },
    )
    .unwrap();
    assert!(from_qtensor(&q, GgmlType::Q8_0).is_err());
    assert!(from_qtensor(&q, GgmlType::Q4_0).is_err());
}
