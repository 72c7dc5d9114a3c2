//! The one decode loop, shared by the generator (sampling) and evaluation (greedy):
//! left-pad a batch of prompts, prefill them through the KV cache, then extend every
//! unfinished row one token per forward pass.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::sampler;
use crate::data::{Completion, FinishReason};
use crate::model::llama::{KvCache, Llama, Result};

/// How to pick tokens and what to record about them.
#[derive(Debug, Clone)]
pub struct DecodeSettings {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Top-k log-probs (at temperature 1) to keep per generated token; 0 keeps none.
    pub logprobs: usize,
    pub eos_ids: Vec<u32>,
}

/// Logit count of a step (rows × vocabulary) from which rows are sampled in parallel.
const PARALLEL_SAMPLING: usize = 1 << 17;

/// Completes each prompt; `rngs[i]` drives row i, so a row's tokens do not depend on
/// which other prompts share its batch.
pub fn decode(model: &Llama, prompts: &[Vec<u32>], rngs: &mut [StdRng], s: &DecodeSettings) -> Result<Vec<Completion>> {
    // On a worker of rayon's pool: the kernels' parallel loops (hundreds per token) then split
    // by work stealing instead of each waking the pool from outside and sleeping until it ends.
    rayon::scope(|_| decode_on_pool(model, prompts, rngs, s))
}

fn decode_on_pool(
    model: &Llama,
    prompts: &[Vec<u32>],
    rngs: &mut [StdRng],
    s: &DecodeSettings,
) -> Result<Vec<Completion>> {
    let b = prompts.len();
    let mut out: Vec<Completion> = (0..b).map(|_| Completion::empty()).collect();
    if b == 0 || s.max_new_tokens == 0 {
        return Ok(out);
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
    let mut padded = Vec::with_capacity(b * width);
    for (p, &pad) in prompts.iter().zip(&pads) {
        padded.extend(std::iter::repeat_n(0u32, pad));
        padded.extend(p);
    }
    let dev = model.device().clone();
    let mut cache = KvCache::new(model.config(), pads);
    let mut last = model.forward_last(&Tensor::from_vec(padded, (b, width), &dev)?, Some(&mut cache))?;
    let mut done = vec![false; b];

    for step in 0..s.max_new_tokens {
        let rows = last.to_vec2::<f32>()?;
        let pick = |(((row, rng), c), &finished): (((&Vec<f32>, &mut StdRng), &mut Completion), &bool)| {
            if finished {
                return None;
            }
            let lp = sampler::log_softmax(row);
            let tok = sampler::sample(&lp, s.temperature, s.top_k, s.top_p, rng);
            if s.logprobs > 0 {
                let (ids, lps) = sampler::top_k(&lp, s.logprobs).into_iter().unzip();
                c.topk_ids.push(ids);
                c.topk_logprobs.push(lps);
            }
            Some((tok, lp[tok as usize]))
        };
        // Rows are independent (each has its own RNG): sample them in parallel when there is
        // enough work to pay for waking the other threads.
        let picks: Vec<Option<(u32, f32)>> = if b * rows[0].len() < PARALLEL_SAMPLING {
            rows.iter().zip(rngs.iter_mut()).zip(out.iter_mut()).zip(&done).map(pick).collect()
        } else {
            rows.par_iter().zip(rngs.par_iter_mut()).zip(out.par_iter_mut()).zip(&done).map(pick).collect()
        };
        let mut next = vec![0u32; b];
        for (i, pick) in picks.into_iter().enumerate() {
            let Some((tok, lp)) = pick else { continue };
            let c = &mut out[i];
            c.ids.push(tok);
            c.token_logprobs.push(lp);
            if s.eos_ids.contains(&tok) {
                c.finish = FinishReason::Stop;
                done[i] = true;
            }
            next[i] = tok;
        }
        if done.iter().all(|&d| d) || step + 1 == s.max_new_tokens {
            break;
        }
        last = model.forward_last(&Tensor::from_vec(next, (b, 1), &dev)?, Some(&mut cache))?;
    }
    Ok(out)
}
