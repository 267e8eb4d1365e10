"""Whole-network benchmark: a full jitted train step with GBN against BatchNorm.

For each model (ResNet-20 on CIFAR-10-shaped input, a 3-layer MLP) and each
normalization configuration, builds the complete train step -- forward,
backward, optax SGD with momentum 0.9, the ``batch_stats`` update -- and
reports, as ratios to the ``flax.linen.BatchNorm`` step in the same process:

* step time: after ``--warmup`` steps (so the running averages hold real
  values: the GBN layers warm-start their selection from them), repeats are
  interleaved round-robin over the configurations; each repeat times
  ``--steps-per-repeat`` consecutive steps (one ``block_until_ready`` at the
  end). The ratio is the median over repeats of GBN / BN in the same repeat,
  in wall-clock time and in this process's CPU time (all threads; less
  sensitive to other processes on a shared machine).
* compile time: ``jax.jit(step).lower(...)`` (trace + lower) plus
  ``.compile()`` (XLA) of a fresh step function, timed once per
  configuration after a throw-away BN compile has warmed JAX up; wall-clock
  and CPU time.
* memory: ``compiled.memory_analysis().temp_size_in_bytes`` (temporaries of
  the compiled step) as a ratio to BN's.
* program size: ``while`` loops and lines of the optimized HLO (one
  selection loop per exact or approximate GBN layer; what compile time
  grows with).

The networks are those of the experiment harness (``examples/harness``):
the same modules, names and initializers as ``harness.models.ResNet20`` and
``MLP``, rebuilt here with a norm factory so that configurations the
harness cannot name (online mode) run in the same network
(``tests/test_benchmarks_smoke.py`` checks that the BN network equals the
harness's). Data: random normal input and random labels, fixed seed.

  python benchmarks/network.py                # both models, 5 repeats
  python benchmarks/network.py --models mlp --repeats 9 --csv /tmp/net.csv
  python benchmarks/network.py --configs bn,exact,exact-cold  # warm vs cold
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gbn_jax

MOMENTUM = 0.9  # running averages, as the harness
LEARNING_RATE = 0.01
NUM_CLASSES = 10

# label -> GeneralizedBatchNorm keyword arguments (None: flax.linen.BatchNorm).
CONFIGS: dict[str, dict | None] = {
  "bn": None,
  "exact": dict(deviation="superquantile", alpha=0.5),
  "approx": dict(deviation="superquantile", alpha=0.5, approximate=True),
  "online": dict(deviation="superquantile", alpha=0.5, mode="online"),
  "std": dict(deviation="std"),  # mean/std GBN
  "median_abs": dict(deviation="median_abs"),
  # Not in the default run: exact selection without the warm start.
  "exact-cold": dict(deviation="superquantile", alpha=0.5, warm_start=False),
}
DEFAULT_CONFIGS = ("bn", "exact", "approx", "online", "std", "median_abs")
MODELS = ("resnet20", "mlp")
# Default steps per timed repeat: a ResNet-20 step takes ~1-2 s of CPU on 2
# cores, an MLP step ~7 ms (too short to time one at a time under load).
STEPS_PER_REPEAT = {"resnet20": 1, "mlp": 30}

NormFactory = Callable[[bool], nn.Module]


def norm_factory(config: str) -> NormFactory:
  """``train -> norm module`` for a configuration of ``CONFIGS``."""
  kwargs = CONFIGS[config]
  if kwargs is None:
    return functools.partial(_bn, momentum=MOMENTUM)
  return functools.partial(_gbn, momentum=MOMENTUM, **kwargs)


def _bn(train: bool, **kw) -> nn.Module:
  return nn.BatchNorm(use_running_average=not train, **kw)


def _gbn(train: bool, **kw) -> nn.Module:
  return gbn_jax.GeneralizedBatchNorm(use_running_average=not train, **kw)


# The harness's networks (examples/harness/models.py) with a norm factory;
# module names match, so the variables of both are interchangeable.


class ConvNorm(nn.Module):
  """3x3 conv (no bias, He normal) -> norm."""

  features: int
  norm: NormFactory
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = self.norm(train)
    x = nn.Conv(
      self.features,
      (3, 3),
      strides=(self.stride, self.stride),
      use_bias=False,
      kernel_init=nn.initializers.he_normal(),
    )(x)
    return norm(x)


class BasicBlock(nn.Module):
  """ResNet basic block with the option-A (parameter-free) shortcut."""

  features: int
  norm: NormFactory
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(ConvNorm(self.features, self.norm, self.stride)(x, train))
    y = ConvNorm(self.features, self.norm)(y, train)
    shortcut = x[:, :: self.stride, :: self.stride, :]
    extra = self.features - x.shape[-1]
    if extra:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return nn.relu(y + shortcut)


class ResNet20(nn.Module):
  """ResNet-20 for CIFAR: 19 convolutions, each followed by a norm."""

  norm: NormFactory
  num_classes: int = NUM_CLASSES
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(ConvNorm(self.width, self.norm)(x, train))
    for stage in range(3):
      for block in range(3):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, self.norm, stride)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class Block(nn.Module):
  """Dense (no bias) -> norm -> ReLU."""

  features: int
  norm: NormFactory

  @nn.compact
  def __call__(self, x, train: bool):
    norm = self.norm(train)
    x = nn.Dense(self.features, use_bias=False)(x)
    return nn.relu(norm(x))


class MLP(nn.Module):
  """Flatten, 2 hidden dense blocks, dense classifier (784-512-512-10)."""

  norm: NormFactory
  num_classes: int = NUM_CLASSES
  width: int = 512

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = Block(self.width, self.norm)(x, train)
    return nn.Dense(self.num_classes)(x)


def build_model(model: str, config: str) -> nn.Module:
  """The ``model`` network with every norm of configuration ``config``."""
  if model == "resnet20":
    return ResNet20(norm_factory(config))
  if model == "mlp":
    return MLP(norm_factory(config))
  raise ValueError(f"unknown model {model!r}; valid choices: {MODELS}")


def input_shape(model: str, batch: int) -> tuple[int, ...]:
  return (batch, 32, 32, 3) if model == "resnet20" else (batch, 784)


def make_batches(model: str, batch: int, n: int, seed: int = 0):
  """``n`` (x, y) batches: standard-normal input, uniform labels."""
  rng = np.random.default_rng(seed)
  shape = input_shape(model, batch)
  return [
    (
      jnp.asarray(rng.standard_normal(shape, np.float32)),
      jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
    )
    for _ in range(n)
  ]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """A fresh (not yet jitted) ``step(state, x, y) -> (state, loss)``.

  ``state`` is ``(params, batch_stats, opt_state)``.
  """

  def loss_fn(params, stats, x, y):
    logits, updates = model.apply(
      {"params": params, "batch_stats": stats},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates["batch_stats"]

  def step(state, x, y):
    params, stats, opt_state = state
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, stats, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, stats, opt_state), loss

  return step


def make_optimizer() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=0.9)


def init_state(model: nn.Module, tx, x):
  """(params, batch_stats, opt_state) from a fixed key (same for all norms)."""
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  params = variables["params"]
  return params, variables["batch_stats"], tx.init(params)


@dataclasses.dataclass
class Compiled:
  """One configuration's compiled step and what compiling it cost."""

  step: Callable
  lower_s: float  # trace + lower, wall
  compile_s: float  # XLA compile, wall
  cpu_s: float  # trace + lower + compile, CPU time of this process
  temp_bytes: int
  total_bytes: int  # arguments + outputs + temporaries - aliased
  while_loops: int  # while ops in the optimized HLO
  hlo_lines: int  # lines of the optimized HLO text (program size)


