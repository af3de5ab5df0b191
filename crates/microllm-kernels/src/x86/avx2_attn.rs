//! AVX2 version of the tiled attention (`Kernels::attention_rows`; scalar specification
//! `reference::attention_rows`).
//!
//! Several query rows share one KV head (the GQA heads of a token, the tokens of a prompt), so
//! every key and value is converted from f16 once per 16-key tile for up to 32 rows instead
//! of once per row. Scores are computed transposed, one 8-lane vector per key holding 8 rows
//! (keys broadcast against the transposed queries), which makes the online softmax — the
//! running maximum, the exponentials, the sums — elementwise over rows. Exponentials use the
//! 8-lane `expf8`.

use core::arch::x86_64::*;
use half::f16;

use std::cell::RefCell;

use super::avx2::expf8_pub as expf8;

/// Per-thread buffers of [`group`], grown on first use.
#[derive(Default)]
struct Scratch {
    /// Transposed queries `[dk][TR]`.
    qt: Vec<f32>,
    /// The same queries row-major `[TR][dk]` (for a last chunk of few rows).
    qr: Vec<f32>,
    /// Output accumulators `[TR][dv]`.
    acc: Vec<f32>,
    /// One tile of keys `[TK][dk]` and values `[TK][dv]` in f32.
    kf: Vec<f32>,
    vf: Vec<f32>,
    /// [`rows_small`]: one block of scores and weights `[KB]` per row (up to [`DIRECT_ROWS`]).
    sb: Vec<f32>,
    /// [`scores_direct_512`]'s queries: each 8-float chunk twice, `[DIRECT_ROWS][dk / 8][16]`.
    qd: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Scratch {
    /// Room for heads of `dk`/`dv` (never shrinks).
    fn grow(&mut self, dk: usize, dv: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        grow(&mut self.qt, dk * TR);
        grow(&mut self.qr, dk * TR);
        grow(&mut self.acc, dv * TR);
        grow(&mut self.kf, dk * KB);
        grow(&mut self.vf, dv * KB);
        grow(&mut self.sb, DIRECT_ROWS * KB);
        grow(&mut self.qd, DIRECT_ROWS * 2 * dk);
    }
}

/// Grows this thread's buffers for heads of `dk`/`dv` (`Kernels::reserve_attention`).
pub(crate) fn reserve(dk: usize, dv: usize) {
    SCRATCH.with(|cell| cell.borrow_mut().grow(dk, dv));
}

/// The first 8 ints of `s` (panics if shorter).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld8i(s: &[i32]) -> __m256i {
    let s = &s[..8];
    // SAFETY: 8 readable ints (sliced above).
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// Keys per tile.
const TK: usize = 16;
/// Keys per block of [`rows_small`] (blocks start at multiples of it).
const KB: usize = 64;
/// Most rows for which a non-row-wise call takes [`rows_small`] (a decode step's GQA group;
/// more rows share the tiles of [`group`] better).
const SMALL_ROWS: usize = 8;
/// Most rows of [`rows_small`]'s direct path (scores and values straight from the cache).
const DIRECT_ROWS: usize = 4;
/// Query rows per group (4 vectors of 8).
const TR: usize = 32;
/// See `Kernels::attention_rows` (shapes checked there). `dk % 8 == 0`, `dv % 16 == 0`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512F if `wide`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attention_rows(
    q: &[f32],
    dk: usize,
    last: &[u32],
    window: usize,
    keys: &[f16],
    k_stride: usize,
    values: &[f16],
    v_stride: usize,
    scale: f32,
    softcap: f32,
    out: &mut [f32],
    dv: usize,
    rowwise: bool,
    wide: bool,
) {
    let sh = Shape {
        dk,
        dv,
        window,
        k_stride,
        v_stride,
        scale,
        softcap,
        from: 0,
        to: usize::MAX,
        rowwise,
        wide,
    };
    // SAFETY: same CPU contract.
    unsafe { rows(&sh, q, last, keys, values, out, None) }
}

/// See `Kernels::attention_rows_part` (shapes checked there). `dk % 8 == 0`, `dv % 16 == 0`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512F if `wide`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attention_rows_part(
    q: &[f32],
    dk: usize,
    last: &[u32],
    window: usize,
    keys: &[f16],
    k_stride: usize,
    values: &[f16],
    v_stride: usize,
    scale: f32,
    softcap: f32,
    keys_from: usize,
    keys_to: usize,
    out: &mut [f32],
    dv: usize,
    ml: &mut [f32],
    wide: bool,
) {
    let sh = Shape {
        dk,
        dv,
        window,
        k_stride,
        v_stride,
        scale,
        softcap,
        from: keys_from,
        to: keys_to,
        rowwise: false,
        wide,
    };
    // SAFETY: same CPU contract.
    unsafe { rows(&sh, q, last, keys, values, out, Some(ml)) }
}

/// The scalar parameters of one call.
#[derive(Clone, Copy)]
struct Shape {
    dk: usize,
    dv: usize,
    window: usize,
    k_stride: usize,
    v_stride: usize,
    scale: f32,
    softcap: f32,
    /// Only keys `from..to` are seen.
    from: usize,
    to: usize,
    /// Every row by [`rows_small`], whatever the number of rows, so that a row's result does
    /// not depend on the other rows of the call (`Kernels::attention_rows_invariant`).
    rowwise: bool,
    /// The CPU has AVX-512F (the caller's promise): [`rows_small`]'s direct path takes
    /// [`scores_direct_512`] and [`values_direct_512`].
    wide: bool,
}

/// All the rows, [`TR`] at a time; `ml` as in `attention_rows_part` (then `out` is not
/// divided by the sums).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows(
    sh: &Shape,
    q: &[f32],
    last: &[u32],
    keys: &[f16],
    values: &[f16],
    out: &mut [f32],
    mut ml: Option<&mut [f32]>,
) {
    let (dk, dv) = (sh.dk, sh.dv);
    let n = last.len();
    let mut r0 = 0;
    let small = sh.rowwise || n <= SMALL_ROWS;
    SCRATCH.with(|cell| {
        let sc = &mut *cell.borrow_mut();
        sc.grow(dk, dv);
        while r0 < n && small {
            let nr = TR.min(n - r0);
            let ml = ml.as_deref_mut().map(|m| &mut m[2 * r0..2 * (r0 + nr)]);
            // SAFETY: same CPU contract; the caller checked every slice against `last`/`n`.
            unsafe {
                rows_small(
                    sc,
                    sh,
                    &q[r0 * dk..(r0 + nr) * dk],
                    &last[r0..r0 + nr],
                    keys,
                    values,
                    &mut out[r0 * dv..(r0 + nr) * dv],
                    ml,
                )
            };
            r0 += nr;
        }
        while r0 < n {
            let nr = TR.min(n - r0);
            let ml = ml.as_deref_mut().map(|m| &mut m[2 * r0..2 * (r0 + nr)]);
            // SAFETY: same CPU contract; the caller checked every slice against `last`/`n`.
            unsafe {
                group(
                    sc,
                    sh,
                    &q[r0 * dk..(r0 + nr) * dk],
                    &last[r0..r0 + nr],
                    keys,
                    values,
                    &mut out[r0 * dv..(r0 + nr) * dv],
                    ml,
                )
            };
            r0 += nr;
        }
    });
}

