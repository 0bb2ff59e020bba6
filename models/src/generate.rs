//! Text generation on a [`Llama`]: sampling (greedy, temperature, top-k, top-p, repetition penalty,
//! a seed), stop tokens, streaming each token to a callback as it is decoded, and the KV cache format
//! of the caller's choice; plus the ChatML chat template.

use crate::llama::Llama;
use trit::nn::kv_cache::KvFormat;
use trit::{Error, Result, Rng};

/// How the next token is picked from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it before softmax.
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probabilities sum to at least p.
    pub top_p: Option<f32>,
    /// CTRL's penalty on tokens already in the context (prompt and output): positive logits are
    /// divided by it, negative ones multiplied. 1 turns it off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Msg(format!("sampling: {m}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be finite and ≥ 0, got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return bad(format!("top_p must be in (0, 1], got {p}"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Everything one generation call needs besides the prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends after emitting any of these (the stop token is part of the output).
    pub stop: Vec<u32>,
    pub kv: KvFormat,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampling: Sampling::default(),
            stop: Vec::new(),
            kv: KvFormat::F32,
        }
    }
}

/// Picks the next token from one row of logits given the context so far.
pub fn sample(logits: &[f32], s: &Sampling, context: &[u32], rng: &mut Rng) -> u32 {
    let mut l = logits.to_vec();
    if s.repetition_penalty != 1.0 {
        let mut seen = vec![false; l.len()];
        for &t in context {
            if let Some(x) = seen.get_mut(t as usize) {
                *x = true;
            }
        }
        for (x, _) in l.iter_mut().zip(&seen).filter(|(_, &s)| s) {
            *x = if *x > 0.0 {
                *x / s.repetition_penalty
            } else {
                *x * s.repetition_penalty
            };
        }
    }
    // Larger logits first, ties to the smaller id: a total order, so a partial selection keeps exactly
    // the candidates (and their order) that a full sort would.
    let before = |a: &usize, b: &usize| l[*b].total_cmp(&l[*a]).then(a.cmp(b));
    if s.temperature == 0.0 {
        let best = (0..l.len()).min_by(before).unwrap_or(0);
        return best as u32;
    }
    let mut order: Vec<usize> = (0..l.len()).collect();
    let k = s.top_k.unwrap_or(order.len()).clamp(1, order.len().max(1));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, before);
        order.truncate(k);
    }
    order.sort_unstable_by(before);
    let max = l[order[0]] as f64;
    let mut weights: Vec<f64> = order
        .iter()
        .map(|&i| ((l[i] as f64 - max) / s.temperature as f64).exp())
        .collect();
    if let Some(p) = s.top_p {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let keep = weights
            .iter()
            .position(|w| {
                acc += w / total;
                acc >= p as f64
            })
            .map_or(weights.len(), |i| i + 1);
        weights.truncate(keep);
        order.truncate(keep);
    }
    let mut u = rng.uniform_f64() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    // Rounding can leave u a hair above the last weight; the last candidate is then the right pick.
    order[order.len() - 1] as u32
}

impl Llama {
    /// Continues `prompt`, calling `on_token` with each new token as soon as it is picked (return
    /// `false` to stop early). Ends after `max_tokens`, or right after a stop token. Returns the new
    /// tokens.
    pub fn generate_stream(
        &self,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<Vec<u32>> {
        opts.sampling.validate()?;
        let mut rng = Rng::new(opts.sampling.seed);
        self.decode_loop(prompt, opts.max_tokens, opts.kv, |logits, context| {
            let t = sample(logits, &opts.sampling, context, &mut rng);
            let more = on_token(t)? && !opts.stop.contains(&t);
            Ok((t, more))
        })
    }
}

/// Turns a stream of token bytes into printable text: complete UTF-8 is released as soon as it
/// arrives, an incomplete character is held until the bytes that finish it come.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes` and returns the text that is now complete (invalid sequences as U+FFFD).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An error with no length is an incomplete character at the end: hold it back.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        out
    }

    /// Whatever is left at the end (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// A chat template trit can render: ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), with the
/// default system message the template inserts when the conversation has none.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTemplate {
    default_system: Option<String>,
}

