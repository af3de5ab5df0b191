//! The panel matmul: microllm's own fast path for batched matmuls (prefill, several decoding
//! sequences), where llama.cpp-identical arithmetic is not required.
//!
//! **Design decision: unpack once, multiply many.** A batched matmul reads each weight row
//! once for many activation columns, so the cost of decoding a weight format can be paid once
//! per row instead of once per (row, column) pair. Every supported format is unpacked into one
//! canonical form — unsigned 8-bit levels `q` with a scale `s` and an offset `m` per group of
//! `BLK` (16 or 32) elements, `w = s * q - m` — for a panel of [`PANEL_ROWS`] rows at a time,
//! interleaved so that one 32-byte vector holds 4 consecutive elements of each of the 8 rows.
//! One integer multiply-add of that vector with 4 activation bytes broadcast gives 8 rows'
//! partial dots at once, and a whole group's 8 integer sums are scaled by one vector
//! multiply-add: the float work per (row, column) pair drops eightfold against a per-pair dot
//! (llama.cpp's `vec_dot` path), and one kernel serves Q4_0/Q4_1/Q5_0/Q5_1 and the K-quants.
//!
//! Activations use their own 8-bit layout ([`act_row_bytes`]): per 32 elements an f32 scale,
//! `d * sum(q)` per 16 and per 32 elements (for the weights' offsets), and the values stored
//! contiguously (so 4 of them are one aligned-enough 32-bit broadcast). The integer part of
//! every group dot is exact; results differ from llama.cpp's only in float rounding order and,
//! for the K-quants, in the finer activation scales (per 32 elements instead of per 256).
//!
//! This module is the scalar specification ([`gemm_ref`]); `x86/avx2_panel.rs` is the SIMD
//! version, tested against it.

use crate::blocks::{
    cast_blocks, scale_min_k4, scales_q3_k, BlockQ2_K, BlockQ3_K, BlockQ4_0, BlockQ4_1, BlockQ4_K,
    BlockQ5_0, BlockQ5_1, BlockQ5_K, BlockQ6_K, BlockQ8_0, QK, QK_K,
};
use crate::format::Fmt;

/// Weight rows per panel (the lanes of one 8 x f32 vector).
pub const PANEL_ROWS: usize = 8;

/// Canonical group size and largest level of a format with a panel kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PanelShape {
    /// Elements sharing one (scale, offset).
    pub blk: usize,
    /// Largest unsigned level (15 for 4-bit formats...); for Q8_0, whose levels are signed
    /// (-128..=127, offset 0), 128.
    pub qmax: u32,
}

impl PanelShape {
    pub(crate) fn of(f: Fmt) -> Option<PanelShape> {
        let (blk, qmax) = match f {
            Fmt::Q4_0 | Fmt::Q4_1 | Fmt::Q4_K => (32, 15),
            Fmt::Q5_0 | Fmt::Q5_1 | Fmt::Q5_K => (32, 31),
            Fmt::Q6_K => (16, 63),
            Fmt::Q3_K => (16, 7),
            Fmt::Q2_K => (16, 3),
            Fmt::Q8_0 => (32, 128),
            _ => return None,
        };
        Some(PanelShape { blk, qmax })
    }
}

/// Bytes of one activation row of `k` elements (a multiple of 32) in the panel layout:
/// `[q: k x i8][d: k/32 x f32][s32: k/32 x f32][s16: k/16 x f32]` where `s32`/`s16` are
/// `d * sum(q)` over each 32/16 elements.
pub const fn act_row_bytes(k: usize) -> usize {
    k + 16 * (k / QK)
}

/// Byte offsets of the scale arrays in an activation row of `k` elements.
#[inline(always)]
pub(crate) const fn act_offsets(k: usize) -> (usize, usize, usize) {
    let nb = k / QK;
    (k, k + 4 * nb, k + 8 * nb)
}

/// Quantizes one activation row into the panel layout (scale `amax / 127`, values rounded
/// to nearest, ties to even). `out.len()` must be `act_row_bytes(x.len())`.
pub(crate) fn quantize_act_ref(x: &[f32], out: &mut [u8]) {
    let k = x.len();
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let mut qs = [0i8; QK];
        let (d, _) = crate::reference::quantize_act_q8(xb, &mut qs);
        for (o, q) in out[b * QK..(b + 1) * QK].iter_mut().zip(qs) {
            *o = q as u8;
        }
        put_block_scales(out, k, b, d);
    }
}

