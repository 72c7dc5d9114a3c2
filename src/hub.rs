//! Where a model's files come from: a local folder, an alias, or a Hugging Face Hub repo
//! (downloaded with hf-hub into the standard cache, or read from that cache alone when offline).
//!
//! A resolved model is a folder holding `config.json`, `tokenizer.json`, maybe
//! `tokenizer_config.json` / `generation_config.json`, and safetensors weights
//! (`model.safetensors`, or `model.safetensors.index.json` plus its shards).
//! The Hub token never appears in an error or a log line.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// Short names for the models kdllm is documented with — the one table of them. Users add or
/// override aliases with `KDLLM_ALIASES` or an aliases file (see [`HubOptions::from_env`]).
pub const ALIASES: &[(&str, &str)] = &[
    ("llama", "meta-llama/Llama-3.2-1B-Instruct"),
    ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    ("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
];

const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];

/// A model's files on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The folder holding config.json, tokenizer.json and the weights (a Hub snapshot folder).
    pub dir: PathBuf,
    /// The Hub repo id, or the folder as given for a local model.
    pub id: String,
    /// The commit the Hub snapshot resolved to; `None` for a local folder.
    pub revision: Option<String>,
}

/// How to reach the Hub. Its `Debug` output hides the token.
#[derive(Clone)]
pub struct HubOptions {
    /// The hub cache (the folder holding `models--owner--name`).
    pub cache_dir: PathBuf,
    /// Read the cache only, never the network.
    pub offline: bool,
    pub token: Option<String>,
    /// Another Hub endpoint than https://huggingface.co (a mirror).
    pub endpoint: Option<String>,
    /// The user's aliases (from `KDLLM_ALIASES` and the aliases file); they win over [`ALIASES`].
    pub aliases: Vec<(String, String)>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("endpoint", &self.endpoint)
            .field("aliases", &self.aliases)
            .finish()
    }
}

impl HubOptions {
    /// The options huggingface_hub reads from the environment: cache `HF_HUB_CACHE`, else
    /// `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE` (1/true/yes/on); token
    /// `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else `HF_HOME/token` (what `huggingface-cli login`
    /// writes); `HF_ENDPOINT`. Aliases: the file `KDLLM_ALIASES_FILE`, else
    /// `$XDG_CONFIG_HOME/kdllm/aliases` (else `~/.config/kdllm/aliases`), one `name = owner/repo`
    /// a line, then `KDLLM_ALIASES` (`name=owner/repo,name2=...`), later entries winning.
    pub fn from_env() -> Result<Self, HubError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, HubError> {
        let home = PathBuf::from(var("HOME").or_else(|| var("USERPROFILE")).unwrap_or_else(|| ".".into()));
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache").join("huggingface"));
        let cache_dir = var("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let aliases = user_aliases(&var, &home)?;
        Ok(Self { cache_dir, offline, token, endpoint: var("HF_ENDPOINT"), aliases })
    }

    /// The repo an alias names: the user's aliases first (the last definition wins), then [`ALIASES`].
    pub fn alias(&self, name: &str) -> Option<&str> {
        let user = self.aliases.iter().rev().find(|(a, _)| a == name).map(|(_, r)| r.as_str());
        user.or_else(|| ALIASES.iter().find(|(a, _)| *a == name).map(|(_, r)| *r))
    }

    fn alias_names(&self) -> String {
        let mut names: Vec<&str> = ALIASES.iter().map(|(a, _)| *a).collect();
        names.extend(self.aliases.iter().map(|(a, _)| a.as_str()));
        names.sort_unstable();
        names.dedup();
        names.join(", ")
    }
}

/// The aliases file's entries, then `KDLLM_ALIASES`'s. A missing default file is no error; a
/// missing `KDLLM_ALIASES_FILE` is.
fn user_aliases(var: &impl Fn(&str) -> Option<String>, home: &Path) -> Result<Vec<(String, String)>, HubError> {
    let mut aliases = Vec::new();
    let config_home = var("XDG_CONFIG_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".config"));
    let (file, explicit) = match var("KDLLM_ALIASES_FILE") {
        Some(f) => (PathBuf::from(f), true),
        None => (config_home.join("kdllm").join("aliases"), false),
    };
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let source = file.display().to_string();
            for (i, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if !line.is_empty() {
                    aliases.push(parse_alias(line, &format!("{source} line {}", i + 1))?);
                }
            }
        }
        Err(e) if explicit => {
            return Err(HubError::Aliases { origin: file.display().to_string(), message: e.to_string() })
        }
        Err(_) => {}
    }
    for entry in var("KDLLM_ALIASES").iter().flat_map(|v| v.split(',')).map(str::trim).filter(|e| !e.is_empty()) {
        aliases.push(parse_alias(entry, "KDLLM_ALIASES")?);
    }
    Ok(aliases)
}

