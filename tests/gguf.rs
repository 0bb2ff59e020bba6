//! The GGUF reader: files built by a small writer in this test read back exactly (every metadata type,
//! the typed getters, custom alignment, float and block-quantized tensors), malformed files are
//! `Error::Gguf` naming the problem (never a panic), and a deterministic byte-flipping fuzz loop never
//! panics.

use half::{bf16, f16};
use trit::io::gguf::{Gguf, TensorType, Value};
use trit::quant::gguf::{from_qtensor, GgmlType};
use trit::quant::QTensor;
use trit::{DType, Device, Error};

// ---------------------------------------------------------------------------------------------------
// A small GGUF writer.
// ---------------------------------------------------------------------------------------------------

const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

const G_F32: u32 = 0;
const G_F16: u32 = 1;
const G_Q4_1: u32 = 3;
const G_Q8_0: u32 = 8;
const G_Q6_K: u32 = 14;
const G_BF16: u32 = 30;
const G_TQ2_0: u32 = 35;

/// The GGUF type id of a value.
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// A value's bytes without its type id. An empty array is written as an array of u8.
fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => put_str(out, s.as_bytes()),
        Value::Array(a) => {
            let elem = a.first().map_or(T_U8, type_id);
            assert!(
                a.iter().all(|e| type_id(e) == elem),
                "GGUF arrays are homogeneous"
            );
            put_u32(out, elem);
            put_u64(out, a.len() as u64);
            for e in a {
                encode(e, out);
            }
        }
    }
}

struct TensorSpec {
    name: Vec<u8>,
    /// GGUF order: innermost first.
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Where to claim (and put) the data; `None` places it at the next aligned offset.
    offset: Option<u64>,
}

/// Builds a GGUF file: metadata of any type (or raw typed bytes), tensors with any dims, type and bytes,
/// placed at aligned offsets unless told otherwise.
struct Builder {
    version: u32,
    alignment: u64,
    kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
    tensors: Vec<TensorSpec>,
    counts: Option<(u64, u64)>,
    pad_end: bool,
}

/// A built file and where its parts landed.
struct Built {
    bytes: Vec<u8>,
    /// Byte where the tensor infos start (just after the metadata).
    infos_start: usize,
    data_start: usize,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            version: 3,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
            counts: None,
            pad_end: false,
        }
    }

    fn version(mut self, v: u32) -> Builder {
        self.version = v;
        self
    }

    /// Writes `general.alignment` (u32) and lays the data out with it.
    fn alignment(mut self, a: u32) -> Builder {
        self.alignment = u64::from(a);
        self.kv("general.alignment", Value::U32(a))
    }

    fn kv(self, key: &str, v: Value) -> Builder {
        let mut payload = Vec::new();
        encode(&v, &mut payload);
        self.raw_kv(key.as_bytes(), type_id(&v), payload)
    }

    /// A metadata entry with any key bytes, type id and payload.
    fn raw_kv(mut self, key: &[u8], ty: u32, payload: Vec<u8>) -> Builder {
        self.kvs.push((key.to_vec(), ty, payload));
        self
    }

    fn tensor(self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Builder {
        self.tensor_at(name, dims, ty, data, None)
    }

    fn tensor_at(
        mut self,
        name: &str,
        dims: &[u64],
        ty: u32,
        data: Vec<u8>,
        offset: Option<u64>,
    ) -> Builder {
        self.tensors.push(TensorSpec {
            name: name.as_bytes().to_vec(),
            dims: dims.to_vec(),
            ty,
            data,
            offset,
        });
        self
    }

    /// Claims these (tensor, metadata) counts instead of the real ones.
    fn counts(mut self, tensors: u64, kvs: u64) -> Builder {
        self.counts = Some((tensors, kvs));
        self
    }

    /// Pads the data section to a whole multiple of the alignment, as llama.cpp writes it.
    fn pad_end(mut self) -> Builder {
        self.pad_end = true;
        self
    }

    fn build(&self) -> Built {
        let align = self.alignment.max(1) as usize;
        let mut data: Vec<u8> = Vec::new();
        let mut offsets = Vec::new();
        for t in &self.tensors {
            let off = match t.offset {
                Some(o) => o as usize,
                None => data.len().div_ceil(align) * align,
            };
            if !t.data.is_empty() {
                if data.len() < off + t.data.len() {
                    data.resize(off + t.data.len(), 0);
                }
                data[off..off + t.data.len()].copy_from_slice(&t.data);
            }
            offsets.push(off as u64);
        }
        if self.pad_end {
            data.resize(data.len().div_ceil(align) * align, 0);
        }
        let mut out = b"GGUF".to_vec();
        put_u32(&mut out, self.version);
        let (nt, nk) = self
            .counts
            .unwrap_or((self.tensors.len() as u64, self.kvs.len() as u64));
        put_u64(&mut out, nt);
        put_u64(&mut out, nk);
        for (k, ty, payload) in &self.kvs {
            put_str(&mut out, k);
            put_u32(&mut out, *ty);
            out.extend_from_slice(payload);
        }
        let infos_start = out.len();
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ty);
            put_u64(&mut out, off);
        }
        let data_start = out.len().div_ceil(align) * align;
        if !self.tensors.is_empty() {
            out.resize(data_start, 0);
            out.extend_from_slice(&data);
        }
        Built {
            bytes: out,
            infos_start,
            data_start,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.build().bytes
    }
}

