"""Results: the csv of evaluations, and the markdown summary built from it.

One csv row per evaluation and run (``CSV_COLUMNS``). A run is the rows of one
(dataset, model, optimizer, norm label, lr, seed), sorted by step. Csv files
written before the time columns existed are still read (those columns empty).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

import numpy as np

CSV_COLUMNS = (
    "dataset", "model", "norm", "alpha", "optimizer", "lr", "batch_size",
    "seed", "step", "train_loss", "test_acc", "wall_seconds", "step_seconds",
    "test_acc_precise",
)
NAN = float("nan")


# -- csv -----------------------------------------------------------------------


def append_rows(path: str, rows: list[dict]) -> None:
  """Appends ``rows`` to the csv at ``path`` (header first if it is new).

  Raises:
    ValueError: the existing file has other columns (an older harness).
  """
  new = not os.path.exists(path)
  if not new:
    with open(path, newline="") as f:
      header = next(csv.reader(f), None)
    if header is not None and tuple(header) != CSV_COLUMNS:
      raise ValueError(
          f"{path!r} has the columns {header}, this harness writes"
          f" {list(CSV_COLUMNS)}; append to a new --out instead")
    new = header is None
  with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    if new:
      w.writeheader()
    w.writerows(rows)


def _float(value) -> float:
  return NAN if value in ("", None) else float(value)


def read_rows(path: str) -> list[dict]:
  """The csv's rows with numbers parsed; missing or empty cells are NaN."""
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    r["alpha"] = float(r["alpha"]) if r["alpha"] else None
    for k in ("lr", "train_loss", "test_acc", "wall_seconds", "step_seconds",
              "test_acc_precise"):
      r[k] = _float(r.get(k))
    for k in ("seed", "step", "batch_size"):
      r[k] = int(r[k])
  return rows


# -- runs and their measures --------------------------------------------------


def label_of(row) -> str:
  """The norm's label: its name, with α where it has one."""
  alpha = row["alpha"]
  if alpha in ("", None):
    return row["norm"]
  return f"{row['norm']}(a={float(alpha):g})"


def runs_of(rows):
  """{(dataset, model, optimizer, label, lr): {seed: [rows sorted by step]}}."""
  runs = defaultdict(lambda: defaultdict(list))
  for r in rows:
    key = (r["dataset"], r["model"], r["optimizer"], label_of(r), r["lr"])
    runs[key][r["seed"]].append(r)
  for by_seed in runs.values():
    for rs in by_seed.values():
      rs.sort(key=lambda r: r["step"])
  return runs


def groups_of(runs) -> list[tuple]:
  """The sorted (dataset, model, optimizer) groups of ``runs_of``'s keys."""
  return sorted({key[:3] for key in runs})


def lrs_of(runs, group) -> list[float]:
  """The sorted learning rates that ``group`` has runs at."""
  return sorted({key[4] for key in runs if key[:3] == group})


def keys_at(runs, group, lr) -> list[tuple]:
  """The sorted run keys of ``group`` at learning rate ``lr``, one per norm."""
  return sorted(key for key in runs if key[:3] == group and key[4] == lr)


def diverged(run_rows) -> bool:
  """A run diverged if its loss became non-finite, or its final training loss
  is above ln(10) = the loss of a uniform guess over 10 classes."""
  losses = [r["train_loss"] for r in run_rows[1:]]
  finite = all(math.isfinite(v) for v in losses)
  return not finite or losses[-1] > math.log(10)


def steps_to(run_rows, target: float):
  """First evaluated step with test accuracy >= target (None if never)."""
  for r in run_rows:
    if r["test_acc"] >= target:
      return r["step"]
  return None


def time_to(run_rows, target: float):
  """Training seconds (``wall_seconds``) at the first evaluation with test
  accuracy >= target (None if never or not recorded)."""
  for r in run_rows:
    if r["test_acc"] >= target:
      wall = r.get("wall_seconds", NAN)
      return wall if math.isfinite(wall) else None
  return None


def seconds_per_step(run_rows):
  """Median over the run's evaluation intervals of the time per step (the
  median ignores a slow first interval); None if not recorded."""
  v = [r.get("step_seconds", NAN) for r in run_rows[1:]]
  v = [x for x in v if math.isfinite(x)]
  return float(np.median(v)) if v else None


def mean_std(values, fmt="{:.2f}"):
  """Mean ± std (over seeds) of the values that are not None, formatted."""
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
  finals = {key[3]: np.mean([rs[-1]["test_acc"] for rs in runs[key].values()])
            for key in keys_at(runs, group, lr)}
  ref = finals.get("bn", max(finals.values(), default=0.0))
  return math.floor(98 * ref) / 100


# -- markdown ---------------------------------------------------------------


def _has_precise(by_seed) -> bool:
  return any(math.isfinite(rs[-1].get("test_acc_precise", NAN))
             for rs in by_seed.values())


