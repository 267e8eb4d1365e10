"""The functional core: ``batch_statistics``, ``sample_statistics``,
``normalize``.

Pure functions of arrays and static settings; importing jax only, so they can
be called inside any ``jit``/``vmap``/``pmap``/``shard_map`` code. The checks
and the configuration objects live in :mod:`gbn_jax.config` (re-exported
here); the Flax modules share one layer step (:mod:`gbn_jax._layer`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gbn_jax._sharding import with_automatic_axes
from gbn_jax.config import (  # noqa: F401  (re-exported: the public checks)
  MODES,
  Measures,
  check_bool,
  check_dtype,
  check_epsilon,
  check_level,
  check_mixture,
  check_mode,
  check_p,
  hashable,
  make_measures,
)
from gbn_jax.sample import (
  Sample,
  canonicalize_axes,
  check_axis_index_groups,
  check_floating_input,
)

_hashable = hashable  # the tests' historical name

Array = jax.Array


def batch_statistics(
  x: Array,
  *,
  axes: int | Sequence[int],
  statistic: str | None = None,
  deviation: str = "superquantile",
  alpha: float | None = 0.5,
  p: float = 2.0,
  levels: Sequence[float] | None = None,
  weights: Sequence[float] | None = None,
  gaussian_consistent: bool = False,
  mask: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  use_fast_variance: bool = False,
  dtype: Any = None,
  force_float32_reductions: bool = True,
  approximate: bool = False,
  guess: tuple[Array, Array] | None = None,
) -> tuple[Array, Array]:
  """Per-channel centering S(x) and deviation D(x) over ``axes``.

  The sample of a channel is its values over ``axes`` where ``mask`` is True,
  pooled over the devices of ``axis_name`` (and ``axis_index_groups``): the
  result equals the one-device result on the concatenated batch.

  Args:
    x: input array (floating point; half precision is reduced in float32).
    axes: the reduction (batch and spatial) axes.
    statistic: a name in :data:`gbn_jax.STATISTICS`, or None for the
      deviation's natural statistic (:data:`gbn_jax.NATURAL_STATISTIC`).
    deviation: a name in :data:`gbn_jax.DEVIATIONS`.
    alpha: level of ``quantile`` / ``superquantile``, in (0, 1).
    p: exponent of the ``lp`` deviation, >= 1.
    levels: levels α_j of the ``mixed_superquantile`` deviation /
      ``mixed_quantile`` statistic.
    weights: their weights λ_j (default equal).
    gaussian_consistent: scale D so that it equals σ on normal data.
    mask: boolean array broadcastable to ``x``; True marks values that count.
    axis_name: pool the sample across the devices of this named axis (pmap /
      shard_map); not needed under ``jit`` with a sharded batch.
    axis_index_groups: groups of that axis, as in ``lax.psum``.
    use_fast_variance: ``std`` as max(0, E[x²] - μ²) in one pass, as Flax.
      Off by default here: in float32 that form loses the variance to
      cancellation when |μ| >> σ (a constant channel can get D > 0).
      ``GeneralizedBatchNorm`` keeps Flax's default (True) for parity.
    dtype: the reduction precision (None: the input's), as in Flax.
    force_float32_reductions: reduce half-precision input in float32.
    approximate: each quantile's counting search stops once its bracket
      holds at most ``order_statistics.APPROX_BRACKET_SE`` standard errors
      and interpolates there (rank error bounded, docs/SPEC.md §4; the
      superquantile is then evaluated exactly at that point). Faster, not
      exact; device-invariant. Off by default.
    guess: optional ``(center, dev_sq)``, per-channel estimates of S and D²
      from earlier batches (e.g. a layer's running ``mean`` and ``var``): the
      selection of the order statistics starts from there and needs fewer
      passes. An exact result is the same whatever the guess (NaN, ±inf or
      far off costs passes, not correctness); an approximate one may move
      within its error bound. A channel whose guess is NaN starts cold.
      Under ``axis_name`` the guesses are ``pmax``-ed, so every device
      counts at the same pivots.

  Returns:
    ``(center, dev)``, each of shape ``x.shape`` without ``axes``, in the
    reduction dtype (float32 for half-precision input).
  """
  measures = make_measures(
    statistic,
    deviation,
    alpha=alpha,
    p=p,
    levels=levels,
    weights=weights,
    gaussian_consistent=gaussian_consistent,
    use_fast_variance=use_fast_variance,
  )
  check_dtype(dtype)
  check_bool(force_float32_reductions, "force_float32_reductions")
  check_bool(approximate, "approximate")
  return sample_statistics(
    measures,
    x,
    axes=axes,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    dtype=dtype,
    force_float32_reductions=force_float32_reductions,
    approximate=approximate,
    guess=guess,
  )


def sample_statistics(
  measures: Measures,
  x: Array,
  *,
  axes,
  mask: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
  force_float32_reductions: bool = True,
  approximate: bool = False,
  squared: bool = False,
  guess: tuple[Array, Array] | None = None,
) -> tuple[Array, Array]:
  """``measures`` of the :class:`Sample` of ``x``: (S, D), or (S, D²) if
  ``squared`` (what the normalization uses; see ``Measures.center_and_dev_sq``).
  ``guess`` as in :func:`batch_statistics`.

  The computation is a ``jax.jit`` with the configuration static, so a call
  outside any trace compiles once per shape and configuration (the selection
  engine's loops would otherwise be recompiled on every eager call); inside
  a user's ``jit``/``pmap``/``shard_map`` it is inlined as usual.
  """
  check_axis_index_groups(axis_name, axis_index_groups)
  if is_complex_input(measures, x):
    return complex_statistics(
      measures,
      jnp.asarray(x),
      canonicalize_axes(jnp.ndim(x), axes),
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      squared=squared,
    )
  check_floating_input(x)
  if guess is not None:
    guess = _check_guess(guess, x, axes)
  return _sample_statistics_jit(
    jnp.asarray(x),
    None if mask is None else jnp.asarray(mask),
    guess,
    measures=measures,
    axes=_hashable(axes),
    axis_name=_hashable(axis_name),
    axis_index_groups=_hashable(axis_index_groups),
    dtype=dtype,
    force_float32_reductions=force_float32_reductions,
    approximate=approximate,
    squared=squared,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "measures",
    "axes",
    "axis_name",
    "axis_index_groups",
    "dtype",
    "force_float32_reductions",
    "approximate",
    "squared",
  ),
)
def _sample_statistics_jit(
  x,
  mask,
  guess,
  *,
  measures,
  axes,
  axis_name,
  axis_index_groups,
  dtype,
  force_float32_reductions,
  approximate,
  squared,
):
  def statistics(x, mask, guess):
    sample = make_sample(
      measures,
      x,
      axes,
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      force_float32_reductions=force_float32_reductions,
      approximate=approximate,
      guess=guess,
    )
    return measures.center_and_dev_sq(sample) if squared else measures(sample)

  return with_automatic_axes(
    statistics, x, canonicalize_axes(x.ndim, axes), mask, guess
  )


def is_complex_input(measures: Measures, x) -> bool:
  """True for complex ``x`` under a configuration defined on it; a
  ``TypeError`` naming the reason for complex ``x`` under any other."""
  if not jnp.iscomplexobj(x):
    return False
  if not measures.complex_ok:
    raise TypeError(
      f"complex input needs a configuration defined on complex numbers:"
      " statistic 'mean' with deviation 'std', 'mean_abs' or 'lp' (the"
      " deviations of |x - μ|, as nn.BatchNorm); statistic"
      f" {measures.statistic!r} with deviation {measures.deviation!r} needs"
      " an ordering of the values, and complex numbers have none"
    )
  return True


def complex_statistics(
  measures: Measures,
  x: Array,
  axes: tuple[int, ...],
  *,
  mask: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  squared: bool = False,
) -> tuple[Array, Array]:
  """(S, D) or (S, D²) of complex ``x``: S = μ (complex), D from |x - μ|.

  ``nn.BatchNorm``'s convention for complex activations: the mean, and
  averages of |x - μ| (``std``: sqrt(mean |x - μ|²), or with
  ``use_fast_variance`` max(0, mean |x|² - |μ|²); ``mean_abs``: mean |x - μ|;
  ``lp``: (mean |x - μ|^p)^(1/p)). Reduced in at least complex64.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.complex64))
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)

  def average(v):
    total = jnp.sum(v, axes, where=mask)
    count = (
      jnp.sum(mask, axes, dtype=jnp.float32)
      if mask is not None
      else jnp.full(
        total.shape, math.prod(x.shape[a] for a in axes), jnp.float32
      )
    )
    if axis_name is not None:
      total, count = lax.psum(
        (total, count), axis_name, axis_index_groups=axis_index_groups
      )
    return total / jnp.maximum(count, 1).astype(total.real.dtype)

  mu = average(x)
  dist = jnp.abs(x - jnp.expand_dims(mu, axes))
  kwargs = measures.deviation_kwargs
  if measures.deviation == "std":
    if kwargs.get("fast_variance"):
      dev_sq = jnp.maximum(
        0.0, average(jnp.square(jnp.abs(x))) - jnp.square(jnp.abs(mu))
      )
    else:
      dev_sq = average(jnp.square(dist))
    dev = jnp.sqrt(dev_sq)
  elif measures.deviation == "mean_abs":
    dev = average(dist)
    dev_sq = jnp.square(dev)
  else:  # lp
    dev = average(dist ** kwargs["p"]) ** (1.0 / kwargs["p"])
    dev_sq = jnp.square(dev)
  scale = measures.scale
  if squared:
    return mu, dev_sq * scale**2
  return mu, dev * scale


