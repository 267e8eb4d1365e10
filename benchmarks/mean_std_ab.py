"""A/B of the mean/std step: where its cost over flax's BatchNorm comes from.

Diagnostic, not part of the library. Three steps, each timed against
``flax.linen.BatchNorm`` (jit, forward + backward, interleaved, median of
the per-repeat ratio), as ``speed.py`` does:

- ``library``: ``GeneralizedBatchNorm(deviation="std")`` as shipped -- the
  mean around a pivot r (a value of the channel, so a constant channel gets
  its constant exactly), the variance's sum divided by n after the
  reduction (``Sample(overflow_safe=False)``, chosen for the mean-based
  measures; μ is always summed overflow-safely);
- ``safe_sums``: the same module with the overflow-safe averages
  Σ (f(x) · 1/n) that the order-statistic measures use (the form every
  configuration used before): XLA:CPU writes the broadcast 1/n out as an
  x-sized buffer;
- ``bn_formula``: BN's own formula, Σx/n and Σx²/n - μ², as a plain function
  (no pivot: not exact for a constant channel).

    PYTHONPATH=$PWD python benchmarks/mean_std_ab.py
"""

import os
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))

from speed import SHAPES, make_step, run_once

import gbn_jax
from gbn_jax import functional


def _bn_formula_step(x):
  axes = tuple(range(x.ndim - 1))
  params = {"scale": jnp.ones(x.shape[-1]), "bias": jnp.zeros(x.shape[-1])}
  w = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)
  n = x.size // x.shape[-1]

  def loss(p, x):
    mu = jnp.sum(x, axes) / n
    var = jnp.maximum(jnp.sum(x * x, axes) / n - mu * mu, 0.0)
    y = (x - mu) * (jax.lax.rsqrt(var + 1e-5) * p["scale"]) + p["bias"]
    return jnp.sum(jax.nn.relu(y) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def _module_step(x, overflow_safe):
  prop = functional.Measures.overflow_safe
  if overflow_safe:  # this process only: every configuration's safe form
    functional.Measures.overflow_safe = property(lambda self: True)
  try:
    step, args = make_step(
        gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                     deviation="std"), x)
    jax.block_until_ready(step(*args))  # compile under the patch
  finally:
    functional.Measures.overflow_safe = prop
  return step, args


def main(repeats=21, inner=5):
  print(f"jax {jax.__version__}, {jax.default_backend()}, repeats {repeats}, "
        f"inner {inner}")
  for shape in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
    x = x * jnp.linspace(0.5, 2.0, shape[-1]) + jnp.linspace(-1, 1, shape[-1])
    bn_step, bn_args = make_step(nn.BatchNorm(use_running_average=False), x)
    steps = {
        "library": _module_step(x, overflow_safe=False),
        "safe_sums": _module_step(x, overflow_safe=True),
        "bn_formula": _bn_formula_step(x),
    }
    for step, args in [*steps.values(), (bn_step, bn_args)]:
      for _ in range(3):
        run_once(step, args)
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
