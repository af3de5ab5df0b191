//! Integrity of stored blobs: the cheap check made at every load, and the full `verify`.
//!
//! Loading a stored model must refuse a blob that changed on disk, yet hashing a model at
//! every load costs ~3 ms per MB (0.3 s for 100 MB, 0.7 s for 250 MB, seconds for larger
//! ones). So a successful hash leaves a stamp `verified/sha256-<hex>.json` recording the
//! blob's size, mtime, ctime, inode and device; a later load trusts the blob without hashing
//! only if all five are unchanged. Any write through the file system (an editor, `dd`, a
//! script flipping one byte) updates ctime, which, unlike mtime, cannot be set back by a
//! user (`touch -d` sets mtime and atime, and bumps ctime). Replacing the file changes the
//! inode. As git does for its index ("racily clean" entries), a stamp is only written when
//! the file's last change is at least 2 s older than the hash, so a write in the same clock
//! tick as the hash cannot hide behind an equal timestamp; until then every load re-hashes.
//! What the stamp cannot see is corruption below the file system (bit rot on the disk):
//! `microllm verify` re-hashes everything and does not trust stamps.

use crate::error::StoreError;
use crate::http::CHUNK;
use crate::progress::Progress;
use crate::sign::{check_signature, SignatureStatus};
use crate::store::{is_sha256_hex, Manifest, Store};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Manifests that cannot be read: (path, why).
pub(crate) type BadManifests = Vec<(PathBuf, String)>;

/// A stamp is written only when the blob's last change is at least this old.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What a blob looked like when it last hashed right.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    sha256: String,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    /// The identity of the file behind `md` (None where ctime/inode are unavailable: there
    /// every load re-hashes).
    #[cfg(unix)]
    fn of(sha256: &str, md: &fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        Some(Self {
            sha256: sha256.to_string(),
            size: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
            ino: md.ino(),
            dev: md.dev(),
        })
    }

    #[cfg(not(unix))]
    fn of(_sha256: &str, _md: &fs::Metadata) -> Option<Self> {
        None
    }

    /// True if the last change is old enough for the stamp to be trusted later.
    fn settled(&self, now: SystemTime) -> bool {
        let now_ns = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        now_ns - self.mtime_ns.max(self.ctime_ns) >= RACY_WINDOW.as_nanos() as i128
    }
}

fn stamp_path(store: &Store, sha: &str) -> PathBuf {
    store
        .home()
        .join("verified")
        .join(format!("sha256-{sha}.json"))
}

fn read_stamp(store: &Store, sha: &str) -> Option<Stamp> {
    serde_json::from_slice(&fs::read(stamp_path(store, sha)).ok()?).ok()
}

/// Records a successful hash (if the file has settled). Failures are ignored: a read-only
/// store simply re-hashes at every load.
fn remember(store: &Store, stamp: &Stamp) {
    if !stamp.settled(SystemTime::now()) {
        return;
    }
    let dir = store.home().join("verified");
    let Ok(mut t) = tempfile::Builder::new().prefix("stamp-").tempfile_in(&dir) else {
        return;
    };
    let text = serde_json::to_vec(stamp).unwrap_or_default();
    if t.write_all(&text).is_ok() {
        let _ = t.persist(stamp_path(store, &stamp.sha256));
    }
}

/// Drops the stamp of a blob (replaced or removed).
pub(crate) fn forget(store: &Store, sha: &str) {
    let _ = fs::remove_file(stamp_path(store, sha));
}

/// sha256 of a file, lowercase hex, reporting progress.
pub fn sha256_file(path: &Path, progress: &mut dyn Progress) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        progress.advance(n as u64);
    }
    Ok(hex::encode(h.finalize()))
}

/// True if the blob at `path` has `size` bytes and hashes to `sha`, trusting an unchanged
/// stamp; records a stamp after a successful hash. Missing or unreadable: false.
pub(crate) fn blob_is_intact(
    store: &Store,
    sha: &str,
    size: u64,
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<bool, StoreError> {
    let Ok(md) = fs::metadata(path) else {
        return Ok(false);
    };
    if !md.is_file() || md.len() != size {
        return Ok(false);
    }
    let now = Stamp::of(sha, &md);
    if let (Some(now), Some(old)) = (&now, read_stamp(store, sha)) {
        if *now == old {
            return Ok(true);
        }
    }
    progress.start(&format!("verifying {}", short(sha)), Some(size));
    let got = sha256_file(path, progress);
    progress.finish();
    let Ok(got) = got else {
        return Ok(false);
    };
    if got != sha {
        forget(store, sha);
        return Ok(false);
    }
    // Stamp what we hashed, if the file did not change meanwhile.
    if let (Some(before), Ok(after)) = (now, fs::metadata(path)) {
        if Stamp::of(sha, &after).as_ref() == Some(&before) {
            remember(store, &before);
        }
    }
    Ok(true)
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// The state of one blob found by [`Store::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BlobStatus {
    Ok,
    Missing,
    WrongSize { expected: u64, got: u64 },
    Corrupt { got: String },
    Unreadable { message: String },
}

impl BlobStatus {
    pub fn is_ok(&self) -> bool {
        *self == BlobStatus::Ok
    }
}

/// One model checked by [`Store::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyEntry {
    /// `name:tag`.
    pub name: String,
    pub sha256: String,
    pub path: PathBuf,
    pub blob: BlobStatus,
    pub signature: SignatureStatus,
}

impl VerifyEntry {
    pub fn is_ok(&self) -> bool {
        self.blob.is_ok()
            && matches!(
                self.signature,
                SignatureStatus::NotChecked | SignatureStatus::Valid
            )
    }
}

/// A file in `blobs/` that no manifest references.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StrayBlob {
    pub path: PathBuf,
    pub blob: BlobStatus,
}

