//! The byte-level safetensors reader and writer.
//!
//! A safetensors file is an 8-byte little-endian header length `N`, then `N` bytes of JSON
//! header, then the data section. The header maps each tensor name to its dtype, shape and
//! `data_offsets` (a `[begin, end)` byte range relative to the start of the data section); the
//! optional `"__metadata__"` key holds a string→string map.
//!
//! Files come from outside, so everything in the header is validated before any byte of data is
//! handed out: every malformed file is an [`Error::SafeTensors`] naming the problem, never a
//! panic or an out-of-bounds read.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The reference implementation's limit: a longer header is taken as hostile rather than parsed.
const MAX_HEADER_LEN: u64 = 100_000_000;

const METADATA_KEY: &str = "__metadata__";

/// The data section starts at a multiple of this, so tensors of every trit dtype are aligned in
/// a page-aligned map when their offsets are multiples of their element size.
const DATA_ALIGN: usize = 8;

/// One tensor's header entry; `start..end` is the absolute byte range in the file.
///
/// Once parsed, the range lies inside the file, holds exactly `shape × dtype` bytes and shares
/// no byte with another tensor. It need not be aligned to the element size: the format packs
/// tensors back to back, so a `U8` tensor of odd length shifts everything after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A valid tensor whose dtype the safetensors format defines but trit does not hold (for example
/// the `I64` position ids of BERT checkpoints). It is validated like any other tensor, but kept
/// out of [`SafeTensors::entries`], so a file holding one still opens.
#[derive(Clone, Debug, PartialEq)]
pub struct UnsupportedEntry {
    pub name: String,
    /// The dtype as the file names it, e.g. `"I64"`.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// The bytes of a whole safetensors file: a read-only memory map, or an owned copy.
///
/// Shared through an `Arc` so that zero-copy tensors can keep the mapping alive after the
/// [`SafeTensors`] is dropped. The first byte is always 8-byte aligned (page-aligned when
/// mapped). `Arc<Backing>` coerces to `Arc<dyn AsRef<[u8]> + Send + Sync>` where a type-erased
/// owner is wanted.
pub struct Backing(Repr);

enum Repr {
    Mapped(memmap2::Mmap),
    /// `u64` words give the owned copy the same alignment guarantee as a map; `len` is the byte
    /// length, at most `8 * words.len()`.
    Owned {
        words: Vec<u64>,
        len: usize,
    },
}

impl Backing {
    /// A read-only map of `file`.
    pub(crate) fn map(file: &File) -> io::Result<Backing> {
        // SAFETY: the map is only sound while nobody else writes to or truncates the file: a
        // concurrent write changes bytes behind a `&[u8]`, and a truncation turns reads past the
        // new end into SIGBUS. We assume model and checkpoint files are not modified in place
        // while open; trit's own writers never do so, since `write_atomic` renames a new file
        // over the old path, leaving any existing mapping on the old inode. Every slice the
        // readers hand out lies within the map's length, checked when they parse it.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        Ok(Backing(Repr::Mapped(map)))
    }

    pub(crate) fn owned(bytes: &[u8]) -> Backing {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Backing(Repr::Owned {
            words,
            len: bytes.len(),
        })
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Mapped(map) => map,
            Repr::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

impl AsRef<[u8]> for Backing {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for Backing {
    // The contents can be gigabytes; only say what kind of storage it is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0 {
            Repr::Mapped(_) => "Mapped",
            Repr::Owned { .. } => "Owned",
        };
        write!(f, "Backing::{kind}({} bytes)", self.as_bytes().len())
    }
}

/// A parsed, memory-mapped safetensors file. Entries are in file-offset order.
#[derive(Debug)]
pub struct SafeTensors {
    backing: Arc<Backing>,
    entries: Vec<Entry>,
    /// Indices into `entries`, sorted by name, for [`SafeTensors::get`].
    by_name: Vec<usize>,
    unsupported: Vec<UnsupportedEntry>,
    metadata: BTreeMap<String, String>,
    path: String,
}

impl SafeTensors {
    /// Memory-maps and validates the file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafeTensors> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let backing = Backing::map(&file).map_err(|e| Error::io(path, e))?;
        Self::from_backing(backing, path.display().to_string())
    }

    /// Validates an in-memory buffer (same checks; used by tests and fuzzing). `path` is only for
    /// error messages. The bytes are copied once into 8-byte-aligned storage, so tensors are as
    /// aligned as in a mapped file.
    pub fn from_bytes(bytes: Vec<u8>, path: &str) -> Result<SafeTensors> {
        Self::from_backing(Backing::owned(&bytes), path.to_owned())
    }

    fn from_backing(backing: Backing, path: String) -> Result<SafeTensors> {
        let Header {
            entries,
            unsupported,
            metadata,
        } = parse(backing.as_bytes(), &path)?;
        let mut by_name: Vec<usize> = (0..entries.len()).collect();
        by_name.sort_by(|&a, &b| entries[a].name.cmp(&entries[b].name));
        Ok(SafeTensors {
            backing: Arc::new(backing),
            entries,
            by_name,
            unsupported,
            metadata,
            path,
        })
    }

