//! Teachers on serving engines, driven over HTTP: vLLM and SGLang (GPU servers, often many
//! machines), llama.cpp's `llama-server`, and other OpenAI-compatible completion servers.
//!
//! | engine | sampling | token ids from | scoring (teacher-forced top-k) |
//! |---|---|---|---|
//! | `vllm` | `POST /v1/completions`, `logprobs: K` | `return_tokens_as_token_ids` | `prompt_logprobs: K` |
//! | `sglang` | `POST /generate` (native) | `output_token_logprobs` | `input_token_logprobs` from `logprob_start_len` |
//! | `llama-server` | `POST /completion`, `n_probs: K` | `completion_probabilities[].id` | a request per position (prefix cached), the token forced with `logit_bias` |
//! | `openai` (any other) | `POST /v1/completions`, `logprobs: K` | token strings, mapped with the teacher's tokenizer where exact | refused |
//!
//! Prompts are sent as token ids, rendered and tokenized here with the teacher's tokenizer, so
//! the server never re-tokenizes them; log-probs are those of the model's distribution at
//! temperature 1, whatever temperature samples (the same convention as in-process teachers).

mod client;
mod llama_server;
mod openai;
mod sglang;
#[cfg(test)]
mod tests;
mod tokens;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::{Completion, FinishReason};
use crate::tokenizer::Tokenizer;
use client::Http;
pub use client::KEY_VARS;
use tokens::TokenMap;

/// A serving engine kdllm knows how to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    Vllm,
    Sglang,
    LlamaServer,
    /// Any other server with the OpenAI completions API.
    Openai,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Vllm => "vllm",
            Engine::Sglang => "sglang",
            Engine::LlamaServer => "llama-server",
            Engine::Openai => "openai",
        })
    }
}

impl Engine {
    /// Whether the engine returns the log-probs of a whole given text in one request (what
    /// grading a student's batch as it is written needs). llama-server scores one position per
    /// request, and a plain OpenAI server not at all.
    pub fn scores_prompts(self) -> bool {
        matches!(self, Engine::Vllm | Engine::Sglang)
    }
}

/// Which engines [`Engine::scores_prompts`], in words, for errors.
pub const PROMPT_LOGPROB_ENGINES: &str = "vLLM (`prompt_logprobs`) and SGLang (`logprob_start_len`) return them; \
    llama-server and plain OpenAI-compatible servers do not";

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vllm" => Ok(Engine::Vllm),
            "sglang" => Ok(Engine::Sglang),
            "llama-server" | "llama.cpp" | "llamacpp" => Ok(Engine::LlamaServer),
            "openai" => Ok(Engine::Openai),
            other => Err(format!("`{other}` is not an engine; use vllm, sglang, llama-server or openai")),
        }
    }
}

/// How to drive a server teacher: the `generate` / `score` flags of the same names, and the
/// `server:` key of recipe steps. Defaults only in `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerOptions {
    /// The engine, to skip detection.
    pub engine: Option<Engine>,
    /// The served model to ask for, when the server serves several (vLLM's `--served-model-name`).
    pub model: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Further tries of a request that failed in a way that may pass: 429, 5xx, a dropped
    /// connection, a timeout.
    pub retries: u32,
    /// The first wait before a retry, in milliseconds; it doubles with every try (to 30 s).
    pub backoff_ms: u64,
    /// Seconds before a request is given up (and tried again).
    pub timeout_secs: u64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self { engine: None, model: None, concurrency: 8, retries: 6, backoff_ms: 500, timeout_secs: 600 }
    }
}

impl ServerOptions {
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Options(m.to_string()));
        if self.concurrency == 0 {
            return bad("`concurrency` must be >= 1");
        }
        if self.timeout_secs == 0 {
            return bad("`timeout_secs` must be >= 1");
        }
        Ok(())
    }
}