/// Keys `f..e` a row whose last key is `last` sees (window, then the call's `from..to`);
/// `None` when none.
fn visible(sh: &Shape, last: u32) -> Option<(usize, usize)> {
    let l = last as usize;
    let f = if sh.window > 0 {
        (l + 1).saturating_sub(sh.window)
    } else {
        0
    };
    let (f, e) = (f.max(sh.from), (l + 1).min(sh.to));
    (f < e).then_some((f, e))
}

/// Rows `j0 + a .. j0 + b` of the f16 matrix `src` (rows `stride` apart, `d` wide, `d % 8 ==
/// 0`) as f32 rows `a..b` of `dst`.
///
/// # Safety
/// The CPU must support F16C; the rows are inside `src` and `dst` holds `b * d` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_to_f32(
    src: &[f16],
    stride: usize,
    d: usize,
    j0: usize,
    a: usize,
    b: usize,
    dst: &mut [f32],
) {
    debug_assert!(dst.len() >= b * d && (b == a || src.len() >= (j0 + b - 1) * stride + d));
    let (sp, dp) = (src.as_ptr().cast::<u8>(), dst.as_mut_ptr());
    for jj in a..b {
        let sb = (j0 + jj) * stride;
        for x in (0..d).step_by(8) {
            // SAFETY: row j0 + jj spans sb..sb + d inside `src` (2 bytes per element) and row
            // jj of `dst` has d floats (the caller's contract).
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(2 * (sb + x)).cast()));
                _mm256_storeu_ps(dp.add(jj * d + x), v);
            }
        }
    }
}

/// Prefetches rows `a..b` of the f16 matrix `src` (rows `stride` apart, `d` wide) into L2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch_rows(src: &[f16], stride: usize, d: usize, a: usize, b: usize) {
    let p = src.as_ptr();
    for j in a..b {
        let row = p.wrapping_add(j * stride);
        // 32 f16 = one 64-byte line.
        for x in (0..d).step_by(32) {
            // Prefetches never fault (wrapping arithmetic, nothing dereferenced).
            _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(x).cast());
        }
    }
}

/// The end of a call: with `ml`, every row's maximum and sum of exponentials there and its
/// unnormalised sum in `out`; else `out = acc / sum` (0 for a row that saw no key).
fn finish(
    acc: &[f32],
    m: &[f32],
    l: &[f32],
    nr: usize,
    dv: usize,
    out: &mut [f32],
    ml: Option<&mut [f32]>,
) {
    if let Some(ml) = ml {
        for r in 0..nr {
            ml[2 * r] = m[r];
            ml[2 * r + 1] = l[r];
        }
        out[..nr * dv].copy_from_slice(&acc[..nr * dv]);
        return;
    }
    for r in 0..nr {
        let inv = if l[r] == 0.0 { 0.0 } else { 1.0 / l[r] };
        for (o, &a) in out[r * dv..(r + 1) * dv]
            .iter_mut()
            .zip(&acc[r * dv..(r + 1) * dv])
        {
            *o = a * inv;
        }
    }
}

