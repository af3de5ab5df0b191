//! microllm-testkit: tiny, deterministic, random GGUF models for tests (a dev-dependency).
//!
//! Main design decision: **a tiny model is a real GGUF file, written by the same
//! `microllm-gguf` writer and laid out exactly like a llama.cpp conversion** (same metadata
//! keys and types, same tensor names and ggml dim order, gpt2 BPE tokenizer with ChatML
//! specials), so every test that uses one exercises the real loading path end to end,
//! and llama.cpp itself accepts the file. The weights come from a tiny PRNG seeded per tensor
//! name, use only `+`/`*` (bit-identical on every platform), and are scaled so activations
//! stay O(1) through a few layers; [`tiny_tensors`] exposes the exact f32 values so a test can
//! compute a reference forward pass without parsing anything.
//!
//! No `rand` dependency: reproducibility across crate versions matters more than quality.

#![forbid(unsafe_code)]

mod model;
mod rng;
mod vocab;

pub use model::{
    tiny_metadata, tiny_model_bytes, tiny_model_bytes_with, tiny_tensors, write_tiny_model,
    EncodeFn, TinyArch, TinySpec, TinyTensor,
};
pub use rng::SplitMix64;
pub use vocab::{
    gpt2_byte_order, gpt2_byte_to_unicode, tiny_gpt2_vocab, CHATML_TEMPLATE, ENDOFTEXT_ID,
    FIRST_BYTE_ID, IM_END_ID, IM_START_ID, SPECIAL_TOKENS, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL,
};
