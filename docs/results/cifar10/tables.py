"""The CIFAR-10 tables of docs/RESULTS.md, read off a study's results.csv.

First, per norm over its seeds: final test error (mean ± std), the same with
precise statistics, the mean final training loss, the steps to the target
(98% of BN's mean final accuracy, as in summary.md) per seed, and at how many
evaluations the norm was ahead of BN's run with the same seed (summed over
seeds; step 0 excluded: every run starts from the same init). Then per norm
and seed: test accuracy at given steps, the first evaluated step at which
given accuracies were reached, and the evaluations ahead of BN. Last, the
mean over seeds of the accuracies at the steps.

With --sweep (for the lr sweep's results.csv): per (dataset, model, optimizer)
group, one row per norm, one column per learning rate, each cell the final
test error (%) and, in brackets, the final training loss (mean over seeds); a
dagger marks a run the harness counts as diverged (non-finite loss, or final
training loss above ln 10).

  python docs/results/cifar10/tables.py \\
      docs/results/cifar10_cnn/results.csv --steps 195 585 1950 \\
      --accuracies 0.3 0.4 0.5 0.6
  python docs/results/cifar10/tables.py --sweep \\
      docs/results/cifar10_cnn_lr_sweep/results.csv
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples"))

from harness import results  # noqa: E402


def _acc_at(run_rows, step):
  for r in run_rows:
    if r["step"] == step:
      return 100 * r["test_acc"]
  return None


def _fmt(value, spec="{:.1f}"):
  return "—" if value is None else spec.format(value)


def _ahead(run_rows, ref_rows):
  """(evaluations where run_rows' test accuracy beat ref_rows', evaluations
  compared), over the steps both runs evaluated, step 0 excluded."""
  ref_acc = {r["step"]: r["test_acc"] for r in ref_rows}
  pairs = [(r["test_acc"], ref_acc[r["step"]]) for r in run_rows
           if r["step"] > 0 and r["step"] in ref_acc]
  return sum(a > b for a, b in pairs), len(pairs)


def sweep_table(all_runs, group) -> str:
  """Markdown grid of one (dataset, model, optimizer) group: norm x lr, final
  test error % (final training loss), mean over seeds."""
  by_norm = results.runs_by_norm_and_lr(all_runs, group)
  lrs = sorted({lr for per_lr in by_norm.values() for lr in per_lr})
  lines = ["| norm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
           "|" + "---|" * (1 + len(lrs))]
  for label, per_lr in by_norm.items():
    cells = []
    for lr in lrs:
      by_seed = per_lr.get(lr)
      if by_seed is None:
        cells.append("—")
        continue
      error = float(np.mean(results.final_errors(by_seed)))
      dagger = " †" if any(results.diverged(rs) for rs in by_seed.values())\
          else ""
      cells.append(f"{error:.1f} ({results.mean_final_loss(by_seed):.2f})"
                   f"{dagger}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("csv")
  p.add_argument("--steps", type=int, nargs="+", default=[195, 585, 1950])
  p.add_argument("--accuracies", type=float, nargs="+",
                 default=[0.3, 0.4, 0.5, 0.6])
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--reference", default="bn",
                 help="the norm label the 'ahead' columns compare with")
  p.add_argument("--sweep", action="store_true",
                 help="print the lr sweep's grid (norm x lr) instead")
  args = p.parse_args(argv)

  all_runs = results.runs_of(results.read_rows(args.csv))
  if args.sweep:
    groups = results.groups_of(all_runs)
    print("\n\n".join(
        (f"{' / '.join(g)}\n\n" if len(groups) > 1 else "")
        + sweep_table(all_runs, g) for g in groups))
    return
  runs = {k: v for k, v in all_runs.items() if k[4] == args.lr}
  reference = {k[:3]: v for k, v in runs.items() if k[3] == args.reference}

  targets = {}
  print("| norm | seeds | final test error (%) | with precise statistics (%)"
        " | final training loss | steps to target (per seed) |"
        f" evaluations ahead of {args.reference} (same seed) |")
  print("|" + "---|" * 7)
  for key, by_seed in runs.items():
    group = key[:3]
    if group not in targets:
      targets[group] = results.choose_target(all_runs, group, args.lr)
    seeds = sorted(by_seed)
    error = results.mean_std([100 * (1 - by_seed[s][-1]["test_acc"])
                              for s in seeds], "{:.1f}")
    if all(results.diverged(by_seed[s]) for s in seeds):
      error += " (diverged)"
    precise = results.mean_std(
        [100 * (1 - by_seed[s][-1]["test_acc_precise"]) for s in seeds],
        "{:.1f}")
    steps = ", ".join(_fmt(results.steps_to(by_seed[s], targets[group]),
                           "{:,}") for s in seeds)
    refs = reference.get(group, {})
    if key[3] == args.reference:
      ahead = "—"
    else:
      counts = [_ahead(by_seed[s], refs[s]) for s in seeds if s in refs]
      ahead = (f"{sum(c[0] for c in counts)} of {sum(c[1] for c in counts)}"
               if counts else "—")
    print(f"| {key[3]} | {', '.join(map(str, seeds))} | {error} | {precise}"
          f" | {results.mean_final_loss(by_seed):.3f} | {steps} | {ahead} |")
  print()
  print("Targets: " + ", ".join(f"{'/'.join(g)} {100 * t:.0f}%"
                                for g, t in targets.items()))
  print()

  head = (["norm", "seed"] + [f"acc. at {s}" for s in args.steps]
          + [f"steps to {100 * a:g}%" for a in args.accuracies]
          + [f"ahead of {args.reference}"])
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  means = []
  for key, by_seed in runs.items():
    per_step = {s: [] for s in args.steps}
    for seed, rs in sorted(by_seed.items()):
      cells = [key[3], str(seed)]
      for s in args.steps:
        a = _acc_at(rs, s)
        cells.append(_fmt(a))
        if a is not None:
          per_step[s].append(a)
      for a in args.accuracies:
        cells.append(_fmt(results.steps_to(rs, a), "{:,}"))
      ref = reference.get(key[:3], {}).get(seed)
      if ref is None or key[3] == args.reference:
        cells.append("—")
      else:
        cells.append("{} of {}".format(*_ahead(rs, ref)))
      print("| " + " | ".join(cells) + " |")
    means.append((key[3], len(by_seed),
                  [sum(v) / len(v) if v else None for v in per_step.values()]))
  print()
  mean_head = " | ".join(f"mean acc. at {s}" for s in args.steps)
  print(f"| norm | seeds | {mean_head} |")
  print("|" + "---|" * (2 + len(args.steps)))
  for label, n, values in means:
    print(f"| {label} | {n} | " + " | ".join(_fmt(v) for v in values) + " |")


if __name__ == "__main__":
  main()
