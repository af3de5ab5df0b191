//! Quantization block layouts, byte for byte as ggml stores them in GGUF files.
//!
//! Every block is `#[repr(C)]`, made only of byte arrays, so it has **alignment 1, no padding,
//! and every bit pattern is valid**. That is what lets [`cast_blocks`] view any `&[u8]` (an
//! mmap of a GGUF file at any offset) as `&[Block]` without copying and without an alignment
//! check that could fail. Half-precision fields are stored as [`F16Le`] (two little-endian
//! bytes) rather than `u16`, which would raise the alignment to 2.
//!
//! Element order inside a block (ggml's):
//! - 4-bit formats: byte `j` holds element `j` in its low nibble and element `j + 16` in its
//!   high nibble.
//! - 5-bit formats: as the 4-bit ones for the low 4 bits; bit `j` of `qh` read as a
//!   little-endian `u32` is the 5th bit of element `j`.
//! - 8-bit formats: `qs[j]` is element `j`.
//! - K-quants (256-element super-blocks, [`QK_K`]): see each block's documentation; the
//!   orders are ggml's and the dequantizers in `reference` spell them out element by element.

use half::f16;
use std::mem::{align_of, size_of};

/// Elements per block of the legacy formats (Q4_0 .. Q8_1).
pub const QK: usize = 32;
/// Elements per super-block of the K-quants (Q2_K .. Q8_K).
pub const QK_K: usize = 256;

/// An IEEE half stored as two little-endian bytes (alignment 1).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct F16Le(pub [u8; 2]);

impl F16Le {
    /// Wrap a half.
    #[inline(always)]
    pub fn new(v: f16) -> Self {
        F16Le(v.to_bits().to_le_bytes())
    }
    /// Round an `f32` to the nearest half (ties to even), as ggml's `GGML_FP32_TO_FP16`.
    #[inline(always)]
    pub fn from_f32(v: f32) -> Self {
        Self::new(f16::from_f32(v))
    }
    /// The raw bits.
    #[inline(always)]
    pub fn bits(self) -> u16 {
        u16::from_le_bytes(self.0)
    }
    /// The value as a half.
    #[inline(always)]
    pub fn get(self) -> f16 {
        f16::from_bits(self.bits())
    }
    /// The value widened to `f32` (exact).
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        self.get().to_f32()
    }
}

/// Q4_0: 32 weights `(q - 8) * d`, q in 0..=15. 18 bytes, 4.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: F16Le,
    /// Nibbles: low = elements 0..16, high = elements 16..32.
    pub qs: [u8; QK / 2],
}

/// Q4_1: 32 weights `q * d + m`, q in 0..=15. 20 bytes, 5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: F16Le,
    /// Minimum (offset).
    pub m: F16Le,
    /// Nibbles: low = elements 0..16, high = elements 16..32.
    pub qs: [u8; QK / 2],
}

/// Q5_0: 32 weights `(q - 16) * d`, q in 0..=31. 22 bytes, 5.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: F16Le,
    /// 5th bit of element j = bit j of `u32::from_le_bytes(qh)`.
    pub qh: [u8; 4],
    /// Low 4 bits: low nibble = elements 0..16, high nibble = elements 16..32.
    pub qs: [u8; QK / 2],
}

/// Q5_1: 32 weights `q * d + m`, q in 0..=31. 24 bytes, 6 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: F16Le,
    /// Minimum (offset).
    pub m: F16Le,
    /// 5th bit of element j = bit j of `u32::from_le_bytes(qh)`.
    pub qh: [u8; 4],
    /// Low 4 bits: low nibble = elements 0..16, high nibble = elements 16..32.
    pub qs: [u8; QK / 2],
}

/// Q8_0: 32 values `q * d`. 34 bytes, 8.5 bits per weight. Also the activation format for
/// Q4_0/Q5_0/Q8_0 weights.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: F16Le,
    /// Values.
    pub qs: [i8; QK],
}

/// Q8_1: 32 values `q * d` plus `s = d * sum(q)`. 36 bytes. The activation format for
/// Q4_1/Q5_1 weights (the `s` term folds the weights' minimum into one multiply per block).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: F16Le,
    /// `d * sum(qs)`, with `d` the unrounded f32 scale.
    pub s: F16Le,
    /// Values.
    pub qs: [i8; QK],
}

impl Default for BlockQ8_0 {
    fn default() -> Self {
        BlockQ8_0 {
            d: F16Le::default(),
            qs: [0; QK],
        }
    }
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        BlockQ8_1 {
            d: F16Le::default(),
            s: F16Le::default(),
            qs: [0; QK],
        }
    }
}

