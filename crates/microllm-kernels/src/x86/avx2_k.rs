//! AVX2 kernels for the K-quants (Q2_K .. Q6_K weights, Q8_K activations).
//!
//! The float arithmetic is llama.cpp's, exactly: each tile computes, per weight row and
//! activation column, the exact integer sums of a 256-element super-block and then performs
//! the f32 operations of one of ggml-cpu's x86 kernels, in the same order, as described on
//! [`KOrder`] (the scalar twin is `reference::dot_k`; the tests require bit equality).
//!
//! Integer part, shared by every order: the super-block is walked in 32-element chunks `V`;
//! chunk `V` of a row is unpacked to 32 levels (unsigned, or signed -4..=3 for Q3_K), multiplied
//! with the activation bytes by `maddubs` (pairs, exact in i16) and by the group scales with
//! `madd` (i32), and added into 8 i32 lanes: lane `l` ends up holding the elements
//! `32V + 4l .. +4` of every chunk, which is exactly the lane content of ggml's
//! `ggml_vec_dot_q*_K_q8_K` (the `VecDot` order needs the lanes, the others only their sum).
//!
//! Tiles are up to [`ROWS`] rows x [`COLS`] columns; with several rows, the per-super-block
//! float work is done 4 rows at a time in 128-bit lanes (lane = row), after a horizontal
//! reduction of the integer lanes. The driver picks the order per column from the number of
//! columns, as llama.cpp does ([`k_order_fmt`]); a tile never mixes two orders.

use super::avx2::{f16x2, h2f, hsum_epi32, hsum_ps, prefetch_ahead, prefetch_distance, rd16, rd32};
use super::avx2::{f4, reduce_rows, COLS, ROWS};
use crate::blocks::QK_K;
use crate::format::Fmt;
use crate::reference::{k_order_fmt, KOrder};
use core::arch::x86_64::*;

// Weight-format tags for const generics.
const K2: u8 = 0;
const K3: u8 = 1;
const K4: u8 = 2;
const K5: u8 = 3;
const K6: u8 = 4;

/// Bytes per Q8_K activation block.
const A_BYTES: usize = 292;

const fn k_bytes(w: u8) -> usize {
    match w {
        K2 => 84,
        K3 => 110,
        K4 => 144,
        K5 => 176,
        _ => 210,
    }
}

const fn k_fmt(w: u8) -> Fmt {
    match w {
        K2 => Fmt::Q2_K,
        K3 => Fmt::Q3_K,
        K4 => Fmt::Q4_K,
        K5 => Fmt::Q5_K,
        _ => Fmt::Q6_K,
    }
}

/// Whether the format has per-group minimums.
const fn has_min(w: u8) -> bool {
    matches!(w, K2 | K4 | K5)
}

/// Chunks unpacked together (they share loads): Q4_K/Q5_K nibble pairs, the others 4.
const fn group(w: u8) -> usize {
    if matches!(w, K4 | K5) {
        2
    } else {
        4
    }
}

/// The two accumulation orders of a format: `SEC = false` is the one for few columns.
const fn order_of(w: u8, sec: bool) -> KOrder {
    match (w, sec) {
        (K4, false) => KOrder::RepackGemv,
        (K4, true) => KOrder::RepackGemm,
        (_, false) => KOrder::VecDot,
        (_, true) => KOrder::Tiled,
    }
}

/// Byte shuffles building the i16 scale vector of chunk `V` from a vector holding 8 group
/// scales (as i16) in both 128-bit halves: lanes 0..8 get group `2V`, lanes 8..16 group
/// `2V + 1` (indices mod 8; chunks 0..4 read groups 0..8, chunks 4..8 groups 8..16).
static SCV_SHUF: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut v = 0;
    while v < 4 {
        let mut i = 0;
        while i < 32 {
            let e = 2 * v + i / 16; // group index within the half-table
            t[v][i] = (2 * e + i % 2) as u8;
            i += 1;
        }
        v += 1;
    }
    t
};

