//! AVX2 version of the packed matmul (see `crate::packed` for the layout and the scalar
//! specification it is tested against), with an AVX-512 variant (`tile512`: two panels per
//! 512-bit vector, VNNI inner step).
//!
//! Inner step, as in the panel tile (`avx2_panel.rs`): one 32-byte vector holds 4 levels of
//! each of the 8 rows; 4 activation bytes broadcast to every 32-bit lane; a u8 x i8 multiply
//! with 4-way sums leaves in lane `r` row `r`'s dot over those 4 elements. The 4-bit levels
//! come out of one packed vector as two (`& 0x0f`, `>> 4 & 0x0f`), and for the 5-bit formats
//! each gets its fifth bit from the group's fifth-bit vector (shifted to bit 4, masked, or-ed
//! in); Q6_K's levels get their top two bits the same way from two top-bit vectors, and its
//! 32-element groups keep two sums, one per canonical 16-element group (`tile_six`,
//! `tile512_six`). AVX2 does the multiply as `vpmaddubsw` and `vpmaddwd`, with the 16-bit
//! partial sums widened once per group for 4-bit levels (8 * 2 * 15 * 127 < 32768) and once
//! per two steps for 5-bit and 6-bit ones (4 * 2 * 31 * 127 and 2 * 2 * 63 * 127 < 32768);
//! VNNI as one `vpdpbusd` into 32 bits. Both are
//! exact, so both give the group sums the panel kernel gets, and the float epilogue is the
//! panel kernel's, operation for operation (for the K-quants on the scales `d * sc` and
//! `dmin * mn` formed in f32, where they are exact): bit-identical results.
//!
//! Tiles: `R` panels x `C` columns. With AVX2, decode (one column) runs 4 panels at once so
//! that 4 independent float chains hide the multiply-add latency; batches run 1 panel x 4
//! columns, so each packed vector is loaded and split once for 4 columns. The AVX-512 tiles hold two
//! consecutive panels per vector (each lane does what the 256-bit VNNI tile's lane does, so
//! the results are the same bits): decode 1 pair x 1 column, batches 1 pair x 8 columns
//! (the rest of the columns in one narrower tile); a last odd panel takes the 256-bit tile.
//! The non-K formats' panels are stored in pairs (`packed::pair_panel`), so their 512-bit
//! tiles read both panels' vector in one 64-byte load and each pair as one stream,
//! prefetched a line per read (`q8_sums512`, `nib_sums512`); the K-quants' pairs of panels
//! are two streams (`prefetch_streams`).
//!
//! Safety: `tile`, `tile512`, `drive` and `drive512` are `#[inline(always)]` helpers of the
//! two `#[target_feature]` entry points ([`gemm`] picks one); their `unsafe` intrinsic calls
//! rely on the CPU features of whichever entry point they were inlined into: AVX2, FMA and
//! F16C always, and AVX-512 F/BW/VL/VNNI for `tile512`, `drive512` and the `VNNI = true`
//! instances of `tile`, which only `drive512` (in `gemm_vnni`) creates.

use core::arch::x86_64::*;

use crate::format::Fmt;
use crate::packed::{packed_len, Layout};
use crate::panel::{act_offsets, act_row_bytes, Panel, PanelShape, PANEL_ROWS};

/// Whether the running CPU has AVX-512 F, BW, VL and VNNI (and AVX2, FMA, F16C).
pub(crate) fn vnni_detected() -> bool {
    super::avx2_fma_f16c_detected()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// Packs rows `0..n_rows` of `w`: the same bytes as `packed::pack_ref` (and the same
/// `false` when a scale is not exactly an f16), through the SIMD panel fill.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    n_rows: usize,
    out: &mut [u8],
) -> bool {
    let shape = PanelShape::of(f).expect("packed format");
    let lay = Layout::of(f).expect("packed format");
    let (ng, pb) = (k / 32, lay.panel_bytes(k));
    assert!(
        out.len() >= packed_len(f, k, n_rows),
        "pack: output too short"
    );
    assert!(w.len() >= n_rows * w_row, "pack: weights too short");
    let mut p = Panel::default();
    let np = n_rows.div_ceil(PANEL_ROWS);
    let base = out.as_mut_ptr();
    for pi in 0..np {
        let r0 = pi * PANEL_ROWS;
        let n = PANEL_ROWS.min(n_rows - r0);
        // SAFETY: same CPU contract as this function's.
        unsafe { super::avx2_canon::fill(&mut p, f, shape, k, &w[r0 * w_row..], w_row, n) };
        assert!(p.q.len() >= k * PANEL_ROWS && p.s.len() >= ng * PANEL_ROWS);
        assert!(p.m.len() >= ng * PANEL_ROWS);
        if lay.kq {
            // SAFETY: panel pi < np lies inside the asserted packed_len = np * pb bytes; the
            // slice ends before the raw stores below start.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(pi * pb), pb) };
            crate::packed::put_kq_heads(f, k, &w[r0 * w_row..], w_row, n, dst);
        }
        let (qp, sp, mp) = (p.q.as_ptr(), p.s.as_ptr(), p.m.as_ptr());
        let at = crate::packed::pair_panel(lay, pi, np, pb);
        for g in 0..ng {
            let ga = lay.group_at(g);
            let put = |x: usize| base.wrapping_add(at.vec(ga, x));
            // SAFETY: g < ng, so the 8 level vectors of group g, (8g .. 8g + 8) * 32 bytes,
            // are inside p.q (k * 8 bytes, asserted) and its 8 scales/offsets inside
            // p.s/p.m; the stores go to the group's bytes of panel pi or of its pair
            // (`pair_panel`: panels pi & !1 ..= pi | 1, all < np when paired), inside the
            // asserted packed_len bytes.
            unsafe {
                let lv = |j: usize| _mm256_loadu_si256(qp.add((8 * g + j) * 32).cast());
                if lay.q8 {
                    for j in 0..8 {
                        _mm256_storeu_si256(put(32 * j).cast(), lv(j));
                    }
                } else {
                    let (low, bit4) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x10));
                    let top = _mm256_set1_epi8(0x30);
                    let mut fifth = _mm256_setzero_si256();
                    let mut six = [_mm256_setzero_si256(); 2];
                    for t in 0..4 {
                        let (a, b) = (lv(t), lv(t + 4));
                        let v = _mm256_or_si256(
                            _mm256_and_si256(a, low),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(b, low)),
                        );
                        _mm256_storeu_si256(put(32 * t).cast(), v);
                        if lay.six {
                            // Bits 4-5 of a level to bits 4v..4v+1 (low half) or
                            // 4v+2..4v+3 (high half) of vector t / 2, v = t % 2: 16-bit
                            // shifts of masked bits stay inside the byte.
                            let (ta, tb) = (_mm256_and_si256(a, top), _mm256_and_si256(b, top));
                            let bits = if t % 2 == 0 {
                                _mm256_or_si256(
                                    _mm256_srli_epi16::<4>(ta),
                                    _mm256_srli_epi16::<2>(tb),
                                )
                            } else {
                                _mm256_or_si256(ta, _mm256_slli_epi16::<2>(tb))
                            };
                            six[t / 2] = _mm256_or_si256(six[t / 2], bits);
                            continue;
                        }
                        if !lay.five {
                            continue;
                        }
                        // Bit 4 of a level to bit t (low half) or 4 + t (high half) of its
                        // byte: 16-bit shifts of a masked bit stay inside the byte.
                        let (cr, cl) = (count(4 - t), count(t));
                        let ha = _mm256_srl_epi16(_mm256_and_si256(a, bit4), cr);
                        let hb = _mm256_sll_epi16(_mm256_and_si256(b, bit4), cl);
                        fifth = _mm256_or_si256(fifth, _mm256_or_si256(ha, hb));
                    }
                    if lay.five {
                        _mm256_storeu_si256(put(Layout::FIVE_AT).cast(), fifth);
                    }
                    if lay.six {
                        for (u, v) in six.into_iter().enumerate() {
                            _mm256_storeu_si256(put(Layout::SIX_AT + 32 * u).cast(), v);
                        }
                    }
                }
                if lay.kq {
                    continue;
                }
                let halves = |src: *const f32| -> Option<__m128i> {
                    let v = _mm256_loadu_ps(src);
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    let back = _mm256_cvtph_ps(h);
                    (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(back, v)) == 0xff).then_some(h)
                };
                let Some(sh) = halves(sp.add(g * PANEL_ROWS)) else {
                    return false;
                };
                _mm_storeu_si128(base.add(at.tail(ga, 0)).cast(), sh);
                if lay.offsets {
                    let Some(mh) = halves(mp.add(g * PANEL_ROWS)) else {
                        return false;
                    };
                    _mm_storeu_si128(base.add(at.tail(ga, 16)).cast(), mh);
                }
            }
        }
    }
    true
}

