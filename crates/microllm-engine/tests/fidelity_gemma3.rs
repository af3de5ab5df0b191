//! Fidelity against llama.cpp on Gemma 3 270M Q4_K_M (tests/fixtures/gemma3/, copied
//! from ../shared/reference/gemma3/, produced by llama.cpp 3aa0ce9 with 2 threads).
//!
//! Acceptance: prompt ids identical; first greedy token identical; the 32-token greedy
//! continuation identical on >= 90% of prompts, any divergence only where llama.cpp's top-2
//! logits are within 0.5; teacher-forced, every step's top-5 logits within 0.5 of llama.cpp's.

mod common;

use std::ops::ControlFlow;

use microllm_engine::{
    GenerateOptions, LoadedModel, ModelOptions, SamplerConfig, Session, StateOptions,
};
use microllm_kernels::Kernels;
use serde::Deserialize;

#[derive(Deserialize)]
struct Greedy {
    prompt: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    top5_per_step: Vec<Vec<(u32, f32)>>,
}

/// Largest allowed |our logit - llama.cpp's logit| for the reference's top-5 tokens.
const LOGIT_TOL: f32 = 0.5;

fn load(threads: usize) -> LoadedModel {
    LoadedModel::load(
        &common::gemma3(),
        ModelOptions {
            n_threads: threads,
            kernels: Kernels::from_env().unwrap(),
        },
    )
    .unwrap()
}

fn greedy_opts(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens: n,
        sampler: SamplerConfig::greedy(),
        stop_at_eog: true,
    }
}

#[test]
fn greedy_and_teacher_forced_match_llama_cpp() {
    let lm = load(2);
    let cases: Vec<Greedy> = common::read_json("gemma3/greedy.json");
    let mut session = Session::new(
        &lm,
        StateOptions {
            n_ctx: 512,
            n_batch: 512,
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
                    gap < LOGIT_TOL,
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
                    d <= LOGIT_TOL,
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
