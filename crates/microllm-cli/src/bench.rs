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
    /// This machine's memory read bandwidth with `n_threads` threads (see [`Probe`]): the
    /// median of the probe passes taken alternately with this test's repetitions (a prompt
    /// test: of the passes taken before the tests).
    mem_read_gbs: f64,
    /// The best of those passes.
    mem_read_best_gbs: f64,
    /// Generation only: `read_gbs / mem_read_gbs`, the share of the memory bandwidth the
    /// decode reads weights at.
    read_share: Option<f64>,
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
    let probe = Probe::new(lm.model.kernels(), lm.model.n_threads());
    let first_passes: Vec<f64> = (0..PROBE_FIRST_PASSES).map(|_| probe.pass()).collect();
    let first_bw = median(&first_passes);
    let first_best = first_passes.iter().copied().fold(0.0, f64::max);
    if !a.json {
        println!(
            "memory read bandwidth: {first_bw:.1} GB/s median, {first_best:.1} best of {} passes ({} threads)\n",
            first_passes.len(),
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
            // Generation is bounded by the memory bandwidth: a probe pass before each timed
            // repetition measures it in the same minute, on this shared and noisy machine.
            let mut passes = Vec::with_capacity(a.reps);
            for rep in 0..=a.reps {
                if rep > 0 && ng > 0 {
                    passes.push(probe.pass());
                }
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
            // A batched step reads the weights once for all its sequences.
            let read_gbs = (ng > 0).then(|| bytes_per_token as f64 * avg / par.max(1) as f64 / 1e9);
            let (mem_read_gbs, mem_read_best_gbs) = if passes.is_empty() {
                (first_bw, first_best)
            } else {
                (median(&passes), passes.iter().copied().fold(0.0, f64::max))
            };
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
                read_gbs,
                mem_read_gbs,
                mem_read_best_gbs,
                read_share: read_gbs.map(|g| g / mem_read_gbs),
            });
            if !a.json {
                let r = rows.last().expect("just pushed");
                if rows.len() == 1 {
                    println!(
                        "| model | size | params | kernels | threads | kv | test | t/s | GB/s | of memory |\n|---|---:|---:|---|---:|---|---:|---:|---:|---:|"
                    );
                }
                println!(
                    "| {} | {:.2} MiB | {} | {} | {} | {} | {} | {:.2} ± {:.2} | {} | {} |",
                    r.model_type,
                    r.model_size as f64 / (1024.0 * 1024.0),
                    microllm_store::human_params(r.model_n_params),
                    r.kernels,
                    r.n_threads,
                    r.type_k,
                    r.test,
                    r.avg_ts,
                    r.stddev_ts,
                    r.read_gbs.map_or("-".to_string(), |g| format!("{g:.1}")),
                    r.read_share.map_or("-".to_string(), |f| format!(
                        "{:.0}% of {:.1}",
                        100.0 * f,
                        r.mem_read_gbs
                    ))
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

/// Probe passes taken before the tests (their median is the prompt tests' figure and the one
/// printed first).
const PROBE_FIRST_PASSES: usize = 5;

/// The bandwidth probe: main memory's read bandwidth in GB/s, `n_threads` threads summing
/// disjoint parts of a 256 MiB buffer (far larger than most caches, touched once at
/// creation). Each pass runs two loops and keeps the faster: a portable one (four running
/// u64 sums) and the kernels' SIMD one (`Kernels::stream_sum`: 256-bit loads with a
/// software prefetch a little ahead), since which reads faster depends on the CPU (on an
/// Intel Xeon the SIMD loop read 5-15% more than the portable one). The reference figure
/// for a generation speed: a decode step reads every weight once, so `bytes_per_token ×
/// tokens/s` cannot durably exceed it. On a shared machine the bandwidth moves by 10-15%
/// from minute to minute, so `microllm bench` takes a pass before each timed repetition of
/// a generation test and reports the median (and the best) of those passes. The buffer gets
/// transparent huge pages where the OS allows them, as the packed weights do: the probe
/// measures what the machine can do, not what 4 KiB pages cost.
struct Probe<'k> {
    map: Option<memmap2::MmapMut>,
    heap: Vec<u8>,
    kernels: &'k Kernels,
    scalar: Kernels,
    n_threads: usize,
}

impl<'k> Probe<'k> {
    const BYTES: usize = 256 << 20;

    fn new(kernels: &'k Kernels, n_threads: usize) -> Self {
        let mut map = memmap2::MmapMut::map_anon(Self::BYTES).ok();
        let mut heap = Vec::new();
        let buf: &mut [u8] = match map.as_mut() {
            Some(m) => {
                #[cfg(target_os = "linux")]
                let _ = m.advise(memmap2::Advice::HugePage);
                m
            }
            None => {
                heap = vec![0u8; Self::BYTES];
                &mut heap
            }
        };
        for (i, c) in buf.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(i as u64).to_ne_bytes());
        }
        Self {
            map,
            heap,
            kernels,
            scalar: Kernels::with_path(KernelPath::Scalar).unwrap_or(*kernels),
            n_threads: n_threads.max(1),
        }
    }

    /// One pass of each loop over the whole buffer: the faster one's GB/s.
    fn pass(&self) -> f64 {
        let buf: &[u8] = match &self.map {
            Some(m) => m,
            None => &self.heap,
        };
        let part = buf.len().div_ceil(self.n_threads);
        let mut best = 0.0f64;
        for k in [&self.scalar, self.kernels] {
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
            best = best.max(buf.len() as f64 / secs / 1e9);
        }
        best
    }
}

/// The median of `v` (0 if empty).
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
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
