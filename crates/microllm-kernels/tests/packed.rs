//! The packed matmul (`Kernels::pack`, `Kernels::gemm_packed`): the same bytes packed on every
//! path, and results bit-identical to the panel matmul on the same path, whatever the
//! numbers of rows and columns (continuous batching relies on it), with the SIMD paths (AVX2
//! and AVX-512 VNNI) checked against the scalar specification.

mod common;

use common::{all_paths, avx2, row_size, scalar, vnni, Rng};
use microllm_kernels::{panel, GgmlType, Kernels, Prefetch};

const PACKED_TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Elements per block of a format and the packed bytes of one block of 8 rows (see
/// `microllm_kernels::packed`).
fn block(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_0 => (32, 144),
        GgmlType::Q4_1 => (32, 160),
        GgmlType::Q5_0 => (32, 176),
        GgmlType::Q5_1 => (32, 192),
        GgmlType::Q8_0 => (32, 272),
        GgmlType::Q4_K => (256, 1184),
        GgmlType::Q5_K => (256, 1440),
        GgmlType::Q6_K => (256, 1680),
        _ => unreachable!(),
    }
}

/// A row length near `k` that `ty` can have (the K-quants need multiples of 256).
fn fit(ty: GgmlType, k: usize) -> usize {
    k.div_ceil(block(ty).0) * block(ty).0
}

struct Case {
    k: usize,
    n_rows: usize,
    n_cols: usize,
    w: Vec<u8>,
    act: Vec<u8>,
}

fn case(ty: GgmlType, k: usize, n_rows: usize, n_cols: usize, seed: u64) -> Case {
    let s = scalar();
    let mut rng = Rng::new(seed);
    let rb = row_size(ty, k);
    let mut w = vec![0u8; n_rows * rb];
    for r in 0..n_rows {
        let row = rng.vec(k, 0.05);
        s.quantize_row(ty, &row, &mut w[r * rb..(r + 1) * rb])
            .unwrap();
    }
    let x = rng.vec(n_cols * k, 1.0);
    let ab = panel::act_row_bytes(k);
    let mut act = vec![0u8; n_cols * ab];
    for c in 0..n_cols {
        s.quantize_panel_act(&x[c * k..(c + 1) * k], &mut act[c * ab..(c + 1) * ab])
            .unwrap();
    }
    Case {
        k,
        n_rows,
        n_cols,
        w,
        act,
    }
}

fn pack(kern: &Kernels, ty: GgmlType, c: &Case) -> Vec<u8> {
    let len = kern.packed_len(ty, c.k, c.n_rows).unwrap();
    let mut out = vec![0xAAu8; len];
    assert!(kern.pack(ty, c.k, &c.w, c.n_rows, &mut out));
    out
}

fn run_packed(kern: &Kernels, ty: GgmlType, c: &Case, packed: &[u8]) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.n_cols * c.n_rows];
    kern.gemm_packed(
        ty, c.k, packed, c.n_rows, &c.act, c.n_cols, &mut out, c.n_rows,
    );
    out
}

