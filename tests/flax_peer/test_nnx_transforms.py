# Adapted from Flax's tests: google/flax, tests/nnx/transforms_test.py
# (TestJIT.test_cached_unflatten; TestScan: test_complex,
# test_complex_set_mode, test_complex_broadcast_dropout,
# test_complex_broadcast_dropout_set_mode, test_complex_decorator,
# test_complex_decorator_set_mode; TestVmap: test_state_axes_simple,
# test_split_rngs_decorator_simple, test_state_axes_super_simple,
# test_example, test_state_axes_from_state), Copyright 2024 The Flax Authors,
# under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest methods; the three variants of
# each scan test share one body, parametrized by how the mode is set
# (``set_attributes`` as Flax's, or ``nnx.set_mode``, which is ``nnx.view``
# in flax 0.12.8); BatchNorm is the GBN layer of swap.py. Inputs and
# assertions are Flax's. Version: see README.md.
"""Flax's NNX transform tests (jit, scan, vmap) with the GBN layer.

They assert object identity, cached tracing and shapes through the
transforms, the same for every configuration: both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


@swap.BOTH
def test_cached_unflatten(config):
  batch_norm = swap.nnx_batchnorm(config)
  n = 0

  class Foo(nnx.Module):

    def __init__(self, *, rngs: nnx.Rngs):
      self.a = nnx.Linear(2, 2, rngs=rngs)
      self.b = batch_norm(2, rngs=rngs)

  @nnx.jit
  def f(m: Foo):
    nonlocal n
    n += 1
    m.a, m.b = m.b, m.a

  m = Foo(rngs=nnx.Rngs(0))
  a, b = m.a, m.b
  before = [v[...] for v in (a.kernel, a.bias, b.scale, b.bias, b.mean, b.var)]

  f(m)
  assert n == 1
  assert m.a is b
  assert m.b is a
  after = [v[...] for v in (a.kernel, a.bias, b.scale, b.bias, b.mean, b.var)]
  for x, y in zip(before, after, strict=True):
    np.testing.assert_allclose(x, y)

  # Swapping back and forth: one more trace, then the cache.
  for expected_n, swapped in ((2, False), (2, True), (2, False)):
    f(m)
    assert n == expected_n
    assert (m.a is b, m.b is a) == (swapped, swapped)


STATE_AXES = nnx.StateAxes({(nnx.Param, nnx.RngState): 0, ...: None})
BROADCAST_DROPOUT_AXES = nnx.StateAxes({(nnx.Param, "params"): 0, ...: None})


def _set_mode(module, how):
  if how == "set_attributes":
    module.set_attributes(deterministic=False, use_running_average=False)
    return module
  return nnx.view(module, deterministic=False, use_running_average=False)


def _scan_mlp(batch_norm, broadcast_dropout):
  """TestScan.test_complex's MLP (or test_complex_broadcast_dropout's)."""
  if broadcast_dropout:
    state_axes = BROADCAST_DROPOUT_AXES
    split = dict(splits=5, only="params")
  else:
    state_axes = STATE_AXES
    split = dict(splits=5)

  def scan_call(fn):
    fn = nnx.scan(in_axes=(state_axes, nnx.Carry))(fn)
    return nnx.split_rngs(**split)(fn) if broadcast_dropout else fn

  class MLP(nnx.Module):

    @nnx.split_rngs(**split)
    @nnx.vmap(in_axes=(state_axes, state_axes))
    def __init__(self, rngs: nnx.Rngs):
      self.linear = nnx.Linear(3, 3, rngs=rngs)
      self.bn = batch_norm(3, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)
      self.node = nnx.Variable(jnp.ones((2,)))

    @scan_call
    def __call__(self, x: jax.Array):
      x = self.linear(x)
      x = self.bn(x)
      x = self.dropout(x)
      x = nnx.gelu(x)
      return x, None

  rngs = nnx.Rngs(params=0, dropout=1) if broadcast_dropout else nnx.Rngs(0)
  return MLP(rngs=rngs)


@swap.BOTH
@pytest.mark.parametrize("how", ["set_attributes", "view"])
@pytest.mark.parametrize("broadcast_dropout", [False, True],
                         ids=["complex", "complex_broadcast_dropout"])
def test_scan_complex(config, how, broadcast_dropout):
  module = _scan_mlp(swap.nnx_batchnorm(config), broadcast_dropout)
  module = _set_mode(module, how)

  assert module.linear.kernel.shape == (5, 3, 3)
  assert module.linear.bias.shape == (5, 3)
  assert module.node.shape == (2,)

  y, _ = module(jnp.ones((1, 3)))
  assert y.shape == (1, 3)


@swap.BOTH
@pytest.mark.parametrize("how", ["set_attributes", "view"])
def test_scan_complex_decorator(config, how):
  batch_norm = swap.nnx_batchnorm(config)

  class Block(nnx.Module):

    @nnx.split_rngs(splits=5)
    @nnx.vmap(in_axes=(STATE_AXES, STATE_AXES), axis_size=5)
    def __init__(self, rngs: nnx.Rngs):
      self.d = 3
      self.linear = nnx.Linear(3, 3, rngs=rngs)
      self.bn = batch_norm(3, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)
      self.node = nnx.Variable(jnp.ones((2,)))

    @nnx.scan(in_axes=(STATE_AXES, nnx.Carry))
    def __call__(self, x: jax.Array):
      x = self.linear(x)
      x = self.bn(x)
      x = self.dropout(x)
      x = nnx.gelu(x)
      return x, None

  module = _set_mode(Block(rngs=nnx.Rngs(0)), how)

  assert module.d == 3
  assert module.linear.kernel.shape == (5, 3, 3)
  assert module.linear.bias.shape == (5, 3)
  assert module.node.shape == (2,)

  y, out = module(jnp.ones((1, 3)))
  assert y.shape == (1, 3)
  assert out is None


def _vmap_block(batch_norm):

  class Block(nnx.Module):

    def __init__(self, rngs: nnx.Rngs):
      self.linear = nnx.Linear(2, 3, rngs=rngs)
      self.bn = batch_norm(3, rngs=rngs)
      self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
      return nnx.relu(self.dropout(self.bn(self.linear(x))))

  return Block


VMAP_STATE_AXES = nnx.StateAxes({(nnx.BatchStat, "dropout"): 0, ...: None})


@swap.BOTH
def test_vmap_state_axes_simple(config):
  block = _vmap_block(swap.nnx_batchnorm(config))

  @nnx.vmap(in_axes=(VMAP_STATE_AXES,), out_axes=VMAP_STATE_AXES)
  def create_block(rngs: nnx.Rngs):
    return block(rngs)

  rngs = nnx.Rngs(params=0, dropout=1)
  nnx.split_rngs(rngs, splits=5, only="dropout")
  module = create_block(rngs)

  assert module.linear.kernel.shape == (2, 3)
  assert module.bn.scale.shape == (3,)
  assert module.bn.mean.shape == (5, 3)

  @nnx.vmap(in_axes=(VMAP_STATE_AXES, 0), out_axes=0)
  def forward_block(module, x):
    return module(x)

  assert forward_block(module, jnp.ones((5, 1, 2))).shape == (5, 1, 3)


@swap.BOTH
def test_vmap_split_rngs_decorator_simple(config):
  block = _vmap_block(swap.nnx_batchnorm(config))

  @nnx.split_rngs(splits=5, only="dropout")
  @nnx.vmap(in_axes=(VMAP_STATE_AXES,), out_axes=VMAP_STATE_AXES)
  def create_block(rngs: nnx.Rngs):
    return block(rngs)

  module = create_block(nnx.Rngs(params=0, dropout=1))

  assert module.linear.kernel.shape == (2, 3)
  assert module.bn.scale.shape == (3,)
  assert module.bn.mean.shape == (5, 3)
  assert module.dropout.rngs is not None
  assert module.dropout.rngs.key.shape == (5,)

  @nnx.vmap(in_axes=(VMAP_STATE_AXES, 0), out_axes=0)
  def forward_block(module, x):
    assert module.dropout.rngs is not None
    assert module.dropout.rngs.key.shape == ()
    return module(x)

  y = forward_block(module, jnp.ones((5, 1, 2)))
  assert module.dropout.rngs is not None
  assert module.dropout.rngs.key.shape == (5,)
  assert y.shape == (5, 1, 3)


@swap.BOTH
def test_vmap_state_axes_super_simple(config):
  block = _vmap_block(swap.nnx_batchnorm(config))

  @nnx.vmap(in_axes=0, out_axes=0)
  def create_block(rngs: nnx.Rngs):
    return block(rngs)

  rngs = nnx.Rngs(0)
  nnx.split_rngs(rngs, splits=5)
  module = create_block(rngs)

  assert module.linear.kernel.shape == (5, 2, 3)
  assert module.bn.scale.shape == (5, 3)
  assert module.bn.mean.shape == (5, 3)

  @nnx.vmap(in_axes=(0, 0), out_axes=0)
  def forward_block(module, x):
    return module(x)

  assert forward_block(module, jnp.ones((5, 1, 2))).shape == (5, 1, 3)


@swap.BOTH
def test_vmap_example(config):
  batch_norm = swap.nnx_batchnorm(config)

  class Model(nnx.Module):

    def __init__(self, din, dout, *, rngs: nnx.Rngs):
      self.linear = nnx.Linear(din, dout, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)
      self.bn = batch_norm(dout, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.dropout(self.bn(self.linear(x))))

  @nnx.vmap(in_axes=0, out_axes=0)
  def initialize_ensemble(key):
    return Model(2, 3, rngs=nnx.Rngs(key))

  ensemble = initialize_ensemble(jax.random.split(jax.random.key(0), 5))
  assert ensemble.linear.kernel.shape == (5, 2, 3)

  @nnx.vmap(in_axes=(0, None), out_axes=0)
  def forward(model, x):
    return model(x)

  assert forward(ensemble, jnp.ones((4, 2))).shape == (5, 4, 3)


@swap.BOTH
def test_vmap_state_axes_from_state(config):
  batch_norm = swap.nnx_batchnorm(config)

  class Model(nnx.Module):

    def __init__(self, din, dout, *, rngs: nnx.Rngs):
      self.linear = nnx.Linear(din, dout, rngs=rngs)
      self.bn = batch_norm(dout, rngs=rngs)

  state = nnx.state(Model(2, 3, rngs=nnx.Rngs(0)))
  state["linear"]["kernel"] = 0
  state["linear"]["bias"] = 1
  state["bn"]["scale"] = 0
  state["bn"]["mean"] = 1
  state["bn"]["var"] = 0
  state["bn"]["bias"] = None
  state_axes = nnx.StateAxes(state)

  for path, axis in ((("linear", "kernel"), 0), (("linear", "bias"), 1),
                     (("bn", "scale"), 0), (("bn", "mean"), 1),
                     (("bn", "var"), 0), (("bn", "bias"), None)):
    assert state_axes.map_prefix(path, None) == axis

  @nnx.vmap(out_axes=state_axes, axis_size=5)
  def create_block():
    return Model(2, 3, rngs=nnx.Rngs(0))

  model = create_block()
  assert model.linear.kernel.shape == (5, 2, 3)
  assert model.linear.bias.shape == (3, 5)
  assert model.bn.scale.shape == (5, 3)
  assert model.bn.mean.shape == (3, 5)
  assert model.bn.var.shape == (5, 3)
  assert model.bn.bias.shape == (3,)