/// One `name = owner/repo` (or `name=owner/repo`) alias definition.
fn parse_alias(entry: &str, source: &str) -> Result<(String, String), HubError> {
    let bad = |message: String| HubError::Aliases { origin: source.into(), message };
    let (name, repo) = entry.split_once('=').ok_or_else(|| bad(format!("`{entry}` is not `name = owner/repo`")))?;
    let (name, repo) = (name.trim(), repo.trim());
    if name.is_empty() || name.contains('/') {
        return Err(bad(format!("`{name}` is not a valid alias name (no `/`, not empty)")));
    }
    if !is_repo_id(repo) {
        return Err(bad(format!("`{repo}` is not a Hub repo id (owner/name)")));
    }
    Ok((name.into(), repo.into()))
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("unknown model `{spec}`: not a folder, not a .gguf file, not an alias (known: {known}), not a Hub repo id (owner/name)")]
    UnknownModel { spec: String, known: String },
    #[error("bad alias in {origin}: {message}")]
    Aliases { origin: String, message: String },
    #[error("{} is not a model folder: it has no config.json", dir.display())]
    NotAModelFolder { dir: PathBuf },
    #[error("`revision` ({revision}) applies to Hub models, not to the local folder {}", dir.display())]
    RevisionForFolder { dir: PathBuf, revision: String },
    #[error(
        "{id} has only PyTorch weights (pytorch_model.bin) and kdllm reads safetensors only: convert \
         them with `python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; \
         M.from_pretrained('{id}').save_pretrained('DIR'); T.from_pretrained('{id}').save_pretrained('DIR')\"` \
         and pass DIR as the model"
    )]
    PytorchBinOnly { id: String },
    #[error(
        "{} is a PyTorch pickle checkpoint: kdllm reads safetensors only and never unpickles (loading a \
         pickle can run arbitrary code); convert it with `python -c \"import torch; from safetensors.torch \
         import save_file; sd = torch.load('{}', weights_only=True); save_file({{k: v.contiguous().clone() \
         for k, v in sd.items()}}, 'DIR/model.safetensors')\"`, put the model's config.json and tokenizer.json \
         in DIR and pass DIR as the model",
        path.display(), path.display()
    )]
    PickleFile { path: PathBuf },
    #[error("{id} has no weights: neither model.safetensors nor model.safetensors.index.json in {}", dir.display())]
    NoWeights { id: String, dir: PathBuf },
    #[error(
        "{file} of {repo} (revision {revision}) is not in the Hub cache {} and HF_HUB_OFFLINE is set: \
         fetch it with `huggingface-cli download {repo} --revision {revision}`, or rerun without HF_HUB_OFFLINE=1",
        cache_dir.display()
    )]
    NotCached { repo: String, revision: String, file: String, cache_dir: PathBuf },
    #[error(
        "cannot access {repo}: the repo is gated or private (or does not exist): accept its licence on \
         its Hub page (https://huggingface.co/{repo}) and set HF_TOKEN (or `huggingface-cli login`)"
    )]
    Gated { repo: String },
    #[error("{repo} has no {file} at revision {revision}; check the repo id and `revision`")]
    NotFound { repo: String, revision: String, file: String },
    #[error(
        "cannot download {file} of {repo}: {message}; if the model is already in the Hub cache, \
         rerun with HF_HUB_OFFLINE=1"
    )]
    Network { repo: String, file: String, message: String },
    #[error("cannot download {file} of {repo}: {message}")]
    Download { repo: String, file: String, message: String },
    #[error(transparent)]
    Index(crate::model::llama::ModelError),
}

