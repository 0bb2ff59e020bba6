//! `trit recipe tbt`: the TBT paper's experiment (papers.md §1) end to end on WordNet 3.0 definition
//! modelling. A full-precision BART-style teacher learns the task with cross-entropy; then each student
//! setting (TBT at E-W-A 2-2-8, 2-2-2, 1-1-8, 1-1-1, and the TWN/BWN baselines at the same bits) starts
//! from the teacher and is distilled from it for the same number of steps. Every model is scored on a
//! fixed subset of the test split with beam-4 decoding (ROUGE-1/2/L), the students with their weights
//! packed, and the table reports each model's size when packed and its decoding speed.
//!
//! The baselines are the quantizers TBT improves on, trained the same way (same initialisation, same
//! distillation, same steps): TWN (2 bits) or BWN (1 bit) for the weights and the token table, and
//! activations by fixed per-tensor rules with nothing learned ([`LowBitActs::MinMax`]: min-max at 2 and
//! 8 bits, XNOR-Net's mean|x|·sign(x) at 1 bit) where TBT learns each tensor's step (its elastic
//! quantizer). At 8 bits both use the same min-max activations, so only the weights differ.

use crate::bart::{init_student_from, Bart, BartConfig, BartQuant, LowBitActs};
use crate::beam::BeamConfig;
use crate::demo::thousands;
use crate::rouge::{self, Rouge};
use crate::seq2seq::{self, Batch, BOS, EOS, IGNORE, VOCAB};
use crate::tbt::distillation_loss;
use crate::wordnet::{self, Split};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trit::io::safetensors::SafeTensors;
use trit::io::tensors::tensors;
use trit::nn::ParamStore;
use trit::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Optimizer};
use trit::quant::quantizers::{Quantizer, TbtForm};
use trit::{DType, Device, Result, Rng, Tensor};

/// Everything that defines a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RecipeConfig {
    /// "full" or "quick" (with ", custom" when flags change it), recorded in the report.
    pub name: String,
    pub model: BartConfig,
    /// Sources are cut to this many bytes, targets to this many tokens (EOS included); decoding stops
    /// there too.
    pub max_source: usize,
    pub max_target: usize,
    /// Train on this many training pairs (a fixed random subset), or on all of them.
    pub train_pairs: Option<usize>,
    pub batch: usize,
    pub teacher_steps: u64,
    /// Distillation steps of each student.
    pub student_steps: u64,
    pub teacher_lr: f32,
    pub student_lr: f32,
    /// Test pairs scored (a fixed random subset of the test split).
    pub eval_pairs: usize,
    pub beam: usize,
    pub seed: u64,
    /// The TBT quantizers' form (the paper's equations by default).
    pub tbt_form: TbtForm,
    /// Run only the students whose E-W-A label ("2-2-8") or label:method ("2-2-8:TBT") is listed;
    /// empty runs all of [`settings`].
    pub students: Vec<String>,
    /// Progress bars and notes on stderr.
    pub progress: bool,
}

impl RecipeConfig {
    /// The full run: papers.md's small reproduction (d 128, 2+2 layers), sized to finish within an hour
    /// on 2 cores. Measured on the 2-core dev machine: the teacher's 2000 steps take 671 s; each
    /// student ~300 s, of which its 300 steps take 160–190 s and the rest is 100 beam-4 decodes without
    /// a KV cache; 3161 s (52.7 min) in all.
    pub fn full() -> Self {
        RecipeConfig {
            name: "full".into(),
            model: BartConfig {
                vocab_size: VOCAB,
                hidden: 128,
                encoder_layers: 2,
                decoder_layers: 2,
                heads: 4,
                ffn_hidden: 512,
                max_positions: 96,
                norm_eps: 1e-5,
            },
            max_source: 96,
            max_target: 96,
            train_pairs: None,
            batch: 32,
            teacher_steps: 2000,
            student_steps: 300,
            teacher_lr: 2e-3,
            student_lr: 1e-3,
            eval_pairs: 100,
            beam: 4,
            seed: 0,
            tbt_form: TbtForm::Paper,
            students: Vec::new(),
            progress: false,
        }
    }

