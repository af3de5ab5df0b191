//! Acceptance tests of the model store through the `microllm` binary, each with its own
//! MICROLLM_HOME: kill -9 during a pull, a flipped byte, export -> rm -> import, hostile names
//! and tarballs, and the memory refusal before any download.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microllm_testkit::{tiny_model_bytes, TinySpec};

const BIN: &str = env!("CARGO_BIN_EXE_microllm");

fn microllm(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("MICROLLM_HOME", home)
        .env_remove("MICROLLM_MODEL")
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .stdin(Stdio::null());
    c
}

fn run(home: &Path, args: &[&str]) -> Output {
    microllm(home).args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(home: &Path, args: &[&str]) -> String {
    let o = run(home, args);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "microllm {args:?} failed:\n{out}\n{err}"
    );
    out
}

fn fails(home: &Path, args: &[&str]) -> String {
    let o = run(home, args);
    let (out, err) = text(&o);
    assert!(
        !o.status.success(),
        "microllm {args:?} should fail:\n{out}\n{err}"
    );
    format!("{out}{err}")
}

fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A real, loadable tiny llama model of ~1.5 MB.
fn model() -> Vec<u8> {
    let spec = TinySpec {
        n_embd: 128,
        n_ff: 384,
        n_layer: 2,
        ..TinySpec::llama()
    };
    tiny_model_bytes(&spec)
}

fn list_json(home: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(home, &["list", "--json"])).unwrap()
}

/// A minimal HTTP/1.1 file server on 127.0.0.1:0 with Range support, optional throttling,
/// and a log of the Range headers it saw.
struct Server {
    base: String,
    throttle: Arc<Mutex<Option<(usize, u64)>>>,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let files = Arc::new(files);
        let throttle: Arc<Mutex<Option<(usize, u64)>>> = Arc::default();
        let ranges: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t, r, st) = (throttle.clone(), ranges.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        let (f, t, r, st) = (files.clone(), t.clone(), r.clone(), st.clone());
                        std::thread::spawn(move || serve(s, &f, &t, &r, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            base,
            throttle,
            ranges,
            stop,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut s: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    throttle: &Mutex<Option<(usize, u64)>>,
    ranges: &Mutex<Vec<Option<String>>>,
    stop: &AtomicBool,
) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let range = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_string());
    ranges.lock().unwrap().push(range.clone());
    let Some(body) = files.get(&path) else {
        let _ = s.write_all(b"HTTP/1.1 404 X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let from: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
        .min(body.len());
    let mut h = if from > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\n",
            body.len() - 1,
            body.len()
        )
    } else {
        "HTTP/1.1 200 OK\r\n".to_string()
    };
    h.push_str(&format!(
        "ETag: \"v1\"\r\nAccept-Ranges: bytes\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len() - from
    ));
    if s.write_all(h.as_bytes()).is_err() {
        return;
    }
    let t = *throttle.lock().unwrap();
    let (step, delay) = t.unwrap_or((body.len(), 0));
    for piece in body[from..].chunks(step.max(1)) {
        if stop.load(Ordering::SeqCst) || s.write_all(piece).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(delay));
    }
}

fn part_files(home: &Path) -> Vec<PathBuf> {
    ls(&home.join("tmp"))
        .into_iter()
        .filter(|f| f.ends_with(".part"))
        .map(|f| home.join("tmp").join(f))
        .collect()
}

