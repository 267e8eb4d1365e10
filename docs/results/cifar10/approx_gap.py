"""How far the approximate mode's statistics are from the exact ones.

At the sample sizes of the plain CNN's three stages (batch 128 at 32x32,
16x16 and 8x8: n = 131,072, 32,768 and 8,192 values per channel), 8 channels
each, on normal data and on a ReLU-then-noise shape, with a cold start and
warm-started from the exact quantile moved by 0, 0.05 and 0.2 standard
deviations (as the running averages would place it). For the quantile
centering at α = 0.9 it prints the empirical level F_n(q̂) of the approximate
q̂ (the exact one is 0.9), |q̂ − q| in standard deviations, and the ratio of
the approximate superquantile deviation to the exact one.

  python docs/results/cifar10/approx_gap.py
"""

import jax.numpy as jnp
import numpy as np

import gbn_jax

ALPHA = 0.9
CHANNELS = 8


def sample(rng, size, kind):
  x = rng.normal(size=(128, size, size, CHANNELS)).astype(np.float32)
  if kind == "relu+noise":
    noise = rng.normal(size=x.shape).astype(np.float32)
    x = np.maximum(x, 0) + 0.3 * noise
  return x


def main():
  rng = np.random.default_rng(0)
  print("| n per channel | data | start | level of approx. q̂ (min..max) |"
        " max abs(q̂ − q) / sd | approx. D / exact D |")
  print("|---|---|---|---|---|---|")
  for size in (32, 16, 8):
    for kind in ("normal", "relu+noise"):
      x = sample(rng, size, kind)
      flat = x.reshape(-1, CHANNELS)
      sd = flat.std(0)
      kw = dict(axes=(0, 1, 2), statistic="quantile", alpha=ALPHA)
      q, d_sq = gbn_jax.batch_statistics(jnp.asarray(x), **kw)
      for shift in (None, 0.0, 0.05, 0.2):
        guess = None if shift is None else (q + shift * sd, d_sq)
        qa, da_sq = gbn_jax.batch_statistics(
            jnp.asarray(x), approximate=True, guess=guess, **kw)
        level = (flat < np.asarray(qa)).mean(0)
        gap = np.max(np.abs(np.asarray(qa - q)) / sd)
        ratio = np.sqrt(np.asarray(da_sq) / np.asarray(d_sq))
        start = "cold" if shift is None else f"guess q + {shift:g} sd"
        print(f"| {flat.shape[0]:,} | {kind} | {start} |"
              f" {level.min():.4f}..{level.max():.4f} | {gap:.4f} |"
              f" {ratio.min():.5f}..{ratio.max():.5f} |")


if __name__ == "__main__":
  main()
