//! Sessions and the generation loop: a loaded model (weights + tokenizer + chat template) and
//! a synchronous `Session` that keeps one sequence's KV cache, reuses the longest common prefix
//! of what it already evaluated, prefills in batches and decodes token by token.
//!
//! Design decision: the core is synchronous and owns no threads of its own beyond the model's
//! compute pool; callers (CLI, server) drive it and stop it through a callback's return value or
//! a shared cancellation flag, so it embeds anywhere.

#![forbid(unsafe_code)]

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use microllm_gguf::GgufFile;
pub use microllm_model::{
    KvType, Logits, Model, ModelError, ModelOptions, Scratch, SeqBatch, State, StateOptions,
};
pub use microllm_sample::{Sampler, SamplerConfig};
pub use microllm_tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Sample(#[from] microllm_sample::SampleError),
    #[error("could not open model '{path}': {source}")]
    Open {
        path: String,
        source: microllm_gguf::GgufError,
    },
    #[error("the prompt is empty: give at least one token (or let the model add BOS)")]
    EmptyPrompt,
    #[error("the prompt has {n_prompt} tokens but the context holds {n_ctx}; use a larger --ctx (up to the model's {n_ctx_train}) or a shorter prompt")]
    PromptTooLong {
        n_prompt: usize,
        n_ctx: usize,
        n_ctx_train: usize,
    },
}

/// A model with its tokenizer and chat template, loaded from one GGUF file.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The model's own `tokenizer.chat_template`, if it has one.
    pub chat_template: Option<ChatTemplate>,
    pub load_time: Duration,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("model", &self.model)
            .finish()
    }
}

impl LoadedModel {
    pub fn load(path: &Path, opts: ModelOptions) -> Result<Self, EngineError> {
        let t0 = Instant::now();
        let file = GgufFile::open(path).map_err(|source| EngineError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_gguf(file, opts, t0)
    }

    pub fn from_gguf(file: GgufFile, opts: ModelOptions, t0: Instant) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_gguf(file.metadata())?;
        let chat_template = match tokenizer.chat_template() {
            Some(src) => Some(ChatTemplate::new(src)?),
            None => None,
        };
        let model = Model::from_gguf(file, opts)?;
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            load_time: t0.elapsed(),
        })
    }

    /// Renders a conversation with `template` (or the model's own), ready to tokenize with
    /// special tokens parsed.
    pub fn render_chat(
        &self,
        template: Option<&ChatTemplate>,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let tpl = template
            .or(self.chat_template.as_ref())
            .ok_or(TokenizerError::NoChatTemplate)?;
        let tok = &self.tokenizer;
        let bos = tok.bos_id().map(|i| tok.token_text(i)).unwrap_or("");
        let eos = tok.eos_id().map(|i| tok.token_text(i)).unwrap_or("");
        Ok(tpl.render(messages, add_generation_prompt, bos, eos)?)
    }

    /// Tokenizes like llama.cpp: special tokens in the text are parsed and BOS is added when
    /// the model asks for it.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self.tokenizer.encode(text, true, true)?)
    }

    /// Tokenizes a rendered chat. Templates usually write BOS themselves, so BOS is added only
    /// when the rendered text does not already start with it.
    pub fn tokenize_chat(&self, rendered: &str) -> Result<Vec<u32>, EngineError> {
        let mut ids = self.tokenizer.encode(rendered, false, true)?;
        if self.tokenizer.add_bos() {
            if let Some(bos) = self.tokenizer.bos_id() {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Stop at the model's end-of-generation tokens (EOS, EOT, `<|im_end|>`, ...).
    pub stop_at_eog: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            stop_at_eog: true,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token (included in `tokens`).
    Eog,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    ContextFull,
    /// The callback or the cancel flag stopped it.
    Cancelled,
}

/// What one generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    /// Prompt tokens actually evaluated (the rest came from the reused prefix).
    pub n_prefilled: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// When the first token was sampled (time to first token = this minus the request's start).
    pub first_token_at: Option<Instant>,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.n_prefilled, self.prefill_time)
    }
    /// Decode speed over the tokens after the first (the first comes from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.tokens.len().saturating_sub(1), self.decode_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if n == 0 || t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// One sequence: its KV cache and the tokens in it.
pub struct Session<'m> {
    lm: &'m LoadedModel,
    state: State,
    /// The tokens whose keys/values are in `state` (in order).
    history: Vec<u32>,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("n_past", &self.history.len())
            .finish()
    }
}

impl<'m> Session<'m> {
    pub fn new(lm: &'m LoadedModel, opts: StateOptions) -> Result<Self, EngineError> {
        let state = lm.model.new_state(opts)?;
        Ok(Self {
            lm,
            history: Vec::with_capacity(state.n_ctx()),
            state,
        })
    }

