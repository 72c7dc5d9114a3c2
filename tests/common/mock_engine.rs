//! A stand-in serving engine for the tests: a small HTTP/1.1 server on localhost that answers
//! like llama-server, vLLM, SGLang or a plain OpenAI-compatible server (the shapes of the
//! fixtures in `tests/fixtures/engines/`), from a toy language model whose distribution at a
//! prefix is a fixed function of it. Its samples are a function of the prefix and the request's
//! seed, so two runs of the same job get the same answers, whatever the order of requests.
//! Failures (5xx, 429, dropped connections, bad JSON, a wrong key, a model switch…) are set
//! through [`Behaviour`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kdllm::tokenizer::Tokenizer;
use serde_json::{json, Value};

/// A temporary folder holding a tiny teacher (`teacher/`, its tokenizer loaded) and prompts
/// (`prompts.jsonl`), and stand-in engines that serve that tokenizer.
pub struct ServerSetup {
    pub tmp: tempfile::TempDir,
    pub teacher: PathBuf,
    pub prompts: PathBuf,
    pub tok: Tokenizer,
}

impl ServerSetup {
    /// With `prompts` prompts `p0..`.
    pub fn new(prompts: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let teacher = tmp.path().join("teacher");
        super::tiny_teacher(&teacher);
        let prompts_path = tmp.path().join("prompts.jsonl");
        super::write_prompts(&prompts_path, prompts);
        let tok = Tokenizer::from_folder(&teacher).unwrap();
        Self { tmp, teacher, prompts: prompts_path, tok }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// An engine serving `mock/teacher` with this tokenizer, behaving as `f` sets.
    pub fn engine(&self, flavor: Flavor, f: impl FnOnce(&mut Behaviour)) -> MockEngine {
        let mut b = Behaviour { model: "mock/teacher".into(), ..Default::default() };
        f(&mut b);
        MockEngine::start(flavor, self.tok.clone(), b)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    LlamaServer,
    Vllm,
    Sglang,
    /// OpenAI completions with token strings only.
    Openai,
}

/// What the server does besides answering.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// The model id it reports (and answers as).
    pub model: String,
    /// After this many generation requests, it serves `switch_to` instead.
    pub switch_after: Option<(usize, String)>,
    /// The next generation requests fail, in order: an HTTP status, or 0 to drop the connection.
    pub failures: Vec<u16>,
    /// Every generation request fails with this status (0: dropped connection).
    pub always_fail: Option<u16>,
    /// Answers only requests with `Authorization: Bearer <key>`.
    pub key: Option<String>,
    /// vLLM's `--max-logprobs`.
    pub max_logprobs: Option<usize>,
    /// Answers without log-probs (a server that does not support them).
    pub no_logprobs: bool,
    /// Answers generation requests with a body that is not JSON.
    pub malformed: bool,
    /// Returns this many top-k entries fewer than asked.
    pub fewer_topk: usize,
    /// Tokenizes its `/tokenize` probe with this tokenizer instead (a mismatched one).
    pub other_tokenizer: Option<Tokenizer>,
    /// Holds every generation request this long.
    pub delay: Duration,
    /// The model never gives probability to tokens whose text is that of another token too (so
    /// a server of token strings can be mapped back exactly).
    pub unambiguous_only: bool,
}

pub struct MockEngine {
    pub url: String,
    pub state: Arc<State>,
}

pub struct State {
    flavor: Flavor,
    tok: Tokenizer,
    pub behaviour: Mutex<Behaviour>,
    /// Generation and scoring requests answered (failed ones included).
    pub requests: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Every `Authorization` header value seen.
    pub auth_seen: Mutex<Vec<String>>,
}

impl MockEngine {
    pub fn start(flavor: Flavor, tok: Tokenizer, behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let state = Arc::new(State {
            flavor,
            tok,
            behaviour: Mutex::new(behaviour),
            requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            auth_seen: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        Self { url, state }
    }

    pub fn behave(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap());
    }
}

/// One connection: requests until the client closes it (keep-alive, as reqwest's pool wants).
fn serve(stream: TcpStream, s: &State) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let (mut length, mut auth) = (0usize, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "authorization" => auth = Some(value.trim().to_string()),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Some(a) = &auth {
            s.auth_seen.lock().unwrap().push(a.clone());
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match answer(s, &method, &path, &body, auth.as_deref()) {
            Some((status, text)) => {
                let reason = if status == 200 { "OK" } else { "Error" };
                let head = format!(
                    "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    text.len()
                );
                if out.write_all(head.as_bytes()).and_then(|_| out.write_all(text.as_bytes())).is_err() {
                    return;
                }
            }
            None => return, // a dropped connection
        }
    }
}

fn error(status: u16, message: &str) -> Option<(u16, String)> {
    Some((status, json!({"error": {"code": status, "message": message, "type": "mock_error"}}).to_string()))
}

fn answer(s: &State, method: &str, path: &str, body: &Value, auth: Option<&str>) -> Option<(u16, String)> {
    let b = s.behaviour.lock().unwrap().clone();
    if let Some(key) = &b.key {
        if auth != Some(format!("Bearer {key}").as_str()) && path != "/health" {
            return error(401, "Invalid API Key");
        }
    }
    let served = |n: usize| match &b.switch_after {
        Some((after, other)) if n >= *after => other.clone(),
        _ => b.model.clone(),
    };
    let model = served(s.requests.load(Ordering::SeqCst));
    let owned_by = match s.flavor {
        Flavor::LlamaServer => "llamacpp",
        Flavor::Vllm => "vllm",
        Flavor::Sglang => "sglang",
        Flavor::Openai => "someone",
    };
    let ok = |v: Value| Some((200, v.to_string()));
    match (method, path) {
        ("GET", "/v1/models") => {
            return ok(json!({"object": "list", "data": [{"id": model, "owned_by": owned_by, "max_model_len": 128}]}))
        }
        ("GET", "/props") if s.flavor == Flavor::LlamaServer => {
            return ok(json!({"default_generation_settings": {"n_ctx": 128}, "build_info": "mock-1"}))
        }
        ("GET", "/version") if s.flavor == Flavor::Vllm => return ok(json!({"version": "mock-0.1"})),
        ("GET", "/server_info") if s.flavor == Flavor::Sglang => {
            return ok(json!({"version": "mock-0.5", "frontend": "python", "context_length": 128}))
        }
        ("POST", "/tokenize") if matches!(s.flavor, Flavor::LlamaServer | Flavor::Vllm) => {
            let text = body.get("content").or_else(|| body.get("prompt")).and_then(Value::as_str).unwrap_or("");
            let tok = b.other_tokenizer.as_ref().unwrap_or(&s.tok);
            return ok(json!({"tokens": tok.encode(text, false).unwrap()}));
        }
        ("POST", "/completion") if s.flavor == Flavor::LlamaServer => {}
        ("POST", "/v1/completions") if matches!(s.flavor, Flavor::Vllm | Flavor::Openai) => {}
        ("POST", "/generate") if s.flavor == Flavor::Sglang => {}
        _ => return error(404, &format!("no route {method} {path}")),
    }
    // A generation or scoring request.
    let n = s.requests.fetch_add(1, Ordering::SeqCst);
    let model = served(n);
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(b.delay);
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    let scripted = {
        let mut guard = s.behaviour.lock().unwrap();
        if guard.failures.is_empty() {
            None
        } else {
            Some(guard.failures.remove(0))
        }
    };
    if let Some(status) = scripted.or(b.always_fail) {
        return if status == 0 { None } else { error(status, "the mock engine is failing on purpose") };
    }
    if b.malformed {
        return Some((200, "{\"content\": \"half an answ".to_string()));
    }
    let lm = Lm::new(&s.tok, b.unambiguous_only);
    match s.flavor {
        Flavor::LlamaServer => llama_server(&lm, body, &b, &model),
        Flavor::Vllm | Flavor::Openai => openai(&lm, body, &b, &model, s.flavor, &s.tok),
        Flavor::Sglang => sglang(&lm, body, &b),
    }
}

fn ids(v: &Value, key: &str) -> Vec<u32> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .unwrap_or_default()
}

fn num(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(default)
}

/// The toy model: log-probs at a prefix, a function of the prefix alone.
pub struct Lm {
    pub vocab: usize,
    pub eos: u32,
    /// Tokens that may have probability (all, without a mask).
    allowed: Option<Vec<bool>>,
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

impl Lm {
    pub fn new(tok: &Tokenizer, unambiguous_only: bool) -> Self {
        let allowed = unambiguous_only.then(|| {
            let texts: Vec<String> =
                (0..tok.vocab_size() as u32).map(|i| tok.decode_with_special(&[i]).unwrap()).collect();
            texts.iter().map(|t| texts.iter().filter(|u| *u == t).count() == 1).collect()
        });
        Lm { vocab: tok.vocab_size(), eos: tok.eos_ids()[0], allowed }
    }

