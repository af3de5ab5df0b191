//! The engine thread: owns the model's sequence slots and runs the continuous-batching loop.
//!
//! One thread, synchronous, no async: the forward pass is CPU-bound and already parallel in
//! the model's own pool, so the HTTP side only hands work over a bounded channel and reads
//! events back. Every loop iteration ("step"):
//! 1. drops sequences whose client went away (their event receiver is closed);
//! 2. admits queued requests into free slots, choosing the slot whose cached tokens share the
//!    longest prefix with the new prompt, least recently used on a tie, and copies in the KV
//!    of whatever longer prefix the block store ([`PrefixCache`]) holds;
//! 3. runs ONE batched forward holding every decoding sequence's pending token and up to
//!    `n_prefill_chunk` prompt tokens, oldest request first, so a long prompt delays the
//!    running decodes by one chunk per step rather than by its whole length, and the weights
//!    are read once per step for all of it;
//! 4. samples the next token of every sequence whose logits that forward produced.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use microllm_engine::{
    EngineError, KvType, LoadedModel, Logits, ModelError, Sampler, SamplerConfig, Scratch,
    SeqBatch, State, StateOptions,
};
use microllm_sample::log_softmax_top;
use microllm_tokenizer::StreamDecoder;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::embed::Embedder;
use crate::error::AppError;
use crate::metrics::{EndReason, Metrics};
use crate::prefix_cache::PrefixCache;
use crate::stop::StopMatcher;
use crate::ServerError;

/// Sizes of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequence slots, each with its own KV cache (`--parallel`).
    pub n_parallel: usize,
    /// Context (KV positions) of each slot (`--ctx`): prompt + generated tokens of one request.
    pub n_ctx: usize,
    /// Most prompt tokens evaluated in one step, over all prefilling requests.
    pub n_prefill_chunk: usize,
    /// Requests that may wait for a slot; beyond that a request is refused (429).
    pub max_queue: usize,
    /// Bytes of KV the prefix cache's blocks may hold (`--prefix-cache-mb`); 0 turns it off
    /// (a slot still reuses the prefix it holds itself).
    pub prefix_cache_bytes: usize,
    /// Token positions per prefix-cache block.
    pub prefix_block_tokens: usize,
    /// KV cache format of every slot (`--kv-type`).
    pub kv_type: KvType,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            n_parallel: 4,
            n_ctx: 2048,
            n_prefill_chunk: 256,
            max_queue: 64,
            prefix_cache_bytes: 256 << 20,
            prefix_block_tokens: 32,
            kv_type: KvType::F16,
        }
    }
}

/// Per-request generation settings, already validated.
#[derive(Debug, Clone)]
pub(crate) struct GenParams {
    /// `None`: until an end-of-generation token, a stop string or a full context.
    pub max_tokens: Option<usize>,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    /// `Some(k)`: report each token's logprob and the `k` most likely alternatives.
    pub top_logprobs: Option<usize>,
    /// Keep going past end-of-generation tokens (llama.cpp's `ignore_eos`; load tests).
    pub ignore_eos: bool,
}

pub(crate) struct GenJob {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub events: tmpsc::UnboundedSender<Event>,
    pub arrived: Instant,
}

/// A generated token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone)]
pub(crate) struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens reused from the prefix cache.
    pub cached_tokens: usize,
}

/// What the engine tells a request's handler, in order: deltas, then `Done` or `Error`.
#[derive(Debug)]
pub(crate) enum Event {
    /// Text that became final (may be empty when a stop string might be starting) and the
    /// sampled token's logprob when asked for.
    Delta {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        usage: Usage,
    },
    Error(AppError),
}

pub(crate) struct EmbedJob {
    pub inputs: Vec<Vec<u32>>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, AppError>>,
}

pub(crate) enum Job {
    Generate(GenJob),
    Embed(EmbedJob),
}

struct Shared {
    metrics: Arc<Metrics>,
    shutdown: AtomicBool,
    /// When in-flight generations are cut off after a shutdown began.
    deadline: Mutex<Option<Instant>>,
}

/// Handle to the engine thread.
pub struct Engine {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    cfg: EngineConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg).finish()
    }
}

