//! Decode-style streaming: one activation column against ~190 MB of SmolLM2-shaped weights
//! (beyond the L3 of most hosts; the packed copies on transparent huge pages, as the model's
//! packed arena is), on 1 and 2 threads, for llama.cpp's per-pair kernel (`gemm`) and the
//! packed matmul (AVX2, and VNNI where the CPU has it): the GB/s each reads weights from
//! memory at. `cargo run --release -p microllm-kernels --example packed_stream [TYPE [K [MB]]]`
//! (default Q4_1 with K = 576 over 190 MB; formats without a packed layout run `gemm` only).
//! A total that fits the L2 (`Q4_1 576 0.8`) measures the kernel's compute rate instead.
//! `MICROLLM_PREFETCH` is not read here: the VNNI column prefetches into L1, the default.
use std::time::Instant;

use microllm_gguf::GgmlType;
use microllm_kernels::{panel, KernelPath, Kernels};

fn main() {
    let avx2 = Kernels::with_path(KernelPath::Avx2).expect("AVX2");
    let vnni = Kernels::with_path(KernelPath::Avx2Vnni).ok();
    let mut args = std::env::args().skip(1);
    let ty = match args.next() {
        Some(name) => GgmlType::from_name(&name).expect("a GGML type name, e.g. Q4_K"),
        None => GgmlType::Q4_1,
    };
    let k: usize = args.next().map_or(576, |v| v.parse().expect("K, a number"));
    let total_mb: f64 = args
        .next()
        .map_or(190.0, |v| v.parse().expect("MB, a number"));
    let n_rows = 1536usize;
    let x: Vec<f32> = (0..n_rows * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let rb = ty.row_size(k as u64).unwrap() as usize;
    let mut w = vec![0u8; n_rows * rb];
    for r in 0..n_rows {
        avx2.quantize_row(ty, &x[r * k..(r + 1) * k], &mut w[r * rb..(r + 1) * rb])
            .unwrap();
    }
    let plen = avx2.packed_len(ty, k, n_rows).unwrap_or(0);
    let mut p = vec![0u8; plen];
    assert!(plen == 0 || avx2.pack(ty, k, &w, n_rows, &mut p));
    let copies = ((total_mb * 1e6) as usize / w.len()).max(1);
    let ws: Vec<Vec<u8>> = (0..copies).map(|_| w.clone()).collect();
    // The packed copies one after the other on transparent huge pages, as the model's
    // packed arena is (4 KiB pages cost a page walk every 4 KiB of the stream).
    let mut arena = memmap2::MmapMut::map_anon((copies * plen).max(1)).expect("an anonymous map");
    #[cfg(target_os = "linux")]
    let _ = arena.advise(memmap2::Advice::HugePage);
    for i in 0..copies {
        arena[i * plen..(i + 1) * plen].copy_from_slice(&p);
    }
    let ps: Vec<&[u8]> = (0..copies)
        .map(|i| &arena[i * plen..(i + 1) * plen])
        .collect();
    let a_row = panel::act_row_bytes(k);
    let mut act = vec![0u8; a_row];
    avx2.quantize_panel_act(&x[..k], &mut act).unwrap();
    let vt = avx2.vec_dot_type(ty).unwrap();
    let mut a1 = vec![0u8; vt.row_size(k as u64).unwrap() as usize];
    avx2.quantize_activation(vt, &x[..k], &mut a1).unwrap();
    let total = (copies * w.len()) as f64;
    for threads in [1usize, 2] {
        let run = |which: usize| -> f64 {
            let mut best = 0.0f64;
            let passes = (190_000_000 / (copies * w.len())).clamp(1, 100);
            for _ in 0..5 {
                let t0 = Instant::now();
                std::thread::scope(|s| {
                    for t in 0..threads {
                        let (ws, ps, act, a1) = (&ws, &ps, &act, &a1);
                        s.spawn(move || {
                            let half = n_rows / threads;
                            let (r0, n) = (t * half, half);
                            let mut out = vec![0f32; n];
                            for i in (0..passes).flat_map(|_| 0..copies) {
                                match which {
                                    0 => avx2.gemm(ty, k, &ws[i][r0 * rb..], n, a1, 1, &mut out, n),
                                    1 => avx2.gemm_packed(
                                        ty,
                                        k,
                                        &ps[i][r0 / 8 * (plen / (n_rows / 8))..],
                                        n,
                                        act,
                                        1,
                                        &mut out,
                                        n,
                                    ),
                                    _ => vnni.unwrap().gemm_packed(
                                        ty,
                                        k,
                                        &ps[i][r0 / 8 * (plen / (n_rows / 8))..],
                                        n,
                                        act,
                                        1,
                                        &mut out,
                                        n,
                                    ),
                                }
                            }
                        });
                    }
                });
                best = best.max(passes as f64 * total / t0.elapsed().as_secs_f64() / 1e9);
            }
            best
        };
        let mut line = format!("{threads} thread(s): gemm {:.1} GB/s", run(0));
        if plen > 0 {
            line += &format!(" | packed {:.1} GB/s", run(1));
        }
        if plen > 0 && vnni.is_some() {
            line += &format!(" | vnni {:.1} GB/s", run(2));
        }
        println!("{line}");
    }
}