/// Resolves `spec` — a folder, an alias from [`ALIASES`], or a Hub repo id `owner/name` — to
/// files on disk, downloading what is missing unless `opts.offline`.
pub fn resolve(spec: &str, revision: Option<&str>, opts: &HubOptions) -> Result<ModelFiles, HubError> {
    if let Some(dir) = local_folder(spec, revision)? {
        return resolve_folder(spec, dir);
    }
    let path = Path::new(spec);
    if path.is_file() && is_pickle_file(path) {
        return Err(HubError::PickleFile { path: path.into() });
    }
    resolve_hub(repo_id(spec, opts)?, revision.unwrap_or("main"), opts)
}

/// Like [`resolve`], but for the tokenizer alone (a server teacher's): a folder needs only
/// `tokenizer.json`, and from the Hub only the tokenizer files (and `config.json`, for BOS and
/// EOS) are fetched, never the weights.
pub fn resolve_tokenizer(spec: &str, revision: Option<&str>, opts: &HubOptions) -> Result<ModelFiles, HubError> {
    if let Some(dir) = local_folder(spec, revision)? {
        return Ok(ModelFiles { dir: dir.into(), id: spec.into(), revision: None });
    }
    let repo_id = repo_id(spec, opts)?;
    let mut f = Fetcher::new(repo_id, revision.unwrap_or("main"), opts)?;
    let tokenizer = f.require(REQUIRED[1])?;
    let dir = tokenizer.parent().expect("a cached file lies in a snapshot folder").to_path_buf();
    for file in ["config.json", "chat_template.jinja"].into_iter().chain(OPTIONAL) {
        f.fetch(file)?;
    }
    Ok(ModelFiles { dir, id: repo_id.into(), revision: f.commit })
}

/// `spec` as a local folder, when it is one (a revision applies to Hub repos only).
fn local_folder<'a>(spec: &'a str, revision: Option<&str>) -> Result<Option<&'a Path>, HubError> {
    let path = Path::new(spec);
    if !path.is_dir() {
        return Ok(None);
    }
    match revision {
        Some(rev) => Err(HubError::RevisionForFolder { dir: path.into(), revision: rev.into() }),
        None => Ok(Some(path)),
    }
}

/// The Hub repo an alias or repo id names.
fn repo_id<'a>(spec: &'a str, opts: &'a HubOptions) -> Result<&'a str, HubError> {
    match opts.alias(spec) {
        Some(id) => Ok(id),
        None if is_repo_id(spec) => Ok(spec),
        None => Err(HubError::UnknownModel { spec: spec.into(), known: opts.alias_names() }),
    }
}

fn resolve_folder(spec: &str, dir: &Path) -> Result<ModelFiles, HubError> {
    if !dir.join("config.json").is_file() {
        return Err(HubError::NotAModelFolder { dir: dir.into() });
    }
    let files = ModelFiles { dir: dir.into(), id: spec.into(), revision: None };
    if has_pytorch_bin(dir) && !dir.join(WEIGHTS).is_file() && !dir.join(WEIGHTS_INDEX).is_file() {
        return Err(HubError::PytorchBinOnly { id: spec.into() });
    }
    Ok(files)
}

/// `owner/name` with the characters the Hub allows.
fn is_repo_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '-'])
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split_once('/'), Some((owner, name)) if ok(owner) && ok(name))
}

/// A file with a PyTorch pickle extension (`torch.save`, Lightning, `pickle`).
fn is_pickle_file(path: &Path) -> bool {
    const PICKLE: [&str; 6] = ["pt", "pth", "bin", "ckpt", "pkl", "pickle"];
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| PICKLE.iter().any(|p| e.eq_ignore_ascii_case(p)))
}

fn has_pytorch_bin(dir: &Path) -> bool {
    dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file()
}

/// Fetches the files of one Hub repo into (or finds them in) the cache. Every file after the
/// first comes from the commit the first resolved to, so a moving branch cannot mix snapshots.
struct Fetcher<'a> {
    repo: &'a str,
    revision: &'a str,
    opts: &'a HubOptions,
    api: Option<hf_hub::api::sync::Api>,
    commit: Option<String>,
}

