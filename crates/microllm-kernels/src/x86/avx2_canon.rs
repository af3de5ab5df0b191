//! AVX2 unpacking of weight rows into a panel (see `crate::panel`): the same bytes and
//! floats as `Panel::fill`, tested against it.
//!
//! Per 32 elements, each of the panel's 8 rows is unpacked into one vector of levels (a few
//! shifts and masks of the packed bytes), then the 8 vectors are transposed as an 8 x 8 matrix
//! of 4-byte units, which is exactly the panel's interleaved layout. The scales and offsets
//! come from `panel::canon_scales`, the one scalar definition every path shares.

use core::arch::x86_64::*;

use super::avx2::{bits_to_bytes, h2f, nibbles, prefetch_ahead, rd32};

/// How far ahead of the rows being unpacked their successors are prefetched (bytes).
const PREFETCH_AHEAD: usize = 8 * 1024;
use crate::format::Fmt;
use crate::panel::{act_offsets, canon_scales, Panel, PanelShape, PANEL_ROWS};

/// Format codes for the const-generic unpackers.
const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q5_0: u8 = 2;
const F_Q5_1: u8 = 3;
const F_Q4_K: u8 = 4;
const F_Q5_K: u8 = 5;
const F_Q6_K: u8 = 6;
const F_Q3_K: u8 = 7;
const F_Q2_K: u8 = 8;
const F_Q8_0: u8 = 9;

/// (elements, bytes) of one block of format `F`.
const fn block_shape(f: u8) -> (usize, usize) {
    match f {
        F_Q4_0 => (32, 18),
        F_Q4_1 => (32, 20),
        F_Q5_0 => (32, 22),
        F_Q5_1 => (32, 24),
        F_Q4_K => (256, 144),
        F_Q5_K => (256, 176),
        F_Q6_K => (256, 210),
        F_Q3_K => (256, 110),
        F_Q8_0 => (32, 34),
        _ => (256, 84),
    }
}

/// Bytes of `v` shifted right by `n` bits (0..8), keeping the bits of `mask`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shr_mask(v: __m256i, n: u32, mask: i8) -> __m256i {
    // 16-bit shifts carry bits of the upper byte into the lower one; the mask drops them.
    let s = _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32));
    _mm256_and_si256(s, _mm256_set1_epi8(mask))
}

/// The 32 levels of elements `32c .. 32c + 32` of the row at `row`.
///
/// # Safety
/// The block holding those elements (`block_shape(F)` bytes at `row + (32c / elems) * bytes`)
/// must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn levels<const F: u8>(row: *const u8, c: usize) -> __m256i {
    let (elems, bytes) = const { block_shape(F) };
    // SAFETY: (all arms) every read below is inside the block at `b`, `bytes` bytes long,
    // laid out as crate::blocks describes (offsets of its fields in parentheses).
    unsafe {
        let b = row.add((32 * c / elems) * bytes);
        let i = c % 8; // chunk of 32 inside a K-quant super-block
        let load = |at: usize| _mm256_loadu_si256(b.add(at).cast());
        match F {
            F_Q4_0 => nibbles(b.add(2)), // d(0) qs(2)
            F_Q8_0 => load(2),           // d(0) qs(2), signed
            F_Q4_1 => nibbles(b.add(4)), // d(0) m(2) qs(4)
            F_Q5_0 | F_Q5_1 => {
                // d(0) [m(2)] qh(2|4) qs(6|8)
                let qh_at = if F == F_Q5_0 { 2 } else { 4 };
                let hi = _mm256_and_si256(bits_to_bytes(rd32(b.add(qh_at))), _mm256_set1_epi8(16));
                _mm256_or_si256(nibbles(b.add(qh_at + 4)), hi)
            }
            F_Q4_K => shr_mask(load(16 + 32 * (i / 2)), 4 * (i as u32 % 2), 0x0f), // qs(16)
            F_Q5_K => {
                // qh(16) qs(48): bit i of qh[l] is the fifth bit of element 32i + l.
                let lo = shr_mask(load(48 + 32 * (i / 2)), 4 * (i as u32 % 2), 0x0f);
                let hi = _mm256_slli_epi16(shr_mask(load(16), i as u32, 1), 4);
                _mm256_or_si256(lo, hi)
            }
            F_Q6_K => {
                // ql(0) qh(128): element 128h + 32kk + l.
                let (h, kk) = (i / 4, i % 4);
                let lo = shr_mask(load(64 * h + 32 * (kk % 2)), 4 * (kk as u32 / 2), 0x0f);
                let hi = _mm256_slli_epi16(shr_mask(load(128 + 32 * h), 2 * kk as u32, 3), 4);
                _mm256_or_si256(lo, hi)
            }
            F_Q3_K => {
                // hmask(0) qs(32)
                let (h, kk) = (i / 4, i % 4);
                let lo = shr_mask(load(32 + 32 * h), 2 * kk as u32, 3);
                let hi = _mm256_slli_epi16(shr_mask(load(0), (4 * h + kk) as u32, 1), 2);
                _mm256_or_si256(lo, hi)
            }
            _ => {
                // Q2_K: scales(0) qs(16)
                let (h, kk) = (i / 4, i % 4);
                shr_mask(load(16 + 32 * h), 2 * kk as u32, 3)
            }
        }
    }
}