def summary_table(runs, group, lr, target, per_seed=False) -> str:
  """Markdown: per norm (at one lr) final test error, steps and training time
  to target, time per step and its ratio to bn's."""
  keys = keys_at(runs, group, lr)
  step_time = {}
  for key in keys:
    per_run = [seconds_per_step(rs) for rs in runs[key].values()]
    per_run = [t for t in per_run if t is not None]
    step_time[key[3]] = float(np.mean(per_run)) if per_run else None
  bn_time = step_time.get("bn")
  precise = any(_has_precise(runs[k]) for k in keys)
  pct = f"{100 * target:.0f}%"
  lines = [
      f"| norm | final test error (%) | steps to {pct} test acc | reached |"
      f" diverged | time to {pct} (s) | ms / step | step time / bn's |"
      + (" final test error, precise stats (%) |" if precise else ""),
      "|---|---|---|---|---|---|---|---|" + ("---|" if precise else ""),
  ]
  seed_lines = ["| norm | seed | final test error (%) | steps to target |"
                " time to target (s) |", "|---|---|---|---|---|"]
  for key in keys:
    by_seed = runs[key]
    errs = [100 * (1 - rs[-1]["test_acc"]) for rs in by_seed.values()]
    hits = [steps_to(rs, target) for rs in by_seed.values()]
    times = [time_to(rs, target) for rs in by_seed.values()]
    div = sum(diverged(rs) for rs in by_seed.values())
    t = step_time[key[3]]
    ratio = "—" if t is None or not bn_time else f"{t / bn_time:.2f}"
    line = (
        f"| {key[3]} | {mean_std(errs)} | {mean_std(hits, '{:.0f}')} |"
        f" {sum(h is not None for h in hits)}/{len(hits)} | {div} |"
        f" {mean_std(times, '{:.1f}')} |"
        f" {'—' if t is None else f'{1e3 * t:.1f}'} |"
        f" {ratio} |"
    )
    if precise:
      finals = [rs[-1].get("test_acc_precise", NAN) for rs in by_seed.values()]
      errors = [100 * (1 - a) for a in finals if math.isfinite(a)]
      line += " " + mean_std(errors)
      line += " |"
    lines.append(line)
    for s, rs in sorted(by_seed.items()):
      h, w = steps_to(rs, target), time_to(rs, target)
      seed_lines.append(
          f"| {key[3]} | {s} | {100 * (1 - rs[-1]['test_acc']):.2f} |"
          f" {'—' if h is None else h} | {'—' if w is None else f'{w:.1f}'} |"
      )
  out = "\n".join(lines)
  return out + ("\n\nPer seed:\n\n" + "\n".join(seed_lines) if per_seed else "")


def final_errors(by_seed) -> list[float]:
  """Final test error (%) of each seed's run."""
  return [100 * (1 - rs[-1]["test_acc"]) for rs in by_seed.values()]


def final_error(by_seed) -> str:
  return mean_std(final_errors(by_seed))


def mean_final_loss(by_seed) -> float:
  v = [rs[-1]["train_loss"] for rs in by_seed.values()]
  return np.mean(v) if all(math.isfinite(x) for x in v) else math.inf


def runs_by_norm_and_lr(runs, group) -> dict:
  """The runs of one (dataset, model, optimizer) group as
  ``{norm label: {lr: {seed: run rows}}}``, norms in first-seen order."""
  by_norm: dict = defaultdict(dict)
  for key, by_seed in runs.items():
    if key[:3] == group:
      by_norm[key[3]][key[4]] = by_seed
  return dict(by_norm)


def lr_sweep_table(runs, group) -> str:
  """Markdown: per norm, the largest lr of the grid where no seed diverged,
  the test error there, and the best lr (lowest mean final training loss)."""
  by_norm = runs_by_norm_and_lr(runs, group)
  lines = [
      "| norm | lrs tried | largest stable lr | test error there (%) |"
      " best lr (min train loss) | test error there (%) |",
      "|---|---|---|---|---|---|",
  ]
  for label in sorted(by_norm):
    lrs = by_norm[label]
    stable = [lr for lr, bs in lrs.items()
              if not any(diverged(rs) for rs in bs.values())]

    best = min(lrs, key=lambda lr, lrs=lrs: mean_final_loss(lrs[lr]))
    top = max(stable) if stable else None
    top_err = "—" if top is None else final_error(lrs[top])
    lines.append(
        f"| {label} | {len(lrs)} | {'—' if top is None else f'{top:g}'} |"
        f" {top_err} | {best:g} | {final_error(lrs[best])} |"
    )
  return "\n".join(lines)


def write_summary(rows, path, lr=None, target=None, per_seed=True) -> str:
  """Writes (and returns) the markdown summary of every (dataset, model,
  optimizer) group: the main table at ``lr`` and, with several lrs, the
  sweep."""
  runs = runs_of(rows)
  parts = []
  for group in groups_of(runs):
    lrs = lrs_of(runs, group)
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
        f" step; mean ± std over seeds. Target accuracy {100 * tgt:.0f}%."
        " Times are training time (compilation and evaluation excluded);"
        " ms / step is each run's median over its evaluation intervals,"
        " averaged over seeds.\n\n"
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
