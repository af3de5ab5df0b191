//! Parsing and validating a GGUF file held in memory (mmap or owned bytes).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

use crate::metadata::type_id;
use crate::{
    GgmlType, GgufError, MetaArray, MetaValue, Metadata, DEFAULT_ALIGNMENT, MAX_ALIGNMENT,
    MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_DIM, MAX_DIMS, MAX_KV, MAX_STRING_LEN, MAX_TENSORS,
};

/// One tensor's entry in the tensor index, validated against the file it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name as stored, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the row length (innermost, contiguous).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// ABSOLUTE byte offset of the tensor's data in the file (data section start + stored offset).
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Total number of elements (product of dims).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Number of rows: product of `dims[1..]` (1 for a vector).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Length of one row in elements (`dims[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
}

/// Checks tensor dims and type and returns the tensor's byte size.
///
/// Shared by the reader and the writer so both accept exactly the same shapes.
pub(crate) fn tensor_n_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    let bad = |reason: String| GgufError::BadDims {
        tensor: name.to_owned(),
        dims: dims.to_vec(),
        reason,
    };
    if dims.is_empty() {
        return Err(bad("a tensor needs at least one dimension".into()));
    }
    if dims.len() > MAX_DIMS {
        return Err(bad(format!(
            "{} dimensions, ggml supports at most {MAX_DIMS}",
            dims.len()
        )));
    }
    let mut n_elements: u64 = 1;
    for &d in dims {
        if d == 0 || d > MAX_DIM {
            return Err(bad(format!("each dimension must be in 1..={MAX_DIM}")));
        }
        n_elements = n_elements
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| bad("the element count overflows".into()))?;
    }
    let row_bytes = ty.row_size(dims[0]).ok_or_else(|| {
        bad(format!(
            "row length {} is not a multiple of the {} block size {}",
            dims[0],
            ty.name(),
            ty.block_size()
        ))
    })?;
    row_bytes
        .checked_mul(n_elements / dims[0])
        .ok_or_else(|| bad("the byte size overflows".into()))
}

/// Checks an alignment value: nonzero power of two, at most [`MAX_ALIGNMENT`].
pub(crate) fn check_alignment(value: u64) -> Result<u64, GgufError> {
    if value == 0 || !value.is_power_of_two() || value > MAX_ALIGNMENT {
        return Err(GgufError::BadAlignment { value });
    }
    Ok(value)
}

/// Rounds `x` up to a multiple of the power of two `align`, or `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// A little-endian cursor over untrusted bytes: every read is bounds-checked.
struct Cursor<'b> {
    buf: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn file_size(&self) -> u64 {
        self.buf.len() as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'b [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                file_size: self.file_size(),
            });
        }
        // n <= remaining <= usize::MAX, so the cast is lossless.
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 byte length, then UTF-8 bytes (no terminator).
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::TooLarge {
                what: format!("length of {}", what()),
                value: len,
                limit: MAX_STRING_LEN,
            });
        }
        let start = self.pos as u64;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset: start + e.valid_up_to() as u64,
            }),
        }
    }

    /// Reads an array element count and checks it against the caps and the bytes left,
    /// given the smallest possible encoded size of one element.
    fn array_len(&mut self, key: &str, min_elem_bytes: u64) -> Result<usize, GgufError> {
        let n = self.u64(|| format!("array length of metadata key {key:?}"))?;
        if n > MAX_ARRAY_LEN {
            return Err(GgufError::TooLarge {
                what: format!("array length of metadata key {key:?}"),
                value: n,
                limit: MAX_ARRAY_LEN,
            });
        }
        let fits = self.remaining() / min_elem_bytes;
        if n > fits {
            return Err(GgufError::Truncated {
                what: format!("{n} array elements of metadata key {key:?}"),
                offset: self.pos as u64,
                need: n.saturating_mul(min_elem_bytes),
                file_size: self.file_size(),
            });
        }
        Ok(n as usize)
    }

    /// Reads `n` fixed-size scalars. The caller has checked `n * SIZE` fits in the file.
    fn scalars<const SIZE: usize, T>(
        &mut self,
        key: &str,
        n: usize,
        conv: impl Fn([u8; SIZE]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let bytes = self.take((n as u64) * SIZE as u64, || {
            format!("array data of metadata key {key:?}")
        })?;
        Ok(bytes
            .chunks_exact(SIZE)
            .map(|c| {
                let mut a = [0u8; SIZE];
                a.copy_from_slice(c);
                conv(a)
            })
            .collect())
    }

    fn value(&mut self, key: &str, ty: u32) -> Result<MetaValue, GgufError> {
        let w = || format!("value of metadata key {key:?}");
        Ok(match ty {
            type_id::U8 => MetaValue::U8(u8::from_le_bytes(self.array(w)?)),
            type_id::I8 => MetaValue::I8(i8::from_le_bytes(self.array(w)?)),
            type_id::U16 => MetaValue::U16(u16::from_le_bytes(self.array(w)?)),
            type_id::I16 => MetaValue::I16(i16::from_le_bytes(self.array(w)?)),
            type_id::U32 => MetaValue::U32(u32::from_le_bytes(self.array(w)?)),
            type_id::I32 => MetaValue::I32(i32::from_le_bytes(self.array(w)?)),
            type_id::U64 => MetaValue::U64(u64::from_le_bytes(self.array(w)?)),
            type_id::I64 => MetaValue::I64(i64::from_le_bytes(self.array(w)?)),
            type_id::F32 => MetaValue::F32(f32::from_le_bytes(self.array(w)?)),
            type_id::F64 => MetaValue::F64(f64::from_le_bytes(self.array(w)?)),
            type_id::BOOL => MetaValue::Bool(self.array::<1>(w)?[0] != 0),
            type_id::STRING => MetaValue::String(self.string(&w)?),
            type_id::ARRAY => MetaValue::Array(self.meta_array(key, 1)?),
            other => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id: other,
                })
            }
        })
    }

    /// An array: u32 element type, u64 count, elements. `depth` is 1 for a top-level array.
    fn meta_array(&mut self, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::TooLarge {
                what: format!("array nesting depth of metadata key {key:?}"),
                value: depth as u64,
                limit: MAX_ARRAY_DEPTH as u64,
            });
        }
        let ty = self.u32(|| format!("array element type of metadata key {key:?}"))?;
        Ok(match ty {
            type_id::U8 => {
                let n = self.array_len(key, 1)?;
                MetaArray::U8(self.scalars(key, n, u8::from_le_bytes)?)
            }
            type_id::I8 => {
                let n = self.array_len(key, 1)?;
                MetaArray::I8(self.scalars(key, n, i8::from_le_bytes)?)
            }
            type_id::U16 => {
                let n = self.array_len(key, 2)?;
                MetaArray::U16(self.scalars(key, n, u16::from_le_bytes)?)
            }
            type_id::I16 => {
                let n = self.array_len(key, 2)?;
                MetaArray::I16(self.scalars(key, n, i16::from_le_bytes)?)
            }
            type_id::U32 => {
                let n = self.array_len(key, 4)?;
                MetaArray::U32(self.scalars(key, n, u32::from_le_bytes)?)
            }
            type_id::I32 => {
                let n = self.array_len(key, 4)?;
                MetaArray::I32(self.scalars(key, n, i32::from_le_bytes)?)
            }
            type_id::U64 => {
                let n = self.array_len(key, 8)?;
                MetaArray::U64(self.scalars(key, n, u64::from_le_bytes)?)
            }
            type_id::I64 => {
                let n = self.array_len(key, 8)?;
                MetaArray::I64(self.scalars(key, n, i64::from_le_bytes)?)
            }
            type_id::F32 => {
                let n = self.array_len(key, 4)?;
                MetaArray::F32(self.scalars(key, n, f32::from_le_bytes)?)
            }
            type_id::F64 => {
                let n = self.array_len(key, 8)?;
                MetaArray::F64(self.scalars(key, n, f64::from_le_bytes)?)
            }
            type_id::BOOL => {
                let n = self.array_len(key, 1)?;
                MetaArray::Bool(self.scalars(key, n, |[b]: [u8; 1]| b != 0)?)
            }
            type_id::STRING => {
                // Each string takes at least its 8-byte length prefix.
                let n = self.array_len(key, 8)?;
                // A String is 24 bytes in memory for 8 in the file: cap the up-front reservation.
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for i in 0..n {
                    v.push(self.string(&|| format!("string {i} of metadata key {key:?}"))?);
                }
                MetaArray::String(v)
            }
            type_id::ARRAY => {
                // Each nested array takes at least its element type and count (12 bytes).
                let n = self.array_len(key, 12)?;
                let mut v = Vec::with_capacity(n.min(1 << 12));
                for _ in 0..n {
                    v.push(self.meta_array(key, depth + 1)?);
                }
                MetaArray::Array(v)
            }
            other => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    type_id: other,
                })
            }
        })
    }
}

