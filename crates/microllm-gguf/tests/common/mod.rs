//! Helpers shared by the integration tests: a byte-level GGUF builder for crafting hostile
//! files, and a tiny deterministic PRNG.
#![allow(dead_code)]

/// Appends little-endian GGUF primitives to a byte vector, with no validation at all.
#[derive(Default, Clone)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// `GGUF`, version, tensor count, kv count.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u8(&mut self, x: u8) -> &mut Self {
        self.bytes(&[x])
    }
    pub fn u32(&mut self, x: u32) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }
    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A u32 metadata entry (value type 4).
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.string(key).u32(4).u32(v)
    }
    /// A string metadata entry (value type 8).
    pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        self.string(key).u32(8).string(v)
    }
    /// A tensor info entry.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, rel_offset: u64) -> &mut Self {
        self.string(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(rel_offset)
    }
    /// Pads with zeros to a multiple of `align`.
    pub fn pad(&mut self, align: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    /// Appends `n` bytes of data.
    pub fn data(&mut self, n: usize) -> &mut Self {
        self.0.extend((0..n).map(|i| i as u8));
        self
    }
    pub fn build(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// xorshift64*: small, deterministic, good enough to pick bytes to corrupt.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A small but varied valid file: every value type, nested arrays, three tensors.
pub fn small_valid_file() -> Vec<u8> {
    use microllm_gguf::{GgmlType, GgufWriter, MetaArray, MetaValue};
    use std::borrow::Cow;
    let mut w = GgufWriter::new();
    let m = w.metadata_mut();
    m.insert("general.architecture", "llama".into());
    m.insert("llama.block_count", MetaValue::U32(2));
    m.insert("x.i8", MetaValue::I8(-3));
    m.insert("x.f64", MetaValue::F64(1.5));
    m.insert("x.bool", MetaValue::Bool(true));
    m.insert(
        "tokenizer.ggml.tokens",
        vec!["a".to_string(), "bb".into(), "ccc".into()].into(),
    );
    m.insert("x.scores", vec![0.5f32, -1.0, 2.0].into());
    m.insert(
        "x.nested",
        MetaValue::Array(MetaArray::Array(vec![
            MetaArray::U16(vec![1, 2]),
            MetaArray::String(vec!["z".into()]),
        ])),
    );
    w.add_tensor_f32("a", &[4, 2], &[1.0; 8]).unwrap();
    w.add_tensor("b", &[32], GgmlType::Q8_0, Cow::Owned(vec![7u8; 34]))
        .unwrap();
    w.add_tensor_f32("c", &[8], &[2.0; 8]).unwrap();
    w.to_bytes().unwrap()
}
