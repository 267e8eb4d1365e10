"""Training: every (seed, lr) run of one normalization on one compiled program.

A run trains for ``steps`` steps and evaluates the test set at step 0 and
every ``eval_every`` steps. Between two evaluations the steps run either as
one ``lax.scan`` (one dispatch: best for small dense models) or as one compiled
step called from Python per step (convolutional models: XLA:CPU runs a
convolution inside a scan's while loop about 20x slower than the same
convolution at top level, measured with ResNet-20 on jax 0.10.2).

Seeds fix the initialisation, the data order and the augmentation, the same
for every normalization. Programs are compiled ahead of time, so the recorded
times exclude compilation; they also exclude evaluation.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from gbn_jax import linen as gbn_linen
from harness import augment as augment_lib
from harness import models, results

DEFAULT_LR_GRID = {  # log grid, half a decade apart
    "sgd": (0.03, 0.1, 0.3, 1.0, 3.0),
    "adam": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1),
}
DEFAULT_LR = {"sgd": 0.1, "adam": 0.003}
LR_SCHEDULES = ("constant", "step")
AUGMENT_STREAM = 1  # key stream of the augmentation (init uses the seed's key)
PRECISE_STREAM = 2  # rng stream of the precise-statistics batches


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run needs besides its norm, seed and lr.

  Attributes:
    dataset, model: names, recorded in the results.
    width: channels / hidden units (None: the model's default).
    optimizer: "sgd" (momentum 0.9) or "adam".
    weight_decay: L2 coefficient added to the gradient (coupled, as SGD's).
    lr_schedule: "constant", or "step": lr x 0.1 from 50% and x 0.01 from 75%
      of the steps.
    steps, batch_size, eval_every: the budget and the evaluation interval.
    eval_batch_size: test images per forward pass during evaluation.
    augment: random crop (4-pixel padding) and horizontal flip per batch.
    precise_stats: N > 0: also evaluate with batch statistics recomputed over
      N training batches (``gbn_jax.linen.recompute_batch_stats``).
    progress: show progress bars.
    scan: run the steps between evaluations as one ``lax.scan`` (else one
      compiled step per Python call; see the module docstring).
  """

  dataset: str
  model: str
  width: int | None = None
  optimizer: str = "sgd"
  weight_decay: float = 0.0
  lr_schedule: str = "constant"
  steps: int = 1000
  batch_size: int = 128
  eval_every: int = 50
  eval_batch_size: int = 1000
  augment: bool = False
  precise_stats: int = 0
  progress: bool = True
  scan: bool = True


