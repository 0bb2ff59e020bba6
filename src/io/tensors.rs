//! Tensors to and from safetensors files: loading is zero-copy on the CPU (tensors borrow the memory map)
//! whenever a tensor's bytes are aligned for its dtype, and a copy otherwise.

use super::safetensors::{self as st, Backing, SafeTensors, WriteEntry};
use crate::cpu::{ByteSource, CpuStorage};
use crate::error::Result;
use crate::storage::{Device, Storage};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

impl ByteSource for Backing {
    fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Every tensor of an opened file whose dtype trit holds, by name.
pub fn tensors(file: &SafeTensors, device: Device) -> Result<BTreeMap<String, Tensor>> {
    device.check()?;
    let backing: Arc<dyn ByteSource> = file.backing();
    let mut out = BTreeMap::new();
    for e in file.entries() {
        let size = e.dtype.size_in_bytes();
        let storage = if e.start % size == 0 {
            CpuStorage::Mapped {
                source: backing.clone(),
                start: e.start,
                len: (e.end - e.start) / size,
                dtype: e.dtype,
            }
        } else {
            CpuStorage::from_le_bytes(file.bytes(e), e.dtype)
        };
        out.insert(
            e.name.clone(),
            Tensor::from_storage(Storage::Cpu(storage), e.shape.clone(), None),
        );
    }
    Ok(out)
}

/// Opens and loads a safetensors file.
pub fn load(path: impl AsRef<Path>, device: Device) -> Result<BTreeMap<String, Tensor>> {
    tensors(&SafeTensors::open(path)?, device)
}

/// Writes named tensors (and string metadata) atomically.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.to_le_bytes())
        .collect::<Result<_>>()?;
    let entries: Vec<WriteEntry> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), data)| WriteEntry {
            name,
            dtype: t.dtype(),
            shape: t.dims(),
            data,
        })
        .collect();
    st::write(path, &entries, metadata)
}
