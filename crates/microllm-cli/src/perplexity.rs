//! `microllm perplexity`: llama-perplexity's method, so the figures compare.
//!
//! The whole file is tokenized (BOS first if the model adds BOS) and cut into non-overlapping
//! windows of `ctx` tokens; when the model adds BOS, each window's first token is replaced by
//! BOS. Each window is evaluated from position 0 and only the predictions of its second half
//! are scored (positions ctx/2 .. ctx-2 predicting the next token).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use microllm_engine::KvType;
use serde::Serialize;

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text file.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Window size in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    pub ctx: usize,
    /// Use only the first N windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Most tokens evaluated per forward call.
    #[arg(short = 'b', long = "batch", default_value_t = 512)]
    pub batch: usize,
    /// KV cache format: f16, or q8_0 (about half the memory, slightly less precise).
    #[arg(long = "kv-type", default_value = "f16", value_name = "f16|q8_0")]
    pub kv_type: KvType,
    /// Print {"ppl", "ppl_err", "n_chunks"} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Out {
    ppl: f64,
    ppl_err: f64,
    n_chunks: usize,
    n_ctx: usize,
    n_tokens_scored: usize,
    seconds: f64,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    if a.ctx < 4 {
        anyhow::bail!("--ctx must be at least 4 (got {})", a.ctx);
    }
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {} (it must be UTF-8 text)", a.file.display()))?;
    let lm = crate::load(&a.model)?;
    let tokens = lm.tokenize(&text)?;
    let available = tokens.len() / a.ctx;
    let n_chunks = a.chunks.map_or(available, |c| c.min(available));
    if n_chunks == 0 {
        anyhow::bail!(
            "the file has {} tokens, fewer than one window of --ctx {}: use a longer text or a smaller --ctx",
            tokens.len(),
            a.ctx
        );
    }
    let bos = if lm.tokenizer.add_bos() {
        lm.tokenizer.bos_id()
    } else {
        None
    };
    let t0 = Instant::now();
    let json = a.json;
    let r = microllm_compress::eval::perplexity(
        &lm.model,
        &tokens,
        bos,
        a.ctx,
        Some(n_chunks),
        a.batch.min(a.ctx),
        a.kv_type,
        &mut |i, ppl| {
            if !json {
                eprint!("[{}]{:.4},", i + 1, ppl);
            }
        },
    )?;
    let (ppl, ppl_err, count) = (r.ppl, r.ppl_err, r.n_tokens_scored);
    if a.json {
        let out = Out {
            ppl,
            ppl_err,
            n_chunks,
            n_ctx: a.ctx,
            n_tokens_scored: count,
            seconds: t0.elapsed().as_secs_f64(),
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        eprintln!();
        println!("Final estimate: PPL = {ppl:.4} +/- {ppl_err:.5}");
    }
    Ok(())
}
