"""Every measure of the catalogue vs the NumPy reference (docs/SPEC.md §2).

Skewed data (gamma, lognormal), several shapes and reduction axes, levels α
with α n not a whole number (and one where it is), masks, half precision, the
mixed superquantile and the Gaussian-consistent scaling.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gbn_jax
from gbn_jax.sample import Sample
from tests import reference as ref
from tests.batched import many_statistics

SPEC_STATISTICS = {"mean", "quantile", "median", "midrange"}
SPEC_DEVIATIONS = {
    "std", "mean_abs", "lp", "upper_semi", "lower_semi", "median_abs",
    "superquantile", "half_range",
}
LEVELS = (0.3, 0.75, 0.9)
WEIGHTS = (0.2, 0.5, 0.3)
ORDER_STATISTICS = {"quantile", "median"}  # exactly a data value


def _params(alpha=0.37, p=3.0):
  return dict(alpha=alpha, p=p, levels=LEVELS, weights=WEIGHTS)


def _assert_close(actual, expected, scale, what, rtol=2e-5):
  actual = np.asarray(actual, np.float64)
  np.testing.assert_allclose(
      actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what
  )


def _check_all_measures(x, axes, alpha, mask=None, p=3.0, public=False):
  """Each statistic and each deviation (natural pairing) vs the reference.

  All deviations come from one compiled program (tests/batched.py) unless
  ``public``, which calls ``gbn_jax.batch_statistics`` once per deviation."""
  params = _params(alpha, p)
  scale = float(np.max(np.abs(x))) + 1.0
  devs = list(gbn_jax.DEVIATIONS)
  if public:
    results = [gbn_jax.batch_statistics(x, axes=axes, deviation=dev,
                                        mask=mask, **params) for dev in devs]
  else:
    results = many_statistics(
        x, [dict(deviation=dev, **params) for dev in devs], axes=axes,
        mask=mask)
  for dev, (center, d) in zip(devs, results, strict=True):
    rc, rd = ref.batch_statistics(x, axes=axes, deviation=dev, mask=mask,
                                  **params)
    what = f"deviation={dev} alpha={alpha} axes={axes} shape={x.shape}"
    assert center.shape == rc.shape and d.shape == rd.shape, what
    assert center.dtype == jnp.float32 and d.dtype == jnp.float32, what
    _assert_close(d, rd, scale, what)
    stat = ref.NATURAL_STATISTIC[dev]
    if stat in ORDER_STATISTICS:  # an order statistic is a data value: exact
      np.testing.assert_array_equal(np.asarray(center, np.float64), rc, what)
    else:
      _assert_close(center, rc, scale, what)


# (shape, reduction axes, α): α n is not whole in the first cases.
CASES = [
    ((40, 3), (0,), 0.37, "gamma"),          # n = 40, αn = 14.8
    ((6, 5, 7, 2), (0, 1, 2), 0.83, "lognormal"),  # NHWC, n = 210, αn = 174.3
    ((7, 4, 3), (0, 2), 0.13, "gamma"),      # channel in the middle, n = 21
    ((3, 11, 2), (-2, 0), 0.62, "lognormal"),  # negative axes, n = 33
    ((33,), 0, 0.5, "gamma"),                # one channel, odd n
    ((40, 2), (0,), 0.25, "lognormal"),      # α n = 10 exactly
]


@pytest.mark.parametrize("shape,axes,alpha,kind", [
    # the first case (public path) in the fast tier, the others slow
    pytest.param(*case, marks=() if i == 0 else pytest.mark.slow)
    for i, case in enumerate(CASES)])
def test_every_measure_matches_reference(shape, axes, alpha, kind):
  rng = np.random.default_rng(len(shape) * 1000 + int(alpha * 100))
  x = ref.skewed(rng, shape, kind)
  # the first case through the public batch_statistics, one call per measure
  _check_all_measures(x, axes, alpha, public=(shape, axes) == CASES[0][:2])


def test_alpha_n_not_whole_in_cases():
  # Guard on the test data itself: most cases must have a fractional α n.
  fractional = 0
  for shape, axes, alpha, _ in CASES:
    n = math.prod(shape[a] for a in np.atleast_1d(axes))
    fractional += abs(alpha * n - round(alpha * n)) > 1e-3
  assert fractional == len(CASES) - 1


@pytest.mark.slow
def test_every_measure_with_mask():
  rng = np.random.default_rng(1)
  x = ref.skewed(rng, (9, 4, 3), "gamma")
  mask = rng.random((9, 4, 3)) < 0.6  # per-channel counts differ
  _check_all_measures(x, (0, 1), 0.41, mask=mask)
  # A mask that broadcasts (drop whole batch rows), as in Flax.
  row_mask = (rng.random((9, 1, 1)) < 0.7)
  _check_all_measures(x, (0, 1), 0.41, mask=row_mask)


@pytest.mark.slow
def test_every_statistic_with_every_deviation():
  rng = np.random.default_rng(2)
  x = ref.skewed(rng, (23, 2), "lognormal")
  params = _params(0.71, 1.5)
  scale = float(np.max(np.abs(x))) + 1.0
  pairs = [(stat, dev) for stat in gbn_jax.STATISTICS
           for dev in gbn_jax.DEVIATIONS]
  results = many_statistics(  # every pair in one compiled program
      x, [dict(statistic=stat, deviation=dev, **params) for stat, dev in pairs],
      axes=0)
  assert len(results) == len(pairs) > 40
  for (stat, dev), (c, d) in zip(pairs, results, strict=True):
    rc, rd = ref.batch_statistics(x, axes=0, statistic=stat, deviation=dev,
                                  **params)
    _assert_close(c, rc, scale, f"{stat}/{dev} center")
    _assert_close(d, rd, scale, f"{stat}/{dev} deviation")


def test_registries_have_the_spec_names():
  assert set(gbn_jax.STATISTICS) >= SPEC_STATISTICS
  assert set(gbn_jax.DEVIATIONS) >= SPEC_DEVIATIONS
  assert "mixed_superquantile" in gbn_jax.DEVIATIONS
  for dev in gbn_jax.DEVIATIONS:
    assert gbn_jax.NATURAL_STATISTIC[dev] == ref.NATURAL_STATISTIC[dev], dev
    assert gbn_jax.NATURAL_STATISTIC[dev] in gbn_jax.STATISTICS


@pytest.mark.slow
def test_registry_functions_are_pure_functions_of_a_sample():
  rng = np.random.default_rng(3)
  x = ref.skewed(rng, (17, 3), "gamma")
  sample = Sample(jnp.asarray(x), (0,))
  np.testing.assert_array_equal(
      gbn_jax.STATISTICS["quantile"](sample, alpha=0.3),
      ref.per_channel(lambda v: ref.quantile(v, 0.3), x, 0),
  )
  _assert_close(
      gbn_jax.DEVIATIONS["superquantile"](sample, alpha=0.3),
      ref.per_channel(lambda v: ref.superquantile(v, alpha=0.3), x, 0),
      10.0, "superquantile registry entry",
  )
  _assert_close(
      gbn_jax.DEVIATIONS["lp"](sample, p=1.5),
      ref.per_channel(lambda v: ref.lp(v, p=1.5), x, 0),
      10.0, "lp registry entry",
  )


@pytest.mark.parametrize("masked", [False, True])
def test_both_average_forms_match_reference(masked):
  # Sample(overflow_safe=False) sums then divides (the mean-based
  # configurations' faster form); both forms agree with float64 on ordinary
  # data, and a constant channel still gets its constant and D = 0 exactly.
  rng = np.random.default_rng(8)
  x = ref.skewed(rng, (23, 4), "lognormal") * 3.0 + 2.0
  x[:, 3] = np.float32(0.1)  # constant: Σ x / n misses 0.1 in float32
  mask = rng.random((23, 4)) > 0.3 if masked else None
  mask_np = np.ones((23, 4), bool) if mask is None else mask
  for safe in (True, False):
    s = Sample(jnp.asarray(x), (0,),
               mask=None if mask is None else jnp.asarray(mask),
               overflow_safe=safe)
    mu = np.asarray(gbn_jax.STATISTICS["mean"](s))
    sd = np.asarray(gbn_jax.DEVIATIONS["std"](s))
    for c in range(4):
      v = x[mask_np[:, c], c].astype(np.float64)
      np.testing.assert_allclose(mu[c], v.mean(), rtol=2e-6, err_msg=str(safe))
      np.testing.assert_allclose(sd[c], v.std(), rtol=2e-5, atol=1e-7,
                                 err_msg=str(safe))
    assert mu[3] == np.float32(0.1) and sd[3] == 0.0, safe
  with pytest.raises(ValueError, match="overflow_safe must be True or False"):
    Sample(jnp.asarray(x), (0,), overflow_safe=1)


def test_overflow_safe_averages_only_where_order_statistics_are():
  # the mean-based measures need Σx² to fit in float32 anyway (Guarantees);
  # any order-statistic measure keeps averages finite near the limits.
  for stat in gbn_jax.STATISTICS:
    for dev in gbn_jax.DEVIATIONS:
      m = gbn_jax.make_measures(stat, dev, levels=LEVELS)
      plain = stat == "mean" and dev in {
          "std", "mean_abs", "lp", "upper_semi", "lower_semi"}
      assert m.overflow_safe is (not plain), (stat, dev)


@pytest.mark.slow
def test_quantile_rank_rule_matches_numpy_inverted_cdf():
  # The reference's rank rule vs numpy's inverted_cdf, where α n is not
  # within float32 rounding of a whole number (there they must agree).
  rng = np.random.default_rng(4)
  ns = (1, 2, 7, 40, 101)
  alphas = (0.01, 0.13, 0.37, 0.5, 0.62, 0.99)
  # Each n is one channel of a (101, 5) array (the mask picks the sample),
  # every α in one compiled program.
  x = np.zeros((max(ns), len(ns)), np.float32)
  mask = np.zeros(x.shape, bool)
  samples = []
  for j, n in enumerate(ns):
    v = rng.standard_normal(n)
    samples.append(v)
    x[:n, j], mask[:n, j] = v, True
  results = many_statistics(
      x, [dict(statistic="quantile", deviation="std", alpha=alpha)
          for alpha in alphas], axes=0, mask=mask)
  checked = 0
  for j, (n, v) in enumerate(zip(ns, samples, strict=True)):
    for alpha, (c, _) in zip(alphas, results, strict=True):
      if abs(alpha * n - round(alpha * n)) < 1e-4:
        continue
      expected = np.quantile(v, alpha, method="inverted_cdf")
      assert ref.quantile(v, alpha) == expected, (n, alpha)
      assert float(c[j]) == np.float32(expected), (n, alpha)
      checked += 1
  assert checked >= 25
  # and once through the public batch_statistics
  c, _ = gbn_jax.batch_statistics(
      jnp.asarray(samples[3][:, None], jnp.float32), axes=0,
      statistic="quantile", deviation="std", alpha=0.37)
  assert float(c[0]) == np.float32(
      np.quantile(samples[3], 0.37, method="inverted_cdf"))


@pytest.mark.slow
def test_superquantile_is_the_exact_cvar():
  # Independent of both implementations: the CVaR of the empirical
  # distribution as an integral of its quantile function,
  # q̄_α = (1/(1-α)) ∫_α^1 F^-1(u) du, evaluated piece by piece.
  rng = np.random.default_rng(5)
  v = ref.skewed(rng, (29,), "lognormal").astype(np.float64)
  s = np.sort(v)
  n = len(s)
  for alpha in (0.05, 0.37, 0.5, 0.81):
    a = float(np.float32(alpha))
    integral = 0.0
    for i in range(n):  # F^-1(u) = s[i] on ((i)/n, (i+1)/n]
      lo, hi = max(i / n, a), (i + 1) / n
      integral += max(hi - lo, 0.0) * s[i]
    cvar = integral / (1 - a)
    assert ref.superquantile_value(v, alpha) == pytest.approx(cvar, rel=1e-12)
    _, d = gbn_jax.batch_statistics(v[:, None].astype(np.float32), axes=0,
                                    deviation="superquantile", alpha=alpha)
    assert float(d[0]) == pytest.approx(cvar - v.mean(), rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_gaussian_consistent_every_deviation():
  rng = np.random.default_rng(6)
  x = ref.skewed(rng, (31, 2), "gamma")
  params = _params(0.37, 3.0)
  for dev in sorted(set(gbn_jax.DEVIATIONS) - {"half_range"}):
    factor = gbn_jax.gaussian_consistency_factor(dev, **params)
    expected = ref.gaussian_consistency_factor(dev, **params)
    assert factor == pytest.approx(expected, rel=1e-7), dev
    c, d = gbn_jax.batch_statistics(x, axes=0, deviation=dev,
                                    gaussian_consistent=True, **params)
    rc, rd = ref.batch_statistics(x, axes=0, deviation=dev,
                                  gaussian_consistent=True, **params)
    _assert_close(d, rd, 10.0, f"gaussian_consistent {dev}")
    _assert_close(c, rc, 10.0, f"gaussian_consistent {dev} center")


@pytest.mark.slow
def test_gaussian_consistent_equals_sigma_on_normal_data():
  # The defining property: c·D ≈ σ on a large normal sample (σ = 2.5).
  rng = np.random.default_rng(7)
  x = (2.5 * rng.standard_normal((20000, 1)) + 1.0).astype(np.float32)
  params = _params(0.7, 3.0)
  for dev in sorted(set(gbn_jax.DEVIATIONS) - {"half_range"}):
    _, d = gbn_jax.batch_statistics(x, axes=0, deviation=dev,
                                    gaussian_consistent=True, **params)
    assert float(d[0]) == pytest.approx(2.5, rel=0.03), dev


@pytest.mark.slow
def test_half_precision_reduces_in_float32():
  rng = np.random.default_rng(8)
  x16 = jnp.asarray(ref.skewed(rng, (25, 3), "gamma"), jnp.bfloat16)
  x = np.asarray(x16.astype(jnp.float32))  # the values the layer sees
  for dev in ("std", "superquantile", "median_abs", "half_range"):
    c, d = gbn_jax.batch_statistics(x16, axes=0, deviation=dev, alpha=0.37)
    assert c.dtype == jnp.float32 and d.dtype == jnp.float32, dev
    rc, rd = ref.batch_statistics(x, axes=0, deviation=dev, alpha=0.37)
    _assert_close(c, rc, 10.0, f"bf16 {dev} center")
    _assert_close(d, rd, 10.0, f"bf16 {dev}")


def test_normalize_matches_reference():
  rng = np.random.default_rng(9)
  x = ref.skewed(rng, (12, 3, 2), "lognormal")
  scale = rng.standard_normal((2,)).astype(np.float32)
  bias = rng.standard_normal((2,)).astype(np.float32)
  c, d = gbn_jax.batch_statistics(x, axes=(0, 1), alpha=0.37)
  y = gbn_jax.normalize(x, c, jnp.square(d), axes=(0, 1), epsilon=1e-3,
                        scale=scale, bias=bias)
  rc, rd = ref.batch_statistics(x, axes=(0, 1), alpha=0.37)
  ry = ref.normalize(x, rc, rd, axes=(0, 1), epsilon=1e-3, scale=scale,
                     bias=bias)
  _assert_close(y, ry, 10.0, "normalize", rtol=1e-4)


@pytest.mark.slow
def test_half_precision_reductions_count_exactly():
  # force_float32_reductions=False reduces in bfloat16, but n must stay
  # exact: bfloat16(1001) = 1000 would move the quantile rank k.
  rng = np.random.default_rng(10)
  x16 = jnp.asarray(rng.standard_normal((1001, 2)), jnp.bfloat16)
  x = np.asarray(x16.astype(jnp.float32))
  mask = np.ones(x.shape, bool)
  mask[:2, 1] = False  # n = 999 in channel 1
  for m in (None, mask):
    for stat, alpha in (("median", 0.5), ("quantile", 0.37),
                        ("quantile", 0.9)):
      c, _ = gbn_jax.batch_statistics(
          x16, axes=0, statistic=stat, deviation="std", alpha=alpha, mask=m,
          force_float32_reductions=False)
      rc, _ = ref.batch_statistics(x, axes=0, statistic=stat,
                                   deviation="std", alpha=alpha, mask=m)
      np.testing.assert_array_equal(
          np.asarray(c, np.float64), rc,
          f"{stat} alpha={alpha} mask={m is not None}")


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 50),
    alpha=st.floats(0.01, 0.99),
    holes=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_samples_match_reference(n, alpha, holes, seed):
  # Random sample sizes (down to n = 1), levels and masks. The array shape
  # stays (50, 3) -- the mask picks the sample -- so eager ops compile once.
  rng = np.random.default_rng(seed)
  x = ref.skewed(rng, (50, 3), "lognormal")
  mask = np.arange(50)[:, None] < n
  if holes:
    mask = mask & (rng.random((50, 3)) < 0.6)
  _check_all_measures(x, 0, alpha, mask=np.broadcast_to(mask, x.shape))
