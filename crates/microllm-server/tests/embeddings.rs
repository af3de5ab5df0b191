//! Pooled embeddings on the real SmolLM2 (env MICROLLM_TEST_SMOLLM2 = path to its GGUF;
//! skipped with a note when unset): identical texts give the same vector, and a paraphrase
//! lies closer than an unrelated text.

use std::path::PathBuf;

use microllm_engine::{LoadedModel, ModelOptions};
use microllm_server::{Embedder, HiddenStateMean};

fn smollm2() -> Option<LoadedModel> {
    let Some(path) = std::env::var_os("MICROLLM_TEST_SMOLLM2").map(PathBuf::from) else {
        eprintln!("note: MICROLLM_TEST_SMOLLM2 is not set; skipping the SmolLM2 embedding test");
        return None;
    };
    let opts = ModelOptions {
        n_threads: 2,
        ..ModelOptions::default()
    };
    Some(LoadedModel::load(&path, opts).expect("MICROLLM_TEST_SMOLLM2 loads"))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| -> f64 {
        x.iter()
            .zip(y)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum()
    };
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

#[test]
fn paraphrases_are_closer_than_unrelated_texts() {
    let Some(lm) = smollm2() else { return };
    // A small batch so that the longer texts take several forward calls.
    let mut e = HiddenStateMean::new(&lm, 512, 8).unwrap();
    let mut embed = |t: &str| e.embed(&lm, &lm.tokenize(t).unwrap()).unwrap();

    let a = embed("The cat is sleeping on the warm windowsill in the afternoon sun.");
    let a2 = embed("The cat is sleeping on the warm windowsill in the afternoon sun.");
    assert_eq!(a, a2, "the same text, the same vector");
    assert!((cosine(&a, &a2) - 1.0).abs() < 1e-6);
    let norm = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");

    let cases = [
        (
            "The cat is sleeping on the warm windowsill in the afternoon sun.",
            "In the afternoon sunshine, a cat naps on the warm window ledge.",
            "The central bank raised interest rates by half a percentage point.",
        ),
        (
            "How do I reset my password for the online banking app?",
            "What are the steps to change my forgotten online banking password?",
            "Volcanic eruptions can cool the global climate for several years.",
        ),
        (
            "Add the flour and sugar, then stir until the batter is smooth.",
            "Mix in the sugar and flour and keep stirring until the batter has no lumps.",
            "The train to Berlin leaves from platform nine at half past six.",
        ),
    ];
    for (text, paraphrase, unrelated) in cases {
        let (t, p, u) = (embed(text), embed(paraphrase), embed(unrelated));
        let (cp, cu) = (cosine(&t, &p), cosine(&t, &u));
        println!("{cp:.4} (paraphrase) vs {cu:.4} (unrelated): {text}");
        assert!(
            cp > cu,
            "paraphrase {cp:.4} not closer than unrelated {cu:.4} for {text:?}"
        );
    }
}
