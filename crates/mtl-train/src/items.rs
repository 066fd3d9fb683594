//! A bar over the inputs of an evaluation or a prediction, when asked for (`mtl eval`, `mtl predict`).

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static ITEMS: AtomicBool = AtomicBool::new(false);

/// Whether evaluation and prediction draw a bar of the inputs done (on stderr, when it is a terminal). Off by
/// default: training draws its own bar, and a server none; `mtl eval` and `mtl predict` turn it on.
pub fn show_item_progress(on: bool) {
    ITEMS.store(on, Ordering::Relaxed);
}

/// A bar over `total` inputs labelled `what`, when item progress is on.
pub(crate) fn items(total: usize, what: &str) -> Option<ProgressBar> {
    if !ITEMS.load(Ordering::Relaxed) || total == 0 {
        return None;
    }
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} inputs (eta {eta})")
            .expect("the progress template is valid; this is a bug")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    Some(bar)
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
        assert_eq!(bar.and_then(|b| b.length()), Some(10));
        assert!(items(0, "x").is_none());
    }
}
