//! Iteration-level batching of generation requests on one decoder (continuous batching: Yu et al. 2022, "Orca";
//! its cache in blocks: Kwon et al. 2023, "PagedAttention").
//!
//! One engine thread owns the model's key/value pool ([`PagedKv`]) and loops: it takes the requests that came,
//! drops those whose client left (queued or running), admits waiting ones first come first served while the
//! pool has free blocks for their prompt and their `max_new_tokens`, and runs one step over the running
//! sequences: the one new token of each decoding sequence, and prompt tokens, up to the prefill budget, for
//! those still reading their prompt, so a long prompt goes in chunks between decoding steps instead of stalling
//! every stream. Each sequence goes through its own task adapter, samples with its own settings and seeded
//! generator (the tokens it would draw alone) and streams its text; a finished sequence gives its blocks back
//! at once, and a waiting request can take them at the next step.
//!
//! With the prefix cache on, a sequence's full blocks are registered under the tokens they hold (prompt and
//! answer) and stay cached after it ends; a request is admitted with the longest cached prefix of its prompt
//! under its adapter ([`PagedKv::share_prefix`]) and computes only the rest: a prompt sent again, or one that
//! starts with the same instructions, reaches its first token sooner. Cached blocks nobody holds count as free
//! and give way, longest idle first, when a request needs them.
//!
//! Blocks are reserved for a request's whole budget when it is admitted, so a running sequence never waits
//! for memory and none is ever preempted; a request whose budget exceeds the whole pool is refused (422) when
//! it is submitted. A step that fails or panics fails the requests in it, gives their blocks back, and the
//! loop goes on.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use mtl_nn::generate::{Sampling, StopReason, TextStream, TokenSampler};
use mtl_nn::llama::{BlockTable, Llama, PagedKv};
use mtl_serve::api::GenerationSettings;
use mtl_serve::generation::{Finished, Generation, Generator, GeneratorStatus, Models, Prompt, Refused, Update};
use mtl_serve::EngineError;
use tokio::sync::mpsc;

use super::files::Decoder;

/// A request ready for the engine.
struct Job {
    /// The sequence's tokens: the prompt, then each generated token once it is fed back (the positions its
    /// cache holds are a prefix of them, which the prefix cache registers).
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Its adapter's index (none for a model without LoRA).
    adapter: Option<usize>,
    /// What its cached keys and values are computed under: the adapter (a prefix cache salt).
    salt: u64,
    sampling: Sampling,
    max_new_tokens: usize,
    /// Positions its sequence may cache: the prompt, and every token it may generate but the last (within the
    /// model's context).
    positions: usize,
    stop: Vec<String>,
    /// End tokens do not end it.
    ignore_eos: bool,
    updates: mpsc::UnboundedSender<Update>,
}

/// A sequence of the running batch.
struct Active {
    job: Job,
    table: BlockTable,
    /// Prompt tokens cached so far, and those of them taken from the prefix cache.
    read: usize,
    cached: usize,
    /// The token the next step feeds: the last one sampled (none while the prompt is being read).
    next: Option<u32>,
    stream: TextStream,
    sampler: TokenSampler,
    done: bool,
}

