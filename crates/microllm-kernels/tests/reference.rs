//! The scalar reference against hand-computed ggml blocks and error bounds.

mod common;

use common::*;
use half::f16;
use microllm_kernels::blocks::{
    cast_blocks, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1,
};
use microllm_kernels::reference;
use microllm_kernels::{GgmlType, KernelError, Kernels};

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_bits().to_le_bytes()
}

#[test]
fn q8_0_hand_block_rounds_half_away_from_zero() {
    // amax = 127 -> d = 1, id = 1: q = round(x) with ties away from zero (ggml's roundf),
    // not to even (which would give 2 and -2 for 2.5 and -2.5).
    let mut x = [0.0f32; 32];
    x[..8].copy_from_slice(&[127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -1.49, 3.7]);
    x[31] = -126.6;
    let b = quant(GgmlType::Q8_0, &x);
    assert_eq!(b.len(), 34);
    assert_eq!(&b[..2], &[0x00, 0x3c]); // f16 1.0
    let qs: Vec<i8> = b[2..].iter().map(|&v| v as i8).collect();
    assert_eq!(&qs[..8], &[127, 3, -3, 1, -1, 2, -1, 4]);
    assert_eq!(qs[31], -127);
    assert!(qs[8..31].iter().all(|&q| q == 0));
}

#[test]
fn q8_0_hand_block_scale() {
    // x = j - 16: amax 16, d = 16/127 -> f16 0x3008 (0.1259765625), id = 7.9375.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let b = quant(GgmlType::Q8_0, &x);
    assert_eq!(&b[..2], &[0x08, 0x30]);
    let q = |j: usize| b[2 + j] as i8;
    assert_eq!((q(0), q(15), q(16), q(17), q(31)), (-127, -8, 0, 8, 119));
    // Q8_1 = same values plus s = d * sum(q) with the unrounded d.
    let b1 = quant(GgmlType::Q8_1, &x);
    assert_eq!(&b1[..2], &b[..2]);
    assert_eq!(&b1[4..], &b[2..]);
    let sum: i32 = b[2..].iter().map(|&v| v as i8 as i32).sum();
    assert_eq!(&b1[2..4], &f16_bytes(sum as f32 * (16.0f32 / 127.0)));
}

#[test]
fn q4_0_hand_block() {
    // The largest magnitude is +8 -> d = 8 / -8 = -1, so +8 maps to q = 0 and the far
    // negative side clamps at 15 (ggml's asymmetric choice).
    let mut x = [0.0f32; 32];
    x[..8].copy_from_slice(&[-4.0, 8.0, 1.0, -1.0, 0.0, 3.0, 7.0, 2.4]);
    x[16] = -7.9;
    x[17] = 0.6;
    let b = quant(GgmlType::Q4_0, &x);
    assert_eq!(b.len(), 18);
    assert_eq!(&b[..2], &[0x00, 0xbc]); // f16 -1.0
                                        // q = min(15, trunc(-x + 8.5)): -4->12, 8->0, 1->7, -1->9, 0->8, 3->5, 7->1, 2.4->6,
                                        // -7.9 -> 16 -> 15, 0.6 -> 7; elements j and j+16 share byte j (low, high nibble).
    let expect_lo = [12u8, 0, 7, 9, 8, 5, 1, 6];
    for j in 0..16 {
        let lo = if j < 8 { expect_lo[j] } else { 8 };
        let hi = match j {
            0 => 15,
            1 => 7,
            _ => 8,
        };
        assert_eq!(b[2 + j], lo | (hi << 4), "byte {j}");
    }
    let y = dequant(GgmlType::Q4_0, &b, 32);
    assert_eq!(&y[..8], &[-4.0, 8.0, 1.0, -1.0, 0.0, 3.0, 7.0, 2.0]);
    assert_eq!((y[16], y[17]), (-7.0, 1.0));
}

