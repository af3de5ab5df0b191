//! Kernel benchmarks on SmolLM2-135M shapes (n_embd 576, n_ff 1536, vocab 49152) and Gemma 3
//! 270M's (n_embd 640, n_ff 2048; K-quants), one thread.
//!
//! Decode (matvec, one column) is memory-bound: throughput is reported in weight bytes/s
//! (compare with the machine's ~17 GB/s DRAM read bandwidth; the 576-wide layers fit in L2,
//! so they can go faster). Prefill (gemm, 64 columns) is compute-bound: throughput is
//! reported in "elements"/s where one element = one FLOP (2 per multiply-add), i.e. GFLOP/s.
//!
//! `packed/...` runs the packed matmul (weights repacked once, as the model does at load),
//! the path decode and small batches take for the formats that pack.
//!
//! Run: `cargo bench -p microllm-kernels -- --quick` (add a filter such as `decode`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use microllm_kernels::{reference, GgmlType, KernelPath, Kernels};
use std::hint::black_box;

/// Deterministic pseudo-normal data.
fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..3 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            acc * scale
        })
        .collect()
}

fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_size(x.len() as u64).unwrap() as usize];
    reference::quantize_row(ty, x, &mut out).unwrap();
    out
}

struct Shape {
    name: &'static str,
    ty: GgmlType,
    n_rows: usize,
    k: usize,
}

const SHAPES: [Shape; 12] = [
    Shape {
        name: "attn_q_576x576_q4_1",
        ty: GgmlType::Q4_1,
        n_rows: 576,
        k: 576,
    },
    Shape {
        name: "ffn_up_1536x576_q4_1",
        ty: GgmlType::Q4_1,
        n_rows: 1536,
        k: 576,
    },
    Shape {
        name: "ffn_down_576x1536_q4_1",
        ty: GgmlType::Q4_1,
        n_rows: 576,
        k: 1536,
    },
    Shape {
        name: "lm_head_49152x576_q8_0",
        ty: GgmlType::Q8_0,
        n_rows: 49152,
        k: 576,
    },
    // Gemma 3 270M's ffn_up (n_ff 2048, n_embd 640) is Q5_0.
    Shape {
        name: "gemma_ffn_up_2048x640_q5_0",
        ty: GgmlType::Q5_0,
        n_rows: 2048,
        k: 640,
    },
    // Gemma 3 270M's K-quant matrices: ffn_down (n_embd 640 rows of n_ff 2048) is Q4_K or
    // Q6_K, attn_output (640 x 1024) Q4_K. These fit in L2; the `stream_` shapes below do not
    // (DRAM bandwidth).
    Shape {
        name: "gemma_ffn_down_640x2048_q4_k",
        ty: GgmlType::Q4_K,
        n_rows: 640,
        k: 2048,
    },
    Shape {
        name: "gemma_ffn_down_640x2048_q6_k",
        ty: GgmlType::Q6_K,
        n_rows: 640,
        k: 2048,
    },
    Shape {
        name: "gemma_attn_output_640x1024_q4_k",
        ty: GgmlType::Q4_K,
        n_rows: 640,
        k: 1024,
    },
    Shape {
        name: "stream_16384x2048_q4_k",
        ty: GgmlType::Q4_K,
        n_rows: 16384,
        k: 2048,
    },
    Shape {
        name: "stream_16384x2048_q6_k",
        ty: GgmlType::Q6_K,
        n_rows: 16384,
        k: 2048,
    },
    Shape {
        name: "stream_16384x2048_q5_k",
        ty: GgmlType::Q5_K,
        n_rows: 16384,
        k: 2048,
    },
    Shape {
        name: "stream_16384x2048_q3_k",
        ty: GgmlType::Q3_K,
        n_rows: 16384,
        k: 2048,
    },
];

/// A shape's weights. Throughput does not depend on the values: at most 512 rows are
/// quantized (the K-quant reference quantizers are slow) and repeated.
fn weights(s: &Shape) -> Vec<u8> {
    let base_rows = s.n_rows.min(512);
    let base = quantize(s.ty, &data(base_rows * s.k, 1, 0.05));
    base.iter()
        .copied()
        .cycle()
        .take(base.len() / base_rows * s.n_rows)
        .collect()
}

/// Decode in weight bytes read (`bytes`), batches in FLOPs.
fn throughput(s: &Shape, n_cols: usize, bytes: usize) -> Throughput {
    if n_cols == 1 {
        Throughput::Bytes(bytes as u64)
    } else {
        Throughput::Elements((2 * s.n_rows * s.k * n_cols) as u64)
    }
}

/// A matmul entry point of `Kernels` (`gemm`, `gemm_packed`: the same arguments).
type Matmul = fn(&Kernels, GgmlType, usize, &[u8], usize, &[u8], usize, &mut [f32], usize);

/// One benchmarked product: shape, weights (as the entry point wants them), activations.
struct Run<'a> {
    s: &'a Shape,
    w: &'a [u8],
    act: &'a [u8],
    n_cols: usize,
}

impl Run<'_> {
    fn bench(
        &self,
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        k: &Kernels,
        f: Matmul,
        out: &mut [f32],
    ) {
        let s = self.s;
        g.bench_function(BenchmarkId::from_parameter(k.path()), |b| {
            b.iter(|| {
                f(
                    k,
                    s.ty,
                    s.k,
                    black_box(self.w),
                    s.n_rows,
                    black_box(self.act),
                    self.n_cols,
                    out,
                    s.n_rows,
                );
                black_box(&out);
            })
        });
    }
}

fn paths() -> Vec<Kernels> {
    let mut v = Vec::new();
    if let Ok(k) = Kernels::with_path(KernelPath::Avx2) {
        v.push(k);
    }
    v.push(Kernels::with_path(KernelPath::Scalar).unwrap());
    v
}

