//! The GGUF file reader (versions 2 and 3), the llama.cpp world's model format.
//!
//! A GGUF file is: the magic `GGUF`, a u32 version, u64 tensor and metadata counts; the metadata as
//! (string key, u32 type, value) triples, where values are integers, floats, bools, strings (u64
//! length + UTF-8 bytes) or arrays (u32 element type, u64 count, elements; arrays may nest); then one
//! info per tensor (name, u32 dim count, u64 dims innermost first, u32 ggml type, u64 offset); then,
//! at the next multiple of `general.alignment` (32 when absent), the data section the offsets point
//! into. Everything is little-endian.
//!
//! Files come from outside, so the whole header is validated before any tensor byte is handed out:
//! every read is bounds-checked, counts and lengths are checked against the bytes that remain before
//! anything is allocated for them, every tensor's byte range must lie aligned inside the data section
//! and overlap no other, and its size must match its shape and type. A malformed file is an
//! [`Error::Gguf`] naming the problem, never a panic or an out-of-bounds read.
//!
//! Tensors of F32, F16 and BF16 load as tensors of that dtype; Q4_0, Q4_1, Q8_0, TQ1_0 and TQ2_0 load
//! as packed [`QTensor`]s for the low-bit kernels (or dequantized to f32 when asked). Files holding
//! the other classic ggml types (Q5_0/1, Q8_1, the K-quants, integer and f64 tensors) still open, since
//! their block sizes are known, and asking for such a tensor is an error; ids the reader has no size
//! for (the IQ types among them) make the file an error.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};

use super::safetensors::Backing;
use crate::error::{Error, Result};
use crate::quant::gguf::{to_qtensor, GgmlType};
use crate::quant::QTensor;
use crate::storage::Device;
use crate::tensor::Tensor;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's limit on a tensor's rank.
const MAX_DIMS: usize = 4;
/// Arrays of arrays deeper than this are taken as hostile rather than recursed into.
const MAX_NESTING: usize = 8;
const DEFAULT_ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float of either width.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

impl fmt::Display for Value {
    /// Scalars as themselves, strings quoted and cut at 60 characters, arrays as their length and
    /// first elements (a tokenizer's vocabulary is tens of thousands of strings).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) if s.chars().count() > 60 => {
                write!(f, "{:?}…", s.chars().take(60).collect::<String>())
            }
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Array(a) => {
                write!(f, "[{} × ", a.len())?;
                for (i, v) in a.iter().take(3).enumerate() {
                    write!(f, "{}{v}", if i > 0 { ", " } else { "" })?;
                }
                f.write_str(if a.len() > 3 { ", …]" } else { "]" })
            }
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// A ggml tensor type the reader knows the size of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    /// A block type trit's low-bit kernels run.
    Quant(GgmlType),
    /// A type whose size is known but that trit does not load (its ggml name and id).
    Other(&'static str, u32),
}

impl TensorType {
    /// (ggml name, weights per block, bytes per block) for a ggml type id.
    fn layout(id: u32) -> Option<(&'static str, usize, usize)> {
        Some(match id {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            _ => return None,
        })
    }

    fn from_id(id: u32) -> Option<TensorType> {
        let (name, _, _) = TensorType::layout(id)?;
        Some(match id {
            0 => TensorType::F32,
            1 => TensorType::F16,
            30 => TensorType::BF16,
            _ => match GgmlType::from_id(id) {
                Some(q) => TensorType::Quant(q),
                None => TensorType::Other(name, id),
            },
        })
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::BF16 => 30,
            TensorType::Quant(q) => q.id(),
            TensorType::Other(_, id) => id,
        }
    }

    /// ggml's name for the type (`Q4_1`, `F32`, …).
    pub fn name(self) -> &'static str {
        TensorType::layout(self.id()).map_or("?", |l| l.0)
    }

    /// (weights per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        TensorType::layout(self.id()).map_or((1, 1), |l| (l.1, l.2))
    }
}

/// One tensor's info. `shape` is row-major (outermost first: GGUF's dims reversed), so a linear
/// layer's weight is [out_features, in_features] as in PyTorch; `start..end` is the absolute byte
/// range in the file, validated to lie inside it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: TensorType,
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
#[derive(Debug)]
pub struct Gguf {
    backing: Arc<Backing>,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    /// Indices into `tensors`, sorted by name.
    by_name: Vec<usize>,
    alignment: usize,
    path: String,
}

