//! A bar over the inputs of an evaluation or a prediction, when asked for (`mtl eval`, `mtl predict`), drawn
//! on the terminal or sent to the host's progress sink.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use crate::sink::{Progress, Sink};

static ITEMS: AtomicBool = AtomicBool::new(false);

/// Whether evaluation and prediction draw a bar of the inputs done (on stderr, when it is a terminal). Off by
/// default: training draws its own bar, and a server none; `mtl eval` and `mtl predict` turn it on.
pub fn show_item_progress(on: bool) {
    ITEMS.store(on, Ordering::Relaxed);
}

/// A bar over items (inputs, or the tasks of an export): drawn, or sent to a sink.
pub enum ItemBar {
    Drawn(ProgressBar),
    Sent { sink: Sink, position: u64 },
}

impl ItemBar {
    pub fn inc(&mut self, n: usize) {
        match self {
            ItemBar::Drawn(bar) => bar.inc(n as u64),
            ItemBar::Sent { sink, position } => {
                *position += n as u64;
                sink(Progress::Position { position: *position, message: String::new() });
            }
        }
    }

    pub fn finish(self) {
        match self {
            ItemBar::Drawn(bar) => bar.finish_and_clear(),
            ItemBar::Sent { sink, .. } => sink(Progress::Finish),
        }
    }
}

/// A bar over `total` inputs labelled `what`, when item progress is on.
pub(crate) fn items(total: usize, what: &str) -> Option<ItemBar> {
    bar(total, what, "inputs")
}

/// A bar over `total` items of `unit` (`tasks`) labelled `what`, when item progress is on.
pub fn bar(total: usize, what: &str, unit: &'static str) -> Option<ItemBar> {
    if !ITEMS.load(Ordering::Relaxed) || total == 0 {
        return None;
    }
    if let Some(sink) = crate::sink::sink() {
        if crate::sink::training() {
            return None;
        }
        sink(Progress::Start { what: what.to_string(), total: total as u64, unit });
        return Some(ItemBar::Sent { sink, position: 0 });
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} (eta {{eta}})"
        ))
        .expect("the progress template is valid; this is a bug")
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    Some(ItemBar::Drawn(bar))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_bars_only_when_asked_for() {
        assert!(items(10, "x").is_none(), "off by default");
        show_item_progress(true);
        let bar = items(10, "x");
        show_item_progress(false);
        assert!(matches!(bar, Some(ItemBar::Drawn(b)) if b.length() == Some(10)));
        assert!(items(0, "x").is_none());
    }
}
