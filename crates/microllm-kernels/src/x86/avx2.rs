//! AVX2 + FMA + F16C kernels (no AVX-512: the code must run on every x86-64 from Haswell on).
//!
//! Every entry point is an `unsafe fn` whose only safety requirement is that the CPU has AVX2,
//! FMA and F16C; the `Kernels` invariant guarantees it. Memory safety does not rest on the
//! caller: each function that reads through raw pointers first asserts, once, that its slices
//! cover every byte the loop will touch, and each `unsafe` block names that assert.
//!
//! Quantized dot products use the integer path: one 32-element block pair is a
//! `maddubs` (u8 x i8 -> pairwise i16) and a `madd` with ones (-> 8 x i32), converted to f32
//! and multiply-added with `d_w * d_a`, so the block sum is exact as in the reference and
//! only the f32 accumulation order differs. That order is llama.cpp's AVX2 one: 8 lanes
//! accumulated per block and summed at the end (`ggml_vec_dot_*` and llamafile's sgemm agree),
//! except Q4_0, which llama.cpp repacks on AVX2 and accumulates as one fma of the block's
//! integer total per block. The K-quants live in `avx2_k.rs`. Signed weights (Q4_0, Q5_0, Q8_0) go through the
//! sign trick (`|w|` as u8, `a` with the sign of `w`); Q4_1/Q5_1 weights are already unsigned
//! and their minimum is added as `m_w * s_a` per block.
//!
//! [`gemm`] computes tiles of up to [`ROWS`] weight rows x [`COLS`] activation columns: each
//! weight block is unpacked once per tile and each activation block loaded once per tile.
//! The result of one (row, column) pair goes through exactly the same operations whatever the
//! tile shape, so `gemm` is bit-identical to a loop of [`vec_dot`]. On the first column group
//! each tile also prefetches the weights a few KiB ahead into L2 (see [`PREFETCH_BYTES`]),
//! which is what lets the decode matvec stream at memory bandwidth.
//!
//! Two measured pitfalls are worked around here: see [`f16x2`] (a false dependency from
//! `vpinsrw`) and [`PREFETCH_BYTES`] (interleaved row streams defeat the hardware prefetcher).

use crate::blocks::{F16Le, QK};
use crate::format::Fmt;
use core::arch::x86_64::*;
use half::f16;

/// Weight rows per gemm tile.
pub(crate) const ROWS: usize = 4;
/// Activation columns per gemm tile (register budget: ROWS*COLS accumulators of 16 ymm).
pub(crate) const COLS: usize = 2;

// Weight-format tags for const generics (stable Rust has no enum const parameters).
const W_Q4_0: u8 = 0;
const W_Q4_1: u8 = 1;
const W_Q5_0: u8 = 2;
const W_Q5_1: u8 = 3;
const W_Q8_0: u8 = 4;
const W_F32: u8 = 5;
const W_F16: u8 = 6;
const W_BF16: u8 = 7;

/// Bytes per weight block (quantized) or element (float).
const fn w_bytes(w: u8) -> usize {
    match w {
        W_Q4_0 => 18,
        W_Q4_1 => 20,
        W_Q5_0 => 22,
        W_Q5_1 => 24,
        W_Q8_0 => 34,
        W_F32 => 4,
        _ => 2,
    }
}

/// Whether the weight format has a minimum (and so Q8_1 activations).
const fn has_min(w: u8) -> bool {
    matches!(w, W_Q4_1 | W_Q5_1)
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of the 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Sum the 8 i32 lanes of each of up to 4 vectors: lane `r` of the result is the total of
/// `v[r]` (lanes `r >= R` are 0). Integer adds, so the result is exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn reduce_rows<const R: usize>(v: &[__m256i; R]) -> __m128i {
    let z = _mm256_setzero_si256();
    let g = |i: usize| if i < R { v[i] } else { z };
    let h01 = _mm256_hadd_epi32(g(0), g(1));
    let h23 = _mm256_hadd_epi32(g(2), g(3));
    let h = _mm256_hadd_epi32(h01, h23);
    _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
}

/// Up to 4 floats as a 128-bit vector (missing lanes 0).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f4<const R: usize>(v: &[f32; R]) -> __m128 {
    let g = |i: usize| if i < R { v[i] } else { 0.0 };
    _mm_setr_ps(g(0), g(1), g(2), g(3))
}

/// f16 bits -> f32 (exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn h2f(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The two halves at `p..p+4` as `[f(p[0..2]), f(p[2..4]), 0, 0]`: a block's scale and its
/// second field (min, sum, or the first quant bytes, then ignored).
///
/// One 32-bit `vmovd` load: loading a lone u16 makes LLVM emit `vpinsrw` into a stale
/// register, a false dependency that chained every block of a tile together (2.5x slower).
///
/// # Safety
/// `p..p+4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16x2(p: *const u8) -> __m128 {
    // SAFETY: the caller guarantees 4 readable bytes.
    _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe { rd32(p) } as i32))
}

/// Two little-endian bytes at `p`.
///
/// # Safety
/// `p..p+2` must be readable.
#[inline(always)]
pub(super) unsafe fn rd16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees 2 readable bytes; [u8; 2] has alignment 1.
    u16::from_le_bytes(unsafe { p.cast::<[u8; 2]>().read() })
}

/// Four little-endian bytes at `p`.
///
/// # Safety
/// `p..p+4` must be readable.
#[inline(always)]
pub(super) unsafe fn rd32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees 4 readable bytes; [u8; 4] has alignment 1.
    u32::from_le_bytes(unsafe { p.cast::<[u8; 4]>().read() })
}

/// 16 bytes of nibbles -> 32 byte lanes 0..=15: lanes 0..16 the low nibbles, 16..32 the high.
///
/// # Safety
/// `p..p+16` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes; loadu has no alignment requirement.
    let q = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
    // Upper half shifted right by 4 (64-bit lanes: the bits that cross into a byte's low
    // nibble are masked away), so bytes 16..32 hold the high nibbles.
    let both = _mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// Byte lane j = 0xFF where bit j of `qh` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bits_to_bytes(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    // Lane j takes byte j/8 of qh (shuffle_epi8 works within each 128-bit half, and both
    // halves hold all four bytes of the broadcast).
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bytes = _mm256_shuffle_epi8(v, shuf);
    // ... and keeps bit j%8 of it.
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
}

