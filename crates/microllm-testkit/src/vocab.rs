//! A tiny byte-level BPE vocabulary in the shape of GPT-2 / SmolLM2 vocabularies.

/// Id of `<|endoftext|>` (CONTROL; also the unknown token), as in SmolLM2.
pub const ENDOFTEXT_ID: u32 = 0;
/// Id of `<|im_start|>` (CONTROL; the BOS token), as in SmolLM2.
pub const IM_START_ID: u32 = 1;
/// Id of `<|im_end|>` (CONTROL; the EOS and padding token), as in SmolLM2.
pub const IM_END_ID: u32 = 2;
/// The special tokens, at ids 0, 1, 2.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Id of the first byte token; byte tokens follow in GPT-2 order (see [`gpt2_byte_order`]).
pub const FIRST_BYTE_ID: u32 = 3;

/// llama.cpp token types (`enum llama_token_type`).
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// llama.cpp token type of control tokens.
pub const TOKEN_TYPE_CONTROL: i32 = 3;

/// The merges, highest priority first, over GPT-2's byte alphabet (`Ġ` is a space, `Ċ` a
/// newline). Each merge's parts are bytes or results of earlier merges.
const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("i", "n"),
    ("h", "e"),
    ("Ġ", "Ġ"),
    ("r", "e"),
    ("o", "n"),
    ("e", "r"),
    ("Ġt", "he"),
    ("a", "t"),
    ("Ġ", "s"),
    ("Ġ", "o"),
    ("e", "n"),
    ("Ġ", "w"),
    ("o", "r"),
    ("i", "s"),
    ("Ġ", "c"),
    ("e", "s"),
    ("a", "n"),
    ("i", "t"),
    ("o", "u"),
    ("Ġ", "b"),
    ("Ġ", "f"),
    ("Ġ", "h"),
    ("Ġ", "i"),
    ("in", "g"),
    ("l", "l"),
    ("e", "d"),
    ("Ġ", "m"),
    ("Ġ", "p"),
    ("Ġ", "d"),
    ("Ġ", "l"),
    ("Ġt", "o"),
    ("Ġo", "f"),
    ("Ġa", "n"),
    ("Ġan", "d"),
    ("Ġi", "n"),
    ("Ġi", "s"),
    ("Ġw", "h"),
    ("Ġh", "e"),
    ("Ġ", "T"),
    ("ĠT", "he"),
    ("Ċ", "Ċ"),
    ("H", "e"),
    ("ll", "o"),
    ("He", "llo"),
];

/// GPT-2's byte order: the printable bytes `!`..`~`, `¡`..`¬`, `®`..`ÿ` first, then the
/// other 68 bytes in increasing order (this is the id order of GPT-2's byte tokens).
pub fn gpt2_byte_order() -> Vec<u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| printable(b)).collect();
    order.extend((0..=255u8).filter(|&b| !printable(b)));
    order
}

/// GPT-2's byte-to-unicode mapping: printable bytes map to themselves, the others to
/// U+0100 onwards in increasing byte order (space 0x20 becomes `Ġ` U+0120, `\n` becomes `Ċ`).
pub fn gpt2_byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    // 256 + n < 0x144, always a valid char.
    char::from_u32(256 + n).unwrap_or('\u{fffd}')
}

/// A tiny GPT-2-style byte-level BPE vocabulary: `(tokens, merges, token_types)`.
///
/// Ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>` (CONTROL, type 3), then the 256
/// byte tokens in GPT-2 order ([`gpt2_byte_order`]), then one token per merge in merge order.
/// Merges are `"left right"` strings as in `tokenizer.ggml.merges`.
pub fn tiny_gpt2_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![TOKEN_TYPE_CONTROL; SPECIAL_TOKENS.len()];
    for b in gpt2_byte_order() {
        tokens.push(gpt2_byte_to_unicode(b).to_string());
        types.push(TOKEN_TYPE_NORMAL);
    }
    let mut merges = Vec::with_capacity(MERGES.len());
    for (l, r) in MERGES {
        merges.push(format!("{l} {r}"));
        tokens.push(format!("{l}{r}"));
        types.push(TOKEN_TYPE_NORMAL);
    }
    (tokens, merges, types)
}

/// A ChatML chat template in the style of SmolLM2's (default system prompt when none given).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

// ---- SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`), Gemma's layout ----

/// Id of `<pad>` in [`tiny_spm_vocab`] (CONTROL), as in Gemma.
pub const SPM_PAD_ID: u32 = 0;
/// Id of `<eos>` (CONTROL; the EOS token), as in Gemma.
pub const SPM_EOS_ID: u32 = 1;
/// Id of `<bos>` (CONTROL; the BOS token, added by default), as in Gemma.
pub const SPM_BOS_ID: u32 = 2;
/// Id of `<unk>` (UNKNOWN).
pub const SPM_UNK_ID: u32 = 3;
/// The special tokens of [`tiny_spm_vocab`], at ids 0..4.
pub const SPM_SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<eos>", "<bos>", "<unk>"];
/// Id of the first byte token `<0x00>`; `<0xXX>` is at `SPM_FIRST_BYTE_ID + 0xXX`.
pub const SPM_FIRST_BYTE_ID: u32 = 4;
/// llama.cpp token type of the unknown token.
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// llama.cpp token type of `<0xXX>` byte-fallback tokens.
pub const TOKEN_TYPE_BYTE: i32 = 6;
/// SentencePiece's word-boundary mark (U+2581), which stands for a space in pieces.
pub const SPM_SPACE: char = '\u{2581}';

