//! The scalar reference: the specification every SIMD path is tested against.
//!
//! Simple loops, no tricks. Quantizers follow ggml's reference quantizers
//! (`quantize_row_*_ref`) so a tensor we quantize has the same bytes llama.cpp would write;
//! dot products follow ggml's generic `vec_dot` (an exact integer sum per block, then one f32
//! multiply-add per block). Float dot products accumulate in f64, the most accurate cheap
//! answer, so a SIMD path is judged against something better than itself.
//!
//! The per-format functions take block slices and panic when the lengths do not match (a
//! programmer error); the byte-level [`quantize_row`]/[`dequantize_row`] check and return
//! [`KernelError`]s.
//!
//! The K-quants (Q2_K .. Q6_K, Q8_K) live in the `kquants` submodule, re-exported here. Their
//! dot products are the exception to "generic `vec_dot`": they reproduce the float arithmetic
//! of llama.cpp's x86 AVX2 kernels (see [`KOrder`]), so that the scalar path and the AVX2 path
//! give llama.cpp's results bit for bit.

mod kquants;

pub use kquants::{
    dequantize_q2_k, dequantize_q3_k, dequantize_q4_k, dequantize_q5_k, dequantize_q6_k,
    dequantize_q8_k, k_order, quantize_q2_k, quantize_q3_k, quantize_q4_k, quantize_q5_k,
    quantize_q6_k, quantize_q8_k, KOrder,
};
pub(crate) use kquants::{dot_k, k_order_fmt};

use crate::blocks::{
    cast_blocks, cast_blocks_mut, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1,
    F16Le, QK,
};
use crate::format::{DotShape, Fmt, SUPPORTED_ROWS};
use crate::{GgmlType, KernelError};
use half::f16;

// ---------------------------------------------------------------------------------------
// Scalar conversions
// ---------------------------------------------------------------------------------------

/// f32 -> bf16 bits, round to nearest even; NaN stays NaN (quiet), as ggml's
/// `GGML_FP32_TO_BF16`.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: keep sign and top payload bits, force the quiet bit so it cannot become Inf.
        return ((u >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((u >> 16) & 1);
    (u.wrapping_add(rounding) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline]
fn rd_f32(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

#[inline]
fn rd_u16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[2 * i], b[2 * i + 1]])
}

// ---------------------------------------------------------------------------------------
// Quantizers (ggml reference rounding)
// ---------------------------------------------------------------------------------------

/// The element of largest magnitude, with its sign (first one wins on ties).
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

