//! verify, rm, export/import, signatures, and the integrity check made at every load.

mod common;

use common::*;
use microllm_store::{
    generate_key, read_signing_key, BlobStatus, ImportOptions, NoProgress, SignatureStatus, Store,
    StoreError,
};
use std::path::{Path, PathBuf};

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path().join("home")).unwrap();
    (dir, s)
}

/// Pulls a fake model from a local file under `name` (file stem).
fn add(s: &Store, dir: &Path, name: &str, seed: u64) -> (Vec<u8>, PathBuf) {
    let data = fake_model(200_000, seed);
    let f = dir.join(format!("{name}.gguf"));
    std::fs::write(&f, &data).unwrap();
    let p = s
        .pull(&format!("file:{}", f.display()), &mut NoProgress)
        .unwrap();
    (data, p)
}

fn make_writable(p: &Path) {
    let mut perm = std::fs::metadata(p).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(p, perm).unwrap();
}

/// Flips one bit of byte `at` in place (same size, same inode).
fn flip(p: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    make_writable(p);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 1]).unwrap();
}

#[test]
fn flipped_byte_is_named_by_verify_and_refused_at_load() {
    let (dir, s) = new_store();
    let (data, p) = add(&s, dir.path(), "m", 1);
    add(&s, dir.path(), "other", 2);
    assert!(s.resolve("m").is_ok());
    flip(&p, 150_000);

    let err = s.resolve("m").unwrap_err();
    match &err {
        StoreError::Corrupt {
            name,
            path,
            expected,
            got,
        } => {
            assert_eq!(name, "m:latest");
            assert_eq!(path, &p);
            assert_eq!(*expected, sha_hex(&data));
            assert_ne!(got, expected);
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains("microllm pull m:latest"),
        "{msg}"
    );
    // ensure() refuses too: no silent refetch.
    assert!(matches!(
        s.ensure("m", &mut NoProgress),
        Err(StoreError::Corrupt { .. })
    ));

    let report = s.verify(None, None, &mut NoProgress).unwrap();
    assert_eq!(report.problems(), 1);
    let bad: Vec<_> = report.models.iter().filter(|e| !e.is_ok()).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].name, "m:latest");
    assert!(matches!(bad[0].blob, BlobStatus::Corrupt { .. }));
    let one = s.verify(Some("other"), None, &mut NoProgress).unwrap();
    assert_eq!((one.models.len(), one.problems()), (1, 0));

    // Pull repairs it (the corrupt blob is dropped and fetched again).
    s.pull("m", &mut NoProgress).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);
    assert_eq!(s.verify(None, None, &mut NoProgress).unwrap().problems(), 0);
}

#[test]
fn verified_stamp_skips_rehash_until_the_file_changes() {
    let (dir, s) = new_store();
    let (_data, p) = add(&s, dir.path(), "m", 3);
    // Just written: too recent to stamp, so every load hashes.
    let mut rec = Recorder::default();
    s.resolve_with("m", &mut rec).unwrap();
    assert_eq!(rec.phases.len(), 1, "{:?}", rec.phases);
    assert!(ls(&s.home().join("verified")).is_empty());
    // Once the file has settled (2 s), a hash leaves a stamp and later loads skip hashing.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    s.resolve("m").unwrap();
    assert_eq!(ls(&s.home().join("verified")).len(), 1);
    let mut rec = Recorder::default();
    s.resolve_with("m", &mut rec).unwrap();
    assert!(rec.phases.is_empty(), "{:?}", rec.phases);
    // A one-byte change in place (same size, same inode) changes ctime: caught.
    flip(&p, 1000);
    assert!(matches!(s.resolve("m"), Err(StoreError::Corrupt { .. })));
    assert!(ls(&s.home().join("verified")).is_empty());
}

