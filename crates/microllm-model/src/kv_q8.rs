//! Attention over a Q8_0 KV cache (`--kv-type q8_0`), following llama.cpp's CPU flash
//! attention for a quantized cache (ggml-cpu `ggml_compute_forward_flash_attn_ext_f16_one_chunk`):
//! the query is quantized to Q8_0 once per head and dotted with each key by the q8_0·q8_0
//! kernel; each value row is dequantized to f32 and accumulated in f32 under an online
//! softmax updated key by key; the sum is divided out at the end.
//!
//! Everything lives on the stack: the decode loop stays allocation-free.

use microllm_gguf::GgmlType;
use microllm_kernels::reference::softcap_score;
use microllm_kernels::Kernels;

use crate::ops::MAX_HEAD_DIM;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes per Q8_0 block (an f16 scale and 32 signed bytes).
const BLOCK_BYTES: usize = 34;

/// Bytes of `n` values (a multiple of 32) in Q8_0.
pub(crate) const fn row_bytes(n: usize) -> usize {
    n / QK * BLOCK_BYTES
}

/// Quantizes rows of `dim` values (`src`, whole rows) into consecutive Q8_0 rows of `dst`,
/// rounding as ggml-cpu does when it writes a Q8_0 cache.
pub(crate) fn store_rows(kernels: &Kernels, src: &[f32], dim: usize, dst: &mut [u8]) {
    let rb = row_bytes(dim);
    for (x, out) in src.chunks_exact(dim).zip(dst.chunks_exact_mut(rb)) {
        kernels
            .quantize_activation(GgmlType::Q8_0, x, out)
            .expect("KV row length checked when the state was built");
    }
}

/// Attention of one query head `q` (f32, `head_dim` values) over `n_kv` cached rows: key `j`
/// is `keys[j * k_stride..][..row_bytes(q.len())]`, value `j` is
/// `values[j * v_stride..][..row_bytes(out.len())]` (strides in bytes). `out` gets the
/// `out.len()`-wide result. With `softcap > 0` a score is `softcap * tanh(dot * scale / softcap)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    kernels: &Kernels,
    q: &[f32],
    keys: &[u8],
    k_stride: usize,
    values: &[u8],
    v_stride: usize,
    n_kv: usize,
    scale: f32,
    softcap: f32,
    out: &mut [f32],
) {
    let (dk, dv) = (q.len(), out.len());
    let (kb, vb) = (row_bytes(dk), row_bytes(dv));
    let mut qbuf = [0u8; row_bytes(MAX_HEAD_DIM)];
    let q8 = &mut qbuf[..kb];
    kernels
        .quantize_activation(GgmlType::Q8_0, q, q8)
        .expect("head size checked when the state was built");
    let mut vbuf = [0f32; MAX_HEAD_DIM];
    let v32 = &mut vbuf[..dv];
    out.fill(0.0);
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    for j in 0..n_kv {
        let key = &keys[j * k_stride..j * k_stride + kb];
        let s = softcap_score(kernels.vec_dot(GgmlType::Q8_0, dk, key, q8), scale, softcap);
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > m {
            ms = (m - s).exp();
            m = s;
            if ms != 1.0 {
                for o in out.iter_mut() {
                    *o *= ms;
                }
            }
        } else {
            vs = (s - m).exp();
        }
        kernels
            .dequantize_row(
                GgmlType::Q8_0,
                &values[j * v_stride..j * v_stride + vb],
                v32,
            )
            .expect("head size checked when the state was built");
        kernels.axpy_f32(out, vs, v32);
        l = l.mul_add(ms, vs);
    }
    let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact softmax attention in f64 over f32 keys/values.
    fn exact(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f64> = keys
            .iter()
            .map(|k| k.iter().zip(q).map(|(a, b)| (a * b) as f64).sum::<f64>() * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut out = vec![0f64; values[0].len()];
        for (wi, v) in w.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += wi / z * *x as f64;
            }
        }
        out.into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn close_to_exact_attention() {
        let kernels = Kernels::detect();
        let (d, n) = (64, 37);
        let mut seed = 7u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 2000) as f32 / 1000.0 - 1.0
        };
        let q: Vec<f32> = (0..d).map(|_| rnd()).collect();
        let keys: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| rnd()).collect()).collect();
        let values: Vec<Vec<f32>> = (0..n).map(|_| (0..d).map(|_| rnd()).collect()).collect();
        let rb = row_bytes(d);
        let mut kq = vec![0u8; n * rb];
        let mut vq = vec![0u8; n * rb];
        store_rows(&kernels, &keys.concat(), d, &mut kq);
        store_rows(&kernels, &values.concat(), d, &mut vq);
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; d];
        attention(&kernels, &q, &kq, rb, &vq, rb, n, scale, 0.0, &mut out);
        let want = exact(&q, &keys, &values, scale);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 0.02, "out[{i}] = {a}, exact {b}");
        }
        // One key: the output is that value, as quantized.
        attention(&kernels, &q, &kq, rb, &vq, rb, 1, scale, 0.0, &mut out);
        for (a, b) in out.iter().zip(&values[0]) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
    }
}