/// One row's super-block header: 16 group scales as i8 (32-element sub-blocks repeated), 16
/// group minimums as i16 (zero for formats without), and the f32 scales.
#[derive(Clone, Copy)]
struct Head {
    sc8: __m128i,
    mins16: __m256i,
    d: f32,
    dmin: f32,
}

/// Decode the scales of the super-block at `p`.
///
/// # Safety
/// `p..p + k_bytes(W)` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn head<const W: u8>(p: *const u8) -> Head {
    const KM1: u32 = 0x3f3f_3f3f;
    const KM2: u32 = 0x0f0f_0f0f;
    const KM3: u32 = 0x0303_0303;
    // Each arm reads only inside the block layout (crate::blocks); the caller guarantees
    // the whole block is readable.
    match W {
        K2 => {
            // SAFETY: scales at 0..16, d/dmin at 80..84 of an 84-byte block.
            let (raw, dm) = unsafe { (_mm_loadu_si128(p.cast()), f16x2(p.add(80))) };
            let m4 = _mm_set1_epi8(0x0f);
            Head {
                sc8: _mm_and_si128(raw, m4),
                mins16: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(raw), m4)),
                d: _mm_cvtss_f32(dm),
                dmin: _mm_cvtss_f32(_mm_movehdup_ps(dm)),
            }
        }
        K3 => {
            // SAFETY: scales at 96..108, d at 108..110 of a 110-byte block.
            let (a0, a1, a2, d) = unsafe {
                (
                    rd32(p.add(96)),
                    rd32(p.add(100)),
                    rd32(p.add(104)),
                    rd16(p.add(108)),
                )
            };
            let s0 = (a0 & KM2) | ((a2 & KM3) << 4);
            let s1 = (a1 & KM2) | (((a2 >> 2) & KM3) << 4);
            let s2 = ((a0 >> 4) & KM2) | (((a2 >> 4) & KM3) << 4);
            let s3 = ((a1 >> 4) & KM2) | (((a2 >> 6) & KM3) << 4);
            let v = _mm_setr_epi32(s0 as i32, s1 as i32, s2 as i32, s3 as i32);
            Head {
                sc8: _mm_sub_epi8(v, _mm_set1_epi8(32)),
                mins16: _mm256_setzero_si256(),
                d: h2f(d),
                dmin: 0.0,
            }
        }
        K4 | K5 => {
            // SAFETY: d/dmin at 0..4, scales at 4..16 of a 144/176-byte block.
            let (dm, u0, u1, u2) =
                unsafe { (f16x2(p), rd32(p.add(4)), rd32(p.add(8)), rd32(p.add(12))) };
            // ggml's 6-bit unpacking: bytes 0..8 = scales, 8..16 = mins.
            let s_lo = u0 & KM1;
            let s_hi = (u2 & KM2) | (((u0 >> 6) & KM3) << 4);
            let m_lo = u1 & KM1;
            let m_hi = ((u2 >> 4) & KM2) | (((u1 >> 6) & KM3) << 4);
            let v = _mm_setr_epi32(s_lo as i32, s_hi as i32, m_lo as i32, m_hi as i32);
            let dup_lo = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            let dup_hi = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
            Head {
                sc8: _mm_shuffle_epi8(v, dup_lo),
                mins16: _mm256_cvtepu8_epi16(_mm_shuffle_epi8(v, dup_hi)),
                d: _mm_cvtss_f32(dm),
                dmin: _mm_cvtss_f32(_mm_movehdup_ps(dm)),
            }
        }
        _ => {
            // SAFETY: scales at 192..208, d at 208..210 of a 210-byte block.
            let (sc, d) = unsafe { (_mm_loadu_si128(p.add(192).cast()), rd16(p.add(208))) };
            Head {
                sc8: sc,
                mins16: _mm256_setzero_si256(),
                d: h2f(d),
                dmin: 0.0,
            }
        }
    }
}