impl Engine {
    /// Allocates the slots (all KV caches up front) and starts the engine thread.
    pub fn start(
        lm: Arc<LoadedModel>,
        cfg: EngineConfig,
        embedder: Box<dyn Embedder>,
        metrics: Arc<Metrics>,
    ) -> Result<Engine, ServerError> {
        if cfg.n_parallel == 0
            || cfg.n_ctx < 2
            || cfg.n_prefill_chunk == 0
            || cfg.max_queue == 0
            || cfg.prefix_block_tokens == 0
        {
            return Err(ServerError::Config(format!(
                "--parallel, --max-queue, --prefill-chunk and the prefix-cache block size must be at least 1 and --ctx at least 2 (got {cfg:?})"
            )));
        }
        let mut cfg = cfg;
        // A step never holds more prompt rows than a context.
        cfg.n_prefill_chunk = cfg.n_prefill_chunk.min(cfg.n_ctx);
        let (tx, rx) = mpsc::sync_channel(cfg.max_queue);
        let shared = Arc::new(Shared {
            metrics,
            shutdown: AtomicBool::new(false),
            deadline: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread_cfg = cfg.clone();
        let handle = std::thread::Builder::new()
            .name("microllm-engine".into())
            .spawn(
                move || match Scheduler::new(&lm, thread_cfg, rx, thread_shared, embedder) {
                    Ok(mut s) => {
                        let _ = ready_tx.send(Ok(()));
                        s.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )
            .map_err(ServerError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(ServerError::Engine(e));
            }
            Err(_) => {
                let _ = handle.join();
                return Err(ServerError::EngineDied);
            }
        }
        Ok(Engine {
            tx,
            shared,
            thread: Mutex::new(Some(handle)),
            cfg,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Refuses early (429 / 503) when a job would be refused now, so a handler can skip
    /// templating and tokenizing for a request that cannot be queued. [`Engine::submit`]
    /// still decides.
    pub(crate) fn check_capacity(&self) -> Result<(), AppError> {
        if self.shared.shutdown.load(Relaxed) {
            return Err(AppError::ShuttingDown);
        }
        if self.shared.metrics.queue_depth.load(Relaxed) >= self.cfg.max_queue as u64 {
            return Err(AppError::QueueFull {
                max_queue: self.cfg.max_queue,
            });
        }
        Ok(())
    }

    /// Queues a job; refuses at once when the queue is full (429) or the engine is stopping.
    pub(crate) fn submit(&self, job: Job) -> Result<(), AppError> {
        if self.shared.shutdown.load(Relaxed) {
            return Err(AppError::ShuttingDown);
        }
        let depth = &self.shared.metrics.queue_depth;
        depth.fetch_add(1, Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                depth.fetch_sub(1, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => AppError::QueueFull {
                        max_queue: self.cfg.max_queue,
                    },
                    TrySendError::Disconnected(_) => AppError::ShuttingDown,
                })
            }
        }
    }

    /// Stops admitting work: queued requests are refused (503), running generations may
    /// finish within `grace`, after which they are cut off with an error.
    pub fn begin_shutdown(&self, grace: Duration) {
        let mut d = self
            .shared
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = Some(Instant::now() + grace);
        }
        self.shared.shutdown.store(true, Relaxed);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.load(Relaxed)
    }

    /// Waits for the engine thread to end (call after [`Engine::begin_shutdown`]).
    pub fn join(&self) {
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

/// One sequence slot: a KV cache that outlives its requests (the slot's own prefix reuse).
struct Slot {
    state: State,
    /// The tokens whose keys/values are in `state`, in order.
    history: Vec<u32>,
    /// Engine tick of the last request that ended here (LRU among free slots).
    last_used: u64,
    seq: Option<Seq>,
}

/// The request running in a slot.
struct Seq {
    job: GenJob,
    /// Admission order: prefill goes oldest first.
    id: u64,
    /// Prompt tokens already in the slot's KV cache.
    n_done: usize,
    /// Prompt tokens that came from the prefix cache.
    n_cached: usize,
    prefilled: bool,
    max_tokens: usize,
    sampler: Sampler,
    generated: Vec<u32>,
    decoder: StreamDecoder,
    stop: StopMatcher,
    /// Sampled, not yet evaluated: the next step feeds it.
    pending: Option<u32>,
    /// Drawn from this step's logits, not yet handled (see `Scheduler::draw_all`).
    drawn: Option<u32>,
    last_token_at: Option<Instant>,
    top: Vec<(u32, f32)>,
}

/// What one slot contributes to a step's forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Its pending token (one row).
    Decode(u32),
    /// Prompt tokens `from..to`.
    Prefill { from: usize, to: usize },
}

struct Scheduler<'m> {
    lm: &'m LoadedModel,
    cfg: EngineConfig,
    slots: Vec<Slot>,
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    embedder: Box<dyn Embedder>,
    /// Blocks of earlier requests' KV, shared by all slots.
    cache: PrefixCache,
    /// Activations of one step: a row per slot plus a prefill chunk.
    scratch: Scratch,
    tick: u64,
    next_id: u64,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Where a running request stands, as [`plan_step`] sees it.
#[derive(Clone, Copy, Debug)]
struct Progress {
    /// Admission order.
    id: u64,
    /// Its sampled, not yet evaluated token (it is decoding).
    pending: Option<u32>,
    /// Prompt tokens in its KV cache.
    done: usize,
    n_prompt: usize,
}

/// What a step evaluates: each decoding slot's pending token, then prompt chunks oldest
/// request first within `budget` rows. `slots[i]` is slot `i`'s request, if any.
fn plan_step(slots: &[Option<Progress>], budget: usize) -> Vec<Option<Work>> {
    let mut work: Vec<Option<Work>> = slots
        .iter()
        .map(|s| s.and_then(|p| p.pending.map(Work::Decode)))
        .collect();
    let mut order: Vec<(u64, usize)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.filter(|p| p.pending.is_none() && p.done < p.n_prompt)
                .map(|p| (p.id, i))
        })
        .collect();
    order.sort_unstable();
    let mut left = budget;
    for (_, i) in order {
        if left == 0 {
            break;
        }
        if let Some(p) = slots[i] {
            let to = (p.done + left).min(p.n_prompt);
            work[i] = Some(Work::Prefill { from: p.done, to });
            left -= to - p.done;
        }
    }
    work
}

impl<'m> Scheduler<'m> {
    fn new(
        lm: &'m LoadedModel,
        cfg: EngineConfig,
        rx: Receiver<Job>,
        shared: Arc<Shared>,
        embedder: Box<dyn Embedder>,
    ) -> Result<Self, EngineError> {
        // Every forward goes through the shared scratch, so a slot's own scratch needs a row.
        let opts = StateOptions {
            n_ctx: cfg.n_ctx,
            n_batch: 1,
            kv_type: cfg.kv_type,
        };
        let mut slots = Vec::with_capacity(cfg.n_parallel);
        let mut kv_bytes = 0;
        for _ in 0..cfg.n_parallel {
            let state = lm.model.new_state(opts)?;
            kv_bytes += state.kv_bytes();
            slots.push(Slot {
                state,
                history: Vec::with_capacity(cfg.n_ctx),
                last_used: 0,
                seq: None,
            });
        }
        let scratch = lm.model.new_scratch(cfg.n_parallel + cfg.n_prefill_chunk)?;
        let bytes_per_pos = slots.first().map_or(0, |s| s.state.kv_bytes_per_pos());
        let cache = PrefixCache::new(
            cfg.prefix_block_tokens,
            bytes_per_pos,
            cfg.prefix_cache_bytes,
        );
        let m = &shared.metrics;
        m.slots_total.store(cfg.n_parallel as u64, Relaxed);
        m.kv_tokens_capacity
            .store((cfg.n_parallel * cfg.n_ctx) as u64, Relaxed);
        m.kv_bytes.store(kv_bytes as u64, Relaxed);
        let cap = cache.capacity_blocks() * cache.block_tokens() * bytes_per_pos;
        m.prefix_cache_capacity_bytes.store(cap as u64, Relaxed);
        Ok(Scheduler {
            lm,
            cfg,
            slots,
            rx,
            shared,
            embedder,
            cache,
            scratch,
            tick: 0,
            next_id: 0,
        })
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn n_active(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    fn run(&mut self) {
        loop {
            self.reap_cancelled();
            if self.shared.shutdown.load(Relaxed) {
                self.refuse_queued();
                let deadline = *self
                    .shared
                    .deadline
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    self.abort_all();
                }
                if self.n_active() == 0 {
                    break;
                }
            } else if !self.admit() {
                break; // every sender is gone and nothing runs
            }
            if self.n_active() > 0 {
                self.step();
            }
            self.publish_gauges();
        }
        self.publish_gauges();
    }

    /// Pulls queued jobs while a slot is free; blocks briefly when nothing runs. Returns false
    /// when the channel is closed and the engine is idle.
    fn admit(&mut self) -> bool {
        loop {
            if self.slots.iter().all(|s| s.seq.is_some()) {
                return true;
            }
            let job = if self.n_active() == 0 {
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout) => return true,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
                }
            };
            self.metrics().queue_depth.fetch_sub(1, Relaxed);
            match job {
                Job::Embed(e) => self.embed(e),
                Job::Generate(g) => self.start(g),
            }
            if self.shared.shutdown.load(Relaxed) {
                return true;
            }
        }
    }

    fn embed(&mut self, job: EmbedJob) {
        let mut out = Vec::with_capacity(job.inputs.len());
        for ids in &job.inputs {
            match self.embedder.embed(self.lm, ids) {
                Ok(v) => out.push(v),
                Err(e) => {
                    let _ = job.reply.send(Err(AppError::Internal(e)));
                    return;
                }
            }
        }
        let _ = job.reply.send(Ok(out));
    }

    /// Puts a request into the free slot whose cache holds the longest prefix of its prompt,
    /// then extends that prefix with the prefix cache's blocks where they reach further.
    fn start(&mut self, job: GenJob) {
        if job.events.is_closed() {
            self.metrics().record_finish(EndReason::Cancelled);
            return;
        }
        if job.prompt.is_empty() {
            let msg = "the prompt is empty: give at least one token";
            let _ = job.events.send(Event::Error(AppError::bad(msg)));
            return;
        }
        let Some((idx, common)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .map(|(i, s)| (i, common_prefix(&s.history, &job.prompt)))
            .max_by_key(|&(i, common)| (common, std::cmp::Reverse(self.slots[i].last_used)))
        else {
            return; // unreachable: admit() checks for a free slot first
        };
        let sampler = match Sampler::new(job.params.sampler.clone(), self.lm.model.config.n_vocab) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.events.send(Event::Error(AppError::bad(e.to_string())));
                return;
            }
        };
        let n_prompt = job.prompt.len();
        // The last prompt token is always evaluated: its logits give the first answer token.
        let reusable = &job.prompt[..n_prompt - 1];
        let keep = common.min(reusable.len());
        let chain = self.cache.lookup(reusable);
        let bt = self.cache.block_tokens();
        let slot = &mut self.slots[idx];
        slot.state.truncate(keep);
        slot.history.truncate(keep);
        if chain.len() * bt > keep {
            // Blocks from the one holding position `keep` on; earlier ones are in the slot.
            let first = keep / bt;
            slot.state.truncate(first * bt);
            slot.history.truncate(first * bt);
            for (j, &id) in chain.iter().enumerate().skip(first) {
                let Some(kv) = self.cache.kv(id) else { break };
                if slot.state.kv_write(&self.lm.model, j * bt, kv).is_err() {
                    break; // nothing written: the slot still holds history[..j * bt]
                }
                slot.history
                    .extend_from_slice(&reusable[j * bt..(j + 1) * bt]);
            }
        }
        let n_cached = slot.history.len();
        let m = self.metrics();
        m.prompt_tokens.fetch_add(n_prompt as u64, Relaxed);
        if n_cached > 0 {
            m.prefix_cache_hit_tokens
                .fetch_add(n_cached as u64, Relaxed);
            m.prefix_cache_hit_requests.fetch_add(1, Relaxed);
            m.prefix_cache_copied_tokens
                .fetch_add(n_cached.saturating_sub(keep) as u64, Relaxed);
        }
        let id = self.next_id;
        self.next_id += 1;
        let seq = Seq {
            max_tokens: job.params.max_tokens.unwrap_or(usize::MAX),
            stop: StopMatcher::new(job.params.stop.iter().cloned()),
            job,
            id,
            n_done: n_cached,
            n_cached,
            prefilled: false,
            sampler,
            drawn: None,
            generated: Vec::new(),
            decoder: StreamDecoder::new(),
            pending: None,
            last_token_at: None,
            top: Vec::new(),
        };
        self.slots[idx].seq = Some(seq);
    }

