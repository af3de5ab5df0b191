//! Differential tests against llama.cpp, one per architecture, without a real checkpoint and
//! without llama.cpp at test time.
//!
//! Each fixture in tests/fixtures/tiny/ holds llama.cpp's full logits for a fixed token
//! sequence on one tiny random model of microllm-testkit (`TinySpec::named(name)`), with the
//! SHA-256 of the GGUF bytes llama.cpp ran (tools/fixtures/gen_tiny.sh writes them; see the
//! README there). The test rebuilds the same file in memory, checks the hash, loads it with
//! [`Model`], evaluates the sequence the same way (the first `prefill` tokens as one batch,
//! then one token per call, so both the batched and the decode path are covered) and
//! compares every logit.
//!
//! Tolerance: [`REL_TOL`] of the fixture's logit scale (its largest |logit|). microllm
//! reproduces llama.cpp's arithmetic (activation quantization, block dot products, f16 KV
//! cache, flash-attention accumulation): with Q8_0 weights the logits are bit-identical, with
//! F32 weights they agree to a few f32 ulps (measured: <= 1.6e-6 on a scale of ~2.8); a wrong
//! mask, RoPE pair layout, norm or soft-cap moves them by 1e-2 or more.
//!
//! Known deviations, each pinned by an ignored strict test to enable once fixed:
//! - F32 weights, single-token decode: llama.cpp multiplies one activation row with
//!   `ggml_vec_dot_f32` (4 x 8-lane accumulators over 32-element steps, reduced pairwise)
//!   instead of the one-accumulator sgemm order it uses for 2+ rows and microllm uses for all;
//!   the 1-ulp differences in Q/K/V flip f16 roundings (FA's f16 Q, the f16 KV cache), which
//!   the 6-layer tiny Gemma 3 amplifies to 2.9e-4 of its logit scale. Hence
//!   [`F32_DECODE_REL_TOL`] for that model. (llama.cpp's own batched and one-by-one logits
//!   differ by 6.5e-4 of the scale on it.)
//! - F16 / BF16 weights: llama.cpp rounds the activations to F16 / BF16 before the dot
//!   product (its `vec_dot_type` for those formats); microllm keeps them f32, a difference of
//!   8e-4 (F16) and 3.6e-3 (BF16) of the logit scale on the tiny Llama.

use std::path::{Path, PathBuf};

use microllm_gguf::{GgmlType, GgufFile};
use microllm_kernels::{KernelPath, Kernels};
use microllm_model::{Logits, Model, ModelError, ModelOptions, StateOptions};
use microllm_testkit::{sha256_hex, tiny_model_bytes_with, TinySpec};
use serde_json::Value;

/// Largest |microllm - llama.cpp| allowed, as a fraction of the fixture's largest |logit|.
const REL_TOL: f32 = 1e-4;

/// The same for F32 weights where single-token decode meets llama.cpp's different f32
/// summation order (see the module doc): 3.4x the deviation measured on the tiny Gemma 3.
const F32_DECODE_REL_TOL: f32 = 1e-3;

/// The tolerance on any other kernel path than AVX2 (`MICROLLM_KERNELS=scalar`, a CPU
/// without AVX2): the fixtures are llama.cpp's AVX2 arithmetic, which the AVX2 path reproduces; the
/// scalar reference sums float dot products in f64, so F32 models differ by f32 rounding that
/// the f16 KV cache amplifies (measured: 1.5e-4 of the scale on the tiny Llama and Mistral).
/// Quantized models stay within 1e-7 of the scale on either path.
const SCALAR_REL_TOL: f32 = 1e-3;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// Quantized weight matrices are encoded by microllm-kernels' reference quantizers, the same
/// encoder the fixture generator (microllm-testkit's `write_tiny` example) uses.
fn encode(ty: GgmlType, dims: &[u64], values: &[f32]) -> Vec<u8> {
    let n_rows: u64 = dims[1..].iter().product();
    let row = ty.row_size(dims[0]).expect("block-aligned row");
    let mut out = vec![0u8; (row * n_rows) as usize];
    microllm_kernels::reference::quantize_row(ty, values, &mut out).expect("encodable type");
    out
}

struct Fixture {
    spec: TinySpec,
    gguf: Vec<u8>,
    tokens: Vec<u32>,
    prefill: usize,
    /// (n_tokens, n_vocab) row-major.
    logits: Vec<Vec<f32>>,
}

fn load_fixture(name: &str) -> Fixture {
    let path = fixture_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run tools/fixtures/gen_tiny.sh", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    let spec = TinySpec::named(name).unwrap_or_else(|| panic!("no TinySpec named {name}"));
    assert_eq!(
        format!("{spec:?}"),
        v["spec"].as_str().unwrap(),
        "{name}: the testkit's spec changed since the fixture was made; if on purpose, \
         regenerate with tools/fixtures/gen_tiny.sh"
    );
    let gguf = tiny_model_bytes_with(&spec, &encode);
    assert_eq!(
        sha256_hex(&gguf),
        v["gguf_sha256"].as_str().unwrap(),
        "{name}: the tiny GGUF is not the file llama.cpp ran (same spec, different bytes: the \
         testkit's writer or weights changed); regenerate with tools/fixtures/gen_tiny.sh"
    );
    let fixture = Fixture {
        spec,
        gguf,
        tokens: serde_json::from_value(v["tokens"].clone()).unwrap(),
        prefill: v["prefill"].as_u64().unwrap() as usize,
        logits: serde_json::from_value(v["logits"].clone()).unwrap(),
    };
    assert_eq!(fixture.logits.len(), fixture.tokens.len());
    assert!(fixture.prefill >= 2 && fixture.prefill < fixture.tokens.len());
    fixture
}