/// What [`Store::verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub models: Vec<VerifyEntry>,
    /// Manifests that cannot be read: (path, why).
    pub bad_manifests: Vec<(PathBuf, String)>,
    /// Unreferenced files in `blobs/` (only when verifying the whole store).
    pub stray_blobs: Vec<StrayBlob>,
}

impl VerifyReport {
    /// Corrupt or missing blobs, failed signatures, unreadable manifests, corrupt strays.
    pub fn problems(&self) -> usize {
        self.models.iter().filter(|e| !e.is_ok()).count()
            + self.bad_manifests.len()
            + self.stray_blobs.iter().filter(|s| !s.blob.is_ok()).count()
    }
}

impl Store {
    /// Re-hashes the blob of `model` (or of every stored model, plus unreferenced blobs),
    /// ignoring stamps, and reports every missing, wrong-sized or corrupt one. With `key`,
    /// also checks each manifest's signature by that key. Each blob is hashed once.
    pub fn verify(
        &self,
        model: Option<&str>,
        key: Option<&VerifyingKey>,
        progress: &mut dyn Progress,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let manifests = match model {
            Some(m) => vec![self.manifest(m)?],
            None => {
                let (good, bad) = self.scan_manifests()?;
                report.bad_manifests = bad;
                good
            }
        };
        let mut seen: BTreeMap<String, BlobStatus> = BTreeMap::new();
        for m in &manifests {
            let path = self.blob_path(&m.sha256);
            let blob = match seen.get(&m.sha256) {
                Some(s) => s.clone(),
                None => {
                    let s =
                        self.hash_blob(&m.sha256, Some(m.size), &path, &m.display_name(), progress);
                    seen.insert(m.sha256.clone(), s.clone());
                    s
                }
            };
            report.models.push(VerifyEntry {
                name: m.display_name(),
                sha256: m.sha256.clone(),
                path,
                blob,
                signature: key.map_or(SignatureStatus::NotChecked, |k| check_signature(m, k)),
            });
        }
        if model.is_none() {
            let referenced: BTreeSet<String> = manifests
                .iter()
                .map(|m| format!("sha256-{}", m.sha256))
                .collect();
            let dir = self.home().join("blobs");
            let rd = fs::read_dir(&dir).map_err(|e| StoreError::io("read directory", &dir, e))?;
            let mut strays: Vec<PathBuf> = rd
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_none_or(|n| !referenced.contains(n))
                })
                .map(|e| e.path())
                .collect();
            strays.sort();
            for path in strays {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let blob = match name.strip_prefix("sha256-").filter(|h| is_sha256_hex(h)) {
                    Some(sha) => self.hash_blob(sha, None, &path, name, progress),
                    None => BlobStatus::Unreadable {
                        message: "not a blob name (sha256-<64 hex>)".into(),
                    },
                };
                report.stray_blobs.push(StrayBlob { path, blob });
            }
        }
        Ok(report)
    }

    /// Full hash of one blob (stamps ignored; refreshed on success, dropped on failure).
    fn hash_blob(
        &self,
        sha: &str,
        size: Option<u64>,
        path: &Path,
        label: &str,
        progress: &mut dyn Progress,
    ) -> BlobStatus {
        let md = match fs::metadata(path) {
            Ok(md) if md.is_file() => md,
            Ok(_) => {
                return BlobStatus::Unreadable {
                    message: "not a regular file".into(),
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return BlobStatus::Missing,
            Err(e) => {
                return BlobStatus::Unreadable {
                    message: e.to_string(),
                }
            }
        };
        if let Some(expected) = size.filter(|&s| s != md.len()) {
            forget(self, sha);
            return BlobStatus::WrongSize {
                expected,
                got: md.len(),
            };
        }
        progress.start(&format!("verifying {label}"), Some(md.len()));
        let got = sha256_file(path, progress);
        progress.finish();
        match got {
            Ok(got) if got == sha => {
                if let Some(st) = Stamp::of(sha, &md) {
                    if fs::metadata(path)
                        .ok()
                        .and_then(|a| Stamp::of(sha, &a))
                        .is_some_and(|a| a == st)
                    {
                        remember(self, &st);
                    }
                }
                BlobStatus::Ok
            }
            Ok(got) => {
                forget(self, sha);
                BlobStatus::Corrupt { got }
            }
            Err(e) => BlobStatus::Unreadable {
                message: e.to_string(),
            },
        }
    }

    /// Every manifest: the readable ones (sorted by name, tag) and the unreadable ones.
    pub(crate) fn scan_manifests(&self) -> Result<(Vec<Manifest>, BadManifests), StoreError> {
        let root = self.home().join("manifests");
        let dirs = fs::read_dir(&root).map_err(|e| StoreError::io("read directory", &root, e))?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().to_string();
            let Ok(files) = fs::read_dir(d.path()) else {
                bad.push((d.path(), "not a directory of manifests".into()));
                continue;
            };
            for f in files.flatten() {
                let fname = f.file_name().to_string_lossy().to_string();
                let Some(tag) = fname.strip_suffix(".json") else {
                    continue;
                };
                match self.read_manifest(&name, tag) {
                    Ok(Some(m)) => good.push(m),
                    Ok(None) => {}
                    Err(e) => bad.push((f.path(), e.to_string())),
                }
            }
        }
        good.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
        bad.sort();
        Ok((good, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racy_stamps_are_not_trusted() {
        let st = Stamp {
            sha256: String::new(),
            size: 1,
            mtime_ns: 10_000_000_000,
            ctime_ns: 11_000_000_000,
            ino: 1,
            dev: 1,
        };
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(!st.settled(at(12)));
        assert!(st.settled(at(13)));
    }
}
