//! Tokenizers of the real models: byte-level BPE from a GGUF file's metadata ([`bpe`]) and BERT's
//! WordPiece ([`wordpiece`]).

pub mod bpe;
pub mod wordpiece;

pub use bpe::{Bpe, PreTokenizer};
use trit::io::gguf::Gguf;
use trit::{Error, Result};
pub use wordpiece::{BertNormalizer, WordPiece};

/// The byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.model = "gpt2"`): its tokens,
/// token types, merges and pre-tokenizer.
pub fn bpe_from_gguf(g: &Gguf) -> Result<Bpe> {
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::Msg(format!(
            "{}: tokenizer model {model:?} is not byte-level BPE (\"gpt2\")",
            g.path()
        )));
    }
    let tokens = g
        .get_str_array("tokenizer.ggml.tokens")?
        .into_iter()
        .map(str::to_owned)
        .collect();
    let types = match g.metadata().contains_key("tokenizer.ggml.token_type") {
        true => g.get_i64_array("tokenizer.ggml.token_type")?,
        false => Vec::new(),
    };
    let merges = g.get_str_array("tokenizer.ggml.merges")?;
    let pre = match g.metadata().contains_key("tokenizer.ggml.pre") {
        true => PreTokenizer::from_gguf_name(g.get_str("tokenizer.ggml.pre")?)?,
        false => PreTokenizer::Gpt2,
    };
    Bpe::new(tokens, &types, &merges, pre).map_err(|e| Error::Msg(format!("{}: {e}", g.path())))
}

/// `text` cut so that every character matching `isolated` is a piece of its own, the runs between
/// them pieces too (the `Isolated` split behaviour of Hugging Face's pre-tokenizers).
pub(crate) fn split_isolated(text: &str, isolated: impl Fn(char) -> bool) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if isolated(c) {
            if start < i {
                out.push(&text[start..i]);
            }
            out.push(&text[i..i + c.len_utf8()]);
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}
