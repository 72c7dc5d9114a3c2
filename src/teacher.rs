//! The teacher a stage samples (`generate`) or scores (`score`) with: a model loaded in this
//! process, or a model on a serving engine reached over HTTP ([`crate::engine`]).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::data::{Completion, PartsOutput};
use crate::engine::{self, EngineError, Server, ServerOptions};
use crate::model::{self, Checkpoint};
use crate::tokenizer::Tokenizer;

pub enum Teacher {
    /// A checkpoint, opened (its weights are loaded by the stage, once it knows there is work).
    Local(Checkpoint),
    Remote(Remote),
}

/// A server teacher, the tokenizer its ids belong to, and the runtime its requests run on.
pub struct Remote {
    pub server: Server,
    pub tokenizer: Tokenizer,
    pub options: ServerOptions,
    pub runtime: tokio::runtime::Runtime,
}

impl Teacher {
    /// Opens `spec`: an `http(s)://` server (then `tokenizer` names its tokenizer, else it is
    /// found from the model id the server reports), or a model (folder, Hub id, alias, GGUF).
    pub fn open(
        spec: &str,
        revision: Option<&str>,
        tokenizer: Option<&str>,
        options: &ServerOptions,
    ) -> anyhow::Result<Self> {
        if !engine::is_server(spec) {
            if let Some(t) = tokenizer {
                anyhow::bail!(
                    "--tokenizer ({t}) applies to server teachers; the teacher {spec} brings its own tokenizer"
                );
            }
            return Ok(Teacher::Local(Checkpoint::open(spec, revision)?));
        }
        if let Some(rev) = revision {
            anyhow::bail!("`revision` ({rev}) applies to Hub models, not to the server teacher {spec}");
        }
        let (runtime, server) = Remote::start(spec, options)?;
        let (tok, name) = match tokenizer {
            Some(t) => model::open_tokenizer(t, None).with_context(|| format!("loading --tokenizer {t}"))?,
            None => model::open_tokenizer(&server.model, None).with_context(|| {
                format!(
                    "the server at {} serves `{}`, and no tokenizer could be found under that name here; pass the teacher's tokenizer with --tokenizer (a folder, GGUF file, alias or Hub repo id)",
                    server.url(),
                    server.model
                )
            })?,
        };
        Ok(Teacher::Remote(Remote::new(runtime, server, tok, &name, options)?))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            Teacher::Local(c) => &c.tokenizer,
            Teacher::Remote(r) => &r.tokenizer,
        }
    }

    /// The context window, when known.
    pub fn max_context(&self) -> Option<usize> {
        match self {
            Teacher::Local(c) => Some(c.config.max_position_embeddings),
            Teacher::Remote(r) => r.server.max_context,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Teacher::Local(c) => c.config.vocab_size,
            Teacher::Remote(r) => r.tokenizer.vocab_size(),
        }
    }

    /// What identifies the teacher in a job's identity: the weights' hash or Hub commit; for a
    /// server, the model it serves and the tokenizer (not its address, so shards may use
    /// different servers of the same model).
    pub fn identity(&self) -> anyhow::Result<Value> {
        Ok(match self {
            Teacher::Local(c) => Value::String(c.fingerprint()?),
            Teacher::Remote(r) => serde_json::json!({
                "server_model": r.server.model,
                "tokenizer": r.tokenizer.vocab_hash(),
            }),
        })
    }

    /// The `teacher` and `teacher_revision` columns.
    pub fn name(&self) -> (String, Option<String>) {
        match self {
            Teacher::Local(c) => (c.id.clone(), c.revision.clone()),
            Teacher::Remote(r) => (r.server.model.clone(), None),
        }
    }

    /// The unit a shard is cut in: whole batches for an in-process teacher, whose batches are
    /// fixed slices of the work list (so a shard samples exactly an unsharded run's batches);
    /// single rows for a server.
    pub fn shard_unit(&self, batch_size: usize) -> u64 {
        match self {
            Teacher::Local(_) => batch_size as u64,
            Teacher::Remote(_) => 1,
        }
    }

    /// The engine, version and model of a server teacher.
    pub fn server_info(&self) -> Option<Value> {
        match self {
            Teacher::Local(_) => None,
            Teacher::Remote(r) => Some(r.server.info()),
        }
    }
}

