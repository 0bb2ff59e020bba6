//! The training run behind `trit demo` and `trit train`: a byte-level Llama learns the bundled King James
//! Bible with AdamW, warmup + cosine learning rate and gradient clipping; validation loss is measured on a
//! fixed set of held-out windows before and after, and the model writes a sample at the end.

use crate::data::{bytes_to_text, eval_batches, random_batch, Batch, Corpus};
use crate::llama::{Llama, LlamaConfig};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trit::nn::ParamStore;
use trit::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Optimizer};
use trit::{DType, Device, Error, Result, Rng, Tensor};

/// PyTorch 2.15 eager on this 2-core CPU, demo shape, batch 8, AdamW (/work/shared/anchors.md).
pub const PYTORCH_CPU_TRAIN_TOKENS_PER_SEC: f64 = 5_550.0;

/// PyTorch 2.11 eager on an H200, bf16 autocast, SDPA, fused AdamW, demo shape (/work/shared/anchors.md).
pub const PYTORCH_H200_TRAIN_TOKENS_PER_SEC: f64 = 145_700.0;

/// Everything that defines a training run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    /// Preset name (`tiny`, `small`, `demo`), recorded in checkpoints and summaries.
    pub size: String,
    pub model: LlamaConfig,
    /// Total optimizer steps (a resumed run continues up to this count).
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    /// Peak learning rate; the schedule warms up to it over `warmup` steps, then decays by cosine to
    /// `lr · min_lr_ratio` at the last step.
    pub lr: f32,
    pub warmup: u64,
    pub min_lr_ratio: f32,
    pub seed: u64,
    /// Held-out windows of `seq` bytes in the validation set.
    pub eval_windows: usize,
    /// Where to save a checkpoint at the end (and every `save_every` steps).
    pub checkpoint: Option<PathBuf>,
    pub save_every: Option<u64>,
    /// Stop after this step as if interrupted (the schedule still spans `steps`); resume later with the
    /// same `steps` to finish the identical run.
    pub stop_after: Option<u64>,
    /// A checkpoint to continue from.
    pub resume: Option<PathBuf>,
    pub prompt: String,
    /// Bytes to generate after training (0: no sample).
    pub sample_len: usize,
    /// Draw a progress bar and progress notes on stderr.
    pub progress: bool,
    /// Where the parameters, activations and optimizer state live.
    pub device: Device,
    /// The activations' dtype: F32, or BF16 for mixed precision (f32 master weights and AdamW state).
    pub precision: DType,
    /// Print each step's host↔device copies (and the GPU allocator's counters) on stderr.
    pub verbose: bool,
}

impl TrainOptions {
    /// Defaults for a preset, sized so that `trit demo` finishes in under three minutes on 2 cores.
    pub fn preset(size: &str) -> Result<Self> {
        let model = LlamaConfig::preset(size)?;
        // Measured on the 2-core dev machine: small trains at ~12,800 tokens/s on a quiet machine, so its
        // 500 steps take ~80 s (about twice that under heavy load from other processes, still inside the
        // 3-minute budget) and bring validation loss from 5.6 to ~1.5.
        let (steps, batch, seq, lr) = match size {
            "tiny" => (300, 16, 64, 3e-3),
            "small" => (500, 16, 128, 3e-3),
            _ => (200, 8, 256, 2e-3),
        };
        Ok(TrainOptions {
            size: size.to_string(),
            model,
            steps,
            batch,
            seq,
            lr,
            warmup: steps / 10,
            min_lr_ratio: 0.1,
            seed: 0,
            eval_windows: 32,
            checkpoint: None,
            save_every: None,
            stop_after: None,
            resume: None,
            prompt: "And God said".to_string(),
            sample_len: 200,
            progress: false,
            device: Device::Cpu,
            precision: DType::F32,
            verbose: false,
        })
    }

    fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch == 0 || self.seq == 0 || self.eval_windows == 0 {
            trit::bail!(
                "train",
                "steps, batch, seq and eval windows must be positive (got {}, {}, {}, {})",
                self.steps,
                self.batch,
                self.seq,
                self.eval_windows
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            trit::bail!("train", "learning rate must be positive, got {}", self.lr);
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            trit::bail!(
                "train",
                "min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            );
        }
        if self.stop_after.is_some_and(|s| s == 0 || s > self.steps) {
            trit::bail!(
                "train",
                "--stop-after must be between 1 and --steps ({}), got {}",
                self.steps,
                self.stop_after.unwrap_or_default()
            );
        }
        if self.save_every == Some(0) {
            trit::bail!("train", "--save-every must be at least 1");
        }
        if self.save_every.is_some() && self.checkpoint.is_none() {
            trit::bail!("train", "--save-every needs --checkpoint PATH to save to");
        }
        if !matches!(self.precision, DType::F32 | DType::BF16) {
            trit::bail!(
                "train",
                "precision must be f32 or bf16, got {}",
                self.precision
            );
        }
        if self.prompt.is_empty() && self.sample_len > 0 {
            trit::bail!("train", "the sample prompt must not be empty");
        }
        Ok(())
    }
}

/// What a run achieved.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    pub size: String,
    pub device: Device,
    pub precision: DType,
    pub model: LlamaConfig,
    pub parameters: usize,
    /// The step count reached (including steps before a resume).
    pub steps: u64,
    /// Steps taken by this run.
    pub steps_this_run: u64,
    pub batch: usize,
    pub seq: usize,
    /// Tokens trained on by this run.
    pub tokens_seen: u64,
    pub initial_val_loss: f32,
    pub final_val_loss: f32,
    /// The training loss of each step of this run (before its update).
    pub losses: Vec<f32>,
    /// Training throughput: tokens per second of forward + backward + optimizer steps.
    pub tokens_per_second: f64,
    pub train_seconds: f64,
    /// Wall time of the whole run: evaluation, training, checkpoints and the sample.
    pub seconds: f64,
    pub prompt: String,
    pub sample: String,
    pub checkpoint: Option<PathBuf>,
}

impl TrainSummary {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "size": self.size,
            "device": self.device.to_string(),
            "precision": self.precision.to_string(),
            "model": self.model.to_string(),
            "parameters": self.parameters,
            "steps": self.steps,
            "steps_this_run": self.steps_this_run,
            "batch": self.batch,
            "seq": self.seq,
            "tokens_seen": self.tokens_seen,
            "initial_val_loss": self.initial_val_loss,
            "final_val_loss": self.final_val_loss,
            "tokens_per_second": self.tokens_per_second,
            "train_seconds": self.train_seconds,
            "seconds": self.seconds,
            "prompt": self.prompt,
            "sample": self.sample,
            "checkpoint": self.checkpoint.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// "300", or "100 → 300" for a run resumed at step 100.
    fn steps_text(&self) -> String {
        let start = self.steps - self.steps_this_run;
        if start == 0 {
            thousands(self.steps)
        } else {
            format!("{} → {}", thousands(start), thousands(self.steps))
        }
    }

