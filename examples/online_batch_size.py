"""Batch size 1 and 4: online GBN vs batch GBN vs BN vs no normalization.

The MLP of the examples (flatten -> 2 x [Dense(128, no bias) -> norm -> ReLU]
-> Dense(10)) on MNIST-1D, generated offline with
``mnist1d.data.make_dataset(get_dataset_args())`` (4000 train / 1000 test
sequences of length 40; nothing is downloaded). Every normalization gets the
same steps, optimizer (Adam, fixed learning rate, not tuned per norm), data
order and initialisation seeds.

Norms (``--norms``):
  none         no normalization (Dense layers keep their bias)
  bn           flax.linen.BatchNorm (batch statistics)
  gbn          GBN, batch mode, superquantile deviation / quantile, α = 0.5
               (only at batch sizes > 1: a batch of one value has D = 0)
  gbn-online   the same GBN with mode="online"
  bn-online    GBN mode="online" with statistic="mean", deviation="std"
               (online batch norm)

Test accuracy is measured in eval mode (running averages; for the online
modes these are the online estimates after the last step). The training loss
column is the mean training loss (train mode) over the last 10% of steps.

  nice -n 10 python examples/online_batch_size.py --out runs/online
  python examples/online_batch_size.py --quick      # seconds, smoke test

Seeds of one (norm, batch size) are trained together as one vmapped program,
``lax.scan`` over the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

NORMS = ("none", "bn", "gbn", "gbn-online", "bn-online")


def load_mnist1d():
  from mnist1d.data import get_dataset_args, make_dataset

  d = make_dataset(get_dataset_args())  # generated from templates, offline
  return (
      d["x"].astype(np.float32), d["y"].astype(np.int32),
      d["x_test"].astype(np.float32), d["y_test"].astype(np.int32),
  )


def make_model(norm: str, width: int = 128, momentum: float = 0.99):
  import flax.linen as nn

  import gbn_jax

  def norm_layer(train):
    ura = not train
    if norm == "bn":
      return nn.BatchNorm(use_running_average=ura, momentum=momentum)
    if norm == "gbn":
      return gbn_jax.GeneralizedBatchNorm(use_running_average=ura,
                                          momentum=momentum)
    if norm == "gbn-online":
      return gbn_jax.GeneralizedBatchNorm(
          use_running_average=ura, momentum=momentum, mode="online"
      )
    if norm == "bn-online":
      return gbn_jax.GeneralizedBatchNorm(
          use_running_average=ura, momentum=momentum, mode="online",
          statistic="mean", deviation="std",
      )
    if norm == "none":
      return None
    raise ValueError(f"unknown norm {norm!r}; valid choices: {list(NORMS)}")

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = x.reshape(x.shape[0], -1)
      for _ in range(2):
        layer = norm_layer(train)
        x = nn.Dense(width, use_bias=layer is None)(x)
        if layer is not None:
          x = layer(x)
        x = nn.relu(x)
      return nn.Dense(10)(x)

  return MLP()


def run(norm, batch, steps, seeds, lr, data):
  import jax
  import jax.numpy as jnp
  import optax

  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
  model = make_model(norm)
  opt = optax.adam(lr)

  def init(key):
    v = model.init(key, x_tr[:2], train=False)
    params = v["params"]
    return params, v.get("batch_stats", {}), opt.init(params)

  def loss_fn(params, stats, x, y):
    logits, upd = model.apply(
        {"params": params, "batch_stats": stats}, x, train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, upd.get("batch_stats", {})

  def step(carry, idx):
    params, stats, opt_state = carry
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x_tr[idx], y_tr[idx]
    )
    upd, opt_state = opt.update(g, opt_state, params)
    return (optax.apply_updates(params, upd), stats, opt_state), loss

  def train_one(key, indices):
    carry, losses = jax.lax.scan(step, init(key), indices)
    params, stats, _ = carry
    logits = model.apply(
        {"params": params, "batch_stats": stats}, x_te, train=False
    )
    acc = jnp.mean(jnp.argmax(logits, -1) == y_te)
    tail = losses[-max(1, steps // 10):]
    return acc, jnp.mean(tail), jnp.all(jnp.isfinite(losses))

  keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in seeds])
  idx = np.stack([
      np.random.default_rng(1000 + s).integers(0, len(y_tr), (steps, batch))
      for s in seeds
  ]).astype(np.int32)
  fn = jax.jit(jax.vmap(
      lambda k, i: train_one(jax.random.wrap_key_data(k), i)
  ))
  t0 = time.time()
  acc, loss, finite = jax.device_get(fn(keys, jnp.asarray(idx)))
  return dict(
      norm=norm, batch=batch, steps=steps, lr=lr, seeds=list(seeds),
      test_acc=[float(a) for a in acc], train_loss=[float(v) for v in loss],
      finite=[bool(f) for f in finite], seconds=time.time() - t0,
  )


def table(results) -> str:
  seeds = sorted({len(r["seeds"]) for r in results})
  lines = [
      f"| batch | norm | test acc % (mean ± std, {'/'.join(map(str, seeds))}"
      " seeds) | per seed |"
      " train loss (last 10%) |",
      "|---|---|---|---|---|",
  ]
  for r in results:
    a = 100 * np.asarray(r["test_acc"])
    loss = np.asarray(r["train_loss"])
    per = ", ".join(f"{v:.1f}" for v in a)
    nan = "" if all(r["finite"]) else " (non-finite loss)"
    lines.append(
        f"| {r['batch']} | {r['norm']} | {a.mean():.1f} ± {a.std():.1f} |"
        f" {per} | {np.nanmean(loss):.3f}{nan} |"
    )
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
  ap.add_argument("--steps", type=int, default=16000)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--out", default=None,
                  help="folder for results.json, table.md")
  ap.add_argument("--quick", action="store_true", help="200 steps, 1 seed")
  args = ap.parse_args(argv)
  if args.quick:
    args.steps, args.seeds = 200, 1

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  data = load_mnist1d()
  results = []
  for batch in args.batch_sizes:
    for norm in args.norms:
      if norm == "gbn" and batch == 1:
        print(f"batch {batch} {norm}: skipped (D = 0 for one value)",
              flush=True)
        continue
      t0 = time.time()
      r = run(norm, batch, args.steps, range(args.seeds), args.lr, data)
      r["wall_with_compile"] = time.time() - t0
      results.append(r)
      a = 100 * np.asarray(r["test_acc"])
      print(
          f"batch {batch} {norm:11s} acc {a.mean():5.1f} ± {a.std():4.1f}"
          f" loss {np.mean(r['train_loss']):.3f}"
          f" ({r['wall_with_compile']:.0f}s)",
          flush=True,
      )
  md = table(results)
  print(md)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(dict(args=vars(args), results=results), f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  main()