// ---------------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------------

/// A deterministic xorshift64 generator.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn open(bytes: &[u8]) -> Gguf {
    Gguf::from_bytes(bytes, "test.gguf").unwrap_or_else(|e| panic!("valid file rejected: {e}"))
}

/// The message of the `Error::Gguf` that parsing `bytes` must give.
fn parse_err(bytes: &[u8]) -> String {
    match Gguf::from_bytes(bytes, "bad.gguf") {
        Ok(_) => panic!("a malformed file was accepted"),
        Err(e) => gguf_msg(e),
    }
}

fn gguf_msg(e: Error) -> String {
    match e {
        Error::Gguf { path, msg } => {
            assert!(!path.is_empty());
            msg
        }
        other => panic!("expected Error::Gguf, got {other:?}"),
    }
}

/// Asserts parsing `bytes` fails with a message containing every one of `needles`.
fn expect_err(bytes: &[u8], needles: &[&str]) {
    let msg = parse_err(bytes);
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} does not mention {n:?}");
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A deterministic QTensor of `ty`'s format with codes over the whole range and f16-exact scales (and
/// mins), so its GGUF blocks round-trip exactly.
fn build_qtensor(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> QTensor {
    let format = ty.format();
    let (lo, hi) = format.code_range();
    let span = (i16::from(hi) - i16::from(lo) + 1) as usize;
    let mut rng = XorShift(seed | 1);
    let codes: Vec<i8> = (0..rows * cols)
        .map(|_| (i16::from(lo) + rng.below(span) as i16) as i8)
        .collect();
    let groups = rows * cols / ty.block_weights();
    let f16_exact = |rng: &mut XorShift, signed: bool| {
        let v = (rng.below(2000) as f32 + 1.0) / 4096.0;
        let v = f16::from_f32(if signed && rng.below(2) == 0 { -v } else { v });
        v.to_f32()
    };
    let scales: Vec<f32> = (0..groups).map(|_| f16_exact(&mut rng, false)).collect();
    let mins: Vec<f32> = (0..groups).map(|_| f16_exact(&mut rng, true)).collect();
    QTensor::from_codes(
        format,
        rows,
        cols,
        &codes,
        &scales,
        format.has_mins().then_some(&mins[..]),
    )
    .unwrap()
}

fn every_value_type() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(65_000)),
        ("t.i16", Value::I16(-30_000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX - 5)),
        ("t.i64", Value::I64(i64::MIN + 7)),
        ("t.f32", Value::F32(-1.5e-3)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.bool_true", Value::Bool(true)),
        ("t.bool_false", Value::Bool(false)),
        ("t.str", Value::Str("héllo, wörld ✓".into())),
        ("t.str_empty", Value::Str(String::new())),
        ("t.arr_empty", Value::Array(vec![])),
        ("t.arr_u8", Value::Array(vec![Value::U8(0), Value::U8(255)])),
        (
            "t.arr_i64",
            Value::Array(vec![Value::I64(-1), Value::I64(i64::MAX)]),
        ),
        (
            "t.arr_f32",
            Value::Array(vec![Value::F32(0.5), Value::F32(-2.0), Value::F32(1e30)]),
        ),
        (
            "t.arr_bool",
            Value::Array(vec![Value::Bool(true), Value::Bool(false)]),
        ),
        (
            "t.arr_str",
            Value::Array(vec![
                Value::Str("a".into()),
                Value::Str(String::new()),
                Value::Str("Ġthe".into()),
            ]),
        ),
        (
            "t.arr_nested",
            Value::Array(vec![
                Value::Array(vec![Value::U16(1), Value::U16(2)]),
                Value::Array(vec![]),
                Value::Array(vec![Value::U16(3)]),
            ]),
        ),
        (
            "t.arr_nested_str",
            Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::Str(
                "deep".into(),
            )])])]),
        ),
    ]
}

/// An array nested `depth` deep (the outermost counts as 1) around a single u8.
fn nested(depth: usize) -> Value {
    let mut v = Value::U8(7);
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    v
}

/// A valid file with metadata of several types and several tensors (floats and blocks), ending exactly
/// at the last tensor's last byte.
fn sample_file() -> Vec<u8> {
    let q8 = build_qtensor(GgmlType::Q8_0, 2, 64, 11);
    let q41 = build_qtensor(GgmlType::Q4_1, 3, 32, 12);
    let tq2 = build_qtensor(GgmlType::Tq2_0, 1, 256, 13);
    let f: Vec<f32> = (0..6).map(|i| i as f32 * 0.25 - 0.5).collect();
    let h: Vec<f16> = (0..8).map(|i| f16::from_f32(i as f32 - 3.0)).collect();
    let b: Vec<bf16> = (0..4).map(|i| bf16::from_f32(i as f32 * 1.5)).collect();
    Builder::new()
        .kv("general.architecture", Value::Str("llama".into()))
        .kv("llama.block_count", Value::U32(2))
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv("flag", Value::Bool(true))
        .kv(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::Str("<s>".into()), Value::Str("a".into())]),
        )
        .kv("nested", nested(2))
        .tensor("f32", &[3, 2], G_F32, f32_bytes(&f))
        .tensor("f16", &[8], G_F16, f16_bytes(&h))
        .tensor("bf16", &[2, 1, 2], G_BF16, bf16_bytes(&b))
        .tensor(
            "q8",
            &[64, 2],
            G_Q8_0,
            from_qtensor(&q8, GgmlType::Q8_0).unwrap(),
        )
        .tensor(
            "q41",
            &[32, 3],
            G_Q4_1,
            from_qtensor(&q41, GgmlType::Q4_1).unwrap(),
        )
        .tensor(
            "tq2",
            &[256, 1],
            G_TQ2_0,
            from_qtensor(&tq2, GgmlType::Tq2_0).unwrap(),
        )
        .bytes()
}

