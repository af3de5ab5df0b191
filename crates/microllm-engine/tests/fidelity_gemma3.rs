//! Fidelity against llama.cpp on Gemma 3 270M Q4_K_M (tests/fixtures/gemma3/, copied from
//! ../shared/reference/gemma3/, produced by llama.cpp 3aa0ce9 with 2 threads). Same acceptance
//! as SmolLM2's (see common::check_greedy_fixture and fidelity_smollm2.rs for the two modes);
//! llama.cpp built natively on the fixtures' CPU differs from them by up to 1.68 here, so the
//! fast path's tolerance is 1.7.

mod common;

/// See the module documentation.
const MAX_MEAN_KLD: f64 = 0.01;
const MIN_TOP1: f64 = 0.95;

#[test]
fn greedy_and_teacher_forced_match_llama_cpp_exactly() {
    common::check_greedy_fixture(
        &common::load_model(&common::gemma3(), 2, true),
        "gemma3/greedy.json",
        common::LOGIT_TOL_EXACT,
    );
}

#[test]
fn fast_path_stays_within_llama_cpp_spread() {
    let path = common::gemma3();
    common::check_fast_against_exact(
        &common::load_model(&path, 2, true),
        &common::load_model(&path, 2, false),
        "gemma3/greedy.json",
        MAX_MEAN_KLD,
        MIN_TOP1,
    );
}