/// Everything parsed from a file except the bytes themselves.
struct Parsed {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

fn parse(buf: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { buf, pos: 0 };

    let magic: [u8; 4] = c.array(|| "GGUF magic".into())?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(|| "GGUF version".into())?;
    match version {
        2 | 3 => {}
        // A big-endian writer stores small versions byte-swapped: 3 reads as 0x03000000.
        v if v & 0xffff == 0 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::BigEndian { version: v })
        }
        v => return Err(GgufError::UnsupportedVersion(v)),
    }

    let n_tensors = c.u64(|| "tensor count".into())?;
    if n_tensors > MAX_TENSORS {
        return Err(GgufError::TooLarge {
            what: "tensor count".into(),
            value: n_tensors,
            limit: MAX_TENSORS,
        });
    }
    let n_kv = c.u64(|| "metadata count".into())?;
    if n_kv > MAX_KV {
        return Err(GgufError::TooLarge {
            what: "metadata key/value count".into(),
            value: n_kv,
            limit: MAX_KV,
        });
    }

    let mut metadata = Metadata::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let ty = c.u32(|| format!("value type of metadata key {key:?}"))?;
        let value = c.value(&key, ty)?;
        metadata.insert_new(key, value)?;
    }

    let alignment = match metadata.get_u64("general.alignment")? {
        Some(a) => check_alignment(a)?,
        None => DEFAULT_ALIGNMENT,
    };

    // Tensor infos: name, n_dims, dims, type, offset relative to the data section.
    let mut raw: Vec<(TensorInfo, u64)> = Vec::with_capacity((n_tensors as usize).min(1024));
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for i in 0..n_tensors {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let n_dims = c.u32(|| format!("n_dims of tensor {name:?}"))?;
        if n_dims as usize > MAX_DIMS || n_dims == 0 {
            return Err(GgufError::BadDims {
                tensor: name,
                dims: vec![],
                reason: format!("n_dims is {n_dims}, must be in 1..={MAX_DIMS}"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(|| format!("dim {d} of tensor {name:?}"))?);
        }
        let type_id = c.u32(|| format!("type of tensor {name:?}"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            tensor: name.clone(),
            type_id,
        })?;
        let rel_offset = c.u64(|| format!("data offset of tensor {name:?}"))?;
        let n_bytes = tensor_n_bytes(&name, &dims, ty)?;
        if by_name.insert(name.clone(), raw.len()).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        let info = TensorInfo {
            name,
            dims,
            ty,
            offset: 0,
            n_bytes,
        };
        raw.push((info, rel_offset));
    }

    let header_end = c.pos as u64;
    let data_offset = align_up(header_end, alignment).ok_or(GgufError::TooLarge {
        what: "header size".into(),
        value: header_end,
        limit: u64::MAX - alignment,
    })?;
    let file_size = c.file_size();

    let mut tensors = Vec::with_capacity(raw.len());
    for (mut t, rel) in raw {
        if rel % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: t.name,
                offset: rel,
                alignment,
            });
        }
        let out_of_bounds = |t: &TensorInfo, offset| GgufError::TensorOutOfBounds {
            tensor: t.name.clone(),
            offset,
            n_bytes: t.n_bytes,
            file_size,
        };
        let abs = data_offset
            .checked_add(rel)
            .ok_or_else(|| out_of_bounds(&t, rel))?;
        match abs.checked_add(t.n_bytes) {
            Some(end) if end <= file_size => {}
            _ => return Err(out_of_bounds(&t, abs)),
        }
        t.offset = abs;
        tensors.push(t);
    }

    // No two tensors may share bytes: sort by offset and compare neighbours.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        // Both ends were checked against the file size, so the sum cannot overflow.
        if a.offset + a.n_bytes > b.offset {
            return Err(GgufError::OverlappingTensors {
                a: a.name.clone(),
                b: b.name.clone(),
            });
        }
    }

    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
        by_name,
    })
}

