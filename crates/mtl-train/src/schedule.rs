//! Learning-rate schedules, as multipliers of the peak learning rate.

/// Linear warmup from 0 to 1 over `warmup` steps, then linear decay to 0 at `total` steps
/// (transformers' `get_linear_schedule_with_warmup`). `step` counts optimiser steps from 0.
pub fn linear_warmup_decay(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays() {
        // transformers: LambdaLR multipliers for num_warmup_steps=2, num_training_steps=6.
        let got: Vec<f64> = (0..7).map(|s| linear_warmup_decay(s, 2, 6)).collect();
        assert_eq!(got, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(linear_warmup_decay(0, 0, 4), 1.0);
    }
}