/// Up to [`TR`] rows, each on its own (few rows: a decode step's GQA group; or row-wise, for
/// continuous batching): keys and values are converted to f32 once per block of [`KB`] for
/// all the rows, then every row takes its scores (one dot product per key, reduced in a
/// fixed order), its block maximum and exponentials, and its weighted sum of values held in
/// registers, with the running maximum rescaling between blocks (online softmax). A row's
/// result depends only on its query, its visible keys and the fixed block positions, never on
/// the other rows. Up to [`DIRECT_ROWS`] rows that all see the same keys (a decode step's GQA
/// group) skip the f32 blocks: [`scores_direct`] and [`values_direct`] read the f16 cache in
/// registers, with each row's arithmetic unchanged (the same bits either way).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_small(
    sc: &mut Scratch,
    sh: &Shape,
    q: &[f32],
    last: &[u32],
    keys: &[f16],
    values: &[f16],
    out: &mut [f32],
    ml: Option<&mut [f32]>,
) {
    let Shape {
        dk,
        dv,
        k_stride,
        v_stride,
        scale,
        softcap,
        ..
    } = *sh;
    let nr = last.len();
    // Pre-scaled queries (as the tiles: the scale goes into the soft-capping when there is one).
    let qs = &mut sc.qr[..nr * dk];
    let qscale = if softcap != 0.0 { 1.0 } else { scale };
    for (d, &v) in qs.iter_mut().zip(&q[..nr * dk]) {
        *d = v * qscale;
    }
    let qs = &*qs;
    // Visible keys per row: f..e, within from..to.
    let mut ranges = [(0usize, 0usize); TR];
    let (mut lo, mut hi) = (usize::MAX, 0usize);
    for (rg, &l) in ranges.iter_mut().zip(last) {
        if let Some((f, e)) = visible(sh, l) {
            *rg = (f, e);
            lo = lo.min(f);
            hi = hi.max(e);
        }
    }
    let acc = &mut sc.acc[..nr * dv];
    acc.fill(0.0);
    let mut m = [f32::NEG_INFINITY; TR];
    let mut lsum = [0.0f32; TR];
    // Few rows that all see the same keys (a decode step's GQA group) take the direct path.
    let direct = nr <= DIRECT_ROWS && ranges[..nr].iter().all(|&rg| rg == ranges[0]);
    // The 512-bit variants: the queries' chunks duplicated once for every block (each
    // vector holds two keys); values 32 columns a step.
    let wide_k = sh.wide && direct;
    let wide_v = sh.wide && dv.is_multiple_of(32);
    let qd = &mut sc.qd[..if wide_k { nr * 2 * dk } else { 0 }];
    if wide_k {
        for (dst, src) in qd.chunks_exact_mut(16).zip(qs.chunks_exact(8)) {
            dst[..8].copy_from_slice(src);
            dst[8..].copy_from_slice(src);
        }
    }
    let qd = &*qd;
    let (kf, vf, sbs) = (
        &mut sc.kf[..KB * dk],
        &mut sc.vf[..KB * dv],
        &mut sc.sb[..DIRECT_ROWS * KB],
    );
    // The keys and values of the first two blocks are requested up front into L2, then each
    // block asks for the one two ahead: one head's slice of each cache row is a short strided
    // read, and converting them one by one waits on memory (continuous batching reads every
    // sequence's cache once per step, from DRAM).
    let ahead = |from: usize, to: usize| {
        let to = to.min(hi);
        if from < to {
            prefetch_rows(keys, k_stride, dk, from, to);
            prefetch_rows(values, v_stride, dv, from, to);
        }
    };
    let mut j0 = if lo < hi { lo - lo % KB } else { hi };
    ahead(lo, j0 + 2 * KB);
    while j0 < hi {
        let j1 = (j0 + KB).min(hi);
        let c0 = lo.max(j0);
        ahead(j0 + 2 * KB, j0 + 3 * KB);
        if direct {
            // Every row sees the same keys a..b of this block: scores and weighted values
            // straight from the f16 cache, each key converted once for all the rows (and
            // nothing stored), with each row's arithmetic exactly that of the path below.
            let (f, e) = ranges[0];
            let (a, b) = (f.max(j0), e.min(j1));
            if a < b {
                let (ia, ib) = (a - j0, b - j0);
                // SAFETY: same CPU contract; keys/values j0 + ia..j0 + ib are below hi, inside
                // the caches (checked by the caller); the queries of the nr rows are in qs,
                // the scores of row r at sbs[r * KB..] (room for 4 * KB).
                // With `wide`, AVX-512F (the `Shape`'s promise) for the 512-bit variants.
                unsafe {
                    match (nr, wide_k) {
                        (1, true) => {
                            scores_direct_512::<1>(qs, qd, keys, k_stride, dk, j0, ia, ib, sbs)
                        }
                        (2, true) => {
                            scores_direct_512::<2>(qs, qd, keys, k_stride, dk, j0, ia, ib, sbs)
                        }
                        (3, true) => {
                            scores_direct_512::<3>(qs, qd, keys, k_stride, dk, j0, ia, ib, sbs)
                        }
                        (_, true) => {
                            scores_direct_512::<4>(qs, qd, keys, k_stride, dk, j0, ia, ib, sbs)
                        }
                        (1, false) => scores_direct::<1>(qs, keys, k_stride, dk, j0, ia, ib, sbs),
                        (2, false) => scores_direct::<2>(qs, keys, k_stride, dk, j0, ia, ib, sbs),
                        (3, false) => scores_direct::<3>(qs, keys, k_stride, dk, j0, ia, ib, sbs),
                        (_, false) => scores_direct::<4>(qs, keys, k_stride, dk, j0, ia, ib, sbs),
                    }
                }
                let mut corrs = [0.0f32; DIRECT_ROWS];
                for (r, cr) in corrs.iter_mut().enumerate().take(nr) {
                    let sb = &mut sbs[r * KB..(r + 1) * KB];
                    // SAFETY: same CPU contract; ia < ib <= KB.
                    *cr = unsafe {
                        block_weights(sb, ia, ib, &mut m[r], &mut lsum[r], scale, softcap)
                    };
                }
                // SAFETY: as above; acc holds nr rows of dv; the weights of row r are at
                // sbs[r * KB + ia..r * KB + ib].
                unsafe {
                    let c = &corrs;
                    match (nr, wide_v) {
                        (1, true) => {
                            values_direct_512::<1>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (2, true) => {
                            values_direct_512::<2>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (3, true) => {
                            values_direct_512::<3>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (_, true) => {
                            values_direct_512::<4>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (1, false) => {
                            values_direct::<1>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (2, false) => {
                            values_direct::<2>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (3, false) => {
                            values_direct::<3>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                        (_, false) => {
                            values_direct::<4>(acc, c, sbs, values, v_stride, dv, j0, ia, ib)
                        }
                    }
                }
            }
            j0 = j1;
            continue;
        }
        // Convert the block's keys and values that some row sees.
        // SAFETY: keys and values below hi <= n_kv are inside `keys`/`values` (checked by the
        // caller); kf/vf have room for KB rows.
        unsafe {
            rows_to_f32(keys, k_stride, dk, j0, c0 - j0, j1 - j0, kf);
            rows_to_f32(values, v_stride, dv, j0, c0 - j0, j1 - j0, vf);
        }
        let sb = &mut sbs[..KB];
        for r in 0..nr {
            let (f, e) = ranges[r];
            let (a, b) = (f.max(j0), e.min(j1));
            if a >= b {
                continue;
            }
            let (ia, ib) = (a - j0, b - j0);
            // SAFETY: same CPU contract; row r's query is inside qs, keys ia..ib inside kf.
            unsafe { block_scores(&qs[r * dk..(r + 1) * dk], kf, dk, ia, ib, sb) };
            // SAFETY: same CPU contract; ia < ib <= KB.
            let corr =
                unsafe { block_weights(sb, ia, ib, &mut m[r], &mut lsum[r], scale, softcap) };
            // SAFETY: same CPU contract; row r's accumulator is inside acc, values ia..ib
            // inside vf, weights inside sb.
            unsafe { block_values(&mut acc[r * dv..(r + 1) * dv], corr, sb, vf, dv, ia, ib) };
        }
        j0 = j1;
    }
    finish(acc, &m, &lsum, nr, dv, out, ml);
}

/// One block's softmax step for one row: soft-caps its scores `sb[ia..ib]` (if `softcap`),
/// raises the running maximum `m` to the block's, turns the scores into weights
/// `exp(s - m)` in place (zero in the rest of the 8-aligned span), and updates the running
/// sum `lsum`; returns the factor the row's earlier accumulators are to be scaled by.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `ia < ib <= KB <= sb.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_weights(
    sb: &mut [f32],
    ia: usize,
    ib: usize,
    m: &mut f32,
    lsum: &mut f32,
    scale: f32,
    softcap: f32,
) -> f32 {
    assert!(ia < ib && ib <= KB && sb.len() >= KB);
    if softcap != 0.0 {
        for v in &mut sb[ia..ib] {
            *v = crate::reference::softcap_score(*v, scale, softcap);
        }
    }
    let bmax = sb[ia..ib].iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
    let m_new = m.max(bmax);
    let corr = if *m == f32::NEG_INFINITY {
        0.0
    } else {
        let c = expf8(_mm256_set1_ps(*m - m_new));
        _mm256_cvtss_f32(c)
    };
    *m = m_new;
    // Weights over the 8-aligned span covering ia..ib, zero outside ia..ib.
    let (ea, eb) = (ia - ia % 8, ib.next_multiple_of(8).min(KB));
    let mv = _mm256_set1_ps(m_new);
    let mut psum = _mm256_setzero_ps();
    let mut jj = ea;
    while jj < eb {
        let idx = _mm256_add_epi32(
            _mm256_set1_epi32(jj as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let inside = _mm256_andnot_si256(
            _mm256_or_si256(
                _mm256_cmpgt_epi32(_mm256_set1_epi32(ia as i32), idx),
                _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(ib as i32 - 1)),
            ),
            _mm256_set1_epi32(-1),
        );
        let inside = _mm256_castsi256_ps(inside);
        // SAFETY: jj + 8 <= eb <= KB: inside sb (lanes outside ia..ib are masked, and
        // hold finite scores of earlier blocks or zeros).
        unsafe {
            let sv = _mm256_blendv_ps(mv, _mm256_loadu_ps(sb.as_ptr().add(jj)), inside);
            let pv = _mm256_and_ps(expf8(_mm256_sub_ps(sv, mv)), inside);
            psum = _mm256_add_ps(psum, pv);
            _mm256_storeu_ps(sb.as_mut_ptr().add(jj), pv);
        }
        jj += 8;
    }
    *lsum = *lsum * corr + hsum(psum);
    corr
}

/// Scores of `RN` rows (queries `qs`, `dk` each) against keys `j0 + ia..j0 + ib` of the f16
/// cache, into `sbs[r * KB + j]`: each key's 8-element chunks converted once for all the rows,
/// each (row, key) one 8-lane accumulator over the chunks in order, reduced by [`hsum`] (the
/// arithmetic of `block_scores`).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; rows `j0 + ia..j0 + ib` (`k_stride` apart, `dk`
/// wide) inside `keys`; `qs` holds `RN * dk` floats, `sbs` `RN * KB`, `ib <= KB`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_direct<const RN: usize>(
    qs: &[f32],
    keys: &[f16],
    k_stride: usize,
    dk: usize,
    j0: usize,
    ia: usize,
    ib: usize,
    sbs: &mut [f32],
) {
    assert!(qs.len() >= RN * dk && sbs.len() >= RN * KB && ib <= KB);
    assert!(ia >= ib || keys.len() >= (j0 + ib - 1) * k_stride + dk);
    let (qp, kp) = (qs.as_ptr(), keys.as_ptr().cast::<u8>());
    let mut j = ia;
    // Two keys at a time: 2 * RN independent chains.
    while j + 2 <= ib {
        let mut a = [[_mm256_setzero_ps(); 2]; RN];
        for d in (0..dk).step_by(8) {
            // SAFETY: keys j, j + 1 < ib and elements d..d + 8 <= dk are inside `keys`
            // (asserted); row r's elements d..d + 8 inside qs.
            unsafe {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(
                    kp.add(2 * ((j0 + j) * k_stride + d)).cast(),
                ));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(
                    kp.add(2 * ((j0 + j + 1) * k_stride + d)).cast(),
                ));
                for (r, ar) in a.iter_mut().enumerate() {
                    let qv = _mm256_loadu_ps(qp.add(r * dk + d));
                    ar[0] = _mm256_fmadd_ps(qv, k0, ar[0]);
                    ar[1] = _mm256_fmadd_ps(qv, k1, ar[1]);
                }
            }
        }
        for (r, ar) in a.into_iter().enumerate() {
            sbs[r * KB + j] = hsum(ar[0]);
            sbs[r * KB + j + 1] = hsum(ar[1]);
        }
        j += 2;
    }
    if j < ib {
        let mut a = [_mm256_setzero_ps(); RN];
        for d in (0..dk).step_by(8) {
            // SAFETY: as above, for key j < ib.
            unsafe {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(
                    kp.add(2 * ((j0 + j) * k_stride + d)).cast(),
                ));
                for (r, ar) in a.iter_mut().enumerate() {
                    *ar = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(r * dk + d)), k0, *ar);
                }
            }
        }
        for (r, ar) in a.into_iter().enumerate() {
            sbs[r * KB + j] = hsum(ar);
        }
    }
}

/// For `RN` rows: `acc[r] = acc[r] * corrs[r] + sum_{j in ia..ib} w[r][j] * v[j0 + j]`
/// (weights `w[r] = sbs[r * KB..]`), straight from the f16 cache, 16 columns at a time: each
/// value chunk converted once for all the rows; per row and column the arithmetic of
/// `block_values` (scaled first, then one fused multiply-add per key in order).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; value rows `j0 + ia..j0 + ib` (`v_stride` apart,
/// `dv` wide, `dv % 16 == 0`) inside `values`; `acc` holds `RN * dv` floats, `sbs` `RN * KB`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn values_direct<const RN: usize>(
    acc: &mut [f32],
    corrs: &[f32; DIRECT_ROWS],
    sbs: &[f32],
    values: &[f16],
    v_stride: usize,
    dv: usize,
    j0: usize,
    ia: usize,
    ib: usize,
) {
    assert!(acc.len() >= RN * dv && sbs.len() >= RN * KB && ib <= KB && dv.is_multiple_of(16));
    assert!(ia >= ib || values.len() >= (j0 + ib - 1) * v_stride + dv);
    let (ap, vp) = (acc.as_mut_ptr(), values.as_ptr().cast::<u8>());
    for d0 in (0..dv).step_by(16) {
        let mut a: [[__m256; 2]; RN] = core::array::from_fn(|r| {
            let c = _mm256_set1_ps(corrs[r]);
            // SAFETY: columns d0..d0 + 16 <= dv of accumulator row r < RN (asserted).
            unsafe {
                [
                    _mm256_mul_ps(_mm256_loadu_ps(ap.add(r * dv + d0)), c),
                    _mm256_mul_ps(_mm256_loadu_ps(ap.add(r * dv + d0 + 8)), c),
                ]
            }
        });
        for j in ia..ib {
            // SAFETY: value row j0 + j < j0 + ib, columns d0..d0 + 16, inside `values`.
            let (v0, v1) = unsafe {
                let row = vp.add(2 * ((j0 + j) * v_stride + d0));
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(row.cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(row.add(16).cast())),
                )
            };
            for (r, ar) in a.iter_mut().enumerate() {
                let pj = _mm256_set1_ps(sbs[r * KB + j]);
                ar[0] = _mm256_fmadd_ps(pj, v0, ar[0]);
                ar[1] = _mm256_fmadd_ps(pj, v1, ar[1]);
            }
        }
        for (r, ar) in a.into_iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                _mm256_storeu_ps(ap.add(r * dv + d0), ar[0]);
                _mm256_storeu_ps(ap.add(r * dv + d0 + 8), ar[1]);
            }
        }
    }
}