/// Whether a teacher spec names a server rather than a model.
pub fn is_server(spec: &str) -> bool {
    spec.starts_with("http://") || spec.starts_with("https://")
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid server setting: {0}")]
    Options(String),
    #[error("--teacher {url}: {message}")]
    BadUrl { url: String, message: String },
    #[error("cannot set up the HTTP client: {message}")]
    Client { message: String },
    #[error("cannot reach the teacher server at {url} ({tries} tries): {message}; check that it is running and that --teacher names its address")]
    Unreachable { url: String, tries: u32, message: String },
    #[error("the teacher server at {url} kept failing ({tries} tries, the last: {message}); the parts written so far are kept: run the same command again once the server is healthy")]
    GaveUp { url: String, tries: u32, message: String },
    #[error("the teacher server at {url} refused the request (HTTP {status}): {}", if *key_set { "it does not accept the API key in KDLLM_API_KEY / OPENAI_API_KEY; set the key the server was started with" } else { "it needs an API key: set KDLLM_API_KEY (or OPENAI_API_KEY) to the key the server was started with" })]
    Unauthorized { url: String, status: u16, key_set: bool },
    #[error("the teacher server at {url} rejected the request (HTTP {status}): {message}")]
    Rejected { url: String, status: u16, message: String },
    #[error("the teacher server at {url} answered with malformed JSON ({message}); it begins: {start:?}")]
    BadJson { url: String, message: String, start: String },
    #[error("the teacher server at {url} answered in an unexpected shape: {message}; is it a {engine} server? (pass --engine to name the engine)")]
    Shape { url: String, engine: Engine, message: String },
    #[error("the teacher server at {url} serves no model named `{model}`; it serves: {}; pass one of them with --served-model", served.join(", "))]
    ModelNotServed { url: String, model: String, served: Vec<String> },
    #[error("the teacher server at {url} serves several models ({}); pick one with --served-model", served.join(", "))]
    SeveralModels { url: String, served: Vec<String> },
    #[error("the teacher server at {url} does not say which model it serves (no `/v1/models`); name it with --served-model and the tokenizer with --tokenizer")]
    NoModel { url: String },
    #[error("the teacher server at {url} now serves `{now}`, but this run started with `{was}`; the parts written so far are kept: point --teacher at a server of `{was}` and run again, or choose another --output")]
    ModelSwitched { url: String, was: String, now: String },
    #[error("the teacher server at {url} ({engine}) returned no log-probabilities ({detail}); kdllm stores the teacher's log-probs, so it needs an engine that returns them: vLLM, SGLang or llama-server")]
    NoLogprobs { url: String, engine: Engine, detail: String },
    #[error("the teacher server at {url} refuses --logprobs {asked}: {message}{}", limit_hint(*engine))]
    LogprobsLimit { url: String, engine: Engine, asked: usize, message: String },
    #[error("the teacher server at {url} returned {got} top-k entries at completion position {position} where --logprobs {asked} were asked; lower --logprobs to what the server returns{}", limit_hint(*engine))]
    TooFewTopk { url: String, engine: Engine, position: usize, got: usize, asked: usize },
    #[error("the teacher server at {url} returned the token {token:?}, which {problem}; kdllm cannot record it exactly: use an engine that returns token ids (vLLM, SGLang, llama-server)")]
    Unmappable { url: String, token: String, problem: String },
    #[error("the tokenizer ({tokenizer}) does not match the teacher server's at {url}: {detail}; pass the teacher's own tokenizer with --tokenizer")]
    TokenizerMismatch { url: String, tokenizer: String, detail: String },
    #[error("the teacher server at {url} ({engine}) cannot score given text (teacher-forced log-probs); engines that can: vLLM (`prompt_logprobs`), SGLang (input logprobs), llama-server")]
    NoScoring { url: String, engine: Engine },
}

fn limit_hint(engine: Engine) -> &'static str {
    match engine {
        Engine::Vllm => " (vLLM caps log-probs at its --max-logprobs, 20 by default: restart it with a larger --max-logprobs, or lower --logprobs)",
        _ => "",
    }
}

/// What a sampling request asks of the server.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleParams {
    pub temperature: f64,
    pub top_p: f64,
    /// 0 = off.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Top-k log-probs to keep per position.
    pub logprobs: usize,
    /// This request's own seed (where the engine takes one).
    pub seed: u64,
}

