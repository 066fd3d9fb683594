//! A decoder's files (a Llama-architecture GGUF file, or a Hugging Face directory) and the plain decoder for
//! free generation, streamed piece by piece as it is produced.

use std::path::{Path, PathBuf};

use candle_core::Device;
use mtl_nn::generate::{generate, Limits, Sampling};
use mtl_nn::gguf::read_llama;
use mtl_nn::llama::Llama;

use crate::error::{bail, Error, Result};

/// A loaded decoder: the model, its tokenizer, its chat template and end-of-turn token.
pub struct Decoder {
    pub model: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat: Option<mtl_data::prompt::ChatTemplate>,
    /// Tokens that end generation.
    pub eos: Vec<u32>,
    /// What `/v1/models` calls the base model: its file or directory name.
    pub name: String,
}

/// A decoder's weights and what comes with them, before the model is built.
pub struct DecoderFiles {
    /// The GGUF file, or the Hugging Face directory.
    pub source: PathBuf,
    pub config: mtl_nn::llama::LlamaConfig,
    pub weights: mtl_nn::llama::LlamaWeights,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
}

impl DecoderFiles {
    /// The model's chat template, with its begin- and end-of-sequence tokens' texts.
    pub fn chat(&self) -> Result<Option<mtl_data::prompt::ChatTemplate>> {
        let Some(source) = &self.chat_template else { return Ok(None) };
        let text = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default();
        let (bos, eos) = (text(self.config.bos_token_id), text(self.config.eos_token_ids.first().copied()));
        Ok(Some(mtl_data::prompt::ChatTemplate::new(source, &bos, &eos).map_err(Error::Usage)?))
    }

    /// A GGUF file (the tokenizer and chat template from its metadata; its quantised matrices kept as they are
    /// when `keep_quantized`, for a frozen base, or dequantised to f32 for full fine-tuning), or a Hugging Face
    /// directory (`config.json`, `model.safetensors` or the shards of `model.safetensors.index.json`,
    /// `tokenizer.json`, and the chat template of `chat_template.jinja` or `tokenizer_config.json`).
    pub fn load(path: &Path, keep_quantized: bool) -> Result<Self> {
        if let Some(file) = crate::arch::gguf_file(path)? {
            let gguf = read_llama(&file, &Device::Cpu, keep_quantized)?;
            let tokenizer = mtl_data::bpe::tokenizer(&gguf.vocab, &file)?;
            let quantized = gguf.weights.quantized_bytes();
            match quantized {
                0 => tracing::info!(types = ?gguf.tensor_types, "loaded {} (dequantised to f32)", file.display()),
                bytes => tracing::info!(
                    types = ?gguf.tensor_types,
                    "loaded {} ({} matrices kept quantised, {:.0} MB)",
                    file.display(),
                    gguf.weights.quantized.len(),
                    bytes as f64 / 1e6
                ),
            }
            return Ok(Self {
                source: file,
                config: gguf.config,
                weights: gguf.weights,
                tokenizer,
                chat_template: gguf.chat_template,
            });
        }
        let config = mtl_nn::llama::LlamaConfig::from_file(&path.join("config.json"))?;
        // `model.safetensors`, or the shards of `model.safetensors.index.json`; bf16 and f16 weights become f32.
        let mut weights = std::collections::HashMap::new();
        for file in crate::manifest::weight_files(path)? {
            if !file.is_file() {
                return Err(Error::Missing { path: file, what: "model weights" });
            }
            if file.ends_with(crate::manifest::PYTORCH_WEIGHTS) {
                return Err(Error::Unsupported {
                    run: file,
                    message: "a decoder's weights are read from model.safetensors (or a GGUF file); pytorch_model.bin is read for encoders".into(),
                });
            }
            let shard = candle_core::safetensors::load(&file, &Device::Cpu)
                .map_err(|e| Error::Invalid { path: file.clone(), message: format!("cannot read the weights: {e}") })?;
            for (name, tensor) in shard {
                let tensor = tensor.to_dtype(candle_core::DType::F32)?;
                if weights.insert(name.clone(), tensor).is_some() {
                    return Err(Error::Invalid {
                        path: file,
                        message: format!("tensor `{name}` is in another shard too"),
                    });
                }
            }
        }
        let tokenizer_path = path.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::Invalid {
            path: tokenizer_path.clone(),
            message: format!("cannot load tokenizer: {e}"),
        })?;
        // transformers writes the chat template to `chat_template.jinja` (since 4.43); older models keep it in
        // `tokenizer_config.json`.
        let jinja = path.join("chat_template.jinja");
        let chat_template = match jinja.is_file() {
            true => Some(crate::error::read_text(&jinja)?),
            false => std::fs::read_to_string(path.join("tokenizer_config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["chat_template"].as_str().map(String::from)),
        };
        Ok(Self { source: path.to_owned(), config, weights: weights.into(), tokenizer, chat_template })
    }
}

impl Decoder {
    pub fn load(path: &Path) -> Result<Self> {
        let files = DecoderFiles::load(path, true)?;
        let chat = files.chat()?;
        let pb = files.weights.into_builder(0, &Device::Cpu)?;
        let model = Llama::new(&pb, &files.config)?;
        let missing = pb.finish().initialised().to_vec();
        if !missing.is_empty() {
            return Err(Error::Invalid {
                path: files.source,
                message: format!("tensors missing: {}", missing.join(", ")),
            });
        }
        let name = model_name(&files.source);
        Ok(Self { model, tokenizer: files.tokenizer, chat, eos: files.config.eos_token_ids, name })
    }