    /// The tensors trit can hold, in file-offset order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The tensor called `name`, if the file has it with a dtype trit holds.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name
            .binary_search_by(|&i| self.entries[i].name.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[self.by_name[i]])
    }

    /// Like [`SafeTensors::get`], but says why a tensor is unavailable: missing, or of a dtype
    /// trit does not hold.
    pub fn require(&self, name: &str) -> Result<&Entry> {
        if let Some(entry) = self.get(name) {
            return Ok(entry);
        }
        let msg = match self.unsupported.iter().find(|u| u.name == name) {
            Some(u) => format!("tensor {name:?}: dtype {} is not supported", u.dtype),
            None => format!("no tensor named {name:?}"),
        };
        Err(self.error(msg))
    }

    /// The tensors skipped because trit does not hold their dtype, in file-offset order.
    pub fn unsupported(&self) -> &[UnsupportedEntry] {
        &self.unsupported
    }

    /// The `"__metadata__"` object; empty when the file has none.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of a tensor, borrowed zero-copy from the map.
    ///
    /// # Panics
    /// If `entry` does not come from this file and lies outside it.
    pub fn bytes(&self, entry: &Entry) -> &[u8] {
        &self.backing.as_bytes()[entry.start..entry.end]
    }

    /// The shared bytes of the whole file: a tensor can hold this `Arc` and the entry's
    /// `start..end` range to stay zero-copy and valid after `self` is dropped.
    pub fn backing(&self) -> Arc<Backing> {
        Arc::clone(&self.backing)
    }

    /// The path given to [`SafeTensors::open`] or [`SafeTensors::from_bytes`].
    pub fn path(&self) -> &str {
        &self.path
    }

    fn error(&self, msg: String) -> Error {
        Error::SafeTensors {
            path: self.path.clone(),
            msg,
        }
    }
}

/// What a valid header holds.
struct Header {
    entries: Vec<Entry>,
    unsupported: Vec<UnsupportedEntry>,
    metadata: BTreeMap<String, String>,
}

/// Validates a whole file and returns its header.
fn parse(bytes: &[u8], path: &str) -> Result<Header> {
    let err = |msg: String| Error::SafeTensors {
        path: path.to_owned(),
        msg,
    };
    let Some((len_prefix, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(err(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_prefix);
    if header_len > MAX_HEADER_LEN {
        return Err(err(format!(
            "header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    // Fits in usize on every platform: it is at most MAX_HEADER_LEN.
    let header_len = header_len as usize;
    if header_len > rest.len() {
        return Err(err(format!(
            "header length {header_len} runs past the end of the file ({} bytes follow the length)",
            rest.len()
        )));
    }
    let (header, data) = rest.split_at(header_len);
    let data_start = 8 + header_len;
    let header =
        std::str::from_utf8(header).map_err(|e| err(format!("header is not valid UTF-8: {e}")))?;
    let header: Value =
        serde_json::from_str(header).map_err(|e| err(format!("header is not valid JSON: {e}")))?;
    let Value::Object(header) = header else {
        return Err(err(format!(
            "header is {}, expected a JSON object",
            kind(&header)
        )));
    };

    // serde_json keeps the last of duplicate keys; the bytes of an earlier duplicate become a
    // gap, which is harmless since gaps are accepted.
    let mut entries = Vec::new();
    let mut unsupported = Vec::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in &header {
        if name == METADATA_KEY {
            metadata = parse_metadata(value).map_err(err)?;
            continue;
        }
        let raw = parse_entry(name, value, data.len()).map_err(err)?;
        let (start, end) = (data_start + raw.begin, data_start + raw.end);
        match raw.dtype {
            Ok(dtype) => entries.push(Entry {
                name: name.clone(),
                dtype,
                shape: raw.shape,
                start,
                end,
            }),
            Err(dtype) => unsupported.push(UnsupportedEntry {
                name: name.clone(),
                dtype,
                shape: raw.shape,
                start,
                end,
            }),
        }
    }

    let mut spans: Vec<(usize, usize, &str)> = entries
        .iter()
        .map(|e| (e.start, e.end, e.name.as_str()))
        .chain(
            unsupported
                .iter()
                .map(|u| (u.start, u.end, u.name.as_str())),
        )
        .collect();
    check_overlaps(&mut spans, data_start).map_err(err)?;

    entries.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    unsupported.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    Ok(Header {
        entries,
        unsupported,
        metadata,
    })
}

/// One validated header entry, offsets still relative to the data section.
struct RawEntry {
    /// `Err` holds the name of a safetensors dtype trit does not hold.
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn parse_entry(
    name: &str,
    value: &Value,
    data_len: usize,
) -> std::result::Result<RawEntry, String> {
    let Value::Object(fields) = value else {
        return Err(format!(
            "tensor {name:?}: entry is {}, expected an object",
            kind(value)
        ));
    };
    let dtype_name = match field(name, fields, "dtype")? {
        Value::String(s) => s,
        other => {
            return Err(format!(
                "tensor {name:?}: \"dtype\" is {}, expected a string",
                kind(other)
            ))
        }
    };
    let shape = usize_array(name, fields, "shape")?;
    let offsets = usize_array(name, fields, "data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(format!(
            "tensor {name:?}: \"data_offsets\" has {} elements, expected 2",
            offsets.len()
        ));
    };
    if begin > end {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}]: begin is after end"
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes)"
        ));
    }

    let (dtype, bits) = match DType::from_safetensors_name(dtype_name) {
        Some(dtype) => (Ok(dtype), dtype.size_in_bytes() * 8),
        None => match foreign_dtype_bits(dtype_name) {
            Some(bits) => (Err(dtype_name.clone()), bits),
            None => return Err(format!("tensor {name:?}: unknown dtype {dtype_name:?}")),
        },
    };
    // The product of the non-zero dims must fit too: a zero dim makes the byte count 0, but the
    // strides are products of the inner dims, and [0, 2³², 2³²] would overflow them.
    let bits_total = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(bits, |acc, &d| acc.checked_mul(d))
        .map(|b| if shape.contains(&0) { 0 } else { b })
        .ok_or_else(|| {
            format!("tensor {name:?}: shape {shape:?} of {dtype_name} overflows the byte count")
        })?;
    if bits_total % 8 != 0 {
        return Err(format!(
            "tensor {name:?}: shape {shape:?} of {dtype_name} does not fill a whole number of bytes"
        ));
    }
    let needed = bits_total / 8;
    if needed != end - begin {
        return Err(format!(
            "tensor {name:?}: shape {shape:?} of {dtype_name} needs {needed} bytes, but data_offsets [{begin}, {end}] hold {}",
            end - begin
        ));
    }
    Ok(RawEntry {
        dtype,
        shape,
        begin,
        end,
    })
}

fn field<'v>(
    tensor: &str,
    fields: &'v Map<String, Value>,
    key: &str,
) -> std::result::Result<&'v Value, String> {
    fields
        .get(key)
        .ok_or_else(|| format!("tensor {tensor:?}: missing {key:?}"))
}

