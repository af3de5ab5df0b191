//! Bit-exactness against llama.cpp's AVX2 build, from a saved fixture (no llama.cpp needed).
//!
//! `tests/fixtures/kquants/llama-avx2.bin` was written by `tools/fixtures/kquant_dot.cpp`
//! (see the README beside it): ggml's quantizers (`llama-quantize`'s code path, with and
//! without an importance matrix), the Q8_K activation quantizer, the dequantizers, and
//! one-node `ggml_mul_mat` graphs run by ggml-cpu exactly as llama.cpp runs them (repacked
//! Q4_K, tiled K-quant matmul, llamafile sgemm, vec_dot), on deterministic inputs that
//! `common::llama_gen` regenerates. Every comparison is on bits, on every kernel path.

mod common;

use common::llama_gen::{fnv1a, gen, gen_imatrix, parse, Record};
use common::*;
use microllm_gguf::GgufFile;
use microllm_kernels::{reference, GgmlType, KernelPath, Kernels};
use std::path::Path;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/kquants/llama-avx2.bin"
);
const GEMMA: &str = "/root/.cache/microllm-ref/gemma-3-270m-q4_k_m.gguf";
const SMOLLM2: &str = "/root/.cache/microllm-ref/SmolLM2-135M-Instruct.Q4_1.gguf";

fn records() -> Vec<Record> {
    parse(&std::fs::read(FIXTURE).expect("fixture present (tools/fixtures/kquant_fixtures.sh)"))
}

fn ty(r: &Record) -> GgmlType {
    GgmlType::from_id(r.ty).expect("known ggml type")
}

