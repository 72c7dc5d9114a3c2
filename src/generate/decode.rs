//! The decode loops: [`decode`] left-pads a batch of prompts, prefills them through one KV cache
//! and extends every unfinished row one token per forward pass until the last ends (evaluation,
//! benchmarks, on-policy sampling); [`decode_continuous`] keeps a fixed number of rows decoding
//! and refills a finished one from the queue at once, each row computed apart from the others
//! (the generator). Both pick tokens with [`pick`].

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
        let targets = rngs.iter_mut().zip(out.iter_mut()).zip(&done).map(|((r, c), d)| (r, c, !d)).collect();
        let next = pick_rows(&rows, targets, s);
        for (d, c) in done.iter_mut().zip(&out) {
            *d |= c.finish == FinishReason::Stop;
        }
        if done.iter().all(|&d| d) || step + 1 == s.max_new_tokens {
            break;
        }
        last = model.forward_last(&Tensor::from_vec(next, (b, 1), &dev)?, Some(&mut cache))?;
    }
    Ok(out)
}

/// Samples the next token of row `c` from its logits with its own `rng`, records it (and its
/// top-k log-probs when asked for), and marks the row stopped on an end-of-sequence id.
pub fn pick(logits: &[f32], rng: &mut StdRng, c: &mut Completion, s: &DecodeSettings) -> u32 {
    let lp = sampler::log_softmax(logits);
    let tok = sampler::sample(&lp, s.temperature, s.top_k, s.top_p, rng);
    if s.logprobs > 0 {
        let (ids, lps) = sampler::top_k(&lp, s.logprobs).into_iter().unzip();
        c.topk_ids.push(ids);
        c.topk_logprobs.push(lps);
    }
    c.ids.push(tok);
    c.token_logprobs.push(lp[tok as usize]);
    if s.eos_ids.contains(&tok) {
        c.finish = FinishReason::Stop;
    }
    tok
}

/// [`pick`] for each row whose target is live (0 for the others). Rows are independent (each
/// has its own RNG): sampled in parallel when there is enough work to pay for waking the threads.
fn pick_rows(rows: &[Vec<f32>], targets: Vec<(&mut StdRng, &mut Completion, bool)>, s: &DecodeSettings) -> Vec<u32> {
    let one = |(row, (rng, c, live)): (&Vec<f32>, (&mut StdRng, &mut Completion, bool))| {
        if live {
            pick(row, rng, c, s)
        } else {
            0
        }
    };
    if rows.len() * rows.first().map_or(0, Vec::len) < PARALLEL_SAMPLING {
        rows.iter().zip(targets).map(one).collect()
    } else {
        rows.par_iter().zip(targets).map(one).collect()
    }
}

/// A row of [`decode_continuous`]: which prompt, its RNG, its own cache and what it has so far.
struct Row {
    index: usize,
    rng: StdRng,
    cache: KvCache,
    out: Completion,
    next: u32,
}

impl Row {
    fn ended(&self, s: &DecodeSettings) -> bool {
        self.out.finish == FinishReason::Stop || self.out.ids.len() >= s.max_new_tokens
    }
}

/// Completes `prompts[i]` with `rngs[i]` for every i, at most `slots` rows decoding at once:
/// when a row ends, the next prompt takes its place at once (continuous batching), so no row
/// waits for the longest of its batch. Each row is prefilled alone and stepped with
/// [`Llama::step_rows`]: its tokens are the same bits alone or beside any other rows.
/// `finished(i, completion)` is called as each row ends, in the order they end.
pub fn decode_continuous(
    model: &Llama,
    prompts: &[Vec<u32>],
    rngs: Vec<StdRng>,
    slots: usize,
    s: &DecodeSettings,
    finished: impl FnMut(usize, Completion) -> anyhow::Result<()> + Send,
) -> anyhow::Result<()> {
    // On a pool worker, as `decode` runs.
    rayon::scope(|_| continuous_on_pool(model, prompts, rngs, slots.max(1), s, finished))
}

