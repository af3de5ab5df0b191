//! The one error type of this crate.

use microllm_gguf::{GgmlType, GgufError};
use microllm_kernels::KernelError;
use microllm_model::ModelError;

/// Everything that can go wrong compressing or evaluating a model. Messages say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompressError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("kernel error: {0}")]
    Kernel(#[from] KernelError),
    #[error("unknown type {got:?}; choose one of: {supported}")]
    UnknownType { got: String, supported: String },
    #[error("bad --tensor-type {spec:?}: {reason}; write it as PATTERN=TYPE, e.g. 'attn_v=Q8_0' (PATTERN is a regular expression searched in tensor names)")]
    BadOverride { spec: String, reason: String },
    #[error("tensor {tensor:?} is stored as {ty}, which this build cannot decode; use a source model in F32/F16/BF16 or a Q4_0..Q8_0/K-quant type")]
    UnreadableTensor { tensor: String, ty: GgmlType },
    #[error("tensor {tensor:?} has rows of {n_cols} values, not a multiple of the {block}-value blocks of {ty}; choose another type for it (--tensor-type)")]
    BadShape {
        tensor: String,
        n_cols: u64,
        ty: GgmlType,
        block: usize,
    },
    #[error("the output {path} is the input file; write to a different path (the input is read while the output is written)")]
    SameFile { path: String },
    #[error("importance matrix: {0}")]
    Imatrix(String),
    #[error("bad layer selection: {0}")]
    BadLayers(String),
    #[error("not a model: {0}")]
    NotAModel(String),
    #[error("cannot evaluate: {0}")]
    Eval(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