/// Shift the 16-bit lanes right by a run-time count.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// Chunks `g * G .. g * G + G` of the super-block at `p`, as 32 levels each (unused entries
/// zero): unsigned for every format but Q3_K, whose levels are signed -4..=3.
///
/// # Safety
/// `p..p + k_bytes(W)` readable; `g < 8 / group(W)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunks<const W: u8>(p: *const u8, g: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let z = _mm256_setzero_si256();
    // Every load below stays inside the block (offsets from crate::blocks, g bounded).
    match W {
        K2 => {
            // SAFETY: qs at 16..80; g < 2 reads 16 + 32g .. 48 + 32g.
            let raw = unsafe { _mm256_loadu_si256(p.add(16 + 32 * g).cast()) };
            [0, 1, 2, 3].map(|k| _mm256_and_si256(srl16(raw, 2 * k), m3))
        }
        K3 => {
            // SAFETY: hmask at 0..32, qs at 32..96; g < 2.
            let (hm, raw) = unsafe {
                (
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(p.add(32 + 32 * g).cast()),
                )
            };
            // Third bits of chunk 4g + k at bit k of `hs`; moved to bit 2 with an immediate
            // shift per chunk.
            let hs = srl16(hm, 4 * g);
            let b2 = _mm256_set1_epi8(4);
            let hb = [
                _mm256_and_si256(_mm256_slli_epi16::<2>(hs), b2),
                _mm256_and_si256(_mm256_slli_epi16::<1>(hs), b2),
                _mm256_and_si256(hs, b2),
                _mm256_and_si256(_mm256_srli_epi16::<1>(hs), b2),
            ];
            [0, 1, 2, 3].map(|k| {
                let low = _mm256_and_si256(srl16(raw, 2 * k), m3);
                _mm256_sub_epi8(_mm256_or_si256(low, hb[k]), _mm256_set1_epi8(4))
            })
        }
        K4 => {
            // SAFETY: qs at 16..144; g < 4.
            let raw = unsafe { _mm256_loadu_si256(p.add(16 + 32 * g).cast()) };
            [
                _mm256_and_si256(raw, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4),
                z,
                z,
            ]
        }
        K5 => {
            // SAFETY: qh at 16..48, qs at 48..176; g < 4.
            let (qh, raw) = unsafe {
                (
                    _mm256_loadu_si256(p.add(16).cast()),
                    _mm256_loadu_si256(p.add(48 + 32 * g).cast()),
                )
            };
            // Fifth bits of chunks 2g and 2g + 1 at bits 0 and 1 of `hs`, moved to bit 4.
            let hs = srl16(qh, 2 * g);
            let b4 = _mm256_set1_epi8(0x10);
            let hi0 = _mm256_and_si256(_mm256_slli_epi16::<4>(hs), b4);
            let hi1 = _mm256_and_si256(_mm256_slli_epi16::<3>(hs), b4);
            [
                _mm256_or_si256(_mm256_and_si256(raw, m4), hi0),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4), hi1),
                z,
                z,
            ]
        }
        _ => {
            // SAFETY: ql at 0..128, qh at 128..192; g < 2.
            let (l0, l1, qh) = unsafe {
                (
                    _mm256_loadu_si256(p.add(64 * g).cast()),
                    _mm256_loadu_si256(p.add(64 * g + 32).cast()),
                    _mm256_loadu_si256(p.add(128 + 32 * g).cast()),
                )
            };
            let hi = |k: usize| _mm256_slli_epi16::<4>(_mm256_and_si256(srl16(qh, 2 * k), m3));
            [
                _mm256_or_si256(_mm256_and_si256(l0, m4), hi(0)),
                _mm256_or_si256(_mm256_and_si256(l1, m4), hi(1)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4), hi(2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4), hi(3)),
            ]
        }
    }
}

