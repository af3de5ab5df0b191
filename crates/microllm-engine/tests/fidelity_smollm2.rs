//! Fidelity against llama.cpp on SmolLM2-135M-Instruct Q4_1 (tests/fixtures/smollm2/, copied
//! from ../shared/reference/smollm2/, produced by llama.cpp 3aa0ce9 with 2 threads).
//!
//! Acceptance: prompt ids identical; first greedy token identical; the 32-token greedy
//! continuation identical on >= 90% of prompts, any divergence only where llama.cpp's top-2
//! logits are within 0.5; teacher-forced, every step's top-5 logits within 0.5 of llama.cpp's.

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

#[test]
fn greedy_and_teacher_forced_match_llama_cpp() {
    common::check_greedy_fixture(
        &common::load_model(&common::smollm2(), 2),
        "smollm2/greedy.json",
    );
}

#[test]
fn chat_template_and_greedy_answer_match() {
    let lm = common::load_model(&common::smollm2(), 2);
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
