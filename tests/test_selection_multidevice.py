"""The selection engine across the 8 simulated CPU devices (conftest.py):
``shard_map``, ``pmap`` (with and without ``axis_index_groups``) and sharded
``jit`` equal one device on the concatenated batch; the compiled quantile path
holds no all-gather (only per-channel all-reduces)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gbn_jax
from gbn_jax import order_statistics as O
from tests.selection_patch import selection

D = 8
KW = dict(axes=(0, 1), deviation="superquantile", alpha=0.7)
W = jnp.linspace(-1.0, 2.0, 6)


def _data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 5, 6)).astype(np.float32)
  x[:, :, 1] = np.round(x[:, :, 1])  # ties across devices
  x[::9, :, 2] = np.inf
  x[:, :, 3] = 1.5  # constant
  mask = rng.random((64, 5, 1)) < 0.7
  return x, mask


def _stats(x, mask=None, **kw):
  return gbn_jax.batch_statistics(x, mask=mask, **KW, **kw)


def _loss(x, mask=None, **kw):
  c, d = _stats(x, mask, **kw)
  return jnp.sum(W * c) + jnp.sum(W**2 * jnp.where(jnp.isfinite(d), d, 0.0))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() >= D
  return jax.make_mesh((D,), ("d",))


def _check(got, want):
  (gc, gd), (wc, wd) = got, want
  np.testing.assert_array_equal(gc, wc)  # order statistic: exactly
  np.testing.assert_allclose(gd, wd, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shard_map_equals_one_device(mesh):
  x, mask = _data()
  xs = jax.device_put(x, NamedSharding(mesh, P("d")))
  ms = jax.device_put(mask, NamedSharding(mesh, P("d")))

  def build(check_vma=True):
    return jax.jit(
      jax.shard_map(
        functools.partial(_stats, axis_name="d"),
        mesh=mesh,
        in_specs=(P("d"), P("d")),
        out_specs=P(),
        check_vma=check_vma,
      )
    )

  f = build()
  _check(f(xs, ms), _stats(x, mask))
  # Gradient: the same as one device (shard_map differentiates the psums).
  g = jax.jit(
    jax.shard_map(
      jax.grad(functools.partial(_loss, axis_name="d")),
      mesh=mesh,
      in_specs=(P("d"), P("d")),
      out_specs=P("d"),
    )
  )(xs, ms)
  np.testing.assert_allclose(g, jax.grad(_loss)(x, mask), rtol=1e-5, atol=1e-6)

  # The quantile path communicates per-channel values only: no all-gather.
  hlo = f.lower(xs, ms).compile().as_text()
  assert re.search(r"all-reduce", hlo)
  assert not re.search(r"all-gather", hlo)
  # ...while the sort-based reference does gather (so the check can fail).
  with selection(O.kth_smallest_by_sort):
    hlo_ref = build(check_vma=False).lower(xs, ms).compile().as_text()
  assert re.search(r"all-gather", hlo_ref)


def test_shard_map_subgroups_by_mesh_axis():
  # shard_map has no axis_index_groups (JAX raises NotImplementedError); the
  # same grouping is a 2-D mesh reduced over its inner axis.
  x, _ = _data()
  mesh = jax.make_mesh((2, 4), ("g", "d"))
  xs = jax.device_put(x, NamedSharding(mesh, P(("g", "d"))))
  f = jax.jit(
    jax.shard_map(
      lambda x: tuple(v[None] for v in _stats(x, axis_name="d")),
      mesh=mesh,
      in_specs=P(("g", "d")),
      out_specs=P("g"),
    )
  )
  c, d = (np.asarray(v) for v in f(xs))
  _check((c[0], d[0]), _stats(x[:32]))
  _check((c[1], d[1]), _stats(x[32:]))


@pytest.mark.slow
@pytest.mark.parametrize("groups", [None, [[0, 1, 2, 3], [4, 5, 6, 7]]])
def test_pmap_equals_one_device(groups):
  x, mask = _data()
  xp, mp = x.reshape(D, 8, 5, 6), mask.reshape(D, 8, 5, 1)
  f = jax.pmap(
    functools.partial(_stats, axis_name="d", axis_index_groups=groups),
    axis_name="d",
  )
  c, d = f(xp, mp)
  if groups is None:
    want = [_stats(x, mask)] * D
  else:
    want = [_stats(x[:32], mask[:32])] * 4 + [_stats(x[32:], mask[32:])] * 4
  for i in range(D):
    _check((c[i], d[i]), want[i])
  # Gradient: pmap sums the cotangents of the D per-device losses.
  g = jax.pmap(
    jax.grad(functools.partial(_loss, axis_name="d", axis_index_groups=groups)),
    axis_name="d",
  )(xp, mp)
  g = np.asarray(g).reshape(x.shape)
  if groups is None:
    ref = D * jax.grad(_loss)(x, mask)
  else:
    ref = 4 * np.concatenate(
      [jax.grad(_loss)(x[:32], mask[:32]), jax.grad(_loss)(x[32:], mask[32:])]
    )
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
  if groups is None:
    hlo = f.lower(xp, mp).compile().as_text()
    assert not re.search(r"all-gather", hlo)


@pytest.mark.slow
def test_sharded_jit_equals_one_device(mesh):
  x, mask = _data()
  xs = jax.device_put(x, NamedSharding(mesh, P("d")))
  ms = jax.device_put(mask, NamedSharding(mesh, P("d")))
  _check(jax.jit(_stats)(xs, ms), _stats(x, mask))
  g = jax.jit(jax.grad(_loss))(xs, ms)
  np.testing.assert_allclose(g, jax.grad(_loss)(x, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_module_under_pmap():
  x, _ = _data()
  m = gbn_jax.GeneralizedBatchNorm(use_running_average=False, axis_name="d")
  v = m.init(jax.random.PRNGKey(0), x[:8])
  y, upd = jax.pmap(
    lambda x: m.apply(v, x, mutable=["batch_stats"]), axis_name="d"
  )(x.reshape(D, 8, 5, 6))
  m1 = gbn_jax.GeneralizedBatchNorm(use_running_average=False)
  y1, upd1 = m1.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(
    np.asarray(y).reshape(x.shape), y1, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    upd["batch_stats"]["mean"][0], upd1["batch_stats"]["mean"], rtol=1e-6
  )


def test_shard_map_warm_start_with_per_device_guesses(mesh):
  # Each device passes its own guess (sharded, not replicated): the engine
  # pmax-es them into one (a per-channel all-reduce, no all-gather), so the
  # counts stay consistent and the result is the one-device value.
  from gbn_jax.sample import Sample  # noqa: PLC0415

  x, mask = _data()
  x2, m2 = x.reshape(64 * 5, 6), np.broadcast_to(mask, x.shape).reshape(-1, 6)
  rng = np.random.default_rng(1)
  guesses = rng.normal(0, 3, (D, 6)).astype(np.float32)
  guesses[::3, 2] = np.nan

  def quantile(x, m, g):
    s = Sample(
      x,
      (0,),
      mask=m,
      axis_name="d",
      quantile_guess={0.7: g[0]},
      spread_guess=jnp.ones(6),
    )
    return O.quantile(s, 0.7)[None]

  f = jax.jit(
    jax.shard_map(quantile, mesh=mesh, in_specs=(P("d"),) * 3, out_specs=P("d"))
  )
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("d")))
  got = np.asarray(f(put(x2), put(m2), put(guesses)))
  want = jax.jit(lambda x, m: O.quantile(Sample(x, (0,), mask=m), 0.7))(x2, m2)
  for i in range(D):
    np.testing.assert_array_equal(got[i], want)
  hlo = f.lower(put(x2), put(m2), put(guesses)).compile().as_text()
  assert not re.search(r"all-gather", hlo)
