"""Flax's tooling and conventions around a drop-in layer.

Model summaries (``Module.tabulate``, ``nnx.tabulate``), ``nnx.view_info``,
hyperparameters handed over as NumPy/JAX scalars, channels a mask hides
completely, and parameters a configuration does not read.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gbn_jax
from gbn_jax.nnx import GeneralizedBatchNorm as NnxGBN


def _plain(table: str) -> str:
  return re.sub(r"\x1b\[[0-9;]*m", "", table)  # no terminal colours


class _LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(4)(x)
    return gbn_jax.GeneralizedBatchNorm(use_running_average=not train)(x)


class _NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.norm = NnxGBN(4, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


def test_linen_tabulate_lists_the_layer_and_its_batch_stats():
  x = jnp.ones((8, 3))
  table = _plain(_LinenModel().tabulate(
      jax.random.key(0), x, compute_flops=False, console_kwargs={"width": 400}))
  row = next(line for line in table.splitlines()
             if "GeneralizedBatchNorm_0" in line)
  assert "GeneralizedBatchNorm" in row.split("GeneralizedBatchNorm_0", 1)[1]
  assert "mean: float32[4]" in table and "var: float32[4]" in table
  # nn.tabulate too, and a normal apply afterwards.
  nn.tabulate(_LinenModel(), jax.random.key(0), compute_flops=False)(x)
  variables = _LinenModel().init(jax.random.key(0), x)
  assert variables["batch_stats"]["GeneralizedBatchNorm_0"]["var"].shape == (4,)


def test_nnx_tabulate_and_view_info():
  model = _NnxModel(nnx.Rngs(0))
  x = jnp.ones((8, 3))
  table = _plain(nnx.tabulate(model, x, console_kwargs={"width": 400}))
  row = next(line for line in table.splitlines() if "│ norm" in line)
  assert "GeneralizedBatchNorm" in row
  assert "mean: float32[4]" in table and "var: float32[4]" in table
  # Flax leaves nothing behind: NNX calls in the same process still work.
  assert _NnxModel(nnx.Rngs(1))(x).shape == (8, 4)
  info = str(nnx.view_info(model))
  assert "use_running_average" in info and "GeneralizedBatchNorm" in info
  evaluated = nnx.view(model, use_running_average=True)
  assert evaluated.norm.use_running_average is True


@pytest.mark.parametrize("momentum", [
    jnp.float32(0.9),
    pytest.param(np.float64(0.9), marks=pytest.mark.slow),
    pytest.param(jnp.asarray(0.9), marks=pytest.mark.slow)])
def test_hyperparameters_as_jax_and_numpy_scalars(momentum):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
  flags = dict(use_running_average=jnp.array(False), use_bias=np.bool_(True),
               use_scale=jnp.array(True))
  ref = gbn_jax.GeneralizedBatchNorm(momentum=0.9, use_running_average=False)
  layer = gbn_jax.GeneralizedBatchNorm(momentum=momentum,
                                       alpha=jnp.float32(0.5),
                                       epsilon=np.float32(1e-5), **flags)
  v = ref.init(jax.random.key(0), x)
  y_ref, s_ref = ref.apply(v, x, mutable=["batch_stats"])
  y, s = layer.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(s["batch_stats"]["var"],
                             s_ref["batch_stats"]["var"], rtol=1e-6)
  assert gbn_jax.GeneralizedBatchNorm(use_running_average=0).apply(
      v, x, mutable=["batch_stats"])[0].shape == x.shape
  bn = NnxGBN(3, momentum=momentum, use_running_average=0, rngs=nnx.Rngs(0))
  assert bn.momentum == pytest.approx(0.9) and bn.use_running_average is False
  bn(x)
  # What is wrong is still rejected, with the value named.
  for bad, words in ((dict(momentum=jnp.float32(1.5)), ["momentum", "[0, 1]"]),
                     (dict(use_running_average=jnp.array(2)),
                      ["use_running_average", "True or False"]),
                     (dict(use_bias="yes"), ["use_bias", "'yes'"])):
    with pytest.raises(ValueError) as exc:
      gbn_jax.GeneralizedBatchNorm(**bad)
    assert all(w in str(exc.value) for w in words), str(exc.value)
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda m: gbn_jax.GeneralizedBatchNorm(momentum=m))(0.9)


@pytest.mark.parametrize("deviation", [
    "superquantile", pytest.param("std", marks=pytest.mark.slow)])
def test_fully_masked_channel_keeps_running_averages(deviation):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(12, 3)) * 2 + 1, jnp.float32)
  mask = jnp.ones((12, 3), bool).at[:, 1].set(False)  # channel 1: no values
  stats = {"mean": jnp.asarray([0.5, -2.0, 0.1]),
           "var": jnp.asarray([1.5, 4.0, 0.7])}
  layer = gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                       deviation=deviation, statistic=None,
                                       use_bias=False, use_scale=False)
  params = layer.init(jax.random.key(0), x)
  y, new = layer.apply({**params, "batch_stats": stats}, x, mask=mask,
                       mutable=["batch_stats"])
  new = new["batch_stats"]
  # Channel 1: running averages unchanged, output normalized with them.
  assert float(new["mean"][1]) == -2.0 and float(new["var"][1]) == 4.0
  np.testing.assert_allclose(y[:, 1], (x[:, 1] + 2.0) / np.sqrt(4.0 + 1e-5),
                             rtol=1e-6)
  assert np.all(np.isfinite(y))
  # The other channels moved as usual.
  assert float(new["var"][0]) != 1.5 and float(new["mean"][2]) != 0.1
  # NNX: the same.
  bn = NnxGBN(3, deviation=deviation, use_bias=False, use_scale=False,
              rngs=nnx.Rngs(0))
  bn.mean[...], bn.var[...] = stats["mean"], stats["var"]
  y_nnx = bn(x, mask=mask)
  np.testing.assert_allclose(y_nnx, y, rtol=1e-6, atol=1e-6)
  assert float(bn.mean[1]) == -2.0 and float(bn.var[1]) == 4.0
  # Gradients stay finite.
  g = jax.grad(lambda x: layer.apply({**params, "batch_stats": stats}, x,
                                     mask=mask, mutable=["batch_stats"])[0]
               .sum())(x)
  assert np.all(np.isfinite(g))


def test_unused_parameters_warn():
  with pytest.warns(UserWarning, match=r"alpha=0\.9 is not used.*'std'"):
    gbn_jax.make_measures(deviation="std", alpha=0.9)
  with pytest.warns(UserWarning, match=r"p=3\.0 is not used"):
    gbn_jax.GeneralizedBatchNorm(deviation="superquantile", p=3.0)
  with pytest.warns(UserWarning, match=r"levels=\(0\.2, 0\.8\) is not used"):
    gbn_jax.batch_statistics(jnp.ones((4, 2)), axes=0, deviation="std",
                             levels=(0.2, 0.8))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    # Defaults and parameters that are read say nothing.
    gbn_jax.make_measures(deviation="std")
    gbn_jax.make_measures(deviation="superquantile", alpha=0.9)
    gbn_jax.make_measures(deviation="lp", p=3.0)
    gbn_jax.make_measures(deviation="abs_superquantile", alpha=0.8)
    NnxGBN(2, deviation="std", rngs=nnx.Rngs(0))


def test_complex_input_follows_batch_norm():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(16, 3)) + 1j * rng.normal(size=(16, 3)),
                  jnp.complex64)
  bn = nn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y_bn, s_bn = bn.apply(variables, x, mutable=["batch_stats"])
  gbn = gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                     statistic="mean", deviation="std")
  y, s = gbn.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == y_bn.dtype == jnp.complex64
  np.testing.assert_allclose(y, y_bn, atol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_allclose(s["batch_stats"][k], s_bn["batch_stats"][k],
                               atol=1e-6)
  # mean_abs and lp are defined on |x - μ| too (NumPy reference).
  v = np.asarray(x, np.complex128)
  dist = np.abs(v - v.mean(0))
  for dev, expected in (("mean_abs", dist.mean(0)),
                        ("lp", (dist**3).mean(0) ** (1 / 3))):
    c, d = gbn_jax.batch_statistics(x, axes=0, statistic="mean", deviation=dev,
                                    p=3.0)
    np.testing.assert_allclose(c, v.mean(0), rtol=1e-5)
    np.testing.assert_allclose(d, expected, rtol=1e-5)
  # Order statistics need an ordering: a clear error, naming why.
  with pytest.raises(TypeError, match="ordering"):
    gbn_jax.GeneralizedBatchNorm(use_running_average=False).init(
        jax.random.key(0), x)
  with pytest.raises(TypeError, match="ordering"):
    gbn_jax.batch_statistics(x, axes=0, deviation="median_abs")
