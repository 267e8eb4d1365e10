"""``GeneralizedBatchNorm`` for Flax NNX: a drop-in ``flax.nnx.BatchNorm``.

A thin wrapper over the functional core (:func:`gbn_jax.make_measures`,
:class:`gbn_jax.Sample`, :func:`gbn_jax.normalize`, and :mod:`gbn_jax.online`
for ``mode="online"``); the math is the linen module's, so the two give the
same outputs and running averages for the same inputs.
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

from gbn_jax import online
from gbn_jax.functional import (
    check_floating_input,
    check_layer_fields,
    check_mode,
    make_measures,
    normalize,
    sample_statistics,
)
from gbn_jax.sample import Sample, canonicalize_axes


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
    levels, weights: of ``mixed_superquantile`` (weights default to equal).
    gaussian_consistent: scale D to equal σ on normal data.
    mode: ``"batch"`` or ``"online"``.
    approximate: quantiles from a strided subsample, for speed (off by
      default; the order statistics are then not exact).
    use_running_average, axis, momentum, epsilon, dtype, param_dtype,
    use_bias, use_scale, bias_init, scale_init, axis_name,
    axis_index_groups, use_fast_variance, promote_dtype, rngs,
    bias_metadata, scale_metadata: as in ``flax.nnx.BatchNorm``
    (``use_fast_variance`` affects ``std`` in batch mode only).
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
    self.statistic = statistic
    self.deviation = deviation
    self.alpha = alpha
    self.p = p
    self.levels = _as_tuple(levels)
    self.weights = _as_tuple(weights)
    self.gaussian_consistent = gaussian_consistent
    self.use_fast_variance = use_fast_variance
    # Fail when the layer is set up, not with a NaN many steps later.
    self.mode = check_mode(mode)
    measures = self.measures()
    check_layer_fields(
        epsilon=epsilon,
        momentum=momentum,
        dtype=dtype,
        param_dtype=param_dtype,
        flags={
            "use_running_average": use_running_average,
            "use_bias": use_bias,
            "use_scale": use_scale,
            "use_fast_variance": use_fast_variance,
            "approximate": approximate,
        },
        initializers={"bias_init": bias_init, "scale_init": scale_init},
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )
    self.approximate = approximate

    feature_shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.online_names: tuple[str, ...] = ()
    if mode == "online":
      init = online.init_state(measures, feature_shape, jnp.float32)
      for name, value in init.items():
        setattr(self, name, nnx.BatchStat(value))
      self.online_names = tuple(init)

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
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.promote_dtype = promote_dtype

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
    check_floating_input(x)
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)

    # Promote dtypes for the input and all Variables, as nnx.BatchNorm does.
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, center, dev_sq, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype
    )
    if not use_running_average:
      sample_kwargs = dict(
          axes=reduction_axes,
          mask=mask,
          axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups,
          dtype=self.dtype,
          approximate=self.approximate,
      )
      # As nnx.BatchNorm: stop_gradient on the stored state only for refs.
      if self.mean._can_update or self.var._can_update:
        stop_gradient = jax.lax.stop_gradient
      else:
        stop_gradient = lambda v: v
      if self.mode == "online":
        center, dev_sq, new = online.update(
            self.measures(),
            {k: getattr(self, k)[...] for k in self.online_names},
            Sample(x, **sample_kwargs),
            momentum=self.momentum,
        )
        for k, v in new.items():
          getattr(self, k)[...] = v
        self.mean[...] = stop_gradient(center)
        self.var[...] = stop_gradient(dev_sq)
      else:
        center, dev_sq = sample_statistics(
            self.measures(), x, squared=True, **sample_kwargs
        )
        self.mean[...] = stop_gradient(
            self.momentum * self.mean[...] + (1 - self.momentum) * center
        )
        self.var[...] = stop_gradient(
            self.momentum * self.var[...] + (1 - self.momentum) * dev_sq
        )

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
        epsilon=self.epsilon,
        scale=scale,
        bias=bias,
    )
    return jnp.asarray(y, dtypes.canonicalize_dtype(*args, dtype=self.dtype))

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``: sets ``use_running_average`` when given."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
