//! Time per call of the panel matmul, the packed matmul (AVX2 and, where the CPU has it,
//! AVX-512 VNNI) and, for one column, llama.cpp's per-pair decode kernel (`gemm`), against the
//! number of activation columns (one thread), on SmolLM2's ffn_up shape: how much of a small
//! batch's cost is the panel fill, and what packing at load buys.
//! `cargo run --release -p microllm-kernels --example panel_cols`
use std::time::Instant;

use microllm_gguf::GgmlType;
use microllm_kernels::{panel, KernelPath, Kernels};

fn best_of(iters: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(t0.elapsed().as_secs_f64() / iters as f64);
    }
    best
}

fn main() {
    let k = Kernels::with_path(KernelPath::Avx2).unwrap_or_else(|_| Kernels::detect());
    let vnni = Kernels::with_path(KernelPath::Avx2Vnni).ok();
    let (n_rows, kk) = (1536usize, 576usize);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K] {
        let kk = if ty == GgmlType::Q4_K { 1024 } else { kk };
        let x: Vec<f32> = (0..n_rows.max(64) * kk)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let rb = ty.row_size(kk as u64).expect("row size") as usize;
        let mut w = vec![0u8; n_rows * rb];
        for r in 0..n_rows {
            k.quantize_row(ty, &x[r * kk..(r + 1) * kk], &mut w[r * rb..(r + 1) * rb])
                .unwrap();
        }
        let packed = k.packed_len(ty, kk, n_rows).map(|len| {
            let mut p = vec![0u8; len];
            assert!(k.pack(ty, kk, &w, n_rows, &mut p));
            p
        });
        let a_row = panel::act_row_bytes(kk);
        let bytes = w.len() as f64;
        for n_cols in [1usize, 2, 3, 4, 8, 12, 16, 32, 64] {
            let mut act = vec![0u8; n_cols * a_row];
            for c in 0..n_cols {
                k.quantize_panel_act(
                    &x[c * kk..(c + 1) * kk],
                    &mut act[c * a_row..(c + 1) * a_row],
                )
                .unwrap();
            }
            let mut out = vec![0f32; n_rows * n_cols];
            let iters = 2000 / n_cols.max(1) + 20;
            let panel = best_of(iters, || {
                k.gemm_panel(ty, kk, &w, n_rows, &act, n_cols, &mut out, n_rows)
            });
            let mut line = format!(
                "{ty:?} cols {n_cols:>2}: panel {:>7.1} us ({:>5.1} GB/s)",
                panel * 1e6,
                bytes / panel / 1e9
            );
            if let Some(p) = &packed {
                for (name, kern) in [("packed", Some(k)), ("vnni", vnni)] {
                    let Some(kern) = kern else { continue };
                    let t = best_of(iters, || {
                        kern.gemm_packed(ty, kk, p, n_rows, &act, n_cols, &mut out, n_rows)
                    });
                    line += &format!(
                        " | {name} {:>7.1} us ({:>5.1} GB/s)",
                        t * 1e6,
                        bytes / t / 1e9
                    );
                }
            }
            if n_cols == 1 {
                let vt = k.vec_dot_type(ty).expect("activation type");
                let ab = vt.row_size(kk as u64).unwrap() as usize;
                let mut a1 = vec![0u8; ab];
                k.quantize_activation(vt, &x[..kk], &mut a1).unwrap();
                let t = best_of(iters, || {
                    k.gemm(ty, kk, &w, n_rows, &a1, 1, &mut out, n_rows)
                });
                line += &format!(
                    " | gemm {:>7.1} us ({:>5.1} GB/s)",
                    t * 1e6,
                    bytes / t / 1e9
                );
            }
            println!("{line}");
        }
    }
}