/// Transposes 8 vectors (rows) of 8 four-byte units: output `j` holds unit `j` of rows 0..8
/// in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
    let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
    let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    // u_j: rows 0..4 (or 4..8) of units j and j + 4 in the two 128-bit halves.
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    [
        _mm256_permute2x128_si256::<0x20>(u0, u4),
        _mm256_permute2x128_si256::<0x20>(u1, u5),
        _mm256_permute2x128_si256::<0x20>(u2, u6),
        _mm256_permute2x128_si256::<0x20>(u3, u7),
        _mm256_permute2x128_si256::<0x31>(u0, u4),
        _mm256_permute2x128_si256::<0x31>(u1, u5),
        _mm256_permute2x128_si256::<0x31>(u2, u6),
        _mm256_permute2x128_si256::<0x31>(u3, u7),
    ]
}

/// The levels of rows `0..n` into `p.q` (rows past `n` zero).
///
/// # Safety
/// `p.q` holds `k * 8` bytes; `k` is a multiple of the format's block size and
/// `w[r * w_row ..]` holds the `k / elems` blocks of row `r < n`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fill_levels<const F: u8>(q: &mut [u8], k: usize, w: &[u8], w_row: usize, n: usize) {
    let (elems, bytes) = const { block_shape(F) };
    assert!((1..=PANEL_ROWS).contains(&n) && k.is_multiple_of(elems));
    assert!(
        w.len() >= (n - 1) * w_row + (k / elems) * bytes,
        "panel: rows too short"
    );
    assert!(q.len() >= k * PANEL_ROWS);
    let (wp, qp) = (w.as_ptr(), q.as_mut_ptr());
    // 32 elements of the 8 rows at a time, straight from the packed rows into registers,
    // interleaved by the transpose (a first pass of whole rows through an L1 scratch, then
    // the transposes, was slower: 35 -> 27 us per 1536 x 576 Q4_1 matrix, 37 -> 25 for
    // Q8_0; continuous batching's 8-row steps 380 -> 421 tok/s, medians of 11 alternating
    // runs).
    for c in 0..k / 32 {
        let mut rows = [_mm256_setzero_si256(); PANEL_ROWS];
        for (r, v) in rows.iter_mut().enumerate().take(n) {
            // Weights are read once, from memory: keep each row's next pages coming.
            if c % 2 == 0 {
                prefetch_ahead(wp.wrapping_add(r * w_row + (32 * c / elems) * bytes), 1024);
            }
            // SAFETY: row r < n holds k / elems blocks (asserted above) and 32c < k.
            *v = unsafe { levels::<F>(wp.add(r * w_row), c) };
        }
        for (j, v) in transpose8(rows).into_iter().enumerate() {
            // SAFETY: (8c + j) * 32 + 32 <= k * 8 bytes of q (asserted above).
            unsafe { _mm256_storeu_si256(qp.add((8 * c + j) * 32).cast(), v) };
        }
    }
}

