"""Guarantee 2: degenerate data gives finite output, never NaN.

- a constant channel: D = 0 exactly and the output is β exactly, gradients
  finite;
- a batch of one: the same (every channel is constant);
- a channel whose mask is all False: S = D = 0, finite output and gradients;
- values near the float32 limits, order-statistic measures: S exact, D
  finite and accurate, output finite, for any |x| <= FLT_MAX / 2;
- ±inf in a channel (the rule documented in docs/GUARANTEES.md): order
  statistics exact in the extended reals, D = +inf or NaN (never a finite
  value), output β at the finite entries when S is finite and D = +inf, NaN
  otherwise; every other channel bit for bit as without the inf;
- a NaN in a channel: that channel's output is all NaN, every other channel
  bit for bit as without it; a masked-out inf/NaN changes nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gbn_jax
from gbn_jax import batch_statistics, normalize
from tests import _ref_reliability as ref
from tests.batched import many_statistics

F32_MAX = float(np.finfo(np.float32).max)
DEVS = sorted(gbn_jax.DEVIATIONS)
FAST_DEVS = {"std", "mean_abs", "lp", "upper_semi", "lower_semi",
             "superquantile"}  # the rest run in the slow tier
ORDER_STATS = ["quantile", "median", "midrange", "mixed_quantile"]
ORDER_DEVS = ["superquantile", "median_abs", "half_range",
              "mixed_superquantile"]
LEVELS = (0.3, 0.8)


def _params(deviation, statistic=None):
  kw = dict(alpha=0.7, p=3.0)
  if "mixed" in deviation or (statistic or "").startswith("mixed"):
    kw.update(levels=LEVELS, weights=(0.4, 0.6))
  return kw


@jax.jit
def _identity(v):
  return v


def _layer(x, deviation, statistic=None, mask=None, gaussian=False):
  """(S, D, y) with gamma = 2, beta = 0.25 (the ``GeneralizedBatchNorm``
  math)."""
  kw = _params(deviation, statistic)
  if gaussian and deviation == "half_range":
    gaussian = False
  s, d = batch_statistics(x, axes=0, statistic=statistic, deviation=deviation,
                          mask=mask, gaussian_consistent=gaussian, **kw)
  c = x.shape[-1]
  y = normalize(x, s, jnp.square(d), axes=0, scale=jnp.full((c,), 2.0),
                bias=jnp.full((c,), 0.25))
  return s, d, y


# one compilation per configuration and shape (un-jitted calls would
# re-compile any lax.while_loop of the selection engine every time)
_jit_layer = jax.jit(_layer,
                     static_argnames=("deviation", "statistic", "gaussian"))


_jit_stats = jax.jit(batch_statistics, static_argnames=(
    "axes", "statistic", "deviation", "alpha", "p", "levels", "weights"))


@jax.jit
def _normalize(x, s, d):
  """The output of ``_layer`` from its (S, D)."""
  c = x.shape[-1]
  return normalize(x, s, jnp.square(d), axes=0, scale=jnp.full((c,), 2.0),
                   bias=jnp.full((c,), 0.25))


@functools.partial(jax.jit, static_argnames=("deviations",))
def _layer_grads(x, mask, deviations):
  """d/dx of sum(y * w) through ``_layer`` for each deviation, ONE program."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
  return tuple(
      jax.grad(lambda v, dev=dev: jnp.sum(_layer(v, dev, None, mask)[2] * w))(x)
      for dev in deviations)


def _grads_finite(x, mask=None):
  """{deviation: every gradient entry finite} for every deviation."""
  grads = _layer_grads(x, mask, tuple(DEVS))
  return {dev: bool(jnp.all(jnp.isfinite(g)))
          for dev, g in zip(DEVS, grads, strict=True)}


ALL_STATS = ["mean", "median", "quantile", "midrange", "mixed_quantile"]