enum Backing {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

/// A parsed, validated GGUF file. Tensor data is borrowed from the mapping (or owned bytes).
pub struct GgufFile {
    backing: Backing,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("mmap", &matches!(self.backing, Backing::Mmap(_)))
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps `path` read-only and validates the header, metadata and tensor index.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        let len = file.metadata().map_err(|e| GgufError::io(path, e))?.len();
        if len == 0 {
            // Mapping an empty file fails on some platforms; report it as what it is.
            return Err(GgufError::Truncated {
                what: "GGUF magic".into(),
                offset: 0,
                need: 4,
                file_size: 0,
            });
        }
        // SAFETY: memmap2 requires that the file is not modified or truncated while mapped,
        // which no Rust code can guarantee for a file other processes can write. We map it
        // read-only (writes through the map are impossible) and assume, like llama.cpp, that
        // model files are not rewritten in place while in use; writers in this crate only
        // ever replace files by rename (`GgufWriter::write_file`), which leaves existing
        // mappings pointing at the old inode. Every slice we hand out was bounds-checked
        // against the mapping's length at open, which cannot change for the life of the map.
        let mmap = unsafe { MmapOptions::new().map(&file) }.map_err(|e| GgufError::io(path, e))?;
        Self::from_backing(Backing::Mmap(mmap))
    }

