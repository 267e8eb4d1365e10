"""Figures and tables of docs/RESULTS.md's MNIST-1D/digits study, from its
results.csv files.

  python docs/results/make_figures.py     # from the repository root

Writes docs/curves_<dataset>_<model>.png, docs/alpha_sweep.png,
docs/lr_sweep.png, docs/results/overview.md, docs/results/tables.md and each
folder's summary.md. The committed summaries, tables.md and curves_*.png were
written before the harness reported time: today's harness appends columns
(time to target, ms / step, step time / bn's) and draws the curves against
time as well; every other number is unchanged.
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import matplotlib  # noqa: E402
import train  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAIN_LR = 0.1
# This study's output folders; the CIFAR-10 study beside them has its own
# tools (docs/results/cifar10/).
STUDY = ("digits_cnn", "digits_mlp", "mnist1d_cnn", "mnist1d_cnn_300steps",
         "mnist1d_mlp")


def _grid(n):
  """A 2-column grid of axes for n panels (spare panels hidden)."""
  rows = -(-n // 2)
  fig, axes = plt.subplots(rows, 2, figsize=(11, 4 * rows), squeeze=False)
  axes = axes.ravel()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def final_errors(by_seed):
  return [100 * (1 - rs[-1]["test_acc"]) for rs in by_seed.values()]


def alpha_sweep(groups, path):
  """Final test error against α (superquantile), BN and L1-BN as lines."""
  fig, axes = _grid(len(groups))
  for ax, (name, runs) in zip(axes, groups, strict=False):
    pts = []
    for key, by_seed in runs.items():
      if key[4] != MAIN_LR:
        continue
      e = final_errors(by_seed)
      if key[3].startswith("gbn-superquantile"):
        a = float(key[3].split("=")[1].rstrip(")"))
        pts.append((a, np.mean(e), np.std(e, ddof=1) if len(e) > 1 else 0))
      elif key[3] in ("bn", "l1bn", "none"):
        ls = {"bn": "-", "l1bn": "--", "none": ":"}[key[3]]
        ax.axhline(np.mean(e), color="k", ls=ls, lw=1, label=key[3])
    pts.sort()
    if pts:
      a, m, s = map(np.array, zip(*pts, strict=True))
      ax.errorbar(a, m, yerr=s, marker="o", capsize=3,
                  label="gbn-superquantile")
    ax.set_title(name)
    ax.set_xlabel("α")
    ax.set_ylabel("final test error (%)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def lr_sweep(groups, path):
  """Final test error against lr (log grid), one line per norm."""
  fig, axes = _grid(len(groups))
  for ax, (name, runs) in zip(axes, groups, strict=False):
    labels = sorted({k[3] for k in runs})
    for i, label in enumerate(labels):
      pts = sorted(
          (k[4], np.mean([100 * (1 - rs[-1]["test_acc"])
                          if not train.diverged(rs) else 90.0
                          for rs in runs[k].values()]))
          for k in runs if k[3] == label)
      if len(pts) > 1:
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, marker=".", label=label, color=plt.cm.tab20(i % 20),
                ls="--" if "superquantile" in label else "-")
    ax.set_xscale("log")
    ax.set_title(name)
    ax.set_xlabel("learning rate (sgd, momentum 0.9)")
    ax.set_ylabel("final test error (%), diverged = 90")
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


ORDER = ("bn", "l1bn", "gbn-mean_abs", "gbn-median_abs", "gbn-half_range",
         "gbn-superquantile(a=0.1)", "gbn-superquantile(a=0.3)",
         "gbn-superquantile(a=0.5)", "gbn-superquantile(a=0.7)",
         "gbn-superquantile(a=0.9)", "none", "selu")


def overview(groups) -> str:
  """Two markdown tables, norms x groups at lr 0.1: final test error
  (mean ± std over seeds) and steps to the group's target (mean, reached)."""
  names = [n for n, _ in groups]
  head = "| norm | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
  err_lines, hit_lines, targets = [head], [head], []
  for name, runs in groups:
    g = next(k[:3] for k in runs)
    target = train.choose_target(runs, g, MAIN_LR)
    targets.append(f"{name}: {100 * target:.0f}%")
  for label in ORDER:
    errs, hits = [], []
    for _, runs in groups:
      key = next((k for k in runs if k[3] == label and k[4] == MAIN_LR), None)
      if key is None:
        errs.append("—")
        hits.append("—")
        continue
      target = train.choose_target(runs, key[:3], MAIN_LR)
      by_seed = runs[key]
      errs.append(train.mean_std(final_errors(by_seed)))
      h = [train.steps_to(rs, target) for rs in by_seed.values()]
      got = [x for x in h if x is not None]
      hits.append(f"{np.mean(got):.0f} ({len(got)}/{len(h)})" if got
                  else f"— (0/{len(h)})")
    err_lines.append(f"| {label} | " + " | ".join(errs) + " |")
    hit_lines.append(f"| {label} | " + " | ".join(hits) + " |")
  return ("Final test error (%), lr 0.1, mean ± std over 3 seeds:\n\n"
          + "\n".join(err_lines)
          + "\n\nSteps to the target accuracy (mean over the seeds that reach"
          " it; reached/seeds). Targets (98% of BN's final accuracy): "
          + ", ".join(targets) + ".\n\n" + "\n".join(hit_lines) + "\n")


def main():
  groups = []
  tables = []
  for name in STUDY:
    d = os.path.join(ROOT, "docs", "results", name)
    csv_path = os.path.join(d, "results.csv")
    rows = train.read_rows(csv_path)
    groups.append((name, train.runs_of(rows)))
    tables.append(train.write_summary(rows, os.path.join(d, "summary.md"),
                                      MAIN_LR))
    train.plot_curves(rows, os.path.join(ROOT, "docs", f"curves_{name}.png"),
                      MAIN_LR)
  alpha_sweep(groups, os.path.join(ROOT, "docs", "alpha_sweep.png"))
  swept = [(n, r) for n, r in groups if len({k[4] for k in r}) > 1]
  lr_sweep(swept, os.path.join(ROOT, "docs", "lr_sweep.png"))
  with open(os.path.join(ROOT, "docs", "results", "tables.md"), "w") as f:
    f.write("\n\n".join(t.replace("# Summary\n\n", "") for t in tables))
  with open(os.path.join(ROOT, "docs", "results", "overview.md"), "w") as f:
    f.write(overview(groups))
  print("wrote", [g[0] for g in groups])


if __name__ == "__main__":
  main()