/// microllm's logits for the fixture's tokens: the prefill as one batch, then single steps.
fn run(f: &Fixture, n_threads: usize, kernels: Kernels) -> Vec<Vec<f32>> {
    let file = GgufFile::from_bytes(f.gguf.clone()).unwrap();
    let mut model = Model::from_gguf(
        file,
        ModelOptions {
            n_threads,
            kernels,
            pack: true,
        },
    )
    .unwrap();
    // These logits are compared with llama.cpp's at 1e-4: its exact arithmetic.
    model.set_exact(true);
    let n_vocab = model.config.n_vocab;
    assert_eq!(n_vocab, f.spec.n_vocab());
    let mut state = model
        .new_state(StateOptions {
            n_ctx: 64,
            n_batch: 64,
            ..Default::default()
        })
        .unwrap();
    let mut all = vec![0.0; f.prefill * n_vocab];
    model
        .forward(&mut state, &f.tokens[..f.prefill], Logits::All(&mut all))
        .unwrap();
    let mut rows: Vec<Vec<f32>> = all.chunks(n_vocab).map(<[f32]>::to_vec).collect();
    for t in &f.tokens[f.prefill..] {
        model
            .forward(&mut state, std::slice::from_ref(t), Logits::Last)
            .unwrap();
        rows.push(state.logits().to_vec());
    }
    rows
}

fn check(name: &str) {
    check_within(name, REL_TOL);
}

fn check_within(name: &str, rel_tol: f32) {
    let f = load_fixture(name);
    let kernels = Kernels::from_env().unwrap();
    // Only the AVX2 path reproduces llama.cpp's x86 arithmetic (future paths: as scalar).
    let rel_tol = match kernels.path() {
        KernelPath::Avx2 | KernelPath::Avx2Vnni => rel_tol,
        _ => rel_tol.max(SCALAR_REL_TOL),
    };
    let got = run(&f, 2, kernels);
    let scale = f
        .logits
        .iter()
        .flatten()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    let tol = rel_tol * scale;
    let mut worst = (0.0f32, 0, 0);
    for (pos, (g, w)) in got.iter().zip(&f.logits).enumerate() {
        assert_eq!(g.len(), w.len(), "{name}: vocabulary size");
        for (id, (a, b)) in g.iter().zip(w).enumerate() {
            let d = (a - b).abs();
            if d > worst.0 || d.is_nan() {
                worst = (d, pos, id);
            }
        }
    }
    let (d, pos, id) = worst;
    let path = if pos < f.prefill { "prefill" } else { "decode" };
    println!(
        "{name}: max |microllm - llama.cpp| = {d:.3e} (position {pos} [{path}], token {id}; \
         logit scale {scale:.3}, tolerance {tol:.3e}, {} kernels)",
        kernels.path()
    );
    assert!(
        d <= tol,
        "{name}: logits differ from llama.cpp's by {d:.3e} > {tol:.3e} at position {pos} \
         ({path}), token {id}: microllm {} vs llama.cpp {}",
        got[pos][id],
        f.logits[pos][id]
    );
}

#[test]
fn llama_matches_llama_cpp() {
    check("llama");
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2");
}

#[test]
fn mistral_matches_llama_cpp() {
    check("mistral");
}

#[test]
fn gemma2_matches_llama_cpp() {
    check("gemma2");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_within("gemma3", F32_DECODE_REL_TOL);
}

#[test]
#[ignore = "known: F32 single-token matmul does not follow ggml_vec_dot_f32's order (see module doc)"]
fn gemma3_f32_decode_matches_llama_cpp_strictly() {
    check("gemma3");
}

#[test]
fn phi3_matches_llama_cpp() {
    check("phi3");
}

#[test]
fn llama_q8_0_matches_llama_cpp() {
    check("llama-q8_0");
}

#[test]
fn gemma3_q8_0_matches_llama_cpp() {
    check("gemma3-q8_0");
}

#[test]
#[ignore = "known: llama.cpp rounds activations to F16 for F16 weights, microllm does not"]
fn llama_f16_matches_llama_cpp() {
    check("llama-f16");
}

#[test]
#[ignore = "known: llama.cpp rounds activations to BF16 for BF16 weights, microllm does not"]
fn llama_bf16_matches_llama_cpp() {
    check("llama-bf16");
}