/// A shift count for `_mm256_sll_epi16` / `_mm256_srl_epi16`.
#[inline(always)]
fn count(n: usize) -> __m128i {
    // SAFETY: SSE2, part of x86_64.
    unsafe { _mm_cvtsi32_si128(n as i32) }
}

// Layout tags for the kernels' const generic (a `Layout` cannot be one).
const L_Q8_0: u8 = 0;
const L_Q4_0: u8 = 1;
const L_Q4_1: u8 = 2;
const L_Q5_0: u8 = 3;
const L_Q5_1: u8 = 4;
const L_Q4_K: u8 = 5;
const L_Q5_K: u8 = 6;
const L_Q6_K: u8 = 7;

/// The layout of tag `l`.
const fn lay(l: u8) -> Layout {
    let f = match l {
        L_Q8_0 => Fmt::Q8_0,
        L_Q4_0 => Fmt::Q4_0,
        L_Q4_1 => Fmt::Q4_1,
        L_Q5_0 => Fmt::Q5_0,
        L_Q5_1 => Fmt::Q5_1,
        L_Q4_K => Fmt::Q4_K,
        L_Q5_K => Fmt::Q5_K,
        _ => Fmt::Q6_K,
    };
    match Layout::of(f) {
        Some(x) => x,
        None => panic!("every tag has a layout"),
    }
}

/// Group `g`'s share of the prefetch of the next 256-bit tile's panels (the `R * pb` bytes
/// after the tile at `p`), spread over the tile's groups, `ahead` bytes per group. The R
/// panels read at once are R streams pb bytes apart, which the hardware prefetchers follow
/// poorly (measured: decode streamed at 12 GB/s without this).
#[inline(always)]
fn prefetch_next_tile<const R: usize>(p: *const u8, pb: usize, g: usize, ahead: usize) {
    let next = p.wrapping_add(R * pb + g * ahead);
    let mut l = 0;
    while l < ahead {
        // SAFETY: a prefetch of any address is harmless (SSE, part of x86_64).
        unsafe { _mm_prefetch::<PF_HINT>(next.wrapping_add(l).cast()) };
        l += 64;
    }
}

