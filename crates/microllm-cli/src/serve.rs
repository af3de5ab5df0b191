//! `microllm serve`: the OpenAI-compatible HTTP server (see the microllm-server crate).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use microllm_engine::KvType;
use microllm_server::{EngineConfig, ServerConfig};

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// KV cache format: f16, or q8_0 (about half the memory, slightly less precise).
    #[arg(long = "kv-type", default_value = "f16", value_name = "f16|q8_0")]
    pub kv_type: KvType,
    /// Address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one. The bound address is the first line on stdout.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, value_name = "KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (first line, trimmed).
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Sequences generated at once, each with its own KV cache slot.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Context of each slot (prompt + answer of one request), in tokens; capped at the
    /// model's training context.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Requests that may wait for a free slot; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Prompt tokens evaluated per engine step (long prompts are split so that running
    /// generations keep streaming).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Memory for the prefix cache, in MiB: KV of earlier prompts kept in blocks (least
    /// recently used evicted first), so a prompt starting like an earlier one (system prompt,
    /// chat history) skips evaluating that part. 0 turns it off.
    #[arg(long, default_value_t = 256, value_name = "MB")]
    pub prefix_cache_mb: usize,
    /// Tokens per prefix-cache block (a shared prefix is reused in whole blocks).
    #[arg(long, default_value_t = 32, value_name = "TOKENS")]
    pub prefix_block: usize,
    /// The model id clients use (default: the -m name, or the file name without .gguf).
    #[arg(long)]
    pub alias: Option<String>,
    /// Seconds running generations may take to finish after SIGTERM / ctrl-c.
    #[arg(long, default_value_t = 5)]
    pub shutdown_grace: u64,
}

fn model_id(args: &ModelArgs) -> String {
    let name = args.model.as_deref().unwrap_or(crate::DEFAULT_MODEL);
    let p = Path::new(name);
    if p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        || p.is_file()
    {
        if let Some(stem) = p.file_stem() {
            return stem.to_string_lossy().into_owned();
        }
    }
    name.to_string()
}

fn api_key(a: &ServeArgs) -> Result<Option<String>> {
    let key = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => k.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the API key file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    if key.is_empty() {
        bail!("the API key is empty; give a non-empty --api-key or --api-key-file");
    }
    Ok(Some(key))
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let key = api_key(&a)?;
    let id = a.alias.clone().unwrap_or_else(|| model_id(&a.model));
    let lm = Arc::new(crate::load(&a.model)?);
    let n_ctx_train = lm.model.config.n_ctx_train;
    let n_ctx = if n_ctx_train > 0 && a.ctx > n_ctx_train {
        eprintln!(
            "note: --ctx {} is above the model's training context; using {n_ctx_train}",
            a.ctx
        );
        n_ctx_train
    } else {
        a.ctx
    };
    let engine_cfg = EngineConfig {
        n_parallel: a.parallel,
        n_ctx,
        n_prefill_chunk: a.prefill_chunk,
        max_queue: a.max_queue,
        prefix_cache_bytes: a.prefix_cache_mb.saturating_mul(1 << 20),
        prefix_block_tokens: a.prefix_block,
        kv_type: a.kv_type,
    };
    let cfg = ServerConfig {
        model_id: id.clone(),
        api_key: key,
        max_body_bytes: a.max_body,
    };
    let has_key = cfg.api_key.is_some();
    let state = microllm_server::start(Arc::clone(&lm), cfg, engine_cfg)?;
    let host = a.host.clone();
    microllm_server::run(
        state,
        &a.host,
        a.port,
        Duration::from_secs(a.shutdown_grace),
        |addr| {
            // Tests and scripts read this line to find the port.
            println!("listening on http://{addr}");
            let _ = std::io::stdout().flush();
            eprintln!(
                "serving '{id}' ({} threads, {} slots x {n_ctx} tokens, queue {}, prefix cache {} MiB){}",
                lm.model.n_threads(),
                a.parallel,
                a.max_queue,
                a.prefix_cache_mb,
                if has_key { ", API key required" } else { "" }
            );
            if !has_key && host != "127.0.0.1" && host != "localhost" && host != "::1" {
                eprintln!("warning: listening on {host} without --api-key: anyone who can reach it can use it");
            }
        },
    )?;
    eprintln!("stopped");
    Ok(())
}
