//! microllm-compress: make a model smaller and measure what it cost.
//!
//! * [`recipe`]: which ggml type each tensor gets for a target file type (F16 … Q4_K_M),
//!   following llama.cpp's `llama-quantize` recipes (`llama_tensor_get_type`), with
//!   `--tensor-type PATTERN=TYPE` overrides and the shape fallbacks for rows that are not a
//!   multiple of 256.
//! * [`convert`]: the multithreaded writer that quantizes / dequantizes every tensor by a plan
//!   (optionally weighted by an importance matrix) and keeps all metadata.
//! * [`imatrix`]: collects an importance matrix (mean of x² per input column of every matmul)
//!   on calibration text, stored in llama.cpp's GGUF imatrix format.
//! * [`prune`]: depth pruning (angular distance between the residual stream entering and
//!   leaving each block; drop blocks, renumber, fix `block_count`).
//! * [`eval`]: llama-perplexity's windowed evaluation, shared by perplexity and KL divergence.
//! * [`report`]: the comparison table (Markdown, JSON) and a hand-written SVG chart.
//!
//! Main design decision: **every transformation is a pure function from an opened
//! [`GgufFile`](microllm_gguf::GgufFile) to a [`GgufWriter`](microllm_gguf::GgufWriter)**,
//! planned completely (and every refusal made) before any byte is computed, and written with
//! the writer's atomic temp-file + rename, so a crash never leaves a complete-looking file at
//! the output path. The llama.cpp recipes are reproduced decision for decision (same tensor
//! order for the per-layer counters, same fallbacks, same `general.file_type`), because the
//! point of a quantizer here is that its files are interchangeable with llama-quantize's.

#![forbid(unsafe_code)]

pub mod convert;
mod error;
pub mod eval;
pub mod imatrix;
pub mod prune;
pub mod recipe;
pub mod report;

pub use error::CompressError;

/// Progress reporting for long operations (the CLI draws bars with it). `Sync`, because the
/// quantizer reports from several threads.
pub trait Progress: Sync {
    /// A new phase of `total` units (tensor elements, tokens, windows) called `what`.
    fn start(&self, _what: &str, _total: u64) {}
    /// `n` more units done.
    fn inc(&self, _n: u64) {}
    /// The phase is over.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Refuses to write `output` over `input` (the same path, or another name for the same file):
/// the output is written while the input is still mapped and read.
pub fn check_distinct_paths(
    input: &std::path::Path,
    output: &std::path::Path,
) -> Result<(), CompressError> {
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        // The output does not exist yet (or its folder is missing): it cannot be the input,
        // unless the paths are literally equal.
        _ => input == output,
    };
    if same {
        return Err(CompressError::SameFile {
            path: output.display().to_string(),
        });
    }
    Ok(())
}
