"""gbn_jax.evaluation: precise statistics and moving a BatchNorm model over.

The expected statistics are computed by hand in NumPy (float64) from the
catalogue's definitions: q_α = x_(ceil(α n)), q̄_α = q_α + Σ[x - q_α]_+ /
((1 - α) n), D = q̄_α - μ for the superquantile; the mean and the population
variance for mean/std and nn.BatchNorm (under pmap with a mask, Flax's
BatchNorm averages the devices' masked means; GBN pools the values).
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gbn_jax import evaluation
from gbn_jax.linen import GeneralizedBatchNorm
from gbn_jax.nnx import GeneralizedBatchNorm as NnxGeneralizedBatchNorm

EPS = 1e-5
N_DEVICES = 8


# --------------------------------------------------------------------------
# Hand computation.
# --------------------------------------------------------------------------


def _channels(x, mask):
  """The valid values of each channel (last axis) as float64 vectors."""
  x = np.asarray(x, np.float64)
  mask = np.broadcast_to(np.ones((), bool) if mask is None else mask, x.shape)
  flat_x = x.reshape(-1, x.shape[-1])
  flat_m = mask.reshape(-1, x.shape[-1])
  return [flat_x[flat_m[:, c], c] for c in range(x.shape[-1])]


def _superquantile_stats(x, mask, alpha=0.5):
  centers, dev_sqs = [], []
  for v in _channels(x, mask):
    k = min(max(math.ceil(np.float32(alpha) * np.float32(len(v))), 1), len(v))
    q = np.sort(v)[k - 1]
    cvar = q + np.maximum(v - q, 0).sum() / ((1 - alpha) * len(v))
    centers.append(q)
    dev_sqs.append((cvar - v.mean()) ** 2)
  return np.array(centers), np.array(dev_sqs)


def _mean_var_stats(x, mask):
  chans = _channels(x, mask)
  return (np.array([v.mean() for v in chans]),
          np.array([v.var() for v in chans]))


def _normalized(x, center, dev_sq, scale, bias):
  x = np.asarray(x, np.float64)
  return (x - center) / np.sqrt(dev_sq + EPS) * scale + bias


def _device_pooled_mean_var(x, mask):
  """nn.BatchNorm's masked rule under pmap: per-device means, averaged."""
  per_device = [_channels(x[d], mask[d]) for d in range(x.shape[0])]
  mu = np.mean([[v.mean() for v in chans] for chans in per_device], axis=0)
  mu2 = np.mean([[(v**2).mean() for v in chans] for chans in per_device],
                axis=0)
  return mu, mu2 - mu**2


def _expected(batches, params, pmapped=False):
  """Average (S, D^2) per layer of the mixed model over ``batches``.

  With ``pmapped`` every batch has a leading device axis: the GBN layers
  pool the devices' values, nn.BatchNorm averages per-device masked means.
  """
  per_layer = {"sq": [], "mean_std": [], "bn": []}
  for x, mask in batches:
    x, mask = np.asarray(x), np.asarray(mask)
    pooled = ((x.reshape((-1, *x.shape[2:])),
               mask.reshape((-1, *mask.shape[2:]))) if pmapped else (x, mask))
    sq = _superquantile_stats(*pooled)
    h = _normalized(x, *sq, params["sq"]["scale"], params["sq"]["bias"])
    per_layer["sq"].append(sq)
    per_layer["mean_std"].append(_mean_var_stats(*pooled))
    per_layer["bn"].append(_device_pooled_mean_var(h, mask) if pmapped
                           else _mean_var_stats(h, mask))
  return {
      name: tuple(np.mean([s[i] for s in stats], axis=0) for i in range(2))
      for name, stats in per_layer.items()
  }


