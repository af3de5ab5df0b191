//! Behavioural tests of the sampler chain.

use microllm_sample::{argmax, Sampler, SamplerConfig};

/// Deterministic pseudo-random logits (a tiny LCG) so tests need no RNG crate.
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn plain(temp: f32, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature: temp,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed,
        ..SamplerConfig::default()
    }
}

#[test]
fn greedy_is_argmax() {
    let mut s = Sampler::new(SamplerConfig::greedy(), 1000).unwrap();
    for seed in 0..20 {
        let l = logits(1000, seed);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }
    // Negative temperature is greedy too.
    let mut s = Sampler::new(plain(-1.0, 0), 1000).unwrap();
    let l = logits(1000, 3);
    assert_eq!(s.sample(&l, &[1, 2, 3]), argmax(&l));
}

fn run(cfg: SamplerConfig, steps: usize) -> Vec<u32> {
    let mut s = Sampler::new(cfg, 500).unwrap();
    let mut hist = Vec::new();
    for i in 0..steps {
        let l = logits(500, i as u64);
        let t = s.sample(&l, &hist);
        hist.push(t);
    }
    hist
}

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let cfg = |seed| SamplerConfig {
        temperature: 1.5,
        seed,
        repeat_penalty: 1.1,
        ..SamplerConfig::default()
    };
    let a = run(cfg(1), 64);
    let b = run(cfg(1), 64);
    let c = run(cfg(2), 64);
    assert_eq!(a, b);
    assert_ne!(a, c);

    // reset() restarts the stream.
    let mut s = Sampler::new(plain(1.0, 5), 500).unwrap();
    let l = logits(500, 9);
    let first: Vec<u32> = (0..32).map(|_| s.sample(&l, &[])).collect();
    s.reset(5);
    let again: Vec<u32> = (0..32).map(|_| s.sample(&l, &[])).collect();
    assert_eq!(first, again);
    assert_eq!(s.config().seed, 5);
    // And sampling at temperature 1 over 500 tokens is not stuck on one id.
    let distinct = first.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct > 3, "{first:?}");
}