    /// A two-column table for people.
    pub fn table(&self) -> String {
        let rows = [
            ("model", format!("{} ({})", self.size, self.model)),
            ("device", format!("{} ({})", self.device, self.precision)),
            ("parameters", thousands(self.parameters as u64)),
            (
                "steps",
                format!(
                    "{} (batch {} × seq {})",
                    self.steps_text(),
                    self.batch,
                    self.seq
                ),
            ),
            ("tokens seen", thousands(self.tokens_seen)),
            ("initial val loss", format!("{:.4}", self.initial_val_loss)),
            ("final val loss", format!("{:.4}", self.final_val_loss)),
            ("tokens/s", thousands(self.tokens_per_second.round() as u64)),
            (
                "seconds",
                format!("{:.1} ({:.1} training)", self.seconds, self.train_seconds),
            ),
        ];
        rows.iter()
            .map(|(k, v)| format!("  {k:<18}{v}\n"))
            .collect()
    }
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The optimizer settings of every run: AdamW with β₂ = 0.95 (steadier than 0.999 on short runs), as
/// GPT-style recipes use.
fn adamw(lr: f32) -> AdamWConfig {
    AdamWConfig {
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

const MAX_GRAD_NORM: f32 = 1.0;

/// One optimizer step on `batch`; returns the loss before the update.
fn train_step(model: &Llama, vars: &[Tensor], opt: &mut AdamW, batch: &Batch) -> Result<f32> {
    let loss = model.loss(&batch.inputs, &batch.targets)?;
    let mut grads = loss.backward()?;
    clip_grad_norm(vars, &mut grads, MAX_GRAD_NORM)?;
    opt.step(&grads)?;
    loss.to_scalar()
}

/// Mean loss over the fixed validation batches, without recording a graph.
pub fn evaluate(model: &Llama, batches: &[Batch]) -> Result<f32> {
    let _no_grad = trit::no_grad();
    let mut total = 0f64;
    let mut windows = 0usize;
    for b in batches {
        let n = b.inputs.dims()[0];
        total += model.loss(&b.inputs, &b.targets)?.to_scalar()? as f64 * n as f64;
        windows += n;
    }
    Ok((total / windows.max(1) as f64) as f32)
}

/// Saves the parameters, the optimizer state, the step and the data RNG to `path` (atomically), with the
/// preset name so a resume can check it builds the same model.
pub fn save_checkpoint(
    path: &Path,
    opts: &TrainOptions,
    params: &ParamStore,
    opt: &AdamW,
    step: u64,
    rng: &Rng,
) -> Result<()> {
    let mut meta = BTreeMap::new();
    meta.insert("size".to_string(), opts.size.clone());
    meta.insert("model".to_string(), opts.model.to_string());
    trit::io::checkpoint::save(path, &params.all(), &opt.state()?, step, rng, &meta)
}

/// Loads a checkpoint written by [`save_checkpoint`] into a freshly built model and optimizer, restores
/// the data RNG, and returns the step to continue from.
pub fn resume_from_checkpoint(
    path: &Path,
    opts: &TrainOptions,
    params: &ParamStore,
    opt: &mut AdamW,
    rng: &mut Rng,
) -> Result<u64> {
    let ckpt =
        trit::io::checkpoint::load(path).map_err(|e| Error::Msg(format!("cannot resume: {e}")))?;
    let err = |msg: String| Error::Checkpoint {
        path: path.display().to_string(),
        msg,
    };
    match ckpt.metadata.get("size") {
        Some(size) if *size == opts.size => {}
        Some(size) => {
            return Err(err(format!(
                "it holds a `{size}` model but this run builds `{}`; pass --size {size}",
                opts.size
            )))
        }
        None => {
            return Err(err(
                "it was not written by `trit train` (no model size)".into()
            ))
        }
    }
    params.load(&ckpt.params).map_err(|e| err(e.to_string()))?;
    opt.load_state(&ckpt.optimizer)
        .map_err(|e| err(e.to_string()))?;
    *rng = ckpt.rng;
    Ok(ckpt.step)
}

fn progress_bar(opts: &TrainOptions, start: u64) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(opts.steps);
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] step {pos}/{len} | {msg} | ETA {eta}",
    )
    .expect("the template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_position(start);
    bar.set_message("first step");
    bar
}

/// The GPU allocator's counters, for `--verbose` (empty on the CPU).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn device_memory(device: Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(n) = device {
        if let Ok(dev) = trit::cuda::CudaDevice::get(n) {
            let s = dev.pool_stats();
            let mib = |b: usize| b as f64 / (1 << 20) as f64;
            return format!(
                "; device memory {:.1} MiB in use, {:.1} MiB cached, peak {:.1} MiB ({} driver allocations)",
                mib(s.in_use),
                mib(s.cached),
                mib(s.peak),
                s.driver_allocs
            );
        }
    }
    String::new()
}

