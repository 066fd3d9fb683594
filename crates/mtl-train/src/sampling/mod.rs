//! Task samplers for the `sampled` step plan: which task each optimiser step trains. Each sampler gives the
//! probability of every task at a point of training (`progress` from 0 at the first epoch to 1 at the last);
//! [`draw_tasks`] turns them into a seeded sequence of tasks.

mod annealed;
mod fixed;
mod proportional;
mod round_robin;
mod temperature;
mod uniform;

use mtl_config::{SamplerKind, SamplingConfig};
use rand::{Rng, SeedableRng};

pub use annealed::Annealed;
pub use fixed::Fixed;
pub use proportional::Proportional;
pub use round_robin::RoundRobin;
pub use temperature::Temperature;
pub use uniform::Uniform;

/// Chooses tasks by index (tasks in name order).
pub trait TaskSampler: Send {
    /// Each task's probability at `progress` ∈ [0, 1]; they sum to 1.
    fn probabilities(&self, progress: f64) -> Vec<f64>;

    /// Deterministic samplers (round-robin) choose the task of step `step` themselves.
    fn fixed_choice(&self, _step: usize) -> Option<usize> {
        None
    }
}

/// The sampler a config asks for, over tasks with `sizes` training examples (in task-name order).
pub fn sampler(config: &SamplingConfig, sizes: &[usize], weights: Vec<f64>) -> Box<dyn TaskSampler> {
    match config.sampler {
        SamplerKind::Uniform => Box::new(Uniform { tasks: sizes.len() }),
        SamplerKind::Proportional => Box::new(Proportional { sizes: sizes.to_vec() }),
        SamplerKind::Temperature => {
            Box::new(Temperature { sizes: sizes.to_vec(), temperature: config.temperature, cap: config.cap })
        }
        SamplerKind::Annealed => Box::new(Annealed { sizes: sizes.to_vec() }),
        SamplerKind::RoundRobin => Box::new(RoundRobin { tasks: sizes.len() }),
        SamplerKind::Fixed => Box::new(Fixed { weights }),
    }
}

/// Normalises non-negative scores into probabilities (uniform when they are all 0).
pub(crate) fn normalise(scores: Vec<f64>) -> Vec<f64> {
    let total: f64 = scores.iter().sum();
    if total <= 0.0 {
        let n = scores.len().max(1) as f64;
        return vec![1.0 / n; scores.len()];
    }
    scores.into_iter().map(|s| s / total).collect()
}

/// The tasks of `steps` consecutive steps starting at step `first`, drawn with a generator seeded by `seed`.
pub fn draw_tasks(sampler: &dyn TaskSampler, progress: f64, first: usize, steps: usize, seed: u64) -> Vec<usize> {
    let p = sampler.probabilities(progress);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (first..first + steps)
        .map(|step| {
            if let Some(task) = sampler.fixed_choice(step) {
                return task;
            }
            let u: f64 = rng.gen();
            let mut acc = 0.0;
            for (i, &pi) in p.iter().enumerate() {
                acc += pi;
                if u < acc {
                    return i;
                }
            }
            p.iter().rposition(|&pi| pi > 0.0).unwrap_or(0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn hand_computed_probabilities() {
        let sizes = [100usize, 400, 900];
        assert!(close(&Uniform { tasks: 3 }.probabilities(0.0), &[1.0 / 3.0; 3]));
        assert!(close(&Proportional { sizes: sizes.to_vec() }.probabilities(0.5), &[0.1 / 1.4, 0.4 / 1.4, 0.9 / 1.4]));
        // T = 2: sqrt sizes 10, 20, 30.
        let t = Temperature { sizes: sizes.to_vec(), temperature: 2.0, cap: None };
        assert!(close(&t.probabilities(0.0), &[10.0 / 60.0, 20.0 / 60.0, 30.0 / 60.0]));
        // The cap counts the largest task as 400: sqrt 10, 20, 20.
        let t = Temperature { sizes: sizes.to_vec(), temperature: 2.0, cap: Some(400) };
        assert!(close(&t.probabilities(0.0), &[0.2, 0.4, 0.4]));
        // Annealed: alpha 1 at the start (proportional), 0.2 at the end, 0.6 half way.
        let a = Annealed { sizes: sizes.to_vec() };
        assert!(close(&a.probabilities(0.0), &Proportional { sizes: sizes.to_vec() }.probabilities(0.0)));
        let end: Vec<f64> = sizes.iter().map(|&n| (n as f64).powf(0.2)).collect();
        assert!(close(&a.probabilities(1.0), &normalise(end)));
        assert!(close(&Fixed { weights: vec![1.0, 0.0, 3.0] }.probabilities(0.3), &[0.25, 0.0, 0.75]));
        let rr = RoundRobin { tasks: 3 };
        assert_eq!(draw_tasks(&rr, 0.0, 4, 5, 9), vec![1, 2, 0, 1, 2]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, rng_seed: proptest::test_runner::RngSeed::Fixed(17), ..ProptestConfig::default() })]

        /// Over many seeded draws, each task's share is its probability (within 4 standard deviations).
        #[test]
        fn empirical_frequencies_match(sizes in proptest::collection::vec(1usize..5000, 1..6), t in 1.0f64..8.0, seed in any::<u64>()) {
            let s = Temperature { sizes: sizes.clone(), temperature: t, cap: None };
            let p = s.probabilities(0.0);
            prop_assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let n = 20_000;
            let draws = draw_tasks(&s, 0.0, 0, n, seed);
            for (i, &pi) in p.iter().enumerate() {
                let share = draws.iter().filter(|&&d| d == i).count() as f64 / n as f64;
                let sd = (pi * (1.0 - pi) / n as f64).sqrt();
                prop_assert!((share - pi).abs() <= 4.0 * sd + 1e-9, "task {i}: share {share} vs p {pi}");
            }
            prop_assert_eq!(draws, draw_tasks(&s, 0.0, 0, n, seed), "seeded");
        }
    }
}
