//! The engine clients against responses recorded from a real llama-server and built from vLLM's
//! and SGLang's source (`tests/fixtures/engines/`, see its README for provenance).

use serde_json::{json, Value};

use super::*;

fn fixture(engine: &str, name: &str) -> Value {
    let path = format!("{}/tests/fixtures/engines/{engine}/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A request body as a recorded exchange sent it.
fn request(engine: &str, name: &str) -> Value {
    fixture(engine, name)["request"]["body"].clone()
}

fn response(engine: &str, name: &str) -> Value {
    fixture(engine, name)["response"].clone()
}

fn params(logprobs: usize) -> SampleParams {
    SampleParams { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 6, logprobs, seed: 1234 }
}

/// Every top-k row of a row is `k` long and sorted, most likely first.
fn assert_rows_sorted(c: &Completion, k: usize) {
    for (i, row) in c.topk_logprobs.iter().enumerate() {
        assert_eq!(row.len(), k, "position {i}");
        assert!(row.windows(2).all(|w| w[0] >= w[1]), "position {i} is not sorted: {row:?}");
    }
}

#[test]
fn llama_server_sampling_keeps_the_sampled_tokens_log_prob_even_outside_the_top_k() {
    let v = response("llama-server", "generate-sampled");
    let reply = llama_server::parse_sample(&v).unwrap();
    let probs = v["completion_probabilities"].as_array().unwrap();
    let ids: Vec<u32> = reply.tokens.iter().map(|t| t.id).collect();
    let listed: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, listed, "ids from `completion_probabilities` are the sampled `tokens`");
    assert_eq!(reply.stop, Stop::Length, "stop_type `limit`");
    assert_eq!(reply.model.as_deref(), v["model"].as_str());
    let c = assemble(reply.tokens, reply.stop, 5, &[2], 49152).unwrap();
    assert_rows_sorted(&c, 5);
    let mut outside = 0;
    for (i, p) in probs.iter().enumerate() {
        assert_eq!(c.token_logprobs[i], p["logprob"].as_f64().unwrap() as f32);
        outside += usize::from(!c.topk_ids[i].contains(&c.ids[i]));
    }
    assert!(outside > 0, "at temperature 1 some sampled tokens fall outside the top 5 (4 of 16 here)");
    // The request the client builds turns the server's default samplers off, as the recording did.
    let ours = llama_server::sample_request(&[1, 2], &params(5));
    let recorded = request("llama-server", "generate-sampled");
    for key in [
        "min_p",
        "typical_p",
        "repeat_penalty",
        "repeat_last_n",
        "top_n_sigma",
        "xtc_probability",
        "dry_multiplier",
        "mirostat",
        "post_sampling_probs",
    ] {
        assert_eq!(ours[key], recorded[key], "`{key}`");
    }
}

#[test]
fn llama_server_an_end_token_stop_keeps_the_end_token_as_the_last_position() {
    let reply = llama_server::parse_sample(&response("llama-server", "generate-greedy-stop")).unwrap();
    assert_eq!(reply.stop, Stop::Eos);
    let c = assemble(reply.tokens, reply.stop, 5, &[2], 0).unwrap();
    assert_eq!((c.ids.last(), c.finish), (Some(&2), FinishReason::Stop));
    assert_eq!(c.text_ids().len(), c.ids.len() - 1, "the text leaves the end token out");
    let reply = llama_server::parse_sample(&response("llama-server", "generate-length")).unwrap();
    assert_eq!(assemble(reply.tokens, reply.stop, 5, &[2], 0).unwrap().finish, FinishReason::Length);
}

#[test]
fn llama_server_forcing_the_scored_token_leaves_the_distribution_as_it_is() {
    for i in 0..3 {
        let plain = response("llama-server", &format!("score-pos-{i}"));
        let forced_req = request("llama-server", &format!("score-forced-pos-{i}"));
        let forced = response("llama-server", &format!("score-forced-pos-{i}"));
        let token = forced_req["logit_bias"][0][0].as_u64().unwrap() as u32;
        let t = llama_server::parse_score(&forced, token).unwrap();
        let p = llama_server::parse_score(&plain, plain["completion_probabilities"][0]["id"].as_u64().unwrap() as u32)
            .unwrap();
        assert_eq!(t.top, p.top, "position {i}: the bias steers the sampler only");
        let ours = llama_server::score_request(
            forced_req["prompt"]
                .as_array()
                .map(|a| a.iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>())
                .unwrap()
                .as_slice(),
            token,
            5,
        );
        assert_eq!((ours["n_predict"].clone(), ours["logit_bias"][0][0].clone()), (json!(1), json!(token)));
        assert!(llama_server::parse_score(&forced, token + 1).is_err(), "a token that did not come back is an error");
    }
}

#[test]
fn llama_server_answers_without_log_probs_and_error_bodies_are_named() {
    let mut v = response("llama-server", "generate-length");
    v.as_object_mut().unwrap().remove("completion_probabilities");
    assert!(matches!(llama_server::parse_sample(&v), Err(Problem::NoLogprobs(_))));
    let unauthorized = fixture("llama-server", "error-unauthorized");
    assert_eq!(unauthorized["status"], json!(401));
    assert_eq!(client::error_message(&unauthorized["response"].to_string()), "Invalid API Key");
    let context = response("llama-server", "error-context").to_string();
    assert!(client::error_message(&context).contains("exceeds the available context size"));
    // llama-server lists its model as owned by "llamacpp", with the `-m` path as its id.
    let models = response("llama-server", "models");
    assert_eq!(served_models(Some(&models)), vec![models["data"][0]["id"].as_str().unwrap().to_string()]);
    assert_eq!(models["data"][0]["owned_by"], json!("llamacpp"));
}

#[test]
fn vllm_token_ids_and_the_sampled_token_added_as_a_k_plus_first_entry() {
    let v = response("vllm", "generate-ids");
    let reply = openai::parse_sample(&v, None).unwrap();
    let ids: Vec<u32> = reply.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, [10933, 314, 8744, 30, 2]);
    assert_eq!((reply.stop.clone(), reply.model.as_deref()), (Stop::Eos, Some("HuggingFaceTB/SmolLM2-135M-Instruct")));
    let plus_one = reply.tokens.iter().position(|t| t.top.len() == 4).expect("a position with K + 1 entries");
    let c = assemble(reply.tokens, reply.stop, 3, &[2], 49152).unwrap();
    assert_rows_sorted(&c, 3);
    assert!(!c.topk_ids[plus_one].contains(&c.ids[plus_one]), "the added sampled token is not a top-3 entry");
    assert_eq!(
        c.token_logprobs[plus_one],
        v["choices"][0]["logprobs"]["token_logprobs"][plus_one].as_f64().unwrap() as f32
    );
    assert_eq!(c.finish, FinishReason::Stop, "vLLM keeps the end token in `tokens`");

    let reply = openai::parse_sample(&response("vllm", "generate-length"), None).unwrap();
    assert_eq!(reply.stop, Stop::Length);
    // Without `return_tokens_as_token_ids`, the tokens are text: refused without a tokenizer map.
    assert!(matches!(openai::parse_sample(&response("vllm", "generate-strings"), None), Err(Problem::Shape(_))));

    let ours = openai::sample_request("HuggingFaceTB/SmolLM2-135M-Instruct", &[1], &params(3), true);
    let built = request("vllm", "generate-ids");
    for key in [
        "top_k",
        "min_p",
        "repetition_penalty",
        "return_tokens_as_token_ids",
        "logprobs",
        "seed",
        "skip_special_tokens",
    ] {
        assert_eq!(ours[key], built[key], "`{key}`");
    }
}