/// Trains a model as `opts` says and reports what it achieved.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    opts.validate()?;
    let started = Instant::now();
    let note = |msg: String| {
        if opts.progress {
            eprintln!("{msg}");
        }
    };
    // Windows are checked against the corpus before anything sized by `seq` (the RoPE table) is built.
    let corpus = Corpus::bundled();
    let eval = eval_batches(
        corpus.val(),
        opts.eval_windows,
        opts.batch,
        opts.seq,
        Device::Cpu,
    )?;
    let mut cfg = opts.model;
    cfg.max_seq = cfg.max_seq.max(opts.seq);
    let params = ParamStore::new(opts.seed, DType::F32, opts.device);
    let mut model = Llama::new(&params, cfg)?;
    model.set_compute_dtype(opts.precision)?;
    let named = params.all();
    let vars: Vec<Tensor> = named.iter().map(|(_, t)| t.clone()).collect();
    let mut opt = AdamW::new(named, adamw(opts.lr))?;
    // The data stream gets its own RNG (seeded apart from the weights') and travels in checkpoints, so a
    // resumed run sees the same batches as an uninterrupted one.
    let mut rng = Rng::new(opts.seed.wrapping_add(0x5eed_da7a));
    let first_step = match &opts.resume {
        Some(path) => {
            let step = resume_from_checkpoint(path, opts, &params, &mut opt, &mut rng)?;
            if step >= opts.steps {
                return Err(Error::Checkpoint {
                    path: path.display().to_string(),
                    msg: format!(
                        "it is already at step {step}; pass --steps above {step} to train further"
                    ),
                });
            }
            if opts.stop_after.is_some_and(|s| step >= s) {
                return Err(Error::Checkpoint {
                    path: path.display().to_string(),
                    msg: format!("it is already at step {step}, past --stop-after"),
                });
            }
            note(format!("resumed from {} at step {step}", path.display()));
            step
        }
        None => 0,
    };
    note(format!(
        "model: {} ({cfg}), {} parameters",
        opts.size,
        thousands(params.num_parameters() as u64)
    ));

    let initial_val_loss = evaluate(&model, &eval)?;
    note(format!(
        "validation loss before training: {initial_val_loss:.4} (uniform guess: ln 256 = {:.4})",
        256f32.ln()
    ));

    let schedule = LrSchedule::WarmupCosine {
        warmup: opts.warmup,
        total: opts.steps,
        peak: opts.lr,
        min: opts.lr * opts.min_lr_ratio,
    };
    let bar = progress_bar(opts, first_step);
    let tokens_per_step = (opts.batch * opts.seq) as u64;
    let mut train_time = Duration::ZERO;
    let mut step = first_step;
    let end = opts.stop_after.unwrap_or(opts.steps);
    let mut losses = Vec::with_capacity((end - first_step) as usize);
    while step < end {
        let t = Instant::now();
        let copies = trit::transfers::snapshot();
        opt.set_lr(schedule.lr_at(step));
        let batch = random_batch(corpus.train(), opts.batch, opts.seq, &mut rng, Device::Cpu)?;
        let loss = train_step(&model, &vars, &mut opt, &batch)?;
        if !loss.is_finite() {
            trit::bail!(
                "train",
                "loss became {loss} at step {step}; try a lower --lr"
            );
        }
        step += 1;
        losses.push(loss);
        train_time += t.elapsed();
        if opts.verbose {
            bar.suspend(|| {
                eprintln!(
                    "step {step}: loss {loss:.4}, {:.1} ms; copies {}{}",
                    t.elapsed().as_secs_f64() * 1e3,
                    trit::transfers::snapshot().since(&copies),
                    device_memory(opts.device)
                )
            });
        }
        let rate = ((step - first_step) * tokens_per_step) as f64 / train_time.as_secs_f64();
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.3} | {} tok/s", thousands(rate as u64)));
        if let (Some(path), Some(every)) = (&opts.checkpoint, opts.save_every) {
            if step.is_multiple_of(every) && step < end {
                save_checkpoint(path, opts, &params, &opt, step, &rng)?;
            }
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &opts.checkpoint {
        save_checkpoint(path, opts, &params, &opt, step, &rng)?;
        note(format!(
            "saved checkpoint {} at step {step}",
            path.display()
        ));
    }

    let final_val_loss = evaluate(&model, &eval)?;
    note(format!(
        "validation loss after training: {final_val_loss:.4}"
    ));
    let sample = if opts.sample_len > 0 {
        let prompt: Vec<u32> = opts.prompt.bytes().map(u32::from).collect();
        let mut sample_rng = Rng::new(opts.seed);
        // Decoding runs through the KV cache, which lives on the host: a GPU-trained model is copied there.
        let host = if opts.device == Device::Cpu {
            None
        } else {
            let host_params = ParamStore::new(opts.seed, DType::F32, Device::Cpu);
            let host_model = Llama::new(&host_params, cfg)?;
            host_params.load(&params.all().into_iter().collect())?;
            Some(host_model)
        };
        let new = host.as_ref().unwrap_or(&model).generate(
            &prompt,
            opts.sample_len,
            0.8,
            Some(40),
            &mut sample_rng,
        )?;
        bytes_to_text(&new)
    } else {
        String::new()
    };

    let steps_this_run = step - first_step;
    Ok(TrainSummary {
        size: opts.size.clone(),
        device: opts.device,
        precision: opts.precision,
        model: cfg,
        parameters: params.num_parameters(),
        steps: step,
        steps_this_run,
        batch: opts.batch,
        seq: opts.seq,
        tokens_seen: steps_this_run * tokens_per_step,
        initial_val_loss,
        final_val_loss,
        losses,
        tokens_per_second: (steps_this_run * tokens_per_step) as f64
            / train_time.as_secs_f64().max(1e-9),
        train_seconds: train_time.as_secs_f64(),
        seconds: started.elapsed().as_secs_f64(),
        prompt: opts.prompt.clone(),
        sample,
        checkpoint: opts.checkpoint.clone(),
    })
}

