"""Gradients of every measure (docs/SPEC.md §3).

The oracle is ``jax.grad`` of a sort-based JAX reference written here,
independently of the library: order statistics are entries of ``jnp.sort``
and the superquantile is its L-estimator form
(1/((1-α)n)) [(k - αn) x_(k) + Σ_{i>k} x_(i)], whose gradient carries the
(k - αn) term at q_α. Also hand-written docs/SPEC.md §3 gradients, and
``jax.test_util.check_grads`` (finite differences) where the measure is
smooth, or piecewise linear away from ties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gbn_jax
from gbn_jax.sample import Sample
from tests import reference as ref
from tests.batched import many_statistics

LEVELS = (0.3, 0.8)
WEIGHTS = (0.35, 0.65)
PARAMS = dict(alpha=0.37, p=3.0, levels=LEVELS, weights=WEIGHTS)

# --------------------------------------------------------------------------
# The sort-based JAX reference: a function of one channel's values v (1-D).
# --------------------------------------------------------------------------


def _rank(alpha, n):
  return ref.quantile_rank(alpha, n)  # static int: the documented rule


def _a(alpha):
  return float(np.float32(alpha))


# Each function takes v of shape (n,) or (n, C) and reduces over axis 0.


def _sort(v):
  return jnp.sort(v, axis=0)


def _mean(v):
  return jnp.mean(v, axis=0)


def j_quantile(v, alpha):
  return _sort(v)[_rank(alpha, v.shape[0]) - 1]


def j_superquantile_value(v, alpha):
  s = _sort(v)
  n = v.shape[0]
  k, a = _rank(alpha, n), _a(alpha)
  return ((k - a * n) * s[k - 1] + jnp.sum(s[k:], axis=0)) / ((1 - a) * n)


def j_midrange(v):
  s = _sort(v)
  return (s[-1] + s[0]) / 2


J_STATISTICS = {
    "mean": _mean,
    "median": lambda v: j_quantile(v, 0.5),
    "quantile": lambda v: j_quantile(v, PARAMS["alpha"]),
    "midrange": j_midrange,
    "mixed_quantile": lambda v: sum(
        w * j_quantile(v, a) for a, w in zip(LEVELS, WEIGHTS, strict=True)),
}


def _dev_mean(v):
  return v - _mean(v)


J_DEVIATIONS = {
    "std": lambda v: jnp.sqrt(_mean(_dev_mean(v) ** 2)),
    "mean_abs": lambda v: _mean(jnp.abs(_dev_mean(v))),
    "lp": lambda v: _mean(jnp.abs(_dev_mean(v)) ** PARAMS["p"])
    ** (1 / PARAMS["p"]),
    "upper_semi": lambda v: jnp.sqrt(
        _mean(jnp.maximum(_dev_mean(v), 0) ** 2)),
    "lower_semi": lambda v: jnp.sqrt(
        _mean(jnp.maximum(-_dev_mean(v), 0) ** 2)),
    "median_abs": lambda v: _mean(jnp.abs(v - j_quantile(v, 0.5))),
    "superquantile": lambda v: j_superquantile_value(v, PARAMS["alpha"])
    - _mean(v),
    "half_range": lambda v: (_sort(v)[-1] - _sort(v)[0]) / 2,
    "mixed_superquantile": lambda v: sum(
        w * (j_superquantile_value(v, a) - _mean(v))
        for a, w in zip(LEVELS, WEIGHTS, strict=True)),
    "abs_superquantile": lambda v: j_superquantile_value(
        jnp.abs(_dev_mean(v)), PARAMS["alpha"]),
}


def j_batch(fn, x, mask=None):
  """fn per column of x (n, C); ``mask`` a static numpy (n, C) array."""
  if mask is None:
    return fn(x)
  return jnp.stack([fn(x[np.flatnonzero(mask[:, c]), c])
                    for c in range(x.shape[1])])


def lib(x, statistic, deviation, mask=None):
  return gbn_jax.batch_statistics(x, axes=0, statistic=statistic,
                                  deviation=deviation, mask=mask, **PARAMS)


def _data(shape=(23, 4), seed=0):
  return jnp.asarray(ref.skewed(np.random.default_rng(seed), shape, "gamma"))


def _close(a, b, what):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                             atol=2e-6, err_msg=what)


# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_grad_every_measure_vs_sort_reference(masked):
  # One Jacobian of all measures at once (two compilations, not 28): row j
  # is the gradient of Σ_c w_c M_j(x)_c for the j-th measure M_j.
  x = _data((23, 3))
  mask = None
  if masked:
    mask = np.random.default_rng(1).random(x.shape) < 0.7
  w = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape[1]),
                  jnp.float32)
  names = [("S", n) for n in J_STATISTICS] + [("D", n) for n in J_DEVIATIONS]

  def lib_all(x):
    # every measure on one Sample (tests/batched.py)
    configs = [dict(statistic=name, deviation="std", **PARAMS) if kind == "S"
               else dict(statistic="mean", deviation=name, **PARAMS)
               for kind, name in names]
    results = many_statistics(x, configs, axes=0, mask=mask)
    return jnp.stack([jnp.dot(w, sd[0] if kind == "S" else sd[1])
                      for (kind, _), sd in zip(names, results, strict=True)])

  def ref_all(x):
    table = {"S": J_STATISTICS, "D": J_DEVIATIONS}
    return jnp.stack([jnp.dot(w, j_batch(table[kind][name], x, mask))
                      for kind, name in names])

  g = jax.jit(jax.jacrev(lib_all))(x)
  g_ref = jax.jit(jax.jacrev(ref_all))(x)
  for j, (kind, name) in enumerate(names):
    what = f"gradient of {kind} {name} (mask={masked})"
    _close(g[j], g_ref[j], what)
    assert np.any(np.asarray(g[j]) != 0), what
    if masked:  # values outside the mask get no gradient
      assert np.all(np.asarray(g[j])[~mask] == 0), what


@pytest.mark.slow
def test_grad_of_the_transform_every_measure():
  # Through y = (x - S) / sqrt(D² + ε), S the natural statistic, as a layer
  # uses it (including the D² = variance path of std).
  x = _data((19, 3), seed=3)
  r = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape),
                  jnp.float32)
  eps = 1e-3
  devs = list(gbn_jax.DEVIATIONS)

  def lib_all(x):
    out = []
    for dev in devs:
      m = gbn_jax.make_measures(None, dev, **PARAMS)
      c, d2 = m.center_and_dev_sq(Sample(x, (0,)))
      out.append(jnp.sum(r * gbn_jax.normalize(x, c, d2, axes=0,
                                               epsilon=eps)))
    return jnp.stack(out)

  def ref_all(x):
    out = []
    for dev in devs:
      c = j_batch(J_STATISTICS[ref.NATURAL_STATISTIC[dev]], x)
      d = j_batch(J_DEVIATIONS[dev], x)
      out.append(jnp.sum(r * (x - c) / jnp.sqrt(d * d + eps)))
    return jnp.stack(out)

  g = jax.jit(jax.jacrev(lib_all))(x)
  g_ref = jax.jit(jax.jacrev(ref_all))(x)
  for j, dev in enumerate(devs):
    _close(g[j], g_ref[j], f"transform {dev}")


def test_superquantile_gradient_has_the_k_minus_alpha_n_term():
  # docs/SPEC.md §3 by hand: ∂q̄_α/∂x_i = 1/((1-α)n) above q_α, (k-αn)/((1-α)n)
  # at q_α, 0 below; D = q̄_α - μ subtracts 1/n everywhere.
  n, alpha = 23, 0.37  # αn = 8.51, k = 9, k - αn = 0.49
  x = _data((n, 1), seed=5)
  v = np.asarray(x[:, 0], np.float64)
  k, a = ref.quantile_rank(alpha, n), _a(alpha)
  assert 0.1 < k - a * n < 0.9  # the term is there and not 0 or 1
  q = np.sort(v)[k - 1]
  expected = np.where(v > q, 1.0, 0.0) / ((1 - a) * n)
  expected[v == q] = (k - a * n) / ((1 - a) * n)
  expected -= 1.0 / n
  g = jax.grad(lambda x: gbn_jax.batch_statistics(
      x, axes=0, deviation="superquantile", alpha=alpha)[1][0])(x)
  np.testing.assert_allclose(np.asarray(g[:, 0]), expected, rtol=1e-5,
                             atol=1e-7)
  # The quantile itself: 1 at the selected element, 0 elsewhere.
  gq = jax.grad(lambda x: gbn_jax.batch_statistics(
      x, axes=0, deviation="superquantile", alpha=alpha)[0][0])(x)
  np.testing.assert_array_equal(np.asarray(gq[:, 0]), (v == q).astype(float))


@pytest.mark.slow
def test_superquantile_gradient_every_level_mixed():
  # The mixed deviation: Σ_j λ_j of the single-level gradients.
  n = 31
  x = _data((n, 1), seed=6)
  v = np.asarray(x[:, 0], np.float64)
  expected = np.zeros(n)
  for alpha, w in zip(LEVELS, WEIGHTS, strict=True):
    k, a = ref.quantile_rank(alpha, n), _a(alpha)
    q = np.sort(v)[k - 1]
    g = np.where(v > q, 1.0, 0.0) / ((1 - a) * n)
    g[v == q] = (k - a * n) / ((1 - a) * n)
    expected += w * (g - 1.0 / n)
  g = jax.grad(lambda x: gbn_jax.batch_statistics(
      x, axes=0, deviation="mixed_superquantile", levels=LEVELS,
      weights=WEIGHTS)[1][0])(x)
  np.testing.assert_allclose(np.asarray(g[:, 0]), expected, rtol=1e-5,
                             atol=1e-7)


SMOOTH = ["std", "lp", "upper_semi", "lower_semi"]
# Piecewise linear: exact finite differences away from ties and kinks.
PIECEWISE = ["mean_abs", "median_abs", "superquantile", "half_range",
             "mixed_superquantile"]


@pytest.mark.slow
def test_check_grads():
  # n = 13, α = 0.37: k - αn = 0.19, far from the 1/2 that a max(0, ·)
  # subgradient would give if q_α were (wrongly) held constant.
  x = _data((13, 2), seed=7)
  tol = dict(atol=3e-3, rtol=3e-3, eps=1e-3)
  check_grads(jax.jit(lambda x: lib(x, "mean", "std")[0]), (x,), order=1,
              modes=("fwd", "rev"), **tol)
  check_grads(jax.jit(lambda x: lib(x, "mean", "std")[1]), (x,), order=2,
              modes=("rev",), **tol)

  # All other measures stacked: one function, one compilation per mode.
  def all_measures(x):  # on one Sample (tests/batched.py)
    devs = SMOOTH + PIECEWISE
    stats = ("quantile", "median", "midrange", "mixed_quantile")
    results = many_statistics(
        x, [dict(statistic="mean", deviation=dev, **PARAMS) for dev in devs]
        + [dict(statistic=stat, deviation="std", **PARAMS) for stat in stats],
        axes=0)
    out = [d for _, d in results[:len(devs)]]
    out += [c for c, _ in results[len(devs):]]
    return jnp.stack(out)

  check_grads(jax.jit(all_measures), (x,), order=1, modes=("rev",), **tol)


@pytest.mark.slow
def test_constant_channel_gradients_are_finite():
  x = jnp.ones((10, 2), jnp.float32) * jnp.asarray([3.0, -1.0])
  devs = list(gbn_jax.DEVIATIONS)

  def all_devs(x):
    return jnp.stack([jnp.sum(lib(x, None, dev)[1]) for dev in devs])

  def all_layers(x):
    out = []
    for dev in devs:
      m = gbn_jax.make_measures(None, dev, **PARAMS)
      c, d2 = m.center_and_dev_sq(Sample(x, (0,)))
      out.append(jnp.sum(gbn_jax.normalize(x, c, d2, axes=0) ** 2))
    return jnp.stack(out)

  for fn in (all_devs, all_layers):
    g = np.asarray(jax.jit(jax.jacrev(fn))(x))
    for j, dev in enumerate(devs):
      assert np.all(np.isfinite(g[j])), (fn.__name__, dev)