    pub fn history(&self) -> &[u32] {
        &self.history
    }
    pub fn n_ctx(&self) -> usize {
        self.state.n_ctx()
    }
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Forgets the cached sequence.
    pub fn reset(&mut self) {
        self.state.reset();
        self.history.clear();
    }

    /// Makes the cache hold exactly `prompt` and leaves the logits of its last token in
    /// `state.logits()`. Reuses the longest common prefix of what is cached; returns the
    /// number of tokens evaluated.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<usize, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() > self.state.n_ctx() {
            return Err(EngineError::PromptTooLong {
                n_prompt: prompt.len(),
                n_ctx: self.state.n_ctx(),
                n_ctx_train: self.lm.model.config.n_ctx_train,
            });
        }
        let common = self
            .history
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last prompt token is evaluated, so that its logits are fresh.
        let keep = common.min(prompt.len() - 1);
        self.state.truncate(keep);
        self.history.truncate(keep);
        let rest = &prompt[keep..];
        self.lm.model.forward(&mut self.state, rest, Logits::Last)?;
        self.history.extend_from_slice(rest);
        Ok(rest.len())
    }

    /// Appends one token and computes the next logits.
    pub fn step(&mut self, token: u32) -> Result<(), EngineError> {
        self.lm
            .model
            .forward(&mut self.state, std::slice::from_ref(&token), Logits::Last)?;
        self.history.push(token);
        Ok(())
    }

    pub fn logits(&self) -> &[f32] {
        self.state.logits()
    }

    /// Generates after `prompt`. `on_text` receives the text as it completes (never a partial
    /// UTF-8 character); returning `Break` stops.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        cancel: Option<&AtomicBool>,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Generation, EngineError> {
        let tok = &self.lm.tokenizer;
        let mut sampler = Sampler::new(opts.sampler.clone(), self.lm.model.config.n_vocab)?;
        let t0 = Instant::now();
        let n_prefilled = self.prefill(prompt)?;
        let prefill_time = t0.elapsed();
        let mut out = Vec::with_capacity(opts.max_tokens.min(self.state.n_ctx()));
        let mut text = String::new();
        let mut decoder = StreamDecoder::new();
        let mut finish = FinishReason::Length;
        let mut first_token_at = None;
        while out.len() < opts.max_tokens {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                finish = FinishReason::Cancelled;
                break;
            }
            let next = sampler.sample(self.state.logits(), &self.history);
            out.push(next);
            if first_token_at.is_none() {
                first_token_at = Some(Instant::now());
            }
            let eog = tok.is_eog(next);
            let piece = if eog && opts.stop_at_eog {
                String::new()
            } else {
                decoder.push(tok, next).unwrap_or_default()
            };
            text.push_str(&piece);
            if !piece.is_empty() && on_text(&piece).is_break() {
                finish = FinishReason::Cancelled;
                break;
            }
            if eog && opts.stop_at_eog {
                finish = FinishReason::Eog;
                break;
            }
            if out.len() >= opts.max_tokens {
                break;
            }
            if self.history.len() >= self.state.n_ctx() {
                finish = FinishReason::ContextFull;
                break;
            }
            self.step(next)?;
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            text.push_str(&rest);
            let _ = on_text(&rest);
        }
        // Decode time counts from the first sampled token (whose logits came from prefill).
        let decode_time = first_token_at.map(|t| t.elapsed()).unwrap_or_default();
        Ok(Generation {
            prompt_tokens: prompt.to_vec(),
            tokens: out,
            text,
            finish,
            n_prefilled,
            prefill_time,
            decode_time,
            first_token_at,
        })
    }
}

/// Appends one token to each session and computes all their next logits in ONE batched
/// forward: every weight matrix is read once for the whole batch (continuous batching).
/// `scratch` must hold `batch.len()` rows (`lm.model.new_scratch(n)`); the sessions must
/// belong to `lm`.
pub fn step_many(
    lm: &LoadedModel,
    scratch: &mut Scratch,
    batch: &mut [(&mut Session<'_>, u32)],
) -> Result<(), EngineError> {
    let mut seqs: Vec<SeqBatch<'_>> = Vec::with_capacity(batch.len());
    for (session, token) in batch.iter_mut() {
        seqs.push(SeqBatch {
            state: &mut session.state,
            tokens: std::slice::from_ref(token),
            logits: Logits::Last,
        });
    }
    lm.model.forward_batch(scratch, &mut seqs)?;
    drop(seqs);
    for (session, token) in batch.iter_mut() {
        session.history.push(*token);
    }
    Ok(())
}
