"""The functional core: configuration checks, ``batch_statistics``, ``normalize``.

Pure functions of arrays and static settings; importing jax only, so they can
be called inside any ``jit``/``vmap``/``pmap``/``shard_map`` code. The Flax
modules are thin wrappers over these.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gbn_jax import catalogue
from gbn_jax.sample import (
    Sample,
    canonicalize_axes,
    check_axis_index_groups,
    check_floating_input,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Measures:
  """A checked choice of statistic and deviation with their parameters.

  Build it with :func:`make_measures`; every setting has been validated, so
  applying it cannot fail on configuration. Equal configurations compare and
  hash equal, so a ``Measures`` can be a static argument of ``jax.jit``.
  """

  statistic: str
  deviation: str
  statistic_fn: Callable[..., Array]
  deviation_fn: Callable[..., Array]
  statistic_kwargs: dict
  deviation_kwargs: dict
  scale: float  # Gaussian-consistency factor (1.0 when off)

  def _key(self):
    # The functions follow from the names; parameters are numbers or tuples.
    return (
        self.statistic,
        self.deviation,
        tuple(sorted(self.statistic_kwargs.items())),
        tuple(sorted(self.deviation_kwargs.items())),
        self.scale,
    )

  def __eq__(self, other):
    return isinstance(other, Measures) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @property
  def overflow_safe(self) -> bool:
    """Whether the sample's averages must stay finite near the float32 limits.

    True when an order-statistic measure is involved (docs/GUARANTEES.md:
    finite S and D for any |x| <= FLT_MAX / 2); the mean-based deviations
    need their sums (Σx² for std) to fit in float32 anyway, so with the mean
    they take the faster form (:meth:`gbn_jax.sample.Sample.average`; the
    mean itself is always overflow-safe).
    """
    return not (
        self.statistic in catalogue.MEAN_BASED_STATISTICS
        and self.deviation in catalogue.MEAN_BASED_DEVIATIONS
    )

  def __call__(self, sample: Sample) -> tuple[Array, Array]:
    center = self.statistic_fn(sample, **self.statistic_kwargs)
    dev = self.deviation_fn(sample, **self.deviation_kwargs)
    if self.scale != 1.0:
      dev = dev * self.scale
    return center, dev

  def center_and_dev_sq(self, sample: Sample) -> tuple[Array, Array]:
    """(S, D^2): what the transform uses. D^2 is taken directly where the
    catalogue has it (``std``: the variance, no square root in between)."""
    squared = catalogue.SQUARED_DEVIATIONS.get(self.deviation)
    if squared is None:
      center, dev = self(sample)
      return center, jnp.square(dev)
    center = self.statistic_fn(sample, **self.statistic_kwargs)
    dev_sq = squared(sample, **self.deviation_kwargs)
    return center, dev_sq * self.scale**2 if self.scale != 1.0 else dev_sq


def _names(registry) -> str:
  return ", ".join(repr(k) for k in sorted(registry))


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_level(value, name: str = "alpha") -> float:
  """A probability level in the open interval (0, 1), as a Python float."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a concrete number in (0, 1), not a traced value;"
        " pass it as a static argument"
    )
  if hasattr(value, "shape") and getattr(value, "shape", None) == ():
    value = value.item()  # numpy / jax scalars
  if not _is_real(value) or not (0.0 < float(value) < 1.0):
    raise ValueError(
        f"{name} must be a number in the open interval (0, 1); got {value!r}"
    )
  return float(value)


def check_epsilon(value) -> float:
  """epsilon, added to D^2: a finite number > 0 (0 would turn a constant
  channel into 0 * inf = NaN)."""
  if hasattr(value, "shape") and getattr(value, "shape", None) == ():
    value = value.item()
  if not _is_real(value) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"epsilon must be a finite number > 0; got {value!r}")
  return float(value)


def check_dtype(value, name: str = "dtype"):
  """None or a floating-point dtype (the reduction / output precision)."""
  if value is None:
    return None
  try:
    dt = jnp.dtype(value)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(
        f"{name} must be None or a floating-point dtype (e.g. jnp.float32,"
        f" jnp.bfloat16, jnp.float16); got {value!r}"
    )
  return dt