impl<'a> Fetcher<'a> {
    fn new(repo: &'a str, revision: &'a str, opts: &'a HubOptions) -> Result<Self, HubError> {
        let api = if opts.offline {
            None
        } else {
            let mut b = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
                .with_token(opts.token.clone())
                .with_progress(true);
            if let Some(endpoint) = &opts.endpoint {
                b = b.with_endpoint(endpoint.trim_end_matches('/').to_owned());
            }
            Some(b.build().map_err(|e| HubError::Download {
                repo: repo.into(),
                file: "(client setup)".into(),
                message: redact(&e.to_string(), opts),
            })?)
        };
        Ok(Self { repo, revision, opts, api, commit: None })
    }

    fn repo_dir(&self) -> PathBuf {
        self.opts.cache_dir.join(Repo::model(self.repo.to_owned()).folder_name())
    }

    /// The cached copy of `file`: at the pinned commit once there is one, else at `revision`
    /// (a ref name through `refs/`, or a commit hash directly).
    fn cached(&self, file: &str) -> Option<PathBuf> {
        if let Some(commit) = &self.commit {
            let p = self.repo_dir().join("snapshots").join(commit).join(file);
            return p.exists().then_some(p);
        }
        // hf_hub's `CacheRepo::get` does the ref lookup too, but neither trims the ref file nor
        // accepts a commit hash as the revision.
        let repo_dir = self.repo_dir();
        let commit = match std::fs::read_to_string(repo_dir.join("refs").join(self.revision)) {
            Ok(c) => c.trim().to_owned(),
            Err(_) if is_commit_hash(self.revision) => self.revision.to_owned(),
            Err(_) => return None,
        };
        let p = repo_dir.join("snapshots").join(commit).join(file);
        p.exists().then_some(p)
    }

    /// `file`'s path, or `None` when the repo has no such file (online) or the cache lacks it
    /// (offline).
    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, HubError> {
        let path = match (self.cached(file), &self.api) {
            (Some(p), _) => p,
            (None, None) => return Ok(None),
            (None, Some(api)) => {
                let rev = self.commit.as_deref().unwrap_or(self.revision);
                let repo = Repo::with_revision(self.repo.to_owned(), RepoType::Model, rev.to_owned());
                match api.repo(repo).download(file) {
                    Ok(p) => p,
                    Err(e) => match classify(&e) {
                        Failure::Status(404) => return Ok(None),
                        Failure::Status(401 | 403) => return Err(HubError::Gated { repo: self.repo.into() }),
                        failure => return Err(self.download_error(file, &e, failure)),
                    },
                }
            }
        };
        if self.commit.is_none() {
            self.commit = snapshot_commit(&path, file);
        }
        Ok(Some(path))
    }

    fn require(&mut self, file: &str) -> Result<PathBuf, HubError> {
        self.fetch(file)?.ok_or_else(|| self.missing(file))
    }

    fn missing(&self, file: &str) -> HubError {
        let (repo, file) = (self.repo.to_owned(), file.to_owned());
        let revision = self.commit.clone().unwrap_or_else(|| self.revision.to_owned());
        if self.opts.offline {
            HubError::NotCached { repo, revision, file, cache_dir: self.opts.cache_dir.clone() }
        } else {
            HubError::NotFound { repo, revision, file }
        }
    }

    fn download_error(&self, file: &str, e: &ApiError, failure: Failure) -> HubError {
        let (repo, file, message) = (self.repo.to_owned(), file.to_owned(), redact(&e.to_string(), self.opts));
        if failure == Failure::Transport {
            HubError::Network { repo, file, message }
        } else {
            HubError::Download { repo, file, message }
        }
    }

    /// Whether the repo's only weights are PyTorch pickles (only asked once safetensors are missing).
    fn has_only_pytorch_bin(&self, snapshot: &Path) -> bool {
        if has_pytorch_bin(snapshot) {
            return true;
        }
        let Some(api) = &self.api else { return false };
        let rev = self.commit.as_deref().unwrap_or(self.revision);
        let repo = Repo::with_revision(self.repo.to_owned(), RepoType::Model, rev.to_owned());
        api.repo(repo).info().is_ok_and(|info| {
            info.siblings
                .iter()
                .any(|s| s.rfilename == "pytorch_model.bin" || s.rfilename == "pytorch_model.bin.index.json")
        })
    }
}