#[test]
fn verify_reports_every_problem() {
    let (dir, s) = new_store();
    let (_a, pa) = add(&s, dir.path(), "a", 4);
    let (_b, pb) = add(&s, dir.path(), "b", 5);
    let (_c, pc) = add(&s, dir.path(), "c", 6);
    add(&s, dir.path(), "d", 7);
    make_writable(&pa);
    std::fs::remove_file(&pa).unwrap();
    make_writable(&pb);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&pb)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
        .unwrap();
    flip(&pc, 99_999);
    std::fs::write(s.home().join("manifests/d/broken.json"), "{").unwrap();
    let stray = s
        .home()
        .join("blobs")
        .join(format!("sha256-{}", "0".repeat(64)));
    std::fs::write(&stray, b"not what the name says").unwrap();

    let r = s.verify(None, None, &mut NoProgress).unwrap();
    let status = |n: &str| {
        r.models
            .iter()
            .find(|e| e.name == n)
            .map(|e| e.blob.clone())
            .unwrap()
    };
    assert_eq!(status("a:latest"), BlobStatus::Missing);
    assert!(
        matches!(status("b:latest"), BlobStatus::WrongSize { got, expected } if got == expected + 1)
    );
    assert!(matches!(status("c:latest"), BlobStatus::Corrupt { .. }));
    assert_eq!(status("d:latest"), BlobStatus::Ok);
    assert_eq!(r.bad_manifests.len(), 1);
    assert_eq!(r.stray_blobs.len(), 1);
    assert!(matches!(r.stray_blobs[0].blob, BlobStatus::Corrupt { .. }));
    assert_eq!(r.problems(), 5);
    // Loading: each of them is refused with its own reason.
    assert!(matches!(s.resolve("a"), Err(StoreError::Damaged { .. })));
    assert!(matches!(s.resolve("b"), Err(StoreError::Damaged { .. })));
    assert!(matches!(s.resolve("c"), Err(StoreError::Corrupt { .. })));
}

#[test]
fn rm_keeps_shared_blobs_and_removes_the_last_reference() {
    let (dir, s) = new_store();
    let (data, p) = add(&s, dir.path(), "m", 8);
    let f = dir.path().join("m.gguf");
    // Same bytes under a second name.
    let opts = microllm_store::PullOptions {
        name: Some("alias:v2".into()),
        ..Default::default()
    };
    s.pull_with(&format!("file:{}", f.display()), &opts, &mut NoProgress)
        .unwrap();
    assert_eq!(ls(&s.home().join("blobs")).len(), 1);

    let r = s.remove("m").unwrap();
    assert_eq!(r.manifest.display_name(), "m:latest");
    assert!(r.blob_removed.is_none());
    assert!(p.exists());
    assert!(matches!(
        s.resolve("m"),
        Err(StoreError::UnknownModel { .. })
    ));
    assert!(!s.home().join("manifests/m").exists());
    assert_eq!(
        std::fs::read(s.resolve("alias:v2").unwrap().path()).unwrap(),
        data
    );

    let r = s.remove("alias:v2").unwrap();
    assert_eq!(r.blob_removed.as_deref(), Some(p.as_path()));
    assert!(!p.exists());
    assert!(ls(&s.home().join("blobs")).is_empty());
    assert!(s.list().unwrap().is_empty());

    assert!(matches!(
        s.remove("nope"),
        Err(StoreError::UnknownModel { .. })
    ));
    assert!(matches!(
        s.remove("../etc"),
        Err(StoreError::InvalidName { .. })
    ));
    // Several tags and none given: ambiguous.
    for tag in ["x", "y"] {
        let opts = microllm_store::PullOptions {
            name: Some(format!("two:{tag}")),
            ..Default::default()
        };
        s.pull_with(&format!("file:{}", f.display()), &opts, &mut NoProgress)
            .unwrap();
    }
    let err = s.remove("two").unwrap_err();
    assert!(matches!(err, StoreError::AmbiguousName { .. }), "{err:?}");
    assert!(err.to_string().contains("two:x"));
}

