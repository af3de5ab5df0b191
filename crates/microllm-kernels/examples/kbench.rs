// Temporary: min-time microbenchmark (robust on a shared machine).
use microllm_kernels::{reference, GgmlType, Kernels};
use std::time::Instant;

fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let filter = args.get(1).cloned().unwrap_or_default();
    let k = Kernels::detect();
    let shapes: &[(&str, GgmlType, usize, usize)] = &[
        ("q8_0 49152x576", GgmlType::Q8_0, 49152, 576),
        ("q5_0 2048x640", GgmlType::Q5_0, 2048, 640),
        ("q4_0 16384x2048", GgmlType::Q4_0, 16384, 2048),
        ("q4_1 16384x2048", GgmlType::Q4_1, 16384, 2048),
        ("q4_k 640x2048", GgmlType::Q4_K, 640, 2048),
        ("q6_k 640x2048", GgmlType::Q6_K, 640, 2048),
        ("q4_k 16384x2048", GgmlType::Q4_K, 16384, 2048),
        ("q6_k 16384x2048", GgmlType::Q6_K, 16384, 2048),
        ("q5_k 16384x2048", GgmlType::Q5_K, 16384, 2048),
        ("q3_k 16384x2048", GgmlType::Q3_K, 16384, 2048),
        ("q2_k 16384x2048", GgmlType::Q2_K, 16384, 2048),
    ];
    for &(name, ty, rows, kk) in shapes {
        if !name.contains(&filter) {
            continue;
        }
        let base_rows = rows.min(256);
        let x = data(base_rows * kk, 1, 0.05);
        let rs = ty.row_size(kk as u64).unwrap() as usize;
        let mut base = vec![0u8; rs * base_rows];
        for (xr, o) in x.chunks(kk).zip(base.chunks_mut(rs)) {
            reference::quantize_row(ty, xr, o).unwrap();
        }
        let w: Vec<u8> = base.iter().copied().cycle().take(rs * rows).collect();
        for &cols in &[1usize, 64] {
            let at = k.vec_dot_type(ty).unwrap();
            let ar = at.row_size(kk as u64).unwrap() as usize;
            let xa = data(kk * cols, 2, 1.0);
            let mut act = vec![0u8; ar * cols];
            for (xr, o) in xa.chunks(kk).zip(act.chunks_mut(ar)) {
                k.quantize_activation(at, xr, o).unwrap();
            }
            let mut out = vec![0f32; rows * cols];
            let iters = if cols == 1 { 300 } else { 10 };
            let mut best = f64::MAX;
            for _ in 0..iters {
                let t = Instant::now();
                k.gemm(ty, kk, &w, rows, &act, cols, &mut out, rows);
                best = best.min(t.elapsed().as_secs_f64());
            }
            if cols == 1 {
                println!(
                    "{name:18} decode   {:8.1} us  {:6.2} GB/s",
                    best * 1e6,
                    w.len() as f64 / best / 1e9
                );
            } else {
                println!(
                    "{name:18} prefill64 {:8.1} us  {:6.1} GFLOP/s",
                    best * 1e6,
                    2.0 * (rows * kk * cols) as f64 / best / 1e9
                );
            }
        }
    }
}