fn resolve_hub(repo: &str, revision: &str, opts: &HubOptions) -> Result<ModelFiles, HubError> {
    let mut f = Fetcher::new(repo, revision, opts)?;
    let config = f.require(REQUIRED[0])?;
    let dir = config.parent().expect("a cached file lies in a snapshot folder").to_path_buf();
    for file in &REQUIRED[1..] {
        f.require(file)?;
    }
    for file in OPTIONAL {
        f.fetch(file)?;
    }
    if f.fetch(WEIGHTS)?.is_none() {
        match f.fetch(WEIGHTS_INDEX)? {
            Some(index) => {
                for shard in crate::model::llama::shard_names(&index).map_err(HubError::Index)? {
                    f.require(&shard)?;
                }
            }
            None if f.has_only_pytorch_bin(&dir) => return Err(HubError::PytorchBinOnly { id: repo.into() }),
            None if opts.offline => return Err(f.missing(WEIGHTS)),
            None => return Err(HubError::NoWeights { id: repo.into(), dir }),
        }
    }
    Ok(ModelFiles { dir, id: repo.into(), revision: f.commit })
}

/// The commit of a cached file's snapshot: `.../snapshots/<commit>/<file>`.
fn snapshot_commit(path: &Path, file: &str) -> Option<String> {
    let mut dir = path;
    for _ in Path::new(file).components() {
        dir = dir.parent()?;
    }
    dir.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The server answered with this HTTP status.
    Status(u16),
    /// No answer: DNS, connection, TLS, proxy.
    Transport,
    Other,
}

/// What kind of failure an hf-hub error is.
fn classify(e: &ApiError) -> Failure {
    match e {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(code, _) => Failure::Status(*code),
            ureq::Error::Transport(_) => Failure::Transport,
        },
        ApiError::TooManyRetries(inner) => classify(inner),
        _ => Failure::Other,
    }
}

