//! The deterministic inputs of `tools/fixtures/kquant_dot.cpp`, regenerated bit for bit (the
//! float conversion is exact and the few float operations are the same, unfused, in both).
#![allow(dead_code)]

pub struct GenRng(u64);

impl GenRng {
    pub fn new(seed: u64) -> Self {
        GenRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / 16_777_216.0 * 2.0 - 1.0
    }
}

/// `gen(seed, rows, k, scale, awkward)` of the harness: row-major, with 8 row shapes when
/// `awkward` (zero, constant, tiny, all negative, all positive, outliers, ties, normal).
pub fn gen(seed: u64, rows: usize, k: usize, scale: f32, awkward: bool) -> Vec<f32> {
    let mut r = GenRng::new(seed);
    let mut v = vec![0f32; rows * k];
    for i in 0..rows {
        let kind = if awkward { i % 8 } else { 7 };
        for j in 0..k {
            let (u0, u1, u2, u3) = (r.uniform(), r.uniform(), r.uniform(), r.uniform());
            let mut n = ((u0 + u1) + (u2 + u3)) * 0.866 * scale;
            if j % 97 == 13 {
                n *= 8.0;
            }
            v[i * k + j] = match kind {
                0 => 0.0,
                1 => 0.5 * scale,
                2 => n * 1e-30,
                3 => -n.abs(),
                4 => n.abs(),
                5 => {
                    if j % 16 == 3 {
                        n * 50.0
                    } else {
                        n * 0.01
                    }
                }
                6 => ((u0 * 8.0) as i32) as f32 * 0.25 * scale,
                _ => n,
            };
        }
    }
    v
}

/// `gen_imatrix(seed, k)`: positive importance weights.
pub fn gen_imatrix(seed: u64, k: usize) -> Vec<f32> {
    let mut r = GenRng::new(seed);
    (0..k)
        .map(|_| {
            let u = r.uniform();
            (u + 1.0) * (u + 1.0) * 3.0 + 0.01
        })
        .collect()
}

/// FNV-1a 64 of a byte string.
pub fn fnv1a(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One record of the fixture file (see the fixture README for the format).
#[derive(Debug)]
pub struct Record {
    pub kind: u8,
    pub name: String,
    pub ty: u32,
    pub k: usize,
    pub rows: usize,
    pub cols: usize,
    pub seed: u64,
    /// Hashes (kinds 0..=2) or f32 bits widened to u64 (kind 3).
    pub values: Vec<u64>,
}

pub fn parse(bytes: &[u8]) -> Vec<Record> {
    assert_eq!(&bytes[..4], b"MLKQ", "not a kquants fixture");
    let mut p = 4;
    let u32_ = |p: &mut usize| {
        let v = u32::from_le_bytes(bytes[*p..*p + 4].try_into().unwrap());
        *p += 4;
        v
    };
    assert_eq!(u32_(&mut p), 1, "fixture version");
    let n = u32_(&mut p) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = bytes[p];
        let nl = bytes[p + 1] as usize;
        let name = String::from_utf8(bytes[p + 2..p + 2 + nl].to_vec()).unwrap();
        p += 2 + nl;
        let ty = u32_(&mut p);
        let k = u32_(&mut p) as usize;
        let rows = u32_(&mut p) as usize;
        let cols = u32_(&mut p) as usize;
        let seed = u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap());
        p += 8;
        let nv = u32_(&mut p) as usize;
        let mut values = Vec::with_capacity(nv);
        for _ in 0..nv {
            if kind == 3 {
                values.push(u32_(&mut p) as u64);
            } else {
                values.push(u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap()));
                p += 8;
            }
        }
        out.push(Record {
            kind,
            name,
            ty,
            k,
            rows,
            cols,
            seed,
            values,
        });
    }
    assert_eq!(p, bytes.len(), "trailing bytes in the fixture");
    out
}
