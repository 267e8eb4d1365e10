"""``make demo``: a quick BN vs GBN (superquantile) run on MNIST-1D, then its
summary.

Runs ``examples/train.py --quick`` (mnist1d, MLP, ``bn`` and
``gbn-superquantile``, 2 seeds, 400 steps; under two minutes on 2 CPU cores,
nothing downloaded) and prints the summary table. Outputs go to ``runs/demo``
(results.csv, summary.md, curves.png).

  python examples/demo.py [--out DIR]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # train.py
sys.path.insert(1, os.path.dirname(HERE))  # gbn_jax, when not installed

import train  # noqa: E402


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--out" not in argv:
    argv += ["--out", os.path.join("runs", "demo")]
  text = train.main(["--quick", *argv])
  print(text)
  out = argv[argv.index("--out") + 1]
  print(f"Wrote {out}/results.csv, {out}/summary.md and {out}/curves.png")


if __name__ == "__main__":
  main()