/// Outputs of `R` consecutive panels (at `p`, `pb` bytes apart) for `C` activation columns
/// (at `a`, `a_row` bytes apart): `[r][c]` holds the 8 rows of panel `r` for column `c`.
/// `(pi, np)`: the first panel's index in the call's `np` panels (panels are paired:
/// `packed::pair_panel`).
///
/// # Safety
/// Inlined only into the entry points below (CPU features: see the module documentation);
/// `p` is panel `pi` of `np` panels of `k` elements readable from `p - pi * pb`, `pi + R <=
/// np`, and `C` activation rows of `k` elements are readable at `a` (`act_row_bytes(k)`
/// each).
#[inline(always)]
unsafe fn tile<const L: u8, const R: usize, const C: usize, const VNNI: bool>(
    k: usize,
    p: *const u8,
    pb: usize,
    (pi, np): (usize, usize),
    a: *const u8,
    a_row: usize,
) -> [[__m256; C]; R] {
    if const { lay(L).six } {
        // SAFETY: the same contract.
        return unsafe { tile_six::<R, C, VNNI>(k, p, pb, a, a_row) };
    }
    let ng = k / 32;
    let lay = const { lay(L) };
    // Bytes of the next tile prefetched per group: R panels spread over the ng groups.
    let ahead = (R * pb).div_ceil(ng);
    let (od, o32, _) = act_offsets(k);
    // SAFETY: the intrinsics need AVX2/FMA/F16C (and VNNI in the VNNI instances), which the
    // entry point this is inlined into guarantees. Every load is of panel r < R (pb bytes
    // each): group g < ng's vector t < 8 (4-bit: < 4), fifth-bit vector, scales or offsets, or
    // its super-block's K-quant header (`Layout::group_at` / `head_at` stay inside the panel),
    // or of activation byte e < k or scale g < ng of column c < C: inside the ranges the caller
    // guarantees. Prefetches never fault.
    unsafe {
        let (ones, low) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0f));
        let bit4 = _mm256_set1_epi8(0x10);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        // Where each panel's vectors and scales are (its pair's place, or its own).
        let at: [crate::packed::PairPanel; R] =
            core::array::from_fn(|r| crate::packed::pair_panel(lay, pi + r, np, pb));
        let base = p.sub(pi * pb);
        let bcast = |c: usize, e: usize| {
            _mm256_set1_epi32(a.add(c * a_row + e).cast::<i32>().read_unaligned())
        };
        for g in 0..ng {
            let e0 = g * 32;
            let ga = lay.group_at(g);
            prefetch_next_tile::<R>(p, pb, g, ahead);
            let mut isum = [[_mm256_setzero_si256(); C]; R];
            if lay.q8 {
                for t in 0..8 {
                    let av: [__m256i; C] = core::array::from_fn(|c| bcast(c, e0 + 4 * t));
                    for r in 0..R {
                        let v = _mm256_loadu_si256(base.add(at[r].vec(ga, 32 * t)).cast());
                        let wabs = _mm256_sign_epi8(v, v);
                        for c in 0..C {
                            let sa = _mm256_sign_epi8(av[c], v);
                            isum[r][c] = if VNNI {
                                _mm256_dpbusd_epi32(isum[r][c], wabs, sa)
                            } else {
                                let p16 = _mm256_maddubs_epi16(wabs, sa);
                                _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(p16, ones))
                            };
                        }
                    }
                }
            } else {
                let mut s16 = [[_mm256_setzero_si256(); C]; R];
                let fifth: [__m256i; R] = core::array::from_fn(|r| {
                    if lay.five {
                        _mm256_loadu_si256(base.add(at[r].vec(ga, Layout::FIVE_AT)).cast())
                    } else {
                        _mm256_setzero_si256()
                    }
                });
                for t in 0..4 {
                    // Without VNNI the broadcasts serve every panel from registers; with it
                    // they fold into each dpbusd as a memory operand (EVEX broadcast), which
                    // frees the registers that otherwise spilled the accumulators.
                    let alo: [__m256i; C] = core::array::from_fn(|c| {
                        if VNNI {
                            _mm256_setzero_si256()
                        } else {
                            bcast(c, e0 + 4 * t)
                        }
                    });
                    let ahi: [__m256i; C] = core::array::from_fn(|c| {
                        if VNNI {
                            _mm256_setzero_si256()
                        } else {
                            bcast(c, e0 + 16 + 4 * t)
                        }
                    });
                    for r in 0..R {
                        let v = _mm256_loadu_si256(base.add(at[r].vec(ga, 32 * t)).cast());
                        let mut lo = _mm256_and_si256(v, low);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                        if lay.five {
                            // Bits t and 4 + t of each byte to bit 4 (see `pack`).
                            let h = fifth[r];
                            let hl = _mm256_sll_epi16(h, count(4 - t));
                            let hh = _mm256_srl_epi16(h, count(t));
                            lo = _mm256_or_si256(lo, _mm256_and_si256(hl, bit4));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(hh, bit4));
                        }
                        for c in 0..C {
                            if VNNI {
                                let (al, ah) = (bcast(c, e0 + 4 * t), bcast(c, e0 + 16 + 4 * t));
                                isum[r][c] = _mm256_dpbusd_epi32(isum[r][c], lo, al);
                                isum[r][c] = _mm256_dpbusd_epi32(isum[r][c], hi, ah);
                            } else {
                                let x = _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, alo[c]),
                                    _mm256_maddubs_epi16(hi, ahi[c]),
                                );
                                s16[r][c] = _mm256_add_epi16(s16[r][c], x);
                            }
                        }
                    }
                    // Widen the 16-bit sums before they could overflow (module docs).
                    if !VNNI && (t == 3 || (lay.five && t == 1)) {
                        for r in 0..R {
                            for c in 0..C {
                                let w = _mm256_madd_epi16(s16[r][c], ones);
                                isum[r][c] = _mm256_add_epi32(isum[r][c], w);
                                s16[r][c] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
            }
            // The panel kernel's epilogue: acc = fma(f32(isum), s * d_a, acc) - m * s_a.
            for r in 0..R {
                let (sw, mw) = if lay.kq {
                    // d * sc and dmin * mn, exact in f32 (the canonical values).
                    let h = p.add(r * pb + lay.head_at(g));
                    let six = |at: usize| {
                        let b = _mm_loadl_epi64(h.add(at + 8 * (g % 8)).cast());
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))
                    };
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(h.cast()));
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(h.add(16).cast()));
                    (_mm256_mul_ps(d, six(32)), _mm256_mul_ps(dmin, six(96)))
                } else {
                    let sc = base.add(at[r].tail(ga, 0));
                    let sw = _mm256_cvtph_ps(_mm_loadu_si128(sc.cast()));
                    let mw = if lay.offsets {
                        _mm256_cvtph_ps(_mm_loadu_si128(base.add(at[r].tail(ga, 16)).cast()))
                    } else {
                        // sym * s, exact in f32 (a power of two; 0 for Q8_0).
                        _mm256_mul_ps(sw, _mm256_set1_ps(lay.sym))
                    };
                    (sw, mw)
                };
                for c in 0..C {
                    let ac = a.add(c * a_row);
                    let da = _mm256_broadcast_ss(&*ac.add(od + 4 * g).cast::<f32>());
                    let sa = _mm256_broadcast_ss(&*ac.add(o32 + 4 * g).cast::<f32>());
                    let scale = _mm256_mul_ps(sw, da);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), scale, acc[r][c]);
                    acc[r][c] = _mm256_fnmadd_ps(mw, sa, acc[r][c]);
                }
            }
        }
        acc
    }
}