def _check_guess(guess, x, axes) -> tuple[Array, Array]:
  """(center, dev_sq), each of x's shape without ``axes``."""
  shape = jnp.shape(x)
  axes = canonicalize_axes(len(shape), axes)
  channel_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
  if not isinstance(guess, (tuple, list)) or len(guess) != 2:
    raise ValueError(
      "guess must be a pair (center, dev_sq) of per-channel arrays of shape"
      f" {channel_shape}; got {guess!r}"
    )
  out = []
  for name, v in zip(("center", "dev_sq"), guess, strict=True):
    v = jnp.asarray(v)
    if v.shape != channel_shape or not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(
        f"guess {name} must be a floating-point array of shape"
        f" {channel_shape} (x's shape without axes {axes}); got"
        f" {v.dtype}{list(v.shape)}"
      )
    out.append(lax.stop_gradient(v.astype(jnp.float32)))
  return out[0], out[1]


def make_sample(
  measures: Measures,
  x: Array,
  axes,
  *,
  guess: tuple[Array, Array] | None = None,
  **sample_kwargs,
) -> Sample:
  """The :class:`Sample` the ``measures`` are computed on (its averaging
  form chosen by the configuration), warm-started from ``guess`` =
  (center, dev_sq) where the configuration selects quantiles."""
  levels = measures.selected_levels()
  if guess is not None and levels:
    quantile_guess, spread = measures.quantile_guesses(*guess)
    sample_kwargs.update(quantile_guess=quantile_guess, spread_guess=spread)
  return Sample(x, axes, overflow_safe=measures.overflow_safe, **sample_kwargs)