#[test]
fn q4_1_hand_block() {
    // x = j: min 0, d = 31/15; q = round(15 j / 31) (never a tie: 31 is odd).
    let x: Vec<f32> = (0..32).map(|j| j as f32).collect();
    let b = quant(GgmlType::Q4_1, &x);
    assert_eq!(b.len(), 20);
    assert_eq!(&b[..2], &f16_bytes(31.0 / 15.0));
    assert_eq!(&b[2..4], &[0, 0]);
    let q = |j: usize| ((30 * j + 31) / 62) as u8; // floor(15j/31 + 1/2)
    for j in 0..16 {
        assert_eq!(b[4 + j], q(j) | (q(j + 16) << 4), "byte {j}");
    }
}

#[test]
fn q5_0_hand_block() {
    // x = j - 16: max magnitude -16 -> d = 1, q = j; qh has bits 16..31 set.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let b = quant(GgmlType::Q5_0, &x);
    assert_eq!(b.len(), 22);
    assert_eq!(&b[..2], &[0x00, 0x3c]);
    assert_eq!(&b[2..6], &0xFFFF_0000u32.to_le_bytes());
    for j in 0..16 {
        assert_eq!(b[6 + j], (j as u8) | ((j as u8) << 4));
    }
    assert_eq!(dequant(GgmlType::Q5_0, &b, 32), x);
}

#[test]
fn q5_1_hand_block() {
    // x = 1 + j/2: min 1, d = 0.5, q = j.
    let x: Vec<f32> = (0..32).map(|j| 1.0 + j as f32 * 0.5).collect();
    let b = quant(GgmlType::Q5_1, &x);
    assert_eq!(b.len(), 24);
    assert_eq!(&b[..4], &[0x00, 0x38, 0x00, 0x3c]); // d 0.5, m 1.0
    assert_eq!(&b[4..8], &0xFFFF_0000u32.to_le_bytes());
    for j in 0..16 {
        assert_eq!(b[8 + j], (j as u8) | ((j as u8) << 4));
    }
    assert_eq!(dequant(GgmlType::Q5_1, &b, 32), x);
}

#[test]
fn q5_qh_bits_follow_element_order() {
    // Only element 5 and element 20 need the 5th bit.
    let mut x = [0.0f32; 32];
    x[0] = -16.0; // d = 1
    x[5] = 15.0; // q = 31
    x[20] = 1.0; // q = 17
    let b = quant(GgmlType::Q5_0, &x);
    let qh = u32::from_le_bytes(b[2..6].try_into().unwrap());
    let expect = (0..32)
        .filter(|&j| x[j] + 16.0 >= 16.0)
        .fold(0u32, |a, j| a | (1 << j));
    assert_eq!(qh, expect);
    assert_eq!(dequant(GgmlType::Q5_0, &b, 32), x.to_vec());
}

#[test]
fn zero_blocks_quantize_to_zero() {
    let x = [0.0f32; 64];
    for ty in ROW_TYPES {
        let b = quant(ty, &x);
        assert_eq!(dequant(ty, &b, 64), x.to_vec(), "{}", ty.name());
    }
}

