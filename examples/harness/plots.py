"""Curves: test accuracy and training loss against step and against time."""

from __future__ import annotations

import numpy as np

from harness import results

# (field, x axis): the four rows of the figure.
PANELS = (("test_acc", "step"), ("train_loss", "step"),
          ("test_acc", "wall_seconds"), ("train_loss", "wall_seconds"))


def plot_curves(rows, path, lr=None) -> None:
  """One column per (dataset, model, optimizer), one line per norm at ``lr``
  (default: the middle lr of the group): mean over seeds with the min-max
  band. Rows: test accuracy and training loss against step, then against
  training time (the seeds' mean time at each evaluation)."""
  import matplotlib  # noqa: PLC0415  (heavy; only when plotting)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  runs = results.runs_of(rows)
  groups = results.groups_of(runs)
  fig, axes = plt.subplots(len(PANELS), len(groups),
                           figsize=(6 * len(groups), 3.6 * len(PANELS)),
                           squeeze=False)
  for col, group in enumerate(groups):
    lrs = results.lrs_of(runs, group)
    ref = lr if lr in lrs else lrs[len(lrs) // 2]
    keys = results.keys_at(runs, group, ref)
    for i, key in enumerate(keys):
      by_seed = list(runs[key].values())
      n = min(len(rs) for rs in by_seed)  # seeds cut short plot their prefix
      style = dict(color=plt.cm.tab20(i % 20),
                   ls="--" if "superquantile" in key[3] else "-")
      for row, (field, x_field) in enumerate(PANELS):
        x = np.array([[r[x_field] for r in rs[:n]] for rs in by_seed]).mean(0)
        v = np.array([[r[field] for r in rs[:n]] for rs in by_seed])
        sl = slice(1, None) if field == "train_loss" else slice(None)
        if not np.all(np.isfinite(x[sl])):
          continue  # no times recorded (an older csv)
        ax = axes[row, col]
        (line,) = ax.plot(x[sl], v[:, sl].mean(0), label=key[3], **style)
        ax.fill_between(x[sl], v[:, sl].min(0), v[:, sl].max(0),
                        color=line.get_color(), alpha=0.15)
    axes[0, col].set_title(f"{group[0]} / {group[1]} / {group[2]} lr={ref:g}")
    for row, (field, x_field) in enumerate(PANELS):
      ax = axes[row, col]
      ax.set_xlabel("step" if x_field == "step"
                    else "training time (s, compile and eval excluded)")
      if field == "test_acc":
        ax.set_ylabel("test accuracy")
      else:
        ax.set_ylabel("training loss (axis clipped at 10)")
        ax.set_yscale("log")
        ax.set_ylim(top=10)  # a diverging run would hide the others
    axes[0, col].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
