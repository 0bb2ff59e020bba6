//! A language model ready to talk: a Llama GGUF file's model, tokenizer, chat template and stop
//! tokens, and streaming generation to a writer — what `trit generate` and `trit chat` run.

use crate::generate::{ChatTemplate, GenerateOptions, Utf8Stream};
use crate::llama::Llama;
use crate::llama_gguf::{load_llama_reporting, Weights};
use crate::tokenizer::{bpe_from_gguf, Bpe};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use trit::io::gguf::Gguf;
use trit::{Device, Error, Result};

pub struct Llm {
    pub model: Llama,
    pub bpe: Bpe,
    /// `None` when the file has no template trit can render.
    pub template: Option<ChatTemplate>,
    /// End-of-sequence and end-of-turn tokens: generation stops after any of them.
    pub stop: Vec<u32>,
}

/// What one streamed generation did.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
    pub seconds: f64,
}

impl Llm {
    /// Loads a Llama-architecture GGUF file with its block-quantized weights as `weights` says, saying
    /// on stderr what it loads when `progress` is set.
    pub fn open(path: &Path, weights: Weights, progress: bool) -> Result<Llm> {
        Llm::open_on(path, weights, Device::Cpu, progress)
    }

    /// [`Llm::open`] with the model on `device` (a GPU decodes there, KV cache included).
    pub fn open_on(path: &Path, weights: Weights, device: Device, progress: bool) -> Result<Llm> {
        device.check()?;
        let started = Instant::now();
        let g = Gguf::open(path)?;
        let bytes: usize = g.tensors().iter().map(|t| t.end - t.start).sum();
        let bar = if progress {
            let bar = ProgressBar::new(bytes as u64).with_message(format!(
                "loading {} ({} tensors)",
                path.display(),
                g.tensors().len()
            ));
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                    .map_err(|e| Error::Msg(format!("progress bar: {e}")))?
                    .progress_chars("=> "),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let (_, model) = load_llama_reporting(&g, device, weights, &mut |b| bar.inc(b as u64))?;
        bar.finish_and_clear();
        let bpe = bpe_from_gguf(&g)?;
        let template = g
            .get_str("tokenizer.chat_template")
            .ok()
            .and_then(|t| ChatTemplate::from_jinja(t).ok());
        let mut stop: Vec<u32> = g
            .get_u64("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|id| id as u32)
            .into_iter()
            .collect();
        stop.extend(bpe.id("<|im_end|>").filter(|id| !stop.contains(id)));
        if progress {
            let on = match device {
                Device::Cpu => String::new(),
                gpu => format!(" on {gpu}"),
            };
            eprintln!(
                "loaded {}{on} in {:.1} s",
                model.config(),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(Llm {
            model,
            bpe,
            template,
            stop,
        })
    }

    /// The prompt for a conversation of (role, content) turns, in the model's chat template.
    pub fn chat_prompt(&self, messages: &[(&str, &str)]) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| {
            Error::Msg("this model has no chat template trit can render (ChatML)".into())
        })?;
        Ok(t.render(messages))
    }

    /// Encodes `prompt`, generates with `opts` (its stop tokens plus the model's), and writes the
    /// text to `out` as each token arrives (control tokens such as <|im_end|> are not printed).
    pub fn stream(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        out: &mut impl Write,
    ) -> Result<Generated> {
        let ids = self.bpe.encode(prompt)?;
        let mut opts = opts.clone();
        opts.stop.extend(&self.stop);
        let started = Instant::now();
        let mut utf8 = Utf8Stream::default();
        let mut text = String::new();
        let write = |out: &mut dyn Write, s: &str| -> Result<()> {
            out.write_all(s.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| Error::Msg(format!("writing the output: {e}")))
        };
        let tokens = self.model.generate_stream(&ids, &opts, |t| {
            let piece = utf8.push(&self.bpe.decode_bytes(&[t], true)?);
            write(out, &piece)?;
            text.push_str(&piece);
            Ok(true)
        })?;
        let tail = utf8.finish();
        write(out, &tail)?;
        text.push_str(&tail);
        Ok(Generated {
            tokens,
            text,
            prompt_tokens: ids.len(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Perplexity of the model on `text`: see [`Llama::perplexity`]. Returns (perplexity, tokens
    /// scored).
    pub fn perplexity(&self, text: &str, ctx: usize) -> Result<(f64, usize)> {
        self.model.perplexity(&self.bpe.encode(text)?, ctx)
    }
}
