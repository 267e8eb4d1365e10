"""The catalogue: statistics S and generalized deviation measures D (SPEC §2).

Each entry is a small pure function of a :class:`~gbn_jax.sample.Sample`
returning one value per channel; keyword-only arguments are the measure's
parameters. Notation: n valid values x_1..x_n of a channel,
x_(1) <= ... <= x_(n), μ the mean, [t]_+ = max(t, 0), q_α = x_(k) with
k = ceil(α n) clipped to [1, n].

Every deviation D comes with its natural statistic, the argmin of the error
measure E it is built from (D(X) = min_c E(X - c), S(X) = argmin_c E(X - c));
:data:`NATURAL_STATISTIC` names it. Any statistic may be combined with any
deviation.

Gradients at degenerate points (a constant channel, where a root of zero has
an infinite derivative) are taken as 0 through a "double where", so a constant
channel never produces a NaN gradient.
"""

from __future__ import annotations

import functools
import math
import statistics as _pystats
from collections.abc import Sequence

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
  raw = sum(w * q for q, w in zip(qs, weights))
  return clip_value(raw, functools.reduce(jnp.minimum, qs),
                    functools.reduce(jnp.maximum, qs))


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
        raw = (sample.average(lambda x: jnp.square(x - r))
               - jnp.square(mu - sample.pivot()))
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
  return _safe_root(
      sample.average(lambda x: jnp.abs(x - mu) ** p),
      1.0 / p)


def upper_semi(sample: Sample) -> Array:
  """sqrt((1/n) Σ [x_i - μ]_+^2), the upper semideviation."""
  mu = sample.expand(sample.mean())
  return _safe_root(
      sample.average(lambda x: jnp.square(jnp.maximum(x - mu, 0.0))), 0.5)


def lower_semi(sample: Sample) -> Array:
  """sqrt((1/n) Σ [μ - x_i]_+^2), the lower semideviation."""
  mu = sample.expand(sample.mean())
  return _safe_root(
      sample.average(lambda x: jnp.square(jnp.maximum(mu - x, 0.0))), 0.5)


def median_abs(sample: Sample) -> Array:
  """(1/n) Σ |x_i - q_0.5|, the mean absolute deviation from the median."""
  q = order_statistics.quantile(sample, 0.5)
  q = sample.expand(q)
  return sample.average(lambda x: jnp.abs(x - q))


def superquantile_value(sample: Sample, alpha: float) -> Array:
  """q̄_α = q_α + (1/((1-α) n)) Σ [x_i - q_α]_+, the exact empirical CVaR.

  Equal to the L-estimator (1/((1-α) n)) [(k - α n) x_(k) + Σ_{i>k} x_(i)]
  for every α; its gradient is 1/((1-α) n) above q_α and
  (k - α n)/((1-α) n) at q_α (SPEC §3) -- the gradient of q_α itself flows
  through the first term, so it must not be treated as a constant here.
  """

  def compute():
    q = order_statistics.quantile(sample, alpha)
    # [x - q]_+ as a select, not jnp.maximum: its derivative is then a plain
    # compare that XLA recomputes inside the backward fusions, where
    # maximum's (0.5 at x == q) was materialized as an extra x-sized buffer
    # (measured: compiled memory). Either tie convention gives the SPEC §3
    # gradient, the q-term cancels the tie share. A NaN x still gives NaN.
    # (A maximum with a select derivative (custom_jvp) measured the same
    # time and more memory for the mixed superquantile: 2.0x vs 1.67x BN.)
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
  return clip_value(d, 0.0, jnp.inf)


def half_range(sample: Sample) -> Array:
  """(max_i x_i - min_i x_i) / 2; natural statistic the midrange.

  Computed as max/2 - min/2: finite for any finite float32 values.
  """
  return sample.max() / 2 - sample.min() / 2


def mixed_superquantile(
    sample: Sample, *, levels: Sequence[float], weights: Sequence[float]
) -> Array:
  """Σ_j λ_j (q̄_{α_j} - μ), λ_j >= 0, Σ λ_j = 1; natural statistic Σ λ_j q_{α_j}."""
  mu = sample.mean()
  return sum(
      w * _nonnegative(superquantile_value(sample, a) - mu)
      for a, w in zip(levels, weights)
  )