#[test]
fn kill_9_during_a_pull_then_pull_again_ends_verified() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let data = model();
    let server = Server::start(HashMap::from([("/m/tiny.gguf".to_string(), data.clone())]));
    *server.throttle.lock().unwrap() = Some((16 << 10, 25));
    let url = format!("{}/m/tiny.gguf", server.base);

    let mut child = microllm(home)
        .args(["pull", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a good part of the file is on disk, then SIGKILL the pull.
    let t0 = Instant::now();
    loop {
        let have = part_files(home)
            .first()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        if have >= 300_000 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the pull made no progress"
        );
        assert!(child.try_wait().unwrap().is_none(), "the pull ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Nothing partial is listed, resolvable or loadable.
    assert!(list_json(home).is_empty());
    assert!(ls(&home.join("blobs")).is_empty());
    let msg = fails(home, &["show", "tiny"]);
    assert!(
        msg.contains("unknown model") || msg.contains("not"),
        "{msg}"
    );
    let kept = std::fs::metadata(&part_files(home)[0]).unwrap().len();
    assert!(kept >= 300_000 && kept < data.len() as u64);

    // Pull again: it resumes from what is on disk and ends with a verified blob.
    *server.throttle.lock().unwrap() = None;
    let out = ok(home, &["pull", &url]);
    assert!(out.contains("pulled tiny:latest"), "{out}");
    let last = server.ranges.lock().unwrap().last().cloned().flatten();
    let from: u64 = last
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no Range in the second pull: {last:?}"));
    assert!(from >= kept, "resumed from {from}, {kept} bytes were kept");
    assert!(ls(&home.join("tmp")).is_empty());
    let listed = list_json(home);
    assert_eq!(listed.len(), 1);
    let sha = listed[0]["sha256"].as_str().unwrap().to_string();
    let blob = home.join("blobs").join(format!("sha256-{sha}"));
    assert_eq!(std::fs::read(&blob).unwrap(), data);
    ok(home, &["verify"]);
    ok(
        home,
        &[
            "run", "-m", "tiny", "-n", "3", "--temp", "0", "--raw", "hello",
        ],
    );
}

/// Pulls the tiny model from a local file as `tiny:latest`; returns its blob path.
fn pull_tiny(home: &Path, dir: &Path) -> PathBuf {
    let f = dir.join("tiny.gguf");
    std::fs::write(&f, model()).unwrap();
    ok(home, &["pull", &format!("file:{}", f.display())]);
    let sha = list_json(home)[0]["sha256"].as_str().unwrap().to_string();
    home.join("blobs").join(format!("sha256-{sha}"))
}

#[test]
fn flipped_byte_is_named_by_verify_and_refused_by_run() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let blob = pull_tiny(&home, dir.path());
    ok(
        &home,
        &["run", "-m", "tiny", "-n", "2", "--temp", "0", "--raw", "hi"],
    );

    let mut perm = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&blob, perm).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x01;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .write_all(&bytes)
        .unwrap();

    let o = run(&home, &["verify"]);
    let (out, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("tiny:latest") && out.contains("CORRUPT"),
        "{out}"
    );
    assert!(out.contains(&blob.display().to_string()), "{out}");
    assert!(err.contains("1 problem"), "{err}");

    let msg = fails(&home, &["run", "-m", "tiny", "-n", "2", "--raw", "hi"]);
    assert!(
        msg.contains("corrupt") && msg.contains("not loaded"),
        "{msg}"
    );
    assert!(msg.contains("microllm pull tiny:latest"), "{msg}");
    // The fix the message suggests works.
    ok(&home, &["pull", "tiny:latest"]);
    ok(&home, &["verify"]);
    ok(
        &home,
        &["run", "-m", "tiny", "-n", "2", "--temp", "0", "--raw", "hi"],
    );
}

#[test]
fn export_rm_import_round_trips_bit_exactly_with_a_signature() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let blob = pull_tiny(&home, dir.path());
    let original = std::fs::read(&blob).unwrap();
    let key = dir.path().join("release.key");
    let out = ok(&home, &["keygen", key.to_str().unwrap()]);
    assert!(out.contains("public key"), "{out}");
    let pubkey = dir.path().join("release.key.pub");
    let tar = dir.path().join("tiny.tar");
    let out = ok(
        &home,
        &[
            "export",
            "tiny",
            tar.to_str().unwrap(),
            "--sign",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.contains("signed"), "{out}");
    let before = list_json(&home);

    ok(&home, &["rm", "tiny"]);
    assert!(list_json(&home).is_empty());
    assert!(!blob.exists());

    // Another key: refused, nothing lands.
    let other = dir.path().join("other.key");
    ok(&home, &["keygen", other.to_str().unwrap()]);
    let other_pub = dir.path().join("other.key.pub");
    let msg = fails(
        &home,
        &[
            "import",
            tar.to_str().unwrap(),
            "--key",
            other_pub.to_str().unwrap(),
        ],
    );
    assert!(msg.contains("another key"), "{msg}");
    assert!(ls(&home.join("blobs")).is_empty());

    let out = ok(
        &home,
        &[
            "import",
            tar.to_str().unwrap(),
            "--key",
            pubkey.to_str().unwrap(),
        ],
    );
    assert!(out.contains("imported tiny:latest"), "{out}");
    assert_eq!(list_json(&home), before);
    assert_eq!(std::fs::read(&blob).unwrap(), original);
    let out = ok(&home, &["verify", "--key", pubkey.to_str().unwrap()]);
    assert!(out.contains("signature valid"), "{out}");
    let msg = fails(&home, &["verify", "--key", other_pub.to_str().unwrap()]);
    assert!(msg.contains("SIGNED BY ANOTHER KEY"), "{msg}");
}