/// [`tile`] for Q6_K (a function of its own, as [`tile512_six`]): the 4-bit vectors with
/// the top bits or-ed in at bit 4; two canonical groups of 16 per 32-element group, each with
/// its own sums (AVX2: 16-bit partial sums widened every two steps, 2 * 2 * 63 * 127 <
/// 32768) and epilogue (`s = d * sc`, `m = 32 s`, exact in f32).
///
/// # Safety
/// As [`tile`].
#[inline(always)]
unsafe fn tile_six<const R: usize, const C: usize, const VNNI: bool>(
    k: usize,
    p: *const u8,
    pb: usize,
    a: *const u8,
    a_row: usize,
) -> [[__m256; C]; R] {
    let ng = k / 32;
    let lay = const { lay(L_Q6_K) };
    let ahead = (R * pb).div_ceil(ng);
    let (od, _, o16) = act_offsets(k);
    // SAFETY: as in `tile`: every load is of panel r < R inside its group's vectors or its
    // super-block's header, or of activation byte e < k or scale < k / 16 of column c < C;
    // prefetches never fault.
    unsafe {
        let (ones, low, top) = (
            _mm256_set1_epi16(1),
            _mm256_set1_epi8(0x0f),
            _mm256_set1_epi8(0x30),
        );
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let bcast = |c: usize, e: usize| {
            _mm256_set1_epi32(a.add(c * a_row + e).cast::<i32>().read_unaligned())
        };
        for g in 0..ng {
            let e0 = g * 32;
            prefetch_next_tile::<R>(p, pb, g, ahead);
            let ga = lay.group_at(g);
            // The group's first and second 16 elements' sums (32 and 16 bits).
            let mut sums = [[[_mm256_setzero_si256(); C]; R]; 2];
            let mut s16 = [[[_mm256_setzero_si256(); C]; R]; 2];
            for t in 0..4 {
                for r in 0..R {
                    let gp = p.add(r * pb + ga);
                    let v = _mm256_loadu_si256(gp.add(32 * t).cast());
                    let h = _mm256_loadu_si256(gp.add(Layout::SIX_AT + 32 * (t / 2)).cast());
                    let (hl, hh) = if t % 2 == 0 {
                        (_mm256_slli_epi16::<4>(h), _mm256_slli_epi16::<2>(h))
                    } else {
                        (h, _mm256_srli_epi16::<2>(h))
                    };
                    let lo = _mm256_or_si256(_mm256_and_si256(v, low), _mm256_and_si256(hl, top));
                    let hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
                        _mm256_and_si256(hh, top),
                    );
                    for c in 0..C {
                        let (al, ah) = (bcast(c, e0 + 4 * t), bcast(c, e0 + 16 + 4 * t));
                        if VNNI {
                            sums[0][r][c] = _mm256_dpbusd_epi32(sums[0][r][c], lo, al);
                            sums[1][r][c] = _mm256_dpbusd_epi32(sums[1][r][c], hi, ah);
                        } else {
                            let x = _mm256_maddubs_epi16(lo, al);
                            s16[0][r][c] = _mm256_add_epi16(s16[0][r][c], x);
                            let y = _mm256_maddubs_epi16(hi, ah);
                            s16[1][r][c] = _mm256_add_epi16(s16[1][r][c], y);
                        }
                    }
                }
                if !VNNI && t % 2 == 1 {
                    for half in 0..2 {
                        for r in 0..R {
                            for c in 0..C {
                                let w = _mm256_madd_epi16(s16[half][r][c], ones);
                                sums[half][r][c] = _mm256_add_epi32(sums[half][r][c], w);
                                s16[half][r][c] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
            }
            for r in 0..R {
                let h = p.add(r * pb + lay.head_at(g));
                let d = _mm256_cvtph_ps(_mm_loadu_si128(h.cast()));
                for (half, sums) in sums.iter().enumerate() {
                    let sc = _mm_loadl_epi64(h.add(16 + 8 * (2 * (g % 8) + half)).cast());
                    let sw = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
                    let mw = _mm256_mul_ps(sw, _mm256_set1_ps(lay.sym));
                    for c in 0..C {
                        let ac = a.add(c * a_row);
                        let da = _mm256_broadcast_ss(&*ac.add(od + 4 * g).cast::<f32>());
                        let so = o16 + 4 * (2 * g + half);
                        let sa = _mm256_broadcast_ss(&*ac.add(so).cast::<f32>());
                        let scale = _mm256_mul_ps(sw, da);
                        let isum = _mm256_cvtepi32_ps(sums[r][c]);
                        acc[r][c] = _mm256_fmadd_ps(isum, scale, acc[r][c]);
                        acc[r][c] = _mm256_fnmadd_ps(mw, sa, acc[r][c]);
                    }
                }
            }
        }
        acc
    }
}

/// Two panels' 32-byte vectors at byte `off` of panels `2j` and `2j + 1` (`pb` bytes apart,
/// from `p`), as one 512-bit vector: panel `2j` in the low half.
///
/// # Safety
/// Inlined only into the AVX-512 entry point; both 32-byte ranges are readable.
#[inline(always)]
unsafe fn pair(p: *const u8, pb: usize, j: usize, off: usize) -> __m512i {
    // SAFETY: the caller's contract (AVX-512F; both loads in range).
    unsafe {
        let lo = _mm256_loadu_si256(p.add(2 * j * pb + off).cast());
        let hi = _mm256_loadu_si256(p.add((2 * j + 1) * pb + off).cast());
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
    }
}

/// Two panels' 8 f16 values at byte `off` (as [`pair`]) as 16 floats.
///
/// # Safety
/// As [`pair`] (16-byte ranges).
#[inline(always)]
unsafe fn pair_f16(p: *const u8, pb: usize, j: usize, off: usize) -> __m512 {
    // SAFETY: the caller's contract (AVX-512F, F16C; both loads in range).
    unsafe {
        let lo = _mm_loadu_si128(p.add(2 * j * pb + off).cast());
        let hi = _mm_loadu_si128(p.add((2 * j + 1) * pb + off).cast());
        _mm512_cvtph_ps(_mm256_set_m128i(hi, lo))
    }
}

/// Two panels' 8 bytes at byte `off` (as [`pair`]), panel `2j` in the low half.
///
/// # Safety
/// As [`pair`] (8-byte ranges).
#[inline(always)]
unsafe fn pair_bytes8(p: *const u8, pb: usize, j: usize, off: usize) -> __m128i {
    // SAFETY: the caller's contract (SSE2; both loads in range).
    unsafe {
        let lo = _mm_loadl_epi64(p.add(2 * j * pb + off).cast());
        _mm_unpacklo_epi64(lo, _mm_loadl_epi64(p.add((2 * j + 1) * pb + off).cast()))
    }
}

/// [`tile`] with 512-bit vectors: `P` pairs of consecutive panels (each pair's 16 rows in one
/// vector, the first panel in the low half) for `C` columns; `[j][c]` holds panels `2j` and
/// `2j + 1` for column `c`. Every lane does the 256-bit VNNI tile's operations in the same
/// order (exact integer group sums, then the same float epilogue), so the results are
/// bit-identical to it.
///
/// # Safety
/// Inlined only into the AVX-512 entry point (AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C); `2P`
/// panels of `k` elements are readable at `p`, and `C` activation rows at `a` (as [`tile`]).
#[inline(always)]
unsafe fn tile512<const L: u8, const P: usize, const C: usize>(
    k: usize,
    p: *const u8,
    pb: usize,
    a: *const u8,
    a_row: usize,
    to_l2: bool,
) -> [[__m512; C]; P] {
    if const { lay(L).six } {
        // SAFETY: the same contract.
        return unsafe { tile512_six::<P, C>(k, p, pb, a, a_row, to_l2) };
    }
    let ng = k / 32;
    let lay = const { lay(L) };
    let (od, o32, _) = act_offsets(k);
    // SAFETY: the intrinsics need the entry point's features (see above). Every load is of
    // panel 2j or 2j + 1 < 2P at an offset inside a panel (as in `tile`), or of activation
    // byte e < k or scale g < ng of column c < C; prefetches never fault.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; P];
        let bcast = |c: usize, e: usize| {
            _mm512_set1_epi32(a.add(c * a_row + e).cast::<i32>().read_unaligned())
        };
        for g in 0..ng {
            let e0 = g * 32;
            if !lay.paired() {
                prefetch_streams::<P>(p, pb, g, ng, to_l2);
            }
            let ga = lay.group_at(g);
            let mut isum = [[_mm512_setzero_si512(); C]; P];
            if lay.paired() {
                // Paired panels (`packed::pair_panel`): vector t of both panels of pair j in
                // one 64-byte read, each pair one stream, prefetched a line per read; the
                // cache level chosen once per group (a branch inside the reads cost this
                // stream 10%: `examples/packed_stream Q8_0 640`, 32 -> 28.5 GB/s).
                // Every panel of the tile has its partner (pi + 2P <= np).
                let at = |j: usize| crate::packed::pair_panel(lay, 2 * j, 2 * P, pb);
                let gp: [*const u8; P] = core::array::from_fn(|j| p.add(at(j).vec(ga, 0)));
                isum = match (lay.q8, to_l2) {
                    (true, true) => q8_sums512::<P, C, _MM_HINT_T1>(gp, a, a_row, e0),
                    (true, false) => q8_sums512::<P, C, _MM_HINT_T0>(gp, a, a_row, e0),
                    (false, true) => nib_sums512::<L, P, C, _MM_HINT_T1>(gp, a, a_row, e0),
                    (false, false) => nib_sums512::<L, P, C, _MM_HINT_T0>(gp, a, a_row, e0),
                };
            } else {
                let fifth: [__m512i; P] = core::array::from_fn(|j| {
                    if lay.five {
                        pair(p, pb, j, ga + Layout::FIVE_AT)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for t in 0..4 {
                    for j in 0..P {
                        let v = pair(p, pb, j, ga + 32 * t);
                        let (lo, hi) = nibbles512(v, lay.five.then_some(fifth[j]), t);
                        for c in 0..C {
                            let (al, ah) = (bcast(c, e0 + 4 * t), bcast(c, e0 + 16 + 4 * t));
                            isum[j][c] = _mm512_dpbusd_epi32(isum[j][c], lo, al);
                            isum[j][c] = _mm512_dpbusd_epi32(isum[j][c], hi, ah);
                        }
                    }
                }
            }
            for j in 0..P {
                let (sw, mw) = if lay.paired() {
                    // The pair's 16 scales after its double vectors, then its offsets.
                    let at = crate::packed::pair_panel(lay, 2 * j, 2 * P, pb);
                    let sc = p.add(at.tail(ga, 0));
                    prefetch_line(sc.wrapping_add(PF_AHEAD), to_l2);
                    let sw = _mm512_cvtph_ps(_mm256_loadu_si256(sc.cast()));
                    let mw = if lay.offsets {
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(at.tail(ga, 16)).cast()))
                    } else {
                        _mm512_mul_ps(sw, _mm512_set1_ps(lay.sym))
                    };
                    (sw, mw)
                } else if lay.kq {
                    let ha = lay.head_at(g);
                    let six = |at: usize| {
                        let b = pair_bytes8(p, pb, j, ha + at + 8 * (g % 8));
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))
                    };
                    let d = pair_f16(p, pb, j, ha);
                    let dmin = pair_f16(p, pb, j, ha + 16);
                    (_mm512_mul_ps(d, six(32)), _mm512_mul_ps(dmin, six(96)))
                } else {
                    let sw = pair_f16(p, pb, j, ga + lay.scales_at());
                    let mw = if lay.offsets {
                        pair_f16(p, pb, j, ga + lay.offsets_at())
                    } else {
                        _mm512_mul_ps(sw, _mm512_set1_ps(lay.sym))
                    };
                    (sw, mw)
                };
                for c in 0..C {
                    let ac = a.add(c * a_row);
                    let da = _mm512_set1_ps(ac.add(od + 4 * g).cast::<f32>().read_unaligned());
                    let sa = _mm512_set1_ps(ac.add(o32 + 4 * g).cast::<f32>().read_unaligned());
                    let scale = _mm512_mul_ps(sw, da);
                    acc[j][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j][c]), scale, acc[j][c]);
                    acc[j][c] = _mm512_fnmadd_ps(mw, sa, acc[j][c]);
                }
            }
        }
        acc
    }
}

