//! llama-perplexity's windowed evaluation, shared by `microllm perplexity`, `kld` and
//! `compare`.
//!
//! The token stream is cut into non-overlapping windows of `n_ctx` tokens; when the model adds
//! BOS, each window's first token is replaced by BOS. Each window is evaluated from position 0
//! and only the predictions of its second half are scored (positions `n_ctx/2 .. n_ctx-2`
//! predicting the next token).
//!
//! KL divergence (`kld`) runs the base model and the variants on the same windows in lock
//! step, so no logits are stored beyond one window per model: for every scored position,
//! KL(P_base ‖ P_model) = Σ p_base · (log p_base − log p_model) over the vocabulary, the
//! top-1 agreement (same argmax) and both models' log-likelihood of the true next token.

use microllm_model::{KvType, Logits, Model, State, StateOptions};
use serde::Serialize;

use crate::{CompressError, Progress};

/// The windows of `tokens` (at most `max_chunks`), first tokens replaced by `bos`.
pub fn windows(
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    max_chunks: Option<usize>,
) -> Result<Vec<Vec<u32>>, CompressError> {
    if n_ctx < 4 {
        return Err(CompressError::Eval(format!(
            "the context must be at least 4 tokens (got {n_ctx})"
        )));
    }
    let available = tokens.len() / n_ctx;
    let n = max_chunks.map_or(available, |c| c.min(available));
    if n == 0 {
        return Err(CompressError::Eval(format!(
            "the text has {} tokens, fewer than one window of {n_ctx}: use a longer text or a smaller context",
            tokens.len()
        )));
    }
    Ok((0..n)
        .map(|i| {
            let mut w = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
            if let Some(b) = bos {
                w[0] = b;
            }
            w
        })
        .collect())
}

/// Perplexity and its standard error, as llama-perplexity prints them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub ppl_err: f64,
    pub n_chunks: usize,
    pub n_tokens_scored: usize,
}

/// Running sums of negative log-likelihoods.
#[derive(Clone, Copy, Debug, Default)]
pub struct NllSum {
    nll: f64,
    nll2: f64,
    count: usize,
}

impl NllSum {
    /// Adds one token's log-probability.
    pub fn add(&mut self, lp: f64) {
        self.nll -= lp;
        self.nll2 += lp * lp;
        self.count += 1;
    }

    /// The perplexity so far.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.count.max(1) as f64).exp()
    }

    pub fn finish(&self, n_chunks: usize) -> Perplexity {
        let count = self.count.max(1) as f64;
        let mean = self.nll / count;
        let ppl = mean.exp();
        let var = self.nll2 / count - mean * mean;
        let ppl_err = if var > 0.0 && self.count > 1 {
            (var / (self.count - 1) as f64).sqrt() * ppl
        } else {
            0.0
        };
        Perplexity {
            ppl,
            ppl_err,
            n_chunks,
            n_tokens_scored: self.count,
        }
    }
}

/// log p(target) under the softmax of `row`, llama-perplexity's arithmetic (f32 max, f64 sum).
pub fn log_prob(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    (row[target] - max) as f64 - sum.ln()
}

/// Evaluates one model over windows, window after window.
pub struct WindowEval<'m> {
    model: &'m Model,
    state: State,
    /// (n_ctx, n_vocab) logits of the last window.
    pub logits: Vec<f32>,
    n_ctx: usize,
}

impl<'m> WindowEval<'m> {
    pub fn new(model: &'m Model, n_ctx: usize, n_batch: usize) -> Result<Self, CompressError> {
        Self::with_kv(model, n_ctx, n_batch, KvType::F16)
    }

    /// As [`WindowEval::new`] with a KV cache of `kv_type`.
    pub fn with_kv(
        model: &'m Model,
        n_ctx: usize,
        n_batch: usize,
        kv_type: KvType,
    ) -> Result<Self, CompressError> {
        let state = model.new_state(StateOptions {
            n_ctx,
            n_batch: n_batch.clamp(1, n_ctx),
            kv_type,
        })?;
        Ok(WindowEval {
            model,
            state,
            logits: vec![0.0; n_ctx * model.config.n_vocab],
            n_ctx,
        })
    }

    /// Evaluates `window` (exactly `n_ctx` tokens) from position 0; the logits land in
    /// [`WindowEval::logits`].
    pub fn run(&mut self, window: &[u32]) -> Result<(), CompressError> {
        if window.len() != self.n_ctx {
            return Err(CompressError::Eval(format!(
                "window of {} tokens, expected {}",
                window.len(),
                self.n_ctx
            )));
        }
        self.state.reset();
        self.model
            .forward(&mut self.state, window, Logits::All(&mut self.logits))?;
        Ok(())
    }

    /// The logits row at position `j` of the last window.
    pub fn row(&self, j: usize) -> &[f32] {
        let n = self.model.config.n_vocab;
        &self.logits[j * n..(j + 1) * n]
    }
}

