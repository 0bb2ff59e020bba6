//! `trit bench generate`: prompt processing and generation speed of a GGUF Llama model, in llama-bench's
//! terms (pp512: one forward pass over a 512-token prompt; tg128: 128 tokens decoded one at a time
//! from an empty cache), on a fixed number of threads, next to llama.cpp on the same machine.
//!
//! The prompt is the first 512 tokens of the bundled King James Bible; generation is greedy. Each
//! figure is the median of `reps` runs after one warm-up run.

use std::path::Path;
use std::time::Instant;

use crate::data::BUNDLED_TEXT;
use crate::llama_gguf::Weights;
use crate::llm::Llm;
use trit::nn::KvFormat;
use trit::{Device, Error, Result, Tensor};

/// llama.cpp on this machine (anchors.md: llama-cpp-python 0.3.36, -march=native, SmolLM2-135M Q4_1,
/// 2 threads): prompt 512 tokens and generation of 128 tokens, tokens/s, low and high of its runs.
pub const LLAMA_CPP_PROMPT_TOKENS_PER_SEC: (f64, f64) = (150.0, 156.0);
pub const LLAMA_CPP_GENERATE_TOKENS_PER_SEC: (f64, f64) = (68.0, 70.0);

/// What to measure.
#[derive(Clone, Debug)]
pub struct GenBenchOptions {
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub reps: usize,
    pub weights: Weights,
    pub kv: KvFormat,
}

/// The measured speeds.
#[derive(Clone, Debug)]
pub struct GenBench {
    pub model: String,
    pub options: GenBenchOptions,
    pub prompt_tokens_per_sec: f64,
    pub gen_tokens_per_sec: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark on `model` in a pool of `options.threads` threads.
pub fn bench_generate(model: &Path, options: &GenBenchOptions) -> Result<GenBench> {
    if options.threads == 0 || options.prompt_tokens == 0 || options.gen_tokens == 0 {
        return Err(Error::Msg(
            "bench generate: threads, prompt and generated tokens must be positive".into(),
        ));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build()
        .map_err(|e| Error::Msg(format!("bench generate: a thread pool: {e}")))?;
    pool.install(|| run(model, options))
}

fn run(path: &Path, o: &GenBenchOptions) -> Result<GenBench> {
    let llm = Llm::open(path, o.weights, false)?;
    let _no_grad = trit::no_grad();
    let text = String::from_utf8_lossy(&BUNDLED_TEXT[..BUNDLED_TEXT.len().min(64 * 1024)]);
    let prompt: Vec<i32> = llm
        .bpe
        .encode(&text)?
        .into_iter()
        .take(o.prompt_tokens)
        .map(|t| t as i32)
        .collect();
    if prompt.len() < o.prompt_tokens {
        return Err(Error::Msg(format!(
            "bench generate: the bundled text gives only {} tokens",
            prompt.len()
        )));
    }
    let model = &llm.model;
    let ids = Tensor::from_vec(prompt.clone(), (1, prompt.len()), Device::Cpu)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..=o.reps.max(1) {
        let mut caches = model.kv_caches(1, o.kv)?;
        let t = Instant::now();
        model.forward_cached_last(&ids, &mut caches)?;
        let prompt_s = t.elapsed().as_secs_f64();

        let mut caches = model.kv_caches(1, o.kv)?;
        let mut next = prompt[0];
        let t = Instant::now();
        for _ in 0..o.gen_tokens {
            let x = Tensor::from_vec(vec![next], (1, 1), Device::Cpu)?;
            let logits = model.forward_cached_last(&x, &mut caches)?.to_vec_f32();
            next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map_or(0, |(i, _)| i as i32);
        }
        let gen_s = t.elapsed().as_secs_f64();
        // The first run warms the caches and the thread pool.
        if rep > 0 {
            pp.push(o.prompt_tokens as f64 / prompt_s);
            tg.push(o.gen_tokens as f64 / gen_s);
        }
    }
    Ok(GenBench {
        model: path.display().to_string(),
        options: o.clone(),
        prompt_tokens_per_sec: median(pp),
        gen_tokens_per_sec: median(tg),
    })
}

impl GenBench {
    fn mid(range: (f64, f64)) -> f64 {
        (range.0 + range.1) / 2.0
    }

    /// trit's speed over the middle of llama.cpp's range: (prompt, generation).
    pub fn ratios(&self) -> (f64, f64) {
        (
            self.prompt_tokens_per_sec / GenBench::mid(LLAMA_CPP_PROMPT_TOKENS_PER_SEC),
            self.gen_tokens_per_sec / GenBench::mid(LLAMA_CPP_GENERATE_TOKENS_PER_SEC),
        )
    }

    pub fn to_json(&self) -> serde_json::Value {
        let o = &self.options;
        let (rp, rg) = self.ratios();
        serde_json::json!({
            "model": self.model,
            "threads": o.threads,
            "weights": format!("{:?}", o.weights),
            "kv": format!("{:?}", o.kv),
            "reps": o.reps,
            "prompt_tokens": o.prompt_tokens,
            "prompt_tokens_per_sec": self.prompt_tokens_per_sec,
            "gen_tokens": o.gen_tokens,
            "gen_tokens_per_sec": self.gen_tokens_per_sec,
            "llama_cpp_prompt_tokens_per_sec": [LLAMA_CPP_PROMPT_TOKENS_PER_SEC.0, LLAMA_CPP_PROMPT_TOKENS_PER_SEC.1],
            "llama_cpp_gen_tokens_per_sec": [LLAMA_CPP_GENERATE_TOKENS_PER_SEC.0, LLAMA_CPP_GENERATE_TOKENS_PER_SEC.1],
            "prompt_ratio": rp,
            "gen_ratio": rg,
        })
    }

    pub fn table(&self) -> String {
        let o = &self.options;
        let (rp, rg) = self.ratios();
        let (lp, lg) = (
            LLAMA_CPP_PROMPT_TOKENS_PER_SEC,
            LLAMA_CPP_GENERATE_TOKENS_PER_SEC,
        );
        format!(
            "{}: {} threads, weights {:?}, KV {:?}, median of {} runs\n\
             {:<22} {:>12} {:>16} {:>7}\n\
             {:<22} {:>12.1} {:>16} {:>6.2}×\n\
             {:<22} {:>12.1} {:>16} {:>6.2}×\n",
            self.model,
            o.threads,
            o.weights,
            o.kv,
            o.reps,
            "tokens/s",
            "trit",
            "llama.cpp",
            "ratio",
            format!("prompt ({} tokens)", o.prompt_tokens),
            self.prompt_tokens_per_sec,
            format!("{}–{}", lp.0, lp.1),
            rp,
            format!("generate ({} tokens)", o.gen_tokens),
            self.gen_tokens_per_sec,
            format!("{}–{}", lg.0, lg.1),
            rg,
        )
    }
}
