# Adapted from Flax's tests: google/flax, tests/nnx/graph_utils_test.py
# (TestGraphUtils: test_module_list, test_cached_unflatten), Copyright 2024
# The Flax Authors, under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0).
# Changes: pytest functions instead of absltest methods; ``.value`` reads of
# the fetched file are ``[...]``, and the inverse index map is filled entry by
# entry (flax 0.12.8's Variables are not hashable, so the fetched dict
# comprehension fails with Flax's own BatchNorm too); BatchNorm is the GBN
# layer of swap.py. Inputs and assertions are Flax's. Version: see README.md.
"""Flax's NNX graph-utility tests that hold a BatchNorm, with the GBN layer.

They assert state structure, shapes and reference identity through
flatten/unflatten, the same for every configuration: both.
"""

from functools import partial
from typing import Any

import jax
import pytest
from flax import nnx

from tests.flax_peer import swap

pytestmark = pytest.mark.slow


@swap.BOTH
def test_module_list(config):
  rngs = nnx.Rngs(0)
  ls = [nnx.Linear(2, 2, rngs=rngs), swap.nnx_batchnorm(config)(2, rngs=rngs)]
  _, state = nnx.split(ls)

  assert state[0]["kernel"][...].shape == (2, 2)
  assert state[0]["bias"][...].shape == (2,)
  for name in ("scale", "bias", "mean", "var"):
    assert state[1][name][...].shape == (2,)


@swap.BOTH
def test_cached_unflatten(config):
  batch_norm = swap.nnx_batchnorm(config)

  class Foo(nnx.Module):

    def __init__(self, *, rngs: nnx.Rngs):
      self.a = nnx.Linear(2, 2, rngs=rngs)
      self.b = batch_norm(2, rngs=rngs)

  def f(m: Foo):
    m.a, m.b = m.b, m.a

  m = Foo(rngs=nnx.Rngs(0))
  a, b = m.a, m.b

  ref_out_idx_out = nnx.graph.RefMap()
  graphdef, state = nnx.graph.flatten(m, ref_index=ref_out_idx_out)
  state = state.to_nested_state()

  @partial(jax.jit, static_argnums=(0,))
  def f_pure(graphdef, state):
    idx_out_ref_in: dict[int, Any] = {}
    m = nnx.graph.unflatten(graphdef, state, index_ref=idx_out_ref_in)
    ref_in_idx_out = nnx.graph.RefMap()
    for k, v in idx_out_ref_in.items():  # Variables are not hashable (0.12.8)
      ref_in_idx_out[v] = k
    f(m)
    graphdef, state = nnx.graph.flatten(
        m, ref_index=nnx.graph.RefMap(), ref_outer_index=ref_in_idx_out)
    return state.to_nested_state(), graphdef

  state, graphdef_out = f_pure(graphdef, state)
  idx_out_ref_out = {v: k for k, v in ref_out_idx_out.items()}
  m2 = nnx.graph.unflatten(graphdef_out, state,
                           outer_index_outer_ref=idx_out_ref_out)
  assert m2 is m
  assert m2.a is b
  assert m2.b is a