/// One weight block unpacked: 32 i8 lanes in element order (signed for Q4_0/Q5_0/Q8_0,
/// 0..=31 for Q4_1/Q5_1), and `[d, m, 0, 0]` (lane 1 is junk for formats without a min).
///
/// # Safety
/// `p..p + w_bytes(W)` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_wq<const W: u8>(p: *const u8) -> (__m256i, __m128) {
    // The caller guarantees the whole block, w_bytes(W) bytes, is readable; each read below
    // stays inside that block's layout (see crate::blocks).
    match W {
        W_Q4_0 => {
            // SAFETY: bytes 0..18 of an 18-byte block.
            let (dm, q) = unsafe { (f16x2(p), nibbles(p.add(2))) };
            (_mm256_sub_epi8(q, _mm256_set1_epi8(8)), dm)
        }
        W_Q4_1 => {
            // SAFETY: bytes 0..20 of a 20-byte block.
            let (dm, q) = unsafe { (f16x2(p), nibbles(p.add(4))) };
            (q, dm)
        }
        W_Q5_0 => {
            // SAFETY: bytes 0..22 of a 22-byte block.
            let (dm, qh, q) = unsafe { (f16x2(p), rd32(p.add(2)), nibbles(p.add(6))) };
            // 5th bit clear: q - 16 == q | 0xF0 as i8; set: q - 16 + 16 == q.
            let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(q, hi), dm)
        }
        W_Q5_1 => {
            // SAFETY: bytes 0..24 of a 24-byte block.
            let (dm, qh, q) = unsafe { (f16x2(p), rd32(p.add(4)), nibbles(p.add(8))) };
            let hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
            (_mm256_or_si256(q, hi), dm)
        }
        _ => {
            debug_assert_eq!(W, W_Q8_0);
            // SAFETY: bytes 0..34 of a 34-byte block.
            let (dm, q) = unsafe { (f16x2(p), _mm256_loadu_si256(p.add(2).cast())) };
            (q, dm)
        }
    }
}

/// 8 float weights at `p` widened to f32.
///
/// # Safety
/// `p..p + 8 * w_bytes(W)` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_wf<const W: u8>(p: *const u8) -> __m256 {
    // The caller guarantees 8 elements are readable; the loads are unaligned loads.
    match W {
        // SAFETY: 32 readable bytes (8 f32).
        W_F32 => unsafe { _mm256_loadu_ps(p.cast()) },
        // SAFETY: 16 readable bytes (8 f16).
        W_F16 => _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) }),
        _ => {
            debug_assert_eq!(W, W_BF16);
            // SAFETY: 16 readable bytes (8 bf16).
            let h = unsafe { _mm_loadu_si128(p.cast()) };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
}

/// One float weight at `p` as f32.
///
/// # Safety
/// `p..p + w_bytes(W)` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_wf1<const W: u8>(p: *const u8) -> f32 {
    // The caller guarantees one element is readable.
    match W {
        // SAFETY: 4 readable bytes.
        W_F32 => f32::from_bits(unsafe { rd32(p) }),
        // SAFETY: 2 readable bytes.
        W_F16 => h2f(unsafe { rd16(p) }),
        // SAFETY: 2 readable bytes.
        _ => f32::from_bits((unsafe { rd16(p) } as u32) << 16),
    }
}

// ---------------------------------------------------------------------------------------
// Dot-product tiles
// ---------------------------------------------------------------------------------------

/// Dot products of R weight rows (`w`, rows `w_row` bytes apart, `nb` blocks each) with C
/// activation columns (`a`, columns `a_row` bytes apart). Result `[r][c]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile_q<const W: u8, const R: usize, const C: usize>(
    nb: usize,
    w: &[u8],
    w_row: usize,
    a: &[u8],
    a_row: usize,
    prefetch: bool,
) -> [[f32; C]; R] {
    let wb = w_bytes(W);
    let ab = if has_min(W) { 36 } else { 34 };
    // Bounds for every raw read below: row r < R, block b < nb reads
    // w[r*w_row + b*wb .. + wb]; column c < C reads a[c*a_row + b*ab .. + ab].
    assert!(R >= 1 && C >= 1);
    assert!(
        w.len() >= (R - 1) * w_row + nb * wb,
        "tile_q: weight slice too short"
    );
    assert!(
        a.len() >= (C - 1) * a_row + nb * ab,
        "tile_q: activation slice too short"
    );
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let dist = if prefetch {
        prefetch_distance(R * w_row)
    } else {
        0
    };
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0.0f32; C]; R];
    // Q4_0 (repacked in llama.cpp): per column, rows in 128-bit lanes.
    let mut acc4 = [_mm_setzero_ps(); C];
    for b in 0..nb {
        let mut blk_sum = [[_mm256_setzero_si256(); C]; R];
        let mut blk_d = [0.0f32; R];
        let mut aq = [_mm256_setzero_si256(); C];
        let mut ad = [_mm256_setzero_ps(); C];
        // s_a of Q8_1 (d_a * sum(q_a)); the m_w * s_a terms are summed as scalars and added
        // after the lane sum, in ggml's order, so results are bit-identical to llama.cpp's.
        let mut asum = [0.0f32; C];
        for c in 0..C {
            // SAFETY: c < C and b < nb, so the ab bytes at this offset are inside `a` by the
            // assert above; Q8_1 = d, s, qs[32] (36 bytes), Q8_0 = d, qs[32] (34 bytes).
            unsafe {
                let p = ap.add(c * a_row + b * ab);
                let ds = f16x2(p);
                ad[c] = _mm256_broadcastss_ps(ds);
                if has_min(W) {
                    asum[c] = _mm_cvtss_f32(_mm_movehdup_ps(ds));
                    aq[c] = _mm256_loadu_si256(p.add(4).cast());
                } else {
                    aq[c] = _mm256_loadu_si256(p.add(2).cast());
                }
            }
        }
        for r in 0..R {
            if prefetch {
                prefetch_ahead(wp.wrapping_add(r * w_row + b * wb), dist);
            }
            // SAFETY: r < R and b < nb, so this block is inside `w` by the assert above.
            let (wq, dm) = unsafe { load_wq::<W>(wp.add(r * w_row + b * wb)) };
            let dw = _mm256_broadcastss_ps(dm);
            if has_min(W) {
                // Unsigned weights 0..=31: maddubs(u8 w, i8 a) directly; pair sums fit i16.
                let mw = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                for c in 0..C {
                    let p16 = _mm256_maddubs_epi16(wq, aq[c]);
                    let p32 = _mm256_madd_epi16(p16, ones);
                    let scale = _mm256_mul_ps(dw, ad[c]);
                    acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[r][c]);
                    // ggml-cpu (built with -mfma) contracts `summs += m * s` into an fma; the
                    // product of two f16 values is exact in f32, so either way is the same.
                    summs[r][c] = mw.mul_add(asum[c], summs[r][c]);
                }
            } else {
                // Sign trick: |w| (as u8, 128 for -128) times a with w's sign; pair sums are
                // at most 2*128*127 < 32768, so maddubs never saturates.
                let wabs = _mm256_sign_epi8(wq, wq);
                for c in 0..C {
                    let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(aq[c], wq));
                    let p32 = _mm256_madd_epi16(p16, ones);
                    if W == W_Q4_0 {
                        blk_sum[r][c] = p32;
                        blk_d[r] = _mm_cvtss_f32(dm);
                    } else {
                        let scale = _mm256_mul_ps(dw, ad[c]);
                        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[r][c]);
                    }
                }
            }
        }
        if W == W_Q4_0 {
            // llama.cpp repacks Q4_0 on AVX2 (ggml_gemv/gemm_q4_0_8x8_q8_0): per block one
            // fma of the block's whole integer sum, `acc = fma(f32(S), d_w * d_a, acc)`.
            let dw4 = f4(&blk_d);
            for c in 0..C {
                let col: [__m256i; R] = core::array::from_fn(|r| blk_sum[r][c]);
                let s4 = _mm_cvtepi32_ps(reduce_rows(&col));
                let scale = _mm_mul_ps(dw4, _mm256_castps256_ps128(ad[c]));
                acc4[c] = _mm_fmadd_ps(s4, scale, acc4[c]);
            }
        }
    }
    let mut out = [[0.0f32; C]; R];
    let mut q40 = [[0.0f32; 4]; C];
    if W == W_Q4_0 {
        for c in 0..C {
            // SAFETY: 4 writable floats.
            unsafe { _mm_storeu_ps(q40[c].as_mut_ptr(), acc4[c]) };
        }
    }
    for r in 0..R {
        for c in 0..C {
            out[r][c] = if W == W_Q4_0 {
                q40[c][r]
            } else {
                hsum_ps(acc[r][c]) + summs[r][c]
            };
        }
    }
    out
}

