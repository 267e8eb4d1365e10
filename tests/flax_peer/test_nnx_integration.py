# Adapted from Flax's tests: google/flax, tests/nnx/integration_test.py
# (TestIntegration: test_shared_modules, test_shared_modules_pure),
# Copyright 2024 The Flax Authors, under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest methods; BatchNorm is the GBN
# layer of swap.py. Inputs and assertions are Flax's. Version: see README.md.
"""Flax's NNX training integration tests with the GBN layer.

Three SGD steps through ``nnx.jit``/``nnx.grad`` (and ``jax.jit`` on a
split model) with a shared Linear; they assert sharing, the same for every
configuration: both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


def _model_class(batch_norm):

  class Block(nnx.Module):

    def __init__(self, linear: nnx.Linear, *, rngs: nnx.Rngs):
      self.linear = linear
      self.bn = batch_norm(2, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.bn(self.linear(x)))

  class Model(nnx.Module):

    def __init__(self, *, rngs: nnx.Rngs):
      shared = nnx.Linear(2, 2, rngs=rngs)
      self.block1 = Block(shared, rngs=rngs)
      self.block2 = Block(shared, rngs=rngs)

    def __call__(self, x):
      return self.block2(self.block1(x))

  return Model


def _sgd(model, x, y):

  @nnx.grad
  def loss_fn(model):
    return jnp.mean((y - model(x)) ** 2)

  grads = loss_fn(model)
  nnx.update(model, jax.tree.map(lambda w, g: w - 0.1 * g,
                                 nnx.state(model, nnx.Param), grads))


@swap.BOTH
def test_shared_modules(config):
  model = _model_class(swap.nnx_batchnorm(config))(rngs=nnx.Rngs(0))
  train_step = nnx.jit(_sgd)

  x = np.random.uniform(size=(4, 2))
  y = np.random.uniform(size=(4, 2))
  model.set_attributes(use_running_average=False)
  for _ in range(3):
    train_step(model, x, y)

  assert model.block1.linear is model.block2.linear
  assert model.block1.linear.bias is not None
  assert model.block1.bn is not model.block2.bn


@swap.BOTH
def test_shared_modules_pure(config):
  model_class = _model_class(swap.nnx_batchnorm(config))

  @jax.jit
  def train_step(state, graphdef, x, y):
    model = nnx.merge(graphdef, state)
    model.set_attributes(use_running_average=False)
    _sgd(model, x, y)
    return nnx.split(model)

  graphdef, state = nnx.split(model_class(rngs=nnx.Rngs(0)))
  x = np.random.uniform(size=(4, 2))
  y = np.random.uniform(size=(4, 2))
  for _ in range(3):
    graphdef, state = train_step(state, graphdef, x, y)

  model = nnx.merge(graphdef, state)
  assert model.block1.linear.bias is not None
  assert model.block2.linear.bias is not None
  assert model.block1.linear.kernel is model.block2.linear.kernel
  assert model.block1.linear.bias is model.block2.linear.bias
  assert model.block1.bn is not model.block2.bn
