//! One HTTP client for a teacher server: JSON in, JSON out, with the API key, timeouts, and
//! retries of the failures that pass (429, 5xx, dropped connections, timeouts) with exponential
//! backoff and jitter. The key never appears in anything this module returns.

use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use super::{EngineError, ServerOptions};

/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The environment variables an API key is read from, in order.
pub const KEY_VARS: [&str; 2] = ["KDLLM_API_KEY", "OPENAI_API_KEY"];

pub(super) struct Http {
    client: reqwest::Client,
    /// `scheme://host:port[/prefix]`, without `/v1` or a trailing slash: routes are appended.
    root: String,
    key: Option<String>,
    retries: u32,
    backoff: Duration,
}

/// How one try ended, when it did not give JSON.
enum Failure {
    /// Worth another try: the reason, and how long the server asked us to wait.
    Transient {
        why: String,
        connect: bool,
        retry_after: Option<Duration>,
    },
    Final(EngineError),
}

impl Http {
    pub fn new(url: &str, opts: &ServerOptions) -> Result<Self, EngineError> {
        let root = root_url(url)?;
        let key = KEY_VARS.iter().find_map(|v| std::env::var(v).ok().filter(|k| !k.trim().is_empty()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(opts.timeout_secs.max(1)))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(opts.concurrency.max(1))
            .build()
            .map_err(|e| EngineError::Client { message: e.to_string() })?;
        Ok(Self { client, root, key, retries: opts.retries, backoff: Duration::from_millis(opts.backoff_ms) })
    }

    /// The server's address as shown to the user.
    pub fn url(&self) -> &str {
        &self.root
    }

    pub async fn get(&self, route: &str) -> Result<Value, EngineError> {
        self.call(route, None).await
    }

    pub async fn post(&self, route: &str, body: &Value) -> Result<Value, EngineError> {
        self.call(route, Some(body)).await
    }

    async fn call(&self, route: &str, body: Option<&Value>) -> Result<Value, EngineError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let (why, connect, retry_after) = match self.once(route, body).await {
                Ok(v) => return Ok(v),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Transient { why, connect, retry_after }) => (why, connect, retry_after),
            };
            if tries > self.retries {
                let url = format!("{}{route}", self.root);
                return Err(if connect {
                    EngineError::Unreachable { url, tries, message: why }
                } else {
                    EngineError::GaveUp { url, tries, message: why }
                });
            }
            tokio::time::sleep(retry_after.unwrap_or_else(|| self.backoff_for(tries))).await;
        }
    }

    /// Exponential backoff with "equal jitter": half the doubling delay, plus up to as much again
    /// at random, so many clients retrying at once spread out.
    fn backoff_for(&self, tries: u32) -> Duration {
        let full = self.backoff.saturating_mul(1u32 << (tries - 1).min(16)).min(MAX_BACKOFF);
        let half = full / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    async fn once(&self, route: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let url = format!("{}{route}", self.root);
        let mut req = match body {
            Some(b) => self.client.post(&url).header("content-type", "application/json").body(b.to_string()),
            None => self.client.get(&url),
        };
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let connect = e.is_connect();
                return Err(Failure::Transient { why: self.describe(&e), connect, retry_after: None });
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(60)));
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => return Err(Failure::Transient { why: self.describe(&e), connect: false, retry_after: None }),
        };
        let text = self.redact(&text);
        if status == 429 || status >= 500 {
            let why = format!("HTTP {status}: {}", error_message(&text));
            return Err(Failure::Transient { why, connect: false, retry_after });
        }
        if status == 401 || status == 403 {
            let key_set = self.key.is_some();
            return Err(Failure::Final(EngineError::Unauthorized { url, status, key_set }));
        }
        if !(200..300).contains(&status) {
            return Err(Failure::Final(EngineError::Rejected { url, status, message: error_message(&text) }));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            Failure::Final(EngineError::BadJson {
                url,
                message: e.to_string(),
                start: text.chars().take(120).collect(),
            })
        })
    }

    /// A transport error in one line (reqwest's own text names the URL, which we show anyway).
    fn describe(&self, e: &reqwest::Error) -> String {
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "connection failed"
        };
        let mut source = std::error::Error::source(e);
        let mut detail = String::new();
        while let Some(s) = source {
            detail = s.to_string();
            source = s.source();
        }
        let detail = if detail.is_empty() { String::new() } else { format!(" ({detail})") };
        self.redact(&format!("{kind}{detail}"))
    }

    fn redact(&self, text: &str) -> String {
        match &self.key {
            Some(k) if !k.is_empty() => text.replace(k.as_str(), "<hidden>"),
            _ => text.to_string(),
        }
    }
}

