//! microllm-gguf: read and write GGUF (versions 2 and 3, little-endian) model files.
//!
//! Main design decision: **the file is untrusted and is validated completely at open**, so
//! that everything after `GgufFile::open` is infallible and cheap. Opening parses the header,
//! all metadata and the whole tensor index under hard caps ([`MAX_STRING_LEN`],
//! [`MAX_ARRAY_LEN`], [`MAX_ARRAY_DEPTH`], [`MAX_KV`], [`MAX_TENSORS`], [`MAX_DIMS`],
//! [`MAX_DIM`], [`MAX_ALIGNMENT`]), with checked arithmetic on every offset and size, no
//! allocation sized by an unchecked count, and checks that every tensor is aligned, inside the
//! file and overlaps no other. After that, [`GgufFile::tensor_data`] hands out slices of the
//! read-only mmap without copying and without any error path. Why: a model loader should fail
//! once, early, with a message that says what is wrong, and the hot path should never have to
//! think about hostile input.
//!
//! Tensor data is opaque bytes here: this crate knows each [`GgmlType`]'s block geometry (to
//! size tensors) but does no maths; decoding lives in `microllm-kernels`.
//!
//! The writer ([`GgufWriter`]) produces files that llama.cpp accepts: metadata in insertion
//! order, tensor data aligned to `general.alignment` (default 32), each tensor padded, and
//! [`GgufWriter::write_file`] replaces the target atomically (temp file, fsync, rename).

mod error;
mod metadata;
mod reader;
mod types;
mod writer;

pub use error::GgufError;
pub use metadata::{MetaArray, MetaValue, Metadata};
pub use reader::{GgufFile, TensorInfo};
pub use types::{file_type_name, GgmlType};
pub use writer::GgufWriter;

/// Longest string (metadata key, value or tensor name) accepted, in bytes: 16 MiB.
pub const MAX_STRING_LEN: u64 = 16 << 20;
/// Most elements in one metadata array (the largest real vocabularies hold ~260k tokens).
pub const MAX_ARRAY_LEN: u64 = 1 << 26;
/// Deepest nesting of arrays in arrays (a plain array has depth 1).
pub const MAX_ARRAY_DEPTH: usize = 4;
/// Most metadata key/value pairs in one file.
pub const MAX_KV: u64 = 1 << 20;
/// Most tensors in one file.
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most dimensions of one tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Largest single tensor dimension.
pub const MAX_DIM: u64 = 1 << 40;
/// Largest accepted `general.alignment`, in bytes.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// Data alignment when `general.alignment` is absent (GGUF spec).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest tensor name the writer produces: ggml's `GGML_MAX_NAME` (64) minus the NUL.
pub const MAX_TENSOR_NAME: usize = 63;
