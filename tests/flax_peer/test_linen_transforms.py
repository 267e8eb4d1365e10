# Adapted from Flax's tests: google/flax, tests/linen/linen_transforms_test.py
# (TransformTest.test_vmap_batchnorm), Copyright 2024 The Flax Authors, under
# the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: a pytest function instead of an absltest method; BatchNorm is the
# GBN layer of swap.py. Inputs, keys and assertions are Flax's. Version: see
# README.md.
"""Flax's ``nn.vmap`` BatchNorm test (linen_transforms_test.py) with GBN.

It asserts that the statistics over a vmapped axis (``axis_name``) equal those
of the flattened batch, which holds for every configuration: both.
"""

from typing import Any

import numpy as np
import pytest
from flax import linen as nn
from jax import random

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


@swap.BOTH
def test_vmap_batchnorm(config):
  batch_norm = swap.linen_batchnorm(config)
  key1, key2, key3 = random.split(random.key(3), 3)
  x = random.uniform(key1, (4, 4))
  x2 = random.uniform(key2, (5, 4, 4))

  class MlpBn(nn.Module):
    axis_name: Any = None

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(3)(x)
      return batch_norm(axis_name=self.axis_name,
                        use_running_average=False)(x)

  vmap_model = nn.vmap(
      MlpBn,
      in_axes=(0,),
      variable_axes={"params": None, "batch_stats": None},
      split_rngs={"params": False},
      axis_name="batch",
  )(axis_name="batch")
  normal_model = MlpBn()
  init_variables = normal_model.init(key3, x)
  y1 = normal_model.apply(init_variables, x2.reshape((-1, 4)),
                          mutable=["batch_stats"])[0]
  y1 = y1.reshape((5, 4, 3))
  y2 = vmap_model.apply(init_variables, x2, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(y1, y2, atol=1e-5)