    /// Parses a GGUF file from owned bytes (tests, network buffers).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(backing: Backing) -> Result<Self, GgufError> {
        let bytes: &[u8] = match &backing {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        };
        let p = parse(bytes)?;
        Ok(GgufFile {
            backing,
            version: p.version,
            alignment: p.alignment,
            data_offset: p.data_offset,
            metadata: p.metadata,
            tensors: p.tensors,
            by_name: p.by_name,
        })
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section: end of the tensor index rounded up to the alignment.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// File size in bytes.
    pub fn file_size(&self) -> u64 {
        self.as_bytes().len() as u64
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tensor index, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of tensor `t`. Every tensor of this file was bounds-checked at open; a
    /// `TensorInfo` that does not belong to this file and does not fit gets an empty slice.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let bytes = self.as_bytes();
        let range = usize::try_from(t.offset)
            .ok()
            .and_then(|s| Some(s..s.checked_add(usize::try_from(t.n_bytes).ok()?)?));
        range.and_then(|r| bytes.get(r)).unwrap_or(&[])
    }

    /// Tells the OS that this process no longer needs the mapped pages of tensor `t` (the
    /// whole pages inside its bytes): they leave the process's resident memory, stay in the
    /// page cache, and are read back from the file if the tensor is touched again. For a
    /// loader that keeps its own copy of a tensor (repacked weights) and must not count the
    /// file's pages twice. A no-op for owned bytes, on non-Unix systems, or if the OS
    /// refuses (the advice is only an optimisation).
    pub fn release_pages(&self, t: &TensorInfo) {
        #[cfg(unix)]
        if let Backing::Mmap(m) = &self.backing {
            const PAGE: usize = 4096;
            let (Ok(start), Ok(len)) = (usize::try_from(t.offset), usize::try_from(t.n_bytes))
            else {
                return;
            };
            let Some(end) = start.checked_add(len).filter(|&e| e <= m.len()) else {
                return;
            };
            let (lo, hi) = (start.next_multiple_of(PAGE), end / PAGE * PAGE);
            if hi > lo {
                // SAFETY: MADV_DONTNEED on a read-only shared file mapping only drops this
                // process's page-table entries for [lo, hi) (inside the map, checked above);
                // a later read faults the same bytes back in from the file, which must not
                // change while mapped (the contract of `open`). No Rust reference sees
                // different contents before and after, so borrows of the map stay valid.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
                };
            }
        }
    }

    /// The bytes of the tensor named `name`.
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.tensor_data(t))
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get_str("general.architecture").ok().flatten()
    }
}
