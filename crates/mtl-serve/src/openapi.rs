//! The OpenAPI 3.1 description of the API, served at `GET /openapi.json`: for an encoder, with the model's task
//! names as the values `tasks` may take; for a decoder, its generation routes, and a decoder run's label tasks
//! in the encoder's predict routes.

use serde_json::{json, Value};

use crate::TaskDescription;

/// The document for a server of `tasks`; `secured`: requests need an API key.
pub fn document(tasks: &[TaskDescription], secured: bool) -> Value {
    let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let predictions = json!({"description": "one object per input: each task's answer, as `mtl predict` prints it", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Predictions"}}}});
    let errors = json!({
        "401": error("missing or wrong API key"),
        "413": error("body larger than the limit"),
        "422": error("invalid body or input"),
        "429": error("queue full; retry after the Retry-After seconds"),
        "503": error("no answer within the request timeout"),
    });
    let with_errors = |ok: Value, extra: &[(&str, Value)]| {
        let mut responses = errors.clone();
        responses["200"] = ok;
        for (code, v) in extra {
            responses[*code] = v.clone();
        }
        responses
    };
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "mtl serve", "version": env!("CARGO_PKG_VERSION"), "description": "Every task of one multi-task model, from one backbone."},
        "paths": {
            "/health": {"get": {"summary": "liveness", "security": [], "responses": {"200": {"description": "`{\"status\": \"ok\"}`"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)", "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/v1/tasks": {"get": {"summary": "the model's tasks", "responses": {"200": {"description": "tasks", "content": {"application/json": {"schema": {"type": "object", "properties": {"tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}}}}}}}}},
            "/v1/predict": {"post": {
                "summary": "predict some or all tasks for each input",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}},
                "responses": with_errors(predictions.clone(), &[("404", error("unknown task"))]),
            }},
            "/v1/tasks/{task}/predict": {"post": {
                "summary": "predict one task for each input",
                "parameters": [{"name": "task", "in": "path", "required": true, "schema": {"type": "string", "enum": names}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskRequest"}}}},
                "responses": with_errors(predictions, &[("404", error("unknown task"))]),
            }},
        },
        "components": {"schemas": {
            "Input": {"oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}, "text_pair": {"type": "string"}}},
                {"type": "object", "required": ["words"], "properties": {"words": {"type": "array", "items": {"type": "string"}, "minItems": 1}}},
                {"type": "object", "required": ["question", "context"], "properties": {"question": {"type": "string"}, "context": {"type": "string"}}},
            ]},
            "PredictRequest": {"type": "object", "required": ["inputs"], "additionalProperties": false, "properties": {
                "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Input"}},
                "tasks": {"type": "array", "minItems": 1, "items": {"type": "string", "enum": names}, "description": "default: every task"},
            }},
            "TaskRequest": {"type": "object", "required": ["inputs"], "additionalProperties": false, "properties": {
                "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Input"}},
            }},
            "Predictions": {"type": "object", "properties": {"predictions": {"type": "array", "items": {"type": "object", "additionalProperties": true}}}},
            "Task": {"type": "object", "properties": {"name": {"type": "string"}, "kind": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}}}},
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "kind": {"type": "string", "enum": ["validation", "unknown_task", "queue_full", "body_too_large", "unsupported_media_type", "unauthorized", "forbidden_host", "timeout", "shutting_down", "internal"]},
                "message": {"type": "string"},
            }}}},
        }},
    });
    if secured {
        doc["components"]["securitySchemes"] = json!({"apiKey": {"type": "http", "scheme": "bearer"}});
        doc["security"] = json!([{"apiKey": []}]);
    }
    doc
}

/// Adds `POST /v1/explain` to an encoder server's document.
pub fn add_explain(doc: &mut Value) {
    let names = doc["components"]["schemas"]["PredictRequest"]["properties"]["tasks"]["items"].clone();
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    doc["paths"]["/v1/explain"] = json!({"post": {
        "summary": "explain each task's answer to one input: integrated gradients and gradient × input per token and word",
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["input"], "additionalProperties": false, "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "tasks": {"type": "array", "minItems": 1, "items": names, "description": "default: every task"},
            "steps": {"type": "integer", "minimum": 1, "maximum": crate::MAX_EXPLAIN_STEPS, "default": 50, "description": "points on the integrated-gradients path"},
            "baseline": {"type": "string", "enum": ["pad", "mask", "zero"], "default": "pad"},
            "all_words": {"type": "boolean", "default": false, "description": "token tasks: every word's tag, not only those tagged other than O"},
        }}}}},
        "responses": {
            "200": {"description": "the input's predictions and, per task, each explained output with its attributions (as `mtl explain` prints them)", "content": {"application/json": {"schema": {"type": "object", "additionalProperties": true}}}},
            "401": error("missing or wrong API key"),
            "404": error("unknown task"),
            "413": error("body larger than the limit"),
            "422": error("invalid body or input"),
            "429": error("an explanation is running; retry after the Retry-After seconds"),
            "503": error("no answer within the request timeout"),
        },
    }});
}

