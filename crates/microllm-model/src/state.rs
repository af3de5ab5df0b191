//! Everything a forward pass writes, allocated once so that the decode loop never touches the
//! heap: per sequence a [`State`] (its KV cache and position), per forward call a [`Scratch`]
//! (activations for up to `n_rows` token rows). A single-sequence `State` carries its own
//! scratch; a batched forward over many sequences shares one scratch among them.

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
    /// Storage format of the cached keys and values.
    pub kv_type: KvType,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            kv_type: KvType::F16,
        }
    }
}

/// Storage format of the KV cache (llama.cpp's `--cache-type-k/-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    /// Half precision: 2 bytes per value, the reference numerics.
    #[default]
    F16,
    /// ggml's Q8_0 blocks (32 values + an f16 scale in 34 bytes): about half the memory of
    /// F16, for a small loss of precision. Head dimensions must be multiples of 32.
    Q8_0,
}

impl KvType {
    /// `"f16"` or `"q8_0"`.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// Bytes that one row of `n` values takes (`n` a multiple of 32 for Q8_0).
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            KvType::F16 => 2 * n,
            KvType::Q8_0 => n / 32 * 34,
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvType {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "q8_0" | "q8" => Ok(KvType::Q8_0),
            other => Err(ModelError::BadOptions(format!(
                "unknown KV cache type '{other}': use f16 or q8_0"
            ))),
        }
    }
}

/// The cached keys and values of every layer, `(n_layer, n_ctx, k_dim | v_dim)`, each row in
/// the cache's format.
pub(crate) enum KvCache {
    /// f16 bit patterns (`u16`, so that the zeroed buffers come straight from the allocator's
    /// zero pages: memory is only touched as the context fills).
    F16 { k: Vec<u16>, v: Vec<u16> },
    /// Rows of `k_dim / 32` (resp. `v_dim / 32`) Q8_0 blocks.
    Q8_0 { k: Vec<u8>, v: Vec<u8> },
}

/// Activations of one forward call over up to `n_rows` token rows.
#[derive(Default)]
pub struct Scratch {
    pub(crate) n_rows: usize,
    pub(crate) x: Vec<f32>,        // (n_rows, n_embd) residual stream
    pub(crate) xn: Vec<f32>,       // (n_rows, n_embd) normalised input of a sub-block
    pub(crate) q: Vec<f32>,        // (n_rows, q_dim)
    pub(crate) k: Vec<f32>,        // (n_rows, k_dim)
    pub(crate) v: Vec<f32>,        // (n_rows, v_dim)
    pub(crate) attn: Vec<f32>,     // (n_rows, n_head * head_dim_v)
    pub(crate) gate: Vec<f32>,     // (n_rows, n_ff)
    pub(crate) up: Vec<f32>,       // (n_rows, n_ff)
    pub(crate) act_q: Vec<u8>,     // (n_rows, activation row bytes) quantized matmul input
    pub(crate) scratch: Vec<f32>,  // matmul output transposed per row chunk
    pub(crate) rope_cos: Vec<f32>, // (2, n_rows, n_rot/2): global layers, then sliding-window layers
    pub(crate) rope_sin: Vec<f32>, // (2, n_rows, n_rot/2)
    pub(crate) rows: Vec<Row>,     // (n_rows) which sequence and position each row is
    pub(crate) out_rows: Vec<f32>, // (n_rows, n_embd) hidden states of the rows needing logits
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
    pub(crate) kv: KvCache,
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
            .field("kv_type", &self.kv_type())
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
        let cells = |dim: usize| {
            c.n_layer
                .checked_mul(opts.n_ctx)
                .and_then(|v| v.checked_mul(dim))
                .ok_or_else(|| {
                    ModelError::BadOptions(format!(
                        "a KV cache of {} positions overflows memory sizes; use a smaller context",
                        opts.n_ctx
                    ))
                })
        };
        let (nk, nv) = (cells(c.k_dim())?, cells(c.v_dim())?);
        let kv = match opts.kv_type {
            KvType::F16 => KvCache::F16 {
                k: vec![0u16; nk],
                v: vec![0u16; nv],
            },
            KvType::Q8_0 => {
                if c.head_dim % 32 != 0 || c.head_dim_v % 32 != 0 {
                    return Err(ModelError::BadOptions(format!(
                        "a q8_0 KV cache needs head sizes that are multiples of 32 (this model's are {} and {}); use --kv-type f16",
                        c.head_dim, c.head_dim_v
                    )));
                }
                KvCache::Q8_0 {
                    k: vec![0; nk / 32 * 34],
                    v: vec![0; nv / 32 * 34],
                }
            }
        };
        Ok(State {
            n_ctx: opts.n_ctx,
            n_past: 0,
            kv,
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
        match &self.kv {
            KvCache::F16 { k, v } => (k.len() + v.len()) * 2,
            KvCache::Q8_0 { k, v } => k.len() + v.len(),
        }
    }
    /// Storage format of the KV cache.
    pub fn kv_type(&self) -> KvType {
        match self.kv {
            KvCache::F16 { .. } => KvType::F16,
            KvCache::Q8_0 { .. } => KvType::Q8_0,
        }
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
