"""``GeneralizedBatchNorm``: a drop-in ``flax.linen.BatchNorm``, any S and D.

A thin wrapper: the checks are :func:`gbn_jax.config.layer_config`, the step
is :mod:`gbn_jax._layer` (shared with the NNX module); this file holds only
what linen needs (fields, variables, ``merge_param``). Also here, from
:mod:`gbn_jax.evaluation`: :func:`recompute_batch_stats` (precise statistics
after training) and :func:`from_batch_norm` (load an ``nn.BatchNorm`` model's
variables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import dtypes, module
from flax.linen.module import compact
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from gbn_jax import _layer
from gbn_jax.config import LayerConfig, check_bool, layer_config
from gbn_jax.evaluation import from_batch_norm
from gbn_jax.evaluation import (
  recompute_batch_stats_linen as recompute_batch_stats,
)

__all__ = ["GeneralizedBatchNorm", "from_batch_norm", "recompute_batch_stats"]


class GeneralizedBatchNorm(module.Module):
  """Generalized Batch Normalization (Yuan, Feng, Norton, Li; AAAI 2019).

  y = scale * (x - S(x)) / sqrt(D(x)^2 + epsilon) + bias, per feature, with S a
  statistic and D a deviation measure from :mod:`gbn_jax.catalogue`. Every
  field of ``flax.linen.BatchNorm`` has the same meaning and default; with
  ``statistic="mean", deviation="std"`` this *is* ``nn.BatchNorm``.

  Running averages live in ``batch_stats`` under the names Flax uses, so a
  checkpoint moves between the two modules: ``mean`` holds the exponential
  moving average of S and ``var`` that of D^2
  (``ra = momentum * ra + (1 - momentum) * batch_value``), not updated during
  ``init``.

  Example (a drop-in replacement)::

    x = nn.Conv(32, (3, 3))(x)
    x = GeneralizedBatchNorm(use_running_average=not train)(x)  # q_0.5 / CVaR
    x = nn.relu(x)

  Attributes:
    use_running_average: normalize with the running averages in
      ``batch_stats`` instead of the batch's statistics.
    axis: the feature axis (or axes).
    momentum: decay rate of the running averages.
    epsilon: added to D^2.
    dtype: the dtype of the result (default: inferred, as in Flax).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias, use_scale, bias_init, scale_init: the affine part, as in Flax.
    axis_name, axis_index_groups: pool the sample over devices (pmap /
      shard_map); the order statistics are exactly those of the global batch.
    use_fast_variance: ``std`` as max(0, E[x²] - μ²), as Flax (std only).
    force_float32_reductions: reduce half-precision input in float32.
    statistic: a name in ``gbn_jax.STATISTICS``; None = the deviation's natural
      statistic (``quantile`` at ``alpha`` for ``superquantile``).
    deviation: a name in ``gbn_jax.DEVIATIONS`` (default ``superquantile``).
    alpha: level of ``quantile``/``superquantile``, in (0, 1).
    p: exponent of ``lp``, >= 1.
    levels, weights: of ``mixed_superquantile`` (weights default to equal).
    gaussian_consistent: scale D to equal σ on normal data (off by default).
    mode: ``"batch"`` (S, D of the batch) or ``"online"``: in training,
      normalize with running estimates that include the current batch
      (meaningful at batch size 1); see :mod:`gbn_jax.online` for the update
      of each measure, its extra ``batch_stats`` and what is differentiated.
      ``mean``/``var`` then hold the online S and D^2 used for eval.
    approximate: quantiles from a counting search stopped early, within a
      stated rank error (docs/SPEC.md §4), for speed (off by default; the
      order statistics are then not exact).
    warm_start: in training, start the selection of the order statistics
      from the running averages once they hold real values (exact either
      way; fewer passes). On by default.

  A channel that ``mask`` hides completely in a batch is normalized with its
  running averages, which that batch leaves unchanged.
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  statistic: str | None = None
  deviation: str = "superquantile"
  alpha: float | None = 0.5
  p: float = 2.0
  levels: Sequence[float] | None = None
  weights: Sequence[float] | None = None
  gaussian_consistent: bool = False
  mode: str = "batch"
  approximate: bool = False
  warm_start: bool = True

  def __post_init__(self):
    # Fail when the layer is set up, not with a NaN many steps later. A
    # module-level function, not a method: Flax wraps methods (tabulate).
    _config(self)
    super().__post_init__()

  @compact
  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ):
    """Normalizes ``x`` with batch (or running) statistics.

    Args:
      x: the input.
      use_running_average: overrides the field of the same name.
      mask: boolean array broadcastable to ``x``; True marks the values that
        enter the statistics (all values are normalized).

    Returns:
      The normalized input, of ``x``'s shape.
    """
    cfg = _config(self)
    use_running_average = check_bool(
      module.merge_param(
        "use_running_average", self.use_running_average, use_running_average
      ),
      "use_running_average",
      allow_int=True,
    )
    _layer.check_input(cfg, x)
    feature_axes, reduction_axes = _layer.feature_layout(x.ndim, self.axis)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)
    stats_dtype = (
      jnp.float32 if self.force_float32_reductions else self.param_dtype
    )
    # Created in eval too (online trackers included), so a model initialised
    # for eval can train.
    running = {
      name: self.variable("batch_stats", name, lambda v=v: v)
      for name, v in _layer.initial_state(
        cfg, feature_shape, stats_dtype
      ).items()
    }

    if use_running_average:
      center, dev_sq = running["mean"].value, running["var"].value
      if not self.force_float32_reductions:
        center = jnp.asarray(center, self.param_dtype)
        dev_sq = jnp.asarray(dev_sq, self.param_dtype)
    else:
      initializing = self.is_initializing()
      center, dev_sq, new = _layer.train_statistics(
        cfg,
        x,
        {k: v.value for k, v in running.items()},
        axes=reduction_axes,
        mask=mask,
        # As Flax: during init the named axis need not exist.
        pooled=not initializing,
        warm=not initializing,
      )
      if not initializing:
        for name, value in new.items():
          running[name].value = value

    scale = bias = None
    if self.use_scale:
      scale = self.param(
        "scale", self.scale_init, feature_shape, self.param_dtype
      )
      if not self.force_float32_reductions:
        scale = jnp.asarray(scale, self.param_dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
      if not self.force_float32_reductions:
        bias = jnp.asarray(bias, self.param_dtype)
    y, args = _layer.transform(
      x,
      center,
      dev_sq,
      cfg=cfg,
      feature_axes=feature_axes,
      reduction_axes=reduction_axes,
      scale=scale,
      bias=bias,
    )
    return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))


def _config(layer: GeneralizedBatchNorm) -> LayerConfig:
  """The layer's checked configuration (cached per distinct field values)."""
  return layer_config(
    statistic=layer.statistic,
    deviation=layer.deviation,
    alpha=layer.alpha,
    p=layer.p,
    levels=layer.levels,
    weights=layer.weights,
    gaussian_consistent=layer.gaussian_consistent,
    use_fast_variance=layer.use_fast_variance,
    mode=layer.mode,
    momentum=layer.momentum,
    epsilon=layer.epsilon,
    dtype=layer.dtype,
    param_dtype=layer.param_dtype,
    force_float32_reductions=layer.force_float32_reductions,
    approximate=layer.approximate,
    axis_name=layer.axis_name,
    axis_index_groups=layer.axis_index_groups,
    warm_start=layer.warm_start,
    flags={
      "use_running_average": layer.use_running_average,
      "use_bias": layer.use_bias,
      "use_scale": layer.use_scale,
    },
    initializers={"bias_init": layer.bias_init, "scale_init": layer.scale_init},
  )
