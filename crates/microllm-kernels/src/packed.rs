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
//! - **Panels are paired** in these non-K formats (panels `2i` and `2i + 1`; an odd last
//!   panel stays alone, as above): a pair's group holds panel `2i`'s vector `t` then panel
//!   `2i + 1`'s for every vector (the fifth-bit vector included), then the two panels' scales,
//!   then their offsets, so one 64-byte read holds both panels' vector and a decode reads each
//!   pair as one stream (two panels a panel apart were two streams, which read this machine's
//!   memory 6-8% slower for Q8_0: see `docs/performance.md`). A call on part of a packed
//!   matrix must therefore start at an even panel ([`pair_panel`]).
//!
//! - K-quants (Q4_K, Q5_K): per 256-element super-block a 160-byte header — the 8 rows' `d`
//!   and `dmin` (8 x f16 each), then for each of the 8 groups the rows' 6-bit scales `sc`
//!   (8 x u8) and minimums `mn` (8 x u8) — then the 8 groups' level vectors as above (4-bit,
//!   plus fifth bits for Q5_K): 1184 bytes for 2048 weights as Q4_K (0.578 bytes per weight;
//!   the file's 0.5625), 1440 as Q5_K (0.703; 0.6875). The kernels form the canonical scale
//!   `d * sc` and offset `dmin * mn` in f32, where they are exact.
//! - Q6_K: per 256-element super-block a 144-byte header — the 8 rows' `d` (8 x f16), then
//!   for each of the 16 sixteen-element groups the rows' signed scales `sc` (8 x i8) — then
//!   the 8 thirty-two-element groups' level vectors: the 4-bit vectors of the low 4 bits and
//!   two vectors of the top 2 bits, vector `u` byte `4 * r + i` bits `4 * v .. 4 * v + 1` =
//!   the top bits of `q[r][4t + i]` and bits `4 * v + 2 .. 4 * v + 3` those of
//!   `q[r][16 + 4t + i]`, for `t = 2u + v`: 1680 bytes for 2048 weights (0.8203 bytes per
//!   weight, the file's). A 32-element group holds two of the canonical 16-element groups
//!   (elements `0..16`, the low nibbles, and `16..32`, the high ones): each gets its own
//!   integer sum and epilogue, with the scale `d * sc` and offset `32 d sc` formed in f32,
//!   exactly.
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

use crate::blocks::{cast_blocks, scale_min_k4, BlockQ4_K, BlockQ5_K, BlockQ6_K, QK, QK_K};
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
    /// K-quant super-blocks: a header with the rows' `d`, `dmin` and 6-bit group scales and
    /// minimums (Q6_K: `d` and 16 signed scales), then 8 groups of levels only.
    pub kq: bool,
    /// Q6_K: two vectors of top bits follow the 4-bit vectors, and each 32-element group is
    /// two canonical groups of 16 (offsets `32 * s`).
    pub six: bool,
}

/// Bytes of a K-quant super-block header: `d` and `dmin` of the 8 rows (8 x f16 each), then
/// per group the 8 rows' scales (8 x u8) and minimums (8 x u8).
pub(crate) const KQ_HEAD: usize = 32 + 2 * 8 * PANEL_ROWS;

/// Bytes of a Q6_K super-block header: `d` of the 8 rows (8 x f16), then per 16-element group
/// the 8 rows' scales (8 x i8).
pub(crate) const Q6K_HEAD: usize = 16 + 16 * PANEL_ROWS;

impl Layout {
    /// The layout of `f`, if it can be packed.
    pub(crate) const fn of(f: Fmt) -> Option<Layout> {
        let (q8, five, offsets, sym, kq, six) = match f {
            Fmt::Q8_0 => (true, false, false, 0.0, false, false),
            Fmt::Q4_0 => (false, false, false, 8.0, false, false),
            Fmt::Q4_1 => (false, false, true, 0.0, false, false),
            Fmt::Q5_0 => (false, true, false, 16.0, false, false),
            Fmt::Q5_1 => (false, true, true, 0.0, false, false),
            Fmt::Q4_K => (false, false, false, 0.0, true, false),
            Fmt::Q5_K => (false, true, false, 0.0, true, false),
            Fmt::Q6_K => (false, false, false, 32.0, true, true),
            _ => return None,
        };
        Some(Layout {
            q8,
            five,
            offsets,
            sym,
            kq,
            six,
        })
    }

