//! `hf:` and `https:` sources against a local server imitating Hugging Face: full download,
//! Range resume after a cut connection, restarts, wrong checksums, non-GGUF content and the
//! fit check made before the body is read.

mod common;

use common::*;
use microllm_store::{
    AvailableMemory, FitCheck, NoProgress, ProxyConfig, PullOptions, Resolved, Store, StoreError,
};

fn store(server: &HttpServer) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().join("home"))
        .unwrap()
        .with_hf_url(&server.base)
        .with_index_url(format!("{}/simple", server.base))
        .with_proxy(ProxyConfig::Direct);
    (dir, s)
}

fn blobs(s: &Store) -> Vec<String> {
    ls(&s.home().join("blobs"))
}
fn manifests(s: &Store) -> Vec<String> {
    ls(&s.home().join("manifests"))
}
fn tmp(s: &Store) -> Vec<String> {
    ls(&s.home().join("tmp"))
}

const MB: usize = 1 << 20;

#[test]
fn hf_full_download() {
    let server = HttpServer::start();
    let model = fake_model(3 * MB, 1);
    server.hf_file(
        "org",
        "Repo-GGUF",
        "main",
        "Tiny.Q8_0.gguf",
        model.clone(),
        None,
    );
    let (_d, s) = store(&server);
    let mut rec = Recorder::default();
    let pulled = s
        .pull_with(
            "hf:org/Repo-GGUF/Tiny.Q8_0.gguf",
            &PullOptions::default(),
            &mut rec,
        )
        .unwrap();
    assert!(pulled.fetched);
    let sha = sha_hex(&model);
    assert_eq!(pulled.path, s.blob_path(&sha));
    assert_eq!(std::fs::read(&pulled.path).unwrap(), model);
    let m = &pulled.manifest;
    assert_eq!((m.name.as_str(), m.tag.as_str()), ("tiny.q8_0", "main"));
    assert_eq!(m.source, "hf:org/Repo-GGUF/Tiny.Q8_0.gguf");
    let info = m.info.as_ref().unwrap();
    assert_eq!(info.architecture.as_deref(), Some("llama"));
    assert_eq!(info.quantization, "Q8_0");
    assert_eq!(info.shape.unwrap().n_layer, 2);
    assert!(tmp(&s).is_empty(), "{:?}", tmp(&s));
    // Blobs are read-only.
    assert!(std::fs::metadata(&pulled.path)
        .unwrap()
        .permissions()
        .readonly());
    // The resolve URL, then the CDN; no Range on a fresh download.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].path, "/org/Repo-GGUF/resolve/main/Tiny.Q8_0.gguf");
    assert_eq!(reqs[0].status, 302);
    assert!(reqs[1].path.starts_with("/cdn-lfs/org/Repo-GGUF/"));
    assert_eq!((reqs[1].status, reqs[1].range.as_deref()), (200, None));
    let last = rec.phases.last().unwrap();
    assert_eq!(last.1, Some(model.len() as u64));
    assert_eq!(last.2, model.len() as u64);

    // Stored under the derived name; a second pull is a no-op.
    match s.resolve("tiny.q8_0").unwrap() {
        Resolved::Stored { manifest, .. } => assert_eq!(manifest.sha256, sha),
        other => panic!("{other:?}"),
    }
    let again = s
        .pull_with(
            "hf:org/Repo-GGUF/Tiny.Q8_0.gguf",
            &PullOptions::default(),
            &mut NoProgress,
        )
        .unwrap();
    assert!(!again.fetched);
    assert_eq!(server.requests().len(), 2);
}

#[test]
fn hf_revision_and_custom_name() {
    let server = HttpServer::start();
    let model = fake_model(100_000, 2);
    server.hf_file("o", "r", "v1.0", "sub/m.gguf", model.clone(), None);
    let (_d, s) = store(&server);
    let opts = PullOptions {
        name: Some("mine:v1".into()),
        ..Default::default()
    };
    let p = s
        .pull_with("hf:o/r/sub/m.gguf@v1.0", &opts, &mut NoProgress)
        .unwrap();
    assert_eq!(p.manifest.display_name(), "mine:v1");
    assert_eq!(
        std::fs::read(s.resolve("mine:v1").unwrap().path()).unwrap(),
        model
    );
}

/// Sets up a server with one model at /files/model.gguf and a store, and cuts the first
/// download after `cut` bytes: the pull fails with the partial file kept in tmp/.
fn interrupted(cut: u64, seed: u64) -> (HttpServer, tempfile::TempDir, Store, Vec<u8>, String) {
    let server = HttpServer::start();
    let model = fake_model(3 * MB, seed);
    server.file("/files/model.gguf", model.clone(), Some("\"v1\""));
    let url = format!("{}/files/model.gguf", server.base);
    let (d, s) = store(&server);
    server.set(|b| b.cut_after = Some(cut));
    let err = s.pull(&url, &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Network { .. }), "{err:?}");
    assert!(err.to_string().contains("resume"), "{err}");
    // Nothing that looks complete: no blob, no manifest, not resolvable.
    assert!(blobs(&s).is_empty() && manifests(&s).is_empty());
    assert!(matches!(s.resolve(&url), Err(StoreError::NotPulled { .. })));
    let t = tmp(&s);
    assert_eq!(t.len(), 2, "{t:?}");
    assert!(t.iter().any(|f| f.ends_with(".part")) && t.iter().any(|f| f.ends_with(".json")));
    (server, d, s, model, url)
}