    /// One forward for the whole step: every decoding sequence's pending token (one row each)
    /// and up to `n_prefill_chunk` prompt rows, oldest prefilling request first. Then samples
    /// the next token of every sequence whose logits are fresh.
    fn step(&mut self) {
        let shape: Vec<Option<Progress>> = self
            .slots
            .iter()
            .map(|s| {
                s.seq.as_ref().map(|q| Progress {
                    id: q.id,
                    pending: q.pending,
                    done: q.n_done,
                    n_prompt: q.job.prompt.len(),
                })
            })
            .collect();
        let work = plan_step(&shape, self.cfg.n_prefill_chunk);
        let (mut n_decode, mut n_prompt_rows) = (0, 0);
        let lm = self.lm;
        let scratch = &mut self.scratch;
        let mut which = Vec::new();
        let mut seqs: Vec<SeqBatch<'_>> = Vec::new();
        for (i, (slot, w)) in self.slots.iter_mut().zip(&work).enumerate() {
            let Slot { state, seq, .. } = slot;
            let (Some(w), Some(q)) = (w, seq.as_ref()) else {
                continue;
            };
            let (tokens, logits) = match w {
                Work::Decode(t) => {
                    n_decode += 1;
                    (std::slice::from_ref(t), Logits::Last)
                }
                Work::Prefill { from, to } => {
                    n_prompt_rows += to - from;
                    let last = *to == q.job.prompt.len();
                    let logits = if last { Logits::Last } else { Logits::None };
                    (&q.job.prompt[*from..*to], logits)
                }
            };
            which.push(i);
            seqs.push(SeqBatch {
                state,
                tokens,
                logits,
            });
        }
        if seqs.is_empty() {
            return;
        }
        let results: Vec<Result<(), ModelError>> = match lm.model.forward_batch(scratch, &mut seqs)
        {
            Ok(()) => seqs.iter().map(|_| Ok(())).collect(),
            Err(e) if seqs.len() == 1 => vec![Err(e)],
            // The batch is refused before anything is computed when one sequence's token or
            // context is wrong, and a failed call advances no sequence: retry them one by one
            // so that only the failing one ends.
            Err(_) => seqs
                .iter_mut()
                .map(|sb| lm.model.forward_batch(scratch, std::slice::from_mut(sb)))
                .collect(),
        };
        drop(seqs);
        let shared = Arc::clone(&self.shared);
        let m = &shared.metrics;
        if n_decode > 0 {
            m.decode_steps.fetch_add(1, Relaxed);
            m.decode_step_sequences.fetch_add(n_decode, Relaxed);
            if n_prompt_rows > 0 {
                m.mixed_steps.fetch_add(1, Relaxed);
            }
        }
        // Which slots sample this step: a decoded token, or a prompt's last chunk.
        let mut draw = vec![false; self.slots.len()];
        for (&i, r) in which.iter().zip(&results) {
            let last_chunk = |q: &Seq| match work[i] {
                Some(Work::Decode(_)) => true,
                Some(Work::Prefill { to, .. }) => to == q.job.prompt.len(),
                None => false,
            };
            draw[i] = r.is_ok() && self.slots[i].seq.as_ref().is_some_and(last_chunk);
        }
        self.draw_all(&draw);
        for (i, r) in which.into_iter().zip(results) {
            if let Err(e) = r {
                self.fail(i, e.into());
                continue;
            }
            let Slot { history, seq, .. } = &mut self.slots[i];
            let Some(q) = seq.as_mut() else { continue };
            match work[i] {
                Some(Work::Decode(t)) => {
                    history.push(t);
                    q.pending = None;
                    self.sample_next(i);
                }
                Some(Work::Prefill { from, to }) => {
                    history.extend_from_slice(&q.job.prompt[from..to]);
                    q.n_done = to;
                    m.prompt_tokens_evaluated
                        .fetch_add((to - from) as u64, Relaxed);
                    if to == q.job.prompt.len() {
                        q.prefilled = true;
                        self.remember(i);
                        self.sample_next(i);
                    }
                }
                None => {}
            }
        }
    }

