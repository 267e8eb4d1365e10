"""Configuration: the checks of every setting, ``Measures`` and ``LayerConfig``.

One rule per field, applied once: :func:`make_measures` turns names and
parameters into a checked, hashable :class:`Measures` (via the records of
:mod:`gbn_jax.catalogue`); :func:`layer_config` does the same for a whole
layer (built once per distinct configuration, cached). A bad value raises a
``ValueError`` that names it and the valid choices, at set-up, never a NaN
later. Concrete JAX and NumPy scalars are accepted wherever a Python number
or bool is (config systems hand them over); traced values are not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import statistics as _pystats
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gbn_jax import catalogue
from gbn_jax.sample import Sample, check_axis_index_groups

Array = jax.Array

MODES = ("batch", "online")
"""How the training forward pass gets S and D: from the batch alone
(``"batch"``, the paper's layer) or from running estimates that include the
batch (``"online"``, :mod:`gbn_jax.online`; meaningful at batch size 1)."""

_DEFAULTS = dict(alpha=0.5, p=2.0, levels=None, weights=None)
"""The parameters' defaults: a different value that no measure of the
configuration reads is reported (a warning), the default is not."""


# --------------------------------------------------------------------------
# Scalars.
# --------------------------------------------------------------------------


def _concrete(value, name: str):
  """A 0-d NumPy/JAX array as a Python scalar; a traced value is an error."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
      f"{name} must be a concrete value, not a traced one; pass it as a"
      " static argument (it configures the computation)"
    )
  if (
    isinstance(value, (np.ndarray, np.generic, jax.Array))
    and np.ndim(value) == 0
  ):
    return value.item()
  return value


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _names(registry) -> str:
  return ", ".join(repr(k) for k in sorted(registry))


def check_bool(value, name: str, *, allow_int: bool = False) -> bool:
  """True/False, also as a NumPy/JAX 0-d bool; with ``allow_int`` also 0/1
  (``use_running_average``, which configs often pass as an integer flag)."""
  raw = value
  value = _concrete(value, name)
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if (
    allow_int
    and isinstance(value, numbers.Integral)
    and not isinstance(raw, str)
    and value in (0, 1)
  ):
    return bool(value)
  raise ValueError(f"{name} must be True or False; got {raw!r}")


def check_level(value, name: str = "alpha") -> float:
  """A probability level in the open interval (0, 1), as a Python float."""
  raw = value
  value = _concrete(value, name)
  if not _is_real(value) or not (0.0 < float(value) < 1.0):
    raise ValueError(
      f"{name} must be a number in the open interval (0, 1); got {raw!r}"
    )
  return float(value)


def check_epsilon(value) -> float:
  """epsilon, added to D^2: a finite number > 0 (0 would turn a constant
  channel into 0 * inf = NaN)."""
  raw = value
  value = _concrete(value, "epsilon")
  if not _is_real(value) or not math.isfinite(value) or value <= 0:
    raise ValueError(f"epsilon must be a finite number > 0; got {raw!r}")
  return float(value)


def check_p(value) -> float:
  """The exponent of ``lp``: a finite number >= 1."""
  raw = value
  value = _concrete(value, "p")
  if not _is_real(value) or not math.isfinite(value) or value < 1:
    raise ValueError(f"p must be a finite number >= 1; got {raw!r}")
  return float(value)


def check_momentum(value, mode: str = "batch") -> float:
  """The running averages' decay: in [0, 1] (batch mode) or [0, 1) (online
  mode, where it is the weight of the past in estimates that must move)."""
  raw = value
  value = _concrete(value, "momentum")
  top_ok = mode != "online"
  if (
    not _is_real(value)
    or not math.isfinite(value)
    or not (0.0 <= value <= 1.0)
    or (value == 1.0 and not top_ok)
  ):
    if top_ok:
      raise ValueError(f"momentum must be a number in [0, 1]; got {raw!r}")
    raise ValueError(
      "online mode needs momentum in [0, 1) (the weight of the past);"
      f" got {raw!r}"
    )
  return float(value)


