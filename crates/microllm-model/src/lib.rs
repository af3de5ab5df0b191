//! The model: `Config` (hyper-parameters from GGUF metadata) + `Weights` (typed views into the
//! memory-mapped file) + `State` (activations and KV cache allocated once) + one readable
//! forward per architecture family in `arch/`.
//!
//! Design decision: quantization is a property of the weights, not of the model code. Every
//! matrix is a [`weights::QMatrix`] whose matmul dispatches on its format inside
//! `microllm-kernels`, so there is one forward per architecture whatever the file's quant mix,
//! and the decode loop runs on buffers owned by [`State`] without touching the heap.

#![forbid(unsafe_code)]

mod arch;
pub mod config;
mod kv_q8;
mod ops;
mod pack;
pub mod state;
pub mod weights;

use std::path::Path;

use microllm_gguf::{GgufError, GgufFile};
use microllm_kernels::pool::ThreadPool;
use microllm_kernels::Kernels;

pub use config::{Arch, Config, RopeScaling, RopeStyle};
pub use pack::PackStats;
pub use state::{KvType, Scratch, State, StateOptions};
pub use weights::{QMatrix, Weights};

/// Watches a forward pass from inside: what the compression tools (importance matrix, layer
/// pruning) and pooled embeddings read. Every method has an empty default; a forward without
/// an observer pays one virtual call per matmul, nothing else.
pub trait Observer {
    /// The f32 input of a matmul, `n_tok` rows of `w.n_cols`, just before it is multiplied by
    /// `w` (named by [`QMatrix::name`]; Phi-3's fused tensors report their parts under the
    /// fused name).
    fn matmul_input(&mut self, _w: &QMatrix, _x: &[f32], _n_tok: usize) {}
    /// The residual stream entering block `layer` (`n_tok` rows of `n_embd`); called once more
    /// with `layer == n_layer` after the last block.
    fn hidden(&mut self, _layer: usize, _x: &[f32], _n_tok: usize) {}
    /// Whether [`Observer::final_hidden`] is wanted (it costs a norm over every row).
    fn wants_final_hidden(&self) -> bool {
        false
    }
    /// Every row's final hidden state after the output norm (`n_tok` rows of `n_embd`): what
    /// the output projection turns into logits.
    fn final_hidden(&mut self, _x: &[f32], _n_tok: usize) {}
}

/// The observer of a plain forward: watches nothing.
pub(crate) struct NoObserver;
impl Observer for NoObserver {}

use ops::{Ctx, QuantizedInput};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported architecture '{arch}' (supported: {supported}); this build cannot run this model")]
    UnsupportedArch { arch: String, supported: String },
    #[error("tensor '{tensor}' has type {ty}, which this build cannot compute with (supported: {supported}); convert the model with a supported quantization")]
    UnsupportedType {
        tensor: String,
        ty: String,
        supported: String,
    },
    #[error("the model file lacks metadata key '{0}'; is this a complete GGUF conversion?")]
    MissingKey(String),
    #[error("the model file lacks tensor '{0}'; is this a complete GGUF conversion of a supported architecture?")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?} from the model's hyper-parameters")]
    TensorShape {
        name: String,
        expected: Vec<u64>,
        got: Vec<u64>,
    },
    #[error("bad model hyper-parameters: {0}")]
    BadConfig(String),
    #[error("bad options: {0}")]
    BadOptions(String),
    #[error("token id {id} is outside the vocabulary (n_vocab = {n_vocab})")]
    BadToken { id: u32, n_vocab: usize },
    #[error("the context is full: {n_past} tokens cached + {n_new} new > context size {n_ctx}; use a larger --ctx or a shorter prompt")]
    ContextFull {
        n_past: usize,
        n_new: usize,
        n_ctx: usize,
    },
    #[error("logits buffer holds {got} values, {expected} needed")]
    LogitsBuffer { expected: usize, got: usize },
    #[error("kernel error: {0}")]
    Kernel(String),
    #[error("could not start worker threads: {0}")]
    Threads(std::io::Error),
}