class DeviceData(NamedTuple):
  """The dataset on the device; the test set split into equal batches."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array  # (batches, eval batch size, ...), zero-padded
  y_test: jax.Array
  test_valid: jax.Array  # False on the padding


class Programs(NamedTuple):
  model: Any
  init: Any
  run_steps: Any  # (state, x, y, idx rows, step numbers) -> (state, losses)
  evaluate: Any


def to_device(data, eval_batch_size: int) -> DeviceData:
  """(x_train, y_train, x_test, y_test) as device arrays, test in batches."""
  x_tr, y_tr, x_te, y_te = data
  size = min(eval_batch_size, len(x_te))
  n_batches = -(-len(x_te) // size)
  pad = n_batches * size - len(x_te)
  valid = np.arange(n_batches * size) < len(x_te)

  def batched(a):
    a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
    return jnp.asarray(a.reshape((n_batches, size, *a.shape[1:])))

  return DeviceData(jnp.asarray(x_tr), jnp.asarray(y_tr), batched(x_te),
                    batched(y_te), jnp.asarray(valid.reshape(n_batches, size)))


def make_optimizer(name: str, weight_decay: float = 0.0):
  """The optimizer without its learning rate: the update is -lr * direction.

  Both are linear in lr after the direction, so members with different
  learning rates share one program (lr is a per-member array).
  """
  decay = ([optax.add_decayed_weights(weight_decay)] if weight_decay else [])
  if name == "sgd":
    return optax.chain(*decay, optax.trace(decay=0.9))  # momentum 0.9
  if name == "adam":
    return optax.chain(*decay, optax.scale_by_adam())
  raise ValueError(f"unknown optimizer {name!r}; valid choices: 'sgd', 'adam'")


def lr_factor(step, steps: int, schedule: str):
  """Multiplier of the lr at ``step`` (0-based) of ``steps``."""
  if schedule == "constant":
    return jnp.float32(1.0)
  if schedule == "step":
    factor = jnp.where(step >= (3 * steps) // 4, 0.01,
                       jnp.where(step >= steps // 2, 0.1, 1.0))
    return factor.astype(jnp.float32)
  raise ValueError(f"unknown lr schedule {schedule!r}; valid: {LR_SCHEDULES}")


def batch_indices(seed: int, n_train: int, steps: int, batch: int,
                  stream: int = 0) -> np.ndarray:
  """Minibatch indices for ``steps`` steps: reshuffled epochs, seeded.

  ``stream`` > 0 draws an independent sequence for the same seed.
  """
  rng = np.random.default_rng(seed if stream == 0 else [seed, stream])
  need = steps * batch
  perms = [rng.permutation(n_train) for _ in range(-(-need // n_train))]
  return np.concatenate(perms)[:need].reshape(steps, batch).astype(np.int32)


def eval_bounds(steps: int, every: int) -> list[int]:
  """Steps at which the test set is evaluated: 0, every, 2 every, ..., steps."""
  return [*range(0, steps, every), steps]


def uses_scan(model: str) -> bool:
  """Whether the steps of ``model`` run in a ``lax.scan`` (no convolutions)."""
  return model == "mlp"


def make_programs(model, optimizer, cfg: RunConfig):
  """(init, train_step, train_chunk, evaluate), jitted; the data are
  arguments. ``train_chunk`` is ``train_step`` in a ``lax.scan``.

  Every (seed, lr) member reuses the same compiled programs: the seed enters
  through the keys and the batch indices, the lr as an array argument.
  (Members are run one after another, not vmapped: a vmapped convolution
  with per-member kernels becomes a grouped convolution, slow on CPU.)
  """

  def init(key, x_example):
    variables = model.init(key, x_example, train=False)
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

  def train_step(state, x_train, y_train, idx, t):
    """Step number ``t`` (0-based) on the examples ``idx``; (state, loss)."""
    params, stats, opt_state, lr, aug_key = state
    xb, yb = x_train[idx], y_train[idx]
    if cfg.augment:
      xb = augment_lib.random_crop_flip(jax.random.fold_in(aug_key, t), xb)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, xb, yb
    )
    direction, opt_state = optimizer.update(grads, opt_state, params)
    rate = lr * lr_factor(t, cfg.steps, cfg.lr_schedule)
    params = jax.tree.map(lambda p, d: p - rate * d, params, direction)
    return (params, stats, opt_state, lr, aug_key), loss

  def train_chunk(state, x_train, y_train, idx_chunk, step_chunk):
    """``len(idx_chunk)`` steps in one call (lax.scan); per-step losses."""

    def step(state, xs):
      return train_step(state, x_train, y_train, *xs)

    return jax.lax.scan(step, state, (idx_chunk, step_chunk))

  def evaluate(params, stats, x_test, y_test, valid):
    """Test accuracy; batches in sequence (lax.map) to bound memory."""

    def correct(batch):
      xb, yb, ok = batch
      logits = model.apply({"params": params, "batch_stats": stats}, xb,
                           train=False)
      ok &= jnp.all(jnp.isfinite(logits), axis=-1)  # a diverged net is wrong
      return jnp.sum(ok & (jnp.argmax(logits, -1) == yb))

    hits = jax.lax.map(correct, (x_test, y_test, valid))
    return jnp.sum(hits) / jnp.sum(valid)

  return (jax.jit(init), jax.jit(train_step), jax.jit(train_chunk),
          jax.jit(evaluate))


def _stepped(step_c):
  """Runs the steps of a chunk one compiled call each, from Python."""

  def run_steps(state, x_train, y_train, idx_rows, step_numbers):
    losses = []
    for idx, t in zip(idx_rows, step_numbers, strict=True):
      state, loss = step_c(state, x_train, y_train, idx, t)
      losses.append(loss)
    return state, jnp.stack(losses)

  return run_steps


def _scanned(chunks_c):
  """Runs the steps of a chunk as one compiled ``lax.scan``."""

  def run_steps(state, x_train, y_train, idx_rows, step_numbers):
    return chunks_c[len(idx_rows)](state, x_train, y_train, idx_rows,
                                   step_numbers)

  return run_steps


def compile_programs(model, programs, cfg: RunConfig, data: DeviceData):
  """Compile init, evaluate and the steps (one step, or one scan per chunk
  length) ahead of time, so no run's wall clock includes compilation."""
  init, train_step, train_chunk, evaluate = programs
  key = jax.random.PRNGKey(0)
  init_c = init.lower(key, data.x_train[:2]).compile()
  params, stats, opt_state = init_c(key, data.x_train[:2])
  state = (params, stats, opt_state, jnp.float32(1.0), key)
  if cfg.scan:
    bounds = eval_bounds(cfg.steps, cfg.eval_every)
    chunks = {}
    for n in sorted({b - a for a, b in itertools.pairwise(bounds)}):
      idx = jax.ShapeDtypeStruct((n, cfg.batch_size), jnp.int32)
      steps = jax.ShapeDtypeStruct((n,), jnp.int32)
      chunks[n] = train_chunk.lower(state, data.x_train, data.y_train, idx,
                                    steps).compile()
    run_steps = _scanned(chunks)
  else:
    idx = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    run_steps = _stepped(train_step.lower(state, data.x_train, data.y_train,
                                          idx, step).compile())
  evaluate_c = evaluate.lower(params, stats, data.x_test, data.y_test,
                              data.test_valid).compile()
  return Programs(model, init_c, run_steps, evaluate_c)


