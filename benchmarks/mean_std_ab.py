"""A/B of the mean/std step: the library's form against two variants.

Diagnostic, not part of the library: it swaps internals of ``gbn_jax`` in
this process only. Variants of GeneralizedBatchNorm(deviation="std"):

- ``current``: μ = r + Σ (x_i - r)·(1/n) around a pivot r (a value of the
  channel: exact for a constant channel), variance around the same pivot;
  averages as Σ x_i·(1/n) (finite values near the float32 limits do not
  overflow);
- ``pivot_div``: the same with Σ (...) / n (no broadcast 1/n buffer);
- ``plain_div``: BN's formula, μ = Σ x_i / n, σ² = max(0, Σ x_i²/n - μ²).

Each is timed against ``flax.linen.BatchNorm`` (jit, forward + backward,
interleaved, median of the per-repeat ratio), as ``speed.py`` does.

    PYTHONPATH=$PWD python benchmarks/mean_std_ab.py
"""

import statistics
import sys
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))

import gbn_jax  # noqa: E402
from gbn_jax import catalogue, sample  # noqa: E402
from speed import SHAPES, make_step, run_once  # noqa: E402

ORIGINAL = (sample.Sample.average, sample.Sample.mean,
            catalogue.SQUARED_DEVIATIONS["std"])


def _average_divided(self, values):
  return self.sum(values) / self.safe_count().astype(self.x.dtype)


def _plain_mean(self):
  return self.memo("mean", lambda: self.average(self.x))


def _plain_variance(s, *, fast_variance=False):
  mu = s.mean()
  return s.memo(("variance", fast_variance), lambda: jnp.maximum(
      s.average(jnp.square(s.x)) - mu**2, 0.0))


VARIANTS = {
    "current": ORIGINAL,
    "pivot_div": (_average_divided, ORIGINAL[1], ORIGINAL[2]),
    "plain_div": (_average_divided, _plain_mean, _plain_variance),
}


def _use(variant):
  (sample.Sample.average, sample.Sample.mean,
   catalogue.SQUARED_DEVIATIONS["std"]) = variant
  jax.clear_caches()


def main(repeats=21, inner=5):
  print(f"jax {jax.__version__}, {jax.default_backend()}, repeats {repeats}, "
        f"inner {inner}")
  for shape in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
    x = x * jnp.linspace(0.5, 2.0, shape[-1]) + jnp.linspace(-1, 1, shape[-1])
    bn_step, bn_args = make_step(nn.BatchNorm(use_running_average=False), x)
    steps = {}
    for name, variant in VARIANTS.items():
      _use(variant)
      step, args = make_step(
          gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                       deviation="std"), x)
      for _ in range(3):
        run_once(step, args)
        run_once(bn_step, bn_args)
      steps[name] = (step, args)
    _use(ORIGINAL)
    ratios = {name: [] for name in steps}
    for _ in range(repeats):
      for name, (step, args) in steps.items():
        t_bn = sum(run_once(bn_step, bn_args) for _ in range(inner))
        t_gbn = sum(run_once(step, args) for _ in range(inner))
        ratios[name].append(t_gbn / t_bn)
    print(shape, "  ".join(f"{n} {statistics.median(r):.2f}x"
                            for n, r in ratios.items()), flush=True)


if __name__ == "__main__":
  main()