/// Q2_K: 256 weights in 16 groups of 16, `x = d * sc * q - dmin * m`, q in 0..=3, sc and m
/// 4-bit. 84 bytes, 2.625 bits per weight.
///
/// Element `128h + 32k + l` (h < 2, k < 4, l < 32) is bits `2k..2k+2` of `qs[32h + l]`; its
/// group `e / 16` has scale `scales[g] & 15` and min `scales[g] >> 4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ2_K {
    /// Per group: low nibble = scale, high nibble = min.
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the group scales.
    pub d: F16Le,
    /// Super-block scale of the group mins.
    pub dmin: F16Le,
}

/// Q3_K: 256 weights in 16 groups of 16, `x = d * (sc - 32) * (q - 4)`, q in 0..=7, sc 6-bit.
/// 110 bytes, 3.4375 bits per weight.
///
/// Element `128h + 32k + l`: low 2 bits = bits `2k..2k+2` of `qs[32h + l]`, third bit = bit
/// `4h + k` of `hmask[l]`. The 16 six-bit scales are packed in 12 bytes: scale `j` has its low
/// nibble in `scales[j % 8]` (low nibble for j < 8, high for j >= 8) and its top 2 bits at bits
/// `2 * (j / 4)` of `scales[8 + j % 4]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ3_K {
    /// Third bit of each quant.
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits of each quant.
    pub qs: [u8; QK_K / 4],
    /// 16 six-bit scales (biased by 32), packed.
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: F16Le,
}

/// Q4_K: 256 weights in 8 sub-blocks of 32, `x = d * sc * q - dmin * m`, q in 0..=15, sc and
/// m 6-bit. 144 bytes, 4.5 bits per weight.
///
/// Element `64j + l` (l < 32) is the low nibble of `qs[32j + l]`, element `64j + 32 + l` its
/// high nibble. Scales/mins of sub-block `j` (see [`scale_min_k4`]): for j < 4 the low 6 bits
/// of `scales[j]` / `scales[j + 4]`; for j >= 4 the nibbles of `scales[j + 4]` plus the top 2
/// bits of `scales[j - 4]` / `scales[j]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4_K {
    /// Super-block scale of the sub-block scales.
    pub d: F16Le,
    /// Super-block scale of the sub-block mins.
    pub dmin: F16Le,
    /// 8 six-bit scales and 8 six-bit mins, packed.
    pub scales: [u8; 12],
    /// 4-bit quants.
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: as Q4_K with a fifth bit: bit `j` of `qh[l]` is the high bit (+16) of element
/// `32j + l`. 176 bytes, 5.5 bits per weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ5_K {
    /// Super-block scale of the sub-block scales.
    pub d: F16Le,
    /// Super-block scale of the sub-block mins.
    pub dmin: F16Le,
    /// 8 six-bit scales and 8 six-bit mins, packed as in Q4_K.
    pub scales: [u8; 12],
    /// Fifth bits.
    pub qh: [u8; QK_K / 8],
    /// Low 4 bits, laid out as Q4_K's nibbles.
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 256 weights in 16 groups of 16, `x = d * sc * (q - 32)`, q in 0..=63, sc an i8.
/// 210 bytes, 6.5625 bits per weight.
///
/// Element `128h + 32k + l` (h < 2, k < 4, l < 32): low 4 bits from `ql[64h + 32(k % 2) + l]`
/// (low nibble for k < 2, high for k >= 2), top 2 bits = bits `2k..2k+2` of `qh[32h + l]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ6_K {
    /// Low 4 bits.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits.
    pub qh: [u8; QK_K / 4],
    /// Group scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: F16Le,
}

/// Q8_K: 256 values `q * d` with an f32 scale and the sums of each group of 16 quants. 292
/// bytes. Only an activation format: the K-quants are dotted with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_K {
    /// Scale, an f32 as little-endian bytes.
    pub d: [u8; 4],
    /// Values (-127..=127).
    pub qs: [i8; QK_K],
    /// `bsums[g]` = sum of `qs[16g..16g + 16]`, i16 little-endian.
    pub bsums: [[u8; 2]; QK_K / 16],
}

impl BlockQ8_K {
    /// The scale.
    #[inline(always)]
    pub fn d(&self) -> f32 {
        f32::from_le_bytes(self.d)
    }
    /// Sum of group `g`'s quants.
    #[inline(always)]
    pub fn bsum(&self, g: usize) -> i16 {
        i16::from_le_bytes(self.bsums[g])
    }
}

/// Scale and min of sub-block `j` (< 8) of a Q4_K/Q5_K block's packed `scales`, as ggml's
/// `get_scale_min_k4`.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 16 scales (still biased by 32, 0..=63) of a Q3_K block's packed `scales`.
#[inline]
pub fn scales_q3_k(q: &[u8; 12]) -> [u8; 16] {
    let mut s = [0u8; 16];
    for (j, v) in s.iter_mut().enumerate() {
        let lo = if j < 8 { q[j] & 0xf } else { q[j - 8] >> 4 };
        let hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        *v = lo | (hi << 4);
    }
    s
}