    pub fn logprobs(&self, prefix: &[u32]) -> Vec<f32> {
        let h = prefix.iter().fold(0x9e3779b97f4a7c15u64, |h, &t| mix(h ^ t as u64));
        let mut logits: Vec<f64> = (0..self.vocab)
            .map(|j| (mix(h ^ (j as u64) << 20) >> 40) as f64 / (1u64 << 24) as f64 * 6.0 - 3.0)
            .collect();
        // The end token grows likelier as the text gets longer.
        logits[self.eos as usize] += (prefix.len() % 9) as f64 * 0.6 - 1.0;
        if let Some(allowed) = &self.allowed {
            for (l, &ok) in logits.iter_mut().zip(allowed) {
                if !ok {
                    *l = f64::NEG_INFINITY;
                }
            }
        }
        let max = logits.iter().cloned().fold(f64::MIN, f64::max);
        let z = logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() + max;
        logits.iter().map(|l| (l - z) as f32).collect()
    }

    /// The token drawn at `prefix` at temperature `t` (0: greedy), from a uniform that is a
    /// function of the seed and the position.
    pub fn draw(&self, lp: &[f32], t: f64, seed: u64, position: usize) -> u32 {
        let argmax = || lp.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        if t == 0.0 {
            return argmax();
        }
        let w: Vec<f64> = lp.iter().map(|&l| (l as f64 / t).exp()).collect();
        let u = (mix(seed ^ mix(position as u64 + 1)) >> 11) as f64 / (1u64 << 53) as f64 * w.iter().sum::<f64>();
        let mut acc = 0.0;
        for (j, x) in w.iter().enumerate() {
            acc += x;
            if acc >= u {
                return j as u32;
            }
        }
        argmax()
    }

