//! K-quants (Q2_K .. Q6_K, Q8_K): hand-built blocks, quantizer accuracy, and the AVX2 path
//! against the scalar reference at awkward lengths, bit for bit (both follow llama.cpp's x86
//! accumulation orders, so unlike the legacy formats there is no tolerance here). Agreement
//! with llama.cpp itself is in `llama_fixtures.rs`.

mod common;

use common::*;
use half::f16;
use microllm_kernels::blocks::{
    blocks_as_bytes, cast_blocks, scale_min_k4, BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_K,
    BlockQ6_K, BlockQ8_K, F16Le, QK_K,
};
use microllm_kernels::reference::{self, KOrder};
use microllm_kernels::{GgmlType, KernelError, Kernels};

fn h(v: f32) -> F16Le {
    F16Le::new(f16::from_f32(v))
}

/// Build bytes for a block type from a filled struct.
fn bytes<B: microllm_kernels::blocks::Block>(b: B) -> Vec<u8> {
    blocks_as_bytes(&[b]).to_vec()
}

#[test]
fn block_sizes_and_types() {
    for (ty, size) in [
        (GgmlType::Q2_K, 84),
        (GgmlType::Q3_K, 110),
        (GgmlType::Q4_K, 144),
        (GgmlType::Q5_K, 176),
        (GgmlType::Q6_K, 210),
        (GgmlType::Q8_K, 292),
    ] {
        assert_eq!(row_size(ty, QK_K), size, "{}", ty.name());
        assert_eq!(std::mem::size_of::<BlockQ8_K>(), 292);
    }
    let k = Kernels::detect();
    for ty in K_TYPES {
        assert!(k.supports(ty));
        assert_eq!(k.vec_dot_type(ty), Some(GgmlType::Q8_K), "{}", ty.name());
    }
    assert!(!k.supports(GgmlType::Q8_K));
    // Lengths must be whole super-blocks.
    let e = k
        .quantize_row(GgmlType::Q4_K, &[0.0; 100], &mut [0u8; 144])
        .unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::BadLength {
                expected: 256,
                got: 100,
                ..
            }
        ),
        "{e}"
    );
}

