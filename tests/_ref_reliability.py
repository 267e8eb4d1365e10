"""A small float64 NumPy reference for the reliability tests (docs/SPEC.md §2).

Written from the formulas of docs/SPEC.md, independently of gbn_jax: one
channel at a time, sorted values, explicit sums. Only the rank rule copies the
library's documented float32 product k = ceil(float32(α) · n), so that ranks
agree where float64 would round α n differently.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def rank(alpha: float, n: int) -> int:
  k = int(np.ceil(np.float32(alpha) * np.float32(n)))
  return min(max(k, 1), max(n, 1))


def quantile(v: np.ndarray, alpha: float) -> float:
  if v.size == 0:
    return 0.0
  return float(np.sort(v)[rank(alpha, v.size) - 1])


def superquantile_value(v: np.ndarray, alpha: float) -> float:
  """L-estimator form (docs/SPEC.md §2).

  ((k - α n) x_(k) + Σ_{i>k} x_(i)) / ((1-α) n).
  """
  n = v.size
  if n == 0:
    return 0.0
  s = np.sort(v)
  k = rank(alpha, n)
  a = float(np.float32(alpha))
  return ((k - a * n) * s[k - 1] + s[k:].sum()) / ((1 - a) * n)


def statistic(v, name, *, alpha=0.5, levels=None, weights=None):
  v = np.asarray(v, np.float64)
  if v.size == 0:
    return 0.0
  if name == "mean":
    return float(v.mean())
  if name == "median":
    return quantile(v, 0.5)
  if name == "quantile":
    return quantile(v, alpha)
  if name == "midrange":
    return (v.max() + v.min()) / 2
  if name == "mixed_quantile":
    return float(sum(w * quantile(v, a)
                     for a, w in zip(levels, weights, strict=True)))
  raise KeyError(name)


def deviation(v, name, *, alpha=0.5, p=2.0, levels=None, weights=None):
  v = np.asarray(v, np.float64)
  if v.size == 0:
    return 0.0
  mu = v.mean()
  if name == "std":
    return float(np.sqrt(np.mean((v - mu) ** 2)))
  if name == "mean_abs":
    return float(np.mean(np.abs(v - mu)))
  if name == "lp":
    return float(np.mean(np.abs(v - mu) ** p) ** (1 / p))
  if name == "upper_semi":
    return float(np.sqrt(np.mean(np.maximum(v - mu, 0) ** 2)))
  if name == "lower_semi":
    return float(np.sqrt(np.mean(np.maximum(mu - v, 0) ** 2)))
  if name == "median_abs":
    return float(np.mean(np.abs(v - quantile(v, 0.5))))
  if name == "superquantile":
    return superquantile_value(v, alpha) - mu
  if name == "half_range":
    return (v.max() - v.min()) / 2
  if name == "mixed_superquantile":
    return float(
        sum(w * (superquantile_value(v, a) - mu)
            for a, w in zip(levels, weights, strict=True))
    )
  if name == "abs_superquantile":
    return superquantile_value(np.abs(v - mu), alpha)
  raise KeyError(name)


NATURAL = {
    "std": "mean", "mean_abs": "mean", "lp": "mean", "upper_semi": "mean",
    "lower_semi": "mean", "median_abs": "median", "superquantile": "quantile",
    "half_range": "midrange", "mixed_superquantile": "mixed_quantile",
    "abs_superquantile": "mean",
}


def gaussian_factor(name, *, alpha=0.5, p=2.0, levels=None, weights=None):
  """c with c·D = σ on normal data, from scipy (independent of gbn_jax)."""
  def sq(a):
    return _st.norm.pdf(_st.norm.ppf(a)) / (1 - a)
  if name in ("mean_abs", "median_abs"):
    return math.sqrt(math.pi / 2)
  if name in ("upper_semi", "lower_semi"):
    return math.sqrt(2)
  if name == "std":
    return 1.0
  if name == "lp":
    m = _st.norm.expect(lambda z: abs(z) ** p)
    return m ** (-1 / p)
  if name == "superquantile":
    return 1 / sq(alpha)
  if name == "mixed_superquantile":
    return 1 / sum(w * sq(a) for a, w in zip(levels, weights, strict=True))
  if name == "abs_superquantile":
    # CVaR_α of |Z|: its quantile function is Φ^-1((1 + u)/2).
    return (1 - alpha) / _st.norm.expect(
        lambda z: abs(z), lb=_st.norm.ppf((1 + alpha) / 2)) / 2
  raise KeyError(name)


def batch_statistics(x, axes, *, statistic_name=None, deviation_name,
                     mask=None, gaussian_consistent=False, **params):
  """(S, D) per channel, float64, shapes x.shape without axes."""
  x = np.asarray(x, np.float64)
  axes = tuple(sorted({a % x.ndim for a in axes}))
  keep = [i for i in range(x.ndim) if i not in axes]
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  xt = np.transpose(x, keep + list(axes)).reshape(
      [x.shape[i] for i in keep] + [-1])
  mt = np.transpose(m, keep + list(axes)).reshape(xt.shape)
  stat = statistic_name or NATURAL[deviation_name]
  s_out = np.zeros(xt.shape[:-1])
  d_out = np.zeros(xt.shape[:-1])
  for idx in np.ndindex(*xt.shape[:-1]):
    v = xt[idx][mt[idx]]
    s_out[idx] = statistic(v, stat, **{k: params[k] for k in params
                                        if k in ("alpha", "levels", "weights")})
    d_out[idx] = deviation(v, deviation_name, **params)
    if gaussian_consistent:
      d_out[idx] *= gaussian_factor(deviation_name, **params)
  return s_out, d_out


def normalize(x, s, d, axes, *, epsilon=1e-5, scale=1.0, bias=0.0):
  x = np.asarray(x, np.float64)
  s = np.expand_dims(s, tuple(axes))
  d = np.expand_dims(d, tuple(axes))
  return scale * (x - s) / np.sqrt(d**2 + epsilon) + bias
