//! Tests on tiny vocabularies built in the test: the algorithms' rules, metadata reading and
//! errors, without the reference models.

use microllm_gguf::{MetaValue, Metadata};
use microllm_tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerError, TokenizerSpec};

/// A SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then `pieces`
/// (text, score, type).
fn spm(pieces: &[(&str, f32, i32)], add_space_prefix: Option<bool>) -> Tokenizer {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut scores = vec![0.0; 3];
    let mut types = vec![2, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for &(t, s, ty) in pieces {
        tokens.push(t.to_owned());
        scores.push(s);
        types.push(ty);
    }
    Tokenizer::from_spec(TokenizerSpec {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        add_space_prefix,
        ..Default::default()
    })
    .unwrap()
}

fn texts(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| tok.token_text(id).to_owned())
        .collect()
}

#[test]
fn spm_merges_the_highest_score_first() {
    let tok = spm(
        &[
            ("a", -1.0, 1),
            ("b", -1.0, 1),
            ("c", -1.0, 1),
            ("ab", -2.0, 1),
            ("bc", -1.5, 1),
        ],
        Some(false),
    );
    // "bc" (-1.5) beats "ab" (-2.0), although "ab" is further left.
    let ids = tok.encode("abc", false, false).unwrap();
    assert_eq!(texts(&tok, &ids), ["a", "bc"]);
}

#[test]
fn spm_ties_go_to_the_leftmost_pair() {
    let tok = spm(&[("a", -1.0, 1), ("aa", -1.0, 1)], Some(false));
    let ids = tok.encode("aaa", false, false).unwrap();
    assert_eq!(texts(&tok, &ids), ["aa", "a"]);
}

#[test]
fn spm_space_prefix_bos_and_byte_fallback() {
    let tok = spm(
        &[
            ("\u{2581}", -1.0, 1),
            ("a", -1.0, 1),
            ("\u{2581}a", -0.5, 1),
            ("\n", 0.0, 4),
        ],
        None, // llama.cpp's default for "llama" vocabularies: add the space prefix
    );
    assert!(tok.add_bos());
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    // BOS, then " a" -> "▁a"; é is not in the vocabulary: its two UTF-8 bytes.
    let ids = tok.encode("a é", true, false).unwrap();
    assert_eq!(
        texts(&tok, &ids),
        ["<s>", "\u{2581}a", "\u{2581}", "<0xC3>", "<0xA9>"]
    );
    assert_eq!(tok.decode(&ids[1..]), "a é");
    // The space prefix is added again after a special token (here the user-defined "\n").
    let ids = tok.encode("a\na", false, false).unwrap();
    assert_eq!(texts(&tok, &ids), ["\u{2581}a", "\n", "\u{2581}a"]);
    // Control tokens are parsed only with parse_special.
    let ids = tok.encode("</s>", false, true).unwrap();
    assert_eq!(ids, [2]);
    let ids = tok.encode("</s>", false, false).unwrap();
    assert!(!ids.contains(&2));
    assert_eq!(tok.decode(&ids), "</s>");
}

#[test]
fn spm_stream_decoder_reassembles_byte_tokens() {
    let tok = spm(&[("a", -1.0, 1)], Some(false));
    let ids = tok.encode("a😀", false, false).unwrap();
    assert_eq!(ids.len(), 5); // "a" + 4 byte tokens
    let mut dec = StreamDecoder::new();
    let out: Vec<Option<String>> = ids.iter().map(|&id| dec.push(&tok, id)).collect();
    assert_eq!(out, [Some("a".into()), None, None, None, Some("😀".into())]);
    // Flushing in the middle of a character gives a replacement character.
    assert_eq!(dec.push(&tok, ids[1]), None);
    assert_eq!(dec.finish(), "\u{fffd}");
}