// ---------------------------------------------------------------------------------------------------
// Round trips.
// ---------------------------------------------------------------------------------------------------

#[test]
fn every_metadata_type_reads_back() {
    let values = every_value_type();
    for version in [2, 3] {
        let mut b = Builder::new().version(version);
        for (k, v) in &values {
            b = b.kv(k, v.clone());
        }
        let g = open(&b.bytes());
        assert_eq!(g.version(), version);
        assert_eq!(g.alignment(), 32);
        assert!(g.tensors().is_empty());
        assert_eq!(g.metadata().len(), values.len());
        for (k, v) in &values {
            assert_eq!(g.get(k).unwrap(), v, "{k}");
            assert_eq!(&g.metadata()[*k], v, "{k}");
        }
    }
}

#[test]
fn arrays_nest_up_to_eight_deep() {
    let g = open(&Builder::new().kv("deep", nested(8)).bytes());
    assert_eq!(g.get("deep").unwrap(), &nested(8));
    expect_err(
        &Builder::new().kv("deep", nested(9)).bytes(),
        &["deep", "nested"],
    );
}

#[test]
fn typed_getters() {
    let mut b = Builder::new();
    let ints = [
        ("u8", Value::U8(5)),
        ("i8", Value::I8(5)),
        ("u16", Value::U16(5)),
        ("i16", Value::I16(5)),
        ("u32", Value::U32(5)),
        ("i32", Value::I32(5)),
        ("u64", Value::U64(5)),
        ("i64", Value::I64(5)),
    ];
    for (k, v) in &ints {
        b = b.kv(k, v.clone());
    }
    let g = open(
        &b.kv("neg_i8", Value::I8(-1))
            .kv("neg_i64", Value::I64(-3))
            .kv("big_u64", Value::U64(u64::MAX))
            .kv("f32", Value::F32(0.25))
            .kv("f64", Value::F64(-2.5))
            .kv("bool", Value::Bool(true))
            .kv("name", Value::Str("trit".into()))
            .kv(
                "tokens",
                Value::Array(vec![Value::Str("x".into()), Value::Str("yz".into())]),
            )
            .kv(
                "types",
                Value::Array(vec![Value::I32(1), Value::I32(-6), Value::I32(3)]),
            )
            .kv(
                "huge_u64s",
                Value::Array(vec![Value::U64(1), Value::U64(u64::MAX)]),
            )
            .bytes(),
    );

    for (k, _) in &ints {
        assert_eq!(g.get_u64(k).unwrap(), 5, "{k}");
    }
    assert_eq!(g.get_u64("big_u64").unwrap(), u64::MAX);
    assert_eq!(g.get_f64("f32").unwrap(), 0.25);
    assert_eq!(g.get_f64("f64").unwrap(), -2.5);
    assert_eq!(g.get_str("name").unwrap(), "trit");
    assert_eq!(g.get_str_array("tokens").unwrap(), vec!["x", "yz"]);
    assert_eq!(g.get_i64_array("types").unwrap(), vec![1, -6, 3]);

    // Wrong types and missing keys are errors naming the key.
    let wrong = |r: trit::Result<()>, key: &str| {
        let msg = gguf_msg(r.expect_err(key));
        assert!(msg.contains(&format!("{key:?}")), "{msg:?} misses {key}");
    };
    for key in ["neg_i8", "neg_i64", "f32", "bool", "name", "tokens"] {
        wrong(g.get_u64(key).map(drop), key);
    }
    for key in ["u32", "i64", "name", "bool"] {
        wrong(g.get_f64(key).map(drop), key);
    }
    for key in ["u8", "tokens", "f64"] {
        wrong(g.get_str(key).map(drop), key);
    }
    for key in ["name", "types", "u32"] {
        wrong(g.get_str_array(key).map(drop), key);
    }
    for key in ["tokens", "huge_u64s", "i32"] {
        wrong(g.get_i64_array(key).map(drop), key);
    }
    for key in ["missing.key", ""] {
        wrong(g.get(key).map(drop), key);
        wrong(g.get_u64(key).map(drop), key);
        wrong(g.get_f64(key).map(drop), key);
        wrong(g.get_str(key).map(drop), key);
        wrong(g.get_str_array(key).map(drop), key);
        wrong(g.get_i64_array(key).map(drop), key);
    }
}

