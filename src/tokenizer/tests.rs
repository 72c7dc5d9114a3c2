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
