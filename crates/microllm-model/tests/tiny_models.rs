//! Tiny random models of each llama-family architecture, built by the test kit: batched
//! prefill must equal token-by-token decode, results must not depend on the thread count, and
//! the scalar and SIMD kernel paths must agree — each within a stated tolerance.

use microllm_gguf::GgufFile;
use microllm_kernels::{KernelPath, Kernels};
use microllm_model::{Logits, Model, ModelOptions, StateOptions};
use microllm_testkit::{tiny_model_bytes, TinySpec};

/// Max |difference| allowed between two ways of computing the same logits. The paths differ
/// only in f32 summation order (batched vs single-row matmul tiles, thread split), so the gap
/// is a few ulps of the logit scale; 1e-3 leaves room without hiding a real bug (a wrong
/// position or mask changes logits by ~1e-1).
const TOL: f32 = 1e-3;

fn specs() -> Vec<(&'static str, TinySpec)> {
    let mut swa = TinySpec::mistral();
    swa.sliding_window = Some(5);
    vec![
        ("llama", TinySpec::llama()),
        ("qwen2", TinySpec::qwen2()),
        ("mistral", swa),
    ]
}

/// A tiny model with llama.cpp-exact arithmetic: these tests are about batching, threads and
/// paths agreeing under one arithmetic (the fast path is checked in `fast_prefill_...`).
fn load(spec: &TinySpec, n_threads: usize, kernels: Kernels) -> Model {
    let file = GgufFile::from_bytes(tiny_model_bytes(spec)).expect("tiny model parses");
    let mut m = Model::from_gguf(
        file,
        ModelOptions {
            n_threads,
            kernels,
            pack: true,
        },
    )
    .expect("tiny model loads");
    m.set_exact(true);
    m
}

/// The default fast path (panel matmuls, tiled attention) prefills what the exact decode
/// computes token by token, up to 8-bit activation and f16 rounding noise.
#[test]
fn fast_prefill_agrees_with_exact_stepwise_decode() {
    const FAST_TOL: f32 = 2e-2;
    for (name, spec) in specs() {
        let mut model = load(&spec, 2, Kernels::detect());
        let toks = prompt(20, model.config.n_vocab);
        let exact = stepwise(&model, &toks);
        model.set_exact(false);
        let fast = batched(&model, &toks, 64);
        let d = max_diff(&fast, &exact);
        eprintln!("{name}: fast prefill vs exact decode {d}");
        assert!(
            d < FAST_TOL,
            "{name}: fast prefill vs exact decode differ by {d}"
        );
        // The fast path does not depend on how the prompt is split.
        let split = batched(&model, &toks, 7);
        let d = max_diff(&fast, &split);
        assert!(
            d < 1e-5,
            "{name}: fast prefill in one batch vs batches of 7 differ by {d}"
        );
    }
}

fn prompt(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % n_vocab) as u32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// All logits of `tokens`, evaluated in one batch.
fn batched(model: &Model, tokens: &[u32], n_batch: usize) -> Vec<f32> {
    let n_vocab = model.config.n_vocab;
    let mut state = model
        .new_state(StateOptions {
            n_ctx: 64,
            n_batch,
            ..Default::default()
        })
        .unwrap();
    let mut out = vec![0.0; tokens.len() * n_vocab];
    model
        .forward(&mut state, tokens, Logits::All(&mut out))
        .unwrap();
    out
}

/// All logits of `tokens`, one token per forward call.
fn stepwise(model: &Model, tokens: &[u32]) -> Vec<f32> {
    let mut state = model
        .new_state(StateOptions {
            n_ctx: 64,
            n_batch: 8,
            ..Default::default()
        })
        .unwrap();
    let mut out = Vec::new();
    for t in tokens {
        model
            .forward(&mut state, std::slice::from_ref(t), Logits::Last)
            .unwrap();
        out.extend_from_slice(state.logits());
    }
    out
}

#[test]
fn prefill_equals_stepwise_decode() {
    for (name, spec) in specs() {
        let model = load(&spec, 1, Kernels::detect());
        let toks = prompt(20, model.config.n_vocab);
        let a = batched(&model, &toks, 64);
        let b = stepwise(&model, &toks);
        let d = max_diff(&a, &b);
        assert!(d < TOL, "{name}: batched vs stepwise differ by {d}");
        // Batches split into several forward calls agree too.
        let c = batched(&model, &toks, 7);
        let d = max_diff(&a, &c);
        assert!(d < TOL, "{name}: one batch vs batches of 7 differ by {d}");
        // Logits are not degenerate.
        let spread = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
            - a.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        assert!(spread > 1e-2, "{name}: logits look constant ({spread})");
    }
}

