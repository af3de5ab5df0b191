//! Golden tests against llama.cpp on SmolLM2-135M-Instruct (gpt2 byte-level BPE, pre "smollm").

mod common;

use common::*;
use microllm_tokenizer::{ChatMessage, ChatTemplate, StreamDecoder};

#[test]
fn reference_strings_match_llama_cpp() {
    let Some(tok) = smollm2() else { return };
    let mut failures = Vec::new();
    for (text, want) in string_cases("smollm2/tokenize-strings.json") {
        let got = tok.encode(&llama_cpp_escapes(&text), true, true).unwrap();
        if let Some(d) = first_diff(tok, &got, &want) {
            failures.push(format!("{text:?}: {d}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn corpus_matches_llama_cpp() {
    let Some(tok) = smollm2() else { return };
    let want = ids(&read_json("smollm2/alice29-ids.json"));
    let text = corpus();
    let got = tok.encode(&text, true, true).unwrap();
    if let Some(d) = first_diff(tok, &got, &want) {
        panic!("{d}");
    }
    // BOS, when added, is rendered as its text.
    let body = if tok.add_bos() { &got[1..] } else { &got[..] };
    assert_same_text(&tok.decode(body), &text);
}

#[test]
fn decode_inverts_encode() {
    let Some(tok) = smollm2() else { return };
    for (text, _) in string_cases("smollm2/tokenize-strings.json") {
        for parse_special in [false, true] {
            let ids = tok.encode(&text, true, parse_special).unwrap();
            assert_eq!(tok.decode(&ids), text, "parse_special={parse_special}");
        }
    }
}

#[test]
fn chat_template_renders_like_hf_and_tokenizes_like_llama_cpp() {
    let Some(tok) = smollm2() else { return };
    let tmpl = ChatTemplate::for_model(tok).unwrap();
    let bos = tok.token_text(tok.bos_id().unwrap());
    let eos = tok.token_text(tok.eos_id().unwrap());
    let cases = read_json("smollm2/chat.json");
    let cases = cases.as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["messages"].clone()).expect("messages");
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tmpl.render(&messages, agp, bos, eos).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        let got = tok.encode(&rendered, true, true).unwrap();
        let want = ids(&case["prompt_ids"]);
        if let Some(d) = first_diff(tok, &got, &want) {
            panic!("{d}");
        }
    }
}

#[test]
fn special_tokens_and_flags() {
    let Some(tok) = smollm2() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    // End of generation: eos (= <|im_end|>) and <|endoftext|>, not <|im_start|>.
    assert!(tok.is_eog(2));
    assert!(tok.is_eog(tok.token_id("<|endoftext|>").unwrap()));
    assert!(!tok.is_eog(1));
    assert!(!tok.is_eog(19556));
    // parse_special = false: the control token's text is plain text.
    let plain = tok.encode("<|im_start|>", false, false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain), "<|im_start|>");
    assert_eq!(tok.encode("<|im_start|>", false, true).unwrap(), vec![1]);
    // Empty input.
    assert!(tok.encode("", true, true).unwrap().is_empty());
    // Byte-level pieces decode to raw bytes; an out-of-range id to nothing.
    assert_eq!(tok.token_bytes(216), b" ");
    assert_eq!(tok.token_bytes(u32::MAX), b"");
    assert_eq!(tok.decode(&[u32::MAX, 19556]), "Hello");
}

#[test]
fn stream_decoder_holds_back_an_emoji_split_across_tokens() {
    let Some(tok) = smollm2() else { return };
    let text = "Hi 😀👍🏽 ok";
    let ids = tok.encode(text, false, false).unwrap();
    // The emoji really is split: some token is not valid UTF-8 on its own.
    assert!(ids
        .iter()
        .any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()));
    let mut dec = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        if let Some(s) = dec.push(tok, id) {
            assert!(!s.contains('\u{fffd}'), "emitted a broken character: {s:?}");
            out.push_str(&s);
        }
    }
    out.push_str(&dec.finish());
    assert_eq!(out, text);
}
