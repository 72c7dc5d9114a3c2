//! llama.cpp's `llama-server`, through its native `POST /completion`: the prompt as token ids
//! (used as they are, no BOS added), `n_probs` top-k per position with their ids, computed from
//! the logits before any sampler (`post_sampling_probs: false`: the softmax of the full
//! vocabulary at temperature 1; llama.cpp normalises in f32, so its log-probs sit about 1e-4
//! above an f64 softmax's). Every sampler but those kdllm asks for is set neutral: the server's
//! defaults (top-k 40, top-p 0.95, min-p 0.05, a repetition window of 64, and whatever the GGUF's
//! `general.sampling.*` says) would otherwise change the distribution sampled from. An end token
//! is the last entry of `completion_probabilities`; no stop strings are sent (their tokens
//! would be left out of it).

use serde_json::{json, Value};

use super::client::Http;
use super::{f32_of, u32_of, EngineError, Problem, Reply, SampleParams, Stop, Token};

/// The sampler chain: top-k, temperature, then top-p over the tempered distribution (the order
/// of kdllm's own sampler and of transformers); nothing else (no min-p, penalties, DRY, XTC…).
const SAMPLERS: [&str; 3] = ["top_k", "temperature", "top_p"];

/// Settings the server would otherwise apply by default, set to "off".
fn neutral(body: &mut Value) {
    let off = json!({
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "repeat_last_n": 0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "mirostat": 0,
        "top_n_sigma": -1.0,
        "dynatemp_range": 0.0,
        "min_keep": 0,
        "ignore_eos": false,
        "samplers": SAMPLERS,
        "post_sampling_probs": false,
        "return_tokens": true,
        "cache_prompt": true,
        "stream": false,
    });
    if let (Some(b), Value::Object(o)) = (body.as_object_mut(), off) {
        b.extend(o);
    }
}

pub(super) fn sample_request(prompt: &[u32], p: &SampleParams) -> Value {
    let mut body = json!({
        "prompt": prompt,
        "n_predict": p.max_new_tokens,
        "temperature": p.temperature,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "seed": p.seed,
        // The sampled token's log-prob comes with the top-k, so at least one is asked for.
        "n_probs": p.logprobs.max(1),
        // Replaces any bias list the server was started with.
        "logit_bias": [],
    });
    neutral(&mut body);
    body
}

/// The distribution after `prefix`, with `token` forced as the one "sampled" (a logit bias
/// applied by the sampler, after the log-probs were taken from the logits), so the answer
/// carries its exact log-prob even when it is outside the top-k. With `cache_prompt` the server
/// evaluates only what the previous position's request did not.
pub(super) fn score_request(prefix: &[u32], token: u32, k: usize) -> Value {
    let mut body = json!({
        "prompt": prefix,
        "n_predict": 1,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "n_probs": k.max(1),
        "logit_bias": [[token, 1.0e6]],
    });
    neutral(&mut body);
    body
}

fn token(entry: &Value, i: usize) -> Result<Token, Problem> {
    let shape = |what: &str| Problem::Shape(format!("`completion_probabilities[{i}]` {what}"));
    let id = entry.get("id").and_then(u32_of).ok_or_else(|| {
        if entry.get("probs").is_some() {
            Problem::Shape("this llama-server reports no token ids (`completion_probabilities[].id`); use a build from 2025 or later".into())
        } else {
            shape("has no token `id`")
        }
    })?;
    let logprob = entry.get("logprob").and_then(f32_of).ok_or_else(|| shape("has no `logprob`"))?;
    let top = entry
        .get("top_logprobs")
        .and_then(Value::as_array)
        .ok_or_else(|| shape("has no `top_logprobs`"))?
        .iter()
        .map(|e| Some((e.get("id").and_then(u32_of)?, e.get("logprob").and_then(f32_of)?)))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| shape("has a `top_logprobs` entry without `id` or `logprob`"))?;
    Ok(Token { id, logprob, top })
}

fn probabilities(v: &Value) -> Result<&Vec<Value>, Problem> {
    match v.get("completion_probabilities") {
        Some(Value::Array(a)) => Ok(a),
        _ if v.get("content").is_some() => {
            Err(Problem::NoLogprobs("its /completion answer has no `completion_probabilities`".into()))
        }
        _ => Err(Problem::Shape("the /completion answer has neither `content` nor `completion_probabilities`".into())),
    }
}

pub(super) fn parse_sample(v: &Value) -> Result<Reply, Problem> {
    let probs = probabilities(v)?;
    let tokens: Vec<Token> = probs.iter().enumerate().map(|(i, e)| token(e, i)).collect::<Result<_, _>>()?;
    if let Some(ids) = v.get("tokens").and_then(Value::as_array) {
        let listed: Vec<Option<u32>> = ids.iter().map(u32_of).collect();
        let ours: Vec<Option<u32>> = tokens.iter().map(|t| Some(t.id)).collect();
        if listed.len() == ours.len() && listed != ours {
            return Err(Problem::Shape("`tokens` and `completion_probabilities` name different ids".into()));
        }
    }
    let stop = match v.get("stop_type").and_then(Value::as_str) {
        Some("eos") => Stop::Eos,
        Some(_) => Stop::Length,
        // Builds before `stop_type`: `stopped_eos`.
        None if v.get("stopped_eos").and_then(Value::as_bool) == Some(true) => Stop::Eos,
        None => Stop::Length,
    };
    // The model as the server names it in /v1/models: the `-m` path, or its `--alias`.
    let model = v.get("model").and_then(Value::as_str).map(str::to_string);
    Ok(Reply { tokens, stop, model })
}

pub(super) fn parse_score(v: &Value, expect: u32) -> Result<Token, Problem> {
    let probs = probabilities(v)?;
    let first = probs.first().ok_or_else(|| Problem::Shape("`completion_probabilities` is empty".into()))?;
    let t = token(first, 0)?;
    if t.id != expect {
        return Err(Problem::Shape(format!(
            "the forced token came back as {} instead of {expect} (does this build apply `logit_bias`?)",
            t.id
        )));
    }
    Ok(t)
}

pub(super) async fn tokenize(http: &Http, text: &str) -> Result<Vec<u32>, EngineError> {
    let v = http.post("/tokenize", &json!({"content": text, "add_special": false})).await?;
    let ids = v.get("tokens").and_then(Value::as_array).map(|a| a.iter().map(u32_of).collect::<Option<Vec<_>>>());
    ids.flatten().ok_or_else(|| EngineError::Shape {
        url: http.url().to_string(),
        engine: super::Engine::LlamaServer,
        message: "`/tokenize` returned no list of `tokens`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampling_request_turns_every_other_sampler_off() {
        let p = SampleParams { temperature: 0.7, top_p: 0.9, top_k: 0, max_new_tokens: 5, logprobs: 0, seed: 11 };
        let body = sample_request(&[1, 2, 3], &p);
        assert_eq!(body["prompt"], json!([1, 2, 3]));
        assert_eq!((body["n_probs"].clone(), body["seed"].clone()), (json!(1), json!(11)));
        assert_eq!(body["samplers"], json!(["top_k", "temperature", "top_p"]));
        assert_eq!((body["min_p"].as_f64(), body["repeat_penalty"].as_f64()), (Some(0.0), Some(1.0)));
        assert_eq!(body["post_sampling_probs"], json!(false));
    }
}