/// Writes block `b`'s scale `d` and its sums `d * sum(q)` (per 32 and per 16 elements, from
/// the values already in `out`) into an activation row of `k` elements.
pub(crate) fn put_block_scales(out: &mut [u8], k: usize, b: usize, d: f32) {
    let half = |h: usize| -> i32 {
        out[b * QK + 16 * h..b * QK + 16 * h + 16]
            .iter()
            .map(|&v| v as i8 as i32)
            .sum()
    };
    put_block_sums(out, k, b, d, half(0), half(1));
}

/// Writes block `b`'s scale `d` and its sums given the sums of its two halves' values.
#[inline]
pub(crate) fn put_block_sums(out: &mut [u8], k: usize, b: usize, d: f32, s0: i32, s1: i32) {
    let (od, o32, o16) = act_offsets(k);
    put_f32(out, od + 4 * b, d);
    put_f32(out, o32 + 4 * b, d * (s0 + s1) as f32);
    put_f32(out, o16 + 8 * b, d * s0 as f32);
    put_f32(out, o16 + 8 * b + 4, d * s1 as f32);
}

#[inline(always)]
pub(crate) fn put_f32(buf: &mut [u8], at: usize, v: f32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[inline(always)]
pub(crate) fn get_f32(buf: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Unpacks one weight row of `k` elements into canonical form: levels `q[k]`, and per group
/// of `shape.blk` elements the scale `s` and offset `m` (`w = s * q - m`).
pub(crate) fn canon_row(f: Fmt, row: &[u8], q: &mut [u8], s: &mut [f32], m: &mut [f32]) {
    canon_levels(f, row, q);
    canon_scales(f, row, q.len(), |g, sg, mg| (s[g], m[g]) = (sg, mg));
}

/// The scale and offset of every group of a row of `k` elements, in group order, as
/// `put(group, s, m)`. The one definition of the canonical scales, used by every path.
pub(crate) fn canon_scales(f: Fmt, row: &[u8], k: usize, mut put: impl FnMut(usize, f32, f32)) {
    match f {
        Fmt::Q4_0 => {
            let bl: &[BlockQ4_0] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                let d = blk.d.to_f32();
                put(b, d, 8.0 * d);
            }
        }
        Fmt::Q4_1 => {
            let bl: &[BlockQ4_1] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                put(b, blk.d.to_f32(), -blk.m.to_f32());
            }
        }
        Fmt::Q8_0 => {
            let bl: &[BlockQ8_0] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                put(b, blk.d.to_f32(), 0.0);
            }
        }
        Fmt::Q5_0 => {
            let bl: &[BlockQ5_0] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                let d = blk.d.to_f32();
                put(b, d, 16.0 * d);
            }
        }
        Fmt::Q5_1 => {
            let bl: &[BlockQ5_1] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                put(b, blk.d.to_f32(), -blk.m.to_f32());
            }
        }
        Fmt::Q4_K | Fmt::Q5_K => {
            // 8 sub-blocks of 32: w = d * sc * q - dmin * mn.
            for sb in 0..k / QK_K {
                let (d, dmin, scales) = if f == Fmt::Q4_K {
                    let bl: &[BlockQ4_K] = cast_blocks(row).expect("whole blocks");
                    (bl[sb].d.to_f32(), bl[sb].dmin.to_f32(), bl[sb].scales)
                } else {
                    let bl: &[BlockQ5_K] = cast_blocks(row).expect("whole blocks");
                    (bl[sb].d.to_f32(), bl[sb].dmin.to_f32(), bl[sb].scales)
                };
                for j in 0..8 {
                    let (sc, mn) = scale_min_k4(j, &scales);
                    put(sb * 8 + j, d * sc as f32, dmin * mn as f32);
                }
            }
        }
        Fmt::Q6_K => {
            // 16 groups of 16: w = d * sc * (q - 32).
            let bl: &[BlockQ6_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                let d = b.d.to_f32();
                for g in 0..16 {
                    let sc = d * b.scales[g] as f32;
                    put(sb * 16 + g, sc, 32.0 * sc);
                }
            }
        }
        Fmt::Q3_K => {
            // 16 groups of 16: w = d * (sc - 32) * (q - 4).
            let bl: &[BlockQ3_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                let d = b.d.to_f32();
                for (g, sc) in scales_q3_k(&b.scales).iter().enumerate() {
                    let v = d * (*sc as i32 - 32) as f32;
                    put(sb * 16 + g, v, 4.0 * v);
                }
            }
        }
        Fmt::Q2_K => {
            // 16 groups of 16: w = d * (sc & 15) * q - dmin * (sc >> 4).
            let bl: &[BlockQ2_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
                for g in 0..16 {
                    put(
                        sb * 16 + g,
                        d * (b.scales[g] & 0xf) as f32,
                        dmin * (b.scales[g] >> 4) as f32,
                    );
                }
            }
        }
        _ => unreachable!("no panel kernel for {f:?}"),
    }
}

