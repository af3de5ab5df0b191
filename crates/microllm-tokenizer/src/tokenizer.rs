//! [`Tokenizer`]: vocabulary, special tokens, encode and decode.

use crate::bpe::{self, BpeEncoder};
use crate::special::{Fragment, SpecialTokens};
use crate::spm::SpmVocab;
use crate::{FastMap, TokenizerError, TokenizerSpec};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Maps the GGUF integer; anything unknown is `Undefined`.
    pub fn from_gguf(v: i32) -> Self {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Token texts that llama.cpp treats as end of generation when the vocabulary has them
/// (besides the eos/eot/eom ids), and forces to be control tokens.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle pad/repo/file-separator tokens: llama.cpp also stops on these.
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

enum Algorithm {
    /// Byte-level BPE ("gpt2").
    Bpe(Box<BpeEncoder>),
    /// SentencePiece-style merges by score ("llama").
    Spm {
        scores: Vec<f32>,
        byte_tokens: Box<[Option<u32>; 256]>,
    },
}

/// A tokenizer built from GGUF metadata; ids are llama.cpp's (`llama-tokenize` conventions).
///
/// `Send + Sync`: share one behind an `Arc`.
pub struct Tokenizer {
    algorithm: Algorithm,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    /// Text -> id; for duplicated texts the first id.
    token_to_id: FastMap<Box<str>, u32>,
    /// Raw bytes of every token, concatenated; token i is `bytes[offsets[i]..offsets[i+1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    specials: SpecialTokens,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Sorted ids that end generation.
    eog: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match self.algorithm {
                    Algorithm::Bpe(_) => "gpt2",
                    Algorithm::Spm { .. } => "llama",
                },
            )
            .field("vocab_size", &self.tokens.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// Checks a per-token array's length (longer is accepted, as llama.cpp does).
fn check_len<T>(key: &'static str, v: &[T], n: usize) -> Result<(), TokenizerError> {
    if v.len() < n {
        return Err(TokenizerError::LengthMismatch {
            key,
            expected: n,
            got: v.len(),
        });
    }
    Ok(())
}

/// `Some(id)` if it is inside the vocabulary; llama.cpp ignores out-of-range ids too.
fn in_vocab(id: Option<u32>, n: usize) -> Option<u32> {
    id.filter(|&i| (i as usize) < n)
}

/// `<0xXX>` -> XX.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl Tokenizer {
    /// Reads the tokenizer from GGUF metadata.
    pub fn from_gguf(md: &microllm_gguf::Metadata) -> Result<Self, TokenizerError> {
        // The merges are only read while building, so they are borrowed, not copied.
        const MERGES: &str = "tokenizer.ggml.merges";
        let merges = md
            .get_str_array(MERGES)
            .map_err(|source| TokenizerError::Metadata {
                key: MERGES.to_owned(),
                source,
            })?;
        Self::build(TokenizerSpec::read(md, false)?, merges)
    }

    /// Builds the tokenizer, applying llama.cpp's defaults for absent keys.
    pub fn from_spec(mut spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        let merges = spec.merges.take();
        Self::build(spec, merges.as_deref())
    }

    /// [`Tokenizer::from_spec`] with the merges apart (`spec.merges` is ignored).
    fn build(spec: TokenizerSpec, merges: Option<&[String]>) -> Result<Self, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > u32::MAX as usize {
            return Err(TokenizerError::LengthMismatch {
                key: "tokenizer.ggml.tokens",
                expected: u32::MAX as usize,
                got: n,
            });
        }
        let mut types: Vec<TokenType> = match &spec.token_types {
            Some(t) => {
                check_len("tokenizer.ggml.token_type", t, n)?;
                t[..n].iter().map(|&v| TokenType::from_gguf(v)).collect()
            }
            None => vec![TokenType::Normal; n],
        };
        if let Some(s) = &spec.scores {
            check_len("tokenizer.ggml.scores", s, n)?;
        }

        let mut token_to_id: FastMap<Box<str>, u32> =
            FastMap::with_capacity_and_hasher(n, Default::default());
        for (i, t) in spec.tokens.iter().enumerate() {
            token_to_id.entry(t.as_str().into()).or_insert(i as u32);
        }

        // llama.cpp's defaults per algorithm, then the metadata.
        let is_spm = match spec.model.as_str() {
            "llama" => true,
            "gpt2" => false,
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    model: other.to_owned(),
                })
            }
        };
        let (def_bos, def_eos, def_unk) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else {
            (None, None, None)
        };
        let bos_id = in_vocab(spec.bos_id, n).or(in_vocab(def_bos, n));
        let eos_id = in_vocab(spec.eos_id, n).or(in_vocab(def_eos, n));
        let unk_id = in_vocab(spec.unk_id, n).or(in_vocab(def_unk, n));
        let pad_id = in_vocab(spec.pad_id, n);
        let eot_id = in_vocab(spec.eot_id, n);
        let eom_id = in_vocab(spec.eom_id, n);

        let (algorithm, def_add_bos) = if is_spm {
            let scores = spec.scores.clone().map_or_else(
                || vec![0.0; n],
                |mut s| {
                    s.truncate(n);
                    s
                },
            );
            let mut byte_tokens = Box::new([None; 256]);
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                let hex = format!("<0x{b:02X}>");
                *slot = token_to_id.get(hex.as_str()).copied().or_else(|| {
                    let c = char::from(b as u8);
                    (b < 128)
                        .then(|| token_to_id.get(c.to_string().as_str()).copied())
                        .flatten()
                });
            }
            (
                Algorithm::Spm {
                    scores,
                    byte_tokens,
                },
                true,
            )
        } else {
            let cfg = bpe::pre_config(spec.pre.as_deref())?;
            let merges = merges.ok_or(TokenizerError::MissingMerges)?;
            let enc = BpeEncoder::new(&token_to_id, merges, cfg)?;
            (Algorithm::Bpe(Box::new(enc)), cfg.default_add_bos)
        };
        let add_bos = spec.add_bos.unwrap_or(def_add_bos);
        let add_eos = spec.add_eos.unwrap_or(false);
        let add_space_prefix = is_spm && spec.add_space_prefix.unwrap_or(true);
        if add_bos && bos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "tokenizer.ggml.add_bos_token",
                id_key: "tokenizer.ggml.bos_token_id",
            });
        }
        if add_eos && eos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "tokenizer.ggml.add_eos_token",
                id_key: "tokenizer.ggml.eos_token_id",
            });
        }

        // End of generation, and llama.cpp's promotion of such tokens to control tokens.
        let mut eog: Vec<u32> = [eos_id, eot_id, eom_id].into_iter().flatten().collect();
        for text in EOG_TEXTS.iter().chain(FIM_EOG_TEXTS) {
            if let Some(&id) = token_to_id.get(*text) {
                eog.push(id);
                // llama.cpp: "control-looking token ... its type will be overridden".
                types[id as usize] = TokenType::Control;
            }
        }
        eog.sort_unstable();
        eog.dedup();

        let specials = SpecialTokens::new(spec.tokens.iter().enumerate().filter_map(|(i, t)| {
            match types[i] {
                TokenType::Control | TokenType::Unknown => Some((i as u32, t.clone(), true)),
                TokenType::UserDefined => Some((i as u32, t.clone(), false)),
                _ => None,
            }
        }));

        // Raw bytes per token.
        let c2b = bpe::char_to_byte();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        for (i, t) in spec.tokens.iter().enumerate() {
            match types[i] {
                TokenType::Byte => match parse_byte_token(t) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(t.as_bytes()),
                },
                TokenType::Normal | TokenType::Undefined => {
                    if is_spm {
                        bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes());
                    } else {
                        bpe::byte_level_decode(t, &c2b, &mut bytes);
                    }
                }
                // Special tokens are rendered as their text.
                _ => bytes.extend_from_slice(t.as_bytes()),
            }
            offsets.push(bytes.len());
        }

        Ok(Tokenizer {
            algorithm,
            tokens: spec.tokens,
            types,
            token_to_id,
            bytes,
            offsets,
            specials,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
            chat_template: spec.chat_template,
        })
    }

    /// Token ids of `text`.
    ///
    /// `add_special`: add BOS/EOS when the model asks for them (`add_bos_token`/`add_eos_token`).
    /// `parse_special`: control tokens written in the text (`<|im_start|>`) become their ids;
    /// otherwise they are tokenized as plain text. User-defined tokens are always recognised,
    /// as llama.cpp does.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let frags = self.specials.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos_id);
        }
        match &self.algorithm {
            Algorithm::Bpe(enc) => {
                for f in frags {
                    match f {
                        Fragment::Text(s) => enc.encode(s, &self.token_to_id, &mut out)?,
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Algorithm::Spm {
                scores,
                byte_tokens,
            } => {
                let vocab = SpmVocab {
                    token_to_id: &self.token_to_id,
                    scores,
                    byte_tokens,
                    unk_id: self.unk_id,
                };
                // llama.cpp adds the space prefix to every text fragment that follows a special
                // token or starts the input.
                let mut prev_special = true;
                let mut buf = String::new();
                for f in frags {
                    match f {
                        Fragment::Text(s) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in s.chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            vocab.encode(&buf, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos_id);
        }
        Ok(out)
    }

    /// The text of `ids`: the concatenated [`Self::token_bytes`], invalid UTF-8 replaced by
    /// U+FFFD. Special tokens are rendered as their text. For models that add a space prefix
    /// (SentencePiece), the space of the first text token is removed, so that
    /// `decode(encode(x)) == x`. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out: Vec<u8> = Vec::new();
        let mut strip = self.add_space_prefix;
        for &id in ids {
            let mut b = self.token_bytes(id);
            if strip
                && matches!(
                    self.token_type(id),
                    Some(TokenType::Normal | TokenType::Byte)
                )
            {
                if let Some(rest) = b.strip_prefix(b" ") {
                    b = rest;
                }
                strip = false;
            }
            out.extend_from_slice(b);
        }
        match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Raw bytes of one token (byte-level decoded / `<0xXX>` -> byte / `▁` -> space; special
    /// tokens: their text). Empty for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.tokens.len() {
            return &[];
        }
        &self.bytes[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The token's text as stored in the vocabulary ("" outside it).
    pub fn token_text(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", String::as_str)
    }

    /// The id of a vocabulary entry, by its exact stored text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The token's type (after llama.cpp's promotion of end-of-generation tokens to control).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// End of generation: eos, eot, eom, and, like llama.cpp, `<|im_end|>`, `<end_of_turn>`,
    /// `<|endoftext|>`, `<|eot_id|>` (and a few more) when the vocabulary has them.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// `tokenizer.chat_template`, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}