    /// Puts the whole blocks of slot `i`'s cached tokens into the prefix cache.
    fn remember(&mut self, i: usize) {
        let Slot { state, history, .. } = &self.slots[i];
        let model = &self.lm.model;
        // A failed read leaves the blocks inserted before it; nothing else to do.
        let _ = self
            .cache
            .insert(history, |a, b, out| state.kv_read(model, a, b, out));
        let st = self.cache.stats();
        let m = &self.shared.metrics;
        m.prefix_cache_blocks.store(st.blocks as u64, Relaxed);
        m.prefix_cache_bytes.store(st.bytes as u64, Relaxed);
        m.prefix_cache_evictions.store(st.evictions, Relaxed);
    }

    /// Draws the next token of every slot marked in `draw` from its fresh logits, the slots
    /// spread over the model's pool (a draw over a 49k vocabulary at temperature > 0 is tens
    /// of microseconds; eight of them one after another kept the second core idle). Each
    /// draw uses only its own slot's sampler, logits and history, so the tokens are the ones
    /// a serial loop would draw.
    fn draw_all(&mut self, draw: &[bool]) {
        let pool = self.lm.model.pool();
        pool.for_each_chunk_mut(&mut self.slots, 1, |i, s| {
            let Slot { state, seq, .. } = &mut s[0];
            if let (true, Some(q)) = (draw[i], seq.as_mut()) {
                q.drawn = Some(q.sampler.sample(state.logits(), &q.generated));
            }
        });
    }