/// [`scores_direct`] with 512-bit vectors: two keys per vector (key `j` in the low 8 lanes,
/// `j + 1` in the high 8, against the row's query chunk in both: `qd`, the chunks of `qs`
/// each twice), four keys at a time. Each half does what [`scores_direct`]'s 8-lane
/// accumulator does for its key, in the same order, and is reduced by the same [`hsum`]: the
/// same bits.
///
/// # Safety
/// As [`scores_direct`], and the CPU must support AVX-512F; `qd` holds `RN * 2 * dk` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_direct_512<const RN: usize>(
    qs: &[f32],
    qd: &[f32],
    keys: &[f16],
    k_stride: usize,
    dk: usize,
    j0: usize,
    ia: usize,
    ib: usize,
    sbs: &mut [f32],
) {
    assert!(qs.len() >= RN * dk && qd.len() >= RN * 2 * dk);
    assert!(sbs.len() >= RN * KB && ib <= KB);
    assert!(ia >= ib || keys.len() >= (j0 + ib - 1) * k_stride + dk);
    let (qp, kp) = (qd.as_ptr(), keys.as_ptr().cast::<u8>());
    let nd = dk / 8;
    // Row r's chunk c, in both halves.
    let q = |r: usize, c: usize| {
        // SAFETY: r < RN and c < nd: 16 floats inside qd (asserted).
        unsafe { _mm512_loadu_ps(qp.add((r * nd + c) * 16)) }
    };
    // Chunk d of keys j + u and j + u + 1 as one vector.
    let pair = |j: usize, d: usize| {
        // SAFETY: the callers' keys are < ib and d + 8 <= dk: inside `keys` (asserted).
        unsafe {
            let lo = _mm_loadu_si128(kp.add(2 * ((j0 + j) * k_stride + d)).cast());
            let hi = _mm_loadu_si128(kp.add(2 * ((j0 + j + 1) * k_stride + d)).cast());
            _mm512_cvtph_ps(_mm256_set_m128i(hi, lo))
        }
    };
    let halves = |v: __m512| {
        (
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
        )
    };
    let mut j = ia;
    while j + 4 <= ib {
        let mut a = [[_mm512_setzero_ps(); 2]; RN];
        for c in 0..nd {
            let (k01, k23) = (pair(j, 8 * c), pair(j + 2, 8 * c));
            for (r, ar) in a.iter_mut().enumerate() {
                ar[0] = _mm512_fmadd_ps(q(r, c), k01, ar[0]);
                ar[1] = _mm512_fmadd_ps(q(r, c), k23, ar[1]);
            }
        }
        for (r, ar) in a.into_iter().enumerate() {
            let ((s0, s1), (s2, s3)) = (halves(ar[0]), halves(ar[1]));
            sbs[r * KB + j] = hsum(s0);
            sbs[r * KB + j + 1] = hsum(s1);
            sbs[r * KB + j + 2] = hsum(s2);
            sbs[r * KB + j + 3] = hsum(s3);
        }
        j += 4;
    }
    if j < ib {
        // SAFETY: same contract, keys j..ib.
        unsafe { scores_direct::<RN>(qs, keys, k_stride, dk, j0, j, ib, sbs) };
    }
}

