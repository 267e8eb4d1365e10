"""Evaluation utilities: precise statistics and moving a BatchNorm model over.

* :func:`recompute_batch_stats_linen` / :func:`recompute_batch_stats_nnx`
  ("PreciseBN", Wu & Johnson 2021): with the weights fixed, replace every
  normalization layer's running ``mean``/``var`` by the equal-weight average,
  over a set of batches, of that layer's batch S and D^2 -- the values the
  layer normalizes with in training, without the lag and the noise of an
  exponential moving average. Re-exported as ``recompute_batch_stats`` from
  :mod:`gbn_jax.linen` and :mod:`gbn_jax.nnx`.
* :func:`from_batch_norm`: rename a ``flax.linen.BatchNorm`` model's variables
  so that the same model with :class:`gbn_jax.linen.GeneralizedBatchNorm` in
  its place loads them.

Cost of a recompute: one training-mode forward pass per batch (no backward
pass), plus, for linen, a second evaluation of each layer's statistics. The
forward pass is compiled once per input shape. See docs/EVALUATION.md for when
it pays off (short runs, a fast-moving network, a large momentum).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import frozen_dict
from flax.linen import normalization as linen_normalization

import gbn_jax

# GeneralizedBatchNorm fields that select the measures (make_measures kwargs).
_MEASURE_FIELDS = (
  "alpha",
  "p",
  "levels",
  "weights",
  "gaussian_consistent",
  "use_fast_variance",
)


def _default_unpack(batch):
  return (batch,), {}


def _nested_dict(tree):
  """A copy of a nested mapping as nested dicts (the leaves are shared)."""
  if isinstance(tree, Mapping):
    return {key: _nested_dict(value) for key, value in tree.items()}
  return tree


def _progress(batches, progress: bool):
  """``batches`` wrapped in a tqdm bar when wanted, installed and sized."""
  if not progress or not hasattr(batches, "__len__"):
    return batches
  try:
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # noqa: PLC0415
  except ImportError:
    return batches
  return tqdm(
    batches,
    total=len(batches),
    desc="recompute_batch_stats",
    unit="batch",
    leave=False,
  )


class _Average:
  """Equal-weight averages of per-layer (S, D^2), accumulated in float64."""

  def __init__(self):
    self.sums: dict[Any, list[np.ndarray]] = {}
    self.counts: dict[Any, int] = {}

  def add(self, key, center, dev_sq):
    """Adds one sample of (S, D^2)."""
    center = np.asarray(center, np.float64)
    dev_sq = np.asarray(dev_sq, np.float64)
    if key not in self.sums:
      self.sums[key] = [np.zeros_like(center), np.zeros_like(dev_sq)]
      self.counts[key] = 0
    self.sums[key][0] = self.sums[key][0] + center
    self.sums[key][1] = self.sums[key][1] + dev_sq
    self.counts[key] += 1

  def result(self, key):
    center, dev_sq = self.sums[key]
    return center / self.counts[key], dev_sq / self.counts[key]


def _feature_and_reduction_axes(ndim: int, axis) -> tuple[tuple[int, ...], ...]:
  """(feature axes, reduction axes) as flax.linen.BatchNorm derives them."""
  axes = axis if isinstance(axis, Iterable) else (axis,)
  feature_axes = tuple(sorted({a + ndim if a < 0 else a for a in axes}))
  reduction_axes = tuple(i for i in range(ndim) if i not in feature_axes)
  return feature_axes, reduction_axes


def _gbn_batch_stats(module, x, mask):
  """A GeneralizedBatchNorm's batch (S, D^2), as the layer computes them.

  Batch-mode measures whatever the layer's ``mode``: the precise statistics
  of an online layer are the population values its online estimates track.
  """
  measures = gbn_jax.make_measures(
    module.statistic,
    module.deviation,
    **{name: getattr(module, name) for name in _MEASURE_FIELDS},
  )
  _, reduction_axes = _feature_and_reduction_axes(x.ndim, module.axis)
  return gbn_jax.sample_statistics(
    measures,
    x,
    axes=reduction_axes,
    mask=mask,
    axis_name=module.axis_name,
    axis_index_groups=module.axis_index_groups,
    dtype=module.dtype,
    force_float32_reductions=module.force_float32_reductions,
    approximate=module.approximate,
    squared=True,
  )


def _bn_batch_stats(module, x, mask):
  """An ``nn.BatchNorm``'s batch (mean, var), as Flax computes them."""
  _, reduction_axes = _feature_and_reduction_axes(x.ndim, module.axis)
  return linen_normalization._compute_stats(  # pylint: disable=protected-access
    x,
    reduction_axes,
    dtype=module.dtype,
    axis_name=module.axis_name,
    axis_index_groups=module.axis_index_groups,
    use_fast_variance=module.use_fast_variance,
    mask=mask,
    force_float32_reductions=module.force_float32_reductions,
  )


