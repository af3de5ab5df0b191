//! Shared helpers for the kernel tests: a seeded generator and the named tolerances.
#![allow(dead_code)]

use microllm_kernels::{GgmlType, KernelPath, Kernels};

pub mod llama_gen;

/// Every format with a dot kernel, as weights.
pub const WEIGHT_TYPES: [GgmlType; 8] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Every format quantize_row/dequantize_row accept.
pub const ROW_TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
];

/// The K-quant weight formats (Q8_K activations).
pub const K_TYPES: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];
/// Row lengths for the K-quants: 256 x {1, 2, 3, 7, 9} super-blocks.
pub const K_LENS: [usize; 5] = [256, 512, 768, 256 * 7, 256 * 9];

/// Row lengths for the block formats (multiples of 32, odd block counts included).
pub const BLOCK_LENS: [usize; 6] = [32, 64, 96, 32 * 7, 32 * 17, 32 * 33];
/// Lengths for the element-wise helpers: every tail length of an 8/32-wide loop.
pub const ELEM_LENS: [usize; 20] = [
    0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 63, 64, 65, 100, 257, 1000,
];

/// A SIMD dot product may differ from the reference only by f32 accumulation order: error
/// relative to sum(|w_i * a_i|) (a condition-number-free bound), with n up to ~1000 terms.
pub const DOT_REL_TOL: f64 = 2e-6;
/// axpy: the SIMD path fuses the multiply-add (one rounding), the reference rounds twice.
pub const AXPY_REL_TOL: f64 = 2.0 * f32::EPSILON as f64;

/// Deterministic xorshift64* generator, so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// Roughly normal (sum of uniforms), mean 0, std ~1.
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 0.866
    }
    /// A vector of normals times `scale`, with an occasional outlier like real activations.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = self.normal() * scale;
                if i % 97 == 13 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Row size in bytes of `n` elements.
pub fn row_size(ty: GgmlType, n: usize) -> usize {
    ty.row_size(n as u64).expect("whole blocks") as usize
}

/// The AVX2 table, or None (with a message) when this CPU cannot run it.
pub fn avx2() -> Option<Kernels> {
    match Kernels::with_path(KernelPath::Avx2) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIP avx2 comparison: {e}");
            None
        }
    }
}

pub fn scalar() -> Kernels {
    Kernels::with_path(KernelPath::Scalar).unwrap()
}

/// The AVX2 + AVX-512 VNNI table, or None (with a message) when this CPU cannot run it.
pub fn vnni() -> Option<Kernels> {
    match Kernels::with_path(KernelPath::Avx2Vnni) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIP avx2vnni comparison: {e}");
            None
        }
    }
}

/// Every available path (scalar first).
pub fn all_paths() -> Vec<Kernels> {
    let mut v = vec![scalar()];
    v.extend(avx2());
    v.extend(vnni());
    v
}

/// Quantize `x` for type `ty` with the reference.
pub fn quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; row_size(ty, x.len())];
    microllm_kernels::reference::quantize_row(ty, x, &mut out).unwrap();
    out
}

/// Dequantize with the reference.
pub fn dequant(ty: GgmlType, x: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    microllm_kernels::reference::dequantize_row(ty, x, &mut out).unwrap();
    out
}

/// sum(|a_i * b_i|) in f64, the scale against which dot errors are measured.
pub fn abs_dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 * *y as f64).abs())
        .sum()
}

/// Weight bytes with random quant payloads but finite, modest f16 scales (as in real files):
/// exercises every nibble/qh bit pattern, including -128 in Q8_0.
pub fn random_weight_bytes(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let mut b = rng.bytes(row_size(ty, n));
    // (block bytes, byte offsets of the f16 scale fields)
    let (bs, fields): (usize, &[usize]) = match ty {
        GgmlType::Q4_0 => (18, &[0]),
        GgmlType::Q4_1 => (20, &[0, 2]),
        GgmlType::Q5_0 => (22, &[0]),
        GgmlType::Q5_1 => (24, &[0, 2]),
        GgmlType::Q8_0 => (34, &[0]),
        GgmlType::Q2_K => (84, &[80, 82]),
        GgmlType::Q3_K => (110, &[108]),
        GgmlType::Q4_K => (144, &[0, 2]),
        GgmlType::Q5_K => (176, &[0, 2]),
        GgmlType::Q6_K => (210, &[208]),
        GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => {
            // Float weights: random normals rather than random bit patterns (NaN/Inf).
            let v = rng.vec(n, 0.5);
            return quant(ty, &v);
        }
        _ => unreachable!(),
    };
    for blk in b.chunks_exact_mut(bs) {
        for &f in fields {
            let v = half::f16::from_f32(rng.uniform() * 0.05);
            blk[f..f + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    b
}
