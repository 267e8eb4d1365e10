"""The selection engine: exact k-th smallest by counting, its gradient, and the
approximate mode. References are NumPy sorts and JAX's gradient of the
sort-based reference (``kth_smallest_by_sort``)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gbn_jax
from gbn_jax import order_statistics as O
from gbn_jax.sample import Sample
from tests.selection_patch import selection

N = 257  # values per channel: odd, not a power of two


def _adversarial(rng):
  """(N, C) float32: one kind of hard data per channel."""
  g = rng.standard_normal(N)
  cols = [
    g,  # smooth
    rng.standard_cauchy(N),  # heavy tails
    np.exp(8 * g),  # 3500 orders of magnitude
    np.round(g * 2),  # many ties
    np.full(N, 3.25),  # all equal
    np.where(rng.random(N) < 0.3, np.inf, g),  # +inf
    np.where(rng.random(N) < 0.3, -np.inf, g),  # -inf
    np.where(rng.random(N) < 0.5, np.float32(1e-40) * g, 0.0),  # denormals, 0
    np.where(rng.random(N) < 0.5, -0.0, 0.0),  # signed zeros only
    np.maximum(g, 0),  # ReLU output: half zeros
    np.float32(1.17549435e-38) * np.sign(g) * (1 + (np.arange(N) % 3)),  # tiny
    rng.integers(0, 2, N) * 1e30,  # two values, far apart
    np.where(
      np.arange(N) % 2 == 0,
      np.float32(np.finfo(np.float32).max),
      -np.finfo(np.float32).max,
    ),
  ]
  return np.stack(cols, -1).astype(np.float32)


def _np_kth(x, mask, k):
  """NumPy reference: per channel, sorted valid values (NaN last)[k - 1]."""
  out = []
  for c in range(x.shape[1]):
    v = np.sort(x[mask[:, c], c]) if mask is not None else np.sort(x[:, c])
    out.append(v[k[c] - 1] if v.size else np.float32(0))
  return np.array(out, np.float32)


def _np_key(v):
  """NumPy twin of O.float_to_key (±0 -> 0, NaN after +inf)."""
  b = np.asarray(v, np.float32).view(np.int32).astype(np.int64)
  m = b & 0x7FFFFFFF
  key = np.where(b < 0, -m, m)
  return np.where(m > 0x7F800000, 0x7F800001, key)


def _same(a, b):
  """Equal as values (−0 == +0), NaN where NaN."""
  a, b = np.asarray(a), np.asarray(b)
  return np.array_equal(a, b, equal_nan=True)


@functools.cache
def _select_fn(masked: bool):
  def f(x, mask, k):
    s = Sample(x, (0,), mask=mask if masked else None)
    v, _, _, ties, passes = O._select(s, k)
    return v, ties, passes

  return jax.jit(f)


def _check(x, mask, k):
  v, ties, passes = _select_fn(mask is not None)(
    x, mask, jnp.asarray(k, jnp.int32)
  )
  ref = _np_kth(x, mask, k)
  assert _same(v, ref), (np.asarray(v), ref)
  # The tie count is #{valid x == x_(k)} (as keys: -0 and +0 together).
  for c in range(x.shape[1]):
    vals = x[:, c] if mask is None else x[mask[:, c], c]
    if vals.size:
      want = np.sum(_np_key(vals) == _np_key(ref[c]))
      assert int(ties[c]) == want
  assert 1 <= int(passes) <= O.max_passes()


@pytest.mark.parametrize(
  "alpha", [1e-6, 0.001, 0.25, 0.5, 0.9, 0.999, 0.999999]
)
def test_exact_on_adversarial_data(alpha):
  x = _adversarial(np.random.default_rng(0))
  k = np.asarray(O.quantile_rank(alpha, jnp.full(x.shape[1], N, jnp.float32)))
  _check(x, None, k)


def test_exact_every_rank_small_channel():
  # Every k = 1..n on tied data with infinities; n = 7.
  rng = np.random.default_rng(1)
  base = np.array([0.0, -0.0, 1.0, 1.0, np.inf, -np.inf, 1e-45], np.float32)
  x = np.stack([rng.permutation(base) for _ in range(7)], -1)
  _check(x, None, np.arange(1, 8))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
  seed=st.integers(0, 2**31 - 1),
  alpha=st.floats(1e-4, 1 - 1e-4),
  p_valid=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
)
def test_exact_with_masks(seed, alpha, p_valid):
  rng = np.random.default_rng(seed)
  x = _adversarial(rng)
  mask = rng.random(x.shape) < p_valid
  mask[:, 0] = False  # an empty channel -> 0
  mask[:, 1] = False
  mask[rng.integers(N), 1] = True  # n = 1
  n = mask.sum(0)
  k = np.asarray(O.quantile_rank(alpha, jnp.asarray(n, jnp.float32)))
  _check(x, mask, k)
  v = _select_fn(True)(x, mask, jnp.asarray(k))[0]
  assert float(v[0]) == 0.0


@pytest.mark.slow
def test_exact_beyond_the_packed_counts():
  # Two counts share one uint32 sum while a channel has < 2**16 slots per
  # device; more slots take separate float32 counts. Both exact.
  rng = np.random.default_rng(11)
  assert O._PACK_BITS == 16
  for n in (2**16 - 1, 2**16 + 3):
    x = np.stack(
      [
        rng.standard_normal(n),
        np.round(rng.standard_normal(n) * 3),
        rng.standard_cauchy(n),
      ],
      -1,
    ).astype(np.float32)
    k = np.array([1, n // 2 + 1, n - 7])
    _check(x, None, k)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [True, False])
def test_exact_over_several_reduction_axes_with_mask(channels_last):
  # NHWC input, statistics over (0, 1, 2): the packed counts run on the
  # flattened (m, C) view, the mask too. NCHW, over (0, 2, 3): over the
  # axes as they are.
  rng = np.random.default_rng(12)
  x = rng.standard_normal((6, 5, 7, 4)).astype(np.float32)
  x[..., 2] = np.round(x[..., 2])
  mask = rng.random(x.shape) < 0.6
  axes = (0, 1, 2)
  if not channels_last:
    x, mask, axes = (
      x.transpose(0, 3, 1, 2),
      mask.transpose(0, 3, 1, 2),
      (0, 2, 3),
    )
  flat_x = np.moveaxis(x, 1, -1) if not channels_last else x
  flat_m = np.moveaxis(mask, 1, -1) if not channels_last else mask
  for alpha in (0.1, 0.93):
    for m, fm in ((None, None), (mask, flat_m.reshape(-1, 4))):
      s = Sample(
        jnp.asarray(x), axes, mask=None if m is None else jnp.asarray(m)
      )
      got = jax.jit(lambda s=s, a=alpha: O.quantile(s, a))()
      flat = flat_x.reshape(-1, 4)
      n = flat.shape[0] if m is None else fm.sum(0)
      k = np.asarray(
        O.quantile_rank(
          alpha, jnp.broadcast_to(jnp.asarray(n, jnp.float32), (4,))
        )
      )
      assert _same(got, _np_kth(flat, fm, k))


def test_n_equals_one():
  x = np.array([[-2.5, np.inf, 1e-42, 0.0]], np.float32)
  _check(x, None, np.ones(4, np.int64))


def test_nan_stays_in_its_channel():
  rng = np.random.default_rng(2)
  x = _adversarial(rng)
  k = np.asarray(O.quantile_rank(0.5, jnp.full(x.shape[1], N, jnp.float32)))
  clean = _select_fn(False)(x, None, jnp.asarray(k))[0]
  y = x.copy()
  y[::5, 3] = np.nan  # channel 3: 52 NaNs, sorted last
  dirty = _select_fn(False)(y, None, jnp.asarray(k))[0]
  others = [c for c in range(x.shape[1]) if c != 3]
  # Bit for bit equal elsewhere.
  assert np.array_equal(
    np.asarray(clean)[others].view(np.int32),
    np.asarray(dirty)[others].view(np.int32),
  )
  # The NaN channel gives what the sort gives (NaN iff k > n - #NaN).
  _check(y, None, k)
  k_hi = k.copy()
  k_hi[3] = N
  assert np.isnan(
    np.asarray(_select_fn(False)(y, None, jnp.asarray(k_hi))[0])[3]
  )


@pytest.mark.slow
def test_half_precision_input():
  x = _adversarial(np.random.default_rng(3))[:, :4].astype(jnp.bfloat16)
  s = Sample(jnp.asarray(x), (0,))
  q = O.quantile(s, 0.3)
  ref = _np_kth(
    np.asarray(x, np.float32), None, [int(np.ceil(np.float32(0.3) * N))] * 4
  )
  assert _same(q, ref)


# --------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------


def _stats_loss(kth, deviation, x, mask=None, **kw):
  with selection(kth):
    c, d = gbn_jax.batch_statistics(
      x, axes=(0, 1), deviation=deviation, mask=mask, **kw
    )
  w = jnp.linspace(-1.0, 2.0, c.size).reshape(c.shape)
  return jnp.sum(w * c) + jnp.sum(w**2 * d)


@pytest.mark.slow
@pytest.mark.parametrize(
  "deviation,kw",
  [
    ("superquantile", dict(alpha=0.5)),
    ("superquantile", dict(alpha=0.83)),  # alpha n not whole
    ("mixed_superquantile", dict(levels=(0.3, 0.9), weights=(0.25, 0.75))),
  ],
)
def test_gradient_matches_sort_reference(deviation, kw):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((9, 11, 5)), jnp.float32)
  mask = jnp.asarray(rng.random((9, 11, 1)) < 0.8)
  for m in (None, mask) if deviation == "superquantile" else (None,):
    # jitted: eager differentiation would compile the engine op by op
    g = jax.jit(
      jax.grad(
        functools.partial(_stats_loss, O.kth_smallest, deviation, mask=m, **kw)
      )
    )(x)
    ref = jax.jit(
      jax.grad(
        functools.partial(
          _stats_loss, O.kth_smallest_by_sort, deviation, mask=m, **kw
        )
      )
    )(x)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradient_splits_ties():
  # Ties share the unit of gradient: sum over the tie group is 1.
  x = jnp.asarray([[1.0, 2.0, 2.0, 2.0, 5.0]], jnp.float32).T  # (5, 1)
  f = lambda x: O.quantile(Sample(x, (0,)), 0.5)[0]
  g = np.asarray(jax.jit(jax.grad(f))(x))[:, 0]
  np.testing.assert_allclose(g, [0, 1 / 3, 1 / 3, 1 / 3, 0], rtol=1e-6)
  # Single element: exactly the sort's gradient.
  y = jnp.asarray([[3.0, 1.0, 2.0]]).T
  g = jax.jit(jax.grad(lambda y: O.quantile(Sample(y, (0,)), 0.5)[0]))(y)
  ref = jax.jit(
    jax.grad(lambda y: O.kth_smallest_by_sort(Sample(y, (0,)), jnp.int32(2))[0])
  )(y)
  np.testing.assert_array_equal(g, ref)
  # Forward mode too (custom_jvp): jacfwd equals the sort's.
  fwd = jax.jit(jax.jacfwd(lambda y: O.quantile(Sample(y, (0,)), 0.5)))(y)
  ref = jax.jit(
    jax.jacfwd(lambda y: O.kth_smallest_by_sort(Sample(y, (0,)), jnp.int32(2)))
  )(y)
  np.testing.assert_array_equal(fwd, ref)


@pytest.mark.slow
def test_backward_is_elementwise_no_scatter_no_sort():
  x = jnp.ones((16, 8, 8, 4))
  f = lambda x: jnp.sum(
    gbn_jax.batch_statistics(x, axes=(0, 1, 2), deviation="superquantile")[1]
  )
  hlo = jax.jit(jax.grad(f)).lower(x).compile().as_text()
  assert not re.search(r"\sscatter\(", hlo)
  assert not re.search(r"\ssort\(", hlo)
  # The reference does sort (the check above can fail).
  with selection(O.kth_smallest_by_sort):
    hlo_ref = jax.jit(jax.grad(f)).lower(x).compile().as_text()
  assert re.search(r"\ssort\(", hlo_ref)


# --------------------------------------------------------------------------
# Approximate mode.
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_approximate_mode_error_vs_exact():
  rng = np.random.default_rng(5)
  x = jnp.asarray(
    rng.standard_normal((64, 8, 8, 6)) * np.arange(1, 7), jnp.float32
  )
  n = 64 * 8 * 8
  for alpha in (0.5, 0.9):
    kw = dict(axes=(0, 1, 2), deviation="superquantile", alpha=alpha)
    c_ex, d_ex = gbn_jax.batch_statistics(x, **kw)
    c_ap, d_ap = gbn_jax.batch_statistics(x, approximate=True, **kw)
    assert not np.array_equal(c_ap, c_ex)  # it is a different estimator
    # Rank of the approximate quantile within the full sample: inside its
    # final bracket of m values, m within the documented tolerance
    # (order_statistics: Approximate mode); test_warm_start.py checks the
    # bound on heavy-tailed and skewed data.
    s = Sample(x, (0, 1, 2), approximate=True)
    q, m = jax.jit(lambda s=s, a=alpha: O.approximate_bracket(s, a))()
    # (Cold, the first pivots come from the mean, whose rounding differs
    # between the two programs: a nearby bracket.)
    np.testing.assert_allclose(q, c_ap, rtol=1e-3)
    xs = np.asarray(x).reshape(n, 6)
    k = int(np.ceil(np.float32(alpha) * n))
    assert np.all(np.abs((xs <= np.asarray(q)).sum(0) - k) <= np.asarray(m))
    t = (k - 0.5) / n
    assert np.all(
      np.asarray(m) <= O.APPROX_BRACKET_SE * np.sqrt(n * t * (1 - t))
    )
    # Rockafellar–Uryasev at any point bounds the superquantile from above,
    # and the error is second order: small relative to the deviation.
    assert np.all(np.asarray(d_ap) >= np.asarray(d_ex) - 1e-5 * np.abs(d_ex))
    np.testing.assert_allclose(d_ap, d_ex, rtol=0.01)


def test_approximate_mode_module_and_validation():
  x = jnp.asarray(
    np.random.default_rng(6).standard_normal((32, 4)), jnp.float32
  )
  m = gbn_jax.GeneralizedBatchNorm(use_running_average=False, approximate=True)
  v = m.init(jax.random.PRNGKey(0), x)
  y, _ = m.apply(v, x, mutable=["batch_stats"])
  assert np.all(np.isfinite(y))
  g = jax.grad(
    lambda x: jnp.sum(m.apply(v, x, mutable=["batch_stats"])[0] ** 3)
  )(x)
  assert np.all(np.isfinite(g))
  with pytest.raises(ValueError, match="approximate"):
    gbn_jax.GeneralizedBatchNorm(approximate="yes")
  with pytest.raises(ValueError, match="approximate"):
    gbn_jax.batch_statistics(x, axes=0, approximate=1)


def _adversarial_to_subsample(n, stride):
  """(n, 4) float32 where the strided subsample misleads the first pass."""
  i = np.arange(n)
  g = np.random.default_rng(5).standard_normal(n)
  cols = [
    np.where(i % stride == 0, 1e6, g),  # the subsample sees only outliers
    np.where(i % stride == 0, 0.0, 1e3 + g),  # ... or only a far cluster
    np.where(i % stride == 0, g, 7.0),  # the rest is one tied value
    np.where(i % stride == 0, g, np.float32(1e-42) * g),  # rest denormal
  ]
  return np.stack(cols, -1).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.01, 0.5, 0.93])
def test_exact_when_the_first_bracket_misses(alpha):
  # Pivot subsample stride 4 at n = 4 * PIVOT_SUBSAMPLE_SIZE: the normal fit
  # puts the first pivots far off; the counts, snaps and bisection recover.
  n = 4 * O.PIVOT_SUBSAMPLE_SIZE
  x = _adversarial_to_subsample(n, 4)
  k = np.asarray(O.quantile_rank(alpha, jnp.full(x.shape[1], n, jnp.float32)))
  _check(x, None, k)


@pytest.mark.slow
def test_exact_when_interpolation_is_blind():
  # Tight clusters far apart (rank interpolation places pivots in the empty
  # gaps: counting stalls, so the snap must run) and a point mass at the
  # target next to values one ulp away.
  rng = np.random.default_rng(6)
  n = 3001
  c = rng.integers(0, 3, n)
  clusters = np.array([-1e20, 0.5, 1e20])[c] * (
    1 + 1e-6 * rng.standard_normal(n)
  )
  one = np.float32(1.0)
  ulps = np.where(rng.random(n) < 0.5, one, np.nextafter(one, np.float32(2)))
  ulps = np.where(rng.random(n) < 0.1, np.nextafter(one, np.float32(0)), ulps)
  x = np.stack([clusters, ulps], -1).astype(np.float32)
  for alpha in (0.2, 0.5, 0.8):
    k = np.asarray(O.quantile_rank(alpha, jnp.full(2, n, jnp.float32)))
    _check(x, None, k)