/// A ustar header block for `name` (type `kind`, link target `link`) and `size` bytes.
fn ustar(name: &str, kind: u8, link: &str, size: usize) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

fn tar_of(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        out.extend_from_slice(&ustar(name, *kind, link, data.len()));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn hostile_names_and_tarballs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    for bad in ["../evil", "a..b", "name:../x", "/abs/x"] {
        let msg = fails(&home, &["pull", bad]);
        assert!(
            msg.contains("invalid model name") || msg.contains("invalid source"),
            "{bad:?}: {msg}"
        );
    }
    fails(&home, &["rm", "../etc"]);
    fails(&home, &["show", "/etc/passwd"]);

    let manifest = br#"{"schema":2,"name":"x","tag":"latest","source":"file:/x","size":5,"sha256":"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824","added":"2025-01-01T00:00:00Z"}"#;
    let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
    let blob_name = format!("blobs/sha256-{sha}");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "traversal",
            tar_of(&[("../../outside", b'0', "", b"pwned")]),
        ),
        (
            "absolute",
            tar_of(&[("/tmp/microllm-pwned", b'0', "", b"pwned")]),
        ),
        (
            "symlink out of the store",
            tar_of(&[
                ("manifest.json", b'0', "", manifest),
                ("SHA256SUMS", b'0', "", b"x"),
                (&blob_name, b'2', "/etc/passwd", b""),
            ]),
        ),
        (
            "hard link",
            tar_of(&[("manifest.json", b'1', "/etc/passwd", b"")]),
        ),
    ];
    for (what, bytes) in cases {
        let f = dir.path().join("evil.tar");
        std::fs::write(&f, bytes).unwrap();
        let msg = fails(&home, &["import", f.to_str().unwrap()]);
        assert!(msg.contains("not a valid microllm bundle"), "{what}: {msg}");
        assert!(ls(&home.join("blobs")).is_empty(), "{what}");
        assert!(ls(&home.join("manifests")).is_empty(), "{what}");
        assert!(ls(&home.join("tmp")).is_empty(), "{what}");
    }
    assert!(!dir.path().join("outside").exists());
    assert!(!Path::new("/tmp/microllm-pwned").exists());
}

#[test]
fn a_context_that_cannot_fit_is_refused_before_any_download() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let t0 = Instant::now();
    // 16M tokens of KV cache for SmolLM2 is ~360 GiB: no machine running this has that.
    let o = microllm(&home)
        .args(["pull", "smollm2-135m-instruct", "--ctx", "16000000"])
        // Any network use would go to a proxy that does not exist and fail differently.
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("https_proxy", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    for want in [
        "needs about",
        "at a context of 16000000 tokens",
        "KV cache",
        "of memory is available",
        "--ctx",
        "smaller quantization",
        "--force",
    ] {
        assert!(err.contains(want), "{want:?} missing in: {err}");
    }
    assert!(!err.contains("could not reach"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(ls(&home.join("tmp")).is_empty());
    assert!(ls(&home.join("blobs")).is_empty());
}

#[test]
fn list_and_show_describe_a_stored_model() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let out = run(&home, &["list"]);
    assert!(text(&out).1.contains("no models"), "{:?}", text(&out));
    pull_tiny(&home, dir.path());
    let out = ok(&home, &["list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("MODIFIED"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("tiny:latest") && lines[1].contains("llama"),
        "{out}"
    );
    let out = ok(&home, &["show", "tiny"]);
    for want in [
        "architecture:   llama",
        "memory:",
        "chat template",
        "sha256:",
    ] {
        assert!(out.contains(want), "{want:?} missing in: {out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&home, &["show", "tiny", "--json"])).unwrap();
    assert_eq!(v["info"]["architecture"], "llama");
    assert!(v["memory"]["total"].as_u64().unwrap() > 0);
    // A catalog model that is not pulled: its catalog facts and estimate, no download.
    let out = ok(&home, &["show", "gemma3-270m"]);
    assert!(
        out.contains("not pulled yet") && out.contains("gemma3"),
        "{out}"
    );
}
