//! `mtl generate`: text from a decoder model (a Llama-architecture GGUF file), streamed to standard output as
//! it is produced. With `--chat`, the prompt is the user's turn of the model's own chat template.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use mtl_nn::generate::{generate, Limits, Sampling};
use mtl_nn::gguf::read_llama;
use mtl_nn::llama::Llama;
use mtl_nn::ParamBuilder;

/// A loaded decoder: the model, its tokenizer, its chat template and end-of-turn token.
pub struct Decoder {
    pub model: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat: Option<mtl_data::prompt::ChatTemplate>,
    /// Tokens that end generation.
    pub eos: Vec<u32>,
}

/// The GGUF file at `path`, or the one GGUF file in the directory `path`.
pub fn gguf_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_owned());
    }
    let entries = std::fs::read_dir(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "gguf")).collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        0 => bail!("{}: no .gguf file here", path.display()),
        _ => bail!("{}: several .gguf files; name one", path.display()),
    }
}

/// A decoder's weights and what comes with them, before the model is built.
pub struct DecoderFiles {
    /// The GGUF file, or the Hugging Face directory.
    pub source: PathBuf,
    pub config: mtl_nn::llama::LlamaConfig,
    pub weights: std::collections::HashMap<String, candle_core::Tensor>,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
}

/// Whether `path` holds a decoder: a GGUF file (or a directory with one), or a Hugging Face directory whose
/// `config.json` is a Llama's.
pub fn is_decoder(path: &Path) -> bool {
    if gguf_file(path).is_ok() {
        return true;
    }
    let config = std::fs::read_to_string(path.join("config.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&config).is_ok_and(|v| v["model_type"] == "llama")
}

impl DecoderFiles {
    /// The model's chat template, with its begin- and end-of-sequence tokens' texts.
    pub fn chat(&self) -> Result<Option<mtl_data::prompt::ChatTemplate>> {
        let Some(source) = &self.chat_template else { return Ok(None) };
        let text = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default();
        let (bos, eos) = (text(self.config.bos_token_id), text(self.config.eos_token_ids.first().copied()));
        Ok(Some(mtl_data::prompt::ChatTemplate::new(source, &bos, &eos).map_err(anyhow::Error::msg)?))
    }

    /// A GGUF file (dequantised to f32; the tokenizer and chat template from its metadata), or a Hugging Face
    /// directory (`config.json`, `model.safetensors`, `tokenizer.json`, and the chat template of
    /// `tokenizer_config.json` when it has one).
    pub fn load(path: &Path) -> Result<Self> {
        if let Ok(file) = gguf_file(path) {
            let gguf = read_llama(&file, &Device::Cpu)?;
            let tokenizer = mtl_data::bpe::byte_level_bpe(&gguf.vocab, &file)?;
            tracing::info!(types = ?gguf.tensor_types, "loaded {} (dequantised to f32)", file.display());
            return Ok(Self { source: file, config: gguf.config, weights: gguf.weights, tokenizer, chat_template: gguf.chat_template });
        }
        let config = mtl_nn::llama::LlamaConfig::from_file(&path.join("config.json"))?;
        let weights_path = path.join("model.safetensors");
        let weights = candle_core::safetensors::load(&weights_path, &Device::Cpu)
            .with_context(|| format!("{}: cannot read the weights", weights_path.display()))?
            .into_iter()
            .collect();
        let tokenizer_path = path.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tokenizer_path.display()))?;
        let chat_template = std::fs::read_to_string(path.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["chat_template"].as_str().map(String::from));
        Ok(Self { source: path.to_owned(), config, weights, tokenizer, chat_template })
    }
}

impl Decoder {
    pub fn load(path: &Path) -> Result<Self> {
        let files = DecoderFiles::load(path)?;
        let chat = files.chat()?;
        let pb = ParamBuilder::new(files.weights, 0, &Device::Cpu);
        let model = Llama::new(&pb, &files.config)?;
        let missing = pb.finish().initialised().to_vec();
        if !missing.is_empty() {
            bail!("{}: tensors missing: {}", files.source.display(), missing.join(", "));
        }
        Ok(Self { model, tokenizer: files.tokenizer, chat, eos: files.config.eos_token_ids })
    }

    /// `prompt` as the user's turn of the chat template (with the assistant's turn opened).
    pub fn chat_prompt(&self, prompt: &str, system: Option<&str>) -> Result<String> {
        let chat = self.chat.as_ref().context("the model has no chat template; leave out --chat")?;
        chat.user_turn(prompt, system).map_err(anyhow::Error::msg)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("cannot tokenise: {e}"))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }
}

pub struct GenerateArgs<'a> {
    pub model: &'a Path,
    pub prompt: Option<&'a str>,
    pub chat: bool,
    pub system: Option<&'a str>,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    pub stop: &'a [String],
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let decoder = Decoder::load(args.model)?;
    let prompt = match args.prompt {
        Some(p) => p.to_string(),
        None => std::io::read_to_string(std::io::stdin()).context("cannot read the prompt from standard input")?,
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty (--prompt TEXT, or text on standard input)");
    }
    let text = if args.chat { decoder.chat_prompt(&prompt, args.system)? } else { prompt };
    let ids = decoder.encode(&text)?;
    let limits = Limits { max_new_tokens: args.max_new_tokens, stop_tokens: decoder.eos.clone(), stop_strings: args.stop.to_vec() };
    let started = std::time::Instant::now();
    let mut out = std::io::stdout().lock();
    let generated = generate(&decoder.model, &ids, &args.sampling, &limits, |t| decoder.decode(t), |piece| {
        out.write_all(piece.as_bytes()).and_then(|()| out.flush()).is_ok()
    })?;
    writeln!(out)?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        prompt_tokens = ids.len(),
        new_tokens = generated.ids.len(),
        stop = ?generated.stop,
        "{:.1} tokens/s",
        generated.ids.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

impl mtl_serve::generation::Generator for Decoder {
    fn generate(
        &self,
        r: &mtl_serve::generation::GenerateRequest,
        on_piece: &mut dyn FnMut(&str) -> bool,
    ) -> std::result::Result<mtl_serve::generation::Finished, String> {
        let text = if r.chat { self.chat_prompt(&r.prompt, None).map_err(|e| e.to_string())? } else { r.prompt.clone() };
        let ids = self.encode(&text).map_err(|e| e.to_string())?;
        let context = self.model.config().max_position_embeddings;
        if ids.is_empty() || ids.len() >= context {
            return Err(format!("the prompt has {} tokens; the model reads 1 to {} ", ids.len(), context - 1));
        }
        let sampling = Sampling { temperature: r.temperature, top_k: r.top_k, top_p: r.top_p, seed: r.seed };
        let limits = Limits { max_new_tokens: r.max_new_tokens, stop_tokens: self.eos.clone(), stop_strings: r.stop.clone() };
        let generated = generate(&self.model, &ids, &sampling, &limits, |t| self.decode(t), |piece| on_piece(piece)).map_err(|e| e.to_string())?;
        let stop = serde_json::to_value(generated.stop).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        Ok(mtl_serve::generation::Finished { text: generated.text, stop, prompt_tokens: ids.len(), new_tokens: generated.ids.len() })
    }
}