/// Reads `fields[key]` as an array of integers that fit in `usize`.
fn usize_array(
    tensor: &str,
    fields: &Map<String, Value>,
    key: &str,
) -> std::result::Result<Vec<usize>, String> {
    let Value::Array(items) = field(tensor, fields, key)? else {
        return Err(format!(
            "tensor {tensor:?}: {key:?} is {}, expected an array of non-negative integers",
            kind(&fields[key])
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    format!(
                        "tensor {tensor:?}: {key:?} element {i} is {}, expected a non-negative integer",
                        describe(item)
                    )
                })
        })
        .collect()
}

fn parse_metadata(value: &Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "{METADATA_KEY:?} is {}, expected an object of strings",
            kind(value)
        ));
    };
    map.iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key.clone(), s.clone())),
            other => Err(format!(
                "{METADATA_KEY:?} value for {key:?} is {}, expected a string",
                kind(other)
            )),
        })
        .collect()
}

/// Rejects two tensors that share a byte. Gaps are accepted although the specification asks for
/// a fully covered data section: they cost nothing to read around, and some writers pad.
fn check_overlaps(
    spans: &mut [(usize, usize, &str)],
    data_start: usize,
) -> std::result::Result<(), String> {
    spans.sort_unstable();
    // The non-empty span reaching furthest so far; empty spans share no byte with anything.
    let mut reach: Option<(usize, usize, &str)> = None;
    for &(start, end, name) in spans.iter().filter(|s| s.0 < s.1) {
        if let Some((prev_start, prev_end, prev_name)) = reach {
            if start < prev_end {
                let rel = |o: usize| o - data_start;
                return Err(format!(
                    "tensors {prev_name:?} (data_offsets [{}, {}]) and {name:?} (data_offsets [{}, {}]) overlap",
                    rel(prev_start),
                    rel(prev_end),
                    rel(start),
                    rel(end)
                ));
            }
        }
        reach = Some((start, end, name));
    }
    Ok(())
}

/// Bits per element of the safetensors dtypes trit does not hold; `None` for names the format
/// does not define.
fn foreign_dtype_bits(name: &str) -> Option<usize> {
    Some(match name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" => 16,
        "U32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A short description of a JSON value for an error message: numbers verbatim, anything else by
/// kind, so a hostile header cannot blow up the message.
fn describe(value: &Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_owned(),
    }
}

/// One tensor to write.
#[derive(Clone, Copy, Debug)]
pub struct WriteEntry<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Serialises to bytes: 8-byte LE header length, JSON header (sorted by name, with
/// `"__metadata__"` first when non-empty, padded with spaces so the data section starts at a
/// multiple of 8), then data in the same order.
///
/// Errors (as [`Error::InvalidArgument`]) when two entries share a name, an entry is called
/// `"__metadata__"`, or an entry's data length does not match its shape and dtype.
pub fn serialize(entries: &[WriteEntry], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let (header, order) = plan("safetensors::serialize", entries, metadata)?;
    let total = order
        .iter()
        .try_fold(header.len(), |acc, e| acc.checked_add(e.data.len()))
        .ok_or_else(|| Error::InvalidArgument {
            op: "safetensors::serialize",
            msg: "total size overflows usize".to_owned(),
        })?;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header);
    for entry in order {
        out.extend_from_slice(entry.data);
    }
    Ok(out)
}

/// Writes atomically: a temp file in the same directory, fsync, rename over `path`, fsync the
/// directory. Tensor data is streamed to the file, not gathered in memory first.
pub fn write(
    path: impl AsRef<Path>,
    entries: &[WriteEntry],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let (header, order) = plan("safetensors::write", entries, metadata)?;
    write_atomic_with(path.as_ref(), |out| {
        out.write_all(&header)?;
        order.iter().try_for_each(|e| out.write_all(e.data))
    })
}

/// Replaces `path` with `bytes` atomically: readers see the old file or the new one, never a
/// mix, and after a crash the path holds one of them. The new file is written next to `path`,
/// synced, renamed over it, and the directory synced so the rename itself is durable. A
/// symlink at `path` is replaced, not followed; the new file gets default permissions.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |out| out.write_all(bytes))
}

