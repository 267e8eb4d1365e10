"""Why do GBN's running averages evaluate worse than BN's? A measurement.

The setting of issue 14: a 2-conv CNN on scikit-learn's 8x8 digits, a Flax
``TrainState``, 1000 steps at batch 64, ``optax.sgd(0.05, momentum=0.9)`` and
``optax.adam(3e-3)``, every norm layer ``nn.BatchNorm`` or
``GeneralizedBatchNorm`` with one deviation family (its natural statistic;
the superquantile at its default α = 0.5), 3 seeds.

Batch-mode training never reads the running averages, so one training run
serves every momentum: the model is trained with momentum 0, its
``batch_stats`` after each step are then exactly that step's batch S and D^2,
and the running averages for momentum m are computed from them with Flax's
update ``ra = m * ra + (1 - m) * batch`` in float32 (from ``mean = 0``,
``var = 1``) -- what a model trained with momentum m would hold.

Every 100 steps (and at step 990) the training-set values -- the average of
the batch S and D^2 over the training set with the current weights
(``recompute_batch_stats``) -- are recomputed, and the test accuracy is
measured with the running averages (``ema``, m = 0.99 and 0.9) and with the
training-set values (``precise``). At the end also with

* ``lagged``: the training-set values of the weights ``1/(1 - m)`` steps
  earlier (step 900 for m = 0.99, 990 for 0.9) with the final weights --
  the running average's *lag* alone, without its noise;
* ``frozen``: a running average over 300 further batches with the final
  weights fixed, started at the precise values -- the running average's
  *noise* alone, without drift.

Outputs (``--out``, default docs/results/evaluation): ``accuracy.csv`` (one
row per run, step and evaluation), ``layers.csv`` (one row per run,
checkpoint and norm layer: how far the running S and D sit from the
training-set values, how fast the training-set values move, the batch
values' noise, the conv kernel's norm) and ``summary.md``.

  python examples/evaluation_study.py                 # the study (~10 CPU-min)
  python examples/evaluation_study.py --quick         # 1 seed, 200 steps
  python examples/evaluation_study.py --norms gbn-superquantile \
      --optimizers sgd --seeds 1 --arch flax_example_post --scaling unit

``--arch plain`` (default): Conv(16) -> norm -> relu -> Conv(32, stride 2) ->
norm -> relu -> Dense(10); ``flax_example``: the CNN of Flax's MNIST example
with a norm after each conv; ``flax_example_post``: the same with the norm
after the ReLU. ``--scaling unit`` divides the pixels by 16 instead of
standardising them.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import gbn_jax
from gbn_jax.evaluation import recompute_batch_stats_linen

NORMS = ("bn", "gbn-superquantile", "gbn-mean_abs")
OPTIMIZERS = ("sgd", "adam")
MOMENTA = (0.99, 0.9)
LAYERS = ("norm0", "norm1")
BATCH = 64
CHUNK = 10  # training steps per compiled scan
FROZEN_STEPS = 300

ACCURACY_COLUMNS = ("norm", "optimizer", "seed", "steps", "evaluation",
                    "momentum", "test_acc")
LAYER_COLUMNS = (
    "norm", "optimizer", "seed", "step", "layer", "channels",
    # |running S - training-set S| / training-set D, mean over channels
    "s_err_m0.99", "s_err_m0.9",
    # |running D / training-set D - 1|, mean over channels
    "d_err_m0.99", "d_err_m0.9",
    # training-set values' change per step over the preceding interval, in
    # the same units (|ΔS| / D and |ΔD| / D per step)
    "s_drift_per_step", "d_drift_per_step",
    # batch values' spread around the interval's mean (rms over the steps of
    # the preceding interval, after removing a linear trend), same units
    "s_batch_noise", "d_batch_noise",
    "train_d_mean",  # mean over channels of the training-set D
    "kernel_norm",  # Frobenius norm of the conv kernel before the layer
)


def load_digits_split(scaling: str = "standardize", seed: int = 0):
  """scikit-learn's 8x8 digits: stratified 75/25 split.

  ``scaling``: ``standardize`` (the training set's pixel mean and std) or
  ``unit`` (pixels / 16, in [0, 1], as a new user often does).
  """
  from sklearn.datasets import load_digits  # noqa: PLC0415  (examples extra)
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  d = load_digits()
  x = d.images.astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=0.25, random_state=seed, stratify=y)
  if scaling == "unit":
    return x_tr / 16, y_tr, x_te / 16, y_te
  mu, sd = x_tr.mean(), x_tr.std()
  return (x_tr - mu) / sd, y_tr, (x_te - mu) / sd, y_te


def make_norm(norm: str, use_running_average: bool, momentum: float, name):
  if norm == "bn":
    return nn.BatchNorm(use_running_average=use_running_average,
                        momentum=momentum, name=name)
  return gbn_jax.GeneralizedBatchNorm(
      use_running_average=use_running_average, momentum=momentum,
      deviation=norm.removeprefix("gbn-"), name=name)


class CNN(nn.Module):
  """A 2-conv CNN whose norm layers have momentum 0.

  ``plain``: Conv(16) -> norm -> relu -> Conv(32, stride 2) -> norm -> relu
  -> Dense(10), convs without bias. ``flax_example``: the CNN of Flax's MNIST
  example with a norm after each conv -- Conv(32) -> norm -> relu -> avg_pool
  2 -> Conv(64) -> norm -> relu -> avg_pool 2 -> Dense(256) -> relu ->
  Dense(10); ``flax_example_post``: the same with each norm after its ReLU.
  Momentum 0: after a training step ``batch_stats`` hold the batch values.
  """

  norm: str
  arch: str = "plain"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.arch == "plain":
      for i, (features, stride) in enumerate(((16, 1), (32, 2))):
        x = nn.Conv(features, (3, 3), strides=stride, use_bias=False,
                    name=f"conv{i}")(x)
        x = make_norm(self.norm, not train, 0.0, f"norm{i}")(x)
        x = nn.relu(x)
      return nn.Dense(10)(x.reshape(x.shape[0], -1))
    for i, features in enumerate((32, 64)):
      x = nn.Conv(features, (3, 3), name=f"conv{i}")(x)
      norm = make_norm(self.norm, not train, 0.0, f"norm{i}")
      post = self.arch.endswith("_post")
      x = norm(nn.relu(x)) if post else nn.relu(norm(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
  batch_stats: dict


def make_optimizer(name: str):
  if name == "sgd":
    return optax.sgd(0.05, momentum=0.9)
  return optax.adam(3e-3)


def batch_indices(seed: int, n: int, steps: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  need = steps * BATCH
  perms = [rng.permutation(n) for _ in range(-(-need // n))]
  return np.concatenate(perms)[:need].reshape(steps, BATCH).astype(np.int32)


def ema(values: np.ndarray, momentum: float, start: np.ndarray) -> np.ndarray:
  """Flax's running average over ``values[t]``, float32, from ``start``."""
  m = np.float32(momentum)
  ra = np.asarray(start, np.float32)
  for v in values:
    ra = m * ra + (np.float32(1) - m) * np.asarray(v, np.float32)
  return ra


def detrended_rms(values: np.ndarray) -> np.ndarray:
  """Per channel rms of ``values`` (steps x channels) around a linear fit."""
  t = np.arange(len(values), dtype=np.float64)
  a = np.vstack([t, np.ones_like(t)]).T
  coef, *_ = np.linalg.lstsq(a, values.astype(np.float64), rcond=None)
  return np.sqrt(np.mean((values - a @ coef) ** 2, axis=0))


class Programs:
  """The compiled pieces for one (norm, optimizer)."""

  def __init__(self, norm, optimizer, data, arch):
    self.model = CNN(norm, arch)
    self.tx = make_optimizer(optimizer)
    x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
    model = self.model

    def train_chunk(state, idx):
      def step(state, batch_idx):
        x, y = x_tr[batch_idx], y_tr[batch_idx]

        def loss_fn(params):
          logits, updates = model.apply(
              {"params": params, "batch_stats": state.batch_stats}, x,
              train=True, mutable=["batch_stats"])
          loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
          return loss.mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return state, (loss, batch_stats)

      return jax.lax.scan(step, state, idx)

    def batch_values(variables, idx):
      _, updates = model.apply(variables, x_tr[idx], train=True,
                               mutable=["batch_stats"])
      return updates["batch_stats"]

    def accuracy(variables):
      logits = model.apply(variables, x_te, train=False)
      return jnp.mean(jnp.argmax(logits, -1) == y_te)

    self.train_chunk = jax.jit(train_chunk)
    self.batch_values = jax.jit(jax.vmap(batch_values, in_axes=(None, 0)))
    self.accuracy = jax.jit(accuracy)
    self.x_tr = x_tr

  def init_state(self, seed):
    variables = self.model.init(jax.random.key(seed), self.x_tr[:BATCH])
    return TrainState.create(
        apply_fn=self.model.apply, params=variables["params"],
        batch_stats=variables["batch_stats"], tx=self.tx)

  def training_set_stats(self, state):
    """Per layer (S, D^2): batch values averaged over the training set."""
    n = self.x_tr.shape[0] // BATCH * BATCH
    batches = [self.x_tr[i:i + BATCH] for i in range(0, n, BATCH)]
    variables = recompute_batch_stats_linen(
        self.model, {"params": state.params, "batch_stats": state.batch_stats},
        batches, progress=False, train=True)
    return {k: (np.asarray(v["mean"]), np.asarray(v["var"]))
            for k, v in variables["batch_stats"].items()}


def with_stats(state, stats):
  return {"params": state.params,
          "batch_stats": {k: {"mean": s, "var": d2}
                          for k, (s, d2) in stats.items()}}


def run(programs, norm, optimizer, seed, steps, n_train, log):
  """One training run; returns (accuracy rows, layer rows)."""
  state = programs.init_state(seed)
  idx = batch_indices(seed, n_train, steps)
  checkpoints = sorted({*range(0, steps + 1, 100), steps - 10})
  train_stats = {0: programs.training_set_stats(state)}
  kernel_norms = {}
  batch_history = defaultdict(lambda: ([], []))  # layer -> (S list, D^2 list)
  layer_rows = []
  base = {"norm": norm, "optimizer": optimizer, "seed": seed}

  def acc(stats):
    return float(programs.accuracy(with_stats(state, stats)))

  def running_averages(history, m):
    return {layer: (ema(history[layer][0], m, np.zeros_like(s)),
                    ema(history[layer][1], m, np.ones_like(d2)))
            for layer, (s, d2) in train_stats[0].items()}

  acc_rows = []
  t0 = time.time()
  for start in range(0, steps, CHUNK):
    state, (loss, batch_stats) = programs.train_chunk(
        state, idx[start:start + CHUNK])
    batch_stats = jax.device_get(batch_stats)
    for layer in LAYERS:
      batch_history[layer][0].extend(batch_stats[layer]["mean"])
      batch_history[layer][1].extend(batch_stats[layer]["var"])
    step = start + CHUNK
    if step in checkpoints:
      train_stats[step] = programs.training_set_stats(state)
      kernel_norms[step] = {
          layer: float(np.linalg.norm(state.params[f"conv{layer[-1]}"]
                                      ["kernel"]))
          for layer in LAYERS
      }
    if step % 100 == 0:  # what an evaluation at this step would give
      acc_rows.append({**base, "steps": step, "evaluation": "precise",
                       "momentum": "", "test_acc": acc(train_stats[step])})
      for m in MOMENTA:
        acc_rows.append({**base, "steps": step, "evaluation": "ema",
                         "momentum": m,
                         "test_acc": acc(running_averages(batch_history, m))})
  log(f"  {norm} {optimizer} seed {seed}: {time.time() - t0:.0f} s,"
      f" final loss {float(loss[-1]):.3f}")

  history = {layer: (np.asarray(s), np.asarray(d2))
             for layer, (s, d2) in batch_history.items()}
  previous = 0
  for step in checkpoints[1:]:
    if step % 100:
      continue
    for layer in LAYERS:
      s_hist, d2_hist = history[layer]
      s_tr, d2_tr = train_stats[step][layer]
      # The unit of the errors; a dead channel (D = 0) is left out.
      d_tr = np.where(d2_tr > 0, np.sqrt(d2_tr), np.nan)
      s_prev, d2_prev = train_stats[previous][layer]
      row = {
          "norm": norm, "optimizer": optimizer, "seed": seed, "step": step,
          "layer": layer, "channels": len(s_tr),
          "train_d_mean": float(np.sqrt(d2_tr).mean()),
          "kernel_norm": kernel_norms[step][layer],
          "s_drift_per_step": float(
              np.nanmean(np.abs(s_tr - s_prev) / d_tr) / (step - previous)),
          "d_drift_per_step": float(
              np.nanmean(np.abs(d_tr - np.sqrt(d2_prev)) / d_tr)
              / (step - previous)),
          "s_batch_noise": float(
              np.nanmean(detrended_rms(s_hist[previous:step]) / d_tr)),
          "d_batch_noise": float(np.nanmean(
              detrended_rms(np.sqrt(d2_hist[previous:step])) / d_tr)),
      }
      for m in MOMENTA:
        ra_s = ema(s_hist[:step], m, np.zeros_like(s_tr))
        ra_d2 = ema(d2_hist[:step], m, np.ones_like(d2_tr))
        row[f"s_err_m{m}"] = float(np.nanmean(np.abs(ra_s - s_tr) / d_tr))
        row[f"d_err_m{m}"] = float(
            np.nanmean(np.abs(np.sqrt(ra_d2) / d_tr - 1)))
      layer_rows.append(row)
    previous = step

  # Final evaluations: the lag alone and the noise alone.
  base = {**base, "steps": steps}
  frozen_idx = batch_indices(10_000 + seed, n_train, FROZEN_STEPS)
  frozen = jax.device_get(programs.batch_values(
      with_stats(state, train_stats[steps]), frozen_idx))
  for m in MOMENTA:
    lag_step = steps - round(1 / (1 - m))
    frozen_running = {
        layer: (ema(frozen[layer]["mean"], m, s),
                ema(frozen[layer]["var"], m, d2))
        for layer, (s, d2) in train_stats[steps].items()
    }
    acc_rows += [
        {**base, "evaluation": "lagged", "momentum": m,
         "test_acc": acc(train_stats[lag_step])},
        {**base, "evaluation": "frozen", "momentum": m,
         "test_acc": acc(frozen_running)},
    ]
  return acc_rows, layer_rows


def summarize(acc_rows, layer_rows, steps) -> str:
  """Markdown tables: accuracies, and per layer the error decomposition."""
  acc = defaultdict(list)
  for r in acc_rows:
    acc[(r["norm"], r["optimizer"], r["evaluation"], r["momentum"],
         r["steps"])].append(r["test_acc"])
  norms = list(dict.fromkeys(r["norm"] for r in acc_rows))
  optimizers = list(dict.fromkeys(r["optimizer"] for r in acc_rows))
  seeds = sorted({r["seed"] for r in acc_rows})

  def cell(values):
    v = 100 * np.asarray(values)
    return (f"{v.mean():.1f} ({', '.join(f'{x:.1f}' for x in v)})")

  out = [f"Test accuracy (%) after {steps} steps, mean (seeds"
         f" {', '.join(map(str, seeds))}).", ""]
  columns = [("ema", 0.99), ("ema", 0.9), ("precise", ""), ("lagged", 0.99),
             ("frozen", 0.99), ("lagged", 0.9), ("frozen", 0.9)]
  out.append("| norm | optimizer | " + " | ".join(
      f"{e} {m}".strip() for e, m in columns) + " |")
  out.append("|---|---|" + "---|" * len(columns))
  for opt in optimizers:
    for norm in norms:
      out.append(f"| {norm} | {opt} | " + " | ".join(
          cell(acc[(norm, opt, e, m, steps)]) for e, m in columns) + " |")

  curve_steps = sorted({r["steps"] for r in acc_rows})
  out += ["", "Test accuracy (%) by step, mean over seeds: running averages"
          " m=0.99 / m=0.9 / precise statistics.", ""]
  out.append("| norm | optimizer | " + " | ".join(map(str, curve_steps))
             + " |")
  out.append("|---|---|" + "---|" * len(curve_steps))
  for opt in optimizers:
    for norm in norms:
      out.append(f"| {norm} | {opt} | " + " | ".join(
          " / ".join(f"{100 * np.mean(acc[(norm, opt, e, m, t)]):.1f}"
                     for e, m in (("ema", 0.99), ("ema", 0.9),
                                  ("precise", "")))
          for t in curve_steps) + " |")

  out += ["", f"Per layer at step {steps} (mean over seeds): running-average"
          " error vs the training-set values, and its two predicted parts:"
          " lag = drift per step x m/(1-m), noise = batch noise x"
          " sqrt((1-m)/(1+m)). S errors in units of the training-set D; D"
          " errors relative.", ""]
  out.append("| norm | optimizer | layer | S err m=.99 | S lag | S noise |"
             " S err m=.9 | S lag | S noise | D err m=.99 | D lag | D noise |"
             " D err m=.9 | D lag | D noise | kernel norm (step 100 -> end) |")
  out.append("|---|---|---|" + "---|" * 13)
  by_key = defaultdict(list)
  for r in layer_rows:
    by_key[(r["norm"], r["optimizer"], r["layer"], r["step"])].append(r)
  for opt in optimizers:
    for norm in norms:
      for layer in LAYERS:
        rows = by_key[(norm, opt, layer, steps)]
        first = by_key[(norm, opt, layer, 100)]
        mean = {k: np.mean([r[k] for r in rows]) for k in rows[0]
                if k not in ("norm", "optimizer", "layer")}
        cells = []
        for q in ("s", "d"):
          for m in MOMENTA:
            lag = mean[f"{q}_drift_per_step"] * m / (1 - m)
            noise = mean[f"{q}_batch_noise"] * np.sqrt((1 - m) / (1 + m))
            cells += [f"{mean[f'{q}_err_m{m}']:.3f}", f"{lag:.3f}",
                      f"{noise:.3f}"]
        k0 = np.mean([r["kernel_norm"] for r in first])
        cells.append(f"{k0:.1f} -> {mean['kernel_norm']:.1f}")
        out.append(f"| {norm} | {opt} | {layer} | " + " | ".join(cells)
                   + " |")
  return "\n".join(out) + "\n"


def write_csv(path, columns, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    for r in rows:
      w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                  for k, v in r.items()})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--norms", nargs="+", default=list(NORMS))
  p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--scaling", choices=("standardize", "unit"),
                 default="standardize")
  p.add_argument("--arch", default="plain",
                 choices=("plain", "flax_example", "flax_example_post"))
  p.add_argument("--quick", action="store_true",
                 help="1 seed, 200 steps, bn and gbn-superquantile, sgd")
  p.add_argument("--out", default="docs/results/evaluation")
  args = p.parse_args(argv)
  if args.quick:
    args.norms, args.optimizers = ["bn", "gbn-superquantile"], ["sgd"]
    args.seeds, args.steps = 1, 200
  if args.steps % 100 or args.steps < 200:
    p.error("--steps must be a multiple of 100, at least 200")
  os.makedirs(args.out, exist_ok=True)

  data = load_digits_split(args.scaling)
  n_train = data[0].shape[0]
  acc_rows, layer_rows = [], []
  t_start = time.time()
  for norm in args.norms:
    for optimizer in args.optimizers:
      programs = Programs(norm, optimizer, data, args.arch)
      for seed in range(args.seeds):
        rows, lrows = run(programs, norm, optimizer, seed, args.steps,
                          n_train, print)
        acc_rows += rows
        layer_rows += lrows
      # Written as each configuration finishes.
      write_csv(os.path.join(args.out, "accuracy.csv"), ACCURACY_COLUMNS,
                acc_rows)
      write_csv(os.path.join(args.out, "layers.csv"), LAYER_COLUMNS,
                layer_rows)
  summary = summarize(acc_rows, layer_rows, args.steps)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(summary)
  print(summary)
  print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
  main()
