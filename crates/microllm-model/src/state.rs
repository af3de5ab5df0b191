//! Everything a forward pass writes: activations, scratch and the KV cache, allocated once when
//! the state is built so that the decode loop never touches the heap.

use half::f16;
use microllm_gguf::GgmlType;

use crate::weights::Weights;
use crate::{Model, ModelError};

/// Sizes of a [`State`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateOptions {
    /// Context length (KV cache positions).
    pub n_ctx: usize,
    /// Most tokens evaluated in one forward call (larger prompts are split).
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

/// Activations and KV cache of one sequence.
pub struct State {
    pub(crate) n_ctx: usize,
    pub(crate) n_batch: usize,
    /// Tokens already in the KV cache.
    pub(crate) n_past: usize,
    pub(crate) x: Vec<f32>,        // (n_batch, n_embd) residual stream
    pub(crate) xn: Vec<f32>,       // (n_batch, n_embd) normalised input of a sub-block
    pub(crate) q: Vec<f32>,        // (n_batch, q_dim)
    pub(crate) k: Vec<f32>,        // (n_batch, k_dim)
    pub(crate) v: Vec<f32>,        // (n_batch, v_dim)
    pub(crate) attn: Vec<f32>,     // (n_batch, n_head * head_dim_v)
    pub(crate) gate: Vec<f32>,     // (n_batch, n_ff)
    pub(crate) up: Vec<f32>,       // (n_batch, n_ff)
    pub(crate) act_q: Vec<u8>,     // (n_batch, activation row bytes) quantized matmul input
    pub(crate) scratch: Vec<f32>,  // matmul output transposed per row chunk
    pub(crate) rope_cos: Vec<f32>, // (n_batch, n_rot/2)
    pub(crate) rope_sin: Vec<f32>, // (n_batch, n_rot/2)
    pub(crate) k_cache: Vec<f16>,  // (n_layer, n_ctx, k_dim)
    pub(crate) v_cache: Vec<f16>,  // (n_layer, n_ctx, v_dim)
    /// Logits of the last evaluated token (n_vocab).
    pub(crate) logits: Vec<f32>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("n_ctx", &self.n_ctx)
            .field("n_batch", &self.n_batch)
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
        let act_row = max_act_row_bytes(model, &model.weights)?;
        let widest = [c.n_embd, c.q_dim(), c.k_dim(), c.v_dim(), c.n_ff]
            .into_iter()
            .max()
            .unwrap_or(1);
        // Scratch holds one matmul's output; the output projection is done in column chunks
        // that fit (at least one column of n_vocab).
        let scratch = (n_batch * widest).max(c.n_vocab);
        let kv_k = c.n_layer * opts.n_ctx * c.k_dim();
        let kv_v = c.n_layer * opts.n_ctx * c.v_dim();
        let half_rot = c.rope.n_rot / 2;
        Ok(State {
            n_ctx: opts.n_ctx,
            n_batch,
            n_past: 0,
            x: vec![0.0; n_batch * c.n_embd],
            xn: vec![0.0; n_batch * c.n_embd],
            q: vec![0.0; n_batch * c.q_dim()],
            k: vec![0.0; n_batch * c.k_dim()],
            v: vec![0.0; n_batch * c.v_dim()],
            attn: vec![0.0; n_batch * c.n_head * c.head_dim_v],
            gate: vec![0.0; n_batch * c.n_ff],
            up: vec![0.0; n_batch * c.n_ff],
            act_q: vec![0; n_batch * act_row],
            scratch: vec![0.0; scratch],
            rope_cos: vec![0.0; n_batch * half_rot],
            rope_sin: vec![0.0; n_batch * half_rot],
            k_cache: vec![f16::ZERO; kv_k],
            v_cache: vec![f16::ZERO; kv_v],
            logits: vec![0.0; c.n_vocab],
        })
    }

    /// Tokens currently held in the KV cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    pub fn n_batch(&self) -> usize {
        self.n_batch
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
fn max_act_row_bytes(model: &Model, w: &Weights) -> Result<usize, ModelError> {
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
