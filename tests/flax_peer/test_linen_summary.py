# Adapted from Flax's tests: google/flax, tests/linen/summary_test.py
# (SummaryTest: test_module_summary, test_module_summary_with_depth,
# test_tabulate, test_tabulate_with_sow, test_tabulate_with_method,
# test_tabulate_function, test_module_reuse), Copyright 2024 The Flax
# Authors, under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest classes; the CNN of the file
# is built by a function of the configuration; BatchNorm is the GBN layer of
# swap.py. Inputs, keys and assertions are Flax's. Version: see README.md.
"""Flax's linen summary tests (summary_test.py) on models with the GBN layer.

None of them asserts BatchNorm's numbers (the variables, shapes, paths and
FLOPs relations are the same for every configuration): both configurations.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax.linen import summary
from jax import random

from tests.flax_peer import swap

pytestmark = [pytest.mark.slow]

CONSOLE_TEST_KWARGS = dict(force_terminal=False, no_color=True, width=10_000)
BATCH = 32


def _shapes(tree):
  return jax.tree_util.tree_map(
      lambda x: x.shape if hasattr(x, "shape") else x, tree)


def _obj_value(x):
  return x.obj if isinstance(x, summary._ObjectRepresentation) else x


def _cnn(config, test_sow):
  """Flax's ConvBlock / CNN pair, with its BatchNorm from swap.py."""
  batch_norm = swap.linen_batchnorm(config)

  class ConvBlock(nn.Module):
    features: int
    kernel_size: list[int]
    test_sow: bool

    def setup(self):
      self.conv = nn.Conv(self.features, self.kernel_size)
      self.bn = batch_norm()
      self.dropout = nn.Dropout(0.5)

    def block_method(self, x, training: bool):
      x = self.conv(x)
      if self.test_sow:
        self.sow("intermediates", "INTERM", x)
      x = self.bn(x, use_running_average=not training)
      x = self.dropout(x, deterministic=not training)
      return nn.relu(x)

    def __call__(self, x, training: bool):
      # Flax's file repeats the body here (one table row per method called).
      x = self.conv(x)
      if self.test_sow:
        self.sow("intermediates", "INTERM", x)
      x = self.bn(x, use_running_average=not training)
      x = self.dropout(x, deterministic=not training)
      return nn.relu(x)

  class CNN(nn.Module):
    test_sow: bool

    def setup(self):
      self.block1 = ConvBlock(32, [3, 3], test_sow=self.test_sow)
      self.block2 = ConvBlock(64, [3, 3], test_sow=self.test_sow)
      self.dense = nn.Dense(10)

    def cnn_method(self, x, training: bool):
      x = self.block1.block_method(x, training=training)
      x = self.block2.block_method(x, training=training)
      x = x.mean(axis=(1, 2))
      if self.test_sow:
        self.sow("intermediates", "INTERM", x)
      x = self.dense(x)
      return x, dict(a=x, b=x + 1.0)

    def __call__(self, x, training: bool):
      x = self.block1.block_method(x, training=training)
      x = self.block2.block_method(x, training=training)
      x = x.mean(axis=(1, 2))
      if self.test_sow:
        self.sow("intermediates", "INTERM", x)
      x = self.dense(x)
      return x, dict(a=x, b=x + 1.0)

  return CNN(test_sow=test_sow), CNN


def _rngs():
  return {"dropout": random.key(0), "params": random.key(1)}


def _table(module, depth, x):
  table = summary._get_module_table(
      module, depth=depth, show_repeated=True, compute_flops=True,
      compute_vjp_flops=True)(_rngs(), x, training=True, mutable=True)
  for row in table:
    row.inputs = jax.tree_util.tree_map(_obj_value, row.inputs)
    row.outputs = jax.tree_util.tree_map(_obj_value, row.outputs)
  return table


