//! WordNet 3.0 definition modelling, the TBT recipe's sequence-to-sequence task: the input is a synset's
//! part of speech, its words and its first example sentence, the target is its definition (gloss), all
//! real text written by lexicographers. The synsets come from WordNet's `data.{noun,verb,adj,adv}` files
//! (`scripts/fetch-wordnet.sh` fetches Debian's wordnet-base; Princeton's license travels with them as
//! `copyright`) and split 90/5/5 into train/validation/test by a hash of the synset's id, so the split
//! never depends on file order or on how many synsets a run reads.

use std::path::Path;
use trit::{Error, Result};

/// One synset: its id, part of speech (`n`, `v`, `a`, `s` for a satellite adjective, `r`), its words
/// (underscores as spaces, adjective position markers removed), its definition and example sentences.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synset {
    pub offset: u32,
    pub pos: char,
    pub words: Vec<String>,
    pub definition: String,
    pub examples: Vec<String>,
}

impl Synset {
    /// A stable id: the part of speech and the byte offset of its line, as WordNet names synsets.
    pub fn id(&self) -> String {
        format!("{}{:08}", self.pos, self.offset)
    }

    /// The model's input: "pos: word, word: example" (the example part only when there is one).
    pub fn input(&self) -> String {
        let mut s = format!("{}: {}", self.pos, self.words.join(", "));
        if let Some(e) = self.examples.first() {
            s.push_str(": ");
            s.push_str(e);
        }
        s
    }
}

/// Which part of the data a synset belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
    Test,
}

/// 90% train, 5% validation, 5% test, by the FNV-1a hash of the synset id.
pub fn split_of(id: &str) -> Split {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    match h % 100 {
        0..=89 => Split::Train,
        90..=94 => Split::Validation,
        _ => Split::Test,
    }
}

fn bad(file: &str, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::Msg(format!("{file}:{line}: {msg}"))
}

/// Drops an adjective's syntactic marker: `galore(ip)` → `galore`.
fn strip_marker(word: &str) -> &str {
    for m in ["(a)", "(p)", "(ip)"] {
        if let Some(w) = word.strip_suffix(m) {
            return w;
        }
    }
    word
}

/// Splits a gloss into its definition and its quoted examples: `def; "ex 1"; "ex 2"`.
fn split_gloss(gloss: &str) -> (String, Vec<String>) {
    let gloss = gloss.trim();
    let Some(first_quote) = gloss.find('"') else {
        return (gloss.trim_end_matches(';').trim().to_string(), Vec::new());
    };
    let definition = gloss[..first_quote]
        .trim()
        .trim_end_matches(';')
        .trim()
        .to_string();
    let examples = gloss[first_quote..]
        .split('"')
        .enumerate()
        .filter(|(i, s)| i % 2 == 1 && !s.trim().is_empty())
        .map(|(_, s)| s.trim().to_string())
        .collect();
    (definition, examples)
}

/// Parses one line of a `data.*` file (`file` and the 1-based `line` number name it in errors). The
/// license header's lines (starting with spaces) give `None`.
pub fn parse_data_line(text: &str, file: &str, line: usize) -> Result<Option<Synset>> {
    if text.starts_with(' ') || text.trim().is_empty() {
        return Ok(None);
    }
    let (fields, gloss) = text
        .split_once(" | ")
        .ok_or_else(|| bad(file, line, "no ` | ` before the gloss"))?;
    let f: Vec<&str> = fields.split_whitespace().collect();
    let field = |i: usize| {
        f.get(i)
            .copied()
            .ok_or_else(|| bad(file, line, format!("the line ends before field {}", i + 1)))
    };
    let offset: u32 = field(0)?
        .parse()
        .map_err(|e| bad(file, line, format!("synset offset {:?}: {e}", f[0])))?;
    let pos = match field(2)? {
        "n" => 'n',
        "v" => 'v',
        "a" => 'a',
        "s" => 's',
        "r" => 'r',
        other => return Err(bad(file, line, format!("unknown synset type {other:?}"))),
    };
    let w_cnt = usize::from_str_radix(field(3)?, 16)
        .map_err(|e| bad(file, line, format!("word count {:?}: {e}", f[3])))?;
    if w_cnt == 0 {
        return Err(bad(file, line, "a synset with no words"));
    }
    let words = (0..w_cnt)
        .map(|i| Ok(strip_marker(field(4 + 2 * i)?).replace('_', " ")))
        .collect::<Result<Vec<_>>>()?;
    let (definition, examples) = split_gloss(gloss);
    if definition.is_empty() {
        return Err(bad(file, line, "an empty definition"));
    }
    Ok(Some(Synset {
        offset,
        pos,
        words,
        definition,
        examples,
    }))
}

