//! A Llama-style decoder-only transformer (Touvron et al., 2023): token embedding, a stack of pre-norm
//! blocks (RMSNorm → grouped-query attention with rotary positions → residual; RMSNorm → SwiGLU MLP →
//! residual), a final RMSNorm and an output projection that may share the embedding table.
//!
//! Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.embed_tokens.weight`,
//! `model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`) so its checkpoints map one to one.
//!
//! Generation decodes incrementally through a per-layer KV cache ([`Llama::forward_cached`]) in a
//! format of the caller's choice (f32 by default, or f16/int8/int4, see [`KvFormat`]), kept on the
//! model's device: a model on a GPU decodes there, reading back only the logits it samples from.

use crate::generate::{sample, Sampling};
use std::fmt;
use trit::nn::kv_cache::{KvCache, KvFormat};
use trit::nn::packing::{positions_from_segments, IGNORE_INDEX};
use trit::nn::{
    AttentionConfig, BlockConfig, BlockQuant, DecoderBlock, Embedding, Init, Linear, MlpConfig,
    MlpKind, NormKind, ParamStore, RmsNorm, Rotary,
};
use trit::ops::attention::AttentionOptions;
use trit::ops::rope::{RopeStyle, RopeTable};
use trit::{DType, Result, Rng, Tensor};

/// The shape of a Llama model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    /// Query heads; head_dim = hidden / heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    pub ffn_hidden: usize,
    /// Longest sequence the rotary table covers.
    pub max_seq: usize,
    pub rope_base: f32,
    /// Multiplies positions before rotation (1.0: plain RoPE; < 1: position interpolation).
    pub rope_scale: f32,
    /// Which dims RoPE pairs: Hugging Face checkpoints rotate halves; GGUF files store q and k
    /// permuted for llama.cpp's interleaved pairs.
    pub rope_style: RopeStyle,
    pub norm_eps: f32,
    /// Reuse the embedding table as the output projection.
    pub tie_embeddings: bool,
}

/// The named presets the command line offers.
pub const PRESETS: [&str; 3] = ["tiny", "small", "demo"];

impl LlamaConfig {
    /// 64 wide, 2 layers, 4 query / 2 key-value heads, byte vocabulary: ~0.1 M parameters, for tests.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 256,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn_hidden: 192,
            max_seq: 64,
            rope_base: 10_000.0,
            rope_scale: 1.0,
            rope_style: RopeStyle::Half,
            norm_eps: 1e-5,
            tie_embeddings: true,
        }
    }

    /// 128 wide, 4 layers, 4 heads, byte vocabulary: ~0.8 M parameters.
    pub fn small() -> Self {
        LlamaConfig {
            hidden: 128,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            ffn_hidden: 384,
            max_seq: 128,
            ..LlamaConfig::tiny()
        }
    }

    /// The shape of the project's training benchmark (anchors.md): 256 wide, 4 layers, 4 heads, FFN 768,
    /// byte vocabulary, sequences of 256, tied embeddings: ~3.5 M parameters.
    pub fn demo() -> Self {
        LlamaConfig {
            hidden: 256,
            layers: 4,
            heads: 4,
            kv_heads: 4,
            ffn_hidden: 768,
            max_seq: 256,
            ..LlamaConfig::tiny()
        }
    }

    /// A preset by name (`tiny`, `small` or `demo`).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(LlamaConfig::tiny()),
            "small" => Ok(LlamaConfig::small()),
            "demo" => Ok(LlamaConfig::demo()),
            _ => trit::bail!(
                "LlamaConfig::preset",
                "unknown model size {name:?}; choose one of {}",
                PRESETS.join(", ")
            ),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads.max(1)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            self.vocab_size,
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.ffn_hidden,
            self.max_seq,
        ];
        if positive.contains(&0) {
            trit::bail!("Llama::new", "every size must be positive: {self}");
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            trit::bail!(
                "Llama::new",
                "hidden must divide into heads and heads into kv_heads: {self}"
            );
        }
        Ok(())
    }

    fn block(&self) -> Result<BlockConfig> {
        // GPT-2's initialisation: N(0, 0.02), with the projections that write into the residual stream
        // scaled by 1/√(2·layers) so the stream's variance does not grow with depth.
        let init = Init::Normal(0.02);
        let out_init = Init::Normal(0.02 / (2.0 * self.layers as f32).sqrt());
        let mut attn = AttentionConfig::new(self.hidden, self.heads, self.kv_heads)?;
        attn.init = init;
        attn.out_init = out_init;
        Ok(BlockConfig {
            attn,
            mlp: MlpConfig {
                kind: MlpKind::SwiGlu,
                hidden: self.hidden,
                ffn_hidden: self.ffn_hidden,
                init,
                out_init,
            },
            norm: NormKind::RmsNorm,
            norm_eps: self.norm_eps,
        })
    }
}

