//! AVX2 version of the panel matmul (see `crate::panel` for the design and the scalar
//! specification it is tested against).
//!
//! Inner step: one 32-byte vector of the unpacked panel holds 4 consecutive levels of each of
//! the 8 rows; `vpmaddubsw` with 4 activation bytes broadcast to every 32-bit lane, then
//! `vpmaddwd` with ones, leaves in lane `r` row `r`'s dot over those 4 elements. `G` such
//! steps are summed in 16 bits before widening (`G * 2 * qmax * 127 < 32768`, so no
//! saturation), a group's 32-bit sums become floats once, and one multiply-add by the rows'
//! scales times the column's scale (and one by the rows' offsets times the column's sum)
//! accumulates 8 outputs. Columns go 4 at a time so each panel vector is loaded once for 4
//! columns.

use core::arch::x86_64::*;
use std::cell::RefCell;

use crate::format::Fmt;
use crate::panel::{act_offsets, act_row_bytes, Panel, PanelShape, PANEL_ROWS};

/// Activation columns per tile.
const COLS: usize = 4;

thread_local! {
    /// The unpacked panels of the calling thread, reused across calls (grown, never shrunk).
    static PANEL: RefCell<Vec<Panel>> = const { RefCell::new(Vec::new()) };
}

/// Outputs of one panel (8 rows) for `C` activation columns at `a` (`a_row` bytes apart).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `p` holds a filled panel of `k` elements with groups of
/// `BLK`; `a + (C - 1) * a_row + act_row_bytes(k)` bytes are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const BLK: usize, const G: usize, const C: usize, const SIGNED: bool>(
    k: usize,
    p: &Panel,
    a: *const u8,
    a_row: usize,
) -> [__m256; C] {
    let ng = k / BLK;
    let steps = BLK / 4;
    let (od, o32, o16) = act_offsets(k);
    let (qp, sp, mp) = (p.q.as_ptr(), p.s.as_ptr(), p.m.as_ptr());
    debug_assert!(p.q.len() >= k * PANEL_ROWS && p.s.len() >= ng * PANEL_ROWS);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); C];
    for g in 0..ng {
        let e0 = g * BLK;
        let mut isum = [_mm256_setzero_si256(); C];
        let mut j = 0;
        while j < steps {
            let mut s16 = [_mm256_setzero_si256(); C];
            for jj in j..j + G {
                // SAFETY: element e0 + 4 * jj < k, so the 32 panel bytes at (e0/4 + jj) * 32
                // are inside p.q (k * 8 bytes, asserted above); the activation bytes
                // e0 + 4 * jj .. + 4 of column c are inside its row (caller's contract).
                unsafe {
                    let wv = _mm256_loadu_si256(qp.add((e0 / 4 + jj) * 32).cast());
                    for (c, s) in s16.iter_mut().enumerate() {
                        let av = _mm256_set1_epi32(
                            a.add(c * a_row + e0 + 4 * jj)
                                .cast::<i32>()
                                .read_unaligned(),
                        );
                        let prod = if SIGNED {
                            // Q8_0: |w| times a with w's sign (G = 1: one step fills i16).
                            _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv))
                        } else {
                            _mm256_maddubs_epi16(wv, av)
                        };
                        *s = _mm256_add_epi16(*s, prod);
                    }
                }
            }
            for c in 0..C {
                isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(s16[c], ones));
            }
            j += G;
        }
        // SAFETY: g < ng: the 8 scales/offsets of group g are inside p.s/p.m; the column's
        // scale of block e0/32 and sum of group g are inside its row (caller's contract).
        unsafe {
            let sw = _mm256_loadu_ps(sp.add(g * PANEL_ROWS));
            let mw = _mm256_loadu_ps(mp.add(g * PANEL_ROWS));
            for c in 0..C {
                let ac = a.add(c * a_row);
                let da = _mm256_broadcast_ss(&*ac.add(od + 4 * (e0 / 32)).cast::<f32>());
                let so = if BLK == 32 { o32 } else { o16 };
                let sa = _mm256_broadcast_ss(&*ac.add(so + 4 * g).cast::<f32>());
                let scale = _mm256_mul_ps(sw, da);
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c]), scale, acc[c]);
                acc[c] = _mm256_fnmadd_ps(mw, sa, acc[c]);
            }
        }
    }
    acc
}

/// Most activation columns for which the matmul skips the panel (`avx2_canon::gemm_direct`).
const DIRECT_MAX_COLS: usize = 3;

/// Panels filled together: every 4-column activation tile, once in L1, is multiplied with
/// all of them before the next tile is loaded (activations are the operand that streams).
const PANELS: usize = 4;