/// Group `g`'s share of the prefetches of a 512-bit tile of `P` panel pairs at `p` (`pb`
/// bytes a panel, `ng` groups): each of the 2P panel streams PF_AHEAD bytes ahead of where it
/// reads (each line once); past its panel's end, into the matching panel of the next tile.
///
/// # Safety
/// Inlined only into the AVX-512 entry point (SSE is enough); prefetches never fault.
#[inline(always)]
unsafe fn prefetch_streams<const P: usize>(
    p: *const u8,
    pb: usize,
    g: usize,
    ng: usize,
    to_l2: bool,
) {
    let (o0, o1) = (g * pb / ng + PF_AHEAD, (g + 1) * pb / ng + PF_AHEAD);
    let mut o = o0 & !63;
    while o < o1 & !63 {
        for s in 0..2 * P {
            let at = if o < pb {
                s * pb + o
            } else {
                (2 * P + s) * pb + o - pb
            };
            prefetch_line(p.wrapping_add(at), to_l2);
        }
        o += 64;
    }
}

/// How far ahead a paired stream is also prefetched into L2, a line per read. One stream per
/// thread has one hardware streamer where two had two: without this second prefetch the
/// pairing was 5-15% slower than two streams when the matrix sits partly in a large L3
/// (`examples/packed_stream Q8_0 576 96`; SmolLM2's decode 2-4% slower), with it as fast
/// (SmolLM2, 5 alternating rounds, medians: two streams 345.9, paired Q8_0 338.1, paired
/// Q8_0 with this 358.8 tok/s), and the gain from memory kept (Gemma 3: 109.2 / 112.0 /
/// 112.2).
const PF_FAR: usize = 3 * PF_AHEAD;

/// The prefetches of a paired stream read at `at`: `PF_AHEAD` ahead with `HINT`, `PF_FAR`
/// ahead into L2.
#[inline(always)]
fn prefetch_paired<const HINT: i32>(at: *const u8) {
    // SAFETY: a prefetch of any address is harmless (SSE, part of x86_64).
    unsafe {
        _mm_prefetch::<HINT>(at.wrapping_add(PF_AHEAD).cast());
        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(PF_FAR).cast());
    }
}

/// The levels of vector `t` of a 4-bit group, `v`, as two vectors of bytes (the low and high
/// nibbles), for 5-bit formats with bit 4 from the fifth-bit vector `h` (bits `t` and `4 + t`
/// of each byte; see `pack`).
///
/// # Safety
/// Inlined only into the AVX-512 entry point (AVX-512 F/BW).
#[inline(always)]
unsafe fn nibbles512(v: __m512i, h: Option<__m512i>, t: usize) -> (__m512i, __m512i) {
    // SAFETY: register operations of the entry point's features.
    unsafe {
        let (low, bit4) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x10));
        let lo = _mm512_and_si512(v, low);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
        let Some(h) = h else {
            return (lo, hi);
        };
        let hl = _mm512_sll_epi16(h, count(4 - t));
        let hh = _mm512_srl_epi16(h, count(t));
        (
            _mm512_or_si512(lo, _mm512_and_si512(hl, bit4)),
            _mm512_or_si512(hi, _mm512_and_si512(hh, bit4)),
        )
    }
}

