//! Real tensors from the SmolLM2 reference model (Q4_1 and Q8_0 bytes written by llama.cpp).
//! Skips with a message when the model file is absent.

mod common;

use common::*;
use microllm_gguf::GgufFile;
use microllm_kernels::{reference, GgmlType, Kernels};
use std::path::Path;

const MODEL: &str = "/root/.cache/microllm-ref/SmolLM2-135M-Instruct.Q4_1.gguf";

fn open() -> Option<GgufFile> {
    let path = Path::new(MODEL);
    if !path.exists() {
        eprintln!("SKIP: reference model {MODEL} is absent (CI fetches it)");
        return None;
    }
    Some(GgufFile::open(path).expect("reference model opens"))
}

/// (name, expected type, expected row length)
const TENSORS: [(&str, GgmlType, usize); 4] = [
    ("blk.0.attn_q.weight", GgmlType::Q4_1, 576),
    ("blk.7.ffn_down.weight", GgmlType::Q4_1, 1536),
    ("blk.29.ffn_up.weight", GgmlType::Q4_1, 576),
    ("token_embd.weight", GgmlType::Q8_0, 576),
];

/// Dequantized rows look like trained weights, agree across paths, and re-quantizing them
/// with our reference quantizer gives back llama.cpp's bytes: the bit layout (nibble order,
/// scale/min fields) and the rounding rules match ggml's.
#[test]
fn real_rows_dequantize_and_requantize_to_the_same_bytes() {
    let Some(f) = open() else { return };
    let paths = all_paths();
    for (name, ty, k) in TENSORS {
        let t = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.ty, ty, "{name}");
        assert_eq!(t.row_len() as usize, k, "{name}");
        let data = f.tensor_data(t);
        let rs = row_size(ty, k);
        let n_rows = t.n_rows() as usize;
        assert_eq!(data.len(), rs * n_rows);
        let (mut blocks, mut same) = (0usize, 0usize);
        for r in [0, 1, n_rows / 2, n_rows - 1] {
            let row = &data[r * rs..(r + 1) * rs];
            let y = dequant(ty, row, k);
            for kern in &paths {
                let mut y2 = vec![0f32; k];
                kern.dequantize_row(ty, row, &mut y2).unwrap();
                assert_eq!(y2, y, "{name} row {r} on {}", kern.path());
            }
            assert!(
                y.iter().all(|v| v.is_finite() && v.abs() < 16.0),
                "{name} row {r}: implausible values"
            );
            let mean_abs = y.iter().map(|v| v.abs()).sum::<f32>() / k as f32;
            assert!(
                (1e-3..1.0).contains(&mean_abs),
                "{name} row {r}: mean |w| = {mean_abs}"
            );
            let again = quant(ty, &y);
            let bs = rs / (k / 32);
            for (a, b) in row.chunks(bs).zip(again.chunks(bs)) {
                blocks += 1;
                same += (a == b) as usize;
            }
        }
        // f32 rounding of d = (max - min)/15 can, rarely, land on the other side of an f16
        // rounding boundary; in practice every block comes back identical.
        assert!(
            same * 1000 >= blocks * 999,
            "{name}: only {same}/{blocks} blocks re-quantize identically"
        );
        eprintln!("{name}: {same}/{blocks} blocks re-quantize to identical bytes");
    }
}

