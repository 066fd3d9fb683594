//! Decoding for the Llama decoder: greedy, or sampling with temperature, top-k and top-p (nucleus) from a seeded
//! generator, applied in that order as transformers' `generate` applies its logits processors; stop tokens,
//! stop strings and a token budget. The key/value cache makes each new token one position's work.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::cpu::decoder::DecodeCache;
use crate::layers::DropoutRng;
use crate::llama::{KvCache, Llama, LoraRun};
use crate::peft::Route;
use crate::{Kernels, NnError, Result};
use mtl_core::Mode;

/// Where a generation keeps its keys and values.
enum Cache {
    Host(DecodeCache),
    Tensors(KvCache),
}

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Sample only among the k most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to p (at least one token).
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// When generation stops.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub max_new_tokens: usize,
    /// Tokens that end the output (not included in it), e.g. the end-of-turn token.
    pub stop_tokens: Vec<u32>,
    /// Texts that end the output; it is cut where the first one begins.
    pub stop_strings: Vec<String>,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    StopToken,
    StopString,
    MaxNewTokens,
    /// The model's context is full.
    Length,
    /// The receiver of the text asked to stop.
    Cancelled,
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The generated tokens (a stop token excluded).
    pub ids: Vec<u32>,
    /// Their text, cut at a stop string.
    pub text: String,
    pub stop: StopReason,
}

/// The probabilities sampling draws from (`None` for greedy): temperature, then top-k, then top-p, with every
/// other token at 0.
pub fn sampling_probs(logits: &[f32], s: &Sampling) -> Option<Vec<f32>> {
    if s.temperature <= 0.0 || logits.is_empty() {
        return None;
    }
    let scaled: Vec<f32> = logits.iter().map(|l| l / s.temperature).collect();
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
    let k = s.top_k.filter(|&k| k > 0).unwrap_or(scaled.len()).min(scaled.len());
    // As transformers' top-k: every token scoring at least the k-th one stays (ties included).
    let kth = scaled[order[k - 1]];
    let mut keep: Vec<bool> = scaled.iter().map(|&l| l >= kth).collect();
    let k = keep.iter().filter(|&&x| x).count();
    let softmax = |keep: &[bool]| -> Vec<f32> {
        let max = scaled.iter().zip(keep).filter(|(_, k)| **k).map(|(l, _)| *l).fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scaled.iter().zip(keep).map(|(l, k)| if *k { (l - max).exp() } else { 0.0 }).collect();
        let sum: f32 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    };
    let mut probs = softmax(&keep);
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        // As transformers: drop the tokens whose cumulative probability, most likely first, is past p;
        // the most likely token always stays.
        let mut cumulative = 0.0;
        for (rank, &i) in order[..k].iter().enumerate() {
            if rank > 0 && cumulative >= p {
                keep[i] = false;
            }
            cumulative += probs[i];
        }
        probs = softmax(&keep);
    }
    Some(probs)
}

/// The next token: the argmax for greedy decoding, else a draw from [`sampling_probs`].
pub fn next_token(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    match sampling_probs(logits, s) {
        None => {
            logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map_or(0, |(i, _)| i as u32)
        }
        Some(probs) => {
            let u: f32 = rng.gen();
            let mut cumulative = 0.0;
            let mut last = 0;
            for (i, p) in probs.iter().enumerate() {
                if *p > 0.0 {
                    last = i;
                    cumulative += p;
                    if u < cumulative {
                        return i as u32;
                    }
                }
            }
            last as u32
        }
    }
}

/// One sequence's token chooser: its sampling settings and its own generator seeded from them, so that a
/// sequence draws the same tokens whether it runs alone ([`generate`]) or in a batch with others.
#[derive(Clone, Debug)]
pub struct TokenSampler {
    sampling: Sampling,
    rng: rand_chacha::ChaCha8Rng,
}

impl TokenSampler {
    pub fn new(sampling: Sampling) -> Self {
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
        Self { sampling, rng }
    }

    /// The next token from the last position's logits.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        next_token(logits, &self.sampling, &mut self.rng)
    }
}

/// The text of a generation as its tokens come: what can be sent now, and where a stop string ends it. A piece
/// that ends inside a multi-byte character waits for the next token, and so does text that may be the start of
/// a stop string.
///
/// Decoding is incremental, as vLLM and TGI do it: each token decodes a short window of the latest tokens
/// (from the token before the last piece that came whole), and the text it adds over the same window without it
/// is appended, so a token costs the same at the 4,000th position as at the first. Decoding from a token
/// before keeps the spaces that decoders drop at the start of a text.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    stop_strings: Vec<String>,
    ids: Vec<u32>,
    text: String,
    sent: usize,
    /// The window: tokens `prefix..` are decoded; those of `prefix..read` made text already appended.
    prefix: usize,
    read: usize,
}