/// AVX2 `Panel::fill`: unpacks rows `0..n` (n <= 8) of `w` (rows `w_row` bytes apart, `k`
/// elements each) into `p`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn fill(
    p: &mut Panel,
    f: Fmt,
    shape: PanelShape,
    k: usize,
    w: &[u8],
    w_row: usize,
    n: usize,
) {
    let n = n.min(PANEL_ROWS);
    p.q.resize(k * PANEL_ROWS, 0);
    // SAFETY: same CPU contract.
    unsafe { fill_scales(p, f, shape, k, w, w_row, n) };
    fill_q(p, f, k, w, w_row, n)
}

/// The scales and offsets part of [`fill`] (`p.s`, `p.m`), sized here.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fill_scales(
    p: &mut Panel,
    f: Fmt,
    shape: PanelShape,
    k: usize,
    w: &[u8],
    w_row: usize,
    n: usize,
) {
    let n = n.min(PANEL_ROWS);
    let ng = k / shape.blk;
    p.s.resize(ng * PANEL_ROWS, 0.0);
    p.m.resize(ng * PANEL_ROWS, 0.0);
    let legacy = matches!(f, Fmt::Q4_0 | Fmt::Q4_1 | Fmt::Q5_0 | Fmt::Q5_1 | Fmt::Q8_0);
    if legacy {
        // SAFETY: same CPU contract; p.s/p.m were sized above; row lengths asserted inside.
        unsafe { legacy_scales(p, f, k, w, w_row, n) };
        return;
    }
    for off in (0..n * w_row).step_by(64) {
        prefetch_ahead(w.as_ptr().wrapping_add(off), PREFETCH_AHEAD);
    }
    for r in 0..PANEL_ROWS {
        if r < n {
            let (s, m) = (&mut p.s, &mut p.m);
            canon_scales(f, &w[r * w_row..(r + 1) * w_row], k, |g, sg, mg| {
                s[g * PANEL_ROWS + r] = sg;
                m[g * PANEL_ROWS + r] = mg;
            });
        } else {
            for g in 0..ng {
                p.s[g * PANEL_ROWS + r] = 0.0;
                p.m[g * PANEL_ROWS + r] = 0.0;
            }
        }
    }
}

/// Lane-wise sums of 8 vectors of 8 i32 (one per row), per 128-bit half: the result's
/// lanes 0..4 are rows 0..4 and 4..8 rows 4..8, as two vectors: the sums of each row's low
/// half and of its high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn row_halves(v: &[__m256i; 8]) -> (__m256i, __m256i) {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    // x: [rows 0..4 low halves | rows 0..4 high halves]; y the same for rows 4..8.
    let x = _mm256_hadd_epi32(h01, h23);
    let y = _mm256_hadd_epi32(h45, h67);
    (
        _mm256_permute2x128_si256::<0x20>(x, y),
        _mm256_permute2x128_si256::<0x31>(x, y),
    )
}

