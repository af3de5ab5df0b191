//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a GGUF file.
///
/// Offsets are byte offsets from the start of the file unless a message says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    #[error("I/O error on {}: {source}; check that the path exists and is readable/writable", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\" (47 47 55 46); check that the file is a GGUF model and not a safetensors/pickle/HTML download")]
    BadMagic { found: [u8; 4] },

    #[error("unsupported GGUF version {0}; only versions 2 and 3 are supported (re-convert a version-1 file with a current llama.cpp convert script)")]
    UnsupportedVersion(u32),

    #[error("big-endian GGUF is not supported (version field reads {version:#010x} little-endian); convert the model on a little-endian machine")]
    BigEndian { version: u32 },

    #[error("file is truncated: reading {what} at offset {offset} needs {need} bytes but the file has {file_size} bytes; the download or copy was probably cut short, fetch the file again")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        file_size: u64,
    },

    #[error("{what} is {value}, above the limit of {limit}; the file is corrupt or hostile")]
    TooLarge {
        what: String,
        value: u64,
        limit: u64,
    },

    #[error("metadata key {key:?} has unknown value type id {type_id}; the file is corrupt or written by a newer GGUF writer")]
    UnknownValueType { key: String, type_id: u32 },

    #[error("tensor {tensor:?} has unknown ggml type id {type_id}; the file is corrupt or uses a quantization type this build does not know")]
    UnknownTensorType { tensor: String, type_id: u32 },

    #[error("invalid UTF-8 in {what} at offset {offset}; the file is corrupt")]
    InvalidUtf8 { what: String, offset: u64 },

    #[error("alignment {value} is invalid: it must be a nonzero power of two no larger than {max}; fix general.alignment", max = crate::MAX_ALIGNMENT)]
    BadAlignment { value: u64 },

    #[error("tensor {tensor:?} at offset {offset} with {n_bytes} bytes extends past the end of the file ({file_size} bytes); the file is truncated or corrupt, fetch it again")]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        n_bytes: u64,
        file_size: u64,
    },

    #[error("tensor {tensor:?} has data offset {offset} (relative to the data section), not a multiple of the alignment {alignment}; the file is corrupt")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error("tensors {a:?} and {b:?} overlap in the data section; the file is corrupt")]
    OverlappingTensors { a: String, b: String },

    #[error("tensor name {0:?} appears more than once; tensor names must be unique")]
    DuplicateTensor(String),

    #[error("metadata key {0:?} appears more than once; keys must be unique")]
    DuplicateKey(String),

    #[error("tensor {tensor:?} has invalid dims {dims:?}: {reason}")]
    BadDims {
        tensor: String,
        dims: Vec<u64>,
        reason: String,
    },

    #[error("metadata key {key:?} has type {got}, expected {expected}; the model was converted with an unexpected writer, re-convert it")]
    WrongType {
        key: String,
        expected: &'static str,
        got: &'static str,
    },

    #[error("metadata key {key:?} has value {value}, which does not fit in {target}; the file is corrupt")]
    OutOfRange {
        key: String,
        value: String,
        target: &'static str,
    },

    #[error("tensor {tensor:?} data is {got} bytes, but dims {dims:?} of type {ty} need {expected} bytes; pass exactly the encoded tensor bytes")]
    TensorSizeMismatch {
        tensor: String,
        dims: Vec<u64>,
        ty: crate::GgmlType,
        expected: u64,
        got: u64,
    },

    #[error(
        "tensor name {name:?} is {len} bytes; ggml allows at most {max} bytes, use a shorter name"
    )]
    TensorNameTooLong {
        name: String,
        len: usize,
        max: usize,
    },
}

impl GgufError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GgufError::Io {
            path: path.into(),
            source,
        }
    }
}