def _linen_gbn_class():
  # Imported when used: gbn_jax.linen re-exports this module's functions.
  from gbn_jax.linen import GeneralizedBatchNorm  # noqa: PLC0415

  return GeneralizedBatchNorm


@functools.lru_cache(maxsize=8)
def _cached_linen_forward(model, axis_name, unpack_batch, apply_items):
  return _build_linen_forward(model, axis_name, unpack_batch, dict(apply_items))


def _build_linen_forward(model, axis_name, unpack_batch, apply_kwargs):
  """(compiled forward, trace-time record of the norm layers it met).

  The forward maps (variables, args, kwargs) to {layer path: [(S, D^2) per
  training-mode call]}; with ``axis_name`` it is pmapped, and every value
  gains a leading device axis.
  """
  seen = {"training": set(), "eval": set()}
  gbn_class = _linen_gbn_class()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(
      module, (gbn_class, nn.BatchNorm)
    ):
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    call_ura = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    use_running_average = (
      call_ura if call_ura is not None else module.use_running_average
    )
    path = tuple(module.path)
    if use_running_average:
      seen["eval"].add(path)
      return next_fun(*args, **kwargs)
    if module.axis_name is not None and axis_name is None:
      raise ValueError(
        f"layer {'/'.join(path)} pools its statistics over the device axis"
        f" {module.axis_name!r}: pass axis_name={module.axis_name!r} and"
        " batches with a leading device axis"
      )
    seen["training"].add(path)
    stats_of = (
      _gbn_batch_stats if isinstance(module, gbn_class) else _bn_batch_stats
    )
    center, dev_sq = stats_of(module, x, kwargs.get("mask"))
    records.setdefault(path, []).append(
      (jax.lax.stop_gradient(center), jax.lax.stop_gradient(dev_sq))
    )
    return next_fun(*args, **kwargs)

  records: dict = {}

  def forward(variables, args, kwargs):
    records.clear()
    with nn.intercept_methods(interceptor):
      model.apply(
        variables, *args, mutable=["batch_stats"], **kwargs, **apply_kwargs
      )
    out = dict(records)
    records.clear()
    return out

  def forward_batch(variables, batch):
    args, kwargs = unpack_batch(batch)
    return compiled(variables, tuple(args), dict(kwargs))

  if axis_name is None:
    compiled = jax.jit(forward)
  else:
    compiled = jax.pmap(forward, axis_name=axis_name, in_axes=(None, 0, 0))
  return forward_batch, seen