/// Perplexity of `model` on `tokens` (llama-perplexity's method); `on_chunk(i, ppl_so_far)`
/// after each window.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    max_chunks: Option<usize>,
    n_batch: usize,
    kv_type: KvType,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity, CompressError> {
    let wins = windows(tokens, bos, n_ctx, max_chunks)?;
    let mut ev = WindowEval::with_kv(model, n_ctx, n_batch, kv_type)?;
    let mut sum = NllSum::default();
    for (i, w) in wins.iter().enumerate() {
        ev.run(w)?;
        for j in n_ctx / 2..n_ctx - 1 {
            sum.add(log_prob(ev.row(j), w[j + 1] as usize));
        }
        on_chunk(i, sum.ppl());
    }
    Ok(sum.finish(wins.len()))
}

/// How far a model's predictions are from the base model's.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct KldStats {
    /// Mean KL(P_base ‖ P_model) per scored token, in nats.
    pub kld_mean: f64,
    /// Standard error of that mean.
    pub kld_err: f64,
    /// 99th percentile of the per-token KL divergence.
    pub kld_p99: f64,
    /// Share of scored tokens where both models' most likely token is the same (0..1).
    pub top1_agreement: f64,
    pub ppl: Perplexity,
    /// This model's perplexity divided by the base model's.
    pub ppl_ratio: f64,
}

#[derive(Default)]
struct KldAcc {
    kl: Vec<f64>,
    same_top1: usize,
    nll: NllSum,
}

/// KL divergence etc. of every model in `models` from `base`, on the same windows. Returns
/// the base model's perplexity and one [`KldStats`] per model.
pub fn kld(
    base: &Model,
    models: &[&Model],
    tokens: &[u32],
    bos: Option<u32>,
    n_ctx: usize,
    max_chunks: Option<usize>,
    n_batch: usize,
    progress: &dyn Progress,
) -> Result<(Perplexity, Vec<KldStats>), CompressError> {
    let n_vocab = base.config.n_vocab;
    for m in models {
        if m.config.n_vocab != n_vocab {
            return Err(CompressError::Eval(format!(
                "the vocabularies differ ({} tokens in the base model, {} in a variant); compare variants of the same model",
                n_vocab, m.config.n_vocab
            )));
        }
    }
    let wins = windows(tokens, bos, n_ctx, max_chunks)?;
    let mut base_ev = WindowEval::new(base, n_ctx, n_batch)?;
    let mut evs = models
        .iter()
        .map(|m| WindowEval::new(m, n_ctx, n_batch))
        .collect::<Result<Vec<_>, _>>()?;
    let mut base_nll = NllSum::default();
    let mut accs: Vec<KldAcc> = models.iter().map(|_| KldAcc::default()).collect();
    let first = n_ctx / 2;
    // log-softmax of the base rows of one window, reused for every model.
    let mut base_lp = vec![0f64; (n_ctx - 1 - first) * n_vocab];
    let mut base_top = vec![0usize; n_ctx - 1 - first];
    progress.start("kld", (wins.len() * (models.len() + 1)) as u64);
    for w in &wins {
        base_ev.run(w)?;
        progress.inc(1);
        for (k, j) in (first..n_ctx - 1).enumerate() {
            let row = base_ev.row(j);
            log_softmax(row, &mut base_lp[k * n_vocab..(k + 1) * n_vocab]);
            base_top[k] = argmax(row);
            base_nll.add(log_prob(row, w[j + 1] as usize));
        }
        for (ev, acc) in evs.iter_mut().zip(&mut accs) {
            ev.run(w)?;
            progress.inc(1);
            let mut lp = vec![0f64; n_vocab];
            for (k, j) in (first..n_ctx - 1).enumerate() {
                let row = ev.row(j);
                log_softmax(row, &mut lp);
                let blp = &base_lp[k * n_vocab..(k + 1) * n_vocab];
                let kl: f64 = blp
                    .iter()
                    .zip(&lp)
                    .map(|(&b, &m)| if b > -700.0 { b.exp() * (b - m) } else { 0.0 })
                    .sum();
                acc.kl.push(kl.max(0.0));
                if argmax(row) == base_top[k] {
                    acc.same_top1 += 1;
                }
                acc.nll.add(log_prob(row, w[j + 1] as usize));
            }
        }
    }
    progress.finish();
    let base_ppl = base_nll.finish(wins.len());
    let stats = accs
        .into_iter()
        .map(|mut a| {
            let n = a.kl.len().max(1) as f64;
            let mean = a.kl.iter().sum::<f64>() / n;
            let var = a.kl.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            a.kl.sort_by(f64::total_cmp);
            let p99 =
                a.kl.get(((a.kl.len() as f64 * 0.99) as usize).min(a.kl.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0.0);
            let ppl = a.nll.finish(wins.len());
            KldStats {
                kld_mean: mean,
                kld_err: (var / n).sqrt(),
                kld_p99: p99,
                top1_agreement: a.same_top1 as f64 / n,
                ppl_ratio: ppl.ppl / base_ppl.ppl,
                ppl,
            }
        })
        .collect();
    Ok((base_ppl, stats))
}

fn log_softmax(row: &[f32], out: &mut [f64]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    for (o, &v) in out.iter_mut().zip(row) {
        *o = v as f64 - lse;
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
