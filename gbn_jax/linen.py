"""``GeneralizedBatchNorm``: a drop-in ``flax.linen.BatchNorm`` with any S and D.

A thin wrapper: the statistics come from :func:`gbn_jax.batch_statistics`
and the transform from :func:`gbn_jax.normalize`.
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

from gbn_jax import online
from gbn_jax.functional import (
    check_bool,
    check_floating_input,
    check_layer_fields,
    check_mode,
    make_measures,
    normalize,
    sample_statistics,
)
from gbn_jax.sample import Sample, canonicalize_axes


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
    approximate: quantiles from a strided subsample, for speed (off by
      default; the order statistics are then not exact).
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

  def __post_init__(self):
    # Fail when the layer is set up, not with a NaN many steps later.
    check_mode(self.mode)
    if self.mode == "online":
      online.init_state(self.measures(), ())  # ValueError if no online form
    self.measures()
    check_layer_fields(
        epsilon=self.epsilon,
        momentum=self.momentum,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        flags={
            name: getattr(self, name)
            for name in ("use_running_average", "use_bias", "use_scale",
                         "force_float32_reductions", "use_fast_variance",
                         "approximate")
        },
        initializers={"bias_init": self.bias_init, "scale_init": self.scale_init},
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
    )
    super().__post_init__()

  def measures(self):
    return make_measures(
        self.statistic,
        self.deviation,
        alpha=self.alpha,
        p=self.p,
        levels=self.levels,
        weights=self.weights,
        gaussian_consistent=self.gaussian_consistent,
        use_fast_variance=self.use_fast_variance,
    )

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
    use_running_average = module.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    check_bool(use_running_average, "use_running_average")
    check_floating_input(x)
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)
    stats_dtype = (
        jnp.float32 if self.force_float32_reductions else self.param_dtype
    )
    ra_center = self.variable(
        "batch_stats", "mean", lambda s: jnp.zeros(s, stats_dtype), feature_shape
    )
    ra_dev_sq = self.variable(
        "batch_stats", "var", lambda s: jnp.ones(s, stats_dtype), feature_shape
    )

    if self.mode == "online":
      # Created in eval too, so a model initialised for eval can train.
      online_vars = self._online_variables(feature_shape, stats_dtype)
    if use_running_average:
      center, dev_sq = ra_center.value, ra_dev_sq.value
      if not self.force_float32_reductions:
        center = jnp.asarray(center, self.param_dtype)
        dev_sq = jnp.asarray(dev_sq, self.param_dtype)
    else:
      sample_kwargs = dict(
          axes=reduction_axes,
          mask=mask,
          # As Flax: during init the named axis need not exist.
          axis_name=self.axis_name if not self.is_initializing() else None,
          axis_index_groups=(
              self.axis_index_groups if not self.is_initializing() else None
          ),
          dtype=self.dtype,
          force_float32_reductions=self.force_float32_reductions,
          approximate=self.approximate,
      )
      if self.mode == "online":
        center, dev_sq = self._online_step(Sample(x, **sample_kwargs),
                                           online_vars)
      else:
        center, dev_sq = sample_statistics(
            self.measures(), x, squared=True, **sample_kwargs
        )
      if self.mode == "online" and not self.is_initializing():
        ra_center.value = jax.lax.stop_gradient(center)
        ra_dev_sq.value = jax.lax.stop_gradient(dev_sq)
      elif not self.is_initializing():
        ra_center.value = (
            self.momentum * ra_center.value + (1 - self.momentum) * center
        )
        ra_dev_sq.value = (
            self.momentum * ra_dev_sq.value + (1 - self.momentum) * dev_sq
        )

    feature_param_shape = [1] * x.ndim
    for ax in feature_axes:
      feature_param_shape[ax] = x.shape[ax]
    args = [x]
    scale = bias = None
    if self.use_scale:
      scale = self.param(
          "scale", self.scale_init, feature_shape, self.param_dtype
      ).reshape(feature_param_shape)
      if not self.force_float32_reductions:
        scale = jnp.asarray(scale, self.param_dtype)
      args.append(scale)
    if self.use_bias:
      bias = self.param(
          "bias", self.bias_init, feature_shape, self.param_dtype
      ).reshape(feature_param_shape)
      if not self.force_float32_reductions:
        bias = jnp.asarray(bias, self.param_dtype)
      args.append(bias)
    y = normalize(
        x,
        center,
        dev_sq,
        axes=reduction_axes,
        epsilon=self.epsilon,
        scale=scale,
        bias=bias,
    )
    return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))

  def _online_variables(self, feature_shape, stats_dtype):
    init = online.init_state(self.measures(), feature_shape, stats_dtype)
    return {
        k: self.variable("batch_stats", k, lambda v=v: v) for k, v in init.items()
    }

  def _online_step(self, sample, variables):
    """mode="online": S and D^2 of the running state updated with ``sample``."""
    center, dev_sq, new = online.update(
        self.measures(),
        {k: v.value for k, v in variables.items()},
        sample,
        momentum=self.momentum,
    )
    if not self.is_initializing():
      for k, v in new.items():
        variables[k].value = v
    return center, dev_sq
