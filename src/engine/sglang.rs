//! SGLang's native `POST /generate`: prompts as `input_ids`, per-token `[logprob, id, text]`
//! triples for the output (`output_token_logprobs`, `output_top_logprobs`) and, from
//! `logprob_start_len`, for the input (`input_token_logprobs`, `input_top_logprobs`). Its
//! OpenAI route is not used: it gives top-k as text only.
//!
//! SGLang's output log-probs are taken after temperature (its input log-probs are not), so a
//! sample drawn at a temperature other than 0 or 1 is scored again as input to get the
//! distribution at temperature 1; the radix cache holds the sample's prefix, so that costs
//! little. Its `sampling_seed` is honoured only by a server started with
//! `--enable-deterministic-inference`.

use serde_json::{json, Value};

use super::client::Http;
use super::{f32_of, u32_of, EngineError, Problem, Reply, SampleParams, Stop, Token};

pub(super) fn sample_request(prompt: &[u32], p: &SampleParams) -> Value {
    json!({
        "input_ids": prompt,
        "sampling_params": {
            "max_new_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": if p.top_k == 0 { -1 } else { p.top_k as i64 },
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "sampling_seed": p.seed,
            "skip_special_tokens": false,
            "no_stop_trim": true,
        },
        "return_logprob": true,
        "top_logprobs_num": p.logprobs.max(1),
        "logprob_start_len": -1,
        "stream": false,
    })
}

/// Where the input log-probs of a request scoring from `from` start: SGLang leaves the entry at
/// `logprob_start_len` empty, so one position earlier.
pub(super) fn score_start(from: usize) -> usize {
    from.saturating_sub(1)
}

/// The input's log-probs from position `from` on, and no new token (a prefill-only request).
pub(super) fn score_request(ids: &[u32], k: usize, from: usize) -> Value {
    json!({
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
        "return_logprob": true,
        "top_logprobs_num": k.max(1),
        "logprob_start_len": score_start(from),
        "stream": false,
    })
}

/// `[logprob, id, text-or-null]`.
fn triple(v: &Value) -> Option<(u32, Option<f32>)> {
    let a = v.as_array()?;
    Some((u32_of(a.get(1)?)?, a.first().and_then(f32_of)))
}

fn tokens(meta: &Value, which: &str, skip: usize) -> Result<Vec<Token>, Problem> {
    let own_key = format!("{which}_token_logprobs");
    let top_key = format!("{which}_top_logprobs");
    let own = meta
        .get(&own_key)
        .and_then(Value::as_array)
        .ok_or_else(|| Problem::NoLogprobs(format!("`meta_info.{own_key}` is missing")))?;
    let tops = meta
        .get(&top_key)
        .and_then(Value::as_array)
        .ok_or_else(|| Problem::NoLogprobs(format!("`meta_info.{top_key}` is missing")))?;
    if own.len() != tops.len() {
        return Err(Problem::Shape(format!("`{own_key}` and `{top_key}` differ in length")));
    }
    let mut out = Vec::with_capacity(own.len());
    for (i, (o, t)) in own.iter().zip(tops).enumerate().skip(skip) {
        let bad = || Problem::Shape(format!("`meta_info.{own_key}[{i}]` is not a [logprob, id, text] triple"));
        let (id, logprob) = triple(o).ok_or_else(bad)?;
        let logprob = logprob.ok_or_else(bad)?;
        let top = match t {
            Value::Array(a) => a
                .iter()
                .map(|e| match triple(e) {
                    Some((id, Some(lp))) => Ok((id, lp)),
                    _ => Err(Problem::Shape(format!("`meta_info.{top_key}[{i}]` holds a malformed entry"))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Value::Null => Vec::new(),
            _ => return Err(Problem::Shape(format!("`meta_info.{top_key}[{i}]` is not a list"))),
        };
        out.push(Token { id, logprob, top });
    }
    Ok(out)
}

pub(super) fn parse_sample(v: &Value) -> Result<Reply, Problem> {
    let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
    let meta = v.get("meta_info").ok_or_else(|| Problem::Shape("the /generate answer has no `meta_info`".into()))?;
    let tokens = tokens(meta, "output", 0)?;
    let stop = match meta.pointer("/finish_reason/type").and_then(Value::as_str) {
        Some("stop") => Stop::Eos,
        _ => Stop::Length,
    };
    Ok(Reply { tokens, stop, model: None })
}

/// Positions `from..` of `ids`, from an answer whose input log-probs start at
/// `logprob_start_len` = `start` (< `from`): entry j is the log-prob of token `start + j` given
/// those before it, except entry 0, which is empty (`[null, id, null]`, top-k `null`).
/// `output_*` (a next-token row) is ignored.
pub(super) fn parse_score(v: &Value, ids: &[u32], from: usize, start: usize) -> Result<Vec<Token>, Problem> {
    let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
    let meta = v.get("meta_info").ok_or_else(|| Problem::Shape("the /generate answer has no `meta_info`".into()))?;
    let out = tokens(meta, "input", from - start)?;
    if out.len() != ids.len() - from {
        return Err(Problem::Shape(format!(
            "`input_token_logprobs` covers {} positions from {from} where the text has {}",
            out.len(),
            ids.len() - from
        )));
    }
    Ok(out)
}

/// `GET /model_info`'s `model_path` (`/get_model_info` before 0.5): the model id when
/// `/v1/models` lists none.
pub(super) async fn model_path(http: &Http) -> Result<String, EngineError> {
    let v = match http.get("/model_info").await {
        Ok(v) => v,
        Err(_) => http.get("/get_model_info").await?,
    };
    v.get("model_path")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| EngineError::NoModel { url: http.url().to_string() })
}

/// `GET /server_info` (`/get_server_info` before 0.5): the engine's settings and version.
pub(super) async fn server_info(http: &Http) -> Option<Value> {
    match http.get("/server_info").await {
        Ok(v) => Some(v),
        Err(_) => http.get("/get_server_info").await.ok(),
    }
}
