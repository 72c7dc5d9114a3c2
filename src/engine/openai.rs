//! The OpenAI completions API (`POST /v1/completions`): vLLM with its extensions (token ids
//! through `return_tokens_as_token_ids`, teacher-forced scoring through `prompt_logprobs`), and
//! any other server that speaks it, whose token strings are mapped back to ids.

use serde_json::{json, Value};

use super::client::Http;
use super::tokens::TokenMap;
use super::{f32_of, u32_of, EngineError, Problem, Reply, SampleParams, Stop, Token};

/// `vllm` adds vLLM's own fields (exact ids, top-k off as -1, no repetition penalty).
pub(super) fn sample_request(model: &str, prompt: &[u32], p: &SampleParams, vllm: bool) -> Value {
    let mut body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "seed": p.seed,
        "n": 1,
        "logprobs": p.logprobs.max(1),
        "echo": false,
        "stream": false,
    });
    let extra = if vllm {
        json!({
            "top_k": if p.top_k == 0 { -1 } else { p.top_k as i64 },
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "return_tokens_as_token_ids": true,
            "skip_special_tokens": false,
        })
    } else if p.top_k > 0 {
        json!({"top_k": p.top_k})
    } else {
        json!({})
    };
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    body
}

/// vLLM: the whole text as the prompt, its log-probs (`prompt_logprobs`: the token's own plus the
/// top-k, at every position but the first) and one throwaway generated token.
pub(super) fn score_request(model: &str, ids: &[u32], k: usize) -> Value {
    json!({
        "model": model,
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": k.max(1),
        "stream": false,
    })
}

/// A token as the API writes it: `token_id:123` (vLLM with `return_tokens_as_token_ids`) or its
/// text, mapped with the teacher's tokenizer.
fn id_of(text: &str, map: Option<&TokenMap>) -> Result<u32, Problem> {
    if let Some(id) = text.strip_prefix("token_id:").and_then(|n| n.parse().ok()) {
        return Ok(id);
    }
    match map {
        Some(m) => m.id(text),
        None => Err(Problem::Shape(format!(
            "token {text:?} is not `token_id:N` (was `return_tokens_as_token_ids` ignored?)"
        ))),
    }
}

pub(super) fn parse_sample(v: &Value, map: Option<&TokenMap>) -> Result<Reply, Problem> {
    let choice = v.pointer("/choices/0").ok_or_else(|| Problem::Shape("no `choices[0]` in the answer".into()))?;
    let lp = match choice.get("logprobs") {
        Some(Value::Object(o)) => o,
        _ => return Err(Problem::NoLogprobs("its /v1/completions answer has `logprobs: null`".into())),
    };
    let list = |key: &str| {
        lp.get(key).and_then(Value::as_array).ok_or_else(|| Problem::NoLogprobs(format!("`logprobs.{key}` is missing")))
    };
    let (texts, lps, tops) = (list("tokens")?, list("token_logprobs")?, list("top_logprobs")?);
    if texts.len() != lps.len() || texts.len() != tops.len() {
        return Err(Problem::Shape("`logprobs.tokens`, `token_logprobs` and `top_logprobs` differ in length".into()));
    }
    let mut tokens = Vec::with_capacity(texts.len());
    for (i, ((t, l), top)) in texts.iter().zip(lps).zip(tops).enumerate() {
        let text = t.as_str().ok_or_else(|| Problem::Shape(format!("`logprobs.tokens[{i}]` is not a string")))?;
        let logprob =
            f32_of(l).ok_or_else(|| Problem::Shape(format!("`logprobs.token_logprobs[{i}]` is not a number")))?;
        let top = match top {
            Value::Object(o) => o
                .iter()
                .map(|(k, v)| {
                    Ok((
                        id_of(k, map)?,
                        f32_of(v).ok_or_else(|| Problem::Shape(format!("`top_logprobs[{i}]` holds a non-number")))?,
                    ))
                })
                .collect::<Result<Vec<_>, Problem>>()?,
            Value::Null => Vec::new(),
            _ => return Err(Problem::Shape(format!("`logprobs.top_logprobs[{i}]` is not an object"))),
        };
        tokens.push(Token { id: id_of(text, map)?, logprob, top });
    }
    let stop = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("stop") => Stop::Eos,
        _ => Stop::Length,
    };
    Ok(Reply { tokens, stop, model: v.get("model").and_then(Value::as_str).map(str::to_string) })
}

/// Positions `from..` of `ids` from vLLM's `prompt_logprobs` (a list over the prompt: `null`
/// first, then `{id: {logprob, rank, decoded_token}}` holding the prompt token and the top-k).
pub(super) fn parse_score(v: &Value, ids: &[u32], from: usize) -> Result<Vec<Token>, Problem> {
    let plp = match v.pointer("/choices/0/prompt_logprobs") {
        Some(Value::Array(a)) => a,
        _ => return Err(Problem::NoLogprobs("its answer has no `choices[0].prompt_logprobs`".into())),
    };
    if plp.len() != ids.len() {
        return Err(Problem::Shape(format!(
            "`prompt_logprobs` has {} entries for a prompt of {} tokens",
            plp.len(),
            ids.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() - from);
    for (j, (entry, &id)) in plp.iter().zip(ids).enumerate().skip(from.max(1)) {
        let o = entry.as_object().ok_or_else(|| Problem::Shape(format!("`prompt_logprobs[{j}]` is not an object")))?;
        let mut top = Vec::with_capacity(o.len());
        let mut own = None;
        // The prompt's own token comes first, with its rank, then the top-k: the K best by
        // log-prob are kept later, which drops the own token when it ranks below them.
        for (key, e) in o {
            let bad = || Problem::Shape(format!("`prompt_logprobs[{j}]` has the key {key:?}, not a token id"));
            let tid: u32 = key.parse().map_err(|_| bad())?;
            let lp = e.get("logprob").and_then(f32_of).or_else(|| f32_of(e));
            let lp = lp.ok_or_else(|| Problem::Shape(format!("`prompt_logprobs[{j}][{key}]` has no `logprob`")))?;
            if tid == id {
                own = Some(lp);
            }
            top.push((tid, lp));
        }
        let logprob =
            own.ok_or_else(|| Problem::Shape(format!("`prompt_logprobs[{j}]` lacks the prompt's own token {id}")))?;
        out.push(Token { id, logprob, top });
    }
    Ok(out)
}

/// vLLM's `POST /tokenize`; `None` where the server has no such route.
pub(super) async fn tokenize(http: &Http, model: &str, text: &str) -> Result<Option<Vec<u32>>, EngineError> {
    let body = json!({"model": model, "prompt": text, "add_special_tokens": false});
    let v = match http.post("/tokenize", &body).await {
        Ok(v) => v,
        Err(EngineError::Rejected { status: 404 | 405, .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(v.get("tokens").and_then(Value::as_array).and_then(|a| a.iter().map(u32_of).collect()))
}