/// Training throughput at the benchmark shape of anchors.md.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainBench {
    pub device: Device,
    pub precision: DType,
    pub parameters: usize,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub step_ms: f64,
    pub tokens_per_second: f64,
}

impl TrainBench {
    /// The anchors.md figure this run compares with, and what it is.
    pub fn peer(&self) -> (f64, &'static str) {
        if self.device.is_cuda() {
            (
                PYTORCH_H200_TRAIN_TOKENS_PER_SEC,
                "PyTorch 2.11 eager, bf16 autocast, H200 (anchors.md)",
            )
        } else {
            (
                PYTORCH_CPU_TRAIN_TOKENS_PER_SEC,
                "PyTorch 2.15 eager, same CPU (anchors.md)",
            )
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let (peer, peer_name) = self.peer();
        json!({
            "device": self.device.to_string(),
            "precision": self.precision.to_string(),
            "shape": "d 256, 4 layers, 4 heads, ff 768, vocab 256",
            "parameters": self.parameters,
            "batch": self.batch,
            "seq": self.seq,
            "steps": self.steps,
            "step_ms": self.step_ms,
            "tokens_per_second": self.tokens_per_second,
            "pytorch": peer_name,
            "pytorch_tokens_per_second": peer,
            "ratio_vs_pytorch": self.tokens_per_second / peer,
        })
    }
}

/// Times `steps` full training steps (forward, backward, clipping, AdamW) of the demo model at batch 8,
/// seq 256 on `device` with activations in `precision`, after one untimed warm-up step; reports the
/// median step. A step ends when its loss is read back, so GPU work is inside the timing.
pub fn bench_train(steps: usize, device: Device, precision: DType) -> Result<TrainBench> {
    if steps == 0 {
        trit::bail!("bench train", "need at least one step");
    }
    let (batch, seq) = (8, 256);
    let params = ParamStore::new(0, DType::F32, device);
    let mut model = Llama::new(&params, LlamaConfig::demo())?;
    model.set_compute_dtype(precision)?;
    let named = params.all();
    let vars: Vec<Tensor> = named.iter().map(|(_, t)| t.clone()).collect();
    let mut opt = AdamW::new(named, adamw(1e-3))?;
    let corpus = Corpus::bundled();
    let mut rng = Rng::new(0);
    let mut times = Vec::with_capacity(steps);
    for i in 0..=steps {
        let b = random_batch(corpus.train(), batch, seq, &mut rng, Device::Cpu)?;
        let t = Instant::now();
        train_step(&model, &vars, &mut opt, &b)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(TrainBench {
        device,
        precision,
        parameters: params.num_parameters(),
        batch,
        seq,
        steps,
        step_ms: median * 1e3,
        tokens_per_second: (batch * seq) as f64 / median,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(3_475_712), "3,475,712");
    }

    #[test]
    fn bad_options_are_errors() -> Result<()> {
        let ok = TrainOptions::preset("tiny")?;
        assert!(TrainOptions::preset("giant").is_err());
        for bad in [
            TrainOptions {
                steps: 0,
                ..ok.clone()
            },
            TrainOptions {
                lr: -1.0,
                ..ok.clone()
            },
            TrainOptions {
                save_every: Some(5),
                ..ok.clone()
            },
            TrainOptions {
                resume: Some("/nonexistent/run.safetensors".into()),
                ..ok.clone()
            },
        ] {
            assert!(train(&bad).is_err());
        }
        Ok(())
    }
}