#[inline]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Q4_0: `d = max / -8` where `max` is the signed value of largest magnitude, so that value
/// maps exactly to q = 0 and the other side gets the extra level; `q = min(15, trunc(x/d + 8.5))`.
pub fn quantize_q4_0(x: &[f32], y: &mut [BlockQ4_0]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q4_0: length mismatch");
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = signed_absmax(xb) / -8.0;
        let id = inv(d);
        yb.d = F16Le::from_f32(d);
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            yb.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Q4_1: `d = (max - min) / 15`, `m = min`, `q = min(15, trunc((x - min)/d + 0.5))`.
pub fn quantize_q4_1(x: &[f32], y: &mut [BlockQ4_1]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q4_1: length mismatch");
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 15.0;
        let id = inv(d);
        yb.d = F16Le::from_f32(d);
        yb.m = F16Le::from_f32(min);
        for j in 0..QK / 2 {
            let q0 = (((xb[j] - min) * id + 0.5) as i8).min(15) as u8;
            let q1 = (((xb[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
            yb.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Q5_0: as Q4_0 with `d = max / -16`, q in 0..=31, the 5th bits gathered into `qh`.
pub fn quantize_q5_0(x: &[f32], y: &mut [BlockQ5_0]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q5_0: length mismatch");
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let d = signed_absmax(xb) / -16.0;
        let id = inv(d);
        yb.d = F16Le::from_f32(d);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 16.5) as i8).min(31) as u8;
            let q1 = ((xb[j + QK / 2] * id + 16.5) as i8).min(31) as u8;
            yb.qs[j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= ((q0 as u32 >> 4) & 1) << j;
            qh |= ((q1 as u32 >> 4) & 1) << (j + QK / 2);
        }
        yb.qh = qh.to_le_bytes();
    }
}

/// Q5_1: as Q4_1 with `d = (max - min) / 31`, q in 0..=31.
pub fn quantize_q5_1(x: &[f32], y: &mut [BlockQ5_1]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q5_1: length mismatch");
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (min, max) = min_max(xb);
        let d = (max - min) / 31.0;
        let id = inv(d);
        yb.d = F16Le::from_f32(d);
        yb.m = F16Le::from_f32(min);
        let mut qh = 0u32;
        for j in 0..QK / 2 {
            let q0 = (((xb[j] - min) * id + 0.5) as u8).min(31);
            let q1 = (((xb[j + QK / 2] - min) * id + 0.5) as u8).min(31);
            yb.qs[j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
            qh |= ((q0 as u32 >> 4) & 1) << j;
            qh |= ((q1 as u32 >> 4) & 1) << (j + QK / 2);
        }
        yb.qh = qh.to_le_bytes();
    }
}

/// Q8_0: `d = absmax / 127`, `q = round(x / d)` (half away from zero), computed as
/// `x * (1/d)` like ggml.
pub fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q8_0: length mismatch");
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inv(d);
        yb.d = F16Le::from_f32(d);
        for j in 0..QK {
            yb.qs[j] = (xb[j] * id).round() as i8;
        }
    }
}

/// Q8_0/Q8_1 for *activations* the way ggml-cpu's x86 quantizer does it (which the llama.cpp
/// references were made with): `id = 127 / absmax` and round half to even, instead of the
/// weight quantizer's `1 / (absmax / 127)` and half away from zero. The two differ only on rare
/// ties, but a micro model amplifies such differences, so activations follow llama.cpp's
/// arithmetic exactly.
pub fn quantize_act_q8(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for j in 0..QK {
        let q = (x[j] * id).round_ties_even() as i8;
        qs[j] = q;
        sum += q as i32;
    }
    (d, sum)
}

/// Activation quantization of a row (see [`quantize_act_q8`]); other formats as
/// [`quantize_row`].
pub fn quantize_act_row(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    match ty {
        GgmlType::Q8_0 => {
            check_row(ty, x.len(), out.len(), "quantize_act_row output bytes")?;
            let y: &mut [BlockQ8_0] = blocks_mut(out);
            for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
                let (d, _) = quantize_act_q8(xb, &mut yb.qs);
                yb.d = F16Le::from_f32(d);
            }
            Ok(())
        }
        GgmlType::Q8_1 => {
            check_row(ty, x.len(), out.len(), "quantize_act_row output bytes")?;
            let y: &mut [BlockQ8_1] = blocks_mut(out);
            for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
                let (d, sum) = quantize_act_q8(xb, &mut yb.qs);
                yb.d = F16Le::from_f32(d);
                yb.s = F16Le::from_f32(sum as f32 * d);
            }
            Ok(())
        }
        _ => quantize_row(ty, x, out),
    }
}

/// Q8_1: as Q8_0, plus `s = d * sum(q)` (f32 `d`, rounded to f16 once).
pub fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), y.len() * QK, "quantize_q8_1: length mismatch");
    for (xb, yb) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inv(d);
        yb.d = F16Le::from_f32(d);
        let mut sum = 0i32;
        for j in 0..QK {
            let q = (xb[j] * id).round() as i8;
            yb.qs[j] = q;
            sum += q as i32;
        }
        yb.s = F16Le::from_f32(sum as f32 * d);
    }
}

// ---------------------------------------------------------------------------------------
// Dequantizers
// ---------------------------------------------------------------------------------------

/// Element `j` of a 4-bit block (0..=15).
#[inline]
fn nib(qs: &[u8; 16], j: usize) -> u8 {
    if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    }
}

/// Element `j` of a 5-bit block (0..=31).
#[inline]
fn q5(qs: &[u8; 16], qh: [u8; 4], j: usize) -> u8 {
    let hi = ((u32::from_le_bytes(qh) >> j) & 1) as u8;
    nib(qs, j) | (hi << 4)
}

