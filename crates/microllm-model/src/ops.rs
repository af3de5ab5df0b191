//! Shared blocks of the forward passes: matmul over the pool, norms, RoPE, attention.
//! Activations are row-major `(n_tokens, width)` f32 slices.

use half::f16;
use half::slice::HalfBitsSliceExt;
use microllm_gguf::{GgmlType, GgufFile};
use microllm_kernels::panel::PANEL_ROWS;
use microllm_kernels::pool::ThreadPool;
use microllm_kernels::Kernels;

use crate::config::{Config, RopeStyle};
use crate::kv_q8;
use crate::state::{KvCache, Row};
use crate::weights::QMatrix;
use crate::SeqBatch;

/// What a forward needs besides weights and state.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub kernels: &'a Kernels,
    pub pool: &'a ThreadPool,
    pub file: &'a GgufFile,
    /// llama.cpp-exact matmuls only (no panel kernels).
    pub exact: bool,
    /// A continuous-batching call: every row's results must not depend on the other rows of
    /// the call, so the matmuls take one kernel family whatever the number of rows (the panel
    /// numerics, unless `exact`) and attention the tiled kernel's row-invariant variant (f16
    /// caches) or the per-row exact path.
    pub invariant: bool,
}

/// Fewest activation rows for which a matmul uses the panel kernels outside continuous
/// batching (below, llama.cpp's per-pair kernels decode a little faster on some formats).
const PANEL_MIN_ROWS: usize = 4;

/// The layout a [`QuantizedInput`] holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ActFormat {
    /// A ggml activation type (Q8_0, Q8_1, Q8_K, F32...).
    Ggml(GgmlType),
    /// The panel kernels' layout (`microllm_kernels::panel`).
    Panel,
}

/// Writes a named intermediate (`{name}-{layer}.bin`, raw little-endian f32) into
/// `$MICROLLM_TAP_DIR` so a run can be diffed against llama.cpp's tensors
/// (tools/fixtures/dump_logits.cpp with DUMP_DIR). Compiled only with the `tap` feature.
#[cfg(feature = "tap")]
pub(crate) fn tap(name: &str, layer: usize, x: &[f32]) {
    if let Ok(dir) = std::env::var("MICROLLM_TAP_DIR") {
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let _ = std::fs::write(format!("{dir}/{name}-{layer}.bin"), bytes);
    }
}

/// See the `tap` feature version; compiles to nothing.
#[cfg(not(feature = "tap"))]
#[inline(always)]
pub(crate) fn tap(_name: &str, _layer: usize, _x: &[f32]) {}

/// Activations quantized for the matmuls: remembers which input and format it holds so that
/// Q, K and V (or gate and up) quantize their shared input once.
pub(crate) struct QuantizedInput<'s> {
    pub buf: &'s mut [u8],
    /// `(format, row length)` currently held, if any.
    held: Option<(ActFormat, usize)>,
}

impl<'s> QuantizedInput<'s> {
    pub fn new(buf: &'s mut [u8]) -> Self {
        Self { buf, held: None }
    }

    /// Marks the content stale (the input changed).
    pub fn invalidate(&mut self) {
        self.held = None;
    }

    /// Makes sure the buffer holds `x` (n_tok rows of `k`) in `ty`; returns the bytes per row.
    fn ensure(&mut self, ctx: Ctx<'_>, fmt: ActFormat, x: &[f32], n_tok: usize, k: usize) -> usize {
        let row = match fmt {
            ActFormat::Ggml(ty) => {
                ty.row_size(k as u64).expect("row length checked at load") as usize
            }
            ActFormat::Panel => microllm_kernels::panel::act_row_bytes(k),
        };
        if self.held != Some((fmt, k)) {
            let dst = &mut self.buf[..n_tok * row];
            let quantize = |i: usize, out: &mut [u8]| {
                let x = &x[i * k..(i + 1) * k];
                match fmt {
                    ActFormat::Ggml(ty) => ctx.kernels.quantize_activation(ty, x, out),
                    ActFormat::Panel => ctx.kernels.quantize_panel_act(x, out),
                }
                .expect("activation format checked at load");
            };
            if n_tok * k >= SERIAL_MAX_ELEMS || n_tok >= ROW_PARALLEL_MIN {
                ctx.pool.for_each_chunk_mut(dst, row, quantize);
            } else {
                for (i, out) in dst.chunks_mut(row).enumerate() {
                    quantize(i, out);
                }
            }
            self.held = Some((fmt, k));
        }
        row
    }
}

/// How a matmul of `w` runs.
#[derive(Clone, Copy, PartialEq)]
struct Plan {
    /// Packed weights (packed at load) whenever not exact: the panel kernels' results, bit
    /// for bit, without unpacking per call.
    packed: bool,
    /// Else the panel kernels for batches (unless exact; every row count in continuous
    /// batching), else llama.cpp's kernels with the activation format of the weight format
    /// (checked for every matrix at load).
    panel: bool,
    fmt: ActFormat,
}

impl Plan {
    fn of(ctx: Ctx<'_>, w: &QMatrix, n_tok: usize) -> Self {
        let packed = w.packed().is_some() && !ctx.exact;
        let panel = packed
            || ((n_tok >= PANEL_MIN_ROWS || ctx.invariant)
                && !ctx.exact
                && ctx.kernels.panel_supports(w.ty));
        let fmt = if panel {
            ActFormat::Panel
        } else {
            ActFormat::Ggml(
                ctx.kernels
                    .vec_dot_type(w.ty)
                    .expect("activation format checked at load"),
            )
        };
        Self { packed, panel, fmt }
    }
}

