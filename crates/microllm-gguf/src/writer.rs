//! Writing GGUF files (v2 or v3, little-endian) that this crate and llama.cpp read back.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::reader::{align_up, check_alignment, tensor_n_bytes};
use crate::{
    GgmlType, GgufError, GgufFile, MetaArray, MetaValue, Metadata, DEFAULT_ALIGNMENT,
    MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_KV, MAX_STRING_LEN, MAX_TENSORS, MAX_TENSOR_NAME,
};

struct PendingTensor<'a> {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF file: metadata plus tensors whose bytes are already encoded in their type.
///
/// Tensor data is held as `Cow<'a, [u8]>`, so a large model can be rewritten straight from
/// another file's mmap without copying it into memory.
pub struct GgufWriter<'a> {
    version: u32,
    metadata: Metadata,
    tensors: Vec<PendingTensor<'a>>,
    names: HashSet<String>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for GgufWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("version", &self.version)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Layout decided before any byte is written: header bytes and each tensor's relative offset.
struct Plan {
    header: Vec<u8>,
    alignment: u64,
    /// Padding after the header so the data section starts aligned.
    header_pad: usize,
}

impl<'a> GgufWriter<'a> {
    /// An empty GGUF v3 file.
    pub fn new() -> Self {
        Self::with_version(3)
    }

    /// An empty file of the given version (2 or 3; checked when writing). v2 and v3 have the
    /// same little-endian layout; v3 only added the big-endian variant.
    pub fn with_version(v: u32) -> Self {
        GgufWriter {
            version: v,
            metadata: Metadata::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// A writer holding `file`'s metadata and tensors (data borrowed from `file`), same version.
    pub fn from_file(file: &'a GgufFile) -> Result<Self, GgufError> {
        let mut w = Self::with_version(file.version());
        *w.metadata_mut() = file.metadata().clone();
        for t in file.tensors() {
            w.add_tensor(&t.name, &t.dims, t.ty, Cow::Borrowed(file.tensor_data(t)))?;
        }
        Ok(w)
    }

    /// The metadata to write. `general.alignment` (u32, power of two) sets the data alignment.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// The metadata to write.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Number of tensors added so far.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Adds a tensor. `dims` are in ggml order (`dims[0]` = row length); `data` must be exactly
    /// `ty.row_size(dims[0]) * n_rows` bytes of already-encoded data. Names must be unique.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Cow<'a, [u8]>,
    ) -> Result<(), GgufError> {
        if name.len() > MAX_TENSOR_NAME {
            return Err(GgufError::TensorNameTooLong {
                name: name.to_owned(),
                len: name.len(),
                max: MAX_TENSOR_NAME,
            });
        }
        if self.tensors.len() as u64 >= MAX_TENSORS {
            return Err(GgufError::TooLarge {
                what: "tensor count".into(),
                value: self.tensors.len() as u64 + 1,
                limit: MAX_TENSORS,
            });
        }
        let expected = tensor_n_bytes(name, dims, ty)?;
        if data.len() as u64 != expected {
            return Err(GgufError::TensorSizeMismatch {
                tensor: name.to_owned(),
                dims: dims.to_vec(),
                ty,
                expected,
                got: data.len() as u64,
            });
        }
        if !self.names.insert(name.to_owned()) {
            return Err(GgufError::DuplicateTensor(name.to_owned()));
        }
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(())
    }

    /// Adds an F32 tensor from values (stored little-endian).
    pub fn add_tensor_f32(
        &mut self,
        name: &str,
        dims: &[u64],
        values: &[f32],
    ) -> Result<(), GgufError> {
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.add_tensor(name, dims, GgmlType::F32, Cow::Owned(bytes))
    }

    /// Adds an F16 tensor from f32 values (rounded to nearest f16).
    pub fn add_tensor_f16(
        &mut self,
        name: &str,
        dims: &[u64],
        values: &[f32],
    ) -> Result<(), GgufError> {
        let bytes = values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        self.add_tensor(name, dims, GgmlType::F16, Cow::Owned(bytes))
    }

    /// Adds a BF16 tensor from f32 values (rounded to nearest bf16).
    pub fn add_tensor_bf16(
        &mut self,
        name: &str,
        dims: &[u64],
        values: &[f32],
    ) -> Result<(), GgufError> {
        let bytes = values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        self.add_tensor(name, dims, GgmlType::BF16, Cow::Owned(bytes))
    }

    fn plan(&self) -> Result<Plan, GgufError> {
        if !(2..=3).contains(&self.version) {
            return Err(GgufError::UnsupportedVersion(self.version));
        }
        let alignment = match self.metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            // The GGUF spec (and llama.cpp) require a u32 here.
            Some(MetaValue::U32(a)) => check_alignment(u64::from(*a))?,
            Some(v) => {
                return Err(GgufError::WrongType {
                    key: "general.alignment".into(),
                    expected: "u32",
                    got: v.type_name(),
                })
            }
        };
        if self.metadata.len() as u64 > MAX_KV {
            return Err(GgufError::TooLarge {
                what: "metadata key/value count".into(),
                value: self.metadata.len() as u64,
                limit: MAX_KV,
            });
        }

        let mut h = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&self.version.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in self.metadata.iter() {
            put_string(&mut h, key, key)?;
            h.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut h, key, value)?;
        }
        let mut rel: u64 = 0;
        for t in &self.tensors {
            put_string(&mut h, &t.name, &t.name)?;
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ty.id().to_le_bytes());
            h.extend_from_slice(&rel.to_le_bytes());
            rel = align_up(rel + t.data.len() as u64, alignment).ok_or(GgufError::TooLarge {
                what: "data section size".into(),
                value: rel,
                limit: u64::MAX - alignment,
            })?;
        }
        let header_pad =
            (align_up(h.len() as u64, alignment).unwrap_or(0) - h.len() as u64) as usize;
        Ok(Plan {
            header: h,
            alignment,
            header_pad,
        })
    }

    fn emit(&self, plan: &Plan, w: &mut dyn Write) -> std::io::Result<()> {
        let zeros = [0u8; 4096];
        let pad = |w: &mut dyn Write, mut n: usize| -> std::io::Result<()> {
            while n > 0 {
                let k = n.min(zeros.len());
                w.write_all(&zeros[..k])?;
                n -= k;
            }
            Ok(())
        };
        w.write_all(&plan.header)?;
        pad(w, plan.header_pad)?;
        for t in &self.tensors {
            w.write_all(&t.data)?;
            // Every tensor, the last one included, is padded to the alignment (as ggml does).
            let len = t.data.len() as u64;
            let padded = align_up(len, plan.alignment).unwrap_or(len);
            pad(w, (padded - len) as usize)?;
        }
        w.flush()
    }

    /// Writes the file to `w`.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<(), GgufError> {
        let plan = self.plan()?;
        self.emit(&plan, &mut w)
            .map_err(|e| GgufError::io("<output stream>", e))
    }

    /// The whole file as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }

    /// Writes the file to `path` atomically: into a temporary file in the same directory,
    /// fsync, then rename over `path` (and fsync the directory on Unix). A crash leaves either
    /// the old file or the new complete one, never a partial file under `path`.
    pub fn write_file(&self, path: &Path) -> Result<(), GgufError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let plan = self.plan()?;
        let file_name = path.file_name().ok_or_else(|| {
            GgufError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
            )
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            file_name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            let mut bw = BufWriter::with_capacity(1 << 20, f);
            self.emit(&plan, &mut bw)?;
            let f = bw.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            // Best effort: the temp file is garbage either way, and the write error matters more.
            let _ = fs::remove_file(&tmp);
            return Err(GgufError::io(&tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(GgufError::io(path, e));
        }
        #[cfg(unix)]
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| GgufError::io(&dir, e))?;
        Ok(())
    }
}