#[test]
fn bf16_and_f16_rounding() {
    // 1 + 2^-8 is a bf16 tie: to even -> 1.0; 1 + 3*2^-8 ties up to 1 + 2^-6.
    assert_eq!(reference::f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(reference::f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(reference::f32_to_bf16(-2.0), 0xc000);
    assert_eq!(reference::f32_to_bf16(f32::INFINITY), 0x7f80);
    let nan = reference::f32_to_bf16(f32::from_bits(0x7f80_0001));
    assert!(
        reference::bf16_to_f32(nan).is_nan(),
        "NaN must not round to Inf"
    );
    let b = quant(GgmlType::F16, &[1.0, 65504.0, 1e-8]);
    assert_eq!(b, [0x00, 0x3c, 0xff, 0x7b, 0x00, 0x00]);
}

/// Per-element error of quantize -> dequantize, against the format's step size.
#[test]
fn round_trip_error_bounds() {
    let mut rng = Rng::new(1);
    for scale in [1e-3f32, 0.02, 1.0, 300.0] {
        for shift in [0.0f32, 3.0] {
            let x: Vec<f32> = rng
                .vec(32 * 17, scale)
                .iter()
                .map(|v| v + shift * scale)
                .collect();
            for ty in ROW_TYPES {
                let b = quant(ty, &x);
                let y = dequant(ty, &b, x.len());
                for (blk, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let (min, max) = xb
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    // Step size of the format; f16 rounding of the scale (and of the min)
                    // adds at most 2^-11 relative on each.
                    let f16_err = amax * 2f32.powi(-10);
                    let bound = match ty {
                        GgmlType::F32 => 0.0,
                        GgmlType::F16 => amax * 2f32.powi(-11) + 1e-7,
                        GgmlType::BF16 => amax * 2f32.powi(-8),
                        // Signed 4/5-bit: half a step, except a whole step where the far side
                        // clamps at +7 / +15.
                        GgmlType::Q4_0 => amax / 8.0 + f16_err,
                        GgmlType::Q5_0 => amax / 16.0 + f16_err,
                        GgmlType::Q4_1 => (max - min) / 15.0 * 0.5 + f16_err,
                        GgmlType::Q5_1 => (max - min) / 31.0 * 0.5 + f16_err,
                        GgmlType::Q8_0 | GgmlType::Q8_1 => amax / 127.0 * 0.5 + f16_err,
                        _ => unreachable!(),
                    };
                    for (j, (a, b)) in xb.iter().zip(yb).enumerate() {
                        assert!(
                            (a - b).abs() <= bound * 1.001,
                            "{} scale {scale} shift {shift} block {blk} elem {j}: {a} -> {b}, bound {bound}",
                            ty.name()
                        );
                    }
                }
                // And, for centred data, the RMS error is small (the quantizer is not lazy).
                if shift != 0.0 {
                    continue;
                }
                let rms_x = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64).sqrt();
                let rms_e = (x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| ((a - b) * (a - b)) as f64)
                    .sum::<f64>()
                    / x.len() as f64)
                    .sqrt();
                let max_rel = match ty {
                    // Outliers (8x, every 97th value) widen their blocks' steps.
                    GgmlType::Q4_0 | GgmlType::Q4_1 => 0.2,
                    GgmlType::Q5_0 | GgmlType::Q5_1 => 0.1,
                    GgmlType::Q8_0 | GgmlType::Q8_1 => 0.02,
                    _ => 0.005,
                };
                assert!(
                    rms_e <= max_rel * rms_x,
                    "{}: rms error {rms_e} vs rms {rms_x}",
                    ty.name()
                );
            }
        }
    }
}

/// The quantized dot equals the dot of the dequantized vectors, up to rounding: this ties
/// vec_dot's formula (scales, -8/-16 offsets, m*s term) to dequantize's.
#[test]
fn vec_dot_matches_dequantized_dot() {
    let mut rng = Rng::new(2);
    for n in BLOCK_LENS {
        let a = rng.vec(n, 1.0);
        for w_ty in WEIGHT_TYPES {
            let wf = rng.vec(n, 0.05);
            let wb = quant(w_ty, &wf);
            let a_ty = Kernels::detect().vec_dot_type(w_ty).unwrap();
            let ab = quant(a_ty, &a);
            let wd = dequant(w_ty, &wb, n);
            let ad = dequant(a_ty, &ab, n);
            let exact: f64 = wd.iter().zip(&ad).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = reference::vec_dot(w_ty, n, &wb, &ab) as f64;
            // For Q8_1 activations s = d*sum(q) is rounded to f16 independently of d: allow
            // |m| * |s| * 2^-10 per block on top of the accumulation error.
            let mut tol = 1e-6 * abs_dot(&wd, &ad) + 1e-9;
            if a_ty == GgmlType::Q8_1 {
                for (wbk, abk) in cast_min_terms(w_ty, &wb)
                    .iter()
                    .zip(cast_blocks::<BlockQ8_1>(&ab).unwrap())
                {
                    let sum_q: i32 = abk.qs.iter().map(|&q| q as i32).sum();
                    tol += (wbk.abs()
                        * (abk.s.to_f32().abs() + (abk.d.to_f32() * sum_q as f32).abs()))
                        as f64
                        * 2f64.powi(-10);
                }
            }
            assert!(
                (got - exact).abs() <= tol,
                "{} n={n}: {got} vs {exact} (tol {tol})",
                w_ty.name()
            );
        }
    }
}