    /// Samples slot `i`'s next token from its logits (or takes the one `draw_all` drew),
    /// sends the text it completes, and either ends the sequence or leaves the token pending
    /// for the next step.
    fn sample_next(&mut self, i: usize) {
        let lm = self.lm;
        let metrics = &self.shared.metrics;
        let Slot {
            state,
            history,
            seq,
            ..
        } = &mut self.slots[i];
        let Some(q) = seq.as_mut() else { return };
        let logits = state.logits();
        let tok = match q.drawn.take() {
            Some(t) => t,
            None => q.sampler.sample(logits, &q.generated),
        };
        let now = Instant::now();
        match q.last_token_at {
            None => metrics.ttft.observe(now - q.job.arrived),
            Some(t) => metrics.tpot.observe(now - t),
        }
        q.last_token_at = Some(now);
        metrics.generated_tokens.fetch_add(1, Relaxed);
        q.generated.push(tok);

        let eog = lm.tokenizer.is_eog(tok) && !q.job.params.ignore_eos;
        let logprob = match q.job.params.top_logprobs {
            Some(k) if !eog => {
                let lse = log_softmax_top(logits, k, &mut q.top);
                let lp = logits
                    .get(tok as usize)
                    .map_or(f32::NEG_INFINITY, |l| l - lse);
                Some(TokenLogprob {
                    id: tok,
                    logprob: lp,
                    top: q.top.clone(),
                })
            }
            _ => None,
        };
        let mut text = String::new();
        let mut finish = None;
        let mut stopped = false;
        if eog {
            finish = Some(Finish::Stop);
        } else if let Some(piece) = q.decoder.push(&lm.tokenizer, tok) {
            let r = q.stop.push(&piece);
            text = r.text;
            if r.stopped {
                finish = Some(Finish::Stop);
                stopped = true;
            }
        }
        if finish.is_none() && (q.generated.len() >= q.max_tokens || history.len() >= state.n_ctx())
        {
            finish = Some(Finish::Length);
        }
        if finish.is_some() && !stopped {
            // Flush a held-back partial character and text that might have begun a stop string.
            let r = q.stop.push(&q.decoder.finish());
            text.push_str(&r.text);
            if r.stopped {
                finish = Some(Finish::Stop);
            } else {
                text.push_str(&q.stop.finish());
            }
        }
        let mut gone = false;
        if !text.is_empty() || logprob.is_some() {
            gone = q.job.events.send(Event::Delta { text, logprob }).is_err();
        }
        match finish {
            _ if gone => {
                metrics.record_finish(EndReason::Cancelled);
                self.free(i);
            }
            Some(f) => {
                let usage = Usage {
                    prompt_tokens: q.job.prompt.len(),
                    completion_tokens: q.generated.len(),
                    cached_tokens: q.n_cached,
                };
                let _ = q.job.events.send(Event::Done { finish: f, usage });
                metrics.record_finish(match f {
                    Finish::Stop => EndReason::Stop,
                    Finish::Length => EndReason::Length,
                });
                self.free(i);
            }
            None => q.pending = Some(tok),
        }
    }