/// Q4_0 -> f32: `(q - 8) * d`.
pub fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK, "dequantize_q4_0: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = xb.d.to_f32();
        for j in 0..QK {
            yb[j] = (nib(&xb.qs, j) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1 -> f32: `q * d + m`.
pub fn dequantize_q4_1(x: &[BlockQ4_1], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK, "dequantize_q4_1: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (xb.d.to_f32(), xb.m.to_f32());
        for j in 0..QK {
            yb[j] = nib(&xb.qs, j) as f32 * d + m;
        }
    }
}

/// Q5_0 -> f32: `(q - 16) * d`.
pub fn dequantize_q5_0(x: &[BlockQ5_0], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK, "dequantize_q5_0: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = xb.d.to_f32();
        for j in 0..QK {
            yb[j] = (q5(&xb.qs, xb.qh, j) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1 -> f32: `q * d + m`.
pub fn dequantize_q5_1(x: &[BlockQ5_1], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK, "dequantize_q5_1: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (xb.d.to_f32(), xb.m.to_f32());
        for j in 0..QK {
            yb[j] = q5(&xb.qs, xb.qh, j) as f32 * d + m;
        }
    }
}

/// Q8_0 -> f32: `q * d`.
pub fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK, "dequantize_q8_0: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = xb.d.to_f32();
        for j in 0..QK {
            yb[j] = xb.qs[j] as f32 * d;
        }
    }
}

/// Q8_1 -> f32: `q * d` (`s` is redundant).
pub fn dequantize_q8_1(x: &[BlockQ8_1], y: &mut [f32]) {
    assert_eq!(y.len(), x.len() * QK, "dequantize_q8_1: length mismatch");
    for (xb, yb) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = xb.d.to_f32();
        for j in 0..QK {
            yb[j] = xb.qs[j] as f32 * d;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dot products (weights x activations in vec_dot_type)
// ---------------------------------------------------------------------------------------

/// Q4_0 x Q8_0: per block the exact integer `sum((q_w - 8) * q_a)`, times `d_w * d_a`.
pub fn vec_dot_q4_0_q8_0(w: &[BlockQ4_0], a: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot_q4_0_q8_0: block counts differ");
    let mut sum = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let sumi: i32 = (0..QK)
            .map(|j| (nib(&wb.qs, j) as i32 - 8) * ab.qs[j] as i32)
            .sum();
        sum += (wb.d.to_f32() * ab.d.to_f32()) * sumi as f32;
    }
    sum
}

/// Q4_1 x Q8_1: `d_w * d_a * sum(q_w * q_a) + m_w * s_a` per block.
pub fn vec_dot_q4_1_q8_1(w: &[BlockQ4_1], a: &[BlockQ8_1]) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot_q4_1_q8_1: block counts differ");
    let mut sum = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let sumi: i32 = (0..QK)
            .map(|j| nib(&wb.qs, j) as i32 * ab.qs[j] as i32)
            .sum();
        sum += (wb.d.to_f32() * ab.d.to_f32()) * sumi as f32 + wb.m.to_f32() * ab.s.to_f32();
    }
    sum
}

/// Q5_0 x Q8_0: per block `sum((q_w - 16) * q_a) * d_w * d_a`.
pub fn vec_dot_q5_0_q8_0(w: &[BlockQ5_0], a: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot_q5_0_q8_0: block counts differ");
    let mut sum = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let sumi: i32 = (0..QK)
            .map(|j| (q5(&wb.qs, wb.qh, j) as i32 - 16) * ab.qs[j] as i32)
            .sum();
        sum += (wb.d.to_f32() * ab.d.to_f32()) * sumi as f32;
    }
    sum
}

/// Q5_1 x Q8_1: `d_w * d_a * sum(q_w * q_a) + m_w * s_a` per block.
pub fn vec_dot_q5_1_q8_1(w: &[BlockQ5_1], a: &[BlockQ8_1]) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot_q5_1_q8_1: block counts differ");
    let mut sum = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let sumi: i32 = (0..QK)
            .map(|j| q5(&wb.qs, wb.qh, j) as i32 * ab.qs[j] as i32)
            .sum();
        sum += (wb.d.to_f32() * ab.d.to_f32()) * sumi as f32 + wb.m.to_f32() * ab.s.to_f32();
    }
    sum
}

/// Q8_0 x Q8_0: per block `sum(q_w * q_a) * d_w * d_a`.
pub fn vec_dot_q8_0_q8_0(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), a.len(), "vec_dot_q8_0_q8_0: block counts differ");
    let mut sum = 0.0f32;
    for (wb, ab) in w.iter().zip(a) {
        let sumi: i32 = (0..QK).map(|j| wb.qs[j] as i32 * ab.qs[j] as i32).sum();
        sum += (wb.d.to_f32() * ab.d.to_f32()) * sumi as f32;
    }
    sum
}

/// f32 dot product, accumulated in f64 (each product is exact in f64).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum::<f64>() as f32
}

/// f16 x f32 dot product, accumulated in f64.
pub fn dot_f16_f32(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16_f32: lengths differ");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x.to_f64() * y as f64)
        .sum::<f64>() as f32
}

