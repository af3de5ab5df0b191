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
    pub(crate) x: Vec<f32>,          // (n_rows, n_embd) residual stream
    pub(crate) xn: Vec<f32>,         // (n_rows, n_embd) normalised input of a sub-block
    pub(crate) q: Vec<f32>,          // (n_rows, q_dim)
    pub(crate) k: Vec<f32>,          // (n_rows, k_dim)
    pub(crate) v: Vec<f32>,          // (n_rows, v_dim)
    pub(crate) attn: Vec<f32>,       // (n_rows, n_head * head_dim_v)
    pub(crate) gate: Vec<f32>,       // (n_rows, n_ff)
    pub(crate) up: Vec<f32>,         // (n_rows, n_ff)
    pub(crate) act_q: Vec<u8>,       // (n_rows, activation row bytes) quantized matmul input
    pub(crate) scratch: Vec<f32>,    // matmul output transposed per row chunk
    pub(crate) rope_cos: Vec<f32>, // (2, n_rows, n_rot/2): global layers, then sliding-window layers
    pub(crate) rope_sin: Vec<f32>, // (2, n_rows, n_rot/2)
    pub(crate) rows: Vec<Row>,     // (n_rows) which sequence and position each row is
    pub(crate) out_rows: Vec<f32>, // (n_rows, n_embd) hidden states of the rows needing logits
    pub(crate) attn_tmp: Vec<f32>, // (n_rows * n_head, head_dim_v) batched attention output, regrouped
    pub(crate) attn_last: Vec<u32>, // (n_rows * n_head) last visible key per regrouped query row
    pub(crate) attn_grp: Vec<u32>, // (n_rows * n_head) (sequence, KV head) of each regrouped row
    pub(crate) attn_parts: Vec<f32>, // (n_head * DECODE_MAX_PARTS, head_dim_v + 2) split decode attention
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
            attn_parts: vec![0.0; c.n_head * crate::ops::DECODE_MAX_PARTS * (c.head_dim_v + 2)],
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
                if !c.head_dim.is_multiple_of(32) || !c.head_dim_v.is_multiple_of(32) {
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
        self.kv_bytes() / self.n_ctx
    }

    /// Bytes of one layer's keys and values at one position: `(k, v)`.
    fn kv_row_bytes(&self, k_dim: usize, v_dim: usize) -> (usize, usize) {
        match self.kv {
            KvCache::F16 { .. } => (2 * k_dim, 2 * v_dim),
            KvCache::Q8_0 { .. } => (k_dim / 32 * 34, v_dim / 32 * 34),
        }
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
        out.reserve((to - from) * self.kv_bytes_per_pos());
        let (kr, vr) = self.kv_row_bytes(k_dim, v_dim);
        let (dk, dv) = (model.config.head_dim, model.config.head_dim_v);
        for p in from..to {
            for l in 0..n_layer {
                let at = l * self.n_ctx + p;
                match &self.kv {
                    KvCache::F16 { k, v } => {
                        // Head-major cache (ops::store_kv): gather the position's row.
                        for (cache, d, dim) in [(k, dk, k_dim), (v, dv, v_dim)] {
                            for g in 0..dim / d {
                                let h = f16_head_start(l, g, self.n_ctx, d, dim) + p * d;
                                out.extend(cache[h..h + d].iter().flat_map(|x| x.to_le_bytes()));
                            }
                        }
                    }
                    KvCache::Q8_0 { k, v } => {
                        out.extend_from_slice(&k[at * kr..(at + 1) * kr]);
                        out.extend_from_slice(&v[at * vr..(at + 1) * vr]);
                    }
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
        if !rows.len().is_multiple_of(row) {
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
        let (kr, vr) = self.kv_row_bytes(k_dim, v_dim);
        let (dk, dv) = (model.config.head_dim, model.config.head_dim_v);
        let n_ctx = self.n_ctx;
        let mut src = rows;
        for p in at..at + n {
            for l in 0..n_layer {
                let i = l * n_ctx + p;
                let (kb, rest) = src.split_at(kr);
                let (vb, rest) = rest.split_at(vr);
                src = rest;
                match &mut self.kv {
                    KvCache::F16 { k, v } => {
                        // Head-major cache (ops::store_kv): scatter the row over the heads.
                        for (cache, bytes, d, dim) in [(k, kb, dk, k_dim), (v, vb, dv, v_dim)] {
                            for (g, hb) in bytes.chunks_exact(2 * d).enumerate() {
                                let h = f16_head_start(l, g, n_ctx, d, dim) + p * d;
                                for (x, c) in cache[h..h + d].iter_mut().zip(hb.chunks_exact(2)) {
                                    *x = u16::from_le_bytes([c[0], c[1]]);
                                }
                            }
                        }
                    }
                    KvCache::Q8_0 { k, v } => {
                        k[i * kr..(i + 1) * kr].copy_from_slice(kb);
                        v[i * vr..(i + 1) * vr].copy_from_slice(vb);
                    }
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
        let (kr, vr) = self.kv_row_bytes(k_dim, v_dim);
        if self.kv_bytes() != n_layer * self.n_ctx * (kr + vr) {
            return Err(ModelError::BadOptions(
                "this state was not made by this model (its KV cache has another shape)".into(),
            ));
        }
        Ok((n_layer, k_dim, v_dim))
    }
}

/// Where layer `l`'s KV head `g` starts in a head-major f16 cache of `n_ctx` positions (`d`
/// values per head, `dim` per position over all heads): its `n_ctx` positions of `d` values
/// follow (see `ops::store_kv`). The one definition of that layout.
pub(crate) fn f16_head_start(l: usize, g: usize, n_ctx: usize, d: usize, dim: usize) -> usize {
    l * n_ctx * dim + g * n_ctx * d
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
                ..StateOptions::default()
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
            ..StateOptions::default()
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
