//! Offline bundles: `export` writes one model as a tar file, `import` adds it to a store.
//!
//! A bundle is a plain (ustar) tar holding exactly three regular files, in this order:
//! `manifest.json` (the manifest, with its signature if any), `SHA256SUMS` (`sha256sum`
//! format, for checking by hand: `sha256sum -c SHA256SUMS` in an extracted bundle) and
//! `blobs/sha256-<hex>` (the model). Import is strict because bundles cross air gaps from
//! machines we do not control: every entry must be a regular file with exactly the expected
//! name (so `../`, absolute paths, symlinks, hard links, devices and extra files are all
//! refused), sizes are capped by the manifest, the manifest is validated (and its signature
//! checked, with a key) before the model is read, and the model streams into `tmp/` where it
//! is hashed and parsed as GGUF before anything lands in the store.

use crate::error::StoreError;
use crate::info::ModelInfo;
use crate::name::validate_component;
use crate::progress::Progress;
use crate::sign::require_valid;
use crate::store::{
    is_sha256_hex, make_read_only, sync_dir, Manifest, RemoveOnDrop, Store, MANIFEST_SCHEMA,
};
use crate::verify;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// Name of the manifest entry.
pub const BUNDLE_MANIFEST: &str = "manifest.json";
/// Name of the checksum entry.
pub const BUNDLE_SUMS: &str = "SHA256SUMS";

const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const MAX_SUMS_BYTES: u64 = 64 << 10;

/// Options of [`Store::import`].
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Require a valid signature by this key.
    pub key: Option<VerifyingKey>,
    /// Replace a stored model of the same name and tag that has a different file.
    pub force: bool,
}

/// What [`Store::export`] wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    pub manifest: Manifest,
    pub path: PathBuf,
    /// Size of the bundle file.
    pub bytes: u64,
}

/// Reads through, hashing and reporting progress.
struct HashingReader<'a, R> {
    inner: R,
    hasher: Sha256,
    progress: &'a mut dyn Progress,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.progress.advance(n as u64);
        Ok(n)
    }
}

fn header(path: &str, size: u64, mtime: u64) -> std::io::Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn sums_text(manifest_sha: &str, blob_sha: &str) -> String {
    format!("{manifest_sha}  {BUNDLE_MANIFEST}\n{blob_sha}  blobs/sha256-{blob_sha}\n")
}

