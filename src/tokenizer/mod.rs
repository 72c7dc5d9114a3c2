//! The tokenizer a model was trained with: `tokenizer.json` (Hugging Face fast-tokenizer format,
//! read by the `tokenizers` crate) plus what `tokenizer_config.json`, `generation_config.json` and
//! `config.json` say about BOS, EOS and the chat template.
//!
//! BOS policy (as transformers, without its double-BOS pitfall): `encode(text, true)` puts exactly
//! one BOS first when the model wants one (`add_bos_token`, or, when the config is silent, whether
//! `tokenizer.json`'s post-processor adds it), and none extra when the text already starts with the
//! BOS token (chat templates render it themselves). The post-processor itself is never run.

mod chat;
mod gguf;
#[cfg(test)]
mod tests;
mod train;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, TokenizerBuilder,
};

use crate::data::ChatMessage;

/// Special tokens of a tokenizer made by [`Tokenizer::train_bpe`], at ids 0, 1, 2.
const TRAINED_SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "no tokenizer.json in {dir}: kdllm needs the fast-tokenizer file; write one with \
         `AutoTokenizer.from_pretrained(MODEL).save_pretrained(DIR)` in Python"
    )]
    MissingTokenizerJson { dir: PathBuf },
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("cannot parse {path}: {message}; is it a Hugging Face file of that name?")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("tokenizer could not {op}: {message}")]
    Tokenizers { op: &'static str, message: String },
    #[error(
        "this model has no chat template (no `chat_template` in tokenizer_config.json): give the \
         prompt as `prompt` instead of `messages`, or pick a model that has a chat_template"
    )]
    NoChatTemplate,
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("cannot train a BPE tokenizer: {0}")]
    Train(String),
    #[error("GGUF tokenizer: {0}")]
    Gguf(String),
}

