//! `Store::default_home` (its own test binary: it changes the process environment).

use microllm_store::Store;
use std::path::PathBuf;

#[test]
fn microllm_home_then_home_cache() {
    std::env::set_var("MICROLLM_HOME", "/tmp/some-microllm-home");
    assert_eq!(
        Store::default_home(),
        PathBuf::from("/tmp/some-microllm-home")
    );
    std::env::set_var("MICROLLM_HOME", "");
    std::env::set_var("HOME", "/home/someone");
    assert_eq!(
        Store::default_home(),
        PathBuf::from("/home/someone/.cache/microllm")
    );
    std::env::remove_var("MICROLLM_HOME");
    assert_eq!(
        Store::default_home(),
        PathBuf::from("/home/someone/.cache/microllm")
    );
}