def norm_programs(spec: models.NormSpec, cfg: RunConfig, data: DeviceData):
  """Compiled programs of one normalization."""
  model = models.build_model(cfg.model, spec, int(data.y_train.max()) + 1,
                             cfg.width, data.x_train.shape[1:])
  optimizer = make_optimizer(cfg.optimizer, cfg.weight_decay)
  return compile_programs(model, make_programs(model, optimizer, cfg), cfg,
                          data)


def recompute_batch_stats_fn():
  """``gbn_jax.linen.recompute_batch_stats``, or a clear error without it."""
  fn = getattr(gbn_linen, "recompute_batch_stats", None)
  if fn is None:
    raise RuntimeError(
        "--precise-stats needs gbn_jax.linen.recompute_batch_stats, which this"
        " version of gbn_jax does not have; run without --precise-stats")
  return fn


def precise_stats(programs: Programs, params, stats, data: DeviceData, seed,
                  cfg: RunConfig):
  """Batch statistics recomputed over ``cfg.precise_stats`` training batches
  (unaugmented, a seeded draw independent of the training order)."""
  recompute = recompute_batch_stats_fn()
  idx = batch_indices(seed, len(data.x_train), cfg.precise_stats,
                      cfg.batch_size, stream=PRECISE_STREAM)
  batches = [data.x_train[jnp.asarray(i)] for i in idx]
  kwargs = {"train": True}
  if "progress" in inspect.signature(recompute).parameters:
    kwargs["progress"] = False  # no bar at every evaluation
  variables = recompute(programs.model,
                        {"params": params, "batch_stats": stats}, batches,
                        **kwargs)
  return variables["batch_stats"]