def check_dtype(value, name: str = "dtype"):
  """None or a floating-point dtype (the reduction / output precision)."""
  if value is None:
    return None
  try:
    dt = jnp.dtype(value)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.inexact):
    raise ValueError(
      f"{name} must be None or a floating-point dtype (e.g. jnp.float32,"
      f" jnp.bfloat16, jnp.float16); got {value!r}"
    )
  return dt


def check_mode(mode) -> str:
  """``mode`` if it is one of :data:`MODES`, else ``ValueError`` naming them."""
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(
      f"unknown mode {mode!r}; valid choices: {', '.join(map(repr, MODES))}"
    )
  return mode


def check_mixture(
  levels, weights
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Levels α_j in (0, 1) and weights λ_j >= 0 summing to 1 (None: equal)."""
  if (
    levels is None
    or isinstance(levels, (str, bytes))
    or not isinstance(levels, Sequence)
    or len(levels) == 0
  ):
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
    w = _concrete(w, f"weights[{i}]")
    if not _is_real(w) or not math.isfinite(w) or w < 0:
      raise ValueError(f"weights[{i}] must be a finite number >= 0; got {w!r}")
    out.append(float(w))
  if abs(sum(out) - 1.0) > 1e-6:
    raise ValueError(
      f"weights must sum to 1; got {tuple(out)} (sum {sum(out)!r})"
    )
  return levels, tuple(out)


# --------------------------------------------------------------------------
# Measures: a checked statistic and deviation.
# --------------------------------------------------------------------------

_NORMAL = _pystats.NormalDist()


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
  def statistic_spec(self) -> catalogue.StatisticSpec:
    return catalogue.STATISTIC_SPECS[self.statistic]

  @property
  def deviation_spec(self) -> catalogue.DeviationSpec:
    return catalogue.DEVIATION_SPECS[self.deviation]

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
      self.statistic_spec.mean_based and self.deviation_spec.mean_based
    )

  @property
  def complex_ok(self) -> bool:
    """Whether both measures are defined on complex input."""
    return self.statistic_spec.complex_ok and self.deviation_spec.complex_ok

  def __call__(self, sample: Sample) -> tuple[Array, Array]:
    center = self.statistic_fn(sample, **self.statistic_kwargs)
    dev = self.deviation_fn(sample, **self.deviation_kwargs)
    if self.scale != 1.0:
      dev = dev * self.scale
    return center, dev

  def center_and_dev_sq(self, sample: Sample) -> tuple[Array, Array]:
    """(S, D^2): what the transform uses. D^2 is taken directly where the
    catalogue has it (``std``: the variance, no square root in between)."""
    squared = self.deviation_spec.squared
    if squared is None:
      center, dev = self(sample)
      return center, jnp.square(dev)
    center = self.statistic_fn(sample, **self.statistic_kwargs)
    dev_sq = squared(sample, **self.deviation_kwargs)
    return center, dev_sq * self.scale**2 if self.scale != 1.0 else dev_sq

  def selected_levels(self) -> tuple[float, ...]:
    """The quantile levels of x that S and D select (in a fixed order)."""
    levels = self.statistic_spec.levels(
      **self.statistic_kwargs
    ) + self.deviation_spec.levels(**self.deviation_kwargs)
    return tuple(dict.fromkeys(float(a) for a in levels))

  def quantile_guesses(
    self, center: Array, dev_sq: Array
  ) -> tuple[dict[float, Array], Array]:
    """Guesses of every selected quantile from previous (S, D^2) (warm start).

    Returns ``({α: guess of q_α}, spread)`` with spread = σ̂, the normal
    scale that D^2 implies (D divided by its Gaussian factor). q_α is placed
    where a normal fit puts it: S + σ̂ (Φ^-1(α) - Φ^-1(α_S)) with α_S the
    level of S (0.5 for a mean, median or midrange; a mix Σ λ_j q_{α_j}
    sits at Σ λ_j Φ^-1(α_j)). Only a starting point:
    the selection is exact whatever the guess.
    """
    factor = self.deviation_spec.gaussian_factor
    sigma = jnp.sqrt(jnp.maximum(dev_sq, 0.0)) / self.scale
    if factor is not None:
      params = {
        **dict(alpha=None, p=None, levels=None, weights=None),
        **self.deviation_kwargs,
      }
      sigma = sigma / factor(**params)
    # Where a normal fit puts S, in units of σ̂ from the fit's mean: Φ^-1 of
    # its level, or Σ_j λ_j Φ^-1(α_j) for a weighted mix of quantiles (a
    # base of 0 there put every level's guess tens of standard errors off).
    own = self.statistic_spec.levels(**self.statistic_kwargs)
    equal = (1.0 / len(own),) * len(own)
    weights = self.statistic_kwargs.get("weights") or equal
    base = sum(
      float(w) * _NORMAL.inv_cdf(a) for a, w in zip(own, weights, strict=True)
    )
    guesses = {
      a: center + sigma * (_NORMAL.inv_cdf(a) - base)
      for a in self.selected_levels()
    }
    return guesses, sigma


def _differs(value, default) -> bool:
  try:
    return bool(value != default)
  except Exception:  # an array-like: compare as a tuple
    return True


def _kwargs_for(params: tuple[str, ...], available: dict) -> dict:
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
  """Validates a configuration and resolves names to catalogue records.

  Raises ``ValueError`` naming the bad value and the valid choices for an
  unknown name, α outside (0, 1), p < 1, bad mixture levels or weights, or a
  statistic/deviation that needs an α when ``alpha`` is None. A parameter
  set to a non-default value that neither measure reads (``alpha=0.9`` with
  ``deviation="std"``) gives a ``UserWarning``.
  """
  specs = catalogue.DEVIATION_SPECS
  if not isinstance(deviation, str) or deviation not in specs:
    raise ValueError(
      f"unknown deviation {deviation!r}; valid choices: {_names(specs)}"
    )
  dev_spec = specs[deviation]
  if statistic is None:
    statistic = dev_spec.natural_statistic
  if (
    not isinstance(statistic, str) or statistic not in catalogue.STATISTIC_SPECS
  ):
    raise ValueError(
      f"unknown statistic {statistic!r}; valid choices:"
      f" {_names(catalogue.STATISTIC_SPECS)} (or None for the deviation's"
      " natural statistic)"
    )
  stat_spec = catalogue.STATISTIC_SPECS[statistic]
  raw = dict(alpha=alpha, p=p, levels=levels, weights=weights)
  if alpha is not None:
    alpha = check_level(alpha)
  for spec, kind in ((stat_spec, "statistic"), (dev_spec, "deviation")):
    if "alpha" in spec.params and alpha is None:
      raise ValueError(
        f"{kind} {spec.name!r} needs alpha, a number in the open interval"
        " (0, 1); got alpha=None"
      )
  p = check_p(p)
  uses = set(stat_spec.params) | set(dev_spec.params)
  if "levels" in uses or levels is not None or weights is not None:
    levels, weights = check_mixture(levels, weights)
  gaussian_consistent = check_bool(gaussian_consistent, "gaussian_consistent")
  use_fast_variance = check_bool(use_fast_variance, "use_fast_variance")
  given = dict(alpha=alpha, p=p, levels=levels, weights=weights)
  unused = [
    f"{k}={v!r}"
    for k, v in raw.items()
    if k not in uses and v is not None and _differs(v, _DEFAULTS[k])
  ]
  if unused:
    warnings.warn(
      f"{', '.join(unused)} is not used by statistic {statistic!r} with"
      f" deviation {deviation!r} (it is ignored); parameters are read by:"
      " alpha -- quantile, superquantile, abs_superquantile; p -- lp;"
      " levels/weights -- mixed_quantile, mixed_superquantile",
      UserWarning,
      stacklevel=3,
    )
  available = dict(given, fast_variance=use_fast_variance)
  scale = 1.0
  if gaussian_consistent:
    scale = catalogue.gaussian_consistency_factor(
      deviation, alpha=alpha, p=p, levels=levels, weights=weights
    )
  return Measures(
    statistic=statistic,
    deviation=deviation,
    statistic_fn=stat_spec.fn,
    deviation_fn=dev_spec.fn,
    statistic_kwargs=_kwargs_for(stat_spec.params, available),
    deviation_kwargs=_kwargs_for(dev_spec.params, available),
    scale=scale,
  )


# --------------------------------------------------------------------------
# A layer's configuration.
# --------------------------------------------------------------------------


def hashable(v):
  """Lists (of lists) as tuples, so they can be static jit arguments."""
  if isinstance(v, (list, tuple)):
    return tuple(hashable(e) for e in v)
  return v


@dataclasses.dataclass(frozen=True)
class LayerConfig:
  """The checked, hashable settings of one normalization layer.

  Built by :func:`layer_config` from a module's fields, once per distinct
  configuration; the shared layer step (:mod:`gbn_jax._layer`) reads only
  this. Being hashable, it is the static argument of the step's ``jit``.
  """

  measures: Measures
  mode: str
  momentum: float
  epsilon: float
  dtype: Any
  force_float32_reductions: bool
  approximate: bool
  axis_name: Any
  axis_index_groups: Any
  warm_start: bool = True


def layer_config(
  *,
  statistic=None,
  deviation="superquantile",
  alpha=0.5,
  p=2.0,
  levels=None,
  weights=None,
  gaussian_consistent=False,
  use_fast_variance=True,
  mode="batch",
  momentum=0.99,
  epsilon=1e-5,
  dtype=None,
  param_dtype=jnp.float32,
  force_float32_reductions=True,
  approximate=False,
  axis_name=None,
  axis_index_groups=None,
  flags: dict | None = None,
  initializers: dict | None = None,
  warm_start=True,
) -> LayerConfig:
  """Checks every field of a layer and returns its :class:`LayerConfig`.

  ``flags`` maps other boolean fields (``use_bias``, ...) to their values
  (``use_running_average`` may also be None); ``initializers`` maps a name
  to an initializer. Cached: a layer re-created on every call (linen) pays
  for the checks once per configuration.
  """
  check_axis_index_groups(axis_name, axis_index_groups)  # the user's value
  concrete = {
    "alpha": alpha,
    "p": p,
    "momentum": momentum,
    "epsilon": epsilon,
  }
  concrete = {
    k: (None if v is None else _concrete(v, k)) for k, v in concrete.items()
  }
  flags = {
    k: (
      v if v is None else check_bool(v, k, allow_int=k == "use_running_average")
    )
    for k, v in (flags or {}).items()
  }
  for name, init in (initializers or {}).items():
    if not callable(init):
      raise ValueError(
        f"{name} must be an initializer, f(key, shape, dtype); got {init!r}"
      )
  args = (
    statistic,
    deviation,
    concrete["alpha"],
    concrete["p"],
    hashable(levels),
    hashable(weights),
    gaussian_consistent,
    use_fast_variance,
    mode,
    concrete["momentum"],
    concrete["epsilon"],
    dtype,
    param_dtype,
    force_float32_reductions,
    approximate,
    hashable(axis_name),
    hashable(axis_index_groups),
    warm_start,
  )
  try:
    hash(args)
  except TypeError:  # e.g. a JAX array among the levels: checked uncached
    return _layer_config(*args)
  return _cached_layer_config(*args)


def _layer_config(
  statistic,
  deviation,
  alpha,
  p,
  levels,
  weights,
  gaussian_consistent,
  use_fast_variance,
  mode,
  momentum,
  epsilon,
  dtype,
  param_dtype,
  force_float32_reductions,
  approximate,
  axis_name,
  axis_index_groups,
  warm_start,
) -> LayerConfig:
  mode = check_mode(mode)
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
  if mode == "online":
    from gbn_jax import online  # noqa: PLC0415  (online imports this module)

    online.check_online(measures)
  momentum = check_momentum(momentum, mode)
  epsilon = check_epsilon(epsilon)
  dtype = check_dtype(dtype, "dtype")
  if check_dtype(param_dtype, "param_dtype") is None:
    raise ValueError("param_dtype must be a floating-point dtype; got None")
  check_axis_index_groups(axis_name, axis_index_groups)
  return LayerConfig(
    measures=measures,
    mode=mode,
    momentum=momentum,
    epsilon=epsilon,
    dtype=dtype,
    force_float32_reductions=check_bool(
      force_float32_reductions, "force_float32_reductions"
    ),
    approximate=check_bool(approximate, "approximate"),
    axis_name=hashable(axis_name),
    axis_index_groups=hashable(axis_index_groups),
    warm_start=check_bool(warm_start, "warm_start"),
  )


_cached_layer_config = functools.lru_cache(maxsize=256)(_layer_config)