def recompute_batch_stats_linen(
  model: nn.Module,
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  axis_name: str | None = None,
  unpack_batch: Callable[[Any], tuple[tuple, dict]] | None = None,
  progress: bool = True,
  **apply_kwargs,
) -> Mapping[str, Any]:
  """Precise statistics for a linen model: running averages from fixed weights.

  Runs ``model.apply(variables, batch, mutable=["batch_stats"],
  **apply_kwargs)`` on every batch and, for every
  :class:`gbn_jax.linen.GeneralizedBatchNorm` and ``flax.linen.BatchNorm``
  called in training mode, records the batch S and D^2 the layer normalizes
  with (same measures, mask, dtype and cross-device pooling; batch-mode
  measures for ``mode="online"`` layers). Each layer's ``batch_stats``
  ``mean``/``var`` then become the equal-weight average of its values over the
  batches (over every call, for a layer called several times per forward).
  Everything else -- parameters, online trackers, other collections -- is
  returned unchanged.

  When to use: before evaluating a model whose running averages may lag
  behind its weights -- after a short training run, with a large momentum, or
  with GeneralizedBatchNorm layers, whose statistics move faster during
  training than BatchNorm's (docs/EVALUATION.md). Pass a few hundred to a few
  thousand training examples in training-size batches.

  Cost: one training-mode forward pass per batch and one more evaluation of
  each norm layer's statistics; no gradients. Compiled once per input shape
  (and cached across calls for hashable arguments).

  Args:
    model: the linen module.
    variables: its variables, with a ``batch_stats`` collection (unreplicated
      under pmap).
    batches: an iterable of model inputs (each passed as the first positional
      argument of ``apply``), e.g. a list of training batches.
    axis_name: for layers with ``axis_name`` set: run the forward under
      ``jax.pmap`` with this axis name; every batch then carries a leading
      device axis and the statistics are those of the global batch, as in
      training.
    unpack_batch: maps a batch to ``(args, kwargs)`` of ``apply`` (default
      ``((batch,), {})``), e.g. ``lambda b: ((b["x"],), {"mask": b["mask"]})``;
      the values must be arrays.
    progress: show a tqdm progress bar (if tqdm is installed and ``batches``
      has a length).
    **apply_kwargs: passed to every ``apply``; must select training mode for
      the norm layers (e.g. ``train=True``). ``rngs=`` for dropout.

  Returns:
    ``variables`` with new ``batch_stats`` ``mean``/``var``, same structure.

  Raises:
    ValueError: ``batches`` is empty; the model calls no norm layer; a norm
      layer ran with ``use_running_average=True``; a layer pools over a device
      axis and ``axis_name`` is not given.
  """
  if "mutable" in apply_kwargs:
    raise ValueError(
      "recompute_batch_stats sets mutable=['batch_stats']; do not pass mutable"
    )
  unpack_batch = unpack_batch or _default_unpack
  try:
    forward, seen = _cached_linen_forward(
      model, axis_name, unpack_batch, tuple(sorted(apply_kwargs.items()))
    )
  except TypeError:  # an unhashable argument: no cache
    forward, seen = _build_linen_forward(
      model, axis_name, unpack_batch, apply_kwargs
    )

  average = _Average()
  checked = False
  for batch in _progress(batches, progress):
    stats = jax.device_get(forward(variables, batch))
    if not checked:
      _check_linen_calls(seen, apply_kwargs)
      checked = True
    for path, calls in stats.items():
      for center, dev_sq in calls:
        if axis_name is None:
          average.add(path, center, dev_sq)
        else:  # one sample per device
          for c, d in zip(center, dev_sq, strict=True):
            average.add(path, c, d)
  if not checked:
    raise ValueError(
      "batches is empty: nothing to recompute the statistics from"
    )

  new_variables = _nested_dict(variables)
  if "batch_stats" not in new_variables:
    raise ValueError("variables have no 'batch_stats' collection")
  for path in average.sums:
    layer_stats = new_variables["batch_stats"]
    for name in path:
      if name not in layer_stats:
        raise ValueError(
          f"layer {'/'.join(path)} has no entry in variables['batch_stats']"
          " (a layer inside a lifted transform such as nn.scan is not"
          " supported)"
        )
      layer_stats = layer_stats[name]
    center, dev_sq = average.result(path)
    layer_stats["mean"] = jnp.asarray(
      center, jnp.asarray(layer_stats["mean"]).dtype
    )
    layer_stats["var"] = jnp.asarray(
      dev_sq, jnp.asarray(layer_stats["var"]).dtype
    )
  if isinstance(variables, frozen_dict.FrozenDict):
    return frozen_dict.freeze(new_variables)
  return new_variables


def _check_linen_calls(seen, apply_kwargs):
  """Clear errors for a forward without training-mode norm layers."""
  in_eval = sorted(seen["eval"] - seen["training"])
  if in_eval:
    names = ", ".join("/".join(p) for p in in_eval)
    given = (
      f" (apply kwargs given: {sorted(apply_kwargs)})" if apply_kwargs else ""
    )
    raise ValueError(
      f"norm layers {names} ran with use_running_average=True{given}: pass"
      " the apply argument that selects training mode, e.g."
      " recompute_batch_stats(model, variables, batches, train=True)"
    )
  if not seen["training"]:
    raise ValueError(
      "the model called no GeneralizedBatchNorm or flax.linen.BatchNorm"
      " layer: there are no statistics to recompute"
    )


# --------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------


def _nnx_gbn_class():
  # Imported when used: gbn_jax.nnx re-exports this module's functions.
  from gbn_jax.nnx import GeneralizedBatchNorm  # noqa: PLC0415

  return GeneralizedBatchNorm


def _nnx_norm_layers(model) -> list[tuple[tuple, Any]]:
  """(path, layer) of every GBN / nnx.BatchNorm, in nnx.iter_graph order."""
  classes = (_nnx_gbn_class(), nnx.BatchNorm)
  return [
    (path, node)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, classes)
  ]