#[test]
fn thread_count_does_not_change_results() {
    for (name, spec) in specs() {
        let one = load(&spec, 1, Kernels::detect());
        let toks = prompt(17, one.config.n_vocab);
        let a = batched(&one, &toks, 64);
        let sa = stepwise(&one, &toks);
        for n in [2, 3] {
            let m = load(&spec, n, Kernels::detect());
            let d = max_diff(&a, &batched(&m, &toks, 64));
            assert!(d < TOL, "{name}: {n} threads batched differ by {d}");
            let d = max_diff(&sa, &stepwise(&m, &toks));
            assert!(d < TOL, "{name}: {n} threads stepwise differ by {d}");
        }
    }
}

#[test]
fn scalar_and_simd_paths_agree() {
    let Ok(simd) = Kernels::with_path(KernelPath::Avx2) else {
        eprintln!("skipping: this CPU has no AVX2+FMA+F16C");
        return;
    };
    let scalar = Kernels::with_path(KernelPath::Scalar).unwrap();
    for (name, spec) in specs() {
        let a = load(&spec, 2, scalar);
        let b = load(&spec, 2, simd);
        let toks = prompt(12, a.config.n_vocab);
        let d = max_diff(&batched(&a, &toks, 64), &batched(&b, &toks, 64));
        assert!(d < TOL, "{name}: scalar vs avx2 differ by {d}");
    }
}

#[test]
fn sliding_window_changes_attention() {
    // With a window of 5, logits at position 10 must differ from the full-attention model's.
    let mut full = TinySpec::mistral();
    full.sliding_window = None;
    let mut swa = full.clone();
    swa.sliding_window = Some(5);
    let a = load(&full, 1, Kernels::detect());
    let b = load(&swa, 1, Kernels::detect());
    let n_vocab = a.config.n_vocab;
    let toks = prompt(12, n_vocab);
    let (la, lb) = (batched(&a, &toks, 64), batched(&b, &toks, 64));
    // Positions < 5 see the same keys.
    let early = max_diff(&la[..5 * n_vocab], &lb[..5 * n_vocab]);
    assert!(early < TOL, "positions inside the window differ by {early}");
    let late = max_diff(
        &la[10 * n_vocab..11 * n_vocab],
        &lb[10 * n_vocab..11 * n_vocab],
    );
    assert!(late > 1e-3, "the window had no effect ({late})");
}

#[test]
fn bad_tokens_and_full_context_are_errors() {
    let model = load(&TinySpec::llama(), 1, Kernels::detect());
    let mut state = model
        .new_state(StateOptions {
            n_ctx: 4,
            n_batch: 4,
            ..Default::default()
        })
        .unwrap();
    let bad = model.config.n_vocab as u32;
    let e = model.forward(&mut state, &[bad], Logits::Last).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    model.forward(&mut state, &[1, 2, 3], Logits::Last).unwrap();
    let e = model
        .forward(&mut state, &[1, 2], Logits::Last)
        .unwrap_err();
    assert!(e.to_string().contains("context is full"), "{e}");
}

#[test]
fn batched_sequences_equal_sequences_alone() {
    use microllm_model::SeqBatch;
    for (name, spec) in specs() {
        let model = load(&spec, 2, Kernels::detect());
        let n_vocab = model.config.n_vocab;
        let opts = StateOptions {
            n_ctx: 64,
            n_batch: 1,
            ..Default::default()
        };
        // Three sequences at different depths: prefixes evaluated alone first.
        let prefixes: [Vec<u32>; 3] =
            [prompt(5, n_vocab), vec![], prompt(9, n_vocab)[3..].to_vec()];
        let news: [Vec<u32>; 3] = [vec![7], prompt(6, n_vocab), vec![3, 4]];
        let mut alone = Vec::new();
        let mut states = Vec::new();
        for (p, n) in prefixes.iter().zip(&news) {
            let mut st = model
                .new_state(StateOptions {
                    n_ctx: 64,
                    n_batch: 16,
                    ..Default::default()
                })
                .unwrap();
            if !p.is_empty() {
                model.forward(&mut st, p, Logits::None).unwrap();
            }
            let mut out = vec![0.0; n.len() * n_vocab];
            model.forward(&mut st, n, Logits::All(&mut out)).unwrap();
            alone.push(out);
            let mut bst = model.new_state(opts).unwrap();
            if !p.is_empty() {
                let mut scratch = model.new_scratch(16).unwrap();
                let mut one = [SeqBatch {
                    state: &mut bst,
                    tokens: p,
                    logits: Logits::None,
                }];
                model.forward_batch(&mut scratch, &mut one).unwrap();
            }
            states.push(bst);
        }
        let mut scratch = model.new_scratch(16).unwrap();
        let mut outs: Vec<Vec<f32>> = news.iter().map(|n| vec![0.0; n.len() * n_vocab]).collect();
        {
            let mut it = states.iter_mut().zip(outs.iter_mut()).zip(&news);
            let ((s0, o0), n0) = it.next().unwrap();
            let ((s1, o1), n1) = it.next().unwrap();
            let ((s2, o2), n2) = it.next().unwrap();
            let mut seqs = [
                SeqBatch {
                    state: s0,
                    tokens: n0,
                    logits: Logits::All(o0),
                },
                SeqBatch {
                    state: s1,
                    tokens: n1,
                    logits: Logits::All(o1),
                },
                SeqBatch {
                    state: s2,
                    tokens: n2,
                    logits: Logits::All(o2),
                },
            ];
            model.forward_batch(&mut scratch, &mut seqs).unwrap();
        }
        for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
            assert_eq!(a, b, "{name}: sequence {i} differs when batched");
        }
        for (st, (p, n)) in states.iter().zip(prefixes.iter().zip(&news)) {
            assert_eq!(st.n_past(), p.len() + n.len());
        }
    }
}

