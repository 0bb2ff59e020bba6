//! Multi-head self-attention with grouped-query heads (GQA), optional rotary positions and a causal mask.
//!
//! The middle is [`Tensor::flash_attention`] (tiled, O(seq·d) memory, its own backward, RoPE fused in),
//! fed straight from the projections. [`Attention::forward_cached`] is the incremental-decoding path: it
//! projects only the new tokens and attends over a [`KvCache`] read in its stored format (not
//! differentiable).

use super::kv_cache::KvCache;
use super::linear::{FakeQuant, Linear};
use super::params::{Init, ParamStore};
use crate::error::{Error, Result};
use crate::ops::attention::AttentionOptions;
use crate::ops::rope::RopeTable;
use crate::quant::quantizers::{Granularity, Quantizer};
use crate::tensor::Tensor;

/// Sizes and initialisation of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionConfig {
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads` must be a multiple. Equal to `heads` for plain multi-head attention, 1
    /// for multi-query attention.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Biases on the q/k/v/o projections (GPT-2, BERT) or none (Llama).
    pub bias: bool,
    /// Initialiser of the q/k/v projections.
    pub init: Init,
    /// Initialiser of the output projection, which writes into the residual stream.
    pub out_init: Init,
}

impl AttentionConfig {
    /// `heads` query heads of `hidden / heads` dims each, sharing `kv_heads` key/value heads; no biases,
    /// weights N(0, 0.02).
    pub fn new(hidden: usize, heads: usize, kv_heads: usize) -> Result<Self> {
        if heads == 0 || !hidden.is_multiple_of(heads) {
            crate::bail!(
                "AttentionConfig",
                "hidden {hidden} is not divisible by {heads} heads"
            );
        }
        Ok(AttentionConfig {
            hidden,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            bias: false,
            init: Init::Normal(0.02),
            out_init: Init::Normal(0.02),
        })
    }

    fn validate(&self) -> Result<()> {
        let ok = self.hidden > 0
            && self.head_dim > 0
            && self.kv_heads > 0
            && self.heads >= self.kv_heads
            && self.heads.is_multiple_of(self.kv_heads);
        if !ok {
            crate::bail!(
                "Attention::new",
                "need hidden, head_dim > 0 and heads a positive multiple of kv_heads; got hidden {}, \
                 heads {}, kv_heads {}, head_dim {}",
                self.hidden,
                self.heads,
                self.kv_heads,
                self.head_dim
            );
        }
        Ok(())
    }
}

pub use crate::ops::rope::Rotary;

/// Self-attention. Parameters (Hugging Face names): `q_proj` [heads·d, hidden], `k_proj` and `v_proj`
/// [kv_heads·d, hidden], `o_proj` [hidden, heads·d].
#[derive(Clone, Debug)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Fake quantization of the keys and values (quantization-aware training).
    kv_quant: Option<Quantizer>,
}

impl Attention {
    pub fn new(params: &ParamStore, cfg: &AttentionConfig) -> Result<Self> {
        cfg.validate()?;
        let (h, q_dim, kv_dim) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        let lin = |name: &str, i, o, init| {
            Linear::with_init(&params.pp(name), i, o, cfg.bias, init, Init::Zeros)
        };
        Ok(Attention {
            q: lin("q_proj", h, q_dim, cfg.init)?,
            k: lin("k_proj", h, kv_dim, cfg.init)?,
            v: lin("v_proj", h, kv_dim, cfg.init)?,
            o: lin("o_proj", q_dim, h, cfg.out_init)?,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            kv_quant: None,
        })
    }

    /// Quantization-aware training: the four projections fake-quantize as `linear` says, and `kv`
    /// fake-quantizes each token's key and value projections over all kv heads at once, before RoPE
    /// (LLM-QAT's KV cache quantizer). Applies to the training forward and to cached decoding alike.
    pub fn set_fake_quant(&mut self, linear: FakeQuant, kv: Option<Quantizer>) -> Result<()> {
        if let Some(q) = kv {
            q.check()?;
        }
        for l in [&mut self.q, &mut self.k, &mut self.v, &mut self.o] {
            l.set_fake_quant(linear)?;
        }
        self.kv_quant = kv;
        Ok(())
    }

    /// A key or value projection's output [.., kv_heads·d] as the cache would hold it.
    fn quantize_kv(&self, t: Tensor) -> Result<Tensor> {
        match self.kv_quant {
            Some(q) => q.fake_quant(&t, Granularity::PerRow),
            None => Ok(t),
        }
    }

    /// `x [batch, seq, hidden] -> [batch, seq, hidden]`. With `causal`, position t attends to 0..=t only.
    pub fn forward(&self, x: &Tensor, rotary: Option<Rotary>, causal: bool) -> Result<Tensor> {
        self.forward_with(x, &AttentionOptions::new(causal, rotary))
    }

    /// `x [batch, seq, hidden] -> [batch, seq, hidden]` with any of [`Tensor::flash_attention`]'s
    /// options: causal, sliding window, key padding, packed documents, rotary positions (per document
    /// when packed), a custom scale. The projections' [batch, seq, heads·d] outputs are already the
    /// kernel's layout, so nothing is transposed or copied between them and the attention.
    pub fn forward_with(&self, x: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        let &[b, s, hidden] = x.dims() else {
            crate::bail!(
                "Attention::forward",
                "expected [batch, seq, hidden], got shape {}",
                x.shape()
            );
        };
        if hidden != self.q.in_dim() {
            return Err(Error::ShapeMismatch {
                op: "Attention::forward",
                lhs: x.dims().to_vec(),
                rhs: vec![b, s, self.q.in_dim()],
            });
        }
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q.forward(x)?.reshape((b, s, h, d))?;
        let k = self
            .quantize_kv(self.k.forward(x)?)?
            .reshape((b, s, kvh, d))?;
        let v = self
            .quantize_kv(self.v.forward(x)?)?
            .reshape((b, s, kvh, d))?;
        let out = q.flash_attention(&k, &v, opts)?.reshape((b, s, h * d))?;
        self.o.forward(&out)
    }

    /// Incremental decoding: `x [batch, seq, hidden]` are the tokens that follow the `cache.len()` tokens
    /// already in `cache`. Projects only them, rotates their queries and keys at their absolute positions
    /// cache.len()..cache.len() + seq (when `rope` is given), appends their keys (rotated, see
    /// [`crate::nn::kv_cache`]) and values to the cache and attends causally over everything cached.
    /// Equals the last `seq` positions of a causal [`Attention::forward`] over the whole sequence (up to
    /// the cache format's rounding). Returns `[batch, seq, hidden]`; not differentiable through the cache.
    ///
    /// The cache must match the layer ([batch, kv_heads, head_dim]); on any error it is left unchanged.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: Option<&RopeTable>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let &[b, s, hidden] = x.dims() else {
            crate::bail!(
                "Attention::forward_cached",
                "expected [batch, seq, hidden], got shape {}",
                x.shape()
            );
        };
        if hidden != self.q.in_dim() || s == 0 {
            return Err(Error::ShapeMismatch {
                op: "Attention::forward_cached",
                lhs: x.dims().to_vec(),
                rhs: vec![b, s.max(1), self.q.in_dim()],
            });
        }
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        if [cache.batch(), cache.heads(), cache.head_dim()] != [b, kvh, d] {
            crate::bail!(
                "Attention::forward_cached",
                "a cache of [batch {}, kv heads {}, head_dim {}] does not fit input {:?} to a layer with \
                 {kvh} kv heads of {d}",
                cache.batch(),
                cache.heads(),
                cache.head_dim(),
                x.dims()
            );
        }
        let split_heads = |t: Tensor, n: usize| t.reshape((b, s, n, d))?.transpose(1, 2);
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&self.q, &self.k, &self.v], x)?
            .try_into()
            .map_err(|_| Error::Msg("Attention: three projections give three outputs".into()))?;
        let q = split_heads(q, h)?;
        let k = split_heads(self.quantize_kv(k)?, kvh)?;
        let v = split_heads(self.quantize_kv(v)?, kvh)?;
        let (q, k) = match rope {
            Some(table) => {
                let start = cache.len() as i64;
                // On the host: the rotary op reads positions there to check them, so positions on a
                // GPU would make each layer wait for a download.
                let positions = Tensor::arange(start, start + s as i64, crate::Device::Cpu)?;
                (q.rope(table, &positions)?, k.rope(table, &positions)?)
            }
            None => (q, k),
        };
        cache.append(&k, &v)?;
        let out = cache
            .attend(&q, 1.0 / (d as f32).sqrt())?
            .transpose(1, 2)?
            .reshape((b, s, h * d))?;
        self.o.forward(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeStyle;
    use crate::{DType, Device, Rng};

    const BASE: f32 = 10_000.0;

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_vec_f32().iter().map(|&v| v as f64).collect()
    }

    /// x [rows, i] · w [o, i]ᵀ.
    fn lin(x: &[f64], w: &[f64], i: usize) -> Vec<f64> {
        let o = w.len() / i;
        x.chunks(i)
            .flat_map(|r| (0..o).map(move |j| (0..i).map(|k| r[k] * w[j * i + k]).sum::<f64>()))
            .collect()
    }

    /// Rotates one head vector at position p, pairing dims (i, i + d/2) as `RopeStyle::Half` does.
    fn rope(x: &mut [f64], p: usize) {
        let d = x.len();
        for i in 0..d / 2 {
            let a = p as f64 * (BASE as f64).powf(-2.0 * i as f64 / d as f64);
            let (x0, x1) = (x[i], x[i + d / 2]);
            x[i] = x0 * a.cos() - x1 * a.sin();
            x[i + d / 2] = x0 * a.sin() + x1 * a.cos();
        }
    }

    /// LLM-QAT's symmetric `bits` fake quantizer on each row of `n` in f64: round-half-even of
    /// x·s over s, s = (2^(bits−1) − 1)/(max|x| + 1e−6).
    fn quantize_rows(m: &mut [f64], n: usize, bits: u32) {
        let qmax = ((1u32 << (bits - 1)) - 1) as f64;
        for row in m.chunks_mut(n) {
            let s = qmax / (row.iter().fold(0f64, |a, v| a.max(v.abs())) + 1e-6);
            row.iter_mut()
                .for_each(|v| *v = (*v * s).round_ties_even() / s);
        }
    }

    /// Naive per-head attention in f64 straight from the definitions, with the keys and values
    /// fake-quantized per token before RoPE when `kv_bits` is given.
    fn reference(
        ps: &ParamStore,
        x: &Tensor,
        (h, kvh, d): (usize, usize, usize),
        causal: bool,
        kv_bits: Option<u32>,
    ) -> Vec<f64> {
        let &[b, s, hidden] = x.dims() else {
            unreachable!()
        };
        let w = |n: &str| f64s(&ps.get(&format!("{n}_proj.weight")).unwrap());
        let xv = f64s(x);
        let (q, mut k, mut v) = (
            lin(&xv, &w("q"), hidden),
            lin(&xv, &w("k"), hidden),
            lin(&xv, &w("v"), hidden),
        );
        if let Some(bits) = kv_bits {
            quantize_rows(&mut k, kvh * d, bits);
            quantize_rows(&mut v, kvh * d, bits);
        }
        let mut out = vec![0f64; b * s * h * d];
        for bi in 0..b {
            for hi in 0..h {
                let kv = hi / (h / kvh);
                // Head `j` of `n` at token t, rotated when `rotate`.
                let head = |m: &[f64], n: usize, j: usize, t: usize, rotate: bool| {
                    let mut r = m[((bi * s + t) * n + j) * d..][..d].to_vec();
                    if rotate {
                        rope(&mut r, t);
                    }
                    r
                };
                for t in 0..s {
                    let qt = head(&q, h, hi, t, true);
                    let keys = if causal { t + 1 } else { s };
                    let scores: Vec<f64> = (0..keys)
                        .map(|u| {
                            let ku = head(&k, kvh, kv, u, true);
                            qt.iter().zip(&ku).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (u, eu) in e.iter().enumerate() {
                        let vu = head(&v, kvh, kv, u, false);
                        for j in 0..d {
                            out[(bi * s + t) * h * d + hi * d + j] += eu / z * vu[j];
                        }
                    }
                }
            }
        }
        lin(&out, &w("o"), h * d)
    }

    fn setup(h: usize, kvh: usize, seed: u64) -> Result<(ParamStore, Attention, RopeTable)> {
        let ps = ParamStore::new(seed, DType::F32, Device::Cpu);
        let mut cfg = AttentionConfig::new(16, h, kvh)?;
        cfg.init = Init::Normal(0.3);
        cfg.out_init = Init::Normal(0.3);
        let attn = Attention::new(&ps, &cfg)?;
        let table = RopeTable::new(16 / h, 32, BASE, 1.0, RopeStyle::Half, Device::Cpu)?;
        Ok((ps, attn, table))
    }

    #[test]
    fn matches_naive_reference_for_mha_and_gqa() -> Result<()> {
        for (h, kvh, causal) in [(4, 4, true), (4, 2, true), (4, 1, false), (2, 2, false)] {
            let (ps, attn, table) = setup(h, kvh, 11)?;
            let x = Tensor::randn((2, 5, 16), 0.0, 1.0, &mut Rng::new(12), Device::Cpu)?;
            let pos = Tensor::arange(0, 5, Device::Cpu)?;
            let rotary = Rotary {
                table: &table,
                positions: &pos,
            };
            let y = attn.forward(&x, Some(rotary), causal)?;
            assert_eq!(y.dims(), [2, 5, 16]);
            let want = reference(&ps, &x, (h, kvh, 16 / h), causal, None);
            for (g, w) in y.to_vec_f32().iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-4,
                    "h {h} kv {kvh} causal {causal}: {g} vs {w}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn fake_quantized_keys_and_values_match_the_reference_in_both_paths() -> Result<()> {
        let (ps, mut attn, table) = setup(4, 2, 21)?;
        let x = Tensor::randn((1, 6, 16), 0.0, 1.0, &mut Rng::new(22), Device::Cpu)?;
        let pos = Tensor::arange(0, 6, Device::Cpu)?;
        let rotary = || Rotary {
            table: &table,
            positions: &pos,
        };
        let plain = attn.forward(&x, Some(rotary()), true)?.to_vec_f32();
        let kv = Some(Quantizer::LlmQat {
            bits: 3,
            symmetric: true,
        });
        attn.set_fake_quant(FakeQuant::default(), kv)?;
        let y = attn.forward(&x, Some(rotary()), true)?.to_vec_f32();
        let want = reference(&ps, &x, (4, 2, 4), true, Some(3));
        let plain_want = reference(&ps, &x, (4, 2, 4), true, None);
        for ((g, w), p) in y.iter().zip(&want).zip(&plain_want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
            assert!((*g as f64 - p).abs() > 0.0);
        }
        assert!(plain
            .iter()
            .zip(&plain_want)
            .all(|(g, w)| (*g as f64 - w).abs() < 1e-4));
        // Cached decoding, one token at a time, quantizes the same keys and values.
        let _no_grad = crate::tensor::no_grad();
        let mut cache = KvCache::new(1, 2, 4, crate::nn::kv_cache::KvFormat::F32)?;
        for t in 0..6 {
            let step = attn.forward_cached(&x.narrow(1, t, 1)?, Some(&table), &mut cache)?;
            for (j, g) in step.to_vec_f32().iter().enumerate() {
                let w = want[t * 16 + j];
                assert!((*g as f64 - w).abs() < 1e-4, "token {t}: {g} vs {w}");
            }
        }
        // Out-of-range bits are refused.
        let bad = Some(Quantizer::LlmQat {
            bits: 1,
            symmetric: true,
        });
        assert!(attn.set_fake_quant(FakeQuant::default(), bad).is_err());
        Ok(())
    }

    #[test]
    fn causal_output_ignores_later_tokens() -> Result<()> {
        let (_, attn, table) = setup(4, 2, 3)?;
        let pos = Tensor::arange(0, 6, Device::Cpu)?;
        let rotary = Rotary {
            table: &table,
            positions: &pos,
        };
        let x = Tensor::randn((1, 6, 16), 0.0, 1.0, &mut Rng::new(4), Device::Cpu)?;
        // Replace tokens 4 and 5 only.
        let tail = Tensor::randn((1, 2, 16), 0.0, 1.0, &mut Rng::new(5), Device::Cpu)?;
        let x2 = Tensor::cat(&[x.narrow(1, 0, 4)?, tail], 1)?;
        let (y, y2) = (
            attn.forward(&x, Some(rotary), true)?,
            attn.forward(&x2, Some(rotary), true)?,
        );
        let (a, b) = (y.to_vec_f32(), y2.to_vec_f32());
        assert_eq!(a[..4 * 16], b[..4 * 16]);
        assert_ne!(a[4 * 16..], b[4 * 16..]);
        Ok(())
    }

    #[test]
    fn every_projection_gets_a_gradient() -> Result<()> {
        let (ps, attn, table) = setup(4, 2, 6)?;
        let pos = Tensor::arange(0, 3, Device::Cpu)?;
        let rotary = Rotary {
            table: &table,
            positions: &pos,
        };
        let x = Tensor::randn((2, 3, 16), 0.0, 1.0, &mut Rng::new(7), Device::Cpu)?;
        let grads = attn
            .forward(&x, Some(rotary), true)?
            .sqr()?
            .sum_all()?
            .backward()?;
        for (name, p) in ps.all() {
            let g = grads.get(&p).expect("gradient present");
            assert!(
                g.to_vec_f32().iter().any(|v| *v != 0.0),
                "{name} has a zero gradient"
            );
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (ps, attn, table) = setup(4, 2, 8)?;
        let pos = Tensor::arange(0, 4, Device::Cpu)?;
        let rotary = Some(Rotary {
            table: &table,
            positions: &pos,
        });
        let x = Tensor::randn((2, 4, 16), 0.0, 1.0, &mut Rng::new(9), Device::Cpu)?;
        let r = Tensor::randn((2, 4, 16), 0.0, 1.0, &mut Rng::new(10), Device::Cpu)?;
        // A random projection of the output, so every output element matters to the loss.
        let loss = || -> Result<f32> {
            attn.forward(&x, rotary, true)?
                .mul(&r)?
                .sum_all()?
                .to_scalar()
        };
        let grads = attn
            .forward(&x, rotary, true)?
            .mul(&r)?
            .sum_all()?
            .backward()?;
        let eps = 1e-2;
        for (name, p) in ps.all() {
            let analytic = grads.get(&p).unwrap().to_vec_f32();
            let orig = p.to_vec_f32();
            for i in [0, orig.len() / 3, orig.len() - 1] {
                let mut bumped = orig.clone();
                bumped[i] = orig[i] + eps;
                p.set(&Tensor::from_vec(bumped.clone(), p.dims(), Device::Cpu)?)?;
                let up = loss()?;
                bumped[i] = orig[i] - eps;
                p.set(&Tensor::from_vec(bumped, p.dims(), Device::Cpu)?)?;
                let down = loss()?;
                p.set(&Tensor::from_vec(orig.clone(), p.dims(), Device::Cpu)?)?;
                let numeric = (up - down) / (2.0 * eps);
                assert!(
                    (numeric - analytic[i]).abs() < 2e-2 * (1.0 + analytic[i].abs()),
                    "{name}[{i}]: numeric {numeric} vs analytic {}",
                    analytic[i]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn cached_decoding_matches_the_full_forward() -> Result<()> {
        use crate::nn::kv_cache::KvFormat;
        for (h, kvh) in [(4, 4), (4, 2), (4, 1)] {
            let (_, attn, table) = setup(h, kvh, 21)?;
            let x = Tensor::randn((2, 9, 16), 0.0, 1.0, &mut Rng::new(22), Device::Cpu)?;
            let pos = Tensor::arange(0, 9, Device::Cpu)?;
            let rotary = Rotary {
                table: &table,
                positions: &pos,
            };
            let full = attn.forward(&x, Some(rotary), true)?.to_vec_f32();
            // A prefill chunk of 4 tokens, then one token at a time, then a chunk of 2.
            let mut cache = KvCache::new(2, kvh, 16 / h, KvFormat::F32)?;
            let mut got = vec![Vec::new(); 2];
            for (start, n) in [(0, 4), (4, 1), (5, 1), (6, 1), (7, 2)] {
                let y = attn.forward_cached(&x.narrow(1, start, n)?, Some(&table), &mut cache)?;
                assert_eq!(y.dims(), [2, n, 16]);
                for (bi, g) in got.iter_mut().enumerate() {
                    g.extend(y.get(bi)?.to_vec_f32());
                }
            }
            assert_eq!(cache.len(), 9);
            for (g, w) in got.concat().iter().zip(&full) {
                assert!(
                    (g - w).abs() < 1e-5,
                    "h {h} kv {kvh}: cached {g} vs full {w}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_cache_that_does_not_fit_is_an_error_and_stays_unchanged() -> Result<()> {
        use crate::nn::kv_cache::KvFormat;
        let (_, attn, table) = setup(4, 2, 0)?;
        let x = Tensor::zeros((1, 3, 16), DType::F32, Device::Cpu)?;
        for (b, kvh, d) in [(2, 2, 4), (1, 4, 4), (1, 2, 8)] {
            let mut cache = KvCache::new(b, kvh, d, KvFormat::F32)?;
            let err = attn
                .forward_cached(&x, Some(&table), &mut cache)
                .unwrap_err();
            assert!(err.to_string().contains("[1, 3, 16]"), "{err}");
            assert!(cache.is_empty());
        }
        // Past the rotary table's positions.
        let mut cache = KvCache::new(1, 2, 4, KvFormat::F32)?;
        let long = Tensor::zeros((1, 33, 16), DType::F32, Device::Cpu)?;
        assert!(attn
            .forward_cached(&long, Some(&table), &mut cache)
            .is_err());
        assert!(cache.is_empty());
        Ok(())
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() -> Result<()> {
        assert!(AttentionConfig::new(16, 3, 3).is_err());
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        assert!(Attention::new(&ps, &AttentionConfig::new(16, 4, 3)?).is_err());
        let (_, attn, _) = setup(4, 4, 0)?;
        let x = Tensor::zeros((2, 3, 8), DType::F32, Device::Cpu)?;
        assert!(attn.forward(&x, None, true).is_err());
        Ok(())
    }
}