    /// Ends slot `i`'s request; what its cache holds (prompt and answer) goes to the prefix
    /// cache first, for a next turn of the same conversation.
    fn free(&mut self, i: usize) {
        self.remember(i);
        self.tick += 1;
        let s = &mut self.slots[i];
        s.seq = None;
        s.last_used = self.tick;
    }

    fn fail(&mut self, i: usize, e: EngineError) {
        if let Some(q) = self.slots[i].seq.as_ref() {
            let _ = q
                .job
                .events
                .send(Event::Error(AppError::Internal(e.to_string())));
        }
        self.shared.metrics.record_finish(EndReason::Error);
        // The cache may not match its history after a failed forward: forget it.
        let s = &mut self.slots[i];
        s.state.reset();
        s.history.clear();
        self.free(i);
    }

    /// Frees the slots of requests whose client went away.
    fn reap_cancelled(&mut self) {
        for i in 0..self.slots.len() {
            let gone = self.slots[i]
                .seq
                .as_ref()
                .is_some_and(|q| q.job.events.is_closed());
            if gone {
                self.shared.metrics.record_finish(EndReason::Cancelled);
                self.free(i);
            }
        }
    }

    fn refuse_queued(&mut self) {
        while let Ok(job) = self.rx.try_recv() {
            self.metrics().queue_depth.fetch_sub(1, Relaxed);
            match job {
                Job::Generate(g) => {
                    let _ = g.events.send(Event::Error(AppError::ShuttingDown));
                }
                Job::Embed(e) => {
                    let _ = e.reply.send(Err(AppError::ShuttingDown));
                }
            }
        }
    }