/// Element orders of the dequantizers, on blocks assembled field by field.
#[test]
fn hand_built_blocks_dequantize_in_ggml_order() {
    let k = Kernels::detect();
    // Q4_K: d = 1, dmin = 0.5; sub-block j has scale j + 1 and min j (both < 16, so only the
    // low 6 bits of bytes 0..8 and the nibbles of 8..12 are used); quant e = e % 16 stored at
    // qs[32 * (e / 64) + e % 32], low nibble for (e % 64) < 32.
    let mut b4 = BlockQ4_K {
        d: h(1.0),
        dmin: h(0.5),
        scales: [0; 12],
        qs: [0; 128],
    };
    for j in 0..8u8 {
        if j < 4 {
            b4.scales[j as usize] = j + 1;
            b4.scales[j as usize + 4] = j;
        } else {
            b4.scales[j as usize + 4] = (j + 1) | (j << 4);
        }
    }
    for e in 0..256 {
        let q = (e % 16) as u8;
        let i = 32 * (e / 64) + e % 32;
        b4.qs[i] |= if (e % 64) < 32 { q } else { q << 4 };
    }
    for j in 0..8 {
        assert_eq!(scale_min_k4(j, &b4.scales), (j as u8 + 1, j as u8));
    }
    let mut y = vec![0f32; 256];
    k.dequantize_row(GgmlType::Q4_K, &bytes(b4), &mut y)
        .unwrap();
    for e in 0..256 {
        let j = e / 32;
        let want = (j + 1) as f32 * (e % 16) as f32 - 0.5 * j as f32;
        assert_eq!(y[e], want, "Q4_K element {e}");
    }
    // Q5_K: the same plus the fifth bit of element e at bit e / 32 of qh[e % 32].
    let mut b5 = BlockQ5_K {
        d: b4.d,
        dmin: b4.dmin,
        scales: b4.scales,
        qh: [0; 32],
        qs: b4.qs,
    };
    for e in (0..256).filter(|e| e % 3 == 0) {
        b5.qh[e % 32] |= 1 << (e / 32);
    }
    k.dequantize_row(GgmlType::Q5_K, &bytes(b5), &mut y)
        .unwrap();
    for e in 0..256 {
        let j = e / 32;
        let q = (e % 16) + if e % 3 == 0 { 16 } else { 0 };
        assert_eq!(y[e], (j + 1) as f32 * q as f32 - 0.5 * j as f32, "Q5_K {e}");
    }
    // Q6_K: d = 0.25, group g scale g - 8; level e % 64 split into ql/qh.
    let mut b6 = BlockQ6_K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d: h(0.25),
    };
    for g in 0..16 {
        b6.scales[g] = g as i8 - 8;
    }
    for e in 0..256 {
        let q = (e % 64) as u8;
        let (hh, kk, l) = (e / 128, (e % 128) / 32, e % 32);
        let i = 64 * hh + 32 * (kk % 2) + l;
        b6.ql[i] |= (q & 15) << (4 * (kk / 2));
        b6.qh[32 * hh + l] |= (q >> 4) << (2 * kk);
    }
    k.dequantize_row(GgmlType::Q6_K, &bytes(b6), &mut y)
        .unwrap();
    for e in 0..256 {
        let want = 0.25 * ((e / 16) as f32 - 8.0) * ((e % 64) as f32 - 32.0);
        assert_eq!(y[e], want, "Q6_K {e}");
    }
    // Q2_K: d = 1, dmin = 2; group g scale g % 16, min 15 - g; level e % 4.
    let mut b2 = BlockQ2_K {
        scales: [0; 16],
        qs: [0; 64],
        d: h(1.0),
        dmin: h(2.0),
    };
    for g in 0..16u8 {
        b2.scales[g as usize] = g | ((15 - g) << 4);
    }
    for e in 0..256 {
        let (hh, kk, l) = (e / 128, (e % 128) / 32, e % 32);
        b2.qs[32 * hh + l] |= ((e % 4) as u8) << (2 * kk);
    }
    k.dequantize_row(GgmlType::Q2_K, &bytes(b2), &mut y)
        .unwrap();
    for e in 0..256 {
        let g = e / 16;
        let want = g as f32 * (e % 4) as f32 - 2.0 * (15 - g) as f32;
        assert_eq!(y[e], want, "Q2_K {e}");
    }
    // Q3_K: d = 0.5, group g 6-bit scale 32 + g - 8 (i.e. g - 8 after the bias); level e % 8
    // split into 2 low bits (qs) and the third bit (hmask).
    let mut b3 = BlockQ3_K {
        hmask: [0; 32],
        qs: [0; 64],
        scales: [0; 12],
        d: h(0.5),
    };
    for j in 0..16 {
        let lv = (32 + j as i32 - 8) as u8;
        if j < 8 {
            b3.scales[j] |= lv & 15;
        } else {
            b3.scales[j - 8] |= (lv & 15) << 4;
        }
        b3.scales[8 + j % 4] |= (lv >> 4) << (2 * (j / 4));
    }
    for e in 0..256 {
        let q = (e % 8) as u8;
        let (hh, kk, l) = (e / 128, (e % 128) / 32, e % 32);
        b3.qs[32 * hh + l] |= (q & 3) << (2 * kk);
        b3.hmask[l] |= (q >> 2) << (4 * hh + kk);
    }
    k.dequantize_row(GgmlType::Q3_K, &bytes(b3), &mut y)
        .unwrap();
    for e in 0..256 {
        let g = e / 16;
        let want = (0.5 * (g as f32 - 8.0)) * ((e % 8) as f32 - 4.0);
        assert_eq!(y[e], want, "Q3_K {e}");
    }
}

/// Q8_K by hand: the first element of largest magnitude fixes the sign of d; round half to
/// even; group sums.
#[test]
fn q8_k_hand_block() {
    let mut x = [0f32; 256];
    x[0] = 127.0; // positive max first: d = -1
    x[1] = -127.0;
    x[2] = 2.5; // -2.5 rounds to -2 (even)
    x[3] = 3.5; // -3.5 -> -4
    x[17] = -1.0;
    let q = quant(GgmlType::Q8_K, &x);
    let b = &cast_blocks::<BlockQ8_K>(&q).unwrap()[0];
    assert_eq!(b.d(), -1.0);
    assert_eq!(&b.qs[..4], &[-127, 127, -2, -4]);
    assert_eq!(b.qs[17], 1);
    assert_eq!(b.bsum(0), -127 + 127 - 2 - 4);
    assert_eq!(b.bsum(1), 1);
    let y = dequant(GgmlType::Q8_K, &q, 256);
    assert_eq!(&y[..4], &[127.0, -127.0, 2.0, 4.0]);
    // Zero block: all zero, sums included.
    assert!(quant(GgmlType::Q8_K, &[0.0; 256]).iter().all(|&v| v == 0));
}

