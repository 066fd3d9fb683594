//! Regression metrics: Pearson's r and Spearman's ρ as `scipy.stats` computes them (Spearman with average
//! ranks for ties), mean squared and mean absolute error as scikit-learn does. Verified on
//! `tests/fixtures/regression.json` (made by `scripts/make_fixtures.py`).

/// Pearson's correlation coefficient; 0 when either side is constant (where scipy returns NaN).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len(), "pearson: lengths differ; this is a bug");
    if x.len() < 2 {
        return 0.0;
    }
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    (sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)
}

/// Ranks from 1, ties given their average rank (`scipy.stats.rankdata(method="average")`).
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation: Pearson's r of the average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

pub fn mse(gold: &[f64], pred: &[f64]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "mse: lengths differ; this is a bug");
    if gold.is_empty() {
        return 0.0;
    }
    gold.iter().zip(pred).map(|(g, p)| (g - p).powi(2)).sum::<f64>() / gold.len() as f64
}

pub fn mae(gold: &[f64], pred: &[f64]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "mae: lengths differ; this is a bug");
    if gold.is_empty() {
        return 0.0;
    }
    gold.iter().zip(pred).map(|(g, p)| (g - p).abs()).sum::<f64>() / gold.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_get_average_ranks() {
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), 0.0, "constant input");
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 90.0]) - 1.0).abs() < 1e-12);
    }
}
