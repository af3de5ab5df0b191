//! Every AVX2 function against the scalar reference, at awkward lengths; gemm against vec_dot.

mod common;

use common::*;
use half::f16;
use microllm_kernels::{reference, GgmlType, KernelError, KernelPath, Kernels};

#[test]
fn quantize_row_matches_reference_bytes() {
    let Some(k) = avx2() else { return };
    let mut rng = Rng::new(10);
    for n in BLOCK_LENS {
        for scale in [1e-4f32, 1.0, 1e3] {
            let mut x = rng.vec(n, scale);
            // Exact ties after scaling: amax 127 gives id 1, so k + 0.5 must round away.
            x[32..64.min(n)]
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = i as f32 - 15.5);
            if n >= 64 {
                x[32] = 127.0;
            }
            for ty in ROW_TYPES {
                let want = quant(ty, &x);
                let mut got = vec![0u8; want.len()];
                k.quantize_row(ty, &x, &mut got).unwrap();
                assert_eq!(got, want, "{} n={n} scale={scale}", ty.name());
            }
        }
    }
    // F16/BF16 at non-multiple-of-8 lengths.
    for n in ELEM_LENS {
        let x = rng.vec(n, 3.0);
        for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
            let want = quant(ty, &x);
            let mut got = vec![0u8; want.len()];
            k.quantize_row(ty, &x, &mut got).unwrap();
            assert_eq!(got, want, "{} n={n}", ty.name());
        }
    }
}

#[test]
fn dequantize_row_matches_reference_exactly() {
    let Some(k) = avx2() else { return };
    let mut rng = Rng::new(11);
    for n in BLOCK_LENS {
        for ty in ROW_TYPES {
            let bytes = match ty {
                GgmlType::Q8_1 => quant(ty, &rng.vec(n, 1.0)),
                _ => random_weight_bytes(&mut rng, ty, n),
            };
            let want = dequant(ty, &bytes, n);
            let mut got = vec![f32::NAN; n];
            k.dequantize_row(ty, &bytes, &mut got).unwrap();
            assert_eq!(got, want, "{} n={n}", ty.name());
        }
    }
    for n in ELEM_LENS {
        for ty in [GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
            let bytes = quant(ty, &rng.vec(n, 2.0));
            let want = dequant(ty, &bytes, n);
            let mut got = vec![f32::NAN; n];
            k.dequantize_row(ty, &bytes, &mut got).unwrap();
            assert_eq!(got, want, "{} n={n}", ty.name());
        }
    }
}

/// AVX2 vec_dot within DOT_REL_TOL of the reference, on quantized random activations and on
/// random weight bytes (every nibble and 5th-bit pattern, -128 in Q8_0).
#[test]
fn vec_dot_matches_reference() {
    let Some(k) = avx2() else { return };
    let mut rng = Rng::new(12);
    for n in BLOCK_LENS {
        for w_ty in WEIGHT_TYPES {
            for trial in 0..4 {
                let w = if trial % 2 == 0 {
                    random_weight_bytes(&mut rng, w_ty, n)
                } else {
                    quant(w_ty, &rng.vec(n, 0.05))
                };
                let a_ty = k.vec_dot_type(w_ty).unwrap();
                let a = quant(a_ty, &rng.vec(n, 1.0));
                let want = reference::vec_dot(w_ty, n, &w, &a) as f64;
                let got = k.vec_dot(w_ty, n, &w, &a) as f64;
                let scale = abs_dot(&dequant(w_ty, &w, n), &dequant(a_ty, &a, n));
                let tol = DOT_REL_TOL * scale + 1e-30;
                assert!(
                    (got - want).abs() <= tol,
                    "{} n={n} trial {trial}: avx2 {got} vs ref {want} (tol {tol})",
                    w_ty.name()
                );
            }
        }
    }
    // Float weights have no block constraint: every tail length.
    for n in ELEM_LENS {
        for w_ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            let w = quant(w_ty, &rng.vec(n, 1.0));
            let a = quant(GgmlType::F32, &rng.vec(n, 1.0));
            let want = reference::vec_dot(w_ty, n, &w, &a) as f64;
            let got = k.vec_dot(w_ty, n, &w, &a) as f64;
            let tol = DOT_REL_TOL * abs_dot(&dequant(w_ty, &w, n), &dequant(GgmlType::F32, &a, n))
                + 1e-30;
            assert!(
                (got - want).abs() <= tol,
                "{} n={n}: {got} vs {want}",
                w_ty.name()
            );
        }
    }
}