/// The panel matmul's outputs for up to 8 rows and `C` (few) activation columns, straight
/// from the packed rows: each row's 32 levels at a time are dotted with the columns'
/// activation bytes, and the 8 rows' integer sums of a group are gathered into one vector
/// before the same two float operations per group as `avx2_panel::tile` (whose lane `r` is
/// row `r`), so every output is bit-identical to the panel path's. For decode and small
/// batches, where building a panel would cost more than it saves. `s`/`m` hold the rows'
/// scales and offsets as `[group][8]` (see [`fill_scales`]).
///
/// # Safety
/// `n <= 8` rows of `k` elements at `w` (`w_row` apart) as in [`fill_levels`]; `s`/`m` hold
/// `k / BLK * 8` floats; the `C` activation rows at `a` (`a_row` apart) are readable
/// (`act_row_bytes(k)` bytes each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_direct<const F: u8, const BLK: usize, const C: usize>(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    n: usize,
    a: *const u8,
    a_row: usize,
) -> [__m256; C] {
    let (elems, bytes) = const { block_shape(F) };
    assert!((1..=PANEL_ROWS).contains(&n) && k.is_multiple_of(elems));
    assert!(
        w.len() >= (n - 1) * w_row + (k / elems) * bytes,
        "panel: rows too short"
    );
    assert!(elems / BLK <= 16);
    let (od, o32, o16) = act_offsets(k);
    let wp = w.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); C];
    // One group's float step, exactly as avx2_panel::tile.
    let legacy = matches!(F, F_Q4_0 | F_Q4_1 | F_Q5_0 | F_Q5_1 | F_Q8_0);
    // The K-quants' scales of the current super-block, [group][row], computed when the pass
    // reaches it (by the shared scalar definition).
    let mut ks = [0f32; 16 * PANEL_ROWS];
    let mut km = [0f32; 16 * PANEL_ROWS];
    let gps = elems / BLK; // groups per super-block
    let step = |acc: &mut [__m256; C], g: usize, isum: &[__m256i; C], sw: __m256, mw: __m256| {
        // SAFETY: g < k / BLK: inside each column's scales.
        unsafe {
            for c in 0..C {
                let ac = a.add(c * a_row);
                let da = _mm256_broadcast_ss(&*ac.add(od + 4 * (g * BLK / 32)).cast::<f32>());
                let so = if BLK == 32 { o32 } else { o16 };
                let sa = _mm256_broadcast_ss(&*ac.add(so + 4 * g).cast::<f32>());
                let scale = _mm256_mul_ps(sw, da);
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c]), scale, acc[c]);
                acc[c] = _mm256_fnmadd_ps(mw, sa, acc[c]);
            }
        }
    };
    for ch in 0..k / 32 {
        if matches!(F, F_Q4_K | F_Q5_K | F_Q6_K) && (32 * ch) % elems == 0 {
            let sb = 32 * ch / elems;
            // SAFETY: super-block sb of every row < n is inside `w` (asserted above).
            unsafe { k_scales::<F>(wp, w_row, n, sb * bytes, &mut ks, &mut km) };
        } else if !legacy && (32 * ch) % elems == 0 {
            let sb = 32 * ch / elems;
            for r in 0..n {
                let blk = &w[r * w_row + sb * bytes..r * w_row + (sb + 1) * bytes];
                canon_scales(f, blk, elems, |g, sg, mg| {
                    ks[g * PANEL_ROWS + r] = sg;
                    km[g * PANEL_ROWS + r] = mg;
                });
            }
        }
        let scales = |g: usize| {
            let at = (g % gps) * PANEL_ROWS;
            // SAFETY: at + 8 <= 16 * 8 floats of ks/km.
            unsafe {
                (
                    _mm256_loadu_ps(ks.as_ptr().add(at)),
                    _mm256_loadu_ps(km.as_ptr().add(at)),
                )
            }
        };
        let mut lv = [_mm256_setzero_si256(); PANEL_ROWS];
        for (r, v) in lv.iter_mut().enumerate().take(n) {
            let row = wp.wrapping_add(r * w_row);
            prefetch_ahead(row.wrapping_add((32 * ch / elems) * bytes), PREFETCH_AHEAD);
            // SAFETY: row r < n holds k / elems blocks (asserted above) and 32 ch < k.
            *v = unsafe { levels::<F>(row, ch) };
        }
        let mut lo = [_mm256_setzero_si256(); C];
        let mut hi = [_mm256_setzero_si256(); C];
        for c in 0..C {
            // SAFETY: the column's 32 activation bytes of this chunk (caller's contract).
            let av = unsafe { _mm256_loadu_si256(a.add(c * a_row + 32 * ch).cast()) };
            let p: [__m256i; PANEL_ROWS] = core::array::from_fn(|r| {
                let prod = if F == F_Q8_0 {
                    // Signed levels: |w| times a with w's sign (pairs <= 2 * 128 * 127).
                    _mm256_maddubs_epi16(
                        _mm256_sign_epi8(lv[r], lv[r]),
                        _mm256_sign_epi8(av, lv[r]),
                    )
                } else {
                    _mm256_maddubs_epi16(lv[r], av)
                };
                _mm256_madd_epi16(prod, ones)
            });
            (lo[c], hi[c]) = row_halves(&p);
        }
        if BLK == 32 {
            let isum: [__m256i; C] = core::array::from_fn(|c| _mm256_add_epi32(lo[c], hi[c]));
            let (sw, mw) = if legacy {
                // The legacy formats' scales come from the blocks just read (the same floats
                // as legacy_scales), so the rows are touched once, in one streaming pass.
                let rd = |r: usize| {
                    if r < n {
                        // SAFETY: block ch of row r < n is inside `w` (asserted above).
                        (unsafe { rd32(wp.add(r * w_row + ch * bytes)) }) as i32
                    } else {
                        0
                    }
                };
                let dm = _mm256_setr_epi32(rd(0), rd(1), rd(2), rd(3), rd(4), rd(5), rd(6), rd(7));
                let d = f16_lanes(_mm256_and_si256(dm, _mm256_set1_epi32(0xffff)));
                let mw = match F {
                    F_Q8_0 => _mm256_setzero_ps(),
                    F_Q4_0 => _mm256_mul_ps(_mm256_set1_ps(8.0), d),
                    F_Q5_0 => _mm256_mul_ps(_mm256_set1_ps(16.0), d),
                    _ => {
                        _mm256_xor_ps(f16_lanes(_mm256_srli_epi32::<16>(dm)), _mm256_set1_ps(-0.0))
                    }
                };
                (d, mw)
            } else {
                scales(ch)
            };
            step(&mut acc, ch, &isum, sw, mw);
        } else {
            let (sw, mw) = scales(2 * ch);
            step(&mut acc, 2 * ch, &lo, sw, mw);
            let (sw, mw) = scales(2 * ch + 1);
            step(&mut acc, 2 * ch + 1, &hi, sw, mw);
        }
    }
    acc
}