/// Rows `r0..r0 + out.len()` of a one-token product `x · wᵀ` (`act`: `x` quantized in the
/// format of `w`'s [`Plan`]), by the packed, panel or llama.cpp kernel.
fn decode_rows(ctx: Ctx<'_>, w: &QMatrix, panel: bool, act: &[u8], r0: usize, out: &mut [f32]) {
    let (k, len) = (w.n_cols, out.len());
    if let Some(p) = w.packed_from(r0).filter(|_| !ctx.exact) {
        return ctx.kernels.gemm_packed(w.ty, k, p, len, act, 1, out, len);
    }
    let rb = w.row_bytes;
    let wr = &w.data(ctx.file)[r0 * rb..(r0 + len) * rb];
    if panel {
        ctx.kernels.gemm_panel(w.ty, k, wr, len, act, 1, out, len);
    } else {
        ctx.kernels.gemm(w.ty, k, wr, len, act, 1, out, len);
    }
}

/// `out (n_tok, w.n_rows) = x (n_tok, w.n_cols) · wᵀ`, spread over the pool.
///
/// Decode (one token) splits the rows into chunks written straight into `out`. With several
/// tokens every chunk of rows is multiplied with all the tokens at once (the weights are read
/// once per call, not once per token) into `scratch`, transposed per chunk, then scattered.
/// `side`, if any, is prefetched piece by piece along the packed paths' runs
/// ([`KvPrefetch`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    ctx: Ctx<'_>,
    w: &QMatrix,
    x: &[f32],
    n_tok: usize,
    input: &mut QuantizedInput<'_>,
    scratch: &mut [f32],
    out: &mut [f32],
    side: Option<&KvPrefetch<'_, '_>>,
) {
    let k = w.n_cols;
    let n_rows = w.n_rows;
    let n_threads = ctx.pool.n_threads();
    let kernels = ctx.kernels;
    let wdata = w.data(ctx.file);
    let rb = w.row_bytes;
    let Plan { packed, panel, fmt } = Plan::of(ctx, w, n_tok);
    let arow = input.ensure(ctx, fmt, x, n_tok, k);
    let act = &input.buf[..n_tok * arow];
    if n_tok == 1 {
        // One contiguous run of rows per thread: decode streams the weights from memory once,
        // and each thread reading one long run keeps the prefetchers ahead (finer tasks
        // restart a stream at every task: 16 per matrix decoded SmolLM2 at 171 tok/s, 2 per
        // matrix at 205-220; Gemma 3 96 -> 118). A thread done early takes panels from the
        // back of the other runs, so the threads finish together.
        let n_panels = n_rows.div_ceil(PANEL_ROWS);
        let offset = |p: usize| (p * PANEL_ROWS).min(n_rows);
        ctx.pool.for_each_run_mut(
            &mut out[..n_rows],
            n_panels,
            offset,
            RUN_GRAIN,
            RUN_STEAL,
            |p0, p1, o| {
                if let Some(side) = side {
                    side.part(p0, p1, n_panels);
                }
                decode_rows(ctx, w, panel, act, p0 * PANEL_ROWS, o)
            },
        );
        return;
    }
    if packed {
        // Each piece of rows writes its outputs for every token straight into `out`; one run
        // of panels per thread, balanced by stealing (as decode).
        let n_panels = n_rows.div_ceil(PANEL_ROWS);
        let offset = |p: usize| (p * PANEL_ROWS).min(n_rows);
        ctx.pool.for_each_run_columns_mut(
            out,
            n_tok,
            n_rows,
            n_panels,
            offset,
            RUN_GRAIN,
            RUN_STEAL_BATCH,
            |p0, p1, mut blk| {
                // With a side prefetch, a few panels at a time, each after its share of the
                // prefetches: spread out, they wait on no free miss slot.
                let step = if side.is_some() { SIDE_PANELS } else { p1 - p0 };
                let mut p = p0;
                while p < p1 {
                    let pe = (p + step).min(p1);
                    if let Some(side) = side {
                        side.part(p, pe, n_panels);
                    }
                    let (r0, r1) = (p * PANEL_ROWS, (pe * PANEL_ROWS).min(n_rows));
                    let at = r0 - blk.first();
                    kernels.gemm_packed_into(
                        w.ty,
                        k,
                        w.packed_from(r0).expect("packed"),
                        r1 - r0,
                        act,
                        n_tok,
                        &mut |c, r, v| microllm_kernels::put_rows(&mut blk.row_mut(c)[at + r..], v),
                    );
                    p = pe;
                }
            },
        );
        return;
    }
    let align = if panel {
        microllm_kernels::panel::PANEL_ROWS
    } else {
        4
    };
    // Two runs of rows per thread: long weight streams (see above), with a little room for
    // the dynamic schedule to even out the threads.
    let chunk = chunk_rows(n_rows, n_threads * 2, align);
    let tmp = &mut scratch[..n_rows * n_tok];
    ctx.pool.for_each_chunk_mut(tmp, chunk * n_tok, |ci, s| {
        let r0 = ci * chunk;
        let len = s.len() / n_tok;
        let wr = &wdata[r0 * rb..(r0 + len) * rb];
        if panel {
            kernels.gemm_panel(w.ty, k, wr, len, act, n_tok, s, len);
        } else {
            kernels.gemm(w.ty, k, wr, len, act, n_tok, s, len);
        }
    });
    scatter(ctx, &scratch[..n_rows * n_tok], n_rows, n_tok, chunk, out);
}

