//! The tiled attention (`Kernels::attention_rows`): AVX2 against the scalar specification,
//! and the specification against a one-row-at-a-time llama.cpp-style kernel.

mod common;

use common::{avx2, scalar, vnni, Rng};
use half::f16;

struct Case {
    dk: usize,
    dv: usize,
    q: Vec<f32>,
    last: Vec<u32>,
    keys: Vec<f16>,
    values: Vec<f16>,
    stride_k: usize,
    stride_v: usize,
}

fn case(dk: usize, dv: usize, n_rows: usize, n_kv: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    // Keys/values interleaved with another head's (stride > width), like a GQA cache.
    let (stride_k, stride_v) = (dk * 2, dv * 2);
    let keys = rng
        .vec(n_kv * stride_k, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let values = rng
        .vec(n_kv * stride_v, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let q = rng.vec(n_rows * dk, 0.5);
    // Causal positions: the last rows of a prompt, several heads per token.
    let last = (0..n_rows)
        .map(|r| (n_kv - 1 - (n_rows - 1 - r) / 3) as u32)
        .collect();
    Case {
        dk,
        dv,
        q,
        last,
        keys,
        values,
        stride_k,
        stride_v,
    }
}

fn run(k: &microllm_kernels::Kernels, c: &Case, window: usize, softcap: f32) -> Vec<f32> {
    run_rows(k, c, &c.q, &c.last, window, softcap, false)
}

/// `attention_rows` (or `attention_rows_invariant`) on queries `q` with their `last`, over
/// the keys and values of `c`.
fn run_rows(
    k: &microllm_kernels::Kernels,
    c: &Case,
    q: &[f32],
    last: &[u32],
    window: usize,
    softcap: f32,
    invariant: bool,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; last.len() * c.dv];
    let f = if invariant {
        microllm_kernels::Kernels::attention_rows_invariant
    } else {
        microllm_kernels::Kernels::attention_rows
    };
    f(
        k,
        q,
        c.dk,
        last,
        window,
        &c.keys,
        c.stride_k,
        &c.values,
        c.stride_v,
        1.0 / (c.dk as f32).sqrt(),
        softcap,
        &mut out,
        c.dv,
    );
    out
}

#[test]
fn avx2_matches_the_specification() {
    // AVX2, and the AVX-512 variants where the CPU has them.
    for fast in [avx2(), vnni()].into_iter().flatten() {
        let s = scalar();
        for (dk, dv) in [(64, 64), (256, 256), (128, 64), (8, 16)] {
            for (n_rows, n_kv) in [(1, 1), (3, 17), (9, 40), (33, 70), (40, 100)] {
                for (window, softcap) in [(0, 0.0), (5, 0.0), (0, 30.0), (16, 50.0)] {
                    let c = case(dk, dv, n_rows, n_kv, (dk * 7 + n_rows * 13 + window) as u64);
                    let want = run(&s, &c, window, softcap);
                    let got = run(&fast, &c, window, softcap);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 2e-5 * (1.0 + w.abs()),
                            "dk={dk} dv={dv} rows={n_rows} kv={n_kv} win={window} cap={softcap} \
                             [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn specification_agrees_with_the_one_row_kernel() {
    // attention_f16 is llama.cpp's flash attention (f16 query and accumulator): agreement to
    // f16 precision shows both compute the same softmax-weighted sum over the same keys.
    let s = scalar();
    let (dk, dv) = (64, 64);
    let c = case(dk, dv, 6, 30, 5);
    let got = run(&s, &c, 0, 0.0);
    for (r, &l) in c.last.iter().enumerate() {
        let q16: Vec<f16> = c.q[r * dk..(r + 1) * dk]
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect();
        let mut one = vec![0f32; dv];
        s.attention_f16(
            &q16,
            &c.keys,
            c.stride_k,
            &c.values,
            c.stride_v,
            l as usize + 1,
            1.0 / (dk as f32).sqrt(),
            0.0,
            &mut one,
        );
        for d in 0..dv {
            let (a, b) = (got[r * dv + d], one[d]);
            assert!(
                (a - b).abs() <= 4e-3 * (1.0 + b.abs()),
                "row {r} [{d}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn short_inputs_panic() {
    let c = case(64, 64, 2, 4, 1);
    let r = std::panic::catch_unwind(|| {
        let mut out = vec![0f32; 2 * 64];
        // Row 1 claims key 9 of a 4-key cache.
        scalar().attention_rows(
            &c.q,
            64,
            &[0, 9],
            0,
            &c.keys,
            c.stride_k,
            &c.values,
            c.stride_v,
            1.0,
            0.0,
            &mut out,
            64,
        );
    });
    assert!(r.is_err());
}

/// `attention_rows_part` over `from..to`: (unnormalised out, ml).
fn run_part(
    k: &microllm_kernels::Kernels,
    c: &Case,
    window: usize,
    softcap: f32,
    from: usize,
    to: usize,
) -> (Vec<f32>, Vec<f32>) {
    let n = c.last.len();
    let (mut out, mut ml) = (vec![f32::NAN; n * c.dv], vec![f32::NAN; 2 * n]);
    k.attention_rows_part(
        &c.q,
        c.dk,
        &c.last,
        window,
        &c.keys,
        c.stride_k,
        &c.values,
        c.stride_v,
        1.0 / (c.dk as f32).sqrt(),
        softcap,
        from,
        to,
        &mut out,
        c.dv,
        &mut ml,
    );
    (out, ml)
}

/// Splits `0..n_kv` into `n_parts` ranges, runs each part and merges them.
fn run_split(
    k: &microllm_kernels::Kernels,
    c: &Case,
    window: usize,
    softcap: f32,
    n_kv: usize,
    n_parts: usize,
) -> Vec<f32> {
    let n = c.last.len();
    let mut parts = Vec::new();
    for p in 0..n_parts {
        let (from, to) = (p * n_kv / n_parts, (p + 1) * n_kv / n_parts);
        let (o, ml) = run_part(k, c, window, softcap, from, to);
        parts.extend_from_slice(&o);
        parts.extend_from_slice(&ml);
    }
    let mut out = vec![f32::NAN; n * c.dv];
    k.attention_merge(&parts, n, c.dv, &mut out);
    out
}

#[test]
fn avx2_part_matches_the_specification() {
    // AVX2, and the AVX-512 variants where the CPU has them.
    for fast in [avx2(), vnni()].into_iter().flatten() {
        let s = scalar();
        for (dk, dv) in [(64, 64), (256, 256), (8, 16)] {
            // Decode-like groups (9 heads per KV head for SmolLM2, 4 for Gemma 3) and odd counts.
            for (n_rows, n_kv) in [(1, 1), (4, 37), (9, 101), (9, 300), (33, 70)] {
                for (window, softcap) in [(0, 0.0), (50, 0.0), (0, 30.0)] {
                    let c = case(dk, dv, n_rows, n_kv, (dk * 5 + n_rows * 11 + n_kv) as u64);
                    for (from, to) in [(0, n_kv), (n_kv / 3, n_kv), (1, n_kv / 2 + 1), (n_kv, n_kv)]
                    {
                        let (wo, wml) = run_part(&s, &c, window, softcap, from, to);
                        let (go, gml) = run_part(&fast, &c, window, softcap, from, to);
                        let ctx = format!(
                            "dk={dk} rows={n_rows} kv={n_kv} win={window} cap={softcap} {from}..{to}"
                        );
                        for r in 0..n_rows {
                            let (wm, wl) = (wml[2 * r], wml[2 * r + 1]);
                            let (gm, gl) = (gml[2 * r], gml[2 * r + 1]);
                            if wm == f32::NEG_INFINITY {
                                assert!(gm == f32::NEG_INFINITY && gl == 0.0, "{ctx} row {r}");
                            } else {
                                assert!((gm - wm).abs() <= 2e-5 * (1.0 + wm.abs()), "{ctx} m {r}");
                                assert!((gl - wl).abs() <= 2e-5 * (1.0 + wl.abs()), "{ctx} l {r}");
                            }
                            for d in 0..dv {
                                let (g, w) = (go[r * dv + d], wo[r * dv + d]);
                                // Unnormalised: relative to the row's sum of weights.
                                assert!(
                                    (g - w).abs() <= 2e-5 * (1.0 + wl),
                                    "{ctx} [{r},{d}]: {g} vs {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn split_and_unsplit_agree() {
    let kernels: Vec<_> = [Some(scalar()), avx2()].into_iter().flatten().collect();
    for k in &kernels {
        for (dk, dv, n_rows) in [(64, 64, 9), (256, 256, 4)] {
            for n_kv in [5, 97, 513] {
                for (window, softcap) in [(0, 0.0), (40, 0.0), (0, 50.0)] {
                    let c = case(dk, dv, n_rows, n_kv, (n_kv * 3 + dk) as u64);
                    let want = run(k, &c, window, softcap);
                    for n_parts in [1, 2, 3, 7] {
                        let got = run_split(k, &c, window, softcap, n_kv, n_parts);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                                "{:?} dk={dk} kv={n_kv} win={window} cap={softcap} \
                                 parts={n_parts} [{i}]: {g} vs {w}",
                                k.path()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn merge_of_nothing_is_zero() {
    // Every part saw no key (m = -inf, l = 0): zeros, not NaN.
    let (n_rows, dv) = (2, 16);
    let mut parts = vec![0f32; 3 * n_rows * (dv + 2)];
    for p in 0..3 {
        for r in 0..n_rows {
            parts[p * n_rows * (dv + 2) + n_rows * dv + 2 * r] = f32::NEG_INFINITY;
        }
    }
    let mut out = vec![f32::NAN; n_rows * dv];
    scalar().attention_merge(&parts, n_rows, dv, &mut out);
    assert!(out.iter().all(|&v| v == 0.0));
}

/// Continuous batching's requirement: a row's result is bit-identical whatever rows share
/// its call — alone, with its prompt's neighbours, split at any point, with rows that see
/// more keys (later tiles) or fewer — on every path, and it agrees with the specification.
#[test]
fn invariant_rows_do_not_depend_on_their_company() {
    let s = scalar();
    let kernels: Vec<_> = [Some(scalar()), avx2()].into_iter().flatten().collect();
    for k in &kernels {
        for (dk, dv) in [(64, 64), (256, 256), (128, 64)] {
            for (window, softcap) in [(0, 0.0), (21, 0.0), (0, 30.0)] {
                let n_rows = 45;
                let c = case(dk, dv, n_rows, 100, (dk + window) as u64);
                let alone: Vec<Vec<f32>> = (0..n_rows)
                    .map(|r| {
                        let q = &c.q[r * dk..(r + 1) * dk];
                        run_rows(k, &c, q, &c.last[r..r + 1], window, softcap, true)
                    })
                    .collect();
                // Against the specification (same tolerance as the fast path).
                let want = run(&s, &c, window, softcap);
                for (r, a) in alone.iter().enumerate() {
                    for (i, (g, w)) in a.iter().zip(&want[r * dv..]).enumerate() {
                        assert!(
                            (g - w).abs() <= 2e-5 * (1.0 + w.abs()),
                            "row {r} [{i}]: {g} vs {w}"
                        );
                    }
                }
                // The whole call, then splits at several points.
                for split in [n_rows, 1, 3, 7, 8, 9, 17, 32, 33] {
                    let mut r0 = 0;
                    while r0 < n_rows {
                        let r1 = (r0 + split).min(n_rows);
                        let got = run_rows(
                            k,
                            &c,
                            &c.q[r0 * dk..r1 * dk],
                            &c.last[r0..r1],
                            window,
                            softcap,
                            true,
                        );
                        for r in r0..r1 {
                            let g = &got[(r - r0) * dv..(r - r0 + 1) * dv];
                            assert!(
                                g.iter().zip(&alone[r]).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "row {r} differs in a call of rows {r0}..{r1} (dk {dk}, window {window}, softcap {softcap})"
                            );
                        }
                        r0 = r1;
                    }
                }
                // Decode company: each row next to rows that see far fewer or more keys.
                for r in [0, 10, 44] {
                    let q: Vec<f32> = [r, 0, 44, 3]
                        .iter()
                        .flat_map(|&i| c.q[i * dk..(i + 1) * dk].to_vec())
                        .collect();
                    let last = [c.last[r], 2, 99, 40];
                    let got = run_rows(k, &c, &q, &last, window, softcap, true);
                    assert!(
                        got[..dv]
                            .iter()
                            .zip(&alone[r])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "row {r} differs next to rows of other lengths"
                    );
                }
            }
        }
    }
}

/// A decode step's GQA group — up to 4 rows that see the same keys — takes the AVX2 kernel's
/// direct path (scores and values straight from the f16 cache); the same rows in a call of
/// more rows take the converted-block path. Both give the same bits, close to the
/// specification, for one to four rows, with and without a window or soft-capping, over a
/// context that ends inside a block and one that spans several.
#[test]
fn gqa_groups_give_the_same_bits_on_the_direct_path() {
    // On AVX2, and with AVX-512 (the 512-bit direct path) where the CPU has it; head sizes
    // that take the 512-bit scores and values, and one (dv 48) whose values do not.
    for fast in [avx2(), vnni()].into_iter().flatten() {
        gqa_groups_same_bits(fast);
    }
}

fn gqa_groups_same_bits(fast: microllm_kernels::Kernels) {
    let s = scalar();
    for (dk, dv) in [(64, 64), (256, 256), (128, 64), (32, 48)] {
        for n_kv in [5, 70, 200] {
            for (window, softcap) in [(0, 0.0), (21, 0.0), (0, 30.0)] {
                let n_rows = 9;
                let mut c = case(dk, dv, n_rows, n_kv, (dk + n_kv + window) as u64);
                // Every row is the last token's: they all see keys up to n_kv - 1.
                c.last = vec![(n_kv - 1) as u32; n_rows];
                let all = run_rows(&fast, &c, &c.q, &c.last, window, softcap, true);
                let want = run_rows(&s, &c, &c.q, &c.last, window, softcap, true);
                for (i, (g, w)) in all.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "[{i}]: {g} vs {w}");
                }
                for group in 1..=4 {
                    let got = run_rows(
                        &fast,
                        &c,
                        &c.q[..group * dk],
                        &c.last[..group],
                        window,
                        softcap,
                        true,
                    );
                    assert!(
                        got.iter()
                            .zip(&all)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "a group of {group} rows differs from the same rows in a call of \
                         {n_rows} (dk {dk}, {n_kv} keys, window {window}, softcap {softcap}, \
                         {:?})",
                        fast.path()
                    );
                }
            }
        }
    }
}
