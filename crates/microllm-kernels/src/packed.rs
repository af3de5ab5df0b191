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
//!   `q[r][4t + i] | q[r][16 + 4t + i] << 4`, then the 8 rows' scales `s` (8 x f16) and, for
//!   Q4_1, offsets `m` (8 x f16): 144 bytes for 256 weights as Q4_0 (0.5625 bytes per weight,
//!   the file's), 160 as Q4_1 (0.625);
//! - 5-bit formats (Q5_0, Q5_1): the 4-bit vectors of the low 4 bits, then one vector of the
//!   fifth bits, byte `4 * r + i` bit `t` = bit 4 of `q[r][4t + i]` and bit `4 + t` = bit 4 of
//!   `q[r][16 + 4t + i]`, then the scales and, for Q5_1, the offsets: 176 bytes as Q5_0
//!   (0.6875 bytes per weight, the file's), 192 as Q5_1 (0.75);
//! - Q8_0: 8 vectors of 32 bytes, vector `t` byte `4 * r + i` = `q[r][4t + i]` (signed), then
//!   the 8 scales (8 x f16): 272 bytes, 1.0625 bytes per weight as Q8_0.
//!
//! Q4_0's and Q5_0's offsets are not stored: they are `8 s` and `16 s`, which the kernels
//! compute in f32 (exactly, as the canonical form does).
//!
//! Panels follow each other (rows padded with zeros to a multiple of 8), each holding its
//! groups in order. A matrix is packed only if every stored scale and offset is exactly an
//! f16 (always, for these formats: they are f16s in the file), so the kernels see the same f32
//! values as the panel path's fill, and compute
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

/// The packed layout of a format (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Layout {
    /// Signed 8-bit levels, 8 vectors per group (Q8_0); otherwise 4-bit vectors.
    pub q8: bool,
    /// A vector of fifth bits follows the 4-bit vectors.
    pub five: bool,
    /// Offsets are stored after the scales; otherwise they are `sym * s` (0 for Q8_0).
    pub offsets: bool,
    /// The offset as a multiple of the scale when it is not stored.
    pub sym: f32,
}

impl Layout {
    /// The layout of `f`, if it can be packed.
    pub(crate) const fn of(f: Fmt) -> Option<Layout> {
        let (q8, five, offsets, sym) = match f {
            Fmt::Q8_0 => (true, false, false, 0.0),
            Fmt::Q4_0 => (false, false, false, 8.0),
            Fmt::Q4_1 => (false, false, true, 0.0),
            Fmt::Q5_0 => (false, true, false, 16.0),
            Fmt::Q5_1 => (false, true, true, 0.0),
            _ => return None,
        };
        Some(Layout {
            q8,
            five,
            offsets,
            sym,
        })
    }

    /// Byte offset of the 8 scales in a group.
    pub(crate) const fn scales_at(self) -> usize {
        if self.q8 {
            256
        } else if self.five {
            160
        } else {
            128
        }
    }

    /// Byte offset of the 8 offsets in a group (when stored).
    pub(crate) const fn offsets_at(self) -> usize {
        self.scales_at() + 2 * PANEL_ROWS
    }

    /// Byte offset of the fifth-bit vector in a group (5-bit formats).
    pub(crate) const FIVE_AT: usize = 128;

    /// Bytes of one packed 32-element group of a panel.
    pub(crate) const fn group_bytes(self) -> usize {
        self.scales_at() + 2 * PANEL_ROWS * if self.offsets { 2 } else { 1 }
    }

    /// Bytes of one packed panel (8 rows of `k` elements).
    pub(crate) const fn panel_bytes(self, k: usize) -> usize {
        (k / QK) * self.group_bytes()
    }
}

/// Whether weights of `f` can be packed.
pub(crate) fn supports(f: Fmt) -> bool {
    Layout::of(f).is_some()
}

/// The layout of a format the caller checked with [`supports`].
fn layout(f: Fmt) -> Layout {
    Layout::of(f).expect("packed format")
}

