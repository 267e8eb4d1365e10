"""Multi-host, with real processes: 2 x 2 CPU devices over jax.distributed.

``tests/multihost_worker.py`` runs in 2 processes coordinated on localhost
(gloo collectives); each feeds only its own rows of every batch to a mesh
over all 4 devices. Here, in one process, the same computations run on one
device on the concatenated batch, and the workers' results must equal them:

- ``batch_statistics`` for every deviation, exact with a mask, under sharded
  ``jit`` and under ``shard_map`` with ``axis_name`` (every device's copy);
- the approximate mode (``gbn_jax/order_statistics.py``): the counting
  search on pooled counts, stopped early, so it is device-invariant -- under
  sharded ``jit`` and under ``shard_map`` it equals one device on the
  concatenated batch (to float rounding);
- a linen and an NNX model with GBN layers (no mask / masked): logits and
  gradients of 3 SGD steps, the final params and ``batch_stats``, and the
  eval logits;
- the compiled programs gather no activations (no all-gather of x's size);
- the orbax checkpoint written by both processes restores in one process
  and evaluates the same;
- two wrong variants come out different (so the comparison can fail):
  ``shard_map`` without ``axis_name``, and pooling only within each process
  (the counts not summed across processes).
"""

import functools
import os

import jax
import numpy as np
import pytest

import gbn_jax
from tests import _multihost
from tests import multihost_worker as w

pytestmark = pytest.mark.slow

