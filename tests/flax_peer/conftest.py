"""Hygiene for the peer suite.

``nnx.tabulate`` replaces the methods of every NNX class in the model with
recording wrappers and puts the originals back only when it succeeds (flax
0.12.8 has no ``finally`` there). While a tabulate test fails (issue 17 item
1), every later NNX call in the same process would meet the wrappers
(``'_nnx_tabulate_id'``); this fixture puts the original methods back after
each test. It touches only functions defined in ``flax/nnx/summary.py``.
"""

import os

import pytest
from flax import nnx

_SUMMARY = os.path.join("nnx", "summary.py")


def _pytree_classes():
  seen, stack = set(), [nnx.Pytree]
  while stack:
    cls = stack.pop()
    if cls not in seen:
      seen.add(cls)
      stack.extend(cls.__subclasses__())
  return seen


def _is_tabulate_wrapper(value):
  code = getattr(value, "__code__", None)
  return (code is not None and code.co_filename.endswith(_SUMMARY)
          and hasattr(value, "__wrapped__"))


@pytest.fixture(autouse=True)
def _restore_nnx_classes():
  yield
  for cls in _pytree_classes():
    for name, value in list(vars(cls).items()):
      if _is_tabulate_wrapper(value):
        original = value.__wrapped__
        delattr(cls, name)
        if getattr(cls, name, None) is not original:
          setattr(cls, name, original)
