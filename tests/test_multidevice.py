"""Across devices (docs/SPEC.md §4): 8 simulated CPU devices (see conftest.py).

With ``axis_name`` (and ``axis_index_groups``) under ``pmap`` / ``shard_map``
the sample is the union of the group's values: the result equals one device
on the concatenated batch -- order statistics exactly, sums to float
tolerance. Under ``jit`` with a sharded batch no ``axis_name`` is needed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gbn_jax
from tests import reference as ref
from tests.batched import many_statistics

N_DEV = 8
PARAMS = dict(alpha=0.37, p=3.0, levels=(0.3, 0.8), weights=(0.4, 0.6))
# Each device: (3, 2, C) values; reduction over its first two axes.
LOCAL = (3, 2, 3)
# Measures whose values are order statistics (exactly a function of the
# pooled sample's extreme / k-th values): compared bit for bit.
EXACT_CENTERS = {"median", "quantile", "midrange"}
EXACT_DEVS = {"half_range"}
GROUPS = {
    "all": None,
    "halves": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "strided": [[0, 2, 4, 6], [1, 3, 5, 7]],
}


def _configs():
  out = [(dev, None) for dev in gbn_jax.DEVIATIONS]
  out += [("std", stat) for stat in gbn_jax.STATISTICS]
  return out


def _all_measures(x, mask, axis_name=None, groups=None, public=False):
  """Every deviation (natural statistic) and every statistic, stacked.

  All on one Sample in one compiled program (tests/batched.py), or with
  ``public`` one ``gbn_jax.batch_statistics`` call each."""
  if public:
    out = [gbn_jax.batch_statistics(
        x, axes=(0, 1), statistic=stat, deviation=dev, mask=mask,
        axis_name=axis_name, axis_index_groups=groups, **PARAMS)
           for dev, stat in _configs()]
  else:
    kw = {} if axis_name is None else dict(axis_name=axis_name,
                                           axis_index_groups=groups)
    out = many_statistics(
        x, [dict(statistic=stat, deviation=dev, **PARAMS)
            for dev, stat in _configs()], axes=(0, 1), mask=mask, **kw)
  return jnp.stack([c for c, _ in out]), jnp.stack([d for _, d in out])


def _check(got, xs, masks, groups):
  """got: per-device (centers, devs); vs one device on the group's batch."""
  got_c, got_d = (np.asarray(a) for a in got)
  members = [list(range(N_DEV))] if groups is None else groups
  for group in members:
    x_cat = np.concatenate([xs[i] for i in group])
    m_cat = None if masks is None else np.concatenate([masks[i] for i in group])
    want_c, want_d = (np.asarray(a) for a in
                      _all_measures(jnp.asarray(x_cat), m_cat))
    for i in group:
      for j, (dev, stat) in enumerate(_configs()):
        stat = stat or gbn_jax.NATURAL_STATISTIC[dev]
        what = f"device {i} group {group} {stat}/{dev}"
        if stat in EXACT_CENTERS:
          np.testing.assert_array_equal(got_c[i, j], want_c[j], what)
        else:
          np.testing.assert_allclose(got_c[i, j], want_c[j], rtol=1e-5,
                                     atol=1e-6, err_msg=what)
        if dev in EXACT_DEVS:
          np.testing.assert_array_equal(got_d[i, j], want_d[j], what)
        else:
          np.testing.assert_allclose(got_d[i, j], want_d[j], rtol=1e-5,
                                     atol=1e-6, err_msg=what)
    # And the reference agrees on the pooled sample (guards the baseline).
    _rc, rd = ref.batch_statistics(x_cat, axes=(0, 1),
                                   deviation="superquantile", mask=m_cat,
                                   **PARAMS)
    np.testing.assert_allclose(want_d[_configs().index(("superquantile",
                                                        None))], rd,
                               rtol=1e-5, atol=1e-6)


def _data(seed, masked):
  rng = np.random.default_rng(seed)
  xs = ref.skewed(rng, (N_DEV, *LOCAL), "lognormal")
  masks = None
  if masked:
    masks = rng.random((N_DEV, *LOCAL)) < 0.6
    masks[3, :, :, 0] = False  # a device with no valid value in channel 0
    masks[4:, :, :, 2] = False  # the second half: channel 2 empty
  return xs, masks


def test_device_count():
  assert jax.device_count() >= N_DEV, "conftest.py sets 8 CPU devices"


