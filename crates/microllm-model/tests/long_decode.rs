//! Decode past a few hundred tokens of context on tiny random models: the fast decode
//! attention (GQA heads as the rows of one tiled kernel call, keys split over threads into
//! parts merged by log-sum-exp) against the llama.cpp-exact one, and split against unsplit.
//!
//! Both states are prefilled the same way (fast mode, the cheaper in debug builds) and decode
//! the same tokens; one token per forward call uses the same matmul kernels in both modes, so
//! the logits differ only by the decode attention.

use microllm_gguf::GgufFile;
use microllm_kernels::Kernels;
use microllm_model::{Logits, Model, ModelOptions, State, StateOptions};
use microllm_testkit::{tiny_model_bytes, TinySpec};

/// Prompt length (above 2 x 256 keys, so the decode attention splits on several threads).
const N_PROMPT: usize = 560;
/// Decode steps after the prompt.
const N_DECODE: usize = 40;
/// Context of the states.
const N_CTX: usize = N_PROMPT + N_DECODE + 8;

fn specs() -> Vec<(&'static str, TinySpec)> {
    let long = |mut s: TinySpec| {
        s.n_ctx = 1024;
        s
    };
    // A window smaller than the context and larger than two parts: parts start past key 0.
    let mut mistral = long(TinySpec::mistral());
    mistral.sliding_window = Some(520);
    vec![
        ("llama", long(TinySpec::llama())),
        ("mistral", mistral),
        ("gemma2 (soft-capped)", long(TinySpec::gemma2())),
        ("gemma3 (one KV head)", long(TinySpec::gemma3())),
    ]
}

fn load(spec: &TinySpec, n_threads: usize) -> Model {
    let file = GgufFile::from_bytes(tiny_model_bytes(spec)).expect("tiny model parses");
    Model::from_gguf(
        file,
        ModelOptions {
            n_threads,
            kernels: Kernels::detect(),
            pack: true,
        },
    )
    .expect("tiny model loads")
}

fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % n_vocab) as u32).collect()
}

/// Prefills `N_PROMPT` tokens (fast mode), then decodes `N_DECODE` in the given mode; returns
/// the logits of every decode step.
fn decode(model: &mut Model, exact: bool) -> Vec<Vec<f32>> {
    let toks = tokens(N_PROMPT + N_DECODE, model.config.n_vocab);
    let mut state: State = model
        .new_state(StateOptions {
            n_ctx: N_CTX,
            n_batch: 128,
            ..Default::default()
        })
        .unwrap();
    model.set_exact(false);
    for chunk in toks[..N_PROMPT].chunks(128) {
        model.forward(&mut state, chunk, Logits::Last).unwrap();
    }
    model.set_exact(exact);
    toks[N_PROMPT..]
        .iter()
        .map(|t| {
            model
                .forward(&mut state, std::slice::from_ref(t), Logits::Last)
                .unwrap();
            state.logits().to_vec()
        })
        .collect()
}

fn softmax64(l: &[f32]) -> Vec<f64> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = l.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn kld(p: &[f32], q: &[f32]) -> f64 {
    let (p, q) = (softmax64(p), softmax64(q));
    p.iter()
        .zip(&q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b.max(1e-300)).ln())
        .sum()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fast_decode_attention_agrees_with_exact_at_long_context() {
    // The exact kernel rounds the query and the output accumulator to f16 (llama.cpp's CPU
    // flash attention); the fast one keeps f32. That noise is ~1e-3 of the logits' scale; a
    // wrong key range, mask or merge moves logits by ~1e-1.
    const MAX_LOGIT_DIFF: f32 = 2e-2;
    const MAX_KLD: f64 = 1e-4;
    for (name, spec) in specs() {
        let mut model = load(&spec, 2);
        let exact = decode(&mut model, true);
        let fast = decode(&mut model, false);
        let (mut worst_d, mut worst_kld) = (0.0f32, 0.0f64);
        for (e, f) in exact.iter().zip(&fast) {
            worst_d = worst_d.max(max_diff(e, f));
            worst_kld = worst_kld.max(kld(e, f));
        }
        eprintln!("{name}: fast vs exact decode: max |dlogit| {worst_d}, max KLD {worst_kld:e}");
        assert!(
            worst_d < MAX_LOGIT_DIFF,
            "{name}: logits differ by {worst_d}"
        );
        assert!(worst_kld < MAX_KLD, "{name}: KLD {worst_kld}");
        // Not degenerate: the steps' logits differ from one another.
        assert!(
            max_diff(&fast[0], &fast[N_DECODE - 1]) > 1e-2,
            "{name}: constant logits"
        );
    }
}

#[test]
fn split_decode_attention_equals_unsplit() {
    // One thread never splits the keys; two and three threads do (the context is past
    // 2 x 256 keys). The parts change only the f32 summation order (and so does the fast
    // prefill's split over threads: ~2e-4 at most here); merging parts without rescaling them
    // moves these logits by ~2e-2.
    const TOL: f32 = 1e-3;
    for (name, spec) in specs() {
        let one = decode(&mut load(&spec, 1), false);
        for n in [2, 3] {
            let split = decode(&mut load(&spec, n), false);
            for (step, (a, b)) in one.iter().zip(&split).enumerate() {
                let d = max_diff(a, b);
                assert!(d < TOL, "{name}: {n} threads, step {step}: differ by {d}");
            }
        }
    }
}