fn cast_min_terms(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::Q4_1 => cast_blocks::<BlockQ4_1>(b)
            .unwrap()
            .iter()
            .map(|x| x.m.to_f32())
            .collect(),
        GgmlType::Q5_1 => cast_blocks::<BlockQ5_1>(b)
            .unwrap()
            .iter()
            .map(|x| x.m.to_f32())
            .collect(),
        _ => unreachable!(),
    }
}

#[test]
fn block_structs_agree_with_bytes() {
    let x: Vec<f32> = (0..32).map(|j| (j as f32 - 10.0) * 0.3).collect();
    let b = quant(GgmlType::Q4_0, &x);
    let blk = &cast_blocks::<BlockQ4_0>(&b).unwrap()[0];
    assert_eq!(blk.d.bits(), u16::from_le_bytes([b[0], b[1]]));
    let b = quant(GgmlType::Q5_0, &x);
    assert_eq!(
        cast_blocks::<BlockQ5_0>(&b).unwrap()[0].qh,
        [b[2], b[3], b[4], b[5]]
    );
    let b = quant(GgmlType::Q8_0, &x);
    assert_eq!(cast_blocks::<BlockQ8_0>(&b).unwrap()[0].qs[31], b[33] as i8);
    // Per-format block API = byte API.
    let mut blocks = [BlockQ4_1::default(); 1];
    reference::quantize_q4_1(&x, &mut blocks);
    assert_eq!(
        microllm_kernels::blocks::blocks_as_bytes(&blocks),
        &quant(GgmlType::Q4_1, &x)[..]
    );
}

#[test]
fn row_errors_say_what_is_wrong() {
    let mut out = vec![0u8; 18];
    let e = reference::quantize_row(GgmlType::Q4_0, &[0.0; 33], &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::BadLength {
                expected: 64,
                got: 33,
                ..
            }
        ),
        "{e}"
    );
    let e = reference::quantize_row(GgmlType::Q4_0, &[0.0; 64], &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::BadLength {
                expected: 36,
                got: 18,
                ..
            }
        ),
        "{e}"
    );
    let e = reference::dequantize_row(GgmlType::IQ4_XS, &[0; 136], &mut [0.0; 256]).unwrap_err();
    match &e {
        KernelError::Unsupported { ty, supported } => {
            assert_eq!(*ty, "IQ4_XS");
            assert!(supported.contains("Q8_0") && supported.contains("Q6_K"));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(e.to_string().contains("IQ4_XS"));
    let k = Kernels::detect();
    assert!(!k.supports(GgmlType::IQ4_XS) && !k.supports(GgmlType::Q8_1));
    assert!(!k.supports(GgmlType::Q8_K), "Q8_K is an activation format");
    assert!(k.check_weight_type(GgmlType::IQ2_XXS).is_err());
    assert_eq!(k.check_weight_type(GgmlType::Q6_K), Ok(GgmlType::Q8_K));
    assert_eq!(k.vec_dot_type(GgmlType::Q4_1), Some(GgmlType::Q8_1));
    assert_eq!(k.vec_dot_type(GgmlType::Q5_0), Some(GgmlType::Q8_0));
    assert_eq!(k.vec_dot_type(GgmlType::BF16), Some(GgmlType::F32));
}

#[test]
#[should_panic(expected = "no dot kernel for weight type IQ4_XS")]
fn vec_dot_on_unsupported_type_panics_clearly() {
    reference::vec_dot(GgmlType::IQ4_XS, 256, &[0; 136], &[0; 292]);
}

#[test]
#[should_panic(expected = "activation has 33 bytes, need 34")]
fn vec_dot_short_slice_panics() {
    reference::vec_dot(GgmlType::Q8_0, 32, &[0; 34], &[0; 33]);
}