/// The integer sums of one group of a 512-bit tile of a paired 4- or 5-bit format (Q4_0,
/// Q4_1, Q5_0, Q5_1; see [`tile512`]): pair `j`'s group at `gp[j]` (its 4 double vectors,
/// then for 5 bits the double fifth-bit vector, `packed::pair_panel`), read as one stream and
/// prefetched a line per read as [`q8_sums512`] does.
///
/// # Safety
/// As [`tile512`]: the group's vectors at each `gp[j]` are readable, and activation bytes
/// `e0 .. e0 + 32` of `C` rows at `a`.
#[inline(always)]
unsafe fn nib_sums512<const L: u8, const P: usize, const C: usize, const HINT: i32>(
    gp: [*const u8; P],
    a: *const u8,
    a_row: usize,
    e0: usize,
) -> [[__m512i; C]; P] {
    let lay = const { lay(L) };
    // SAFETY: the caller's contract (AVX-512 F/BW/VNNI; the loads in range); prefetches
    // never fault.
    unsafe {
        let bcast = |c: usize, e: usize| {
            _mm512_set1_epi32(a.add(c * a_row + e).cast::<i32>().read_unaligned())
        };
        let mut isum = [[_mm512_setzero_si512(); C]; P];
        let fifth: [__m512i; P] = core::array::from_fn(|j| {
            if lay.five {
                let at = gp[j].add(2 * Layout::FIVE_AT);
                prefetch_paired::<HINT>(at);
                _mm512_loadu_si512(at.cast())
            } else {
                _mm512_setzero_si512()
            }
        });
        for t in 0..4 {
            for j in 0..P {
                prefetch_paired::<HINT>(gp[j].wrapping_add(64 * t));
                let v = _mm512_loadu_si512(gp[j].add(64 * t).cast());
                let (lo, hi) = nibbles512(v, lay.five.then_some(fifth[j]), t);
                for (c, s) in isum[j].iter_mut().enumerate() {
                    let (al, ah) = (bcast(c, e0 + 4 * t), bcast(c, e0 + 16 + 4 * t));
                    *s = _mm512_dpbusd_epi32(*s, lo, al);
                    *s = _mm512_dpbusd_epi32(*s, hi, ah);
                }
            }
        }
        isum
    }
}

/// The integer sums of one Q8_0 group of a 512-bit tile (see [`tile512`]): pair `j`'s
/// group at `gp[j]` (its 8 double vectors, `packed::pair_panel`), read as one stream and
/// prefetched a line per read `PF_AHEAD` bytes ahead with `HINT` (and `PF_FAR` ahead
/// into L2).
///
/// # Safety
/// As [`tile512`]: the 512 bytes at each `gp[j]` are readable, and activation bytes `e0 ..
/// e0 + 32` of `C` rows at `a`.
#[inline(always)]
unsafe fn q8_sums512<const P: usize, const C: usize, const HINT: i32>(
    gp: [*const u8; P],
    a: *const u8,
    a_row: usize,
    e0: usize,
) -> [[__m512i; C]; P] {
    // SAFETY: the caller's contract (AVX-512 F/BW/VNNI; the loads in range); prefetches
    // never fault.
    unsafe {
        let mut isum = [[_mm512_setzero_si512(); C]; P];
        for t in 0..8 {
            for j in 0..P {
                prefetch_paired::<HINT>(gp[j].wrapping_add(64 * t));
                let v = _mm512_loadu_si512(gp[j].add(64 * t).cast());
                // |w| as u8 and the activation negated where w < 0: the products of
                // `sign_epi8` (where w = 0 both give 0).
                let wabs = _mm512_abs_epi8(v);
                let neg = _mm512_movepi8_mask(v);
                for (c, s) in isum[j].iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(
                        a.add(c * a_row + e0 + 4 * t).cast::<i32>().read_unaligned(),
                    );
                    let sa = _mm512_mask_sub_epi8(av, neg, _mm512_setzero_si512(), av);
                    *s = _mm512_dpbusd_epi32(*s, wabs, sa);
                }
            }
        }
        isum
    }
}

/// A prefetch of the line at `at` into L2 if `to_l2`, else into L1.
#[inline(always)]
fn prefetch_line(at: *const u8, to_l2: bool) {
    // SAFETY: a prefetch of any address is harmless (SSE, part of x86_64); the branch is
    // the same every call.
    unsafe {
        if to_l2 {
            _mm_prefetch::<_MM_HINT_T1>(at.cast());
        } else {
            _mm_prefetch::<_MM_HINT_T0>(at.cast());
        }
    }
}

/// [`tile512`] for Q6_K (a function of its own: folded into `tile512`, its extra
/// accumulators halved the other formats' in-cache speed). Levels: the 4-bit vectors with
/// the top bits of the two top-bit vectors or-ed in at bit 4; each 32-element group is two
/// canonical groups of 16 with their own sums and epilogues (`s = d * sc`, `m = 32 s`, exact
/// in f32), in the panel kernel's order.
///
/// # Safety
/// As [`tile512`].
#[inline(always)]
unsafe fn tile512_six<const P: usize, const C: usize>(
    k: usize,
    p: *const u8,
    pb: usize,
    a: *const u8,
    a_row: usize,
    to_l2: bool,
) -> [[__m512; C]; P] {
    let ng = k / 32;
    let lay = const { lay(L_Q6_K) };
    let (od, _, o16) = act_offsets(k);
    // SAFETY: the intrinsics need the entry point's features. Every load is of panel 2j or
    // 2j + 1 < 2P inside its group's vectors or its super-block's header, or of activation
    // byte e < k or scale < k / 16 of column c < C.
    unsafe {
        let (low, top) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        let mut acc = [[_mm512_setzero_ps(); C]; P];
        let bcast = |c: usize, e: usize| {
            _mm512_set1_epi32(a.add(c * a_row + e).cast::<i32>().read_unaligned())
        };
        for g in 0..ng {
            let e0 = g * 32;
            prefetch_streams::<P>(p, pb, g, ng, to_l2);
            let ga = lay.group_at(g);
            // The group's first and second 16 elements' sums.
            let mut sums = [[[_mm512_setzero_si512(); C]; P]; 2];
            let six: [[__m512i; 2]; P] = core::array::from_fn(|j| {
                core::array::from_fn(|u| pair(p, pb, j, ga + Layout::SIX_AT + 32 * u))
            });
            for t in 0..4 {
                for j in 0..P {
                    let v = pair(p, pb, j, ga + 32 * t);
                    // Top bits 4(t%2) and 4(t%2)+2 of vector t/2 to bits 4-5 (see `pack`).
                    let h = six[j][t / 2];
                    let (hl, hh) = if t % 2 == 0 {
                        (_mm512_slli_epi16::<4>(h), _mm512_slli_epi16::<2>(h))
                    } else {
                        (h, _mm512_srli_epi16::<2>(h))
                    };
                    let lo = _mm512_or_si512(_mm512_and_si512(v, low), _mm512_and_si512(hl, top));
                    let hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), low),
                        _mm512_and_si512(hh, top),
                    );
                    for c in 0..C {
                        let (al, ah) = (bcast(c, e0 + 4 * t), bcast(c, e0 + 16 + 4 * t));
                        sums[0][j][c] = _mm512_dpbusd_epi32(sums[0][j][c], lo, al);
                        sums[1][j][c] = _mm512_dpbusd_epi32(sums[1][j][c], hi, ah);
                    }
                }
            }
            let ha = lay.head_at(g);
            for j in 0..P {
                let d = pair_f16(p, pb, j, ha);
                for (half, sums) in sums.iter().enumerate() {
                    let b = pair_bytes8(p, pb, j, ha + 16 + 8 * (2 * (g % 8) + half));
                    let sw = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
                    let mw = _mm512_mul_ps(sw, _mm512_set1_ps(lay.sym));
                    for c in 0..C {
                        let ac = a.add(c * a_row);
                        let da = _mm512_set1_ps(ac.add(od + 4 * g).cast::<f32>().read_unaligned());
                        let so = o16 + 4 * (2 * g + half);
                        let sa = _mm512_set1_ps(ac.add(so).cast::<f32>().read_unaligned());
                        let scale = _mm512_mul_ps(sw, da);
                        let isum = _mm512_cvtepi32_ps(sums[j][c]);
                        acc[j][c] = _mm512_fmadd_ps(isum, scale, acc[j][c]);
                        acc[j][c] = _mm512_fnmadd_ps(mw, sa, acc[j][c]);
                    }
                }
            }
        }
        acc
    }
}