/// As [`tile_q`] for float weights (`k` elements per row) and f32 activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile_f<const W: u8, const R: usize, const C: usize>(
    k: usize,
    w: &[u8],
    w_row: usize,
    a: &[u8],
    a_row: usize,
    prefetch: bool,
) -> [[f32; C]; R] {
    let es = w_bytes(W);
    assert!(R >= 1 && C >= 1);
    assert!(
        w.len() >= (R - 1) * w_row + k * es,
        "tile_f: weight slice too short"
    );
    assert!(
        a.len() >= (C - 1) * a_row + k * 4,
        "tile_f: activation slice too short"
    );
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let dist = if prefetch {
        prefetch_distance(R * w_row)
    } else {
        0
    };
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let k8 = k / 8 * 8;
    let mut i = 0;
    while i < k8 {
        let mut av = [_mm256_setzero_ps(); C];
        for c in 0..C {
            // SAFETY: i + 8 <= k and c < C: inside `a` by the assert above.
            av[c] = unsafe { _mm256_loadu_ps(ap.add(c * a_row + i * 4).cast()) };
        }
        for r in 0..R {
            if prefetch {
                prefetch_ahead(wp.wrapping_add(r * w_row + i * es), dist);
            }
            // SAFETY: i + 8 <= k and r < R: inside `w` by the assert above.
            let wv = unsafe { load_wf::<W>(wp.add(r * w_row + i * es)) };
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(wv, av[c], acc[r][c]);
            }
        }
        i += 8;
    }
    let mut out = [[0.0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut tail = 0.0f32;
            for i in k8..k {
                // SAFETY: i < k, r < R, c < C: inside both slices by the asserts above.
                let (wv, av) = unsafe {
                    (
                        load_wf1::<W>(wp.add(r * w_row + i * es)),
                        f32::from_bits(rd32(ap.add(c * a_row + i * 4))),
                    )
                };
                tail = wv.mul_add(av, tail);
            }
            out[r][c] = hsum_ps(acc[r][c]) + tail;
        }
    }
    out
}

/// How far ahead of the tile being computed decode prefetches weights, in bytes (rounded up
/// to whole tiles). Measured on a 2-core EPYC (lm_head 49152x576 Q8_0 matvec, 30 MB): no
/// software prefetch 4.2 GB/s; prefetch one tile ahead into L1 8.7 GB/s; 4-8 KiB ahead into L2
/// (`_MM_HINT_T1`) 16-22 GB/s, the machine's single-core read bandwidth. The hardware
/// prefetchers do poorly on the ROWS interleaved row streams a tile reads.
const PREFETCH_BYTES: usize = 6 * 1024;

/// Prefetch (into L2) the byte `dist` past `p`: the same row offset `dist / tile` tiles ahead.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch_ahead(p: *const u8, dist: usize) {
    // A prefetch is only a hint: it never faults, so any address is allowed (the pointer is
    // built with wrapping_add and never dereferenced).
    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(dist).cast());
}

/// Prefetch distance for tiles of `tile_bytes` weight bytes: whole tiles, at least one.
#[inline(always)]
pub(super) fn prefetch_distance(tile_bytes: usize) -> usize {
    tile_bytes * PREFETCH_BYTES.div_ceil(tile_bytes.max(1))
}