    /// A smoke run for CI: a tiny model on a few hundred pairs, ~2 minutes on the 2-core dev machine
    /// (the teacher's 600 steps ~35 s, then each student ~5 s of training and ~5 s of decoding).
    pub fn quick() -> Self {
        RecipeConfig {
            name: "quick".into(),
            model: BartConfig {
                hidden: 64,
                ffn_hidden: 256,
                max_positions: 64,
                ..RecipeConfig::full().model
            },
            max_source: 64,
            max_target: 64,
            train_pairs: Some(512),
            batch: 16,
            teacher_steps: 600,
            student_steps: 40,
            teacher_lr: 3e-3,
            eval_pairs: 16,
            ..RecipeConfig::full()
        }
    }

    fn validate(&self) -> Result<()> {
        if self.batch == 0
            || self.teacher_steps == 0
            || self.student_steps == 0
            || self.eval_pairs == 0
            || self.beam == 0
            || self.max_source == 0
            || self.max_target == 0
            || self.train_pairs == Some(0)
        {
            trit::bail!(
                "recipe tbt",
                "batch, steps, evaluation pairs, beam, lengths and training pairs must be positive"
            );
        }
        if self.max_source.max(self.max_target) > self.model.max_positions {
            trit::bail!(
                "recipe tbt",
                "sequences of {} source / {} target tokens need {} positions, the model has {}",
                self.max_source,
                self.max_target,
                self.max_source.max(self.max_target),
                self.model.max_positions
            );
        }
        for lr in [self.teacher_lr, self.student_lr] {
            if !(lr > 0.0 && lr.is_finite()) {
                trit::bail!("recipe tbt", "learning rates must be positive, got {lr}");
            }
        }
        Ok(())
    }
}

/// How a model's weights are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    FullPrecision,
    Tbt,
    Twn,
    Bwn,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::FullPrecision => "FP",
            Method::Tbt => "TBT",
            Method::Twn => "TWN",
            Method::Bwn => "BWN",
        })
    }
}

/// One student: its E-W-A bits, method and quantizers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setting {
    /// Embedding, weight and activation bits.
    pub bits: [u32; 3],
    pub method: Method,
    pub quant: BartQuant,
}

impl Setting {
    /// "2-2-8".
    pub fn label(&self) -> String {
        let [e, w, a] = self.bits;
        format!("{e}-{w}-{a}")
    }
}

/// The students of the paper's table: TBT then the baseline at each of 2-2-8, 2-2-2, 1-1-8, 1-1-1.
pub fn settings() -> Result<Vec<Setting>> {
    settings_with(TbtForm::Paper)
}

/// [`settings`] with TBT's quantizers in `form`.
pub fn settings_with(form: TbtForm) -> Result<Vec<Setting>> {
    let mut out = Vec::new();
    for bits in [[2, 2, 8], [2, 2, 2], [1, 1, 8], [1, 1, 1]] {
        let [e, w, a] = bits;
        out.push(Setting {
            bits,
            method: Method::Tbt,
            quant: BartQuant::tbt_with(e, w, a, form)?,
        });
        let (method, q) = match w {
            2 => (Method::Twn, Quantizer::Twn),
            _ => (Method::Bwn, Quantizer::Bwn),
        };
        out.push(Setting {
            bits,
            method,
            quant: BartQuant {
                embedding: Some(q),
                weight: q,
                act_bits: Some(a),
                low_bit_acts: LowBitActs::MinMax,
            },
        });
    }
    Ok(out)
}