/// The levels of one weight row of `q.len()` elements (see [`canon_row`]): unsigned, but
/// for Q8_0 the signed values' bytes.
fn canon_levels(f: Fmt, row: &[u8], q: &mut [u8]) {
    let k = q.len();
    match f {
        Fmt::Q8_0 => {
            let bl: &[BlockQ8_0] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                for j in 0..QK {
                    q[b * QK + j] = blk.qs[j] as u8;
                }
            }
        }
        Fmt::Q4_0 => {
            let bl: &[BlockQ4_0] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                for j in 0..16 {
                    q[b * QK + j] = blk.qs[j] & 0xf;
                    q[b * QK + 16 + j] = blk.qs[j] >> 4;
                }
            }
        }
        Fmt::Q4_1 => {
            let bl: &[BlockQ4_1] = cast_blocks(row).expect("whole blocks");
            for (b, blk) in bl.iter().take(k / QK).enumerate() {
                for j in 0..16 {
                    q[b * QK + j] = blk.qs[j] & 0xf;
                    q[b * QK + 16 + j] = blk.qs[j] >> 4;
                }
            }
        }
        Fmt::Q5_0 | Fmt::Q5_1 => {
            // (qh, qs) of each block.
            let blocks: Vec<([u8; 4], [u8; 16])> = if f == Fmt::Q5_0 {
                let bl: &[BlockQ5_0] = cast_blocks(row).expect("whole blocks");
                bl.iter().take(k / QK).map(|b| (b.qh, b.qs)).collect()
            } else {
                let bl: &[BlockQ5_1] = cast_blocks(row).expect("whole blocks");
                bl.iter().take(k / QK).map(|b| (b.qh, b.qs)).collect()
            };
            for (b, (qh, qs)) in blocks.into_iter().enumerate() {
                let qh = u32::from_le_bytes(qh);
                for j in 0..16 {
                    q[b * QK + j] = (qs[j] & 0xf) | ((((qh >> j) & 1) as u8) << 4);
                    q[b * QK + 16 + j] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                }
            }
        }
        Fmt::Q4_K => {
            let bl: &[BlockQ4_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                for j in 0..4 {
                    for l in 0..32 {
                        let v = b.qs[32 * j + l];
                        q[sb * QK_K + 64 * j + l] = v & 0xf;
                        q[sb * QK_K + 64 * j + 32 + l] = v >> 4;
                    }
                }
            }
        }
        Fmt::Q5_K => {
            let bl: &[BlockQ5_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                for j in 0..4 {
                    for l in 0..32 {
                        let v = b.qs[32 * j + l];
                        let h0 = (b.qh[l] >> (2 * j)) & 1;
                        let h1 = (b.qh[l] >> (2 * j + 1)) & 1;
                        q[sb * QK_K + 64 * j + l] = (v & 0xf) | (h0 << 4);
                        q[sb * QK_K + 64 * j + 32 + l] = (v >> 4) | (h1 << 4);
                    }
                }
            }
        }
        Fmt::Q6_K => {
            let bl: &[BlockQ6_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                for e in 0..QK_K {
                    let (h, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                    let low = (b.ql[64 * h + 32 * (kk % 2) + l] >> (4 * (kk / 2))) & 0xf;
                    let high = (b.qh[32 * h + l] >> (2 * kk)) & 3;
                    q[sb * QK_K + e] = low | (high << 4);
                }
            }
        }
        Fmt::Q3_K => {
            // q = low 2 bits | high bit << 2.
            let bl: &[BlockQ3_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                for e in 0..QK_K {
                    let (h, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                    let low = (b.qs[32 * h + l] >> (2 * kk)) & 3;
                    let high = (b.hmask[l] >> (4 * h + kk)) & 1;
                    q[sb * QK_K + e] = low | (high << 2);
                }
            }
        }
        Fmt::Q2_K => {
            let bl: &[BlockQ2_K] = cast_blocks(row).expect("whole blocks");
            for (sb, b) in bl.iter().take(k / QK_K).enumerate() {
                for e in 0..QK_K {
                    let (h, kk, l) = (e / 128, (e % 128) / 32, e % 32);
                    q[sb * QK_K + e] = (b.qs[32 * h + l] >> (2 * kk)) & 3;
                }
            }
        }
        _ => unreachable!("no panel kernel for {f:?}"),
    }
}