#[test]
fn top_k_1_is_greedy() {
    for seed in 0..20 {
        let l = logits(300, seed);
        let mut s = Sampler::new(
            SamplerConfig {
                top_k: 1,
                ..plain(5.0, seed)
            },
            300,
        )
        .unwrap();
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    for seed in 0..20 {
        let l = logits(300, seed);
        let mut s = Sampler::new(
            SamplerConfig {
                top_p: 1e-6,
                ..plain(5.0, seed)
            },
            300,
        )
        .unwrap();
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }
}

#[test]
fn top_k_limits_the_choices() {
    let l = logits(300, 77);
    let mut order: Vec<u32> = (0..300).collect();
    order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
    let top5: Vec<u32> = order[..5].to_vec();
    let mut s = Sampler::new(
        SamplerConfig {
            top_k: 5,
            ..plain(100.0, 1)
        },
        300,
    )
    .unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2000 {
        let t = s.sample(&l, &[]);
        assert!(top5.contains(&t), "{t} not in top-5");
        seen.insert(t);
    }
    assert_eq!(seen.len(), 5, "a hot temperature should reach all 5");
}

#[test]
fn min_p_filters_correctly() {
    // probs ∝ exp(logits): ratios to the max are 1, e^-1 (0.37), e^-2 (0.135), e^-4 (0.018).
    let l = [0.0f32, -1.0, -2.0, -4.0];
    let picks = |min_p: f32| {
        let mut s = Sampler::new(
            SamplerConfig {
                min_p,
                ..plain(1.0, 11)
            },
            4,
        )
        .unwrap();
        let mut seen = [0u32; 4];
        for _ in 0..20_000 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        seen
    };
    let s0 = picks(0.0);
    assert!(s0.iter().all(|&c| c > 0), "{s0:?}");
    let s1 = picks(0.1); // keeps ratios >= 0.1: ids 0, 1, 2
    assert!(s1[0] > 0 && s1[1] > 0 && s1[2] > 0 && s1[3] == 0, "{s1:?}");
    let s2 = picks(0.2); // keeps ids 0, 1
    assert!(s2[0] > 0 && s2[1] > 0 && s2[2] == 0 && s2[3] == 0, "{s2:?}");
    let s3 = picks(0.9); // only the max
    assert_eq!(s3, [20_000, 0, 0, 0]);
}

#[test]
fn top_p_keeps_the_nucleus() {
    // softmax of [ln 0.5, ln 0.3, ln 0.15, ln 0.05] = [0.5, 0.3, 0.15, 0.05]
    let l = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
    let mut s = Sampler::new(
        SamplerConfig {
            top_p: 0.75, // 0.5 + 0.3 = 0.8 >= 0.75: ids 0, 1
            ..plain(1.0, 3)
        },
        4,
    )
    .unwrap();
    let mut seen = [0u32; 4];
    for _ in 0..20_000 {
        seen[s.sample(&l, &[]) as usize] += 1;
    }
    assert!(seen[0] > 0 && seen[1] > 0 && seen[2] == 0 && seen[3] == 0);
    // Renormalised: 0.5/0.8 = 0.625.
    let f0 = seen[0] as f64 / 20_000.0;
    assert!((f0 - 0.625).abs() < 0.02, "{f0}");
}

#[test]
fn penalties_change_the_pick() {
    // id 0 leads by a little; it was just generated twice.
    let l = [2.0f32, 1.8, 0.5];
    let hist = [0u32, 0];
    let greedy = |cfg: SamplerConfig| Sampler::new(cfg, 3).unwrap().sample(&l, &hist);
    assert_eq!(greedy(SamplerConfig::greedy()), 0);
    assert_eq!(
        greedy(SamplerConfig {
            repeat_penalty: 1.3, // 2.0 / 1.3 = 1.54 < 1.8
            ..SamplerConfig::greedy()
        }),
        1
    );
    assert_eq!(
        greedy(SamplerConfig {
            presence_penalty: 0.3,
            ..SamplerConfig::greedy()
        }),
        1
    );
    assert_eq!(
        greedy(SamplerConfig {
            frequency_penalty: 0.15, // 2.0 - 2*0.15 = 1.7 < 1.8
            ..SamplerConfig::greedy()
        }),
        1
    );
    // Penalty too small to flip it.
    assert_eq!(
        greedy(SamplerConfig {
            frequency_penalty: 0.05,
            ..SamplerConfig::greedy()
        }),
        0
    );
    // The window matters: with repeat_last_n = 1 only the last id counts.
    let l2 = [2.0f32, 1.9, 0.5];
    let mut s = Sampler::new(
        SamplerConfig {
            presence_penalty: 1.0,
            repeat_last_n: 1,
            ..SamplerConfig::greedy()
        },
        3,
    )
    .unwrap();
    assert_eq!(s.sample(&l2, &[0, 2]), 0); // id 0 is outside the window
    assert_eq!(s.sample(&l2, &[2, 0]), 1);
    // A negative logit is multiplied by the repeat penalty (pushed further down).
    let l3 = [-1.0f32, -1.2, -5.0];
    let mut s = Sampler::new(
        SamplerConfig {
            repeat_penalty: 1.5,
            ..SamplerConfig::greedy()
        },
        3,
    )
    .unwrap();
    assert_eq!(s.sample(&l3, &[0]), 1);
}

#[test]
fn distribution_matches_softmax() {
    let l = [1.0f32, 0.0, -0.5];
    let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
    let want: Vec<f64> = l.iter().map(|&x| (x as f64).exp() / z).collect();
    let mut s = Sampler::new(plain(1.0, 1234), 3).unwrap();
    let mut seen = [0u32; 3];
    let n = 20_000;
    for _ in 0..n {
        seen[s.sample(&l, &[]) as usize] += 1;
    }
    for i in 0..3 {
        let f = seen[i] as f64 / n as f64;
        assert!((f - want[i]).abs() < 0.02, "id {i}: {f} vs {}", want[i]);
    }
    // Temperature 0.5 sharpens: softmax(2 * logits).
    let z2: f64 = l.iter().map(|&x| (2.0 * x as f64).exp()).sum();
    let mut s = Sampler::new(plain(0.5, 99), 3).unwrap();
    let mut seen = [0u32; 3];
    for _ in 0..n {
        seen[s.sample(&l, &[]) as usize] += 1;
    }
    let f0 = seen[0] as f64 / n as f64;
    assert!((f0 - (2.0f64).exp() / z2).abs() < 0.02, "{f0}");
}

#[test]
fn nan_and_inf_logits_are_handled() {
    let l = [f32::NAN, 1.0, f32::NAN, 0.5];
    let mut s = Sampler::new(SamplerConfig::default(), 4).unwrap();
    for _ in 0..200 {
        let t = s.sample(&l, &[]);
        assert!(t == 1 || t == 3);
    }
    assert_eq!(s.sample(&[f32::NAN; 4], &[]), 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
    assert_eq!(s.sample(&[0.0, f32::INFINITY, 3.0, 0.0], &[]), 1);
    assert_eq!(s.sample(&[], &[]), 0);
    // Out-of-vocabulary history ids are ignored, not a panic.
    let mut p = Sampler::new(
        SamplerConfig {
            repeat_penalty: 1.2,
            ..SamplerConfig::default()
        },
        4,
    )
    .unwrap();
    let t = p.sample(&[0.0, 1.0, 2.0, 3.0], &[u32::MAX, 7, 3]);
    assert!(t < 4);
    // Longer logits than n_vocab still work (buffers grow).
    let t = p.sample(&logits(64, 1), &[60, 61]);
    assert!(t < 64);
}

#[test]
fn distribution_matches_softmax_over_many_blocks() {
    // 1000 ids (several blocks of the unfiltered path): ids 0, 300, 511, 512 and 999 carry
    // most of the mass, the rest a little each; temperature 0.7.
    let mut l = vec![-6.0f32; 1000];
    for (i, v) in [(0, 1.0f32), (300, 0.5), (511, 0.0), (512, -0.3), (999, 0.8)] {
        l[i] = v;
    }
    let z: f64 = l.iter().map(|&x| (x as f64 / 0.7).exp()).sum();
    let mut s = Sampler::new(plain(0.7, 77), l.len()).unwrap();
    let mut seen = vec![0u32; l.len()];
    let n = 40_000;
    for _ in 0..n {
        seen[s.sample(&l, &[]) as usize] += 1;
    }
    for i in [0usize, 300, 511, 512, 999] {
        let want = (l[i] as f64 / 0.7).exp() / z;
        let f = seen[i] as f64 / n as f64;
        assert!((f - want).abs() < 0.015, "id {i}: {f} vs {want}");
    }
    let rest: u32 = (0..l.len())
        .filter(|i| ![0, 300, 511, 512, 999].contains(i))
        .map(|i| seen[i])
        .sum();
    let want_rest = 995.0 * (-6.0f64 / 0.7).exp() / z;
    let f = rest as f64 / n as f64;
    assert!(
        (f - want_rest).abs() < 0.015,
        "the rest: {f} vs {want_rest}"
    );
}