def compile_step(model: nn.Module, state, x, y) -> Compiled:
  """Lowers and compiles a fresh train step, timing both."""
  step = make_train_step(model, make_optimizer())
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = jax.jit(step).lower(state, x, y)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  mem = compiled.memory_analysis()
  temp = total = -1
  if mem is not None:
    temp = mem.temp_size_in_bytes
    total = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + temp
      - mem.alias_size_in_bytes
    )
  try:
    text = compiled.as_text()
    whiles, lines = text.count(" while("), text.count("\n")
  except Exception:  # a backend without HLO text
    whiles = lines = -1
  return Compiled(
    compiled, t1 - t0, t2 - t1, c2 - c0, temp, total, whiles, lines
  )


def run_steps(step, state, batches, start: int, k: int):
  """``k`` steps from ``state`` on ``batches[start:]`` (cycled), blocked."""
  loss = None
  for i in range(start, start + k):
    x, y = batches[i % len(batches)]
    state, loss = step(state, x, y)
  jax.block_until_ready((state, loss))
  return state, loss


def bench_model(
  model_name: str,
  configs,
  *,
  batch: int,
  repeats: int,
  steps_per_repeat: int,
  warmup: int,
  n_batches: int = 4,
  log=print,
) -> list[dict]:
  """Rows of figures for ``model_name``, one per configuration (BN first)."""
  if "bn" not in configs:
    configs = ("bn", *configs)
  batches = make_batches(model_name, batch, n_batches)
  x0, y0 = batches[0]
  tx = make_optimizer()
  models = {c: build_model(model_name, c) for c in configs}
  states = {c: init_state(models[c], tx, x0) for c in configs}

  # Throw-away compile so that BN, compiled first, does not pay JAX's own
  # first-use costs.
  compile_step(build_model(model_name, "bn"), states["bn"], x0, y0)
  compiled = {}
  for c in configs:
    compiled[c] = compile_step(models[c], states[c], x0, y0)
    log(
      f"  {model_name} {c}: lower {compiled[c].lower_s:.1f} s, "
      f"compile {compiled[c].compile_s:.1f} s "
      f"(CPU {compiled[c].cpu_s:.1f} s)"
    )

  # Warm-up: the running averages move off their initial values.
  for c in configs:
    states[c], loss = run_steps(compiled[c].step, states[c], batches, 0, warmup)
    if not np.isfinite(float(loss)):
      raise FloatingPointError(f"{model_name} {c}: loss {float(loss)}")

  times = {c: [] for c in configs}  # wall seconds per step
  cpu = {c: [] for c in configs}  # CPU seconds (all threads) per step
  pos = warmup
  for r in range(repeats):
    order = configs[r % len(configs) :] + configs[: r % len(configs)]
    for c in order:  # round-robin, rotated: no config always first
      t, p = time.perf_counter(), time.process_time()
      states[c], _ = run_steps(
        compiled[c].step, states[c], batches, pos, steps_per_repeat
      )
      times[c].append((time.perf_counter() - t) / steps_per_repeat)
      cpu[c].append((time.process_time() - p) / steps_per_repeat)
    pos += steps_per_repeat
    log(
      f"  {model_name} repeat {r + 1}/{repeats}: "
      + ", ".join(f"{c} {1e3 * times[c][-1]:.0f}" for c in configs)
      + " ms"
    )

  bn = compiled["bn"]
  bn_compile = bn.lower_s + bn.compile_s
  rows = []
  for c in configs:
    cc = compiled[c]
    ratios = [t / b for t, b in zip(times[c], times["bn"], strict=True)]
    cpu_ratios = [t / b for t, b in zip(cpu[c], cpu["bn"], strict=True)]
    rows.append(
      dict(
        model=model_name,
        config=c,
        step_ms=1e3 * statistics.median(times[c]),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        cpu_ms=1e3 * statistics.median(cpu[c]),
        cpu_ratio=statistics.median(cpu_ratios),
        lower_s=cc.lower_s,
        compile_s=cc.compile_s,
        compile_total_s=cc.lower_s + cc.compile_s,
        compile_ratio=(cc.lower_s + cc.compile_s) / bn_compile,
        compile_cpu_s=cc.cpu_s,
        compile_cpu_ratio=cc.cpu_s / bn.cpu_s,
        temp_bytes=cc.temp_bytes,
        total_bytes=cc.total_bytes,
        memory_ratio=(
          cc.temp_bytes / bn.temp_bytes if bn.temp_bytes > 0 else float("nan")
        ),
        while_loops=cc.while_loops,
        hlo_lines=cc.hlo_lines,
      )
    )
  return rows