/// Run the tiles of one weight format over the whole (rows x columns) problem.
macro_rules! drive {
    ($tile:ident, $W:expr, $len:expr, $w:expr, $w_row:expr, $n_rows:expr, $act:expr, $a_row:expr,
     $n_cols:expr, $out:expr, $out_stride:expr) => {{
        let (w, w_row, n_rows, act, a_row, n_cols, out, out_stride) = (
            $w,
            $w_row,
            $n_rows,
            $act,
            $a_row,
            $n_cols,
            $out,
            $out_stride,
        );
        // Rows outer, columns inner: a ROWS-row weight tile stays in L1 while the (smaller)
        // activations stream past it.
        let mut r0 = 0;
        while r0 < n_rows {
            let wt: &[u8] = &w[r0 * w_row..];
            let mut c0 = 0;
            if n_rows - r0 >= ROWS {
                while c0 + COLS <= n_cols {
                    let t = $tile::<{ $W }, ROWS, COLS>(
                        $len,
                        wt,
                        w_row,
                        &act[c0 * a_row..],
                        a_row,
                        c0 == 0,
                    );
                    store(&t, out, out_stride, r0, c0);
                    c0 += COLS;
                }
                while c0 < n_cols {
                    let t = $tile::<{ $W }, ROWS, 1>(
                        $len,
                        wt,
                        w_row,
                        &act[c0 * a_row..],
                        a_row,
                        c0 == 0,
                    );
                    store(&t, out, out_stride, r0, c0);
                    c0 += 1;
                }
                r0 += ROWS;
            } else {
                while c0 + COLS <= n_cols {
                    let t = $tile::<{ $W }, 1, COLS>(
                        $len,
                        wt,
                        w_row,
                        &act[c0 * a_row..],
                        a_row,
                        c0 == 0,
                    );
                    store(&t, out, out_stride, r0, c0);
                    c0 += COLS;
                }
                while c0 < n_cols {
                    let t =
                        $tile::<{ $W }, 1, 1>($len, wt, w_row, &act[c0 * a_row..], a_row, c0 == 0);
                    store(&t, out, out_stride, r0, c0);
                    c0 += 1;
                }
                r0 += 1;
            }
        }
    }};
}

#[inline(always)]
fn store<const R: usize, const C: usize>(
    t: &[[f32; C]; R],
    out: &mut [f32],
    out_stride: usize,
    r0: usize,
    c0: usize,
) {
    for (r, row) in t.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            out[(c0 + c) * out_stride + r0 + r] = *v;
        }
    }
}

/// See `Kernels::gemm`. `w`/`act` hold exactly `n_rows`/`n_cols` rows; `out` is long enough
/// (checked by the caller; a violation panics through slice indexing, never reads out of
/// bounds).
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
    let nb = k / QK;
    match f {
        Fmt::Q4_0 => {
            drive!(tile_q, W_Q4_0, nb, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
        }
        Fmt::Q4_1 => {
            drive!(tile_q, W_Q4_1, nb, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
        }
        Fmt::Q5_0 => {
            drive!(tile_q, W_Q5_0, nb, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
        }
        Fmt::Q5_1 => {
            drive!(tile_q, W_Q5_1, nb, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
        }
        Fmt::Q8_0 => {
            drive!(tile_q, W_Q8_0, nb, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
        }
        Fmt::F32 => drive!(tile_f, W_F32, k, w, w_row, n_rows, act, a_row, n_cols, out, out_stride),
        Fmt::F16 => drive!(tile_f, W_F16, k, w, w_row, n_rows, act, a_row, n_cols, out, out_stride),
        Fmt::BF16 => {
            drive!(tile_f, W_BF16, k, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
        }
        Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K => {
            // SAFETY: same CPU contract as this function's.
            unsafe {
                super::avx2_k::gemm(f, k, w, w_row, n_rows, act, a_row, n_cols, out, out_stride)
            }
        }
        Fmt::Q8_1 | Fmt::Q8_K => unreachable!("DotShape rejects activation-only formats"),
    }
}

/// One weight row (`w`) dotted with one activation row (`act`), `n` elements.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn vec_dot(f: Fmt, n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n / QK;
    let t = match f {
        Fmt::Q4_0 => tile_q::<W_Q4_0, 1, 1>(nb, w, 0, act, 0, false),
        Fmt::Q4_1 => tile_q::<W_Q4_1, 1, 1>(nb, w, 0, act, 0, false),
        Fmt::Q5_0 => tile_q::<W_Q5_0, 1, 1>(nb, w, 0, act, 0, false),
        Fmt::Q5_1 => tile_q::<W_Q5_1, 1, 1>(nb, w, 0, act, 0, false),
        Fmt::Q8_0 => tile_q::<W_Q8_0, 1, 1>(nb, w, 0, act, 0, false),
        Fmt::F32 => tile_f::<W_F32, 1, 1>(n, w, 0, act, 0, false),
        Fmt::F16 => tile_f::<W_F16, 1, 1>(n, w, 0, act, 0, false),
        Fmt::BF16 => tile_f::<W_BF16, 1, 1>(n, w, 0, act, 0, false),
        Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K => {
            // SAFETY: same CPU contract as this function's.
            return unsafe { super::avx2_k::vec_dot(f, n, w, act) };
        }
        Fmt::Q8_1 | Fmt::Q8_K => unreachable!("DotShape rejects activation-only formats"),
    };
    t[0][0]
}

// ---------------------------------------------------------------------------------------
// Row conversions
// ---------------------------------------------------------------------------------------

/// Quantize 32 floats at `x` to 8 bits at `q`, exactly as `reference::quantize_q8_0`
/// (absmax/127 scale, `x * (1/d)`, round half away from zero). Returns (d, sum of q).
///
/// # Safety
/// `x..x+32` floats readable, `q..q+32` bytes writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant_q8_block<const ACT: bool>(x: *const f32, q: *mut u8) -> (f32, i32) {
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: the caller guarantees 32 readable floats; loadu has no alignment requirement.
    let v = unsafe {
        [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ]
    };
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let amax = _mm_cvtss_f32(m);
    let d = amax / 127.0;
    let id = if ACT {
        // ggml-cpu's activation quantizer: 127/amax, ties to even (see reference::quantize_act_row).
        if amax != 0.0 {
            127.0 / amax
        } else {
            0.0
        }
    } else if d != 0.0 {
        1.0 / d
    } else {
        0.0
    };
    let idv = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    let mut qi = [_mm256_setzero_si256(); 4];
    for j in 0..4 {
        let s = _mm256_mul_ps(v[j], idv);
        if ACT {
            qi[j] = _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(s));
            continue;
        }
        // round(s) half away from zero, exactly: s - trunc(s) is exact in f32.
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(s, t));
        let step = _mm256_or_ps(_mm256_and_ps(s, sign), one); // +-1 with the sign of s
        let r = _mm256_add_ps(
            t,
            _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), step),
        );
        qi[j] = _mm256_cvtps_epi32(r);
    }
    let sum = hsum_epi32(_mm256_add_epi32(
        _mm256_add_epi32(qi[0], qi[1]),
        _mm256_add_epi32(qi[2], qi[3]),
    ));
    // Pack 4x8 i32 -> 32 i8. The in-lane packs leave 4-byte groups in the order
    // (0,2,4,6 | 1,3,5,7) of the source octets; the permute puts them back.
    let p01 = _mm256_packs_epi32(qi[0], qi[1]);
    let p23 = _mm256_packs_epi32(qi[2], qi[3]);
    let p = _mm256_packs_epi16(p01, p23);
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: the caller guarantees 32 writable bytes; storeu has no alignment requirement.
    unsafe { _mm256_storeu_si256(q.cast(), p) };
    (d, sum)
}