/// Belt and braces: hf-hub sends the token in a header only, but no message may ever carry it.
fn redact(message: &str, opts: &HubOptions) -> String {
    match opts.token.as_deref() {
        Some(t) if !t.is_empty() => message.replace(t, "<token>"),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba98";

    /// A Hub cache as huggingface_hub lays it out, with `repo` at `COMMIT` behind `refs/main`.
    fn fake_cache(repo: &str, files: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().unwrap();
        let repo_dir = cache.path().join(format!("models--{}", repo.replace('/', "--")));
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
        let snap = repo_dir.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        (cache, snap)
    }

    fn offline(cache: &Path) -> HubOptions {
        HubOptions {
            cache_dir: cache.into(),
            offline: true,
            token: Some("hf_SECRET".into()),
            endpoint: None,
            aliases: Vec::new(),
        }
    }

    const BASIC: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

    #[test]
    fn offline_resolves_a_repo_id_from_the_cache() {
        let (cache, snap) = fake_cache("owner/name", &BASIC);
        let files = resolve("owner/name", None, &offline(cache.path())).unwrap();
        assert_eq!(files, ModelFiles { dir: snap.clone(), id: "owner/name".into(), revision: Some(COMMIT.into()) });
        assert_eq!(crate::model::llama::weight_files(&files.dir).unwrap(), vec![snap.join("model.safetensors")]);
    }

    #[test]
    fn offline_revision_as_commit_hash_and_as_ref_name() {
        let (cache, snap) = fake_cache("owner/name", &BASIC);
        let opts = offline(cache.path());
        let by_hash = resolve("owner/name", Some(COMMIT), &opts).unwrap();
        assert_eq!((by_hash.dir.as_path(), by_hash.revision.as_deref()), (snap.as_path(), Some(COMMIT)));

        let repo_dir = cache.path().join("models--owner--name");
        std::fs::write(repo_dir.join("refs/v1.0"), format!("{OTHER}\n")).unwrap();
        let other = repo_dir.join("snapshots").join(OTHER);
        std::fs::create_dir_all(&other).unwrap();
        for f in BASIC {
            std::fs::write(other.join(f), "{}").unwrap();
        }
        let by_ref = resolve("owner/name", Some("v1.0"), &opts).unwrap();
        assert_eq!((by_ref.dir, by_ref.revision.as_deref()), (other, Some(OTHER)));
    }

    #[test]
    fn offline_sharded_weights_need_every_shard() {
        let (cache, snap) = fake_cache("owner/name", &["config.json", "tokenizer.json"]);
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00002-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;
        std::fs::write(snap.join(WEIGHTS_INDEX), index).unwrap();
        std::fs::write(snap.join("model-00001-of-00002.safetensors"), "x").unwrap();
        let err = resolve("owner/name", None, &offline(cache.path())).unwrap_err().to_string();
        assert!(err.starts_with("model-00002-of-00002.safetensors of owner/name"), "{err}");

        std::fs::write(snap.join("model-00002-of-00002.safetensors"), "x").unwrap();
        let files = resolve("owner/name", None, &offline(cache.path())).unwrap();
        let names: Vec<_> = crate::model::llama::weight_files(&files.dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    }

    #[test]
    fn offline_missing_file_names_repo_revision_file_cache_and_command() {
        let (cache, _) = fake_cache("owner/name", &["config.json", "model.safetensors"]);
        let err = resolve("owner/name", None, &offline(cache.path())).unwrap_err().to_string();
        for part in [
            "tokenizer.json",
            "owner/name",
            COMMIT,
            &cache.path().display().to_string(),
            &format!("huggingface-cli download owner/name --revision {COMMIT}"),
            "HF_HUB_OFFLINE=1",
        ] {
            assert!(err.contains(part), "`{part}` missing from: {err}");
        }
        assert!(!err.contains("hf_SECRET"));

        let err = resolve("owner/other", Some("dev"), &offline(cache.path())).unwrap_err().to_string();
        assert!(err.starts_with("config.json of owner/other (revision dev)"), "{err}");
        assert!(err.contains("huggingface-cli download owner/other --revision dev"), "{err}");
    }

    #[test]
    fn alias_resolves_to_its_repo() {
        let (cache, snap) = fake_cache("HuggingFaceTB/SmolLM2-135M-Instruct", &BASIC);
        let files = resolve("smollm2", None, &offline(cache.path())).unwrap();
        assert_eq!((files.dir, files.id.as_str()), (snap, "HuggingFaceTB/SmolLM2-135M-Instruct"));
    }

    #[test]
    fn unknown_model_lists_the_aliases() {
        let cache = tempfile::tempdir().unwrap();
        let err = resolve("not-a-model", None, &offline(cache.path())).unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown model `not-a-model`: not a folder, not a .gguf file, not an alias (known: llama, \
             smollm2, smollm2-360m, tinyllama), not a Hub repo id (owner/name)"
        );
        for bad in ["a/b/c", "/x", "owner/", "owner/na me"] {
            assert!(matches!(resolve(bad, None, &offline(cache.path())), Err(HubError::UnknownModel { .. })), "{bad}");
        }
    }

    #[test]
    fn local_folder_resolves_as_is() {
        let dir = tempfile::tempdir().unwrap();
        for f in BASIC {
            std::fs::write(dir.path().join(f), "{}").unwrap();
        }
        let spec = dir.path().to_str().unwrap();
        let files = resolve(spec, None, &offline(Path::new("/nonexistent"))).unwrap();
        assert_eq!(files, ModelFiles { dir: dir.path().into(), id: spec.into(), revision: None });

        let err = resolve(spec, Some("main"), &offline(Path::new("/nonexistent"))).unwrap_err().to_string();
        assert!(err.contains("`revision` (main) applies to Hub models"), "{err}");
    }

    #[test]
    fn folder_without_config_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve(dir.path().to_str().unwrap(), None, &offline(dir.path())).unwrap_err().to_string();
        assert_eq!(err, format!("{} is not a model folder: it has no config.json", dir.path().display()));
    }

    #[test]
    fn pytorch_bin_only_is_refused_with_a_conversion_hint() {
        let (cache, _) = fake_cache("owner/name", &["config.json", "tokenizer.json", "pytorch_model.bin"]);
        let err = resolve("owner/name", None, &offline(cache.path())).unwrap_err().to_string();
        assert!(err.contains("only PyTorch weights") && err.contains("save_pretrained"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "pytorch_model.bin"] {
            std::fs::write(dir.path().join(f), "{}").unwrap();
        }
        let err = resolve(dir.path().to_str().unwrap(), None, &offline(dir.path())).unwrap_err();
        assert!(matches!(err, HubError::PytorchBinOnly { .. }), "{err}");
    }

    #[test]
    fn a_pickle_file_is_refused_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["model.pt", "weights.PTH", "pytorch_model.bin", "last.ckpt", "state.pkl"] {
            let path = dir.path().join(name);
            std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
            let err = resolve(path.to_str().unwrap(), None, &offline(dir.path())).unwrap_err();
            assert!(matches!(err, HubError::PickleFile { .. }), "{name}: {err}");
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains("safetensors only") && msg.contains("save_file"), "{msg}");
        }
        // A folder named like a pickle is still a folder.
        let folder = dir.path().join("ckpt.bin");
        std::fs::create_dir(&folder).unwrap();
        let err = resolve(folder.to_str().unwrap(), None, &offline(dir.path())).unwrap_err();
        assert!(matches!(err, HubError::NotAModelFolder { .. }), "{err}");
    }

    #[test]
    fn options_follow_huggingface_hub_env_rules() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_fromfile\n").unwrap();
        let home_s = home.path().to_str().unwrap().to_owned();
        let env = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            HubOptions::from_lookup(move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).unwrap()
        };
        let o = env(&[("HOME", "/h")]);
        assert_eq!(o.cache_dir, Path::new("/h/.cache/huggingface/hub"));
        assert!(!o.offline && o.endpoint.is_none());

        let o = env(&[("HF_HOME", &home_s), ("HF_HUB_OFFLINE", "YES")]);
        assert_eq!(o.cache_dir, home.path().join("hub"));
        assert_eq!((o.offline, o.token.as_deref()), (true, Some("hf_fromfile")));
        assert!(!format!("{o:?}").contains("hf_fromfile"), "Debug hides the token");

        let o = env(&[("HF_HOME", &home_s), ("HF_HUB_CACHE", "/c"), ("HF_TOKEN", "hf_env"), ("HF_HUB_OFFLINE", "0")]);
        assert_eq!((o.cache_dir.as_path(), o.offline, o.token.as_deref()), (Path::new("/c"), false, Some("hf_env")));
        for v in ["1", "true", "On"] {
            assert!(env(&[("HF_HUB_OFFLINE", v)]).offline, "{v}");
        }
    }

    #[test]
    fn user_aliases_override_and_extend_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aliases");
        std::fs::write(&file, "# mine\nllama = meta-llama/Llama-3.1-8B-Instruct\ntiny=owner/tiny  # a comment\n")
            .unwrap();
        let file_s = file.to_str().unwrap().to_owned();
        let env = |pairs: Vec<(&'static str, String)>| {
            HubOptions::from_lookup(move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        };
        let o =
            env(vec![("KDLLM_ALIASES_FILE", file_s.clone()), ("KDLLM_ALIASES", "tiny=owner/other".into())]).unwrap();
        assert_eq!(o.alias("llama"), Some("meta-llama/Llama-3.1-8B-Instruct"));
        assert_eq!(o.alias("tiny"), Some("owner/other"), "the environment wins over the file");
        assert_eq!(o.alias("smollm2"), Some("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(o.alias_names().contains("tiny"));

        // An XDG aliases file is read when present; a missing one is fine.
        let xdg = env(vec![("XDG_CONFIG_HOME", dir.path().join("none").to_str().unwrap().into())]).unwrap();
        assert_eq!(xdg.alias("llama"), Some("meta-llama/Llama-3.2-1B-Instruct"));

        std::fs::write(&file, "ok = a/b\nbroken line\n").unwrap();
        let err = env(vec![("KDLLM_ALIASES_FILE", file_s.clone())]).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("`broken line` is not `name = owner/repo`"), "{err}");
        let err = env(vec![("KDLLM_ALIASES", "x=not a repo".into())]).unwrap_err().to_string();
        assert!(err.contains("KDLLM_ALIASES") && err.contains("not a Hub repo id"), "{err}");
        let err = env(vec![("KDLLM_ALIASES_FILE", "/nonexistent/aliases".into())]).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/aliases"), "{err}");
    }

    #[test]
    fn redact_hides_the_token() {
        let opts = offline(Path::new("/c"));
        assert_eq!(redact("Bearer hf_SECRET failed", &opts), "Bearer <token> failed");
    }
}
