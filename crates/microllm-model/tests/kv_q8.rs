//! A Q8_0 KV cache (`KvType::Q8_0`): logits close to the f16 cache's, prefill equal to
//! token-by-token decode, about half the bytes, and a clear error for heads it cannot hold.

use microllm_gguf::GgufFile;
use microllm_kernels::Kernels;
use microllm_model::{KvType, Logits, Model, ModelError, ModelOptions, StateOptions};
use microllm_testkit::{tiny_model_bytes, TinySpec};

fn load(spec: &TinySpec) -> Model {
    let file = GgufFile::from_bytes(tiny_model_bytes(spec)).expect("tiny model parses");
    Model::from_gguf(
        file,
        ModelOptions {
            n_threads: 2,
            kernels: Kernels::detect(),
            pack: true,
        },
    )
    .expect("tiny model loads")
}

/// Specs whose heads are 32 wide (Q8_0 blocks): plain GQA, Gemma 2 (soft-capping, sliding
/// window), Gemma 3 (Q/K norms, sliding window).
fn specs() -> Vec<(&'static str, TinySpec)> {
    let mut llama = TinySpec::llama();
    (llama.n_head, llama.n_head_kv) = (2, 1);
    vec![
        ("llama", llama),
        ("gemma2", TinySpec::gemma2()),
        ("gemma3", TinySpec::gemma3()),
    ]
}

fn prompt(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 11) % n_vocab) as u32).collect()
}

fn opts(kv_type: KvType, n_batch: usize) -> StateOptions {
    StateOptions {
        n_ctx: 64,
        n_batch,
        kv_type,
    }
}

/// All logits of `tokens` in one batch.
fn batched(model: &Model, tokens: &[u32], kv_type: KvType) -> Vec<f32> {
    let mut state = model.new_state(opts(kv_type, 64)).unwrap();
    let mut out = vec![0.0; tokens.len() * model.config.n_vocab];
    model
        .forward(&mut state, tokens, Logits::All(&mut out))
        .unwrap();
    out
}

/// All logits of `tokens`, one token per call.
fn stepwise(model: &Model, tokens: &[u32], kv_type: KvType) -> Vec<f32> {
    let mut state = model.new_state(opts(kv_type, 4)).unwrap();
    let mut out = Vec::new();
    for t in tokens {
        model
            .forward(&mut state, std::slice::from_ref(t), Logits::Last)
            .unwrap();
        out.extend_from_slice(state.logits());
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn q8_0_cache_logits_are_close_to_f16() {
    for (name, spec) in specs() {
        let model = load(&spec);
        let toks = prompt(20, model.config.n_vocab);
        let f16 = batched(&model, &toks, KvType::F16);
        let q8 = batched(&model, &toks, KvType::Q8_0);
        let scale = f16.iter().map(|v| v.abs()).fold(0.0, f32::max);
        let d = max_diff(&f16, &q8);
        // Q8_0 keeps ~1/254 of each block's range: the logits move by well under 2% of their
        // scale. A misplaced row or head moves them by tens of percent.
        assert!(
            d <= 0.02 * scale,
            "{name}: q8_0 vs f16 KV differ by {d} (logit scale {scale})"
        );
        // The quantized path really ran (an exact tie would mean it did not).
        assert!(d > 0.0, "{name}: q8_0 logits are bit-identical to f16");
    }
}

#[test]
fn q8_0_prefill_equals_stepwise_decode() {
    for (name, spec) in specs() {
        let model = load(&spec);
        let toks = prompt(13, model.config.n_vocab);
        let a = batched(&model, &toks, KvType::Q8_0);
        let b = stepwise(&model, &toks, KvType::Q8_0);
        let d = max_diff(&a, &b);
        assert!(d < 1e-3, "{name}: prefill vs stepwise differ by {d}");
    }
}

#[test]
fn q8_0_cache_takes_about_half_the_bytes() {
    let (_, spec) = specs().remove(0);
    let model = load(&spec);
    let c = &model.config;
    let f16 = model.new_state(opts(KvType::F16, 8)).unwrap();
    let q8 = model.new_state(opts(KvType::Q8_0, 8)).unwrap();
    let values = c.n_layer * 64 * (c.k_dim() + c.v_dim());
    assert_eq!(f16.kv_bytes(), values * 2);
    assert_eq!(q8.kv_bytes(), values / 32 * 34);
    assert_eq!((f16.kv_type(), q8.kv_type()), (KvType::F16, KvType::Q8_0));
}

#[test]
fn q8_0_cache_needs_heads_of_32() {
    // TinySpec::llama() has heads 16 wide.
    let model = load(&TinySpec::llama());
    let err = model.new_state(opts(KvType::Q8_0, 8)).unwrap_err();
    assert!(matches!(err, ModelError::BadOptions(_)), "{err}");
    assert!(err.to_string().contains("f16"), "{err}");
    assert_eq!("q8_0".parse::<KvType>().unwrap(), KvType::Q8_0);
    assert!("q4".parse::<KvType>().is_err());
}