/// [`values_direct`] with 512-bit vectors, 32 columns a step: per row and column the same
/// operations in the same order (scaled first, then one fused multiply-add per key), so the
/// same bits.
///
/// # Safety
/// As [`values_direct`], and the CPU must support AVX-512F; `dv % 32 == 0`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn values_direct_512<const RN: usize>(
    acc: &mut [f32],
    corrs: &[f32; DIRECT_ROWS],
    sbs: &[f32],
    values: &[f16],
    v_stride: usize,
    dv: usize,
    j0: usize,
    ia: usize,
    ib: usize,
) {
    assert!(acc.len() >= RN * dv && sbs.len() >= RN * KB && ib <= KB && dv.is_multiple_of(32));
    assert!(ia >= ib || values.len() >= (j0 + ib - 1) * v_stride + dv);
    let (ap, vp) = (acc.as_mut_ptr(), values.as_ptr().cast::<u8>());
    for d0 in (0..dv).step_by(32) {
        let mut a: [[__m512; 2]; RN] = core::array::from_fn(|r| {
            let c = _mm512_set1_ps(corrs[r]);
            // SAFETY: columns d0..d0 + 32 <= dv of accumulator row r < RN (asserted).
            unsafe {
                [
                    _mm512_mul_ps(_mm512_loadu_ps(ap.add(r * dv + d0)), c),
                    _mm512_mul_ps(_mm512_loadu_ps(ap.add(r * dv + d0 + 16)), c),
                ]
            }
        });
        for j in ia..ib {
            // SAFETY: value row j0 + j < j0 + ib, columns d0..d0 + 32, inside `values`.
            let (v0, v1) = unsafe {
                let row = vp.add(2 * ((j0 + j) * v_stride + d0));
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(row.cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(row.add(32).cast())),
                )
            };
            for (r, ar) in a.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(sbs[r * KB + j]);
                ar[0] = _mm512_fmadd_ps(pj, v0, ar[0]);
                ar[1] = _mm512_fmadd_ps(pj, v1, ar[1]);
            }
        }
        for (r, ar) in a.into_iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_ps(ap.add(r * dv + d0), ar[0]);
                _mm512_storeu_ps(ap.add(r * dv + d0 + 16), ar[1]);
            }
        }
    }
}

/// The 8 lanes of `v` summed in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `sb[j] = q . kf[j]` for `j` in `ia..ib`: one 8-lane accumulator per key (four keys at a
/// time for independent chains), each reduced by [`hsum`], so a key's score does not depend
/// on the keys around it.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `q` holds `dk` floats (`dk % 8 == 0`), `kf` rows
/// `ia..ib` of `dk`, `sb` at least `ib` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_scores(q: &[f32], kf: &[f32], dk: usize, ia: usize, ib: usize, sb: &mut [f32]) {
    debug_assert!(q.len() >= dk && kf.len() >= ib * dk && sb.len() >= ib);
    let (qp, kp) = (q.as_ptr(), kf.as_ptr());
    let mut j = ia;
    while j + 4 <= ib {
        let mut a = [_mm256_setzero_ps(); 4];
        for d in (0..dk).step_by(8) {
            // SAFETY: d + 8 <= dk inside q; keys j..j + 4 <= ib inside kf.
            unsafe {
                let qv = _mm256_loadu_ps(qp.add(d));
                for (u, au) in a.iter_mut().enumerate() {
                    *au = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kp.add((j + u) * dk + d)), *au);
                }
            }
        }
        for (u, au) in a.into_iter().enumerate() {
            sb[j + u] = hsum(au);
        }
        j += 4;
    }
    while j < ib {
        let mut a = _mm256_setzero_ps();
        for d in (0..dk).step_by(8) {
            // SAFETY: as above for key j < ib.
            unsafe {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(d)),
                    _mm256_loadu_ps(kp.add(j * dk + d)),
                    a,
                );
            }
        }
        sb[j] = hsum(a);
        j += 1;
    }
}