def normalize(
  x: Array,
  center: Array,
  dev_sq: Array,
  *,
  axes: int | Sequence[int],
  epsilon: float = 1e-5,
  scale: Array | None = None,
  bias: Array | None = None,
) -> Array:
  """y = scale * (x - center) / sqrt(dev_sq + epsilon) + bias.

  ``x`` may be complex (statistics of a configuration defined on it).

  ``center`` and ``dev_sq`` (= D^2) have ``x.shape`` without ``axes``;
  ``scale`` and ``bias`` broadcast against ``x``. Computed in the promoted
  dtype of the arguments (float32 for half-precision ``x`` and float32
  statistics), like ``flax.linen.BatchNorm``.
  """
  if not jnp.iscomplexobj(x):
    check_floating_input(x)
  epsilon = check_epsilon(epsilon)
  axes = canonicalize_axes(jnp.ndim(x), axes)
  channel_shape = tuple(d for i, d in enumerate(jnp.shape(x)) if i not in axes)
  for name, v in (("center", center), ("dev_sq", dev_sq)):
    if jnp.shape(v) != channel_shape:
      raise ValueError(
        f"{name} must have x's shape without axes {axes}, {channel_shape};"
        f" got shape {jnp.shape(v)}"
      )
  mul = lax.rsqrt(jnp.expand_dims(dev_sq, axes) + epsilon)
  if scale is not None:
    mul = mul * scale
  y = (x - jnp.expand_dims(center, axes)) * mul
  if bias is not None:
    y = y + bias
  return y