/// What the engine thread shares with the request handlers.
#[derive(Debug, Default)]
struct Shared {
    queued: AtomicUsize,
    running: AtomicUsize,
    blocks_used: AtomicUsize,
    blocks_cached: AtomicUsize,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    steps: AtomicU64,
    step_sequences: AtomicU64,
    /// Set when the engine thread has ended (it cannot serve any more).
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        match self.failure.lock() {
            Ok(f) => f.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn fail(&self, reason: String) {
        match self.failure.lock() {
            Ok(mut f) => *f = Some(reason),
            Err(poisoned) => *poisoned.into_inner() = Some(reason),
        }
    }
}

/// A decoder served by iteration-level batching: many generations share every step of one model.
pub struct BatchEngine {
    decoder: Arc<Decoder>,
    jobs: std::sync::mpsc::Sender<Job>,
    shared: Arc<Shared>,
    settings: GenerationSettings,
    blocks: usize,
}

impl BatchEngine {
    /// Starts the engine thread over `decoder`, with a key/value pool of `settings.kv_cache_bytes`, and returns
    /// once the pool is allocated and a warm-up step has run (or the thread has failed), so that a server
    /// listens only when its first request will not wait for them.
    pub fn start(decoder: Decoder, settings: GenerationSettings) -> Self {
        let decoder = Arc::new(decoder);
        let block = decoder.model.paged_cache(settings.kv_block, 0).bytes_per_block().max(1);
        let blocks = (settings.kv_cache_bytes / block).max(1);
        let (jobs, receiver) = std::sync::mpsc::channel();
        let (ready, started_up) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::default());
        let (d, s, sh) = (decoder.clone(), settings.clone(), shared.clone());
        let started = std::thread::Builder::new().name("mtl-decode".into()).spawn(move || {
            // The loop runs on a rayon pool's thread, so each step's parallel ops split over that pool.
            let inner = sh.clone();
            let outcome = catch_unwind(AssertUnwindSafe(move || {
                mtl_train::process::on_pool(move || run(&d, &receiver, &inner, &s, blocks, ready));
            }));
            let reason = match outcome {
                Ok(()) => "the generation engine has stopped".to_string(),
                Err(_) => "the generation engine panicked outside a step".to_string(),
            };
            sh.fail(reason);
        });
        match started {
            // An error: the thread ended before it was ready (its failure is recorded).
            Ok(_) => {
                let _ = started_up.recv();
            }
            Err(e) => shared.fail(format!("cannot start the generation engine: {e}")),
        }
        tracing::info!(
            blocks,
            block_positions = settings.kv_block,
            mib = (blocks * block) >> 20,
            max_sequences = settings.max_sequences,
            "generation engine started"
        );
        Self { decoder, jobs, shared, settings, blocks }
    }

    /// The index of the adapter a request names: none for a model without LoRA, the one adapter of a run
    /// with a shared adapter, and the named one of a run with an adapter per task.
    fn adapter(&self, name: Option<&str>) -> Result<Option<usize>, Refused> {
        let names: &[String] = self.decoder.model.lora().map_or(&[], |l| l.adapters.as_slice());
        match (name, names.len()) {
            (None, 0) => Ok(None),
            (None, 1) => Ok(Some(0)),
            (None, _) => Err(Refused::Invalid(format!(
                "the model has an adapter per task; name one in `adapter` (OpenAI's routes: `model`): {}",
                names.join(", ")
            ))),
            (Some(n), 0) => Err(Refused::Invalid(format!("the model has no adapters; `adapter` {n:?} is unknown"))),
            (Some(n), _) => names
                .iter()
                .position(|a| a == n)
                .map(Some)
                .ok_or_else(|| Refused::Invalid(format!("unknown adapter {n:?}; adapters: {}", names.join(", ")))),
        }
    }
}