/// Which logits a forward call produces.
#[derive(Debug)]
pub enum Logits<'a> {
    /// None (e.g. a prompt prefix whose predictions nobody reads).
    None,
    /// The last token's logits, readable with [`State::logits`].
    Last,
    /// Every token's logits, `(n_tokens, n_vocab)` row-major, written into the buffer
    /// (the last row is also kept in [`State::logits`]).
    All(&'a mut [f32]),
}

#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Threads in the pool (including the caller); 0 = physical cores.
    pub n_threads: usize,
    /// The kernel table (SIMD path) to use.
    pub kernels: Kernels,
    /// Repack the Q4_0/Q4_1/Q8_0 matrices at load for the packed matmul (faster decode and
    /// small batches, same results as the panel path; see `microllm_kernels::packed`).
    /// `MICROLLM_PACK=0` turns it off; it is skipped when the model loads llama.cpp-exact
    /// (`MICROLLM_EXACT=1`), which never uses packed weights.
    pub pack: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            n_threads: 0,
            kernels: Kernels::detect(),
            pack: true,
        }
    }
}

/// A loaded model, ready to evaluate tokens into any number of [`State`]s.
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    file: GgufFile,
    kernels: Kernels,
    pool: ThreadPool,
    /// How RoPE angles are computed (global layers).
    rope: ops::RopeTables,
    /// The same for sliding-window layers with their own base (Gemma 3).
    rope_swa: Option<ops::RopeTables>,
    /// Batched matmuls use llama.cpp's arithmetic (`Kernels::gemm`) instead of the faster
    /// panel kernels (`Kernels::gemm_panel`); see [`Model::set_exact`].
    exact: bool,
    /// What packing the weights at load did.
    pack_stats: PackStats,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

impl Model {
    /// Maps and loads a GGUF file.
    pub fn load(path: &Path, opts: ModelOptions) -> Result<Self, ModelError> {
        Self::from_gguf(GgufFile::open(path)?, opts)
    }

