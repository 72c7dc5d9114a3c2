use super::*;

pub(crate) fn tiny_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rope_theta": 10000.0
    }))
    .unwrap()
}

fn tiny_model(cfg: &LlamaConfig) -> (VarMap, Llama) {
    let (vm, m) = Llama::trainable(cfg, &Device::Cpu).unwrap();
    init_weights(&vm, 7).unwrap();
    // 4x HF's init so the test sees real attention patterns, not near-uniform ones.
    for var in vm.all_vars() {
        var.set(&(var.as_tensor() * 4.0).unwrap()).unwrap();
    }
    (vm, m)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn cached_decode_matches_full_forward() {
    let cfg = tiny_config();
    let (_, m) = tiny_model(&cfg);
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 50) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
    let full = m.forward(&ids, None).unwrap();
    let mut cache = KvCache::new(&cfg, vec![0, 0]);
    let mut parts = vec![m.forward(&ids.narrow(1, 0, 5).unwrap(), Some(&mut cache)).unwrap()];
    for t in 5..12 {
        parts.push(m.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
    }
    let cached = Tensor::cat(&parts, 1).unwrap();
    let diff = max_abs_diff(&full, &cached);
    assert!(diff <= 1e-4, "full vs cached max abs diff {diff}");
}

#[test]
fn left_padding_does_not_change_a_rows_logits() {
    let cfg = tiny_config();
    let (_, m) = tiny_model(&cfg);
    let prompt: Vec<u32> = vec![3, 9, 4, 17, 8];
    let alone = m.forward(&Tensor::new(&prompt[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap(), None).unwrap();
    let mut padded = vec![0u32, 0, 0];
    padded.extend(&prompt);
    let ids = Tensor::from_vec(padded, (1, 8), &Device::Cpu).unwrap();
    let mut cache = KvCache::new(&cfg, vec![3]);
    let out = m.forward(&ids, Some(&mut cache)).unwrap().narrow(1, 3, 5).unwrap();
    let diff = max_abs_diff(&alone, &out);
    assert!(diff <= 1e-4, "padded vs unpadded max abs diff {diff}");
}

fn ids(b: usize, t: usize) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| (i * 7 % 50) as u32).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// Prefill 5 tokens, then decode one at a time; must equal the full forward.
fn assert_cache_matches_full(cfg: &LlamaConfig) {
    let (_, m) = tiny_model(cfg);
    let ids = ids(2, 12);
    let full = m.forward(&ids, None).unwrap();
    let mut cache = KvCache::new(cfg, vec![0, 0]);
    let mut parts = vec![m.forward(&ids.narrow(1, 0, 5).unwrap(), Some(&mut cache)).unwrap()];
    for t in 5..12 {
        parts.push(m.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
    }
    let diff = max_abs_diff(&full, &Tensor::cat(&parts, 1).unwrap());
    assert!(diff <= 1e-4, "{}: full vs cached max abs diff {diff}", cfg.model_type);
}

fn variant(json: serde_json::Value) -> LlamaConfig {
    let mut base = serde_json::to_value(tiny_config()).unwrap();
    base.as_object_mut().unwrap().extend(json.as_object().unwrap().clone());
    serde_json::from_value(base).unwrap()
}

#[test]
fn sliding_window_masks_old_keys_and_the_cache_agrees() {
    let mistral = variant(serde_json::json!({"model_type": "mistral", "sliding_window": 3}));
    assert_cache_matches_full(&mistral);
    let (vm, m) = tiny_model(&mistral);
    let ids = ids(1, 10);
    let windowed = m.forward(&ids, None).unwrap();
    // Same weights without the window: the first 3 positions agree, later ones do not.
    let full_cfg = LlamaConfig { sliding_window: None, ..mistral.clone() };
    let full = Llama::from_weights(&full_cfg, &Weights::Tensors(tensors(&vm)), &Device::Cpu, DType::F32).unwrap();
    let full = full.forward(&ids, None).unwrap();
    assert!(max_abs_diff(&windowed.narrow(1, 0, 3).unwrap(), &full.narrow(1, 0, 3).unwrap()) <= 1e-5);
    assert!(max_abs_diff(&windowed.narrow(1, 3, 7).unwrap(), &full.narrow(1, 3, 7).unwrap()) > 1e-3);
    // Qwen2 slides only from `max_window_layers` up, and only with use_sliding_window.
    let qwen = variant(
        serde_json::json!({"model_type": "qwen2", "sliding_window": 3, "use_sliding_window": true, "max_window_layers": 1}),
    );
    assert_eq!((qwen.window(0), qwen.window(1)), (None, Some(3)));
    assert_cache_matches_full(&qwen);
    let off = LlamaConfig { use_sliding_window: Some(false), ..qwen };
    assert_eq!((off.window(0), off.window(1)), (None, None));
}

#[test]
fn biases_are_loaded_and_trained() {
    for (json, biases) in [
        (serde_json::json!({"model_type": "qwen2"}), 3),
        (serde_json::json!({"attention_bias": true, "mlp_bias": true}), 7),
    ] {
        let cfg = variant(json);
        let (vm, m) = tiny_model(&cfg);
        let names = tensors(&vm);
        let n = names.keys().filter(|k| k.ends_with(".bias")).count();
        assert_eq!(n, biases * cfg.num_hidden_layers, "{}", cfg.model_type);
        assert_eq!(names.values().map(|t| t.elem_count()).sum::<usize>(), cfg.num_params());
        let logits = m.forward(&ids(1, 6), None).unwrap();
        let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter().filter(|(k, _)| k.ends_with(".bias")) {
            assert!(grads.get(var).is_some(), "no gradient for {name}");
        }
    }
}

#[test]
fn llama3_rope_scaling_follows_the_three_bands() {
    // head_dim 8: four frequencies 1, 0.1, 0.01, 0.001 at theta 1e4. Wavelengths 6.3, 63, 628,
    // 6283 against original length 64: high band (< 16) kept, low band (> 64) divided by 8.
    let cfg = variant(serde_json::json!({"hidden_size": 32, "num_attention_heads": 4, "rope_scaling":
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}}));
    let f = inv_freq(&cfg).unwrap();
    let smooth = (64.0 / (2.0 * std::f64::consts::PI / 0.1) - 1.0) / 3.0;
    let expected = [1.0, (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1, 0.01 / 8.0, 0.001 / 8.0];
    for (got, want) in f.iter().zip(expected) {
        assert!((*got as f64 - want).abs() <= 1e-6 * want.max(1e-3), "{f:?} vs {expected:?}");
    }
    let linear = variant(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}));
    assert!((inv_freq(&linear).unwrap()[0] - 0.5).abs() < 1e-7);
    for (scaling, needle) in [
        (serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "type `yarn` is not supported"),
        (serde_json::json!({"rope_type": "llama3", "factor": 8.0}), "needs a number `low_freq_factor`"),
    ] {
        let cfg = LlamaConfig { rope_scaling: Some(scaling), ..tiny_config() };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let cfg = tiny_config();
    let (vm, m) = tiny_model(&cfg);
    let half = Llama::from_weights(&cfg, &Weights::Tensors(tensors(&vm)), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(half.dtype(), DType::BF16);
    let ids = ids(2, 8);
    let (a, b) = (m.forward(&ids, None).unwrap(), half.forward(&ids, None).unwrap());
    assert_eq!(b.dtype(), DType::F32, "logits come back in f32");
    let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff > 0.0 && diff < 0.05 * scale, "bf16 vs f32 diff {diff} (logit scale {scale})");
}

#[test]
fn q8_decoding_stays_close_to_f32_and_keeps_odd_sized_matrices_dense() {
    let cfg = tiny_config();
    let (vm, m) = tiny_model(&cfg);
    let weights = Weights::Tensors(tensors(&vm));
    let q = Llama::quantized(&cfg, &weights, Scheme::Q8).unwrap();
    // Rows of 32 are one block; down_proj's rows of 48 are not whole blocks and stay f32.
    let layer = &q.layers[0];
    assert!(matches!(layer.mlp.up.weight, Weight::Quant(_)) && matches!(layer.attn.q.weight, Weight::Quant(_)));
    assert!(matches!(layer.mlp.down.weight, Weight::Dense { .. }));
    assert!(matches!(q.embed, Embedding::Quant(_)) && matches!(q.lm_head.weight, Weight::Quant(_)));
    assert_eq!(q.dtype(), DType::F32);

    let ids = ids(2, 10);
    let (a, b) = (m.forward(&ids, None).unwrap(), q.forward(&ids, None).unwrap());
    let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff > 0.0 && diff < 0.1 * scale, "q8 vs f32 diff {diff} (logit scale {scale})");

    // The KV-cache decode agrees with the full forward.
    let mut cache = KvCache::new(&cfg, vec![0, 0]);
    let mut parts = vec![q.forward(&ids.narrow(1, 0, 4).unwrap(), Some(&mut cache)).unwrap()];
    for t in 4..10 {
        parts.push(q.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
    }
    let diff = max_abs_diff(&Tensor::cat(&parts, 1).unwrap(), &b);
    assert!(diff <= 1e-4, "q8: cached decode differs from the full forward by {diff}");

    // Plain tensors have no stored blocks: `Stored` quantizes them as Q8 does, bit for bit.
    let stored = Llama::quantized(&cfg, &weights, Scheme::Stored).unwrap().forward(&ids, None).unwrap();
    assert_eq!(max_abs_diff(&stored, &b), 0.0);
    let err = q.cast(DType::BF16).unwrap_err().to_string();
    assert!(err.contains("quantized model computes in f32 only"), "{err}");
}

#[test]
fn unsupported_architectures_and_broken_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"model_type": "phi3", "hidden_size": 8}"#).unwrap();
    let err = LlamaConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("model_type `phi3` is not supported; supported: llama, mistral, qwen2"), "{err}");
    std::fs::write(&path, r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1}"#).unwrap();
    let err = LlamaConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("missing field `intermediate_size`"), "{err}");

    let (vm, _) = tiny_model(&tiny_config());
    let mut partial = tensors(&vm);
    partial.remove("model.layers.1.self_attn.k_proj.weight");
    let err = Llama::from_weights(&tiny_config(), &Weights::Tensors(partial), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor `model.layers.1.self_attn.k_proj.weight` is missing"), "{err}");

    let cfg = tiny_config();
    let (vm, _) = tiny_model(&cfg);
    save(&cfg, &vm, dir.path()).unwrap();
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = Llama::load(dir.path(), &Device::Cpu, DType::F32).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("is the file complete"), "{err}");
}