fn continuous_on_pool(
    model: &Llama,
    prompts: &[Vec<u32>],
    rngs: Vec<StdRng>,
    slots: usize,
    s: &DecodeSettings,
    mut finished: impl FnMut(usize, Completion) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if s.max_new_tokens == 0 {
        for i in 0..prompts.len() {
            finished(i, Completion::empty())?;
        }
        return Ok(());
    }
    let dev = model.device().clone();
    let mut queue = prompts.iter().zip(rngs).enumerate();
    let mut rows: Vec<Row> = Vec::with_capacity(slots);
    loop {
        while rows.len() < slots {
            let Some((index, (prompt, rng))) = queue.next() else { break };
            // An empty prompt is one padding token that attends only to itself (as in `decode`).
            let (ids, pad) = if prompt.is_empty() { (vec![0], 1) } else { (prompt.clone(), 0) };
            let mut cache = KvCache::new(model.config(), vec![pad]);
            let n = ids.len();
            let logits = model.forward_last(&Tensor::from_vec(ids, (1, n), &dev)?, Some(&mut cache))?;
            let mut row = Row { index, rng, cache, out: Completion::empty(), next: 0 };
            row.next = pick(&logits.squeeze(0)?.to_vec1::<f32>()?, &mut row.rng, &mut row.out, s);
            if row.ended(s) {
                finished(row.index, row.out)?;
            } else {
                rows.push(row);
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let tokens: Vec<u32> = rows.iter().map(|r| r.next).collect();
        let mut caches: Vec<&mut KvCache> = rows.iter_mut().map(|r| &mut r.cache).collect();
        let logits = model.step_rows(&tokens, &mut caches)?.to_vec2::<f32>()?;
        let next = pick_rows(&logits, rows.iter_mut().map(|r| (&mut r.rng, &mut r.out, true)).collect(), s);
        for (row, t) in rows.iter_mut().zip(next) {
            row.next = t;
        }
        let mut i = 0;
        while i < rows.len() {
            if rows[i].ended(s) {
                let row = rows.remove(i);
                finished(row.index, row.out)?;
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::row_rng;
    use crate::model::llama::{init_weights, tensors, Scheme, Weights};
    use crate::model::LlamaConfig;
    use candle_core::{DType, Device};

    /// A model whose rows are whole blocks of 32 (so q8 quantizes every matrix) and sharp enough
    /// that sampled lengths vary.
    fn models() -> Vec<(&'static str, Llama)> {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 128
        }))
        .unwrap();
        let (vm, _) = Llama::trainable(&cfg, &Device::Cpu).unwrap();
        init_weights(&vm, 3).unwrap();
        for var in vm.all_vars() {
            var.set(&(var.as_tensor() * 3.0).unwrap()).unwrap();
        }
        let w = Weights::Tensors(tensors(&vm));
        vec![
            ("f32", Llama::from_weights(&cfg, &w, &Device::Cpu, DType::F32).unwrap()),
            ("q8", Llama::quantized(&cfg, &w, Scheme::Q8).unwrap()),
        ]
    }

    fn run(model: &Llama, prompts: &[Vec<u32>], slots: usize, s: &DecodeSettings) -> Vec<Completion> {
        let rngs = (0..prompts.len()).map(|i| row_rng(7, "p", i as u32)).collect();
        let mut out: Vec<Option<Completion>> = vec![None; prompts.len()];
        decode_continuous(model, prompts, rngs, slots, s, |i, c| {
            assert!(out[i].replace(c).is_none(), "row {i} finished twice");
            Ok(())
        })
        .unwrap();
        out.into_iter().map(|c| c.expect("every row finishes")).collect()
    }

    /// Ids, logprob bits, top-k ids, top-k logprob bits, and why the row ended.
    type Bits = (Vec<u32>, Vec<u32>, Vec<Vec<u32>>, Vec<Vec<u32>>, FinishReason);

    /// Everything a row writes, as bits.
    fn bits(c: &Completion) -> Bits {
        let f = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        (
            c.ids.clone(),
            f(&c.token_logprobs),
            c.topk_ids.clone(),
            c.topk_logprobs.iter().map(|v| f(v)).collect(),
            c.finish,
        )
    }

    #[test]
    fn a_row_is_the_same_bytes_alone_and_in_any_refilled_batch() {
        // Prompts of 1 to 12 tokens, one empty; EOS ids 5 and 6 end rows at different steps.
        let mut prompts: Vec<Vec<u32>> =
            (0..13u32).map(|i| (0..(i * 7) % 13).map(|j| (i * 11 + j * 5) % 96).collect()).collect();
        prompts[4].clear();
        let s = DecodeSettings {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
            max_new_tokens: 24,
            logprobs: 3,
            eos_ids: vec![5, 6],
        };
        for (name, model) in models() {
            let alone = run(&model, &prompts, 1, &s);
            let lengths: Vec<usize> = alone.iter().map(|c| c.ids.len()).collect();
            assert!(
                lengths.iter().min() < lengths.iter().max(),
                "{name}: rows should end at different steps: {lengths:?}"
            );
            assert!(alone.iter().any(|c| c.finish == FinishReason::Stop), "{name}: some row should stop at EOS");
            // 3 and 5 slots refill as rows end; 10 is more rows than the few-row kernel takes.
            for slots in [3, 5, 10] {
                let batched = run(&model, &prompts, slots, &s);
                for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
                    assert_eq!(bits(a), bits(b), "{name}: prompt {i} alone vs among {slots} slots");
                }
            }
            // Any row's neighbours: the same prompt inside a different queue.
            let mut shuffled: Vec<Vec<u32>> = prompts.iter().rev().cloned().collect();
            shuffled.truncate(6);
            let rngs_order: Vec<usize> = (0..6).map(|k| prompts.len() - 1 - k).collect();
            let rngs = rngs_order.iter().map(|&i| row_rng(7, "p", i as u32)).collect();
            let mut got = vec![None; 6];
            decode_continuous(&model, &shuffled, rngs, 4, &s, |i, c| {
                got[i] = Some(c);
                Ok(())
            })
            .unwrap();
            for (k, c) in got.into_iter().enumerate() {
                assert_eq!(
                    bits(&c.unwrap()),
                    bits(&alone[rngs_order[k]]),
                    "{name}: prompt {} in another queue",
                    rngs_order[k]
                );
            }
        }
    }

    #[test]
    fn continuous_decoding_samples_what_the_fixed_batch_loop_samples_alone() {
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![9, 8], vec![40, 41, 42, 43, 44]];
        let s =
            DecodeSettings { temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: 10, logprobs: 0, eos_ids: vec![] };
        for (name, model) in models() {
            let cont = run(&model, &prompts, 2, &s);
            for (i, p) in prompts.iter().enumerate() {
                let fixed = decode(&model, std::slice::from_ref(p), &mut [row_rng(7, "p", i as u32)], &s).unwrap();
                assert_eq!(fixed[0].ids, cont[i].ids, "{name}: prompt {i}");
            }
        }
    }
}