    /// Loads from an opened GGUF file (checking every tensor's name, shape and type).
    pub fn from_gguf(file: GgufFile, opts: ModelOptions) -> Result<Self, ModelError> {
        let n_vocab_tensor = file
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).map(|&d| d as usize));
        let config = Config::from_metadata(file.metadata(), n_vocab_tensor)?;
        let kernels = opts.kernels;
        let mut weights = weights::Weights::load(
            &weights::Loader {
                file: &file,
                kernels: &kernels,
            },
            &config,
        )?;
        let n_threads = if opts.n_threads == 0 {
            ThreadPool::default_threads()
        } else {
            opts.n_threads
        };
        let pool = ThreadPool::new(n_threads).map_err(ModelError::Threads)?;
        let exact = std::env::var_os("MICROLLM_EXACT").is_some_and(|v| v != "0");
        let pack =
            opts.pack && !exact && std::env::var_os("MICROLLM_PACK").is_none_or(|v| v != "0");
        let pack_stats = if pack {
            pack::pack_weights(&mut weights, &file, &kernels, &pool)
        } else {
            PackStats::default()
        };
        let rope = rope_tables(&config, config.rope.base, weights.rope_freqs.as_deref());
        let rope_swa = config
            .rope_base_swa
            .map(|b| rope_tables(&config, b, weights.rope_freqs.as_deref()));
        let model = Model {
            config,
            weights,
            file,
            kernels,
            pool,
            rope,
            rope_swa,
            exact,
            pack_stats,
        };
        // Every matmul's activation format must exist on this kernel path.
        for l in &model.weights.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                state::act_type(&model, m.ty)?;
            }
        }
        state::act_type(&model, model.weights.output.ty)?;
        // The tiled attention's per-thread buffers, grown now so that no decode step allocates.
        let (dk, dv) = (model.config.head_dim, model.config.head_dim_v);
        model
            .pool
            .broadcast(&|_| model.kernels.reserve_attention(dk, dv));
        Ok(model)
    }

    /// Makes every matmul reproduce llama.cpp's x86 AVX2 arithmetic bit for bit (on: what
    /// the differential tests and tensor diffs need) or lets batched matmuls (prefill, several
    /// decoding sequences) use microllm's faster panel kernels, which differ from llama.cpp
    /// only in float rounding (off: the default). `MICROLLM_EXACT=1` turns it on at load.
    pub fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
    }

    /// What packing the weights at load did (see [`ModelOptions::pack`]).
    pub fn pack_stats(&self) -> PackStats {
        self.pack_stats
    }

    /// Whether matmuls are llama.cpp-exact (see [`Model::set_exact`]).
    pub fn exact(&self) -> bool {
        self.exact
    }

    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }
    /// The model's thread pool, for callers' own parallel work between forwards (sampling
    /// several sequences at once); it runs one operation at a time.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// Parameters (elements of all tensors).
    pub fn n_params(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.n_elements()).sum()
    }

    /// Bytes of all tensor data.
    pub fn weight_bytes(&self) -> u64 {
        self.file.tensors().iter().map(|t| t.n_bytes).sum()
    }

    /// A fresh sequence state (KV cache + its own activations for [`Model::forward`]).
    pub fn new_state(&self, opts: StateOptions) -> Result<State, ModelError> {
        // The calling thread runs part of every forward: its attention buffers too (see
        // `from_gguf`), in case it is not the thread that loaded the model.
        let (dk, dv) = (self.config.head_dim, self.config.head_dim_v);
        self.kernels.reserve_attention(dk, dv);
        State::new(self, opts)
    }

    /// Activations for [`Model::forward_batch`] calls of up to `n_rows` token rows in all.
    pub fn new_scratch(&self, n_rows: usize) -> Result<Scratch, ModelError> {
        Scratch::new(self, n_rows)
    }

    /// What the ops need; `batch` for a continuous-batching call (batch-invariant numerics).
    pub(crate) fn ctx(&self, batch: bool) -> Ctx<'_> {
        Ctx {
            kernels: &self.kernels,
            pool: &self.pool,
            file: &self.file,
            exact: self.exact,
            invariant: batch,
        }
    }

    /// Evaluates `tokens` after the `state.n_past()` tokens already cached, in batches of at
    /// most `state.n_batch()`.
    pub fn forward(
        &self,
        state: &mut State,
        tokens: &[u32],
        logits: Logits<'_>,
    ) -> Result<(), ModelError> {
        self.forward_observed(state, tokens, logits, &mut NoObserver)
    }

    /// [`Model::forward`] with an [`Observer`] watching every batch.
    pub fn forward_observed(
        &self,
        state: &mut State,
        tokens: &[u32],
        mut logits: Logits<'_>,
        obs: &mut dyn Observer,
    ) -> Result<(), ModelError> {
        let n_vocab = self.config.n_vocab;
        self.check_seq(state, tokens, &logits)?;
        let n_batch = state.scratch.n_rows;
        let n_chunks = tokens.len().div_ceil(n_batch);
        // The state's own scratch serves this call; taking it out leaves an empty (not
        // allocated) one behind, so the state can be borrowed as a sequence alongside it.
        let mut scratch = std::mem::take(&mut state.scratch);
        let mut result = Ok(());
        for (i, chunk) in tokens.chunks(n_batch).enumerate() {
            let last = i + 1 == n_chunks;
            let chunk_logits = match &mut logits {
                Logits::None => Logits::None,
                Logits::Last if last => Logits::Last,
                Logits::Last => Logits::None,
                Logits::All(buf) => {
                    let off = i * n_batch * n_vocab;
                    Logits::All(&mut buf[off..off + chunk.len() * n_vocab])
                }
            };
            let mut seqs = [SeqBatch {
                state: &mut *state,
                tokens: chunk,
                logits: chunk_logits,
            }];
            result = self.forward_rows(&mut scratch, &mut seqs, obs, false);
            if result.is_err() {
                break;
            }
        }
        state.scratch = scratch;
        result
    }

    /// Evaluates several sequences in one pass: every matmul multiplies the rows of all of
    /// them at once, so the weights are read once per call whatever the number of sequences
    /// (continuous batching). Each sequence appends its tokens to its own KV cache. The total
    /// number of tokens must fit `scratch.n_rows()`.
    pub fn forward_batch(
        &self,
        scratch: &mut Scratch,
        seqs: &mut [SeqBatch<'_>],
    ) -> Result<(), ModelError> {
        let mut total = 0;
        for sb in seqs.iter() {
            self.check_seq(sb.state, sb.tokens, &sb.logits)?;
            total += sb.tokens.len();
        }
        if total > scratch.n_rows {
            return Err(ModelError::BadOptions(format!(
                "{total} tokens in one batched call, more than the scratch's {} rows",
                scratch.n_rows
            )));
        }
        // Several sequences in one call (continuous batching): a sequence's results must not
        // depend on which others share its batch. The matmuls use one kernel family for
        // every batch size — the panel numerics (the panels for 4+ rows, the direct kernel
        // below, bit-identical per row; tested in microllm-kernels' tests/panel.rs), or
        // llama.cpp's per-pair kernels in exact mode — and attention runs row by row.
        self.forward_rows(scratch, seqs, &mut NoObserver, true)
    }

    /// Checks token ids, room in the context and the logits buffer of one sequence.
    fn check_seq(
        &self,
        state: &State,
        tokens: &[u32],
        logits: &Logits<'_>,
    ) -> Result<(), ModelError> {
        let n_vocab = self.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::BadToken { id, n_vocab });
        }
        if state.n_past + tokens.len() > state.n_ctx {
            return Err(ModelError::ContextFull {
                n_past: state.n_past,
                n_new: tokens.len(),
                n_ctx: state.n_ctx,
            });
        }
        if let Logits::All(buf) = logits {
            if buf.len() < tokens.len() * n_vocab {
                return Err(ModelError::LogitsBuffer {
                    expected: tokens.len() * n_vocab,
                    got: buf.len(),
                });
            }
        }
        Ok(())
    }

    /// One forward over the rows of `seqs` (already checked to fit `scratch`).
    fn forward_rows(
        &self,
        scratch: &mut Scratch,
        seqs: &mut [SeqBatch<'_>],
        obs: &mut dyn Observer,
        batch: bool,
    ) -> Result<(), ModelError> {
        let mut n_tok = 0;
        for (si, sb) in seqs.iter().enumerate() {
            for i in 0..sb.tokens.len() {
                scratch.rows[n_tok] = state::Row {
                    seq: si,
                    pos: sb.state.n_past + i,
                };
                n_tok += 1;
            }
        }
        if n_tok == 0 {
            return Ok(());
        }
        match self.config.arch {
            Arch::Llama | Arch::Qwen2 | Arch::Mistral | Arch::Phi3 => {
                arch::llama::forward(self, scratch, seqs, n_tok, obs, batch)?
            }
            Arch::Gemma2 | Arch::Gemma3 => {
                arch::gemma::forward(self, scratch, seqs, n_tok, obs, batch)?
            }
        }
        for sb in seqs.iter_mut() {
            sb.state.n_past += sb.tokens.len();
        }
        Ok(())
    }
}

