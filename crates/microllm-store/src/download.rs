//! Resumable downloads of one URL into `tmp/`.
//!
//! A download writes `tmp/dl-<key>.part` (key = sha256 of the URL), next to a sidecar
//! `tmp/dl-<key>.json` that records the URL, the total size and the validator (strong ETag,
//! else Last-Modified) of the response, written before the first body byte. When a pull is
//! interrupted (network cut, Ctrl-C, kill -9) the partial file stays; the next pull of the same
//! URL re-hashes the bytes it has, asks for the rest with `Range: bytes=N-` and `If-Range`,
//! appends on `206 Partial Content` and starts over on `200` (the file changed, or the server
//! ignores ranges). If a resumed file then fails its checksum, it is discarded and downloaded
//! once more from scratch. `tmp/` is never read as a model: only the caller's `finish` step,
//! after every check, moves bytes into `blobs/`.

use crate::error::StoreError;
use crate::http::{Http, CHUNK};
use crate::progress::Progress;
use crate::pypi::host_of;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// What the downloaded bytes must be, if known.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Expect<'a> {
    /// Lowercase hex sha256.
    pub sha256: Option<&'a str>,
    pub size: Option<u64>,
}

/// One URL to fetch.
pub(crate) struct Download<'a> {
    pub http: &'a Http,
    pub tmp_dir: &'a Path,
    pub locks_dir: &'a Path,
    pub url: &'a str,
    /// Progress label, e.g. `downloading model.gguf`.
    pub what: &'a str,
    pub expect: Expect<'a>,
    /// Keep the complete file in `tmp/` after `finish` (parts of a multi-part model, so a
    /// retry need not fetch them again); the caller removes it with [`remove_part`].
    pub keep: bool,
}

/// A complete, checked download (valid during the `finish` step of [`fetch`]).
#[derive(Debug)]
pub(crate) struct Fetched<'p> {
    pub path: &'p Path,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Sidecar {
    url: String,
    total: Option<u64>,
    etag: Option<String>,
    last_modified: Option<String>,
    /// Set once the whole body was received and fsynced.
    complete: bool,
}

enum Outcome {
    Done {
        size: u64,
        sha256: String,
    },
    /// Throw the partial file away and download from scratch.
    Restart,
}

/// The partial file and sidecar of `url` in `tmp_dir`.
pub(crate) fn part_paths(tmp_dir: &Path, url: &str) -> (PathBuf, PathBuf) {
    let key = &hex::encode(Sha256::digest(url.as_bytes()))[..32];
    (
        tmp_dir.join(format!("dl-{key}.part")),
        tmp_dir.join(format!("dl-{key}.json")),
    )
}

/// Downloads `d.url` (resuming a previous partial download), checks it against `d.expect`
/// and Hugging Face's `X-Linked-Etag`, then runs `finish` on the complete file while holding
/// the URL's lock (it may move the file away). `before_body` sees the total size before the
/// body is read and may refuse (the fit check). The partial file is kept when the transfer
/// breaks, and removed when its content is wrong.
pub(crate) fn fetch<T>(
    d: &Download<'_>,
    before_body: &mut dyn FnMut(Option<u64>) -> Result<(), StoreError>,
    progress: &mut dyn Progress,
    finish: impl FnOnce(&Fetched<'_>, &mut dyn Progress) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let (part, side) = part_paths(d.tmp_dir, d.url);
    let lock_path = lock_path(d.locks_dir, &part);
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

    let mut fresh = false;
    loop {
        match attempt(d, &part, &side, fresh, before_body, progress)? {
            Outcome::Done { size, sha256 } => {
                let r = finish(
                    &Fetched {
                        path: &part,
                        size,
                        sha256,
                    },
                    progress,
                );
                if r.is_err() || !d.keep {
                    // Rejected by the caller (not a model, bad wheel), or used up.
                    discard(&part, &side);
                }
                return r;
            }
            Outcome::Restart if !fresh => {
                discard(&part, &side);
                fresh = true;
            }
            Outcome::Restart => {
                discard(&part, &side);
                return Err(StoreError::Network {
                    host: host_of(d.url),
                    url: d.url.to_string(),
                    message: "the server does not answer range requests consistently".into(),
                });
            }
        }
    }
}

/// Removes the kept download of `url` (taking its lock, so no pull is using it).
pub(crate) fn remove_part(tmp_dir: &Path, locks_dir: &Path, url: &str) {
    let (part, side) = part_paths(tmp_dir, url);
    let lock_path = lock_path(locks_dir, &part);
    if let Ok(f) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
    {
        let mut lock = fd_lock::RwLock::new(f);
        let guard = lock.write();
        if guard.is_ok() {
            discard(&part, &side);
        }
        drop(guard);
    }
}

fn lock_path(locks_dir: &Path, part: &Path) -> PathBuf {
    locks_dir.join(format!(
        "{}.lock",
        part.file_stem().and_then(|s| s.to_str()).unwrap_or("dl")
    ))
}

fn discard(part: &Path, side: &Path) {
    let _ = fs::remove_file(side);
    let _ = fs::remove_file(part);
}

fn read_sidecar(side: &Path) -> Option<Sidecar> {
    serde_json::from_slice(&fs::read(side).ok()?).ok()
}

fn write_sidecar(side: &Path, tmp_dir: &Path, sc: &Sidecar) -> Result<(), StoreError> {
    let mut t = tempfile::Builder::new()
        .prefix("sidecar-")
        .tempfile_in(tmp_dir)
        .map_err(|e| StoreError::io("create a temporary file in", tmp_dir, e))?;
    let text = serde_json::to_vec(sc).unwrap_or_default();
    t.write_all(&text)
        .and_then(|_| t.as_file().sync_all())
        .map_err(|e| StoreError::io("write", side, e))?;
    t.persist(side)
        .map_err(|e| StoreError::io("write", side, e.error))?;
    Ok(())
}

/// A strong validator for `If-Range`: a strong ETag, else Last-Modified.
fn validator(sc: &Sidecar) -> Option<&str> {
    sc.etag
        .as_deref()
        .filter(|e| !e.starts_with("W/"))
        .or(sc.last_modified.as_deref())
}

/// `"<64 hex>"` (Hugging Face's X-Linked-Etag for LFS files) -> the sha256.
pub(crate) fn sha_from_etag(etag: &str) -> Option<String> {
    let e = etag.strip_prefix("W/").unwrap_or(etag).trim_matches('"');
    (e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit())).then(|| e.to_ascii_lowercase())
}