def _layers(x, mask=None, statistics=ALL_STATS, deviations=DEVS):
  """{(statistic, deviation): (S, D, y)}: ``_layer`` for every pair.

  S and D are separate measures (docs/SPEC.md §2: any statistic pairs with any
  deviation), so each is computed once, all in one compiled program
  (tests/batched.py), and paired here; ``statistic=None`` is the natural one.
  y = ``_normalize(x, S, D)``, the layer's output. The public path
  (``_jit_layer``) is checked against this in ``test_layers_equal_public_path``.
  """
  configs = ([dict(deviation=dev, **_params(dev)) for dev in deviations]
             + [dict(statistic=st, deviation="std", **_params("std", st))
                for st in statistics])
  res = many_statistics(x, configs, axes=0, mask=mask)
  natural = dict(zip(deviations, res[:len(deviations)], strict=True))
  by_stat = {st: r[0] for st, r in zip(statistics, res[len(deviations):],
                                        strict=True)}
  out = {}
  for dev in deviations:
    for st in [None, *statistics]:
      s = natural[dev][0] if st is None else by_stat[st]
      d = natural[dev][1]
      out[(st, dev)] = (s, d, _normalize(x, s, d))
  return out


# ---------------------------------------------------------------------------
# Constant channels, batch of one, empty channels.
# ---------------------------------------------------------------------------

CONSTANTS = [0.1, -7.3, 1e-40, 3e-3, 1e30, -F32_MAX / 2]


def _ftz(v):
  v = np.asarray(v, np.float32)
  return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0), v)


# the mean-based deviations and the default (superquantile) in the fast
# tier, the other order-statistic deviations slow
@pytest.mark.parametrize("deviation", [
    d if d in FAST_DEVS else pytest.param(d, marks=pytest.mark.slow)
    for d in DEVS])
def test_constant_channel_gives_beta_exactly(deviation):
  consts = np.asarray(CONSTANTS, np.float32)
  x = jnp.asarray(np.broadcast_to(consts, (7, consts.size)))
  cases = [(statistic, gaussian and deviation != "half_range")
           for statistic, gaussian in ((None, False), (None, True),
                                       ("mean", False), ("median", False),
                                       ("midrange", False))]
  # every configuration on one Sample in one compiled program; the output is
  # _layer's normalize of each (S, D)
  results = many_statistics(
      x, [dict(statistic=statistic, deviation=deviation,
               gaussian_consistent=gaussian, **_params(deviation, statistic))
          for statistic, gaussian in cases], axes=0)
  for (statistic, _), (s, d) in zip(cases, results, strict=True):
    y = _normalize(x, s, d)
    np.testing.assert_array_equal(np.asarray(d), 0.0)
    # XLA flushes subnormals to zero (CPU and GPU): S is c, or 0 for 1e-40
    s = np.asarray(s)
    assert ((s == consts) | (s == _ftz(consts))).all(), (statistic, s)
    np.testing.assert_array_equal(np.asarray(y), 0.25)
  # and once through the public path (batch_statistics + normalize)
  _, d, y = _jit_layer(x, deviation, None)
  np.testing.assert_array_equal(np.asarray(d), 0.0)
  np.testing.assert_array_equal(np.asarray(y), 0.25)
  assert _grads_finite(x[:, :4])[deviation]  # moderate constants


@pytest.mark.slow
def test_constant_channel_module_and_running_averages():
  x = jnp.broadcast_to(jnp.asarray([0.1, -7.3, 1e-40, 1e30]), (5, 4))
  outs = _apply_modules(x, bias_init=jax.nn.initializers.constant(0.5))
  for dev, (y, upd) in zip(DEVS, outs, strict=True):
    np.testing.assert_array_equal(np.asarray(y), 0.5, err_msg=dev)
    st = upd["batch_stats"]
    np.testing.assert_allclose(np.asarray(st["mean"]), 0.01 * _ftz(x[0]),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st["var"]), 0.99, rtol=1e-6)


def _apply_modules(x, **fields):
  """(y, updates) of a train-mode ``GeneralizedBatchNorm`` for every
  deviation, all applied in one compiled program."""
  mods = [gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                       deviation=dev, **fields, **_params(dev))
          for dev in DEVS]
  variables = [m.init(jax.random.key(0), x) for m in mods]
  apply_all = jax.jit(lambda vs, x: [m.apply(v, x, mutable=["batch_stats"])
                                     for m, v in zip(mods, vs, strict=True)])
  return apply_all(variables, x)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 5), (1, 1, 1, 5)])
