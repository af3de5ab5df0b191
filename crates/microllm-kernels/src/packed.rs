//! Packed panels: weights repacked once, at load, into the panel kernels' interleaved layout,
//! so that a matmul with few activation columns (decode, a handful of batched sequences)
//! streams them with no per-call unpacking.
//!
//! **Design decision: the panel layout, stored at the original size.** The panel matmul
//! ([`crate::panel`]) unpacks 8 weight rows into levels interleaved as "4 elements of each of
//! the 8 rows per 32-byte vector" on every call; with 8 or fewer activation columns that unpack
//! costs as much as the multiply. Here the unpacked panel is kept, but compressed back to the
//! bits the format had: 4-bit levels two to a byte, scales and offsets as f16. A 32-element
//! group of a panel (8 rows) is
//!
//! - 4-bit formats (Q4_0, Q4_1): 4 vectors of 32 bytes, vector `t` byte `4 * r + i` =
//!   `q[r][4t + i] | q[r][16 + 4t + i] << 4`, then the 8 rows' scales `s` (8 x f16) and
//!   offsets `m` (8 x f16): 160 bytes for 256 weights, 0.625 bytes per weight as Q4_1;
//! - Q8_0: 8 vectors of 32 bytes, vector `t` byte `4 * r + i` = `q[r][4t + i]` (signed), then
//!   the 8 scales (8 x f16): 272 bytes, 1.0625 bytes per weight as Q8_0.
//!
//! Panels follow each other (rows padded with zeros to a multiple of 8), each holding its
//! groups in order. A matrix is packed only if every canonical scale and offset is exactly an
//! f16 (always for Q4_1 and Q8_0, whose scales are f16 in the file; Q4_0's offset `8 d` could
//! overflow), so the kernels see the same f32 values as the panel path's fill, and compute
//! every output with the same integer sums and the same float operations in the same order:
//! the packed matmul is bit-identical to [`Kernels::gemm_panel`](crate::Kernels::gemm_panel)
//! on the same weights, whatever the number of columns (which continuous batching relies on).
//!
//! This module is the scalar specification (packing and the matmul); `x86/avx2_packed.rs` is
//! the SIMD version (AVX2, and AVX-512 VNNI where the CPU has it), tested against it.

use half::f16;

use crate::blocks::QK;
use crate::format::Fmt;
use crate::panel::{canon_row, dot_canon, PanelShape, PANEL_ROWS};

/// Whether weights of `f` can be packed.
pub(crate) fn supports(f: Fmt) -> bool {
    matches!(f, Fmt::Q4_0 | Fmt::Q4_1 | Fmt::Q8_0)
}

/// Bytes of one packed 32-element group of a panel.
pub(crate) const fn group_bytes(q8: bool) -> usize {
    if q8 {
        8 * 32 + 2 * PANEL_ROWS
    } else {
        4 * 32 + 4 * PANEL_ROWS
    }
}

/// Bytes of one packed panel (8 rows of `k` elements) of format `f`.
pub(crate) fn panel_bytes(f: Fmt, k: usize) -> usize {
    (k / QK) * group_bytes(f == Fmt::Q8_0)
}

/// Bytes of a packed matrix of `n_rows` rows.
pub(crate) fn packed_len(f: Fmt, k: usize, n_rows: usize) -> usize {
    n_rows.div_ceil(PANEL_ROWS) * panel_bytes(f, k)
}

/// `v` as f16 bits if that is exact, else `None`.
pub(crate) fn exact_f16(v: f32) -> Option<u16> {
    let h = f16::from_f32(v);
    (h.to_f32() == v).then_some(h.to_bits())
}

