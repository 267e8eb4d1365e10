"""Per-layer speed and compiled memory of GeneralizedBatchNorm against flax's
BatchNorm, cold and in steady state.

For each shape (float32, channels last) and each deviation in the catalogue
(exact, and approximate where the deviation uses a quantile), times
``jit(grad)`` of a forward+backward step (gradients w.r.t. the input and the
parameters) after warm-up, as a ratio against ``flax.linen.BatchNorm`` in the
same process. BN and GBN timings alternate inside the repeat loop (BN, cold
GBN, warm GBN, BN, ...), so load from other processes hits all alike.

Two GBN figures per quantile-based configuration:

- **cold**: ``warm_start=False`` -- every step selects from scratch (the
  mean, the data range and a subsample spread place the first pivots);
- **steady**: the layer's running averages after ``--warmup-steps`` training
  steps (momentum 0.8) on fresh batches of the same distribution, with
  ``warm_start=True``: the selection starts from q_α guessed from the
  running S and σ̂ = sqrt(running D²) / (Gaussian factor of D) (what the
  modules pass, ``config.Measures.quantile_guesses``).

Memory: ``jit(...).lower(...).compile().memory_analysis()`` -- arguments +
outputs + temporaries (minus aliased), as a ratio against BN.

Also prints the counting passes per step (the most any channel needed; one
number per selected quantile level), cold and steady, exact and approximate,
on the benchmark batch.

  python benchmarks/speed.py                          # all shapes
  python benchmarks/speed.py --repeats 9 --shapes 1024,512 --only superq
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import gbn_jax
from gbn_jax import functional, order_statistics

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

WARMUP_MOMENTUM = 0.8


def batch(shape, seed):
  """Conv-like activations: per channel shifted and scaled normal values."""
  x = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
  return x * jnp.linspace(0.5, 2.0, shape[-1]) + jnp.linspace(-1, 1, shape[-1])


def make_step(module, x, stats=None):
  """jit(grad) of a loss on the training output, w.r.t. params and x.

  The running averages are an argument of the step (as in training), not
  constants the compiler could fold into the first pivots.
  """
  variables = module.init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  stats = variables["batch_stats"] if stats is None else stats
  w = jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype)

  def loss(params, x, stats, w):
    y, _ = module.apply(
      {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
    )
    # A ReLU-like head so the cotangent is not uniform.
    return jnp.sum(jax.nn.relu(y) * w)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return step, (params, x, stats, w)


def steady_stats(kwargs, shape, steps):
  """The running averages after ``steps`` training steps on fresh batches."""
  mod = gbn_jax.GeneralizedBatchNorm(
    use_running_average=False, momentum=WARMUP_MOMENTUM, **kwargs
  )
  x0 = batch(shape, 100)
  variables = mod.init(jax.random.PRNGKey(0), x0)
  stats = variables["batch_stats"]
  update = jax.jit(
    lambda stats, x: mod.apply(
      {"params": variables["params"], "batch_stats": stats},
      x,
      mutable=["batch_stats"],
    )[1]["batch_stats"]
  )
  for i in range(steps):
    stats = update(stats, batch(shape, 101 + i))
  return stats


def peak_bytes(step, args) -> int:
  m = step.lower(*args).compile().memory_analysis()
  return (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    + m.temp_size_in_bytes
    - m.alias_size_in_bytes
  )


CLOCK = time.perf_counter


def run_once(step, args) -> float:
  t = CLOCK()
  jax.block_until_ready(step(*args))
  return CLOCK() - t


def passes(kwargs, x, stats=None):
  """Counting passes per selected level on ``x`` (guess from ``stats``)."""
  keys = ("statistic", "deviation", "alpha", "p", "levels", "weights")
  measures = functional.make_measures(
    **{k: v for k, v in kwargs.items() if k in keys}
  )
  levels = measures.selected_levels()
  if not levels:
    return None
  axes = tuple(range(x.ndim - 1))
  guess = None if stats is None else (stats["mean"], stats["var"])

  @jax.jit
  def count(x):
    sample = functional.make_sample(
      measures,
      x,
      axes,
      guess=guess,
      approximate=kwargs.get("approximate", False),
    )
    return [order_statistics.quantile_passes(sample, a) for a in levels]

  return "/".join(str(int(p)) for p in count(x))


def bench_shape(shape, repeats, configs, inner, warmup_steps):
  x = batch(shape, 2)
  bn_step, bn_args = make_step(nn.BatchNorm(use_running_average=False), x)
  bn_mem = peak_bytes(bn_step, bn_args)
  rows = []
  for label, kwargs in configs:
    cold_mod = gbn_jax.GeneralizedBatchNorm(
      use_running_average=False, warm_start=False, **kwargs
    )
    steps = {"cold": make_step(cold_mod, x)}
    stats = None
    selects = bool(passes(kwargs, x))
    if selects:
      stats = steady_stats(kwargs, shape, warmup_steps)
      warm_mod = gbn_jax.GeneralizedBatchNorm(
        use_running_average=False, warm_start=True, **kwargs
      )
      steps["steady"] = make_step(warm_mod, x, stats)
    mem = {k: peak_bytes(*s) / bn_mem for k, s in steps.items()}
    for _ in range(3):  # warm-up (compile, caches)
      run_once(bn_step, bn_args)
      for s in steps.values():
        run_once(*s)
    t_bn, t = [], {k: [] for k in steps}
    for _ in range(repeats):  # interleaved: all see the same load
      t_bn.append(sum(run_once(bn_step, bn_args) for _ in range(inner)))
      for k, s in steps.items():
        t[k].append(sum(run_once(*s) for _ in range(inner)))
    ratio = {
      k: statistics.median(g / b for g, b in zip(v, t_bn, strict=True))
      for k, v in t.items()
    }
    row = dict(
      label=label,
      bn_ms=statistics.median(t_bn) / inner * 1e3,
      ratio=ratio,
      mem=mem,
      passes_cold=passes(kwargs, x) if selects else None,
      passes_steady=passes(kwargs, x, stats) if selects else None,
    )
    rows.append(row)
    steady = ""
    if "steady" in ratio:
      steady = (
        f"  steady {ratio['steady']:5.2f} (mem {mem['steady']:4.2f})"
        f"  passes cold {row['passes_cold']} steady {row['passes_steady']}"
      )
    print(
      f"  {label:28s} BN {row['bn_ms']:7.3f} ms  cold {ratio['cold']:5.2f}"
      f" (mem {mem['cold']:4.2f}){steady}",
      flush=True,
    )
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--inner", type=int, default=1, help="calls per timing")
  ap.add_argument(
    "--shapes", default=None, help="e.g. 1024,512;64,16,16,64 (default: all)"
  )
  ap.add_argument("--only", default=None, help="substring of config labels")
  ap.add_argument(
    "--warmup-steps",
    type=int,
    default=40,
    help="training steps before the steady-state figure",
  )
  ap.add_argument(
    "--clock",
    choices=("wall", "cpu"),
    default="wall",
    help="wall time, or the process's CPU time (steadier on a loaded host)",
  )
  args = ap.parse_args()
  global CLOCK
  CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
  shapes = SHAPES
  if args.shapes:
    shapes = tuple(
      tuple(int(d) for d in s.split(",")) for s in args.shapes.split(";")
    )
  configs = [c for c in CONFIGS if args.only is None or args.only in c[0]]
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()},"
    f" {jax.devices()[0].device_kind}, repeats {args.repeats},"
    f" inner {args.inner}, steady state after {args.warmup_steps} steps,"
    f" {args.clock} clock"
  )
  table = {}
  for shape in shapes:
    print(f"shape {shape} (float32, channels last), fwd+bwd under jit:")
    table[shape] = bench_shape(
      shape, args.repeats, configs, args.inner, args.warmup_steps
    )
  # Markdown table: time cold / steady (passes), memory.
  print()
  head = " | ".join("x".join(map(str, s)) for s in shapes)
  print(f"| configuration | {head} | memory cold / steady |")
  print("|---|" + "---|" * (len(shapes) + 1))
  for i, (label, _) in enumerate(configs):
    cells = []
    for s in shapes:
      r = table[s][i]
      cell = f"{r['ratio']['cold']:.2f}x"
      if "steady" in r["ratio"]:
        cell += (
          f" / {r['ratio']['steady']:.2f}x"
          f" ({r['passes_cold']} / {r['passes_steady']})"
        )
      cells.append(cell)
    mems = sorted(
      {f"{v:.2f}x" for s in shapes for v in table[s][i]["mem"].values()}
    )
    print(f"| {label} | {' | '.join(cells)} | {', '.join(mems)} |")
  bn = " | ".join(f"{table[s][0]['bn_ms']:.2f} ms" for s in shapes)
  print(f"| (BN median time) | {bn} | |")


if __name__ == "__main__":
  main()
