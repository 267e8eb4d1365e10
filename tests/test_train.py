"""The experiment runner examples/train.py: data, models, outputs, summaries."""

import csv
import importlib.util
import math
import os
import pickle
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gbn_jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import train
from harness import results

ALL_NORMS = ("bn", "gbn-superquantile", "gbn-mean_abs", "gbn-median_abs",
             "gbn-half_range", "l1bn", "none", "selu")


# -- end to end ------------------------------------------------------------


def test_quick_flag_is_the_smoke_configuration():
  args = train.parse_args(["--quick"])
  assert (args.dataset, args.model) == ("mnist1d", "mlp")
  assert args.norm == ["bn", "gbn-superquantile"]
  assert args.steps <= 400 and args.seeds >= 2


@pytest.mark.slow
def test_reduced_quick_run_writes_the_three_files(tmp_path):
  """--quick's configuration with fewer steps, end to end on real mnist1d."""
  out = tmp_path / "run"
  text = train.main([
      "--dataset", "mnist1d", "--model", "mlp", "--norm", "bn",
      "gbn-superquantile", "--seeds", "2", "--steps", "30", "--eval-every",
      "15", "--out", str(out), "--no-progress",
  ])
  with open(out / "results.csv", newline="") as f:
    reader = csv.DictReader(f)
    rows = list(reader)
  for col in ("norm", "alpha", "seed", "step", "train_loss", "test_acc",
              "wall_seconds"):
    assert col in reader.fieldnames
  # 2 norms x 2 seeds x evaluations at steps 0, 15, 30.
  assert len(rows) == 12
  assert {(r["norm"], r["seed"], r["step"]) for r in rows} == {
      (n, s, t) for n in ("bn", "gbn-superquantile") for s in ("0", "1")
      for t in ("0", "15", "30")
  }
  assert {r["alpha"] for r in rows
          if r["norm"] == "gbn-superquantile"} == {"0.5"}
  last = [r for r in rows if r["step"] == "30"]
  for r in last:
    assert 0.0 <= float(r["test_acc"]) <= 1.0
    assert float(r["train_loss"]) < math.log(10)  # it learned something
    assert float(r["wall_seconds"]) > 0
  summary = (out / "summary.md").read_text()
  assert summary == text
  assert "| bn |" in summary and "| gbn-superquantile(a=0.5) |" in summary
  assert "final test error" in summary and "steps to" in summary
  png = (out / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# -- data ------------------------------------------------------------------


def _write_cifar_batch(path, data, labels):
  with open(path, "wb") as f:
    pickle.dump({b"batch_label": b"tiny", b"labels": list(labels),
                 b"data": data, b"filenames": [b"x"] * len(labels)}, f)


def test_cifar10_loader_reads_tiny_python_batches(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "cifar-10-batches-py"
  root.mkdir()
  train_parts = [rng.integers(0, 256, (3, 3072), dtype=np.uint8)
                 for _ in range(2)]
  test_data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
  _write_cifar_batch(root / "data_batch_1", train_parts[0], [0, 1, 2])
  _write_cifar_batch(root / "data_batch_2", train_parts[1], [3, 4, 9])
  _write_cifar_batch(root / "test_batch", test_data, [5, 6])

  x_tr, y_tr, x_te, y_te = train.load_dataset("cifar10", str(tmp_path))

  assert x_tr.shape == (6, 32, 32, 3) and x_te.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(y_tr, [0, 1, 2, 3, 4, 9])
  np.testing.assert_array_equal(y_te, [5, 6])
  # Independent reference: row = 1024 red, 1024 green, 1024 blue values, each
  # a 32x32 image in row-major order; standardised per channel by train stats.
  raw = np.concatenate(train_parts).astype(np.float64) / 255
  img = np.stack([raw[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32)
                  for c in range(3)], axis=-1)
  mu, sd = img.mean(axis=(0, 1, 2)), img.std(axis=(0, 1, 2))
  np.testing.assert_allclose(x_tr, (img - mu) / sd, rtol=1e-5, atol=1e-5)
  raw_te = test_data.astype(np.float64) / 255
  assert np.isclose(x_te[1, 4, 7, 2],
                    (raw_te[1, 2048 + 4 * 32 + 7] - mu[2]) / sd[2], atol=1e-5)
  # The directory itself (without the cifar-10-batches-py folder) works too.
  x_tr2, *_ = train.load_cifar10(str(root))
  np.testing.assert_array_equal(x_tr2, x_tr)


def test_cifar10_loader_errors(tmp_path):
  with pytest.raises(ValueError, match="--data-dir"):
    train.load_dataset("cifar10", None)
  with pytest.raises(FileNotFoundError, match="test_batch"):
    train.load_dataset("cifar10", str(tmp_path))
  with pytest.raises(ValueError, match="mnist1d"):
    train.load_dataset("imagenet")


def test_digits_split_is_fixed_and_standardised():
  x_tr, _y_tr, x_te, y_te = train.load_dataset("digits")
  assert x_tr.shape[1:] == (8, 8, 1) and len(x_tr) + len(x_te) == 1797
  assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std()) - 1) < 1e-4
  x_tr2, *_ = train.load_dataset("digits")
  np.testing.assert_array_equal(x_tr, x_tr2)
  assert set(np.unique(y_te)) == set(range(10))