/// Quantize -> dequantize error, relative to the row's RMS, stays within what each format's
/// bit budget allows, with and without importance weights.
#[test]
fn quantizers_are_accurate() {
    let mut rng = Rng::new(40);
    // Upper bounds on RMS(error) / RMS(x) for rows of normals with outliers.
    let bounds = [
        (GgmlType::Q2_K, 0.40),
        (GgmlType::Q3_K, 0.22),
        (GgmlType::Q4_K, 0.11),
        (GgmlType::Q5_K, 0.055),
        (GgmlType::Q6_K, 0.03),
    ];
    for (ty, bound) in bounds {
        for weighted in [false, true] {
            let x = rng.vec(1024, 0.02);
            let w: Vec<f32> = (0..1024).map(|_| rng.uniform().abs() + 0.1).collect();
            let mut q = vec![0u8; row_size(ty, 1024)];
            reference::quantize_row_weighted(ty, &x, weighted.then_some(&w[..]), &mut q).unwrap();
            let y = dequant(ty, &q, 1024);
            let err: f64 = x
                .iter()
                .zip(&y)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let sig: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
            let rel = (err / sig).sqrt();
            assert!(
                rel < bound,
                "{} weighted={weighted}: relative RMS error {rel}",
                ty.name()
            );
            eprintln!(
                "{} weighted={weighted}: relative RMS error {rel:.4}",
                ty.name()
            );
        }
    }
}

#[test]
fn importance_weights_are_checked_and_used() {
    let x: Vec<f32> = (0..512)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
        .collect();
    let mut out = vec![0u8; row_size(GgmlType::Q4_K, 512)];
    let e = reference::quantize_row_weighted(GgmlType::Q4_K, &x, Some(&[1.0; 100]), &mut out)
        .unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::BadLength {
                expected: 512,
                got: 100,
                ..
            }
        ),
        "{e}"
    );
    // Formats ggml quantizes the same with or without an imatrix ignore the weights.
    let w = vec![1.0f32; 512];
    for ty in [GgmlType::Q8_0, GgmlType::F16] {
        let mut a = vec![0u8; row_size(ty, 512)];
        let mut b = a.clone();
        reference::quantize_row_weighted(ty, &x, Some(&w), &mut a).unwrap();
        reference::quantize_row(ty, &x, &mut b).unwrap();
        assert_eq!(a, b, "{}", ty.name());
    }
    // The others change with the weights (a strongly skewed imatrix).
    let skew: Vec<f32> = (0..512)
        .map(|i| if i % 7 == 0 { 100.0 } else { 0.01 })
        .collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let mut a = vec![0u8; row_size(ty, 512)];
        let mut b = a.clone();
        reference::quantize_row_weighted(ty, &x, Some(&skew), &mut a).unwrap();
        reference::quantize_row(ty, &x, &mut b).unwrap();
        assert_ne!(a, b, "{}: the importance weights had no effect", ty.name());
        // The heavily weighted elements are reproduced better.
        let (ya, yb) = (dequant(ty, &a, 512), dequant(ty, &b, 512));
        let err = |y: &[f32]| -> f64 {
            (0..512)
                .filter(|i| i % 7 == 0)
                .map(|i| ((y[i] - x[i]) as f64).powi(2))
                .sum()
        };
        assert!(
            err(&ya) <= err(&yb),
            "{}: weighted error not smaller",
            ty.name()
        );
    }
}

#[test]
fn order_table_matches_llama_cpp_dispatch() {
    use GgmlType::*;
    let o = |t, n, c| reference::k_order(t, n, c).unwrap();
    for n in 1..4 {
        for c in 0..n {
            assert_eq!(o(Q4_K, n, c), KOrder::RepackGemv);
        }
    }
    assert_eq!(o(Q4_K, 4, 3), KOrder::RepackGemm);
    assert_eq!(o(Q4_K, 7, 3), KOrder::RepackGemm);
    assert_eq!(o(Q4_K, 7, 4), KOrder::RepackGemv);
    assert_eq!(o(Q4_K, 64, 63), KOrder::RepackGemm);
    for t in [Q2_K, Q3_K, Q5_K, Q6_K] {
        assert_eq!(o(t, 1, 0), KOrder::VecDot);
        assert_eq!(o(t, 7, 6), KOrder::VecDot);
        assert_eq!(o(t, 8, 0), KOrder::Tiled);
        assert_eq!(o(t, 300, 299), KOrder::Tiled);
    }
    assert_eq!(reference::k_order(Q8_0, 8, 0), None);
    assert_eq!(reference::k_order(Q8_K, 8, 0), None);
}

