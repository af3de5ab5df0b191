//! `microllm inspect` and `microllm tokenize` on the tiny random model of every architecture
//! (microllm-testkit), no download needed: inspect names the architecture, tokenize gives
//! llama-tokenize's ids (recorded in tests/fixtures/tiny/<arch>.json by
//! tools/fixtures/gen_tiny.sh), and a tensor in an unsupported type is a one-line error that
//! names the type and the supported ones.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use microllm_gguf::{GgmlType, GgufFile, GgufWriter};
use microllm_testkit::{tiny_model_bytes, TinySpec};

const ARCHS: [&str; 6] = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3"];

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_microllm"));
    c.env_remove("MICROLLM_MODEL")
        .env("MICROLLM_KERNELS", "auto");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run microllm")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(format!("{name}.gguf"));
    std::fs::write(&p, bytes).unwrap();
    p
}

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/tiny/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn inspect_names_every_architecture() {
    let dir = tempfile::tempdir().unwrap();
    for name in ARCHS {
        let spec = TinySpec::named(name).unwrap();
        let path = write(dir.path(), name, &tiny_model_bytes(&spec));
        let out = run(&["inspect", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A Mistral conversion says "llama" (llama.cpp has no separate architecture for it);
        // its sliding window is what inspect shows besides.
        let arch = spec.arch.gguf_arch();
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_end() == format!("architecture:   {arch}")),
            "{name}: {stdout}"
        );
        let json = run(&["inspect", "--json", path.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["architecture"], arch, "{name}");
        assert_eq!(v["n_layer"], spec.n_layer, "{name}");
        assert_eq!(v["head_dim"], spec.head_dim(), "{name}");
        assert_eq!(v["n_vocab"], spec.n_vocab(), "{name}");
    }
}

#[test]
fn tokenize_matches_llama_cpp_on_every_tiny_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    for name in ARCHS {
        let spec = TinySpec::named(name).unwrap();
        let path = write(dir.path(), name, &tiny_model_bytes(&spec));
        let f = fixture(name);
        let text = f["tokenize"]["text"].as_str().unwrap();
        let out = run(&["tokenize", "-m", path.to_str().unwrap(), text]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids, f["tokenize"]["ids"], "{name}: {text:?}");
    }
}

/// The file `bytes` with tensor `name` turned into `ty` (zero payload of the right size).
fn retype_tensor(bytes: Vec<u8>, name: &str, ty: GgmlType) -> Vec<u8> {
    let f = GgufFile::from_bytes(bytes).unwrap();
    let mut w = GgufWriter::new();
    *w.metadata_mut() = f.metadata().clone();
    for t in f.tensors() {
        let (tty, data) = if t.name == name {
            let n_rows: u64 = t.dims[1..].iter().product();
            (
                ty,
                vec![0u8; (ty.row_size(t.dims[0]).unwrap() * n_rows) as usize],
            )
        } else {
            (t.ty, f.tensor_data(t).to_vec())
        };
        w.add_tensor(&t.name, &t.dims, tty, std::borrow::Cow::Owned(data))
            .unwrap();
    }
    w.to_bytes().unwrap()
}

#[test]
fn unsupported_tensor_type_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::IQ4_NL, GgmlType::IQ2_XXS] {
        let mut spec = TinySpec::llama();
        spec.n_layer = 1;
        // Row lengths that are whole IQ2_XXS super-blocks (256).
        spec.n_embd = 256;
        spec.n_ff = 256;
        let bytes = retype_tensor(tiny_model_bytes(&spec), "blk.0.ffn_down.weight", ty);
        let path = write(dir.path(), ty.name(), &bytes);
        for cmd in [
            vec!["inspect", path.to_str().unwrap()],
            vec![
                "run",
                "-m",
                path.to_str().unwrap(),
                "--raw",
                "-n",
                "1",
                "hi",
            ],
        ] {
            let out = run(&cmd);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
            assert!(
                err.starts_with("error:") && !err.contains("panicked"),
                "{err}"
            );
            assert!(
                err.contains(ty.name()) && err.contains("blk.0.ffn_down.weight"),
                "{err}"
            );
            assert!(
                err.contains("supported: F32, F16, BF16, Q8_0"),
                "the supported list: {err}"
            );
        }
    }
}
