"""The layer step shared by the linen and NNX modules.

Both wrappers hold their state in their framework's way (``batch_stats``
variables, ``nnx.BatchStat``) and call the same functions here for
everything else: the layout of the feature axes, the training statistics
(batch or online mode, running-average update, warm start, channels the
mask hides), and the affine transform. Imports jax only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from gbn_jax import online
from gbn_jax._sharding import with_automatic_axes
from gbn_jax.config import LayerConfig
from gbn_jax.functional import (
  complex_statistics,
  is_complex_input,
  make_sample,
  normalize,
)
from gbn_jax.sample import Sample, canonicalize_axes, check_floating_input

Array = jax.Array

RUNNING_KEYS = ("mean", "var")
"""The running averages every layer keeps, under Flax's names: ``mean`` of S
and ``var`` of D^2 (online mode keeps its trackers beside them)."""


def check_input(cfg: LayerConfig, x) -> None:
  """Floating-point input, or complex input under a configuration defined
  on it (``TypeError`` naming the reason otherwise)."""
  if not is_complex_input(cfg.measures, x):
    check_floating_input(x)


def feature_layout(ndim: int, axis) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(feature axes, reduction axes) of an input of rank ``ndim``."""
  feature_axes = canonicalize_axes(ndim, axis)
  reduction_axes = tuple(i for i in range(ndim) if i not in feature_axes)
  return feature_axes, reduction_axes


def initial_state(
  cfg: LayerConfig, feature_shape: tuple[int, ...], dtype=jnp.float32
) -> dict[str, Array]:
  """The running state a new layer starts from (S = 0, D^2 = 1, as BN)."""
  state = {
    "mean": jnp.zeros(feature_shape, dtype),
    "var": jnp.ones(feature_shape, dtype),
  }
  if cfg.mode == "online":
    state.update(online.init_state(cfg.measures, feature_shape, dtype))
  return state


def warm_start_guess(center: Array, dev_sq: Array) -> tuple[Array, Array]:
  """The running (S, D^2) as a selection guess; NaN (start cold) where a
  channel still holds the initial values S = 0, D^2 = 1 exactly.

  That is how a layer tells "not updated yet": the initial values are a
  poor guess for most data, and any real pair of running averages is
  almost never exactly (0, 1) (if it is, that channel starts cold: the
  result is exact either way, only the passes differ).
  """
  fresh = (center == 0) & (dev_sq == 1)
  nan = jnp.full_like(center, jnp.nan)
  return jnp.where(fresh, nan, center), jnp.where(fresh, nan, dev_sq)


def train_statistics(
  cfg: LayerConfig,
  x: Array,
  running: Mapping[str, Array],
  *,
  axes: tuple[int, ...],
  mask: Array | None = None,
  pooled: bool = True,
  warm: bool = True,
) -> tuple[Array, Array, dict[str, Array]]:
  """S, D^2 to normalize a training batch with, and the new running state.

  Args:
    cfg: the layer's configuration.
    x: the input.
    running: the running state (``mean``, ``var``, online trackers).
    axes: the reduction axes.
    mask: True marks the values that enter the statistics.
    pooled: pool over ``cfg.axis_name`` (False while a linen module is being
      initialized, where the named axis need not exist).
    warm: start the selection from the running averages
      (:func:`warm_start_guess`).

  Batch mode: S, D^2 of the batch; the running averages move as
  ``ra = momentum * ra + (1 - momentum) * batch value``. A channel the mask
  hides completely has no batch statistics: it is normalized with its
  running averages, which stay unchanged. Online mode: S, D^2 of the online
  state updated with the batch (:mod:`gbn_jax.online`), which ``mean`` and
  ``var`` then hold.
  """
  return _train_statistics(
    x,
    mask,
    dict(running),
    cfg=cfg,
    axes=axes,
    pooled=pooled,
    warm=bool(warm and cfg.warm_start and cfg.measures.selected_levels()),
  )


