//! Delivering a generation's text to a route: the refusal as the error table's answer, the whole answer by a
//! deadline, or the pieces as they come, with the client-side timings (time to first text, between pieces)
//! and the generated tokens counted in the metrics, per adapter. Dropping what these return (the client left, the deadline passed) drops the channel,
//! which cancels the generation.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::generation::{Finished, Generation, Generator, Refused, Update};
use crate::metrics::Metrics;

/// A generation the generator took: its channel, and the adapter its metrics are counted under.
pub(crate) struct Pending {
    updates: mpsc::UnboundedReceiver<Update>,
    adapter: String,
}

/// Time to the first piece of text, and between pieces, as the client sees them.
struct Timing {
    started: Instant,
    last: Option<Instant>,
}

impl Timing {
    fn new() -> Self {
        Self { started: Instant::now(), last: None }
    }

    fn piece(&mut self, metrics: &Metrics, adapter: &str) {
        let now = Instant::now();
        match self.last {
            None => metrics.first_token(adapter, (now - self.started).as_secs_f64()),
            Some(last) => metrics.inter_token(adapter, (now - last).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

/// Hands a generation to the generator, its refusal as the error table's answer.
pub(crate) fn submit(generator: &dyn Generator, g: Generation) -> Result<Pending, ApiError> {
    let adapter = g.adapter.clone().unwrap_or_default();
    let updates = generator.submit(g).map_err(|refused| match refused {
        Refused::Invalid(m) => ApiError::Validation(m),
        Refused::Full => ApiError::QueueFull,
        Refused::Stopped(m) => ApiError::Internal(m),
    })?;
    Ok(Pending { updates, adapter })
}

/// The whole answer of a generation, by `deadline`; past it the channel is dropped, which cancels the
/// generation.
pub(crate) async fn wait(
    pending: Pending,
    deadline: tokio::time::Instant,
    metrics: &Metrics,
) -> Result<Finished, ApiError> {
    let Pending { mut updates, adapter } = pending;
    let mut timing = Timing::new();
    let answer = async {
        while let Some(update) = updates.recv().await {
            match update {
                Update::Piece(_) => timing.piece(metrics, &adapter),
                Update::Done(result) => return Some(result),
            }
        }
        None
    };
    match tokio::time::timeout_at(deadline, answer).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(None) => Err(ApiError::Internal("the generator dropped the request".into())),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(Some(Ok(f))) => {
            metrics.generated(&adapter, f.new_tokens);
            Ok(f)
        }
    }
}

/// What a streamed generation gives its route to write: pieces of text, then the end or an error.
pub(crate) enum Piece {
    Text(String),
    Done(Finished),
    Error { kind: &'static str, message: String },
}

/// A generation's updates as [`Piece`]s, ending with `timeout` at `deadline`. Dropping the stream (the client
/// left) or reaching the deadline drops the channel, which cancels the generation.
pub(crate) fn pieces(
    pending: Pending,
    deadline: tokio::time::Instant,
    metrics: Arc<Metrics>,
) -> impl futures_util::Stream<Item = Piece> {
    futures_util::stream::unfold(Some((pending, Timing::new())), move |state| {
        let metrics = metrics.clone();
        async move {
            let (mut pending, mut timing) = state?;
            let piece = match tokio::time::timeout_at(deadline, pending.updates.recv()).await {
                Err(_) => Piece::Error { kind: "timeout", message: "no answer within the request timeout".into() },
                Ok(Some(Update::Piece(p))) => {
                    timing.piece(&metrics, &pending.adapter);
                    return Some((Piece::Text(p), Some((pending, timing))));
                }
                Ok(Some(Update::Done(Ok(f)))) => {
                    metrics.generated(&pending.adapter, f.new_tokens);
                    Piece::Done(f)
                }
                Ok(Some(Update::Done(Err(e)))) => {
                    let kind = match e {
                        crate::EngineError::Invalid(_) => "validation",
                        crate::EngineError::Model(_) => "internal",
                    };
                    Piece::Error { kind, message: e.to_string() }
                }
                Ok(None) => Piece::Error { kind: "internal", message: "the generator dropped the request".into() },
            };
            // A stream has answered 200 already: its error is counted here.
            if let Piece::Error { kind, .. } = &piece {
                metrics.error(kind);
            }
            Some((piece, None))
        }
    })
}
