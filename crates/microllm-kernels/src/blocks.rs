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

use half::f16;
use std::mem::{align_of, size_of};

/// Elements per block of every format in this module.
pub const QK: usize = 32;

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
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        // SAFETY: the type is repr(C), made only of byte arrays (asserted align 1 and exact
        // size above, so there is no padding), and any bytes form a valid value.
        unsafe impl Block for $t {
            const ELEMS: usize = QK;
            const BYTES: usize = size_of::<$t>();
        }
    )*};
}
impl_block!(BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1);

/// View bytes as blocks. `None` if the length is not a whole number of blocks.
pub fn cast_blocks<B: Block>(bytes: &[u8]) -> Option<&[B]> {
    if bytes.len() % B::BYTES != 0 {
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
    if bytes.len() % B::BYTES != 0 {
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