TIMEOUT = 900  # seconds, all workers together (compilation dominates)
# Measures whose values are order statistics of the pooled sample: bit for bit.
EXACT_CENTERS = {"median", "quantile", "midrange"}
EXACT_DEVS = {"half_range"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(output directory, [each process's results])."""
  out = tmp_path_factory.mktemp("multihost")
  _multihost.launch("tests.multihost_worker", ["--out", str(out)],
                    num_processes=w.N_PROC,
                    devices_per_process=w.DEV_PER_PROC, timeout=TIMEOUT)
  results = []
  for i in range(w.N_PROC):
    with np.load(out / f"process{i}.npz") as f:
      results.append(dict(f))
  return out, results


@pytest.fixture(scope="module")
def res(run):
  return run[1][0]


def test_every_process_holds_the_same_results(run):
  first, *others = run[1]
  for other in others:
    assert set(other) == set(first)
    for k, v in first.items():
      np.testing.assert_array_equal(other[k], v, err_msg=k)


def test_each_process_fed_its_rows_of_the_batch(res):
  np.testing.assert_array_equal(res["stats/x"], w.stats_data()[0])


# --------------------------------------------------------------------------
# batch_statistics.
# --------------------------------------------------------------------------


@functools.cache
def _one_device(mode):
  """Reference (center, dev) of STATS_MODES[mode] on one device."""
  x, mask = w.stats_data()
  masked, approximate = w.STATS_MODES[mode]
  f = jax.jit(lambda x, m: w.all_statistics(x, m, None, approximate))
  return tuple(np.asarray(a) for a in f(x, mask if masked else None))


def _assert_measures(got, want, what, approximate):
  """got/want: (center, dev), each (len(DEVIATIONS), C).

  Order statistics bit for bit, except in the approximate mode: there the
  pivots are float functions of the pooled counts and q̂ is interpolated in
  the final bracket, which another compiled program may round differently.
  """
  for j, dev in enumerate(gbn_jax.DEVIATIONS):
    stat = gbn_jax.NATURAL_STATISTIC[dev]
    for i, (name, exact) in enumerate(((stat, stat in EXACT_CENTERS),
                                       (dev, dev in EXACT_DEVS))):
      exact = exact and not approximate
      msg = f"{what}: {stat}/{dev}, {name}"
      if exact:
        np.testing.assert_array_equal(got[i][j], want[i][j], msg)
      else:
        np.testing.assert_allclose(got[i][j], want[i][j], rtol=1e-5,
                                   atol=1e-6, err_msg=msg)


@pytest.mark.parametrize("mode", list(w.STATS_MODES))
def test_batch_statistics_equal_one_process(res, mode):
  approximate = w.STATS_MODES[mode][1]
  want = _one_device(mode)
  jit = tuple(res[f"stats/jit/{mode}/{k}"] for k in ("center", "dev"))
  _assert_measures(jit, want, f"sharded jit, {mode}", approximate)
  # shard_map: every device's copy equals the one-device result (the
  # approximate mode too: only pooled counts, min, max place its pivots).
  sm = tuple(res[f"stats/shard_map/{mode}/{k}"] for k in ("center", "dev"))
  for i in range(w.N_DEV):
    _assert_measures(tuple(a[i] for a in sm), want,
                     f"shard_map, {mode}, device {i}", approximate)


@pytest.mark.parametrize("variant", ["no_axis_name", "within_process"])
def test_wrong_variants_differ(res, variant):
  """The comparison fails without axis_name / without pooling across
  processes: every device's superquantile deviation is off."""
  _, want_dev = _one_device("exact_masked")
  j = list(gbn_jax.DEVIATIONS).index("superquantile")
  got = res[f"mutant/{variant}/dev"][:, w.MUTANT_DEVIATIONS.index(
      "superquantile")]
  for i in range(w.N_DEV):
    err = np.max(np.abs(got[i] - want_dev[j]) / np.abs(want_dev[j]))
    assert err > 0.05, (variant, i, got[i], want_dev[j])


# --------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------


def _train_one_device(model):
  """The workers' steps on one device: {name: array} as the workers write."""
  out = {}
  batches = [w.model_batch(t) for t in range(w.TRAIN_STEPS)]
  x_eval, m_eval, _ = w.model_batch(-1)
  if model == "linen":
    variables = w.linen_init()
    step = jax.jit(w.linen_step(None))
    for t, batch in enumerate(batches):
      variables, logits, grads = step(variables, *batch)
      out.update(w.flat(logits, f"linen/step{t}/logits"))
      out.update(w.flat(grads, f"linen/step{t}/grads"))
    out.update(w.flat(variables, "linen/variables"))
    out["linen/eval"] = np.asarray(
        jax.jit(w.linen_eval)(variables, x_eval, m_eval))
  else:
    graphdef, params, stats = w.nnx_init(None)
    step = jax.jit(w.nnx_step(graphdef, None))
    for t, batch in enumerate(batches):
      params, stats, logits, grads = step(params, stats, *batch)
      out.update(w.flat(logits, f"nnx/step{t}/logits"))
      out.update(w.flat(grads, f"nnx/step{t}/grads"))
    out.update(w.flat(params, "nnx/params"))
    out.update(w.flat(stats, "nnx/batch_stats"))
    out["nnx/eval"] = np.asarray(jax.jit(
        lambda p, s, x, m: w.nnx_eval(graphdef, p, s, x, m))(
            params, stats, x_eval, m_eval))
  return out


@pytest.fixture(scope="module")
def trained():
  return {m: _train_one_device(m) for m in ("linen", "nnx")}


@pytest.mark.parametrize("path", ["jit", "shard_map"])
@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_training_equals_one_process(res, trained, model, path):
  want = trained[model]
  got = {k.replace(f"{model}/{path}/", f"{model}/"): v for k, v in res.items()
         if k.startswith(f"{model}/{path}/")}
  assert set(got) == set(want)
  assert any("grads" in k for k in want) and any("mean" in k for k in want)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  # Three steps did train: the parameters moved.
  assert not np.allclose(want[f"{model}/eval"], 0)


# --------------------------------------------------------------------------
# Communication, checkpoint.
# --------------------------------------------------------------------------


def test_no_program_gathers_activations(res):
  """All-gathers, if any, are smaller than one device's share of the input.

  (These programs have none; the bound leaves room for XLA to gather small
  pieces, such as the exact mode's cold-start subsample under sharded jit,
  at most order_statistics.PIVOT_SUBSAMPLE_SIZE values per channel.)"""
  share = {"stats": np.prod(w.STATS_SHAPE) // w.N_DEV,
           "mutant": np.prod(w.STATS_SHAPE) // w.N_DEV,
           "linen": np.prod(w.MODEL_SHAPE) // w.N_DEV,
           "nnx": np.prod(w.MODEL_SHAPE) // w.N_DEV}
  programs = {k[len("gathers/"):]: v for k, v in res.items()
              if k.startswith("gathers/")}
  assert len(programs) >= 2 * len(w.STATS_MODES) + 2 + 8
  for name, sizes in programs.items():
    limit = share[name.split("/")[0]]
    assert all(s < limit for s in sizes), (name, list(sizes), limit)


def test_checkpoint_restores_in_one_process(run, res):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  out, _ = run
  path = out / "ckpt"
  # Both processes wrote data (orbax splits even replicated arrays among
  # their replicas).
  for i in range(w.N_PROC):
    assert os.listdir(path / f"ocdbt.process_{i}" / "d"), os.listdir(path)
  # One device here; the checkpoint was written from 4 in 2 processes.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
      w.linen_init())
  with ocp.StandardCheckpointer() as ckpt:
    variables = ckpt.restore(path, target)
  got = w.flat(variables, "linen/shard_map/variables")
  for k, v in got.items():
    np.testing.assert_array_equal(v, res[k], err_msg=k)
  x_eval, m_eval, _ = w.model_batch(-1)
  np.testing.assert_allclose(
      jax.jit(w.linen_eval)(variables, x_eval, m_eval),
      res["linen/shard_map/eval"], rtol=1e-5, atol=1e-6)