/// Transposes 8 vectors of 8 floats (row `r` = vector `r`): output `j` holds element `j` of
/// every input.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8_ps(r: [__m256; 8]) -> [__m256; 8] {
    let t = transpose8(r.map(|v| _mm256_castps_si256(v)));
    t.map(|v| _mm256_castsi256_ps(v))
}

/// The scales and offsets of one super-block (at byte `at` of each row) of Q4_K/Q5_K (8
/// groups) or Q6_K (16 groups) for rows `0..n` into `ks`/`km` as `[group][row]` (rows past
/// `n` zero): the same floats as `panel::canon_scales` (`d * sc`, `dmin * mn`; `d * sc`,
/// `32 * that`), 8 groups of a row at once, then transposed.
///
/// # Safety
/// Bytes `at .. at + block bytes` of each row `r < n` at `wp + r * w_row` are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_scales<const F: u8>(
    wp: *const u8,
    w_row: usize,
    n: usize,
    at: usize,
    ks: &mut [f32; 16 * PANEL_ROWS],
    km: &mut [f32; 16 * PANEL_ROWS],
) {
    let z = _mm256_setzero_ps();
    let halves = if F == F_Q6_K { 2 } else { 1 };
    for hf in 0..halves {
        let mut sv = [z; PANEL_ROWS];
        let mut mv = [z; PANEL_ROWS];
        for r in 0..n {
            // SAFETY: inside the super-block (caller's contract); field offsets per
            // crate::blocks: Q4_K/Q5_K d(0) dmin(2) scales(4..16); Q6_K scales(192..208) d(208).
            unsafe {
                let b = wp.add(r * w_row + at);
                if F == F_Q6_K {
                    let d = _mm256_set1_ps(h2f(rd32(b.add(208)) as u16));
                    let sc8 = _mm_loadl_epi64(b.add(192 + 8 * hf).cast());
                    sv[r] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)));
                    mv[r] = _mm256_mul_ps(_mm256_set1_ps(32.0), sv[r]);
                } else {
                    let dm = rd32(b);
                    let d = _mm256_set1_ps(h2f(dm as u16));
                    let dmin = _mm256_set1_ps(h2f((dm >> 16) as u16));
                    let q: [u8; 12] = b.add(4).cast::<[u8; 12]>().read();
                    let mut sc = [0u8; 8];
                    let mut mn = [0u8; 8];
                    for j in 0..8 {
                        (sc[j], mn[j]) = crate::blocks::scale_min_k4(j, &q);
                    }
                    let to_f = |v: [u8; 8]| {
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(v.as_ptr().cast())))
                    };
                    sv[r] = _mm256_mul_ps(d, to_f(sc));
                    mv[r] = _mm256_mul_ps(dmin, to_f(mn));
                }
            }
        }
        for (j, (a, b)) in transpose8_ps(sv)
            .into_iter()
            .zip(transpose8_ps(mv))
            .enumerate()
        {
            let g = 8 * hf + j;
            // SAFETY: g < 16: inside ks/km.
            unsafe {
                _mm256_storeu_ps(ks.as_mut_ptr().add(g * PANEL_ROWS), a);
                _mm256_storeu_ps(km.as_mut_ptr().add(g * PANEL_ROWS), b);
            }
        }
    }
}

