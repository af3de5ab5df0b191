//! Fidelity against llama.cpp on SmolLM2-135M-Instruct Q4_1 (tests/fixtures/smollm2/, copied
//! from ../shared/reference/smollm2/, produced by llama.cpp 3aa0ce9 with 2 threads).
//!
//! Acceptance: prompt ids identical; first greedy token identical; the 32-token greedy
//! continuation identical on >= 90% of prompts, any divergence only where llama.cpp's top-2
//! logits are within the tolerance; teacher-forced, every step's top-5 logits within the
//! tolerance of llama.cpp's. Two modes:
//! - llama.cpp-exact arithmetic (`Model::set_exact(true)`): tolerance 0.5 (observed 0.0000);
//! - the default fast path (panel matmuls, tiled attention), which rounds differently: the
//!   tolerance is llama.cpp's own spread on one machine — the same llama.cpp commit built
//!   natively (AVX-512) on the CPU these fixtures were checked on differs from them by up to
//!   1.04 on these logits (`tools/fixtures/native_spread.py`), so 1.1.

mod common;

use std::ops::ControlFlow;

use microllm_engine::{ChatMessage, Session, StateOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
}

/// See the module documentation.
const MAX_MEAN_KLD: f64 = 0.01;
const MIN_TOP1: f64 = 0.95;

#[test]
fn greedy_and_teacher_forced_match_llama_cpp_exactly() {
    common::check_greedy_fixture(
        &common::load_model(&common::smollm2(), 2, true),
        "smollm2/greedy.json",
        common::LOGIT_TOL_EXACT,
    );
}

#[test]
fn fast_path_stays_within_llama_cpp_spread() {
    let path = common::smollm2();
    common::check_fast_against_exact(
        &common::load_model(&path, 2, true),
        &common::load_model(&path, 2, false),
        "smollm2/greedy.json",
        MAX_MEAN_KLD,
        MIN_TOP1,
    );
}

#[test]
fn chat_template_and_greedy_answer_match() {
    let lm = common::load_model(&common::smollm2(), 2, true);
    let cases: Vec<Chat> = common::read_json("smollm2/chat.json");
    let mut session = Session::new(
        &lm,
        StateOptions {
            n_ctx: 512,
            n_batch: 512,
            ..Default::default()
        },
    )
    .unwrap();
    for c in &cases {
        let rendered = lm
            .render_chat(None, &c.messages, c.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered, c.rendered);
        let ids = lm.tokenize_chat(&rendered).unwrap();
        assert_eq!(ids, c.prompt_ids);
        session.reset();
        let g = session
            .generate(
                &ids,
                &common::greedy_opts(c.generated_ids.len()),
                None,
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
        assert_eq!(g.tokens, c.generated_ids, "answer to {:?}", c.messages);
    }
}