/// A panel of up to [`PANEL_ROWS`] unpacked rows: `q` interleaved as
/// `[group][4-element step][row][4]`, `s`/`m` as `[group][row]`. Rows past the end are zero.
#[derive(Default, Debug)]
pub(crate) struct Panel {
    pub q: Vec<u8>,
    pub s: Vec<f32>,
    pub m: Vec<f32>,
    /// Scratch of the SIMD fills (the legacy formats' block heads, gathered row by row).
    pub rows: Vec<u8>,
}

impl Panel {
    /// Unpacks rows `0..n` (n <= 8) of `w` (rows `w_row` bytes apart, `k` elements each): the
    /// specification of the panel layout that the SIMD fills are tested against.
    #[cfg(test)]
    pub(crate) fn fill(
        &mut self,
        f: Fmt,
        shape: PanelShape,
        k: usize,
        w: &[u8],
        w_row: usize,
        n: usize,
    ) {
        let ng = k / shape.blk;
        // Every byte of rows < n is overwritten below; rows past n must read as zero.
        self.q.resize(k * PANEL_ROWS, 0);
        self.s.resize(ng * PANEL_ROWS, 0.0);
        self.m.resize(ng * PANEL_ROWS, 0.0);
        for r in n.min(PANEL_ROWS)..PANEL_ROWS {
            for e4 in 0..k / 4 {
                self.q[e4 * 32 + r * 4..e4 * 32 + r * 4 + 4].fill(0);
            }
            for g in 0..ng {
                self.s[g * PANEL_ROWS + r] = 0.0;
                self.m[g * PANEL_ROWS + r] = 0.0;
            }
        }
        let (mut row_q, mut row_s, mut row_m) = (vec![0u8; k], vec![0f32; ng], vec![0f32; ng]);
        for r in 0..n.min(PANEL_ROWS) {
            canon_row(
                f,
                &w[r * w_row..(r + 1) * w_row],
                &mut row_q,
                &mut row_s,
                &mut row_m,
            );
            for (e4, v) in row_q.chunks_exact(4).enumerate() {
                self.q[e4 * 32 + r * 4..e4 * 32 + r * 4 + 4].copy_from_slice(v);
            }
            for g in 0..ng {
                self.s[g * PANEL_ROWS + r] = row_s[g];
                self.m[g * PANEL_ROWS + r] = row_m[g];
            }
        }
    }
}

/// The scalar specification of the panel matmul: `out[c * out_stride + r]` = row `r` of `w`
/// (format `f`, `k` elements, rows `w_row` bytes apart) dotted with activation column `c`
/// (panel layout, columns `act_row_bytes(k)` apart), as
/// `sum over groups g of s_g * d_a * sum(q * q_a) - m_g * (d_a * sum(q_a))`.
pub(crate) fn gemm_ref(
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
    let shape = PanelShape::of(f).expect("panel format");
    let ng = k / shape.blk;
    let a_row = act_row_bytes(k);
    let (mut q, mut s, mut m) = (vec![0u8; k], vec![0f32; ng], vec![0f32; ng]);
    for r in 0..n_rows {
        canon_row(f, &w[r * w_row..(r + 1) * w_row], &mut q, &mut s, &mut m);
        for c in 0..n_cols {
            let a = &act[c * a_row..(c + 1) * a_row];
            out[c * out_stride + r] = dot_canon(f == Fmt::Q8_0, shape.blk, k, &q, &s, &m, a);
        }
    }
}

/// One canonical row (levels `q`, signed bytes if `signed`; per group of `blk` the scale `s`
/// and offset `m`) dotted with one panel-layout activation row `a` of `k` elements.
pub(crate) fn dot_canon(
    signed: bool,
    blk: usize,
    k: usize,
    q: &[u8],
    s: &[f32],
    m: &[f32],
    a: &[u8],
) -> f32 {
    let (od, o32, o16) = act_offsets(k);
    let mut acc = 0.0f32;
    for g in 0..k / blk {
        let e0 = g * blk;
        let lv = |e: usize| {
            if signed {
                q[e] as i8 as i32
            } else {
                q[e] as i32
            }
        };
        let isum: i32 = (e0..e0 + blk).map(|e| lv(e) * a[e] as i8 as i32).sum();
        let da = get_f32(a, od + 4 * (e0 / QK));
        let sa = if blk == QK {
            get_f32(a, o32 + 4 * g)
        } else {
            get_f32(a, o16 + 4 * g)
        };
        acc += s[g] * da * isum as f32 - m[g] * sa;
    }
    acc
}
