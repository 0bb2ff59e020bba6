//! `trit inspect FILE`: what a model file holds — its metadata and a table of its tensors — for GGUF
//! and safetensors files, recognised by their first bytes rather than their names.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use trit::io::gguf::Gguf;
use trit::io::safetensors::SafeTensors;
use trit::{Error, Result};

/// The report on `path`, as printed.
pub fn inspect(path: &Path) -> Result<String> {
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| Error::io(path, e))?;
    if n == 4 && &magic == b"GGUF" {
        Ok(gguf_report(&Gguf::open(path)?))
    } else {
        SafeTensors::open(path)
            .map(|st| safetensors_report(&st))
            .map_err(|e| {
                Error::Msg(format!(
                    "{}: neither GGUF (no \"GGUF\" magic) nor a valid safetensors file ({e})",
                    path.display()
                ))
            })
    }
}

/// "1.2 MB"-style sizes.
fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1 << 10 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

fn shape(s: &[usize]) -> String {
    format!("{s:?}")
}

/// A table of (name, type, shape, bytes) rows plus totals by type.
fn tensor_table(out: &mut String, rows: &[(String, String, String, usize)]) {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(
        out,
        "  {:<w$}  {:<6}  {:<18}  {:>9}",
        "name", "type", "shape", "bytes"
    );
    for (name, ty, sh, bytes) in rows {
        let _ = writeln!(out, "  {name:<w$}  {ty:<6}  {sh:<18}  {:>9}", size(*bytes));
    }
    let mut by_type: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for (_, ty, _, bytes) in rows {
        let e = by_type.entry(ty).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    let totals: Vec<String> = by_type
        .iter()
        .map(|(ty, (n, b))| format!("{ty} {n} ({})", size(*b)))
        .collect();
    let _ = writeln!(out, "  by type: {}", totals.join(", "));
}

fn gguf_report(g: &Gguf) -> String {
    let mut out = String::new();
    let data: usize = g.tensors().iter().map(|t| t.end - t.start).sum();
    let _ = writeln!(
        out,
        "{}: GGUF v{}, {} metadata keys, {} tensors ({} of data, alignment {})",
        g.path(),
        g.version(),
        g.metadata().len(),
        g.tensors().len(),
        size(data),
        g.alignment()
    );
    let _ = writeln!(out, "metadata:");
    for (k, v) in g.metadata() {
        let _ = writeln!(out, "  {k} = {v}");
    }
    let _ = writeln!(out, "tensors:");
    let rows: Vec<_> = g
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.ty.name().to_owned(),
                shape(&t.shape),
                t.end - t.start,
            )
        })
        .collect();
    tensor_table(&mut out, &rows);
    out
}

fn safetensors_report(st: &SafeTensors) -> String {
    let mut out = String::new();
    let data: usize = st.entries().iter().map(|e| e.end - e.start).sum::<usize>()
        + st.unsupported()
            .iter()
            .map(|e| e.end - e.start)
            .sum::<usize>();
    let _ = writeln!(
        out,
        "{}: safetensors, {} metadata keys, {} tensors ({} of data)",
        st.path(),
        st.metadata().len(),
        st.entries().len() + st.unsupported().len(),
        size(data)
    );
    if !st.metadata().is_empty() {
        let _ = writeln!(out, "metadata:");
        for (k, v) in st.metadata() {
            let _ = writeln!(out, "  {k} = {v:?}");
        }
    }
    let _ = writeln!(out, "tensors:");
    let mut rows: Vec<_> = st
        .entries()
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                format!("{:?}", e.dtype).to_uppercase(),
                shape(&e.shape),
                e.end - e.start,
            )
        })
        .collect();
    rows.extend(st.unsupported().iter().map(|e| {
        (
            format!("{} (not loaded)", e.name),
            e.dtype.clone(),
            shape(&e.shape),
            e.end - e.start,
        )
    }));
    tensor_table(&mut out, &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use trit::io::safetensors::{serialize, WriteEntry};
    use trit::DType;

    fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("trit-inspect-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reports_a_safetensors_file_and_refuses_garbage() {
        let data: Vec<u8> = (0..24u8).collect();
        let entries = [WriteEntry {
            name: "w",
            dtype: DType::F32,
            shape: &[2, 3],
            data: &data,
        }];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let p = temp("a.safetensors", &serialize(&entries, &meta).unwrap());
        let report = inspect(&p).unwrap();
        assert!(
            report.contains("safetensors, 1 metadata keys, 1 tensors (24 B of data)"),
            "{report}"
        );
        assert!(report.contains("format = \"pt\""), "{report}");
        assert!(report.contains("F32"), "{report}");
        assert!(report.contains("[2, 3]"), "{report}");
        let bad = temp("bad.bin", b"hello, not a model");
        let err = inspect(&bad).unwrap_err().to_string();
        assert!(err.contains("neither GGUF"), "{err}");
        let missing = inspect(Path::new("/nonexistent/model.gguf"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/model.gguf"), "{missing}");
        std::fs::remove_file(p).ok();
        std::fs::remove_file(bad).ok();
    }

    #[test]
    fn reports_a_gguf_file() {
        // A minimal v3 file: one u32 metadata key and one 2 × 2 F32 tensor.
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        let key = b"llama.block_count";
        b.extend_from_slice(&(key.len() as u64).to_le_bytes());
        b.extend_from_slice(key);
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&30u32.to_le_bytes());
        b.extend_from_slice(&(1u64).to_le_bytes());
        b.push(b'w');
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend_from_slice(&[0u8; 16]);
        let p = temp("a.gguf", &b);
        let report = inspect(&p).unwrap();
        assert!(
            report.contains("GGUF v3, 1 metadata keys, 1 tensors (16 B of data"),
            "{report}"
        );
        assert!(report.contains("llama.block_count = 30"), "{report}");
        assert!(report.contains("F32 1 (16 B)"), "{report}");
        std::fs::remove_file(p).ok();
    }
}