# -- models ----------------------------------------------------------------


# the exact order-statistic norms and BN compile the most: slow tier
@pytest.mark.parametrize("norm", [
    pytest.param(n, marks=pytest.mark.slow)
    if n in ("bn", "gbn-superquantile", "gbn-median_abs") else n
    for n in ALL_NORMS])
def test_each_norm_builds_a_model_with_finite_forward_pass(norm):
  spec = train.expand_norms([norm], [0.3])[0]
  rng = np.random.default_rng(1)
  inputs = {  # 1-D CNN (mnist1d), 2-D CNN (digits), MLP
      "cnn1d": ("cnn", rng.normal(size=(16, 40, 1))),
      "cnn2d": ("cnn", rng.normal(size=(16, 8, 8, 1))),
      "mlp": ("mlp", rng.normal(size=(16, 40, 1))),
  }
  normalizes = norm not in ("none", "selu")
  for name, (kind, x) in inputs.items():
    x = jnp.asarray(x, jnp.float32)
    model = train.build_model(kind, spec, 10, 8)
    # lazy_init computes the variables only (no forward pass to compile);
    # the train step and the eval on its running averages are one program.
    variables = model.lazy_init(jax.random.PRNGKey(0),
                                jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert ("batch_stats" in variables) == normalizes, name

    @jax.jit
    def train_then_eval(v, x, model=model):
      y, new = model.apply(v, x, train=True, mutable=["batch_stats"])
      return y, new, model.apply({**v, **new}, x, train=False)

    y, new, y_eval = train_then_eval(variables, x)
    assert y.shape == (16, 10) and bool(jnp.all(jnp.isfinite(y))), name
    if normalizes:  # train mode updates the running statistics
      assert not all(
          bool(jnp.all(a == b)) for a, b in zip(
              jax.tree.leaves(new["batch_stats"]),
              jax.tree.leaves(variables["batch_stats"]), strict=True))
    assert bool(jnp.all(jnp.isfinite(y_eval))), name


def test_norm_layers_are_the_requested_modules():
  spec = train.NormSpec("gbn-superquantile", 0.3)
  layer = train.make_norm_layer(spec, train=True)
  assert isinstance(layer, gbn_jax.GeneralizedBatchNorm)
  assert (layer.deviation, layer.alpha, layer.use_running_average) == (
      "superquantile", 0.3, False)
  l1 = train.make_norm_layer(train.NormSpec("l1bn"), train=False)
  assert (l1.statistic, l1.deviation, l1.gaussian_consistent) == (
      "mean", "mean_abs", True)
  assert l1.use_running_average
  assert isinstance(train.make_norm_layer(train.NormSpec("bn"), True),
                    nn.BatchNorm)
  assert train.make_norm_layer(train.NormSpec("selu"), True) is None
  # SELU model: selu activations (negative outputs below -1 are impossible
  # for relu and reachable for selu: its lower bound is -1.7581).
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 40, 1)), jnp.float32)
  block_out = {}
  for norm in ("selu", "none"):
    m = train.build_model("mlp", train.NormSpec(norm), 10, 64)
    v = m.init(jax.random.PRNGKey(0), x)
    _, inter = m.apply(v, x, capture_intermediates=True,
                       mutable=["intermediates"])
    block_out[norm] = min(
        float(jnp.min(a))
        for path, a in jax.tree_util.tree_leaves_with_path(inter)
        if "['Block_0']['__call__']" in jax.tree_util.keystr(path))
  assert block_out["none"] >= 0.0 > block_out["selu"]