# --------------------------------------------------------------------------
# Registries.
# --------------------------------------------------------------------------

MEAN_BASED_STATISTICS = frozenset({"mean"})
MEAN_BASED_DEVIATIONS = frozenset(
    {"std", "mean_abs", "lp", "upper_semi", "lower_semi"}
)
"""Measures built from sums of powers of x - μ: accurate only while those
sums fit in float32 (docs/GUARANTEES.md), so a configuration made only of
them sums then divides (``Sample(overflow_safe=False)``; μ stays safe)."""

STATISTICS = {
    "mean": mean,
    "median": median,
    "quantile": quantile,
    "midrange": midrange,
    "mixed_quantile": mixed_quantile,
}
"""Statistic name -> pure function ``f(sample, **params) -> per-channel S``."""

DEVIATIONS = {
    "std": std,
    "mean_abs": mean_abs,
    "lp": lp,
    "upper_semi": upper_semi,
    "lower_semi": lower_semi,
    "median_abs": median_abs,
    "superquantile": superquantile,
    "half_range": half_range,
    "mixed_superquantile": mixed_superquantile,
}
"""Deviation name -> pure function ``f(sample, **params) -> per-channel D``."""

SQUARED_DEVIATIONS = {"std": variance}
"""Deviations whose square has a form of its own (used for D^2 directly)."""

NATURAL_STATISTIC = {
    "std": "mean",
    "mean_abs": "mean",
    "lp": "mean",
    "upper_semi": "mean",
    "lower_semi": "mean",
    "median_abs": "median",
    "superquantile": "quantile",
    "half_range": "midrange",
    "mixed_superquantile": "mixed_quantile",
}
"""Deviation name -> name of its natural statistic (the argmin of its error)."""


# --------------------------------------------------------------------------
# Gaussian-consistent scaling: the factor c with c * D = σ on normal data.
# --------------------------------------------------------------------------

_NORMAL = _pystats.NormalDist()


def _superquantile_factor(alpha: float) -> float:
  # On N(μ, σ^2): q̄_α - μ = σ φ(Φ^-1(α)) / (1 - α).
  return _NORMAL.pdf(_NORMAL.inv_cdf(alpha)) / (1.0 - alpha)


def gaussian_consistency_factor(
    deviation: str,
    *,
    alpha: float | None = None,
    p: float | None = None,
    levels: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
) -> float:
  """The constant c with c * D(X) = σ for X ~ N(μ, σ^2) (SPEC §2).

  ``mean_abs``, ``median_abs``: sqrt(π/2); ``superquantile``:
  (1-α)/φ(Φ^-1(α)); ``mixed_superquantile``: 1 / Σ_j λ_j φ(Φ^-1(α_j))/(1-α_j);
  ``upper_semi``, ``lower_semi``: sqrt(2); ``lp``: (E|Z|^p)^(-1/p) with
  E|Z|^p = 2^(p/2) Γ((p+1)/2) / sqrt(π); ``std``: 1. ``half_range`` has no such
  constant (the range of normal data grows with n): ``ValueError``.
  """
  if deviation in ("mean_abs", "median_abs"):
    return math.sqrt(math.pi / 2)
  if deviation in ("upper_semi", "lower_semi"):
    return math.sqrt(2.0)
  if deviation == "std":
    return 1.0
  if deviation == "lp":
    moment = 2 ** (p / 2) * math.gamma((p + 1) / 2) / math.sqrt(math.pi)
    return moment ** (-1.0 / p)
  if deviation == "superquantile":
    return 1.0 / _superquantile_factor(alpha)
  if deviation == "mixed_superquantile":
    return 1.0 / sum(w * _superquantile_factor(a) for a, w in zip(levels, weights))
  valid = sorted(set(DEVIATIONS) - {"half_range"})
  raise ValueError(
      f"gaussian_consistent=True has no constant for deviation {deviation!r}"
      f" (its value on normal data depends on n); it is defined for {valid}"
  )