/// The f16 values in the low 16 bits of each 32-bit lane, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_lanes(v: __m256i) -> __m256 {
    let h = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(v, v));
    _mm256_cvtph_ps(_mm256_castsi256_si128(h))
}

/// See [`rows_direct`]: rows `0..n` (n <= 8) of `w` for `n_cols` (<= 3) columns, written to
/// `out[c * out_stride + r]` for r < n.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `act` holds `n_cols` activation rows of
/// `act_row_bytes(k)` bytes (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_direct(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    n: usize,
    act: &[u8],
    n_cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = n.min(PANEL_ROWS);
    let a_row = crate::panel::act_row_bytes(k);
    assert!((1..=3).contains(&n_cols) && act.len() >= n_cols * a_row);
    assert!(out.len() >= (n_cols - 1) * out_stride + n);
    let ap = act.as_ptr();
    macro_rules! go {
        ($F:expr, $BLK:expr) => {{
            let mut t = [[0.0f32; PANEL_ROWS]; 3];
            // SAFETY: the row/scale/activation contracts of rows_direct hold (asserted above
            // and inside).
            unsafe {
                match n_cols {
                    1 => {
                        let v = rows_direct::<{ $F }, { $BLK }, 1>(f, k, w, w_row, n, ap, a_row);
                        _mm256_storeu_ps(t[0].as_mut_ptr(), v[0]);
                    }
                    2 => {
                        let v = rows_direct::<{ $F }, { $BLK }, 2>(f, k, w, w_row, n, ap, a_row);
                        for c in 0..2 {
                            _mm256_storeu_ps(t[c].as_mut_ptr(), v[c]);
                        }
                    }
                    _ => {
                        let v = rows_direct::<{ $F }, { $BLK }, 3>(f, k, w, w_row, n, ap, a_row);
                        for c in 0..3 {
                            _mm256_storeu_ps(t[c].as_mut_ptr(), v[c]);
                        }
                    }
                }
            }
            for c in 0..n_cols {
                out[c * out_stride..c * out_stride + n].copy_from_slice(&t[c][..n]);
            }
        }};
    }
    match f {
        Fmt::Q4_0 => go!(F_Q4_0, 32),
        Fmt::Q4_1 => go!(F_Q4_1, 32),
        Fmt::Q5_0 => go!(F_Q5_0, 32),
        Fmt::Q5_1 => go!(F_Q5_1, 32),
        Fmt::Q4_K => go!(F_Q4_K, 32),
        Fmt::Q5_K => go!(F_Q5_K, 32),
        Fmt::Q6_K => go!(F_Q6_K, 16),
        Fmt::Q3_K => go!(F_Q3_K, 16),
        Fmt::Q2_K => go!(F_Q2_K, 16),
        Fmt::Q8_0 => go!(F_Q8_0, 32),
        _ => unreachable!("no panel kernel for {f:?}"),
    }
}