#[test]
fn float_tensors_read_back_exactly() {
    let f: Vec<f32> = (0..24)
        .map(|i| (i as f32 - 11.0) * 0.37)
        .chain([f32::MAX, f32::MIN_POSITIVE, -0.0, f32::INFINITY])
        .collect();
    let h: Vec<f16> = (0..24)
        .map(|i| f16::from_f32((i as f32 - 5.0) * 0.125))
        .collect();
    let b: Vec<bf16> = (0..24)
        .map(|i| bf16::from_f32((i as f32 + 1.0) * -3.75))
        .collect();
    // (GGUF dims, the row-major shape they mean).
    let shapes: [(&[u64], &[usize]); 4] = [
        (&[24], &[24]),
        (&[6, 4], &[4, 6]),
        (&[4, 3, 2], &[2, 3, 4]),
        (&[2, 3, 2, 2], &[2, 2, 3, 2]),
    ];
    let mut builder = Builder::new().kv("general.name", Value::Str("floats".into()));
    for (i, (dims, _)) in shapes.iter().enumerate() {
        builder = builder
            .tensor(&format!("f32.{i}"), dims, G_F32, f32_bytes(&f[..24]))
            .tensor(&format!("f16.{i}"), dims, G_F16, f16_bytes(&h))
            .tensor(&format!("bf16.{i}"), dims, G_BF16, bf16_bytes(&b));
    }
    builder = builder.tensor("special", &[28], G_F32, f32_bytes(&f));
    let built = builder.build();
    let g = open(&built.bytes);
    assert_eq!(g.tensors().len(), 13);
    assert_eq!(g.tensors()[0].start, built.data_start);
    for (i, (_, shape)) in shapes.iter().enumerate() {
        let t = g.tensor(&format!("f32.{i}"), Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.dims(), *shape);
        assert_eq!(t.to_vec::<f32>().unwrap(), &f[..24]);
        let info = g.info(&format!("f32.{i}")).unwrap();
        assert_eq!(info.shape, *shape);
        assert_eq!(info.ty, TensorType::F32);
        assert_eq!(info.elem_count(), 24);
        assert_eq!(g.bytes(info), &f32_bytes(&f[..24])[..]);
        assert_eq!(info.start % 32, 0);

        let t = g.tensor(&format!("f16.{i}"), Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        assert_eq!(t.dims(), *shape);
        assert_eq!(t.to_vec::<f16>().unwrap(), h);
        assert_eq!(g.info(&format!("f16.{i}")).unwrap().ty, TensorType::F16);

        let t = g.tensor(&format!("bf16.{i}"), Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.dims(), *shape);
        assert_eq!(t.to_vec::<bf16>().unwrap(), b);
        assert_eq!(g.info(&format!("bf16.{i}")).unwrap().ty, TensorType::BF16);

        // Float tensors are not block-quantized.
        let msg = gguf_msg(g.qtensor(&format!("f16.{i}")).unwrap_err());
        assert!(msg.contains("not a block-quantized type"), "{msg}");
    }
    let special = g
        .tensor("special", Device::Cpu)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&special), bits(&f));
}

#[test]
fn block_tensors_round_trip() {
    let cases = [
        (GgmlType::Q8_0, vec![64u64, 3]),
        (GgmlType::Q8_0, vec![32, 2, 2, 2]),
        (GgmlType::Q4_1, vec![96, 2]),
        (GgmlType::Q4_1, vec![32, 5, 1]),
        (GgmlType::Q4_0, vec![64, 2]),
        (GgmlType::Tq2_0, vec![512, 2]),
        (GgmlType::Tq2_0, vec![256, 1, 3]),
        (GgmlType::Tq1_0, vec![256, 2]),
    ];
    let mut builder = Builder::new().alignment(64);
    let mut expect = Vec::new();
    for (i, (ty, dims)) in cases.iter().enumerate() {
        let cols = dims[0] as usize;
        let rows = dims[1..].iter().product::<u64>() as usize;
        let q = build_qtensor(*ty, rows, cols, 100 + i as u64);
        let bytes = from_qtensor(&q, *ty).unwrap();
        assert_eq!(
            bytes.len(),
            rows * cols / ty.block_weights() * ty.block_bytes()
        );
        builder = builder.tensor(&format!("q.{i}"), dims, ty.id(), bytes.clone());
        expect.push((q, bytes));
    }
    let g = open(&builder.build().bytes);
    assert_eq!(g.alignment(), 64);
    for (i, ((ty, dims), (q, bytes))) in cases.iter().zip(&expect).enumerate() {
        let name = format!("q.{i}");
        let info = g.info(&name).unwrap();
        assert_eq!(info.ty, TensorType::Quant(*ty));
        assert_eq!(info.ty.id(), ty.id());
        let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(info.shape, shape);
        assert_eq!(info.start % 64, 0);
        assert_eq!(g.bytes(info), &bytes[..]);

        let back = g.qtensor(&name).unwrap();
        assert_eq!(back.format(), ty.format());
        assert_eq!((back.rows(), back.cols()), (q.rows(), q.cols()));
        assert_eq!(back.codes(), q.codes(), "{ty:?}");
        assert_eq!(back.scales(), q.scales(), "{ty:?}");
        assert_eq!(back.mins(), q.mins(), "{ty:?}");
        assert_eq!(back.data(), q.data(), "{ty:?}");

        let t = g.tensor(&name, Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.dims(), &shape[..]);
        assert_eq!(t.to_vec::<f32>().unwrap(), q.dequantize(), "{ty:?}");
    }
}

