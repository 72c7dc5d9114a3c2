//! (in progress: being written on branch `hub`; these signatures are the contract)
use std::path::Path;

pub struct Tokenizer;

impl Tokenizer {
    pub fn train_bpe(_texts: &[String], _vocab_size: usize) -> anyhow::Result<Self> {
        unimplemented!()
    }
    pub fn save(&self, _dir: &Path) -> anyhow::Result<()> {
        unimplemented!()
    }
}
