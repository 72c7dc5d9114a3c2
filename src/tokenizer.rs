//! The tokenizer a model was trained with: `tokenizer.json` (Hugging Face fast-tokenizer format,
//! read by the `tokenizers` crate) plus what `tokenizer_config.json`, `generation_config.json` and
//! `config.json` say about BOS, EOS and the chat template.
//!
//! BOS policy (as transformers, without its double-BOS pitfall): `encode(text, true)` puts exactly
//! one BOS first when the model wants one (`add_bos_token`, or, when the config is silent, whether
//! `tokenizer.json`'s post-processor adds it), and none extra when the text already starts with the
//! BOS token (chat templates render it themselves). The post-processor itself is never run.

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
use crate::model::gguf::Meta;

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

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` does.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let source = self.chat_template.as_deref().ok_or(TokenizerError::NoChatTemplate)?;
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.set_unknown_method_callback(python_string_methods);
        let template = env.template_from_str(source).map_err(|e| TokenizerError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            bos_token => self.bos.as_ref().map(|(s, _)| s.as_str()).unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
            add_generation_prompt => true,
        };
        template.render(ctx).map_err(|e| TokenizerError::Template(e.to_string()))
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

    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata, as llama.cpp's
    /// converter writes it and llama.cpp tokenizes: byte-level BPE (`tokenizer.ggml.model` =
    /// `gpt2`, pre-tokenized as `tokenizer.ggml.pre` says) or SentencePiece BPE (`llama`, with
    /// byte fallback). Control and unknown tokens become special added tokens (skipped on
    /// decode), user-defined ones plain added tokens matched on the raw text, as llama.cpp does.
    pub fn from_gguf(metadata: &HashMap<String, gguf_file::Value>) -> Result<Self, TokenizerError> {
        let meta = Meta(metadata);
        let missing = |key: &str| TokenizerError::Gguf(format!("missing metadata key `{key}`"));
        let tokens = meta
            .str_array("tokenizer.ggml.tokens")
            .map_err(TokenizerError::Gguf)?
            .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
        let types = meta.int_array("tokenizer.ggml.token_type").map_err(TokenizerError::Gguf)?.unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(TokenizerError::Gguf(format!(
                "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut vocab = Vocab::default();
        for (id, token) in tokens.iter().enumerate() {
            // A duplicated string keeps its first id, as the Hugging Face vocab it came from did.
            vocab.entry((*token).to_owned()).or_insert(id as u32);
        }
        let model = meta.str("tokenizer.ggml.model").map_err(TokenizerError::Gguf)?;
        let (mut inner, add_bos_default) = match model.ok_or_else(|| missing("tokenizer.ggml.model"))? {
            "gpt2" => gguf_byte_level_bpe(&meta, vocab)?,
            "llama" => gguf_sentencepiece(&meta, &tokens, vocab)?,
            other => {
                let supported = "gpt2 (byte-level BPE), llama (SentencePiece)";
                return Err(TokenizerError::Gguf(format!(
                    "tokenizer model `{other}` is not supported; supported: {supported}"
                )));
            }
        };
        // llama.cpp's token types: 2 unknown, 3 control, 4 user-defined.
        let (mut special, mut user) = (Vec::new(), Vec::new());
        for (id, ty) in types.iter().enumerate() {
            match ty {
                2 | 3 => special.push(AddedToken::from(tokens[id], true)),
                4 => user.push(AddedToken::from(tokens[id], false).normalized(false)),
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let token_at = |key: &str| -> Result<Option<(String, u32)>, TokenizerError> {
            let Some(id) = meta.u64(key).map_err(TokenizerError::Gguf)? else { return Ok(None) };
            match tokens.get(id as usize) {
                Some(t) => Ok(Some(((*t).to_owned(), id as u32))),
                None => Err(TokenizerError::Gguf(format!(
                    "`{key}` = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
            }
        };
        let bos = token_at("tokenizer.ggml.bos_token_id")?;
        let eos = token_at("tokenizer.ggml.eos_token_id")?;
        // llama.cpp ends generation on EOS, end-of-turn and end-of-message alike.
        let mut eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some((_, id)) = token_at(key)? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let add_bos = match meta.bool("tokenizer.ggml.add_bos_token").map_err(TokenizerError::Gguf)? {
            Some(true) if bos.is_none() => {
                return Err(TokenizerError::Gguf(
                    "`tokenizer.ggml.add_bos_token` is true but there is no `tokenizer.ggml.bos_token_id`".into(),
                ))
            }
            Some(b) => b,
            None => add_bos_default && bos.is_some(),
        };
        if let (true, Some((bos_str, bos_id))) = (add_bos, &bos) {
            // Only for the saved tokenizer.json: transformers' fast tokenizers add BOS through it.
            let post = TemplateProcessing::builder()
                .try_single(vec![bos_str.clone(), "$A".into()])
                .and_then(|b| b.try_pair(vec![bos_str.clone(), "$A".into(), format!("{bos_str}:1"), "$B:1".into()]))
                .map_err(|e| TokenizerError::Gguf(format!("BOS template: {e}")))?
                .special_tokens(vec![(bos_str.clone(), *bos_id)])
                .build()
                .map_err(|e| TokenizerError::Gguf(format!("BOS template: {e}")))?;
            inner.with_post_processor(Some(post));
        }

        let mut config = Map::new();
        for (field, key) in
            [("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id")]
        {
            if let Some((token, _)) = token_at(key)? {
                config.insert(field.into(), token.into());
            }
        }
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        let chat_template = meta.str("tokenizer.chat_template").map_err(TokenizerError::Gguf)?.map(str::to_owned);
        Ok(Self {
            inner,
            eos_token: eos.map(|(s, _)| s),
            bos,
            eos_ids,
            add_bos,
            chat_template,
            model_max_length: None,
            config,
        })
    }

    /// Trains a byte-level BPE on `texts`: digits are split one per token, every byte is in the
    /// vocabulary (so `decode(encode(x)) == x`), `<unk>`=0, `<s>`=1 (BOS, added), `</s>`=2 (EOS).
    /// Deterministic for the same input.
    pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<Self, TokenizerError> {
        let alphabet = ByteLevel::alphabet();
        let min = TRAINED_SPECIALS.len() + alphabet.len();
        if vocab_size < min {
            return Err(TokenizerError::Train(format!(
                "`vocab_size` must be >= {min} (3 special tokens + 256 bytes), got {vocab_size}"
            )));
        }
        let specials: Vec<AddedToken> = TRAINED_SPECIALS.iter().map(|t| AddedToken::from(*t, true)).collect();
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(alphabet.into_iter().collect::<HashSet<char>>())
            .build();
        let pre_tokenizer = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
        let post_processor = TemplateProcessing::builder()
            .try_single("<s> $A")
            .and_then(|b| b.try_pair("<s> $A <s>:1 $B:1"))
            .map_err(|e| TokenizerError::Train(e.to_string()))?
            .special_tokens(vec![("<s>", 1u32)])
            .build()
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        let mut tk =
            TokenizerBuilder::<BPE, tokenizers::NormalizerWrapper, Sequence, TemplateProcessing, ByteLevel>::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(pre_tokenizer))
                .with_post_processor(Some(post_processor))
                .with_decoder(Some(ByteLevel::default()))
                .build()
                .map_err(|e| TokenizerError::Train(e.to_string()))?;
        tk.train(&mut trainer, texts.iter()).map_err(|e| TokenizerError::Train(e.to_string()))?;
        let inner: tokenizers::Tokenizer = tk.into();

        for (want, t) in TRAINED_SPECIALS.iter().enumerate() {
            if inner.token_to_id(t) != Some(want as u32) {
                return Err(TokenizerError::Train(format!("`{t}` did not get id {want}")));
            }
        }
        let mut config = Map::new();
        config.insert("unk_token".into(), "<unk>".into());
        config.insert("clean_up_tokenization_spaces".into(), false.into());
        Ok(Self {
            inner,
            bos: Some(("<s>".into(), 1)),
            eos_token: Some("</s>".into()),
            eos_ids: vec![2],
            add_bos: true,
            chat_template: None,
            model_max_length: None,
            config,
        })
    }
}

/// The byte-level BPE of a `gpt2` GGUF tokenizer, and whether llama.cpp adds BOS by default.
fn gguf_byte_level_bpe(meta: &Meta, vocab: Vocab) -> Result<(tokenizers::Tokenizer, bool), TokenizerError> {
    // llama.cpp reads a missing `pre` as `default` (with a warning).
    let pre_name = meta.str("tokenizer.ggml.pre").map_err(TokenizerError::Gguf)?.unwrap_or("default");
    let pre = GgufPre::from_name(pre_name)?;
    let merges = meta
        .str_array("tokenizer.ggml.merges")
        .map_err(TokenizerError::Gguf)?
        .ok_or_else(|| TokenizerError::Gguf("missing metadata key `tokenizer.ggml.merges`".into()))?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
                TokenizerError::Gguf(format!("merge `{m}` in `tokenizer.ggml.merges` is not two tokens"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Gguf(format!("cannot build the BPE model: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_normalizer(pre.normalizer);
    tk.with_pre_tokenizer(Some(pre.pre_tokenizer));
    tk.with_decoder(Some(ByteLevel::default()));
    Ok((tk, pre.add_bos_default))
}

/// A SentencePiece BPE (`llama` GGUF tokenizer) as transformers' `LlamaTokenizerFast` (legacy)
/// builds it: merges ranked by the merged piece's score, byte fallback to `<0xXX>` tokens, spaces
/// as `▁` with one prepended to each text fragment when `tokenizer.ggml.add_space_prefix` (default
/// true), as llama.cpp does. llama.cpp adds BOS by default for these.
fn gguf_sentencepiece(
    meta: &Meta,
    tokens: &[&str],
    vocab: Vocab,
) -> Result<(tokenizers::Tokenizer, bool), TokenizerError> {
    let scores = meta
        .f32_array("tokenizer.ggml.scores")
        .map_err(TokenizerError::Gguf)?
        .ok_or_else(|| TokenizerError::Gguf("missing metadata key `tokenizer.ggml.scores`".into()))?;
    if scores.len() != tokens.len() {
        return Err(TokenizerError::Gguf(format!(
            "`tokenizer.ggml.scores` has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let merges = merges_from_scores(tokens, &scores, &vocab);
    let unk = match meta.u64("tokenizer.ggml.unknown_token_id").map_err(TokenizerError::Gguf)? {
        Some(id) => tokens.get(id as usize).map(|t| t.to_string()),
        None => vocab.contains_key("<unk>").then(|| "<unk>".to_string()),
    };
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| TokenizerError::Gguf(format!("cannot build the BPE model: {e}")))?;
    let space_prefix = meta.bool("tokenizer.ggml.add_space_prefix").map_err(TokenizerError::Gguf)?.unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| TokenizerError::Gguf(format!("SentencePiece normalizer: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> =
        vec![replace("▁", " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok((tk, true))
}

/// BPE merges from SentencePiece scores, as transformers' `SentencePieceExtractor` derives them:
/// every split of a piece into two pieces of the vocabulary, ranked by the whole piece's score
/// (higher first), ties in vocabulary order.
fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let start = merges.len();
        for (i, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(i);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push((score, l, r, left, right));
            }
        }
        merges[start..].sort_by_key(|&(_, l, r, _, _)| (l, r));
    }
    // Stable: equal scores keep the order above.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, _, _, l, r)| (l.to_owned(), r.to_owned())).collect()
}

/// GPT-2's split: contractions, letters, digits, other symbols, whitespace (tokenizers' ByteLevel regex).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split, as in its tokenizer.json: case-insensitive contractions, numbers of up to 3 digits.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split, as in its tokenizer.json: Llama 3's with single digits.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's fallback for `default`: these regexes applied in turn, each splitting the last's pieces.
const DEFAULT_PATTERNS: [&str; 4] = [r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"];

/// How to pre-tokenize for a `tokenizer.ggml.pre` value: the pre-tokenizer of the Hugging Face
/// tokenizer.json that llama.cpp's converter recognised (its `llama-vocab.cpp` regexes agree).
struct GgufPre {
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: PreTokenizerWrapper,
    ignore_merges: bool,
    /// BOS when the file has no `tokenizer.ggml.add_bos_token`, as llama.cpp decides it.
    add_bos_default: bool,
}

impl GgufPre {
    const SUPPORTED: &'static str = "default, gpt-2, smollm, llama-bpe (llama3, llama-v3), qwen2";

    fn from_name(name: &str) -> Result<Self, TokenizerError> {
        let split = |pattern: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map(Into::into)
                .map_err(|e| TokenizerError::Gguf(format!("pre-tokenizer regex: {e}")))
        };
        // Splits first, then bytes to characters; the ByteLevel regex is off when a Split did the work.
        let bytes_only = || ByteLevel::new(false, true, false).into();
        let plain = |pre_tokenizer: PreTokenizerWrapper| GgufPre {
            normalizer: None,
            pre_tokenizer,
            ignore_merges: false,
            add_bos_default: false,
        };
        Ok(match name {
            "gpt-2" => plain(ByteLevel::new(false, true, true).into()),
            // SmolLM's tokenizer.json: each digit alone, then GPT-2's split.
            "smollm" => {
                plain(Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into())
            }
            "default" => {
                let mut steps = DEFAULT_PATTERNS.iter().map(|p| split(p)).collect::<Result<Vec<_>, _>>()?;
                steps.push(bytes_only());
                plain(Sequence::new(steps).into())
            }
            "llama-bpe" | "llama3" | "llama-v3" => GgufPre {
                normalizer: None,
                pre_tokenizer: Sequence::new(vec![split(LLAMA3_PATTERN)?, bytes_only()]).into(),
                ignore_merges: true,
                add_bos_default: true,
            },
            "qwen2" => GgufPre {
                normalizer: Some(NFC.into()),
                pre_tokenizer: Sequence::new(vec![split(QWEN2_PATTERN)?, bytes_only()]).into(),
                ignore_merges: false,
                add_bos_default: false,
            },
            other => {
                return Err(TokenizerError::Gguf(format!(
                    "pre-tokenizer `{other}` (`tokenizer.ggml.pre`) is not supported; supported: {}",
                    Self::SUPPORTED
                )))
            }
        })
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

/// The Python `str` methods chat templates call (`message.content.strip()` and the like).
fn python_string_methods(
    _state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> Result<minijinja::Value, minijinja::Error> {
    use minijinja::{Error, ErrorKind, Value as V};
    let s = value.as_str().ok_or_else(|| Error::from(ErrorKind::UnknownMethod))?;
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str());
    let chars = |i: usize| arg(i).map(|c| c.chars().collect::<Vec<_>>());
    Ok(match method {
        "strip" => V::from(match chars(0) {
            Some(cs) => s.trim_matches(cs.as_slice()),
            None => s.trim(),
        }),
        "lstrip" => V::from(match chars(0) {
            Some(cs) => s.trim_start_matches(cs.as_slice()),
            None => s.trim_start(),
        }),
        "rstrip" => V::from(match chars(0) {
            Some(cs) => s.trim_end_matches(cs.as_slice()),
            None => s.trim_end(),
        }),
        "startswith" => V::from(arg(0).is_some_and(|p| s.starts_with(p))),
        "endswith" => V::from(arg(0).is_some_and(|p| s.ends_with(p))),
        "upper" => V::from(s.to_uppercase()),
        "lower" => V::from(s.to_lowercase()),
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let mut v = vec![
            "Once upon a time, there was a little girl named Lily.".to_string(),
            "She loved to play outside in the park!".to_string(),
            "Question: what is 123+45? Answer: 123+45=168.".to_string(),
            "Tabs\tand\nnewlines, ünïcödé, 日本語, emoji 🙂.".to_string(),
        ];
        for i in 0..200 {
            v.push(format!("{i} + {} = {}. The cat sat on the mat.", i * 7, i * 8));
        }
        v
    }

    /// A trained tokenizer saved with `template` as its `chat_template`, then loaded back.
    fn with_chat_template(template: Value) -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        Tokenizer::train_bpe(&corpus(), 400).unwrap().save(dir.path()).unwrap();
        let cfg_path = dir.path().join("tokenizer_config.json");
        let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["chat_template"] = template;
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let tk = Tokenizer::from_folder(dir.path()).unwrap();
        (dir, tk)
    }

    fn chat(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(r, c)| ChatMessage { role: r.to_string(), content: c.to_string() }).collect()
    }

    fn shared_dir() -> PathBuf {
        std::env::var_os("KDLLM_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"))
    }

    #[test]
    fn train_bpe_round_trips_varied_text() {
        let tk = Tokenizer::train_bpe(&corpus(), 400).unwrap();
        assert!(tk.vocab_size() <= 400 && tk.vocab_size() > 259, "{}", tk.vocab_size());
        for text in [
            "Once upon a time",
            "  leading spaces and trailing  ",
            "123+45=168",
            "never seen: Ωμέγα ✓ \u{1F980} \r\n\0",
            "",
        ] {
            let ids = tk.encode(text, false).unwrap();
            assert_eq!(tk.decode(&ids).unwrap(), text);
            let with_bos = tk.encode(text, true).unwrap();
            assert_eq!(with_bos[0], 1);
            assert_eq!(tk.decode(&with_bos).unwrap(), text, "BOS is skipped on decode");
        }
        assert_eq!((tk.bos_id(), tk.eos_ids()), (Some(1), &[2u32][..]));
        assert!(!tk.has_chat_template());
    }

    #[test]
    fn train_bpe_splits_every_digit() {
        let tk = Tokenizer::train_bpe(&corpus(), 400).unwrap();
        let ids = tk.encode("123+45=", false).unwrap();
        assert_eq!(ids.len(), 7, "one token per character: {ids:?}");
        for (id, ch) in ids.iter().zip("123+45=".chars()) {
            assert_eq!(tk.decode(&[*id]).unwrap(), ch.to_string());
        }
        assert_eq!(ids[0], tk.encode("1", false).unwrap()[0]);
    }

    #[test]
    fn train_bpe_is_deterministic() {
        let a = Tokenizer::train_bpe(&corpus(), 270).unwrap();
        let b = Tokenizer::train_bpe(&corpus(), 270).unwrap();
        assert_eq!(a.vocab_hash(), b.vocab_hash());
        let c = Tokenizer::train_bpe(&corpus(), 271).unwrap();
        assert_eq!((a.vocab_size(), c.vocab_size()), (270, 271));
        assert_ne!(a.vocab_hash(), c.vocab_hash(), "one more token changes the hash");
    }

    #[test]
    fn train_bpe_rejects_a_vocab_smaller_than_the_bytes() {
        let err = Tokenizer::train_bpe(&corpus(), 100).unwrap_err().to_string();
        assert!(err.contains("`vocab_size` must be >= 259"), "{err}");
    }

    #[test]
    fn save_then_from_folder_keeps_ids_bos_eos_and_hash() {
        let tk = Tokenizer::train_bpe(&corpus(), 400).unwrap().with_model_max_length(256);
        let dir = tempfile::tempdir().unwrap();
        tk.save(dir.path()).unwrap();
        let back = Tokenizer::from_folder(dir.path()).unwrap();
        assert_eq!(back.vocab_hash(), tk.vocab_hash());
        assert_eq!((back.bos_id(), back.eos_ids()), (Some(1), &[2u32][..]));
        let text = "Once upon a time 123+45=168";
        assert_eq!(back.encode(text, true).unwrap(), tk.encode(text, true).unwrap());
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(cfg["bos_token"], "<s>");
        assert_eq!(cfg["eos_token"], "</s>");
        assert_eq!(cfg["add_bos_token"], true);
        assert_eq!(cfg["model_max_length"], 256);
        assert!(cfg.get("chat_template").is_none());
    }

    #[test]
    fn vocab_hash_differs_when_one_token_differs() {
        let tk = Tokenizer::train_bpe(&corpus(), 400).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tk.save(dir.path()).unwrap();
        let path = dir.path().join("tokenizer.json");
        let text = std::fs::read_to_string(&path).unwrap();
        // Rename the added EOS token: same ids, one different string.
        std::fs::write(&path, text.replace("\"</s>\"", "\"<eos>\"")).unwrap();
        let other = Tokenizer::from_folder(dir.path()).unwrap();
        assert_ne!(other.vocab_hash(), tk.vocab_hash());
    }

    #[test]
    fn bos_is_added_exactly_once() {
        let tk = Tokenizer::train_bpe(&corpus(), 400).unwrap();
        let plain = tk.encode("Once upon a time", false).unwrap();
        let with = tk.encode("Once upon a time", true).unwrap();
        assert_eq!(with, [&[1u32][..], &plain[..]].concat());
        let rendered = tk.encode("<s>Once upon a time", true).unwrap();
        assert_eq!(rendered, with, "text starting with <s> gets no second BOS");
        assert_eq!(tk.encode("<s>Once upon a time", false).unwrap(), with);
    }

    #[test]
    fn render_chat_with_a_chatml_template() {
        let (_dir, tk) = with_chat_template(Value::from(
            "{{ bos_token }}{% for m in messages %}\
             {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\
             <|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n\
             {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ));
        assert!(tk.has_chat_template());
        let out = tk.render_chat(&chat(&[("system", "Be brief."), ("user", "  2+2?  ")])).unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tk.encode(&out, true).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 1, "rendered BOS is not doubled");

        let err = tk.render_chat(&chat(&[("tool", "x")])).unwrap_err().to_string();
        assert!(err.starts_with("chat template failed") && err.contains("bad role tool"), "{err}");
    }

    #[test]
    fn templates_may_break_out_of_loops_and_use_tojson() {
        let (_dir, tk) = with_chat_template(Value::from(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content | tojson }}{% endfor %}",
        ));
        assert_eq!(tk.render_chat(&chat(&[("user", "say \"hi\""), ("user", "dropped")])).unwrap(), r#""say \"hi\"""#);
    }

    #[test]
    fn chat_template_list_form_takes_default_and_syntax_errors_are_shown() {
        let (_dir, tk) = with_chat_template(serde_json::json!([
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"},
        ]));
        assert_eq!(tk.render_chat(&chat(&[("user", "hi")])).unwrap(), "[hi]");

        let (_dir, bad) = with_chat_template(Value::from("{% for m in messages %}{{ m.content }"));
        let err = bad.render_chat(&chat(&[("user", "hi")])).unwrap_err().to_string();
        assert!(err.starts_with("chat template failed: syntax error"), "{err}");
    }

    #[test]
    fn no_chat_template_says_to_use_prompt() {
        let tk = Tokenizer::train_bpe(&corpus(), 270).unwrap();
        let err = tk.render_chat(&chat(&[("user", "hi")])).unwrap_err().to_string();
        assert!(err.contains("`prompt` instead of `messages`") && err.contains("chat_template"), "{err}");
    }

    #[test]
    fn eos_ids_are_the_union_of_all_configs() {
        let tk = Tokenizer::train_bpe(&corpus(), 400).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tk.save(dir.path()).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [2, 7]}"#).unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": 9}"#).unwrap();
        let tk = Tokenizer::from_folder(dir.path()).unwrap();
        assert_eq!(tk.eos_ids(), &[2, 7, 9]);
    }

    #[test]
    fn missing_tokenizer_json_names_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no tokenizer.json in") && err.contains("save_pretrained"), "{err}");
    }

    /// The pieces `tokenizer.ggml.pre` = `name` cuts `text` into (byte-level characters: Ġ is a space).
    fn gguf_pieces(name: &str, text: &str) -> Vec<String> {
        use tokenizers::{Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pre = GgufPre::from_name(name).unwrap();
        let mut normalized = tokenizers::NormalizedString::from(text);
        if let Some(n) = &pre.normalizer {
            n.normalize(&mut normalized).unwrap();
        }
        let mut pieces = PreTokenizedString::from(normalized);
        pre.pre_tokenizer.pre_tokenize(&mut pieces).unwrap();
        pieces
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_owned())
            .collect()
    }

    #[test]
    fn gguf_pre_tokenizers_split_as_llama_cpp_regexes() {
        // Expected pieces worked out by hand from the regexes in llama.cpp's llama-vocab.cpp.
        let text = "Hello, world!! x 12345";
        let cases: [(&str, &[&str]); 5] = [
            ("gpt-2", &["Hello", ",", "Ġworld", "!!", "Ġx", "Ġ12345"]),
            ("smollm", &["Hello", ",", "Ġworld", "!!", "Ġx", "Ġ", "1", "2", "3", "4", "5"]),
            ("llama-bpe", &["Hello", ",", "Ġworld", "!!", "Ġx", "Ġ", "123", "45"]),
            ("qwen2", &["Hello", ",", "Ġworld", "!!", "Ġx", "Ġ", "1", "2", "3", "4", "5"]),
            // Punctuation runs first, then GPT-2's split, then digit runs, then groups of three.
            ("default", &["Hello", ",", "Ġworld", "!!", "Ġx", "Ġ", "123", "45"]),
        ];
        for (name, want) in cases {
            assert_eq!(gguf_pieces(name, text), want, "{name}");
        }
        assert_eq!(gguf_pieces("default", "1234567"), ["123", "456", "7"]);
        // Llama 3 lowers no case but matches contractions case-insensitively; GPT-2 does not.
        assert_eq!(gguf_pieces("llama-bpe", "I'LL"), ["I", "'LL"]);
        assert_eq!(gguf_pieces("gpt-2", "I'LL"), ["I", "'", "LL"]);
        // Qwen2 composes to NFC first: e + combining acute is é (bytes c3 a9).
        assert_eq!(gguf_pieces("qwen2", "e\u{301}"), ["Ã©"]);
        let err = GgufPre::from_name("falcon").err().unwrap().to_string();
        assert!(err.contains("`falcon`") && err.contains(GgufPre::SUPPORTED), "{err}");
    }

    #[test]
    fn gguf_sentencepiece_matches_sentencepiece() {
        use gguf_file::Value as V;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sentencepiece_tiny.json");
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let array =
            |key: &str, f: &dyn Fn(&Value) -> V| V::Array(fixture[key].as_array().unwrap().iter().map(f).collect());
        let id = |key: &str| V::U32(fixture[key].as_u64().unwrap() as u32);
        let metadata: HashMap<String, V> = [
            ("tokenizer.ggml.model", V::String("llama".into())),
            ("tokenizer.ggml.tokens", array("tokens", &|t| V::String(t.as_str().unwrap().into()))),
            ("tokenizer.ggml.scores", array("scores", &|x| V::F32(x.as_f64().unwrap() as f32))),
            ("tokenizer.ggml.token_type", array("token_type", &|x| V::I32(x.as_i64().unwrap() as i32))),
            ("tokenizer.ggml.add_space_prefix", V::Bool(fixture["add_space_prefix"].as_bool().unwrap())),
            ("tokenizer.ggml.bos_token_id", id("bos_token_id")),
            ("tokenizer.ggml.eos_token_id", id("eos_token_id")),
            ("tokenizer.ggml.unknown_token_id", id("unknown_token_id")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let tk = Tokenizer::from_gguf(&metadata).unwrap();
        // Reference ids from sentencepiece (see tests/data/make_sentencepiece_tiny.py); they
        // exercise byte fallback, digit splits, runs of spaces and a user-defined token.
        for case in fixture["expected"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(tk.encode(text, false).unwrap(), want, "{text:?}");
            assert_eq!(tk.encode(text, true).unwrap(), [&[1u32][..], &want].concat(), "BOS by default: {text:?}");
            assert_eq!(tk.decode(&want).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        }
        assert_eq!((tk.bos_id(), tk.eos_ids()), (Some(1), &[2u32][..]));
    }

    #[test]
    fn stories260k_matches_python_tokenizers() {
        let dir = shared_dir().join("models/stories260K");
        if !dir.join("tokenizer.json").is_file() {
            eprintln!("skipping: {} is absent (set KDLLM_SHARED)", dir.display());
            return;
        }
        let tk = Tokenizer::from_folder(&dir).unwrap();
        // Obtained with Python `tokenizers` 0.22.2:
        //   Tokenizer.from_file("stories260K/tokenizer.json").encode("Once upon a time").ids
        // The file's post-processor adds <s> itself, as tokenizer_config.json's add_bos_token says.
        assert_eq!(tk.encode("Once upon a time", true).unwrap(), [1, 403, 407, 261, 378]);
        assert_eq!(tk.encode("Once upon a time", false).unwrap(), [403, 407, 261, 378]);
        // Python gives [1, 1, 403, ...] for "<s>Once upon a time"; kdllm keeps a single BOS.
        assert_eq!(tk.encode("<s>Once upon a time", true).unwrap(), [1, 403, 407, 261, 378]);
        assert_eq!((tk.bos_id(), tk.eos_ids(), tk.vocab_size()), (Some(1), &[2u32][..], 512));
        assert_eq!(tk.decode(&[1, 403, 407, 261, 378, 2]).unwrap(), "Once upon a time");
    }
}