#[test]
fn q6_k_opens_but_does_not_load() {
    let g = open(
        &Builder::new()
            .tensor("q6", &[256, 2], G_Q6_K, vec![0x11; 420])
            .tensor("f", &[2], G_F32, f32_bytes(&[1.0, 2.0]))
            .bytes(),
    );
    let info = g.info("q6").unwrap();
    assert!(matches!(info.ty, TensorType::Other(_, 14)));
    assert_eq!(info.ty.name(), "Q6_K");
    assert_eq!(info.ty.block(), (256, 210));
    assert_eq!(info.shape, [2, 256]);
    assert_eq!(info.end - info.start, 420);
    assert_eq!(g.bytes(info).len(), 420);
    let msg = gguf_msg(g.tensor("q6", Device::Cpu).unwrap_err());
    assert!(msg.contains("Q6_K") && msg.contains("q6"), "{msg}");
    let msg = gguf_msg(g.qtensor("q6").unwrap_err());
    assert!(msg.contains("Q6_K") && msg.contains("q6"), "{msg}");
    // The tensor after it is still fine.
    let f = g.tensor("f", Device::Cpu).unwrap();
    assert_eq!(f.to_vec::<f32>().unwrap(), [1.0, 2.0]);
}

#[test]
fn missing_tensor_is_an_error() {
    let g = open(&sample_file());
    for name in ["missing", "", "f3", "f32 "] {
        let msg = gguf_msg(g.info(name).unwrap_err());
        assert!(msg.contains(&format!("{name:?}")), "{msg}");
        assert!(g.tensor(name, Device::Cpu).is_err());
        assert!(g.qtensor(name).is_err());
    }
    // Lookups by name find every tensor, in whatever order the file has them.
    let names: Vec<String> = g.tensors().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, ["f32", "f16", "bf16", "q8", "q41", "tq2"]);
    for n in &names {
        assert_eq!(&g.info(n).unwrap().name, n);
    }
}

#[test]
fn alignment_is_honoured() {
    let f = f32_bytes(&[1.0, 2.0, 3.0]);
    for align in [1u32, 8, 64, 256] {
        let built = Builder::new()
            .alignment(align)
            .tensor("a", &[3], G_F32, f.clone())
            .tensor("b", &[3], G_F32, f.clone())
            .build();
        let g = open(&built.bytes);
        assert_eq!(g.alignment(), align as usize);
        let a = g.info("a").unwrap();
        let b = g.info("b").unwrap();
        assert_eq!(a.start, built.data_start);
        assert_eq!(built.data_start % align as usize, 0);
        assert_eq!(
            b.start,
            built.data_start + 12usize.div_ceil(align as usize) * align as usize
        );
        assert_eq!(
            g.tensor("b", Device::Cpu).unwrap().to_vec::<f32>().unwrap(),
            [1.0, 2.0, 3.0]
        );
    }
    // With 64, an offset that is a multiple of 32 but not of 64 is rejected.
    let bytes = Builder::new()
        .alignment(64)
        .tensor_at("a", &[3], G_F32, f.clone(), Some(32))
        .bytes();
    expect_err(&bytes, &["\"a\"", "offset 32", "64"]);
    // Any integer type works for the alignment.
    let g = open(
        &Builder::new()
            .kv("general.alignment", Value::U64(16))
            .tensor("a", &[3], G_F32, f.clone())
            .bytes(),
    );
    assert_eq!(g.alignment(), 16);
}

#[test]
fn padded_file_and_open_from_disk() {
    let bytes = Builder::new()
        .kv("k", Value::U8(1))
        .tensor("a", &[3], G_F32, f32_bytes(&[1.0, 2.0, 3.0]))
        .pad_end()
        .bytes();
    assert_eq!(bytes.len() % 32, 0);
    let path = std::env::temp_dir().join(format!("trit_gguf_test_{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let g = Gguf::open(&path);
    std::fs::remove_file(&path).unwrap();
    let g = g.unwrap();
    assert_eq!(g.path(), path.display().to_string());
    assert_eq!(g.get_u64("k").unwrap(), 1);
    assert_eq!(
        g.tensor("a", Device::Cpu).unwrap().to_vec::<f32>().unwrap(),
        [1.0, 2.0, 3.0]
    );

    // A missing file is an I/O error, not a panic.
    assert!(Gguf::open(std::env::temp_dir().join("trit_gguf_no_such_file.gguf")).is_err());
    // A malformed file on disk is Error::Gguf naming the path.
    let bad = std::env::temp_dir().join(format!("trit_gguf_bad_{}.gguf", std::process::id()));
    std::fs::write(&bad, b"GGML").unwrap();
    let e = Gguf::open(&bad);
    std::fs::remove_file(&bad).unwrap();
    match e {
        Err(Error::Gguf { path, msg }) => {
            assert!(path.contains("trit_gguf_bad_"), "{path}");
            assert!(msg.contains("not a GGUF file"), "{msg}");
        }
        other => panic!("expected Error::Gguf, got {other:?}"),
    }
}

#[test]
fn zero_sized_tensor() {
    let g = open(
        &Builder::new()
            .tensor("empty", &[0, 5, 7], G_F32, vec![])
            .tensor("a", &[2], G_F32, f32_bytes(&[4.0, 5.0]))
            .bytes(),
    );
    let t = g.tensor("empty", Device::Cpu).unwrap();
    assert_eq!(t.dims(), [7, 5, 0]);
    assert_eq!(
        g.tensor("a", Device::Cpu).unwrap().to_vec::<f32>().unwrap(),
        [4.0, 5.0]
    );
}

/// A dim of 0 makes a tensor empty however large its other dims, but a shape like [2^40, 2^40, 0]
/// would still overflow anything that multiplies its dims in another order (and Q8_0 rows of 2^64 − 32
/// overflow the bytes-per-row product): the reader rejects such dims rather than accept an empty
/// tensor it cannot describe.
#[test]
fn zero_dim_beside_huge_dims_is_rejected() {
    for (dims, ty) in [
        (&[0u64, 1 << 40, 1 << 40][..], G_F32),
        (&[0, 1 << 40, 1 << 40][..], G_Q8_0),
        (&[u64::MAX - 31, 0][..], G_Q8_0),
    ] {
        expect_err(
            &Builder::new().tensor("e", dims, ty, vec![]).bytes(),
            &["\"e\"", "too large"],
        );
    }
    // Small empty tensors still load, empty.
    let g = open(&Builder::new().tensor("e", &[0, 3], G_F32, vec![]).bytes());
    assert!(g.tensor("e", Device::Cpu).unwrap().to_vec_f32().is_empty());
}

// ---------------------------------------------------------------------------------------------------
// Malformed files.
// ---------------------------------------------------------------------------------------------------

#[test]
fn bad_magic_and_versions() {
    let good = sample_file();
    open(&good);

    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_err(&b, &["not a GGUF file"]);
    let mut b = good.clone();
    b[3] = b'f';
    expect_err(&b, &["not a GGUF file"]);

    for v in [0u32, 1, 4, 100, u32::MAX] {
        let bytes = Builder::new().version(v).kv("a", Value::U8(1)).bytes();
        expect_err(&bytes, &[&format!("version {v}"), "not supported"]);
    }
    // A big-endian file: the version bytes are reversed.
    for v in [2u32, 3] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_be_bytes());
        expect_err(&b, &["not supported", "big-endian"]);
    }
}

