"""``GeneralizedBatchNorm`` for Flax NNX: a drop-in ``flax.nnx.BatchNorm``.

A thin wrapper: the checks are :func:`gbn_jax.config.layer_config`, the step
is :mod:`gbn_jax._layer`, shared with the linen module (so the two give the
same outputs and running averages for the same inputs); this file holds only
what NNX needs (attributes, ``nnx.BatchStat`` state, views). Also here:
:func:`recompute_batch_stats` (precise statistics after training, in place;
from :mod:`gbn_jax.evaluation`).
"""

from __future__ import annotations

import typing as tp
from collections.abc import Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from gbn_jax import _layer
from gbn_jax.config import LayerConfig, _concrete, check_bool, layer_config
from gbn_jax.evaluation import (
  recompute_batch_stats_nnx as recompute_batch_stats,
)

__all__ = ["GeneralizedBatchNorm", "recompute_batch_stats"]


def _as_tuple(v):
  # Lists are not static NNX attributes; levels/weights are kept as tuples.
  return tuple(v) if isinstance(v, (list, tuple)) else v


class GeneralizedBatchNorm(nnx.Module):
  """Generalized Batch Normalization (Yuan, Feng, Norton, Li; AAAI 2019), NNX.

  y = scale * (x - S(x)) / sqrt(D(x)^2 + epsilon) + bias, per feature, with S a
  statistic and D a deviation measure from :mod:`gbn_jax.catalogue`. Every
  argument of ``flax.nnx.BatchNorm`` has the same meaning and default; with
  ``statistic="mean", deviation="std"`` this is ``nnx.BatchNorm``.

  State: ``scale`` and ``bias`` are ``nnx.Param``; ``mean`` (the running
  average of S) and ``var`` (of D^2) are ``nnx.BatchStat``, updated as
  ``ra = momentum * ra + (1 - momentum) * batch_value`` in training.
  ``.train()`` / ``.eval()`` (or ``nnx.view``) switch ``use_running_average``.

  With ``mode="online"`` training normalizes with running estimates that
  include the current batch (meaningful at batch size 1); ``mean``/``var``
  then hold the online S and D^2, and the trackers of :mod:`gbn_jax.online`
  (``online_mu``, ``online_quantiles``, ... as needed) are extra
  ``nnx.BatchStat`` attributes. The module docstring of :mod:`gbn_jax.online`
  gives the update of every measure and what is differentiated.

  Example::

    bn = GeneralizedBatchNorm(32, rngs=nnx.Rngs(0))  # q_0.5 / CVaR deviation
    y = bn(x)            # training: batch statistics, updates mean/var
    bn.eval(); y = bn(x)  # running averages

  Args:
    num_features: the number of input features (size of ``axis``).
    statistic: a name in ``gbn_jax.STATISTICS``; None = the deviation's
      natural statistic.
    deviation: a name in ``gbn_jax.DEVIATIONS`` (default ``superquantile``).
    alpha: level of ``quantile`` / ``superquantile``, in (0, 1).
    p: exponent of ``lp``, >= 1.
    levels: levels of ``mixed_superquantile`` / ``mixed_quantile``.
    weights: their weights (default equal).
    gaussian_consistent: scale D to equal σ on normal data.
    mode: ``"batch"`` or ``"online"``.
    approximate: quantiles from a counting search stopped early, within a
      stated rank error (docs/SPEC.md §4), for speed (off by default; the
      order statistics are then not exact).
    warm_start: in training, start the selection of the order statistics
      from the running averages once they hold real values (exact either
      way; fewer passes). On by default.
    use_running_average: normalize with the running averages.
    axis: the feature axis.
    momentum: decay rate of the running averages.
    epsilon: added to D^2.
    dtype: the dtype of the result.
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn ``bias``.
    use_scale: learn ``scale``.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: pool the statistics over this named axis (pmap / shard_map).
    axis_index_groups: groups of that axis.
    use_fast_variance: ``std`` as max(0, E[x²] - μ²) (batch mode only).
    promote_dtype: promotes the input and the state, as nnx.BatchNorm.
    rngs: for the parameters' initializers.
    bias_metadata: metadata of the ``bias`` Param.
    scale_metadata: metadata of the ``scale`` Param.

  A channel that ``mask`` hides completely in a batch is normalized with its
  running averages, which that batch leaves unchanged.
  """

  def __init__(
    self,
    num_features: int,
    *,
    statistic: str | None = None,
    deviation: str = "superquantile",
    alpha: float | None = 0.5,
    p: float = 2.0,
    levels: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    gaussian_consistent: bool = False,
    mode: str = "batch",
    approximate: bool = False,
    warm_start: bool = True,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Initializer = initializers.zeros_init(),
    scale_init: Initializer = initializers.ones_init(),
    axis_name: str | None = None,
    axis_index_groups: tp.Any = None,
    use_fast_variance: bool = True,
    promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
    scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    # Fail when the layer is set up, not with a NaN many steps later.
    cfg = layer_config(
      statistic=statistic,
      deviation=deviation,
      alpha=alpha,
      p=p,
      levels=_as_tuple(levels),
      weights=_as_tuple(weights),
      gaussian_consistent=gaussian_consistent,
      use_fast_variance=use_fast_variance,
      mode=mode,
      momentum=momentum,
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      approximate=approximate,
      axis_name=axis_name,
      axis_index_groups=axis_index_groups,
      warm_start=warm_start,
      flags={
        "use_running_average": use_running_average,
        "use_bias": use_bias,
        "use_scale": use_scale,
      },
      initializers={"bias_init": bias_init, "scale_init": scale_init},
    )
    self.statistic = statistic
    self.deviation = deviation
    # Python numbers (a JAX scalar would become state).
    self.alpha = None if alpha is None else _concrete(alpha, "alpha")
    self.p = _concrete(p, "p")
    self.levels = _as_tuple(levels)
    self.weights = _as_tuple(weights)
    self.gaussian_consistent = gaussian_consistent
    self.use_fast_variance = use_fast_variance
    self.mode = cfg.mode
    self.approximate = cfg.approximate
    self.warm_start = cfg.warm_start

    feature_shape = (num_features,)
    state = _layer.initial_state(cfg, feature_shape, jnp.float32)
    self.mean = nnx.BatchStat(state.pop("mean"))
    self.var = nnx.BatchStat(state.pop("var"))
    for name, value in state.items():
      setattr(self, name, nnx.BatchStat(value))
    self.online_names: tuple[str, ...] = tuple(state)

    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      key = rngs.params()
      self.scale = nnx.Param(
        scale_init(key, feature_shape, param_dtype), **scale_metadata
      )
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      key = rngs.params()
      self.bias = nnx.Param(
        bias_init(key, feature_shape, param_dtype), **bias_metadata
      )
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.use_running_average = (
      use_running_average
      if use_running_average is None
      else check_bool(
        use_running_average, "use_running_average", allow_int=True
      )
    )
    self.axis = axis
    self.momentum = cfg.momentum
    self.epsilon = cfg.epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype

  def __call__(
    self,
    x,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ):
    """Normalizes ``x`` with batch (or online, or running) statistics.

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name.
      mask: boolean array broadcastable to ``x``; True marks the values that
        enter the statistics (all values are normalized).

    Returns:
      The normalized input, of ``x``'s shape.
    """
    use_running_average = first_from(
      use_running_average,
      self.use_running_average,
      error_msg=(
        "No `use_running_average` argument was provided to"
        " GeneralizedBatchNorm: pass it to the constructor or the call,"
        " or use .train() / .eval() / nnx.view."
      ),
    )
    cfg = self._current_config()
    _layer.check_input(cfg, x)
    feature_axes, reduction_axes = _layer.feature_layout(x.ndim, self.axis)

    # Promote dtypes for the input and all Variables, as nnx.BatchNorm does.
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, center, dev_sq, scale, bias = self.promote_dtype(
      (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    if not use_running_average:
      names = ("mean", "var", *self.online_names)
      center, dev_sq, new = _layer.train_statistics(
        cfg,
        x,
        {k: getattr(self, k)[...] for k in names},
        axes=reduction_axes,
        mask=mask,
      )
      # As nnx.BatchNorm: stop_gradient on the stored state only for refs.
      if self.mean._can_update or self.var._can_update:
        new = {k: jax.lax.stop_gradient(v) for k, v in new.items()}
      for k, v in new.items():
        getattr(self, k)[...] = v

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

  def _current_config(self) -> LayerConfig:
    """The configuration of the current attributes (cached per value, so
    changing an attribute, e.g. ``momentum``, takes effect and is checked)."""
    return layer_config(
      statistic=self.statistic,
      deviation=self.deviation,
      alpha=self.alpha,
      p=self.p,
      levels=self.levels,
      weights=self.weights,
      gaussian_consistent=self.gaussian_consistent,
      use_fast_variance=self.use_fast_variance,
      mode=self.mode,
      momentum=self.momentum,
      epsilon=self.epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      approximate=self.approximate,
      axis_name=self.axis_name,
      axis_index_groups=self.axis_index_groups,
      warm_start=self.warm_start,
    )

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view`` (and ``.train()``/``.eval()``).

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
