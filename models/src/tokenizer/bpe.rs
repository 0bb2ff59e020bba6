//! Byte-level BPE (GPT-2's scheme, as Llama-family GGUF files carry it in `tokenizer.ggml.*`).
//!
//! Encoding: special tokens (control and user-defined token types) are cut out of the text verbatim
//! first; each stretch between them is split by the pre-tokenizer — GPT-2's pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, after isolating
//! every digit for SmolLM's `smollm` variant — into words; each word's UTF-8 bytes map to GPT-2's
//! printable byte alphabet, and the adjacent pair of lowest merge rank is merged until none is left.
//! Decoding maps tokens back to bytes. The pattern is matched by hand (it needs a lookahead that
//! the `regex` crate lacks), with Unicode general categories for \p{L} and \p{N}.

use std::collections::HashMap;
use trit::{Error, Result};
use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// How text is split into words before merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's pattern.
    Gpt2,
    /// Every digit a word of its own, then GPT-2's pattern (SmolLM, `tokenizer.ggml.pre = "smollm"`).
    SmolLm,
}

impl PreTokenizer {
    /// The pre-tokenizer a GGUF file names in `tokenizer.ggml.pre`.
    pub fn from_gguf_name(name: &str) -> Result<PreTokenizer> {
        match name {
            "gpt2" | "default" => Ok(PreTokenizer::Gpt2),
            "smollm" => Ok(PreTokenizer::SmolLm),
            _ => Err(Error::Msg(format!(
                "tokenizer: pre-tokenizer {name:?} is not supported (gpt2, default, smollm are)"
            ))),
        }
    }
}

/// GGUF token types that are matched verbatim in text.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// A byte-level BPE tokenizer.
#[derive(Clone, Debug)]
pub struct Bpe {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    /// (left, right) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens, longest first, and whether each is a control token (skipped when decoding
    /// with `skip_special`).
    specials: Vec<(String, u32)>,
    control: Vec<bool>,
    pre: PreTokenizer,
    /// GPT-2's printable stand-in for each byte, and back.
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
}

/// GPT-2's byte → printable character map: printable Latin-1 bytes stand for themselves, the rest
/// are moved to U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        out[b as usize] = if printable(b) {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are characters")
        };
    }
    out
}