macro_rules! zeroed_default {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // Every field is a byte array: all-zero bytes are a valid (all-zero) block.
                *cast_blocks::<$t>(&[0u8; size_of::<$t>()]).expect("exact size")
                    .first()
                    .expect("one block")
            }
        }
    )*};
}
zeroed_default!(BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_K, BlockQ6_K, BlockQ8_K);

const _: () = assert!(size_of::<F16Le>() == 2);
const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);
const _: () = assert!(align_of::<BlockQ4_0>() == 1);
const _: () = assert!(align_of::<BlockQ4_1>() == 1);
const _: () = assert!(align_of::<BlockQ5_0>() == 1);
const _: () = assert!(align_of::<BlockQ5_1>() == 1);
const _: () = assert!(align_of::<BlockQ8_0>() == 1);
const _: () = assert!(align_of::<BlockQ8_1>() == 1);
const _: () = assert!(size_of::<BlockQ2_K>() == 84);
const _: () = assert!(size_of::<BlockQ3_K>() == 110);
const _: () = assert!(size_of::<BlockQ4_K>() == 144);
const _: () = assert!(size_of::<BlockQ5_K>() == 176);
const _: () = assert!(size_of::<BlockQ6_K>() == 210);
const _: () = assert!(size_of::<BlockQ8_K>() == 292);
const _: () = assert!(align_of::<BlockQ2_K>() == 1);
const _: () = assert!(align_of::<BlockQ3_K>() == 1);
const _: () = assert!(align_of::<BlockQ4_K>() == 1);
const _: () = assert!(align_of::<BlockQ5_K>() == 1);
const _: () = assert!(align_of::<BlockQ6_K>() == 1);
const _: () = assert!(align_of::<BlockQ8_K>() == 1);

mod sealed {
    pub trait Sealed {}
}

/// A block type that may be viewed from raw bytes.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have alignment 1 and no padding, and every bit pattern is a
/// valid value (they are made only of `u8`/`i8` arrays). The trait is sealed: only the blocks
/// in this module implement it.
pub unsafe trait Block: sealed::Sealed + Copy + 'static {
    /// Elements per block.
    const ELEMS: usize;
    /// Bytes per block (`size_of::<Self>()`).
    const BYTES: usize;
}

macro_rules! impl_block {
    ($elems:expr; $($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        // SAFETY: the type is repr(C), made only of byte arrays (asserted align 1 and exact
        // size above, so there is no padding), and any bytes form a valid value.
        unsafe impl Block for $t {
            const ELEMS: usize = $elems;
            const BYTES: usize = size_of::<$t>();
        }
    )*};
}
impl_block!(QK; BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1);
impl_block!(QK_K; BlockQ2_K, BlockQ3_K, BlockQ4_K, BlockQ5_K, BlockQ6_K, BlockQ8_K);

/// View bytes as blocks. `None` if the length is not a whole number of blocks.
pub fn cast_blocks<B: Block>(bytes: &[u8]) -> Option<&[B]> {
    if !bytes.len().is_multiple_of(B::BYTES) {
        return None;
    }
    let n = bytes.len() / B::BYTES;
    // SAFETY: `B` has alignment 1 and no padding and accepts any bit pattern (the `Block`
    // contract), and `n * B::BYTES == bytes.len()`, so the new slice covers exactly the same
    // initialised memory with the same lifetime.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), n) })
}

/// View bytes as mutable blocks. `None` if the length is not a whole number of blocks.
pub fn cast_blocks_mut<B: Block>(bytes: &mut [u8]) -> Option<&mut [B]> {
    if !bytes.len().is_multiple_of(B::BYTES) {
        return None;
    }
    let n = bytes.len() / B::BYTES;
    // SAFETY: as in `cast_blocks`; additionally any value written through the block view is
    // a valid byte sequence, and the exclusive borrow is carried over.
    Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), n) })
}

/// View blocks as their bytes (for writing a GGUF file).
pub fn blocks_as_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: `B` has no padding (the `Block` contract), so every byte is initialised; u8 has
    // alignment 1; the length is exactly the blocks' size in bytes.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), blocks.len() * B::BYTES) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cast_round_trip_and_odd_lengths() {
        let mut bytes = [0u8; 34 * 3 + 1];
        // Offset 1: an odd address must still work (alignment 1).
        let view = &mut bytes[1..];
        let blocks = cast_blocks_mut::<BlockQ8_0>(view).unwrap();
        assert_eq!(blocks.len(), 3);
        blocks[1].d = F16Le::from_f32(1.5);
        blocks[1].qs[31] = -3;
        assert_eq!(bytes[1 + 34], 0x00);
        assert_eq!(bytes[1 + 35], 0x3e); // 1.5 = 0x3e00
        assert_eq!(bytes[1 + 34 + 33] as i8, -3);
        assert!(cast_blocks::<BlockQ8_0>(&bytes[..34 * 2 + 1]).is_none());
        let b = cast_blocks::<BlockQ8_0>(&bytes[1..]).unwrap();
        assert_eq!(blocks_as_bytes(b), &bytes[1..]);
    }
}
