//! The panel matmul (`Kernels::gemm_panel`): the AVX2 version against the scalar
//! specification, and both against an f32 dot of the dequantized weights with the
//! unquantized activations (the error of 8-bit activations only).

mod common;

use common::{avx2, row_size, scalar, Rng};
use microllm_kernels::{panel, GgmlType, Kernels};

/// Every weight format with a panel kernel.
const PANEL_TYPES: [GgmlType; 10] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn lens(ty: GgmlType) -> &'static [usize] {
    if ty.block_size() == 256 {
        &[256, 768, 256 * 9]
    } else {
        &[32, 96, 32 * 17, 576]
    }
}

struct Case {
    k: usize,
    n_rows: usize,
    n_cols: usize,
    w: Vec<u8>,
    wf: Vec<f32>,
    x: Vec<f32>,
    act: Vec<u8>,
}

fn case(kern: &Kernels, ty: GgmlType, k: usize, n_rows: usize, n_cols: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let rb = row_size(ty, k);
    let mut w = vec![0u8; n_rows * rb];
    let mut wf = vec![0f32; n_rows * k];
    for r in 0..n_rows {
        let row = rng.vec(k, 0.05);
        kern.quantize_row(ty, &row, &mut w[r * rb..(r + 1) * rb])
            .unwrap();
        kern.dequantize_row(ty, &w[r * rb..(r + 1) * rb], &mut wf[r * k..(r + 1) * k])
            .unwrap();
    }
    let x = rng.vec(n_cols * k, 1.0);
    let ab = panel::act_row_bytes(k);
    let mut act = vec![0u8; n_cols * ab];
    for c in 0..n_cols {
        kern.quantize_panel_act(&x[c * k..(c + 1) * k], &mut act[c * ab..(c + 1) * ab])
            .unwrap();
    }
    Case {
        k,
        n_rows,
        n_cols,
        w,
        wf,
        x,
        act,
    }
}

fn run(kern: &Kernels, ty: GgmlType, c: &Case) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.n_cols * c.n_rows];
    kern.gemm_panel(
        ty, c.k, &c.w, c.n_rows, &c.act, c.n_cols, &mut out, c.n_rows,
    );
    out
}

#[test]
fn activation_bytes_are_the_same_on_every_path() {
    let Some(fast) = avx2() else { return };
    let mut rng = Rng::new(7);
    for k in [32, 64, 576, 2048] {
        let x = rng.vec(k, 3.0);
        let ab = panel::act_row_bytes(k);
        let (mut a, mut b) = (vec![0u8; ab], vec![0u8; ab]);
        scalar().quantize_panel_act(&x, &mut a).unwrap();
        fast.quantize_panel_act(&x, &mut b).unwrap();
        assert_eq!(a, b, "k = {k}");
    }
    assert!(scalar()
        .quantize_panel_act(&[0.0; 33], &mut [0u8; 64])
        .is_err());
    assert!(scalar()
        .quantize_panel_act(&[0.0; 32], &mut [0u8; 47])
        .is_err());
}

#[test]
fn scalar_specification_is_close_to_the_float_dot() {
    let s = scalar();
    for ty in PANEL_TYPES {
        for &k in lens(ty) {
            let c = case(&s, ty, k, 9, 3, k as u64 + ty as u64);
            let out = run(&s, ty, &c);
            for r in 0..c.n_rows {
                for col in 0..c.n_cols {
                    let (wr, xr) = (&c.wf[r * k..(r + 1) * k], &c.x[col * k..(col + 1) * k]);
                    let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let mag: f64 = wr
                        .iter()
                        .zip(xr)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let got = out[col * c.n_rows + r] as f64;
                    // 8-bit activations: each term off by at most |w| * amax / 254.
                    let err = (got - exact).abs();
                    assert!(
                        err <= 0.02 * mag + 1e-6,
                        "{} k={k} r={r} c={col}: {got} vs {exact} (mag {mag})",
                        ty.name()
                    );
                }
            }
        }
    }
}

#[test]
fn avx2_matches_scalar_specification() {
    let Some(fast) = avx2() else { return };
    let s = scalar();
    for ty in PANEL_TYPES {
        for &k in lens(ty) {
            // Row counts around the 8-row panel, column counts around the 4-column tile.
            for (n_rows, n_cols) in [(1, 1), (8, 4), (13, 7), (16, 9), (3, 5)] {
                let c = case(&s, ty, k, n_rows, n_cols, (k * 31 + n_rows) as u64);
                let want = run(&s, ty, &c);
                let got = run(&fast, ty, &c);
                for r in 0..n_rows {
                    for col in 0..n_cols {
                        let (wr, xr) = (&c.wf[r * k..(r + 1) * k], &c.x[col * k..(col + 1) * k]);
                        let mag: f64 = wr
                            .iter()
                            .zip(xr)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let (g, w) = (got[col * n_rows + r], want[col * n_rows + r]);
                        assert!(
                            ((g - w) as f64).abs() <= 1e-5 * mag + 1e-7,
                            "{} k={k} {n_rows}x{n_cols} r={r} c={col}: {g} vs {w}",
                            ty.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn result_does_not_depend_on_the_row_split_or_column_count() {
    // Bit for bit, for every format: the rows in two calls, each column alone and in pairs
    // and triples (the direct small-batch kernel) against all columns at once (the panels).
    // Continuous batching relies on this: a sequence's numbers must not depend on its batch.
    let Some(fast) = avx2() else { return };
    for ty in PANEL_TYPES {
        let k = if ty.block_size() == 256 { 512 } else { 576 };
        let c = case(&scalar(), ty, k, 24, 7, 99 + ty as u64);
        let whole = run(&fast, ty, &c);
        let rb = row_size(ty, k);
        let mut split = vec![0f32; 7 * 24];
        fast.gemm_panel(ty, k, &c.w[..5 * rb], 5, &c.act, 7, &mut split, 24);
        fast.gemm_panel(ty, k, &c.w[5 * rb..], 19, &c.act, 7, &mut split[5..], 24);
        assert_eq!(whole, split, "{}: row split", ty.name());
        let ab = panel::act_row_bytes(k);
        for width in [1, 2, 3, 4, 5] {
            let mut col = 0;
            while col + width <= 7 {
                let mut part = vec![0f32; width * 24];
                fast.gemm_panel(
                    ty,
                    k,
                    &c.w,
                    24,
                    &c.act[col * ab..(col + width) * ab],
                    width,
                    &mut part,
                    24,
                );
                assert_eq!(
                    &whole[col * 24..(col + width) * 24],
                    &part[..],
                    "{}: columns {col}..{}",
                    ty.name(),
                    col + width
                );
                col += width;
            }
        }
    }
}

#[test]
fn unsupported_and_short_inputs() {
    let s = scalar();
    assert!(s.panel_supports(GgmlType::Q8_0));
    assert!(!s.panel_supports(GgmlType::F16));
    assert!(!s.panel_supports(GgmlType::F32));
    assert!(s.panel_supports(GgmlType::Q4_K));
    let r = std::panic::catch_unwind(|| {
        let mut out = [0f32; 1];
        scalar().gemm_panel(
            GgmlType::Q4_0,
            32,
            &[0u8; 17],
            1,
            &[0u8; 48],
            1,
            &mut out,
            1,
        );
    });
    assert!(
        r.is_err(),
        "short weights must panic, not read out of bounds"
    );
}