/// `expf8` for the other x86 modules.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn expf8_pub(x: __m256) -> __m256 {
    expf8(x)
}

/// [`quant_q8_block`] with the activation rounding (ties to even, `127 / amax`).
///
/// # Safety
/// As [`quant_q8_block`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quant_q8_act_block(x: *const f32, q: *mut u8) -> (f32, i32) {
    // SAFETY: the caller's contract is quant_q8_block's.
    unsafe { quant_q8_block::<true>(x, q) }
}

/// Fast quantize/convert for the formats that need it (activations, f16/bf16 rows). Returns
/// false for formats left to the reference. `out` must be the exact row size (checked).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_row(f: Fmt, x: &[f32], out: &mut [u8]) -> bool {
    // SAFETY: same contract as this function's.
    unsafe { quantize_row_mode::<false>(f, x, out) }
}

/// As [`quantize_row`], but Q8_0/Q8_1 use the activation rounding of
/// `reference::quantize_act_row`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_act_row(f: Fmt, x: &[f32], out: &mut [u8]) -> bool {
    // SAFETY: same contract as this function's.
    unsafe { quantize_row_mode::<true>(f, x, out) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_row_mode<const ACT: bool>(f: Fmt, x: &[f32], out: &mut [u8]) -> bool {
    match f {
        Fmt::Q8_K => {
            // SAFETY: same CPU contract as this function's.
            unsafe { super::avx2_k::quantize_q8_k(x, out) };
            true
        }
        Fmt::Q8_0 | Fmt::Q8_1 => {
            let bb = f.block_bytes();
            let nb = x.len() / QK;
            assert!(
                x.len() == nb * QK && out.len() == nb * bb,
                "quantize_row: bad lengths"
            );
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
            for b in 0..nb {
                // SAFETY: b < nb, so x[b*32..b*32+32] and out[b*bb..b*bb+bb] are in bounds by
                // the assert above; the qs field starts at 2 (Q8_0) or 4 (Q8_1) and ends at bb.
                unsafe {
                    let o = op.add(b * bb);
                    let qs = if f == Fmt::Q8_1 { 4 } else { 2 };
                    let (d, sum) = quant_q8_block::<ACT>(xp.add(b * QK), o.add(qs));
                    o.cast::<[u8; 2]>().write(F16Le::from_f32(d).0);
                    if f == Fmt::Q8_1 {
                        o.add(2)
                            .cast::<[u8; 2]>()
                            .write(F16Le::from_f32(sum as f32 * d).0);
                    }
                }
            }
            true
        }
        Fmt::F16 | Fmt::BF16 => {
            assert!(out.len() == x.len() * 2, "quantize_row: bad lengths");
            let n8 = x.len() / 8 * 8;
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
            let mut i = 0;
            while i < n8 {
                // SAFETY: i + 8 <= x.len(), and out holds 2 bytes per element (assert above).
                let v = unsafe { _mm256_loadu_ps(xp.add(i)) };
                let h = if f == Fmt::F16 {
                    _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)
                } else {
                    f32x8_to_bf16(v)
                };
                // SAFETY: as above, 16 bytes at out[2i..2i+16].
                unsafe { _mm_storeu_si128(op.add(2 * i).cast(), h) };
                i += 8;
            }
            for (o, v) in out[2 * n8..].chunks_exact_mut(2).zip(&x[n8..]) {
                let bits = if f == Fmt::F16 {
                    f16::from_f32(*v).to_bits()
                } else {
                    crate::reference::f32_to_bf16(*v)
                };
                o.copy_from_slice(&bits.to_le_bytes());
            }
            true
        }
        _ => false,
    }
}

/// 8 f32 -> 8 bf16 (round to nearest even, NaN kept quiet), as `reference::f32_to_bf16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f32x8_to_bf16(v: __m256) -> __m128i {
    let u = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        u,
        _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb),
    ));
    let abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fff_ffff));
    let is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
    let nan = _mm256_or_si256(_mm256_srli_epi32::<16>(u), _mm256_set1_epi32(0x40));
    let r = _mm256_blendv_epi8(rounded, nan, is_nan);
    // Values are 0..=0xFFFF, so the unsigned-saturating pack is exact; fix the lane order.
    let p = _mm256_packus_epi32(r, r);
    let p = _mm256_permute4x64_epi64::<0b1000>(p);
    _mm256_castsi256_si128(p)
}