/// Bytes of a packed matrix of `n_rows` rows.
pub(crate) fn packed_len(f: Fmt, k: usize, n_rows: usize) -> usize {
    n_rows.div_ceil(PANEL_ROWS) * layout(f).panel_bytes(k)
}

/// `v` as f16 bits if that is exact, else `None`.
pub(crate) fn exact_f16(v: f32) -> Option<u16> {
    let h = f16::from_f32(v);
    (h.to_f32() == v).then_some(h.to_bits())
}

/// Packs rows `0..n_rows` of `w` (rows `w_row` bytes apart, `k` elements each) into `out`
/// (`packed_len` bytes). `false` if a stored scale or offset is not exactly an f16 (`out` is
/// then partly written and must not be used).
pub(crate) fn pack_ref(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    n_rows: usize,
    out: &mut [u8],
) -> bool {
    let lay = layout(f);
    let (ng, gb, pb) = (k / QK, lay.group_bytes(), lay.panel_bytes(k));
    out[..packed_len(f, k, n_rows)].fill(0);
    let (mut q, mut s, mut m) = (vec![0u8; k], vec![0f32; ng], vec![0f32; ng]);
    for r in 0..n_rows {
        canon_row(f, &w[r * w_row..(r + 1) * w_row], &mut q, &mut s, &mut m);
        let (panel, lane) = (r / PANEL_ROWS, r % PANEL_ROWS);
        for g in 0..ng {
            let o = panel * pb + g * gb;
            let grp = &mut out[o..o + gb];
            let lv = &q[g * QK..(g + 1) * QK];
            if lay.q8 {
                for t in 0..8 {
                    grp[32 * t + 4 * lane..32 * t + 4 * lane + 4]
                        .copy_from_slice(&lv[4 * t..4 * t + 4]);
                }
            } else {
                for t in 0..4 {
                    for i in 0..4 {
                        let (a, b) = (lv[4 * t + i], lv[16 + 4 * t + i]);
                        grp[32 * t + 4 * lane + i] = (a & 0xf) | (b & 0xf) << 4;
                        if lay.five {
                            grp[Layout::FIVE_AT + 4 * lane + i] |=
                                (a >> 4) << t | (b >> 4) << (4 + t);
                        }
                    }
                }
            }
            let mut put = |at: usize, v: f32| {
                let h = exact_f16(v)?;
                grp[at + 2 * lane..at + 2 * lane + 2].copy_from_slice(&h.to_le_bytes());
                Some(())
            };
            if put(lay.scales_at(), s[g]).is_none()
                || (lay.offsets && put(lay.offsets_at(), m[g]).is_none())
            {
                return false;
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
    let lay = layout(f);
    let (gb, pb) = (lay.group_bytes(), lay.panel_bytes(k));
    let h = |b: &[u8], at: usize| {
        f16::from_bits(u16::from_le_bytes([b[at + 2 * lane], b[at + 2 * lane + 1]])).to_f32()
    };
    for g in 0..k / QK {
        let grp = &packed[panel * pb + g * gb..panel * pb + (g + 1) * gb];
        let lv = &mut q[g * QK..(g + 1) * QK];
        if lay.q8 {
            for t in 0..8 {
                lv[4 * t..4 * t + 4]
                    .copy_from_slice(&grp[32 * t + 4 * lane..32 * t + 4 * lane + 4]);
            }
        } else {
            for t in 0..4 {
                for i in 0..4 {
                    let b = grp[32 * t + 4 * lane + i];
                    let hb = if lay.five {
                        grp[Layout::FIVE_AT + 4 * lane + i]
                    } else {
                        0
                    };
                    lv[4 * t + i] = (b & 0xf) | ((hb >> t) & 1) << 4;
                    lv[16 + 4 * t + i] = (b >> 4) | ((hb >> (4 + t)) & 1) << 4;
                }
            }
        }
        s[g] = h(grp, lay.scales_at());
        m[g] = if lay.offsets {
            h(grp, lay.offsets_at())
        } else {
            lay.sym * s[g]
        };
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
    debug_assert!(shape.blk == QK);
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
