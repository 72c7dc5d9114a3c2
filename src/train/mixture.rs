//! Several teachers as one target: the weighted mixture of their stored top-k over the same
//! completions (`kdllm score` with each teacher over one sample set gives such copies).
//!
//! At each position the mixture's buckets are the union of the teachers' top-k ids, with
//! `p(u) = Σ_a w_a p_a(u)` (weights normalised to sum 1; a teacher's unknown mass at an id
//! outside its top-k stays in its tail), plus one tail holding the rest, `Σ_a w_a tail_a`. The
//! loss is one divergence to this mixture, not an average of one divergence per teacher.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::batch::TeacherTopK;
use super::TrainError;
use crate::data::{self, SampleSet};

/// The mixture's rows for every sample of `set` (in its order), from the sample sets `teachers`
/// holding the same completions, with their weights.
pub fn targets(data: &Path, set: &SampleSet, teachers: &[(PathBuf, f64)]) -> anyhow::Result<Vec<TeacherTopK>> {
    check_weights(&teachers.iter().map(|t| t.1).collect::<Vec<_>>()).map_err(TrainError::Config)?;
    let total: f64 = teachers.iter().map(|t| t.1).sum();
    let config = |m: String| anyhow::Error::from(TrainError::Config(m));
    let mut copies = Vec::with_capacity(teachers.len());
    for (i, (path, weight)) in teachers.iter().enumerate() {
        let other = data::read_samples(path)?;
        let name = format!("`teachers[{i}]` ({})", path.display());
        if other.meta.tokenizer_hash != set.meta.tokenizer_hash {
            return Err(config(format!(
                "{name} was written with a different tokenizer than {}; the teachers of a mixture must share one \
                 vocabulary",
                data.display()
            )));
        }
        if other.meta.logprobs_k == 0 {
            return Err(config(format!(
                "{name} holds no top-k (written with --logprobs 0); score it with --logprobs K"
            )));
        }
        if other.samples.len() != set.samples.len() {
            return Err(config(format!(
                "{name} holds {} samples and {} holds {}; a mixture needs every teacher's top-k over the same \
                 completions: run `kdllm score --teacher T --data {}` with each teacher",
                other.samples.len(),
                data.display(),
                set.samples.len(),
                data.display()
            )));
        }
        let by_key: HashMap<(&str, u32), &data::Sample> =
            other.samples.iter().map(|s| ((s.prompt_id.as_str(), s.sample_index), s)).collect();
        let mut rows = Vec::with_capacity(set.samples.len());
        for s in &set.samples {
            let found = by_key.get(&(s.prompt_id.as_str(), s.sample_index));
            match found {
                Some(o) if o.prompt_token_ids == s.prompt_token_ids && o.completion_token_ids == s.completion_token_ids => {
                    rows.push((o.topk_token_ids.clone(), o.topk_logprobs.clone()))
                }
                _ => {
                    return Err(config(format!(
                        "{name} does not hold the completion of prompt `{}` (sample {}) that {} holds; a mixture \
                         needs every teacher's top-k over the same completions: run `kdllm score --teacher T --data {}` \
                         with each teacher",
                        s.prompt_id,
                        s.sample_index,
                        data.display(),
                        data.display()
                    )))
                }
            }
        }
        copies.push((rows, weight / total));
    }
    let mut out = Vec::with_capacity(set.samples.len());
    for (r, s) in set.samples.iter().enumerate() {
        let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
        for pos in 0..s.completion_token_ids.len() {
            let teachers: Vec<(&[u32], &[f32], f64)> =
                copies.iter().map(|(rows, w)| (rows[r].0[pos].as_slice(), rows[r].1[pos].as_slice(), *w)).collect();
            let (i, l) = mix(&teachers);
            ids.push(i);
            logprobs.push(l);
        }
        out.push(TeacherTopK { ids, logprobs });
    }
    Ok(out)
}

/// Weights must be ≥ 0 and sum to more than 0; the message names the bound and the value.
pub fn check_weights(weights: &[f64]) -> Result<(), String> {
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !(**w >= 0.0 && w.is_finite())) {
        return Err(format!("`teachers[{i}].weight` must be ≥ 0, got {w}"));
    }
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return Err(format!("the `teachers` weights must sum to more than 0, got {sum}"));
    }
    Ok(())
}

/// One position's mixture of teachers `(ids, log-probs, weight)`, weights summing to 1: the
/// union of their ids, most likely first, with the log of the mixed mass.
pub fn mix(teachers: &[(&[u32], &[f32], f64)]) -> (Vec<u32>, Vec<f32>) {
    let mut mass: Vec<(u32, f64)> = Vec::new();
    for (ids, logprobs, w) in teachers {
        for (&id, &lp) in ids.iter().zip(*logprobs) {
            let p = w * (lp as f64).exp();
            match mass.iter_mut().find(|(i, _)| *i == id) {
                Some(slot) => slot.1 += p,
                None => mass.push((id, p)),
            }
        }
    }
    mass.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    mass.into_iter().map(|(id, p)| (id, p.ln() as f32)).unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixture_is_over_the_union_with_the_tails_combined() {
        // Teacher A: {3: .6, 1: .3}, tail .1; teacher B: {1: .5, 7: .2}, tail .3; weights .75 / .25.
        let a = ([3u32, 1], [0.6f32.ln(), 0.3f32.ln()]);
        let b = ([1u32, 7], [0.5f32.ln(), 0.2f32.ln()]);
        let (ids, lps) = mix(&[(&a.0, &a.1, 0.75), (&b.0, &b.1, 0.25)]);
        assert_eq!(ids, vec![3, 1, 7]);
        let p: Vec<f64> = lps.iter().map(|l| (*l as f64).exp()).collect();
        let want = [0.75 * 0.6, 0.75 * 0.3 + 0.25 * 0.5, 0.25 * 0.2];
        for (got, want) in p.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{p:?}");
        }
        // The tail left over is the weighted tails: .75 · .1 + .25 · .3.
        assert!((1.0 - p.iter().sum::<f64>() - (0.75 * 0.1 + 0.25 * 0.3)).abs() < 1e-6);
    }

    #[test]
    fn one_teacher_is_itself() {
        let (ids, lps) = mix(&[(&[4, 2], &[-0.1, -2.5], 1.0)]);
        assert_eq!(ids, vec![4, 2]);
        assert!((lps[0] + 0.1).abs() < 1e-6 && (lps[1] + 2.5).abs() < 1e-6);
    }

    #[test]
    fn weights_must_be_non_negative_and_not_all_zero() {
        assert!(check_weights(&[0.5, 0.5]).is_ok());
        assert!(check_weights(&[1.0, 0.0]).is_ok());
        assert!(check_weights(&[1.0, -0.5]).unwrap_err().contains("`teachers[1].weight` must be ≥ 0, got -0.5"));
        assert!(check_weights(&[0.0, 0.0]).unwrap_err().contains("sum to more than 0, got 0"));
    }
}