/// A tiny model from `bytes` on 2 threads, its weights packed at load or not.
fn load_packed(bytes: &[u8], pack: bool) -> Model {
    let file = GgufFile::from_bytes(bytes.to_vec()).expect("tiny model parses");
    let opts = ModelOptions {
        n_threads: 2,
        kernels: Kernels::detect(),
        pack,
    };
    Model::from_gguf(file, opts).expect("tiny model loads")
}

/// Matrices with no packed layout (here F16) are copied into the packing arena as they are:
/// the same bytes, so every result is the same bits as the unpacked model's.
#[test]
fn copied_weights_give_the_same_bits() {
    let mut spec = TinySpec::llama();
    spec.weight_type = microllm_gguf::GgmlType::F16;
    let bytes = microllm_testkit::tiny_model_bytes(&spec);
    let (copied, plain) = (load_packed(&bytes, true), load_packed(&bytes, false));
    // Every layer's 7 matrices and the output projection.
    let n = copied.config.n_layer * 7 + 1;
    assert_eq!(copied.pack_stats().copied, n);
    assert_eq!(copied.pack_stats().matrices, 0);
    assert_eq!(plain.pack_stats().copied, 0);
    let toks = prompt(12, copied.config.n_vocab);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(batched(&copied, &toks, 64)),
        bits(batched(&plain, &toks, 64))
    );
    assert_eq!(
        bits(stepwise(&copied, &toks)),
        bits(stepwise(&plain, &toks))
    );
}

/// Packing the weights at load (the default) changes no batched result: the packed matmul is
/// bit-identical to the panel matmul the unpacked model uses for prompts, for Q4_0, Q4_1,
/// Q8_0 and Q6_K weights (formats that pack; Q6_K's rows need 256 elements, so its model is
/// wider); single-token decode, which unpacked runs llama.cpp's per-pair arithmetic, stays
/// within the fast path's tolerance.
#[test]
fn packed_weights_give_the_panel_results() {
    for ty in [
        microllm_gguf::GgmlType::Q4_0,
        microllm_gguf::GgmlType::Q4_1,
        microllm_gguf::GgmlType::Q8_0,
        microllm_gguf::GgmlType::Q6_K,
    ] {
        let mut spec = TinySpec::llama();
        spec.weight_type = ty;
        if ty == microllm_gguf::GgmlType::Q6_K {
            (spec.n_embd, spec.n_ff) = (256, 256);
        }
        let encode = |ty: microllm_gguf::GgmlType, dims: &[u64], values: &[f32]| {
            let row = ty.row_size(dims[0]).expect("block-aligned row") as usize;
            let mut out = vec![0u8; row * (values.len() / dims[0] as usize)];
            microllm_kernels::reference::quantize_row(ty, values, &mut out).expect("encodable");
            out
        };
        let bytes = microllm_testkit::tiny_model_bytes_with(&spec, &encode);
        let (packed, plain) = (load_packed(&bytes, true), load_packed(&bytes, false));
        assert!(packed.pack_stats().matrices > 0, "{ty:?}: nothing packed");
        assert_eq!(packed.pack_stats().refused, 0);
        assert_eq!(plain.pack_stats().matrices, 0);
        let toks = prompt(12, packed.config.n_vocab);
        let (a, b) = (batched(&packed, &toks, 64), batched(&plain, &toks, 64));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{ty:?}: packed prefill differs from the panel path by {}",
            max_diff(&a, &b)
        );
        // Decode: the two arithmetics round the activations differently (f32 scales per 32
        // elements against Q8_0's f16 ones): a few percent of the logits' scale, where a wrong
        // weight or row would be of the order of the scale itself.
        let (sa, sb) = (stepwise(&packed, &toks), stepwise(&plain, &toks));
        let scale = sb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = max_diff(&sa, &sb);
        eprintln!("{ty:?}: packed decode vs llama.cpp-style decode {d} (logit scale {scale})");
        assert!(
            d < 0.05 * scale,
            "{ty:?}: packed decode vs llama.cpp-style decode differ by {d} (scale {scale})"
        );
    }
}
