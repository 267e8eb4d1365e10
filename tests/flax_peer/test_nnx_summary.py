# Adapted from Flax's tests: google/flax, tests/nnx/summary_test.py
# (SummaryTest: test_tabulate, test_nested, test_shared), Copyright 2024 The
# Flax Authors, under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest methods; BatchNorm is the GBN
# layer of swap.py. Inputs and assertions are Flax's. Version: see README.md.
"""Flax's ``nnx.tabulate`` tests on models with the GBN layer.

They assert rows, paths, types and variable counts, the same for every
configuration: both.
"""

import jax.numpy as jnp
import pytest
from flax import nnx

from tests.flax_peer import swap

pytestmark = [pytest.mark.slow]

CONSOLE_TEST_KWARGS = dict(force_terminal=False, no_color=True, width=10_000)


@swap.BOTH
def test_tabulate(config):
  batch_norm = swap.nnx_batchnorm(config)

  class Block(nnx.Module):

    def __init__(self, din, dout, rngs: nnx.Rngs):
      self.linear = nnx.Linear(din, dout, rngs=rngs)
      self.bn = batch_norm(dout, rngs=rngs)
      self.dropout = nnx.Dropout(0.2, rngs=rngs)

    def forward(self, x):
      return nnx.relu(self.dropout(self.bn(self.linear(x))))

  class Foo(nnx.Module):

    def __init__(self, rngs: nnx.Rngs):
      self.block1 = Block(32, 128, rngs=rngs)
      self.block2 = Block(128, 10, rngs=rngs)

    def __call__(self, x):
      return self.block2.forward(self.block1.forward(x))

  foo = Foo(nnx.Rngs(0))
  table = nnx.tabulate(foo, jnp.ones((1, 32)),
                       console_kwargs=CONSOLE_TEST_KWARGS).splitlines()

  assert "Foo Summary" in table[0]
  for header in ("path", "type", "BatchStat", "Param"):
    assert header in table[2]
  expected = {
      6: ("block1/forward", "Block"), 8: ("block1/linear", "Linear"),
      13: ("block1/bn", "BatchNorm"), 18: ("block1/dropout", "Dropout"),
      20: ("block2/forward", "Block"), 22: ("block2/linear", "Linear"),
      27: ("block2/bn", "BatchNorm"), 32: ("block2/dropout", "Dropout"),
  }
  for line, texts in expected.items():
    for text in texts:
      assert text in table[line]
  # BatchStat: 2 * (128 + 10); Param: 5,790; RngState: 4.
  for text in ("Total", "276 (1.1 KB)", "5,790 (23.2 KB)", "4 (24 B)"):
    assert text in table[34]
  assert "Total Parameters: 6,070 (24.3 KB)" in table[37]


def _two_blocks(batch_norm, shared_linear):

  class Block(nnx.Module):

    def __init__(self, linear, *, rngs):
      self.linear = linear
      self.bn = batch_norm(2, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.bn(self.linear(x)))

  class Model(nnx.Module):

    def __init__(self, rngs):
      shared = nnx.Linear(2, 2, rngs=rngs) if shared_linear else None
      self.block1 = Block(shared or nnx.Linear(2, 2, rngs=rngs), rngs=rngs)
      self.block2 = Block(shared or nnx.Linear(2, 2, rngs=rngs), rngs=rngs)

    def __call__(self, x):
      return self.block2(self.block1(x))

  return Model(nnx.Rngs(0))


@swap.BOTH
def test_nested(config):
  m = _two_blocks(swap.nnx_batchnorm(config), shared_linear=False)
  table = nnx.tabulate(m, jnp.ones((4, 2)), compute_flops=True,
                       compute_vjp_flops=True)
  # 3 calls per block, plus the overall call.
  assert sum(s.startswith("├─") for s in table.splitlines()) == 7


@swap.BOTH
def test_shared(config):
  m = _two_blocks(swap.nnx_batchnorm(config), shared_linear=True)
  table = nnx.tabulate(m, jnp.ones((4, 2)), compute_vjp_flops=True)
  # 3 calls per block, plus the overall call, less the shared call.
  assert sum(s.startswith("├─") for s in table.splitlines()) == 6
