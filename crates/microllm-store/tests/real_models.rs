//! The catalog's sizes (used for the fit check before a download) match the real files.
//! Skips when the reference models are not in ~/.cache/microllm-ref.

use microllm_store::{catalog, estimate_memory, ModelInfo};
use std::path::PathBuf;

fn reference(file: &str) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/microllm-ref").join(file);
    p.is_file().then_some(p)
}

#[test]
fn catalog_info_matches_the_real_files() {
    for (name, file) in [
        ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
    ] {
        let Some(path) = reference(file) else {
            eprintln!("skipping {name}: {file} is not in ~/.cache/microllm-ref");
            continue;
        };
        let e = catalog().iter().find(|e| e.name == name).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), e.size, "{name}");
        let mut got = ModelInfo::read(&path).unwrap();
        eprintln!("{name}: {got:?}");
        got.name = None;
        assert_eq!(got, e.info(), "{name}");
        let est = estimate_memory(e.size, Some(&e.shape), e.shape.default_ctx());
        eprintln!("{name} at ctx {}: {est:?}", est.n_ctx);
    }
}