    /// Elements per block of the format: a packed row holds a multiple of it.
    pub(crate) const fn block(self) -> usize {
        if self.kq {
            QK_K
        } else {
            QK
        }
    }

    /// Whether panels are stored in pairs (see the module documentation): every format but
    /// the K-quants.
    pub(crate) const fn paired(self) -> bool {
        !self.kq
    }

    /// Bytes of the level vectors of a group.
    pub(crate) const fn levels_bytes(self) -> usize {
        if self.q8 {
            256
        } else if self.six {
            192
        } else if self.five {
            160
        } else {
            128
        }
    }

    /// Byte offset of the 8 scales in a group (not K-quants).
    pub(crate) const fn scales_at(self) -> usize {
        self.levels_bytes()
    }

    /// Byte offset of the 8 offsets in a group (when stored).
    pub(crate) const fn offsets_at(self) -> usize {
        self.scales_at() + 2 * PANEL_ROWS
    }

    /// Byte offset of the fifth-bit vector in a group (5-bit formats).
    pub(crate) const FIVE_AT: usize = 128;

    /// Byte offset of the two top-bit vectors in a group (Q6_K).
    pub(crate) const SIX_AT: usize = 128;

    /// Bytes of a K-quant super-block header.
    pub(crate) const fn head_bytes(self) -> usize {
        if self.six {
            Q6K_HEAD
        } else {
            KQ_HEAD
        }
    }

    /// Bytes of one packed 32-element group of a panel.
    pub(crate) const fn group_bytes(self) -> usize {
        if self.kq {
            self.levels_bytes()
        } else {
            self.levels_bytes() + 2 * PANEL_ROWS * if self.offsets { 2 } else { 1 }
        }
    }

    /// Bytes of one block of a panel: a group, or a K-quant header and its 8 groups.
    const fn block_bytes(self) -> usize {
        if self.kq {
            self.head_bytes() + 8 * self.group_bytes()
        } else {
            self.group_bytes()
        }
    }

    /// Bytes of one packed panel (8 rows of `k` elements).
    pub(crate) const fn panel_bytes(self, k: usize) -> usize {
        (k / self.block()) * self.block_bytes()
    }

    /// Byte offset of group `g` in a panel.
    #[inline(always)]
    pub(crate) const fn group_at(self, g: usize) -> usize {
        if self.kq {
            (g / 8) * self.block_bytes() + self.head_bytes() + (g % 8) * self.group_bytes()
        } else {
            g * self.group_bytes()
        }
    }

    /// Byte offset of the K-quant header of group `g`'s super-block in a panel.
    #[inline(always)]
    pub(crate) const fn head_at(self, g: usize) -> usize {
        (g / 8) * self.block_bytes()
    }
}

/// Where panel `pi` of a packed matrix of `np` panels (`pb` bytes each) keeps its bytes
/// (see the module documentation): byte `x` of group `g`'s level vectors at
/// [`PairPanel::vec`]`(ga, x)`, byte `y` of its scales and offsets at
/// [`PairPanel::tail`]`(ga, y)`, with `ga = group_at(g)`. A panel is paired when the layout
/// is ([`Layout::paired`]) and its partner exists (`pi | 1 < np`); a K-quant panel is never
/// (its headers and groups are read as two streams).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PairPanel {
    /// Vector 0 of group 0.
    pub vec0: usize,
    /// From one 32-byte vector to the next.
    pub vstep: usize,
    /// Group offsets scale by this (2: a pair's groups hold both panels').
    pub gmul: usize,
    /// The scales of group 0.
    pub tail0: usize,
    /// From the scales to the offsets (16-byte units).
    pub tstep: usize,
}

impl PairPanel {
    /// Byte `x` of the level vectors of the group at `ga`.
    #[inline(always)]
    pub(crate) const fn vec(self, ga: usize, x: usize) -> usize {
        self.vec0 + self.gmul * ga + self.vstep * (x / 32) + x % 32
    }

    /// Byte `y` of the scales (and offsets, from 16) of the group at `ga`.
    #[inline(always)]
    pub(crate) const fn tail(self, ga: usize, y: usize) -> usize {
        self.tail0 + self.gmul * ga + self.tstep * (y / 16) + y % 16
    }
}