impl fmt::Display for LlamaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "d {} × {} layers, {} heads ({} kv), ffn {}, vocab {}, max_seq {}, rope θ {}",
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.ffn_hidden,
            self.vocab_size,
            self.max_seq,
            self.rope_base
        )?;
        if self.rope_scale != 1.0 {
            write!(f, " × positions {}", self.rope_scale)?;
        }
        Ok(())
    }
}

/// The model. Build it on a [`ParamStore`]; its parameters live there (for optimizers and checkpoints).
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderBlock>,
    norm: RmsNorm,
    /// `None` when the output projection is the embedding table.
    lm_head: Option<Linear>,
    rope: RopeTable,
    device: trit::Device,
    /// The activations' dtype (F32, or BF16 for mixed precision over the f32 weights).
    compute: DType,
}

impl Llama {
    pub fn new(params: &ParamStore, cfg: LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let model = params.pp("model");
        let embed_tokens = Embedding::with_init(
            &model.pp("embed_tokens"),
            cfg.vocab_size,
            cfg.hidden,
            Init::Normal(0.02),
        )?;
        let block = cfg.block()?;
        let layers = (0..cfg.layers)
            .map(|i| DecoderBlock::new(&model.pp(format!("layers.{i}")), &block))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&model.pp("norm"), cfg.hidden, cfg.norm_eps)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(Linear::with_init(
                &params.pp("lm_head"),
                cfg.hidden,
                cfg.vocab_size,
                false,
                Init::Normal(0.02),
                Init::Zeros,
            )?)
        };
        let rope = RopeTable::new(
            cfg.head_dim(),
            cfg.max_seq,
            cfg.rope_base,
            cfg.rope_scale,
            cfg.rope_style,
            params.device(),
        )?;
        Ok(Llama {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            device: params.device(),
            compute: DType::F32,
        })
    }

    /// Runs the blocks in `dtype` (BF16: mixed precision, the f32 weights cast at each use and the loss
    /// taken in f32), or F32 (the default).
    pub fn set_compute_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            trit::bail!(
                "Llama",
                "compute dtype must be f32, bf16 or f16, got {dtype}"
            );
        }
        self.compute = dtype;
        Ok(())
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Quantization-aware training (LLM-QAT): every block's linear layers and keys/values fake-quantize
    /// as `q` says, in training, in [`Llama::forward`] and in cached decoding; the embedding, the final
    /// norm and the output projection stay in full precision. `BlockQuant::default()` turns it off.
    pub fn set_fake_quant(&mut self, q: BlockQuant) -> Result<()> {
        self.layers
            .iter_mut()
            .try_for_each(|layer| layer.set_fake_quant(q))
    }

    /// `ids [batch, seq]` (integers below vocab_size, seq ≤ max_seq) -> logits `[batch, seq, vocab]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_impl(ids, None)
    }

    /// Forward over packed rows: `segments [batch, seq]` gives each token's document (a run of equal
    /// ids, as [`trit::nn::packing::pack`] makes them). Tokens attend only within their document and
    /// their rotary positions restart at each document, so every document's logits equal those of
    /// [`Llama::forward`] over that document alone.
    pub fn forward_packed(&self, ids: &Tensor, segments: &Tensor) -> Result<Tensor> {
        self.forward_impl(ids, Some(segments))
    }

    fn forward_impl(&self, ids: &Tensor, segments: Option<&Tensor>) -> Result<Tensor> {
        let &[batch, seq] = ids.dims() else {
            trit::bail!(
                "Llama::forward",
                "ids must be [batch, seq], got shape {}",
                ids.shape()
            );
        };
        if seq == 0 || seq > self.cfg.max_seq {
            trit::bail!(
                "Llama::forward",
                "sequence length {seq} is outside 1..={}",
                self.cfg.max_seq
            );
        }
        if segments.is_some_and(|s| s.dims() != [batch, seq]) {
            trit::bail!(
                "Llama::forward_packed",
                "segments must be [batch {batch}, seq {seq}] like the ids"
            );
        }
        let positions = match segments {
            Some(s) => positions_from_segments(s)?,
            // Positions stay on the host: the rotary op checks them there once per pass.
            None => Tensor::arange(0, seq as i64, trit::Device::Cpu)?,
        };
        let opts = AttentionOptions {
            causal: true,
            segments,
            rotary: Some(Rotary {
                table: &self.rope,
                positions: &positions,
            }),
            ..AttentionOptions::default()
        };
        let mut x = self.embed_tokens.forward(ids)?.to_dtype(self.compute)?;
        for layer in &self.layers {
            x = layer.forward_with(&x, &opts)?;
        }
        self.logits(&x)
    }

    /// The final norm and the output projection.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => self.embed_tokens.unembed(&x),
        }
    }

    /// One empty KV cache per layer for `batch` sequences, stored as `format`, with room reserved for
    /// `max_seq` tokens, on the model's device: host caches for a model on the CPU, dense ones on its
    /// GPU (every format; see [`KvCache::dense`]).
    pub fn kv_caches(&self, batch: usize, format: KvFormat) -> Result<Vec<KvCache>> {
        let c = &self.cfg;
        (0..c.layers)
            .map(|_| {
                KvCache::on_device(
                    batch,
                    c.kv_heads,
                    c.head_dim(),
                    format,
                    c.max_seq,
                    self.device,
                )
            })
            .collect()
    }

    /// Incremental forward: `ids [batch, seq]` are the tokens that follow the ones already in `caches`
    /// (one per layer, from [`Llama::kv_caches`]); they are appended to the caches. Returns their logits
    /// `[batch, seq, vocab]`, equal (up to the cache format's rounding) to the last `seq` positions of
    /// [`Llama::forward`] over the whole sequence. Not differentiable. On an error (caches that do not
    /// fit, more than max_seq tokens in all, ids outside the vocabulary) the caches are left unchanged.
    pub fn forward_cached(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        self.forward_cached_impl(ids, caches, false)
    }

    /// [`Llama::forward_cached`] returning only the last position's logits `[batch, 1, vocab]`: what
    /// decoding needs, without the output projection of every prompt token.
    pub fn forward_cached_last(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        self.forward_cached_impl(ids, caches, true)
    }

    fn forward_cached_impl(
        &self,
        ids: &Tensor,
        caches: &mut [KvCache],
        last_only: bool,
    ) -> Result<Tensor> {
        let &[batch, seq] = ids.dims() else {
            trit::bail!(
                "Llama::forward_cached",
                "ids must be [batch, seq], got shape {}",
                ids.shape()
            );
        };
        let c = &self.cfg;
        let cached = caches.first().map_or(0, KvCache::len);
        let fits = caches.len() == c.layers
            && caches.iter().all(|k| {
                [k.batch(), k.heads(), k.head_dim(), k.len()]
                    == [batch, c.kv_heads, c.head_dim(), cached]
            });
        if !fits {
            let shapes: Vec<_> = caches
                .iter()
                .map(|k| [k.batch(), k.heads(), k.len(), k.head_dim()])
                .collect();
            trit::bail!(
                "Llama::forward_cached",
                "need {} caches of [batch {batch}, kv heads {}, equal lengths, head_dim {}], got {shapes:?}",
                c.layers,
                c.kv_heads,
                c.head_dim()
            );
        }
        if let Some(k) = caches.iter().find(|k| k.device() != self.device) {
            trit::bail!(
                "Llama::forward_cached",
                "the model lives on {} but a cache on {}; make the caches with Llama::kv_caches",
                self.device,
                k.device()
            );
        }
        if seq == 0 || cached + seq > c.max_seq {
            trit::bail!(
                "Llama::forward_cached",
                "{seq} new tokens after {cached} cached: need 1 ≤ new and a total ≤ max_seq {}",
                c.max_seq
            );
        }
        let mut x = self.embed_tokens.forward(ids)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward_cached(&x, Some(&self.rope), cache)?;
        }
        if last_only {
            x = x.narrow(1, seq - 1, 1)?;
        }
        self.logits(&x)
    }

    /// Mean next-token cross-entropy of `forward(ids)` against `targets [batch, seq]`.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.mean_loss(&self.forward(ids)?, targets, None)
    }

    /// Mean cross-entropy of [`Llama::forward_packed`] over the targets that are not
    /// [`IGNORE_INDEX`] (a document's last token and padding have none).
    pub fn loss_packed(&self, ids: &Tensor, targets: &Tensor, segments: &Tensor) -> Result<Tensor> {
        self.mean_loss(
            &self.forward_packed(ids, segments)?,
            targets,
            Some(IGNORE_INDEX as i64),
        )
    }

    fn mean_loss(&self, logits: &Tensor, targets: &Tensor, ignore: Option<i64>) -> Result<Tensor> {
        let rows = logits.elem_count() / self.cfg.vocab_size;
        logits
            .reshape((rows, self.cfg.vocab_size))?
            .to_dtype(DType::F32)?
            .cross_entropy(&targets.flatten_all()?, ignore)
    }

    /// Perplexity on the tokens `ids`: they are cut into windows of `ctx` (at most max_seq), each run
    /// from scratch, and every token after a window's first is scored by its NLL given the window
    /// before it (log-softmax in f64). Returns (perplexity, tokens scored).
    pub fn perplexity(&self, ids: &[u32], ctx: usize) -> Result<(f64, usize)> {
        let ctx = ctx.min(self.cfg.max_seq);
        if ctx < 2 || ids.len() < 2 {
            trit::bail!(
                "Llama::perplexity",
                "needs at least 2 tokens and a window of 2; got {} tokens, window {ctx}",
                ids.len()
            );
        }
        let _no_grad = trit::no_grad();
        let (mut total, mut scored) = (0f64, 0usize);
        for window in ids.chunks(ctx).filter(|w| w.len() >= 2) {
            let input: Vec<i32> = window.iter().map(|&t| t as i32).collect();
            let n = input.len();
            let logits = self
                .forward(&Tensor::from_vec(input, (1, n), self.device)?)?
                .try_to_vec_f32()?;
            let vocab = logits.len() / n;
            for (t, row) in logits.chunks_exact(vocab).take(n - 1).enumerate() {
                let m = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
                let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                total += m + z.ln() - row[window[t + 1] as usize] as f64;
                scored += 1;
            }
        }
        Ok(((total / scored as f64).exp(), scored))
    }

    /// Continues `prompt` by `n` tokens and returns the new ones. Temperature 0 picks the most likely token
    /// (greedy); otherwise tokens are sampled from softmax(logits / temperature), restricted to the
    /// `top_k` most likely when given. Decodes through an f32 KV cache; see [`Llama::generate_with_kv`].
    pub fn generate(
        &self,
        prompt: &[u32],
        n: usize,
        temperature: f32,
        top_k: Option<usize>,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        self.generate_with_kv(prompt, n, temperature, top_k, KvFormat::F32, rng)
    }

    /// [`Llama::generate`] with the KV cache stored as `kv`. The prompt (its last max_seq tokens) is
    /// encoded in one pass, then each step runs only the newest token against the cache. When the
    /// context outgrows max_seq, the cache restarts from the most recent max_seq / 2 tokens (re-encoded
    /// at positions from 0), so a long generation pays one such prefill every max_seq / 2 tokens rather
    /// than a full re-run per token.
    pub fn generate_with_kv(
        &self,
        prompt: &[u32],
        n: usize,
        temperature: f32,
        top_k: Option<usize>,
        kv: KvFormat,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let sampling = Sampling {
            temperature,
            top_k,
            ..Sampling::default()
        };
        sampling.validate()?;
        self.decode_loop(prompt, n, kv, |logits, context| {
            Ok((sample(logits, &sampling, context, rng), true))
        })
    }

    /// The decoding loop under every generation call: up to `n` times, runs the tokens not yet in
    /// the caches, hands the last position's logits and the whole context to `step`, and appends the
    /// token it returns (stopping after it when it says so). Returns the new tokens.
    pub(crate) fn decode_loop(
        &self,
        prompt: &[u32],
        n: usize,
        kv: KvFormat,
        mut step: impl FnMut(&[f32], &[u32]) -> Result<(u32, bool)>,
    ) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            trit::bail!("Llama::generate", "the prompt must have at least one token");
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            trit::bail!(
                "Llama::generate",
                "prompt token {t} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let _no_grad = trit::no_grad();
        let window = self.cfg.max_seq;
        let mut caches = self.kv_caches(1, kv)?;
        let mut tokens = prompt.to_vec();
        // tokens[first..first + cache length] are in the caches.
        let mut first = 0;
        for _ in 0..n {
            if tokens.len() - first > window {
                let keep = if caches[0].is_empty() {
                    window
                } else {
                    (window / 2).max(1)
                };
                caches.iter_mut().for_each(KvCache::clear);
                first = tokens.len() - keep;
            }
            let new = &tokens[first + caches[0].len()..];
            let ids: Vec<i32> = new.iter().map(|&t| t as i32).collect();
            let ids = Tensor::from_vec(ids, (1, new.len()), self.device())?;
            // The last position's logits only: one row read back to the host per token.
            let logits = self
                .forward_cached_last(&ids, &mut caches)?
                .to_dtype(DType::F32)?
                .to_vec::<f32>()?;
            let (t, more) = step(&logits, &tokens)?;
            tokens.push(t);
            if !more {
                break;
            }
        }
        Ok(tokens.split_off(prompt.len()))
    }

    /// Where the model's parameters live (and its activations and KV caches with them).
    pub fn device(&self) -> trit::Device {
        self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trit::Device;

    fn tiny() -> Result<(ParamStore, Llama)> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let model = Llama::new(&ps, LlamaConfig::tiny())?;
        Ok((ps, model))
    }

    #[test]
    fn demo_preset_has_the_benchmark_parameter_count() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        Llama::new(&ps, LlamaConfig::demo())?;
        // embed 256·256 + 4 × (attn 4·256² + mlp 3·256·768 + 2 norms·256) + final norm 256.
        assert_eq!(
            ps.num_parameters(),
            65_536 + 4 * (262_144 + 589_824 + 512) + 256
        );
        assert!(ps.get("model.layers.3.mlp.down_proj.weight").is_some());
        assert!(ps.get("lm_head.weight").is_none());
        Ok(())
    }

    #[test]
    fn untied_model_has_an_lm_head_and_presets_are_checked() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let cfg = LlamaConfig {
            tie_embeddings: false,
            ..LlamaConfig::tiny()
        };
        Llama::new(&ps, cfg)?;
        assert_eq!(ps.get("lm_head.weight").unwrap().dims(), [256, 64]);
        assert_eq!(LlamaConfig::preset("small")?, LlamaConfig::small());
        let err = LlamaConfig::preset("huge").unwrap_err().to_string();
        assert!(err.contains("tiny, small, demo"), "{err}");
        let bad = LlamaConfig {
            kv_heads: 3,
            ..LlamaConfig::tiny()
        };
        assert!(Llama::new(&ParamStore::new(0, DType::F32, Device::Cpu), bad).is_err());
        Ok(())
    }

    /// Packing: every document's logits, loss and gradient equal those of running it alone through the
    /// plain forward (arange positions, one causal sequence), so nothing leaks across documents.
    #[test]
    fn a_packed_batch_equals_its_documents_run_one_by_one() -> Result<()> {
        use trit::nn::packing::pack;
        let (ps, model) = tiny()?;
        let v = LlamaConfig::tiny().vocab_size as u32;
        let mut rng = Rng::new(3);
        let docs: Vec<Vec<u32>> = [9, 3, 17, 1, 30, 5, 12]
            .iter()
            .map(|&n| (0..n).map(|_| rng.below(v as u64) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let packed = pack(&refs, 24, 0, Device::Cpu)?;
        assert!(
            packed.placements.len() > docs.len(),
            "the 30-token document is cut"
        );
        assert!(
            packed.placements.iter().any(|p| p.start > 0),
            "rows share documents"
        );
        let logits = model.forward_packed(&packed.ids, &packed.segments)?;
        let vocab = v as usize;
        let (rows, seq) = (packed.ids.dims()[0], packed.ids.dims()[1]);
        let all = logits.to_vec_f32();
        let targets = packed.targets.to_vec_i64();
        for p in &packed.placements {
            let piece = &docs[p.doc][p.offset..p.offset + p.len];
            let ids: Vec<i32> = piece.iter().map(|&t| t as i32).collect();
            let alone = model
                .forward(&Tensor::from_vec(ids, (1, p.len), Device::Cpu)?)?
                .to_vec_f32();
            let at = (p.row * seq + p.start) * vocab;
            for (i, (g, w)) in all[at..at + p.len * vocab].iter().zip(&alone).enumerate() {
                assert!(
                    (g - w).abs() < 1e-4,
                    "doc {} piece at {}: logit {i}: packed {g} vs alone {w}",
                    p.doc,
                    p.offset
                );
            }
            // The piece's own loss: keep only its targets in the packed batch.
            let mut own = vec![IGNORE_INDEX; rows * seq];
            let span = p.row * seq + p.start..p.row * seq + p.start + p.len;
            for i in span.clone() {
                own[i] = targets[i] as i32;
            }
            if own.iter().all(|&t| t == IGNORE_INDEX) {
                continue;
            }
            let own = Tensor::from_vec(own, (rows, seq), Device::Cpu)?;
            let packed_loss = model.loss_packed(&packed.ids, &own, &packed.segments)?;
            let ids: Vec<i32> = piece[..p.len - 1].iter().map(|&t| t as i32).collect();
            let next: Vec<i32> = piece[1..].iter().map(|&t| t as i32).collect();
            let n = p.len - 1;
            let alone_loss = model.loss(
                &Tensor::from_vec(ids, (1, n), Device::Cpu)?,
                &Tensor::from_vec(next, (1, n), Device::Cpu)?,
            )?;
            let (a, b) = (packed_loss.to_scalar()?, alone_loss.to_scalar()?);
            assert!(
                (a - b).abs() < 1e-5,
                "doc {}: packed loss {a} vs alone {b}",
                p.doc
            );
            let (ga, gb) = (packed_loss.backward()?, alone_loss.backward()?);
            for (name, param) in ps.all() {
                let (x, y) = (ga.get(&param), gb.get(&param));
                let (x, y) = (x.unwrap().to_vec_f32(), y.unwrap().to_vec_f32());
                let err = x
                    .iter()
                    .zip(&y)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "doc {}: gradient of {name} differs by {err}",
                    p.doc
                );
            }
        }
        Ok(())
    }

    #[test]
    fn forward_shapes_initial_loss_and_causality() -> Result<()> {
        let (_, model) = tiny()?;
        let tokens: Vec<i32> = (0..2 * 10).map(|i| i * 37 % 255).collect();
        let ids = Tensor::from_vec(tokens.clone(), (2, 10), Device::Cpu)?;
        let logits = model.forward(&ids)?;
        assert_eq!(logits.dims(), [2, 10, 256]);
        // Small initial weights give near-uniform predictions: loss ≈ ln 256. (Targets differ from the
        // inputs: with tied embeddings a token predicting itself scores |e|·√d above the rest.)
        let next: Vec<i32> = tokens.iter().map(|t| t + 1).collect();
        let targets = Tensor::from_vec(next, (2, 10), Device::Cpu)?;
        let loss = model.loss(&ids, &targets)?.to_scalar()?;
        assert!((loss - 256f32.ln()).abs() < 0.05, "{loss}");
        // Changing the last token leaves every earlier position's logits unchanged.
        let mut changed = tokens;
        changed[9] = 1;
        let changed = Tensor::from_vec(changed, (2, 10), Device::Cpu)?;
        let (a, b) = (logits.to_vec_f32(), model.forward(&changed)?.to_vec_f32());
        assert_eq!(a[..9 * 256], b[..9 * 256]);
        assert_ne!(a[9 * 256..10 * 256], b[9 * 256..10 * 256]);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let (_, model) = tiny()?;
        let too_long = Tensor::zeros((1, 65), DType::I32, Device::Cpu)?;
        assert!(model.forward(&too_long).is_err());
        let out_of_vocab = Tensor::from_vec(vec![256i32], (1, 1), Device::Cpu)?;
        assert!(model.forward(&out_of_vocab).is_err());
        let mut rng = Rng::new(0);
        assert!(model.generate(&[], 3, 0.0, None, &mut rng).is_err());
        assert!(model.generate(&[300], 3, 0.0, None, &mut rng).is_err());
        assert!(model.generate(&[1], 3, -1.0, None, &mut rng).is_err());
        assert!(model.generate(&[1], 3, 1.0, Some(0), &mut rng).is_err());
        Ok(())
    }

    #[test]
    fn generation_is_greedy_at_zero_temperature_and_seeded_otherwise() -> Result<()> {
        let (_, model) = tiny()?;
        let prompt = [65u32, 110, 100];
        let greedy = model.generate(&prompt, 5, 0.0, None, &mut Rng::new(1))?;
        assert_eq!(greedy.len(), 5);
        // Greedy: each token is the argmax of a full forward over what came before.
        let mut seq = prompt.to_vec();
        for &t in &greedy {
            let ids: Vec<i32> = seq.iter().map(|&t| t as i32).collect();
            let ids = Tensor::from_vec(ids, (1, seq.len()), Device::Cpu)?;
            let last = model
                .forward(&ids)?
                .narrow(1, seq.len() - 1, 1)?
                .flatten_all()?;
            assert_eq!(last.argmax(0)?.to_vec_i64(), vec![t as i64]);
            seq.push(t);
        }
        let a = model.generate(&prompt, 8, 1.0, Some(10), &mut Rng::new(2))?;
        let b = model.generate(&prompt, 8, 1.0, Some(10), &mut Rng::new(2))?;
        assert_eq!(a, b);
        // Longer than max_seq: the cache restarts from the recent half of the context.
        assert_eq!(
            model.generate(&[1], 70, 0.0, None, &mut Rng::new(3))?.len(),
            70
        );
        Ok(())
    }

    #[test]
    fn past_max_seq_generation_restarts_from_the_recent_half() -> Result<()> {
        let model = peaked(2)?;
        let prompt = [1u32, 2, 3];
        let generated = model.generate(&prompt, 150, 0.0, None, &mut Rng::new(0))?;
        let (window, mut first) = (model.config().max_seq, 0);
        let mut seq = prompt.to_vec();
        for &t in &generated {
            if seq.len() - first > window {
                first = seq.len() - window / 2;
            }
            let ctx: Vec<i32> = seq[first..].iter().map(|&t| t as i32).collect();
            let n = ctx.len();
            let ids = Tensor::from_vec(ctx, (1, n), Device::Cpu)?;
            let last = model.forward(&ids)?.narrow(1, n - 1, 1)?.flatten_all()?;
            assert_eq!(
                last.argmax(0)?.to_vec_i64(),
                vec![t as i64],
                "at {}",
                seq.len()
            );
            seq.push(t);
        }
        // The context restarted at 65, 98 and 131 tokens.
        assert_eq!(first, 131 - window / 2);
        Ok(())
    }

    /// A tiny model with weights large enough that its logits are far from uniform, so that cached and
    /// uncached decoding have something to disagree about.
    fn peaked(kv_heads: usize) -> Result<Llama> {
        let ps = ParamStore::new(5, DType::F32, Device::Cpu);
        let cfg = LlamaConfig {
            kv_heads,
            ..LlamaConfig::tiny()
        };
        let model = Llama::new(&ps, cfg)?;
        let mut rng = Rng::new(6);
        for (name, p) in ps.all() {
            let mean = if name.contains("norm") { 1.0 } else { 0.0 };
            p.set(&Tensor::randn(p.dims(), mean, 0.15, &mut rng, Device::Cpu)?)?;
        }
        Ok(model)
    }

    /// Greedy tokens and per-step logits of cached decoding.
    fn cached_steps(
        model: &Llama,
        prompt: &[u32],
        n: usize,
        kv: KvFormat,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
        let mut caches = model.kv_caches(1, kv)?;
        let mut seq = prompt.to_vec();
        let mut new = prompt.to_vec();
        let mut all = Vec::new();
        for _ in 0..n {
            let ids: Vec<i32> = new.iter().map(|&t| t as i32).collect();
            let ids = Tensor::from_vec(ids, (1, new.len()), Device::Cpu)?;
            let logits = model.forward_cached(&ids, &mut caches)?;
            let last = logits.narrow(1, new.len() - 1, 1)?.to_vec_f32();
            let t = sample(&last, &Sampling::default(), &seq, &mut Rng::new(0));
            all.push(last);
            seq.push(t);
            new = vec![t];
        }
        Ok((seq.split_off(prompt.len()), all))
    }

    #[test]
    fn cached_decoding_matches_the_full_forward() -> Result<()> {
        for kv_heads in [4, 2, 1] {
            let model = peaked(kv_heads)?;
            let prompt = [72u32, 101, 108, 108, 111, 44, 32];
            let (tokens, logits) = cached_steps(&model, &prompt, 20, KvFormat::F32)?;
            let mut seq = prompt.to_vec();
            for (t, got) in tokens.iter().zip(&logits) {
                let ids: Vec<i32> = seq.iter().map(|&t| t as i32).collect();
                let ids = Tensor::from_vec(ids, (1, seq.len()), Device::Cpu)?;
                let want = model
                    .forward(&ids)?
                    .narrow(1, seq.len() - 1, 1)?
                    .to_vec_f32();
                let spread = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert!(spread > 1.0, "logits too flat to test anything: {spread}");
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "kv {kv_heads} at {}: {g} vs {w}",
                        seq.len()
                    );
                }
                seq.push(*t);
            }
            // `generate` decodes through the cache and picks the same tokens.
            let generated = model.generate(&prompt, 20, 0.0, None, &mut Rng::new(1))?;
            assert_eq!(generated, tokens);
        }
        Ok(())
    }

    /// The dense caches a model on a GPU decodes with, run on the CPU: the logits of the host caches at
    /// every step (f32 and f16, a prompt chunk then single tokens, grouped-query ratios 1, 2 and 4),
    /// growing from room for 2 tokens.
    #[test]
    fn dense_caches_decode_like_host_caches() -> Result<()> {
        for kv_heads in [4, 2, 1] {
            let model = peaked(kv_heads)?;
            let c = *model.config();
            let prompt = [72u32, 101, 108, 108, 111, 44, 32];
            // f16: the two paths' f32 rounding differences can round a cached value to the
            // neighbouring f16 (a relative 2⁻¹¹), so their logits drift apart a little more.
            for (kv, tol) in [(KvFormat::F32, 1e-4), (KvFormat::F16, 1e-3)] {
                let mut host = model.kv_caches(1, kv)?;
                let mut dense = (0..c.layers)
                    .map(|_| KvCache::dense(1, c.kv_heads, c.head_dim(), kv, 2, Device::Cpu))
                    .collect::<Result<Vec<_>>>()?;
                let mut new = prompt.to_vec();
                for step in 0..12 {
                    let ids: Vec<i32> = new.iter().map(|&t| t as i32).collect();
                    let ids = Tensor::from_vec(ids, (1, new.len()), Device::Cpu)?;
                    let want = model.forward_cached(&ids, &mut host)?.to_vec_f32();
                    let got = model.forward_cached(&ids, &mut dense)?.to_vec_f32();
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < tol,
                            "kv heads {kv_heads}, {kv}, step {step}: {g} vs {w}"
                        );
                    }
                    let last = &want[want.len() - c.vocab_size..];
                    new = vec![sample(last, &Sampling::default(), &[], &mut Rng::new(0))];
                }
                assert!(dense
                    .iter()
                    .all(|k| k.is_dense() && k.len() == host[0].len()));
            }
        }
        Ok(())
    }

    #[test]
    fn quantized_caches_stay_close_to_the_f32_one() -> Result<()> {
        let model = peaked(2)?;
        let prompt = [84u32, 104, 101, 32, 113, 117, 105, 99, 107];
        let (tokens, exact) = cached_steps(&model, &prompt, 12, KvFormat::F32)?;
        for (kv, tol) in [
            (KvFormat::F16, 2e-3),
            (KvFormat::Int8 { group: 16 }, 3e-2),
            (KvFormat::Int4 { group: 16 }, 0.5),
        ] {
            // Feed the f32 run's tokens so both see the same sequence.
            let mut caches = model.kv_caches(1, kv)?;
            let mut seq = prompt.to_vec();
            seq.extend(&tokens[..11]);
            let ids: Vec<i32> = seq.iter().map(|&t| t as i32).collect();
            let ids = Tensor::from_vec(ids, (1, seq.len()), Device::Cpu)?;
            let got = model.forward_cached(&ids, &mut caches)?;
            let spread = exact[0].iter().fold(0f32, |a, v| a.max(v.abs()));
            for (step, want) in exact.iter().enumerate() {
                let got = got.narrow(1, prompt.len() - 1 + step, 1)?.to_vec_f32();
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                assert!(
                    err <= tol * spread,
                    "{kv} step {step}: max error {err}, logits up to {spread}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn forward_cached_rejects_caches_that_do_not_fit() -> Result<()> {
        let (_, model) = tiny()?;
        let ids = Tensor::from_vec(vec![1i32, 2, 3], (1, 3), Device::Cpu)?;
        let mut too_few = model.kv_caches(1, KvFormat::F32)?;
        too_few.pop();
        assert!(model.forward_cached(&ids, &mut too_few).is_err());
        let mut wrong_batch = model.kv_caches(2, KvFormat::F32)?;
        assert!(model.forward_cached(&ids, &mut wrong_batch).is_err());
        let mut caches = model.kv_caches(1, KvFormat::Int8 { group: 16 })?;
        model.forward_cached(&ids, &mut caches)?;
        let long = Tensor::zeros((1, 62), DType::I32, Device::Cpu)?;
        let err = model.forward_cached(&long, &mut caches).unwrap_err();
        assert!(err.to_string().contains("max_seq 64"), "{err}");
        let bad = Tensor::from_vec(vec![1i32, 999], (1, 2), Device::Cpu)?;
        assert!(model.forward_cached(&bad, &mut caches).is_err());
        assert!(caches.iter().all(|c| c.len() == 3));
        Ok(())
    }
}
