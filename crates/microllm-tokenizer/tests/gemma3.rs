//! Golden tests against llama.cpp on Gemma 3 270M (SentencePiece-style "llama" vocabulary).

mod common;

use common::*;
use microllm_tokenizer::{ChatTemplate, StreamDecoder, TokenizerError};

#[test]
fn reference_strings_match_llama_cpp() {
    let Some(tok) = gemma3() else { return };
    let mut failures = Vec::new();
    for (text, want) in string_cases("gemma3/tokenize-strings.json") {
        let got = tok.encode(&llama_cpp_escapes(&text), true, true).unwrap();
        if let Some(d) = first_diff(tok, &got, &want) {
            failures.push(format!("{text:?}: {d}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn corpus_matches_llama_cpp() {
    let Some(tok) = gemma3() else { return };
    let want = ids(&read_json("gemma3/alice29-ids.json"));
    let text = corpus();
    let t = std::time::Instant::now();
    let got = tok.encode(&text, true, true).unwrap();
    eprintln!("gemma3 corpus: {} ids in {:?}", got.len(), t.elapsed());
    if let Some(d) = first_diff(tok, &got, &want) {
        panic!("{d}");
    }
    // BOS, when added, is rendered as its text.
    let body = if tok.add_bos() { &got[1..] } else { &got[..] };
    assert_same_text(&tok.decode(body), &text);
}

#[test]
fn decode_inverts_encode() {
    let Some(tok) = gemma3() else { return };
    for (text, _) in string_cases("gemma3/tokenize-strings.json") {
        for parse_special in [false, true] {
            let ids = tok.encode(&text, false, parse_special).unwrap();
            assert_eq!(tok.decode(&ids), text, "parse_special={parse_special}");
        }
    }
}

#[test]
fn special_tokens_and_flags() {
    let Some(tok) = gemma3() else { return };
    assert_eq!(tok.vocab_size(), 262144);
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.eos_id(), Some(1));
    assert!(tok.add_bos());
    assert_eq!(tok.encode("", true, true).unwrap(), vec![2]);
    assert!(tok.is_eog(1));
    assert!(tok.is_eog(tok.token_id("<end_of_turn>").unwrap()));
    assert!(!tok.is_eog(tok.token_id("<start_of_turn>").unwrap()));
    // Control tokens only with parse_special; user-defined ones ("\n\n") always.
    let sot = tok.token_id("<start_of_turn>").unwrap();
    assert_eq!(
        tok.encode("<start_of_turn>", false, true).unwrap(),
        vec![sot]
    );
    assert!(!tok
        .encode("<start_of_turn>", false, false)
        .unwrap()
        .contains(&sot));
    let nn = tok.token_id("\n\n").unwrap();
    assert_eq!(tok.encode("a\n\nb", false, false).unwrap()[1], nn);
    // Byte-fallback tokens decode to their byte.
    assert_eq!(tok.token_bytes(tok.token_id("<0x0A>").unwrap()), b"\n");
    assert_eq!(
        tok.token_bytes(tok.token_id("\u{2581}the").unwrap()),
        b" the"
    );
}

#[test]
fn no_chat_template_is_a_clear_error() {
    let Some(tok) = gemma3() else { return };
    assert!(tok.chat_template().is_none());
    let e = ChatTemplate::for_model(tok).unwrap_err();
    assert!(matches!(e, TokenizerError::NoChatTemplate));
    assert!(e.to_string().contains("--chat-template"), "{e}");
}

#[test]
fn stream_decoder_joins_byte_fallback_tokens() {
    let Some(tok) = gemma3() else { return };
    // U+2003 is not in the vocabulary: three <0xXX> tokens.
    let text = "a\u{2003}b";
    let ids = tok.encode(text, false, false).unwrap();
    assert_eq!(ids.len(), 5, "{ids:?}");
    let mut dec = StreamDecoder::new();
    let pieces: Vec<Option<String>> = ids.iter().map(|&id| dec.push(tok, id)).collect();
    assert_eq!(
        pieces,
        vec![
            Some("a".to_owned()),
            None,
            None,
            Some("\u{2003}".to_owned()),
            Some("b".to_owned())
        ]
    );
    assert_eq!(dec.finish(), "");
}