/// One completion position as a server reports it: the token, its log-prob, the top-k.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Token {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a server stopped.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Stop {
    /// An end-of-sequence (or stop) token.
    Eos,
    /// The token limit.
    Length,
}

/// A parsed sampling response.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reply {
    pub tokens: Vec<Token>,
    pub stop: Stop,
    /// The model the response says it came from, when it says.
    pub model: Option<String>,
}

/// A connected server teacher.
pub struct Server {
    http: Http,
    pub engine: Engine,
    /// The engine's version, where it tells.
    pub version: Option<String>,
    /// The served model's id, as the server reports it.
    pub model: String,
    /// The context window the server reports, if any.
    pub max_context: Option<usize>,
    /// Set by [`Server::check_tokenizer`]: the tokenizer's EOS ids, its vocabulary size and,
    /// for engines that return token strings, the map back to ids.
    eos_ids: Vec<u32>,
    vocab_size: usize,
    token_map: Option<TokenMap>,
}

impl Server {
    /// Connects to `url`, finds the engine (unless `opts.engine`), its version, and the model.
    pub async fn connect(url: &str, opts: &ServerOptions) -> Result<Self, EngineError> {
        opts.validate()?;
        let http = Http::new(url, opts)?;
        let listed = match http.get("/v1/models").await {
            Ok(v) => Some(v),
            Err(EngineError::Rejected { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let owned_by: Vec<&str> = listed
            .as_ref()
            .and_then(|v| v.get("data"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|m| m.get("owned_by").and_then(Value::as_str)).collect())
            .unwrap_or_default();
        let engine = match opts.engine {
            Some(e) => e,
            None => detect(&http, &owned_by).await,
        };
        // The engine's own description of itself: its version, and for some its context.
        let about = about(&http, engine).await;
        let version = about.as_ref().and_then(|a| version(engine, a));
        let served = served_models(listed.as_ref());
        let model = match (&opts.model, served.as_slice()) {
            (Some(m), served) if served.is_empty() || served.contains(m) => m.clone(),
            (Some(m), served) => {
                return Err(EngineError::ModelNotServed {
                    url: http.url().to_string(),
                    model: m.clone(),
                    served: served.to_vec(),
                })
            }
            (None, [one]) => one.clone(),
            (None, []) => match engine {
                Engine::Sglang => sglang::model_path(&http).await?,
                _ => return Err(EngineError::NoModel { url: http.url().to_string() }),
            },
            (None, several) => {
                return Err(EngineError::SeveralModels { url: http.url().to_string(), served: several.to_vec() })
            }
        };
        let max_context = max_context(engine, listed.as_ref(), about.as_ref(), &model);
        Ok(Self { http, engine, version, model, max_context, eos_ids: Vec::new(), vocab_size: 0, token_map: None })
    }

    pub fn url(&self) -> &str {
        self.http.url()
    }

    /// `{"engine", "version", "model"}`: what the Parquet metadata and the manifest record.
    pub fn info(&self) -> Value {
        serde_json::json!({"engine": self.engine, "version": self.version, "model": self.model})
    }

    /// Checks that `tok` is the server's tokenizer (the same ids for a probe text, where the
    /// engine can tokenize), and keeps what parsing responses needs from it.
    pub async fn check_tokenizer(&mut self, tok: &Tokenizer, name: &str) -> Result<(), EngineError> {
        const PROBE: &str = "Hello, world! The answer is 42.\n  Ünïcödé — 你好, naïve café.";
        let url = self.url().to_string();
        let mismatch =
            |detail: String| EngineError::TokenizerMismatch { url: url.clone(), tokenizer: name.to_string(), detail };
        let ours = tok.encode(PROBE, false).map_err(|e| mismatch(e.to_string()))?;
        let theirs = match self.engine {
            Engine::LlamaServer => Some(llama_server::tokenize(&self.http, PROBE).await?),
            Engine::Vllm => openai::tokenize(&self.http, &self.model, PROBE).await?,
            Engine::Sglang | Engine::Openai => None,
        };
        if let Some(theirs) = theirs {
            if theirs != ours {
                let first = |v: &[u32]| v.iter().take(16).map(u32::to_string).collect::<Vec<_>>().join(", ");
                return Err(mismatch(format!(
                    "it encodes {PROBE:?} as [{}…] where the server gives [{}…]",
                    first(&ours),
                    first(&theirs)
                )));
            }
        }
        self.eos_ids = tok.eos_ids().to_vec();
        self.vocab_size = tok.vocab_size();
        if self.engine == Engine::Openai {
            self.token_map = Some(TokenMap::new(tok).map_err(|e| mismatch(e.to_string()))?);
        }
        Ok(())
    }

    /// Errors if the server no longer serves the model this run started with.
    pub async fn check_model(&self) -> Result<(), EngineError> {
        let now = match self.engine {
            Engine::Sglang => match self.http.get("/v1/models").await {
                Ok(v) => served_models(Some(&v)),
                Err(_) => vec![sglang::model_path(&self.http).await?],
            },
            _ => served_models(Some(&self.http.get("/v1/models").await?)),
        };
        if now.is_empty() || now.contains(&self.model) {
            return Ok(());
        }
        Err(self.switched(&now[0]))
    }

    fn switched(&self, now: &str) -> EngineError {
        EngineError::ModelSwitched { url: self.url().to_string(), was: self.model.clone(), now: now.to_string() }
    }

    fn shape(&self, message: String) -> EngineError {
        EngineError::Shape { url: self.url().to_string(), engine: self.engine, message }
    }

    /// Samples one completion of `prompt` (token ids).
    pub async fn sample(&self, prompt: &[u32], p: &SampleParams) -> Result<Completion, EngineError> {
        let reply = match self.engine {
            Engine::LlamaServer => {
                let v = self.http.post("/completion", &llama_server::sample_request(prompt, p)).await;
                llama_server::parse_sample(&self.limit(v, p.logprobs)?)
            }
            Engine::Vllm => {
                let v = self.http.post("/v1/completions", &openai::sample_request(&self.model, prompt, p, true)).await;
                openai::parse_sample(&self.limit(v, p.logprobs)?, None)
            }
            Engine::Openai => {
                let v = self.http.post("/v1/completions", &openai::sample_request(&self.model, prompt, p, false)).await;
                openai::parse_sample(&self.limit(v, p.logprobs)?, self.token_map.as_ref())
            }
            Engine::Sglang => {
                let v = self.http.post("/generate", &sglang::sample_request(prompt, p)).await;
                sglang::parse_sample(&self.limit(v, p.logprobs)?)
            }
        };
        let reply = reply.map_err(|e| self.problem(e))?;
        if let Some(m) = reply.model.as_deref().filter(|m| *m != self.model) {
            return Err(self.switched(m));
        }
        let mut reply = reply;
        if self.engine == Engine::Sglang && p.temperature != 0.0 && p.temperature != 1.0 {
            let mut all = prompt.to_vec();
            all.extend(reply.tokens.iter().map(|t| t.id));
            reply.tokens = self.score_positions(&all, prompt.len(), p.logprobs).await?;
        }
        // An engine that leaves the end token out of its tokens: score that one position so the
        // row still ends with it, as an in-process teacher's does (where the engine can score;
        // elsewhere the row is recorded as cut at the token limit).
        let ends_with_eos = reply.tokens.last().is_some_and(|t| self.eos_ids.contains(&t.id));
        if reply.stop == Stop::Eos && !ends_with_eos && self.engine != Engine::Openai {
            if let Some(&eos) = self.eos_ids.first() {
                let mut all = prompt.to_vec();
                all.extend(reply.tokens.iter().map(|t| t.id));
                all.push(eos);
                let last = self.score_positions(&all, all.len() - 1, p.logprobs).await?;
                reply.tokens.extend(last);
            }
        }
        self.completion(reply.tokens, reply.stop, p.logprobs)
    }

    /// The teacher's log-prob of each token of `completion` after `prompt`, and its top-`k`
    /// there (teacher-forced).
    pub async fn score(&self, prompt: &[u32], completion: &[u32], k: usize) -> Result<Completion, EngineError> {
        let mut all = prompt.to_vec();
        all.extend_from_slice(completion);
        let tokens = self.score_positions(&all, prompt.len(), k).await?;
        self.completion(tokens, Stop::Length, k)
    }

    /// Positions `from..` of `all` scored: each token's log-prob after those before it, and the
    /// top-`k` there.
    async fn score_positions(&self, all: &[u32], from: usize, k: usize) -> Result<Vec<Token>, EngineError> {
        let expect = &all[from..];
        let tokens = match self.engine {
            Engine::LlamaServer => {
                let mut out = Vec::with_capacity(expect.len());
                for i in 0..expect.len() {
                    let body = llama_server::score_request(&all[..from + i], expect[i], k);
                    let v = self.limit(self.http.post("/completion", &body).await, k)?;
                    out.push(llama_server::parse_score(&v, expect[i]).map_err(|e| self.problem(e))?);
                }
                out
            }
            Engine::Vllm => {
                let v = self.http.post("/v1/completions", &openai::score_request(&self.model, all, k)).await;
                openai::parse_score(&self.limit(v, k)?, all, from).map_err(|e| self.problem(e))?
            }
            Engine::Sglang => {
                let v = self.http.post("/generate", &sglang::score_request(all, k, from)).await;
                sglang::parse_score(&self.limit(v, k)?, all, from, sglang::score_start(from))
                    .map_err(|e| self.problem(e))?
            }
            Engine::Openai => return Err(EngineError::NoScoring { url: self.url().to_string(), engine: self.engine }),
        };
        if let Some(t) = tokens.iter().zip(expect).find(|(t, &e)| t.id != e) {
            return Err(self.shape(format!("scored token {} where the text has {}", t.0.id, t.1)));
        }
        Ok(tokens)
    }

    /// A 400 that is about the number of log-probs becomes the error that says so.
    fn limit(&self, result: Result<Value, EngineError>, asked: usize) -> Result<Value, EngineError> {
        match result {
            Err(EngineError::Rejected { status: 400, message, .. }) if is_logprob_limit(&message) => {
                Err(EngineError::LogprobsLimit { url: self.url().to_string(), engine: self.engine, asked, message })
            }
            other => other,
        }
    }

    fn problem(&self, p: Problem) -> EngineError {
        match p {
            Problem::Shape(m) => self.shape(m),
            Problem::NoLogprobs(detail) => {
                EngineError::NoLogprobs { url: self.url().to_string(), engine: self.engine, detail }
            }
            Problem::Unmappable { token, problem } => {
                EngineError::Unmappable { url: self.url().to_string(), token, problem }
            }
        }
    }

    /// The server's tokens as a row (see [`assemble`]).
    fn completion(&self, tokens: Vec<Token>, stop: Stop, k: usize) -> Result<Completion, EngineError> {
        assemble(tokens, stop, k, &self.eos_ids, self.vocab_size).map_err(|e| match e {
            Assembly::TooFew { position, got } => {
                EngineError::TooFewTopk { url: self.url().to_string(), engine: self.engine, position, got, asked: k }
            }
            Assembly::BeyondVocab(id) => EngineError::TokenizerMismatch {
                url: self.url().to_string(),
                tokenizer: "the tokenizer".into(),
                detail: format!("the server returned token id {id}, beyond its vocabulary of {}", self.vocab_size),
            },
        })
    }
}

/// Why a server's tokens do not make a row.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Assembly {
    TooFew { position: usize, got: usize },
    BeyondVocab(u32),
}

/// A row from a server's tokens: each top-k sorted by log-prob (engines list the sampled token
/// first, or add it as a (k+1)-th), exactly `k` long; a stop counts as `Stop` only when the row
/// ends with one of `eos_ids`. A `vocab_size` of 0 skips the vocabulary check.
pub(super) fn assemble(
    tokens: Vec<Token>,
    stop: Stop,
    k: usize,
    eos_ids: &[u32],
    vocab_size: usize,
) -> Result<Completion, Assembly> {
    let mut c = Completion::empty();
    for (position, mut t) in tokens.into_iter().enumerate() {
        if vocab_size > 0 {
            if let Some(bad) =
                std::iter::once(t.id).chain(t.top.iter().map(|e| e.0)).find(|&id| id as usize >= vocab_size)
            {
                return Err(Assembly::BeyondVocab(bad));
            }
        }
        t.top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        t.top.dedup_by_key(|e| e.0);
        if t.top.len() < k {
            return Err(Assembly::TooFew { position, got: t.top.len() });
        }
        t.top.truncate(k);
        c.ids.push(t.id);
        c.token_logprobs.push(t.logprob);
        let (ids, lps) = t.top.into_iter().unzip();
        c.topk_ids.push(ids);
        c.topk_logprobs.push(lps);
    }
    c.finish = match stop {
        Stop::Eos if c.ids.last().is_some_and(|id| eos_ids.contains(id)) => FinishReason::Stop,
        _ => FinishReason::Length,
    };
    Ok(c)
}

/// What a response parser found wrong, before the URL is known.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Problem {
    Shape(String),
    NoLogprobs(String),
    Unmappable { token: String, problem: String },
}

/// vLLM: "Requested sample logprobs of 50, which is greater than max allowed: 20";
/// SGLang and others word it similarly.
fn is_logprob_limit(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("logprob") && (m.contains("max") || m.contains("greater") || m.contains("exceed") || m.contains("limit"))
}

/// The model ids of a `/v1/models` answer.
fn served_models(listed: Option<&Value>) -> Vec<String> {
    listed
        .and_then(|v| v.get("data"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The engine behind a server: from `owned_by` in `/v1/models`, else from the routes it has.
async fn detect(http: &Http, owned_by: &[&str]) -> Engine {
    for o in owned_by {
        match *o {
            "llamacpp" => return Engine::LlamaServer,
            "vllm" => return Engine::Vllm,
            "sglang" => return Engine::Sglang,
            _ => {}
        }
    }
    if http.get("/props").await.is_ok_and(|v| v.get("default_generation_settings").is_some()) {
        return Engine::LlamaServer;
    }
    if sglang::server_info(http).await.is_some_and(|v| v.get("version").is_some() && v.get("frontend").is_some()) {
        return Engine::Sglang;
    }
    if http.get("/version").await.is_ok_and(|v| v.get("version").is_some()) {
        return Engine::Vllm;
    }
    Engine::Openai
}

/// What the engine says of itself: llama-server's `/props`, SGLang's `/server_info`, vLLM's
/// `/version`.
async fn about(http: &Http, engine: Engine) -> Option<Value> {
    match engine {
        Engine::LlamaServer => http.get("/props").await.ok(),
        Engine::Sglang => sglang::server_info(http).await,
        Engine::Vllm => http.get("/version").await.ok(),
        Engine::Openai => None,
    }
}

fn version(engine: Engine, about: &Value) -> Option<String> {
    let key = match engine {
        Engine::LlamaServer => "build_info",
        _ => "version",
    };
    about.get(key).and_then(Value::as_str).map(str::to_string)
}

/// The context window: `max_model_len` of the model in `/v1/models` (vLLM, SGLang), else what
/// the engine says of itself (llama-server: one slot's `n_ctx`).
fn max_context(engine: Engine, listed: Option<&Value>, about: Option<&Value>, model: &str) -> Option<usize> {
    let entry = listed
        .and_then(|v| v.get("data"))
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|m| m.get("id").and_then(Value::as_str) == Some(model)));
    let from_about = |keys: &[&str]| keys.iter().find_map(|k| about?.pointer(k).and_then(Value::as_u64));
    let n = match entry.and_then(|m| m.get("max_model_len")).and_then(Value::as_u64) {
        Some(n) => Some(n),
        None => match engine {
            Engine::LlamaServer => from_about(&["/default_generation_settings/n_ctx"]),
            Engine::Sglang => from_about(&["/context_length", "/max_total_num_tokens"]),
            _ => None,
        },
    };
    n.map(|n| n as usize)
}

/// The seed a request carries: 31 bits, which every engine takes (llama.cpp reads 2^32 − 1 as
/// "random").
pub fn request_seed(row_seed: u64) -> u64 {
    row_seed & 0x7fff_ffff
}

fn f32_of(v: &Value) -> Option<f32> {
    v.as_f64().map(|x| x as f32)
}

fn u32_of(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}
