//! Writes the seed corpora for the fuzz targets:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds -- fuzz/seeds [MODEL.gguf]
//!
//! `seeds/gguf/` gets small valid GGUF files (v2 and v3; every metadata type, nested arrays and
//! strings; F32, F16, BF16, Q4_0, Q4_1, Q8_0, TQ1_0, TQ2_0 and an unsupported Q6_K tensor; custom
//! alignment) and, when a model is named, its first 64 KiB (the start of a real header).
//! `seeds/safetensors/` gets small valid safetensors files of every dtype trit holds, with
//! metadata, empty and scalar tensors, an unaligned tensor and an unsupported I64 entry.
//! Everything is deterministic, so rerunning rewrites identical files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use trit::io::gguf::Gguf;
use trit::io::safetensors::{serialize, SafeTensors, WriteEntry};
use trit::quant::gguf::{from_qtensor, to_qtensor, GgmlType};
use trit::DType;

// ------------------------------------------------------------------------------------------------
// GGUF.
// ------------------------------------------------------------------------------------------------

/// A metadata value: GGUF type id and payload (without the type id).
#[derive(Clone)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(&'static str),
    Array(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl V {
    fn ty(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Array(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(x) => out.push(*x),
            V::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::Bool(x) => out.push(u8::from(*x)),
            V::Str(s) => put_str(out, s),
            V::Array(elem, items) => {
                put_u32(out, *elem);
                put_u64(out, items.len() as u64);
                for v in items {
                    assert_eq!(v.ty(), *elem, "GGUF arrays are homogeneous");
                    v.encode(out);
                }
            }
            V::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            V::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const Q6_K: u32 = 14;
const BF16: u32 = 30;
const TQ1_0: u32 = 34;
const TQ2_0: u32 = 35;

/// A GGUF tensor: name, dims innermost first, ggml type, data.
struct T(&'static str, Vec<u64>, u32, Vec<u8>);

/// A whole GGUF file: tensors laid out back to back at `alignment`.
fn gguf(version: u32, alignment: usize, kvs: &[(&str, V)], tensors: &[T]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    put_u32(&mut out, version);
    put_u64(&mut out, tensors.len() as u64);
    put_u64(&mut out, kvs.len() as u64);
    for (k, v) in kvs {
        put_str(&mut out, k);
        put_u32(&mut out, v.ty());
        v.encode(&mut out);
    }
    let mut data = Vec::new();
    for T(name, dims, ty, bytes) in tensors {
        put_str(&mut out, name);
        put_u32(&mut out, dims.len() as u32);
        for &d in dims {
            put_u64(&mut out, d);
        }
        put_u32(&mut out, *ty);
        data.resize(data.len().div_ceil(alignment) * alignment, 0);
        put_u64(&mut out, data.len() as u64);
        data.extend_from_slice(bytes);
    }
    if !tensors.is_empty() {
        out.resize(out.len().div_ceil(alignment) * alignment, 0);
        out.extend_from_slice(&data);
    }
    out
}

/// A deterministic xorshift64 generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A small f16 scale (positive, finite), little-endian.
fn scale(rng: &mut Rng) -> [u8; 2] {
    half::f16::from_f32((rng.next() % 2000 + 1) as f32 / 4096.0).to_le_bytes()
}

fn f32s(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.5 - 1.0).to_le_bytes())
        .collect()
}

fn f16s(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| half::f16::from_f32(i as f32 * 0.25).to_le_bytes())
        .collect()
}

fn bf16s(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| half::bf16::from_f32(-(i as f32)).to_le_bytes())
        .collect()
}

/// `n` valid blocks of a ggml block type.
fn blocks(ty: u32, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        match ty {
            Q4_0 => {
                out.extend_from_slice(&scale(rng));
                out.extend(rng.bytes(16));
            }
            Q4_1 => {
                out.extend_from_slice(&scale(rng));
                out.extend_from_slice(&scale(rng));
                out.extend(rng.bytes(16));
            }
            Q8_0 => {
                out.extend_from_slice(&scale(rng));
                // -127..=127: Int8 has no -128.
                out.extend((0..32).map(|_| ((rng.next() % 255) as i16 - 127) as i8 as u8));
            }
            TQ1_0 => {
                // 52 bytes of base-3 digits, then the f16 scale; read and written back through
                // trit's converter so the digit bytes take their canonical spelling.
                let mut b: Vec<u8> = (0..52).map(|_| (rng.next() % 243) as u8).collect();
                b.extend_from_slice(&scale(rng));
                let q = to_qtensor(GgmlType::Tq1_0, &b, 1, 256).expect("TQ1_0 block");
                out.extend(from_qtensor(&q, GgmlType::Tq1_0).expect("TQ1_0 block"));
            }
            TQ2_0 => {
                // 64 bytes of 2-bit codes 0..=2 (ternary -1..=1), then the f16 scale.
                out.extend(
                    (0..64).map(|_| {
                        (0..4).fold(0u8, |b, l| b | (((rng.next() % 3) as u8) << (2 * l)))
                    }),
                );
                out.extend_from_slice(&scale(rng));
            }
            Q6_K => out.extend(rng.bytes(210)),
            _ => unreachable!(),
        }
    }
    out
}