def check_bool(value, name: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False; got {value!r}")
  return bool(value)


def check_layer_fields(
    *,
    epsilon,
    momentum,
    dtype,
    param_dtype,
    flags: dict,
    initializers: dict,
    axis_name,
    axis_index_groups,
) -> None:
  """The checks shared by the linen and NNX modules' constructors.

  ``flags`` maps a field name to a value that must be a bool (None allowed
  for ``use_running_average``); ``initializers`` maps a name to a callable.
  """
  check_epsilon(epsilon)
  if not _is_real(momentum) or not 0.0 <= float(momentum) <= 1.0:
    raise ValueError(f"momentum must be a number in [0, 1]; got {momentum!r}")
  check_dtype(dtype, "dtype")
  if check_dtype(param_dtype, "param_dtype") is None:
    raise ValueError("param_dtype must be a floating-point dtype; got None")
  for name, value in flags.items():
    if not (name == "use_running_average" and value is None):
      check_bool(value, name)
  for name, init in initializers.items():
    if not callable(init):
      raise ValueError(
          f"{name} must be an initializer, f(key, shape, dtype); got {init!r}"
      )
  check_axis_index_groups(axis_name, axis_index_groups)


def check_p(value) -> float:
  if isinstance(value, jax.core.Tracer):
    raise TypeError("p must be a concrete number >= 1, not a traced value")
  if hasattr(value, "shape") and getattr(value, "shape", None) == ():
    value = value.item()
  if not _is_real(value) or not math.isfinite(value) or value < 1:
    raise ValueError(f"p must be a finite number >= 1; got {value!r}")
  return float(value)


def check_mixture(levels, weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Levels α_j in (0, 1) and weights λ_j >= 0 summing to 1 (None: equal)."""
  if levels is None or isinstance(levels, (str, bytes)) or not isinstance(
      levels, Sequence
  ) or len(levels) == 0:
    raise ValueError(
        "the mixed superquantile needs levels=(α_1, ..., α_m), a non-empty"
        f" sequence of numbers in (0, 1); got levels={levels!r}"
    )
  levels = tuple(check_level(a, f"levels[{i}]") for i, a in enumerate(levels))
  if weights is None:
    weights = (1.0 / len(levels),) * len(levels)
  if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
    raise ValueError(
        f"weights must be a sequence of {len(levels)} numbers >= 0 summing to"
        f" 1; got weights={weights!r}"
    )
  if len(weights) != len(levels):
    raise ValueError(
        f"weights must have one entry per level: {len(levels)} levels"
        f" {levels} but {len(weights)} weights {tuple(weights)}"
    )
  out = []
  for i, w in enumerate(weights):
    if hasattr(w, "shape") and getattr(w, "shape", None) == ():
      w = w.item()
    if not _is_real(w) or not math.isfinite(w) or w < 0:
      raise ValueError(f"weights[{i}] must be a finite number >= 0; got {w!r}")
    out.append(float(w))
  if abs(sum(out) - 1.0) > 1e-6:
    raise ValueError(
        f"weights must sum to 1; got {tuple(out)} (sum {sum(out)!r})"
    )
  return levels, tuple(out)


def _kwargs_for(fn: Callable, available: dict) -> dict:
  params = inspect.signature(fn).parameters
  return {k: v for k, v in available.items() if k in params}


def make_measures(
    statistic: str | None = None,
    deviation: str = "superquantile",
    *,
    alpha: float | None = 0.5,
    p: float = 2.0,
    levels: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    gaussian_consistent: bool = False,
    use_fast_variance: bool = False,
) -> Measures:
  """Validates a configuration and resolves names to catalogue functions.

  Raises ``ValueError`` naming the bad value and the valid choices for an
  unknown name, α outside (0, 1), p < 1, bad mixture levels or weights, or a
  statistic/deviation that needs an α when ``alpha`` is None.
  """
  if not isinstance(deviation, str) or deviation not in catalogue.DEVIATIONS:
    raise ValueError(
        f"unknown deviation {deviation!r}; valid choices:"
        f" {_names(catalogue.DEVIATIONS)}"
    )
  if statistic is None:
    statistic = catalogue.NATURAL_STATISTIC[deviation]
  if not isinstance(statistic, str) or statistic not in catalogue.STATISTICS:
    raise ValueError(
        f"unknown statistic {statistic!r}; valid choices:"
        f" {_names(catalogue.STATISTICS)} (or None for the deviation's"
        " natural statistic)"
    )
  if alpha is not None:
    alpha = check_level(alpha)
  for name, kind in ((statistic, "statistic"), (deviation, "deviation")):
    if name in ("quantile", "superquantile") and alpha is None:
      raise ValueError(
          f"{kind} {name!r} needs alpha, a number in the open interval"
          " (0, 1); got alpha=None"
      )
  p = check_p(p)
  mixed = "mixed" in statistic or "mixed" in deviation
  if mixed or levels is not None or weights is not None:
    levels, weights = check_mixture(levels, weights)
  check_bool(gaussian_consistent, "gaussian_consistent")
  check_bool(use_fast_variance, "use_fast_variance")
  available = dict(
      alpha=alpha,
      p=p,
      levels=levels,
      weights=weights,
      fast_variance=bool(use_fast_variance),
  )
  statistic_fn = catalogue.STATISTICS[statistic]
  deviation_fn = catalogue.DEVIATIONS[deviation]
  scale = 1.0
  if gaussian_consistent:
    scale = catalogue.gaussian_consistency_factor(
        deviation, alpha=alpha, p=p, levels=levels, weights=weights
    )
  return Measures(
      statistic=statistic,
      deviation=deviation,
      statistic_fn=statistic_fn,
      deviation_fn=deviation_fn,
      statistic_kwargs=_kwargs_for(statistic_fn, available),
      deviation_kwargs=_kwargs_for(deviation_fn, available),
      scale=scale,
  )


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
    levels, weights: levels α_j and weights λ_j (default equal) of the
      ``mixed_superquantile`` deviation / ``mixed_quantile`` statistic.
    gaussian_consistent: scale D so that it equals σ on normal data.
    mask: boolean array broadcastable to ``x``; True marks values that count.
    axis_name, axis_index_groups: pool the sample across devices (pmap /
      shard_map); not needed under ``jit`` with a sharded batch.
    use_fast_variance: ``std`` as max(0, E[x²] - μ²) in one pass, as Flax.
      Off by default here: in float32 that form loses the variance to
      cancellation when |μ| >> σ (a constant channel can get D > 0).
      ``GeneralizedBatchNorm`` keeps Flax's default (True) for parity.
    dtype, force_float32_reductions: reduction precision, as in Flax.
    approximate: quantiles from a strided subsample (faster, not exact; the
      superquantile is then evaluated exactly at that point). Off by default.

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
  )


def _hashable(v):
  """Lists (of lists) as tuples, so they can be static jit arguments."""
  if isinstance(v, (list, tuple)):
    return tuple(_hashable(e) for e in v)
  return v


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
) -> tuple[Array, Array]:
  """``measures`` of the :class:`Sample` of ``x``: (S, D), or (S, D²) if
  ``squared`` (what the normalization uses; see ``Measures.center_and_dev_sq``).

  The computation is a ``jax.jit`` with the configuration static, so a call
  outside any trace compiles once per shape and configuration (the selection
  engine's loops would otherwise be recompiled on every eager call); inside
  a user's ``jit``/``pmap``/``shard_map`` it is inlined as usual.
  """
  check_floating_input(x)
  check_axis_index_groups(axis_name, axis_index_groups)
  return _sample_statistics_jit(
      jnp.asarray(x),
      None if mask is None else jnp.asarray(mask),
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
        "measures", "axes", "axis_name", "axis_index_groups", "dtype",
        "force_float32_reductions", "approximate", "squared",
    ),
)
def _sample_statistics_jit(x, mask, *, measures, axes, axis_name,
                           axis_index_groups, dtype, force_float32_reductions,
                           approximate, squared):
  sample = Sample(
      x,
      axes,
      mask=mask,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      dtype=dtype,
      force_float32_reductions=force_float32_reductions,
      approximate=approximate,
      overflow_safe=measures.overflow_safe,
  )
  return measures.center_and_dev_sq(sample) if squared else measures(sample)


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

  ``center`` and ``dev_sq`` (= D^2) have ``x.shape`` without ``axes``;
  ``scale`` and ``bias`` broadcast against ``x``. Computed in the promoted
  dtype of the arguments (float32 for half-precision ``x`` and float32
  statistics), like ``flax.linen.BatchNorm``.
  """
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


MODES = ("batch", "online")
"""How the training forward pass gets S and D: from the batch alone
(``"batch"``, the paper's layer) or from running estimates that include the
batch (``"online"``, :mod:`gbn_jax.online`; meaningful at batch size 1)."""


def check_mode(mode) -> str:
  """``mode`` if it is one of :data:`MODES`, else ``ValueError`` naming them."""
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(
        f"unknown mode {mode!r}; valid choices: {', '.join(map(repr, MODES))}"
    )
  return mode
