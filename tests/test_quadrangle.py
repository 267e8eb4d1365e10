"""The risk-quadrangle identities of docs/SPEC.md §2, by brute-force
minimisation.

For each pair, D(X) = min_c E(X - c) and S(X) = argmin_c E(X - c), found in
NumPy/float64 by a dense grid over [min X, max X] and a bounded local refine
around the best grid point. Checked against both the NumPy reference and the
library. Also the deviation axioms of docs/SPEC.md §1 for every deviation.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import optimize

import gbn_jax
from tests import reference as ref

GRID = 4001


def _errors(kind, alpha=None):
  """E(Y) for a batch of shifts: Y has shape (grid, n)."""
  if kind == "std":  # sqrt(E Y^2)
    return lambda y: np.sqrt(np.mean(y * y, axis=-1))
  if kind == "median_abs":  # E|Y|
    return lambda y: np.mean(np.abs(y), axis=-1)
  if kind == "superquantile":  # E[α/(1-α) [Y]_+ + [-Y]_+]
    a = float(np.float32(alpha))
    return lambda y: np.mean(
        a / (1 - a) * np.maximum(y, 0) + np.maximum(-y, 0), axis=-1
    )
  if kind == "half_range":  # max|Y|
    return lambda y: np.max(np.abs(y), axis=-1)
  raise ValueError(kind)


def brute_force_min(v, error):
  """(min_c E(v - c), argmin) by dense grid + local refine, float64."""
  v = np.asarray(v, np.float64)
  grid = np.linspace(v.min(), v.max(), GRID)
  values = error(v[None, :] - grid[:, None])
  i = int(np.argmin(values))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, GRID - 1)]
  res = optimize.minimize_scalar(
      lambda c: float(error((v - c)[None, :])[0]),
      bounds=(lo, hi), method="bounded", options={"xatol": 1e-13},
  )
  best_c, best = ((res.x, res.fun) if res.fun <= values[i]
                  else (grid[i], values[i]))
  # Piecewise-linear errors have their minimum at a data point; the data
  # points inside the bracket are candidates too (the grid may straddle one).
  inside = v[(v >= lo) & (v <= hi)]
  if inside.size:
    cand = error(v[None, :] - inside[:, None])
    j = int(np.argmin(cand))
    if cand[j] < best:
      best_c, best = inside[j], cand[j]
  return float(best), float(best_c)


def _library(x, deviation, alpha):
  # Padded to a fixed length with a mask, so eager ops compile once for all
  # the sample sizes hypothesis draws.
  n = len(x)
  padded = np.zeros((64, 1), np.float32)
  padded[:n, 0] = x
  mask = np.arange(64)[:, None] < n
  c, d = gbn_jax.batch_statistics(
      jnp.asarray(padded), axes=0, deviation=deviation, alpha=alpha,
      mask=jnp.asarray(mask))
  return float(c[0]), float(d[0])


def _check_pair(v, deviation, alpha=0.5, unique=True):
  error = _errors(deviation, alpha)
  d_min, c_min = brute_force_min(v, error)
  rc, rd = ref.batch_statistics(v[:, None], axes=0, deviation=deviation,
                                alpha=alpha)
  lc, ld = _library(v, deviation, alpha)
  spread = float(v.max() - v.min())
  what = f"{deviation} alpha={alpha} n={len(v)}"
  # The minimum value is the deviation (reference: float64; library: float32).
  assert rd[0] == pytest.approx(d_min, rel=1e-9, abs=1e-12 * spread), what
  assert ld == pytest.approx(d_min, rel=3e-5, abs=3e-6 * spread), what
  # The natural statistic attains the minimum ...
  assert float(error((v - rc[0])[None, :])[0]) == pytest.approx(
      d_min, rel=1e-9, abs=1e-12 * spread), what
  # ... and is the minimiser when that is unique.
  if unique:
    assert c_min == pytest.approx(rc[0], abs=1e-6 * spread), what
    assert lc == pytest.approx(c_min, abs=1e-5 * spread), what


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    n=st.integers(5, 60),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.03, 0.97),
    kind=st.sampled_from(["gamma", "lognormal"]),
)
def test_quadrangle_pairs(n, seed, alpha, kind):
  a = float(np.float32(alpha))
  assume(abs(a * n - round(a * n)) > 1e-3)  # α n not whole: q_α unique
  v = ref.skewed(np.random.default_rng(seed), (n,), kind).astype(np.float64)
  _check_pair(v, "std")
  _check_pair(v, "half_range")
  _check_pair(v, "superquantile", alpha)
  # E|X - c| has a unique minimiser for odd n; for even n any point between
  # the two middle values, the lower median among them.
  _check_pair(v, "median_abs", unique=n % 2 == 1)


def test_superquantile_quadrangle_alpha_n_whole():
  # α n whole: every c in [x_(k), x_(k+1)] minimises; q_α = x_(k) is one.
  v = ref.skewed(np.random.default_rng(11), (40,), "gamma").astype(np.float64)
  _check_pair(v, "superquantile", 0.25, unique=False)


def test_median_abs_minimiser_set_for_even_n():
  v = ref.skewed(np.random.default_rng(12), (20,),
                 "lognormal").astype(np.float64)
  s = np.sort(v)
  error = _errors("median_abs")
  lower, upper = s[9], s[10]
  flat = error(v[None, :] - np.linspace(lower, upper, 7)[:, None])
  np.testing.assert_allclose(flat, flat[0], rtol=1e-12)
  lc, _ = _library(v, "median_abs", 0.5)
  assert lc == np.float32(lower)  # the lower median


# --------------------------------------------------------------------------
# The deviation axioms (docs/SPEC.md §1), on the library in float32.
# --------------------------------------------------------------------------

_PARAMS = dict(alpha=0.37, p=3.0, levels=(0.3, 0.8), weights=(0.4, 0.6))


def _dev(x, deviation):
  return np.asarray(
      gbn_jax.batch_statistics(jnp.asarray(x), axes=0, deviation=deviation,
                               **_PARAMS)[1], np.float64)


@pytest.mark.slow
def test_deviation_axioms_every_deviation():
  rng = np.random.default_rng(13)
  x = ref.skewed(rng, (27, 6), "gamma")
  y = ref.skewed(rng, (27, 6), "lognormal")
  shift = rng.standard_normal(6).astype(np.float32) * 3
  for dev in gbn_jax.DEVIATIONS:
    dx, dy = _dev(x, dev), _dev(y, dev)
    tol = 2e-5 * (1 + np.abs(dx))
    assert np.all(dx > 0), dev
    np.testing.assert_allclose(_dev(x + shift, dev), dx, rtol=1e-4, atol=1e-4,
                               err_msg=f"{dev}: D(X + c) = D(X)")
    np.testing.assert_allclose(_dev(np.float32(2.5) * x, dev), 2.5 * dx,
                               rtol=1e-5, atol=1e-5,
                               err_msg=f"{dev}: D(λX) = λ D(X)")
    assert np.all(_dev(x + y, dev) <= dx + dy + tol), f"{dev}: subadditive"
    const = np.broadcast_to(shift, (27, 6))
    # Zero up to the round-off of a float32 mean (the fast one-pass variance
    # E[x²] - μ² fails this by orders of magnitude).
    d_const = _dev(const, dev)
    assert np.all(d_const >= 0), dev
    assert np.all(d_const <= 2e-6 * (1 + np.abs(shift))), f"{dev}: {d_const}"
    assert not math.isnan(float(np.sum(dx)))
