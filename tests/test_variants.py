"""jit, no-jit and vmap agree; masks, including channels with no valid value.

docs/SPEC.md §4: ``mask`` (broadcastable, True = counts) restricts the sample
as in Flax, and a channel with no valid value gives finite output, never NaN
-- values, layer outputs and gradients.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gbn_jax
from tests import reference as ref
from tests.batched import many_statistics

PARAMS = dict(alpha=0.37, p=3.0, levels=(0.3, 0.8), weights=(0.4, 0.6))
DEVIATIONS = list(gbn_jax.DEVIATIONS)
STATISTICS = list(gbn_jax.STATISTICS)


def all_measures(x, mask=None, shared=False):
  """(centers, devs): every deviation with its natural statistic, then every
  statistic with ``std``; stacked on a new leading axis.

  One ``batch_statistics`` call per pair, or (``shared``) every pair on one
  Sample in one compiled program (tests/batched.py)."""
  pairs = [(None, d) for d in DEVIATIONS] + [(s, "std") for s in STATISTICS]
  if shared:
    out = many_statistics(
        x, [dict(statistic=s, deviation=d, **PARAMS) for s, d in pairs],
        axes=(0, 1), mask=mask)
  else:
    out = [gbn_jax.batch_statistics(x, axes=(0, 1), statistic=s,
                                    deviation=d, mask=mask, **PARAMS)
           for s, d in pairs]
  return (jnp.stack([c for c, _ in out]), jnp.stack([d for _, d in out]))


def ref_all_measures(x, mask=None):
  pairs = [(None, d) for d in DEVIATIONS] + [(s, "std") for s in STATISTICS]
  out = [ref.batch_statistics(x, axes=(0, 1), statistic=s, deviation=d,
                              mask=mask, **PARAMS) for s, d in pairs]
  return (np.stack([c for c, _ in out]), np.stack([d for _, d in out]))


def _data(seed=0, shape=(5, 3, 4)):
  return jnp.asarray(ref.skewed(np.random.default_rng(seed), shape, "gamma"))


def _empty_channel_mask(shape, seed=1):
  mask = np.random.default_rng(seed).random(shape) < 0.6
  mask[..., 1] = False  # channel 1 has no valid value
  mask[0, 0, 2] = True  # channel 2: exactly one valid value
  mask[1:, :, 2] = False
  mask[:, 1:, 2] = False
  return mask


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_batch_statistics_variants_match_reference(self):
    x = _data()
    fn = self.variant(all_measures)
    got_c, got_d = fn(x)
    want_c, want_d = ref_all_measures(x)
    np.testing.assert_allclose(got_c, want_c, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_d, want_d, rtol=2e-5, atol=2e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_masked_with_empty_channel(self):
    x = _data(2)
    mask = _empty_channel_mask(x.shape)
    # every measure on one Sample (one program, jitted inside or not)
    got_c, got_d = self.variant(functools.partial(all_measures, shared=True))(
        x, jnp.asarray(mask))
    want_c, want_d = ref_all_measures(x, mask)  # empty channel: 0
    assert np.all(np.isfinite(got_c)) and np.all(np.isfinite(got_d))
    np.testing.assert_array_equal(got_c[:, 1], 0.0)
    np.testing.assert_array_equal(got_d[:, 1], 0.0)
    np.testing.assert_allclose(got_c, want_c, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_d, want_d, rtol=2e-5, atol=2e-5)
    # One valid value: a point mass, every deviation 0, every statistic it.
    np.testing.assert_allclose(got_d[:len(DEVIATIONS), 2], 0.0, atol=1e-6)
    np.testing.assert_allclose(got_c[:, 2], x[0, 0, 2], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @pytest.mark.slow
  def test_gradients_finite_with_empty_channel(self):
    x = _data(3)
    mask = jnp.asarray(_empty_channel_mask(x.shape))

    def loss(x):
      c, d = all_measures(x, mask, shared=True)
      return jnp.sum(c) + jnp.sum(d)

    g = self.variant(jax.grad(loss))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~np.asarray(mask)] == 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_module_variants_agree(self):
    x = _data(5)
    mask = jnp.asarray(_empty_channel_mask(x.shape, 6))
    module = gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                          momentum=0.5, alpha=0.37)
    variables = module.init(jax.random.key(0), x)

    def apply(variables, x, mask):
      return module.apply(variables, x, mask=mask, mutable=["batch_stats"])

    y, upd = self.variant(apply)(variables, x, mask)
    assert np.all(np.isfinite(np.asarray(y)))
    c, d = ref.batch_statistics(x, axes=(0, 1), alpha=0.37,
                                mask=np.asarray(mask))
    # Channel 1 has no valid value: it is normalized with its running
    # averages (the initial S = 0, D² = 1), which stay unchanged.
    empty = ~np.asarray(mask).any(axis=(0, 1))
    assert empty[1] and empty.sum() == 1
    d = np.where(empty, 1.0, d)
    np.testing.assert_allclose(
        y, ref.normalize(x, c, d, axes=(0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.5 * c,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.5 + 0.5 * d * d,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vmap_matches_loop():
  # vmap over an extra leading axis (e.g. an ensemble) = one call per slice.
  xs = _data(7, (3, 5, 3, 4))
  masks = jnp.asarray(np.random.default_rng(8).random(xs.shape) < 0.7)
  got_c, got_d = jax.jit(jax.vmap(
      lambda x, m: all_measures(x, m, shared=True)))(xs, masks)
  for i in range(xs.shape[0]):
    want_c, want_d = ref_all_measures(xs[i], np.asarray(masks[i]))
    np.testing.assert_allclose(got_c[i], want_c, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got_d[i], want_d, rtol=2e-5, atol=2e-5)
  # vmap of the module, sharing params over the mapped axis.
  module = gbn_jax.GeneralizedBatchNorm(use_running_average=False, alpha=0.37)
  variables = module.init(jax.random.key(0), xs[0])
  ys = jax.jit(jax.vmap(lambda x: module.apply(
      variables, x, mutable=["batch_stats"])[0]))(xs)
  for i in range(xs.shape[0]):
    y_i, _ = module.apply(variables, xs[i], mutable=["batch_stats"])
    np.testing.assert_allclose(ys[i], y_i, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mask_equals_the_restricted_sample():
  # Masking whole rows = dropping those rows (the Flax meaning of mask).
  x = _data(9, (7, 3, 4))
  rows = np.array([True, False, True, True, False, True, False])
  # (every measure on one Sample per call: four compiled programs in all)
  got = all_measures(x, jnp.asarray(rows[:, None, None]), shared=True)
  want = all_measures(x[np.flatnonzero(rows)], shared=True)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
  # All-True mask = no mask.
  full = all_measures(x, jnp.ones(x.shape, bool), shared=True)
  none = all_measures(x, shared=True)
  np.testing.assert_allclose(full[0], none[0], rtol=1e-6)
  np.testing.assert_allclose(full[1], none[1], rtol=1e-6)


@pytest.mark.slow
def test_masked_out_values_may_be_nan_or_inf():
  # Padding under the mask (NaN, ±inf) changes neither the statistics nor
  # the gradients of the valid values.
  x = _data(10, (6, 2, 4))
  mask = np.random.default_rng(11).random(x.shape) < 0.7
  mask[:, :, 1] = False  # and an empty channel
  junk = np.where(np.random.default_rng(12).random(x.shape) < 0.5, np.nan,
                  np.inf).astype(np.float32)
  x_padded = jnp.where(jnp.asarray(mask), x, jnp.asarray(junk))

  def loss(x):
    c, d = all_measures(x, jnp.asarray(mask), shared=True)
    return jnp.sum(c) + jnp.sum(d), (c, d)

  f = jax.jit(jax.grad(loss, has_aux=True))
  g_clean, (c_clean, d_clean) = f(x)
  g_pad, (c_pad, d_pad) = f(x_padded)
  np.testing.assert_array_equal(c_pad, c_clean)
  np.testing.assert_array_equal(d_pad, d_clean)
  np.testing.assert_array_equal(np.asarray(g_pad)[mask],
                                np.asarray(g_clean)[mask])
  assert np.all(np.asarray(g_pad)[~mask] == 0)


@pytest.mark.slow
def test_layer_gradients_finite_with_empty_channel():
  x = _data(3)
  mask = jnp.asarray(_empty_channel_mask(x.shape))
  r = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape),
                  jnp.float32)

  def layer_loss(params, x):
    total = 0.0
    for dev in DEVIATIONS:
      module = gbn_jax.GeneralizedBatchNorm(
          use_running_average=False, deviation=dev, **PARAMS)
      y, _ = module.apply({"params": params, "batch_stats": {
          "mean": jnp.zeros(4), "var": jnp.ones(4)}}, x, mask=mask,
                          mutable=["batch_stats"])
      total = total + jnp.sum(r * y)
    return total

  params = {"scale": jnp.ones(4), "bias": jnp.zeros(4)}
  y_grads = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))(params, x)
  for leaf in jax.tree.leaves(y_grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
