//! `microllm quantize | dequantize | imatrix | prune | kld | compare` end to end on tiny
//! random models: outputs, warnings and refusals.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use microllm_testkit::{write_tiny_model, TinySpec};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microllm"))
        .args(args)
        .env("MICROLLM_HOME", "/nonexistent-microllm-home")
        .output()
        .expect("run microllm")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny(dir: &Path) -> PathBuf {
    let p = dir.join("tiny-f32.gguf");
    write_tiny_model(&TinySpec::llama(), &p).unwrap();
    p
}

/// Text for the tiny byte-level vocabulary: a few thousand tokens.
fn text(dir: &Path) -> PathBuf {
    let p = dir.join("text.txt");
    let mut t = String::new();
    for i in 0..200 {
        t.push_str(&format!(
            "The quick brown fox {i} jumps over the lazy dog. "
        ));
    }
    std::fs::write(&p, t).unwrap();
    p
}

#[test]
fn quantize_refusals_are_clear_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let out = dir.path().join("out.gguf");

    let o = run(&["quantize", s(&m), s(&out), "Q9_9"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown type \"Q9_9\""),
        "{}",
        stderr(&o)
    );

    let o = run(&["quantize", s(&m), s(&m), "Q8_0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is the input file"), "{}", stderr(&o));

    let bad = dir.path().join("corrupt.gguf");
    let mut bytes = std::fs::read(&m).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, &bytes).unwrap();
    let o = run(&["quantize", s(&bad), s(&out), "Q8_0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    std::fs::write(&bad, b"not a model at all").unwrap();
    let o = run(&["quantize", s(&bad), s(&out), "Q8_0"]);
    assert!(stderr(&o).contains("not a GGUF file"), "{}", stderr(&o));

    let o = run(&[
        "quantize",
        s(&m),
        s(&out),
        "Q8_0",
        "--tensor-type",
        "attn_v",
    ]);
    assert!(stderr(&o).contains("bad --tensor-type"), "{}", stderr(&o));
    let o = run(&["dequantize", s(&m), s(&out), "--type", "Q4_0"]);
    assert!(!o.status.success());

    assert!(!out.exists());
    // Nothing half-written is left behind either.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn quantize_requantize_dequantize_prune_imatrix_kld_compare() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let txt = text(dir.path());
    let q8 = dir.path().join("q8.gguf");
    let o = run(&["quantize", s(&m), s(&q8), "Q8_0", "-t", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Requantizing works, with a warning.
    let q4 = dir.path().join("q4.gguf");
    let o = run(&["quantize", s(&q8), s(&q4), "q4_0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: requantizing"),
        "{}",
        stderr(&o)
    );

    let deq = dir.path().join("deq.gguf");
    let o = run(&["dequantize", s(&q4), s(&deq)]);
    assert!(o.status.success(), "{}", stderr(&o));

    let im = dir.path().join("im.gguf");
    let o = run(&[
        "imatrix",
        "-m",
        s(&m),
        "-f",
        s(&txt),
        "-c",
        "64",
        "--chunks",
        "4",
        "-o",
        s(&im),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let qim = dir.path().join("q4-im.gguf");
    let o = run(&["quantize", s(&m), s(&qim), "Q4_0", "--imatrix", s(&im)]);
    assert!(o.status.success(), "{}", stderr(&o));

    let pruned = dir.path().join("pruned.gguf");
    let o = run(&[
        "prune",
        s(&m),
        s(&pruned),
        "--drop-layers",
        "1",
        "-f",
        s(&txt),
        "-c",
        "64",
        "--chunks",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("<- dropped"), "{}", stderr(&o));
    let pruned2 = dir.path().join("pruned2.gguf");
    let o = run(&["prune", s(&m), s(&pruned2), "--drop-layers", "0,"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["prune", s(&m), s(&pruned2), "--drop-layers", "1"]);
    assert!(stderr(&o).contains("-f FILE"), "{}", stderr(&o));

    let o = run(&[
        "kld",
        "--base",
        s(&m),
        "-m",
        s(&m),
        "-f",
        s(&txt),
        "-c",
        "64",
        "--chunks",
        "3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kld_mean"].as_f64(), Some(0.0));
    assert_eq!(v["top1_agreement"].as_f64(), Some(1.0));

    let prefix = dir.path().join("cmp");
    let o = run(&[
        "compare",
        s(&m),
        s(&q8),
        s(&q4),
        s(&deq),
        s(&qim),
        s(&pruned),
        "-f",
        s(&txt),
        "-c",
        "64",
        "--chunks",
        "3",
        "--pp",
        "16",
        "--tg",
        "4",
        "-r",
        "1",
        "-o",
        s(&prefix),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(dir.path().join("cmp.md")).unwrap();
    assert_eq!(
        md.lines().filter(|l| l.starts_with("| ")).count(),
        7,
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cmp.json")).unwrap())
            .unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0]["kld"].as_f64(), Some(0.0));
    assert_eq!(rows[5]["n_layer"].as_u64(), Some(1));
    assert!(rows.iter().all(|r| r["tg_ts"].as_f64().unwrap() > 0.0));
    let svg = std::fs::read_to_string(dir.path().join("cmp.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the chart is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert_eq!(
        doc.descendants()
            .filter(|n| n.tag_name().name() == "circle")
            .count(),
        6
    );
}