/// The document of a decoder's server (`POST /v1/generate`, `crate::generation`), with the predict routes
/// of `tasks` (a decoder run's label tasks) when there are any; `secured`: requests need an API key.
pub fn generation_document(tasks: &[TaskDescription], secured: bool) -> Value {
    let error = |description: &str| json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let max = crate::MAX_NEW_TOKENS;
    let openai_responses = json!({
        "200": {"description": "OpenAI's `text_completion` or `chat.completion`; with `stream`, `data: CHUNK` events then `data: [DONE]`", "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
        "401": error("missing or wrong API key"),
        "404": error("`model` is neither the base model nor a task adapter (GET /v1/models)"),
        "422": error("invalid body, a parameter mtl does not support (`n` > 1, logprobs, penalties, tools), or a prompt the model cannot take"),
        "429": error("queue full; retry after the Retry-After seconds"),
        "503": error("no answer within the request timeout"),
    });
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "mtl serve", "version": env!("CARGO_PKG_VERSION"), "description": "Text generation by one decoder model."},
        "paths": {
            "/health": {"get": {"summary": "liveness", "security": [], "responses": {"200": {"description": "`{\"status\": \"ok\"}`"}, "503": {"description": "`{\"status\": \"unhealthy\", \"reason\": ...}`: the generator cannot serve"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4)", "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/v1/generate": {"post": {
                "summary": "generate a continuation of the prompt, whole or streamed",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}},
                "responses": {
                    "200": {"description": "the whole answer; with `stream`, server-sent events: `data: {\"text\": PIECE}` per piece, then an event `done` with the whole answer (or `error`)", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Generated"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    }},
                    "401": error("missing or wrong API key"),
                    "413": error("body larger than the limit"),
                    "422": error("invalid body, or a prompt the model cannot take (longer than its context, an unknown adapter)"),
                    "500": error("the model failed on this request"),
                    "429": error("queue full; retry after the Retry-After seconds"),
                    "503": error("no answer within the request timeout (a stream ends with an `error` event of kind `timeout`)"),
                },
            }},
            "/v1/completions": {"post": {
                "summary": "OpenAI-compatible completion (`model`: the base model or a task adapter; `prompt`, `max_tokens` (16), `temperature` (1), `top_p`, `seed`, `stop`, `stream`, `stream_options.include_usage`, vLLM's `ignore_eos`); answers and streams in OpenAI's shapes, with `usage`",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["prompt"]}}}},
                "responses": openai_responses.clone(),
            }},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible chat completion (`messages` of system, user and assistant turns through the model's chat template; `max_tokens` or `max_completion_tokens` (512), and the completion's sampling fields)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["messages"]}}}},
                "responses": openai_responses,
            }},
            "/v1/models": {"get": {"summary": "OpenAI-compatible list of the base model and each task adapter", "responses": {"200": {"description": "`{\"object\": \"list\", \"data\": [{\"id\": ...}]}`"}}}},
        },
        "components": {"schemas": {
            "GenerateRequest": {"type": "object", "required": ["prompt"], "additionalProperties": false, "properties": {
                "prompt": {"type": "string", "minLength": 1},
                "chat": {"type": "boolean", "default": false, "description": "the prompt as the user's turn of the model's chat template"},
                "adapter": {"type": "string", "description": "the task adapter to generate through (a run with one adapter per task)"},
                "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": max, "default": 128},
                "temperature": {"type": "number", "minimum": 0, "default": 0, "description": "0: greedy"},
                "top_k": {"type": "integer", "minimum": 1},
                "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "seed": {"type": "integer", "minimum": 0, "default": 0},
                "stop": {"type": "array", "maxItems": crate::generation::MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1, "maxLength": crate::generation::MAX_STOP_CHARS}, "description": "texts that end the answer (not included)"},
                "ignore_eos": {"type": "boolean", "default": false, "description": "generate past the model's end tokens, up to max_new_tokens (benchmarks)"},
                "stream": {"type": "boolean", "default": false},
            }},
            "Generated": {"type": "object", "properties": {
                "text": {"type": "string"},
                "stop_reason": {"type": "string", "enum": ["stop_token", "stop_string", "max_new_tokens", "length", "cancelled"]},
                "prompt_tokens": {"type": "integer"},
                "cached_tokens": {"type": "integer", "description": "prompt tokens taken from the prefix cache"},
                "new_tokens": {"type": "integer"},
            }},
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "kind": {"type": "string", "enum": ["validation", "unknown_model", "queue_full", "body_too_large", "unsupported_media_type", "unauthorized", "forbidden_host", "timeout", "shutting_down", "internal"]},
                "message": {"type": "string"},
            }}}},
        }},
    });
    if !tasks.is_empty() {
        let predict = document(tasks, secured);
        for path in ["/v1/tasks", "/v1/predict", "/v1/tasks/{task}/predict"] {
            doc["paths"][path] = predict["paths"][path].clone();
        }
        for schema in ["Input", "PredictRequest", "TaskRequest", "Predictions", "Task"] {
            doc["components"]["schemas"][schema] = predict["components"]["schemas"][schema].clone();
        }
        doc["components"]["schemas"]["Error"] = predict["components"]["schemas"]["Error"].clone();
        if let Some(kinds) =
            doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["kind"]["enum"].as_array_mut()
        {
            kinds.push(json!("unknown_model"));
        }
        doc["info"]["description"] = json!("Text generation by one decoder model, and its run's label tasks.");
    }
    if secured {
        doc["components"]["securitySchemes"] = json!({"apiKey": {"type": "http", "scheme": "bearer"}});
        doc["security"] = json!([{"apiKey": []}]);
    }
    doc
}
