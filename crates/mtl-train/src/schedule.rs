//! Learning-rate schedules, as multipliers of the peak learning rate, with transformers' formulas
//! (`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup`, `get_constant_schedule_with_warmup`).

use mtl_config::Schedule;

/// Linear warmup from 0 to 1 over `warmup` steps, then linear decay to 0 at `total` steps. `step` counts
/// optimiser steps from 0.
pub fn linear_warmup_decay(step: usize, warmup: usize, total: usize) -> f64 {
    lr_scale(Schedule::Linear, step, warmup, total)
}

/// The multiplier of the peak learning rate at `step` (from 0): a linear warmup over `warmup` steps, then
/// `schedule` until `total`.
pub fn lr_scale(schedule: Schedule, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    match schedule {
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        Schedule::Constant => 1.0,
    }
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

    /// transformers 5.24 `get_cosine_schedule_with_warmup(opt, 2, 6)` and `get_constant_schedule_with_warmup(opt,
    /// 2)`: the LambdaLR multipliers of steps 0..=6.
    #[test]
    fn cosine_and_constant_match_transformers() {
        let cosine = [0.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627, 0.0];
        for (s, want) in cosine.iter().enumerate() {
            let got = lr_scale(Schedule::Cosine, s, 2, 6);
            assert!((got - want).abs() < 1e-12, "step {s}: {got} vs {want}");
        }
        let constant: Vec<f64> = (0..7).map(|s| lr_scale(Schedule::Constant, s, 2, 6)).collect();
        assert_eq!(constant, vec![0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
