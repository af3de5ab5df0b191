//! Store layout, names, atomicity and locking, with local (`file:`) sources only.

mod common;

use common::*;
use microllm_store::{
    catalog, ModelRef, NoProgress, Progress, PullSpec, Resolved, Source, Store, StoreError,
};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().join("home")).unwrap();
    (dir, s)
}

fn write_model(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    format!("file:{}", p.display())
}

#[test]
fn hostile_names_are_refused() {
    let long = "a".repeat(129);
    for bad in [
        "",
        ":",
        ":tag",
        "name:",
        "a:b:c",
        "..",
        "a..b",
        ".hidden",
        "-flag",
        "x y",
        "x\0y",
        "naïve",
        "con",
        "NUL.txt",
        "com1",
        "a*b",
        "a?b",
        "a%2e%2e",
        "name:../x",
        "name:a/b",
        "a\\b",
        "a/b",
        "../etc",
        "/etc/passwd",
        "C:\\x",
        &long,
    ] {
        assert!(ModelRef::parse(bad).is_err(), "{bad:?} was accepted");
    }
    for good in [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct:q4_1",
        "Model_1.5b:v2.0-rc1",
        "a",
        "con-model",
    ] {
        ModelRef::parse(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }

    let (dir, s) = new_store();
    // Through the Store: refused without touching the disk outside the store.
    for bad in ["a..b", "a:b:c", "x y", "con", "name:..", "a\0b", "-rf"] {
        assert!(
            matches!(s.resolve(bad), Err(StoreError::InvalidName { .. })),
            "{bad:?}"
        );
        assert!(
            matches!(
                s.pull(bad, &mut NoProgress),
                Err(StoreError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    // Path-like strings are paths, never names: a missing one is reported as such, and
    // cannot be pulled.
    for bad in ["..", ".hidden", "../x", "a/b", "a\\b", "~/x"] {
        assert!(
            matches!(s.resolve(bad), Err(StoreError::ModelFileNotFound { .. })),
            "{bad:?}"
        );
        assert!(
            matches!(
                s.pull(bad, &mut NoProgress),
                Err(StoreError::BadSource { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        s.resolve("../../etc/passwd"),
        Err(StoreError::ModelFileNotFound { .. })
    ));
    assert!(matches!(
        s.pull("/etc/passwd", &mut NoProgress),
        Err(StoreError::BadSource { .. })
    ));
    // A hand-made spec with a hostile name is refused before anything is written.
    let src = write_model(dir.path(), "m.gguf", b"GGUF");
    for (name, tag) in [("../../evil", "x"), ("ok", "../x"), ("ok", "")] {
        let spec = PullSpec {
            name: name.into(),
            tag: tag.into(),
            source: Source::parse(&src).unwrap(),
            sha256: None,
            size: None,
        };
        assert!(matches!(
            s.pull_spec(&spec, &mut NoProgress),
            Err(StoreError::InvalidName { .. })
        ));
    }
    assert!(ls(&s.home().join("blobs")).is_empty());
    assert_eq!(ls(dir.path()), vec!["home", "m.gguf"]);
    let msg = ModelRef::parse("a/b").unwrap_err().to_string();
    assert!(msg.contains("A-Z a-z 0-9"), "{msg}");
}

#[test]
fn forged_manifest_cannot_point_outside_blobs() {
    let (_d, s) = new_store();
    let dir = s.home().join("manifests/evil");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("latest.json"),
        r#"{"schema":1,"name":"evil","tag":"latest","source":"file:/x","size":1,"sha256":"../../../../etc/passwd","added":"x"}"#,
    )
    .unwrap();
    assert!(matches!(
        s.resolve("evil:latest"),
        Err(StoreError::BadManifest { .. })
    ));
    std::fs::write(dir.join("latest.json"), "{not json").unwrap();
    let err = s.resolve("evil").unwrap_err();
    assert!(matches!(err, StoreError::BadManifest { .. }), "{err:?}");
    assert!(err.to_string().contains("delete it"));
}

#[test]
fn file_import_layout_and_resolve() {
    let (dir, s) = new_store();
    let data = fake_model(3_000_000, 11);
    let src = write_model(dir.path(), "My-Model.Q8.gguf", &data);
    let mut rec = Recorder::default();
    let path = s.pull(&src, &mut rec).unwrap();
    let sha = sha_hex(&data);
    assert_eq!(path, s.home().join(format!("blobs/sha256-{sha}")));
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(
        ls(&s.home().join("manifests/my-model.q8")),
        vec!["latest.json"]
    );
    assert!(ls(&s.home().join("tmp")).is_empty());
    assert_eq!(rec.phases.len(), 1);
    assert_eq!(rec.phases[0].1, Some(data.len() as u64));
    assert_eq!(rec.phases[0].2, data.len() as u64);

    // Resolve by name, name:tag, source string, and by path.
    for m in ["my-model.q8", "my-model.q8:latest", src.as_str()] {
        match s.resolve(m).unwrap() {
            Resolved::Stored { path: p, manifest } => {
                assert_eq!(p, path);
                assert_eq!(manifest.sha256, sha);
                assert_eq!(manifest.size, data.len() as u64);
                assert_eq!(manifest.source, src);
            }
            other => panic!("{other:?}"),
        }
    }
    let file = dir.path().join("My-Model.Q8.gguf");
    assert_eq!(
        s.resolve(file.to_str().unwrap()).unwrap(),
        Resolved::File(file.clone())
    );
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].name.as_str(), list[0].tag.as_str()),
        ("my-model.q8", "latest")
    );

    // Pulling the stored name again is a no-op even with the source gone.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(s.pull("my-model.q8", &mut NoProgress).unwrap(), path);
}

#[test]
fn catalog_and_unknown_names() {
    let (_d, s) = new_store();
    for name in [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct:q4_1",
        "gemma3-270m",
    ] {
        let err = s.resolve(name).unwrap_err();
        assert!(
            matches!(err, StoreError::NotPulled { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("microllm pull"), "{err}");
    }
    let err = s.resolve("nope").unwrap_err();
    match &err {
        StoreError::UnknownModel { name, known } => {
            assert_eq!(name, "nope");
            assert!(known.contains(&"smollm2-135m-instruct".to_string()));
            assert!(known.contains(&"gemma3-270m".to_string()));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("-m PATH"));
    assert!(matches!(
        s.resolve("smollm2-135m-instruct:f16"),
        Err(StoreError::UnknownModel { .. })
    ));
    assert!(matches!(
        s.resolve("missing.gguf"),
        Err(StoreError::ModelFileNotFound { .. })
    ));
    assert_eq!(catalog()[0].name, microllm_store::DEFAULT_MODEL);
}

/// Panics on the first progress step, imitating a crash mid-download.
struct Crash;
impl Progress for Crash {
    fn start(&mut self, _: &str, _: Option<u64>) {}
    fn advance(&mut self, _: u64) {
        panic!("simulated crash");
    }
    fn finish(&mut self) {}
}

#[test]
fn interrupted_pull_leaves_nothing_that_looks_complete() {
    let (dir, s) = new_store();
    let data = fake_model(2_500_000, 12);
    let src = write_model(dir.path(), "m.gguf", &data);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.pull(&src, &mut Crash)));
    assert!(r.is_err());
    assert!(ls(&s.home().join("blobs")).is_empty());
    assert!(ls(&s.home().join("manifests")).is_empty());
    assert!(matches!(s.resolve(&src), Err(StoreError::NotPulled { .. })));

    // A real crash (no unwinding) leaves a partial file in tmp/: it is never taken for a
    // model, and the next pull succeeds.
    std::fs::write(s.home().join("tmp/blob-partial"), &data[..1000]).unwrap();
    assert!(matches!(s.resolve(&src), Err(StoreError::NotPulled { .. })));
    let p = s.ensure(&src, &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), data);
}

#[test]
fn damaged_blob_is_refused_by_ensure_and_repaired_by_pull() {
    let (dir, s) = new_store();
    let data = fake_model(100_000, 13);
    let src = write_model(dir.path(), "m.gguf", &data);
    let p = s.pull(&src, &mut NoProgress).unwrap();
    make_writable(&p);
    std::fs::write(&p, &data[..10]).unwrap();
    let err = s.resolve("m").unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    assert!(err.to_string().contains("pull"));
    // Loading never refetches behind the user's back: the damage is reported.
    let err = s.ensure("m", &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
    // An explicit pull repairs it.
    assert_eq!(s.pull("m", &mut NoProgress).unwrap(), p);
    assert_eq!(std::fs::read(&p).unwrap(), data);
    make_writable(&p);
    std::fs::remove_file(&p).unwrap();
    assert!(matches!(s.resolve("m"), Err(StoreError::Damaged { .. })));
    assert_eq!(s.pull("m", &mut NoProgress).unwrap(), p);
    assert_eq!(s.ensure("m", &mut NoProgress).unwrap(), p);
}

fn make_writable(p: &Path) {
    let mut perm = std::fs::metadata(p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(p, perm).unwrap();
}

#[test]
fn known_digest_adopts_existing_blob() {
    let (dir, s) = new_store();
    let data = fake_model(5000, 14);
    let src = write_model(dir.path(), "m.gguf", &data);
    let p = s.pull(&src, &mut NoProgress).unwrap();
    // Same bytes under another name with a known digest: no copy (source is gone).
    std::fs::remove_file(dir.path().join("m.gguf")).unwrap();
    let spec = PullSpec {
        name: "alias".into(),
        tag: "v1".into(),
        source: Source::parse(&src).unwrap(),
        sha256: Some(sha_hex(&data)),
        size: Some(data.len() as u64),
    };
    let mut rec = Recorder::default();
    assert_eq!(s.pull_spec(&spec, &mut rec).unwrap(), p);
    // Adopted after hashing it (it was never stamped), not copied.
    assert!(
        rec.phases.iter().all(|p| p.0.starts_with("verifying")),
        "{:?}",
        rec.phases
    );
    assert_eq!(s.resolve("alias:v1").unwrap().path(), p);
    assert_eq!(ls(&s.home().join("blobs")).len(), 1);
}

/// Counts copy phases across threads and slows each chunk down to widen the race window.
struct Slow(Arc<AtomicUsize>);
impl Progress for Slow {
    fn start(&mut self, what: &str, _: Option<u64>) {
        if what.starts_with("copying") {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn advance(&mut self, _: u64) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    fn finish(&mut self) {}
}

#[test]
fn concurrent_pulls_of_one_model_copy_once() {
    let (dir, s) = new_store();
    let data = fake_model(4_500_000, 15);
    let src = write_model(dir.path(), "m.gguf", &data);
    let copies = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            // Separate Store values, as separate processes would have.
            let s = Store::open(s.home().to_path_buf()).unwrap();
            let (src, copies) = (src.clone(), copies.clone());
            std::thread::spawn(move || s.pull(&src, &mut Slow(copies)))
        })
        .collect();
    let paths: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(copies.load(Ordering::SeqCst), 1);
    assert_eq!(std::fs::read(&paths[0]).unwrap(), data);
    assert!(ls(&s.home().join("tmp")).is_empty());
}