#[test]
fn mistral_config_without_a_window_key_gets_transformers_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let base = r#""hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": null, "vocab_size": 4"#;
    std::fs::write(&path, format!(r#"{{"model_type": "mistral", {base}}}"#)).unwrap();
    assert_eq!(LlamaConfig::from_file(&path).unwrap().sliding_window, Some(4096));
    std::fs::write(&path, format!(r#"{{"model_type": "mistral", "sliding_window": null, {base}}}"#)).unwrap();
    let cfg = LlamaConfig::from_file(&path).unwrap();
    assert_eq!(cfg.sliding_window, None);
    assert_eq!(cfg.to_hf_json()["sliding_window"], serde_json::Value::Null, "exported as an explicit null");
    assert_eq!(cfg.to_hf_json()["architectures"][0], "MistralForCausalLM");
    // Absent kv heads mean 8 to MistralConfig (32 to Qwen2Config), not num_attention_heads.
    let heads = r#""hidden_size": 32, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 16, "vocab_size": 4"#;
    std::fs::write(&path, format!(r#"{{"model_type": "mistral", {heads}}}"#)).unwrap();
    assert_eq!(LlamaConfig::from_file(&path).unwrap().num_kv_heads(), 8);
}

#[test]
fn hidden_states_are_numbered_as_transformers_numbers_them() {
    // 0: the embeddings; 1: the output of decoder layer 1; 2 = num_hidden_layers: the
    // final-norm output the head reads.
    let (vm, m) = tiny_model(&tiny_config());
    let ids = Tensor::from_vec((1..13u32).collect::<Vec<_>>(), (2, 6), &Device::Cpu).unwrap();
    let rows = Tensor::new(&[1u32, 4, 7, 11], &Device::Cpu).unwrap();
    let (x, taps) = m.states_at(&ids, &rows, &[2, 0, 1]).unwrap();
    assert_eq!(max_abs_diff(&taps[0], &x), 0.0, "the last layer is the final-norm output");
    let embed = vm.data().lock().unwrap()["model.embed_tokens.weight"].as_tensor().clone();
    let want = embed.index_select(&ids.flatten_all().unwrap().index_select(&rows, 0).unwrap(), 0).unwrap();
    assert_eq!(max_abs_diff(&taps[1], &want), 0.0, "layer 0 is the embeddings");
    assert!(max_abs_diff(&taps[2], &taps[1]) > 1e-3 && max_abs_diff(&taps[2], &x) > 1e-3);
    assert_eq!(max_abs_diff(&m.head(&x).unwrap(), &m.forward_at(&ids, &rows).unwrap()), 0.0);
    let err = m.states_at(&ids, &rows, &[3]).unwrap_err().to_string();
    assert!(err.contains("layer 3 does not exist") && err.contains("0 (embeddings) to 2"), "{err}");
    // A tapped layer carries the gradient back to the layers below it.
    let g = taps[2].sum_all().unwrap().backward().unwrap();
    assert!(g.get(vm.data().lock().unwrap()["model.layers.0.mlp.down_proj.weight"].as_tensor()).is_some());
}

#[test]
fn every_parameter_gets_a_gradient() {
    for tie in [false, true] {
        let cfg = LlamaConfig { tie_word_embeddings: tie, ..tiny_config() };
        let (vm, m) = tiny_model(&cfg);
        let ids = Tensor::from_vec((0..16u32).collect::<Vec<_>>(), (2, 8), &Device::Cpu).unwrap();
        let logits = m.forward(&ids, None).unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&logits.reshape((16, 50)).unwrap(), &ids.flatten_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert_eq!(data.len(), cfg.num_hidden_layers * 9 + 2 + usize::from(!tie));
        for (name, var) in data.iter() {
            let g = grads.get(var).unwrap_or_else(|| panic!("no gradient for {name} (tie={tie})"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }
}

#[test]
fn forward_at_gives_the_selected_rows_of_the_full_forward() {
    let cfg = tiny_config();
    let (_, m) = tiny_model(&cfg);
    let ids = ids(2, 6);
    let full = m.forward(&ids, None).unwrap().reshape((12, cfg.vocab_size)).unwrap();
    let rows = Tensor::new(&[1u32, 4, 7, 11], &Device::Cpu).unwrap();
    let got = m.forward_at(&ids, &rows).unwrap();
    assert!(max_abs_diff(&got, &full.index_select(&rows, 0).unwrap()) < 1e-5);
}

#[test]
fn save_then_load_gives_the_same_logits() {
    let cfg = LlamaConfig { vocab_size: 50, ..tiny_config() };
    let (vm, m) = tiny_model(&cfg);
    let dir = tempfile::tempdir().unwrap();
    save(&cfg, &vm, dir.path()).unwrap();
    let loaded = Llama::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let ids = Tensor::from_vec((0..10u32).collect::<Vec<_>>(), (1, 10), &Device::Cpu).unwrap();
    // Same weights; the inference model multiplies by a transposed copy, so only rounding differs.
    let diff = max_abs_diff(&m.forward(&ids, None).unwrap(), &loaded.forward(&ids, None).unwrap());
    assert!(diff <= 5e-5, "save → load changed logits by {diff}");
    assert_eq!(vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(), cfg.num_params());
}

#[test]
fn fields_lists_every_key() {
    let full = LlamaConfig {
        num_key_value_heads: Some(2),
        head_dim: Some(8),
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        rope_scaling: Some(serde_json::json!({"type": "llama3"})),
        sliding_window: Some(4),
        use_sliding_window: Some(true),
        max_window_layers: Some(1),
        layer_types: Some(vec!["full_attention".into(), "sliding_attention".into()]),
        ..tiny_config()
    };
    let v = serde_json::to_value(&full).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut fields = LlamaConfig::FIELDS.to_vec();
    keys.sort_unstable();
    fields.sort_unstable();
    assert_eq!(keys, fields);
    let typo = serde_json::json!({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 1, "tie_word_embedding": true});
    let err = serde_json::from_value::<LlamaConfig>(typo).unwrap_err().to_string();
    assert!(err.contains("tie_word_embedding"), "{err}");
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let cfg = tiny_config();
    let (vm, _) = tiny_model(&cfg);
    let dir = tempfile::tempdir().unwrap();
    save(&cfg, &vm, dir.path()).unwrap();
    let bigger = LlamaConfig { intermediate_size: 64, ..cfg };
    let (vm2, _) = Llama::trainable(&bigger, &Device::Cpu).unwrap();
    let err = load_weights(&vm2, &Weights::Files(vec![dir.path().join("model.safetensors")])).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.mlp.down_proj.weight") && err.contains("[32, 48]"), "{err}");
}

/// The device-generic ops (what a GPU runs) through the whole model, on the CPU: the logits of a
/// left-padded batch, the KV-cache decode, and the gradient of every parameter under a loss
/// through the fused cross-entropy equal the fused kernels'.
#[test]
fn generic_ops_give_the_fused_models_logits_and_gradients() {
    use crate::model::ops::with_generic_ops;
    let cfg = tiny_config();
    let (vm, m) = tiny_model(&cfg);
    let ids = ids(2, 12);
    let run = || {
        let logits = m.forward(&ids, None).unwrap();
        let rows = Tensor::arange(0u32, 24, &Device::Cpu).unwrap();
        let loss = crate::model::ops::nll_rows(&m.forward_at(&ids, &rows).unwrap(), &ids.flatten_all().unwrap())
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut cache = KvCache::new(&cfg, vec![3, 0]);
        let mut parts = vec![m.forward(&ids.narrow(1, 0, 5).unwrap(), Some(&mut cache)).unwrap()];
        for t in 5..12 {
            parts.push(m.forward(&ids.narrow(1, t, 1).unwrap(), Some(&mut cache)).unwrap());
        }
        (logits, Tensor::cat(&parts, 1).unwrap(), grads)
    };
    let (fused_logits, fused_decode, fused_grads) = run();
    let (generic_logits, generic_decode, generic_grads) = with_generic_ops(run);
    assert!(max_abs_diff(&fused_logits, &generic_logits) <= 1e-4, "{}", max_abs_diff(&fused_logits, &generic_logits));
    assert!(max_abs_diff(&fused_decode, &generic_decode) <= 1e-4, "{}", max_abs_diff(&fused_decode, &generic_decode));
    for (name, var) in vm.data().lock().unwrap().iter() {
        let (a, b) = (fused_grads.get(var).unwrap(), generic_grads.get(var).unwrap_or_else(|| panic!("{name}")));
        let scale = a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        assert!(max_abs_diff(a, b) / scale <= 1e-4, "{name}: gradients differ by {}", max_abs_diff(a, b));
    }
}

#[test]
fn bf16_gemm_training_gradients_follow_f32() {
    let cfg = tiny_config();
    let (vm, m) = tiny_model(&cfg);
    if !crate::model::ops::bf16_gemm_available(&Device::Cpu) {
        return eprintln!("this CPU has no avx512_bf16: bf16 training casts instead (bf16_compute_stays_close_to_f32)");
    }
    let half = m.with_bf16_gemms();
    assert_eq!(half.dtype(), DType::F32, "the weights stay f32");
    assert!(
        matches!(half.layers[0].mlp.up.weight, Weight::Bf16Gemm(_))
            && matches!(half.lm_head.weight, Weight::Bf16Gemm(_))
    );
    let ids = ids(2, 12);
    let rows = Tensor::arange(0u32, 24, &Device::Cpu).unwrap();
    let targets: Vec<u32> = (0..24).map(|i| (i * 3 + 1) % 50).collect();
    let targets = Tensor::from_vec(targets, 24, &Device::Cpu).unwrap();
    let loss =
        |model: &Llama| candle_nn::loss::cross_entropy(&model.forward_at(&ids, &rows).unwrap(), &targets).unwrap();
    let (a, b) = (loss(&m), loss(&half));
    let rel = ((a.to_scalar::<f32>().unwrap() - b.to_scalar::<f32>().unwrap()) / a.to_scalar::<f32>().unwrap()).abs();
    assert!(rel > 0.0 && rel < 1e-2, "loss: f32 {a} vs bf16 GEMMs {b}");
    let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
    for (name, var) in vm.data().lock().unwrap().iter() {
        let (x, y) =
            (ga.get(var).expect("f32 gradient"), gb.get(var).unwrap_or_else(|| panic!("no bf16 gradient for {name}")));
        let scale = x.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = max_abs_diff(x, y);
        assert!(diff <= 0.05 * scale, "{name}: gradient differs by {diff} (scale {scale})");
    }
}
