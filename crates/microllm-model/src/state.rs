//! Everything a forward pass writes, allocated once so that the decode loop never touches the
//! heap: per sequence a [`State`] (its KV cache and position), per forward call a [`Scratch`]
//! (activations for up to `n_rows` token rows). A single-sequence `State` carries its own
//! scratch; a batched forward over many sequences shares one scratch among them.

use half::f16;
use microllm_gguf::GgmlType;

use crate::{Model, ModelError};

/// Sizes of a [`State`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateOptions {
    /// Context length (KV cache positions).
    pub n_ctx: usize,
    /// Most tokens evaluated in one forward call through this state (larger prompts are
    /// split). A state that is only ever advanced by `Model::forward_batch` can use 1.
    pub n_batch: usize,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
        }
    }
}

/// Activations of one forward call over up to `n_rows` token rows.
#[derive(Default)]
pub struct Scratch {
    pub(crate) n_rows: usize,
    pub(crate) x: Vec<f32>,         // (n_rows, n_embd) residual stream
    pub(crate) xn: Vec<f32>,        // (n_rows, n_embd) normalised input of a sub-block
    pub(crate) q: Vec<f32>,         // (n_rows, q_dim)
    pub(crate) k: Vec<f32>,         // (n_rows, k_dim)
    pub(crate) v: Vec<f32>,         // (n_rows, v_dim)
    pub(crate) attn: Vec<f32>,      // (n_rows, n_head * head_dim_v)
    pub(crate) gate: Vec<f32>,      // (n_rows, n_ff)
    pub(crate) up: Vec<f32>,        // (n_rows, n_ff)
    pub(crate) act_q: Vec<u8>,      // (n_rows, activation row bytes) quantized matmul input
    pub(crate) scratch: Vec<f32>,   // matmul output transposed per row chunk
    pub(crate) rope_cos: Vec<f32>, // (2, n_rows, n_rot/2): global layers, then sliding-window layers
    pub(crate) rope_sin: Vec<f32>, // (2, n_rows, n_rot/2)
    pub(crate) rows: Vec<Row>,     // (n_rows) which sequence and position each row is
    pub(crate) out_rows: Vec<f32>, // (n_rows, n_embd) hidden states of the rows needing logits
    pub(crate) attn_tmp: Vec<f32>, // (n_rows * n_head, head_dim_v) batched attention output, regrouped
    pub(crate) attn_last: Vec<u32>, // (n_rows * n_head) last visible key per regrouped query row
    pub(crate) attn_grp: Vec<u32>, // (n_rows * n_head) (sequence, KV head) of each regrouped row
}

/// One token row of a batched forward.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Row {
    pub seq: usize,
    pub pos: usize,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("n_rows", &self.n_rows)
            .finish()
    }
}

impl Scratch {
    pub(crate) fn new(model: &Model, n_rows: usize) -> Result<Self, ModelError> {
        let c = &model.config;
        if n_rows == 0 {
            return Err(ModelError::BadOptions(
                "a forward call needs room for at least one token".into(),
            ));
        }
        let act_row = max_act_row_bytes(model)?;
        let widest = [c.n_embd, c.q_dim(), c.k_dim(), c.v_dim(), c.n_ff]
            .into_iter()
            .max()
            .unwrap_or(1);
        // Scratch holds one matmul's output. The output projection runs in column chunks that
        // fit it: room for up to 32 columns of n_vocab, so that computing every position's
        // logits (perplexity) reads the output matrix once per 32 tokens, not once per token.
        let scratch = (n_rows * widest).max(n_rows.min(32) * c.n_vocab);
        let half_rot = c.rope.n_rot / 2;
        Ok(Scratch {
            n_rows,
            x: vec![0.0; n_rows * c.n_embd],
            xn: vec![0.0; n_rows * c.n_embd],
            q: vec![0.0; n_rows * c.q_dim()],
            k: vec![0.0; n_rows * c.k_dim()],
            v: vec![0.0; n_rows * c.v_dim()],
            attn: vec![0.0; n_rows * c.n_head * c.head_dim_v],
            gate: vec![0.0; n_rows * c.n_ff],
            up: vec![0.0; n_rows * c.n_ff],
            act_q: vec![0; n_rows * act_row],
            scratch: vec![0.0; scratch],
            rope_cos: vec![0.0; 2 * n_rows * half_rot],
            rope_sin: vec![0.0; 2 * n_rows * half_rot],
            rows: vec![Row::default(); n_rows],
            out_rows: vec![0.0; n_rows * c.n_embd],
            attn_tmp: vec![0.0; n_rows * c.n_head * c.head_dim_v],
            attn_last: vec![0; n_rows * c.n_head],
            attn_grp: vec![0; n_rows * c.n_head],
        })
    }