/// The students `cfg` asks for (see [`RecipeConfig::students`]), in [`settings`] order.
pub fn selected_settings(cfg: &RecipeConfig) -> Result<Vec<Setting>> {
    let all = settings_with(cfg.tbt_form)?;
    let key = |s: &Setting| format!("{}:{}", s.label(), s.method).to_ascii_uppercase();
    for want in &cfg.students {
        let w = want.trim().to_ascii_uppercase();
        if !all.iter().any(|s| s.label() == w || key(s) == w) {
            trit::bail!(
                "recipe tbt",
                "no student {want:?}; choose E-W-A 2-2-8, 2-2-2, 1-1-8 or 1-1-1, optionally with                  :TBT, :TWN or :BWN"
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| {
            cfg.students.is_empty()
                || cfg.students.iter().any(|w| {
                    let w = w.trim().to_ascii_uppercase();
                    s.label() == w || key(s) == w
                })
        })
        .collect())
}

/// `$TRIT_DATA/wordnet-3.0`, by default under `$HOME/.cache/trit/data`, where
/// `scripts/fetch-wordnet.sh` puts WordNet.
pub fn default_wordnet_dir() -> Result<PathBuf> {
    Ok(crate::paths::data_dir("--data DIR")?.join("wordnet-3.0"))
}

/// The (input, gloss) pairs a run trains and scores on.
#[derive(Clone, Debug)]
pub struct Data {
    pub train: Vec<(String, String)>,
    pub eval: Vec<(String, String)>,
}

/// Shuffles the subsets independently of `--seed`, so every run scores the same test pairs.
const SUBSET_SEED: u64 = 0x7b7_5eed;

/// The first `n` of `pairs` after a seeded shuffle (all of them, shuffled, for `None`).
fn subset(mut pairs: Vec<(String, String)>, n: Option<usize>, seed: u64) -> Vec<(String, String)> {
    let mut rng = Rng::new(seed);
    for i in (1..pairs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        pairs.swap(i, j);
    }
    if let Some(n) = n {
        pairs.truncate(n);
    }
    pairs
}

impl Data {
    /// WordNet's training pairs (or `cfg.train_pairs` of them) and `cfg.eval_pairs` test pairs, read
    /// from `dir` (the `data.*` files).
    pub fn load(dir: &Path, cfg: &RecipeConfig) -> Result<Data> {
        cfg.validate()?;
        if !dir.join("data.noun").is_file() {
            trit::bail!(
                "recipe tbt",
                "no WordNet 3.0 data files in {}: run scripts/fetch-wordnet.sh (or set TRIT_DATA / pass --data)",
                dir.display()
            );
        }
        let synsets = wordnet::load(dir)?;
        let train = subset(
            wordnet::pairs(&synsets, Split::Train),
            cfg.train_pairs,
            SUBSET_SEED,
        );
        let eval = subset(
            wordnet::pairs(&synsets, Split::Test),
            Some(cfg.eval_pairs),
            SUBSET_SEED + 1,
        );
        if train.is_empty() || eval.len() < cfg.eval_pairs {
            trit::bail!(
                "recipe tbt",
                "{} has {} training and {} test pairs, fewer than the run needs ({} test pairs)",
                dir.display(),
                train.len(),
                eval.len(),
                cfg.eval_pairs
            );
        }
        Ok(Data { train, eval })
    }
}

/// A model's training: its loss at every step (before the update) and the time it took.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainLog {
    pub losses: Vec<f32>,
    pub seconds: f64,
}

impl TrainLog {
    /// The mean loss of the first and of the last tenth of the steps (at least one step each).
    pub fn first_last(&self) -> (f32, f32) {
        let w = (self.losses.len() / 10).max(1).min(self.losses.len());
        let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len().max(1) as f32;
        (
            mean(&self.losses[..w]),
            mean(&self.losses[self.losses.len() - w..]),
        )
    }
}

/// Scores of one model on the evaluation pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub rouge: Rouge,
    /// Generated tokens (EOS included) of the returned hypotheses.
    pub tokens: usize,
    /// Time spent in beam search.
    pub decode_seconds: f64,
    /// The first pair's generated text, to read what the model learned.
    pub sample: String,
}

