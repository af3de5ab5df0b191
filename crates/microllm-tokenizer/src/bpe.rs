//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) on top of HF `tokenizers`.
//!
//! HF's `BPE` model and `Split`/`ByteLevel` pre-tokenizers do the work; this file only chooses
//! the pre-tokenizer regexes the way llama.cpp does for each `tokenizer.ggml.pre`, so that the
//! ids are llama.cpp's. Special tokens never reach this code: [`crate::special`] splits them
//! out first (llama.cpp's partition rules differ from HF's added-token matching).

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    Model, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::TokenizerError;

/// GPT-2's pattern as llama.cpp writes it (without the trailing `|\s+`: a lone whitespace
/// character that no alternative takes becomes its own piece anyway, since splits keep the gaps).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's pattern with the case-insensitive group spelled out (llama.cpp's adaptation).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pattern: like Llama 3's but single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What llama.cpp does for one family of `tokenizer.ggml.pre` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreConfig {
    /// Applied in order; each splits the pieces the previous one left.
    pub regexes: &'static [&'static str],
    /// A pre-token that is itself a vocabulary entry is taken whole, without merging (Llama 3).
    pub ignore_merges: bool,
    /// `add_bos` when the metadata does not say.
    pub default_add_bos: bool,
}

pub(crate) const KNOWN_PRE: &str = "default, gpt-2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, mpt, olmo, phi-2, llama3, llama-v3, llama-bpe, falcon3, falcon-h1, pixtral, dbrx, smaug-bpe, qwen2, deepseek-r1-qwen, stablelm2, megrez, hunyuan, falcon";

/// The pre-tokenizer for `tokenizer.ggml.pre` (absent = "default", as llama.cpp does with a warning).
pub(crate) fn pre_config(pre: Option<&str>) -> Result<PreConfig, TokenizerError> {
    let pre = pre.unwrap_or("default");
    let cfg = |regexes, ignore_merges, default_add_bos| PreConfig {
        regexes,
        ignore_merges,
        default_add_bos,
    };
    Ok(match pre {
        "default" => cfg(
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            cfg(&[r"\p{N}", GPT2], false, false)
        }
        "gpt-2" | "mpt" | "olmo" | "phi-2" | "jais" | "exaone4" | "mellum" | "roberta-bpe" => {
            cfg(&[GPT2], false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "lfm2" => {
            cfg(&[LLAMA3], true, true)
        }
        "dbrx" | "smaug-bpe" => cfg(&[LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" | "hunyuan" => {
            cfg(&[QWEN2], false, false)
        }
        "falcon" => cfg(
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        other => {
            return Err(TokenizerError::UnsupportedPre {
                pre: other.to_owned(),
                known: KNOWN_PRE,
            })
        }
    })
}

/// The GPT-2 byte <-> printable-character bijection: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes are mapped to U+0100.. in byte order.
pub(crate) fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let c = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        // All values are < 0x144, always valid scalar values.
        table[b as usize] = char::from_u32(c).unwrap_or('\u{fffd}');
    }
    table
}

/// Raw bytes of a byte-level token text; characters outside the mapping are kept as UTF-8.
pub(crate) fn byte_level_decode(text: &str, inverse: &HashMap<char, u8>, out: &mut Vec<u8>) {
    for c in text.chars() {
        match inverse.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// The byte-level BPE of one model.
pub(crate) struct BpeEncoder {
    pre: Sequence,
    model: BPE,
}

fn bpe_err(stage: &'static str) -> impl Fn(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Bpe {
        stage,
        message: e.to_string(),
    }
}

impl BpeEncoder {
    /// `first_id` maps token text to its (first) id.
    pub fn new(
        first_id: &HashMap<Box<str>, u32>,
        merges: &[String],
        cfg: PreConfig,
    ) -> Result<Self, TokenizerError> {
        let vocab: Vocab = first_id.iter().map(|(k, &v)| (k.to_string(), v)).collect();
        // HF refuses merges whose parts or result are not tokens; llama.cpp would still apply
        // them, but their result could only end up as byte fallback, which a well-formed
        // vocabulary never needs. Dropping them keeps every other rank unchanged.
        let pairs: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| {
                // llama.cpp splits at the first space after byte 0 (so a merge of a space
                // token would still parse). A space is ASCII, so any match is a char boundary.
                let pos = m.bytes().skip(1).position(|b| b == b' ')? + 1;
                let (a, b) = (&m[..pos], &m[pos + 1..]);
                let ok = first_id.contains_key(a)
                    && first_id.contains_key(b)
                    && first_id.contains_key(format!("{a}{b}").as_str());
                ok.then(|| (a.to_owned(), b.to_owned()))
            })
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .ignore_merges(cfg.ignore_merges)
            .build()
            .map_err(bpe_err("vocabulary setup"))?;

        let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(cfg.regexes.len() + 1);
        for re in cfg.regexes {
            let split = Split::new(
                SplitPattern::Regex((*re).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(bpe_err("pre-tokenizer regex"))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());
        Ok(BpeEncoder {
            pre: Sequence::new(steps),
            model,
        })
    }

    /// Appends the ids of `text` (no special tokens in it) to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut pretok = PreTokenizedString::from(text);
        self.pre
            .pre_tokenize(&mut pretok)
            .map_err(bpe_err("pre-tokenization"))?;
        for (piece, _, _) in pretok.get_splits(OffsetReferential::Original, OffsetType::None) {
            let toks = self.model.tokenize(piece).map_err(bpe_err("merging"))?;
            out.extend(toks.into_iter().map(|t| t.id));
        }
        Ok(())
    }
}