fn gguf_seeds(rng: &mut Rng) -> Vec<(&'static str, Vec<u8>)> {
    let every_type = vec![
        ("general.architecture", V::Str("llama")),
        ("general.name", V::Str("fuzz seed ✓")),
        ("t.u8", V::U8(7)),
        ("t.i8", V::I8(-7)),
        ("t.u16", V::U16(700)),
        ("t.i16", V::I16(-700)),
        ("t.u32", V::U32(70_000)),
        ("t.i32", V::I32(-70_000)),
        ("t.f32", V::F32(1e-5)),
        ("t.bool", V::Bool(true)),
        ("t.u64", V::U64(1 << 40)),
        ("t.i64", V::I64(-(1 << 40))),
        ("t.f64", V::F64(10000.0)),
        (
            "tokenizer.ggml.tokens",
            V::Array(
                8,
                vec![V::Str("<s>"), V::Str("</s>"), V::Str("a"), V::Str("é")],
            ),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Array(5, vec![V::I32(3), V::I32(3), V::I32(1), V::I32(1)]),
        ),
        ("tokenizer.ggml.merges", V::Array(8, vec![V::Str("a b")])),
        (
            "t.nested",
            V::Array(
                9,
                vec![V::Array(4, vec![V::U32(1), V::U32(2)]), V::Array(4, vec![])],
            ),
        ),
        ("t.empty", V::Array(0, vec![])),
    ];
    let tensors = |rng: &mut Rng| {
        vec![
            T("f32", vec![3, 2], F32, f32s(6)),
            T("f16", vec![4], F16, f16s(4)),
            T("bf16", vec![2, 2], BF16, bf16s(4)),
            T("q4_0", vec![32, 2], Q4_0, blocks(Q4_0, 2, rng)),
            T("q4_1", vec![64, 2], Q4_1, blocks(Q4_1, 4, rng)),
            T("q8_0", vec![64, 1, 1], Q8_0, blocks(Q8_0, 2, rng)),
            T("tq1_0", vec![256], TQ1_0, blocks(TQ1_0, 1, rng)),
            T("tq2_0", vec![256, 2], TQ2_0, blocks(TQ2_0, 2, rng)),
            T("q6_k", vec![256], Q6_K, blocks(Q6_K, 1, rng)),
            T("empty", vec![0, 5], F32, Vec::new()),
        ]
    };
    let v3 = gguf(3, 32, &every_type, &tensors(rng));
    let v2 = gguf(
        2,
        32,
        &[
            ("general.architecture", V::Str("llama")),
            ("llama.block_count", V::U32(1)),
            (
                "tokenizer.ggml.tokens",
                V::Array(8, vec![V::Str("x"), V::Str("y")]),
            ),
        ],
        &[
            T("token_embd.weight", vec![32, 2], Q4_1, blocks(Q4_1, 2, rng)),
            T("output_norm.weight", vec![32], F32, f32s(32)),
            T(
                "blk.0.attn_q.weight",
                vec![32, 4],
                Q8_0,
                blocks(Q8_0, 4, rng),
            ),
            T("blk.0.ffn_norm.weight", vec![32], F16, f16s(32)),
        ],
    );
    let aligned = gguf(
        3,
        64,
        &[("general.alignment", V::U32(64))],
        &[
            T("a", vec![1], F32, f32s(1)),
            T("b", vec![32, 3], Q4_1, blocks(Q4_1, 3, rng)),
        ],
    );
    let metadata_only = gguf(3, 32, &every_type, &[]);
    vec![
        ("v3_all_types.gguf", v3),
        ("v2_llama_like.gguf", v2),
        ("v3_align64.gguf", aligned),
        ("v3_metadata_only.gguf", metadata_only),
    ]
}

// ------------------------------------------------------------------------------------------------
// safetensors.
// ------------------------------------------------------------------------------------------------

