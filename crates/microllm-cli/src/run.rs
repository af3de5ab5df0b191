//! `microllm run`: one-shot generation or an interactive chat.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use microllm_engine::{
    ChatMessage, ChatTemplate, GenerateOptions, KvType, LoadedModel, SamplerConfig, Session,
    StateOptions,
};
use serde::Serialize;

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (a user message, or plain text with --raw). Without it, on a terminal,
    /// an interactive chat starts; otherwise the prompt is read from standard input.
    pub prompt: Option<String>,
    /// Plain completion: no chat template.
    #[arg(long)]
    pub raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// A Jinja chat template file to use instead of the model's own.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the best (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Presence penalty (OpenAI semantics; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Frequency penalty (OpenAI semantics; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (default: from the clock). Same seed + same input = same output.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Context size in tokens (default: min(4096, the model's trained context)).
    #[arg(short = 'c', long = "ctx")]
    pub ctx: Option<usize>,
    /// KV cache format: f16, or q8_0 (about half the memory, slightly less precise).
    #[arg(long = "kv-type", default_value = "f16", value_name = "f16|q8_0")]
    pub kv_type: KvType,
    /// Print one JSON object (prompt ids, generated ids, text, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// At exit, print one JSON line to standard error: time to first token counted from
    /// process start, load time, KV cache bytes and peak resident memory (VmHWM).
    #[arg(long)]
    pub stats: bool,
    /// Load even when the memory estimate says the model and context will not fit.
    #[arg(long)]
    pub force: bool,
}

#[derive(Serialize)]
struct JsonOut<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    finish_reason: &'a str,
    timings: Timings,
}

#[derive(Serialize)]
struct Stats {
    /// From process start to the first sampled token.
    ttft_ms: f64,
    load_ms: f64,
    prompt_tokens: usize,
    kv_type: &'static str,
    kv_bytes: usize,
    model_file_bytes: u64,
    peak_rss_bytes: Option<u64>,
}

#[derive(Serialize)]
struct Timings {
    load_ms: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
}

impl RunArgs {
    fn sampler(&self) -> SamplerConfig {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
        }
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    let sampler = a.sampler();
    sampler.validate()?;
    let path = crate::model_path(&a.model)?;
    // One parse of the file serves the memory check and the load.
    let t0 = std::time::Instant::now();
    let file = crate::open_gguf(&path)?;
    crate::store_cmds::check_fit_for_load(&path, &file, a.ctx, a.force)?;
    let lm = crate::load_file(&path, file, t0, &a.model)?;
    let template = match &a.chat_template {
        Some(p) => {
            let src = std::fs::read_to_string(p)
                .with_context(|| format!("reading chat template {}", p.display()))?;
            Some(ChatTemplate::new(&src)?)
        }
        None => None,
    };
    let n_ctx = a
        .ctx
        .unwrap_or_else(|| lm.model.config.n_ctx_train.min(4096));
    if n_ctx > lm.model.config.n_ctx_train {
        eprintln!(
            "warning: --ctx {n_ctx} is beyond the model's trained context ({}); quality may suffer",
            lm.model.config.n_ctx_train
        );
    }
    let mut session = Session::new(
        &lm,
        StateOptions {
            n_ctx,
            n_batch: 512,
            kv_type: a.kv_type,
        },
    )?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler,
        stop_at_eog: true,
    };

    let prompt = match &a.prompt {
        Some(p) => p.clone(),
        None if std::io::stdin().is_terminal() && !a.json => {
            return chat_loop(&lm, &mut session, template.as_ref(), &a, &opts);
        }
        None => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading the prompt from standard input")?;
            s
        }
    };

    let ids = if a.raw {
        lm.tokenize(&prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt.clone(),
        });
        let rendered = lm
            .render_chat(template.as_ref(), &messages, true)
            .context("applying the chat template (use --raw for plain completion)")?;
        lm.tokenize_chat(&rendered)?
    };
    let cancel = install_ctrlc()?;
    let stream = !a.json;
    let mut stdout = std::io::stdout().lock();
    let g = session.generate(&ids, &opts, Some(&cancel), |piece| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        ControlFlow::Continue(())
    })?;
    if a.json {
        let out = JsonOut {
            prompt_tokens: &g.prompt_tokens,
            tokens: &g.tokens,
            text: &g.text,
            finish_reason: finish_name(g.finish),
            timings: Timings {
                load_ms: lm.load_time.as_secs_f64() * 1e3,
                prefill_tok_s: g.prefill_tok_s(),
                decode_tok_s: g.decode_tok_s(),
            },
        };
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} prompt tokens, {:.1} tok/s prefill; {} tokens, {:.1} tok/s decode]",
            g.prompt_tokens.len(),
            g.prefill_tok_s(),
            g.tokens.len(),
            g.decode_tok_s()
        );
    }
    if a.stats {
        let ttft = g
            .first_token_at
            .map(|t| (crate::since_start() - t.elapsed()).as_secs_f64() * 1e3)
            .unwrap_or(f64::NAN);
        let stats = Stats {
            ttft_ms: ttft,
            load_ms: lm.load_time.as_secs_f64() * 1e3,
            prompt_tokens: g.prompt_tokens.len(),
            kv_type: session.state().kv_type().name(),
            kv_bytes: session.state().kv_bytes(),
            model_file_bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            peak_rss_bytes: crate::peak_rss_bytes(),
        };
        eprintln!("{}", serde_json::to_string(&stats)?);
    }
    Ok(())
}

