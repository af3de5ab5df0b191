//! `microllm quantize | dequantize | imatrix | prune | kld | compare`: make a model smaller
//! and measure what it cost. The work is in `microllm-compress`; this file parses arguments,
//! draws progress bars and prints.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use microllm_compress::convert::{bits_per_weight, convert, ConvertOptions};
use microllm_compress::eval::{kld as kld_eval, KldStats};
use microllm_compress::imatrix::{collect, Imatrix};
use microllm_compress::prune::{
    block_count, block_scores, pick_blocks, prune as prune_file, DropSpec,
};
use microllm_compress::recipe::{dequantize_plan, plan, FileType, Override, PlanOptions};
use microllm_compress::report::{Comparison, Row};
use microllm_compress::{check_distinct_paths, Progress};
use microllm_engine::{LoadedModel, Logits, StateOptions};
use microllm_gguf::GgufFile;

use crate::ModelArgs;

/// An indicatif bar on stderr behind the library's progress trait.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Self {
        let pb = indicatif::ProgressBar::hidden();
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        Bar(pb)
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        self.0.reset();
        self.0.set_length(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {percent:>3}% {elapsed_precise} eta {eta}",
        ) {
            self.0.set_style(style.progress_chars("=> "));
        }
        self.0.set_message(what.to_string());
    }
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn open(path: &Path) -> Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("reading {} as a GGUF model", path.display()))
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or(0)
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The source model (.gguf; F32/F16/BF16 ideally, quantized allowed with a warning).
    pub input: PathBuf,
    /// The file to write (written to a temporary file, then renamed).
    pub output: PathBuf,
    /// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K
    /// (Q3_K, Q4_K, Q5_K = the _M mixes).
    #[arg(value_name = "TYPE")]
    pub ty: String,
    /// Override the type of tensors whose name matches PATTERN (a regular expression), e.g.
    /// `attn_v=Q8_0`; repeatable, first match wins.
    #[arg(long = "tensor-type", value_name = "PATTERN=TYPE")]
    pub tensor_type: Vec<String>,
    /// Weight the rounding by this importance matrix (from `microllm imatrix` or llama-imatrix).
    #[arg(long)]
    pub imatrix: Option<PathBuf>,
    /// Give every quantizable tensor the type itself (no mix), like llama-quantize --pure.
    #[arg(long)]
    pub pure: bool,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let ft = FileType::parse(&a.ty)?;
    let overrides = a
        .tensor_type
        .iter()
        .map(|s| Override::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    check_distinct_paths(&a.input, &a.output)?;
    let file = open(&a.input)?;
    let imatrix = match &a.imatrix {
        Some(p) => Some(
            Imatrix::load(p)
                .with_context(|| format!("reading the importance matrix {}", p.display()))?,
        ),
        None => None,
    };
    let opts = PlanOptions {
        overrides,
        pure: a.pure,
        has_imatrix: imatrix.is_some(),
    };
    let plan = plan(&file, ft, &opts)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let requant = plan.requantizes();
    if !requant.is_empty() {
        eprintln!(
            "warning: requantizing {} tensors that are already quantized (e.g. {} is {}); the result is worse than quantizing the original F32/F16/BF16 weights",
            requant.len(),
            requant[0].name,
            requant[0].from
        );
    }
    let imatrix_name = a.imatrix.as_ref().map(|p| p.display().to_string());
    let copts = ConvertOptions {
        kernels: crate::kernels()?,
        n_threads: threads(a.threads),
        imatrix: imatrix.as_ref(),
        imatrix_file: imatrix_name.as_deref(),
    };
    let t0 = Instant::now();
    let bar = Bar::new();
    let (w, report) = convert(&file, &plan, &copts, &bar)?;
    if !report.missing_imatrix.is_empty() {
        eprintln!(
            "warning: the importance matrix has no data for {} tensors (e.g. {}); they were quantized without it",
            report.missing_imatrix.len(),
            report.missing_imatrix[0]
        );
    }
    w.write_file(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let mut by_type: std::collections::BTreeMap<String, usize> = Default::default();
    for t in &plan.tensors {
        *by_type.entry(t.to.name().to_string()).or_default() += 1;
    }
    let mix: Vec<String> = by_type.iter().map(|(k, v)| format!("{v} {k}")).collect();
    eprintln!(
        "{} -> {} ({}): {:.1} MiB -> {:.1} MiB, {} tensors converted, {} copied [{}] in {:.1} s",
        a.input.display(),
        a.output.display(),
        ft,
        report.bytes_in as f64 / 1048576.0,
        report.bytes_out as f64 / 1048576.0,
        report.n_converted,
        report.n_copied,
        mix.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct DequantizeArgs {
    pub input: PathBuf,
    pub output: PathBuf,
    /// F32 or F16.
    #[arg(long = "type", default_value = "F32")]
    pub ty: String,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn dequantize(a: DequantizeArgs) -> Result<()> {
    let ft = FileType::parse(&a.ty)?;
    if !matches!(ft, FileType::F32 | FileType::F16) {
        bail!("dequantize writes F32 or F16, not {ft}; use `microllm quantize` for other types");
    }
    check_distinct_paths(&a.input, &a.output)?;
    let file = open(&a.input)?;
    let plan = dequantize_plan(&file, ft)?;
    let copts = ConvertOptions {
        kernels: crate::kernels()?,
        n_threads: threads(a.threads),
        imatrix: None,
        imatrix_file: None,
    };
    let bar = Bar::new();
    let (w, report) = convert(&file, &plan, &copts, &bar)?;
    w.write_file(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "{} -> {} ({ft}): {:.1} MiB -> {:.1} MiB, {} tensors converted",
        a.input.display(),
        a.output.display(),
        report.bytes_in as f64 / 1048576.0,
        report.bytes_out as f64 / 1048576.0,
        report.n_converted
    );
    Ok(())
}

fn read_text(f: &Path) -> Result<String> {
    std::fs::read_to_string(f)
        .with_context(|| format!("reading {} (it must be UTF-8 text)", f.display()))
}

fn bos_of(lm: &LoadedModel) -> Option<u32> {
    if lm.tokenizer.add_bos() {
        lm.tokenizer.bos_id()
    } else {
        None
    }
}

#[derive(Args, Debug)]
pub struct ImatrixArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Where to write the matrix (llama.cpp's GGUF imatrix format).
    #[arg(short = 'o', long = "output", default_value = "imatrix.gguf")]
    pub output: PathBuf,
    /// Window size in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    pub ctx: usize,
    /// Use only the first N windows.
    #[arg(long)]
    pub chunks: Option<usize>,
}

pub fn imatrix(a: ImatrixArgs) -> Result<()> {
    let text = read_text(&a.file)?;
    let lm = crate::load(&a.model)?;
    let tokens = lm.tokenize(&text)?;
    let dataset = a.file.display().to_string();
    let bar = Bar::new();
    let im = collect(
        &lm.model,
        &tokens,
        bos_of(&lm),
        a.ctx,
        a.chunks,
        &dataset,
        &bar,
    )?;
    im.save(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "importance matrix of {} weights from {} windows of {} tokens written to {}",
        im.entries.len(),
        im.chunk_count,
        im.chunk_size,
        a.output.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    pub input: PathBuf,
    pub output: PathBuf,
    /// N (pick the N blocks that change the residual stream least on --file) or a list i,j,k.
    #[arg(long = "drop-layers", value_name = "N|i,j,k")]
    pub drop_layers: String,
    /// Calibration text (needed with a count N).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Window size in tokens for the calibration.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    pub ctx: usize,
    /// Calibration windows.
    #[arg(long, default_value_t = 8)]
    pub chunks: usize,
    /// Compute threads (default: physical cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn prune(a: PruneArgs) -> Result<()> {
    let spec = DropSpec::parse(&a.drop_layers)?;
    check_distinct_paths(&a.input, &a.output)?;
    let drop = match spec {
        DropSpec::Layers(v) => v,
        DropSpec::Count(n) => {
            let Some(f) = &a.file else {
                bail!("--drop-layers {n} picks blocks on calibration text: give it with -f FILE (or list the blocks, e.g. --drop-layers 3,5,7)");
            };
            let text = read_text(f)?;
            let args = ModelArgs {
                model: Some(a.input.display().to_string()),
                threads: a.threads,
                exact: false,
            };
            let lm = crate::load_path(&a.input, &args)?;
            let tokens = lm.tokenize(&text)?;
            let bar = Bar::new();
            let scores =
                block_scores(&lm.model, &tokens, bos_of(&lm), a.ctx, Some(a.chunks), &bar)?;
            let picked = pick_blocks(&scores, n)?;
            eprintln!("angular distance per block (input vs output of the block, 0..1):");
            for (i, s) in scores.iter().enumerate() {
                eprintln!(
                    "  blk.{i:<3} {s:.4}{}",
                    if picked.contains(&i) {
                        "  <- dropped"
                    } else {
                        ""
                    }
                );
            }
            picked
        }
    };
    let file = open(&a.input)?;
    let n_before = block_count(&file)?;
    let (w, warnings) = prune_file(&file, &drop)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    w.write_file(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "dropped blocks {:?}: {} -> {} blocks, written to {}",
        drop,
        n_before,
        n_before - drop.len(),
        a.output.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct KldArgs {
    /// The reference model.
    #[arg(long)]
    pub base: PathBuf,
    /// The model to measure (-m MODEL).
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
    /// Print the statistics as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn kld(a: KldArgs) -> Result<()> {
    let text = read_text(&a.file)?;
    let base = crate::load_path(&a.base, &a.model)?;
    let lm = crate::load(&a.model)?;
    let tokens = base.tokenize(&text)?;
    let bar = Bar::new();
    let (base_ppl, stats) = kld_eval(
        &base.model,
        &[&lm.model],
        &tokens,
        bos_of(&base),
        a.ctx,
        a.chunks,
        512,
        &bar,
    )?;
    let s = &stats[0];
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            base_ppl: f64,
            #[serde(flatten)]
            stats: &'a KldStats,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Out {
                base_ppl: base_ppl.ppl,
                stats: s
            })?
        );
    } else {
        println!(
            "chunks: {}, tokens scored: {}",
            s.ppl.n_chunks, s.ppl.n_tokens_scored
        );
        println!(
            "base PPL:      {:.4} ± {:.5}",
            base_ppl.ppl, base_ppl.ppl_err
        );
        println!("model PPL:     {:.4} ± {:.5}", s.ppl.ppl, s.ppl.ppl_err);
        println!("PPL ratio:     {:.5}", s.ppl_ratio);
        println!("mean KLD:      {:.6} ± {:.6}", s.kld_mean, s.kld_err);
        println!("99% KLD:       {:.6}", s.kld_p99);
        println!("top-1 agree:   {:.3}%", s.top1_agreement * 100.0);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The reference model.
    pub base: PathBuf,
    /// The variants (quantized, pruned …) of the same model.
    #[arg(required = true)]
    pub variants: Vec<PathBuf>,
    /// The text file.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Window size in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    pub ctx: usize,
    /// Use only the first N windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Write PREFIX.md, PREFIX.json and PREFIX.svg.
    #[arg(short = 'o', long = "output", default_value = "compare")]
    pub output: PathBuf,
    /// Prompt length timed for the pp speed.
    #[arg(long, default_value_t = 128)]
    pub pp: usize,
    /// Tokens generated for the tg speed.
    #[arg(long, default_value_t = 32)]
    pub tg: usize,
    /// Timed repetitions of each speed test (after one warm-up).
    #[arg(short = 'r', long = "repetitions", default_value_t = 2)]
    pub reps: usize,
    /// Skip the speed measurements.
    #[arg(long)]
    pub no_speed: bool,
    /// Compute threads (default: physical cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

/// Mean tokens/s of a prompt of `n_prompt` tokens and of `n_gen` single-token steps.
fn speed(lm: &LoadedModel, n_prompt: usize, n_gen: usize, reps: usize) -> Result<(f64, f64)> {
    let tokens = crate::bench::pseudo_random_tokens(n_prompt + n_gen, lm.model.config.n_vocab);
    let mut state = lm.model.new_state(StateOptions {
        n_ctx: n_prompt + n_gen + 1,
        n_batch: n_prompt.max(1),
        ..StateOptions::default()
    })?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for rep in 0..=reps.max(1) {
        state.reset();
        let t0 = Instant::now();
        lm.model
            .forward(&mut state, &tokens[..n_prompt], Logits::Last)?;
        let pp_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for i in 0..n_gen {
            lm.model.forward(
                &mut state,
                &tokens[n_prompt + i..n_prompt + i + 1],
                Logits::Last,
            )?;
        }
        let tg_s = t1.elapsed().as_secs_f64();
        if rep > 0 {
            pp.push(n_prompt as f64 / pp_s);
            tg.push(n_gen as f64 / tg_s);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok((mean(&pp), mean(&tg)))
}

pub fn compare(a: CompareArgs) -> Result<()> {
    if a.pp == 0 || a.tg == 0 {
        bail!("--pp and --tg must be at least 1 (or use --no-speed)");
    }
    let text = read_text(&a.file)?;
    let margs = ModelArgs {
        model: None,
        threads: a.threads,
        exact: false,
    };
    let mut paths = vec![a.base.clone()];
    paths.extend(a.variants.iter().cloned());
    let models = paths
        .iter()
        .map(|p| crate::load_path(p, &margs))
        .collect::<Result<Vec<_>>>()?;
    let base = &models[0];
    let tokens = base.tokenize(&text)?;
    let bar = Bar::new();
    let variants: Vec<&microllm_engine::Model> = models[1..].iter().map(|m| &m.model).collect();
    let (base_ppl, stats) = kld_eval(
        &base.model,
        &variants,
        &tokens,
        bos_of(base),
        a.ctx,
        a.chunks,
        512,
        &bar,
    )?;
    let mut rows = Vec::new();
    for (i, (lm, path)) in models.iter().zip(&paths).enumerate() {
        let (pp, tg) = if a.no_speed {
            (None, None)
        } else {
            eprintln!("timing {} …", path.display());
            let (pp, tg) = speed(lm, a.pp, a.tg, a.reps)?;
            (Some(pp), Some(tg))
        };
        let (ppl, ppl_err, kld, top1, ratio) = if i == 0 {
            (base_ppl.ppl, base_ppl.ppl_err, 0.0, 1.0, 1.0)
        } else {
            let s = &stats[i - 1];
            (
                s.ppl.ppl,
                s.ppl.ppl_err,
                s.kld_mean,
                s.top1_agreement,
                s.ppl_ratio,
            )
        };
        rows.push(Row {
            name: path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            path: path.display().to_string(),
            quant: crate::bench::main_quant(lm),
            n_layer: lm.model.config.n_layer,
            size_bytes: lm.model.weight_bytes(),
            bits_per_weight: bits_per_weight(lm.model.gguf()),
            ppl,
            ppl_err,
            kld,
            top1,
            ppl_ratio: ratio,
            pp_ts: pp,
            tg_ts: tg,
        });
    }
    let cmp = Comparison {
        text_file: a.file.file_name().map_or_else(
            || a.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        n_ctx: a.ctx,
        n_chunks: base_ppl.n_chunks,
        n_tokens_scored: base_ppl.n_tokens_scored,
        rows,
    };
    let with_ext = |ext: &str| {
        let mut p = a.output.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let md = cmp.markdown();
    for (ext, content) in [(".md", &md), (".json", &cmp.json()), (".svg", &cmp.svg())] {
        let p = with_ext(ext);
        write_atomic(&p, content.as_bytes())?;
    }
    println!("{md}");
    eprintln!(
        "wrote {}, {} and {}",
        with_ext(".md").display(),
        with_ext(".json").display(),
        with_ext(".svg").display()
    );
    Ok(())
}

/// Writes a small file through a temporary name and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = {
        let mut t = path.as_os_str().to_owned();
        t.push(format!(".tmp-{}", std::process::id()));
        PathBuf::from(t)
    };
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
