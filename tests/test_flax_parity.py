"""``GeneralizedBatchNorm(statistic="mean", deviation="std")`` is nn.BatchNorm.

docs/SPEC.md §1/§5: outputs, gradients, running averages and eval outputs
agree with ``flax.linen.BatchNorm`` to 1e-5 in float32, over several optax SGD
steps on changing inputs, with and without a mask; every nn.BatchNorm field
exists with the same default.
"""

import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gbn_jax
from tests import reference as ref

TOL = dict(rtol=1e-5, atol=1e-5)
GBN_MEAN_STD = functools.partial(gbn_jax.GeneralizedBatchNorm,
                                 statistic="mean", deviation="std")


def _tree_close(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


class Net(nn.Module):
  norm: type
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train, mask=None):
    x = nn.Dense(6)(x)
    x = self.norm(use_running_average=not train, momentum=self.momentum,
                  name="norm")(x, mask=mask)
    x = nn.relu(x)
    return nn.Dense(2)(x)


def _trainer(norm):
  net = Net(norm)
  opt = optax.sgd(0.2)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, mask):
    def loss_fn(params):
      out, upd = net.apply({"params": params, "batch_stats": batch_stats}, x,
                           True, mask, mutable=["batch_stats"])
      return jnp.mean((out - y) ** 2), (out, upd["batch_stats"])

    (_loss, (out, new_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state,
            out, grads)

  @jax.jit
  def evaluate(params, batch_stats, x):
    return net.apply({"params": params, "batch_stats": batch_stats}, x, False)

  return net, opt, step, evaluate


@pytest.mark.parametrize("masked", [False, True])
def test_train_steps_match_batchnorm(masked):
  rng = np.random.default_rng(0)
  shape = (6, 5, 4)  # (batch, length, features); BN reduces over (0, 1)
  bn_net, opt, bn_step, bn_eval = _trainer(nn.BatchNorm)
  _, _, gbn_step, gbn_eval = _trainer(GBN_MEAN_STD)
  x0 = jnp.asarray(ref.skewed(rng, shape, "gamma"))
  variables = bn_net.init(jax.random.key(0), x0, False)
  gbn_variables = Net(GBN_MEAN_STD).init(jax.random.key(0), x0, False)
  _tree_close(gbn_variables, variables, "init")  # same names, same values
  bn = gbn = (variables["params"], variables["batch_stats"],
              opt.init(variables["params"]))
  for t in range(4):
    x = jnp.asarray(ref.skewed(rng, shape, "lognormal") * (t + 1))
    y = jnp.asarray(rng.standard_normal((*shape[:2], 2)), jnp.float32)
    mask = jnp.asarray(rng.random((*shape[:2], 1)) < 0.7) if masked else None
    bn_out = bn_step(*bn, x, y, mask)
    gbn_out = gbn_step(*gbn, x, y, mask)
    what = f"step {t} (mask={masked})"
    _tree_close(gbn_out[3], bn_out[3], f"{what} outputs")
    _tree_close(gbn_out[4], bn_out[4], f"{what} gradients")
    _tree_close(gbn_out[1], bn_out[1], f"{what} running averages")
    _tree_close(gbn_out[0], bn_out[0], f"{what} updated params")
    # The running averages moved (the comparison is not vacuous).
    assert not np.allclose(bn_out[1]["norm"]["mean"], bn[1]["norm"]["mean"])
    bn, gbn = bn_out[:3], gbn_out[:3]
    x_eval = jnp.asarray(ref.skewed(rng, shape, "gamma"))
    _tree_close(gbn_eval(gbn[0], gbn[1], x_eval),
                bn_eval(bn[0], bn[1], x_eval), f"{what} eval outputs")


CONFIGS = [
    dict(),
    dict(use_fast_variance=False),
    dict(axis=1, epsilon=1e-3, momentum=0.5),        # channels-first
    dict(axis=(-2, -1)),                             # two feature axes
    dict(use_bias=False, use_scale=False),
    dict(scale_init=nn.initializers.constant(1.7),
         bias_init=nn.initializers.constant(-0.3)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(sorted(c)))
def test_module_matches_batchnorm_for_every_option(config):
  rng = np.random.default_rng(1)
  x = jnp.asarray(ref.skewed(rng, (5, 3, 4), "gamma"))
  x_eval = jnp.asarray(ref.skewed(rng, (5, 3, 4), "lognormal"))
  bn = nn.BatchNorm(use_running_average=False, **config)
  gbn = GBN_MEAN_STD(use_running_average=False, **config)
  variables = bn.init(jax.random.key(1), x)
  _tree_close(gbn.init(jax.random.key(1), x), variables, "init")
  # Init does not touch the running averages (zeros / ones, as Flax).
  assert np.all(np.asarray(variables["batch_stats"]["mean"]) == 0)

  def loss(module, params, x):
    out, upd = module.apply({"params": params,
                             "batch_stats": variables["batch_stats"]}, x,
                            mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), (out, upd["batch_stats"])

  def grads(module):
    return jax.jit(jax.grad(functools.partial(loss, module), argnums=(0, 1),
                            has_aux=True))(variables.get("params", {}), x)

  (gp_bn, gx_bn), (out_bn, stats_bn) = grads(bn)
  (gp, gx), (out, stats) = grads(gbn)
  _tree_close(out, out_bn, "outputs")
  _tree_close(stats, stats_bn, "running averages")
  _tree_close(gx, gx_bn, "input gradients")
  _tree_close(gp, gp_bn, "param gradients")
  # Eval with the updated averages.
  ev = {"params": variables.get("params", {}), "batch_stats": stats_bn}
  _tree_close(gbn.clone(use_running_average=None).apply(ev, x_eval, True),
              bn.clone(use_running_average=None).apply(ev, x_eval, True),
              "eval")


def test_half_precision_matches_batchnorm():
  rng = np.random.default_rng(2)
  x = jnp.asarray(ref.skewed(rng, (8, 4), "gamma"), jnp.bfloat16)
  for config in (dict(), dict(dtype=jnp.bfloat16),
                 dict(param_dtype=jnp.bfloat16,
                      force_float32_reductions=False)):
    bn = nn.BatchNorm(use_running_average=False, **config)
    gbn = GBN_MEAN_STD(use_running_average=False, **config)
    variables = bn.init(jax.random.key(0), x)
    out_bn, s_bn = bn.apply(variables, x, mutable=["batch_stats"])
    out, s = gbn.apply(variables, x, mutable=["batch_stats"])
    assert out.dtype == out_bn.dtype, config
    # 1e-5, or one unit of the output dtype's precision (bf16 rounding of
    # two float32 results an ulp apart may land on neighbouring values);
    # with bfloat16 reductions the sums themselves are only good to a few
    # bf16 units (ours are taken around a pivot, Flax's are not).
    eps = float(jnp.finfo(out.dtype).eps)
    tol = max(1e-5, eps if config.get("force_float32_reductions", True)
              else 4 * eps)
    stats_tol = (1e-5 if config.get("force_float32_reductions", True)
                 else 4 * eps)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(out_bn, np.float32),
                               rtol=tol, atol=tol, err_msg=str(config))
    for k in ("mean", "var"):
      assert s["batch_stats"][k].dtype == s_bn["batch_stats"][k].dtype
      np.testing.assert_allclose(np.asarray(s["batch_stats"][k], np.float32),
                                 np.asarray(s_bn["batch_stats"][k], np.float32),
                                 rtol=stats_tol, atol=stats_tol)


def test_every_batchnorm_field_with_the_same_default():
  ours = {f.name: f for f in dataclasses.fields(gbn_jax.GeneralizedBatchNorm)}
  for f in dataclasses.fields(nn.BatchNorm):
    if f.name in ("parent", "name"):
      continue
    assert f.name in ours, f"missing field {f.name}"
    assert (ours[f.name].default is f.default
            or ours[f.name].default == f.default), f.name
  assert ours["statistic"].default is None
  assert ours["deviation"].default == "superquantile"
  assert ours["alpha"].default == 0.5
  assert ours["p"].default == 2.0
  # The call signature too: (x, use_running_average=None, *, mask=None).
  sig = inspect.signature(gbn_jax.GeneralizedBatchNorm.__call__).parameters
  bn_sig = inspect.signature(nn.BatchNorm.__call__).parameters
  for name in ("use_running_average", "mask"):
    assert sig[name].kind == bn_sig[name].kind, name
    assert sig[name].default == bn_sig[name].default, name


def test_running_averages_follow_the_spec_for_gbn():
  # docs/SPEC.md §5 for a non-BN measure: ra = m·ra + (1-m)·batch value of S
  # and D².
  rng = np.random.default_rng(3)
  x1 = jnp.asarray(ref.skewed(rng, (9, 2), "gamma"))
  x2 = jnp.asarray(ref.skewed(rng, (9, 2), "lognormal"))
  m = 0.8
  gbn = gbn_jax.GeneralizedBatchNorm(use_running_average=False, momentum=m,
                                     alpha=0.3)
  variables = gbn.init(jax.random.key(0), x1)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
  ra_c, ra_d2 = np.zeros(2), np.ones(2)
  stats = variables["batch_stats"]
  for x in (x1, x2):
    y, upd = gbn.apply({**variables, "batch_stats": stats}, x,
                       mutable=["batch_stats"])
    c, d = ref.batch_statistics(x, axes=0, deviation="superquantile",
                                alpha=0.3)
    ra_c = m * ra_c + (1 - m) * c
    ra_d2 = m * ra_d2 + (1 - m) * d * d
    stats = upd["batch_stats"]
    np.testing.assert_allclose(stats["mean"], ra_c, **TOL)
    np.testing.assert_allclose(stats["var"], ra_d2, **TOL)
    np.testing.assert_allclose(
        y, ref.normalize(x, c, d, axes=0), rtol=1e-4, atol=1e-4)
  y_eval = gbn.clone(use_running_average=True).apply(
      {**variables, "batch_stats": stats}, x1)
  np.testing.assert_allclose(
      y_eval, ref.normalize(x1, ra_c, np.sqrt(ra_d2), axes=0),
      rtol=1e-4, atol=1e-4)


def test_pmap_matches_batchnorm_with_axis_index_groups():
  # Under pmap with axis_name (and groups) both pool the group's batch; with
  # equal local batch sizes Flax's mean of means is the pooled mean.
  rng = np.random.default_rng(4)
  xs = jnp.asarray(ref.skewed(rng, (8, 3, 2, 4), "gamma"))
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  kw = dict(use_running_average=False, axis_name="batch",
            axis_index_groups=groups, momentum=0.6)
  bn, gbn = nn.BatchNorm(**kw), GBN_MEAN_STD(**kw)
  variables = nn.BatchNorm(use_running_average=False).init(
      jax.random.key(0), xs[0])

  def both(x):
    def loss(module, params, x):
      y, upd = module.apply({**variables, "params": params}, x,
                            mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), (y, upd)
    return [jax.grad(loss, argnums=(1, 2), has_aux=True)(
        m, variables["params"], x) for m in (bn, gbn)]

  (g_bn, aux_bn), (g_gbn, aux_gbn) = jax.pmap(both, axis_name="batch")(xs)
  _tree_close(aux_gbn, aux_bn, "pmap outputs and running averages")
  _tree_close(g_gbn, g_bn, "pmap gradients (params, input)")
  # The two groups really differ (the groups are honoured).
  assert not np.allclose(aux_bn[1]["batch_stats"]["mean"][0],
                         aux_bn[1]["batch_stats"]["mean"][4])
