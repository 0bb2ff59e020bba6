//! Where fetched models and data live by default: the same rules as `scripts/fetch-models.sh` and
//! `scripts/fetch-wordnet.sh`, outside the repository so that every checkout shares one copy.

use std::path::PathBuf;
use trit::{Error, Result};

/// `$var`, else `$HOME/.cache/trit/<leaf>`; `flag` is what to pass instead when neither is set.
fn cache_dir(var: &str, leaf: &str, flag: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(var) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| Error::Msg(format!("neither {var} nor HOME is set; pass {flag}")))?;
    Ok(PathBuf::from(home).join(".cache/trit").join(leaf))
}

/// `$TRIT_DATA`, by default `$HOME/.cache/trit/data`: WordNet and generated training data.
pub fn data_dir(flag: &str) -> Result<PathBuf> {
    cache_dir("TRIT_DATA", "data", flag)
}

/// `$TRIT_MODELS`, by default `$HOME/.cache/trit/models`: the unpacked model packages.
pub fn models_dir(flag: &str) -> Result<PathBuf> {
    cache_dir("TRIT_MODELS", "models", flag)
}