def test_batch_of_one(shape):
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape) * 10, jnp.float32)
  axes = tuple(range(len(shape) - 1))
  configs = [dict(statistic=stat, deviation=dev, **_params(dev, stat))
             for dev in DEVS for stat in (None, "mean")]
  # every configuration on one Sample, in one compiled program
  for cfg, (s, d) in zip(configs, many_statistics(x, configs, axes=axes),
                         strict=True):
    np.testing.assert_array_equal(np.asarray(d), 0.0, err_msg=str(cfg))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(x).reshape(-1))
  for dev, (y, _) in zip(DEVS, _apply_modules(x), strict=True):
    np.testing.assert_array_equal(np.asarray(y), 0.0, err_msg=dev)
  assert all(_grads_finite(x.reshape(1, -1)).values())


@pytest.mark.slow
@pytest.mark.parametrize("deviation", DEVS)
def test_all_false_mask_channel_is_finite(deviation):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  mask = np.ones((6, 3), bool)
  mask[:, 1] = False  # channel 1: no valid value
  mask[0, 2] = False
  s, d, y = _layers(x, jnp.asarray(mask))[(None, deviation)]
  assert np.isfinite(np.asarray(y)).all()
  assert float(s[1]) == 0.0 and float(d[1]) == 0.0
  # the other channels: the masked reference
  rs, rd = ref.batch_statistics(np.asarray(x), (0,), deviation_name=deviation,
                                mask=mask, **_params(deviation))
  np.testing.assert_allclose(np.asarray(s)[[0, 2]], rs[[0, 2]], rtol=2e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(d)[[0, 2]], rd[[0, 2]], rtol=2e-5,
                             atol=1e-6)
  assert _grads_finite(x, jnp.asarray(mask))[deviation]


@pytest.mark.slow
def test_module_all_false_mask_keeps_running_averages_finite():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 2)), jnp.float32)
  m = gbn_jax.GeneralizedBatchNorm(use_running_average=False)
  v = m.init(jax.random.key(0), x)
  y, upd = jax.jit(functools.partial(m.apply, mutable=["batch_stats"]))(
      v, x, mask=jnp.zeros((4, 2), bool))
  assert np.isfinite(np.asarray(y)).all()
  for leaf in jax.tree_util.tree_leaves(upd):
    assert np.isfinite(np.asarray(leaf)).all()


# ---------------------------------------------------------------------------
# Near the float32 limits (order-statistic measures).
# ---------------------------------------------------------------------------

