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
