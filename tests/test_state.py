"""Guarantee 5: state survives checkpoints, traces once, updates only in
training.

- ``params`` and ``batch_stats`` round-trip through ``flax.serialization``
  (bytes and state dict) and through an orbax checkpoint, bit for bit, and the
  restored model gives bit-identical eval outputs;
- a jitted train step traces once for fixed shapes (a trace counter), and so
  does a jitted eval step;
- running averages are not updated by ``init`` (they hold their initial
  values whatever the data) nor when ``use_running_average=True``; in
  training they follow ra <- momentum * ra + (1 - momentum) * batch value
  (S and D^2 from the NumPy reference).
"""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gbn_jax
from tests import _ref_reliability as ref

MOMENTUM = 0.9


class Net(nn.Module):
  deviation: str = "superquantile"

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = gbn_jax.GeneralizedBatchNorm(use_running_average=not train,
                                     momentum=MOMENTUM, alpha=0.7,
                                     deviation=self.deviation)(x)
    return nn.Dense(2)(nn.relu(x))


def _data(seed, n=16):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
          jnp.asarray(rng.normal(size=(n, 2)), jnp.float32))


def _trained(deviation="superquantile", steps=3):
  """A few jitted SGD steps; returns (model, variables, number of traces)."""
  model = Net(deviation)
  x, _ = _data(0)
  variables = model.init(jax.random.key(0), x, train=False)
  tx = optax.sgd(0.1)
  opt_state = tx.init(variables["params"])
  traces = []

  @jax.jit
  def step(variables, opt_state, x, y):
    traces.append(1)  # runs only while tracing

    def loss(params):
      out, upd = model.apply({**variables, "params": params}, x, train=True,
                             mutable=["batch_stats"])
      return jnp.mean((out - y) ** 2), upd

    (loss_value, upd), g = jax.value_and_grad(loss, has_aux=True)(
        variables["params"])
    updates, opt_state = tx.update(g, opt_state)
    params = optax.apply_updates(variables["params"], updates)
    return {"params": params, **upd}, opt_state, loss_value

  for i in range(steps):
    variables, opt_state, _ = step(variables, opt_state, *_data(i + 1))
  return model, variables, len(traces)


@jax.jit
def _eval(variables, x):
  return Net().apply(variables, x, train=False)


def _assert_trees_identical(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    assert np.asarray(u).dtype == np.asarray(v).dtype
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.fixture(scope="module")
def trained():
  return _trained()


def test_train_step_traces_once(trained):
  _, variables, n_traces = trained
  assert n_traces == 1
  # and the eval step: several calls, one trace
  count = []

  @jax.jit
  def evaluate(v, x):
    count.append(1)
    return Net().apply(v, x, train=False)

  for seed in range(3):
    evaluate(variables, _data(10 + seed)[0])
  assert len(count) == 1


def test_flax_serialization_round_trip(trained):
  _, variables, _ = trained
  x = _data(99)[0]
  target = Net().init(jax.random.key(1), x, train=False)  # other values
  restored = flax.serialization.from_bytes(
      target, flax.serialization.to_bytes(variables))
  _assert_trees_identical(restored, variables)
  state = flax.serialization.to_state_dict(variables)
  _assert_trees_identical(flax.serialization.from_state_dict(target, state),
                          variables)
  np.testing.assert_array_equal(np.asarray(_eval(restored, x)),
                                np.asarray(_eval(variables, x)))
  # the running averages really are trained values, not the initial ones
  assert not np.allclose(np.asarray(variables["batch_stats"]
                                    ["GeneralizedBatchNorm_0"]["var"]), 1.0)


def test_orbax_checkpoint_round_trip(trained, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  _, variables, _ = trained
  x = _data(98)[0]
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables)
    ckptr.wait_until_finished()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      variables)
    restored = ckptr.restore(path, abstract)
  _assert_trees_identical(restored, variables)
  np.testing.assert_array_equal(np.asarray(_eval(restored, x)),
                                np.asarray(_eval(variables, x)))


def test_init_does_not_update_running_averages():
  x = _data(3)[0] * 5 + 3
  for train in (False, True):
    v = Net().init(jax.random.key(0), x, train=train)
    st = v["batch_stats"]["GeneralizedBatchNorm_0"]
    np.testing.assert_array_equal(np.asarray(st["mean"]), 0.0)
    np.testing.assert_array_equal(np.asarray(st["var"]), 1.0)


@pytest.mark.parametrize("deviation", [
    "superquantile", "std", pytest.param("median_abs", marks=pytest.mark.slow)])
def test_running_averages_only_in_training(deviation):
  layer = gbn_jax.GeneralizedBatchNorm(momentum=MOMENTUM, alpha=0.7,
                                       deviation=deviation)
  x = _data(4)[0] * 2 + 1
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  v = {**v, "batch_stats": jax.tree_util.tree_map(lambda a: a + 0.5,
                                                  v["batch_stats"])}
  # use_running_average=True: state returned unchanged, bit for bit
  _, upd = layer.apply(v, x, use_running_average=True, mutable=["batch_stats"])
  _assert_trees_identical(upd["batch_stats"], v["batch_stats"])
  # training: one EMA step towards the batch's S and D^2 (NumPy reference)
  _, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  s, d = ref.batch_statistics(np.asarray(x), (0,), deviation_name=deviation,
                              alpha=0.7)
  st = upd["batch_stats"]
  np.testing.assert_allclose(np.asarray(st["mean"]),
                             MOMENTUM * 0.5 + (1 - MOMENTUM) * s, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(st["var"]),
                             MOMENTUM * 1.5 + (1 - MOMENTUM) * d**2,
                             rtol=1e-5, atol=1e-6)
