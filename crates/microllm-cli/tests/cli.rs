//! The `microllm` binary end to end on the default model (SmolLM2-135M-Instruct Q4_1), which
//! the binary itself fetches into the store on first use. Expected values come from
//! tests/fixtures/ (llama.cpp's outputs, see the README there).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const MODEL: &str = "smollm2-135m-instruct";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_microllm"));
    c.env_remove("MICROLLM_MODEL")
        .env("MICROLLM_KERNELS", "auto");
    c
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run_ok(args: &[&str]) -> Output {
    let out = bin().args(args).output().expect("run microllm");
    assert!(
        out.status.success(),
        "microllm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_out(args: &[&str]) -> Value {
    let out = run_ok(args);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn fixture(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(rel)).unwrap()).unwrap()
}

#[test]
fn tokenize_corpus_matches_llama_cpp() {
    let corpus = fixtures().join("corpus/alice29.txt");
    let ids = json_out(&["tokenize", "-m", MODEL, "--file", corpus.to_str().unwrap()]);
    let want = fixture("smollm2/alice29-ids.json");
    let want = want.get("ids").unwrap_or(&want);
    assert_eq!(&ids, want);
}

#[test]
fn raw_greedy_run_matches_llama_cpp() {
    let cases = fixture("smollm2/greedy.json");
    let c = &cases[0];
    let v = json_out(&[
        "run",
        "-m",
        MODEL,
        "--exact",
        "--raw",
        "--temp",
        "0",
        "-n",
        "32",
        "--json",
        c["prompt"].as_str().unwrap(),
    ]);
    assert_eq!(v["prompt_tokens"], c["prompt_ids"]);
    assert_eq!(v["tokens"], c["generated_ids"]);
    assert_eq!(v["text"], c["generated_text"]);
    for k in ["load_ms", "prefill_tok_s", "decode_tok_s"] {
        assert!(v["timings"][k].as_f64().unwrap() > 0.0, "timing {k}: {v}");
    }
}

#[test]
fn chat_run_matches_llama_cpp() {
    let cases = fixture("smollm2/chat.json");
    for c in cases.as_array().unwrap() {
        let msgs = c["messages"].as_array().unwrap();
        if msgs.iter().any(|m| m["role"] == "assistant") {
            continue; // multi-turn: covered by the engine's chat test
        }
        let user = msgs.last().unwrap()["content"].as_str().unwrap();
        // The reference stops at <|im_end|> (included in its ids) or after 32 tokens.
        let n = c["generated_ids"].as_array().unwrap().len().to_string();
        let mut args = vec![
            "run", "-m", MODEL, "--exact", "--temp", "0", "-n", &n, "--json",
        ];
        if let Some(sys) = msgs.iter().find(|m| m["role"] == "system") {
            args.extend(["--system", sys["content"].as_str().unwrap()]);
        }
        args.push(user);
        let v = json_out(&args);
        assert_eq!(v["prompt_tokens"], c["prompt_ids"], "{user}");
        assert_eq!(v["tokens"], c["generated_ids"], "{user}");
    }
}

#[test]
fn perplexity_within_one_percent_of_llama_cpp() {
    // llama-perplexity -c 512 --chunks 20 on alice29.txt: 18.8170 (../shared/reference/README.md).
    let corpus = fixtures().join("corpus/alice29.txt");
    let v = json_out(&[
        "perplexity",
        "-m",
        MODEL,
        "-f",
        corpus.to_str().unwrap(),
        "--chunks",
        "20",
        "--json",
    ]);
    let ppl = v["ppl"].as_f64().unwrap();
    assert_eq!(v["n_chunks"], 20);
    assert!(
        (ppl / 18.8170 - 1.0).abs() < 0.01,
        "ppl {ppl} vs llama.cpp 18.8170"
    );
}

#[test]
fn inspect_and_bench_describe_the_model() {
    let out = run_ok(&["inspect", MODEL]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "architecture:   llama",
        "Q4_1",
        "context length: 8192",
        "kernels:",
    ] {
        assert!(text.contains(want), "inspect lacks {want:?}:\n{text}");
    }
    let v = json_out(&[
        "bench", "-m", MODEL, "-p", "16", "-n", "4", "-r", "1", "--json",
    ]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["test"], "pp16");
    assert_eq!(rows[1]["test"], "tg4");
    for r in rows {
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(r["model_n_params"].as_u64().unwrap() > 100_000_000);
        // The bandwidth probe: the median of its passes, never above their best.
        let (mem, best) = (
            r["mem_read_gbs"].as_f64().unwrap(),
            r["mem_read_best_gbs"].as_f64().unwrap(),
        );
        assert!(mem > 0.0 && mem <= best, "{r}");
    }
    // Generation reports the share of that bandwidth it reads weights at; prompts do not.
    assert!(rows[0]["read_share"].is_null());
    let (read, mem) = (
        rows[1]["read_gbs"].as_f64().unwrap(),
        rows[1]["mem_read_gbs"].as_f64().unwrap(),
    );
    let share = rows[1]["read_share"].as_f64().unwrap();
    assert!(
        (share - read / mem).abs() < 1e-9 && share > 0.0,
        "{}",
        rows[1]
    );
}

#[test]
fn bad_model_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let out = bin()
        .args(["run", "-m", bad.to_str().unwrap(), "--raw", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error:") && !err.contains("panicked"), "{err}");

    // A valid GGUF of an unsupported architecture names it and the supported list.
    let mut spec = microllm_testkit::TinySpec::llama();
    spec.n_layer = 1;
    let mut bytes = microllm_testkit::tiny_model_bytes(&spec);
    let needle = b"llama";
    let pos = bytes.windows(5).position(|w| w == needle).unwrap();
    bytes[pos..pos + 5].copy_from_slice(b"xllm0");
    let weird = dir.path().join("weird.gguf");
    std::fs::write(&weird, &bytes).unwrap();
    let out = bin()
        .args(["inspect", weird.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("xllm0") && err.contains("supported"), "{err}");
}

#[test]
fn a_context_that_cannot_fit_is_refused_before_loading() {
    let out = bin()
        .args(["run", "-m", MODEL, "--ctx", "50000000", "--raw", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["KV cache", "available", "--ctx", "--force"] {
        assert!(err.contains(want), "refusal lacks {want:?}: {err}");
    }
}