impl ChatTemplate {
    /// Recognises the Jinja template a GGUF file carries in `tokenizer.chat_template`.
    pub fn from_jinja(template: &str) -> Result<ChatTemplate> {
        if !(template.contains("<|im_start|>") && template.contains("<|im_end|>")) {
            return Err(Error::Msg(
                "chat template: only ChatML templates (<|im_start|> … <|im_end|>) are supported"
                    .into(),
            ));
        }
        const SYSTEM: &str = "<|im_start|>system\n";
        let default_system = template.find(SYSTEM).and_then(|at| {
            let rest = &template[at + SYSTEM.len()..];
            rest.find("<|im_end|>").map(|end| rest[..end].to_owned())
        });
        Ok(ChatTemplate { default_system })
    }

    /// The prompt for `messages` ((role, content) pairs), ending with the assistant's turn opener.
    pub fn render(&self, messages: &[(&str, &str)]) -> String {
        let mut out = String::new();
        if let Some(sys) = &self.default_system {
            if messages.first().is_none_or(|(role, _)| *role != "system") {
                out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
            }
        }
        for (role, content) in messages {
            out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        out.push_str("<|im_start|>assistant\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_filters_and_penalties() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let greedy = Sampling::default();
        assert_eq!(sample(&logits, &greedy, &[], &mut Rng::new(0)), 1);
        // The penalty divides token 1's positive logit by 4 (3 → 0.75): token 2 wins.
        let penal = Sampling {
            repetition_penalty: 4.0,
            ..greedy
        };
        assert_eq!(sample(&logits, &penal, &[1], &mut Rng::new(0)), 2);
        // top_k 1 and a tiny top_p both leave only the best token, whatever the temperature.
        for s in [
            Sampling {
                temperature: 5.0,
                top_k: Some(1),
                ..greedy
            },
            Sampling {
                temperature: 5.0,
                top_p: Some(1e-3),
                ..greedy
            },
        ] {
            for seed in 0..20 {
                assert_eq!(sample(&logits, &s, &[], &mut Rng::new(seed)), 1);
            }
        }
        // top_p 0.9 at temperature 1: p = softmax([3, 2, 1, −1]) = 0.66, 0.24, 0.09, 0.01 → the first
        // three reach 0.99 ≥ 0.9 only with the third, so token 3 is never drawn, the others are.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: Some(0.9),
            ..greedy
        };
        let mut seen = [0; 4];
        for seed in 0..2000 {
            seen[sample(&logits, &nucleus, &[], &mut Rng::new(seed)) as usize] += 1;
        }
        assert_eq!(seen[3], 0, "{seen:?}");
        assert!(seen[0] > 0 && seen[1] > seen[2] && seen[2] > 0, "{seen:?}");
        assert!(Sampling {
            top_p: Some(0.0),
            ..greedy
        }
        .validate()
        .is_err());
        assert!(Sampling {
            top_k: Some(0),
            ..greedy
        }
        .validate()
        .is_err());
        assert!(Sampling {
            temperature: -1.0,
            ..greedy
        }
        .validate()
        .is_err());
        assert!(Sampling {
            repetition_penalty: 0.0,
            ..greedy
        }
        .validate()
        .is_err());
    }

    #[test]
    fn sampling_respects_top_k_and_temperature() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = Rng::new(4);
        let s = |temperature, top_k| Sampling {
            temperature,
            top_k,
            ..Sampling::default()
        };
        for _ in 0..200 {
            let t = sample(&logits, &s(1.0, Some(2)), &[], &mut rng);
            assert!(t == 1 || t == 2);
        }
        assert_eq!(sample(&logits, &s(0.0, Some(3)), &[], &mut rng), 1);
        // A very low temperature concentrates on the argmax.
        assert!((0..50).all(|_| sample(&logits, &s(0.01, None), &[], &mut rng) == 1));
    }

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut s = Utf8Stream::default();
        let rocket = "🚀".as_bytes();
        assert_eq!(s.push(b"go "), "go ");
        assert_eq!(s.push(&rocket[..2]), "");
        assert_eq!(s.push(&rocket[2..]), "🚀");
        assert_eq!(s.push(&[0xFF, b'a']), "\u{FFFD}a");
        assert_eq!(s.push(&rocket[..1]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn chatml_renders_with_the_default_system_message() -> Result<()> {
        let t = ChatTemplate::from_jinja(
            "{% if x %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}<|im_start|><|im_end|>",
        )?;
        assert_eq!(
            t.render(&[("user", "Hi")]),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[("system", "S"), ("user", "Hi")]),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(ChatTemplate::from_jinja("{{ bos_token }}[INST]").is_err());
        Ok(())
    }
}