fn too_large(what: String, value: u64, limit: u64) -> GgufError {
    GgufError::TooLarge { what, value, limit }
}

fn put_string(h: &mut Vec<u8>, s: &str, key: &str) -> Result<(), GgufError> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(too_large(
            format!("length of a string in {key:?}"),
            s.len() as u64,
            MAX_STRING_LEN,
        ));
    }
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_value(h: &mut Vec<u8>, key: &str, v: &MetaValue) -> Result<(), GgufError> {
    match v {
        MetaValue::U8(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => h.push(u8::from(*x)),
        MetaValue::String(s) => put_string(h, s, key)?,
        MetaValue::Array(a) => put_array(h, key, a, 1)?,
    }
    Ok(())
}

fn put_array(h: &mut Vec<u8>, key: &str, a: &MetaArray, depth: usize) -> Result<(), GgufError> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(too_large(
            format!("array nesting depth of metadata key {key:?}"),
            depth as u64,
            MAX_ARRAY_DEPTH as u64,
        ));
    }
    if a.len() as u64 > MAX_ARRAY_LEN {
        return Err(too_large(
            format!("array length of metadata key {key:?}"),
            a.len() as u64,
            MAX_ARRAY_LEN,
        ));
    }
    h.extend_from_slice(&a.elem_type_id().to_le_bytes());
    h.extend_from_slice(&(a.len() as u64).to_le_bytes());
    fn all<T, const N: usize>(h: &mut Vec<u8>, v: &[T], f: impl Fn(&T) -> [u8; N]) {
        for x in v {
            h.extend_from_slice(&f(x));
        }
    }
    match a {
        MetaArray::U8(v) => h.extend_from_slice(v),
        MetaArray::I8(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::U16(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::I16(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::U32(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::I32(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::U64(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::I64(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::F32(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::F64(v) => all(h, v, |x| x.to_le_bytes()),
        MetaArray::Bool(v) => all(h, v, |&x| [u8::from(x)]),
        MetaArray::String(v) => {
            for s in v {
                put_string(h, s, key)?;
            }
        }
        MetaArray::Array(v) => {
            for inner in v {
                put_array(h, key, inner, depth + 1)?;
            }
        }
    }
    Ok(())
}