/// gemm output (r, c) is bit-identical to vec_dot(row r, column c) on every path, for all
/// tile remainders; entries outside the (n_rows x n_cols) window are untouched.
#[test]
fn gemm_equals_vec_dot_loop() {
    let mut rng = Rng::new(13);
    for k in all_paths() {
        for w_ty in WEIGHT_TYPES {
            for n in [32usize, 96, 32 * 17] {
                let a_ty = k.vec_dot_type(w_ty).unwrap();
                let (wr, ar) = (row_size(w_ty, n), row_size(a_ty, n));
                for (n_rows, n_cols) in [
                    (1, 1),
                    (2, 1),
                    (3, 2),
                    (4, 1),
                    (5, 3),
                    (7, 7),
                    (8, 2),
                    (9, 5),
                    (13, 4),
                    (4, 64),
                ] {
                    let w = random_weight_bytes(&mut rng, w_ty, n * n_rows);
                    let a = quant(a_ty, &rng.vec(n * n_cols, 1.0));
                    let stride = n_rows + (n_cols % 3);
                    let mut out = vec![f32::NAN; (n_cols - 1) * stride + n_rows + 2];
                    k.gemm(w_ty, n, &w, n_rows, &a, n_cols, &mut out, stride);
                    for c in 0..n_cols {
                        for r in 0..n_rows {
                            let want = k.vec_dot(
                                w_ty,
                                n,
                                &w[r * wr..(r + 1) * wr],
                                &a[c * ar..(c + 1) * ar],
                            );
                            let got = out[c * stride + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{} {} n={n} {n_rows}x{n_cols} at ({r},{c}): {got} vs {want}",
                                k.path(),
                                w_ty.name()
                            );
                        }
                    }
                    for (i, v) in out.iter().enumerate() {
                        let inside = i % stride < n_rows && i / stride < n_cols;
                        assert_eq!(
                            v.is_nan(),
                            !inside,
                            "gemm wrote {v} at {i} (inside window: {inside})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_ignores_extra_input_bytes_and_empty_shapes() {
    let k = Kernels::detect();
    let mut rng = Rng::new(14);
    let w = random_weight_bytes(&mut rng, GgmlType::Q4_0, 64 * 3);
    let a = quant(GgmlType::Q8_0, &rng.vec(64 * 4, 1.0));
    let mut out = vec![0.0; 8];
    // 2 of the 3 rows, 2 of the 4 columns.
    k.gemm(GgmlType::Q4_0, 64, &w, 2, &a, 2, &mut out, 3);
    assert_eq!(out[1], k.vec_dot(GgmlType::Q4_0, 64, &w[36..72], &a));
    assert_eq!(
        out[3 + 1],
        k.vec_dot(GgmlType::Q4_0, 64, &w[36..], &a[68..])
    );
    k.gemm(GgmlType::Q4_0, 64, &w, 0, &a, 2, &mut [], 0);
    k.gemm(GgmlType::Q4_0, 64, &w, 2, &a, 0, &mut [], 0);
    // k = 0: every dot is 0.
    let mut out = vec![1.0; 2];
    k.gemm(GgmlType::Q8_0, 0, &[], 2, &[], 1, &mut out, 2);
    assert_eq!(out, [0.0, 0.0]);
}

#[test]
#[should_panic(expected = "gemm: out has 5 floats, need 6")]
fn gemm_short_output_panics() {
    let k = Kernels::detect();
    let w = vec![0u8; 34 * 2];
    let a = vec![0u8; 34 * 2];
    k.gemm(GgmlType::Q8_0, 32, &w, 2, &a, 2, &mut [0.0; 5], 4);
}

#[test]
#[should_panic(expected = "gemm: weights have 67 bytes, need 68")]
fn gemm_short_weights_panics() {
    let k = Kernels::detect();
    k.gemm(
        GgmlType::Q8_0,
        32,
        &[0u8; 67],
        2,
        &[0u8; 34],
        1,
        &mut [0.0; 2],
        2,
    );
}

#[test]
fn f32_and_f16_helpers_match_reference() {
    let Some(k) = avx2() else { return };
    let mut rng = Rng::new(15);
    for n in ELEM_LENS {
        let a = rng.vec(n, 1.0);
        let b = rng.vec(n, 2.0);
        let ah: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let ahf: Vec<f32> = ah.iter().map(|v| v.to_f32()).collect();

        let (got, want) = (k.dot_f32(&a, &b) as f64, reference::dot_f32(&a, &b) as f64);
        assert!(
            (got - want).abs() <= DOT_REL_TOL * abs_dot(&a, &b) + 1e-30,
            "dot_f32 n={n}: {got} vs {want}"
        );
        let (got, want) = (
            k.dot_f16_f32(&ah, &b) as f64,
            reference::dot_f16_f32(&ah, &b) as f64,
        );
        assert!(
            (got - want).abs() <= DOT_REL_TOL * abs_dot(&ahf, &b) + 1e-30,
            "dot_f16_f32 n={n}: {got} vs {want}"
        );

        let y0 = rng.vec(n, 1.0);
        for (name, x) in [("axpy_f32", &a), ("axpy_f16", &ahf)] {
            let (mut y1, mut y2) = (y0.clone(), y0.clone());
            if name == "axpy_f32" {
                k.axpy_f32(&mut y1, 0.37, x);
                reference::axpy_f32(&mut y2, 0.37, x);
            } else {
                k.axpy_f16(&mut y1, 0.37, &ah);
                reference::axpy_f16(&mut y2, 0.37, &ah);
            }
            for i in 0..n {
                let tol = AXPY_REL_TOL * (y0[i].abs() + (0.37 * x[i]).abs()) as f64;
                assert!(
                    ((y1[i] - y2[i]) as f64).abs() <= tol,
                    "{name} n={n} i={i}: {} vs {}",
                    y1[i],
                    y2[i]
                );
            }
        }

        // Conversions are exact / correctly rounded on both paths: bit equality.
        let mut h1 = vec![f16::ZERO; n];
        let mut h2 = vec![f16::ZERO; n];
        let wide: Vec<f32> = b
            .iter()
            .map(|v| v * 1e4)
            .chain([1e-7, 7e4, -0.0])
            .take(n)
            .collect();
        k.f32_to_f16(&wide, &mut h1);
        reference::f32_to_f16(&wide, &mut h2);
        assert_eq!(
            h1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            h2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut f1 = vec![0.0f32; n];
        let mut f2 = vec![0.0f32; n];
        k.f16_to_f32(&h1, &mut f1);
        reference::f16_to_f32(&h1, &mut f2);
        assert_eq!(
            f1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            f2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn path_selection() {
    assert_eq!(KernelPath::Scalar.to_string(), "scalar");
    assert_eq!(KernelPath::Avx2.to_string(), "avx2+fma+f16c");
    assert_eq!(KernelPath::Avx2Vnni.to_string(), "avx2+fma+f16c+avx512vnni");
    assert_eq!(
        Kernels::from_setting("scalar").unwrap().path(),
        KernelPath::Scalar
    );
    assert_eq!(
        Kernels::from_setting(" Scalar ").unwrap().path(),
        KernelPath::Scalar
    );
    assert_eq!(Kernels::from_setting("auto").unwrap(), Kernels::detect());
    assert_eq!(Kernels::from_setting("").unwrap(), Kernels::detect());
    match Kernels::from_setting("avx2vnni") {
        Ok(k) => assert_eq!(k.path(), KernelPath::Avx2Vnni),
        Err(e) => assert!(matches!(
            e,
            KernelError::PathUnavailable {
                path: KernelPath::Avx2Vnni,
                ..
            }
        )),
    }
    let e = Kernels::from_setting("avx512").unwrap_err();
    assert!(matches!(&e, KernelError::BadEnv { value } if value == "avx512"));
    assert!(
        e.to_string().contains("scalar, avx2, avx2vnni or auto"),
        "{e}"
    );
    match Kernels::from_setting("avx2") {
        Ok(k) => assert_eq!(k.path(), KernelPath::Avx2),
        Err(e) => assert!(matches!(
            e,
            KernelError::PathUnavailable {
                path: KernelPath::Avx2,
                ..
            }
        )),
    }
    // The environment (as CI sets it) must parse.
    let k = Kernels::from_env().expect("MICROLLM_KERNELS must be scalar, avx2, avx2vnni or auto");
    eprintln!("kernel path from the environment: {}", k.path());
    fn assert_send_sync_copy<T: Send + Sync + Copy>() {}
    assert_send_sync_copy::<Kernels>();
}

#[test]
fn geglu_is_bit_identical_to_reference() {
    let Some(fast) = avx2() else { return };
    let mut rng = Rng::new(11);
    // Values across the table's range, its cut-offs at +-10, and a tail that is not a
    // multiple of 8.
    for n in [8, 64, 2048 + 5] {
        let mut gate = rng.vec(n, 6.0);
        gate[0] = -10.0;
        gate[1] = 10.0;
        gate[2] = -12.5;
        gate[3] = 11.0;
        gate[4] = 0.0;
        gate[5] = -0.0;
        let up = rng.vec(n, 2.0);
        let (mut a, mut b) = (gate.clone(), gate.clone());
        scalar().geglu(&mut a, &up);
        fast.geglu(&mut b, &up);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "n = {n}");
    }
}

#[test]
fn rope_is_bit_identical_to_reference() {
    let Some(fast) = avx2() else { return };
    let mut rng = Rng::new(12);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // Full and partial rotations, pair counts with and without a remainder, both pairings.
    for (head_dim, pairs) in [(64, 32), (64, 16), (80, 40), (256, 128), (96, 22), (8, 3)] {
        for neox in [false, true] {
            let x = rng.vec(3 * head_dim, 4.0);
            let angles: Vec<f32> = rng.vec(pairs, 3.0);
            let (cos, sin): (Vec<f32>, Vec<f32>) =
                angles.iter().map(|a| (a.cos(), a.sin())).unzip();
            let (mut a, mut b) = (x.clone(), x.clone());
            scalar().rope(&mut a, head_dim, neox, &cos, &sin);
            fast.rope(&mut b, head_dim, neox, &cos, &sin);
            assert_eq!(
                bits(&a),
                bits(&b),
                "head_dim {head_dim}, {pairs} pairs, neox {neox}"
            );
            // It rotates: the norm of every pair is kept, the values move.
            assert_ne!(bits(&a), bits(&x));
            let n0: f32 = x.iter().map(|v| v * v).sum();
            let n1: f32 = a.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() <= 1e-4 * n0, "{n0} vs {n1}");
        }
    }
}