#[test]
fn export_rm_import_round_trips_bit_exactly() {
    let (dir, s) = new_store();
    let (data, p) = add(&s, dir.path(), "m", 9);
    let key = dir.path().join("key");
    let (pub_path, vk) = generate_key(&key).unwrap();
    s.sign("m", &read_signing_key(&key).unwrap()).unwrap();
    let before = s.manifest("m").unwrap();
    let bundle = dir.path().join("out/m.tar");
    std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
    let e = s.export("m", &bundle, &mut NoProgress).unwrap();
    assert!(e.bytes > data.len() as u64);
    assert_eq!(ls(bundle.parent().unwrap()), vec!["m.tar"]);

    // The bundle is a plain tar with the three expected files.
    let mut ar = tar::Archive::new(std::fs::File::open(&bundle).unwrap());
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        vec![
            "manifest.json".to_string(),
            "SHA256SUMS".to_string(),
            format!("blobs/sha256-{}", sha_hex(&data))
        ]
    );

    s.remove("m").unwrap();
    assert!(!p.exists());
    let m = s
        .import(
            &bundle,
            &ImportOptions {
                key: Some(vk),
                force: false,
            },
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(m, before);
    assert_eq!(s.manifest("m").unwrap(), before);
    assert_eq!(std::fs::read(&p).unwrap(), data);
    let r = s
        .verify(
            None,
            Some(&microllm_store::read_verifying_key(pub_path.to_str().unwrap()).unwrap()),
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(r.problems(), 0);
    assert_eq!(r.models[0].signature, SignatureStatus::Valid);

    // Into another store too; importing twice is fine.
    let (_d2, s2) = new_store();
    s2.import(&bundle, &ImportOptions::default(), &mut NoProgress)
        .unwrap();
    s2.import(&bundle, &ImportOptions::default(), &mut NoProgress)
        .unwrap();
    assert_eq!(
        std::fs::read(s2.resolve("m").unwrap().path()).unwrap(),
        data
    );
    // A different model under the same name is a conflict unless forced.
    let other = fake_model(1000, 77);
    let f = dir.path().join("x.gguf");
    std::fs::write(&f, &other).unwrap();
    let opts = microllm_store::PullOptions {
        name: Some("m:latest".into()),
        ..Default::default()
    };
    let (_d3, s3) = new_store();
    s3.pull_with(&format!("file:{}", f.display()), &opts, &mut NoProgress)
        .unwrap();
    let err = s3
        .import(&bundle, &ImportOptions::default(), &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    s3.import(
        &bundle,
        &ImportOptions {
            key: None,
            force: true,
        },
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(s3.resolve("m").unwrap().path()).unwrap(),
        data
    );
}

#[test]
fn export_refuses_a_corrupt_blob() {
    let (dir, s) = new_store();
    let (_data, p) = add(&s, dir.path(), "m", 10);
    flip(&p, 5000);
    let out = dir.path().join("m.tar");
    let err = s.export("m", &out, &mut NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(!out.exists());
    assert_eq!(ls(dir.path()), vec!["home", "m.gguf"]);
}

#[test]
fn signatures() {
    let (dir, s) = new_store();
    add(&s, dir.path(), "m", 11);
    let (k1, k2) = (dir.path().join("k1"), dir.path().join("k2"));
    let (_, vk1) = generate_key(&k1).unwrap();
    let (_, vk2) = generate_key(&k2).unwrap();
    let sig = |r: microllm_store::VerifyReport| r.models[0].signature.clone();
    assert_eq!(
        sig(s.verify(Some("m"), Some(&vk1), &mut NoProgress).unwrap()),
        SignatureStatus::Unsigned
    );
    let r = s.verify(Some("m"), Some(&vk1), &mut NoProgress).unwrap();
    assert_eq!(r.problems(), 1);
    s.sign("m", &read_signing_key(&k1).unwrap()).unwrap();
    assert_eq!(
        sig(s.verify(Some("m"), Some(&vk1), &mut NoProgress).unwrap()),
        SignatureStatus::Valid
    );
    assert!(matches!(
        sig(s.verify(Some("m"), Some(&vk2), &mut NoProgress).unwrap()),
        SignatureStatus::OtherKey { .. }
    ));
    // A damaged signature is caught.
    let mp = s.home().join("manifests/m/latest.json");
    let text = std::fs::read_to_string(&mp).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sigv = v["signature"]["sig"].as_str().unwrap().to_string();
    let mut bad = sigv.into_bytes();
    bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
    v["signature"]["sig"] = serde_json::Value::String(String::from_utf8(bad).unwrap());
    std::fs::write(&mp, serde_json::to_string(&v).unwrap()).unwrap();
    assert_eq!(
        sig(s.verify(Some("m"), Some(&vk1), &mut NoProgress).unwrap()),
        SignatureStatus::Invalid
    );
    // Import with a key refuses an unsigned bundle before the model lands.
    let (_d2, s2) = new_store();
    let (_d3, s3) = new_store();
    add(&s3, dir.path(), "n", 12);
    let bundle = dir.path().join("n.tar");
    s3.export("n", &bundle, &mut NoProgress).unwrap();
    let err = s2
        .import(
            &bundle,
            &ImportOptions {
                key: Some(vk1),
                force: false,
            },
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Signature { .. }), "{err:?}");
    assert!(ls(&s2.home().join("blobs")).is_empty());
    assert!(ls(&s2.home().join("tmp")).is_empty());
}

/// One raw tar entry: (name bytes, type, link target, data).
type RawEntry<'a> = (&'a [u8], tar::EntryType, Option<&'a str>, &'a [u8]);

/// Builds a tar from raw entries, names written as given (no checks).
fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, ty, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
        }
        h.set_entry_type(*ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_bundles_are_refused_before_anything_lands() {
    let (dir, src) = new_store();
    let (data, _) = add(&src, dir.path(), "m", 13);
    let good = dir.path().join("good.tar");
    src.export("m", &good, &mut NoProgress).unwrap();
    // The genuine parts, to recombine.
    let mut ar = tar::Archive::new(std::fs::File::open(&good).unwrap());
    let parts: Vec<Vec<u8>> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e.unwrap(), &mut v).unwrap();
            v
        })
        .collect();
    let (manifest, sums) = (&parts[0][..], &parts[1][..]);
    let blob_name = format!("blobs/sha256-{}", sha_hex(&data));
    let bn = blob_name.as_bytes();
    use tar::EntryType::{Link, Regular, Symlink};
    let mut evil_manifest: serde_json::Value = serde_json::from_slice(manifest).unwrap();
    evil_manifest["name"] = "../../etc".into();
    let evil_manifest = serde_json::to_vec(&evil_manifest).unwrap();
    let mut flipped = data.clone();
    flipped[100_000] ^= 1;

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "path traversal",
            raw_tar(&[(b"../manifest.json", Regular, None, manifest)]),
            "unexpected entry",
        ),
        (
            "absolute path",
            raw_tar(&[(b"/etc/cron.d/x", Regular, None, b"* * * * * root sh")]),
            "unexpected entry",
        ),
        (
            "symlink out of the store",
            raw_tar(&[
                (b"manifest.json", Regular, None, manifest),
                (b"SHA256SUMS", Regular, None, sums),
                (bn, Symlink, Some("/etc/passwd"), b""),
            ]),
            "symbolic link",
        ),
        (
            "hard link",
            raw_tar(&[(b"manifest.json", Link, Some("/etc/shadow"), b"")]),
            "hard link",
        ),
        (
            "extra file",
            raw_tar(&[
                (b"manifest.json", Regular, None, manifest),
                (b"SHA256SUMS", Regular, None, sums),
                (bn, Regular, None, &data),
                (b"run.sh", Regular, None, b"rm -rf /"),
            ]),
            "unexpected entry \"run.sh\"",
        ),
        (
            "hostile model name",
            raw_tar(&[(b"manifest.json", Regular, None, &evil_manifest)]),
            "not allowed",
        ),
        (
            "wrong checksum",
            raw_tar(&[
                (b"manifest.json", Regular, None, manifest),
                (b"SHA256SUMS", Regular, None, sums),
                (bn, Regular, None, &flipped),
            ]),
            "sha256 mismatch",
        ),
        (
            "truncated model",
            raw_tar(&[
                (b"manifest.json", Regular, None, manifest),
                (b"SHA256SUMS", Regular, None, sums),
                (bn, Regular, None, &data[..1000]),
            ]),
            "bytes, the manifest says",
        ),
        (
            "missing model",
            raw_tar(&[
                (b"manifest.json", Regular, None, manifest),
                (b"SHA256SUMS", Regular, None, sums),
            ]),
            "incomplete",
        ),
        (
            "checksums that disagree",
            raw_tar(&[
                (b"manifest.json", Regular, None, manifest),
                (b"SHA256SUMS", Regular, None, b"00  manifest.json\n"),
            ]),
            "does not match",
        ),
        (
            "not a tar",
            b"hello".to_vec(),
            "not a valid microllm bundle",
        ),
    ];
    let (_d2, s) = new_store();
    for (what, bytes, want) in cases {
        let f = dir.path().join("evil.tar");
        std::fs::write(&f, &bytes).unwrap();
        let err = s
            .import(&f, &ImportOptions::default(), &mut NoProgress)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(ls(&s.home().join("blobs")).is_empty(), "{what}");
        assert!(ls(&s.home().join("manifests")).is_empty(), "{what}");
        assert!(ls(&s.home().join("tmp")).is_empty(), "{what}");
    }
    // Nothing was written outside the store either.
    assert_eq!(
        ls(dir.path()),
        vec!["evil.tar", "good.tar", "home", "m.gguf"]
    );
    assert!(!dir.path().join("etc").exists());
    // And the genuine bundle still imports.
    s.import(&good, &ImportOptions::default(), &mut NoProgress)
        .unwrap();
}
