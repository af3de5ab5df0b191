//! `microllm`: run, tokenize, inspect, measure perplexity and benchmark micro language models
//! on the CPU. The only crate that uses `anyhow`: everything below it returns typed errors.

#![forbid(unsafe_code)]

mod bench;
mod compress_cmds;
mod inspect;
mod perplexity;
mod run;
mod serve;
mod store_cmds;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use microllm_engine::{LoadedModel, ModelOptions};
use microllm_kernels::Kernels;
use microllm_store::Store;

/// The model used when `-m` is not given.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

#[derive(Parser, Debug)]
#[command(
    name = "microllm",
    version,
    about = "Run micro language models on the CPU, offline."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate text (chat template applied unless --raw); interactive chat without a prompt.
    Run(run::RunArgs),
    /// Print the token ids of a text as a JSON array (llama-tokenize conventions).
    Tokenize(TokenizeArgs),
    /// Describe a model: architecture, parameters, quantization, context, template, kernels.
    Inspect(inspect::InspectArgs),
    /// Perplexity of a model on a text file (llama-perplexity's method).
    Perplexity(perplexity::PerplexityArgs),
    /// Prompt-processing and generation speed (llama-bench style).
    Bench(bench::BenchArgs),
    /// Download a model (catalog name, `auto`, or a source) into the store, after a memory check.
    Pull(store_cmds::PullArgs),
    /// List the models in the store: name, size, parameters, quantization, architecture.
    List(store_cmds::ListArgs),
    /// Show a model's metadata, chat template, license and memory estimate.
    Show(store_cmds::ShowArgs),
    /// Remove models from the store.
    Rm(store_cmds::RmArgs),
    /// Re-hash stored models and report every corrupt or missing file (exit 1 if any).
    Verify(store_cmds::VerifyArgs),
    /// Write a model to an offline bundle (a tar with manifest, checksums and the model).
    Export(store_cmds::ExportArgs),
    /// Add a model from an offline bundle, checking it before anything lands in the store.
    Import(store_cmds::ImportArgs),
    /// Sign a stored model's manifest with an ed25519 secret key.
    Sign(store_cmds::SignArgs),
    /// Make an ed25519 key pair for sign / verify --key / import --key.
    Keygen(store_cmds::KeygenArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (continuous batching, metrics).
    Serve(serve::ServeArgs),
    /// Quantize a model (llama-quantize's types and mixes, --imatrix, --tensor-type).
    Quantize(compress_cmds::QuantizeArgs),
    /// Convert a (quantized) model to F32 or F16.
    Dequantize(compress_cmds::DequantizeArgs),
    /// Compute an importance matrix on calibration text (for quantize --imatrix).
    Imatrix(compress_cmds::ImatrixArgs),
    /// Drop transformer blocks (chosen on calibration text, or listed).
    Prune(compress_cmds::PruneArgs),
    /// KL divergence of a model's predictions from a base model's, top-1 agreement, PPL ratio.
    Kld(compress_cmds::KldArgs),
    /// Compare a base model and its variants: table (Markdown, JSON) and SVG chart.
    Compare(compress_cmds::CompareArgs),
}

/// How to find and load a model; shared by every command.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf path or a model name (default: smollm2-135m-instruct, fetched on first use).
    #[arg(short = 'm', long = "model", env = "MICROLLM_MODEL")]
    pub model: Option<String>,
    /// Compute threads (default: physical cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Reproduce llama.cpp's CPU arithmetic bit for bit (its x86 AVX2 kernels) instead of
    /// microllm's faster batched kernels, which round differently (also MICROLLM_EXACT=1).
    #[arg(long)]
    pub exact: bool,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Read the text from this file.
    #[arg(short = 'f', long = "file", conflicts_with = "text")]
    file: Option<PathBuf>,
    /// Do not add BOS even when the model asks for it.
    #[arg(long)]
    no_bos: bool,
    /// The text to tokenize.
    text: Option<String>,
}