@functools.partial(jax.jit, static_argnames=("cfg", "axes", "pooled", "warm"))
def _train_statistics(x, mask, running, *, cfg, axes, pooled, warm):
  # A jit with the configuration static: an eager call compiles the
  # selection loops once per shape; inside a user's jit it is inlined.
  step = functools.partial(
    _train_statistics_step, cfg=cfg, axes=axes, pooled=pooled, warm=warm
  )
  return with_automatic_axes(step, x, axes, mask, running)


def _train_statistics_step(x, mask, running, *, cfg, axes, pooled, warm):
  sample_kwargs = dict(
    mask=mask,
    axis_name=cfg.axis_name if pooled else None,
    axis_index_groups=cfg.axis_index_groups if pooled else None,
    dtype=cfg.dtype,
    force_float32_reductions=cfg.force_float32_reductions,
    approximate=cfg.approximate,
  )
  if cfg.mode == "online":
    trackers = {k: v for k, v in running.items() if k not in RUNNING_KEYS}
    center, dev_sq, new = online.update(
      cfg.measures,
      trackers,
      Sample(x, axes, **sample_kwargs),
      momentum=cfg.momentum,
    )
    new["mean"] = lax.stop_gradient(center)
    new["var"] = lax.stop_gradient(dev_sq)
    return center, dev_sq, new

  old_center, old_dev_sq = running["mean"], running["var"]
  if is_complex_input(cfg.measures, x):
    center, dev_sq = complex_statistics(
      cfg.measures,
      x,
      axes,
      mask=mask,
      squared=True,
      axis_name=sample_kwargs["axis_name"],
      axis_index_groups=sample_kwargs["axis_index_groups"],
    )
    return (
      center,
      dev_sq,
      {
        "mean": cfg.momentum * old_center + (1 - cfg.momentum) * center,
        "var": cfg.momentum * old_dev_sq + (1 - cfg.momentum) * dev_sq,
      },
    )
  guess = warm_start_guess(old_center, old_dev_sq) if warm else None
  sample = make_sample(cfg.measures, x, axes, guess=guess, **sample_kwargs)
  center, dev_sq = cfg.measures.center_and_dev_sq(sample)
  new_center = cfg.momentum * old_center + (1 - cfg.momentum) * center
  new_dev_sq = cfg.momentum * old_dev_sq + (1 - cfg.momentum) * dev_sq
  if mask is not None:
    # An empty channel: its running averages stand in for the batch's.
    has = sample.count() > 0
    keep_c, keep_v = map(lax.stop_gradient, (old_center, old_dev_sq))
    center = jnp.where(has, center, keep_c.astype(center.dtype))
    dev_sq = jnp.where(has, dev_sq, keep_v.astype(dev_sq.dtype))
    new_center = jnp.where(has, new_center, old_center)
    new_dev_sq = jnp.where(has, new_dev_sq, old_dev_sq)
  return center, dev_sq, {"mean": new_center, "var": new_dev_sq}


def transform(
  x: Array,
  center: Array,
  dev_sq: Array,
  *,
  cfg: LayerConfig,
  feature_axes: tuple[int, ...],
  reduction_axes: tuple[int, ...],
  scale: Array | None,
  bias: Array | None,
) -> tuple[Array, list[Array]]:
  """y = scale (x - S) / sqrt(D^2 + ε) + bias, with ``scale``/``bias`` of the
  feature shape; returns y and the arrays whose dtypes set the output's."""
  feature_param_shape = [1] * x.ndim
  for ax in feature_axes:
    feature_param_shape[ax] = x.shape[ax]
  args = [x]
  if scale is not None:
    scale = scale.reshape(feature_param_shape)
    args.append(scale)
  if bias is not None:
    bias = bias.reshape(feature_param_shape)
    args.append(bias)
  y = normalize(
    x,
    center,
    dev_sq,
    axes=reduction_axes,
    epsilon=cfg.epsilon,
    scale=scale,
    bias=bias,
  )
  return y, args
