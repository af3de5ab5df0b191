//! Fuzz-style robustness: corrupt a small valid file many times with a fixed seed; parsing
//! must return (Ok or Err) and never panic, and anything accepted must be self-consistent.

mod common;

use common::XorShift;
use microllm_gguf::GgufFile;

fn check_consistent(f: &GgufFile) {
    for t in f.tensors() {
        assert_eq!(f.tensor_data(t).len() as u64, t.n_bytes);
        assert_eq!(t.offset % f.alignment(), 0);
        assert!(t.offset + t.n_bytes <= f.file_size());
        assert_eq!(f.tensor(&t.name).map(|x| x.offset), Some(t.offset));
    }
}

#[test]
fn random_byte_flips_never_panic() {
    let valid = common::small_valid_file();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..2000 {
        let mut b = valid.clone();
        let n_flips = 1 + rng.below(4);
        for _ in 0..n_flips {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = match rng.below(4) {
                0 => b[i] ^ (1 << rng.below(8)),
                1 => 0xff,
                2 => 0,
                _ => rng.next_u64() as u8,
            };
        }
        match GgufFile::from_bytes(b) {
            Ok(f) => {
                check_consistent(&f);
                ok += 1
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                err += 1
            }
        }
    }
    // Both outcomes must occur, or the test is not exercising anything.
    assert!(ok > 0 && err > 0, "ok {ok} err {err}");
}

#[test]
fn random_truncation_plus_flips_never_panic() {
    let valid = common::small_valid_file();
    let mut rng = XorShift(12345);
    for _ in 0..2000 {
        let len = rng.below(valid.len() as u64 + 1) as usize;
        let mut b = valid[..len].to_vec();
        if !b.is_empty() {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = rng.next_u64() as u8;
        }
        if let Ok(f) = GgufFile::from_bytes(b) {
            check_consistent(&f);
        }
    }
}
