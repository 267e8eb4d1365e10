# Adapted from Flax's tests: google/flax, tests/linen/linen_module_test.py
# (ModuleTest.test_bind_stateful), Copyright 2024 The Flax Authors, under the
# Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: a pytest function instead of an absltest method; BatchNorm is the
# GBN layer of swap.py. Inputs, keys and assertions are Flax's. Version: see
# README.md.
"""Flax's ``bind`` test with a stateful BatchNorm (linen_module_test.py).

It asserts that ``init_with_output``, a bound module and ``nn.apply`` agree
and update the same batch statistics: both configurations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import random

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


@swap.BOTH
def test_bind_stateful(config):
  batch_norm = swap.linen_batchnorm(config)

  class Foo(nn.Module):

    def setup(self):
      self.a = nn.Dense(3)
      self.bn = batch_norm()
      self.b = nn.Dense(1)

  def f(foo, x):
    x = foo.a(x)
    x = foo.bn(x, use_running_average=False)
    return foo.b(x)

  foo = Foo()
  x = jnp.ones((4,))
  y1, variables = nn.init_with_output(f, foo)(random.key(0), x)
  foo_b = foo.bind(variables, mutable="batch_stats")
  y2 = f(foo_b, x)
  y3, new_state = nn.apply(f, foo, mutable="batch_stats")(variables, x)
  assert y1 == y2
  assert y2 == y3
  for a, b in zip(jax.tree_util.tree_leaves(new_state["batch_stats"]),
                  jax.tree_util.tree_leaves(foo_b.variables["batch_stats"]),
                  strict=True):
    np.testing.assert_allclose(a, b)