/// A loaded tokenizer with its BOS/EOS policy and optional chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    model_max_length: Option<u64>,
    /// `tokenizer_config.json` as read, so that `save` keeps the keys kdllm does not interpret.
    config: Map<String, Value>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` (required) and, when present, `tokenizer_config.json`,
    /// `chat_template.jinja`, `generation_config.json` and `config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self, TokenizerError> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(TokenizerError::MissingTokenizerJson { dir: dir.to_path_buf() });
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| TokenizerError::Parse { path: tok_path.clone(), message: e.to_string() })?;

        let config = match read_json(&dir.join("tokenizer_config.json"))? {
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(TokenizerError::Parse {
                    path: dir.join("tokenizer_config.json"),
                    message: "expected a JSON object".into(),
                })
            }
            None => Map::new(),
        };
        let generation_config = read_json(&dir.join("generation_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;

        // BOS: tokenizer_config's `bos_token` when the key is there (even null); otherwise config.json.
        let bos = if config.contains_key("bos_token") {
            token_string(config.get("bos_token")).and_then(|s| inner.token_to_id(&s).map(|id| (s, id)))
        } else {
            [&generation_config, &model_config]
                .iter()
                .find_map(|c| c.as_ref().and_then(|c| c.get("bos_token_id")).and_then(Value::as_u64))
                .and_then(|id| {
                    let id = u32::try_from(id).ok()?;
                    inner.id_to_token(id).map(|s| (s, id))
                })
        };

        // EOS: the union of tokenizer_config's token and both configs' `eos_token_id`, in that order.
        let eos_token = token_string(config.get("eos_token"));
        let mut eos_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|s| inner.token_to_id(s)) {
            eos_ids.push(id);
        }
        for c in [&generation_config, &model_config].into_iter().flatten() {
            for id in id_list(c.get("eos_token_id")) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let eos_token = eos_token.or_else(|| eos_ids.first().and_then(|&id| inner.id_to_token(id)));

        let add_bos = match config.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b && bos.is_some(),
            None => bos.as_ref().is_some_and(|(_, id)| post_processor_adds_bos(&inner, *id)),
        };

        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => {
                let path = dir.join("chat_template.jinja");
                if path.is_file() {
                    Some(
                        std::fs::read_to_string(&path)
                            .map_err(|e| TokenizerError::Read { path, message: e.to_string() })?,
                    )
                } else {
                    None
                }
            }
        };
        let model_max_length = config.get("model_max_length").and_then(Value::as_u64);

        Ok(Self { inner, bos, eos_token, eos_ids, add_bos, chat_template, model_max_length, config })
    }

    /// Sets the `model_max_length` written by [`save`](Self::save) (the model's context length).
    pub fn with_model_max_length(mut self, n: u64) -> Self {
        self.model_max_length = Some(n);
        self
    }

    /// Token ids of `text`. With `add_special_tokens`, a BOS goes first when the model wants one,
    /// exactly once: none is added when the text already starts with the BOS token.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers { op: "encode", message: e.to_string() })?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, true, Some((bos_str, bos_id))) = (add_special_tokens, self.add_bos, &self.bos) {
            if !text.starts_with(bos_str.as_str()) && ids.first() != Some(bos_id) {
                ids.insert(0, *bos_id);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Tokenizers { op: "decode", message: e.to_string() })
    }

    /// Text of `ids` with special tokens kept (a truncated prompt, BOS and template tokens included).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Tokenizers { op: "decode", message: e.to_string() })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(_, id)| *id)
    }

    /// Every id that ends a generation (deduplicated, tokenizer_config's EOS first).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// SHA-256 (hex) over every (id, token) pair sorted by id, added tokens included: equal for
    /// identical vocabularies, different when any token or id differs.
    pub fn vocab_hash(&self) -> String {
        let mut vocab: Vec<(u32, String)> = self.inner.get_vocab(true).into_iter().map(|(t, id)| (id, t)).collect();
        vocab.sort_unstable();
        let mut h = Sha256::new();
        for (id, token) in &vocab {
            h.update(id.to_le_bytes());
            h.update((token.len() as u64).to_le_bytes());
            h.update(token.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Writes `dir/tokenizer.json` and `dir/tokenizer_config.json`, loadable by transformers'
    /// `AutoTokenizer.from_pretrained(dir)` and by [`from_folder`](Self::from_folder).
    pub fn save(&self, dir: &Path) -> Result<(), TokenizerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| TokenizerError::Write { path: dir.to_path_buf(), message: e.to_string() })?;
        let tok_path = dir.join("tokenizer.json");
        self.inner
            .save(&tok_path, false)
            .map_err(|e| TokenizerError::Write { path: tok_path, message: e.to_string() })?;

        let mut cfg = self.config.clone();
        cfg.remove("auto_map"); // custom Python tokenizer classes do not apply to the fast file
        cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        let bos = self.bos.as_ref().map(|(s, _)| Value::from(s.as_str())).unwrap_or(Value::Null);
        cfg.insert("bos_token".into(), bos);
        cfg.insert("eos_token".into(), self.eos_token.clone().map(Value::from).unwrap_or(Value::Null));
        cfg.insert("add_bos_token".into(), self.add_bos.into());
        match &self.chat_template {
            Some(t) => cfg.insert("chat_template".into(), t.as_str().into()),
            None => cfg.remove("chat_template"),
        };
        match self.model_max_length {
            Some(n) => cfg.insert("model_max_length".into(), n.into()),
            None => cfg.remove("model_max_length"),
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).expect("JSON values serialize");
        std::fs::write(&cfg_path, text).map_err(|e| TokenizerError::Write { path: cfg_path, message: e.to_string() })
    }
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TokenizerError::Read { path: path.into(), message: e.to_string() }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse { path: path.into(), message: e.to_string() })
}

/// A special token in tokenizer_config.json: `"<s>"` or `{"content": "<s>", ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` as an int or a list of ints.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Array(xs)) => xs.iter().filter_map(Value::as_u64).filter_map(|x| u32::try_from(x).ok()).collect(),
        Some(x) => x.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        None => Vec::new(),
    }
}

/// Whether tokenizer.json's post-processor puts `bos` first (what transformers' fast tokenizers
/// do when tokenizer_config.json has no `add_bos_token`).
fn post_processor_adds_bos(tk: &tokenizers::Tokenizer, bos: u32) -> bool {
    let first = |special| tk.encode("a", special).ok().and_then(|e| e.get_ids().first().copied());
    first(true) == Some(bos) && first(false) != Some(bos)
}