/// Dot products of R weight rows (`w`, `w_row` bytes apart, `nb` super-blocks each) with C
/// Q8_K activation columns (`a`, `a_row` bytes apart), accumulated in `order_of(W, SEC)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const W: u8, const R: usize, const C: usize, const SEC: bool>(
    nb: usize,
    w: &[u8],
    w_row: usize,
    a: &[u8],
    a_row: usize,
    prefetch: bool,
) -> [[f32; C]; R] {
    let order = order_of(W, SEC);
    let wb = k_bytes(W);
    let g_n = group(W);
    // Bounds of every raw read below: row r < R, super-block b < nb reads
    // w[r*w_row + b*wb .. + wb]; column c < C reads a[c*a_row + b*A_BYTES .. + A_BYTES].
    assert!((1..=4).contains(&R) && C >= 1);
    assert!(
        w.len() >= (R - 1) * w_row + nb * wb,
        "k tile: weight slice too short"
    );
    assert!(
        a.len() >= (C - 1) * a_row + nb * A_BYTES,
        "k tile: activation slice too short"
    );
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let dist = if prefetch {
        prefetch_distance(R * w_row)
    } else {
        0
    };
    let zi = _mm256_setzero_si256();
    // VecDot: 8 float lanes per (row, column), plus Q5_K's scalar min sum.
    let mut acc8 = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0.0f32; C]; R];
    // Other orders: per column, rows in 128-bit lanes (acc and the min accumulator).
    let mut acc4 = [_mm_setzero_ps(); C];
    let mut accm4 = [_mm_setzero_ps(); C];
    for b in 0..nb {
        let mut ad = [0.0f32; C];
        let mut bs = [zi; C];
        let mut apb = [ap; C];
        for c in 0..C {
            // SAFETY: c < C, b < nb: inside `a` (assert above); Q8_K = d f32, qs[256],
            // bsums[16] i16 at 260.
            unsafe {
                apb[c] = ap.add(c * a_row + b * A_BYTES);
                ad[c] = f32::from_bits(rd32(apb[c]));
                bs[c] = _mm256_loadu_si256(apb[c].add(260).cast());
            }
        }
        let mut hd = [Head {
            sc8: _mm_setzero_si128(),
            mins16: zi,
            d: 0.0,
            dmin: 0.0,
        }; R];
        let mut wpb = [wp; R];
        for r in 0..R {
            // SAFETY: r < R, b < nb: this super-block is inside `w` (assert above).
            unsafe {
                wpb[r] = wp.add(r * w_row + b * wb);
                hd[r] = head::<W>(wpb[r]);
            }
            if prefetch {
                let mut off = 0;
                while off < wb {
                    prefetch_ahead(wpb[r].wrapping_add(off), dist);
                    off += 64;
                }
            }
        }
        // Repacked-gemm min sums per 64 elements: lanes 2sb and 2sb+1 of m * bsum.
        let mut msb = [[[0i32; 4]; C]; R];
        if order == KOrder::RepackGemm {
            for r in 0..R {
                for c in 0..C {
                    let m = _mm256_madd_epi16(hd[r].mins16, bs[c]);
                    // SAFETY: __m256i and [i32; 8] have the same size; every bit pattern is valid.
                    let l: [i32; 8] = unsafe { core::mem::transmute(m) };
                    for sb in 0..4 {
                        msb[r][c][sb] = l[2 * sb] + l[2 * sb + 1];
                    }
                }
            }
        }
        // Group scales as i16, each half-table in both 128-bit lanes (for in-lane shuffles).
        let mut sc_tab = [[zi; 2]; R];
        for r in 0..R {
            let sc16 = _mm256_cvtepi8_epi16(hd[r].sc8);
            sc_tab[r] = [
                _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                _mm256_permute2x128_si256::<0x11>(sc16, sc16),
            ];
        }
        let mut acc = [[zi; C]; R];
        for g in 0..8 / g_n {
            for r in 0..R {
                // SAFETY: row r's super-block is readable (above) and g < 8 / group(W).
                let ws = unsafe { chunks::<W>(wpb[r], g) };
                for (k, &wv) in ws.iter().enumerate().take(g_n) {
                    let v = g * g_n + k;
                    // SAFETY: SCV_SHUF[v % 4] is a 32-byte static.
                    let shuf = unsafe { _mm256_loadu_si256(SCV_SHUF[v % 4].as_ptr().cast()) };
                    let scv = _mm256_shuffle_epi8(sc_tab[r][v / 4], shuf);
                    let wabs = _mm256_sign_epi8(wv, wv);
                    for c in 0..C {
                        // SAFETY: qs of column c's block: bytes 4 + 32v .. 36 + 32v < 260. (A
                        // load per use: it folds into the multiply, and keeping the chunks in
                        // registers across rows spills.)
                        let av = unsafe { _mm256_loadu_si256(apb[c].add(4 + 32 * v).cast()) };
                        let p16 = if W == K3 {
                            // Signed levels: |w| times a with w's sign (exact, |w| <= 4).
                            _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(av, wv))
                        } else {
                            _mm256_maddubs_epi16(wv, av)
                        };
                        acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(p16, scv));
                    }
                }
            }
            if order == KOrder::RepackGemm {
                // One fma pair per 64 elements (g = sub-block pair for Q4_K).
                let dw = f4(&hd.map(|h| h.d));
                let dm = f4(&hd.map(|h| h.dmin));
                for c in 0..C {
                    let col: [__m256i; R] = core::array::from_fn(|r| acc[r][c]);
                    let s4 = reduce_rows(&col);
                    let m = msb.map(|row| row[c][g]);
                    let m4 = _mm_cvtepi32_ps(f4i(&m));
                    let da = _mm_set1_ps(ad[c]);
                    acc4[c] = _mm_fmadd_ps(_mm_cvtepi32_ps(s4), _mm_mul_ps(dw, da), acc4[c]);
                    accm4[c] = _mm_fmadd_ps(m4, _mm_mul_ps(dm, da), accm4[c]);
                    for row in acc.iter_mut() {
                        row[c] = zi;
                    }
                }
            }
        }
        if W == K6 {
            // Q6_K's levels are unsigned: remove 32 * sum(scale * group sum) per lane pair.
            for r in 0..R {
                let sc16 = _mm256_cvtepi8_epi16(hd[r].sc8);
                for c in 0..C {
                    let corr = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs[c], sc16));
                    acc[r][c] = _mm256_sub_epi32(acc[r][c], corr);
                }
            }
        }
        match order {
            KOrder::VecDot => {
                for r in 0..R {
                    for c in 0..C {
                        let d = ad[c] * hd[r].d;
                        let dmin = -ad[c] * hd[r].dmin;
                        if W == K2 {
                            let p = _mm256_madd_epi16(hd[r].mins16, bs[c]);
                            acc8[r][c] = _mm256_fmadd_ps(
                                _mm256_set1_ps(dmin),
                                _mm256_cvtepi32_ps(p),
                                acc8[r][c],
                            );
                        }
                        if W == K5 {
                            let m = hsum_epi32(_mm256_madd_epi16(hd[r].mins16, bs[c]));
                            summs[r][c] = dmin.mul_add(m as f32, summs[r][c]);
                        }
                        acc8[r][c] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d),
                            _mm256_cvtepi32_ps(acc[r][c]),
                            acc8[r][c],
                        );
                    }
                }
            }
            KOrder::Tiled | KOrder::RepackGemv => {
                let dw = f4(&hd.map(|h| h.d));
                let dm = f4(&hd.map(|h| h.dmin));
                for c in 0..C {
                    let col: [__m256i; R] = core::array::from_fn(|r| acc[r][c]);
                    let s4 = _mm_cvtepi32_ps(reduce_rows(&col));
                    let m4 = if has_min(W) {
                        let mins: [__m256i; R] =
                            core::array::from_fn(|r| _mm256_madd_epi16(hd[r].mins16, bs[c]));
                        _mm_cvtepi32_ps(reduce_rows(&mins))
                    } else {
                        _mm_setzero_ps()
                    };
                    let da = _mm_set1_ps(ad[c]);
                    if order == KOrder::Tiled {
                        let mut res = _mm_mul_ps(dw, s4);
                        if has_min(W) {
                            res = _mm_fnmadd_ps(dm, m4, res);
                        }
                        acc4[c] = _mm_fmadd_ps(res, da, acc4[c]);
                    } else {
                        acc4[c] = _mm_fmadd_ps(s4, _mm_mul_ps(dw, da), acc4[c]);
                        accm4[c] = _mm_fmadd_ps(m4, _mm_mul_ps(dm, da), accm4[c]);
                    }
                }
            }
            KOrder::RepackGemm => {}
        }
    }
    let mut out = [[0.0f32; C]; R];
    for c in 0..C {
        let v = match order {
            KOrder::VecDot | KOrder::Tiled => acc4[c],
            KOrder::RepackGemv | KOrder::RepackGemm => _mm_sub_ps(acc4[c], accm4[c]),
        };
        let mut lanes = [0.0f32; 4];
        // SAFETY: 4 writable floats.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), v) };
        for r in 0..R {
            out[r][c] = match order {
                KOrder::VecDot if W == K5 => hsum_ps(acc8[r][c]) + summs[r][c],
                KOrder::VecDot => hsum_ps(acc8[r][c]),
                _ => lanes[r],
            };
        }
    }
    out
}