@swap.BOTH
def test_module_summary(config):
  x = jnp.ones((BATCH, 28, 28, 1))
  module, _ = _cnn(config, test_sow=False)
  table = _table(module, None, x)

  # 1 CNN + 4 per ConvBlock (2) + 1 Dense.
  assert len(table) == 10
  assert [row.path for row in table] == [
      (), ("block1",), ("block1", "conv"), ("block1", "bn"),
      ("block1", "dropout"), ("block2",), ("block2", "conv"),
      ("block2", "bn"), ("block2", "dropout"), ("dense",)]

  assert (table[0].inputs[0].shape, table[0].inputs[1]) == (
      x.shape, dict(training=True))
  assert _shapes(table[0].outputs) == (
      (BATCH, 10), dict(a=(BATCH, 10), b=(BATCH, 10)))
  for row, cin, cout in [(1, 1, 32), (5, 32, 64)]:
    assert _shapes(table[row].inputs) == (
        (BATCH, 28, 28, cin), {"training": True})
    assert table[row].outputs.shape == (BATCH, 28, 28, cout)
    assert table[row + 1].inputs.shape == (BATCH, 28, 28, cin)
    assert table[row + 1].outputs.shape == (BATCH, 28, 28, cout)
    assert _shapes(table[row + 2].inputs) == (
        (BATCH, 28, 28, cout), {"use_running_average": False})
    assert table[row + 2].outputs.shape == (BATCH, 28, 28, cout)
    assert _shapes(table[row + 3].inputs) == (
        (BATCH, 28, 28, cout), {"deterministic": False})
    assert table[row + 3].outputs.shape == (BATCH, 28, 28, cout)
  assert table[9].inputs.shape == (BATCH, 64)
  assert table[9].outputs.shape == (BATCH, 10)

  # No summarization at full depth.
  for row in table:
    assert row.module_variables == row.counted_variables

  # Each module's FLOPs are at least the sum of its submodules'.
  for r in table:
    children = [s for s in table
                if len(s.path) == len(r.path) + 1
                and s.path[:len(r.path)] == r.path]
    assert r.flops >= sum(s.flops for s in children)
    assert r.vjp_flops >= sum(s.vjp_flops for s in children)


@swap.BOTH
def test_module_summary_with_depth(config):
  x = jnp.ones((BATCH, 28, 28, 1))
  module, _ = _cnn(config, test_sow=False)
  table = _table(module, 1, x)

  # 1 CNN + 1 per ConvBlock + 1 Dense.
  assert len(table) == 4
  assert [row.path for row in table] == [
      (), ("block1",), ("block2",), ("dense",)]
  assert (table[0].inputs[0].shape, table[0].inputs[1]) == (
      x.shape, dict(training=True))
  assert _shapes(table[0].outputs) == (
      (BATCH, 10), dict(a=(BATCH, 10), b=(BATCH, 10)))
  assert _shapes(table[1].inputs) == ((BATCH, 28, 28, 1), {"training": True})
  assert table[1].outputs.shape == (BATCH, 28, 28, 32)
  assert _shapes(table[2].inputs) == ((BATCH, 28, 28, 32), {"training": True})
  assert table[2].outputs.shape == (BATCH, 28, 28, 64)
  assert table[3].inputs.shape == (BATCH, 64)
  assert table[3].outputs.shape == (BATCH, 10)

  # The ConvBlocks are summarized, the CNN and the Dense are not.
  assert table[1].module_variables != table[1].counted_variables
  assert table[2].module_variables != table[2].counted_variables
  assert table[0].module_variables == table[0].counted_variables
  assert table[3].module_variables == table[3].counted_variables

  # The top level's FLOPs exceed those of the listed submodules.
  assert table[0].flops > sum(r.flops for r in table[1:])
  assert table[0].vjp_flops > sum(r.vjp_flops for r in table[1:])


def _check_cnn_table_text(module_repr, module, vjp_header):
  lines = module_repr.split("\n")
  assert f"{module.__class__.__name__} Summary" in lines[1]
  for header in ("path", "module", "inputs", "outputs", "params", "flops",
                 "batch_stats") + (("vjp_flops",) if vjp_header else ()):
    assert header in lines[3]
  # Collection totals: batch_stats 192 (768 B), params 19,658 (78.6 KB).
  for text in ("Total", "192", "768 B", "19,658", "78.6 KB"):
    assert text in lines[-6]
  for text in ("Total Parameters", "19,850", "79.4 KB"):
    assert text in lines[-3]


