//! Training a byte-level BPE tokenizer on a corpus (the quickstart's task vocabulary).

use super::*;

impl Tokenizer {
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