/// A safetensors file written by hand (for dtypes `serialize` does not take, and odd layouts).
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn safetensors_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let f32d = f32s(6);
    let f16d = f16s(4);
    let bf16d = bf16s(3);
    let i32d: Vec<u8> = [-1i32, 0, 1, i32::MAX]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let i8d = [0x80u8, 0xff, 0, 1, 0x7f];
    let u8d = [1u8, 2, 3];
    let scalar = 3.5f32.to_le_bytes();
    let entries = [
        WriteEntry {
            name: "w",
            dtype: DType::F32,
            shape: &[2, 3],
            data: &f32d,
        },
        WriteEntry {
            name: "h",
            dtype: DType::F16,
            shape: &[4],
            data: &f16d,
        },
        WriteEntry {
            name: "b",
            dtype: DType::BF16,
            shape: &[3, 1],
            data: &bf16d,
        },
        WriteEntry {
            name: "i",
            dtype: DType::I32,
            shape: &[2, 2],
            data: &i32d,
        },
        WriteEntry {
            name: "c",
            dtype: DType::I8,
            shape: &[5],
            data: &i8d,
        },
        WriteEntry {
            name: "u",
            dtype: DType::U8,
            shape: &[1, 3],
            data: &u8d,
        },
        WriteEntry {
            name: "s",
            dtype: DType::F32,
            shape: &[],
            data: &scalar,
        },
        WriteEntry {
            name: "e",
            dtype: DType::F32,
            shape: &[0, 4],
            data: &[],
        },
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    let all = serialize(&entries, &meta).expect("serialize");

    let mut ckpt_meta = BTreeMap::new();
    ckpt_meta.insert("format".to_owned(), "trit-checkpoint-1".to_owned());
    ckpt_meta.insert("step".to_owned(), "12".to_owned());
    ckpt_meta.insert("rng".to_owned(), "1 2 3 4".to_owned());
    let ckpt = serialize(
        &[
            WriteEntry {
                name: "param.w",
                dtype: DType::F32,
                shape: &[2, 3],
                data: &f32d,
            },
            WriteEntry {
                name: "optim.w.m",
                dtype: DType::F32,
                shape: &[2, 3],
                data: &f32d,
            },
        ],
        &ckpt_meta,
    )
    .expect("serialize");

    // Packed back to back as the format allows: an odd U8 tensor leaves the F32 after it
    // unaligned (the copy path), and an I64 entry trit does not hold.
    let mut packed = vec![9u8, 8, 7];
    packed.extend_from_slice(&f32s(2));
    packed.extend_from_slice(&(-5i64).to_le_bytes());
    let unaligned = raw_safetensors(
        r#"{"odd":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"f":{"dtype":"F32","shape":[2],"data_offsets":[3,11]},"pos":{"dtype":"I64","shape":[1],"data_offsets":[11,19]},"__metadata__":{"k":"v"}}"#,
        &packed,
    );
    let empty = raw_safetensors("{}", &[]);
    vec![
        ("all_dtypes.safetensors", all),
        ("checkpoint.safetensors", ckpt),
        ("unaligned_i64.safetensors", unaligned),
        ("empty.safetensors", empty),
    ]
}

// ------------------------------------------------------------------------------------------------

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create seed dir");
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("{:>7} bytes  {}", bytes.len(), path.display());
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "fuzz/seeds".to_owned()));
    let model = args.next();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    for (name, bytes) in gguf_seeds(&mut rng) {
        // Seeds must be files the reader accepts, or they teach the fuzzer nothing past the header.
        let g = Gguf::from_bytes(&bytes, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        for t in g.tensors() {
            if t.name != "q6_k" {
                g.tensor(&t.name, trit::Device::Cpu)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        write(&out.join("gguf"), name, &bytes);
    }
    if let Some(model) = model {
        // The start of a real model: its header (metadata and the start of the vocabulary).
        let mut head = Vec::new();
        fs::File::open(&model)
            .unwrap_or_else(|e| panic!("{model}: {e}"))
            .take(64 * 1024)
            .read_to_end(&mut head)
            .expect("read model");
        write(&out.join("gguf"), "model_head_64k.gguf", &head);
    }
    for (name, bytes) in safetensors_seeds() {
        let st =
            SafeTensors::from_bytes(bytes.clone(), name).unwrap_or_else(|e| panic!("{name}: {e}"));
        trit::io::tensors::tensors(&st, trit::Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        write(&out.join("safetensors"), name, &bytes);
    }
}
