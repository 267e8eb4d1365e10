"""The CIFAR models of examples/harness (ResNet-20, the plain CNN) and the
norm constructors other scripts import."""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gbn_jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from harness import models, training

ALL_NORMS = ("bn", "gbn-superquantile", "gbn-superquantile-approx",
             "gbn-mean_abs", "gbn-median_abs", "gbn-half_range", "l1bn",
             "none", "selu")


def _one_train_step(model, batch=4, seed=0):
  """Init, one SGD step on a random batch of 32x32x3 images, then an eval
  forward pass, in one compiled program."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  variables = model.lazy_init(jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct(x.shape, x.dtype))

  @jax.jit
  def step(variables, x, y):
    def loss_fn(params):
      logits, new = model.apply(
          {**variables, "params": params}, x, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    updated = {**variables, **new, "params": params}
    return loss, grads, updated, model.apply(updated, x, train=False)

  return variables, step(variables, x, y)


def _check_step(norm, variables, result):
  loss, grads, updated, eval_logits = result
  assert bool(jnp.isfinite(loss)), norm
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert eval_logits.shape == (4, 10), norm
  assert bool(jnp.all(jnp.isfinite(eval_logits))), norm
  if norm in ("none", "selu"):
    assert "batch_stats" not in variables
  else:  # training updated the running statistics
    assert not all(
        bool(jnp.all(a == b)) for a, b in zip(
            jax.tree.leaves(updated["batch_stats"]),
            jax.tree.leaves(variables["batch_stats"]), strict=True))


# -- ResNet-20 ----------------------------------------------------------------


def test_resnet20_layout():
  """19 convolutions, each followed by a norm; option-A shortcuts (no
  parameters); 16/32/64 channels; 0.27M parameters as in He et al."""
  model = models.resnet20("bn")
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # shapes
  kernels = [(jax.tree_util.keystr(p), v.shape) for p, v in
             jax.tree_util.tree_leaves_with_path(variables["params"])
             if jax.tree_util.keystr(p).endswith("['kernel']")]
  convs = [s for _, s in kernels if len(s) == 4]
  assert len(convs) == 19
  assert sorted(s[-1] for s in convs) == [16] * 7 + [32] * 6 + [64] * 6
  assert all(s[:2] == (3, 3) for s in convs)
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 19
  n_params = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert 0.26e6 < n_params < 0.28e6  # He et al.: 0.27M
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (2, 10)


def test_option_a_shortcut_pads_channels_with_zeros():
  block = models.BasicBlock(8, models.NormSpec("none"), stride=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 4, 4)),
                  jnp.float32)
  variables = block.init(jax.random.PRNGKey(0), x, train=False)
  zeroed = jax.tree.map(jnp.zeros_like, variables)  # residual branch -> 0
  y = block.apply(zeroed, x, train=False)
  expected = jnp.pad(jax.nn.relu(x[:, ::2, ::2]),
                     ((0, 0), (0, 0), (0, 0), (0, 4)))
  np.testing.assert_allclose(y, expected)


@pytest.mark.slow
def test_resnet20_one_train_step_bn():
  variables, result = _one_train_step(models.resnet20("bn"))
  _check_step("bn", variables, result)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ALL_NORMS)
def test_resnet20_one_train_step_every_norm(norm):
  model = models.resnet20(norm, alpha=0.7)
  variables, result = _one_train_step(model)
  _check_step(norm, variables, result)


# -- the plain CNN ------------------------------------------------------------


@pytest.mark.slow
def test_cnn_on_32x32_images_is_the_plain_vgg_like_cnn():
  spec = models.NormSpec("gbn-superquantile", 0.5)
  model = models.build_model("cnn", spec, 10, None, (32, 32, 3))
  assert isinstance(model, models.PlainCNN) and model.width == 16
  small = models.build_model("cnn", spec, 10, None, (8, 8, 1))
  assert isinstance(small, models.CNN)  # digits / mnist1d keep their CNN
  variables, result = _one_train_step(model)
  _check_step("gbn-superquantile", variables, result)
  convs = [v.shape for p, v in jax.tree_util.tree_leaves_with_path(
      variables["params"]) if v.ndim == 4]
  assert [s[-1] for s in convs] == [16, 16, 32, 32, 64, 64]
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 6
  assert models.plain_cnn("bn").width == 16


# -- the norm constructors ----------------------------------------------------


def test_make_norm_for_other_scripts():
  approx = models.make_norm("gbn-superquantile-approx", 0.7, train=True)
  assert isinstance(approx, gbn_jax.GeneralizedBatchNorm)
  assert (approx.deviation, approx.alpha, approx.approximate) == (
      "superquantile", 0.7, True)
  assert approx.use_running_average is False and approx.momentum == 0.9
  exact = models.make_norm("gbn-superquantile", train=False)
  assert (exact.approximate, exact.alpha, exact.use_running_average) == (
      False, 0.5, True)
  bn = models.make_norm("bn", 0.7, train=True)  # alpha ignored
  assert isinstance(bn, nn.BatchNorm)
  assert models.make_norm("none", train=True) is None
  with pytest.raises(ValueError, match="gbn-<deviation>-approx"):
    models.make_norm("gbn-superquantile-fast", train=True)
  assert models.resnet20("gbn-mean_abs", alpha=0.3).spec == models.NormSpec(
      "gbn-mean_abs")


def test_approx_norms_expand_per_alpha():
  specs = models.expand_norms(["gbn-superquantile-approx", "l1bn"], [0.5, 0.9])
  assert [s.label for s in specs] == [
      "gbn-superquantile-approx(a=0.5)", "gbn-superquantile-approx(a=0.9)",
      "l1bn"]
  layer = models.make_norm_layer(specs[1], train=True)
  assert layer.approximate and layer.alpha == 0.9


def test_step_lr_schedule():
  factors = [float(training.lr_factor(t, 100, "step")) for t in
             (0, 49, 50, 74, 75, 99)]
  np.testing.assert_allclose(factors, [1, 1, 0.1, 0.1, 0.01, 0.01])
  assert float(training.lr_factor(99, 100, "constant")) == 1.0
  with pytest.raises(ValueError, match="constant"):
    training.lr_factor(0, 100, "cosine")