/// When `main` started: the origin of the time-to-first-token that `run --stats` reports.
static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Time since `main` started.
pub fn since_start() -> std::time::Duration {
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// Peak resident memory of this process (`VmHWM` of /proc/self/status), in bytes; `None`
/// where the kernel does not report it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() {
    START.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Inspect(a) => inspect::inspect(a),
        Cmd::Perplexity(a) => perplexity::perplexity(a),
        Cmd::Bench(a) => bench::bench(a),
        Cmd::Pull(a) => store_cmds::pull(a),
        Cmd::List(a) => store_cmds::list(a),
        Cmd::Show(a) => store_cmds::show(a),
        Cmd::Rm(a) => store_cmds::rm(a),
        Cmd::Verify(a) => store_cmds::verify(a),
        Cmd::Export(a) => store_cmds::export(a),
        Cmd::Import(a) => store_cmds::import(a),
        Cmd::Sign(a) => store_cmds::sign(a),
        Cmd::Keygen(a) => store_cmds::keygen(a),
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Quantize(a) => compress_cmds::quantize(a),
        Cmd::Dequantize(a) => compress_cmds::dequantize(a),
        Cmd::Imatrix(a) => compress_cmds::imatrix(a),
        Cmd::Prune(a) => compress_cmds::prune(a),
        Cmd::Kld(a) => compress_cmds::kld(a),
        Cmd::Compare(a) => compress_cmds::compare(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A progress bar for downloads.
struct Bar(Option<indicatif::ProgressBar>);

impl microllm_store::Progress for Bar {
    fn start(&mut self, what: &str, total_bytes: Option<u64>) {
        let pb = match total_bytes {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(what.to_string());
        self.0 = Some(pb);
    }
    fn advance(&mut self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }
    fn finish(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

fn open_store() -> Result<Store> {
    let home = Store::default_home();
    Store::open(home.clone())
        .with_context(|| format!("opening the model store at {}", home.display()))
}

/// Resolves `-m` (path, stored name, or the default model, pulled on first use).
pub fn model_path(args: &ModelArgs) -> Result<PathBuf> {
    let name = args.model.as_deref().unwrap_or(DEFAULT_MODEL);
    let name = &store_cmds::resolve_auto(name)?;
    let p = PathBuf::from(name);
    if p.is_file() {
        return Ok(p);
    }
    let store = open_store()?;
    let mut bar = Bar(None);
    let path = store
        .ensure(name, &mut bar)
        .with_context(|| format!("finding model '{name}'"))?;
    Ok(path)
}

/// The kernel table: `MICROLLM_KERNELS=scalar|avx2|avx2vnni|auto`, default the best for this CPU.
pub fn kernels() -> Result<Kernels> {
    Ok(Kernels::from_env()?)
}

/// Loads the model named by `args`.
pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let path = model_path(args)?;
    load_path(&path, args)
}

/// Loads the model file at `path` with the options of `args`.
pub fn load_path(path: &std::path::Path, args: &ModelArgs) -> Result<LoadedModel> {
    let t0 = std::time::Instant::now();
    let file = microllm_gguf::GgufFile::open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    load_file(path, file, t0, args)
}

/// Opens the GGUF file at `path` (checked and mapped, nothing loaded yet).
pub fn open_gguf(path: &std::path::Path) -> Result<microllm_gguf::GgufFile> {
    microllm_gguf::GgufFile::open(path).with_context(|| format!("opening {}", path.display()))
}

/// Loads the model from a file already opened with [`open_gguf`] at `t0`, with the options
/// of `args`.
pub fn load_file(
    path: &std::path::Path,
    file: microllm_gguf::GgufFile,
    t0: std::time::Instant,
    args: &ModelArgs,
) -> Result<LoadedModel> {
    let opts = ModelOptions {
        n_threads: args.threads.unwrap_or(0),
        kernels: kernels()?,
        pack: true,
    };
    let mut lm = LoadedModel::from_gguf(file, opts, t0)
        .with_context(|| format!("loading {}", path.display()))?;
    if args.exact {
        lm.model.set_exact(true);
    }
    Ok(lm)
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let text = match (&a.file, &a.text) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {} (it must be UTF-8 text)", f.display()))?,
        (None, Some(t)) => t.clone(),
        (None, None) => anyhow::bail!("give a TEXT argument or --file F"),
    };
    let path = model_path(&a.model)?;
    let file = microllm_gguf::GgufFile::open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let tok = microllm_tokenizer::Tokenizer::from_gguf(file.metadata())?;
    let ids = tok.encode(&text, !a.no_bos, true)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
