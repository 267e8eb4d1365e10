"""How many ResNet-20 activations the ReLU zeroes, block by block, at init.

A check of one guess at why α = 0.9 trailed BN in ResNet-20 but led it in
the plain CNN: the second norm of each basic block feeds the residual
addition, not a ReLU. Centred at its α-quantile, that branch is negative
for a fraction α of its values before the addition; if the ReLU after it
zeroed more of the sum block after block, the blocks' outputs would grow
sparser with depth than a plain-CNN layer's (a fraction α of zeros, by
construction, at init). For each norm this prints the fraction of exact
zeros in each block's output (after the ReLU), in training mode on the
first 128 training images, with the initial parameters (seed 0; γ = 1,
β = 0).

  python docs/results/cifar10/resnet_sparsity.py --data-dir DATA
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from harness.data import load_cifar10  # noqa: E402
from harness.models import BasicBlock, NormSpec, ResNet20  # noqa: E402

NORMS = (
    NormSpec("bn"),
    NormSpec("gbn-superquantile", 0.5),
    NormSpec("gbn-superquantile", 0.9),
)


def block_zero_fractions(spec: NormSpec, x: jax.Array) -> list[float]:
  model = ResNet20(spec)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  _, state = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda mdl, name: (
          isinstance(mdl, BasicBlock) and name == "__call__"),
  )
  outputs = jax.tree_util.tree_leaves(state["intermediates"])
  return [float(jnp.mean(y == 0)) for y in outputs]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", required=True)
  args = parser.parse_args()
  x = jnp.asarray(load_cifar10(args.data_dir, progress=False)[0][:128])
  rows = {spec.label: block_zero_fractions(spec, x) for spec in NORMS}
  blocks = len(next(iter(rows.values())))
  print("| norm | " + " | ".join(f"block {i + 1}" for i in range(blocks))
        + " |")
  print("|---|" + "---|" * blocks)
  for label, fractions in rows.items():
    print(f"| {label} | " + " | ".join(f"{f:.0%}" for f in fractions) + " |")


if __name__ == "__main__":
  main()
