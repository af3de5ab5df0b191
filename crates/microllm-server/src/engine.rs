//! The engine thread: owns the model's sequence slots and runs the continuous-batching loop.
//!
//! One thread, synchronous, no async: the forward pass is CPU-bound and already parallel in
//! the model's own pool, so the HTTP side only hands work over a bounded channel and reads
//! events back. Every loop iteration ("step"):
//! 1. drops sequences whose client went away (their event receiver is closed);
//! 2. admits queued requests into free slots, choosing the slot whose cached tokens share the
//!    longest prefix with the new prompt (the prefix cache), least recently used on a tie;
//! 3. prefills at most `n_prefill_chunk` prompt tokens, oldest request first, so a long prompt
//!    delays the running decodes by one chunk per step rather than by its whole length;
//! 4. advances every decoding sequence by one token in one batched forward ([`decode_step`]),
//!    then samples each sequence's next token.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use microllm_engine::{
    step_many, EngineError, KvType, LoadedModel, Sampler, SamplerConfig, Scratch, Session,
    StateOptions,
};
use microllm_sample::log_softmax_top;
use microllm_tokenizer::StreamDecoder;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::embed::Embedder;
use crate::error::AppError;
use crate::metrics::{EndReason, Metrics};
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
        if cfg.n_parallel == 0 || cfg.n_ctx < 2 || cfg.n_prefill_chunk == 0 || cfg.max_queue == 0 {
            return Err(ServerError::Config(format!(
                "--parallel and --max-queue must be at least 1 and --ctx at least 2 (got {cfg:?})"
            )));
        }
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

/// One sequence slot: a KV cache that outlives its requests (the prefix cache).
struct Slot<'m> {
    session: Session<'m>,
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
    /// Sampled, not yet evaluated: the next decode step feeds it.
    pending: Option<u32>,
    last_token_at: Option<Instant>,
    top: Vec<(u32, f32)>,
}

struct Scheduler<'m> {
    lm: &'m LoadedModel,
    cfg: EngineConfig,
    slots: Vec<Slot<'m>>,
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    embedder: Box<dyn Embedder>,
    /// Activations of one batched decode step (`n_parallel` rows).
    scratch: Scratch,
    tick: u64,
    next_id: u64,
}