/// Validates the entries and builds the length prefix and padded header; returns them with the
/// entries in name order, the order their data must follow.
fn plan<'e, 'a>(
    op: &'static str,
    entries: &'e [WriteEntry<'a>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<&'e WriteEntry<'a>>)> {
    let invalid = |msg: String| Error::InvalidArgument { op, msg };
    let mut order: Vec<&WriteEntry> = entries.iter().collect();
    order.sort_by(|a, b| a.name.cmp(b.name));
    if let Some(pair) = order.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(invalid(format!("two tensors named {:?}", pair[0].name)));
    }

    // Built by hand rather than through a serde_json map so the key order (and so the bytes)
    // does not depend on serde_json's `preserve_order` feature.
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str(&json_string(METADATA_KEY));
        json.push_str(":{");
        for (i, (key, value)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&json_string(key));
            json.push(':');
            json.push_str(&json_string(value));
        }
        json.push('}');
    }
    let mut offset = 0usize;
    for (i, entry) in order.iter().enumerate() {
        if entry.name == METADATA_KEY {
            return Err(invalid(format!(
                "{METADATA_KEY:?} is reserved and cannot name a tensor"
            )));
        }
        let needed = entry
            .shape
            .iter()
            .try_fold(entry.dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
        if needed != Some(entry.data.len()) {
            return Err(invalid(format!(
                "tensor {:?}: shape {:?} of {} needs {} bytes, got {}",
                entry.name,
                entry.shape,
                entry.dtype,
                needed.map_or("more than usize::MAX".to_owned(), |n| n.to_string()),
                entry.data.len()
            )));
        }
        let end = offset
            .checked_add(entry.data.len())
            .ok_or_else(|| invalid("total size overflows usize".to_owned()))?;
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(
            json,
            "{}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{offset},{end}]}}",
            json_string(entry.name),
            entry.dtype.safetensors_name(),
            entry.shape,
        );
        offset = end;
    }
    json.push('}');
    while (8 + json.len()) % DATA_ALIGN != 0 {
        json.push(' ');
    }

    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    Ok((header, order))
}

/// `s` as a quoted, escaped JSON string.
fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Distinguishes the temp files of concurrent writes within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The atomic-replace protocol of [`write_atomic`], with `fill` writing the contents.
fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> Result<()> {
    let Some(file_name) = path.file_name() else {
        return Err(Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path does not name a file"),
        ));
    };
    // The temp file must be on the same file system as `path` for the rename to be atomic.
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let (tmp_path, file) = create_temp(dir, &file_name.to_string_lossy())?;

    let written = {
        let mut out = BufWriter::new(&file);
        fill(&mut out)
            .and_then(|()| out.flush())
            .and_then(|()| file.sync_all())
    };
    drop(file);
    if let Err(e) = written {
        // Best effort: the write already failed, and that is the error worth reporting.
        let _ = fs::remove_file(&tmp_path);
        return Err(Error::io(&tmp_path, e));
    }
    if let Err(e) = fs::rename(&tmp_path, path) {
        let _ = fs::remove_file(&tmp_path);
        return Err(Error::io(path, e));
    }
    sync_dir(dir)
}

