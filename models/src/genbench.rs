//! `trit bench generate`: prompt processing and generation speed of a GGUF Llama model, in llama-bench's
//! terms (pp512: one forward pass over a 512-token prompt; tg128: 128 tokens decoded one at a time
//! from an empty cache), on a fixed number of threads, next to llama.cpp on the same machine.
//!
//! The prompt is the first 512 tokens of the bundled King James Bible; generation is greedy. Each
//! figure is the median of `reps` runs after one warm-up run. With a Python that has llama-cpp-python,
//! [`bench_peer`] measures llama.cpp the same way in the same run (`scripts/llama_cpp_peer.py`);
//! otherwise the ratios are against llama.cpp's anchors.md figures.

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
    /// Where the model runs (the thread count matters only on the CPU).
    pub device: Device,
}

/// The measured speeds.
#[derive(Clone, Debug)]
pub struct GenBench {
    pub model: String,
    pub options: GenBenchOptions,
    pub prompt_tokens_per_sec: f64,
    pub gen_tokens_per_sec: f64,
    /// llama.cpp measured in the same run, when asked for.
    pub peer: Option<Peer>,
}

/// llama.cpp's speeds from `scripts/llama_cpp_peer.py`.
#[derive(Clone, Debug)]
pub struct Peer {
    pub version: String,
    pub prompt_tokens_per_sec: f64,
    pub gen_tokens_per_sec: f64,
}

/// Runs `scripts/llama_cpp_peer.py` (from this source tree) with `python` on the same model, text,
/// threads and token counts as [`bench_generate`].
pub fn bench_peer(python: &Path, model: &Path, o: &GenBenchOptions) -> Result<Peer> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/llama_cpp_peer.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--text")
        .arg(root.join("data/kjv.txt"))
        .args(["--threads", &o.threads.to_string()])
        .args(["--prompt-tokens", &o.prompt_tokens.to_string()])
        .args(["--gen-tokens", &o.gen_tokens.to_string()])
        .args(["--reps", &o.reps.max(1).to_string()])
        .output()
        .map_err(|e| Error::Msg(format!("bench generate: running {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(Error::Msg(format!(
            "bench generate: {} {} failed (does it have llama-cpp-python?): {}",
            python.display(),
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Msg(format!(
            "bench generate: the peer script printed no JSON: {e}"
        ))
    })?;
    let num = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| Error::Msg(format!("bench generate: the peer script gave no {k}")))
    };
    Ok(Peer {
        version: v["llama_cpp_python"].as_str().unwrap_or("?").to_owned(),
        prompt_tokens_per_sec: num("prompt_tokens_per_sec")?,
        gen_tokens_per_sec: num("gen_tokens_per_sec")?,
    })
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
    let llm = Llm::open_on(path, o.weights, o.device, false)?;
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
    let ids = Tensor::from_vec(prompt.clone(), (1, prompt.len()), o.device)?;
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for rep in 0..=o.reps.max(1) {
        let mut caches = model.kv_caches(1, o.kv)?;
        let t = Instant::now();
        // Reading the logits back waits for a GPU to finish.
        model
            .forward_cached_last(&ids, &mut caches)?
            .try_to_vec_f32()?;
        let prompt_s = t.elapsed().as_secs_f64();

        let mut caches = model.kv_caches(1, o.kv)?;
        let mut next = prompt[0];
        let t = Instant::now();
        for _ in 0..o.gen_tokens {
            let x = Tensor::from_vec(vec![next], (1, 1), o.device)?;
            let logits = model
                .forward_cached_last(&x, &mut caches)?
                .try_to_vec_f32()?;
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
        peer: None,
    })
}

impl GenBench {
    /// llama.cpp's (prompt, generation) tokens/s: measured in this run, or the middle of anchors.md's.
    fn peer_speeds(&self) -> (f64, f64) {
        match &self.peer {
            Some(p) => (p.prompt_tokens_per_sec, p.gen_tokens_per_sec),
            None => (
                (LLAMA_CPP_PROMPT_TOKENS_PER_SEC.0 + LLAMA_CPP_PROMPT_TOKENS_PER_SEC.1) / 2.0,
                (LLAMA_CPP_GENERATE_TOKENS_PER_SEC.0 + LLAMA_CPP_GENERATE_TOKENS_PER_SEC.1) / 2.0,
            ),
        }
    }

    /// trit's speed over llama.cpp's: (prompt, generation).
    pub fn ratios(&self) -> (f64, f64) {
        let (p, g) = self.peer_speeds();
        (self.prompt_tokens_per_sec / p, self.gen_tokens_per_sec / g)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let o = &self.options;
        let (rp, rg) = self.ratios();
        let (pp, pg) = self.peer_speeds();
        serde_json::json!({
            "model": self.model,
            "threads": o.threads,
            "device": o.device.to_string(),
            "weights": format!("{:?}", o.weights),
            "kv": format!("{:?}", o.kv),
            "reps": o.reps,
            "prompt_tokens": o.prompt_tokens,
            "prompt_tokens_per_sec": self.prompt_tokens_per_sec,
            "gen_tokens": o.gen_tokens,
            "gen_tokens_per_sec": self.gen_tokens_per_sec,
            "peer": match &self.peer {
                Some(p) => format!("llama-cpp-python {}, same run", p.version),
                None => "llama.cpp, anchors.md".to_owned(),
            },
            "peer_prompt_tokens_per_sec": pp,
            "peer_gen_tokens_per_sec": pg,
            "prompt_ratio": rp,
            "gen_ratio": rg,
        })
    }

    pub fn table(&self) -> String {
        let o = &self.options;
        let (rp, rg) = self.ratios();
        let (pp, pg) = self.peer_speeds();
        let peer = match &self.peer {
            Some(p) => format!("llama.cpp (llama-cpp-python {}, same run)", p.version),
            None => format!(
                "llama.cpp (anchors.md: {}–{} and {}–{}; pass --peer PYTHON to measure it here)",
                LLAMA_CPP_PROMPT_TOKENS_PER_SEC.0,
                LLAMA_CPP_PROMPT_TOKENS_PER_SEC.1,
                LLAMA_CPP_GENERATE_TOKENS_PER_SEC.0,
                LLAMA_CPP_GENERATE_TOKENS_PER_SEC.1
            ),
        };
        let on = match o.device {
            Device::Cpu => format!("{} threads", o.threads),
            gpu => gpu.to_string(),
        };
        format!(
            "{}: {on}, weights {:?}, KV {:?}, median of {} runs\npeer: {peer}\n\
             {:<22} {:>10} {:>10} {:>7}\n\
             {:<22} {:>10.1} {:>10.1} {:>6.2}×\n\
             {:<22} {:>10.1} {:>10.1} {:>6.2}×\n",
            self.model,
            o.weights,
            o.kv,
            o.reps,
            "tokens/s",
            "trit",
            "llama.cpp",
            "ratio",
            format!("prompt ({} tokens)", o.prompt_tokens),
            self.prompt_tokens_per_sec,
            pp,
            rp,
            format!("generate ({} tokens)", o.gen_tokens),
            self.gen_tokens_per_sec,
            pg,
            rg,
        )
    }
}