/// See [`PairPanel`].
#[inline(always)]
pub(crate) const fn pair_panel(lay: Layout, pi: usize, np: usize, pb: usize) -> PairPanel {
    let levels = lay.levels_bytes();
    if lay.paired() && pi | 1 < np {
        let (base, which) = ((pi & !1) * pb, pi & 1);
        PairPanel {
            vec0: base + 32 * which,
            vstep: 64,
            gmul: 2,
            tail0: base + 2 * levels + 16 * which,
            tstep: 32,
        }
    } else {
        PairPanel {
            vec0: pi * pb,
            vstep: 32,
            gmul: 1,
            tail0: pi * pb + levels,
            tstep: 16,
        }
    }
}

/// Writes the K-quant headers of one panel (`rows` rows of `w`, `w_row` bytes apart, `k`
/// elements each) into `panel` (see [`KQ_HEAD`], [`Q6K_HEAD`]); missing rows' entries are
/// zero.
pub(crate) fn put_kq_heads(
    f: Fmt,
    k: usize,
    w: &[u8],
    w_row: usize,
    rows: usize,
    panel: &mut [u8],
) {
    let lay = layout(f);
    let hb = lay.head_bytes();
    for sb in 0..k / QK_K {
        panel[lay.head_at(8 * sb)..lay.head_at(8 * sb) + hb].fill(0);
    }
    for r in 0..rows {
        let row = &w[r * w_row..(r + 1) * w_row];
        for sb in 0..k / QK_K {
            let h = &mut panel[lay.head_at(8 * sb)..lay.head_at(8 * sb) + hb];
            if f == Fmt::Q6_K {
                let b = &cast_blocks::<BlockQ6_K>(row).expect("whole blocks")[sb];
                h[2 * r..2 * r + 2].copy_from_slice(&b.d.0);
                for (j, sc) in b.scales.iter().enumerate() {
                    h[16 + 8 * j + r] = *sc as u8;
                }
                continue;
            }
            let (d, dmin, scales) = if f == Fmt::Q4_K {
                let b = &cast_blocks::<BlockQ4_K>(row).expect("whole blocks")[sb];
                (b.d, b.dmin, b.scales)
            } else {
                let b = &cast_blocks::<BlockQ5_K>(row).expect("whole blocks")[sb];
                (b.d, b.dmin, b.scales)
            };
            h[2 * r..2 * r + 2].copy_from_slice(&d.0);
            h[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&dmin.0);
            for j in 0..8 {
                let (sc, mn) = scale_min_k4(j, &scales);
                h[32 + 8 * j + r] = sc;
                h[96 + 8 * j + r] = mn;
            }
        }
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

/// Elements a packed row's length must be a multiple of.
pub(crate) fn block(f: Fmt) -> usize {
    layout(f).block()
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
    let (ng, pb) = (k / QK, lay.panel_bytes(k));
    // Canonical groups: of 32 elements, or of 16 (Q6_K).
    let ncg = k / PanelShape::of(f).expect("packed format").blk;
    out[..packed_len(f, k, n_rows)].fill(0);
    if lay.kq {
        for (pi, panel) in out[..packed_len(f, k, n_rows)]
            .chunks_exact_mut(pb)
            .enumerate()
        {
            let r0 = pi * PANEL_ROWS;
            let rows = PANEL_ROWS.min(n_rows - r0);
            put_kq_heads(f, k, &w[r0 * w_row..], w_row, rows, panel);
        }
    }
    let (mut q, mut s, mut m) = (vec![0u8; k], vec![0f32; ncg], vec![0f32; ncg]);
    let np = n_rows.div_ceil(PANEL_ROWS);
    for r in 0..n_rows {
        canon_row(f, &w[r * w_row..(r + 1) * w_row], &mut q, &mut s, &mut m);
        let (panel, lane) = (r / PANEL_ROWS, r % PANEL_ROWS);
        // Paired or not, the panel's bytes are where `pair_panel` says (K-quants: alone).
        let at = pair_panel(lay, panel, np, pb);
        for g in 0..ng {
            let ga = lay.group_at(g);
            let lv = &q[g * QK..(g + 1) * QK];
            if lay.q8 {
                for t in 0..8 {
                    let o = at.vec(ga, 32 * t + 4 * lane);
                    out[o..o + 4].copy_from_slice(&lv[4 * t..4 * t + 4]);
                }
            } else {
                for t in 0..4 {
                    for i in 0..4 {
                        let (a, b) = (lv[4 * t + i], lv[16 + 4 * t + i]);
                        out[at.vec(ga, 32 * t + 4 * lane + i)] = (a & 0xf) | (b & 0xf) << 4;
                        if lay.six {
                            let (u, v) = (t / 2, t % 2);
                            out[at.vec(ga, Layout::SIX_AT + 32 * u + 4 * lane + i)] |=
                                (a >> 4) << (4 * v) | (b >> 4) << (4 * v + 2);
                        }
                        if lay.five {
                            out[at.vec(ga, Layout::FIVE_AT + 4 * lane + i)] |=
                                (a >> 4) << t | (b >> 4) << (4 + t);
                        }
                    }
                }
            }
            if lay.kq {
                continue;
            }
            let mut put = |y: usize, v: f32| {
                let h = exact_f16(v)?;
                let o = at.tail(ga, y + 2 * lane);
                out[o..o + 2].copy_from_slice(&h.to_le_bytes());
                Some(())
            };
            if put(0, s[g]).is_none() || (lay.offsets && put(16, m[g]).is_none()) {
                return false;
            }
        }
    }
    true
}

/// Row `lane` of panel `panel` of a packed matrix back in canonical form.
#[allow(clippy::too_many_arguments)]
fn unpack_row(
    f: Fmt,
    k: usize,
    packed: &[u8],
    np: usize,
    panel: usize,
    lane: usize,
    q: &mut [u8],
    s: &mut [f32],
    m: &mut [f32],
) {
    let lay = layout(f);
    let pb = lay.panel_bytes(k);
    let h = |b: &[u8], at: usize| {
        f16::from_bits(u16::from_le_bytes([b[at + 2 * lane], b[at + 2 * lane + 1]])).to_f32()
    };
    let at = pair_panel(lay, panel, np, pb);
    for g in 0..k / QK {
        let ga = lay.group_at(g);
        let lv = &mut q[g * QK..(g + 1) * QK];
        if lay.q8 {
            for t in 0..8 {
                let o = at.vec(ga, 32 * t + 4 * lane);
                lv[4 * t..4 * t + 4].copy_from_slice(&packed[o..o + 4]);
            }
        } else {
            for t in 0..4 {
                for i in 0..4 {
                    let b = packed[at.vec(ga, 32 * t + 4 * lane + i)];
                    if lay.six {
                        let (u, v) = (t / 2, t % 2);
                        let hb = packed[at.vec(ga, Layout::SIX_AT + 32 * u + 4 * lane + i)];
                        lv[4 * t + i] = (b & 0xf) | ((hb >> (4 * v)) & 3) << 4;
                        lv[16 + 4 * t + i] = (b >> 4) | ((hb >> (4 * v + 2)) & 3) << 4;
                        continue;
                    }
                    let hb = if lay.five {
                        packed[at.vec(ga, Layout::FIVE_AT + 4 * lane + i)]
                    } else {
                        0
                    };
                    lv[4 * t + i] = (b & 0xf) | ((hb >> t) & 1) << 4;
                    lv[16 + 4 * t + i] = (b >> 4) | ((hb >> (4 + t)) & 1) << 4;
                }
            }
        }
        if lay.six {
            // The canonical d * sc and 32 * d * sc of the two 16-element groups (exact in f32:
            // an f16 times 8 bits, times a power of two).
            let hd = &packed[panel * pb + lay.head_at(g)..];
            for j in [2 * g, 2 * g + 1] {
                s[j] = h(hd, 0) * hd[16 + 8 * (j % 16) + lane] as i8 as f32;
                m[j] = lay.sym * s[j];
            }
            continue;
        }
        if lay.kq {
            // The canonical d * sc and dmin * mn (exact in f32: an f16 times 6 bits).
            let hd = &packed[panel * pb + lay.head_at(g)..];
            s[g] = h(hd, 0) * hd[32 + 8 * (g % 8) + lane] as f32;
            m[g] = h(hd, 16) * hd[96 + 8 * (g % 8) + lane] as f32;
            continue;
        }
        s[g] = h(packed, at.tail(ga, 0));
        m[g] = if lay.offsets {
            h(packed, at.tail(ga, 16))
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
    let ng = k / shape.blk;
    let a_row = crate::panel::act_row_bytes(k);
    let (mut q, mut s, mut m) = (vec![0u8; k], vec![0f32; ng], vec![0f32; ng]);
    for r in 0..n_rows {
        unpack_row(
            f,
            k,
            packed,
            n_rows.div_ceil(PANEL_ROWS),
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
