//! Teacher-forced logits of SmolLM2-135M-Instruct Q4_1 against llama.cpp's (the model alone,
//! no tokenizer: the prompt ids come from the fixture). Fixture: tests/fixtures/smollm2/greedy.json,
//! copied from ../shared/reference/smollm2/ (llama.cpp 3aa0ce9). Skips when the model file is
//! not available locally; the engine's fidelity test fetches it through the store.

use microllm_kernels::Kernels;
use microllm_model::{Logits, Model, ModelOptions, StateOptions};

fn model_file() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var("MICROLLM_TEST_SMOLLM2").ok().map(Into::into),
        std::env::var("HOME").ok().map(|h| {
            std::path::Path::new(&h).join(".cache/microllm-ref/SmolLM2-135M-Instruct.Q4_1.gguf")
        }),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

#[test]
fn teacher_forced_top5_within_half_a_logit() {
    let Some(path) = model_file() else {
        eprintln!("skipping: SmolLM2 not found locally (set MICROLLM_TEST_SMOLLM2)");
        return;
    };
    let mut model = Model::load(
        &path,
        ModelOptions {
            n_threads: 2,
            kernels: Kernels::from_env().unwrap(),
            pack: true,
        },
    )
    .unwrap();
    // llama.cpp's exact arithmetic (the default fast path is checked in microllm-engine's
    // fidelity tests).
    model.set_exact(true);
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/smollm2/greedy.json"),
    )
    .unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut state = model
        .new_state(StateOptions {
            n_ctx: 512,
            n_batch: 512,
            ..Default::default()
        })
        .unwrap();
    let mut worst = 0.0f32;
    for c in cases.as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(c["prompt_ids"].clone()).unwrap();
        let gen: Vec<u32> = serde_json::from_value(c["generated_ids"].clone()).unwrap();
        let top5: Vec<Vec<(u32, f32)>> =
            serde_json::from_value(c["top5_per_step"].clone()).unwrap();
        state.reset();
        model.forward(&mut state, &ids, Logits::Last).unwrap();
        for (step, t5) in top5.iter().enumerate() {
            for &(tok, want) in t5 {
                let got = state.logits()[tok as usize];
                worst = worst.max((got - want).abs());
                assert!(
                    (got - want).abs() <= 0.5,
                    "{}: step {step} token {tok}: {got} vs {want}",
                    c["prompt"]
                );
            }
            if step + 1 < top5.len() {
                model
                    .forward(&mut state, &gen[step..step + 1], Logits::Last)
                    .unwrap();
            }
        }
    }
    eprintln!("worst |logit - llama.cpp| over all top-5 entries: {worst:.4}");
}
