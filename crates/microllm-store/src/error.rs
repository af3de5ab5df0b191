//! The store's error type: every message says what failed and what to do about it.

use crate::info::FitRefusal;
use std::path::PathBuf;

/// Errors from resolving, pulling or reading models.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model name {name:?}: {reason}; names use only A-Z a-z 0-9 . _ - with an optional :TAG (e.g. smollm2-135m-instruct or smollm2-135m-instruct:q4_1)")]
    InvalidName { name: String, reason: &'static str },

    #[error("unknown model {name:?}; known models: {}; or pass -m PATH to a local .gguf, or a source such as pypi:PACKAGE==VERSION", known.join(", "))]
    UnknownModel { name: String, known: Vec<String> },

    #[error("model {name:?} is not downloaded yet; run `microllm pull {name}` (needs network) or pass -m PATH to a local .gguf")]
    NotPulled { name: String },

    #[error("model {name:?} in the store is damaged ({reason}, at {}); run `microllm pull {name}` to fetch it again", path.display())]
    Damaged {
        name: String,
        path: PathBuf,
        reason: String,
    },

    #[error("model file {} does not exist; check the path, or use a model name such as smollm2-135m-instruct", path.display())]
    ModelFileNotFound { path: PathBuf },

    #[error("invalid source {source_spec:?}: {reason}; sources look like pypi:PACKAGE==VERSION[#MEMBER] or file:PATH, parts joined by ' + '")]
    BadSource { source_spec: String, reason: String },

    #[error("could not reach {host}: {message}; check your network (and HTTPS_PROXY if you need a proxy), or pass -m PATH to a local .gguf")]
    Network {
        host: String,
        url: String,
        message: String,
    },

    #[error("{url} answered HTTP {status}; try again later, or pass -m PATH to a local .gguf")]
    HttpStatus { url: String, status: u16 },

    #[error("package {package:?} was not found on the index {index}; check the package name (or the index URL)")]
    PackageNotFound { package: String, index: String },

    #[error("the package index page {url} could not be read: {message}; check the index URL, or try again later")]
    BadIndex { url: String, message: String },

    #[error("package {package:?} has no wheel for version {version} on the index; versions with wheels: {}; fix the version in the source", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    NoWheel {
        package: String,
        version: String,
        available: Vec<String>,
    },

    #[error("wheel {wheel} has no member {member:?}; .gguf members in it: {}; fix the #MEMBER part of the source", if candidates.is_empty() { "none".to_string() } else { candidates.join(", ") })]
    MemberNotFound {
        wheel: String,
        member: String,
        candidates: Vec<String>,
    },

    #[error("could not read wheel {wheel}: {message}; the download may be damaged: pull again")]
    BadWheel { wheel: String, message: String },

    #[error("sha256 mismatch for {what}: expected {expected}, got {got}; the download is damaged or the upstream file changed: pull again, and report it if it persists")]
    Checksum {
        what: String,
        expected: String,
        got: String,
    },

    #[error("size mismatch for {what}: expected {expected} bytes, got {got}; the download is damaged or the upstream file changed: pull again, and report it if it persists")]
    SizeMismatch {
        what: String,
        expected: u64,
        got: u64,
    },

    #[error("invalid proxy URL {url:?}: {message}; fix HTTPS_PROXY (or the configured proxy)")]
    BadProxy { url: String, message: String },

    #[error("could not {op} {}: {source}; check that the model store directory (MICROLLM_HOME) is writable and has free space", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("manifest {} is unreadable: {message}; delete it and pull the model again", path.display())]
    BadManifest { path: PathBuf, message: String },

    #[error("model {name:?} in the store is corrupt: its file {} has sha256 {got}, its manifest says {expected}; it was modified or damaged on disk, so it is not loaded. Run `microllm pull {name}` to fetch it again, or `microllm rm {name}`", path.display())]
    Corrupt {
        name: String,
        path: PathBuf,
        expected: String,
        got: String,
    },

    #[error(
        "{what} is not a GGUF model file ({message}); check that the source points to a .gguf file"
    )]
    NotGguf { what: String, message: String },

    #[error("{0}")]
    DoesNotFit(Box<FitRefusal>),

    #[error("model name {name:?} has several tags ({}); say which one, e.g. {name}:{}", tags.join(", "), tags.first().map(String::as_str).unwrap_or("TAG"))]
    AmbiguousName { name: String, tags: Vec<String> },

    #[error("{name} is already in the store with a different file (sha256 {existing}, the new one is {incoming}); `microllm rm {name}` first, or pass --force to replace it")]
    Conflict {
        name: String,
        existing: String,
        incoming: String,
    },

    #[error("{} is not a valid microllm bundle: {reason}; make bundles with `microllm export`", path.display())]
    BadBundle { path: PathBuf, reason: String },

    #[error("key {what}: {reason}; keys are made by `microllm keygen FILE` (secret key in FILE, public key in FILE.pub)")]
    BadKey { what: String, reason: String },

    #[error("signature check failed for {name}: {reason}")]
    Signature { name: String, reason: String },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