/// GPT-2's byte -> character mapping, written out independently of the crate's.
fn byte_char(b: u8) -> char {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let b = u32::from(b);
    if printable(b) {
        return char::from_u32(b).unwrap();
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A byte-level BPE vocabulary: the 256 byte characters (id = byte), then `extra` with the
/// merges that build them, then `specials` as control tokens.
fn gpt2(pre: &str, merges: &[&str], specials: &[&str]) -> Tokenizer {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![1; 256];
    for m in merges {
        let t = m.replace(' ', "");
        if !tokens.contains(&t) {
            tokens.push(t);
            types.push(1);
        }
    }
    for s in specials {
        tokens.push((*s).to_owned());
        types.push(3);
    }
    // BOS = EOS = the last token (only used when the pre-tokenizer's defaults add BOS).
    let last = tokens.len() as u32 - 1;
    Tokenizer::from_spec(TokenizerSpec {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        token_types: Some(types),
        merges: Some(merges.iter().map(|m| (*m).to_owned()).collect()),
        eos_id: Some(last),
        bos_id: Some(last),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn gpt2_merges_by_rank_within_pre_tokens() {
    let tok = gpt2(
        "gpt-2",
        &["h e", "l l", "he ll", "hell o", "Ġ hello"],
        &["<|end|>"],
    );
    let ids = tok.encode("hello hello", false, false).unwrap();
    assert_eq!(texts(&tok, &ids), ["hello", "Ġhello"]);
    assert_eq!(tok.decode(&ids), "hello hello");
    assert!(!tok.add_bos(), "gpt2 vocabularies add no BOS unless asked");
    // The special token, and end of generation.
    let end = tok.token_id("<|end|>").unwrap();
    assert_eq!(
        tok.encode("hello<|end|>", false, true).unwrap().last(),
        Some(&end)
    );
    assert!(tok.is_eog(end));
    assert_eq!(tok.token_type(end), Some(TokenType::Control));
}

#[test]
fn smollm_pre_tokenizer_splits_every_digit() {
    let merges = ["1 2", "12 3"];
    let digits = |pre: &str| {
        let tok = gpt2(pre, &merges, &[]);
        let ids = tok.encode("123", false, false).unwrap();
        texts(&tok, &ids)
    };
    assert_eq!(digits("smollm"), ["1", "2", "3"]);
    assert_eq!(digits("gpt-2"), ["123"]);
    assert_eq!(digits("llama-bpe"), ["123"]);
    assert_eq!(digits("qwen2"), ["1", "2", "3"]);
}

#[test]
fn non_ascii_merges_are_used() {
    // "é" is C3 A9: two byte characters that a merge joins.
    let merge = format!("{} {}", byte_char(0xc3), byte_char(0xa9));
    let tok = gpt2("gpt-2", &[merge.as_str()], &[]);
    let ids = tok.encode("é", false, false).unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(tok.token_bytes(ids[0]), "é".as_bytes());
}

fn metadata(entries: Vec<(&str, MetaValue)>) -> Metadata {
    let mut md = Metadata::new();
    for (k, v) in entries {
        md.insert(k, v);
    }
    md
}

#[test]
fn reads_the_spec_from_gguf_metadata() {
    let tokens: Vec<String> = [
        "<unk>",
        "<s>",
        "</s>",
        "\u{2581}",
        "h",
        "i",
        "\u{2581}h",
        "\u{2581}hi",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let md = metadata(vec![
        ("tokenizer.ggml.model", "llama".into()),
        ("tokenizer.ggml.tokens", tokens.clone().into()),
        (
            "tokenizer.ggml.scores",
            vec![0.0f32, 0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -3.0].into(),
        ),
        (
            "tokenizer.ggml.token_type",
            vec![2i32, 3, 3, 1, 1, 1, 1, 1].into(),
        ),
        ("tokenizer.ggml.bos_token_id", 1u32.into()),
        ("tokenizer.ggml.eos_token_id", 2u32.into()),
        ("tokenizer.ggml.add_bos_token", false.into()),
        ("tokenizer.ggml.add_space_prefix", true.into()),
        ("tokenizer.chat_template", "{{ messages }}".into()),
    ]);
    let spec = TokenizerSpec::from_gguf(&md).unwrap();
    assert_eq!(spec.model, "llama");
    assert_eq!(spec.tokens, tokens);
    assert_eq!(
        spec.token_types.as_deref(),
        Some(&[2, 3, 3, 1, 1, 1, 1, 1][..])
    );
    assert_eq!(spec.bos_id, Some(1));
    assert_eq!(spec.add_bos, Some(false));
    assert_eq!(spec.pre, None);
    assert_eq!(spec.chat_template.as_deref(), Some("{{ messages }}"));
    let tok = Tokenizer::from_gguf(&md).unwrap();
    assert!(!tok.add_bos());
    // "▁hi" is reached through "▁h"; "x" is not in the vocabulary and there are no byte
    // tokens, so it becomes <unk>.
    assert_eq!(tok.encode("hi", true, true).unwrap(), [7]);
    assert_eq!(tok.encode("hix", true, true).unwrap(), [7, 0]);
    assert_eq!(tok.decode(&[7]), "hi");
}

#[test]
fn metadata_errors_say_what_is_wrong() {
    let base = |model: &str| {
        vec![
            ("tokenizer.ggml.model", MetaValue::from(model)),
            (
                "tokenizer.ggml.tokens",
                vec!["a".to_owned(), "b".to_owned()].into(),
            ),
        ]
    };
    let err = |md: Metadata| Tokenizer::from_gguf(&md).unwrap_err();

    let e = err(Metadata::new());
    assert!(
        matches!(
            e,
            TokenizerError::MissingKey {
                key: "tokenizer.ggml.model",
                ..
            }
        ),
        "{e}"
    );

    let e = err(metadata(base("bert")));
    assert!(matches!(e, TokenizerError::UnsupportedModel { .. }), "{e}");
    assert!(e.to_string().contains("\"bert\""));

    let e = err(metadata(base("gpt2")));
    assert!(matches!(e, TokenizerError::MissingMerges), "{e}");

    let mut m = base("gpt2");
    m.push(("tokenizer.ggml.merges", vec!["a b".to_owned()].into()));
    m.push(("tokenizer.ggml.pre", "no-such-pre".into()));
    let e = err(metadata(m));
    assert!(matches!(e, TokenizerError::UnsupportedPre { .. }), "{e}");

    let mut m = base("llama");
    m.push(("tokenizer.ggml.scores", vec![0.0f32].into()));
    let e = err(metadata(m));
    assert!(
        matches!(
            e,
            TokenizerError::LengthMismatch {
                expected: 2,
                got: 1,
                ..
            }
        ),
        "{e}"
    );

    let mut m = base("llama");
    m.push(("tokenizer.ggml.token_type", "oops".into()));
    let e = err(metadata(m));
    assert!(matches!(e, TokenizerError::Metadata { .. }), "{e}");

    // BPE with add_bos but no BOS id.
    let mut m = base("gpt2");
    m.push(("tokenizer.ggml.merges", vec!["a b".to_owned()].into()));
    m.push(("tokenizer.ggml.add_bos_token", true.into()));
    let e = err(metadata(m));
    assert!(
        matches!(e, TokenizerError::MissingSpecialToken { .. }),
        "{e}"
    );

    let e = Tokenizer::from_spec(TokenizerSpec {
        model: "llama".into(),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(e, TokenizerError::EmptyVocab), "{e}");
}
