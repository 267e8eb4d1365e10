"""gbn_jax.nnx.GeneralizedBatchNorm: equals the linen module and
nnx.BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import gbn_jax
from gbn_jax.linen import GeneralizedBatchNorm as LinenGBN
from gbn_jax.nnx import GeneralizedBatchNorm

ALL = sorted(gbn_jax.DEVIATIONS)


def _config(deviation):
  if deviation.startswith("mixed"):
    return dict(deviation=deviation, levels=(0.3, 0.9), weights=(0.5, 0.5))
  if deviation == "lp":
    return dict(deviation=deviation, p=3.0)
  return dict(deviation=deviation, alpha=0.7)


def _inputs(shape=(6, 4), n=4):
  """Inputs that change from step to step (location, scale and shape)."""
  rng = np.random.default_rng(0)
  out = []
  for t in range(n):
    z = rng.standard_normal(shape) if t % 2 else rng.exponential(size=shape)
    out.append(jnp.asarray(z * (t + 1) + 2 * t - 1, jnp.float32))
  return out


def _compare_with_linen(cfg, mode, xs, momentum=0.9):
  c = xs[0].shape[-1]
  linen = LinenGBN(mode=mode, momentum=momentum, **cfg)
  variables = linen.init(jax.random.key(0), xs[0], use_running_average=False)
  layer = GeneralizedBatchNorm(c, mode=mode, momentum=momentum,
                               rngs=nnx.Rngs(0), **cfg)
  # Same affine parameters, not the defaults, so they are exercised.
  scale = jnp.linspace(0.5, 2.0, c)
  bias = jnp.linspace(-1.0, 1.0, c)
  variables = {
      "params": {"scale": scale, "bias": bias},
      "batch_stats": variables["batch_stats"],
  }
  layer.scale[...] = scale
  layer.bias[...] = bias
  assert layer.use_running_average is False
  for x in xs[:3]:  # three training steps
    y_linen, upd = linen.apply(
        variables, x, use_running_average=False, mutable=["batch_stats"]
    )
    variables = {**variables, **upd}
    y = layer(x)
    np.testing.assert_allclose(y, y_linen, rtol=1e-5, atol=1e-6)
  stats = nnx.state(layer, nnx.BatchStat)
  assert set(stats) == set(variables["batch_stats"])
  for name, value in variables["batch_stats"].items():
    np.testing.assert_allclose(stats[name][...], value, rtol=1e-5, atol=1e-6)
  layer.eval()
  assert layer.use_running_average is True
  y_eval = layer(xs[3])
  np.testing.assert_allclose(
      y_eval, linen.apply(variables, xs[3], use_running_average=True),
      rtol=1e-5, atol=1e-6,
  )
  # eval does not touch the running averages
  for name, value in variables["batch_stats"].items():
    np.testing.assert_allclose(
        nnx.state(layer, nnx.BatchStat)[name][...], value, rtol=1e-5, atol=1e-6
    )


# the default and mean/std in the fast tier, every other deviation slow
@pytest.mark.parametrize("deviation", [
    d if d in ("superquantile", "std")
    else pytest.param(d, marks=pytest.mark.slow) for d in ALL])
def test_equals_linen_batch_mode(deviation):
  _compare_with_linen(_config(deviation), "batch", _inputs())


def test_equals_linen_approximate_mode():
  # Subsample quantiles (approximate=True) take the same path in both.
  cfg = dict(_config("superquantile"), approximate=True)
  _compare_with_linen(cfg, "batch", _inputs(shape=(300, 3)))


@pytest.mark.parametrize("deviation", [
    d if d == "superquantile" else pytest.param(d, marks=pytest.mark.slow)
    for d in ALL])
def test_equals_linen_online_mode(deviation):
  _compare_with_linen(_config(deviation), "online", _inputs((3, 4)))


def test_mean_std_equals_nnx_batchnorm():
  """Independent reference: flax.nnx.BatchNorm (outputs, stats, gradients)."""
  xs = _inputs((5, 3, 4))
  ours = GeneralizedBatchNorm(4, statistic="mean", deviation="std",
                              momentum=0.8, rngs=nnx.Rngs(0))
  ref = nnx.BatchNorm(4, momentum=0.8, rngs=nnx.Rngs(0))
  for x in xs[:3]:
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(getattr(ours, name)[...],
                               getattr(ref, name)[...], rtol=1e-5, atol=1e-6)

  def grad(model, x):
    return jax.grad(lambda x: jnp.sum(nnx.clone(model)(x) ** 3))(x)

  np.testing.assert_allclose(grad(ours, xs[3]), grad(ref, xs[3]),
                             rtol=1e-4, atol=1e-4)
  ours.eval()
  ref.eval()
  np.testing.assert_allclose(ours(xs[3]), ref(xs[3]), rtol=1e-5, atol=1e-5)


def test_state_types_views_and_call_override():
  layer = GeneralizedBatchNorm(3, mode="online", rngs=nnx.Rngs(0))
  assert isinstance(layer.mean, nnx.BatchStat)
  assert isinstance(layer.var, nnx.BatchStat)
  assert isinstance(layer.online_quantiles, nnx.BatchStat)
  assert isinstance(layer.scale, nnx.Param)
  assert isinstance(layer.bias, nnx.Param)
  params = nnx.state(layer, nnx.Param)
  assert set(params) == {"scale", "bias"}
  x = jnp.arange(6.0).reshape(2, 3)
  before = np.asarray(layer.mean[...])
  viewed = nnx.view(layer, use_running_average=True)
  viewed(x)
  np.testing.assert_array_equal(layer.mean[...], before)
  layer(x, use_running_average=True)
  np.testing.assert_array_equal(layer.mean[...], before)
  layer(x)
  assert not np.array_equal(layer.mean[...], before)
  no_affine = GeneralizedBatchNorm(3, use_scale=False, use_bias=False,
                                   rngs=nnx.Rngs(0))
  assert set(nnx.state(no_affine, nnx.Param)) == set()


def test_jit_optimizer_step_matches_eager():
  """nnx.jit + nnx.Optimizer: the state updates and gradients are the eager
  ones."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, use_bias=False, rngs=rngs)
      self.norm = GeneralizedBatchNorm(4, mode="online", rngs=rngs)

    def __call__(self, x):
      return self.norm(self.dense(x))

  def loss_fn(model, x):
    return jnp.mean(nnx.relu(model(x)) ** 2)

  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3)), jnp.float32)
  eager = Net(nnx.Rngs(0))
  jitted = Net(nnx.Rngs(0))
  opt_e = nnx.Optimizer(eager, optax.sgd(0.1), wrt=nnx.Param)
  opt_j = nnx.Optimizer(jitted, optax.sgd(0.1), wrt=nnx.Param)

  def step(model, opt, x):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x)
    opt.update(model, grads)
    return loss

  for _ in range(2):
    le = step(eager, opt_e, x)
    lj = nnx.jit(step)(jitted, opt_j, x)
    np.testing.assert_allclose(lj, le, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(jitted)),
                  jax.tree.leaves(nnx.state(eager)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(eager.norm.online_quantiles[...]).sum()) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="stream"), "valid choices: 'batch', 'online'"),
        (dict(deviation="variance"), "unknown deviation 'variance'"),
        (dict(alpha=1.5), "alpha must be a number in the open interval"),
        (dict(axis_index_groups=[[0, 1]]), "needs an axis_name"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    GeneralizedBatchNorm(3, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize(
    "mode", [pytest.param("batch", marks=pytest.mark.slow), "online"])
def test_input_gradients_equal_linen(mode):
  cfg = _config("superquantile")
  x = _inputs((4, 3))[1]
  linen = LinenGBN(mode=mode, **cfg)
  v = linen.init(jax.random.key(0), x, use_running_average=False)
  layer = GeneralizedBatchNorm(3, mode=mode, rngs=nnx.Rngs(0), **cfg)
  w = jnp.arange(1.0, 13.0).reshape(4, 3)

  def f_linen(x):
    y, _ = linen.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(w * y)

  g_nnx = jax.grad(lambda x: jnp.sum(w * nnx.clone(layer)(x)))(x)
  np.testing.assert_allclose(g_nnx, jax.grad(f_linen)(x), rtol=1e-5, atol=1e-5)
  assert np.abs(g_nnx).max() > 0


@pytest.mark.parametrize(
    "mode", [pytest.param("batch", marks=pytest.mark.slow), "online"])
def test_across_devices_equals_one_device(mode):
  """shard_map over 8 devices with axis_name: two train steps give every
  shard the outputs and running averages of one device on the whole batch."""
  n_dev, local = 8, 3
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("batch",))
  xs = _inputs((n_dev * local, 4), n=2)
  cfg = dict(deviation="superquantile", alpha=0.7, momentum=0.8, mode=mode)
  sharded = GeneralizedBatchNorm(4, axis_name="batch", rngs=nnx.Rngs(0), **cfg)
  single = GeneralizedBatchNorm(4, rngs=nnx.Rngs(0), **cfg)
  graphdef, state = nnx.split(sharded)

  def step(state, x):
    layer = nnx.merge(graphdef, state)
    y = layer(x)
    # every shard's new state, stacked, so each copy can be checked
    return y, jax.tree.map(lambda a: a[None], nnx.state(layer))

  # check_vma=False: the selection's custom cross-device max is not typed as
  # device-invariant (the values are; the test checks every copy).
  sm_step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")),
                                  out_specs=(P("batch"), P("batch")),
                                  check_vma=False))
  for x in xs:
    y, states = sm_step(state, x)
    np.testing.assert_allclose(y, single(x), rtol=1e-5, atol=1e-5)
    want_stats = nnx.state(single, nnx.BatchStat)
    for i in range(n_dev):
      got = nnx.state(
          nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], states)),
          nnx.BatchStat)
      assert set(got) == set(want_stats)
      for name in want_stats:
        np.testing.assert_allclose(got[name][...], want_stats[name][...],
                                   rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name}, shard {i}")
    state = jax.tree.map(lambda a: a[0], states)
