"""Does GBN train faster than BN? An experiment runner on local data.

Trains a network whose normalization layers are chosen by ``--norm`` and
records test accuracy against step and training time for every
normalization, seed and learning rate. Every normalization gets the same
data order, augmentation, initialisation seeds, step budget and learning-rate
grid.

  python examples/train.py --quick --out runs/quick          # < 2 min on 2 CPUs
  python examples/train.py --dataset digits --model cnn \\
      --norm bn gbn-superquantile none --alpha 0.1 0.5 0.9 --seeds 3 \\
      --steps 1000 --lr-sweep --out runs/digits_cnn
  python examples/train.py --dataset cifar10 --data-dir PATH --model resnet20 \\
      --norm bn gbn-superquantile --epochs 10 --eval-every 390 --out runs/c10

Data: ``mnist1d`` (generated offline), ``digits`` (scikit-learn's 8x8) and
``cifar10`` from ``--data-dir``: the python batches, an image folder
(``train/<class>/*``, ``test/<class>/*``) or a tar archive of one, decoded once
and cached in ``--cache-dir``. CIFAR-10 is standardised per channel and, unless
``--no-augment``, augmented (random crop after 4-pixel padding, flip).

Models: ``mlp``; ``cnn`` (3 conv blocks, or a plain VGG-like CNN on 32x32
images); ``resnet20`` (He et al. 2016, option-A shortcuts).

Norms: ``bn`` (flax.linen.BatchNorm), ``gbn-<deviation>`` for any deviation in
``gbn_jax.DEVIATIONS`` (with its natural statistic; ``gbn-superquantile`` once
per ``--alpha``), ``gbn-<deviation>-approx`` (the same with
``approximate=True``), ``l1bn`` (mean and mean-abs deviation with the
Gaussian-consistent factor sqrt(pi/2), Hoffer et al.), ``none`` (no
normalization, ReLU) and ``selu`` (no normalization, SELU activations,
LeCun-normal init; Klambauer et al.).

Speed: the runs (seeds and, with ``--lr-sweep``, learning rates) of one
normalization share one compiled program, ``lax.scan`` over the steps between
two evaluations. ``wall_seconds`` is the run's training time since step 0 and
``step_seconds`` the time per step since the previous evaluation, both with
compilation and evaluation excluded.

Outputs in ``--out``: ``results.csv`` (one row per evaluation and run, appended
as each normalization finishes), ``summary.md`` and ``curves.png``. The code
lives in the package ``examples/harness``.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)  # the harness package sits beside this file

# Re-exported: the names other scripts and the tests use as ``train.<name>``.
from harness.data import (  # noqa: E402,F401
  DATASETS,
  load_cifar10,
  load_dataset,
  load_digits_data,
  load_mnist1d,
)
from harness.image_folder import default_cache_dir  # noqa: E402
from harness.models import (  # noqa: E402,F401
  MODELS,
  NORM_BASELINES,
  NormSpec,
  build_model,
  check_norm,
  expand_norms,
  make_norm,
  make_norm_layer,
  plain_cnn,
  resnet20,
)
from harness.plots import plot_curves  # noqa: E402
from harness.results import (  # noqa: E402,F401
  CSV_COLUMNS,
  append_rows,
  choose_target,
  diverged,
  lr_sweep_table,
  mean_std,
  read_rows,
  runs_of,
  steps_to,
  summary_table,
  time_to,
  write_summary,
)
from harness.training import (  # noqa: E402,F401
  DEFAULT_LR,
  DEFAULT_LR_GRID,
  LR_SCHEDULES,
  RunConfig,
  batch_indices,
  eval_bounds,
  experiment_phases,
  make_optimizer,
  recompute_batch_stats_fn,
  run_experiment,
  uses_scan,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Adds "(default: ...)" only where the help does not already say it."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "default" in text or action.default in (None, False):
      return text
    return super()._get_help_string(action)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
  p.add_argument("--dataset", default="mnist1d", choices=DATASETS,
                 help="mnist1d: generated offline; digits: scikit-learn's 8x8"
                 " digits; cifar10: from --data-dir")
  p.add_argument("--data-dir", default=None,
                 help="CIFAR-10: a .tar/.tar.xz archive or a directory of the"
                 " image-folder layout (train/<class>/*, test/<class>/*), or"
                 " the directory of the python batches (data_batch_*,"
                 " test_batch)")
  p.add_argument("--cache-dir", default=None,
                 help="where decoded image folders are cached, keyed by the"
                 f" source's sha256 (default: {default_cache_dir()})")
  p.add_argument("--no-augment", action="store_true",
                 help="cifar10 without its default augmentation (random crop"
                 " after 4-pixel padding, horizontal flip)")
  p.add_argument("--model", default="mlp", choices=MODELS,
                 help="mlp: 2 dense->norm->act blocks; cnn: 3 conv->norm->act"
                 " blocks (1-D convs for mnist1d), on 32x32 images a plain"
                 " VGG-like CNN (2 convs x 3 stages, 16/32/64 channels);"
                 " resnet20: ResNet-20 (option-A shortcuts)")
  p.add_argument("--width", type=int, default=None,
                 help="channels (cnn: default 32, 16 on 32x32 images;"
                 " resnet20: 16) or hidden units (mlp: 128)")
  p.add_argument("--norm", nargs="+", default=["bn", "gbn-superquantile"],
                 help="normalizations: bn, gbn-<deviation> (e.g."
                 " gbn-superquantile, gbn-mean_abs, gbn-median_abs,"
                 " gbn-half_range), gbn-<deviation>-approx (approximate=True,"
                 " e.g. gbn-superquantile-approx), l1bn, none, selu")
  p.add_argument("--alpha", type=float, nargs="+", default=[0.5],
                 help="levels of gbn-superquantile[-approx] (one run each: an α"
                 " sweep)")
  p.add_argument("--seeds", type=int, default=3,
                 help="number of seeds N (init, data order, augmentation)")
  p.add_argument("--first-seed", type=int, default=0,
                 help="seeds are K..K+N-1 (to split seeds over invocations"
                 " with --append)", metavar="K")
  p.add_argument("--steps", type=int, default=1000, help="training steps")
  p.add_argument("--epochs", type=float, default=None,
                 help="budget in epochs instead of --steps: epochs x"
                 " (training examples // batch size) steps")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=50,
                 help="evaluate on the test split every this many steps")
  p.add_argument("--eval-batch-size", type=int, default=1000,
                 help="test examples per forward pass when evaluating")
  p.add_argument("--precise-stats", type=int, default=0, metavar="N",
                 help="also evaluate with the batch statistics recomputed over"
                 " N training batches (gbn_jax.linen.recompute_batch_stats);"
                 " both accuracies are recorded")
  p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                 help="sgd: optax sgd with momentum 0.9; adam: optax adam")
  p.add_argument("--lr", type=float, default=None,
                 help="learning rate of the main comparison (default: 0.1 for"
                 " sgd, 0.003 for adam); with --lr-sweep it joins the grid")
  p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                 help="constant, or step: lr x 0.1 from 50%% and x 0.01 from"
                 " 75%% of the steps")
  p.add_argument("--weight-decay", type=float, default=0.0,
                 help="L2 coefficient added to the gradient (as SGD's)")
  p.add_argument("--lr-sweep", action="store_true",
                 help="also train every norm at every lr of --lr-grid and"
                 " report the largest lr that does not diverge")
  p.add_argument("--sweep-seeds", type=int, default=None,
                 help="seeds trained at the lrs of the sweep other than --lr"
                 " (the first N; default: all)")
  p.add_argument("--lr-grid", type=float, nargs="+", default=None,
                 help="the log grid of --lr-sweep (default: half-decade steps,"
                 " 0.03..3 for sgd, 0.0003..0.1 for adam)")
  p.add_argument("--target", type=float, default=None,
                 help="test accuracy for 'steps to target' (default: 98%% of"
                 " bn's mean final accuracy, or of the best norm's)")
  p.add_argument("--out", default="runs/latest",
                 help="output directory: results.csv (rows appended as each"
                 " norm finishes), summary.md, curves.png")
  p.add_argument("--quick", action="store_true",
                 help="smoke run (< 2 min on 2 CPUs): mnist1d, mlp, bn and"
                 " gbn-superquantile, 2 seeds, 400 steps")
  p.add_argument("--append", action="store_true",
                 help="append to an existing results.csv instead of replacing"
                 " it (e.g. to add norms to an experiment)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
  p.add_argument("--summarize-only", action="store_true",
                 help="rebuild summary.md and curves.png from --out's csv")
  args = p.parse_args(argv)
  if args.quick:
    args.dataset, args.model = "mnist1d", "mlp"
    args.norm, args.seeds, args.steps = ["bn", "gbn-superquantile"], 2, 400
    args.eval_every = 50
  if args.lr is None:
    args.lr = DEFAULT_LR[args.optimizer]
  args.augment = args.dataset == "cifar10" and not args.no_augment
  return args


def run_config(args, n_train: int) -> RunConfig:
  """The training settings of ``args`` (``--epochs`` resolved to steps)."""
  steps = args.steps
  if args.epochs is not None:
    steps = max(1, round(args.epochs * (n_train // args.batch_size)))
  return RunConfig(
      dataset=args.dataset, model=args.model, width=args.width,
      optimizer=args.optimizer, weight_decay=args.weight_decay,
      lr_schedule=args.lr_schedule, steps=steps, batch_size=args.batch_size,
      eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
      augment=args.augment, precise_stats=args.precise_stats,
      progress=not args.no_progress, scan=uses_scan(args.model),
  )


def main(argv=None) -> str:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, "results.csv")
  if not args.summarize_only:
    if args.precise_stats:
      recompute_batch_stats_fn()  # a clear error before any work
    specs = expand_norms(args.norm, args.alpha)
    lrs = [args.lr]
    if args.lr_sweep:
      grid = args.lr_grid or DEFAULT_LR_GRID[args.optimizer]
      lrs = sorted(set(grid) | {args.lr})
    data = load_dataset(args.dataset, args.data_dir, args.cache_dir,
                        not args.no_progress)
    if os.path.exists(csv_path) and not args.append:
      os.remove(csv_path)  # a fresh experiment; rows are appended per norm
    phases = experiment_phases(args.lr, lrs, args.seeds, args.sweep_seeds,
                               args.first_seed)
    run_experiment(run_config(args, len(data[0])), specs, phases, data,
                   csv_path)
  rows = read_rows(csv_path)
  text = write_summary(rows, os.path.join(args.out, "summary.md"), args.lr,
                       args.target)
  plot_curves(rows, os.path.join(args.out, "curves.png"), args.lr)
  return text


if __name__ == "__main__":
  print(main())