impl Generator for BatchEngine {
    fn submit(&self, r: Generation) -> Result<mpsc::UnboundedReceiver<Update>, Refused> {
        if let Some(reason) = self.shared.failure() {
            return Err(Refused::Stopped(reason));
        }
        let adapter = self.adapter(r.adapter.as_deref())?;
        let invalid = |e: crate::Error| Refused::Invalid(e.to_string());
        if r.max_new_tokens == 0 {
            return Err(Refused::Invalid("max_new_tokens must be at least 1".into()));
        }
        let sampling = Sampling { temperature: r.temperature, top_k: r.top_k, top_p: r.top_p, seed: r.seed };
        super::check_sampling(&sampling).map_err(invalid)?;
        let prompt = match &r.prompt {
            Prompt::Text(text) => self.decoder.encode(text, false).map_err(invalid)?,
            Prompt::Chat(turns) => {
                let turns: Vec<(&str, &str)> = turns.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
                let text = self.decoder.conversation(&turns).map_err(invalid)?;
                self.decoder.encode(&text, true).map_err(invalid)?
            }
            Prompt::Tokens(ids) => {
                let vocab = self.decoder.model.config().vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Refused::Invalid(format!("token id {bad} is outside the vocabulary ({vocab})")));
                }
                ids.clone()
            }
        };
        let context = self.decoder.model.config().max_position_embeddings;
        if prompt.is_empty() || prompt.len() >= context {
            return Err(Refused::Invalid(format!(
                "the prompt has {} tokens; the model reads 1 to {}",
                prompt.len(),
                context - 1
            )));
        }
        let positions = (prompt.len().saturating_add(r.max_new_tokens) - 1).min(context);
        let need = positions.div_ceil(self.settings.kv_block);
        if need > self.blocks {
            return Err(Refused::Invalid(format!(
                "the prompt and max_new_tokens need {need} key/value blocks; the server has {} (lower \
                 max_new_tokens, or raise kv_cache_mb)",
                self.blocks
            )));
        }
        if self.shared.queued.fetch_add(1, Ordering::SeqCst) >= self.settings.queue_bound {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full);
        }
        let (updates, receiver) = mpsc::unbounded_channel();
        let job = Job {
            max_new_tokens: r.max_new_tokens,
            positions,
            prompt_len: prompt.len(),
            tokens: prompt,
            adapter,
            salt: adapter.map_or(0, |a| a as u64 + 1),
            sampling,
            stop: r.stop,
            ignore_eos: r.ignore_eos,
            updates,
        };
        if self.jobs.send(job).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Stopped(self.shared.failure().unwrap_or_else(|| "the engine has stopped".into())));
        }
        Ok(receiver)
    }

    fn status(&self) -> GeneratorStatus {
        let s = &self.shared;
        GeneratorStatus {
            queued: s.queued.load(Ordering::SeqCst),
            running: s.running.load(Ordering::SeqCst),
            kv_blocks_used: s.blocks_used.load(Ordering::SeqCst),
            kv_blocks_total: self.blocks,
            kv_blocks_cached: s.blocks_cached.load(Ordering::SeqCst),
            prompt_tokens: s.prompt_tokens.load(Ordering::SeqCst),
            cached_prompt_tokens: s.cached_prompt_tokens.load(Ordering::SeqCst),
            steps: s.steps.load(Ordering::SeqCst),
            step_sequences: s.step_sequences.load(Ordering::SeqCst),
            failure: s.failure(),
        }
    }

    fn models(&self) -> Models {
        let adapters = self.decoder.model.lora().map_or_else(Vec::new, |l| l.adapters.clone());
        // With an adapter per task, the base name alone picks none: only the adapters are models to ask for.
        Models { base: self.decoder.name.clone(), base_serves: adapters.len() <= 1, adapters }
    }
}