/// `http://host:port/v1/` → `http://host:port`. Credentials in the URL are refused (they would
/// end up in logs and manifests): the key belongs in `KDLLM_API_KEY`.
pub(super) fn root_url(url: &str) -> Result<String, EngineError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| EngineError::BadUrl { url: url.to_string(), message: e.to_string() })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        let message = "a server teacher is an http:// or https:// address, e.g. http://localhost:8000/v1".into();
        return Err(EngineError::BadUrl { url: url.to_string(), message });
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let mut shown = parsed.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        return Err(EngineError::BadUrl {
            url: shown.to_string(),
            message: "put the API key in KDLLM_API_KEY (or OPENAI_API_KEY), not in the URL".into(),
        });
    }
    let mut root = parsed.as_str().trim_end_matches('/').to_string();
    if let Some(q) = root.find(['?', '#']) {
        root.truncate(q);
    }
    let root = root.trim_end_matches('/');
    Ok(root.strip_suffix("/v1").unwrap_or(root).to_string())
}

/// The message of an error body, in the shapes engines use: `{"error": {"message"}}` (OpenAI,
/// llama-server), `{"message"}` / `{"object": "error", "message"}` (vLLM, SGLang),
/// `{"error": "..."}`, `{"detail": ...}` (FastAPI); else the text itself, cut short.
pub(super) fn error_message(text: &str) -> String {
    let short = |s: &str| {
        let s = s.trim();
        if s.chars().count() > 300 {
            format!("{}…", s.chars().take(300).collect::<String>())
        } else {
            s.to_string()
        }
    };
    let Ok(v) = serde_json::from_str::<Value>(text) else { return short(text) };
    let found =
        [v.pointer("/error/message"), v.get("message"), v.get("error"), v.pointer("/detail/0/msg"), v.get("detail")]
            .into_iter()
            .flatten()
            .find_map(|m| match m {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other if !other.is_object() => Some(other.to_string()),
                _ => None,
            });
    short(&found.unwrap_or_else(|| text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_url_drops_v1_and_slashes_and_refuses_credentials() {
        assert_eq!(root_url("http://localhost:8000/v1").unwrap(), "http://localhost:8000");
        assert_eq!(root_url("http://localhost:8000/v1/").unwrap(), "http://localhost:8000");
        assert_eq!(root_url("https://proxy.example/llm/v1").unwrap(), "https://proxy.example/llm");
        assert_eq!(root_url("http://10.0.0.2:8080").unwrap(), "http://10.0.0.2:8080");
        let err = root_url("http://user:s3cret@host:1/v1").unwrap_err().to_string();
        assert!(err.contains("KDLLM_API_KEY") && !err.contains("s3cret"), "{err}");
        assert!(root_url("ftp://host/v1").is_err());
    }

    #[test]
    fn error_messages_are_found_in_every_engines_shape() {
        let cases = [
            (r#"{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}"#, "Invalid API Key"),
            (
                r#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","code":404}"#,
                "The model `x` does not exist.",
            ),
            (r#"{"error":"Unauthorized"}"#, "Unauthorized"),
            (r#"{"detail":[{"loc":["body"],"msg":"field required"}]}"#, "field required"),
            ("plain text failure", "plain text failure"),
        ];
        for (body, want) in cases {
            assert_eq!(error_message(body), want);
        }
    }
}