/// Up to 4 i32 as a 128-bit vector (missing lanes 0).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f4i<const R: usize>(v: &[i32; R]) -> __m128i {
    let g = |i: usize| if i < R { v[i] } else { 0 };
    _mm_setr_epi32(g(0), g(1), g(2), g(3))
}

/// Run the tiles of format `W` over the whole problem; see `Kernels::gemm`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn drive<const W: u8>(
    nb: usize,
    w: &[u8],
    w_row: usize,
    n_rows: usize,
    act: &[u8],
    a_row: usize,
    n_cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let f = k_fmt(W);
    // Columns [0, split) take the first order, [split, n_cols) the second (or vice versa for
    // Q4_K, whose 4-column gemm comes first); a tile never straddles `split`.
    let (split, first_sec) = if W == K4 {
        (n_cols - n_cols % 4, true)
    } else {
        (n_cols, n_cols >= 8)
    };
    debug_assert!(split == 0 || order_of(W, first_sec) == k_order_fmt(f, n_cols, 0));
    debug_assert!(split == n_cols || order_of(W, !first_sec) == k_order_fmt(f, n_cols, split));
    // Rows outer, columns inner: a row tile stays in L1 while the activations stream past.
    let mut r0 = 0;
    while r0 < n_rows {
        let full = n_rows - r0 >= ROWS;
        let wt = &w[r0 * w_row..];
        let mut c0 = 0;
        while c0 < n_cols {
            let (end, sec) = if c0 < split {
                (split, first_sec)
            } else {
                (n_cols, !first_sec)
            };
            let cn = if c0 + COLS <= end { COLS } else { 1 };
            let at = &act[c0 * a_row..];
            let pf = c0 == 0;
            macro_rules! run {
                ($r:expr, $c:expr) => {{
                    let t = if sec {
                        tile::<W, $r, $c, true>(nb, wt, w_row, at, a_row, pf)
                    } else {
                        tile::<W, $r, $c, false>(nb, wt, w_row, at, a_row, pf)
                    };
                    for (r, row) in t.iter().enumerate() {
                        for (c, v) in row.iter().enumerate() {
                            out[(c0 + c) * out_stride + r0 + r] = *v;
                        }
                    }
                }};
            }
            match (full, cn == COLS) {
                (true, true) => run!(ROWS, COLS),
                (true, false) => run!(ROWS, 1),
                (false, true) => run!(1, COLS),
                (false, false) => run!(1, 1),
            }
            c0 += cn;
        }
        r0 += if full { ROWS } else { 1 };
    }
}

