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