impl Bpe {
    /// Builds the tokenizer from a vocabulary (`tokens[id]`), GGUF token types (same length; empty
    /// means all normal), merges as "left right" strings in rank order, and a pre-tokenizer.
    pub fn new(
        tokens: Vec<String>,
        token_types: &[i64],
        merges: &[&str],
        pre: PreTokenizer,
    ) -> Result<Bpe> {
        let err = |m: String| Error::Msg(format!("tokenizer: {m}"));
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(err(format!(
                "{} token types for {} tokens",
                token_types.len(),
                tokens.len()
            )));
        }
        if tokens.len() > u32::MAX as usize {
            return Err(err("more than 2³² tokens".into()));
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // A duplicate keeps its first id, as llama.cpp and Hugging Face do.
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let (l, r) = m
                .split_once(' ')
                .ok_or_else(|| err(format!("merge {rank} {m:?} is not \"left right\"")))?;
            let id = |s: &str| {
                ids.get(s)
                    .copied()
                    .ok_or_else(|| err(format!("merge {rank} {m:?}: {s:?} is not a token")))
            };
            let merged = id(&format!("{l}{r}"))?;
            merge_map
                .entry((id(l)?, id(r)?))
                .or_insert((rank as u32, merged));
        }
        let kind = |i: usize| token_types.get(i).copied().unwrap_or(1);
        let mut specials: Vec<(String, u32)> = (0..tokens.len())
            .filter(|&i| matches!(kind(i), CONTROL | USER_DEFINED) && !tokens[i].is_empty())
            .map(|i| (tokens[i].clone(), i as u32))
            .collect();
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let control = (0..tokens.len()).map(|i| kind(i) == CONTROL).collect();
        let byte_char = byte_chars();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(Bpe {
            tokens,
            ids,
            merges: merge_map,
            specials,
            control,
            pre,
            byte_char,
            char_byte,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The token string of `id` (in GPT-2's byte alphabet), if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// The ids of `text`, special tokens in it included, no BOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token, longest at that position.
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            let (plain, after) = match next {
                Some((at, len, id)) => {
                    let plain = &rest[..at];
                    self.encode_plain(plain, &mut out)?;
                    out.push(id);
                    (None, &rest[at + len..])
                }
                None => (Some(rest), ""),
            };
            if let Some(plain) = plain {
                self.encode_plain(plain, &mut out)?;
            }
            rest = after;
        }
        Ok(out)
    }

    /// Text back from ids: byte-level tokens become their bytes (invalid UTF-8 is replaced by U+FFFD),
    /// special tokens their text unless `skip_special` drops the control ones.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let bytes = self.decode_bytes(ids, skip_special)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes of [`Bpe::decode`] before UTF-8 validation: a character can span tokens, so a
    /// streaming printer holds back an incomplete tail until the next token completes it.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        for &id in ids {
            let token = self.token(id).ok_or_else(|| {
                Error::Msg(format!(
                    "tokenizer: id {id} is outside the vocabulary of {}",
                    self.tokens.len()
                ))
            })?;
            if self.specials.iter().any(|(_, s)| *s == id) {
                if !(skip_special && self.control[id as usize]) {
                    bytes.extend_from_slice(token.as_bytes());
                }
                continue;
            }
            for c in token.chars() {
                match self.char_byte.get(&c) {
                    Some(&b) => bytes.push(b),
                    // Not a byte-level character: keep it as text.
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        }
        Ok(bytes)
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let pieces: Vec<&str> = match self.pre {
            PreTokenizer::Gpt2 => vec![text],
            PreTokenizer::SmolLm => split_digits(text),
        };
        for piece in pieces {
            for word in gpt2_words(piece) {
                self.encode_word(word, out)?;
            }
        }
        Ok(())
    }

    /// BPE over one word: start from its bytes' tokens, merge the lowest-ranked adjacent pair until
    /// no pair has a merge.
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<u32> = Vec::with_capacity(word.len());
        for &b in word.as_bytes() {
            let c = self.byte_char[b as usize];
            let id = self
                .ids
                .get(c.encode_utf8(&mut [0; 4]) as &str)
                .copied()
                .ok_or_else(|| {
                    Error::Msg(format!(
                        "tokenizer: the vocabulary has no token for byte {b:#04x}"
                    ))
                })?;
            syms.push(id);
        }
        while syms.len() > 1 {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend_from_slice(&syms);
        Ok(())
    }
}

/// Splits off every numeric character as a piece of its own (Hugging Face's `Digits` pre-tokenizer
/// with individual digits).
fn split_digits(text: &str) -> Vec<&str> {
    super::split_isolated(text, char::is_numeric)
}

/// \p{L}.
fn is_letter(c: char) -> bool {
    matches!(
        get_general_category(c),
        Gc::UppercaseLetter
            | Gc::LowercaseLetter
            | Gc::TitlecaseLetter
            | Gc::ModifierLetter
            | Gc::OtherLetter
    )
}

/// \p{N}.
fn is_number(c: char) -> bool {
    matches!(
        get_general_category(c),
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber
    )
}

/// [^\s\p{L}\p{N}].
fn is_other(c: char) -> bool {
    !c.is_whitespace() && !is_letter(c) && !is_number(c)
}

/// GPT-2's pattern, leftmost-first like the regex: at each position the first alternative that
/// matches wins.
fn gpt2_words(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |k: usize| chars.get(k).map_or(text.len(), |&(b, _)| b);
    let run = |from: usize, class: fn(char) -> bool| {
        from + chars[from..].iter().take_while(|&&(_, c)| class(c)).count()
    };
    let mut words = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        let rest = &text[at..];
        let contraction = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
            .iter()
            .find(|p| rest.starts_with(**p));
        let j = if let Some(p) = contraction {
            i + p.chars().count()
        } else {
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
            let body = if c == ' ' { i + 1 } else { i };
            let classes: [fn(char) -> bool; 3] = [is_letter, is_number, is_other];
            let class_run = chars
                .get(body)
                .and_then(|&(_, d)| classes.iter().find(|f| f(d)).map(|&f| run(body, f)));
            match class_run {
                Some(j) => j,
                None => {
                    // Whitespace: `\s+(?!\S)` leaves the last of a run that precedes a non-space for
                    // the next word; a single such character falls to `\s+`.
                    let j = run(i, char::is_whitespace);
                    if j < chars.len() && j - i > 1 {
                        j - 1
                    } else {
                        j.max(i + 1)
                    }
                }
            }
        };
        words.push(&text[at..end_of(j)]);
        i = j;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_pattern_splits_like_the_regex() {
        let cases: [(&str, &[&str]); 6] = [
            ("Hello, world!", &["Hello", ",", " world", "!"]),
            (
                "  leading\tand\n\nx  ",
                &[" ", " leading", "\t", "and", "\n", "\n", "x", "  "],
            ),
            ("it's they'll", &["it", "'s", " they", "'ll"]),
            ("café 42€", &["café", " 42", "€"]),
            ("a  -b", &["a", " ", " -", "b"]),
            ("x \t y", &["x", " \t", " y"]),
        ];
        for (text, want) in cases {
            assert_eq!(gpt2_words(text), want, "{text:?}");
        }
        assert_eq!(split_digits("ab12c3"), ["ab", "1", "2", "c", "3"]);
    }

    /// A toy vocabulary: bytes a, b, c, space (Ġ), merges "a b" then "Ġ ab" then "ab c".
    fn toy() -> Bpe {
        let tokens: Vec<String> = ["<s>", "a", "b", "c", "Ġ", "ab", "Ġab", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let types = [3, 1, 1, 1, 1, 1, 1, 1];
        Bpe::new(tokens, &types, &["a b", "Ġ ab", "ab c"], PreTokenizer::Gpt2).unwrap()
    }

    #[test]
    fn merges_by_rank_and_round_trips() -> Result<()> {
        let t = toy();
        // "abc ab": words "abc", " ab". "abc": a b c → ab c (rank 0) → abc (rank 2).
        assert_eq!(t.encode("abc ab")?, [7, 6]);
        assert_eq!(t.encode("<s>ab<s>")?, [0, 5, 0]);
        assert_eq!(t.decode(&[0, 7, 6], false)?, "<s>abc ab");
        assert_eq!(t.decode(&[0, 7, 6], true)?, "abc ab");
        assert!(t.decode(&[99], false).is_err());
        // A byte with no token is an error, not a panic.
        assert!(t.encode("z").is_err());
        Ok(())
    }

    #[test]
    fn bad_vocabularies_are_errors() {
        let tokens = vec!["a".to_string(), "b".to_string()];
        assert!(Bpe::new(tokens.clone(), &[1], &[], PreTokenizer::Gpt2).is_err());
        assert!(Bpe::new(tokens.clone(), &[], &["ab"], PreTokenizer::Gpt2).is_err());
        assert!(Bpe::new(tokens, &[], &["a b"], PreTokenizer::Gpt2).is_err());
        assert!(PreTokenizer::from_gguf_name("llama3").is_err());
    }
}