def recompute_batch_stats_nnx(
  model: nnx.Module,
  batches: Iterable[Any],
  *,
  axis_name: str | None = None,
  unpack_batch: Callable[[Any], tuple[tuple, dict]] | None = None,
  progress: bool = True,
  **call_kwargs,
) -> None:
  """Precise statistics for an NNX model, in place.

  Calls ``model(batch, **call_kwargs)`` on every batch on a copy of the model
  whose :class:`gbn_jax.nnx.GeneralizedBatchNorm` and ``flax.nnx.BatchNorm``
  layers run in training mode with momentum 0 (and ``mode="batch"``), so after
  each call their ``mean``/``var`` are exactly the batch S and D^2; the other
  layers keep their mode (e.g. dropout off after ``model.eval()``). Each
  layer's ``mean``/``var`` then become the equal-weight average over the
  batches. Nothing else changes (online trackers included).

  When to use and cost: as :func:`recompute_batch_stats_linen` -- one forward
  pass per batch, compiled once per input shape. A layer called several times
  per forward contributes its last call.

  Args:
    model: the NNX module (modified in place).
    batches: an iterable of model inputs.
    axis_name: for layers with ``axis_name`` set: run under ``jax.pmap`` with
      this axis name; every batch carries a leading device axis.
    unpack_batch: maps a batch to ``(args, kwargs)`` of the call (default
      ``((batch,), {})``); the values must be arrays.
    progress: show a tqdm progress bar (if installed and ``batches`` has a
      length).
    **call_kwargs: passed to every call of ``model``.

  Raises:
    ValueError: ``batches`` is empty; the model has no norm layer; a norm
      layer was not run in training mode (e.g. the model passes
      ``use_running_average`` to it explicitly: pass the call argument that
      selects training); a layer pools over a device axis and ``axis_name``
      is not given.
  """
  layers = _nnx_norm_layers(model)
  if not layers:
    raise ValueError(
      "the model has no gbn_jax.nnx.GeneralizedBatchNorm or"
      " flax.nnx.BatchNorm layer: there are no statistics to recompute"
    )
  for path, layer in layers:
    if layer.axis_name is not None and axis_name is None:
      raise ValueError(
        f"layer {'/'.join(map(str, path))} pools its statistics over the"
        f" device axis {layer.axis_name!r}: pass"
        f" axis_name={layer.axis_name!r} and batches with a leading device"
        " axis"
      )
  unpack_batch = unpack_batch or _default_unpack
  graphdef, state = nnx.split(model)

  def batch_stats_of(state, args, kwargs):
    copy = nnx.merge(graphdef, state)
    copy_layers = [layer for _, layer in _nnx_norm_layers(copy)]
    for layer in copy_layers:
      layer.use_running_average = False
      layer.momentum = 0.0  # mean/var := the batch's S/D^2, exactly
      if isinstance(layer, _nnx_gbn_class()):
        layer.mode = "batch"
      layer.mean[...] = jnp.zeros_like(layer.mean[...])  # 0 * inf would be NaN
      # D^2 >= 0: a var still negative after the call marks a layer that did
      # not run in training mode.
      layer.var[...] = jnp.full_like(layer.var[...], -1.0)
    copy(*args, **kwargs, **call_kwargs)
    return [(layer.mean[...], layer.var[...]) for layer in copy_layers]

  if axis_name is None:
    compiled = jax.jit(batch_stats_of)
  else:
    compiled = jax.pmap(
      batch_stats_of, axis_name=axis_name, in_axes=(None, 0, 0)
    )

  average = _Average()
  checked = False
  for batch in _progress(batches, progress):
    args, kwargs = unpack_batch(batch)
    stats = jax.device_get(compiled(state, tuple(args), dict(kwargs)))
    if not checked:
      not_run = [
        "/".join(map(str, path))
        for (path, _), (_, dev_sq) in zip(layers, stats, strict=True)
        if np.any(np.asarray(dev_sq) < 0)
      ]
      if not_run:
        raise ValueError(
          f"norm layers {', '.join(not_run)} did not run in training mode"
          " (or were not called): pass the call argument that selects"
          " training, e.g. recompute_batch_stats(model, batches, train=True)"
        )
      checked = True
    for i, (center, dev_sq) in enumerate(stats):
      if axis_name is None:
        average.add(i, center, dev_sq)
      else:
        for c, d in zip(center, dev_sq, strict=True):
          average.add(i, c, d)
  if not checked:
    raise ValueError(
      "batches is empty: nothing to recompute the statistics from"
    )
  for i, (_, layer) in enumerate(layers):
    center, dev_sq = average.result(i)
    layer.mean[...] = jnp.asarray(center, layer.mean[...].dtype)
    layer.var[...] = jnp.asarray(dev_sq, layer.var[...].dtype)


