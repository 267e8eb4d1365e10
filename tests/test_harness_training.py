"""The harness's training loop and results: CIFAR-style runs end to end on a
tiny generated image folder, time per step and time to target, precise
statistics, the csv format."""

import csv
import math
import os
import sys

import numpy as np
import pytest

pytest.importorskip("PIL")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import train
from harness import results, training

from tests.test_cifar_loader import make_folder


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


@pytest.mark.slow
def test_tiny_image_folder_run_records_time_and_precise_stats(tmp_path,
                                                               monkeypatch,
                                                               capsys):
  """--dataset cifar10 on a generated image folder, the plain CNN, with
  augmentation (the default) and --precise-stats through a stand-in for
  gbn_jax.linen.recompute_batch_stats (identity: both evaluations agree)."""
  calls = []

  def fake_recompute(model, variables, batches, **kwargs):
    batches = list(batches)
    calls.append((len(batches), batches[0].shape, kwargs))
    return variables

  monkeypatch.setattr(training.gbn_linen, "recompute_batch_stats",
                      fake_recompute, raising=False)
  folder = make_folder(tmp_path / "tiny")
  out = tmp_path / "run"
  text = train.main([
      "--dataset", "cifar10", "--data-dir", str(folder), "--cache-dir",
      str(tmp_path / "cache"), "--model", "cnn", "--width", "4", "--norm",
      "bn", "--seeds", "1", "--steps", "4", "--eval-every", "2",
      "--batch-size", "4", "--precise-stats", "2", "--out", str(out),
      "--no-progress",
  ])
  columns, rows = _read_csv(out / "results.csv")
  assert tuple(columns) == results.CSV_COLUMNS
  assert [int(r["step"]) for r in rows] == [0, 2, 4]
  assert rows[0]["step_seconds"] == ""
  for r in rows[1:]:
    assert float(r["step_seconds"]) > 0
    assert math.isfinite(float(r["train_loss"]))
  walls = [float(r["wall_seconds"]) for r in rows]
  assert walls[0] == 0 < walls[1] < walls[2]
  for r in rows:  # identity recompute: the same accuracy both ways
    assert float(r["test_acc_precise"]) == float(r["test_acc"])
  assert len(calls) == 3  # one recompute per evaluation
  assert calls[0][0] == 2 and calls[0][1] == (4, 32, 32, 3)
  assert calls[0][2]["train"] is True
  assert "ms / step" in text and "time to" in text
  assert "final test error, precise stats (%)" in text
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  # --no-progress: one log line per evaluation instead of a bar.
  log = [line for line in capsys.readouterr().err.splitlines()
         if " step " in line and "test acc" in line]
  assert [line.split(" step ")[1].split(":")[0] for line in log] == [
      "2/4", "4/4"]


def test_precise_stats_without_the_library_function_is_a_clear_error(
    tmp_path, monkeypatch):
  monkeypatch.delattr(training.gbn_linen, "recompute_batch_stats",
                      raising=False)
  with pytest.raises(RuntimeError, match="recompute_batch_stats"):
    train.main(["--dataset", "digits", "--precise-stats", "2", "--out",
                str(tmp_path / "run"), "--no-progress"])


def test_precise_stats_with_the_library_function(tmp_path):
  out = tmp_path / "run"
  train.main(["--dataset", "digits", "--model", "mlp", "--width", "16",
              "--norm", "gbn-superquantile", "none", "--seeds", "1",
              "--steps", "10", "--eval-every", "10", "--batch-size", "32",
              "--precise-stats", "3", "--out", str(out), "--no-progress"])
  _, rows = _read_csv(out / "results.csv")
  for r in rows:
    assert 0.0 <= float(r["test_acc_precise"]) <= 1.0
    if r["norm"] == "none":  # nothing to recompute
      assert r["test_acc_precise"] == r["test_acc"]


def test_cli_resolves_epochs_and_augmentation():
  args = train.parse_args(["--dataset", "cifar10", "--epochs", "2",
                           "--batch-size", "100"])
  assert args.augment
  cfg = train.run_config(args, 50_000)
  assert cfg.steps == 1000 and cfg.augment and cfg.batch_size == 100
  assert not train.parse_args(["--dataset", "cifar10", "--no-augment"]).augment
  assert not train.parse_args(["--dataset", "digits"]).augment
  assert train.run_config(train.parse_args([]), 4000).steps == 1000
  conv = train.parse_args(["--dataset", "cifar10", "--model", "resnet20"])
  assert not train.run_config(conv, 50_000).scan  # convolutions: stepped
  assert train.run_config(train.parse_args(["--model", "mlp"]), 10).scan
  phases = train.experiment_phases(0.1, [0.1, 1.0], 2, 1, first_seed=3)
  assert phases == [([0.1], [3, 4]), ([1.0], [3])]


def test_data_order_and_augmentation_keys_are_per_seed():
  a = training.batch_indices(0, 100, 30, 8)
  np.testing.assert_array_equal(a, training.batch_indices(0, 100, 30, 8))
  assert not np.array_equal(a, training.batch_indices(1, 100, 30, 8))
  precise = training.batch_indices(0, 100, 3, 8, stream=2)
  assert not np.array_equal(precise, a[:3])
  assert sorted(a[:12].ravel()) == sorted(set(a[:12].ravel()))  # one epoch


# -- results -----------------------------------------------------------------


def _rows(norm, seed, accs, step_seconds):
  return [dict(dataset="d", model="m", norm=norm, alpha=None, optimizer="sgd",
               lr=0.1, batch_size=8, seed=seed, step=10 * i, train_loss=1.0,
               test_acc=a, wall_seconds=10 * i * step_seconds,
               step_seconds=step_seconds if i else math.nan,
               test_acc_precise=math.nan)
          for i, a in enumerate(accs)]


def test_time_to_target_and_step_time_ratio():
  bn = _rows("bn", 0, [0.1, 0.5, 0.9, 0.9], 0.010)
  gbn = _rows("gbn-x", 0, [0.1, 0.9, 0.9, 0.9], 0.013)
  assert results.time_to(bn, 0.8) == pytest.approx(0.2)
  assert results.time_to(gbn, 0.8) == pytest.approx(0.13)
  assert results.seconds_per_step(gbn) == pytest.approx(0.013)
  table = results.summary_table(results.runs_of(bn + gbn), ("d", "m", "sgd"),
                                0.1, 0.8)
  assert "| bn | 10.00 (1 seed) | 20 (1 seed) | 1/1 | 0 | 0.2 (1 seed) |" \
         " 10.0 | 1.00 |" in table
  assert "| gbn-x | 10.00 (1 seed) | 10 (1 seed) | 1/1 | 0 | 0.1 (1 seed) |" \
         " 13.0 | 1.30 |" in table
  assert "precise" not in table


def test_old_csv_without_time_columns_is_read_and_not_appended_to(tmp_path):
  old = tmp_path / "results.csv"
  old_columns = results.CSV_COLUMNS[:12]
  with open(old, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(old_columns)
    for step, acc in ((0, 0.1), (10, 0.8)):
      w.writerow(["d", "m", "bn", "", "sgd", 0.1, 8, 0, step,
                  "nan" if step == 0 else 0.5, acc, step / 10])
  rows = results.read_rows(str(old))
  assert math.isnan(rows[1]["step_seconds"])
  text = results.write_summary(rows, str(tmp_path / "summary.md"))
  assert "| bn | 20.00 (1 seed) | 10 (1 seed) | 1/1 | 0 | 1.0 (1 seed) | — |" \
         in text
  with pytest.raises(ValueError, match="new --out"):
    results.append_rows(str(old), [])