/// How [`Remote::for_each_in_order`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every request was answered and written.
    All,
    /// Ctrl-C (or SIGTERM): the parts written so far are closed.
    Stopped,
}

impl Remote {
    /// Connects to the server at `url` (its engine, version and model), on a runtime of its own.
    pub fn start(url: &str, options: &ServerOptions) -> anyhow::Result<(tokio::runtime::Runtime, Server)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime for the server teacher")?;
        let server = runtime.block_on(Server::connect(url, options))?;
        Ok((runtime, server))
    }

    /// The connected server, once `tok` (named `name`) is checked to be its tokenizer.
    pub fn new(
        runtime: tokio::runtime::Runtime,
        mut server: Server,
        tok: Tokenizer,
        name: &str,
        options: &ServerOptions,
    ) -> anyhow::Result<Self> {
        runtime.block_on(server.check_tokenizer(&tok, name))?;
        eprintln!(
            "teacher: {} at {} ({}{}), tokenizer {name}",
            server.model,
            server.url(),
            server.engine,
            server.version.as_deref().map(|v| format!(" {v}")).unwrap_or_default()
        );
        Ok(Remote { server, tokenizer: tok, options: options.clone(), runtime })
    }

    /// The teacher's log-prob and top-`k` at every completion token of each `(prompt,
    /// completion)`, at most `concurrency` requests at once, in the order given.
    pub fn score_all(&self, rows: &[(&[u32], &[u32])], k: usize) -> anyhow::Result<Vec<Completion>> {
        let calls = rows.iter().map(|&(prompt, completion)| self.server.score(prompt, completion, k));
        let scored = futures_util::stream::iter(calls).buffered(self.options.concurrency.max(1)).try_collect();
        Ok(self.runtime.block_on(scored)?)
    }

    /// Runs `call` for every request, at most `concurrency` at once, and hands the completions to
    /// `on_row` in request order (a window of finished ones waits behind a slow one), closing
    /// parts of `out` as they fill. Before a part is closed the server must still serve the
    /// model the run started with. On Ctrl-C the open part is closed and the loop ends early.
    pub fn for_each_in_order<'a, R, F, Fut>(
        &'a self,
        requests: impl Iterator<Item = R>,
        call: F,
        out: &mut PartsOutput,
        mut on_row: impl FnMut(&mut PartsOutput, usize, Completion) -> anyhow::Result<()>,
    ) -> anyhow::Result<Ended>
    where
        F: Fn(&'a Server, R) -> Fut,
        Fut: Future<Output = Result<Completion, EngineError>> + 'a,
    {
        let server = &self.server;
        let concurrency = self.options.concurrency.max(1);
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        self.runtime.block_on(async {
            let calls = requests.map(|r| {
                let permits = permits.clone();
                let request = call(server, r);
                async move {
                    let _permit = permits.acquire_owned().await.expect("the semaphore is never closed");
                    request.await
                }
            });
            let mut results = futures_util::stream::iter(calls).buffered(4 * concurrency);
            let mut i = 0;
            loop {
                // Ctrl-C is noticed even while no answer comes (a hung server).
                let next = tokio::select! {
                    r = results.next() => r,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                        if crate::interrupt::requested() {
                            out.end_batch(true)?;
                            return Ok(Ended::Stopped);
                        }
                        continue;
                    }
                };
                let Some(result) = next else { break };
                on_row(out, i, result?)?;
                i += 1;
                let stop = crate::interrupt::requested();
                if out.would_close(stop) {
                    server.check_model().await?;
                }
                out.end_batch(stop)?;
                if stop {
                    return Ok(Ended::Stopped);
                }
            }
            Ok(Ended::All)
        })
    }
}
