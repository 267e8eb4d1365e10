"""NumPy reference implementations of the catalogue (docs/SPEC.md §2).

For the tests.

Written from docs/SPEC.md, independently of ``gbn_jax``: every measure is a
function of a 1-D float64 sample ``v`` (the valid values of one channel), and
:func:`batch_statistics` / :func:`normalize` apply them per channel the way
the library's public functions do. The only thing shared with the library is
its documented rank rule for the quantile:

    k = ceil(float32(alpha) * float32(n)), clipped to [1, n]

(the product taken in float32, as ``gbn_jax.order_statistics`` documents).
The superquantile is the exact empirical CVaR in its L-estimator form,

    q̄_α = (1/((1-α) n)) [ (k - α n) x_(k) + Σ_{i>k} x_(i) ],

not the ``q_α + mean excess`` form the library uses, so the two check each
other. An empty channel (mask all False) gives 0 for every measure, the
library's documented convention.

Imports numpy and scipy only (never jax or gbn_jax).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate, stats

# --------------------------------------------------------------------------
# Order statistics.
# --------------------------------------------------------------------------


def quantile_rank(alpha: float, n: int) -> int:
  """k = ceil(float32(α) · float32(n)) clipped to [1, n] (1-based)."""
  prod = np.float32(alpha) * np.float32(n)  # float32 product, on purpose
  return int(min(max(math.ceil(float(prod)), 1), max(n, 1)))


def _level(alpha: float) -> float:
  # The level as the library sees it (a float32), in float64 arithmetic.
  return float(np.float32(alpha))


def order_statistic(v: np.ndarray, k: int) -> float:
  """x_(k), the k-th smallest value (1-based)."""
  return float(np.sort(np.asarray(v, np.float64))[k - 1])


def quantile(v: np.ndarray, alpha: float) -> float:
  """q_α = x_(k), k = ceil(α n) clipped to [1, n] (numpy "inverted_cdf")."""
  return order_statistic(v, quantile_rank(alpha, len(v)))


def superquantile_value(v: np.ndarray, alpha: float) -> float:
  """q̄_α by the L-estimator (1/((1-α)n)) [(k - αn) x_(k) + Σ_{i>k} x_(i)]."""
  s = np.sort(np.asarray(v, np.float64))
  n = len(s)
  a = _level(alpha)
  k = quantile_rank(alpha, n)
  return ((k - a * n) * s[k - 1] + s[k:].sum()) / ((1.0 - a) * n)


# --------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------


def mean(v):
  return float(np.mean(np.asarray(v, np.float64)))


def median(v):
  return quantile(v, 0.5)


def midrange(v):
  v = np.asarray(v, np.float64)
  return (v.max() + v.min()) / 2


def mixed_quantile(v, *, levels, weights):
  return sum(w * quantile(v, a) for a, w in zip(levels, weights, strict=True))


# --------------------------------------------------------------------------
# Deviations.
# --------------------------------------------------------------------------


def std(v):
  v = np.asarray(v, np.float64)
  return math.sqrt(np.mean((v - v.mean()) ** 2))


def mean_abs(v):
  v = np.asarray(v, np.float64)
  return float(np.mean(np.abs(v - v.mean())))


def lp(v, *, p):
  v = np.asarray(v, np.float64)
  return float(np.mean(np.abs(v - v.mean()) ** p) ** (1.0 / p))


def upper_semi(v):
  v = np.asarray(v, np.float64)
  return math.sqrt(np.mean(np.maximum(v - v.mean(), 0.0) ** 2))


def lower_semi(v):
  v = np.asarray(v, np.float64)
  return math.sqrt(np.mean(np.maximum(v.mean() - v, 0.0) ** 2))


def median_abs(v):
  v = np.asarray(v, np.float64)
  return float(np.mean(np.abs(v - median(v))))


def superquantile(v, *, alpha):
  return superquantile_value(v, alpha) - mean(v)


def half_range(v):
  v = np.asarray(v, np.float64)
  return (v.max() - v.min()) / 2


def mixed_superquantile(v, *, levels, weights):
  return sum(w * superquantile(v, alpha=a)
             for a, w in zip(levels, weights, strict=True))


def abs_superquantile(v, *, alpha):
  """q̄_α of the absolute deviations |v_i - mean(v)| (L-estimator form)."""
  v = np.asarray(v, np.float64)
  return superquantile_value(np.abs(v - v.mean()), alpha)


STATISTICS = {
    "mean": mean,
    "median": median,
    "quantile": quantile,
    "midrange": midrange,
    "mixed_quantile": mixed_quantile,
}

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
    "abs_superquantile": abs_superquantile,
}

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
    "abs_superquantile": "mean",
}

# Which parameters each measure takes (the others are ignored).
_PARAMS = {
    "quantile": ("alpha",),
    "mixed_quantile": ("levels", "weights"),
    "lp": ("p",),
    "superquantile": ("alpha",),
    "mixed_superquantile": ("levels", "weights"),
    "abs_superquantile": ("alpha",),
}


def _bind(name: str, fn, params: dict):
  kw = {k: params[k] for k in _PARAMS.get(name, ())}
  if name == "quantile":
    return lambda v: fn(v, kw["alpha"])
  return lambda v: fn(v, **kw)


# --------------------------------------------------------------------------
# Gaussian-consistent scaling, by numerical integration against N(0, 1).
# --------------------------------------------------------------------------


def normal_deviation(deviation: str, *, alpha=None, p=None, levels=None,
                     weights=None) -> float:
  """D(Z) for Z ~ N(0, 1), by quadrature (independent of closed forms)."""
  phi = stats.norm.pdf
  if deviation == "std":
    return 1.0
  if deviation in ("mean_abs", "median_abs"):
    return integrate.quad(lambda z: abs(z) * phi(z), -np.inf, np.inf)[0]
  if deviation in ("upper_semi", "lower_semi"):
    return math.sqrt(integrate.quad(lambda z: z * z * phi(z), 0, np.inf)[0])
  if deviation == "lp":
    m = integrate.quad(lambda z: abs(z) ** p * phi(z), -np.inf, np.inf)[0]
    return m ** (1.0 / p)
  if deviation == "superquantile":
    # CVaR_α(Z) = (1/(1-α)) ∫_α^1 Φ^-1(u) du, and E Z = 0.
    return integrate.quad(stats.norm.ppf, alpha, 1.0)[0] / (1.0 - alpha)
  if deviation == "abs_superquantile":
    # CVaR_α(|Z|): |Z| has quantile function Φ^-1((1 + u)/2) on (0, 1).
    return integrate.quad(lambda u: stats.norm.ppf((1 + u) / 2), alpha,
                          1.0)[0] / (1.0 - alpha)
  if deviation == "mixed_superquantile":
    return sum(
        w * normal_deviation("superquantile", alpha=a)
        for a, w in zip(levels, weights, strict=True)
    )
  raise ValueError(f"no Gaussian constant for {deviation!r}")


def gaussian_consistency_factor(deviation: str, **params) -> float:
  """c with c · D(Z) = 1 for Z ~ N(0, 1)."""
  return 1.0 / normal_deviation(deviation, **params)


# --------------------------------------------------------------------------
# Per-channel application (what gbn_jax.batch_statistics computes).
# --------------------------------------------------------------------------


def channel_samples(x, axes, mask=None):
  """Yields (channel index, 1-D float64 array of that channel's valid values).

  Channels are indexed over ``x.shape`` without ``axes``; ``mask`` (True =
  counts) broadcasts to ``x``.
  """
  x = np.asarray(x, np.float64)
  axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axes)))
  keep = [i for i in range(x.ndim) if i not in axes]
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  xt = np.transpose(x, keep + list(axes))
  mt = np.transpose(m, keep + list(axes))
  chan_shape = tuple(x.shape[i] for i in keep)
  xt = xt.reshape((*chan_shape, -1))
  mt = mt.reshape((*chan_shape, -1))
  for idx in np.ndindex(*chan_shape):
    yield idx, xt[idx][mt[idx]]


def per_channel(fn, x, axes, mask=None) -> np.ndarray:
  """fn applied to each channel's valid values; 0 for an empty channel."""
  x = np.asarray(x)
  axes_t = tuple(sorted(a % x.ndim for a in np.atleast_1d(axes)))
  chan_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes_t)
  out = np.zeros(chan_shape, np.float64)
  for idx, v in channel_samples(x, axes, mask):
    out[idx] = fn(v) if len(v) else 0.0
  return out