#[test]
fn every_truncation_is_an_error() {
    let good = sample_file();
    let g = open(&good);
    assert_eq!(g.tensors().last().unwrap().end, good.len());
    for len in 0..good.len() {
        let msg = match Gguf::from_bytes(&good[..len], "cut.gguf") {
            Ok(_) => panic!("a file cut to {len} of {} bytes was accepted", good.len()),
            Err(e) => gguf_msg(e),
        };
        assert!(
            msg.contains("needs") || msg.contains("past the end"),
            "cut to {len}: {msg}"
        );
    }
    // A metadata-only file too.
    let meta = Builder::new()
        .kv("a", Value::Str("xyz".into()))
        .kv("b", nested(3))
        .bytes();
    open(&meta);
    for len in 0..meta.len() {
        assert!(
            Gguf::from_bytes(&meta[..len], "cut.gguf").is_err(),
            "cut to {len}"
        );
    }
}

#[test]
fn bad_lengths_and_counts() {
    // A string length past the end (as a key and as a value).
    let mut bytes = Builder::new().kv("key", Value::Str("value".into())).bytes();
    let len_at = 24 + 8 + 3 + 4;
    bytes[len_at..len_at + 8].copy_from_slice(&6u64.to_le_bytes());
    expect_err(&bytes, &["\"key\"", "needs"]);
    let mut bytes = Builder::new().kv("key", Value::U8(1)).bytes();
    bytes[24..32].copy_from_slice(&9u64.to_le_bytes());
    expect_err(&bytes, &["metadata key 0", "needs"]);
    let mut bytes = Builder::new().kv("key", Value::U8(1)).bytes();
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&bytes, &["metadata key 0", "needs"]);

    // Array counts: u64::MAX, and a count whose minimum size exceeds what is left.
    for (elem, count) in [
        (T_U8, u64::MAX),
        (T_U64, u64::MAX / 4),
        (T_U64, 3),
        (T_STR, 3),
        (T_ARRAY, 1 << 40),
        (T_U32, 1 << 62),
    ] {
        let mut payload = Vec::new();
        put_u32(&mut payload, elem);
        put_u64(&mut payload, count);
        payload.extend_from_slice(&[0u8; 20]);
        let bytes = Builder::new().raw_kv(b"arr", T_ARRAY, payload).bytes();
        expect_err(&bytes, &["\"arr\"", &count.to_string(), "needs more than"]);
    }

    // Tensor and metadata counts far beyond the file.
    let bytes = Builder::new().counts(u64::MAX, 0).bytes();
    expect_err(&bytes, &["tensor count", "needs more than"]);
    let bytes = Builder::new().counts(0, 1 << 50).bytes();
    expect_err(&bytes, &["metadata count", "needs more than"]);
    let bytes = Builder::new().kv("a", Value::U8(1)).counts(0, 2).bytes();
    expect_err(&bytes, &["needs"]);
    let bytes = Builder::new()
        .tensor("a", &[1], G_F32, vec![0; 4])
        .counts(5, 0)
        .bytes();
    expect_err(&bytes, &["needs"]);
}