/// `y += a * x`.
pub fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len(), "axpy_f32: lengths differ");
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `y += a * x` with `x` in f16.
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    assert_eq!(y.len(), x.len(), "axpy_f16: lengths differ");
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi.to_f32();
    }
}

/// f32 -> f16, round to nearest even.
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(s);
    }
}

/// f16 -> f32 (exact).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32: lengths differ");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

// ---------------------------------------------------------------------------------------
// Byte-level rows (what the model and the GGUF writer use)
// ---------------------------------------------------------------------------------------

/// Check a (type, element count, byte count) triple for quantize/dequantize.
pub(crate) fn check_row(
    ty: GgmlType,
    n: usize,
    n_bytes: usize,
    what: &'static str,
) -> Result<Fmt, KernelError> {
    let f = Fmt::of(ty).ok_or_else(|| KernelError::Unsupported {
        ty: ty.name(),
        supported: SUPPORTED_ROWS.to_string(),
    })?;
    let be = f.block_elems();
    if !n.is_multiple_of(be) {
        return Err(KernelError::BadLength {
            what: "row length in elements (must be a multiple of the block size)",
            expected: n.div_ceil(be) * be,
            got: n,
        });
    }
    let expected = (n / be)
        .checked_mul(f.block_bytes())
        .ok_or(KernelError::BadLength {
            what: "row length in elements (byte size overflows)",
            expected: 0,
            got: n,
        })?;
    if n_bytes != expected {
        return Err(KernelError::BadLength {
            what,
            expected,
            got: n_bytes,
        });
    }
    Ok(f)
}

/// Quantize (or convert) `x` into `out`, which must be exactly `row_size(ty, x.len())` bytes.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), KernelError> {
    let f = check_row(ty, x.len(), out.len(), "quantize_row output bytes")?;
    // The casts cannot fail: check_row proved out.len() is a whole number of blocks.
    match f {
        Fmt::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Fmt::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
        Fmt::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        Fmt::Q4_0 => quantize_q4_0(x, blocks_mut(out)),
        Fmt::Q4_1 => quantize_q4_1(x, blocks_mut(out)),
        Fmt::Q5_0 => quantize_q5_0(x, blocks_mut(out)),
        Fmt::Q5_1 => quantize_q5_1(x, blocks_mut(out)),
        Fmt::Q8_0 => quantize_q8_0(x, blocks_mut(out)),
        Fmt::Q8_1 => quantize_q8_1(x, blocks_mut(out)),
        Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K | Fmt::Q8_K => {
            kquants::quantize_row_k(f, x, out, None)
        }
    }
    Ok(())
}

/// Quantize one matrix row `x` as `llama-quantize` does, optionally under an importance matrix:
/// `importance` holds one weight per element of the row (the imatrix entries of the row's
/// columns). Without it this is [`quantize_row`]; with it the K-quants and Q4_0/Q4_1/Q5_0/Q5_1
/// use ggml's `quantize_row_*_impl` searches (which also use the mean square of the whole row,
/// so `x` must be a full row, not a piece of one). Formats without an importance-aware
/// quantizer in ggml (F32, F16, BF16, Q8_0, Q8_1, Q8_K) ignore the weights, as ggml does.
pub fn quantize_row_weighted(
    ty: GgmlType,
    x: &[f32],
    importance: Option<&[f32]>,
    out: &mut [u8],
) -> Result<(), KernelError> {
    let f = check_row(ty, x.len(), out.len(), "quantize_row_weighted output bytes")?;
    kquants::check_weights(importance, x.len())?;
    match (f, importance) {
        (Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K, Some(_)) => {
            kquants::quantize_row_k(f, x, out, importance);
            Ok(())
        }
        (Fmt::Q4_0 | Fmt::Q4_1 | Fmt::Q5_0 | Fmt::Q5_1, Some(w)) => {
            kquants::quantize_legacy_weighted(f, x, out, w);
            Ok(())
        }
        _ => quantize_row(ty, x, out),
    }
}