/// Rows mixing awkward activation shapes: exact ties after scaling, +max and -max both
/// present (either first), zeros, tiny and huge values.
fn awkward_acts(rng: &mut Rng, n: usize, i: usize) -> Vec<f32> {
    let mut x = rng.vec(n, 1.0);
    match i % 5 {
        0 => {
            // amax 127 -> iscale -1: halves are ties.
            for (j, v) in x.iter_mut().enumerate() {
                *v = (j % 255) as f32 - 127.0 + if j % 3 == 0 { 0.5 } else { 0.0 };
            }
            x[0] = 127.0;
        }
        1 => {
            x[5] = -9.0;
            x[9] = 9.0; // negative max first
        }
        2 => {
            x[5] = 9.0;
            x[9] = -9.0; // positive max first
        }
        3 => x.iter_mut().step_by(2).for_each(|v| *v = 0.0),
        _ => x.iter_mut().for_each(|v| *v *= 1e-20),
    }
    if n > 256 {
        x[256..512.min(n)].fill(0.0); // an all-zero super-block
    }
    x
}

#[test]
fn avx2_q8_k_activations_equal_reference_bytes() {
    let Some(k) = avx2() else { return };
    let mut rng = Rng::new(41);
    for n in K_LENS {
        for i in 0..10 {
            let x = awkward_acts(&mut rng, n, i);
            let want = quant(GgmlType::Q8_K, &x);
            let mut got = vec![0u8; want.len()];
            k.quantize_activation(GgmlType::Q8_K, &x, &mut got).unwrap();
            assert_eq!(got, want, "n={n} case {i}");
            k.quantize_row(GgmlType::Q8_K, &x, &mut got).unwrap();
            assert_eq!(got, want, "quantize_row n={n} case {i}");
        }
    }
}

#[test]
fn avx2_dequantize_equals_reference() {
    let Some(k) = avx2() else { return };
    let mut rng = Rng::new(42);
    for n in K_LENS {
        for ty in K_TYPES {
            let b = random_weight_bytes(&mut rng, ty, n);
            let mut got = vec![f32::NAN; n];
            k.dequantize_row(ty, &b, &mut got).unwrap();
            assert_eq!(got, dequant(ty, &b, n), "{} n={n}", ty.name());
        }
    }
}

/// Weights for the dot tests: random bit patterns (every level, extreme scales) or quantized
/// rows.
fn weights(rng: &mut Rng, ty: GgmlType, n: usize, rows: usize, trial: usize) -> Vec<u8> {
    if trial.is_multiple_of(2) {
        random_weight_bytes(rng, ty, n * rows)
    } else {
        let x = rng.vec(n * rows, 0.05);
        let mut out = vec![0u8; row_size(ty, n) * rows];
        for (xr, o) in x.chunks(n).zip(out.chunks_mut(row_size(ty, n))) {
            reference::quantize_row(ty, xr, o).unwrap();
        }
        out
    }
}

fn acts(rng: &mut Rng, n: usize, cols: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in 0..cols {
        out.extend(quant(GgmlType::Q8_K, &awkward_acts(rng, n, c + 7)));
    }
    out
}

/// AVX2 vec_dot is bit-identical to the reference at 256 x {1,2,3,7,9}, and close to the f64
/// dot of the dequantized operands.
#[test]
fn avx2_vec_dot_equals_reference_bits() {
    let kernels = all_paths();
    let mut rng = Rng::new(43);
    for n in K_LENS {
        for ty in K_TYPES {
            for trial in 0..4 {
                let w = weights(&mut rng, ty, n, 1, trial);
                let a = acts(&mut rng, n, 1);
                let want = reference::vec_dot(ty, n, &w, &a);
                for k in &kernels {
                    let got = k.vec_dot(ty, n, &w, &a);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{} n={n} trial {trial} on {}",
                        ty.name(),
                        k.path()
                    );
                }
                let (wd, ad) = (dequant(ty, &w, n), dequant(GgmlType::Q8_K, &a, n));
                let exact: f64 = wd.iter().zip(&ad).map(|(p, q)| *p as f64 * *q as f64).sum();
                let tol = 1e-5 * abs_dot(&wd, &ad) + 1e-30;
                assert!(
                    (want as f64 - exact).abs() <= tol,
                    "{} n={n}: {want} vs f64 {exact}",
                    ty.name()
                );
            }
        }
    }
}