impl Gguf {
    /// Memory-maps and validates the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let backing = Backing::map(&file).map_err(|e| Error::io(path, e))?;
        Gguf::from_backing(backing, path.display().to_string())
    }

    /// Validates an in-memory file (same checks; for tests and fuzzing). `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Gguf> {
        Gguf::from_backing(Backing::owned(bytes), path.to_owned())
    }

    fn from_backing(backing: Backing, path: String) -> Result<Gguf> {
        let (version, metadata, tensors, alignment) =
            parse(backing.as_bytes()).map_err(|msg| Error::Gguf {
                path: path.clone(),
                msg,
            })?;
        let mut by_name: Vec<usize> = (0..tensors.len()).collect();
        by_name.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
        Ok(Gguf {
            backing: Arc::new(backing),
            version,
            metadata,
            tensors,
            by_name,
            alignment,
            path,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The data section's alignment (`general.alignment`, or 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Every metadata key and value, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// The value of `key`, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.error(format!("no metadata key {key:?}")))
    }

    /// `key` as an unsigned integer (any integer type), or an error naming the key and what it holds.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, v, "a non-negative integer"))
    }

    /// `key` as a float (f32 or f64).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, v, "a float"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, v, "a string"))
    }

    /// `key` as an array of strings (a tokenizer's tokens or merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.wrong_type(key, v, "an array of strings"))
    }

    /// `key` as an array of integers (a tokenizer's token types).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.get(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.wrong_type(key, v, "an array of integers"))
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, or an error saying it is missing.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .binary_search_by(|&i| self.tensors[i].name.as_str().cmp(name))
            .map(|i| &self.tensors[self.by_name[i]])
            .map_err(|_| self.error(format!("no tensor named {name:?}")))
    }

    /// The raw bytes of a tensor, borrowed from the map.
    ///
    /// # Panics
    /// If `info` does not come from this file and lies outside it.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.backing.as_bytes()[info.start..info.end]
    }

    /// The tensor `name` as a [`Tensor`] on `device`: F32, F16 and BF16 keep their dtype; the block
    /// types are dequantized to f32 (use [`Gguf::qtensor`] to keep them packed).
    pub fn tensor(&self, name: &str, device: Device) -> Result<Tensor> {
        let info = self.info(name)?;
        let bytes = self.bytes(info);
        let shape = info.shape.clone();
        match info.ty {
            TensorType::F32 => {
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Tensor::from_vec(v, shape, device)
            }
            TensorType::F16 => {
                let v: Vec<f16> = bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect();
                Tensor::from_vec(v, shape, device)
            }
            TensorType::BF16 => {
                let v: Vec<bf16> = bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect();
                Tensor::from_vec(v, shape, device)
            }
            TensorType::Quant(_) => self.qtensor(name)?.to_tensor(device)?.reshape(shape),
            TensorType::Other(..) => Err(self.unsupported(info)),
        }
    }

    /// A tensor of a block type as a packed [`QTensor`] of [rows, row length] (every dim but the
    /// innermost folds into the rows), its codes and scales exactly as stored.
    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        let info = self.info(name)?;
        let TensorType::Quant(ty) = info.ty else {
            return Err(self.error(format!(
                "tensor {name:?} is {}, not a block-quantized type",
                info.ty.name()
            )));
        };
        let cols = info.shape.last().copied().unwrap_or(1);
        let rows = info.elem_count() / cols.max(1);
        to_qtensor(ty, self.bytes(info), rows, cols)
            .map_err(|e| self.error(format!("tensor {name:?}: {e}")))
    }

    fn unsupported(&self, info: &TensorInfo) -> Error {
        self.error(format!(
            "tensor {:?} has ggml type {} ({}), which trit does not load",
            info.name,
            info.ty.name(),
            info.ty.id()
        ))
    }

    fn wrong_type(&self, key: &str, v: &Value, want: &str) -> Error {
        self.error(format!(
            "metadata {key:?} is {} {v}, expected {want}",
            v.type_name()
        ))
    }

    fn error(&self, msg: String) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            msg,
        }
    }
}

