"""Does GBN train faster than BN? An experiment runner on data that needs no download.

Trains a small CNN or MLP whose normalization layer is chosen by ``--norm`` and
records test accuracy against step for every normalization, seed and learning
rate. Every normalization gets the same data order, initialisation seeds,
step budget and learning-rate grid.

  python examples/train.py --quick --out runs/quick          # < 2 min on 2 CPUs
  python examples/train.py --dataset digits --model cnn \\
      --norm bn gbn-superquantile none --alpha 0.1 0.5 0.9 --seeds 3 \\
      --steps 1000 --lr-sweep --out runs/digits_cnn

Norms: ``bn`` (flax.linen.BatchNorm), ``gbn-<deviation>`` for any deviation in
``gbn_jax.DEVIATIONS`` (with its natural statistic; ``gbn-superquantile`` once
per ``--alpha``), ``l1bn`` (mean and mean-abs deviation with the
Gaussian-consistent factor sqrt(pi/2), Hoffer et al.), ``none`` (no
normalization, ReLU) and ``selu`` (no normalization, SELU activations,
LeCun-normal init; Klambauer et al.).

Speed: the runs (seeds and, with ``--lr-sweep``, learning rates) of one
normalization share one compiled program, ``lax.scan`` over the steps between
two evaluations; ``wall_seconds`` is the run's elapsed training time since step
0, compilation excluded.

Outputs in ``--out``: ``results.csv`` (one row per evaluation and run, appended
as each normalization finishes), ``summary.md`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import pickle
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

CSV_COLUMNS = (
    "dataset", "model", "norm", "alpha", "optimizer", "lr", "batch_size",
    "seed", "step", "train_loss", "test_acc", "wall_seconds",
)
NORM_BASELINES = ("bn", "none", "selu", "l1bn")
DEFAULT_LR_GRID = {  # log grid, half a decade apart
    "sgd": (0.03, 0.1, 0.3, 1.0, 3.0),
    "adam": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
}
DEFAULT_LR = {"sgd": 0.1, "adam": 0.003}


# --------------------------------------------------------------------------
# Data: (x_train, y_train, x_test, y_test), x channels-last float32, y int32.
# --------------------------------------------------------------------------


def load_mnist1d():
  """MNIST-1D generated offline with the package's default arguments.

  ``make_dataset`` builds the data from templates (no network); 4000 train and
  1000 test sequences of length 40, already standardised. Shape (N, 40, 1).
  """
  from mnist1d.data import get_dataset_args, make_dataset

  d = make_dataset(get_dataset_args())
  return (
      d["x"][..., None].astype(np.float32), d["y"].astype(np.int32),
      d["x_test"][..., None].astype(np.float32), d["y_test"].astype(np.int32),
  )


def load_digits_data(test_fraction: float = 0.25, seed: int = 0):
  """scikit-learn's bundled 8x8 digits, a fixed stratified 75/25 split.

  Pixels are standardised with the training set's mean and std (one scalar
  each). Shape (N, 8, 8, 1).
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  d = load_digits()
  x = d.images.astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  mu, sd = x_tr.mean(), x_tr.std()
  return (x_tr - mu) / sd, y_tr, (x_te - mu) / sd, y_te


def _read_cifar_batch(path: str):
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  data = d.get(b"data", d.get("data"))
  labels = d.get(b"labels", d.get("labels"))
  x = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return x, np.asarray(labels, np.int32)


def load_cifar10(data_dir: str):
  """CIFAR-10 from a local directory of python-pickle batches.

  Reads ``data_batch_1`` ... ``data_batch_5`` (those present) and
  ``test_batch`` from ``data_dir`` or its ``cifar-10-batches-py`` folder:
  dicts with ``data`` (N x 3072 uint8, channel-major rows) and ``labels``.
  Standardised per channel with the training set's statistics. Shape
  (N, 32, 32, 3).
  """
  if data_dir is None:
    raise ValueError("--dataset cifar10 needs --data-dir (nothing downloads)")
  sub = os.path.join(data_dir, "cifar-10-batches-py")
  root = sub if os.path.isdir(sub) else data_dir
  train_files = [
      os.path.join(root, f"data_batch_{i}") for i in range(1, 6)
      if os.path.exists(os.path.join(root, f"data_batch_{i}"))
  ]
  test_file = os.path.join(root, "test_batch")
  if not train_files or not os.path.exists(test_file):
    raise FileNotFoundError(
        f"no CIFAR-10 python batches (data_batch_1..5, test_batch) in {root!r}"
    )
  parts = [_read_cifar_batch(f) for f in train_files]
  x_tr = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255
  y_tr = np.concatenate([p[1] for p in parts])
  x_te, y_te = _read_cifar_batch(test_file)
  x_te = x_te.astype(np.float32) / 255
  mu = x_tr.mean(axis=(0, 1, 2))
  sd = x_tr.std(axis=(0, 1, 2))
  return (x_tr - mu) / sd, y_tr, (x_te - mu) / sd, y_te