def _extreme_batch(rng, scale):
  x = rng.uniform(-1, 1, size=(11, 3)) * scale
  x[0, 0], x[1, 0] = scale, -scale          # the extremes themselves
  x[:, 1] = np.abs(x[:, 1])                 # one channel all positive
  # tiny normal numbers next to huge values (subnormals are flushed by XLA)
  x[2:5, 2] = rng.choice([-1, 1], 3) * rng.uniform(1, 2, 3) * 1e-37
  return np.asarray(x, np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("statistic", ORDER_STATS)
def test_near_float32_limits_order_statistic_measures(statistic):
  rng = np.random.default_rng(4)
  for scale in (F32_MAX / 2, 1e-30):  # huge, and tiny (D^2 underflows)
    x = _extreme_batch(rng, scale)
    layers = _layers(jnp.asarray(x))
    for dev in ORDER_DEVS:
      kw = _params(dev, statistic)
      s, d, y = layers[(statistic, dev)]
      s, d, y = map(np.asarray, (s, d, y))
      rs, rd = ref.batch_statistics(x, (0,), statistic_name=statistic,
                                    deviation_name=dev, **kw)
      assert np.isfinite(y).all(), (scale, dev)
      assert np.isfinite(d).all() and (d >= 0).all(), (scale, dev)
      if statistic in ("quantile", "median"):
        np.testing.assert_array_equal(s, rs.astype(np.float32))  # exact
      else:
        np.testing.assert_allclose(s, rs, rtol=1e-6, atol=1e-37 * (scale < 1))
      np.testing.assert_allclose(d, rd, rtol=1e-5, atol=1e-37 * (scale < 1))


def test_near_float32_limits_mean_based_configurations():
  # The mean with a mean-based deviation sums, then divides (faster): D may
  # overflow to +inf there (documented), but μ is summed overflow-safely, so
  # S stays accurate and the output finite (β where D = inf).
  rng = np.random.default_rng(7)
  x = _extreme_batch(rng, F32_MAX / 2)
  for dev in ("std", "mean_abs", "lp", "upper_semi", "lower_semi"):
    kw = _params(dev, "mean")
    assert not gbn_jax.make_measures("mean", dev, **kw).overflow_safe
    s, d = batch_statistics(jnp.asarray(x), axes=0, statistic="mean",
                            deviation=dev, **kw)
    s, d = np.asarray(s), np.asarray(d)
    np.testing.assert_allclose(s, x.astype(np.float64).mean(0), rtol=1e-6)
    assert (np.isinf(d) | np.isfinite(d)).all() and (d >= 0).all(), dev
    assert np.isinf(d[0]), dev  # channel 0 holds ±FLT_MAX/2: its sums overflow
    y = np.asarray(_normalize(jnp.asarray(x), jnp.asarray(s), jnp.asarray(d)))
    assert np.isfinite(y).all(), dev


@pytest.mark.slow
def test_order_statistics_exact_over_the_whole_float32_range():
  rng = np.random.default_rng(5)
  x = rng.uniform(-1, 1, size=(16, 2)) * F32_MAX
  x[0, 0], x[1, 0], x[2, 1] = F32_MAX, -F32_MAX, np.finfo(np.float32).tiny
  x = np.asarray(x, np.float32)
  for alpha in (0.01, 0.3, 0.5, 0.99):
    s, d = _jit_stats(jnp.asarray(x), axes=0, statistic="quantile",
                      deviation="half_range", alpha=alpha)
    expect = [ref.quantile(x[:, c].astype(np.float64), alpha) for c in range(2)]
    np.testing.assert_array_equal(np.asarray(s), np.float32(expect))
    np.testing.assert_allclose(np.asarray(d), (x.max(0) / 2 - x.min(0) / 2),
                               rtol=1e-7)


# ---------------------------------------------------------------------------
# ±inf and NaN: the channel is documented, the others untouched bit for bit.
# ---------------------------------------------------------------------------

def _other_channels_identical(a, b, channel):
  keep = [c for c in range(a.shape[-1]) if c != channel]
  np.testing.assert_array_equal(np.asarray(a)[..., keep],
                                np.asarray(b)[..., keep])


@pytest.mark.slow
@pytest.mark.parametrize("deviation", DEVS)
def test_inf_in_a_channel(deviation):
  rng = np.random.default_rng(6)
  base = np.asarray(rng.normal(size=(9, 4)), np.float32)
  clean = base.copy()
  clean[:, 0] = rng.normal(size=9)  # channel 0 replaced by other finite data
  x = base.copy()
  x[3, 0] = np.inf      # channel 0: +inf
  x[4, 1] = -np.inf     # channel 1: -inf
  x[5, 2], x[6, 2] = np.inf, -np.inf  # channel 2: both
  clean[:, 1:3] = rng.normal(size=(9, 2))
  layers, clean_layers = _layers(jnp.asarray(x)), _layers(jnp.asarray(clean))
  for statistic in (None, "mean", "median", "quantile", "midrange"):
    s, d, y = map(np.asarray, layers[(statistic, deviation)])
    s2, d2, y2 = map(np.asarray, clean_layers[(statistic, deviation)])
    for a, b in ((s, s2), (d, d2), (y, y2)):  # channel 3 bit for bit
      np.testing.assert_array_equal(a[..., 3], b[..., 3])
    stat = statistic or ref.NATURAL[deviation]
    for c in range(3):
      v = x[:, c].astype(np.float64)
      # D is never a (wrong) finite number for a channel holding ±inf
      assert d[c] == np.inf or np.isnan(d[c]), (statistic, c, d[c])
      if stat in ("quantile", "median"):  # exact in the extended reals
        assert s[c] == ref.quantile(v, 0.7 if stat == "quantile" else 0.5)
      if np.isfinite(s[c]) and d[c] == np.inf:
        finite = np.isfinite(x[:, c])
        np.testing.assert_array_equal(y[finite, c], 0.25)
        assert np.isnan(y[~finite, c]).all()
      else:
        assert np.isnan(y[:, c]).all(), (statistic, c)


@pytest.mark.slow
@pytest.mark.parametrize("deviation", DEVS)
def test_nan_channel_isolated_bit_for_bit(deviation):
  rng = np.random.default_rng(7)
  x = np.asarray(rng.normal(size=(8, 5)), np.float32)
  for channel, rows in ((0, [2]), (3, slice(None))):  # one NaN / all NaN
    bad, clean = x.copy(), x.copy()
    bad[rows, channel] = np.nan
    clean[:, channel] = rng.normal(size=8)
    bad_layers = _layers(jnp.asarray(bad))
    clean_layers = _layers(jnp.asarray(clean))
    for statistic in (None, "mean", "quantile"):
      out_bad = bad_layers[(statistic, deviation)]
      out_clean = clean_layers[(statistic, deviation)]
      for a, b in zip(out_bad, out_clean, strict=True):
        _other_channels_identical(a, b, channel)
      assert np.isnan(np.asarray(out_bad[2])[:, channel]).all()
      assert np.isnan(np.asarray(out_bad[1])[channel])
  if deviation == "superquantile":  # and under jit (one compilation)
    f = jax.jit(lambda v: _layer(v, deviation))
    for a, b in zip(f(jnp.asarray(bad)), f(jnp.asarray(clean)), strict=True):
      _other_channels_identical(a, b, channel)


@pytest.mark.slow
@pytest.mark.parametrize("deviation", DEVS)
def test_masked_out_inf_and_nan_change_nothing(deviation):
  rng = np.random.default_rng(8)
  x = np.asarray(rng.normal(size=(8, 3)), np.float32)
  mask = np.ones_like(x, bool)
  mask[[1, 5], [0, 2]] = False
  dirty = x.copy()
  dirty[1, 0], dirty[5, 2] = np.inf, np.nan
  zeroed = x.copy()
  zeroed[1, 0] = zeroed[5, 2] = 0.0
  a = _layers(jnp.asarray(dirty), jnp.asarray(mask))[(None, deviation)]
  b = _layers(jnp.asarray(zeroed), jnp.asarray(mask))[(None, deviation)]
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  ya, yb = np.asarray(a[2]), np.asarray(b[2])
  np.testing.assert_array_equal(ya[mask], yb[mask])
  assert np.isfinite(ya[mask]).all()
  # and the gradients of the valid values (0 * inf must not leak as NaN)
  i = DEVS.index(deviation)
  ga = _statistics_grads(jnp.asarray(dirty), jnp.asarray(mask))[i]
  gb = _statistics_grads(jnp.asarray(zeroed), jnp.asarray(mask))[i]
  np.testing.assert_array_equal(np.asarray(ga)[mask], np.asarray(gb)[mask])


@jax.jit
def _statistics_grads(x, mask):
  """d/dx of S·w0 + D·w1 (through S and D: the outputs at the padding are
  inf/NaN) for every deviation, one program."""
  w = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)

  def loss(v, dev):
    s, d, _ = _layer(v, dev, None, mask)
    return jnp.sum(s * w[0]) + jnp.sum(d * w[1])

  return tuple(jax.grad(loss)(x, dev) for dev in DEVS)


@pytest.mark.slow
@pytest.mark.parametrize("deviation", ["superquantile", "mixed_superquantile",
                                       "median_abs"])
def test_layers_equal_public_path(deviation):
  # _layers (S and D as separate measures, paired) is the public
  # batch_statistics + normalize, here on data with ±inf, NaN and a mask.
  rng = np.random.default_rng(11)
  x = np.asarray(rng.normal(size=(9, 4)), np.float32)
  x[3, 0], x[4, 1], x[5, 2] = np.inf, -np.inf, np.nan
  mask = jnp.asarray(rng.random((9, 4)) < 0.8)
  for m, statistic in ((None, None), (mask, "mean")):
    ours = _layers(jnp.asarray(x), m)[(statistic, deviation)]
    public = _jit_layer(jnp.asarray(x), deviation, statistic, m)
    for a, b in zip(ours, public, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=1e-6, err_msg=f"{statistic} {m is None}")
