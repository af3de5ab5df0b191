//! The one error type of this crate.

/// Everything that can go wrong building a tokenizer, encoding text or rendering a chat template.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// Reading a metadata key failed (wrong type, value out of range, ...).
    #[error("GGUF metadata key `{key}` could not be read: {source}; the file's tokenizer metadata is malformed, re-convert the model with a current llama.cpp convert script")]
    Metadata {
        key: String,
        #[source]
        source: microllm_gguf::GgufError,
    },

    /// A key the tokenizer cannot do without is absent.
    #[error("GGUF metadata has no `{key}`: {why}; this file has no usable tokenizer, re-convert the model with a current llama.cpp convert script")]
    MissingKey {
        key: &'static str,
        why: &'static str,
    },

    /// `tokenizer.ggml.model` names an algorithm this crate does not implement.
    #[error("tokenizer.ggml.model = \"{model}\" is not supported (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece-style); use a model with one of those tokenizers")]
    UnsupportedModel { model: String },

    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not know.
    #[error("tokenizer.ggml.pre = \"{pre}\" is not a known pre-tokenizer (known: {known}); the ids would differ from llama.cpp's, so this is refused: add the regexes for it to microllm-tokenizer's bpe.rs")]
    UnsupportedPre { pre: String, known: &'static str },

    /// The vocabulary is empty.
    #[error("the vocabulary (tokenizer.ggml.tokens) is empty; the model file is broken, fetch or convert it again")]
    EmptyVocab,

    /// A per-token array does not have one entry per token.
    #[error("`{key}` has {got} entries but the vocabulary has {expected} tokens; the model file is inconsistent, re-convert it")]
    LengthMismatch {
        key: &'static str,
        expected: usize,
        got: usize,
    },

    /// A special-token id points past the end of the vocabulary.
    #[error("`{key}` = {id} is outside the vocabulary of {n_vocab} tokens; the model file is inconsistent, re-convert it")]
    TokenIdOutOfRange {
        key: &'static str,
        id: u32,
        n_vocab: usize,
    },

    /// The model asks for BOS/EOS to be added but does not say which token that is.
    #[error(
        "`{flag}` is true but `{id_key}` is not set; the model file is inconsistent, re-convert it"
    )]
    MissingSpecialToken {
        flag: &'static str,
        id_key: &'static str,
    },

    /// A byte-level BPE model without merges.
    #[error("tokenizer.ggml.model is \"gpt2\" but tokenizer.ggml.merges is missing; a BPE vocabulary needs its merges, re-convert the model")]
    MissingMerges,

    /// The HF `tokenizers` library refused the vocabulary or failed while encoding.
    #[error("byte-level BPE {stage} failed: {message}")]
    Bpe {
        stage: &'static str,
        message: String,
    },

    /// The model has no `tokenizer.chat_template`.
    #[error("this model has no chat template: pass --chat-template FILE or use --raw")]
    NoChatTemplate,

    /// The chat template does not compile.
    #[error("the chat template does not parse: {message}; fix the template (it must be Jinja2 as HF transformers uses it)")]
    TemplateSyntax { message: String },

    /// Rendering the chat template failed (this includes `raise_exception(...)` from the template).
    #[error("rendering the chat template failed: {message}")]
    TemplateRender { message: String },
}
