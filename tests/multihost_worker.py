"""One of the processes of tests/test_multihost.py (jax.distributed on CPU).

Launched by ``tests/_multihost.launch`` as 2 processes x 2 CPU devices. Every
process builds the same global data (numpy, seeded) but feeds only its own
rows to the global mesh (``make_array_from_process_local_data``), then runs

- ``batch_statistics`` for every deviation in ``gbn_jax.DEVIATIONS`` (exact
  with and without a mask, approximate with a mask) under sharded ``jit``
  and under ``shard_map`` with ``axis_name``, and two variants that must
  come out different: ``shard_map`` without ``axis_name`` and pooling only
  within each process;
- a few SGD steps of a small linen and a small NNX model with GBN layers,
  under sharded ``jit`` and under ``shard_map``;
- an orbax save of the linen model's train state (every process takes part),

and writes what it holds to ``OUT/process{I}.npz``, with the sizes of the
all-gathers in each compiled program. The test computes the one-process
result on the concatenated batch from the definitions here.
"""

from __future__ import annotations

import argparse
import os
import re
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gbn_jax
import gbn_jax.nnx
from tests import _multihost

N_PROC, DEV_PER_PROC = 2, 2
N_DEV = N_PROC * DEV_PER_PROC
AXIS = "batch"
PARAMS = dict(alpha=0.37, p=3.0, levels=(0.3, 0.8), weights=(0.4, 0.6))
# batch_statistics: reduction over (0, 1); 320 values per channel and
# device (1280 in all: the approximate mode stops its search early there).
STATS_SHAPE = (N_DEV * 8, 40, 3)
STATS_MODES = {  # name: (masked, approximate); the linen model: no mask
    "exact_masked": (True, False),
    "approx_masked": (True, True),
}
# The models: (batch, length, features), a mask over the length.
MODEL_SHAPE = (N_DEV * 4, 12, 4)
TRAIN_STEPS = 3
LR = 0.5
MUTANT_DEVIATIONS = ("std", "superquantile")
# (deviation, the parameters it reads) per GBN layer.
LINEN_LAYERS = (("superquantile", dict(alpha=0.37)), ("half_range", {}))
NNX_LAYERS = (("median_abs", {}), ("upper_semi", {}))


# --------------------------------------------------------------------------
# Data (numpy; the same in every process and in the test).
# --------------------------------------------------------------------------


def stats_data():
  """Global (x, mask) for batch_statistics; process 1's rows differ."""
  rng = np.random.default_rng(0)
  x = rng.lognormal(size=STATS_SHAPE).astype(np.float32)
  half = STATS_SHAPE[0] // 2
  x[half:] = 2 * x[half:] + 1  # process 1: another distribution
  mask = rng.random(STATS_SHAPE) < 0.7
  mask[:8, :, 0] = False  # device 0: channel 0 empty
  mask[half:, :, 2] = False  # process 1: channel 2 empty
  return x, mask