def load_dataset(name: str, data_dir: str | None = None):
  if name == "mnist1d":
    return load_mnist1d()
  if name == "digits":
    return load_digits_data()
  if name == "cifar10":
    return load_cifar10(data_dir)
  raise ValueError(
      f"unknown dataset {name!r}; valid choices: 'mnist1d', 'digits', 'cifar10'"
  )


# --------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """One normalization setting: ``--norm`` name plus α where it has one."""

  norm: str
  alpha: float | None = None

  @property
  def label(self) -> str:
    return self.norm if self.alpha is None else f"{self.norm}(a={self.alpha:g})"


def check_norm(norm: str) -> None:
  import gbn_jax

  if norm in NORM_BASELINES:
    return
  if norm.startswith("gbn-") and norm[4:] in gbn_jax.DEVIATIONS:
    if norm[4:] == "mixed_superquantile":
      raise ValueError("gbn-mixed_superquantile needs levels; not offered here")
    return
  valid = list(NORM_BASELINES) + [
      f"gbn-{d}" for d in sorted(gbn_jax.DEVIATIONS)
      if d != "mixed_superquantile"
  ]
  raise ValueError(f"unknown --norm {norm!r}; valid choices: {valid}")


def expand_norms(norms: Sequence[str], alphas: Sequence[float]) -> list[NormSpec]:
  """One NormSpec per norm, and per α for the superquantile."""
  out = []
  for norm in norms:
    check_norm(norm)
    if norm == "gbn-superquantile":
      out.extend(NormSpec(norm, float(a)) for a in alphas)
    else:
      out.append(NormSpec(norm))
  return out


def make_norm_layer(spec: NormSpec, train: bool, momentum: float = 0.9):
  """The normalization module (or None) for ``spec``; feature axis last."""
  import flax.linen as nn
  import gbn_jax

  ura = not train
  if spec.norm == "bn":
    return nn.BatchNorm(use_running_average=ura, momentum=momentum)
  if spec.norm == "l1bn":
    return gbn_jax.GeneralizedBatchNorm(
        use_running_average=ura, momentum=momentum, statistic="mean",
        deviation="mean_abs", gaussian_consistent=True,
    )
  if spec.norm.startswith("gbn-"):
    kw = {} if spec.alpha is None else {"alpha": spec.alpha}
    return gbn_jax.GeneralizedBatchNorm(
        use_running_average=ura, momentum=momentum, deviation=spec.norm[4:], **kw
    )
  return None  # none, selu


def _activation(spec: NormSpec):
  import flax.linen as nn

  return nn.selu if spec.norm == "selu" else nn.relu


def _make_modules():
  """Model classes, defined lazily so ``--help`` needs no flax import."""
  import flax.linen as nn

  class Block(nn.Module):
    """layer -> norm -> activation. The layer has no bias when a norm follows
    (the norm's shift replaces it). Flax's default kernel init is LeCun
    normal, which SELU needs; every model uses it."""

    layer: str  # "dense" or "conv"
    features: int
    spec: NormSpec
    spatial_ndim: int = 1
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
      norm = make_norm_layer(self.spec, train)
      use_bias = norm is None
      if self.layer == "dense":
        x = nn.Dense(self.features, use_bias=use_bias)(x)
      else:
        x = nn.Conv(
            self.features, (3,) * self.spatial_ndim,
            strides=(self.stride,) * self.spatial_ndim, use_bias=use_bias,
        )(x)
      if norm is not None:
        x = norm(x)
      return _activation(self.spec)(x)

  class CNN(nn.Module):
    """3 conv blocks (strides 1, 2, 2), flatten, dense classifier."""

    spec: NormSpec
    num_classes: int = 10
    width: int = 32

    @nn.compact
    def __call__(self, x, train: bool = False):
      nd = x.ndim - 2
      for stride in (1, 2, 2):
        x = Block("conv", self.width, self.spec, nd, stride)(x, train)
      return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

  class MLP(nn.Module):
    """2 hidden dense blocks, dense classifier."""

    spec: NormSpec
    num_classes: int = 10
    width: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = x.reshape(x.shape[0], -1)
      for _ in range(2):
        x = Block("dense", self.width, self.spec)(x, train)
      return nn.Dense(self.num_classes)(x)

  return CNN, MLP


