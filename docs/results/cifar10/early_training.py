"""The early-training tables of docs/RESULTS.md, read off a study's results.csv.

For each norm and seed: test accuracy at given steps, the first evaluated step
at which given accuracies were reached, and at how many evaluations the norm
was ahead of BN's run with the same seed (step 0 excluded: every run starts
from the same init). Then the mean over seeds of the accuracies at the steps.

  python docs/results/cifar10/early_training.py \\
      docs/results/cifar10_cnn/results.csv --steps 195 585 1950 \\
      --accuracies 0.3 0.4 0.5 0.6
"""

import argparse
import os
import sys

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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("csv")
  p.add_argument("--steps", type=int, nargs="+", default=[195, 585, 1950])
  p.add_argument("--accuracies", type=float, nargs="+",
                 default=[0.3, 0.4, 0.5, 0.6])
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--reference", default="bn",
                 help="the norm label the 'ahead' column compares with")
  args = p.parse_args(argv)

  runs = {k: v for k, v in results.runs_of(results.read_rows(args.csv)).items()
          if k[4] == args.lr}
  reference = {k[:3]: v for k, v in runs.items() if k[3] == args.reference}
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
        ref_acc = {r["step"]: r["test_acc"] for r in ref}
        pairs = [(r["test_acc"], ref_acc[r["step"]]) for r in rs
                 if r["step"] > 0 and r["step"] in ref_acc]
        ahead = sum(a > b for a, b in pairs)
        cells.append(f"{ahead} of {len(pairs)}")
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