/// `acc = acc * corr + sum_{j in ia..ib} p[j] * vf[j]`, 64 (then 32, 16) columns at a time
/// in registers.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `acc` holds `dv` floats (`dv % 16 == 0`), `vf` rows
/// `ia..ib` of `dv`, `p` at least `ib` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_values(
    acc: &mut [f32],
    corr: f32,
    p: &[f32],
    vf: &[f32],
    dv: usize,
    ia: usize,
    ib: usize,
) {
    debug_assert!(acc.len() >= dv && vf.len() >= ib * dv && p.len() >= ib);
    let mut d0 = 0;
    while d0 < dv {
        // SAFETY: the columns d0..d0 + 8B <= dv of every arm are inside acc and each vf row.
        unsafe {
            d0 += match dv - d0 {
                64.. => values_cols::<8>(acc, corr, p, vf, dv, ia, ib, d0),
                32.. => values_cols::<4>(acc, corr, p, vf, dv, ia, ib, d0),
                _ => values_cols::<2>(acc, corr, p, vf, dv, ia, ib, d0),
            };
        }
    }
}

/// Columns `d0..d0 + 8B` of [`block_values`]; returns `8B`.
///
/// # Safety
/// As [`block_values`], with `d0 + 8B <= dv`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn values_cols<const B: usize>(
    acc: &mut [f32],
    corr: f32,
    p: &[f32],
    vf: &[f32],
    dv: usize,
    ia: usize,
    ib: usize,
    d0: usize,
) -> usize {
    let (ap, vp) = (acc.as_mut_ptr(), vf.as_ptr());
    let c = _mm256_set1_ps(corr);
    // SAFETY: columns d0..d0 + 8B of acc and of value rows ia..ib (the caller's contract).
    unsafe {
        let mut a: [__m256; B] =
            core::array::from_fn(|b| _mm256_mul_ps(_mm256_loadu_ps(ap.add(d0 + 8 * b)), c));
        for j in ia..ib {
            let pj = _mm256_set1_ps(p[j]);
            for (b, ab) in a.iter_mut().enumerate() {
                *ab = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vp.add(j * dv + d0 + 8 * b)), *ab);
            }
        }
        for (b, ab) in a.into_iter().enumerate() {
            _mm256_storeu_ps(ap.add(d0 + 8 * b), ab);
        }
    }
    8 * B
}

/// Up to [`TR`] rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group(
    sc: &mut Scratch,
    sh: &Shape,
    q: &[f32],
    last: &[u32],
    keys: &[f16],
    values: &[f16],
    out: &mut [f32],
    ml: Option<&mut [f32]>,
) {
    let Shape {
        dk,
        dv,
        k_stride,
        v_stride,
        scale,
        softcap,
        ..
    } = *sh;
    let nr = last.len();
    let nch = nr.div_ceil(8);
    // Transposed, pre-scaled queries: qt[d * TR + r] (rows past nr are zero).
    let qt = &mut sc.qt[..dk * TR];
    qt.fill(0.0);
    for r in 0..nr {
        for d in 0..dk {
            qt[d * TR + r] = q[r * dk + d] * if softcap != 0.0 { 1.0 } else { scale };
        }
    }
    let qr = &mut sc.qr[..dk * TR];
    for r in 0..nr {
        for d in 0..dk {
            qr[r * dk + d] = qt[d * TR + r];
        }
    }
    let qr = &*sc.qr;
    // Visible key range per row: first..=last (rows past nr see nothing).
    let mut lo_v = [i32::MAX; TR];
    let mut hi_v = [-1i32; TR];
    let (mut lo, mut hi) = (usize::MAX, 0usize);
    for r in 0..nr {
        // An empty range leaves lo_v > hi_v (nothing visible).
        let Some((f, e)) = visible(sh, last[r]) else {
            continue;
        };
        lo_v[r] = f as i32;
        hi_v[r] = (e - 1) as i32;
        lo = lo.min(f);
        hi = hi.max(e);
    }
    let acc = &mut sc.acc[..TR * dv];
    acc[..nr * dv].fill(0.0);
    let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); TR / 8];
    let mut l = [_mm256_setzero_ps(); TR / 8];
    let kf = &mut sc.kf[..TK * dk];
    let vf = &mut sc.vf[..TK * dv];
    // Tiles start at multiples of TK, so a row meets the same tiles whatever the other rows
    // (tiles before its first key or past its last leave its state unchanged: zero weights).
    let mut j0 = lo - lo % TK;
    while j0 < hi {
        let nk = TK.min(hi - j0);
        // Convert the tile's keys and values to f32.
        // SAFETY: keys and values j0 + jj < hi <= n_kv are inside `keys`/`values` (checked by
        // the caller); kf/vf have room for TK rows.
        unsafe {
            rows_to_f32(keys, k_stride, dk, j0, 0, nk, kf);
            rows_to_f32(values, v_stride, dv, j0, 0, nk, vf);
        }
        // Scores of every row against the tile's keys: s[c][jj] = rows c*8.. of key j0 + jj.
        let mut s = [[_mm256_setzero_ps(); TK]; TR / 8];
        // SAFETY: same CPU contract; qt holds dk x TR floats, kf nk rows of dk.
        unsafe { tile_scores(nr, qt, qr, kf, dk, nk, &mut s) };
        // Per chunk of 8 rows: soft-capping, masking, running maximum, exponentials.
        // p[jj][r]: weight of key j0 + jj for row r; cr[r]: rescaling of row r's accumulator.
        let mut p = [[0.0f32; TR]; TK];
        let mut cr = [0.0f32; TR];
        for c in 0..nch {
            let lov = ld8i(&lo_v[c * 8..]);
            let hiv = ld8i(&hi_v[c * 8..]);
            let s = &mut s[c];
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut valid = [_mm256_setzero_ps(); TK];
            let mut mt = ninf;
            for jj in 0..nk {
                if softcap != 0.0 {
                    let mut t = [0.0f32; 8];
                    // SAFETY: 8 writable floats.
                    unsafe { _mm256_storeu_ps(t.as_mut_ptr(), s[jj]) };
                    for v in t.iter_mut() {
                        *v = crate::reference::softcap_score(*v, scale, softcap);
                    }
                    // SAFETY: 8 readable floats.
                    s[jj] = unsafe { _mm256_loadu_ps(t.as_ptr()) };
                }
                let kj = _mm256_set1_epi32((j0 + jj) as i32);
                let ok = _mm256_andnot_si256(
                    _mm256_or_si256(_mm256_cmpgt_epi32(lov, kj), _mm256_cmpgt_epi32(kj, hiv)),
                    _mm256_set1_epi32(-1),
                );
                valid[jj] = _mm256_castsi256_ps(ok);
                s[jj] = _mm256_blendv_ps(ninf, s[jj], valid[jj]);
                mt = _mm256_max_ps(mt, s[jj]);
            }
            let m_old = m[c];
            let m_new = _mm256_max_ps(m_old, mt);
            // Rows with no visible key yet keep m = -inf: use 0 there so no NaN appears.
            let finite = _mm256_cmp_ps::<_CMP_NEQ_OQ>(m_new, ninf);
            let m_safe = _mm256_and_ps(m_new, finite);
            let corr = _mm256_and_ps(
                expf8(_mm256_sub_ps(m_old, m_safe)),
                _mm256_cmp_ps::<_CMP_NEQ_OQ>(m_old, ninf),
            );
            let mut psum = _mm256_setzero_ps();
            for jj in 0..nk {
                let e = _mm256_and_ps(expf8(_mm256_sub_ps(s[jj], m_safe)), valid[jj]);
                psum = _mm256_add_ps(psum, e);
                // SAFETY: 8 writable floats at c * 8 < TR.
                unsafe { _mm256_storeu_ps(p[jj][c * 8..].as_mut_ptr(), e) };
            }
            l[c] = _mm256_fmadd_ps(l[c], corr, psum);
            m[c] = m_new;
            // SAFETY: 8 writable floats at c * 8 < TR.
            unsafe { _mm256_storeu_ps(cr[c * 8..].as_mut_ptr(), corr) };
        }
        // acc[row] = acc[row] * corr + sum_jj p[jj][row] * v[jj], a few rows at a time.
        // SAFETY: same CPU contract; acc holds TR rows of dv, vf nk rows of dv.
        unsafe { tile_values(nr, acc, dv, &cr, &p, vf, nk) };
        j0 += nk;
    }
    let (mut ls, mut ms) = ([0.0f32; TR], [0.0f32; TR]);
    for c in 0..nch {
        // SAFETY: 8 writable floats at c * 8 < TR.
        unsafe {
            _mm256_storeu_ps(ls[c * 8..].as_mut_ptr(), l[c]);
            _mm256_storeu_ps(ms[c * 8..].as_mut_ptr(), m[c]);
        }
    }
    finish(acc, &ms, &ls, nr, dv, out, ml);
}

