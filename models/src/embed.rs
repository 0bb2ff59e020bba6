//! `trit embed`: sentence embeddings of texts as JSON lines, one array per text, in order.

use crate::bert::SentenceEncoder;
use std::io::{BufRead, Write};
use std::path::Path;
use trit::{Error, Result};

/// Lines read from the input before they are embedded and printed, so output keeps pace with a long
/// stream without a forward pass per line.
const CHUNK: usize = 64;

/// Embeds `texts`, or, when there are none, every line of `input`; writes one JSON array per text.
pub fn run(model: &Path, texts: &[String], input: impl BufRead, mut out: impl Write) -> Result<()> {
    let encoder = SentenceEncoder::open(model)?;
    let mut write = |batch: &[String]| -> Result<()> {
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        for e in encoder.embed(&refs)? {
            let line = serde_json::to_string(&e)
                .map_err(|err| Error::Msg(format!("embed: writing JSON: {err}")))?;
            writeln!(out, "{line}")
                .map_err(|err| Error::Msg(format!("embed: writing output: {err}")))?;
        }
        out.flush()
            .map_err(|err| Error::Msg(format!("embed: writing output: {err}")))
    };
    if !texts.is_empty() {
        return write(texts);
    }
    let mut batch = Vec::with_capacity(CHUNK);
    for line in input.lines() {
        batch.push(line.map_err(|e| Error::Msg(format!("embed: reading stdin: {e}")))?);
        if batch.len() == CHUNK {
            write(&batch)?;
            batch.clear();
        }
    }
    write(&batch)
}