/// Dequantize/convert a row; same values as the reference (same operations, no fused
/// multiply-add). `x` must be the exact row size of `out.len()` elements (checked).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_row(f: Fmt, x: &[u8], out: &mut [f32]) {
    let n = out.len();
    match f {
        Fmt::F32 => {
            assert!(x.len() == n * 4, "dequantize_row: bad lengths");
            for (o, b) in out.iter_mut().zip(x.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Fmt::F16 => {
            assert!(x.len() == n * 2, "dequantize_row: bad lengths");
            // SAFETY: n elements of 2 bytes are readable (assert above).
            unsafe { convert_f16(x.as_ptr(), out) }
        }
        Fmt::BF16 => {
            assert!(x.len() == n * 2, "dequantize_row: bad lengths");
            let n8 = n / 8 * 8;
            let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
            let mut i = 0;
            while i < n8 {
                // SAFETY: i + 8 <= n, inside both slices (assert above).
                unsafe { _mm256_storeu_ps(op.add(i), load_wf::<W_BF16>(xp.add(2 * i))) };
                i += 8;
            }
            for i in n8..n {
                out[i] =
                    crate::reference::bf16_to_f32(u16::from_le_bytes([x[2 * i], x[2 * i + 1]]));
            }
        }
        Fmt::Q4_0 => dequant_q::<W_Q4_0>(x, out),
        Fmt::Q4_1 => dequant_q::<W_Q4_1>(x, out),
        Fmt::Q5_0 => dequant_q::<W_Q5_0>(x, out),
        Fmt::Q5_1 => dequant_q::<W_Q5_1>(x, out),
        Fmt::Q8_0 => dequant_q::<W_Q8_0>(x, out),
        Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K | Fmt::Q8_K => {
            // Not on any hot path (weights are dotted, not expanded): the scalar reference.
            crate::reference::dequantize_row(f.ggml(), x, out)
                .expect("lengths checked by the caller");
        }
        Fmt::Q8_1 => {
            // Q8_1 = d, s, qs: reuse the Q8_0 path on each block's (d, qs) by skipping s.
            assert!(
                x.len() == n / QK * 36 && n.is_multiple_of(QK),
                "dequantize_row: bad lengths"
            );
            for (xb, ob) in x.chunks_exact(36).zip(out.chunks_exact_mut(QK)) {
                let mut blk = [0u8; 34];
                blk[..2].copy_from_slice(&xb[..2]);
                blk[2..].copy_from_slice(&xb[4..]);
                dequant_q::<W_Q8_0>(&blk, ob);
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequant_q<const W: u8>(x: &[u8], out: &mut [f32]) {
    let wb = w_bytes(W);
    let nb = out.len() / QK;
    assert!(
        out.len() == nb * QK && x.len() == nb * wb,
        "dequantize_row: bad lengths"
    );
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    for b in 0..nb {
        // SAFETY: b < nb: the block x[b*wb..(b+1)*wb] is in bounds (assert above).
        let (q, dm) = unsafe { load_wq::<W>(xp.add(b * wb)) };
        let dv = _mm256_broadcastss_ps(dm);
        let mv = _mm256_broadcastss_ps(_mm_movehdup_ps(dm)); // lane 1: the min (if any)
        let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q)];
        for (h, part) in halves.iter().enumerate() {
            for (e, bytes) in [*part, _mm_srli_si128::<8>(*part)].iter().enumerate() {
                let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(*bytes));
                // q * d (+ m): two roundings, exactly as the reference writes it.
                let mut y = _mm256_mul_ps(v, dv);
                if has_min(W) {
                    y = _mm256_add_ps(y, mv);
                }
                // SAFETY: b < nb and h*16 + e*8 + 8 <= 32: inside `out` (assert above).
                unsafe { _mm256_storeu_ps(op.add(b * QK + h * 16 + e * 8), y) };
            }
        }
    }
}

/// `n = out.len()` f16 values at `x` (little-endian bits) -> f32.
///
/// # Safety
/// `x..x + 2 * out.len()` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn convert_f16(x: *const u8, out: &mut [f32]) {
    let n = out.len();
    let n8 = n / 8 * 8;
    let op = out.as_mut_ptr();
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n: 16 readable bytes (caller) and 8 writable floats.
        unsafe { _mm256_storeu_ps(op.add(i), load_wf::<W_F16>(x.add(2 * i))) };
        i += 8;
    }
    for i in n8..n {
        // SAFETY: i < n: 2 readable bytes (caller).
        out[i] = h2f(unsafe { rd16(x.add(2 * i)) });
    }
}

// ---------------------------------------------------------------------------------------
// Attention / elementwise helpers
// ---------------------------------------------------------------------------------------

/// See `Kernels::dot_f32`. 4 independent accumulators hide the FMA latency.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    // SAFETY: both slices hold a.len() floats (assert above).
    unsafe { dot_generic(a.len(), |i| _mm256_loadu_ps(a.as_ptr().add(i)), |i| a[i], b) }
}

/// See `Kernels::dot_f16_f32`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_f32(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let ap = a.as_ptr().cast::<u8>(); // f16 is repr(transparent) over u16
                                      // SAFETY: both slices hold a.len() elements (assert above).
    unsafe {
        dot_generic(
            a.len(),
            |i| load_wf::<W_F16>(ap.add(2 * i)),
            |i| a[i].to_f32(),
            b,
        )
    }
}

/// Shared body of the dot helpers: `load8(i)` loads elements i..i+8 of the left operand.
///
/// # Safety
/// `load8(i)` must be sound for every `i + 8 <= b.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_generic(
    n: usize,
    load8: impl Fn(usize) -> __m256,
    load1: impl Fn(usize) -> f32,
    b: &[f32],
) -> f32 {
    assert_eq!(n, b.len());
    let bp = b.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 4];
    let n32 = n / 32 * 32;
    let n8 = n / 8 * 8;
    let mut i = 0;
    while i < n32 {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= n32 <= n = b.len(); load8's contract covers the left side.
            *acc = unsafe {
                _mm256_fmadd_ps(load8(i + 8 * j), _mm256_loadu_ps(bp.add(i + 8 * j)), *acc)
            };
        }
        i += 32;
    }
    while i < n8 {
        // SAFETY: i + 8 <= n8 <= n, as above.
        acc[0] = unsafe { _mm256_fmadd_ps(load8(i), _mm256_loadu_ps(bp.add(i)), acc[0]) };
        i += 8;
    }
    let mut tail = 0.0f32;
    for i in n8..n {
        tail = load1(i).mul_add(b[i], tail);
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum_ps(s) + tail
}

/// See `Kernels::axpy_f32`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    let xp = x.as_ptr();
    // SAFETY: x holds y.len() floats (assert above).
    unsafe { axpy_generic(y, a, |i| _mm256_loadu_ps(xp.add(i)), |i| x[i]) }
}

/// See `Kernels::axpy_f16`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    assert_eq!(y.len(), x.len());
    let xp = x.as_ptr().cast::<u8>(); // f16 is repr(transparent) over u16
                                      // SAFETY: x holds y.len() elements (assert above).
    unsafe { axpy_generic(y, a, |i| load_wf::<W_F16>(xp.add(2 * i)), |i| x[i].to_f32()) }
}

