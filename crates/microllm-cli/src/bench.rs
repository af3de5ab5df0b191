//! `microllm bench`: prompt processing (ppN) and generation (tgN) speed like llama-bench:
//! a warm-up run, then `-r` timed repetitions, mean ± sample standard deviation of tokens/s.
//! Prompts are pseudo-random token ids (fixed seed), so no tokenizer time is counted.

use std::time::Instant;

use anyhow::Result;
use clap::Args;
use microllm_engine::{KvType, LoadedModel, Logits, SeqBatch, State, StateOptions};
use microllm_kernels::{KernelPath, Kernels};
use serde::Serialize;

use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt lengths to time (comma-separated; 0 skips).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to time (comma-separated; 0 skips).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Context depth: tokens already in the KV cache before each test.
    #[arg(
        short = 'd',
        long = "depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Repetitions.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub reps: usize,
    /// Tokens per forward call during prompt processing.
    #[arg(short = 'b', long = "batch", default_value_t = 512)]
    pub batch: usize,
    /// KV cache format: f16, or q8_0 (about half the memory, slightly less precise).
    #[arg(long = "kv-type", default_value = "f16", value_name = "f16|q8_0")]
    pub kv_type: KvType,
    /// Sequences decoded together (continuous batching, like `microllm serve --parallel`):
    /// with N, a tgM test runs N sequences of M tokens through one batched forward per step
    /// (the server's numerics) and reports their aggregate tokens/s. Comma-separated; without
    /// it generation runs one sequence through the single-sequence forward.
    #[arg(long = "parallel", value_delimiter = ',')]
    pub parallel: Vec<usize>,
    /// Print a JSON array (llama-bench field names) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    build_commit: &'static str,
    model_filename: String,
    model_type: String,
    model_size: u64,
    model_n_params: u64,
    n_threads: usize,
    n_batch: usize,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    /// Sequences decoded together (0: the single-sequence forward).
    n_parallel: usize,
    test: String,
    type_k: &'static str,
    type_v: &'static str,
    kernels: String,
    cpu_info: String,
    avg_ts: f64,
    stddev_ts: f64,
    samples_ts: Vec<f64>,
    /// Bytes one generated token reads on average (weights used per token + the KV cache of
    /// the positions it attends to).
    bytes_per_token: u64,
    /// Generation only: `bytes_per_token × avg_ts`, in GB/s.
    read_gbs: Option<f64>,
    /// This machine's memory read bandwidth with `n_threads` threads (see [`read_bandwidth`]).
    mem_read_gbs: f64,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.reps == 0 {
        anyhow::bail!("-r must be at least 1");
    }
    let path = crate::model_path(&a.model)?;
    let lm = crate::load(&a.model)?;
    let c = &lm.model.config;
    let max_depth = a.depth.iter().copied().max().unwrap_or(0);
    let max_new = a
        .n_prompt
        .iter()
        .chain(&a.n_gen)
        .copied()
        .max()
        .unwrap_or(0);
    let n_ctx = max_depth + max_new + 1;
    let mut state = lm.model.new_state(StateOptions {
        n_ctx,
        n_batch: a.batch,
        kv_type: a.kv_type,
    })?;
    let quant = main_quant(&lm);
    let model_type = format!(
        "{} {} {}",
        c.arch.name(),
        microllm_store::human_params(lm.model.n_params()),
        quant
    );
    let cpu_info = cpu_name();
    let mem_gbs = read_bandwidth(lm.model.kernels(), lm.model.n_threads());
    if !a.json {
        println!(
            "memory read bandwidth: {mem_gbs:.1} GB/s ({} threads)\n",
            lm.model.n_threads()
        );
    }
    let w = &lm.model.weights;
    // The embedding is one row per token; the output matrix is read whole (it may be the same).
    let weight_read = lm.model.weight_bytes() - w.token_embd.n_bytes()
        + if w.tied_output { w.output.n_bytes() } else { 0 };
    let kv_per_pos = state.kv_bytes() as u64 / n_ctx as u64;
    if a.parallel.contains(&0) {
        anyhow::bail!("--parallel takes sequence counts of at least 1");
    }
    let max_par = a.parallel.iter().copied().max().unwrap_or(0);
    // The parallel sequences' states and the batched forward's scratch (made once).
    let mut par_states = (0..max_par)
        .map(|_| {
            lm.model.new_state(StateOptions {
                n_ctx,
                n_batch: a.batch,
                kv_type: a.kv_type,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut par_scratch = if max_par > 0 {
        Some(lm.model.new_scratch(max_par.max(a.batch))?)
    } else {
        None
    };
    let mut rows = Vec::new();
    let tokens = pseudo_random_tokens(max_depth + max_new + max_par, c.n_vocab);
    for &d in &a.depth {
        let pars: Vec<usize> = if a.parallel.is_empty() {
            vec![0]
        } else {
            a.parallel.clone()
        };
        let tests = a
            .n_prompt
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| (n, 0, 0))
            .chain(
                a.n_gen
                    .iter()
                    .filter(|&&n| n > 0)
                    .flat_map(|&n| pars.iter().map(move |&p| (0, n, p))),
            );
        for (np, ng, par) in tests {
            let mut samples = Vec::with_capacity(a.reps);
            for rep in 0..=a.reps {
                if par > 0 {
                    let scratch = par_scratch.as_mut().expect("made when --parallel is set");
                    let states = &mut par_states[..par];
                    // Each sequence's context: the depth's tokens shifted by its index.
                    for (i, st) in states.iter_mut().enumerate() {
                        prepare_depth(&lm, st, &tokens[i..i + d])?;
                    }
                    let t0 = Instant::now();
                    for step in 0..ng {
                        let mut seqs: Vec<SeqBatch<'_>> = states
                            .iter_mut()
                            .enumerate()
                            .map(|(i, st)| SeqBatch {
                                state: st,
                                tokens: std::slice::from_ref(&tokens[d + i + step]),
                                logits: Logits::Last,
                            })
                            .collect();
                        lm.model.forward_batch(scratch, &mut seqs)?;
                    }
                    let secs = t0.elapsed().as_secs_f64();
                    if rep > 0 {
                        samples.push((par * ng) as f64 / secs);
                    }
                    continue;
                }
                prepare_depth(&lm, &mut state, &tokens[..d])?;
                let t0 = Instant::now();
                if np > 0 {
                    lm.model
                        .forward(&mut state, &tokens[d..d + np], Logits::Last)?;
                } else {
                    for i in 0..ng {
                        lm.model
                            .forward(&mut state, &tokens[d + i..d + i + 1], Logits::Last)?;
                    }
                }
                let secs = t0.elapsed().as_secs_f64();
                if rep > 0 {
                    // rep 0 is the warm-up
                    samples.push((np + ng) as f64 / secs);
                }
            }
            let (avg, sd) = mean_sd(&samples);
            let mut test = if np > 0 {
                format!("pp{np}")
            } else {
                format!("tg{ng}")
            };
            if par > 0 {
                test.push_str(&format!(" x{par}"));
            }
            if d > 0 {
                test.push_str(&format!(" @ d{d}"));
            }
            // Generated token i (from 0) reads the keys and values of d + i + 1 positions: on
            // average d + (ng + 1) / 2.
            let bytes_per_token = weight_read + kv_per_pos * (2 * d + ng + 1) as u64 / 2;
            rows.push(Row {
                build_commit: env!("MICROLLM_COMMIT"),
                model_filename: path.display().to_string(),
                model_type: model_type.clone(),
                model_size: lm.model.weight_bytes(),
                model_n_params: lm.model.n_params(),
                n_threads: lm.model.n_threads(),
                n_batch: a.batch,
                n_prompt: np,
                n_gen: ng,
                n_depth: d,
                n_parallel: par,
                test,
                type_k: a.kv_type.name(),
                type_v: a.kv_type.name(),
                kernels: lm.model.kernels().path().to_string(),
                cpu_info: cpu_info.clone(),
                avg_ts: avg,
                stddev_ts: sd,
                samples_ts: samples,
                bytes_per_token,
                // A batched step reads the weights once for all its sequences.
                read_gbs: (ng > 0).then(|| bytes_per_token as f64 * avg / par.max(1) as f64 / 1e9),
                mem_read_gbs: mem_gbs,
            });
            if !a.json {
                let r = rows.last().expect("just pushed");
                if rows.len() == 1 {
                    println!(
                        "| model | size | params | kernels | threads | kv | test | t/s | GB/s |\n|---|---:|---:|---|---:|---|---:|---:|---:|"
                    );
                }
                println!(
                    "| {} | {:.2} MiB | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} |",
                    r.model_type,
                    r.model_size as f64 / (1024.0 * 1024.0),
                    microllm_store::human_params(r.model_n_params),
                    r.kernels,
                    r.n_threads,
                    r.type_k,
                    r.test,
                    r.avg_ts,
                    r.stddev_ts,
                    r.read_gbs.map_or("-".to_string(), |g| format!("{g:.1}"))
                );
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

/// Empties the state and fills the cache with `depth` tokens (untimed).
fn prepare_depth(lm: &LoadedModel, state: &mut State, depth: &[u32]) -> Result<()> {
    state.reset();
    if !depth.is_empty() {
        lm.model.forward(state, depth, Logits::None)?;
    }
    Ok(())
}

/// Read bandwidth of main memory in GB/s: `n_threads` threads sum disjoint parts of a 256 MiB
/// buffer (far larger than most caches); the best of 5 passes of each of two loops after
/// the buffer is touched: a portable one (four running u64 sums) and the kernels' SIMD one
/// (`Kernels::stream_sum`: 256-bit loads with a software prefetch a little ahead), since
/// which reads faster depends on the CPU (on an Intel Xeon the SIMD loop read 5-15% more
/// than the portable one, which had been the whole probe). The reference figure for a
/// generation speed: a decode step reads every weight once, so `bytes_per_token × tokens/s`
/// cannot exceed it. The buffer gets transparent huge pages where the OS allows them, as
/// the packed weights do: the probe measures what the machine can do, not what 4 KiB pages
/// cost.
fn read_bandwidth(kernels: &Kernels, n_threads: usize) -> f64 {
    const BYTES: usize = 256 << 20;
    let mut heap: Vec<u8>;
    let mut map = memmap2::MmapMut::map_anon(BYTES).ok();
    let buf: &mut [u8] = match map.as_mut() {
        Some(m) => {
            #[cfg(target_os = "linux")]
            let _ = m.advise(memmap2::Advice::HugePage);
            m
        }
        None => {
            heap = vec![0u8; BYTES];
            &mut heap
        }
    };
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(i as u64).to_ne_bytes());
    }
    let buf: &[u8] = buf;
    let n_threads = n_threads.max(1);
    let part = buf.len().div_ceil(n_threads);
    let scalar = Kernels::with_path(KernelPath::Scalar).unwrap_or(*kernels);
    let mut best = 0.0f64;
    for _ in 0..5 {
        for k in [&scalar, kernels] {
            let t0 = Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let handles: Vec<_> = buf
                    .chunks(part)
                    .map(|c| s.spawn(move || k.stream_sum(c)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0u64, u64::wrapping_add)
            });
            let secs = t0.elapsed().as_secs_f64();
            std::hint::black_box(total);
            best = best.max(BYTES as f64 / secs / 1e9);
        }
    }
    best
}

pub(crate) fn pseudo_random_tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % n_vocab as u64) as u32
        })
        .collect()
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The quantization of most of the weights (by bytes), e.g. "Q4_1".
pub fn main_quant(lm: &LoadedModel) -> String {
    let mut by_type: std::collections::BTreeMap<&str, u64> = Default::default();
    for t in lm.model.gguf().tensors() {
        *by_type.entry(t.ty.name()).or_default() += t.n_bytes;
    }
    if let Some(ft) = lm
        .model
        .gguf()
        .metadata()
        .get_u32("general.file_type")
        .ok()
        .flatten()
        .and_then(microllm_gguf::file_type_name)
    {
        return ft.to_string();
    }
    by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(n, _)| n.to_string())
        .unwrap_or_default()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
