//! microllm-tokenizer: the tokenizer stored in a GGUF file, producing exactly llama.cpp's ids.
//!
//! Main design decision: **llama.cpp is the specification, not HF's `tokenizer.json`.** The
//! metadata in a GGUF file is what llama.cpp reads, and the reference outputs we must match are
//! llama.cpp's, so every rule that decides an id follows llama.cpp: special tokens are split out
//! first with its longest-first partition (user-defined tokens always, control tokens only when
//! parsing specials), BOS/EOS/space-prefix defaults per algorithm, and the pre-tokenizer regexes
//! per `tokenizer.ggml.pre`. Within that frame the work is done by
//! - HF `tokenizers` for byte-level BPE ("gpt2"): its `BPE` model and `Split`/`ByteLevel`
//!   pre-tokenizers are the same algorithm, so we reuse them rather than re-implement;
//! - a hand-written merge-by-score loop for SentencePiece-style vocabularies ("llama"): HF's
//!   Unigram is a different algorithm and its BPE needs merges these files do not have.
//!
//! Decoding works on bytes ([`Tokenizer::token_bytes`]), so [`StreamDecoder`] can hold back a
//! character split across tokens. Chat templates are rendered with minijinja configured like
//! HF's Jinja2 environment ([`ChatTemplate`]).

#![forbid(unsafe_code)]

mod bpe;
mod chat;
mod error;
mod spec;
mod special;
mod spm;
mod stream;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::TokenizerError;
pub use spec::TokenizerSpec;
pub use stream::StreamDecoder;
pub use tokenizer::{TokenType, Tokenizer};

/// The hash map of the vocabulary tables: aHash (randomly keyed, so a hostile vocabulary
/// cannot force collisions) hashes the ~100k short strings of a cold start several times
/// faster than std's SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_sync() {
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<StreamDecoder>();
    }
}