def test_expand_norms_and_errors():
  specs = train.expand_norms(["bn", "gbn-superquantile", "selu"], [0.1, 0.9])
  assert [s.label for s in specs] == [
      "bn", "gbn-superquantile(a=0.1)", "gbn-superquantile(a=0.9)", "selu"]
  with pytest.raises(ValueError, match="gbn-superquantile"):
    train.expand_norms(["gbn-variance"], [0.5])
  with pytest.raises(ValueError, match="sgd"):
    train.make_optimizer("rmsprop")


# -- summaries -------------------------------------------------------------


def _rows(norm, seed, accs, losses, lr=0.1):
  return [dict(dataset="d", model="m", norm=norm, alpha=None, optimizer="sgd",
               lr=lr, batch_size=8, seed=seed, step=10 * i, train_loss=loss,
               test_acc=acc, wall_seconds=float(i))
          for i, (acc, loss) in enumerate(zip(accs, losses, strict=True))]


def test_steps_to_target_divergence_and_tables():
  a0 = _rows("bn", 0, [0.1, 0.5, 0.8, 0.9], [math.nan, 2.0, 1.0, 0.5])
  a1 = _rows("bn", 1, [0.1, 0.7, 0.85, 0.9], [math.nan, 2.0, 1.0, 0.4])
  bad = _rows("none", 0, [0.1, 0.1, 0.1, 0.1],
              [math.nan, 2.0, math.nan, math.nan])
  big = _rows("bn", 0, [0.1, 0.2, 0.2, 0.1], [math.nan, 2.2, 2.5, 3.0], lr=1.0)
  assert train.steps_to(a0, 0.8) == 20 and train.steps_to(a1, 0.8) == 20
  assert train.steps_to(a0, 0.95) is None
  assert not train.diverged(a0) and train.diverged(bad) and train.diverged(big)
  runs = train.runs_of(a0 + a1 + bad + big)
  table = train.summary_table(runs, ("d", "m", "sgd"), 0.1, 0.6)
  # bn: errors 10%, 10%; steps to 60%: 20 and 10 -> 15 ± 7.07.
  assert "| bn | 10.00 ± 0.00 | 15 ± 7 | 2/2 | 0 |" in table
  assert "| none | 90.00 (1 seed) | — | 0/1 | 1 |" in table
  sweep = train.lr_sweep_table(runs, ("d", "m", "sgd"))
  # lr 1.0 diverged, 0.1 is the largest stable
  assert "| bn | 2 | 0.1 |" in sweep


def test_study_sweep_grid_groups_by_norm_and_lr():
  """The CIFAR study's sweep grid (docs/results/cifar10/tables.py --sweep):
  one row per norm, one cell per lr, mean final error (final loss), † when
  the harness counts a seed diverged, — for an lr the norm did not run."""
  a0 = _rows("bn", 0, [0.1, 0.5, 0.8, 0.9], [math.nan, 2.0, 1.0, 0.5])
  a1 = _rows("bn", 1, [0.1, 0.7, 0.85, 0.7], [math.nan, 2.0, 1.0, 0.3])
  big = _rows("bn", 0, [0.1, 0.2, 0.2, 0.1], [math.nan, 2.2, 2.5, 3.0], lr=1.0)
  sq = _rows("gbn-superquantile", 0, [0.1, 0.3, 0.6, 0.75],
             [math.nan, 2.0, 1.5, 1.2], lr=1.0)
  other = [dict(r, dataset="e") for r in a0]
  runs = train.runs_of(a0 + a1 + big + sq + other)
  group = ("d", "m", "sgd")
  by_norm = results.runs_by_norm_and_lr(runs, group)
  assert {k: sorted(v) for k, v in by_norm.items()} == {
      "bn": [0.1, 1.0], "gbn-superquantile": [1.0]}
  assert sorted(by_norm["bn"][0.1]) == [0, 1]
  assert np.allclose(sorted(results.final_errors(by_norm["bn"][0.1])),
                     [10.0, 30.0])

  path = os.path.join(os.path.dirname(__file__), "..", "docs", "results",
                      "cifar10", "tables.py")
  spec = importlib.util.spec_from_file_location("study_tables", path)
  tables = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tables)
  grid = tables.sweep_table(runs, group).splitlines()
  assert grid[0] == "| norm | lr 0.1 | lr 1 |"
  # bn at 0.1: errors 10 and 30 -> 20.0, losses 0.5 and 0.3 -> 0.40.
  assert "| bn | 20.0 (0.40) | 90.0 (3.00) † |" in grid
  assert "| gbn-superquantile | — | 25.0 (1.20) |" in grid
  assert len(grid) == 4  # header, rule, two norms: dataset "e" is left out
