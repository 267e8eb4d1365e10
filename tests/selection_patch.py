"""Run the library with another k-th-smallest function (the sort reference).

``gbn_jax.sample_statistics`` is a ``jax.jit`` with a trace cache: a program
traced while the selection is swapped would be reused after it is swapped
back. So the caches are cleared on the way in and on the way out.
"""

import contextlib

import jax

from gbn_jax import order_statistics


@contextlib.contextmanager
def selection(kth):
  old = order_statistics.kth_smallest
  jax.clear_caches()
  order_statistics.kth_smallest = kth
  try:
    yield
  finally:
    order_statistics.kth_smallest = old
    jax.clear_caches()
