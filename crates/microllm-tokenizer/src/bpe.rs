//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): HF `tokenizers`' `Split`/`ByteLevel`
//! pre-tokenizers with the regexes llama.cpp uses for each `tokenizer.ggml.pre`, then the
//! merges on token ids (see [`BpeEncoder`]), so that the ids are llama.cpp's. Special tokens
//! never reach this code: [`crate::special`] splits them out first (llama.cpp's partition
//! rules differ from HF's added-token matching).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::{FastMap, TokenizerError};

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

/// The inverse of [`byte_to_char`], indexed by character code (all below 0x144).
pub(crate) fn char_to_byte() -> [Option<u8>; 0x144] {
    let mut inv = [None; 0x144];
    for (b, c) in byte_to_char().into_iter().enumerate() {
        if let Some(slot) = inv.get_mut(c as usize) {
            *slot = Some(b as u8);
        }
    }
    inv
}

/// Raw bytes of a byte-level token text (`inverse` from [`char_to_byte`]); characters outside
/// the mapping are kept as UTF-8.
pub(crate) fn byte_level_decode(text: &str, inverse: &[Option<u8>; 0x144], out: &mut Vec<u8>) {
    for c in text.chars() {
        match inverse.get(c as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// The byte-level BPE of one model: HF `tokenizers`' pre-tokenizers split the text, then the
/// merges are applied here on token ids.
///
/// The merge step is HF's `BPE` model without dropout, unknown token or byte fallback (what a
/// GGUF byte-level vocabulary needs), written against the ids directly: building HF's model
/// copies the vocabulary twice and formats every merge's result, ~80 ms of a cold start for a
/// 49k-merge vocabulary, where this table takes a few. The results are the same: a piece
/// starts as its characters' ids (characters without a token are dropped, as HF does), then
/// the adjacent pair of lowest rank is merged, leftmost first, until no pair has a merge.
pub(crate) struct BpeEncoder {
    pre: Sequence,
    /// `(left id, right id)` -> `(rank, merged id)`; a later duplicate of a pair wins, as in HF.
    merges: FastMap<(u32, u32), (u32, u32)>,
    /// A pre-token that is itself a vocabulary entry is taken whole (Llama 3).
    ignore_merges: bool,
}

fn bpe_err(stage: &'static str) -> impl Fn(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Bpe {
        stage,
        message: e.to_string(),
    }
}

/// One symbol of a piece being merged: a token id and its neighbours (a linked list, so a
/// merge is O(1)); `dead` once merged into its left neighbour.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    dead: bool,
}

const NONE: usize = usize::MAX;

impl BpeEncoder {
    /// `first_id` maps token text to its (first) id.
    pub fn new(
        first_id: &FastMap<Box<str>, u32>,
        merges: &[String],
        cfg: PreConfig,
    ) -> Result<Self, TokenizerError> {
        // HF refuses merges whose parts or result are not tokens; llama.cpp would still apply
        // them, but their result could only end up as byte fallback, which a well-formed
        // vocabulary never needs. Dropping them keeps the order of every other merge.
        let mut table = FastMap::with_capacity_and_hasher(merges.len(), Default::default());
        let mut joined = String::new();
        let mut rank = 0u32;
        for m in merges {
            // llama.cpp splits at the first space after byte 0 (so a merge of a space token
            // would still parse). A space is ASCII, so any match is a char boundary.
            let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            if let (Some(&ia), Some(&ib), Some(&ij)) = (
                first_id.get(a),
                first_id.get(b),
                first_id.get(joined.as_str()),
            ) {
                table.insert((ia, ib), (rank, ij));
                rank += 1;
            }
        }

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
            merges: table,
            ignore_merges: cfg.ignore_merges,
        })
    }

    /// Appends the ids of `text` (no special tokens in it) to `out`; `vocab` maps token text
    /// to its (first) id.
    pub fn encode(
        &self,
        text: &str,
        vocab: &FastMap<Box<str>, u32>,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut pretok = PreTokenizedString::from(text);
        self.pre
            .pre_tokenize(&mut pretok)
            .map_err(bpe_err("pre-tokenization"))?;
        let mut syms = Vec::new();
        for (piece, _, _) in pretok.get_splits(OffsetReferential::Original, OffsetType::None) {
            if self.ignore_merges {
                if let Some(&id) = vocab.get(piece) {
                    out.push(id);
                    continue;
                }
            }
            self.merge_piece(piece, vocab, &mut syms, out);
        }
        Ok(())
    }

    /// Merges one pre-token; `syms` is reused scratch.
    fn merge_piece(
        &self,
        piece: &str,
        vocab: &FastMap<Box<str>, u32>,
        syms: &mut Vec<Symbol>,
        out: &mut Vec<u32>,
    ) {
        syms.clear();
        let mut buf = [0u8; 4];
        for c in piece.chars() {
            if let Some(&id) = vocab.get(&*c.encode_utf8(&mut buf)) {
                let i = syms.len();
                syms.push(Symbol {
                    id,
                    prev: if i == 0 { NONE } else { i - 1 },
                    next: i + 1,
                    dead: false,
                });
            }
        }
        let Some(last) = syms.last_mut() else {
            return;
        };
        last.next = NONE;
        // Candidate merges, lowest rank first, then leftmost; stale entries (a side already
        // merged into something else) are skipped when popped.
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = syms
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| {
                self.merges
                    .get(&(w[0].id, w[1].id))
                    .map(|&(r, new)| Reverse((r, i, new)))
            })
            .collect();
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            let left = syms[pos];
            if left.dead || left.next == NONE {
                continue;
            }
            let right = syms[left.next];
            if self.merges.get(&(left.id, right.id)).map(|m| m.1) != Some(new_id) {
                continue;
            }
            syms[pos].id = new_id;
            syms[pos].next = right.next;
            syms[left.next].dead = true;
            if right.next != NONE {
                syms[right.next].prev = pos;
            }
            if left.prev != NONE {
                if let Some(&(r, n)) = self.merges.get(&(syms[left.prev].id, new_id)) {
                    queue.push(Reverse((r, left.prev, n)));
                }
            }
            if right.next != NONE {
                if let Some(&(r, n)) = self.merges.get(&(new_id, syms[right.next].id)) {
                    queue.push(Reverse((r, pos, n)));
                }
            }
        }
        out.extend(syms.iter().filter(|s| !s.dead).map(|s| s.id));
    }
}
