"""The sample of each feature channel: batch-axes values, a mask, devices.

docs/SPEC.md §1: for one channel the sample is the values of ``x`` over the
reduction axes, restricted by ``mask`` and, with an ``axis_name``, pooled over
every device of the group. Every measure in the catalogue is written against
this object, so masks and devices are handled in one place and a measure is a
few lines of math.


A :class:`Sample` is built inside the traced function (it holds traced arrays)
and memoises what it has computed, so a statistic and a deviation that both
need, say, the mean or the same quantile compute it once per trace.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def check_floating_input(x) -> None:
  """Integer / bool input is a ``TypeError`` (cast first), as in the docs."""
  dt = getattr(x, "dtype", None)
  if dt is None:
    dt = jnp.asarray(x).dtype
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f"gbn_jax normalizes floating-point input; got dtype {dt}."
      " Cast it first, e.g. x.astype(jnp.float32)."
    )


def check_axis_index_groups(axis_name, axis_index_groups) -> None:
  """Groups of a named axis need the axis: a ``ValueError`` without it."""
  if axis_index_groups is not None and axis_name is None:
    raise ValueError(
      f"axis_index_groups={axis_index_groups!r} needs an axis_name;"
      " got axis_name=None"
    )


def canonicalize_axes(ndim: int, axes: int | Iterable[int]) -> tuple[int, ...]:
  """Sorted, deduplicated, non-negative axes; ``ValueError`` if out of range."""
  if not isinstance(axes, Iterable):
    axes = (axes,)
  out = set()
  for a in axes:
    if not isinstance(a, (int, jnp.integer)) or isinstance(a, bool):
      raise TypeError(f"axes must be integers, got {a!r} in {axes!r}")
    if not -ndim <= a < ndim:
      raise ValueError(
        f"axis {a} is out of range for an input of rank {ndim}; valid axes"
        f" are {-ndim}..{ndim - 1}"
      )
    out.add(int(a) % ndim)
  return tuple(sorted(out))


def _groups_key(groups):
  return None if groups is None else tuple(tuple(g) for g in groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _pmax(v: Array, axis_name, groups) -> Array:
  """lax.pmax with a derivative (JAX has none for pmax/pmin).

  The derivative is that of ``jnp.max`` across devices: the tangent of the
  device(s) holding the maximum, shared equally among tied devices.
  """
  return lax.pmax(v, axis_name, axis_index_groups=groups)


@_pmax.defjvp
def _pmax_jvp(axis_name, groups, primals, tangents):
  (v,), (t,) = primals, tangents
  m = lax.pmax(v, axis_name, axis_index_groups=groups)
  hit = (v == m).astype(t.dtype)
  ties = lax.psum(hit, axis_name, axis_index_groups=groups)
  t_m = lax.psum(t * hit, axis_name, axis_index_groups=groups)
  return m, t_m / jnp.maximum(ties, 1)


def clip_value(raw: Array, lo: Array, hi: Array) -> Array:
  """clip(raw, lo, hi) in value, the gradient of ``raw`` (a rounding guard).

  For bounds that hold in exact arithmetic (lo <= mean <= hi, D >= 0) but can
  fail by an ulp in float32: a constant channel then gets its mean exactly
  (so D = 0 exactly and the output is beta), while gradients stay those of the
  unclipped formula. A non-finite ``raw`` (the sum overflowed, or ±inf data)
  gives the clipped value itself (lo when lo == hi: a constant channel's
  E[x²] - μ² may be inf - inf); NaN data stays NaN.
  """
  # No gradient through the bounds: the backward pass costs nothing extra.
  lo, hi, fixed = map(lax.stop_gradient, (lo, hi, raw))
  clipped = jnp.clip(fixed, lo, hi)
  guarded = raw + (clipped - fixed)
  fallback = jnp.where(lo == hi, lo, clipped)
  return jnp.where(jnp.isfinite(raw), guarded, fallback)


def level_key(alpha) -> float:
  """A quantile level as the rank rule sees it (float32), for dict lookups."""
  return float(np.float32(alpha))


def _per_channel(v, channel_shape, name) -> Array:
  """``v`` as float32 of ``channel_shape`` (broadcast), without a gradient."""
  v = jnp.asarray(v)
  if not (
    jnp.issubdtype(v.dtype, jnp.floating)
    or jnp.issubdtype(v.dtype, jnp.integer)
  ):
    raise TypeError(f"{name} must be a real array; got dtype {v.dtype}")
  try:
    v = jnp.broadcast_to(v, channel_shape)
  except ValueError:
    raise ValueError(
      f"{name} of shape {v.shape} does not broadcast to the channel shape"
      f" {channel_shape}"
    ) from None
  return lax.stop_gradient(v.astype(jnp.float32))


def _check_quantile_guess(guess, channel_shape):
  """``{float32 level: per-channel guess}``, or None."""
  if guess is None:
    return None
  if not isinstance(guess, Mapping):
    raise TypeError(
      "quantile_guess must map levels α to per-channel guesses of q_α"
      f" (a dict); got {type(guess).__name__}"
    )
  out = {}
  for alpha, v in guess.items():
    if isinstance(alpha, bool) or not isinstance(
      alpha, (int, float, np.floating, np.integer)
    ):
      raise TypeError(f"quantile_guess keys must be levels α; got {alpha!r}")
    out[level_key(alpha)] = _per_channel(
      v, channel_shape, f"quantile_guess[{alpha!r}]"
    )
  return out


def reduction_dtype(x_dtype, dtype=None, force_float32: bool = True):
  """The dtype statistics are computed in: at least float32, as in Flax."""
  dtype = x_dtype if dtype is None else dtype
  if force_float32:
    dtype = jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(dtype)


class Sample:
  """Per-channel sample of ``x`` over ``axes`` (masked, pooled over devices).

  Reductions return arrays of shape ``channel_shape`` = ``x.shape`` without
  ``axes``. Channels with no valid value get ``count == 0``; every reduction
  on them is finite (sums are 0, means 0, order statistics 0).

  Attributes:
    x: the values, in the reduction dtype (float32 for half-precision input).
    axes: the reduction axes (canonical, sorted).
    mask: ``None`` or a boolean array of ``x.shape`` (True = counts).
    axis_name: named axis whose devices pool their values (pmap / shard_map).
    axis_index_groups: optional groups of that axis, as in ``lax.psum``.
    approximate: quantiles interpolated inside a small bracket found by one
      or two counting passes, instead of exactly (an opt-in for speed, with
      a stated error bound; see ``order_statistics``, Approximate mode).
    overflow_safe: averages that stay finite for finite values near the
      float32 limits (a little slower; see :meth:`average`). The functional
      core turns it off when the mean is paired with a mean-based deviation,
      whose sums (of squares, for std) must fit in float32 anyway; the mean
      itself is always overflow-safe.
    quantile_guess: ``{α: guess of q_α}`` (float32, ``channel_shape``), or
      None: where the selection of ``order_statistics.quantile(sample, α)``
      starts (warm start). Keys are matched as float32 levels. Only the
      number of counting passes depends on it, never the result: a NaN,
      ±inf or far-off guess costs passes (a non-finite one starts that
      channel cold). Under ``axis_name`` the devices' guesses are made
      identical inside the selection (see ``order_statistics``).
    spread_guess: ``channel_shape`` float32, or None: the data's spread (a
      standard deviation, >= 0), which sizes the first bracket around a
      guess (± 4 standard errors of the sample quantile). 0 suits a
      constant channel; NaN, ±inf or negative values (or None) mean
      "unknown": the exact mode then estimates it from a strided subsample,
      the approximate mode starts that channel from the data range.
  """

  def __init__(
    self,
    x: Array,
    axes: int | Sequence[int],
    *,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    force_float32_reductions: bool = True,
    approximate: bool = False,
    overflow_safe: bool = True,
    quantile_guess: Mapping[float, Array] | None = None,
    spread_guess: Array | None = None,
  ):
    x = jnp.asarray(x)
    if not isinstance(approximate, bool):
      raise ValueError(
        f"approximate must be True or False; got {approximate!r}"
      )
    if not isinstance(overflow_safe, bool):
      raise ValueError(
        f"overflow_safe must be True or False; got {overflow_safe!r}"
      )
    check_floating_input(x)
    check_axis_index_groups(axis_name, axis_index_groups)
    self.axes = canonicalize_axes(x.ndim, axes)
    self.x = x.astype(reduction_dtype(x.dtype, dtype, force_float32_reductions))
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)
      try:
        mask = jnp.broadcast_to(mask, x.shape)
      except ValueError:
        raise ValueError(
          f"mask of shape {mask.shape} does not broadcast to the input"
          f" shape {x.shape}"
        ) from None
    self.mask = mask
    if mask is not None:
      # Masked-out slots may hold padding (NaN, ±inf): zero them once, so no
      # term such as |x - μ|**p ever sees them -- the where-sums would drop
      # them in value, but 0 * inf = NaN would leak into the gradients.
      self.x = jnp.where(mask, self.x, jnp.zeros_like(self.x))
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    # Quantiles to a stated tolerance (order_statistics.approximate_quantile).
    self.approximate = approximate
    # Averages as Σ (f(x) / n), finite near the float32 limits (average).
    self.overflow_safe = overflow_safe
    self.channel_shape = tuple(
      d for i, d in enumerate(x.shape) if i not in self.axes
    )
    self.local_size = 1
    for a in self.axes:
      self.local_size *= x.shape[a]
    # Warm start of the selection (order_statistics.quantile): per-channel
    # float32 guesses, never differentiated.
    self.quantile_guess = _check_quantile_guess(
      quantile_guess, self.channel_shape
    )
    self.spread_guess = None
    if spread_guess is not None:
      self.spread_guess = _per_channel(
        spread_guess, self.channel_shape, "spread_guess"
      )
    self._memo: dict[Any, Any] = {}

  def guess_for(self, alpha: float) -> Array | None:
    """The guess of q_α (``quantile_guess`` matched as a float32 level)."""
    if not self.quantile_guess:
      return None
    return self.quantile_guess.get(level_key(alpha))

  # -- plumbing -------------------------------------------------------------

  def memo(self, key, compute):
    """``compute()`` once per key for this sample (trace-time memoisation)."""
    if key not in self._memo:
      self._memo[key] = compute()
    return self._memo[key]

  def expand(self, per_channel: Array) -> Array:
    """Reshape a per-channel array so it broadcasts against ``x``."""
    return jnp.expand_dims(per_channel, self.axes)

  def psum(self, v: Array) -> Array:
    if self.axis_name is None:
      return v
    return lax.psum(v, self.axis_name, axis_index_groups=self.axis_index_groups)

  def pmax(self, v: Array) -> Array:
    if self.axis_name is None:
      return v
    return _pmax(v, self.axis_name, _groups_key(self.axis_index_groups))

  def pmin(self, v: Array) -> Array:
    if self.axis_name is None:
      return v
    return -_pmax(-v, self.axis_name, _groups_key(self.axis_index_groups))

  # -- reductions -----------------------------------------------------------

  def sum(self, values: Array) -> Array:
    """Σ over the valid values of the channel (all devices)."""
    return self.psum(jnp.sum(values, self.axes, where=self.mask))

  def count(self) -> Array:
    """n, the number of valid values per channel (float32, all devices).

    Always float32 (exact up to 2**24), also when the reductions run in half
    precision: the quantile rank k = ceil(α n) needs n exactly, and bfloat16
    would round n = 1001 to 1000.
    """

    def compute():
      if self.mask is None:
        local = jnp.full(self.channel_shape, self.local_size, jnp.float32)
      else:
        local = jnp.sum(self.mask, self.axes, dtype=jnp.float32)
      return self.psum(local)

    return self.memo("count", compute)

  def safe_count(self) -> Array:
    """max(n, 1): divides sums so an empty channel gives 0, not NaN."""
    return jnp.maximum(self.count(), 1)

  def average(self, values) -> Array:
    """(1/n) Σ values over the valid values (0 for an empty channel).

    ``values`` is a function ``f(x)`` of the sample's values (elementwise,
    with per-channel constants) or an array of ``x``'s shape. With
    :attr:`overflow_safe` it is summed as Σ (f(x) / n), so the average of
    finite values never overflows, even near the float32 limits (Σ f(x) / n
    could). Without it, Σ f(x) / n: XLA:CPU writes a 1/n broadcast that
    several reductions share out as an x-sized buffer (seen in the compiled
    mean/std step, which measured 1.17-1.25x BN with it and 1.11-1.13x
    without; BENCHMARKS.md). 1/n is in the reduction dtype, so averages keep
    that dtype (as Flax). :meth:`mean` is always overflow-safe.
    """
    fn = values if callable(values) else (lambda _: values)
    if self.overflow_safe:
      return self._safe_average(fn)
    return self.sum(fn(self.x)) / self.safe_count().astype(self.x.dtype)

  def _safe_average(self, fn) -> Array:
    """Σ (f(x) / n): finite for finite values near the float32 limits."""
    if self.mask is None:
      return self.sum(fn(self.x) * self._inverse_count())
    inv_n = 1.0 / self.safe_count().astype(self.x.dtype)
    return self.sum(fn(self.x) * self.expand(inv_n))

  def _inverse_count(self) -> Array:
    """1/n as a scalar, without a mask (the same for every channel)."""
    if self.axis_name is None:
      inv = np.float32(1) / np.float32(max(self.local_size, 1))
      return jnp.asarray(inv, jnp.float32).astype(self.x.dtype)
    n = self.psum(jnp.float32(self.local_size))
    return (1.0 / jnp.maximum(n, 1.0)).astype(self.x.dtype)

  def mean(self) -> Array:
    """μ, the sample mean, (1/n) Σ x_i -- exact for a constant channel.

    In float32 a constant channel's Σ x_i / n can miss the constant by an
    ulp, and then D > 0 and the output is not β. Without a mask the mean is
    taken around a pivot, μ = r + (1/n) Σ (x_i - r) with r one of the
    channel's values (:meth:`pivot`): a constant channel gives r exactly, at
    no extra pass over the data. With a mask the valid values have no fixed
    position, so μ is kept inside [min, max] instead (:func:`clip_value`).
    Finite for finite data (summed as Σ (x / n), see :meth:`average`).
    """

    def compute():
      # Always summed as Σ (x / n), whatever :attr:`overflow_safe` says:
      # μ is finite for finite data in every configuration.
      if self.mask is None:
        r = self.pivot()
        # Σ (x - r) / (2n), doubled: the average exactly (power-of-two
        # scaling), but with a constant of its own -- XLA:CPU writes a 1/n
        # broadcast that several reductions share out as an x-sized buffer
        # (seen in the compiled step; one buffer fewer this way).
        half = 0.5 * self._inverse_count()
        return r + 2 * self.sum((self.x - self.expand(r)) * half)
      raw = self._safe_average(lambda x: x)
      return clip_value(raw, self.min(), self.max())

    return self.memo("mean", compute)

  def pivot(self) -> Array:
    """r: one value of each channel, the same on every device (no gradient).

    The first entry along the reduction axes (the largest of the devices'
    first entries under ``axis_name``): a slice, not a pass over the data.
    Only meaningful without a mask (a masked-out first entry is not a value).
    """

    def compute():
      index = tuple(
        0 if i in self.axes else slice(None) for i in range(self.x.ndim)
      )
      r = lax.stop_gradient(self.x[index])
      if self.axis_name is not None:
        r = lax.pmax(
          r, self.axis_name, axis_index_groups=self.axis_index_groups
        )
      return r

    return self.memo("pivot", compute)

  def max(self) -> Array:
    """Largest valid value (0 for an empty channel)."""

    def compute():
      m = jnp.max(self.x, self.axes, where=self.mask, initial=-jnp.inf)
      return self._empty_to_zero(self.pmax(m))

    return self.memo("max", compute)

  def min(self) -> Array:
    """Smallest valid value (0 for an empty channel)."""

    def compute():
      m = jnp.min(self.x, self.axes, where=self.mask, initial=jnp.inf)
      return self._empty_to_zero(self.pmin(m))

    return self.memo("min", compute)

  def _empty_to_zero(self, v: Array) -> Array:
    if self.mask is None:
      return v
    return jnp.where(self.count() > 0, v, jnp.zeros_like(v))
