//! The Llama-family forward pass: `llama` (SmolLM2, TinyLlama, Llama 3.x), `qwen2` (q/k/v
//! bias, NeoX RoPE) and `mistral` (sliding window). The differences are config fields and
//! optional tensors, so one function reads top to bottom for all three.

use crate::ops::{self, tap, AttnShape, QuantizedInput};
use crate::state::{act_type, State};
use crate::{Logits, Model, ModelError};

/// Evaluates `tokens` (at most `state.n_batch`) at positions `state.n_past..`, appending
/// their keys/values to the cache and writing the requested logits.
pub(crate) fn forward(
    model: &Model,
    state: &mut State,
    tokens: &[u32],
    logits: &mut Logits<'_>,
) -> Result<(), ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let ctx = model.ctx();
    let n_tok = tokens.len();
    let pos0 = state.n_past;
    let (d, dq, dk, dv, dff) = (c.n_embd, c.q_dim(), c.k_dim(), c.v_dim(), c.n_ff);
    let dattn = c.n_head * c.head_dim_v;

    let State {
        n_ctx,
        x,
        xn,
        q,
        k,
        v,
        attn,
        gate,
        up,
        act_q,
        scratch,
        rope_cos,
        rope_sin,
        k_cache,
        v_cache,
        logits: last_logits,
        ..
    } = state;
    let n_ctx = *n_ctx;
    let x = &mut x[..n_tok * d];
    let xn = &mut xn[..n_tok * d];
    let mut input = QuantizedInput::new(act_q);

    // Token embeddings.
    for (t, &tok) in tokens.iter().enumerate() {
        let rb = w.token_embd.row_bytes;
        let row = &w.token_embd.data(ctx.file)[tok as usize * rb..(tok as usize + 1) * rb];
        model
            .kernels
            .dequantize_row(w.token_embd.ty, row, &mut x[t * d..(t + 1) * d])
            .map_err(|e| ModelError::Kernel(e.to_string()))?;
    }
    let half_rot = c.rope.n_rot / 2;
    let (cos, sin) = (
        &mut rope_cos[..n_tok * half_rot],
        &mut rope_sin[..n_tok * half_rot],
    );
    ops::rope_tables(&model.rope, pos0, n_tok, cos, sin);
    let shape = AttnShape {
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        head_dim_v: c.head_dim_v,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        window: c.sliding_window,
    };

    for (il, lw) in w.layers.iter().enumerate() {
        // Attention block.
        ops::rms_norm(x, &lw.attn_norm, c.rms_eps, xn);
        tap("attn_norm", il, xn);
        input.invalidate();
        let (q, k, v) = (
            &mut q[..n_tok * dq],
            &mut k[..n_tok * dk],
            &mut v[..n_tok * dv],
        );
        ops::matmul(
            ctx,
            &lw.wq,
            act_type(model, lw.wq.ty)?,
            xn,
            n_tok,
            &mut input,
            scratch,
            q,
        );
        ops::matmul(
            ctx,
            &lw.wk,
            act_type(model, lw.wk.ty)?,
            xn,
            n_tok,
            &mut input,
            scratch,
            k,
        );
        ops::matmul(
            ctx,
            &lw.wv,
            act_type(model, lw.wv.ty)?,
            xn,
            n_tok,
            &mut input,
            scratch,
            v,
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
        ops::rope(q, n_tok, c.n_head, c.head_dim, c.rope.style, cos, sin);
        ops::rope(k, n_tok, c.n_head_kv, c.head_dim, c.rope.style, cos, sin);
        let layer_k = &mut k_cache[il * n_ctx * dk..(il + 1) * n_ctx * dk];
        let layer_v = &mut v_cache[il * n_ctx * dv..(il + 1) * n_ctx * dv];
        model
            .kernels
            .f32_to_f16(k, &mut layer_k[pos0 * dk..(pos0 + n_tok) * dk]);
        model
            .kernels
            .f32_to_f16(v, &mut layer_v[pos0 * dv..(pos0 + n_tok) * dv]);
        let attn = &mut attn[..n_tok * dattn];
        tap("Qrope", il, q);
        tap("Krope", il, k);
        ops::attention(ctx, shape, q, layer_k, layer_v, pos0, n_tok, attn);
        tap("kqv_out", il, attn);
        input.invalidate();
        ops::matmul(
            ctx,
            &lw.wo,
            act_type(model, lw.wo.ty)?,
            attn,
            n_tok,
            &mut input,
            scratch,
            xn,
        );
        ops::add_in_place(x, xn);

        // Feed-forward block (SwiGLU).
        ops::rms_norm(x, &lw.ffn_norm, c.rms_eps, xn);
        input.invalidate();
        let (gate, up) = (&mut gate[..n_tok * dff], &mut up[..n_tok * dff]);
        ops::matmul(
            ctx,
            &lw.w_gate,
            act_type(model, lw.w_gate.ty)?,
            xn,
            n_tok,
            &mut input,
            scratch,
            gate,
        );
        ops::matmul(
            ctx,
            &lw.w_up,
            act_type(model, lw.w_up.ty)?,
            xn,
            n_tok,
            &mut input,
            scratch,
            up,
        );
        model.kernels.swiglu(gate, up);
        input.invalidate();
        ops::matmul(
            ctx,
            &lw.w_down,
            act_type(model, lw.w_down.ty)?,
            gate,
            n_tok,
            &mut input,
            scratch,
            xn,
        );
        tap("ffn_out", il, xn);
        ops::add_in_place(x, xn);
        tap("l_out", il, x);
    }

    // Output head.
    crate::output_logits(
        model,
        x,
        xn,
        n_tok,
        &mut input,
        scratch,
        last_logits,
        logits,
    )
}