def batch_statistics(
    x,
    *,
    axes,
    statistic=None,
    deviation="superquantile",
    alpha=0.5,
    p=2.0,
    levels=None,
    weights=None,
    gaussian_consistent=False,
    mask=None,
):
  """(center, dev) per channel, float64; the NumPy twin of gbn_jax's."""
  if levels is not None and weights is None:
    weights = (1.0 / len(levels),) * len(levels)
  params = dict(alpha=alpha, p=p, levels=levels, weights=weights)
  if statistic is None:
    statistic = NATURAL_STATISTIC[deviation]
  s_fn = _bind(statistic, STATISTICS[statistic], params)
  d_fn = _bind(deviation, DEVIATIONS[deviation], params)
  center = per_channel(s_fn, x, axes, mask)
  dev = per_channel(d_fn, x, axes, mask)
  if gaussian_consistent:
    dev = dev * gaussian_consistency_factor(deviation, **params)
  return center, dev


def normalize(x, center, dev, *, axes, epsilon=1e-5, scale=None, bias=None):
  """y = scale (x - S) / sqrt(D² + ε) + bias, float64."""
  x = np.asarray(x, np.float64)
  axes = tuple(sorted(a % x.ndim for a in np.atleast_1d(axes)))
  c = np.expand_dims(np.asarray(center, np.float64), axes)
  d = np.expand_dims(np.asarray(dev, np.float64), axes)
  y = (x - c) / np.sqrt(d * d + epsilon)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


# --------------------------------------------------------------------------
# Skewed test data.
# --------------------------------------------------------------------------


def skewed(rng: np.random.Generator, shape, kind: str = "gamma") -> np.ndarray:
  """Right-skewed float32 data (gamma(2) or lognormal), shifted to mixed
  sign."""
  if kind == "gamma":
    v = rng.gamma(2.0, 1.0, size=shape) - 1.5
  elif kind == "lognormal":
    v = rng.lognormal(0.0, 0.75, size=shape) - 1.0
  else:
    raise ValueError(
        f"unknown kind {kind!r}; valid choices: 'gamma', 'lognormal'")
  return v.astype(np.float32)
