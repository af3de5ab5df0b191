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
//!
//! Every architecture microllm runs has a spec here ([`TinySpec::llama`], `qwen2`, `mistral`,
//! `gemma2`, `gemma3`, `phi3`), mirroring the tensor names, shapes and metadata keys of
//! llama.cpp's loader for it; tests/fixtures/tiny/ holds llama.cpp's logits on each
//! (tools/fixtures/gen_tiny.sh), pinned to the file bytes by SHA-256.

#![forbid(unsafe_code)]

mod model;
mod rng;
mod vocab;

pub use model::{
    tiny_metadata, tiny_model_bytes, tiny_model_bytes_with, tiny_tensors, write_tiny_model,
    EncodeFn, LongRope, TinyArch, TinySpec, TinyTensor, TinyVocab,
};
pub use rng::SplitMix64;
pub use vocab::{
    gpt2_byte_order, gpt2_byte_to_unicode, phi3_added_token_id, tiny_gpt2_vocab, tiny_phi3_vocab,
    tiny_spm_vocab, CHATML_TEMPLATE, ENDOFTEXT_ID, FIRST_BYTE_ID, IM_END_ID, IM_START_ID,
    PHI3_ADDED_TOKENS, PHI3_BOS_ID, PHI3_EOS_ID, PHI3_FIRST_BYTE_ID, PHI3_TEMPLATE, PHI3_UNK_ID,
    SPECIAL_TOKENS, SPM_BOS_ID, SPM_EOS_ID, SPM_FIRST_BYTE_ID, SPM_PAD_ID, SPM_SPACE,
    SPM_SPECIAL_TOKENS, SPM_UNK_ID, TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
};

/// SHA-256 of `bytes` as 64 lowercase hex digits: how a differential fixture pins the exact
/// GGUF bytes llama.cpp was run on.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