impl Evaluation {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.decode_seconds.max(1e-9)
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelResult {
    /// "FP" for the teacher, else E-W-A ("2-2-8").
    pub setting: String,
    pub method: Method,
    pub train: TrainLog,
    pub eval: Evaluation,
    /// Bytes of the packed tensors (codes and per-row f32 scales): the token table and every linear
    /// weight of a student; 0 for the teacher.
    pub packed_bytes: usize,
    /// Bytes of everything kept in f32: every parameter of the teacher; a student's learned positions,
    /// LayerNorms, biases and activation steps.
    pub f32_bytes: usize,
}

impl ModelResult {
    pub fn bytes(&self) -> usize {
        self.packed_bytes + self.f32_bytes
    }
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub config: RecipeConfig,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub parameters: usize,
    /// The teacher first, then the students in [`settings`] order.
    pub rows: Vec<ModelResult>,
    pub seconds: f64,
}

const MAX_GRAD_NORM: f32 = 1.0;

fn adamw(lr: f32, weight_decay: f32) -> AdamWConfig {
    AdamWConfig {
        lr,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay,
    }
}

fn bar(cfg: &RecipeConfig, len: u64, what: &str) -> ProgressBar {
    if !cfg.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{prefix:>10} [{wide_bar}] {pos}/{len} | {msg} | ETA {eta}")
            .expect("the template is valid")
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

/// Each model draws its batches from a fresh RNG with this offset from `--seed`, so every student
/// sees the same batches in the same order.
const DATA_SALT: u64 = 0xda7a;

/// Batches drawn from this many batches' worth of random pairs sorted by length: a batch pads to its
/// longest member, and WordNet's lengths vary enough that random batches would be mostly padding.
const POOL_BATCHES: usize = 8;

/// Random training batches of similar lengths.
struct Batches<'a> {
    cfg: &'a RecipeConfig,
    pairs: &'a [(String, String)],
    rng: Rng,
    ready: Vec<Vec<(String, String)>>,
}

impl<'a> Batches<'a> {
    fn new(cfg: &'a RecipeConfig, pairs: &'a [(String, String)]) -> Self {
        Batches {
            cfg,
            pairs,
            rng: Rng::new(cfg.seed.wrapping_add(DATA_SALT)),
            ready: Vec::new(),
        }
    }

    fn next(&mut self) -> Result<Batch> {
        let (b, n) = (self.cfg.batch, self.pairs.len() as u64);
        if self.ready.is_empty() {
            let mut pool: Vec<(String, String)> = (0..b * POOL_BATCHES)
                .map(|_| self.pairs[self.rng.below(n) as usize].clone())
                .collect();
            // Targets first: they are the longer side and the decoder the costlier stack.
            let len = |(s, t): &(String, String)| {
                (
                    t.len().min(self.cfg.max_target),
                    s.len().min(self.cfg.max_source),
                )
            };
            pool.sort_by_key(len);
            self.ready = pool.chunks(b).map(<[_]>::to_vec).collect();
            // Taken from the back in random order, so lengths do not rise through the pool.
            for i in (1..self.ready.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                self.ready.swap(i, j);
            }
        }
        let pairs = self.ready.pop().unwrap_or_default();
        seq2seq::batch(
            &pairs,
            self.cfg.max_source,
            self.cfg.max_target,
            Device::Cpu,
        )
    }
}

/// One model's training.
struct Phase<'a> {
    what: &'a str,
    steps: u64,
    lr: f32,
    weight_decay: f32,
}