/// The levels part of [`fill`].
#[target_feature(enable = "avx2,fma,f16c")]
fn fill_q(p: &mut Panel, f: Fmt, k: usize, w: &[u8], w_row: usize, n: usize) {
    let q = &mut p.q;
    // SAFETY: same CPU contract; q was sized by the caller; row lengths are asserted inside.
    unsafe {
        match f {
            Fmt::Q4_0 => fill_levels::<F_Q4_0>(q, k, w, w_row, n),
            Fmt::Q4_1 => fill_levels::<F_Q4_1>(q, k, w, w_row, n),
            Fmt::Q5_0 => fill_levels::<F_Q5_0>(q, k, w, w_row, n),
            Fmt::Q5_1 => fill_levels::<F_Q5_1>(q, k, w, w_row, n),
            Fmt::Q4_K => fill_levels::<F_Q4_K>(q, k, w, w_row, n),
            Fmt::Q5_K => fill_levels::<F_Q5_K>(q, k, w, w_row, n),
            Fmt::Q6_K => fill_levels::<F_Q6_K>(q, k, w, w_row, n),
            Fmt::Q3_K => fill_levels::<F_Q3_K>(q, k, w, w_row, n),
            Fmt::Q2_K => fill_levels::<F_Q2_K>(q, k, w, w_row, n),
            Fmt::Q8_0 => fill_levels::<F_Q8_0>(q, k, w, w_row, n),
            _ => unreachable!("no panel kernel for {f:?}"),
        }
    }
}

