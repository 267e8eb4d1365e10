"""Many measures of one sample in ONE compiled program (for the tests' speed).

Compiling the exact selection engine costs about a second per configuration
and shape; a test that checks every measure would pay that per measure. Here
one ``jax.jit`` builds one :class:`gbn_jax.Sample` and applies every
``Measures`` to it (the sample memoises its selections, so one selection at a
level serves every measure at that level). The configuration is static, so a
repeat call with the same shapes and configuration is cached.

Each entry is computed exactly as ``gbn_jax.batch_statistics`` computes it
(``Measures(Sample(x, axes, mask=..., overflow_safe=Measures.overflow_safe))``);
at least one test per file still goes through the public
``batch_statistics`` path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import gbn_jax
from gbn_jax.functional import _hashable  # lists as tuples: static args
from gbn_jax.sample import Sample


@functools.partial(jax.jit, static_argnames=("measures", "axes", "sample_kw"))
def _many(x, mask, *, measures, axes, sample_kw):
  # One sample per averaging form, as sample_statistics builds it
  # (``Measures.overflow_safe``: mean-based configurations sum, then divide).
  samples = {}

  def sample_for(m):
    kw = dict(sample_kw)
    kw.setdefault("overflow_safe", m.overflow_safe)
    key = kw["overflow_safe"]
    if key not in samples:
      samples[key] = Sample(x, axes, mask=mask, **kw)
    return samples[key]

  return tuple(m(sample_for(m)) for m in measures)


def many_statistics(x, configs, *, axes, mask=None, **sample_kw):
  """[(S, D)] of ``x`` for each configuration (a dict of ``make_measures``
  keyword arguments, ``statistic`` and ``deviation`` included), in order."""
  measures = [gbn_jax.make_measures(**cfg) for cfg in configs]
  x = jnp.asarray(x)
  mask = None if mask is None else jnp.asarray(mask)
  sample_kw = _hashable(tuple(sorted(sample_kw.items())))
  # Two programs: the measures that use α, and the others -- so a caller that
  # varies α (hypothesis) recompiles only the first.
  results = [None] * len(measures)
  for uses_alpha in (False, True):
    idx = [i for i, m in enumerate(measures)
           if ("alpha" in m.statistic_kwargs
               or "alpha" in m.deviation_kwargs) == uses_alpha]
    if idx:
      out = _many(x, mask, measures=tuple(measures[i] for i in idx),
                  axes=_hashable(axes), sample_kw=sample_kw)
      for i, r in zip(idx, out, strict=True):
        results[i] = r
  return results