/// Trains `params` for `phase.steps` steps of warmup (a tenth) and cosine decay to a tenth of the peak
/// learning rate, with gradient clipping; `loss` computes a batch's loss tensor.
fn train_loop(
    cfg: &RecipeConfig,
    data: &Data,
    params: &ParamStore,
    phase: Phase<'_>,
    mut loss: impl FnMut(&Batch) -> Result<Tensor>,
) -> Result<TrainLog> {
    let Phase {
        what,
        steps,
        lr,
        weight_decay,
    } = phase;
    let named = params.all();
    let vars: Vec<Tensor> = named.iter().map(|(_, t)| t.clone()).collect();
    let mut opt = AdamW::new(named, adamw(lr, weight_decay))?;
    let schedule = LrSchedule::WarmupCosine {
        warmup: (steps / 10).max(1),
        total: steps,
        peak: lr,
        min: lr / 10.0,
    };
    let mut batches = Batches::new(cfg, &data.train);
    let progress = bar(cfg, steps, what);
    let started = Instant::now();
    let mut losses = Vec::with_capacity(steps as usize);
    for step in 0..steps {
        let batch = batches.next()?;
        opt.set_lr(schedule.lr_at(step));
        let l = loss(&batch)?;
        let value = l.to_scalar()?;
        if !value.is_finite() {
            trit::bail!(
                "recipe tbt",
                "{what}: the loss became {value} at step {step}; try a lower learning rate"
            );
        }
        let mut grads = l.backward()?;
        clip_grad_norm(&vars, &mut grads, MAX_GRAD_NORM)?;
        opt.step(&grads)?;
        losses.push(value);
        progress.inc(1);
        progress.set_message(format!("loss {value:.3}"));
    }
    progress.finish_and_clear();
    Ok(TrainLog {
        losses,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The teacher's cross-entropy on a batch.
fn teacher_loss(model: &Bart, b: &Batch) -> Result<Tensor> {
    let out = model.forward(&b.source, &b.source_mask, &b.decoder_input)?;
    let &[n, t, v] = out.logits.dims() else {
        trit::bail!("recipe tbt", "logits must be [batch, seq, vocab]");
    };
    out.logits
        .reshape((n * t, v))?
        .cross_entropy(&b.targets.flatten_all()?, Some(IGNORE))
}

/// A full-precision model on `params` (seeded by `cfg.seed`), trained with cross-entropy.
pub fn train_teacher(cfg: &RecipeConfig, data: &Data) -> Result<(ParamStore, Bart, TrainLog)> {
    cfg.validate()?;
    let params = ParamStore::new(cfg.seed, DType::F32, Device::Cpu);
    let model = Bart::new(&params, cfg.model)?;
    let log = train_loop(
        cfg,
        data,
        &params,
        Phase {
            what: "teacher",
            steps: cfg.teacher_steps,
            lr: cfg.teacher_lr,
            weight_decay: 0.01,
        },
        |b| teacher_loss(&model, b),
    )?;
    Ok((params, model, log))
}

/// What a cached teacher must have been trained with to stand in for this run's.
fn teacher_key(cfg: &RecipeConfig, data: &Data) -> String {
    format!(
        "{:?} source {} target {} train pairs {} batch {} steps {} lr {} seed {}",
        cfg.model,
        cfg.max_source,
        cfg.max_target,
        data.train.len(),
        cfg.batch,
        cfg.teacher_steps,
        cfg.teacher_lr,
        cfg.seed
    )
}

/// The teacher from `path` when the file holds one trained with this run's settings (its metadata
/// says so), else [`train_teacher`] and saved to `path` (atomically), with its training log.
pub fn cached_teacher(
    cfg: &RecipeConfig,
    data: &Data,
    path: &Path,
) -> Result<(ParamStore, Bart, TrainLog)> {
    let key = teacher_key(cfg, data);
    if path.exists() {
        let file = SafeTensors::open(path)?;
        let meta = file.metadata();
        if meta.get("tbt_teacher") == Some(&key) {
            let params = ParamStore::new(cfg.seed, DType::F32, Device::Cpu);
            let model = Bart::new(&params, cfg.model)?;
            params.load(&tensors(&file, Device::Cpu)?)?;
            let losses: Vec<f32> = meta
                .get("losses")
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            let seconds = meta
                .get("seconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            note(cfg, format!("teacher: read from {}", path.display()));
            return Ok((params, model, TrainLog { losses, seconds }));
        }
        note(
            cfg,
            format!(
                "{} holds a teacher for another setting: training a new one",
                path.display()
            ),
        );
    }
    let (params, model, log) = train_teacher(cfg, data)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| trit::Error::Msg(format!("{}: {e}", dir.display())))?;
    }
    let meta = BTreeMap::from([
        ("tbt_teacher".to_string(), key),
        (
            "losses".to_string(),
            serde_json::json!(log.losses).to_string(),
        ),
        ("seconds".to_string(), log.seconds.to_string()),
    ]);
    trit::io::tensors::save(path, &params.all(), &meta)?;
    note(cfg, format!("teacher: saved to {}", path.display()));
    Ok((params, model, log))
}

/// A student of `setting`, initialised from the teacher and distilled from it (TBT's loss) for
/// `cfg.student_steps`; returned unfrozen, with its parameters.
pub fn train_student(
    cfg: &RecipeConfig,
    data: &Data,
    teacher_params: &ParamStore,
    teacher: &Bart,
    setting: &Setting,
) -> Result<(ParamStore, Bart, TrainLog)> {
    cfg.validate()?;
    let params = ParamStore::new(cfg.seed.wrapping_add(1), DType::F32, Device::Cpu);
    let student = Bart::quantized(&params, cfg.model, setting.quant)?;
    init_student_from(teacher_params, &params)?;
    let what = format!("{} {}", setting.method, setting.label());
    // No weight decay: it would pull the activation steps α towards 0 along with the weights.
    let log = train_loop(
        cfg,
        data,
        &params,
        Phase {
            what: &what,
            steps: cfg.student_steps,
            lr: cfg.student_lr,
            weight_decay: 0.0,
        },
        |b| {
            let t = {
                let _no_grad = trit::no_grad();
                teacher.forward(&b.source, &b.source_mask, &b.decoder_input)?
            };
            let s = student.forward(&b.source, &b.source_mask, &b.decoder_input)?;
            Ok(distillation_loss(&s, &t, &b.targets, Some(IGNORE))?.total)
        },
    )?;
    Ok((params, student, log))
}

/// Beam search (`cfg.beam`, up to `cfg.max_target` tokens) on every pair's source, one at a time, and
/// ROUGE against the reference glosses.
pub fn evaluate(
    cfg: &RecipeConfig,
    model: &Bart,
    pairs: &[(String, String)],
    what: &str,
) -> Result<Evaluation> {
    let beam = BeamConfig {
        beam: cfg.beam,
        max_len: cfg.max_target,
        length_penalty: 1.0,
        eos: EOS,
    };
    let progress = bar(cfg, pairs.len() as u64, what);
    progress.set_message("decoding");
    let mut generated = Vec::with_capacity(pairs.len());
    let (mut tokens, mut time) = (0usize, Duration::ZERO);
    for (source, _) in pairs {
        let ids = seq2seq::source_ids(source, cfg.max_source);
        if ids.is_empty() {
            trit::bail!("recipe tbt", "an empty source text");
        }
        let t = Instant::now();
        let out = model.generate(&ids, BOS, beam)?;
        time += t.elapsed();
        tokens += out.len();
        generated.push(seq2seq::text_of(&out));
        progress.inc(1);
    }
    progress.finish_and_clear();
    let rouge = rouge::corpus(
        generated
            .iter()
            .zip(pairs)
            .map(|(g, (_, r))| (g.as_str(), r.as_str())),
    );
    Ok(Evaluation {
        rouge,
        tokens,
        decode_seconds: time.as_secs_f64(),
        sample: generated.first().cloned().unwrap_or_default(),
    })
}

fn note(cfg: &RecipeConfig, msg: String) {
    if cfg.progress {
        eprintln!("{msg}");
    }
}

fn summary(r: &ModelResult) -> String {
    let (first, last) = r.train.first_last();
    format!(
        "{:>10}: loss {first:.3} → {last:.3} in {:.0} s; ROUGE-L {:.2}; {} decode tok/s; e.g. {:?}",
        format!("{} {}", r.method, r.setting),
        r.train.seconds,
        100.0 * r.eval.rouge.rouge_l.f1,
        thousands(r.eval.tokens_per_second().round() as u64),
        r.eval.sample
    )
}

/// The whole recipe on `data`: the teacher, then every student of [`settings`], each scored as it
/// finishes (the students with packed weights).
/// The whole recipe. With `teacher_file`, the teacher is read from it when it was trained for this
/// run's model, data and teacher settings, else trained and saved there (see [`cached_teacher`]).
pub fn run(cfg: &RecipeConfig, data: &Data, teacher_file: Option<&Path>) -> Result<Report> {
    cfg.validate()?;
    let started = Instant::now();
    note(
        cfg,
        format!(
            "TBT recipe ({}): {}; {} training pairs, {} test pairs",
            cfg.name,
            cfg.model,
            data.train.len(),
            data.eval.len()
        ),
    );
    let (teacher_params, teacher, log) = match teacher_file {
        Some(path) => cached_teacher(cfg, data, path)?,
        None => train_teacher(cfg, data)?,
    };
    let parameters = teacher_params.num_parameters();
    let fp = ModelResult {
        setting: "FP".into(),
        method: Method::FullPrecision,
        eval: evaluate(cfg, &teacher, &data.eval, "FP eval")?,
        train: log,
        packed_bytes: 0,
        f32_bytes: 4 * parameters,
    };
    note(cfg, summary(&fp));
    let mut rows = vec![fp];
    for setting in selected_settings(cfg)? {
        let (params, mut student, log) =
            train_student(cfg, data, &teacher_params, &teacher, &setting)?;
        let packed = student.freeze()?;
        let what = format!("{} {} eval", setting.method, setting.label());
        let row = ModelResult {
            setting: setting.label(),
            method: setting.method,
            eval: evaluate(cfg, &student, &data.eval, &what)?,
            train: log,
            packed_bytes: packed.bytes,
            f32_bytes: 4 * (params.num_parameters() - packed.weights),
        };
        note(cfg, summary(&row));
        rows.push(row);
    }
    Ok(Report {
        config: cfg.clone(),
        train_pairs: data.train.len(),
        eval_pairs: data.eval.len(),
        parameters,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|r| {
                let (first, last) = r.train.first_last();
                json!({
                    "setting": r.setting,
                    "method": r.method.to_string(),
                    "rouge1": r.eval.rouge.rouge1.f1,
                    "rouge2": r.eval.rouge.rouge2.f1,
                    "rougeL": r.eval.rouge.rouge_l.f1,
                    "bytes": r.bytes(),
                    "packed_bytes": r.packed_bytes,
                    "f32_bytes": r.f32_bytes,
                    "decode_tokens_per_second": r.eval.tokens_per_second(),
                    "decode_tokens": r.eval.tokens,
                    "decode_seconds": r.eval.decode_seconds,
                    "train_loss_first": first,
                    "train_loss_last": last,
                    "train_seconds": r.train.seconds,
                    "sample": r.eval.sample,
                })
            })
            .collect();
        json!({
            "recipe": "tbt",
            "run": c.name,
            "model": c.model.to_string(),
            "parameters": self.parameters,
            "max_source": c.max_source,
            "max_target": c.max_target,
            "train_pairs": self.train_pairs,
            "eval_pairs": self.eval_pairs,
            "batch": c.batch,
            "teacher_steps": c.teacher_steps,
            "student_steps": c.student_steps,
            "teacher_lr": c.teacher_lr,
            "student_lr": c.student_lr,
            "beam": c.beam,
            "seed": c.seed,
            "threads": rayon::current_num_threads(),
            "seconds": self.seconds,
            "rows": rows,
        })
    }

    /// The results table for people, with what its columns mean.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "TBT recipe ({}), WordNet 3.0 definition modelling: {} ({} parameters)\n\
             teacher {} steps, each student {} steps of distillation, batch {}, {} training pairs; \
             ROUGE on {} test pairs, beam {}; {:.0} s on {} threads\n\n",
            c.name,
            c.model,
            thousands(self.parameters as u64),
            c.teacher_steps,
            c.student_steps,
            c.batch,
            thousands(self.train_pairs as u64),
            self.eval_pairs,
            c.beam,
            self.seconds,
            rayon::current_num_threads()
        );
        s.push_str(&format!(
            "{:<7} {:<6} {:>7} {:>7} {:>7} {:>11} {:>7} {:>12} {:>15}\n",
            "E-W-A", "method", "R-1", "R-2", "R-L", "bytes", "vs FP", "decode tok/s", "train loss"
        ));
        let fp_bytes = self.rows.first().map_or(1, ModelResult::bytes) as f64;
        for r in &self.rows {
            let (first, last) = r.train.first_last();
            s.push_str(&format!(
                "{:<7} {:<6} {:>7.2} {:>7.2} {:>7.2} {:>11} {:>6.1}× {:>12} {:>15}\n",
                r.setting,
                r.method.to_string(),
                100.0 * r.eval.rouge.rouge1.f1,
                100.0 * r.eval.rouge.rouge2.f1,
                100.0 * r.eval.rouge.rouge_l.f1,
                thousands(r.bytes() as u64),
                fp_bytes / r.bytes().max(1) as f64,
                thousands(r.eval.tokens_per_second().round() as u64),
                format!("{first:.3} → {last:.3}"),
            ));
        }
        s.push_str(concat!(
            "\nROUGE: F1 ×100 (rouge_score's tokenisation, no stemming).\n",
            "bytes: the teacher's parameters in f32; a student's token table and every linear weight\n",
            "  packed (2-bit ternary or 1-bit binary codes, one f32 scale per row), the rest (learned\n",
            "  positions, LayerNorms, biases, activation steps) in f32.\n",
            "decode tok/s: generated tokens per second of beam search, one test source at a time, every\n",
            "  step rerunning the decoder over the beams' prefixes (no KV cache). Students run the packed\n",
            "  kernels for every linear layer and the tied output projection; the quantizers of q, k, v\n",
            "  and the attention probabilities (products with no weights) run fake-quantized in f32.\n",
            "train loss: mean of the first and last tenth of the steps (cross-entropy for the teacher,\n",
            "  the distillation loss for the students).\n",
        ));
        s
    }
}
