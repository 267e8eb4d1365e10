# Adapted from Flax's tests: google/flax, tests/nnx/bridge/wrappers_test.py
# (TestCompatibility: test_linen_to_nnx_submodule,
# test_nnx_to_linen_multiple_collections), Copyright 2024 The Flax Authors,
# under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest methods; ``.value`` reads of
# the fetched file are ``[...]`` (flax 0.12.8); the expected collections
# lose "nnx", which flax 0.12.8's to_linen no longer creates; the BatchNorms
# (linen inside ``ToNNX``, NNX inside ``to_linen``) are the GBN layers of
# swap.py. Inputs and assertions are Flax's. Version: see README.md.
"""Flax's bridge tests (Linen <-> NNX wrappers) with the GBN layers.

The first evaluates with the initial running averages (0 and 1), which every
configuration shares; the second asserts collections and shapes: both.
"""

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


@swap.BOTH
def test_linen_to_nnx_submodule(config):
  linen_batch_norm = swap.linen_batchnorm(config)

  class NNXOuter(nnx.Module):

    def __init__(self, dout: int, *, rngs: nnx.Rngs):
      self.nn_dense1 = bridge.ToNNX(nn.Dense(dout, use_bias=False), rngs=rngs)
      self.b = nnx.Param(jax.random.uniform(rngs.params(), (1, dout)))
      self.batchnorm = bridge.ToNNX(
          linen_batch_norm(use_running_average=True), rngs=rngs)
      self.rngs = rngs

    def __call__(self, x):
      return self.batchnorm(self.nn_dense1(x) + self.b)

  x = jax.random.normal(jax.random.key(0), (2, 4))
  model = NNXOuter(3, rngs=nnx.Rngs(0))
  gdef_before_lazy_init, _ = nnx.split(model)
  bridge.lazy_init(model, x)
  gdef_full, state = nnx.split(model)
  assert gdef_before_lazy_init != gdef_full
  assert "nn_dense1" in state
  assert "batchnorm" in state
  assert "kernel" in state["nn_dense1"]
  y = model(x)
  k, b = state["nn_dense1"]["kernel"][...], state["b"][...]
  np.testing.assert_allclose(y, x @ k + b, rtol=1e-5)
  assert gdef_full == nnx.graphdef(model)  # the static data is stable


@swap.BOTH
def test_nnx_to_linen_multiple_collections(config):
  batch_norm = swap.nnx_batchnorm(config)

  class NNXInner(nnx.Module):

    def __init__(self, din, dout, rngs):
      self.w = nnx.Param(
          nnx.initializers.lecun_normal()(rngs.params(), (din, dout)))
      self.bn = batch_norm(dout, use_running_average=False, rngs=rngs)
      self.lora = nnx.LoRA(din, 3, dout, rngs=rngs)

    def __call__(self, x):
      return self.bn(x @ self.w[...]) + self.lora(x)

  xkey, pkey, dkey = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(xkey, (2, 4))
  model = bridge.to_linen(NNXInner, 4, 3)
  var = model.init({"params": pkey, "dropout": dkey}, x)
  # The fetched file also lists "nnx" (the graphdef collection), which
  # flax 0.12.8's to_linen no longer creates, with Flax's own BatchNorm too.
  assert sorted(var.keys()) == sorted(["LoRAParam", "params", "batch_stats"])
  assert model.apply(var, x).shape == (2, 3)