fn finish_name(f: microllm_engine::FinishReason) -> &'static str {
    match f {
        microllm_engine::FinishReason::Eog => "stop",
        microllm_engine::FinishReason::Length => "length",
        microllm_engine::FinishReason::ContextFull => "context_full",
        microllm_engine::FinishReason::Cancelled => "cancelled",
    }
}

/// Ctrl-C sets the returned flag (stopping the current answer); a second Ctrl-C while no
/// answer is running exits.
fn install_ctrlc() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&flag);
    ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")?;
    Ok(flag)
}

fn chat_loop(
    lm: &LoadedModel,
    session: &mut Session<'_>,
    template: Option<&ChatTemplate>,
    a: &RunArgs,
    opts: &GenerateOptions,
) -> Result<()> {
    if template.is_none() && lm.chat_template.is_none() {
        anyhow::bail!(
            "this model has no chat template, so it cannot chat: pass --chat-template FILE, or give a prompt with --raw"
        );
    }
    let cancel = install_ctrlc()?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: s.clone(),
        });
    }
    eprintln!("microllm chat — Ctrl-C stops an answer, Ctrl-D quits.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        line.clear();
        cancel.store(false, Ordering::SeqCst);
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: text.to_string(),
        });
        // Drop the oldest turns (keeping the system message) until the chat fits.
        let ids = loop {
            let rendered = lm.render_chat(template, &messages, true)?;
            let ids = lm.tokenize_chat(&rendered)?;
            let first_turn = messages.iter().position(|m| m.role != "system");
            if ids.len() + 16 <= session.n_ctx() || first_turn == Some(messages.len() - 1) {
                break ids;
            }
            if let Some(i) = first_turn {
                messages.remove(i);
            }
        };
        if ids.len() >= session.n_ctx() {
            eprintln!(
                "(that message alone is {} tokens, more than the context of {}; use a larger --ctx)",
                ids.len(),
                session.n_ctx()
            );
            messages.pop();
            continue;
        }
        let mut stdout = std::io::stdout().lock();
        let g = session.generate(&ids, opts, Some(&cancel), |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            ControlFlow::Continue(())
        })?;
        writeln!(stdout)?;
        messages.push(ChatMessage {
            role: "assistant".into(),
            content: g.text.clone(),
        });
    }
}