/// Every supported architecture has a fixture, and every fixture is tested above.
#[test]
fn every_architecture_has_a_fixture() {
    let tested = [
        "llama",
        "qwen2",
        "mistral",
        "gemma2",
        "gemma3",
        "phi3",
        "llama-q8_0",
        "gemma3-q8_0",
        "llama-f16",
        "llama-bf16",
    ];
    let mut present: Vec<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            n.strip_suffix(".json").map(str::to_string)
        })
        .collect();
    present.sort();
    let mut want: Vec<String> = tested.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(
        present, want,
        "fixtures in tests/fixtures/tiny vs tests here"
    );
    for arch in microllm_model::Arch::SUPPORTED {
        assert!(
            tested.contains(arch),
            "architecture {arch} has no differential fixture"
        );
    }
}

/// The tiny models are read the way llama.cpp reads them, so that a fixture match means what
/// it seems to: Gemma 3 has 5 sliding-window layers then a global one, local RoPE base 10000
/// (no `rope.freq_base_swa` key) and an explicit head size; Gemma 2 alternates local and
/// global layers with both soft-caps; Phi-3 ignores its `sliding_window` key and uses the
/// short RoPE factors with the attention factor.
#[test]
fn tiny_configs_are_what_the_fixtures_assume() {
    let load = |name: &str| {
        let spec = TinySpec::named(name).unwrap();
        let file = GgufFile::from_bytes(tiny_model_bytes_with(&spec, &encode)).unwrap();
        Model::from_gguf(
            file,
            ModelOptions {
                n_threads: 1,
                kernels: Kernels::detect(),
                pack: true,
            },
        )
        .unwrap()
    };
    let g3 = load("gemma3");
    let c = &g3.config;
    assert_eq!(c.swa_layers, [true, true, true, true, true, false]);
    assert_eq!(c.sliding_window, Some(4));
    assert_eq!(c.rope.base, 1e6);
    assert_eq!(c.rope_base_swa, Some(10000.0));
    assert_eq!((c.head_dim, c.q_dim(), c.n_embd), (32, 128, 64));
    assert!(g3.weights.tied_output);

    let g2 = load("gemma2");
    let c = &g2.config;
    assert_eq!(c.swa_layers, [true, false]);
    assert_eq!((c.attn_softcap, c.final_softcap), (Some(1.0), Some(2.0)));

    let p3 = load("phi3");
    let c = &p3.config;
    // llama.cpp disables Phi-3's sliding window whatever the file says.
    assert_eq!(c.sliding_window, None);
    assert!(p3.weights.rope_freqs.is_some(), "short rope factors");
    assert!((c.rope.attn_factor - (1.0f32 + 8f32.ln() / 1024f32.ln()).sqrt()).abs() < 1e-6);
    assert!(!p3.weights.tied_output);
}

/// A model with a tensor in a type this build cannot compute with fails to load with an
/// error naming the tensor, its type and the supported types.
#[test]
fn unsupported_tensor_type_is_named() {
    for ty in [GgmlType::IQ4_NL, GgmlType::IQ2_XXS] {
        let mut spec = TinySpec::llama();
        spec.n_layer = 1;
        // IQ2_XXS blocks are 256 wide: make every row length a multiple of that.
        spec.n_embd = 256;
        spec.n_ff = 256;
        let target = "blk.0.ffn_down.weight";
        let enc = |t: GgmlType, dims: &[u64], values: &[f32]| encode(t, dims, values);
        let bytes = microllm_testkit::tiny_model_bytes_with(&spec, &enc);
        let bytes = retype_tensor(bytes, target, ty);
        let file = GgufFile::from_bytes(bytes).unwrap();
        let err = Model::from_gguf(
            file,
            ModelOptions {
                n_threads: 1,
                kernels: Kernels::detect(),
                pack: true,
            },
        )
        .unwrap_err();
        assert!(
            matches!(&err, ModelError::UnsupportedType { tensor, ty: t, .. }
                if tensor == target && t == ty.name()),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(msg.contains(ty.name()) && msg.contains(target), "{msg}");
        for supported in ["F32", "F16", "Q8_0", "Q4_K", "Q6_K"] {
            assert!(msg.contains(supported), "{msg}");
        }
    }
}

/// Rewrites the GGUF so that `name` has type `ty` (and a zero payload of the right size): the
/// writer is given the model's tensors with that one re-encoded.
fn retype_tensor(bytes: Vec<u8>, name: &str, ty: GgmlType) -> Vec<u8> {
    let f = GgufFile::from_bytes(bytes).unwrap();
    let mut w = microllm_gguf::GgufWriter::new();
    *w.metadata_mut() = f.metadata().clone();
    for t in f.tensors() {
        let (tty, data) = if t.name == name {
            let n_rows: u64 = t.dims[1..].iter().product();
            let n = ty.row_size(t.dims[0]).unwrap() * n_rows;
            (ty, vec![0u8; n as usize])
        } else {
            (t.ty, f.tensor_data(t).to_vec())
        };
        w.add_tensor(&t.name, &t.dims, tty, std::borrow::Cow::Owned(data))
            .unwrap();
    }
    w.to_bytes().unwrap()
}
