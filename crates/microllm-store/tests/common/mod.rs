//! Test helpers: a tiny HTTP server imitating a PyPI simple index, wheel building, and
//! progress recorders.
#![allow(dead_code)]

use microllm_store::Progress;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic pseudo-random bytes (an LCG), so content is not trivially compressible.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

/// A wheel (zip) holding `files`; the first is deflated, the rest stored.
pub fn wheel(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (i, (name, data)) in files.iter().enumerate() {
        let method = if i == 0 {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

#[derive(Clone, Debug)]
pub struct Route {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
    /// Send only this many body bytes (with the full Content-Length), then close.
    pub truncate_to: Option<usize>,
}

impl Route {
    pub fn ok(content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type: content_type.to_string(),
            body: body.into(),
            truncate_to: None,
        }
    }
    pub fn status(status: u16) -> Self {
        Self {
            status,
            content_type: "text/plain".into(),
            body: b"nope".to_vec(),
            truncate_to: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub accept: Option<String>,
}

/// A one-connection-at-a-time HTTP/1.1 server on 127.0.0.1:0 serving fixed routes.
/// Stops when dropped.
pub struct Server {
    pub base: String,
    pub log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// `routes` gets the base URL (`http://127.0.0.1:PORT`) and returns path -> route.
    pub fn start(routes: impl FnOnce(&str) -> HashMap<String, Route>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes = routes(&base);
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => handle(s, &routes, &log2),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            base,
            log,
            stop,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(mut s: TcpStream, routes: &HashMap<String, Route>, log: &Mutex<Vec<Request>>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("");
    let path = first.split(' ').nth(1).unwrap_or("/").to_string();
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.trim().to_string());
    log.lock().unwrap().push(Request {
        path: path.clone(),
        accept,
    });
    let route = routes
        .get(path.split('?').next().unwrap_or(""))
        .cloned()
        .unwrap_or_else(|| Route::status(404));
    let head = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        route.status,
        route.content_type,
        route.body.len()
    );
    let body = &route.body[..route.truncate_to.unwrap_or(route.body.len())];
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Records progress calls.
#[derive(Default, Debug)]
pub struct Recorder {
    pub phases: Vec<(String, Option<u64>, u64)>,
    pub finished: usize,
}

impl Progress for Recorder {
    fn start(&mut self, what: &str, total: Option<u64>) {
        self.phases.push((what.to_string(), total, 0));
    }
    fn advance(&mut self, n: u64) {
        if let Some(p) = self.phases.last_mut() {
            p.2 += n;
        }
    }
    fn finish(&mut self) {
        self.finished += 1;
    }
}

/// Files directly under `dir` (names), sorted.
pub fn ls(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A PEP 503 HTML page linking `files` as (filename, url, sha256).
pub fn simple_html(project: &str, files: &[(&str, &str, &str)]) -> String {
    let mut s = format!(
        "<!DOCTYPE html>\n<html>\n  <head>\n    <meta name=\"pypi:repository-version\" content=\"1.1\">\n    <title>Links for {project}</title>\n  </head>\n  <body>\n    <h1>Links for {project}</h1>\n"
    );
    for (name, url, sha) in files {
        s.push_str(&format!(
            "    <a href=\"{url}#sha256={sha}\" data-requires-python=\"&gt;=3.8\" >{name}</a><br />\n"
        ));
    }
    s.push_str("  </body>\n</html>\n");
    s
}

/// A valid GGUF file of about `n` bytes: llama-shaped metadata (2 layers, 64 wide, 4 heads,
/// 2 KV heads, 256 context, 1000-token vocabulary) and one I8 tensor of pseudo-random bytes.
pub fn fake_model(n: usize, seed: u64) -> Vec<u8> {
    use microllm_gguf::{GgmlType, GgufWriter, MetaValue};
    let mut w = GgufWriter::new();
    let md = w.metadata_mut();
    md.insert("general.architecture", MetaValue::String("llama".into()));
    md.insert("general.name", MetaValue::String(format!("fake-{seed}")));
    md.insert("general.license", MetaValue::String("apache-2.0".into()));
    md.insert("general.file_type", MetaValue::U32(7));
    for (k, v) in [
        ("llama.block_count", 2u32),
        ("llama.embedding_length", 64),
        ("llama.feed_forward_length", 128),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.context_length", 256),
        ("llama.vocab_size", 1000),
    ] {
        md.insert(k, MetaValue::U32(v));
    }
    let data = bytes(n.saturating_sub(1024).max(1), seed);
    w.add_tensor(
        "blob",
        &[data.len() as u64],
        GgmlType::I8,
        std::borrow::Cow::Owned(data),
    )
    .unwrap();
    w.to_bytes().unwrap()
}

/// What the richer server ([`HttpServer`]) serves at a path.
#[derive(Clone, Debug)]
pub enum Served {
    /// A file, with Range / If-Range support and an ETag.
    File {
        body: Arc<Vec<u8>>,
        etag: Option<String>,
    },
    /// A 302 to `location` with extra headers (Hugging Face's resolve endpoint).
    Redirect {
        location: String,
        headers: Vec<(String, String)>,
    },
    Status(u16),
}

/// One request seen by [`HttpServer`].
#[derive(Clone, Debug)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub status: u16,
}

/// Knobs of [`HttpServer`], changeable while it runs.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Cut the next file body after this many bytes (then forget the setting).
    pub cut_after: Option<u64>,
    /// Only cut bodies of this path.
    pub cut_only: Option<String>,
    /// Answer every request with the whole file (200), as servers without ranges do.
    pub ignore_range: bool,
    /// Send bodies in chunks of this many bytes with this many ms between them.
    pub throttle: Option<(usize, u64)>,
}

/// An HTTP/1.1 server on 127.0.0.1:0, one thread per connection, serving [`Served`] routes
/// with ranges, redirects, cuts and throttling. Stops when dropped.
pub struct HttpServer {
    pub base: String,
    pub routes: Arc<Mutex<HashMap<String, Served>>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    pub log: Arc<Mutex<Vec<Logged>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Served>>> = Arc::default();
        let behaviour: Arc<Mutex<Behaviour>> = Arc::default();
        let log: Arc<Mutex<Vec<Logged>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, b, l, st) = (routes.clone(), behaviour.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (r, b, l, st) = (r.clone(), b.clone(), l.clone(), st.clone());
                        std::thread::spawn(move || serve_one(s, &r, &b, &l, &st));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            base,
            routes,
            behaviour,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `body` at `path` with `etag`.
    pub fn file(&self, path: &str, body: Vec<u8>, etag: Option<&str>) {
        self.routes.lock().unwrap().insert(
            path.to_string(),
            Served::File {
                body: Arc::new(body),
                etag: etag.map(str::to_string),
            },
        );
    }

    /// Imitates huggingface.co: `/{owner}/{repo}/resolve/{rev}/{file}` answers 302 to a CDN
    /// path with `X-Linked-Etag: "<sha256>"` (`linked_sha`, default the body's digest) and
    /// `X-Linked-Size`; the CDN path serves the bytes with its own ETag.
    pub fn hf_file(
        &self,
        owner: &str,
        repo: &str,
        rev: &str,
        file: &str,
        body: Vec<u8>,
        linked_sha: Option<&str>,
    ) {
        let sha = linked_sha.map_or_else(|| sha_hex(&body), str::to_string);
        let cdn = format!("/cdn-lfs/{owner}/{repo}/{}", &sha[..16]);
        let resolve = format!("/{owner}/{repo}/resolve/{rev}/{file}");
        let headers = vec![
            ("X-Linked-Etag".to_string(), format!("\"{sha}\"")),
            ("X-Linked-Size".to_string(), body.len().to_string()),
            ("X-Repo-Commit".to_string(), "0123456789abcdef".to_string()),
        ];
        self.file(&cdn, body, Some(&format!("\"cdn-{}\"", &sha[..8])));
        self.routes.lock().unwrap().insert(
            resolve,
            Served::Redirect {
                // Root-relative (the hub sends absolute CDN URLs; both must work).
                location: format!("{cdn}?expires=1"),
                headers,
            },
        );
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(
    mut s: TcpStream,
    routes: &Mutex<HashMap<String, Served>>,
    behaviour: &Mutex<Behaviour>,
    log: &Mutex<Vec<Logged>>,
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
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("");
    let path = first.split(' ').nth(1).unwrap_or("/").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let (range, if_range) = (get("range"), get("if-range"));
    let route = routes
        .lock()
        .unwrap()
        .get(path.split('?').next().unwrap_or(""))
        .cloned()
        .unwrap_or(Served::Status(404));
    let b = behaviour.lock().unwrap().clone();
    let record = |status: u16| {
        log.lock().unwrap().push(Logged {
            path: path.clone(),
            range: range.clone(),
            if_range: if_range.clone(),
            status,
        })
    };
    match route {
        Served::Status(st) => {
            record(st);
            let _ = write!(
                s,
                "HTTP/1.1 {st} X\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope"
            );
        }
        Served::Redirect { location, headers } => {
            record(302);
            let mut h = format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\n");
            for (k, v) in headers {
                h.push_str(&format!("{k}: {v}\r\n"));
            }
            h.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = s.write_all(h.as_bytes());
        }
        Served::File { body, etag } => {
            let full = body.len() as u64;
            let mut start = 0u64;
            let mut status = 200;
            let validator_ok = match (&if_range, &etag) {
                (None, _) => true,
                (Some(v), Some(e)) => v == e,
                (Some(_), None) => false,
            };
            if let (Some(r), false) = (&range, b.ignore_range) {
                if validator_ok {
                    let from: u64 = r
                        .strip_prefix("bytes=")
                        .and_then(|x| x.strip_suffix('-'))
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    if from >= full {
                        status = 416;
                    } else {
                        start = from;
                        status = 206;
                    }
                }
            }
            record(status);
            let mut h = format!("HTTP/1.1 {status} X\r\nAccept-Ranges: bytes\r\n");
            if let Some(e) = &etag {
                h.push_str(&format!("ETag: {e}\r\n"));
            }
            if status == 416 {
                h.push_str(&format!(
                    "Content-Range: bytes */{full}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ));
                let _ = s.write_all(h.as_bytes());
                return;
            }
            if status == 206 {
                h.push_str(&format!(
                    "Content-Range: bytes {start}-{}/{full}\r\n",
                    full - 1
                ));
            }
            h.push_str(&format!(
                "Content-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                full - start
            ));
            if s.write_all(h.as_bytes()).is_err() {
                return;
            }
            let mut data = &body[start as usize..];
            let cut_here = b.cut_only.as_deref().is_none_or(|p| path.starts_with(p));
            if let Some(cut) = b.cut_after.filter(|_| cut_here) {
                behaviour.lock().unwrap().cut_after = None;
                data = &data[..(cut as usize).min(data.len())];
            }
            let (step, delay) = b.throttle.unwrap_or((data.len().max(1), 0));
            for piece in data.chunks(step.max(1)) {
                if stop.load(Ordering::SeqCst) || s.write_all(piece).is_err() {
                    return;
                }
                if delay > 0 {
                    std::thread::sleep(Duration::from_millis(delay));
                }
            }
        }
    }
    let _ = s.flush();
    let _ = s.shutdown(std::net::Shutdown::Both);
}
