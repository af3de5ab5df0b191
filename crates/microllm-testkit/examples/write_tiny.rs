//! Writes one tiny model to disk, for tools/fixtures/gen_tiny.sh (llama.cpp runs the file to
//! make the differential fixtures in tests/fixtures/tiny/).
//!
//!   cargo run -p microllm-testkit --example write_tiny -- NAME OUT.gguf
//!
//! NAME is a [`TinySpec::named`] name: `llama`, `qwen2`, `mistral`, `gemma2`, `gemma3`, `phi3`,
//! optionally with a weight type (`gemma3-q8_0`); quantized weights are encoded by
//! microllm-kernels' reference quantizers. Prints one JSON line: the spec (Debug form), the
//! file's size and SHA-256, and the vocabulary size.

use std::path::Path;
use std::process::ExitCode;

use microllm_gguf::GgmlType;
use microllm_testkit::{sha256_hex, tiny_model_bytes_with, TinySpec};

/// Quantizes a tensor's f32 values with the reference quantizer (whole tensor at once: the
/// block formats quantize each block on its own).
fn encode(ty: GgmlType, dims: &[u64], values: &[f32]) -> Vec<u8> {
    let n_rows: u64 = dims[1..].iter().product();
    let row = ty
        .row_size(dims[0])
        .expect("row length is a multiple of the block size");
    let mut out = vec![0u8; (row * n_rows) as usize];
    microllm_kernels::reference::quantize_row(ty, values, &mut out)
        .unwrap_or_else(|e| panic!("cannot encode {ty}: {e}"));
    out
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(name), Some(out)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: write_tiny NAME OUT.gguf   (NAME: llama|qwen2|mistral|gemma2|gemma3|phi3[-TYPE])");
        return ExitCode::from(2);
    };
    let Some(spec) = TinySpec::named(name) else {
        eprintln!("unknown tiny model '{name}' (llama|qwen2|mistral|gemma2|gemma3|phi3, optionally -q8_0 etc.)");
        return ExitCode::from(2);
    };
    let bytes = tiny_model_bytes_with(&spec, &encode);
    if let Err(e) = std::fs::write(Path::new(out), &bytes) {
        eprintln!("cannot write {out}: {e}");
        return ExitCode::FAILURE;
    }
    let spec_text = format!("{spec:?}")
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    println!(
        "{{\"name\": \"{name}\", \"spec\": \"{spec_text}\", \"gguf_bytes\": {}, \"gguf_sha256\": \"{}\", \"n_vocab\": {}}}",
        bytes.len(),
        sha256_hex(&bytes),
        spec.n_vocab()
    );
    ExitCode::SUCCESS
}
