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
    /// Output accumulators `[TR][dv]`.
    acc: Vec<f32>,
    /// One tile of keys `[TK][dk]` and values `[TK][dv]` in f32.
    kf: Vec<f32>,
    vf: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The first 8 floats of `s` (panics if shorter).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld8(s: &[f32]) -> __m256 {
    let s = &s[..8];
    // SAFETY: 8 readable floats (sliced above).
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
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
/// Query rows per group (4 vectors of 8).
const TR: usize = 32;
/// See `Kernels::attention_rows` (shapes checked there). `dk % 8 == 0`, `dv % 16 == 0`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
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
    };
    // SAFETY: same CPU contract.
    unsafe { rows(&sh, q, last, keys, values, out, None) }
}

/// See `Kernels::attention_rows_part` (shapes checked there). `dk % 8 == 0`, `dv % 16 == 0`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
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
    SCRATCH.with(|cell| {
        let sc = &mut *cell.borrow_mut();
        sc.qt.resize(dk * TR, 0.0);
        sc.acc.resize(dv * TR, 0.0);
        sc.kf.resize(dk * TK, 0.0);
        sc.vf.resize(dv * TK, 0.0);
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
        window,
        k_stride,
        v_stride,
        scale,
        softcap,
        from,
        to,
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
    // Visible key range per row: first..=last (rows past nr see nothing).
    let mut lo_v = [i32::MAX; TR];
    let mut hi_v = [-1i32; TR];
    let (mut lo, mut hi) = (usize::MAX, 0usize);
    for r in 0..nr {
        let l = last[r] as usize;
        let f = if window > 0 {
            (l + 1).saturating_sub(window)
        } else {
            0
        };
        // Restricted to from..to; an empty range leaves lo_v > hi_v (nothing visible).
        let (f, e) = (f.max(from), (l + 1).min(to));
        if f >= e {
            continue;
        }
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
    let kp = keys.as_ptr().cast::<u8>();
    let vp = values.as_ptr().cast::<u8>();
    let mut j0 = lo;
    while j0 < hi {
        let nk = TK.min(hi - j0);
        // Convert the tile's keys and values to f32.
        for jj in 0..nk {
            let kb = (j0 + jj) * k_stride;
            let vb = (j0 + jj) * v_stride;
            for d in (0..dk).step_by(8) {
                // SAFETY: key j0 + jj < hi <= n_kv spans kb..kb + dk inside `keys` (checked
                // by the caller), 2 bytes per element; kf/vf have room for TK rows of dk/dv.
                unsafe {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(2 * (kb + d)).cast()));
                    _mm256_storeu_ps(kf.as_mut_ptr().add(jj * dk + d), x);
                }
            }
            for d in (0..dv).step_by(8) {
                // SAFETY: as above for the values.
                unsafe {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(2 * (vb + d)).cast()));
                    _mm256_storeu_ps(vf.as_mut_ptr().add(jj * dv + d), x);
                }
            }
        }
        for c in 0..nch {
            let lov = ld8i(&lo_v[c * 8..]);
            let hiv = ld8i(&hi_v[c * 8..]);
            // Scores: s[jj] = 8 rows of key j0 + jj.
            let mut s = [_mm256_setzero_ps(); TK];
            let mut jj = 0;
            while jj < nk {
                if jj + 4 <= nk {
                    let mut a = [_mm256_setzero_ps(); 4];
                    for d in 0..dk {
                        let qv = ld8(&qt[d * TR + c * 8..]);
                        for (u, au) in a.iter_mut().enumerate() {
                            let kv = _mm256_set1_ps(kf[(jj + u) * dk + d]);
                            *au = _mm256_fmadd_ps(kv, qv, *au);
                        }
                    }
                    s[jj..jj + 4].copy_from_slice(&a);
                    jj += 4;
                } else {
                    let mut a = _mm256_setzero_ps();
                    for d in 0..dk {
                        let qv = ld8(&qt[d * TR + c * 8..]);
                        a = _mm256_fmadd_ps(_mm256_set1_ps(kf[jj * dk + d]), qv, a);
                    }
                    s[jj] = a;
                    jj += 1;
                }
            }
            // Soft-capping, masking, running maximum.
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
            let mut p = [[0.0f32; 8]; TK];
            let mut psum = _mm256_setzero_ps();
            for jj in 0..nk {
                let e = _mm256_and_ps(expf8(_mm256_sub_ps(s[jj], m_safe)), valid[jj]);
                psum = _mm256_add_ps(psum, e);
                // SAFETY: 8 writable floats.
                unsafe { _mm256_storeu_ps(p[jj].as_mut_ptr(), e) };
            }
            l[c] = _mm256_fmadd_ps(l[c], corr, psum);
            m[c] = m_new;
            let mut cr = [0.0f32; 8];
            // SAFETY: 8 writable floats.
            unsafe { _mm256_storeu_ps(cr.as_mut_ptr(), corr) };
            // acc[row] = acc[row] * corr + sum_jj p[jj][row] * v[jj], two rows at a time.
            let rows = (nr - c * 8).min(8);
            let mut i = 0;
            while i < rows {
                let two = i + 1 < rows;
                let (ra, rb) = (c * 8 + i, c * 8 + i + 1);
                for d0 in (0..dv).step_by(16) {
                    let ap = acc.as_mut_ptr();
                    // SAFETY: rows ra, rb < TR and d0 + 16 <= dv: inside acc (TR rows of dv).
                    unsafe {
                        let ca = _mm256_set1_ps(cr[i]);
                        let mut a0 = _mm256_mul_ps(_mm256_loadu_ps(ap.add(ra * dv + d0)), ca);
                        let mut a1 = _mm256_mul_ps(_mm256_loadu_ps(ap.add(ra * dv + d0 + 8)), ca);
                        let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                        if two {
                            let cb = _mm256_set1_ps(cr[i + 1]);
                            b0 = _mm256_mul_ps(_mm256_loadu_ps(ap.add(rb * dv + d0)), cb);
                            b1 = _mm256_mul_ps(_mm256_loadu_ps(ap.add(rb * dv + d0 + 8)), cb);
                        }
                        for jj in 0..nk {
                            let v0 = _mm256_loadu_ps(vf.as_ptr().add(jj * dv + d0));
                            let v1 = _mm256_loadu_ps(vf.as_ptr().add(jj * dv + d0 + 8));
                            let pa = _mm256_set1_ps(p[jj][i]);
                            a0 = _mm256_fmadd_ps(pa, v0, a0);
                            a1 = _mm256_fmadd_ps(pa, v1, a1);
                            if two {
                                let pb = _mm256_set1_ps(p[jj][i + 1]);
                                b0 = _mm256_fmadd_ps(pb, v0, b0);
                                b1 = _mm256_fmadd_ps(pb, v1, b1);
                            }
                        }
                        _mm256_storeu_ps(ap.add(ra * dv + d0), a0);
                        _mm256_storeu_ps(ap.add(ra * dv + d0 + 8), a1);
                        if two {
                            _mm256_storeu_ps(ap.add(rb * dv + d0), b0);
                            _mm256_storeu_ps(ap.add(rb * dv + d0 + 8), b1);
                        }
                    }
                }
                i += 2;
            }
        }
        j0 += nk;
    }
    let mut ls = [0.0f32; TR];
    for c in 0..nch {
        // SAFETY: 8 writable floats at c * 8 < TR.
        unsafe { _mm256_storeu_ps(ls[c * 8..].as_mut_ptr(), l[c]) };
    }
    if let Some(ml) = ml {
        let mut ms = [0.0f32; TR];
        for c in 0..nch {
            // SAFETY: 8 writable floats at c * 8 < TR.
            unsafe { _mm256_storeu_ps(ms[c * 8..].as_mut_ptr(), m[c]) };
        }
        for r in 0..nr {
            ml[2 * r] = ms[r];
            ml[2 * r + 1] = ls[r];
        }
        out[..nr * dv].copy_from_slice(&acc[..nr * dv]);
        return;
    }
    for r in 0..nr {
        let inv = if ls[r] == 0.0 { 0.0 } else { 1.0 / ls[r] };
        for d in 0..dv {
            out[r * dv + d] = acc[r * dv + d] * inv;
        }
    }
}