#[test]
fn vllm_prompt_logprobs_score_the_completion_positions() {
    let req = request("vllm", "score-prompt-logprobs");
    let ids: Vec<u32> = req["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let from = 12; // the prompt of generate-ids.json
    let tokens = openai::parse_score(&response("vllm", "score-prompt-logprobs"), &ids, from).unwrap();
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), ids[from..]);
    let sampled = openai::parse_sample(&response("vllm", "generate-ids"), None).unwrap();
    for (scored, drawn) in tokens.iter().zip(&sampled.tokens) {
        assert!((scored.logprob - drawn.logprob).abs() < 1e-6, "teacher-forced log-probs equal the sampled ones");
    }
    let c = assemble(tokens, Stop::Length, 3, &[2], 0).unwrap();
    assert_rows_sorted(&c, 3);
    assert!(
        openai::parse_score(&response("vllm", "score-prompt-logprobs"), &ids[1..], from).is_err(),
        "a length mismatch is an error"
    );
}

#[test]
fn vllm_errors_say_what_the_limit_is() {
    let body = response("vllm", "error-max-logprobs").to_string();
    let message = client::error_message(&body);
    assert!(message.starts_with("Requested sample logprobs of 50") && is_logprob_limit(&message), "{message}");
    let prompt = client::error_message(&response("vllm", "error-max-prompt-logprobs").to_string());
    assert!(is_logprob_limit(&prompt), "{prompt}");
    let missing = client::error_message(&response("vllm", "error-model-404").to_string());
    assert!(missing.contains("does not exist") && !is_logprob_limit(&missing), "{missing}");
    assert_eq!(client::error_message(&response("vllm", "error-unauthorized").to_string()), "Unauthorized");
    let models = response("vllm", "models");
    assert_eq!(models["data"][0]["owned_by"], json!("vllm"));
    assert_eq!(served_models(Some(&models)), ["HuggingFaceTB/SmolLM2-135M-Instruct"]);
}