/// Panels a thread takes at a time from its own run of a decode matmul (4 decode tiles).
const RUN_GRAIN: usize = 16;
/// Panels a thread done with its run takes at a time from the back of another's (1 tile).
const RUN_STEAL: usize = 4;
/// The same for batches (a panel takes a while there: all the tokens' columns).
const RUN_STEAL_BATCH: usize = 1;
/// Panels per kernel call of a batched matmul that carries a side prefetch.
const SIDE_PANELS: usize = 2;

/// `outs[i] = x · ws[i]ᵀ` for matrices sharing their input (Q/K/V, gate/up). Decoding one
/// token with packed weights, all of them are one pool operation (their panels one after the
/// other, split into one run per thread as in [`matmul`]) instead of one each: a decode step
/// is memory-bound and its small
/// matrices (SmolLM2's K and V: 69 KB each) take less time to stream than a pool round trip.
/// The same results as separate [`matmul`]s (every row computed by the same kernel call), to
/// which it falls back otherwise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_group<const N: usize>(
    ctx: Ctx<'_>,
    ws: [&QMatrix; N],
    x: &[f32],
    n_tok: usize,
    input: &mut QuantizedInput<'_>,
    scratch: &mut [f32],
    outs: [&mut [f32]; N],
    side: Option<&KvPrefetch<'_, '_>>,
) {
    let k = ws[0].n_cols;
    let plan = Plan::of(ctx, ws[0], n_tok);
    // The pool's pieces start at even panels of the concatenation, which are even panels of
    // each matrix only if the ones before have even panel counts (packed Q8_0 pairs panels).
    let fused = n_tok == 1
        && ws
            .iter()
            .all(|w| w.n_cols == k && Plan::of(ctx, w, n_tok) == plan)
        && ws[..N - 1]
            .iter()
            .all(|w| w.n_rows.div_ceil(PANEL_ROWS) % 2 == 0)
        && ws.iter().map(|w| w.n_rows).sum::<usize>() <= scratch.len();
    if !fused {
        // The side prefetch rides on the first (largest) matrix.
        for (i, (w, out)) in ws.into_iter().zip(outs).enumerate() {
            let side = if i == 0 { side } else { None };
            matmul(ctx, w, x, n_tok, input, scratch, out, side);
        }
        return;
    }
    let arow = input.ensure(ctx, plan.fmt, x, 1, k);
    let act = &input.buf[..arow];
    // The matrices' panels one after the other: matrix i's start at panel pstart[i] and
    // row base[i] of the concatenated output.
    let (mut pstart, mut base) = ([0usize; N], [0usize; N]);
    let (mut np, mut nr) = (0, 0);
    for (i, w) in ws.iter().enumerate() {
        (pstart[i], base[i]) = (np, nr);
        np += w.n_rows.div_ceil(PANEL_ROWS);
        nr += w.n_rows;
    }
    let which = |p: usize| (0..N).rev().find(|&i| pstart[i] <= p).unwrap_or(0);
    let offset = |p: usize| {
        if p >= np {
            return nr;
        }
        let i = which(p);
        base[i] + ((p - pstart[i]) * PANEL_ROWS).min(ws[i].n_rows)
    };
    let all = &mut scratch[..nr];
    ctx.pool
        .for_each_run_mut(all, np, offset, RUN_GRAIN, RUN_STEAL, |p0, p1, o| {
            if let Some(side) = side {
                side.part(p0, p1, np);
            }
            // The piece's panels, matrix by matrix.
            let mut p = p0;
            while p < p1 {
                let i = which(p);
                let w = ws[i];
                let pe = p1.min(pstart[i] + w.n_rows.div_ceil(PANEL_ROWS));
                let r0 = (p - pstart[i]) * PANEL_ROWS;
                let len = ((pe - pstart[i]) * PANEL_ROWS).min(w.n_rows) - r0;
                let at = offset(p) - offset(p0);
                decode_rows(ctx, w, plan.panel, act, r0, &mut o[at..at + len]);
                p = pe;
            }
        });
    let mut at = 0;
    for (w, out) in ws.iter().zip(outs) {
        out[..w.n_rows].copy_from_slice(&scratch[at..at + w.n_rows]);
        at += w.n_rows;
    }
}

/// Copies a matmul's output from `tmp` (per chunk of `chunk` rows: column-major
/// `(n_tok, len)`) into `out` (row-major `(n_tok, n_rows)`).
fn scatter(ctx: Ctx<'_>, tmp: &[f32], n_rows: usize, n_tok: usize, chunk: usize, out: &mut [f32]) {
    let row = |t: usize, orow: &mut [f32]| {
        let mut r0 = 0;
        while r0 < n_rows {
            let len = chunk.min(n_rows - r0);
            let base = r0 * n_tok + t * len;
            orow[r0..r0 + len].copy_from_slice(&tmp[base..base + len]);
            r0 += len;
        }
    };
    let out = &mut out[..n_tok * n_rows];
    if out.len() >= SERIAL_MAX_ELEMS {
        ctx.pool.for_each_chunk_mut(out, n_rows, row);
    } else {
        for (t, orow) in out.chunks_mut(n_rows).enumerate() {
            row(t, orow);
        }
    }
}

