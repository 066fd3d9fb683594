//! Branch-free `exp`, `erf` and GELU for loops the compiler vectorises. `simd` runs a closure compiled for
//! the best instruction set the CPU has (AVX2 + FMA or AVX-512 where present), chosen at run time, so the
//! binary stays portable.

/// Runs `f` with the widest vector instructions this CPU supports enabled (through `pulp`'s dispatch).
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// `eˣ` with a relative error below 3e-7 (two ulp); exactly 0 below -87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    // x = k ln2 + r with |r| <= ln2 / 2, then eˣ = 2ᵏ eʳ, eʳ by its Taylor polynomial to r⁶ (error < r⁷/7!).
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer without a call to `floorf`.
    const ROUND: f32 = 12_582_912.0;
    let k = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_k
    }
}

/// The error function, absolute error below 5e-7 (Abramowitz & Stegun 7.1.26, 1.5e-7, evaluated in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The exact GELU, `x Φ(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `d gelu(x) / dx = Φ(x) + x φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            worst = worst.max(((f64::from(exp(x)) - want) / want).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_and_gelu_match_f64_references() {
        // erf(x) in f64: its Taylor series up to |x| = 2.5, beyond that 1 - erfc(x) from erfc's continued
        // fraction e^(-x²)/√π / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))).
        let erf64 = |x: f64| -> f64 {
            if x.abs() > 2.5 {
                let a = x.abs();
                let mut t = a;
                for k in (1..=80).rev() {
                    t = a + f64::from(k) / 2.0 / t;
                }
                return x.signum() * (1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / t);
            }
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let e = erf64(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - e).abs());
            let g = 0.5 * f64::from(x) * (1.0 + erf64(f64::from(x) / std::f64::consts::SQRT_2));
            assert!((f64::from(gelu(x)) - g).abs() < 2e-6, "gelu({x})");
            // The derivative against a central difference of the f64 GELU.
            let h = 1e-4;
            let g64 = |x: f64| 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let d = (g64(f64::from(x) + h) - g64(f64::from(x) - h)) / (2.0 * h);
            assert!((f64::from(gelu_grad(x)) - d).abs() < 1e-5, "gelu'({x})");
        }
        assert!(worst < 5e-7, "erf: absolute error {worst}");
    }
}