/// # Safety
/// `load8(i)` must be sound for every `i + 8 <= y.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_generic(
    y: &mut [f32],
    a: f32,
    load8: impl Fn(usize) -> __m256,
    load1: impl Fn(usize) -> f32,
) {
    let n = y.len();
    let n8 = n / 8 * 8;
    let av = _mm256_set1_ps(a);
    let yp = y.as_mut_ptr();
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n = y.len(); load8's contract covers x.
        unsafe {
            _mm256_storeu_ps(
                yp.add(i),
                _mm256_fmadd_ps(av, load8(i), _mm256_loadu_ps(yp.add(i))),
            )
        };
        i += 8;
    }
    for i in n8..n {
        y[i] = a.mul_add(load1(i), y[i]);
    }
}

/// See `Kernels::f32_to_f16`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len());
    let n = src.len();
    let n8 = n / 8 * 8;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr().cast::<u16>());
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n for both slices (assert above); f16 is repr(transparent) over u16.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(sp.add(i)));
            _mm_storeu_si128(dp.add(i).cast(), h);
        }
        i += 8;
    }
    for i in n8..n {
        dst[i] = f16::from_f32(src[i]);
    }
}

/// See `Kernels::f16_to_f32`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    // SAFETY: src holds dst.len() f16 values = 2 * dst.len() bytes (assert above).
    unsafe { convert_f16(src.as_ptr().cast::<u8>(), dst) }
}

/// `reference::dot_f16` with the same operation order, 8 lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: lengths differ");
    let n = a.len();
    let np = n & !31;
    let (ap, bp) = (a.as_ptr().cast::<u8>(), b.as_ptr().cast::<u8>());
    let mut sum = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i < np {
        for (j, acc) in sum.iter_mut().enumerate() {
            // SAFETY: i + j*8 + 8 <= np <= n, so 16 bytes at element i + j*8 are inside both.
            let (x, y) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(ap.add(2 * (i + j * 8)).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(bp.add(2 * (i + j * 8)).cast())),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    let s0 = _mm256_add_ps(sum[0], sum[2]);
    let s1 = _mm256_add_ps(sum[1], sum[3]);
    let s0 = _mm256_add_ps(s0, s1);
    let t0 = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps::<1>(s0));
    let t1 = _mm_hadd_ps(t0, t0);
    let r = _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
    let mut sumf = r as f64;
    for k in np..n {
        sumf += (a[k].to_f32() * b[k].to_f32()) as f64;
    }
    sumf as f32
}

/// `reference::expf_vec` on 8 lanes (same fused operations, so the same bits).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn expf8(x: __m256) -> __m256 {
    use crate::reference::expc::*;
    let cf = |b: u32| _mm256_castsi256_ps(_mm256_set1_epi32(b as i32));
    let r = cf(SHIFT);
    let z = _mm256_fmadd_ps(x, cf(LOG2E), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(n, cf(LN2_LO), _mm256_fnmadd_ps(n, cf(LN2_HI), x));
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_castps_si256(_mm256_set1_ps(1.0)),
    ));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(cf(C5), b, cf(C4)),
            u,
            _mm256_fmadd_ps(cf(C3), b, cf(C2)),
        ),
        u,
        _mm256_mul_ps(cf(C1), b),
    );
    if _mm256_movemask_ps(big) == 0 {
        return _mm256_fmadd_ps(j, k, k);
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
        _mm256_set1_epi32(0x8200_0000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
    _mm256_or_ps(
        _mm256_and_ps(huge, _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(
            huge,
            _mm256_or_ps(
                _mm256_and_ps(big, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                _mm256_andnot_ps(big, _mm256_fmadd_ps(k, j, k)),
            ),
        ),
    )
}

/// `reference::rope` with the same fused operations, so the same bits: 4 interleaved pairs
/// (or, NeoX, 8 split pairs) per vector; a remainder goes to the reference.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rope(x: &mut [f32], head_dim: usize, neox: bool, cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    assert!(sin.len() >= h && 2 * h <= head_dim, "rope: shapes");
    for head in x.chunks_exact_mut(head_dim) {
        let hp = head.as_mut_ptr();
        let mut i = 0;
        if neox {
            while i + 8 <= h {
                // SAFETY: i + 8 <= h: pairs i..i + 8 (dims i.. and h + i..) inside the head
                // (2h <= head_dim, asserted) and inside cos/sin.
                unsafe {
                    let (c, s) = (
                        _mm256_loadu_ps(cos.as_ptr().add(i)),
                        _mm256_loadu_ps(sin.as_ptr().add(i)),
                    );
                    let (x0, x1) = (_mm256_loadu_ps(hp.add(i)), _mm256_loadu_ps(hp.add(h + i)));
                    let neg = _mm256_xor_ps(_mm256_mul_ps(x1, s), _mm256_set1_ps(-0.0));
                    _mm256_storeu_ps(hp.add(i), _mm256_fmadd_ps(x0, c, neg));
                    _mm256_storeu_ps(hp.add(h + i), _mm256_fmadd_ps(x0, s, _mm256_mul_ps(x1, c)));
                }
                i += 8;
            }
        } else {
            while i + 4 <= h {
                // SAFETY: i + 4 <= h: dims 2i..2i + 8 inside the head, pairs i..i + 4 inside
                // cos/sin.
                unsafe {
                    let c4 = _mm_loadu_ps(cos.as_ptr().add(i));
                    let s4 = _mm_loadu_ps(sin.as_ptr().add(i));
                    // [c0 c0 c1 c1 | c2 c2 c3 c3]
                    let dup =
                        |v: __m128| _mm256_set_m128(_mm_unpackhi_ps(v, v), _mm_unpacklo_ps(v, v));
                    let (c, s) = (dup(c4), dup(s4));
                    let v = _mm256_loadu_ps(hp.add(2 * i));
                    // Each pair swapped: [x1 x0 ...].
                    let sw = _mm256_permute_ps::<0b10_11_00_01>(v);
                    // Even lanes: fma(x0, c, -(x1 s)); odd: fma(x0, s, x1 c).
                    let a = _mm256_blend_ps::<0b1010_1010>(v, sw);
                    let b = _mm256_blend_ps::<0b1010_1010>(c, s);
                    let neg = _mm256_xor_ps(_mm256_mul_ps(sw, s), _mm256_set1_ps(-0.0));
                    let p = _mm256_blend_ps::<0b1010_1010>(neg, _mm256_mul_ps(v, c));
                    _mm256_storeu_ps(hp.add(2 * i), _mm256_fmadd_ps(a, b, p));
                }
                i += 4;
            }
        }
        for i in i..h {
            let (a, b) = if neox { (i, i + h) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
            head[b] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
}

/// `reference::swiglu`, 8 lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths differ");
    let n8 = gate.len() / 8 * 8;
    let (gp, upp) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n8 <= len of both slices.
        unsafe {
            let x = _mm256_loadu_ps(gp.add(i));
            let e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(gp.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(upp.add(i))));
        }
        i += 8;
    }
    for (g, &u) in gate[n8..].iter_mut().zip(&up[n8..]) {
        let x = *g;
        *g = x / (1.0 + (-x).exp()) * u;
    }
}

/// `reference::geglu`, bit for bit: the f16 rounding of `cvtps_ph` (to nearest, ties to
/// even) indexes the same table, read with a gather.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn geglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "geglu: lengths differ");
    let table = crate::reference::gelu_table();
    assert!(
        table.len() > u16::MAX as usize + 1,
        "geglu: table without its pad entry"
    );
    let n8 = gate.len() / 8 * 8;
    let (gp, upp, tp) = (gate.as_mut_ptr(), up.as_ptr(), table.as_ptr());
    let (lo, hi) = (_mm256_set1_ps(-10.0), _mm256_set1_ps(10.0));
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n8 <= len of both slices. The gather reads 4 bytes at
        // `table + 2 * idx` for idx <= 65535, inside the 65537 entries (asserted above).
        unsafe {
            let x = _mm256_loadu_ps(gp.add(i));
            let u = _mm256_loadu_ps(upp.add(i));
            let idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(x));
            let g = _mm256_i32gather_epi32::<2>(tp.cast::<i32>(), idx);
            let g = _mm256_and_si256(g, _mm256_set1_epi32(0xffff));
            let g16 = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(g, g));
            let gelu = _mm256_cvtph_ps(_mm256_castsi256_si128(g16));
            let mut r = _mm256_mul_ps(gelu, u);
            r = _mm256_blendv_ps(r, _mm256_mul_ps(x, u), _mm256_cmp_ps::<_CMP_GE_OQ>(x, hi));
            r = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(x, lo), r);
            _mm256_storeu_ps(gp.add(i), r);
        }
        i += 8;
    }
    crate::reference::geglu(&mut gate[n8..], &up[n8..]);
}