/// `Kernels::gemm` for the K-quant weight formats (`w`/`act`/`out` checked by the caller).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    n_rows: usize,
    act: &[u8],
    a_row: usize,
    n_cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let nb = k / QK_K;
    let run = match f {
        Fmt::Q2_K => drive::<K2>,
        Fmt::Q3_K => drive::<K3>,
        Fmt::Q4_K => drive::<K4>,
        Fmt::Q5_K => drive::<K5>,
        Fmt::Q6_K => drive::<K6>,
        _ => unreachable!("not a K-quant weight format"),
    };
    run(nb, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
}

/// One K-quant weight row dotted with one Q8_K row, in the single-column order.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot(f: Fmt, n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n / QK_K;
    let t = match f {
        Fmt::Q2_K => tile::<K2, 1, 1, false>(nb, w, 0, act, 0, false),
        Fmt::Q3_K => tile::<K3, 1, 1, false>(nb, w, 0, act, 0, false),
        Fmt::Q4_K => tile::<K4, 1, 1, false>(nb, w, 0, act, 0, false),
        Fmt::Q5_K => tile::<K5, 1, 1, false>(nb, w, 0, act, 0, false),
        Fmt::Q6_K => tile::<K6, 1, 1, false>(nb, w, 0, act, 0, false),
        _ => unreachable!("not a K-quant weight format"),
    };
    t[0][0]
}

