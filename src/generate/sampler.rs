//! Turning one position's logits into a token: log-probabilities, the stored top-k, and
//! temperature / top-k / top-p sampling. Pure functions over one row of V floats.

use rand::Rng;

/// Log-softmax of one row at temperature 1.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    logits.iter().map(|x| x - lse).collect()
}

/// The `k` largest entries as (id, value), largest first; ties broken by the lower id.
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_value);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_value);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

/// The id of the largest entry (the lowest such id on ties).
pub fn argmax(values: &[f32]) -> u32 {
    // The best value kept in a register: re-reading values[best] made each step wait on a load.
    let (mut best, mut best_v) = (0, values.first().copied().unwrap_or(f32::NEG_INFINITY));
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            (best, best_v) = (i, v);
        }
    }
    best as u32
}

/// Samples a token from log-probs `logprobs`. Temperature 0 is greedy; `top_k` 0 and
/// `top_p` 1 are off. Among tokens that survive the filters, p ∝ exp(logprob / T).
pub fn sample(logprobs: &[f32], temperature: f64, top_k_n: usize, top_p: f64, rng: &mut impl Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logprobs);
    }
    let inv_t = 1.0 / temperature as f32;
    if (top_k_n == 0 || top_k_n >= logprobs.len()) && top_p >= 1.0 {
        // No filter: draw from the whole vocabulary in id order, without sorting it.
        let max = logprobs[argmax(logprobs) as usize] * inv_t;
        let total: f32 = logprobs.iter().map(|lp| (lp * inv_t - max).exp()).sum();
        let mut r = rng.random::<f32>() * total;
        let mut last = 0;
        for (id, lp) in logprobs.iter().enumerate() {
            let w = (lp * inv_t - max).exp();
            if r < w {
                return id as u32;
            }
            r -= w;
            if w > 0.0 {
                last = id;
            }
        }
        return last as u32;
    }
    let k = if top_k_n == 0 { logprobs.len() } else { top_k_n };
    let mut cands = top_k(logprobs, k);
    let max = cands[0].1 * inv_t;
    let mut weights: Vec<f32> = cands.iter().map(|(_, lp)| (lp * inv_t - max).exp()).collect();
    if top_p < 1.0 {
        let total: f32 = weights.iter().sum();
        let (mut acc, mut keep) = (0.0, weights.len());
        for (i, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= top_p as f32 {
                keep = i + 1;
                break;
            }
        }
        cands.truncate(keep);
        weights.truncate(keep);
    }
    let total: f32 = weights.iter().sum();
    let mut r = rng.random::<f32>() * total;
    for ((id, _), w) in cands.iter().zip(&weights) {
        if r < *w {
            return *id;
        }
        r -= w;
    }
    cands[cands.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn log_softmax_normalizes() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!((lp[2] - lp[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_k_is_sorted_and_exact() {
        assert_eq!(top_k(&[0.1, 0.5, -1.0, 0.5, 0.3], 3), vec![(1, 0.5), (3, 0.5), (4, 0.3)]);
        assert_eq!(top_k(&[0.1], 5).len(), 1);
    }

    #[test]
    fn filters_restrict_the_support() {
        let lp = log_softmax(&[3.0, 2.9, 0.0, -1.0]);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            assert!(sample(&lp, 1.0, 2, 1.0, &mut rng) < 2, "top_k=2 keeps ids 0 and 1");
            // p0 ≈ 0.50: top_p 0.4 keeps only the most likely token.
            assert_eq!(sample(&lp, 1.0, 0, 0.4, &mut rng), 0);
        }
        assert_eq!(sample(&lp, 0.0, 0, 1.0, &mut rng), 0, "temperature 0 is greedy");
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1, "ties go to the lower id");
    }

    #[test]
    fn sampling_frequencies_follow_the_distribution() {
        let lp = log_softmax(&[0.0, (3.0f32).ln()]);
        let mut rng = StdRng::seed_from_u64(7);
        let ones = (0..4000).filter(|_| sample(&lp, 1.0, 0, 1.0, &mut rng) == 1).count();
        let frac = ones as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
        // Temperature 2 flattens 1:3 to 1:√3 → p1 ≈ 0.634.
        let ones = (0..4000).filter(|_| sample(&lp, 2.0, 0, 1.0, &mut rng) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.634).abs() < 0.03);
        // The filtered path (top_k = 2 keeps both tokens) draws from the same distribution.
        let ones = (0..4000).filter(|_| sample(&lp, 1.0, 2, 1.0, &mut rng) == 1).count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03);
    }
}