/// `reference::attention_f16` with the accumulator rounded to f16 in registers
/// (`cvtps_ph` + `cvtph_ps`); `out.len()` must be a multiple of 8 (else the reference runs).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attention_f16(
    q16: &[f16],
    keys: &[f16],
    k_stride: usize,
    values: &[f16],
    v_stride: usize,
    n_kv: usize,
    scale: f32,
    softcap: f32,
    out: &mut [f32],
) {
    let (dk, dv) = (q16.len(), out.len());
    if dv % 8 != 0 {
        crate::reference::attention_f16(
            q16, keys, k_stride, values, v_stride, n_kv, scale, softcap, out,
        );
        return;
    }
    assert!(
        n_kv == 0 || keys.len() >= (n_kv - 1) * k_stride + dk,
        "attention_f16: keys too short"
    );
    assert!(
        n_kv == 0 || values.len() >= (n_kv - 1) * v_stride + dv,
        "attention_f16: values too short"
    );
    let round = |x: __m256| _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
    out.fill(0.0);
    let op = out.as_mut_ptr();
    let vp = values.as_ptr().cast::<u8>();
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    for j in 0..n_kv {
        // SAFETY: the asserts above keep key j inside `keys`; same CPU contract as ours.
        let dot = unsafe { dot_f16(&keys[j * k_stride..j * k_stride + dk], q16) };
        let s = crate::reference::softcap_score(dot, scale, softcap);
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > m {
            ms = (m - s).exp();
            m = s;
            let msv = _mm256_set1_ps(ms);
            for i in (0..dv).step_by(8) {
                // SAFETY: i + 8 <= dv = out.len().
                unsafe {
                    let o = _mm256_loadu_ps(op.add(i));
                    _mm256_storeu_ps(op.add(i), round(_mm256_mul_ps(o, msv)));
                }
            }
        } else {
            vs = (s - m).exp();
        }
        let vsv = _mm256_set1_ps(vs);
        let base = j * v_stride;
        for i in (0..dv).step_by(8) {
            // SAFETY: i + 8 <= dv = out.len(), and value j spans base..base+dv inside `values`
            // (assert above), 2 bytes per element.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(2 * (base + i)).cast()));
                let o = _mm256_loadu_ps(op.add(i));
                _mm256_storeu_ps(op.add(i), round(_mm256_fmadd_ps(x, vsv, o)));
            }
        }
        l = l.mul_add(ms, vs);
    }
    let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// How far ahead of its reads [`stream_sum`] prefetches (into L1), in bytes. Measured on an
/// Intel Xeon (2026-12-07, 256 MiB, 2 threads): 2 KiB ahead 33.7-36.5 GB/s, none 32.3-35.8,
/// 4 KiB 24.9-26.2.
const STREAM_AHEAD: usize = 2048;

/// The wrapping sum of `data`'s little-endian u64 words (whole words only), with 256-bit
/// loads, 64 bytes a step, prefetching [`STREAM_AHEAD`] bytes ahead: the memory read
/// bandwidth probe's SIMD loop.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn stream_sum(data: &[u8]) -> u64 {
    let n = data.len() / 64 * 64;
    let p = data.as_ptr();
    let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i < n {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + STREAM_AHEAD).cast());
        // SAFETY: i + 64 <= n <= data.len(); a prefetch never faults.
        unsafe {
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(p.add(i).cast()));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(p.add(i + 32).cast()));
        }
        i += 64;
    }
    let mut lanes = [0u64; 4];
    // SAFETY: 32 writable bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), _mm256_add_epi64(a0, a1)) };
    lanes
        .iter()
        .chain(&[crate::reference::stream_sum(&data[n..])])
        .fold(0u64, |s, v| s.wrapping_add(*v))
}
