"""The example scripts run as documented (shortened) and learn something.

Each runs in its own process, as a user would start it: the scripts parse
their command line and put the checkout on ``sys.path`` themselves.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, devices=None):
  env = dict(os.environ)
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


@pytest.mark.slow
def test_nnx_quickstart_learns_and_evaluates_with_running_averages():
  out = _run(["examples/nnx_quickstart.py", "--steps", "100",
              "--batch-size", "32"])
  rows = re.findall(r"step +(\d+) +train loss ([\d.]+) +test acc ([\d.]+)%",
                    out)
  assert [int(s) for s, _, _ in rows] == [25, 50, 75, 100], out
  assert all(math.isfinite(float(loss)) for _, loss, _ in rows)
  # Ten balanced classes: chance is 10%; eval mode normalizes with the
  # running averages, so a layer that never updated them would stay there.
  assert float(rows[-1][2]) > 18.0, out


@pytest.mark.slow
def test_nnx_quickstart_online_mode_at_batch_size_one():
  out = _run(["examples/nnx_quickstart.py", "--mode", "online",
              "--batch-size", "1", "--steps", "20"])
  losses = re.findall(r"train loss ([\d.naif]+)", out)
  assert len(losses) == 4, out
  assert all(math.isfinite(float(v)) for v in losses), out


@pytest.mark.slow
def test_multi_device_example_trains_on_eight_devices():
  out = _run(["examples/multi_device.py", "--steps", "20", "--batch", "64"],
             devices=8)
  assert out.startswith("8 devices (cpu), global batch 64"), out
  acc = [float(a) for a in re.findall(r"test accuracy ([\d.]+)", out)]
  assert len(acc) == 3, out
  # Two classes (horizontal or vertical stripes): chance is 0.5.
  assert max(acc) > 0.8, out


@pytest.mark.slow
def test_online_batch_size_writes_finite_results(tmp_path):
  _run(["examples/online_batch_size.py", "--steps", "60", "--seeds", "2",
        "--batch-sizes", "4", "--norms", "bn", "gbn-online",
        "--out", str(tmp_path)])
  with open(tmp_path / "results.json") as f:
    runs = json.load(f)["results"]
  assert [(r["batch"], r["norm"]) for r in runs] == [(4, "bn"),
                                                     (4, "gbn-online")]
  for r in runs:
    assert len(r["test_acc"]) == 2 and all(r["finite"]), r
    assert all(0.0 <= a <= 1.0 for a in r["test_acc"]), r
  table = (tmp_path / "table.md").read_text()
  assert "(mean ± std, 2 seeds)" in table
  assert table.count("\n| 4 | ") == 2, table