def _batches(shape, n, seed=0):
  """(x, mask) pairs; x skewed and shifting from batch to batch."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(n):
    x = rng.exponential(size=shape) * (1 + t) + rng.standard_normal(shape) - t
    mask = rng.random((*shape[:-1], 1)) < 0.8
    out.append((jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  return out


def _unpack(batch):
  return (batch[0],), {"mask": batch[1]}


# --------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------


class MixedLinen(nn.Module):
  """Superquantile GBN -> nn.BatchNorm, beside a mean/std GBN (also online)."""

  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, mask=None, train=False):
    ura = not train
    h = GeneralizedBatchNorm(use_running_average=ura, axis_name=self.axis_name,
                             name="sq")(x, mask=mask)
    g = GeneralizedBatchNorm(use_running_average=ura, statistic="mean",
                             deviation="std", axis_name=self.axis_name,
                             name="mean_std")(x, mask=mask)
    o = GeneralizedBatchNorm(use_running_average=ura, statistic="mean",
                             deviation="std", mode="online",
                             axis_name=self.axis_name, name="online")(
                                 x, mask=mask)
    b = nn.BatchNorm(use_running_average=ura, axis_name=self.axis_name,
                     name="bn")(h, mask=mask)
    return h + g + o + b


def _linen_variables(model, x):
  """Initial variables with random affine parameters and running stats."""
  variables = model.init(jax.random.key(0), x)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  return jax.tree_util.tree_map(
      lambda v: v + 0.5 * jax.random.uniform(next(keys), v.shape), variables)


def _check_linen(new, old, expected):
  for name in ("sq", "mean_std", "bn"):
    np.testing.assert_allclose(new["batch_stats"][name]["mean"],
                               expected[name][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"][name]["var"],
                               expected[name][1], rtol=1e-5, atol=1e-5)
  # An online layer gets the batch-mode values; its trackers are untouched.
  for i, stat in enumerate(("mean", "var")):
    np.testing.assert_allclose(new["batch_stats"]["online"][stat],
                               expected["mean_std"][i], rtol=1e-5, atol=1e-5)
  for key in old["batch_stats"]["online"]:
    if key not in ("mean", "var"):
      np.testing.assert_array_equal(new["batch_stats"]["online"][key],
                                    old["batch_stats"]["online"][key])
  jax.tree_util.tree_map(np.testing.assert_array_equal, new["params"],
                         old["params"])


def test_linen_recompute_matches_hand_computation():
  batches = _batches((4, 5, 3), n=3)
  model = MixedLinen()
  variables = _linen_variables(model, batches[0][0])
  new = evaluation.recompute_batch_stats_linen(
      model, variables, batches, unpack_batch=_unpack, train=True)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  _check_linen(new, variables, _expected(batches, params))


def test_linen_recompute_under_pmap_uses_global_statistics():
  # Each batch: 8 devices x 2 examples; statistics of the 16-example batch
  # (nn.BatchNorm's masked rule: the devices' masked means, averaged).
  batches = _batches((N_DEVICES, 2, 5, 3), n=2, seed=1)
  model = MixedLinen(axis_name="batch")
  variables = _linen_variables(model, batches[0][0][0])
  new = evaluation.recompute_batch_stats_linen(
      model, variables, batches, axis_name="batch", unpack_batch=_unpack,
      progress=False, train=True)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  _check_linen(new, variables, _expected(batches, params, pmapped=True))


def test_linen_errors():
  batches = _batches((4, 5, 3), n=1)
  model = MixedLinen()
  variables = _linen_variables(model, batches[0][0])
  with pytest.raises(ValueError, match="batches is empty"):
    evaluation.recompute_batch_stats_linen(model, variables, [], train=True)
  with pytest.raises(ValueError, match="train=True"):  # forgot training mode
    evaluation.recompute_batch_stats_linen(model, variables, batches,
                                           unpack_batch=_unpack)
  dense = nn.Dense(2)
  with pytest.raises(ValueError, match="no GeneralizedBatchNorm"):
    evaluation.recompute_batch_stats_linen(
        dense, dense.init(jax.random.key(0), batches[0][0]),
        [b[0] for b in batches])
  pooled = MixedLinen(axis_name="batch")
  with pytest.raises(ValueError, match="axis_name='batch'"):
    evaluation.recompute_batch_stats_linen(pooled, variables, batches,
                                           unpack_batch=_unpack, train=True)


# --------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------


class MixedNnx(nnx.Module):
  """As MixedLinen, for NNX."""

  def __init__(self, channels, axis_name=None):
    rngs = nnx.Rngs(0)
    self.sq = NnxGeneralizedBatchNorm(channels, axis_name=axis_name, rngs=rngs)
    self.mean_std = NnxGeneralizedBatchNorm(
        channels, statistic="mean", deviation="std", axis_name=axis_name,
        rngs=rngs)
    self.online = NnxGeneralizedBatchNorm(
        channels, statistic="mean", deviation="std", mode="online",
        axis_name=axis_name, rngs=rngs)
    self.bn = nnx.BatchNorm(channels, axis_name=axis_name, rngs=rngs)

  def __call__(self, x, mask=None):
    h = self.sq(x, mask=mask)
    return (h + self.mean_std(x, mask=mask) + self.online(x, mask=mask)
            + self.bn(h, mask=mask))


def _nnx_model(channels, axis_name=None):
  model = MixedNnx(channels, axis_name)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  for _, var in nnx.iter_graph(model):
    if isinstance(var, (nnx.Param, nnx.BatchStat)):
      var[...] = var[...] + 0.5 * jax.random.uniform(next(keys), var.shape)
  model.eval()
  return model


def _check_nnx(model, before, expected):
  for name in ("sq", "mean_std", "bn"):
    layer = getattr(model, name)
    np.testing.assert_allclose(layer.mean[...], expected[name][0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.var[...], expected[name][1],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(model.online.mean[...], expected["mean_std"][0],
                             rtol=1e-5, atol=1e-5)
  for key in model.online.online_names:
    np.testing.assert_array_equal(getattr(model.online, key)[...],
                                  before["online"][key])
  for name in ("sq", "mean_std", "online", "bn"):  # settings restored
    layer = getattr(model, name)
    assert layer.use_running_average is True and layer.momentum == 0.99
  assert model.online.mode == "online"
  for name in ("sq", "bn"):
    np.testing.assert_array_equal(getattr(model, name).scale[...],
                                  before[name]["scale"])


def _nnx_before(model):
  return {
      "online": {k: np.asarray(getattr(model.online, k)[...])
                 for k in model.online.online_names},
      "sq": {"scale": np.asarray(model.sq.scale[...])},
      "bn": {"scale": np.asarray(model.bn.scale[...])},
  }


def _nnx_params(model):
  return {"sq": {"scale": np.asarray(model.sq.scale[...]),
                 "bias": np.asarray(model.sq.bias[...])}}


def test_nnx_recompute_matches_hand_computation():
  batches = _batches((4, 5, 3), n=3)
  model = _nnx_model(3)
  before = _nnx_before(model)
  evaluation.recompute_batch_stats_nnx(model, batches, unpack_batch=_unpack)
  _check_nnx(model, before, _expected(batches, _nnx_params(model)))


def test_nnx_recompute_under_pmap_uses_global_statistics():
  batches = _batches((N_DEVICES, 2, 5, 3), n=2, seed=1)
  model = _nnx_model(3, axis_name="batch")
  before = _nnx_before(model)
  evaluation.recompute_batch_stats_nnx(model, batches, axis_name="batch",
                                       unpack_batch=_unpack, progress=False)
  _check_nnx(model, before,
             _expected(batches, _nnx_params(model), pmapped=True))


def test_nnx_errors():
  model = _nnx_model(3)
  with pytest.raises(ValueError, match="batches is empty"):
    evaluation.recompute_batch_stats_nnx(model, iter(()))
  with pytest.raises(ValueError, match=r"no gbn_jax\.nnx\.Generalized"):
    evaluation.recompute_batch_stats_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)),
                                         [jnp.ones((2, 3))])
  with pytest.raises(ValueError, match="axis_name='batch'"):
    evaluation.recompute_batch_stats_nnx(_nnx_model(3, axis_name="batch"),
                                         [jnp.ones((2, 3))])

  class EvalOnly(nnx.Module):  # passes use_running_average itself
    def __init__(self):
      self.bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.bn(x, use_running_average=True)

  with pytest.raises(ValueError, match="did not run in training mode"):
    evaluation.recompute_batch_stats_nnx(EvalOnly(), [jnp.ones((2, 3))])


# --------------------------------------------------------------------------
# from_batch_norm
# --------------------------------------------------------------------------


class Block(nn.Module):
  make_norm: object

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3,), use_bias=False)(x)
    return nn.relu(self.make_norm(use_running_average=not train)(x))


class Net(nn.Module):
  """Two blocks (a norm at depth 2) and a norm at depth 1."""

  make_norm: object

  @nn.compact
  def __call__(self, x, train=False):
    x = Block(self.make_norm)(x, train)
    x = Block(self.make_norm)(x, train)
    x = self.make_norm(use_running_average=not train)(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _mean_std_gbn(**kw):
  return GeneralizedBatchNorm(statistic="mean", deviation="std", **kw)


def _online_gbn(**kw):
  return GeneralizedBatchNorm(mode="online", **kw)


def _trained_bn_checkpoint(x):
  """A BatchNorm Net's variables after 3 training steps, as bytes."""
  bn_net = Net(nn.BatchNorm)
  variables = bn_net.init(jax.random.key(0), x)
  for t in range(3):
    _, updates = bn_net.apply(variables, x * (t + 1) + t, train=True,
                              mutable=["batch_stats"])
    variables = {**variables, **updates}
  return bn_net, variables, flax.serialization.to_bytes(variables)