#[test]
fn bad_metadata_values() {
    // Unknown value type.
    let bytes = Builder::new().raw_kv(b"weird", 13, vec![0; 16]).bytes();
    expect_err(&bytes, &["\"weird\"", "unknown value type 13"]);
    let bytes = Builder::new()
        .raw_kv(b"weird", u32::MAX, vec![0; 16])
        .bytes();
    expect_err(&bytes, &["unknown value type"]);

    // Unknown array element type.
    let mut payload = Vec::new();
    put_u32(&mut payload, 13);
    put_u64(&mut payload, 1);
    payload.extend_from_slice(&[0; 8]);
    let bytes = Builder::new().raw_kv(b"arr", T_ARRAY, payload).bytes();
    expect_err(&bytes, &["\"arr\"", "unknown array element type 13"]);

    // Bool bytes other than 0 and 1, alone and in an array.
    let bytes = Builder::new().raw_kv(b"b", T_BOOL, vec![2]).bytes();
    expect_err(&bytes, &["\"b\"", "bool byte 2"]);
    let mut payload = Vec::new();
    put_u32(&mut payload, T_BOOL);
    put_u64(&mut payload, 3);
    payload.extend_from_slice(&[1, 0, 255]);
    let bytes = Builder::new().raw_kv(b"bs", T_ARRAY, payload).bytes();
    expect_err(&bytes, &["\"bs\"", "bool byte 255"]);

    // Arrays nested 9 deep, and much deeper (no stack overflow).
    expect_err(&Builder::new().kv("n", nested(9)).bytes(), &["nested"]);
    let mut payload = Vec::new();
    for _ in 0..100_000 {
        put_u32(&mut payload, T_ARRAY);
        put_u64(&mut payload, 1);
    }
    let bytes = Builder::new().raw_kv(b"n", T_ARRAY, payload).bytes();
    expect_err(&bytes, &["nested"]);

    // Non-UTF-8 key and value.
    let bytes = Builder::new().raw_kv(b"ke\xffy", T_U8, vec![1]).bytes();
    expect_err(&bytes, &["metadata key 0", "not UTF-8"]);
    let mut payload = Vec::new();
    put_str(&mut payload, b"\xc3\x28");
    let bytes = Builder::new().raw_kv(b"s", T_STR, payload).bytes();
    expect_err(&bytes, &["\"s\"", "not UTF-8"]);

    // Duplicate metadata key (even with another type).
    let bytes = Builder::new()
        .kv("dup", Value::U32(1))
        .kv("other", Value::U32(2))
        .kv("dup", Value::Str("x".into()))
        .bytes();
    expect_err(&bytes, &["\"dup\"", "appears twice"]);
}

#[test]
fn bad_tensor_infos() {
    let f4 = || f32_bytes(&[1.0, 2.0, 3.0, 4.0]);

    // Duplicate tensor name.
    let bytes = Builder::new()
        .tensor("w", &[4], G_F32, f4())
        .tensor("v", &[4], G_F32, f4())
        .tensor("w", &[4], G_F32, f4())
        .bytes();
    expect_err(&bytes, &["\"w\"", "appears twice"]);

    // Zero and too many dims.
    let bytes = Builder::new().tensor("w", &[], G_F32, f4()).bytes();
    expect_err(&bytes, &["\"w\"", "0 dims"]);
    let bytes = Builder::new()
        .tensor("w", &[1, 1, 1, 1, 4], G_F32, f4())
        .bytes();
    expect_err(&bytes, &["\"w\"", "5 dims"]);
    let bytes = Builder::new()
        .tensor("w", &[1; 4], G_F32, f4())
        .tensor("x", &[1; 40], G_F32, f4())
        .bytes();
    expect_err(&bytes, &["\"x\"", "40 dims"]);

    // Unknown ggml type ids.
    for id in [99, 4, 5, 36, u32::MAX] {
        let bytes = Builder::new().tensor("w", &[4], id, f4()).bytes();
        expect_err(&bytes, &["\"w\"", &format!("unknown ggml type {id}")]);
    }

    // Rows that are not whole blocks.
    let bytes = Builder::new()
        .tensor("w", &[48, 2], G_Q4_1, vec![0; 60])
        .bytes();
    expect_err(&bytes, &["\"w\"", "48", "Q4_1"]);
    let bytes = Builder::new()
        .tensor("w", &[128, 1], G_TQ2_0, vec![0; 66])
        .bytes();
    expect_err(&bytes, &["\"w\"", "128", "TQ2_0"]);

    // Offsets not aligned (to the default 32).
    for off in [1u64, 4, 16, 33] {
        let bytes = Builder::new()
            .tensor_at("w", &[4], G_F32, f4(), Some(off))
            .bytes();
        expect_err(&bytes, &["\"w\"", &format!("offset {off}"), "32"]);
    }

    // Tensor ranges past the end of the file.
    let bytes = Builder::new().tensor("w", &[5], G_F32, f4()).bytes();
    expect_err(&bytes, &["\"w\"", "past the end"]);
    let bytes = Builder::new()
        .tensor("w", &[4], G_F32, f4())
        .tensor_at("x", &[1], G_F32, vec![], Some(64))
        .bytes();
    expect_err(&bytes, &["\"x\"", "past the end"]);
    for off in [u64::MAX - 31, 1 << 62, 1 << 40] {
        let bytes = Builder::new()
            .tensor("w", &[4], G_F32, f4())
            .tensor_at("x", &[1], G_F32, vec![], Some(off))
            .bytes();
        expect_err(&bytes, &["\"x\"", "past the end"]);
    }
    // The data section itself starts past the end.
    let built = Builder::new().tensor("w", &[0], G_F32, vec![]).build();
    let cut = built.bytes.len().min(built.data_start) - 1;
    assert!(cut >= built.infos_start);
    expect_err(&built.bytes[..cut], &["past the end"]);

    // Two tensors overlapping, either order.
    let bytes = Builder::new()
        .tensor("a", &[16], G_F32, vec![0; 64])
        .tensor_at("b", &[4], G_F32, f4(), Some(32))
        .bytes();
    expect_err(&bytes, &["\"a\"", "\"b\"", "overlap"]);
    let bytes = Builder::new()
        .tensor_at("a", &[4], G_F32, f4(), Some(32))
        .tensor_at("b", &[16], G_F32, vec![0; 64], Some(0))
        .bytes();
    expect_err(&bytes, &["\"a\"", "\"b\"", "overlap"]);
    let bytes = Builder::new()
        .tensor("a", &[4], G_F32, f4())
        .tensor_at("b", &[4], G_F32, f4(), Some(0))
        .bytes();
    expect_err(&bytes, &["overlap"]);

    // Dims whose product overflows (or is absurd).
    for dims in [
        &[1u64 << 32, 1 << 32][..],
        &[u64::MAX, 2],
        &[1 << 20, 1 << 20, 1 << 20],
        &[u64::MAX],
        &[3, 1 << 62, 1 << 62, 5],
    ] {
        let bytes = Builder::new().tensor("w", dims, G_F32, f4()).bytes();
        expect_err(&bytes, &["\"w\"", "too large"]);
    }
    // A product that would only overflow in bytes, not in elements.
    let bytes = Builder::new()
        .tensor("w", &[1 << 31, 1 << 24], G_F32, f4())
        .bytes();
    parse_err(&bytes);

    // Non-UTF-8 tensor name.
    let mut b = Builder::new();
    b.tensors.push(TensorSpec {
        name: b"\xff\xfe".to_vec(),
        dims: vec![4],
        ty: G_F32,
        data: f4(),
        offset: None,
    });
    expect_err(&b.bytes(), &["name of tensor 0", "not UTF-8"]);
}

