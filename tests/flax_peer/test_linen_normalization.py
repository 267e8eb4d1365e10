# Adapted from Flax's tests: google/flax, tests/linen/linen_test.py
# (NormalizationTest: test_batch_norm, test_batch_norm_complex,
# test_batch_norm_multi_init), Copyright 2024 The Flax Authors, under the
# Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest classes; BatchNorm is the GBN
# layer of swap.py. Inputs, keys and assertions are Flax's. Version: see
# README.md.
"""Flax's linen BatchNorm tests (linen_test.py) with the GBN layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import random

import gbn_jax
from tests.flax_peer import swap

pytestmark = pytest.mark.slow


def _masked_input(dtype, test_mask):
  key1, key2, key3 = random.split(random.key(0), 3)
  x = random.normal(key1, (4, 3, 2), dtype=dtype)
  mask = None
  if test_mask:
    mask = random.randint(key2, (4, 3, 1), minval=0, maxval=2,
                          dtype=jnp.int32).astype(jnp.bool_)
    x = jnp.where(mask, x, jnp.ones_like(x) * jnp.nan)
  return x, mask, key3


def _check_batch_norm(config, dtype, test_mask):
  batch_norm = swap.linen_batchnorm(config)
  x, m, key = _masked_input(dtype, test_mask)
  extra = {} if dtype is None else {"dtype": dtype}
  model = batch_norm(momentum=0.9, use_running_average=False, **extra)
  y, initial_params = model.init_with_output(key, x, mask=m)

  mean = y.mean((0, 1), where=m)
  var = y.var((0, 1), where=m)
  np.testing.assert_allclose(mean, np.array([0.0, 0.0]), atol=1e-4)
  np.testing.assert_allclose(var, np.array([1.0, 1.0]), rtol=1e-4)
  if dtype is not None:
    assert mean.dtype == dtype

  _, vars_out = model.apply(initial_params, x, mutable=["batch_stats"],
                            mask=m)
  ema = vars_out["batch_stats"]
  np.testing.assert_allclose(
      ema["mean"], 0.1 * x.mean((0, 1), keepdims=False, where=m), atol=1e-4)
  np.testing.assert_allclose(
      ema["var"], 0.9 + 0.1 * x.var((0, 1), keepdims=False, where=m),
      rtol=1e-4)


# Asserts BatchNorm's numbers (output mean 0 and variance 1, running
# averages of the batch mean and variance): the mean/std configuration only.
@swap.MEAN_STD
@pytest.mark.parametrize("test_mask", [True, False])
def test_batch_norm(config, test_mask):
  _check_batch_norm(config, None, test_mask)


@swap.MEAN_STD
@pytest.mark.parametrize("test_mask", [True, False])
def test_batch_norm_complex(config, test_mask):
  _check_batch_norm(config, jnp.complex64, test_mask)


# Normalizing a normalized batch again changes nothing, for any location and
# scale equivariant pair (S, D): both configurations.
@swap.BOTH
def test_batch_norm_multi_init(config):
  batch_norm = swap.linen_batchnorm(config)

  class Foo(nn.Module):

    @nn.compact
    def __call__(self, x):
      norm = batch_norm(name="norm", use_running_average=False,
                        axis_name="batch")
      x = norm(x)
      return x, norm(x)

  x = random.normal(random.key(1), (2, 4))
  (y1, y2), _ = Foo().init_with_output(random.key(0), x)
  np.testing.assert_allclose(y1, y2, rtol=0.005)


def test_swap_is_the_gbn_layer():
  """The swap changes the class and its defaults, nothing else."""
  layer = swap.linen_batchnorm("mean_std")(use_running_average=False)
  assert isinstance(layer, gbn_jax.GeneralizedBatchNorm)
  assert (layer.statistic, layer.deviation) == ("mean", "std")
  default = swap.linen_batchnorm("default")()
  assert default.deviation == gbn_jax.GeneralizedBatchNorm().deviation
  assert jax.tree.structure(
      layer.init(random.key(0), jnp.ones((2, 3)))) == jax.tree.structure(
          nn.BatchNorm(use_running_average=False).init(
              random.key(0), jnp.ones((2, 3))))
