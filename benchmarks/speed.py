"""Speed and compiled memory of GeneralizedBatchNorm against flax's BatchNorm.

For each shape (float32, channels last) and each deviation in the catalogue
(exact, and approximate where the deviation uses a quantile), times
``jit(grad)`` of a forward+backward step (gradients w.r.t. the input and the
parameters) after warm-up, and reports the median time as a ratio against
``flax.linen.BatchNorm`` in the same process. BN and GBN timings alternate
inside the repeat loop, so load from other processes hits both alike.
Memory: ``jit(...).lower(...).compile().memory_analysis()`` -- arguments +
outputs + temporaries (minus aliased), as a ratio against BN.

Also prints the number of counting passes the exact selection takes on the
benchmark data (per quantile level).

  python benchmarks/speed.py                 # all shapes, 15 repeats
  python benchmarks/speed.py --repeats 5 --shapes 1024,512
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import gbn_jax
from gbn_jax import order_statistics
from gbn_jax.sample import Sample

SHAPES = ((64, 16, 16, 64), (32, 8, 8, 256), (1024, 512))

CONFIGS = (
    # (label, GeneralizedBatchNorm keyword arguments)
    ("std (mean/std)", dict(deviation="std")),
    ("mean_abs", dict(deviation="mean_abs")),
    ("lp p=3", dict(deviation="lp", p=3.0)),
    ("upper_semi", dict(deviation="upper_semi")),
    ("lower_semi", dict(deviation="lower_semi")),
    ("half_range", dict(deviation="half_range")),
    ("median_abs", dict(deviation="median_abs")),
    ("superquantile a=0.5", dict(deviation="superquantile", alpha=0.5)),
    ("superquantile a=0.9", dict(deviation="superquantile", alpha=0.9)),
    (
        "mixed_superq (.5,.9)",
        dict(deviation="mixed_superquantile", levels=(0.5, 0.9)),
    ),
    ("median_abs approx", dict(deviation="median_abs", approximate=True)),
    (
        "superquantile a=0.5 approx",
        dict(deviation="superquantile", alpha=0.5, approximate=True),
    ),
    (
        "superquantile a=0.9 approx",
        dict(deviation="superquantile", alpha=0.9, approximate=True),
    ),
    (
        "mixed_superq (.5,.9) approx",
        dict(deviation="mixed_superquantile", levels=(0.5, 0.9), approximate=True),
    ),
)


def make_step(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  stats = variables["batch_stats"]
  w = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)

  def loss(params, x):
    y, _ = module.apply(
        {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
    )
    # A ReLU-like head so the cotangent is not uniform.
    return jnp.sum(jax.nn.relu(y) * w)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step, (params, x)


def peak_bytes(step, args) -> int:
  m = step.lower(*args).compile().memory_analysis()
  return (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )


def run_once(step, args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(step(*args))
  return time.perf_counter() - t


def bench_shape(shape, repeats, configs, inner):
  x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
  # Conv-like activations: shifted, scaled, some channels skewed.
  x = x * jnp.linspace(0.5, 2.0, shape[-1]) + jnp.linspace(-1, 1, shape[-1])
  bn_step, bn_args = make_step(nn.BatchNorm(use_running_average=False), x)
  bn_mem = peak_bytes(bn_step, bn_args)
  rows = []
  for label, kwargs in configs:
    mod = gbn_jax.GeneralizedBatchNorm(use_running_average=False, **kwargs)
    step, args = make_step(mod, x)
    mem = peak_bytes(step, args)
    for _ in range(3):  # warm-up (compile, caches)
      run_once(bn_step, bn_args)
      run_once(step, args)
    t_bn, t_gbn = [], []
    for _ in range(repeats):  # interleaved: both see the same load
      t_bn.append(sum(run_once(bn_step, bn_args) for _ in range(inner)))
      t_gbn.append(sum(run_once(step, args) for _ in range(inner)))
    ratios = [g / b for g, b in zip(t_gbn, t_bn)]
    rows.append(
        (
            label,
            statistics.median(t_bn) / inner * 1e3,
            statistics.median(t_gbn) / inner * 1e3,
            statistics.median(ratios),
            mem / bn_mem,
        )
    )
    print(
        f"  {label:30s} BN {rows[-1][1]:8.3f} ms  GBN {rows[-1][2]:8.3f} ms"
        f"  ratio {rows[-1][3]:5.2f}  mem {rows[-1][4]:5.2f}",
        flush=True,
    )
  return x, rows


def passes_on(x, alphas=(0.5, 0.9)):
  axes = tuple(range(x.ndim - 1))
  out = {}
  for a in alphas:
    f = jax.jit(
        lambda x: order_statistics.selection_passes(
            s := Sample(x, axes), order_statistics.quantile_rank(a, s.count())
        )
    )
    out[a] = int(f(x))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--inner", type=int, default=1, help="calls per timing")
  ap.add_argument(
      "--shapes", default=None, help="e.g. 1024,512;64,16,16,64 (default: all)"
  )
  ap.add_argument("--only", default=None, help="substring of config labels")
  args = ap.parse_args()
  shapes = SHAPES
  if args.shapes:
    shapes = tuple(
        tuple(int(d) for d in s.split(",")) for s in args.shapes.split(";")
    )
  configs = [c for c in CONFIGS if args.only is None or args.only in c[0]]
  print(
      f"jax {jax.__version__}, backend {jax.default_backend()},"
      f" {jax.devices()[0].device_kind}, repeats {args.repeats}"
  )
  table = {}
  for shape in shapes:
    print(f"shape {shape} (float32, channels last), fwd+bwd under jit:")
    x, rows = bench_shape(shape, args.repeats, configs, args.inner)
    table[shape] = rows
    print(f"  exact selection passes on this data: {passes_on(x)}")
  # Markdown table.
  print()
  labels = [c[0] for c in configs]
  head = " | ".join(f"{'x'.join(map(str, s))} time / mem" for s in shapes)
  print(f"| configuration | {head} |")
  print("|---|" + "---|" * len(shapes))
  for i, label in enumerate(labels):
    cells = " | ".join(
        f"{table[s][i][3]:.2f}x / {table[s][i][4]:.2f}x" for s in shapes
    )
    print(f"| {label} | {cells} |")
  bn = " | ".join(f"{table[s][0][1]:.2f} ms" for s in shapes)
  print(f"| (BN median time) | {bn} |")


if __name__ == "__main__":
  main()