/// After this many tokens of no complete text (bytes that never form a character), their text is appended
/// as it decodes (with U+FFFD) and the window moves past them, so that it stays short.
const MAX_PENDING: usize = 8;

/// What one more token made of the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Text to send now (possibly empty).
    pub text: String,
    /// A stop string appeared: the text ends before it and the generation is over.
    pub stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stop_strings` (empty ones are ignored: they would match at once).
    pub fn new(stop_strings: &[String]) -> Self {
        Self { stop_strings: stop_strings.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Self::default() }
    }

    /// The tokens so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The text so far (cut at a stop string once one appeared).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Appends the text of the tokens after `read`: once it ends in a whole character, or when `force`d (the
    /// end), or after [`MAX_PENDING`] tokens without.
    fn advance(&mut self, decode: impl Fn(&[u32]) -> String, force: bool) {
        if self.read == self.ids.len() {
            return;
        }
        let before = match self.prefix < self.read {
            true => decode(&self.ids[self.prefix..self.read]),
            false => String::new(),
        };
        let now = decode(&self.ids[self.prefix..]);
        let whole = !now.ends_with('\u{FFFD}');
        if now.len() <= before.len() || !(whole || force || self.ids.len() - self.read >= MAX_PENDING) {
            return;
        }
        // Text that decodes differently with the new token (byte-fallback tokens that stop forming a
        // character) may not share the old text's last character: the new text starts after it.
        let mut from = before.len();
        while !now.is_char_boundary(from) {
            from += 1;
        }
        self.text.push_str(&now[from..]);
        // The next window starts at the token before (a forced append moves it too, so that it stays short).
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    /// Cuts the text at the first stop string, if one appeared, and returns what of it was not sent yet.
    fn cut_at_stop(&mut self) -> Option<String> {
        // A stop string ends in text not sent yet (text that may start one is held back).
        let longest = self.stop_strings.iter().map(String::len).max().unwrap_or(0);
        let mut search = self.sent.saturating_sub(longest).min(self.text.len());
        while !self.text.is_char_boundary(search) {
            search -= 1;
        }
        let at = self.stop_strings.iter().filter_map(|s| self.text[search..].find(s.as_str())).min()?;
        self.text.truncate(search + at);
        let piece = self.text[self.resume()..].to_string();
        self.sent = self.text.len().max(self.sent);
        Some(piece)
    }

    /// Adds a generated token; `decode` turns tokens into text.
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> String) -> Piece {
        self.ids.push(id);
        self.advance(decode, false);
        if let Some(piece) = self.cut_at_stop() {
            return Piece { text: piece, stopped: true };
        }
        // Hold back a piece that ends in an incomplete character, or in what may be the start of a stop string.
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        let mut hold = 0;
        for s in &self.stop_strings {
            if let Some(cut) =
                (1..s.len()).rev().find(|&c| s.is_char_boundary(c) && self.text[..complete].ends_with(&s[..c]))
            {
                hold = hold.max(cut);
            }
        }
        let ready = complete - hold;
        let mut piece = String::new();
        let from = self.resume();
        if ready > from {
            piece = self.text[from..ready].to_string();
            self.sent = ready;
        }
        Piece { text: piece, stopped: false }
    }

    /// Where the next piece starts: after what was sent, at a character boundary.
    fn resume(&self) -> usize {
        let mut from = self.sent.min(self.text.len());
        while !self.text.is_char_boundary(from) {
            from += 1;
        }
        from
    }

    /// At the end: the text of tokens still waiting to form a character, and what was held back as a possible
    /// stop-string start (an incomplete character stays out of what is sent; the text keeps it as U+FFFD).
    pub fn finish(&mut self, decode: impl Fn(&[u32]) -> String) -> String {
        self.advance(decode, true);
        // Text that only came now may hold a stop string too.
        if let Some(piece) = self.cut_at_stop() {
            return piece;
        }
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        let mut rest = String::new();
        let from = self.resume();
        if complete > from {
            rest = self.text[from..complete].to_string();
            self.sent = complete;
        }
        rest
    }
}

/// Generates from `prompt`. `decode` turns token ids into text (for stop strings and streaming); `on_text`
/// receives each new piece of text as soon as it is complete (a token that ends inside a multi-byte
/// character waits for the next) and returns `false` to stop early (a client that went away).
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    sampling: &Sampling,
    limits: &Limits,
    decode: impl Fn(&[u32]) -> String,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generated> {
    let max_pos = model.config().max_position_embeddings;
    if prompt.is_empty() || prompt.len() >= max_pos {
        return Err(NnError::Input(format!("a prompt of {} tokens does not fit a context of {max_pos}", prompt.len())));
    }
    let mut sampler = TokenSampler::new(sampling.clone());
    // With the fused kernels, the host cache (each step writes its keys and values in place); otherwise the
    // composed ops' cache of tensors. The same numbers either way.
    let mut cache = match model.kernels() {
        Kernels::Fused => {
            let capacity = prompt.len().saturating_add(limits.max_new_tokens).min(max_pos);
            Cache::Host(model.decode_cache(1, capacity))
        }
        Kernels::Composed => Cache::Tensors(KvCache::default()),
    };
    // A model with one LoRA adapter decodes through it; with several, which one is meant?
    if model.lora().is_some_and(|l| l.adapters.len() > 1) {
        return Err(NnError::Input("a decoder with per-task adapters generates through one task's adapter".into()));
    }
    let routes = [Route { adapter: 0, examples: 0..1 }];
    let off = DropoutRng::new(0.0, 0);
    let run = LoraRun { routes: &routes, dropout: &off, mode: Mode::Eval, frozen: true };
    let run = model.lora().is_some().then_some(&run);
    let mut input = prompt.to_vec();
    let mut stream = TextStream::new(&limits.stop_strings);
    let stop = loop {
        if stream.ids().len() >= limits.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        let cached = match &cache {
            Cache::Host(c) => c.len(),
            Cache::Tensors(c) => c.len(),
        };
        if cached + input.len() > max_pos {
            break StopReason::Length;
        }
        let n = input.len();
        let last = match &mut cache {
            Cache::Host(c) => model.decode(&input, &vec![1; n], n, c, run)?,
            Cache::Tensors(c) => {
                let ids = Tensor::from_vec(input.clone(), (1, n), &Device::Cpu)?;
                model.forward(&ids, None, Some(c))?.get(n - 1)?.unsqueeze(0)?
            }
        };
        let logits = model.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?;
        let next = sampler.next(&logits);
        if limits.stop_tokens.contains(&next) {
            break StopReason::StopToken;
        }
        input = vec![next];
        let piece = stream.push(next, &decode);
        if piece.stopped {
            if !piece.text.is_empty() {
                on_text(&piece.text);
            }
            break StopReason::StopString;
        }
        if !piece.text.is_empty() && !on_text(&piece.text) {
            return Ok(Generated {
                ids: stream.ids().to_vec(),
                text: stream.text().to_string(),
                stop: StopReason::Cancelled,
            });
        }
    };
    let rest = stream.finish(&decode);
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generated { ids: stream.ids().to_vec(), text: stream.text().to_string(), stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn temperature_top_k_and_top_p_as_transformers_applies_them() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        assert_eq!(sampling_probs(&logits, &Sampling::default()), None, "greedy draws nothing");
        // T = 1: softmax of (2, 1, 0, -1) = e^x / 11.4752...: 0.6439, 0.2369, 0.0871, 0.0321.
        let full = sampling_probs(&logits, &Sampling { temperature: 1.0, ..Sampling::default() }).expect("sampling");
        assert!(close(&full, &[0.643_914_2, 0.236_882_8, 0.087_144_32, 0.032_058_604]), "{full:?}");
        // T = 2 halves the logits: softmax(1, 0.5, 0, -0.5).
        let t2 = sampling_probs(&logits, &Sampling { temperature: 2.0, ..Sampling::default() }).expect("sampling");
        assert!(close(&t2, &[0.455_054_2, 0.276_004_3, 0.167_405_1, 0.101_536_33]), "{t2:?}");
        // top-k 2: softmax over the two best.
        let k2 = sampling_probs(&logits, &Sampling { temperature: 1.0, top_k: Some(2), ..Sampling::default() })
            .expect("sampling");
        assert!(close(&k2, &[0.731_058_6, 0.268_941_43, 0.0, 0.0]), "{k2:?}");
        // top-p 0.8: 0.6439 < 0.8 keeps the second, 0.8808 >= 0.8 drops the rest.
        let p8 = sampling_probs(&logits, &Sampling { temperature: 1.0, top_p: Some(0.8), ..Sampling::default() })
            .expect("sampling");
        assert!(close(&p8, &[0.731_058_6, 0.268_941_43, 0.0, 0.0]), "{p8:?}");
        // top-k keeps every token tied with the k-th, as transformers' TopKLogitsWarper does.
        let tied = sampling_probs(
            &[1.0, 1.0, 1.0, 0.0],
            &Sampling { temperature: 1.0, top_k: Some(2), ..Sampling::default() },
        )
        .expect("sampling");
        assert!(close(&tied, &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]), "{tied:?}");
        // top-p below the first probability keeps the most likely token alone.
        let p1 = sampling_probs(&logits, &Sampling { temperature: 1.0, top_p: Some(0.1), ..Sampling::default() })
            .expect("sampling");
        assert!(close(&p1, &[1.0, 0.0, 0.0, 0.0]), "{p1:?}");
    }

    #[test]
    fn draws_follow_the_probabilities_and_repeat_with_the_seed() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        let s = Sampling { temperature: 1.0, seed: 5, ..Sampling::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let draws: Vec<u32> = (0..20_000).map(|_| next_token(&logits, &s, &mut rng)).collect();
        let want = sampling_probs(&logits, &s).expect("sampling");
        for (i, p) in want.iter().enumerate() {
            let freq = draws.iter().filter(|&&d| d == i as u32).count() as f32 / draws.len() as f32;
            assert!((freq - p).abs() < 0.01, "token {i}: {freq} vs {p}");
        }
        let mut again = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        assert_eq!(draws, (0..20_000).map(|_| next_token(&logits, &s, &mut again)).collect::<Vec<_>>());
        assert_eq!(next_token(&logits, &Sampling::default(), &mut again), 0, "greedy takes the argmax");
    }

    /// Decoding the tokens again may change text already sent (byte-fallback tokens that stop forming a
    /// character): the stream sends nothing it cannot cut at a character boundary, and never panics.
    #[test]
    fn text_that_changes_behind_what_was_sent_does_not_break_the_stream() {
        let decode = |ids: &[u32]| -> String {
            match ids.len() {
                1 => "é".into(),
                2 => "\u{FFFD}\u{FFFD}\u{FFFD}".into(),
                n => format!("\u{FFFD}\u{FFFD}\u{FFFD}{}", "a".repeat(n - 2)),
            }
        };
        let mut stream = TextStream::new(&["zz".to_string()]);
        assert_eq!(stream.push(1, decode).text, "é");
        assert_eq!(stream.push(2, decode).text, "", "only replacement characters: held back");
        // 2 bytes were sent; the text's first character now spans bytes 0..3: the piece starts after it.
        assert_eq!(stream.push(3, decode), Piece { text: "\u{FFFD}\u{FFFD}a".into(), stopped: false });
        assert_eq!(stream.push(4, decode).text, "a");
        assert_eq!(stream.finish(decode), "");
    }

    /// The stream's text is the whole decode's, though each token decodes only a short window (a decoder that
    /// drops the space before a text's first word, as SentencePiece's does, keeps every space); stop strings
    /// are found across pieces.
    #[test]
    fn incremental_decoding_gives_the_whole_text_from_short_windows() {
        let longest = std::cell::Cell::new(0);
        let decode = |ids: &[u32]| -> String {
            longest.set(longest.get().max(ids.len()));
            ids.iter().map(|i| format!(" w{i}")).collect::<String>().trim_start().to_string()
        };
        let mut stream = TextStream::new(&["w7 w8".to_string()]);
        let mut sent = String::new();
        for id in 0..1000 {
            let piece = stream.push(id % 7, decode);
            assert!(!piece.stopped);
            sent.push_str(&piece.text);
        }
        sent.push_str(&stream.finish(decode));
        assert!(longest.get() <= 3, "windows of at most 3 tokens, not {}", longest.get());
        let ids: Vec<u32> = (0..1000).map(|i| i % 7).collect();
        assert_eq!((sent.as_str(), stream.text()), (decode(&ids).as_str(), decode(&ids).as_str()));
        let mut stream = TextStream::new(&["w7 w8".to_string()]);
        let mut sent = String::new();
        for id in [1, 7, 8, 9] {
            let piece = stream.push(id, decode);
            sent.push_str(&piece.text);
            if piece.stopped {
                break;
            }
        }
        assert_eq!((sent.as_str(), stream.text()), ("w1 ", "w1 "));
    }

    /// Text that comes only at the end (its last token ended inside a character) is cut at a stop string too.
    #[test]
    fn a_stop_string_in_the_text_that_comes_at_the_end_cuts_it() {
        let decode = |ids: &[u32]| -> String {
            ids.iter().map(|&i| if i == 9 { "xSTOPy\u{FFFD}".to_string() } else { format!("w{i} ") }).collect()
        };
        let mut stream = TextStream::new(&["STOP".to_string()]);
        assert_eq!(stream.push(1, decode), Piece { text: "w1 ".into(), stopped: false });
        assert_eq!(stream.push(9, decode).text, "", "an incomplete character waits");
        assert_eq!(stream.finish(decode), "x");
        assert_eq!(stream.text(), "w1 x");
    }
}