# --------------------------------------------------------------------------
# BatchNorm checkpoints
# --------------------------------------------------------------------------

_AUTO_BN_NAME = re.compile(r"^BatchNorm_(\d+)$")


def _rename(tree):
  """Renames automatic ``BatchNorm_<i>`` keys at every depth of a mapping."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, value in tree.items():
    match = _AUTO_BN_NAME.match(key) if isinstance(key, str) else None
    new_key = key
    if match:
      candidate = f"GeneralizedBatchNorm_{match.group(1)}"
      if candidate not in tree:  # a collision is left alone
        new_key = candidate
    out[new_key] = _rename(value)
  return out


def _fill_from_target(tree, target, path, problems):
  """``tree`` plus the entries only ``target`` has; mismatches to problems."""
  if not isinstance(target, Mapping) or not isinstance(tree, Mapping):
    if isinstance(target, Mapping) != isinstance(tree, Mapping):
      problems.append(
        f"{'/'.join(path)}: a subtree in one, a leaf in the other"
      )
    elif np.shape(tree) != np.shape(target):
      problems.append(
        f"{'/'.join(path)}: shape {np.shape(tree)} vs the"
        f" target's {np.shape(target)}"
      )
    return tree
  out = {}
  for key, value in tree.items():
    if key not in target:
      problems.append(f"{'/'.join((*path, str(key)))}: not in the target")
      out[key] = value
    else:
      out[key] = _fill_from_target(
        value, target[key], (*path, str(key)), problems
      )
  for key, value in target.items():
    if key not in tree:
      if any(
        isinstance(leaf, jax.ShapeDtypeStruct)
        for leaf in jax.tree_util.tree_leaves(value)
      ):
        raise ValueError(
          f"{'/'.join((*path, str(key)))} is missing and the target has no"
          " value for it: pass target_variables from model.init(...), not"
          " jax.eval_shape"
        )
      out[key] = _nested_dict(value)
  return out


def from_batch_norm(
  variables: Mapping[str, Any],
  target_variables: Mapping[str, Any] | None = None,
) -> Mapping[str, Any]:
  """A ``flax.linen.BatchNorm`` model's variables, for its GBN counterpart.

  Flax names an unnamed layer after its class, so a model that had
  ``nn.BatchNorm()`` stores ``BatchNorm_0``, ... where the same model with
  :class:`gbn_jax.linen.GeneralizedBatchNorm` expects
  ``GeneralizedBatchNorm_0``, .... This renames every key ``BatchNorm_<i>`` to
  ``GeneralizedBatchNorm_<i>`` at every depth of every collection (params,
  batch_stats, or any nested mapping such as a restored TrainState with its
  optimizer state). A key whose new name already exists beside it is left
  alone, and so are explicitly named layers (``name="bn1"``): they load as
  they are.

  With ``target_variables`` (the GBN model's ``model.init(...)``), the
  entries the target has and ``variables`` lacks -- the trackers of a
  ``mode="online"`` layer -- are taken from it, i.e. start at their initial
  values, and a structure that still differs raises. ``mean``/``var`` carry
  over (for an online layer they are what it evaluates with).

  With ``statistic="mean", deviation="std"`` (and the other fields as the
  BatchNorm's) the converted model's eval outputs equal the BatchNorm
  model's bitwise.

  Example::

    bn_vars = flax.serialization.msgpack_restore(checkpoint_bytes)
    gbn_vars = from_batch_norm(bn_vars, gbn_model.init(key, x))
    y = gbn_model.apply(gbn_vars, x, train=False)

  Args:
    variables: the BatchNorm model's variables (or any nested mapping of
      them, e.g. a state dict from ``flax.serialization.to_state_dict``).
    target_variables: optional; the GBN model's freshly initialised
      variables, to fill and check against.

  Returns:
    A new nested dict (a FrozenDict if ``variables`` was one).

  Raises:
    ValueError: with ``target_variables``, an entry of ``variables`` not in
      the target, or a shape that differs.
  """
  renamed = _rename(variables)
  if target_variables is not None:
    problems: list[str] = []
    renamed = _fill_from_target(renamed, target_variables, (), problems)
    if problems:
      raise ValueError(
        "the converted variables do not match target_variables:\n  "
        + "\n  ".join(problems)
      )
  if isinstance(variables, frozen_dict.FrozenDict):
    return frozen_dict.freeze(renamed)
  return renamed