/// Scores of a tile: `s[c][jj]` = the 8 rows of chunk `c` against key `jj` (of `nk`), from
/// the transposed queries `qt` (`[dk][TR]`) and the keys `kf` (`[nk][dk]`). Several chunks
/// and keys per pass keep about 8 independent FMA chains in flight. A last chunk of at most 4
/// rows (GQA groups of 9 or 4 heads) takes dot products over the dimensions instead from the
/// row-major queries `qr` (`[TR][dk]`), so its empty lanes cost nothing.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `qt` and `qr` hold `dk * TR` floats, `kf` `nk * dk`,
/// `dk % 8 == 0`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_scores(
    nr: usize,
    qt: &[f32],
    qr: &[f32],
    kf: &[f32],
    dk: usize,
    nk: usize,
    s: &mut [[__m256; TK]; TR / 8],
) {
    debug_assert!(qt.len() >= dk * TR && qr.len() >= dk * TR && kf.len() >= nk * dk);
    let nch = nr.div_ceil(8);
    let tail = nr - (nch - 1) * 8;
    let full = if tail <= 4 { nch - 1 } else { nch };
    // SAFETY: the contract of this function, forwarded to every arm.
    unsafe {
        match full {
            0 => {}
            1 => scores_c::<1, 8>(qt, kf, dk, nk, s),
            2 => scores_c::<2, 4>(qt, kf, dk, nk, s),
            3 => scores_c::<3, 2>(qt, kf, dk, nk, s),
            _ => scores_c::<4, 2>(qt, kf, dk, nk, s),
        }
        if full < nch {
            scores_dot(&qr[full * 8 * dk..], tail, kf, dk, nk, &mut s[full]);
        }
    }
}

/// Scores of `rows` (at most 8) row-major queries against the `nk` keys of `kf`, as
/// `s[jj]` = the rows' scores of key `jj` in lanes `0..rows` (the others zero): 8 keys at a
/// time, 8 independent dot products reduced together. A key's score is the same whichever
/// way it is reached: the keys past the last group of 8 are reduced in the same order.
///
/// # Safety
/// As [`tile_scores`]; `q` holds `rows * dk` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_dot(
    q: &[f32],
    rows: usize,
    kf: &[f32],
    dk: usize,
    nk: usize,
    s: &mut [__m256; TK],
) {
    debug_assert!(q.len() >= rows * dk && rows <= 8);
    let (qp, kp) = (q.as_ptr(), kf.as_ptr());
    // t[jj][r]: score of key jj for row r.
    let mut t = [[0.0f32; 8]; TK];
    for r in 0..rows {
        let mut jj = 0;
        while jj + 8 <= nk {
            let mut a = [_mm256_setzero_ps(); 8];
            for d in (0..dk).step_by(8) {
                // SAFETY: row r < rows, d + 8 <= dk: inside q.
                let qv = unsafe { _mm256_loadu_ps(qp.add(r * dk + d)) };
                for (u, au) in a.iter_mut().enumerate() {
                    // SAFETY: key jj + u < nk, d + 8 <= dk: inside kf.
                    let kv = unsafe { _mm256_loadu_ps(kp.add((jj + u) * dk + d)) };
                    *au = _mm256_fmadd_ps(qv, kv, *au);
                }
            }
            // Horizontal sums of a[0..8] into the lanes of one vector, in order.
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let sum = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(u0, u1),
                _mm256_permute2f128_ps::<0x31>(u0, u1),
            );
            let mut b = [0.0f32; 8];
            // SAFETY: 8 writable floats.
            unsafe { _mm256_storeu_ps(b.as_mut_ptr(), sum) };
            for u in 0..8 {
                t[jj + u][r] = b[u];
            }
            jj += 8;
        }
        while jj < nk {
            let mut a = _mm256_setzero_ps();
            for d in (0..dk).step_by(8) {
                // SAFETY: as above.
                unsafe {
                    a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(qp.add(r * dk + d)),
                        _mm256_loadu_ps(kp.add(jj * dk + d)),
                        a,
                    );
                }
            }
            let mut b = [0.0f32; 8];
            // SAFETY: 8 writable floats.
            unsafe { _mm256_storeu_ps(b.as_mut_ptr(), a) };
            // The order of the hadd tree above.
            t[jj][r] = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
            jj += 1;
        }
    }
    for jj in 0..nk {
        // SAFETY: 8 readable floats.
        s[jj] = unsafe { _mm256_loadu_ps(t[jj].as_ptr()) };
    }
}