/// Panel pairs per 512-bit decode tile (one column): one pair, whose next tile is prefetched
/// (SmolLM2 decode, alternating 16-token blocks in one process: 317 tok/s with two pairs,
/// 340 with one, three pairs 318; Gemma 3 132 -> 137).
const DECODE_PAIRS: usize = 1;
/// Panel pairs and columns per 512-bit batch tile.
const BATCH_PAIRS: usize = 1;
const COLS512: usize = 8;

/// Bytes per panel and per activation row, and the number of panels, of a product, with
/// the slices checked to hold them.
fn sizes<const L: u8>(
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
) -> (usize, usize, usize) {
    let (pb, a_row) = (const { lay(L) }.panel_bytes(k), act_row_bytes(k));
    let np = n_rows.div_ceil(PANEL_ROWS);
    assert!(packed.len() >= np * pb && act.len() >= n_cols * a_row);
    (pb, a_row, np)
}

/// Hands panel `pi`'s 8 results `v` for column `c` (those of its rows below `n_rows`) to
/// `sink`.
#[inline(always)]
fn put_panel(
    sink: &mut dyn FnMut(usize, usize, &[f32]),
    n_rows: usize,
    c: usize,
    pi: usize,
    v: __m256,
) {
    let mut t = [0.0f32; PANEL_ROWS];
    // SAFETY: 8 writable floats; AVX, a feature of both entry points this is inlined into.
    unsafe { _mm256_storeu_ps(t.as_mut_ptr(), v) };
    let rs = pi * PANEL_ROWS;
    let len = PANEL_ROWS.min(n_rows - rs);
    sink(c, rs, &t[..len]);
}

/// [`drive`] with 512-bit tiles ([`tile512`]) wherever two panels are left, the 256-bit VNNI
/// tile for a last odd panel.
///
/// # Safety
/// Inlined only into [`gemm_vnni`]; sizes as in [`drive`]. `to_l2`: the cache level the
/// next tile is prefetched into (see [`crate::Prefetch`]).
#[inline(always)]
unsafe fn drive512<const L: u8>(
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
    to_l2: bool,
) {
    let (pb, a_row, np) = sizes::<L>(k, packed, n_rows, act, n_cols);
    let (pp, ap) = (packed.as_ptr(), act.as_ptr());
    let mut put = |c: usize, pi: usize, v: __m256| put_panel(sink, n_rows, c, pi, v);
    let halves = |v: __m512| {
        // SAFETY: AVX-512F, a feature of the entry point this is inlined into.
        unsafe {
            (
                _mm512_castps512_ps256(v),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
            )
        }
    };
    // Panels pi.. for columns c0.., `P` pairs and `C` columns at a time.
    macro_rules! run {
        ($pairs:expr, $cols:expr, $pi:expr, $c0:expr) => {{
            // SAFETY: panels pi .. pi + 2 * pairs <= np and columns c0 .. c0 + cols <=
            // n_cols: inside the asserted ranges.
            let t = unsafe {
                tile512::<L, { $pairs }, { $cols }>(
                    k,
                    pp.add($pi * pb),
                    pb,
                    ap.add($c0 * a_row),
                    a_row,
                    to_l2,
                )
            };
            for (j, row) in t.into_iter().enumerate() {
                for (c, v) in row.into_iter().enumerate() {
                    let (lo, hi) = halves(v);
                    put($c0 + c, $pi + 2 * j, lo);
                    put($c0 + c, $pi + 2 * j + 1, hi);
                }
            }
        }};
    }
    // The last odd panel, one column at a time, with the 256-bit tile.
    macro_rules! odd {
        ($pi:expr, $c:expr) => {{
            // SAFETY: panel pi < np and column c < n_cols; the VNNI tile needs AVX-512
            // VNNI/VL, features of the entry point this is inlined into.
            let t = unsafe {
                tile::<L, 1, 1, true>(
                    k,
                    pp.add($pi * pb),
                    pb,
                    ($pi, np),
                    ap.add($c * a_row),
                    a_row,
                )
            };
            put($c, $pi, t[0][0]);
        }};
    }
    if n_cols >= 2 {
        let mut pi = 0;
        while pi + 2 * BATCH_PAIRS <= np {
            // Columns 8 at a time, then the rest in one tile (each tile reads the panels
            // once).
            let mut c0 = 0;
            while c0 + COLS512 <= n_cols {
                run!(BATCH_PAIRS, COLS512, pi, c0);
                c0 += COLS512;
            }
            match n_cols - c0 {
                0 => {}
                1 => run!(BATCH_PAIRS, 1, pi, c0),
                2 => run!(BATCH_PAIRS, 2, pi, c0),
                3 => run!(BATCH_PAIRS, 3, pi, c0),
                4 => run!(BATCH_PAIRS, 4, pi, c0),
                5 => run!(BATCH_PAIRS, 5, pi, c0),
                6 => run!(BATCH_PAIRS, 6, pi, c0),
                _ => run!(BATCH_PAIRS, 7, pi, c0),
            }
            pi += 2 * BATCH_PAIRS;
        }
        while pi + 2 <= np {
            for c in 0..n_cols {
                run!(1, 1, pi, c);
            }
            pi += 2;
        }
        if pi < np {
            for c in 0..n_cols {
                odd!(pi, c);
            }
        }
        return;
    }
    for c in 0..n_cols {
        let mut pi = 0;
        while pi + 2 * DECODE_PAIRS <= np {
            run!(DECODE_PAIRS, 1, pi, c);
            pi += 2 * DECODE_PAIRS;
        }
        while pi + 2 <= np {
            run!(1, 1, pi, c);
            pi += 2;
        }
        if pi < np {
            odd!(pi, c);
        }
    }
}