    pub fn top(&self, lp: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = lp.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    /// A whole sample: (ids, stopped at the end token).
    pub fn sample(&self, prompt: &[u32], t: f64, seed: u64, max_new: usize, forced: Option<u32>) -> (Vec<u32>, bool) {
        let mut ctx = prompt.to_vec();
        let mut out = Vec::new();
        for i in 0..max_new {
            let id = forced.unwrap_or_else(|| self.draw(&self.logprobs(&ctx), t, seed, i));
            out.push(id);
            ctx.push(id);
            if id == self.eos && forced.is_none() {
                return (out, true);
            }
        }
        (out, false)
    }
}

fn llama_server(lm: &Lm, body: &Value, b: &Behaviour, model: &str) -> Option<(u16, String)> {
    let prompt = ids(body, "prompt");
    let k = num(body, "n_probs", 0.0) as usize;
    let forced = body.pointer("/logit_bias/0/0").and_then(Value::as_u64).map(|x| x as u32);
    let (out, eos) = lm.sample(
        &prompt,
        num(body, "temperature", 0.8),
        num(body, "seed", 0.0) as u64,
        num(body, "n_predict", 16.0) as usize,
        forced,
    );
    let mut ctx = prompt.clone();
    let mut probs = Vec::new();
    for &id in &out {
        let lp = lm.logprobs(&ctx);
        let top: Vec<Value> = lm
            .top(&lp, k.saturating_sub(b.fewer_topk))
            .iter()
            .map(|&(i, l)| json!({"id": i, "token": "", "bytes": [], "logprob": l}))
            .collect();
        probs.push(json!({"id": id, "token": "", "bytes": [], "logprob": lp[id as usize], "top_logprobs": top}));
        ctx.push(id);
    }
    let mut v = json!({"content": "", "tokens": out, "stop": true, "model": model, "stop_type": if eos { "eos" } else { "limit" }});
    if !b.no_logprobs && k > 0 {
        v["completion_probabilities"] = Value::Array(probs);
    }
    Some((200, v.to_string()))
}

fn openai(lm: &Lm, body: &Value, b: &Behaviour, model: &str, flavor: Flavor, tok: &Tokenizer) -> Option<(u16, String)> {
    let prompt = ids(body, "prompt");
    let as_ids = body.get("return_tokens_as_token_ids") == Some(&json!(true));
    let name = |id: u32| if as_ids { format!("token_id:{id}") } else { tok.decode_with_special(&[id]).unwrap() };
    if let Some(k) = body.get("prompt_logprobs").and_then(Value::as_u64) {
        if flavor == Flavor::Openai {
            return error(400, "prompt_logprobs is not supported");
        }
        if b.max_logprobs.is_some_and(|m| k as usize > m) {
            return error(
                400,
                &format!(
                    "Requested prompt logprobs of {k}, which is greater than max allowed: {}",
                    b.max_logprobs.unwrap()
                ),
            );
        }
        let mut plp = vec![Value::Null];
        for j in 1..prompt.len() {
            let lp = lm.logprobs(&prompt[..j]);
            let mut entry = serde_json::Map::new();
            entry.insert(prompt[j].to_string(), json!({"logprob": lp[prompt[j] as usize], "rank": 1}));
            for (r, (i, l)) in lm.top(&lp, (k as usize).saturating_sub(b.fewer_topk)).into_iter().enumerate() {
                entry.insert(i.to_string(), json!({"logprob": l, "rank": r + 1}));
            }
            plp.push(Value::Object(entry));
        }
        return Some((200, json!({"model": model, "choices": [{"text": "", "logprobs": null, "finish_reason": "length", "prompt_logprobs": plp}]}).to_string()));
    }
    let k = num(body, "logprobs", 0.0) as usize;
    if b.max_logprobs.is_some_and(|m| k > m) {
        return error(
            400,
            &format!(
                "Requested sample logprobs of {k}, which is greater than max allowed: {}",
                b.max_logprobs.unwrap()
            ),
        );
    }
    let (out, eos) = lm.sample(
        &prompt,
        num(body, "temperature", 1.0),
        num(body, "seed", 0.0) as u64,
        num(body, "max_tokens", 16.0) as usize,
        None,
    );
    let mut ctx = prompt.clone();
    let (mut tokens, mut lps, mut tops) = (Vec::new(), Vec::new(), Vec::new());
    for &id in &out {
        let lp = lm.logprobs(&ctx);
        let mut top = serde_json::Map::new();
        top.insert(name(id), json!(lp[id as usize]));
        for (i, l) in lm.top(&lp, k.saturating_sub(b.fewer_topk)) {
            top.insert(name(i), json!(l));
        }
        tokens.push(name(id));
        lps.push(lp[id as usize]);
        tops.push(Value::Object(top));
        ctx.push(id);
    }
    let logprobs = if b.no_logprobs {
        Value::Null
    } else {
        json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops})
    };
    let choice = json!({"text": "", "logprobs": logprobs, "finish_reason": if eos { "stop" } else { "length" }});
    Some((200, json!({"model": model, "choices": [choice]}).to_string()))
}

fn sglang(lm: &Lm, body: &Value, b: &Behaviour) -> Option<(u16, String)> {
    let input = ids(body, "input_ids");
    let sp = &body["sampling_params"];
    let k = num(body, "top_logprobs_num", 0.0) as usize;
    let kept = k.saturating_sub(b.fewer_topk);
    let triple = |l: f32, i: u32| json!([l, i, null]);
    let top = |lp: &[f32]| Value::Array(lm.top(lp, kept).into_iter().map(|(i, l)| triple(l, i)).collect());
    let max_new = num(sp, "max_new_tokens", 128.0) as usize;
    if max_new == 0 {
        let start = num(body, "logprob_start_len", 0.0) as usize;
        let mut own = vec![json!([null, input[start], null])];
        let mut tops = vec![Value::Null];
        for j in start + 1..input.len() {
            let lp = lm.logprobs(&input[..j]);
            own.push(triple(lp[input[j] as usize], input[j]));
            tops.push(top(&lp));
        }
        let meta = json!({"finish_reason": {"type": "length", "length": 0}, "input_token_logprobs": own, "input_top_logprobs": tops, "output_token_logprobs": [], "output_top_logprobs": []});
        return Some((200, json!({"text": "", "output_ids": [], "meta_info": meta}).to_string()));
    }
    let seed = sp.get("sampling_seed").and_then(Value::as_u64).unwrap_or(0);
    let (out, eos) = lm.sample(&input, num(sp, "temperature", 1.0), seed, max_new, None);
    let mut ctx = input.clone();
    let (mut own, mut tops) = (Vec::new(), Vec::new());
    for &id in &out {
        let lp = lm.logprobs(&ctx);
        own.push(triple(lp[id as usize], id));
        tops.push(top(&lp));
        ctx.push(id);
    }
    let finish =
        if eos { json!({"type": "stop", "matched": lm.eos}) } else { json!({"type": "length", "length": max_new}) };
    let mut meta = json!({"finish_reason": finish});
    if !b.no_logprobs {
        meta["output_token_logprobs"] = Value::Array(own);
        meta["output_top_logprobs"] = Value::Array(tops);
    }
    Some((200, json!({"text": "", "output_ids": out, "meta_info": meta}).to_string()))
}
