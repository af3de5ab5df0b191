//! Log-probabilities for the server's `logprobs` / `top_logprobs`.

/// Computes log-softmax statistics of `logits` without allocating a full copy.
///
/// Returns `logsumexp(logits)` (so any id's logprob is `logits[id] - lse`) and fills `out`
/// with the `k` most likely `(id, logprob)` pairs, highest first, ties by lowest id.
/// NaN and +inf logits are skipped; with no finite logit the result is -inf and `out` is
/// empty. `out` is cleared first; reuse it across calls to avoid allocation.
pub fn log_softmax_top(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) -> f32 {
    out.clear();
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let mut sum = 0.0f64;
    for &x in logits {
        if x.is_finite() {
            sum += ((x - max) as f64).exp();
        }
    }
    let lse = max + sum.ln() as f32;

    if k > 0 {
        // Keep `out` sorted descending by logit; insertion is cheap for the small k used
        // by top_logprobs (<= 20), and ids arrive ascending so ties keep the lowest id first.
        for (i, &x) in logits.iter().enumerate().take(u32::MAX as usize) {
            if !x.is_finite() {
                continue;
            }
            if out.len() == k && x <= out[k - 1].1 {
                continue;
            }
            let pos = out.partition_point(|&(_, v)| v >= x);
            if out.len() == k {
                out.pop();
            }
            out.insert(pos, (i as u32, x));
        }
        for e in out.iter_mut() {
            e.1 -= lse;
        }
    }
    lse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5, f32::NAN, f32::NEG_INFINITY];
        let mut out = Vec::new();
        let lse = log_softmax_top(&logits, 3, &mut out);
        let naive: f64 = logits
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| (x as f64).exp())
            .sum::<f64>()
            .ln();
        assert!((lse as f64 - naive).abs() < 1e-5);
        let ids: Vec<u32> = out.iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![1, 3, 0]);
        assert!((out[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert!(out[0].1 >= out[1].1 && out[1].1 >= out[2].1);
        // probabilities of all finite ids sum to 1
        let total: f64 = logits
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| ((x - lse) as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn edge_cases() {
        let mut out = vec![(9, 9.0)];
        assert_eq!(log_softmax_top(&[], 5, &mut out), f32::NEG_INFINITY);
        assert!(out.is_empty());
        assert_eq!(log_softmax_top(&[f32::NAN], 5, &mut out), f32::NEG_INFINITY);
        let lse = log_softmax_top(&[0.0, 0.0], 5, &mut out);
        assert!((lse - 2f32.ln()).abs() < 1e-6);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, 0);
        let _ = log_softmax_top(&[0.0, 1.0], 0, &mut out);
        assert!(out.is_empty());
    }
}