#[test]
fn quantizers_match_llama_quantize_bytes() {
    let mut checked = 0;
    for r in records().iter().filter(|r| r.kind == 0) {
        let t = ty(r);
        let x = gen(r.seed, r.rows, r.k, 0.05, true);
        let im = gen_imatrix(r.seed + 7, r.k);
        let weights = (r.cols == 1).then_some(&im[..]);
        let rs = row_size(t, r.k);
        for row in 0..r.rows {
            let mut q = vec![0u8; rs];
            reference::quantize_row_weighted(t, &x[row * r.k..(row + 1) * r.k], weights, &mut q)
                .unwrap();
            assert_eq!(
                fnv1a(&q),
                r.values[row],
                "{} row {row} (shape {}) {}: bytes differ from llama.cpp's",
                t.name(),
                row % 8,
                if weights.is_some() {
                    "with imatrix"
                } else {
                    "without imatrix"
                }
            );
            // The Kernels entry points agree with the reference.
            for k in all_paths() {
                let mut q2 = vec![0u8; rs];
                k.quantize_row_weighted(t, &x[row * r.k..(row + 1) * r.k], weights, &mut q2)
                    .unwrap();
                assert_eq!(q2, q);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * 2 * 32, "every quantizer record checked");
}

#[test]
fn dequantizers_match_llama() {
    let mut checked = 0;
    for r in records().iter().filter(|r| r.kind == 2) {
        let t = ty(r);
        let x = gen(r.seed, r.rows, r.k, 0.05, true);
        let rs = row_size(t, r.k);
        for row in 0..r.rows {
            let q = quant(t, &x[row * r.k..(row + 1) * r.k]);
            assert_eq!(q.len(), rs);
            for k in all_paths() {
                let mut y = vec![0f32; r.k];
                k.dequantize_row(t, &q, &mut y).unwrap();
                let bytes: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
                assert_eq!(
                    fnv1a(&bytes),
                    r.values[row],
                    "{} row {row} on {}",
                    t.name(),
                    k.path()
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * 32);
}

#[test]
fn q8_k_activations_match_ggml_cpu() {
    let recs = records();
    let r = recs.iter().find(|r| r.kind == 1).expect("q8_K record");
    let x = gen(r.seed, r.rows, r.k, 1.0, true);
    for k in all_paths() {
        for row in 0..r.rows {
            let mut q = vec![0u8; row_size(GgmlType::Q8_K, r.k)];
            k.quantize_activation(GgmlType::Q8_K, &x[row * r.k..(row + 1) * r.k], &mut q)
                .unwrap();
            assert_eq!(fnv1a(&q), r.values[row], "row {row} on {}", k.path());
        }
    }
}

/// Rows `0..n` of tensor `name` in a model file, or None (with a message) if it is absent.
fn model_rows(file: &str, name: &str, t: GgmlType, k: usize, n: usize) -> Option<Vec<u8>> {
    if !Path::new(file).exists() {
        eprintln!("SKIP {name}: reference model {file} is absent (CI fetches it)");
        return None;
    }
    let f = GgufFile::open(Path::new(file)).expect("model opens");
    let tensor = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(tensor.ty, t, "{name}");
    assert_eq!(tensor.row_len() as usize, k, "{name}");
    Some(f.tensor_data(tensor)[..n * row_size(t, k)].to_vec())
}

#[test]
fn matmuls_match_llama_bit_for_bit() {
    let recs = records();
    let mut n_cases = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut by_name: Vec<(String, usize)> = Vec::new();
    for r in recs.iter().filter(|r| r.kind == 3) {
        let t = ty(r);
        let w = if let Some(seed) = r.name.strip_prefix("synthetic:") {
            let seed: u64 = seed.parse().unwrap();
            quant(t, &gen(seed, r.rows, r.k, 0.05, false))
        } else {
            let (file, name) = match r.name.split_once(':').unwrap() {
                ("gemma3", n) => (GEMMA, n),
                ("smollm2", n) => (SMOLLM2, n),
                other => panic!("unknown source {other:?}"),
            };
            match model_rows(file, name, t, r.k, r.rows) {
                Some(w) => w,
                None => continue,
            }
        };
        let x = gen(r.seed, r.cols, r.k, 1.0, false);
        // The scalar reference follows llama.cpp's x86 order for the K-quants only (the
        // legacy formats' reference is ggml's generic loop).
        let is_k = reference::k_order(t, 1, 0).is_some();
        for kern in all_paths()
            .into_iter()
            .filter(|k| is_k || k.path() != KernelPath::Scalar)
        {
            let a_ty = kern.vec_dot_type(t).unwrap();
            let ar = row_size(a_ty, r.k);
            let mut act = vec![0u8; r.cols * ar];
            for c in 0..r.cols {
                kern.quantize_activation(
                    a_ty,
                    &x[c * r.k..(c + 1) * r.k],
                    &mut act[c * ar..(c + 1) * ar],
                )
                .unwrap();
            }
            let mut out = vec![f32::NAN; r.rows * r.cols];
            kern.gemm(t, r.k, &w, r.rows, &act, r.cols, &mut out, r.rows);
            let mut bad = Vec::new();
            for (i, (got, want)) in out.iter().zip(&r.values).enumerate() {
                if got.to_bits() as u64 != *want {
                    bad.push((i % r.rows, i / r.rows, *got, f32::from_bits(*want as u32)));
                }
            }
            if !bad.is_empty() {
                failures.push(format!(
                    "{} ({}) k={} cols={} on {}: {} of {} outputs differ from llama.cpp, first \
                     (row, col, ours, llama): {:?}",
                    r.name,
                    t.name(),
                    r.k,
                    r.cols,
                    kern.path(),
                    bad.len(),
                    out.len(),
                    &bad[..bad.len().min(3)]
                ));
            }
            assert!(
                bad.is_empty() || std::env::var("KQ_ALL").is_ok(),
                "{} ({}) k={} cols={} on {}: {} of {} outputs differ from llama.cpp, first \
                 (row, col, ours, llama): {:?}",
                r.name,
                t.name(),
                r.k,
                r.cols,
                kern.path(),
                bad.len(),
                out.len(),
                &bad[..bad.len().min(4)]
            );
        }
        n_cases += 1;
        match by_name.iter_mut().find(|(n, _)| *n == r.name) {
            Some(e) => e.1 += 1,
            None => by_name.push((r.name.clone(), 1)),
        }
    }
    for f in &failures {
        eprintln!("{f}");
    }
    assert!(failures.is_empty(), "{} mismatching cases", failures.len());
    eprintln!("bit-identical matmul cases: {by_name:?}");
    assert!(n_cases >= 10 * 11, "synthetic cases always run ({n_cases})");
}

#[test]
fn fixture_covers_every_k_format_and_path() {
    let recs = records();
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let cols: Vec<usize> = recs
            .iter()
            .filter(|r| r.kind == 3 && r.ty == t.id())
            .map(|r| r.cols)
            .collect();
        // Both sides of every order switch: 1..3 (gemv / vec_dot), 4 and 5 (repacked gemm
        // plus remainder), 7 and 8 (vec_dot -> tiled), 17 (tiled standard path).
        for need in [1, 3, 4, 5, 7, 8, 17] {
            assert!(cols.contains(&need), "{}: no {need}-column case", t.name());
        }
    }
    let _ = Kernels::detect();
}
