"""The selection engine started from a guess (``Sample(quantile_guess=...,
spread_guess=...)``), and the approximate mode's documented error bound.

Exactness must not depend on the guess: the true value, far-off values on
either side, NaN / ±inf guesses and zero / NaN / negative spreads all give
the sort's k-th value (ties, masks and the adversarial channels of
``test_selection`` included), on one device and under ``pmap`` with guesses
that differ between devices; gradients are the same with and without a
guess. The approximate mode's bound (``order_statistics`` docstring) is
checked on heavy-tailed and skewed data, with masks, cold and warm.

The guesses are arguments of one jitted program per test (the suite is
compile-bound), varied per channel and per call.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gbn_jax import catalogue
from gbn_jax import order_statistics as O
from gbn_jax.sample import Sample
from tests import reference as ref
from tests.test_selection import N, _adversarial, _np_key, _np_kth, _same

D = 8  # devices (tests/conftest.py)


def _guess_variants(true):
  """(V, C) float32 guesses of x_(k): per row one kind, for every channel."""
  true = np.asarray(true, np.float32)
  finite = np.where(np.isfinite(true), true, 0.0)
  big = np.finfo(np.float32).max
  return np.stack(
    [
      true,  # the answer itself
      finite - 1e6,  # far below
      finite + 1e6,  # far above
      np.full_like(true, -big),  # at the float32 limits
      np.full_like(true, big),
      np.full_like(true, np.nan),  # unusable: cold for that channel
      np.full_like(true, np.inf),
      np.full_like(true, -np.inf),
      np.zeros_like(true),
      np.nextafter(np.clip(finite, -1e38, 1e38), np.float32(np.inf)),  # 1 ulp
    ]
  ).astype(np.float32)


SPREADS = np.array(
  [1.0, 0.0, np.nan, np.inf, -1.0, 1e-30, 1e30, 3e38], np.float32
)


@functools.cache
def _warm_fn(masked: bool):
  def f(x, mask, k, guess, spread):
    s = Sample(x, (0,), mask=mask if masked else None, spread_guess=spread)
    v, _, _, ties, passes = O._select(s, k, guess)
    return v, ties, passes

  return jax.jit(f)


def _check_all_guesses(x, mask, k):
  """Every guess kind x every spread kind, rotated over the channels."""
  want = _np_kth(x, mask, k)
  c = x.shape[1]
  variants = _guess_variants(want)
  f = _warm_fn(mask is not None)
  for r in range(len(variants)):
    # Channel j gets guess kind (j + r) and spread kind (3 j + r): every
    # channel meets every guess kind, paired with changing spreads.
    guess = variants[(np.arange(c) + r) % len(variants), np.arange(c)]
    spread = SPREADS[(3 * np.arange(c) + r) % len(SPREADS)]
    v, ties, passes = f(x, mask, jnp.asarray(k, jnp.int32), guess, spread)
    assert _same(v, want), (r, np.asarray(v), want)
    for j in range(c):
      vals = x[:, j] if mask is None else x[mask[:, j], j]
      if vals.size:
        assert int(ties[j]) == np.sum(_np_key(vals) == _np_key(want[j]))
    assert 1 <= int(passes) <= O.max_passes()


@pytest.mark.parametrize("alpha", [1e-6, 0.25, 0.5, 0.9, 0.999999])
def test_exact_whatever_the_guess(alpha):
  x = _adversarial(np.random.default_rng(0))
  k = np.asarray(O.quantile_rank(alpha, jnp.full(x.shape[1], N, jnp.float32)))
  _check_all_guesses(x, None, k)


def test_exact_whatever_the_guess_with_masks_and_ties():
  rng = np.random.default_rng(1)
  x = _adversarial(rng)
  x[:, 0] = np.round(x[:, 0] * 2)  # ties
  mask = rng.random(x.shape) < 0.4
  mask[:, 1] = False  # an empty channel -> 0
  mask[:, 2] = False
  mask[rng.integers(N), 2] = True  # n = 1
  for alpha in (0.1, 0.5, 0.97):
    k = np.asarray(
      O.quantile_rank(alpha, jnp.asarray(mask.sum(0), jnp.float32))
    )
    _check_all_guesses(x, mask, k)


def test_public_quantile_uses_the_guess_and_stays_exact():
  # Through order_statistics.quantile and the catalogue, keys matched as
  # float32 levels (np.float32(0.3) finds the guess given for 0.3).
  rng = np.random.default_rng(2)
  x = rng.standard_normal((301, 5)).astype(np.float32)
  x[:, 1] = 7.0  # constant: with its value and spread 0, one pass
  true = np.asarray([ref.quantile(x[:, j], 0.3) for j in range(5)], np.float32)

  @jax.jit
  def f(x, guess, spread):
    s = Sample(
      x, (0,), quantile_guess={np.float32(0.3): guess}, spread_guess=spread
    )
    return (
      catalogue.quantile(s, alpha=0.3),
      O.quantile_passes(s, 0.3),
      O.quantile_passes(Sample(x, (0,)), 0.3),
    )

  for guess in (true, true + 50.0, np.full(5, np.nan, np.float32)):
    q, warm, cold = f(x, guess, np.where(np.arange(5) == 1, 0.0, 1.0))
    np.testing.assert_array_equal(q, true)
  # The true value and the true spread: the constant channel is done in the
  # first pass, and a warm start takes no more passes than a few extra.
  q, warm, cold = f(x, true, np.where(np.arange(5) == 1, 0.0, 1.0))
  assert int(warm) <= int(cold) + 2
  s = Sample(x[:, 1:2], (0,), quantile_guess={0.3: true[1:2]}, spread_guess=0.0)
  assert int(jax.jit(lambda: O.quantile_passes(s, 0.3))()) == 1


def test_guess_validation():
  x = jnp.ones((4, 3))
  with pytest.raises(TypeError, match="quantile_guess must map"):
    Sample(x, 0, quantile_guess=[0.5])
  with pytest.raises(TypeError, match="keys must be levels"):
    Sample(x, 0, quantile_guess={"0.5": jnp.zeros(3)})
  with pytest.raises(
    ValueError, match=r"quantile_guess\[0.5\] of shape \(2,\)"
  ):
    Sample(x, 0, quantile_guess={0.5: jnp.zeros(2)})
  with pytest.raises(ValueError, match="spread_guess of shape"):
    Sample(x, 0, spread_guess=jnp.zeros(4))
  with pytest.raises(TypeError, match="spread_guess must be a real array"):
    Sample(x, 0, spread_guess=jnp.zeros(3, bool))
  s = Sample(x, 0, quantile_guess={0.5: 1}, spread_guess=2)  # broadcast
  assert s.guess_for(0.5).shape == (3,) and s.spread_guess.shape == (3,)
  assert s.guess_for(0.25) is None


def _gradient_case():
  rng = np.random.default_rng(3)
  x = jnp.asarray(np.round(rng.standard_normal((40, 6)) * 3) / 3, jnp.float32)
  mask = jnp.asarray(rng.random((40, 6)) < 0.8)

  def sample(x, guess, levels):
    qg = None if guess is None else {a: guess + a for a in levels}
    return Sample(
      x,
      (0,),
      mask=mask,
      quantile_guess=qg,
      spread_guess=None if guess is None else jnp.ones(6),
    )

  return x, jnp.linspace(-1.0, 2.0, 6), sample


GUESSES = (jnp.zeros(6), jnp.full(6, 1e4), jnp.full(6, jnp.nan))


def test_gradients_with_and_without_guess_are_identical():
  # Same value, same ties -> the order statistics' own gradient, bit for
  # bit (masked, with ties).
  x, w, sample = _gradient_case()

  def loss(x, guess):
    s = sample(x, guess, (0.5, 0.9))
    return jnp.sum(w * O.quantile(s, 0.5)) + jnp.sum(w**2 * O.quantile(s, 0.9))

  grad = jax.jit(jax.grad(loss))
  cold = grad(x, None)
  assert np.count_nonzero(np.asarray(cold)) > 0
  for guess in GUESSES:
    np.testing.assert_array_equal(grad(x, guess), cold)


@pytest.mark.slow
def test_measure_gradients_with_and_without_guess_agree():
  # With the catalogue's sums around the order statistics (the superquantile
  # deviation, median_abs): equal up to float32 rounding (the compiled
  # programs differ, and with them the order XLA sums in).
  x, w, sample = _gradient_case()

  def loss(x, guess):
    s = sample(x, guess, (0.5, 0.9))
    total = jnp.sum(w * catalogue.quantile(s, alpha=0.9))
    total += jnp.sum(w**2 * catalogue.superquantile(s, alpha=0.9))
    return total + jnp.sum(catalogue.median_abs(s))

  grad = jax.jit(jax.grad(loss))
  cold = grad(x, None)
  for guess in GUESSES:
    np.testing.assert_allclose(grad(x, guess), cold, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Across devices.
# --------------------------------------------------------------------------


def _device_data():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((D * 16, 7)).astype(np.float32)
  x[:, 1] = np.round(x[:, 1])  # ties across devices
  x[::5, 2] = np.inf
  x[:, 3] = 1.5  # constant
  x[:, 4] = rng.standard_cauchy(D * 16)
  mask = rng.random(x.shape) < 0.75
  mask[:, 5] = False  # empty
  return x, mask


def test_pmap_exact_with_identical_and_different_guesses():
  # Each device passes its own guess (far apart, NaN on some devices, ±inf
  # on others); the engine makes them identical (pmax), so every device
  # counts at the same pivots and gets the one-device value.
  x, mask = _device_data()
  alpha = 0.7
  k = O.quantile_rank(alpha, jnp.asarray(mask.sum(0), jnp.float32))
  want = _np_kth(x, mask, np.asarray(k))

  def per_device(x, mask, guess, spread):
    s = Sample(
      x,
      (0,),
      mask=mask,
      axis_name="d",
      quantile_guess={alpha: guess},
      spread_guess=spread,
    )
    return O.quantile(s, alpha), O.quantile_passes(s, alpha)

  f = jax.pmap(per_device, axis_name="d")
  xp, mp = x.reshape(D, 16, 7), mask.reshape(D, 16, 7)
  same = np.broadcast_to(np.where(np.isfinite(want), want, 0.0), (D, 7))
  rng = np.random.default_rng(5)
  different = (same + rng.normal(0, 100, (D, 7))).astype(np.float32)
  different[1] = np.nan
  different[2, :4] = np.inf
  different[3, 3:] = -np.inf
  spreads = np.abs(rng.normal(1, 2, (D, 7))).astype(np.float32)
  spreads[4] = np.nan
  spreads[5] = -1.0
  for guess, spread in (
    (same, np.ones((D, 7))),
    (different, spreads),
    (np.full((D, 7), np.nan), spreads),
  ):
    q, passes = f(
      xp, mp, jnp.asarray(guess, jnp.float32), jnp.asarray(spread, jnp.float32)
    )
    for i in range(D):
      assert _same(q[i], want), (i, np.asarray(q[i]), want)
    assert len(set(np.asarray(passes).tolist())) == 1  # one loop, all devices


# --------------------------------------------------------------------------
# Approximate mode: the documented bound.
# --------------------------------------------------------------------------


def _heavy_and_skewed(n, rng):
  """(n, 12) float32: heavy-tailed and skewed channels, two scales each."""
  cols = []
  for scale, shift in ((1.0, 0.0), (30.0, -5.0)):
    cols += [
      rng.standard_t(2, n),  # heavy tails, finite mean
      rng.standard_cauchy(n),  # no mean
      rng.lognormal(0.0, 1.5, n),  # skewed
      rng.exponential(1.0, n),  # skewed
      -rng.lognormal(0.0, 1.0, n),  # skewed the other way
      np.round(rng.exponential(2.0, n)),  # skewed with ties
    ]
    cols[-6:] = [scale * c + shift for c in cols[-6:]]
  return np.stack(cols, -1).astype(np.float32)


@functools.cache
def _approx_fn(alpha):
  @jax.jit
  def f(x, mask, guess, spread):
    s = Sample(
      x,
      (0,),
      mask=mask,
      approximate=True,
      quantile_guess={alpha: guess},
      spread_guess=spread,
    )
    q, m = O.approximate_bracket(s, alpha)
    return (
      q,
      m,
      catalogue.quantile(s, alpha=alpha),
      catalogue.superquantile_value(s, alpha),
      O.quantile_passes(s, alpha),
    )

  return f


@pytest.mark.parametrize(
  "alpha",
  [
    pytest.param(0.1, marks=pytest.mark.slow),
    0.5,
    0.9,
    pytest.param(0.99, marks=pytest.mark.slow),
  ],
)
def test_approximate_bound_on_heavy_tailed_and_skewed_data(alpha):
  n = 4096
  rng = np.random.default_rng(6)
  x = _heavy_and_skewed(n, rng)
  c = x.shape[1]
  mask = np.ones(x.shape, bool)
  mask[:, 6:] = rng.random((n, c - 6)) < 0.6  # masked half
  valid = [x[mask[:, j], j].astype(np.float64) for j in range(c)]
  nv = mask.sum(0)
  q_ex = np.array([ref.quantile(v, alpha) for v in valid])
  sq_ex = np.array([ref.superquantile_value(v, alpha) for v in valid])
  t = (np.array([ref.quantile_rank(alpha, int(m)) for m in nv]) - 0.5) / nv
  tol = O.APPROX_BRACKET_SE * np.sqrt(nv * t * (1 - t))
  a = float(np.float32(alpha))
  # Cold (NaN guess), warm from a good guess (another sample's quantile),
  # and warm from a bad one (the distribution "moved": 10 spreads off).
  other = _heavy_and_skewed(n, np.random.default_rng(7))
  good = np.array([ref.quantile(other[mask[:, j], j], alpha) for j in range(c)])
  spread = np.array(
    [np.std(np.clip(v, *np.percentile(v, [5, 95]))) for v in valid]
  )
  for guess in (np.full(c, np.nan), good, good + 10 * spread):
    q, m, q_cat, sq, _ = _approx_fn(alpha)(
      x, mask, jnp.asarray(guess, jnp.float32), jnp.asarray(spread, jnp.float32)
    )
    q, m, sq = (
      np.asarray(q, np.float64),
      np.asarray(m),
      np.asarray(sq, np.float64),
    )
    np.testing.assert_array_equal(q_cat, q)  # the statistic is q̂
    for j, v in enumerate(valid):
      below = np.sum(v <= q[j])
      k = ref.quantile_rank(alpha, int(nv[j]))
      # Rank: within the bracket, and the bracket within the tolerance
      # (or finished exactly, q̂ = x_(k)).
      assert abs(below - k) <= m[j], (j, below, k, m[j])
      assert m[j] <= tol[j] or q[j] == q_ex[j], (j, m[j], tol[j])
      assert abs(below / nv[j] - a) < (m[j] + 1) / nv[j]
      # Superquantile (Rockafellar–Uryasev at q̂): above the exact value,
      # by at most |q̂ - q_α| |F_n(q̂) - α| / (1 - α); in float64 ...
      ru = q[j] + np.sum(np.maximum(v - q[j], 0.0)) / ((1 - a) * nv[j])
      excess = ru - sq_ex[j]
      scale = np.mean(np.abs(v)) + abs(q[j])
      bound = abs(q[j] - q_ex[j]) * abs(below / nv[j] - a) / (1 - a)
      # (1e-9: k = ceil(float32(α) n) may miss the real minimiser by an
      # ulp of α n, as the rank rule documents.)
      assert -1e-9 * scale <= excess <= bound + 1e-9 * scale, (j, excess, bound)
      # ... and the library's float32 value is that RU value.
      np.testing.assert_allclose(sq[j], ru, rtol=2e-5, atol=1e-5 * scale)


def test_approximate_typical_accuracy_and_passes():
  # On smooth data the interpolation lands well inside the bound (about
  # sqrt(m)/2 ranks), and from a good guess it takes one counting pass.
  n, c = 16384, 16
  rng = np.random.default_rng(8)
  x = (rng.standard_normal((n, c)) * np.linspace(0.5, 2, c)).astype(np.float32)
  for alpha in (0.5, 0.9):
    z = {0.5: 0.0, 0.9: 1.2815516}[alpha]
    guess = (z * np.linspace(0.5, 2, c)).astype(np.float32)  # population q_α
    spread = np.linspace(0.5, 2, c).astype(np.float32)
    q, m, _, _, passes = _approx_fn(alpha)(
      x, np.ones_like(x, bool), guess, spread
    )
    k = ref.quantile_rank(alpha, n)
    err = np.abs(np.sum(x <= np.asarray(q), 0) - k)
    assert np.all(err <= 2 * np.sqrt(np.asarray(m)) + 2), (err, m)
    assert np.all(err <= np.sqrt(n * alpha * (1 - alpha))), err  # < 1 SE
    assert int(passes) == 1


@pytest.mark.slow
def test_approximate_under_pmap_equals_one_device():
  # Counts, min and max are pooled exactly and place every pivot: from the
  # same (replicated) guess, or cold, every device gets the one-device
  # value on the concatenated batch (the same bracket), and from a guess
  # the same gradient.
  x, mask = _device_data()
  x = np.where(np.isfinite(x), x, 3.0).astype(np.float32)
  guess = jnp.asarray(
    [
      np.median(x[mask[:, j], j]) if mask[:, j].any() else 0.0 for j in range(7)
    ],
    jnp.float32,
  )
  spread = jnp.ones(7)

  def stats(x, mask, axis_name=None, warm=True):
    g = dict(quantile_guess={0.5: guess}, spread_guess=spread) if warm else {}
    s = Sample(x, (0,), mask=mask, approximate=True, axis_name=axis_name, **g)
    return catalogue.quantile(s, alpha=0.5), catalogue.superquantile(
      s, alpha=0.5
    )

  def loss(x, mask, axis_name=None):
    q, d = stats(x, mask, axis_name)
    return jnp.sum(
      jnp.linspace(-1, 1, 7) * q + jnp.where(jnp.isfinite(d), d, 0)
    )

  xp, mp = x.reshape(D, 16, 7), mask.reshape(D, 16, 7)
  for warm in (True, False):
    q1, d1 = jax.jit(functools.partial(stats, warm=warm))(x, mask)
    q, d = jax.pmap(
      functools.partial(stats, axis_name="d", warm=warm), axis_name="d"
    )(xp, mp)
    for i in range(D):
      np.testing.assert_array_equal(q[i], q[0])  # identical on every device
      # The same bracket; its interpolation may round differently (FMA) in
      # the two programs.
      np.testing.assert_allclose(q[i], q1, rtol=3e-7, atol=1e-7)
      np.testing.assert_allclose(d[i], d1, rtol=1e-5, atol=1e-6)
  g1 = jax.jit(jax.grad(loss))(x, mask)
  g = jax.pmap(jax.grad(functools.partial(loss, axis_name="d")), axis_name="d")(
    xp, mp
  )
  # pmap sums the D per-device losses' cotangents.
  np.testing.assert_allclose(
    np.asarray(g).reshape(x.shape), D * np.asarray(g1), rtol=1e-5, atol=1e-5
  )