fn part_len(s: &Store) -> u64 {
    let part = tmp(s).into_iter().find(|f| f.ends_with(".part")).unwrap();
    std::fs::metadata(s.home().join("tmp").join(part))
        .unwrap()
        .len()
}

#[test]
fn resumes_with_range_after_a_cut_connection() {
    let (server, _d, s, model, url) = interrupted(1_234_567, 3);
    let have = part_len(&s);
    assert_eq!(have, 1_234_567);
    let mut rec = Recorder::default();
    let p = s.pull(&url, &mut rec).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), model);
    let reqs = server.requests();
    let last = reqs.last().unwrap();
    assert_eq!(last.range.as_deref(), Some("bytes=1234567-"), "{reqs:?}");
    assert_eq!(last.if_range.as_deref(), Some("\"v1\""));
    assert_eq!(last.status, 206);
    // The kept prefix was re-hashed, then only the rest was downloaded.
    assert!(rec.phases[0].0.starts_with("checking the partial download"));
    assert_eq!(rec.phases[0].2, have);
    assert_eq!(rec.phases[1].1, Some(model.len() as u64));
    assert_eq!(rec.phases[1].2, model.len() as u64);
    assert!(tmp(&s).is_empty(), "{:?}", tmp(&s));
    assert_eq!(manifests(&s), vec!["model"]);
}

#[test]
fn restarts_when_the_server_ignores_ranges() {
    let (server, _d, s, model, url) = interrupted(500_000, 4);
    server.set(|b| b.ignore_range = true);
    let p = s.pull(&url, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), model);
    let last = server.requests().pop().unwrap();
    assert_eq!((last.range.is_some(), last.status), (true, 200));
}

#[test]
fn restarts_when_the_file_changed_upstream() {
    let (server, _d, s, _old, url) = interrupted(500_000, 5);
    let new = fake_model(2 * MB, 55);
    server.file("/files/model.gguf", new.clone(), Some("\"v2\""));
    let p = s.pull(&url, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), new);
    let last = server.requests().pop().unwrap();
    // If-Range carried the old ETag, so the server sent the whole new file.
    assert_eq!(last.if_range.as_deref(), Some("\"v1\""));
    assert_eq!(last.status, 200);
}

#[test]
fn damaged_partial_file_is_caught_and_downloaded_again() {
    let server = HttpServer::start();
    let model = fake_model(3 * MB, 6);
    server.hf_file("o", "r", "main", "m.gguf", model.clone(), None);
    let (_d, s) = store(&server);
    server.set(|b| b.cut_after = Some(1_000_000));
    assert!(s.pull("hf:o/r/m.gguf", &mut NoProgress).is_err());
    // Bit rot in the kept prefix: the X-Linked-Etag digest catches it after the resume,
    // and the file is fetched once more from scratch.
    let part = tmp(&s).into_iter().find(|f| f.ends_with(".part")).unwrap();
    let part = s.home().join("tmp").join(part);
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[12_345] ^= 0x40;
    std::fs::write(&part, bytes).unwrap();
    let p = s.pull("hf:o/r/m.gguf", &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), model);
    let statuses: Vec<(Option<String>, u16)> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn-lfs"))
        .map(|r| (r.range, r.status))
        .collect();
    assert_eq!(
        statuses,
        vec![
            (None, 200),
            (Some("bytes=1000000-".into()), 206),
            (None, 200)
        ]
    );
    assert!(tmp(&s).is_empty());
}

#[test]
fn wrong_checksum_is_refused_and_nothing_is_left() {
    let server = HttpServer::start();
    let model = fake_model(2 * MB, 7);
    server.file("/m.gguf", model.clone(), Some("\"e\""));
    let (_d, s) = store(&server);
    let url = format!("{}/m.gguf", server.base);
    let wrong = "0".repeat(64);
    let opts = PullOptions {
        sha256: Some(wrong.clone()),
        ..Default::default()
    };
    let err = s.pull_with(&url, &opts, &mut NoProgress).unwrap_err();
    match &err {
        StoreError::Checksum { expected, got, .. } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*got, sha_hex(&model));
        }
        other => panic!("{other:?}"),
    }
    assert!(blobs(&s).is_empty() && manifests(&s).is_empty() && tmp(&s).is_empty());
    assert!(matches!(s.resolve(&url), Err(StoreError::NotPulled { .. })));

    // The right digest (any case) is accepted.
    let opts = PullOptions {
        sha256: Some(sha_hex(&model).to_ascii_uppercase()),
        ..Default::default()
    };
    let p = s.pull_with(&url, &opts, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(p.path).unwrap(), model);
}

