"""Guarantee 4: the axioms of statistics and deviations, as property tests.

For random shapes (a small fixed set, so primitives compile once), random
reduction axes, random data (float32 in [-100, 100], ties likely) and, in
each example, *every* deviation and statistic of the catalogue:

- S(x + c) = S(x) + c and S(λx) = λ S(x) -- bit for bit for the order
  statistics (quantile, median: a monotone map keeps the order), to float
  tolerance for the others;
- D(x + c) = D(x), D(λx) = λ D(x) for λ > 0, D >= 0, D = 0 exactly for a
  constant sample (also masked);
- sub-additivity D(x + y) <= D(x) + D(y) (all catalogue deviations are
  convex);
- the GeneralizedBatchNorm output is invariant under x -> λx + c (ε tiny).

Budget: ``settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True)``
per property; α fixed at 0.7 and one axes choice per shape, so that the
jitted configurations compile once and are shared by all examples.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gbn_jax
from gbn_jax import batch_statistics
from tests.batched import many_statistics

# Every property compiles the all-measures program of its shapes: slow tier.
pytestmark = pytest.mark.slow

N_EXAMPLES = 10
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True,
                    database=None)
DEVS = sorted(gbn_jax.DEVIATIONS)
STATS = sorted(gbn_jax.STATISTICS)
EXACT_STATS = ("quantile", "median")
# shape -> the reduction axes to choose from
SHAPES = {  # one axes choice per shape keeps the compilations few
    (12, 3): [(0,)],
    (4, 3, 2): [(0, 2)],
    (2, 3, 2, 2): [(0, 1, 3)],
}
ALPHA = 0.7
# jitted with the configuration static: one compilation per configuration and
# shape, cached across examples and properties (an un-jitted call would
# re-compile any lax.while_loop in the selection engine every time)
_stats = jax.jit(batch_statistics, static_argnames=(
    "axes", "statistic", "deviation", "alpha", "p", "levels", "weights"))
ELEMENT = st.floats(-100, 100, width=32, allow_subnormal=False)
LEVELS = dict(levels=(0.25, 0.9), weights=(0.3, 0.7))


@st.composite
def samples(draw, n_arrays=1):
  shape = draw(st.sampled_from(sorted(SHAPES)))
  axes = draw(st.sampled_from(SHAPES[shape]))
  xs = [draw(hnp.arrays(np.float32, shape, elements=ELEMENT))
        for _ in range(n_arrays)]
  return xs, axes, ALPHA


_CONFIGS = [
    dict(statistic=stat, deviation=dev, alpha=ALPHA, p=3.0,
         **(LEVELS if "mixed" in dev or stat == "mixed_quantile" else {}))
    for dev in DEVS
    for stat in [None] + (STATS if dev == "superquantile" else [])
]


def _all_measures(x, axes, alpha, mask=None):
  """{(statistic or None, deviation): (S, D)} as float64 numpy arrays.

  Every configuration in one compiled program per shape (tests/batched.py),
  shared by all examples and properties."""
  assert alpha == ALPHA
  results = many_statistics(x, _CONFIGS, axes=axes, mask=mask)
  return {(cfg["statistic"], cfg["deviation"]): (np.asarray(s), np.asarray(d))
          for cfg, (s, d) in zip(_CONFIGS, results, strict=True)}


def _scale(x):
  return float(np.max(np.abs(x))) + 1.0


@SETTINGS
@given(samples(), st.floats(-50, 50, width=32))
def test_translation(sample, c):
  (x,), axes, alpha = sample
  c = np.float32(c)
  shifted = x + c
  a, b = _all_measures(x, axes, alpha), _all_measures(shifted, axes, alpha)
  tol = 2e-5 * (_scale(x) + abs(c))
  # the public batch_statistics gives the same (one configuration per shape)
  s_pub, d_pub = _stats(jnp.asarray(x), axes=axes, deviation="superquantile",
                        alpha=alpha, p=3.0)
  np.testing.assert_array_equal(np.asarray(s_pub),
                                a[(None, "superquantile")][0])
  np.testing.assert_allclose(np.asarray(d_pub), a[(None, "superquantile")][1],
                             rtol=1e-6, atol=1e-6 * _scale(x))
  for (stat, dev), (s, d) in a.items():
    s2, d2 = b[(stat, dev)]
    name = stat or gbn_jax.NATURAL_STATISTIC[dev]
    if name in EXACT_STATS:
      np.testing.assert_array_equal(s2, (s + c).astype(np.float32))
    else:
      np.testing.assert_allclose(s2, s + c, atol=tol, rtol=0, err_msg=name)
    np.testing.assert_allclose(d2, d, atol=tol, rtol=0, err_msg=dev)


@SETTINGS
@given(samples(), st.floats(0.125, 100, width=32))
def test_positive_homogeneity(sample, lam):
  (x,), axes, alpha = sample
  lam = np.float32(lam)
  a, b = _all_measures(x, axes, alpha), _all_measures(x * lam, axes, alpha)
  tol = 2e-5 * lam * _scale(x)
  for (stat, dev), (s, d) in a.items():
    s2, d2 = b[(stat, dev)]
    name = stat or gbn_jax.NATURAL_STATISTIC[dev]
    if name in EXACT_STATS:
      np.testing.assert_array_equal(s2, (s * lam).astype(np.float32))
    else:
      np.testing.assert_allclose(s2, s * lam, atol=tol, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(d2, d * lam, atol=tol, rtol=1e-5, err_msg=dev)


@SETTINGS
@given(samples(),
       st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=False),
       st.integers(0, 2**16 - 1))
def test_nonnegative_and_zero_exactly_on_constants(sample, c, mask_bits):
  (x,), axes, alpha = sample
  bits = np.unpackbits(np.array([mask_bits], ">u2").view(np.uint8))
  mask = jnp.asarray(np.resize(bits, x.shape).astype(bool))
  for m in (None, mask):
    for (_stat, dev), (_s, d) in _all_measures(x, axes, alpha, m).items():
      assert (d >= 0).all(), (dev, d.min())
  const = np.full_like(x, np.float32(c))
  for m in (None, mask):
    for (stat, dev), (s, d) in _all_measures(const, axes, alpha, m).items():
      np.testing.assert_array_equal(d, 0.0, err_msg=dev)
      if m is None:  # (an empty masked channel has S = 0 by definition)
        np.testing.assert_array_equal(s, np.float32(c), err_msg=str(stat))


@SETTINGS
@given(samples(n_arrays=2))
def test_subadditivity(sample):
  (x, y), axes, alpha = sample
  dx, dy = _all_measures(x, axes, alpha), _all_measures(y, axes, alpha)
  dxy = _all_measures(x + y, axes, alpha)
  tol = 2e-5 * (_scale(x) + _scale(y))
  for key in dx:
    lhs, rhs = dxy[key][1], dx[key][1] + dy[key][1]
    assert (lhs <= rhs + tol).all(), (key, lhs, rhs)


_APPLY = {}


def _jit_apply(layer):
  """One jitted apply per layer configuration (modules hash by their fields)."""
  if layer not in _APPLY:
    _APPLY[layer] = jax.jit(
        lambda v, x: layer.apply(v, x, mutable=["batch_stats"])[0])
  return _APPLY[layer]


@SETTINGS
@given(samples(), st.floats(0.0625, 20, width=32), st.floats(-50, 50, width=32),
       st.sampled_from(DEVS))
def test_gbn_output_invariant_under_affine_maps(sample, lam, c, deviation):
  (x,), axes, alpha = sample
  feature_axes = tuple(i for i in range(x.ndim) if i not in axes)
  kw = dict(LEVELS) if "mixed" in deviation else {}
  layer = gbn_jax.GeneralizedBatchNorm(
      use_running_average=False, axis=feature_axes, epsilon=1e-30,
      deviation=deviation, alpha=alpha, p=3.0,
      scale_init=jax.nn.initializers.constant(1.5), **kw)
  v = layer.init(jax.random.key(0), x)
  apply = _jit_apply(layer)
  y1 = apply(v, x)
  x2 = np.float32(lam) * x + np.float32(c)
  y2 = apply(v, x2)
  y1, y2 = np.asarray(y1), np.asarray(y2)
  # compare channels whose spread is not lost in the rounding of λx + c
  # (the all-measures program of this shape: compiled once for all examples)
  _, d = _all_measures(x, axes, alpha)[(None, deviation)]
  keep = np.expand_dims(np.asarray(d) > 1e-2 * (_scale(x) + abs(c) / lam), axes)
  keep = np.broadcast_to(keep, x.shape)
  np.testing.assert_allclose(y2[keep], y1[keep], rtol=1e-3, atol=1e-3)