    /// `prompt` as the user's turn of the chat template (with the assistant's turn opened).
    pub fn chat_prompt(&self, prompt: &str, system: Option<&str>) -> Result<String> {
        let Some(chat) = self.chat.as_ref() else { bail!("the model has no chat template; leave out --chat") };
        chat.user_turn(prompt, system).map_err(Error::Usage)
    }

    /// A conversation of (role, content) turns as the chat template writes it, the assistant's turn opened.
    pub fn conversation(&self, turns: &[(&str, &str)]) -> Result<String> {
        let Some(chat) = self.chat.as_ref() else { bail!("the model has no chat template; send a plain prompt") };
        chat.render(turns).map_err(Error::Usage)
    }

    /// The tokens of a prompt. A chat prompt's template writes its own begin-of-sequence token; a plain
    /// prompt gets the tokenizer's special tokens, as transformers' tokenizer adds them (Gemma's `<bos>`;
    /// SmolLM2's tokenizer adds none).
    pub fn encode(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, !chat)
            .map_err(|e| Error::Usage(format!("cannot tokenise: {e}")))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }
}

/// A model's name from its file or directory: the file name without `.gguf`, or the directory's name.
pub(crate) fn model_name(source: &Path) -> String {
    let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}

/// What to generate: a prompt (sent as the user's turn of the chat template with `chat`), how to sample and
/// when to stop.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    pub chat: bool,
    /// With `chat`, a system turn before it.
    pub system: Option<String>,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Stop where one of these texts appears.
    pub stop: Vec<String>,
}

/// Checks sampling settings before anything is loaded: a temperature of 0 (greedy) or more, top-p in (0, 1].
pub fn check_sampling(sampling: &Sampling) -> Result<()> {
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        bail!("--temperature must be 0 (greedy) or positive, got {}", sampling.temperature);
    }
    if sampling.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        bail!("--top-p must be in (0, 1]");
    }
    Ok(())
}

/// What a generation produced.
#[derive(Clone, Debug)]
pub struct Generated {
    pub text: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// Why it stopped: `eos`, `stop` or `length`.
    pub stop: String,
    pub seconds: f64,
}

impl Decoder {
    /// Generates for `request`, handing each new piece of text to `on_piece` (which returns `false` to stop).
    pub fn generate(&self, request: &GenerateRequest, mut on_piece: impl FnMut(&str) -> bool) -> Result<Generated> {
        check_sampling(&request.sampling)?;
        if request.prompt.trim().is_empty() {
            bail!("the prompt is empty (--prompt TEXT, or text on standard input)");
        }
        let text = match request.chat {
            true => self.chat_prompt(&request.prompt, request.system.as_deref())?,
            false => request.prompt.clone(),
        };
        let ids = self.encode(&text, request.chat)?;
        let limits = Limits {
            max_new_tokens: request.max_new_tokens,
            stop_tokens: self.eos.clone(),
            stop_strings: request.stop.clone(),
        };
        let started = std::time::Instant::now();
        let generated =
            generate(&self.model, &ids, &request.sampling, &limits, |t| self.decode(t), |piece| on_piece(piece))?;
        let stop =
            serde_json::to_value(generated.stop).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        Ok(Generated {
            text: generated.text,
            prompt_tokens: ids.len(),
            new_tokens: generated.ids.len(),
            stop,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
