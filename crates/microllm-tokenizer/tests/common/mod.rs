//! Shared helpers of the golden tests: where the reference models and fixtures are.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use microllm_tokenizer::Tokenizer;

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The reference model `file`: `$<env_var>` if set, else /root/.cache/microllm-ref/<file>, else
/// ~/.cache/microllm/<file>. `None` (with the reason printed) when none exists, so that the
/// calling test can skip.
pub fn model_path(env_var: &str, file: &str) -> Option<PathBuf> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        tried.push(p);
    }
    let mut candidates = vec![Path::new("/root/.cache/microllm-ref").join(file)];
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/microllm").join(file));
    }
    for p in candidates {
        if p.is_file() {
            return Some(p);
        }
        tried.push(p);
    }
    eprintln!(
        "SKIPPED: reference model {file} not found (set {env_var}=/path/to/{file}; tried {tried:?})"
    );
    None
}

/// The tokenizer of a reference model, read through microllm-gguf; `None` if the file is absent.
pub fn load(env_var: &str, file: &str) -> Option<Tokenizer> {
    let path = model_path(env_var, file)?;
    let gguf = microllm_gguf::GgufFile::open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    Some(
        Tokenizer::from_gguf(gguf.metadata())
            .unwrap_or_else(|e| panic!("tokenizer of {}: {e}", path.display())),
    )
}

/// SmolLM2's tokenizer, loaded once per test binary.
pub fn smollm2() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| load("MICROLLM_TEST_SMOLLM2", SMOLLM2_FILE))
        .as_ref()
}

/// Gemma 3's tokenizer, loaded once per test binary.
pub fn gemma3() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| load("MICROLLM_TEST_GEMMA3", GEMMA3_FILE))
        .as_ref()
}

/// /work/main/tests/fixtures/<rel>.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let p = fixture(rel);
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("parsing {}: {e}", p.display()))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// (text, ids) pairs of a tokenize-strings.json.
pub fn string_cases(rel: &str) -> Vec<(String, Vec<u32>)> {
    read_json(rel)
        .as_array()
        .expect("a list of cases")
        .iter()
        .map(|c| (c["text"].as_str().expect("text").to_owned(), ids(&c["ids"])))
        .collect()
}

/// llama-tokenize's default escape processing (`common`'s `string_process_escapes`): the
/// reference ids of tokenize-strings.json were made from the text after it, so
/// `C:\path\to\file.txt` was tokenized with a tab in place of `\t`. Handles \n \r \t \' \"
/// \\ and \xHH; any other backslash is kept.
pub fn llama_cpp_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.peek().copied() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\'') => out.push('\''),
            Some('"') => out.push('"'),
            Some('\\') => out.push('\\'),
            Some('x') => {
                let rest: String = it.clone().skip(1).take(2).collect();
                match u8::from_str_radix(&rest, 16) {
                    Ok(b) if rest.len() == 2 && b < 0x80 => {
                        out.push(char::from(b));
                        it.nth(2);
                    }
                    _ => {
                        out.push('\\');
                        continue;
                    }
                }
            }
            _ => {
                out.push('\\');
                continue;
            }
        }
        it.next();
    }
    out
}

/// Asserts that two long texts are equal, showing only where they first differ.
pub fn assert_same_text(got: &str, want: &str) {
    if got == want {
        return;
    }
    let i = got
        .char_indices()
        .zip(want.chars())
        .find(|((_, a), b)| a != b)
        .map_or(got.len().min(want.len()), |((i, _), _)| i);
    let ctx = |s: &str| {
        s.get(i.saturating_sub(40)..(i + 40).min(s.len()))
            .unwrap_or("")
            .to_owned()
    };
    panic!(
        "texts differ at byte {i} (lengths {} and {}):\n got: {:?}\nwant: {:?}",
        got.len(),
        want.len(),
        ctx(got),
        ctx(want)
    );
}

/// The whole reference corpus.
pub fn corpus() -> String {
    let p = fixture("corpus/alice29.txt");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// First index where two id sequences differ, with context, for readable failures.
pub fn first_diff(tok: &Tokenizer, got: &[u32], want: &[u32]) -> Option<String> {
    let i = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or_else(|| (got.len() != want.len()).then_some(got.len().min(want.len())))?;
    let lo = i.saturating_sub(5);
    let show = |v: &[u32]| {
        v[lo.min(v.len())..(i + 6).min(v.len())]
            .iter()
            .map(|&id| format!("{id}:{:?}", tok.token_text(id)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Some(format!(
        "first difference at index {i} (got {} ids, want {})\n got: {}\nwant: {}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    ))
}
