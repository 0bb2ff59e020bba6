//! BERT's WordPiece tokenizer, as Hugging Face tokenizers runs it from a `tokenizer.json` with a
//! `BertNormalizer`, a `BertPreTokenizer` and a `WordPiece` model.
//!
//! Encoding: special tokens (`[CLS]`, `[MASK]`, …) written in the text are cut out verbatim first;
//! every stretch between them is normalized (control characters dropped and whitespace made a space,
//! CJK ideographs surrounded by spaces, accents stripped by NFD decomposition then dropping nonspacing
//! marks, lower-cased — in that order, as tokenizers does it), split on whitespace, then split again
//! around every punctuation character. Each word becomes the longest vocabulary entry that starts it,
//! then the longest `##`-prefixed entry that continues it, and so on; a word with no such split, or
//! longer than `max_input_chars_per_word` characters, is `[UNK]`. The ids are wrapped in
//! `[CLS] … [SEP]` and truncated to the maximum length, the special tokens included.

use std::collections::HashMap;
use std::path::Path;
use trit::{Error, Result};
use unicode_general_category::{get_general_category, GeneralCategory as Gc};
use unicode_normalization::UnicodeNormalization;

/// The `BertNormalizer` steps, each of which can be turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BertNormalizer {
    /// Drop NUL, U+FFFD and control/format/private-use characters; turn whitespace into spaces.
    pub clean_text: bool,
    /// Put spaces around CJK ideographs, so that each is a word of its own.
    pub handle_chinese_chars: bool,
    /// NFD-decompose, then drop nonspacing marks (é → e).
    pub strip_accents: bool,
    pub lowercase: bool,
}

impl BertNormalizer {
    /// The uncased BERT models' normalizer: every step on.
    pub fn uncased() -> Self {
        BertNormalizer {
            clean_text: true,
            handle_chinese_chars: true,
            strip_accents: true,
            lowercase: true,
        }
    }

    pub fn normalize(&self, text: &str) -> String {
        let mut s: String = if self.clean_text {
            text.chars()
                .filter(|&c| c != '\0' && c != '\u{fffd}' && !is_control(c))
                .map(|c| if is_whitespace(c) { ' ' } else { c })
                .collect()
        } else {
            text.to_owned()
        };
        if self.handle_chinese_chars && s.chars().any(is_chinese_char) {
            let mut spaced = String::with_capacity(s.len() + 8);
            for c in s.chars() {
                if is_chinese_char(c) {
                    spaced.extend([' ', c, ' ']);
                } else {
                    spaced.push(c);
                }
            }
            s = spaced;
        }
        if self.strip_accents {
            s = s
                .nfd()
                .filter(|&c| get_general_category(c) != Gc::NonspacingMark)
                .collect();
        }
        if self.lowercase {
            s = s.chars().flat_map(char::to_lowercase).collect();
        }
        s
    }
}

/// Tab, newline and carriage return count as whitespace although they are control characters.
fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

/// Categories Cc, Cf and Co (the `unicode_categories` crate's `is_other`, which tokenizers uses),
/// except the three whitespace controls.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r')
        && matches!(
            get_general_category(c),
            Gc::Control | Gc::Format | Gc::PrivateUse
        )
}

/// The CJK Unified Ideographs blocks and their extensions, as BERT's original code lists them
/// (Hangul, Hiragana and Katakana are not among them).
fn is_chinese_char(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B920..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// ASCII punctuation (which includes symbols such as `$`, `+` and `^`) and the Unicode P* categories.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            get_general_category(c),
            Gc::ConnectorPunctuation
                | Gc::DashPunctuation
                | Gc::ClosePunctuation
                | Gc::FinalPunctuation
                | Gc::InitialPunctuation
                | Gc::OtherPunctuation
                | Gc::OpenPunctuation
        )
}

/// `BertPreTokenizer`: whitespace separates words and is dropped; each punctuation character is a
/// word of its own.
fn pre_tokenize(text: &str) -> Vec<&str> {
    text.split(char::is_whitespace)
        .flat_map(|chunk| super::split_isolated(chunk, is_punctuation))
        .collect()
}

