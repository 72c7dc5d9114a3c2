//! Tokenizers rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, as llama.cpp tokenizes.

use super::*;
use crate::gguf::{Meta, MetaValue, Metadata};

impl Tokenizer {
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
}

/// The byte-level BPE of a `gpt2` GGUF tokenizer, and whether llama.cpp adds BOS by default.
pub(super) fn gguf_byte_level_bpe(meta: &Meta, vocab: Vocab) -> Result<(tokenizers::Tokenizer, bool), TokenizerError> {
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
pub(super) fn gguf_sentencepiece(
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
pub(super) fn merges_from_scores(tokens: &[&str], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
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
pub(super) struct GgufPre {
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

/// Texts whose pre-tokenization tells llama.cpp's pre-tokenizers apart.
const PRE_PROBES: [&str; 3] = [
    "Hello, world!! x 12345 I'LL  go\tnow\n\n3.14 ünïcode 你好",
    "e\u{301} ...!? $100 a1b22c333",
    "   lead  and trail  ",
];

impl Tokenizer {
    /// The `tokenizer.ggml.*` metadata llama.cpp reads, with `n_vocab` tokens (ids past the
    /// tokenizer's, a padded embedding, are unused tokens). Byte-level BPE is written as `gpt2`,
    /// with the merges and as `tokenizer.ggml.pre` the llama.cpp pre-tokenizer that splits probe
    /// texts as this one does (with none, `default`, and the second value is None). SentencePiece
    /// BPE (byte fallback, `▁` for spaces) is written as `llama`, each merged piece scored by its
    /// merge's rank, which llama.cpp's tokenizer and [`merges_from_scores`] both read back as the
    /// same merge order.
    pub fn gguf_metadata(&self, n_vocab: usize) -> Result<(Metadata, Option<&'static str>), TokenizerError> {
        let json: Value =
            serde_json::from_str(&self.inner.to_string(false).map_err(|e| TokenizerError::Gguf(e.to_string()))?)
                .map_err(|e| TokenizerError::Gguf(format!("tokenizer.json: {e}")))?;
        let model = &json["model"];
        let has = |part: &Value, ty: &str, list: &str| {
            part["type"] == ty || part[list].as_array().is_some_and(|d| d.iter().any(|x| x["type"] == ty))
        };
        let byte_level = has(&json["decoder"], "ByteLevel", "decoders");
        let sentencepiece = model["byte_fallback"] == true && has(&json["decoder"], "ByteFallback", "decoders");
        if model["type"] != "BPE" || byte_level == sentencepiece {
            return Err(TokenizerError::Gguf(
                "only BPE tokenizers are written to GGUF: byte-level (GPT-2 style: SmolLM2, Llama 3, Qwen2, kdllm's \
                 own) or SentencePiece-style with byte fallback (Llama 2, TinyLlama); this one is neither"
                    .into(),
            ));
        }
        let mut tokens: Vec<Option<String>> = vec![None; n_vocab.max(self.vocab_size())];
        for (token, id) in self.inner.get_vocab(true) {
            tokens[id as usize] = Some(token);
        }
        let added: HashMap<u32, bool> =
            self.inner.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.special)).collect();
        let unk = model["unk_token"].as_str();
        let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let types: Vec<i32> = (0..tokens.len() as u32)
            .map(|id| match (tokens[id as usize].as_deref(), added.get(&id)) {
                (None, _) => 5,
                (Some(t), _) if sentencepiece && Some(t) == unk => 2,
                (Some(_), Some(true)) => 3,
                (Some(_), Some(false)) => 4,
                (Some(t), None) if sentencepiece && is_byte(t) => 6,
                (Some(_), None) => 1,
            })
            .collect();
        let tokens: Vec<String> =
            tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
        let merges: Vec<(String, String)> = model["merges"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|x| match x {
                        Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
                        Value::Array(pair) => {
                            Some((pair.first()?.as_str()?.to_owned(), pair.get(1)?.as_str()?.to_owned()))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (mut meta, pre) = if sentencepiece {
            let space_prefix = has(&json["normalizer"], "Prepend", "normalizers")
                || (has(&json["pre_tokenizer"], "Metaspace", "pretokenizers")
                    && json["pre_tokenizer"]["prepend_scheme"] != "never");
            (sentencepiece_metadata(tokens, types, &merges, space_prefix), Some("default"))
        } else {
            let pre = ["smollm", "gpt-2", "llama-bpe", "qwen2", "default"].into_iter().find(|name| {
                GgufPre::from_name(name).is_ok_and(|p| PRE_PROBES.iter().all(|t| p.pieces(t) == self.pieces(t)))
            });
            let merges = merges.into_iter().map(|(a, b)| format!("{a} {b}")).collect();
            let meta = vec![
                ("tokenizer.ggml.model".to_string(), MetaValue::Str("gpt2".into())),
                ("tokenizer.ggml.pre".to_string(), MetaValue::Str(pre.unwrap_or("default").into())),
                ("tokenizer.ggml.tokens".to_string(), MetaValue::StrArray(tokens)),
                ("tokenizer.ggml.token_type".to_string(), MetaValue::I32Array(types)),
                ("tokenizer.ggml.merges".to_string(), MetaValue::StrArray(merges)),
            ];
            (meta, pre)
        };
        let mut id = |key: &str, v: u32| meta.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(v)));
        if let Some((_, bos)) = &self.bos {
            id("bos_token_id", *bos);
        }
        if let Some(&eos) = self.eos_ids.first() {
            id("eos_token_id", eos);
        }
        if let Some(unk) = unk.and_then(|t| self.inner.token_to_id(t)) {
            id("unknown_token_id", unk);
        }
        // The end-of-turn token chat models stop on (llama.cpp's EOT), when the EOS ids hold one.
        const TURN_ENDS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"];
        if let Some(eot) =
            self.eos_ids.iter().find(|&&i| self.inner.id_to_token(i).is_some_and(|t| TURN_ENDS.contains(&t.as_str())))
        {
            id("eot_token_id", *eot);
        }
        meta.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(self.add_bos)));
        if let Some(t) = &self.chat_template {
            meta.push(("tokenizer.chat_template".into(), MetaValue::Str(t.clone())));
        }
        Ok((meta, pre))
    }

    /// The pieces this tokenizer's normalizer and pre-tokenizer cut `text` into.
    fn pieces(&self, text: &str) -> Vec<String> {
        split_pieces(self.inner.get_normalizer(), self.inner.get_pre_tokenizer(), text)
    }
}

impl GgufPre {
    fn pieces(&self, text: &str) -> Vec<String> {
        split_pieces(self.normalizer.as_ref(), Some(&self.pre_tokenizer), text)
    }
}

/// A SentencePiece BPE as llama.cpp's `llama` tokenizer: the piece each merge makes scores minus
/// its rank (the first merge 0, the next -1, ...), so higher scores merge first in both readers;
/// pieces no merge makes score below every merge.
fn sentencepiece_metadata(
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: &[(String, String)],
    space_prefix: bool,
) -> Metadata {
    let unreached = -(merges.len() as f32) - 1.0;
    let mut scores: Vec<f32> = vec![unreached; tokens.len()];
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    for (rank, (a, b)) in merges.iter().enumerate().rev() {
        if let Some(&i) = index.get(format!("{a}{b}").as_str()) {
            scores[i] = -(rank as f32);
        }
    }
    for (score, &ty) in scores.iter_mut().zip(&types) {
        if ty != 1 {
            *score = 0.0;
        }
    }
    vec![
        ("tokenizer.ggml.model".to_string(), MetaValue::Str("llama".into())),
        ("tokenizer.ggml.pre".to_string(), MetaValue::Str("default".into())),
        ("tokenizer.ggml.tokens".to_string(), MetaValue::StrArray(tokens)),
        ("tokenizer.ggml.scores".to_string(), MetaValue::F32Array(scores)),
        ("tokenizer.ggml.token_type".to_string(), MetaValue::I32Array(types)),
        ("tokenizer.ggml.add_space_prefix".to_string(), MetaValue::Bool(space_prefix)),
    ]
}

fn split_pieces(normalizer: Option<&NormalizerWrapper>, pre: Option<&PreTokenizerWrapper>, text: &str) -> Vec<String> {
    use tokenizers::{Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let mut normalized = tokenizers::NormalizedString::from(text);
    if let Some(n) = normalizer {
        if n.normalize(&mut normalized).is_err() {
            return Vec::new();
        }
    }
    let mut pieces = PreTokenizedString::from(normalized);
    if let Some(p) = pre {
        if p.pre_tokenize(&mut pieces).is_err() {
            return Vec::new();
        }
    }
    pieces.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s.to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces `tokenizer.ggml.pre` = `name` cuts `text` into (byte-level characters: Ġ is a space).
    fn gguf_pieces(name: &str, text: &str) -> Vec<String> {
        GgufPre::from_name(name).unwrap().pieces(text)
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
}
