"""Quick start with Flax NNX: a small 1-D CNN with GeneralizedBatchNorm.

MNIST-1D, generated offline by ``mnist1d.data.make_dataset`` (nothing is
downloaded); ``nnx.Optimizer`` with optax Adam; ``model.train()`` /
``model.eval()`` switch the normalization between batch statistics and the
running averages.

  python examples/nnx_quickstart.py                  # 1-2 min on 2 CPU cores
  python examples/nnx_quickstart.py --mode online --batch-size 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mode", default="batch", help="'batch' or 'online'")
  ap.add_argument("--deviation", default="superquantile")
  ap.add_argument("--alpha", type=float, default=0.5)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--lr", type=float, default=3e-3)
  args = ap.parse_args(argv)

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from mnist1d.data import get_dataset_args, make_dataset

  from gbn_jax.nnx import GeneralizedBatchNorm

  d = make_dataset(get_dataset_args())
  x_train = jnp.asarray(d["x"], jnp.float32)[..., None]  # (4000, 40, 1)
  y_train = jnp.asarray(d["y"], jnp.int32)
  x_test = jnp.asarray(d["x_test"], jnp.float32)[..., None]
  y_test = jnp.asarray(d["y_test"], jnp.int32)

  def norm(features, rngs):
    return GeneralizedBatchNorm(
        features, deviation=args.deviation, alpha=args.alpha, mode=args.mode,
        rngs=rngs,
    )

  class CNN(nnx.Module):
    """3 x [conv (no bias) -> GBN -> ReLU] (strides 1, 2, 2), dense head."""

    def __init__(self, rngs: nnx.Rngs, width: int = 32):
      chans = [1, width, width, width]
      self.convs = nnx.List([
          nnx.Conv(chans[i], chans[i + 1], (3,), strides=s, use_bias=False,
                   rngs=rngs)
          for i, s in enumerate((1, 2, 2))
      ])
      self.norms = nnx.List([norm(width, rngs) for _ in range(3)])
      self.head = nnx.Linear(10 * width, 10, rngs=rngs)

    def __call__(self, x):
      for conv, bn in zip(self.convs, self.norms, strict=True):
        x = nnx.relu(bn(conv(x)))
      return self.head(x.reshape(x.shape[0], -1))

  model = CNN(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)  # updates the running averages (nnx.BatchStat)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  rng = np.random.default_rng(0)
  t0 = time.time()
  for step in range(1, args.steps + 1):
    idx = rng.integers(0, x_train.shape[0], args.batch_size)
    model.train()
    loss = train_step(model, optimizer, x_train[idx], y_train[idx])
    if step % (args.steps // 4) == 0 or step == args.steps:
      model.eval()  # normalize with the running averages
      acc = accuracy(model, x_test, y_test)
      print(f"step {step:5d}  train loss {float(loss):.3f}  test acc"
            f" {100 * float(acc):.1f}%  ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
  main()
