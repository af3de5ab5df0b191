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

/// Copying a sequence's keys and values out and back in, position by position (a prefix cache
/// keeps them for later requests). The bytes are opaque: whatever the cache's element type,
/// position `p` is one row of [`State::kv_bytes_per_pos`] bytes, its keys then values for every
/// layer in order, so a buffer of `n` rows can be written back at any position of any state
/// made by the same model. Keys and values depend on the position (RoPE), so write rows back
/// at the positions they were read from.
impl State {
    /// Bytes of one position's keys and values over all layers.
    pub fn kv_bytes_per_pos(&self) -> usize {
        (self.k_cache.len() + self.v_cache.len()) / self.n_ctx * 2
    }

    /// Appends the keys and values of positions `from..to` (all cached) to `out`.
    pub fn kv_read(
        &self,
        model: &Model,
        from: usize,
        to: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), ModelError> {
        let (n_layer, k_dim, v_dim) = self.kv_shape(model)?;
        if from > to || to > self.n_past {
            return Err(ModelError::BadOptions(format!(
                "cannot read KV positions {from}..{to}: the sequence holds {} positions",
                self.n_past
            )));
        }
        let start = out.len();
        out.resize(start + (to - from) * self.kv_bytes_per_pos(), 0);
        let mut dst = out[start..].chunks_exact_mut(2);
        for p in from..to {
            for l in 0..n_layer {
                let k = (l * self.n_ctx + p) * k_dim;
                let v = (l * self.n_ctx + p) * v_dim;
                let src = self.k_cache[k..k + k_dim].iter();
                for (x, d) in src.chain(&self.v_cache[v..v + v_dim]).zip(dst.by_ref()) {
                    d.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ok(())
    }

    /// Writes rows read by [`State::kv_read`] at positions `at..at + n` and makes the sequence
    /// hold exactly those `at + n` positions (`at` may not be beyond what it holds). Returns `n`.
    pub fn kv_write(&mut self, model: &Model, at: usize, rows: &[u8]) -> Result<usize, ModelError> {
        let (n_layer, k_dim, v_dim) = self.kv_shape(model)?;
        let row = self.kv_bytes_per_pos();
        if rows.len() % row != 0 {
            return Err(ModelError::BadOptions(format!(
                "{} bytes of KV rows are not a whole number of {row}-byte positions",
                rows.len()
            )));
        }
        let n = rows.len() / row;
        if at > self.n_past || at + n > self.n_ctx {
            return Err(ModelError::BadOptions(format!(
                "cannot write {n} KV positions at {at}: the sequence holds {} of {} positions",
                self.n_past, self.n_ctx
            )));
        }
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        let mut src = rows.chunks_exact(2);
        for p in at..at + n {
            for l in 0..n_layer {
                let k = (l * self.n_ctx + p) * k_dim;
                let v = (l * self.n_ctx + p) * v_dim;
                for (dst, b) in self.k_cache[k..k + k_dim].iter_mut().zip(src.by_ref()) {
                    *dst = half(b);
                }
                for (dst, b) in self.v_cache[v..v + v_dim].iter_mut().zip(src.by_ref()) {
                    *dst = half(b);
                }
            }
        }
        self.n_past = at + n;
        Ok(n)
    }

    /// `(n_layer, k_dim, v_dim)` of the cache, checked against `model`.
    fn kv_shape(&self, model: &Model) -> Result<(usize, usize, usize), ModelError> {
        let c = &model.config;
        let (n_layer, k_dim, v_dim) = (c.n_layer, c.k_dim(), c.v_dim());
        if self.k_cache.len() != n_layer * self.n_ctx * k_dim
            || self.v_cache.len() != n_layer * self.n_ctx * v_dim
        {
            return Err(ModelError::BadOptions(
                "this state was not made by this model (its KV cache has another shape)".into(),
            ));
        }
        Ok((n_layer, k_dim, v_dim))
    }
}

#[cfg(test)]
mod kv_copy_tests {
    use microllm_gguf::GgufFile;
    use microllm_testkit::{tiny_model_bytes, TinySpec};

    use crate::{Logits, Model, ModelOptions, StateOptions};

    fn model(spec: &TinySpec) -> Model {
        let file = GgufFile::from_bytes(tiny_model_bytes(spec)).unwrap();
        Model::from_gguf(
            file,
            ModelOptions {
                n_threads: 1,
                ..ModelOptions::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn copied_kv_rows_continue_exactly_like_the_original() {
        for spec in [TinySpec::llama(), TinySpec::gemma3()] {
            let m = model(&spec);
            let opts = StateOptions {
                n_ctx: 32,
                n_batch: 8,
            };
            let prompt: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 50).collect();
            let mut a = m.new_state(opts).unwrap();
            m.forward(&mut a, &prompt, Logits::None).unwrap();
            let mut rows = Vec::new();
            // Two pieces, like two cached blocks.
            a.kv_read(&m, 0, 5, &mut rows).unwrap();
            let cut = rows.len();
            a.kv_read(&m, 5, 12, &mut rows).unwrap();
            assert_eq!(rows.len(), 12 * a.kv_bytes_per_pos());

            // A state that holds something else: overwrite from position 0, then 5.
            let mut b = m.new_state(opts).unwrap();
            m.forward(&mut b, &[9, 9, 9, 9, 9, 9, 9], Logits::None)
                .unwrap();
            assert_eq!(b.kv_write(&m, 0, &rows[..cut]).unwrap(), 5);
            assert_eq!(b.n_past(), 5);
            assert_eq!(b.kv_write(&m, 5, &rows[cut..]).unwrap(), 7);
            assert_eq!(b.n_past(), 12);

            m.forward(&mut a, &[17, 4], Logits::Last).unwrap();
            m.forward(&mut b, &[17, 4], Logits::Last).unwrap();
            assert_eq!(a.logits(), b.logits(), "{:?}", spec.arch);
        }
    }

    #[test]
    fn kv_copy_refuses_bad_ranges() {
        let m = model(&TinySpec::llama());
        let opts = StateOptions {
            n_ctx: 8,
            n_batch: 8,
        };
        let mut s = m.new_state(opts).unwrap();
        m.forward(&mut s, &[1, 2, 3], Logits::None).unwrap();
        let mut rows = Vec::new();
        assert!(s.kv_read(&m, 0, 4, &mut rows).is_err());
        assert!(s.kv_read(&m, 2, 1, &mut rows).is_err());
        s.kv_read(&m, 0, 3, &mut rows).unwrap();
        let row = s.kv_bytes_per_pos();
        assert!(s.kv_write(&m, 4, &rows).is_err(), "a gap after n_past");
        assert!(s.kv_write(&m, 0, &rows[..row + 1]).is_err(), "partial row");
        assert!(s.kv_write(&m, 6, &[]).is_err());
        assert!(s.kv_write(&m, 3, &rows).is_ok());
        assert!(s.kv_write(&m, 6, &rows).is_err(), "past n_ctx");
        let other = model(&TinySpec::gemma3());
        assert!(s.kv_read(&other, 0, 1, &mut rows).is_err());
    }
}