/// Bounds-checked little-endian reads over the header.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type Parsed<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Parsed<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "{what} at byte {} needs {n} bytes, the file has {} left",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parsed<[u8; N]> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Parsed<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Parsed<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 count or length that must be backed by at least `min_bytes` bytes per item.
    fn count(&mut self, what: &str, min_bytes: usize) -> Parsed<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_bytes) <= self.remaining() => Ok(n),
            _ => Err(format!(
                "{what} {n} at byte {at} needs more than the {} bytes left",
                self.remaining()
            )),
        }
    }

    fn string(&mut self, what: &str) -> Parsed<String> {
        let len = self.count(what, 1)?;
        let at = self.pos;
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Parsed<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!("{what}: arrays nested deeper than {MAX_NESTING}"));
                }
                let elem = self.u32(what)?;
                let min = value_min_bytes(elem)
                    .ok_or_else(|| format!("{what}: unknown array element type {elem}"))?;
                let n = self.count(what, min)?;
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            _ => return Err(format!("{what}: unknown value type {ty}")),
        })
    }
}

/// The fewest bytes a value of type `ty` can take (None for an unknown type).
fn value_min_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

type Header = (u32, BTreeMap<String, Value>, Vec<TensorInfo>, usize);

fn parse(bytes: &[u8]) -> Parsed<Header> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.array::<4>("magic")?;
    if &magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
        ));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (versions 2 and 3 are){}",
            if (2..=3).contains(&version.swap_bytes()) {
                "; the file looks big-endian"
            } else {
                ""
            }
        ));
    }
    // Each tensor info takes at least 8 (name) + 4 + 4 + 8 bytes, each metadata entry 8 + 4 + 1.
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 13)?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key {i}"))?;
        let ty = c.u32(&format!("type of {key:?}"))?;
        let value = c.value(ty, 0, &format!("metadata {key:?}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key:?} appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => {
                return Err(format!(
                    "general.alignment {v} is not a power of two ≤ 1 MiB"
                ))
            }
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor {i}"))?;
        let what = format!("tensor {name:?}");
        let n_dims = c.u32(&what)? as usize;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(format!(
                "{what} has {n_dims} dims (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let id = c.u32(&what)?;
        let ty =
            TensorType::from_id(id).ok_or_else(|| format!("{what} has unknown ggml type {id}"))?;
        let offset = c.u64(&what)?;
        raw.push((name, dims, ty, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    if data_start > bytes.len() && !raw.is_empty() {
        return Err(format!(
            "the data section would start at byte {data_start}, past the end ({})",
            bytes.len()
        ));
    }
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = std::collections::HashSet::new();
    for (name, dims, ty, offset) in raw {
        if !seen.insert(name.clone()) {
            return Err(format!("tensor {name:?} appears twice"));
        }
        tensors.push(tensor_info(
            name,
            &dims,
            ty,
            offset,
            data_start,
            alignment,
            bytes.len(),
        )?);
    }
    // Empty tensors hold no bytes, so they cannot overlap anything.
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.end > t.start).collect();
    order.sort_by_key(|t| t.start);
    if let Some(w) = order.windows(2).find(|w| w[1].start < w[0].end) {
        return Err(format!(
            "tensors {:?} and {:?} overlap",
            w[0].name, w[1].name
        ));
    }
    Ok((version, metadata, tensors, alignment))
}

fn tensor_info(
    name: String,
    dims: &[u64],
    ty: TensorType,
    offset: u64,
    data_start: usize,
    alignment: usize,
    file_len: usize,
) -> Parsed<TensorInfo> {
    let what = format!("tensor {name:?}");
    // The non-zero dims too: a zero among huge ones makes an empty tensor whose shape would still
    // overflow anything that multiplies its dims in another order.
    let product = |nonzero: bool| {
        dims.iter()
            .filter(|&&d| !nonzero || d != 0)
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n < 1 << 56)
    };
    let elems = product(false)
        .zip(product(true))
        .ok_or_else(|| format!("{what}: dims {dims:?} are too large"))?
        .0 as usize;
    let (bw, bb) = ty.block();
    let row = dims[0] as usize;
    if !row.is_multiple_of(bw) {
        return Err(format!(
            "{what}: rows of {row} are not whole {} blocks of {bw}",
            ty.name()
        ));
    }
    let size = elems / bw * bb;
    if !(offset as usize).is_multiple_of(alignment) {
        return Err(format!(
            "{what}: offset {offset} is not a multiple of {alignment}"
        ));
    }
    let start = usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(data_start));
    let end = start.and_then(|s| s.checked_add(size));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len => Ok(TensorInfo {
            name,
            shape: dims.iter().rev().map(|&d| d as usize).collect(),
            ty,
            start,
            end,
        }),
        _ => Err(format!(
            "{what}: {size} bytes at data offset {offset} run past the end of the file ({file_len} bytes)"
        )),
    }
}