/// Packs rows `0..n_rows` of `w` (rows `w_row` bytes apart, `k` elements each) into `out`
/// (`packed_len` bytes). `false` if a scale or offset is not exactly an f16 (`out` is then
/// partly written and must not be used).
pub(crate) fn pack_ref(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    n_rows: usize,
    out: &mut [u8],
) -> bool {
    let q8 = f == Fmt::Q8_0;
    let (ng, gb, pb) = (k / QK, group_bytes(q8), panel_bytes(f, k));
    out[..packed_len(f, k, n_rows)].fill(0);
    let (mut q, mut s, mut m) = (vec![0u8; k], vec![0f32; ng], vec![0f32; ng]);
    for r in 0..n_rows {
        canon_row(f, &w[r * w_row..(r + 1) * w_row], &mut q, &mut s, &mut m);
        let (panel, lane) = (r / PANEL_ROWS, r % PANEL_ROWS);
        for g in 0..ng {
            let o = panel * pb + g * gb;
            let grp = &mut out[o..o + gb];
            let e0 = g * QK;
            if q8 {
                for t in 0..8 {
                    for i in 0..4 {
                        grp[32 * t + 4 * lane + i] = q[e0 + 4 * t + i];
                    }
                }
            } else {
                for t in 0..4 {
                    for i in 0..4 {
                        grp[32 * t + 4 * lane + i] =
                            q[e0 + 4 * t + i] | (q[e0 + 16 + 4 * t + i] << 4);
                    }
                }
            }
            let so = if q8 { 256 } else { 128 };
            let Some(sh) = exact_f16(s[g]) else {
                return false;
            };
            grp[so + 2 * lane..so + 2 * lane + 2].copy_from_slice(&sh.to_le_bytes());
            if !q8 {
                let Some(mh) = exact_f16(m[g]) else {
                    return false;
                };
                grp[144 + 2 * lane..144 + 2 * lane + 2].copy_from_slice(&mh.to_le_bytes());
            }
        }
    }
    true
}

/// Row `lane` of panel `panel` of a packed matrix back in canonical form.
fn unpack_row(
    f: Fmt,
    k: usize,
    packed: &[u8],
    panel: usize,
    lane: usize,
    q: &mut [u8],
    s: &mut [f32],
    m: &mut [f32],
) {
    let q8 = f == Fmt::Q8_0;
    let (gb, pb) = (group_bytes(q8), panel_bytes(f, k));
    let h = |b: &[u8], at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32();
    for g in 0..k / QK {
        let grp = &packed[panel * pb + g * gb..panel * pb + (g + 1) * gb];
        let e0 = g * QK;
        if q8 {
            for t in 0..8 {
                for i in 0..4 {
                    q[e0 + 4 * t + i] = grp[32 * t + 4 * lane + i];
                }
            }
            s[g] = h(grp, 256 + 2 * lane);
            m[g] = 0.0;
        } else {
            for t in 0..4 {
                for i in 0..4 {
                    let b = grp[32 * t + 4 * lane + i];
                    q[e0 + 4 * t + i] = b & 0xf;
                    q[e0 + 16 + 4 * t + i] = b >> 4;
                }
            }
            s[g] = h(grp, 128 + 2 * lane);
            m[g] = h(grp, 144 + 2 * lane);
        }
    }
}

/// The scalar specification of the packed matmul: the same sums as `panel::gemm_ref`, from
/// the packed bytes (`packed_len(f, k, n_rows)` of them), handed to `sink(column, row, v)`.
pub(crate) fn gemm_ref(
    f: Fmt,
    k: usize,
    packed: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    sink: &mut dyn FnMut(usize, usize, &[f32]),
) {
    let shape = PanelShape::of(f).expect("packed format");
    let ng = k / QK;
    let a_row = crate::panel::act_row_bytes(k);
    let (mut q, mut s, mut m) = (vec![0u8; k], vec![0f32; ng], vec![0f32; ng]);
    for r in 0..n_rows {
        unpack_row(
            f,
            k,
            packed,
            r / PANEL_ROWS,
            r % PANEL_ROWS,
            &mut q,
            &mut s,
            &mut m,
        );
        for c in 0..n_cols {
            let a = &act[c * a_row..(c + 1) * a_row];
            sink(
                c,
                r,
                &[dot_canon(f == Fmt::Q8_0, shape.blk, k, &q, &s, &m, a)],
            );
        }
    }
}