def format_table(rows: list[dict]) -> str:
  """A markdown table of the rows (wall-clock figures; CPU time after /)."""
  lines = [
    "| model | config | step ms | step ratio to BN (min–max) | "
    "step CPU ratio | compile s (trace+lower / XLA) | compile ratio "
    "(wall / CPU) | temp memory ratio | while loops |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['config']} | {r['step_ms']:.1f} | "
      f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
      f"{r['cpu_ratio']:.2f}x | "
      f"{r['compile_total_s']:.1f} ({r['lower_s']:.1f} / "
      f"{r['compile_s']:.1f}) | {r['compile_ratio']:.2f}x / "
      f"{r['compile_cpu_ratio']:.2f}x | "
      f"{r['memory_ratio']:.2f}x | {r['while_loops']} |"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument(
    "--configs",
    default=",".join(DEFAULT_CONFIGS),
    help=f"comma-separated, from {list(CONFIGS)}",
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--steps-per-repeat",
    type=int,
    default=None,
    help=f"steps timed per repeat (default: {STEPS_PER_REPEAT})",
  )
  parser.add_argument(
    "--warmup",
    type=int,
    default=3,
    help="steps before timing (running averages warm up)",
  )
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--csv", default=None, help="also write rows here")
  args = parser.parse_args(argv)

  models = [m for m in args.models.split(",") if m]
  configs = tuple(c for c in args.configs.split(",") if c)
  for m in models:
    if m not in MODELS:
      parser.error(f"unknown model {m!r}; valid choices: {MODELS}")
  for c in configs:
    if c not in CONFIGS:
      parser.error(f"unknown config {c!r}; valid choices: {list(CONFIGS)}")

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"devices {jax.devices()}",
    flush=True,
  )
  rows = []
  for m in models:
    rows += bench_model(
      m,
      configs,
      batch=args.batch,
      repeats=args.repeats,
      steps_per_repeat=args.steps_per_repeat or STEPS_PER_REPEAT[m],
      warmup=args.warmup,
      log=functools.partial(print, flush=True),
    )
  print(format_table(rows))
  if args.csv:
    with open(args.csv, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