/// The cleanup of tokenizers' `WordPiece` decoder, applied to each piece after its joining space is
/// added: in effect it glues `.`, `?`, `!` and `,` to the word before.
const CLEANUP: [(&str, &str); 11] = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" do not", " don't"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
];

/// A WordPiece tokenizer with BERT's normalization and special tokens.
#[derive(Clone, Debug)]
pub struct WordPiece {
    /// `tokens[id]`.
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    normalizer: BertNormalizer,
    /// Special tokens matched verbatim in the text, longest first; `decode` skips them when asked.
    specials: Vec<(String, u32)>,
    prefix: String,
    max_input_chars_per_word: usize,
    unk: u32,
    cls: u32,
    sep: u32,
    pad: u32,
    /// Most ids `encode` returns, [CLS] and [SEP] included.
    max_len: Option<usize>,
    /// Apply tokenizers' cleanup (" ." → ".", …) when decoding.
    cleanup: bool,
}

/// The special tokens of BERT vocabularies, matched in text and skipped by `decode`.
const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

impl WordPiece {
    /// Builds the tokenizer from `tokens[id]` (every id once). `specials` are the tokens matched
    /// verbatim in text; [UNK], [CLS], [SEP] and [PAD] must be in the vocabulary.
    pub fn new(
        tokens: Vec<String>,
        specials: &[&str],
        normalizer: BertNormalizer,
        unk_token: &str,
        max_input_chars_per_word: usize,
    ) -> Result<WordPiece> {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            let id = u32::try_from(id)
                .map_err(|_| Error::Msg("wordpiece: more than 2³² tokens".into()))?;
            if ids.insert(t.clone(), id).is_some() {
                return Err(Error::Msg(format!("wordpiece: token {t:?} appears twice")));
            }
        }
        let need = |t: &str| {
            ids.get(t)
                .copied()
                .ok_or_else(|| Error::Msg(format!("wordpiece: the vocabulary has no {t}")))
        };
        let mut special_ids = Vec::new();
        for &s in specials {
            special_ids.push((s.to_owned(), need(s)?));
        }
        special_ids.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(WordPiece {
            unk: need(unk_token)?,
            cls: need("[CLS]")?,
            sep: need("[SEP]")?,
            pad: need("[PAD]")?,
            tokens,
            ids,
            normalizer,
            specials: special_ids,
            prefix: "##".into(),
            max_input_chars_per_word,
            max_len: None,
            cleanup: true,
        })
    }

    /// A `vocab.txt` (one token per line, the id is the line number) with BERT's special tokens and
    /// the given normalizer.
    pub fn from_vocab_txt(path: impl AsRef<Path>, normalizer: BertNormalizer) -> Result<WordPiece> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let tokens = text.lines().map(str::to_owned).collect();
        WordPiece::new(tokens, &BERT_SPECIALS, normalizer, "[UNK]", 100)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    }

    /// A Hugging Face `tokenizer.json` whose model is WordPiece, with a BertNormalizer (or none) and
    /// a BertPreTokenizer. Its special added tokens are matched in text; its truncation and padding
    /// settings are not used (see [`WordPiece::with_max_len`]).
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<WordPiece> {
        let path = path.as_ref();
        let bad = |msg: String| Error::Msg(format!("{}: {msg}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let model = &json["model"];
        if model["type"] != "WordPiece" {
            return Err(bad(format!(
                "model.type is {}, not \"WordPiece\"",
                model["type"]
            )));
        }
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| bad("model.vocab is not an object".into()))?;
        let mut slots: Vec<Option<String>> = vec![None; vocab.len()];
        for (token, id) in vocab {
            let slot = id
                .as_u64()
                .and_then(|id| slots.get_mut(usize::try_from(id).ok()?))
                .ok_or_else(|| {
                    bad(format!(
                        "model.vocab[{token:?}] = {id} is not an id below {}",
                        vocab.len()
                    ))
                })?;
            if slot.replace(token.clone()).is_some() {
                return Err(bad(format!("model.vocab gives id {id} twice")));
            }
        }
        // Ids are below len and none repeats, so every slot is filled.
        let tokens: Vec<String> = slots.into_iter().flatten().collect();
        let normalizer = match &json["normalizer"] {
            serde_json::Value::Null => BertNormalizer {
                clean_text: false,
                handle_chinese_chars: false,
                strip_accents: false,
                lowercase: false,
            },
            n if n["type"] == "BertNormalizer" => {
                let flag = |key: &str, default: bool| n[key].as_bool().unwrap_or(default);
                let lowercase = flag("lowercase", true);
                BertNormalizer {
                    clean_text: flag("clean_text", true),
                    handle_chinese_chars: flag("handle_chinese_chars", true),
                    // null means "as lowercase" (BERT's original behaviour).
                    strip_accents: flag("strip_accents", lowercase),
                    lowercase,
                }
            }
            n => return Err(bad(format!("normalizer {} is not supported", n["type"]))),
        };
        let pre = &json["pre_tokenizer"];
        if pre["type"] != "BertPreTokenizer" {
            return Err(bad(format!(
                "pre_tokenizer {} is not supported (BertPreTokenizer is)",
                pre["type"]
            )));
        }
        let specials: Vec<&str> = json["added_tokens"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|t| t["special"] == true)
                    .filter_map(|t| t["content"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let unk = model["unk_token"].as_str().unwrap_or("[UNK]");
        let max_chars = model["max_input_chars_per_word"].as_u64().unwrap_or(100);
        let mut wp = WordPiece::new(
            tokens,
            &specials,
            normalizer,
            unk,
            usize::try_from(max_chars).unwrap_or(usize::MAX),
        )
        .map_err(|e| bad(e.to_string()))?;
        if let Some(prefix) = model["continuing_subword_prefix"].as_str() {
            wp.prefix = prefix.to_owned();
        }
        if let Some(cleanup) = json["decoder"]["cleanup"].as_bool() {
            wp.cleanup = cleanup;
        }
        Ok(wp)
    }

    /// Truncates encodings to `max_len` ids, [CLS] and [SEP] included (sentence-transformers'
    /// `max_seq_length`). `max_len` must leave room for them.
    pub fn with_max_len(mut self, max_len: usize) -> Result<WordPiece> {
        if max_len < 2 {
            trit::bail!(
                "WordPiece::with_max_len",
                "{max_len} leaves no room for [CLS] and [SEP]"
            );
        }
        self.max_len = Some(max_len);
        Ok(self)
    }

    pub fn max_len(&self) -> Option<usize> {
        self.max_len
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The padding id ([PAD]).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// `[CLS] pieces… [SEP]`, truncated to the maximum length.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let mut rest = text;
        while !rest.is_empty() {
            let (plain, special) = self.next_special(rest);
            self.encode_plain(&rest[..plain], &mut ids);
            match special {
                Some((id, len)) => {
                    ids.push(id);
                    rest = &rest[plain + len..];
                }
                None => rest = "",
            }
        }
        if let Some(max) = self.max_len {
            ids.truncate(max - 1);
        }
        ids.push(self.sep);
        ids
    }

    /// Where the first special token in `text` starts (the whole length if none does), and its id and
    /// byte length; the longest wins where several start at one place.
    fn next_special(&self, text: &str) -> (usize, Option<(u32, usize)>) {
        let mut best: (usize, Option<(u32, usize)>) = (text.len(), None);
        for (s, id) in &self.specials {
            if let Some(at) = text.find(s.as_str()) {
                // Longest first, so a later one at the same place is never longer.
                if at < best.0 {
                    best = (at, Some((*id, s.len())));
                }
            }
        }
        best
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = self.normalizer.normalize(text);
        for word in pre_tokenize(&normalized) {
            self.encode_word(word, out);
        }
    }

    /// Greedy longest-match-first, all or nothing: a word that cannot be covered is one [UNK].
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        let bounds: Vec<usize> = word
            .char_indices()
            .map(|(i, _)| i)
            .chain([word.len()])
            .collect();
        let chars = bounds.len() - 1;
        if chars > self.max_input_chars_per_word {
            out.push(self.unk);
            return;
        }
        let mark = out.len();
        let mut piece = String::with_capacity(word.len() + self.prefix.len());
        let mut start = 0;
        while start < chars {
            let found = (start + 1..=chars).rev().find_map(|end| {
                piece.clear();
                if start > 0 {
                    piece.push_str(&self.prefix);
                }
                piece.push_str(&word[bounds[start]..bounds[end]]);
                self.ids.get(&piece).map(|&id| (id, end))
            });
            let Some((id, end)) = found else {
                out.truncate(mark);
                out.push(self.unk);
                return;
            };
            out.push(id);
            start = end;
        }
    }

    /// Text from ids: pieces joined by spaces, `##` continuations glued to the piece before, and
    /// tokenizers' cleanup of spaces before punctuation. With `skip_special`, the special tokens
    /// ([CLS], [SEP], [PAD], [MASK] and [UNK]) are left out, as `skip_special_tokens=True` does.
    /// Lower-casing and accent stripping are not undone.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut out = String::new();
        let mut first = true;
        for &id in ids {
            let token = self.token(id).ok_or_else(|| {
                Error::Msg(format!(
                    "wordpiece: id {id} is outside the vocabulary of {}",
                    self.tokens.len()
                ))
            })?;
            if skip_special && self.specials.iter().any(|&(_, s)| s == id) {
                continue;
            }
            let mut piece = match token.strip_prefix(self.prefix.as_str()) {
                _ if first => token.to_owned(),
                Some(rest) => rest.to_owned(),
                None => format!(" {token}"),
            };
            first = false;
            if self.cleanup {
                for (from, to) in CLEANUP {
                    piece = piece.replace(from, to);
                }
            }
            out.push_str(&piece);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> WordPiece {
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "a", "##b", ",",
            "!", "hello", "world", "cafe", "東",
        ];
        WordPiece::new(
            vocab.iter().map(|s| s.to_string()).collect(),
            &BERT_SPECIALS,
            BertNormalizer::uncased(),
            "[UNK]",
            9,
        )
        .expect("a valid vocabulary")
    }

    #[test]
    fn greedy_longest_match_with_continuations() {
        let wp = toy();
        assert_eq!(wp.encode("unaffable"), [2, 5, 6, 7, 3]);
        // "unaffablex" has no cover: the whole word is [UNK], not a partial split.
        assert_eq!(wp.encode("unaffablex hello"), [2, 1, 12, 3]);
        // Ten characters is over the toy's limit of nine.
        assert_eq!(wp.encode("abbbbbbbbb"), [2, 1, 3]);
        assert_eq!(wp.encode("abbbbbbbb"), [2, 8, 9, 9, 9, 9, 9, 9, 9, 9, 3]);
    }

    #[test]
    fn normalizes_splits_and_matches_specials() {
        let wp = toy();
        assert_eq!(
            wp.encode("HELLO,\tWorld!\u{0}\u{200b}"),
            [2, 12, 10, 13, 11, 3]
        );
        assert_eq!(wp.encode("Café東hello"), [2, 14, 15, 12, 3]);
        assert_eq!(wp.encode("hello[MASK]world [SEP]"), [2, 12, 4, 13, 3, 3]);
        assert_eq!(wp.encode(""), [2, 3]);
        assert_eq!(wp.encode(" \n "), [2, 3]);
    }

    #[test]
    fn truncation_keeps_cls_and_sep() -> Result<()> {
        let wp = toy().with_max_len(3)?;
        assert_eq!(wp.encode("hello world"), [2, 12, 3]);
        assert!(toy().with_max_len(1).is_err());
        Ok(())
    }

    #[test]
    fn decode_glues_pieces_and_skips_specials() -> Result<()> {
        let wp = toy();
        let ids = wp.encode("Hello, unaffable world!");
        assert_eq!(wp.decode(&ids, true)?, "hello, unaffable world!");
        assert_eq!(
            wp.decode(&ids, false)?,
            "[CLS] hello, unaffable world! [SEP]"
        );
        assert!(wp.decode(&[99], false).is_err());
        Ok(())
    }

    #[test]
    fn bad_vocabularies_are_errors() {
        let dup = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "a"];
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let n = BertNormalizer::uncased();
        assert!(WordPiece::new(strings(&dup), &[], n, "[UNK]", 100).is_err());
        let no_sep = ["[PAD]", "[UNK]", "[CLS]", "a"];
        assert!(WordPiece::new(strings(&no_sep), &[], n, "[UNK]", 100).is_err());
    }
}
