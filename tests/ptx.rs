//! The committed PTX against its sources: every cuda/<name>.cu has a ptx/<name>.ptx whose header records
//! the sha256 of that source and of the shared headers cuda/*.cuh (so editing a kernel without running
//! cuda/build-ptx.sh fails here), the embedded module list is exactly ptx/, and every PTX file assembles
//! with ptxas for sm_80 and sm_90a without register spills, and each has a current ptxas report beside it
//! (ptx/<name>.ptxas.txt: registers, shared memory and spills of every kernel).
//!
//! ptxas comes from `TRIT_PTXAS`, the PATH, or scripts/cuda-toolchain.sh's install. Where none is found
//! the assembly check is skipped with a note, unless `TRIT_REQUIRE_PTXAS=1` (set by .ci/run, which
//! installs it) makes that a failure.

use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex(&Sha256::digest(&bytes))
}

/// The sha256 of cuda/*.cuh concatenated in name order, as cuda/build-ptx.sh computes it.
fn headers_sha256() -> String {
    let mut h = Sha256::new();
    for name in stems("cuda", "cuh") {
        h.update(std::fs::read(root().join(format!("cuda/{name}.cuh"))).unwrap());
    }
    hex(&h.finalize())
}

/// File stems with extension `ext` in `dir`.
fn stems(dir: &str, ext: &str) -> BTreeSet<String> {
    std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| {
            let p = e.expect("a directory entry").path();
            (p.extension().and_then(|x| x.to_str()) == Some(ext)).then(|| {
                p.file_stem()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned()
            })
        })
        .collect()
}

/// The value of the `// <key>: <value>` line in a PTX file's header.
fn header(ptx: &str, key: &str) -> Option<String> {
    let prefix = format!("// {key}: ");
    ptx.lines()
        .take_while(|l| l.starts_with("//"))
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

#[test]
fn ptx_is_up_to_date_with_its_cuda_sources() {
    let sources = stems("cuda", "cu");
    let ptx = stems("ptx", "ptx");
    assert!(!sources.is_empty(), "no kernel sources in cuda/");
    assert_eq!(
        sources, ptx,
        "cuda/*.cu and ptx/*.ptx must pair up; run cuda/build-ptx.sh"
    );
    let headers = headers_sha256();
    for name in &sources {
        let text = std::fs::read_to_string(root().join(format!("ptx/{name}.ptx"))).unwrap();
        let want = sha256_hex(&root().join(format!("cuda/{name}.cu")));
        assert_eq!(
            header(&text, "source sha256").as_deref(),
            Some(want.as_str()),
            "ptx/{name}.ptx is stale against cuda/{name}.cu; run cuda/build-ptx.sh {name}"
        );
        assert_eq!(
            header(&text, "headers sha256").as_deref(),
            Some(headers.as_str()),
            "ptx/{name}.ptx is stale against cuda/*.cuh; run cuda/build-ptx.sh"
        );
        let nvcc = header(&text, "nvcc").unwrap_or_default();
        assert!(
            nvcc.starts_with("release 13.0"),
            "ptx/{name}.ptx was built by nvcc {nvcc:?}, not 13.0 (the lent GPUs' driver loads 13.0's PTX)"
        );
        assert!(
            text.lines().any(|l| l.starts_with(".version ")),
            "ptx/{name}.ptx has no PTX body"
        );
    }
}

/// Every PTX file has its ptxas resource report beside it (ptx/<name>.ptxas.txt, written by
/// cuda/build-ptx.sh), made from exactly that PTX, listing each of its kernels for sm_80 and sm_90a with
/// no spills.
#[test]
fn every_ptx_has_a_current_ptxas_report() {
    for name in stems("ptx", "ptx") {
        let path = root().join(format!("ptx/{name}.ptxas.txt"));
        let report = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run cuda/build-ptx.sh {name}", path.display()));
        let ptx_path = root().join(format!("ptx/{name}.ptx"));
        let want = format!("# ptx sha256: {}", sha256_hex(&ptx_path));
        assert!(
            report.lines().any(|l| l == want),
            "ptx/{name}.ptxas.txt describes another ptx/{name}.ptx; run cuda/build-ptx.sh {name}"
        );
        let ptx = std::fs::read_to_string(&ptx_path).unwrap();
        let kernels: BTreeSet<&str> = ptx
            .lines()
            .filter_map(|l| l.strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or(l).trim())
            .collect();
        for arch in ["sm_80", "sm_90a"] {
            let mut listed = BTreeSet::new();
            for line in report
                .lines()
                .filter(|l| l.starts_with(&format!("{arch} ")))
            {
                let f: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(f.len(), 7, "ptx/{name}.ptxas.txt: malformed line {line:?}");
                assert_eq!(
                    (f[5], f[6]),
                    ("0", "0"),
                    "ptx/{name}.ptxas.txt: {} spills on {arch}",
                    f[1]
                );
                listed.insert(f[1]);
            }
            assert_eq!(
                listed, kernels,
                "ptx/{name}.ptxas.txt must list every kernel of ptx/{name}.ptx for {arch}"
            );
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn the_embedded_modules_are_exactly_the_committed_ptx() {
    let embedded: BTreeSet<String> = trit::cuda::ptx::MODULES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(embedded, stems("ptx", "ptx"));
    for (name, text) in trit::cuda::ptx::MODULES {
        let file = std::fs::read_to_string(root().join(format!("ptx/{name}.ptx"))).unwrap();
        assert!(*text == file, "module {name} differs from ptx/{name}.ptx");
    }
}

fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRIT_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("ptxas"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home).join(".cache/cuda-toolchain-13.0/cu13/bin/ptxas");
        p.is_file().then_some(p)
    })
}

#[test]
fn ptx_assembles_for_sm80_and_sm90a_without_spills() {
    let Some(ptxas) = find_ptxas() else {
        assert!(
            std::env::var_os("TRIT_REQUIRE_PTXAS").is_none(),
            "TRIT_REQUIRE_PTXAS is set but no ptxas was found (run scripts/cuda-toolchain.sh)"
        );
        eprintln!("note: no ptxas found; PTX assembly not checked (scripts/cuda-toolchain.sh installs it)");
        return;
    };
    let out_dir = std::env::temp_dir().join(format!("trit-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut failures = Vec::new();
    for name in stems("ptx", "ptx") {
        for arch in ["sm_80", "sm_90a"] {
            let out = Command::new(&ptxas)
                .arg(format!("-arch={arch}"))
                .arg("-v")
                .arg(root().join(format!("ptx/{name}.ptx")))
                .arg("-o")
                .arg(out_dir.join(format!("{name}-{arch}.cubin")))
                .output()
                .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
            let log = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                failures.push(format!("ptx/{name}.ptx for {arch}:\n{log}"));
                continue;
            }
            // ptxas -v prints "N bytes stack frame, N bytes spill stores, N bytes spill loads" per kernel.
            let spills: Vec<&str> = log
                .lines()
                .filter(|l| {
                    l.contains("spill") && !l.contains(" 0 bytes spill stores, 0 bytes spill loads")
                })
                .collect();
            if !spills.is_empty() {
                failures.push(format!(
                    "ptx/{name}.ptx for {arch} spills:\n{}",
                    spills.join("\n")
                ));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
