# Adapted from Flax's tests: google/flax, tests/nnx/module_test.py
# (TestModule: test_set_attributes, test_set_attribute_error, test_set_mode,
# test_set_mode_error, test_cloud_pickle, test_repr, test_set_mode_info,
# test_set_mode_info_with_filter), Copyright 2024 The Flax Authors, under the
# Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest methods; BatchNorm is the GBN
# layer of swap.py; ``nnx.set_mode`` / ``nnx.set_mode_info`` of the fetched
# file are ``nnx.view`` / ``nnx.view_info`` in flax 0.12.8 (same arguments,
# the error names ``nnx.view``). Inputs and assertions are Flax's. Version:
# see README.md.
"""Flax's NNX module tests that involve BatchNorm, with the GBN layer.

They assert attributes, views, pickling and the repr's counts, the same for
every configuration: both.
"""

import pickle
import tempfile

import cloudpickle
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


def _block(batch_norm, dropout_rngs):

  class Block(nnx.Module):

    def __init__(self, din, dout, *, rngs: nnx.Rngs):
      self.linear = nnx.Linear(din, dout, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, deterministic=False,
                                 rngs=rngs if dropout_rngs else None)
      self.batch_norm = batch_norm(10, use_running_average=False, rngs=rngs)

  return Block(2, 5, rngs=nnx.Rngs(0))


@swap.BOTH
def test_set_attributes(config):
  batch_norm = swap.nnx_batchnorm(config)
  block = _block(batch_norm, dropout_rngs=False)
  assert block.dropout.deterministic is False
  assert block.batch_norm.use_running_average is False

  block.set_attributes(deterministic=True, use_running_average=True)
  assert block.dropout.deterministic is True
  assert block.batch_norm.use_running_average is True

  block = _block(batch_norm, dropout_rngs=False)
  block.set_attributes(nnx.Dropout, deterministic=True)
  # Only the dropout changes.
  assert block.dropout.deterministic is True
  assert block.batch_norm.use_running_average is False


@swap.BOTH
def test_set_attribute_error(config):
  block = _block(swap.nnx_batchnorm(config), dropout_rngs=False)
  # The fetched file's message shows a set, {'unknown'}; flax 0.12.8's a
  # list, ['unknown'].
  with pytest.raises(
      ValueError,
      match=r"Could not find at least one instance of the following "
      r"attributes: [\[{]'unknown'[\]}]"):
    block.set_attributes(deterministic=True, use_running_average=True,
                         unknown=True)
  block.set_attributes(deterministic=True, use_running_average=True,
                       unknown=True, raise_if_not_found=False)


@swap.BOTH
def test_view(config):
  batch_norm = swap.nnx_batchnorm(config)
  block = _block(batch_norm, dropout_rngs=True)
  assert block.dropout.deterministic is False
  assert block.batch_norm.use_running_average is False

  new_block = nnx.view(block, deterministic=True, use_running_average=True)
  assert new_block.dropout.deterministic is True
  assert new_block.batch_norm.use_running_average is True
  assert new_block.linear.kernel is block.linear.kernel

  block = _block(batch_norm, dropout_rngs=True)
  new_block = nnx.view(block, only=nnx.Dropout, deterministic=True)
  # Only the dropout changes.
  assert new_block.dropout.deterministic is True
  assert new_block.batch_norm.use_running_average is False


@swap.BOTH
def test_view_error(config):
  block = _block(swap.nnx_batchnorm(config), dropout_rngs=True)
  with pytest.raises(ValueError,
                     match=r"Unused keys found in nnx.view: \['unknown'\]"):
    nnx.view(block, deterministic=True, use_running_average=True,
             unknown=True)


def _foo(batch_norm):

  class Block(nnx.Module):

    def __init__(self, din, dout, *, rngs: nnx.Rngs):
      self.linear = nnx.Linear(din, dout, rngs=rngs)
      self.bn = batch_norm(dout, rngs=rngs)
      self.dropout = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.dropout(self.bn(self.linear(x))))

  class Foo(nnx.Module):

    def __init__(self, rngs: nnx.Rngs):
      self.block1 = Block(32, 128, rngs=rngs)
      self.block2 = Block(128, 10, rngs=rngs)

    def __call__(self, x):
      return self.block2(self.block1(x))

  return Block, Foo(rngs=nnx.Rngs(0))


@swap.BOTH
def test_cloud_pickle(config):
  batch_norm = swap.nnx_batchnorm(config)

  class Model(nnx.Module):

    def __init__(self, din, dmid, dout, rngs: nnx.Rngs):
      self.linear = nnx.Linear(din, dmid, rngs=rngs)
      self.bn = batch_norm(dmid, rngs=rngs)
      self.dropout = nnx.Dropout(0.1, rngs=rngs)
      self.linear_out = nnx.Linear(dmid, dout, rngs=rngs)

    def __call__(self, x):
      return self.linear_out(nnx.relu(self.dropout(self.bn(self.linear(x)))))

  model = Model(2, 64, 3, rngs=nnx.Rngs(0))
  model.eval()
  y1 = model(jnp.ones((5, 2)))
  with tempfile.TemporaryDirectory() as tmpdir:
    path = f"{tmpdir}/model.pkl"
    with open(path, "wb") as f:
      cloudpickle.dump(model, f)
    del model
    with open(path, "rb") as f:
      model = pickle.load(f)
  assert isinstance(model, Model)
  np.testing.assert_allclose(y1, model(jnp.ones((5, 2))))


@swap.BOTH
def test_repr(config):
  _, obj = _foo(swap.nnx_batchnorm(config))
  leaves = nnx.to_flat_state(nnx.state(obj)).leaves

  def total(kind=object):
    return sum(int(np.prod(x.shape)) for x in leaves if isinstance(x, kind))

  first_line = repr(obj).replace(",", "").splitlines()[0]
  for count in (total(), total(nnx.Param), total(nnx.BatchStat),
                total(nnx.RngState)):
    assert str(count) in first_line


@swap.BOTH
def test_view_info(config):
  _, obj = _foo(swap.nnx_batchnorm(config))
  info_str = nnx.view_info(obj)
  assert info_str.count("BatchNorm:") == 1
  assert info_str.count("Dropout:") == 1


@swap.BOTH
def test_view_info_with_filter(config):
  block_class, _ = _foo(swap.nnx_batchnorm(config))
  obj = block_class(4, 8, rngs=nnx.Rngs(0))
  info_str = nnx.view_info(obj, only=nnx.Dropout)
  assert "Dropout:" in info_str
  assert "BatchNorm:" not in info_str
  assert nnx.view_info(obj, only=nnx.MultiHeadAttention) == ""