/// AVX2 gemm equals the reference gemm bit for bit for every column count (both sides of the
/// order switches), row remainders, strides; untouched outside the window; gemm with one
/// column equals vec_dot; splitting rows does not change anything.
#[test]
fn gemm_equals_reference_for_every_batch_size() {
    let kernels = all_paths();
    let mut rng = Rng::new(44);
    for ty in K_TYPES {
        for n in [256usize, 768] {
            for n_rows in [1usize, 3, 4, 5, 9] {
                let w = weights(&mut rng, ty, n, n_rows, n_rows);
                let wr = row_size(ty, n);
                for n_cols in 1..=20usize {
                    let a = acts(&mut rng, n, n_cols);
                    let ar = row_size(GgmlType::Q8_K, n);
                    let stride = n_rows + n_cols % 3;
                    let len = (n_cols - 1) * stride + n_rows;
                    let mut want = vec![f32::NAN; len + 2];
                    reference::gemm(ty, n, &w, n_rows, &a, n_cols, &mut want, stride);
                    for k in &kernels {
                        let mut got = vec![f32::NAN; len + 2];
                        k.gemm(ty, n, &w, n_rows, &a, n_cols, &mut got, stride);
                        for i in 0..got.len() {
                            let inside = i % stride < n_rows && i / stride < n_cols && i < len;
                            if inside {
                                assert_eq!(
                                    got[i].to_bits(),
                                    want[i].to_bits(),
                                    "{} n={n} {n_rows}x{n_cols} at (r {}, c {}) on {}",
                                    ty.name(),
                                    i % stride,
                                    i / stride,
                                    k.path()
                                );
                            } else {
                                assert!(got[i].is_nan(), "gemm wrote outside the window at {i}");
                            }
                        }
                        // Row splits: the last rows on their own give the same bits.
                        if n_rows > 1 {
                            let mut part = vec![f32::NAN; len];
                            let r1 = n_rows / 2;
                            k.gemm(
                                ty,
                                n,
                                &w[r1 * wr..],
                                n_rows - r1,
                                &a,
                                n_cols,
                                &mut part,
                                stride,
                            );
                            for c in 0..n_cols {
                                for r in r1..n_rows {
                                    assert_eq!(
                                        part[c * stride + r - r1].to_bits(),
                                        got[c * stride + r].to_bits(),
                                        "{} row split",
                                        ty.name()
                                    );
                                }
                            }
                        }
                        if n_cols == 1 {
                            for r in 0..n_rows {
                                let v = k.vec_dot(ty, n, &w[r * wr..(r + 1) * wr], &a[..ar]);
                                assert_eq!(v.to_bits(), got[r].to_bits(), "gemm(1 col) != vec_dot");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The orders differ (so the batch size really matters) but agree closely.
#[test]
fn orders_differ_only_in_rounding() {
    let mut rng = Rng::new(45);
    let n = 2048;
    for ty in K_TYPES {
        let w = weights(&mut rng, ty, n, 16, 1);
        let a = acts(&mut rng, n, 1);
        let wr = row_size(ty, n);
        let (mut one, mut many) = (vec![0f32; 16], vec![0f32; 16 * 8]);
        // Column 0 alone vs column 0 of an 8-column batch (all columns equal).
        let a8: Vec<u8> = a.iter().copied().cycle().take(a.len() * 8).collect();
        reference::gemm(ty, n, &w, 16, &a, 1, &mut one, 16);
        reference::gemm(ty, n, &w, 16, &a8, 8, &mut many, 16);
        let mut differ = 0;
        for r in 0..16 {
            let wd = dequant(ty, &w[r * wr..(r + 1) * wr], n);
            let ad = dequant(GgmlType::Q8_K, &a, n);
            let tol = 1e-5 * abs_dot(&wd, &ad);
            assert!(
                ((one[r] - many[r]) as f64).abs() <= tol,
                "{} row {r}",
                ty.name()
            );
            differ += (one[r] != many[r]) as usize;
        }
        assert!(
            differ > 0,
            "{}: 1-column and 8-column orders never differ",
            ty.name()
        );
    }
}