def train_run(spec, cfg: RunConfig, programs: Programs, data: DeviceData,
              seed: int, lr: float) -> list[dict]:
  """One run: evaluate at step 0 and every ``eval_every`` steps.

  Returns:
    One results row per evaluation (columns ``results.CSV_COLUMNS``):
    ``wall_seconds`` is the training time since step 0 and ``step_seconds``
    the mean time of a step since the previous evaluation (both without
    compilation and evaluation); ``test_acc_precise`` is filled with
    ``precise_stats`` > 0.
  """
  key = jax.random.PRNGKey(seed)
  params, stats, opt_state = programs.init(key, data.x_train[:2])
  aug_key = jax.random.fold_in(key, AUGMENT_STREAM)
  state = (params, stats, opt_state, jnp.float32(lr), aug_key)
  idx = batch_indices(seed, len(data.x_train), cfg.steps, cfg.batch_size)
  bounds = eval_bounds(cfg.steps, cfg.eval_every)
  rows = []

  def evaluate(params, stats):
    acc = float(programs.evaluate(params, stats, data.x_test, data.y_test,
                                  data.test_valid))
    precise = ""
    if cfg.precise_stats and stats:
      new_stats = precise_stats(programs, params, stats, data, seed, cfg)
      precise = float(programs.evaluate(params, new_stats, data.x_test,
                                        data.y_test, data.test_valid))
    elif cfg.precise_stats:  # no norm: nothing to recompute
      precise = acc
    return acc, precise

  def record(step, loss, accs, wall, step_seconds):
    rows.append(dict(
        dataset=cfg.dataset, model=cfg.model, norm=spec.norm,
        alpha="" if spec.alpha is None else spec.alpha,
        optimizer=cfg.optimizer, lr=lr, batch_size=cfg.batch_size,
        seed=seed, step=step, train_loss=loss, test_acc=accs[0],
        wall_seconds=round(wall, 3), step_seconds=step_seconds,
        test_acc_precise=accs[1],
    ))

  record(0, float("nan"), evaluate(params, stats), 0.0, "")
  bar = _progress(cfg, spec, seed, lr)
  train_seconds = 0.0
  for a, b in itertools.pairwise(bounds):
    start = time.perf_counter()
    state, losses = programs.run_steps(
        state, data.x_train, data.y_train, idx[a:b],
        np.arange(a, b, dtype=np.int32))
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    train_seconds += elapsed
    accs = evaluate(state[0], state[1])
    record(b, float(np.mean(losses)), accs, train_seconds,
           round(elapsed / (b - a), 5))
    bar.set_postfix(acc=f"{accs[0]:.3f}")
    bar.update(b - a)
    if not cfg.progress:  # a log line per evaluation instead of the bar
      print(f"{_label(cfg, spec, seed, lr)} step {b}/{cfg.steps}:"
            f" loss {np.mean(losses):.4f} test acc {accs[0]:.4f}"
            f" ({train_seconds:.0f} s)", file=sys.stderr, flush=True)
  bar.close()
  return rows


def _label(cfg: RunConfig, spec, seed, lr) -> str:
  return f"{cfg.dataset}/{cfg.model}/{spec.label} lr={lr:g} seed={seed}"


def _progress(cfg: RunConfig, spec, seed, lr):
  return tqdm(total=cfg.steps, desc=_label(cfg, spec, seed, lr),
              disable=not cfg.progress, leave=False, file=sys.stderr)


def experiment_phases(main_lr: float, lrs, n_seeds: int,
                      sweep_seeds: int | None, first_seed: int = 0):
  """[(lrs, seeds), ...]: first every seed (``first_seed`` ... ``first_seed +
  n_seeds - 1``) at the main lr, then the other lrs of the sweep with the
  first ``sweep_seeds`` of those seeds. Every norm runs a phase before the
  next phase starts, so a cut-short experiment still has the main comparison
  for every norm."""
  seeds = list(range(first_seed, first_seed + n_seeds))
  phases = [([main_lr], seeds)]
  rest = [lr for lr in lrs if lr != main_lr]
  if rest:
    phases.append((rest, seeds[: sweep_seeds or len(seeds)]))
  return phases


def run_experiment(cfg: RunConfig, specs, phases, data, csv_path) -> None:
  """Train every phase x norm x lr x seed; append each (phase, norm)'s rows
  to ``csv_path`` as soon as they are done."""
  if cfg.precise_stats:
    recompute_batch_stats_fn()  # fail before training, not after
  device_data = to_device(data, cfg.eval_batch_size)
  cache = {}
  for phase_lrs, seeds in phases:
    for spec in specs:
      t0 = time.perf_counter()
      if spec not in cache:
        cache[spec] = norm_programs(spec, cfg, device_data)
      rows = []
      for lr in phase_lrs:
        for seed in seeds:
          rows += train_run(spec, cfg, cache[spec], device_data, seed, lr)
      results.append_rows(csv_path, rows)
      print(f"{cfg.dataset}/{cfg.model}/{spec.label}: lrs {phase_lrs} x"
            f" seeds {seeds} in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr, flush=True)
