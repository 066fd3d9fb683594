//! The default decoder, SmolLM2-135M-Instruct as a Q4_1 GGUF file (fetched by scripts/fetch.sh), against
//! transformers reading the same file: tokenizer, logits and greedy generation, from
//! tests/fixtures/smollm2-reference.json (made by scripts/make_fixtures.py smollm2).

use candle_core::{Device, Tensor};
use mtl_nn::gguf::read_llama;
use mtl_nn::llama::{KvCache, Llama};
use serde_json::Value;

use crate::repo_root;

#[test]
fn smollm2_gguf_matches_transformers() -> Result<(), Box<dyn std::error::Error>> {
    let path = repo_root().join("assets/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.is_file(), "{}: missing; run scripts/fetch.sh first", path.display());
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures/smollm2-reference.json"))?)?;
    let gguf = read_llama(&path, &Device::Cpu, false)?;
    let c = &gguf.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (30, 576, 9, 3, 64)
    );
    assert!(c.tie_word_embeddings && (c.rope_theta - 100_000.0).abs() < 1e-6);
    assert_eq!(gguf.tensor_types, vec![("F32".to_string(), 61), ("Q4_1".to_string(), 210), ("Q8_0".to_string(), 1)]);
    assert!(gguf.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")));

    // The tokenizer built from the file's vocabulary and merges.
    let tokenizer = mtl_data::bpe::tokenizer(&gguf.vocab, &path)?;
    for case in reference["tokenize"].as_array().ok_or("tokenize")? {
        let text = case["text"].as_str().ok_or("text")?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let got = tokenizer.encode(text, false).map_err(|e| e.to_string())?.get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tokenizer.decode(&got, false).map_err(|e| e.to_string())?, text, "decoding round-trips");
    }

    // The same numbers from the weights dequantised at load and from the matrices kept in their blocks.
    let kept = read_llama(&path, &Device::Cpu, true)?;
    assert_eq!(kept.weights.quantized.len(), 211, "every Q4_1 and Q8_0 matrix stays quantised");
    for (what, weights) in [("dequantised", gguf.weights), ("quantised", kept.weights)] {
        let pb = weights.into_builder(0, &Device::Cpu)?;
        let model = Llama::new(&pb, &gguf.config)?;
        assert!(pb.finish().initialised().is_empty(), "every parameter comes from the file");
        last_position_logits_match(&model, &reference, 2e-3, what)?;

        // Greedy decoding with the cache, after the chat template's prompt.
        let chat = &reference["chat"];
        let prompt: Vec<u32> = serde_json::from_value(chat["ids"].clone())?;
        let want: Vec<u32> = serde_json::from_value(chat["greedy"].clone())?;
        let mut cache = KvCache::default();
        let mut input = Tensor::from_vec(prompt.clone(), (1, prompt.len()), &Device::Cpu)?;
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let logits = model.logits(&model.forward(&input, None, Some(&mut cache))?)?;
            let next = logits.get(logits.dim(0)? - 1)?.argmax(0)?.to_scalar::<u32>()?;
            got.push(next);
            input = Tensor::from_vec(vec![next], (1, 1), &Device::Cpu)?;
        }
        assert_eq!(got, want, "{what}: greedy continuation: {:?}", tokenizer.decode(&got, false));
    }
    Ok(())
}

/// The logits at the last position of each of `reference["logits"]`'s token lists: the first 16 within
/// `tolerance` of transformers', and the same most likely token.
pub(crate) fn last_position_logits_match(
    model: &Llama,
    reference: &Value,
    tolerance: f64,
    what: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    for case in reference["logits"].as_array().ok_or("logits")? {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let n = ids.len();
        let logits = model.logits(&model.forward(&Tensor::from_vec(ids, (1, n), &Device::Cpu)?, None, None)?)?;
        let last = logits.get(n - 1)?.to_vec1::<f32>()?;
        let want: Vec<f64> = serde_json::from_value(case["first16"].clone())?;
        let diff = last.iter().zip(&want).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
        assert!(diff < tolerance, "{what}: logits differ by {diff}");
        let top: Vec<u32> = serde_json::from_value(case["top10_ids"].clone())?;
        let argmax = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32);
        assert_eq!(argmax, Some(top[0]), "{what}: the most likely token");
    }
    Ok(())
}