impl Store {
    /// Writes `model` as a bundle to `out` (atomically: a temporary file next to it, then a
    /// rename). The blob is hashed while it is written; a corrupt blob is refused.
    pub fn export(
        &self,
        model: &str,
        out: &Path,
        progress: &mut dyn Progress,
    ) -> Result<Exported, StoreError> {
        let m = self.manifest(model)?;
        let blob = self.blob_path(&m.sha256);
        let damaged = |reason: String| StoreError::Damaged {
            name: m.display_name(),
            path: blob.clone(),
            reason,
        };
        let file = File::open(&blob).map_err(|_| damaged("its blob file is missing".into()))?;
        let len = file.metadata().map(|md| md.len()).unwrap_or(0);
        if len != m.size {
            return Err(damaged(format!(
                "the blob has {len} bytes, the manifest says {}",
                m.size
            )));
        }
        let mut manifest_json = serde_json::to_vec_pretty(&m).unwrap_or_default();
        manifest_json.push(b'\n');
        let sums = sums_text(&sha_hex(&manifest_json), &m.sha256);
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);

        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".microllm-export-")
            .tempfile_in(&dir)
            .map_err(|e| StoreError::io("create a temporary file in", &dir, e))?;
        let werr = |e: std::io::Error| StoreError::io("write", out, e);
        let mut b = tar::Builder::new(BufWriter::new(tmp.as_file()));
        b.append(
            &header(BUNDLE_MANIFEST, manifest_json.len() as u64, mtime).map_err(werr)?,
            manifest_json.as_slice(),
        )
        .map_err(werr)?;
        b.append(
            &header(BUNDLE_SUMS, sums.len() as u64, mtime).map_err(werr)?,
            sums.as_bytes(),
        )
        .map_err(werr)?;
        progress.start(&format!("exporting {}", m.display_name()), Some(m.size));
        let mut reader = HashingReader {
            inner: BufReader::new(file),
            hasher: Sha256::new(),
            progress,
        };
        b.append(
            &header(&format!("blobs/sha256-{}", m.sha256), m.size, mtime).map_err(werr)?,
            &mut reader,
        )
        .map_err(werr)?;
        let got = hex::encode(reader.hasher.finalize());
        progress.finish();
        if got != m.sha256 {
            return Err(StoreError::Corrupt {
                name: m.display_name(),
                path: blob,
                expected: m.sha256.clone(),
                got,
            });
        }
        b.into_inner()
            .and_then(|mut w| w.flush())
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(werr)?;
        let bytes = tmp.as_file().metadata().map(|md| md.len()).unwrap_or(0);
        tmp.persist(out)
            .map_err(|e| StoreError::io("write", out, e.error))?;
        Ok(Exported {
            manifest: m,
            path: out.to_path_buf(),
            bytes,
        })
    }

    /// Adds the model in bundle `path` to the store, checking everything first (see the
    /// module doc). Returns the stored manifest.
    pub fn import(
        &self,
        path: &Path,
        opts: &ImportOptions,
        progress: &mut dyn Progress,
    ) -> Result<Manifest, StoreError> {
        let bad = |reason: String| StoreError::BadBundle {
            path: path.to_path_buf(),
            reason,
        };
        let unexpected = |name: &str, i: usize| {
            bad(format!(
                "unexpected entry {name:?} at position {i}; a bundle holds exactly {BUNDLE_MANIFEST}, {BUNDLE_SUMS} and blobs/sha256-<hex>, in that order"
            ))
        };
        let file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut entries = archive
            .entries()
            .map_err(|e| bad(format!("cannot read it as tar ({e})")))?;
        // The next entry: a regular file, with its name and size.
        let mut next = |i: usize| -> Result<Option<(tar::Entry<'_, _>, String, u64)>, StoreError> {
            let Some(entry) = entries.next() else {
                return Ok(None);
            };
            let entry = entry.map_err(|e| bad(format!("cannot read entry {i} ({e})")))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let ty = entry.header().entry_type();
            if ty != tar::EntryType::Regular {
                return Err(bad(format!(
                    "entry {name:?} is a {}; only regular files are allowed (symlinks, links and devices are refused)",
                    type_name(ty)
                )));
            }
            let size = entry
                .header()
                .size()
                .map_err(|e| bad(format!("entry {name:?} has a bad size ({e})")))?;
            Ok(Some((entry, name, size)))
        };
        let incomplete = || {
            bad(format!(
                "it is incomplete; a bundle holds {BUNDLE_MANIFEST}, {BUNDLE_SUMS} and blobs/sha256-<hex>"
            ))
        };

        // 1. The manifest: validated (and its signature checked) before anything else.
        let (mut entry, name, size) = next(0)?.ok_or_else(incomplete)?;
        if name != BUNDLE_MANIFEST {
            return Err(unexpected(&name, 0));
        }
        if size > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{BUNDLE_MANIFEST} is {size} bytes, too large")));
        }
        let mut text = Vec::new();
        entry
            .read_to_end(&mut text)
            .map_err(|e| bad(format!("cannot read {BUNDLE_MANIFEST} ({e})")))?;
        drop(entry);
        let mut m = parse_manifest(&text).map_err(bad)?;
        if let Some(k) = &opts.key {
            require_valid(&m, k)?;
        }
        let manifest_sha = sha_hex(&text);

        // The rest under the name's lock: the temporary file is named after the model, so
        // an import killed mid-way leaves at most one, reused by the next import or pull.
        let display = m.display_name();
        self.with_name_lock(&m.name.clone(), &m.tag.clone(), || {
            // 2. The checksums.
            let (mut entry, name, size) = next(1)?.ok_or_else(incomplete)?;
            if name != BUNDLE_SUMS {
                return Err(unexpected(&name, 1));
            }
            if size > MAX_SUMS_BYTES {
                return Err(bad(format!("{BUNDLE_SUMS} is {size} bytes, too large")));
            }
            let mut sums = String::new();
            entry
                .read_to_string(&mut sums)
                .map_err(|e| bad(format!("cannot read {BUNDLE_SUMS} ({e})")))?;
            drop(entry);
            check_sums(&sums, &manifest_sha, &m.sha256).map_err(bad)?;

            // 3. The model, into tmp/, hashed and parsed.
            let (mut entry, name, size) = next(2)?.ok_or_else(incomplete)?;
            if name != format!("blobs/sha256-{}", m.sha256) {
                return Err(unexpected(&name, 2));
            }
            if size != m.size {
                return Err(bad(format!(
                    "the model entry has {size} bytes, the manifest says {}",
                    m.size
                )));
            }
            let tmp = self
                .tmp_dir()
                .join(format!("import-{}@{}.tmp", m.name, m.tag));
            let mut guard = RemoveOnDrop(Some(tmp.clone()));
            m.info = Some(self.receive_blob(&mut entry, &m, &tmp, path, progress)?);
            drop(entry);
            if let Some((_, name, _)) = next(3)? {
                return Err(unexpected(&name, 3));
            }

            if let Ok(Some(old)) = self.read_manifest(&m.name, &m.tag) {
                if old.sha256 != m.sha256 && !opts.force {
                    return Err(StoreError::Conflict {
                        name: display.clone(),
                        existing: old.sha256,
                        incoming: m.sha256.clone(),
                    });
                }
            }
            make_read_only(&tmp)?;
            let dest = self.blob_path(&m.sha256);
            self.with_blobs_lock(false, || {
                fs::rename(&tmp, &dest)
                    .map_err(|e| StoreError::io("move the imported model to", &dest, e))?;
                sync_dir(&self.home().join("blobs"))?;
                verify::forget(self, &m.sha256);
                self.save_manifest(&m)
            })?;
            guard.0 = None;
            Ok(())
        })?;
        Ok(m)
    }

    /// Streams the model entry into `tmp/`, hashing it; checks digest and GGUF header.
    fn receive_blob(
        &self,
        entry: &mut dyn Read,
        m: &Manifest,
        tmp: &Path,
        bundle: &Path,
        progress: &mut dyn Progress,
    ) -> Result<ModelInfo, StoreError> {
        let mut out = File::create(tmp).map_err(|e| StoreError::io("create", tmp, e))?;
        progress.start(&format!("importing {}", m.display_name()), Some(m.size));
        let mut reader = HashingReader {
            inner: entry.take(m.size),
            hasher: Sha256::new(),
            progress,
        };
        let copied = std::io::copy(&mut reader, &mut out).map_err(|e| StoreError::BadBundle {
            path: bundle.to_path_buf(),
            reason: format!("cannot read the model entry ({e})"),
        })?;
        let got = hex::encode(reader.hasher.finalize());
        progress.finish();
        if copied != m.size {
            return Err(StoreError::BadBundle {
                path: bundle.to_path_buf(),
                reason: format!("the model entry ends after {copied} of {} bytes", m.size),
            });
        }
        if got != m.sha256 {
            return Err(StoreError::Checksum {
                what: format!("{} in bundle {}", m.display_name(), bundle.display()),
                expected: m.sha256.clone(),
                got,
            });
        }
        out.sync_all().map_err(|e| StoreError::io("sync", tmp, e))?;
        drop(out);
        ModelInfo::read(tmp).map_err(|e| match e {
            StoreError::NotGguf { message, .. } => StoreError::NotGguf {
                what: format!("{} in bundle {}", m.display_name(), bundle.display()),
                message,
            },
            other => other,
        })
    }
}

