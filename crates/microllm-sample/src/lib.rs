//! microllm-sample: turns a logits vector into the next token id.
//!
//! Main design decision: the [`Sampler`] owns everything a draw needs (its seeded RNG and
//! candidate buffers sized for the whole vocabulary at construction), so [`Sampler::sample`]
//! never touches the heap and a run is a pure function of (config, seed, logits, history).
//! That keeps the decode loop allocation-free (STYLE habit 6) and makes generations
//! reproducible (habit 7). The RNG is a hand-written xoshiro256** seeded through splitmix64,
//! so the random stream is the same on every platform and every version of this crate,
//! independent of a third-party crate's choices.
//!
//! The chain follows llama.cpp's default order:
//! penalties -> top-k -> top-p -> min-p -> temperature -> softmax -> draw.
//! A temperature `<= 0` means greedy: the argmax after penalties.
#![forbid(unsafe_code)]

mod config;
mod logprobs;
mod rng;
mod sampler;

pub use config::{SampleError, SamplerConfig};
pub use logprobs::log_softmax_top;
pub use rng::Xoshiro256;
pub use sampler::{argmax, Sampler};