/// [`tile_scores`] for `C` chunks, `K` keys per pass (then one at a time for the rest).
///
/// # Safety
/// As [`tile_scores`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_c<const C: usize, const K: usize>(
    qt: &[f32],
    kf: &[f32],
    dk: usize,
    nk: usize,
    s: &mut [[__m256; TK]; TR / 8],
) {
    let mut jj = 0;
    while jj + K <= nk {
        // SAFETY: keys jj..jj + K < nk.
        unsafe { scores_block::<C, K>(qt, kf, dk, jj, s) };
        jj += K;
    }
    while jj < nk {
        // SAFETY: key jj < nk.
        unsafe { scores_block::<C, 1>(qt, kf, dk, jj, s) };
        jj += 1;
    }
}

/// Scores of chunks `0..C` against keys `j..j + K`.
///
/// # Safety
/// As [`tile_scores`], with `j + K <= nk`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_block<const C: usize, const K: usize>(
    qt: &[f32],
    kf: &[f32],
    dk: usize,
    j: usize,
    s: &mut [[__m256; TK]; TR / 8],
) {
    let mut a = [[_mm256_setzero_ps(); K]; C];
    let (qp, kp) = (qt.as_ptr(), kf.as_ptr());
    for d in 0..dk {
        let mut qv = [_mm256_setzero_ps(); C];
        for (c, v) in qv.iter_mut().enumerate() {
            // SAFETY: d < dk and c * 8 + 8 <= TR: inside qt.
            *v = unsafe { _mm256_loadu_ps(qp.add(d * TR + c * 8)) };
        }
        for u in 0..K {
            // SAFETY: key j + u < nk, d < dk: inside kf.
            let kv = unsafe { _mm256_broadcast_ss(&*kp.add((j + u) * dk + d)) };
            for c in 0..C {
                a[c][u] = _mm256_fmadd_ps(kv, qv[c], a[c][u]);
            }
        }
    }
    for c in 0..C {
        s[c][j..j + K].copy_from_slice(&a[c]);
    }
}

/// `acc[r] = acc[r] * cr[r] + sum_jj p[jj][r] * vf[jj]` for rows `0..nr`, in blocks of up to
/// 3 rows by 16 to 64 columns (about 8 to 12 independent accumulators).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `acc` holds `nr` rows of `dv` (`dv % 16 == 0`), `vf`
/// `nk` rows of `dv`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_values(
    nr: usize,
    acc: &mut [f32],
    dv: usize,
    cr: &[f32; TR],
    p: &[[f32; TR]; TK],
    vf: &[f32],
    nk: usize,
) {
    debug_assert!(acc.len() >= nr * dv && vf.len() >= nk * dv && dv.is_multiple_of(16));
    let mut r = 0;
    while r < nr {
        let left = nr - r;
        // 3 rows unless that would leave 1 alone next (4 = 2 + 2).
        let rows = if left >= 3 && left != 4 {
            3
        } else {
            left.min(2)
        };
        let mut d0 = 0;
        while d0 < dv {
            let w = dv - d0;
            // SAFETY: every arm gets rows r..r + rows <= nr and columns d0..d0 + 8B <= dv.
            unsafe {
                d0 += match (rows, w) {
                    (3, 32..) => values_block::<3, 4>(acc, dv, r, d0, cr, p, vf, nk),
                    (3, _) => values_block::<3, 2>(acc, dv, r, d0, cr, p, vf, nk),
                    (2, 32..) => values_block::<2, 4>(acc, dv, r, d0, cr, p, vf, nk),
                    (2, _) => values_block::<2, 2>(acc, dv, r, d0, cr, p, vf, nk),
                    (_, 64..) => values_block::<1, 8>(acc, dv, r, d0, cr, p, vf, nk),
                    (_, 32..) => values_block::<1, 4>(acc, dv, r, d0, cr, p, vf, nk),
                    _ => values_block::<1, 2>(acc, dv, r, d0, cr, p, vf, nk),
                };
            }
        }
        r += rows;
    }
}

/// Rows `r..r + R`, columns `d0..d0 + 8B` of [`tile_values`]; returns `8B`.
///
/// # Safety
/// As [`tile_values`], with `r + R <= nr` and `d0 + 8B <= dv`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_block<const R: usize, const B: usize>(
    acc: &mut [f32],
    dv: usize,
    r: usize,
    d0: usize,
    cr: &[f32; TR],
    p: &[[f32; TR]; TK],
    vf: &[f32],
    nk: usize,
) -> usize {
    let ap = acc.as_mut_ptr();
    let vp = vf.as_ptr();
    let mut a = [[_mm256_setzero_ps(); B]; R];
    for i in 0..R {
        let c = _mm256_set1_ps(cr[r + i]);
        for b in 0..B {
            // SAFETY: row r + i, columns d0 + 8b..+8 inside acc.
            a[i][b] = _mm256_mul_ps(
                unsafe { _mm256_loadu_ps(ap.add((r + i) * dv + d0 + 8 * b)) },
                c,
            );
        }
    }
    for jj in 0..nk {
        let mut v = [_mm256_setzero_ps(); B];
        for (b, vb) in v.iter_mut().enumerate() {
            // SAFETY: value row jj < nk, columns inside dv.
            *vb = unsafe { _mm256_loadu_ps(vp.add(jj * dv + d0 + 8 * b)) };
        }
        for i in 0..R {
            let pi = _mm256_set1_ps(p[jj][r + i]);
            for b in 0..B {
                a[i][b] = _mm256_fmadd_ps(pi, v[b], a[i][b]);
            }
        }
    }
    for i in 0..R {
        for b in 0..B {
            // SAFETY: as the loads above.
            unsafe { _mm256_storeu_ps(ap.add((r + i) * dv + d0 + 8 * b), a[i][b]) };
        }
    }
    8 * B
}