fn run_panel(kern: &Kernels, ty: GgmlType, c: &Case) -> Vec<f32> {
    let mut out = vec![f32::NAN; c.n_cols * c.n_rows];
    kern.gemm_panel(
        ty, c.k, &c.w, c.n_rows, &c.act, c.n_cols, &mut out, c.n_rows,
    );
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn packing_gives_the_same_bytes_on_every_path() {
    for ty in PACKED_TYPES {
        for (k, n_rows) in [(32, 1), (96, 8), (576, 13), (544, 24)] {
            let k = fit(ty, k);
            let c = case(ty, k, n_rows, 1, (k + n_rows) as u64);
            let want = pack(&scalar(), ty, &c);
            let (blk, bytes) = block(ty);
            assert_eq!(want.len(), n_rows.div_ceil(8) * (k / blk) * bytes);
            for kern in all_paths() {
                assert_eq!(
                    pack(&kern, ty, &c),
                    want,
                    "{} k={k} rows={n_rows} {:?}",
                    ty.name(),
                    kern.path()
                );
            }
        }
    }
}

#[test]
fn q8_0_panels_are_paired_into_one_stream() {
    // 24 rows of 64: panels 0 and 1 paired, panel 2 alone. A Q8_0 row block is an f16 scale
    // then 32 signed levels; packed group g of a pair is panel 0's vector t then panel 1's
    // (32 bytes each: 4 levels of each of 8 rows) for t = 0..8, then both panels' 8 scales.
    let ty = GgmlType::Q8_0;
    let (k, n_rows) = (64, 24);
    let c = case(ty, k, n_rows, 1, 11);
    let rb = row_size(ty, k);
    let level = |r: usize, e: usize| c.w[r * rb + (e / 32) * 34 + 2 + e % 32];
    let scale = |r: usize, g: usize| &c.w[r * rb + g * 34..r * rb + g * 34 + 2];
    for kern in all_paths() {
        let packed = pack(&kern, ty, &c);
        let (pair_group, lone_group) = (544, 272);
        for g in 0..2 {
            for t in 0..8 {
                for r in 0..16 {
                    for i in 0..4 {
                        let at = g * pair_group + 64 * t + 32 * (r / 8) + 4 * (r % 8) + i;
                        assert_eq!(packed[at], level(r, 32 * g + 4 * t + i), "{at}");
                    }
                }
            }
            for r in 0..16 {
                let at = g * pair_group + 512 + 2 * r;
                assert_eq!(&packed[at..at + 2], scale(r, g));
            }
            let lone = (k / 32) * pair_group + g * lone_group;
            for r in 16..24 {
                for t in 0..8 {
                    let at = lone + 32 * t + 4 * (r - 16);
                    assert_eq!(
                        &packed[at..at + 4],
                        (0..4)
                            .map(|i| level(r, 32 * g + 4 * t + i))
                            .collect::<Vec<_>>()
                    );
                }
                let at = lone + 256 + 2 * (r - 16);
                assert_eq!(&packed[at..at + 2], scale(r, g), "{:?}", kern.path());
            }
        }
    }
}

#[test]
fn q4_1_panels_are_paired_too() {
    // 16 rows of 32: one pair, one group of 320 bytes: vector t (t = 0..4) of panel 0 then
    // of panel 1 (byte 4r + i = the file's level byte 4t + i, two levels per byte, as the
    // file has them), then the 16 rows' scales, then their offsets. A Q4_1 row block is d,
    // m (f16 each), then 16 level bytes.
    let ty = GgmlType::Q4_1;
    let c = case(ty, 32, 16, 1, 12);
    for kern in all_paths() {
        let packed = pack(&kern, ty, &c);
        for r in 0..16 {
            for t in 0..4 {
                for i in 0..4 {
                    let at = 64 * t + 32 * (r / 8) + 4 * (r % 8) + i;
                    assert_eq!(
                        packed[at],
                        c.w[r * 20 + 4 + 4 * t + i],
                        "{at} {:?}",
                        kern.path()
                    );
                }
            }
            assert_eq!(&packed[256 + 2 * r..258 + 2 * r], &c.w[r * 20..r * 20 + 2]);
        }
    }
}

#[test]
fn packed_matmul_is_bit_identical_to_the_panel_matmul() {
    // On each path, against that path's panel kernel: every column count through the
    // decode tiles (one column, 4 panels at a time) and the batch tiles (8, 4, 2 and 1
    // columns with 512-bit vectors, 4 and 1 with 256-bit ones), row counts around the 8-row
    // panel, the panel pairs of the 512-bit tiles and the 4-panel decode tile; with the
    // prefetches going to L1 and to L2 (a setting of speed only).
    let settings = all_paths()
        .into_iter()
        .flat_map(|k| [k.with_prefetch(Prefetch::L1), k.with_prefetch(Prefetch::L2)]);
    for kern in settings {
        let panel_kern = if kern.path() == microllm_kernels::KernelPath::Scalar {
            kern
        } else {
            avx2().expect("a SIMD path implies AVX2")
        };
        for ty in PACKED_TYPES {
            for (k, n_rows) in [(32, 1), (576, 13), (96, 40), (1536, 37), (256, 72)] {
                let k = fit(ty, k);
                for n_cols in [1, 2, 3, 4, 5, 7, 8, 9, 15, 16] {
                    let c = case(ty, k, n_rows, n_cols, (k * 7 + n_rows * 3 + n_cols) as u64);
                    let packed = pack(&kern, ty, &c);
                    assert_eq!(
                        bits(&run_packed(&kern, ty, &c, &packed)),
                        bits(&run_panel(&panel_kern, ty, &c)),
                        "{} k={k} {n_rows}x{n_cols} {:?} prefetch {}",
                        ty.name(),
                        kern.path(),
                        kern.prefetch()
                    );
                }
            }
        }
    }
}

#[test]
fn simd_paths_match_the_scalar_specification() {
    let s = scalar();
    for kern in avx2().into_iter().chain(vnni()) {
        for ty in PACKED_TYPES {
            for (k, n_rows, n_cols) in [(576, 24, 1), (576, 21, 8), (1536, 16, 3)] {
                let k = fit(ty, k);
                let c = case(ty, k, n_rows, n_cols, (k + n_rows * n_cols) as u64);
                let packed = pack(&s, ty, &c);
                let want = run_packed(&s, ty, &c, &packed);
                let got = run_packed(&kern, ty, &c, &packed);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{} k={k} {n_rows}x{n_cols} output {i}: {g} vs {w} ({:?})",
                        ty.name(),
                        kern.path()
                    );
                }
            }
        }
    }
}