/// Below this many elements, an activation quantization or an output scatter runs on the
/// calling thread: a few microseconds of work, less than a pool operation's barrier costs
/// (continuous batching's decode steps of a few rows issued ~20 such operations per layer;
/// an 8-sequence step measured 433 -> 445 tok/s, medians of 5 alternating runs: within the
/// machine's noise).
const SERIAL_MAX_ELEMS: usize = 1 << 15;

/// From this many token rows up, the row-wise steps between matmuls (RMSNorm, RoPE, the
/// activation quantization) are spread over the pool: continuous batching's 8-row steps spent
/// a fifth of the calling thread's time in them while the other threads waited (perf).
const ROW_PARALLEL_MIN: usize = 4;

/// [`rms_norm`], one task per row from [`ROW_PARALLEL_MIN`] rows up (the same arithmetic).
pub(crate) fn rms_norm_rows(ctx: Ctx<'_>, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    let n_tok = x.len() / n.max(1);
    if n_tok < ROW_PARALLEL_MIN {
        return rms_norm(x, w, eps, out);
    }
    ctx.pool
        .for_each_chunk_mut(&mut out[..n_tok * n], n, |t, o| {
            rms_norm(&x[t * n..(t + 1) * n], w, eps, o)
        });
}

/// `gate = act(gate) * up` (SwiGLU, or GeGLU with `gelu`) on `n_tok` rows of `n_ff`, one
/// task per row from [`ROW_PARALLEL_MIN`] rows up (elementwise: the same results).
pub(crate) fn glu_rows(ctx: Ctx<'_>, gate: &mut [f32], up: &[f32], n_tok: usize, gelu: bool) {
    let k = ctx.kernels;
    let f = |g: &mut [f32], u: &[f32]| {
        if gelu {
            k.geglu(g, u)
        } else {
            k.swiglu(g, u)
        }
    };
    if n_tok < ROW_PARALLEL_MIN {
        return f(gate, up);
    }
    let n_ff = gate.len() / n_tok;
    ctx.pool
        .for_each_chunk_mut(gate, n_ff, |t, g| f(g, &up[t * n_ff..(t + 1) * n_ff]));
}

/// Rotates the first `n_rot` dimensions of every head of each of the `n_tok` rows of `x`
/// (rows of `n_heads * head_dim`; `cos`/`sin` hold `n_rot / 2` angles per row), one task per
/// row from [`ROW_PARALLEL_MIN`] rows up (the same arithmetic).
pub(crate) fn rope_rows(
    ctx: Ctx<'_>,
    x: &mut [f32],
    n_tok: usize,
    n_heads: usize,
    head_dim: usize,
    style: RopeStyle,
    cos: &[f32],
    sin: &[f32],
) {
    let h = (cos.len() / n_tok.max(1)).min(head_dim / 2);
    let neox = matches!(style, RopeStyle::Neox);
    let row = n_heads * head_dim;
    let one = |t: usize, xr: &mut [f32]| {
        let (c, s) = (&cos[t * h..(t + 1) * h], &sin[t * h..(t + 1) * h]);
        ctx.kernels.rope(xr, head_dim, neox, c, s);
    };
    let x = &mut x[..n_tok * row];
    if n_tok < ROW_PARALLEL_MIN {
        x.chunks_exact_mut(row.max(1))
            .enumerate()
            .for_each(|(t, xr)| one(t, xr));
    } else {
        ctx.pool.for_each_chunk_mut(x, row, one);
    }
}

/// Rows per task: about `n_tasks` tasks, a multiple of `align`, at least `align`.
fn chunk_rows(n_rows: usize, n_tasks: usize, align: usize) -> usize {
    let c = n_rows.div_ceil(n_tasks.max(1));
    c.div_ceil(align).max(1) * align
}