#[test]
fn hf_digest_is_checked_against_the_servers_linked_etag() {
    let server = HttpServer::start();
    let model = fake_model(MB, 8);
    // The hub announces another digest than the bytes served (a bad mirror).
    server.hf_file(
        "o",
        "r",
        "main",
        "bad.gguf",
        model.clone(),
        Some(&"ab".repeat(32)),
    );
    server.hf_file("o", "r", "main", "good.gguf", model.clone(), None);
    let (_d, s) = store(&server);
    let err = s.pull("hf:o/r/bad.gguf", &mut NoProgress).unwrap_err();
    assert!(
        matches!(&err, StoreError::Checksum { expected, .. } if *expected == "ab".repeat(32)),
        "{err:?}"
    );
    assert!(blobs(&s).is_empty() && manifests(&s).is_empty() && tmp(&s).is_empty());

    // A --sha256 that contradicts the hub is refused before the body is read.
    let opts = PullOptions {
        sha256: Some("cd".repeat(32)),
        ..Default::default()
    };
    let err = s
        .pull_with("hf:o/r/good.gguf", &opts, &mut NoProgress)
        .unwrap_err();
    assert!(err.to_string().contains("X-Linked-Etag"), "{err}");
    assert!(blobs(&s).is_empty() && tmp(&s).is_empty());
}

#[test]
fn non_gguf_content_is_refused() {
    let server = HttpServer::start();
    server.file(
        "/login.gguf",
        b"<html><body>Please log in</body></html>".to_vec(),
        None,
    );
    let (_d, s) = store(&server);
    let err = s
        .pull(&format!("{}/login.gguf", server.base), &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotGguf { .. }), "{err:?}");
    assert!(err.to_string().contains("not a GGUF model"), "{err}");
    assert!(blobs(&s).is_empty() && manifests(&s).is_empty() && tmp(&s).is_empty());
}

#[test]
fn http_errors() {
    let server = HttpServer::start();
    server
        .routes
        .lock()
        .unwrap()
        .insert("/gone.gguf".into(), Served::Status(404));
    let (_d, s) = store(&server);
    let err = s
        .pull(&format!("{}/gone.gguf", server.base), &mut NoProgress)
        .unwrap_err();
    assert!(
        matches!(err, StoreError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    let err = s.pull("hf:o/r/missing.gguf", &mut NoProgress).unwrap_err();
    assert!(
        matches!(err, StoreError::HttpStatus { status: 404, .. }),
        "{err:?}"
    );
    assert!(tmp(&s).is_empty());
}

#[test]
fn fit_check_refuses_before_the_body() {
    let server = HttpServer::start();
    let model = fake_model(3 * MB, 9);
    server.file("/big.gguf", model, None);
    let (_d, s) = store(&server);
    let opts = PullOptions {
        fit: Some(FitCheck {
            n_ctx: None,
            available: AvailableMemory {
                bytes: 2 * MB as u64,
                source: "test".into(),
            },
        }),
        ..Default::default()
    };
    let err = s
        .pull_with(&format!("{}/big.gguf", server.base), &opts, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::DoesNotFit(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("2.0 MiB of memory is available"), "{msg}");
    assert!(blobs(&s).is_empty() && tmp(&s).is_empty());

    // A catalog model is refused before any request at all, with its KV cache counted.
    let opts = PullOptions {
        fit: Some(FitCheck {
            n_ctx: Some(8192),
            available: AvailableMemory {
                bytes: 150 * MB as u64,
                source: "test".into(),
            },
        }),
        ..Default::default()
    };
    let before = server.requests().len();
    let err = s
        .pull_with("smollm2-135m-instruct", &opts, &mut NoProgress)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("KV cache 180.0 MiB"), "{msg}");
    assert!(msg.contains("--ctx"), "{msg}");
    assert_eq!(server.requests().len(), before);
}

#[test]
fn multi_part_http_sources_are_concatenated() {
    let server = HttpServer::start();
    let whole = fake_model(2 * MB + 12345, 10);
    let (a, b) = whole.split_at(MB + 7);
    server.hf_file("o", "r", "main", "m.gguf.part1", a.to_vec(), None);
    server.file("/m.gguf.part2", b.to_vec(), Some("\"p2\""));
    let (_d, s) = store(&server);
    let src = format!("hf:o/r/m.gguf.part1 + {}/m.gguf.part2", server.base);
    // hf: names must end in .gguf: parts are named through https: URLs instead.
    assert!(s.pull(&src, &mut NoProgress).is_err());
    let src = format!(
        "{0}/o/r/resolve/main/m.gguf.part1 + {0}/m.gguf.part2",
        server.base
    );
    let opts = PullOptions {
        sha256: Some(sha_hex(&whole)),
        name: Some("split:q8".into()),
        ..Default::default()
    };
    let p = s.pull_with(&src, &opts, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(&p.path).unwrap(), whole);
    assert!(tmp(&s).is_empty(), "{:?}", tmp(&s));
}