/// Cache level the prefetches of the next tile go to: L2 (measured, 190 MB of Q4_1 streamed
/// by 2 threads: 28-33 GB/s, the machine's read bandwidth; into L1 or non-temporal 19-22).
const PF_HINT: i32 = _MM_HINT_T1;

/// How far ahead of its reads the 512-bit tiles prefetch each panel stream, in bytes (the
/// cache level is [`crate::Prefetch`]'s). On an Intel Xeon (2026-12-07, 2 threads, `microllm
/// bench -p 0 -n 128`, alternating): Gemma 3 decode, whose 180 MB Q8_0 output matrix streams
/// from memory, 94 / 95 tok/s when the next tile was prefetched (spread over the current
/// one, 5-11 KB ahead of the streams, the layout tuned on an AMD EPYC), 107 / 105 with each
/// stream 4 KiB ahead, 102 / 107 at 6 KiB, 103 / 104 at 2.5 KiB; SmolLM2 (from the L3)
/// 367 / 364 against 363 / 352 (noise), 1.5 KiB ahead cost it 10-15%. `examples/packed_stream
/// Q8_0 640` (190 MB): 27 GB/s -> 29-30, the machine's read bandwidth.
const PF_AHEAD: usize = 4096;

/// Panels per decode tile (one column): independent float chains.
const DECODE_PANELS: usize = 4;
/// Panels per Q6_K decode tile (its two sums per group need twice the registers).
const SIX_DECODE_PANELS: usize = 2;
/// Columns per batch tile.
const COLS: usize = 4;

/// The whole product (see [`gemm`]) for one format with the 256-bit AVX2 tiles.
///
/// # Safety
/// As [`tile`]: inlined only into the AVX2 entry point; sizes checked by [`gemm`].
#[inline(always)]
unsafe fn drive<const L: u8>(
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
) {
    let (pb, a_row, np) = sizes::<L>(k, packed, n_rows, act, n_cols);
    let (pp, ap) = (packed.as_ptr(), act.as_ptr());
    let mut put = |c: usize, pi: usize, v: __m256| put_panel(sink, n_rows, c, pi, v);
    if n_cols >= COLS {
        for pi in 0..np {
            let mut c0 = 0;
            while c0 < n_cols {
                // SAFETY: panel pi < np and columns below n_cols are inside the asserted
                // ranges.
                unsafe {
                    let (p, a) = (pp.add(pi * pb), ap.add(c0 * a_row));
                    if c0 + COLS <= n_cols {
                        let t = tile::<L, 1, COLS, false>(k, p, pb, (pi, np), a, a_row);
                        for (c, v) in t[0].into_iter().enumerate() {
                            put(c0 + c, pi, v);
                        }
                        c0 += COLS;
                    } else {
                        put(
                            c0,
                            pi,
                            tile::<L, 1, 1, false>(k, p, pb, (pi, np), a, a_row)[0][0],
                        );
                        c0 += 1;
                    }
                }
            }
        }
        return;
    }
    for c in 0..n_cols {
        let mut pi = 0;
        while pi < np {
            // SAFETY: panels pi .. pi + R <= np and column c < n_cols are inside the
            // asserted ranges.
            unsafe {
                let (p, a) = (pp.add(pi * pb), ap.add(c * a_row));
                // `R` panels for column c at once.
                macro_rules! panels {
                    ($r:expr) => {{
                        let t = tile::<L, { $r }, 1, false>(k, p, pb, (pi, np), a, a_row);
                        for (r, v) in t.into_iter().enumerate() {
                            put(c, pi + r, v[0]);
                        }
                        pi += $r;
                    }};
                }
                if const { lay(L).six } && pi + SIX_DECODE_PANELS <= np {
                    panels!(SIX_DECODE_PANELS);
                } else if pi + DECODE_PANELS <= np {
                    panels!(DECODE_PANELS);
                } else {
                    put(
                        c,
                        pi,
                        tile::<L, 1, 1, false>(k, p, pb, (pi, np), a, a_row)[0][0],
                    );
                    pi += 1;
                }
            }
        }
    }
}

/// [`drive`] for AVX2 + FMA + F16C.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; sizes checked by [`gemm`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2<const L: u8>(
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
) {
    // SAFETY: this function's features are the ones `drive` needs.
    unsafe { drive::<L>(k, packed, n_rows, act, n_cols, sink) }
}

/// [`drive512`]: AVX-512 (F, BW, VL, VNNI) with AVX2, FMA and F16C.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX512F, AVX512BW, AVX512VL and AVX512-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gemm_vnni<const L: u8>(
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
    to_l2: bool,
) {
    // SAFETY: this function's features are the ones `drive512` (and the 256-bit
    // `tile::<_, _, _, true>` it uses for an odd panel) needs.
    unsafe { drive512::<L>(k, packed, n_rows, act, n_cols, sink, to_l2) }
}

/// See `Kernels::gemm_packed_into` (shapes checked there): `vnni` picks the AVX-512 tiles,
/// whose prefetches of the next tile go to L2 if `to_l2`, else to L1 (the 256-bit tiles
/// always prefetch into L2).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and if `vnni`, AVX512F, AVX512BW, AVX512VL and
/// VNNI.
pub(crate) unsafe fn gemm(
    f: Fmt,
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
    vnni: bool,
    to_l2: bool,
) {
    macro_rules! go {
        ($l:expr) => {
            // SAFETY: the caller guarantees the features of the variant chosen.
            unsafe {
                if vnni {
                    gemm_vnni::<{ $l }>(k, packed, n_rows, act, n_cols, sink, to_l2)
                } else {
                    gemm_avx2::<{ $l }>(k, packed, n_rows, act, n_cols, sink)
                }
            }
        };
    }
    match f {
        Fmt::Q8_0 => go!(L_Q8_0),
        Fmt::Q4_0 => go!(L_Q4_0),
        Fmt::Q4_1 => go!(L_Q4_1),
        Fmt::Q5_0 => go!(L_Q5_0),
        Fmt::Q5_1 => go!(L_Q5_1),
        Fmt::Q4_K => go!(L_Q4_K),
        Fmt::Q5_K => go!(L_Q5_K),
        Fmt::Q6_K => go!(L_Q6_K),
        _ => unreachable!("checked by Kernels::gemm_packed_into: {f:?} is not packed"),
    }
}