#[test]
fn mtl_generate_answers_with_the_chat_template_and_repeats_with_a_seed() -> Result<(), Box<dyn std::error::Error>> {
    let model = repo_root().join("assets/models/SmolLM2-135M-Instruct");
    let run = |extra: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().ok_or("path")?,
            "--chat",
            "--prompt",
            "What is the capital of France?",
        ];
        args.extend(extra);
        let o = crate::cli::mtl(&repo_root(), &args, None)?;
        assert!(o.status.success(), "{}", crate::cli::stderr(&o));
        Ok(String::from_utf8(o.stdout)?)
    };
    // Greedy, to the end-of-turn token: transformers' continuation of the same chat prompt (the fixture's
    // 8 tokens end with <|im_end|>, which stops generation and is not printed).
    assert_eq!(run(&["--max-new-tokens", "16"])?, "The capital of France is Paris.\n");
    let sampled = ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "12"];
    assert_eq!(run(&sampled)?, run(&sampled)?, "the same seed, the same text");
    assert_eq!(run(&["--max-new-tokens", "16", "--stop", " Paris"])?, "The capital of France is\n");
    Ok(())
}

/// `mtl serve` on the decoder: `POST /v1/generate` answers whole or streams server-sent events, with
/// transformers' greedy continuation either way.
#[test]
fn mtl_serve_streams_generated_text_as_server_sent_events() -> Result<(), Box<dyn std::error::Error>> {
    use std::io::{Read, Write};
    let model = repo_root().join("assets/models/SmolLM2-135M-Instruct");
    let (_server, addr) =
        crate::serve::start_server(&repo_root(), &["serve", model.to_str().ok_or("path")?, "--addr", "127.0.0.1:0"])?;
    let post = |body: Value| -> Result<(String, String), Box<dyn std::error::Error>> {
        let mut stream = std::net::TcpStream::connect(&addr)?;
        let body = body.to_string();
        write!(stream, "POST /v1/generate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP header")?;
        Ok((head.to_string(), body.to_string()))
    };
    let ask = serde_json::json!({"prompt": "What is the capital of France?", "chat": true, "max_new_tokens": 16});
    let (head, body) = post(ask.clone())?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let whole: Value = serde_json::from_str(&body)?;
    assert_eq!(whole["text"], "The capital of France is Paris.");
    assert_eq!(whole["stop_reason"], "stop_token");
    let mut streamed = ask;
    streamed["stream"] = true.into();
    let (head, body) = post(streamed)?;
    assert!(head.contains("text/event-stream"), "{head}");
    // Chunked transfer: the events' `data:` lines, in order.
    let data: Vec<Value> =
        body.lines().filter_map(|l| l.strip_prefix("data: ")).map(serde_json::from_str).collect::<Result<_, _>>()?;
    let (done, pieces) = data.split_last().ok_or("events")?;
    assert!(pieces.len() > 3, "one event per piece: {body}");
    let text: String = pieces.iter().filter_map(|p| p["text"].as_str()).collect();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(done["text"], text);
    let (head, _) = post(serde_json::json!({"prompt": "", "stream": true}))?;
    assert!(head.starts_with("HTTP/1.1 422"), "{head}");
    Ok(())
}

/// Llama 3's and Qwen2's word splits against transformers' on SmolLM2's byte-level vocabulary and merges, from
/// tests/fixtures/pretokenizers.json (made by scripts/make_fixtures.py pretokenizers).
#[test]
fn llama3_and_qwen2_word_splits_match_transformers() -> Result<(), Box<dyn std::error::Error>> {
    use mtl_data::bpe::{Vocab, WordSplit};
    let path = repo_root().join("assets/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures/pretokenizers.json"))?)?;
    let Vocab::ByteLevel(vocab) = read_llama(&path, &Device::Cpu, true)?.vocab else {
        panic!("a byte-level vocabulary")
    };
    let ids = |split: WordSplit, text: &str| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        let v = Vocab::ByteLevel(mtl_data::bpe::ByteLevelVocab { split, ..vocab.clone() });
        Ok(mtl_data::bpe::tokenizer(&v, &path)?.encode(text, false).map_err(|e| e.to_string())?.get_ids().to_vec())
    };
    let mut differs = false;
    for (name, split) in [("llama-bpe", WordSplit::Llama3), ("qwen2", WordSplit::Qwen2)] {
        assert_eq!(WordSplit::of_gguf(name), Some(split));
        for case in reference[name].as_array().ok_or("cases")? {
            let text = case["text"].as_str().ok_or("text")?;
            let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
            assert_eq!(ids(split, text)?, want, "{name}: {text:?}");
            differs |= ids(WordSplit::Smollm, text)? != want;
        }
    }
    assert!(differs, "the cases tell these splits from SmolLM2's own");
    Ok(())
}