@pytest.mark.slow
@pytest.mark.parametrize("groups_name", list(GROUPS))
@pytest.mark.parametrize("masked", [False, True])
def test_pmap_batch_statistics_equals_one_device(groups_name, masked):
  groups = GROUPS[groups_name]
  xs, masks = _data(list(GROUPS).index(groups_name) + 10 * masked, masked)
  if masked:
    got = jax.pmap(lambda x, m: _all_measures(x, m, "batch", groups),
                   axis_name="batch")(xs, masks)
  else:
    got = jax.pmap(lambda x: _all_measures(x, None, "batch", groups),
                   axis_name="batch")(xs)
  _check(got, xs, masks, groups)


@pytest.mark.slow
def test_shard_map_and_sharded_jit_equal_one_device():
  xs, _ = _data(7, False)
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("batch",))
  x_cat = xs.reshape((N_DEV * LOCAL[0], *LOCAL[1:]))
  want_c, want_d = (np.asarray(a) for a in _all_measures(jnp.asarray(x_cat),
                                                         None))
  # shard_map with the axis name: every shard gets the global statistics.
  # (through the public batch_statistics, one call per measure)
  sm = jax.jit(jax.shard_map(
      lambda x: tuple(a[None] for a in _all_measures(x, None, "batch",
                                                      public=True)),
      mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
  got_c, got_d = (np.asarray(a) for a in sm(x_cat))
  for i in range(N_DEV):
    np.testing.assert_allclose(got_c[i], want_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_d[i], want_d, rtol=1e-5, atol=1e-6)
  # jit on a batch sharded over the mesh, no axis name needed.
  x_sharded = jax.device_put(x_cat, NamedSharding(mesh, P("batch")))
  got_c, got_d = (np.asarray(a) for a in
                  jax.jit(lambda x: _all_measures(x, None))(x_sharded))
  np.testing.assert_allclose(got_c, want_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_d, want_d, rtol=1e-5, atol=1e-6)


# Every deviation (natural statistic; std with mean = nn.BatchNorm), plus
# the Gaussian-consistent superquantile.
MODULE_DEVIATIONS = (*gbn_jax.DEVIATIONS, "superquantile")


def _modules(axis_name, groups, train=True):
  return [
      gbn_jax.GeneralizedBatchNorm(
          use_running_average=not train, deviation=dev,
          statistic="mean" if dev == "std" else None, momentum=0.7,
          axis_name=axis_name, axis_index_groups=groups,
          gaussian_consistent=j == len(MODULE_DEVIATIONS) - 1, **PARAMS)
      for j, dev in enumerate(MODULE_DEVIATIONS)
  ]


@pytest.mark.slow
@pytest.mark.parametrize("groups_name", ["all", "halves"])
def test_pmap_module_equals_one_device(groups_name):
  groups = GROUPS[groups_name]
  xs, masks = _data(11, True)
  local_modules = _modules(None, None)
  variables = [m.init(jax.random.key(0), jnp.asarray(xs[0]))
               for m in local_modules]

  def apply_all(x, mask, modules):
    outs, stats = [], []
    for m, v in zip(modules, variables, strict=True):
      y, upd = m.apply(v, x, mask=mask, mutable=["batch_stats"])
      outs.append(y)
      stats.append(upd["batch_stats"])
    return outs, stats

  f = jax.pmap(lambda x, m: apply_all(x, m, _modules("batch", groups)),
               axis_name="batch")
  outs, stats = f(xs, masks)
  one_device = jax.jit(lambda x, m: apply_all(x, m, local_modules))
  members = [list(range(N_DEV))] if groups is None else groups
  for group in members:
    x_cat = jnp.asarray(np.concatenate([xs[i] for i in group]))
    m_cat = jnp.asarray(np.concatenate([masks[i] for i in group]))
    want_outs, want_stats = one_device(x_cat, m_cat)
    for j, dev in enumerate(MODULE_DEVIATIONS):
      for pos, i in enumerate(group):
        lo = pos * LOCAL[0]
        np.testing.assert_allclose(
            outs[j][i], want_outs[j][lo:lo + LOCAL[0]], rtol=1e-5, atol=1e-5,
            err_msg=f"{dev} output, device {i}")
        for k in ("mean", "var"):
          np.testing.assert_allclose(
              stats[j][k][i], want_stats[j][k], rtol=1e-5, atol=1e-6,
              err_msg=f"{dev} batch_stats[{k}], device {i}")
      assert np.all(np.isfinite(np.asarray(outs[j]))), dev


def _weighted_measures(x, mask, weights, axis_name=None, groups=None):
  """A scalar loss of every measure, so its gradient reaches every x."""
  c, d = _all_measures(x, mask, axis_name, groups)
  return jnp.sum(weights[0] * c) + jnp.sum(weights[1] * d)


@pytest.mark.slow
@pytest.mark.parametrize("groups_name", ["all", "halves"])
def test_pmap_gradients_equal_one_device(groups_name):
  """d/dx of every measure under pmap (pmax/pmin included: half_range,
  midrange and the mean's rounding clip) equals one device's gradient."""
  groups = GROUPS[groups_name]
  xs, masks = _data(21, True)
  xs[1, 0, 0, 1] = xs[5, 1, 1, 1] = xs.max() + 1.0  # a max tied across devices
  rng = np.random.default_rng(3)
  weights = jnp.asarray(rng.normal(size=(2, len(_configs()), LOCAL[2])),
                        jnp.float32)
  grad_dev = jax.pmap(
      jax.grad(lambda x, m: _weighted_measures(x, m, weights, "batch",
                                               groups)),
      axis_name="batch")(xs, masks)
  grad_one = jax.jit(jax.grad(
      lambda x, m: _weighted_measures(x, m, weights)))
  members = [list(range(N_DEV))] if groups is None else groups
  for group in members:
    x_cat = jnp.asarray(np.concatenate([xs[i] for i in group]))
    m_cat = jnp.asarray(np.concatenate([masks[i] for i in group]))
    want = np.asarray(grad_one(x_cat, m_cat))
    # Under pmap each device's loss is the group's loss, so the gradient of
    # the sum over devices is len(group) times the one-device gradient.
    got = np.concatenate([np.asarray(grad_dev[i]) for i in group])
    np.testing.assert_allclose(got, len(group) * want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "approximate", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sharded_jit_on_an_explicit_mesh_equals_one_device(approximate):
  # jax.make_mesh's axes are Explicit (sharding in types): JAX rejects a
  # slice of a sharded dimension that does not divide over the mesh, and
  # the engine slices (a pivot entry, the cold start's strided subsample).
  # 8 x 37 rows, so no slice divides; the result must still be the global
  # batch's, values and gradients, with and without a mask, and in a linen
  # module over two training steps (the second one warm-started).
  from jax.sharding import AxisType  # noqa: PLC0415

  mesh = jax.make_mesh((N_DEV,), ("batch",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(11)
  x = rng.lognormal(size=(N_DEV * 37, 5)).astype(np.float32)
  mask = rng.random(x.shape) < 0.8
  kw = dict(axes=0, deviation="superquantile", alpha=0.7,
            approximate=approximate)

  def stats(x, m):
    return gbn_jax.batch_statistics(x, mask=m, **kw)

  def loss(x, m):
    center, dev = stats(x, m)
    return jnp.sum(center * dev) + jnp.sum(dev**2)

  def step(v, x):
    return module.apply(v, x, mutable=["batch_stats"])

  module = gbn_jax.GeneralizedBatchNorm(use_running_average=False,
                                        alpha=0.7, approximate=approximate)
  variables = module.init(jax.random.key(0), x)
  want = {}
  for m in (None, mask):
    want[m is None] = (stats(x, m), jax.grad(loss)(x, m))
  y1, u1 = step(variables, x)
  y2, u2 = step({**variables, **u1}, x)
  with jax.set_mesh(mesh):
    shard = NamedSharding(mesh, P("batch"))
    xs = jax.device_put(x, shard)
    for m in (None, mask):
      ms = None if m is None else jax.device_put(m, shard)
      got = (jax.jit(stats)(xs, ms), jax.jit(jax.grad(loss))(xs, ms))
      (wc, wd), wg = want[m is None]
      np.testing.assert_array_equal(got[0][0], wc)  # an order statistic
      np.testing.assert_allclose(got[0][1], wd, rtol=1e-5)
      np.testing.assert_allclose(got[1], wg, rtol=1e-5, atol=1e-7)
      assert got[1].sharding.spec[0] == "batch"
    z1, v1 = jax.jit(step)(variables, xs)
    z2, v2 = jax.jit(step)({**variables, **v1}, xs)
  for got, ref_ in ((z1, y1), (z2, y2), (v1, u1), (v2, u2)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-6), got, ref_)