/// A real matvec slice: every path agrees with the f64 dot of the dequantized operands.
#[test]
fn real_matvec_against_dequantized_dot() {
    let Some(f) = open() else { return };
    let mut rng = Rng::new(20);
    for (name, ty, k) in TENSORS {
        let t = f.tensor(name).unwrap();
        let data = f.tensor_data(t);
        let rs = row_size(ty, k);
        let n_rows = 64;
        let w = &data[..rs * n_rows];
        let x = rng.vec(k, 1.0);
        let a_ty = Kernels::detect().vec_dot_type(ty).unwrap();
        let a = quant(a_ty, &x);
        let ad = dequant(a_ty, &a, k);
        for kern in all_paths() {
            let mut out = vec![0f32; n_rows];
            kern.gemm(ty, k, w, n_rows, &a, 1, &mut out, n_rows);
            for r in 0..n_rows {
                let wd = dequant(ty, &w[r * rs..(r + 1) * rs], k);
                let exact: f64 = wd.iter().zip(&ad).map(|(p, q)| *p as f64 * *q as f64).sum();
                // Q8_1's separately rounded s term: up to 2^-10 relative on sum(|m * s|) per
                // block, well under 1e-3 of sum(|w*a|) for real rows.
                let tol = 1e-3 * abs_dot(&wd, &ad);
                assert!(
                    (out[r] as f64 - exact).abs() <= tol,
                    "{name} row {r} on {}: {} vs {exact}",
                    kern.path(),
                    out[r]
                );
            }
            // And the quantized activations cost little accuracy against f32 activations.
            let wd0 = dequant(ty, &w[..rs], k);
            let full: f64 = wd0.iter().zip(&x).map(|(p, q)| *p as f64 * *q as f64).sum();
            assert!(
                (out[0] as f64 - full).abs() <= 0.02 * abs_dot(&wd0, &x),
                "{name}: activation quantization error too large"
            );
            let _ = reference::vec_dot(ty, k, &w[..rs], &a);
        }
    }
}

const GEMMA: &str = "/root/.cache/microllm-ref/gemma-3-270m-q4_k_m.gguf";

/// Gemma 3 270M Q4_K_M's K-quant tensors (written by llama-quantize): every path dequantizes
/// them identically to plausible trained weights, and the matvec of a real row agrees with
/// the f64 dot of the dequantized operands on every path (bit-identical across paths).
#[test]
fn gemma_k_quant_rows() {
    let path = Path::new(GEMMA);
    if !path.exists() {
        eprintln!("SKIP: reference model {GEMMA} is absent (CI fetches it)");
        return;
    }
    let f = GgufFile::open(path).expect("reference model opens");
    let paths = all_paths();
    let mut rng = Rng::new(21);
    for (name, ty, k) in [
        ("blk.0.ffn_down.weight", GgmlType::Q6_K, 2048),
        ("blk.2.ffn_down.weight", GgmlType::Q4_K, 2048),
        ("blk.0.attn_output.weight", GgmlType::Q4_K, 1024),
    ] {
        let t = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((t.ty, t.row_len() as usize), (ty, k), "{name}");
        let data = f.tensor_data(t);
        let rs = row_size(ty, k);
        let n_rows = 32;
        let x = rng.vec(k, 1.0);
        let a = quant(GgmlType::Q8_K, &x);
        let ad = dequant(GgmlType::Q8_K, &a, k);
        let mut outs = Vec::new();
        for kern in &paths {
            let mut out = vec![0f32; n_rows];
            kern.gemm(ty, k, &data[..n_rows * rs], n_rows, &a, 1, &mut out, n_rows);
            outs.push(out);
        }
        for r in 0..n_rows {
            let row = &data[r * rs..(r + 1) * rs];
            let y = dequant(ty, row, k);
            for kern in &paths {
                let mut y2 = vec![0f32; k];
                kern.dequantize_row(ty, row, &mut y2).unwrap();
                assert_eq!(y2, y, "{name} row {r} on {}", kern.path());
            }
            let mean_abs = y.iter().map(|v| v.abs()).sum::<f32>() / k as f32;
            assert!(
                y.iter().all(|v| v.is_finite() && v.abs() < 16.0)
                    && (1e-3..1.0).contains(&mean_abs),
                "{name} row {r}: implausible values (mean |w| {mean_abs})"
            );
            let exact: f64 = y.iter().zip(&ad).map(|(p, q)| *p as f64 * *q as f64).sum();
            let tol = 1e-5 * abs_dot(&y, &ad);
            for out in &outs {
                assert_eq!(
                    out[r].to_bits(),
                    outs[0][r].to_bits(),
                    "{name} row {r}: paths differ"
                );
                assert!(
                    (out[r] as f64 - exact).abs() <= tol,
                    "{name} row {r}: {} vs {exact}",
                    out[r]
                );
            }
        }
    }
}