/// Characters that are pieces of their own in the SentencePiece vocabularies (any other
/// character is encoded by byte fallback).
const SPM_CHARS: &str = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'";

/// A tiny SentencePiece-style vocabulary in Gemma's layout: `(tokens, scores, token_types)`.
///
/// Ids: 0 `<pad>`, 1 `<eos>`, 2 `<bos>` (CONTROL), 3 `<unk>` (UNKNOWN), then the 256 byte
/// tokens `<0x00>`..`<0xFF>` (BYTE), then the single characters of a small alphabet
/// (`▁`, letters, digits, punctuation), then the merged pieces of the GPT-2 vocabulary's
/// merges with `Ġ` written as `▁`. Scores follow SentencePiece's convention: specials -1000,
/// bytes 0, merged pieces `-(merge rank)` so that earlier merges win, characters below every
/// merged piece.
pub fn tiny_spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let specials = [
        ("<pad>", TOKEN_TYPE_CONTROL),
        ("<eos>", TOKEN_TYPE_CONTROL),
        ("<bos>", TOKEN_TYPE_CONTROL),
        ("<unk>", TOKEN_TYPE_UNKNOWN),
    ];
    spm_vocab(&specials, &[])
}

/// Id of `<unk>` in [`tiny_phi3_vocab`] (UNKNOWN), as in Llama 2 / Phi-3.
pub const PHI3_UNK_ID: u32 = 0;
/// Id of `<s>` (CONTROL; BOS).
pub const PHI3_BOS_ID: u32 = 1;
/// Id of `</s>` (CONTROL).
pub const PHI3_EOS_ID: u32 = 2;
/// Id of the first byte token `<0x00>` in [`tiny_phi3_vocab`].
pub const PHI3_FIRST_BYTE_ID: u32 = 3;
/// Phi-3's added chat tokens, appended after the pieces as in the real vocabulary (CONTROL).
pub const PHI3_ADDED_TOKENS: [&str; 5] = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|user|>",
];

/// Phi-3's chat template (as in Phi-3.5-mini-instruct).
pub const PHI3_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

/// A tiny SentencePiece-style vocabulary in Llama 2 / Phi-3's layout: 0 `<unk>` (UNKNOWN),
/// 1 `<s>`, 2 `</s>` (CONTROL), the 256 byte tokens from id 3, the same characters and pieces
/// as [`tiny_spm_vocab`], then [`PHI3_ADDED_TOKENS`] (CONTROL, score -1000, as Phi-3's
/// converter writes added tokens). llama.cpp requires `<unk>`, `<s>`, `</s>` and
/// `<|endoftext|>` in any model whose name says Phi-3.
pub fn tiny_phi3_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let specials = [
        ("<unk>", TOKEN_TYPE_UNKNOWN),
        ("<s>", TOKEN_TYPE_CONTROL),
        ("</s>", TOKEN_TYPE_CONTROL),
    ];
    spm_vocab(&specials, &PHI3_ADDED_TOKENS)
}

/// Id of a Phi-3 added token in [`tiny_phi3_vocab`].
pub fn phi3_added_token_id(text: &str) -> Option<u32> {
    let (tokens, _, _) = tiny_phi3_vocab();
    tokens.iter().position(|t| t == text).map(|i| i as u32)
}

fn spm_vocab(specials: &[(&str, i32)], added: &[&str]) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = specials.iter().map(|(s, _)| s.to_string()).collect();
    let mut scores = vec![-1000.0f32; specials.len()];
    let mut types: Vec<i32> = specials.iter().map(|(_, t)| *t).collect();
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(TOKEN_TYPE_BYTE);
    }
    // The GPT-2 merges minus the newline one (a newline is byte fallback here).
    let merges: Vec<_> = MERGES.iter().filter(|(l, _)| *l != "Ċ").collect();
    for (i, c) in SPM_CHARS.chars().enumerate() {
        tokens.push(c.to_string());
        scores.push(-((merges.len() + i) as f32));
        types.push(TOKEN_TYPE_NORMAL);
    }
    for (i, (l, r)) in merges.iter().enumerate() {
        tokens.push(format!("{l}{r}").replace('Ġ', "▁"));
        scores.push(-(i as f32));
        types.push(TOKEN_TYPE_NORMAL);
    }
    for a in added {
        tokens.push(a.to_string());
        scores.push(-1000.0);
        types.push(TOKEN_TYPE_CONTROL);
    }
    (tokens, scores, types)
}
