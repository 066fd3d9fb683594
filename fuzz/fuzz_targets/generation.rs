//! Generation request parsing and checking, as every POST to `/v1/generate`, `/v1/completions` and
//! `/v1/chat/completions` goes through it before any model work: no input may panic, every refusal must be a
//! 4xx of the error table, and what is accepted must be within the limits (a prompt, a token budget, bounded
//! stop strings, sampling settings that mean something) and name only the model's adapters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtl_serve::api::Settings;
use mtl_serve::generation::{Generation, Models, Prompt, MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS};
use mtl_serve::llm_server::check_generate;
use mtl_serve::openai::check_openai;

/// `models`: the adapters a request may name (`/v1/generate` leaves an unknown one to the engine, a 422).
fn check(g: &Generation, settings: &Settings, models: Option<&Models>) {
    match &g.prompt {
        Prompt::Text(t) => assert!(!t.trim().is_empty() && t.chars().count() <= settings.max_input_chars),
        Prompt::Chat(turns) => assert!(!turns.is_empty()),
        Prompt::Tokens(ids) => assert!(!ids.is_empty()),
    }
    assert!(g.max_new_tokens >= 1 && g.max_new_tokens <= MAX_NEW_TOKENS, "{}", g.max_new_tokens);
    assert!(g.temperature.is_finite() && g.temperature >= 0.0, "{}", g.temperature);
    assert!(g.top_p.is_none_or(|p| p > 0.0 && p <= 1.0), "{:?}", g.top_p);
    assert!(g.top_k != Some(0));
    assert!(g.stop.len() <= MAX_STOP_STRINGS);
    assert!(g.stop.iter().all(|s| !s.is_empty() && s.chars().count() <= MAX_STOP_CHARS));
    if let (Some(a), Some(models)) = (&g.adapter, models) {
        assert!(models.adapters.contains(a), "{a}");
    }
}

fuzz_target!(|data: &[u8]| {
    let settings = Settings { max_input_chars: 256, ..Settings::default() };
    let models = Models { base: "base".into(), base_serves: false, adapters: vec!["intent".into(), "slots".into()] };
    // The first byte picks the route.
    let Some((&route, body)) = data.split_first() else { return };
    match route % 3 {
        0 => match check_generate(body, &settings) {
            Ok(r) => check(&Generation::from(&r), &settings, None),
            Err(e) => assert!(e.status().is_client_error(), "{e:?} is not a client error"),
        },
        n => match check_openai(body, &settings, &models, n == 2) {
            Ok((g, _)) => check(&g, &settings, Some(&models)),
            Err(e) => assert!(e.status().is_client_error(), "{e:?} is not a client error"),
        },
    }
});