/// RMSNorm of each row of `x` into `out`, times `w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        // Squares in f32, summed in f64, mean rounded to f32: ggml's order of rounding.
        let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (ss / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// RMSNorm of each row of `x` in place, times `w` (rows of `w.len()`: per head for Q/K norms).
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (ss / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

/// `x *= s` elementwise (ggml_scale).
pub(crate) fn scale_in_place(x: &mut [f32], s: f32) {
    for v in x.iter_mut() {
        *v *= s;
    }
}

/// `x += y` elementwise.
pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Adds `bias` to every row of `x`.
pub(crate) fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

/// Fills the cos/sin tables for the positions of `rows`. The angle of pair `i` is
/// `p · scale · base^(-2i/n_rot) / factor_i`, with the power built by repeated f32
/// multiplication exactly as ggml does, so the rotated values match llama.cpp's bit for bit.
pub(crate) fn rope_tables(rope: &RopeTables, rows: &[Row], cos: &mut [f32], sin: &mut [f32]) {
    let h = rope.n_pairs;
    for (t, row) in rows.iter().enumerate() {
        let mut theta = row.pos as f32;
        for i in 0..h {
            let ff = rope.factors.as_ref().map_or(1.0, |f| f[i]);
            let th = rope.freq_scale * (theta / ff);
            cos[t * h + i] = th.cos() * rope.mscale;
            sin[t * h + i] = th.sin() * rope.mscale;
            theta *= rope.theta_scale;
        }
    }
}

/// What the RoPE tables are built from.
#[derive(Clone, Debug)]
pub(crate) struct RopeTables {
    pub n_pairs: usize,
    /// `base^(-2/n_rot)`.
    pub theta_scale: f32,
    /// 1 / linear scaling factor.
    pub freq_scale: f32,
    /// Multiplies cos and sin (1 unless the model sets an attention factor).
    pub mscale: f32,
    /// Per-pair divisors (`rope_freqs.weight`, llama3-style scaling).
    pub factors: Option<Vec<f32>>,
}

/// Widest attention head supported (Gemma uses 256).
pub(crate) const MAX_HEAD_DIM: usize = 512;

/// Geometry of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub head_dim_v: usize,
    pub scale: f32,
    /// A key at position j is visible from position p when p - j < window.
    pub window: Option<usize>,
    /// Score soft-capping (0 = off).
    pub softcap: f32,
}

/// Causal attention of every row's query over the cached keys/values of its own sequence in
/// layer `il` (positions 0..=pos already written). One task per (row, head).
pub(crate) fn attention(
    ctx: Ctx<'_>,
    sh: AttnShape,
    q: &[f32],
    rows: &[Row],
    seqs: &[SeqBatch<'_>],
    il: usize,
    out: &mut [f32],
) {
    let q_dim = sh.n_head * sh.head_dim;
    let k_dim = sh.n_head_kv * sh.head_dim;
    let v_dim = sh.n_head_kv * sh.head_dim_v;
    let n_rep = sh.n_head / sh.n_head_kv;
    let kernels = ctx.kernels;
    let n_tok = rows.len();
    let out = &mut out[..n_tok * sh.n_head * sh.head_dim_v];
    ctx.pool.for_each_chunk_mut(out, sh.head_dim_v, |idx, o| {
        let t = idx / sh.n_head;
        let h = idx % sh.n_head;
        let g = h / n_rep;
        let Row { seq, pos: p } = rows[t];
        let state = &*seqs[seq].state;
        let n_ctx = state.n_ctx;
        let start = match sh.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        let qh = &q[t * q_dim + h * sh.head_dim..t * q_dim + (h + 1) * sh.head_dim];
        let n_kv = p + 1 - start;
        match &state.kv {
            KvCache::F16 { k, v } => {
                let (k, v) = (k.reinterpret_cast::<f16>(), v.reinterpret_cast::<f16>());
                let k_head = f16_head(k, il, g, n_ctx, sh.head_dim, k_dim);
                let v_head = f16_head(v, il, g, n_ctx, sh.head_dim_v, v_dim);
                // Q rounded to f16 like the cached keys; the kernel mirrors llama.cpp's CPU
                // flash attention (f16 accumulator, key-by-key online softmax), which the
                // references use.
                let mut qbuf = [f16::ZERO; MAX_HEAD_DIM];
                let q16 = &mut qbuf[..sh.head_dim];
                kernels.f32_to_f16(qh, q16);
                kernels.attention_f16(
                    q16,
                    &k_head[start * sh.head_dim..],
                    sh.head_dim,
                    &v_head[start * sh.head_dim_v..],
                    sh.head_dim_v,
                    n_kv,
                    sh.scale,
                    sh.softcap,
                    o,
                );
            }
            KvCache::Q8_0 { k, v } => {
                let (kr, vr) = (kv_q8::row_bytes(k_dim), kv_q8::row_bytes(v_dim));
                let k_cache = &k[il * n_ctx * kr..(il + 1) * n_ctx * kr];
                let v_cache = &v[il * n_ctx * vr..(il + 1) * n_ctx * vr];
                kv_q8::attention(
                    kernels,
                    qh,
                    &k_cache[start * kr + kv_q8::row_bytes(g * sh.head_dim)..],
                    kr,
                    &v_cache[start * vr + kv_q8::row_bytes(g * sh.head_dim_v)..],
                    vr,
                    n_kv,
                    sh.scale,
                    sh.softcap,
                    o,
                );
            }
        }
    });
}

/// Attention of a forward's rows: the tiled kernel for batches (unless `ctx.exact`), the
/// llama.cpp-exact per-(row, head) one otherwise. `bufs` are free scratch of the forward.
pub(crate) fn attention_any(
    ctx: Ctx<'_>,
    sh: AttnShape,
    q: &[f32],
    rows: &[Row],
    seqs: &[SeqBatch<'_>],
    il: usize,
    bufs: AttnBufs<'_>,
    out: &mut [f32],
) {
    let f16_kv = seqs
        .iter()
        .all(|s| matches!(s.state.kv, KvCache::F16 { .. }));
    // Continuous batching (`invariant`) takes the tiled kernel's row-invariant variant: the
    // other paths' results depend on how a prompt is chunked and on the other rows.
    let fast = !ctx.exact && f16_kv;
    if ctx.invariant && fast {
        attention_rows(ctx, sh, q, rows, seqs, il, bufs, out);
    } else if rows.len() == 1 && fast {
        attention_decode(ctx, sh, q, rows[0], seqs, il, bufs, out);
    } else if rows.len() >= 2 && fast {
        attention_rows(ctx, sh, q, rows, seqs, il, bufs, out);
    } else {
        attention(ctx, sh, q, rows, seqs, il, out);
    }
}

/// Most parts the keys of one KV head are split into by [`attention_decode`].
pub(crate) const DECODE_MAX_PARTS: usize = 8;
/// Fewest keys per part of [`attention_decode`]: below, a part costs more in pool and merge
/// overhead than it saves. Small enough that a short context splits too: SmolLM2's 3 KV heads
/// on 2 threads otherwise leave one thread idle a third of the attention (tg256 on SmolLM2,
/// A/B alternating: 229 -> 236 tok/s with 64 instead of 256).
const DECODE_MIN_PART_KEYS: usize = 64;

/// Attention of one token (decode), microllm's fast path: the `n_rep` query heads sharing a KV
/// head are the rows of one `Kernels::attention_rows` call, so each key and value is
/// converted once for all of them. With a long context every KV head's keys are also split
/// into parts run on different threads (flash-decoding), each returning its score maximum,
/// sum of exponentials and unnormalised output, merged afterwards with log-sum-exp
/// rescaling, so every thread is busy even with a single KV head. Not llama.cpp-exact (see
/// [`attention`]); f16 caches only.
pub(crate) fn attention_decode(
    ctx: Ctx<'_>,
    sh: AttnShape,
    q: &[f32],
    row: Row,
    seqs: &[SeqBatch<'_>],
    il: usize,
    b: AttnBufs<'_>,
    out: &mut [f32],
) {
    let (dk, dv) = (sh.head_dim, sh.head_dim_v);
    let k_dim = sh.n_head_kv * dk;
    let v_dim = sh.n_head_kv * dv;
    let n_rep = sh.n_head / sh.n_head_kv;
    let state = &*seqs[row.seq].state;
    let n_ctx = state.n_ctx;
    let KvCache::F16 { k, v } = &state.kv else {
        unreachable!("attention_any routes only f16 caches here")
    };
    let (k, v) = (k.reinterpret_cast::<f16>(), v.reinterpret_cast::<f16>());
    let window = sh.window.unwrap_or(0);
    let start = if window > 0 {
        (row.pos + 1).saturating_sub(window)
    } else {
        0
    };
    let n_kv = row.pos + 1 - start;
    // Enough parts for about two tasks per thread, each of at least DECODE_MIN_PART_KEYS
    // (none on one thread: a split only adds work there).
    let n_threads = ctx.pool.n_threads();
    let want = if n_threads > 1 {
        (2 * n_threads).div_ceil(sh.n_head_kv)
    } else {
        1
    };
    let n_parts = want
        .min(n_kv / DECODE_MIN_PART_KEYS)
        .clamp(1, DECODE_MAX_PARTS);
    let last = &mut b.last[..n_rep];
    last.fill(row.pos as u32);
    let last = &*last;
    let kernels = ctx.kernels;
    let out = &mut out[..sh.n_head * dv];
    if n_parts == 1 {
        ctx.pool.for_each_chunk_mut(out, n_rep * dv, |g, o| {
            kernels.attention_rows(
                &q[g * n_rep * dk..(g + 1) * n_rep * dk],
                dk,
                last,
                window,
                f16_head(k, il, g, n_ctx, dk, k_dim),
                dk,
                f16_head(v, il, g, n_ctx, dv, v_dim),
                dv,
                sh.scale,
                sh.softcap,
                o,
                dv,
            );
        });
        return;
    }
    // Task i: KV head i / n_parts, keys of part i % n_parts.
    let part_len = n_rep * (dv + 2);
    let parts = &mut b.parts[..sh.n_head_kv * n_parts * part_len];
    ctx.pool.for_each_chunk_mut(parts, part_len, |i, p| {
        let (g, part) = (i / n_parts, i % n_parts);
        let (o, ml) = p.split_at_mut(n_rep * dv);
        kernels.attention_rows_part(
            &q[g * n_rep * dk..(g + 1) * n_rep * dk],
            dk,
            last,
            window,
            f16_head(k, il, g, n_ctx, dk, k_dim),
            dk,
            f16_head(v, il, g, n_ctx, dv, v_dim),
            dv,
            sh.scale,
            sh.softcap,
            start + part * n_kv / n_parts,
            start + (part + 1) * n_kv / n_parts,
            o,
            dv,
            ml,
        );
    });
    for (g, o) in out.chunks_exact_mut(n_rep * dv).enumerate() {
        let gp = &parts[g * n_parts * part_len..(g + 1) * n_parts * part_len];
        kernels.attention_merge(gp, n_rep, dv, o);
    }
}

/// Query rows per task of [`attention_rows`].
const ATTN_TASK_ROWS: usize = 32;

/// Buffers of [`attention_rows`], all parts of the forward's scratch that are free while
/// attention runs.
pub(crate) struct AttnBufs<'a> {
    /// Queries regrouped by (sequence, KV head, token, head of the group): `n_tok * q_dim`.
    pub qg: &'a mut [f32],
    /// Outputs in the same order: `n_tok * n_head * head_dim_v`.
    pub og: &'a mut [f32],
    /// Per regrouped row: the last key it sees and its (sequence, KV head) group.
    pub last: &'a mut [u32],
    pub grp: &'a mut [u32],
    /// Partial results of [`attention_decode`]: `n_head * DECODE_MAX_PARTS * (head_dim_v + 2)`.
    pub parts: &'a mut [f32],
}

/// Causal attention like [`attention`], microllm's fast path for batches: the query rows that
/// share a sequence and a KV head go through `Kernels::attention_rows` together, so each key
/// and value is converted once per tile for up to 32 rows, and the softmax is vectorized.
/// Not llama.cpp-exact (see [`attention`]). With `ctx.invariant` (continuous batching) it
/// takes `Kernels::attention_rows_invariant`, whose rows do not depend on their company, so
/// the rows can be split between tasks finely enough to keep every thread busy.
pub(crate) fn attention_rows(
    ctx: Ctx<'_>,
    sh: AttnShape,
    q: &[f32],
    rows: &[Row],
    seqs: &[SeqBatch<'_>],
    il: usize,
    b: AttnBufs<'_>,
    out: &mut [f32],
) {
    let (dk, dv) = (sh.head_dim, sh.head_dim_v);
    let q_dim = sh.n_head * dk;
    let k_dim = sh.n_head_kv * dk;
    let v_dim = sh.n_head_kv * dv;
    let n_rep = sh.n_head / sh.n_head_kv;
    let n_tok = rows.len();
    let n = n_tok * sh.n_head;
    // Regroup: sequence by sequence (their rows are consecutive), KV head, token, head.
    regrouped(rows, sh.n_head_kv, |i, t, g| {
        let src = &q[t * q_dim + g * n_rep * dk..t * q_dim + (g + 1) * n_rep * dk];
        b.qg[i * n_rep * dk..(i + 1) * n_rep * dk].copy_from_slice(src);
        for r in 0..n_rep {
            b.last[i * n_rep + r] = rows[t].pos as u32;
            b.grp[i * n_rep + r] = (rows[t].seq * sh.n_head_kv + g) as u32;
        }
    });
    let (qg, last, grp) = (&*b.qg, &*b.last, &*b.grp);
    let kernels = ctx.kernels;
    // About eight tasks per thread when the rows are few (continuous batching's decode steps,
    // whose sequences' contexts, and so tasks, differ in length), whole GQA groups each.
    let task_rows = if ctx.invariant {
        (n / (8 * ctx.pool.n_threads()))
            .next_multiple_of(n_rep)
            .clamp(n_rep, ATTN_TASK_ROWS)
    } else {
        ATTN_TASK_ROWS
    };
    let invariant = ctx.invariant;
    ctx.pool
        .for_each_chunk_mut(&mut b.og[..n * dv], task_rows * dv, |ci, o| {
            let r0 = ci * task_rows;
            let r1 = r0 + o.len() / dv;
            let mut a = r0;
            while a < r1 {
                // Rows a..e share a (sequence, KV head).
                let gid = grp[a];
                let e = a + grp[a..r1].iter().take_while(|&&x| x == gid).count();
                let (seq, g) = (gid as usize / sh.n_head_kv, gid as usize % sh.n_head_kv);
                let state = &*seqs[seq].state;
                let n_ctx = state.n_ctx;
                let KvCache::F16 { k, v } = &state.kv else {
                    unreachable!("attention_any routes only f16 caches here")
                };
                let (k, v) = (k.reinterpret_cast::<f16>(), v.reinterpret_cast::<f16>());
                let f = if invariant {
                    Kernels::attention_rows_invariant
                } else {
                    Kernels::attention_rows
                };
                f(
                    kernels,
                    &qg[a * dk..e * dk],
                    dk,
                    &last[a..e],
                    sh.window.unwrap_or(0),
                    f16_head(k, il, g, n_ctx, dk, k_dim),
                    dk,
                    f16_head(v, il, g, n_ctx, dv, v_dim),
                    dv,
                    sh.scale,
                    sh.softcap,
                    &mut o[(a - r0) * dv..(e - r0) * dv],
                    dv,
                );
                a = e;
            }
        });
    // Back to (token, head) order.
    let og = &*b.og;
    regrouped(rows, sh.n_head_kv, |i, t, g| {
        let dst = t * sh.n_head * dv + g * n_rep * dv;
        out[dst..dst + n_rep * dv].copy_from_slice(&og[i * n_rep * dv..(i + 1) * n_rep * dv]);
    });
}

/// Visits the (token, KV head) pairs of `rows` in [`attention_rows`]' regrouped order —
/// sequence by sequence (their rows are consecutive), then KV head, then token — calling
/// `f(i, token, kv_head)` with `i` the pair's index in that order.
fn regrouped(rows: &[Row], n_head_kv: usize, mut f: impl FnMut(usize, usize, usize)) {
    let mut i = 0;
    let mut t0 = 0;
    while t0 < rows.len() {
        let seq = rows[t0].seq;
        let t1 = t0 + rows[t0..].iter().take_while(|r| r.seq == seq).count();
        for g in 0..n_head_kv {
            for t in t0..t1 {
                f(i, t, g);
                i += 1;
            }
        }
        t0 = t1;
    }
}

/// The keys and values a layer's attention is about to read from memory — every sequence's
/// cached positions before its new tokens (within the window), every KV head — requested
/// into L2 a slice at a time by the matmul before it (Q/K/V), so that their latency hides
/// under that matmul's weight stream (decode: attention read its cache from DRAM at a third
/// of the weights' rate) or its arithmetic (batches). f16 caches only.
pub(crate) struct KvPrefetch<'s, 'a> {
    seqs: &'s [SeqBatch<'a>],
    il: usize,
    window: usize,
    dims: [(usize, usize); 2],
    total: usize,
}

impl<'s, 'a> KvPrefetch<'s, 'a> {
    pub(crate) fn new(
        c: &Config,
        seqs: &'s [SeqBatch<'a>],
        il: usize,
        window: usize,
    ) -> Option<Self> {
        if !seqs
            .iter()
            .all(|s| matches!(s.state.kv, KvCache::F16 { .. }))
        {
            return None;
        }
        let mut p = KvPrefetch {
            seqs,
            il,
            window,
            dims: [(c.head_dim, c.k_dim()), (c.head_dim_v, c.v_dim())],
            total: 0,
        };
        let mut total = 0;
        p.each(|r| total += 2 * r.len());
        p.total = total;
        (total > 0).then_some(p)
    }

    /// Calls `f` on every range to fetch, in a fixed order.
    fn each(&self, mut f: impl FnMut(&[f16])) {
        for sb in self.seqs {
            let st = &*sb.state;
            let KvCache::F16 { k, v } = &st.kv else {
                continue;
            };
            let p0 = st.n_past;
            let from = if self.window > 0 {
                p0.saturating_sub(self.window)
            } else {
                0
            };
            for (cache, (d, dim)) in [(k, self.dims[0]), (v, self.dims[1])] {
                let cache = cache.reinterpret_cast::<f16>();
                for g in 0..dim / d {
                    let head = f16_head(cache, self.il, g, st.n_ctx, d, dim);
                    f(&head[from * d..p0 * d]);
                }
            }
        }
    }

    /// Prefetches part `a..b` of `n` equal parts of the bytes.
    pub(crate) fn part(&self, a: usize, b: usize, n: usize) {
        let (lo, hi) = (self.total * a / n, self.total * b / n);
        let mut at = 0;
        self.each(|r| {
            let len = 2 * r.len();
            let (s, e) = (lo.max(at), hi.min(at + len));
            if s < e {
                microllm_kernels::prefetch_l2(&r[(s - at) / 2..(e - at).div_ceil(2)]);
            }
            at += len;
        });
    }
}

/// Writes the keys and values of every row (`c.k_dim()` and `c.v_dim()` each) into its
/// sequence's cache for layer `il`.
///
/// The f16 cache is head-major: per layer, per KV head, `n_ctx` positions of one head's values
/// ([`f16_head`]), so attention reads each (sequence, head)'s keys as one contiguous block
/// (continuous batching reads every sequence's cache from memory at every step). The q8_0
/// cache keeps whole rows per position (`kv_q8`).
pub(crate) fn store_kv(
    kernels: &Kernels,
    c: &Config,
    seqs: &mut [SeqBatch<'_>],
    il: usize,
    k: &[f32],
    v: &[f32],
) {
    let (dk, dv, k_dim, v_dim) = (c.head_dim, c.head_dim_v, c.k_dim(), c.v_dim());
    let mut r0 = 0;
    for sb in seqs.iter_mut() {
        let n = sb.tokens.len();
        let st = &mut *sb.state;
        let (n_ctx, p0) = (st.n_ctx, st.n_past);
        let (ks, vs) = (
            &k[r0 * k_dim..(r0 + n) * k_dim],
            &v[r0 * v_dim..(r0 + n) * v_dim],
        );
        match &mut st.kv {
            KvCache::F16 { k: kc, v: vc } => {
                let kc = kc.reinterpret_cast_mut::<f16>();
                let vc = vc.reinterpret_cast_mut::<f16>();
                for (cache, rows, d, dim) in [(kc, ks, dk, k_dim), (vc, vs, dv, v_dim)] {
                    for g in 0..dim / d {
                        let head = crate::state::f16_head_start(il, g, n_ctx, d, dim);
                        for (t, row) in rows.chunks_exact(dim).enumerate() {
                            let at = head + (p0 + t) * d;
                            kernels.f32_to_f16(&row[g * d..(g + 1) * d], &mut cache[at..at + d]);
                        }
                    }
                }
            }
            KvCache::Q8_0 { k: kc, v: vc } => {
                let (kr, vr) = (kv_q8::row_bytes(k_dim), kv_q8::row_bytes(v_dim));
                let kc = &mut kc[il * n_ctx * kr..(il + 1) * n_ctx * kr];
                kv_q8::store_rows(kernels, ks, k_dim, &mut kc[p0 * kr..(p0 + n) * kr]);
                let vc = &mut vc[il * n_ctx * vr..(il + 1) * n_ctx * vr];
                kv_q8::store_rows(kernels, vs, v_dim, &mut vc[p0 * vr..(p0 + n) * vr]);
            }
        }
        r0 += n;
    }
}

/// KV head `g`'s `n_ctx` positions of `d` values each in layer `il` of a head-major f16 cache
/// (`dim` values per position over all heads; see [`store_kv`]).
pub(crate) fn f16_head(
    cache: &[f16],
    il: usize,
    g: usize,
    n_ctx: usize,
    d: usize,
    dim: usize,
) -> &[f16] {
    let at = crate::state::f16_head_start(il, g, n_ctx, d, dim);
    &cache[at..at + n_ctx * d]
}

/// Token embeddings of every row (dequantized rows of `token_embd`).
pub(crate) fn embed(
    kernels: &Kernels,
    file: &GgufFile,
    w: &QMatrix,
    seqs: &[SeqBatch<'_>],
    x: &mut [f32],
) -> Result<(), crate::ModelError> {
    let d = w.n_cols;
    let rb = w.row_bytes;
    let data = w.data(file);
    let toks = seqs.iter().flat_map(|s| s.tokens.iter());
    for (t, &tok) in toks.enumerate() {
        let row = &data[tok as usize * rb..(tok as usize + 1) * rb];
        kernels
            .dequantize_row(w.ty, row, &mut x[t * d..(t + 1) * d])
            .map_err(|e| crate::ModelError::Kernel(e.to_string()))?;
    }
    Ok(())
}