@swap.BOTH
def test_tabulate(config):
  x = jnp.ones((BATCH, 28, 28, 1))
  module, _ = _cnn(config, test_sow=False)
  module_repr = module.tabulate(
      _rngs(), x, training=True, console_kwargs=CONSOLE_TEST_KWARGS,
      compute_flops=True, compute_vjp_flops=True)
  _check_cnn_table_text(module_repr, module, vjp_header=True)


@swap.BOTH
def test_tabulate_with_sow(config):
  x = jnp.ones((BATCH, 28, 28, 1))
  module, _ = _cnn(config, test_sow=True)
  module_repr = module.tabulate(
      _rngs(), x, training=True, mutable=True,
      console_kwargs=CONSOLE_TEST_KWARGS, compute_flops=True,
      compute_vjp_flops=True)
  assert "intermediates" in module_repr
  assert "INTERM" in module_repr


@swap.BOTH
def test_tabulate_with_method(config):
  x = jnp.ones((BATCH, 28, 28, 1))
  module, cnn_class = _cnn(config, test_sow=False)
  module_repr = module.tabulate(
      _rngs(), x, training=True, method=cnn_class.cnn_method,
      console_kwargs=CONSOLE_TEST_KWARGS, compute_flops=True,
      compute_vjp_flops=True)
  assert "(block_method)" in module_repr
  assert "(cnn_method)" in module_repr


@swap.BOTH
def test_tabulate_function(config):
  x = jnp.ones((BATCH, 28, 28, 1))
  module, _ = _cnn(config, test_sow=False)
  module_repr = nn.tabulate(
      module, _rngs(), console_kwargs=CONSOLE_TEST_KWARGS,
      compute_flops=True, compute_vjp_flops=True)(x, training=True)
  _check_cnn_table_text(module_repr, module, vjp_header=False)


@swap.BOTH
def test_module_reuse(config):
  batch_norm = swap.linen_batchnorm(config)

  class ConvBlock(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(32, [3, 3])(x)
      x = batch_norm(use_running_average=True)(x)
      x = nn.Dropout(0.5, deterministic=True)(x)
      return nn.relu(x)

  class CNN(nn.Module):

    @nn.compact
    def __call__(self, x):
      block = ConvBlock()
      for _ in range(3):
        x = block(x)
      return x

  x = jnp.ones((4, 28, 28, 32))
  lines = CNN().tabulate(
      jax.random.key(0), x=x, show_repeated=True,
      console_kwargs=CONSOLE_TEST_KWARGS, compute_flops=True,
      compute_vjp_flops=True).splitlines()

  # First call: the variables are listed.
  assert "ConvBlock_0/Conv_0" in lines[9]
  assert "bias" in lines[9]
  assert "ConvBlock_0/BatchNorm_0" in lines[14]
  assert "mean" in lines[14]
  assert "bias" in lines[14]
  assert "ConvBlock_0/Dropout_0" in lines[19]
  # Second and third calls: the same modules, no variables listed again.
  for conv, bn, dropout in ((23, 25, 27), (31, 33, 35)):
    assert "ConvBlock_0/Conv_0" in lines[conv]
    assert "bias" not in lines[conv]
    assert "ConvBlock_0/BatchNorm_0" in lines[bn]
    assert "mean" not in lines[bn]
    assert "bias" not in lines[bn]
    assert "ConvBlock_0/Dropout_0" in lines[dropout]

  # The CNN's FLOPs are three ConvBlocks'.
  args = (_rngs(), x)
  cnn = summary._get_module_table(
      CNN(), depth=1, show_repeated=True, compute_flops=True,
      compute_vjp_flops=True)(*args, mutable=True)
  block = summary._get_module_table(
      ConvBlock(), depth=1, show_repeated=True, compute_flops=True,
      compute_vjp_flops=True)(*args, mutable=True)
  assert cnn[0].flops == sum(r.flops for r in cnn[1:])
  assert cnn[0].vjp_flops == sum(r.vjp_flops for r in cnn[1:])
  for r in cnn[1:]:
    assert r.flops == block[0].flops
    assert r.vjp_flops == block[0].vjp_flops
