"""The modules' warm start: the running averages seed the selection.

Exactness does not depend on the starting point, so a model trained with
``warm_start=True`` (the default) and one with ``warm_start=False`` give
identical outputs, gradients and running averages, step after step; and
``batch_statistics(guess=...)`` equals the cold result whatever the guess.
"""

import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gbn_jax
from gbn_jax import _layer
from gbn_jax.nnx import GeneralizedBatchNorm as NnxGBN


class _Net(nn.Module):
  warm_start: bool
  deviation: str = "superquantile"

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = gbn_jax.GeneralizedBatchNorm(
        use_running_average=not train, deviation=self.deviation, alpha=0.7,
        momentum=0.8, warm_start=self.warm_start)(x)
    return nn.Dense(1)(nn.relu(x))


def _batches(steps, shift_at=None):
  rng = np.random.default_rng(0)
  out = []
  for t in range(steps):
    x = rng.standard_t(3, size=(32, 4)).astype(np.float32)
    if shift_at is not None and t >= shift_at:
      x = 50.0 * x - 300.0  # the distribution moves: the guess is far off
    out.append(jnp.asarray(x))
  return out


@pytest.mark.parametrize("deviation", [
    "superquantile", pytest.param("median_abs", marks=pytest.mark.slow)])
def test_linen_warm_and_cold_train_identically(deviation):
  batches = _batches(5, shift_at=3)
  results = []
  for warm in (True, False):
    model = _Net(warm_start=warm, deviation=deviation)
    variables = model.init(jax.random.key(0), batches[0], train=False)

    @jax.jit
    def step(variables, x, model=model):
      def loss(params):
        y, upd = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.mean(y**2), (y, upd)
      (_, (y, upd)), g = jax.value_and_grad(loss, has_aux=True)(
          variables["params"])
      return y, g, upd["batch_stats"]

    trace = []
    for x in batches:
      y, g, stats = step(variables, x)
      variables = {**variables, "batch_stats": stats}
      trace.append((y, g, stats))
    results.append(trace)
  for (y1, g1, s1), (y0, g0, s0) in zip(*results, strict=True):
    np.testing.assert_array_equal(y1, y0)
    jax.tree.map(np.testing.assert_array_equal, g1, g0)
    jax.tree.map(np.testing.assert_array_equal, s1, s0)


def test_nnx_warm_and_cold_train_identically():
  batches = _batches(4, shift_at=2)
  outs = []
  for warm in (True, False):
    layer = NnxGBN(4, alpha=0.3, momentum=0.5, warm_start=warm,
                   rngs=nnx.Rngs(0))
    ys = []
    for x in batches:
      ys.append((layer(x), layer.mean[...], layer.var[...]))
    outs.append(ys)
  for a, b in zip(*outs, strict=True):
    for u, v in zip(a, b, strict=True):
      np.testing.assert_array_equal(u, v)


def test_guess_never_changes_batch_statistics():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.lognormal(size=(40, 5)), jnp.float32)
  mask = jnp.asarray(rng.random((40, 5)) < 0.7)
  cold = gbn_jax.batch_statistics(x, axes=0, deviation="superquantile",
                                  alpha=0.9, mask=mask)
  nan, inf = jnp.full((5,), jnp.nan), jnp.full((5,), jnp.inf)
  for guess in ((cold[0], jnp.square(cold[1])),  # the answer itself
                (cold[0] + 1e6, jnp.ones(5)),      # far above
                (cold[0] - 1e6, jnp.full((5,), 1e-30)),  # far below, tiny
                (nan, nan), (inf, inf), (-inf, jnp.zeros(5))):
    got = gbn_jax.batch_statistics(x, axes=0, deviation="superquantile",
                                   alpha=0.9, mask=mask, guess=guess)
    np.testing.assert_array_equal(got[0], cold[0])
    np.testing.assert_array_equal(got[1], cold[1])
  with pytest.raises(ValueError, match=r"guess dev_sq must be"):
    gbn_jax.batch_statistics(x, axes=0, guess=(cold[0], jnp.ones(3)))


def test_fresh_running_averages_start_cold():
  center, dev_sq = _layer.warm_start_guess(jnp.asarray([0.0, 0.0, 1.5]),
                                           jnp.asarray([1.0, 2.0, 1.0]))
  assert np.isnan(center[0]) and np.isnan(dev_sq[0])  # still (0, 1): cold
  np.testing.assert_array_equal(center[1:], [0.0, 1.5])
  np.testing.assert_array_equal(dev_sq[1:], [2.0, 1.0])


@pytest.mark.parametrize(
  "deviation, kwargs",
  [
    pytest.param("superquantile", dict(alpha=0.9), marks=pytest.mark.slow),
    pytest.param("median_abs", dict(), marks=pytest.mark.slow),
    ("mixed_superquantile", dict(levels=(0.5, 0.9), weights=(0.25, 0.75))),
  ],
)
def test_guesses_from_exact_statistics_land_near_the_quantiles(
  deviation, kwargs
):
  # On normal data, S and D^2 of the batch itself must give guesses of every
  # selected level within a few standard errors of the sample quantile (the
  # first pair spans 4): a wrong normal-fit base puts them tens away.
  from gbn_jax import config  # noqa: PLC0415

  n = 16384
  x = np.random.default_rng(5).standard_normal((n, 1)).astype(np.float32)
  x = 3.0 * x + 7.0
  kw = dict(alpha=None, **kwargs) if "alpha" not in kwargs else kwargs
  measures = config.make_measures(deviation=deviation, **kw)
  center, dev = gbn_jax.batch_statistics(
    jnp.asarray(x), axes=0, deviation=deviation, **kw
  )
  guesses, sigma = measures.quantile_guesses(center, jnp.square(dev))
  np.testing.assert_allclose(sigma, 3.0, rtol=0.03)
  assert guesses, "the configuration selects no quantile"
  for a, g in guesses.items():
    z = statistics.NormalDist()
    se = 3.0 * np.sqrt(a * (1 - a) / n) / z.pdf(z.inv_cdf(a))
    want = np.quantile(x[:, 0], a)
    assert abs(float(g[0]) - want) < 2 * se, (a, float(g[0]), want, se)