/// The engine loop (see the module's documentation); returns when every sender is gone.
fn run(
    decoder: &Decoder,
    receiver: &std::sync::mpsc::Receiver<Job>,
    shared: &Shared,
    settings: &GenerationSettings,
    blocks: usize,
    ready: std::sync::mpsc::Sender<()>,
) {
    let model = &decoder.model;
    let mut kv = model.paged_cache(settings.kv_block, blocks);
    if let Err(e) = warm_up(model, &mut kv) {
        tracing::warn!("the warm-up step failed: {e}");
    }
    let _ = ready.send(());
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Active> = Vec::new();
    loop {
        if waiting.is_empty() && running.is_empty() {
            match receiver.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        waiting.extend(receiver.try_iter());
        // Requests whose client left.
        let before = waiting.len();
        waiting.retain(|j| !j.updates.is_closed());
        shared.queued.fetch_sub(before - waiting.len(), Ordering::SeqCst);
        for a in running.iter_mut().filter(|a| a.job.updates.is_closed()) {
            a.done = true;
        }
        retire(&mut running, &mut kv, settings.prefix_cache);
        // Admission, first come first served: a request that does not fit waits for blocks to come back. Its
        // cached prefix leaves at least its last prompt token to compute, whose logits give the first token.
        while running.len() < settings.max_sequences {
            let Some(job) = waiting.front() else { break };
            let mut table = BlockTable::default();
            let cached = match settings.prefix_cache {
                true => kv.share_prefix(&mut table, &job.tokens[..job.prompt_len - 1], job.salt),
                false => 0,
            };
            if !kv.reserve(&mut table, job.positions - cached) {
                kv.release(&mut table);
                break;
            }
            let job = waiting.pop_front().expect("a waiting job was just seen");
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            shared.prompt_tokens.fetch_add(job.prompt_len as u64, Ordering::SeqCst);
            shared.cached_prompt_tokens.fetch_add(cached as u64, Ordering::SeqCst);
            let sampler = TokenSampler::new(job.sampling.clone());
            let stream = TextStream::new(&job.stop);
            running.push(Active { job, table, read: cached, cached, next: None, stream, sampler, done: false });
        }
        if !running.is_empty() {
            let sequences = step(decoder, &mut running, &mut kv, settings);
            shared.steps.fetch_add(1, Ordering::SeqCst);
            shared.step_sequences.fetch_add(sequences as u64, Ordering::SeqCst);
            retire(&mut running, &mut kv, settings.prefix_cache);
        }
        shared.running.store(running.len(), Ordering::SeqCst);
        shared.blocks_used.store(kv.total_blocks() - kv.free_blocks(), Ordering::SeqCst);
        shared.blocks_cached.store(kv.cached_blocks(), Ordering::SeqCst);
    }
}

/// A prompt pass and a decoding step of a throwaway sequence before the first request, as llama.cpp's warm-up
/// run: the first pass through the weights, the thread pool and the scratch buffers costs several times a later
/// one, which would otherwise fall on the first request's time to first token.
fn warm_up(model: &Llama, kv: &mut PagedKv) -> mtl_nn::Result<()> {
    let room = (kv.total_blocks() * kv.block_size()).min(model.config().max_position_embeddings);
    let n = 32.min(room.saturating_sub(1));
    let mut table = BlockTable::default();
    if n == 0 || !kv.reserve(&mut table, n + 1) {
        return Ok(());
    }
    let adapters = model.lora().map(|_| vec![0]);
    let mut pass = |tokens: &[u32]| -> mtl_nn::Result<()> {
        let hidden = model.step(tokens, &mut [(&mut table, tokens.len())], kv, adapters.as_deref())?;
        model.logits(&hidden).map(drop)
    };
    let result = pass(&[0; 32][..n]).and_then(|()| pass(&[0]));
    kv.release(&mut table);
    result
}

/// Gives the blocks of finished sequences back and drops them from the batch; with the prefix cache, what
/// they computed stays cached.
fn retire(running: &mut Vec<Active>, kv: &mut PagedKv, prefix_cache: bool) {
    running.retain_mut(|a| {
        if a.done {
            match prefix_cache {
                true => kv.release_cached(&mut a.table, &a.job.tokens, a.job.salt),
                false => kv.release(&mut a.table),
            }
        }
        !a.done
    });
}

/// Ends a sequence: what its text held back, then how it ended.
fn finish(decoder: &Decoder, a: &mut Active, result: Result<StopReason, EngineError>) {
    a.done = true;
    let result = result.map(|reason| {
        let rest = a.stream.finish(|ids| decoder.decode(ids));
        if !rest.is_empty() {
            let _ = a.job.updates.send(Update::Piece(rest));
        }
        Finished {
            text: a.stream.text().to_string(),
            stop: serde_json::to_value(reason).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            prompt_tokens: a.job.prompt_len,
            cached_tokens: a.cached,
            new_tokens: a.stream.ids().len(),
        }
    });
    let _ = a.job.updates.send(Update::Done(result));
}

/// One step over the running batch: decoding sequences first, then prompt chunks within the prefill budget.
/// With the prefix cache, the blocks the step fills are registered. Returns how many sequences it held.
fn step(decoder: &Decoder, running: &mut [Active], kv: &mut PagedKv, settings: &GenerationSettings) -> usize {
    let model = &decoder.model;
    let prefill_budget = settings.prefill_chunk;
    let mut plan: Vec<(usize, usize)> =
        running.iter().enumerate().filter(|(_, a)| a.next.is_some()).map(|(i, _)| (i, 1)).collect();
    let mut budget = prefill_budget.max(1);
    for (i, a) in running.iter().enumerate().filter(|(_, a)| a.next.is_none()) {
        if budget == 0 {
            break;
        }
        let n = (a.job.prompt_len - a.read).min(budget);
        budget -= n;
        plan.push((i, n));
    }
    // Each adapter's sequences together, so that its LoRA update is one product over their rows.
    plan.sort_by_key(|&(i, _)| (running[i].job.adapter, i));
    let tokens: Vec<u32> = plan
        .iter()
        .flat_map(|&(i, n)| {
            let a = &running[i];
            match a.next {
                Some(t) => vec![t],
                None => a.job.tokens[a.read..a.read + n].to_vec(),
            }
        })
        .collect();
    // The rows whose logits are needed: decoding sequences, and those whose prompt this chunk completes.
    let wanted: Vec<u32> = plan
        .iter()
        .enumerate()
        .filter(|(_, &(i, n))| running[i].next.is_some() || running[i].read + n == running[i].job.prompt_len)
        .map(|(row, _)| row as u32)
        .collect();
    let adapters: Option<Vec<usize>> =
        model.lora().is_some().then(|| plan.iter().map(|&(i, _)| running[i].job.adapter.unwrap_or(0)).collect());
    #[cfg(test)]
    let inject = plan.iter().any(|&(i, _)| running[i].next.is_none() && running[i].job.tokens == tests::PANIC);
    let mut tables: Vec<BlockTable> = plan.iter().map(|&(i, _)| std::mem::take(&mut running[i].table)).collect();
    let outcome = {
        let mut seqs: Vec<(&mut BlockTable, usize)> = tables.iter_mut().zip(&plan).map(|(t, &(_, n))| (t, n)).collect();
        catch_unwind(AssertUnwindSafe(|| -> mtl_nn::Result<Vec<Vec<f32>>> {
            #[cfg(test)]
            if inject {
                panic!("a panic injected by a test");
            }
            let hidden = model.step(&tokens, &mut seqs, kv, adapters.as_deref())?;
            if wanted.is_empty() {
                return Ok(Vec::new());
            }
            let rows = hidden.index_select(&Tensor::from_vec(wanted.clone(), wanted.len(), hidden.device())?, 0)?;
            Ok(model.logits(&rows)?.to_vec2::<f32>()?)
        }))
    };
    for (mut table, &(i, _)) in tables.into_iter().zip(&plan) {
        if settings.prefix_cache && matches!(outcome, Ok(Ok(_))) {
            kv.register(&mut table, &running[i].job.tokens, running[i].job.salt);
        }
        running[i].table = table;
    }
    let logits = match outcome {
        Ok(Ok(logits)) => logits,
        Ok(Err(e)) => {
            fail(running, &plan, &format!("the model failed: {e}"));
            return plan.len();
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            tracing::error!("a generation step panicked: {what}");
            fail(running, &plan, &format!("the model panicked: {what}"));
            return plan.len();
        }
    };
    let context = model.config().max_position_embeddings;
    let mut rows = logits.iter();
    for &(i, n) in &plan {
        let a = &mut running[i];
        if a.next.is_none() {
            a.read += n;
            if a.read < a.job.prompt_len {
                continue;
            }
        }
        let Some(logits) = rows.next() else { break };
        // A panic here (in sampling or decoding text) fails this sequence only.
        let drawn = catch_unwind(AssertUnwindSafe(|| {
            let token = a.sampler.next(logits);
            let ends = !a.job.ignore_eos && decoder.eos.contains(&token);
            let piece = (!ends).then(|| a.stream.push(token, |ids| decoder.decode(ids)));
            (token, piece)
        }));
        let Ok((token, piece)) = drawn else {
            a.done = true;
            let _ = a.job.updates.send(Update::Done(Err(EngineError::Model("decoding the text panicked".into()))));
            continue;
        };
        let Some(piece) = piece else {
            finish(decoder, a, Ok(StopReason::StopToken));
            continue;
        };
        if !piece.text.is_empty() && a.job.updates.send(Update::Piece(piece.text)).is_err() {
            // The client left.
            a.done = true;
            continue;
        }
        let generated = a.stream.ids().len();
        if piece.stopped {
            finish(decoder, a, Ok(StopReason::StopString));
        } else if generated >= a.job.max_new_tokens {
            finish(decoder, a, Ok(StopReason::MaxNewTokens));
        } else if a.job.prompt_len + generated > context {
            finish(decoder, a, Ok(StopReason::Length));
        } else {
            a.next = Some(token);
            a.job.tokens.push(token);
        }
    }
    plan.len()
}

/// Fails the sequences of a step that could not run.
fn fail(running: &mut [Active], plan: &[(usize, usize)], message: &str) {
    for &(i, _) in plan {
        running[i].done = true;
        let _ = running[i].job.updates.send(Update::Done(Err(EngineError::Model(message.to_string()))));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::Device;
    use mtl_nn::llama::{DecoderLora, DecoderModule, Llama, LlamaConfig};
    use mtl_nn::LoraSpec;
    use mtl_nn::ParamBuilder;

    use super::*;
    use crate::decoder::GenerateRequest as AloneRequest;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
    }

    /// A word-level tokenizer over tiny-llama's 64 ids: `w0` … `w63`, decoded joined by spaces.
    fn words() -> tokenizers::Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..64).map(|i| (format!("w{i}"), i.into())).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
        });
        tokenizers::Tokenizer::from_bytes(json.to_string()).expect("a word-level tokenizer")
    }

    /// tiny-llama, with the LoRA adapters of its PEFT fixture named in `adapters` (none: the base alone).
    fn decoder(adapters: &[&str]) -> Decoder {
        let config = LlamaConfig::from_file(&fixture().join("config.json")).expect("config");
        let pb =
            ParamBuilder::from_safetensors(&fixture().join("model.safetensors"), 0, &Device::Cpu).expect("weights");
        let lora = (!adapters.is_empty()).then(|| {
            pb.add_safetensors(&fixture().join("lora.safetensors")).expect("adapters");
            let spec = LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, targets: Vec::new(), svd: false };
            DecoderLora {
                spec,
                modules: DecoderModule::ALL.to_vec(),
                adapters: adapters.iter().map(|a| a.to_string()).collect(),
            }
        });
        let model = Llama::with_lora(&pb, &config, lora.as_ref()).expect("model");
        Decoder { model, tokenizer: words(), chat: None, eos: vec![2], name: "tiny-llama".into() }
    }

    fn prompt(seed: usize, n: usize) -> String {
        (0..n).map(|i| format!("w{}", 3 + (seed * 11 + i * 7) % 61)).collect::<Vec<_>>().join(" ")
    }

    /// Every update of one request: the pieces joined, and how it ended.
    fn collect(mut updates: mpsc::UnboundedReceiver<Update>) -> (String, Result<Finished, EngineError>) {
        let mut text = String::new();
        while let Some(u) = updates.blocking_recv() {
            match u {
                Update::Piece(p) => text.push_str(&p),
                Update::Done(result) => return (text, result),
            }
        }
        panic!("the engine dropped a request");
    }

    fn request(prompt: String, max_new_tokens: usize, temperature: f32, seed: u64, stop: &[&str]) -> Generation {
        Generation {
            prompt: Prompt::Text(prompt),
            adapter: None,
            max_new_tokens,
            temperature,
            top_k: None,
            top_p: (temperature > 0.0).then_some(0.9),
            seed,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
        }
    }

    fn text(g: &Generation) -> String {
        match &g.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(_) | Prompt::Tokens(_) => unreachable!("plain prompts here"),
        }
    }

    /// What `Decoder::generate` answers to `g` alone.
    fn alone(decoder: &Decoder, g: &Generation) -> crate::Generated {
        let request = AloneRequest {
            prompt: text(g),
            chat: false,
            system: None,
            sampling: Sampling { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed },
            max_new_tokens: g.max_new_tokens,
            stop: g.stop.clone(),
        };
        decoder.generate(&request, |_| true).expect("alone")
    }

    /// Waits for the engine to have nothing running and every block back.
    fn idle(engine: &BatchEngine) -> GeneratorStatus {
        for _ in 0..200 {
            let s = engine.status();
            if s.running == 0 && s.queued == 0 && s.kv_blocks_used == 0 {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        engine.status()
    }

    fn settings(kv_blocks: usize) -> GenerationSettings {
        let block = decoder(&[]).model.paged_cache(4, 0).bytes_per_block();
        GenerationSettings {
            max_sequences: 3,
            prefill_chunk: 5,
            kv_cache_bytes: kv_blocks * block,
            kv_block: 4,
            prefix_cache: true,
            queue_bound: 16,
        }
    }

    /// Requests submitted together (greedy and seeded sampling, stop strings, prompts longer than the prefill
    /// budget, more requests than fit at once: three sequences a step, and blocks for about two budgets) each
    /// get the text, tokens and ending that `Decoder::generate` gives it alone; every block comes back.
    #[test]
    fn batched_requests_answer_as_each_alone() {
        let solo = decoder(&[]);
        let engine = BatchEngine::start(decoder(&[]), settings(10));
        let requests: Vec<Generation> = vec![
            request(prompt(1, 3), 9, 0.0, 0, &[]),
            request(prompt(2, 12), 6, 0.0, 0, &[]),
            request(prompt(3, 7), 12, 0.9, 5, &[]),
            request(prompt(4, 2), 10, 0.0, 0, &["w4"]),
            request(prompt(5, 9), 4, 1.2, 11, &[]),
            request(prompt(6, 5), 8, 0.0, 0, &[" w1"]),
        ];
        let receivers: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).expect("accepted")).collect();
        for (r, updates) in requests.iter().zip(receivers) {
            let (streamed, result) = collect(updates);
            let got = result.expect("generated");
            let want = alone(&solo, r);
            assert_eq!((&got.text, got.new_tokens, &got.stop), (&want.text, want.new_tokens, &want.stop), "{r:?}");
            assert_eq!(streamed, got.text, "the pieces make the text");
        }
        let s = idle(&engine);
        assert_eq!((s.running, s.kv_blocks_used, s.kv_blocks_total), (0, 0, 10));
        assert!(s.steps > 0 && s.step_sequences > s.steps, "sequences shared steps: {s:?}");
    }

    /// A client that leaves frees its sequence's blocks; a request that can never fit, or names no adapter of
    /// the model, is refused at once; a full queue refuses more.
    #[test]
    fn leaving_frees_blocks_and_impossible_requests_are_refused() {
        let engine = BatchEngine::start(decoder(&[]), settings(10));
        let mut updates = engine.submit(request(prompt(7, 4), 30, 0.0, 0, &[])).expect("accepted");
        assert!(matches!(updates.blocking_recv(), Some(Update::Piece(_))));
        drop(updates);
        assert_eq!(idle(&engine).kv_blocks_used, 0, "the blocks came back");
        let (_, after) = collect(engine.submit(request(prompt(8, 3), 3, 0.0, 0, &[])).expect("accepted"));
        assert_eq!(after.expect("generated").new_tokens, 3);
        // 10 blocks of 4: 40 positions.
        assert!(matches!(engine.submit(request(prompt(9, 3), 40, 0.0, 0, &[])), Err(Refused::Invalid(_))));
        assert!(matches!(engine.submit(request(prompt(9, 3), 0, 0.0, 0, &[])), Err(Refused::Invalid(_))));
        assert!(matches!(engine.submit(request(prompt(9, 3), 3, -1.0, 0, &[])), Err(Refused::Invalid(_))));
        let named = Generation { adapter: Some("intent".into()), ..request(prompt(9, 3), 3, 0.0, 0, &[]) };
        assert!(matches!(engine.submit(named), Err(Refused::Invalid(m)) if m.contains("no adapters")));
        let one = BatchEngine::start(decoder(&[]), GenerationSettings { queue_bound: 1, ..settings(10) });
        let held: Vec<_> = (0..3).map(|_| one.submit(request(prompt(1, 3), 20, 0.0, 0, &[]))).collect();
        assert!(held.iter().any(|r| matches!(r, Err(Refused::Full))), "a queue of one refuses");
    }

    /// Requests for two LoRA adapters share steps, and each answers as a model with its adapter alone.
    #[test]
    fn each_request_goes_through_its_adapter() {
        let engine = BatchEngine::start(decoder(&["intent", "slots"]), settings(20));
        let unnamed = engine.submit(request(prompt(1, 3), 3, 0.0, 0, &[]));
        assert!(matches!(unnamed, Err(Refused::Invalid(m)) if m.contains("intent, slots")));
        let asks: Vec<(&str, Generation)> = (0..4)
            .map(|i| {
                let adapter = ["intent", "slots"][i % 2];
                (adapter, Generation { adapter: Some(adapter.into()), ..request(prompt(i, 4 + i), 6, 0.0, 0, &[]) })
            })
            .collect();
        let receivers: Vec<_> = asks.iter().map(|(_, r)| engine.submit(r.clone()).expect("accepted")).collect();
        for ((adapter, r), updates) in asks.iter().zip(receivers) {
            let got = collect(updates).1.expect("generated");
            let want = alone(&decoder(&[adapter]), r);
            assert_eq!((got.text, got.new_tokens), (want.text, want.new_tokens), "{adapter}");
        }
    }

    /// A prompt sent again, or one that starts as an earlier one did, takes the cached blocks of that prefix
    /// and answers as it does alone; the same prompt under another adapter shares nothing.
    #[test]
    fn repeated_prefixes_come_from_the_cache() {
        let solo = decoder(&[]);
        let engine = BatchEngine::start(decoder(&[]), settings(40));
        let long = prompt(3, 14);
        let ask = |r: &Generation| collect(engine.submit(r.clone()).expect("accepted")).1.expect("generated");
        let first = request(long.clone(), 6, 0.0, 0, &[]);
        let (a, b) = (ask(&first), ask(&first));
        let want = alone(&solo, &first);
        assert_eq!((a.cached_tokens, b.cached_tokens), (0, 13), "all but the last prompt token, the second time");
        for got in [&a, &b] {
            assert_eq!((&got.text, got.new_tokens), (&want.text, want.new_tokens));
        }
        // The first 10 words of `long` (two blocks of 4, and 2 of the third), then others.
        let words: Vec<&str> = long.split(' ').collect();
        let other = request(format!("{} w60 w61", words[..10].join(" ")), 6, 0.9, 3, &[]);
        let c = ask(&other);
        let want = alone(&solo, &other);
        assert_eq!((c.cached_tokens, &c.text, c.new_tokens), (10, &want.text, want.new_tokens));
        let s = idle(&engine);
        assert!(s.kv_blocks_cached > 0, "{s:?}");
        assert_eq!((s.prompt_tokens, s.cached_prompt_tokens), (14 + 14 + 12, 13 + 10));

        let engine = BatchEngine::start(decoder(&["intent", "slots"]), settings(40));
        let under = |adapter: &str| Generation { adapter: Some(adapter.into()), ..first.clone() };
        let ask = |r: &Generation| collect(engine.submit(r.clone()).expect("accepted")).1.expect("generated");
        let (i1, s1, i2) = (ask(&under("intent")), ask(&under("slots")), ask(&under("intent")));
        assert_eq!((i1.cached_tokens, s1.cached_tokens, i2.cached_tokens), (0, 0, 13));
        let want = alone(&decoder(&["slots"]), &under("slots"));
        assert_eq!((s1.text, s1.new_tokens), (want.text, want.new_tokens));
        assert_eq!((i2.text, i2.new_tokens), (i1.text, i1.new_tokens));
    }

    /// With `ignore_eos`, an answer that would end at the end token goes on to `max_new_tokens`, the same text
    /// up to there.
    #[test]
    fn ignore_eos_generates_to_max_new_tokens() {
        let solo = decoder(&[]);
        let engine = BatchEngine::start(decoder(&[]), settings(40));
        let ended = (0..40)
            .map(|seed| request(prompt(seed, 3), 24, 0.0, 0, &[]))
            .find(|r| alone(&solo, r).stop == "stop_token")
            .expect("some prompt of the tiny model ends at its end token");
        let want = alone(&solo, &ended);
        let (_, got) = collect(engine.submit(Generation { ignore_eos: true, ..ended.clone() }).expect("accepted"));
        let got = got.expect("generated");
        assert_eq!((got.new_tokens, got.stop.as_str()), (24, "max_new_tokens"));
        assert!(got.text.starts_with(&want.text) && got.text.len() > want.text.len(), "{got:?} after {want:?}");
    }

    /// A step that reads this prompt panics (the panic test's prompt; `prompt` never makes token 1, and
    /// only prompts are compared, not generated tokens).
    pub(super) const PANIC: &[u32] = &[1, 1, 1, 5];

    /// A step that panics fails the requests in it, gives their blocks back, and the engine goes on: the next
    /// request is answered and the engine reports no failure.
    #[test]
    fn a_panic_fails_its_step_only() {
        let engine = BatchEngine::start(decoder(&[]), settings(10));
        let (_, failed) = collect(engine.submit(request("w1 w1 w1 w5".into(), 5, 0.0, 0, &[])).expect("accepted"));
        assert!(matches!(failed, Err(EngineError::Model(m)) if m.contains("panicked")));
        let (_, after) = collect(engine.submit(request(prompt(2, 3), 5, 0.0, 0, &[])).expect("accepted"));
        assert_eq!(after.expect("generated").new_tokens, 5);
        let s = idle(&engine);
        assert_eq!((s.kv_blocks_used, s.failure), (0, None));
    }
}