/// Dequantize (or convert) `x` (exactly `row_size(ty, out.len())` bytes) into `out`.
pub fn dequantize_row(ty: GgmlType, x: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let f = check_row(ty, out.len(), x.len(), "dequantize_row input bytes")?;
    match f {
        Fmt::F32 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = rd_f32(x, i);
            }
        }
        Fmt::F16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = f16::from_bits(rd_u16(x, i)).to_f32();
            }
        }
        Fmt::BF16 => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = bf16_to_f32(rd_u16(x, i));
            }
        }
        Fmt::Q4_0 => dequantize_q4_0(blocks(x), out),
        Fmt::Q4_1 => dequantize_q4_1(blocks(x), out),
        Fmt::Q5_0 => dequantize_q5_0(blocks(x), out),
        Fmt::Q5_1 => dequantize_q5_1(blocks(x), out),
        Fmt::Q8_0 => dequantize_q8_0(blocks(x), out),
        Fmt::Q8_1 => dequantize_q8_1(blocks(x), out),
        Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K | Fmt::Q8_K => {
            kquants::dequantize_row_k(f, x, out)
        }
    }
    Ok(())
}

/// Dot product of one weight row of `n` elements (`w`, in `w_ty`) with one activation row
/// (`act`, in `vec_dot_type(w_ty)`). Only the first `row_size` bytes of each are read.
///
/// # Panics
/// If `w_ty` has no dot kernel, `n` is not a multiple of its block size, or a slice is short.
pub fn vec_dot(w_ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    let s = DotShape::new(w_ty, n);
    assert!(
        w.len() >= s.w_row,
        "vec_dot: weight row has {} bytes, need {}",
        w.len(),
        s.w_row
    );
    assert!(
        act.len() >= s.a_row,
        "vec_dot: activation has {} bytes, need {}",
        act.len(),
        s.a_row
    );
    let (w, act) = (&w[..s.w_row], &act[..s.a_row]);
    match s.w {
        Fmt::F32 => (0..n)
            .map(|i| rd_f32(w, i) as f64 * rd_f32(act, i) as f64)
            .sum::<f64>() as f32,
        Fmt::F16 => (0..n)
            .map(|i| f16::from_bits(rd_u16(w, i)).to_f64() * rd_f32(act, i) as f64)
            .sum::<f64>() as f32,
        Fmt::BF16 => (0..n)
            .map(|i| bf16_to_f32(rd_u16(w, i)) as f64 * rd_f32(act, i) as f64)
            .sum::<f64>() as f32,
        Fmt::Q4_0 => vec_dot_q4_0_q8_0(blocks(w), blocks(act)),
        Fmt::Q4_1 => vec_dot_q4_1_q8_1(blocks(w), blocks(act)),
        Fmt::Q5_0 => vec_dot_q5_0_q8_0(blocks(w), blocks(act)),
        Fmt::Q5_1 => vec_dot_q5_1_q8_1(blocks(w), blocks(act)),
        Fmt::Q8_0 => vec_dot_q8_0_q8_0(blocks(w), blocks(act)),
        Fmt::Q2_K | Fmt::Q3_K | Fmt::Q4_K | Fmt::Q5_K | Fmt::Q6_K => {
            dot_k(s.w, k_order_fmt(s.w, 1, 0), w, act)
        }
        Fmt::Q8_1 | Fmt::Q8_K => unreachable!("DotShape rejects activation-only formats"),
    }
}

/// `out[c * out_stride + r] = dot(w row r, act column c)`, the scalar twin of
/// [`crate::Kernels::gemm`] (same argument contract). For every format but the K-quants this
/// is a loop of [`vec_dot`]; for the K-quants each column is accumulated in the order
/// llama.cpp uses for a matmul of `n_cols` columns ([`k_order`]), which is why `n_cols` must
/// be the whole batch.
///
/// # Panics
/// As `Kernels::gemm`.
pub fn gemm(
    w_ty: GgmlType,
    k: usize,
    w: &[u8],
    n_rows: usize,
    act: &[u8],
    n_cols: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let s = DotShape::new(w_ty, k);
    assert!(w.len() >= n_rows * s.w_row, "gemm: weights too short");
    assert!(act.len() >= n_cols * s.a_row, "gemm: activations too short");
    for c in 0..n_cols {
        let a = &act[c * s.a_row..(c + 1) * s.a_row];
        for r in 0..n_rows {
            let wr = &w[r * s.w_row..(r + 1) * s.w_row];
            out[c * out_stride + r] = if s.w.is_k_weight() {
                dot_k(s.w, k_order_fmt(s.w, n_cols, c), wr, a)
            } else {
                vec_dot(w_ty, k, wr, a)
            };
        }
    }
}

/// `cast_blocks` for lengths already proven whole.
#[inline]
pub(crate) fn blocks<B: crate::blocks::Block>(b: &[u8]) -> &[B] {
    cast_blocks(b).expect("length checked to be a whole number of blocks")
}