/// One sequence's part of a [`Model::forward_batch`] call.
#[derive(Debug)]
pub struct SeqBatch<'a> {
    /// The sequence: its KV cache and position (its own scratch is not used).
    pub state: &'a mut State,
    /// Tokens to append.
    pub tokens: &'a [u32],
    /// Which of its logits to produce.
    pub logits: Logits<'a>,
}

fn rope_tables(c: &Config, base: f32, factors: Option<&[f32]>) -> ops::RopeTables {
    ops::RopeTables {
        n_pairs: c.rope.n_rot / 2,
        theta_scale: base.powf(-2.0 / c.rope.n_rot as f32),
        mscale: c.rope.attn_factor,
        freq_scale: match c.rope.scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        },
        factors: factors.map(<[f32]>::to_vec),
    }
}

/// Final norm and output projection for the rows that need logits: the last row of a
/// sequence asking for `Last`, every row of one asking for `All`. Those rows are gathered,
/// normalised and projected in column chunks that fit the matmul scratch.
pub(crate) fn output_logits(
    model: &Model,
    ctx: Ctx<'_>,
    x: &[f32],
    gathered: &mut [f32],
    input: &mut QuantizedInput<'_>,
    scratch: &mut [f32],
    seqs: &mut [SeqBatch<'_>],
    obs: &mut dyn Observer,
) -> Result<(), ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let d = c.n_embd;
    obs.hidden(w.layers.len(), x, x.len() / d);
    if obs.wants_final_hidden() {
        let mut all = x.to_vec();
        ops::rms_norm_in_place(&mut all, &w.output_norm, c.rms_eps);
        obs.final_hidden(&all, x.len() / d);
    }
    let n_vocab = c.n_vocab;
    // Gather.
    let (mut n_out, mut r0) = (0, 0);
    for sb in seqs.iter() {
        let n = sb.tokens.len();
        let (from, count) = match sb.logits {
            Logits::None => (0, 0),
            Logits::Last => (r0 + n - 1, 1),
            Logits::All(_) => (r0, n),
        };
        gathered[n_out * d..(n_out + count) * d].copy_from_slice(&x[from * d..(from + count) * d]);
        n_out += count;
        r0 += n;
    }
    if n_out == 0 {
        return Ok(());
    }
    let xs = &mut gathered[..n_out * d];
    ops::rms_norm_in_place(xs, &w.output_norm, c.rms_eps);
    let count_of = |sb: &SeqBatch<'_>| match sb.logits {
        Logits::None => 0,
        Logits::Last => 1,
        Logits::All(_) => sb.tokens.len(),
    };
    // Several rows (continuous batching's decode rows): one projection for all of them, so
    // the output matrix, often the largest, is read once per step, not once per sequence.
    // Half the scratch holds the matmul's transposed chunks, the other half the logits.
    let pair = scratch.len() / (2 * n_vocab);
    if n_out >= 2 && pair >= 2 {
        let (tmp, outb) = scratch.split_at_mut(pair * n_vocab);
        let (mut si, mut j) = (0, 0); // the sequence and its row the next gathered row is
        let mut g0 = 0;
        while g0 < n_out {
            let nt = pair.min(n_out - g0);
            let src = &xs[g0 * d..(g0 + nt) * d];
            input.invalidate();
            obs.matmul_input(&w.output, src, nt);
            let logits = &mut outb[..nt * n_vocab];
            ops::matmul(ctx, &w.output, src, nt, input, tmp, logits, None);
            for row in logits.chunks_exact_mut(n_vocab) {
                final_softcap(c, row);
                while j == count_of(&seqs[si]) {
                    (si, j) = (si + 1, 0);
                }
                let sb = &mut seqs[si];
                let last = j + 1 == count_of(sb);
                if let Logits::All(buf) = &mut sb.logits {
                    buf[j * n_vocab..(j + 1) * n_vocab].copy_from_slice(row);
                }
                if last {
                    sb.state.logits.copy_from_slice(row);
                }
                j += 1;
            }
            g0 += nt;
        }
        return Ok(());
    }
    // Project and scatter, `cols` rows at a time.
    let cols = (scratch.len() / n_vocab).max(1);
    let mut out_row = 0; // index into the gathered rows
    for sb in seqs.iter_mut() {
        let count = match sb.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All(_) => sb.tokens.len(),
        };
        let mut done = 0;
        while done < count {
            let nt = cols.min(count - done);
            let src = &xs[(out_row + done) * d..(out_row + done + nt) * d];
            input.invalidate();
            obs.matmul_input(&w.output, src, nt);
            let dst: &mut [f32] = match &mut sb.logits {
                Logits::All(buf) => &mut buf[done * n_vocab..(done + nt) * n_vocab],
                _ => &mut sb.state.logits[..],
            };
            ops::matmul(ctx, &w.output, src, nt, input, scratch, dst, None);
            final_softcap(c, dst);
            done += nt;
        }
        if let Logits::All(buf) = &sb.logits {
            if count > 0 {
                sb.state
                    .logits
                    .copy_from_slice(&buf[(count - 1) * n_vocab..count * n_vocab]);
            }
        }
        out_row += count;
    }
    Ok(())
}

/// Gemma 2's final soft-capping, `cap * tanh(x / cap)` as llama.cpp evaluates it.
fn final_softcap(c: &Config, logits: &mut [f32]) {
    if let Some(cap) = c.final_softcap {
        let inv = 1.0 / cap;
        for v in logits.iter_mut() {
            *v = (*v * inv).tanh() * cap;
        }
    }
}