/// Creates a fresh hidden temp file in `dir`; `create_new` never clobbers a stale one left by a
/// crash, it just moves on to the next name.
fn create_temp(dir: &Path, file_name: &str) -> Result<(PathBuf, File)> {
    loop {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = dir.join(format!(".{file_name}.{}.{n}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
        {
            Ok(file) => return Ok((tmp_path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&tmp_path, e)),
        }
    }
}

/// Makes a rename in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Windows cannot open a directory to sync it; the rename is as durable as the OS makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PATH: &str = "test.safetensors";

    /// A file with `header` verbatim (no padding) followed by `data`.
    fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    /// Parses `bytes`, expects a format error and returns its message.
    fn format_error(bytes: Vec<u8>) -> String {
        match SafeTensors::from_bytes(bytes, PATH) {
            Ok(st) => panic!("expected an error, parsed {:?}", st.entries()),
            Err(Error::SafeTensors { path, msg }) => {
                assert_eq!(path, PATH);
                msg
            }
            Err(other) => panic!("expected Error::SafeTensors, got {other:?}"),
        }
    }

    fn assert_error_mentions(bytes: Vec<u8>, needles: &[&str]) {
        let msg = format_error(bytes);
        for needle in needles {
            assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
        }
    }

    /// A header with `data_len` zero bytes of data.
    fn assert_header_error(header: &str, data_len: usize, needles: &[&str]) {
        assert_error_mentions(raw_file(header, &vec![0; data_len]), needles);
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Every accessor of a parsed file stays in bounds and agrees with the header.
    fn check_consistent(st: &SafeTensors) {
        let len = st.backing().as_bytes().len();
        for e in st.entries() {
            assert!(e.start <= e.end && e.end <= len);
            let elems: usize = e.shape.iter().product();
            assert_eq!(st.bytes(e).len(), elems * e.dtype.size_in_bytes());
            assert_eq!(st.get(&e.name), Some(e));
        }
        for u in st.unsupported() {
            assert!(u.start <= u.end && u.end <= len);
        }
    }

    #[test]
    fn round_trip_several_dtypes_and_shapes() {
        let specs: [(&str, DType, &[usize]); 7] = [
            ("w.f32", DType::F32, &[2, 3]),
            ("w.f16", DType::F16, &[4]),
            ("w.bf16", DType::BF16, &[3, 1, 2]),
            ("scalar", DType::I32, &[]),
            ("empty", DType::I8, &[0, 5]),
            ("bytes", DType::U8, &[7]),
            ("A.upper", DType::F32, &[1]),
        ];
        let datas: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(i, (_, dtype, shape))| {
                pattern(
                    shape.iter().product::<usize>() * dtype.size_in_bytes(),
                    i as u8,
                )
            })
            .collect();
        let writes: Vec<WriteEntry> = specs
            .iter()
            .zip(&datas)
            .map(|(&(name, dtype, shape), data)| WriteEntry {
                name,
                dtype,
                shape,
                data,
            })
            .collect();
        let metadata = BTreeMap::from([
            ("format".to_owned(), "pt".to_owned()),
            ("note".to_owned(), "ünï \"quoted\"\n".to_owned()),
        ]);
        let bytes = serialize(&writes, &metadata).unwrap();

        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "data section must be 8-aligned");
        let st = SafeTensors::from_bytes(bytes.clone(), PATH).unwrap();
        assert_eq!(st.metadata(), &metadata);
        assert_eq!(st.path(), PATH);
        assert!(st.unsupported().is_empty());
        check_consistent(&st);

        // Data follows name order, so file-offset order is name order.
        let names: Vec<&str> = st.entries().iter().map(|e| e.name.as_str()).collect();
        let mut sorted: Vec<&str> = specs.iter().map(|s| s.0).collect();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(st.entries()[0].start, 8 + header_len);
        for w in st.entries().windows(2) {
            assert_eq!(w[0].end, w[1].start, "tensors must be packed back to back");
        }
        assert_eq!(st.entries().last().unwrap().end, bytes.len());

        for (w, data) in writes.iter().zip(&datas) {
            let e = st.get(w.name).unwrap();
            assert_eq!((e.dtype, e.shape.as_slice()), (w.dtype, w.shape));
            assert_eq!(st.bytes(e), data.as_slice());
            assert_eq!(st.require(w.name).unwrap(), e);
        }

        // Writing back what was read reproduces the file byte for byte.
        let again: Vec<WriteEntry> = st
            .entries()
            .iter()
            .map(|e| WriteEntry {
                name: &e.name,
                dtype: e.dtype,
                shape: &e.shape,
                data: st.bytes(e),
            })
            .collect();
        assert_eq!(serialize(&again, st.metadata()).unwrap(), bytes);
    }

    #[test]
    fn serialize_writes_the_exact_layout() {
        let data = pattern(8, 1);
        let writes = [
            WriteEntry {
                name: "b",
                dtype: DType::U8,
                shape: &[0],
                data: &[],
            },
            WriteEntry {
                name: "a",
                dtype: DType::F32,
                shape: &[2],
                data: &data,
            },
        ];
        let metadata = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let json = r#"{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[0],"data_offsets":[8,8]}}"#;
        let padded = format!("{json}{}", " ".repeat((8 - json.len() % 8) % 8));
        assert_eq!(
            serialize(&writes, &metadata).unwrap(),
            raw_file(&padded, &data)
        );
    }

    #[test]
    fn serialize_without_tensors_or_metadata() {
        let bytes = serialize(&[], &BTreeMap::new()).unwrap();
        assert_eq!(bytes, raw_file("{}      ", &[]));
        let st = SafeTensors::from_bytes(bytes, PATH).unwrap();
        assert!(st.entries().is_empty() && st.metadata().is_empty());
    }

    #[test]
    fn serialize_rejects_bad_entries() {
        let four = [0u8; 4];
        let entry = |name, data| WriteEntry {
            name,
            dtype: DType::F32,
            shape: &[1],
            data,
        };
        let cases: [(Vec<WriteEntry>, &str); 4] = [
            (
                vec![entry("x", &four), entry("x", &four)],
                "two tensors named \"x\"",
            ),
            (vec![entry(METADATA_KEY, &four)], "reserved"),
            (vec![entry("short", &four[..3])], "needs 4 bytes, got 3"),
            (
                vec![WriteEntry {
                    name: "huge",
                    dtype: DType::F32,
                    shape: &[usize::MAX, 2],
                    data: &four,
                }],
                "needs more than usize::MAX bytes",
            ),
        ];
        for (writes, needle) in cases {
            match serialize(&writes, &BTreeMap::new()) {
                Err(Error::InvalidArgument { msg, .. }) => {
                    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}")
                }
                other => panic!("expected InvalidArgument mentioning {needle:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_file_shorter_than_length_prefix() {
        assert_error_mentions(vec![1, 2, 3], &["3 bytes", "shorter than the 8-byte"]);
        assert_error_mentions(Vec::new(), &["0 bytes"]);
    }

    #[test]
    fn rejects_header_length_past_end_of_file() {
        let mut bytes = 100u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_error_mentions(bytes, &["header length 100", "past the end", "2 bytes"]);
    }

    #[test]
    fn rejects_absurd_header_length() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_error_mentions(bytes, &[&u64::MAX.to_string(), "exceeds the limit"]);
        let mut bytes = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_error_mentions(bytes, &["exceeds the limit"]);
    }

    #[test]
    fn rejects_header_not_utf8() {
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
        assert_error_mentions(bytes, &["not valid UTF-8"]);
    }

    #[test]
    fn rejects_header_not_json() {
        assert_header_error(r#"{"a": "#, 0, &["not valid JSON"]);
        assert_header_error("", 0, &["not valid JSON"]);
    }

    #[test]
    fn rejects_header_not_object() {
        assert_header_error(
            "[1, 2]",
            0,
            &["header is an array", "expected a JSON object"],
        );
        assert_header_error("7", 0, &["header is a number"]);
    }

    #[test]
    fn rejects_entry_not_object() {
        assert_header_error(r#"{"w": [1, 2]}"#, 0, &["\"w\"", "entry is an array"]);
    }

    #[test]
    fn rejects_missing_or_mistyped_dtype() {
        assert_header_error(
            r#"{"w": {"shape": [1], "data_offsets": [0, 4]}}"#,
            4,
            &["\"w\"", "missing \"dtype\""],
        );
        assert_header_error(
            r#"{"w": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}"#,
            4,
            &["\"w\"", "\"dtype\" is a number", "expected a string"],
        );
    }

    #[test]
    fn rejects_missing_or_mistyped_shape() {
        assert_header_error(
            r#"{"w": {"dtype": "F32", "data_offsets": [0, 4]}}"#,
            4,
            &["\"w\"", "missing \"shape\""],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}"#,
            4,
            &["\"shape\" is a string"],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1, -1], "data_offsets": [0, 4]}}"#,
            4,
            &["\"shape\" element 1 is -1", "non-negative integer"],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}"#,
            4,
            &["\"shape\" element 0 is 1.5"],
        );
    }

    #[test]
    fn rejects_missing_or_mistyped_data_offsets() {
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1]}}"#,
            4,
            &["\"w\"", "missing \"data_offsets\""],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0}}}"#,
            4,
            &["\"data_offsets\" is an object"],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2, 4]}}"#,
            4,
            &["\"data_offsets\" has 3 elements, expected 2"],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}"#,
            4,
            &["\"data_offsets\" element 0 is -4"],
        );
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}"#,
            4,
            &["\"data_offsets\" element 1 is a string"],
        );
    }

    #[test]
    fn rejects_begin_after_end() {
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}"#,
            8,
            &["\"w\"", "[8, 4]", "begin is after end"],
        );
    }

    #[test]
    fn rejects_unknown_dtype() {
        assert_header_error(
            r#"{"w": {"dtype": "X", "shape": [1], "data_offsets": [0, 4]}}"#,
            4,
            &["\"w\"", "unknown dtype \"X\""],
        );
    }

    #[test]
    fn keeps_unsupported_dtypes_out_of_entries() {
        let header = r#"{"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}, "w": {"dtype": "F64", "shape": [1], "data_offsets": [16, 24]}, "ok": {"dtype": "F32", "shape": [1], "data_offsets": [24, 28]}}"#;
        let st = SafeTensors::from_bytes(raw_file(header, &pattern(28, 0)), PATH).unwrap();
        assert_eq!(st.entries().len(), 1);
        assert!(st.get("w").is_none());
        let unsupported: Vec<(&str, &str)> = st
            .unsupported()
            .iter()
            .map(|u| (u.name.as_str(), u.dtype.as_str()))
            .collect();
        assert_eq!(unsupported, [("ids", "I64"), ("w", "F64")]);
        assert_eq!(st.unsupported()[1].start - st.unsupported()[0].start, 16);
        match st.require("w") {
            Err(Error::SafeTensors { msg, .. }) => {
                assert!(msg.contains("\"w\": dtype F64 is not supported"), "{msg}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        match st.require("nope") {
            Err(Error::SafeTensors { msg, .. }) => {
                assert!(msg.contains("no tensor named \"nope\""), "{msg}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        // Unsupported tensors are still validated.
        assert_header_error(
            r#"{"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}"#,
            8,
            &["\"w\"", "F64 needs 16 bytes"],
        );
    }

    #[test]
    fn rejects_offsets_past_end_of_data() {
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#,
            8,
            &[
                "\"w\"",
                "[0, 16]",
                "past the end of the data section (8 bytes)",
            ],
        );
    }

    #[test]
    fn rejects_overlapping_tensors() {
        assert_header_error(
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}"#,
            12,
            &[
                "\"a\" (data_offsets [0, 8])",
                "\"b\" (data_offsets [4, 12])",
                "overlap",
            ],
        );
        // A tensor nested inside another, after a third that reaches less far.
        assert_header_error(
            r#"{"big": {"dtype": "U8", "shape": [10], "data_offsets": [2, 12]}, "small": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "inner": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}"#,
            12,
            &["\"big\"", "\"inner\"", "overlap"],
        );
        // The same range twice.
        assert_header_error(
            r#"{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}"#,
            4,
            &["\"a\"", "\"b\"", "overlap"],
        );
    }

    #[test]
    fn accepts_gaps_and_empty_tensors_anywhere() {
        let header = r#"{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [2, 2]}}"#;
        let data = pattern(14, 3);
        let st = SafeTensors::from_bytes(raw_file(header, &data), PATH).unwrap();
        let names: Vec<&str> = st.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "z", "b"]);
        assert_eq!(st.bytes(st.get("b").unwrap()), &data[8..12]);
        assert!(st.bytes(st.get("z").unwrap()).is_empty());
    }

    #[test]
    fn rejects_shape_not_matching_byte_count() {
        assert_header_error(
            r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
            8,
            &["\"w\"", "[3] of F32 needs 12 bytes", "[0, 8] hold 8"],
        );
    }

    #[test]
    fn rejects_shape_whose_byte_count_overflows() {
        let header = format!(
            r#"{{"w": {{"dtype": "F32", "shape": [{}, 4], "data_offsets": [0, 0]}}}}"#,
            usize::MAX / 2
        );
        assert_header_error(&header, 0, &["\"w\"", "overflows the byte count"]);
        // An empty tensor whose other dims overflow: zero bytes, but its strides would overflow
        // (found reading the fuzz target's code; fuzz/regressions holds the file).
        assert_header_error(
            r#"{"a": {"dtype": "F32", "shape": [0, 4294967296, 4294967296], "data_offsets": [0, 0]}}"#,
            0,
            &["\"a\"", "overflows the byte count"],
        );
        let st = SafeTensors::from_bytes(
            raw_file(
                r#"{"e": {"dtype": "F32", "shape": [0, 3, 5], "data_offsets": [0, 0]}}"#,
                &[],
            ),
            PATH,
        )
        .expect("an empty tensor with small dims is fine");
        assert_eq!(st.entries()[0].shape, vec![0, 3, 5]);
    }

    #[test]
    fn rejects_metadata_not_string_to_string() {
        assert_header_error(
            r#"{"__metadata__": "pt"}"#,
            0,
            &[
                "\"__metadata__\" is a string",
                "expected an object of strings",
            ],
        );
        assert_header_error(
            r#"{"__metadata__": {"format": "pt", "epoch": 3}}"#,
            0,
            &["\"__metadata__\" value for \"epoch\" is a number"],
        );
    }

    #[test]
    fn tolerates_unknown_fields_and_json_whitespace() {
        let header = "  {\"w\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2], \"extra\": null}}   ";
        let st = SafeTensors::from_bytes(raw_file(header, &[5, 6]), PATH).unwrap();
        assert_eq!(st.bytes(st.get("w").unwrap()), [5, 6]);
    }

    #[test]
    fn backing_is_aligned_and_outlives_the_file() {
        let data = pattern(12, 9);
        let bytes = serialize(
            &[WriteEntry {
                name: "w",
                dtype: DType::F32,
                shape: &[3],
                data: &data,
            }],
            &BTreeMap::new(),
        )
        .unwrap();
        let st = SafeTensors::from_bytes(bytes, PATH).unwrap();
        let entry = st.get("w").unwrap().clone();
        let backing = st.backing();
        drop(st);
        assert_eq!(backing.as_bytes().as_ptr() as usize % 8, 0);
        assert_eq!(&backing.as_bytes()[entry.start..entry.end], data.as_slice());
        let erased: Arc<dyn AsRef<[u8]> + Send + Sync> = backing;
        assert_eq!(&(*erased).as_ref()[entry.start..entry.end], data.as_slice());
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "trit-safetensors-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn write_then_open_round_trips() {
        let dir = TempDir::new("roundtrip");
        let path = dir.0.join("model.safetensors");
        let (a, b) = (pattern(24, 1), pattern(6, 2));
        let writes = [
            WriteEntry {
                name: "a",
                dtype: DType::F32,
                shape: &[2, 3],
                data: &a,
            },
            WriteEntry {
                name: "b",
                dtype: DType::BF16,
                shape: &[3],
                data: &b,
            },
        ];
        let metadata = BTreeMap::from([("step".to_owned(), "7".to_owned())]);
        write(&path, &writes, &metadata).unwrap();
        assert_eq!(
            fs::read(&path).unwrap(),
            serialize(&writes, &metadata).unwrap()
        );

        let st = SafeTensors::open(&path).unwrap();
        assert_eq!(st.path(), path.display().to_string());
        assert_eq!(st.metadata(), &metadata);
        assert_eq!(st.bytes(st.get("a").unwrap()), a.as_slice());
        assert_eq!(st.bytes(st.get("b").unwrap()), b.as_slice());
        assert_eq!(st.backing().as_bytes().as_ptr() as usize % 8, 0);

        // Replacing the file leaves the open mapping on the old contents.
        write(&path, &writes[1..], &BTreeMap::new()).unwrap();
        assert_eq!(st.bytes(st.get("a").unwrap()), a.as_slice());
        let reopened = SafeTensors::open(&path).unwrap();
        assert_eq!(reopened.entries().len(), 1);
        assert!(reopened.metadata().is_empty());

        let files: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            files,
            ["model.safetensors"],
            "no temp file may be left behind"
        );
    }

    #[test]
    fn write_atomic_replaces_and_reports_errors() {
        let dir = TempDir::new("atomic");
        let path = dir.0.join("notes.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");

        let missing_dir = dir.0.join("missing").join("x.bin");
        assert!(matches!(
            write_atomic(&missing_dir, b"x"),
            Err(Error::Io { .. })
        ));
        assert!(matches!(
            write_atomic(Path::new("/"), b"x"),
            Err(Error::Io { .. })
        ));
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn open_reports_io_and_empty_files() {
        let dir = TempDir::new("open");
        assert!(matches!(
            SafeTensors::open(dir.0.join("absent.safetensors")),
            Err(Error::Io { .. })
        ));
        let empty = dir.0.join("empty.safetensors");
        fs::write(&empty, b"").unwrap();
        match SafeTensors::open(&empty) {
            Err(Error::SafeTensors { path, msg }) => {
                assert_eq!(path, empty.display().to_string());
                assert!(msg.contains("0 bytes"), "{msg}");
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    /// A small valid file for the mutation tests.
    fn sample_file() -> Vec<u8> {
        let (a, b, c) = (pattern(24, 1), pattern(4, 2), pattern(3, 3));
        serialize(
            &[
                WriteEntry {
                    name: "a",
                    dtype: DType::F32,
                    shape: &[2, 3],
                    data: &a,
                },
                WriteEntry {
                    name: "b",
                    dtype: DType::F16,
                    shape: &[2],
                    data: &b,
                },
                WriteEntry {
                    name: "c",
                    dtype: DType::U8,
                    shape: &[3],
                    data: &c,
                },
                WriteEntry {
                    name: "s",
                    dtype: DType::I32,
                    shape: &[],
                    data: &[1, 0, 0, 0],
                },
            ],
            &BTreeMap::from([("format".to_owned(), "pt".to_owned())]),
        )
        .unwrap()
    }

    fn dtype_strategy() -> impl Strategy<Value = DType> {
        prop::sample::select(vec![
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I32,
            DType::I8,
            DType::U8,
        ])
    }

    proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(st) = SafeTensors::from_bytes(bytes, PATH) {
                check_consistent(&st);
            }
        }

        #[test]
        fn never_panics_on_random_headers(
            header in prop::collection::vec(
                prop::sample::select(b"{}[]\",:0123456789-. _aFUI8__metadata__dtypeshapedata_offsets".to_vec()),
                0..200,
            ),
            data_len in 0usize..64,
        ) {
            let header = String::from_utf8(header).unwrap();
            if let Ok(st) = SafeTensors::from_bytes(raw_file(&header, &vec![7; data_len]), PATH) {
                check_consistent(&st);
            }
        }

        #[test]
        fn never_panics_on_mutated_files(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            digit_edits in prop::collection::vec(
                (any::<prop::sample::Index>(), prop::sample::select(b"0123456789,[]{}\" ".to_vec())),
                0..4,
            ),
            truncate in prop::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = sample_file();
            let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            // Edits within the JSON keep it plausible, reaching the checks past the parser.
            for (at, byte) in digit_edits {
                let i = 8 + at.index(header_end - 8);
                bytes[i] = byte;
            }
            if let Some(at) = truncate {
                bytes.truncate(at.index(bytes.len()));
            }
            if let Ok(st) = SafeTensors::from_bytes(bytes, PATH) {
                check_consistent(&st);
            }
        }

        #[test]
        fn random_tensors_round_trip(
            tensors in prop::collection::btree_map(
                "[a-z.]{1,8}",
                (dtype_strategy(), prop::collection::vec(0usize..4, 0..4), any::<u8>()),
                0..6,
            ),
        ) {
            let datas: Vec<Vec<u8>> = tensors
                .values()
                .map(|(dtype, shape, seed)| {
                    pattern(shape.iter().product::<usize>() * dtype.size_in_bytes(), *seed)
                })
                .collect();
            let writes: Vec<WriteEntry> = tensors
                .iter()
                .zip(&datas)
                .map(|((name, (dtype, shape, _)), data)| WriteEntry { name, dtype: *dtype, shape, data })
                .collect();
            let st = SafeTensors::from_bytes(serialize(&writes, &BTreeMap::new()).unwrap(), PATH).unwrap();
            prop_assert_eq!(st.entries().len(), writes.len());
            for w in &writes {
                let e = st.get(w.name).unwrap();
                prop_assert_eq!((e.dtype, e.shape.as_slice()), (w.dtype, w.shape));
                prop_assert_eq!(st.bytes(e), w.data);
            }
        }
    }
}
