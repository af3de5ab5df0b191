//! Time per activation column of the panel matmul against the number of columns (one
//! thread), on SmolLM2's ffn_up shape: how much of a small batch's cost is the panel fill.
//! `cargo run --release -p microllm-kernels --example panel_cols`
use std::time::Instant;

use microllm_gguf::GgmlType;
use microllm_kernels::{panel, Kernels};

fn main() {
    let k = Kernels::detect();
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
        let a_row = panel::act_row_bytes(kk);
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
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t0 = Instant::now();
                for _ in 0..iters {
                    k.gemm_panel(ty, kk, &w, n_rows, &act, n_cols, &mut out, n_rows);
                }
                best = best.min(t0.elapsed().as_secs_f64() / iters as f64);
            }
            let gf = 2.0 * (n_rows * kk * n_cols) as f64 / best / 1e9;
            println!(
                "{:?} cols {n_cols:>2}: {:>7.1} us/call {:>6.2} us/col {gf:>6.1} GFLOP/s",
                ty,
                best * 1e6,
                best * 1e6 / n_cols as f64
            );
        }
    }
}