def test_from_batch_norm_round_trip_mean_std_is_bitwise():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 7, 2)),
                  jnp.float32)
  bn_net, bn_variables, checkpoint = _trained_bn_checkpoint(x)
  gbn_net = Net(_mean_std_gbn)
  target = gbn_net.init(jax.random.key(5), x)
  with pytest.raises(ValueError):  # the names differ: Flax cannot load it
    flax.serialization.from_bytes(target, checkpoint)
  converted = evaluation.from_batch_norm(
      flax.serialization.msgpack_restore(checkpoint))
  assert set(converted["batch_stats"]["Block_1"]) == {"GeneralizedBatchNorm_0"}
  assert "GeneralizedBatchNorm_0" in converted["params"]
  loaded = flax.serialization.from_bytes(
      target, flax.serialization.to_bytes(converted))
  np.testing.assert_array_equal(gbn_net.apply(loaded, x),
                                bn_net.apply(bn_variables, x))


def test_from_batch_norm_online_target_loads_and_applies():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 7, 2)),
                  jnp.float32)
  _, bn_variables, checkpoint = _trained_bn_checkpoint(x)
  online_net = Net(_online_gbn)
  target = online_net.init(jax.random.key(5), x)
  renamed_only = evaluation.from_batch_norm(
      flax.serialization.msgpack_restore(checkpoint))
  with pytest.raises(ValueError):  # the online trackers are missing
    flax.serialization.from_bytes(target,
                                  flax.serialization.to_bytes(renamed_only))
  converted = evaluation.from_batch_norm(
      flax.serialization.msgpack_restore(checkpoint), target)
  loaded = flax.serialization.from_bytes(
      target, flax.serialization.to_bytes(converted))
  stats = loaded["batch_stats"]["GeneralizedBatchNorm_0"]
  np.testing.assert_array_equal(
      stats["mean"], bn_variables["batch_stats"]["BatchNorm_0"]["mean"])
  np.testing.assert_array_equal(
      stats["online_quantiles"],
      target["batch_stats"]["GeneralizedBatchNorm_0"]["online_quantiles"])
  y = online_net.apply(loaded, x)
  y_train, _ = online_net.apply(loaded, x, train=True, mutable=["batch_stats"])
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(y_train))


def test_from_batch_norm_leaves_named_layers_and_collisions_alone():
  tree = {
      "params": {
          "bn1": {"scale": 1.0},
          "BatchNorm_0": {"scale": 2.0},
          "GeneralizedBatchNorm_0": {"scale": 3.0},  # collision: both stay
          "BatchNorm_1": {"scale": 4.0},
          "BatchNorm_1x": {"scale": 5.0},
      }
  }
  got = evaluation.from_batch_norm(flax.core.freeze(tree))
  assert isinstance(got, flax.core.FrozenDict)
  assert got.unfreeze() == {
      "params": {
          "bn1": {"scale": 1.0},
          "BatchNorm_0": {"scale": 2.0},
          "GeneralizedBatchNorm_0": {"scale": 3.0},
          "GeneralizedBatchNorm_1": {"scale": 4.0},
          "BatchNorm_1x": {"scale": 5.0},
      }
  }
  with pytest.raises(ValueError, match="shape"):
    evaluation.from_batch_norm(
        {"params": {"BatchNorm_0": {"scale": np.ones(2)}}},
        {"params": {"GeneralizedBatchNorm_0": {"scale": np.ones(3)}}})
