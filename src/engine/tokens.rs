//! Token strings back to ids, for servers that return only strings: exact where the string is
//! the text of one token of the teacher's vocabulary, refused where it is none or several.

use std::collections::HashMap;

use super::Problem;
use crate::tokenizer::{Tokenizer, TokenizerError};

pub(super) struct TokenMap {
    by_text: HashMap<String, Vec<u32>>,
}

impl TokenMap {
    pub fn new(tok: &Tokenizer) -> Result<Self, TokenizerError> {
        let mut by_text: HashMap<String, Vec<u32>> = HashMap::new();
        for id in 0..tok.vocab_size() as u32 {
            by_text.entry(tok.decode_with_special(&[id])?).or_default().push(id);
        }
        Ok(Self { by_text })
    }

    pub fn id(&self, text: &str) -> Result<u32, Problem> {
        let unmappable = |problem: String| Problem::Unmappable { token: text.to_string(), problem };
        match self.by_text.get(text).map(Vec::as_slice) {
            Some([one]) => Ok(*one),
            Some(many) => {
                let ids: Vec<String> = many.iter().take(6).map(u32::to_string).collect();
                Err(unmappable(format!("is the text of {} tokens (ids {}…)", many.len(), ids.join(", "))))
            }
            None => Err(unmappable("is no token of the tokenizer".into())),
        }
    }
}
