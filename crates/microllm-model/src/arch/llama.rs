//! The Llama-family forward pass: `llama` (SmolLM2, TinyLlama, Llama 3.x), `qwen2` (q/k/v
//! bias, NeoX RoPE), `mistral` (sliding window) and `phi3` (fused QKV and gate/up tensors,
//! split at load; pre-scaled queries). The differences are config fields and
//! optional tensors, so one function reads top to bottom for all three.

use crate::ops::{self, tap, AttnShape, QuantizedInput};
use crate::state::Scratch;
use crate::{Model, ModelError, Observer, SeqBatch};

/// Evaluates the tokens of every sequence in `seqs` (at most `s.n_rows` in all, rows laid out
/// sequence after sequence as `s.rows` says), appending their keys/values to each sequence's
/// cache and writing the requested logits.
pub(crate) fn forward(
    model: &Model,
    s: &mut Scratch,
    seqs: &mut [SeqBatch<'_>],
    n_tok: usize,
    obs: &mut dyn Observer,
    batch: bool,
) -> Result<(), ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let ctx = model.ctx(batch);
    let (d, dq, dk, dv, dff) = (c.n_embd, c.q_dim(), c.k_dim(), c.v_dim(), c.n_ff);
    let dattn = c.n_head * c.head_dim_v;
    let rows = &s.rows[..n_tok];
    let x = &mut s.x[..n_tok * d];
    let xn = &mut s.xn[..n_tok * d];
    let scratch = &mut s.scratch[..];
    let mut input = QuantizedInput::new(&mut s.act_q);

    ops::embed(&model.kernels, ctx.file, &w.token_embd, seqs, x)?;
    let h = c.rope.n_rot / 2;
    let (cos, sin) = (&mut s.rope_cos[..n_tok * h], &mut s.rope_sin[..n_tok * h]);
    ops::rope_tables(&model.rope, rows, cos, sin);

    for (il, lw) in w.layers.iter().enumerate() {
        obs.hidden(il, x, n_tok);
        // Attention block.
        ops::rms_norm_rows(ctx, x, &lw.attn_norm, c.rms_eps, xn);
        tap("attn_norm", il, xn);
        input.invalidate();
        let (q, k, v) = (
            &mut s.q[..n_tok * dq],
            &mut s.k[..n_tok * dk],
            &mut s.v[..n_tok * dv],
        );
        obs.matmul_input(&lw.wq, xn, n_tok);
        obs.matmul_input(&lw.wk, xn, n_tok);
        obs.matmul_input(&lw.wv, xn, n_tok);
        ops::matmul_group(
            ctx,
            [&lw.wq, &lw.wk, &lw.wv],
            xn,
            n_tok,
            &mut input,
            scratch,
            [q, k, v],
            ops::KvPrefetch::new(
                c,
                seqs,
                il,
                c.sliding_window.filter(|_| c.swa_layers[il]).unwrap_or(0),
            )
            .as_ref(),
        );
        if let Some(b) = &lw.bq {
            ops::add_bias(q, b);
        }
        if let Some(b) = &lw.bk {
            ops::add_bias(k, b);
        }
        if let Some(b) = &lw.bv {
            ops::add_bias(v, b);
        }
        tap("Qcur", il, q);
        tap("Kcur", il, k);
        tap("Vcur", il, v);
        ops::rope_rows(ctx, q, n_tok, c.n_head, c.head_dim, c.rope.style, cos, sin);
        ops::rope_rows(
            ctx,
            k,
            n_tok,
            c.n_head_kv,
            c.head_dim,
            c.rope.style,
            cos,
            sin,
        );
        if let Some(qs) = c.q_scale {
            ops::scale_in_place(q, qs);
        }
        tap("Qrope", il, q);
        tap("Krope", il, k);
        ops::store_kv(&model.kernels, c, seqs, il, k, v);
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            head_dim_v: c.head_dim_v,
            scale: c.kq_scale,
            window: c.sliding_window.filter(|_| c.swa_layers[il]),
            softcap: 0.0,
        };
        let attn = &mut s.attn[..n_tok * dattn];
        let bufs = ops::AttnBufs {
            qg: &mut scratch[..n_tok * dq],
            og: &mut s.attn_tmp[..],
            last: &mut s.attn_last[..],
            grp: &mut s.attn_grp[..],
            parts: &mut s.attn_parts[..],
        };
        ops::attention_any(ctx, shape, q, rows, seqs, il, bufs, attn);
        tap("kqv_out", il, attn);
        input.invalidate();
        obs.matmul_input(&lw.wo, attn, n_tok);
        ops::matmul(ctx, &lw.wo, attn, n_tok, &mut input, scratch, xn, None);
        ops::add_in_place(x, xn);

        // Feed-forward block (SwiGLU).
        ops::rms_norm_rows(ctx, x, &lw.ffn_norm, c.rms_eps, xn);
        input.invalidate();
        let (gate, up) = (&mut s.gate[..n_tok * dff], &mut s.up[..n_tok * dff]);
        obs.matmul_input(&lw.w_gate, xn, n_tok);
        obs.matmul_input(&lw.w_up, xn, n_tok);
        ops::matmul_group(
            ctx,
            [&lw.w_gate, &lw.w_up],
            xn,
            n_tok,
            &mut input,
            scratch,
            [gate, up],
            None,
        );
        ops::glu_rows(ctx, gate, up, n_tok, false);
        input.invalidate();
        obs.matmul_input(&lw.w_down, gate, n_tok);
        ops::matmul(ctx, &lw.w_down, gate, n_tok, &mut input, scratch, xn, None);
        tap("ffn_out", il, xn);
        ops::add_in_place(x, xn);
        tap("l_out", il, x);
    }

    crate::output_logits(
        model,
        ctx,
        x,
        &mut s.out_rows,
        &mut input,
        scratch,
        seqs,
        obs,
    )
}
