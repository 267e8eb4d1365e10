"""Online mode (gbn_jax.online): update rules, batch size 1, convergence,
devices.

References are independent: a NumPy re-implementation of every documented
update, closed-form quantiles of a fixed distribution, and the one-device
computation on the concatenated batch.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gbn_jax
from gbn_jax import online
from gbn_jax.functional import check_mode, make_measures
from gbn_jax.linen import GeneralizedBatchNorm
from gbn_jax.sample import Sample

ALL = sorted(gbn_jax.DEVIATIONS)
LEVELS = (0.25, 0.8)
WEIGHTS = (0.4, 0.6)


def _config(deviation, **kw):
  if deviation.startswith("mixed"):
    kw.update(levels=LEVELS, weights=WEIGHTS)
  return dict(deviation=deviation, **kw)


# --------------------------------------------------------------------------
# NumPy reference of the documented updates (module docstring of online.py).
# --------------------------------------------------------------------------


def _np_levels(stat, dev, alpha):
  out = []
  for name in (stat, dev):
    lv = {"quantile": [alpha], "median": [0.5], "mixed_quantile": list(LEVELS),
          "median_abs": [0.5], "superquantile": [alpha],
          "mixed_superquantile": list(LEVELS)}.get(name, [])
    out += [a for a in lv if a not in out]
  return out


def np_online(xs, deviation, statistic=None, alpha=0.5, p=3.0, beta=0.9,
              step=math.pi):
  """Runs the online updates on batches xs[t] of shape (n, C) in float64."""
  stat = statistic or gbn_jax.NATURAL_STATISTIC[deviation]
  levels = _np_levels(stat, deviation, alpha)
  C = xs[0].shape[1]
  mu, m = np.zeros(C), np.ones(C)
  q = {a: np.zeros(C) for a in levels}
  s = {a: np.ones(C) for a in levels}
  hi, lo = np.ones(C), -np.ones(C)
  qa, sa = np.zeros(C), np.ones(C)  # quantile of |x - μ| (abs_superquantile)
  r = 1 - beta
  out = []
  for x in xs:
    x = np.asarray(x, np.float64)
    mu = beta * mu + r * x.mean(0)
    for a in levels:
      below = (x <= q[a]).mean(0)
      q[a] = q[a] + step * r * s[a] * (a - below)
      s[a] = beta * s[a] + r * np.abs(x - q[a]).mean(0)
    dist = np.abs(x - mu)
    qa = qa + step * r * sa * (alpha - (dist <= qa).mean(0))
    sa = beta * sa + r * np.abs(dist - qa).mean(0)
    hi = np.maximum(x.max(0), beta * hi + r * x.max(0))
    lo = np.minimum(x.min(0), beta * lo + r * x.min(0))

    def err(a, x=x):
      return a / (1 - a) * np.maximum(x - q[a], 0) + np.maximum(q[a] - x, 0)

    phi = {
        "std": (x - mu) ** 2, "mean_abs": np.abs(x - mu),
        "lp": np.abs(x - mu) ** p, "upper_semi": np.maximum(x - mu, 0) ** 2,
        "lower_semi": np.maximum(mu - x, 0) ** 2,
        "median_abs": np.abs(x - q.get(0.5, 0)),
        "superquantile": err(alpha) if deviation == "superquantile" else None,
        "mixed_superquantile": (
            sum(w * err(a) for a, w in zip(LEVELS, WEIGHTS, strict=True))
            if deviation == "mixed_superquantile" else None),
        "half_range": None,
        "abs_superquantile": qa + np.maximum(dist - qa, 0) / (1 - alpha),
    }[deviation]
    if phi is not None:
      m = beta * m + r * phi.mean(0)
    d = {"std": np.sqrt(m), "lp": m ** (1 / p), "upper_semi": np.sqrt(m),
         "lower_semi": np.sqrt(m),
         "half_range": (hi - lo) / 2}.get(deviation, m)
    center = {
        "mean": mu, "quantile": q.get(alpha), "median": q.get(0.5),
        "midrange": (hi + lo) / 2,
        "mixed_quantile": (sum(w * q[a]
                               for a, w in zip(LEVELS, WEIGHTS, strict=True))
                           if stat == "mixed_quantile" else None),
    }[stat]
    out.append((center.copy(), d.copy()))
  return out


def _run_online(xs, cfg, beta=0.9, mask=None):
  measures = make_measures(**cfg)
  state = online.init_state(measures, (xs[0].shape[1],))
  out = []
  for x in xs:
    center, dev_sq, state = online.update(
        measures, state, Sample(x, 0, mask=mask), momentum=beta
    )
    out.append((center, jnp.sqrt(dev_sq)))
  return out, state


@pytest.mark.parametrize("deviation", ALL)
def test_updates_match_numpy_reference(deviation):
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((5, 3)).astype(np.float32) * (t + 1) + t
        for t in range(4)]
  cfg = _config(deviation, p=3.0, alpha=0.7)
  got, _ = _run_online([jnp.asarray(x) for x in xs], cfg)
  want = np_online(xs, deviation, alpha=cfg.get("alpha", 0.5), p=3.0)
  for (gc, gd), (wc, wd) in zip(got, want, strict=True):
    np.testing.assert_allclose(gc, wc, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(gd, wd, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("statistic", sorted(gbn_jax.STATISTICS))
def test_every_statistic_with_a_foreign_deviation(statistic):
  rng = np.random.default_rng(1)
  xs = [rng.standard_normal((4, 2)).astype(np.float32) + t for t in range(3)]
  cfg = _config("mixed_superquantile" if statistic == "mixed_quantile"
                else "std", statistic=statistic, alpha=0.3)
  got, _ = _run_online([jnp.asarray(x) for x in xs], cfg)
  want = np_online(xs, cfg["deviation"], statistic=statistic, alpha=0.3)
  for (gc, gd), (wc, wd) in zip(got, want, strict=True):
    np.testing.assert_allclose(gc, wc, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(gd, wd, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("deviation", ALL)
def test_finite_at_batch_size_1(deviation):
  """Outputs and input gradients are finite and not degenerate at batch 1."""
  layer = GeneralizedBatchNorm(mode="online", **_config(deviation))
  x0 = jnp.zeros((1, 3))
  variables = layer.init(jax.random.key(0), x0, use_running_average=False)
  rng = np.random.default_rng(2)

  def loss(x, v):
    y, upd = layer.apply(v, x, use_running_average=False,
                         mutable=["batch_stats"])
    return jnp.sum(y * jnp.arange(1.0, 4.0)), (y, upd)

  for _t in range(4):
    x = jnp.asarray(rng.standard_normal((1, 3)) * 10 + 5, jnp.float32)
    (_, (y, upd)), g = jax.value_and_grad(loss, has_aux=True)(x, variables)
    variables = {**variables, **upd}
    assert np.isfinite(y).all() and np.isfinite(g).all()
    assert np.abs(y).max() > 1e-3  # batch mode would give exactly 0 here
  stats = jax.tree.leaves(variables["batch_stats"])
  assert all(np.isfinite(a).all() for a in stats)
  y_eval = layer.apply(variables, x, use_running_average=True)
  assert np.isfinite(y_eval).all()


def test_running_quantile_converges():
  """Robbins–Monro quantiles of X = 5 + 3 Exp(1), batch 16, momentum 0.99.

  The state starts at q = 0, 5 or more below every quantile tested. Stated
  tolerances, after 3000 steps, for α = 0.1 / 0.5 / 0.9, on each of 8
  channels: the last iterate within 0.12 / 0.2 / 0.45 of the true quantile
  5 - 3 log(1 - α), about 4 times the stationary standard deviation
  sqrt(η α (1-α) / (2 f(q_α) n)) of a constant-step iterate (0.03 / 0.055 /
  0.11 here); the root-mean-square error over steps 2001-3000 within half
  that; the mean error (bias) over those steps within 0.06. The online
  superquantile deviation, whose true value for this distribution is
  q̄_α - μ = -3 log(1 - α), is within 10% at the last step.
  """
  steps, batch, channels = 3000, 16, 8
  tolerance = {0.1: 0.12, 0.5: 0.2, 0.9: 0.45}
  for alpha, tol in tolerance.items():
    measures = make_measures(deviation="superquantile", alpha=alpha)
    state0 = online.init_state(measures, (channels,))

    def body(state, key, measures=measures):
      x = 5 + 3 * jax.random.exponential(key, (batch, channels))
      center, dev_sq, state = online.update(
          measures, state, Sample(x, 0), momentum=0.99
      )
      return state, (center, jnp.sqrt(dev_sq))

    keys = jax.random.split(jax.random.key(int(alpha * 10)), steps)
    _, (centers, devs) = jax.lax.scan(body, state0, keys)
    err = np.asarray(centers) - (5 - 3 * math.log(1 - alpha))
    assert np.all(np.abs(err[0]) > 4)  # it started far away and moved there
    np.testing.assert_array_less(np.abs(err[-1]), tol)
    assert np.sqrt(np.mean(err[-1000:] ** 2)) < tol / 2
    assert abs(np.mean(err[-1000:])) < 0.06
    d_true = -3 * math.log(1 - alpha)
    np.testing.assert_array_less(np.abs(devs[-1] / d_true - 1), 0.10)


def _pooled_case(deviation, mask):
  cfg = _config(deviation)
  measures = make_measures(**cfg)
  rng = np.random.default_rng(3)
  xs = jnp.asarray(rng.standard_normal((3, 8, 2, 3)) * 2 + 1, jnp.float32)
  state0 = online.init_state(measures, (3,))

  def steps(xs, mask, axis_name):
    state, out = state0, []
    for x in xs:
      c, d2, state = online.update(
          measures, state, Sample(x, 0, mask=mask, axis_name=axis_name),
          momentum=0.8,
      )
      out.append((c, d2))
    return out, state

  many = jax.pmap(lambda x, m: steps(x, m, "dev"), axis_name="dev",
                  in_axes=(1, 0))(xs, mask)
  one = steps(xs.reshape(3, 16, 3), mask.reshape(16, 3), None)
  return many, one


@pytest.mark.parametrize("deviation", ALL)
def test_cross_device_equals_one_device(deviation):
  """pmap over 8 devices (2 examples each) == one device on all 16."""
  assert jax.device_count() >= 8
  mask = np.ones((8, 2, 3), bool)
  mask[:, :, 2] = False  # channel 2: one valid value in the pooled batch,
  mask[0, 0, 2] = True  # on one device only
  mask[3, 1, 0] = False
  many, one = _pooled_case(deviation, jnp.asarray(mask))
  for dev_idx in (0, 5):
    got = jax.tree.map(lambda a, dev_idx=dev_idx: a[dev_idx], many)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(one), strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_empty_channel_keeps_state():
  measures = make_measures(deviation="superquantile", alpha=0.7)
  state = {k: v + 0.5 for k, v in online.init_state(measures, (2,)).items()}
  x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  mask = jnp.asarray([[True, False], [True, False]])
  center, dev_sq, new = online.update(measures, state, Sample(x, 0, mask=mask))
  for k in state:
    np.testing.assert_array_equal(new[k][..., 1], state[k][..., 1])
    assert not np.array_equal(new[k][..., 0], state[k][..., 0])
  assert np.isfinite(center).all() and np.isfinite(dev_sq).all()


def test_what_is_differentiated():
  """Mean: (1-β)/n per value; quantile iterate: 0; previous state: 0."""
  beta, n = 0.9, 4
  x = jnp.asarray(np.random.default_rng(4).standard_normal((n, 2)), jnp.float32)

  def run(cfg, x, state=None):
    m = make_measures(**cfg)
    state = online.init_state(m, (2,)) if state is None else state
    return online.update(m, state, Sample(x, 0), momentum=beta), m

  g = jax.grad(lambda x: run(_config("std"), x)[0][0].sum())(x)
  np.testing.assert_allclose(g, (1 - beta) / n, rtol=1e-6)
  g = jax.grad(lambda x: run(_config("superquantile"), x)[0][0].sum())(x)
  np.testing.assert_array_equal(g, 0.0)
  # Superquantile D: d m / d x_i = (1-β)/n (α/(1-α) above q, -1 below).
  (c, _d2, _), _ = run(_config("superquantile", alpha=0.5), x)
  g = jax.grad(
      lambda x: jnp.sqrt(run(_config("superquantile"), x)[0][1]).sum())(x)
  want = (1 - beta) / n * np.where(np.asarray(x) > np.asarray(c), 1.0, -1.0)
  np.testing.assert_allclose(g, want, rtol=1e-5)
  m = make_measures(deviation="std")
  st = online.init_state(m, (2,))
  gs = jax.grad(
      lambda st: online.update(m, st, Sample(x, 0), momentum=beta)[1].sum()
  )(st)
  for v in jax.tree.leaves(gs):
    np.testing.assert_array_equal(v, 0.0)


def test_module_stores_online_estimates_and_eval_uses_them():
  x1 = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3)),
                   jnp.float32)
  x2 = x1 * 2 + 1
  layer = GeneralizedBatchNorm(mode="online", momentum=0.8, use_scale=False,
                               use_bias=False)
  v = layer.init(jax.random.key(0), x1, use_running_average=False)
  _, upd = layer.apply(v, x1, use_running_average=False,
                       mutable=["batch_stats"])
  y2, upd = layer.apply({**v, **upd}, x2, use_running_average=False,
                        mutable=["batch_stats"])
  c, d, _ = online.online_statistics(
      x2, online.online_statistics(x1, None, axes=0, momentum=0.8)[2],
      axes=0, momentum=0.8)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], c, rtol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], d**2, rtol=1e-5)
  np.testing.assert_allclose(y2, (x2 - c) / np.sqrt(d**2 + 1e-5), rtol=1e-5)
  # eval normalizes the next input with the stored (not updated) estimates
  y3 = layer.apply({**v, **upd}, x1, use_running_average=True)
  np.testing.assert_allclose(y3, (x1 - c) / np.sqrt(d**2 + 1e-5), rtol=1e-5)


def test_bad_mode_raises():
  for bad in ("Online", "stream", None, 1):
    with pytest.raises(ValueError, match="'batch', 'online'"):
      check_mode(bad)
    with pytest.raises(ValueError, match="valid choices: 'batch', 'online'"):
      GeneralizedBatchNorm(mode=bad)
  with pytest.raises(ValueError, match="momentum"):
    online.update(make_measures(deviation="std"),
                  online.init_state(make_measures(deviation="std"), (1,)),
                  Sample(jnp.ones((2, 1)), 0), momentum=1.0)


def test_linen_module_across_devices_equals_one_device():
  """The module with axis_name under pmap == one device on the whole batch."""
  layer = GeneralizedBatchNorm(mode="online", axis_name="dev", momentum=0.8,
                               **_config("mixed_superquantile"))
  local = GeneralizedBatchNorm(mode="online", momentum=0.8,
                               **_config("mixed_superquantile"))
  xs = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, 2, 3)) + 3,
                   jnp.float32)
  v0 = local.init(jax.random.key(0), xs[0, 0], use_running_average=False)

  def two_steps(module, v, xs):
    ys = []
    for x in xs:
      y, upd = module.apply(v, x, use_running_average=False,
                            mutable=["batch_stats"])
      v = {**v, **upd}
      ys.append(y)
    return ys, v["batch_stats"]

  ys_many, st_many = jax.pmap(
      lambda xs: two_steps(layer, v0, xs), axis_name="dev", in_axes=1
  )(xs)
  ys_one, st_one = two_steps(local, v0, xs.reshape(2, 16, 3))
  for t in range(2):
    np.testing.assert_allclose(ys_many[t].reshape(16, 3), ys_one[t],
                               rtol=1e-5, atol=1e-5)
  for k in st_one:
    np.testing.assert_allclose(st_many[k][3], st_one[k], rtol=1e-5, atol=1e-6)


def test_half_precision_input():
  """bfloat16 input: statistics and state in float32, output finite."""
  layer = GeneralizedBatchNorm(mode="online", deviation="superquantile")
  x = jnp.asarray(np.random.default_rng(7).standard_normal((1, 4)) * 50,
                  jnp.bfloat16)
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert np.isfinite(np.asarray(y, np.float32)).all()
  for a in jax.tree.leaves(upd):
    assert a.dtype == jnp.float32
  want = np_online([np.asarray(x, np.float32)], "superquantile", beta=0.99)[0]
  np.testing.assert_allclose(upd["batch_stats"]["mean"], want[0], rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], want[1] ** 2, rtol=1e-4)