#[inline]
pub(crate) fn blocks_mut<B: crate::blocks::Block>(b: &mut [u8]) -> &mut [B] {
    cast_blocks_mut(b).expect("length checked to be a whole number of blocks")
}

/// Dot product of two f16 vectors in ggml-cpu's x86 order: four 8-lane f32 accumulators fed by
/// fused multiply-adds over steps of 32 elements, reduced (0+2, 1+3, 0+1, then the two halves
/// and two pairwise adds), and a tail summed in f64. Flash attention's `K·Q` uses this, and the
/// same order on every path keeps results bit-identical to llama.cpp's.
pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: lengths differ");
    let n = a.len();
    let np = n & !31;
    let mut sum = [[0.0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, acc) in sum.iter_mut().enumerate() {
            for (l, v) in acc.iter_mut().enumerate() {
                let k = i + j * 8 + l;
                *v = a[k].to_f32().mul_add(b[k].to_f32(), *v);
            }
        }
    }
    let r = reduce_4x8(sum);
    let mut sumf = r as f64;
    for k in np..n {
        sumf += (a[k].to_f32() * b[k].to_f32()) as f64;
    }
    sumf as f32
}

/// ggml's `GGML_F32x8_REDUCE` on four accumulators.
pub(crate) fn reduce_4x8(mut s: [[f32; 8]; 4]) -> f32 {
    for l in 0..8 {
        s[0][l] += s[2][l];
        s[1][l] += s[3][l];
    }
    for l in 0..8 {
        s[0][l] += s[1][l];
    }
    let t0 = [
        s[0][0] + s[0][4],
        s[0][1] + s[0][5],
        s[0][2] + s[0][6],
        s[0][3] + s[0][7],
    ];
    (t0[0] + t0[1]) + (t0[2] + t0[3])
}

// Constants of the vectorizable expf below (hex-float values in the comments).
pub(crate) mod expc {
    pub const SHIFT: u32 = 0x4b40_0000; // 0x1.8p23: adding it rounds to an integer
    pub const LOG2E: u32 = 0x3fb8_aa3b; // 0x1.715476p+0
    pub const LN2_LO: u32 = 0x35bf_be8e; // 0x1.7f7d1cp-20
    pub const LN2_HI: u32 = 0x3f31_7200; // 0x1.62e4p-1
    pub const C5: u32 = 0x3c07_2010; // 0x1.0e4020p-7
    pub const C4: u32 = 0x3d2b_9f17; // 0x1.573e2ep-5
    pub const C3: u32 = 0x3e2a_af33; // 0x1.555e66p-3
    pub const C2: u32 = 0x3eff_fedb; // 0x1.fffdb6p-2
    pub const C1: u32 = 0x3f7f_fff6; // 0x1.ffffecp-1
}

fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// `exp(x)` by the branch-free algorithm ggml-cpu vectorizes on x86 (range reduction by
/// ln 2 with a round-to-nearest shift, a degree-5 polynomial, scale by 2^n with special
/// handling when |n| > 126), evaluated lane by lane with the same fused operations so that
/// it is bit-identical to the SIMD version. It is not correctly rounded; it is *llama.cpp's*.
pub fn expf_vec(x: f32) -> f32 {
    use expc::*;
    let r = c(SHIFT);
    let z = x.mul_add(c(LOG2E), r);
    let n = z - r;
    let b = (-n).mul_add(c(LN2_LO), (-n).mul_add(c(LN2_HI), x));
    let e = z.to_bits().wrapping_shl(23);
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let big = n.abs() > 126.0;
    let u = b * b;
    let j = c(C5)
        .mul_add(b, c(C4))
        .mul_add(u, c(C3).mul_add(b, c(C2)))
        .mul_add(u, c(C1) * b);
    if !big {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// Rotary position embedding of one row: every `head_dim`-wide head of `x` has its first
/// `2 * cos.len()` dimensions rotated, pair `i` by the angle whose cosine and sine are
/// `cos[i]`, `sin[i]`. The pairs are `(2i, 2i + 1)`, or with `neox` `(i, i + cos.len())`.
/// `x0' = fma(x0, c, -(x1 s))`, `x1' = fma(x0, s, x1 c)`: ggml's rounding.
pub fn rope(x: &mut [f32], head_dim: usize, neox: bool, cos: &[f32], sin: &[f32]) {
    let h = cos.len();
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..h {
            let (a, b) = if neox { (i, i + h) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
            head[b] = x0.mul_add(sin[i], x1 * cos[i]);
        }
    }
}

/// `gate[i] = silu(gate[i]) * up[i]` with `silu(x) = x / (1 + expf_vec(-x))`, in 8-element
/// groups; a tail shorter than 8 uses the libm `exp` like ggml's scalar remainder.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "swiglu: lengths differ");
    let n8 = gate.len() / 8 * 8;
    for (g, &u) in gate[..n8].iter_mut().zip(&up[..n8]) {
        let x = *g;
        *g = (x / (1.0 + expf_vec(0.0 - x))) * u;
    }
    for (g, &u) in gate[n8..].iter_mut().zip(&up[n8..]) {
        let x = *g;
        *g = x / (1.0 + (-x).exp()) * u;
    }
}

/// Attention of one query over `n_kv` cached rows with the numerics of ggml-cpu's flash
/// attention (the path llama.cpp takes on CPU): K·Q by [`dot_f16`] with Q already in f16, an
/// online softmax updated key by key, and the weighted sum of V kept *in f16* (rounded after
/// every rescale and every update), divided by the sum at the end.
///
/// With `softcap > 0` (Gemma 2) a score is `softcap * tanh(dot * scale / softcap)`.
///
/// Key `j` is `keys[j * k_stride..][..q16.len()]`, value `j` is `values[j * v_stride..][..out.len()]`.
pub fn attention_f16(
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
    assert!(
        n_kv == 0 || keys.len() >= (n_kv - 1) * k_stride + dk,
        "attention_f16: keys too short"
    );
    assert!(
        n_kv == 0 || values.len() >= (n_kv - 1) * v_stride + dv,
        "attention_f16: values too short"
    );
    let rnd = |x: f32| f16::from_f32(x).to_f32();
    out.fill(0.0); // holds f16-representable values throughout
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    for j in 0..n_kv {
        let s = softcap_score(
            dot_f16(&keys[j * k_stride..j * k_stride + dk], q16),
            scale,
            softcap,
        );
        let v = &values[j * v_stride..j * v_stride + dv];
        let (mut ms, mut vs) = (1.0f32, 1.0f32);
        if s > m {
            ms = (m - s).exp();
            m = s;
            for o in out.iter_mut() {
                *o = rnd(*o * ms);
            }
        } else {
            vs = (s - m).exp();
        }
        for (o, x) in out.iter_mut().zip(v) {
            *o = rnd(x.to_f32().mul_add(vs, *o));
        }
        l = l.mul_add(ms, vs);
    }
    let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Attention of several query rows (`q`: `last.len()` rows of `dk`) over shared f16 keys and
/// values: row `r` sees keys `first..=last[r]` (`first = last[r] + 1 - window` when
/// `window > 0`, else 0) and gets `softmax(softcap_score(q·k)) · v` in `out` (rows of `dv`).
/// The specification of `Kernels::attention_rows`: plain f32 scores, a max-subtracted
/// softmax, f32 sums. A row that sees no key gets zeros.
pub fn attention_rows(
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
    // Row by row: the whole key range, then the division by the sum of exponentials.
    for (r, l) in last.iter().enumerate() {
        let o = &mut out[r * dv..(r + 1) * dv];
        let mut ml = [0.0f32; 2];
        attention_rows_part(
            &q[r * dk..(r + 1) * dk],
            dk,
            std::slice::from_ref(l),
            window,
            keys,
            k_stride,
            values,
            v_stride,
            scale,
            softcap,
            0,
            usize::MAX,
            o,
            dv,
            &mut ml,
        );
        let inv = if ml[1] == 0.0 { 0.0 } else { 1.0 / ml[1] };
        for ov in o.iter_mut() {
            *ov *= inv;
        }
    }
}

/// The specification of `Kernels::attention_rows_part`: [`attention_rows`] restricted to the
/// keys `keys_from..keys_to`, without the final division. Row `r` sees the keys of
/// `first..=last[r]` that lie in the range; with `s_j` their scores, it gets
/// `ml[2r] = m = max s_j`, `ml[2r + 1] = l = sum exp(s_j - m)` and `out` row
/// `sum exp(s_j - m) · v_j`. A row that sees no key gets `m = -inf`, `l = 0` and zeros.
/// [`attention_merge`] combines the parts of a key range split this way.
pub fn attention_rows_part(
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
    for (r, &l) in last.iter().enumerate() {
        let l = l as usize;
        let first = if window > 0 {
            (l + 1).saturating_sub(window)
        } else {
            0
        };
        let (a, b) = (first.max(keys_from), (l + 1).min(keys_to));
        let qr = &q[r * dk..(r + 1) * dk];
        let scores: Vec<f32> = (a..b.max(a))
            .map(|j| {
                let k = &keys[j * k_stride..j * k_stride + dk];
                let dot: f32 = qr.iter().zip(k).map(|(x, y)| x * y.to_f32()).sum();
                softcap_score(dot, scale, softcap)
            })
            .collect();
        let m = scores.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
        let o = &mut out[r * dv..(r + 1) * dv];
        o.fill(0.0);
        let mut sum = 0.0f32;
        for (i, s) in scores.iter().enumerate() {
            let p = (s - m).exp();
            sum += p;
            let v = &values[(a + i) * v_stride..(a + i) * v_stride + dv];
            for (ov, vv) in o.iter_mut().zip(v) {
                *ov += p * vv.to_f32();
            }
        }
        ml[2 * r] = m;
        ml[2 * r + 1] = sum;
    }
}

/// Combines the partial results of [`attention_rows_part`] over disjoint key ranges into the
/// attention over their union: `parts` holds `n_parts` blocks of `n_rows * (dv + 2)` floats,
/// each the part's `out` (`n_rows` rows of `dv`) followed by its `ml` (`2 * n_rows`). With
/// `M = max m_p`, row `r` of `out` is `sum_p exp(m_p - M) o_p / sum_p exp(m_p - M) l_p`
/// (zeros when no part saw a key).
pub fn attention_merge(parts: &[f32], n_rows: usize, dv: usize, out: &mut [f32]) {
    let stride = n_rows * (dv + 2);
    let n_parts = parts.len() / stride;
    for r in 0..n_rows {
        let ml = |p: usize| {
            let b = p * stride + n_rows * dv + 2 * r;
            (parts[b], parts[b + 1])
        };
        let m = (0..n_parts).fold(f32::NEG_INFINITY, |a, p| a.max(ml(p).0));
        let o = &mut out[r * dv..(r + 1) * dv];
        o.fill(0.0);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let mut sum = 0.0f32;
        for p in 0..n_parts {
            let (mp, lp) = ml(p);
            if mp == f32::NEG_INFINITY {
                continue;
            }
            let c = (mp - m).exp();
            sum += c * lp;
            let src = &parts[p * stride + r * dv..p * stride + (r + 1) * dv];
            for (ov, &s) in o.iter_mut().zip(src) {
                *ov += c * s;
            }
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        for ov in o.iter_mut() {
            *ov *= inv;
        }
    }
}

/// A flash-attention score: `dot * scale`, or with soft-capping `cap * tanh(dot * (scale / cap))`
/// (ggml folds 1/cap into the scale first).
#[inline]
pub fn softcap_score(dot: f32, scale: f32, softcap: f32) -> f32 {
    if softcap != 0.0 {
        softcap * (dot * (scale / softcap)).tanh()
    } else {
        dot * scale
    }
}

/// GELU (tanh approximation) of an f32, the formula ggml tabulates.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044_715;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh())
}

/// GELU of every f16 value, as f16 bits: ggml-cpu evaluates GELU through such a table (the
/// input rounded to f16, the result rounded to f16), so GeGLU matches llama.cpp only this way.
/// The GELU of every f16 value as f16 bits, indexed by the argument's bits; one extra zero
/// entry at the end so a 4-byte read at any index stays inside (the AVX2 gather).
pub(crate) fn gelu_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_f32(gelu_tanh(f16::from_bits(b).to_f32())).to_bits())
            .chain([0])
            .collect()
    })
}

/// `gate[i] = gelu(gate[i]) * up[i]` (GeGLU, Gemma), ggml's table-driven GELU: 0 below -10,
/// identity above 10, else the f16 table.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "geglu: lengths differ");
    let table = gelu_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            f16::from_bits(table[f16::from_f32(x).to_bits() as usize]).to_f32() * u
        };
    }
}

/// The wrapping sum of `data`'s little-endian u64 words (whole words only; trailing bytes
/// are ignored), four running sums so the additions do not serialise: the memory read
/// bandwidth probe's portable loop, and the specification of the SIMD one.
pub fn stream_sum(data: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut quads = data.chunks_exact(32);
    for q in &mut quads {
        for (a, w) in acc.iter_mut().zip(q.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    for w in quads.remainder().chunks_exact(8) {
        acc[0] = acc[0].wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    acc.iter().fold(0u64, |s, v| s.wrapping_add(*v))
}
