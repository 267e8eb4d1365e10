"""Exact order statistics of a :class:`~gbn_jax.sample.Sample`.

Everything the catalogue needs from the ordering of a sample goes through
:func:`kth_smallest`; :func:`quantile` adds the rank rule of SPEC §2.

The rank rule: ``k = ceil(alpha * n)`` clipped to ``[1, n]`` (NumPy's
``method="inverted_cdf"``). ``alpha`` is taken as a float32 and the product
``alpha * n`` is evaluated in float32, the same way with or without a mask, on
one device or many; counts are exact in float32 up to 2**24 values per
channel. Where ``float32(alpha) * n`` lands within rounding of a whole number,
that float32 product decides ``k`` (NumPy, in float64, may then differ by one).

Implementation: this module is the engine that can be swapped. The reference
engine here sorts each channel (gathering the other devices' values when an
``axis_name`` is given). Its gradient is JAX's gradient of the sort: 1 at the
selected element, 0 elsewhere (SPEC §3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gbn_jax.sample import Sample

Array = jax.Array


def quantile_rank(alpha: float, n: Array) -> Array:
  """k = ceil(alpha * n) clipped to [1, max(n, 1)], as int32 (float32 product)."""
  n = jnp.asarray(n, jnp.float32)
  k = jnp.ceil(jnp.float32(alpha) * n)
  k = jnp.clip(k, 1.0, jnp.maximum(n, 1.0))
  return k.astype(jnp.int32)


def _channels_last(sample: Sample, values: Array) -> Array:
  """Move the reduction axes to the end and flatten them: (*channels, m)."""
  keep = [i for i in range(values.ndim) if i not in sample.axes]
  values = jnp.transpose(values, keep + list(sample.axes))
  return values.reshape(sample.channel_shape + (-1,))


def sorted_values(sample: Sample) -> Array:
  """Each channel's valid values in ascending order, padded with +inf.

  Shape ``(*channel_shape, m)`` with ``m`` the pooled number of slots; the
  first ``n`` entries of a channel are its valid values (all devices).
  """

  def compute():
    x = sample.x
    if sample.mask is not None:
      x = jnp.where(sample.mask, x, jnp.inf)
    x = _channels_last(sample, x)
    if sample.axis_name is not None:
      x = lax.all_gather(
          x,
          sample.axis_name,
          axis_index_groups=sample.axis_index_groups,
          axis=x.ndim - 1,
          tiled=True,
      )
    return jnp.sort(x, axis=-1)

  return sample.memo("sorted", compute)


def kth_smallest(sample: Sample, k: Array) -> Array:
  """x_(k): the k-th smallest valid value of each channel (1-based ``k``).

  ``k`` has the channel shape and lies in [1, n]; an empty channel gives 0.
  """
  s = sorted_values(sample)
  idx = jnp.broadcast_to(jnp.asarray(k, jnp.int32) - 1, sample.channel_shape)
  v = jnp.take_along_axis(s, idx[..., None], axis=-1)[..., 0]
  if sample.mask is not None:
    v = jnp.where(sample.count() > 0, v, jnp.zeros_like(v))
  return v


def quantile(sample: Sample, alpha: float) -> Array:
  """q_alpha = x_(k), k = ceil(alpha n) clipped to [1, n] (memoised per alpha)."""
  return sample.memo(
      ("quantile", float(alpha)),
      lambda: kth_smallest(sample, quantile_rank(alpha, sample.count())),
  )
