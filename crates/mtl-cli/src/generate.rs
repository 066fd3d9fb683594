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
    pub chat_template: Option<String>,
    /// Tokens that end generation.
    pub eos: Vec<u32>,
}

/// The GGUF file at `path`, or the one GGUF file in the directory `path`.
fn gguf_file(path: &Path) -> Result<PathBuf> {
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

impl Decoder {
    pub fn load(path: &Path) -> Result<Self> {
        let file = gguf_file(path)?;
        let gguf = read_llama(&file, &Device::Cpu)?;
        let tokenizer = mtl_data::bpe::byte_level_bpe(&gguf.vocab, &file)?;
        let pb = ParamBuilder::new(gguf.weights, 0, &Device::Cpu);
        let model = Llama::new(&pb, &gguf.config)?;
        let missing = pb.finish().initialised().to_vec();
        if !missing.is_empty() {
            bail!("{}: tensors missing: {}", file.display(), missing.join(", "));
        }
        tracing::info!(types = ?gguf.tensor_types, "loaded {} (dequantised to f32)", file.display());
        Ok(Self { model, tokenizer, chat_template: gguf.chat_template, eos: gguf.config.eos_token_ids })
    }

    /// `prompt` as the user's turn of the chat template (with the assistant's turn opened).
    pub fn chat_prompt(&self, prompt: &str, system: Option<&str>) -> Result<String> {
        let template = self.chat_template.as_deref().context("the model has no chat template; leave out --chat")?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).context("the model's chat template does not parse")?;
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(minijinja::context! { role => "system", content => s });
        }
        messages.push(minijinja::context! { role => "user", content => prompt });
        let ctx = minijinja::context! { messages => messages, add_generation_prompt => true, bos_token => "", eos_token => "" };
        env.get_template("chat")?.render(ctx).context("the model's chat template failed")
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