#[test]
fn sglang_native_generation_and_input_logprobs() {
    let reply = sglang::parse_sample(&response("sglang", "generate-native")).unwrap();
    assert_eq!(reply.tokens.iter().map(|t| t.id).collect::<Vec<_>>(), [10933, 314, 8744, 30, 2]);
    assert_eq!(reply.stop, Stop::Eos);
    let c = assemble(reply.tokens.clone(), reply.stop, 3, &[2], 0).unwrap();
    assert_eq!(c.finish, FinishReason::Stop);
    assert_rows_sorted(&c, 3);
    assert_eq!(sglang::parse_sample(&response("sglang", "generate-native-length")).unwrap().stop, Stop::Length);

    let req = request("sglang", "score-native");
    let ids: Vec<u32> = req["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let start = req["logprob_start_len"].as_u64().unwrap() as usize;
    let scored = sglang::parse_score(&response("sglang", "score-native"), &ids, 12, start).unwrap();
    assert_eq!(scored.iter().map(|t| t.id).collect::<Vec<_>>(), ids[12..]);
    for (s, d) in scored.iter().zip(&reply.tokens) {
        assert!((s.logprob - d.logprob).abs() < 1e-6);
    }
    // Scoring from the very first position is refused by the parser (nothing predicts token 0).
    assert!(sglang::parse_score(&response("sglang", "score-native"), &ids, 0, 0).is_err());
}

#[test]
fn sglang_requests_use_only_the_sampling_fields_it_accepts() {
    // SGLang rejects unknown `sampling_params` keys and lists the ones it knows.
    let message = response("sglang", "error-unknown-field")["error"].as_str().unwrap().to_string();
    let known: Vec<&str> = message.split('`').skip(3).step_by(2).collect();
    assert!(known.contains(&"sampling_seed"), "{known:?}");
    for body in [sglang::sample_request(&[1, 2], &params(3)), sglang::score_request(&[1, 2, 3], 3, 2)] {
        for key in body["sampling_params"].as_object().unwrap().keys() {
            assert!(known.contains(&key.as_str()), "`{key}` is not a sampling field SGLang accepts");
        }
    }
    assert_eq!(
        sglang::sample_request(&[1], &params(3))["sampling_params"]["top_k"],
        json!(-1),
        "top_k 0 is an error in SGLang"
    );
    let info = response("sglang", "server-info");
    assert!(info["version"].is_string());
}

#[test]
fn token_strings_map_back_to_ids_only_when_exactly_one_token_has_that_text() {
    let texts: Vec<String> = (0..40).map(|i| format!("the cat {i} sat on the mat")).collect();
    let tok = crate::tokenizer::Tokenizer::train_bpe(&texts, 300).unwrap();
    let map = tokens::TokenMap::new(&tok).unwrap();
    let ids = tok.encode(" cat sat", false).unwrap();
    for id in ids {
        assert_eq!(map.id(&tok.decode_with_special(&[id]).unwrap()).unwrap(), id);
    }
    assert!(matches!(map.id("no such token ☃"), Err(Problem::Unmappable { .. })));
}

#[test]
fn a_row_needs_k_entries_and_ids_inside_the_vocabulary() {
    let t = |id, top: Vec<(u32, f32)>| Token { id, logprob: -0.5, top };
    let short = vec![t(3, vec![(3, -0.5)])];
    assert_eq!(assemble(short, Stop::Length, 2, &[], 0), Err(Assembly::TooFew { position: 0, got: 1 }));
    let beyond = vec![t(3, vec![(3, -0.5), (900, -1.0)])];
    assert_eq!(assemble(beyond, Stop::Length, 2, &[], 100), Err(Assembly::BeyondVocab(900)));
    // An engine's stop without the end token as the last id is a length stop.
    let ok = assemble(vec![t(3, vec![(3, -0.5), (4, -1.0)])], Stop::Eos, 2, &[2], 100).unwrap();
    assert_eq!(ok.finish, FinishReason::Length);
}
