//! Typed GGUF metadata: values, arrays, and an insertion-ordered key/value map.

use std::collections::HashMap;

use crate::GgufError;

/// One metadata value, exactly as typed in the file (GGUF value types 0..=12).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetaArray),
}

/// A homogeneous metadata array. Arrays of arrays hold their own element type each.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
}

/// GGUF value type ids (`enum gguf_type`).
pub(crate) mod type_id {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl MetaValue {
    /// Short type name used in error messages: "u32", "string", "array<f32>", ...
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(a) => a.type_name(),
        }
    }

    /// The GGUF value type id of this value.
    pub fn type_id(&self) -> u32 {
        use type_id::*;
        match self {
            MetaValue::U8(_) => U8,
            MetaValue::I8(_) => I8,
            MetaValue::U16(_) => U16,
            MetaValue::I16(_) => I16,
            MetaValue::U32(_) => U32,
            MetaValue::I32(_) => I32,
            MetaValue::U64(_) => U64,
            MetaValue::I64(_) => I64,
            MetaValue::F32(_) => F32,
            MetaValue::F64(_) => F64,
            MetaValue::Bool(_) => BOOL,
            MetaValue::String(_) => STRING,
            MetaValue::Array(_) => ARRAY,
        }
    }

    /// The value as an integer if it is of any integer type.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The string if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array if this is an array value.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Short type name used in error messages: "array<u32>", ...
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "array<u8>",
            MetaArray::I8(_) => "array<i8>",
            MetaArray::U16(_) => "array<u16>",
            MetaArray::I16(_) => "array<i16>",
            MetaArray::U32(_) => "array<u32>",
            MetaArray::I32(_) => "array<i32>",
            MetaArray::U64(_) => "array<u64>",
            MetaArray::I64(_) => "array<i64>",
            MetaArray::F32(_) => "array<f32>",
            MetaArray::F64(_) => "array<f64>",
            MetaArray::Bool(_) => "array<bool>",
            MetaArray::String(_) => "array<string>",
            MetaArray::Array(_) => "array<array>",
        }
    }

    /// The GGUF value type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        use type_id::*;
        match self {
            MetaArray::U8(_) => U8,
            MetaArray::I8(_) => I8,
            MetaArray::U16(_) => U16,
            MetaArray::I16(_) => I16,
            MetaArray::U32(_) => U32,
            MetaArray::I32(_) => I32,
            MetaArray::U64(_) => U64,
            MetaArray::I64(_) => I64,
            MetaArray::F32(_) => F32,
            MetaArray::F64(_) => F64,
            MetaArray::Bool(_) => BOOL,
            MetaArray::String(_) => STRING,
            MetaArray::Array(_) => ARRAY,
        }
    }

    /// All elements widened to i128, if this is an array of any integer type.
    fn ints(&self) -> Option<Vec<i128>> {
        fn w<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            MetaArray::U8(v) => w(v),
            MetaArray::I8(v) => w(v),
            MetaArray::U16(v) => w(v),
            MetaArray::I16(v) => w(v),
            MetaArray::U32(v) => w(v),
            MetaArray::I32(v) => w(v),
            MetaArray::U64(v) => w(v),
            MetaArray::I64(v) => w(v),
            _ => return None,
        })
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for MetaValue {
            fn from(x: $t) -> Self { MetaValue::$v(x) }
        }
        impl From<Vec<$t>> for MetaArray {
            fn from(x: Vec<$t>) -> Self { MetaArray::$v(x) }
        }
        impl From<Vec<$t>> for MetaValue {
            fn from(x: Vec<$t>) -> Self { MetaValue::Array(MetaArray::$v(x)) }
        }
    )*};
}
from_scalar!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f32 => F32, f64 => F64, bool => Bool, String => String);

impl From<&str> for MetaValue {
    fn from(s: &str) -> Self {
        MetaValue::String(s.to_owned())
    }
}

impl From<MetaArray> for MetaValue {
    fn from(a: MetaArray) -> Self {
        MetaValue::Array(a)
    }
}