def build_model(model: str, spec: NormSpec, num_classes: int = 10,
                width: int | None = None):
  CNN, MLP = _make_modules()
  if model == "cnn":
    return CNN(spec, num_classes, width or 32)
  if model == "mlp":
    return MLP(spec, num_classes, width or 128)
  raise ValueError(f"unknown model {model!r}; valid choices: 'cnn', 'mlp'")


# --------------------------------------------------------------------------
# Training: every (seed, lr) run of one normalization, one compilation.
# --------------------------------------------------------------------------


def make_optimizer(name: str):
  """The optimizer without its learning rate: the update is -lr * direction.

  Both are linear in lr after the direction, so members with different
  learning rates share one program (lr is a per-member array).
  """
  import optax

  if name == "sgd":
    return optax.trace(decay=0.9)  # sgd with momentum 0.9
  if name == "adam":
    return optax.scale_by_adam()
  raise ValueError(f"unknown optimizer {name!r}; valid choices: 'sgd', 'adam'")


def batch_indices(seed: int, n_train: int, steps: int, batch: int) -> np.ndarray:
  """Minibatch indices for ``steps`` steps: reshuffled epochs, seeded."""
  rng = np.random.default_rng(seed)
  need = steps * batch
  perms = [rng.permutation(n_train) for _ in range(-(-need // n_train))]
  return np.concatenate(perms)[:need].reshape(steps, batch).astype(np.int32)


def make_programs(model, optimizer, x_train, y_train, x_test, y_test):
  """(init, train_chunk, evaluate) for one run, jitted once per normalization.

  Every (seed, lr) member reuses the same compiled programs: the seed enters
  through the init key and the batch indices, the lr as an array argument.
  (Members are run one after another, not vmapped: a vmapped convolution
  with per-member kernels becomes a grouped convolution, slow on CPU.)
  """
  import jax
  import jax.numpy as jnp
  import optax

  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

  def init(key):
    variables = model.init(key, x_train[:2], train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    return params, stats, optimizer.init(params)

  def loss_fn(params, stats, xb, yb):
    logits, new = model.apply(
        {"params": params, "batch_stats": stats}, xb, train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return loss, new.get("batch_stats", {})

  def step(state, idx):
    params, stats, opt_state, lr = state
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x_train[idx], y_train[idx]
    )
    direction, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, d: p - lr * d, params, direction)
    return (params, stats, opt_state, lr), loss

  def train_chunk(state, idx_chunk):
    """``len(idx_chunk)`` steps in one call (lax.scan); per-step losses."""
    return jax.lax.scan(step, state, idx_chunk)

  def evaluate(params, stats):
    logits = model.apply({"params": params, "batch_stats": stats}, x_test,
                         train=False)
    ok = jnp.all(jnp.isfinite(logits), axis=-1)  # a diverged net is wrong
    return jnp.mean(ok & (jnp.argmax(logits, -1) == y_test))

  return jax.jit(init), jax.jit(train_chunk), jax.jit(evaluate)


def norm_programs(spec: NormSpec, args, data):
  """Compiled (init, {chunk length: train_chunk}, evaluate) for one norm."""
  x_tr, y_tr, x_te, y_te = data
  model = build_model(args.model, spec, int(y_tr.max()) + 1, args.width)
  return compile_programs(
      make_programs(model, make_optimizer(args.optimizer), x_tr, y_tr, x_te,
                    y_te), args)


def experiment_phases(args, lrs):
  """[(lrs, seeds), ...]: first every seed at the main lr, then the other
  lrs of the sweep with the first ``--sweep-seeds`` seeds. Every norm runs a
  phase before the next phase starts, so a cut-short experiment still has
  the main comparison for every norm."""
  seeds = list(range(args.seeds))
  phases = [([args.lr], seeds)]
  rest = [lr for lr in lrs if lr != args.lr]
  if rest:
    phases.append((rest, seeds[: args.sweep_seeds or len(seeds)]))
  return phases


def run_experiment(args, specs, lrs, data, csv_path) -> None:
  """Train every phase x norm x lr x seed; append each (phase, norm)'s rows."""
  cache = {}
  for phase_lrs, seeds in experiment_phases(args, lrs):
    for spec in specs:
      t0 = time.perf_counter()
      if spec not in cache:
        cache[spec] = norm_programs(spec, args, data)
      rows = []
      for lr in phase_lrs:
        for seed in seeds:
          rows += train_run(spec, args, cache[spec], seed, lr, len(data[0]),
                            not args.no_progress)
      append_rows(csv_path, rows)
      print(f"{args.dataset}/{args.model}/{spec.label}: lrs {phase_lrs} x"
            f" seeds {seeds} in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr, flush=True)


def eval_bounds(steps: int, every: int) -> list[int]:
  """Steps at which the test set is evaluated: 0, every, 2 every, ..., steps."""
  return list(range(0, steps, every)) + [steps]


def compile_programs(programs, args):
  """Compile init, evaluate and one train_chunk per chunk length, ahead of
  time, so no run's wall clock includes compilation."""
  import jax
  import jax.numpy as jnp

  init, train_chunk, evaluate = programs
  key = jax.random.PRNGKey(0)
  init_c = init.lower(key).compile()
  params, stats, opt_state = init_c(key)
  state = (params, stats, opt_state, jnp.float32(1.0))
  bounds = eval_bounds(args.steps, args.eval_every)
  chunks = {}
  for n in sorted({b - a for a, b in zip(bounds[:-1], bounds[1:])}):
    idx = jax.ShapeDtypeStruct((n, args.batch_size), jnp.int32)
    chunks[n] = train_chunk.lower(state, idx).compile()
  return init_c, chunks, evaluate.lower(params, stats).compile()


def train_run(spec, args, programs, seed, lr, n_train, progress=True):
  """One run: evaluate at step 0 and every ``eval_every`` steps."""
  import jax
  import jax.numpy as jnp

  init, chunks, evaluate = programs
  params, stats, opt_state = init(jax.random.PRNGKey(seed))
  state = (params, stats, opt_state, jnp.float32(lr))
  idx = batch_indices(seed, n_train, args.steps, args.batch_size)
  bounds = eval_bounds(args.steps, args.eval_every)
  rows = []

  def record(step, loss, acc, wall):
    rows.append(dict(
        dataset=args.dataset, model=args.model, norm=spec.norm,
        alpha="" if spec.alpha is None else spec.alpha,
        optimizer=args.optimizer, lr=lr, batch_size=args.batch_size,
        seed=seed, step=step, train_loss=loss, test_acc=acc,
        wall_seconds=round(wall, 3),
    ))

  record(0, float("nan"), float(evaluate(params, stats)), 0.0)
  bar = _progress(args.steps, spec, args, seed, lr, progress)
  start = time.perf_counter()
  for a, b in zip(bounds[:-1], bounds[1:]):
    state, losses = chunks[b - a](state, jnp.asarray(idx[a:b]))
    acc = float(evaluate(state[0], state[1]))
    record(b, float(np.mean(losses)), acc, time.perf_counter() - start)
    bar.set_postfix(acc=f"{acc:.3f}")
    bar.update(b - a)
  bar.close()
  return rows


def _progress(total, spec, args, seed, lr, enabled):
  from tqdm.auto import tqdm

  desc = f"{args.dataset}/{args.model}/{spec.label} lr={lr:g} seed={seed}"
  return tqdm(total=total, desc=desc, disable=not enabled, leave=False,
              file=sys.stderr)


# --------------------------------------------------------------------------
# Results: csv, summary, plots.
# --------------------------------------------------------------------------


def append_rows(path: str, rows: list[dict]) -> None:
  new = not os.path.exists(path)
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    if new:
      w.writeheader()
    w.writerows(rows)


def read_rows(path: str) -> list[dict]:
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    r["alpha"] = float(r["alpha"]) if r["alpha"] else None
    for k in ("lr", "train_loss", "test_acc", "wall_seconds"):
      r[k] = float(r[k])
    for k in ("seed", "step", "batch_size"):
      r[k] = int(r[k])
  return rows


def _label(r) -> str:
  return NormSpec(r["norm"], r["alpha"] if r["alpha"] not in ("", None) else None).label


def runs_of(rows):
  """{(dataset, model, optimizer, label, lr): {seed: [rows sorted by step]}}."""
  runs = defaultdict(lambda: defaultdict(list))
  for r in rows:
    key = (r["dataset"], r["model"], r["optimizer"], _label(r), r["lr"])
    runs[key][r["seed"]].append(r)
  for by_seed in runs.values():
    for rs in by_seed.values():
      rs.sort(key=lambda r: r["step"])
  return runs


def diverged(run_rows) -> bool:
  """A run diverged if its loss became non-finite, or its final training loss
  is above ln(10) = the loss of a uniform guess over 10 classes."""
  losses = [r["train_loss"] for r in run_rows[1:]]
  return (not all(math.isfinite(v) for v in losses)) or losses[-1] > math.log(10)


def steps_to(run_rows, target: float):
  """First evaluated step with test accuracy >= target (None if never)."""
  for r in run_rows:
    if r["test_acc"] >= target:
      return r["step"]
  return None


def _ms(values, fmt="{:.2f}"):
  v = [x for x in values if x is not None]
  if not v:
    return "—"
  if len(v) == 1:
    return fmt.format(v[0]) + " (1 seed)"
  sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  return f"{fmt.format(np.mean(v))} ± {fmt.format(sd)}"


def choose_target(runs, group, lr) -> float:
  """Default target: 98% of BN's mean final test accuracy at this lr (of the
  best norm's when there is no ``bn`` run), rounded down to 0.01 -- "steps to
  reach (almost) BN's accuracy", the paper's claim."""
  finals = {key[3]: np.mean([rs[-1]["test_acc"] for rs in by_seed.values()])
            for key, by_seed in runs.items() if key[:3] == group and key[4] == lr}
  ref = finals.get("bn", max(finals.values(), default=0.0))
  return math.floor(98 * ref) / 100


def summary_table(runs, group, lr, target, per_seed=False) -> str:
  """Markdown: per norm (at one lr) final test error and steps to target."""
  lines = [
      "| norm | final test error (%) | steps to "
      f"{100 * target:.0f}% test acc | reached | diverged |",
      "|---|---|---|---|---|",
  ]
  seed_lines = ["| norm | seed | final test error (%) | steps to target |",
                "|---|---|---|---|"]
  for key in sorted(k for k in runs if k[:3] == group and k[4] == lr):
    by_seed = runs[key]
    errs = [100 * (1 - rs[-1]["test_acc"]) for rs in by_seed.values()]
    hits = [steps_to(rs, target) for rs in by_seed.values()]
    div = sum(diverged(rs) for rs in by_seed.values())
    lines.append(
        f"| {key[3]} | {_ms(errs)} | {_ms(hits, '{:.0f}')} |"
        f" {sum(h is not None for h in hits)}/{len(hits)} | {div} |"
    )
    for s, rs in sorted(by_seed.items()):
      h = steps_to(rs, target)
      seed_lines.append(
          f"| {key[3]} | {s} | {100 * (1 - rs[-1]['test_acc']):.2f} |"
          f" {'—' if h is None else h} |"
      )
  out = "\n".join(lines)
  return out + ("\n\nPer seed:\n\n" + "\n".join(seed_lines) if per_seed else "")


def lr_sweep_table(runs, group) -> str:
  """Markdown: per norm, the largest lr of the grid where no seed diverged,
  the test error there, and the best lr (lowest mean final training loss)."""
  by_norm = defaultdict(dict)
  for key, by_seed in runs.items():
    if key[:3] == group:
      by_norm[key[3]][key[4]] = by_seed
  lines = [
      "| norm | lrs tried | largest stable lr | test error there (%) |"
      " best lr (min train loss) | test error there (%) |",
      "|---|---|---|---|---|---|",
  ]
  for label in sorted(by_norm):
    lrs = by_norm[label]
    stable = [lr for lr, bs in lrs.items()
              if not any(diverged(rs) for rs in bs.values())]
    def err(lr):
      return _ms([100 * (1 - rs[-1]["test_acc"]) for rs in lrs[lr].values()])
    def final_loss(lr):
      v = [rs[-1]["train_loss"] for rs in lrs[lr].values()]
      return np.mean(v) if all(math.isfinite(x) for x in v) else math.inf
    best = min(lrs, key=final_loss)
    top = max(stable) if stable else None
    lines.append(
        f"| {label} | {len(lrs)} | {'—' if top is None else f'{top:g}'} |"
        f" {'—' if top is None else err(top)} | {best:g} | {err(best)} |"
    )
  return "\n".join(lines)


def write_summary(rows, path, lr=None, target=None, per_seed=True) -> str:
  runs = runs_of(rows)
  groups = sorted({k[:3] for k in runs})
  parts = []
  for group in groups:
    lrs = sorted({k[4] for k in runs if k[:3] == group})
    ref = lr if lr in lrs else (lrs[len(lrs) // 2] if lr is None else None)
    ref = lrs[0] if ref is None else ref
    tgt = choose_target(runs, group, ref) if target is None else target
    steps = max(rs[-1]["step"] for k in runs if k[:3] == group
                for rs in runs[k].values())
    seeds = sorted({s for k in runs if k[:3] == group for s in runs[k]})
    parts.append(
        f"## {group[0]} / {group[1]} / {group[2]}, lr = {ref:g},"
        f" {steps} steps\n\n"
        f"{steps} steps, seeds {seeds}; final = test accuracy after the last"
        f" step; mean ± std over seeds. Target accuracy {100 * tgt:.0f}%.\n\n"
        + summary_table(runs, group, ref, tgt, per_seed)
    )
    if len(lrs) > 1:
      parts.append(
          f"### Learning-rate sweep ({group[0]} / {group[1]} / {group[2]})\n\n"
          f"Grid {[float(f'{x:g}') for x in lrs]}; diverged = non-finite loss"
          " or final training loss above ln 10 in any seed.\n\n"
          + lr_sweep_table(runs, group)
      )
  text = "# Summary\n\n" + "\n\n".join(parts) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text


def plot_curves(rows, path, lr=None) -> None:
  """Test accuracy and training loss against step: mean and min-max band
  over seeds, one line per norm; one column per (dataset, model)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = runs_of(rows)
  groups = sorted({k[:3] for k in runs})
  fig, axes = plt.subplots(2, len(groups), figsize=(6 * len(groups), 8),
                           squeeze=False)
  for col, group in enumerate(groups):
    lrs = sorted({k[4] for k in runs if k[:3] == group})
    ref = lr if lr in lrs else lrs[len(lrs) // 2]
    keys = sorted(k for k in runs if k[:3] == group and k[4] == ref)
    for i, key in enumerate(keys):
      by_seed = runs[key]
      style = dict(color=plt.cm.tab20(i % 20),
                   ls="--" if "superquantile" in key[3] else "-")
      steps = np.array([r["step"] for r in next(iter(by_seed.values()))])
      for row, field in enumerate(("test_acc", "train_loss")):
        v = np.array([[r[field] for r in rs] for rs in by_seed.values()])
        sl = slice(1, None) if field == "train_loss" else slice(None)
        ax = axes[row, col]
        (line,) = ax.plot(steps[sl], v[:, sl].mean(0), label=key[3], **style)
        ax.fill_between(steps[sl], v[:, sl].min(0), v[:, sl].max(0),
                        color=line.get_color(), alpha=0.15)
    axes[0, col].set_title(f"{group[0]} / {group[1]} / {group[2]} lr={ref:g}")
    axes[0, col].set_ylabel("test accuracy")
    axes[1, col].set_ylabel("training loss (axis clipped at 10)")
    axes[1, col].set_yscale("log")
    axes[1, col].set_ylim(top=10)  # a diverging run would hide the others
    axes[1, col].set_xlabel("step")
    axes[0, col].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Adds "(default: ...)" only where the help does not already say it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "default" in text or action.default in (None, False):
      return text
    return super()._get_help_string(action)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
  p.add_argument("--dataset", default="mnist1d",
                 choices=("mnist1d", "digits", "cifar10"),
                 help="mnist1d: generated offline; digits: scikit-learn's 8x8"
                 " digits; cifar10: python-pickle batches in --data-dir")
  p.add_argument("--data-dir", default=None,
                 help="directory holding CIFAR-10's data_batch_* / test_batch")
  p.add_argument("--model", default="mlp", choices=("cnn", "mlp"),
                 help="cnn: 3 conv->norm->act blocks (1-D convs for mnist1d);"
                 " mlp: 2 dense->norm->act blocks")
  p.add_argument("--width", type=int, default=None,
                 help="channels (cnn, default 32) or hidden units (mlp, 128)")
  p.add_argument("--norm", nargs="+", default=["bn", "gbn-superquantile"],
                 help="normalizations: bn, gbn-<deviation> (e.g."
                 " gbn-superquantile, gbn-mean_abs, gbn-median_abs,"
                 " gbn-half_range), l1bn, none, selu")
  p.add_argument("--alpha", type=float, nargs="+", default=[0.5],
                 help="levels of gbn-superquantile (one run each: an α sweep)")
  p.add_argument("--seeds", type=int, default=3,
                 help="number of seeds 0..N-1 (init and data order)")
  p.add_argument("--steps", type=int, default=1000, help="training steps")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=50,
                 help="evaluate on the test split every this many steps")
  p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                 help="sgd: optax sgd with momentum 0.9; adam: optax adam")
  p.add_argument("--lr", type=float, default=None,
                 help="learning rate of the main comparison (default: 0.1 for"
                 " sgd, 0.003 for adam); with --lr-sweep it joins the grid")
  p.add_argument("--lr-sweep", action="store_true",
                 help="also train every norm at every lr of --lr-grid and"
                 " report the largest lr that does not diverge")
  p.add_argument("--sweep-seeds", type=int, default=None,
                 help="seeds trained at the lrs of the sweep other than --lr"
                 " (the first N; default: all)")
  p.add_argument("--lr-grid", type=float, nargs="+", default=None,
                 help="the log grid of --lr-sweep (default: half-decade steps,"
                 " 0.03..3 for sgd, 0.0003..0.1 for adam)")
  p.add_argument("--target", type=float, default=None,
                 help="test accuracy for 'steps to target' (default: 98%% of"
                 " bn's mean final accuracy, or of the best norm's)")
  p.add_argument("--out", default="runs/latest",
                 help="output directory: results.csv (rows appended as each norm"
                 " finishes), summary.md, curves.png")
  p.add_argument("--quick", action="store_true",
                 help="smoke run (< 2 min on 2 CPUs): mnist1d, mlp, bn and"
                 " gbn-superquantile, 2 seeds, 400 steps")
  p.add_argument("--append", action="store_true",
                 help="append to an existing results.csv instead of replacing"
                 " it (e.g. to add norms to an experiment)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
  p.add_argument("--summarize-only", action="store_true",
                 help="rebuild summary.md and curves.png from --out's csv")
  args = p.parse_args(argv)
  if args.quick:
    args.dataset, args.model = "mnist1d", "mlp"
    args.norm, args.seeds, args.steps = ["bn", "gbn-superquantile"], 2, 400
    args.eval_every = 50
  if args.lr is None:
    args.lr = DEFAULT_LR[args.optimizer]
  return args


def main(argv=None) -> str:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, "results.csv")
  if not args.summarize_only:
    specs = expand_norms(args.norm, args.alpha)
    lrs = [args.lr]
    if args.lr_sweep:
      lrs = sorted(set(args.lr_grid or DEFAULT_LR_GRID[args.optimizer]) | {args.lr})
    data = load_dataset(args.dataset, args.data_dir)
    if os.path.exists(csv_path) and not args.append:
      os.remove(csv_path)  # a fresh experiment; rows are appended per norm
    run_experiment(args, specs, lrs, data, csv_path)
  rows = read_rows(csv_path)
  text = write_summary(rows, os.path.join(args.out, "summary.md"), args.lr,
                       args.target)
  plot_curves(rows, os.path.join(args.out, "curves.png"), args.lr)
  return text


if __name__ == "__main__":
  print(main())