def model_batch(step: int):
  """Global (x, mask, y) of a train step (``step=-1``: the eval batch)."""
  rng = np.random.default_rng(100 + step)
  b, length, f = MODEL_SHAPE
  y = rng.integers(0, 2, b).astype(np.int32)
  x = rng.standard_normal(MODEL_SHAPE) + y[:, None, None] * np.linspace(
      -1, 1, f)
  x = np.where(rng.random((b, 1, 1)) < 0.5, np.exp(x), x)  # skewed rows
  lengths = rng.integers(length // 3, length + 1, b)
  mask = np.arange(length)[None, :, None] < lengths[:, None, None]
  return x.astype(np.float32), mask, y


# --------------------------------------------------------------------------
# What is computed (axis_name=None: one program over the whole batch).
# --------------------------------------------------------------------------


def all_statistics(x, mask, axis_name=None, approximate=False,
                   deviations=None):
  """(centers, devs), each (len(deviations), C); default every deviation.

  Every deviation gets all of PARAMS; the warning about the ones it does not
  read is silenced.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "(?s).* is not used by statistic",
                            UserWarning)
    out = [gbn_jax.batch_statistics(x, axes=(0, 1), deviation=dev, mask=mask,
                                    axis_name=axis_name,
                                    approximate=approximate, **PARAMS)
           for dev in deviations or gbn_jax.DEVIATIONS]
  return jnp.stack([c for c, _ in out]), jnp.stack([d for _, d in out])


def mutant_statistics(x, mask, axis_name):
  """The variants' measures: MUTANT_DEVIATIONS only (compile time)."""
  return all_statistics(x, mask, axis_name, deviations=MUTANT_DEVIATIONS)


def _masked_mean(h, mask):
  w = mask.astype(h.dtype)
  return jnp.sum(h * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)


class LinenNet(nn.Module):
  """(Dense -> GBN -> relu) per deviation, masked mean over length, Dense.

  The GBN layers see no mask (the NNX model's do).
  """

  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, mask, train: bool):
    for dev, params in LINEN_LAYERS:
      x = nn.Dense(8)(x)
      x = gbn_jax.GeneralizedBatchNorm(
          use_running_average=not train, axis_name=self.axis_name,
          deviation=dev, momentum=0.8, **params)(x)
      x = nn.relu(x)
    return nn.Dense(2)(_masked_mean(x, mask))


class NNXNet(nnx.Module):
  """LinenNet's architecture in NNX, NNX_LAYERS, masked statistics."""

  def __init__(self, axis_name: str | None, rngs: nnx.Rngs):
    f = MODEL_SHAPE[-1]
    self.dense1 = nnx.Linear(f, 8, rngs=rngs)
    self.dense2 = nnx.Linear(8, 8, rngs=rngs)
    self.norm1, self.norm2 = (
        gbn_jax.nnx.GeneralizedBatchNorm(8, deviation=dev, momentum=0.8,
                                         axis_name=axis_name, rngs=rngs,
                                         **params)
        for dev, params in NNX_LAYERS)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x, mask, train: bool):
    for dense, norm in ((self.dense1, self.norm1), (self.dense2, self.norm2)):
      x = nn.relu(norm(dense(x), use_running_average=not train, mask=mask))
    return self.head(_masked_mean(x, mask))


def _loss(logits, y, axis_name):
  """The mean loss over the global batch.

  Under shard_map the local mean is pmean'ed inside the differentiated
  function: with shard_map's replication types the gradient of the replicated
  params is then the global one (a pmean of the local losses' gradients
  would be N_DEV times too large: their cotangents are already summed).
  """
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss if axis_name is None else lax.pmean(loss, axis_name)


def linen_init():
  x, mask, _ = model_batch(0)
  return LinenNet().init(jax.random.key(0), x, mask, train=False)


