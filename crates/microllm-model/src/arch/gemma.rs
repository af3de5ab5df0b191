//! The Gemma forward pass: `gemma3` (Gemma 3: Q/K RMS norms, local sliding-window layers with
//! their own RoPE base interleaved with global layers) and `gemma2` (attention and final-logit
//! soft-capping). Shared with Llama: RMSNorm, NeoX RoPE, GQA attention; different: embeddings
//! scaled by sqrt(n_embd), queries pre-scaled, norms after attention and FFN as well as before,
//! GeGLU. The RMSNorm weights are used as stored (the GGUF already holds 1 + w).

use crate::config::FfnAct;
use crate::ops::{self, tap, AttnShape, QuantizedInput};
use crate::state::Scratch;
use crate::{Model, ModelError, Observer, SeqBatch};

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
    let n_rows = s.n_rows;
    let rows = &s.rows[..n_tok];
    let x = &mut s.x[..n_tok * d];
    let xn = &mut s.xn[..n_tok * d];
    let scratch = &mut s.scratch[..];
    let mut input = QuantizedInput::new(&mut s.act_q);

    // Token embeddings, scaled.
    ops::embed(&model.kernels, ctx.file, &w.token_embd, seqs, x)?;
    if let Some(e) = c.embed_scale {
        ops::scale_in_place(x, e);
    }

    // RoPE tables: global layers, and sliding-window layers when their base differs.
    let h = c.rope.n_rot / 2;
    let (cos_g, cos_l) = s.rope_cos.split_at_mut(n_rows * h);
    let (sin_g, sin_l) = s.rope_sin.split_at_mut(n_rows * h);
    let (cos_g, sin_g) = (&mut cos_g[..n_tok * h], &mut sin_g[..n_tok * h]);
    ops::rope_tables(&model.rope, rows, cos_g, sin_g);
    let (cos_l, sin_l) = (&mut cos_l[..n_tok * h], &mut sin_l[..n_tok * h]);
    if let Some(r) = &model.rope_swa {
        ops::rope_tables(r, rows, cos_l, sin_l);
    }

    for (il, lw) in w.layers.iter().enumerate() {
        obs.hidden(il, x, n_tok);
        let swa = c.swa_layers[il];
        let (cos, sin): (&[f32], &[f32]) = if swa && model.rope_swa.is_some() {
            (cos_l, sin_l)
        } else {
            (cos_g, sin_g)
        };

        // Attention block: norm, Q/K/V, Q/K norms, RoPE, pre-scaled Q, attention, output
        // projection, post-norm, residual.
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
            ops::KvPrefetch::new(c, seqs, il, c.sliding_window.filter(|_| swa).unwrap_or(0))
                .as_ref(),
        );
        if let Some(qn) = &lw.q_norm {
            ops::rms_norm_in_place(q, qn, c.rms_eps);
        }
        if let Some(kn) = &lw.k_norm {
            ops::rms_norm_in_place(k, kn, c.rms_eps);
        }
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
        if let Some(s) = c.q_scale {
            ops::scale_in_place(q, s);
        }
        tap("Qcur", il, q);
        tap("Kcur", il, k);
        tap("Vcur", il, v);
        ops::store_kv(&model.kernels, c, seqs, il, k, v);
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            head_dim_v: c.head_dim_v,
            scale: c.kq_scale,
            window: c.sliding_window.filter(|_| swa),
            softcap: c.attn_softcap.unwrap_or(0.0),
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
        if let Some(pn) = &lw.attn_post_norm {
            ops::rms_norm_in_place(xn, pn, c.rms_eps);
        }
        ops::add_in_place(x, xn);

        // Feed-forward block (GeGLU), post-norm, residual.
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
        match c.ffn_act {
            FfnAct::GeluTanh => ops::glu_rows(ctx, gate, up, n_tok, true),
            FfnAct::Silu => ops::glu_rows(ctx, gate, up, n_tok, false),
        }
        input.invalidate();
        obs.matmul_input(&lw.w_down, gate, n_tok);
        ops::matmul(ctx, &lw.w_down, gate, n_tok, &mut input, scratch, xn, None);
        tap("ffn_out", il, xn);
        if let Some(pn) = &lw.ffn_post_norm {
            ops::rms_norm_in_place(xn, pn, c.rms_eps);
        }
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
