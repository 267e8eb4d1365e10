"""Data-parallel training of a small CNN with GeneralizedBatchNorm.

Every local device gets a slice of the batch (``jax.shard_map`` over a 1-D
mesh); the GBN layers pool their statistics with ``axis_name="batch"``, so
the superquantile/quantile normalization sees the whole global batch exactly
(counts are all-reduced per channel; activations never leave their device),
and the loss is the devices' mean (``lax.pmean``), whose gradient is the
global one.

On a CPU-only machine, simulate 8 devices (the flag must be set before jax is
imported):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python examples/multi_device.py

Data: synthetic 16x16 images of two classes (oriented stripes + noise), so
the example needs no download.
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gbn_jax

AXIS = "batch"


class CNN(nn.Module):
  """conv -> GBN -> relu, twice, then a linear head."""

  approximate: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(
        gbn_jax.GeneralizedBatchNorm,
        use_running_average=not train,
        axis_name=AXIS if train else None,
        deviation="superquantile",
        alpha=0.5,
        approximate=self.approximate,
    )
    x = nn.Conv(16, (3, 3))(x)
    x = nn.relu(norm()(x))
    x = nn.Conv(32, (3, 3), strides=(2, 2))(x)
    x = nn.relu(norm()(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(2)(x)


def make_data(rng: np.random.Generator, n: int):
  """Two classes: horizontal vs vertical stripes under noise."""
  y = rng.integers(0, 2, n)
  i = np.arange(16)
  stripes = np.sin(i * 1.3)[None, :] * np.ones((16, 1))
  img = np.where(y[:, None, None] == 0, stripes, stripes.T)
  x = img + rng.standard_normal((n, 16, 16)) * 1.5
  return x[..., None].astype(np.float32), y.astype(np.int32)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--batch", type=int, default=128, help="global batch size")
  ap.add_argument("--approximate", action="store_true")
  args = ap.parse_args()

  devices = jax.devices()
  n_dev = len(devices)
  assert args.batch % n_dev == 0, "the global batch must split over devices"
  mesh = jax.make_mesh((n_dev,), (AXIS,))
  print(f"{n_dev} devices ({devices[0].platform}), global batch {args.batch}")

  model = CNN(approximate=args.approximate)
  rng = np.random.default_rng(0)
  x0, _ = make_data(rng, args.batch)
  variables = model.init(jax.random.PRNGKey(0), x0[: args.batch // n_dev],
                         train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def local_step(params, batch_stats, opt_state, x, y):
    """Runs on each device with its slice of the batch."""

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      # The global mean loss: its gradient w.r.t. the replicated params is
      # already summed over devices by shard_map's transpose (averaging the
      # local gradients again would scale them by the device count).
      return lax.pmean(loss, AXIS), updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, new_stats, opt_state, loss

  step = jax.jit(
      jax.shard_map(
          local_step,
          mesh=mesh,
          in_specs=(P(), P(), P(), P(AXIS), P(AXIS)),
          # Replicated outputs: GBN's statistics are psum'ed (identical on
          # every device), and so are the averaged gradients.
          out_specs=(P(), P(), P(), P()),
      )
  )
  shard = NamedSharding(mesh, P(AXIS))

  @jax.jit
  def accuracy(params, batch_stats, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  x_test, y_test = make_data(np.random.default_rng(1), 512)
  for i in range(args.steps):
    x, y = make_data(rng, args.batch)
    x, y = jax.device_put(x, shard), jax.device_put(y, shard)
    params, batch_stats, opt_state, loss = step(params, batch_stats,
                                                opt_state, x, y)
    if i % 10 == 0 or i == args.steps - 1:
      acc = accuracy(params, batch_stats, x_test, y_test)
      print(f"step {i:4d}  loss {float(loss):.4f}"
            f"  test accuracy {float(acc):.3f}")


if __name__ == "__main__":
  main()
