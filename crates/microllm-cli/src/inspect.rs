//! `microllm inspect`: what a model file is, and how this CPU will run it.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::bench::main_quant;
use crate::ModelArgs;
use microllm_store::human_params;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A .gguf path or a model name.
    #[arg(value_name = "MODEL")]
    pub model_pos: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Info {
    path: String,
    name: Option<String>,
    architecture: String,
    n_params: u64,
    file_bytes: u64,
    quantization: String,
    tensor_types: BTreeMap<String, usize>,
    context_length: usize,
    n_layer: usize,
    n_embd: usize,
    n_ff: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    n_vocab: usize,
    rope_base: f32,
    sliding_window: Option<usize>,
    tied_output: bool,
    tokenizer: String,
    bos: Option<String>,
    eos: Option<String>,
    chat_template: Option<String>,
    kernels: String,
    prefetch: String,
    threads: usize,
}

pub fn inspect(mut a: InspectArgs) -> Result<()> {
    if a.model_pos.is_some() {
        a.model.model = a.model_pos.take();
    }
    let path = crate::model_path(&a.model)?;
    let lm = crate::load(&a.model)?;
    let c = &lm.model.config;
    let md = lm.model.gguf().metadata();
    let mut tensor_types = BTreeMap::new();
    for t in lm.model.gguf().tensors() {
        *tensor_types.entry(t.ty.name().to_string()).or_default() += 1;
    }
    let tok = &lm.tokenizer;
    let info = Info {
        path: path.display().to_string(),
        name: c.name.clone(),
        architecture: c.arch.name().to_string(),
        n_params: lm.model.n_params(),
        file_bytes: lm.model.gguf().file_size(),
        quantization: main_quant(&lm),
        tensor_types,
        context_length: c.n_ctx_train,
        n_layer: c.n_layer,
        n_embd: c.n_embd,
        n_ff: c.n_ff,
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        n_vocab: c.n_vocab,
        rope_base: c.rope.base,
        sliding_window: c.sliding_window,
        tied_output: lm.model.weights.tied_output,
        tokenizer: md
            .get_str("tokenizer.ggml.model")?
            .unwrap_or("?")
            .to_string(),
        bos: tok.bos_id().map(|i| tok.token_text(i).to_string()),
        eos: tok.eos_id().map(|i| tok.token_text(i).to_string()),
        chat_template: tok.chat_template().map(str::to_string),
        kernels: lm.model.kernels().path().to_string(),
        prefetch: lm.model.kernels().prefetch().to_string(),
        threads: lm.model.n_threads(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("model:          {}", info.path);
    if let Some(n) = &info.name {
        println!("name:           {n}");
    }
    println!("architecture:   {}", info.architecture);
    println!(
        "parameters:     {} ({})",
        human_params(info.n_params),
        info.n_params
    );
    println!(
        "file size:      {:.2} MiB",
        info.file_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("quantization:   {}", info.quantization);
    let types: Vec<String> = info
        .tensor_types
        .iter()
        .map(|(t, n)| format!("{t} x{n}"))
        .collect();
    println!("tensor types:   {}", types.join(", "));
    println!("context length: {}", info.context_length);
    println!(
        "shape:          {} layers, n_embd {}, n_ff {}, {} heads / {} KV heads of {}, vocab {}",
        info.n_layer,
        info.n_embd,
        info.n_ff,
        info.n_head,
        info.n_head_kv,
        info.head_dim,
        info.n_vocab
    );
    println!("rope base:      {}", info.rope_base);
    if let Some(w) = info.sliding_window {
        println!("sliding window: {w}");
    }
    println!("tied output:    {}", info.tied_output);
    println!(
        "tokenizer:      {} (bos {:?}, eos {:?})",
        info.tokenizer, info.bos, info.eos
    );
    match &info.chat_template {
        Some(t) => println!("chat template:\n{t}"),
        None => println!("chat template:  (none: use --raw or --chat-template FILE)"),
    }
    println!(
        "kernels:        {} ({} threads, packed prefetch into {})",
        info.kernels, info.threads, info.prefetch
    );
    Ok(())
}
