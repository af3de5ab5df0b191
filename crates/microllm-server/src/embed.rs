//! `/v1/embeddings`: how a text's token ids become one unit vector.
//!
//! The method is a trait so the engine thread can own it and swap it without touching the
//! routes. The build ships [`HiddenStateMean`], what llama.cpp's `--pooling mean` gives: the
//! input is run through the model, every token's final hidden state (the last block's output
//! after the output norm, what the output projection would turn into logits) is averaged, and
//! the mean is scaled to unit L2 length. The model is causal, so token `i`'s state has seen
//! tokens `0..=i`; the mean weighs the whole text, word order included.

use microllm_engine::{EngineError, LoadedModel, Logits, State, StateOptions};
use microllm_model::Observer;

/// Turns token ids into one embedding vector. Runs on the engine thread, between steps.
pub trait Embedder: Send {
    /// One line for the logs and docs: how the vector is made.
    fn describe(&self) -> &'static str;
    /// The vector for `ids` (non-empty, all inside the vocabulary), L2-normalised.
    fn embed(&mut self, lm: &LoadedModel, ids: &[u32]) -> Result<Vec<f32>, String>;
}

/// Mean of the final-norm hidden states of `ids`, L2-normalised, computed in its own
/// sequence state (allocated once: one context of KV cache and a forward of `n_batch` rows).
pub struct HiddenStateMean {
    state: State,
    sum: Vec<f64>,
}

impl std::fmt::Debug for HiddenStateMean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HiddenStateMean")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl HiddenStateMean {
    /// Room for inputs of up to `n_ctx` tokens, evaluated `n_batch` tokens per forward call.
    pub fn new(lm: &LoadedModel, n_ctx: usize, n_batch: usize) -> Result<Self, EngineError> {
        let state = lm.model.new_state(StateOptions {
            n_ctx,
            n_batch,
            ..StateOptions::default()
        })?;
        Ok(HiddenStateMean {
            state,
            sum: vec![0.0; lm.model.config.n_embd],
        })
    }
}

/// Sums every row of the final hidden states, across all the forward's batches.
struct MeanPool<'a> {
    sum: &'a mut [f64],
    n: usize,
}

impl Observer for MeanPool<'_> {
    fn wants_final_hidden(&self) -> bool {
        true
    }
    fn final_hidden(&mut self, x: &[f32], n_tok: usize) {
        for row in x.chunks_exact(self.sum.len()).take(n_tok) {
            for (s, &v) in self.sum.iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        self.n += n_tok;
    }
}

impl Embedder for HiddenStateMean {
    fn describe(&self) -> &'static str {
        "mean of the final hidden states (after the output norm) over the input's tokens, L2-normalised (llama.cpp --pooling mean)"
    }

    fn embed(&mut self, lm: &LoadedModel, ids: &[u32]) -> Result<Vec<f32>, String> {
        if ids.len() > self.state.n_ctx() {
            return Err(format!(
                "the input has {} tokens but embeddings are computed over at most {}",
                ids.len(),
                self.state.n_ctx()
            ));
        }
        self.state.reset();
        self.sum.fill(0.0);
        let mut pool = MeanPool {
            sum: &mut self.sum,
            n: 0,
        };
        lm.model
            .forward_observed(&mut self.state, ids, Logits::None, &mut pool)
            .map_err(|e| format!("computing the embedding: {e}"))?;
        let n = pool.n;
        self.state.reset();
        if n != ids.len() {
            return Err(format!(
                "the forward pass reported {n} hidden states for {} tokens",
                ids.len()
            ));
        }
        Ok(normalise(&self.sum, n))
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
    use microllm_engine::ModelOptions;
    use microllm_testkit::TinySpec;

    fn tiny() -> (tempfile::TempDir, LoadedModel) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        microllm_testkit::write_tiny_model(&TinySpec::llama(), &path).unwrap();
        let opts = ModelOptions {
            n_threads: 1,
            ..ModelOptions::default()
        };
        let lm = LoadedModel::load(&path, opts).unwrap();
        (dir, lm)
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    #[test]
    fn hidden_state_mean_is_the_mean_of_every_final_norm_row() {
        let (_dir, lm) = tiny();
        let ids: Vec<u32> = (0..40).map(|i| (i * 13 + 5) % 200).collect();
        // One forward of 64 rows vs ten of 4: the pooled vector accumulates across batches.
        let mut whole = HiddenStateMean::new(&lm, 64, 64).unwrap();
        let mut pieces = HiddenStateMean::new(&lm, 64, 4).unwrap();
        let a = whole.embed(&lm, &ids).unwrap();
        let b = pieces.embed(&lm, &ids).unwrap();
        assert_eq!(a.len(), lm.model.config.n_embd);
        assert!((dot(&a, &a) - 1.0).abs() < 1e-5);
        assert!(dot(&a, &b) > 0.99999, "{}", dot(&a, &b));
        // The same input again (the state is reused): the same vector.
        assert_eq!(whole.embed(&lm, &ids).unwrap(), a);
        // Word order matters (it did not for a bag of input embeddings).
        let mut rev = ids.clone();
        rev.reverse();
        let r = whole.embed(&lm, &rev).unwrap();
        assert!(dot(&a, &r) < 0.99999, "{}", dot(&a, &r));
        // The mean of the last rows alone is not it: every row counts.
        let tail = whole.embed(&lm, &ids[36..]).unwrap();
        assert!(dot(&a, &tail) < 0.999, "{}", dot(&a, &tail));
        // Too long for the state: an error, not a panic.
        let long: Vec<u32> = (0..65).collect();
        assert!(whole.embed(&lm, &long).is_err());
    }

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