/// Runs every column over the filled panels `ps` (rows `r0 + 8 * i ..`, `n` rows in all)
/// and stores the outputs.
///
/// # Safety
/// As [`tile`] for all `n_cols` columns; `out` checked by the caller to hold
/// `(n_cols - 1) * out_stride + r0 + n` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_panels<const BLK: usize, const G: usize, const SIGNED: bool>(
    k: usize,
    ps: &[Panel],
    act: &[u8],
    n_cols: usize,
    out: &mut [f32],
    out_stride: usize,
    r0: usize,
    n: usize,
) {
    let a_row = act_row_bytes(k);
    assert!(act.len() >= n_cols * a_row, "panel: activations too short");
    let ap = act.as_ptr();
    let mut put = |c: usize, pi: usize, v: __m256| {
        let mut t = [0.0f32; PANEL_ROWS];
        // SAFETY: 8 writable floats.
        unsafe { _mm256_storeu_ps(t.as_mut_ptr(), v) };
        let rs = r0 + pi * PANEL_ROWS;
        let len = PANEL_ROWS.min(r0 + n - rs);
        out[c * out_stride + rs..c * out_stride + rs + len].copy_from_slice(&t[..len]);
    };
    let mut c0 = 0;
    while c0 + COLS <= n_cols {
        for (pi, p) in ps.iter().enumerate() {
            // SAFETY: columns c0 .. c0 + COLS are inside `act` (asserted above).
            let t = unsafe { tile::<BLK, G, COLS, SIGNED>(k, p, ap.add(c0 * a_row), a_row) };
            for (c, v) in t.into_iter().enumerate() {
                put(c0 + c, pi, v);
            }
        }
        c0 += COLS;
    }
    while c0 < n_cols {
        for (pi, p) in ps.iter().enumerate() {
            // SAFETY: column c0 is inside `act` (asserted above).
            let t = unsafe { tile::<BLK, G, 1, SIGNED>(k, p, ap.add(c0 * a_row), a_row) };
            put(c0, pi, t[0]);
        }
        c0 += 1;
    }
}

/// See `Kernels::gemm_panel` (shapes checked there).
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
    n_cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let shape = PanelShape::of(f).expect("panel format checked by the caller");
    PANEL.with(|cell| {
        let mut ps = cell.borrow_mut();
        if ps.len() < PANELS {
            ps.resize_with(PANELS, Panel::default);
        }
        if n_cols <= DIRECT_MAX_COLS {
            // Few columns: no panel, each 8 rows straight from their packed bytes.
            let mut r0 = 0;
            while r0 < n_rows {
                let n = PANEL_ROWS.min(n_rows - r0);
                // SAFETY: same CPU contract; `act`/`out` sizes checked by the caller.
                unsafe {
                    super::avx2_canon::gemm_direct(
                        f,
                        k,
                        &w[r0 * w_row..],
                        w_row,
                        n,
                        act,
                        n_cols,
                        &mut out[r0..],
                        out_stride,
                    )
                };
                r0 += n;
            }
            return;
        }
        let mut r0 = 0;
        while r0 < n_rows {
            let n = (PANELS * PANEL_ROWS).min(n_rows - r0);
            let np = n.div_ceil(PANEL_ROWS);
            for (pi, p) in ps[..np].iter_mut().enumerate() {
                let rs = r0 + pi * PANEL_ROWS;
                let len = PANEL_ROWS.min(r0 + n - rs);
                // SAFETY: same CPU contract as this function's.
                unsafe { super::avx2_canon::fill(p, f, shape, k, &w[rs * w_row..], w_row, len) };
            }
            let ps = &ps[..np];
            // SAFETY: same CPU contract as this function's; the panels were just filled for
            // `k`; `act` and `out` sizes are checked by the caller (and asserted again).
            unsafe {
                match (shape.blk, shape.qmax) {
                    (32, 15) => {
                        run_panels::<32, 8, false>(k, ps, act, n_cols, out, out_stride, r0, n)
                    }
                    (32, 128) => {
                        run_panels::<32, 1, true>(k, ps, act, n_cols, out, out_stride, r0, n)
                    }
                    (32, _) => {
                        run_panels::<32, 4, false>(k, ps, act, n_cols, out, out_stride, r0, n)
                    }
                    (16, 63) => {
                        run_panels::<16, 2, false>(k, ps, act, n_cols, out, out_stride, r0, n)
                    }
                    _ => run_panels::<16, 4, false>(k, ps, act, n_cols, out, out_stride, r0, n),
                }
            }
            r0 += n;
        }
    });
}

/// Quantizes one activation row into the panel layout; the same bytes as
/// `panel::quantize_act_ref`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_act(x: &[f32], out: &mut [u8]) {
    let k = x.len();
    assert!(k.is_multiple_of(32) && out.len() >= act_row_bytes(k));
    for b in 0..k / 32 {
        // SAFETY: 32 floats of block b are inside x; 32 bytes at b * 32 inside out (k bytes).
        let (d, _) = unsafe {
            super::avx2::quant_q8_act_block(x.as_ptr().add(b * 32), out.as_mut_ptr().add(b * 32))
        };
        // The two halves' sums of the values just written, exactly (i8 sums in i32).
        // SAFETY: the 32 bytes at b * 32 were just written.
        let q = unsafe { _mm256_loadu_si256(out.as_ptr().add(b * 32).cast()) };
        let s = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_set1_epi8(1), q),
            _mm256_set1_epi16(1),
        );
        let mut l = [0i32; 8];
        // SAFETY: 8 writable i32.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr().cast(), s) };
        let (s0, s1) = (l[0] + l[1] + l[2] + l[3], l[4] + l[5] + l[6] + l[7]);
        crate::panel::put_block_sums(out, k, b, d, s0, s1);
    }
}