def linen_step(axis_name):
  """One SGD step: (variables, x, mask, y) -> (variables, logits, grads)."""
  model = LinenNet(axis_name)

  def step(variables, x, mask, y):
    def loss_fn(params):
      logits, upd = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x, mask, train=True, mutable=["batch_stats"])
      return _loss(logits, y, axis_name), (logits, upd["batch_stats"])

    (_, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    params = jax.tree.map(lambda p, g: p - LR * g, variables["params"], grads)
    return {"params": params, "batch_stats": stats}, logits, grads

  return step


def linen_eval(variables, x, mask):
  return LinenNet().apply(variables, x, mask, train=False)


def nnx_init(axis_name):
  """(graphdef, params, batch_stats) of a fresh NNXNet (seeded)."""
  return nnx.split(NNXNet(axis_name, nnx.Rngs(0)), nnx.Param, nnx.BatchStat)


def nnx_step(graphdef, axis_name):
  """One SGD step: (params, stats, x, mask, y) -> (params, stats, logits,
  grads)."""

  def step(params, stats, x, mask, y):
    model = nnx.merge(graphdef, params, stats)

    def loss_fn(model):
      logits = model(x, mask, train=True)
      return _loss(logits, y, axis_name), logits

    (_, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    params = jax.tree.map(lambda p, g: p - LR * g, nnx.state(model, nnx.Param),
                          grads)
    return params, nnx.state(model, nnx.BatchStat), logits, grads

  return step


def nnx_eval(graphdef, params, stats, x, mask):
  return nnx.merge(graphdef, params, stats)(x, mask, train=False)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
  """``{prefix/path: array}`` of a pytree (linen dicts or NNX states)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(v)
          for path, v in leaves}


def all_gather_sizes(hlo: str) -> list[int]:
  """Elements in the result of each all-gather of a compiled HLO module."""
  sizes = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
    if m:
      shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
      sizes.append(max(int(np.prod([int(d) for d in s.split(",") if d]))
                       for s in shapes))
  return sizes


# --------------------------------------------------------------------------
# The worker.
# --------------------------------------------------------------------------


class _Run:
  """Compiles and runs programs, keeping the all-gather sizes of each."""

  def __init__(self):
    self.gathers: dict[str, list[int]] = {}
    self.compiled = {}

  def __call__(self, name, fn, *args):
    if name not in self.compiled:  # a name is one program (a train step)
      t = time.perf_counter()
      self.compiled[name] = jax.jit(fn).lower(*args).compile()
      self.gathers[name] = all_gather_sizes(self.compiled[name].as_text())
      print(f"{name}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
    return self.compiled[name](*args)


def _rows(a, pid):
  """Process ``pid``'s contiguous block of the global batch."""
  n = a.shape[0] // N_PROC
  return a[pid * n:(pid + 1) * n]


def _fetch(tree):
  """The global value of every leaf, in this process (numpy)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return jax.tree.map(np.asarray,
                      multihost_utils.process_allgather(tree, tiled=True))


def _replicated(tree, mesh):
  """A host pytree (the same in every process) as replicated global arrays."""
  sharding = NamedSharding(mesh, P())

  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  return jax.tree.map(put, tree)


def run_worker(out_dir: str, pid: int) -> None:
  start = time.perf_counter()
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.process_count() == N_PROC and jax.device_count() == N_DEV
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  # Pools over "batch" only, the devices of one process.
  per_process = Mesh(np.array(jax.devices()).reshape(N_PROC, DEV_PER_PROC),
                     ("proc", AXIS))
  shard = NamedSharding(mesh, P(AXIS))

  def local(a, sharding=shard):
    return jax.make_array_from_process_local_data(sharding, _rows(a, pid))

  run = _Run()
  res: dict[str, np.ndarray] = {}

  # batch_statistics.
  x_np, mask_np = stats_data()
  x, mask = local(x_np), local(mask_np)
  res["stats/x"] = _fetch(x)  # placement check: the concatenated batch
  for name, (masked, approximate) in STATS_MODES.items():
    m = mask if masked else None
    got = run(f"stats/jit/{name}",
              lambda x, m, a=approximate: all_statistics(x, m, None, a), x, m)
    res[f"stats/jit/{name}/center"], res[f"stats/jit/{name}/dev"] = _fetch(got)
    # Every device's copy (a leading device axis).
    sm = jax.shard_map(
        lambda x, m, a=approximate: tuple(
            v[None] for v in all_statistics(x, m, AXIS, a)),
        mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    got = run(f"stats/shard_map/{name}", sm, x, m)
    c, d = _fetch(got)
    res[f"stats/shard_map/{name}/center"] = c
    res[f"stats/shard_map/{name}/dev"] = d

  # Variants that must not pass: no axis_name; pooled within each process.
  dropped = jax.shard_map(
      lambda x, m: tuple(v[None] for v in mutant_statistics(x, m, None)),
      mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
  res["mutant/no_axis_name/center"], res["mutant/no_axis_name/dev"] = _fetch(
      run("mutant/no_axis_name", dropped, x, mask))
  spec = P(("proc", AXIS))
  within = jax.shard_map(
      lambda x, m: tuple(v[None, None] for v in mutant_statistics(x, m, AXIS)),
      mesh=per_process, in_specs=spec, out_specs=P("proc", AXIS))
  xp = local(x_np, NamedSharding(per_process, spec))
  mp = local(mask_np, NamedSharding(per_process, spec))
  c, d = _fetch(run("mutant/within_process", within, xp, mp))
  res["mutant/within_process/center"] = c.reshape(N_DEV, *c.shape[2:])
  res["mutant/within_process/dev"] = d.reshape(N_DEV, *d.shape[2:])

  # Models: a few SGD steps, under sharded jit and under shard_map.
  batches = [tuple(local(a) for a in model_batch(t))
             for t in range(TRAIN_STEPS)]
  x_eval, m_eval, _ = (local(a) for a in model_batch(-1))
  data_specs = (P(AXIS), P(AXIS), P(AXIS))
  for mode in ("jit", "shard_map"):
    axis = None if mode == "jit" else AXIS
    # linen
    step = linen_step(axis)
    if mode == "shard_map":
      step = jax.shard_map(step, mesh=mesh, in_specs=(P(), *data_specs),
                           out_specs=(P(), P(AXIS), P()))
    variables = _replicated(linen_init(), mesh)
    for t, batch in enumerate(batches):
      variables, logits, grads = run(f"linen/{mode}/step", step, variables,
                                     *batch)
      res.update(flat(_fetch(logits), f"linen/{mode}/step{t}/logits"))
      res.update(flat(_fetch(grads), f"linen/{mode}/step{t}/grads"))
    res.update(flat(_fetch(variables), f"linen/{mode}/variables"))
    res[f"linen/{mode}/eval"] = _fetch(
        run(f"linen/{mode}/eval", linen_eval, variables, x_eval, m_eval))
    if mode == "shard_map":
      _save_checkpoint(os.path.join(out_dir, "ckpt"), variables)
    # NNX
    graphdef, params, stats = nnx_init(axis)
    params, stats = _replicated(params, mesh), _replicated(stats, mesh)
    step = nnx_step(graphdef, axis)
    if mode == "shard_map":
      step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), *data_specs),
                           out_specs=(P(), P(), P(AXIS), P()))
    for t, batch in enumerate(batches):
      params, stats, logits, grads = run(f"nnx/{mode}/step", step, params,
                                         stats, *batch)
      res.update(flat(_fetch(logits), f"nnx/{mode}/step{t}/logits"))
      res.update(flat(_fetch(grads), f"nnx/{mode}/step{t}/grads"))
    res.update(flat(_fetch(params), f"nnx/{mode}/params"))
    res.update(flat(_fetch(stats), f"nnx/{mode}/batch_stats"))
    res[f"nnx/{mode}/eval"] = _fetch(run(
        f"nnx/{mode}/eval",
        lambda p, s, x, m, g=graphdef: nnx_eval(g, p, s, x, m),
        params, stats, x_eval, m_eval))

  for name, sizes in run.gathers.items():
    res[f"gathers/{name}"] = np.asarray(sizes, np.int64)
  np.savez(os.path.join(out_dir, f"process{pid}.npz"), **res)
  print(f"process {pid} done in {time.perf_counter() - start:.1f} s")


def _save_checkpoint(path: str, variables) -> None:
  """Every process calls save; each writes the parts it holds."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path, variables)
  ckpt.wait_until_finished()
  ckpt.close()


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="directory for the results")
  ap.add_argument("--coordinator", required=True)
  ap.add_argument("--num-processes", type=int, required=True)
  ap.add_argument("--process-id", type=int, required=True)
  args = ap.parse_args()
  _multihost.initialize(args.coordinator, args.num_processes, args.process_id)
  run_worker(args.out, args.process_id)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