/// THE decode seam: advances every sequence of `batch` by its pending token, so that each
/// session's `logits()` then holds the distribution of its next token.
///
/// One batched forward ([`step_many`]): every weight matrix is read once per step for all
/// decoding sequences, each attending to its own KV cache. If that call fails (a sequence's
/// token or context is refused before anything is computed), the sequences are stepped one by
/// one so that only the failing one ends; one result per sequence either way.
fn decode_step(
    lm: &LoadedModel,
    scratch: &mut Scratch,
    batch: &mut [(&mut Session<'_>, u32)],
) -> Vec<Result<(), EngineError>> {
    match step_many(lm, scratch, batch) {
        Ok(()) => batch.iter().map(|_| Ok(())).collect(),
        Err(e) if batch.len() == 1 => vec![Err(e)],
        // A failed batched call leaves every history untouched and rewrites the same KV
        // positions when retried.
        Err(_) => batch
            .iter_mut()
            .map(|(session, token)| session.step(*token))
            .collect(),
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<'m> Scheduler<'m> {
    fn new(
        lm: &'m LoadedModel,
        cfg: EngineConfig,
        rx: Receiver<Job>,
        shared: Arc<Shared>,
        embedder: Box<dyn Embedder>,
    ) -> Result<Self, EngineError> {
        let opts = StateOptions {
            n_ctx: cfg.n_ctx,
            n_batch: cfg.n_prefill_chunk.min(cfg.n_ctx),
            kv_type: cfg.kv_type,
        };
        let mut slots = Vec::with_capacity(cfg.n_parallel);
        let mut kv_bytes = 0;
        for _ in 0..cfg.n_parallel {
            let session = Session::new(lm, opts)?;
            kv_bytes += session.state().kv_bytes();
            slots.push(Slot {
                session,
                last_used: 0,
                seq: None,
            });
        }
        let scratch = lm.model.new_scratch(cfg.n_parallel)?;
        let m = &shared.metrics;
        m.slots_total.store(cfg.n_parallel as u64, Relaxed);
        m.kv_tokens_capacity
            .store((cfg.n_parallel * cfg.n_ctx) as u64, Relaxed);
        m.kv_bytes.store(kv_bytes as u64, Relaxed);
        Ok(Scheduler {
            lm,
            cfg,
            slots,
            rx,
            shared,
            embedder,
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
                self.prefill_step();
                self.decode();
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

    /// Puts a request into the free slot that caches the longest prefix of its prompt.
    fn start(&mut self, job: GenJob) {
        if job.events.is_closed() {
            self.metrics().record_finish(EndReason::Cancelled);
            return;
        }
        let Some((idx, common)) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .map(|(i, s)| (i, common_prefix(s.session.history(), &job.prompt)))
            .max_by_key(|&(i, common)| (common, std::cmp::Reverse(self.slots[i].last_used)))
        else {
            return; // unreachable: admit() checks for a free slot first
        };
        let n_prompt = job.prompt.len();
        // Session::prefill always re-evaluates at least the last prompt token.
        let n_cached = common.min(n_prompt.saturating_sub(1));
        let sampler = match Sampler::new(job.params.sampler.clone(), self.lm.model.config.n_vocab) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.events.send(Event::Error(AppError::bad(e.to_string())));
                return;
            }
        };
        let m = self.metrics();
        m.prompt_tokens.fetch_add(n_prompt as u64, Relaxed);
        if n_cached > 0 {
            m.prefix_cache_hit_tokens
                .fetch_add(n_cached as u64, Relaxed);
            m.prefix_cache_hit_requests.fetch_add(1, Relaxed);
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
            generated: Vec::new(),
            decoder: StreamDecoder::new(),
            pending: None,
            last_token_at: None,
            top: Vec::new(),
        };
        self.slots[idx].seq = Some(seq);
    }

    /// Evaluates up to one chunk of prompt tokens, oldest request first.
    fn prefill_step(&mut self) {
        let mut order: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.seq.as_ref().filter(|q| !q.prefilled).map(|q| (q.id, i)))
            .collect();
        order.sort_unstable();
        let mut budget = self.cfg.n_prefill_chunk;
        for (_, i) in order {
            if budget == 0 {
                break;
            }
            let Slot { session, seq, .. } = &mut self.slots[i];
            let Some(q) = seq.as_mut() else { continue };
            let n_prompt = q.job.prompt.len();
            let end = (q.n_done + budget).min(n_prompt);
            // The cache holds prompt[..n_done]; prefill keeps that and evaluates the rest.
            match session.prefill(&q.job.prompt[..end]) {
                Ok(n_eval) => {
                    q.n_done = end;
                    budget = budget.saturating_sub(n_eval);
                    self.shared
                        .metrics
                        .prompt_tokens_evaluated
                        .fetch_add(n_eval as u64, Relaxed);
                }
                Err(e) => {
                    self.fail(i, e);
                    continue;
                }
            }
            if end == n_prompt {
                if let Some(q) = self.slots[i].seq.as_mut() {
                    q.prefilled = true;
                }
                self.sample_next(i);
            }
        }
    }

    /// Advances every decoding sequence by one token, then samples the next ones.
    fn decode(&mut self) {
        let mut idx = Vec::new();
        let mut batch: Vec<(&mut Session<'m>, u32)> = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Slot { session, seq, .. } = slot;
            if let Some(t) = seq.as_mut().and_then(|q| q.pending.take()) {
                idx.push(i);
                batch.push((session, t));
            }
        }
        if batch.is_empty() {
            return;
        }
        let m = &self.shared.metrics;
        m.decode_steps.fetch_add(1, Relaxed);
        m.decode_step_sequences
            .fetch_add(batch.len() as u64, Relaxed);
        let results = decode_step(self.lm, &mut self.scratch, &mut batch);
        drop(batch);
        for (i, r) in idx.into_iter().zip(results) {
            match r {
                Ok(()) => self.sample_next(i),
                Err(e) => self.fail(i, e),
            }
        }
    }

    /// Samples slot `i`'s next token from its logits, sends the text it completes, and either
    /// ends the sequence or leaves the token pending for the next decode step.
    fn sample_next(&mut self, i: usize) {
        let lm = self.lm;
        let metrics = &self.shared.metrics;
        let Slot { session, seq, .. } = &mut self.slots[i];
        let Some(q) = seq.as_mut() else { return };
        let logits = session.logits();
        let tok = q.sampler.sample(logits, &q.generated);
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
        if finish.is_none()
            && (q.generated.len() >= q.max_tokens || session.history().len() >= session.n_ctx())
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

    fn free(&mut self, i: usize) {
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
        self.slots[i].session.reset();
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
        let used: usize = self.slots.iter().map(|s| s.session.history().len()).sum();
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
}
