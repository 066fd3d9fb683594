//! Human-readable reports of scores.

use mtl::Scores;

/// A table of `split task metric value` rows.
pub fn table(splits: &[(&str, &Scores)]) -> String {
    let mut rows = vec![["split".to_string(), "task".into(), "metric".into(), "value".into()]];
    for (split, scores) in splits {
        for (group, metrics) in scores.iter() {
            for (metric, value) in metrics {
                rows.push([split.to_string(), group.clone(), metric.clone(), format!("{value:.4}")]);
            }
        }
    }
    let widths: Vec<usize> = (0..4).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            cells.join("  ").trim_end().to_string() + "\n"
        })
        .collect()
}
