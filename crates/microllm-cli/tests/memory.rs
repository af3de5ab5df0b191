//! Memory on SmolLM2-135M (MICROLLM_TEST_SMOLLM2 = path to its GGUF; skipped with a note when
//! unset). Peak resident memory of `microllm run`: at most the model file, plus the KV cache,
//! plus 64 MiB for everything else (tokenizer, activations, code); `run --stats` reports the
//! process's own VmHWM at exit. And the Q8_0 KV cache, which halves the cache, costs under 1%
//! of perplexity.

use std::process::Command;

use serde_json::Value;

const SLACK: u64 = 64 << 20;

fn model() -> Option<String> {
    let m = std::env::var("MICROLLM_TEST_SMOLLM2").ok();
    if m.is_none() {
        eprintln!("skipping: set MICROLLM_TEST_SMOLLM2 to the SmolLM2-135M-Instruct GGUF");
    }
    m
}

/// `run --stats` on `model` with the extra flags; the stats line.
fn stats(model: &str, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_microllm"))
        .env_remove("MICROLLM_MODEL")
        .args([
            "run", "-m", model, "--temp", "0", "-n", "8", "--raw", "--stats",
        ])
        .args(extra)
        .arg("The capital of France is")
        .output()
        .expect("run microllm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "microllm run failed: {stderr}");
    let line = stderr.lines().last().expect("a stats line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn check_peak(model: &str, extra: &[&str]) -> Value {
    let s = stats(model, extra);
    let file = s["model_file_bytes"].as_u64().unwrap();
    let kv = s["kv_bytes"].as_u64().unwrap();
    let Some(peak) = s["peak_rss_bytes"].as_u64() else {
        eprintln!("skipping: this system does not report VmHWM");
        return s;
    };
    let bound = file + kv + SLACK;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{extra:?}: peak RSS {:.1} MiB; bound {:.1} MiB = file {:.1} + KV {:.1} + 64",
        mib(peak),
        mib(bound),
        mib(file),
        mib(kv)
    );
    assert!(
        peak <= bound,
        "peak RSS {:.1} MiB is over the bound {:.1} MiB (file {:.1} + KV {:.1} + 64)",
        mib(peak),
        mib(bound),
        mib(file),
        mib(kv)
    );
    s
}

#[test]
fn peak_rss_within_model_plus_kv_plus_64_mib() {
    let Some(m) = model() else { return };
    let f16 = check_peak(&m, &["--ctx", "2048"]);
    let q8 = check_peak(&m, &["--ctx", "2048", "--kv-type", "q8_0"]);
    // Q8_0 stores 34 bytes per 32 values instead of 64.
    assert_eq!(
        q8["kv_bytes"].as_u64().unwrap() * 64,
        f16["kv_bytes"].as_u64().unwrap() * 34
    );
    // The model's whole trained context fits too.
    check_peak(&m, &["--ctx", "8192", "--kv-type", "q8_0"]);
}

fn perplexity(model: &str, kv: &str) -> f64 {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/corpus/alice29.txt");
    let out = Command::new(env!("CARGO_BIN_EXE_microllm"))
        .env_remove("MICROLLM_MODEL")
        .args([
            "perplexity",
            "-m",
            model,
            "--chunks",
            "5",
            "--json",
            "--kv-type",
            kv,
            "-f",
        ])
        .arg(corpus)
        .output()
        .expect("run microllm");
    assert!(
        out.status.success(),
        "microllm perplexity failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("perplexity JSON");
    v["ppl"].as_f64().expect("ppl")
}

#[test]
fn q8_0_kv_cache_perplexity_within_one_percent_of_f16() {
    let Some(m) = model() else { return };
    let (f16, q8) = (perplexity(&m, "f16"), perplexity(&m, "q8_0"));
    eprintln!("perplexity over 5 chunks of 512: f16 KV {f16:.4}, q8_0 KV {q8:.4}");
    assert!(
        (q8 / f16 - 1.0).abs() < 0.01,
        "q8_0 KV perplexity {q8} vs f16 {f16}"
    );
}
