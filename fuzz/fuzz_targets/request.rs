//! Request parsing and checking, as every POST to `/v1/predict` and `/v1/tasks/{task}/predict` goes through
//! it before any model work: no input may panic, every refusal must be a 4xx of the error table, and what is
//! accepted must be within the limits and name only the model's tasks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtl_serve::api::{check_request, Settings};
use mtl_serve::{RequestInput, TaskDescription};

fuzz_target!(|data: &[u8]| {
    let tasks = [
        TaskDescription {
            name: "intent".into(),
            kind: "classification".into(),
            labels: vec!["flight".into(), "fare".into()],
        },
        TaskDescription {
            name: "slots".into(),
            kind: "token_classification".into(),
            labels: vec!["O".into(), "B-to".into()],
        },
    ];
    let settings = Settings { max_inputs: 4, max_input_chars: 64, ..Settings::default() };
    // The first byte picks the endpoint: /v1/predict, or a known or unknown task's own.
    let Some((&route, body)) = data.split_first() else { return };
    let path_task = match route % 3 {
        0 => None,
        1 => Some("slots"),
        _ => Some("nope"),
    };
    match check_request(body, path_task, &tasks, &settings) {
        Ok((inputs, wanted)) => {
            assert!(!inputs.is_empty() && inputs.len() <= settings.max_inputs);
            assert!(!wanted.is_empty() && wanted.iter().all(|t| tasks.iter().any(|d| &d.name == t)));
            for input in &inputs {
                let chars = match input {
                    RequestInput::Text(t) | RequestInput::Single { text: t } => t.chars().count(),
                    RequestInput::Pair { text, text_pair } => text.chars().count() + text_pair.chars().count(),
                    RequestInput::Words { words } => words.iter().map(|w| w.chars().count() + 1).sum(),
                    RequestInput::Question { question, context } => question.chars().count() + context.chars().count(),
                };
                assert!(chars <= settings.max_input_chars);
            }
        }
        Err(e) => assert!(e.status().is_client_error(), "{e:?} is not a client error"),
    }
});
