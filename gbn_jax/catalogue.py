"""The catalogue: statistics S and generalized deviation measures D.

docs/SPEC.md §2 is the contract. Each measure is a small pure function of a
:class:`~gbn_jax.sample.Sample` returning one value per channel (keyword-only
arguments are its parameters), and *one record* (:class:`StatisticSpec`,
:class:`DeviationSpec`) holds everything else the library knows about it:
its parameters, natural statistic, squared form, Gaussian-consistency
factor, whether it is mean-based, its online form and whether it is defined
on complex input. The registries :data:`STATISTICS`, :data:`DEVIATIONS`,
:data:`NATURAL_STATISTIC`, ... are views of the records; adding a measure is
one function, one record and its oracle test (CONTRIBUTING.md). Notation: n
valid values x_1..x_n of a channel, x_(1) <= ... <= x_(n), μ the mean, [t]_+ =
max(t, 0), q_α = x_(k) with k = ceil(α n) clipped to [1, n]. Every deviation D
comes with its natural statistic, the argmin of the error measure E it is built
from (D(X) = min_c E(X - c), S(X) = argmin_c E(X - c));
:data:`NATURAL_STATISTIC` names it. Any statistic may be combined with any
deviation. Gradients at degenerate points (a constant channel, where a root of
zero has an infinite derivative) are taken as 0 through a "double where", so a
constant channel never produces a NaN gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics as _pystats
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from gbn_jax import order_statistics
from gbn_jax.sample import Sample, clip_value

Array = jax.Array


def _safe_root(m: Array, power: float) -> Array:
  """m ** power for m >= 0, with gradient 0 (not inf/NaN) at m = 0.

  NaN stays NaN (m * 0): a NaN channel must not come out with D = 0.
  """
  positive = m > 0
  safe = jnp.where(positive, m, jnp.ones_like(m))
  return jnp.where(positive, safe**power, m * 0)


# --------------------------------------------------------------------------
# Statistics (centering).
# --------------------------------------------------------------------------


def mean(sample: Sample) -> Array:
  """μ = (1/n) Σ x_i."""
  return sample.mean()


def quantile(sample: Sample, *, alpha: float) -> Array:
  """q_α = x_(k), k = ceil(α n) clipped to [1, n] (numpy "inverted_cdf")."""
  return order_statistics.quantile(sample, alpha)


def median(sample: Sample) -> Array:
  """q_0.5, the lower median: x_(k) with k = ceil(n / 2)."""
  return order_statistics.quantile(sample, 0.5)


def midrange(sample: Sample) -> Array:
  """(max_i x_i + min_i x_i) / 2.

  Computed as max/2 + min/2 (no overflow near the float32 limits) and kept
  in [min, max] (exact for a constant channel, subnormals included).
  """
  lo, hi = sample.min(), sample.max()
  return clip_value(hi / 2 + lo / 2, lo, hi)


def mixed_quantile(
  sample: Sample, *, levels: Sequence[float], weights: Sequence[float]
) -> Array:
  """Σ_j λ_j q_{α_j}: natural statistic of the mixed superquantile deviation.

  Kept in [min_j q_{α_j}, max_j q_{α_j}] (the weights sum to 1 only within
  rounding; a constant channel must get its constant exactly).
  """
  qs = [order_statistics.quantile(sample, a) for a in levels]
  raw = functools.reduce(
    jnp.add, [w * q for q, w in zip(qs, weights, strict=True)]
  )
  return clip_value(
    raw, functools.reduce(jnp.minimum, qs), functools.reduce(jnp.maximum, qs)
  )


# --------------------------------------------------------------------------
# Deviations (scale).
# --------------------------------------------------------------------------


def std(sample: Sample, *, fast_variance: bool = False) -> Array:
  """σ = sqrt((1/n) Σ (x_i - μ)^2).

  With ``fast_variance`` the variance is max(0, (1/n) Σ x_i^2 - μ^2), one
  fused pass, as ``flax.linen.BatchNorm(use_fast_variance=True)`` computes it.
  """
  return _safe_root(variance(sample, fast_variance=fast_variance), 0.5)


def variance(sample: Sample, *, fast_variance: bool = False) -> Array:
  """σ^2, the square of :func:`std` (what batch norm keeps as ``var``)."""

  def compute():
    mu = sample.mean()
    if sample.mask is None:
      # Around the pivot r (a value of the channel, see Sample.mean): a
      # constant channel gives 0 - 0 = 0 exactly in both forms, and the
      # one-pass form loses less to cancellation than E[x²] - μ².
      r = sample.expand(sample.pivot())
      if fast_variance:
        raw = sample.average(lambda x: jnp.square(x - r)) - jnp.square(
          mu - sample.pivot()
        )
      else:
        mu_e = sample.expand(mu)
        raw = sample.average(lambda x: jnp.square(x - mu_e))
      return clip_value(raw, 0.0, jnp.inf)
    mu_e = sample.expand(mu)
    if fast_variance:
      raw = sample.average(jnp.square) - mu**2
    else:
      raw = sample.average(lambda x: jnp.square(x - mu_e))
    # 0 <= σ^2 <= (half range)^2 (Popoviciu): exact in real arithmetic, so
    # the clip only removes rounding -- E[x²] - μ² of a constant is 0 exactly.
    return clip_value(raw, 0.0, jnp.square(half_range(sample)))

  return sample.memo(("variance", fast_variance), compute)


def mean_abs(sample: Sample) -> Array:
  """(1/n) Σ |x_i - μ| (the L1 batch norm of Hoffer et al.)."""
  mu = sample.expand(sample.mean())
  return sample.average(lambda x: jnp.abs(x - mu))


def lp(sample: Sample, *, p: float) -> Array:
  """((1/n) Σ |x_i - μ|^p)^(1/p), p >= 1."""
  mu = sample.expand(sample.mean())
  return _safe_root(sample.average(lambda x: jnp.abs(x - mu) ** p), 1.0 / p)


def upper_semi(sample: Sample) -> Array:
  """sqrt((1/n) Σ [x_i - μ]_+^2), the upper semideviation."""
  mu = sample.expand(sample.mean())
  return _safe_root(
    sample.average(lambda x: jnp.square(jnp.maximum(x - mu, 0.0))), 0.5
  )


def lower_semi(sample: Sample) -> Array:
  """sqrt((1/n) Σ [μ - x_i]_+^2), the lower semideviation."""
  mu = sample.expand(sample.mean())
  return _safe_root(
    sample.average(lambda x: jnp.square(jnp.maximum(mu - x, 0.0))), 0.5
  )


def median_abs(sample: Sample) -> Array:
  """(1/n) Σ |x_i - q_0.5|, the mean absolute deviation from the median."""
  q = order_statistics.quantile(sample, 0.5)
  q = sample.expand(q)
  return sample.average(lambda x: jnp.abs(x - q))


def superquantile_value(sample: Sample, alpha: float) -> Array:
  """q̄_α = q_α + (1/((1-α) n)) Σ [x_i - q_α]_+, the exact empirical CVaR.

  Equal to the L-estimator (1/((1-α) n)) [(k - α n) x_(k) + Σ_{i>k} x_(i)]
  for every α; its gradient is 1/((1-α) n) above q_α and
  (k - α n)/((1-α) n) at q_α (docs/SPEC.md §3) -- the gradient of q_α
  itself flows through the first term, so it must not be treated as a
  constant here.
  """

  def compute():
    q = order_statistics.quantile(sample, alpha)
    # [x - q]_+ as a select, not jnp.maximum: its derivative is then a plain
    # compare that XLA recomputes inside the backward fusions, where
    # maximum's (0.5 at x == q) was materialized as an extra x-sized buffer
    # (compiled memory, BENCHMARKS.md). Either tie convention gives the §3
    # gradient, the q-term cancels the tie share. A NaN x still gives NaN.
    # (A maximum with a select derivative measured no faster and used more
    # memory: BENCHMARKS.md.)
    qe = sample.expand(q)

    def excess(x):
      xq = x - qe
      return jnp.where(xq <= 0.0, jnp.zeros_like(xq), xq)

    # average, then / (1 - α): finite as q̄_α - q_α <= max - q_α is.
    tail = sample.average(excess) / (1.0 - jnp.float32(alpha))
    return q + tail

  return sample.memo(("superquantile", float(alpha)), compute)


def superquantile(sample: Sample, *, alpha: float) -> Array:
  """q̄_α - μ, the superquantile (CVaR) deviation; natural statistic q_α.

  q̄_α = q_α + (1/((1-α) n)) Σ [x_i - q_α]_+ (see :func:`superquantile_value`).
  """
  return _nonnegative(superquantile_value(sample, alpha) - sample.mean())


def _nonnegative(d: Array) -> Array:
  # q̄_α >= μ exactly, but in float32 the rounded mean of a (near-)constant
  # channel can exceed q̄_α by an ulp; a deviation is never negative.
  return clip_value(d, jnp.zeros_like(d), jnp.full_like(d, jnp.inf))


def half_range(sample: Sample) -> Array:
  """(max_i x_i - min_i x_i) / 2; natural statistic the midrange.

  Computed as max/2 - min/2: finite for any finite float32 values.
  """
  return sample.max() / 2 - sample.min() / 2


def mixed_superquantile(
  sample: Sample, *, levels: Sequence[float], weights: Sequence[float]
) -> Array:
  """Σ_j λ_j (q̄_{α_j} - μ), λ_j >= 0, Σ λ_j = 1.

  Natural statistic: Σ_j λ_j q_{α_j}.
  """
  mu = sample.mean()
  return functools.reduce(
    jnp.add,
    [
      w * _nonnegative(superquantile_value(sample, a) - mu)
      for a, w in zip(levels, weights, strict=True)
    ],
  )


def abs_superquantile(sample: Sample, *, alpha: float) -> Array:
  """q̄_α(|X - μ|): the mean of the largest (1-α) fraction of |x_i - μ|.

  The superquantile (CVaR) of the absolute deviations from the mean -- the
  robust "top-k L∞" batch norm of Hoffer et al. ("Norm matters", 2018);
  α -> 0 gives ``mean_abs``, α -> 1 the largest |x_i - μ|. Natural
  statistic: the mean (by convention; it is a deviation measure -- D(X + c)
  = D(X), D(λX) = λ D(X), subadditive, > 0 off constants -- but not one of
  a risk-quadrangle pair, so no statistic minimises an error it comes from).
  Exact: q_α of |x - μ| is selected by counting like every order statistic.
  """

  def compute():
    mu = sample.expand(sample.mean())
    # The sample of |x - μ| (same mask, devices and precision); its q̄_α is
    # differentiated through |x - μ|, μ included.
    deviations = Sample(
      jnp.abs(sample.x - mu),
      sample.axes,
      mask=sample.mask,
      axis_name=sample.axis_name,
      axis_index_groups=sample.axis_index_groups,
      dtype=sample.x.dtype,
      force_float32_reductions=False,
      approximate=sample.approximate,
      overflow_safe=sample.overflow_safe,
    )
    return _nonnegative(superquantile_value(deviations, alpha))

  return sample.memo(("abs_superquantile", float(alpha)), compute)


# --------------------------------------------------------------------------
# Online forms (used by gbn_jax.online; the update rules are documented there).
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OnlineStatistic:
  """Online estimate of a statistic: the trackers it reads and its value."""

  needs: Callable[
    ..., tuple
  ]  # (**params) -> ("mu" | "extremes" | level α, ...)
  value: Callable[..., Array]  # (trackers, **params) -> S


@dataclasses.dataclass(frozen=True)
class OnlineDeviation:
  """Online estimate of a deviation: trackers, per-value moment φ, D^2 from m.

  ``needs`` may name ``("abs", α)``: the level-α quantile of |x - μ|.
  """

  needs: Callable[..., tuple]
  moment: Callable[..., Array] | None  # (x, expanded trackers, **params) -> φ
  dev_sq: Callable[..., Array]  # (running moment m, trackers, **params) -> D^2


def superquantile_moment(x: Array, q: Array, alpha: float) -> Array:
  """α/(1-α) [x - q]_+ + [q - x]_+ = q + [x - q]_+/(1-α) - x.

  The Rockafellar–Uryasev form of q̄_α - x per value: its mean over X is
  q̄_α - μ at q = q_α and larger at any other q (second-order in q - q_α).
  """
  return alpha / (1.0 - alpha) * jnp.maximum(x - q, 0.0) + jnp.maximum(
    q - x, 0.0
  )


def _square(m, *_, **__):
  return jnp.square(m)


def _identity(m, *_, **__):
  return m


def _mean_needs(**_):
  return ("mu",)


# --------------------------------------------------------------------------
# Gaussian-consistent scaling: the factor c with c * D = σ on normal data.
# --------------------------------------------------------------------------

_NORMAL = _pystats.NormalDist()


def _superquantile_factor(alpha: float) -> float:
  # On N(μ, σ^2): q̄_α - μ = σ φ(Φ^-1(α)) / (1 - α).
  return _NORMAL.pdf(_NORMAL.inv_cdf(alpha)) / (1.0 - alpha)


def _abs_superquantile_factor(alpha: float) -> float:
  # |X - μ| is half-normal: q_α = σ z, z = Φ^-1((1 + α)/2), and the mean of
  # its upper (1 - α) tail is σ 2 φ(z) / (1 - α).
  z = _NORMAL.inv_cdf((1.0 + alpha) / 2.0)
  return 2.0 * _NORMAL.pdf(z) / (1.0 - alpha)


def _lp_factor(p: float) -> float:
  # E|Z|^p = 2^(p/2) Γ((p+1)/2) / sqrt(π) for Z ~ N(0, 1).
  return (2 ** (p / 2) * math.gamma((p + 1) / 2) / math.sqrt(math.pi)) ** (
    1.0 / p
  )


# --------------------------------------------------------------------------
# The records.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatisticSpec:
  """Everything the library knows about a statistic S.

  Attributes:
    name: the registry name.
    fn: ``fn(sample, **params) -> S`` per channel.
    params: the parameter names ``fn`` takes (of ``alpha``, ``levels``,
      ``weights``).
    levels: ``levels(**params)``: the quantile levels S selects (used to
      start the selection from the running statistics).
    mean_based: S is the mean (sums only, no order statistics).
    online: its online estimate (None: online mode is not available).
    complex_ok: defined on complex input.
  """

  name: str
  fn: Callable[..., Array]
  params: tuple[str, ...] = ()
  levels: Callable[..., tuple[float, ...]] = lambda **_: ()
  mean_based: bool = False
  online: OnlineStatistic | None = None
  complex_ok: bool = False


@dataclasses.dataclass(frozen=True)
class DeviationSpec:
  """Everything the library knows about a deviation measure D.

  Attributes:
    name: the registry name.
    fn: ``fn(sample, **params) -> D`` per channel.
    natural_statistic: the name of S = argmin_c E(X - c) for the error
      measure E that D comes from (the statistic used when none is given).
    params: the parameter names ``fn`` takes (of ``alpha``, ``p``,
      ``levels``, ``weights``, ``fast_variance``).
    levels: ``levels(**params)``: the quantile levels of x that D selects
      (used to start the selection from the running statistics).
    squared: ``squared(sample, **params) -> D^2`` where D^2 has a form of
      its own (None: D^2 = square(fn)).
    gaussian_factor: ``gaussian_factor(**params) -> E[D] / σ`` on normal
      data (its inverse makes D Gaussian-consistent); None where D has no
      such constant.
    mean_based: D is built from sums of powers of x - μ (accurate only
      while those sums fit in float32, docs/GUARANTEES.md).
    online: its online estimate (None: online mode is not available).
    complex_ok: defined on complex input (following ``nn.BatchNorm``: |x - μ|).
  """

  name: str
  fn: Callable[..., Array]
  natural_statistic: str
  params: tuple[str, ...] = ()
  levels: Callable[..., tuple[float, ...]] = lambda **_: ()
  squared: Callable[..., Array] | None = None
  gaussian_factor: Callable[..., float] | None = None
  mean_based: bool = False
  online: OnlineDeviation | None = None
  complex_ok: bool = False


_MIXED = ("levels", "weights")

STATISTIC_SPECS: dict[str, StatisticSpec] = {
  s.name: s
  for s in (
    StatisticSpec(
      "mean",
      mean,
      mean_based=True,
      online=OnlineStatistic(_mean_needs, lambda t, **_: t.mu),
      complex_ok=True,
    ),
    StatisticSpec(
      "median",
      median,
      levels=lambda **_: (0.5,),
      online=OnlineStatistic(
        lambda **_: (0.5,), lambda t, **_: t.quantiles[0.5]
      ),
    ),
    StatisticSpec(
      "quantile",
      quantile,
      params=("alpha",),
      levels=lambda *, alpha, **_: (float(alpha),),
      online=OnlineStatistic(
        lambda *, alpha, **_: (float(alpha),),
        lambda t, *, alpha, **_: t.quantiles[float(alpha)],
      ),
    ),
    StatisticSpec(
      "midrange",
      midrange,
      online=OnlineStatistic(
        lambda **_: ("extremes",), lambda t, **_: (t.max + t.min) / 2
      ),
    ),
    StatisticSpec(
      "mixed_quantile",
      mixed_quantile,
      params=_MIXED,
      levels=lambda *, levels, **_: tuple(float(a) for a in levels),
      online=OnlineStatistic(
        lambda *, levels, **_: tuple(float(a) for a in levels),
        lambda t, *, levels, weights, **_: sum(
          w * t.quantiles[float(a)]
          for a, w in zip(levels, weights, strict=True)
        ),
      ),
    ),
  )
}
"""Statistic name -> its record (the single source of the registries)."""

DEVIATION_SPECS: dict[str, DeviationSpec] = {
  d.name: d
  for d in (
    DeviationSpec(
      "std",
      std,
      "mean",
      params=("fast_variance",),
      squared=variance,
      gaussian_factor=lambda **_: 1.0,
      mean_based=True,
      online=OnlineDeviation(
        _mean_needs, lambda x, t, **_: jnp.square(x - t.mu), _identity
      ),
      complex_ok=True,
    ),
    DeviationSpec(
      "mean_abs",
      mean_abs,
      "mean",
      gaussian_factor=lambda **_: math.sqrt(2 / math.pi),
      mean_based=True,
      online=OnlineDeviation(
        _mean_needs, lambda x, t, **_: jnp.abs(x - t.mu), _square
      ),
      complex_ok=True,
    ),
    DeviationSpec(
      "lp",
      lp,
      "mean",
      params=("p",),
      gaussian_factor=lambda *, p, **_: _lp_factor(p),
      mean_based=True,
      online=OnlineDeviation(
        _mean_needs,
        lambda x, t, *, p, **_: jnp.abs(x - t.mu) ** p,
        lambda m, t, *, p, **_: _safe_root(m, 2.0 / p),
      ),
      complex_ok=True,
    ),
    DeviationSpec(
      "upper_semi",
      upper_semi,
      "mean",
      gaussian_factor=lambda **_: math.sqrt(0.5),
      mean_based=True,
      online=OnlineDeviation(
        _mean_needs,
        lambda x, t, **_: jnp.square(jnp.maximum(x - t.mu, 0.0)),
        _identity,
      ),
    ),
    DeviationSpec(
      "lower_semi",
      lower_semi,
      "mean",
      gaussian_factor=lambda **_: math.sqrt(0.5),
      mean_based=True,
      online=OnlineDeviation(
        _mean_needs,
        lambda x, t, **_: jnp.square(jnp.maximum(t.mu - x, 0.0)),
        _identity,
      ),
    ),
    DeviationSpec(
      "median_abs",
      median_abs,
      "median",
      levels=lambda **_: (0.5,),
      gaussian_factor=lambda **_: math.sqrt(2 / math.pi),
      online=OnlineDeviation(
        lambda **_: (0.5,),
        lambda x, t, **_: jnp.abs(x - t.quantiles[0.5]),
        _square,
      ),
    ),
    DeviationSpec(
      "superquantile",
      superquantile,
      "quantile",
      params=("alpha",),
      levels=lambda *, alpha, **_: (float(alpha),),
      gaussian_factor=lambda *, alpha, **_: _superquantile_factor(alpha),
      online=OnlineDeviation(
        lambda *, alpha, **_: (float(alpha),),
        lambda x, t, *, alpha, **_: superquantile_moment(
          x, t.quantiles[float(alpha)], float(alpha)
        ),
        _square,
      ),
    ),
    DeviationSpec(
      "half_range",
      half_range,
      "midrange",
      online=OnlineDeviation(
        lambda **_: ("extremes",),
        None,
        lambda m, t, **_: jnp.square((t.max - t.min) / 2),
      ),
    ),
    DeviationSpec(
      "mixed_superquantile",
      mixed_superquantile,
      "mixed_quantile",
      params=_MIXED,
      levels=lambda *, levels, **_: tuple(float(a) for a in levels),
      gaussian_factor=lambda *, levels, weights, **_: sum(
        w * _superquantile_factor(a)
        for a, w in zip(levels, weights, strict=True)
      ),
      online=OnlineDeviation(
        lambda *, levels, **_: tuple(float(a) for a in levels),
        lambda x, t, *, levels, weights, **_: sum(
          w * superquantile_moment(x, t.quantiles[float(a)], float(a))
          for a, w in zip(levels, weights, strict=True)
        ),
        _square,
      ),
    ),
    DeviationSpec(
      "abs_superquantile",
      abs_superquantile,
      "mean",
      params=("alpha",),
      gaussian_factor=lambda *, alpha, **_: _abs_superquantile_factor(alpha),
      # q̄_α(|X - μ|) in the Rockafellar–Uryasev form, around the
      # tracked quantile c of |x - μ|: m = mean of c + [|x - μ| - c]_+
      # /(1 - α), = q̄_α(|X - μ|) at c = q_α(|X - μ|).
      online=OnlineDeviation(
        lambda *, alpha, **_: ("mu", ("abs", float(alpha))),
        lambda x, t, *, alpha, **_: (
          t.abs_quantiles[float(alpha)]
          + jnp.maximum(jnp.abs(x - t.mu) - t.abs_quantiles[float(alpha)], 0.0)
          / (1.0 - float(alpha))
        ),
        _square,
      ),
    ),
  )
}
"""Deviation name -> its record (the single source of the registries)."""

# -- Views of the records (the public registries). --------------------------

STATISTICS: dict[str, Callable[..., Array]] = {
  n: s.fn for n, s in STATISTIC_SPECS.items()
}
"""Statistic name -> pure function ``f(sample, **params) -> per-channel S``."""

DEVIATIONS: dict[str, Callable[..., Array]] = {
  n: d.fn for n, d in DEVIATION_SPECS.items()
}
"""Deviation name -> pure function ``f(sample, **params) -> per-channel D``."""

NATURAL_STATISTIC: dict[str, str] = {
  n: d.natural_statistic for n, d in DEVIATION_SPECS.items()
}
"""Deviation name -> name of its natural statistic (the argmin of its error)."""

SQUARED_DEVIATIONS: dict[str, Callable[..., Array]] = {
  n: d.squared for n, d in DEVIATION_SPECS.items() if d.squared is not None
}
"""Deviations whose square has a form of its own (used for D^2 directly)."""

MEAN_BASED_STATISTICS = frozenset(
  n for n, s in STATISTIC_SPECS.items() if s.mean_based
)
MEAN_BASED_DEVIATIONS = frozenset(
  n for n, d in DEVIATION_SPECS.items() if d.mean_based
)
"""Measures built from sums of powers of x - μ: accurate only while those
sums fit in float32 (docs/GUARANTEES.md), so a configuration made only of
them sums then divides (``Sample(overflow_safe=False)``; μ stays safe)."""


def gaussian_consistency_factor(
  deviation: str,
  *,
  alpha: float | None = None,
  p: float | None = None,
  levels: Sequence[float] | None = None,
  weights: Sequence[float] | None = None,
) -> float:
  """The constant c with c * D(X) = σ for X ~ N(μ, σ^2) (docs/SPEC.md §2).

  ``mean_abs``, ``median_abs``: sqrt(π/2); ``superquantile``:
  (1-α)/φ(Φ^-1(α)); ``mixed_superquantile``: 1 / Σ_j λ_j φ(Φ^-1(α_j))/(1-α_j);
  ``abs_superquantile``: (1-α)/(2 φ(Φ^-1((1+α)/2))); ``upper_semi``,
  ``lower_semi``: sqrt(2); ``lp``: (E|Z|^p)^(-1/p) with E|Z|^p = 2^(p/2)
  Γ((p+1)/2) / sqrt(π); ``std``: 1. ``half_range`` has no such constant (the
  range of normal data grows with n): ``ValueError``.
  """
  spec = DEVIATION_SPECS.get(deviation)
  if spec is None or spec.gaussian_factor is None:
    valid = sorted(
      n for n, d in DEVIATION_SPECS.items() if d.gaussian_factor is not None
    )
    raise ValueError(
      f"gaussian_consistent=True has no constant for deviation {deviation!r}"
      f" (its value on normal data depends on n); it is defined for {valid}"
    )
  params = dict(alpha=alpha, p=p, levels=levels, weights=weights)
  return 1.0 / spec.gaussian_factor(**params)
