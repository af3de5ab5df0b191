//! Fidelity against llama.cpp on Gemma 3 270M Q4_K_M (tests/fixtures/gemma3/, copied from
//! ../shared/reference/gemma3/, produced by llama.cpp 3aa0ce9 with 2 threads). Same acceptance
//! as SmolLM2's (see common::check_greedy_fixture).

mod common;

#[test]
fn greedy_and_teacher_forced_match_llama_cpp() {
    common::check_greedy_fixture(
        &common::load_model(&common::gemma3(), 2),
        "gemma3/greedy.json",
    );
}