/// Metadata key/value pairs in file order, with a key index for lookups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, MetaValue)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Key/value pairs in insertion (file) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MetaValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// True when `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Sets `key` to `v`. An existing key keeps its position; a new key goes last.
    pub fn insert(&mut self, key: impl Into<String>, v: MetaValue) {
        let key = key.into();
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = v,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, v));
            }
        }
    }

    /// Adds a key that must not be present yet (used by the reader).
    pub(crate) fn insert_new(&mut self, key: String, v: MetaValue) -> Result<(), GgufError> {
        if self.index.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        self.insert(key, v);
        Ok(())
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<MetaValue> {
        let i = self.index.remove(key)?;
        let (_, v) = self.entries.remove(i);
        for (k, _) in &self.entries[i..] {
            if let Some(j) = self.index.get_mut(k) {
                *j -= 1;
            }
        }
        Some(v)
    }

    fn wrong(key: &str, expected: &'static str, got: &MetaValue) -> GgufError {
        GgufError::WrongType {
            key: key.to_owned(),
            expected,
            got: got.type_name(),
        }
    }

    fn get_int<T: TryFrom<i128>>(
        &self,
        key: &str,
        target: &'static str,
    ) -> Result<Option<T>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Some(i) = v.as_i128() else {
            return Err(Self::wrong(key, target, v));
        };
        T::try_from(i).map(Some).map_err(|_| GgufError::OutOfRange {
            key: key.to_owned(),
            value: i.to_string(),
            target,
        })
    }

    /// `key` as u32: any integer type whose value fits is accepted.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.get_int(key, "u32")
    }

    /// `key` as u64: any integer type whose value fits is accepted.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get_int(key, "u64")
    }

    /// `key` as i64: any integer type whose value fits is accepted.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>, GgufError> {
        self.get_int(key, "i64")
    }

    /// `key` as f32: f32 values, and f64 values rounded to f32.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::F32(x)) => Ok(Some(*x)),
            Some(MetaValue::F64(x)) => Ok(Some(*x as f32)),
            Some(v) => Err(Self::wrong(key, "f32", v)),
        }
    }

    /// `key` as bool.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(x)) => Ok(Some(*x)),
            Some(v) => Err(Self::wrong(key, "bool", v)),
        }
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::wrong(key, "string", v)),
        }
    }

    /// `key` as an array of any type.
    pub fn get_array(&self, key: &str) -> Result<Option<&MetaArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(Self::wrong(key, "array", v)),
        }
    }

    /// `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::String(a))) => Ok(Some(a)),
            Some(v) => Err(Self::wrong(key, "array<string>", v)),
        }
    }

    /// `key` as an array of f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::F32(a))) => Ok(Some(a)),
            Some(v) => Err(Self::wrong(key, "array<f32>", v)),
        }
    }

    /// `key` as an array of i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::I32(a))) => Ok(Some(a)),
            Some(v) => Err(Self::wrong(key, "array<i32>", v)),
        }
    }

    /// `key` as u32s, from an array of any integer type whose every element fits in u32.
    pub fn get_u32_array_lossless(&self, key: &str) -> Result<Option<Vec<u32>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Some(ints) = v.as_array().and_then(MetaArray::ints) else {
            return Err(Self::wrong(key, "array<integer>", v));
        };
        ints.into_iter()
            .map(|i| {
                u32::try_from(i).map_err(|_| GgufError::OutOfRange {
                    key: key.to_owned(),
                    value: i.to_string(),
                    target: "u32",
                })
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
    }
}

impl<K: Into<String>, V: Into<MetaValue>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = Metadata::new();
        for (k, v) in iter {
            m.insert(k, v.into());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replace_remove_keep_order() {
        let mut m = Metadata::new();
        m.insert("a", 1u32.into());
        m.insert("b", "x".into());
        m.insert("c", 2.5f32.into());
        m.insert("a", 7u8.into());
        assert_eq!(
            m.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(m.get_u32("a").unwrap(), Some(7));
        assert_eq!(m.remove("b"), Some(MetaValue::from("x")));
        assert_eq!(m.get_f32("c").unwrap(), Some(2.5));
        assert_eq!(m.iter().map(|(k, _)| k).collect::<Vec<_>>(), ["a", "c"]);
        assert!(m.remove("zz").is_none());
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn lenient_getters() {
        let mut m = Metadata::new();
        m.insert("neg", MetaValue::I32(-1));
        m.insert("big", MetaValue::U64(1 << 40));
        m.insert("f64", MetaValue::F64(0.5));
        m.insert("s", "hi".into());
        m.insert("ints", vec![1i64, 2, 3].into());
        m.insert("badints", vec![-1i16].into());
        assert_eq!(m.get_i64("neg").unwrap(), Some(-1));
        assert!(matches!(
            m.get_u32("neg"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.get_u32("big"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert_eq!(m.get_u64("big").unwrap(), Some(1 << 40));
        assert_eq!(m.get_f32("f64").unwrap(), Some(0.5));
        assert!(matches!(
            m.get_u32("s"),
            Err(GgufError::WrongType { got: "string", .. })
        ));
        assert!(matches!(m.get_str("f64"), Err(GgufError::WrongType { .. })));
        assert_eq!(m.get_str("missing").unwrap(), None);
        assert_eq!(
            m.get_u32_array_lossless("ints").unwrap(),
            Some(vec![1, 2, 3])
        );
        assert!(matches!(
            m.get_u32_array_lossless("badints"),
            Err(GgufError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.get_str_array("ints"),
            Err(GgufError::WrongType {
                got: "array<i64>",
                ..
            })
        ));
    }
}
