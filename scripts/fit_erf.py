#!/usr/bin/env python3
"""Fit the rational erf of `crates/mtl-nn/src/cpu/math.rs` (`erf`): erf(x) ~ x P(x^2) / Q(x^2) on
|x| <= CLAMP, P of degree 6 and Q of degree 4 in x^2 (7 + 5 coefficients, Q's constant 1), beyond CLAMP erf is
+-1 in f32. No exp, so GELU's forward pass costs about half the instructions of A&S 7.1.26 + exp.

How: a linearised least-squares fit (minimise |x P - erf Q| on a dense grid), then Lawson's iteration (weights
multiplied by the current error, which drives the fit towards minimax), then the error of the result printed
in f64. Run: .venv/bin/python scripts/fit_erf.py (the environment `scripts/bench-env.sh` makes, with numpy and scipy;
the fit is ill-conditioned, so another erf than scipy's moves the coefficients within the same error); it prints the Rust constants.
"""
import numpy as np
from scipy.special import erf

CLAMP = 3.92  # erf(3.92) = 1 - 3.3e-8: within half an f32 ulp of 1
NP, NQ = 7, 4  # coefficients of P; of Q besides its constant 1

x = np.concatenate([np.linspace(0.0, CLAMP, 20001), CLAMP * (1 - np.cos(np.linspace(0, np.pi / 2, 5001)))])
x = np.unique(x)
x2, f = x * x, erf(x)


def solve(w):
    # Unknowns: p0..p6, q1..q4. Residual: x P(x2) - f (1 + q1 x2 + ...) = 0, weighted.
    cols = [x * x2**k for k in range(NP)] + [-f * x2**k for k in range(1, NQ + 1)]
    a = np.stack(cols, axis=1) * w[:, None]
    coef, *_ = np.linalg.lstsq(a, f * w, rcond=None)
    return coef[:NP], np.concatenate([[1.0], coef[NP:]])


def err(p, q):
    return x * np.polyval(p[::-1], x2) / np.polyval(q[::-1], x2) - f


w = np.ones_like(x)
p, q = solve(w)
for _ in range(200):  # Lawson: each point's weight times its current error, so the largest errors shrink.
    e = np.abs(err(p, q))
    w = np.maximum(w * e / (w * e).max(), 1e-12)
    p, q = solve(w)
e = np.abs(err(p, q)).max()
print(f"// max |error| in f64 on [0, {CLAMP}]: {e:.3e}")
print("const P: [f32; 7] = [" + ", ".join(f"{v:.9e}" for v in p) + "];")
print("const Q: [f32; 5] = [" + ", ".join(f"{v:.9e}" for v in q) + "];")