fn attempt(
    d: &Download<'_>,
    part: &Path,
    side: &Path,
    fresh: bool,
    before_body: &mut dyn FnMut(Option<u64>) -> Result<(), StoreError>,
    progress: &mut dyn Progress,
) -> Result<Outcome, StoreError> {
    let io = |op, e| StoreError::io(op, part, e);
    // What is already here from an earlier, interrupted pull of the same URL.
    let mut have = 0u64;
    let mut prev = None;
    if !fresh {
        let len = fs::metadata(part)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        match (len, read_sidecar(side)) {
            (Some(len), Some(sc)) if sc.url == d.url && sc.total.is_none_or(|t| len <= t) => {
                have = len;
                prev = Some(sc);
            }
            (None, None) => {}
            _ => discard(part, side),
        }
    } else {
        discard(part, side);
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)
        .map_err(|e| io("open", e))?;
    if prev.is_none() {
        file.set_len(0).map_err(|e| io("truncate", e))?;
    }

    // Re-hash the bytes we keep: the digest must cover the whole file.
    let mut hasher = Sha256::new();
    if have > 0 {
        progress.start(
            &format!("checking the partial download ({})", d.what),
            Some(have),
        );
        let mut buf = vec![0u8; CHUNK];
        let mut left = have;
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            file.read_exact(&mut buf[..n]).map_err(|e| io("read", e))?;
            hasher.update(&buf[..n]);
            progress.advance(n as u64);
            left -= n as u64;
        }
        progress.finish();
    }
    let resumed = have > 0;

    if prev
        .as_ref()
        .is_some_and(|sc| sc.complete && sc.total == Some(have))
    {
        // Complete earlier (a later step failed): no request needed if it checks out.
        let sha = hex::encode(hasher.finalize());
        return Ok(match d.expect.sha256 {
            Some(want) if want != sha => Outcome::Restart,
            _ => Outcome::Done {
                size: have,
                sha256: sha,
            },
        });
    }

    let range_from = resumed.then_some(have);
    let opened = match d
        .http
        .open(d.url, range_from, prev.as_ref().and_then(validator))
    {
        Ok(o) => o,
        Err(e) => {
            if !resumed {
                discard(part, side);
            }
            return Err(e);
        }
    };
    let known_total = prev.as_ref().and_then(|sc| sc.total);
    let total;
    match opened.status {
        206 if resumed => match opened.content_range {
            Some((start, _, t))
                if start == have && (known_total.is_none() || t.is_none() || t == known_total) =>
            {
                total = t.or(known_total);
            }
            _ => return Ok(Outcome::Restart),
        },
        416 if resumed => {
            return Ok(if known_total == Some(have) {
                let sha = hex::encode(hasher.finalize());
                match d.expect.sha256 {
                    Some(want) if want != sha => Outcome::Restart,
                    _ => Outcome::Done {
                        size: have,
                        sha256: sha,
                    },
                }
            } else {
                Outcome::Restart
            });
        }
        206 => return Ok(Outcome::Restart),
        200..=299 => {
            // A full body: start over (the file changed, or ranges are not supported).
            if resumed {
                hasher = Sha256::new();
                have = 0;
                file.set_len(0).map_err(|e| io("truncate", e))?;
            }
            total = opened.content_length.or(opened.linked_size);
        }
        status => {
            if !resumed {
                discard(part, side);
            }
            return Err(StoreError::HttpStatus {
                url: opened.url,
                status,
            });
        }
    }

    // The digest to check: the caller's, and Hugging Face's X-Linked-Etag for LFS files.
    let linked = opened.linked_etag.as_deref().and_then(sha_from_etag);
    let expected = match (d.expect.sha256, linked) {
        (Some(want), Some(server)) if want != server => {
            discard(part, side);
            return Err(StoreError::Checksum {
                what: format!("{} (the server's X-Linked-Etag)", d.what),
                expected: want.to_string(),
                got: server,
            });
        }
        (Some(want), _) => Some(want.to_string()),
        (None, linked) => linked,
    };
    if let (Some(want), Some(t)) = (d.expect.size, total) {
        if want != t {
            discard(part, side);
            return Err(StoreError::SizeMismatch {
                what: d.what.to_string(),
                expected: want,
                got: t,
            });
        }
    }
    if let Err(e) = before_body(total) {
        if !resumed {
            discard(part, side);
        }
        return Err(e);
    }
    let mut sc = Sidecar {
        url: d.url.to_string(),
        total,
        etag: opened.etag.clone(),
        last_modified: opened.last_modified.clone(),
        complete: false,
    };
    write_sidecar(side, d.tmp_dir, &sc)?;
    file.seek(SeekFrom::Start(have))
        .map_err(|e| io("seek", e))?;

    progress.start(d.what, total);
    progress.advance(have);
    let cap = d.expect.size.or(total);
    let mut reader = opened.body.into_reader();
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = have;
    let interrupted = |n: u64, why: String| {
        StoreError::Network {
        host: host_of(d.url),
        url: d.url.to_string(),
        message: format!(
            "the download stopped after {n}{} bytes ({why}); the partial file is kept: run the same pull again to resume",
            total.map(|t| format!(" of {t}")).unwrap_or_default()
        ),
    }
    };
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                progress.finish();
                return Err(interrupted(n_total, e.to_string()));
            }
        };
        if cap.is_some_and(|c| n_total + n as u64 > c) {
            progress.finish();
            discard(part, side);
            return Err(StoreError::SizeMismatch {
                what: d.what.to_string(),
                expected: cap.unwrap_or(0),
                got: n_total + n as u64,
            });
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| io("write", e))?;
        n_total += n as u64;
        progress.advance(n as u64);
    }
    progress.finish();
    if let Some(t) = total {
        if n_total != t {
            return Err(interrupted(n_total, "the connection closed early".into()));
        }
    }
    file.sync_all().map_err(|e| io("sync", e))?;
    sc.total = Some(n_total);
    sc.complete = true;
    write_sidecar(side, d.tmp_dir, &sc)?;

    let sha = hex::encode(hasher.finalize());
    if let Some(want) = expected {
        if want != sha {
            if resumed {
                // The kept prefix may be what was wrong: try once more from scratch.
                return Ok(Outcome::Restart);
            }
            discard(part, side);
            return Err(StoreError::Checksum {
                what: d.what.to_string(),
                expected: want,
                got: sha,
            });
        }
    }
    Ok(Outcome::Done {
        size: n_total,
        sha256: sha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        let h = "A".repeat(64);
        assert_eq!(sha_from_etag(&format!("\"{h}\"")), Some("a".repeat(64)));
        assert_eq!(sha_from_etag(&format!("W/\"{h}\"")), Some("a".repeat(64)));
        assert_eq!(sha_from_etag("\"abc\""), None);
        let sc = Sidecar {
            etag: Some("W/\"x\"".into()),
            last_modified: Some("Tue".into()),
            ..Default::default()
        };
        assert_eq!(validator(&sc), Some("Tue"));
        let (p, s) = part_paths(Path::new("/t"), "http://h/x.gguf");
        assert!(p.to_str().unwrap().ends_with(".part") && s.to_str().unwrap().ends_with(".json"));
        assert_eq!(p.file_stem(), s.file_stem());
    }
}
