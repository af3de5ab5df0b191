//! `/v1/embeddings`: how a text's token ids become one unit vector.
//!
//! The method is a trait so the engine thread can own it and swap it without touching the
//! routes. The build ships [`TokenEmbeddingMean`]: the mean of the model's input token
//! embeddings (`token_embd.weight` rows), L2-normalised. It is the layer-0 hidden state,
//! mean-pooled: a bag-of-tokens vector that ignores word order, because `microllm-model` does
//! not yet expose the final-norm hidden states of a forward pass. When it does, an
//! `Embedder` that mean-pools those (the method the issue asks for) replaces it here.

use microllm_engine::LoadedModel;

/// Turns token ids into one embedding vector. Runs on the engine thread, between steps.
pub trait Embedder: Send {
    /// One line for the logs and docs: how the vector is made.
    fn describe(&self) -> &'static str;
    /// The vector for `ids` (non-empty, all inside the vocabulary), L2-normalised.
    fn embed(&mut self, lm: &LoadedModel, ids: &[u32]) -> Result<Vec<f32>, String>;
}

/// Mean of the input token embeddings of `ids`, L2-normalised.
#[derive(Debug, Default)]
pub struct TokenEmbeddingMean {
    row: Vec<f32>,
}

impl Embedder for TokenEmbeddingMean {
    fn describe(&self) -> &'static str {
        "mean of the input token embeddings (token_embd.weight rows), L2-normalised"
    }

    fn embed(&mut self, lm: &LoadedModel, ids: &[u32]) -> Result<Vec<f32>, String> {
        let m = &lm.model;
        let e = &m.weights.token_embd;
        let d = e.n_cols;
        let data = e.data(m.gguf());
        self.row.resize(d, 0.0);
        let mut sum = vec![0.0f64; d];
        for &id in ids {
            let i = id as usize;
            if i >= e.n_rows {
                return Err(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    e.n_rows
                ));
            }
            let bytes = &data[i * e.row_bytes..(i + 1) * e.row_bytes];
            m.kernels()
                .dequantize_row(e.ty, bytes, &mut self.row)
                .map_err(|err| format!("reading the embedding of token {id}: {err}"))?;
            for (s, &x) in sum.iter_mut().zip(&self.row) {
                *s += x as f64;
            }
        }
        Ok(normalise(&sum, ids.len()))
    }
}

/// `sum / n`, scaled to unit length (a zero vector stays zero).
pub(crate) fn normalise(sum: &[f64], n: usize) -> Vec<f32> {
    let n = n.max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return mean.iter().map(|&x| x as f32).collect();
    }
    mean.iter().map(|&x| (x / norm) as f32).collect()
}

/// Little-endian f32 bytes in base64 (OpenAI's `encoding_format: "base64"`, which the official
/// Python client asks for by default).
pub(crate) fn base64_f32(v: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_encodings() {
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[]), "");
        // 1.0, -2.0: 00 00 80 3f 00 00 00 c0
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        // Three floats = 12 bytes, no padding.
        assert_eq!(base64_f32(&[0.0, 0.0, 0.0]), "AAAAAAAAAAAAAAAA");
    }

    #[test]
    fn normalise_gives_unit_length() {
        let v = normalise(&[3.0, 4.0], 2);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalise(&[0.0, 0.0], 1), vec![0.0, 0.0]);
    }
}
