//! # trit-models
//!
//! Architectures, training recipes and the `trit` command-line tool, built on the `trit` engine.
//!
//! - [`llama`]: a Llama-style decoder (RMSNorm, grouped-query attention with RoPE, SwiGLU).
//! - [`llama_gguf`]: a Llama-architecture GGUF file (SmolLM2) as a [`llama::Llama`].
//! - [`generate`]: sampling (temperature, top-k, top-p, repetition penalty), stop tokens, streaming, ChatML.
//! - [`llm`]: a GGUF language model with its tokenizer and template, streaming to a writer.
//! - [`data`]: the bundled King James Bible corpus and byte-level batching.
//! - [`demo`]: the training run behind `trit demo` / `trit train` and the training benchmark.
//! - [`bench`]: GEMM throughput against a peer measured in the same run (`trit bench matmul`).
//! - [`qbench`]: packed low-bit matmul against trit's f32 matmul (`trit bench qmatmul`).
//! - [`tokenizer`]: byte-level BPE read from GGUF metadata; BERT's WordPiece.
//! - [`bert`]: a BERT encoder with sentence-transformers pooling (all-MiniLM-L6-v2).
//! - [`embed`]: sentence embeddings as JSON lines (`trit embed`).
//! - [`inspect`]: the metadata and tensor table of a GGUF or safetensors file (`trit inspect`).
//! - [`genbench`]: prompt and generation tokens/s of a GGUF model (`trit bench generate`).
//! - `gpubench` (feature `cuda`): GPU kernel bandwidth, GEMM TFLOP/s and training tokens/s (`trit bench gpu`).
//! - `qgpubench` (feature `cuda`): the packed low-bit CUDA kernels against cuBLAS bf16 (`trit bench qgpu`).
//! - `flashbench` (feature `cuda`): the CUDA flash attention kernels' TFLOP/s against FlashAttention-2
//!   and cuDNN (`trit bench flash`).
//! - [`wordnet`]: WordNet 3.0 definition modelling (input: a synset's words and example; target: its
//!   gloss), split 90/5/5, the TBT recipe's task.
//! - [`bart`]: a BART-style encoder-decoder returning the hidden states and attention maps that
//!   distillation compares (the TBT recipe's model).
//! - [`beam`]: beam search over any autoregressive decoder (fairseq/Hugging Face semantics).
//! - [`tbt`]: the TBT recipe's distillation objective (CE + soft CE + hidden-state and attention MSE).
//! - [`seq2seq`]: byte-level encoder-decoder batches (BOS/EOS/PAD, shifted decoder inputs).
//! - [`rouge`]: ROUGE-1/2/L between generated and reference texts (the TBT recipe's metric).
//! - [`tbt_recipe`]: `trit recipe tbt`, the TBT paper's table end to end: the FP teacher, TBT and TWN/BWN
//!   students at 2-2-8, 2-2-2, 1-1-8, 1-1-1, ROUGE, packed size and decoding speed.
//! - [`llm_qat_recipe`]: `trit recipe llm-qat`, LLM-QAT on SmolLM2-135M: data-free generation, KL-distilled
//!   QAT against round-to-nearest PTQ at W4A16KV16/W4A8KV8/W4A8KV4, held-out perplexity, packed size and
//!   decoding speed.
//! - [`paths`]: the default folders of fetched models and data (`$TRIT_MODELS`, `$TRIT_DATA`).
//! - [`attnbench`]: flash attention against the naive formulation, and decode attention over each KV
//!   cache format (`trit bench attention`).

pub mod attnbench;
pub mod bart;
pub mod beam;
pub mod bench;
pub mod bert;
pub mod data;
pub mod demo;
pub mod embed;
#[cfg(feature = "cuda")]
pub mod flashbench;
pub mod genbench;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpubench;
pub mod inspect;
pub mod llama;
pub mod llama_gguf;
pub mod llm;
pub mod llm_qat_recipe;
pub mod paths;
pub mod qbench;
#[cfg(feature = "cuda")]
pub mod qgpubench;
pub mod rouge;
pub mod seq2seq;
pub mod tbt;
pub mod tbt_recipe;
pub mod tokenizer;
pub mod wordnet;
