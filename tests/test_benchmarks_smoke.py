"""Smoke test of benchmarks/network.py: its networks equal the harness's,
and its train step and benchmark loop run on tiny input."""

import importlib.util
import os
import sys

import jax
import numpy as np
import pytest

_ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(_ROOT, "examples"))

from harness import models  # noqa: E402


def _load_network():
  path = os.path.join(_ROOT, "benchmarks", "network.py")
  spec = importlib.util.spec_from_file_location("bench_network", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look themselves up
  spec.loader.exec_module(module)
  return module


network = _load_network()


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["resnet20", "mlp"])
def test_networks_equal_the_harness(model_name):
  x, _ = network.make_batches(model_name, 4, 1)[0]
  if model_name == "resnet20":
    x = x[:, :8, :8, :]  # any size >= 4x4 runs; small is fast
  ours = network.build_model(model_name, "bn")
  theirs = models.build_model(
    model_name,
    models.NormSpec("bn"),
    width=None if model_name == "resnet20" else 512,
  )
  variables = ours.init(jax.random.PRNGKey(0), x, train=False)
  ref = theirs.init(jax.random.PRNGKey(0), x, train=False)
  assert jax.tree_util.tree_structure(
    variables
  ) == jax.tree_util.tree_structure(ref)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, ref)
  for train in (False, True):
    out = ours.apply(variables, x, train=train, mutable=["batch_stats"])
    exp = theirs.apply(variables, x, train=train, mutable=["batch_stats"])
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
      out,
      exp,
    )


@pytest.mark.slow
def test_train_step_and_benchmark_loop_run():
  rows = network.bench_model(
    "mlp",
    ("bn", "approx", "online"),
    batch=8,
    repeats=1,
    steps_per_repeat=1,
    warmup=1,
    log=lambda *_: None,
  )
  assert [r["config"] for r in rows] == ["bn", "approx", "online"]
  for r in rows:
    assert r["step_ms"] > 0 and r["compile_total_s"] > 0
    assert np.isfinite(r["ratio"]) and np.isfinite(r["memory_ratio"])
  assert "| mlp | approx |" in network.format_table(rows)