/// Parses and validates a bundled manifest.
fn parse_manifest(text: &[u8]) -> Result<Manifest, String> {
    let m: Manifest =
        serde_json::from_slice(text).map_err(|e| format!("{BUNDLE_MANIFEST} is invalid ({e})"))?;
    if m.schema == 0 || m.schema > MANIFEST_SCHEMA {
        return Err(format!(
            "{BUNDLE_MANIFEST} has schema {}, this microllm reads 1 to {MANIFEST_SCHEMA}; update microllm",
            m.schema
        ));
    }
    for c in [&m.name, &m.tag] {
        validate_component(c).map_err(|r| format!("the model name {c:?} is not allowed: {r}"))?;
    }
    if !is_sha256_hex(&m.sha256) {
        return Err(format!("{:?} is not a sha256 digest", m.sha256));
    }
    Ok(m)
}

/// `SHA256SUMS` must list exactly the manifest's and the blob's digests.
fn check_sums(text: &str, manifest_sha: &str, blob_sha: &str) -> Result<(), String> {
    let mut lines: Vec<(String, String)> = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let (h, n) = l
            .split_once("  ")
            .ok_or_else(|| format!("{BUNDLE_SUMS} line {l:?} is not `<sha256>  <file>`"))?;
        lines.push((h.to_ascii_lowercase(), n.to_string()));
    }
    lines.sort_by(|a, b| a.1.cmp(&b.1));
    let mut want = vec![
        (manifest_sha.to_string(), BUNDLE_MANIFEST.to_string()),
        (blob_sha.to_string(), format!("blobs/sha256-{blob_sha}")),
    ];
    want.sort_by(|a, b| a.1.cmp(&b.1));
    if lines != want {
        return Err(format!(
            "{BUNDLE_SUMS} does not match the bundle (expected:\n{}got:\n{text})",
            sums_text(manifest_sha, blob_sha)
        ));
    }
    Ok(())
}

fn type_name(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Directory => "directory",
        tar::EntryType::Char | tar::EntryType::Block => "device",
        tar::EntryType::Fifo => "FIFO",
        _ => "special entry",
    }
}