/// Quantize a row to Q8_K exactly as `reference::quantize_q8_k` (first element of largest
/// magnitude sets the sign of `d`, round half to even, group sums). `out` must be the exact
/// row size (checked).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    let nb = x.len() / QK_K;
    assert!(
        x.len() == nb * QK_K && out.len() == nb * A_BYTES,
        "quantize_q8_k: bad lengths"
    );
    let sign = _mm256_set1_ps(-0.0);
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(A_BYTES)) {
        let xp = xb.as_ptr();
        let mut m = _mm256_setzero_ps();
        for i in 0..32 {
            // SAFETY: 8 floats at 8i < 256 = xb.len().
            let v = unsafe { _mm256_loadu_ps(xp.add(8 * i)) };
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        }
        let m1 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m1 = _mm_max_ps(m1, _mm_movehl_ps(m1, m1));
        let amax = _mm_cvtss_f32(_mm_max_ss(m1, _mm_movehdup_ps(m1)));
        if amax == 0.0 {
            ob.fill(0);
            continue;
        }
        // The first element of largest magnitude, as the reference's scalar scan finds it.
        let av = _mm256_set1_ps(amax);
        let mut max = 0.0f32;
        for i in 0..32 {
            // SAFETY: as above.
            let v = unsafe { _mm256_loadu_ps(xp.add(8 * i)) };
            let hit =
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), av));
            if hit != 0 {
                max = xb[8 * i + hit.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let isv = _mm256_set1_ps(iscale);
        let op = ob.as_mut_ptr();
        for g in 0..8 {
            let mut qi = [_mm256_setzero_si256(); 4];
            for (j, q) in qi.iter_mut().enumerate() {
                // SAFETY: 8 floats at 32g + 8j < 256.
                let v = unsafe { _mm256_loadu_ps(xp.add(32 * g + 8 * j)) };
                // Default MXCSR rounding: to nearest, ties to even (ggml's nearest_int).
                *q = _mm256_cvtps_epi32(_mm256_mul_ps(v, isv));
            }
            for h in 0..2 {
                let s = hsum_epi32(_mm256_add_epi32(qi[2 * h], qi[2 * h + 1]));
                let bo = 260 + 2 * (2 * g + h);
                ob[bo..bo + 2].copy_from_slice(&(s as i16).to_le_bytes());
            }
            // Values are within -127..=127, so the saturating packs are exact.
            let p01 = _mm256_packs_epi32(qi[0], qi[1]);
            let p23 = _mm256_packs_epi32(qi[2], qi[3]);
            let p = _mm256_packs_epi16(p01, p23);
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: qs bytes 4 + 32g .. 36 + 32g of this 292-byte block.
            unsafe { _mm256_storeu_si256(op.add(4 + 32 * g).cast(), p) };
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}
