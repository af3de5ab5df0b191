//! [`TokenizerSpec`]: the tokenizer half of a GGUF file's metadata, as plain data.

use microllm_gguf::Metadata;

use crate::TokenizerError;

/// Everything a [`crate::Tokenizer`] is built from, as stored under `tokenizer.*` in GGUF.
///
/// Optional fields are `None` when the key is absent; the defaults llama.cpp applies then are
/// applied by [`crate::Tokenizer::from_spec`], not here, so a spec is a faithful copy of the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`: pre-tokenizer name for "gpt2" ("smollm", "llama-bpe", "qwen2", ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token text; the id is the index.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece merge scores (higher merges first).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: "left right" pairs, rank = index.
    pub merges: Option<Vec<String>>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub eot_id: Option<u32>,
    pub eom_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`: Jinja2 source.
    pub chat_template: Option<String>,
}

fn md<T>(key: &str, r: Result<T, microllm_gguf::GgufError>) -> Result<T, TokenizerError> {
    r.map_err(|source| TokenizerError::Metadata {
        key: key.to_owned(),
        source,
    })
}

impl TokenizerSpec {
    /// Reads the `tokenizer.*` keys of a GGUF file.
    pub fn from_gguf(m: &Metadata) -> Result<Self, TokenizerError> {
        Self::read(m, true)
    }

    /// Like [`TokenizerSpec::from_gguf`]; without `with_merges` the merges are left in the
    /// metadata (`merges: None`), for a caller that borrows them instead of copying.
    pub(crate) fn read(m: &Metadata, with_merges: bool) -> Result<Self, TokenizerError> {
        const MODEL: &str = "tokenizer.ggml.model";
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const SCORES: &str = "tokenizer.ggml.scores";
        const TYPES: &str = "tokenizer.ggml.token_type";
        const MERGES: &str = "tokenizer.ggml.merges";

        let model = md(MODEL, m.get_str(MODEL))?
            .ok_or(TokenizerError::MissingKey {
                key: MODEL,
                why: "it says which tokenizer algorithm the model uses",
            })?
            .to_owned();
        let tokens = md(TOKENS, m.get_str_array(TOKENS))?
            .ok_or(TokenizerError::MissingKey {
                key: TOKENS,
                why: "it is the vocabulary",
            })?
            .to_vec();

        // llama.cpp accepts f32 or i32 scores, and i32 token types; be as lenient about the
        // integer width of token types as the reader lets us.
        let scores = match m.get_f32_array(SCORES) {
            Ok(s) => s.map(<[f32]>::to_vec),
            Err(_) => md(
                SCORES,
                m.get_u32_array_lossless(SCORES)
                    .map(|o| o.map(|v| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>())),
            )?,
        };
        let token_types = match m.get_i32_array(TYPES) {
            Ok(t) => t.map(<[i32]>::to_vec),
            Err(_) => md(TYPES, m.get_u32_array_lossless(TYPES))?
                .map(|v| v.into_iter().map(|x| x as i32).collect()),
        };

        let s = |key: &str| -> Result<Option<String>, TokenizerError> {
            Ok(md(key, m.get_str(key))?.map(str::to_owned))
        };
        let u = |key: &str| md(key, m.get_u32(key));
        let b = |key: &str| md(key, m.get_bool(key));

        Ok(TokenizerSpec {
            model,
            pre: s("tokenizer.ggml.pre")?,
            tokens,
            scores,
            token_types,
            merges: if with_merges {
                md(MERGES, m.get_str_array(MERGES))?.map(<[String]>::to_vec)
            } else {
                None
            },
            bos_id: u("tokenizer.ggml.bos_token_id")?,
            eos_id: u("tokenizer.ggml.eos_token_id")?,
            eot_id: u("tokenizer.ggml.eot_token_id")?,
            eom_id: u("tokenizer.ggml.eom_token_id")?,
            unk_id: u("tokenizer.ggml.unknown_token_id")?,
            pad_id: u("tokenizer.ggml.padding_token_id")?,
            add_bos: b("tokenizer.ggml.add_bos_token")?,
            add_eos: b("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: b("tokenizer.ggml.add_space_prefix")?,
            chat_template: s("tokenizer.chat_template")?,
        })
    }
}