fn bench_matmul(c: &mut Criterion) {
    for s in SHAPES {
        let w = weights(&s);
        for (mode, n_cols) in [("decode", 1usize), ("prefill64", 64)] {
            let mut g = c.benchmark_group(format!("{mode}/{}", s.name));
            g.throughput(throughput(&s, n_cols, w.len()));
            for k in paths() {
                // The scalar path on the big shapes takes seconds per iteration: skip it
                // there (the AVX2 numbers are what matters; scalar is shown on attn_q).
                if k.path() == KernelPath::Scalar && (s.n_rows * s.k * n_cols) > 576 * 576 * 64 {
                    continue;
                }
                let a_ty = k.vec_dot_type(s.ty).unwrap();
                let act = quantize(a_ty, &data(s.k * n_cols, 2, 1.0));
                let mut out = vec![0f32; s.n_rows * n_cols];
                let run = Run {
                    s: &s,
                    w: &w,
                    act: &act,
                    n_cols,
                };
                run.bench(&mut g, &k, Kernels::gemm, &mut out);
            }
            g.finish();
        }
    }
}

/// The packed matmul (`Kernels::pack` at load, then `gemm_packed`), the kernel decode and small
/// batches actually run, on the same shapes wherever the format packs: the AVX2 tiles and,
/// where the CPU has it, the AVX-512 VNNI ones (`packed/...`).
fn bench_packed(c: &mut Criterion) {
    let mut kerns: Vec<Kernels> = Vec::new();
    for path in [KernelPath::Avx2, KernelPath::Avx2Vnni] {
        if let Ok(k) = Kernels::with_path(path) {
            kerns.push(k);
        }
    }
    for s in SHAPES {
        let Some(kern0) = kerns.first() else { return };
        if !kern0.pack_supports(s.ty) {
            continue;
        }
        let w = weights(&s);
        let plen = kern0
            .packed_len(s.ty, s.k, s.n_rows)
            .expect("packable shape");
        let mut packed = vec![0u8; plen];
        assert!(kern0.pack(s.ty, s.k, &w, s.n_rows, &mut packed));
        for (mode, n_cols) in [("decode", 1usize), ("prefill64", 64)] {
            let mut g = c.benchmark_group(format!("packed/{mode}/{}", s.name));
            g.throughput(throughput(&s, n_cols, plen));
            let a_row = microllm_kernels::panel::act_row_bytes(s.k);
            let x = data(s.k * n_cols, 2, 1.0);
            let mut act = vec![0u8; a_row * n_cols];
            for (col, out) in act.chunks_exact_mut(a_row).enumerate() {
                kern0
                    .quantize_panel_act(&x[col * s.k..(col + 1) * s.k], out)
                    .unwrap();
            }
            let mut out = vec![0f32; s.n_rows * n_cols];
            for k in &kerns {
                let run = Run {
                    s: &s,
                    w: &packed,
                    act: &act,
                    n_cols,
                };
                run.bench(&mut g, k, Kernels::gemm_packed, &mut out);
            }
            g.finish();
        }
    }
}

fn bench_small(c: &mut Criterion) {
    let mut g = c.benchmark_group("activations");
    for k in paths() {
        let x = data(1536, 3, 1.0);
        let mut q = vec![0u8; 1536 / 32 * 36];
        g.throughput(Throughput::Elements(1536));
        g.bench_function(BenchmarkId::new("quantize_q8_1_1536", k.path()), |b| {
            b.iter(|| {
                k.quantize_row(GgmlType::Q8_1, black_box(&x), &mut q)
                    .unwrap()
            })
        });
        // Attention over a 512-token f16 KV cache, head_dim 64: scores then weighted sum.
        let keys: Vec<half::f16> = data(512 * 64, 4, 1.0)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let qv = data(64, 5, 1.0);
        let mut acc = vec![0f32; 64];
        g.throughput(Throughput::Elements(2 * 2 * 512 * 64));
        g.bench_function(BenchmarkId::new("attn_head_512x64_f16", k.path()), |b| {
            b.iter(|| {
                for row in keys.chunks_exact(64) {
                    let s = k.dot_f16_f32(row, black_box(&qv));
                    k.axpy_f16(&mut acc, s * 1e-3, row);
                }
                black_box(&acc);
            })
        });
    }
    g.finish();
}

/// Decode attention of one KV head's query group over a 2048-token f16 cache (GQA heads as
/// the rows of the tiled kernel): SmolLM2 (3 heads of 64 per KV head) and Gemma 3 270M (4
/// heads of 256). Throughput in FLOPs (scores and weighted sum: 4 per row, key and dim).
fn bench_decode_attn(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_attn");
    let n_kv = 2048;
    for (name, rows, d) in [("smollm2_3x64", 3, 64), ("gemma3_4x256", 4, 256)] {
        let kv: Vec<half::f16> = data(n_kv * d, 6, 1.0)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let q = data(rows * d, 7, 0.3);
        let last = vec![(n_kv - 1) as u32; rows];
        let mut out = vec![0f32; rows * d];
        g.throughput(Throughput::Elements((4 * rows * n_kv * d) as u64));
        for k in paths() {
            g.bench_function(BenchmarkId::new(name, k.path()), |b| {
                b.iter(|| {
                    k.attention_rows(
                        black_box(&q),
                        d,
                        &last,
                        0,
                        &kv,
                        d,
                        &kv,
                        d,
                        0.125,
                        0.0,
                        &mut out,
                        d,
                    );
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_matmul,
    bench_packed,
    bench_small,
    bench_decode_attn
);
criterion_main!(benches);