    fn abort_all(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(q) = self.slots[i].seq.as_ref() {
                let _ = q.job.events.send(Event::Error(AppError::ShuttingDown));
                self.shared.metrics.record_finish(EndReason::Error);
                self.free(i);
            }
        }
    }

    fn publish_gauges(&self) {
        let m = &self.shared.metrics;
        m.slots_active.store(self.n_active() as u64, Relaxed);
        let used: usize = self.slots.iter().map(|s| s.history.len()).sum();
        m.kv_tokens_used.store(used as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_equal_leading_ids() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }

    #[test]
    fn a_step_holds_every_decode_and_prompt_chunks_oldest_first() {
        // Slot 0 decodes, slot 1 (admitted later) and slot 3 (earlier) prefill, slot 2 is free.
        let p = |id, pending, done, n_prompt| {
            Some(Progress {
                id,
                pending,
                done,
                n_prompt,
            })
        };
        let slots = [
            p(5, Some(42), 10, 10),
            p(7, None, 0, 100),
            None,
            p(6, None, 30, 50),
        ];
        let w = plan_step(&slots, 64);
        assert_eq!(w[0], Some(Work::Decode(42)));
        assert_eq!(w[3], Some(Work::Prefill { from: 30, to: 50 }));
        assert_eq!(w[1], Some(Work::Prefill { from: 0, to: 44 }));
        assert_eq!(w[2], None);
        // A small budget goes to the oldest only; decodes are never held back.
        let w = plan_step(&slots, 8);
        assert_eq!(w[0], Some(Work::Decode(42)));
        assert_eq!(w[3], Some(Work::Prefill { from: 30, to: 38 }));
        assert_eq!(w[1], None);
    }
}