/// The scales and offsets of the legacy formats (one f16 scale, and for Q4_1/Q5_1 an f16
/// min, at the start of each 32-element block): the blocks' first 4 bytes are collected row
/// by row (memory order, prefetched), then each block's 8 rows are converted at once (one
/// pack, one f16 conversion for the 8 scales and the 8 second fields); the same floats as
/// `panel::canon_scales` (s = d; m = 8d, 16d or -min; rows past `n` zero).
///
/// # Safety
/// `p.s`/`p.m` hold `k / 32 * 8` floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_scales(p: &mut Panel, f: Fmt, k: usize, w: &[u8], w_row: usize, n: usize) {
    let bytes = match f {
        Fmt::Q4_0 => 18,
        Fmt::Q4_1 => 20,
        Fmt::Q5_0 => 22,
        Fmt::Q8_0 => 34,
        _ => 24,
    };
    let nb = k / 32;
    assert!((1..=PANEL_ROWS).contains(&n));
    assert!(
        w.len() >= (n - 1) * w_row + nb * bytes,
        "panel: rows too short"
    );
    assert!(p.s.len() >= nb * PANEL_ROWS && p.m.len() >= nb * PANEL_ROWS);
    // dm[b * 8 + r]: the first 4 bytes of block b of row r (zero past n), in p.rows.
    let dm_bytes = nb * PANEL_ROWS * 4;
    if p.rows.len() < dm_bytes {
        p.rows.resize(dm_bytes, 0);
    }
    let dm = p.rows.as_mut_ptr();
    for r in 0..PANEL_ROWS {
        for b in 0..nb {
            let v = if r < n {
                let at = r * w_row + b * bytes;
                // Weights are read once, from memory: keep the next pages coming (the
                // hardware prefetcher stops at page boundaries).
                if b % 4 == 0 {
                    prefetch_ahead(w.as_ptr().wrapping_add(at), PREFETCH_AHEAD);
                }
                // SAFETY: block b of row r < n starts inside `w` with 4 readable bytes
                // (asserted above).
                unsafe { rd32(w.as_ptr().add(at)) }
            } else {
                0
            };
            // SAFETY: (b * 8 + r) * 4 + 4 <= dm_bytes, the size of p.rows (grown above).
            unsafe {
                dm.add((b * PANEL_ROWS + r) * 4)
                    .cast::<u32>()
                    .write_unaligned(v)
            };
        }
    }
    let lo_mask = _mm256_set1_epi32(0xffff);
    let live = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let (sp, mp) = (p.s.as_mut_ptr(), p.m.as_mut_ptr());
    for b in 0..nb {
        // SAFETY: 32 bytes of dm at b * 32 (< dm_bytes); 8 floats of s/m at b * 8 (sizes
        // asserted above).
        unsafe {
            let v = _mm256_loadu_si256(dm.add(b * 32).cast());
            // [d0..3 m0..3 | d4..7 m4..7] as u16, then [d0..7 | m0..7].
            let packed =
                _mm256_packus_epi32(_mm256_and_si256(v, lo_mask), _mm256_srli_epi32::<16>(v));
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            let d = _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
            let m = match f {
                Fmt::Q8_0 => _mm256_setzero_ps(),
                Fmt::Q4_0 => _mm256_mul_ps(_mm256_set1_ps(8.0), d),
                Fmt::Q5_0 => _mm256_mul_ps(_mm256_set1_ps(16.0), d),
                _ => {
                    let mn = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(packed));
                    // -min, and plain zeros (not -0.0) for the rows past n.
                    _mm256_and_ps(
                        _mm256_xor_ps(mn, _mm256_set1_ps(-0.0)),
                        _mm256_castsi256_ps(live),
                    )
                }
            };
            _mm256_storeu_ps(sp.add(b * PANEL_ROWS), d);
            _mm256_storeu_ps(mp.add(b * PANEL_ROWS), m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::panel::PanelShape;

    /// Random bytes are valid blocks of every format (any bit pattern is a level; the f16
    /// scales may be anything, compared bit for bit).
    fn rand_bytes(n: usize, seed: &mut u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (*seed >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn avx2_fill_is_the_scalar_fill() {
        if !super::super::avx2_fma_f16c_detected() {
            return;
        }
        let mut seed = 5;
        for f in [
            Fmt::Q8_0,
            Fmt::Q4_0,
            Fmt::Q4_1,
            Fmt::Q5_0,
            Fmt::Q5_1,
            Fmt::Q4_K,
            Fmt::Q5_K,
            Fmt::Q6_K,
            Fmt::Q3_K,
            Fmt::Q2_K,
        ] {
            let shape = PanelShape::of(f).unwrap();
            let (elems, bytes) = block_shape(match f {
                Fmt::Q8_0 => F_Q8_0,
                Fmt::Q4_0 => F_Q4_0,
                Fmt::Q4_1 => F_Q4_1,
                Fmt::Q5_0 => F_Q5_0,
                Fmt::Q5_1 => F_Q5_1,
                Fmt::Q4_K => F_Q4_K,
                Fmt::Q5_K => F_Q5_K,
                Fmt::Q6_K => F_Q6_K,
                Fmt::Q3_K => F_Q3_K,
                _ => F_Q2_K,
            });
            for nblk in [1, 3] {
                let k = nblk * elems;
                let w_row = nblk * bytes;
                for n in [1, 5, 8] {
                    let mut w = rand_bytes(n * w_row, &mut seed);
                    // Keep the f16 scales finite so the floats compare as numbers too.
                    for b in w.chunks_exact_mut(bytes) {
                        for x in b.iter_mut() {
                            if *x & 0x7c == 0x7c {
                                *x = 0x3c;
                            }
                        }
                    }
                    let (mut a, mut b) = (Panel::default(), Panel::default());
                    // Stale contents must be overwritten the same way on both paths.
                    b.q = vec![0xaa; k * 8];
                    b.s = vec![7.0; k * 8 / shape.blk];
                    b.m = vec![7.0; k * 8 / shape.blk];
                    a.fill(f, shape, k, &w, w_row, n);
                    // SAFETY: AVX2/FMA/F16C detected above.
                    unsafe { fill(&mut b, f, shape, k, &w, w_row, n) };
                    assert_eq!(a.q, b.q, "{f:?} k={k} n={n}: levels");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a.s), bits(&b.s), "{f:?} k={k} n={n}: scales");
                    assert_eq!(bits(&a.m), bits(&b.m), "{f:?} k={k} n={n}: offsets");
                }
            }
        }
    }
}