    /// Token rows one forward call can hold.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
}

/// One sequence: its KV cache, how much of it is filled, and its last logits.
pub struct State {
    pub(crate) n_ctx: usize,
    /// Tokens already in the KV cache.
    pub(crate) n_past: usize,
    pub(crate) k_cache: Vec<f16>, // (n_layer, n_ctx, k_dim)
    pub(crate) v_cache: Vec<f16>, // (n_layer, n_ctx, v_dim)
    /// Logits of the last evaluated token (n_vocab).
    pub(crate) logits: Vec<f32>,
    /// This sequence's own activations for `Model::forward`.
    pub(crate) scratch: Scratch,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("n_ctx", &self.n_ctx)
            .field("n_batch", &self.scratch.n_rows)
            .field("n_past", &self.n_past)
            .finish()
    }
}

impl State {
    pub(crate) fn new(model: &Model, opts: StateOptions) -> Result<Self, ModelError> {
        let c = &model.config;
        if opts.n_ctx == 0 || opts.n_batch == 0 {
            return Err(ModelError::BadOptions(
                "context and batch sizes must be at least 1".into(),
            ));
        }
        let n_batch = opts.n_batch.min(opts.n_ctx);
        Ok(State {
            n_ctx: opts.n_ctx,
            n_past: 0,
            k_cache: vec![f16::ZERO; c.n_layer * opts.n_ctx * c.k_dim()],
            v_cache: vec![f16::ZERO; c.n_layer * opts.n_ctx * c.v_dim()],
            logits: vec![0.0; c.n_vocab],
            scratch: Scratch::new(model, n_batch)?,
        })
    }

    /// Tokens currently held in the KV cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    /// Most tokens one `Model::forward` call evaluates at once.
    pub fn n_batch(&self) -> usize {
        self.scratch.n_rows
    }
    /// Logits of the last token evaluated with `Logits::Last`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
    /// Forgets everything after the first `n` tokens (the KV rows are simply overwritten later).
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }
    /// Empties the sequence.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }
    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        (self.k_cache.len() + self.v_cache.len()) * 2
    }
}

/// Bytes of the largest quantized activation row any matmul of the model needs.
fn max_act_row_bytes(model: &Model) -> Result<usize, ModelError> {
    let w = &model.weights;
    let mut mats = vec![&w.output];
    for l in &w.layers {
        mats.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
    }
    let mut best = 0usize;
    for m in mats {
        let act_ty = act_type(model, m.ty)?;
        let bytes = act_ty
            .row_size(m.n_cols as u64)
            .ok_or_else(|| ModelError::BadConfig(format!("bad row length for {}", m.name())))?;
        best = best.max(bytes as usize);
        if model.kernels.panel_supports(m.ty) {
            best = best.max(microllm_kernels::panel::act_row_bytes(m.n_cols));
        }
    }
    Ok(best)
}

pub(crate) fn act_type(model: &Model, w_ty: GgmlType) -> Result<GgmlType, ModelError> {
    model
        .kernels
        .vec_dot_type(w_ty)
        .ok_or_else(|| ModelError::UnsupportedType {
            tensor: "(matmul)".into(),
            ty: w_ty.name().into(),
            supported: crate::weights::supported_types(&model.kernels),
        })
}
