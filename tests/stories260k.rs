//! Checks against a real pretrained llama (Karpathy's stories260K, HF layout) from ../shared.
//! Skips with a message when ../shared (or $KDLLM_SHARED) is absent.

mod common;

use candle_core::{DType, Device, Tensor};
use kdllm::generate::{decode, row_rng, DecodeSettings};
use kdllm::model::Llama;
use kdllm::tokenizer::Tokenizer;

fn greedy(model: &Llama, tok: &Tokenizer, prompt: Vec<u32>, n: usize) -> String {
    let settings = DecodeSettings {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: n,
        logprobs: 0,
        eos_ids: tok.eos_ids().to_vec(),
    };
    let mut rngs = vec![row_rng(0, "", 0)];
    let c = decode(model, std::slice::from_ref(&prompt), &mut rngs, &settings).unwrap().remove(0);
    assert_eq!(c.ids.len(), n, "no EOS expected within {n} tokens");
    let mut all = prompt;
    all.extend(c.ids);
    tok.decode(&all).unwrap()
}

// Known answer from ../shared/README.md, checked there against llama2.c, transformers and numpy.
const CONTINUATION: &str = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily";

#[test]
fn greedy_decoding_reproduces_the_reference_continuation() {
    let Some(dir) = common::stories260k() else { return };
    let tok = Tokenizer::from_folder(&dir).unwrap();
    let model = Llama::load(&dir, &common::test_device(), candle_core::DType::F32).unwrap();
    let with_bos = tok.encode("Once upon a time", true).unwrap();
    assert_eq!(with_bos[0], 1, "tokenizer_config.json says add_bos_token: true");
    assert_eq!(greedy(&model, &tok, with_bos, 60), format!("Once upon a time{CONTINUATION}"));
    // Without BOS the text diverges after "She loved to play": BOS handling matters.
    let without = greedy(&model, &tok, tok.encode("Once upon a time", false).unwrap(), 60);
    assert!(without.starts_with("Once upon a time, there was a little girl named Lily. She loved to play"));
    assert_ne!(without, format!("Once upon a time{CONTINUATION}"));
}

#[test]
fn logits_match_candle_transformers_llama() {
    use candle_transformers::models::llama as reference;
    let Some(dir) = common::stories260k() else { return };
    let dev = Device::Cpu;
    let ids: Vec<u32> = vec![1, 403, 407, 261, 378, 29, 300, 17, 365, 41];
    let ours = Llama::load(&dir, &dev, candle_core::DType::F32).unwrap();
    let input = Tensor::new(&ids[..], &dev).unwrap().unsqueeze(0).unwrap();
    let logits = ours.forward(&input, None).unwrap();
    let ours_last = logits.narrow(1, ids.len() - 1, 1).unwrap().flatten_all().unwrap();

    let cfg: reference::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev).unwrap()
    };
    let theirs = reference::Llama::load(vb, &cfg).unwrap();
    let mut cache = reference::Cache::new(false, DType::F32, &cfg, &dev).unwrap();
    let theirs_last = theirs.forward(&input, 0, &mut cache).unwrap().flatten_all().unwrap();
    let diff = (ours_last - theirs_last).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4, "max abs diff to candle-transformers: {diff}");
}

/// stories260K exported to GGUF (its SentencePiece tokenizer as llama.cpp's `llama` model) and
/// read back by kdllm: the same tokens for varied text, the same logits at f32, and the
/// reference continuation at f32 and f16.
#[test]
fn gguf_export_reads_back_with_the_reference_continuation() {
    use kdllm::export::{export, ExportJob};
    use kdllm::gguf::GgmlType;
    use kdllm::model::{Checkpoint, Precision};
    let Some(dir) = common::stories260k() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let hf = Checkpoint::open(dir.to_str().unwrap(), None).unwrap();
    let texts = ["Once upon a time", "Lily's dog, 12345  ünïcode 你好\n...?", " leading and  double  spaces "];
    let ids: Vec<u32> = vec![1, 403, 407, 261, 378, 29, 300, 17, 365, 41];
    let logits = |ckpt: &Checkpoint| {
        let model = ckpt.model(&Device::Cpu, Precision::F32).unwrap();
        let input = Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward(&input, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let want = logits(&hf);
    for ty in [GgmlType::F32, GgmlType::F16] {
        let out = tmp.path().join(format!("{ty:?}.gguf"));
        let job = ExportJob { model: dir.display().to_string(), output: out.clone(), ty, overwrite: false };
        let report = export(&job).unwrap();
        assert_eq!(report.pre_tokenizer, "default");
        let back = Checkpoint::open(out.to_str().unwrap(), None).unwrap();
        for text in texts {
            assert_eq!(
                back.tokenizer.encode(text, true).unwrap(),
                hf.tokenizer.encode(text, true).unwrap(),
                "{text:?}"
            );
            let ids = hf.tokenizer.encode(text, false).unwrap();
            assert_eq!(back.tokenizer.decode(&ids).unwrap(), hf.tokenizer.decode(&ids).unwrap(), "{text:?}");
        }
        assert_eq!((back.tokenizer.bos_id(), back.tokenizer.eos_ids()), (Some(1), &[2u32][..]));
        if ty == GgmlType::F32 {
            assert!(logits(&back) == want, "f32 export reads back bit for bit");
        }
        let model = back.model(&Device::Cpu, Precision::F32).unwrap();
        let prompt = back.tokenizer.encode("Once upon a time", true).unwrap();
        assert_eq!(greedy(&model, &back.tokenizer, prompt, 60), format!("Once upon a time{CONTINUATION}"), "{ty:?}");
    }
}