/// Every synset of the four `data.*` files in `dir`, in file order (noun, verb, adj, adv).
pub fn load(dir: &Path) -> Result<Vec<Synset>> {
    let mut out = Vec::new();
    for name in ["data.noun", "data.verb", "data.adj", "data.adv"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let file = path.display().to_string();
        for (i, l) in text.lines().enumerate() {
            out.extend(parse_data_line(l, &file, i + 1)?);
        }
    }
    Ok(out)
}

/// The task's (input, target) pairs of one split.
pub fn pairs(synsets: &[Synset], split: Split) -> Vec<(String, String)> {
    synsets
        .iter()
        .filter(|s| split_of(&s.id()) == split)
        .map(|s| (s.input(), s.definition.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as they stand in WordNet 3.0's data files (pointer lists shortened where noted).
    const NOUN: &str = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  ";
    const VERB: &str = "00067545 29 v 03 sweat 0 sudate 0 perspire 0 009 @ 00072989 v 0000 + 13535261 n 0301 + 05405751 n 0301 + 13535261 n 0204 + 05405751 n 0102 + 10418735 n 0102 + 13535261 n 0102 ^ 00046022 v 0101 ~ 00069747 v 0000 01 + 02 00 | excrete perspiration through the pores in the skin; \"Exercise makes one sweat\"  ";
    const SATELLITE: &str = "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance; \"abounding confidence\"; \"whiskey galore\"  ";

    #[test]
    fn parses_nouns_verbs_and_satellites() -> Result<()> {
        let n = parse_data_line(NOUN, "data.noun", 30)?.expect("a synset");
        assert_eq!(n.id(), "n00001740");
        assert_eq!(n.words, ["entity"]);
        assert_eq!(
            n.definition,
            "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"
        );
        assert!(n.examples.is_empty());
        assert_eq!(n.input(), "n: entity");

        let v = parse_data_line(VERB, "data.verb", 1)?.expect("a synset");
        assert_eq!(v.words, ["sweat", "sudate", "perspire"]);
        assert_eq!(
            v.definition,
            "excrete perspiration through the pores in the skin"
        );
        assert_eq!(v.examples, ["Exercise makes one sweat"]);
        assert_eq!(
            v.input(),
            "v: sweat, sudate, perspire: Exercise makes one sweat"
        );

        let s = parse_data_line(SATELLITE, "data.adj", 1)?.expect("a synset");
        assert_eq!(
            (s.pos, s.words.clone()),
            ('s', vec!["abounding".to_string(), "galore".to_string()])
        );
        assert_eq!(s.definition, "existing in abundance");
        assert_eq!(s.examples, ["abounding confidence", "whiskey galore"]);
        Ok(())
    }

    #[test]
    fn underscores_become_spaces_and_semicolons_stay_in_definitions() -> Result<()> {
        let line = "00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept formed by extracting common features; a thing apart  ";
        let s = parse_data_line(line, "data.noun", 1)?.expect("a synset");
        assert_eq!(s.words, ["abstraction", "abstract entity"]);
        assert_eq!(
            s.definition,
            "a general concept formed by extracting common features; a thing apart"
        );
        Ok(())
    }

    #[test]
    fn license_lines_are_skipped_and_malformed_lines_are_errors() {
        assert_eq!(
            parse_data_line("  1 This software and database is being provided", "f", 1).unwrap(),
            None
        );
        for (line, what) in [
            ("00001740 03 n 01 entity 0 000 no gloss", "gloss"),
            ("xyz 03 n 01 entity 0 000 | def", "offset"),
            ("00001740 03 q 01 entity 0 000 | def", "synset type"),
            ("00001740 03 n 03 entity 0 000 | def", "ends before"),
            ("00001740 03 n 01 entity 0 000 | ", "empty definition"),
        ] {
            let err = parse_data_line(line, "data.noun", 7)
                .expect_err(line)
                .to_string();
            assert!(
                err.contains("data.noun:7") && err.contains(what),
                "{line:?}: {err}"
            );
        }
    }

    #[test]
    fn the_split_is_stable_and_roughly_90_5_5() {
        assert_eq!(split_of("n00001740"), split_of("n00001740"));
        let ids: Vec<String> = (0..20_000).map(|i| format!("n{:08}", i * 37)).collect();
        let count = |s| ids.iter().filter(|id| split_of(id) == s).count() as f64 / ids.len() as f64;
        assert!((count(Split::Train) - 0.90).abs() < 0.01);
        assert!((count(Split::Validation) - 0.05).abs() < 0.01);
        assert!((count(Split::Test) - 0.05).abs() < 0.01);
    }
}
