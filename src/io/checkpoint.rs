//! Training checkpoints: parameters, optimizer state, step and RNG state in one safetensors file, written
//! atomically (temp file, fsync, rename) so a crash never leaves a half-written checkpoint. Loading
//! reproduces the uninterrupted run bit for bit on the CPU: values are stored exactly, and the RNG
//! resumes from its saved state.

use super::safetensors::SafeTensors;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::storage::Device;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

const PARAM: &str = "param.";
const OPTIM: &str = "optim.";

/// Everything needed to resume training.
pub struct Checkpoint {
    pub params: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub step: u64,
    pub rng: Rng,
    /// Free-form strings (the run's configuration, optimizer scalars).
    pub metadata: BTreeMap<String, String>,
}

/// Saves a checkpoint; `metadata` must not use the reserved keys `step` and `rng`.
pub fn save(
    path: impl AsRef<Path>,
    params: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    step: u64,
    rng: &Rng,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut meta = metadata.clone();
    meta.insert("step".into(), step.to_string());
    let s = rng.state();
    meta.insert("rng".into(), format!("{} {} {} {}", s[0], s[1], s[2], s[3]));
    meta.insert("format".into(), "trit-checkpoint-1".into());
    let mut all: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t)| (format!("{PARAM}{n}"), t.clone()))
        .collect();
    all.extend(
        optimizer
            .iter()
            .map(|(n, t)| (format!("{OPTIM}{n}"), t.clone())),
    );
    super::tensors::save(path, &all, &meta)
}

/// Loads a checkpoint written by [`save`]. Tensors are copied out of the file, so it can be overwritten by
/// the next save while training continues.
pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let err = |msg: String| Error::Checkpoint {
        path: path.display().to_string(),
        msg,
    };
    let file = SafeTensors::open(path)?;
    let meta = file.metadata().clone();
    if meta.get("format").map(String::as_str) != Some("trit-checkpoint-1") {
        return Err(err(
            "not a trit checkpoint (metadata format is not trit-checkpoint-1)".into(),
        ));
    }
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err("missing or invalid step".into()))?;
    let rng_words: Vec<u64> = meta
        .get("rng")
        .map(|s| s.split(' ').filter_map(|w| w.parse().ok()).collect())
        .unwrap_or_default();
    let rng_state: [u64; 4] = rng_words
        .try_into()
        .map_err(|_| err("missing or invalid rng state".into()))?;
    let mut params = BTreeMap::new();
    let mut optimizer = BTreeMap::new();
    for (name, t) in super::tensors::tensors(&file, Device::Cpu)? {
        let owned = t.contiguous()?.copy()?;
        if let Some(n) = name.strip_prefix(PARAM) {
            params.insert(n.to_string(), owned);
        } else if let Some(n) = name.strip_prefix(OPTIM) {
            optimizer.insert(n.to_string(), owned);
        } else {
            return Err(err(format!("unexpected tensor {name}")));
        }
    }
    let mut metadata = meta;
    for k in ["step", "rng", "format"] {
        metadata.remove(k);
    }
    Ok(Checkpoint {
        params,
        optimizer,
        step,
        rng: Rng::from_state(rng_state),
        metadata,
    })
}