#[test]
fn rows_split_at_panels_and_columns_alone_give_the_same_bits() {
    for kern in all_paths() {
        for ty in PACKED_TYPES {
            let (k, n_rows, n_cols) = (fit(ty, 576), 45, 9);
            let c = case(ty, k, n_rows, n_cols, 5 + ty as u64);
            let packed = pack(&kern, ty, &c);
            let whole = run_packed(&kern, ty, &c, &packed);
            // Rows 0..16 and 16..45 in two calls (the second starting at panel 2).
            let pb = kern.packed_len(ty, k, 8).unwrap();
            let mut split = vec![0f32; n_cols * n_rows];
            kern.gemm_packed(ty, k, &packed, 16, &c.act, n_cols, &mut split, n_rows);
            kern.gemm_packed(
                ty,
                k,
                &packed[2 * pb..],
                29,
                &c.act,
                n_cols,
                &mut split[16..],
                n_rows,
            );
            assert_eq!(bits(&whole), bits(&split), "{} row split", ty.name());
            let ab = panel::act_row_bytes(k);
            for col in 0..n_cols {
                let mut one = vec![0f32; n_rows];
                kern.gemm_packed(
                    ty,
                    k,
                    &packed,
                    n_rows,
                    &c.act[col * ab..(col + 1) * ab],
                    1,
                    &mut one,
                    n_rows,
                );
                assert_eq!(
                    bits(&whole[col * n_rows..(col + 1) * n_rows]),
                    bits(&one),
                    "{} column {col} alone",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn offsets_beyond_f16_range_are_computed_not_stored() {
    // Q4_0's offset is 8 * d and Q5_0's 16 * d: with d = 10000 (an f16) they are 80000 and
    // 160000, beyond f16's range. They are not stored but computed in f32, so such matrices
    // pack and still give the panel matmul's bits.
    let k = 64;
    for (ty, block) in [(GgmlType::Q4_0, 18), (GgmlType::Q5_0, 22)] {
        let mut rng = Rng::new(9);
        let mut w = rng.bytes(2 * block);
        for b in 0..2 {
            w[b * block..b * block + 2]
                .copy_from_slice(&half::f16::from_f32(10000.0).to_bits().to_le_bytes());
        }
        let ab = panel::act_row_bytes(k);
        let mut act = vec![0u8; ab];
        let x = rng.vec(k, 1.0);
        scalar().quantize_panel_act(&x, &mut act).unwrap();
        let c = Case {
            k,
            n_rows: 1,
            n_cols: 1,
            w,
            act,
        };
        for kern in all_paths() {
            let packed = pack(&kern, ty, &c);
            let got = run_packed(&kern, ty, &c, &packed);
            let panel_kern = if kern.path() == microllm_kernels::KernelPath::Scalar {
                kern
            } else {
                avx2().expect("a SIMD path implies AVX2")
            };
            assert!(got[0].is_finite() && got[0].abs() > 1e3, "{got:?}");
            assert_eq!(
                bits(&got),
                bits(&run_panel(&panel_kern, ty, &c)),
                "{}",
                ty.name()
            );
        }
    }
    assert!(!scalar().pack_supports(GgmlType::Q3_K));
    assert_eq!(scalar().packed_len(GgmlType::Q3_K, 256, 8), None);
    assert_eq!(scalar().packed_len(GgmlType::Q6_K, 288, 8), None);
    assert_eq!(scalar().packed_len(GgmlType::Q4_K, 288, 8), None);
    assert_eq!(scalar().packed_len(GgmlType::Q4_1, 48, 8), None);
}

#[test]
fn the_prefetch_setting_is_parsed_and_bad_values_say_what_to_do() {
    assert_eq!(Prefetch::from_setting("l1").unwrap(), Prefetch::L1);
    assert_eq!(Prefetch::from_setting(" L2 ").unwrap(), Prefetch::L2);
    assert_eq!(Prefetch::from_setting("auto").unwrap(), Prefetch::L1);
    assert_eq!(Prefetch::from_setting("").unwrap(), Prefetch::L1);
    let e = Prefetch::from_setting("l3").unwrap_err().to_string();
    assert!(
        e.contains("MICROLLM_PREFETCH") && e.contains("l1, l2 or auto"),
        "{e}"
    );
    // Every constructor picks the default; `with_prefetch` changes only that.
    let k = Kernels::detect();
    assert_eq!(k.prefetch(), Prefetch::L1);
    let other = k.with_prefetch(Prefetch::L2);
    assert_eq!((other.path(), other.prefetch()), (k.path(), Prefetch::L2));
}

#[test]
fn the_bandwidth_probe_sums_every_word_on_every_path() {
    let mut rng = Rng::new(7);
    // Lengths around the SIMD loop's 64-byte step, with a partial word at the end.
    for len in [0usize, 7, 8, 63, 64, 65, 200, 4096 + 24, 10_000 + 3] {
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let want = data
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .fold(0u64, u64::wrapping_add);
        for kern in all_paths() {
            assert_eq!(
                kern.stream_sum(&data),
                want,
                "{len} bytes {:?}",
                kern.path()
            );
        }
    }
}