#[test]
fn bad_alignment() {
    let f = f32_bytes(&[1.0, 2.0]);
    for v in [
        Value::U32(0),
        Value::U32(3),
        Value::U32(48),
        Value::I32(-32),
        Value::U64(1 << 40),
        Value::Str("32".into()),
        Value::F32(32.0),
        Value::Bool(true),
        Value::Array(vec![Value::U32(32)]),
    ] {
        for with_tensor in [false, true] {
            let mut b = Builder::new().kv("general.alignment", v.clone());
            if with_tensor {
                b = b.tensor("w", &[2], G_F32, f.clone());
            }
            expect_err(&b.bytes(), &["general.alignment"]);
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Fuzzing.
// ---------------------------------------------------------------------------------------------------

#[test]
fn flipped_bytes_never_panic() {
    let good = sample_file();
    let g = open(&good);
    let header_len = g.tensors()[0].start;
    // GGUF_FUZZ_ITERS and GGUF_FUZZ_SEED run a longer or different search by hand.
    let env = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .map_or(default, |v| v.parse().unwrap())
    };
    let iters = env("GGUF_FUZZ_ITERS", 3000);
    let mut rng = XorShift(env("GGUF_FUZZ_SEED", 0x9E37_79B9_7F4A_7C15) | 1);
    let (mut opened, mut loaded) = (0usize, 0usize);
    for _ in 0..iters {
        let mut b = good.clone();
        let flips = 1 + rng.below(4);
        for _ in 0..flips {
            // Mostly the header, where the structure is; sometimes the tensor data.
            let at = if rng.below(4) == 0 {
                rng.below(b.len())
            } else {
                rng.below(header_len)
            };
            match rng.below(4) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = rng.next() as u8,
                2 => b[at] = [0, 0xFF, 0x7F, 0x80, 1][rng.below(5)],
                // A boundary value over a whole count, length, dim or offset.
                _ => {
                    let v: u64 = [
                        0,
                        1,
                        2,
                        31,
                        32,
                        64,
                        256,
                        1 << 32,
                        1 << 40,
                        1 << 62,
                        u64::MAX,
                    ][rng.below(11)];
                    let n = (b.len() - at).min(8);
                    b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
                }
            }
        }
        if rng.below(10) == 0 {
            let len = rng.below(b.len() + 1);
            b.truncate(len);
        }
        let Ok(g) = Gguf::from_bytes(&b, "fuzz.gguf") else {
            continue;
        };
        opened += 1;
        let _ = (g.version(), g.alignment(), g.metadata().len());
        for (k, v) in g.metadata() {
            let _ = (v.to_string(), g.get_u64(k), g.get_str_array(k));
        }
        for info in g.tensors() {
            assert!(info.start <= info.end && info.end <= b.len());
            let _ = g.bytes(info);
            let t = g.tensor(&info.name, Device::Cpu);
            let q = g.qtensor(&info.name);
            if t.is_ok() || q.is_ok() {
                loaded += 1;
            }
            if let Ok(q) = q {
                assert_eq!(q.rows() * q.cols(), info.elem_count());
            }
        }
    }
    // The loop exercised the loading paths, not only the parser's rejections.
    eprintln!("{iters} fuzzed files: {opened} opened, {loaded} tensors loaded");
    assert!(
        opened as u64 > iters / 30,
        "only {opened} fuzzed files opened"
    );
    assert!(
        loaded as u64 > iters / 30,
        "only {loaded} fuzzed tensors loaded"
    );
}
